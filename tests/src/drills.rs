//! What the fault tests share: settings under which faults resolve in seconds, their workload,
//! and seeded schedules a failing run can repeat.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::{Options, order};

impl Options {
    /// Each checkout step's attempts end after `deadline_ms` and back off at most a second, and
    /// a forward step gets `attempts` attempts: a lost command or reply is sent again within
    /// seconds.
    pub fn quick_steps(mut self, deadline_ms: u32, attempts: u32) -> Self {
        for step in ["RESERVE_STOCK", "CHARGE_PAYMENT", "CREATE_SHIPMENT"] {
            for phase in ["FORWARD", "COMPENSATION"] {
                self = self
                    .orchestrator(
                        &format!("SAGA_CHECKOUT__POLICIES__{step}__{phase}__DEADLINE_MS"),
                        &deadline_ms.to_string(),
                    )
                    .orchestrator(
                        &format!("SAGA_CHECKOUT__POLICIES__{step}__{phase}__BACKOFF_MAX_MS"),
                        "1000",
                    );
            }
            self = self.orchestrator(
                &format!("SAGA_CHECKOUT__POLICIES__{step}__FORWARD__MAX_ATTEMPTS"),
                &attempts.to_string(),
            );
        }
        self
    }

    /// The outbox swept, timers polled, replies redelivered and breakers tried again within
    /// a second or so.
    pub fn quick_recovery(self) -> Self {
        self.orchestrator("SAGA_RELAY__SCAN_INTERVAL_MS", "300")
            .orchestrator("SAGA_RELAY__SCAN_GRACE_MS", "500")
            .orchestrator("SAGA_TIMERS__POLL_INTERVAL_MS", "50")
            .orchestrator("SAGA_REPLIES__ACK_WAIT_MS", "5000")
            .orchestrator("SAGA_BREAKERS__OPEN_INITIAL_MS", "500")
            .orchestrator("SAGA_BREAKERS__OPEN_MAX_MS", "2000")
    }
}

/// Order `i` of a drill: one or two lines; every tenth card is declined, some are flaky.
pub fn workload(i: usize) -> Value {
    let token = match i % 10 {
        9 => "tok_decline",
        5 => "tok_flaky",
        _ => "tok_visa",
    };
    if i.is_multiple_of(3) {
        order(&[("A", 1), ("B", 1)], token)
    } else {
        order(&[("B", 1)], token)
    }
}

/// A random fault schedule that a failing run can repeat: the seed is printed, and
/// `FAULT_SEED=<seed>` runs the same schedule again.
pub fn schedule() -> StdRng {
    let seed = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("fault schedule: FAULT_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// `rounds` moments of a load, as counts of sagas created: at random between `first` and
/// `last`, in order, at least `gap` apart.
pub fn moments(rng: &mut StdRng, rounds: usize, (first, last): (i64, i64), gap: i64) -> Vec<i64> {
    let spare = last - first - gap * (rounds as i64 - 1);
    let mut at: Vec<i64> = (0..rounds).map(|_| rng.random_range(0..=spare)).collect();
    at.sort_unstable();
    at.iter()
        .enumerate()
        .map(|(i, x)| first + x + gap * i as i64)
        .collect()
}

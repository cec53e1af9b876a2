//! The load generator of the checkout-saga workload (../shared/bench/checkout-saga-workload.md):
//! clients place checkouts through the HTTP API and wait for each saga to end. Order `i` with
//! `i % 10 == 9` pays with a card the processor declines, so its saga compensates; every other
//! order completes.
//!
//! Closed loop (`-n`, `-c`): `c` clients, each placing its next checkout when the previous saga
//! ended, after a warm-up. Open loop (`--rate`, `--duration-secs`): checkouts started at a
//! fixed rate; each saga's latency counts from the moment its request was due, so a load
//! generator that falls behind shows in the latency (no coordinated omission). The last line
//! is the workload's report line.
//!
//! Exit status: 0 when every measured saga ended completed or compensated; 1 when any did not
//! (an error: refused, failed, or not ended within `--saga-timeout-secs`), or with `--strict`
//! when any ended otherwise than the workload expects (order `i` compensated exactly when
//! `i % 10 == 9`). The report line is printed either way.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// mimalloc: the saga hot path allocates many small, short-lived buffers (JSON, rows,
/// messages); it spends less CPU on them than glibc's allocator (2.26 -> 2.20 ms per saga, 787 ->
/// 795 sagas/s, BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Clone)]
#[command(about = "Drive the checkout-saga workload through the HTTP API")]
struct Cli {
    /// The orchestrator's base URL; several orchestrators' comma-separated. Saga `i` goes to
    /// the `i mod count`-th, its start and its polls alike: the orchestrator that takes a start
    /// owns the saga's partition, so its reply and `Prefer: wait` come back there.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8080")]
    url: Vec<String>,
    /// Sagas measured (closed loop).
    #[arg(short = 'n', long, default_value_t = 2000)]
    n: usize,
    /// Concurrent clients (closed loop).
    #[arg(short = 'c', long, default_value_t = 50)]
    c: usize,
    /// Sagas run before measuring.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Open loop: start this many sagas per second instead of a closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: for this long.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// SKUs the orders are made of (one line each, quantity 1).
    #[arg(long, value_delimiter = ',', default_value = "TSHIRT-BLK-M,MUG-WHITE")]
    skus: Vec<String>,
    /// The system name on the report line.
    #[arg(long, default_value = "saga-orchestrator")]
    system: String,
    /// The variant on the report line (`noop` or `real`).
    #[arg(long, default_value = "real")]
    variant: String,
    /// A saga not ended after this long counts as an error.
    #[arg(long, default_value_t = 60)]
    saga_timeout_secs: u64,
    /// One line per saga on stderr: its id, the order's index and its final status.
    #[arg(long)]
    verbose: bool,
    /// Also exit 1 when a saga ends otherwise than the workload expects (order `i` compensated
    /// exactly when `i % 10 == 9`, every other completed), not only on errors.
    #[arg(long)]
    strict: bool,
    /// Print latency per minute (soak runs).
    #[arg(long)]
    per_minute: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Completed,
    Compensated,
    Error,
}

/// The outcome the workload expects of order `i`.
fn expected(i: usize) -> Outcome {
    if i % 10 == 9 {
        Outcome::Compensated
    } else {
        Outcome::Completed
    }
}

struct Sample {
    /// When the saga was seen to end (or given up on).
    done: Instant,
    /// Latency in ms, from the moment the request was due.
    ms: f64,
    outcome: Outcome,
    /// The order's index.
    i: usize,
}

#[derive(Default)]
struct Results {
    samples: Vec<Sample>,
}

impl Results {
    fn record(&mut self, i: usize, (ms, outcome): (f64, Outcome)) {
        self.samples.push(Sample {
            done: Instant::now(),
            ms,
            outcome,
            i,
        });
    }

    fn count(&self, o: Outcome) -> usize {
        self.samples.iter().filter(|s| s.outcome == o).count()
    }

    /// Sagas that ended (not in error) otherwise than the workload expects.
    fn unexpected(&self) -> usize {
        self.samples
            .iter()
            .filter(|s| s.outcome != Outcome::Error && s.outcome != expected(s.i))
            .count()
    }
}

/// The longest wait to ask the server for: the time left until `deadline`, in whole seconds,
/// at least 1 and at most 60 (the server's default `http.max_wait_seconds`).
fn wait_secs(deadline: Instant) -> u64 {
    deadline
        .saturating_duration_since(Instant::now())
        .as_secs()
        .clamp(1, 60)
}

/// A short pause before asking again after a failed poll, never past `deadline`.
async fn pause(deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(Duration::from_millis(100).min(left)).await;
}

struct Client {
    http: reqwest::Client,
    cli: Cli,
}

impl Client {
    fn body(&self, i: usize) -> Value {
        // Declined by the simulated processor (real) and by the noop payment worker (which sees
        // the customer id, not the card).
        let (token, customer) = if i % 10 == 9 {
            ("tok_decline", "decline")
        } else {
            ("tok_visa", "load")
        };
        json!({
            "customer": {"id": format!("{customer}-{}", i % 1000), "email": "load@example.com"},
            "items": self.cli.skus.iter().map(|s| json!({"sku": s, "quantity": 1})).collect::<Vec<_>>(),
            "payment_token": token,
            "shipping_address": {"name": "Load Test", "line1": "1 Bench St", "city": "Madrid",
                                 "postal_code": "28001", "country": "ES"}
        })
    }

    /// Place checkout `i` and wait for its saga to end: `Prefer: wait` answers with the
    /// outcome when the saga ends in time; otherwise a long poll (`?wait`) follows. `due` is
    /// when the request should have been sent (in the open loop, its slot in the schedule,
    /// which may be earlier than now if this process fell behind): the latency, in ms, and the
    /// saga's deadline count from it.
    async fn run_one(&self, i: usize, due: Instant) -> (f64, Outcome) {
        let deadline = due + Duration::from_secs(self.cli.saga_timeout_secs);
        let url = &self.cli.url[i % self.cli.url.len()];
        let r = self
            .http
            .post(format!("{url}/checkout"))
            .header("Prefer", format!("wait={}", wait_secs(deadline)))
            .json(&self.body(i))
            .send()
            .await;
        let mut v = match r {
            Ok(r) if matches!(r.status().as_u16(), 200 | 202) => match r.json::<Value>().await {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("checkout {i}: unreadable answer: {e}");
                    return (0.0, Outcome::Error);
                }
            },
            Ok(r) => {
                eprintln!("checkout {i}: HTTP {}", r.status());
                return (0.0, Outcome::Error);
            }
            Err(e) => {
                eprintln!("checkout {i}: {e}");
                return (0.0, Outcome::Error);
            }
        };
        let id = match v["saga_id"].as_str() {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => {
                eprintln!("checkout {i}: answer without a saga_id: {v}");
                return (0.0, Outcome::Error);
            }
        };
        loop {
            let status = v["status"].as_str().unwrap_or("unknown").to_owned();
            let outcome = match status.as_str() {
                "completed" => Some(Outcome::Completed),
                "compensated" => Some(Outcome::Compensated),
                "failed" => Some(Outcome::Error),
                _ => None,
            };
            if let Some(o) = outcome {
                let ms = due.elapsed().as_secs_f64() * 1000.0;
                if o == Outcome::Error {
                    eprintln!("saga {id} (checkout {i}): {status} in {ms:.1} ms");
                    return (0.0, o);
                }
                if self.cli.verbose || o != expected(i) {
                    let note = if o == expected(i) {
                        String::new()
                    } else {
                        format!(" (expected {})", status_name(expected(i)))
                    };
                    eprintln!("saga {id} (checkout {i}): {status} in {ms:.1} ms{note}");
                }
                return (ms, o);
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "saga {id} (checkout {i}): not ended after {} s (status {status})",
                    self.cli.saga_timeout_secs
                );
                return (0.0, Outcome::Error);
            }
            let answer = match self
                .http
                .get(format!("{url}/sagas/{id}?wait={}", wait_secs(deadline)))
                .send()
                .await
            {
                Ok(r) if r.status().as_u16() == 200 => r
                    .json::<Value>()
                    .await
                    .map_err(|e| format!("unreadable answer: {e}")),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok(next) if next["status"].is_string() => v = next,
                Ok(next) => {
                    if self.cli.verbose {
                        eprintln!("saga {id} (checkout {i}): answer without a status: {next}");
                    }
                    pause(deadline).await;
                }
                Err(e) => {
                    if self.cli.verbose {
                        eprintln!("saga {id} (checkout {i}): poll failed: {e}");
                    }
                    pause(deadline).await;
                }
            }
        }
    }
}

fn status_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Completed => "completed",
        Outcome::Compensated => "compensated",
        Outcome::Error => "error",
    }
}

/// This process's CPU seconds and peak RSS (KiB), from /proc.
fn own_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks / 100.0, hwm))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn closed_loop(
    client: Arc<Client>,
    first: usize,
    count: usize,
    results: Arc<Mutex<Results>>,
) -> Duration {
    let next = Arc::new(AtomicUsize::new(first));
    let end = first + count;
    let started = Instant::now();
    let tasks: Vec<_> = (0..client.cli.c)
        .map(|_| {
            let (client, next, results) = (client.clone(), next.clone(), results.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        break;
                    }
                    let r = client.run_one(i, Instant::now()).await;
                    results.lock().await.record(i, r);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
    started.elapsed()
}

/// Start checkout `i` at `start + i / rate` for every `i` with `i / rate < duration`. Each
/// saga's latency counts from its slot in that schedule, not from when its task first ran:
/// when this process falls behind (a burst of due ticks, a busy runtime), the delay is part
/// of the latency the user would have seen.
async fn open_loop(
    client: Arc<Client>,
    rate: f64,
    duration: Duration,
    results: Arc<Mutex<Results>>,
) -> (Duration, usize) {
    // Saga `i` is due at `start + i / rate`: computed from its index, so that exactly
    // ceil(rate x duration) start whatever the rounding of an interval. When the load generator
    // falls behind, the late ones start at once, and their latency still counts from when they
    // were due (no coordinated omission).
    let count = (rate * duration.as_secs_f64()).ceil() as usize;
    let start = tokio::time::Instant::now();
    // Finished tasks are reaped as the run goes: a finished task's memory is only freed once
    // it is joined, and a soak starts hundreds of thousands.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        while let Some(done) = tasks.try_join_next() {
            done.expect("client task");
        }
        let (client, results) = (client.clone(), results.clone());
        let due = due.into_std();
        tasks.spawn(async move {
            let r = client.run_one(i, due).await;
            results.lock().await.record(i, r);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("client task");
    }
    (start.elapsed(), count)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(rate) = cli.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        eprintln!("--rate must be a positive number of sagas per second, got {rate}");
        return ExitCode::from(2);
    }
    if cli.url.iter().any(|u| u.is_empty()) {
        eprintln!("--url must name at least one base URL, none empty");
        return ExitCode::from(2);
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(cli.c.max(64))
        .timeout(Duration::from_secs(cli.saga_timeout_secs + 5))
        .build()
        .expect("HTTP client");
    let client = Arc::new(Client {
        http,
        cli: cli.clone(),
    });
    if cli.warmup > 0 {
        eprintln!("warming up with {} sagas", cli.warmup);
        let warm = Arc::new(Mutex::new(Results::default()));
        closed_loop(client.clone(), 0, cli.warmup, warm.clone()).await;
        let warm = warm.lock().await;
        let errors = warm.count(Outcome::Error);
        if errors > 0 {
            eprintln!("warm-up: {errors} of {} sagas in error", cli.warmup);
        }
    }
    let results = Arc::new(Mutex::new(Results::default()));
    let measure_start = Instant::now();
    let (elapsed, n, c) = match cli.rate {
        None => {
            eprintln!("measuring {} sagas with {} clients", cli.n, cli.c);
            let elapsed = closed_loop(client.clone(), cli.warmup, cli.n, results.clone()).await;
            (elapsed, cli.n, cli.c)
        }
        Some(rate) => {
            eprintln!("starting {rate} sagas/s for {} s", cli.duration_secs);
            let (elapsed, n) = open_loop(
                client.clone(),
                rate,
                Duration::from_secs(cli.duration_secs),
                results.clone(),
            )
            .await;
            (elapsed, n, 0)
        }
    };
    let results = results.lock().await;
    let mut latencies: Vec<f64> = results
        .samples
        .iter()
        .filter(|s| s.outcome != Outcome::Error)
        .map(|s| s.ms)
        .collect();
    latencies.sort_by(f64::total_cmp);
    if cli.per_minute {
        let minutes = (elapsed.as_secs() / 60 + 1) as usize;
        for m in 0..minutes {
            let mut window: Vec<f64> = results
                .samples
                .iter()
                .filter(|s| {
                    s.outcome != Outcome::Error
                        && (s.done - measure_start).as_secs() / 60 == m as u64
                })
                .map(|s| s.ms)
                .collect();
            window.sort_by(f64::total_cmp);
            if !window.is_empty() {
                eprintln!(
                    "minute {}: sagas={} p50={:.1} p95={:.1} p99={:.1}",
                    m + 1,
                    window.len(),
                    percentile(&window, 50.0),
                    percentile(&window, 95.0),
                    percentile(&window, 99.0)
                );
            }
        }
    }
    if let Some((cpu, rss_kib)) = own_usage() {
        eprintln!(
            "loadgen: cpu={cpu:.2}s peak_rss={:.1}MiB",
            rss_kib as f64 / 1024.0
        );
    }
    let errors = results.count(Outcome::Error);
    let unexpected = results.unexpected();
    if errors > 0 {
        eprintln!("loadgen: {errors} of {n} sagas in error (refused, failed or not ended)");
    }
    if unexpected > 0 {
        eprintln!(
            "loadgen: {unexpected} of {n} sagas ended otherwise than the workload expects \
             (order i compensates exactly when i % 10 == 9)"
        );
    }
    let throughput = n as f64 / elapsed.as_secs_f64();
    println!(
        "{}: variant={} N={} C={} throughput={:.1} sagas/s p50={:.1} p95={:.1} p99={:.1} completed={} compensated={} errors={}",
        cli.system,
        cli.variant,
        n,
        c,
        throughput,
        percentile(&latencies, 50.0),
        percentile(&latencies, 95.0),
        percentile(&latencies, 99.0),
        results.count(Outcome::Completed),
        results.count(Outcome::Compensated),
        errors
    );
    if errors > 0 || (cli.strict && unexpected > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

//! The load generator of the checkout-saga workload (../shared/bench/checkout-saga-workload.md):
//! clients place checkouts through the HTTP API and wait for each saga to end. Order `i` with
//! `i % 10 == 9` pays with a card the processor declines, so its saga compensates; every other
//! order completes.
//!
//! Closed loop (`-n`, `-c`): `c` clients, each placing its next checkout when the previous saga
//! ended, after a warm-up. Open loop (`--rate`, `--duration-secs`): checkouts started at a
//! fixed rate. The last line is the workload's report line.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// mimalloc: the saga hot path allocates many small, short-lived buffers (JSON, rows,
/// messages); it spends markedly less CPU on them than glibc's allocator (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Clone)]
#[command(about = "Drive the checkout-saga workload through the HTTP API")]
struct Cli {
    /// The orchestrator's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
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
    /// One line per saga on stderr.
    #[arg(long)]
    verbose: bool,
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

#[derive(Default)]
struct Results {
    samples: Vec<(Instant, f64, Outcome)>,
}

struct Client {
    http: reqwest::Client,
    cli: Cli,
}

impl Client {
    fn body(&self, i: usize) -> Value {
        let token = if i % 10 == 9 {
            "tok_decline"
        } else {
            "tok_visa"
        };
        json!({
            "customer": {"id": format!("load-{}", i % 1000), "email": "load@example.com"},
            "items": self.cli.skus.iter().map(|s| json!({"sku": s, "quantity": 1})).collect::<Vec<_>>(),
            "payment_token": token,
            "shipping_address": {"name": "Load Test", "line1": "1 Bench St", "city": "Madrid",
                                 "postal_code": "28001", "country": "ES"}
        })
    }

    /// Place checkout `i` and wait for its saga to end: `Prefer: wait` answers with the
    /// outcome when the saga ends in time; otherwise a long poll (`?wait`) follows. Returns the
    /// latency in ms.
    async fn run_one(&self, i: usize) -> (f64, Outcome) {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(self.cli.saga_timeout_secs);
        let wait = self.cli.saga_timeout_secs.min(60);
        let r = self
            .http
            .post(format!("{}/checkout", self.cli.url))
            .header("Prefer", format!("wait={wait}"))
            .json(&self.body(i))
            .send()
            .await;
        let mut v = match r {
            Ok(r) if matches!(r.status().as_u16(), 200 | 202) => match r.json::<Value>().await {
                Ok(v) => v,
                Err(_) => return (0.0, Outcome::Error),
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
        let id = v["saga_id"].as_str().unwrap_or_default().to_owned();
        loop {
            let outcome = match v["status"].as_str() {
                Some("completed") => Some(Outcome::Completed),
                Some("compensated") => Some(Outcome::Compensated),
                Some("failed") => Some(Outcome::Error),
                _ => None,
            };
            if let Some(o) = outcome {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                if self.cli.verbose {
                    eprintln!("saga {id} {o:?} in {ms:.1} ms");
                }
                return (ms, o);
            }
            if Instant::now() > deadline {
                eprintln!(
                    "saga {id}: not ended after {} s",
                    self.cli.saga_timeout_secs
                );
                return (0.0, Outcome::Error);
            }
            v = match self
                .http
                .get(format!("{}/sagas/{id}?wait={wait}", self.cli.url))
                .send()
                .await
            {
                Ok(r) => r.json::<Value>().await.unwrap_or_default(),
                Err(_) => Value::Null,
            };
        }
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
                    let (ms, o) = client.run_one(i).await;
                    results.lock().await.samples.push((Instant::now(), ms, o));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
    started.elapsed()
}

async fn open_loop(
    client: Arc<Client>,
    rate: f64,
    duration: Duration,
    results: Arc<Mutex<Results>>,
) -> (Duration, usize) {
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    // Finished tasks are reaped as the run goes: a finished task's memory is only freed once
    // it is joined, and a soak starts hundreds of thousands.
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0;
    while started.elapsed() < duration {
        tick.tick().await;
        while let Some(done) = tasks.try_join_next() {
            done.expect("client task");
        }
        let (client, results) = (client.clone(), results.clone());
        tasks.spawn(async move {
            let (ms, o) = client.run_one(i).await;
            results.lock().await.samples.push((Instant::now(), ms, o));
        });
        i += 1;
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("client task");
    }
    (started.elapsed(), i)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
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
        closed_loop(client.clone(), 0, cli.warmup, warm).await;
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
    let count = |o| results.samples.iter().filter(|s| s.2 == o).count();
    let mut latencies: Vec<f64> = results
        .samples
        .iter()
        .filter(|s| s.2 != Outcome::Error)
        .map(|s| s.1)
        .collect();
    latencies.sort_by(f64::total_cmp);
    if cli.per_minute {
        let minutes = (elapsed.as_secs() / 60 + 1) as usize;
        for m in 0..minutes {
            let mut window: Vec<f64> = results
                .samples
                .iter()
                .filter(|s| {
                    s.2 != Outcome::Error && (s.0 - measure_start).as_secs() / 60 == m as u64
                })
                .map(|s| s.1)
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
        count(Outcome::Completed),
        count(Outcome::Compensated),
        count(Outcome::Error)
    );
}

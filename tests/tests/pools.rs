//! Worker pools of several processes: each process answers its own `/healthz`, `/readyz` and
//! `/metrics` (`workers::health`), the processes of a pool share its commands, and a process
//! killed while it holds commands loses none of them (`App::assert_invariants`).

use std::time::{Duration, Instant};

use e2e::{App, Options, order, place_many, pool_member};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(240);
/// The step pools a checkout needs.
const POOLS: [&str; 3] = ["inventory", "payment", "shipping"];

/// Two processes per step pool, and short deadlines so that a command lost with a process is
/// sent again within seconds.
fn two_per_pool() -> Options {
    Options {
        workers: POOLS.to_vec(),
        pool_size: 2,
        ..Options::default()
    }
    .quick_steps(3000, 6)
    .orchestrator("SAGA_TIMERS__POLL_INTERVAL_MS", "50")
}

/// Order `i`: every tenth card is declined (a permanent failure), the others go through.
fn workload(i: usize) -> Value {
    let token = if i % 10 == 9 {
        "tok_decline"
    } else {
        "tok_visa"
    };
    order(&[("A", 1), ("B", 1)], token)
}

/// `GET <process's health listener><path>`.
async fn get(app: &App, process: &str, path: &str) -> reqwest::Response {
    let url = format!("{}{path}", app.health_url(process));
    app.http
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// A process's `/metrics` text.
async fn metrics(app: &App, process: &str) -> String {
    let r = get(app, process, "/metrics").await;
    assert_eq!(r.status(), 200, "{process}: GET /metrics");
    r.text().await.expect("metrics text")
}

/// The sum of the samples whose line starts with `prefix` (a name and some of its labels);
/// `None` when there is none.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Wait until the process's `/readyz` answers 200.
async fn wait_ready(app: &App, process: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let url = format!("{}/readyz", app.health_url(process));
        match app.http.get(&url).send().await {
            Ok(r) if r.status() == 200 => return,
            answer => assert!(
                Instant::now() < deadline,
                "{process} not ready within {within:?} ({:?}); logs in {}",
                answer.map(|r| r.status()),
                app.logs.display()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_of_a_pool_is_probed_and_scraped_and_each_takes_its_share() {
    let app = App::spawn_with(two_per_pool()).await;
    let processes: Vec<(String, &str)> = POOLS
        .iter()
        .flat_map(|pool| (1..=2).map(move |i| (pool_member(pool, i), *pool)))
        .collect();
    for (process, _) in &processes {
        wait_ready(&app, process, Duration::from_secs(60)).await;
        let live = get(&app, process, "/healthz").await;
        assert_eq!(live.status(), 200, "{process}: GET /healthz");
        let ready: Value = get(&app, process, "/readyz").await.json().await.unwrap();
        assert_eq!(
            (ready["postgres"].as_str(), ready["jetstream"].as_str()),
            (Some("ok"), Some("ok")),
            "{process}: {ready}"
        );
    }
    let n = 200;
    let placed = place_many(app.base.clone(), n, 8, workload, SETTLE).await;
    assert_eq!(placed.len(), n);
    app.assert_invariants(n, SETTLE).await;

    let mut declined = 0.0;
    for (process, pool) in &processes {
        let text = metrics(&app, process).await;
        let ok = sample(
            &text,
            &format!("saga_worker_commands_total{{service=\"{pool}\",outcome=\"ok\"}}"),
        )
        .unwrap_or(0.0);
        assert!(
            ok > 0.0,
            "{process} answered no command: both processes of a pool take commands\n{text}"
        );
        let handled = sample(
            &text,
            &format!("saga_worker_command_seconds_count{{service=\"{pool}\"}}"),
        );
        assert!(
            handled >= Some(ok),
            "{process}: latency of every command\n{text}"
        );
        assert_eq!(
            sample(
                &text,
                &format!("saga_worker_in_flight{{service=\"{pool}\"}}")
            ),
            Some(0.0),
            "{process}: nothing in flight once every saga ended\n{text}"
        );
        for gauge in ["backlog", "pending", "ack_pending"] {
            assert!(
                sample(&text, &format!("saga_worker_{gauge}{{service=\"{pool}\"}}")).is_some(),
                "{process}: saga_worker_{gauge} missing\n{text}"
            );
        }
        if *pool == "payment" {
            declined += sample(
                &text,
                "saga_worker_commands_total{service=\"payment\",outcome=\"permanent\"}",
            )
            .unwrap_or(0.0);
        }
    }
    // Every tenth card was declined: the payment pool answered each with a permanent failure.
    assert!(
        declined >= (n / 10) as f64,
        "the payment pool counted {declined} permanent failures for {} declined cards",
        n / 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_process_killed_while_it_holds_commands_loses_none() {
    let mut app = App::spawn_with(two_per_pool()).await;
    for i in 1..=2 {
        wait_ready(&app, &pool_member("payment", i), Duration::from_secs(60)).await;
    }
    // Every charge takes a while at the processor, so that commands are in hand when the
    // process dies.
    app.control("processor", json!({"latency_ms": 1000})).await;
    let n = 60;
    let load = tokio::spawn(place_many(app.base.clone(), n, 8, workload, SETTLE));
    let victim = "payment-2";
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = loop {
        let text = metrics(&app, victim).await;
        let held = sample(&text, "saga_worker_in_flight{service=\"payment\"}").unwrap_or_default();
        if held > 0.0 {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "{victim} never held a command; logs in {}",
            app.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    app.kill(victim);
    eprintln!("killed {victim} holding {held} commands");
    assert_eq!(load.await.expect("load").len(), n);
    app.control("processor", json!({})).await;
    // It comes back and rejoins its pool.
    app.start(victim);
    wait_ready(&app, victim, Duration::from_secs(60)).await;
    app.assert_invariants(n, SETTLE).await;
    let survivor = metrics(&app, "payment").await;
    assert!(
        sample(
            &survivor,
            "saga_worker_commands_total{service=\"payment\",outcome=\"ok\"}"
        )
        .unwrap_or_default()
            > 0.0,
        "{survivor}"
    );
}

/// A TCP relay to PostgreSQL that the test can cut: while cut, it drops the connections it
/// carries and every new one, as a network partition between one process and its database
/// would (the shared PostgreSQL itself is never stopped).
struct Relay {
    port: u16,
    up: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(upstream: (String, u16)) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a relay port");
        let port = listener.local_addr().expect("bound").port();
        let (up, watch) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut watch = watch.clone();
                if !*watch.borrow() {
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|up| !up) => {}
                    }
                });
            }
        });
        Relay { port, up }
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
    }
}

/// Wait until the process's `/readyz` answers `status`; returns the answer's content type and
/// body.
async fn wait_readyz(app: &App, process: &str, status: u16, within: Duration) -> (String, Value) {
    let deadline = Instant::now() + within;
    loop {
        // Not listening yet, while the process starts.
        let url = format!("{}/readyz", app.health_url(process));
        let answer = app.http.get(&url).send().await;
        if let Ok(r) = answer.as_ref()
            && r.status() == status
        {
            let r = answer.expect("an answer");
            let content_type = r
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            return (content_type, r.json().await.expect("a JSON answer"));
        }
        assert!(
            Instant::now() < deadline,
            "{process}: /readyz is {:?}, not {status}, after {within:?}; logs in {}",
            answer.map(|r| r.status()),
            app.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_whose_database_is_unreachable_is_not_ready_until_it_is_back() {
    let mut app = App::spawn_with(Options {
        workers: vec!["payment"],
        ..Options::default()
    })
    .await;
    let mut url = reqwest::Url::parse(app.database_url()).expect("a database URL");
    let upstream = (
        url.host_str().expect("a host").to_owned(),
        url.port().unwrap_or(5432),
    );
    let relay = Relay::start(upstream).await;
    url.set_host(Some("127.0.0.1")).expect("a host");
    url.set_port(Some(relay.port)).expect("a port");
    // The pool's second process reaches PostgreSQL through the relay, the first directly.
    app.start_with("payment-2", &[("DATABASE_URL", url.as_str())]);
    wait_readyz(&app, "payment-2", 200, Duration::from_secs(60)).await;

    relay.set(false);
    let (content_type, problem) =
        wait_readyz(&app, "payment-2", 503, Duration::from_secs(30)).await;
    assert_eq!(content_type, "application/problem+json", "{problem}");
    assert_eq!(problem["status"], 503, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("PostgreSQL")),
        "the problem names what does not answer: {problem}"
    );
    // Alive all the same, and the other process of the pool is unaffected.
    assert_eq!(get(&app, "payment-2", "/healthz").await.status(), 200);
    assert_eq!(get(&app, "payment", "/readyz").await.status(), 200);

    relay.set(true);
    wait_readyz(&app, "payment-2", 200, Duration::from_secs(30)).await;
}

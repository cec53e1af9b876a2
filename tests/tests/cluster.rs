//! Scale out: three orchestrators sharing the sagas by partition, two processes per worker pool,
//! a three-node NATS cluster whose streams keep three replicas, and (in the second test)
//! PostgreSQL with a synchronous standby. While a thousand checkouts run, what a clustered
//! deployment meets happens on a seeded schedule: an orchestrator dies (its partitions move to
//! the live ones) and comes back, the JetStream meta leader and a stream's leader die and come
//! back, a NATS node is cut off from its peers and joins again, the PostgreSQL primary dies and
//! the standby takes over. Whatever happens, every saga ends and nothing is lost or done twice
//! (`App::assert_invariants`), and no checkout that was acknowledged is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use e2e::cluster::{NODES, NatsCluster};
use e2e::drills::{moments, schedule, workload};
use e2e::pgcluster::PgCluster;
use e2e::{App, Options, pool_member};
use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::Value;

/// How long the sagas get to end once the load and the faults are over.
const SETTLE: Duration = Duration::from_secs(120);
const ORCHESTRATORS: usize = 3;
/// How long an orchestrator's partitions stay its own after it died (short, for the test).
const LEASE_MS: u64 = 3000;
const N: usize = 1000;

/// The clustered layout: three orchestrators, two processes per pool, streams with three
/// replicas, short deadlines and leases so that faults resolve in seconds.
fn clustered(nats_urls: String) -> Options {
    Options {
        nats_url: Some(nats_urls),
        orchestrators: ORCHESTRATORS,
        pool_size: 2,
        ..Options::default()
    }
    .quick_steps(3000, 8)
    .quick_recovery()
    .orchestrator("SAGA_NATS__REPLICAS", "3")
    .orchestrator("SAGA_PARTITIONS__LEASE_MS", &LEASE_MS.to_string())
}

/// Wait until `sql` (one bigint) reaches at least `n`, with a deadline: the load flows. A query
/// that fails (the database failing over under the test's pool too) is asked again.
async fn until_at_least(app: &App, sql: &str, n: i64, within: Duration) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let got = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&app.pool)
            .await;
        if let Ok(got) = got
            && got >= n
        {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "`{sql}` stayed at {got:?} < {n} for {within:?}; logs in {}",
            app.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const CREATED: &str = "SELECT count(*) FROM orchestrator.sagas";
const ENDED: &str = "SELECT count(*) FROM orchestrator.sagas WHERE status IN ('completed', 'compensated', 'failed')";

async fn until_created(app: &App, n: i64) {
    until_at_least(app, CREATED, n, Duration::from_secs(120)).await;
}

/// Wait until `more` sagas more than now have ended: the system makes progress as it is.
async fn until_progress(app: &App, more: i64) {
    let now = until_at_least(app, ENDED, 0, Duration::from_secs(60)).await;
    until_at_least(app, ENDED, now + more, Duration::from_secs(90)).await;
}

/// A checkout that `POST /checkout` acknowledged (2xx).
#[derive(Debug, Clone)]
struct Acknowledged {
    saga_id: String,
}

/// Place `n` checkouts with `concurrency` clients spread over the orchestrators' `bases`,
/// each checkout with its own Idempotency-Key. A checkout is retried (same key, so never
/// twice) until it is acknowledged, on the next orchestrator when one does not answer: the
/// keys are in the shared database, so any orchestrator answers a retry as the first would.
/// Every acknowledgement is recorded, retries' too (they must all name the same saga).
async fn place_spread(
    bases: Vec<String>,
    n: usize,
    concurrency: usize,
    within: Duration,
) -> BTreeMap<usize, Vec<Acknowledged>> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let next = Arc::new(AtomicUsize::new(0));
    let run = uuid::Uuid::now_v7().simple().to_string();
    let deadline = Instant::now() + within;
    let bases = Arc::new(bases);
    let clients = (0..concurrency).map(|c| {
        let (http, next, run, bases) = (http.clone(), next.clone(), run.clone(), bases.clone());
        tokio::spawn(async move {
            let mut acks: BTreeMap<usize, Vec<Acknowledged>> = BTreeMap::new();
            let mut at = c % bases.len();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return acks;
                }
                loop {
                    let r = http
                        .post(format!("{}/checkout", bases[at]))
                        .header("Idempotency-Key", format!("{run}-{i}"))
                        .json(&workload(i))
                        .send()
                        .await;
                    match r {
                        // 202, or 200 when a retry finds the saga already ended.
                        // (An answer cut short is no answer: retried.)
                        Ok(r) if r.status().is_success() => {
                            if let Ok(v) = r.json::<Value>().await {
                                let saga_id = v["saga_id"].as_str().unwrap_or_default().to_owned();
                                assert!(
                                    !saga_id.is_empty(),
                                    "checkout {i}: 2xx without a saga id: {v}"
                                );
                                acks.entry(i).or_default().push(Acknowledged { saga_id });
                                break;
                            }
                        }
                        // 5xx or no answer: this orchestrator is down or busy; try the next.
                        _ => at = (at + 1) % bases.len(),
                    }
                    assert!(Instant::now() < deadline, "checkout {i} never accepted");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    });
    let mut all = BTreeMap::new();
    for c in futures::future::join_all(clients).await {
        all.extend(c.expect("client task"));
    }
    all
}

/// Every acknowledged checkout is one saga (retries named the same), exists, and ended.
async fn assert_acknowledged_kept(app: &App, acks: &BTreeMap<usize, Vec<Acknowledged>>) {
    assert_eq!(acks.len(), N, "every checkout was acknowledged");
    let ended: BTreeMap<String, String> = sqlx::query_as::<_, (String, String)>(
        "SELECT id::text, status FROM orchestrator.sagas WHERE saga_type = 'checkout'",
    )
    .fetch_all(&app.pool)
    .await
    .expect("sagas")
    .into_iter()
    .collect();
    for (i, answers) in acks {
        let ids: BTreeSet<&str> = answers.iter().map(|a| a.saga_id.as_str()).collect();
        assert_eq!(
            ids.len(),
            1,
            "checkout {i} acknowledged as different sagas: {ids:?}"
        );
        let id = answers[0].saga_id.as_str();
        let status = ended
            .get(id)
            .unwrap_or_else(|| panic!("checkout {i} was acknowledged as saga {id}, which is lost"));
        assert!(
            matches!(status.as_str(), "completed" | "compensated"),
            "acknowledged saga {id} ended {status}"
        );
    }
}

/// The orchestrators' API bases, in process order.
fn bases(app: &App) -> Vec<String> {
    (1..=ORCHESTRATORS)
        .map(|i| app.base_of(&pool_member("orchestrator", i)))
        .collect()
}

/// The live leases: partition → owner (leases expired or released are left out).
async fn leases(app: &App) -> BTreeMap<i32, String> {
    sqlx::query_as::<_, (i32, String)>(
        "SELECT partition, owner FROM orchestrator.partition_leases
          WHERE owner IS NOT NULL AND expires_at > now()",
    )
    .fetch_all(&app.pool)
    .await
    .expect("leases")
    .into_iter()
    .collect()
}

async fn partition_count(app: &App) -> usize {
    app.count("SELECT count(*) FROM orchestrator.partition_leases")
        .await as usize
}

/// Wait until every partition has a live lease and they are held by `owners` orchestrators;
/// returns the leases.
async fn until_owned_by(app: &App, owners: usize, within: Duration) -> BTreeMap<i32, String> {
    let deadline = Instant::now() + within;
    loop {
        let total = partition_count(app).await;
        let held = leases(app).await;
        let distinct: BTreeSet<&String> = held.values().collect();
        if total > 0 && held.len() == total && distinct.len() == owners {
            return held;
        }
        assert!(
            Instant::now() < deadline,
            "partitions not all held by {owners} orchestrators within {within:?}: {held:?} of \
             {total}; logs in {}",
            app.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_checkouts_survive_a_dead_orchestrator_and_dead_nats_leaders() {
    let mut nats = NatsCluster::start().await;
    let mut app = App::spawn_with(clustered(nats.urls())).await;
    let mut rng = schedule();
    let at = moments(
        &mut rng,
        4,
        (N as i64 / 20, N as i64 * 8 / 10),
        N as i64 / 20,
    );
    let victim = pool_member("orchestrator", rng.random_range(1..=ORCHESTRATORS));
    let stream_role = *["REPLIES", "COMMANDS"].choose(&mut rng).unwrap();
    let subjects = sagas::wire::Subjects::new(&app.name).expect("the app's prefix");
    let started = Instant::now();
    let load = tokio::spawn(place_spread(bases(&app), N, 16, SETTLE * 2));

    // 1. An orchestrator dies: the others take its partitions once its leases ran out.
    until_created(&app, at[0]).await;
    let before = until_owned_by(&app, ORCHESTRATORS, Duration::from_secs(30)).await;
    app.kill(&victim);
    eprintln!("at {} sagas: killed {victim}", at[0]);
    let after = until_owned_by(
        &app,
        ORCHESTRATORS - 1,
        Duration::from_millis(LEASE_MS) + Duration::from_secs(20),
    )
    .await;
    let live: BTreeSet<&String> = after.values().collect();
    let owners: BTreeSet<&String> = before.values().collect();
    assert!(
        live.is_subset(&owners),
        "the live orchestrators kept their instance names: {owners:?} then {live:?}"
    );
    let dead: Vec<&String> = owners.difference(&live).copied().collect();
    assert_eq!(dead.len(), 1, "one owner is gone: {dead:?}");
    let moved: Vec<i32> = before
        .iter()
        .filter(|(_, o)| *o == dead[0])
        .map(|(p, _)| *p)
        .collect();
    assert!(!moved.is_empty(), "{victim} held partitions before it died");
    for p in &moved {
        assert!(
            live.contains(&after[p]),
            "partition {p} moved to a live orchestrator"
        );
    }
    eprintln!("partitions {moved:?} of {victim} moved to {live:?}");
    until_progress(&app, 20).await;

    // 2. The JetStream meta leader dies; another is elected; it comes back.
    until_created(&app, at[1]).await;
    let leader = nats.wait_meta_leader(Duration::from_secs(30)).await;
    nats.kill(leader);
    let next = nats
        .wait_new_meta_leader(leader, Duration::from_secs(30))
        .await;
    eprintln!(
        "at {} sagas: killed the meta leader {}; {} leads now",
        at[1],
        nats.name(leader),
        nats.name(next)
    );
    until_progress(&app, 20).await;
    nats.restart(leader).await;
    nats.wait_healthy(Duration::from_secs(60)).await;

    // 3. The leader of the replies' or the commands' stream dies; it comes back.
    until_created(&app, at[2]).await;
    let stream = subjects.stream(stream_role);
    let leader = nats
        .wait_stream_leader(&stream, Duration::from_secs(30))
        .await;
    nats.kill(leader);
    let deadline = Instant::now() + Duration::from_secs(30);
    let next = loop {
        match nats.stream_leader(&stream).await {
            Some(i) if i != leader => break i,
            _ => assert!(Instant::now() < deadline, "{stream} has no new leader"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "at {} sagas: killed {stream}'s leader {}; {} leads it now",
        at[2],
        nats.name(leader),
        nats.name(next)
    );
    until_progress(&app, 20).await;
    nats.restart(leader).await;
    nats.wait_healthy(Duration::from_secs(60)).await;

    // 4. The dead orchestrator comes back (on its port: the clients find it again).
    until_created(&app, at[3]).await;
    app.start_orchestrator(&victim).await;
    eprintln!("at {} sagas: {victim} is back", at[3]);
    until_owned_by(
        &app,
        ORCHESTRATORS,
        Duration::from_millis(LEASE_MS * 2) + Duration::from_secs(20),
    )
    .await;

    let acks = load.await.expect("load");
    eprintln!("{N} checkouts placed in {:?}", started.elapsed());
    for i in 1..=ORCHESTRATORS {
        let name = pool_member("orchestrator", i);
        assert!(app.is_running(&name), "{name} is running");
    }
    app.assert_invariants(N, SETTLE).await;
    assert_acknowledged_kept(&app, &acks).await;
    eprintln!("all ended {:?} after the start", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_checkouts_survive_a_nats_partition_and_a_database_failover() {
    // Declared before the app: dropped after its processes.
    let mut pg = PgCluster::start().await;
    let mut nats = NatsCluster::start_in_netns().await;
    let app = App::spawn_with(Options {
        database: Some(pg.url_multi("postgres")),
        ..clustered(nats.urls())
    })
    .await;
    let mut rng = schedule();
    let at = moments(
        &mut rng,
        3,
        (N as i64 / 20, N as i64 * 8 / 10),
        N as i64 / 20,
    );
    let cut = rng.random_range(0..NODES);
    let started = Instant::now();
    let load = tokio::spawn(place_spread(bases(&app), N, 16, SETTLE * 2));

    // 1. A NATS node is cut off from its peers (its clients still reach it, and stay on it):
    //    it loses the cluster, whose majority has a meta leader without it.
    until_created(&app, at[0]).await;
    nats.partition(cut);
    let ended_before = until_at_least(&app, ENDED, 0, Duration::from_secs(60)).await;
    eprintln!(
        "at {} sagas: cut {} off the other NATS nodes; its clients: {:?}",
        at[0],
        nats.name(cut),
        nats.clients(cut).await
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alone = nats
            .monitor(cut, "/healthz")
            .await
            .is_some_and(|h| h["status"] != "ok");
        let leader = nats.meta_leader().await;
        if alone && leader.is_some_and(|l| l != cut) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not lose the cluster, or the others have no leader ({leader:?}); logs in {}",
            nats.name(cut),
            nats.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 2. It joins again and catches up; the sagas go on.
    until_created(&app, at[1]).await;
    let ended_cut = until_at_least(&app, ENDED, 0, Duration::from_secs(60)).await - ended_before;
    nats.heal(cut);
    nats.wait_healthy(Duration::from_secs(60)).await;
    eprintln!(
        "at {} sagas: {} joined again ({ended_cut} sagas ended while it was cut off)",
        at[1],
        nats.name(cut)
    );
    until_progress(&app, 20).await;

    // 3. The PostgreSQL primary dies and its synchronous standby takes over: every process
    //    (and the test's pool) moves to it through its host list.
    until_created(&app, at[2]).await;
    pg.kill_primary();
    pg.promote_standby().await;
    eprintln!(
        "at {} sagas: the PostgreSQL primary died, the standby took over",
        at[2]
    );
    until_progress(&app, 20).await;

    let acks = load.await.expect("load");
    eprintln!("{N} checkouts placed in {:?}", started.elapsed());
    app.assert_invariants(N, SETTLE).await;
    assert_acknowledged_kept(&app, &acks).await;
    eprintln!("all ended {:?} after the start", started.elapsed());
}

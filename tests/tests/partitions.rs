//! Partition ownership (orchestrator/src/partitions.rs): the hash is the same in Rust and SQL,
//! orchestrators divide the partitions and hand them over on shutdown, a crashed or paused
//! one's partitions move after its lease, and its late commits are fenced off.

use std::time::{Duration, Instant};

use e2e::{App, Options, order, place_many};
use sagas::wire::{SagaId, partition_of};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(120);

/// Partitions held per owner, from the lease table (live leases only).
async fn owners(app: &App) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT owner, count(*) FROM orchestrator.partition_leases
          WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner ORDER BY owner",
    )
    .fetch_all(&app.pool)
    .await
    .expect("leases")
}

/// Wait until `n` orchestrators hold all 16 partitions between them, each some.
async fn until_divided(app: &App, n: usize, within: Duration) -> Vec<(String, i64)> {
    let deadline = Instant::now() + within;
    loop {
        let o = owners(app).await;
        if o.len() == n && o.iter().map(|(_, c)| c).sum::<i64>() == 16 {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "partitions not divided among {n} orchestrators within {within:?}: {o:?}; logs in {}",
            app.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn two_orchestrators(lease_ms: &str) -> Options {
    Options::default().orchestrator("SAGA_PARTITIONS__LEASE_MS", lease_ms)
}

#[tokio::test]
async fn the_sql_hash_is_the_rust_hash() {
    let app = App::spawn_with(Options::without_workers()).await;
    let ids: Vec<uuid::Uuid> = (0..2000)
        .map(|i| {
            if i % 2 == 0 {
                uuid::Uuid::now_v7()
            } else {
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &(i as u32).to_be_bytes())
            }
        })
        .collect();
    for count in [1, 7, 16, 1024] {
        let sql: Vec<i32> = sqlx::query_scalar(
            "SELECT orchestrator.saga_partition(id, $2) FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, n) ORDER BY n",
        )
        .bind(&ids)
        .bind(count)
        .fetch_all(&app.pool)
        .await
        .expect("saga_partition");
        let rust: Vec<i32> = ids
            .iter()
            .map(|id| partition_of(SagaId::from_uuid(*id), count as u32) as i32)
            .collect();
        assert_eq!(sql, rust, "count {count}");
    }
    // A start picks its id in a partition its orchestrator holds (here: all of them), and its
    // commands carry that partition.
    let id = app.place(&order(&[("A", 1)], "tok_visa")).await;
    let id: SagaId = id.parse().unwrap();
    let held: i64 = app
        .count(&format!(
            "SELECT count(*) FROM orchestrator.partition_leases
              WHERE partition = {} AND owner IS NOT NULL",
            partition_of(id, 16)
        ))
        .await;
    assert_eq!(held, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrators_divide_the_partitions_and_hand_them_over_on_shutdown() {
    // A long lease: only a hand-over (not an expiry) can move partitions within the test.
    let mut app = App::spawn_with(two_orchestrators("60000")).await;
    let alone = until_divided(&app, 1, Duration::from_secs(30)).await;
    assert_eq!(alone[0].1, 16);
    app.start("orchestrator-b");
    app.wait_ready_at(&app.base_b, Duration::from_secs(30))
        .await;
    let both = until_divided(&app, 2, Duration::from_secs(30)).await;
    assert_eq!(both.iter().map(|(_, c)| *c).collect::<Vec<_>>(), [8, 8]);
    assert_eq!(app.metric(&app.base, "saga_partitions_owned").await, 8.0);
    assert_eq!(app.metric(&app.base_b, "saga_partitions_owned").await, 8.0);
    // Both take checkouts; each saga's replies come back to the orchestrator that holds its
    // partition, so their cached copies stay right: no version conflicts.
    let n = 200;
    let a = tokio::spawn(place_many(app.base.clone(), n / 2, 8, load, SETTLE));
    let b = tokio::spawn(place_many(app.base_b.clone(), n / 2, 8, load, SETTLE));
    assert_eq!(a.await.unwrap().len(), n / 2);
    assert_eq!(b.await.unwrap().len(), n / 2);
    app.assert_invariants(n, SETTLE).await;
    let mut applied = 0.0;
    let mut conflicts = 0.0;
    for base in [&app.base, &app.base_b] {
        let replies = app.metric(base, "saga_inputs_total").await;
        assert!(replies > 0.0, "{base} applied nothing");
        applied += replies;
        conflicts += app
            .metric(base, "saga_engine_version_conflicts_total")
            .await;
    }
    assert_eq!(
        conflicts, 0.0,
        "no saga is written by two orchestrators ({applied} inputs applied)"
    );
    // SIGTERM: orchestrator-b hands its partitions over; the other takes them at its next
    // tick, long before the 60 s lease would have run out.
    let stopped = Instant::now();
    assert_eq!(
        app.terminate("orchestrator-b", Duration::from_secs(30))
            .await,
        Some(0)
    );
    let alone = until_divided(&app, 1, Duration::from_secs(30)).await;
    assert_eq!(alone[0].1, 16);
    assert!(
        stopped.elapsed() < Duration::from_secs(45),
        "handed over, not expired"
    );
    // And the sagas of b's partitions go on: one more batch ends.
    let more = place_many(app.base.clone(), 20, 4, load, SETTLE).await;
    assert_eq!(more.len(), 20);
    app.assert_invariants(n + 20, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_off_and_its_partitions_move() {
    let mut app = App::spawn_with(two_orchestrators("2000")).await;
    app.start("orchestrator-b");
    app.wait_ready_at(&app.base_b, Duration::from_secs(30))
        .await;
    until_divided(&app, 2, Duration::from_secs(30)).await;
    let epochs_before: i64 = app
        .count("SELECT sum(epoch)::int8 FROM orchestrator.partition_leases")
        .await;
    let n = 200;
    let load_a = tokio::spawn(place_many(app.base.clone(), n, 8, load, SETTLE));
    // Stall orchestrator-b (as a long GC pause or a frozen VM would) while its sagas run: its
    // leases expire and the other takes its partitions, raising their epochs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.pause("orchestrator-b");
    let alone = until_divided(&app, 1, Duration::from_secs(30)).await;
    assert_eq!(alone[0].1, 16);
    let epochs_after: i64 = app
        .count("SELECT sum(epoch)::int8 FROM orchestrator.partition_leases")
        .await;
    assert!(
        epochs_after >= epochs_before + 8,
        "a take-over raises each epoch"
    );
    // Woken up, b finds its leases gone (its renewal, or a commit fenced off) and works on as
    // a non-owner until the partitions are divided again.
    app.resume("orchestrator-b");
    let deadline = Instant::now() + Duration::from_secs(30);
    while app
        .metric(&app.base_b, "saga_partition_changes_total{change=\"lost\"}")
        .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "orchestrator-b never noticed it lost its leases; logs in {}",
            app.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_divided(&app, 2, Duration::from_secs(30)).await;
    assert_eq!(load_a.await.unwrap().len(), n);
    app.assert_invariants(n, SETTLE).await;
}

fn load(i: usize) -> Value {
    let token = if i % 10 == 9 {
        "tok_decline"
    } else {
        "tok_visa"
    };
    order(&[("A", 1), ("B", 1)], token)
}

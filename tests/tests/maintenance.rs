//! Every process looks after the tables it writes: once checkouts have changed enough rows,
//! the orchestrator and each worker analyze (and vacuum) their own tables by autovacuum's
//! rules, whatever autovacuum does. Only an explicit ANALYZE counts in `analyze_count`
//! (autovacuum's own runs count in `autoanalyze_count`), so this sees our maintenance only.

use std::time::Duration;

use e2e::{App, order, place_many};

#[tokio::test]
async fn each_process_analyzes_the_tables_it_writes_as_they_grow() {
    let app = App::spawn().await;
    // 60 sagas: each table below gets more than the 50 changes autovacuum's rules start at.
    let placed = place_many(
        app.base.clone(),
        60,
        8,
        |i| {
            order(
                &[("A", 1)],
                if i % 10 == 9 {
                    "tok_decline"
                } else {
                    "tok_visa"
                },
            )
        },
        Duration::from_secs(60),
    )
    .await;
    for p in &placed {
        app.wait_terminal(&p.saga_id, Duration::from_secs(60)).await;
    }
    for (schema, table) in [
        ("orchestrator", "sagas"),
        ("orchestrator", "outbox"),
        ("inventory", "reservations"),
        ("payments", "charges"),
        ("shipping", "shipments"),
        ("notifications", "sent"),
    ] {
        app.wait_for(
            &format!(
                "SELECT count(*) FROM pg_stat_user_tables
                  WHERE schemaname = '{schema}' AND relname = '{table}' AND analyze_count > 0"
            ),
            1,
            Duration::from_secs(30),
        )
        .await;
    }
    // The outbox churns (a row in and out per message): it is vacuumed, not only analyzed.
    app.wait_for(
        "SELECT count(*) FROM pg_stat_user_tables
          WHERE schemaname = 'orchestrator' AND relname = 'outbox' AND vacuum_count > 0",
        1,
        Duration::from_secs(30),
    )
    .await;
    // Nothing is left that the rules would ask for once the load has stopped.
    app.wait_for(
        "SELECT count(*) FROM public.maintenance_due(ARRAY['orchestrator', 'inventory', 'payments',
                                                          'shipping', 'notifications'])
          WHERE needs_analyze",
        0,
        Duration::from_secs(30),
    )
    .await;
}

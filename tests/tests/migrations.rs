//! Migrations that rewrite data, run against rows in the shape the migrations before them left.
//! Each test applies the migrations up to the one under test by hand (their SQL, in order), puts
//! in rows as the code of that time wrote them, then applies the migration and checks the rows.

use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// A database of its own with the migrations numbered below `upto` applied; dropped by
/// [`Scratch::drop_db`].
struct Scratch {
    name: String,
    pool: PgPool,
}

fn migration(number: u32) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let prefix = format!("{number:04}_");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .unwrap_or_else(|| panic!("migration {number} exists"));
    std::fs::read_to_string(file).unwrap()
}

impl Scratch {
    async fn upto(upto: u32) -> Scratch {
        let name = format!("m{}", &uuid::Uuid::now_v7().simple().to_string()[12..]);
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&e2e::admin_url())
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let url = {
            let admin = e2e::admin_url();
            let (base, _) = admin.rsplit_once('/').unwrap();
            format!("{base}/{name}")
        };
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        for n in 1..upto {
            Self::apply(&pool, n).await;
        }
        Scratch { name, pool }
    }

    async fn apply(pool: &PgPool, n: u32) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(migration(n)))
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("migration {n}: {e}"));
    }

    async fn drop_db(self) {
        self.pool.close().await;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&e2e::admin_url())
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&admin)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn migration_0012_moves_running_sagas_tokens_to_the_secrets_and_scrubs_every_copy() {
    let db = Scratch::upto(12).await;
    // Two checkouts as the code before 0012 stored them: one running (its charge still to
    // come), one completed; each with its token in the snapshot, the start input and the
    // charge command of its event log.
    let snapshot = |token: &str| {
        json!({"format": 1, "state": {"name": "running", "step": 1, "attempt": 1},
               "id": "0192a000-0000-7000-8000-000000000001",
               "data": {"order_id": "0192a000-0000-7000-8000-0000000000f1",
                        "payment_token": token, "total": {"minor": 100, "currency": "EUR"}}})
    };
    let rows = [
        (
            "0192a000-0000-7000-8000-000000000001",
            "running",
            "tok_visa_long_enough_4242",
        ),
        (
            "0192a000-0000-7000-8000-000000000002",
            "completed",
            "tok_visa",
        ),
    ];
    for (id, status, token) in rows {
        sqlx::query(
            "INSERT INTO orchestrator.sagas (id, saga_type, state, status, snapshot, version,
                                             correlation_id, created_at, updated_at)
             VALUES ($1::uuid, 'checkout', 'running', $2, $3::json, 2, 'c', now(), now())",
        )
        .bind(id)
        .bind(status)
        .bind(snapshot(token).to_string())
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO orchestrator.saga_events (saga_id, seq, kind, input, effects, state_after, at)
             VALUES ($1::uuid, 1, 'started', $2::json, '[]', 'running', now()),
                    ($1::uuid, 2, 'step_succeeded', '{\"input\": \"reply\"}', $3::json, 'running', now())",
        )
        .bind(id)
        .bind(json!({"order_id": "x", "payment_token": token, "lines": []}).to_string())
        .bind(
            json!([{"effect": "dispatch", "action": "charge_payment", "payment_token": token,
                    "amount": {"minor": 100, "currency": "EUR"}},
                   {"effect": "set_timer", "at": "2030-01-01T00:00:00Z"}])
            .to_string(),
        )
        .execute(&db.pool)
        .await
        .unwrap();
    }
    Scratch::apply(&db.pool, 12).await;

    // The running saga's token is its secret now; the ended one's is gone.
    let secrets: Vec<(String, String)> = sqlx::query_as(
        "SELECT saga_id::text, value FROM orchestrator.saga_secrets WHERE name = 'payment_token'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        secrets,
        [(
            "0192a000-0000-7000-8000-000000000001".to_owned(),
            "tok_visa_long_enough_4242".to_owned()
        )]
    );
    // No copy is left; each is replaced by the hint the code computes.
    for (id, _, token) in rows {
        let (snapshot, input, effects): (Value, Value, Value) = sqlx::query_as(
            "SELECT s.snapshot::jsonb, e1.input::jsonb, e2.effects::jsonb
               FROM orchestrator.sagas s
               JOIN orchestrator.saga_events e1 ON e1.saga_id = s.id AND e1.seq = 1
               JOIN orchestrator.saga_events e2 ON e2.saga_id = s.id AND e2.seq = 2
              WHERE s.id = $1::uuid",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let hint = sagas::checkout::token_hint(token);
        assert_eq!(snapshot["data"]["payment_token_hint"], hint.as_str());
        assert_eq!(input["payment_token_hint"], hint.as_str());
        for doc in [&snapshot, &input, &effects] {
            assert!(!doc.to_string().contains(token), "{doc}");
        }
        // The rest is kept as it was, in order.
        assert_eq!(snapshot["data"]["total"]["minor"], 100);
        assert_eq!(effects[0]["action"], "charge_payment");
        assert_eq!(effects[1]["effect"], "set_timer");
    }
    db.drop_db().await;
}

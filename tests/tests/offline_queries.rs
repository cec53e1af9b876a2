//! The query macros check their SQL at build time against `.sqlx/`, a record of what PostgreSQL
//! said about each query when `cargo sqlx prepare` last ran. A migration added since then could
//! change a column's type or nullability without any build noticing. This test asks a database
//! migrated by today's migrations to describe every recorded query again, and fails when the
//! answer differs from the record: refresh `.sqlx/` as `.cargo/config.toml` says.

use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, SqlSafeStr};

/// The description with the nullability of overridden columns (`name!`, `name?`) left out: the
/// macro takes the override, and PostgreSQL's answer for such columns (inferred from a query plan,
/// which depends on the tables' statistics) may differ from one database to the next.
fn comparable(describe: &Value) -> Value {
    let mut describe = describe.clone();
    let overridden: Vec<bool> = describe["columns"]
        .as_array()
        .map(|columns| {
            columns
                .iter()
                .map(|c| c["name"].as_str().is_some_and(|n| n.ends_with(['!', '?'])))
                .collect()
        })
        .unwrap_or_default();
    if let Some(nullable) = describe["nullable"].as_array_mut() {
        for (n, skip) in nullable.iter_mut().zip(overridden) {
            if skip {
                *n = Value::Null;
            }
        }
    }
    describe
}

#[tokio::test]
async fn the_recorded_query_data_matches_the_migrated_schema() {
    let name = format!("q{}", &uuid::Uuid::now_v7().simple().to_string()[12..]);
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&e2e::admin_url())
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
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
    runtime::db::MIGRATOR.run(&pool).await.unwrap();

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.sqlx");
    let mut checked = 0;
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let recorded: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let sql = recorded["query"]
            .as_str()
            .expect("each record has its query");
        let now = match pool.describe(sqlx::AssertSqlSafe(sql).into_sql_str()).await {
            Ok(described) => serde_json::to_value(&described).unwrap(),
            Err(e) => {
                stale.push(format!("{}: no longer prepares: {e}", path.display()));
                continue;
            }
        };
        if comparable(&now) != comparable(&recorded["describe"]) {
            stale.push(format!(
                "{}:\n  recorded {}\n  now      {now}",
                path.display(),
                recorded["describe"]
            ));
        }
        checked += 1;
    }
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();

    // The production code has dozens of checked queries; none found means the path is wrong.
    assert!(
        checked >= 40,
        "only {checked} recorded queries found in {}",
        dir.display()
    );
    assert!(
        stale.is_empty(),
        "{} recorded queries no longer match the migrated schema; refresh .sqlx/:\n{}",
        stale.len(),
        stale.join("\n")
    );
}

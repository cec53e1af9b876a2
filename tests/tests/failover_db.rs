//! PostgreSQL for a clustered deployment: `runtime::db` through libpq's multi-host URL follows
//! the primary across a failover of the test's own primary and synchronous standby
//! (`e2e::pgcluster`), and never goes through the standby; TLS (`sslmode`) to the shared
//! server.

use std::time::{Duration, Instant};

use e2e::pgcluster::PgCluster;
use runtime::config::Database;
use sqlx::PgPool;

fn settings(url: String) -> Database {
    Database {
        url,
        max_connections: 4,
        create: false,
    }
}

async fn port_of(pool: &PgPool) -> Result<u16, sqlx::Error> {
    let port: i32 = sqlx::query_scalar("SELECT inet_server_port()")
        .fetch_one(pool)
        .await?;
    Ok(port as u16)
}

async fn insert(pool: &PgPool, n: i32) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO failover_rows (n) VALUES ($1)")
        .bind(n)
        .execute(pool)
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_follows_the_primary_and_loses_nothing_acknowledged() {
    let mut cluster = PgCluster::start().await;
    cluster.create_database("failover").await;
    let pool = runtime::db::connect(&settings(cluster.url_multi("failover")), "failover-test")
        .await
        .expect("connects through the multi-host URL");
    assert_eq!(port_of(&pool).await.unwrap(), cluster.primary_port());

    // Listed first, the standby is passed over for the primary.
    let reversed = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/failover?target_session_attrs=read-write",
        cluster.standby_port(),
        cluster.primary_port()
    );
    let other = runtime::db::connect(&settings(reversed), "failover-test-reversed")
        .await
        .expect("connects to the primary listed second");
    assert_eq!(port_of(&other).await.unwrap(), cluster.primary_port());
    other.close().await;

    sqlx::query("CREATE TABLE failover_rows (n int PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    let acknowledged = 200;
    for n in 0..acknowledged {
        insert(&pool, n).await.expect("written to the primary");
    }

    cluster.kill_primary();
    // No primary now: nothing is handed out, the standby's connections are refused. (Reads
    // would go through on a standby; this one must not.)
    let refused = port_of(&pool).await;
    assert!(
        refused.is_err(),
        "a connection was handed out with no primary: {refused:?}"
    );

    cluster.promote_standby().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = insert(&pool, acknowledged).await {
        assert!(
            Instant::now() < deadline,
            "the pool did not move to the promoted standby: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(port_of(&pool).await.unwrap(), cluster.standby_port());
    let rows: Vec<i32> = sqlx::query_scalar("SELECT n FROM failover_rows ORDER BY n")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows,
        (0..=acknowledged).collect::<Vec<_>>(),
        "every acknowledged row is on the new primary"
    );
    // The migrations came along too.
    let migrated: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(migrated > 0);
    pool.close().await;
}

#[tokio::test]
async fn tls_to_postgresql_is_the_url_s() {
    let admin = e2e::admin_url();
    let (base, _) = admin.rsplit_once('/').expect("a database URL has a path");
    let db = format!("saga_tls_{}", uuid::Uuid::now_v7().simple());
    let url = format!("{base}/{db}?sslmode=require");
    let pool = runtime::db::connect(
        &Database {
            url,
            max_connections: 2,
            create: true,
        },
        "tls-test",
    )
    .await
    .expect("PostgreSQL over TLS (the shared server has ssl = on)");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "sslmode=require connected without TLS");
    pool.close().await;
    let admin = PgPool::connect(&admin).await.expect("admin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
}

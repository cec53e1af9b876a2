//! `orchestrator admin ...`, the operators' command line, run as an operator would: the real
//! binary as a process of its own, against a database of the test's (accounts) or the
//! harness's orchestrator (the admin API). What it prints is checked as text (and as JSON with
//! `--json`), and what it did in the database.

use std::process::Stdio;

use e2e::{App, OPERATOR_TOKEN, Options, VIEWER_TOKEN, order};
use orchestrator::http::auth::{Role, parse_tokens, sha256, verify_password};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use tokio::io::AsyncWriteExt;

/// What a run of the command line came to.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `orchestrator admin <args>` with `env`, nothing else of the operator's kind inherited from
/// the test's environment, and standard input closed (not a terminal).
async fn admin(args: &[&str], env: &[(&str, &str)]) -> Run {
    admin_with_input(args, env, None).await
}

async fn admin_with_input(args: &[&str], env: &[(&str, &str)], input: Option<&str>) -> Run {
    let mut cmd = tokio::process::Command::new(e2e::binary("orchestrator"));
    cmd.arg("admin").args(args).kill_on_drop(true);
    for var in [
        "SAGA_ADMIN_TOKEN",
        "SAGA_ADMIN_URL",
        "SAGA_ADMIN_PASSWORD",
        "SAGA_CONFIG",
        "SAGA_HTTP__PORT",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("the orchestrator binary runs");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(input.as_bytes()).await.unwrap();
        drop(stdin);
    }
    let output = child.wait_with_output().await.unwrap();
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn a_token_is_printed_once_with_the_entry_that_accepts_it() {
    let run = admin(&["token", "ci-bot", "operator"], &[]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let lines: Vec<&str> = run.stdout.lines().map(str::trim).collect();
    let entry = lines
        .iter()
        .find(|l| l.starts_with("ci-bot:operator:"))
        .unwrap_or_else(|| panic!("no admin.tokens entry: {run}"));
    let parsed = parse_tokens(entry).expect("the orchestrator accepts the entry");
    assert_eq!(parsed.len(), 1);
    assert_eq!(
        (parsed[0].name.as_str(), parsed[0].role),
        ("ci-bot", Role::Operator)
    );
    assert!(is_hex64(entry.rsplit(':').next().unwrap()), "{entry}");
    let token = lines
        .iter()
        .find(|l| is_hex64(l))
        .unwrap_or_else(|| panic!("no token printed: {run}"));
    assert_eq!(
        parsed[0].sha256,
        sha256(token.as_bytes()),
        "the hash is the token's"
    );
    assert!(
        run.stdout.contains("not stored"),
        "it says the token is kept nowhere: {run}"
    );

    // Each run makes a new one; --json gives the same parts.
    let json = admin(&["token", "ro", "viewer", "--json"], &[]).await;
    assert_eq!(json.code, Some(0), "{json}");
    let v: Value = serde_json::from_str(&json.stdout).expect("JSON alone on stdout");
    let t = v["token"].as_str().unwrap();
    assert_ne!(t, *token);
    let parsed = parse_tokens(v["tokens_entry"].as_str().unwrap()).unwrap();
    assert_eq!(
        (parsed[0].role, parsed[0].sha256),
        (Role::Viewer, sha256(t.as_bytes()))
    );

    // Usage errors are the parser's: status 2.
    for bad in [
        &["token", "ci-bot", "admin"][..],
        &["token", "two words", "viewer"],
        &["token", "ci-bot"],
    ] {
        let run = admin(bad, &[]).await;
        assert_eq!(run.code, Some(2), "{bad:?}: {run}");
    }
}

#[tokio::test]
async fn operator_accounts_are_added_listed_refused_twice_updated_and_disabled() {
    // A database of the test's own, which the command creates and migrates, as the
    // orchestrator does, from DATABASE_URL.
    let name = format!("u{}", &uuid::Uuid::now_v7().simple().to_string()[12..]);
    let url = {
        let admin = e2e::admin_url();
        let (base, _) = admin.rsplit_once('/').unwrap();
        format!("{base}/{name}")
    };
    let db = [("DATABASE_URL", url.as_str())];
    let with_password = |p: &'static str| {
        [
            ("DATABASE_URL", url.clone()),
            ("SAGA_ADMIN_PASSWORD", p.to_owned()),
        ]
    };
    let run_with = |args: &'static [&'static str], env: [(&'static str, String); 2]| async move {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        admin(args, &env).await
    };

    let short = run_with(
        &["users", "add", "ada", "--role", "operator"],
        with_password("too short"),
    )
    .await;
    assert_eq!(short.code, Some(1), "{short}");
    assert!(short.stderr.contains("at least 12 characters"), "{short}");

    let password = "correct horse battery";
    let added = run_with(
        &["users", "add", "ada", "--role", "operator"],
        with_password(password),
    )
    .await;
    assert_eq!(added.code, Some(0), "{added}");
    assert!(added.stdout.contains("added ada"), "{added}");
    assert!(
        !format!("{added}").contains(password),
        "the password is never shown"
    );

    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let account = |who: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, String, bool)>(
                "SELECT role, password_hash, disabled FROM orchestrator.operators WHERE name = $1",
            )
            .bind(who)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (role, hash, disabled) = account("ada").await;
    assert_eq!((role.as_str(), disabled), ("operator", false));
    assert!(hash.starts_with("$argon2id$") && verify_password(&hash, password));

    // The same name again is refused, and changes nothing.
    let again = run_with(
        &["users", "add", "ada", "--role", "viewer"],
        with_password("another password"),
    )
    .await;
    assert_eq!(again.code, Some(1), "{again}");
    assert!(again.stderr.contains("--update"), "{again}");
    assert_eq!(account("ada").await.1, hash);

    // The password as a line of standard input, when the variable is not set.
    let piped = admin_with_input(
        &["users", "add", "bob", "--role", "viewer"],
        &db,
        Some("a password from stdin\n"),
    )
    .await;
    assert_eq!(piped.code, Some(0), "{piped}");
    let (role, hash, _) = account("bob").await;
    assert_eq!(role, "viewer");
    assert!(
        verify_password(&hash, "a password from stdin"),
        "without its newline"
    );

    let list = admin(&["users", "list"], &db).await;
    assert_eq!(list.code, Some(0), "{list}");
    let rows: Vec<Vec<&str>> = list
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["NAME", "ROLE", "STATE"], "{list}");
    assert_eq!(rows[1][..3], ["ada", "operator", "active"], "{list}");
    assert_eq!(rows[2][..3], ["bob", "viewer", "active"], "{list}");

    // Disabling ends the account's sessions.
    sqlx::query(
        "INSERT INTO orchestrator.admin_sessions (token_hash, operator, csrf, expires_at)
         VALUES ('\\x01', 'ada', 'c', now() + interval '1 hour')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let off = admin(&["users", "disable", "ada"], &db).await;
    assert_eq!(off.code, Some(0), "{off}");
    assert!(off.stdout.contains("1 session(s) ended"), "{off}");
    assert!(account("ada").await.2);
    let listed = admin(&["users", "list", "--json"], &db).await;
    let listed: Value = serde_json::from_str(&listed.stdout).expect("JSON");
    assert_eq!(listed[0]["name"], "ada");
    assert_eq!(listed[0]["disabled"], true, "{listed:#}");
    let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM orchestrator.admin_sessions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sessions, 0);

    // --update replaces the password and the role; enable lets the account in again.
    let updated = run_with(
        &["users", "add", "ada", "--role", "viewer", "--update"],
        with_password("a brand new password"),
    )
    .await;
    assert_eq!(updated.code, Some(0), "{updated}");
    let (role, hash, _) = account("ada").await;
    assert_eq!(role, "viewer");
    assert!(verify_password(&hash, "a brand new password") && !verify_password(&hash, password));
    let on = admin(&["users", "enable", "ada"], &db).await;
    assert_eq!(on.code, Some(0), "{on}");
    assert!(!account("ada").await.2);

    let nobody = admin(&["users", "disable", "nobody"], &db).await;
    assert_eq!(nobody.code, Some(1), "{nobody}");
    assert!(nobody.stderr.contains("no operator nobody"), "{nobody}");
    let bad = run_with(
        &["users", "add", "two words", "--role", "viewer"],
        with_password(password),
    )
    .await;
    assert_eq!(bad.code, Some(2), "{bad}");
    let no_role = run_with(&["users", "add", "carol"], with_password(password)).await;
    assert_eq!(no_role.code, Some(2), "{no_role}");

    pool.close().await;
    let admin_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&e2e::admin_url())
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&admin_pool)
    .await
    .unwrap();
}

/// The port of the app's orchestrator, for a configuration that names it.
fn port_of(app: &App) -> String {
    app.base.rsplit(':').next().unwrap().to_owned()
}

#[tokio::test]
async fn sagas_and_dead_letters_are_read_through_the_admin_api() {
    let app = App::spawn_with(Options::without_workers()).await;
    let id = app.place(&order(&[("A", 1)], "tok_visa")).await;
    let port = port_of(&app);
    // No --url: the configuration's http.port, as on the orchestrator's own host. A viewer
    // reads.
    let viewer = [
        ("SAGA_HTTP__PORT", port.as_str()),
        ("SAGA_ADMIN_TOKEN", VIEWER_TOKEN),
    ];

    let list = admin(&["sagas", "list", "--status", "running"], &viewer).await;
    assert_eq!(list.code, Some(0), "{list}");
    let header: Vec<&str> = list
        .stdout
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["ID", "TYPE", "STATUS", "STATE", "ORDER", "CREATED"],
        "{list}"
    );
    let row = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} is not listed: {list}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..3], ["checkout", "running"], "{row}");
    let none = admin(&["sagas", "list", "--status", "completed"], &viewer).await;
    assert_eq!(
        (none.code, none.stdout.trim()),
        (Some(0), "no sagas match"),
        "{none}"
    );

    // A page of one says how to get the next.
    let second = app.place(&order(&[("B", 1)], "tok_visa")).await;
    let page = admin(&["sagas", "list", "--limit", "1"], &viewer).await;
    assert!(page.stdout.contains(&second), "{page}");
    assert!(
        page.stdout.contains(&format!("--after {second}")),
        "the cursor hint: {page}"
    );
    let json = admin(
        &[
            "sagas", "list", "--limit", "1", "--after", &second, "--json",
        ],
        &viewer,
    )
    .await;
    let v: Value = serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(v["sagas"][0]["id"], id.as_str(), "{v:#}");

    let show = admin(&["sagas", "show", &id], &viewer).await;
    assert_eq!(show.code, Some(0), "{show}");
    for expected in [
        id.as_str(),
        "Steps",
        "reserve_stock",
        "charge_payment",
        "create_shipment",
        "commit_stock",
        "Actions",
        "retry_now",
        "Events",
        "Audit",
    ] {
        assert!(show.stdout.contains(expected), "{expected}: {show}");
    }
    let unknown = admin(
        &["sagas", "show", &uuid::Uuid::now_v7().to_string()],
        &viewer,
    )
    .await;
    assert_eq!(unknown.code, Some(1), "{unknown}");
    assert!(unknown.stderr.starts_with("error: "), "{unknown}");
    let not_an_id = admin(&["sagas", "show", "nope"], &viewer).await;
    assert_eq!(not_an_id.code, Some(2), "{not_an_id}");

    // An empty dead-letter stream.
    let letters = admin(&["dead-letters", "list"], &viewer).await;
    assert_eq!(letters.code, Some(0), "{letters}");
    assert!(letters.stdout.contains("no dead letters"), "{letters}");
    let letters = admin(&["dead-letters", "list", "--json"], &viewer).await;
    let v: Value =
        serde_json::from_str(&letters.stdout).unwrap_or_else(|e| panic!("{e}: {letters}"));
    assert_eq!(v["letters"], serde_json::json!([]), "{v:#}");

    // Without a token: a usage error that says where one goes; a wrong address names it.
    let anonymous = admin(&["sagas", "list"], &[("SAGA_HTTP__PORT", port.as_str())]).await;
    assert_eq!(anonymous.code, Some(2), "{anonymous}");
    assert!(anonymous.stderr.contains("SAGA_ADMIN_TOKEN"), "{anonymous}");
    let nowhere = format!("http://127.0.0.1:{}", e2e::free_port());
    let away = admin(
        &["sagas", "list", "--url", &nowhere],
        &[("SAGA_ADMIN_TOKEN", VIEWER_TOKEN)],
    )
    .await;
    assert_eq!(away.code, Some(1), "{away}");
    assert!(
        away.stderr
            .contains(&format!("cannot reach the orchestrator at {nowhere}")),
        "{away}"
    );
    let wrong = admin(
        &[
            "sagas",
            "list",
            "--url",
            &app.base,
            "--token",
            "not-a-token",
        ],
        &[],
    )
    .await;
    assert_eq!(wrong.code, Some(1), "{wrong}");
    assert!(wrong.stderr.contains("the token is not valid"), "{wrong}");
    for run in [&list, &show, &letters, &wrong] {
        assert!(
            !format!("{run}").contains(VIEWER_TOKEN),
            "a token is never printed"
        );
    }
}

#[tokio::test]
async fn an_operator_cancels_a_viewer_cannot_and_a_refusal_says_why() {
    let app = App::spawn_with(Options::without_workers()).await;
    let id = app.place(&order(&[("A", 1)], "tok_visa")).await;
    let other = app.place(&order(&[("B", 1)], "tok_visa")).await;
    let operator = [
        ("SAGA_ADMIN_URL", app.base.as_str()),
        ("SAGA_ADMIN_TOKEN", OPERATOR_TOKEN),
    ];
    let viewer = [
        ("SAGA_ADMIN_URL", app.base.as_str()),
        ("SAGA_ADMIN_TOKEN", VIEWER_TOKEN),
    ];

    let refused = admin(&["sagas", "cancel", &id, "--reason", "x"], &viewer).await;
    assert_eq!(refused.code, Some(1), "{refused}");
    assert!(refused.stderr.contains("Not allowed"), "{refused}");
    assert_eq!(app.saga(&id).await["status"], "running");

    // A problem's field errors are listed under it.
    let blank = admin(&["sagas", "cancel", &id, "--reason", "  "], &operator).await;
    assert_eq!(blank.code, Some(1), "{blank}");
    assert!(blank.stderr.contains("/reason"), "{blank}");

    let cancel = admin(&["sagas", "cancel", &id, "--reason", "x"], &operator).await;
    assert_eq!(cancel.code, Some(0), "{cancel}");
    assert!(cancel.stdout.contains("compensating"), "{cancel}");
    // No worker runs: it waits for its reservation to be released.
    assert_eq!(app.saga(&id).await["status"], "compensating");

    // Nothing to retry now: refused (409) with the machine's reason, which the audit log has.
    let retry = admin(&["sagas", "retry", &id, "--reason", "x"], &operator).await;
    assert_eq!(retry.code, Some(1), "{retry}");
    let outcome: String = sqlx::query_scalar(
        "SELECT outcome FROM orchestrator.audit_log WHERE action = 'saga.retry_now' AND target = $1",
    )
    .bind(&id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let why = outcome.strip_prefix("refused: ").expect(&outcome);
    assert_eq!(
        retry.stderr.trim(),
        format!("error: The saga's state does not allow this action: {why}"),
        "{retry}"
    );

    // Bulk: counted first; not confirmed without a terminal; --yes applies.
    let args = [
        "sagas", "bulk", "cancel", "--status", "running", "--reason", "clean-up",
    ];
    let unconfirmed = admin(&args, &operator).await;
    assert_eq!(unconfirmed.code, Some(1), "{unconfirmed}");
    assert!(
        unconfirmed.stdout.contains("1 saga(s) match"),
        "{unconfirmed}"
    );
    assert!(
        unconfirmed.stderr.contains("not a terminal"),
        "{unconfirmed}"
    );
    assert_eq!(app.saga(&other).await["status"], "running");
    let confirmed = admin(&[&args[..], &["--yes"][..]].concat(), &operator).await;
    assert_eq!(confirmed.code, Some(0), "{confirmed}");
    assert!(
        confirmed.stdout.contains("applied: 1; refused: 0"),
        "{confirmed}"
    );
    assert_eq!(app.saga(&other).await["status"], "compensating");
    let nothing = admin(&args, &operator).await;
    assert_eq!(
        nothing.code,
        Some(0),
        "nothing matches, nothing to confirm: {nothing}"
    );
    assert!(nothing.stdout.contains("0 saga(s) match"), "{nothing}");
    // Each letter is its own call; one that fails is said, and the status is 1.
    let letter = admin(
        &["dead-letters", "replay", "999", "--reason", "x"],
        &operator,
    )
    .await;
    assert_eq!(letter.code, Some(1), "{letter}");
    assert!(letter.stderr.contains("error: 999: "), "{letter}");
    let by_origin = admin(
        &[
            "dead-letters",
            "discard",
            "--origin",
            "replies",
            "--reason",
            "x",
        ],
        &operator,
    )
    .await;
    assert_eq!(by_origin.code, Some(0), "{by_origin}");
    assert!(
        by_origin
            .stdout
            .contains("0 dead letter(s) of replies match"),
        "{by_origin}"
    );
    for run in [&refused, &cancel, &retry, &confirmed, &letter] {
        assert!(
            !format!("{run}").contains(OPERATOR_TOKEN),
            "a token is never printed"
        );
    }
}

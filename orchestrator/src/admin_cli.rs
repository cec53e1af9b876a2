//! `orchestrator admin ...`: the operators' command line.
//!
//! Three kinds of command, by what they reach:
//! - `users`: the dashboard's operator accounts, written straight to PostgreSQL with the
//!   process's configuration (the migrations applied first, as every process does);
//! - `token`: a new API token and its `admin.tokens` entry, made on the spot (no network, no
//!   database: the token is printed once and kept nowhere);
//! - `sagas` and `dead-letters`: the admin API over HTTP (`--url`, `--token`), so that what an
//!   operator does here is checked, applied and audited exactly as the dashboard's actions are.
//!
//! Must never: take a password as an argument (it would show in `ps`), print an API token it
//! did not just make, or act on many sagas or letters without counting them first and being
//! told to go on.
//!
//! Exit status: 0 done; 1 refused or failed (the API's problem, an unreachable orchestrator or
//! database, a refused confirmation); 2 a usage or configuration error.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use reqwest::Method;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::admin::{Action, FilterQuery};
use crate::config::Settings;
use crate::http::auth::{self, Role};

/// Where the password of `users add` comes from when not from standard input.
pub const PASSWORD_VAR: &str = "SAGA_ADMIN_PASSWORD";
/// The shortest password `users add` accepts.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// The longest (Argon2 takes any length; this only stops a file piped in by mistake).
pub const MAX_PASSWORD_CHARS: usize = 1024;
/// How many of a saga's events `sagas show` prints (the newest).
const SHOWN_EVENTS: usize = 20;
/// How many refused sagas or failed letters a bulk action lists (`--json` has them all).
const SHOWN_REFUSALS: usize = 20;

/// Tools for operators: accounts, API tokens, and the admin API (sagas, dead letters).
#[derive(clap::Args)]
pub struct Args {
    /// Print the JSON answer as is (of the admin API, or of the command) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The dashboard's operator accounts (straight to PostgreSQL, with this process's
    /// configuration: DATABASE_URL, SAGA_CONFIG...).
    Users {
        #[command(subcommand)]
        command: Users,
    },
    /// Make a new API token and the `admin.tokens` entry that accepts it. Nothing is stored:
    /// the token is printed once, the configuration holds only its SHA-256.
    Token {
        /// The token's name, as the audit log shows who acted (letters, digits, . _ @ -).
        name: String,
        role: RoleArg,
    },
    /// Sagas, through the admin API.
    Sagas {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: Sagas,
    },
    /// Dead letters, through the admin API.
    DeadLetters {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: Letters,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    /// Reads everything.
    Viewer,
    /// Reads and acts.
    Operator,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Viewer => Role::Viewer,
            RoleArg::Operator => Role::Operator,
        }
    }
}

#[derive(Subcommand)]
enum Users {
    /// Add an operator account. The password is read from SAGA_ADMIN_PASSWORD if set, else as
    /// one line of standard input; never from an argument.
    Add {
        /// 1 to 64 letters, digits or . _ @ -
        name: String,
        #[arg(long)]
        role: RoleArg,
        /// Replace the password and role of an existing account (and end its sessions).
        #[arg(long)]
        update: bool,
    },
    /// List the accounts.
    List,
    /// Disable an account and end its sessions.
    Disable { name: String },
    /// Enable a disabled account.
    Enable { name: String },
}

/// How to reach the admin API.
#[derive(clap::Args)]
struct ApiArgs {
    /// The orchestrator's base URL [default: http://127.0.0.1:<http.port of the configuration>]
    #[arg(
        long,
        global = true,
        env = "SAGA_ADMIN_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    url: Option<String>,
    /// An API token (`orchestrator admin token` makes one). Prefer the environment variable:
    /// an argument shows in `ps`.
    #[arg(
        long,
        global = true,
        env = "SAGA_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
}

/// The list's filters.
#[derive(clap::Args)]
struct Filters {
    /// A saga type (checkout, fulfilment...).
    #[arg(long = "type", value_name = "TYPE")]
    saga_type: Option<String>,
    #[arg(long, value_parser = status_values())]
    status: Option<String>,
    /// The machine's state (running, compensating, parked...).
    #[arg(long)]
    state: Option<String>,
    /// Created at or after (RFC 3339, YYYY-MM-DDTHH:MM or YYYY-MM-DD, UTC).
    #[arg(long, value_name = "TIME")]
    from: Option<String>,
    /// Created before.
    #[arg(long, value_name = "TIME")]
    to: Option<String>,
    /// A saga id, order id, correlation id, customer id or email.
    #[arg(long, value_name = "TEXT")]
    q: Option<String>,
}

fn status_values() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(sagas::api::Status::ALL.map(|s| s.as_str()))
}

impl Filters {
    fn query(&self) -> FilterQuery {
        FilterQuery {
            saga_type: self.saga_type.clone(),
            status: self.status.clone(),
            state: self.state.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            q: self.q.clone(),
            limit: None,
            after: None,
        }
    }
}

#[derive(clap::Args)]
struct Reason {
    /// Why: required, it goes to the audit log (and a saga's timeline).
    #[arg(long)]
    reason: String,
}

#[derive(Subcommand)]
enum Sagas {
    /// List sagas, newest first.
    List {
        #[command(flatten)]
        filters: Filters,
        /// At most this many (1 to 500; 50 by default).
        #[arg(long)]
        limit: Option<u32>,
        /// The page after this saga (the id a previous page ends with).
        #[arg(long, value_name = "ID")]
        after: Option<Uuid>,
    },
    /// Show one saga: its steps, timers, allowed actions, last events and audit.
    Show { id: Uuid },
    /// Attempt the waiting step now (a backoff skipped, or once through an open breaker).
    #[command(alias = "retry-now")]
    Retry {
        id: Uuid,
        #[command(flatten)]
        reason: Reason,
    },
    /// Retry what a failed saga gave up on (a compensation, or a step past the pivot).
    Recover {
        id: Uuid,
        #[command(flatten)]
        reason: Reason,
    },
    /// Mark a failed saga resolved by hand.
    Resolve {
        id: Uuid,
        #[command(flatten)]
        reason: Reason,
    },
    /// Cancel a saga and undo what it did (refused past the pivot).
    Cancel {
        id: Uuid,
        #[command(flatten)]
        reason: Reason,
    },
    /// Apply an action to every saga the filters match (at least one filter; at most 10,000
    /// sagas): counted first, then confirmed by typing the count, or `--yes`.
    Bulk {
        action: ActionArg,
        #[command(flatten)]
        filters: Filters,
        #[command(flatten)]
        reason: Reason,
        /// Do not ask (required when standard input is not a terminal).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ActionArg {
    #[value(alias = "retry_now", alias = "retry-now")]
    Retry,
    Recover,
    Resolve,
    Cancel,
}

impl From<ActionArg> for Action {
    fn from(a: ActionArg) -> Self {
        match a {
            ActionArg::Retry => Action::RetryNow,
            ActionArg::Recover => Action::Recover,
            ActionArg::Resolve => Action::Resolve,
            ActionArg::Cancel => Action::Cancel,
        }
    }
}

#[derive(Subcommand)]
enum Letters {
    /// List dead letters, newest first, with the count per origin.
    List {
        /// Only this origin (`replies`, `signals`, `cmd-payment`...).
        #[arg(long)]
        origin: Option<String>,
        /// At most this many (1 to 200; 50 by default).
        #[arg(long)]
        limit: Option<u32>,
        /// Older than this sequence (the one a previous page ends with).
        #[arg(long, value_name = "SEQ")]
        before: Option<u64>,
    },
    /// Publish letters again on the subject they came from, and remove them.
    Replay(LetterAct),
    /// Remove letters for good.
    Discard(LetterAct),
}

#[derive(clap::Args)]
struct LetterAct {
    /// The letters' sequences.
    #[arg(value_name = "SEQ", required_unless_present = "origin")]
    seqs: Vec<u64>,
    /// Instead of sequences: every letter of this origin (at most 1,000 at once), counted
    /// first, then confirmed by typing the count, or `--yes`.
    #[arg(long, conflicts_with = "seqs")]
    origin: Option<String>,
    #[command(flatten)]
    reason: Reason,
    /// With `--origin`: do not ask (required when standard input is not a terminal).
    #[arg(long)]
    yes: bool,
}

/// What stops a command, and with which exit status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A usage or configuration error the argument parser could not see (exit status 2).
    #[error("{0}")]
    Usage(String),
    /// The admin API answered with a problem (RFC 9457).
    #[error("{}", problem_text(.title, .detail, .errors))]
    Problem {
        title: String,
        detail: String,
        errors: Vec<String>,
    },
    /// An answer that is neither a success nor a problem (another server at that address?).
    #[error("{url} answered {status}: {body}")]
    Http {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("cannot reach the orchestrator at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("the database: {0}")]
    Database(String),
    /// Refused here (an existing account, an unconfirmed bulk action...).
    #[error("{0}")]
    Refused(String),
}

impl Error {
    fn exit_code(&self) -> ExitCode {
        match self {
            Error::Usage(_) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

fn problem_text(title: &str, detail: &str, errors: &[String]) -> String {
    let mut text = match (title.is_empty(), detail.is_empty()) {
        (false, false) => format!("{title}: {detail}"),
        (true, _) => detail.to_owned(),
        (false, true) => title.to_owned(),
    };
    for e in errors {
        text.push_str("\n  ");
        text.push_str(e);
    }
    text
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Database(chain(&e))
    }
}

/// An error and its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        // Some errors repeat their cause in their own message.
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Run `orchestrator admin ...` to its end. It has its own life, not a server's: no settings
/// needed for `token`, none for the API commands given `--url`, and its own exit statuses.
pub fn main(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

async fn run(args: Args) -> Result<(), Error> {
    let out = Out { json: args.json };
    match args.command {
        Command::Token { name, role } => token(&out, &name, role.into()),
        Command::Users { command } => {
            let settings = settings()?;
            runtime::telemetry::init(settings.log.format, "warn", "orchestrator-admin");
            users(&out, &settings, command).await
        }
        Command::Sagas { api, command } => sagas(&out, &Api::new(api)?, command).await,
        Command::DeadLetters { api, command } => letters(&out, &Api::new(api)?, command).await,
    }
}

fn settings() -> Result<Settings, Error> {
    Settings::load().map_err(|e| Error::Usage(format!("invalid configuration: {e}")))
}

/// Where the answers go: text on stdout, or the JSON as is; with `--json`, what is said for a
/// person (counts, prompts) goes to stderr so that stdout is the JSON alone.
struct Out {
    json: bool,
}

impl Out {
    fn say(&self, line: impl std::fmt::Display) {
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    fn json(&self, value: &impl Serialize) {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("our own values serialize")
        );
    }
}

// --- token ---------------------------------------------------------------------------------

fn token(out: &Out, name: &str, role: Role) -> Result<(), Error> {
    let token = auth::random_secret();
    let hash = auth::hex(&auth::sha256(token.as_bytes()));
    let entry = format!("{name}:{}:{hash}", role.as_str());
    // The orchestrator's own parser says whether the entry is one it accepts.
    auth::parse_tokens(&entry).map_err(Error::Usage)?;
    if out.json {
        out.json(&json!({
            "name": name,
            "role": role.as_str(),
            "token": token,
            "sha256": hash,
            "tokens_entry": entry,
        }));
        return Ok(());
    }
    println!(
        "New API token for {name} ({}), shown this once:",
        role.as_str()
    );
    println!();
    println!("    {token}");
    println!();
    println!("Add this entry to admin.tokens (comma-separated; e.g. SAGA_ADMIN__TOKENS):");
    println!();
    println!("    {entry}");
    println!();
    println!(
        "The token itself is not stored anywhere: the configuration holds only its SHA-256, so a \
         lost token cannot be recovered (make a new one and replace the entry). Clients send it \
         as `Authorization: Bearer <token>`; this CLI reads it from SAGA_ADMIN_TOKEN."
    );
    Ok(())
}

// --- users ---------------------------------------------------------------------------------

/// An account, as `users list` shows it.
#[derive(Debug, Serialize, sqlx::FromRow)]
struct Operator {
    name: String,
    role: String,
    disabled: bool,
    created_at: chrono::DateTime<chrono::Utc>,
}

async fn users(out: &Out, settings: &Settings, command: Users) -> Result<(), Error> {
    // Checked before anything is connected: a typo costs nothing.
    if let Users::Add { name, .. } | Users::Disable { name } | Users::Enable { name } = &command {
        check_name(name)?;
    }
    let pool = runtime::db::connect(&settings.database, "orchestrator-admin")
        .await
        .map_err(|e| Error::Database(chain(&e)))?;
    match command {
        Users::Add { name, role, update } => {
            let role = Role::from(role);
            // Before the password is asked for (the insert refuses a name taken meanwhile).
            if !update && exists(&pool, &name).await? {
                return Err(taken(&name));
            }
            let hash = hash(&read_password(&name)?)?;
            let (created, sessions) = add_user(&pool, &name, role, &hash, update).await?;
            if out.json {
                out.json(
                    &json!({"name": name, "role": role.as_str(), "created": created,
                                 "sessions_ended": sessions}),
                );
            } else if created {
                println!("added {name} ({})", role.as_str());
            } else {
                println!(
                    "updated {name} ({}): new password; {sessions} session(s) ended",
                    role.as_str()
                );
            }
        }
        Users::List => {
            let rows: Vec<Operator> = sqlx::query_as(
                "SELECT name, role, disabled, created_at FROM orchestrator.operators ORDER BY name",
            )
            .fetch_all(&pool)
            .await?;
            if out.json {
                out.json(&rows);
            } else if rows.is_empty() {
                println!(
                    "no operator accounts (add one: orchestrator admin users add NAME --role operator)"
                );
            } else {
                let rows = rows
                    .iter()
                    .map(|o| {
                        vec![
                            o.name.clone(),
                            o.role.clone(),
                            if o.disabled { "disabled" } else { "active" }.to_owned(),
                            time_text(&o.created_at),
                        ]
                    })
                    .collect();
                print!("{}", table(&["NAME", "ROLE", "STATE", "CREATED"], rows));
            }
        }
        Users::Disable { name } => {
            let sessions = set_disabled(&pool, &name, true).await?;
            if out.json {
                out.json(&json!({"name": name, "disabled": true, "sessions_ended": sessions}));
            } else {
                println!("disabled {name}; {sessions} session(s) ended");
            }
        }
        Users::Enable { name } => {
            set_disabled(&pool, &name, false).await?;
            if out.json {
                out.json(&json!({"name": name, "disabled": false}));
            } else {
                println!("enabled {name}");
            }
        }
    }
    Ok(())
}

/// The rule of `orchestrator.operators.name` (its CHECK), told before the database does.
fn check_name(name: &str) -> Result<(), Error> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    match ok {
        true => Ok(()),
        false => Err(Error::Usage(format!(
            "an operator's name must be 1 to 64 letters, digits or . _ @ -, got {name:?}"
        ))),
    }
}

/// The new password: from SAGA_ADMIN_PASSWORD, else one line of standard input (not echoed
/// when it is a terminal).
fn read_password(name: &str) -> Result<String, Error> {
    let password = match std::env::var(PASSWORD_VAR) {
        Ok(p) => p,
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(Error::Usage(format!("{PASSWORD_VAR} is not UTF-8")));
        }
        Err(std::env::VarError::NotPresent) => {
            let stdin = std::io::stdin();
            let tty = stdin.is_terminal();
            if tty {
                eprint!(
                    "password for {name} (at least {MIN_PASSWORD_CHARS} characters, not shown): "
                );
                let _ = std::io::stderr().flush();
            }
            let silenced = tty && stty("-echo");
            let mut line = String::new();
            let read = stdin.lock().read_line(&mut line);
            if silenced {
                stty("echo");
            }
            if tty {
                eprintln!();
            }
            read.map_err(|e| Error::Refused(format!("cannot read the password: {e}")))?;
            if line.is_empty() {
                return Err(Error::Usage(format!(
                    "no password: set {PASSWORD_VAR}, or give it as a line of standard input"
                )));
            }
            let end = line.trim_end_matches(['\n', '\r']).len();
            line.truncate(end);
            line
        }
    };
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(Error::Refused(format!(
            "the password is too short: at least {MIN_PASSWORD_CHARS} characters, got {chars}"
        )));
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(Error::Refused(format!(
            "the password is too long: at most {MAX_PASSWORD_CHARS} characters"
        )));
    }
    Ok(password)
}

/// Switch the terminal's echo (`stty` on our standard input); whether it worked.
fn stty(setting: &str) -> bool {
    std::process::Command::new("stty")
        .arg(setting)
        .stdin(std::process::Stdio::inherit())
        .status()
        .is_ok_and(|s| s.success())
}

fn hash(password: &str) -> Result<String, Error> {
    auth::hash_password(password)
        .map_err(|e| Error::Refused(format!("cannot hash the password: {e}")))
}

async fn exists(pool: &PgPool, name: &str) -> Result<bool, Error> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM orchestrator.operators WHERE name = $1)")
            .bind(name)
            .fetch_one(pool)
            .await?,
    )
}

fn taken(name: &str) -> Error {
    Error::Refused(format!(
        "operator {name} exists; pass --update to replace its password and role (its sessions \
         end)"
    ))
}

/// Add the account, or with `update` replace its password and role and end its sessions.
/// Whether it was created, and how many sessions ended.
async fn add_user(
    pool: &PgPool,
    name: &str,
    role: Role,
    password_hash: &str,
    update: bool,
) -> Result<(bool, u64), Error> {
    let mut tx = pool.begin().await?;
    let updated = if update {
        sqlx::query(
            "UPDATE orchestrator.operators SET role = $2, password_hash = $3 WHERE name = $1",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(password_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected()
    } else {
        0
    };
    if updated == 0 {
        let inserted = sqlx::query(
            "INSERT INTO orchestrator.operators (name, role, password_hash) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(password_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(taken(name));
        }
        tx.commit().await?;
        return Ok((true, 0));
    }
    // Whoever held the old password is logged out.
    let sessions = sqlx::query("DELETE FROM orchestrator.admin_sessions WHERE operator = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok((false, sessions))
}

/// Disable (ending its sessions) or enable an account; the sessions ended.
async fn set_disabled(pool: &PgPool, name: &str, disabled: bool) -> Result<u64, Error> {
    let mut tx = pool.begin().await?;
    let found = sqlx::query("UPDATE orchestrator.operators SET disabled = $2 WHERE name = $1")
        .bind(name)
        .bind(disabled)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if found == 0 {
        return Err(Error::Refused(format!("no operator {name}")));
    }
    let sessions = if disabled {
        sqlx::query("DELETE FROM orchestrator.admin_sessions WHERE operator = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected()
    } else {
        0
    };
    tx.commit().await?;
    Ok(sessions)
}

// --- the admin API -------------------------------------------------------------------------

/// An API token. Never shown: no `Debug`, no `Display`.
struct Token(String);

/// A client of the admin API.
struct Api {
    http: reqwest::Client,
    base: String,
    token: Token,
}

/// A successful answer: the body as sent (for `--json`) and as JSON.
struct Answer {
    raw: String,
    json: Value,
}

impl Api {
    fn new(args: ApiArgs) -> Result<Self, Error> {
        let token = args.token.filter(|t| !t.trim().is_empty()).ok_or_else(|| {
            Error::Usage(
                "no API token: set SAGA_ADMIN_TOKEN or pass --token (`orchestrator admin \
                     token NAME ROLE` makes one)"
                    .to_owned(),
            )
        })?;
        let base = match args.url.filter(|u| !u.trim().is_empty()) {
            Some(url) => url.trim().trim_end_matches('/').to_owned(),
            None => format!("http://127.0.0.1:{}", settings()?.http.port),
        };
        let parsed = reqwest::Url::parse(&base)
            .map_err(|e| Error::Usage(format!("--url {base:?} is not a URL: {e}")))?;
        // The workspace's reqwest has no TLS feature: say so here rather than fail at the first
        // request with "scheme is not http".
        if parsed.scheme() != "http" {
            return Err(Error::Usage(format!(
                "--url must be an http:// address (this build has no TLS client; reach an HTTPS \
                 orchestrator through a tunnel to its plain port), got {base:?}"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("orchestrator-admin/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Usage(format!("cannot make an HTTP client: {}", chain(&e))))?;
        Ok(Self {
            http,
            base,
            token: Token(token.trim().to_owned()),
        })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token.0)
            .header(reqwest::header::ACCEPT, "application/json")
    }

    async fn get(&self, path: &str, query: &impl Serialize) -> Result<Answer, Error> {
        self.send(self.request(Method::GET, path).query(query))
            .await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Answer, Error> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, Error> {
        let unreachable = |e: reqwest::Error| Error::Unreachable {
            url: self.base.clone(),
            cause: chain(&e),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let url = response.url().path().to_owned();
        let raw = response.text().await.map_err(unreachable)?;
        let parsed: Option<Value> = serde_json::from_str(&raw).ok();
        if status.is_success() {
            return match parsed {
                Some(json) => Ok(Answer { raw, json }),
                None => Err(Error::Http {
                    url: format!("{}{url}", self.base),
                    status,
                    body: excerpt(&raw),
                }),
            };
        }
        match parsed {
            Some(p) if p.get("title").is_some_and(Value::is_string) => Err(Error::Problem {
                title: str_of(&p, "title"),
                detail: str_of(&p, "detail"),
                errors: p["errors"]
                    .as_array()
                    .map(|errors| errors.iter().map(field_error).collect())
                    .unwrap_or_default(),
            }),
            _ => Err(Error::Http {
                url: format!("{}{url}", self.base),
                status,
                body: excerpt(&raw),
            }),
        }
    }
}

/// One entry of a problem's `errors`: where, and what.
fn field_error(e: &Value) -> String {
    let place = ["pointer", "parameter", "header"]
        .iter()
        .find_map(|k| e.get(*k).and_then(Value::as_str))
        .map(|p| if p.is_empty() { "(the body)" } else { p })
        .unwrap_or("");
    let detail = clean(e["detail"].as_str().unwrap_or_default());
    match place.is_empty() {
        true => detail,
        false => format!("{}: {detail}", clean(place)),
    }
}

fn excerpt(body: &str) -> String {
    let body = clean(body.trim());
    match body.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &body[..i]),
        None if body.is_empty() => "(no body)".to_owned(),
        None => body,
    }
}

async fn sagas(out: &Out, api: &Api, command: Sagas) -> Result<(), Error> {
    match command {
        Sagas::List {
            filters,
            limit,
            after,
        } => {
            let mut query = filters.query();
            query.limit = limit.map(|n| n.to_string());
            query.after = after.map(|a| a.to_string());
            let answer = api.get("/admin/sagas", &query).await?;
            if out.json {
                println!("{}", answer.raw);
            } else {
                print_sagas(&answer.json);
            }
        }
        Sagas::Show { id } => {
            let answer = api.get(&format!("/admin/sagas/{id}"), &()).await?;
            if out.json {
                println!("{}", answer.raw);
            } else {
                print_saga(&answer.json);
            }
        }
        Sagas::Retry { id, reason } => act(out, api, id, Action::RetryNow, reason).await?,
        Sagas::Recover { id, reason } => act(out, api, id, Action::Recover, reason).await?,
        Sagas::Resolve { id, reason } => act(out, api, id, Action::Resolve, reason).await?,
        Sagas::Cancel { id, reason } => act(out, api, id, Action::Cancel, reason).await?,
        Sagas::Bulk {
            action,
            filters,
            reason,
            yes,
        } => {
            let action = Action::from(action);
            let body = |dry_run: bool| {
                json!({
                    "action": action.as_str(),
                    "reason": reason.reason,
                    "filter": filters.query(),
                    "dry_run": dry_run,
                })
            };
            let dry = api.post("/admin/sagas/bulk", &body(true)).await?;
            let matched = dry.json["matched"].as_i64().unwrap_or(0);
            let capped = if matched >= crate::http::admin::BULK_CAP {
                " (at most that many at once)"
            } else {
                ""
            };
            out.say(format_args!(
                "{matched} saga(s) match{capped}; action: {}",
                action.as_str()
            ));
            if matched == 0 {
                if out.json {
                    println!("{}", dry.raw);
                }
                return Ok(());
            }
            confirm(
                matched,
                &format!("{} {matched} saga(s)", action.as_str()),
                yes,
            )?;
            let done = api
                .send(
                    api.request(Method::POST, "/admin/sagas/bulk")
                        .json(&body(false))
                        // One bulk action applies up to 10,000 sagas, one after the other.
                        .timeout(Duration::from_secs(600)),
                )
                .await?;
            if out.json {
                println!("{}", done.raw);
                return Ok(());
            }
            let applied = done.json["applied"].as_array().map_or(0, Vec::len);
            let refused = done.json["refused"].as_array().cloned().unwrap_or_default();
            println!("applied: {applied}; refused: {}", refused.len());
            for r in refused.iter().take(SHOWN_REFUSALS) {
                println!("  {}: {}", text(&r[0]), text(&r[1]));
            }
            if refused.len() > SHOWN_REFUSALS {
                println!(
                    "  ... and {} more (--json lists them all)",
                    refused.len() - SHOWN_REFUSALS
                );
            }
        }
    }
    Ok(())
}

async fn act(out: &Out, api: &Api, id: Uuid, action: Action, reason: Reason) -> Result<(), Error> {
    let answer = api
        .post(
            &format!("/admin/sagas/{id}/actions/{}", action.as_str()),
            &json!({ "reason": reason.reason }),
        )
        .await?;
    if out.json {
        println!("{}", answer.raw);
    } else {
        let a = &answer.json;
        println!(
            "{}: {} done; now {} ({})",
            text(&a["saga_id"]),
            action.as_str(),
            text(&a["status"]),
            text(&a["state"])
        );
    }
    Ok(())
}

/// Go on with an action on `count` things only if told to: `--yes`, or the count typed back
/// on a terminal.
fn confirm(count: impl std::fmt::Display, what: &str, yes: bool) -> Result<(), Error> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Error::Refused(format!(
            "not confirmed: standard input is not a terminal; pass --yes to {what}"
        )));
    }
    eprint!("type {count} to {what}: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|e| Error::Refused(format!("cannot read the confirmation: {e}")))?;
    if line.trim() == count.to_string() {
        Ok(())
    } else {
        Err(Error::Refused("not confirmed; nothing done".to_owned()))
    }
}

async fn letters(out: &Out, api: &Api, command: Letters) -> Result<(), Error> {
    let (action, act) = match command {
        Letters::List {
            origin,
            limit,
            before,
        } => {
            let query: Vec<(&str, String)> = [
                ("origin", origin),
                ("limit", limit.map(|n| n.to_string())),
                ("before", before.map(|n| n.to_string())),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
            let answer = api.get("/admin/dead-letters", &query).await?;
            if out.json {
                println!("{}", answer.raw);
            } else {
                print_letters(&answer.json);
            }
            return Ok(());
        }
        Letters::Replay(act) => ("replay", act),
        Letters::Discard(act) => ("discard", act),
    };
    let done_word = if action == "replay" {
        "replayed"
    } else {
        "discarded"
    };
    if let Some(origin) = &act.origin {
        let body = |dry_run: bool| {
            json!({"action": action, "reason": act.reason.reason, "origin": origin,
                   "dry_run": dry_run})
        };
        let dry = api.post("/admin/dead-letters/bulk", &body(true)).await?;
        let matched = dry.json["matched"].as_u64().unwrap_or(0);
        out.say(format_args!("{matched} dead letter(s) of {origin} match"));
        if matched == 0 {
            if out.json {
                println!("{}", dry.raw);
            }
            return Ok(());
        }
        confirm(
            matched,
            &format!("{action} {matched} dead letter(s)"),
            act.yes,
        )?;
        let done = api
            .send(
                api.request(Method::POST, "/admin/dead-letters/bulk")
                    .json(&body(false))
                    .timeout(Duration::from_secs(600)),
            )
            .await?;
        if out.json {
            println!("{}", done.raw);
            return Ok(());
        }
        let ok = done.json["done"].as_array().map_or(0, Vec::len);
        let failed = done.json["failed"].as_array().cloned().unwrap_or_default();
        println!("{done_word}: {ok}; failed: {}", failed.len());
        for f in failed.iter().take(SHOWN_REFUSALS) {
            println!("  {}: {}", text(&f[0]), text(&f[1]));
        }
        return Ok(());
    }
    // One call per letter: each is audited on its own, and one that fails does not stop the
    // others (an unreachable orchestrator does).
    let mut failures = 0;
    for seq in &act.seqs {
        let path = format!("/admin/dead-letters/{seq}/{action}");
        match api
            .post(&path, &json!({ "reason": act.reason.reason }))
            .await
        {
            Ok(answer) if out.json => println!("{}", answer.raw),
            Ok(answer) => println!(
                "{done_word} {seq} ({} on {})",
                text(&answer.json["letter"]["origin"]),
                text(&answer.json["letter"]["subject"])
            ),
            Err(e @ Error::Unreachable { .. }) => return Err(e),
            Err(e) => {
                failures += 1;
                eprintln!("error: {seq}: {e}");
            }
        }
    }
    match failures {
        0 => Ok(()),
        n => Err(Error::Refused(format!(
            "{n} of {} dead letter(s) not {done_word}",
            act.seqs.len()
        ))),
    }
}

// --- text ------------------------------------------------------------------------------------

fn print_sagas(answer: &Value) {
    let sagas = answer["sagas"].as_array().cloned().unwrap_or_default();
    if sagas.is_empty() {
        println!("no sagas match");
    } else {
        let rows = sagas
            .iter()
            .map(|s| {
                vec![
                    text(&s["id"]),
                    text(&s["type"]),
                    text(&s["status"]),
                    text(&s["state"]),
                    text(&s["subject"]),
                    time_of(&s["created_at"]),
                ]
            })
            .collect();
        print!(
            "{}",
            table(&["ID", "TYPE", "STATUS", "STATE", "ORDER", "CREATED"], rows)
        );
    }
    if let Some(after) = answer["next"]
        .as_str()
        .and_then(|n| query_value(n, "after"))
    {
        println!("more: run again with --after {after}");
    }
}

fn print_saga(answer: &Value) {
    let s = &answer["saga"];
    let mut header = vec![
        ("saga", text(&s["id"])),
        ("type", text(&s["type"])),
        (
            "status",
            format!("{} (state {})", text(&s["status"]), text(&s["state"])),
        ),
        ("order", text(&answer["subject"])),
        ("version", text(&s["version"])),
        ("correlation", text(&s["correlation_id"])),
        ("created", time_of(&s["created_at"])),
        ("updated", time_of(&s["updated_at"])),
    ];
    for key in ["failure", "resolution"] {
        if !answer[key].is_null() {
            header.push((key, clean(&answer[key].to_string())));
        }
    }
    let width = header.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &header {
        println!("{k:<width$}  {v}");
    }

    println!("\nSteps");
    match answer["steps"].as_array() {
        Some(steps) if !steps.is_empty() => {
            let rows = steps
                .iter()
                .map(|st| {
                    let error = &st["last_error"];
                    vec![
                        text(&st["name"]),
                        text(&st["status"]),
                        st["attempts"].as_u64().unwrap_or(0).to_string(),
                        st["compensation_attempts"]
                            .as_u64()
                            .unwrap_or(0)
                            .to_string(),
                        if error.is_null() {
                            "-".to_owned()
                        } else {
                            format!("{}: {}", text(&error["code"]), text(&error["reason"]))
                        },
                    ]
                })
                .collect();
            print!(
                "{}",
                indent(&table(
                    &["STEP", "STATUS", "ATTEMPTS", "UNDO ATTEMPTS", "LAST ERROR"],
                    rows
                ))
            );
        }
        _ => println!("  (none)"),
    }

    println!("\nTimers");
    match answer["timers"].as_array() {
        Some(timers) if !timers.is_empty() => {
            let rows = timers
                .iter()
                .map(|t| vec![text(&t["name"]), time_of(&t["fire_at"])])
                .collect();
            print!("{}", indent(&table(&["TIMER", "FIRES AT"], rows)));
        }
        _ => println!("  (none)"),
    }

    println!("\nActions");
    let rows = answer["actions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let allowed = a["allowed"].as_bool().unwrap_or(false);
            vec![
                text(&a["action"]),
                if allowed { "yes" } else { "no" }.to_owned(),
                if allowed {
                    String::new()
                } else {
                    text(&a["why_not"])
                },
            ]
        })
        .collect();
    print!(
        "{}",
        indent(&table(&["ACTION", "ALLOWED", "WHY NOT"], rows))
    );

    let events = answer["events"].as_array().cloned().unwrap_or_default();
    let skipped = events.len().saturating_sub(SHOWN_EVENTS);
    if skipped > 0 {
        println!("\nEvents (the last {SHOWN_EVENTS} of {})", events.len());
    } else {
        println!("\nEvents");
    }
    let rows = events[skipped..]
        .iter()
        .map(|e| {
            vec![
                text(&e["seq"]),
                time_of(&e["at"]),
                text(&e["kind"]),
                text(&e["state_after"]),
            ]
        })
        .collect();
    print!(
        "{}",
        indent(&table(&["SEQ", "AT", "KIND", "STATE AFTER"], rows))
    );

    println!("\nAudit");
    match answer["audit"].as_array() {
        Some(audit) if !audit.is_empty() => {
            let rows = audit
                .iter()
                .map(|a| {
                    vec![
                        time_of(&a["at"]),
                        text(&a["actor"]),
                        text(&a["action"]),
                        text(&a["outcome"]),
                        text(&a["reason"]),
                    ]
                })
                .collect();
            print!(
                "{}",
                indent(&table(&["AT", "WHO", "ACTION", "OUTCOME", "REASON"], rows))
            );
        }
        _ => println!("  (none)"),
    }
}

fn print_letters(answer: &Value) {
    let counts = answer["counts"].as_object().cloned().unwrap_or_default();
    if counts.is_empty() {
        println!("no dead letters");
    } else {
        let total: u64 = counts.values().filter_map(Value::as_u64).sum();
        let each: Vec<String> = counts
            .iter()
            .map(|(origin, n)| format!("{} {}", clean(origin), text(n)))
            .collect();
        println!("{total} dead letter(s): {}", each.join(", "));
    }
    let letters = answer["letters"].as_array().cloned().unwrap_or_default();
    if !letters.is_empty() {
        println!();
        let rows = letters
            .iter()
            .map(|l| {
                vec![
                    text(&l["seq"]),
                    text(&l["origin"]),
                    text(&l["subject"]),
                    shorten(&text(&l["reason"]), 100),
                    time_of(&l["at"]),
                ]
            })
            .collect();
        print!(
            "{}",
            table(&["SEQ", "ORIGIN", "SUBJECT", "REASON", "AT"], rows)
        );
    }
    if let Some(before) = answer["next"]
        .as_str()
        .and_then(|n| query_value(n, "before"))
    {
        println!("older: run again with --before {before}");
    }
}

/// A value as one line of text: a string as is, null as `-`, anything else as JSON; control
/// characters escaped (a dead letter's text comes from anywhere, and must not drive the
/// terminal).
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => clean(s),
        other => clean(&other.to_string()),
    }
}

fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// A time of the API (RFC 3339) as `YYYY-MM-DD HH:MM:SS` UTC.
fn time_of(v: &Value) -> String {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| time_text(&t.with_timezone(&chrono::Utc)))
        .unwrap_or_else(|| text(v))
}

fn time_text(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn str_of(v: &Value, key: &str) -> String {
    clean(v[key].as_str().unwrap_or_default())
}

/// The value of `key` in the query string of a link such as `/admin/sagas?...&after=ID`.
fn query_value(link: &str, key: &str) -> Option<String> {
    let (_, query) = link.split_once('?')?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| clean(&v))
}

/// Columns padded to their widest cell (the last one not padded).
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(headers.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn indent(block: &str) -> String {
    block.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_escape() {
        let t = table(
            &["ID", "REASON"],
            vec![
                vec!["1".into(), clean("bad\u{1b}[31m")],
                vec!["1234".into(), "x".into()],
            ],
        );
        assert_eq!(t, "ID    REASON\n1     bad\\u{1b}[31m\n1234  x\n");
    }

    #[test]
    fn a_link_gives_its_cursor() {
        assert_eq!(
            query_value("/admin/sagas?status=running&limit=2&after=abc", "after").as_deref(),
            Some("abc")
        );
        assert_eq!(query_value("/admin/sagas", "after"), None);
    }

    #[test]
    fn problems_read_as_one_message() {
        let e = Error::Problem {
            title: "Invalid request".into(),
            detail: "see errors".into(),
            errors: vec![field_error(
                &json!({"pointer": "/reason", "detail": "must not be empty"}),
            )],
        };
        assert_eq!(
            e.to_string(),
            "Invalid request: see errors\n  /reason: must not be empty"
        );
    }

    #[test]
    fn names_follow_the_table_rule() {
        assert!(check_name("ada.lovelace@example-1").is_ok());
        for bad in ["", "a b", "ä", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}

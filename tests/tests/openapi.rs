//! The OpenAPI document against the real API: it validates (openapi-spec-validator), and
//! schemathesis, with an operator's token, generates thousands of requests from it (valid and
//! invalid ones, and sequences that follow the answers) and finds no 5xx and no answer that
//! breaks the document: every status, content type, header and body is what it says.
//!
//! Both tools come from PyPI into `target/tools/venv` (deploy/test installs them, pinned); the
//! test says so and fails when they are missing.
//!
//! Not checked: that every request the document allows is accepted. The document gives each
//! body its structure (types, required fields, enums, ranges) but the server's rules go further
//! (a SKU must be in the catalogue, an email must be deliverable, a reason must not be blank,
//! an action must suit the saga's state) and answer 4xx, as documented.

use std::path::PathBuf;
use std::process::Command;

use e2e::{App, OPERATOR_TOKEN, Options};

fn tool(name: &str) -> PathBuf {
    let venv = std::env::var("E2E_TOOLS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .join("target/tools/venv")
        });
    let bin = venv.join("bin").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run deploy/test (it installs schemathesis and openapi-spec-validator into {})",
        bin.display(),
        venv.display()
    );
    bin
}

#[tokio::test]
async fn the_document_validates_and_schemathesis_finds_nothing() {
    // Long polls of a second at most, so that generated waits do not stall the run.
    let app =
        App::spawn_with(Options::default().orchestrator("SAGA_HTTP__MAX_WAIT_SECONDS", "1")).await;
    let doc = app.get_json("/openapi.json").await;
    assert_eq!(doc["openapi"], "3.1.0");
    let file = app.logs.join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let out = Command::new(tool("openapi-spec-validator"))
        .arg(&file)
        .output()
        .expect("openapi-spec-validator runs");
    assert!(
        out.status.success(),
        "the document does not validate:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let report = app.logs.join("schemathesis");
    let out = tokio::process::Command::new(tool("schemathesis"))
        .args(["run", &format!("{}/openapi.json", app.base)])
        .args([
            "--header",
            &format!("Authorization: Bearer {OPERATOR_TOKEN}"),
        ])
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--max-examples", "40", "--seed", "20261203"])
        .args(["--request-timeout", "10"])
        .arg("--report-dir")
        .arg(&report)
        .args(["--report", "junit"])
        // Its caches (.schemathesis, .hypothesis) go with the test's logs, not into the tree.
        .current_dir(&app.logs)
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .output()
        .await
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: String = stdout
        .lines()
        .rev()
        .take(25)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        out.status.success(),
        "schemathesis found failures (report in {}):\n{stdout}\n{}",
        report.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // It ran for real: every operation it found was tested, and it found the document's.
    let number = |label: &str| -> usize {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.trim().split('/').next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in:\n{summary}"))
    };
    let selected = number("Selected:");
    assert!(
        selected >= 20,
        "the admin API is in the document:\n{summary}"
    );
    assert_eq!(number("Tested:"), selected, "{summary}");
    assert!(stdout.contains("passed"), "{summary}");
}

//! deploy/: the container image, the compose file and the Kubernetes manifests, checked on a
//! machine that has neither a Docker engine nor a cluster.
//!
//! - Kubernetes: every overlay of `deploy/k8s` is rendered by kustomize itself: pykustomize,
//!   kustomize's Go library in a PyPI wheel, from `target/tools/venv` (deploy/test installs it,
//!   pinned); where a `kustomize` or `kubectl` binary is on the PATH it renders them too, and the
//!   two must agree. Every object of the Kubernetes API is validated strictly (unknown fields
//!   refused) by kubernetes-validate against the API of Kubernetes [`K8S_VERSION`]; KEDA's
//!   ScaledObjects, which it does not know, against `deploy/k8s/schemas/scaledobject.schema.json`.
//!   Then what holds the objects together: every Secret, ConfigMap and key a pod names exists (or
//!   is one the production overlay expects to be created out of band), Services and budgets
//!   select pods, the probes reach the ports the processes listen on, each ScaledObject names
//!   the stream and consumer the code declares for its pool, and each process's settings, as
//!   the image, ConfigMaps and Secrets give them, load in the binary's own loader.
//! - Compose: the file is interpolated with `deploy/compose/.env.example` and validated against
//!   the Compose Specification's JSON Schema (vendored in `deploy/compose/compose_spec.json`,
//!   from the docker-compose 1.29.2 package on PyPI); `docker compose config` runs too where
//!   `docker compose version` answers. Then the same checks of wiring and settings.
//! - The Dockerfile: parsed and linted (stages, the one build of the three binaries, offline
//!   SQL, cache mounts, a numeric non-root user, files it copies that exist and that the
//!   .dockerignore lets through); `docker build` runs only where `docker info` answers (it says
//!   so when it does not). The image's health-check script is run against a local listener.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The Kubernetes version whose API the objects must fit (kubernetes-validate's schemas).
const K8S_VERSION: &str = "1.31.0";
const OVERLAYS: &[&str] = &["dev", "production"];
/// Every worker pool: `worker <pool>`, a Deployment of that name.
const POOLS: &[&str] = &[
    "inventory",
    "payment",
    "shipping",
    "notification",
    "order",
    "product",
];
/// What the production overlay expects to be created out of band (deploy/README.md), with
/// stand-in values for loading the settings: the Secret, and its keys.
const PRODUCTION_SECRET: &str = "saga-secrets";
const PRODUCTION_SECRET_KEYS: &[(&str, &str)] = &[
    ("DATABASE_PASSWORD", "stand-in"),
    ("SAGA_NATS__USER", "saga"),
    ("SAGA_NATS__PASSWORD", "stand-in"),
    (
        "SAGA_ADMIN__TOKENS",
        "ops:operator:0000000000000000000000000000000000000000000000000000000000000000",
    ),
];
/// The production overlay's TLS files' Secret (out of band too) and the files it holds.
const PRODUCTION_TLS_SECRET: &str = "saga-tls";
const PRODUCTION_TLS_FILES: &[&str] = &["nats-ca.crt", "postgres-ca.crt"];
/// The workers' health listener (section `health`), probed by Kubernetes and compose.
const HEALTH_PORT: u16 = 9100;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// The tools' virtual environment's Python (kubernetes-validate, pykustomize, PyYAML).
fn python() -> PathBuf {
    let venv = std::env::var("E2E_TOOLS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target/tools/venv"));
    let bin = venv.join("bin/python");
    assert!(
        bin.exists(),
        "{} is missing: run deploy/test (it installs kubernetes-validate and pykustomize into {})",
        bin.display(),
        venv.display()
    );
    bin
}

/// Run a Python script of the tools' environment, which prints JSON.
fn run_python(script: &str, args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .current_dir(root())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

/// Renders each kustomization given and validates each object against the Kubernetes API:
/// `{path: [{"object": ..., "verdict": "valid" | "no schema" | "invalid: ..."}]}`.
const RENDER: &str = r#"
import asyncio, json, sys
import kubernetes_validate as kv
import pykustomize

version, paths = sys.argv[1], sys.argv[2:]
result = {}
for path in paths:
    objects = []
    for o in asyncio.run(pykustomize.build_json(path)).resources:
        try:
            kv.validate(o, version, strict=True)
            verdict = "valid"
        except kv.SchemaNotFoundError:
            verdict = "no schema"
        except kv.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path)
            verdict = "invalid: %s (at /%s)" % (e.message, where)
        objects.append({"object": o, "verdict": verdict})
    result[path] = objects
json.dump(result, sys.stdout)
"#;

/// YAML documents (a file, or standard input) as a JSON array.
const YAML_TO_JSON: &str = r#"
import json, sys, yaml
text = open(sys.argv[1]).read() if len(sys.argv) > 1 else sys.stdin.read()
json.dump([d for d in yaml.safe_load_all(text) if d is not None], sys.stdout)
"#;

struct Rendered {
    overlay: &'static str,
    objects: Vec<Value>,
}

impl Rendered {
    fn all(&self, kind: &str) -> impl Iterator<Item = &Value> {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.all(kind).find(|o| o["metadata"]["name"] == name)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.overlay))
    }

    /// A ConfigMap by the name the manifests give it (the generator adds a hash).
    fn config_map(&self, name: &str) -> &Value {
        let mut found = self.all("ConfigMap").filter(|o| {
            let n = o["metadata"]["name"].as_str().unwrap_or_default();
            n == name || n.rsplit_once('-').is_some_and(|(base, _)| base == name)
        });
        let m = found
            .next()
            .unwrap_or_else(|| panic!("{}: no ConfigMap {name}", self.overlay));
        assert!(
            found.next().is_none(),
            "{}: two ConfigMaps {name}",
            self.overlay
        );
        m
    }

    /// Every workload's pod template with its kind and name.
    fn pods(&self) -> Vec<(&str, &str, &Value)> {
        self.objects
            .iter()
            .filter(|o| {
                matches!(
                    o["kind"].as_str(),
                    Some("Deployment" | "StatefulSet" | "Job")
                )
            })
            .map(|o| {
                (
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap(),
                    &o["spec"]["template"],
                )
            })
            .collect()
    }
}

fn render_all() -> Vec<Rendered> {
    let k8s = root().join("deploy/k8s");
    let paths: Vec<String> = OVERLAYS
        .iter()
        .map(|o| k8s.join("overlays").join(o).display().to_string())
        .collect();
    let mut args = vec![K8S_VERSION];
    args.extend(paths.iter().map(String::as_str));
    let result = run_python(RENDER, &args);
    let keda = validator(&root().join("deploy/k8s/schemas/scaledobject.schema.json"));
    let mut rendered = Vec::new();
    for (overlay, path) in OVERLAYS.iter().zip(&paths) {
        let entries = result[path.as_str()].as_array().expect("a list of objects");
        assert!(!entries.is_empty(), "{overlay} renders nothing");
        let mut objects = Vec::new();
        for entry in entries {
            let o = &entry["object"];
            let what = format!(
                "{overlay}: {} {}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            );
            match entry["verdict"].as_str().unwrap() {
                "valid" => {}
                "no schema" => {
                    // Only KEDA's CRD is outside the Kubernetes API.
                    assert_eq!(
                        o["apiVersion"], "keda.sh/v1alpha1",
                        "{what}: no schema for it"
                    );
                    assert_eq!(o["kind"], "ScaledObject", "{what}: no schema for it");
                    let errors: Vec<String> = keda.iter_errors(o).map(|e| e.to_string()).collect();
                    assert!(errors.is_empty(), "{what}: {errors:?}");
                }
                invalid => {
                    panic!("{what} is not a valid Kubernetes {K8S_VERSION} object: {invalid}")
                }
            }
            objects.push(o.clone());
        }
        cross_check_with_kustomize_binary(overlay, path, &objects);
        rendered.push(Rendered { overlay, objects });
    }
    rendered
}

/// Where a kustomize binary is at hand (`kustomize`, or the one built into `kubectl`), it must
/// render what pykustomize rendered.
fn cross_check_with_kustomize_binary(overlay: &str, path: &str, objects: &[Value]) {
    let candidates: [(&str, &[&str]); 2] = [("kustomize", &["build"]), ("kubectl", &["kustomize"])];
    let Some((bin, args)) = candidates.iter().find(|(bin, _)| {
        Command::new(bin)
            .arg("version")
            .args(if *bin == "kubectl" {
                &["--client"][..]
            } else {
                &[][..]
            })
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        eprintln!(
            "{overlay}: no kustomize or kubectl binary on PATH: rendered by pykustomize only"
        );
        return;
    };
    let out = Command::new(bin)
        .args(*args)
        .arg(path)
        .output()
        .expect("kustomize runs");
    assert!(
        out.status.success(),
        "{bin} {} {path} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = yaml_text_to_json(&out.stdout);
    let key = |o: &Value| serde_json::to_string(o).unwrap();
    let mut a: Vec<String> = objects.iter().map(key).collect();
    let mut b: Vec<String> = theirs.as_array().unwrap().iter().map(key).collect();
    a.sort();
    b.sort();
    assert!(
        a == b,
        "{overlay}: {bin} renders other objects than pykustomize"
    );
    eprintln!(
        "{overlay}: {bin} {} renders the same {} objects",
        args.join(" "),
        a.len()
    );
}

fn yaml_text_to_json(text: &[u8]) -> Value {
    let mut child = Command::new(python())
        .arg("-c")
        .arg(YAML_TO_JSON)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    child.stdin.take().unwrap().write_all(text).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not YAML");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn validator(path: &Path) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    if let Err(e) = jsonschema::meta::validate(&schema) {
        panic!("{} is not a valid JSON Schema: {e}", path.display());
    }
    jsonschema::validator_for(&schema).unwrap()
}

// ---- the image --------------------------------------------------------------------------

/// One instruction of the Dockerfile, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    rest: String,
}

fn dockerfile() -> Vec<Instruction> {
    let text = std::fs::read_to_string(root().join("deploy/container/Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            rest: rest.trim().to_owned(),
        });
        current.clear();
    }
    assert!(
        current.is_empty(),
        "the Dockerfile ends in a continuation line"
    );
    out
}

/// The environment the runtime image sets (its last stage's ENV).
fn image_env() -> BTreeMap<String, String> {
    let instructions = dockerfile();
    let last_from = instructions
        .iter()
        .rposition(|i| i.keyword == "FROM")
        .unwrap();
    let mut env = BTreeMap::new();
    for i in &instructions[last_from..] {
        if i.keyword == "ENV" {
            for pair in i.rest.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV KEY=VALUE");
                env.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    env
}

/// The workspace's binary targets (cargo metadata, without building).
fn workspace_bins() -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Is `path` (relative to the context) sent to the build by .dockerignore's rules? (Its rules
/// here are directory patterns and `!` exceptions, matched last rule wins.)
fn sent_to_build(rules: &[String], path: &str) -> bool {
    let mut sent = true;
    for rule in rules {
        let (negate, pattern) = match rule.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, rule.as_str()),
        };
        let pattern = pattern.trim_end_matches('/');
        let matches = if let Some(dir) = pattern.strip_suffix("/*") {
            path.starts_with(&format!("{dir}/"))
        } else if let Some(suffix) = pattern.strip_prefix("*") {
            path.ends_with(suffix)
        } else {
            path == pattern || path.starts_with(&format!("{pattern}/"))
        };
        if matches {
            sent = negate;
        }
    }
    sent
}

#[test]
fn the_dockerfile_builds_one_non_root_image_of_every_binary() {
    let instructions = dockerfile();
    let stages: Vec<(String, Option<String>)> = instructions
        .iter()
        .filter(|i| i.keyword == "FROM")
        .map(|i| {
            let words: Vec<&str> = i.rest.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                [_] => None,
                _ => panic!("FROM {}: not IMAGE [AS NAME]", i.rest),
            };
            (words[0].to_owned(), name)
        })
        .collect();
    assert!(stages.len() >= 2, "a multi-stage build: {stages:?}");
    assert_eq!(stages[0].0, "rust:1-bookworm", "the builder");
    let runtime = &stages.last().unwrap().0;
    assert!(
        runtime.starts_with("debian:bookworm-slim")
            || runtime.starts_with("gcr.io/distroless/cc-debian12"),
        "a small runtime stage, of the builder's Debian release: {runtime}"
    );
    for i in &instructions {
        for word in i.rest.split_whitespace() {
            if let Some(stage) = word.strip_prefix("--from=") {
                assert!(
                    stages.iter().any(|(_, n)| n.as_deref() == Some(stage)),
                    "{} --from={stage}: no such stage",
                    i.keyword
                );
            }
        }
        assert!(
            matches!(
                i.keyword.as_str(),
                "FROM"
                    | "RUN"
                    | "COPY"
                    | "ENV"
                    | "ARG"
                    | "WORKDIR"
                    | "USER"
                    | "CMD"
                    | "ENTRYPOINT"
                    | "EXPOSE"
                    | "LABEL"
                    | "HEALTHCHECK"
                    | "STOPSIGNAL"
            ),
            "unknown instruction {}",
            i.keyword
        );
    }

    // One build of the three binaries, offline SQL, cached.
    let build: Vec<&Instruction> = instructions
        .iter()
        .filter(|i| i.keyword == "RUN" && i.rest.contains("cargo build"))
        .collect();
    assert_eq!(build.len(), 1, "one cargo build");
    let build = &build[0].rest;
    for flag in ["--release", "--locked"] {
        assert!(build.contains(flag), "cargo build {flag}");
    }
    for target in ["/usr/local/cargo/registry", "/src/target"] {
        assert!(
            build.contains("--mount=type=cache,") && build.contains(&format!("target={target}")),
            "a cache mount of {target}"
        );
    }
    let bins = workspace_bins();
    for bin in ["orchestrator", "worker", "simulator"] {
        assert!(build.contains(&format!("--bin {bin}")), "builds {bin}");
        assert!(
            bins.contains(bin),
            "{bin} is not a binary of the workspace: {bins:?}"
        );
        assert!(
            instructions.iter().any(|i| i.keyword == "COPY"
                && i.rest.contains(&format!("/out/{bin}"))
                && i.rest.ends_with("/usr/local/bin/")),
            "{bin} in /usr/local/bin"
        );
    }
    let builder_env: Vec<&Instruction> = instructions
        .iter()
        .take_while(|i| !(i.keyword == "FROM" && i.rest.contains(runtime.as_str())))
        .filter(|i| i.keyword == "ENV")
        .collect();
    assert!(
        builder_env
            .iter()
            .any(|i| i.rest.split_whitespace().any(|w| w == "SQLX_OFFLINE=true")),
        "the builder checks SQL against .sqlx/ (SQLX_OFFLINE=true)"
    );

    // A numeric non-root user, set after the last RUN (nothing runs as root after it).
    let users: Vec<usize> = (0..instructions.len())
        .filter(|&n| instructions[n].keyword == "USER")
        .collect();
    let last_user = *users.last().expect("a USER");
    let user = &instructions[last_user].rest;
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("USER {user}: numeric, so that runAsNonRoot can check it"));
    assert_eq!(uid, 10001, "uid 10001");
    assert!(
        !instructions[last_user..].iter().any(|i| i.keyword == "RUN"),
        "no RUN after USER"
    );
    let cmd = instructions
        .iter()
        .rfind(|i| i.keyword == "CMD" || i.keyword == "ENTRYPOINT")
        .expect("a default command");
    let cmd: Vec<String> = serde_json::from_str(&cmd.rest).expect("CMD in exec form");
    assert_eq!(cmd, ["orchestrator"]);

    // What it copies exists and reaches the build.
    let ignore: Vec<String> = std::fs::read_to_string(root().join(".dockerignore"))
        .expect(".dockerignore at the context's root")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for excluded in [
        "target/debug/x",
        ".git/HEAD",
        "deploy/k8s/base/kustomization.yaml",
    ] {
        assert!(
            !sent_to_build(&ignore, excluded),
            "{excluded} is sent to the build"
        );
    }
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        ".sqlx",
        "migrations/0001_init.sql",
        "tests/Cargo.toml",
    ] {
        assert!(
            sent_to_build(&ignore, needed),
            "{needed} is not sent to the build"
        );
    }
    for i in instructions
        .iter()
        .filter(|i| i.keyword == "COPY" && !i.rest.contains("--from="))
    {
        let words: Vec<&str> = i
            .rest
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for source in &words[..words.len() - 1] {
            if *source == "." {
                continue;
            }
            assert!(root().join(source).exists(), "COPY {source}: no such file");
            assert!(
                sent_to_build(&ignore, source),
                "COPY {source}: .dockerignore leaves it out"
            );
        }
    }

    docker_build_where_an_engine_answers();
}

/// `docker build` and a look inside the image, where a Docker engine answers.
fn docker_build_where_an_engine_answers() {
    let info = Command::new("docker").arg("info").output();
    match info {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr);
            eprintln!(
                "skipped: docker build (no Docker engine answers `docker info`: {})",
                why.lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("skipped: docker build (no docker client: {e})");
            return;
        }
    }
    let tag = "saga-orchestrator:manifests-test";
    let status = Command::new("docker")
        .args(["build", "-f", "deploy/container/Dockerfile", "-t", tag, "."])
        .current_dir(root())
        .status()
        .expect("docker build runs");
    assert!(status.success(), "docker build failed");
    let run = |args: &[&str]| {
        let out = Command::new("docker")
            .args(["run", "--rm", tag])
            .args(args)
            .output()
            .expect("docker run runs");
        assert!(
            out.status.success(),
            "docker run {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(run(&["id", "-u"]).trim(), "10001");
    for bin in ["orchestrator", "worker", "simulator"] {
        run(&[bin, "--help"]);
    }
    run(&[
        "test",
        "-r",
        "/usr/share/saga-orchestrator/demo-catalog.json",
    ]);
}

#[test]
fn the_images_healthcheck_script_answers_by_the_status() {
    let script = root().join("deploy/container/saga-healthcheck");
    let serve = |status: &'static str| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // The whole request (the script may write it in pieces): closing a socket with
            // unread data resets the connection, and the answer with it.
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut buf).unwrap();
                assert!(n > 0, "the request ends with an empty line");
                request.extend_from_slice(&buf[..n]);
            }
            let request = String::from_utf8_lossy(&request).into_owned();
            write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").unwrap();
            request
        });
        (port, server)
    };
    for (status, path, healthy) in [
        ("200 OK", "/healthz", true),
        ("503 Service Unavailable", "/readyz", false),
    ] {
        let (port, server) = serve(status);
        let ok = Command::new("bash")
            .arg(&script)
            .arg(port.to_string())
            .arg(path)
            .status()
            .unwrap()
            .success();
        let request = server.join().unwrap();
        assert!(
            request.starts_with(&format!("GET {path} HTTP/1.0\r\n")),
            "{request:?}"
        );
        assert_eq!(ok, healthy, "{status}");
    }
    // Nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ok = Command::new("bash")
        .arg(&script)
        .arg(port.to_string())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(!ok, "a closed port is not healthy");
}

// ---- settings -----------------------------------------------------------------------------

/// Load a process's settings with the binary's own loader, from the environment a container
/// gives it; panics with the loader's message.
fn load_settings(what: &str, command: &[String], env: &BTreeMap<String, String>) -> Loaded {
    match command.first().map(String::as_str) {
        Some("orchestrator") => Loaded::Orchestrator(Box::new(
            orchestrator::config::Settings::load_from(env.clone())
                .unwrap_or_else(|e| panic!("{what}: the orchestrator refuses its settings: {e}")),
        )),
        Some("worker") => Loaded::Worker(Box::new(
            workers::config::Settings::load_from(env.clone())
                .unwrap_or_else(|e| panic!("{what}: the worker refuses its settings: {e}")),
        )),
        Some("simulator") => Loaded::Simulator,
        other => panic!("{what}: runs {other:?}, not a binary of the image"),
    }
}

enum Loaded {
    Orchestrator(Box<orchestrator::config::Settings>),
    Worker(Box<workers::config::Settings>),
    Simulator,
}

impl Loaded {
    fn nats(&self) -> Option<&runtime::config::Nats> {
        match self {
            Loaded::Orchestrator(s) => Some(&s.nats),
            Loaded::Worker(s) => Some(&s.nats),
            Loaded::Simulator => None,
        }
    }
}

/// `$(NAME)` references expanded as Kubernetes does: from the variables defined before.
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) if env.contains_key(&after[..end]) => {
                out.push_str(&env[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A directory holding a stand-in of every file of production's TLS Secret: a CA certificate
/// of the test's own (the loader reads and parses them).
fn tls_stand_ins() -> String {
    let dir = std::env::temp_dir().join(format!("saga-manifests-tls-{}", std::process::id()));
    if !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = ca.self_signed(&key).unwrap().pem();
        for file in PRODUCTION_TLS_FILES {
            std::fs::write(dir.join(file), &pem).unwrap();
        }
    }
    dir.display().to_string()
}

// ---- Kubernetes -------------------------------------------------------------------------

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("a selector");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels[k] == *v)
}

/// A container port by number or name.
fn port_of(container: &Value, port: &Value) -> u64 {
    match port {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(name) => container["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == *name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port named {name}")),
        _ => panic!("a port is a number or a name: {port}"),
    }
}

fn http_probe(container: &Value, probe: &str) -> (String, u64) {
    let get = &container[probe]["httpGet"];
    assert!(get.is_object(), "{probe}: an HTTP GET");
    (
        get["path"].as_str().unwrap().to_owned(),
        port_of(container, &get["port"]),
    )
}

/// The value of a Secret's key in the render, or the production overlay's stand-in for a
/// Secret created out of band.
fn secret_value(
    r: &Rendered,
    name: &str,
    key: &str,
    external: &mut BTreeSet<(String, String)>,
) -> String {
    if let Some(secret) = r.find("Secret", name) {
        if let Some(v) = secret["stringData"][key].as_str() {
            return v.to_owned();
        }
        panic!(
            "{}: Secret {name} has no key {key} (in stringData)",
            r.overlay
        );
    }
    assert!(
        r.overlay == "production" && name == PRODUCTION_SECRET,
        "{}: no Secret {name}",
        r.overlay
    );
    external.insert((name.to_owned(), key.to_owned()));
    PRODUCTION_SECRET_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| {
            panic!("production reads {name}.{key}, which deploy/README.md does not list")
        })
        .1
        .to_owned()
}

/// The environment a container of the image starts with: the image's, then `envFrom`, then
/// `env` in order (with `$(NAME)` expanded).
fn container_env(
    r: &Rendered,
    container: &Value,
    external: &mut BTreeSet<(String, String)>,
) -> BTreeMap<String, String> {
    let mut env = image_env();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let (kind, field, name) = match (
            from["configMapRef"]["name"].as_str(),
            from["secretRef"]["name"].as_str(),
        ) {
            (Some(name), None) => ("ConfigMap", "data", name),
            (None, Some(name)) => ("Secret", "stringData", name),
            _ => panic!("{}: envFrom of a ConfigMap or a Secret: {from}", r.overlay),
        };
        let source = r
            .all(kind)
            .find(|m| m["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: envFrom names no {kind} {name}", r.overlay));
        for (k, v) in source[field].as_object().unwrap() {
            env.insert(k.clone(), v.as_str().unwrap().to_owned());
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = var["value"].as_str() {
            expand(v, &env)
        } else if let Some(key) = var["valueFrom"]["secretKeyRef"].as_object() {
            secret_value(
                r,
                key["name"].as_str().unwrap(),
                key["key"].as_str().unwrap(),
                external,
            )
        } else {
            panic!("{}: {name}: a value or a Secret's key", r.overlay);
        };
        env.insert(name, value);
    }
    env
}

#[test]
fn every_overlay_renders_into_valid_kubernetes_objects_that_fit_together() {
    for r in &render_all() {
        let overlay = r.overlay;
        let namespace = r.get(
            "Namespace",
            if overlay == "dev" { "saga-dev" } else { "saga" },
        );
        for o in &r.objects {
            if o["kind"] != "Namespace" {
                assert_eq!(
                    o["metadata"]["namespace"], namespace["metadata"]["name"],
                    "{overlay}: {} {} in the overlay's namespace",
                    o["kind"], o["metadata"]["name"]
                );
            }
        }
        check_pods(r);
        check_workloads(r);
        if overlay == "dev" {
            check_dev_backing_services(r);
        }
    }
    let _ = std::fs::remove_dir_all(tls_stand_ins());
}

/// Every pod: what it names exists, it runs as the image's user without privileges, its probes
/// reach its process, and the image's processes' settings load.
fn check_pods(r: &Rendered) {
    let overlay = r.overlay;
    let mut external = BTreeSet::new();
    for (kind, name, template) in r.pods() {
        let spec = &template["spec"];
        let what = format!("{overlay}: {kind} {name}");
        let volumes: BTreeMap<String, &Value> = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| (v["name"].as_str().unwrap().to_owned(), v))
            .collect();
        // A StatefulSet's claims are volumes of its pods too.
        let claims: BTreeSet<String> = r.get(kind, name)["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        for (vname, v) in &volumes {
            if let Some(secret) = v["secret"]["secretName"].as_str()
                && r.find("Secret", secret).is_none()
            {
                assert!(
                    overlay == "production" && secret == PRODUCTION_TLS_SECRET,
                    "{what}: volume {vname} of a Secret {secret} that is not there"
                );
            }
        }
        for container in spec["containers"].as_array().unwrap() {
            let image = container["image"].as_str().unwrap();
            for mount in container["volumeMounts"].as_array().into_iter().flatten() {
                let mount_name = mount["name"].as_str().unwrap();
                assert!(
                    volumes.contains_key(mount_name) || claims.contains(mount_name),
                    "{what}: {mount}: no such volume"
                );
            }
            let env = container_env(r, container, &mut external);
            if !image.contains("saga-orchestrator") {
                continue;
            }
            assert_eq!(
                container["name"], "saga",
                "{what}: the image's container is `saga`"
            );
            match overlay {
                "dev" => assert_eq!(image, "saga-orchestrator:dev"),
                _ => assert!(
                    image.ends_with(":0.1.0") && image.contains('/'),
                    "{what}: {image}"
                ),
            }
            // Non-root, as the image's user, without privileges.
            assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
            assert_eq!(spec["securityContext"]["runAsUser"], 10001, "{what}");
            let sc = &container["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{what}"
            );
            let mut command = strings(&container["command"]);
            command.extend(strings(&container["args"]));
            for (k, v) in &env {
                assert!(
                    !v.contains("$("),
                    "{what}: {k} refers to an undefined variable: {v}"
                );
                assert!(
                    !v.contains(".invalid"),
                    "{what}: {k} is still the base's placeholder {v}"
                );
            }
            // Production's TLS files are a Secret mounted in the pod: here, stand-ins of
            // them in a directory of the test's, where the loader reads them.
            let tls_dir = container["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| {
                    volumes
                        .get(m["name"].as_str().unwrap())
                        .is_some_and(|v| v["secret"]["secretName"] == PRODUCTION_TLS_SECRET)
                })
                .map(|m| m["mountPath"].as_str().unwrap().to_owned());
            let loaded = match &tls_dir {
                None => load_settings(&what, &command, &env),
                Some(dir) => {
                    let stand_in = tls_stand_ins();
                    let env = env
                        .iter()
                        .map(|(k, v)| (k.clone(), v.replace(dir.as_str(), &stand_in)))
                        .collect();
                    load_settings(&what, &command, &env)
                }
            };
            if let Some(nats) = loaded.nats() {
                let servers: Vec<&str> = nats.url.split(',').collect();
                match overlay {
                    "dev" => {
                        assert_eq!(nats.replicas, 1, "{what}: one NATS node, R1");
                        assert_eq!(servers, ["nats://nats:4222"], "{what}");
                    }
                    _ => {
                        assert_eq!(nats.replicas, 3, "{what}: R3");
                        assert_eq!(servers.len(), 3, "{what}: the three nodes");
                        assert!(servers.iter().all(|s| s.starts_with("tls://")), "{what}");
                        assert!(nats.tls_required, "{what}: TLS required");
                    }
                }
            }
            if overlay == "production" {
                // TLS files from the mounted Secret; PostgreSQL verified against its CA.
                let tls_dir = tls_dir
                    .unwrap_or_else(|| panic!("{what}: {PRODUCTION_TLS_SECRET} is not mounted"));
                let url = &env["DATABASE_URL"];
                assert!(url.contains("sslmode=verify-full"), "{what}: {url}");
                assert!(
                    url.contains("target_session_attrs=read-write"),
                    "{what}: {url}"
                );
                let root_cert = url
                    .split(['?', '&'])
                    .find_map(|p| p.strip_prefix("sslrootcert="))
                    .unwrap_or_else(|| panic!("{what}: no sslrootcert in {url}"));
                let mut files = vec![root_cert];
                if loaded.nats().is_some() {
                    files.push(&env["SAGA_NATS__TLS_CA_FILE"]);
                }
                for file in files {
                    let name = file
                        .strip_prefix(&format!("{tls_dir}/"))
                        .unwrap_or_else(|| panic!("{what}: {file} is not in {tls_dir}"));
                    assert!(
                        PRODUCTION_TLS_FILES.contains(&name),
                        "{what}: {name} is not documented"
                    );
                }
            }
            match &loaded {
                Loaded::Orchestrator(s) if command.get(1).is_none_or(|c| c == "serve") => {
                    assert_eq!(kind, "Deployment", "{what}");
                    let port = s.http.port as u64;
                    assert_eq!(
                        http_probe(container, "readinessProbe"),
                        ("/readyz".into(), port),
                        "{what}"
                    );
                    assert_eq!(
                        http_probe(container, "livenessProbe"),
                        ("/healthz".into(), port),
                        "{what}"
                    );
                    // The partitions' handover: preStop, then time to release the leases.
                    assert!(
                        container["lifecycle"]["preStop"].is_object(),
                        "{what}: a preStop hook"
                    );
                    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
                    assert!(grace * 1000 > s.partitions.lease_ms, "{what}: {grace} s");
                    assert_eq!(
                        template["metadata"]["annotations"]["prometheus.io/port"],
                        port.to_string()
                    );
                }
                Loaded::Orchestrator(_) => {
                    assert_eq!(command, ["orchestrator", "migrate"], "{what}");
                    assert_eq!(kind, "Job", "{what}");
                }
                Loaded::Worker(s) if command.len() == 2 => {
                    assert!(POOLS.contains(&command[1].as_str()), "{what}: {command:?}");
                    assert_eq!(
                        name, command[1],
                        "{what}: a pool's Deployment is named as the pool"
                    );
                    assert_eq!(s.health.port, u32::from(HEALTH_PORT), "{what}");
                    let port = u64::from(HEALTH_PORT);
                    assert_eq!(
                        http_probe(container, "readinessProbe"),
                        ("/readyz".into(), port),
                        "{what}"
                    );
                    assert_eq!(
                        http_probe(container, "livenessProbe"),
                        ("/healthz".into(), port),
                        "{what}"
                    );
                    let a = &template["metadata"]["annotations"];
                    assert_eq!(a["prometheus.io/scrape"], "true", "{what}");
                    assert_eq!(a["prometheus.io/port"], HEALTH_PORT.to_string(), "{what}");
                    assert_eq!(a["prometheus.io/path"], "/metrics", "{what}");
                    if command[1] == "shipping" {
                        assert_eq!(
                            port_of(container, &"callbacks".into()),
                            u64::from(s.callbacks.port)
                        );
                    }
                    if command[1] == "product" {
                        assert_eq!(
                            port_of(container, &"api".into()),
                            u64::from(s.product.api_port)
                        );
                    }
                }
                Loaded::Worker(_) => {
                    assert_eq!(command[..3], ["worker", "product", "--load"], "{what}");
                    assert_eq!(overlay, "dev", "{what}: the demo catalogue in dev only");
                }
                Loaded::Simulator => {
                    assert_eq!(overlay, "dev", "{what}: the simulator in dev only")
                }
            }
        }
    }
    if overlay == "production" {
        let expected: BTreeSet<(String, String)> = PRODUCTION_SECRET_KEYS
            .iter()
            .map(|(k, _)| (PRODUCTION_SECRET.to_owned(), (*k).to_owned()))
            .collect();
        assert_eq!(
            external, expected,
            "production: the keys of {PRODUCTION_SECRET} it reads"
        );
        assert_eq!(
            r.all("Secret").count(),
            0,
            "production: no Secret applied from the repository"
        );
    }
}

/// Each pool and the orchestrator: their Deployment, Service, budget and, in production, scaler.
fn check_workloads(r: &Rendered) {
    let overlay = r.overlay;
    let pods = r.pods();
    let template = |name: &str| {
        pods.iter()
            .find(|(k, n, _)| *k == "Deployment" && *n == name)
            .unwrap_or_else(|| panic!("{overlay}: no Deployment {name}"))
            .2
    };
    for o in r.all("Service") {
        let name = &o["metadata"]["name"];
        let (_, _, t) = pods
            .iter()
            .find(|(_, _, t)| selects(&o["spec"]["selector"], &t["metadata"]["labels"]))
            .unwrap_or_else(|| panic!("{overlay}: Service {name} selects no pod"));
        let container = &t["spec"]["containers"][0];
        for p in o["spec"]["ports"].as_array().unwrap() {
            port_of(container, &p["targetPort"]);
        }
    }
    for o in r.all("PodDisruptionBudget") {
        let name = o["metadata"]["name"].as_str().unwrap();
        let t = template(name);
        assert!(
            selects(
                &o["spec"]["selector"]["matchLabels"],
                &t["metadata"]["labels"]
            ),
            "{overlay}: PDB {name}"
        );
    }
    let orchestrators = r.get("Deployment", "orchestrator")["spec"]["replicas"]
        .as_u64()
        .unwrap();
    match overlay {
        "dev" => {
            assert_eq!(orchestrators, 1);
            assert!(
                r.find("PodDisruptionBudget", "orchestrator").is_none(),
                "dev: one orchestrator, no budget"
            );
        }
        _ => {
            assert!(
                orchestrators >= 2,
                "production: orchestrators to fail over to"
            );
            assert_eq!(
                r.get("PodDisruptionBudget", "orchestrator")["spec"]["minAvailable"],
                1
            );
        }
    }
    let concurrency: u64 = r.config_map("saga-worker-config")["data"]["SAGA_WORKER__CONCURRENCY"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let prefix = r.config_map("saga-config")["data"]["SAGA_NATS__PREFIX"]
        .as_str()
        .expect("the prefix is set");
    let subjects = sagas::wire::Subjects::new(prefix).unwrap();
    let services = sagas::shop_types().services();
    for pool in POOLS {
        let t = template(pool);
        assert!(
            r.get("Deployment", pool)["spec"]["replicas"].is_null(),
            "{overlay}: {pool}'s replicas are the autoscaler's (or one)"
        );
        assert_eq!(
            r.get("PodDisruptionBudget", pool)["spec"]["maxUnavailable"],
            1,
            "{overlay}: {pool}"
        );
        assert!(
            t["spec"]["containers"][0]["resources"]["requests"]["cpu"].is_string(),
            "{overlay}: {pool}"
        );
        let scaler = r.find("ScaledObject", pool);
        if overlay == "dev" {
            assert!(scaler.is_none(), "dev runs without KEDA");
            continue;
        }
        let scaler = scaler.unwrap_or_else(|| panic!("production: no ScaledObject for {pool}"));
        let spec = &scaler["spec"];
        assert_eq!(spec["scaleTargetRef"]["name"], *pool);
        let (min, max) = (
            spec["minReplicaCount"].as_u64().unwrap(),
            spec["maxReplicaCount"].as_u64().unwrap(),
        );
        assert!(min >= 1 && max >= min, "{pool}: {min}..{max}");
        let trigger = &spec["triggers"][0];
        assert_eq!(
            spec["triggers"].as_array().unwrap().len(),
            1,
            "{pool}: one trigger"
        );
        // The stream and consumer the orchestrator declares for the pool.
        let (role, consumer) = if services.contains(pool) {
            (
                orchestrator::topology::streams::COMMANDS,
                sagas::wire::consumers::commands(pool),
            )
        } else if *pool == "notification" {
            (
                orchestrator::topology::streams::EVENTS,
                sagas::wire::consumers::NOTIFICATION_EVENTS,
            )
        } else if *pool == "order" {
            (
                orchestrator::topology::streams::EVENTS,
                sagas::wire::consumers::ORDER_EVENTS,
            )
        } else {
            assert_eq!(
                trigger["type"], "cpu",
                "{pool} has no consumer: it scales on CPU"
            );
            continue;
        };
        assert_eq!(trigger["type"], "nats-jetstream", "{pool}");
        let m = &trigger["metadata"];
        assert_eq!(m["stream"], subjects.stream(role), "{pool}");
        assert_eq!(m["consumer"], consumer, "{pool}");
        assert_eq!(m["account"], "$G", "{pool}");
        let lag: u64 = m["lagThreshold"].as_str().unwrap().parse().unwrap();
        assert!(
            lag > concurrency,
            "{pool}: lagThreshold {lag} must exceed what one replica holds in flight ({concurrency})"
        );
    }
    for o in r.all("ScaledObject") {
        assert!(
            POOLS.contains(&o["metadata"]["name"].as_str().unwrap()),
            "{overlay}: a ScaledObject of no pool: {}",
            o["metadata"]["name"]
        );
    }
}

/// The dev overlay's own PostgreSQL and NATS take the credentials the processes are given.
fn check_dev_backing_services(r: &Rendered) {
    // The dev PostgreSQL's password is the one in the processes' DATABASE_URL, and its
    // NATS takes the processes' user and password.
    let pg = r.get("Secret", "postgres-dev")["stringData"].clone();
    let url = r.get("Secret", "saga-secrets")["stringData"]["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_owned();
    let expected = format!(
        "postgres://{}:{}@postgres:5432/",
        pg["POSTGRES_USER"].as_str().unwrap(),
        pg["POSTGRES_PASSWORD"].as_str().unwrap()
    );
    assert!(
        url.starts_with(&expected),
        "dev: {url} is not the dev PostgreSQL's"
    );
    // The simulated third parties.
    r.get("Deployment", "simulator");
    let nats = &r.get("StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&nats["args"]);
    assert!(args.contains(&"--jetstream".to_owned()), "{args:?}");
    let refs: Vec<&str> = nats["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap())
        .collect();
    assert_eq!(refs, ["SAGA_NATS__USER", "SAGA_NATS__PASSWORD"]);
}

// ---- compose ----------------------------------------------------------------------------

/// KEY=VALUE lines.
fn dotenv(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=VALUE");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Compose's interpolation of a string: `${NAME}`, `${NAME:-default}`, `${NAME-default}`,
/// `${NAME:?message}`, `${NAME?message}`, `$$`. A variable that is not set and has no default
/// fails (compose would substitute an empty string, with a warning).
fn interpolate(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {s}"));
            let expr = &body[..end];
            let name_end = expr
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_end);
            let value = vars
                .get(name)
                .filter(|v| !(op.starts_with(':') && v.is_empty()));
            let resolved = match (value, op) {
                (Some(v), _) => v.clone(),
                (None, op) if op.starts_with(":-") || op.starts_with('-') => {
                    op.trim_start_matches(':')[1..].to_owned()
                }
                (None, op) if op.starts_with(":?") || op.starts_with('?') => {
                    panic!(
                        "{name} is required: {}",
                        op.trim_start_matches(':')[1..].to_owned()
                    )
                }
                (None, _) => panic!("{name} is not set in .env.example and has no default"),
            };
            out.push_str(&resolved);
            rest = &body[end + 1..];
        } else {
            let name_end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            assert!(name_end > 0, "a lone $ in {s}: write $$");
            out.push_str(vars.get(&after[..name_end]).expect("a set variable"));
            rest = &after[name_end..];
        }
    }
    out.push_str(rest);
    out
}

fn interpolate_all(v: &Value, vars: &BTreeMap<String, String>) -> Value {
    match v {
        Value::String(s) => Value::String(interpolate(s, vars)),
        Value::Array(a) => Value::Array(a.iter().map(|v| interpolate_all(v, vars)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), interpolate_all(v, vars)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[test]
fn the_compose_file_follows_the_compose_spec_and_fits_together() {
    let dir = root().join("deploy/compose");
    let file = dir.join("compose.yaml");
    let raw = run_python(YAML_TO_JSON, &[file.to_str().unwrap()]);
    let raw = &raw.as_array().expect("YAML documents")[..];
    assert_eq!(raw.len(), 1, "one document");
    let vars = dotenv(&dir.join(".env.example"));
    let compose = interpolate_all(&raw[0], &vars);
    let spec = validator(&dir.join("compose_spec.json"));
    let errors: Vec<String> = spec
        .iter_errors(&compose)
        .map(|e| format!("{e} (at {})", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "compose.yaml breaks the Compose Specification: {errors:#?}"
    );

    // Nothing secret written in the file: every secret comes from the environment.
    let text = std::fs::read_to_string(&file).unwrap();
    for key in ["POSTGRES_PASSWORD", "NATS_PASSWORD", "SAGA_ADMIN__TOKENS"] {
        let example = &vars[key];
        assert!(
            !text.contains(example.as_str()),
            "compose.yaml holds {key}'s value"
        );
    }

    match Command::new("docker").args(["compose", "version"]).output() {
        Ok(o) if o.status.success() => {
            let out = Command::new("docker")
                .args(["compose", "-f"])
                .arg(&file)
                .arg("--env-file")
                .arg(dir.join(".env.example"))
                .args(["config", "--quiet"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "docker compose config: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        _ => eprintln!(
            "skipped: docker compose config (`docker compose version` does not answer); validated against the vendored schema"
        ),
    }

    let services = compose["services"].as_object().unwrap();
    let service = |name: &str| {
        services
            .get(name)
            .unwrap_or_else(|| panic!("no service {name}"))
    };
    let command = |s: &Value| strings(&s["command"]);
    assert!(
        service("postgres")["image"]
            .as_str()
            .unwrap()
            .starts_with("postgres:15")
    );
    // Three NATS nodes, one cluster, each with its own store.
    let nodes = ["nats-1", "nats-2", "nats-3"];
    let mut stores = BTreeSet::new();
    for node in nodes {
        let s = service(node);
        assert!(
            s["image"].as_str().unwrap().starts_with("nats:2.10"),
            "{node}"
        );
        let args = command(s);
        for flag in [
            "--jetstream",
            "--cluster_name=saga",
            &format!("--name={node}"),
        ] {
            assert!(args.contains(&flag.to_owned()), "{node}: {flag}");
        }
        let routes = args
            .iter()
            .find_map(|a| a.strip_prefix("--routes="))
            .expect("routes");
        for other in nodes {
            assert!(
                routes.contains(&format!("nats://{other}:6222")),
                "{node}: a route to {other}"
            );
        }
        let volumes = strings(&s["volumes"]);
        assert_eq!(volumes.len(), 1);
        stores.insert(volumes[0].split(':').next().unwrap().to_owned());
    }
    assert_eq!(stores.len(), 3, "a store per node: {stores:?}");
    for (name, s) in services {
        for dep in s["depends_on"]
            .as_object()
            .into_iter()
            .flat_map(|d| d.keys())
        {
            assert!(
                services.contains_key(dep),
                "{name} depends on no service {dep}"
            );
        }
    }
    assert_eq!(command(service("migrate")), ["orchestrator", "migrate"]);
    assert_eq!(service("migrate")["restart"], "no");
    assert_eq!(
        service("orchestrator")["deploy"]["replicas"],
        2,
        "two orchestrators"
    );

    let mut pools = BTreeSet::new();
    for (name, s) in services {
        if !s["image"]
            .as_str()
            .unwrap_or_default()
            .starts_with("saga-orchestrator")
        {
            continue;
        }
        let what = format!("compose: {name}");
        let mut env = image_env();
        for (k, v) in s["environment"].as_object().unwrap() {
            env.insert(
                k.clone(),
                v.as_str()
                    .unwrap_or_else(|| panic!("{what}: {k} as a string"))
                    .to_owned(),
            );
        }
        let argv = command(s);
        let loaded = load_settings(&what, &argv, &env);
        if let Some(nats) = loaded.nats() {
            assert_eq!(nats.replicas, 3, "{what}: streams on the three nodes");
            let servers: Vec<&str> = nats.url.split(',').collect();
            assert_eq!(servers, nodes.map(|n| format!("nats://{n}:4222")), "{what}");
        }
        assert!(env.contains_key("SAGA_PARTITIONS__COUNT"), "{what}");
        let health = strings(&s["healthcheck"]["test"]);
        match &loaded {
            Loaded::Orchestrator(s) if argv[1] == "serve" => {
                assert_eq!(
                    health,
                    [
                        "CMD",
                        "saga-healthcheck",
                        &s.http.port.to_string(),
                        "/healthz"
                    ],
                    "{what}"
                );
            }
            Loaded::Worker(w) if argv.len() == 2 => {
                pools.insert(argv[1].clone());
                assert_eq!(
                    name, &argv[1],
                    "{what}: a pool's service is named as the pool"
                );
                assert_eq!(w.health.port, u32::from(HEALTH_PORT));
                assert_eq!(
                    health,
                    [
                        "CMD",
                        "saga-healthcheck",
                        &HEALTH_PORT.to_string(),
                        "/healthz"
                    ],
                    "{what}"
                );
            }
            Loaded::Simulator => {
                assert_eq!(
                    health,
                    ["CMD", "saga-healthcheck", "8090", "/healthz"],
                    "{what}"
                );
            }
            _ => assert!(health.is_empty(), "{what}: a one-shot service"),
        }
    }
    assert_eq!(
        pools,
        POOLS.iter().map(|p| (*p).to_owned()).collect(),
        "a service per pool"
    );
}

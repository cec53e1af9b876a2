//! NATS with TLS and credentials, as a clustered deployment runs it: a nats-server of the
//! test's own that requires TLS (its certificate signed by the test's own CA), a client
//! certificate and a user and password. `runtime::nats` connects with the settings every
//! process reads (`SAGA_NATS__*`) and publishes to JetStream; a wrong password, a missing CA or
//! a missing client certificate fails at once with an error that says so; a file that cannot be
//! read stops a process at start-up (status 2) with the key named; no secret is printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_nats::ConnectErrorKind;
use e2e::Nats;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use runtime::config::testing::{assert_refused, env};
use runtime::nats::Error;

const USER: &str = "saga";
const PASSWORD: &str = "correct-horse-battery";

/// A CA, the server's certificate (for 127.0.0.1) and a client's, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn generate(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "saga test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, &ca_key);
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let leaf = |names: &[&str], usage: ExtendedKeyUsagePurpose, name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            (
                write(&format!("{name}.pem"), cert.pem()),
                write(&format!("{name}.key"), key.serialize_pem()),
            )
        };
        let (server_cert, server_key) = leaf(
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        let (client_cert, client_key) = leaf(
            &["saga-client"],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        Pki {
            ca: write("ca.pem", ca_pem),
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }
}

/// A server that requires TLS with a client certificate, and a user and password.
async fn secured_server(pki: &Pki) -> Nats {
    Nats::start_with_config(&format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}\n\
         authorization {{\n  user: {USER:?}\n  password: {PASSWORD:?}\n}}\n",
        pki.server_cert, pki.server_key, pki.ca
    ))
    .await
}

/// The environment of a process that reaches `url` with everything it needs (the caller takes
/// out or changes what a case leaves out).
fn full_env(url: &str, pki: &Pki) -> BTreeMap<String, String> {
    let path = |p: &PathBuf| p.to_str().unwrap().to_owned();
    env(&[
        ("NATS_URL", url),
        ("SAGA_NATS__PREFIX", "tls"),
        ("SAGA_NATS__USER", USER),
        ("SAGA_NATS__PASSWORD", PASSWORD),
        ("SAGA_NATS__TLS_CA_FILE", &path(&pki.ca)),
        ("SAGA_NATS__TLS_CERT_FILE", &path(&pki.client_cert)),
        ("SAGA_NATS__TLS_KEY_FILE", &path(&pki.client_key)),
        ("SAGA_NATS__TLS_REQUIRED", "true"),
    ])
}

fn settings(env: BTreeMap<String, String>) -> runtime::config::Nats {
    // The workers read the same keys.
    workers::config::Settings::load_from(env.clone()).expect("the workers' settings load");
    orchestrator::config::Settings::load_from(env)
        .expect("the orchestrator's settings load")
        .nats
}

fn connect_error(result: Result<impl Sized, Error>) -> async_nats::ConnectError {
    match result {
        Err(Error::Connect { source, servers }) => {
            assert!(!servers.contains(PASSWORD), "{servers}");
            source
        }
        Err(e) => panic!("not a connect error: {e}"),
        Ok(_) => panic!("connected"),
    }
}

#[tokio::test]
async fn tls_and_a_password_connect_and_publish_to_jetstream() {
    let dir = std::env::temp_dir().join(format!("saga-pki-{}", uuid::Uuid::now_v7().simple()));
    let pki = Pki::generate(&dir);
    let nats = secured_server(&pki).await;
    let s = settings(full_env(&nats.url(), &pki));
    assert!(
        !format!("{s:?}").contains(PASSWORD),
        "the password is printed: {s:?}"
    );

    let (client, js) = runtime::nats::connect(&s, "tls-test")
        .await
        .expect("connects over TLS with a password and a client certificate");
    assert!(client.server_info().tls_required, "the server requires TLS");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "TLS_TEST".into(),
        subjects: vec!["tls.test".into()],
        ..Default::default()
    })
    .await
    .expect("JetStream answers");
    let ack = js
        .publish("tls.test", "over TLS".into())
        .await
        .unwrap()
        .await
        .expect("JetStream acknowledges the publish");
    assert_eq!(ack.stream, "TLS_TEST");

    // The credentials in the URL, with a server of the list that is down.
    let mut in_url = full_env(
        &format!(
            "nats://127.0.0.1:{},nats://{USER}:{PASSWORD}@127.0.0.1:{}",
            e2e::free_port(),
            nats.port
        ),
        &pki,
    );
    in_url.remove("SAGA_NATS__USER");
    in_url.remove("SAGA_NATS__PASSWORD");
    let s = settings(in_url);
    assert!(!format!("{s:?}").contains(PASSWORD), "{s:?}");
    let (client, _) = runtime::nats::connect(&s, "tls-test-url")
        .await
        .expect("connects with the credentials in the URL");
    assert_eq!(client.server_info().port, nats.port);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn what_is_wrong_fails_at_once_and_says_so() {
    let dir = std::env::temp_dir().join(format!("saga-pki-{}", uuid::Uuid::now_v7().simple()));
    let pki = Pki::generate(&dir);
    let nats = secured_server(&pki).await;

    let mut wrong = full_env(&nats.url(), &pki);
    wrong.insert("SAGA_NATS__PASSWORD".into(), "wrong-password".into());
    let s = settings(wrong);
    let e = connect_error(runtime::nats::connect_once(&s, "tls-test").await);
    assert_eq!(e.kind(), ConnectErrorKind::AuthorizationViolation, "{e}");
    assert!(e.to_string().contains("authorization violation"), "{e}");
    // Not retried: the server would say the same again.
    let e = connect_error(runtime::nats::connect(&s, "tls-test").await);
    assert_eq!(e.kind(), ConnectErrorKind::AuthorizationViolation, "{e}");
    eprintln!("a wrong password: {e}");

    // Without the CA the server's certificate is checked against the system's roots, which do
    // not know it.
    let mut no_ca = full_env(&nats.url(), &pki);
    no_ca.remove("SAGA_NATS__TLS_CA_FILE");
    let e = connect_error(runtime::nats::connect_once(&settings(no_ca), "tls-test").await);
    assert!(
        format!("{e:#} {e:?}").contains("UnknownIssuer"),
        "not a certificate error: {e} ({e:?})"
    );
    // Not retried either.
    let mut no_ca = full_env(&nats.url(), &pki);
    no_ca.remove("SAGA_NATS__TLS_CA_FILE");
    let e = connect_error(runtime::nats::connect(&settings(no_ca), "tls-test").await);
    assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");
    eprintln!("without the CA: {e}");

    // Without a client certificate the server refuses the handshake.
    let mut no_cert = full_env(&nats.url(), &pki);
    no_cert.remove("SAGA_NATS__TLS_CERT_FILE");
    no_cert.remove("SAGA_NATS__TLS_KEY_FILE");
    connect_error(runtime::nats::connect_once(&settings(no_cert), "tls-test").await);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn files_that_cannot_be_read_stop_a_process_at_start_up() {
    let missing = "/nonexistent/saga/ca.pem";
    type Load = fn(BTreeMap<String, String>) -> Result<(), runtime::config::Error>;
    let loads: [Load; 2] = [
        |env| orchestrator::config::Settings::load_from(env).map(|_| ()),
        |env| workers::config::Settings::load_from(env).map(|_| ()),
    ];
    for load in loads {
        assert_refused(
            load,
            &[
                ("SAGA_NATS__TLS_CA_FILE", missing, "nats.tls_ca_file"),
                ("SAGA_NATS__TLS_CERT_FILE", missing, "nats.tls_cert_file"),
                ("SAGA_NATS__NKEY_SEED_FILE", missing, "nats.nkey_seed_file"),
                ("SAGA_NATS__CREDS_FILE", missing, "nats.creds_file"),
                ("SAGA_NATS__USER", "saga", "nats.password"),
                ("NATS_URL", "nats://a:b@n1,nats://c:d@n2", "nats.url"),
                ("SAGA_NATS__TLS_REQUIRED", "maybe", "tls_required"),
            ],
        );
    }
    let out = std::process::Command::new(e2e::binary("orchestrator"))
        .arg("config")
        .env("SAGA_NATS__TLS_CA_FILE", missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nats.tls_ca_file") && stderr.contains(missing),
        "{stderr}"
    );

    let out = std::process::Command::new(e2e::binary("orchestrator"))
        .arg("config")
        .env("SAGA_NATS__USER", USER)
        .env("SAGA_NATS__PASSWORD", PASSWORD)
        .env(
            "NATS_URL",
            format!("nats://n1:4222,nats://{USER}:{PASSWORD}@n2:4222"),
        )
        .output()
        .unwrap();
    // Credentials twice: refused, and neither printed.
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let printed = format!("{out:?}");
    assert!(!printed.contains(PASSWORD), "{printed}");
    let out = std::process::Command::new(e2e::binary("orchestrator"))
        .arg("config")
        .env("SAGA_NATS__USER", USER)
        .env("SAGA_NATS__PASSWORD", PASSWORD)
        .env("NATS_URL", "nats://n1:4222,nats://n2:4222")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("n2:4222") && printed.contains(USER),
        "{printed}"
    );
    assert!(!printed.contains(PASSWORD), "{printed}");
}

/// Reconnecting redoes TLS and the password: a consumer (`runtime::consume`) goes on across a
/// restart of the server, and a publish made after it is consumed.
#[tokio::test]
async fn a_consumer_over_tls_goes_on_across_a_server_restart() {
    use async_nats::jetstream::{consumer, stream};
    let dir = std::env::temp_dir().join(format!("saga-pki-{}", uuid::Uuid::now_v7().simple()));
    let pki = Pki::generate(&dir);
    let mut nats = secured_server(&pki).await;
    let (_client, js) = runtime::nats::connect(&settings(full_env(&nats.url(), &pki)), "tls-test")
        .await
        .expect("connects");
    let work = js
        .create_stream(stream::Config {
            name: "TLS_WORK".into(),
            subjects: vec!["tls.work".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    work.create_consumer(consumer::pull::Config {
        durable_name: Some("tls-worker".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ..Default::default()
    })
    .await
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let consuming = tokio::spawn(runtime::consume::consume(
        js.clone(),
        "TLS_WORK".into(),
        "tls-worker",
        4,
        shutdown.clone(),
        move |msg, _| {
            let tx = tx.clone();
            async move {
                let _ = msg.ack().await;
                let _ = tx.send(String::from_utf8_lossy(&msg.payload).into_owned());
            }
        },
    ));
    let publish = |body: &'static str| {
        let js = js.clone();
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let acked = match js.publish("tls.work", body.into()).await {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match acked {
                    Ok(()) => return,
                    Err(e) => {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "{body} was not stored: {e}"
                        );
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    publish("before").await;
    assert_eq!(next(&mut rx).await, "before");
    nats.restart().await;
    publish("after").await;
    assert_eq!(next(&mut rx).await, "after");
    shutdown.cancel();
    consuming.await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(std::time::Duration::from_secs(60), rx.recv())
        .await
        .expect("consumed within a minute")
        .expect("the consumer runs")
}

/// Every process of the shop (the orchestrator, the worker pools, the Product service) over
/// TLS with a password and a client certificate: a checkout completes.
#[tokio::test]
async fn a_checkout_completes_with_every_process_on_tls() {
    let dir = std::env::temp_dir().join(format!("saga-pki-{}", uuid::Uuid::now_v7().simple()));
    let pki = Pki::generate(&dir);
    let nats = secured_server(&pki).await;
    let tls: Vec<(String, String)> = full_env(&nats.url(), &pki)
        .into_iter()
        .filter(|(k, _)| k.starts_with("SAGA_NATS__") && k != "SAGA_NATS__PREFIX")
        .collect();
    let app = e2e::App::spawn_with(e2e::Options {
        nats_url: Some(nats.url()),
        orchestrator_env: tls.clone(),
        worker_env: tls,
        ..Default::default()
    })
    .await;
    let id = app
        .place(&e2e::order(&[("A", 2), ("B", 1)], "tok_visa"))
        .await;
    let saga = app
        .wait_terminal(&id, std::time::Duration::from_secs(60))
        .await;
    assert_eq!(saga["status"], "completed", "{saga:#}");
    drop(app);
    let _ = std::fs::remove_dir_all(&dir);
}

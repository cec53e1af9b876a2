//! NATS: connect to one of the configured servers (several for a cluster), with the
//! credentials and TLS the settings give, retrying while the servers start. Reconnecting, and
//! moving to another server of the cluster when one goes away, are async-nats' own: it learns
//! the cluster's other servers from the one it reached.
//!
//! What the settings say is turned into async-nats' options in one place, [`plan`], which the
//! settings' validation runs too: a file that cannot be read, or that does not hold what it
//! should, stops the process at start-up (status 2) with the key named, not at the first
//! connect.

use std::path::Path;
use std::time::Duration;

use async_nats::rustls::pki_types::pem::PemObject;
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr, jetstream};
use backon::Retryable;

use crate::config;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings cannot be used (a file went missing since they were loaded, say).
    #[error("configuration: {0}")]
    Settings(String),
    #[error("cannot reach NATS at {servers}: {source}")]
    Connect {
        /// The server list, without credentials.
        servers: String,
        source: async_nats::ConnectError,
    },
}

/// What to connect to and how.
pub struct Plan {
    /// Without their credentials (async-nats does not read them from the URL, and would log
    /// them at debug level).
    pub servers: Vec<ServerAddr>,
    pub options: ConnectOptions,
}

/// The server list and the connect options of `settings`, every file read and checked now.
/// Errors name the setting.
pub fn plan(settings: &config::Nats) -> Result<Plan, String> {
    let mut servers = Vec::new();
    let mut from_url: Option<(String, Option<String>)> = None;
    for (i, part) in settings.url.split(',').map(str::trim).enumerate() {
        if part.is_empty() {
            return Err(format!("nats.url: server {} of the list is empty", i + 1));
        }
        let addr: ServerAddr = part.parse().map_err(|e| {
            format!(
                "nats.url: {} is not a NATS server address: {e}",
                config::without_credentials(part)
            )
        })?;
        if let Some(user) = addr.username() {
            let credentials = (percent_decode(user), addr.password().map(percent_decode));
            if from_url.as_ref().is_some_and(|c| *c != credentials) {
                return Err("nats.url: the servers of the list carry different credentials".into());
            }
            from_url = Some(credentials);
        }
        let mut url = addr.into_inner();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        servers.push(ServerAddr::from_url(url).map_err(|e| format!("nats.url: {e}"))?);
    }

    let mut options = ConnectOptions::new();
    let mut ways = Vec::new();
    match (settings.user.is_empty(), settings.password.is_empty()) {
        (true, true) => {}
        (false, false) => {
            if from_url.is_some() {
                return Err(
                    "nats.user: nats.url carries credentials already; give them once".into(),
                );
            }
            ways.push("nats.user");
            options = options.user_and_password(settings.user.clone(), settings.password.clone());
        }
        _ => return Err("nats.user and nats.password go together: set both or neither".into()),
    }
    match from_url {
        Some((user, Some(password))) => {
            ways.push("credentials in nats.url");
            options = options.user_and_password(user, password);
        }
        // `nats://token@host`: NATS's own convention.
        Some((token, None)) => {
            ways.push("a token in nats.url");
            options = options.token(token);
        }
        None => {}
    }
    if let Some(path) = file(&settings.nkey_seed_file) {
        let seed = read(path, "nats.nkey_seed_file")?;
        let seed = seed.trim();
        // The seed itself is never part of a message.
        nkeys::KeyPair::from_seed(seed).map_err(|_| {
            format!(
                "nats.nkey_seed_file: {} does not hold an nkey seed",
                path.display()
            )
        })?;
        ways.push("nats.nkey_seed_file");
        options = options.nkey(seed.to_owned());
    }
    if let Some(path) = file(&settings.creds_file) {
        let creds = read(path, "nats.creds_file")?;
        ways.push("nats.creds_file");
        options = options.credentials(&creds).map_err(|_| {
            format!(
                "nats.creds_file: {} is not a NATS credentials file (a user JWT and its nkey seed)",
                path.display()
            )
        })?;
    }
    if ways.len() > 1 {
        return Err(format!(
            "nats: authenticate one way, not with {}",
            ways.join(" and ")
        ));
    }

    let mut tls = settings.tls_required;
    if let Some(path) = file(&settings.tls_ca_file) {
        certificates(path, "nats.tls_ca_file")?;
        options = options.add_root_certificates(path.to_owned());
        tls = true;
    }
    match (file(&settings.tls_cert_file), file(&settings.tls_key_file)) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            certificates(cert, "nats.tls_cert_file")?;
            read(key, "nats.tls_key_file")?;
            PrivateKeyDer::from_pem_file(key).map_err(|_| {
                format!(
                    "nats.tls_key_file: {} holds no PEM private key",
                    key.display()
                )
            })?;
            options = options.add_client_certificate(cert.to_owned(), key.to_owned());
            tls = true;
        }
        _ => {
            return Err(
                "nats.tls_cert_file and nats.tls_key_file go together: set both or neither".into(),
            );
        }
    }
    Ok(Plan {
        servers,
        options: options.require_tls(tls),
    })
}

fn file(setting: &str) -> Option<&Path> {
    let setting = setting.trim();
    (!setting.is_empty()).then(|| Path::new(setting))
}

fn read(path: &Path, key: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))
}

/// The file holds at least one PEM certificate.
fn certificates(path: &Path, key: &str) -> Result<(), String> {
    read(path, key)?;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("{key}: {} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{key}: {} holds no certificate", path.display()));
    }
    Ok(())
}

/// `%XX` escapes of a URL's user information, decoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Connect once, as `name`, trying each server of the list once: an error says why the last
/// one failed.
pub async fn connect_once(
    settings: &config::Nats,
    name: &str,
) -> Result<(async_nats::Client, jetstream::Context), Error> {
    let Plan { servers, options } = plan(settings).map_err(Error::Settings)?;
    let client = options
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        // Keep trying forever once connected: a restarted server, or another of the cluster,
        // is picked up again.
        .max_reconnects(None)
        .connect(servers)
        .await
        .map_err(|source| Error::Connect {
            servers: config::without_credentials(&settings.url),
            source,
        })?;
    let js = jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(client.clone());
    Ok((client, js))
}

/// Connect as `name`, retrying while the servers start (for about half a minute); credentials
/// the server refuses, and TLS that cannot be set up or whose handshake fails, are not retried:
/// they would fail the same way again.
pub async fn connect(
    settings: &config::Nats,
    name: &str,
) -> Result<(async_nats::Client, jetstream::Context), Error> {
    (|| connect_once(settings, name))
        .retry(crate::db::retry())
        .when(|e| match e {
            Error::Settings(_) => false,
            Error::Connect { source, .. } => !permanent(source),
        })
        .notify(|e: &Error, d| tracing::warn!(error = %e, "NATS not ready; retrying in {d:?}"))
        .await
}

fn permanent(e: &async_nats::ConnectError) -> bool {
    let tls_handshake = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        // rustls's refusals (an unknown issuer, a name that does not match...) come as such.
        .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData);
    tls_handshake
        || matches!(
            e.kind(),
            ConnectErrorKind::AuthorizationViolation
                | ConnectErrorKind::Authentication
                | ConnectErrorKind::Tls
                | ConnectErrorKind::ServerParse
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> config::Nats {
        config::Nats {
            url: url.into(),
            prefix: "shop".into(),
            replicas: 1,
            user: String::new(),
            password: String::new(),
            nkey_seed_file: String::new(),
            creds_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_required: false,
        }
    }

    #[test]
    fn a_list_of_servers_without_their_credentials() {
        let p = plan(&settings(
            "nats://a:b%40c@n1:4222, nats://a:b%40c@n2:4223,n3",
        ))
        .unwrap();
        let urls: Vec<&str> = p.servers.iter().map(|s| s.as_url_str()).collect();
        assert_eq!(urls, ["nats://n1:4222", "nats://n2:4223", "nats://n3"]);
        assert_eq!(p.servers[2].port(), 4222);
        assert_eq!(percent_decode("b%40c%2Cd%zz"), "b@c,d%zz");
    }

    #[test]
    fn what_cannot_be_used_is_named() {
        let cases: Vec<(config::Nats, &str)> = vec![
            (settings("nats://n1,,n2"), "nats.url: server 2"),
            (settings("nats://n1:http"), "nats.url"),
            (
                settings("nats://a:b@n1,nats://a:c@n2"),
                "different credentials",
            ),
            (
                config::Nats {
                    user: "ada".into(),
                    ..settings("nats://n1")
                },
                "nats.user and nats.password",
            ),
            (
                config::Nats {
                    user: "ada".into(),
                    password: "pw".into(),
                    ..settings("nats://a:b@n1")
                },
                "nats.user: nats.url carries credentials",
            ),
            (
                config::Nats {
                    tls_ca_file: "/nonexistent/ca.pem".into(),
                    ..settings("nats://n1")
                },
                "nats.tls_ca_file: cannot read /nonexistent/ca.pem",
            ),
            (
                config::Nats {
                    tls_cert_file: "/nonexistent/c.pem".into(),
                    ..settings("nats://n1")
                },
                "go together",
            ),
            (
                config::Nats {
                    creds_file: "/nonexistent/x.creds".into(),
                    ..settings("nats://n1")
                },
                "nats.creds_file: cannot read",
            ),
            (
                config::Nats {
                    nkey_seed_file: "/nonexistent/seed".into(),
                    ..settings("nats://n1")
                },
                "nats.nkey_seed_file: cannot read",
            ),
            (
                config::Nats {
                    // Readable, but not a seed.
                    nkey_seed_file: concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").into(),
                    ..settings("nats://n1")
                },
                "does not hold an nkey seed",
            ),
            (
                config::Nats {
                    tls_ca_file: concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").into(),
                    ..settings("nats://n1")
                },
                "holds no certificate",
            ),
        ];
        for (s, named) in cases {
            let e = plan(&s)
                .err()
                .unwrap_or_else(|| panic!("{s:?} was accepted"));
            assert!(e.contains(named), "{s:?}: {e} does not name {named}");
            assert!(!e.contains("pw") && !e.contains(":b@"), "{e}");
        }
    }
}

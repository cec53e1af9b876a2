//! libpq's multi-host URLs, which sqlx does not read:
//! `postgres://user:password@h1:5432,h2:5432/db?target_session_attrs=read-write&sslmode=require`.
//! Each host becomes a single-host URL of its own (the same user, database and parameters),
//! which sqlx reads.
//!
//! Must never: put the URL's credentials in an error or a log line (a [`Host`] prints as its
//! address alone).

/// What a host must be for these processes to use it (`target_session_attrs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attrs {
    /// The first host that answers (`any`).
    Any,
    /// A primary that takes writes (`read-write` or `primary`). The default of a multi-host URL
    /// here, unlike libpq's (`any`): these processes write, and a standby would refuse them.
    ReadWrite,
}

/// One host of the list.
#[derive(Clone, PartialEq, Eq)]
pub struct Host {
    /// `host:port`, for logs and errors.
    pub addr: String,
    /// The URL with this host alone: a secret, as the URL is.
    url: String,
}

impl Host {
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One host and no `target_session_attrs`: the URL is used as it is, as it always was.
    Single,
    /// Several hosts, or one with `target_session_attrs`: the processes follow the one that
    /// fits.
    Hosts { hosts: Vec<Host>, attrs: Attrs },
}

/// Read `url`. Anything that is not a `postgres://` or `postgresql://` URL is [`Target::Single`]
/// (sqlx says what is wrong with it). Errors never hold the credentials.
pub fn parse(url: &str) -> Result<Target, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(Target::Single);
    };
    if !matches!(scheme, "postgres" | "postgresql") {
        return Ok(Target::Single);
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, host_list) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    let mut attrs = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("target_session_attrs=") {
            Some("any") => attrs = Some(Attrs::Any),
            Some("read-write" | "primary") => attrs = Some(Attrs::ReadWrite),
            Some(other) => {
                return Err(format!(
                    "database.url: target_session_attrs={other} is not supported (any, read-write \
                     or primary: these processes write)"
                ));
            }
            None => kept.push(pair),
        }
    }
    let entries: Vec<&str> = host_list.split(',').collect();
    if entries.len() == 1 && attrs.is_none() {
        return Ok(Target::Single);
    }
    let query = if kept.is_empty() {
        String::new()
    } else {
        format!("?{}", kept.join("&"))
    };
    let mut hosts = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let (host, port) = host_and_port(entry)
            .map_err(|e| format!("database.url: host {} of the list {e}", i + 1))?;
        let addr = format!("{host}:{port}");
        hosts.push(Host {
            url: format!("{scheme}://{userinfo}{addr}{path}{query}"),
            addr,
        });
    }
    Ok(Target::Hosts {
        hosts,
        attrs: attrs.unwrap_or(Attrs::ReadWrite),
    })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; the port is 5432 when not given.
fn host_and_port(entry: &str) -> Result<(&str, u16), String> {
    let (host, port) = if entry.starts_with('[') {
        let close = entry
            .find(']')
            .ok_or_else(|| format!("{entry:?} has no closing bracket"))?;
        let (host, after) = entry.split_at(close + 1);
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(format!("{entry:?} is not [address]:port")),
            },
        }
    } else {
        match entry.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err("is empty".into());
    }
    let port = match port {
        None => 5432,
        Some(p) => p
            .parse()
            .map_err(|_| format!("has no valid port ({p:?})"))?,
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(url: &str) -> (Vec<(String, String)>, Attrs) {
        match parse(url).unwrap() {
            Target::Hosts { hosts, attrs } => (
                hosts
                    .into_iter()
                    .map(|h| (h.addr.clone(), h.url().to_owned()))
                    .collect(),
                attrs,
            ),
            Target::Single => panic!("{url} is one host"),
        }
    }

    #[test]
    fn one_host_is_left_as_it_is() {
        for url in [
            "postgres://postgres:postgres@127.0.0.1:5432/saga_orchestrator",
            "postgres://u@h/db?sslmode=require",
            "postgres:///db?host=/var/run/postgresql",
            "postgresql://h",
            "mysql://a,b/c",
            "not a url",
        ] {
            assert_eq!(parse(url), Ok(Target::Single), "{url}");
        }
    }

    #[test]
    fn each_host_gets_the_whole_url() {
        let (list, attrs) = hosts(
            "postgres://ada:s%40cret@h1:5433,h2,[::1]:6000,[fe80::1]/shop?sslmode=require&target_session_attrs=read-write&application_name=x",
        );
        assert_eq!(attrs, Attrs::ReadWrite);
        assert_eq!(
            list,
            [
                (
                    "h1:5433",
                    "postgres://ada:s%40cret@h1:5433/shop?sslmode=require&application_name=x"
                ),
                (
                    "h2:5432",
                    "postgres://ada:s%40cret@h2:5432/shop?sslmode=require&application_name=x"
                ),
                (
                    "[::1]:6000",
                    "postgres://ada:s%40cret@[::1]:6000/shop?sslmode=require&application_name=x"
                ),
                (
                    "[fe80::1]:5432",
                    "postgres://ada:s%40cret@[fe80::1]:5432/shop?sslmode=require&application_name=x"
                ),
            ]
            .map(|(a, u)| (a.to_owned(), u.to_owned()))
        );
        // Every URL is one sqlx reads.
        for (_, url) in &list {
            url.parse::<sqlx::postgres::PgConnectOptions>().unwrap();
        }
    }

    #[test]
    fn what_a_host_must_be() {
        assert_eq!(hosts("postgres://h1,h2/db").1, Attrs::ReadWrite);
        assert_eq!(
            hosts("postgres://h1,h2/db?target_session_attrs=any").1,
            Attrs::Any
        );
        assert_eq!(
            hosts("postgres://h1,h2/db?target_session_attrs=primary").1,
            Attrs::ReadWrite
        );
        // One host that must be a primary is followed too.
        let (list, attrs) = hosts("postgres://u@h1/db?target_session_attrs=read-write");
        assert_eq!(attrs, Attrs::ReadWrite);
        assert_eq!(list, [("h1:5432".into(), "postgres://u@h1:5432/db".into())]);
    }

    #[test]
    fn what_cannot_be_used_is_named_without_the_password() {
        for (url, named) in [
            (
                "postgres://u:s3cret@h1,,h3/db",
                "host 2 of the list is empty",
            ),
            (
                "postgres://u:s3cret@h1,h2:x/db",
                "host 2 of the list has no valid port",
            ),
            ("postgres://u:s3cret@h1,h2:70000/db", "has no valid port"),
            ("postgres://u:s3cret@h1,[::1/db", "no closing bracket"),
            ("postgres://u:s3cret@h1,[::1]x/db", "is not [address]:port"),
            (
                "postgres://u:s3cret@h1,h2/db?target_session_attrs=standby",
                "target_session_attrs=standby is not supported",
            ),
        ] {
            let e = parse(url).unwrap_err();
            assert!(e.contains(named), "{url}: {e}");
            assert!(e.starts_with("database.url"), "{e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
        let host = Host {
            addr: "h1:5432".into(),
            url: "postgres://u:s3cret@h1:5432/db".into(),
        };
        assert_eq!(format!("{host:?}"), "h1:5432");
    }
}

//! Waiting for a saga to end without polling in a loop: `Prefer: wait=<seconds>` (RFC 7240) on
//! `POST /checkout`, `?wait=<seconds>` on `GET /sagas/{id}`.

use axum::http::{HeaderMap, HeaderValue};

use super::problem::Problem;

fn invalid(detail: String) -> Problem {
    Problem::bad_request("invalid-wait", "Invalid wait", detail)
}

/// Parse a wait in whole seconds, 0 to `max`: digits only (RFC 7240's delta-seconds), so no
/// sign, fraction or exponent.
pub fn parse(raw: &str, max: u64) -> Result<u64, Problem> {
    let raw = raw.trim().trim_matches('"');
    let digits = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit());
    match raw.parse::<u64>().ok().filter(|_| digits).ok_or(()) {
        Ok(n) if n <= max => Ok(n),
        Ok(n) => Err(invalid(format!(
            "wait must be at most {max} seconds, got {n}"
        ))),
        Err(_) => Err(invalid(format!(
            "wait must be a whole number of seconds from 0 to {max}, got {raw:?}"
        ))),
    }
}

/// The `wait` preference of a request, if it has one. Other preferences are ignored, as RFC
/// 7240 asks.
pub fn preference(headers: &HeaderMap, max: u64) -> Result<Option<u64>, Problem> {
    for value in headers.get_all("prefer") {
        // Bytes outside ASCII can only belong to preferences we do not know, which RFC 7240
        // says to ignore; a `wait` among them is still read.
        let value = String::from_utf8_lossy(value.as_bytes());
        for pref in value.split(',') {
            let token = pref.split(';').next().unwrap_or("").trim();
            let (name, arg) = match token.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a)),
                None => (token, None),
            };
            if name.eq_ignore_ascii_case("wait") {
                let arg =
                    arg.ok_or_else(|| invalid("Prefer: wait needs a value, e.g. wait=10".into()))?;
                return parse(arg, max).map(Some);
            }
        }
    }
    Ok(None)
}

/// `Preference-Applied: wait=<n>`.
pub fn applied(seconds: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("wait={seconds}")).expect("a header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefer(v: &str) -> Result<Option<u64>, Problem> {
        let mut h = HeaderMap::new();
        h.insert("prefer", v.parse().unwrap());
        preference(&h, 60)
    }

    #[test]
    fn wait_preferences_are_read_and_checked() {
        assert_eq!(prefer("wait=10").unwrap(), Some(10));
        assert_eq!(prefer("respond-async, wait=5").unwrap(), Some(5));
        assert_eq!(prefer("return=minimal").unwrap(), None);
        assert_eq!(prefer("WAIT=\"3\"").unwrap(), Some(3));
        let mut h = HeaderMap::new();
        h.insert(
            "prefer",
            HeaderValue::from_bytes("return=minimal; note=\"caf\u{e9}\", wait=4".as_bytes())
                .unwrap(),
        );
        assert_eq!(preference(&h, 60).unwrap(), Some(4));
        for bad in [
            "wait=-1", "wait=+5", "wait=abc", "wait=61", "wait", "wait=1.5", "wait=",
        ] {
            let p = prefer(bad).unwrap_err();
            assert_eq!(p.slug, "invalid-wait", "{bad}");
        }
    }
}

//! The rules every text a client sends follows before anything stores it: in a body, a header
//! or a query. One place, so that no field can slip past them.
//!
//! A stored text is trimmed, has a bounded length, and holds no control character: no NUL
//! (PostgreSQL refuses it in `text`, and a NUL inside a stored JSON document makes every later
//! read of that field fail), no C0 or C1 control, no DEL, and no bidirectional override or
//! isolate (they make a log line or a dashboard show something else than what is stored). A
//! text that breaks a rule is refused with the field named, never cleaned up silently: the
//! client learns what it sent wrong.

use axum::http::HeaderMap;

use super::problem::{FieldError, Problem};

use runtime::text::check;

/// A required text field of a body: trimmed, 1 to `max` characters, no control characters.
/// The error names the field by its JSON pointer.
pub fn text(errors: &mut Vec<FieldError>, pointer: &str, value: &str, max: usize) -> String {
    let trimmed = value.trim();
    if let Err(why) = check(trimmed, max, false) {
        errors.push(FieldError::new(pointer, why));
    }
    trimmed.to_owned()
}

/// An optional text field of a body (a reason, a note): trimmed, at most `max` characters, no
/// control characters; `None` when it is absent or blank.
pub fn optional_text(
    errors: &mut Vec<FieldError>,
    pointer: &str,
    value: Option<&str>,
    max: usize,
) -> Option<String> {
    let trimmed = value?.trim();
    if let Err(why) = check(trimmed, max, true) {
        errors.push(FieldError::new(pointer, why));
    }
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

/// An email address a parcel notice can reach: RFC 5322's address syntax (the `email_address`
/// crate), without a display name or an IP literal, and with a domain of at least two labels.
pub fn email(errors: &mut Vec<FieldError>, pointer: &str, value: &str) -> String {
    let address = text(errors, pointer, value, 254);
    if errors.iter().any(|e| e.pointer.as_deref() == Some(pointer)) {
        return address;
    }
    let options = email_address::Options::default()
        .without_display_text()
        .without_domain_literal();
    match email_address::EmailAddress::parse_with_options(&address, options) {
        Ok(parsed) if parsed.domain().contains('.') => {}
        Ok(_) => errors.push(FieldError::new(
            pointer,
            "is not an email address: its domain needs a dot, as in example.com",
        )),
        Err(e) => errors.push(FieldError::new(
            pointer,
            format!("is not an email address ({e})"),
        )),
    }
    address
}

/// A signal's name: 1 to 64 characters of `a-z`, `0-9` and `_`, as the saga types name them.
pub fn signal_name(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(())
    } else {
        Err(format!(
            "a signal name is 1 to 64 characters of a-z, 0-9 and _, got {name:?}"
        ))
    }
}

/// Every text of a JSON document (its strings and its keys) follows the rules of a stored text
/// (no control characters; at most 2,000 characters each), and it nests at most 16 deep:
/// a signal's payload is stored with its saga. `Err` names the first that does not, by its
/// JSON pointer.
pub fn json_texts(doc: &serde_json::Value) -> Result<(), String> {
    fn walk(v: &serde_json::Value, at: &str, depth: usize) -> Result<(), String> {
        if depth > 16 {
            return Err(format!("{at}: nests deeper than 16 levels"));
        }
        match v {
            serde_json::Value::String(s) => {
                check(s, 2_000, true).map_err(|why| format!("{at}: {why}"))
            }
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, x)| walk(x, &format!("{at}/{i}"), depth + 1)),
            serde_json::Value::Object(map) => map.iter().try_for_each(|(k, x)| {
                let key = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                check(k, 200, true).map_err(|why| format!("{key}: the key {why}"))?;
                walk(x, &key, depth + 1)
            }),
            _ => Ok(()),
        }
    }
    walk(doc, "", 0)
}

/// A header that carries an identifier the service stores (`Idempotency-Key`,
/// `X-Correlation-Id`): 1 to `max` visible ASCII characters. `None` when it is absent; a
/// problem (422, naming the header) when it is there but breaks the rule.
pub fn token_header(
    headers: &HeaderMap,
    name: &str,
    max: usize,
) -> Result<Option<String>, Problem> {
    let key = name.to_ascii_lowercase();
    let Some(value) = headers.get(&key) else {
        return Ok(None);
    };
    let bad = |why: String| Problem::invalid(vec![FieldError::header(name, why)]);
    if headers.get_all(&key).iter().count() > 1 {
        return Err(bad("must be sent once".into()));
    }
    let s = value
        .to_str()
        .map_err(|_| bad("must be visible ASCII characters".into()))?;
    let s = s.trim().trim_matches('"');
    if s.is_empty() {
        return Err(bad("must not be empty".into()));
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(bad(format!(
            "must be visible ASCII characters (found U+{:04X})",
            c as u32
        )));
    }
    if s.len() > max {
        return Err(bad(format!(
            "must be at most {max} characters, got {}",
            s.len()
        )));
    }
    Ok(Some(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(value: &str, max: usize) -> Option<String> {
        let mut errors = Vec::new();
        text(&mut errors, "/x", value, max);
        errors.pop().map(|e| e.detail)
    }

    #[test]
    fn texts_are_trimmed_bounded_and_free_of_control_characters() {
        assert_eq!(one("  Ada  ", 5), None);
        assert!(one("", 5).unwrap().contains("empty"));
        assert!(one("   ", 5).unwrap().contains("empty"));
        assert!(one("abcdef", 5).unwrap().contains("at most 5"));
        // Characters, not bytes.
        assert_eq!(one("ñññññ", 5), None);
        for bad in [
            "a\u{0}b",
            "a\u{7}b",
            "a\u{1b}[31mb",
            "a\u{7f}b",
            "a\u{85}b",
            "a\u{202e}b",
            "a\nb",
        ] {
            assert!(
                one(bad, 50).unwrap().contains("control characters"),
                "{bad:?}"
            );
        }
        let mut errors = Vec::new();
        assert_eq!(optional_text(&mut errors, "/r", Some("  "), 10), None);
        assert_eq!(optional_text(&mut errors, "/r", None, 10), None);
        assert_eq!(
            optional_text(&mut errors, "/r", Some(" why "), 10).as_deref(),
            Some("why")
        );
        assert!(errors.is_empty());
        optional_text(&mut errors, "/r", Some("changed my mind\u{0}"), 100);
        assert_eq!(errors[0].pointer.as_deref(), Some("/r"));
    }

    #[test]
    fn emails_follow_the_address_syntax() {
        for good in [
            "ada@example.com",
            "a.b+c@ex-ample.co.uk",
            "\"a b\"@example.com",
        ] {
            let mut errors = Vec::new();
            email(&mut errors, "/e", good);
            assert!(errors.is_empty(), "{good}: {errors:?}");
        }
        for bad in [
            "ada@@example.com",
            "a@b@example.com",
            "ada@example..com",
            "ada@.example.com",
            "ada.@example.com",
            "ada@localhost",
            "ada@[127.0.0.1]",
            "Ada <ada@example.com>",
            "nope",
            "",
            "ada@exam\u{0}ple.com",
        ] {
            let mut errors = Vec::new();
            email(&mut errors, "/e", bad);
            assert_eq!(errors.len(), 1, "{bad:?}: {errors:?}");
        }
    }

    #[test]
    fn identifier_headers_are_visible_ascii_within_bounds() {
        let get = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(v).unwrap(),
            );
            token_header(&h, "Idempotency-Key", 16)
        };
        assert_eq!(get(b"abc").unwrap().as_deref(), Some("abc"));
        assert_eq!(get(b"\"abc\"").unwrap().as_deref(), Some("abc"));
        for bad in [
            &b"a\tb"[..],
            b"caf\xc3\xa9",
            b"",
            b"0123456789abcdefg",
            b"a b",
        ] {
            let p = get(bad).unwrap_err();
            assert_eq!(p.status, axum::http::StatusCode::UNPROCESSABLE_ENTITY);
            assert_eq!(p.errors[0].header.as_deref(), Some("Idempotency-Key"));
        }
        assert_eq!(token_header(&HeaderMap::new(), "x", 3).unwrap(), None);
    }
}

/// The `limit` query parameter of a list: absent is `default`, else a whole number from 1 to
/// `max` (400 naming the parameter otherwise).
pub fn limit(raw: Option<&str>, default: i64, max: i64) -> Result<i64, Problem> {
    match raw {
        None => Ok(default),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                Problem::bad_query(
                    "limit",
                    format!("must be a whole number from 1 to {max}, got {raw:?}"),
                )
            }),
    }
}

/// The `status` query parameter of a list: one of the statuses a saga may have (400 naming the
/// parameter and the statuses otherwise).
pub fn status(raw: &str) -> Result<sagas::api::Status, Problem> {
    sagas::api::Status::parse(raw).ok_or_else(|| {
        let all: Vec<&str> = sagas::api::Status::ALL.iter().map(|s| s.as_str()).collect();
        Problem::bad_query(
            "status",
            format!("must be one of {}, got {raw:?}", all.join(", ")),
        )
    })
}

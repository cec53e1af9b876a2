//! What a reader may see of a saga: the one place that decides.
//!
//! A saga's storage holds personal data its steps need (a checkout's customer email and
//! shipping address), kept in PostgreSQL and shown whole only to a logged-in viewer or operator
//! (the admin API and the dashboard). `GET /sagas/{id}`, the checkout's status URL, is public:
//! its readers see [`public_view`], the shape of the saga, its steps, outcomes and times, with
//! personal data masked. Payment tokens are never stored with a saga (they are secrets:
//! `orchestrator.saga_secrets`), and one found in older data is dropped for every reader
//! ([`drop_secrets`]).
//!
//! The rules go by field name, over the whole document (the saga's data, and every input and
//! effect of its event log), so that a new saga type's personal fields are covered when they
//! use these names: `email` and `recipient` are masked, an `address` or `shipping_address`
//! keeps only its country, `payment_token` is dropped.

use serde_json::Value;

/// Mask personal data in `doc`, in place, for a reader who is not an operator.
pub fn public_view(doc: &mut Value) {
    match doc {
        Value::Object(map) => {
            map.remove("payment_token");
            for (key, value) in map.iter_mut() {
                match key.as_str() {
                    "email" | "recipient" => {
                        if let Value::String(s) = value {
                            *s = mask_email(s);
                        }
                    }
                    "address" | "shipping_address" => {
                        if let Value::Object(a) = value {
                            a.retain(|k, _| k == "country");
                            a.insert("redacted".into(), Value::Bool(true));
                        }
                    }
                    _ => public_view(value),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(public_view),
        _ => {}
    }
}

/// `ada.lovelace@example.com` -> `a…@example.com`: enough for an operator on the phone to
/// tell two customers apart, not enough to write to one.
fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}…@{domain}")
        }
        None => "…".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn personal_data_is_masked_wherever_it_is() {
        let mut doc = json!({
            "data": {
                "customer": {"id": "c-1", "email": "ada.lovelace@example.com"},
                "payment_token": "tok_visa_1234",
                "payment_token_hint": "…34",
                "shipping_address": {"name": "Ada", "line1": "1 Main St", "city": "Madrid",
                                     "postal_code": "28001", "country": "ES"}
            },
            "events": [{"input": {"customer": {"email": "b@example.org"},
                                  "shipping_address": {"name": "Bo", "country": "FR"}}}]
        });
        public_view(&mut doc);
        assert_eq!(
            doc,
            json!({
                "data": {
                    "customer": {"id": "c-1", "email": "a…@example.com"},
                    "payment_token_hint": "…34",
                    "shipping_address": {"country": "ES", "redacted": true}
                },
                "events": [{"input": {"customer": {"email": "b…@example.org"},
                                      "shipping_address": {"country": "FR", "redacted": true}}}]
            })
        );
    }
}

/// Drop every payment token from `doc`, in place: what even an operator never sees. (None is
/// stored with a saga or a message; this is the guard should old data hold one.)
pub fn drop_secrets(doc: &mut Value) {
    match doc {
        Value::Object(map) => {
            map.remove("payment_token");
            map.values_mut().for_each(drop_secrets);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_secrets),
        _ => {}
    }
}

//! The OpenAPI 3.1 document of the JSON API (`GET /openapi.json`), generated from the code: its
//! paths, methods and security from the route table ([`super::routes`], the list the router is
//! built from, so the two cannot drift), its bodies' schemas from the Rust types (schemars, the
//! types the handlers deserialize and serialize). The dashboard's HTML pages are not in it.
//!
//! [`docs`] says, per route, what the table cannot: a summary, the body and answer types, the
//! query parameters and the statuses it answers with. A JSON route without an entry there is a
//! programming error (a test walks the table).

use std::collections::BTreeMap;

use axum::http::Method;
use schemars::generate::{Contract, SchemaSettings};
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Value, json};

use super::{Access, routes};

/// How a schema is made for a type, in the request's or the answer's direction.
type SchemaFn = fn(&mut SchemaGenerator) -> schemars::Schema;

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

/// What the route table does not say about a route.
pub struct Doc {
    pub summary: &'static str,
    pub request: Option<SchemaFn>,
    /// The schema of a successful answer (`None`: any JSON object).
    pub response: Option<SchemaFn>,
    /// The status of a successful answer.
    pub ok: u16,
    /// Query parameters: name, JSON type, description.
    pub query: &'static [(&'static str, &'static str, &'static str)],
    /// Headers a client may send: name, description.
    pub headers: &'static [(&'static str, &'static str)],
    /// The metrics are OpenMetrics text; every other answer is JSON.
    pub text: bool,
}

const fn doc(summary: &'static str) -> Doc {
    Doc {
        summary,
        request: None,
        response: None,
        ok: 200,
        query: &[],
        headers: &[],
        text: false,
    }
}

const FILTERS: &[(&str, &str, &str)] = &[
    ("type", "string", "A saga type, e.g. checkout."),
    (
        "status",
        "string",
        "running, parked, compensating, completed, compensated, failed or resolved.",
    ),
    ("state", "string", "A state of the machine, e.g. retrying."),
    (
        "from",
        "string",
        "Created at or after (RFC 3339, or YYYY-MM-DDTHH:MM in UTC).",
    ),
    ("to", "string", "Created before."),
    (
        "q",
        "string",
        "A saga id, order id, correlation id, customer id or email.",
    ),
    ("limit", "string", "1 to 500 (50)."),
    ("after", "string", "The last saga id of the page before."),
];

const REASON_ACTIONS: &str = "retry_now, recover, resolve or cancel";

/// The per-route documentation, by method and path.
pub fn docs() -> BTreeMap<(Method, &'static str), Doc> {
    use crate::http::{admin, breakers, checkout, sagas};
    let mut d = BTreeMap::new();
    let mut add = |m: Method, p: &'static str, doc: Doc| {
        d.insert((m, p), doc);
    };
    add(
        Method::POST,
        "/checkout",
        Doc {
            request: Some(schema::<checkout::CheckoutRequest>),
            response: Some(schema::<checkout::Accepted>),
            ok: 202,
            headers: &[
                (
                    "Idempotency-Key",
                    "The same key with the same body is the same checkout (1 to 255 visible ASCII characters).",
                ),
                (
                    "Prefer",
                    "`wait=<seconds>`: answer when the saga ended, or after that long.",
                ),
            ],
            ..doc("Start a checkout saga")
        },
    );
    add(
        Method::GET,
        "/orders/{id}",
        doc("An order's status, lines, delivery and history (no personal data)"),
    );
    add(
        Method::POST,
        "/orders/{id}/cancel",
        Doc {
            request: Some(schema::<sagas::CancelRequest>),
            ok: 202,
            ..doc("A customer's cancel of their order")
        },
    );
    add(
        Method::GET,
        "/sagas/{id}",
        Doc {
            query: &[(
                "wait",
                "string",
                "Seconds to wait for the saga to end (0 to http.max_wait_seconds).",
            )],
            ..doc("A saga, personal data masked: the checkout's status URL")
        },
    );
    add(
        Method::GET,
        "/metrics",
        Doc {
            text: true,
            ..doc("Prometheus metrics (OpenMetrics text)")
        },
    );
    add(Method::GET, "/healthz", doc("Liveness"));
    add(
        Method::GET,
        "/readyz",
        doc("Readiness: PostgreSQL and NATS reachable"),
    );
    add(
        Method::GET,
        "/problems/{slug}",
        doc("What a problem type means"),
    );
    add(Method::GET, "/openapi.json", doc("This document"));
    add(
        Method::GET,
        "/orders",
        Doc {
            query: &[(
                "customer",
                "string",
                "A customer's id: their orders, newest first.",
            )],
            ..doc("A customer's orders")
        },
    );
    add(
        Method::GET,
        "/sagas",
        Doc {
            query: &[
                ("status", "string", "A status."),
                ("limit", "string", "1 to 500."),
                ("before", "string", "A saga id: the page starts after it."),
            ],
            ..doc("Sagas, newest first (the admin list has more filters)")
        },
    );
    add(
        Method::GET,
        "/sagas/{id}/verify",
        doc("Replay a saga's event log and compare with its snapshot"),
    );
    add(
        Method::GET,
        "/breakers",
        doc("The circuit breakers, with the sagas parked on each"),
    );
    add(
        Method::GET,
        "/admin/sagas",
        Doc {
            query: FILTERS,
            ..doc("Sagas, filtered and searched, newest first, in keyset pages")
        },
    );
    add(
        Method::GET,
        "/admin/partitions",
        doc("The live orchestrators, the partitions each holds, and every partition's lease"),
    );
    add(
        Method::GET,
        "/admin/sagas/{id}",
        doc("A saga whole: data, steps, event log, timers, allowed actions, audit"),
    );
    add(
        Method::GET,
        "/admin/audit",
        Doc {
            query: &[
                (
                    "target",
                    "string",
                    "A saga id, a step or a dead letter's sequence.",
                ),
                (
                    "before",
                    "string",
                    "An audit row id: the page starts after it.",
                ),
                ("limit", "string", "1 to 500 (100)."),
            ],
            ..doc("The audit log of operator actions, newest first")
        },
    );
    add(
        Method::GET,
        "/admin/dead-letters",
        Doc {
            query: &[
                (
                    "origin",
                    "string",
                    "The consumer that set them aside, e.g. replies.",
                ),
                ("before", "string", "A sequence: the page starts after it."),
                ("limit", "string", "1 to 200 (50)."),
            ],
            ..doc("Dead letters, newest first, with the count per origin")
        },
    );
    add(
        Method::POST,
        "/sagas/{id}/cancel",
        Doc {
            request: Some(schema::<sagas::CancelRequest>),
            ok: 202,
            ..doc("Cancel a saga: it compensates what it did (refused past its pivot)")
        },
    );
    add(
        Method::POST,
        "/sagas/{id}/signals/{name}",
        Doc {
            ok: 202,
            headers: &[("Idempotency-Key", "The same key is the same signal.")],
            ..doc("Send a saga a signal (any JSON body is its payload)")
        },
    );
    add(
        Method::PUT,
        "/breakers/{step}",
        Doc {
            request: Some(schema::<breakers::ForceRequest>),
            ..doc("Force a step's breaker open or closed, or hand it back (null)")
        },
    );
    add(
        Method::POST,
        "/admin/sagas/bulk",
        Doc {
            request: Some(schema::<admin::BulkRequest>),
            response: Some(schema::<admin::BulkOutcome>),
            ..doc("An action on every saga a filter matches; a dry run counts them")
        },
    );
    add(
        Method::POST,
        "/admin/sagas/{id}/actions/{action}",
        Doc {
            request: Some(schema::<admin::ActionRequest>),
            response: Some(schema::<crate::admin::Acted>),
            ..doc("An operator action on a saga")
        },
    );
    add(
        Method::POST,
        "/admin/dead-letters/bulk",
        Doc {
            request: Some(schema::<admin::LettersBulkRequest>),
            ..doc("Replay or discard dead letters by sequence or origin; a dry run counts them")
        },
    );
    add(
        Method::POST,
        "/admin/dead-letters/{seq}/{action}",
        Doc {
            request: Some(schema::<admin::ActionRequest>),
            ..doc("Replay a dead letter to its subject, or discard it")
        },
    );
    d
}

fn parameter_schema(path: &str, name: &str) -> Value {
    match name {
        "id" => json!({"type": "string", "format": "uuid"}),
        "action" if path.starts_with("/admin/dead-letters") => {
            json!({"type": "string", "enum": ["replay", "discard"]})
        }
        "action" => json!({"type": "string", "description": REASON_ACTIONS}),
        "seq" => json!({"type": "integer", "minimum": 1}),
        _ => json!({"type": "string"}),
    }
}

fn problem() -> Value {
    json!({
        "description": "A problem (RFC 9457)",
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    })
}

/// The schema of a query parameter of `path`: exactly what the handler takes where a schema can
/// say it (enums, ranges), a plain string where the server's rules are richer (free text is
/// trimmed and checked, ids are parsed in several forms, times in several formats). An empty
/// filter of the admin lists is no filter.
fn query_schema(path: &str, name: &str, ty: &str, max_wait: u64, types: &[&str]) -> Value {
    let admin = path.starts_with("/admin");
    let mut statuses: Vec<&str> = sagas::api::Status::ALL.iter().map(|s| s.as_str()).collect();
    let mut types = types.to_vec();
    if admin {
        statuses.push("");
        types.push("");
    }
    match (name, path) {
        ("status", _) => json!({"type": "string", "enum": statuses}),
        ("type", _) => json!({"type": "string", "enum": types}),
        ("limit", "/admin/dead-letters") => {
            json!({"type": "integer", "minimum": 1, "maximum": 200})
        }
        ("limit", _) => {
            json!({"type": "integer", "minimum": 1, "maximum": crate::admin::MAX_LIMIT})
        }
        ("wait", _) => json!({"type": "integer", "minimum": 0, "maximum": max_wait}),
        ("before", "/admin/audit") => json!({"type": "integer"}),
        ("before", "/admin/dead-letters") => json!({"type": "integer", "minimum": 0}),
        _ => json!({"type": ty}),
    }
}

/// The whole document, for a server whose longest wait is `max_wait` seconds and that runs the
/// saga types `types`.
pub fn document(max_wait: u64, types: &[&str]) -> Value {
    let docs = docs();
    let settings = |contract| {
        SchemaSettings::draft2020_12().with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
            s.contract = contract;
        })
    };
    let mut requests = settings(Contract::Deserialize).into_generator();
    let mut answers = settings(Contract::Serialize).into_generator();
    let mut paths = serde_json::Map::new();
    for r in routes() {
        if r.path.starts_with("/dashboard") {
            continue;
        }
        let Some(d) = docs.get(&(r.method.clone(), r.path)) else {
            continue;
        };
        let mut parameters: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| {
                json!({"name": name, "in": "path", "required": true,
                       "schema": parameter_schema(r.path, name)})
            })
            .collect();
        for (name, ty, description) in d.query {
            parameters.push(json!({"name": name, "in": "query", "required": false,
                                   "description": description, "schema": query_schema(r.path, name, ty, max_wait, types)}));
        }
        for (name, description) in d.headers {
            let schema = match *name {
                "Idempotency-Key" => json!({"type": "string", "pattern": "^[!-~]{1,255}$"}),
                // Other preferences are ignored (RFC 7240): any text is taken.
                _ => json!({"type": "string"}),
            };
            parameters.push(json!({"name": name, "in": "header", "required": false,
                                   "description": description, "schema": schema}));
        }
        parameters.push(json!({"name": "X-Correlation-Id", "in": "header", "required": false,
                               "description": "Follows the request into every command, reply and event (1 to 128 visible ASCII characters).",
                               "schema": {"type": "string", "pattern": "^[!-~]{1,128}$"}}));
        let ok_content = if d.text {
            json!({"application/openmetrics-text": {"schema": {"type": "string"}}})
        } else {
            let schema = match d.response {
                Some(f) => serde_json::to_value(f(&mut answers)).expect("a schema is JSON"),
                None => json!({"type": "object"}),
            };
            json!({"application/json": {"schema": schema}})
        };
        let mut responses = serde_json::Map::new();
        responses.insert(
            d.ok.to_string(),
            json!({"description": "Done", "content": ok_content}),
        );
        // Every problem the API answers with is one of these; each route may meet any of them
        // (a path or query parameter, a body, the saga's state, the database).
        for status in ["400", "404", "405", "409", "413", "415", "422", "503"] {
            responses.insert(status.to_owned(), problem());
        }
        if r.access != Access::Public {
            responses.insert("401".into(), problem());
            responses.insert("403".into(), problem());
        }
        if r.path == "/readyz" {
            responses.insert("503".into(), json!({"description": "Not ready"}));
        }
        let mut op = json!({
            "summary": d.summary,
            "operationId": format!("{} {}", r.method, r.path),
            "parameters": parameters,
            "responses": responses,
        });
        if let Some(f) = d.request {
            let schema = serde_json::to_value(f(&mut requests)).expect("a schema is JSON");
            op["requestBody"] = json!({
                "required": !matches!(r.path, "/sagas/{id}/cancel" | "/orders/{id}/cancel"),
                "content": {"application/json": {"schema": schema}}
            });
        } else if r.method == Method::POST {
            op["requestBody"] = json!({
                "required": false,
                "content": {"application/json": {"schema": {}}}
            });
        }
        op["security"] = match r.access {
            Access::Public => json!([]),
            _ => json!([{"token": []}, {"session": []}]),
        };
        if r.access != Access::Public {
            op["x-role"] = json!(match r.access {
                Access::Operator => "operator",
                _ => "viewer",
            });
        }
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        entry[r.method.as_str().to_ascii_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Saga orchestrator",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The checkout, its sagas, and the admin API. Admin routes need `Authorization: Bearer <token>` (admin.tokens) or a dashboard session (then writes carry X-CSRF-Token); `x-role` says which role."
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "token": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": super::auth::SESSION_COOKIE}
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "errors": {"type": "array", "items": {"type": "object"}}
                    }
                }
            }
        }
    })
}

/// `GET /openapi.json`.
pub async fn serve(
    axum::extract::State(state): axum::extract::State<super::AppState>,
) -> axum::Json<Value> {
    let types: Vec<&str> = state.registry.types().map(|t| t.name()).collect();
    axum::Json(document(state.settings.http.max_wait_seconds, &types))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_json_route_is_documented_and_nothing_else() {
        let docs = docs();
        let doc = document(60, &["checkout"]);
        for r in routes() {
            if r.path.starts_with("/dashboard") {
                continue;
            }
            assert!(
                docs.contains_key(&(r.method.clone(), r.path)),
                "{} {} has no entry in openapi::docs",
                r.method,
                r.path
            );
            let op = &doc["paths"][r.path][r.method.as_str().to_ascii_lowercase()];
            assert!(op.is_object(), "{} {}", r.method, r.path);
            assert_eq!(
                op["security"].as_array().unwrap().is_empty(),
                r.access == Access::Public,
                "{} {}",
                r.method,
                r.path
            );
        }
        let routed: Vec<(Method, &str)> =
            routes().into_iter().map(|r| (r.method, r.path)).collect();
        for key in docs.keys() {
            assert!(routed.contains(key), "{key:?} is documented but not routed");
        }
    }

    #[test]
    fn bodies_have_their_types_schemas() {
        let doc = document(60, &["checkout"]);
        let checkout = &doc["paths"]["/checkout"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"];
        assert_eq!(checkout["type"], "object", "{checkout:#}");
        assert!(checkout["properties"]["items"].is_object(), "{checkout:#}");
        assert!(
            !doc.to_string().contains("\"$ref\":\"#/$defs"),
            "no dangling references"
        );
    }
}

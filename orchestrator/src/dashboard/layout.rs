//! The one layout every page renders through, its stylesheet and live-update script, and the
//! small pieces the pages share (badges, times, durations, URLs, the hidden `csrf` field).

use chrono::{DateTime, TimeDelta, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::model::Page;

/// The part of the dashboard a page belongs to: its nav link is highlighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Overview,
    Sagas,
    DeadLetters,
    Audit,
    /// The login and error pages: no link highlighted.
    None,
}

const NAV: [(Section, &str, &str); 4] = [
    (Section::Overview, "/dashboard", "Overview"),
    (Section::Sagas, "/dashboard/sagas", "Sagas"),
    (
        Section::DeadLetters,
        "/dashboard/dead-letters",
        "Dead letters",
    ),
    (Section::Audit, "/dashboard/audit", "Audit log"),
];

/// The development-mode warning, word for word on every page.
pub const DEV_WARNING: &str =
    "Development mode: no authentication; anyone who can reach this port is an operator";

/// Where a page is, and whether its `<main>` follows live updates.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub section: Section,
    /// The `EventSource` URL put in `<main data-live>`; `None`: a static page.
    pub live: Option<&'a str>,
    /// Whether the header shows the nav and the user (not on the login page).
    pub nav: bool,
}

/// A complete HTML5 document around `body`: the dev-mode banner, the header with the nav and
/// the logout form, the flash message, and `body` inside `<main>`.
pub fn layout(page: &Page, frame: Frame<'_>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (page.title) " · Saga orchestrator" }
                style { (PreEscaped(CSS)) }
            }
            body {
                @if page.dev_mode {
                    div #dev-warning .dev-warning role="alert" data-testid="dev-warning" {
                        (DEV_WARNING)
                    }
                }
                header {
                    span.brand { "Saga orchestrator" }
                    @if frame.nav {
                        nav {
                            @for (section, href, label) in NAV {
                                a.on[section == frame.section] href=(href) { (label) }
                            }
                        }
                        @if let Some(user) = &page.user {
                            span.who {
                                span data-testid="user" { (user.name) " (" (user.role.as_str()) ")" }
                                form.inline method="post" action="/dashboard/logout" {
                                    (csrf_input(page))
                                    button.link type="submit" { "Log out" }
                                }
                            }
                        }
                    }
                }
                main data-live=[frame.live] {
                    @if let Some(flash) = &page.flash {
                        div #flash .flash role="status" data-testid="flash" { (flash) }
                    }
                    (body)
                }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
}

/// The hidden `csrf` field of every POST form.
pub fn csrf_input(page: &Page) -> Markup {
    html! { input type="hidden" name="csrf" value=(page.csrf); }
}

/// A saga status (or state) as a coloured badge; an unknown word is shown in grey.
pub fn status_badge(status: &str) -> Markup {
    html! { span class={ "badge " (status_class(status)) } { (status) } }
}

/// The badge class of a status or a machine state (`retrying` is running, ...).
pub fn status_class(status: &str) -> &'static str {
    match status {
        "running" | "retrying" | "awaiting" => "st-running",
        "parked" | "compensation_parked" => "st-parked",
        "compensating" | "compensation_retrying" => "st-compensating",
        "completed" => "st-completed",
        "compensated" => "st-compensated",
        "failed" => "st-failed",
        "resolved" => "st-resolved",
        _ => "st-other",
    }
}

/// An event-log kind as a badge, coloured by what it says.
pub fn kind_badge(kind: &str) -> Markup {
    let class = match kind {
        "started" => "k-start",
        "step_succeeded" => "k-ok",
        "step_failed_retryable" => "k-retry",
        "step_failed_permanent" => "k-fail",
        "timer_fired" => "k-timer",
        "signal" => "k-signal",
        "cancel_requested" => "k-cancel",
        "resumed" => "k-start",
        k if k.starts_with("operator_") => "k-operator",
        _ => "k-other",
    };
    html! { span class={ "kind " (class) } { (kind) } }
}

/// A time in UTC, to the second, with its RFC 3339 form for machines.
pub fn time(at: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S")) }
    }
}

/// A duration as an operator reads it: "12 ms", "3.4 s", "42 s", "2 min", "1.5 h", "3 d".
/// Negative durations are shown by their size.
pub fn human_duration(d: TimeDelta) -> String {
    let ms = d.num_milliseconds().unsigned_abs();
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..10_000 => format!("{:.1} s", ms as f64 / 1e3),
        10_000..60_000 => format!("{} s", ms / 1_000),
        60_000..3_600_000 => format!("{} min", ms / 60_000),
        3_600_000..36_000_000 => format!("{:.1} h", ms as f64 / 3.6e6),
        36_000_000..172_800_000 => format!("{} h", ms / 3_600_000),
        _ => format!("{} d", ms / 86_400_000),
    }
}

/// "in 3 min", "3 min ago" or "just now", from `now`.
pub fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let d = at - now;
    if d.abs() < TimeDelta::seconds(1) {
        "just now".to_owned()
    } else if d > TimeDelta::zero() {
        format!("in {}", human_duration(d))
    } else {
        format!("{} ago", human_duration(d))
    }
}

/// `path?k=v&...` with the pairs URL-encoded; `path` alone when there are none.
pub fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return path.to_owned();
    }
    // Encoding a list of string pairs cannot fail.
    let query = serde_urlencoded::to_string(pairs).unwrap_or_default();
    format!("{path}?{query}")
}

/// One path segment, percent-encoded (a step name or an action in a form's URL).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A URL the handler gave, if it is one a link may carry: relative to this site or http(s).
/// Anything else (`javascript:`, `data:`, ...) is shown as text, never followed.
pub fn safe_href(url: &str) -> Option<&str> {
    let lower = url.trim_start().to_ascii_lowercase();
    let ok = (url.starts_with('/') && !url.starts_with("//"))
        || url.starts_with('?')
        || lower.starts_with("https://")
        || lower.starts_with("http://");
    ok.then_some(url)
}

/// A link if the URL is safe, the text alone otherwise.
pub fn link_or_text(text: &str, url: Option<&str>) -> Markup {
    match url.and_then(safe_href) {
        Some(href) => html! { a href=(href) { (text) } },
        None => html! { (text) },
    }
}

/// An empty-table line.
pub fn empty_row(cols: usize, text: &str) -> Markup {
    html! { tr.empty { td.muted colspan=(cols) { (text) } } }
}

/// The page's stylesheet: compact, for an operator's 1280-wide screen.
pub const CSS: &str = r#"
:root{--fg:#1d2330;--muted:#5b6472;--line:#dde1e7;--bg:#f4f5f7;--link:#1f5fbf}
*{box-sizing:border-box}
body{margin:0;font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);background:var(--bg)}
a{color:var(--link)}
.dev-warning{background:#b91c1c;color:#fff;padding:8px 16px;font-weight:700;font-size:14px}
header{display:flex;align-items:center;gap:12px;padding:6px 16px;background:#1d2330;color:#fff}
header .brand{font-weight:700;margin-right:8px}
header nav{display:flex;gap:4px}
header nav a{color:#d6deeb;text-decoration:none;padding:3px 9px;border-radius:4px}
header nav a.on,header nav a:hover{background:#3a4458;color:#fff}
header .who{margin-left:auto;display:flex;gap:8px;align-items:center;color:#c5ccd8}
header button.link{background:none;border:1px solid #5b6579;color:#d6deeb}
main{padding:10px 16px 24px}
h1{font-size:18px;margin:2px 0 10px}
h1 .badge{vertical-align:middle;font-size:13px}
h2{font-size:14px;margin:0 0 6px}
.card{background:#fff;border:1px solid var(--line);border-radius:6px;padding:8px 10px;margin-bottom:12px;overflow-x:auto}
.grid3{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:12px}
.grid2{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:12px}
table{border-collapse:collapse;width:100%}
th,td{padding:3px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top;white-space:nowrap}
th{font-weight:600;color:var(--muted);background:#f3f4f6;white-space:normal}
td.wrap,th.wrap{white-space:normal}
.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:hover td{background:#f7f9fc}
tr.empty td{color:var(--muted);font-style:italic}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.muted{color:var(--muted)}
.err{color:#b91c1c}
.badge{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;font-weight:600;color:#fff;background:#6b7280;line-height:18px}
.st-running{background:#2563eb}.st-parked{background:#d97706}.st-compensating{background:#ea580c}
.st-completed{background:#16a34a}.st-compensated{background:#6b7280}.st-failed{background:#dc2626}
.st-resolved{background:#7c3aed}.st-other{background:#94a3b8}
.b-closed{background:#16a34a}.b-half_open{background:#d97706}.b-open{background:#dc2626}
.kind{display:inline-block;padding:0 6px;border-radius:3px;font-size:12px;font-family:ui-monospace,Menlo,Consolas,monospace;border:1px solid #cbd5e1;background:#f1f5f9}
.k-start{background:#dbeafe;border-color:#93c5fd}.k-ok{background:#dcfce7;border-color:#86efac}
.k-retry{background:#fef3c7;border-color:#fcd34d}.k-fail{background:#fee2e2;border-color:#fca5a5}
.k-timer{background:#f1f5f9}.k-signal{background:#ccfbf1;border-color:#5eead4}
.k-cancel{background:#ffedd5;border-color:#fdba74}.k-operator{background:#ede9fe;border-color:#c4b5fd}
.flash{background:#e0f2fe;border:1px solid #7dd3fc;padding:6px 10px;border-radius:4px;margin-bottom:10px}
form.inline{display:inline}
button,input,select,textarea{font:inherit;font-size:13px}
button{padding:2px 10px;border:1px solid #94a3b8;border-radius:4px;background:#fff;cursor:pointer;color:var(--fg)}
button:hover{background:#f1f5f9}
button.primary{background:#1f5fbf;border-color:#1f5fbf;color:#fff}
button.danger{border-color:#dc2626;color:#b91c1c}
button:disabled{opacity:.45;cursor:not-allowed}
input,select{padding:2px 4px;border:1px solid #94a3b8;border-radius:4px;background:#fff}
.filters{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-end}
.filters label{display:flex;flex-direction:column;font-size:12px;color:var(--muted);gap:1px}
.filters input[name=q]{width:380px}
.actions-list{display:flex;flex-direction:column;gap:6px}
.actions-list form{display:flex;gap:6px;align-items:center}
.actions-list input[name=reason]{width:260px}
.why{color:var(--muted);font-size:12px}
dl.facts{display:grid;grid-template-columns:max-content 1fr max-content 1fr max-content 1fr;gap:2px 10px;margin:0}
dl.facts dt{color:var(--muted)}dl.facts dd{margin:0}
details summary{cursor:pointer;color:var(--link)}
details pre{max-height:300px;overflow:auto;background:#f6f8fa;border:1px solid var(--line);padding:6px;margin:4px 0;white-space:pre-wrap;word-break:break-all}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
svg.chart{display:block;width:100%;height:auto}
svg.diagram{display:block;max-width:100%;height:auto}
.login{max-width:340px;margin:60px auto}
.login label{display:block;margin:8px 0 2px;color:var(--muted)}
.login input{width:100%;padding:4px 6px}
.pager{margin-top:6px}
.confirm p.what{font-size:15px;font-weight:600}
"#;

/// Live updates, a few lines of our own: when `<main>` has `data-live`, each server-sent
/// message re-fetches this page and swaps in its `<main>`, unless the user is typing in a field
/// of it (then it tries again a second later); open `<details>` stay open.
pub const SCRIPT: &str = r#"
(function(){
var m=document.querySelector('main[data-live]');
if(!m||!window.EventSource||!window.fetch||!window.DOMParser)return;
var timer=null,busy=false;
function typing(){var a=document.activeElement;return a&&m.contains(a)&&/^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName);}
function later(ms){if(!timer)timer=setTimeout(refresh,ms);}
function refresh(){timer=null;if(busy||typing()){later(1000);return;}busy=true;
fetch(location.href,{credentials:'same-origin',headers:{'Accept':'text/html'}})
.then(function(r){return r.ok?r.text():null;})
.then(function(h){if(!h)return;if(typing()){later(1000);return;}
var n=new DOMParser().parseFromString(h,'text/html').querySelector('main');if(!n)return;
var open=[].map.call(m.querySelectorAll('details[open][id]'),function(d){return d.id;});
m.innerHTML=n.innerHTML;
open.forEach(function(id){var d=document.getElementById(id);if(d)d.open=true;});})
.catch(function(){}).then(function(){busy=false;});}
var es=null;
function listen(){if(!es){es=new EventSource(m.getAttribute('data-live'));es.onmessage=function(){later(250);};}}
function stop(){if(es){es.close();es=null;}}
window.addEventListener('pagehide',stop);
window.addEventListener('pageshow',function(e){listen();if(e.persisted)later(0);});
listen();
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_an_operator_would() {
        assert_eq!(human_duration(TimeDelta::milliseconds(12)), "12 ms");
        assert_eq!(human_duration(TimeDelta::milliseconds(3_400)), "3.4 s");
        assert_eq!(human_duration(TimeDelta::seconds(42)), "42 s");
        assert_eq!(human_duration(TimeDelta::seconds(150)), "2 min");
        assert_eq!(human_duration(TimeDelta::minutes(90)), "1.5 h");
        assert_eq!(human_duration(TimeDelta::hours(20)), "20 h");
        assert_eq!(human_duration(TimeDelta::days(3)), "3 d");
        assert_eq!(human_duration(TimeDelta::milliseconds(-12)), "12 ms");
    }

    #[test]
    fn urls_are_encoded_and_unsafe_links_are_text() {
        assert_eq!(
            with_query(
                "/dashboard/sagas",
                &[("type", "a b&c"), ("status", "failed")]
            ),
            "/dashboard/sagas?type=a+b%26c&status=failed"
        );
        assert_eq!(with_query("/x", &[]), "/x");
        assert_eq!(segment("charge_payment"), "charge_payment");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(safe_href("javascript:alert(1)"), None);
        assert_eq!(safe_href(" JavaScript:alert(1)"), None);
        assert_eq!(safe_href("//evil.example"), None);
        assert_eq!(
            safe_href("/dashboard/sagas?after=x"),
            Some("/dashboard/sagas?after=x")
        );
        assert_eq!(
            safe_href("https://trace.example/t/1"),
            Some("https://trace.example/t/1")
        );
    }
}

//! The login, confirmation, dead-letter, audit-log and error pages.

use maud::{Markup, html};

use super::layout::{self, Frame, Section, csrf_input, link_or_text, time, with_query};
use super::model::{AuditView, ConfirmView, DeadLettersView, ErrorView, LoginView, Page};

/// The login page (`/dashboard/login`): no nav.
pub fn login(page: &Page, view: &LoginView) -> Markup {
    let frame = Frame {
        section: Section::None,
        live: None,
        nav: false,
    };
    let body = html! {
        section.card.login {
            h1 { "Sign in" }
            @if let Some(e) = &view.error {
                p.err role="alert" data-testid="login-error" { (e) }
            }
            form #login-form data-testid="login-form" method="post" action="/dashboard/login" {
                (csrf_input(page))
                label for="username" { "User name" }
                input #username type="text" name="username" value=(view.username) autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="current-password" required;
                p { button.primary type="submit" { "Sign in" } }
            }
        }
    };
    layout::layout(page, frame, body)
}

/// "Are you sure?": what will happen, how many things it touches, Confirm (a POST of the hidden
/// fields with `confirm=yes`, the reason and `csrf`) and Cancel (back). A viewer is told that
/// only operators may act, and gets no form.
pub fn confirm(page: &Page, view: &ConfirmView) -> Markup {
    let frame = Frame {
        section: Section::None,
        live: None,
        nav: true,
    };
    let body = html! {
        section.card.confirm #confirmation data-testid="confirmation" {
            h1 { (view.title) }
            p.what { (view.what) }
            @if let Some(n) = view.dry_run_count {
                p #dry-run-count data-testid="dry-run-count" {
                    "Dry run: this touches " strong { (n) } @if n == 1 { " item." } @else { " items." }
                }
            }
            @if page.is_operator() {
                form method="post" action=(view.action_url) {
                    (csrf_input(page))
                    @for (k, v) in &view.hidden { input type="hidden" name=(k) value=(v); }
                    input type="hidden" name="confirm" value="yes";
                    p {
                        label { "Reason " input type="text" name="reason" value=(view.reason) required size="50"; }
                    }
                    p {
                        button.primary #confirm data-testid="confirm" type="submit" { "Confirm" }
                        " "
                        (link_or_text("Cancel", Some(&view.back_url)))
                    }
                }
            } @else {
                p.err { "Only an operator may do this." }
                p { (link_or_text("Back", Some(&view.back_url))) }
            }
        }
    };
    layout::layout(page, frame, body)
}

/// The dead letters (`/dashboard/dead-letters`): filter by origin; for operators, replay or
/// discard the selected rows, every row matching the filter, or one row.
pub fn dead_letters(page: &Page, view: &DeadLettersView) -> Markup {
    let frame = Frame {
        section: Section::DeadLetters,
        live: None,
        nav: true,
    };
    let operator = page.is_operator();
    let origin = view.origin.as_deref().filter(|o| !o.is_empty());
    let matching = match origin {
        Some(o) => format!(" matching origin={o}"),
        None => " (every origin)".to_owned(),
    };
    let cols = if operator { 8 } else { 6 };
    let body = html! {
        h1 { "Dead letters" }
        section.card {
            form.filters method="get" action="/dashboard/dead-letters" {
                label { "Origin"
                    select name="origin" {
                        option value="" { "any" }
                        @for o in &view.origins {
                            option value=(o.origin) selected[origin == Some(o.origin.as_str())] { (o.origin) " (" (o.count) ")" }
                        }
                    }
                }
                button.primary type="submit" { "Filter" }
            }
        }
        @if operator {
            section.card {
                form.filters #dl-bulk data-testid="dl-bulk" method="post" action="/dashboard/dead-letters" {
                    (csrf_input(page))
                    @if let Some(o) = origin { input type="hidden" name="origin" value=(o); }
                    label { "Reason" input type="text" name="reason" size="30"; }
                    button type="submit" name="action" value="replay" { "Replay selected" }
                    button.danger type="submit" name="action" value="discard" { "Discard selected" }
                    button type="submit" name="action" value="replay_all" { "Replay all" (matching) }
                    button.danger type="submit" name="action" value="discard_all" { "Discard all" (matching) }
                }
            }
        }
        section.card {
            table #dead-letters data-testid="dead-letters" {
                thead {
                    tr {
                        @if operator { th { "" } }
                        th.num { "Seq" } th { "Origin" } th { "Subject" } th.wrap { "Reason" } th { "Time (UTC)" } th.num { "Bytes" }
                        @if operator { th { "" } }
                    }
                }
                tbody {
                    @for d in &view.rows {
                        tr data-seq=(d.seq) {
                            @if operator {
                                td { input type="checkbox" name="seq" value=(d.seq) form="dl-bulk" aria-label={ "select " (d.seq) }; }
                            }
                            td.num { (d.seq) }
                            td { a href=(with_query("/dashboard/dead-letters", &[("origin", &d.origin)])) { (d.origin) } }
                            td.mono { (d.subject) }
                            td.wrap { (d.reason) }
                            td { (time(d.at)) }
                            td.num { (d.size) }
                            @if operator {
                                td {
                                    @for (action, label) in [("replay", "Replay"), ("discard", "Discard")] {
                                        form.inline method="post" action="/dashboard/dead-letters" {
                                            (csrf_input(page))
                                            input type="hidden" name="action" value=(action);
                                            input type="hidden" name="seq" value=(d.seq);
                                            button type="submit" class=[(action == "discard").then_some("danger")] { (label) }
                                        }
                                        " "
                                    }
                                }
                            }
                        }
                    }
                    @if view.rows.is_empty() { (layout::empty_row(cols, "No dead letters.")) }
                }
            }
            @if let Some(next) = &view.next {
                p.pager { (link_or_text("Next page →", Some(next))) }
            }
        }
    };
    layout::layout(page, frame, body)
}

/// The audit log (`/dashboard/audit`), newest first.
pub fn audit(page: &Page, view: &AuditView) -> Markup {
    let frame = Frame {
        section: Section::Audit,
        live: None,
        nav: true,
    };
    let body = html! {
        h1 { "Audit log" }
        section.card {
            table #audit data-testid="audit" {
                thead {
                    tr { th { "Time (UTC)" } th { "Actor" } th { "Role" } th { "Action" } th { "Target" } th.wrap { "Reason" } th.wrap { "Outcome" } }
                }
                tbody {
                    @for a in &view.rows {
                        tr {
                            td { (time(a.at)) }
                            td { (a.actor) }
                            td { (a.role) }
                            td.mono { (a.action) }
                            td.mono { (link_or_text(&a.target, a.target_url.as_deref())) }
                            td.wrap { (a.reason) }
                            td.wrap.err[!a.outcome.starts_with("ok")] { (a.outcome) }
                        }
                    }
                    @if view.rows.is_empty() { (layout::empty_row(7, "Nothing recorded yet.")) }
                }
            }
            @if let Some(next) = &view.next {
                p.pager { (link_or_text("Older →", Some(next))) }
            }
        }
    };
    layout::layout(page, frame, body)
}

/// A problem shown in the browser: the status, its title and what went wrong.
pub fn error(page: &Page, view: &ErrorView) -> Markup {
    let frame = Frame {
        section: Section::None,
        live: None,
        nav: page.user.is_some() || page.dev_mode,
    };
    let body = html! {
        section.card #error data-testid="error" {
            h1 { (view.status) " · " (view.title) }
            p { (view.detail) }
            p { a href="/dashboard" { "Back to the overview" } }
        }
    };
    layout::layout(page, frame, body)
}

//! The saga list (filter, results, bulk action) and a saga's detail page (header, diagram,
//! steps, actions, timers, entities, timeline).

use maud::{Markup, html};

use super::diagram::{self, StepDef};
use super::layout::{
    self, Frame, Section, csrf_input, human_duration, kind_badge, link_or_text, relative, segment,
    status_badge, time,
};
use super::model::{Page, STATUSES, SagaAction, SagaDetailView, SagaListView};

/// The saga list (`/dashboard/sagas`), live.
pub fn saga_list(page: &Page, view: &SagaListView) -> Markup {
    let frame = Frame {
        section: Section::Sagas,
        live: Some("/dashboard/events"),
        nav: true,
    };
    let f = &view.filter;
    let selected = |v: &Option<String>, want: &str| v.as_deref() == Some(want);
    let body = html! {
        h1 { "Sagas" }
        section.card {
            form.filters #saga-filter method="get" action="/dashboard/sagas" {
                label { "Type"
                    select name="type" {
                        option value="" { "any" }
                        @for t in &view.types { option value=(t) selected[selected(&f.saga_type, t)] { (t) } }
                        // A type in the URL that is not registered stays selectable.
                        @if let Some(t) = f.saga_type.as_deref().filter(|t| !t.is_empty() && !view.types.iter().any(|x| x == t)) {
                            option value=(t) selected { (t) }
                        }
                    }
                }
                label { "Status"
                    select name="status" {
                        option value="" { "any" }
                        @for s in STATUSES { option value=(s) selected[selected(&f.status, s)] { (s) } }
                    }
                }
                label { "State" input type="text" name="state" size="14" value=(f.state.as_deref().unwrap_or("")) placeholder="e.g. retrying"; }
                label { "From (UTC)" input type="datetime-local" name="from" value=(f.from.as_deref().unwrap_or("")); }
                label { "To (UTC)" input type="datetime-local" name="to" value=(f.to.as_deref().unwrap_or("")); }
                label { "Search"
                    input type="search" name="q" value=(f.q.as_deref().unwrap_or(""))
                        placeholder="saga id, order id, correlation id, customer id or email";
                }
                button.primary type="submit" { "Filter" }
                a href="/dashboard/sagas" { "Clear" }
            }
        }
        section.card {
            @if let Some(n) = view.count {
                p #saga-count data-testid="saga-count" { strong { (n) } " matching sagas" }
            }
            table #saga-list data-testid="saga-list" {
                thead {
                    tr {
                        th { "Saga" } th { "Type" } th { "Status" } th { "State" } th { "Order" }
                        th { "Correlation id" } th { "Created (UTC)" } th { "Updated (UTC)" }
                    }
                }
                tbody {
                    @for s in &view.rows {
                        tr data-saga=(s.id) {
                            td.mono { a href={ "/dashboard/sagas/" (s.id) } { (s.id) } }
                            td { (s.saga_type) }
                            td { (status_badge(&s.status)) }
                            td.mono { (s.state) }
                            td.mono { (s.subject.as_deref().unwrap_or("")) }
                            td.mono { (s.correlation_id) }
                            td { (time(s.created_at)) }
                            td { (time(s.updated_at)) }
                        }
                    }
                    @if view.rows.is_empty() { (layout::empty_row(8, "No saga matches the filter.")) }
                }
            }
            @if let Some(next) = &view.next {
                p.pager { (link_or_text("Next page →", Some(next))) }
            }
        }
        @if page.is_operator() && !view.bulk_actions.is_empty() {
            section.card #bulk data-testid="bulk" {
                h2 { "Act on every saga matching this filter" }
                form.filters method="post" action="/dashboard/sagas/bulk" {
                    (csrf_input(page))
                    @for (k, v) in f.pairs() { input type="hidden" name=(k) value=(v); }
                    label { "Action"
                        select name="action" required {
                            @for a in &view.bulk_actions { option value=(a.as_str()) { (a.label()) } }
                        }
                    }
                    label { "Reason" input type="text" name="reason" required size="40"; }
                    button type="submit" { "Review…" }
                    span.why { "You will see how many sagas it touches before anything is done." }
                }
            }
        }
    };
    layout::layout(page, frame, body)
}

/// A saga's page (`/dashboard/sagas/{id}`), live. `definition` is its type's steps, for the
/// diagram.
pub fn saga_detail(page: &Page, view: &SagaDetailView, definition: &[StepDef<'_>]) -> Markup {
    let s = &view.saga;
    let live = format!("/dashboard/events?saga={}&version={}", s.id, view.version);
    let frame = Frame {
        section: Section::Sagas,
        live: Some(&live),
        nav: true,
    };
    let progress = diagram::progress(
        definition,
        &s.status,
        &view.steps,
        view.failed_step.as_deref(),
    );
    let body = html! {
        h1 {
            "Saga " span.mono { (s.id) } " "
            span #saga-status data-testid="saga-status" class={ "badge " (layout::status_class(&s.status)) } { (s.status) }
        }
        section.card {
            dl.facts {
                dt { "Type" } dd { (s.saga_type) }
                dt { "State" } dd #saga-state .mono data-testid="saga-state" { (s.state) }
                dt { "Version" } dd { (view.version) }
                dt { "Order" } dd.mono { (s.subject.as_deref().unwrap_or("—")) }
                dt { "Correlation id" } dd.mono { (s.correlation_id) }
                dt { "Trace" } dd.mono {
                    @match &view.trace_id {
                        Some(t) => (link_or_text(t, view.trace_url.as_deref())),
                        None => "—",
                    }
                }
                dt { "Created (UTC)" } dd { (time(s.created_at)) }
                dt { "Updated (UTC)" } dd { (time(s.updated_at)) " " span.muted { "(" (relative(s.updated_at, view.now)) ")" } }
            }
        }
        section.card {
            h2 { "State machine" }
            (diagram::diagram(definition, &progress))
        }
        div.grid2 {
            section.card #steps data-testid="steps" {
                h2 { "Steps" }
                table {
                    thead { tr { th { "Step" } th { "Service" } th { "Status" } th.num { "Attempts" } th.num { "Comp. attempts" } th.wrap { "Last error" } } }
                    tbody {
                        @for st in &view.steps {
                            tr data-step=(st.name) {
                                td.mono { (st.name) }
                                td { (st.service.as_deref().unwrap_or("—")) }
                                td.mono { (st.status) }
                                td.num { (st.attempts) }
                                td.num { (st.compensation_attempts) }
                                td.wrap.err { (st.last_error.as_deref().unwrap_or("")) }
                            }
                        }
                        @if view.steps.is_empty() { (layout::empty_row(6, "No steps recorded.")) }
                    }
                }
            }
            div {
                @if page.is_operator() {
                    section.card #actions data-testid="actions" {
                        h2 { "Operator actions" }
                        div.actions-list {
                            @for a in &view.actions {
                                @let name = a.action.as_str();
                                form id={ "action-" (name) } data-testid={ "action-" (name) } method="post"
                                    action={ "/dashboard/sagas/" (s.id) "/actions/" (segment(name)) } {
                                    (csrf_input(page))
                                    button type="submit" class=[(a.action == SagaAction::Cancel).then_some("danger")] disabled[!a.enabled] { (a.action.label()) }
                                    @if a.enabled {
                                        input type="text" name="reason" required placeholder="reason (required)";
                                    } @else if let Some(why) = &a.why_not {
                                        span.why { (why) }
                                    }
                                }
                            }
                            @if view.actions.is_empty() { p.muted { "No action applies." } }
                        }
                    }
                }
                section.card #timers data-testid="timers" {
                    h2 { "Pending timers" }
                    table {
                        thead { tr { th { "Timer" } th { "Fires at (UTC)" } th { "In" } } }
                        tbody {
                            @for t in &view.timers {
                                tr {
                                    td.mono { (t.name) }
                                    td { (time(t.fire_at)) }
                                    td { @if t.fire_at >= view.now { (relative(t.fire_at, view.now)) } @else { span.err { "overdue by " (human_duration(view.now - t.fire_at)) } } }
                                }
                            }
                            @if view.timers.is_empty() { (layout::empty_row(3, "No pending timer.")) }
                        }
                    }
                }
                section.card #entities data-testid="entities" {
                    h2 { "What it touched" }
                    table {
                        tbody {
                            @for e in &view.entities {
                                tr { th { (e.label) } td.mono { (link_or_text(&e.value, e.url.as_deref())) } }
                            }
                            @if view.entities.is_empty() { (layout::empty_row(2, "Nothing recorded.")) }
                        }
                    }
                }
            }
        }
        section.card {
            h2 { "Timeline" }
            table #timeline data-testid="timeline" {
                thead {
                    tr { th.num { "#" } th { "Time (UTC)" } th.num { "+" } th { "Input" } th.wrap { "What happened" } th { "By" } th { "State after" } th.wrap { "Details" } }
                }
                tbody {
                    @for (i, e) in view.timeline.iter().enumerate() {
                        tr data-seq=(e.seq) data-kind=(e.kind) {
                            td.num { (e.seq) }
                            td { (time(e.at)) }
                            td.num.muted {
                                @match i.checked_sub(1).and_then(|p| view.timeline.get(p)) {
                                    Some(prev) => (human_duration(e.at - prev.at)),
                                    None => "—",
                                }
                            }
                            td { (kind_badge(&e.kind)) }
                            td.wrap { (e.summary) }
                            td { (e.actor.as_deref().unwrap_or("")) }
                            td.mono { (e.state_after) }
                            td.wrap {
                                details id={ "ev-" (e.seq) } {
                                    summary { (effects_summary(&e.effects)) }
                                    div.muted { "input" }
                                    pre.mono { (pretty(&e.input)) }
                                    div.muted { "effects" }
                                    pre.mono { (pretty(&e.effects)) }
                                }
                            }
                        }
                    }
                    @if view.timeline.is_empty() { (layout::empty_row(8, "No events.")) }
                }
            }
        }
    };
    layout::layout(page, frame, body)
}

/// Indented JSON (escaped by the template like any text).
fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// "3 effects", "no effects".
fn effects_summary(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(a) if a.is_empty() => "no effects".to_owned(),
        serde_json::Value::Array(a) if a.len() == 1 => "1 effect".to_owned(),
        serde_json::Value::Array(a) => format!("{} effects", a.len()),
        serde_json::Value::Null => "no effects".to_owned(),
        _ => "effects".to_owned(),
    }
}

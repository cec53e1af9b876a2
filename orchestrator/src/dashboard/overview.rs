//! The overview: counts by type and status, the last hour's charts, what needs attention, the
//! breakers, the worker pools and the dead letters.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use maud::{Markup, html};

use super::charts::{self, LineChart, Series};
use super::layout::{self, Frame, Section, csrf_input, segment, status_badge, time, with_query};
use super::model::{BreakerRow, Forced, OverviewView, Page, STATUSES};

/// The charts' window: sixty one-minute buckets, the last holding `now`.
const BUCKETS: usize = 60;

/// Partition numbers, comma-separated.
fn partition_list(partitions: &[i32]) -> String {
    partitions
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The overview page (`/dashboard`), live.
pub fn overview(page: &Page, view: &OverviewView) -> Markup {
    let frame = Frame {
        section: Section::Overview,
        live: Some("/dashboard/events"),
        nav: true,
    };
    let body = html! {
        h1 { "Overview" }
        section.card { h2 { "Sagas by type and status" } (counts(view)) }
        div.grid3 {
            @for chart in charts(view) {
                section.card { (charts::line_chart(&chart)) }
            }
        }
        section.card #attention data-testid="attention" {
            h2 { "Needs attention" }
            table {
                thead { tr { th { "Saga" } th { "Type" } th { "Status" } th { "State" } th { "Order" } th.wrap { "Why" } th { "Since" } } }
                tbody {
                    @for r in &view.attention {
                        tr {
                            td.mono { a href={ "/dashboard/sagas/" (r.id) } { (r.id) } }
                            td { (r.saga_type) }
                            td { (status_badge(&r.status)) }
                            td.mono { (r.state) }
                            td.mono { (r.subject.as_deref().unwrap_or("")) }
                            td.wrap { (r.why) }
                            td { (time(r.since)) }
                        }
                    }
                    @if view.attention.is_empty() { (layout::empty_row(7, "Nothing needs attention.")) }
                }
            }
        }
        section.card #breakers data-testid="breakers" {
            h2 { "Circuit breakers" }
            (breakers(page, &view.breakers))
        }
        div.grid2 {
            section.card #pools data-testid="pools" {
                h2 { "Worker pools" }
                table {
                    thead { tr { th { "Service" } th.num { "Pending" } th.num { "Ack pending" } } }
                    tbody {
                        @for p in &view.pools {
                            tr { td { (p.service) } td.num { (p.pending) } td.num { (p.ack_pending) } }
                        }
                        @if view.pools.is_empty() { (layout::empty_row(3, "No worker pools.")) }
                    }
                }
            }
            section.card #orchestrators data-testid="orchestrators" {
                h2 { "Orchestrators" }
                table {
                    thead { tr { th { "Instance" } th.num { "Partitions" } th.wrap { "Held" } th { "Lease until" } } }
                    tbody {
                        @for m in &view.members {
                            tr {
                                td { code { (m.instance) } }
                                td.num { (m.partitions.len()) }
                                td.wrap { (partition_list(&m.partitions)) }
                                td { (time(m.expires_at)) }
                            }
                        }
                        @if view.members.is_empty() { (layout::empty_row(4, "No live orchestrator.")) }
                        @if !view.unowned.is_empty() {
                            tr { td { strong { "Unowned" } } td.num { (view.unowned.len()) } td.wrap { (partition_list(&view.unowned)) } td { "waiting for an owner" } }
                        }
                    }
                }
            }
            section.card #dead-letter-counts data-testid="dead-letter-counts" {
                h2 { "Dead letters" }
                table {
                    thead { tr { th { "Origin" } th.num { "Messages" } } }
                    tbody {
                        @for o in &view.dead_letters {
                            tr {
                                td { a href=(with_query("/dashboard/dead-letters", &[("origin", &o.origin)])) { (o.origin) } }
                                td.num { (o.count) }
                            }
                        }
                        @if view.dead_letters.is_empty() { (layout::empty_row(2, "No dead letters.")) }
                    }
                }
            }
        }
    };
    layout::layout(page, frame, body)
}

/// Types down, statuses across; each count links to the filtered list.
fn counts(view: &OverviewView) -> Markup {
    let mut types: Vec<&str> = view.counts.iter().map(|c| c.saga_type.as_str()).collect();
    types.sort_unstable();
    types.dedup();
    // The known statuses in their order, then any other the rows name.
    let mut statuses: Vec<&str> = STATUSES.to_vec();
    for c in &view.counts {
        if !statuses.contains(&c.status.as_str()) {
            statuses.push(&c.status);
        }
    }
    let count = |t: &str, s: &str| -> i64 {
        view.counts
            .iter()
            .filter(|c| c.saga_type == t && c.status == s)
            .map(|c| c.count)
            .sum()
    };
    html! {
        table #overview-counts data-testid="overview-counts" {
            thead {
                tr {
                    th { "Type" }
                    @for s in &statuses { th.num { (status_badge(s)) } }
                    th.num { "Total" }
                }
            }
            tbody {
                @for t in &types {
                    tr {
                        td { a href=(with_query("/dashboard/sagas", &[("type", t)])) { (t) } }
                        @for s in &statuses {
                            @let n = count(t, s);
                            td.num {
                                @if n == 0 {
                                    span.muted { "0" }
                                } @else {
                                    a href=(with_query("/dashboard/sagas", &[("type", t), ("status", s)]))
                                        data-type=(t) data-status=(s) { (n) }
                                }
                            }
                        }
                        td.num { (statuses.iter().map(|s| count(t, s)).sum::<i64>()) }
                    }
                }
                @if types.is_empty() { (layout::empty_row(statuses.len() + 2, "No sagas yet.")) }
            }
        }
    }
}

/// The minute buckets of the last hour: the start of the first, and a point's bucket.
fn window(now: DateTime<Utc>) -> DateTime<Utc> {
    let minute = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now);
    minute - TimeDelta::minutes(BUCKETS as i64 - 1)
}

fn bucket(start: DateTime<Utc>, minute: DateTime<Utc>) -> Option<usize> {
    let i = (minute - start).num_seconds().div_euclid(60);
    usize::try_from(i).ok().filter(|i| *i < BUCKETS)
}

/// Counts per minute, zero where no point was given.
fn counted<T>(
    start: DateTime<Utc>,
    points: &[T],
    at: impl Fn(&T) -> (DateTime<Utc>, i64),
) -> Vec<Option<f64>> {
    let mut v = vec![Some(0.0); BUCKETS];
    for p in points {
        let (minute, n) = at(p);
        if let Some(slot) = bucket(start, minute).and_then(|i| v.get_mut(i)) {
            *slot = Some(slot.unwrap_or(0.0) + n as f64);
        }
    }
    v
}

fn charts(view: &OverviewView) -> [LineChart<'static>; 3] {
    let start = window(view.now);
    let latency = |pick: fn(&super::model::LatencyPoint) -> Option<f64>| {
        let mut v = vec![None; BUCKETS];
        for p in &view.latency {
            if let Some(slot) = bucket(start, p.minute).and_then(|i| v.get_mut(i)) {
                *slot = pick(p);
            }
        }
        v
    };
    let chart = |id, title, unit, integer, series| LineChart {
        id,
        title,
        unit,
        start,
        bucket: TimeDelta::minutes(1),
        integer,
        series,
    };
    [
        chart(
            "chart-throughput",
            "Throughput (per minute)",
            "/min",
            true,
            vec![
                Series {
                    label: "started",
                    colour: charts::BLUE,
                    values: counted(start, &view.throughput, |p| (p.minute, p.started)),
                },
                Series {
                    label: "completed",
                    colour: charts::GREEN,
                    values: counted(start, &view.throughput, |p| (p.minute, p.completed)),
                },
            ],
        ),
        chart(
            "chart-latency",
            "Latency of completed sagas (ms)",
            "ms",
            false,
            vec![
                Series {
                    label: "p50",
                    colour: charts::GREEN,
                    values: latency(|p| p.p50_ms),
                },
                Series {
                    label: "p95",
                    colour: charts::AMBER,
                    values: latency(|p| p.p95_ms),
                },
                Series {
                    label: "p99",
                    colour: charts::RED,
                    values: latency(|p| p.p99_ms),
                },
            ],
        ),
        chart(
            "chart-failures",
            "Failures (per minute)",
            "/min",
            true,
            vec![
                Series {
                    label: "compensated",
                    colour: charts::SLATE,
                    values: counted(start, &view.failures, |p| (p.minute, p.compensated)),
                },
                Series {
                    label: "failed",
                    colour: charts::RED,
                    values: counted(start, &view.failures, |p| (p.minute, p.failed)),
                },
            ],
        ),
    ]
}

/// The breakers, with force buttons for operators.
fn breakers(page: &Page, rows: &[BreakerRow]) -> Markup {
    let operator = page.is_operator();
    html! {
        table {
            thead {
                tr {
                    th { "Step" } th { "State" } th { "Forced" }
                    @if operator { th { "Force" } }
                }
            }
            tbody {
                @for b in rows {
                    tr data-step=(b.step) {
                        td.mono { (b.step) }
                        td { span class={ "badge b-" (b.state.as_str()) } { (b.state.as_str()) } }
                        td { @match b.forced { Some(f) => strong { (f.as_str()) }, None => span.muted { "no" } } }
                        @if operator {
                            td {
                                form.inline method="post" action={ "/dashboard/breakers/" (segment(&b.step)) } {
                                    (csrf_input(page))
                                    input type="text" name="reason" placeholder="reason" required size="14";
                                    " "
                                    button.danger type="submit" name="state" value="open" disabled[b.forced == Some(Forced::Open)] { "Force open" }
                                    " "
                                    button type="submit" name="state" value="closed" disabled[b.forced == Some(Forced::Closed)] { "Force closed" }
                                    " "
                                    button type="submit" name="state" value="auto" disabled[b.forced.is_none()] { "Clear force" }
                                }
                            }
                        }
                    }
                }
                @if rows.is_empty() { (layout::empty_row(if operator { 4 } else { 3 }, "No breakers.")) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_fall_in_their_minute_of_the_last_hour() {
        let now = DateTime::parse_from_rfc3339("2024-05-01T12:34:56Z")
            .unwrap()
            .to_utc();
        let start = window(now);
        assert_eq!(start.to_rfc3339(), "2024-05-01T11:35:00+00:00");
        assert_eq!(bucket(start, start), Some(0));
        assert_eq!(bucket(start, now), Some(59));
        assert_eq!(bucket(start, start - TimeDelta::seconds(1)), None);
        assert_eq!(bucket(start, now + TimeDelta::minutes(1)), None);
    }
}

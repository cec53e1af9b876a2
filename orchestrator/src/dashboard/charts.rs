//! Line charts drawn on the server as inline SVG: axes, ticks, a legend and a `<title>` per
//! point for hover. No script, no external resource.
//!
//! A chart has a fixed number of equal time buckets; each series has a value per bucket or a
//! gap (`None`). The y axis starts at zero and ends at a round number at or above the largest
//! value; an empty or all-zero chart still draws its axes (0 to 1) and says so.

use chrono::{DateTime, TimeDelta, Utc};
use maud::{Markup, html};

/// Colours for series (static: a colour is never data).
pub const BLUE: &str = "#2563eb";
pub const GREEN: &str = "#16a34a";
pub const AMBER: &str = "#d97706";
pub const RED: &str = "#dc2626";
pub const SLATE: &str = "#64748b";

const WIDTH: f64 = 420.0;
const HEIGHT: f64 = 200.0;
const LEFT: f64 = 44.0;
const RIGHT: f64 = 10.0;
const TOP: f64 = 38.0;
const BOTTOM: f64 = 24.0;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series<'a> {
    pub label: &'a str,
    /// One of this module's colours.
    pub colour: &'static str,
    /// One value per bucket; `None` is a gap in the line.
    pub values: Vec<Option<f64>>,
}

/// A line chart over equal time buckets.
#[derive(Debug, Clone)]
pub struct LineChart<'a> {
    /// The SVG element's `id` (and `data-testid`).
    pub id: &'a str,
    pub title: &'a str,
    /// After each value in the hover text, e.g. "/min" or "ms".
    pub unit: &'a str,
    /// The start of the first bucket.
    pub start: DateTime<Utc>,
    pub bucket: TimeDelta,
    /// Whole numbers only on the y axis (counts).
    pub integer: bool,
    /// Each as long as the number of buckets (shorter ones are padded with gaps).
    pub series: Vec<Series<'a>>,
}

impl LineChart<'_> {
    fn buckets(&self) -> usize {
        self.series
            .iter()
            .map(|s| s.values.len())
            .max()
            .unwrap_or(0)
    }

    fn max(&self) -> f64 {
        self.series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
    }
}

/// The y axis: ticks from zero by a round step up to the first tick at or above `max`.
fn y_ticks(max: f64, integer: bool) -> Vec<f64> {
    if max <= 0.0 || !max.is_finite() {
        return vec![0.0, 1.0];
    }
    let raw = max / 4.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let mut step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    if integer {
        step = step.max(1.0).ceil();
    }
    let n = (max / step).ceil().max(1.0) as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

/// A tick or hover value: whole numbers without decimals, others to two at most.
fn number(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// Draws the chart. Robust to no buckets, no series, gaps only and zeros only.
pub fn line_chart(chart: &LineChart<'_>) -> Markup {
    let buckets = chart.buckets();
    let ticks = y_ticks(chart.max(), chart.integer);
    let top_value = ticks.last().copied().unwrap_or(1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |i: usize| -> f64 {
        if buckets <= 1 {
            LEFT + plot_w / 2.0
        } else {
            LEFT + plot_w * i as f64 / (buckets - 1) as f64
        }
    };
    let y = |v: f64| -> f64 { TOP + plot_h - plot_h * (v / top_value) };
    let has_values = chart
        .series
        .iter()
        .any(|s| s.values.iter().any(Option::is_some));
    let all_zero = has_values && chart.max() <= 0.0;
    let label_every = if buckets > 30 { 10 } else { 5 };
    let at = |i: usize| chart.start + chart.bucket * i as i32;
    // Each legend entry as wide as its label (about 6.5 px a character at 11 px).
    let legend_x: Vec<f64> = chart
        .series
        .iter()
        .scan(LEFT, |x, s| {
            let here = *x;
            *x += 28.0 + 6.5 * s.label.chars().count() as f64;
            Some(here)
        })
        .collect();

    html! {
        svg.chart id=(chart.id) data-testid=(chart.id) xmlns="http://www.w3.org/2000/svg"
            viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } role="img" aria-label=(chart.title) {
            title { (chart.title) }
            text x=(LEFT) y="13" font-size="12" font-weight="600" fill="#1d2330" { (chart.title) }
            // Legend, under the title.
            @for (k, s) in chart.series.iter().enumerate() {
                @let lx = legend_x[k];
                g.legend {
                    rect x=(lx) y="19" width="10" height="10" rx="2" fill=(s.colour) {}
                    text x=(lx + 14.0) y="28" font-size="11" fill="#1d2330" { (s.label) }
                }
            }
            // Y grid and ticks.
            @for t in &ticks {
                line x1=(LEFT) x2=(WIDTH - RIGHT) y1=(y(*t)) y2=(y(*t)) stroke="#e5e7eb" stroke-width="1" {}
                text x=(LEFT - 4.0) y=(y(*t) + 3.5) font-size="10" text-anchor="end" fill="#5b6472" { (number(*t)) }
            }
            // Axes.
            line x1=(LEFT) x2=(LEFT) y1=(TOP) y2=(TOP + plot_h) stroke="#94a3b8" {}
            line x1=(LEFT) x2=(WIDTH - RIGHT) y1=(TOP + plot_h) y2=(TOP + plot_h) stroke="#94a3b8" {}
            // X ticks: every few buckets, and the last.
            @for i in 0..buckets {
                @if i % label_every == 0 || i + 1 == buckets {
                    line x1=(x(i)) x2=(x(i)) y1=(TOP + plot_h) y2=(TOP + plot_h + 4.0) stroke="#94a3b8" {}
                    @if i + 1 == buckets || buckets - 1 - i >= label_every / 2 {
                        text x=(x(i)) y=(HEIGHT - 8.0) font-size="10" fill="#5b6472"
                            text-anchor=(if i + 1 == buckets && buckets > 1 { "end" } else { "middle" }) {
                            (at(i).format("%H:%M"))
                        }
                    }
                }
            }
            @if !has_values {
                text.no-data x=(LEFT + plot_w / 2.0) y=(TOP + plot_h / 2.0) font-size="12" text-anchor="middle" fill="#5b6472" {
                    "No data in this window"
                }
            } @else if all_zero {
                text.no-data x=(LEFT + plot_w / 2.0) y=(TOP + plot_h / 2.0) font-size="12" text-anchor="middle" fill="#5b6472" {
                    "All zero"
                }
            }
            // Lines (one polyline per run without gaps), then points with their hover text.
            @for s in &chart.series {
                @let colour = s.colour;
                g.series data-series=(s.label) {
                    @for run in runs(&s.values) {
                        @if run.len() > 1 {
                            polyline fill="none" stroke=(colour) stroke-width="1.6" stroke-linejoin="round"
                                points=(points(&run, &x, &y)) {}
                        }
                    }
                    @for (i, v) in s.values.iter().enumerate() {
                        @if let Some(v) = v.filter(|v| v.is_finite()) {
                            circle cx=(x(i)) cy=(y(v)) r="2.2" fill=(colour) {
                                title { (at(i).format("%H:%M")) " " (s.label) ": " (number(v)) " " (chart.unit) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The runs of consecutive values, each as (bucket, value) pairs.
fn runs(values: &[Option<f64>]) -> Vec<Vec<(usize, f64)>> {
    let mut out: Vec<Vec<(usize, f64)>> = Vec::new();
    let mut current = Vec::new();
    for (i, v) in values.iter().enumerate() {
        match v.filter(|v| v.is_finite()) {
            Some(v) => current.push((i, v)),
            None if !current.is_empty() => out.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn points(run: &[(usize, f64)], x: &impl Fn(usize) -> f64, y: &impl Fn(f64) -> f64) -> String {
    run.iter()
        .map(|(i, v)| format!("{:.1},{:.1}", x(*i), y(*v)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(series: Vec<Series<'static>>) -> String {
        line_chart(&LineChart {
            id: "chart-test",
            title: "Test",
            unit: "/min",
            start: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            bucket: TimeDelta::minutes(1),
            integer: true,
            series,
        })
        .into_string()
    }

    #[test]
    fn ticks_are_round_and_cover_the_maximum() {
        assert_eq!(y_ticks(0.0, true), vec![0.0, 1.0]);
        assert_eq!(y_ticks(3.0, true), vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(y_ticks(1.0, true), vec![0.0, 1.0]);
        assert_eq!(y_ticks(1.0, false), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(y_ticks(97.0, true), vec![0.0, 25.0, 50.0, 75.0, 100.0]);
        let t = y_ticks(1234.5, false);
        assert!(*t.last().unwrap() >= 1234.5 && t.len() <= 6, "{t:?}");
        assert_eq!(y_ticks(f64::NAN, false), vec![0.0, 1.0]);
    }

    #[test]
    fn empty_charts_draw_axes_and_say_so() {
        let none = chart(vec![]);
        assert!(none.contains(r#"id="chart-test""#) && none.contains("No data"));
        let gaps = chart(vec![Series {
            label: "p50",
            colour: BLUE,
            values: vec![None; 60],
        }]);
        assert!(gaps.contains("No data") && !gaps.contains("<circle"));
        let zero = chart(vec![Series {
            label: "started",
            colour: BLUE,
            values: vec![Some(0.0); 60],
        }]);
        assert!(zero.contains("All zero") && zero.contains("<polyline"));
        assert!(!zero.contains("NaN") && !zero.contains("inf"));
        let one = chart(vec![Series {
            label: "started",
            colour: BLUE,
            values: vec![Some(5.0)],
        }]);
        assert!(one.contains("<circle") && !one.contains("NaN"));
    }

    #[test]
    fn points_have_hover_titles_and_gaps_split_lines() {
        let svg = chart(vec![Series {
            label: "started",
            colour: BLUE,
            values: vec![Some(1.0), Some(2.0), None, Some(4.0), Some(3.0)],
        }]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("started: 4 /min"));
        // Every SVG element is closed: an unclosed one would swallow its siblings.
        assert_eq!(
            svg.matches("<circle").count(),
            svg.matches("</circle>").count()
        );
        assert_eq!(svg.matches("<line").count(), svg.matches("</line>").count());
    }
}

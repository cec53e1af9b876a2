//! A saga type's state machine as an SVG diagram, with one saga's progress on it.
//!
//! The forward path runs left to right, one box per step; the compensations of the steps that
//! have one run below, right to left, into `compensated`; `completed` ends the forward path,
//! `failed` and `resolved` (an operator's) sit at the right of the compensation row. The saga's
//! current step (forward or compensating) or terminal state is highlighted, and the path it took
//! is coloured: steps succeeded, the step that failed, compensations done or failed.

use maud::{Markup, html};

use super::model::StepRow;

/// A step of a saga type's definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepDef<'a> {
    pub name: &'a str,
    /// "compensatable", "pivot", "retriable", ...: shown under the name.
    pub kind: &'a str,
    /// The forward command's action, if the step sends one.
    pub action: Option<&'a str>,
    /// The compensating action; a step without one has no box on the compensation row.
    pub compensation: Option<&'a str>,
    /// The signal the step waits for, if any.
    pub awaits: Option<&'a str>,
}

/// How far a step got forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    NotReached,
    /// In flight, retrying, parked or awaiting its signal.
    Active,
    Succeeded,
    /// Where the saga turned around.
    Failed,
}

/// How far a step's compensation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compensation {
    None,
    Active,
    Done,
    Failed,
}

/// How a saga ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    Completed,
    Compensated,
    Failed,
    Resolved,
}

impl Terminal {
    pub const ALL: [Terminal; 4] = [
        Terminal::Completed,
        Terminal::Compensated,
        Terminal::Failed,
        Terminal::Resolved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Terminal::Completed => "completed",
            Terminal::Compensated => "compensated",
            Terminal::Failed => "failed",
            Terminal::Resolved => "resolved",
        }
    }

    pub fn parse(status: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == status)
    }
}

/// Where the saga is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// At the step of this index of the definition.
    Forward(usize),
    /// Compensating the step of this index.
    Compensating(usize),
    Ended(Terminal),
    /// Between steps, or a state the diagram cannot place: nothing highlighted.
    Unknown,
}

/// One saga's progress over its type's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub position: Position,
    /// One per step of the definition.
    pub steps: Vec<(Forward, Compensation)>,
}

/// Reads a saga's progress from its status and its steps' statuses (matched to the definition
/// by name). `failed_step`, when given, is marked as the failure point whatever its status says
/// (a step abandoned and then compensated says `compensated`).
pub fn progress(
    defs: &[StepDef<'_>],
    status: &str,
    steps: &[StepRow],
    failed_step: Option<&str>,
) -> Progress {
    let marks: Vec<(Forward, Compensation)> = defs
        .iter()
        .map(|d| {
            let status = steps
                .iter()
                .find(|s| s.name == d.name)
                .map_or("pending", |s| s.status.as_str());
            let (mut fwd, comp) = match status {
                "running" | "retrying" | "parked" | "awaiting" => {
                    (Forward::Active, Compensation::None)
                }
                "succeeded" => (Forward::Succeeded, Compensation::None),
                "rejected" | "abandoned" => (Forward::Failed, Compensation::None),
                "compensating" | "compensation_retrying" | "compensation_parked" => {
                    (Forward::Succeeded, Compensation::Active)
                }
                "compensated" => (Forward::Succeeded, Compensation::Done),
                "compensation_failed" => (Forward::Succeeded, Compensation::Failed),
                _ => (Forward::NotReached, Compensation::None),
            };
            if failed_step == Some(d.name) {
                fwd = Forward::Failed;
            }
            (fwd, comp)
        })
        .collect();
    let position = if let Some(t) = Terminal::parse(status) {
        Position::Ended(t)
    } else if let Some(i) = marks.iter().position(|m| m.0 == Forward::Active) {
        Position::Forward(i)
    } else if let Some(i) = marks.iter().position(|m| m.1 == Compensation::Active) {
        Position::Compensating(i)
    } else {
        Position::Unknown
    };
    Progress {
        position,
        steps: marks,
    }
}

/// Sizes that keep 1 to 10 steps readable: boxes narrow as steps are added, and the SVG
/// scales to the page's width, never above its natural size.
struct Geometry {
    box_w: f64,
    gap: f64,
    left: f64,
    fwd_y: f64,
    comp_y: f64,
    box_h: f64,
    term_w: f64,
    term_h: f64,
}

impl Geometry {
    fn for_steps(n: usize) -> Self {
        let (box_w, gap) = match n {
            0..=4 => (150.0, 50.0),
            5..=7 => (122.0, 40.0),
            _ => (100.0, 32.0),
        };
        Geometry {
            box_w,
            gap,
            left: 132.0,
            fwd_y: 36.0,
            comp_y: 150.0,
            box_h: 44.0,
            term_w: 104.0,
            term_h: 28.0,
        }
    }

    fn x(&self, i: usize) -> f64 {
        self.left + i as f64 * (self.box_w + self.gap)
    }

    /// The left edge of the right-hand terminals.
    fn right(&self, n: usize) -> f64 {
        self.x(n) - self.gap + 44.0
    }

    fn width(&self, n: usize) -> f64 {
        self.right(n) + self.term_w + 12.0
    }

    /// Without the legend.
    fn height(&self) -> f64 {
        self.comp_y + self.box_h + 66.0
    }

    fn chars(&self, font: f64) -> usize {
        ((self.box_w - 12.0) / (font * 0.6)) as usize
    }
}

const GREY: &str = "#94a3b8";
const GREEN: &str = "#16a34a";
const BLUE: &str = "#2563eb";
const RED: &str = "#dc2626";
const ORANGE: &str = "#ea580c";
const SLATE: &str = "#64748b";
const PURPLE: &str = "#7c3aed";

/// Fill and stroke of a forward box.
fn forward_colours(m: Forward) -> (&'static str, &'static str) {
    match m {
        Forward::NotReached => ("#ffffff", GREY),
        Forward::Active => ("#dbeafe", BLUE),
        Forward::Succeeded => ("#dcfce7", GREEN),
        Forward::Failed => ("#fee2e2", RED),
    }
}

fn compensation_colours(m: Compensation) -> (&'static str, &'static str) {
    match m {
        Compensation::None => ("#ffffff", GREY),
        Compensation::Active => ("#ffedd5", ORANGE),
        Compensation::Done => ("#e2e8f0", SLATE),
        Compensation::Failed => ("#fee2e2", RED),
    }
}

fn terminal_colour(t: Terminal) -> &'static str {
    match t {
        Terminal::Completed => GREEN,
        Terminal::Compensated => SLATE,
        Terminal::Failed => RED,
        Terminal::Resolved => PURPLE,
    }
}

fn forward_name(m: Forward) -> &'static str {
    match m {
        Forward::NotReached => "not_reached",
        Forward::Active => "active",
        Forward::Succeeded => "succeeded",
        Forward::Failed => "failed",
    }
}

fn compensation_name(m: Compensation) -> &'static str {
    match m {
        Compensation::None => "none",
        Compensation::Active => "active",
        Compensation::Done => "compensated",
        Compensation::Failed => "failed",
    }
}

/// `text` cut to `max` characters with an ellipsis (the box's `<title>` has it whole).
fn fit(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// The diagram of `defs` with `progress` on it, in a `<figure id="diagram">`.
pub fn diagram(defs: &[StepDef<'_>], progress: &Progress) -> Markup {
    let n = defs.len();
    let g = Geometry::for_steps(n);
    let (w, h) = (g.width(n), g.height());
    let mark = |i: usize| {
        progress
            .steps
            .get(i)
            .copied()
            .unwrap_or((Forward::NotReached, Compensation::None))
    };
    let ended = match progress.position {
        Position::Ended(t) => Some(t),
        _ => None,
    };
    let mid = |y: f64| y + g.box_h / 2.0;
    // Compensation boxes, right to left.
    let comps: Vec<usize> = (0..n)
        .rev()
        .filter(|&i| defs[i].compensation.is_some())
        .collect();
    let right = g.right(n);
    let terminal_at = |t: Terminal| -> (f64, f64) {
        match t {
            Terminal::Completed => (right, mid(g.fwd_y) - g.term_h / 2.0),
            Terminal::Compensated => (12.0, mid(g.comp_y) - g.term_h / 2.0),
            Terminal::Failed => (right, mid(g.comp_y) - g.term_h / 2.0),
            Terminal::Resolved => (right, mid(g.comp_y) + g.term_h / 2.0 + 16.0),
        }
    };
    let name_chars = g.chars(12.0);
    let small_chars = g.chars(10.0);
    // The legend wraps on narrow diagrams.
    let per_row = (((w - 12.0) / LEGEND_ITEM) as usize).clamp(1, LEGEND.len());
    let legend_rows = LEGEND.len().div_ceil(per_row);
    let legend_y = h + 4.0;
    let h = h + legend_rows as f64 * 18.0;

    html! {
        figure #diagram data-testid="diagram" data-position=(position_name(progress.position)) {
            svg.diagram xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (w) " " (h) }
                width=(w) height=(h) role="img" aria-label="State machine of the saga type" {
                defs {
                    @for (colour, id) in ARROWS {
                        marker id=(id) viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto" {
                            path d="M0,0 L10,5 L0,10 z" fill=(colour) {}
                        }
                    }
                }
                // Start.
                circle cx=(g.left - 40.0) cy=(mid(g.fwd_y)) r="7" fill="#1d2330" {}
                text x=(g.left - 40.0) y=(g.fwd_y - 2.0) font-size="10" text-anchor="middle" fill="#5b6472" { "start" }
                @if n > 0 {
                    (arrow(g.left - 33.0, mid(g.fwd_y), g.left - 2.0, mid(g.fwd_y), if mark(0).0 != Forward::NotReached { GREEN } else { GREY }))
                }
                // Forward path.
                @for (i, d) in defs.iter().enumerate() {
                    @let (fwd, comp) = mark(i);
                    @let (fill, stroke) = forward_colours(fwd);
                    @let current = progress.position == Position::Forward(i);
                    @let x = g.x(i);
                    g class={ "step fwd " (forward_name(fwd)) @if current { " current" } }
                        data-step=(d.name) data-mark=(forward_name(fwd)) data-current=[current.then_some("forward")] {
                        title {
                            (d.name) " (" (d.kind) ")"
                            @if let Some(a) = d.action { ": " (a) }
                            @if let Some(s) = d.awaits { ", awaits " (s) }
                            " — " (forward_name(fwd))
                            @if comp != Compensation::None { ", compensation " (compensation_name(comp)) }
                        }
                        rect x=(x) y=(g.fwd_y) width=(g.box_w) height=(g.box_h) rx="6"
                            fill=(fill) stroke=(stroke) stroke-width=(if current { "3.5" } else { "1.5" })
                            stroke-dasharray=[(d.kind == "pivot").then_some("6 2")] {}
                        text x=(x + g.box_w / 2.0) y=(g.fwd_y + 19.0) font-size="12" font-weight="600" text-anchor="middle" fill="#1d2330" {
                            (fit(d.name, name_chars))
                        }
                        text x=(x + g.box_w / 2.0) y=(g.fwd_y + 34.0) font-size="10" text-anchor="middle" fill="#5b6472" {
                            (fit(d.kind, small_chars))
                        }
                        @if fwd == Forward::Failed {
                            text x=(x + g.box_w - 8.0) y=(g.fwd_y + 13.0) font-size="12" font-weight="700" text-anchor="middle" fill=(RED) { "✕" }
                        }
                        @if let Some(signal) = d.awaits {
                            text.awaits x=(x) y=(g.fwd_y - 6.0) font-size="10" font-style="italic" fill="#0f766e" {
                                "awaits " (fit(signal, small_chars.saturating_sub(7)))
                            }
                        }
                        @if current {
                            text.now x=(x + g.box_w / 2.0) y=(g.fwd_y + g.box_h + 14.0) font-size="11" font-weight="700" text-anchor="middle" fill=(BLUE) { "▲ now" }
                        }
                    }
                    @if i + 1 < n {
                        (arrow(x + g.box_w, mid(g.fwd_y), g.x(i + 1) - 2.0, mid(g.fwd_y),
                            if mark(i + 1).0 != Forward::NotReached { GREEN } else { GREY }))
                    }
                    @if d.compensation.is_some() {
                        // What undoes the step, straight below it.
                        line x1=(x + 14.0) x2=(x + 14.0) y1=(g.fwd_y + g.box_h) y2=(g.comp_y) stroke=(GREY) stroke-dasharray="3 3" {}
                    }
                }
                @if n > 0 {
                    (arrow(g.x(n - 1) + g.box_w, mid(g.fwd_y), right - 2.0, mid(g.fwd_y),
                        if ended == Some(Terminal::Completed) { GREEN } else { GREY }))
                }
                // Compensation path, right to left.
                @for (k, &i) in comps.iter().enumerate() {
                    @let d = &defs[i];
                    @let (_, comp) = mark(i);
                    @let (fill, stroke) = compensation_colours(comp);
                    @let current = progress.position == Position::Compensating(i);
                    @let x = g.x(i);
                    g class={ "step comp " (compensation_name(comp)) @if current { " current" } }
                        data-step=(d.name) data-mark=(compensation_name(comp)) data-current=[current.then_some("compensation")] {
                        title { "undo " (d.name) ": " (d.compensation.unwrap_or_default()) " — " (compensation_name(comp)) }
                        rect x=(x) y=(g.comp_y) width=(g.box_w) height=(g.box_h) rx="6"
                            fill=(fill) stroke=(stroke) stroke-width=(if current { "3.5" } else { "1.5" }) {}
                        text x=(x + g.box_w / 2.0) y=(g.comp_y + 19.0) font-size="12" font-weight="600" text-anchor="middle" fill="#1d2330" {
                            (fit(d.compensation.unwrap_or_default(), name_chars))
                        }
                        text x=(x + g.box_w / 2.0) y=(g.comp_y + 34.0) font-size="10" text-anchor="middle" fill="#5b6472" {
                            (fit(&format!("undo {}", d.name), small_chars))
                        }
                        @if current {
                            text.now x=(x + g.box_w / 2.0) y=(g.comp_y + g.box_h + 14.0) font-size="11" font-weight="700" text-anchor="middle" fill=(ORANGE) { "▲ now" }
                        }
                    }
                    @let (to_x, taken) = match comps.get(k + 1) {
                        Some(&j) => (g.x(j) + g.box_w + 2.0, mark(j).1 != Compensation::None),
                        None => (12.0 + g.term_w + 2.0, ended == Some(Terminal::Compensated)),
                    };
                    (arrow(x, mid(g.comp_y), to_x, mid(g.comp_y), if taken { SLATE } else { GREY }))
                }
                @if comps.is_empty() {
                    text x="12" y=(g.comp_y - 8.0) font-size="10" fill="#5b6472" { "no compensations" }
                }
                // Terminal states.
                @for t in Terminal::ALL {
                    @let (x, y) = terminal_at(t);
                    @let reached = ended == Some(t);
                    @let colour = terminal_colour(t);
                    g class={ "terminal" @if reached { " reached current" } } data-terminal=(t.as_str())
                        data-current=[reached.then_some("terminal")] {
                        rect x=(x) y=(y) width=(g.term_w) height=(g.term_h) rx=(g.term_h / 2.0)
                            fill=(if reached { colour } else { "#ffffff" }) stroke=(colour)
                            stroke-width=(if reached { "3" } else { "1.2" }) stroke-dasharray=[(!reached).then_some("4 3")] {}
                        text x=(x + g.term_w / 2.0) y=(y + g.term_h / 2.0 + 4.0) font-size="12" font-weight="600" text-anchor="middle"
                            fill=(if reached { "#ffffff" } else { colour }) { (t.as_str()) }
                    }
                }
                // An operator resolves a failed saga.
                @let (fx, fy) = terminal_at(Terminal::Failed);
                (arrow(fx + g.term_w / 2.0, fy + g.term_h, fx + g.term_w / 2.0, fy + g.term_h + 14.0,
                    if ended == Some(Terminal::Resolved) { PURPLE } else { GREY }))
                // Legend.
                @for (k, (fill, stroke, label)) in LEGEND.iter().enumerate() {
                    @let lx = 12.0 + (k % per_row) as f64 * LEGEND_ITEM;
                    @let legend_y = legend_y + (k / per_row) as f64 * 18.0;
                    rect x=(lx) y=(legend_y - 9.0) width="12" height="12" rx="2" fill=(fill) stroke=(stroke) stroke-width="1.5" {}
                    text x=(lx + 16.0) y=(legend_y + 1.0) font-size="10" fill="#1d2330" { (label) }
                }
            }
        }
    }
}

/// The arrowheads, one per colour an edge may have.
const ARROWS: [(&str, &str); 4] = [
    (GREY, "dg-arrow-grey"),
    (GREEN, "dg-arrow-green"),
    (SLATE, "dg-arrow-slate"),
    (PURPLE, "dg-arrow-purple"),
];

const LEGEND_ITEM: f64 = 112.0;

const LEGEND: [(&str, &str, &str); 7] = [
    ("#ffffff", GREY, "not reached"),
    ("#dbeafe", BLUE, "current step"),
    ("#dcfce7", GREEN, "succeeded"),
    ("#fee2e2", RED, "failed here"),
    ("#ffedd5", ORANGE, "compensating"),
    ("#e2e8f0", SLATE, "compensated"),
    ("#ffffff", "#1d2330", "dashed: pivot"),
];

fn position_name(p: Position) -> String {
    match p {
        Position::Forward(i) => format!("forward:{i}"),
        Position::Compensating(i) => format!("compensating:{i}"),
        Position::Ended(t) => t.as_str().to_owned(),
        Position::Unknown => "unknown".to_owned(),
    }
}

fn arrow(x1: f64, y1: f64, x2: f64, y2: f64, colour: &'static str) -> Markup {
    let head = ARROWS
        .iter()
        .find(|(c, _)| *c == colour)
        .map_or("dg-arrow-grey", |(_, id)| id);
    html! {
        line.edge x1=(x1) y1=(y1) x2=(x2) y2=(y2) stroke=(colour) stroke-width="1.6"
            marker-end={ "url(#" (head) ")" } {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &'static str, comp: Option<&'static str>) -> StepDef<'static> {
        StepDef {
            name,
            kind: if comp.is_some() {
                "compensatable"
            } else {
                "pivot"
            },
            action: Some(name),
            compensation: comp,
            awaits: None,
        }
    }

    fn row(name: &str, status: &str) -> StepRow {
        StepRow {
            name: name.into(),
            service: Some("svc".into()),
            status: status.into(),
            attempts: 1,
            compensation_attempts: 0,
            last_error: None,
        }
    }

    fn checkout() -> Vec<StepDef<'static>> {
        vec![
            def("reserve_stock", Some("release_stock")),
            def("charge_payment", Some("refund_payment")),
            def("create_shipment", Some("cancel_shipment")),
            def("commit_stock", None),
        ]
    }

    #[test]
    fn the_current_forward_step_is_highlighted() {
        let defs = checkout();
        let steps = [
            row("reserve_stock", "succeeded"),
            row("charge_payment", "retrying"),
        ];
        let p = progress(&defs, "running", &steps, None);
        assert_eq!(p.position, Position::Forward(1));
        let svg = diagram(&defs, &p).into_string();
        assert!(
            svg.contains(r#"data-step="charge_payment" data-mark="active" data-current="forward""#),
            "{svg}"
        );
        assert!(svg.contains(r#"data-step="reserve_stock" data-mark="succeeded""#));
        assert!(svg.contains(r#"data-step="create_shipment" data-mark="not_reached""#));
        assert_eq!(svg.matches("data-current=").count(), 1);
    }

    #[test]
    fn the_compensation_path_and_failure_point_are_marked() {
        let defs = checkout();
        let steps = [
            row("reserve_stock", "compensating"),
            row("charge_payment", "compensated"),
            row("create_shipment", "rejected"),
        ];
        let p = progress(&defs, "compensating", &steps, None);
        assert_eq!(p.position, Position::Compensating(0));
        let svg = diagram(&defs, &p).into_string();
        assert!(svg.contains(r#"class="step fwd failed""#));
        assert!(svg.contains(
            r#"data-step="reserve_stock" data-mark="active" data-current="compensation""#
        ));
        assert!(svg.contains(r#"class="step comp compensated""#));
        // The pivot has no compensation box: three on the compensation row.
        assert_eq!(svg.matches(r#"class="step comp"#).count(), 3);
        // A failure point given by the handler wins over a compensated status.
        let p = progress(&defs, "compensated", &steps, Some("charge_payment"));
        assert_eq!(p.steps[1], (Forward::Failed, Compensation::Done));
    }

    #[test]
    fn every_terminal_state_is_highlighted() {
        let defs = checkout();
        for t in Terminal::ALL {
            let p = progress(&defs, t.as_str(), &[], None);
            assert_eq!(p.position, Position::Ended(t));
            let svg = diagram(&defs, &p).into_string();
            let want = format!(
                r#"class="terminal reached current" data-terminal="{}""#,
                t.as_str()
            );
            assert!(svg.contains(&want), "{t:?}");
            assert_eq!(svg.matches("reached current").count(), 1);
        }
    }

    #[test]
    fn one_to_ten_steps_fit_and_scale() {
        let names = [
            "a_step",
            "b_step",
            "c_step",
            "d_step",
            "e_step",
            "f_step",
            "g_step",
            "h_step",
            "i_step",
            "a_very_long_step_name_that_does_not_fit",
        ];
        let mut last_width = 0.0;
        for n in 1..=10 {
            let defs: Vec<StepDef<'_>> = names[..n]
                .iter()
                .map(|s| StepDef {
                    name: s,
                    kind: "compensatable",
                    action: None,
                    compensation: Some("undo_it"),
                    awaits: Some("a_signal"),
                })
                .collect();
            let p = progress(&defs, "running", &[row(names[n - 1], "awaiting")], None);
            assert_eq!(p.position, Position::Forward(n - 1));
            let svg = diagram(&defs, &p).into_string();
            assert_eq!(svg.matches(r#"class="step fwd"#).count(), n);
            assert!(svg.contains("awaits a_signal"));
            assert!(!svg.contains("NaN"));
            let g = Geometry::for_steps(n);
            let width = g.width(n);
            assert!(width > last_width || n == 5 || n == 8, "n={n}");
            assert!(width < 1700.0, "n={n}: {width}");
            last_width = width;
            if n == 10 {
                assert!(svg.contains("a_very_long_ste"));
                assert!(svg.contains("…"));
            }
        }
    }

    #[test]
    fn an_empty_definition_still_draws() {
        let p = progress(&[], "running", &[], None);
        assert_eq!(p.position, Position::Unknown);
        let svg = diagram(&[], &p).into_string();
        assert!(svg.contains("id=\"diagram\"") && svg.contains("no compensations"));
    }
}

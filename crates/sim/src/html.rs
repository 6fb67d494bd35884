//! The HTML report: one self-contained file (inline SVG drawn by plotters, inline CSS, no script)
//! with the summary table, the time series with every fault as a labelled band, and the device
//! timeline of each invariant violation.

use crate::report::Report;
use crate::series::{FaultBand, Series};
use crate::Violation;
use plotters::prelude::*;

const PLOT_W: u32 = 1100;
const PLOT_H: u32 = 280;
/// Rows the fault labels are staggered over, so neighbouring bands' labels do not overprint.
const LABEL_ROWS: usize = 4;
/// Past this many faults a plot labels only the first band of each kind (crash storms draw dozens);
/// the table under the plots lists them all.
const MAX_LABELLED_FAULTS: usize = 24;

fn kind_colour(kind: &str) -> RGBColor {
    match kind {
        "partition" => RGBColor(230, 126, 34),
        "isolate" => RGBColor(142, 68, 173),
        "crash" => RGBColor(192, 57, 43),
        "uplink_outage" => RGBColor(52, 73, 94),
        "asymmetric" => RGBColor(160, 100, 40),
        "clock_jump" => RGBColor(39, 174, 96),
        _ => RGBColor(22, 160, 133),
    }
}

const LINE_COLOURS: [RGBColor; 6] =
    [RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(148, 103, 189), RGBColor(255, 127, 14), RGBColor(23, 190, 207)];

/// The x axis: seconds, minutes or hours, whichever reads best for the run's length.
#[derive(Clone, Copy)]
struct Axis {
    per_s: f64,
    name: &'static str,
    max: f64,
}

impl Axis {
    fn for_run(span_s: f64) -> Axis {
        let (per_s, name) = if span_s <= 900.0 {
            (1.0, "seconds")
        } else if span_s <= 3.0 * 3600.0 {
            (1.0 / 60.0, "minutes")
        } else {
            (1.0 / 3600.0, "hours")
        };
        Axis { per_s, name, max: span_s * per_s }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Short label of a band on a plot.
fn short(f: &FaultBand) -> String {
    f.label.split(',').next().unwrap_or(&f.label).to_string()
}

/// One plot: lines over time, the faults as shaded bands with labels, the end of the day dashed.
fn plot(title: &str, y_desc: &str, axis: Axis, series: &Series, lines: &[(String, Vec<Option<f64>>)]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (PLOT_W, PLOT_H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let y_max = lines.iter().flat_map(|(_, v)| v.iter().flatten()).copied().fold(0.0, f64::max).max(1.0) * 1.25;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 17))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..axis.max.max(1e-9), 0f64..y_max)
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().x_desc(axis.name).y_desc(y_desc).light_line_style(WHITE.mix(0.0)).draw().map_err(|e| e.to_string())?;
        // Bands first, under the lines. An instant (clock jump, walk) gets a visible sliver.
        let sliver = axis.max / 400.0;
        let label_all = series.faults.len() <= MAX_LABELLED_FAULTS;
        let mut labelled_kinds: Vec<&str> = Vec::new();
        for (i, f) in series.faults.iter().enumerate() {
            let (x0, x1) = (f.start_s * axis.per_s, (f.end_s * axis.per_s).max(f.start_s * axis.per_s + sliver));
            let colour = kind_colour(f.kind);
            chart.draw_series([Rectangle::new([(x0, 0.0), (x1, y_max)], colour.mix(0.18).filled())]).map_err(|e| e.to_string())?;
            let first_of_kind = !labelled_kinds.contains(&f.kind);
            if label_all || first_of_kind {
                labelled_kinds.push(f.kind);
                let text = if label_all { short(f) } else { format!("{} ({} in all)", f.kind, series.faults.iter().filter(|g| g.kind == f.kind).count()) };
                let row = (i % LABEL_ROWS) as f64;
                let y = y_max * (0.97 - 0.07 * row);
                chart
                    .draw_series([Text::new(text, (x0, y), ("sans-serif", 11).into_font().color(&colour.mix(0.95)))])
                    .map_err(|e| e.to_string())?;
            }
        }
        let eod = series.end_of_day_s * axis.per_s;
        chart
            .draw_series(DashedLineSeries::new([(eod, 0.0), (eod, y_max)], 4, 4, BLACK.mix(0.5).stroke_width(1)))
            .map_err(|e| e.to_string())?;
        chart.draw_series([Text::new("end of day", (eod, y_max * 0.6), ("sans-serif", 10).into_font().color(&BLACK.mix(0.6)))]).map_err(|e| e.to_string())?;
        let step = series.bucket_s as f64 * axis.per_s;
        for (k, (name, values)) in lines.iter().enumerate() {
            let colour = LINE_COLOURS[k % LINE_COLOURS.len()];
            // A point sits at its bucket's middle; a missing value breaks the line.
            let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
            for (b, v) in values.iter().enumerate() {
                match v {
                    Some(v) => segments.last_mut().expect("one").push(((b as f64 + 0.5) * step, *v)),
                    None if !segments.last().expect("one").is_empty() => segments.push(Vec::new()),
                    None => {}
                }
            }
            let style = colour.stroke_width(2);
            let mut first = true;
            for seg in segments.into_iter().filter(|s| !s.is_empty()) {
                // A lone bucket between gaps gets a marker: a one-point line draws nothing.
                let marker = if seg.len() == 1 { 3 } else { 0 };
                let drawn = chart.draw_series(LineSeries::new(seg, style).point_size(marker)).map_err(|e| e.to_string())?;
                if first {
                    drawn.label(name.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
                    first = false;
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn some(v: &[u64]) -> Vec<Option<f64>> {
    v.iter().map(|x| Some(*x as f64)).collect()
}

/// The whole report as one HTML page.
pub fn render(report: &Report, violations: &[Violation]) -> Result<String, String> {
    let s = &report.series;
    let span_s = (s.sales.len() as u64 * s.bucket_s) as f64;
    let axis = Axis::for_run(span_s);
    let per = if s.bucket_s < 60 { format!("{} s", s.bucket_s) } else { format!("{} min", s.bucket_s / 60) };
    let mut plots = vec![
        plot(
            &format!("Sales and refusals per {per}"),
            "customers",
            axis,
            s,
            &[("sales acknowledged".into(), some(&s.sales)), ("sales refused".into(), some(&s.refused))],
        )?,
        plot(
            &format!("Replication lag of the sales acknowledged in each {per}, until every replica holds them"),
            "ms",
            axis,
            s,
            &[("p50".into(), s.lag_ms_p50.clone()), ("p99".into(), s.lag_ms_p99.clone())],
        )?,
        plot(
            &format!("Traffic per {per}"),
            "KB",
            axis,
            s,
            &[
                ("Wi-Fi".into(), s.bytes.iter().map(|b| Some(*b as f64 / 1e3)).collect()),
                ("4G uplinks".into(), s.uplink_bytes.iter().map(|b| Some(*b as f64 / 1e3)).collect()),
            ],
        )?,
        plot(
            "Peers: Wi-Fi sessions open and tablets up",
            "count",
            axis,
            s,
            &[("sessions open".into(), some(&s.sessions)), ("tablets up".into(), some(&s.devices_up))],
        )?,
        plot(
            "Sales acknowledged, not yet in the cloud's log",
            "sales",
            axis,
            s,
            &[("not in the cloud".into(), some(&s.sales_not_in_cloud))],
        )?,
    ];
    let mut skus: Vec<&str> = s.scarce_stock.iter().map(|l| l.sku.as_str()).collect();
    skus.dedup();
    for sku in skus {
        let lines: Vec<(String, Vec<Option<f64>>)> =
            s.scarce_stock.iter().filter(|l| l.sku == sku).map(|l| (format!("held on {}", l.side), some(&l.units))).collect();
        plots.push(plot(&format!("Stock rights of {sku} (one of the scarcest SKUs) per side of the Wi-Fi split"), "units", axis, s, &lines)?);
    }

    let mut h = String::new();
    let verdict = if violations.is_empty() {
        "<p class=ok>All invariants held: no acknowledged sale lost, none duplicated, no negative stock, replicas identical, every sale in the cloud log once.</p>".to_string()
    } else {
        format!("<p class=bad>{} invariant violation(s): see the timelines below.</p>", violations.len())
    };
    h.push_str(&format!(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>stallmesh sim: {name} seed {seed}</title>\n<style>\
body{{font-family:sans-serif;margin:24px;max-width:1140px;color:#222}} table{{border-collapse:collapse}} \
td,th{{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}} \
.ok{{color:#1e7b34;font-weight:bold}} .bad{{color:#b3261e;font-weight:bold}} figure{{margin:18px 0}} \
pre{{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}} .swatch{{display:inline-block;width:12px;height:12px;margin-right:6px}}\
</style></head><body>\n<h1>{name}, seed {seed}</h1>\n{verdict}\n",
        name = escape(&report.scenario),
        seed = report.seed,
    ));
    h.push_str("<h2>Summary</h2>\n<table>\n");
    for (k, v) in report.rows() {
        h.push_str(&format!("<tr><th>{}</th><td>{}</td></tr>\n", escape(k), escape(&v)));
    }
    h.push_str("</table>\n");
    h.push_str(&format!(
        "<h2>Over time</h2>\n<p>One point per {per}; shaded bands are the faults as they happened (a crash until its restart); the dashed line is the end of the day, after which faults stop and the replicas must agree.</p>\n"
    ));
    for svg in plots {
        h.push_str("<figure>");
        h.push_str(&svg);
        h.push_str("</figure>\n");
    }
    h.push_str(&format!("<h2>Faults ({})</h2>\n", s.faults.len()));
    if s.faults.is_empty() {
        h.push_str("<p>None fired.</p>\n");
    } else {
        h.push_str("<table><tr><th>kind</th><th>what</th><th>from</th><th>to</th></tr>\n");
        for f in &s.faults {
            let RGBColor(r, g, b) = kind_colour(f.kind);
            h.push_str(&format!(
                "<tr><td><span class=swatch style=\"background:rgb({r},{g},{b})\"></span>{}</td><td>{}</td><td>{:.0} s</td><td>{:.0} s</td></tr>\n",
                f.kind,
                escape(&f.label),
                f.start_s,
                f.end_s
            ));
        }
        h.push_str("</table>\n");
    }
    if !violations.is_empty() {
        h.push_str("<h2>Invariant violations</h2>\n");
        for v in violations {
            h.push_str(&format!("<h3 class=bad>{}</h3>\n<p>{}</p>\n", escape(v.invariant), escape(&v.detail)));
            if let Some(d) = v.device {
                h.push_str(&format!("<p>Timeline of device {d} (virtual µs, device, event):</p>\n<pre>"));
                for line in &v.timeline {
                    h.push_str(&escape(line));
                    h.push('\n');
                }
                h.push_str("</pre>\n");
            }
        }
    }
    h.push_str(&format!("<p>Trace digest <code>{}</code></p>\n</body></html>\n", escape(&report.digest)));
    Ok(h)
}

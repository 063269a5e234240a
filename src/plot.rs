//! Small dependency-free SVG charts: line charts (loss curves, recall@K) with axes, ticks and a
//! legend, and heatmaps (confusion matrices).
use crate::error::{Error, Result};
use std::fmt::Write;

/// One named series of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// "Nice" tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = vec![];
    while t <= hi + 1e-9 * span {
        out.push(t);
        t += step;
    }
    out
}

/// A line chart of `series` (non-finite points skipped) as an SVG document.
pub fn line_chart(title: &str, xlabel: &str, ylabel: &str, series: &[Series]) -> Result<String> {
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    if pts.is_empty() {
        return Err(Error::msg(format!("plot \"{title}\": no finite points")));
    }
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 - x0 < 1e-12 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    if y1 - y0 < 1e-12 {
        (y0, y1) = (y0 - 0.5 * y0.abs().max(1.0), y1 + 0.5 * y1.abs().max(1.0));
    }
    let pad = 0.05 * (y1 - y0);
    (y0, y1) = (y0 - pad, y1 + pad);
    // the legend sits right of the frame, so no grid line or data runs through it
    let legend_w = 24.0 + 6.5 * series.iter().map(|s| s.name.chars().count()).max().unwrap_or(0) as f64;
    let (w, h, l, r, t, b) = (650.0 + legend_w, 420.0, 70.0, 30.0 + legend_w, 40.0, 50.0);
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let sy = |y: f64| h - b - (y - y0) / (y1 - y0) * (h - t - b);
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#);
    let _ =
        writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#, w / 2.0, esc(title));
    for tx in ticks(x0, x1, 8) {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#ddd"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"##,
            sx(tx),
            t,
            h - b,
            h - b + 16.0,
            fmt_tick(tx)
        );
    }
    for ty in ticks(y0, y1, 6) {
        let _ = writeln!(
            s,
            r##"<line x1="{1}" y1="{0:.1}" x2="{2}" y2="{0:.1}" stroke="#ddd"/><text x="{3}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            sy(ty),
            l,
            w - r,
            l - 6.0,
            sy(ty) + 4.0,
            fmt_tick(ty)
        );
    }
    let _ = writeln!(s, r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#333"/>"##, w - l - r, h - t - b);
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, (l + w - r) / 2.0, h - 12.0, esc(xlabel));
    let _ = writeln!(s, r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">{1}</text>"#, (t + h - b) / 2.0, esc(ylabel));
    for (i, se) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = se.points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        if path.len() == 1 {
            let _ = writeln!(
                s,
                r#"<circle cx="{}" cy="{}" r="3" fill="{c}"/>"#,
                path[0].split(',').next().unwrap_or("0"),
                path[0].split(',').nth(1).unwrap_or("0")
            );
        } else if !path.is_empty() {
            let _ = writeln!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="1.6" points="{}"/>"#, path.join(" "));
        }
        let (ly, lx) = (t + 16.0 + 16.0 * i as f64, w - r + 12.0);
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            lx + 25.0,
            ly + 4.0,
            esc(&se.name)
        );
    }
    s.push_str("</svg>\n");
    Ok(s)
}

/// A heatmap of `m[row][col]` counts (a confusion matrix: rows = true, columns = predicted),
/// cells shaded by their share of the row, with the labels on both axes (the columns' slanted
/// above them).
pub fn heatmap(title: &str, labels: &[String], m: &[Vec<usize>]) -> Result<String> {
    let n = labels.len();
    if n == 0 || m.len() != n || m.iter().any(|r| r.len() != n) {
        return Err(Error::msg(format!("heatmap \"{title}\": {n} labels for a {}-row matrix", m.len())));
    }
    let cell = (600.0 / n as f64).clamp(4.0, 40.0);
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1).min(24) as f64;
    let left = 20.0 + 7.0 * longest;
    // column labels run up and right at 45°: room above for the longest, and right of the last
    let (top, w) = (60.0 + 5.0 * longest, left + cell * n as f64 + 20.0 + 5.0 * longest);
    let h = top + cell * n as f64 + 50.0;
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" font-family="sans-serif" font-size="11">"#);
    let _ = writeln!(
        s,
        r#"<rect width="{w:.0}" height="{h:.0}" fill="white"/><text x="{:.1}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for (i, row) in m.iter().enumerate() {
        let total: usize = row.iter().sum();
        for (j, &v) in row.iter().enumerate() {
            let f = if total == 0 { 0.0 } else { v as f64 / total as f64 };
            let shade = (255.0 * (1.0 - f)) as u8;
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{cell:.1}" height="{cell:.1}" fill="rgb({shade},{shade},255)" stroke="#eee"><title>{} → {}: {v}</title></rect>"##,
                left + cell * j as f64,
                top + cell * i as f64,
                esc(&labels[i]),
                esc(&labels[j])
            );
            if cell >= 18.0 && v > 0 {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{}">{v}</text>"#,
                    left + cell * (j as f64 + 0.5),
                    top + cell * (i as f64 + 0.5) + 4.0,
                    if f > 0.5 { "white" } else { "black" }
                );
            }
        }
        if cell >= 8.0 {
            let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#, left - 4.0, top + cell * (i as f64 + 0.5) + 4.0, esc(&labels[i]));
            let (x, y) = (left + cell * (i as f64 + 0.5) + 4.0, top - 6.0);
            let _ = writeln!(s, r#"<text x="{x:.1}" y="{y:.1}" transform="rotate(-45 {x:.1} {y:.1})">{}</text>"#, esc(&labels[i]));
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">predicted class (columns) · true class (rows)</text>"#,
        left + cell * n as f64 / 2.0,
        top + cell * n as f64 + 30.0
    );
    s.push_str("</svg>\n");
    Ok(s)
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 0.01 && v.abs() < 1e5) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed() {
        let one = line_chart("t", "x", "y", &[Series { name: "a<b".into(), points: vec![(1.0, 2.0)] }]).unwrap();
        assert!(one.starts_with("<svg") && one.trim_end().ends_with("</svg>") && one.contains("a&lt;b") && one.contains("<circle"));
        let many = line_chart(
            "loss",
            "step",
            "loss",
            &[
                Series { name: "loss".into(), points: (0..50).map(|i| (i as f64, 1.0 / (1.0 + i as f64))).collect() },
                Series { name: "nan".into(), points: vec![(1.0, f64::NAN)] },
            ],
        )
        .unwrap();
        assert!(many.contains("<polyline") && !many.contains("NaN") && !many.contains("inf"));
        assert!(line_chart("e", "x", "y", &[]).is_err());
        assert_eq!(ticks(0.0, 1.0, 5).len(), 6);
        let hm = heatmap("c", &["a".into(), "b".into()], &[vec![2, 0], vec![1, 1]]).unwrap();
        assert!(hm.starts_with("<svg") && hm.matches("<rect").count() == 5 && !hm.contains("NaN"));
        assert!(heatmap("c", &["a".into()], &[vec![1, 2]]).is_err());
    }

    /// The x attribute of the first element of `svg` that holds `needle`.
    fn x_of(svg: &str, needle: &str) -> f64 {
        let line = svg.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle}"));
        line.split("x=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().parse().unwrap()
    }

    #[test]
    fn the_legend_is_outside_the_frame_and_columns_are_labelled() {
        let full = Series { name: "image→text".into(), points: vec![(1.0, 90.0), (5.0, 100.0), (10.0, 100.0)] };
        let svg = line_chart("recall", "K", "%", &[full]).unwrap();
        let frame = svg.lines().find(|l| l.contains(r##"fill="none" stroke="#333""##)).unwrap();
        let attr = |k: &str| -> f64 { frame.split(&format!(" {k}=\"")).nth(1).and_then(|r| r.split('"').next()).unwrap().parse().unwrap() };
        assert!(x_of(&svg, ">image→text</text>") > attr("x") + attr("width"), "legend inside the plot: {svg}");
        let hm = heatmap("c", &["cat".into(), "dog".into()], &[vec![1, 0], vec![0, 1]]).unwrap();
        for l in ["cat", "dog"] {
            assert_eq!(hm.matches(&format!(">{l}</text>")).count(), 2, "{l}: a row and a column label: {hm}");
        }
    }
}

//! SVG plots (plotters' SVG backend: no font or image stack to build, readable in any browser).

use std::path::Path;

use plotters::prelude::*;

use crate::EvalError;
use crate::calibrate::CalibrationRun;
use crate::humaneval::bench::{HumanEvalReport, SystemScore};
use crate::paper::{PaperReport, SystemResult, snr_key};

/// One named line (or point cloud) of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// What a chart shows.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn plot_error(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Plot {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn bounds(series: &[&Series]) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return (0.0..1.0, 0.0..1.0);
    }
    let pad = |lo: f64, hi: f64| {
        let d = ((hi - lo) * 0.05).max(1e-3);
        (lo - d)..(hi + d)
    };
    (pad(x0, x1), pad(y0, y1))
}

/// Draws `points` as a scatter and `lines` as lines on one chart.
pub fn draw(
    path: &Path,
    chart: &Chart,
    points: &[Series],
    lines: &[Series],
) -> Result<(), EvalError> {
    let all: Vec<&Series> = points.iter().chain(lines).collect();
    let (xr, yr) = bounds(&all);
    let root = SVGBackend::new(path, (800, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(xr, yr)
        .map_err(|e| plot_error(path, e))?;
    ctx.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .draw()
        .map_err(|e| plot_error(path, e))?;
    for (i, s) in points.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        ctx.draw_series(
            s.points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 2, color.mix(0.5).filled())),
        )
        .map_err(|e| plot_error(path, e))?
        .label(s.name.as_str())
        .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
    }
    for (i, s) in lines.iter().enumerate() {
        let color = PALETTE[(i + points.len()) % PALETTE.len()];
        ctx.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(|e| plot_error(path, e))?
        .label(s.name.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_error(path, e))?;
    root.present().map_err(|e| plot_error(path, e))?;
    Ok(())
}

/// Beta against u for the first fitted estimator, with the fitted line.
pub fn calibration(run: &CalibrationRun, path: &Path) -> Result<(), EvalError> {
    let Some((i, c)) = run
        .fits
        .iter()
        .enumerate()
        .find_map(|(i, f)| Some((i, f.calibration.as_ref()?)))
    else {
        return Err(plot_error(
            path,
            "no estimator could be fitted; nothing to plot",
        ));
    };
    let points: Vec<_> = run
        .samples_of(i)
        .iter()
        .map(|s| (s.u as f64, s.beta as f64))
        .collect();
    let name = &run.fits[i].name;
    draw(
        path,
        &Chart {
            title: &format!("{name}: beta vs u (R2 {:.2})", c.fit.r2),
            x_label: "uncertainty u",
            y_label: "rejection probability beta",
        },
        &[Series {
            name: format!("{} drafted tokens", points.len()),
            points,
        }],
        &[Series {
            name: format!("beta = {:.3} u {:+.3}", c.fit.a, c.fit.b),
            points: [0.0, 1.0].map(|u| (u, c.fit.predict(u))).to_vec(),
        }],
    )
}

/// Skip rate, fidelity and agreement of our system against its threshold.
pub fn threshold_sweep(report: &PaperReport, path: &Path) -> Result<(), EvalError> {
    let line = |name: &str, f: fn(&crate::paper::SweepPoint) -> f64| Series {
        name: name.into(),
        points: report
            .sweep
            .iter()
            .map(|s| (s.threshold as f64, f(s)))
            .collect(),
    };
    draw(
        path,
        &Chart {
            title: "uhlm: skip rate and fidelity vs threshold",
            x_label: "threshold u_th",
            y_label: "fraction",
        },
        &[],
        &[
            line("skip rate", |s| s.skip_rate),
            line("fidelity (1 - TV)", |s| s.fidelity),
            line("agreement (greedy)", |s| s.agreement),
        ],
    )
}

/// Simulated throughput of every system against the uplink SNR.
pub fn throughput_vs_snr(report: &PaperReport, path: &Path) -> Result<(), EvalError> {
    let chart = Chart {
        title: "throughput vs uplink SNR (simulated fading channel)",
        x_label: "SNR (dB)",
        y_label: "log10 tokens/s",
    };
    throughput_lines(report, path, &chart, |s| {
        report
            .options
            .snr_db
            .iter()
            .filter_map(|&snr| Some((snr, *s.throughput_tokens_per_s.get(&snr_key(snr))?)))
            .collect()
    })
}

/// Measured tokens/s of every system against each link profile's uplink rate.
pub fn measured_links(report: &PaperReport, path: &Path) -> Result<(), EvalError> {
    let chart = Chart {
        title: "measured throughput: QUIC through the emulated link (poor, cell-edge, good)",
        x_label: "log10 uplink Mbit/s",
        y_label: "log10 tokens/s",
    };
    throughput_lines(report, path, &chart, |s| {
        report
            .measured
            .iter()
            .filter(|r| r.system == s.name)
            .filter_map(|r| Some(((r.uplink_bps? as f64 / 1e6).log10(), r.tokens_per_s)))
            .collect()
    })
}

/// One line per system of `(x, tokens/s)` points, drawn on a log10 throughput axis.
fn throughput_lines(
    report: &PaperReport,
    path: &Path,
    chart: &Chart,
    points: impl Fn(&SystemResult) -> Vec<(f64, f64)>,
) -> Result<(), EvalError> {
    let lines: Vec<Series> = report
        .systems
        .iter()
        .map(|s| Series {
            name: s.name.clone(),
            points: points(s)
                .into_iter()
                .map(|(x, tps)| (x, tps.max(1e-3).log10()))
                .collect(),
        })
        .collect();
    draw(path, chart, &[], &lines)
}

/// HumanEval pass@1 (greedy) against the share of tokens decided on the device: one point per
/// system, and the fixed-threshold sweep of uhlm as a line.
pub fn humaneval(report: &HumanEvalReport, path: &Path) -> Result<(), EvalError> {
    let scored = |s: &&SystemScore| s.pass_at_1_greedy.is_some();
    let points: Vec<Series> = report
        .systems
        .iter()
        .filter(scored)
        .filter(|s| !s.name.contains('@'))
        .map(|s| Series {
            name: s.name.clone(),
            points: vec![(s.device_share, s.pass_at_1_greedy.unwrap_or(f64::NAN))],
        })
        .collect();
    let mut sweep: Vec<(f64, f64)> = report
        .systems
        .iter()
        .filter(scored)
        .filter(|s| s.name.starts_with("uhlm"))
        .map(|s| (s.device_share, s.pass_at_1_greedy.unwrap_or(f64::NAN)))
        .collect();
    sweep.sort_by(|a, b| a.0.total_cmp(&b.0));
    let lines = if sweep.len() > 1 {
        vec![Series {
            name: "uhlm, threshold sweep".into(),
            points: sweep,
        }]
    } else {
        Vec::new()
    };
    draw(
        path,
        &Chart {
            title: "HumanEval pass@1 (greedy) against tokens decided on the device",
            x_label: "share of tokens decided on the device",
            y_label: "pass@1",
        },
        &points,
        &lines,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg_with_points_lines_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        let chart = Chart {
            title: "beta vs u",
            x_label: "u",
            y_label: "beta",
        };
        let pts = Series {
            name: "samples".into(),
            points: vec![(0.1, 0.0), (0.5, 0.3), (0.9, 0.8)],
        };
        let line = Series {
            name: "fit".into(),
            points: vec![(0.0, -0.05), (1.0, 0.85)],
        };
        draw(&path, &chart, &[pts], &[line]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert!(svg.contains("beta vs u") && svg.contains("fit"));
        assert_eq!(
            svg.matches("<circle").count(),
            3 + 1,
            "three points and a legend mark"
        );
    }
}

//! `sdengine plot`: draws the `metrics.jsonl` of one or more runs as a PNG with two panels,
//! losses (keys ending in `loss`) and validation metrics (keys starting with `val_`) against
//! epoch, so that runs (Suave, Daino, a supervised baseline) can be compared in one figure
//! without Python or matplotlib.
//!
//! Drawing uses the `plotters` crate with only its bitmap backend and its `ab_glyph` text path,
//! rendering into a memory buffer that the `png` crate (already a dependency) encodes. Its usual
//! text path (`ttf`) needs fontconfig/freetype through font-kit, which user machines may lack, so
//! instead a 26 KB Latin-1 subset of DejaVu Sans (Bitstream Vera licence, in
//! `data/fonts/LICENSE-DejaVu.txt`) is compiled in. Characters outside Latin-1 in run names show
//! as the font's missing-glyph box.
//!
//! The metrics format: one JSON object per line; `epoch` is a number (fractional for per-step
//! lines), `step` an integer; every other key with a numeric value is a series. Non-numeric values
//! (strings, `null`, which is how a NaN is written) and keys that are neither losses nor `val_`
//! metrics are ignored. A line that is not a JSON object with a numeric `epoch` is an error that
//! names the file and line number, because a silently skipped line hides a broken run.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// The embedded font: DejaVu Sans, cut to Latin-1 by `data/fonts/make_font_subset.sh`.
static FONT: &[u8] = include_bytes!("../../data/fonts/DejaVuSans-Latin1.ttf");

/// The family name under which [`FONT`] is registered with plotters.
const FAMILY: &str = "sans-serif";

/// Options of [`plot_runs`].
#[derive(Clone, Debug)]
pub struct PlotOptions {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels (the two panels share it equally).
    pub height: u32,
    /// A title above the figure (none by default).
    pub title: Option<String>,
    /// Draw a legend (`run-name: key` for each series) inside each panel. Off is useful when
    /// many series would cover the data.
    pub legend: bool,
    /// Only these metric keys (e.g. `val_acc1`, `train_loss`); empty = every loss and `val_` key.
    pub keys: Vec<String>,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions {
            width: 1200,
            height: 900,
            title: None,
            legend: true,
            keys: Vec::new(),
        }
    }
}

/// The series of one run: metric key → (epoch, value) points in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct RunMetrics {
    /// The run's name in legends (its folder name).
    pub name: String,
    /// Every numeric key other than `epoch` and `step`, with its points.
    pub series: BTreeMap<String, Vec<(f64, f64)>>,
}

/// Colours of the series in order: the Tableau 10 palette without its grey (text and grid are
/// grey), then darker variants, so up to 18 series differ; more repeat the cycle.
pub const PALETTE: [(u8, u8, u8); 18] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
    (16, 60, 90),
    (128, 64, 7),
    (22, 80, 22),
    (107, 20, 20),
    (74, 52, 95),
    (70, 43, 38),
    (114, 60, 97),
    (94, 95, 17),
    (12, 95, 104),
];

fn format_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

/// The metrics file of `run`: `run/metrics.jsonl` for a folder, `run` itself for a file.
pub fn metrics_path(run: &Path) -> PathBuf {
    if run.is_dir() {
        run.join("metrics.jsonl")
    } else {
        run.to_path_buf()
    }
}

/// The legend name of `run`: the folder's name (for a file, its parent folder's name).
fn run_name(run: &Path) -> String {
    let p = if run.is_dir() {
        Some(run)
    } else {
        run.parent()
    };
    p.and_then(|p| p.file_name())
        .or_else(|| run.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run.display().to_string())
}

/// Reads the metrics of `run` (a run folder or a `metrics.jsonl` file).
///
/// Errors: a missing or unreadable file (naming it, with what was expected), a file with no
/// metric line, or a malformed line (naming the file and the 1-based line number).
pub fn read_metrics(run: &Path) -> Result<RunMetrics> {
    let path = metrics_path(run);
    let file = std::fs::File::open(&path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        err: std::io::Error::new(
            e.kind(),
            format!("{e} (expected a run folder holding metrics.jsonl, or the file itself)"),
        ),
    })?;
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut lines = 0usize;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| format_err(&path, format!("line {n}: {e}")))?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format_err(&path, format!("line {n}: not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| format_err(&path, format!("line {n}: expected a JSON object")))?;
        let epoch = obj
            .get("epoch")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| format_err(&path, format!("line {n}: no numeric \"epoch\" key")))?;
        if !epoch.is_finite() {
            return Err(format_err(&path, format!("line {n}: epoch is not finite")));
        }
        for (k, v) in obj {
            if k == "epoch" || k == "step" {
                continue;
            }
            if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
                series.entry(k.clone()).or_default().push((epoch, x));
            }
        }
        lines += 1;
    }
    if lines == 0 {
        return Err(format_err(
            &path,
            "no metrics in this file (it is empty); has the run logged anything yet?",
        ));
    }
    Ok(RunMetrics {
        name: run_name(run),
        series,
    })
}

/// Whether a key belongs in the loss panel.
pub fn is_loss_key(key: &str) -> bool {
    key.ends_with("loss")
}

/// Whether a key belongs in the validation panel.
pub fn is_val_key(key: &str) -> bool {
    key.starts_with("val_")
}

/// Reads every run's `metrics.jsonl` and writes a two-panel PNG (losses above, `val_*` metrics
/// below, against epoch) to `output`, one colour per (run, key) series.
///
/// The file is written to a temporary sibling and renamed, so a reader never sees half a PNG.
/// Errors name the metrics file and line at fault, or the output path.
pub fn plot_runs(runs: &[PathBuf], output: &Path, opts: &PlotOptions) -> Result<()> {
    if runs.is_empty() {
        return Err(Error::invalid(
            "plot",
            "no run given (pass one or more run folders)",
        ));
    }
    if opts.width < 200 || opts.height < 200 || opts.width > 16384 || opts.height > 16384 {
        return Err(Error::invalid(
            "plot",
            format!(
                "image size {}x{} out of range (each side 200..=16384 pixels)",
                opts.width, opts.height
            ),
        ));
    }
    let metrics = runs
        .iter()
        .map(|r| read_metrics(r))
        .collect::<Result<Vec<_>>>()?;
    let any = metrics
        .iter()
        .flat_map(|m| m.series.keys())
        .any(|k| (is_loss_key(k) || is_val_key(k)) && wanted(opts, k));
    if !any {
        let files: Vec<String> = runs
            .iter()
            .map(|r| metrics_path(r).display().to_string())
            .collect();
        return Err(Error::invalid(
            "plot",
            format!(
                "{}: no numeric key ending in `loss` or starting with `val_` (among --keys, if given) to plot",
                files.join(", ")
            ),
        ));
    }
    let pixels = render(&metrics, opts)?;
    write_png(output, opts.width, opts.height, &pixels)
}

/// Whether `key` is among the keys asked for (all when none are).
fn wanted(opts: &PlotOptions, key: &str) -> bool {
    opts.keys.is_empty() || opts.keys.iter().any(|k| k == key)
}

/// One drawn series: legend label, colour, points.
struct Series<'a> {
    label: String,
    color: RGBColor,
    points: &'a [(f64, f64)],
}

/// Renders the figure into an RGB buffer of `width * height * 3` bytes.
fn render(metrics: &[RunMetrics], opts: &PlotOptions) -> Result<Vec<u8>> {
    register_font()?;
    let (w, h) = (opts.width, opts.height);
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let draw_err =
            |e: &dyn std::fmt::Display| Error::invalid("plot", format!("drawing failed: {e}"));
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        let root = match &opts.title {
            Some(t) => root
                .titled(t, (FAMILY, 22).into_font())
                .map_err(|e| draw_err(&e))?,
            None => root,
        };
        // Colours go by (run, key) in a stable order: runs as given, keys sorted.
        let mut losses = Vec::new();
        let mut vals = Vec::new();
        let mut next = 0usize;
        for m in metrics {
            for (k, pts) in &m.series {
                if !wanted(opts, k) {
                    continue;
                }
                let target = if is_loss_key(k) {
                    &mut losses
                } else if is_val_key(k) {
                    &mut vals
                } else {
                    continue;
                };
                let (r, g, b) = PALETTE[next % PALETTE.len()];
                next += 1;
                target.push(Series {
                    label: format!("{}: {k}", m.name),
                    color: RGBColor(r, g, b),
                    points: pts,
                });
            }
        }
        let panels = root.split_evenly((2, 1));
        draw_panel(
            &panels[0],
            "losses",
            "loss",
            &losses,
            opts.legend,
            SeriesLabelPosition::UpperRight,
        )
        .map_err(|e| draw_err(&e))?;
        draw_panel(
            &panels[1],
            "validation",
            "value",
            &vals,
            opts.legend,
            SeriesLabelPosition::LowerRight,
        )
        .map_err(|e| draw_err(&e))?;
        root.present().map_err(|e| draw_err(&e))?;
    }
    Ok(buf)
}

/// Registers the embedded font with plotters once per process.
fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "plot",
            "the embedded font could not be loaded (a build problem)",
        ))
    }
}

/// A range that contains `lo..hi` with a margin, never empty (a flat series gets ±1 or ±10 %).
fn padded(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if hi > lo {
        let m = (hi - lo) * frac;
        (lo - m, hi + m)
    } else {
        let m = if lo.abs() > 0.0 { lo.abs() * 0.1 } else { 1.0 };
        (lo - m, hi + m)
    }
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    series: &[Series<'_>],
    legend: bool,
    legend_pos: SeriesLabelPosition,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let empty = series.iter().all(|s| s.points.is_empty());
    if empty {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        padded(x0, x1, 0.0)
    };
    let (y0, y1) = padded(y0, y1, 0.05);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 18))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;
    if empty {
        let msg = if caption == "losses" {
            "no key ending in `loss`"
        } else {
            "no `val_*` key"
        };
        let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
        chart.draw_series(std::iter::once(Text::new(
            msg.to_string(),
            (cx, cy),
            (FAMILY, 16).into_font().color(&RGBColor(120, 120, 120)),
        )))?;
        return Ok(());
    }
    for s in series {
        let color = s.color;
        let drawn = chart.draw_series(LineSeries::new(
            s.points.iter().copied(),
            color.stroke_width(2),
        ))?;
        if legend {
            drawn.label(s.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        }
        // Sparse series (per-epoch validation, or a single point, which a line cannot show)
        // also get markers.
        if s.points.len() <= 60 {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .position(legend_pos)
            .label_font((FAMILY, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .draw()?;
    }
    Ok(())
}

/// Encodes the RGB buffer as PNG into a temporary sibling of `output`, then renames it.
fn write_png(output: &Path, w: u32, h: u32, pixels: &[u8]) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        err: e,
    };
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plot.png".to_string());
    let tmp = output.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let png_err = |e: png::EncodingError| Error::Format {
            path: output.display().to_string(),
            detail: format!("PNG encoding failed: {e}"),
        };
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(pixels).map_err(png_err)?;
        // finish() writes the end chunk and flushes the buffered file.
        writer.finish().map_err(png_err)?;
        std::fs::rename(&tmp, output).map_err(|e| io(output, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_ranges_are_never_empty() {
        assert_eq!(padded(0.0, 10.0, 0.05), (-0.5, 10.5));
        assert_eq!(padded(2.0, 2.0, 0.05), (1.8, 2.2));
        assert_eq!(padded(0.0, 0.0, 0.05), (-1.0, 1.0));
    }

    #[test]
    fn key_classes() {
        assert!(is_loss_key("train_loss") && is_loss_key("train_unlab_loss"));
        assert!(!is_loss_key("val_acc1") && !is_loss_key("lr"));
        assert!(is_val_key("val_acc1_head0") && !is_val_key("lr"));
    }

    #[test]
    fn the_embedded_font_loads() {
        assert!(register_font().is_ok());
    }
}

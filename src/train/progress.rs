//! Progress display for training epochs and evaluation passes: epoch/label, step/total, smoothed
//! loss (or any named metric), images per second and ETA.
//!
//! Why two forms: on a terminal a live bar (the `indicatif` crate, which redraws in place at a
//! bounded rate) is what users expect from long work; in a log file or CI a bar's carriage
//! returns make an unreadable mess, so there the same information is written as one plain line
//! every N seconds, plus a summary line at the end. Everything goes to stderr, leaving stdout to
//! results. The numbers are computed here (not by indicatif) so that both forms agree and so that
//! the formatting is unit-tested without timing.
//!
//! Rates and ETA use a sliding window of recent updates, so a slow first step (warm-up, kernel
//! compilation, page cache) stops distorting them after a few seconds.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a [`Progress`] shows itself.
pub enum Mode {
    /// A live bar when stderr is a terminal, else plain lines every `interval`.
    Auto {
        /// Time between two plain lines when stderr is not a terminal.
        interval: Duration,
    },
    /// Always the live bar on stderr (indicatif hides it itself when stderr is not a terminal).
    Bar,
    /// Plain lines to `writer` at most every `interval` (zero: every update), and the summary.
    Plain {
        /// Time between two lines.
        interval: Duration,
        /// Where the lines go (stderr, a log file, a buffer in tests).
        writer: Box<dyn Write + Send>,
    },
    /// Nothing at all (`--quiet`, or ranks other than 0 in a multi-process run).
    Off,
}

/// Default time between plain lines when stderr is not a terminal: often enough to see a run is
/// alive, rare enough that a day-long log stays short.
pub const DEFAULT_PLAIN_INTERVAL: Duration = Duration::from_secs(10);

/// Weight of the newest value in the smoothed metrics (an exponential moving average with bias
/// correction, so the first values are not pulled towards zero).
const SMOOTHING: f64 = 0.1;

/// How far back the rate window reaches.
const RATE_WINDOW: Duration = Duration::from_secs(20);

enum Output {
    Bar(ProgressBar),
    Plain {
        interval: Duration,
        writer: Box<dyn Write + Send>,
        last: Option<Instant>,
    },
    Off,
}

/// A smoothed metric: name, bias-corrected running average state, number of values.
struct Smoothed {
    name: String,
    avg: f64,
    count: i32,
}

impl Smoothed {
    fn push(&mut self, v: f64) {
        self.avg = (1.0 - SMOOTHING) * self.avg + SMOOTHING * v;
        self.count = self.count.saturating_add(1);
    }

    fn value(&self) -> f64 {
        self.avg / (1.0 - (1.0 - SMOOTHING).powi(self.count))
    }
}

/// A progress display for one pass of `total` steps (an epoch, an evaluation).
///
/// Call [`Progress::update`] after each step and [`Progress::finish`] at the end; use
/// [`Progress::println`] for other messages so that they do not tear the bar.
pub struct Progress {
    label: String,
    total: usize,
    step: usize,
    images: usize,
    start: Instant,
    /// (time, step, images) of recent updates, oldest first, for the rates.
    window: VecDeque<(Instant, usize, usize)>,
    metrics: Vec<Smoothed>,
    out: Output,
    finished: bool,
}

impl Progress {
    /// A display for `total` steps labelled `label` (e.g. `"epoch 3/100"`, `"eval"`): a bar on a
    /// terminal, plain lines every [`DEFAULT_PLAIN_INTERVAL`] otherwise, nothing when `quiet`.
    pub fn new(total: usize, label: &str, quiet: bool) -> Progress {
        let mode = if quiet {
            Mode::Off
        } else {
            Mode::Auto {
                interval: DEFAULT_PLAIN_INTERVAL,
            }
        };
        Progress::with_mode(total, label, mode)
    }

    /// A display with an explicit [`Mode`].
    pub fn with_mode(total: usize, label: &str, mode: Mode) -> Progress {
        let label = label.to_string();
        let out = match mode {
            Mode::Auto { interval } => {
                if std::io::stderr().is_terminal() {
                    Output::Bar(make_bar(total, &label))
                } else {
                    Output::Plain {
                        interval,
                        writer: Box::new(std::io::stderr()),
                        last: None,
                    }
                }
            }
            Mode::Bar => Output::Bar(make_bar(total, &label)),
            Mode::Plain { interval, writer } => Output::Plain {
                interval,
                writer,
                last: None,
            },
            Mode::Off => Output::Off,
        };
        let start = Instant::now();
        let mut window = VecDeque::new();
        window.push_back((start, 0, 0));
        Progress {
            label,
            total,
            step: 0,
            images: 0,
            start,
            window,
            metrics: Vec::new(),
            out,
            finished: false,
        }
    }

    /// Records that `step` steps of `total` are done (absolute, not an increment), that
    /// `images` more images were processed since the previous update, and the step's metrics
    /// (smoothed for display; non-finite values are shown as they are, since a NaN loss is news).
    pub fn update(&mut self, step: usize, metrics: &[(&str, f64)], images: usize) {
        self.step = step;
        self.images = self.images.saturating_add(images);
        for &(name, v) in metrics {
            match self.metrics.iter_mut().find(|m| m.name == name) {
                Some(m) => m.push(v),
                None => {
                    let mut m = Smoothed {
                        name: name.to_string(),
                        avg: 0.0,
                        count: 0,
                    };
                    m.push(v);
                    self.metrics.push(m);
                }
            }
        }
        let now = Instant::now();
        self.window.push_back((now, step, self.images));
        // Keep at least two points; drop the ones older than the window.
        while self.window.len() > 2
            && self
                .window
                .get(1)
                .is_some_and(|&(t, _, _)| now.duration_since(t) >= RATE_WINDOW)
        {
            self.window.pop_front();
        }
        let msg = self.message();
        match &mut self.out {
            Output::Bar(bar) => {
                bar.set_message(msg);
                bar.set_position(step.min(self.total) as u64);
            }
            Output::Plain {
                interval,
                writer,
                last,
            } => {
                let due = last.is_none_or(|t| now.duration_since(t) >= *interval);
                if due {
                    *last = Some(now);
                    let line = format!(
                        "{}: step {}/{} ({}) | {}",
                        self.label,
                        step,
                        self.total,
                        format_percent(step, self.total),
                        msg
                    );
                    // A failed write to stderr or a log is not worth stopping a training run.
                    let _ = writeln!(writer, "{line}");
                    let _ = writer.flush();
                }
            }
            Output::Off => {}
        }
    }

    /// Ends the display with one summary line, always written (even on a terminal, where it
    /// replaces the bar and stays in the scroll-back as the record of the pass): label, steps,
    /// elapsed time, mean images/s over the whole pass, then `summary` (e.g. `"val_acc1 71.2"`).
    /// Only the first call has an effect. (A display dropped without `finish`, e.g. when a run is
    /// interrupted, leaves the bar as it was last drawn.)
    pub fn finish(&mut self, summary: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        let line = self.summary_line(summary);
        match &mut self.out {
            Output::Bar(bar) => {
                bar.finish_and_clear();
                eprintln!("{line}");
            }
            Output::Plain { writer, .. } => {
                let _ = writeln!(writer, "{line}");
                let _ = writer.flush();
            }
            Output::Off => {}
        }
    }

    /// Prints `line` without tearing the bar (above it on a terminal, as a plain line otherwise).
    pub fn println(&mut self, line: &str) {
        match &mut self.out {
            Output::Bar(bar) => bar.println(line),
            Output::Plain { writer, .. } => {
                let _ = writeln!(writer, "{line}");
                let _ = writer.flush();
            }
            Output::Off => {}
        }
    }

    /// The smoothed value of metric `name`, if it was ever given.
    pub fn smoothed(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|m| m.name == name)
            .map(Smoothed::value)
    }

    /// Images per second and seconds per step over the recent window (None before two updates
    /// that are apart in time).
    fn rates(&self) -> Option<(f64, f64)> {
        let &(t0, s0, i0) = self.window.front()?;
        let &(t1, s1, i1) = self.window.back()?;
        let dt = t1.duration_since(t0).as_secs_f64();
        if dt <= 0.0 || s1 <= s0 {
            return None;
        }
        Some(((i1 - i0) as f64 / dt, dt / (s1 - s0) as f64))
    }

    /// The part shared by the bar and the plain lines: metrics, img/s, ETA.
    fn message(&self) -> String {
        let metrics: Vec<(&str, f64)> = self
            .metrics
            .iter()
            .map(|m| (m.name.as_str(), m.value()))
            .collect();
        let (rate, eta) = match self.rates() {
            Some((img_s, s_per_step)) => (
                Some(img_s),
                Some(s_per_step * self.total.saturating_sub(self.step) as f64),
            ),
            None => (None, None),
        };
        format_message(&metrics, rate, eta)
    }

    fn summary_line(&self, summary: &str) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            Some(self.images as f64 / secs)
        } else {
            None
        };
        format_summary(&self.label, self.step, secs, rate, summary)
    }
}

fn make_bar(total: usize, label: &str) -> ProgressBar {
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
        .with_style(style)
        .with_prefix(label.to_string())
}

/// A duration for people: `"0:42"`, `"12:05"`, `"3:04:05"`, `"2d 03:04:05"`; `"?"` when unknown
/// (negative, NaN or infinite). Rounded to whole seconds.
pub fn format_eta(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".to_string();
    }
    let total = secs.round() as u64;
    let (d, h, m, s) = (
        total / 86_400,
        total / 3600 % 24,
        total / 60 % 60,
        total % 60,
    );
    if d > 0 {
        format!("{d}d {h:02}:{m:02}:{s:02}")
    } else if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

/// Images per second with a precision that suits the size: `"3.21"`, `"812.4"`, `"12345"`.
pub fn format_rate(img_per_s: f64) -> String {
    if !img_per_s.is_finite() || img_per_s < 0.0 {
        "?".to_string()
    } else if img_per_s < 10.0 {
        format!("{img_per_s:.2}")
    } else if img_per_s < 1000.0 {
        format!("{img_per_s:.1}")
    } else {
        format!("{img_per_s:.0}")
    }
}

/// A metric value: four decimals in the usual range, scientific notation when very large or
/// small, and `nan` / `inf` as they are.
pub fn format_value(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        format!("{v}").to_lowercase()
    } else if a != 0.0 && !(1e-3..1e4).contains(&a) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

fn format_percent(step: usize, total: usize) -> String {
    if total == 0 {
        "?%".to_string()
    } else {
        format!("{:.0}%", 100.0 * step as f64 / total as f64)
    }
}

/// The status text: `"loss 2.3456 | 812.4 img/s | ETA 7:45"`; unknown rates show `?`.
pub fn format_message(
    metrics: &[(&str, f64)],
    img_per_s: Option<f64>,
    eta_secs: Option<f64>,
) -> String {
    let mut parts: Vec<String> = metrics
        .iter()
        .map(|(k, v)| format!("{k} {}", format_value(*v)))
        .collect();
    parts.push(format!(
        "{} img/s",
        img_per_s.map_or("?".to_string(), format_rate)
    ));
    parts.push(format!(
        "ETA {}",
        eta_secs.map_or("?".to_string(), format_eta)
    ));
    parts.join(" | ")
}

/// The end-of-pass line: `"epoch 3/100: 500 steps in 3:02 | 812.4 img/s | val_acc1 71.2"`.
pub fn format_summary(
    label: &str,
    steps: usize,
    secs: f64,
    img_per_s: Option<f64>,
    summary: &str,
) -> String {
    let mut line = format!(
        "{label}: {steps} steps in {} | {} img/s",
        format_eta(secs),
        img_per_s.map_or("?".to_string(), format_rate)
    );
    if !summary.is_empty() {
        line.push_str(" | ");
        line.push_str(summary);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn eta_formats() {
        assert_eq!(format_eta(0.0), "0:00");
        assert_eq!(format_eta(42.4), "0:42");
        assert_eq!(format_eta(59.6), "1:00");
        assert_eq!(format_eta(12.0 * 60.0 + 5.0), "12:05");
        assert_eq!(format_eta(3.0 * 3600.0 + 4.0 * 60.0 + 5.0), "3:04:05");
        assert_eq!(
            format_eta(2.0 * 86400.0 + 3.0 * 3600.0 + 4.0 * 60.0 + 5.0),
            "2d 03:04:05"
        );
        assert_eq!(format_eta(-1.0), "?");
        assert_eq!(format_eta(f64::NAN), "?");
        assert_eq!(format_eta(f64::INFINITY), "?");
    }

    #[test]
    fn rate_and_value_formats() {
        assert_eq!(format_rate(3.2149), "3.21");
        assert_eq!(format_rate(812.44), "812.4");
        assert_eq!(format_rate(12345.6), "12346");
        assert_eq!(format_rate(f64::NAN), "?");
        assert_eq!(format_value(2.345_67), "2.3457");
        assert_eq!(format_value(0.0), "0.0000");
        assert_eq!(format_value(1.5e-5), "1.500e-5");
        assert_eq!(format_value(123_456.0), "1.235e5");
        assert_eq!(format_value(f64::NAN), "nan");
        assert_eq!(format_value(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn message_and_summary_formats() {
        assert_eq!(
            format_message(&[("loss", 2.5)], Some(812.44), Some(465.0)),
            "loss 2.5000 | 812.4 img/s | ETA 7:45"
        );
        assert_eq!(format_message(&[], None, None), "? img/s | ETA ?");
        assert_eq!(
            format_summary("epoch 3/100", 500, 182.0, Some(812.44), "val_acc1 71.2"),
            "epoch 3/100: 500 steps in 3:02 | 812.4 img/s | val_acc1 71.2"
        );
        assert_eq!(
            format_summary("eval", 10, 5.0, None, ""),
            "eval: 10 steps in 0:05 | ? img/s"
        );
    }

    #[test]
    fn smoothing_is_bias_corrected_and_follows_the_values() {
        let mut p = Progress::with_mode(10, "t", Mode::Off);
        p.update(1, &[("loss", 4.0)], 8);
        // The first value is shown as it is, not pulled towards zero.
        assert!((p.smoothed("loss").unwrap_or(f64::NAN) - 4.0).abs() < 1e-12);
        p.update(2, &[("loss", 2.0)], 8);
        // (0.9 * 0.4 + 0.1 * 2) / (1 - 0.81) = 0.56 / 0.19
        let want = 0.56 / 0.19;
        assert!((p.smoothed("loss").unwrap_or(f64::NAN) - want).abs() < 1e-12);
        assert!(p.smoothed("acc").is_none());
        for s in 3..200 {
            p.update(s, &[("loss", 1.0)], 8);
        }
        assert!((p.smoothed("loss").unwrap_or(f64::NAN) - 1.0).abs() < 1e-6);
    }

    /// A writer whose contents the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().map(|v| v.clone()).unwrap_or_default())
                .into_owned()
        }
    }

    #[test]
    fn plain_mode_writes_lines_and_a_summary() {
        let buf = Shared::default();
        let mut p = Progress::with_mode(
            4,
            "epoch 1/2",
            Mode::Plain {
                interval: Duration::ZERO,
                writer: Box::new(buf.clone()),
            },
        );
        p.update(1, &[("loss", 3.0)], 16);
        p.println("a note");
        p.update(2, &[("loss", 3.0)], 16);
        p.finish("val_acc1 50.0");
        p.finish("a second finish is ignored");
        let text = buf.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("epoch 1/2: step 1/4 (25%) | loss 3.0000 | "),
            "{text}"
        );
        assert!(lines[0].contains(" img/s | ETA "), "{text}");
        assert_eq!(lines[1], "a note");
        assert!(
            lines[2].starts_with("epoch 1/2: step 2/4 (50%) | loss 3.0000 | "),
            "{text}"
        );
        assert!(lines[3].starts_with("epoch 1/2: 2 steps in "), "{text}");
        assert!(lines[3].ends_with(" img/s | val_acc1 50.0"), "{text}");
    }

    #[test]
    fn plain_mode_with_a_long_interval_writes_only_the_first_line() {
        let buf = Shared::default();
        let mut p = Progress::with_mode(
            100,
            "eval",
            Mode::Plain {
                interval: Duration::from_secs(3600),
                writer: Box::new(buf.clone()),
            },
        );
        for s in 1..=100 {
            p.update(s, &[], 4);
        }
        p.finish("");
        let text = buf.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("eval: step 1/100 (1%) | "), "{text}");
        assert!(lines[1].starts_with("eval: 100 steps in "), "{text}");
    }
}

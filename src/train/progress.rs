//! Progress display (placeholder until the full display lands): a plain line every few seconds.

use std::time::Instant;

/// Progress of a loop of `total` steps.
pub struct Progress {
    total: usize,
    label: String,
    quiet: bool,
    start: Instant,
    last: Instant,
    images: usize,
}

impl Progress {
    /// Starts a display.
    pub fn new(total: usize, label: &str, quiet: bool) -> Progress {
        Progress {
            total,
            label: label.to_string(),
            quiet,
            start: Instant::now(),
            last: Instant::now(),
            images: 0,
        }
    }

    /// Step `done` finished with `values`, processing `images` images.
    pub fn update(&mut self, done: usize, values: &[(&str, f64)], images: usize) {
        self.images += images;
        if self.quiet || self.last.elapsed().as_secs_f64() < 5.0 {
            return;
        }
        self.last = Instant::now();
        let el = self.start.elapsed().as_secs_f64();
        let eta = el / done.max(1) as f64 * (self.total.saturating_sub(done)) as f64;
        let v: Vec<String> = values.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        eprintln!(
            "{} {done}/{} {} {:.1} img/s eta {:.0}s",
            self.label,
            self.total,
            v.join(" "),
            self.images as f64 / el,
            eta
        );
    }

    /// Ends the display.
    pub fn finish(&mut self, _summary: &str) {}
}

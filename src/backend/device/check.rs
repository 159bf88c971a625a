//! The device check's machinery, shared by the GPU check (`sdengine device-check`, in
//! `backend::cuda::check`) and its rehearsal on the CPU emulation (`sdengine device-check
//! --emu`, [`run_emu_check`]): options, rows, the report and its table, and the [`Checker`]
//! that runs one row at a time.
//!
//! Correctness: inputs are fresh random values (never zeros), rounded to bf16 where the kernel
//! takes bf16, and the CPU reference computes in f32 on exactly those rounded values, so the
//! error measures the kernel's arithmetic and output rounding only. bf16 outputs must land
//! within 1e-2 (DESIGN.md's band for bf16 vs f32), f32 outputs within 1e-4; NaN fails.
//!
//! Each row runs inside `catch_unwind` and ends with a synchronisation, so a panic in a library
//! binding or an asynchronous kernel fault is charged to the op that caused it and the check
//! goes on. Each row also carries the parameters `scripts/device_check.py` needs to time the
//! same op in PyTorch (`torch`), so the script can print one table with both.
//!
//! The kernel families' rows (`device::<family>::check_rows`) are generic over [`Exec`]: on
//! the emulation they run the very code the GPU check runs, at the quick sizes, so a wrong
//! argument, shape or tolerance is found by `cargo test` rather than on a GPU machine's clock.

use super::{Exec, Timing};
use crate::error::{Error, Result};
use crate::rng::Rng;
use half::bf16;
use serde::Serialize;
use serde_json::Value;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;

/// Tolerance of a bf16 output against the f32 CPU reference.
pub const TOL_BF16: f64 = 1e-2;
/// Tolerance of an f32 output (fp32 arithmetic, different summation order).
pub const TOL_F32: f64 = 1e-4;

/// What the check runs.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Smaller sizes and fewer repetitions (a smoke test of a few seconds).
    pub quick: bool,
    /// Run only rows whose id contains this text (ceilings always run).
    pub filter: Option<String>,
    /// Untimed runs before timing.
    pub warmup: usize,
    /// Timed runs (the median is reported).
    pub reps: usize,
    /// JPEG files or folders for the nvJPEG rows; empty: the repository's test JPEGs and, when
    /// present, `shared/data/imagenet-samples`.
    pub images: Vec<PathBuf>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            device: 0,
            quick: false,
            filter: None,
            warmup: 3,
            reps: 20,
            images: Vec::new(),
        }
    }
}

/// One line of the table.
#[derive(Clone, Debug, Serialize)]
pub struct CheckRow {
    /// ceiling, runtime, gemm, conv, jpeg, alloc, or a kernel family.
    pub group: String,
    /// Stable op id (PyTorch timings are matched by it).
    pub id: String,
    /// Human-readable shape.
    pub shape: String,
    /// Relative L2 error against the CPU backend, when checked.
    pub rel_err: Option<f64>,
    /// The tolerance it was held to.
    pub tol: Option<f64>,
    /// Median GPU time in milliseconds, when timed.
    pub ms: Option<f64>,
    /// The floor from the measured ceilings, milliseconds.
    pub floor_ms: Option<f64>,
    /// Floating-point operations of one run.
    pub flops: f64,
    /// Bytes one run must move (inputs read once, outputs written once).
    pub bytes: f64,
    /// Whether the row passed (a skipped row passes and says why).
    pub passed: bool,
    /// The row did not run (a library or input is absent).
    pub skipped: bool,
    /// Error message, skip reason or remark.
    pub note: String,
    /// Parameters for `scripts/device_check.py` to run the same op in PyTorch.
    pub torch: Value,
}

/// The whole check.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// The device, e.g. "cuda:0 NVIDIA H200 (sm_90, 139.8 GiB)".
    pub device: String,
    /// Which CUDA libraries loaded.
    pub libraries: String,
    /// What compiled the kernel table.
    pub kernel_compiler: String,
    /// Measured device-to-device copy rate, GB/s (bytes read + written).
    pub copy_gbps: f64,
    /// Measured bf16 GEMM rate, TFLOP/s.
    pub gemm_tflops: f64,
    /// The rows, in run order.
    pub rows: Vec<CheckRow>,
    /// Allocator counters at the end.
    pub alloc_peak_bytes: usize,
    /// Driver allocations made by the allocator over the whole check.
    pub alloc_misses: u64,
    /// Requests served from the allocator's cache.
    pub alloc_hits: u64,
    /// Whether every row passed.
    pub passed: bool,
}

impl CheckReport {
    /// The table as text (one line per row).
    pub fn table(&self) -> String {
        let ceilings = if self.copy_gbps > 0.0 {
            format!(
                "copy {:.0} GB/s, bf16 GEMM {:.1} TFLOP/s",
                self.copy_gbps, self.gemm_tflops
            )
        } else {
            "not measured (no floors: times are not GPU times)".to_string()
        };
        let mut s = format!(
            "{}\n{}kernels: {}\nceilings: {ceilings}\n",
            self.device, self.libraries, self.kernel_compiler
        );
        s.push_str(&format!(
            "{:<11} {:<28} {:<34} {:>9} {:>7} {:>4} {:>9} {:>9} {:>6}  {}\n",
            "group", "op", "shape", "rel.err", "tol", "ok", "ms", "floor ms", "%floor", "note"
        ));
        let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
        let e = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1e}"));
        for r in &self.rows {
            let pct = match (r.ms, r.floor_ms) {
                (Some(ms), Some(fl)) if ms > 0.0 => format!("{:.0}", 100.0 * fl / ms),
                _ => "-".into(),
            };
            let ok = if r.skipped {
                "skip"
            } else if r.passed {
                "ok"
            } else {
                "FAIL"
            };
            s.push_str(&format!(
                "{:<11} {:<28} {:<34} {:>9} {:>7} {:>4} {:>9} {:>9} {:>6}  {}\n",
                r.group,
                r.id,
                r.shape,
                e(r.rel_err),
                e(r.tol),
                ok,
                f(r.ms, 4),
                f(r.floor_ms, 4),
                pct,
                r.note
            ));
        }
        s.push_str(&format!(
            "allocator: peak {:.1} MiB in use, {} driver allocations, {} cache hits\nresult: {}\n",
            self.alloc_peak_bytes as f64 / (1 << 20) as f64,
            self.alloc_misses,
            self.alloc_hits,
            if self.passed { "PASS" } else { "FAIL" }
        ));
        s
    }
}

/// What one row's body measured.
#[derive(Default)]
pub struct Measured {
    /// Relative error and its tolerance.
    pub err: Option<(f64, f64)>,
    /// Timing.
    pub time: Option<Timing>,
    /// FLOPs of one run.
    pub flops: f64,
    /// Bytes of one run.
    pub bytes: f64,
    /// Remark.
    pub note: String,
    /// Set when the row did not run (reason in `note`).
    pub skipped: bool,
}

/// The running check: device, options, ceilings, rows so far.
pub struct Checker<'a, E: Exec> {
    /// The device (a GPU, or the CPU emulation of one).
    pub dev: &'a E,
    /// The options.
    pub opts: &'a CheckOptions,
    /// Copy rate, bytes per millisecond (0 until measured).
    pub bytes_per_ms: f64,
    /// GEMM rate, FLOP per millisecond (0 until measured).
    pub flops_per_ms: f64,
    rows: Vec<CheckRow>,
}

impl<'a, E: Exec> Checker<'a, E> {
    /// A check on `dev` with no rows yet and no ceilings measured.
    pub fn new(dev: &'a E, opts: &'a CheckOptions) -> Self {
        Checker {
            dev,
            opts,
            bytes_per_ms: 0.0,
            flops_per_ms: 0.0,
            rows: Vec::new(),
        }
    }

    /// The rows so far, in run order.
    pub fn into_rows(self) -> Vec<CheckRow> {
        self.rows
    }

    /// Whether the filter selects `id`.
    pub fn wants(&self, id: &str) -> bool {
        self.opts.filter.as_deref().is_none_or(|f| id.contains(f))
    }

    /// Times `work` with the options' warm-up and repetitions.
    pub fn time<F: FnMut() -> Result<()>>(&self, work: F) -> Result<Timing> {
        self.dev.time(self.opts.warmup, self.opts.reps, work)
    }

    /// Runs one row: `body` computes and compares; panics and stream faults become failures.
    pub fn row<F>(&mut self, group: &str, id: &str, shape: String, torch: Value, body: F)
    where
        F: FnOnce(&Checker<'a, E>) -> Result<Measured>,
    {
        if !self.wants(id) {
            return;
        }
        let res = std::panic::catch_unwind(AssertUnwindSafe(|| body(self)))
            .unwrap_or_else(|p| {
                let msg = crate::error::panic_message(p.as_ref());
                Err(Error::invalid("device-check", format!("panicked: {msg}")))
            })
            .and_then(|m| self.dev.synchronize().map(|_| m));
        let mut row = CheckRow {
            group: group.into(),
            id: id.into(),
            shape,
            rel_err: None,
            tol: None,
            ms: None,
            floor_ms: None,
            flops: 0.0,
            bytes: 0.0,
            passed: false,
            skipped: false,
            note: String::new(),
            torch,
        };
        match res {
            Ok(m) => {
                row.flops = m.flops;
                row.bytes = m.bytes;
                row.ms = m.time.map(|t| t.median_ms);
                if self.bytes_per_ms > 0.0
                    && self.flops_per_ms > 0.0
                    && (m.flops > 0.0 || m.bytes > 0.0)
                {
                    row.floor_ms =
                        Some((m.bytes / self.bytes_per_ms).max(m.flops / self.flops_per_ms));
                }
                row.passed = match m.err {
                    Some((e, tol)) => {
                        row.rel_err = Some(e);
                        row.tol = Some(tol);
                        e <= tol
                    }
                    None => true,
                };
                row.skipped = m.skipped;
                row.note = m.note;
            }
            Err(e) => row.note = e.to_string(),
        }
        self.rows.push(row);
    }
}

/// Uniform random values in [-1, 1) from a named stream (fresh, never zeros).
pub fn random(name: &str, n: usize) -> Vec<f32> {
    let mut r = Rng::named(0x5d_c0ffee, name);
    (0..n).map(|_| r.uniform_range(-1.0, 1.0) as f32).collect()
}

/// Values rounded to bf16 and back (what the GPU sees), for the CPU reference.
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// The rows of every kernel family of the kernel table (`kernels/*.cu`), in table order; a
/// family without device ops gets a skipped row saying so, so that no kernel is left out of
/// the table silently.
pub fn kernel_rows<E: Exec>(c: &mut Checker<'_, E>) {
    for m in crate::backend::kernels::MODULES {
        match m.name {
            "sinkhorn" => super::sinkhorn::check_rows(c),
            "softmax_ce" => super::softmax_ce::check_rows(c),
            "norm" => super::norm::check_rows(c),
            "optim" => super::optim::check_rows(c),
            "elementwise" => super::elementwise::check_rows(c),
            "mixup" => super::mixup::check_rows(c),
            "augment" => super::augment::check_rows(c),
            "pool" => super::pool::check_rows(c),
            other => c.row("kernels", other, "-".into(), Value::Null, |_| {
                Ok(Measured {
                    skipped: true,
                    note: "SKIP: kernel module has no device ops".into(),
                    ..Default::default()
                })
            }),
        }
    }
}

/// The check's kernel rows on the CPU emulation (`sdengine device-check --emu`): the same
/// device ops, arguments, shapes, references and tolerances as on the GPU, so that a GPU run is
/// rehearsed on any machine. Times are CPU wall-clock times of the emulation (no floors: they
/// say nothing about a GPU); the GEMM and convolution rows run the CPU backend in place of
/// cuBLASLt / cuDNN, then the device ResNet's rows (`models::device::verify`); the GPU-only
/// rows (ceilings, runtime, nvJPEG, allocator) are absent.
pub fn run_emu_check(opts: &CheckOptions, mode: super::Mode) -> Result<CheckReport> {
    let emu = super::Emu::new(mode);
    let mut c = Checker::new(&emu, opts);
    super::blas::check_rows(&mut c);
    kernel_rows(&mut c);
    crate::models::device::verify::check_rows(&mut c);
    let rows = c.into_rows();
    let passed = rows.iter().all(|r| r.passed);
    Ok(CheckReport {
        device: emu.describe(),
        libraries:
            "none (CPU emulation: GEMM and conv rows run the CPU backend; nvJPEG rows need a GPU)\n"
                .into(),
        kernel_compiler: "g++ with kernels/emu/cuda_emu.h".into(),
        copy_gbps: 0.0,
        gemm_tflops: 0.0,
        rows,
        alloc_peak_bytes: 0,
        alloc_misses: 0,
        alloc_hits: 0,
        passed,
    })
}

/// Prints the report's table, writes it as JSON to `json` when given, and errors naming the
/// failed rows when any row failed.
pub fn finish(report: &CheckReport, json: Option<&std::path::Path>) -> Result<()> {
    print!("{}", report.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(report).map_err(|e| Error::Format {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(|err| Error::Io {
            path: path.display().to_string(),
            err,
        })?;
    }
    if report.passed {
        Ok(())
    } else {
        let failed: Vec<&str> = report
            .rows
            .iter()
            .filter(|r| !r.passed)
            .map(|r| r.id.as_str())
            .collect();
        Err(Error::invalid(
            "device-check",
            format!("{} op(s) failed: {}", failed.len(), failed.join(", ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::rel_l2;

    #[test]
    fn random_inputs_are_fresh_and_bf16_rounding_is_exact_on_representable_values() {
        let a = random("x", 1000);
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        assert!(a.iter().filter(|&&v| v == 0.0).count() < 2);
        assert_ne!(random("x", 8), random("y", 8));
        let r = round_bf16(&a);
        assert_eq!(round_bf16(&r), r);
        assert!(rel_l2(&r, &a) < 4e-3 && rel_l2(&r, &a) > 0.0);
    }

    #[test]
    fn rows_record_errors_panics_and_tolerances() {
        let emu = super::super::Emu::new(super::super::Mode::Fibers);
        let opts = CheckOptions {
            reps: 2,
            warmup: 0,
            ..Default::default()
        };
        let mut c = Checker::new(&emu, &opts);
        c.row("t", "within", "-".into(), Value::Null, |_| {
            Ok(Measured {
                err: Some((1e-3, 1e-2)),
                ..Default::default()
            })
        });
        c.row("t", "outside", "-".into(), Value::Null, |_| {
            Ok(Measured {
                err: Some((1e-1, 1e-2)),
                ..Default::default()
            })
        });
        c.row("t", "nan", "-".into(), Value::Null, |_| {
            Ok(Measured {
                err: Some((f64::NAN, 1e-2)),
                ..Default::default()
            })
        });
        c.row("t", "error", "-".into(), Value::Null, |_| {
            Err(Error::invalid("op", "broken"))
        });
        c.row("t", "panic", "-".into(), Value::Null, |_| panic!("kaboom"));
        let rows = c.into_rows();
        let passed: Vec<bool> = rows.iter().map(|r| r.passed).collect();
        assert_eq!(passed, [true, false, false, false, false]);
        assert!(rows[3].note.contains("broken"));
        assert!(rows[4].note.contains("kaboom"));
    }
}

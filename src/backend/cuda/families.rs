//! GPU wrappers of the engine's own kernels (`kernels/<family>.cu`), one function per kernel:
//! device buffers in, device buffers out, launch configuration chosen here. The GPU check
//! compares each with its CPU op (`backend::cpu::<family>`).
//!
//! The kernel table is filled by the kernel layer; families whose kernels exist are wrapped in
//! their own files beside this one and registered in [`check_rows`].

use super::check::{Checker, Measured};
use super::module::table;
use serde_json::Value;

/// Adds the GPU check's rows for every wrapped kernel family; a single skipped row when the
/// kernel table is empty, so that the table says so instead of silently omitting them.
pub fn check_rows(c: &mut Checker<'_>) {
    if table::MODULES.is_empty() {
        c.row("kernels", "own_kernels", "-".into(), Value::Null, |_| {
            Ok(Measured {
                skipped: true,
                note: format!("SKIP: the kernel table is empty (built by: {})", table::COMPILER),
                ..Default::default()
            })
        });
    }
}

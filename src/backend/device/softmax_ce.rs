//! Device ops of `kernels/softmax_ce.cu` (to be moved here from `backend::emu::softmax_ce`).

use super::check::{Checker, Measured};
use super::Exec;
use serde_json::Value;

/// The device check's rows of this family.
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    c.row("kernels", "softmax_ce", "-".into(), Value::Null, |_| {
        Ok(Measured {
            skipped: true,
            note: "SKIP: no device ops yet".into(),
            ..Default::default()
        })
    });
}

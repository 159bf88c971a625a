//! The device check rehearsed on the CPU emulation: every kernel family of the kernel table
//! runs its GPU-check rows (the same device ops, shapes, CPU references and tolerances the GPU
//! check uses) and must pass, with no family skipped. Then, where PyTorch is installed, the
//! PyTorch half (scripts/device_check.py) runs every row's PyTorch op on the CPU, so a broken
//! op spec is found here rather than on the GPU machine.

use sdengine::backend::device::check::{run_emu_check, CheckOptions};
use sdengine::backend::device::Mode;
use std::process::Command;

fn quick() -> CheckOptions {
    CheckOptions {
        quick: true,
        warmup: 0,
        reps: 1,
        ..Default::default()
    }
}

#[test]
fn every_kernel_family_passes_its_check_rows_on_the_emulation() {
    let report = run_emu_check(&quick(), Mode::Fibers).unwrap();
    print!("{}", report.table());
    let failed: Vec<String> = report
        .rows
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("{}: {}", r.id, r.note))
        .collect();
    assert!(failed.is_empty(), "rows failed: {failed:#?}");
    let skipped: Vec<&str> = report
        .rows
        .iter()
        .filter(|r| r.skipped)
        .map(|r| r.id.as_str())
        .collect();
    assert!(skipped.is_empty(), "kernel rows skipped: {skipped:?}");
    for m in sdengine::backend::kernels::MODULES {
        let checked = report
            .rows
            .iter()
            .filter(|r| r.group == m.name && r.rel_err.is_some())
            .count();
        assert!(checked > 0, "kernel family {} has no checked row", m.name);
    }
    assert!(report.passed);
}

#[test]
fn the_pytorch_half_runs_every_rows_op() {
    let has_torch = Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_torch {
        println!("SKIP: python3 with torch is not installed; the PyTorch half is not exercised");
        return;
    }
    let report = run_emu_check(&quick(), Mode::Fibers).unwrap();
    let dir = std::env::temp_dir().join(format!("sdengine-devcheck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("engine.json");
    std::fs::write(&json, serde_json::to_string(&report).unwrap()).unwrap();
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/device_check.py"
        ))
        .arg("--engine")
        .arg(&json)
        .args([
            "--torch-device",
            "cpu",
            "--strict-torch",
            "--reps",
            "1",
            "--warmup",
            "0",
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    std::fs::remove_dir_all(&dir).ok();
    assert!(out.status.success(), "device_check.py failed:\n{text}");
    // Every row with a PyTorch spec got a PyTorch time (the column after %floor).
    let with_spec = report.rows.iter().filter(|r| !r.torch.is_null()).count();
    assert!(with_spec > 0, "no row carries a PyTorch spec");
    assert!(text.contains("result: PASS"), "{text}");
}

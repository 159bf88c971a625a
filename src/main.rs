//! The `sdengine` command line. Parsing and printing only: every command calls into the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::time::Duration;

/// Semi-supervised training engine for Suave (SwAV + labels, ResNet-50) and Daino
/// (DINO + labels, ViT-S/16).
#[derive(Parser)]
#[command(name = "sdengine", version, about, long_about = None)]
#[command(after_help = "Examples:
  sdengine info                          what this machine offers the engine
  sdengine bench                         time a ResNet-50 (Suave) and a ViT-S/16 (Daino) training step
  sdengine bench --filter model_vit      only the ViT-S/16 step
  sdengine bench --json steps.json       also write the timings as JSON")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the engine version, the CPU's vector extensions and the thread count.
    Info,
    /// Time whole training steps (forward + backward, batch 8, 224 px) of ResNet-50 with the
    /// Suave heads and ViT-S/16 with the Daino head, on the CPU.
    #[command(
        after_help = "Per-op benchmarks and the comparison with PyTorch on the same machine:\n  \
        cargo bench && python3 benches/torch/run.py --threads $(nproc)"
    )]
    Bench {
        /// Only cases whose id (family/name) contains this text.
        #[arg(long)]
        filter: Option<String>,
        /// Minimum measuring time per case, in seconds.
        #[arg(long, default_value_t = 1.0)]
        min_time: f64,
        /// Also write the timings to this JSON file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// List the case ids and exit.
        #[arg(long)]
        list: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole context chain on one line, never a backtrace: errors here are about the
            // user's input or machine, not bugs.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info => info(),
        Command::Bench {
            filter,
            min_time,
            json,
            list,
        } => bench(filter.as_deref(), min_time, json.as_deref(), list),
    }
}

fn info() -> Result<()> {
    println!("sdengine {}", env!("CARGO_PKG_VERSION"));
    println!("threads: {}", rayon::current_num_threads());
    #[cfg(target_arch = "x86_64")]
    {
        let feats = [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ];
        let on: Vec<&str> = feats.iter().filter(|f| f.1).map(|f| f.0).collect();
        println!("cpu features used by the GEMM: {}", on.join(" "));
    }
    println!("devices: cpu (the CUDA backend is not built yet)");
    Ok(())
}

fn bench(
    filter: Option<&str>,
    min_time: f64,
    json: Option<&std::path::Path>,
    list: bool,
) -> Result<()> {
    if !(min_time.is_finite() && min_time > 0.0) {
        bail!("--min-time must be a positive number of seconds, got {min_time}");
    }
    let mut cases = sdengine::bench::model_cases().context("setting up the benchmark cases")?;
    if let Some(f) = filter {
        cases.retain(|c| c.id().contains(f));
        if cases.is_empty() {
            bail!("--filter {f:?} matches no case; `sdengine bench --list` shows them");
        }
    }
    if list {
        for c in &cases {
            println!("{}", c.id());
        }
        return Ok(());
    }
    println!(
        "{:<44} {:>12} {:>12} {:>6}",
        "case", "median ms", "min ms", "runs"
    );
    let mut out = Vec::new();
    for mut c in cases {
        let t = sdengine::bench::time_case(&mut c, Duration::from_secs_f64(min_time), 3, 1000)
            .with_context(|| format!("running {}", c.id()))?;
        println!(
            "{:<44} {:>12.3} {:>12.3} {:>6}",
            t.id,
            t.median_s * 1e3,
            t.min_s * 1e3,
            t.runs
        );
        out.push(t);
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&out)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

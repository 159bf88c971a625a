//! The `sdengine` command line. Parsing and printing only: every command calls into the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sdengine::io::convert::{export_weights, import_checkpoint, ExportClassifier, Source};
use sdengine::io::export::Arch;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Semi-supervised training engine for Suave (SwAV + labels, ResNet-50) and Daino
/// (DINO + labels, ViT-S/16).
#[derive(Parser)]
#[command(name = "sdengine", version, about, long_about = None)]
#[command(after_help = "Examples:
  sdengine info                          what this machine offers the engine
  sdengine bench                         time a ResNet-50 (Suave) and a ViT-S/16 (Daino) training step
  sdengine bench --filter model_vit      only the ViT-S/16 step
  sdengine bench --json steps.json       also write the timings as JSON
  sdengine import --from swav --checkpoint swav_800ep_pretrain.pth.tar --output suave_init.safetensors
  sdengine import --from dino --checkpoint dino_deitsmall16_pretrain_full_checkpoint.pth --output daino_init.safetensors
  sdengine export --format torchvision --weights suave_init.safetensors --output resnet50.safetensors
  sdengine export --format timm --weights daino_init.safetensors --output vit_small.safetensors")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the engine version, the CPU's vector extensions and the thread count.
    Info,
    /// Convert an official PyTorch checkpoint (SwAV or DINO) into engine weights, without
    /// Python, applying the official init rules (prototypes dropped; projection head dropped
    /// unless --keep-head).
    Import {
        /// Which official checkpoint: swav (ResNet-50, for Suave) or dino (ViT-S/16, for Daino).
        #[arg(long, value_enum)]
        from: ImportFrom,
        /// The .pth / .pth.tar file.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Engine weights to write (.safetensors).
        #[arg(long)]
        output: PathBuf,
        /// Keep the projection head (the official `--init_proj true`).
        #[arg(long)]
        keep_head: bool,
        /// Number of classes (= prototypes) of the model the weights are for.
        #[arg(long, default_value_t = 1000)]
        classes: usize,
        /// Overwrite --output if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Write the backbone of engine weights as a file that torchvision's resnet50() or timm's
    /// vit_small_patch16_224 loads with strict=True (via safetensors.torch.load_file).
    Export {
        /// torchvision (ResNet-50) or timm (ViT-S/16).
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Classes of the classifier written with the backbone (Suave's online linear head when
        /// its size matches, zeros otherwise), so that strict=True loading works.
        #[arg(long, default_value_t = 1000)]
        classes: usize,
        /// Write the backbone only (for num_classes=0 models or strict=False loading).
        #[arg(long, conflicts_with = "classes")]
        no_classifier: bool,
        /// Engine weights (.safetensors, e.g. the output of `sdengine import`).
        #[arg(long)]
        weights: PathBuf,
        /// Backbone file to write (.safetensors).
        #[arg(long)]
        output: PathBuf,
        /// Overwrite --output if it exists.
        #[arg(long)]
        force: bool,
    },
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
        json: Option<PathBuf>,
        /// List the case ids and exit.
        #[arg(long)]
        list: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ImportFrom {
    Swav,
    Dino,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    Torchvision,
    Timm,
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
        Command::Import {
            from,
            checkpoint,
            output,
            keep_head,
            classes,
            force,
        } => import(from, &checkpoint, &output, keep_head, classes, force),
        Command::Export {
            format,
            classes,
            no_classifier,
            weights,
            output,
            force,
        } => {
            let classifier = if no_classifier {
                ExportClassifier::Omit
            } else if classes == 0 {
                bail!("--classes must be at least 1 (or pass --no-classifier)");
            } else {
                ExportClassifier::Include { classes }
            };
            export(format, classifier, &weights, &output, force)
        }
        Command::Bench {
            filter,
            min_time,
            json,
            list,
        } => bench(filter.as_deref(), min_time, json.as_deref(), list),
    }
}

/// Refuses to replace an existing file unless `--force`: a converted checkpoint may be the only
/// copy of a result.
fn check_output(output: &Path, force: bool) -> Result<()> {
    if output.exists() && !force {
        bail!("{} exists; pass --force to overwrite it", output.display());
    }
    Ok(())
}

fn import(
    from: ImportFrom,
    checkpoint: &Path,
    output: &Path,
    keep_head: bool,
    classes: usize,
    force: bool,
) -> Result<()> {
    if classes == 0 {
        bail!("--classes must be at least 1");
    }
    check_output(output, force)?;
    let source = match from {
        ImportFrom::Swav => Source::Swav,
        ImportFrom::Dino => Source::Dino,
    };
    let report = import_checkpoint(source, checkpoint, output, keep_head, classes)
        .with_context(|| format!("importing {}", checkpoint.display()))?;
    println!(
        "loaded {} tensors from {}; {} kept their fresh init{}",
        report.loaded.len(),
        checkpoint.display(),
        report.missing.len(),
        if report.missing.is_empty() { "" } else { ":" }
    );
    for (name, shape) in report.missing.iter().take(12) {
        println!("    {name} {shape:?}");
    }
    if report.missing.len() > 12 {
        println!("    ... and {} more", report.missing.len() - 12);
    }
    println!("wrote {}", output.display());
    Ok(())
}

fn export(
    format: ExportFormat,
    classifier: ExportClassifier,
    weights: &Path,
    output: &Path,
    force: bool,
) -> Result<()> {
    check_output(output, force)?;
    let arch = match format {
        ExportFormat::Torchvision => Arch::ResNet50,
        ExportFormat::Timm => Arch::VitSmallPatch16,
    };
    let n = export_weights(arch, weights, output, classifier)
        .with_context(|| format!("exporting {}", weights.display()))?;
    println!("wrote {n} tensors to {}", output.display());
    Ok(())
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

fn bench(filter: Option<&str>, min_time: f64, json: Option<&Path>, list: bool) -> Result<()> {
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

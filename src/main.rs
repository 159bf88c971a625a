//! The `sdengine` command line. Parsing and printing only: every command calls into the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sdengine::dist::launch::{launch, LaunchArgs};
use sdengine::dist::slurm::{sbatch_path, write_sbatch, SlurmArgs};
use sdengine::io::convert::{export_weights, import_checkpoint, ExportClassifier, Source};
use sdengine::io::export::Arch;
use sdengine::train::cli::TrainArgs;
use sdengine::train::{Method, RunSummary};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Semi-supervised training engine for Suave (SwAV + labels, ResNet-50) and Daino
/// (DINO + labels, ViT-S/16).
#[derive(Parser)]
#[command(name = "sdengine", version, about, long_about = None)]
#[command(after_help = "Examples:
  sdengine train --method suave          Suave on the embedded CIFAR-10 cut (CPU, a few minutes), then
                                         the supervised baseline on the same labels, side by side
  sdengine train --method daino          the same with Daino (a small ViT)
  sdengine train --preset suave-train-10perc --data /imagenet --init swav_800ep_pretrain.pth.tar
  sdengine finetune --preset suave-finetune-10perc --data /imagenet --init runs/suave-train-10perc/final.safetensors
  sdengine train --resume --output runs/suave   continue a stopped run exactly where it stopped
  sdengine eval --run runs/suave         top-1/top-5 of a run's checkpoint on its validation set
  sdengine launch --nproc-per-node 2 -- train --method suave --output runs/suave2   two ranks on this node
  sdengine slurm --help                  write an sbatch script for several nodes
  sdengine plot runs/suave runs/suave/baseline-supervised --output cmp.png   curves of runs, overlaid
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
    /// Train Suave, Daino or the supervised baseline. With no --data: the embedded CIFAR-10 cut,
    /// a small model of the method's family, then the supervised baseline for comparison.
    #[command(
        after_help = "Presets reproduce the official scripts; any flag overrides a preset value.\n\
        Ctrl-C writes a checkpoint at the current iteration; --resume continues bit-identically."
    )]
    Train(Box<TrainArgs>),
    /// Suave's semi-supervised fine-tuning (finetune_{10,1}perc.sh): same loss, lighter
    /// augmentation, from --init.
    Finetune(Box<TrainArgs>),
    /// Evaluate a run's checkpoint on its validation set (Resize + CenterCrop): prototypes and
    /// online heads (Suave), teacher and student (Daino).
    Eval {
        /// The run folder (holds config.json and checkpoint.safetensors).
        #[arg(long)]
        run: PathBuf,
        /// Evaluate on this data folder instead of the run's.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Start ranks of an sdengine command on this node as torchrun does (RANK, LOCAL_RANK,
    /// WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a failing rank stops the others.
    Launch(LaunchArgs),
    /// Write an sbatch script running an sdengine command on Slurm, one rank per GPU.
    Slurm(SlurmArgs),
    /// Check every GPU op against the CPU backend and time it against this GPU's copy and GEMM
    /// ceilings (scripts/device-check.sh adds PyTorch's times). Fails without a GPU.
    DeviceCheck {
        /// Smaller sizes and fewer repetitions (seconds instead of minutes).
        #[arg(long)]
        quick: bool,
        /// Only ops whose id contains this text (the ceilings always run).
        #[arg(long)]
        filter: Option<String>,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// JPEG files or folders for the nvJPEG rows (default: the repository's test JPEGs).
        #[arg(long)]
        images: Vec<PathBuf>,
        /// Also write the report as JSON (read by scripts/device_check.py).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Rehearse the kernel rows on the CPU emulation of the kernels (no GPU needed): the
        /// same device ops, shapes and tolerances as on the GPU; times are CPU times.
        #[arg(long)]
        emu: bool,
    },
    /// Draw runs' metrics.jsonl as a PNG: losses and val_* metrics against epoch, runs overlaid.
    Plot {
        /// Run folders (each holds metrics.jsonl).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The PNG to write (default: curves.png in the first run folder).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Image width in pixels.
        #[arg(long, default_value_t = 1200)]
        width: u32,
        /// Image height in pixels.
        #[arg(long, default_value_t = 900)]
        height: u32,
        /// Title above the panels.
        #[arg(long)]
        title: Option<String>,
        /// Leave the legend out.
        #[arg(long)]
        no_legend: bool,
        /// Only these metrics, comma-separated (e.g. train_loss,val_acc1); default: every loss and val_*.
        #[arg(long, value_delimiter = ',')]
        keys: Vec<String>,
    },
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
        Command::Train(args) => train(&args, false),
        Command::Finetune(args) => train(&args, true),
        Command::Eval { run, data } => {
            let m = sdengine::train::run::evaluate_run(&run, data.as_deref())
                .with_context(|| format!("evaluating {}", run.display()))?;
            for (k, v) in m {
                println!("{k:<24} {v:.3}");
            }
            Ok(())
        }
        Command::Launch(args) => {
            let exe = std::env::current_exe().context("cannot locate the sdengine executable")?;
            let code = launch(&args, &exe)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Slurm(args) => {
            let exe = std::env::current_exe().context("cannot locate the sdengine executable")?;
            write_sbatch(&args, &exe)?;
            let p = sbatch_path(&args);
            println!("wrote {}; submit with: sbatch {}", p.display(), p.display());
            Ok(())
        }
        Command::DeviceCheck {
            quick,
            filter,
            device,
            images,
            json,
            emu,
        } => {
            let mut opts = sdengine::backend::cuda::CheckOptions {
                device,
                quick,
                filter,
                images,
                ..Default::default()
            };
            if quick {
                (opts.warmup, opts.reps) = (1, 5);
            }
            if emu {
                use sdengine::backend::device::{check, Mode};
                check::finish(&check::run_emu_check(&opts, Mode::Fibers)?, json.as_deref())?;
            } else {
                sdengine::backend::cuda::check::cli(&opts, json.as_deref())?;
            }
            Ok(())
        }
        Command::Plot {
            runs,
            output,
            width,
            height,
            title,
            no_legend,
            keys,
        } => {
            let output = output.unwrap_or_else(|| runs[0].join("curves.png"));
            let opts = sdengine::train::plot::PlotOptions {
                width,
                height,
                title,
                legend: !no_legend,
                keys,
            };
            sdengine::train::plot::plot_runs(&runs, &output, &opts)
                .with_context(|| format!("plotting into {}", output.display()))?;
            println!("wrote {}", output.display());
            Ok(())
        }
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

/// The accuracy a summary reports for its method's main head.
fn headline(s: &RunSummary) -> Option<f64> {
    s.last.get("val_acc1").copied()
}

fn print_result(s: &RunSummary) {
    let keys = [
        "val_acc1",
        "val_acc5",
        "val_proj_0_acc1",
        "val_bbone_acc1",
        "val_ensemble_acc1",
        "val_student_acc1",
    ];
    let shown: Vec<String> = keys
        .iter()
        .filter_map(|k| s.last.get(*k).map(|v| format!("{k} {v:.2}")))
        .collect();
    println!(
        "{} ({}): {} iterations; {}; run folder {}",
        s.config.method.name(),
        s.config.arch.name(),
        s.steps,
        if shown.is_empty() {
            "no evaluation".to_string()
        } else {
            shown.join(", ")
        },
        s.output.display()
    );
}

fn train(args: &TrainArgs, finetune: bool) -> Result<()> {
    let (cfg, opts) = args.resolve(finetune)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("second Ctrl-C: exiting now (the last checkpoint on disk is intact)");
                std::process::exit(130);
            }
            eprintln!("Ctrl-C: finishing this iteration and writing a checkpoint (Ctrl-C again to quit now)");
        })
        .context("installing the Ctrl-C handler")?;
    }
    // Under `sdengine launch` / Slurm every rank runs this; only rank 0 reports and runs the
    // baseline (a bad rank environment is reported by the trainer itself).
    let lead = sdengine::dist::env::DistEnv::from_env().map_or(true, |e| e.rank == 0);
    let embedded = cfg.data_path.is_none();
    let baseline = lead && embedded && cfg.method != Method::Supervised && !args.no_baseline;
    let base_cfg = baseline.then(|| {
        let mut b = cfg.clone();
        b.method = Method::Supervised;
        b.output = cfg.output.join("baseline-supervised");
        b
    });
    let s = sdengine::train::train(cfg, &opts, &stop)?;
    if lead {
        print_result(&s);
    }
    if s.stopped {
        if stop.load(Ordering::SeqCst) {
            std::process::exit(130);
        }
        return Ok(());
    }
    if let Some(b) = base_cfg {
        println!("training the supervised baseline: same network, labels, batches and iterations, no unlabelled term");
        let bopts = sdengine::train::RunOptions {
            resume: opts.resume && b.output.join(sdengine::train::run::CHECKPOINT).exists(),
            ..opts.clone()
        };
        let bs = sdengine::train::train(b, &bopts, &stop)?;
        print_result(&bs);
        if let (Some(a), Some(c)) = (headline(&s), headline(&bs)) {
            println!();
            println!("{:<28} {:>8}", "top-1 on the held-out set", "%");
            println!("{:<28} {:>8.2}", s.config.method.name(), a);
            println!("{:<28} {:>8.2}", "supervised baseline", c);
            println!("{:<28} {:>+8.2}", "difference", a - c);
        }
    }
    Ok(())
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
    print!("{}", sdengine::backend::cuda::probe().summary());
    let p = sdengine::backend::cuda::probe();
    if p.gpu() && p.cudnn {
        println!("--device auto: Suave's backbone trains on the GPU (heads, losses, optimiser on the CPU); Daino on the CPU");
    } else if p.gpu() {
        println!("--device auto: training runs on the CPU (a GPU is present but cuDNN is not loadable: put pip's nvidia-cudnn on LD_LIBRARY_PATH)");
    } else {
        println!("--device auto: training runs on the CPU (--device emu runs the GPU path on the CPU emulation)");
    }
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

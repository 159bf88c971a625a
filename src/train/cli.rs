//! The flags of `sdengine train` / `finetune`: one per official option (kebab-case of the
//! official name), all optional, resolved over the method defaults and the preset by
//! [`TrainArgs::resolve`].

use super::config::{Arch, Method, TrainConfig, PRESETS};
use super::run::RunOptions;
use crate::error::{Error, Result};
use clap::Args;
use std::path::PathBuf;

/// Flags of `train` and `finetune`.
#[derive(Args, Clone, Debug, Default)]
pub struct TrainArgs {
    /// suave (default), daino, or supervised (the labelled term alone, same network and budget).
    #[arg(long)]
    pub method: Option<String>,
    /// Reproduce an official script: suave-train-10perc, suave-train-1perc,
    /// suave-finetune-10perc, suave-finetune-1perc, daino-train-10perc, daino-train-1perc.
    #[arg(long)]
    pub preset: Option<String>,
    /// Base settings: `imagenet` (the official defaults: ResNet-50 / ViT-S/16, 224/96-px crops)
    /// or `cifar` (32-px images: the tiny model of the family, 32/16-px crops, the CPU demo's
    /// schedule). Default: cifar without --data, imagenet with it.
    #[arg(long)]
    pub recipe: Option<String>,
    /// resnet50, resnet-tiny, vit_small or vit-tiny.
    #[arg(long)]
    pub arch: Option<String>,
    /// ImageNet-layout folder with train/ and val/ (or test/); default: the embedded CIFAR-10 cut.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// SimCLR label list (1percent.txt / 10percent.txt) naming the labelled train images.
    #[arg(long)]
    pub labels_list: Option<PathBuf>,
    /// Percentage of labelled images per class (seeded draw), when no list is given.
    #[arg(long)]
    pub labels_perc: Option<f64>,
    /// Labelled images per class (seeded draw), instead of a percentage.
    #[arg(long, conflicts_with = "labels_perc")]
    pub labels_per_class: Option<usize>,
    /// Run folder (config.json, metrics.jsonl, checkpoint.safetensors, final.safetensors).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Continue the run in --output from its checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Overwrite an existing run in --output.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Initial weights: an official SwAV/DINO .pth, `sdengine import` output, or a run's final.safetensors.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Where the backbone trains: auto (a GPU when present), cuda, cpu, or emu (the device code on the CPU emulation: slow, checks the GPU path without a GPU). Suave only; Daino runs on the CPU.
    #[arg(long)]
    pub device: Option<String>,
    /// Seed of every random draw.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Loader threads.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Epochs (passes over the unlabelled set).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many iterations (the schedule stays that of --epochs); resume later.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Unlabelled images per iteration (per GPU in the official scripts).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Labelled images per iteration (before the mixup copies).
    #[arg(long)]
    pub lab_batch_size: Option<usize>,
    /// Suave base_lr / Daino lr (before the linear scaling by batch/256).
    #[arg(long, alias = "lr")]
    pub base_lr: Option<f64>,
    /// Suave final_lr / Daino min_lr.
    #[arg(long, alias = "min-lr")]
    pub final_lr: Option<f64>,
    /// Linear warm-up epochs.
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// Warm-up start (Suave start_warmup).
    #[arg(long)]
    pub start_warmup: Option<f64>,
    /// Weight decay (Suave wd; Daino weight_decay).
    #[arg(long, alias = "wd")]
    pub weight_decay: Option<f64>,
    /// Daino weight_decay_end.
    #[arg(long)]
    pub weight_decay_end: Option<f64>,
    /// Student temperature.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Label smoothing of the labelled cross-entropy.
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Mixup/CutMix "extend" on the labelled batch (true/false).
    #[arg(long)]
    pub mixup_lab: Option<bool>,
    /// Suave: Sinkhorn ε.
    #[arg(long)]
    pub epsilon: Option<f64>,
    /// Suave: Sinkhorn iterations.
    #[arg(long)]
    pub sinkhorn_iterations: Option<usize>,
    /// Suave: embedding width.
    #[arg(long)]
    pub feat_dim: Option<usize>,
    /// Suave: projection hidden width.
    #[arg(long)]
    pub hidden_mlp: Option<usize>,
    /// Suave: views that get codes.
    #[arg(long, num_args = 1..)]
    pub crops_for_assign: Option<Vec<usize>>,
    /// Suave: queue length over all ranks (0 = none).
    #[arg(long)]
    pub queue_length: Option<usize>,
    /// Suave: first epoch with the queue.
    #[arg(long)]
    pub epoch_queue_starts: Option<usize>,
    /// Suave: iterations with frozen prototypes.
    #[arg(long)]
    pub freeze_prototypes_niters: Option<usize>,
    /// Suave: crops per resolution, e.g. 2 8.
    #[arg(long, num_args = 1..)]
    pub nmb_crops: Option<Vec<usize>>,
    /// Suave: crop sides, e.g. 224 96.
    #[arg(long, num_args = 1..)]
    pub size_crops: Option<Vec<usize>>,
    /// Suave: minimum crop scales, e.g. 0.14 0.05.
    #[arg(long, num_args = 1..)]
    pub min_scale_crops: Option<Vec<f64>>,
    /// Suave: maximum crop scales, e.g. 1 0.14.
    #[arg(long, num_args = 1..)]
    pub max_scale_crops: Option<Vec<f64>>,
    /// Suave: colour distortions on the unlabelled crops (true/false).
    #[arg(long)]
    pub color_jit_unlab: Option<bool>,
    /// Suave: light labelled augmentation (fine-tuning) (true/false).
    #[arg(long)]
    pub light_augment_lab: Option<bool>,
    /// Suave: mix the two global views into an extra view (true/false).
    #[arg(long)]
    pub mixup_unlab: Option<bool>,
    /// Suave: weight of the mixed view: views (as coded, 1/T) or samples (as intended, bs/T).
    #[arg(long)]
    pub mixed_unlab_weight: Option<String>,
    /// Suave: online linear heads (true/false).
    #[arg(long)]
    pub multihead_eval: Option<bool>,
    /// Keep the projection head of --init (true/false).
    #[arg(long)]
    pub init_proj: Option<bool>,
    /// Daino: teacher temperature at epoch 0.
    #[arg(long)]
    pub warmup_teacher_temp: Option<f64>,
    /// Daino: teacher temperature after the warm-up.
    #[arg(long)]
    pub teacher_temp: Option<f64>,
    /// Daino: teacher temperature warm-up epochs.
    #[arg(long)]
    pub warmup_teacher_temp_epochs: Option<usize>,
    /// Daino: EMA momentum at the start (cosine to 1).
    #[arg(long)]
    pub momentum_teacher: Option<f64>,
    /// Daino: student drop-path rate.
    #[arg(long)]
    pub drop_path_rate: Option<f64>,
    /// Daino: global crop scale range, e.g. 0.25 1.0.
    #[arg(long, num_args = 2)]
    pub global_crops_scale: Option<Vec<f64>>,
    /// Daino: local crop scale range, e.g. 0.05 0.25.
    #[arg(long, num_args = 2)]
    pub local_crops_scale: Option<Vec<f64>>,
    /// Daino: number of local crops.
    #[arg(long)]
    pub local_crops_number: Option<usize>,
    /// Daino: global crop side.
    #[arg(long)]
    pub global_crop_size: Option<usize>,
    /// Daino: local crop side.
    #[arg(long)]
    pub local_crop_size: Option<usize>,
    /// Daino: fix the last layer's g to 1 (true/false).
    #[arg(long)]
    pub norm_last_layer: Option<bool>,
    /// Daino: epochs with the last layer frozen.
    #[arg(long)]
    pub freeze_last_layer: Option<usize>,
    /// Side of the labelled crop.
    #[arg(long)]
    pub lab_crop_size: Option<usize>,
    /// Scale range of the labelled RandomResizedCrop, e.g. 0.08 1.0.
    #[arg(long, num_args = 2)]
    pub lab_crop_scale: Option<Vec<f64>>,
    /// Evaluation resize (shorter side).
    #[arg(long)]
    pub eval_resize: Option<usize>,
    /// Evaluation centre crop.
    #[arg(long)]
    pub eval_crop: Option<usize>,
    /// Evaluation batch size.
    #[arg(long)]
    pub eval_batch_size: Option<usize>,
    /// Evaluate every N epochs (and after the last).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Keep a copy of the checkpoint every N epochs (0: only the latest).
    #[arg(long)]
    pub checkpoint_freq: Option<usize>,
    /// Metrics line every N iterations.
    #[arg(long)]
    pub log_every: Option<usize>,
    /// With the embedded data: skip the supervised baseline run.
    #[arg(long)]
    pub no_baseline: bool,
    /// With several ranks: all-reduce the gradients after the backward instead of bucket by
    /// bucket during it (same numbers; for comparison and debugging).
    #[arg(long)]
    pub no_overlap: bool,
}

fn pair(flag: &'static str, v: &[f64]) -> Result<(f64, f64)> {
    match v {
        [a, b] if a <= b => Ok((*a, *b)),
        _ => Err(Error::invalid(
            flag,
            format!("{v:?}: give two values, low then high"),
        )),
    }
}

impl TrainArgs {
    /// The resolved configuration: method defaults (or the embedded demo's settings when no
    /// --data is given), then the preset, then every flag given. `finetune` selects the Suave
    /// fine-tuning recipe.
    pub fn resolve(&self, finetune: bool) -> Result<(TrainConfig, RunOptions)> {
        let method = match (&self.method, &self.preset) {
            (Some(m), _) => Method::parse(m)?,
            (None, Some(p)) if p.starts_with("daino") => Method::Daino,
            _ => Method::Suave,
        };
        let arch = self.arch.as_deref().map(Arch::parse).transpose()?;
        let cifar = match self.recipe.as_deref() {
            Some("cifar") => true,
            Some("imagenet") => false,
            Some(r) => {
                return Err(Error::invalid(
                    "--recipe",
                    format!("unknown recipe {r:?}: use imagenet or cifar"),
                ))
            }
            None => self.data.is_none() && self.preset.is_none(),
        };
        if cifar && self.preset.is_some() {
            return Err(Error::invalid(
                "--recipe",
                "--recipe cifar and --preset (an official ImageNet script) exclude each other",
            ));
        }
        let mut c = if cifar {
            let vit = match method {
                Method::Daino => true,
                Method::Suave => false,
                Method::Supervised => arch.is_some_and(|a| !a.is_resnet()),
            };
            TrainConfig::embedded_demo(method, vit)
        } else {
            let mut c = TrainConfig::defaults(method);
            if method == Method::Supervised && arch.is_some_and(|a| !a.is_resnet()) {
                c = TrainConfig {
                    method,
                    ..TrainConfig::defaults(Method::Daino)
                };
            }
            c
        };
        if let Some(p) = &self.preset {
            if method == Method::Supervised {
                return Err(Error::invalid(
                    "--preset",
                    format!("presets reproduce the official Suave/Daino scripts; --method supervised has none (presets: {})", PRESETS.join(", ")),
                ));
            }
            if finetune != p.contains("finetune") {
                return Err(Error::invalid(
                    "--preset",
                    format!(
                        "preset {p} belongs to `sdengine {}`",
                        if p.contains("finetune") {
                            "finetune"
                        } else {
                            "train"
                        }
                    ),
                ));
            }
            c.apply_preset(p)?;
        } else if finetune {
            if method != Method::Suave {
                return Err(Error::invalid(
                    "finetune",
                    "fine-tuning is Suave's recipe (--method suave)",
                ));
            }
            let data = c.data_path.clone();
            c.apply_preset("suave-finetune-10perc")?;
            c.preset = None;
            c.data_path = data;
        }
        if finetune && self.init.is_none() {
            return Err(Error::invalid(
                "--init",
                "fine-tuning starts from a Suave checkpoint: pass --init RUN/final.safetensors",
            ));
        }
        if let Some(a) = arch {
            c.arch = a;
        }
        c.data_path = self.data.clone().or(c.data_path);
        if self.labels_list.is_some()
            || self.labels_perc.is_some()
            || self.labels_per_class.is_some()
        {
            c.labels_list = self.labels_list.clone();
            c.labels_perc = self.labels_perc;
            c.labels_per_class = self.labels_per_class;
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            seed,
            workers,
            epochs,
            batch_size,
            lab_batch_size,
            base_lr,
            final_lr,
            warmup_epochs,
            start_warmup,
            weight_decay,
            weight_decay_end,
            temperature,
            label_smoothing,
            mixup_lab,
            epsilon,
            sinkhorn_iterations,
            feat_dim,
            hidden_mlp,
            crops_for_assign,
            queue_length,
            epoch_queue_starts,
            freeze_prototypes_niters,
            nmb_crops,
            size_crops,
            min_scale_crops,
            max_scale_crops,
            color_jit_unlab,
            light_augment_lab,
            mixup_unlab,
            mixed_unlab_weight,
            multihead_eval,
            init_proj,
            warmup_teacher_temp,
            teacher_temp,
            warmup_teacher_temp_epochs,
            momentum_teacher,
            drop_path_rate,
            local_crops_number,
            global_crop_size,
            local_crop_size,
            norm_last_layer,
            freeze_last_layer,
            lab_crop_size,
            eval_resize,
            eval_crop,
            eval_batch_size,
            eval_every,
            checkpoint_freq,
            log_every,
            device,
            output
        );
        if let Some(v) = &self.global_crops_scale {
            c.global_crops_scale = pair("--global-crops-scale", v)?;
        }
        if let Some(v) = &self.lab_crop_scale {
            c.lab_crop_scale = pair("--lab-crop-scale", v)?;
        }
        if let Some(v) = &self.local_crops_scale {
            c.local_crops_scale = pair("--local-crops-scale", v)?;
        }
        c.max_steps = self.max_steps;
        c.init = self.init.clone();
        if self.no_overlap {
            c.overlap_grad_reduce = false;
        }
        if self.output.is_none() && self.preset.is_some() {
            c.output = PathBuf::from("runs").join(self.preset.clone().unwrap_or_default());
        }
        c.validate()?;
        Ok((
            c,
            RunOptions {
                resume: self.resume,
                force: self.force,
                quiet: false,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: TrainArgs,
    }

    fn parse(args: &[&str]) -> TrainArgs {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::parse_from(v).a
    }

    #[test]
    fn embedded_default_and_flags() {
        let (c, _) = parse(&[]).resolve(false).unwrap();
        assert_eq!((c.method, c.arch), (Method::Suave, Arch::ResnetTiny));
        assert_eq!(c.data_path, None);
        assert!(c.overlap_grad_reduce);
        let (c, _) = parse(&["--no-overlap"]).resolve(false).unwrap();
        assert!(!c.overlap_grad_reduce);
        let (c, _) = parse(&[
            "--method",
            "daino",
            "--epochs",
            "3",
            "--local-crops-scale",
            "0.1",
            "0.2",
        ])
        .resolve(false)
        .unwrap();
        assert_eq!(
            (c.arch, c.epochs, c.local_crops_scale),
            (Arch::VitTiny, 3, (0.1, 0.2))
        );
    }

    #[test]
    fn presets_and_conflicts() {
        let (c, _) = parse(&[
            "--preset",
            "suave-train-1perc",
            "--data",
            "/x",
            "--epochs",
            "7",
        ])
        .resolve(false)
        .unwrap();
        assert_eq!(
            (c.arch, c.epochs, c.labels_perc),
            (Arch::Resnet50, 7, Some(1.0))
        );
        assert!(c.output.ends_with("suave-train-1perc"));
        let e = parse(&["--preset", "suave-finetune-1perc", "--data", "/x"])
            .resolve(false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sdengine finetune"), "{e}");
        let e = parse(&["--method", "daino", "--preset", "suave-train-1perc"])
            .resolve(false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("suave recipe"), "{e}");
        let e = parse(&["--preset", "suave-finetune-10perc", "--data", "/x"])
            .resolve(true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--init"), "{e}");
        let e = parse(&["--method", "daino", "--global-crop-size", "2"])
            .resolve(false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("smaller than one 4-px patch"), "{e}");
        assert!(parse(&["--method", "swav"]).resolve(false).is_err());
        let (c, _) = parse(&["--recipe", "cifar", "--data", "/c"])
            .resolve(false)
            .unwrap();
        assert_eq!(c.arch, Arch::ResnetTiny);
        assert!(
            parse(&["--recipe", "cifar", "--preset", "suave-train-1perc"])
                .resolve(false)
                .is_err()
        );
        assert!(parse(&["--global-crops-scale", "0.9", "0.1"])
            .resolve(false)
            .is_err());
    }
}

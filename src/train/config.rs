//! The resolved settings of a run: every option of the official scripts under its official name
//! (snake_case, as `config.json` records it), the presets that reproduce each official script,
//! and the checks that reject impossible combinations before any work starts.
//!
//! Resolution order: the method's defaults (the official argparse defaults), then the preset (the
//! official script's flags), then the user's flags. `config.json` holds the result, so a run folder
//! says exactly what ran.

use crate::error::{Error, Result};
use crate::models::resnet::ResNetConfig;
use crate::models::vit::VitConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The training method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// SwAV + labels (ResNet family, LARS).
    Suave,
    /// DINO + labels (ViT family, AdamW, EMA teacher).
    Daino,
    /// The labelled term alone, same network, optimiser, schedule and labelled batches: the
    /// baseline that shows what the unlabelled images add.
    Supervised,
}

impl Method {
    /// Parses `suave`, `daino` or `supervised`.
    pub fn parse(s: &str) -> Result<Method> {
        match s {
            "suave" => Ok(Method::Suave),
            "daino" => Ok(Method::Daino),
            "supervised" => Ok(Method::Supervised),
            _ => Err(Error::invalid(
                "--method",
                format!("unknown method {s:?}: use suave, daino or supervised"),
            )),
        }
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Suave => "suave",
            Method::Daino => "daino",
            Method::Supervised => "supervised",
        }
    }
}

/// The network. The exact graphs are `resnet50` and `vit_small`; the `-tiny` members of the same
/// families keep every op and name and only shrink the sizes, for CPU demonstrations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// torchvision ResNet-50 (Suave).
    #[serde(rename = "resnet50")]
    Resnet50,
    /// ResNet with one bottleneck per stage, width 16 (512 features).
    #[serde(rename = "resnet-tiny")]
    ResnetTiny,
    /// ViT-S/16 (Daino).
    #[serde(rename = "vit_small")]
    VitSmall,
    /// ViT with patch 4, dim 96, depth 4, 3 heads, for 32-px images.
    #[serde(rename = "vit-tiny")]
    VitTiny,
}

impl Arch {
    /// Parses an architecture name.
    pub fn parse(s: &str) -> Result<Arch> {
        match s {
            "resnet50" => Ok(Arch::Resnet50),
            "resnet-tiny" => Ok(Arch::ResnetTiny),
            "vit_small" | "vit-small" => Ok(Arch::VitSmall),
            "vit-tiny" => Ok(Arch::VitTiny),
            _ => Err(Error::invalid(
                "--arch",
                format!(
                    "unknown architecture {s:?}: use resnet50, resnet-tiny, vit_small or vit-tiny"
                ),
            )),
        }
    }

    /// The name `config.json` uses.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet50 => "resnet50",
            Arch::ResnetTiny => "resnet-tiny",
            Arch::VitSmall => "vit_small",
            Arch::VitTiny => "vit-tiny",
        }
    }

    /// True for the ResNet family.
    pub fn is_resnet(self) -> bool {
        matches!(self, Arch::Resnet50 | Arch::ResnetTiny)
    }

    /// The ResNet configuration (None for a ViT).
    pub fn resnet(self) -> Option<ResNetConfig> {
        match self {
            Arch::Resnet50 => Some(ResNetConfig::resnet50()),
            Arch::ResnetTiny => Some(ResNetConfig::tiny()),
            _ => None,
        }
    }

    /// The ViT configuration with drop path `dpr` (None for a ResNet).
    pub fn vit(self, dpr: f64) -> Option<VitConfig> {
        match self {
            Arch::VitSmall => Some(VitConfig::vit_small().with_drop_path(dpr)),
            Arch::VitTiny => Some(VitConfig {
                patch: 4,
                dim: 96,
                depth: 4,
                heads: 3,
                mlp_ratio: 4.0,
                drop_path_rate: dpr,
                img_size: 32,
                in_chans: 3,
                eps: 1e-6,
            }),
            _ => None,
        }
    }
}

/// Every setting of a run. Field names are the official flags' names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    // --- what
    /// Training method.
    pub method: Method,
    /// `train` or `finetune` (Suave's semi-supervised fine-tuning recipe).
    pub mode: String,
    /// The official script reproduced, if any.
    pub preset: Option<String>,
    /// Network.
    pub arch: Arch,
    // --- data
    /// ImageNet-layout root (`train/`, `val/` or `test/`); None = the embedded CIFAR-10 cut.
    pub data_path: Option<PathBuf>,
    /// The folder actually read (the embedded set's extraction folder when `data_path` is None).
    pub resolved_data_path: Option<PathBuf>,
    /// SimCLR label list (`1percent.txt`), instead of a random subset.
    pub labels_list: Option<PathBuf>,
    /// Percentage of labelled images per class (used when no list is given).
    pub labels_perc: Option<f64>,
    /// Labelled images per class (alternative to the percentage).
    pub labels_per_class: Option<usize>,
    /// Number of classes = prototypes (Suave) = head outputs (Daino); set from the data.
    pub num_classes: usize,
    /// Loader threads.
    pub workers: usize,
    // --- schedule
    /// Epochs (passes over the unlabelled set).
    pub epochs: usize,
    /// Stop after this many iterations in all (the rest of the schedule unchanged): for tests
    /// and quick looks. None = run every epoch.
    pub max_steps: Option<usize>,
    /// Unlabelled images per step per rank.
    pub batch_size: usize,
    /// Labelled images per step per rank (before the mixup copies).
    pub lab_batch_size: usize,
    /// Suave's base learning rate / Daino's `lr` before linear scaling.
    pub base_lr: f64,
    /// Final learning rate (Suave `final_lr`, Daino `min_lr`).
    pub final_lr: f64,
    /// Linear warm-up epochs.
    pub warmup_epochs: usize,
    /// Warm-up start value (Suave).
    pub start_warmup: f64,
    /// Weight decay (Suave LARS wd; Daino start of the cosine).
    pub weight_decay: f64,
    /// Daino: weight decay at the end of the cosine.
    pub weight_decay_end: f64,
    /// Seed of everything random.
    pub seed: u64,
    // --- shared loss settings
    /// Student temperature τ (0.1).
    pub temperature: f64,
    /// Label smoothing of the labelled cross-entropy.
    pub label_smoothing: f64,
    /// Mixup/CutMix "extend" on the labelled batch.
    pub mixup_lab: bool,
    // --- Suave
    /// Sinkhorn ε.
    pub epsilon: f64,
    /// Sinkhorn iterations.
    pub sinkhorn_iterations: usize,
    /// Embedding width (Suave `feat_dim` 128; Daino's head bottleneck, 256).
    pub feat_dim: usize,
    /// Projection hidden width (Suave `hidden_mlp`; Daino's head hidden width; both 2048).
    pub hidden_mlp: usize,
    /// Views that get codes.
    pub crops_for_assign: Vec<usize>,
    /// Queue length over all ranks (0 = none).
    pub queue_length: usize,
    /// First epoch with the queue.
    pub epoch_queue_starts: usize,
    /// Iterations with frozen prototypes.
    pub freeze_prototypes_niters: usize,
    /// Crops per resolution (`nmb_crops`).
    pub nmb_crops: Vec<usize>,
    /// Crop sides (`size_crops`).
    pub size_crops: Vec<usize>,
    /// RandomResizedCrop minimum scale per resolution.
    pub min_scale_crops: Vec<f64>,
    /// RandomResizedCrop maximum scale per resolution.
    pub max_scale_crops: Vec<f64>,
    /// Colour distortions on the unlabelled crops.
    pub color_jit_unlab: bool,
    /// The fine-tuning labelled pipeline.
    pub light_augment_lab: bool,
    /// Mixup/CutMix of the two global views as an extra view.
    pub mixup_unlab: bool,
    /// The mixed view's weight: as coded (`views`, 1/T) or as intended (`samples`, bs/T).
    pub mixed_unlab_weight: String,
    /// Online linear heads.
    pub multihead_eval: bool,
    /// Keep the projection head of `--init` (fine-tuning).
    pub init_proj: bool,
    // --- Daino
    /// Teacher temperature at epoch 0.
    pub warmup_teacher_temp: f64,
    /// Teacher temperature after the warm-up.
    pub teacher_temp: f64,
    /// Teacher temperature warm-up epochs.
    pub warmup_teacher_temp_epochs: usize,
    /// EMA momentum at iteration 0 (cosine to 1).
    pub momentum_teacher: f64,
    /// Student drop-path rate.
    pub drop_path_rate: f64,
    /// Global crops' scale range.
    pub global_crops_scale: (f64, f64),
    /// Local crops' scale range.
    pub local_crops_scale: (f64, f64),
    /// Local crops.
    pub local_crops_number: usize,
    /// Global crop side (224).
    pub global_crop_size: usize,
    /// Local crop side (96).
    pub local_crop_size: usize,
    /// Weight-normalised last layer with g fixed to 1.
    pub norm_last_layer: bool,
    /// Epochs with the last layer frozen.
    pub freeze_last_layer: usize,
    // --- labelled crops, evaluation, output
    /// Side of the labelled crop (224).
    pub lab_crop_size: usize,
    /// RandomResizedCrop scale range of the labelled crop (torchvision's default (0.08, 1)).
    pub lab_crop_scale: (f64, f64),
    /// Evaluation: shorter side after Resize.
    pub eval_resize: usize,
    /// Evaluation: centre crop side.
    pub eval_crop: usize,
    /// Evaluation batch size.
    pub eval_batch_size: usize,
    /// Evaluate every N epochs (and always after the last).
    pub eval_every: usize,
    /// Initial weights (official SwAV/DINO checkpoint or an sdengine checkpoint).
    pub init: Option<PathBuf>,
    /// Run folder.
    pub output: PathBuf,
    /// Keep a copy of the checkpoint every N epochs (0 = only the latest).
    pub checkpoint_freq: usize,
    /// Console/metrics line every N iterations.
    pub log_every: usize,
    /// `cpu`, `cuda` or `auto`.
    pub device: String,
    /// With several ranks, all-reduce the gradients bucket by bucket while the backward runs
    /// (DDP's overlap) instead of after it; the numbers are the same either way (`--no-overlap`
    /// turns it off). Absent from older `config.json` files: on.
    #[serde(default = "yes")]
    pub overlap_grad_reduce: bool,
}

/// serde's default for switches that are on unless a file says otherwise.
fn yes() -> bool {
    true
}

/// The presets: one per official script.
pub const PRESETS: [&str; 6] = [
    "suave-train-10perc",
    "suave-train-1perc",
    "suave-finetune-10perc",
    "suave-finetune-1perc",
    "daino-train-10perc",
    "daino-train-1perc",
];

impl TrainConfig {
    /// The official argparse defaults of `method` (the scripts' values where every script agrees).
    pub fn defaults(method: Method) -> TrainConfig {
        let daino = method == Method::Daino;
        TrainConfig {
            method,
            mode: "train".into(),
            preset: None,
            arch: if daino {
                Arch::VitSmall
            } else {
                Arch::Resnet50
            },
            data_path: None,
            resolved_data_path: None,
            labels_list: None,
            labels_perc: Some(10.0),
            labels_per_class: None,
            num_classes: 1000,
            workers: 2,
            epochs: if daino { 60 } else { 100 },
            max_steps: None,
            batch_size: if daino { 64 } else { 32 },
            lab_batch_size: if daino { 32 } else { 16 },
            base_lr: if daino { 0.00024 } else { 0.4 },
            final_lr: if daino { 1e-5 } else { 0.001 },
            warmup_epochs: if daino { 4 } else { 5 },
            start_warmup: 0.0,
            weight_decay: if daino { 0.04 } else { 1e-6 },
            weight_decay_end: 0.4,
            seed: if daino { 0 } else { 31 },
            temperature: 0.1,
            label_smoothing: 0.01,
            mixup_lab: true,
            epsilon: 0.05,
            sinkhorn_iterations: 3,
            feat_dim: if daino { 256 } else { 128 },
            hidden_mlp: 2048,
            crops_for_assign: vec![0, 1],
            queue_length: 3840,
            epoch_queue_starts: 0,
            freeze_prototypes_niters: 0,
            nmb_crops: vec![2, 8],
            size_crops: vec![224, 96],
            min_scale_crops: vec![0.14, 0.05],
            max_scale_crops: vec![1.0, 0.14],
            color_jit_unlab: true,
            light_augment_lab: false,
            mixup_unlab: true,
            mixed_unlab_weight: "views".into(),
            multihead_eval: true,
            init_proj: false,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.07,
            warmup_teacher_temp_epochs: 10,
            momentum_teacher: 0.990,
            drop_path_rate: 0.1,
            global_crops_scale: (0.25, 1.0),
            local_crops_scale: (0.05, 0.25),
            local_crops_number: 8,
            global_crop_size: 224,
            local_crop_size: 96,
            norm_last_layer: false,
            freeze_last_layer: 0,
            lab_crop_size: 224,
            lab_crop_scale: (0.08, 1.0),
            eval_resize: 256,
            eval_crop: 224,
            eval_batch_size: if daino { 64 } else { 32 },
            eval_every: 1,
            init: None,
            output: PathBuf::from("runs").join(method.name()),
            checkpoint_freq: if daino { 20 } else { 25 },
            log_every: if daino { 10 } else { 50 },
            device: "auto".into(),
            overlap_grad_reduce: true,
        }
    }

    /// The CPU demonstration on the embedded CIFAR-10 cut (32-px images): the tiny member of
    /// the method's family, crops 32/16 px, 4 labels a class (the FixMatch "40 labels" protocol,
    /// where unlabelled images matter most), a budget of a few minutes on 2 cores. Every other
    /// setting stays the official one, except where a 32-px image or a 10-minute budget needs
    /// otherwise (each such line says why).
    pub fn embedded_demo(method: Method, daino_family: bool) -> TrainConfig {
        let mut c = TrainConfig::defaults(if method == Method::Supervised && daino_family {
            Method::Daino
        } else if method == Method::Supervised {
            Method::Suave
        } else {
            method
        });
        c.method = method;
        let vit = c.arch == Arch::VitSmall;
        c.arch = if vit { Arch::VitTiny } else { Arch::ResnetTiny };
        c.labels_perc = None;
        c.labels_per_class = Some(4);
        c.num_classes = 10;
        c.batch_size = 32;
        c.lab_batch_size = 16;
        c.warmup_epochs = 1;
        if vit {
            // ~1,250 iterations: AdamW at 1.25e-3 (lr 0.01 x 32/256), a teacher that follows
            // within tens of iterations (0.96), the temperature warm-up over 2 epochs, and 2 local
            // crops (the ViT step is the costly one on a CPU).
            c.epochs = 10;
            c.base_lr = 0.01;
            c.final_lr = 1e-5;
            c.drop_path_rate = 0.0;
            c.warmup_teacher_temp_epochs = 2;
            c.momentum_teacher = 0.96;
            c.local_crops_number = 2;
        } else {
            c.epochs = 20;
            c.base_lr = 0.6;
            c.final_lr = 0.0006;
        }
        // Sinkhorn on the batch alone: the official 3840-row queue would hold nearly the whole
        // 4,000-image set, embeddings up to an epoch stale.
        c.queue_length = 0;
        c.size_crops = vec![32, 16];
        c.nmb_crops = vec![2, 4];
        c.min_scale_crops = vec![0.3, 0.1];
        c.max_scale_crops = vec![1.0, 0.3];
        c.global_crop_size = 32;
        c.local_crop_size = 16;
        c.global_crops_scale = (0.3, 1.0);
        c.local_crops_scale = (0.1, 0.3);
        c.lab_crop_size = 32;
        // A 0.08-area crop of a 32-px image is a 9-px patch: too little to name a class.
        c.lab_crop_scale = (0.35, 1.0);
        c.eval_resize = 32;
        c.eval_crop = 32;
        c.eval_batch_size = 100;
        c.hidden_mlp = 256;
        c.feat_dim = 64;
        c.log_every = 20;
        c.checkpoint_freq = 0;
        c
    }

    /// Applies an official script's flags (spec §5) on top of the current settings.
    pub fn apply_preset(&mut self, preset: &str) -> Result<()> {
        let want = if preset.starts_with("suave-") {
            Method::Suave
        } else {
            Method::Daino
        };
        if !PRESETS.contains(&preset) {
            return Err(Error::invalid(
                "--preset",
                format!("unknown preset {preset:?}; presets: {}", PRESETS.join(", ")),
            ));
        }
        if self.method != want {
            return Err(Error::invalid(
                "--preset",
                format!(
                    "preset {preset} is a {} recipe but --method is {}",
                    want.name(),
                    self.method.name()
                ),
            ));
        }
        let perc = if preset.ends_with("-1perc") {
            1.0
        } else {
            10.0
        };
        *self = TrainConfig {
            output: self.output.clone(),
            data_path: self.data_path.clone(),
            ..TrainConfig::defaults(want)
        };
        self.preset = Some(preset.to_string());
        self.labels_perc = Some(perc);
        if preset.starts_with("suave-finetune") {
            // finetune_{10,1}perc.sh (spec §1.13).
            self.mode = "finetune".into();
            self.epochs = if perc == 10.0 { 5 } else { 3 };
            self.base_lr = if perc == 10.0 { 0.03 } else { 0.02 };
            self.final_lr = if perc == 10.0 { 0.0003 } else { 0.0002 };
            self.warmup_epochs = 0;
            self.nmb_crops = vec![2];
            self.size_crops = vec![224];
            self.min_scale_crops = vec![0.08];
            self.max_scale_crops = vec![1.0];
            self.init_proj = true;
            self.light_augment_lab = true;
            self.color_jit_unlab = false;
            self.label_smoothing = if perc == 10.0 { 0.001 } else { 0.01 };
        }
        Ok(())
    }

    /// Rejects impossible combinations before any work starts.
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &'static str, msg: String| Err(Error::invalid(flag, msg));
        if self.epochs == 0 {
            return bad("--epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 || self.lab_batch_size == 0 {
            return bad("--batch-size", "batch sizes must be at least 1".into());
        }
        if self.warmup_epochs > self.epochs {
            return bad(
                "--warmup-epochs",
                format!(
                    "{} warm-up epochs exceed {} epochs",
                    self.warmup_epochs, self.epochs
                ),
            );
        }
        if self.mode != "train" && self.mode != "finetune" {
            return bad("mode", format!("unknown mode {:?}", self.mode));
        }
        match (self.method, self.arch.is_resnet()) {
            (Method::Suave, false) => {
                return bad(
                    "--arch",
                    format!("Suave trains a ResNet; {} is a ViT", self.arch.name()),
                )
            }
            (Method::Daino, true) => {
                return bad(
                    "--arch",
                    format!("Daino trains a ViT; {} is a ResNet", self.arch.name()),
                )
            }
            _ => {}
        }
        if self.mode == "finetune" && self.method != Method::Suave {
            return bad(
                "finetune",
                "fine-tuning is Suave's recipe (--method suave)".into(),
            );
        }
        if self.method == Method::Suave {
            let n = self.nmb_crops.len();
            if n == 0
                || self.size_crops.len() != n
                || self.min_scale_crops.len() != n
                || self.max_scale_crops.len() != n
            {
                return bad(
                    "--nmb-crops",
                    "--nmb-crops, --size-crops, --min-scale-crops and --max-scale-crops need one value per resolution".into(),
                );
            }
            let views: usize = self.nmb_crops.iter().sum();
            if views < 2 {
                return bad(
                    "--nmb-crops",
                    "swapped prediction needs at least two views".into(),
                );
            }
            if let Some(&a) = self.crops_for_assign.iter().find(|&&a| a >= views) {
                return bad(
                    "--crops-for-assign",
                    format!("crop {a} does not exist ({views} views)"),
                );
            }
            if self.mixup_unlab && self.nmb_crops[0] < 2 {
                return bad(
                    "--mixup-unlab",
                    "mixing the global views needs two crops of the first resolution".into(),
                );
            }
            if self.mixed_unlab_weight != "views" && self.mixed_unlab_weight != "samples" {
                return bad(
                    "--mixed-unlab-weight",
                    format!(
                        "{:?}: use views (as coded) or samples (as intended)",
                        self.mixed_unlab_weight
                    ),
                );
            }
        }
        if let Some(vit) = self.arch.vit(self.drop_path_rate) {
            for (flag, side) in [
                ("--global-crop-size", self.global_crop_size),
                ("--local-crop-size", self.local_crop_size),
                ("--lab-crop-size", self.lab_crop_size),
                ("--eval-crop", self.eval_crop),
            ] {
                if side < vit.patch {
                    return bad(
                        flag,
                        format!(
                            "crop of {side} px is smaller than one {}-px patch",
                            vit.patch
                        ),
                    );
                }
            }
        }
        if self.eval_crop > self.eval_resize {
            return bad(
                "--eval-crop",
                format!(
                    "centre crop {} exceeds the resize {}",
                    self.eval_crop, self.eval_resize
                ),
            );
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(
                "--label-smoothing",
                format!("{} is not in [0, 1)", self.label_smoothing),
            );
        }
        if self.temperature <= 0.0 || self.epsilon <= 0.0 {
            return bad(
                "--temperature",
                "temperatures and ε must be positive".into(),
            );
        }
        if let Some(p) = self.labels_perc {
            if !(p > 0.0 && p <= 100.0) {
                return bad("--labels-perc", format!("{p} is not in (0, 100]"));
            }
        }
        if self.workers == 0 || self.log_every == 0 || self.eval_every == 0 {
            return bad(
                "--workers",
                "workers, log-every and eval-every must be at least 1".into(),
            );
        }
        if !["cpu", "cuda", "emu", "auto"].contains(&self.device.as_str()) {
            return bad(
                "--device",
                format!("{:?}: use cpu, cuda, emu or auto", self.device),
            );
        }
        Ok(())
    }

    /// Unlabelled views per image (Suave: Σ nmb_crops; Daino: 2 + locals).
    pub fn views(&self) -> usize {
        match self.method {
            Method::Daino => 2 + self.local_crops_number,
            _ => self.nmb_crops.iter().sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_reproduce_the_scripts() {
        let mut c = TrainConfig::defaults(Method::Suave);
        c.apply_preset("suave-finetune-1perc").unwrap();
        assert_eq!(c.mode, "finetune");
        assert_eq!((c.epochs, c.base_lr, c.final_lr), (3, 0.02, 0.0002));
        assert_eq!(c.labels_perc, Some(1.0));
        assert!(c.init_proj && c.light_augment_lab && !c.color_jit_unlab);
        c.validate().unwrap();
        let mut d = TrainConfig::defaults(Method::Daino);
        d.apply_preset("daino-train-10perc").unwrap();
        assert_eq!((d.epochs, d.batch_size, d.lab_batch_size), (60, 64, 32));
        d.validate().unwrap();
    }

    #[test]
    fn conflicts_are_rejected() {
        let mut c = TrainConfig::defaults(Method::Suave);
        let e = c.apply_preset("daino-train-1perc").unwrap_err().to_string();
        assert!(e.contains("daino recipe"), "{e}");
        assert!(c.apply_preset("suave-train-5perc").is_err());
        let mut c = TrainConfig::defaults(Method::Daino);
        c.global_crop_size = 8;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("smaller than one 16-px patch"), "{e}");
        let mut c = TrainConfig::defaults(Method::Suave);
        c.arch = Arch::VitSmall;
        assert!(c.validate().is_err());
        let mut c = TrainConfig::defaults(Method::Suave);
        c.size_crops = vec![224];
        assert!(c.validate().is_err());
        let mut c = TrainConfig::defaults(Method::Suave);
        c.crops_for_assign = vec![0, 10];
        assert!(c.validate().is_err());
    }

    #[test]
    fn config_round_trips_through_json() {
        let c = TrainConfig::embedded_demo(Method::Daino, true);
        let s = serde_json::to_string(&c).unwrap();
        let back: TrainConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
        assert!(s.contains("\"arch\":\"vit-tiny\""), "{s}");
        // A config.json from before `overlap_grad_reduce` existed reads as overlap on.
        let mut v = serde_json::to_value(&c).unwrap();
        v.as_object_mut().unwrap().remove("overlap_grad_reduce");
        let mut c2 = c.clone();
        c2.overlap_grad_reduce = false;
        let old: TrainConfig = serde_json::from_value(v).unwrap();
        assert!(old.overlap_grad_reduce);
        assert_eq!(old, c);
        assert_ne!(old, c2);
    }
}

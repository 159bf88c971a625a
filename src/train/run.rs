//! The training loop: data, model, epochs, evaluation, metrics, checkpoints, resume, Ctrl-C.
//!
//! An epoch is one pass over the unlabelled set (spec §1.10: `N = floor(ceil(n / world) / bs)`
//! iterations); each iteration also takes the next batch of the endlessly cycling labelled
//! loader. The supervised baseline runs the same iterations on the labelled batches alone.
//!
//! Data parallel (DDP semantics): [`train`] joins the ranks of the environment (torchrun or
//! Slurm variables; one rank without them), [`train_with`] takes any communicator (the tests
//! run ranks as threads of a [`LocalGroup`](crate::dist::LocalGroup)). Rank 0's initial weights
//! are broadcast; each rank reads its shard of the data (DistributedSampler semantics), so an
//! epoch has `floor(ceil(n / world) / bs)` iterations; each step synchronises BN statistics,
//! Sinkhorn and the DINO centre, and averages the metrics and gradients over the ranks (the
//! gradients while the backward runs, bucket by bucket, unless `overlap_grad_reduce` is off:
//! [`GradSync`]). Only
//! rank 0 writes the run folder (config, metrics, checkpoints, final weights, summary),
//! evaluates and prints; every rank's Suave queue is gathered into rank 0's checkpoint
//! (`queue.rank{r}`) and a resume on the same world size gives each rank its own back.

use super::checkpoint::{self, MethodState, Position};
use super::config::{Method, TrainConfig};
use super::daino::DainoState;
use super::metrics::{append_jsonl, StepMetrics};
use super::progress::Progress;
use super::suave::SuaveState;
use crate::data::augment::{MultiCrop, SUAVE_NORM};
use crate::data::{
    BadInput, BatchKind, CyclingLoader, Dataset, EpochLoader, LabelSpec, LoaderConfig,
    SemiSupervised,
};
use crate::dist::buckets::{BucketConfig, GradBuckets};
use crate::dist::env::DistEnv;
use crate::dist::overlap::{overlapped_backward, GradReady, NoGradSink};
use crate::dist::tcp::{TcpConfig, TcpGroup};
use crate::dist::{Communicator, SingleProcess};
use crate::error::{Error, Result};
use crate::io::import::{
    dino_init, load_into, read_dino_init, read_swav_init, swav_init, ImportOptions,
};
use crate::io::safetensors::{read_tensors, save_store, save_stores};
use crate::nn::ParamStore;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How a run starts.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from `<output>/checkpoint.safetensors`.
    pub resume: bool,
    /// Overwrite an existing run folder.
    pub force: bool,
    /// No progress display (tests).
    pub quiet: bool,
}

/// What a finished (or stopped) run reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// The run folder.
    pub output: PathBuf,
    /// Iterations done in all.
    pub steps: usize,
    /// Means of the last epoch's training metrics and of the last evaluation.
    pub last: BTreeMap<String, f64>,
    /// Stopped early (Ctrl-C or `max_steps`); the checkpoint holds the position.
    pub stopped: bool,
    /// The resolved configuration.
    pub config: TrainConfig,
}

/// Files of a run folder.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
const CONFIG: &str = "config.json";
const METRICS: &str = "metrics.jsonl";
const FINAL: &str = "final.safetensors";
const SUMMARY: &str = "summary.json";

/// Settings a resumed run may change: they do not alter the recipe. (All but `device` leave the
/// numbers bit-identical; `device` moves the backbone between the f32 CPU model and the bf16
/// device path, which the log states at every start.)
const RESUME_MAY_CHANGE: [&str; 7] = [
    "max_steps",
    "overlap_grad_reduce",
    "workers",
    "log_every",
    "device",
    "output",
    "resolved_data_path",
];

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |err| Error::Io {
        path: path.display().to_string(),
        err,
    }
}

/// The unlabelled multi-crop recipe of `cfg`.
pub fn unlabelled_crops(cfg: &TrainConfig) -> MultiCrop {
    if cfg.method == Method::Daino || (cfg.method == Method::Supervised && !cfg.arch.is_resnet()) {
        let base = MultiCrop::daino_unlabelled();
        let mut views = Vec::new();
        for g in &base.views[..2] {
            let mut v = g.clone();
            v.size = cfg.global_crop_size;
            v.scale = cfg.global_crops_scale;
            views.push(v);
        }
        let mut local = base.views[2].clone();
        local.size = cfg.local_crop_size;
        local.scale = cfg.local_crops_scale;
        views.extend(std::iter::repeat_n(local, cfg.local_crops_number));
        MultiCrop { views }
    } else {
        let template = MultiCrop::suave_unlabelled(cfg.color_jit_unlab).views[0].clone();
        let mut views = Vec::new();
        for (i, &n) in cfg.nmb_crops.iter().enumerate() {
            let mut v = template.clone();
            v.size = cfg.size_crops[i];
            v.scale = (cfg.min_scale_crops[i], cfg.max_scale_crops[i]);
            views.extend(std::iter::repeat_n(v, n));
        }
        MultiCrop { views }
    }
}

/// The labelled recipe of `cfg`.
pub fn labelled_crops(cfg: &TrainConfig) -> MultiCrop {
    let mut m = if cfg.light_augment_lab {
        MultiCrop::labelled_light()
    } else {
        MultiCrop::labelled()
    };
    for v in &mut m.views {
        v.size = cfg.lab_crop_size;
        v.scale = cfg.lab_crop_scale;
    }
    m
}

fn label_spec(cfg: &TrainConfig) -> LabelSpec {
    if let Some(l) = &cfg.labels_list {
        LabelSpec::List(l.clone())
    } else if let Some(n) = cfg.labels_per_class {
        LabelSpec::PerClass(n, cfg.seed)
    } else if let Some(p) = cfg.labels_perc {
        LabelSpec::Percent(p, cfg.seed)
    } else {
        LabelSpec::All
    }
}

/// Iterations per epoch: `floor(ceil(n / world) / bs)` (DistributedSampler + drop_last).
pub fn iters_per_epoch(n: usize, world: usize, bs: usize) -> usize {
    n.div_ceil(world.max(1)) / bs.max(1)
}

fn differing_settings(a: &TrainConfig, b: &TrainConfig) -> Vec<String> {
    let (Ok(serde_json::Value::Object(x)), Ok(serde_json::Value::Object(y))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["<unreadable config>".into()];
    };
    x.iter()
        .filter(|(k, v)| !RESUME_MAY_CHANGE.contains(&k.as_str()) && y.get(*k) != Some(*v))
        .map(|(k, v)| {
            format!(
                "{k} (checkpoint {}, now {v})",
                y.get(k).cloned().unwrap_or_default()
            )
        })
        .collect()
}

/// Prepares the run folder: refuses to overwrite a run without `resume` or `force`, and fails
/// now, not after an epoch, when the folder cannot be written.
fn prepare_output(cfg: &TrainConfig, opts: &RunOptions) -> Result<()> {
    let out = &cfg.output;
    let has_run = out.join(CONFIG).exists() || out.join(CHECKPOINT).exists();
    if has_run && !opts.resume && !opts.force {
        return Err(Error::invalid(
            "--output",
            format!(
                "{} already holds a run; pass --resume to continue it or --force to start over",
                out.display()
            ),
        ));
    }
    if opts.resume && !out.join(CHECKPOINT).exists() {
        return Err(Error::invalid(
            "--resume",
            format!("no checkpoint at {}", out.join(CHECKPOINT).display()),
        ));
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    if opts.force && !opts.resume {
        for f in [CONFIG, METRICS, CHECKPOINT, FINAL, SUMMARY] {
            let p = out.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
    }
    // Probe writability now.
    let probe = out.join(".sdengine-write-test");
    std::fs::write(&probe, b"ok").map_err(io_err(&probe))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn apply_init(cfg: &TrainConfig, state: &mut MethodState) -> Result<()> {
    let Some(path) = &cfg.init else {
        return Ok(());
    };
    let is_st = path.extension().is_some_and(|e| e == "safetensors");
    let opts = ImportOptions::official_init();
    let src = path.display().to_string();
    match state {
        MethodState::Suave(s) => {
            let sd = if is_st {
                swav_init(read_tensors(path)?.0, cfg.init_proj)
            } else {
                read_swav_init(path, cfg.init_proj)?
            };
            load_into(&mut s.store, sd, &opts, &src)?;
        }
        MethodState::Daino(d) => {
            let sd = if is_st {
                dino_init(read_tensors(path)?.0, cfg.init_proj)
            } else {
                read_dino_init(path, cfg.init_proj)?
            };
            load_into(&mut d.student_store, sd, &opts, &src)?;
            for (t, s) in d
                .teacher_store
                .entries_mut()
                .iter_mut()
                .zip(d.student_store.entries())
            {
                t.value = s.value.clone();
            }
        }
    }
    Ok(())
}

/// Elements per all-reduce when averaging gradients: bounds the host groups' staging buffers
/// (they widen to f64) to a few tens of MB whatever the model size.
const GRAD_CHUNK: usize = 1 << 22;

/// Replaces every trainable parameter's gradient by its mean over the ranks (DDP's all-reduce),
/// in registration order, in chunks of at most [`GRAD_CHUNK`] elements. Nothing moves for one
/// rank. Collective.
pub fn average_gradients(store: &mut ParamStore, comm: &dyn Communicator) -> Result<()> {
    if comm.world_size() <= 1 {
        return Ok(());
    }
    let ids = store.trainable();
    let mut buf: Vec<f32> = Vec::with_capacity(GRAD_CHUNK);
    // (entry, offset in the entry) of each run of values packed into `buf`.
    let mut spans: Vec<(usize, usize, usize)> = Vec::new();
    let flush = |buf: &mut Vec<f32>,
                 spans: &mut Vec<(usize, usize, usize)>,
                 store: &mut ParamStore|
     -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        comm.all_reduce_mean_f32(buf)?;
        let mut at = 0;
        for &(e, off, n) in spans.iter() {
            store.entries_mut()[e].grad.data_mut()[off..off + n].copy_from_slice(&buf[at..at + n]);
            at += n;
        }
        buf.clear();
        spans.clear();
        Ok(())
    };
    for id in ids {
        let len = store.grad(id).numel();
        let mut off = 0;
        while off < len {
            let n = (len - off).min(GRAD_CHUNK - buf.len());
            buf.extend_from_slice(&store.grad(id).data()[off..off + n]);
            spans.push((id.0, off, n));
            off += n;
            if buf.len() == GRAD_CHUNK {
                flush(&mut buf, &mut spans, store)?;
            }
        }
    }
    flush(&mut buf, &mut spans, store)
}

/// How a step's backward and gradient averaging run (DDP's reducer). With several ranks and
/// `overlap` on, the backward reports finished gradients to bucket hooks and each bucket is
/// all-reduced on a communication thread while the backward goes on
/// ([`overlapped_backward`]); with `overlap` off, the backward runs to the end and
/// [`average_gradients`] follows. Both give bit-identical gradients on the host groups (each
/// element is reduced alone, in f64, in rank order). The bucket plan is made on first use and
/// again whenever the set of trainable parameters changes.
#[derive(Default)]
pub struct GradSync {
    /// Overlap the all-reduce with the backward (`overlap_grad_reduce`).
    pub overlap: bool,
    /// Bucket sizes and wire type of the overlapped path (DDP's defaults).
    pub buckets: BucketConfig,
    plan: Option<GradBuckets>,
}

impl GradSync {
    /// DDP's bucket sizes; `overlap` as the configuration says.
    pub fn new(overlap: bool) -> Self {
        GradSync {
            overlap,
            buckets: BucketConfig::default(),
            plan: None,
        }
    }

    /// Runs `backward` (given the store, the communicator for its own collectives and the
    /// grad-ready hook) and leaves every trainable gradient averaged over the ranks of
    /// `comm`. Collective.
    pub fn backward<F>(
        &mut self,
        store: &mut ParamStore,
        comm: &dyn Communicator,
        backward: F,
    ) -> Result<()>
    where
        F: FnOnce(&mut ParamStore, &dyn Communicator, &mut dyn GradReady) -> Result<()>,
    {
        if comm.world_size() <= 1 || !self.overlap {
            backward(store, comm, &mut NoGradSink)?;
            return average_gradients(store, comm);
        }
        let plan = match self.plan.take() {
            Some(p) if p.matches(store) => p,
            _ => GradBuckets::for_store(store, &self.buckets)?,
        };
        let plan = self.plan.insert(plan);
        overlapped_backward(store, plan, comm, backward)
    }
}

/// Gives every rank rank 0's parameters and buffers (DDP's initial broadcast), so that the
/// ranks start from one model whatever each one drew or loaded. Collective.
pub fn broadcast_store(store: &mut ParamStore, comm: &dyn Communicator) -> Result<()> {
    if comm.world_size() <= 1 {
        return Ok(());
    }
    for e in store.entries_mut() {
        comm.broadcast_f32(e.value.data_mut(), 0)?;
    }
    Ok(())
}

/// A 52-bit FNV-1a hash of the metric names, exact in f64: the ranks check with it that they
/// average the same keys.
fn keys_hash(m: &BTreeMap<String, f64>) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for k in m.keys() {
        for b in k.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    (h >> 12) as f64
}

/// One step's metrics averaged over the ranks (each key's mean, then the mean over ranks: the
/// per-rank losses are means over equal batches, so this is the global-batch value). A NaN on
/// any rank makes the mean NaN on every rank. Errors on every rank when their keys differ.
/// Collective.
pub fn average_metrics(m: &StepMetrics, comm: &dyn Communicator) -> Result<StepMetrics> {
    if comm.world_size() <= 1 {
        return Ok(m.clone());
    }
    let means = m.means();
    let h = keys_hash(&means);
    let mut buf: Vec<f64> = means.values().copied().collect();
    buf.push(h);
    let n = buf.len();
    comm.all_reduce_mean_f64(&mut buf)?;
    if buf[n - 1] != h {
        return Err(Error::invalid(
            "distributed training",
            format!(
                "the ranks recorded different metrics (this rank: {:?}); every rank must run \
                 the same configuration",
                means.keys().collect::<Vec<_>>()
            ),
        ));
    }
    let mut out = StepMetrics::default();
    for (k, v) in means.keys().zip(buf) {
        out.add(k, v);
    }
    Ok(out)
}

/// Makes a per-rank result collective: when any rank failed, every rank returns an error (its
/// own, or one pointing at the failed rank's), so that no rank goes on to wait in a collective
/// the failed one will never join. Collective.
fn agree<T>(comm: &dyn Communicator, r: Result<T>) -> Result<T> {
    if comm.world_size() <= 1 {
        return r;
    }
    let mut flags = vec![0.0f64; comm.world_size()];
    flags[comm.rank()] = f64::from(u8::from(r.is_err()));
    comm.all_reduce_sum_f64(&mut flags)?;
    let r = r?;
    if let Some(bad) = flags.iter().position(|&f| f > 0.0) {
        return Err(Error::invalid(
            "distributed training",
            format!("rank {bad} failed (its error is in its output); stopping every rank"),
        ));
    }
    Ok(r)
}

/// Every rank's queue, in rank order (collective; one rank: its own). `None` without a queue.
fn gather_queues(state: &MethodState, comm: &dyn Communicator) -> Result<Option<Vec<Tensor<f32>>>> {
    let MethodState::Suave(s) = state else {
        return Ok(None);
    };
    let Some(q) = &s.queue else {
        return Ok(None);
    };
    let t = q.to_tensor();
    let world = comm.world_size();
    let mut all = vec![0.0f32; t.numel() * world];
    comm.all_gather_f32(t.data(), &mut all)?;
    all.chunks_exact(t.numel().max(1))
        .map(|c| Tensor::from_vec(c.to_vec(), t.shape()))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn evaluate(
    state: &mut MethodState,
    cfg: &TrainConfig,
    val: &Arc<Dataset>,
    bad: &Arc<BadInput>,
    quiet: bool,
) -> Result<BTreeMap<String, f64>> {
    let lc = LoaderConfig {
        seed: cfg.seed,
        stream: 2,
        rank: 0,
        world: 1,
        batch_size: cfg.eval_batch_size,
        workers: cfg.workers,
        prefetch: 2 * cfg.workers,
        shuffle: false,
        drop_last: false,
    };
    let kind = BatchKind::Eval {
        resize: cfg.eval_resize,
        crop: cfg.eval_crop,
        norm: SUAVE_NORM,
    };
    let loader = EpochLoader::new(Arc::clone(val), kind, lc, 0, Arc::clone(bad))?;
    let mut progress = Progress::new(loader.len(), "eval", quiet);
    let mut acc = StepMetrics::default();
    for (i, b) in loader.enumerate() {
        let b = b?;
        match state {
            MethodState::Suave(s) => s.eval_batch(&b.views[0], &b.labels, &mut acc)?,
            MethodState::Daino(d) => d.eval_batch(&b.views[0], &b.labels, &mut acc)?,
        }
        progress.update(i + 1, &[], b.labels.len());
    }
    progress.finish("");
    Ok(acc.means())
}

/// Trains as `cfg` says, as the rank the environment names: one process without torchrun or
/// Slurm variables, else one rank of a TCP group (`sdengine launch` sets them). `stop` is raised
/// by Ctrl-C: the loop then writes a checkpoint at the current position and returns with
/// `stopped`.
pub fn train(cfg: TrainConfig, opts: &RunOptions, stop: &AtomicBool) -> Result<RunSummary> {
    let env = DistEnv::from_env()?;
    if env.is_distributed() {
        let group = TcpGroup::connect(&env, &TcpConfig::default())?;
        train_with(cfg, opts, stop, &group)
    } else {
        train_with(cfg, opts, stop, &SingleProcess)
    }
}

/// Where the training passes run, from `--device` (DESIGN: one binary that uses what the
/// machine has): Suave's backbone on the GPU (`cuda`, or `auto` when one is present; the rank's
/// GPU is `LOCAL_RANK % devices`) or on the CPU emulation of the device path (`emu`: the same
/// device code, slow, for checking it without a GPU); the rest of the step on the CPU. Daino's
/// ViT has no device path yet: `auto` keeps it on the CPU, `cuda` / `emu` refuse. Returns the
/// line the log prints.
fn place_backbone(cfg: &TrainConfig, state: &mut MethodState) -> Result<(String, bool)> {
    use crate::backend::device::{Emu, Mode};
    use crate::models::backbone::BackboneRun;
    use crate::models::device::DeviceBackbone;
    let want = cfg.device.as_str();
    let present = crate::backend::cuda::gpu_available();
    let cpu = |why: &str| Ok((format!("device: cpu{why}"), false));
    let suave = match state {
        MethodState::Suave(s) => s,
        MethodState::Daino(_) => {
            if want == "cuda" || want == "emu" {
                return Err(Error::invalid(
                    "--device",
                    format!("{want}: only Suave's ResNet backbone runs on the device so far; Daino (ViT) trains with --device cpu"),
                ));
            }
            return if want == "auto" && present {
                cpu(" (a GPU is present, but Daino's ViT has no device path yet)")
            } else {
                cpu("")
            };
        }
    };
    if want == "emu" {
        let runner = DeviceBackbone::new(Emu::new(Mode::Fibers));
        let line = format!(
            "device: backbone on the {}, the rest on the CPU",
            runner.describe()
        );
        suave.backbone = Box::new(runner);
        return Ok((line, true));
    }
    if want == "cpu" || (want == "auto" && !present) {
        return cpu("");
    }
    match open_training_gpu() {
        Ok(g) => {
            let runner = DeviceBackbone::new(g);
            let line = format!(
                "device: backbone on {}, the rest on the CPU",
                runner.describe()
            );
            suave.backbone = Box::new(runner);
            Ok((line, true))
        }
        // `auto` falls back to the CPU rather than failing a run that worked before.
        Err(e) if want == "auto" => cpu(&format!(
            " (a GPU is present but not usable for training: {e})"
        )),
        Err(e) => Err(Error::invalid(
            "--device",
            format!("cuda: {e}; use --device cpu, or emu to run the device code on the CPU"),
        )),
    }
}

/// This rank's GPU (`LOCAL_RANK % devices`), checked for what training needs before the first
/// step rather than at its first convolution: a context, cuDNN, and the engine's kernels (one
/// launched and waited for, which also compiles them where the binary carries sources only).
fn open_training_gpu() -> Result<crate::backend::cuda::Gpu> {
    use crate::backend::cuda::{gpu_available, probe, Gpu};
    use crate::backend::device::elementwise;
    if !gpu_available() {
        return Err(Error::invalid(
            "cuda",
            format!(
                "no usable GPU ({})",
                probe().reason.as_deref().unwrap_or("no CUDA device")
            ),
        ));
    }
    let ordinal = DistEnv::from_env()?.device_index(probe().devices.len())?;
    let g = Gpu::new(ordinal)?;
    g.dnn()?;
    let x = g.upload(&[1.5f32])?;
    let mut y = g.alloc::<half::bf16>(1)?;
    elementwise::cast_f32_bf16(&g, &x, &mut y, elementwise::THREADS)?;
    if g.download(&y)? != [half::bf16::from_f32(1.5)] {
        return Err(Error::invalid(
            "cuda",
            "the engine's kernels gave a wrong result on a one-element smoke test",
        ));
    }
    Ok(g)
}

/// Every rank must place the backbone the same way: with several ranks each batch norm is a
/// collective, and the CPU model and the device path run them in the same order but at
/// different precisions. Errors on every rank when the ranks disagree (e.g. `auto` on nodes
/// with and without a usable GPU).
fn agree_placement(comm: &dyn Communicator, on_device: bool) -> Result<()> {
    let world = comm.world_size();
    if world <= 1 {
        return Ok(());
    }
    let mut n = [f64::from(u8::from(on_device))];
    comm.all_reduce_sum_f64(&mut n)?;
    let k = n[0].round() as usize;
    if k != 0 && k != world {
        return Err(Error::invalid(
            "--device",
            format!("{k} of {world} ranks put the backbone on a device and the others on the CPU; pass the same --device cuda or cpu to every rank"),
        ));
    }
    Ok(())
}

/// [`train`] as one rank of `comm` (every rank calls it with the same configuration; the tests
/// run the ranks of a [`LocalGroup`](crate::dist::LocalGroup) on threads). Rank 0 writes the
/// run folder and reports; the summary of every rank holds the averaged training metrics, rank
/// 0's also the evaluation. A stop raised on any rank stops every rank at the same iteration.
pub fn train_with(
    mut cfg: TrainConfig,
    opts: &RunOptions,
    stop: &AtomicBool,
    comm: &dyn Communicator,
) -> Result<RunSummary> {
    cfg.validate()?;
    let world = comm.world_size();
    let rank = comm.rank();
    let lead = rank == 0;
    let quiet = opts.quiet || !lead;
    let prepared = if lead {
        prepare_output(&cfg, opts)
    } else {
        Ok(())
    };
    agree(comm, prepared)?;

    // Resume: the checkpoint's settings win; only harmless ones may change.
    let ckpt_path = cfg.output.join(CHECKPOINT);
    let resumed = if opts.resume {
        let read = checkpoint::read_position(&ckpt_path).and_then(|(pos, tensors)| {
            let diff = differing_settings(&cfg, &pos.config);
            if !diff.is_empty() {
                return Err(Error::invalid(
                    "--resume",
                    format!("settings differ from the checkpoint's: {}", diff.join("; ")),
                ));
            }
            Ok((pos, tensors))
        });
        Some(agree(comm, read)?)
    } else {
        None
    };

    // Data.
    let root = match &cfg.data_path {
        Some(p) => p.clone(),
        None => crate::data::embedded::cifar10_mini_dir()?,
    };
    let sets = SemiSupervised::open(&root, &label_spec(&cfg))?;
    cfg.resolved_data_path = Some(root.clone());
    cfg.num_classes = sets.unlabelled.classes.len();
    if sets.labelled.samples.len() < cfg.lab_batch_size {
        return Err(Error::invalid(
            "--lab-batch-size",
            format!(
                "{} labelled images, fewer than one labelled batch of {}",
                sets.labelled.samples.len(),
                cfg.lab_batch_size
            ),
        ));
    }
    let iters = iters_per_epoch(sets.unlabelled.samples.len(), world, cfg.batch_size);
    if iters == 0 {
        return Err(Error::invalid(
            "--batch-size",
            format!(
                "{} unlabelled images give no full batch of {}",
                sets.unlabelled.samples.len(),
                cfg.batch_size
            ),
        ));
    }
    let bad = Arc::new(BadInput::default());
    let unlab_set = Arc::new(sets.unlabelled.clone());
    let lab_set = Arc::new(sets.labelled.clone());
    let val_set = sets.val.clone().map(Arc::new);
    let workers = cfg.workers;
    let loader_cfg = |stream: u64, bs: usize| LoaderConfig {
        seed: cfg.seed,
        stream,
        rank,
        world,
        batch_size: bs,
        workers,
        prefetch: 2 * workers,
        shuffle: true,
        drop_last: true,
    };
    let unlab_kind = BatchKind::Unlabelled {
        crops: unlabelled_crops(&cfg),
        mix_globals: cfg.method == Method::Suave && cfg.mixup_unlab,
    };
    let lab_kind = BatchKind::Labelled {
        crops: labelled_crops(&cfg),
        mixup_extend: cfg.mixup_lab,
        classes: cfg.num_classes,
    };
    let mut lab_loader = CyclingLoader::new(
        Arc::clone(&lab_set),
        lab_kind,
        loader_cfg(1, cfg.lab_batch_size),
        0,
        Arc::clone(&bad),
    )?;

    // Model.
    let mut state = if cfg.arch.is_resnet() {
        MethodState::Suave(Box::new(SuaveState::new(&cfg, iters, world)?))
    } else {
        MethodState::Daino(Box::new(DainoState::new(&cfg, iters, world)?))
    };
    let placed = place_backbone(&cfg, &mut state);
    let (placement, on_device) = agree(comm, placed)?;
    agree_placement(comm, on_device)?;
    let (mut epoch, mut batch, mut step, mut epoch_metrics) = (0, 0, 0, StepMetrics::default());
    if let Some((pos, tensors)) = &resumed {
        let restored = checkpoint::restore_rank(&ckpt_path, &mut state, pos, tensors, rank, world);
        agree(comm, restored)?;
        epoch = pos.epoch;
        batch = pos.batch;
        step = pos.step;
        epoch_metrics = pos.epoch_metrics.clone();
        lab_loader.seek(pos.lab_epoch, pos.lab_batch)?;
    } else {
        let init = apply_init(&cfg, &mut state).and_then(|()| {
            if !lead {
                return Ok(());
            }
            let json = serde_json::to_string_pretty(&cfg)
                .map_err(|e| Error::invalid("config", e.to_string()))?;
            let p = cfg.output.join(CONFIG);
            std::fs::write(&p, json).map_err(io_err(&p))
        });
        agree(comm, init)?;
    }
    // One model on every rank: rank 0's weights and buffers (DDP's initial broadcast).
    match &mut state {
        MethodState::Suave(s) => broadcast_store(&mut s.store, comm)?,
        MethodState::Daino(d) => {
            broadcast_store(&mut d.student_store, comm)?;
            broadcast_store(&mut d.teacher_store, comm)?;
        }
    }
    let metrics_path = cfg.output.join(METRICS);
    let position = |epoch, batch, step, lab: &CyclingLoader, m: &StepMetrics| {
        let (lab_epoch, lab_batch) = lab.position();
        Position {
            format: checkpoint::FORMAT,
            epoch,
            batch,
            step,
            lab_epoch,
            lab_batch,
            epoch_metrics: m.clone(),
            adamw_steps: BTreeMap::new(),
            config: cfg.clone(),
            world_size: world,
        }
    };
    // Collective (the queues are gathered); rank 0 writes, and every rank learns whether it
    // could.
    let save = |state: &MethodState, pos: &Position| -> Result<()> {
        let queues = if world > 1 {
            gather_queues(state, comm)?
        } else {
            None
        };
        let written = if lead {
            checkpoint::save_ranks(&ckpt_path, state, pos, queues.as_deref())
        } else {
            Ok(())
        };
        agree(comm, written)
    };
    let images_per_step = cfg.lab_batch_size
        + if cfg.method == Method::Supervised {
            0
        } else {
            cfg.batch_size
        };
    let mut last = BTreeMap::new();
    let mut stopped = false;
    if step == 0 && !quiet {
        eprintln!(
            "{} on {} ({} classes; {} unlabelled, {} labelled, {} val images): {} epochs x {} iterations, arch {}",
            cfg.method.name(),
            root.display(),
            cfg.num_classes,
            sets.unlabelled.samples.len(),
            sets.labelled.samples.len(),
            sets.val.as_ref().map_or(0, |v| v.samples.len()),
            cfg.epochs,
            iters,
            cfg.arch.name()
        );
        eprintln!("{placement}");
    }
    'epochs: while epoch < cfg.epochs {
        let mut unlab_loader = if cfg.method == Method::Supervised {
            None
        } else {
            Some(EpochLoader::starting_at(
                Arc::clone(&unlab_set),
                unlab_kind.clone(),
                loader_cfg(0, cfg.batch_size),
                epoch as u64,
                Arc::clone(&bad),
                batch,
            )?)
        };
        let mut progress =
            Progress::new(iters, &format!("epoch {}/{}", epoch + 1, cfg.epochs), quiet);
        while batch < iters {
            let mut halt = stop.load(Ordering::Relaxed);
            if world > 1 {
                // Ctrl-C may reach one rank only: stop all of them at the same iteration.
                let mut f = [f64::from(u8::from(halt))];
                comm.all_reduce_sum_f64(&mut f)?;
                halt = f[0] > 0.0;
            }
            if halt || cfg.max_steps.is_some_and(|m| step >= m) {
                stopped = true;
                break 'epochs;
            }
            let unlab = match unlab_loader.as_mut() {
                Some(l) => Some(l.next().ok_or_else(|| {
                    Error::invalid("loader", "the unlabelled loader ended early")
                })??),
                None => None,
            };
            let lab = lab_loader.next_batch()?;
            let r = match &mut state {
                MethodState::Suave(s) => s.step(&cfg, unlab.as_ref(), &lab, step, epoch, comm),
                MethodState::Daino(d) => d.step(&cfg, unlab.as_ref(), &lab, step, epoch, comm),
            };
            let m = match r {
                Ok(m) => m,
                Err(e) => {
                    let last_good = if ckpt_path.exists() {
                        format!("the last good checkpoint is {}", ckpt_path.display())
                    } else {
                        "no checkpoint was written yet".into()
                    };
                    return Err(Error::invalid(
                        "training",
                        format!("stopped at epoch {epoch}, iteration {step}: {e}; {last_good}"),
                    ));
                }
            };
            epoch_metrics.merge(&m);
            step += 1;
            batch += 1;
            let loss = m.get("train_loss").unwrap_or(f64::NAN);
            progress.update(batch, &[("loss", loss)], images_per_step);
            if lead && step % cfg.log_every == 0 {
                let mut means = m.means();
                means.insert("bad_inputs".into(), bad.skipped() as f64);
                append_jsonl(
                    &metrics_path,
                    epoch as f64 + batch as f64 / iters as f64,
                    step,
                    &means,
                )?;
            }
        }
        progress.finish(&format!(
            "loss {:.4}",
            epoch_metrics.get("train_loss").unwrap_or(f64::NAN)
        ));
        let mut line = epoch_metrics.means();
        let last_epoch = epoch + 1 == cfg.epochs;
        if let Some(val) = &val_set {
            // Rank 0 evaluates the whole set (the model is the same on every rank); the others
            // wait for it in the next collective.
            if lead && ((epoch + 1) % cfg.eval_every == 0 || last_epoch) {
                line.extend(evaluate(&mut state, &cfg, val, &bad, quiet)?);
            }
        }
        if lead {
            append_jsonl(&metrics_path, (epoch + 1) as f64, step, &line)?;
        }
        if !quiet {
            let show: Vec<String> = [
                "train_loss",
                "val_acc1",
                "val_proj_0_acc1",
                "val_student_acc1",
            ]
            .iter()
            .filter_map(|k| line.get(*k).map(|v| format!("{k} {v:.3}")))
            .collect();
            eprintln!("epoch {}: {}", epoch + 1, show.join(", "));
        }
        last = line;
        epoch += 1;
        batch = 0;
        epoch_metrics = StepMetrics::default();
        let pos = position(epoch, 0, step, &lab_loader, &epoch_metrics);
        save(&state, &pos)?;
        if lead
            && cfg.checkpoint_freq > 0
            && (epoch % cfg.checkpoint_freq == 0 || epoch == cfg.epochs)
        {
            let dir = cfg.output.join("checkpoints");
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let copy = dir.join(format!("ckp-{epoch}.safetensors"));
            std::fs::copy(&ckpt_path, &copy).map_err(io_err(&copy))?;
        }
    }
    if stopped {
        let pos = position(epoch, batch, step, &lab_loader, &epoch_metrics);
        save(&state, &pos)?;
        if !quiet {
            eprintln!(
                "stopped at epoch {epoch}, iteration {step}; checkpoint {} (continue with --resume)",
                ckpt_path.display()
            );
        }
    } else if lead {
        // Final weights under the official names, for `sdengine export` and `--init`.
        let fin = cfg.output.join(FINAL);
        let meta = BTreeMap::from([("method".to_string(), cfg.method.name().to_string())]);
        match &state {
            MethodState::Suave(s) => save_store(&fin, &s.store, &meta)?,
            MethodState::Daino(d) => save_stores(&fin, &[("", &d.teacher_store)], &meta)?,
        }
        if last.is_empty() {
            if let Ok(text) = std::fs::read_to_string(&metrics_path) {
                if let Some(l) = text.lines().last() {
                    last = serde_json::from_str(l).unwrap_or_default();
                }
            }
        }
        let summary = serde_json::json!({
            "method": cfg.method.name(),
            "arch": cfg.arch.name(),
            "steps": step,
            "bad_inputs": bad.skipped(),
            "last": last,
        });
        let p = cfg.output.join(SUMMARY);
        std::fs::write(&p, summary.to_string()).map_err(io_err(&p))?;
    }
    // Nobody leaves before rank 0 has written the run's last files.
    comm.barrier()?;
    if bad.skipped() > 0 && !quiet {
        eprintln!(
            "{} unreadable images were skipped and replaced",
            bad.skipped()
        );
    }
    Ok(RunSummary {
        output: cfg.output.clone(),
        steps: step,
        last,
        stopped,
        config: cfg,
    })
}

/// Evaluates the checkpoint of the run folder `run` on its validation set (or on `data`).
pub fn evaluate_run(run: &Path, data: Option<&Path>) -> Result<BTreeMap<String, f64>> {
    let ckpt = run.join(CHECKPOINT);
    let (pos, tensors) = checkpoint::read_position(&ckpt)?;
    let cfg = pos.config.clone();
    let root = match (data, &cfg.data_path) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(d)) => d.clone(),
        (None, None) => crate::data::embedded::cifar10_mini_dir()?,
    };
    let sets = SemiSupervised::open(&root, &LabelSpec::All)?;
    let val = sets.val.ok_or_else(|| {
        Error::invalid(
            "eval",
            format!(
                "{} has no val/ or test/ folder to evaluate on",
                root.display()
            ),
        )
    })?;
    if val.classes.len() != cfg.num_classes {
        return Err(Error::invalid(
            "eval",
            format!(
                "{} has {} classes, the model {}",
                root.display(),
                val.classes.len(),
                cfg.num_classes
            ),
        ));
    }
    let mut state = if cfg.arch.is_resnet() {
        let mut s = SuaveState::new(&cfg, 1, 1)?;
        // Evaluation needs no queue (and a multi-rank checkpoint holds one per rank).
        s.queue = None;
        MethodState::Suave(Box::new(s))
    } else {
        MethodState::Daino(Box::new(DainoState::new(&cfg, 1, 1)?))
    };
    checkpoint::restore_rank(&ckpt, &mut state, &pos, &tensors, 0, pos.world_size)?;
    let bad = Arc::new(BadInput::default());
    evaluate(&mut state, &cfg, &Arc::new(val), &bad, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::LocalGroup;

    fn on_two_ranks(device: [bool; 2]) -> Vec<Result<()>> {
        let ranks = LocalGroup::new(2).unwrap();
        std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .iter()
                .map(|g| s.spawn(move || agree_placement(g, device[g.rank()])))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn ranks_must_agree_on_where_the_backbone_runs() {
        for r in on_two_ranks([true, false]) {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("1 of 2 ranks"), "{e}");
        }
        assert!(on_two_ranks([true, true]).iter().all(Result::is_ok));
        assert!(on_two_ranks([false, false]).iter().all(Result::is_ok));
        assert!(agree_placement(&SingleProcess, true).is_ok());
    }
}

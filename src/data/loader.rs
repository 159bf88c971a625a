//! The loader: `DistributedSampler` order, a pool of worker threads that decode and augment whole
//! batches, and a bounded in-order prefetch queue.
//!
//! Determinism: the sample order depends on (seed, epoch); the crops of the sample at position
//! `k` of a rank's epoch depend on (seed, stream, epoch, rank, k); a batch's Mixup on (seed,
//! stream, epoch, rank, batch). Worker `w` of `n` builds batches `w, w+n, ...` into its own
//! bounded channel and the consumer reads them round-robin, so the batches are the same for any
//! worker count and memory is bounded by `workers * ceil(depth / workers)` ready batches plus one
//! batch in progress per worker.
//!
//! Bad input: an image that fails to read or decode is reported once (a warning naming it),
//! counted in [`BadInput`], and replaced by the next decodable sample in dataset order, so batch
//! shapes never change. If no sample of the dataset decodes, the loader returns an error.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::augment::{eval_into, MultiCrop, Normalize};
use super::dataset::Dataset;
use super::decode::decode_file;
use super::error::{DataError, DataResult};
use super::image::Image;
use super::mixup::{extend_labelled, mix_batch, sample_mix, MixParams};
use crate::rng::Rng;
use crate::tensor::Tensor;

const SHUFFLE_STREAM: u64 = 0x5348_5546;
const AUG_STREAM: u64 = 0x4155_4721;
const MIX_STREAM: u64 = 0x4D49_5821;

/// `DistributedSampler(shuffle, seed).set_epoch(epoch)` for one rank: the (shuffled) order padded
/// to a multiple of `world` by repeating its start, then every `world`-th index from `rank`.
pub fn distributed_indices(
    n: usize,
    seed: u64,
    epoch: u64,
    rank: usize,
    world: usize,
    shuffle: bool,
) -> Vec<usize> {
    if n == 0 || world == 0 {
        return Vec::new();
    }
    let mut order = if shuffle {
        Rng::new(seed)
            .fork(SHUFFLE_STREAM)
            .fork(epoch)
            .permutation(n)
    } else {
        (0..n).collect()
    };
    let total = n.div_ceil(world) * world;
    let mut i = 0;
    while order.len() < total {
        order.push(order[i % n]);
        i += 1;
    }
    order.into_iter().skip(rank).step_by(world).collect()
}

/// Counts of unreadable files met by a loader; shared with the trainer so it can log them.
#[derive(Debug, Default)]
pub struct BadInput {
    skipped: AtomicU64,
    files: Mutex<BTreeSet<PathBuf>>,
}

impl BadInput {
    /// How many times a sample was replaced because its file could not be decoded.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// The distinct files that failed, sorted.
    pub fn files(&self) -> Vec<PathBuf> {
        self.files
            .lock()
            .map(|f| f.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn record(&self, path: &std::path::Path, err: &DataError) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        let first = self
            .files
            .lock()
            .map(|mut f| f.insert(path.to_path_buf()))
            .unwrap_or(false);
        if first {
            eprintln!("warning: skipping unreadable image (replaced by the next one): {err}");
        }
    }
}

/// What a batch is made of.
#[derive(Clone, Debug)]
pub enum BatchKind {
    /// Unlabelled multi-crop: one NHWC tensor per view; with `mix_globals`, a Mixup/CutMix of
    /// global 1 with flipped global 2 (`MultiViewCollateMixup(views_to_mix="globals")`).
    Unlabelled {
        /// The views.
        crops: MultiCrop,
        /// Mix the first pair of views.
        mix_globals: bool,
    },
    /// Labelled single view; with `mixup_extend`, `[x; mix(x)]` and soft targets over `classes`.
    Labelled {
        /// The (single-view) recipe.
        crops: MultiCrop,
        /// CutMix/Mixup "extend" mode.
        mixup_extend: bool,
        /// Number of classes of the targets.
        classes: usize,
    },
    /// Evaluation: Resize(resize) + CenterCrop(crop) + Normalize.
    Eval {
        /// Shorter side after resizing (256).
        resize: usize,
        /// Centre crop side (224).
        crop: usize,
        /// Normalisation.
        norm: Normalize,
    },
}

/// A batch ready for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// One NHWC tensor per view (a single one for labelled and evaluation batches; 2B rows for
    /// a labelled batch in extend mode).
    pub views: Vec<Tensor<f32>>,
    /// Ground-truth labels of the B samples (unlabelled: for monitoring only).
    pub labels: Vec<usize>,
    /// Dataset indices actually used (after replacing unreadable files).
    pub indices: Vec<usize>,
    /// Soft targets `[rows, classes]` of a labelled batch in extend mode.
    pub targets: Option<Tensor<f32>>,
    /// The mixed global view and its parameters, for unlabelled batches with `mix_globals`.
    pub mixed: Option<(Tensor<f32>, MixParams)>,
}

/// Loader options.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Run seed.
    pub seed: u64,
    /// Separates the random streams of loaders of the same run (unlabelled, labelled, ...).
    pub stream: u64,
    /// This process's rank.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// Samples per batch per rank.
    pub batch_size: usize,
    /// Worker threads (>= 1).
    pub workers: usize,
    /// Ready batches kept ahead of the consumer (>= 1).
    pub prefetch: usize,
    /// Shuffle each epoch (DistributedSampler's `shuffle`).
    pub shuffle: bool,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
}

impl LoaderConfig {
    fn check(&self) -> DataResult<()> {
        if self.batch_size == 0 || self.workers == 0 || self.prefetch == 0 || self.world == 0 {
            return Err(DataError::Invalid(format!(
                "batch_size, workers, prefetch and world must be >= 1 (got {}, {}, {}, {})",
                self.batch_size, self.workers, self.prefetch, self.world
            )));
        }
        if self.rank >= self.world {
            return Err(DataError::Invalid(format!(
                "rank {} is not below the world size {}",
                self.rank, self.world
            )));
        }
        Ok(())
    }
}

/// Everything a worker needs, shared read-only.
struct Job {
    dataset: Arc<Dataset>,
    kind: BatchKind,
    cfg: LoaderConfig,
    epoch: u64,
    order: Vec<usize>,
    bad: Arc<BadInput>,
}

impl Job {
    fn num_batches(&self) -> usize {
        let n = self.order.len();
        if self.cfg.drop_last {
            n / self.cfg.batch_size
        } else {
            n.div_ceil(self.cfg.batch_size)
        }
    }

    /// Decodes sample `idx`, or the next decodable one in dataset order.
    fn load(&self, idx: usize) -> DataResult<(usize, Image<u8>)> {
        let n = self.dataset.samples.len();
        for k in 0..n {
            let j = (idx + k) % n;
            let path = &self.dataset.samples[j].path;
            match decode_file(path) {
                Ok(img) => return Ok((j, img)),
                Err(e) => self.bad.record(path, &e),
            }
        }
        Err(DataError::Invalid(format!(
            "no image of the dataset could be decoded ({n} files, first {})",
            self.dataset
                .samples
                .first()
                .map(|s| s.path.display().to_string())
                .unwrap_or_default()
        )))
    }

    fn build(&self, b: usize) -> DataResult<Batch> {
        let bs = self.cfg.batch_size;
        let pos0 = b * bs;
        let pos1 = (pos0 + bs).min(self.order.len());
        let rows = pos1 - pos0;
        let sample_rng = Rng::new(self.cfg.seed)
            .fork(AUG_STREAM ^ self.cfg.stream)
            .fork(self.epoch)
            .fork(self.cfg.rank as u64);
        let (sizes, views_n) = match &self.kind {
            BatchKind::Unlabelled { crops, .. } | BatchKind::Labelled { crops, .. } => (
                crops.views.iter().map(|v| v.size).collect::<Vec<_>>(),
                crops.views.len(),
            ),
            BatchKind::Eval { crop, .. } => (vec![*crop], 1),
        };
        let mut bufs: Vec<Vec<f32>> = sizes.iter().map(|s| vec![0.0; rows * s * s * 3]).collect();
        let mut labels = Vec::with_capacity(rows);
        let mut indices = Vec::with_capacity(rows);
        for (r, pos) in (pos0..pos1).enumerate() {
            let (idx, img) = self.load(self.order[pos])?;
            labels.push(self.dataset.samples[idx].label);
            indices.push(idx);
            match &self.kind {
                BatchKind::Unlabelled { crops, .. } | BatchKind::Labelled { crops, .. } => {
                    let params = crops.sample(&sample_rng.fork(pos as u64), img.height, img.width);
                    for (v, (aug, p)) in crops.views.iter().zip(&params).enumerate() {
                        let per = aug.numel();
                        aug.apply(&img, p, &mut bufs[v][r * per..(r + 1) * per]);
                    }
                }
                BatchKind::Eval { resize, crop, norm } => {
                    let per = crop * crop * 3;
                    eval_into(
                        &img,
                        *resize,
                        *crop,
                        *norm,
                        &mut bufs[0][r * per..(r + 1) * per],
                    );
                }
            }
        }
        let mut views = Vec::with_capacity(views_n);
        for (buf, s) in bufs.into_iter().zip(&sizes) {
            views.push(
                Tensor::from_vec(buf, &[rows, *s, *s, 3])
                    .map_err(|e| DataError::Invalid(e.to_string()))?,
            );
        }
        let mut mix_rng = Rng::new(self.cfg.seed)
            .fork(MIX_STREAM ^ self.cfg.stream)
            .fork(self.epoch)
            .fork(self.cfg.rank as u64)
            .fork(b as u64);
        let mut batch = Batch {
            views,
            labels,
            indices,
            targets: None,
            mixed: None,
        };
        match &self.kind {
            BatchKind::Unlabelled {
                mix_globals: true, ..
            } if batch.views.len() >= 2 => {
                let (h, w) = (batch.views[0].dim(1), batch.views[0].dim(2));
                let p = sample_mix(&mut mix_rng, 1.0, 0.5, h, w);
                let m = mix_batch(&batch.views[0], &batch.views[1], &p)?;
                batch.mixed = Some((m, p));
            }
            BatchKind::Labelled {
                mixup_extend: true,
                classes,
                ..
            } => {
                let (h, w) = (batch.views[0].dim(1), batch.views[0].dim(2));
                let p = sample_mix(&mut mix_rng, 1.0, 0.5, h, w);
                let (x, t) = extend_labelled(&batch.views[0], &batch.labels, *classes, &p)?;
                batch.views[0] = x;
                batch.targets = Some(t);
            }
            _ => {}
        }
        Ok(batch)
    }
}

/// One epoch of batches for one rank, produced by worker threads ahead of the consumer.
pub struct EpochLoader {
    receivers: Vec<Receiver<DataResult<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    next: usize,
    start: usize,
    total: usize,
    failed: bool,
}

impl EpochLoader {
    /// Starts the workers for `epoch`. `bad` collects unreadable files across epochs.
    pub fn new(
        dataset: Arc<Dataset>,
        kind: BatchKind,
        cfg: LoaderConfig,
        epoch: u64,
        bad: Arc<BadInput>,
    ) -> DataResult<EpochLoader> {
        Self::starting_at(dataset, kind, cfg, epoch, bad, 0)
    }

    /// Starts the workers for `epoch` at batch `start` (a resumed run): the batches are the
    /// same as those an epoch started at 0 yields from its `start`-th on, because every batch
    /// depends only on (seed, stream, epoch, rank, batch index), and none before `start` is built.
    pub fn starting_at(
        dataset: Arc<Dataset>,
        kind: BatchKind,
        cfg: LoaderConfig,
        epoch: u64,
        bad: Arc<BadInput>,
        start: usize,
    ) -> DataResult<EpochLoader> {
        cfg.check()?;
        if dataset.samples.is_empty() {
            return Err(DataError::Invalid("the dataset has no sample".into()));
        }
        let order = distributed_indices(
            dataset.samples.len(),
            cfg.seed,
            epoch,
            cfg.rank,
            cfg.world,
            cfg.shuffle,
        );
        let workers = cfg.workers;
        let cap = cfg.prefetch.div_ceil(workers).max(1);
        let job = Arc::new(Job {
            dataset,
            kind,
            cfg,
            epoch,
            order,
            bad,
        });
        let total = job.num_batches();
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        let start = start.min(total);
        let left = total - start;
        for w in 0..workers.min(left.max(1)) {
            let (tx, rx) = sync_channel(cap);
            let job = Arc::clone(&job);
            let stop = Arc::clone(&stop);
            let n = workers.min(left.max(1));
            let h = std::thread::Builder::new()
                .name(format!("sdengine-data-{w}"))
                .spawn(move || {
                    let mut b = start + w;
                    while b < total && !stop.load(Ordering::Relaxed) {
                        let r = job.build(b);
                        let failed = r.is_err();
                        if tx.send(r).is_err() || failed {
                            break;
                        }
                        b += n;
                    }
                })
                .map_err(|e| DataError::Invalid(format!("cannot start a loader thread: {e}")))?;
            receivers.push(rx);
            handles.push(h);
        }
        Ok(EpochLoader {
            receivers,
            handles,
            stop,
            next: start,
            start,
            total,
            failed: false,
        })
    }

    /// Batches in this epoch.
    pub fn len(&self) -> usize {
        self.total
    }

    /// True when the epoch has no batch (fewer samples than one batch with `drop_last`).
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Index (in the epoch) of the batch the next call to `next` returns.
    pub fn position(&self) -> usize {
        self.next
    }
}

impl Iterator for EpochLoader {
    type Item = DataResult<Batch>;

    fn next(&mut self) -> Option<DataResult<Batch>> {
        if self.next >= self.total || self.failed {
            return None;
        }
        let n = self.receivers.len();
        let r = match self.receivers[(self.next - self.start) % n].recv() {
            Ok(r) => r,
            Err(_) => Err(DataError::Invalid(
                "a loader thread stopped unexpectedly".into(),
            )),
        };
        self.failed = r.is_err();
        self.next += 1;
        Some(r)
    }
}

impl Drop for EpochLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers unblocks workers waiting on a full queue.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The labelled loader of the official code: an endless `cycle()` over epochs of its own
/// (`set_epoch(0, 1, 2, ...)`, independent of the unlabelled epoch).
pub struct CyclingLoader {
    dataset: Arc<Dataset>,
    kind: BatchKind,
    cfg: LoaderConfig,
    epoch: u64,
    current: Option<EpochLoader>,
    bad: Arc<BadInput>,
}

impl CyclingLoader {
    /// Starts at `start_epoch` (0 in the official code, also after a resume).
    pub fn new(
        dataset: Arc<Dataset>,
        kind: BatchKind,
        cfg: LoaderConfig,
        start_epoch: u64,
        bad: Arc<BadInput>,
    ) -> DataResult<CyclingLoader> {
        cfg.check()?;
        let per_rank = dataset.samples.len().div_ceil(cfg.world);
        if per_rank < cfg.batch_size && cfg.drop_last {
            return Err(DataError::Invalid(format!(
                "the labelled set has {} samples per rank, fewer than one batch of {}",
                per_rank, cfg.batch_size
            )));
        }
        Ok(CyclingLoader {
            dataset,
            kind,
            cfg,
            epoch: start_epoch,
            current: None,
            bad,
        })
    }

    /// The epoch of the batches being returned.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Where the next batch comes from: (labelled epoch, batch index in it). A checkpoint stores
    /// it and [`CyclingLoader::seek`] returns there.
    pub fn position(&self) -> (u64, usize) {
        (
            self.epoch,
            self.current.as_ref().map_or(0, |l| l.position()),
        )
    }

    /// Continues from a position saved with [`CyclingLoader::position`].
    pub fn seek(&mut self, epoch: u64, batch: usize) -> DataResult<()> {
        self.epoch = epoch;
        self.current = Some(EpochLoader::starting_at(
            Arc::clone(&self.dataset),
            self.kind.clone(),
            self.cfg.clone(),
            epoch,
            Arc::clone(&self.bad),
            batch,
        )?);
        Ok(())
    }

    /// The next batch; never ends, except on an error.
    pub fn next_batch(&mut self) -> DataResult<Batch> {
        for _ in 0..2 {
            if self.current.is_none() {
                self.current = Some(EpochLoader::new(
                    Arc::clone(&self.dataset),
                    self.kind.clone(),
                    self.cfg.clone(),
                    self.epoch,
                    Arc::clone(&self.bad),
                )?);
            }
            if let Some(b) = self.current.as_mut().and_then(|l| l.next()) {
                return b;
            }
            self.current = None;
            self.epoch += 1;
        }
        Err(DataError::Invalid(
            "the labelled loader produced no batch".into(),
        ))
    }
}

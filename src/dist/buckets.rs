//! Bucketed gradient all-reduce, planned so that communication overlaps the backward pass.
//!
//! The backward produces gradients roughly in the reverse order of the parameters' registration
//! (the last layer's first). Reducing each gradient alone costs one collective launch per
//! tensor (ResNet-50 has 161 parameter tensors, many tiny BN vectors); reducing all of them
//! after the backward hides nothing. So, as PyTorch DDP does, the parameters are grouped into
//! buckets of about 25 MB in reverse registration order, the first bucket kept small (1 MB) so
//! that communication starts early; each gradient is copied into its bucket's flat buffer when
//! the backward reports it final (its ready flag), and a bucket is reduced as soon as all of its
//! gradients are ready, while the backward continues with earlier layers.
//!
//! Buckets are always reduced in bucket order, whatever order the gradients arrive in: every
//! rank must issue the same collectives in the same order, and gradient readiness may differ
//! between ranks. Two ways to reduce: [`GradBuckets::mark_ready`] reduces on the calling thread
//! (synchronous), [`GradBuckets::mark_ready_async`] submits the bucket's buffer to a
//! [`CommWorker`] and returns at once, the buffer coming back in
//! [`GradBuckets::finish_async`]. The overlapped backward of the trainer is
//! [`overlapped_backward`](super::overlap::overlapped_backward); on the GPU the same plan
//! drives NCCL calls on a communication stream that waits on an event recorded after the
//! bucket's last gradient kernel. [`GradBuckets`] is generic over [`Communicator`], so the logic
//! is tested on the CPU with [`super::LocalGroup`].
//!
//! Parameters that never receive a gradient (unused heads, a branch not taken): the
//! synchronous [`GradBuckets::finish`] reports them as an error naming them; the overlapped
//! path ([`GradBuckets::finish_async`]) reduces their gradient as it stands in the store (zero
//! unless something wrote it), as DDP with `find_unused_parameters=True` does, so that every
//! rank issues the same collectives and the result equals a plain all-reduce of every gradient.

use super::overlap::{CommWorker, Handle};
use super::Communicator;
use crate::error::{Error, Result};
use crate::nn::{ParamId, ParamStore};
use half::bf16;

/// The element type gradients travel in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradDtype {
    /// Full precision (DDP's default).
    F32,
    /// Rounded to bf16 before the all-reduce, half the bytes (DDP's bf16 compression hook).
    Bf16,
}

impl GradDtype {
    /// Bytes per element on the wire.
    pub fn bytes(self) -> usize {
        match self {
            GradDtype::F32 => 4,
            GradDtype::Bf16 => 2,
        }
    }
}

/// Bucket sizes and wire type.
#[derive(Clone, Copy, Debug)]
pub struct BucketConfig {
    /// Largest bucket in bytes on the wire (DDP's `bucket_cap_mb = 25`, i.e. 25 MiB).
    pub cap_bytes: usize,
    /// Cap of the first bucket (the last parameters, ready first): small, so that the first
    /// all-reduce starts early in the backward (DDP: 1 MiB).
    pub first_cap_bytes: usize,
    /// Element type of the reduction.
    pub dtype: GradDtype,
}

impl Default for BucketConfig {
    /// DDP's defaults: 1 MiB first bucket, then 25 MiB, f32.
    fn default() -> Self {
        BucketConfig {
            cap_bytes: 25 << 20,
            first_cap_bytes: 1 << 20,
            dtype: GradDtype::F32,
        }
    }
}

/// One bucket of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Parameter indices (registration order numbering), in the order they fill the bucket:
    /// reverse registration order.
    pub params: Vec<usize>,
    /// Offset of each parameter's gradient in the bucket's flat buffer.
    pub offsets: Vec<usize>,
    /// Total elements in the bucket.
    pub len: usize,
}

/// The bucket plan and the per-step state of a bucketed gradient all-reduce (averaging over
/// the ranks). Use: [`GradBuckets::plan`] (or [`GradBuckets::for_store`]) once; per step call
/// [`GradBuckets::mark_ready`] for each gradient as the backward produces it, then
/// [`GradBuckets::finish`], read the averaged gradients with [`GradBuckets::grad`], and
/// [`GradBuckets::reset`] before the next step. The overlapped form replaces `mark_ready` /
/// `finish` by [`GradBuckets::mark_ready_async`] / [`GradBuckets::finish_async`] and writes the
/// result back with [`GradBuckets::write_back`].
pub struct GradBuckets {
    names: Vec<String>,
    sizes: Vec<usize>,
    buckets: Vec<Bucket>,
    /// (bucket, offset) of each parameter.
    place: Vec<(usize, usize)>,
    /// Flat buffers, one per bucket; empty while the bucket is in flight on a worker.
    bufs: Vec<Vec<f32>>,
    /// Reductions in flight on a worker, per bucket.
    inflight: Vec<Option<Handle>>,
    ready: Vec<bool>,
    pending: Vec<usize>,
    next: usize,
    dtype: GradDtype,
    /// Store ids of the planned parameters (empty for a plan made from names and sizes).
    ids: Vec<ParamId>,
    /// Plan index of each store entry (`None`: not planned), indexed by `ParamId.0`.
    lookup: Vec<Option<usize>>,
}

impl GradBuckets {
    /// Plans buckets for parameters given as (name, element count) in registration (forward)
    /// order. A parameter larger than the cap gets a bucket of its own.
    pub fn plan(params: &[(String, usize)], cfg: &BucketConfig) -> Result<Self> {
        if cfg.cap_bytes == 0 || cfg.first_cap_bytes == 0 {
            return Err(Error::invalid(
                "GradBuckets::plan",
                "bucket caps must be positive byte counts",
            ));
        }
        let elem = cfg.dtype.bytes();
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut place = vec![(0usize, 0usize); params.len()];
        let mut cur = Bucket {
            params: Vec::new(),
            offsets: Vec::new(),
            len: 0,
        };
        for (i, (_, n)) in params.iter().enumerate().rev() {
            let cap = if buckets.is_empty() {
                cfg.first_cap_bytes
            } else {
                cfg.cap_bytes
            };
            if !cur.params.is_empty() && (cur.len + n) * elem > cap {
                buckets.push(std::mem::replace(
                    &mut cur,
                    Bucket {
                        params: Vec::new(),
                        offsets: Vec::new(),
                        len: 0,
                    },
                ));
            }
            place[i] = (buckets.len(), cur.len);
            cur.params.push(i);
            cur.offsets.push(cur.len);
            cur.len += n;
        }
        if !cur.params.is_empty() {
            buckets.push(cur);
        }
        let bufs = buckets.iter().map(|b| vec![0.0f32; b.len]).collect();
        let pending = buckets.iter().map(|b| b.params.len()).collect();
        let inflight = buckets.iter().map(|_| None).collect();
        Ok(GradBuckets {
            names: params.iter().map(|(s, _)| s.clone()).collect(),
            sizes: params.iter().map(|(_, n)| *n).collect(),
            buckets,
            place,
            bufs,
            inflight,
            ready: vec![false; params.len()],
            pending,
            next: 0,
            dtype: cfg.dtype,
            ids: Vec::new(),
            lookup: Vec::new(),
        })
    }

    /// Plans buckets for the trainable parameters of `store` (registration order), remembering
    /// their ids so that the backward's hook can report them by [`ParamId`].
    pub fn for_store(store: &ParamStore, cfg: &BucketConfig) -> Result<Self> {
        let ids = store.trainable();
        let params: Vec<(String, usize)> = ids
            .iter()
            .map(|&id| (store.entry(id).name.clone(), store.value(id).numel()))
            .collect();
        let mut g = Self::plan(&params, cfg)?;
        g.lookup = vec![None; store.len()];
        for (i, id) in ids.iter().enumerate() {
            g.lookup[id.0] = Some(i);
        }
        g.ids = ids;
        Ok(g)
    }

    /// True when this plan was made by [`GradBuckets::for_store`] for a store with the same
    /// trainable parameters, of the same sizes, as `store` now has (else plan again).
    pub fn matches(&self, store: &ParamStore) -> bool {
        self.lookup.len() == store.len()
            && self.ids == store.trainable()
            && self
                .ids
                .iter()
                .zip(&self.sizes)
                .all(|(&id, &n)| store.value(id).numel() == n)
    }

    /// The plan index of store entry `id` (None when it is not planned: a buffer or a frozen
    /// parameter).
    pub fn index_of(&self, id: ParamId) -> Option<usize> {
        self.lookup.get(id.0).copied().flatten()
    }

    /// The plan, in reduction order.
    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Number of buckets already reduced this step (submitted, on the overlapped path).
    pub fn reduced(&self) -> usize {
        self.next
    }

    /// Records parameter `param`'s local gradient and reduces every bucket that is now
    /// complete and next in order. Returns the indices of the buckets reduced by this call.
    pub fn mark_ready(
        &mut self,
        param: usize,
        grad: &[f32],
        comm: &dyn Communicator,
    ) -> Result<Vec<usize>> {
        self.record(param, grad)?;
        let mut done = Vec::new();
        while self.next < self.buckets.len() && self.pending[self.next] == 0 {
            self.reduce_bucket(self.next, comm)?;
            done.push(self.next);
            self.next += 1;
        }
        Ok(done)
    }

    /// As [`GradBuckets::mark_ready`], but every bucket that is complete and next in order is
    /// submitted to `worker` instead of reduced here: the call returns at once, the reduction
    /// runs on the worker's thread, and [`GradBuckets::finish_async`] collects it. Returns the
    /// indices of the buckets submitted by this call.
    pub fn mark_ready_async(
        &mut self,
        param: usize,
        grad: &[f32],
        worker: &CommWorker<'_>,
    ) -> Result<Vec<usize>> {
        self.record(param, grad)?;
        Ok(self.submit_complete(worker))
    }

    /// Checks `param` and copies its gradient into its bucket.
    fn record(&mut self, param: usize, grad: &[f32]) -> Result<()> {
        let name = self.names.get(param).ok_or_else(|| {
            Error::invalid(
                "GradBuckets::mark_ready",
                format!(
                    "parameter index {param} is not in the plan of {} parameters",
                    self.names.len()
                ),
            )
        })?;
        if grad.len() != self.sizes[param] {
            return Err(Error::shape(
                "GradBuckets::mark_ready",
                format!(
                    "{name}: gradient has {} elements, the parameter {}",
                    grad.len(),
                    self.sizes[param]
                ),
            ));
        }
        if self.ready[param] {
            return Err(Error::invalid(
                "GradBuckets::mark_ready",
                format!(
                    "{name}: gradient marked ready twice in one step (call reset between steps)"
                ),
            ));
        }
        let (b, off) = self.place[param];
        let dst = self.bufs[b].get_mut(off..off + grad.len()).ok_or_else(|| {
            Error::invalid(
                "GradBuckets::mark_ready",
                format!("{name}: its bucket {b} was already submitted this step"),
            )
        })?;
        dst.copy_from_slice(grad);
        self.ready[param] = true;
        self.pending[b] -= 1;
        Ok(())
    }

    /// Submits every bucket that is complete and next in order; returns their indices.
    fn submit_complete(&mut self, worker: &CommWorker<'_>) -> Vec<usize> {
        let mut done = Vec::new();
        while self.next < self.buckets.len() && self.pending[self.next] == 0 {
            let b = self.next;
            let buf = std::mem::take(&mut self.bufs[b]);
            self.inflight[b] = Some(match self.dtype {
                GradDtype::F32 => worker.submit_all_reduce_mean(buf),
                GradDtype::Bf16 => worker.submit_all_reduce_mean_bf16(buf),
            });
            done.push(b);
            self.next += 1;
        }
        done
    }

    /// Ends an overlapped step: every planned parameter not reported ready takes its gradient
    /// from `store` as it stands (DDP's `find_unused_parameters`: zero unless written), the
    /// remaining buckets are submitted, and every bucket's reduction is awaited in order.
    /// Returns the plan indices of the parameters that were not reported. On error (the first
    /// failed reduction's), the buckets still in flight are awaited too, so that the next step
    /// starts clean.
    pub fn finish_async(
        &mut self,
        store: &ParamStore,
        worker: &CommWorker<'_>,
    ) -> Result<Vec<usize>> {
        if self.ids.len() != self.names.len() {
            return Err(Error::invalid(
                "GradBuckets::finish_async",
                "the plan was not made with GradBuckets::for_store, so it cannot read the store",
            ));
        }
        let unready: Vec<usize> = (0..self.names.len()).filter(|&p| !self.ready[p]).collect();
        for &p in &unready {
            let g = store.grad(self.ids[p]);
            self.record(p, g.data())?;
        }
        self.submit_complete(worker);
        let mut first_err = None;
        for b in 0..self.buckets.len() {
            let Some(h) = self.inflight[b].take() else {
                continue;
            };
            match h.wait() {
                Ok(v) if v.len() == self.buckets[b].len => self.bufs[b] = v,
                Ok(v) => {
                    first_err.get_or_insert(Error::shape(
                        "GradBuckets::finish_async",
                        format!(
                            "bucket {b} came back with {} values, expected {}",
                            v.len(),
                            self.buckets[b].len
                        ),
                    ));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(unready),
        }
    }

    /// Copies the (reduced) gradient of every planned parameter into `store`'s gradients.
    pub fn write_back(&self, store: &mut ParamStore) -> Result<()> {
        if self.ids.len() != self.names.len() {
            return Err(Error::invalid(
                "GradBuckets::write_back",
                "the plan was not made with GradBuckets::for_store",
            ));
        }
        for (p, &id) in self.ids.iter().enumerate() {
            let src = self.grad(p);
            let e = store.entry_mut(id);
            if src.len() != e.grad.numel() {
                return Err(Error::shape(
                    "GradBuckets::write_back",
                    format!(
                        "{}: {} reduced values for a gradient of {} (bucket not reduced?)",
                        e.name,
                        src.len(),
                        e.grad.numel()
                    ),
                ));
            }
            e.grad.data_mut().copy_from_slice(src);
        }
        Ok(())
    }

    fn reduce_bucket(&mut self, b: usize, comm: &dyn Communicator) -> Result<()> {
        let buf = &mut self.bufs[b];
        match self.dtype {
            GradDtype::F32 => comm.all_reduce_mean_f32(buf),
            GradDtype::Bf16 => {
                let mut h: Vec<bf16> = buf.iter().map(|&v| bf16::from_f32(v)).collect();
                comm.all_reduce_mean_bf16(&mut h)?;
                for (d, s) in buf.iter_mut().zip(h) {
                    *d = s.to_f32();
                }
                Ok(())
            }
        }
    }

    /// Ends the step: every gradient must have been marked ready (an unused parameter would
    /// otherwise leave its bucket, and every later one, unreduced on this rank only and hang
    /// the others, so it is an error naming the parameters).
    pub fn finish(&mut self) -> Result<()> {
        if self.next == self.buckets.len() {
            return Ok(());
        }
        let missing: Vec<&str> = self
            .ready
            .iter()
            .enumerate()
            .filter(|(_, r)| !**r)
            .map(|(i, _)| self.names[i].as_str())
            .take(8)
            .collect();
        Err(Error::invalid(
            "GradBuckets::finish",
            format!(
                "{} of {} buckets reduced; no gradient for: {}; every parameter must receive a \
                 gradient each step (mark unused ones ready with zeros)",
                self.next,
                self.buckets.len(),
                missing.join(", ")
            ),
        ))
    }

    /// The gradient of `param` as it stands in its bucket: the rank average once its bucket
    /// has been reduced (empty while its bucket is in flight on a worker, or for an index
    /// outside the plan).
    pub fn grad(&self, param: usize) -> &[f32] {
        let Some(&(b, off)) = self.place.get(param) else {
            return &[];
        };
        self.bufs[b]
            .get(off..off + self.sizes[param])
            .unwrap_or(&[])
    }

    /// Clears the ready flags for the next step (the buffers are overwritten by the next
    /// gradients). A buffer lost with a failed step (it was in flight) is allocated again.
    pub fn reset(&mut self) {
        self.ready.iter_mut().for_each(|r| *r = false);
        for (p, b) in self.pending.iter_mut().zip(&self.buckets) {
            *p = b.params.len();
        }
        for ((buf, b), h) in self
            .bufs
            .iter_mut()
            .zip(&self.buckets)
            .zip(&mut self.inflight)
        {
            *h = None;
            if buf.len() != b.len {
                *buf = vec![0.0; b.len];
            }
        }
        self.next = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{LocalGroup, SingleProcess};

    fn params(sizes: &[usize]) -> Vec<(String, usize)> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("p{i}"), n))
            .collect()
    }

    fn cfg(first: usize, cap: usize) -> BucketConfig {
        BucketConfig {
            cap_bytes: cap,
            first_cap_bytes: first,
            dtype: GradDtype::F32,
        }
    }

    #[test]
    fn plan_fills_in_reverse_order_with_caps() {
        // Bytes: 40, 8, 400 (alone: larger than the cap), 12, 4, 4 → reverse order.
        let g = GradBuckets::plan(&params(&[10, 2, 100, 3, 1, 1]), &cfg(8, 48)).unwrap();
        let ps: Vec<Vec<usize>> = g.buckets().iter().map(|b| b.params.clone()).collect();
        assert_eq!(ps, vec![vec![5, 4], vec![3], vec![2], vec![1, 0]]);
        assert_eq!(g.buckets()[3].offsets, vec![0, 2]);
        assert_eq!(g.buckets()[3].len, 12);
    }

    #[test]
    fn buckets_reduce_in_order_when_complete() {
        let sizes = [3usize, 2, 4];
        let ranks = LocalGroup::new(2).unwrap();
        type RankOut = (Vec<Vec<usize>>, Vec<Vec<f32>>);
        let out: Vec<RankOut> = std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        // Caps of 16 bytes: buckets [p2], [p1], [p0].
                        let mut g = GradBuckets::plan(&params(&sizes), &cfg(16, 16)).unwrap();
                        let r = c.rank() as f32;
                        let grad = |p: usize| -> Vec<f32> {
                            (0..sizes[p])
                                .map(|i| r * 10.0 + p as f32 + i as f32)
                                .collect()
                        };
                        // p1 first: bucket 1 is complete but bucket 0 (p2) is not, so nothing
                        // is reduced yet; p2 then releases buckets 0 and 1 together.
                        let mut log = vec![g.mark_ready(1, &grad(1), c).unwrap()];
                        log.push(g.mark_ready(2, &grad(2), c).unwrap());
                        log.push(g.mark_ready(0, &grad(0), c).unwrap());
                        g.finish().unwrap();
                        let grads = (0..3).map(|p| g.grad(p).to_vec()).collect();
                        (log, grads)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (log, grads) in out {
            assert_eq!(log, vec![vec![], vec![0, 1], vec![2]]);
            for (p, g) in grads.iter().enumerate() {
                // Mean of rank 0 (p + i) and rank 1 (10 + p + i).
                let want: Vec<f32> = (0..sizes[p]).map(|i| 5.0 + p as f32 + i as f32).collect();
                assert_eq!(g, &want);
            }
        }
    }

    #[test]
    fn missing_and_bad_gradients_are_errors() {
        let mut g = GradBuckets::plan(&params(&[2, 2]), &BucketConfig::default()).unwrap();
        assert!(g.mark_ready(0, &[1.0], &SingleProcess).is_err());
        assert!(g.mark_ready(7, &[1.0], &SingleProcess).is_err());
        g.mark_ready(0, &[1.0, 2.0], &SingleProcess).unwrap();
        assert!(g.mark_ready(0, &[1.0, 2.0], &SingleProcess).is_err());
        let e = g.finish().unwrap_err().to_string();
        assert!(e.contains("no gradient for: p1"), "{e}");
        g.reset();
        assert!(g
            .mark_ready(1, &[3.0, 4.0], &SingleProcess)
            .unwrap()
            .is_empty());
        assert_eq!(
            g.mark_ready(0, &[1.0, 2.0], &SingleProcess).unwrap(),
            vec![0]
        );
        g.finish().unwrap();
        assert_eq!(g.grad(1), &[3.0, 4.0]);
    }

    #[test]
    fn bf16_buckets_round_gradients() {
        let cfg = BucketConfig {
            dtype: GradDtype::Bf16,
            ..BucketConfig::default()
        };
        let mut g = GradBuckets::plan(&params(&[1]), &cfg).unwrap();
        g.mark_ready(0, &[1.0 + 1.0 / 1024.0], &SingleProcess)
            .unwrap();
        assert_eq!(g.grad(0), &[1.0]);
    }
}

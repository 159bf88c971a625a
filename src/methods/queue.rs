//! Suave's per-rank feature queue (spec §1.4, main L471–477, L616–625): past L2-normalised
//! embeddings of the assigned (global) views, so that Sinkhorn equipartitions over more samples
//! than one small per-GPU batch holds.
//!
//! Shape `[crops, len, dim]` (2 × 480 × 128 with the scripts), zero-initialised. Row 0 is the
//! newest. It becomes *active* once the last row of a crop is non-zero, i.e. after `len / bs`
//! pushes; the caller builds this step's scores (`queue·Cᵀ` prepended to the batch) from the
//! queue *before* pushing the current batch, as the official code does.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The queue of one rank.
#[derive(Clone, Debug, PartialEq)]
pub struct Queue {
    crops: usize,
    len: usize,
    dim: usize,
    data: Vec<f32>,
}

impl Queue {
    /// Rows per rank for the official `--queue_length`: rounded down to a multiple of
    /// `bs·world` (so that every push moves whole global batches), then split over the ranks.
    pub fn rows_per_rank(queue_length: usize, bs: usize, world: usize) -> usize {
        let step = bs * world;
        if step == 0 {
            return 0;
        }
        (queue_length - queue_length % step) / world
    }

    /// A zero queue of `crops` crops, `len` rows of `dim` features. Errors for a zero size.
    pub fn new(crops: usize, len: usize, dim: usize) -> Result<Self> {
        if crops == 0 || len == 0 || dim == 0 {
            return Err(Error::invalid(
                "Queue::new",
                format!("queue shape [{crops}, {len}, {dim}] has a zero dimension"),
            ));
        }
        Ok(Queue {
            crops,
            len,
            dim,
            data: vec![0.0; crops * len * dim],
        })
    }

    /// `[crops, len, dim]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.crops, self.len, self.dim]
    }

    fn check_crop(&self, op: &'static str, crop: usize) -> Result<()> {
        if crop >= self.crops {
            return Err(Error::invalid(
                op,
                format!(
                    "crop {crop} out of range for a queue of {} crops",
                    self.crops
                ),
            ));
        }
        Ok(())
    }

    /// The rows of one crop as a `[len, dim]` tensor (to be multiplied by the prototypes).
    pub fn crop(&self, crop: usize) -> Result<Tensor<f32>> {
        self.check_crop("Queue::crop", crop)?;
        let n = self.len * self.dim;
        Tensor::from_vec(
            self.data[crop * n..(crop + 1) * n].to_vec(),
            &[self.len, self.dim],
        )
    }

    /// Whether the crop's last row is non-zero: the official test for using the queue.
    pub fn is_active(&self, crop: usize) -> Result<bool> {
        self.check_crop("Queue::is_active", crop)?;
        let end = (crop + 1) * self.len * self.dim;
        Ok(self.data[end - self.dim..end].iter().any(|&v| v != 0.0))
    }

    /// Shifts the crop's rows down by `bs` (the oldest `bs` rows fall off) and writes the
    /// embeddings `[bs, dim]` at the front: `queue[i, bs:] = queue[i, :-bs]; queue[i, :bs] = e`.
    pub fn push(&mut self, crop: usize, embeddings: &Tensor<f32>) -> Result<()> {
        const OP: &str = "Queue::push";
        self.check_crop(OP, crop)?;
        embeddings.expect_rank(OP, "embeddings", 2)?;
        let (bs, d) = (embeddings.shape()[0], embeddings.shape()[1]);
        if d != self.dim || bs > self.len {
            return Err(Error::shape(
                OP,
                format!(
                    "embeddings {:?} do not fit a queue of {} rows of {} features",
                    embeddings.shape(),
                    self.len,
                    self.dim
                ),
            ));
        }
        let n = self.len * self.dim;
        let q = &mut self.data[crop * n..(crop + 1) * n];
        q.copy_within(0..n - bs * d, bs * d);
        q[..bs * d].copy_from_slice(embeddings.data());
        Ok(())
    }

    /// The whole state `[crops, len, dim]`, for checkpoints (`queue{rank}` in the official runs).
    pub fn to_tensor(&self) -> Tensor<f32> {
        Tensor::from_vec(self.data.clone(), &self.shape()).expect("queue shape matches its data")
    }

    /// Restores a queue from a checkpoint tensor `[crops, len, dim]`.
    pub fn from_tensor(t: &Tensor<f32>) -> Result<Self> {
        t.expect_rank("Queue::from_tensor", "queue", 3)?;
        let s = t.shape();
        let mut q = Queue::new(s[0], s[1], s[2])?;
        q.data.copy_from_slice(t.data());
        Ok(q)
    }
}

//! Cross-rank communication. Every computation that spans ranks (Sinkhorn's total and row sums,
//! DINO's centre, later SyncBN and gradient all-reduce) goes through a [`Communicator`], so that
//! the method code is written once and runs unchanged on one process, on in-process ranks
//! ([`LocalGroup`], used by the tests to show that N ranks equal one rank on the concatenated
//! batch) and, later, on NCCL.

use crate::error::{Error, Result};
use std::sync::{Arc, Barrier, Mutex};

/// The collective operations the methods need. All calls are collective: every rank of the
/// group must make the same calls in the same order with buffers of the same length.
pub trait Communicator: Send + Sync {
    /// This process's rank in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// In-place element-wise sum over all ranks; every rank receives the same result.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// In-place element-wise sum over all ranks, in f64 (host-side statistics).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// A group of one: rank 0 of 1, every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// State shared by the ranks of a [`LocalGroup`]: one slot per rank and a barrier.
struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f64>>>,
}

/// One rank of an in-process group: N ranks run on N threads and reduce through shared memory.
///
/// An all-reduce writes this rank's buffer into its slot, waits for every rank, sums the slots
/// in rank order (so every rank gets bit-identical results, independent of thread timing), and
/// waits again before anyone may overwrite a slot. Meant for tests and for single-machine
/// simulation of multi-GPU semantics, not for speed.
pub struct LocalGroup {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// `world` connected ranks; move each one into its own thread. Errors for `world == 0`.
    pub fn new(world: usize) -> Result<Vec<LocalGroup>> {
        if world == 0 {
            return Err(Error::invalid(
                "LocalGroup::new",
                "a group needs at least one rank",
            ));
        }
        let shared = Arc::new(Shared {
            barrier: Barrier::new(world),
            slots: Mutex::new(vec![Vec::new(); world]),
        });
        Ok((0..world)
            .map(|rank| LocalGroup {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<Vec<f64>>>> {
        self.shared
            .slots
            .lock()
            .map_err(|_| Error::invalid("LocalGroup", "another rank panicked during a collective"))
    }

    /// Sums `vals` over the ranks (in f64, rank order) and returns the sums.
    fn reduce(&self, vals: Vec<f64>) -> Result<Vec<f64>> {
        let n = vals.len();
        self.lock()?[self.rank] = vals;
        self.shared.barrier.wait();
        let out = {
            let slots = self.lock()?;
            if let Some((r, s)) = slots.iter().enumerate().find(|(_, s)| s.len() != n) {
                return Err(Error::shape(
                    "LocalGroup::all_reduce",
                    format!(
                        "rank {} sent {} values, rank {r} sent {}",
                        self.rank,
                        n,
                        s.len()
                    ),
                ));
            }
            let mut acc = vec![0.0f64; n];
            for s in slots.iter() {
                for (a, v) in acc.iter_mut().zip(s) {
                    *a += v;
                }
            }
            acc
        };
        self.shared.barrier.wait();
        Ok(out)
    }
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let sums = self.reduce(buf.iter().map(|&v| v as f64).collect())?;
        for (b, s) in buf.iter_mut().zip(sums) {
            *b = s as f32;
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let sums = self.reduce(buf.to_vec())?;
        buf.copy_from_slice(&sums);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
}

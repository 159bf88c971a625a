//! Cross-rank communication. Every computation that spans ranks (Sinkhorn's total and row sums,
//! DINO's centre, SyncBN statistics and the gradient all-reduce) goes through a [`Communicator`],
//! so that the method code is written once and runs unchanged on one process
//! ([`SingleProcess`]), on in-process ranks ([`LocalGroup`], used by the tests to show that N
//! ranks equal one rank on the concatenated batch), on CPU processes over TCP
//! ([`tcp::TcpGroup`]) and on GPUs through NCCL ([`nccl::NcclGroup`]).
//!
//! Around the communicators sit the pieces a multi-process run needs: the rank environment
//! (torchrun or Slurm variables, [`env::DistEnv`]), the process launcher ([`launch`]), the
//! Slurm batch script writer ([`slurm`]), the gradient bucket planner
//! ([`buckets::GradBuckets`]) and the communication worker with the backward's grad-ready hook
//! that together let the gradient all-reduce overlap the backward pass ([`overlap`]).
//!
//! Determinism: the host-side groups ([`LocalGroup`], [`tcp::TcpGroup`]) reduce in f64 in rank
//! order and round once, so that the same inputs give bit-identical results whichever group
//! carries them and however the threads or processes are scheduled.

pub mod buckets;
pub mod env;
pub mod launch;
pub mod nccl;
pub mod overlap;
pub mod slurm;
pub mod tcp;

use crate::error::{Error, Result};
use half::bf16;
use std::sync::{Arc, Condvar, Mutex};

/// How an all-reduce combines the ranks' buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise sum divided by the number of ranks (gradient averaging, as DDP does).
    Mean,
}

/// The collective operations the engine needs. All calls are collective: every rank of the
/// group must make the same calls in the same order with buffers of the same length, or the
/// group reports an error (it never silently mixes two different calls).
///
/// Implementors provide the typed all-reduces, a byte broadcast and a byte all-gather; the
/// typed broadcasts and gathers are provided on top of the byte forms (implementors may
/// override them, e.g. NCCL avoids the conversion).
pub trait Communicator: Send + Sync {
    /// This process's rank in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// In-place element-wise reduction of f32 values over all ranks; every rank receives the
    /// same result.
    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    /// In-place element-wise reduction of f64 values (host-side statistics).
    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()>;
    /// In-place element-wise reduction of bf16 values (compressed gradients). Host groups
    /// accumulate in f64 and round once; NCCL rounds after each step of its ring.
    fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()>;
    /// Every rank's `buf` receives the contents of rank `root`'s `buf`.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// `recv` (of length `world_size() * send.len()`) receives every rank's `send`, in rank
    /// order.
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// In-place element-wise sum over all ranks; every rank receives the same result.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_f32(buf, ReduceOp::Sum)
    }
    /// In-place element-wise mean over all ranks (sum, then divided by the world size).
    fn all_reduce_mean_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_f32(buf, ReduceOp::Mean)
    }
    /// In-place element-wise sum over all ranks, in f64 (host-side statistics).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce_f64(buf, ReduceOp::Sum)
    }
    /// In-place element-wise mean over all ranks, in f64.
    fn all_reduce_mean_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce_f64(buf, ReduceOp::Mean)
    }
    /// In-place element-wise sum of bf16 values over all ranks.
    fn all_reduce_sum_bf16(&self, buf: &mut [bf16]) -> Result<()> {
        self.all_reduce_bf16(buf, ReduceOp::Sum)
    }
    /// In-place element-wise mean of bf16 values over all ranks.
    fn all_reduce_mean_bf16(&self, buf: &mut [bf16]) -> Result<()> {
        self.all_reduce_bf16(buf, ReduceOp::Mean)
    }
    /// Every rank's `buf` receives rank `root`'s values (initial weights, RNG seeds).
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        broadcast_via_bytes(self, buf, root)
    }
    /// Every rank's `buf` receives rank `root`'s f64 values.
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()> {
        broadcast_via_bytes(self, buf, root)
    }
    /// Every rank's `buf` receives rank `root`'s bf16 values.
    fn broadcast_bf16(&self, buf: &mut [bf16], root: usize) -> Result<()> {
        broadcast_via_bytes(self, buf, root)
    }
    /// `recv` (length `world_size() * send.len()`) receives every rank's f32 `send` in rank
    /// order (gathering per-rank embeddings or metrics).
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        gather_via_bytes(self, send, recv)
    }
    /// `recv` receives every rank's f64 `send` in rank order.
    fn all_gather_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        gather_via_bytes(self, send, recv)
    }
    /// `recv` receives every rank's bf16 `send` in rank order.
    fn all_gather_bf16(&self, send: &[bf16], recv: &mut [bf16]) -> Result<()> {
        gather_via_bytes(self, send, recv)
    }
}

/// The element types the host groups move and reduce. Every one converts to f64 exactly, so
/// a reduction can run in f64 and round once; the little-endian byte form is the wire format
/// of [`tcp::TcpGroup`].
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// Tag sent on the wire so that rank 0 can decode and check the element type.
    const DTYPE: u8;
    /// Size in bytes of one element.
    const BYTES: usize;
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
    /// Rounding (to nearest even) from f64.
    fn from_f64(v: f64) -> Self;
    /// Appends the little-endian bytes.
    fn put(self, out: &mut Vec<u8>);
    /// Reads one element from exactly `BYTES` little-endian bytes.
    fn get(b: &[u8]) -> Self;
}

impl Elem for f32 {
    const DTYPE: u8 = 1;
    const BYTES: usize = 4;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Elem for f64 {
    const DTYPE: u8 = 2;
    const BYTES: usize = 8;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        f64::from_le_bytes(a)
    }
}

impl Elem for bf16 {
    const DTYPE: u8 = 3;
    const BYTES: usize = 2;
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bits().to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
}

impl Elem for u8 {
    const DTYPE: u8 = 4;
    const BYTES: usize = 1;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as u8
    }
    fn put(self, out: &mut Vec<u8>) {
        out.push(self);
    }
    fn get(b: &[u8]) -> Self {
        b[0]
    }
}

/// Little-endian bytes of a slice.
pub(crate) fn to_bytes<T: Elem>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * T::BYTES);
    for &x in v {
        x.put(&mut out);
    }
    out
}

/// Decodes little-endian bytes into `out` (`bytes.len() == out.len() * T::BYTES`).
pub(crate) fn from_bytes<T: Elem>(bytes: &[u8], out: &mut [T]) {
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(T::BYTES)) {
        *o = T::get(c);
    }
}

/// The one reduction every host group uses: sum the ranks' values in f64 in rank order
/// (starting from 0.0), divide by the rank count for a mean, and round once to `T`. Sharing it
/// is what makes [`LocalGroup`] and [`tcp::TcpGroup`] bit-identical.
pub(crate) fn combine<T: Elem>(parts: &[Vec<f64>], op: ReduceOp, out: &mut [T]) {
    let world = parts.len() as f64;
    for (i, o) in out.iter_mut().enumerate() {
        let mut acc = 0.0f64;
        for p in parts {
            acc += p[i];
        }
        if op == ReduceOp::Mean {
            acc /= world;
        }
        *o = T::from_f64(acc);
    }
}

fn broadcast_via_bytes<C: Communicator + ?Sized, T: Elem>(
    c: &C,
    buf: &mut [T],
    root: usize,
) -> Result<()> {
    let mut bytes = to_bytes(buf);
    c.broadcast_bytes(&mut bytes, root)?;
    from_bytes(&bytes, buf);
    Ok(())
}

fn gather_via_bytes<C: Communicator + ?Sized, T: Elem>(
    c: &C,
    send: &[T],
    recv: &mut [T],
) -> Result<()> {
    check_gather_len("all_gather", c.world_size(), send.len(), recv.len())?;
    let bytes = to_bytes(send);
    let mut out = vec![0u8; recv.len() * T::BYTES];
    c.all_gather_bytes(&bytes, &mut out)?;
    from_bytes(&out, recv);
    Ok(())
}

/// Checks that an all-gather's receive buffer holds one send buffer per rank.
pub(crate) fn check_gather_len(
    op: &'static str,
    world: usize,
    send: usize,
    recv: usize,
) -> Result<()> {
    if send.checked_mul(world) != Some(recv) {
        return Err(Error::shape(
            op,
            format!(
                "the receive buffer holds {recv} elements, expected world size {world} x send \
                 length {send}"
            ),
        ));
    }
    Ok(())
}

/// Checks that a broadcast's root is a rank of the group.
pub(crate) fn check_root(op: &'static str, root: usize, world: usize) -> Result<()> {
    if root >= world {
        return Err(Error::invalid(
            op,
            format!("root rank {root} is not in the group of {world} ranks (0..{world})"),
        ));
    }
    Ok(())
}

/// A group of one: rank 0 of 1, every collective is the identity (a mean divides by 1).
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _buf: &mut [f32], _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _buf: &mut [f64], _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn all_reduce_bf16(&self, _buf: &mut [bf16], _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        check_root("SingleProcess::broadcast", root, 1)
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_gather_len("SingleProcess::all_gather", 1, send.len(), recv.len())?;
        recv.copy_from_slice(send);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Which collective a rank of a [`LocalGroup`] entered; compared across ranks so that
/// mismatched calls become an error instead of a silent mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Reduce(ReduceOp, u8),
    Broadcast(usize, u8),
    Gather(u8),
}

/// One rank's contribution to a [`LocalGroup`] collective: which call it made and its values.
type Slot = (Option<Kind>, Vec<f64>);

/// State shared by the ranks of a [`LocalGroup`]: one slot per rank and a barrier.
struct Shared {
    barrier: GroupBarrier,
    slots: Mutex<Vec<Slot>>,
}

/// A barrier that a rank leaving the group breaks: `std::sync::Barrier` would leave the other
/// ranks waiting forever when one rank's thread returns an error or panics before a collective
/// the others are in; here the waiting ranks wake with an error naming the rank that left.
struct GroupBarrier {
    world: usize,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

struct BarrierState {
    arrived: usize,
    generation: u64,
    /// The first rank that left the group (dropped its `LocalGroup`).
    left: Option<usize>,
}

impl GroupBarrier {
    fn new(world: usize) -> Self {
        GroupBarrier {
            world,
            state: Mutex::new(BarrierState {
                arrived: 0,
                generation: 0,
                left: None,
            }),
            cv: Condvar::new(),
        }
    }

    fn broken(rank: usize, left: usize) -> Error {
        Error::invalid(
            "LocalGroup",
            format!(
                "rank {left} left the group (its thread ended or failed) while rank {rank} was in a collective"
            ),
        )
    }

    /// Waits until every rank arrived; errors as soon as a rank has left the group.
    fn wait(&self, rank: usize) -> Result<()> {
        let poisoned =
            |_| Error::invalid("LocalGroup", "another rank panicked during a collective");
        let mut st = self.state.lock().map_err(poisoned)?;
        if let Some(l) = st.left {
            return Err(Self::broken(rank, l));
        }
        st.arrived += 1;
        if st.arrived == self.world {
            st.arrived = 0;
            st.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let gen = st.generation;
        while st.generation == gen {
            if let Some(l) = st.left {
                return Err(Self::broken(rank, l));
            }
            st = self.cv.wait(st).map_err(poisoned)?;
        }
        Ok(())
    }

    /// Marks `rank` as gone and wakes every waiting rank.
    fn leave(&self, rank: usize) {
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        st.left.get_or_insert(rank);
        self.cv.notify_all();
    }
}

/// One rank of an in-process group: N ranks run on N threads and reduce through shared memory.
///
/// A collective writes this rank's values into its slot, waits for every rank, computes the
/// result from the slots in rank order (so every rank gets bit-identical results, independent
/// of thread timing), and waits again before anyone may overwrite a slot. Meant for tests and
/// for single-machine simulation of multi-GPU semantics, not for speed.
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
            barrier: GroupBarrier::new(world),
            slots: Mutex::new(vec![(None, Vec::new()); world]),
        });
        Ok((0..world)
            .map(|rank| LocalGroup {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<Slot>>> {
        self.shared
            .slots
            .lock()
            .map_err(|_| Error::invalid("LocalGroup", "another rank panicked during a collective"))
    }

    /// Publishes `vals`, waits for every rank, and returns what `kind` computes from all the
    /// slots. Every rank evaluates the same checks on the same slots, so either all succeed or
    /// all fail, and all pass the second barrier either way.
    fn collective(&self, kind: Kind, vals: Vec<f64>) -> Result<Vec<f64>> {
        self.lock()?[self.rank] = (Some(kind), vals);
        self.shared.barrier.wait(self.rank)?;
        let out = self.lock().and_then(|slots| self.compute(kind, &slots));
        self.shared.barrier.wait(self.rank)?;
        out
    }

    fn compute(&self, kind: Kind, slots: &[Slot]) -> Result<Vec<f64>> {
        let n = slots[0].1.len();
        for (r, (k, v)) in slots.iter().enumerate() {
            if *k != Some(kind) {
                return Err(Error::invalid(
                    "LocalGroup",
                    format!(
                        "collective mismatch: rank 0 called {:?} but rank {r} called {k:?}; every \
                         rank must make the same collective calls in the same order",
                        slots[0].0
                    ),
                ));
            }
            if v.len() != n {
                return Err(Error::shape(
                    "LocalGroup",
                    format!("rank 0 sent {n} values, rank {r} sent {}", v.len()),
                ));
            }
        }
        Ok(match kind {
            Kind::Reduce(op, _) => {
                let parts: Vec<Vec<f64>> = slots.iter().map(|(_, v)| v.clone()).collect();
                let mut out = vec![0.0f64; n];
                combine(&parts, op, &mut out);
                out
            }
            Kind::Broadcast(root, _) => slots[root].1.clone(),
            Kind::Gather(_) => slots.iter().flat_map(|(_, v)| v.iter().copied()).collect(),
        })
    }

    fn reduce<T: Elem>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let vals = buf.iter().map(|v| v.to_f64()).collect();
        let sums = self.collective(Kind::Reduce(op, T::DTYPE), vals)?;
        // `combine` already rounded to T's precision in f64; converting back is exact.
        for (b, s) in buf.iter_mut().zip(sums) {
            *b = T::from_f64(s);
        }
        Ok(())
    }
}

impl Drop for LocalGroup {
    /// A rank that goes away (its thread finished or failed) breaks the group: ranks waiting in
    /// a collective, or entering one later, get an error instead of waiting forever.
    fn drop(&mut self) {
        self.shared.barrier.leave(self.rank);
    }
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.reduce(buf, op)
    }
    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        self.reduce(buf, op)
    }
    fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()> {
        self.reduce(buf, op)
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root("LocalGroup::broadcast", root, self.world)?;
        let vals = buf.iter().map(|&v| v as f64).collect();
        let out = self.collective(Kind::Broadcast(root, u8::DTYPE), vals)?;
        for (b, v) in buf.iter_mut().zip(out) {
            *b = v as u8;
        }
        Ok(())
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_gather_len("LocalGroup::all_gather", self.world, send.len(), recv.len())?;
        let vals = send.iter().map(|&v| v as f64).collect();
        let out = self.collective(Kind::Gather(u8::DTYPE), vals)?;
        for (b, v) in recv.iter_mut().zip(out) {
            *b = v as u8;
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait(self.rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of a fresh LocalGroup, one thread each, and returns the results
    /// in rank order.
    fn on_ranks<R: Send>(world: usize, f: impl Fn(&LocalGroup) -> R + Sync) -> Vec<R> {
        let ranks = LocalGroup::new(world).unwrap();
        std::thread::scope(|s| {
            let hs: Vec<_> = ranks.iter().map(|g| s.spawn(|| f(g))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn a_rank_that_leaves_breaks_the_group_instead_of_hanging_it() {
        let ranks = LocalGroup::new(3).unwrap();
        let errs: Vec<Option<String>> = std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let mut v = vec![g.rank() as f32];
                        // Every rank takes part in the first collective.
                        g.all_reduce_sum_f32(&mut v).unwrap();
                        assert_eq!(v, [3.0]);
                        if g.rank() == 1 {
                            return None; // fails before the second: its group is dropped
                        }
                        g.all_reduce_sum_f32(&mut v).err().map(|e| e.to_string())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errs[1].is_none());
        for r in [0, 2] {
            let e = errs[r].as_deref().unwrap_or("no error");
            assert!(e.contains("rank 1 left the group"), "rank {r}: {e}");
        }
    }

    #[test]
    fn sum_and_mean_f32_in_rank_order() {
        let out = on_ranks(3, |g| {
            let r = g.rank() as f32;
            let mut s = vec![r, 1.0, 0.1 * (r + 1.0)];
            g.all_reduce_sum_f32(&mut s).unwrap();
            let mut m = vec![r, 1.0];
            g.all_reduce_mean_f32(&mut m).unwrap();
            (s, m)
        });
        let part = |r: f32| (0.1 * (r + 1.0)) as f64;
        let want = (0.0f64 + part(0.0) + part(1.0) + part(2.0)) as f32;
        for (s, m) in &out {
            assert_eq!(s, &vec![3.0, 3.0, want]);
            assert_eq!(m, &vec![1.0, 1.0]);
        }
    }

    #[test]
    fn bf16_sum_rounds_once() {
        // 1 + 2^-8 + 2^-8: rounding after each add (bf16 has 8 significant bits) would lose
        // both small terms; one rounding of the exact sum keeps 1 + 2^-7.
        let out = on_ranks(3, |g| {
            let v = if g.rank() == 0 { 1.0 } else { 1.0 / 256.0 };
            let mut b = vec![bf16::from_f32(v)];
            g.all_reduce_sum_bf16(&mut b).unwrap();
            let mut m = vec![bf16::from_f32(3.0 * (g.rank() as f32))];
            g.all_reduce_mean_bf16(&mut m).unwrap();
            (b[0], m[0])
        });
        for (b, m) in out {
            assert_eq!(b.to_f32(), 1.0 + 1.0 / 128.0);
            assert_eq!(m.to_f32(), 3.0);
        }
    }

    #[test]
    fn broadcast_and_gather() {
        let out = on_ranks(3, |g| {
            let r = g.rank();
            let mut b = vec![r as f32; 2];
            g.broadcast_f32(&mut b, 2).unwrap();
            let mut h = vec![bf16::from_f32(r as f32 + 0.5)];
            g.broadcast_bf16(&mut h, 1).unwrap();
            let mut all = vec![0.0f32; 6];
            g.all_gather_f32(&[r as f32, -(r as f32)], &mut all)
                .unwrap();
            g.barrier().unwrap();
            (b, h[0].to_f32(), all)
        });
        for (b, h, all) in out {
            assert_eq!(b, vec![2.0, 2.0]);
            assert_eq!(h, 1.5);
            assert_eq!(all, vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
        }
    }

    #[test]
    fn mismatches_are_errors_on_every_rank() {
        let out = on_ranks(2, |g| {
            let mut v = vec![0.0f32; 1 + g.rank()];
            let len = g.all_reduce_sum_f32(&mut v).map_err(|e| e.to_string());
            let kind = if g.rank() == 0 {
                g.broadcast_f32(&mut [0.0], 0)
            } else {
                g.all_reduce_sum_f32(&mut [0.0])
            }
            .map_err(|e| e.to_string());
            (len, kind)
        });
        for (len, kind) in out {
            assert!(len.unwrap_err().contains("sent 1 values, rank 1 sent 2"));
            assert!(kind.unwrap_err().contains("collective mismatch"));
        }
    }

    #[test]
    fn single_process_is_identity_and_checks_arguments() {
        let g = SingleProcess;
        let mut v = vec![1.5f32, 2.0];
        g.all_reduce_mean_f32(&mut v).unwrap();
        assert_eq!(v, vec![1.5, 2.0]);
        let mut out = vec![0.0f32; 2];
        g.all_gather_f32(&v, &mut out).unwrap();
        assert_eq!(out, v);
        assert!(g.broadcast_f32(&mut v, 1).is_err());
        assert!(g.all_gather_f32(&v, &mut [0.0; 3]).is_err());
    }
}

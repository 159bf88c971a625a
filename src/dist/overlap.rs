//! Overlapping the gradient all-reduce with the backward pass on the CPU: a communication
//! worker (the CPU's "comm stream"), the grad-ready hook the models' backward passes call, and
//! the driver that ties them to [`GradBuckets`].
//!
//! **The worker.** [`CommWorker`] is one thread that owns this rank's collectives and runs them
//! strictly in submission order. Everything that talks to the group while the backward runs goes
//! through its queue: the gradient buckets ([`CommWorker::submit_all_reduce_mean`], which
//! returns at once with a [`Handle`]) and SyncBN's blocking reductions (the worker implements
//! [`Communicator`]: a blocking call is submit + wait, so the models use it unchanged). One
//! ordered queue is what keeps the ranks in step: every rank submits the same collectives in the
//! same order, and no two threads ever talk on one [`TcpGroup`](super::tcp::TcpGroup) at once
//! (their messages would interleave). On the GPU the same roles are played by an NCCL stream and
//! CUDA events: a bucket's all-reduce is enqueued on the communication stream after an event
//! recorded behind its last gradient kernel, and the optimiser waits on the stream's final event.
//!
//! Faults: an error of a collective comes back, with the group's own message, to whoever waits
//! on it; from then on the worker is broken and answers every later request at once with an
//! error that quotes the first one (as a broken `TcpGroup` does), so no rank waits on a queue
//! that will never move. Dropping the worker cancels the requests not yet started (an error is
//! being returned anyway) and joins the thread once the running collective has ended (the
//! groups' own timeouts bound that).
//!
//! **The hook.** The hand-written backward passes call [`GradReady::ready`] with the parameters
//! whose gradients are final: after each residual / transformer block of the *last* pass of a
//! backbone that runs once per crop resolution (earlier passes still add to every gradient, as
//! PyTorch DDP fires its hook only once all uses are accumulated), after each layer of the
//! heads (which run once), and for the stem / token embedding last. [`NoGradSink`] ignores the
//! calls (the plain backward).
//!
//! **The driver.** [`overlapped_backward`] spawns the worker for one backward, hands the
//! backward the worker (as its communicator) and a [`BucketSink`] (as its hook), so each
//! complete bucket is all-reduced while the backward goes on with earlier layers; then it
//! completes the buckets of any parameter that was never reported (DDP's
//! `find_unused_parameters`: its gradient, zero unless something wrote it, is reduced anyway so
//! that every rank issues the same collectives), waits for every bucket in order and writes the
//! rank means back into the store. The result is bit-identical to
//! [`average_gradients`](crate::train::run::average_gradients): the host groups reduce each
//! element alone (f64 sum in rank order, one division, one rounding), so how the elements are
//! packed into messages does not change a bit.

use super::buckets::GradBuckets;
use super::{check_gather_len, check_root, Communicator, ReduceOp};
use crate::error::{Error, Result};
use crate::nn::{ParamId, ParamStore};
use half::bf16;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

/// Told by a backward pass which parameters' gradients are final (no later part of this
/// backward adds to them), so that their all-reduce can start while the backward goes on.
pub trait GradReady {
    /// The gradients of `ids`, as accumulated in `store`, are final for this step. Errors stop
    /// the backward (and the step) with that error.
    fn ready(&mut self, store: &ParamStore, ids: &[ParamId]) -> Result<()>;
}

/// The hook of a plain backward: ignores every notification.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoGradSink;

impl GradReady for NoGradSink {
    fn ready(&mut self, _store: &ParamStore, _ids: &[ParamId]) -> Result<()> {
        Ok(())
    }
}

/// A collective request, with its data moved into the worker.
enum Req {
    ReduceF32(Vec<f32>, ReduceOp),
    ReduceF64(Vec<f64>, ReduceOp),
    ReduceBf16(Vec<bf16>, ReduceOp),
    /// f32 values reduced as bf16 (compressed gradients), returned widened to f32.
    MeanViaBf16(Vec<f32>),
    Broadcast(Vec<u8>, usize),
    /// Send buffer and receive length.
    Gather(Vec<u8>, usize),
    Barrier,
}

impl Req {
    fn describe(&self) -> String {
        match self {
            Req::ReduceF32(v, op) => format!("all_reduce({op:?}) of {} f32", v.len()),
            Req::ReduceF64(v, op) => format!("all_reduce({op:?}) of {} f64", v.len()),
            Req::ReduceBf16(v, op) => format!("all_reduce({op:?}) of {} bf16", v.len()),
            Req::MeanViaBf16(v) => format!("all_reduce(Mean) of {} bf16", v.len()),
            Req::Broadcast(v, root) => format!("broadcast(root {root}) of {} bytes", v.len()),
            Req::Gather(v, _) => format!("all_gather of {} bytes", v.len()),
            Req::Barrier => "barrier".into(),
        }
    }
}

/// A finished request's data.
enum Reply {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bf16(Vec<bf16>),
    Bytes(Vec<u8>),
    Unit,
}

struct Job {
    req: Req,
    reply: mpsc::Sender<Result<Reply>>,
}

/// Runs one request on the group.
fn execute(comm: &dyn Communicator, req: Req) -> Result<Reply> {
    Ok(match req {
        Req::ReduceF32(mut v, op) => {
            comm.all_reduce_f32(&mut v, op)?;
            Reply::F32(v)
        }
        Req::ReduceF64(mut v, op) => {
            comm.all_reduce_f64(&mut v, op)?;
            Reply::F64(v)
        }
        Req::ReduceBf16(mut v, op) => {
            comm.all_reduce_bf16(&mut v, op)?;
            Reply::Bf16(v)
        }
        Req::MeanViaBf16(mut v) => {
            let mut h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            comm.all_reduce_mean_bf16(&mut h)?;
            for (d, s) in v.iter_mut().zip(h) {
                *d = s.to_f32();
            }
            Reply::F32(v)
        }
        Req::Broadcast(mut v, root) => {
            comm.broadcast_bytes(&mut v, root)?;
            Reply::Bytes(v)
        }
        Req::Gather(send, n) => {
            let mut recv = vec![0u8; n];
            comm.all_gather_bytes(&send, &mut recv)?;
            Reply::Bytes(recv)
        }
        Req::Barrier => {
            comm.barrier()?;
            Reply::Unit
        }
    })
}

/// The worker thread's loop: requests in order; after the first error every later request is
/// answered with an error quoting it, without touching the group; cancelled requests (the
/// owner dropped the worker) are skipped.
fn serve(comm: &dyn Communicator, jobs: mpsc::Receiver<Job>, cancel: &AtomicBool) {
    let mut broken: Option<String> = None;
    for job in jobs {
        if cancel.load(Ordering::Acquire) {
            continue;
        }
        let what = job.req.describe();
        let out = match &broken {
            Some(first) => Err(Error::invalid(
                "comm worker",
                format!(
                    "rank {}: {what} not run: an earlier collective failed ({first}); the group \
                     is unusable for the rest of this run",
                    comm.rank()
                ),
            )),
            None => {
                let r = execute(comm, job.req);
                if let Err(e) = &r {
                    broken = Some(e.to_string());
                }
                r
            }
        };
        // The requester may have given up waiting (its error path); nothing to tell then.
        let _ = job.reply.send(out);
    }
}

/// An all-reduce in flight on a [`CommWorker`]. [`Handle::wait`] returns the reduced buffer
/// (or the collective's error); dropping a handle without waiting lets the reduction finish
/// unobserved.
#[must_use = "a submitted reduction's result is only available through wait()"]
pub struct Handle {
    rx: mpsc::Receiver<Result<Reply>>,
    what: String,
}

impl Handle {
    /// Blocks until the reduction has run; returns the reduced values.
    pub fn wait(self) -> Result<Vec<f32>> {
        match wait_reply(&self.rx, &self.what)? {
            Reply::F32(v) => Ok(v),
            _ => Err(wrong_reply(&self.what)),
        }
    }
}

fn wait_reply(rx: &mpsc::Receiver<Result<Reply>>, what: &str) -> Result<Reply> {
    rx.recv().map_err(|_| {
        Error::invalid(
            "comm worker",
            format!("{what}: the communication thread stopped before running it"),
        )
    })?
}

fn wrong_reply(what: &str) -> Error {
    Error::invalid(
        "comm worker",
        format!("{what}: the communication thread answered with the wrong kind of data"),
    )
}

/// This rank's communication thread for one backward (see the module documentation). Created
/// inside a [`std::thread::scope`] so that it may borrow the group; it implements
/// [`Communicator`] (blocking calls queue behind every earlier submission) and adds
/// asynchronous gradient reductions.
pub struct CommWorker<'scope> {
    rank: usize,
    world: usize,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Option<ScopedJoinHandle<'scope, ()>>,
    cancel: Arc<AtomicBool>,
}

impl<'scope> CommWorker<'scope> {
    /// Starts the worker thread in `scope`; it runs `comm`'s collectives until the worker is
    /// dropped.
    pub fn spawn<'env>(scope: &'scope Scope<'scope, 'env>, comm: &'env dyn Communicator) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancel);
        let thread = scope.spawn(move || serve(comm, rx, &flag));
        CommWorker {
            rank: comm.rank(),
            world: comm.world_size(),
            tx: Mutex::new(Some(tx)),
            thread: Some(thread),
            cancel,
        }
    }

    fn submit(&self, req: Req) -> (mpsc::Receiver<Result<Reply>>, String) {
        let what = format!("rank {}: {}", self.rank, req.describe());
        let (reply, rx) = mpsc::channel();
        let sent = match self.tx.lock() {
            Ok(tx) => tx.as_ref().map(|tx| tx.send(Job { req, reply })),
            Err(_) => None,
        };
        // A failed send drops the reply sender, so the wait reports the stopped thread.
        drop(sent);
        (rx, what)
    }

    fn call(&self, req: Req) -> Result<Reply> {
        let (rx, what) = self.submit(req);
        wait_reply(&rx, &what)
    }

    /// Queues the mean over the ranks of `buf` (f32) and returns at once; the reduced buffer
    /// comes back from [`Handle::wait`]. Collective: every rank must submit the same requests
    /// in the same order.
    pub fn submit_all_reduce_mean(&self, buf: Vec<f32>) -> Handle {
        let (rx, what) = self.submit(Req::ReduceF32(buf, ReduceOp::Mean));
        Handle { rx, what }
    }

    /// As [`CommWorker::submit_all_reduce_mean`] with the values rounded to bf16 on the wire
    /// (half the bytes, DDP's bf16 compression hook); the result is widened back to f32.
    pub fn submit_all_reduce_mean_bf16(&self, buf: Vec<f32>) -> Handle {
        let (rx, what) = self.submit(Req::MeanViaBf16(buf));
        Handle { rx, what }
    }
}

impl Drop for CommWorker<'_> {
    /// Cancels what has not started, closes the queue and joins the thread (after the running
    /// collective, if any, has ended). A panic of the thread is not re-raised: its requests
    /// have already been answered with errors.
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Release);
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Communicator for CommWorker<'_> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        match self.call(Req::ReduceF32(buf.to_vec(), op))? {
            Reply::F32(v) if v.len() == buf.len() => buf.copy_from_slice(&v),
            _ => return Err(wrong_reply("all_reduce_f32")),
        }
        Ok(())
    }
    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        match self.call(Req::ReduceF64(buf.to_vec(), op))? {
            Reply::F64(v) if v.len() == buf.len() => buf.copy_from_slice(&v),
            _ => return Err(wrong_reply("all_reduce_f64")),
        }
        Ok(())
    }
    fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()> {
        match self.call(Req::ReduceBf16(buf.to_vec(), op))? {
            Reply::Bf16(v) if v.len() == buf.len() => buf.copy_from_slice(&v),
            _ => return Err(wrong_reply("all_reduce_bf16")),
        }
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root("CommWorker::broadcast", root, self.world)?;
        match self.call(Req::Broadcast(buf.to_vec(), root))? {
            Reply::Bytes(v) if v.len() == buf.len() => buf.copy_from_slice(&v),
            _ => return Err(wrong_reply("broadcast")),
        }
        Ok(())
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_gather_len("CommWorker::all_gather", self.world, send.len(), recv.len())?;
        match self.call(Req::Gather(send.to_vec(), recv.len()))? {
            Reply::Bytes(v) if v.len() == recv.len() => recv.copy_from_slice(&v),
            _ => return Err(wrong_reply("all_gather")),
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        match self.call(Req::Barrier)? {
            Reply::Unit => Ok(()),
            _ => Err(wrong_reply("barrier")),
        }
    }
}

/// The [`GradReady`] hook of an overlapped backward: copies each reported gradient into its
/// bucket and submits every bucket that is complete (in bucket order) to the worker.
/// Parameters outside the plan (frozen ones) are ignored.
pub struct BucketSink<'a, 'scope> {
    buckets: &'a mut GradBuckets,
    worker: &'a CommWorker<'scope>,
}

impl<'a, 'scope> BucketSink<'a, 'scope> {
    /// A hook feeding `buckets` (planned with [`GradBuckets::for_store`] and reset for this
    /// step) to `worker`.
    pub fn new(buckets: &'a mut GradBuckets, worker: &'a CommWorker<'scope>) -> Self {
        BucketSink { buckets, worker }
    }
}

impl GradReady for BucketSink<'_, '_> {
    fn ready(&mut self, store: &ParamStore, ids: &[ParamId]) -> Result<()> {
        for &id in ids {
            if let Some(p) = self.buckets.index_of(id) {
                self.buckets
                    .mark_ready_async(p, store.grad(id).data(), self.worker)?;
            }
        }
        Ok(())
    }
}

/// Runs `backward` with the gradient all-reduce overlapped and leaves every planned parameter's
/// gradient replaced by its mean over the ranks (bit-identical to
/// [`average_gradients`](crate::train::run::average_gradients)). `backward` gets the store, the
/// communicator to use for its own collectives (the worker: SyncBN must queue behind the
/// buckets) and the hook to report final gradients to. `buckets` must have been planned for
/// this store ([`GradBuckets::for_store`]). Collective; with one rank nothing is reduced.
///
/// Errors: the backward's own, or the first failed collective's (with the group's message);
/// every rank of a group returns an error when one fails (the failing rank stops taking part,
/// and the group reports that to the others, by a closed connection or its timeout).
pub fn overlapped_backward<F>(
    store: &mut ParamStore,
    buckets: &mut GradBuckets,
    comm: &dyn Communicator,
    backward: F,
) -> Result<()>
where
    F: FnOnce(&mut ParamStore, &dyn Communicator, &mut dyn GradReady) -> Result<()>,
{
    if comm.world_size() <= 1 {
        return backward(store, comm, &mut NoGradSink);
    }
    buckets.reset();
    std::thread::scope(|s| {
        let worker = CommWorker::spawn(s, comm);
        let ran = {
            let mut sink = BucketSink::new(buckets, &worker);
            backward(store, &worker, &mut sink)
        };
        // On error, `worker` is dropped here: queued buckets are cancelled, the thread joined.
        ran?;
        buckets.finish_async(store, &worker)?;
        drop(worker);
        buckets.write_back(store)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{LocalGroup, SingleProcess};

    #[test]
    fn worker_runs_requests_in_order_and_blocking_calls_work() {
        let ranks = LocalGroup::new(2).unwrap();
        type RankOut = (Vec<f32>, Vec<f32>, Vec<f64>, Vec<u8>);
        let out: Vec<RankOut> = std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .iter()
                .map(|g| {
                    s.spawn(move || {
                        std::thread::scope(|ws| {
                            let w = CommWorker::spawn(ws, g);
                            let r = g.rank() as f32;
                            let a = w.submit_all_reduce_mean(vec![r, 2.0 * r, 1.0]);
                            let b = w.submit_all_reduce_mean(vec![10.0 + r]);
                            // A blocking call queues behind the two submissions.
                            let mut f = vec![r as f64 + 0.5];
                            w.all_reduce_sum_f64(&mut f).unwrap();
                            let mut bytes = vec![g.rank() as u8 + 7; 2];
                            w.broadcast_bytes(&mut bytes, 1).unwrap();
                            w.barrier().unwrap();
                            (a.wait().unwrap(), b.wait().unwrap(), f, bytes)
                        })
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b, f, bytes) in out {
            assert_eq!(a, vec![0.5, 1.0, 1.0]);
            assert_eq!(b, vec![10.5]);
            assert_eq!(f, vec![2.0]);
            assert_eq!(bytes, vec![8, 8]);
        }
    }

    #[test]
    fn argument_errors_and_single_process() {
        std::thread::scope(|s| {
            let w = CommWorker::spawn(s, &SingleProcess);
            assert_eq!((w.rank(), w.world_size()), (0, 1));
            assert!(w.broadcast_f32(&mut [1.0], 1).is_err());
            assert!(w.all_gather_f32(&[1.0], &mut [0.0; 2]).is_err());
            let mut out = [0.0f32; 1];
            w.all_gather_f32(&[3.0], &mut out).unwrap();
            assert_eq!(out, [3.0]);
            let h = w.submit_all_reduce_mean_bf16(vec![1.0 + 1.0 / 1024.0]);
            assert_eq!(h.wait().unwrap(), vec![1.0]);
        });
    }

    /// A group whose collectives fail: the failing request gets the group's message, later
    /// ones an error quoting it, without reaching the group again.
    struct Failing(std::sync::atomic::AtomicUsize);

    impl Communicator for Failing {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_f32(&self, _: &mut [f32], _: ReduceOp) -> Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(Error::invalid("Failing", "rank 1 hung up (test)"))
        }
        fn all_reduce_f64(&self, _: &mut [f64], _: ReduceOp) -> Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn all_reduce_bf16(&self, _: &mut [bf16], _: ReduceOp) -> Result<()> {
            Ok(())
        }
        fn broadcast_bytes(&self, _: &mut [u8], _: usize) -> Result<()> {
            Ok(())
        }
        fn all_gather_bytes(&self, _: &[u8], _: &mut [u8]) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn errors_come_back_and_break_the_worker() {
        let g = Failing(Default::default());
        std::thread::scope(|s| {
            let w = CommWorker::spawn(s, &g);
            let a = w.submit_all_reduce_mean(vec![1.0]);
            let b = w.submit_all_reduce_mean(vec![2.0]);
            let e = a.wait().unwrap_err().to_string();
            assert!(e.contains("rank 1 hung up (test)"), "{e}");
            let e = b.wait().unwrap_err().to_string();
            assert!(
                e.contains("earlier collective failed") && e.contains("rank 1 hung up"),
                "{e}"
            );
            let e = w.all_reduce_sum_f64(&mut [1.0]).unwrap_err().to_string();
            assert!(e.contains("rank 1 hung up"), "{e}");
        });
        // Only the first request reached the group.
        assert_eq!(g.0.load(Ordering::SeqCst), 1);
    }
}

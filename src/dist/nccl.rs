//! [`NcclGroup`]: the GPU [`Communicator`], NCCL through cudarc, one process per GPU.
//!
//! Set-up: rank 0 creates NCCL's 128-byte unique id and sends it to the other ranks over the
//! TCP rendezvous ([`super::tcp::TcpGroup`], the same MASTER_ADDR:MASTER_PORT), then every rank
//! joins the NCCL communicator on GPU `LOCAL_RANK % device_count`. Before anyone calls NCCL's
//! blocking init, the ranks agree over TCP that all of them found a GPU and the library, so a
//! rank without NCCL gives an error on every rank instead of a hang in `ncclCommInitRank`.
//!
//! cudarc loads NCCL at run time (`dynamic-loading`), so the binary builds and runs without it;
//! [`NcclGroup::probe`] checks the driver, a device and the library before any cudarc call that
//! would panic. cudarc looks for `libnccl.so` (and `libnccl.so.<CUDA major>`), while pip's
//! `nvidia-nccl-cu12`/`-cu13` wheels ship only `libnccl.so.2`: a `libnccl.so` symlink beside it,
//! on LD_LIBRARY_PATH, is needed; the error message finds pip's copy and prints the commands
//! (docs/distributed.md has them too).
//!
//! The [`Communicator`] methods take host slices (they serve host-side statistics and tests) and
//! stage through the device; the training loop's gradient buckets use [`NcclGroup::all_reduce_device`]
//! on device buffers directly, on the communicator's stream.

use super::env::DistEnv;
use super::{check_gather_len, check_root, Communicator, ReduceOp};
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{Comm, Id, NcclType};
use half::bf16;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

fn err(detail: impl Into<String>) -> Error {
    Error::invalid("NcclGroup", detail)
}

/// The communicator and its stream, used under a mutex.
struct Inner {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent, which the mutex in NcclGroup guarantees; cudarc marks `Comm` neither Send nor
// Sync only because it holds a raw `ncclComm_t` pointer. The CUDA context is made current on
// the calling thread before every use.
unsafe impl Send for Inner {}

/// One rank of an NCCL communicator (one process per GPU).
pub struct NcclGroup {
    rank: usize,
    world: usize,
    inner: Mutex<Inner>,
}

/// Directories where pip installs NCCL's `libnccl.so.2` (`site-packages/nvidia/nccl/lib`) under
/// the usual Python prefixes, and LD_LIBRARY_PATH entries that hold `libnccl.so.2`.
pub fn find_pip_nccl() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .collect();
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    if let Some(h) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(h).join(".local"));
    }
    let mut found = Vec::new();
    for p in prefixes {
        let Ok(libs) = std::fs::read_dir(p.join("lib")) else {
            continue;
        };
        for py in libs.flatten() {
            if !py.file_name().to_string_lossy().starts_with("python3") {
                continue;
            }
            for sp in ["site-packages", "dist-packages"] {
                let d = py.path().join(sp).join("nvidia/nccl/lib");
                if d.join("libnccl.so.2").exists() && !found.contains(&d) {
                    found.push(d);
                }
            }
        }
    }
    if let Some(ld) = std::env::var_os("LD_LIBRARY_PATH") {
        for d in std::env::split_paths(&ld) {
            if d.join("libnccl.so.2").exists() && !found.contains(&d) {
                found.push(d);
            }
        }
    }
    found
}

/// Why NCCL cannot be loaded, with the way out.
fn nccl_missing() -> String {
    let pip = find_pip_nccl();
    match pip.first() {
        Some(d) => format!(
            "NCCL is not loadable: cudarc looks for libnccl.so, but {} holds only libnccl.so.2 \
             (pip's layout); run `ln -sf libnccl.so.2 {}/libnccl.so` and `export \
             LD_LIBRARY_PATH={}:$LD_LIBRARY_PATH`",
            d.display(),
            d.display(),
            d.display()
        ),
        None => "NCCL is not loadable (libnccl.so not found): install NCCL (e.g. `pip install \
                 nvidia-nccl-cu13`, then link libnccl.so to libnccl.so.2 and put its folder on \
                 LD_LIBRARY_PATH, see docs/distributed.md)"
            .to_string(),
    }
}

impl NcclGroup {
    /// Checks, without panicking, that the CUDA driver, at least one GPU and the NCCL library
    /// are present; returns the device count or the reason and the way out. Cached.
    pub fn probe() -> std::result::Result<usize, String> {
        static CACHE: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
        CACHE
            .get_or_init(|| {
                // SAFETY: only tries to dlopen the library under its candidate names.
                if !unsafe { cudarc::driver::sys::is_culib_present() } {
                    return Err("no CUDA driver (libcuda.so) on this machine".into());
                }
                cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
                let n = cudarc::driver::result::device::get_count()
                    .map_err(|e| format!("cannot count GPUs: {e:?}"))?;
                if n <= 0 {
                    return Err("the CUDA driver reports no GPU".into());
                }
                // SAFETY: as above, for libnccl.
                if !unsafe { cudarc::nccl::sys::is_culib_present() } {
                    return Err(nccl_missing());
                }
                Ok(n as usize)
            })
            .clone()
    }

    /// Joins the NCCL communicator of the run described by `env`, using `rendezvous` (a group
    /// over the same ranks, normally a [`super::tcp::TcpGroup`]) to share the unique id and to
    /// agree that every rank is ready. Errors on every rank, rather than hanging, when any rank
    /// lacks a GPU or NCCL.
    pub fn new(env: &DistEnv, rendezvous: &dyn Communicator) -> Result<Self> {
        if rendezvous.rank() != env.rank || rendezvous.world_size() != env.world_size {
            return Err(err(format!(
                "the rendezvous group is rank {} of {}, the environment says rank {} of {}",
                rendezvous.rank(),
                rendezvous.world_size(),
                env.rank,
                env.world_size
            )));
        }
        if env.world_size > i32::MAX as usize {
            return Err(err("world size does not fit NCCL's int"));
        }
        // Local readiness: driver, GPU, library, context; and on rank 0 the id.
        let local = prepare(env);
        // Everyone learns whether everyone is ready before NCCL's blocking init.
        let mut not_ready = [f64::from(u8::from(local.is_err()))];
        rendezvous.all_reduce_sum_f64(&mut not_ready)?;
        let (stream, id) = match local {
            Err(why) => return Err(err(format!("rank {}: {why}", env.rank))),
            Ok(v) => v,
        };
        if not_ready[0] > 0.0 {
            return Err(err(format!(
                "{} rank(s) could not prepare NCCL (see their errors); not joining",
                not_ready[0]
            )));
        }
        let mut bytes = [0u8; 128];
        if let Some(id) = &id {
            for (b, c) in bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        rendezvous.broadcast_bytes(&mut bytes, 0)?;
        let id = id.unwrap_or_else(|| Id::uninit(bytes.map(|b| b as std::ffi::c_char)));
        let comm = Comm::from_rank(stream.clone(), env.rank, env.world_size, id)
            .map_err(|e| err(format!("rank {}: ncclCommInitRank failed: {e:?}", env.rank)))?;
        Ok(NcclGroup {
            rank: env.rank,
            world: env.world_size,
            inner: Mutex::new(Inner { comm, stream }),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        let g = self
            .inner
            .lock()
            .map_err(|_| err("a thread panicked inside a collective"))?;
        g.stream
            .context()
            .bind_to_thread()
            .map_err(|e| err(format!("cannot make the CUDA context current: {e:?}")))?;
        Ok(g)
    }

    /// The stream NCCL runs on; the training loop orders its work against it with events.
    pub fn stream(&self) -> Result<Arc<CudaStream>> {
        Ok(self.lock()?.stream.clone())
    }

    /// Enqueues an in-place all-reduce of a device buffer on the communicator's stream (no
    /// host synchronisation: the caller waits on the stream or records an event).
    pub fn all_reduce_device<T: NcclType>(
        &self,
        buf: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<()> {
        let g = self.lock()?;
        g.comm
            .all_reduce_in_place(buf, &nccl_op(op))
            .map_err(|e| err(format!("ncclAllReduce failed: {e:?}")))?;
        Ok(())
    }

    /// Host-staged all-reduce: copy in, reduce, copy out, wait.
    fn reduce_host<T: NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let g = self.lock()?;
        let cuda = |e: cudarc::driver::DriverError| err(format!("CUDA copy failed: {e:?}"));
        let mut d = g.stream.clone_htod(buf).map_err(cuda)?;
        g.comm
            .all_reduce_in_place(&mut d, &nccl_op(op))
            .map_err(|e| err(format!("ncclAllReduce failed: {e:?}")))?;
        g.stream.memcpy_dtoh(&d, buf).map_err(cuda)?;
        g.stream.synchronize().map_err(cuda)
    }
}

/// This rank's half of the set-up that can fail without NCCL: the GPU's context and stream,
/// and on rank 0 the unique id.
fn prepare(env: &DistEnv) -> std::result::Result<(Arc<CudaStream>, Option<Id>), String> {
    let n = NcclGroup::probe()?;
    let dev = env.device_index(n).map_err(|e| e.to_string())?;
    let ctx = CudaContext::new(dev).map_err(|e| format!("GPU {dev}: {e:?}"))?;
    let stream = ctx
        .new_stream()
        .map_err(|e| format!("GPU {dev}: cannot create a stream: {e:?}"))?;
    let id = if env.rank == 0 {
        Some(Id::new().map_err(|e| format!("ncclGetUniqueId failed: {e:?}"))?)
    } else {
        None
    };
    Ok((stream, id))
}

fn nccl_op(op: ReduceOp) -> cudarc::nccl::ReduceOp {
    match op {
        ReduceOp::Sum => cudarc::nccl::ReduceOp::Sum,
        ReduceOp::Mean => cudarc::nccl::ReduceOp::Avg,
    }
}

impl Communicator for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.reduce_host(buf, op)
    }
    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        self.reduce_host(buf, op)
    }
    fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()> {
        self.reduce_host(buf, op)
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root("NcclGroup::broadcast", root, self.world)?;
        if buf.is_empty() {
            return Ok(());
        }
        let g = self.lock()?;
        let cuda = |e: cudarc::driver::DriverError| err(format!("CUDA copy failed: {e:?}"));
        let mut d = g.stream.clone_htod(buf).map_err(cuda)?;
        g.comm
            .broadcast_in_place(&mut d, root as i32)
            .map_err(|e| err(format!("ncclBroadcast failed: {e:?}")))?;
        g.stream.memcpy_dtoh(&d, buf).map_err(cuda)?;
        g.stream.synchronize().map_err(cuda)
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_gather_len("NcclGroup::all_gather", self.world, send.len(), recv.len())?;
        if send.is_empty() {
            return Ok(());
        }
        let g = self.lock()?;
        let cuda = |e: cudarc::driver::DriverError| err(format!("CUDA copy failed: {e:?}"));
        let d = g.stream.clone_htod(send).map_err(cuda)?;
        let mut r = g.stream.alloc_zeros::<u8>(recv.len()).map_err(cuda)?;
        g.comm
            .all_gather(&d, &mut r)
            .map_err(|e| err(format!("ncclAllGather failed: {e:?}")))?;
        g.stream.memcpy_dtoh(&r, recv).map_err(cuda)?;
        g.stream.synchronize().map_err(cuda)
    }
    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: a one-element all-reduce that everyone waits for is one.
        let mut one = [0.0f32];
        self.reduce_host(&mut one, ReduceOp::Sum)
    }
}

//! The [`Gpu`] context: one CUDA context, one compute stream, the caching allocator, the kernel
//! modules, and lazily created cuBLASLt / cuDNN handles, plus event timing.
//!
//! One stream on purpose: every op of a training step is ordered on it, so buffers can be reused
//! by the caching allocator without events (see `alloc.rs`), and the whole step can later be
//! captured as a CUDA graph. `cudarc`'s per-buffer event tracking exists for multi-stream use; it
//! is switched off here, which saves two events per allocation and an event record per launch.
//! Host synchronisation happens only in the explicit `download`/`synchronize`/timing calls.

use super::alloc::{AllocStats, DeviceBuffer, DevicePool, Pool, StreamBacking};
use super::cublaslt::Lt;
use super::cuda_err;
use super::cudnn::Dnn;
use super::device::{probe, DeviceInfo};
use super::module::{Kernel, Modules};
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaStream, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use std::cell::OnceCell;
use std::sync::Arc;

pub use crate::backend::device::Timing;

/// A CUDA device ready for work: context, compute stream, allocator, modules, library handles.
///
/// Not `Send`: cuDNN handles must stay on the thread that made them. Create one per thread
/// (the primary context is shared, so this is cheap after the first).
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pool: Arc<DevicePool>,
    modules: Modules,
    info: DeviceInfo,
    lt: OnceCell<Lt>,
    dnn: OnceCell<Dnn>,
}

impl Gpu {
    /// Opens device `ordinal`. Errors (never panics) when there is no such usable GPU, saying why.
    pub fn new(ordinal: usize) -> Result<Self> {
        let p = probe();
        let info = p
            .devices
            .iter()
            .find(|d| d.ordinal == ordinal)
            .cloned()
            .ok_or_else(|| {
                Error::invalid(
                    "cuda",
                    format!(
                        "no GPU cuda:{ordinal}: {}",
                        p.reason
                            .as_deref()
                            .unwrap_or("the machine has fewer devices")
                    ),
                )
            })?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| cuda_err("cuda", format!("creating a context on cuda:{ordinal}"), e))?;
        // SAFETY: every buffer of this Gpu is used on its single compute stream (module doc), so
        // cudarc's cross-stream event tracking is not needed; it is disabled before any buffer exists.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("cuda", "creating the compute stream", e))?;
        let pool = Pool::new(StreamBacking(Arc::clone(&stream)));
        let modules = Modules::new(Arc::clone(&ctx), info.compute_capability);
        Ok(Gpu {
            ctx,
            stream,
            pool,
            modules,
            info,
            lt: OnceCell::new(),
            dnn: OnceCell::new(),
        })
    }

    /// The device's description.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The compute stream every op runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The caching allocator (shared by this Gpu's buffers).
    pub fn pool(&self) -> &Arc<DevicePool> {
        &self.pool
    }

    /// Allocator counters.
    pub fn alloc_stats(&self) -> AllocStats {
        self.pool.stats()
    }

    /// Releases the allocator's cached blocks to the driver; returns the bytes released.
    pub fn trim(&self) -> usize {
        self.pool.trim()
    }

    /// An uninitialised device buffer of `len` elements.
    pub fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        DeviceBuffer::new(&self.pool, len)
    }

    /// A zeroed device buffer (memset on the stream).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc::<T>(len)?;
        self.stream
            .memset_zeros(&mut b.view_mut())
            .map_err(|e| cuda_err("cuda memset", format!("{len} elements"), e))?;
        Ok(b)
    }

    /// Copies host data into a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc::<T>(data.len())?;
        self.stream
            .memcpy_htod(data, &mut b.view_mut())
            .map_err(|e| cuda_err("cuda upload", format!("{} elements", data.len()), e))?;
        Ok(b)
    }

    /// Copies host data into an existing device buffer of the same length.
    pub fn upload_into<T: DeviceRepr>(&self, data: &[T], dst: &mut DeviceBuffer<T>) -> Result<()> {
        if data.len() != dst.len() {
            return Err(Error::shape(
                "cuda upload",
                format!(
                    "{} host elements into a buffer of {}",
                    data.len(),
                    dst.len()
                ),
            ));
        }
        self.stream
            .memcpy_htod(data, &mut dst.view_mut())
            .map_err(|e| cuda_err("cuda upload", format!("{} elements", data.len()), e))
    }

    /// Copies a device buffer back to the host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        src: &DeviceBuffer<T>,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); src.len()];
        self.stream
            .memcpy_dtoh(&src.view(), &mut out)
            .map_err(|e| cuda_err("cuda download", format!("{} elements", src.len()), e))?;
        self.synchronize()?;
        Ok(out)
    }

    /// f32 host data rounded to bf16 on the device (the GPU's operand type).
    pub fn upload_bf16(&self, data: &[f32]) -> Result<DeviceBuffer<bf16>> {
        let h: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        self.upload(&h)
    }

    /// A bf16 device buffer widened to f32 on the host.
    pub fn download_bf16(&self, src: &DeviceBuffer<bf16>) -> Result<Vec<f32>> {
        Ok(self
            .download(src)?
            .into_iter()
            .map(|v| v.to_f32())
            .collect())
    }

    /// Device-to-device copy of `src` into `dst` (same length), on the stream.
    pub fn copy<T: DeviceRepr>(
        &self,
        src: &DeviceBuffer<T>,
        dst: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::shape(
                "cuda copy",
                format!("{} elements into a buffer of {}", src.len(), dst.len()),
            ));
        }
        self.stream
            .memcpy_dtod(&src.view(), &mut dst.view_mut())
            .map_err(|e| cuda_err("cuda copy", format!("{} bytes", src.bytes()), e))
    }

    /// Waits for all work on the stream; reports any asynchronous error (a faulting kernel)
    /// of earlier launches.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("cuda", "stream synchronize (an earlier launch failed)", e))?;
        self.ctx
            .check_err()
            .map_err(|e| cuda_err("cuda", "deferred error from a drop", e))
    }

    /// The kernel `func` of module `module` (loaded and looked up once per Gpu).
    pub fn kernel(&self, module: &str, func: &str) -> Result<Kernel> {
        self.modules.kernel(module, func)
    }

    /// The cuBLASLt wrapper (created on first use).
    pub fn lt(&self) -> Result<&Lt> {
        if let Some(lt) = self.lt.get() {
            return Ok(lt);
        }
        let lt = Lt::new(&self.stream)?;
        Ok(self.lt.get_or_init(|| lt))
    }

    /// The cuDNN wrapper (created on first use).
    pub fn dnn(&self) -> Result<&Dnn> {
        if let Some(d) = self.dnn.get() {
            return Ok(d);
        }
        let d = Dnn::new(&self.stream)?;
        Ok(self.dnn.get_or_init(|| d))
    }

    /// Times `work` with CUDA events: `warmup` untimed runs, then `reps` timed runs, each between
    /// its own pair of events; returns the median and minimum. `work` must only enqueue.
    pub fn time<F: FnMut() -> Result<()>>(
        &self,
        warmup: usize,
        reps: usize,
        mut work: F,
    ) -> Result<Timing> {
        use cudarc::driver::sys::CUevent_flags;
        for _ in 0..warmup {
            work()?;
        }
        self.synchronize()?;
        let reps = reps.max(1);
        let mut pairs = Vec::with_capacity(reps);
        for _ in 0..reps {
            let ev = || {
                self.ctx
                    .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| cuda_err("cuda timing", "creating an event", e))
            };
            pairs.push((ev()?, ev()?));
        }
        for (a, b) in &pairs {
            a.record(&self.stream)
                .map_err(|e| cuda_err("cuda timing", "recording an event", e))?;
            work()?;
            b.record(&self.stream)
                .map_err(|e| cuda_err("cuda timing", "recording an event", e))?;
        }
        self.synchronize()?;
        let mut ms = Vec::with_capacity(reps);
        for (a, b) in &pairs {
            ms.push(
                a.elapsed_ms(b)
                    .map_err(|e| cuda_err("cuda timing", "reading an event", e))?
                    as f64,
            );
        }
        Timing::from_samples(ms)
    }
}

//! The GPU as an [`Exec`]: the device ops of `backend::device` launched on the [`Gpu`]'s one
//! stream, with buffers from its caching allocator. Arguments become a `cudarc` launch builder
//! (one pointer per parameter, as `cuLaunchKernel` takes them), so the argument list a device
//! op passes is the one the CPU emulation checked.

use super::alloc::DeviceBuffer;
use super::context::Gpu;
use super::module::LaunchDims;
use super::PushKernelArg;
use crate::backend::device::{DevBuf, Elem, Exec, KArg, LaunchConfig, Timing};
use crate::error::{Error, Result};

impl<T: Elem> DevBuf<T> for DeviceBuffer<T> {
    fn len(&self) -> usize {
        DeviceBuffer::len(self)
    }
    fn addr(&self) -> u64 {
        self.ptr()
    }
}

impl Exec for Gpu {
    type Buf<T: Elem> = DeviceBuffer<T>;

    fn describe(&self) -> String {
        let i = self.info();
        format!(
            "cuda:{} {} (sm_{}{})",
            i.ordinal, i.name, i.compute_capability.0, i.compute_capability.1
        )
    }

    fn is_gpu(&self) -> bool {
        true
    }

    fn alloc<T: Elem>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        Gpu::alloc(self, len)
    }

    fn zeros<T: Elem>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        Gpu::zeros(self, len)
    }

    fn upload<T: Elem>(&self, data: &[T]) -> Result<DeviceBuffer<T>> {
        Gpu::upload(self, data)
    }

    fn upload_into<T: Elem>(&self, data: &[T], dst: &mut DeviceBuffer<T>) -> Result<()> {
        Gpu::upload_into(self, data, dst)
    }

    fn download<T: Elem>(&self, src: &DeviceBuffer<T>) -> Result<Vec<T>> {
        Gpu::download(self, src)
    }

    fn copy<T: Elem>(&self, src: &DeviceBuffer<T>, dst: &mut DeviceBuffer<T>) -> Result<()> {
        Gpu::copy(self, src, dst)
    }

    fn synchronize(&self) -> Result<()> {
        Gpu::synchronize(self)
    }

    fn time<F: FnMut() -> Result<()>>(
        &self,
        warmup: usize,
        reps: usize,
        work: F,
    ) -> Result<Timing> {
        Gpu::time(self, warmup, reps, work)
    }

    unsafe fn launch(
        &self,
        module: &'static str,
        kernel: &'static str,
        cfg: LaunchConfig,
        args: &[KArg],
    ) -> Result<()> {
        let shared_bytes = u32::try_from(cfg.shared_bytes).map_err(|_| {
            Error::invalid(
                "kernel launch",
                format!(
                    "{module}::{kernel}: {} bytes of shared memory",
                    cfg.shared_bytes
                ),
            )
        })?;
        let dims = LaunchDims {
            grid: cfg.grid,
            block: cfg.block,
            shared_bytes,
        };
        let k = self.kernel(module, kernel)?;
        let mut b = k.builder(self.stream());
        for a in args {
            match a {
                KArg::Ptr(v) | KArg::U64(v) => b.arg(v),
                KArg::I32(v) => b.arg(v),
                KArg::U32(v) => b.arg(v),
                KArg::F32(v) => b.arg(v),
                KArg::F64(v) => b.arg(v),
            };
        }
        // SAFETY: forwarded from the caller: the arguments match the kernel and the buffers
        // are large enough for `cfg`.
        unsafe { k.launch(&mut b, dims) }
    }
}

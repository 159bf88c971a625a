//! The GPU as an [`Exec`]: the device ops of `backend::device` launched on the [`Gpu`]'s one
//! stream, with buffers from its caching allocator. Arguments become a `cudarc` launch builder
//! (one pointer per parameter, as `cuLaunchKernel` takes them), so the argument list a device
//! op passes is the one the CPU emulation checked.
//!
//! GEMMs and convolutions go to cuBLASLt ([`Gpu::lt`]) and cuDNN ([`Gpu::dnn`], workspaces from
//! the caching allocator); the lengths are checked by the same `backend::device::blas`
//! functions the emulation calls, before the library handle is even created.

use super::alloc::DeviceBuffer;
use super::context::Gpu;
use super::module::LaunchDims;
use super::PushKernelArg;
use crate::backend::device::blas::{
    OP_CONV_BACKWARD_DATA, OP_CONV_BACKWARD_FILTER, OP_CONV_FORWARD, OP_GEMM, OP_GEMM_F32_OUT,
};
use crate::backend::device::{ConvShape, DevBuf, Elem, Exec, Gemm, KArg, LaunchConfig, Timing};
use crate::error::{Error, Result};
use half::bf16;

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

    fn gemm(
        &self,
        g: &Gemm,
        a: &DeviceBuffer<bf16>,
        b: &DeviceBuffer<bf16>,
        bias: Option<&DeviceBuffer<bf16>>,
        c: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        g.check_lengths(OP_GEMM, a.len(), b.len(), bias.map(|v| v.len()), c.len())?;
        self.lt()?.matmul(g, a, b, bias, c)
    }

    fn gemm_f32_out(
        &self,
        g: &Gemm,
        a: &DeviceBuffer<bf16>,
        b: &DeviceBuffer<bf16>,
        c: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        g.check_lengths_f32_out(OP_GEMM_F32_OUT, a.len(), b.len(), c.len())?;
        self.lt()?.matmul_f32_out(g, a, b, c)
    }

    fn conv_forward(
        &self,
        s: &ConvShape,
        x: &DeviceBuffer<bf16>,
        w: &DeviceBuffer<bf16>,
        y: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        s.check_forward(OP_CONV_FORWARD, x.len(), w.len(), y.len())?;
        self.dnn()?.conv2d_forward(self.pool(), s, x, w, y)
    }

    fn conv_backward_data(
        &self,
        s: &ConvShape,
        w: &DeviceBuffer<bf16>,
        dy: &DeviceBuffer<bf16>,
        dx: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        s.check_backward_data(OP_CONV_BACKWARD_DATA, w.len(), dy.len(), dx.len())?;
        self.dnn()?.conv2d_backward_data(self.pool(), s, w, dy, dx)
    }

    fn conv_backward_filter(
        &self,
        s: &ConvShape,
        x: &DeviceBuffer<bf16>,
        dy: &DeviceBuffer<bf16>,
        dw: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        s.check_backward_filter(OP_CONV_BACKWARD_FILTER, x.len(), dy.len(), dw.len())?;
        self.dnn()?
            .conv2d_backward_filter(self.pool(), s, x, dy, dw)
    }
}

//! Device ops: the engine's own kernels (`kernels/*.cu`) as safe Rust functions that run
//! wherever those kernels can run: on a CUDA GPU ([`crate::backend::cuda::Gpu`]) or on the CPU
//! emulation of one ([`Emu`]: the very same sources compiled by g++ with
//! `kernels/emu/cuda_emu.h`).
//!
//! Why one layer for both: a kernel wrapper is mostly the contract with the kernel (argument
//! order and types, grid/block/shared-memory configuration, which buffers must be zeroed, what
//! the lengths must be). Written once, generic over [`Exec`], the contract that `cargo test`
//! checks on the CPU is the one the GPU executes, instead of a CPU copy that can drift from an
//! untested GPU copy. The family modules (`sinkhorn`, `softmax_ce`, `norm`, `optim`,
//! `elementwise`, `mixup`, `augment`, `pool`) mirror `kernels/<family>.cu`; each also holds its rows of
//! the device check ([`check`]), which therefore run on the emulation in CI as well.
//!
//! Library work (GEMMs, convolutions) is part of [`Exec`] too ([`Exec::gemm`],
//! [`Exec::conv_forward`], ...): cuBLASLt and cuDNN on the GPU, the CPU backend on the
//! emulation (bf16 operands widened to f32, the result rounded to bf16), with one contract
//! (shapes, length checks, epilogue semantics) in [`blas`].
//!
//! Buffers: [`Exec::alloc`] gives uninitialised memory. On the emulation it is filled with
//! 0xFF bytes (NaN for floats, -1 for integers), so a kernel that silently relies on zeroed
//! output shows up as NaN in the tests instead of on the first GPU run; ask for
//! [`Exec::zeros`] where a kernel accumulates. Ops take `&mut` for every buffer they write.

pub mod augment;
pub mod blas;
pub mod check;
pub mod elementwise;
pub mod mixup;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod sinkhorn;
pub mod softmax_ce;

use crate::backend::emu;
pub use crate::backend::emu::Mode;
use crate::error::{Error, Result};
pub use blas::{ConvShape, Epilogue, Gemm};
use half::bf16;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Instant;

pub use crate::backend::emu::LaunchConfig;

/// An element type that can live in a device buffer (plain bits, valid when all-zero).
pub trait Elem:
    Copy
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
{
}
impl Elem for f32 {}
impl Elem for f64 {}
impl Elem for bf16 {}
impl Elem for i32 {}
impl Elem for u32 {}
impl Elem for u8 {}
impl Elem for u64 {}

/// A buffer of an [`Exec`]: a length and the address kernels see.
pub trait DevBuf<T> {
    /// Number of elements.
    fn len(&self) -> usize;
    /// Address of element 0 in the executor's address space (device or host).
    fn addr(&self) -> u64;
    /// Whether the buffer has no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// This buffer as a pointer argument of a kernel launch.
    fn arg(&self) -> KArg {
        KArg::Ptr(self.addr())
    }
}

/// One kernel argument, by the C type the kernel declares (pointers of any element type are
/// [`KArg::Ptr`]; a null pointer is `KArg::Ptr(0)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KArg {
    /// `T*` / `const T*`: an address from [`DevBuf::addr`], or 0 for null.
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `unsigned int`.
    U32(u32),
    /// `unsigned long long`.
    U64(u64),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

impl From<i32> for KArg {
    fn from(v: i32) -> Self {
        KArg::I32(v)
    }
}
impl From<u32> for KArg {
    fn from(v: u32) -> Self {
        KArg::U32(v)
    }
}
impl From<u64> for KArg {
    fn from(v: u64) -> Self {
        KArg::U64(v)
    }
}
impl From<f32> for KArg {
    fn from(v: f32) -> Self {
        KArg::F32(v)
    }
}
impl From<f64> for KArg {
    fn from(v: f64) -> Self {
        KArg::F64(v)
    }
}

impl KArg {
    /// A pointer to the value, as `cuLaunchKernel`'s `kernelParams` (and the emulation) take it.
    pub fn as_param(&self) -> *mut c_void {
        match self {
            KArg::Ptr(v) | KArg::U64(v) => v as *const u64 as *mut c_void,
            KArg::I32(v) => v as *const i32 as *mut c_void,
            KArg::U32(v) => v as *const u32 as *mut c_void,
            KArg::F32(v) => v as *const f32 as *mut c_void,
            KArg::F64(v) => v as *const f64 as *mut c_void,
        }
    }
}

/// Median and minimum of repeated timings of one piece of work.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// Median over the timed repetitions, milliseconds.
    pub median_ms: f64,
    /// Fastest repetition, milliseconds.
    pub min_ms: f64,
    /// Number of timed repetitions.
    pub reps: usize,
}

impl Timing {
    /// Median and minimum of `ms` (at least one value).
    pub fn from_samples(mut ms: Vec<f64>) -> Result<Timing> {
        if ms.is_empty() {
            return Err(Error::invalid("timing", "no repetitions were timed"));
        }
        ms.sort_by(|x, y| x.total_cmp(y));
        Ok(Timing {
            median_ms: ms[ms.len() / 2],
            min_ms: ms[0],
            reps: ms.len(),
        })
    }
}

/// Where device ops run: memory, transfers, launches and timing. Implemented by the CUDA
/// context ([`crate::backend::cuda::Gpu`], one stream, caching allocator) and by [`Emu`].
pub trait Exec {
    /// The executor's buffer of `T`.
    type Buf<T: Elem>: DevBuf<T>;

    /// A one-line description ("cuda:0 NVIDIA H200 ...", "CPU emulation (fibers)").
    fn describe(&self) -> String;

    /// Whether this executor is a real GPU (timings mean GPU time).
    fn is_gpu(&self) -> bool;

    /// An uninitialised buffer of `len` elements (poisoned with 0xFF bytes on the emulation).
    fn alloc<T: Elem>(&self, len: usize) -> Result<Self::Buf<T>>;

    /// A zeroed buffer of `len` elements.
    fn zeros<T: Elem>(&self, len: usize) -> Result<Self::Buf<T>>;

    /// A new buffer holding `data`.
    fn upload<T: Elem>(&self, data: &[T]) -> Result<Self::Buf<T>>;

    /// Overwrites `dst` (same length) with `data`.
    fn upload_into<T: Elem>(&self, data: &[T], dst: &mut Self::Buf<T>) -> Result<()>;

    /// The buffer's contents on the host (waits for earlier work).
    fn download<T: Elem>(&self, src: &Self::Buf<T>) -> Result<Vec<T>>;

    /// Copies `src` into `dst` (same length), in stream order.
    fn copy<T: Elem>(&self, src: &Self::Buf<T>, dst: &mut Self::Buf<T>) -> Result<()>;

    /// Waits for all work; reports an asynchronous failure of an earlier launch.
    fn synchronize(&self) -> Result<()>;

    /// Times `work` (`warmup` untimed runs, then `reps` timed ones): CUDA events on the GPU,
    /// wall-clock time on the emulation.
    fn time<F: FnMut() -> Result<()>>(&self, warmup: usize, reps: usize, work: F)
        -> Result<Timing>;

    /// Launches `module::kernel` with `cfg`.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and type, and every buffer
    /// must be large enough for everything the kernel touches under `cfg`. The family modules'
    /// safe functions guarantee this by checking lengths first.
    unsafe fn launch(
        &self,
        module: &'static str,
        kernel: &'static str,
        cfg: LaunchConfig,
        args: &[KArg],
    ) -> Result<()>;

    /// C (+)= op(A)·op(B) (+ epilogue), row-major as `Gemm` documents, bf16 A, B, C
    /// (bf16 bias `[n]`).
    ///
    /// `C = act(op(A)·op(B) + [C if g.accumulate] + [bias])`: C is read only when accumulating;
    /// GELU epilogues are the tanh approximation ([`blas::gelu_tanh`]). Lengths are checked
    /// first ([`Gemm::check_lengths`]): A, B, C exactly their shapes, a bias of `n` exactly when
    /// the epilogue has one. cuBLASLt on the GPU, the CPU backend's `matmul` on the emulation.
    fn gemm(
        &self,
        g: &Gemm,
        a: &Self::Buf<bf16>,
        b: &Self::Buf<bf16>,
        bias: Option<&Self::Buf<bf16>>,
        c: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// As `gemm` with an fp32 C (no bias epilogues): weight gradients accumulated in fp32.
    ///
    /// `Gelu` is allowed; an epilogue with a bias is an error ([`Gemm::check_lengths_f32_out`]).
    fn gemm_f32_out(
        &self,
        g: &Gemm,
        a: &Self::Buf<bf16>,
        b: &Self::Buf<bf16>,
        c: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// y = conv(x, w): x `[n,h,w,c]`, w `[o,kh,kw,c]` (KRSC), y `[n,oh,ow,o]`, NHWC bf16.
    ///
    /// fp32 accumulation, y overwritten (never read). cuDNN on the GPU, the CPU backend's
    /// `conv2d_forward` on the emulation. Lengths: [`ConvShape::check_forward`].
    fn conv_forward(
        &self,
        s: &ConvShape,
        x: &Self::Buf<bf16>,
        w: &Self::Buf<bf16>,
        y: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// dx = conv backward-data(w, dy).
    ///
    /// dx `[n,h,w,c]` is overwritten (not accumulated into). Lengths:
    /// [`ConvShape::check_backward_data`].
    fn conv_backward_data(
        &self,
        s: &ConvShape,
        w: &Self::Buf<bf16>,
        dy: &Self::Buf<bf16>,
        dx: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// dw = conv backward-filter(x, dy) (bf16 out, fp32 accumulation inside).
    ///
    /// dw `[o,kh,kw,c]` is overwritten (not accumulated into). Lengths:
    /// [`ConvShape::check_backward_filter`].
    fn conv_backward_filter(
        &self,
        s: &ConvShape,
        x: &Self::Buf<bf16>,
        dy: &Self::Buf<bf16>,
        dw: &mut Self::Buf<bf16>,
    ) -> Result<()>;

    /// f32 values rounded to bf16, in a new buffer (the GPU's operand type).
    fn upload_bf16(&self, data: &[f32]) -> Result<Self::Buf<bf16>> {
        let h: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        self.upload(&h)
    }

    /// A bf16 buffer widened to f32 on the host.
    fn download_bf16(&self, src: &Self::Buf<bf16>) -> Result<Vec<f32>> {
        Ok(self
            .download(src)?
            .into_iter()
            .map(|v| v.to_f32())
            .collect())
    }
}

/// Errors unless `len == want`, naming the op and the buffer.
pub fn check_len(op: &'static str, what: &str, len: usize, want: usize) -> Result<()> {
    if len != want {
        return Err(Error::shape(
            op,
            format!("{what} has {len} elements, expected {want}"),
        ));
    }
    Ok(())
}

/// Errors unless `threads` is a whole number of warps, 32..=1024 (what every kernel's warp
/// reductions assume).
pub fn check_threads(op: &'static str, threads: u32) -> Result<()> {
    if threads == 0 || threads > 1024 || !threads.is_multiple_of(32) {
        return Err(Error::invalid(
            op,
            format!("{threads} threads per block: need a multiple of 32 in 32..=1024"),
        ));
    }
    Ok(())
}

/// `v` as a kernel `int` parameter, or an error naming it.
pub fn as_i32(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(op, format!("{what} = {v} exceeds i32::MAX")))
}

/// The CPU emulation of a GPU: kernels run through `backend::emu` (threads or fibers per block,
/// see [`Mode`]), buffers are host memory, launches are synchronous.
#[derive(Clone, Copy, Debug)]
pub struct Emu {
    /// How a block's threads run.
    pub mode: Mode,
}

impl Emu {
    /// An emulated device running blocks in `mode`.
    pub fn new(mode: Mode) -> Self {
        Emu { mode }
    }
}

/// A host buffer of the emulation. It owns its allocation through a raw pointer (not a `Vec`),
/// because kernels write through the address while Rust holds only shared references to the
/// buffer; every access from Rust goes through the pointer too.
pub struct HostBuf<T> {
    ptr: NonNull<T>,
    len: usize,
    _own: PhantomData<Box<[T]>>,
}

// SAFETY: a HostBuf owns its elements like a Box<[T]>; T is Send + Sync (Elem).
unsafe impl<T: Elem> Send for HostBuf<T> {}
// SAFETY: as above; shared access only reads (writes go through launches the caller orders).
unsafe impl<T: Elem> Sync for HostBuf<T> {}

impl<T: Elem> HostBuf<T> {
    fn from_box(b: Box<[T]>) -> Self {
        let len = b.len();
        // SAFETY: Box::into_raw never returns null.
        let ptr = unsafe { NonNull::new_unchecked(Box::into_raw(b) as *mut T) };
        HostBuf {
            ptr,
            len,
            _own: PhantomData,
        }
    }

    /// The elements (a copy).
    pub fn to_vec(&self) -> Vec<T> {
        // SAFETY: ptr holds len initialised elements; launches are synchronous, so no kernel is
        // writing while this reads.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }.to_vec()
    }

    fn write(&mut self, data: &[T]) {
        // SAFETY: `&mut self`: nothing else reads or writes; lengths are checked by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
            .copy_from_slice(data);
    }
}

impl<T> std::fmt::Debug for HostBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostBuf<{}>[{}] at {:p}",
            std::any::type_name::<T>(),
            self.len,
            self.ptr
        )
    }
}

impl<T> Drop for HostBuf<T> {
    fn drop(&mut self) {
        // SAFETY: ptr and len came from Box::into_raw of a Box<[T]> of len elements.
        drop(unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ))
        });
    }
}

impl<T: Elem> DevBuf<T> for HostBuf<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
}

impl Exec for Emu {
    type Buf<T: Elem> = HostBuf<T>;

    fn describe(&self) -> String {
        format!(
            "CPU emulation of the kernels ({})",
            match self.mode {
                Mode::Threads => "a thread per CUDA thread",
                Mode::Fibers => "fibers, blocks in parallel",
            }
        )
    }

    fn is_gpu(&self) -> bool {
        false
    }

    fn alloc<T: Elem>(&self, len: usize) -> Result<HostBuf<T>> {
        let mut b = vec![T::default(); len].into_boxed_slice();
        // SAFETY: every T: Elem is plain bits; 0xFF bytes are a valid (NaN / -1) value.
        unsafe {
            std::ptr::write_bytes(b.as_mut_ptr() as *mut u8, 0xFF, std::mem::size_of_val(&*b))
        };
        Ok(HostBuf::from_box(b))
    }

    fn zeros<T: Elem>(&self, len: usize) -> Result<HostBuf<T>> {
        // T::default() is zero for every Elem (numbers), as ValidAsZeroBits promises.
        Ok(HostBuf::from_box(
            vec![T::default(); len].into_boxed_slice(),
        ))
    }

    fn upload<T: Elem>(&self, data: &[T]) -> Result<HostBuf<T>> {
        Ok(HostBuf::from_box(data.to_vec().into_boxed_slice()))
    }

    fn upload_into<T: Elem>(&self, data: &[T], dst: &mut HostBuf<T>) -> Result<()> {
        check_len("emu upload", "destination", dst.len, data.len())?;
        dst.write(data);
        Ok(())
    }

    fn download<T: Elem>(&self, src: &HostBuf<T>) -> Result<Vec<T>> {
        Ok(src.to_vec())
    }

    fn copy<T: Elem>(&self, src: &HostBuf<T>, dst: &mut HostBuf<T>) -> Result<()> {
        check_len("emu copy", "destination", dst.len, src.len)?;
        let data = src.to_vec();
        dst.write(&data);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn time<F: FnMut() -> Result<()>>(
        &self,
        warmup: usize,
        reps: usize,
        mut work: F,
    ) -> Result<Timing> {
        for _ in 0..warmup {
            work()?;
        }
        let mut ms = Vec::with_capacity(reps.max(1));
        for _ in 0..reps.max(1) {
            let t = Instant::now();
            work()?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Timing::from_samples(ms)
    }

    unsafe fn launch(
        &self,
        module: &'static str,
        kernel: &'static str,
        cfg: LaunchConfig,
        args: &[KArg],
    ) -> Result<()> {
        let mut params: Vec<*mut c_void> = args.iter().map(KArg::as_param).collect();
        // SAFETY: forwarded from the caller (arguments match the kernel, buffers are large
        // enough); `params` points into `args`, which outlives the synchronous launch.
        unsafe { emu::launch_raw(self.mode, module, kernel, cfg, &mut params) }
    }

    fn gemm(
        &self,
        g: &Gemm,
        a: &HostBuf<bf16>,
        b: &HostBuf<bf16>,
        bias: Option<&HostBuf<bf16>>,
        c: &mut HostBuf<bf16>,
    ) -> Result<()> {
        blas::emu_gemm(self, g, a, b, bias, c)
    }

    fn gemm_f32_out(
        &self,
        g: &Gemm,
        a: &HostBuf<bf16>,
        b: &HostBuf<bf16>,
        c: &mut HostBuf<f32>,
    ) -> Result<()> {
        blas::emu_gemm_f32_out(self, g, a, b, c)
    }

    fn conv_forward(
        &self,
        s: &ConvShape,
        x: &HostBuf<bf16>,
        w: &HostBuf<bf16>,
        y: &mut HostBuf<bf16>,
    ) -> Result<()> {
        blas::emu_conv_forward(self, s, x, w, y)
    }

    fn conv_backward_data(
        &self,
        s: &ConvShape,
        w: &HostBuf<bf16>,
        dy: &HostBuf<bf16>,
        dx: &mut HostBuf<bf16>,
    ) -> Result<()> {
        blas::emu_conv_backward_data(self, s, w, dy, dx)
    }

    fn conv_backward_filter(
        &self,
        s: &ConvShape,
        x: &HostBuf<bf16>,
        dy: &HostBuf<bf16>,
        dw: &mut HostBuf<bf16>,
    ) -> Result<()> {
        blas::emu_conv_backward_filter(self, s, x, dy, dw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emu_buffers_round_trip_and_alloc_is_poisoned() {
        let ex = Emu::new(Mode::Fibers);
        let a: HostBuf<f32> = ex.alloc(5).unwrap();
        assert!(ex.download(&a).unwrap().iter().all(|v| v.is_nan()));
        let b: HostBuf<bf16> = ex.alloc(3).unwrap();
        assert!(ex.download(&b).unwrap().iter().all(|v| v.is_nan()));
        let i: HostBuf<i32> = ex.alloc(2).unwrap();
        assert_eq!(ex.download(&i).unwrap(), vec![-1, -1]);
        let z: HostBuf<f32> = ex.zeros(4).unwrap();
        assert_eq!(ex.download(&z).unwrap(), vec![0.0; 4]);
        let mut u = ex.upload(&[1.0f32, 2.0, 3.0]).unwrap();
        assert_eq!(ex.download(&u).unwrap(), vec![1.0, 2.0, 3.0]);
        ex.upload_into(&[4.0, 5.0, 6.0], &mut u).unwrap();
        let mut c: HostBuf<f32> = ex.alloc(3).unwrap();
        ex.copy(&u, &mut c).unwrap();
        assert_eq!(ex.download(&c).unwrap(), vec![4.0, 5.0, 6.0]);
        assert!(ex.upload_into(&[1.0], &mut c).is_err());
        assert!(ex.copy(&a, &mut c).is_err());
        assert_eq!(
            ex.download_bf16(&ex.upload_bf16(&[1.5, -2.0]).unwrap())
                .unwrap(),
            vec![1.5, -2.0]
        );
    }

    #[test]
    fn kernel_arguments_point_at_their_values() {
        let args = [
            KArg::Ptr(0xdead_beef),
            KArg::from(-3i32),
            KArg::from(7u32),
            KArg::from(2.5f32),
            KArg::from(0.25f64),
        ];
        // SAFETY: each pointer is read as the type its variant holds.
        unsafe {
            assert_eq!(*(args[0].as_param() as *const u64), 0xdead_beef);
            assert_eq!(*(args[1].as_param() as *const i32), -3);
            assert_eq!(*(args[2].as_param() as *const u32), 7);
            assert_eq!(*(args[3].as_param() as *const f32), 2.5);
            assert_eq!(*(args[4].as_param() as *const f64), 0.25);
        }
    }

    #[test]
    fn emu_timing_reports_every_repetition_and_errors_propagate() {
        let ex = Emu::new(Mode::Fibers);
        let mut n = 0;
        let t = ex
            .time(2, 5, || {
                n += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!((n, t.reps), (7, 5));
        assert!(t.min_ms <= t.median_ms);
        let e = ex
            .time(0, 1, || Err(Error::invalid("x", "boom")))
            .unwrap_err();
        assert!(e.to_string().contains("boom"));
        assert!(Timing::from_samples(vec![]).is_err());
    }
}

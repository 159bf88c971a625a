//! Convolutions through cuDNN: forward, backward-data and backward-filter, NHWC bf16 activations,
//! KRSC bf16 weights (the CPU backend's `[O, KH, KW, C]`), fp32 accumulation.
//!
//! Layout: cuDNN's descriptors always take dimensions in N, C, H, W order; the format tag
//! `CUDNN_TENSOR_NHWC` says the memory is channels-last. For filters, dims (K, C, R, S) with
//! `CUDNN_TENSOR_NHWC` mean memory K·R·S·C — exactly the engine's KRSC weight.
//!
//! Precision: tensors are bf16, the convolution descriptor's compute type is fp32 (cuDNN's
//! "pseudo-bf16" configuration: bf16 storage, fp32 accumulation), tensor-core math allowed.
//!
//! Per shape, descriptors are made once and each direction's algorithm is chosen once (cuDNN's
//! heuristic, first choice) and cached in a `HashMap` keyed by the shape; workspaces come from
//! the caching allocator, so a steady-state call allocates nothing from the driver.
//!
//! The shape type ([`ConvShape`]) and the length contract live in the device-neutral
//! `backend::device::blas`; the device model reaches this wrapper through `Exec::conv_forward`,
//! `Exec::conv_backward_data` and `Exec::conv_backward_filter` on the [`Gpu`](super::Gpu).

use super::alloc::{DeviceBuffer, DevicePool};
use super::cuda_err;
/// The shape type is device-neutral (`backend::device::blas`); re-exported here so that
/// `cuda::cudnn::ConvShape` keeps naming it.
pub use crate::backend::device::blas::ConvShape;
use crate::backend::device::blas::{
    OP_CONV_BACKWARD_DATA, OP_CONV_BACKWARD_FILTER, OP_CONV_FORWARD,
};
use crate::error::{Error, Result};
use cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn,
    FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::{CudaStream, CudaViewMut};
use half::bf16;
use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

/// Descriptors and chosen algorithms (with workspace bytes) of one shape.
struct Plan {
    x: TensorDescriptor<bf16>,
    w: FilterDescriptor<bf16>,
    y: TensorDescriptor<bf16>,
    conv: ConvDescriptor<f32>,
    fwd: Option<(sys::cudnnConvolutionFwdAlgo_t, usize)>,
    bwd_data: Option<(sys::cudnnConvolutionBwdDataAlgo_t, usize)>,
    bwd_filter: Option<(sys::cudnnConvolutionBwdFilterAlgo_t, usize)>,
}

/// A cuDNN handle on the compute stream and the per-shape plan cache.
pub struct Dnn {
    handle: Arc<Cudnn>,
    plans: RefCell<HashMap<ConvShape, Plan>>,
}

fn dnn_err(what: String, e: impl std::fmt::Debug) -> Error {
    cuda_err("cudnn", what, e)
}

/// Fits a dimension into cuDNN's `int`.
fn dim(v: usize, s: &ConvShape) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::shape("cudnn conv", format!("{s:?}: dimension {v} exceeds i32")))
}

impl Dnn {
    /// A handle on `stream`. Errors when cuDNN is not installed.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        // SAFETY: dlopen probe only (cudarc panics on first use of a missing library).
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::invalid(
                "cudnn",
                "libcudnn not found: put the cuDNN (pip nvidia-cudnn-cu13) libraries on LD_LIBRARY_PATH",
            ));
        }
        let handle =
            Cudnn::new(Arc::clone(stream)).map_err(|e| dnn_err("creating the handle".into(), e))?;
        Ok(Dnn {
            handle,
            plans: RefCell::new(HashMap::new()),
        })
    }

    /// Number of cached shapes.
    pub fn cached_plans(&self) -> usize {
        self.plans.borrow().len()
    }

    /// The plan of `s`, made on first use.
    fn with_plan<R>(&self, s: &ConvShape, f: impl FnOnce(&mut Plan) -> Result<R>) -> Result<R> {
        let mut plans = self.plans.borrow_mut();
        let plan = match plans.entry(*s) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert(self.make_plan(s)?),
        };
        f(plan)
    }

    fn make_plan(&self, s: &ConvShape) -> Result<Plan> {
        let (oh, ow) = s.out_hw()?;
        let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        let what = || format!("descriptors for {s:?}");
        let h = &self.handle;
        let x = h
            .create_4d_tensor::<bf16>(
                nhwc,
                [dim(s.n, s)?, dim(s.c, s)?, dim(s.h, s)?, dim(s.w, s)?],
            )
            .map_err(|e| dnn_err(what(), e))?;
        let y = h
            .create_4d_tensor::<bf16>(nhwc, [dim(s.n, s)?, dim(s.o, s)?, dim(oh, s)?, dim(ow, s)?])
            .map_err(|e| dnn_err(what(), e))?;
        let w = h
            .create_4d_filter::<bf16>(
                nhwc,
                [dim(s.o, s)?, dim(s.c, s)?, dim(s.kh, s)?, dim(s.kw, s)?],
            )
            .map_err(|e| dnn_err(what(), e))?;
        let (p, st) = (dim(s.pad, s)?, dim(s.stride, s)?);
        let mut conv = h
            .create_conv2d::<f32>(
                [p, p],
                [st, st],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(|e| dnn_err(what(), e))?;
        conv.set_math_type(sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
            .map_err(|e| dnn_err(what(), e))?;
        Ok(Plan {
            x,
            w,
            y,
            conv,
            fwd: None,
            bwd_data: None,
            bwd_filter: None,
        })
    }

    /// `y = conv(x, w)`: `x [n,h,w,c]`, `w [o,kh,kw,c]`, `y [n,oh,ow,o]`, all bf16.
    pub fn conv2d_forward(
        &self,
        pool: &Arc<DevicePool>,
        s: &ConvShape,
        x: &DeviceBuffer<bf16>,
        w: &DeviceBuffer<bf16>,
        y: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        s.check_forward(OP_CONV_FORWARD, x.len(), w.len(), y.len())?;
        self.with_plan(s, |p| {
            let op = ConvForward {
                conv: &p.conv,
                x: &p.x,
                w: &p.w,
                y: &p.y,
            };
            let what = || format!("forward {s:?}");
            let (algo, ws) = match p.fwd {
                Some(a) => a,
                None => {
                    let algo = op.pick_algorithm().map_err(|e| dnn_err(what(), e))?;
                    let ws = op
                        .get_workspace_size(algo)
                        .map_err(|e| dnn_err(what(), e))?;
                    p.fwd = Some((algo, ws));
                    (algo, ws)
                }
            };
            let mut wsb = workspace(pool, ws)?;
            let mut wsv = wsb.as_mut().map(|b| b.view_mut());
            // SAFETY: buffer lengths were checked against the descriptors' shape above.
            unsafe {
                op.launch::<CudaViewMut<u8>, _, _, _>(
                    algo,
                    wsv.as_mut(),
                    (bf16::ONE, bf16::ZERO),
                    &x.view(),
                    &w.view(),
                    &mut y.view_mut(),
                )
            }
            .map_err(|e| dnn_err(format!("{} (algorithm {algo:?})", what()), e))
        })
    }

    /// `dx = conv_backward_data(w, dy)`, the input gradient.
    pub fn conv2d_backward_data(
        &self,
        pool: &Arc<DevicePool>,
        s: &ConvShape,
        w: &DeviceBuffer<bf16>,
        dy: &DeviceBuffer<bf16>,
        dx: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        s.check_backward_data(OP_CONV_BACKWARD_DATA, w.len(), dy.len(), dx.len())?;
        self.with_plan(s, |p| {
            let op = ConvBackwardData {
                conv: &p.conv,
                dx: &p.x,
                w: &p.w,
                dy: &p.y,
            };
            let what = || format!("backward-data {s:?}");
            let (algo, ws) = match p.bwd_data {
                Some(a) => a,
                None => {
                    let algo = op.pick_algorithm().map_err(|e| dnn_err(what(), e))?;
                    let ws = op
                        .get_workspace_size(algo)
                        .map_err(|e| dnn_err(what(), e))?;
                    p.bwd_data = Some((algo, ws));
                    (algo, ws)
                }
            };
            let mut wsb = workspace(pool, ws)?;
            let mut wsv = wsb.as_mut().map(|b| b.view_mut());
            // SAFETY: buffer lengths were checked against the descriptors' shape above.
            unsafe {
                op.launch::<CudaViewMut<u8>, _, _, _>(
                    algo,
                    wsv.as_mut(),
                    (bf16::ONE, bf16::ZERO),
                    &mut dx.view_mut(),
                    &w.view(),
                    &dy.view(),
                )
            }
            .map_err(|e| dnn_err(format!("{} (algorithm {algo:?})", what()), e))
        })
    }

    /// `dw = conv_backward_filter(x, dy)`, the weight gradient (bf16 out, fp32 accumulation).
    pub fn conv2d_backward_filter(
        &self,
        pool: &Arc<DevicePool>,
        s: &ConvShape,
        x: &DeviceBuffer<bf16>,
        dy: &DeviceBuffer<bf16>,
        dw: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        s.check_backward_filter(OP_CONV_BACKWARD_FILTER, x.len(), dy.len(), dw.len())?;
        self.with_plan(s, |p| {
            let op = ConvBackwardFilter {
                conv: &p.conv,
                x: &p.x,
                dw: &p.w,
                dy: &p.y,
            };
            let what = || format!("backward-filter {s:?}");
            let (algo, ws) = match p.bwd_filter {
                Some(a) => a,
                None => {
                    let algo = op.pick_algorithm().map_err(|e| dnn_err(what(), e))?;
                    let ws = op
                        .get_workspace_size(algo)
                        .map_err(|e| dnn_err(what(), e))?;
                    p.bwd_filter = Some((algo, ws));
                    (algo, ws)
                }
            };
            let mut wsb = workspace(pool, ws)?;
            let mut wsv = wsb.as_mut().map(|b| b.view_mut());
            // SAFETY: buffer lengths were checked against the descriptors' shape above.
            unsafe {
                op.launch::<CudaViewMut<u8>, _, _, _>(
                    algo,
                    wsv.as_mut(),
                    (bf16::ONE, bf16::ZERO),
                    &x.view(),
                    &mut dw.view_mut(),
                    &dy.view(),
                )
            }
            .map_err(|e| dnn_err(format!("{} (algorithm {algo:?})", what()), e))
        })
    }
}

/// A workspace of `bytes` from the caching allocator (`None` when the algorithm needs none).
fn workspace(pool: &Arc<DevicePool>, bytes: usize) -> Result<Option<DeviceBuffer<u8>>> {
    if bytes == 0 {
        Ok(None)
    } else {
        DeviceBuffer::new(pool, bytes).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimensions_beyond_cudnns_int_are_refused() {
        let s = ConvShape {
            n: 1,
            h: 8,
            w: 8,
            c: 3,
            o: 4,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        };
        assert_eq!(dim(8, &s).unwrap(), 8);
        let e = dim(1 << 31, &s).unwrap_err().to_string();
        assert!(e.contains("exceeds i32"), "{e}");
    }
}

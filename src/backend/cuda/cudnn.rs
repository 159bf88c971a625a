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

use super::alloc::{DeviceBuffer, DevicePool};
use super::cuda_err;
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

/// The geometry of one 2-D convolution (square stride and padding, as the CPU backend's
/// `Conv2dParams`): input `[n, h, w, c]`, weight `[o, kh, kw, c]`, output `[n, oh, ow, o]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Batch.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub c: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (each side, both axes).
    pub pad: usize,
}

impl ConvShape {
    /// Output height and width, `(h + 2p − kh)/s + 1` (floor), or an error when the kernel does
    /// not fit the padded input.
    pub fn out_hw(&self) -> Result<(usize, usize)> {
        if self.stride == 0 || self.kh == 0 || self.kw == 0 {
            return Err(Error::invalid(
                "cudnn conv",
                format!("{self:?}: stride and kernel must be ≥ 1"),
            ));
        }
        let (ph, pw) = (self.h + 2 * self.pad, self.w + 2 * self.pad);
        if ph < self.kh || pw < self.kw {
            return Err(Error::shape(
                "cudnn conv",
                format!("{self:?}: kernel larger than the padded input"),
            ));
        }
        Ok((
            (ph - self.kh) / self.stride + 1,
            (pw - self.kw) / self.stride + 1,
        ))
    }

    /// Elements of the input.
    pub fn x_len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }

    /// Elements of the weight.
    pub fn w_len(&self) -> usize {
        self.o * self.kh * self.kw * self.c
    }

    /// Elements of the output (0 when the shape is invalid).
    pub fn y_len(&self) -> usize {
        self.out_hw()
            .map(|(oh, ow)| self.n * oh * ow * self.o)
            .unwrap_or(0)
    }

    /// Floating-point operations of the forward (each backward costs the same).
    pub fn flops(&self) -> f64 {
        2.0 * self.y_len() as f64 * (self.kh * self.kw * self.c) as f64
    }
}

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
        check(s, "x", x.len(), s.x_len())?;
        check(s, "w", w.len(), s.w_len())?;
        check(s, "y", y.len(), s.y_len())?;
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
        check(s, "w", w.len(), s.w_len())?;
        check(s, "dy", dy.len(), s.y_len())?;
        check(s, "dx", dx.len(), s.x_len())?;
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
        check(s, "x", x.len(), s.x_len())?;
        check(s, "dy", dy.len(), s.y_len())?;
        check(s, "dw", dw.len(), s.w_len())?;
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

/// A buffer too short for the shape would be read or written out of bounds: refuse it.
fn check(s: &ConvShape, name: &str, have: usize, want: usize) -> Result<()> {
    if want == 0 {
        s.out_hw()?;
    }
    if have != want {
        return Err(Error::shape(
            "cudnn conv",
            format!("{name} holds {have} elements, {s:?} needs {want}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ConvShape {
        ConvShape {
            n: 2,
            h: 56,
            w: 56,
            c: 64,
            o: 128,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: 1,
        }
    }

    #[test]
    fn output_size_matches_the_cpu_formula() {
        let s = shape();
        assert_eq!(s.out_hw().unwrap(), (28, 28));
        assert_eq!(s.y_len(), 2 * 28 * 28 * 128);
        assert_eq!(s.w_len(), 128 * 9 * 64);
        let stem = ConvShape {
            h: 224,
            w: 224,
            c: 3,
            o: 64,
            kh: 7,
            kw: 7,
            pad: 3,
            ..s
        };
        assert_eq!(stem.out_hw().unwrap(), (112, 112));
        let patch = ConvShape {
            h: 224,
            w: 224,
            c: 3,
            o: 384,
            kh: 16,
            kw: 16,
            stride: 16,
            pad: 0,
            ..s
        };
        assert_eq!(patch.out_hw().unwrap(), (14, 14));
        assert!(ConvShape { stride: 0, ..s }.out_hw().is_err());
        assert!(ConvShape {
            h: 2,
            w: 2,
            pad: 0,
            ..s
        }
        .out_hw()
        .is_err());
    }

    #[test]
    fn buffer_lengths_are_checked() {
        let s = shape();
        assert!(check(&s, "x", s.x_len(), s.x_len()).is_ok());
        let e = check(&s, "dy", 5, s.y_len()).unwrap_err().to_string();
        assert!(e.contains("dy holds 5"), "{e}");
    }
}

//! The library work of the device model: GEMMs and 2-D convolutions, reached through
//! [`Exec::gemm`], [`Exec::gemm_f32_out`], [`Exec::conv_forward`], [`Exec::conv_backward_data`]
//! and [`Exec::conv_backward_filter`]. On the GPU they are cuBLASLt (`cuda::cublaslt::Lt`) and
//! cuDNN (`cuda::cudnn::Dnn`); on the emulation ([`Emu`]) they are the CPU backend
//! (`cpu::matmul::matmul`, `cpu::conv::conv2d_forward` / `conv2d_backward`) run on f32 copies of
//! the bf16 operands, with the result rounded to bf16 once at the end: the GPU's arithmetic
//! (bf16 operands, fp32 accumulation, one rounding of the output), so that a device model on
//! [`Emu`] reproduces the CPU model within bf16 tolerance.
//!
//! Why this file: the contract is written once. The shape types ([`Gemm`], [`Epilogue`],
//! [`ConvShape`]) are device-neutral and live here (the cuda modules re-export them), and so do
//! the length checks ([`Gemm::check_lengths`], [`ConvShape::check_forward`], ...), which both
//! executors call before any work: every buffer must hold exactly the elements its shape says
//! (`check_len`), and the error names the buffer.
//!
//! GEMM semantics (both executors), row-major as [`Gemm`] documents:
//! `C = act(op(A)·op(B) + [C] + [bias])`, i.e. cuBLASLt's `alpha·op(A)·op(B) + beta·C` with
//! `alpha = 1`, `beta = accumulate`, then the epilogue: the bias (`[n]`, one value per output
//! column) is added and the activation applied to the whole sum, old C included. With
//! `accumulate = false` C is never read, so an uninitialised (NaN-poisoned) C does not leak.
//! The GELU epilogues are the tanh approximation ([`gelu_tanh`]), what cuBLASLt computes; the
//! CPU backend's and the own kernels' GELU is the exact erf form, within 4.8e-4 absolute of it.
//!
//! Convolutions: NHWC activations, KRSC (`[o, kh, kw, c]`) weights, bf16 in and out, fp32
//! accumulation. On the emulation each direction is the CPU backend's own pass
//! (`conv2d_forward`, `conv2d_backward_data`, `conv2d_backward` without dx).
//!
//! [`check_rows`] holds the GEMM and convolution rows of the device check (groups `gemm`,
//! `conv`): ViT-S/16's linear layers and ResNet-50's convolution kinds against the CPU backend.

use super::check::{random, round_bf16, Checker, Measured, TOL_BF16};
use super::{check_len, DevBuf, Emu, Exec, HostBuf};
use crate::backend::cpu;
use crate::backend::cpu::conv::Conv2dParams;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::testing::rel_l2;
use half::bf16;
use serde_json::json;

/// What is fused after the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// Plain product.
    None,
    /// `+ bias` (per output column of the row-major result).
    Bias,
    /// `gelu(· + bias)` (tanh-approximated GELU, [`gelu_tanh`]).
    BiasGelu,
    /// `relu(· + bias)`.
    BiasRelu,
    /// `gelu(·)` (tanh-approximated GELU, [`gelu_tanh`]).
    Gelu,
}

impl Epilogue {
    /// Whether the epilogue adds a bias (and so needs one).
    pub fn has_bias(self) -> bool {
        matches!(
            self,
            Epilogue::Bias | Epilogue::BiasGelu | Epilogue::BiasRelu
        )
    }

    /// The activation applied to one value of `product + [C] + [bias]` (identity when none).
    pub fn activate(self, v: f32) -> f32 {
        match self {
            Epilogue::None | Epilogue::Bias => v,
            Epilogue::BiasRelu => v.max(0.0),
            Epilogue::BiasGelu | Epilogue::Gelu => gelu_tanh(v),
        }
    }
}

/// GELU, tanh approximation: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, PyTorch's
/// `gelu(approximate="tanh")` and what cuBLASLt's GELU epilogues compute; within 4.8e-4 absolute
/// of the exact (erf) GELU everywhere.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// One row-major GEMM `C[m,n] (+)= op(A)[m,k] · op(B)[k,n]`, as `backend::cpu::matmul` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gemm {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// A is stored `[k, m]` (row-major) and used transposed.
    pub trans_a: bool,
    /// B is stored `[n, k]` and used transposed (a PyTorch `[out, in]` weight).
    pub trans_b: bool,
    /// Fused epilogue.
    pub epilogue: Epilogue,
    /// `C += product` (gradient accumulation) instead of `C = product`.
    pub accumulate: bool,
}

impl Gemm {
    /// The GEMM of a linear layer forward: `y[rows, out] = x[rows, in] · w[out, in]ᵀ (+ epilogue)`.
    pub fn linear(rows: usize, inp: usize, out: usize, epilogue: Epilogue) -> Self {
        Gemm {
            m: rows,
            n: out,
            k: inp,
            trans_a: false,
            trans_b: true,
            epilogue,
            accumulate: false,
        }
    }

    /// Floating-point operations (2·m·n·k).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }

    /// A as stored, `[rows, cols]` row-major: `[k, m]` when `trans_a`, else `[m, k]`.
    pub fn a_dims(&self) -> [usize; 2] {
        if self.trans_a {
            [self.k, self.m]
        } else {
            [self.m, self.k]
        }
    }

    /// B as stored, `[rows, cols]` row-major: `[n, k]` when `trans_b`, else `[k, n]`.
    pub fn b_dims(&self) -> [usize; 2] {
        if self.trans_b {
            [self.n, self.k]
        } else {
            [self.k, self.n]
        }
    }

    /// The contract of [`Exec::gemm`] (bf16 C): A, B and C hold exactly the elements of their
    /// stored shapes, a bias (`[n]`) is given exactly when the epilogue has one. `op` names the
    /// calling operation in the error, which names the buffer.
    pub fn check_lengths(
        &self,
        op: &'static str,
        a: usize,
        b: usize,
        bias: Option<usize>,
        c: usize,
    ) -> Result<()> {
        self.check_operands(op, a, b, c)?;
        match (self.epilogue.has_bias(), bias) {
            (true, None) => Err(Error::invalid(
                op,
                format!(
                    "the epilogue {:?} needs a bias of {} elements",
                    self.epilogue, self.n
                ),
            )),
            (false, Some(_)) => Err(Error::invalid(
                op,
                format!(
                    "a bias was given but the epilogue is {:?} (use Bias, BiasGelu or BiasRelu)",
                    self.epilogue
                ),
            )),
            (true, Some(len)) => check_len(op, "bias ([n], one per output column)", len, self.n),
            (false, None) => Ok(()),
        }
    }

    /// The contract of [`Exec::gemm_f32_out`] (fp32 C): as [`Gemm::check_lengths`], and no bias
    /// epilogue (its bias would have to be fp32 too).
    pub fn check_lengths_f32_out(
        &self,
        op: &'static str,
        a: usize,
        b: usize,
        c: usize,
    ) -> Result<()> {
        if self.epilogue.has_bias() {
            return Err(Error::invalid(
                op,
                format!(
                    "the epilogue {:?} has a bias, which needs a bf16 output (use gemm)",
                    self.epilogue
                ),
            ));
        }
        self.check_operands(op, a, b, c)
    }

    /// A, B and C lengths against the shape (products checked for overflow).
    fn check_operands(&self, op: &'static str, a: usize, b: usize, c: usize) -> Result<()> {
        let [ar, ac] = self.a_dims();
        let [br, bc] = self.b_dims();
        check_len(
            op,
            &format!("A (stored [{ar}, {ac}])"),
            a,
            product(op, &[ar, ac])?,
        )?;
        check_len(
            op,
            &format!("B (stored [{br}, {bc}])"),
            b,
            product(op, &[br, bc])?,
        )?;
        check_len(
            op,
            &format!("C ([{}, {}])", self.m, self.n),
            c,
            product(op, &[self.m, self.n])?,
        )
    }
}

/// The operation names errors carry (the [`Exec`] method's name, on both executors).
pub const OP_GEMM: &str = "gemm";
/// See [`OP_GEMM`].
pub const OP_GEMM_F32_OUT: &str = "gemm_f32_out";
/// See [`OP_GEMM`].
pub const OP_CONV_FORWARD: &str = "conv_forward";
/// See [`OP_GEMM`].
pub const OP_CONV_BACKWARD_DATA: &str = "conv_backward_data";
/// See [`OP_GEMM`].
pub const OP_CONV_BACKWARD_FILTER: &str = "conv_backward_filter";

/// The product of `dims`, or an error when it overflows (a shape no buffer can hold).
fn product(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |p, &d| p.checked_mul(d))
        .ok_or_else(|| Error::shape(op, format!("{dims:?} has more elements than fit a usize")))
}

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
                "conv",
                format!("{self:?}: stride and kernel must be ≥ 1"),
            ));
        }
        let (ph, pw) = (self.h + 2 * self.pad, self.w + 2 * self.pad);
        if ph < self.kh || pw < self.kw {
            return Err(Error::shape(
                "conv",
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

    /// The input's dimensions `[n, h, w, c]`.
    pub fn x_dims(&self) -> [usize; 4] {
        [self.n, self.h, self.w, self.c]
    }

    /// The weight's dimensions `[o, kh, kw, c]` (KRSC).
    pub fn w_dims(&self) -> [usize; 4] {
        [self.o, self.kh, self.kw, self.c]
    }

    /// The output's dimensions `[n, oh, ow, o]`, or the error of [`ConvShape::out_hw`].
    pub fn y_dims(&self) -> Result<[usize; 4]> {
        let (oh, ow) = self.out_hw()?;
        Ok([self.n, oh, ow, self.o])
    }

    /// The contract of [`Exec::conv_forward`]: a valid shape, `x`, `w`, `y` of exactly its sizes.
    pub fn check_forward(&self, op: &'static str, x: usize, w: usize, y: usize) -> Result<()> {
        let [xl, wl, yl] = self.lengths(op)?;
        check_len(op, &format!("x ({})", dims_str(&self.x_dims())), x, xl)?;
        check_len(op, &format!("w ({})", dims_str(&self.w_dims())), w, wl)?;
        check_len(op, &format!("y ({})", dims_str(&self.y_dims()?)), y, yl)
    }

    /// The contract of [`Exec::conv_backward_data`]: `w`, `dy`, `dx` of exactly the shape's sizes.
    pub fn check_backward_data(
        &self,
        op: &'static str,
        w: usize,
        dy: usize,
        dx: usize,
    ) -> Result<()> {
        let [xl, wl, yl] = self.lengths(op)?;
        check_len(op, &format!("w ({})", dims_str(&self.w_dims())), w, wl)?;
        check_len(op, &format!("dy ({})", dims_str(&self.y_dims()?)), dy, yl)?;
        check_len(op, &format!("dx ({})", dims_str(&self.x_dims())), dx, xl)
    }

    /// The contract of [`Exec::conv_backward_filter`]: `x`, `dy`, `dw` of exactly the shape's
    /// sizes.
    pub fn check_backward_filter(
        &self,
        op: &'static str,
        x: usize,
        dy: usize,
        dw: usize,
    ) -> Result<()> {
        let [xl, wl, yl] = self.lengths(op)?;
        check_len(op, &format!("x ({})", dims_str(&self.x_dims())), x, xl)?;
        check_len(op, &format!("dy ({})", dims_str(&self.y_dims()?)), dy, yl)?;
        check_len(op, &format!("dw ({})", dims_str(&self.w_dims())), dw, wl)
    }

    /// Validates the shape (every size ≥ 1, the kernel fits, no overflow) and returns the
    /// element counts of x, w and y.
    fn lengths(&self, op: &'static str) -> Result<[usize; 3]> {
        if [self.n, self.h, self.w, self.c, self.o].contains(&0) {
            return Err(Error::shape(
                op,
                format!("{self:?}: batch, height, width and channels must be ≥ 1"),
            ));
        }
        let y = self.y_dims()?;
        Ok([
            product(op, &self.x_dims())?,
            product(op, &self.w_dims())?,
            product(op, &y)?,
        ])
    }
}

/// `[a, b, c, d]` as text for error messages.
fn dims_str(d: &[usize]) -> String {
    format!("{d:?}")
}

// ---------------------------------------------------------------------------------------------
// The emulation: the CPU backend on f32 copies, results rounded to bf16.

/// bf16 values widened to f32 (exact).
fn widen(v: &HostBuf<bf16>) -> Vec<f32> {
    v.to_vec().into_iter().map(bf16::to_f32).collect()
}

/// f32 values rounded to the nearest bf16 (ties to even), as the GPU stores its results.
fn narrow(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// `act(op(A)·op(B) + [c] + [bias])` in f32: `c` is the accumulator's start (the old C when
/// accumulating, else `None`: zeros).
fn product_f32(
    g: &Gemm,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    c: Option<Vec<f32>>,
) -> Vec<f32> {
    let mut acc = c.unwrap_or_else(|| vec![0.0; g.m * g.n]);
    if let (Some(bias), true) = (bias, g.n > 0) {
        for row in acc.chunks_exact_mut(g.n) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
    cpu::matmul::matmul(g.m, g.n, g.k, a, g.trans_a, b, g.trans_b, &mut acc, true);
    if !matches!(g.epilogue, Epilogue::None | Epilogue::Bias) {
        for v in &mut acc {
            *v = g.epilogue.activate(*v);
        }
    }
    acc
}

/// [`Exec::gemm`] on the emulation.
pub(super) fn emu_gemm(
    ex: &Emu,
    g: &Gemm,
    a: &HostBuf<bf16>,
    b: &HostBuf<bf16>,
    bias: Option<&HostBuf<bf16>>,
    c: &mut HostBuf<bf16>,
) -> Result<()> {
    g.check_lengths(OP_GEMM, a.len(), b.len(), bias.map(|v| v.len()), c.len())?;
    let start = g.accumulate.then(|| widen(c));
    let bias = bias.map(widen);
    let out = product_f32(g, &widen(a), &widen(b), bias.as_deref(), start);
    ex.upload_into(&narrow(&out), c)
}

/// [`Exec::gemm_f32_out`] on the emulation.
pub(super) fn emu_gemm_f32_out(
    ex: &Emu,
    g: &Gemm,
    a: &HostBuf<bf16>,
    b: &HostBuf<bf16>,
    c: &mut HostBuf<f32>,
) -> Result<()> {
    g.check_lengths_f32_out(OP_GEMM_F32_OUT, a.len(), b.len(), c.len())?;
    let start = g.accumulate.then(|| c.to_vec());
    let out = product_f32(g, &widen(a), &widen(b), None, start);
    ex.upload_into(&out, c)
}

/// A bf16 buffer as an f32 tensor of `dims`.
fn tensor(v: &HostBuf<bf16>, dims: &[usize]) -> Result<Tensor<f32>> {
    Tensor::from_vec(widen(v), dims)
}

/// The CPU backend's parameters of `s`.
fn params(s: &ConvShape) -> Conv2dParams {
    Conv2dParams {
        stride: s.stride,
        padding: s.pad,
    }
}

/// [`Exec::conv_forward`] on the emulation.
pub(super) fn emu_conv_forward(
    ex: &Emu,
    s: &ConvShape,
    x: &HostBuf<bf16>,
    w: &HostBuf<bf16>,
    y: &mut HostBuf<bf16>,
) -> Result<()> {
    s.check_forward(OP_CONV_FORWARD, x.len(), w.len(), y.len())?;
    let out = cpu::conv::conv2d_forward(
        &tensor(x, &s.x_dims())?,
        &tensor(w, &s.w_dims())?,
        None,
        params(s),
    )?;
    ex.upload_into(&narrow(out.data()), y)
}

/// [`Exec::conv_backward_data`] on the emulation (`conv2d_backward_data`: the input gradient
/// alone).
pub(super) fn emu_conv_backward_data(
    ex: &Emu,
    s: &ConvShape,
    w: &HostBuf<bf16>,
    dy: &HostBuf<bf16>,
    dx: &mut HostBuf<bf16>,
) -> Result<()> {
    s.check_backward_data(OP_CONV_BACKWARD_DATA, w.len(), dy.len(), dx.len())?;
    let d = cpu::conv::conv2d_backward_data(
        &s.x_dims(),
        &tensor(w, &s.w_dims())?,
        &tensor(dy, &s.y_dims()?)?,
        params(s),
    )?;
    ex.upload_into(&narrow(d.data()), dx)
}

/// [`Exec::conv_backward_filter`] on the emulation (`conv2d_backward` without `dx`; the weight's
/// values do not enter `dw`, so a zero weight of the right shape stands in).
pub(super) fn emu_conv_backward_filter(
    ex: &Emu,
    s: &ConvShape,
    x: &HostBuf<bf16>,
    dy: &HostBuf<bf16>,
    dw: &mut HostBuf<bf16>,
) -> Result<()> {
    s.check_backward_filter(OP_CONV_BACKWARD_FILTER, x.len(), dy.len(), dw.len())?;
    let g = cpu::conv::conv2d_backward(
        &tensor(x, &s.x_dims())?,
        &Tensor::zeros(&s.w_dims()),
        &tensor(dy, &s.y_dims()?)?,
        params(s),
        false,
        false,
    )?;
    ex.upload_into(&narrow(g.dw.data()), dw)
}

// ---------------------------------------------------------------------------------------------
// The device check's rows.

/// A GEMM row: random bf16 operands through [`Exec::gemm`] / [`Exec::gemm_f32_out`], against
/// the CPU's `matmul` on the same rounded values (exact-erf GELU: the reference the engine's
/// CPU model uses).
fn gemm_row<E: Exec>(c: &mut Checker<'_, E>, id: &str, g: Gemm, f32_out: bool) {
    let shape = format!(
        "{}x{}x{}{}{}",
        g.m,
        g.n,
        g.k,
        if g.trans_a { " Aᵀ" } else { "" },
        if g.trans_b { " Bᵀ" } else { "" }
    );
    let torch = json!({
        "kind": "matmul", "m": g.m, "n": g.n, "k": g.k, "trans_a": g.trans_a, "trans_b": g.trans_b,
        "out": if f32_out { "f32" } else { "bf16" },
        "bias": g.epilogue.has_bias(),
        "gelu": matches!(g.epilogue, Epilogue::BiasGelu | Epilogue::Gelu),
        "relu": matches!(g.epilogue, Epilogue::BiasRelu),
    });
    c.row("gemm", id, shape, torch, |c| {
        let a = round_bf16(&random(&format!("{id}.a"), g.m * g.k));
        let b = round_bf16(&random(&format!("{id}.b"), g.k * g.n));
        let bias = round_bf16(&random(&format!("{id}.bias"), g.n));
        let has_bias = g.epilogue.has_bias();
        // CPU reference.
        let mut want = vec![0f32; g.m * g.n];
        if has_bias {
            for row in want.chunks_exact_mut(g.n) {
                row.copy_from_slice(&bias);
            }
        }
        cpu::matmul::matmul(
            g.m, g.n, g.k, &a, g.trans_a, &b, g.trans_b, &mut want, has_bias,
        );
        let want = match g.epilogue {
            Epilogue::BiasGelu | Epilogue::Gelu => {
                cpu::elementwise::gelu_forward(&Tensor::from_vec(want, &[g.m, g.n])?)?.into_vec()
            }
            Epilogue::BiasRelu => want.into_iter().map(|v| v.max(0.0)).collect(),
            _ => want,
        };
        let (ad, bd) = (c.dev.upload_bf16(&a)?, c.dev.upload_bf16(&b)?);
        let biasd = c.dev.upload_bf16(&bias)?;
        let bias_arg = has_bias.then_some(&biasd);
        let (got, t, out_bytes) = if f32_out {
            let mut y = c.dev.alloc::<f32>(g.m * g.n)?;
            c.dev.gemm_f32_out(&g, &ad, &bd, &mut y)?;
            let got = c.dev.download(&y)?;
            let t = c.time(|| c.dev.gemm_f32_out(&g, &ad, &bd, &mut y))?;
            (got, t, 4.0)
        } else {
            let mut y = c.dev.alloc::<bf16>(g.m * g.n)?;
            c.dev.gemm(&g, &ad, &bd, bias_arg, &mut y)?;
            let got = c.dev.download_bf16(&y)?;
            let t = c.time(|| c.dev.gemm(&g, &ad, &bd, bias_arg, &mut y))?;
            (got, t, 2.0)
        };
        let tol = if f32_out { 1e-3 } else { TOL_BF16 };
        Ok(Measured {
            err: Some((rel_l2(&got, &want), tol)),
            time: Some(t),
            flops: g.flops(),
            bytes: 2.0 * (g.m * g.k + g.k * g.n) as f64 + out_bytes * (g.m * g.n) as f64,
            note: format!("{:.0} TFLOP/s", g.flops() / t.median_ms / 1e9),
            ..Default::default()
        })
    });
}

/// ViT-S/16 linear layers (forward with fused epilogues, both backward products) and a head.
fn gemm_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let rows = if c.opts.quick { 394 } else { 64 * 197 };
    let (d, h) = (384, 1536);
    gemm_row(
        c,
        "linear_fc1_bias_gelu",
        Gemm::linear(rows, d, h, Epilogue::BiasGelu),
        false,
    );
    gemm_row(
        c,
        "linear_fc2_bias",
        Gemm::linear(rows, h, d, Epilogue::Bias),
        false,
    );
    gemm_row(
        c,
        "linear_qkv_plain",
        Gemm::linear(rows, d, 3 * d, Epilogue::None),
        false,
    );
    // Backward of fc1: dx = dy[rows, h] · w[h, d]; dw = dy[rows, h]ᵀ · x[rows, d] (fp32 out).
    let dx = Gemm {
        m: rows,
        n: d,
        k: h,
        trans_a: false,
        trans_b: false,
        epilogue: Epilogue::None,
        accumulate: false,
    };
    gemm_row(c, "linear_fc1_dx", dx, false);
    let dw = Gemm {
        m: h,
        n: d,
        k: rows,
        trans_a: true,
        trans_b: false,
        epilogue: Epilogue::None,
        accumulate: false,
    };
    gemm_row(c, "linear_fc1_dw_f32", dw, true);
    let b = if c.opts.quick { 64 } else { 512 };
    gemm_row(
        c,
        "head_relu",
        Gemm::linear(b, 2048, 2048, Epilogue::BiasRelu),
        false,
    );
}

/// Re-creates an engine error from a borrowed one (a reference computed once, used by rows).
fn clone_err(e: &Error) -> Error {
    Error::invalid("device-check", e.to_string())
}

/// One convolution shape: forward, backward-data and backward-filter through the [`Exec`]
/// methods, against the CPU backend on the same bf16-rounded values.
fn conv_case<E: Exec>(c: &mut Checker<'_, E>, name: &str, s: ConvShape) {
    let (oh, ow) = match s.out_hw() {
        Ok(v) => v,
        Err(_) => return,
    };
    let shape = format!(
        "n{} {}x{}x{}->{} k{} s{} p{}",
        s.n, s.h, s.w, s.c, s.o, s.kh, s.stride, s.pad
    );
    let torch = |dir: &str| {
        json!({"kind": "conv", "dir": dir, "n": s.n, "h": s.h, "w": s.w, "c": s.c, "o": s.o,
               "k": s.kh, "stride": s.stride, "pad": s.pad})
    };
    let p = params(&s);
    let x = round_bf16(&random(&format!("{name}.x"), s.x_len()));
    let w = round_bf16(&random(&format!("{name}.w"), s.w_len()));
    let dy = round_bf16(&random(&format!("{name}.dy"), s.y_len()));
    let xt = Tensor::from_vec(x.clone(), &[s.n, s.h, s.w, s.c]);
    let wt = Tensor::from_vec(w.clone(), &[s.o, s.kh, s.kw, s.c]);
    let dyt = Tensor::from_vec(dy.clone(), &[s.n, oh, ow, s.o]);
    let elems = |a: usize, b: usize, o: usize| 2.0 * (a + b + o) as f64;
    c.row(
        "conv",
        &format!("{name}_fwd"),
        shape.clone(),
        torch("fwd"),
        |c| {
            let want = cpu::conv::conv2d_forward(
                xt.as_ref().map_err(clone_err)?,
                wt.as_ref().map_err(clone_err)?,
                None,
                p,
            )?;
            let (xd, wd) = (c.dev.upload_bf16(&x)?, c.dev.upload_bf16(&w)?);
            let mut yd = c.dev.alloc::<bf16>(s.y_len())?;
            c.dev.conv_forward(&s, &xd, &wd, &mut yd)?;
            let got = c.dev.download_bf16(&yd)?;
            let t = c.time(|| c.dev.conv_forward(&s, &xd, &wd, &mut yd))?;
            Ok(Measured {
                err: Some((rel_l2(&got, want.data()), TOL_BF16)),
                time: Some(t),
                flops: s.flops(),
                bytes: elems(s.x_len(), s.w_len(), s.y_len()),
                ..Default::default()
            })
        },
    );
    let grads = || {
        cpu::conv::conv2d_backward(
            xt.as_ref().map_err(clone_err)?,
            wt.as_ref().map_err(clone_err)?,
            dyt.as_ref().map_err(clone_err)?,
            p,
            true,
            false,
        )
    };
    // Computed only when a backward row is selected (the filter may leave them out).
    let grads = (c.wants(&format!("{name}_dgrad")) || c.wants(&format!("{name}_wgrad")))
        .then(grads)
        .unwrap_or_else(|| Err(Error::invalid("device-check", "not computed")));
    let grads = grads.as_ref();
    c.row(
        "conv",
        &format!("{name}_dgrad"),
        shape.clone(),
        torch("bwd_data"),
        |c| {
            let g = grads.map_err(clone_err)?;
            let want =
                g.dx.as_ref()
                    .ok_or_else(|| Error::invalid("device-check", "CPU conv returned no dx"))?;
            let (wd, dyd) = (c.dev.upload_bf16(&w)?, c.dev.upload_bf16(&dy)?);
            let mut dxd = c.dev.alloc::<bf16>(s.x_len())?;
            c.dev.conv_backward_data(&s, &wd, &dyd, &mut dxd)?;
            let got = c.dev.download_bf16(&dxd)?;
            let t = c.time(|| c.dev.conv_backward_data(&s, &wd, &dyd, &mut dxd))?;
            Ok(Measured {
                err: Some((rel_l2(&got, want.data()), TOL_BF16)),
                time: Some(t),
                flops: s.flops(),
                bytes: elems(s.x_len(), s.w_len(), s.y_len()),
                ..Default::default()
            })
        },
    );
    c.row(
        "conv",
        &format!("{name}_wgrad"),
        shape,
        torch("bwd_filter"),
        |c| {
            let g = grads.map_err(clone_err)?;
            let (xd, dyd) = (c.dev.upload_bf16(&x)?, c.dev.upload_bf16(&dy)?);
            let mut dwd = c.dev.alloc::<bf16>(s.w_len())?;
            c.dev.conv_backward_filter(&s, &xd, &dyd, &mut dwd)?;
            let got = c.dev.download_bf16(&dwd)?;
            let t = c.time(|| c.dev.conv_backward_filter(&s, &xd, &dyd, &mut dwd))?;
            Ok(Measured {
                err: Some((rel_l2(&got, g.dw.data()), TOL_BF16)),
                time: Some(t),
                flops: s.flops(),
                bytes: elems(s.x_len(), s.w_len(), s.y_len()),
                ..Default::default()
            })
        },
    );
}

/// ResNet-50's convolution kinds: stem, 3x3 stride 1 and 2, 1x1, and ViT's patch embedding.
fn conv_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let n = if c.opts.quick { 2 } else { 16 };
    let base = ConvShape {
        n,
        h: 56,
        w: 56,
        c: 64,
        o: 64,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    conv_case(c, "conv3x3_s1", base);
    conv_case(
        c,
        "conv1x1_c256",
        ConvShape {
            c: 256,
            o: 64,
            kh: 1,
            kw: 1,
            pad: 0,
            ..base
        },
    );
    conv_case(
        c,
        "conv3x3_s2_c128",
        ConvShape {
            h: 56,
            w: 56,
            c: 128,
            o: 128,
            stride: 2,
            ..base
        },
    );
    conv_case(
        c,
        "stem7x7_s2",
        ConvShape {
            h: 224,
            w: 224,
            c: 3,
            o: 64,
            kh: 7,
            kw: 7,
            stride: 2,
            pad: 3,
            ..base
        },
    );
    conv_case(
        c,
        "patch16_s16",
        ConvShape {
            h: 224,
            w: 224,
            c: 3,
            o: 384,
            kh: 16,
            kw: 16,
            stride: 16,
            pad: 0,
            ..base
        },
    );
}

/// The device check's GEMM rows (group `gemm`: ViT-S/16's linear layers, forward with fused
/// epilogues and both backward products, and a ReLU head) and convolution rows (group `conv`:
/// ResNet-50's stem, 3x3 stride 1 / 2, 1x1, ViT's patch embedding; forward, backward-data,
/// backward-filter), all through the [`Exec`] methods the device model calls.
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    gemm_rows(c);
    conv_rows(c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::{self, Gpu};
    use crate::backend::device::check::CheckOptions;
    use crate::backend::device::Mode;

    /// A bf16 output against an f64 reference on the same rounded inputs: the output's one
    /// rounding (≤ 2⁻⁹ relative per element) gives ~1e-3; 4e-3 leaves room for fp32
    /// accumulation order and stays well under the project's bf16 band (1e-2).
    const TOL_OUT: f64 = 4e-3;
    /// An fp32 output: fp32 accumulation only (a bf16-rounded output would be ~1e-3).
    const TOL_F32_OUT: f64 = 1e-5;

    fn emu() -> Emu {
        Emu::new(Mode::Fibers)
    }

    /// The GPU with cuBLASLt and cuDNN, or `None` after printing why the GPU half is skipped.
    fn gpu(test: &str) -> Option<Gpu> {
        let p = cuda::probe();
        if !cuda::gpu_available() {
            println!(
                "SKIP {test} on the GPU: no GPU ({})",
                p.reason.as_deref().unwrap_or("unknown")
            );
            return None;
        }
        if !p.cublaslt || !p.cudnn {
            println!("SKIP {test} on the GPU: cuBLASLt or cuDNN not found");
            return None;
        }
        match Gpu::new(0) {
            Ok(g) => Some(g),
            Err(e) => panic!("a GPU was detected but cannot be opened: {e}"),
        }
    }

    /// GELU, tanh form, in f64 (the reference's own copy).
    fn gelu_tanh_f64(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
    }

    /// bf16-rounded operands of one GEMM: A, B, bias, old C.
    struct Operands {
        a: Vec<f32>,
        b: Vec<f32>,
        bias: Vec<f32>,
        c0: Vec<f32>,
    }

    fn operands(g: &Gemm, tag: &str) -> Operands {
        let t = format!("{tag}{g:?}");
        Operands {
            a: round_bf16(&random(&format!("{t}.a"), g.m * g.k)),
            b: round_bf16(&random(&format!("{t}.b"), g.k * g.n)),
            bias: round_bf16(&random(&format!("{t}.bias"), g.n)),
            c0: round_bf16(&random(&format!("{t}.c"), g.m * g.n)),
        }
    }

    /// `act(op(A)·op(B) + [c0] + [bias])` by the definition, in f64.
    fn reference(g: &Gemm, o: &Operands) -> Vec<f32> {
        let mut out = vec![0f32; g.m * g.n];
        for i in 0..g.m {
            for j in 0..g.n {
                let mut s = 0f64;
                for p in 0..g.k {
                    let av = if g.trans_a {
                        o.a[p * g.m + i]
                    } else {
                        o.a[i * g.k + p]
                    };
                    let bv = if g.trans_b {
                        o.b[j * g.k + p]
                    } else {
                        o.b[p * g.n + j]
                    };
                    s += av as f64 * bv as f64;
                }
                if g.accumulate {
                    s += o.c0[i * g.n + j] as f64;
                }
                if g.epilogue.has_bias() {
                    s += o.bias[j] as f64;
                }
                s = match g.epilogue {
                    Epilogue::None | Epilogue::Bias => s,
                    Epilogue::BiasRelu => s.max(0.0),
                    Epilogue::BiasGelu | Epilogue::Gelu => gelu_tanh_f64(s),
                };
                out[i * g.n + j] = s as f32;
            }
        }
        out
    }

    /// Runs `g` on `ex` (C starts as `c0` when accumulating, else uninitialised).
    fn run_gemm<E: Exec>(ex: &E, g: &Gemm, o: &Operands, f32_out: bool) -> Result<Vec<f32>> {
        let (a, b) = (ex.upload_bf16(&o.a)?, ex.upload_bf16(&o.b)?);
        let bias = ex.upload_bf16(&o.bias)?;
        let bias = g.epilogue.has_bias().then_some(&bias);
        if f32_out {
            let mut c = if g.accumulate {
                ex.upload(&o.c0)?
            } else {
                ex.alloc::<f32>(g.m * g.n)?
            };
            ex.gemm_f32_out(g, &a, &b, &mut c)?;
            ex.download(&c)
        } else {
            let mut c = if g.accumulate {
                ex.upload_bf16(&o.c0)?
            } else {
                ex.alloc::<bf16>(g.m * g.n)?
            };
            ex.gemm(g, &a, &b, bias, &mut c)?;
            ex.download_bf16(&c)
        }
    }

    /// Relative error of `g` on `ex` against the definition.
    fn gemm_err<E: Exec>(ex: &E, g: Gemm, f32_out: bool) -> f64 {
        let o = operands(&g, "blas");
        let got = run_gemm(ex, &g, &o, f32_out).unwrap_or_else(|e| panic!("{g:?}: {e}"));
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{g:?}: non-finite output"
        );
        rel_l2(&got, &reference(&g, &o))
    }

    fn plain(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Gemm {
        Gemm {
            m,
            n,
            k,
            trans_a: ta,
            trans_b: tb,
            epilogue: Epilogue::None,
            accumulate: false,
        }
    }

    const TRANSPOSES: [(bool, bool); 4] =
        [(false, false), (false, true), (true, false), (true, true)];

    /// Every transpose combination at awkward sizes, plain and accumulating, bf16 and f32 out.
    fn gemm_transposes<E: Exec>(ex: &E) {
        let (mut worst, mut worst32) = (0f64, 0f64);
        for (m, n, k) in [(7, 13, 5), (33, 65, 17), (1, 1, 1)] {
            for (ta, tb) in TRANSPOSES {
                let g = plain(m, n, k, ta, tb);
                for accumulate in [false, true] {
                    let g = Gemm { accumulate, ..g };
                    let e = gemm_err(ex, g, false);
                    assert!(e <= TOL_OUT, "{g:?}: rel err {e:.2e}");
                    let e32 = gemm_err(ex, g, true);
                    assert!(e32 <= TOL_F32_OUT, "{g:?} f32 out: rel err {e32:.2e}");
                    (worst, worst32) = (worst.max(e), worst32.max(e32));
                }
            }
        }
        println!(
            "{}: transposes, worst rel err {worst:.2e} (bf16 C), {worst32:.2e} (f32 C)",
            ex.describe()
        );
    }

    /// Each epilogue, alone and on top of an accumulation (the activation applies to the sum).
    fn gemm_epilogues<E: Exec>(ex: &E) {
        let mut worst = 0f64;
        for epi in [
            Epilogue::Bias,
            Epilogue::BiasRelu,
            Epilogue::BiasGelu,
            Epilogue::Gelu,
        ] {
            for (m, inp, out) in [(7, 5, 13), (33, 17, 65)] {
                for accumulate in [false, true] {
                    let g = Gemm {
                        accumulate,
                        ..Gemm::linear(m, inp, out, epi)
                    };
                    let e = gemm_err(ex, g, false);
                    assert!(e <= TOL_OUT, "{g:?}: rel err {e:.2e}");
                    worst = worst.max(e);
                }
            }
        }
        println!("{}: epilogues, worst rel err {worst:.2e}", ex.describe());
        // GELU without a bias into an fp32 output.
        let g = Gemm {
            epilogue: Epilogue::Gelu,
            ..plain(33, 65, 17, true, false)
        };
        let e = gemm_err(ex, g, true);
        assert!(e <= TOL_F32_OUT, "{g:?} f32 out: rel err {e:.2e}");
    }

    /// The shapes of the conv tests: 1x1 stride 1 and 2, 3x3 pad 1 (stride 1 and 2), 7x7
    /// stride 2 pad 3, a 4x4/4 patch embedding; odd and unequal H and W.
    fn conv_shapes() -> Vec<ConvShape> {
        let s = |n, h, w, c, o, k, stride, pad| ConvShape {
            n,
            h,
            w,
            c,
            o,
            kh: k,
            kw: k,
            stride,
            pad,
        };
        vec![
            s(2, 7, 5, 4, 3, 1, 2, 0),
            s(2, 5, 7, 3, 4, 1, 1, 0),
            s(2, 9, 11, 5, 6, 3, 1, 1),
            s(3, 7, 6, 4, 5, 3, 2, 1),
            s(2, 11, 9, 3, 4, 7, 2, 3),
            s(2, 8, 13, 3, 5, 4, 4, 0),
        ]
    }

    /// Forward, backward-data and backward-filter on `ex` against the CPU backend in f64 on the
    /// same bf16-rounded values; outputs start uninitialised.
    fn conv_directions<E: Exec>(ex: &E) {
        let mut worst = [0f64; 3];
        for s in conv_shapes() {
            let t = format!("blas{s:?}");
            let x = round_bf16(&random(&format!("{t}.x"), s.x_len()));
            let w = round_bf16(&random(&format!("{t}.w"), s.w_len()));
            let dy = round_bf16(&random(&format!("{t}.dy"), s.y_len()));
            let f64t = |v: &[f32], d: &[usize]| {
                Tensor::from_vec(v.iter().map(|&x| x as f64).collect(), d).unwrap()
            };
            let (x64, w64) = (f64t(&x, &s.x_dims()), f64t(&w, &s.w_dims()));
            let dy64 = f64t(&dy, &s.y_dims().unwrap());
            let y_ref = cpu::conv::conv2d_forward(&x64, &w64, None, params(&s)).unwrap();
            let g_ref =
                cpu::conv::conv2d_backward(&x64, &w64, &dy64, params(&s), true, false).unwrap();
            let as_f32 = |t: &Tensor<f64>| t.data().iter().map(|&v| v as f32).collect::<Vec<_>>();

            let (xd, wd, dyd) = (
                ex.upload_bf16(&x).unwrap(),
                ex.upload_bf16(&w).unwrap(),
                ex.upload_bf16(&dy).unwrap(),
            );
            let mut y = ex.alloc::<bf16>(s.y_len()).unwrap();
            ex.conv_forward(&s, &xd, &wd, &mut y).unwrap();
            let e = rel_l2(&ex.download_bf16(&y).unwrap(), &as_f32(&y_ref));
            assert!(e <= TOL_OUT, "{s:?} forward: rel err {e:.2e}");
            worst[0] = worst[0].max(e);

            let mut dx = ex.alloc::<bf16>(s.x_len()).unwrap();
            ex.conv_backward_data(&s, &wd, &dyd, &mut dx).unwrap();
            let want = as_f32(g_ref.dx.as_ref().unwrap());
            let e = rel_l2(&ex.download_bf16(&dx).unwrap(), &want);
            assert!(e <= TOL_OUT, "{s:?} backward-data: rel err {e:.2e}");
            worst[1] = worst[1].max(e);

            let mut dw = ex.alloc::<bf16>(s.w_len()).unwrap();
            ex.conv_backward_filter(&s, &xd, &dyd, &mut dw).unwrap();
            let e = rel_l2(&ex.download_bf16(&dw).unwrap(), &as_f32(&g_ref.dw));
            assert!(e <= TOL_OUT, "{s:?} backward-filter: rel err {e:.2e}");
            worst[2] = worst[2].max(e);
        }
        println!(
            "{}: conv worst rel err forward {:.2e}, backward-data {:.2e}, backward-filter {:.2e}",
            ex.describe(),
            worst[0],
            worst[1],
            worst[2]
        );
    }

    /// The error of `r`, as text (panics when it is not an error).
    fn err_text(r: Result<()>) -> String {
        match r {
            Ok(()) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    /// Every wrong length is an error naming the buffer, found before any work (C keeps its
    /// values).
    fn wrong_lengths<E: Exec>(ex: &E) {
        let g = Gemm::linear(4, 3, 5, Epilogue::Bias);
        let up = |n: usize| ex.upload_bf16(&vec![0.5; n]).unwrap();
        let (a, b, bias) = (up(12), up(15), up(5));
        let c_vals: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let mut c = ex.upload_bf16(&c_vals).unwrap();
        let e = err_text(ex.gemm(&g, &up(11), &b, Some(&bias), &mut c));
        assert!(
            e.contains("A (stored [4, 3]) has 11 elements, expected 12"),
            "{e}"
        );
        let e = err_text(ex.gemm(&g, &a, &up(16), Some(&bias), &mut c));
        assert!(e.contains("B (stored [5, 3]) has 16"), "{e}");
        let e = err_text(ex.gemm(&g, &a, &b, Some(&up(4)), &mut c));
        assert!(
            e.contains("bias") && e.contains("has 4 elements, expected 5"),
            "{e}"
        );
        let e = err_text(ex.gemm(&g, &a, &b, None, &mut c));
        assert!(e.contains("needs a bias"), "{e}");
        let none = Gemm::linear(4, 3, 5, Epilogue::None);
        let e = err_text(ex.gemm(&none, &a, &b, Some(&bias), &mut c));
        assert!(e.contains("a bias was given"), "{e}");
        let mut short_c = up(19);
        let e = err_text(ex.gemm(&g, &a, &b, Some(&bias), &mut short_c));
        assert!(e.contains("C ([4, 5]) has 19"), "{e}");
        assert_eq!(
            ex.download_bf16(&c).unwrap(),
            c_vals,
            "C was written by a failing GEMM"
        );
        let mut c32 = ex.zeros::<f32>(20).unwrap();
        let e = err_text(ex.gemm_f32_out(&g, &a, &b, &mut c32));
        assert!(e.contains("has a bias"), "{e}");
        let e = err_text(ex.gemm_f32_out(&none, &a, &b, &mut ex.zeros::<f32>(21).unwrap()));
        assert!(e.contains("C ([4, 5]) has 21"), "{e}");

        let s = conv_shapes()[3];
        let [x, w, y] = [s.x_len(), s.w_len(), s.y_len()].map(up);
        let out = |n: usize| ex.alloc::<bf16>(n).unwrap();
        let e = err_text(ex.conv_forward(&s, &up(x.len() - 1), &w, &mut out(y.len())));
        assert!(e.contains("x ([3, 7, 6, 4]) has"), "{e}");
        let e = err_text(ex.conv_forward(&s, &x, &up(w.len() + 1), &mut out(y.len())));
        assert!(e.contains("w ([5, 3, 3, 4]) has"), "{e}");
        let e = err_text(ex.conv_forward(&s, &x, &w, &mut out(y.len() + 2)));
        assert!(e.contains("y ([3, 4, 3, 5]) has"), "{e}");
        let e = err_text(ex.conv_backward_data(&s, &w, &up(3), &mut out(x.len())));
        assert!(e.contains("dy ([3, 4, 3, 5]) has 3"), "{e}");
        let e = err_text(ex.conv_backward_data(&s, &w, &y, &mut out(1)));
        assert!(e.contains("dx ([3, 7, 6, 4]) has 1"), "{e}");
        let e = err_text(ex.conv_backward_filter(&s, &x, &y, &mut out(7)));
        assert!(e.contains("dw ([5, 3, 3, 4]) has 7"), "{e}");
        let e = err_text(ex.conv_backward_filter(&s, &up(2), &y, &mut out(w.len())));
        assert!(e.contains("x ([3, 7, 6, 4]) has 2"), "{e}");
        let bad = ConvShape {
            h: 1,
            w: 1,
            pad: 0,
            ..s
        };
        let e = err_text(ex.conv_forward(&bad, &x, &w, &mut out(y.len())));
        assert!(e.contains("kernel larger than the padded input"), "{e}");
        let empty = ConvShape { c: 0, ..s };
        let e = err_text(ex.conv_forward(&empty, &up(0), &up(0), &mut out(y.len())));
        assert!(e.contains("must be ≥ 1"), "{e}");
    }

    #[test]
    fn gelu_tanh_is_pytorchs_tanh_gelu() {
        // torch.nn.functional.gelu(x, approximate="tanh") at 1, -0.5, 2.5, -3.
        for (x, want) in [
            (1.0f32, 0.841_191_990_608_276_8f64),
            (-0.5, -0.154_285_990_174_856_06),
            (2.5, 2.484_915_733_910_001),
            (-3.0, -0.003_637_392_081_772_994_3),
        ] {
            let got = gelu_tanh(x) as f64;
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "gelu_tanh({x}) = {got}"
            );
        }
        // Within 4.8e-4 of the exact GELU (what the CPU backend computes), and not equal to it.
        let xs: Vec<f32> = (-800..800).map(|i| i as f32 / 100.0).collect();
        let exact =
            cpu::elementwise::gelu_forward(&Tensor::from_vec(xs.clone(), &[xs.len()]).unwrap())
                .unwrap()
                .into_vec();
        let worst = xs
            .iter()
            .zip(&exact)
            .map(|(&x, &e)| (gelu_tanh(x) - e).abs())
            .fold(0f32, f32::max);
        assert!(worst < 4.8e-4 && worst > 1e-4, "max |tanh − erf| = {worst}");
        assert_eq!(Epilogue::Gelu.activate(1.0), gelu_tanh(1.0));
        assert_eq!(Epilogue::BiasRelu.activate(-2.0), 0.0);
        assert_eq!(Epilogue::Bias.activate(-2.0), -2.0);
    }

    #[test]
    fn shapes_map_and_measure_as_documented() {
        let g = Gemm::linear(8, 384, 1536, Epilogue::BiasGelu);
        assert_eq!(
            (g.m, g.n, g.k, g.trans_a, g.trans_b),
            (8, 1536, 384, false, true)
        );
        assert_eq!(g.flops(), 2.0 * 8.0 * 1536.0 * 384.0);
        assert_eq!((g.a_dims(), g.b_dims()), ([8, 384], [1536, 384]));
        let t = plain(2, 3, 4, true, false);
        assert_eq!((t.a_dims(), t.b_dims()), ([4, 2], [4, 3]));
        assert!(Epilogue::BiasRelu.has_bias() && !Epilogue::Gelu.has_bias());
        let huge = plain(usize::MAX / 2, 3, 4, false, false);
        assert!(err_text(huge.check_lengths("t", 0, 12, None, 0)).contains("fit a usize"));

        let s = ConvShape {
            n: 2,
            h: 56,
            w: 56,
            c: 64,
            o: 128,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: 1,
        };
        assert_eq!(s.out_hw().unwrap(), (28, 28));
        assert_eq!(s.y_len(), 2 * 28 * 28 * 128);
        assert_eq!(s.w_len(), 128 * 9 * 64);
        assert_eq!(s.y_dims().unwrap(), [2, 28, 28, 128]);
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
        assert_eq!(ConvShape { stride: 0, ..s }.y_len(), 0);
    }

    #[test]
    fn emu_gemm_every_transpose_matches_an_f64_product() {
        gemm_transposes(&emu());
        // The check is sharp: the plain product is far from the accumulated reference (so an
        // ignored `accumulate` fails), and a bf16 C could not meet the f32-out tolerance.
        let g = plain(33, 65, 17, false, true);
        let o = operands(
            &Gemm {
                accumulate: true,
                ..g
            },
            "blas",
        );
        let plain_out = run_gemm(&emu(), &g, &o, false).unwrap();
        let acc_ref = reference(
            &Gemm {
                accumulate: true,
                ..g
            },
            &o,
        );
        assert!(rel_l2(&plain_out, &acc_ref) > 0.1);
        let f = run_gemm(&emu(), &g, &o, true).unwrap();
        assert!(rel_l2(&round_bf16(&f), &reference(&g, &o)) > TOL_F32_OUT);
    }

    #[test]
    fn emu_gemm_epilogues_follow_cublaslt() {
        gemm_epilogues(&emu());
        // The bias is per output column: a per-row bias would fail the reference.
        let g = Gemm::linear(7, 5, 13, Epilogue::Bias);
        let mut o = operands(&g, "col");
        o.a.iter_mut().for_each(|v| *v = 0.0);
        let got = run_gemm(&emu(), &g, &o, false).unwrap();
        for row in got.chunks(13) {
            assert_eq!(row, &o.bias[..]);
        }
    }

    #[test]
    fn emu_gemm_never_reads_c_without_accumulate() {
        let ex = emu();
        let g = Gemm::linear(33, 17, 65, Epilogue::BiasGelu);
        let o = operands(&g, "poison");
        // alloc() poisons with NaN on the emulation: run_gemm uses it when not accumulating.
        let c: HostBuf<bf16> = ex.alloc(4).unwrap();
        assert!(ex.download_bf16(&c).unwrap().iter().all(|v| v.is_nan()));
        let got = run_gemm(&ex, &g, &o, false).unwrap();
        assert!(got.iter().all(|v| v.is_finite()));
        assert!(rel_l2(&got, &reference(&g, &o)) <= TOL_OUT);
        let g = plain(7, 13, 5, true, true);
        let got = run_gemm(&ex, &g, &operands(&g, "poison"), true).unwrap();
        assert!(got.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn emu_conv_directions_match_the_cpu_backend_in_f64() {
        conv_directions(&emu());
    }

    #[test]
    fn wrong_lengths_are_errors_naming_the_buffer() {
        wrong_lengths(&emu());
    }

    #[test]
    fn the_gemm_and_conv_check_rows_pass_on_the_emulation() {
        let ex = emu();
        let opts = CheckOptions {
            quick: true,
            warmup: 0,
            reps: 1,
            ..Default::default()
        };
        let mut c = Checker::new(&ex, &opts);
        check_rows(&mut c);
        let rows = c.into_rows();
        for r in &rows {
            println!(
                "{:<24} {:<32} rel err {:.2e} (tol {:.0e}), {:.1} ms",
                r.id,
                r.shape,
                r.rel_err.unwrap_or(f64::NAN),
                r.tol.unwrap_or(f64::NAN),
                r.ms.unwrap_or(f64::NAN)
            );
        }
        let failed: Vec<String> = rows
            .iter()
            .filter(|r| !r.passed || r.rel_err.is_none())
            .map(|r| format!("{}: {}", r.id, r.note))
            .collect();
        assert!(failed.is_empty(), "{failed:#?}");
        let count = |g: &str| rows.iter().filter(|r| r.group == g).count();
        assert_eq!((count("gemm"), count("conv")), (6, 15));
    }

    #[test]
    fn the_gpu_meets_the_same_contract() {
        let Some(g) = gpu("the_gpu_meets_the_same_contract") else {
            return;
        };
        gemm_transposes(&g);
        gemm_epilogues(&g);
        conv_directions(&g);
        wrong_lengths(&g);
        g.synchronize().unwrap();
    }
}

//! Multi-head scaled-dot-product self-attention, exactly as timm's ViT `Attention` computes it
//! between its `qkv` linear and its `proj` linear (the non-fused path):
//!
//! ```text
//! qkv [B, N, 3C] -> reshape (B, N, 3, H, D) -> permute -> q, k, v [B, H, N, D]
//! P = softmax((q · D^-½) kᵀ)          [B, H, N, N]   (saved for the backward)
//! O = P v                             [B, H, N, D]
//! out = O.transpose(1, 2).reshape     [B, N, C]       (channel c = h·D + d)
//! ```
//!
//! The work is independent per (sample, head) pair, so both passes run one rayon task per pair:
//! the task gathers its head's q, k, v rows (D contiguous values each) into small contiguous
//! buffers that stay in cache, does the products with [`matmul`] (single-threaded inside a rayon
//! worker) and the row softmax, and copies its [N, D] result straight into its D columns of the
//! [B, N, C] output (dq, dk, dv into their columns of [B, N, 3C] in the backward). Gathering
//! costs O(N·D) per head against O(N²·D) for the products and keeps every GEMM operand
//! contiguous; writing in place instead of through a per-head [B, H, N, D] buffer and a second
//! interleaving pass halved the time on the 2-core development machine, whose memory bandwidth
//! is the bottleneck at these sizes. The probabilities are stored (not recomputed): ViT-S at
//! batch 8 needs only 8·6·197² floats for them. The softmax uses a vectorisable f32 exponential
//! (`exp_f32`): libm's scalar `expf` cost more than both forward products together.

use super::matmul::matmul;
use super::softmax::exp_in_place;
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};
use rayon::prelude::*;

const OP_FWD: &str = "attention_forward";
const OP_BWD: &str = "attention_backward";

/// What [`attention_backward`] needs from the forward.
#[derive(Clone, Debug)]
pub struct AttentionCtx<T> {
    /// The attention probabilities softmax(q kᵀ · D^-½), `[B, H, N, N]` (row = query token).
    pub probs: Tensor<T>,
    /// Number of heads H.
    pub heads: usize,
}

/// Sizes of one attention call, validated once.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    n: usize,
    c: usize,
    h: usize,
    d: usize,
}

fn dims<T: Float>(op: &'static str, qkv: &Tensor<T>, heads: usize) -> Result<Dims> {
    qkv.expect_rank(op, "qkv", 3)?;
    let s = qkv.shape();
    if heads == 0 {
        return Err(Error::invalid(op, "heads must be at least 1"));
    }
    if !s[2].is_multiple_of(3) {
        return Err(Error::shape(
            op,
            format!("qkv has shape {s:?}: its last dimension must be 3·C"),
        ));
    }
    let c = s[2] / 3;
    if !c.is_multiple_of(heads) {
        return Err(Error::shape(
            op,
            format!("qkv has shape {s:?}: C = {c} is not divisible by {heads} heads"),
        ));
    }
    Ok(Dims {
        b: s[0],
        n: s[1],
        c,
        h: heads,
        d: c / heads,
    })
}

/// Copies rows `n` of `src[b, n, off .. off + D]` (row length `row`) into a contiguous `[N, D]`
/// buffer, multiplied by `scale`.
fn gather_head<T: Float>(src: &[T], row: usize, off: usize, d: usize, scale: T, dst: &mut [T]) {
    for (dst_row, src_row) in dst.chunks_exact_mut(d).zip(src.chunks_exact(row)) {
        for (o, &x) in dst_row.iter_mut().zip(&src_row[off..off + d]) {
            *o = x * scale;
        }
    }
}

/// An output buffer that parallel tasks fill in disjoint, interleaved column blocks (each
/// (sample, head) task owns D channels of every token row), which safe slices cannot express.
struct DisjointOut<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: the buffer is only written through `scatter_head`, whose callers guarantee that
// concurrent writes go to disjoint ranges; T: Send makes moving values across threads sound.
unsafe impl<T: Send> Sync for DisjointOut<'_, T> {}

impl<'a, T: Copy> DisjointOut<'a, T> {
    fn new(buf: &'a mut [T]) -> Self {
        DisjointOut {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// Copies `src` (`[N, D]`, contiguous) into rows `base + n·row + off .. + D`.
    ///
    /// # Safety
    /// No other thread may read or write those ranges during the call.
    unsafe fn scatter_head(&self, src: &[T], base: usize, row: usize, off: usize, d: usize) {
        for (i, s) in src.chunks_exact(d).enumerate() {
            let start = base + i * row + off;
            assert!(start + d <= self.len, "scatter_head out of bounds");
            // SAFETY: in bounds (checked above); exclusive per the caller's contract.
            let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), d) };
            dst.copy_from_slice(s);
        }
    }
}

/// Lanes of the partial sums and maxima below: independent accumulators let the compiler keep
/// them in SIMD registers (a single running sum is a serial chain of dependent adds).
const LANES: usize = 8;

/// Σ a_i·b_i with [`LANES`] partial sums.
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: T = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += xa[l] * xb[l];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

/// Σ a_i with [`LANES`] partial sums.
fn sum<T: Float>(a: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let c = a.chunks_exact(LANES);
    let tail: T = c.remainder().iter().copied().sum();
    for x in c {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

/// max_i a_i with [`LANES`] partial maxima (−∞ for an empty slice).
fn max<T: Float>(a: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let c = a.chunks_exact(LANES);
    let tail = c
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &x| m.max(x));
    for x in c {
        for l in 0..LANES {
            acc[l] = acc[l].max(x[l]);
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// `x ← e^(x − shift)` over a slice, through the softmax family's vectorised f32 exponential
/// (libm for f64, used by the gradient checks).
fn exp_shifted<T: Float>(xs: &mut [T], shift: T) {
    for x in xs.iter_mut() {
        *x -= shift;
    }
    exp_in_place(xs);
}

/// In-place softmax of each row of length `n`: max-subtracted exponentials over their sum, as
/// PyTorch's `softmax(dim=-1)`.
fn softmax_rows<T: Float>(s: &mut [T], n: usize) {
    for row in s.chunks_exact_mut(n) {
        let m = max(row);
        exp_shifted(row, m);
        let inv = T::one() / sum(row);
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// Forward of multi-head self-attention (timm ViT `Attention`, without the two linears).
///
/// `qkv` is `[B, N, 3C]`, the output of the qkv linear (q, k, v of head h at channels
/// `s·C + h·D .. s·C + (h+1)·D` for s = 0, 1, 2); `heads` = H with D = C / H and scale D^-½.
/// Returns the output `[B, N, C]` (channel h·D + d, timm's transpose + reshape) and the saved
/// probabilities. Errors when `qkv` is not rank 3, its last dimension is not a multiple of 3 or
/// C is not divisible by H.
pub fn attention_forward<T: Float>(
    qkv: &Tensor<T>,
    heads: usize,
) -> Result<(Tensor<T>, AttentionCtx<T>)> {
    let Dims { b, n, c, h, d } = dims(OP_FWD, qkv, heads)?;
    let scale = T::c(d as f64).sqrt().recip();
    let x = qkv.data();
    let row = 3 * c;
    let mut probs = vec![T::ZERO; b * h * n * n];
    let mut out = vec![T::ZERO; b * n * c];
    if n > 0 && d > 0 {
        let dst = DisjointOut::new(&mut out);
        probs.par_chunks_mut(n * n).enumerate().for_each_init(
            || vec![T::ZERO; 4 * n * d],
            |buf, (bh, p)| {
                let (bi, hi) = (bh / h, bh % h);
                let xs = &x[bi * n * row..(bi + 1) * n * row];
                let (q, rest) = buf.split_at_mut(n * d);
                let (k, rest) = rest.split_at_mut(n * d);
                let (v, o) = rest.split_at_mut(n * d);
                // timm scales q before the product: q = q * scale; attn = q @ k^T.
                gather_head(xs, row, hi * d, d, scale, q);
                gather_head(xs, row, c + hi * d, d, T::one(), k);
                gather_head(xs, row, 2 * c + hi * d, d, T::one(), v);
                matmul(n, n, d, q, false, k, true, p, false);
                softmax_rows(p, n);
                matmul(n, d, n, p, false, v, false, o, false);
                // SAFETY: task (b, h) is the only writer of out[b, :, h·D .. (h+1)·D].
                unsafe { dst.scatter_head(o, bi * n * c, c, hi * d, d) };
            },
        );
    }
    Ok((
        Tensor::from_vec(out, &[b, n, c])?,
        AttentionCtx {
            probs: Tensor::from_vec(probs, &[b, h, n, n])?,
            heads: h,
        },
    ))
}

/// Backward of [`attention_forward`]: given `dout` `[B, N, C]`, the forward's input `qkv`
/// `[B, N, 3C]` and its context, returns dqkv `[B, N, 3C]`.
///
/// Per (sample, head), with P the saved probabilities and S = (q·D^-½) kᵀ:
/// dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dq = D^-½ dS k, dk = D^-½ dSᵀ q.
/// The scale is folded into dS in the same row pass as the softmax backward.
pub fn attention_backward<T: Float>(
    dout: &Tensor<T>,
    qkv: &Tensor<T>,
    ctx: &AttentionCtx<T>,
) -> Result<Tensor<T>> {
    let Dims { b, n, c, h, d } = dims(OP_BWD, qkv, ctx.heads)?;
    dout.expect_shape(OP_BWD, "dout", &[b, n, c])?;
    ctx.probs.expect_shape(OP_BWD, "probs", &[b, h, n, n])?;
    let scale = T::c(d as f64).sqrt().recip();
    let x = qkv.data();
    let dy = dout.data();
    let pr = ctx.probs.data();
    let row = 3 * c;
    let mut dqkv = vec![T::ZERO; b * n * row];
    if n > 0 && d > 0 {
        let dst = DisjointOut::new(&mut dqkv);
        (0..b * h).into_par_iter().for_each_init(
            || (vec![T::ZERO; 7 * n * d], vec![T::ZERO; n * n]),
            |(buf, ds), bh| {
                let (bi, hi) = (bh / h, bh % h);
                let xs = &x[bi * n * row..(bi + 1) * n * row];
                let p = &pr[bh * n * n..(bh + 1) * n * n];
                let (q, rest) = buf.split_at_mut(n * d);
                let (k, rest) = rest.split_at_mut(n * d);
                let (v, rest) = rest.split_at_mut(n * d);
                let (d_o, rest) = rest.split_at_mut(n * d);
                let (dq, rest) = rest.split_at_mut(n * d);
                let (dk, dv) = rest.split_at_mut(n * d);
                gather_head(xs, row, hi * d, d, T::one(), q);
                gather_head(xs, row, c + hi * d, d, T::one(), k);
                gather_head(xs, row, 2 * c + hi * d, d, T::one(), v);
                gather_head(
                    &dy[bi * n * c..(bi + 1) * n * c],
                    c,
                    hi * d,
                    d,
                    T::one(),
                    d_o,
                );
                matmul(n, d, n, p, true, d_o, false, dv, false);
                matmul(n, n, d, d_o, false, v, true, ds, false);
                for (dsr, pr) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
                    let dot = dot(dsr, pr);
                    for (s, &pv) in dsr.iter_mut().zip(pr) {
                        *s = pv * (*s - dot) * scale;
                    }
                }
                matmul(n, d, n, ds, false, k, false, dq, false);
                matmul(n, d, n, ds, true, q, false, dk, false);
                // SAFETY: task (b, h) is the only writer of dqkv[b, :, s·C + h·D ..][..D].
                unsafe {
                    for (si, g) in [&*dq, &*dk, &*dv].into_iter().enumerate() {
                        dst.scatter_head(g, bi * n * row, row, si * c + hi * d, d);
                    }
                }
            },
        );
    }
    Tensor::from_vec(dqkv, &[b, n, row])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradients, randn64, GradCheck};

    fn grad_check(b: usize, n: usize, h: usize, d: usize) {
        let qkv = randn64(1, "qkv", &[b, n, 3 * h * d]);
        check_gradients(
            &format!("attention b{b} n{n} h{h} d{d}"),
            &[qkv],
            |xs| Ok(attention_forward(&xs[0], h)?.0),
            |xs, w| {
                let (_, ctx) = attention_forward(&xs[0], h)?;
                Ok(vec![Some(attention_backward(w, &xs[0], &ctx)?)])
            },
            GradCheck::default(),
        );
    }

    #[test]
    fn gradients_match_finite_differences() {
        grad_check(2, 5, 2, 3);
        grad_check(2, 7, 3, 4);
        grad_check(1, 1, 1, 2);
    }

    /// Direct per-element evaluation of the timm formula, to check the layout handling.
    #[test]
    fn forward_matches_naive_formula() {
        let (b, n, h, d) = (2, 4, 3, 2);
        let c = h * d;
        let qkv = randn64(2, "qkv", &[b, n, 3 * c]);
        let (out, ctx) = attention_forward(&qkv, h).unwrap();
        let x = qkv.data();
        let at = |bi: usize, ni: usize, s: usize, hi: usize, di: usize| {
            x[(bi * n + ni) * 3 * c + s * c + hi * d + di]
        };
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..n {
                    let mut s: Vec<f64> = (0..n)
                        .map(|j| {
                            (0..d)
                                .map(|e| at(bi, i, 0, hi, e) * at(bi, j, 1, hi, e))
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    s.iter_mut().for_each(|v| *v = (*v - m).exp() / z);
                    let row = ((bi * h + hi) * n + i) * n;
                    for (p, want) in ctx.probs.data()[row..row + n].iter().zip(&s) {
                        assert!((p - want).abs() < 1e-12);
                    }
                    for e in 0..d {
                        let o: f64 = (0..n).map(|j| s[j] * at(bi, j, 2, hi, e)).sum();
                        assert!((out.data()[(bi * n + i) * c + hi * d + e] - o).abs() < 1e-12);
                    }
                }
            }
        }
    }

    #[test]
    fn row_reductions_match_plain_sums() {
        let v: Vec<f64> = (0..19).map(|i| i as f64 - 3.5).collect();
        assert_eq!(sum(&v), v.iter().sum::<f64>());
        assert_eq!(max(&v), 14.5);
        assert_eq!(dot(&v, &v), v.iter().map(|x| x * x).sum::<f64>());
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let qkv = Tensor::<f64>::zeros(&[2, 5, 12]);
        let e = attention_forward(&qkv, 3).unwrap_err().to_string();
        assert!(
            e.contains("attention_forward") && e.contains("[2, 5, 12]"),
            "{e}"
        );
        let e = attention_forward(&Tensor::<f64>::zeros(&[2, 5, 13]), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2, 5, 13]"), "{e}");
        let e = attention_forward(&Tensor::<f64>::zeros(&[5, 12]), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[5, 12]"), "{e}");
        assert!(attention_forward(&qkv, 0).is_err());
        let (_, ctx) = attention_forward(&qkv, 2).unwrap();
        let e = attention_backward(&Tensor::zeros(&[2, 5, 3]), &qkv, &ctx)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attention_backward") && e.contains("[2, 5, 3]"),
            "{e}"
        );
        let other = Tensor::<f64>::zeros(&[2, 6, 12]);
        let e = attention_backward(&Tensor::zeros(&[2, 6, 4]), &other, &ctx)
            .unwrap_err()
            .to_string();
        assert!(e.contains("probs"), "{e}");
    }
}

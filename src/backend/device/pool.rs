//! Device ops of `kernels/pool.cu`: ResNet-50's pooling layers on bf16 NHWC activations, as
//! safe functions generic over [`Exec`] (the GPU, or the CPU emulation `cargo test` runs). The
//! stem's max-pool (3×3, stride 2, padding 1: `[64, 112, 112, 64]` → `[64, 56, 56, 64]`) and the
//! global average pool before the head (`[64, 7, 7, 2048]` → `[64, 2048]`), forward and
//! backward. Each op and its CPU reference (`backend::cpu::pool`):
//!
//! | op | kernel | CPU reference |
//! |---|---|---|
//! | [`maxpool2d_forward`] | `maxpool2d_forward` | `max_pool2d_forward` (bit for bit, arg-max included) |
//! | [`maxpool2d_backward`] | `maxpool2d_backward` | `max_pool2d_backward` (same fp32 sum order) |
//! | [`global_avgpool_forward`] | `global_avgpool_forward` | `global_avg_pool_forward` |
//! | [`global_avgpool_backward`] | `global_avgpool_backward` | `global_avg_pool_backward` |
//!
//! Max-pool follows PyTorch as the CPU reference does: padding never wins, floor mode, the first
//! maximum in row-major window order wins a tie, NaN propagates (the window's last NaN is the
//! arg-max). Its backward is a gather (one thread per input element over the windows containing
//! it), deterministic and without atomics, and writes every element of `dx`.
//!
//! Launches: one thread per output element (per input element for the max-pool backward and
//! per `dx` element for the average pool's), `min(ceil(n / T), MAX_BLOCKS)` blocks of `T`
//! threads, grid-stride loops over the rest. Every kernel writes all of its outputs, so they come
//! from [`Exec::alloc`] (poisoned on the emulation: a gap shows up as NaN or −1).
//!
//! [`check_rows`] holds the family's rows of the device check (group `pool`) at ResNet-50's
//! shapes.

use super::check::{random, round_bf16, Checker, Measured, TOL_BF16};
use super::{as_i32, check_len, check_threads, DevBuf, Exec, KArg, LaunchConfig};
use crate::backend::cpu::pool::{self as cpu, MaxPool2dParams, MaxPool2dSaved};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::testing::rel_l2;
use half::bf16;
use serde_json::json;

/// The kernel module these ops launch from.
const MODULE: &str = "pool";

/// Threads per block the GPU uses for every kernel of this family (8 warps; each warp reads 32
/// consecutive channels of a pixel).
pub const THREADS: u32 = 256;

/// Most blocks of one launch: the grid-stride loops cover the rest. An H200 holds 132 SMs × 8
/// resident blocks of 256 threads, so 4096 blocks are about four full waves, enough to hide the
/// memory latency of these bandwidth-bound kernels; a few loop iterations per thread cost less
/// than scheduling tens of thousands of one-element blocks.
pub const MAX_BLOCKS: usize = 4096;

/// `min(ceil(total / threads), MAX_BLOCKS)` blocks of `threads` (`total` > 0).
fn grid(total: usize, threads: u32) -> LaunchConfig {
    let blocks = total.div_ceil(threads as usize).clamp(1, MAX_BLOCKS);
    LaunchConfig::linear(blocks as u32, threads, 0)
}

/// The kernels' `int` geometry of a max-pool, checked: `[n, h, w, c]`, output `oh × ow`, window.
struct PoolGeom {
    n: i32,
    h: i32,
    w: i32,
    c: i32,
    oh: i32,
    ow: i32,
    k: i32,
    s: i32,
    p: i32,
    /// Elements of the input `[n, h, w, c]`.
    in_len: usize,
    /// Elements of the output `[n, oh, ow, c]`.
    out_len: usize,
}

impl PoolGeom {
    /// The output size of a `k × k` window at stride `s` with padding `p` over `[n, h, w, c]`,
    /// with the CPU reference's rules (k, s ≥ 1, p ≤ k/2, the padded input at least one window)
    /// and both element counts below 2^31 (the kernels' 32-bit indices).
    #[allow(clippy::too_many_arguments)]
    fn new(
        op: &'static str,
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        k: usize,
        s: usize,
        p: usize,
    ) -> Result<Self> {
        if n == 0 || h == 0 || w == 0 || c == 0 {
            return Err(Error::shape(
                op,
                format!("input [{n}, {h}, {w}, {c}] (NHWC) has no elements"),
            ));
        }
        if k == 0 || s == 0 || 2 * p > k {
            return Err(Error::invalid(
                op,
                format!("kernel {k} and stride {s} must be >= 1 and padding {p} at most half the kernel"),
            ));
        }
        if h + 2 * p < k || w + 2 * p < k {
            return Err(Error::shape(
                op,
                format!("input [{n}, {h}, {w}, {c}] with padding {p} is smaller than the {k}x{k} window"),
            ));
        }
        let oh = (h + 2 * p - k) / s + 1;
        let ow = (w + 2 * p - k) / s + 1;
        let count = |dims: [usize; 4]| {
            dims.iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .unwrap_or(usize::MAX)
        };
        let (in_len, out_len) = (count([n, h, w, c]), count([n, oh, ow, c]));
        as_i32(op, "N·H·W·C", in_len)?;
        as_i32(op, "N·OH·OW·C", out_len)?;
        Ok(PoolGeom {
            n: as_i32(op, "N", n)?,
            h: as_i32(op, "H", h)?,
            w: as_i32(op, "W", w)?,
            c: as_i32(op, "C", c)?,
            oh: as_i32(op, "OH", oh)?,
            ow: as_i32(op, "OW", ow)?,
            k: as_i32(op, "kernel", k)?,
            s: as_i32(op, "stride", s)?,
            p: as_i32(op, "padding", p)?,
            in_len,
            out_len,
        })
    }

    /// The nine trailing `int` arguments `(N, H, W, C, OH, OW, k, s, p)` of both max-pool kernels.
    fn args(&self) -> [KArg; 9] {
        [
            self.n.into(),
            self.h.into(),
            self.w.into(),
            self.c.into(),
            self.oh.into(),
            self.ow.into(),
            self.k.into(),
            self.s.into(),
            self.p.into(),
        ]
    }
}

/// Outputs of [`maxpool2d_forward`].
pub struct MaxPoolOut<E: Exec> {
    /// The maxima, `[n, oh, ow, c]` bf16 (bit-exact copies of input values).
    pub y: E::Buf<bf16>,
    /// Position `iy·W + ix` within its image of each output's maximum, `[n, oh, ow, c]`
    /// (PyTorch's `indices`): what [`maxpool2d_backward`] routes the gradient by.
    pub argmax: E::Buf<i32>,
    /// Output height, `(h + 2p − k) / s + 1`.
    pub oh: usize,
    /// Output width, `(w + 2p − k) / s + 1`.
    pub ow: usize,
}

/// `maxpool2d_forward`: a `k × k` max-pool at stride `s` with `p` of −∞ padding over
/// `x [n, h, w, c]` (NHWC bf16), PyTorch's semantics (floor mode, first maximum wins, NaN
/// propagates); returns the maxima and their arg-max for the backward.
#[allow(clippy::too_many_arguments)]
pub fn maxpool2d_forward<E: Exec>(
    ex: &E,
    x: &E::Buf<bf16>,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    s: usize,
    p: usize,
    threads: u32,
) -> Result<MaxPoolOut<E>> {
    const OP: &str = "maxpool2d_forward";
    check_threads(OP, threads)?;
    let g = PoolGeom::new(OP, n, h, w, c, k, s, p)?;
    check_len(OP, "x", x.len(), g.in_len)?;
    let y = ex.alloc::<bf16>(g.out_len)?;
    let argmax = ex.alloc::<i32>(g.out_len)?;
    let mut args = vec![x.arg(), y.arg(), argmax.arg()];
    args.extend(g.args());
    // SAFETY: (const bf16* x, bf16* y, int* argmax, int N, int H, int W, int C, int OH, int OW,
    // int k, int s, int p) as declared; x holds N·H·W·C values, y and argmax N·OH·OW·C (both
    // below 2^31, checked); the grid-stride loop stays below N·OH·OW·C and reads only in-image
    // pixels of the window.
    unsafe { ex.launch(MODULE, "maxpool2d_forward", grid(g.out_len, threads), &args)? };
    Ok(MaxPoolOut {
        y,
        argmax,
        oh: g.oh as usize,
        ow: g.ow as usize,
    })
}

/// `maxpool2d_backward`: `dx [n, h, w, c]` of the max-pool whose forward gave `argmax`, from
/// `dy [n, oh, ow, c]`: each input element sums (fp32) the `dy` of the windows that picked it,
/// in row-major window order, deterministically; every `dx` element is written.
#[allow(clippy::too_many_arguments)]
pub fn maxpool2d_backward<E: Exec>(
    ex: &E,
    dy: &E::Buf<bf16>,
    argmax: &E::Buf<i32>,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    s: usize,
    p: usize,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "maxpool2d_backward";
    check_threads(OP, threads)?;
    let g = PoolGeom::new(OP, n, h, w, c, k, s, p)?;
    check_len(OP, "dy", dy.len(), g.out_len)?;
    check_len(OP, "argmax", argmax.len(), g.out_len)?;
    let dx = ex.alloc::<bf16>(g.in_len)?;
    let mut args = vec![dy.arg(), argmax.arg(), dx.arg()];
    args.extend(g.args());
    // SAFETY: (const bf16* dy, const int* argmax, bf16* dx, int N, int H, int W, int C, int OH,
    // int OW, int k, int s, int p) as declared; dy and argmax hold N·OH·OW·C values, dx N·H·W·C
    // (both below 2^31); each thread reads only outputs of windows inside [0, OH) × [0, OW) of its
    // image and compares argmax values without using them as addresses.
    unsafe { ex.launch(MODULE, "maxpool2d_backward", grid(g.in_len, threads), &args)? };
    Ok(dx)
}

/// Checks `[n, hw, c]` of a global average pool (all non-zero, `n·hw·c` below 2^31).
fn avg_dims(op: &'static str, n: usize, hw: usize, c: usize) -> Result<(i32, i32, i32, usize)> {
    if n == 0 || hw == 0 || c == 0 {
        return Err(Error::shape(
            op,
            format!("[{n}, {hw}, {c}] (N, H·W, C) has no elements"),
        ));
    }
    let len = n
        .checked_mul(hw)
        .and_then(|v| v.checked_mul(c))
        .unwrap_or(usize::MAX);
    as_i32(op, "N·H·W·C", len)?;
    Ok((
        as_i32(op, "N", n)?,
        as_i32(op, "H·W", hw)?,
        as_i32(op, "C", c)?,
        len,
    ))
}

/// `global_avgpool_forward`: `y[n, c]` = the mean of channel `c` over the `hw` pixels of image
/// `n` of `x [n, hw, c]` (NHWC with H·W flattened), fp32 sum, bf16 out: ResNet's pool before the
/// head.
pub fn global_avgpool_forward<E: Exec>(
    ex: &E,
    x: &E::Buf<bf16>,
    n: usize,
    hw: usize,
    c: usize,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "global_avgpool_forward";
    check_threads(OP, threads)?;
    let (ni, hwi, ci, len) = avg_dims(OP, n, hw, c)?;
    check_len(OP, "x", x.len(), len)?;
    let y = ex.alloc::<bf16>(n * c)?;
    let args = [x.arg(), y.arg(), ni.into(), hwi.into(), ci.into()];
    // SAFETY: (const bf16* x, bf16* y, int N, int HW, int C) as declared; x holds N·HW·C values,
    // y N·C; the grid-stride loop stays below N·C.
    unsafe {
        ex.launch(
            MODULE,
            "global_avgpool_forward",
            grid(n * c, threads),
            &args,
        )?
    };
    Ok(y)
}

/// `global_avgpool_backward`: `dx[n, j, c] = dy[n, c] / hw` for every pixel `j`, `dx [n, hw, c]`
/// from `dy [n, c]`.
pub fn global_avgpool_backward<E: Exec>(
    ex: &E,
    dy: &E::Buf<bf16>,
    n: usize,
    hw: usize,
    c: usize,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "global_avgpool_backward";
    check_threads(OP, threads)?;
    let (ni, hwi, ci, len) = avg_dims(OP, n, hw, c)?;
    check_len(OP, "dy", dy.len(), n * c)?;
    let dx = ex.alloc::<bf16>(len)?;
    let args = [dy.arg(), dx.arg(), ni.into(), hwi.into(), ci.into()];
    // SAFETY: (const bf16* dy, bf16* dx, int N, int HW, int C) as declared; dy holds N·C values,
    // dx N·HW·C; the grid-stride loop stays below N·HW·C.
    unsafe { ex.launch(MODULE, "global_avgpool_backward", grid(len, threads), &args)? };
    Ok(dx)
}

// ---------------------------------------------------------------------------------------------
// The device check's rows

const GROUP: &str = "pool";
const AIM: &str = "aim: >= 70% of copy bandwidth (%floor)";

/// The CPU reference's max-pool on f32 values (the bf16 inputs widened).
fn cpu_maxpool(
    x: &[f32],
    shape: [usize; 4],
    k: usize,
    s: usize,
    p: usize,
) -> Result<(Tensor<f32>, MaxPool2dSaved)> {
    let params = MaxPool2dParams {
        kernel: k,
        stride: s,
        padding: p,
    };
    cpu::max_pool2d_forward(&Tensor::from_vec(x.to_vec(), &shape)?, params)
}

/// The rows: ResNet-50's stem max-pool (`[64, 112, 112, 64]`, 3×3 stride 2 padding 1) forward
/// (bit-exact, arg-max included) and backward, and its global average pool (`[64, 7·7, 2048]`)
/// forward and backward. Quick: 2 images.
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let imgs = if c.opts.quick { 2 } else { 64 };
    maxpool_rows(c, [imgs, 112, 112, 64], 3, 2, 1);
    avgpool_rows(c, imgs, 7, 7, 2048);
}

fn maxpool_rows<E: Exec>(c: &mut Checker<'_, E>, shape: [usize; 4], k: usize, s: usize, p: usize) {
    let [n, h, w, ch] = shape;
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let (ni, no) = ((n * h * w * ch) as f64, (n * oh * ow * ch) as f64);
    let shape_s = format!("[{n}, {h}, {w}, {ch}] bf16 k{k} s{s} p{p}");
    let spec = |dir: &str| json!({"kind": "maxpool2d", "dir": dir, "n": n, "h": h, "w": w, "c": ch, "k": k, "s": s, "p": p});
    c.row(GROUP, "maxpool_fwd", shape_s.clone(), spec("fwd"), |c| {
        let x = round_bf16(&random("pool.max.x", n * h * w * ch));
        let (want, saved) = cpu_maxpool(&x, shape, k, s, p)?;
        let xd = c.dev.upload_bf16(&x)?;
        let out = maxpool2d_forward(c.dev, &xd, n, h, w, ch, k, s, p, THREADS)?;
        let got = c.dev.download_bf16(&out.y)?;
        let arg = c.dev.download(&out.argmax)?;
        let wrong_args = arg
            .iter()
            .zip(&saved.argmax)
            .filter(|(&a, &b)| a as i64 != b as i64)
            .count();
        let t =
            c.time(|| maxpool2d_forward(c.dev, &xd, n, h, w, ch, k, s, p, THREADS).map(drop))?;
        let e = if wrong_args > 0 {
            f64::INFINITY
        } else {
            rel_l2(&got, want.data())
        };
        Ok(Measured {
            // A copy of input values: exact, arg-max included.
            err: Some((e, 0.0)),
            time: Some(t),
            flops: (k * k) as f64 * no,
            bytes: 2.0 * ni + 6.0 * no,
            note: format!("exact (y and arg-max; {wrong_args} arg-max differ); {AIM}"),
            ..Default::default()
        })
    });
    c.row(GROUP, "maxpool_bwd", shape_s, spec("bwd"), |c| {
        let x = round_bf16(&random("pool.max.x", n * h * w * ch));
        let dy = round_bf16(&random("pool.max.dy", n * oh * ow * ch));
        let (_, saved) = cpu_maxpool(&x, shape, k, s, p)?;
        let want =
            cpu::max_pool2d_backward(&Tensor::from_vec(dy.clone(), &[n, oh, ow, ch])?, &saved)?;
        let args: Vec<i32> = saved.argmax.iter().map(|&a| a as i32).collect();
        let (dyd, ad) = (c.dev.upload_bf16(&dy)?, c.dev.upload(&args)?);
        let dx = maxpool2d_backward(c.dev, &dyd, &ad, n, h, w, ch, k, s, p, THREADS)?;
        let got = c.dev.download_bf16(&dx)?;
        let t = c.time(|| {
            maxpool2d_backward(c.dev, &dyd, &ad, n, h, w, ch, k, s, p, THREADS).map(drop)
        })?;
        Ok(Measured {
            err: Some((rel_l2(&got, want.data()), TOL_BF16)),
            time: Some(t),
            flops: no,
            bytes: 6.0 * no + 2.0 * ni,
            note: format!("gather, no atomics; {AIM}"),
            ..Default::default()
        })
    });
}

fn avgpool_rows<E: Exec>(c: &mut Checker<'_, E>, n: usize, h: usize, w: usize, ch: usize) {
    let hw = h * w;
    let (nx, ny) = ((n * hw * ch) as f64, (n * ch) as f64);
    let shape_s = format!("[{n}, {h}, {w}, {ch}] bf16 -> [{n}, {ch}]");
    let spec =
        |dir: &str| json!({"kind": "global_avgpool", "dir": dir, "n": n, "h": h, "w": w, "c": ch});
    c.row(GROUP, "avgpool_fwd", shape_s.clone(), spec("fwd"), |c| {
        let x = round_bf16(&random("pool.avg.x", n * hw * ch));
        let want = cpu::global_avg_pool_forward(&Tensor::from_vec(x.clone(), &[n, h, w, ch])?)?;
        let xd = c.dev.upload_bf16(&x)?;
        let y = global_avgpool_forward(c.dev, &xd, n, hw, ch, THREADS)?;
        let got = c.dev.download_bf16(&y)?;
        let t = c.time(|| global_avgpool_forward(c.dev, &xd, n, hw, ch, THREADS).map(drop))?;
        Ok(Measured {
            err: Some((rel_l2(&got, want.data()), TOL_BF16)),
            time: Some(t),
            flops: nx,
            bytes: 2.0 * (nx + ny),
            note: AIM.into(),
            ..Default::default()
        })
    });
    c.row(GROUP, "avgpool_bwd", shape_s, spec("bwd"), |c| {
        let dy = round_bf16(&random("pool.avg.dy", n * ch));
        let want = cpu::global_avg_pool_backward(
            &Tensor::from_vec(dy.clone(), &[n, ch])?,
            &[n, h, w, ch],
        )?;
        let dyd = c.dev.upload_bf16(&dy)?;
        let dx = global_avgpool_backward(c.dev, &dyd, n, hw, ch, THREADS)?;
        let got = c.dev.download_bf16(&dx)?;
        let t = c.time(|| global_avgpool_backward(c.dev, &dyd, n, hw, ch, THREADS).map(drop))?;
        Ok(Measured {
            err: Some((rel_l2(&got, want.data()), TOL_BF16)),
            time: Some(t),
            flops: nx,
            bytes: 2.0 * (nx + ny),
            note: AIM.into(),
            ..Default::default()
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::{Emu, Mode};

    type Buf<T> = <Emu as Exec>::Buf<T>;

    /// Random values in [-1, 1) rounded to bf16, as f32 (the CPU reference's input).
    fn values(name: &str, n: usize) -> Vec<f32> {
        round_bf16(&random(name, n))
    }

    /// Bit-for-bit equality, NaN matching NaN (any payload).
    #[track_caller]
    fn assert_same(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let same = (g.is_nan() && w.is_nan()) || g.to_bits() == w.to_bits();
            assert!(same, "{what}[{i}]: got {g}, want {w}");
        }
    }

    fn argmax_i32(saved: &MaxPool2dSaved) -> Vec<i32> {
        saved.argmax.iter().map(|&a| a as i32).collect()
    }

    /// Forward (exact, arg-max included) and backward (the CPU's fp32 sum rounded once, and
    /// within 1e-2) of one max-pool against the CPU reference; outputs come from poisoned
    /// allocations, so any element left unwritten fails.
    #[allow(clippy::too_many_arguments)]
    fn check_maxpool(
        ex: &Emu,
        x: &[f32],
        shape: [usize; 4],
        k: usize,
        s: usize,
        p: usize,
        threads: u32,
    ) {
        let [n, h, w, c] = shape;
        let what = format!("{shape:?} k{k} s{s} p{p} T{threads} {:?}", ex.mode);
        let (want, saved) = cpu_maxpool(x, shape, k, s, p).unwrap();
        let xd = ex.upload_bf16(x).unwrap();
        let out = maxpool2d_forward(ex, &xd, n, h, w, c, k, s, p, threads).unwrap();
        assert_eq!([n, out.oh, out.ow, c], saved.y_shape, "{what}");
        assert_same(&what, &ex.download_bf16(&out.y).unwrap(), want.data());
        assert_eq!(
            ex.download(&out.argmax).unwrap(),
            argmax_i32(&saved),
            "{what}: arg-max"
        );

        let dy = values("pool.test.dy", want.numel());
        let want_dx = cpu::max_pool2d_backward(
            &Tensor::from_vec(dy.clone(), saved.y_shape.as_slice()).unwrap(),
            &saved,
        )
        .unwrap();
        let dyd = ex.upload_bf16(&dy).unwrap();
        let dx = maxpool2d_backward(ex, &dyd, &out.argmax, n, h, w, c, k, s, p, threads).unwrap();
        let got = ex.download_bf16(&dx).unwrap();
        // Same fp32 sums in the same order as the CPU's scatter, rounded once to bf16.
        assert_same(&format!("{what} dx"), &got, &round_bf16(want_dx.data()));
        if x.iter().all(|v| v.is_finite()) {
            let e = rel_l2(&got, want_dx.data());
            assert!(e <= 1e-2, "{what}: dx rel_l2 {e:.2e}");
        }
    }

    #[test]
    fn maxpool_matches_the_cpu_exactly_at_awkward_shapes_in_both_modes() {
        // (shape, k, s, p, threads, mode)
        type Case = ([usize; 4], usize, usize, usize, u32, Mode);
        let cases: &[Case] = &[
            ([2, 9, 7, 37], 3, 2, 1, 96, Mode::Fibers),
            ([2, 9, 7, 37], 3, 2, 1, 64, Mode::Threads),
            ([3, 6, 5, 5], 2, 2, 0, 32, Mode::Threads),
            ([2, 7, 8, 33], 3, 1, 1, 64, Mode::Fibers),
            ([1, 11, 13, 3], 5, 3, 2, 256, Mode::Fibers),
            // Floor mode leaves row 2, 5 and column 8 in no window: their dx must be 0.
            ([2, 8, 9, 3], 2, 3, 0, 32, Mode::Threads),
        ];
        for &(shape, k, s, p, threads, mode) in cases {
            let x = values("pool.test.x", shape.iter().product());
            check_maxpool(&Emu::new(mode), &x, shape, k, s, p, threads);
        }
    }

    #[test]
    fn maxpool_grid_stride_covers_more_outputs_than_the_grid_has_threads() {
        // 32 threads per block: the forward's outputs and the backward's inputs exceed
        // MAX_BLOCKS · 32 threads, so every thread loops at least twice for some elements.
        let shape = [2, 81, 83, 41];
        let out = 2 * 41 * 42 * 41;
        assert!(out > MAX_BLOCKS * 32);
        let x = values("pool.test.big", shape.iter().product());
        check_maxpool(&Emu::new(Mode::Fibers), &x, shape, 3, 2, 1, 32);
    }

    #[test]
    fn maxpool_ties_and_nan_match_the_cpu_reference() {
        let shape = [2, 6, 7, 35];
        let [_, h, w, c] = shape;
        // Three levels only: most windows hold several equal maxima (first one wins).
        let mut x: Vec<f32> = random("pool.test.ties", shape.iter().product())
            .iter()
            .map(|v| (v * 1.5).round() / 1.5)
            .collect();
        x = round_bf16(&x);
        let at = |n: usize, iy: usize, ix: usize, ch: usize| ((n * h + iy) * w + ix) * c + ch;
        // Two NaNs in the window (oy, ox) = (1, 1) of channel 0: rows 1..=3, columns 1..=3.
        x[at(0, 1, 1, 0)] = f32::NAN;
        x[at(0, 2, 2, 0)] = f32::NAN;
        x[at(1, 0, 0, 7)] = f32::NAN;
        x[at(1, 5, 6, 34)] = f32::NAN;
        for mode in [Mode::Fibers, Mode::Threads] {
            check_maxpool(&Emu::new(mode), &x, shape, 3, 2, 1, 64);
        }
        // The CPU reference's (PyTorch's) rule, spelled out: the window's last NaN wins.
        let ex = Emu::new(Mode::Fibers);
        let out =
            maxpool2d_forward(&ex, &ex.upload_bf16(&x).unwrap(), 2, h, w, c, 3, 2, 1, 32).unwrap();
        let (y, arg) = (
            ex.download_bf16(&out.y).unwrap(),
            ex.download(&out.argmax).unwrap(),
        );
        let o = (out.ow + 1) * c;
        assert!(y[o].is_nan());
        assert_eq!(arg[o], (2 * w + 2) as i32);
        assert!(
            y[0].is_nan() && arg[0] == (w + 1) as i32,
            "window (0, 0) holds the NaN at (1, 1)"
        );
        // A tie: equal values in a window keep the first position.
        let t = vec![0.5f32, 0.5, 0.25, 0.5];
        let out =
            maxpool2d_forward(&ex, &ex.upload_bf16(&t).unwrap(), 1, 2, 2, 1, 2, 2, 0, 32).unwrap();
        assert_eq!(ex.download(&out.argmax).unwrap(), vec![0]);
    }

    #[test]
    fn global_avgpool_matches_the_cpu_in_both_modes() {
        for (n, h, w, c, threads, mode) in [
            (3, 5, 7, 37, 32, Mode::Threads),
            (2, 7, 7, 2048, 256, Mode::Fibers),
            (5, 1, 1, 3, 96, Mode::Fibers),
        ] {
            let ex = Emu::new(mode);
            let what = format!("[{n}, {h}, {w}, {c}] T{threads} {mode:?}");
            let x = values("pool.test.avg.x", n * h * w * c);
            let want =
                cpu::global_avg_pool_forward(&Tensor::from_vec(x.clone(), &[n, h, w, c]).unwrap())
                    .unwrap();
            let y = global_avgpool_forward(&ex, &ex.upload_bf16(&x).unwrap(), n, h * w, c, threads)
                .unwrap();
            let got = ex.download_bf16(&y).unwrap();
            // The same fp32 sum in the same order, times the same 1/(H·W), rounded once.
            assert_same(&what, &got, &round_bf16(want.data()));
            let e = rel_l2(&got, want.data());
            assert!(e <= 1e-2, "{what}: y rel_l2 {e:.2e}");

            let dy = values("pool.test.avg.dy", n * c);
            let want = cpu::global_avg_pool_backward(
                &Tensor::from_vec(dy.clone(), &[n, c]).unwrap(),
                &[n, h, w, c],
            )
            .unwrap();
            let dx =
                global_avgpool_backward(&ex, &ex.upload_bf16(&dy).unwrap(), n, h * w, c, threads)
                    .unwrap();
            let got = ex.download_bf16(&dx).unwrap();
            assert_same(&format!("{what} dx"), &got, &round_bf16(want.data()));
            let e = rel_l2(&got, want.data());
            assert!(e <= 1e-2, "{what}: dx rel_l2 {e:.2e}");
        }
    }

    #[test]
    fn no_poison_survives_in_any_output() {
        // Emu::alloc fills outputs with 0xFF (NaN, arg-max -1): every element must be written.
        let ex = Emu::new(Mode::Fibers);
        let (n, h, w, c) = (2, 8, 9, 35);
        let x = ex
            .upload_bf16(&values("pool.test.poison", n * h * w * c))
            .unwrap();
        for (k, s, p) in [(3, 2, 1), (2, 3, 0)] {
            let out = maxpool2d_forward(&ex, &x, n, h, w, c, k, s, p, 64).unwrap();
            assert!(ex
                .download_bf16(&out.y)
                .unwrap()
                .iter()
                .all(|v| !v.is_nan()));
            let arg = ex.download(&out.argmax).unwrap();
            assert!(
                arg.iter().all(|&a| (0..(h * w) as i32).contains(&a)),
                "{arg:?}"
            );
            let dy = ex.upload_bf16(&vec![1.0; out.y.len()]).unwrap();
            let dx = maxpool2d_backward(&ex, &dy, &out.argmax, n, h, w, c, k, s, p, 64).unwrap();
            let dx = ex.download_bf16(&dx).unwrap();
            assert!(dx.iter().all(|v| v.is_finite()));
            // Each output routes its 1 to one input: the gradient's total is the output count.
            assert_eq!(
                dx.iter().map(|&v| v as f64).sum::<f64>(),
                out.y.len() as f64
            );
        }
        let y = global_avgpool_forward(&ex, &x, n, h * w, c, 32).unwrap();
        assert!(ex.download_bf16(&y).unwrap().iter().all(|v| !v.is_nan()));
        let dx = global_avgpool_backward(&ex, &y, n, h * w, c, 32).unwrap();
        assert!(ex.download_bf16(&dx).unwrap().iter().all(|v| !v.is_nan()));
    }

    #[test]
    fn wrong_lengths_shapes_and_block_sizes_are_errors() {
        let ex = Emu::new(Mode::Fibers);
        let (n, h, w, c) = (2, 5, 6, 3);
        let x: Buf<bf16> = ex
            .upload_bf16(&values("pool.test.err", n * h * w * c))
            .unwrap();
        let err = |r: Result<MaxPoolOut<Emu>>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let e = err(maxpool2d_forward(&ex, &x, n, h, w, c + 1, 3, 2, 1, 64));
        assert!(
            e.contains("maxpool2d_forward") && e.contains("x has 180 elements, expected 240"),
            "{e}"
        );
        let e = err(maxpool2d_forward(&ex, &x, n, h, w, c, 3, 2, 2, 64));
        assert!(e.contains("padding 2"), "{e}");
        let e = err(maxpool2d_forward(&ex, &x, n, h, w, c, 3, 0, 1, 64));
        assert!(e.contains("stride 0"), "{e}");
        let tiny = ex.upload_bf16(&[1.0; 2]).unwrap();
        let e = err(maxpool2d_forward(&ex, &tiny, 1, 1, 2, 1, 5, 1, 1, 64));
        assert!(e.contains("smaller than the 5x5 window"), "{e}");
        let e = err(maxpool2d_forward(&ex, &x, 0, h, w, c, 3, 2, 1, 64));
        assert!(e.contains("no elements"), "{e}");
        for t in [0, 48, 2048] {
            let e = err(maxpool2d_forward(&ex, &x, n, h, w, c, 3, 2, 1, t));
            assert!(e.contains("threads per block"), "{e}");
        }
        let e = err(maxpool2d_forward(
            &ex,
            &x,
            1 << 16,
            1 << 8,
            1 << 8,
            1,
            3,
            2,
            1,
            64,
        ));
        assert!(e.contains("exceeds i32::MAX"), "{e}");

        let out = maxpool2d_forward(&ex, &x, n, h, w, c, 3, 2, 1, 64).unwrap();
        assert_eq!((out.oh, out.ow), (3, 3));
        let dy = ex
            .upload_bf16(&values("pool.test.err.dy", 2 * 3 * 3 * 3))
            .unwrap();
        let short_dy: Buf<bf16> = ex.alloc(10).unwrap();
        let short_arg: Buf<i32> = ex.alloc(10).unwrap();
        let e =
            maxpool2d_backward(&ex, &short_dy, &out.argmax, n, h, w, c, 3, 2, 1, 64).unwrap_err();
        assert!(
            e.to_string().contains("dy has 10 elements, expected 54"),
            "{e}"
        );
        let e = maxpool2d_backward(&ex, &dy, &short_arg, n, h, w, c, 3, 2, 1, 64).unwrap_err();
        assert!(
            e.to_string()
                .contains("argmax has 10 elements, expected 54"),
            "{e}"
        );
        // The forward's geometry, not another one, must be given back.
        assert!(maxpool2d_backward(&ex, &dy, &out.argmax, n, h, w, c, 2, 2, 0, 64).is_err());

        let e = global_avgpool_forward(&ex, &x, n, h * w + 1, c, 64).unwrap_err();
        assert!(e.to_string().contains("global_avgpool_forward"), "{e}");
        let e = global_avgpool_backward(&ex, &x, n, h * w, c, 64).unwrap_err();
        assert!(
            e.to_string().contains("dy has 180 elements, expected 6"),
            "{e}"
        );
        assert!(global_avgpool_forward(&ex, &x, n, h * w, 0, 64).is_err());
        assert!(global_avgpool_backward(&ex, &x, n, h * w, c, 100).is_err());
    }
}

//! Vision Transformer as DINO's `vision_transformer.py` (a copy of timm's) builds it; ViT-S/16
//! (`vit_small`) is the default configuration.
//!
//! Forward over NHWC images `[B, H, W, C]`:
//!
//! ```text
//! patch_embed.proj (conv P×P / P, bias)   → [B, H/P, W/P, dim] = tokens [B, n, dim] (row-major grid)
//! prepend cls_token, add pos_embed        → [B, 1 + n, dim]   (pos_embed resized for other grids)
//! blocks.0 … blocks.{depth−1}             (pre-norm blocks, drop path rising 0 → rate)
//! norm, CLS row                           → [B, dim]
//! ```
//!
//! Parameters, in timm's / DINO's state-dict order and names: `cls_token [1, 1, dim]`,
//! `pos_embed [1, 1 + grid², dim]`, `patch_embed.proj.{weight, bias}` (weight stored
//! O×KH×KW×I), `blocks.{i}.*` (see [`Block`]), `norm.{weight, bias}`.
//!
//! Position embedding for another grid: DINO's `interpolate_pos_encoding` — bicubic
//! `F.interpolate` of the grid part with scale factors `((h0 + 0.1)/grid, (w0 + 0.1)/grid)`
//! (h0, w0 = patches along rows, columns; DINO calls them w0, h0 because it names NCHW's dim 2
//! `w`), CLS position unchanged; skipped exactly when DINO skips it (same number of patches and
//! a square image). The backward applies the interpolation's adjoint to the gradient.
//!
//! The final LayerNorm runs on the CLS rows only: it is per-token and only the CLS output is
//! returned, so the result equals DINO's `norm(x)[:, 0]`, and the backward sends gradient into
//! the last block through the CLS rows only (the other rows' gradient is zero, as in PyTorch).
//!
//! Overlap: [`Vit::backward_hooked`] reports the final norm's, each block's and then the token
//! embedding's parameters to a [`GradReady`] hook as their gradients become final (in the last
//! backbone pass of a multi-crop step only), so that their all-reduce can run while the
//! backward goes on (`dist::overlap`).

use crate::backend::cpu::conv::{conv2d_backward, conv2d_forward, Conv2dParams};
use crate::backend::cpu::interp::{bicubic_backward, bicubic_forward, Bicubic};
use crate::dist::overlap::GradReady;
use crate::error::{Error, Result};
use crate::nn::init::{linear_default, oihw_to_krsc, trunc_normal};
use crate::nn::layernorm::{LayerNorm, LayerNormCache};
use crate::nn::vit_block::{join, Block, BlockCache};
use crate::nn::{ParamId, ParamStore};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Shape and regularisation of a ViT of the DINO / timm family.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VitConfig {
    /// Patch size P (the patch-embedding conv is P×P with stride P).
    pub patch: usize,
    /// Token width.
    pub dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads (dim must be divisible by heads).
    pub heads: usize,
    /// MLP hidden width = floor(dim · mlp_ratio), as DINO's `int(dim * mlp_ratio)`.
    pub mlp_ratio: f64,
    /// Stochastic-depth rate of the last block; block i gets `rate · i/(depth − 1)`
    /// (`torch.linspace(0, rate, depth)`). DINO's constructor default is 0; the Daino student
    /// uses 0.1, the teacher 0.
    pub drop_path_rate: f64,
    /// Image size the position embedding is sized for (224: a 14×14 grid for P = 16).
    pub img_size: usize,
    /// Input channels.
    pub in_chans: usize,
    /// LayerNorm eps (1e-6 in DINO's and timm's ViTs).
    pub eps: f64,
}

impl VitConfig {
    /// DINO's `vit_small(patch_size=16)` = timm's `vit_small_patch16_224`: dim 384, depth 12,
    /// 6 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, no drop path.
    pub fn vit_small() -> Self {
        VitConfig {
            patch: 16,
            dim: 384,
            depth: 12,
            heads: 6,
            mlp_ratio: 4.0,
            drop_path_rate: 0.0,
            img_size: 224,
            in_chans: 3,
            eps: 1e-6,
        }
    }

    /// The same with a drop-path rate (the Daino student: 0.1).
    pub fn with_drop_path(mut self, rate: f64) -> Self {
        self.drop_path_rate = rate;
        self
    }

    /// Patches per side of the position-embedding grid (`img_size / patch`).
    pub fn grid(&self) -> usize {
        self.img_size / self.patch.max(1)
    }

    /// MLP hidden width.
    pub fn hidden(&self) -> usize {
        (self.dim as f64 * self.mlp_ratio) as usize
    }

    /// Drop-path probability of block `i`: `linspace(0, rate, depth)[i]` rounded to f32 as DINO's
    /// `x.item()` of a float32 linspace.
    pub fn block_drop_path(&self, i: usize) -> f64 {
        if self.depth <= 1 {
            return 0.0;
        }
        (self.drop_path_rate * i as f64 / (self.depth - 1) as f64) as f32 as f64
    }

    fn validate(&self) -> Result<()> {
        const OP: &str = "VitConfig";
        let bad = |d: String| Err(Error::invalid(OP, d));
        if self.patch == 0 || self.dim == 0 || self.heads == 0 || self.in_chans == 0 {
            return bad(format!("sizes must be positive: {self:?}"));
        }
        if !self.dim.is_multiple_of(self.heads) {
            return bad(format!(
                "dim {} not divisible by heads {}",
                self.dim, self.heads
            ));
        }
        if self.grid() == 0 {
            return bad(format!(
                "img_size {} smaller than patch {}",
                self.img_size, self.patch
            ));
        }
        if !(0.0..=1.0).contains(&self.drop_path_rate) {
            return bad(format!(
                "drop_path_rate {} outside [0, 1]",
                self.drop_path_rate
            ));
        }
        if !(self.mlp_ratio > 0.0 && self.hidden() > 0) || self.eps.is_nan() || self.eps < 0.0 {
            return bad(format!("mlp_ratio / eps invalid: {self:?}"));
        }
        Ok(())
    }
}

impl Default for VitConfig {
    fn default() -> Self {
        Self::vit_small()
    }
}

/// Tokens `[B, 1 + n, dim]`, the patch grid (rows, columns) and the position-embedding resize.
type Tokens = (Tensor<f32>, (usize, usize), Option<Bicubic>);

/// A ViT backbone whose parameters live in a [`ParamStore`].
#[derive(Clone, Debug)]
pub struct Vit {
    pub cfg: VitConfig,
    pub cls_token: ParamId,
    pub pos_embed: ParamId,
    /// `patch_embed.proj.weight`, `[dim, P, P, in_chans]` (KRSC).
    pub patch_weight: ParamId,
    /// `patch_embed.proj.bias`, `[dim]`.
    pub patch_bias: ParamId,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
}

/// What [`Vit::backward`] needs from [`Vit::forward`].
#[derive(Debug)]
pub struct VitCache {
    /// The input images (the patch-embedding weight gradient reads them).
    x: Tensor<f32>,
    /// Patch grid (rows, columns) of this pass.
    grid: (usize, usize),
    /// The position-embedding resize of this pass, when the grid differs.
    interp: Option<Bicubic>,
    blocks: Vec<BlockCache>,
    norm: LayerNormCache,
}

impl Vit {
    /// Registers every parameter under `prefix` (`""` gives timm's keys; DINO's
    /// `MultiCropWrapper` uses `backbone`), with DINO's init drawn by (seed, name): cls_token and
    /// pos_embed trunc-normal(0.02); Linear weights trunc-normal(0.02), biases 0; LayerNorm 1/0;
    /// the patch-embedding conv keeps PyTorch's default Conv2d init (DINO's `_init_weights`
    /// skips convs): U(±1/√fan_in) for weight and bias, fan_in = in_chans·P².
    pub fn new(store: &mut ParamStore, prefix: &str, cfg: VitConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let p = |n: &str| join(prefix, n);
        let (d, g) = (cfg.dim, cfg.grid());
        let cn = p("cls_token");
        let cls_token = store.param(&cn, trunc_normal(seed, &cn, &[1, 1, d], 0.02));
        let pn = p("pos_embed");
        let pos_embed = store.param(&pn, trunc_normal(seed, &pn, &[1, 1 + g * g, d], 0.02));
        let fan_in = cfg.in_chans * cfg.patch * cfg.patch;
        let wn = p("patch_embed.proj.weight");
        let w = linear_default(seed, &wn, &[d, cfg.in_chans, cfg.patch, cfg.patch], fan_in);
        let patch_weight = store.conv_param(&wn, oihw_to_krsc(&w));
        let bn = p("patch_embed.proj.bias");
        let patch_bias = store.param(&bn, linear_default(seed, &bn, &[d], fan_in));
        let blocks = (0..cfg.depth)
            .map(|i| {
                Block::new(
                    store,
                    &p(&format!("blocks.{i}")),
                    d,
                    cfg.heads,
                    cfg.hidden(),
                    cfg.eps,
                    cfg.block_drop_path(i),
                    seed,
                )
            })
            .collect();
        let norm = LayerNorm::new(store, &p("norm"), d, cfg.eps);
        Ok(Vit {
            cfg,
            cls_token,
            pos_embed,
            patch_weight,
            patch_bias,
            blocks,
            norm,
        })
    }

    fn conv_params(&self) -> Conv2dParams {
        Conv2dParams {
            stride: self.cfg.patch,
            padding: 0,
        }
    }

    /// Checks the input and returns its patch grid (rows, columns).
    fn input_grid(&self, x: &Tensor<f32>) -> Result<(usize, usize)> {
        const OP: &str = "Vit::forward";
        x.expect_rank(OP, "x", 4)?;
        let s = x.shape();
        if s[3] != self.cfg.in_chans || s[1] < self.cfg.patch || s[2] < self.cfg.patch || s[0] == 0
        {
            return Err(Error::shape(
                OP,
                format!(
                    "images {s:?}: expected NHWC [B>0, H, W, {}] with H, W >= patch {}",
                    self.cfg.in_chans, self.cfg.patch
                ),
            ));
        }
        Ok((s[1] / self.cfg.patch, s[2] / self.cfg.patch))
    }

    /// The position embedding for a `gh × gw` grid of an `h × w`-pixel image, `[1 + gh·gw, dim]`,
    /// and the resize used (None when DINO uses `pos_embed` as it is).
    fn pos_embed_for(
        &self,
        store: &ParamStore,
        (gh, gw): (usize, usize),
        (h, w): (usize, usize),
    ) -> Result<(Tensor<f32>, Option<Bicubic>)> {
        let (g, d) = (self.cfg.grid(), self.cfg.dim);
        let pos = store.value(self.pos_embed);
        if gh * gw == g * g && h == w {
            return Ok((pos.clone().reshape(&[1 + g * g, d])?, None));
        }
        let p = Bicubic::dino_pos_embed(g, gh, gw)?;
        if (p.out_h, p.out_w) != (gh, gw) {
            // DINO asserts the same.
            return Err(Error::shape(
                "Vit::pos_embed",
                format!(
                    "resized grid {}x{} differs from the patch grid {gh}x{gw}",
                    p.out_h, p.out_w
                ),
            ));
        }
        let grid = Tensor::from_vec(pos.data()[d..].to_vec(), &[g, g, d])?;
        let r = bicubic_forward(&grid, p)?;
        let mut out = Vec::with_capacity((1 + gh * gw) * d);
        out.extend_from_slice(&pos.data()[..d]);
        out.extend_from_slice(r.data());
        Ok((Tensor::from_vec(out, &[1 + gh * gw, d])?, Some(p)))
    }

    /// Patch embedding, CLS token and position embedding: tokens `[B, 1 + n, dim]`.
    fn tokens(&self, store: &ParamStore, x: &Tensor<f32>) -> Result<Tokens> {
        let grid = self.input_grid(x)?;
        let (b, d, n) = (x.dim(0), self.cfg.dim, grid.0 * grid.1);
        let patches = conv2d_forward(
            x,
            store.value(self.patch_weight),
            Some(store.value(self.patch_bias)),
            self.conv_params(),
        )?;
        let (pos, interp) = self.pos_embed_for(store, grid, (x.dim(1), x.dim(2)))?;
        let (cls, pos, pd) = (
            store.value(self.cls_token).data(),
            pos.data(),
            patches.data(),
        );
        let mut t = vec![0f32; b * (1 + n) * d];
        for (bi, tb) in t.chunks_exact_mut((1 + n) * d).enumerate() {
            let (t0, rest) = tb.split_at_mut(d);
            for ((o, &c), &p) in t0.iter_mut().zip(cls).zip(&pos[..d]) {
                *o = c + p;
            }
            for ((o, &v), &p) in rest
                .iter_mut()
                .zip(&pd[bi * n * d..(bi + 1) * n * d])
                .zip(&pos[d..])
            {
                *o = v + p;
            }
        }
        Ok((Tensor::from_vec(t, &[b, 1 + n, d])?, grid, interp))
    }

    /// The CLS rows `[B, dim]` of tokens `[B, N, dim]`.
    fn cls_rows(t: &Tensor<f32>) -> Result<Tensor<f32>> {
        let (b, n, d) = (t.dim(0), t.dim(1), t.dim(2));
        let mut out = Vec::with_capacity(b * d);
        for bi in 0..b {
            out.extend_from_slice(&t.data()[bi * n * d..bi * n * d + d]);
        }
        Tensor::from_vec(out, &[b, d])
    }

    /// Training forward: images `x` NHWC `[B, H, W, in_chans]` → CLS features `[B, dim]`.
    /// `train = Some(rng)`: drop path active, masks drawn from `rng` (block by block, attention
    /// branch first; blocks with rate 0 draw nothing). `None`: eval mode (with caches).
    pub fn forward(
        &self,
        store: &ParamStore,
        x: &Tensor<f32>,
        mut train: Option<&mut Rng>,
    ) -> Result<(Tensor<f32>, VitCache)> {
        let (mut t, grid, interp) = self.tokens(store, x)?;
        let mut caches = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            let (y, c) = blk.forward(store, t, train.as_deref_mut())?;
            caches.push(c);
            t = y;
        }
        let cls = Self::cls_rows(&t)?;
        drop(t);
        let (y, norm) = self.norm.forward(store, cls)?;
        Ok((
            y,
            VitCache {
                x: x.clone(),
                grid,
                interp,
                blocks: caches,
                norm,
            },
        ))
    }

    /// Eval forward without caches (no drop path), for the DINO teacher whose outputs are
    /// targets only: CLS features `[B, dim]`.
    pub fn infer(&self, store: &ParamStore, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let (mut t, _, _) = self.tokens(store, x)?;
        for blk in &self.blocks {
            t = blk.infer(store, t)?;
        }
        self.norm.infer(store, &Self::cls_rows(&t)?)
    }

    /// Backward from the gradient of the CLS features `dy [B, dim]`: accumulates every
    /// parameter's gradient (the input images get none).
    pub fn backward(
        &self,
        store: &mut ParamStore,
        cache: VitCache,
        dy: &Tensor<f32>,
    ) -> Result<()> {
        self.backward_hooked(store, cache, dy, None)
    }

    /// [`Vit::backward`] that reports finished gradients to `ready`: the final norm's, each
    /// block's (last block first), then `cls_token`, `pos_embed` and the patch embedding's.
    /// Pass `Some` only for the last backbone pass of a step, `None` for the others.
    pub fn backward_hooked(
        &self,
        store: &mut ParamStore,
        cache: VitCache,
        dy: &Tensor<f32>,
        mut ready: Option<&mut (dyn GradReady + '_)>,
    ) -> Result<()> {
        let VitCache {
            x,
            grid: (gh, gw),
            interp,
            mut blocks,
            norm,
        } = cache;
        let (b, d, n) = (x.dim(0), self.cfg.dim, gh * gw);
        dy.expect_shape("Vit::backward", "dy", &[b, d])?;
        let dcls = self.norm.backward(store, norm, dy)?;
        if let Some(r) = ready.as_deref_mut() {
            r.ready(store, &[self.norm.weight, self.norm.bias])?;
        }
        let mut dt = vec![0f32; b * (1 + n) * d];
        for (bi, row) in dcls.data().chunks_exact(d).enumerate() {
            dt[bi * (1 + n) * d..bi * (1 + n) * d + d].copy_from_slice(row);
        }
        let mut dt = Tensor::from_vec(dt, &[b, 1 + n, d])?;
        for blk in self.blocks.iter().rev() {
            let c = blocks.pop().expect("one cache per block");
            dt = blk.backward(store, c, dt)?;
            if let Some(r) = ready.as_deref_mut() {
                r.ready(store, &blk.params())?;
            }
        }
        // Tokens: cls_token gets the batch sum of the CLS rows, pos_embed the batch sum of all
        // rows, the patch embedding the patch rows.
        let mut dpos = vec![0f32; (1 + n) * d];
        let mut dpatch = Vec::with_capacity(b * n * d);
        for tb in dt.data().chunks_exact((1 + n) * d) {
            for (a, &v) in dpos.iter_mut().zip(tb) {
                *a += v;
            }
            dpatch.extend_from_slice(&tb[d..]);
        }
        drop(dt);
        store.accumulate_grad(
            self.cls_token,
            &Tensor::from_vec(dpos[..d].to_vec(), &[1, 1, d])?,
        )?;
        let g = self.cfg.grid();
        let dpos = match interp {
            None => dpos,
            Some(p) => {
                let dgrid =
                    bicubic_backward(&Tensor::from_vec(dpos[d..].to_vec(), &[gh, gw, d])?, p)?;
                let mut full = Vec::with_capacity((1 + g * g) * d);
                full.extend_from_slice(&dpos[..d]);
                full.extend_from_slice(dgrid.data());
                full
            }
        };
        store.accumulate_grad(self.pos_embed, &Tensor::from_vec(dpos, &[1, 1 + g * g, d])?)?;
        let dpatch = Tensor::from_vec(dpatch, &[b, gh, gw, d])?;
        let gr = conv2d_backward(
            &x,
            store.value(self.patch_weight),
            &dpatch,
            self.conv_params(),
            false,
            true,
        )?;
        store.accumulate_grad(self.patch_weight, &gr.dw)?;
        if let Some(db) = gr.db.as_ref() {
            store.accumulate_grad(self.patch_bias, db)?;
        }
        if let Some(r) = ready {
            r.ready(
                store,
                &[
                    self.cls_token,
                    self.pos_embed,
                    self.patch_weight,
                    self.patch_bias,
                ],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::init::reference_fill;

    fn tiny() -> VitConfig {
        VitConfig {
            patch: 4,
            dim: 8,
            depth: 3,
            heads: 2,
            mlp_ratio: 2.0,
            drop_path_rate: 0.3,
            img_size: 16,
            in_chans: 3,
            eps: 1e-6,
        }
    }

    #[test]
    fn vit_small_parameter_count_and_keys() {
        let mut s = ParamStore::new();
        let v = Vit::new(&mut s, "", VitConfig::vit_small(), 0).unwrap();
        // timm vit_small_patch16_224(num_classes=0): 21,665,664 parameters, 150 tensors.
        assert_eq!(s.num_params(), 21_665_664);
        assert_eq!(s.len(), 150);
        let names: Vec<&str> = s.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            &names[..6],
            [
                "cls_token",
                "pos_embed",
                "patch_embed.proj.weight",
                "patch_embed.proj.bias",
                "blocks.0.norm1.weight",
                "blocks.0.norm1.bias"
            ]
        );
        assert_eq!(&names[148..], ["norm.weight", "norm.bias"]);
        assert_eq!(s.value(v.pos_embed).shape(), &[1, 197, 384]);
        let dp: Vec<f64> = (0..12)
            .map(|i| {
                VitConfig::vit_small()
                    .with_drop_path(0.1)
                    .block_drop_path(i)
            })
            .collect();
        assert_eq!(dp[0], 0.0);
        assert!((dp[11] - 0.1).abs() < 1e-7 && (dp[1] - 0.1 / 11.0).abs() < 1e-8);
    }

    #[test]
    fn init_follows_dino() {
        let mut s = ParamStore::new();
        let v = Vit::new(&mut s, "backbone", tiny(), 3).unwrap();
        let std = |id: ParamId| {
            let d = s.value(id).data();
            (d.iter().map(|x| (x * x) as f64).sum::<f64>() / d.len() as f64).sqrt()
        };
        let mut big = ParamStore::new();
        let vb = Vit::new(&mut big, "", VitConfig::vit_small(), 3).unwrap();
        let sb = |id: ParamId| {
            let d = big.value(id).data();
            (d.iter().map(|x| (x * x) as f64).sum::<f64>() / d.len() as f64).sqrt()
        };
        assert!((sb(vb.pos_embed) / 0.02 - 1.0).abs() < 0.02);
        assert!((sb(vb.blocks[0].fc1.weight) / 0.02 - 1.0).abs() < 0.02);
        // U(±1/√768) has std 1/√(3·768)
        assert!((sb(vb.patch_weight) * (3.0f64 * 768.0).sqrt() - 1.0).abs() < 0.02);
        assert!(big
            .value(vb.blocks[3].qkv.bias.unwrap())
            .data()
            .iter()
            .all(|&x| x == 0.0));
        assert!(std(v.norm.weight) == 1.0);
        assert_eq!(s.entries()[0].name, "backbone.cls_token");
    }

    #[test]
    fn rejects_bad_inputs() {
        let mut s = ParamStore::new();
        let v = Vit::new(&mut s, "", tiny(), 0).unwrap();
        for shape in [vec![2, 16, 16, 4], vec![2, 3, 16, 3], vec![16, 16, 3]] {
            assert!(v.infer(&s, &Tensor::zeros(&shape)).is_err(), "{shape:?}");
        }
        let mut bad = tiny();
        bad.heads = 3;
        assert!(Vit::new(&mut ParamStore::new(), "", bad, 0).is_err());
    }

    #[test]
    fn eval_forward_and_infer_agree_at_both_resolutions() {
        let mut s = ParamStore::new();
        let v = Vit::new(&mut s, "", tiny(), 0).unwrap();
        reference_fill(&mut s, 2);
        for hw in [16, 8, 12] {
            let x = Tensor::randn_named(0, "x", &[2, hw, hw, 3], 1.0);
            let (y, c) = v.forward(&s, &x, None).unwrap();
            assert_eq!(c.interp.is_some(), hw != 16);
            assert_eq!(y.shape(), &[2, 8]);
            assert_eq!(y, v.infer(&s, &x).unwrap());
        }
    }

    /// Directional derivatives of Σ y·r with respect to the input-independent parameters
    /// (pos_embed through the bicubic adjoint, cls_token, the patch conv) against central
    /// differences, with drop path, at the native grid and at a resized one.
    #[test]
    fn backward_matches_finite_differences() {
        for hw in [12, 16] {
            grads_match_finite_differences(hw);
        }
    }

    fn grads_match_finite_differences(hw: usize) {
        let mut s = ParamStore::new();
        let v = Vit::new(&mut s, "", tiny(), 0).unwrap();
        reference_fill(&mut s, 2);
        let x = Tensor::randn_named(0, "x", &[4, hw, hw, 3], 1.0);
        let r = Tensor::randn_named(0, "r", &[4, 8], 1.0);
        let loss = |s: &ParamStore| -> f64 {
            let mut rng = Rng::named(1, "dp");
            let (y, _) = v.forward(s, &x, Some(&mut rng)).unwrap();
            y.data()
                .iter()
                .zip(r.data())
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum()
        };
        let mut rng = Rng::named(1, "dp");
        let (_, c) = v.forward(&s, &x, Some(&mut rng)).unwrap();
        v.backward(&mut s, c, &r).unwrap();
        for id in [v.pos_embed, v.cls_token, v.patch_weight, v.patch_bias] {
            let dir = Tensor::randn_named(0, "dir", s.value(id).shape(), 1.0);
            let eps = 1e-3f32;
            let mut sp = s.clone();
            let mut sm = s.clone();
            for ((p, m), d) in sp
                .value_mut(id)
                .data_mut()
                .iter_mut()
                .zip(sm.value_mut(id).data_mut().iter_mut())
                .zip(dir.data())
            {
                *p += eps * d;
                *m -= eps * d;
            }
            let fd = (loss(&sp) - loss(&sm)) / (2.0 * eps as f64);
            let an: f64 = s
                .grad(id)
                .data()
                .iter()
                .zip(dir.data())
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum();
            let name = &s.entry(id).name;
            // f32 central differences at eps 1e-3: ~0.5% noise (the CLS token's LayerNorm input
            // is small under the reference fill, so larger steps are not in the linear regime).
            assert!(
                (fd - an).abs() <= 1e-2 * an.abs().max(0.1),
                "{hw}px {name}: {fd} vs {an}"
            );
        }
    }
}

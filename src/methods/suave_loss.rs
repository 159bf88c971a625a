//! Suave's loss (spec §1.4–1.8): SwAV's swapped prediction on the unlabelled views, a
//! label-smoothed cross-entropy on the labelled (mixup) batch and a mixed-unlabelled term, all on
//! the same prototype scores and the same temperature, weighted by their share of the batch.
//!
//! It is split in two pure functions so that each can be checked on its own:
//! [`suave_codes`] (no gradient: Sinkhorn of `[queue·Cᵀ; p_a]`, last `bs` rows) and
//! [`suave_loss`] (the loss and its gradient w.r.t. every score tensor, with the codes held
//! constant, exactly what autograd gives in the official code where the codes are computed
//! under `no_grad`). Every term is the fused [`cross_entropy_forward`] / backward.

use super::sinkhorn::{sinkhorn, SinkhornParams};
use crate::backend::cpu::loss::{
    cross_entropy_backward, cross_entropy_forward, CrossEntropyParams,
};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};

/// How the mixed-unlabelled term is counted in the batch size `T` of §1.8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MixedCount {
    /// As coded (main L593/L597): the number of mixed *views* (1), giving weight 1/T ≈ 0.0028.
    /// Reproduces the published numbers.
    Views,
    /// As the paper intends: the number of mixed *samples* (bs).
    Samples,
}

/// Parameters of the Suave loss; the defaults are the training scripts' values.
#[derive(Clone, Debug, PartialEq)]
pub struct SuaveConfig {
    /// Student temperature τ of every term (`--temperature`, 0.1).
    pub temperature: f64,
    /// Sinkhorn's ε and iteration count.
    pub sinkhorn: SinkhornParams,
    /// Unlabelled views that get codes (`--crops_for_assign`, the two global views).
    pub crops_for_assign: Vec<usize>,
    /// Label smoothing of the labelled term (`--label_smoothing`, 0.01).
    pub label_smoothing: f64,
    /// How the mixed term enters the weights.
    pub mixed_count: MixedCount,
    /// Rows of the online-head loss (`lab_bs_no_mixed`); only its weight is computed here.
    pub online_rows: usize,
}

impl Default for SuaveConfig {
    fn default() -> Self {
        SuaveConfig {
            temperature: 0.1,
            sinkhorn: SinkhornParams::default(),
            crops_for_assign: vec![0, 1],
            label_smoothing: 0.01,
            mixed_count: MixedCount::Views,
            online_rows: 0,
        }
    }
}

/// The weights of §1.8: each term's share `n/T` of `T = V·bs + lab_bs + n_mixU`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SuaveWeights {
    /// `V·bs/T`.
    pub unlab: f64,
    /// `lab_bs/T`.
    pub lab: f64,
    /// `n_mixU/T` (`n_mixU` = 1 or bs, see [`MixedCount`]; 0 without a mixed view).
    pub mixed: f64,
    /// `L0/T` for the online heads' loss, which the caller computes and adds.
    pub online: f64,
}

impl SuaveWeights {
    /// Weights for `views` unlabelled views of `bs` rows, `lab_bs` labelled rows, an optional
    /// mixed view and `online_rows` online-head rows.
    pub fn new(
        views: usize,
        bs: usize,
        lab_bs: usize,
        mixed: bool,
        count: MixedCount,
        online_rows: usize,
    ) -> Self {
        let n_mix = match (mixed, count) {
            (false, _) => 0,
            (true, MixedCount::Views) => 1,
            (true, MixedCount::Samples) => bs,
        };
        let t = (views * bs + lab_bs + n_mix).max(1) as f64;
        SuaveWeights {
            unlab: (views * bs) as f64 / t,
            lab: lab_bs as f64 / t,
            mixed: n_mix as f64 / t,
            online: online_rows as f64 / t,
        }
    }
}

/// The labelled batch: prototype scores `[lab_bs, K]` and (soft, mixup) targets `[lab_bs, K]`.
#[derive(Clone, Copy, Debug)]
pub struct Labelled<'a, T> {
    /// Prototype scores of the labelled images (the class prototypes are the first K).
    pub scores: &'a Tensor<T>,
    /// Target probabilities; label smoothing is applied on top (§1.5).
    pub targets: &'a Tensor<T>,
}

/// The mixed unlabelled view `mix(g1, g2.flip(0))` with its mixing coefficient λ.
#[derive(Clone, Copy, Debug)]
pub struct Mixed<'a, T> {
    /// Prototype scores `[bs, K]` of the mixed view.
    pub scores: &'a Tensor<T>,
    /// λ of the image mix: targets are `λ·q_0 + (1 − λ)·q_1.flip(0)`.
    pub lambda: f64,
}

/// What [`suave_loss`] returns: the weighted total, each term, and the gradient of the total
/// w.r.t. every score tensor.
#[derive(Clone, Debug)]
pub struct SuaveLoss<T> {
    /// `w_unlab·L_unlab + w_lab·L_lab + w_mixed·L_mixU` (the online term is added by the caller).
    pub total: T,
    /// Swapped-prediction loss `L_unlab`.
    pub unlab: T,
    /// Labelled cross-entropy, when a labelled batch was given.
    pub lab: Option<T>,
    /// Mixed-unlabelled loss, when a mixed view was given.
    pub mixed: Option<T>,
    /// The weights used.
    pub weights: SuaveWeights,
    /// `∂total/∂p_v` per unlabelled view.
    pub d_views: Vec<Tensor<T>>,
    /// `∂total/∂p_lab`.
    pub d_lab: Option<Tensor<T>>,
    /// `∂total/∂p_mixed`.
    pub d_mixed: Option<Tensor<T>>,
}

fn check_views<T: Float>(op: &'static str, views: &[Tensor<T>]) -> Result<(usize, usize)> {
    let first = views
        .first()
        .ok_or_else(|| Error::invalid(op, "no unlabelled views given"))?;
    first.expect_rank(op, "view scores", 2)?;
    let shape = first.shape().to_vec();
    for (i, v) in views.iter().enumerate() {
        if v.shape() != shape.as_slice() {
            return Err(Error::shape(
                op,
                format!(
                    "view {i} has scores {:?}, view 0 has {:?}",
                    v.shape(),
                    shape
                ),
            ));
        }
    }
    Ok((shape[0], shape[1]))
}

fn check_assign(op: &'static str, cfg: &SuaveConfig, views: usize) -> Result<()> {
    if cfg.crops_for_assign.is_empty() {
        return Err(Error::invalid(op, "crops_for_assign is empty"));
    }
    if views < 2 {
        return Err(Error::invalid(
            op,
            "swapped prediction needs at least two views",
        ));
    }
    if let Some(&a) = cfg.crops_for_assign.iter().find(|&&a| a >= views) {
        return Err(Error::invalid(
            op,
            format!("crop {a} in crops_for_assign, but only {views} views were given"),
        ));
    }
    Ok(())
}

/// Codes `q_a` `[bs, K]` for every `a` in `crops_for_assign` (no gradient).
///
/// `queue_scores[i]` is `queue_i·Cᵀ` (`[len, K]`, this step's prototypes) for the i-th assigned
/// crop while the queue is active, `None` otherwise; an empty slice means no queue. Sinkhorn runs
/// on `[queue scores; p_a]` (collectively over the ranks) and the last `bs` rows are the codes.
pub fn suave_codes<T: Float>(
    views: &[Tensor<T>],
    queue_scores: &[Option<&Tensor<T>>],
    cfg: &SuaveConfig,
    comm: &dyn Communicator,
) -> Result<Vec<Tensor<T>>> {
    const OP: &str = "suave_codes";
    let (bs, _) = check_views(OP, views)?;
    check_assign(OP, cfg, views.len())?;
    if !queue_scores.is_empty() && queue_scores.len() != cfg.crops_for_assign.len() {
        return Err(Error::invalid(
            OP,
            format!(
                "{} queue score tensors for {} assigned crops",
                queue_scores.len(),
                cfg.crops_for_assign.len()
            ),
        ));
    }
    cfg.crops_for_assign
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            let q = match queue_scores.get(i).copied().flatten() {
                Some(qs) => {
                    let s = Tensor::cat_batch(&[qs, &views[a]])?;
                    let q = sinkhorn(&s, cfg.sinkhorn, comm)?;
                    let rows = s.shape()[0];
                    q.split_batch(&[rows - bs, bs])?
                        .pop()
                        .ok_or_else(|| Error::invalid(OP, "split_batch returned no parts"))?
                }
                None => sinkhorn(&views[a], cfg.sinkhorn, comm)?,
            };
            Ok(q)
        })
        .collect()
}

/// The Suave loss and its gradients, the codes held constant (see the module doc).
///
/// `views`: scores `[bs, K]` of the V unlabelled views (the mixed view excluded), `codes`: from
/// [`suave_codes`] (one per assigned crop, in `crops_for_assign` order). The mixed term needs
/// exactly two assigned crops (its targets mix `q_0` and `q_1.flip(0)`).
pub fn suave_loss<T: Float>(
    views: &[Tensor<T>],
    codes: &[Tensor<T>],
    lab: Option<Labelled<'_, T>>,
    mixed: Option<Mixed<'_, T>>,
    cfg: &SuaveConfig,
) -> Result<SuaveLoss<T>> {
    const OP: &str = "suave_loss";
    let (bs, k) = check_views(OP, views)?;
    check_assign(OP, cfg, views.len())?;
    let na = cfg.crops_for_assign.len();
    if codes.len() != na {
        return Err(Error::invalid(
            OP,
            format!("{} codes for {na} assigned crops", codes.len()),
        ));
    }
    let lab_bs = lab.map_or(0, |l| l.scores.shape().first().copied().unwrap_or(0));
    let w = SuaveWeights::new(
        views.len(),
        bs,
        lab_bs,
        mixed.is_some(),
        cfg.mixed_count,
        cfg.online_rows,
    );
    let student = CrossEntropyParams {
        temperature: cfg.temperature,
        label_smoothing: 0.0,
    };
    let nv = views.len();
    // L_unlab = (1/|A|) Σ_a (1/(V−1)) Σ_{v≠a} CE(p_v/τ, q_a).
    let pair = w.unlab / (na * (nv - 1)) as f64;
    let mut unlab = T::ZERO;
    let mut d_views: Vec<Tensor<T>> = views.iter().map(|_| Tensor::zeros(&[bs, k])).collect();
    for (q, &a) in codes.iter().zip(&cfg.crops_for_assign) {
        for (v, (p, dv)) in views.iter().zip(d_views.iter_mut()).enumerate() {
            if v == a {
                continue;
            }
            let (l, ctx) = cross_entropy_forward(p, q, student)?;
            unlab += l;
            let g = cross_entropy_backward(T::c(pair), q, &ctx)?;
            for (d, gi) in dv.data_mut().iter_mut().zip(g.data()) {
                *d += *gi;
            }
        }
    }
    unlab /= T::c((na * (nv - 1)) as f64);
    let mut total = T::c(w.unlab) * unlab;

    let (lab_loss, d_lab) = match lab {
        Some(l) => {
            let params = CrossEntropyParams {
                temperature: cfg.temperature,
                label_smoothing: cfg.label_smoothing,
            };
            let (loss, ctx) = cross_entropy_forward(l.scores, l.targets, params)?;
            total += T::c(w.lab) * loss;
            (
                Some(loss),
                Some(cross_entropy_backward(T::c(w.lab), l.targets, &ctx)?),
            )
        }
        None => (None, None),
    };

    let (mixed_loss, d_mixed) = match mixed {
        Some(m) => {
            if na != 2 {
                return Err(Error::invalid(
                    OP,
                    format!("the mixed term needs two assigned crops, got {na}"),
                ));
            }
            m.scores.expect_shape(OP, "mixed view scores", &[bs, k])?;
            let lam = T::c(m.lambda);
            let one = T::one() - lam;
            let mut t = Tensor::zeros(&[bs, k]);
            for (b, row) in t.data_mut().chunks_exact_mut(k).enumerate() {
                let q0 = &codes[0].data()[b * k..(b + 1) * k];
                let q1 = &codes[1].data()[(bs - 1 - b) * k..(bs - b) * k];
                for ((o, &x0), &x1) in row.iter_mut().zip(q0).zip(q1) {
                    *o = lam * x0 + one * x1;
                }
            }
            let (loss, ctx) = cross_entropy_forward(m.scores, &t, student)?;
            total += T::c(w.mixed) * loss;
            (
                Some(loss),
                Some(cross_entropy_backward(T::c(w.mixed), &t, &ctx)?),
            )
        }
        None => (None, None),
    };

    Ok(SuaveLoss {
        total,
        unlab,
        lab: lab_loss,
        mixed: mixed_loss,
        weights: w,
        d_views,
        d_lab,
        d_mixed,
    })
}

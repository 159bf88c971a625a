//! One Suave iteration (spec §1.3–§1.10) and Suave's evaluation (§1.14), and the supervised
//! baseline on the same network.
//!
//! A step: renormalise the prototypes; one forward of `[labelled | g1 | g2 | mix(g1, g2) |
//! locals]` (one backbone pass per resolution, the head once); the queue's scores with this
//! step's prototypes, then the queue push; Sinkhorn codes for the assigned global views; the
//! swapped-prediction, labelled, mixed and online-head terms with their §1.8 weights; one
//! backward; LARS with the per-iteration cosine rate. The supervised baseline runs the same
//! network on the labelled batch alone with the labelled and online terms.
//!
//! Data parallel: with a communicator of several ranks, every BN is a SyncBatchNorm, Sinkhorn
//! sums over the ranks' rows (and their queues), the metrics and then the gradients are
//! averaged over the ranks before LARS, so that every rank takes the same step.

use super::config::{Method, TrainConfig};
use super::metrics::{argmax_rows, topk_correct, StepMetrics};
use super::run::{average_metrics, GradSync};
use super::{labelled_input, rows};
use crate::backend::cpu::loss::{
    cross_entropy_backward, cross_entropy_forward, one_hot, CrossEntropyParams,
};
use crate::backend::cpu::matmul::matmul;
use crate::backend::cpu::softmax::softmax_forward;
use crate::data::Batch;
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::methods::queue::Queue;
use crate::methods::sinkhorn::SinkhornParams;
use crate::methods::suave_loss::{
    suave_codes, suave_loss, Labelled, Mixed, MixedCount, SuaveConfig,
};
use crate::models::backbone::{BackboneRun, CpuBackbone};
use crate::models::suave_head::{SuaveGrads, SuaveHeadConfig, SuaveNet, ONLINE_HEADS};
use crate::nn::ParamStore;
use crate::optim::lars::Lars;
use crate::optim::schedule::CosineSchedule;
use crate::tensor::Tensor;

/// Everything a Suave run changes: weights, optimiser, queue.
pub struct SuaveState {
    /// Parameters and buffers (official names).
    pub store: ParamStore,
    /// The network.
    pub net: SuaveNet,
    /// The optimiser and its momentum buffers.
    pub lars: Lars,
    /// The per-rank queue (None when `queue_length` is 0).
    pub queue: Option<Queue>,
    /// How the gradients are averaged over the ranks (overlapped with the backward or after).
    pub grad_sync: GradSync,
    /// Where the backbone's training passes run (the CPU model unless a device is chosen).
    pub backbone: Box<dyn BackboneRun>,
    lr: CosineSchedule,
    loss_cfg: SuaveConfig,
    supervised: bool,
}

/// Rows of each part of the model's input, in order.
struct Layout {
    lab_rows: usize,
    bs: usize,
    views: usize,
    mixed: bool,
}

impl Layout {
    /// First row of unlabelled view `v` (the mixed view sits after view 1).
    fn view_row(&self, v: usize) -> usize {
        let shift = usize::from(self.mixed && v >= 2);
        self.lab_rows + (v + shift) * self.bs
    }
    fn mixed_row(&self) -> usize {
        self.lab_rows + 2 * self.bs
    }
    fn total(&self) -> usize {
        self.lab_rows + (self.views + usize::from(self.mixed)) * self.bs
    }
}

fn put_rows(dst: &mut Tensor<f32>, start: usize, src: &Tensor<f32>) {
    let d = src.numel() / src.dim(0).max(1);
    dst.data_mut()[start * d..start * d + src.numel()].copy_from_slice(src.data());
}

impl SuaveState {
    /// A fresh network for `cfg` (Kaiming/default inits from `cfg.seed`) and the optimiser;
    /// `iters_per_epoch` sizes the schedule.
    pub fn new(cfg: &TrainConfig, iters_per_epoch: usize, world: usize) -> Result<SuaveState> {
        let backbone = cfg.arch.resnet().ok_or_else(|| {
            Error::invalid("--arch", format!("{} is not a ResNet", cfg.arch.name()))
        })?;
        let mut store = ParamStore::new();
        let head = SuaveHeadConfig {
            in_dim: 0,
            hidden: cfg.hidden_mlp,
            out_dim: cfg.feat_dim,
            n_prototypes: cfg.num_classes,
            n_classes: cfg.num_classes,
            online_heads: cfg.multihead_eval,
        };
        let net = SuaveNet::new(&mut store, backbone, head, cfg.seed)?;
        let supervised = cfg.method == Method::Supervised;
        let per_rank = Queue::rows_per_rank(cfg.queue_length, cfg.batch_size, world);
        let queue = if per_rank > 0 && !supervised {
            Some(Queue::new(
                cfg.crops_for_assign.len(),
                per_rank,
                cfg.feat_dim,
            )?)
        } else {
            None
        };
        let lr = CosineSchedule::suave_lr(
            cfg.base_lr,
            cfg.final_lr,
            cfg.epochs,
            iters_per_epoch,
            cfg.warmup_epochs,
            cfg.start_warmup,
        )?;
        let loss_cfg = SuaveConfig {
            temperature: cfg.temperature,
            sinkhorn: SinkhornParams {
                epsilon: cfg.epsilon,
                iterations: cfg.sinkhorn_iterations,
            },
            crops_for_assign: cfg.crops_for_assign.clone(),
            label_smoothing: cfg.label_smoothing,
            mixed_count: if cfg.mixed_unlab_weight == "samples" {
                MixedCount::Samples
            } else {
                MixedCount::Views
            },
            online_rows: cfg.lab_batch_size,
        };
        Ok(SuaveState {
            store,
            net,
            lars: Lars::new(cfg.weight_decay as f32),
            queue,
            grad_sync: GradSync::new(cfg.overlap_grad_reduce),
            backbone: Box::new(CpuBackbone),
            lr,
            loss_cfg,
            supervised,
        })
    }

    /// The learning rate of iteration `it`.
    pub fn lr(&self, it: usize) -> Result<f64> {
        self.lr.at(it)
    }

    /// One training iteration at global iteration `it` (epoch `epoch`).
    pub fn step(
        &mut self,
        cfg: &TrainConfig,
        unlab: Option<&Batch>,
        lab: &Batch,
        it: usize,
        epoch: usize,
        comm: &dyn Communicator,
    ) -> Result<StepMetrics> {
        const OP: &str = "suave step";
        let k = cfg.num_classes;
        self.net.head.normalize_prototypes(&mut self.store)?;
        self.store.zero_grads();
        let (lab_x, lab_targets, lab_clean) = labelled_input(OP, lab, k)?;
        let lab_rows = lab_x.dim(0);
        let unlab = if self.supervised { None } else { unlab };
        let mut inputs = vec![lab_x.clone()];
        let mut layout = Layout {
            lab_rows,
            bs: 0,
            views: 0,
            mixed: false,
        };
        let mut lambda = 0.0f32;
        if let Some(u) = unlab {
            layout.bs = u.labels.len();
            layout.views = u.views.len();
            for (v, x) in u.views.iter().enumerate() {
                if v == 2 {
                    if let Some((m, p)) = &u.mixed {
                        inputs.push(m.clone());
                        layout.mixed = true;
                        lambda = p.lambda;
                    }
                }
                inputs.push(x.clone());
            }
            if u.views.len() == 2 {
                if let Some((m, p)) = &u.mixed {
                    inputs.push(m.clone());
                    layout.mixed = true;
                    lambda = p.lambda;
                }
            }
        }
        let (out, cache) =
            self.net
                .forward_on(&mut self.store, &inputs, true, comm, self.backbone.as_mut())?;
        if out.scores.dim(0) != layout.total() {
            return Err(Error::shape(
                OP,
                format!(
                    "{} score rows for a batch of {}",
                    out.scores.dim(0),
                    layout.total()
                ),
            ));
        }
        let mut metrics = StepMetrics::default();
        let mut dscores = Tensor::<f32>::zeros(out.scores.shape());
        let lab_scores = rows(&out.scores, 0, lab_rows)?;
        let online_w;
        if let Some(u) = unlab {
            let views: Vec<Tensor<f32>> = (0..layout.views)
                .map(|v| rows(&out.scores, layout.view_row(v), layout.bs))
                .collect::<Result<_>>()?;
            // Queue scores with this step's prototypes, then the push (main L616–625).
            let mut queue_scores = Vec::new();
            if let Some(q) = self.queue.as_mut() {
                if epoch >= cfg.epoch_queue_starts {
                    let c = self.store.value(self.net.head.prototypes.weight).clone();
                    for (i, &a) in self.loss_cfg.crops_for_assign.iter().enumerate() {
                        let qs = if q.is_active(i)? {
                            let qa = q.crop(i)?;
                            let (len, d) = (qa.dim(0), qa.dim(1));
                            let mut s = Tensor::zeros(&[len, k]);
                            matmul(
                                len,
                                k,
                                d,
                                qa.data(),
                                false,
                                c.data(),
                                true,
                                s.data_mut(),
                                false,
                            );
                            Some(s)
                        } else {
                            None
                        };
                        queue_scores.push(qs);
                        let e = rows(&out.embedding, layout.view_row(a), layout.bs)?;
                        q.push(i, &e)?;
                    }
                }
            }
            let qrefs: Vec<Option<&Tensor<f32>>> =
                queue_scores.iter().map(|s| s.as_ref()).collect();
            let codes = suave_codes(&views, &qrefs, &self.loss_cfg, comm)?;
            let mixed_scores = if layout.mixed {
                Some(rows(&out.scores, layout.mixed_row(), layout.bs)?)
            } else {
                None
            };
            let loss = suave_loss(
                &views,
                &codes,
                Some(Labelled {
                    scores: &lab_scores,
                    targets: &lab_targets,
                }),
                mixed_scores.as_ref().map(|s| Mixed {
                    scores: s,
                    lambda: lambda as f64,
                }),
                &self.loss_cfg,
            )?;
            for (v, d) in loss.d_views.iter().enumerate() {
                put_rows(&mut dscores, layout.view_row(v), d);
            }
            if let Some(d) = &loss.d_lab {
                put_rows(&mut dscores, 0, d);
            }
            if let Some(d) = &loss.d_mixed {
                put_rows(&mut dscores, layout.mixed_row(), d);
            }
            metrics.add("train_unlab_loss", loss.unlab as f64);
            if let Some(l) = loss.lab {
                metrics.add("train_lab_loss", l as f64);
            }
            if let Some(l) = loss.mixed {
                metrics.add("train_mixed_unlab_loss", l as f64);
            }
            metrics.add("loss_total_suave", loss.total as f64);
            online_w = loss.weights.online;
            // Monitoring: do the codes of view 0 name the true class?
            if let Some(q0) = codes.first() {
                let (c1, c5) = topk_correct(q0, &u.labels)?;
                metrics.add("train_unlab_acc1", 100.0 * c1 / u.labels.len() as f64);
                metrics.add("train_unlab_acc5", 100.0 * c5 / u.labels.len() as f64);
            }
        } else {
            // Supervised: the labelled term alone, weight lab_bs/T = 1.
            let p = CrossEntropyParams {
                temperature: cfg.temperature,
                label_smoothing: cfg.label_smoothing,
            };
            let (l, ctx) = cross_entropy_forward(&lab_scores, &lab_targets, p)?;
            let d = cross_entropy_backward(1.0, &lab_targets, &ctx)?;
            put_rows(&mut dscores, 0, &d);
            metrics.add("train_lab_loss", l as f64);
            metrics.add("loss_total_suave", l as f64);
            online_w = lab_clean as f64 / lab_rows as f64;
        }
        // Online heads on the un-mixed labelled rows, temperature 1 (main L661–684).
        let mut online_grads: Option<[Tensor<f32>; 3]> = None;
        let mut online_total = 0.0;
        if let Some(logits) = &out.online_logits {
            let y = one_hot::<f32>(&lab.labels, k)?;
            let p = CrossEntropyParams {
                temperature: 1.0,
                label_smoothing: cfg.label_smoothing,
            };
            let mut grads = Vec::with_capacity(3);
            for (h, lg) in logits.iter().enumerate() {
                let clean = rows(lg, 0, lab_clean)?;
                let (l, ctx) = cross_entropy_forward(&clean, &y, p)?;
                let d = cross_entropy_backward(online_w as f32, &y, &ctx)?;
                let mut full = Tensor::zeros(lg.shape());
                put_rows(&mut full, 0, &d);
                grads.push(full);
                online_total += l as f64;
                let (c1, _) = topk_correct(&clean, &lab.labels)?;
                metrics.add(
                    &format!("train_lab_{}_acc1", ONLINE_HEADS[h]),
                    100.0 * c1 / lab_clean as f64,
                );
            }
            let mut it3 = grads.into_iter();
            if let (Some(a), Some(b), Some(c)) = (it3.next(), it3.next(), it3.next()) {
                online_grads = Some([a, b, c]);
            }
        }
        let total = metrics.get("loss_total_suave").unwrap_or(0.0) + online_w * online_total;
        metrics.remove("loss_total_suave");
        metrics.add("train_loss", total);
        metrics.add("train_online_loss", online_total);
        let clean_scores = rows(&lab_scores, 0, lab_clean)?;
        let (c1, c5) = topk_correct(&clean_scores, &lab.labels)?;
        metrics.add("train_lab_acc1", 100.0 * c1 / lab_clean as f64);
        metrics.add("train_lab_acc5", 100.0 * c5 / lab_clean as f64);
        // Averaged over the ranks BEFORE the check, so that every rank sees the same verdict
        // and none is left waiting in the backward's collectives.
        let mut metrics = average_metrics(&metrics, comm)?;
        metrics.check_finite(it)?;

        let online_refs = online_grads.as_ref().map(|g| [&g[0], &g[1], &g[2]]);
        // DDP: every rank's loss is a mean over its own rows, so the mean of the ranks'
        // gradients is the gradient of the global-batch loss; it is all-reduced bucket by
        // bucket while the backward runs (or after it, without overlap).
        let net = &self.net;
        let runner = self.backbone.as_mut();
        self.grad_sync
            .backward(&mut self.store, comm, |store, comm, ready| {
                let grads = SuaveGrads {
                    scores: &dscores,
                    embedding: None,
                    online: online_refs,
                };
                net.backward_on(store, cache, grads, comm, ready, runner)
            })?;
        let lr = self.lr.at(it)?;
        let proto = self.net.head.prototypes.weight;
        let frozen = it < cfg.freeze_prototypes_niters;
        if frozen {
            // The official code sets the prototypes' grads to None: LARS skips them entirely.
            self.store.set_trainable(proto, false);
        }
        let r = self.lars.step(&mut self.store, lr as f32);
        if frozen {
            self.store.set_trainable(proto, true);
        }
        r?;
        metrics.add("lr", lr);
        Ok(metrics)
    }

    /// Validation as `validate` (§1.14): prototype cosines (top-1/5, CE without τ), each online
    /// head, and the ensemble of the heads' softmaxes with the cosines' softmax. Returns the
    /// summed counts; the caller divides.
    pub fn eval_batch(
        &mut self,
        x: &Tensor<f32>,
        labels: &[usize],
        acc: &mut StepMetrics,
    ) -> Result<()> {
        let k = self.net.head.config.n_prototypes;
        let (out, _) = self
            .net
            .forward(&mut self.store, std::slice::from_ref(x), false)?;
        let n = labels.len() as f64;
        let (c1, c5) = topk_correct(&out.scores, labels)?;
        acc.add_sum("val_acc1", 100.0 * c1, n);
        acc.add_sum("val_acc5", 100.0 * c5, n);
        let y = one_hot::<f32>(labels, k)?;
        let p = CrossEntropyParams {
            temperature: 1.0,
            label_smoothing: 0.0,
        };
        let (l, _) = cross_entropy_forward(&out.scores, &y, p)?;
        acc.add_sum("val_loss", l as f64 * n, n);
        if let Some(logits) = &out.online_logits {
            let mut ens = softmax_forward(&out.scores)?;
            for (h, lg) in logits.iter().enumerate() {
                let (c1, _) = topk_correct(lg, labels)?;
                acc.add_sum(&format!("val_{}_acc1", ONLINE_HEADS[h]), 100.0 * c1, n);
                let s = softmax_forward(lg)?;
                for (e, v) in ens.data_mut().iter_mut().zip(s.data()) {
                    *e += v;
                }
            }
            let pred = argmax_rows(&ens);
            let c = pred.iter().zip(labels).filter(|(p, y)| p == y).count() as f64;
            acc.add_sum("val_ensemble_acc1", 100.0 * c, n);
        }
        Ok(())
    }
}

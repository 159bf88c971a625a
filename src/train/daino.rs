//! One Daino iteration (spec §2.4–§2.5) and Daino's evaluation (§2.7), and the supervised
//! baseline on the ViT family.
//!
//! A step: the teacher (EMA weights, eval mode) sees the two global views; the student (drop
//! path) sees `[labelled | g1 | g2 | locals]` in one pass per resolution; the DINO term over the
//! 18 (teacher, student) pairs and the labelled cross-entropy, weighted by their shares of the
//! batch; the centre update; AdamW with the two groups, the cosine learning rate and the cosine
//! weight decay; then the teacher EMA with the cosine momentum.
//!
//! Data parallel: the centre is the mean over every rank's teacher rows, the metrics and the
//! gradients are averaged over the ranks before AdamW, so every rank's student and teacher stay
//! identical (the ViT has no BatchNorm to synchronise).

use super::config::{Method, TrainConfig};
use super::metrics::{topk_correct, StepMetrics};
use super::run::{average_metrics, GradSync};
use super::{labelled_input, rows};
use crate::backend::cpu::loss::{
    cross_entropy_backward, cross_entropy_forward, one_hot, CrossEntropyParams,
};
use crate::data::Batch;
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::methods::dino_loss::{daino_loss, teacher_temperature, DainoConfig, DinoCenter};
use crate::models::daino_head::{DinoHeadConfig, MultiCropWrapper};
use crate::nn::ParamStore;
use crate::optim::adamw::AdamW;
use crate::optim::ema::ema_update;
use crate::optim::schedule::CosineSchedule;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Everything a Daino run changes.
pub struct DainoState {
    /// Student parameters (`backbone.*`, `head.*`).
    pub student_store: ParamStore,
    /// Teacher parameters, same names.
    pub teacher_store: ParamStore,
    /// Student network (with drop path).
    pub student: MultiCropWrapper,
    /// Teacher network (no drop path).
    pub teacher: MultiCropWrapper,
    /// Optimiser.
    pub adamw: AdamW,
    /// DINO centre.
    pub center: DinoCenter<f32>,
    /// How the gradients are averaged over the ranks (overlapped with the backward or after).
    pub grad_sync: GradSync,
    lr: CosineSchedule,
    wd: CosineSchedule,
    momentum: CosineSchedule,
    supervised: bool,
}

impl DainoState {
    /// Student and teacher (the teacher starts as a copy of the student), AdamW and schedules.
    pub fn new(cfg: &TrainConfig, iters_per_epoch: usize, world: usize) -> Result<DainoState> {
        let vit = cfg
            .arch
            .vit(cfg.drop_path_rate)
            .ok_or_else(|| Error::invalid("--arch", format!("{} is not a ViT", cfg.arch.name())))?;
        let head = DinoHeadConfig {
            out_dim: cfg.num_classes,
            norm_last_layer: cfg.norm_last_layer,
            hidden_dim: cfg.hidden_mlp,
            bottleneck_dim: cfg.feat_dim,
            ..DinoHeadConfig::daino(vit.dim)
        };
        let mut student_store = ParamStore::new();
        let student = MultiCropWrapper::new(&mut student_store, vit, head, cfg.seed)?;
        let mut teacher_store = ParamStore::new();
        let teacher =
            MultiCropWrapper::new(&mut teacher_store, vit.with_drop_path(0.0), head, cfg.seed)?;
        for (t, s) in teacher_store
            .entries_mut()
            .iter_mut()
            .zip(student_store.entries())
        {
            t.value = s.value.clone();
        }
        let lr = CosineSchedule::dino_lr(
            cfg.base_lr,
            cfg.batch_size,
            world,
            cfg.final_lr,
            cfg.epochs,
            iters_per_epoch,
            cfg.warmup_epochs,
        )?;
        let wd = CosineSchedule::dino_weight_decay(
            cfg.weight_decay,
            cfg.weight_decay_end,
            cfg.epochs,
            iters_per_epoch,
        )?;
        let momentum = CosineSchedule::dino_teacher_momentum(
            cfg.momentum_teacher,
            cfg.epochs,
            iters_per_epoch,
        )?;
        Ok(DainoState {
            student_store,
            teacher_store,
            student,
            teacher,
            adamw: AdamW::new(),
            center: DinoCenter::new(cfg.num_classes),
            grad_sync: GradSync::new(cfg.overlap_grad_reduce),
            lr,
            wd,
            momentum,
            supervised: cfg.method == Method::Supervised,
        })
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
        const OP: &str = "daino step";
        let k = cfg.num_classes;
        self.student_store.zero_grads();
        let (lab_x, targets, lab_clean) = labelled_input(OP, lab, k)?;
        let lab_rows = lab_x.dim(0);
        let unlab = if self.supervised { None } else { unlab };
        let mut crops = vec![lab_x.clone()];
        if let Some(u) = unlab {
            crops.extend(u.views.iter().cloned());
        }
        // Drop-path masks: one stream per iteration, so a resumed run draws the same masks.
        // Each rank draws its own masks (its rows are different samples); rank 0 keeps the
        // one-process stream.
        let mut rng = Rng::named(cfg.seed, "drop_path").fork(it as u64);
        if comm.rank() > 0 {
            rng = rng.fork(comm.rank() as u64);
        }
        let (out, cache) = self
            .student
            .forward(&self.student_store, &crops, Some(&mut rng))?;
        let lab_logits = rows(&out.logits, 0, lab_rows)?;
        let mut metrics = StepMetrics::default();
        let dlogits = if let Some(u) = unlab {
            let bs = u.labels.len();
            let nv = u.views.len();
            let student: Vec<Tensor<f32>> = (0..nv)
                .map(|v| rows(&out.logits, lab_rows + v * bs, bs))
                .collect::<Result<_>>()?;
            let t_out = self.teacher.infer(&self.teacher_store, &u.views[..2])?;
            let teacher = vec![rows(&t_out.logits, 0, bs)?, rows(&t_out.logits, bs, bs)?];
            let ttemp = teacher_temperature(
                epoch,
                cfg.warmup_teacher_temp,
                cfg.teacher_temp,
                cfg.warmup_teacher_temp_epochs,
            );
            let loss = daino_loss(
                &student,
                &teacher,
                Some((&lab_logits, &targets)),
                &mut self.center,
                ttemp,
                DainoConfig {
                    student_temperature: cfg.temperature,
                    label_smoothing: cfg.label_smoothing,
                },
                comm,
            )?;
            metrics.add("train_loss", loss.total as f64);
            metrics.add("train_unlab_loss", loss.unlab as f64);
            if let Some(l) = loss.lab {
                metrics.add("train_lab_loss", l as f64);
            }
            let (c1, _) = topk_correct(&teacher[0], &u.labels)?;
            metrics.add("train_unlab_acc1", 100.0 * c1 / bs as f64);
            metrics.add("teacher_temp", ttemp);
            let mut d = Tensor::zeros(out.logits.shape());
            let w = d.numel() / d.dim(0).max(1);
            if let Some(dl) = &loss.d_lab {
                d.data_mut()[..dl.numel()].copy_from_slice(dl.data());
            }
            for (v, dv) in loss.d_student.iter().enumerate() {
                let s = (lab_rows + v * bs) * w;
                d.data_mut()[s..s + dv.numel()].copy_from_slice(dv.data());
            }
            d
        } else {
            let p = CrossEntropyParams {
                temperature: cfg.temperature,
                label_smoothing: cfg.label_smoothing,
            };
            let (l, ctx) = cross_entropy_forward(&lab_logits, &targets, p)?;
            metrics.add("train_loss", l as f64);
            metrics.add("train_lab_loss", l as f64);
            cross_entropy_backward(1.0, &targets, &ctx)?
        };
        let clean = rows(&lab_logits, 0, lab_clean)?;
        let (c1, c5) = topk_correct(&clean, &lab.labels)?;
        metrics.add("train_lab_acc1", 100.0 * c1 / lab_clean as f64);
        metrics.add("train_lab_acc5", 100.0 * c5 / lab_clean as f64);
        // Averaged over the ranks before the check: every rank reaches the same verdict.
        let mut metrics = average_metrics(&metrics, comm)?;
        metrics.check_finite(it)?;

        // DDP: the mean of the ranks' gradients of their per-rank mean losses is the gradient
        // of the global-batch loss; all-reduced bucket by bucket while the backward runs (or
        // after it, without overlap). The ViT has no collective of its own in the backward.
        let student = &self.student;
        self.grad_sync
            .backward(&mut self.student_store, comm, |store, _comm, ready| {
                student.backward_hooked(store, cache, &dlogits, ready)
            })?;
        if epoch < cfg.freeze_last_layer {
            for id in [self.student.head.weight_g, self.student.head.weight_v] {
                let e = self.student_store.entry_mut(id);
                e.grad.data_mut().iter_mut().for_each(|g| *g = 0.0);
            }
        }
        let lr = self.lr.at(it)?;
        let wd = self.wd.at(it)?;
        self.adamw.set_schedule(lr, wd);
        self.adamw.step(&mut self.student_store)?;
        let m = self.momentum.at(it)?;
        ema_update(&mut self.teacher_store, &self.student_store, m)?;
        metrics.add("lr", lr);
        metrics.add("wd", wd);
        metrics.add("momentum", m);
        Ok(metrics)
    }

    /// Validation (§2.7): top-1/5 of the teacher (the official per-epoch number) and of the
    /// student; `val_loss` is the teacher's cross-entropy.
    pub fn eval_batch(
        &self,
        x: &Tensor<f32>,
        labels: &[usize],
        acc: &mut StepMetrics,
    ) -> Result<()> {
        let k = self.center.center.len();
        let n = labels.len() as f64;
        let y = one_hot::<f32>(labels, k)?;
        for (name, net, store) in [
            ("teacher", &self.teacher, &self.teacher_store),
            ("student", &self.student, &self.student_store),
        ] {
            let out = net.infer(store, std::slice::from_ref(x))?;
            let (c1, c5) = topk_correct(&out.logits, labels)?;
            let key = if name == "teacher" {
                "val"
            } else {
                "val_student"
            };
            acc.add_sum(&format!("{key}_acc1"), 100.0 * c1, n);
            acc.add_sum(&format!("{key}_acc5"), 100.0 * c5, n);
            if name == "teacher" {
                let p = CrossEntropyParams {
                    temperature: 1.0,
                    label_smoothing: 0.0,
                };
                let (l, _) = cross_entropy_forward(&out.logits, &y, p)?;
                acc.add_sum("val_loss", l as f64 * n, n);
            }
        }
        Ok(())
    }
}

//! Checkpoints: one safetensors file holding every tensor of the run (weights and buffers in
//! PyTorch layout under `model.` / `student.` / `teacher.`, optimiser state, queue, DINO centre)
//! and, in its metadata, a JSON document with the rest (epoch, position in the epoch and in the
//! labelled loader, AdamW step counts, the epoch's running metrics, the resolved config).
//!
//! One file makes the checkpoint atomic as a whole: it is written to a temporary file, fsynced
//! and renamed over the previous one, so an interrupted write (Ctrl-C, a full disk, a killed
//! job) leaves the last good checkpoint in place. Every random draw of a run is a pure function
//! of (seed, iteration, batch index), so the position is all the "RNG state" a resume needs.

use super::config::TrainConfig;
use super::daino::DainoState;
use super::metrics::StepMetrics;
use super::suave::SuaveState;
use crate::error::{Error, Result};
use crate::io::import::{load_into, ImportOptions};
use crate::io::safetensors::{read_tensors, write_tensors, FileTensor};
use crate::io::to_pytorch_layout;
use crate::methods::queue::Queue;
use crate::nn::ParamStore;
use crate::optim::adamw::AdamWState;
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The checkpoint format version; bumped on incompatible changes.
pub const FORMAT: u32 = 1;

/// Metadata key of the JSON document.
const META_KEY: &str = "sdengine";

/// Where the run stands, and everything that is not a tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Format version.
    pub format: u32,
    /// Epoch being run (== `epochs` when training is complete).
    pub epoch: usize,
    /// Next batch of that epoch.
    pub batch: usize,
    /// Global iteration of the next step.
    pub step: usize,
    /// Labelled loader: (its epoch, next batch).
    pub lab_epoch: u64,
    /// See `lab_epoch`.
    pub lab_batch: usize,
    /// Running metrics of the current epoch.
    pub epoch_metrics: StepMetrics,
    /// AdamW step count by parameter (Daino).
    pub adamw_steps: BTreeMap<String, u64>,
    /// The resolved configuration of the run.
    pub config: TrainConfig,
}

/// The state of either method.
pub enum MethodState {
    /// Suave (and the supervised baseline on a ResNet).
    Suave(Box<SuaveState>),
    /// Daino (and the supervised baseline on a ViT).
    Daino(Box<DainoState>),
}

fn store_tensors(
    prefix: &str,
    store: &ParamStore,
    out: &mut BTreeMap<String, FileTensor>,
) -> Result<()> {
    for e in store.entries() {
        out.insert(
            format!("{prefix}{}", e.name),
            FileTensor::F32(to_pytorch_layout(e.layout, &e.value)?),
        );
    }
    Ok(())
}

fn flat(v: &[f32]) -> Result<FileTensor> {
    Ok(FileTensor::F32(Tensor::from_vec(v.to_vec(), &[v.len()])?))
}

/// Writes the checkpoint atomically.
pub fn save(path: &Path, state: &MethodState, pos: &Position) -> Result<()> {
    let mut t = BTreeMap::new();
    let mut pos = pos.clone();
    pos.format = FORMAT;
    match state {
        MethodState::Suave(s) => {
            store_tensors("model.", &s.store, &mut t)?;
            for (name, b) in s.lars.buffers() {
                t.insert(format!("lars.{name}"), flat(b)?);
            }
            if let Some(q) = &s.queue {
                t.insert("queue".into(), FileTensor::F32(q.to_tensor()));
            }
        }
        MethodState::Daino(d) => {
            store_tensors("student.", &d.student_store, &mut t)?;
            store_tensors("teacher.", &d.teacher_store, &mut t)?;
            pos.adamw_steps.clear();
            for (name, st) in d.adamw.state() {
                t.insert(format!("adamw.{name}.exp_avg"), flat(&st.exp_avg)?);
                t.insert(format!("adamw.{name}.exp_avg_sq"), flat(&st.exp_avg_sq)?);
                pos.adamw_steps.insert(name.clone(), st.step);
            }
            t.insert("dino_center".into(), flat(&d.center.center)?);
        }
    }
    let json = serde_json::to_string(&pos)
        .map_err(|e| Error::invalid("checkpoint", format!("cannot encode the position: {e}")))?;
    let mut meta = BTreeMap::new();
    meta.insert(META_KEY.to_string(), json);
    meta.insert(
        "format".to_string(),
        format!("sdengine-checkpoint/{FORMAT}"),
    );
    write_tensors(path, &t, &meta)
}

/// Reads only the position (and config) of a checkpoint.
pub fn read_position(path: &Path) -> Result<(Position, BTreeMap<String, Tensor<f32>>)> {
    let (tensors, meta) = read_tensors(path)?;
    let json = meta.get(META_KEY).ok_or_else(|| Error::Format {
        path: path.display().to_string(),
        detail: "not an sdengine checkpoint (no run metadata); to start from weights use --init"
            .into(),
    })?;
    let pos: Position = serde_json::from_str(json).map_err(|e| Error::Format {
        path: path.display().to_string(),
        detail: format!("unreadable run metadata: {e}"),
    })?;
    if pos.format != FORMAT {
        return Err(Error::Format {
            path: path.display().to_string(),
            detail: format!(
                "checkpoint format {} (this build reads {FORMAT})",
                pos.format
            ),
        });
    }
    Ok((pos, tensors))
}

fn take_prefix(
    tensors: &BTreeMap<String, Tensor<f32>>,
    prefix: &str,
) -> BTreeMap<String, Tensor<f32>> {
    tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
        .collect()
}

fn flat_vec(tensors: &BTreeMap<String, Tensor<f32>>, key: &str, path: &Path) -> Result<Vec<f32>> {
    tensors
        .get(key)
        .map(|t| t.data().to_vec())
        .ok_or_else(|| Error::Format {
            path: path.display().to_string(),
            detail: format!("missing tensor {key:?}"),
        })
}

/// Restores `state` from a checkpoint's tensors (every weight, buffer and optimiser entry must
/// be present and of the right size: a mismatch is an error listing the names).
pub fn restore(
    path: &Path,
    state: &mut MethodState,
    pos: &Position,
    tensors: &BTreeMap<String, Tensor<f32>>,
) -> Result<()> {
    let src = path.display().to_string();
    let strict = ImportOptions::strict();
    match state {
        MethodState::Suave(s) => {
            load_into(&mut s.store, take_prefix(tensors, "model."), &strict, &src)?;
            let bufs: BTreeMap<String, Vec<f32>> = take_prefix(tensors, "lars.")
                .into_iter()
                .map(|(k, v)| (k, v.into_vec()))
                .collect();
            s.lars.set_buffers(bufs);
            if let Some(q) = s.queue.as_mut() {
                let t = tensors.get("queue").ok_or_else(|| Error::Format {
                    path: path.display().to_string(),
                    detail: "missing tensor \"queue\"".into(),
                })?;
                let restored = Queue::from_tensor(t)?;
                if restored.shape() != q.shape() {
                    return Err(Error::Format {
                        path: path.display().to_string(),
                        detail: format!(
                            "queue {:?}, the run needs {:?}",
                            restored.shape(),
                            q.shape()
                        ),
                    });
                }
                *q = restored;
            }
        }
        MethodState::Daino(d) => {
            load_into(
                &mut d.student_store,
                take_prefix(tensors, "student."),
                &strict,
                &src,
            )?;
            load_into(
                &mut d.teacher_store,
                take_prefix(tensors, "teacher."),
                &strict,
                &src,
            )?;
            let mut st = BTreeMap::new();
            for (name, &step) in &pos.adamw_steps {
                st.insert(
                    name.clone(),
                    AdamWState {
                        step,
                        exp_avg: flat_vec(tensors, &format!("adamw.{name}.exp_avg"), path)?,
                        exp_avg_sq: flat_vec(tensors, &format!("adamw.{name}.exp_avg_sq"), path)?,
                    },
                );
            }
            d.adamw.set_state(st);
            let c = flat_vec(tensors, "dino_center", path)?;
            if c.len() != d.center.center.len() {
                return Err(Error::Format {
                    path: path.display().to_string(),
                    detail: format!(
                        "centre of {} entries, the run needs {}",
                        c.len(),
                        d.center.center.len()
                    ),
                });
            }
            d.center.center = c;
        }
    }
    Ok(())
}

//! Benchmarks shared by `sdengine bench` and the criterion benches (`benches/model.rs`).
//!
//! A [`Case`] is a named closure that runs one unit of work (a whole training step of a model).
//! The same case names are timed in PyTorch by `benches/torch/run.py`, which prints the
//! engine/PyTorch ratios. Per-op cases live in the per-family criterion benches.

use crate::error::Result;
use crate::models::daino_head::{DinoHeadConfig, MultiCropWrapper};
use crate::models::resnet::ResNetConfig;
use crate::models::suave_head::{SuaveGrads, SuaveHeadConfig, SuaveNet};
use crate::models::vit::VitConfig;
use crate::nn::ParamStore;
use crate::rng::Rng;
use crate::tensor::Tensor;
use std::time::{Duration, Instant};

/// One benchmark: `family/name` identifies it on both sides (engine and PyTorch).
pub struct Case {
    /// Op family (the file under src/backend/cpu/ and benches/).
    pub family: &'static str,
    /// Case name within the family, e.g. `s1_3x3_fwd`.
    pub name: &'static str,
    /// Runs the work once.
    pub run: Box<dyn FnMut() -> Result<()>>,
}

impl Case {
    /// A case from a set-up closure's result.
    pub fn new(
        family: &'static str,
        name: &'static str,
        run: impl FnMut() -> Result<()> + 'static,
    ) -> Self {
        Case {
            family,
            name,
            run: Box::new(run),
        }
    }

    /// `family/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.family, self.name)
    }
}

/// Timing summary of one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Timing {
    pub id: String,
    /// Median seconds per run.
    pub median_s: f64,
    /// Fastest run.
    pub min_s: f64,
    /// Number of timed runs.
    pub runs: usize,
}

/// Runs `case` once to warm up, then repeatedly for at least `min_time` and `min_runs` runs
/// (at most `max_runs`), and returns the median. The first error stops the timing.
pub fn time_case(
    case: &mut Case,
    min_time: Duration,
    min_runs: usize,
    max_runs: usize,
) -> Result<Timing> {
    (case.run)()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_runs.max(1) || (start.elapsed() < min_time && times.len() < max_runs) {
        let t0 = Instant::now();
        (case.run)()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        id: case.id(),
        median_s: times[times.len() / 2],
        min_s: times[0],
        runs: times.len(),
    })
}

/// Whole-model training steps at batch 8, 224 px, in training mode (forward + backward, every
/// parameter gradient): ResNet-50 with the Suave heads (prototype renormalisation included, as
/// every Suave step does) and ViT-S/16 with the Daino head (drop path 0.1, as the student).
/// `benches/torch/model_*.py` run the same steps in PyTorch.
pub fn model_cases() -> Result<Vec<Case>> {
    Ok(vec![
        suave_resnet50_step(8, 224)?,
        daino_vits16_step(8, 224)?,
    ])
}

/// One Suave step of ResNet-50 + heads on a `batch`×`px`² batch.
pub fn suave_resnet50_step(batch: usize, px: usize) -> Result<Case> {
    let mut store = ParamStore::new();
    let net = SuaveNet::new(
        &mut store,
        ResNetConfig::resnet50(),
        SuaveHeadConfig::default(),
        0,
    )?;
    let inputs = [Tensor::randn_named(0, "x", &[batch, px, px, 3], 1.0)];
    let d_scores = Tensor::randn_named(0, "d.scores", &[batch, 1000], 1.0);
    let d_online = Tensor::randn_named(0, "d.online", &[batch, 1000], 1.0);
    Ok(Case::new(
        "model_resnet",
        "suave_r50_b8_224_train_bwd",
        move || -> Result<()> {
            net.head.normalize_prototypes(&mut store)?;
            let (_, cache) = net.forward(&mut store, &inputs, true)?;
            net.backward(
                &mut store,
                cache,
                SuaveGrads {
                    scores: &d_scores,
                    embedding: None,
                    online: Some([&d_online, &d_online, &d_online]),
                },
            )
        },
    ))
}

/// One Daino student step of ViT-S/16 + head on a `batch`×`px`² batch.
pub fn daino_vits16_step(batch: usize, px: usize) -> Result<Case> {
    let mut store = ParamStore::new();
    let model = MultiCropWrapper::new(
        &mut store,
        VitConfig::vit_small().with_drop_path(0.1),
        DinoHeadConfig::daino(384),
        0,
    )?;
    let crops = [Tensor::randn_named(0, "x", &[batch, px, px, 3], 1.0)];
    let dl = Tensor::randn_named(0, "dl", &[batch, 1000], 1.0);
    let mut step = 0u64;
    Ok(Case::new(
        "model_vit",
        "vits16_daino_b8_224_fwd_bwd",
        move || -> Result<()> {
            step += 1;
            let mut rng = Rng::named(step, "drop_path");
            store.zero_grads();
            let (_, cache) = model.forward(&store, &crops, Some(&mut rng))?;
            model.backward(&mut store, cache, &dl)
        },
    ))
}

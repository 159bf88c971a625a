//! PyTorch parity of ViT-S/16 + the Daino head through DINO's multi-crop wrapper (timm's
//! `vit_small_patch16_224` modules, DINO's forward and pos-embed interpolation, DINO's head).
//! Fixture written by `tests/reference/model_vit.py`: outputs, per-parameter gradient norms and
//! random projections, a few full gradients, timm's key list. Weights come from the shared
//! reference fill, inputs from the shared generator.

use sdengine::models::daino_head::{DinoHeadConfig, MultiCropWrapper};
use sdengine::models::vit::{Vit, VitConfig};
use sdengine::nn::init::{krsc_to_oihw, reference_fill, torch_shape};
use sdengine::nn::{Layout, ParamStore};
use sdengine::rng::Rng;
use sdengine::testing::{assert_close, rel_l2, Fixtures};
use sdengine::Tensor;

const SEED: u64 = 0;
const OUT_TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 1e-3;
const NPROJ: usize = 4;

fn fixtures() -> Fixtures {
    Fixtures::open("models/vit.safetensors").expect("fixture (run tests/reference/model_vit.py)")
}

fn model(rate: f64) -> (ParamStore, MultiCropWrapper) {
    let mut s = ParamStore::new();
    let m = MultiCropWrapper::new(
        &mut s,
        VitConfig::vit_small().with_drop_path(rate),
        DinoHeadConfig::daino(384),
        SEED,
    )
    .unwrap();
    reference_fill(&mut s, SEED);
    (s, m)
}

/// A gradient in PyTorch's layout.
fn torch_grad(s: &ParamStore, i: usize) -> Tensor<f32> {
    let e = &s.entries()[i];
    match e.layout {
        Layout::Plain => e.grad.clone(),
        Layout::ConvKrsc => krsc_to_oihw(&e.grad),
    }
}

/// Every parameter gradient against its stored norm and projections: the RMS of the projection
/// errors estimates ‖Δg‖ (the projections are onto N(0, I) vectors), so it is compared with
/// `GRAD_TOL·‖g_ref‖`; parameters whose reference gradient is exactly zero (a branch dropped for
/// every sample) must be exactly zero here too. Returns the worst relative error.
fn check_grads(f: &Fixtures, s: &ParamStore, prefix: &str) -> f64 {
    let mut worst: (f64, String) = (0.0, String::new());
    for (i, e) in s.entries().iter().enumerate() {
        let g = torch_grad(s, i);
        let ts = torch_shape(e.layout, e.value.shape());
        let norm_ref = f.get(&format!("{prefix}norm.{}", e.name)).unwrap().data()[0] as f64;
        let proj_ref = f
            .get(&format!("{prefix}proj.{}", e.name))
            .unwrap()
            .data()
            .to_vec();
        let norm: f64 = g
            .data()
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        if norm_ref == 0.0 {
            assert_eq!(norm, 0.0, "{prefix}{}: reference gradient is zero", e.name);
            continue;
        }
        let mut se = 0.0;
        for (j, &pr) in proj_ref.iter().enumerate().take(NPROJ) {
            let r = Tensor::randn_named(SEED, &format!("proj{j}.{}", e.name), &ts, 1.0);
            let p: f64 = g
                .data()
                .iter()
                .zip(r.data())
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            se += (p - pr as f64).powi(2);
        }
        let err = (se / NPROJ as f64).sqrt() / norm_ref;
        let err_norm = (norm - norm_ref).abs() / norm_ref;
        let e_max = err.max(err_norm);
        assert!(
            e_max <= GRAD_TOL && e_max.is_finite(),
            "{prefix}{}: gradient error {err:.3e} (norm {err_norm:.3e}) > {GRAD_TOL:.0e}",
            e.name
        );
        if e_max > worst.0 {
            worst = (e_max, e.name.clone());
        }
    }
    eprintln!("{prefix}worst gradient error {:.3e} ({})", worst.0, worst.1);
    worst.0
}

#[test]
fn keys_and_parameter_count_match_timm() {
    let f = fixtures();
    let mut s = ParamStore::new();
    Vit::new(&mut s, "", VitConfig::vit_small(), SEED).unwrap();
    let timm: Vec<&str> = f
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("timm_key."))
        .collect();
    assert_eq!(timm.len(), s.len());
    for (i, e) in s.entries().iter().enumerate() {
        let k = f.get(&format!("timm_key.{}", e.name)).unwrap().data();
        let shape: Vec<usize> = k[1..].iter().map(|&v| v as usize).collect();
        assert_eq!(k[0] as usize, i, "{}: position in the state dict", e.name);
        assert_eq!(shape, torch_shape(e.layout, e.value.shape()), "{}", e.name);
    }
    let n = f.get("timm_num_params").unwrap().data()[0] as usize;
    assert_eq!(n, 21_665_664);
    assert_eq!(s.num_params(), n);
}

/// Drop path 0: a 224-px and a 96-px crop (two backbone passes, DINO's pos-embed resize for
/// the second), head once, backward from a random upstream gradient of the logits.
#[test]
fn multi_crop_forward_and_backward_match_pytorch() {
    let f = fixtures();
    let (mut s, m) = model(0.0);
    let crops = [
        Tensor::randn_named(SEED, "x224", &[2, 224, 224, 3], 1.0),
        Tensor::randn_named(SEED, "x96", &[2, 96, 96, 3], 1.0),
    ];
    let mut rng = Rng::named(SEED, "drop_path");
    let (out, cache) = m.forward(&s, &crops, Some(&mut rng)).unwrap();
    let ef = rel_l2(out.features.data(), f.get("features").unwrap().data());
    let el = rel_l2(out.logits.data(), f.get("logits").unwrap().data());
    eprintln!("features {ef:.3e}, logits {el:.3e}");
    assert_close(
        "features",
        &out.features,
        f.get("features").unwrap(),
        OUT_TOL,
    );
    assert_close("logits", &out.logits, f.get("logits").unwrap(), OUT_TOL);
    // The teacher's cache-free forward gives the same numbers.
    let t = m.infer(&s, &crops).unwrap();
    assert_close("infer logits", &t.logits, &out.logits, 1e-6);
    let dl = Tensor::randn_named(SEED, "dlogits", out.logits.shape(), 1.0);
    m.backward(&mut s, cache, &dl).unwrap();
    check_grads(&f, &s, "");
    for name in f
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("grad."))
    {
        let id = s.id(name).unwrap();
        let want = f.get(&format!("grad.{name}")).unwrap();
        let got = s.grad(id);
        let e = rel_l2(got.data(), want.data());
        eprintln!("full gradient {name}: {e:.3e}");
        assert!(e <= GRAD_TOL, "{name}: {e:.3e}");
    }
}

/// Drop path rate 0.5 on four 96-px crops with the engine's masks replayed in PyTorch.
#[test]
fn drop_path_matches_pytorch_with_the_same_masks() {
    let f = fixtures();
    let (mut s, m) = model(0.5);
    let x = Tensor::randn_named(SEED, "xdp", &[4, 96, 96, 3], 1.0);
    let mut rng = Rng::named(SEED, "drop_path");
    let (out, cache) = m
        .forward(&s, std::slice::from_ref(&x), Some(&mut rng))
        .unwrap();
    // 11 blocks with p > 0, two masks of 4 draws each: the stream position matches PyTorch's.
    let draws = f.get("dp.draws").unwrap().data();
    assert_eq!(draws[0] as u64, 88);
    assert!(draws[1] > 0.0, "the check needs dropped samples");
    assert_eq!(rng.state().1, Rng::named(SEED, "drop_path").state().1 + 88);
    assert_close(
        "dp features",
        &out.features,
        f.get("dp.features").unwrap(),
        OUT_TOL,
    );
    assert_close(
        "dp logits",
        &out.logits,
        f.get("dp.logits").unwrap(),
        OUT_TOL,
    );
    let dl = Tensor::randn_named(SEED, "dp_dlogits", out.logits.shape(), 1.0);
    m.backward(&mut s, cache, &dl).unwrap();
    check_grads(&f, &s, "dp.");
}

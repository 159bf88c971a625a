//! Parameter initialisation, every draw keyed by (seed, parameter name) so that a model's weights
//! do not depend on construction order, thread count or which other parameters exist.
//!
//! Two families: the official initialisations of the recipes (Kaiming-normal fan-out for ResNet
//! convolutions, PyTorch's default Linear init, truncated normal 0.02 for ViT), and
//! [`reference_fill`], the fill shared with `tests/reference/common.py::reference_fill` that lets
//! PyTorch and the engine hold bit-identical weights for parity tests without storing them.

use super::{Kind, Layout, ParamStore};
use crate::rng::Rng;
use crate::tensor::{nchw_to_nhwc, numel, Tensor};

/// Kaiming-normal with fan-out and ReLU gain (torchvision's ResNet conv init):
/// std = sqrt(2 / (out_channels · kh · kw)). `shape` is PyTorch's [O, I, KH, KW].
pub fn kaiming_normal_fan_out(seed: u64, name: &str, shape: &[usize]) -> Tensor<f32> {
    let fan_out = shape[0] * shape[2..].iter().product::<usize>();
    Tensor::randn_named(seed, name, shape, (2.0 / fan_out as f64).sqrt())
}

/// PyTorch's default `nn.Linear` init: U(−1/√fan_in, 1/√fan_in) for weight and bias
/// (kaiming_uniform with a = √5 reduces to this bound).
pub fn linear_default(seed: u64, name: &str, shape: &[usize], fan_in: usize) -> Tensor<f32> {
    let b = 1.0 / (fan_in as f64).sqrt();
    Tensor::rand_named(seed, name, shape, -b, b)
}

/// Truncated normal N(0, std²) cut at ±2 (timm's `trunc_normal_(std=.02)` cuts at absolute ±2,
/// which for std 0.02 never triggers; values beyond are redrawn as the rejection method does).
pub fn trunc_normal(seed: u64, name: &str, shape: &[usize], std: f64) -> Tensor<f32> {
    let mut r = Rng::named(seed, name);
    let data = (0..numel(shape))
        .map(|_| loop {
            let v = std * r.normal();
            if (-2.0..=2.0).contains(&v) {
                break v as f32;
            }
        })
        .collect();
    Tensor::from_vec(data, shape).expect("numel matches shape")
}

/// Converts a PyTorch O×I×KH×KW convolution weight to the engine's O×KH×KW×I.
pub fn oihw_to_krsc(w: &Tensor<f32>) -> Tensor<f32> {
    let s = w.shape();
    let (o, i, kh, kw) = (s[0], s[1], s[2], s[3]);
    Tensor::from_vec(nchw_to_nhwc(w.data(), o, i, kh, kw), &[o, kh, kw, i]).expect("same numel")
}

/// Converts an engine O×KH×KW×I convolution weight to PyTorch's O×I×KH×KW.
pub fn krsc_to_oihw(w: &Tensor<f32>) -> Tensor<f32> {
    let s = w.shape();
    let (o, kh, kw, i) = (s[0], s[1], s[2], s[3]);
    Tensor::from_vec(
        crate::tensor::nhwc_to_nchw(w.data(), o, i, kh, kw),
        &[o, i, kh, kw],
    )
    .expect("same numel")
}

/// The PyTorch-layout shape of an entry.
pub fn torch_shape(layout: Layout, shape: &[usize]) -> Vec<usize> {
    match layout {
        Layout::Plain => shape.to_vec(),
        Layout::ConvKrsc => vec![shape[0], shape[3], shape[1], shape[2]],
    }
}

/// One value of the reference fill, drawn in PyTorch's layout (see [`reference_fill`]).
pub fn reference_value(seed: u64, name: &str, torch_shape: &[usize]) -> Tensor<f32> {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    if leaf == "running_var" {
        Tensor::rand_named(seed, name, torch_shape, 0.5, 1.5)
    } else if leaf == "running_mean" || leaf == "bias" {
        Tensor::randn_named(seed, name, torch_shape, 0.1)
    } else if leaf == "num_batches_tracked" {
        Tensor::zeros(torch_shape)
    } else if leaf == "cls_token" || leaf == "pos_embed" {
        Tensor::randn_named(seed, name, torch_shape, 0.02)
    } else if leaf == "weight_g" || torch_shape.len() == 1 {
        // norm scales and weight-norm magnitudes: around 1
        let mut t = Tensor::randn_named(seed, name, torch_shape, 0.1);
        t.data_mut().iter_mut().for_each(|v| *v += 1.0);
        t
    } else {
        let fan_in = numel(torch_shape) / torch_shape[0].max(1);
        Tensor::randn_named(seed, name, torch_shape, 1.0 / (fan_in.max(1) as f64).sqrt())
    }
}

/// Fills every entry of `store` with the reference fill: values drawn by (seed, name) in
/// PyTorch's layout and shape, then converted to the engine's layout. Mirrors
/// `tests/reference/common.py::reference_fill(model, seed)` bit for bit, so PyTorch parity tests
/// need no stored weights. Scales keep activations O(1) through deep networks: weights
/// N(0, 1/fan_in), norm scales 1 + N(0, 0.01), biases and running means N(0, 0.01), running
/// variances U(0.5, 1.5), ViT tokens N(0, 0.0004).
pub fn reference_fill(store: &mut ParamStore, seed: u64) {
    for e in store.entries_mut() {
        let ts = torch_shape(e.layout, e.value.shape());
        // PyTorch stores weight-norm magnitudes as [out, 1]; the engine keeps [out].
        let ts_drawn = if e.name.ends_with("weight_g") {
            vec![ts[0], 1]
        } else {
            ts.clone()
        };
        let v = reference_value(seed, &e.name, &ts_drawn);
        let v = Tensor::from_vec(v.into_vec(), &ts).expect("same numel");
        e.value = match e.layout {
            Layout::Plain => v,
            Layout::ConvKrsc => oihw_to_krsc(&v),
        };
        if let Kind::Param { .. } = e.kind {
            e.grad = Tensor::zeros(e.value.shape());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_layout_round_trip() {
        let w = Tensor::randn_named(0, "w", &[4, 3, 2, 5], 1.0);
        let k = oihw_to_krsc(&w);
        assert_eq!(k.shape(), &[4, 2, 5, 3]);
        // element (o=1, i=2, h=1, w=3)
        assert_eq!(
            k.data()[((2 + 1) * 5 + 3) * 3 + 2],
            w.data()[((3 + 2) * 2 + 1) * 5 + 3]
        );
        assert_eq!(krsc_to_oihw(&k), w);
    }

    #[test]
    fn reference_fill_is_keyed_by_name_only() {
        let mut a = ParamStore::new();
        a.conv_param("conv1.weight", Tensor::zeros(&[8, 3, 3, 4]));
        a.param("bn1.weight", Tensor::zeros(&[8]));
        let mut b = ParamStore::new();
        b.param("bn1.weight", Tensor::zeros(&[8]));
        b.conv_param("conv1.weight", Tensor::zeros(&[8, 3, 3, 4]));
        reference_fill(&mut a, 3);
        reference_fill(&mut b, 3);
        let ia = a.id("conv1.weight").unwrap();
        let ib = b.id("conv1.weight").unwrap();
        assert_eq!(a.value(ia), b.value(ib));
        let g = a.value(a.id("bn1.weight").unwrap());
        assert!(g.data().iter().all(|v| (0.5..1.5).contains(v)));
        // conv weights are drawn in PyTorch's layout, then converted
        let torch = reference_value(3, "conv1.weight", &[8, 4, 3, 3]);
        assert_eq!(a.value(ia), &oihw_to_krsc(&torch));
    }

    #[test]
    fn kaiming_fan_out_scale() {
        let w = kaiming_normal_fan_out(0, "w", &[64, 64, 3, 3]);
        let var = w.data().iter().map(|v| (v * v) as f64).sum::<f64>() / w.numel() as f64;
        let want = 2.0 / (64.0 * 9.0);
        assert!((var / want - 1.0).abs() < 0.05, "{var} vs {want}");
    }
}

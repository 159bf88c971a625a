//! Helpers shared by the unit tests, the integration tests and the benchmarks: finite-difference
//! gradient checks in f64, PyTorch fixtures, and relative-error measures. Public so that
//! `tests/` and `benches/` can use them; not part of the training API.

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Relative L2 error ‖got − want‖ / ‖want‖ (absolute when ‖want‖ = 0). NaN anywhere gives NaN,
/// which fails every `<=` comparison: NaN never passes.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_l2: lengths differ");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() || !w.is_finite() {
            return f64::NAN;
        }
        let d = g as f64 - w as f64;
        num += d * d;
        den += w as f64 * w as f64;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Panics with a readable message unless `rel_l2(got, want) <= tol` and shapes agree.
#[track_caller]
pub fn assert_close(what: &str, got: &Tensor<f32>, want: &Tensor<f32>, tol: f64) {
    assert_eq!(
        got.shape(),
        want.shape(),
        "{what}: shape {:?} vs reference {:?}",
        got.shape(),
        want.shape()
    );
    let e = rel_l2(got.data(), want.data());
    assert!(e <= tol, "{what}: relative L2 error {e:.3e} > {tol:.1e}");
}

/// The folder of committed fixtures.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Tensors written by a `tests/reference/*.py` script into a safetensors file.
pub struct Fixtures {
    path: String,
    tensors: HashMap<String, Tensor<f32>>,
}

impl Fixtures {
    /// Reads `tests/fixtures/<rel>`; f32 and f64 entries are returned as f32.
    pub fn open(rel: &str) -> Result<Self> {
        let path = fixtures_dir().join(rel);
        let p = path.display().to_string();
        let bytes = std::fs::read(&path).map_err(|e| Error::Io {
            path: p.clone(),
            err: e,
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Format {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let raw = view.data();
            let data: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                safetensors::Dtype::F64 => raw
                    .chunks_exact(8)
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(c);
                        f64::from_le_bytes(b) as f32
                    })
                    .collect(),
                safetensors::Dtype::I64 => raw
                    .chunks_exact(8)
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(c);
                        i64::from_le_bytes(b) as f32
                    })
                    .collect(),
                d => {
                    return Err(Error::Format {
                        path: p,
                        detail: format!("{name}: unsupported dtype {d:?}"),
                    })
                }
            };
            tensors.insert(name.to_string(), Tensor::from_vec(data, view.shape())?);
        }
        Ok(Fixtures { path: p, tensors })
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor<f32>> {
        self.tensors.get(name).ok_or_else(|| Error::Format {
            path: self.path.clone(),
            detail: format!("no tensor named {name:?}"),
        })
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(|s| s.as_str()).collect();
        v.sort_unstable();
        v
    }
}

/// `[name, PyTorch shape]` of every state-dict entry of torchvision's `resnet50` or timm's
/// `vit_small_patch16_224`, as PyTorch printed them into `tests/fixtures/io/torch_keys.json`.
/// Panics when the fixture is missing or malformed (a broken checkout, not a user error).
pub fn torch_keys(model: &str) -> Vec<(String, Vec<usize>)> {
    let path = fixtures_dir().join("io/torch_keys.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let list = v[model]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no list for {model}", path.display()));
    list.iter()
        .map(|e| {
            let name = e[0].as_str().expect("name").to_string();
            let shape = e[1]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dimension") as usize)
                .collect();
            (name, shape)
        })
        .collect()
}

/// Options of [`check_gradients`].
#[derive(Clone, Copy, Debug)]
pub struct GradCheck {
    /// Finite-difference step.
    pub eps: f64,
    /// Largest accepted relative L2 error between analytic and numerical gradients.
    pub tol: f64,
    /// At most this many coordinates per input are perturbed (chosen at random, deterministically).
    pub max_coords: usize,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            eps: 1e-6,
            tol: 1e-6,
            max_coords: 96,
        }
    }
}

/// Checks the analytic gradient of an op against float64 central finite differences.
///
/// The scalar objective is `L = Σ out ⊙ w` with a fixed random `w`, so `dL/dout = w` is what
/// `backward` receives. `backward(inputs, w)` returns one gradient per input (`None` for inputs
/// that are not differentiated, e.g. integer-like targets). Panics with a report on failure.
#[track_caller]
pub fn check_gradients<F, B>(
    name: &str,
    inputs: &[Tensor<f64>],
    forward: F,
    backward: B,
    opts: GradCheck,
) where
    F: Fn(&[Tensor<f64>]) -> Result<Tensor<f64>>,
    B: Fn(&[Tensor<f64>], &Tensor<f64>) -> Result<Vec<Option<Tensor<f64>>>>,
{
    let out = forward(inputs).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
    let mut r = Rng::named(99, name);
    let w_data: Vec<f64> = (0..out.numel()).map(|_| r.normal()).collect();
    let w = Tensor::from_vec(w_data, out.shape()).expect("shape of w");
    let objective = |xs: &[Tensor<f64>]| -> f64 {
        let o = forward(xs).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
        o.data().iter().zip(w.data()).map(|(a, b)| a * b).sum()
    };
    let grads = backward(inputs, &w).unwrap_or_else(|e| panic!("{name}: backward failed: {e}"));
    assert_eq!(
        grads.len(),
        inputs.len(),
        "{name}: backward returned {} gradients for {} inputs",
        grads.len(),
        inputs.len()
    );
    let mut checked = 0;
    for (i, g) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        assert_eq!(
            g.shape(),
            inputs[i].shape(),
            "{name}: gradient {i} has the wrong shape"
        );
        let n = inputs[i].numel();
        let coords: Vec<usize> = if n <= opts.max_coords {
            (0..n).collect()
        } else {
            let mut p = r.permutation(n);
            p.truncate(opts.max_coords);
            p
        };
        let mut num = Vec::with_capacity(coords.len());
        let mut ana = Vec::with_capacity(coords.len());
        for &j in &coords {
            let mut xs = inputs.to_vec();
            let x0 = xs[i].data()[j];
            xs[i].data_mut()[j] = x0 + opts.eps;
            let lp = objective(&xs);
            xs[i].data_mut()[j] = x0 - opts.eps;
            let lm = objective(&xs);
            num.push((lp - lm) / (2.0 * opts.eps));
            ana.push(g.data()[j]);
        }
        let diff: f64 = num.iter().zip(&ana).map(|(a, b)| (a - b) * (a - b)).sum();
        let norm: f64 = num.iter().map(|a| a * a).sum();
        let err = if norm > 0.0 {
            (diff / norm).sqrt()
        } else {
            diff.sqrt()
        };
        let worst = coords
            .iter()
            .zip(num.iter().zip(&ana))
            .max_by(|a, b| {
                let da = (a.1 .0 - a.1 .1).abs();
                let db = (b.1 .0 - b.1 .1).abs();
                da.total_cmp(&db)
            })
            .map(|(j, (a, b))| format!("index {j}: numerical {a:.6e}, analytic {b:.6e}"))
            .unwrap_or_default();
        assert!(
            err <= opts.tol,
            "{name}: gradient of input {i} (shape {:?}) has relative error {err:.3e} > {:.1e}; worst {worst}",
            inputs[i].shape(),
            opts.tol
        );
        assert!(
            ana.iter().all(|v| v.is_finite()),
            "{name}: non-finite analytic gradient"
        );
        checked += 1;
    }
    assert!(checked > 0, "{name}: no gradient was checked");
}

/// A random f64 tensor from the (seed, name) stream, for gradient checks.
pub fn randn64(seed: u64, name: &str, shape: &[usize]) -> Tensor<f64> {
    let mut r = Rng::named(seed, name);
    let n = crate::tensor::numel(shape);
    Tensor::from_vec((0..n).map(|_| r.normal()).collect(), shape).expect("shape")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradcheck_catches_a_wrong_gradient() {
        let x = randn64(0, "x", &[5]);
        // f(x) = x^2, correct gradient 2x·w
        let fwd = |xs: &[Tensor<f64>]| {
            Tensor::from_vec(xs[0].data().iter().map(|v| v * v).collect(), xs[0].shape())
        };
        check_gradients(
            "square",
            std::slice::from_ref(&x),
            fwd,
            |xs, w| {
                let g = xs[0].data().iter().zip(w.data()).map(|(a, b)| 2.0 * a * b);
                Ok(vec![Some(Tensor::from_vec(g.collect(), &[5])?)])
            },
            GradCheck::default(),
        );
        let wrong = std::panic::catch_unwind(|| {
            check_gradients(
                "square-wrong",
                std::slice::from_ref(&x),
                fwd,
                |xs, w| {
                    let g = xs[0].data().iter().zip(w.data()).map(|(a, b)| 2.1 * a * b);
                    Ok(vec![Some(Tensor::from_vec(g.collect(), &[5])?)])
                },
                GradCheck::default(),
            )
        });
        assert!(wrong.is_err(), "a 5% gradient error must fail the check");
    }

    #[test]
    fn rel_l2_rejects_nan() {
        assert!(rel_l2(&[1.0, f32::NAN], &[1.0, 2.0]).is_nan());
        let e = rel_l2(&[1.0, f32::NAN], &[1.0, 2.0]);
        assert!(
            e.partial_cmp(&1.0) != Some(std::cmp::Ordering::Less),
            "NaN must not compare below a tolerance"
        );
        assert!(rel_l2(&[1.0, 2.0], &[1.0, 2.0]) == 0.0);
    }
}

//! Metrics: per-step values under the official names, running means over an epoch, top-k
//! counts, the non-finite-loss check, and `metrics.jsonl` lines.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Named values with their counts, so that steps (or evaluation batches) add up to means.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// name → (sum, weight).
    values: BTreeMap<String, (f64, f64)>,
}

impl StepMetrics {
    /// Adds one observation of weight 1.
    pub fn add(&mut self, key: &str, v: f64) {
        self.add_sum(key, v, 1.0);
    }

    /// Adds a sum of observations and their total weight.
    pub fn add_sum(&mut self, key: &str, sum: f64, weight: f64) {
        let e = self.values.entry(key.to_string()).or_insert((0.0, 0.0));
        e.0 += sum;
        e.1 += weight;
    }

    /// The mean of a key.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.values
            .get(key)
            .map(|(s, w)| if *w > 0.0 { s / w } else { f64::NAN })
    }

    /// Drops a key.
    pub fn remove(&mut self, key: &str) {
        self.values.remove(key);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &StepMetrics) {
        for (k, (s, w)) in &other.values {
            self.add_sum(k, *s, *w);
        }
    }

    /// Means by name.
    pub fn means(&self) -> BTreeMap<String, f64> {
        self.values
            .keys()
            .filter_map(|k| self.get(k).map(|v| (k.clone(), v)))
            .collect()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Errors on the first non-finite loss term, naming it and the iteration: training must not
    /// step on a NaN (the official Daino exits there too; Suave would silently continue).
    pub fn check_finite(&self, it: usize) -> Result<()> {
        for (k, v) in self.means() {
            if k.contains("loss") && !v.is_finite() {
                return Err(Error::invalid(
                    "training",
                    format!("non-finite loss at iteration {it}: {k} = {v}"),
                ));
            }
        }
        Ok(())
    }
}

/// The argmax of every row of `[N, K]` (first index on ties).
pub fn argmax_rows(x: &Tensor<f32>) -> Vec<usize> {
    let k = x.numel() / x.dim(0).max(1);
    x.data()
        .chunks_exact(k.max(1))
        .map(|r| {
            let mut best = 0;
            for (i, v) in r.iter().enumerate() {
                if *v > r[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// Rows whose label is the top-1 and among the top-5 scores (`accuracy(output, target, (1, 5))`:
/// ties broken towards lower indices, like `topk`).
pub fn topk_correct(x: &Tensor<f32>, labels: &[usize]) -> Result<(f64, f64)> {
    if x.rank() != 2 || x.dim(0) != labels.len() {
        return Err(Error::shape(
            "topk_correct",
            format!("scores {:?} for {} labels", x.shape(), labels.len()),
        ));
    }
    let k = x.dim(1);
    let (mut c1, mut c5) = (0.0, 0.0);
    for (r, &y) in x.data().chunks_exact(k.max(1)).zip(labels) {
        if y >= k {
            return Err(Error::invalid(
                "topk_correct",
                format!("label {y} out of range for {k} classes"),
            ));
        }
        let v = r[y];
        // Rank of the label: classes scoring higher, or equal with a lower index.
        let rank = r
            .iter()
            .enumerate()
            .filter(|(i, s)| **s > v || (**s == v && *i < y))
            .count();
        if rank == 0 {
            c1 += 1.0;
        }
        if rank < 5 {
            c5 += 1.0;
        }
    }
    Ok((c1, c5))
}

/// Appends one JSON object to `metrics.jsonl`: `epoch` (may be fractional for step lines),
/// `step`, then the values.
pub fn append_jsonl(
    path: &Path,
    epoch: f64,
    step: usize,
    values: &BTreeMap<String, f64>,
) -> Result<()> {
    let mut obj = serde_json::Map::new();
    obj.insert("epoch".into(), serde_json::json!(epoch));
    obj.insert("step".into(), serde_json::json!(step));
    for (k, v) in values {
        obj.insert(k.clone(), serde_json::json!(v));
    }
    let line = serde_json::Value::Object(obj).to_string();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::Io {
            path: path.display().to_string(),
            err: e,
        })?;
    writeln!(f, "{line}").map_err(|e| Error::Io {
        path: path.display().to_string(),
        err: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_counts_follow_torch() {
        let x = Tensor::from_vec(
            vec![
                0.1, 0.9, 0.0, 0.0, 0.0, 0.0, // label 1: top-1
                0.5, 0.4, 0.3, 0.2, 0.1, 0.0, // label 5: rank 5, not top-5
                0.2, 0.2, 0.2, 0.2, 0.2, 0.2, // label 3, all tied: rank 3
            ],
            &[3, 6],
        )
        .unwrap();
        let (c1, c5) = topk_correct(&x, &[1, 5, 3]).unwrap();
        assert_eq!((c1, c5), (1.0, 2.0));
        assert_eq!(argmax_rows(&x), vec![1, 0, 0]);
        assert!(topk_correct(&x, &[1, 2]).is_err());
        assert!(topk_correct(&x, &[1, 2, 6]).is_err());
    }

    #[test]
    fn means_and_nan_check() {
        let mut m = StepMetrics::default();
        m.add("train_loss", 1.0);
        m.add("train_loss", 3.0);
        m.add_sum("val_acc1", 150.0, 3.0);
        assert_eq!(m.get("train_loss"), Some(2.0));
        assert_eq!(m.get("val_acc1"), Some(50.0));
        m.check_finite(7).unwrap();
        m.add("train_unlab_loss", f64::NAN);
        let e = m.check_finite(7).unwrap_err().to_string();
        assert!(
            e.contains("iteration 7") && e.contains("train_unlab_loss"),
            "{e}"
        );
    }
}

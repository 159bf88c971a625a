//! Safetensors files of [`ParamStore`]s: the engine's checkpoint and weight format.
//!
//! Safetensors is a JSON header plus raw little-endian tensors: no code runs on load, PyTorch
//! reads it with `safetensors.torch.load_file`, and a string → string metadata map carries the
//! rest of a checkpoint (epoch, step, optimiser scalars, RNG, ... as JSON). Tensors are written in
//! PyTorch's layout, so a file is directly a PyTorch state dict; several stores can share a file
//! under name prefixes (a student and its teacher). Files are written atomically.

use super::import::{load_into, ImportOptions, ImportReport};
use super::{format_err, io_err, to_pytorch_layout, write_atomic};
use crate::error::Result;
use crate::nn::ParamStore;
use crate::tensor::Tensor;
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A tensor as written to a file, in PyTorch layout: f32 values, or int64 for the counters that
/// PyTorch keeps as integers (`num_batches_tracked`), so that `load_state_dict` sees its dtypes.
#[derive(Clone, Debug, PartialEq)]
pub enum FileTensor {
    F32(Tensor<f32>),
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

impl FileTensor {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            FileTensor::F32(t) => t.shape(),
            FileTensor::I64 { shape, .. } => shape,
        }
    }
}

/// Bytes of one tensor ready for the safetensors serialiser.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn raw(t: &FileTensor) -> Raw {
    match t {
        FileTensor::F32(t) => Raw {
            dtype: Dtype::F32,
            shape: t.shape().to_vec(),
            bytes: t.data().iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
        FileTensor::I64 { shape, data } => Raw {
            dtype: Dtype::I64,
            shape: shape.clone(),
            bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
    }
}

/// Writes named tensors and string metadata to `path` atomically.
pub fn write_tensors(
    path: &Path,
    tensors: &BTreeMap<String, FileTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    for (name, t) in tensors {
        if let FileTensor::I64 { shape, data } = t {
            if shape.iter().product::<usize>() != data.len() {
                return Err(format_err(
                    path,
                    format!("{name}: {} values for shape {shape:?}", data.len()),
                ));
            }
        }
    }
    let raws: Vec<(String, Raw)> = tensors.iter().map(|(k, t)| (k.clone(), raw(t))).collect();
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    let bytes = safetensors::serialize(
        raws.iter().map(|(k, r)| (k.as_str(), r)),
        if meta.is_empty() { None } else { Some(meta) },
    )
    .map_err(|e| format_err(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, &bytes)
}

/// Writes the values of several stores into one file, each entry named `prefix + name`, in
/// PyTorch layout (convolution weights O×I×KH×KW), as f32.
///
/// Prefixes let one checkpoint hold a student and a teacher (`"student."`, `"teacher."`); use
/// `""` for a single store. Two entries landing on one name are an error.
pub fn save_stores(
    path: &Path,
    stores: &[(&str, &ParamStore)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (prefix, store) in stores {
        for e in store.entries() {
            let name = format!("{prefix}{}", e.name);
            let t = to_pytorch_layout(e.layout, &e.value)?;
            if tensors.insert(name.clone(), FileTensor::F32(t)).is_some() {
                return Err(format_err(path, format!("two entries named {name:?}")));
            }
        }
    }
    write_tensors(path, &tensors, metadata)
}

/// Writes one store (see [`save_stores`]).
pub fn save_store(
    path: &Path,
    store: &ParamStore,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    save_stores(path, &[("", store)], metadata)
}

/// Reads every tensor of a safetensors file as f32 (f32, f64, f16, bf16 and integer entries are
/// accepted) with the file's metadata.
#[allow(clippy::type_complexity)]
pub fn read_tensors(
    path: &Path,
) -> Result<(BTreeMap<String, Tensor<f32>>, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        format_err(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let v: Vec<f32> = match view.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    i64::from_le_bytes(b) as f32
                })
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
            other => {
                return Err(format_err(
                    path,
                    format!("{name}: dtype {other:?} is not supported (f32/f64/f16/bf16/int)"),
                ))
            }
        };
        let t = Tensor::from_vec(v, view.shape())
            .map_err(|e| format_err(path, format!("{name}: {e}")))?;
        out.insert(name, t);
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format_err(path, format!("bad safetensors header: {e}")))?;
    let meta = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok((out, meta))
}

/// Loads the entries of a file named `prefix + name` into `store` (the other entries of the
/// file, e.g. the teacher's when loading the student, are not considered), with the checks
/// and report of [`load_into`]. Returns the report and the file's metadata.
pub fn load_store(
    path: &Path,
    store: &mut ParamStore,
    prefix: &str,
    opts: &ImportOptions,
) -> Result<(ImportReport, BTreeMap<String, String>)> {
    let (tensors, meta) = read_tensors(path)?;
    let selected: BTreeMap<String, Tensor<f32>> = tensors
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v)))
        .collect();
    let report = load_into(store, selected, opts, &path.display().to_string())?;
    Ok((report, meta))
}

//! Tensors: a shape, an element type and a device buffer.
//!
//! Image activations are NHWC ("channels-last") on every backend: it is the layout cuDNN's fast
//! bf16 convolutions want, and on the CPU it makes a 1x1 convolution a plain GEMM and keeps a
//! pixel's channels contiguous for batch norm. PyTorch's NCHW appears only at the edges (fixtures,
//! import/export). Convolution weights are stored O×KH×KW×I ("KRSC", cuDNN's NHWC filter layout).
//!
//! Compute types are f32 (training) and f64 (gradient checks); bf16 is a storage type converted
//! through [`Tensor::to_bf16`] / [`Tensor::to_f32`]. The storage is an enum so that the CUDA
//! backend can add its device buffer without changing the types the models use.

mod element;

pub use element::{DType, Element, Float};

use crate::error::{Error, Result};

/// Where a tensor's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// A CUDA device, by ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The memory behind a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage<T> {
    /// A host vector, row-major (last dimension contiguous).
    Cpu(Vec<T>),
}

/// A dense, row-major tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T = f32> {
    shape: Vec<usize>,
    storage: Storage<T>,
}

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<T: Element> Tensor<T> {
    /// A host tensor from a vector; errors when the length does not match the shape.
    pub fn from_vec(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        if data.len() != numel(shape) {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("{} values for shape {:?}", data.len(), shape),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(data),
        })
    }

    /// A host tensor filled with zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(vec![T::ZERO; numel(shape)]),
        }
    }

    /// A host tensor filled with `value`.
    pub fn full(shape: &[usize], value: T) -> Self {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(vec![value; numel(shape)]),
        }
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Size of dimension `i` (negative counts from the end, as in PyTorch).
    pub fn dim(&self, i: isize) -> usize {
        let r = self.shape.len() as isize;
        let j = if i < 0 { r + i } else { i };
        self.shape[j as usize]
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }

    /// The device holding the data.
    pub fn device(&self) -> Device {
        match self.storage {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    /// The host data; errors for device tensors.
    pub fn data(&self) -> &[T] {
        match &self.storage {
            Storage::Cpu(v) => v,
        }
    }

    /// The host data, mutable.
    pub fn data_mut(&mut self) -> &mut [T] {
        match &mut self.storage {
            Storage::Cpu(v) => v,
        }
    }

    /// Consumes the tensor, returning its host vector.
    pub fn into_vec(self) -> Vec<T> {
        match self.storage {
            Storage::Cpu(v) => v,
        }
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("cannot view {:?} as {:?}", self.shape, shape),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Errors unless the shape equals `expected`; `op` and `what` name the failing input.
    pub fn expect_shape(&self, op: &'static str, what: &str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::shape(
                op,
                format!("{what} has shape {:?}, expected {:?}", self.shape, expected),
            ));
        }
        Ok(())
    }

    /// Errors unless the tensor has `rank` dimensions.
    pub fn expect_rank(&self, op: &'static str, what: &str, rank: usize) -> Result<()> {
        if self.shape.len() != rank {
            return Err(Error::shape(
                op,
                format!(
                    "{what} has shape {:?}, expected {rank} dimensions",
                    self.shape
                ),
            ));
        }
        Ok(())
    }

    /// Element-wise conversion to another element type (f32 ↔ f64 ↔ bf16).
    pub fn cast<U: Element>(&self) -> Tensor<U> {
        Tensor {
            shape: self.shape.clone(),
            storage: Storage::Cpu(
                self.data()
                    .iter()
                    .map(|&x| U::from_f64(x.as_f64()))
                    .collect(),
            ),
        }
    }

    /// Concatenates tensors along dimension 0 (the batch). All other dimensions must agree.
    pub fn cat_batch(parts: &[&Tensor<T>]) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| Error::invalid("cat_batch", "no tensors given"))?;
        let tail = &first.shape[1.min(first.shape.len())..];
        let mut n0 = 0;
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.numel()).sum());
        for (i, p) in parts.iter().enumerate() {
            if p.shape.is_empty() || &p.shape[1..] != tail {
                return Err(Error::shape(
                    "cat_batch",
                    format!(
                        "part {i} has shape {:?}, part 0 has {:?}: all dimensions but the first must agree",
                        p.shape, first.shape
                    ),
                ));
            }
            n0 += p.shape[0];
            data.extend_from_slice(p.data());
        }
        let mut shape = first.shape.clone();
        shape[0] = n0;
        Tensor::from_vec(data, &shape)
    }

    /// Splits along dimension 0 into pieces of the given sizes (the backward of [`cat_batch`](Self::cat_batch)).
    pub fn split_batch(&self, sizes: &[usize]) -> Result<Vec<Self>> {
        if self.shape.is_empty() || sizes.iter().sum::<usize>() != self.shape[0] {
            return Err(Error::shape(
                "split_batch",
                format!(
                    "sizes {:?} do not add up to the batch of {:?}",
                    sizes, self.shape
                ),
            ));
        }
        let row = numel(&self.shape[1..]);
        let mut out = Vec::with_capacity(sizes.len());
        let mut start = 0;
        for &s in sizes {
            let mut shape = self.shape.clone();
            shape[0] = s;
            out.push(Tensor::from_vec(
                self.data()[start * row..(start + s) * row].to_vec(),
                &shape,
            )?);
            start += s;
        }
        Ok(out)
    }
}

impl Tensor<f32> {
    /// bf16 copy (round to nearest even), the GPU storage type.
    pub fn to_bf16(&self) -> Tensor<half::bf16> {
        Tensor {
            shape: self.shape.clone(),
            storage: Storage::Cpu(
                self.data()
                    .iter()
                    .map(|&x| half::bf16::from_f32(x))
                    .collect(),
            ),
        }
    }

    /// A tensor filled from the deterministic generator keyed by (seed, name), standard normal
    /// scaled by `std`: bit-identical to `common.randn(seed, name, shape, std)` in Python.
    pub fn randn_named(seed: u64, name: &str, shape: &[usize], std: f64) -> Self {
        let mut r = crate::rng::Rng::named(seed, name);
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(r.normal_vec(numel(shape), 0.0, std)),
        }
    }

    /// Uniform in [lo, hi) from the (seed, name) stream, as `common.rand(...)` in Python.
    pub fn rand_named(seed: u64, name: &str, shape: &[usize], lo: f64, hi: f64) -> Self {
        let mut r = crate::rng::Rng::named(seed, name);
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(r.uniform_vec(numel(shape), lo, hi)),
        }
    }
}

impl Tensor<half::bf16> {
    /// f32 copy of a bf16 tensor (exact).
    pub fn to_f32(&self) -> Tensor<f32> {
        self.cast()
    }
}

/// Converts an NCHW array to NHWC (PyTorch layout to the engine's).
pub fn nchw_to_nhwc<T: Copy>(x: &[T], n: usize, c: usize, h: usize, w: usize) -> Vec<T> {
    let mut y = Vec::with_capacity(x.len());
    for ni in 0..n {
        for hi in 0..h {
            for wi in 0..w {
                for ci in 0..c {
                    y.push(x[((ni * c + ci) * h + hi) * w + wi]);
                }
            }
        }
    }
    y
}

/// Converts an NHWC array to NCHW.
pub fn nhwc_to_nchw<T: Copy>(x: &[T], n: usize, c: usize, h: usize, w: usize) -> Vec<T> {
    let mut y = Vec::with_capacity(x.len());
    for ni in 0..n {
        for ci in 0..c {
            for hi in 0..h {
                for wi in 0..w {
                    y.push(x[((ni * h + hi) * w + wi) * c + ci]);
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_errors_name_the_op_and_shapes() {
        let e = Tensor::<f32>::from_vec(vec![1.0; 5], &[2, 3]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("from_vec") && msg.contains("[2, 3]"), "{msg}");
        let a = Tensor::<f32>::zeros(&[2, 3]);
        let b = Tensor::<f32>::zeros(&[2, 4]);
        let e = Tensor::cat_batch(&[&a, &b]).unwrap_err().to_string();
        assert!(e.contains("cat_batch") && e.contains("[2, 4]"), "{e}");
    }

    #[test]
    fn cat_then_split_round_trips() {
        let a = Tensor::randn_named(0, "a", &[2, 3, 4], 1.0);
        let b = Tensor::randn_named(0, "b", &[5, 3, 4], 1.0);
        let c = Tensor::cat_batch(&[&a, &b]).unwrap();
        assert_eq!(c.shape(), &[7, 3, 4]);
        let parts = c.split_batch(&[2, 5]).unwrap();
        assert_eq!(parts[0], a);
        assert_eq!(parts[1], b);
        assert!(c.split_batch(&[2, 4]).is_err());
    }

    #[test]
    fn layout_conversions_are_inverse() {
        let x: Vec<u32> = (0..2 * 3 * 4 * 5).collect();
        let y = nchw_to_nhwc(&x, 2, 3, 4, 5);
        assert_ne!(x, y);
        // element (n=1, c=2, h=3, w=4) of NCHW sits at ((1*4+3)*5+4)*3+2 in NHWC
        assert_eq!(y[((4 + 3) * 5 + 4) * 3 + 2], x[((3 + 2) * 4 + 3) * 5 + 4]);
        assert_eq!(nhwc_to_nchw(&y, 2, 3, 4, 5), x);
    }

    #[test]
    fn bf16_round_trip_is_close() {
        let x = Tensor::randn_named(1, "x", &[1000], 3.0);
        let y = x.to_bf16().to_f32();
        for (a, b) in x.data().iter().zip(y.data()) {
            assert!((a - b).abs() <= a.abs() * 2f32.powi(-8), "{a} {b}");
        }
        assert_eq!(x.to_bf16().dtype(), DType::BF16);
    }
}

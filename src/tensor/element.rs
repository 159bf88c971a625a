//! Element types: what a tensor can store ([`Element`]) and what the CPU ops compute in ([`Float`]).

use std::fmt::Debug;

/// The element type tag of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    BF16,
}

/// A type a tensor can store.
pub trait Element: Copy + Send + Sync + Debug + PartialEq + 'static {
    const DTYPE: DType;
    const ZERO: Self;
    fn as_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    const ZERO: Self = 0.0;
    fn as_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    const ZERO: Self = 0.0;
    fn as_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
    const ZERO: Self = half::bf16::ZERO;
    fn as_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
    fn from_f64(x: f64) -> Self {
        half::bf16::from_f64(x)
    }
}

/// A type the CPU backend computes in: f32 for training, f64 for finite-difference checks.
/// Every CPU op is written once, generic over this trait.
pub trait Float:
    Element
    + num_traits::Float
    + num_traits::FloatConst
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::ops::DivAssign
{
    /// Converts an f64 constant.
    #[inline]
    fn c(x: f64) -> Self {
        <Self as Element>::from_f64(x)
    }
}

impl Float for f32 {}
impl Float for f64 {}

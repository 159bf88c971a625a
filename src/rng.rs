//! One deterministic, splittable, counter-based random number generator.
//!
//! Every random draw in the engine (weight init, crops, mixup, drop path, sampling) comes from an
//! [`Rng`] derived from the run seed by a path of stream ids: seed → rank → worker → sample. A draw
//! is a pure function of (key, counter), so results never depend on the number of threads, on the
//! order in which workers run, or on timing.
//!
//! The generator is SplitMix64's output function applied to a Weyl sequence
//! (`mix(key + (i + 1) * GOLDEN)`), which passes BigCrush as a counter-based generator. The same
//! algorithm is implemented in `tests/reference/common.py` so that Python and Rust fill parameters
//! and inputs with bit-identical values, keyed by (seed, parameter name); fixtures then need to
//! store only outputs, not weights.

/// The golden-ratio increment of SplitMix64.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: a bijective 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64-bit FNV-1a hash of a byte string (used to key streams by parameter name).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// A counter-based random stream. Cloning it copies the position; [`Rng::fork`] derives an
/// independent child stream without advancing the parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    key: u64,
    counter: u64,
}

impl Rng {
    /// The root stream of a run.
    pub fn new(seed: u64) -> Self {
        Rng {
            key: mix64(seed),
            counter: 0,
        }
    }

    /// The stream keyed by (seed, name): how parameters and test inputs are filled, identically
    /// in Rust and in `tests/reference/common.py`.
    pub fn named(seed: u64, name: &str) -> Self {
        Rng {
            key: mix64(seed ^ fnv1a64(name.as_bytes())),
            counter: 0,
        }
    }

    /// A child stream identified by `stream` (a rank, a worker, an epoch, a sample index).
    /// Independent of how many draws the parent has made.
    pub fn fork(&self, stream: u64) -> Self {
        Rng {
            key: mix64(self.key ^ mix64(stream.wrapping_add(GOLDEN))),
            counter: 0,
        }
    }

    /// The internal (key, counter) state, for checkpoints.
    pub fn state(&self) -> (u64, u64) {
        (self.key, self.counter)
    }

    /// Rebuilds a stream from [`Rng::state`].
    pub fn from_state(key: u64, counter: u64) -> Self {
        Rng { key, counter }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.counter = self.counter.wrapping_add(1);
        mix64(self.key.wrapping_add(self.counter.wrapping_mul(GOLDEN)))
    }

    /// Uniform in [0, 1) with 53 random bits.
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    #[inline]
    pub fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// A standard normal draw (Box–Muller; consumes two uniforms, uses the cosine branch only so
    /// that the i-th normal depends on draws 2i and 2i+1 alone).
    #[inline]
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform();
        let u2 = self.uniform();
        (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// An integer uniform in [0, n) (n > 0), by 128-bit multiply (Lemire), without modulo bias
    /// worth caring about for n < 2^32.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// `n` uniforms in [lo, hi) as f32 (computed in f64, then rounded).
    pub fn uniform_vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| self.uniform_range(lo, hi) as f32).collect()
    }

    /// `n` normals with the given mean and standard deviation, as f32.
    pub fn normal_vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (mean + std * self.normal()) as f32)
            .collect()
    }

    /// Fisher–Yates shuffle of `0..n`, as torch.randperm would be used for (not bit-compatible
    /// with torch's generator; deterministic given the stream).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_match_python_reference() {
        // Printed by `python3 tests/reference/common.py`, which implements the same generator
        // with numpy; a change on either side breaks every fixture, so it is pinned here.
        let mut r = Rng::named(0, "x");
        assert_eq!(r.next_u64(), 0x5bc0_edcb_8475_dca7);
        r.next_u64();
        assert_eq!(r.next_u64(), 0x6834_1b4d_33d2_c7cb);
        let x = crate::tensor::Tensor::randn_named(0, "x", &[4], 1.0);
        assert_eq!(
            x.data(),
            &[0.840_688_4, 0.935_050_13, -1.037_015_7, 1.405_645_4]
        );
        let y = crate::tensor::Tensor::rand_named(3, "y", &[3], -1.0, 2.0);
        assert_eq!(y.data(), &[1.920_171_1, -0.066_035_226, -0.454_823_88]);
        assert_eq!(fnv1a64(b""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xAF63_DC4C_8601_EC8C);
    }

    #[test]
    fn fork_is_independent_of_parent_position() {
        let root = Rng::new(7);
        let mut advanced = root.clone();
        for _ in 0..10 {
            advanced.next_u64();
        }
        assert_eq!(root.fork(3).next_u64(), advanced.fork(3).next_u64());
        assert_ne!(root.fork(3).next_u64(), root.fork(4).next_u64());
    }

    #[test]
    fn moments_are_plausible() {
        let mut r = Rng::new(1);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        let us: Vec<f64> = (0..n).map(|_| r.uniform()).collect();
        assert!(us.iter().all(|&u| (0.0..1.0).contains(&u)));
        let m = us.iter().sum::<f64>() / n as f64;
        assert!((m - 0.5).abs() < 0.01);
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = Rng::new(3).permutation(1000);
        assert_ne!(p, (0..1000).collect::<Vec<_>>());
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<_>>());
    }
}

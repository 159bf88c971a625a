//! Row-major GEMM on top of the `gemm` crate (AVX2 / AVX-512 micro-kernels selected at run time,
//! rayon-parallel). Every conv, linear and attention product of the CPU backend goes through here.

use crate::tensor::Float;
use gemm::Parallelism;

/// Products smaller than this many multiply-adds run single-threaded: splitting them costs more
/// than it saves, and they are usually already inside a parallel loop.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `c[m,n] = op(a)[m,k] · op(b)[k,n]`, or `c += ...` when `accumulate`.
///
/// `a` is `[m,k]` row-major, or `[k,m]` when `trans_a`; `b` is `[k,n]`, or `[n,k]` when `trans_b`.
/// `c` is `[m,n]` row-major. Slice lengths are checked (a mismatch is a bug in the caller, so it
/// panics rather than returning an error).
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    c: &mut [T],
    accumulate: bool,
) {
    assert!(a.len() >= m * k, "matmul: a has {} < {}x{}", a.len(), m, k);
    assert!(b.len() >= k * n, "matmul: b has {} < {}x{}", b.len(), k, n);
    assert!(c.len() >= m * n, "matmul: c has {} < {}x{}", c.len(), m, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(T::ZERO);
        }
        return;
    }
    let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    let par = if m * n * k >= PARALLEL_MIN_MACS && rayon::current_thread_index().is_none() {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above guarantee that every index the strides reach is in bounds:
    // a spans (m-1)*a_rs + (k-1)*a_cs < m*k, likewise b and c; c does not alias a or b
    // (it is borrowed mutably while they are borrowed shared).
    unsafe {
        gemm::gemm::<T>(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f64], ta: bool, b: &[f64], tb: bool) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av * bv;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn all_transpose_combinations_match_naive() {
        let mut r = crate::rng::Rng::new(5);
        for &(m, n, k) in &[(1, 1, 1), (7, 5, 3), (65, 33, 129), (200, 70, 90)] {
            let a: Vec<f64> = (0..m * k).map(|_| r.normal()).collect();
            let b: Vec<f64> = (0..k * n).map(|_| r.normal()).collect();
            for ta in [false, true] {
                for tb in [false, true] {
                    let want = naive(m, n, k, &a, ta, &b, tb);
                    let mut c = vec![1.0; m * n];
                    matmul(m, n, k, &a, ta, &b, tb, &mut c, false);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-9 * (1.0 + y.abs()), "{m}x{n}x{k} {ta} {tb}");
                    }
                    matmul(m, n, k, &a, ta, &b, tb, &mut c, true);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - 2.0 * y).abs() < 1e-9 * (1.0 + y.abs()));
                    }
                }
            }
        }
    }
}

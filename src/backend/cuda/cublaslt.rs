//! GEMMs through cuBLASLt: bf16 operands, fp32 accumulation, optional bias / GELU / ReLU
//! epilogues fused into the product, bf16 or fp32 output, in the engine's ROW-MAJOR layout.
//!
//! The transposition trick. cuBLASLt is column-major; the engine (like the CPU backend's
//! `matmul`) is row-major. A row-major matrix `X[r, c]` is, byte for byte, the column-major
//! matrix `Xᵀ` (c × r, leading dimension c). So the row-major product `C[m,n] = op(A)[m,k] ·
//! op(B)[k,n]` is computed as the column-major product `Cᵀ[n,m] = op(B)ᵀ · op(A)ᵀ`: cuBLASLt's
//! "A" is our B with our `trans_b`, its "B" is our A with our `trans_a`, and its (M, N, K) is our
//! (n, m, k). Stored shapes (column-major rows × cols, ld = rows):
//! - its A (our B): `trans_b` ? k × n : n × k
//! - its B (our A): `trans_a` ? m × k : k × m
//! - its C/D: n × m (our row-major C[m, n]).
//!
//! The epilogue's bias has one value per row of its D, i.e. per COLUMN of our C: exactly a
//! linear layer's `b[out]` added to every row `y[r, :]`.
//!
//! A linear layer `y[rows, out] = x[rows, in] · w[out, in]ᵀ + b` (PyTorch's [out, in] weight,
//! as `backend::cpu::linear`) is `m = rows, n = out, k = in, trans_b = true`. Its backward is
//! `dx = dy · w` (`trans` none) and `dw = dyᵀ · x` (`trans_a = true`).
//!
//! Descriptors, layouts and the heuristic's algorithm are made once per shape and cached, so a
//! steady-state call is one `cublasLtMatmul` (plus setting the bias pointer). cuBLASLt's GELU
//! epilogue is the tanh approximation; the CPU backend's GELU is the exact erf form (they differ
//! by < 5e-4 absolute, far under the bf16 tolerance).

use super::alloc::DeviceBuffer;
use super::cuda_err;
use crate::error::{Error, Result};
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::bf16;
use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

/// Workspace for cuBLASLt's split-K/stream-K kernels: NVIDIA recommends 32 MiB on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// What is fused after the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// Plain product.
    None,
    /// `+ bias` (per output column of the row-major result).
    Bias,
    /// `gelu(· + bias)` (tanh-approximated GELU).
    BiasGelu,
    /// `relu(· + bias)`.
    BiasRelu,
    /// `gelu(·)`.
    Gelu,
}

impl Epilogue {
    fn has_bias(self) -> bool {
        matches!(
            self,
            Epilogue::Bias | Epilogue::BiasGelu | Epilogue::BiasRelu
        )
    }

    fn code(self) -> sys::cublasLtEpilogue_t {
        use sys::cublasLtEpilogue_t as E;
        match self {
            Epilogue::None => E::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => E::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::BiasGelu => E::CUBLASLT_EPILOGUE_GELU_BIAS,
            Epilogue::BiasRelu => E::CUBLASLT_EPILOGUE_RELU_BIAS,
            Epilogue::Gelu => E::CUBLASLT_EPILOGUE_GELU,
        }
    }
}

/// One row-major GEMM `C[m,n] (+)= op(A)[m,k] · op(B)[k,n]`, as `backend::cpu::matmul` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gemm {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// A is stored `[k, m]` (row-major) and used transposed.
    pub trans_a: bool,
    /// B is stored `[n, k]` and used transposed (a PyTorch `[out, in]` weight).
    pub trans_b: bool,
    /// Fused epilogue.
    pub epilogue: Epilogue,
    /// `C += product` (gradient accumulation) instead of `C = product`.
    pub accumulate: bool,
}

impl Gemm {
    /// The GEMM of a linear layer forward: `y[rows, out] = x[rows, in] · w[out, in]ᵀ (+ epilogue)`.
    pub fn linear(rows: usize, inp: usize, out: usize, epilogue: Epilogue) -> Self {
        Gemm {
            m: rows,
            n: out,
            k: inp,
            trans_a: false,
            trans_b: true,
            epilogue,
            accumulate: false,
        }
    }

    /// Floating-point operations (2·m·n·k).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// Output element type of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Out {
    Bf16,
    F32,
}

/// Cached cuBLASLt objects of one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by this plan and is destroyed once; errors at teardown
        // have nowhere to go.
        unsafe {
            let _ = result::destroy_matrix_layout(self.a);
            let _ = result::destroy_matrix_layout(self.b);
            let _ = result::destroy_matrix_layout(self.c);
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt handle bound to the compute stream, its workspace and the plan cache.
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    plans: RefCell<HashMap<(Gemm, Out), Plan>>,
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.borrow_mut().clear();
        // SAFETY: the handle was created in `new` and is destroyed once.
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}

/// A cuBLAS(Lt) error for `what`.
fn lt_err(what: String, e: result::CublasError) -> Error {
    cuda_err("cublasLt", what, e)
}

impl Lt {
    /// A handle and workspace on `stream`. Errors when cuBLASLt is not installed.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        // SAFETY: dlopen probe only (cudarc panics on first use of a missing library).
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::invalid(
                "cublasLt",
                "libcublasLt not found: put the CUDA (or pip nvidia-cublas) libraries on LD_LIBRARY_PATH",
            ));
        }
        let handle =
            result::create_handle().map_err(|e| lt_err("creating the handle".into(), e))?;
        // SAFETY: raw bytes, used only as cuBLASLt's scratch space.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }
            .map_err(|e| cuda_err("cublasLt", "allocating the workspace", e))?;
        Ok(Lt {
            handle,
            stream: Arc::clone(stream),
            workspace,
            plans: RefCell::new(HashMap::new()),
        })
    }

    /// `C (+)= op(A)·op(B)` with bf16 A, B, C (and bf16 bias when the epilogue has one).
    pub fn matmul(
        &self,
        g: &Gemm,
        a: &DeviceBuffer<bf16>,
        b: &DeviceBuffer<bf16>,
        bias: Option<&DeviceBuffer<bf16>>,
        c: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        check_lengths(g, a.len(), b.len(), c.len(), bias.map(|x| x.len()))?;
        self.run(
            g,
            Out::Bf16,
            a.ptr(),
            b.ptr(),
            bias.map(|x| x.ptr()),
            c.ptr(),
        )
    }

    /// `C (+)= op(A)·op(B)` with bf16 A, B and an fp32 C (weight gradients accumulated in fp32).
    /// Epilogues with a bias are not offered here (their bias type would have to be fp32).
    pub fn matmul_f32_out(
        &self,
        g: &Gemm,
        a: &DeviceBuffer<bf16>,
        b: &DeviceBuffer<bf16>,
        c: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        if g.epilogue.has_bias() {
            return Err(Error::invalid(
                "cublasLt",
                "a bias epilogue needs a bf16 output (use matmul)",
            ));
        }
        check_lengths(g, a.len(), b.len(), c.len(), None)?;
        self.run(g, Out::F32, a.ptr(), b.ptr(), None, c.ptr())
    }

    /// Linear layer forward `y = x · wᵀ (+ b) (→ act)`, `x: [rows, in]`, `w: [out, in]`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_forward(
        &self,
        x: &DeviceBuffer<bf16>,
        w: &DeviceBuffer<bf16>,
        bias: Option<&DeviceBuffer<bf16>>,
        gelu: bool,
        rows: usize,
        inp: usize,
        out: usize,
        y: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        let epi = match (bias.is_some(), gelu) {
            (false, false) => Epilogue::None,
            (true, false) => Epilogue::Bias,
            (true, true) => Epilogue::BiasGelu,
            (false, true) => Epilogue::Gelu,
        };
        self.matmul(&Gemm::linear(rows, inp, out, epi), x, w, bias, y)
    }

    /// Number of cached shapes (the GPU check reports it; a training step's shapes are few).
    pub fn cached_plans(&self) -> usize {
        self.plans.borrow().len()
    }

    /// Makes (or finds) the plan for `g` and enqueues the product.
    fn run(&self, g: &Gemm, out: Out, a: u64, b: u64, bias: Option<u64>, c: u64) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let what = || format!("{g:?}");
        let mut plans = self.plans.borrow_mut();
        let key = (*g, out);
        let plan = match plans.entry(key) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert(
                self.make_plan(g, out, bias)
                    .map_err(|e| lt_err(what(), e))?,
            ),
        };
        // SAFETY: the descriptor belongs to the plan; the bias pointer (a live device buffer of
        // n elements, checked by the caller) is read when the matmul is enqueued below.
        if let Some(bias_ptr) = bias {
            unsafe {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&bias_ptr) as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(|e| lt_err(what(), e))?;
        }
        let alpha = 1.0f32;
        let beta = if g.accumulate { 1.0f32 } else { 0.0 };
        let (ws, _sync) = self.workspace.device_ptr(&self.stream);
        // cuBLASLt's A is our B and its B is our A (module doc).
        // SAFETY: pointers are device buffers whose lengths the caller checked against the
        // shape; layouts and algorithm were made for exactly this shape and types.
        unsafe {
            result::matmul(
                self.handle,
                plan.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                b as *const c_void,
                plan.a,
                a as *const c_void,
                plan.b,
                c as *const c_void,
                plan.c,
                c as *mut c_void,
                plan.c,
                &plan.algo,
                ws as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| lt_err(what(), e))
    }

    /// Descriptors, layouts and the heuristic's best algorithm for `g`.
    fn make_plan(
        &self,
        g: &Gemm,
        out: Out,
        bias: Option<u64>,
    ) -> std::result::Result<Plan, result::CublasError> {
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cudaDataType_t as T;
        let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
        let out_ty = match out {
            Out::Bf16 => T::CUDA_R_16BF,
            Out::F32 => T::CUDA_R_32F,
        };
        // cuBLASLt's A = our B, B = our A, C = n × m (module doc).
        let (a_rows, a_cols) = if g.trans_b { (k, n) } else { (n, k) };
        let (b_rows, b_cols) = if g.trans_a { (m, k) } else { (k, m) };
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            T::CUDA_R_32F,
        )?;
        // Build the plan right away so that its Drop cleans up whatever was created.
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            // SAFETY: a plain array of integers; overwritten by the heuristic's choice below.
            algo: unsafe { std::mem::zeroed() },
        };
        plan.a = result::create_matrix_layout(T::CUDA_R_16BF, a_rows, a_cols, a_rows as i64)?;
        plan.b = result::create_matrix_layout(T::CUDA_R_16BF, b_rows, b_cols, b_rows as i64)?;
        plan.c = result::create_matrix_layout(out_ty, n, m, n as i64)?;
        // cublasOperation_t as the int32 the attribute stores: 0 = N, 1 = T.
        let (ta, tb) = (g.trans_b as i32, g.trans_a as i32);
        let epi = g.epilogue.code();
        // SAFETY: attribute buffers are live locals of the attribute's type and size.
        unsafe {
            result::set_matmul_desc_attribute(
                plan.desc,
                D::CUBLASLT_MATMUL_DESC_TRANSA,
                (&ta) as *const _ as *const c_void,
                std::mem::size_of_val(&ta),
            )?;
            result::set_matmul_desc_attribute(
                plan.desc,
                D::CUBLASLT_MATMUL_DESC_TRANSB,
                (&tb) as *const _ as *const c_void,
                std::mem::size_of_val(&tb),
            )?;
            result::set_matmul_desc_attribute(
                plan.desc,
                D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                (&epi) as *const _ as *const c_void,
                std::mem::size_of_val(&epi),
            )?;
            if let Some(p) = bias {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    D::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&p) as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )?;
            }
        }
        let pref = result::create_matmul_pref()?;
        let ws = WORKSPACE_BYTES;
        // SAFETY: as above; the preference is destroyed right after the heuristic.
        let heuristic =
            unsafe {
                let r = result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .and_then(|_| {
                result::get_matmul_algo_heuristic(
                    self.handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref,
                )
            });
                let _ = result::destroy_matmul_pref(pref);
                r?
            };
        plan.algo = heuristic.algo;
        Ok(plan)
    }
}

/// Checks buffer lengths against the GEMM's shapes (a short buffer would be read out of bounds).
fn check_lengths(g: &Gemm, a: usize, b: usize, c: usize, bias: Option<usize>) -> Result<()> {
    let need = [
        ("A", a, g.m * g.k),
        ("B", b, g.k * g.n),
        ("C", c, g.m * g.n),
    ];
    for (name, have, want) in need {
        if have < want {
            return Err(Error::shape(
                "cublasLt",
                format!("{name} holds {have} elements, the GEMM {g:?} needs {want}"),
            ));
        }
    }
    match (g.epilogue.has_bias(), bias) {
        (true, None) => Err(Error::invalid(
            "cublasLt",
            format!("{:?} needs a bias", g.epilogue),
        )),
        (false, Some(_)) => Err(Error::invalid(
            "cublasLt",
            format!("a bias was given but the epilogue is {:?}", g.epilogue),
        )),
        (true, Some(len)) if len < g.n => Err(Error::shape(
            "cublasLt",
            format!(
                "bias holds {len} elements, the GEMM needs {} (one per output column)",
                g.n
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_maps_to_a_transposed_weight() {
        let g = Gemm::linear(8, 384, 1536, Epilogue::BiasGelu);
        assert_eq!(
            (g.m, g.n, g.k, g.trans_a, g.trans_b),
            (8, 1536, 384, false, true)
        );
        assert_eq!(g.flops(), 2.0 * 8.0 * 1536.0 * 384.0);
    }

    #[test]
    fn lengths_and_bias_are_checked() {
        let g = Gemm::linear(4, 3, 5, Epilogue::Bias);
        assert!(check_lengths(&g, 12, 15, 20, Some(5)).is_ok());
        assert!(check_lengths(&g, 11, 15, 20, Some(5))
            .unwrap_err()
            .to_string()
            .contains("A holds 11"));
        assert!(check_lengths(&g, 12, 15, 19, Some(5)).is_err());
        assert!(check_lengths(&g, 12, 15, 20, Some(4))
            .unwrap_err()
            .to_string()
            .contains("bias"));
        assert!(check_lengths(&g, 12, 15, 20, None).is_err());
        let plain = Gemm::linear(4, 3, 5, Epilogue::None);
        assert!(check_lengths(&plain, 12, 15, 20, Some(5)).is_err());
    }
}

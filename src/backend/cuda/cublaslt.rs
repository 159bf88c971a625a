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
//!
//! The shape types ([`Gemm`], [`Epilogue`]) and the length contract live in the device-neutral
//! `backend::device::blas`; the device model reaches this wrapper through `Exec::gemm` /
//! `Exec::gemm_f32_out` on the [`Gpu`](super::Gpu), whose emulation twin runs the CPU backend.

use super::alloc::DeviceBuffer;
use super::cuda_err;
/// The shape types are device-neutral (`backend::device::blas`); re-exported here so that
/// `cuda::cublaslt::{Gemm, Epilogue}` keeps naming them.
pub use crate::backend::device::blas::{Epilogue, Gemm};
use crate::backend::device::blas::{OP_GEMM, OP_GEMM_F32_OUT};
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

/// cuBLASLt's code for an epilogue.
fn epilogue_code(e: Epilogue) -> sys::cublasLtEpilogue_t {
    use sys::cublasLtEpilogue_t as E;
    match e {
        Epilogue::None => E::CUBLASLT_EPILOGUE_DEFAULT,
        Epilogue::Bias => E::CUBLASLT_EPILOGUE_BIAS,
        Epilogue::BiasGelu => E::CUBLASLT_EPILOGUE_GELU_BIAS,
        Epilogue::BiasRelu => E::CUBLASLT_EPILOGUE_RELU_BIAS,
        Epilogue::Gelu => E::CUBLASLT_EPILOGUE_GELU,
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
        g.check_lengths(OP_GEMM, a.len(), b.len(), bias.map(|x| x.len()), c.len())?;
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
        g.check_lengths_f32_out(OP_GEMM_F32_OUT, a.len(), b.len(), c.len())?;
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
        let epi = epilogue_code(g.epilogue);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epilogue_has_its_own_code() {
        let all = [
            Epilogue::None,
            Epilogue::Bias,
            Epilogue::BiasGelu,
            Epilogue::BiasRelu,
            Epilogue::Gelu,
        ];
        let codes: Vec<_> = all.iter().map(|&e| epilogue_code(e) as i64).collect();
        for (i, c) in codes.iter().enumerate() {
            assert!(!codes[..i].contains(c), "{:?} shares its code", all[i]);
        }
        assert_eq!(
            epilogue_code(Epilogue::BiasGelu),
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS
        );
    }
}

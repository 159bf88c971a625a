//! Kernel modules: loading the engine's own kernels once per context, looking functions up by
//! name once, and launching them with errors that say which kernel and which configuration failed.
//!
//! Each module of the kernel table (`kernels/*.cu`, compiled by build.rs) comes in up to three
//! forms, tried in this order: an sm_90 cubin (no JIT, Hopper's own instructions), PTX (JIT by
//! the driver; the build pins it to ISA ≤ 9.0 so that driver 580 accepts it), and the embedded
//! source, compiled here with NVRTC for the device's own architecture when neither of the others
//! loads (a build machine without a CUDA toolkit embeds only the source). A module that loads in
//! none of the forms is an error listing what each attempt said.
//!
//! NVRTC needs the CUDA headers for `cuda_bf16.h`: it is given `SDENGINE_CUDA_INCLUDE`
//! (colon-separated), `$CUDA_HOME/include`, `$CUDA_PATH/include`, and `<dir>/../include` for each
//! LD_LIBRARY_PATH entry (pip's `site-packages/nvidia/cu13/lib` sits beside its `include`).

use super::cuda_err;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchArgs, LaunchConfig};
use cudarc::nvrtc::{CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The kernel table build.rs embeds (`crate::backend::kernels`: `KernelModule`, `MODULES`,
/// `COMPILER`), under the name the runtime uses for it.
pub use crate::backend::kernels as table;
pub use table::KernelModule;

/// A small module of the runtime itself, compiled with NVRTC at first use: it proves the
/// NVRTC → module → launch path on a machine before any op depends on it, and gives the GPU
/// check a kernel whose result is known exactly.
pub const RUNTIME_MODULE: KernelModule = KernelModule {
    name: "sdengine_runtime",
    source: r#"
// y[i] = a * x[i] + y[i] over n floats, one element per thread (grid-stride loop).
extern "C" __global__ void axpy_f32(float a, const float* __restrict__ x, float* __restrict__ y,
                                     unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        y[i] = fmaf(a, x[i], y[i]);
    }
}
"#,
    ptx: None,
    cubin: None,
};

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks along x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block along x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block in bytes.
    pub shared_bytes: u32,
}

impl LaunchDims {
    /// A 1-D launch of `block` threads per block covering `n` items (one per thread), with the
    /// grid capped at `max_blocks` (kernels use grid-stride loops beyond it).
    pub fn linear(n: usize, block: u32, max_blocks: u32) -> Self {
        let blocks = n
            .div_ceil(block.max(1) as usize)
            .clamp(1, max_blocks.max(1) as usize);
        LaunchDims {
            grid: (blocks as u32, 1, 1),
            block: (block, 1, 1),
            shared_bytes: 0,
        }
    }

    /// One block per row (`rows` blocks, capped at 2^31 − 1 along x), `block` threads each.
    pub fn rows(rows: usize, block: u32, shared_bytes: u32) -> Self {
        LaunchDims {
            grid: (rows.clamp(1, i32::MAX as usize) as u32, 1, 1),
            block: (block, 1, 1),
            shared_bytes,
        }
    }

    /// Checks the limits every CUDA device has (≤ 1024 threads per block, non-empty grid,
    /// y/z grid ≤ 65535, ≤ 227 KiB of shared memory on Hopper) before the driver is asked.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (bx, by, bz) = self.block;
        let (gx, gy, gz) = self.grid;
        let threads = bx as u64 * by as u64 * bz as u64;
        if threads == 0 || threads > 1024 {
            return Err(format!("{threads} threads per block (must be 1..=1024)"));
        }
        if gx == 0 || gy == 0 || gz == 0 {
            return Err("empty grid".into());
        }
        if gy > 65535 || gz > 65535 || gx > i32::MAX as u32 {
            return Err("grid dimension over the device limit".into());
        }
        if self.shared_bytes > 227 * 1024 {
            return Err(format!(
                "{} bytes of shared memory (limit 232448 per block)",
                self.shared_bytes
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for LaunchDims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (gx, gy, gz) = self.grid;
        let (bx, by, bz) = self.block;
        write!(
            f,
            "grid ({gx},{gy},{gz}) block ({bx},{by},{bz}) shared {} B",
            self.shared_bytes
        )
    }
}

/// A kernel function looked up by name, ready to launch.
#[derive(Clone, Debug)]
pub struct Kernel {
    func: CudaFunction,
    /// "module::function", for errors and reports.
    label: String,
}

impl Kernel {
    /// "module::function".
    pub fn label(&self) -> &str {
        &self.label
    }

    /// A launch builder on `stream`: push the kernel's arguments in order with `.arg(&value)`
    /// (device buffers as `&buf.ptr()`, scalars by reference), then call [`Kernel::launch`].
    pub fn builder<'a>(&'a self, stream: &'a CudaStream) -> LaunchArgs<'a> {
        stream.launch_builder(&self.func)
    }

    /// Launches with `dims`. Errors name the kernel and the configuration; configurations
    /// outside the device limits are refused before the driver sees them. Dynamic shared
    /// memory above 48 KiB is opted into automatically (the driver refuses it otherwise).
    ///
    /// # Safety
    /// The arguments pushed on `args` must match the kernel's parameters in number, order and
    /// type, and every buffer must be large enough for what the kernel touches with `dims`.
    pub unsafe fn launch(&self, args: &mut LaunchArgs<'_>, dims: LaunchDims) -> Result<()> {
        dims.validate()
            .map_err(|e| Error::invalid("kernel launch", format!("{}: {dims}: {e}", self.label)))?;
        if dims.shared_bytes > 48 * 1024 {
            use cudarc::driver::sys::CUfunction_attribute as Attr;
            cudarc::driver::result::function::set_function_attribute(
                self.func.cu_function(),
                Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dims.shared_bytes as i32,
            )
            .map_err(|e| cuda_err("kernel launch", format!("{}: {dims}", self.label), e))?;
        }
        let cfg = LaunchConfig {
            grid_dim: dims.grid,
            block_dim: dims.block,
            shared_mem_bytes: dims.shared_bytes,
        };
        args.launch(cfg)
            .map(|_| ())
            .map_err(|e| cuda_err("kernel launch", format!("{}: {dims}", self.label), e))
    }
}

/// The modules and functions loaded into one context, each loaded once.
pub struct Modules {
    ctx: Arc<CudaContext>,
    /// `compute_XY` of the device, for NVRTC.
    arch: &'static str,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, String), Kernel>>,
}

impl Modules {
    /// An empty cache for `ctx`, whose device has compute capability `cc`.
    pub fn new(ctx: Arc<CudaContext>, cc: (i32, i32)) -> Self {
        Modules {
            ctx,
            arch: compute_arch(cc),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        }
    }

    /// The module named `name` from the kernel table (or the runtime's own), loaded on first use.
    pub fn module(&self, name: &str) -> Result<(Arc<CudaModule>, &'static str)> {
        let km = find_module(name)?;
        let mut map = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = map.get(km.name) {
            return Ok((Arc::clone(m), km.name));
        }
        let m = self.load(km)?;
        map.insert(km.name, Arc::clone(&m));
        Ok((m, km.name))
    }

    /// The function `func` of module `module`, looked up once.
    pub fn kernel(&self, module: &str, func: &str) -> Result<Kernel> {
        let (m, mname) = self.module(module)?;
        let key = (mname, func.to_string());
        let mut fns = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = fns.get(&key) {
            return Ok(k.clone());
        }
        let f = m.load_function(func).map_err(|e| {
            cuda_err(
                "kernel lookup",
                format!("function '{func}' in module '{mname}' (is it declared extern \"C\"?)"),
                e,
            )
        })?;
        let k = Kernel {
            func: f,
            label: format!("{mname}::{func}"),
        };
        fns.insert(key, k.clone());
        Ok(k)
    }

    /// Loads one module: cubin, else PTX, else NVRTC from source.
    fn load(&self, km: &KernelModule) -> Result<Arc<CudaModule>> {
        let mut tried = Vec::new();
        if let Some(cubin) = km.cubin {
            match self.ctx.load_module(Ptx::from_binary(cubin.to_vec())) {
                Ok(m) => return Ok(m),
                Err(e) => tried.push(format!("cubin: {e:?}")),
            }
        }
        if let Some(ptx) = km.ptx {
            match self.ctx.load_module(Ptx::from_src(ptx)) {
                Ok(m) => return Ok(m),
                Err(e) => tried.push(format!("PTX: {e:?}")),
            }
        }
        // SAFETY: dlopen probe only.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            tried.push(
                "NVRTC: libnvrtc not found (put the CUDA or pip nvidia libs on LD_LIBRARY_PATH)"
                    .into(),
            );
        } else {
            match compile_source(km, self.arch) {
                Ok(ptx) => match self.ctx.load_module(ptx) {
                    Ok(m) => return Ok(m),
                    Err(e) => tried.push(format!("NVRTC PTX load: {e:?}")),
                },
                Err(e) => tried.push(format!("NVRTC compile: {e}")),
            }
        }
        Err(Error::invalid(
            "kernel module",
            format!("module '{}' did not load: {}", km.name, tried.join("; ")),
        ))
    }
}

/// Compiles a module's embedded source with NVRTC to PTX for `arch` (e.g. "compute_90"), with
/// the CUDA include folders of [`include_paths`]. Needs libnvrtc on the loader path (check
/// `cudarc::nvrtc::sys::is_culib_present()` first: cudarc panics on a missing library).
pub fn compile_source(km: &KernelModule, arch: &'static str) -> std::result::Result<Ptx, String> {
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: include_paths(),
        options: vec!["--std=c++17".into()],
        name: Some(format!("{}.cu", km.name)),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(km.source, opts).map_err(|e| e.to_string())
}

/// The kernel table entry named `name` (the runtime's own module included).
fn find_module(name: &str) -> Result<&'static KernelModule> {
    static RUNTIME: KernelModule = RUNTIME_MODULE;
    if name == RUNTIME.name {
        return Ok(&RUNTIME);
    }
    table::MODULES
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = table::MODULES.iter().map(|m| m.name).collect();
            Error::invalid(
                "kernel module",
                format!(
                    "no module '{name}' in the kernel table (built by {}; modules: [{}])",
                    table::COMPILER,
                    known.join(", ")
                ),
            )
        })
}

/// `compute_XY` for NVRTC, as a static string (NVRTC's option type wants one).
fn compute_arch(cc: (i32, i32)) -> &'static str {
    match cc {
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        // Unknown future parts run PTX for the newest architecture we know.
        (m, _) if m > 12 => "compute_120",
        _ => "compute_75",
    }
}

/// Include folders for NVRTC (see the module doc).
pub fn include_paths() -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |p: std::path::PathBuf| {
        if p.join("cuda_bf16.h").is_file() || p.join("cuda_runtime.h").is_file() {
            // CUDA 13's cuda_bf16.h includes <cuda/std/...> from CCCL, which the pip wheels
            // (and 13.x toolkits) keep in include/cccl.
            for dir in [p.clone(), p.join("cccl")] {
                let s = dir.to_string_lossy().into_owned();
                if dir.is_dir() && !out.contains(&s) {
                    out.push(s);
                }
            }
        }
    };
    if let Some(v) = std::env::var_os("SDENGINE_CUDA_INCLUDE") {
        for p in std::env::split_paths(&v) {
            push(p);
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            push(std::path::PathBuf::from(v).join("include"));
        }
    }
    if let Some(v) = std::env::var_os("LD_LIBRARY_PATH") {
        for p in std::env::split_paths(&v) {
            if let Some(parent) = p.parent() {
                push(parent.join("include"));
            }
        }
    }
    push(std::path::PathBuf::from("/usr/local/cuda/include"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_dims_cover_and_validate() {
        let d = LaunchDims::linear(1000, 256, 1 << 20);
        assert_eq!(d.grid, (4, 1, 1));
        assert!(d.validate().is_ok());
        assert_eq!(LaunchDims::linear(0, 256, 10).grid.0, 1);
        assert_eq!(LaunchDims::linear(1 << 30, 256, 1024).grid.0, 1024);
        let bad = LaunchDims {
            block: (2048, 1, 1),
            ..d
        };
        assert!(bad.validate().unwrap_err().contains("2048"));
        let bad = LaunchDims {
            shared_bytes: 300 * 1024,
            ..d
        };
        assert!(bad.validate().is_err());
        assert_eq!(d.to_string(), "grid (4,1,1) block (256,1,1) shared 0 B");
    }

    #[test]
    fn unknown_module_is_named_in_the_error() {
        let e = match find_module("no_such_module") {
            Ok(_) => panic!("an unknown module was found"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("no_such_module") && e.contains("kernel table"),
            "{e}"
        );
        assert!(find_module(RUNTIME_MODULE.name).is_ok());
    }

    #[test]
    fn runtime_nvrtc_compiles_every_kernel_source() {
        // SAFETY: dlopen probe only.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            println!(
                "SKIP: libnvrtc not on the loader path (set LD_LIBRARY_PATH to a CUDA lib folder)"
            );
            return;
        }
        if include_paths().is_empty() {
            println!("SKIP: no CUDA include folder found (set SDENGINE_CUDA_INCLUDE)");
            return;
        }
        let all = table::MODULES
            .iter()
            .chain(std::iter::once(&RUNTIME_MODULE));
        for km in all {
            let ptx = compile_source(km, "compute_90")
                .unwrap_or_else(|e| panic!("{}: NVRTC failed: {e}", km.name));
            assert!(ptx.to_src().contains(".target sm_90"), "{}", km.name);
        }
    }

    #[test]
    fn architectures_map_to_nvrtc_names() {
        assert_eq!(compute_arch((9, 0)), "compute_90");
        assert_eq!(compute_arch((8, 0)), "compute_80");
        assert_eq!(compute_arch((15, 0)), "compute_120");
    }
}

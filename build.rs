//! Build script: compiles every `kernels/*.cu` twice.
//!
//! 1. For the GPU, with NVRTC, to PTX for `compute_90` (ISA at most 9.0, checked on the `.version`
//!    line) and to an `sm_90` cubin, both embedded through `$OUT_DIR/kernels.rs`, which
//!    `src/backend/kernels.rs` includes. The GPU machine's driver 580 (CUDA 13.0) cannot JIT a
//!    newer PTX ISA, so the compiler must be 13.0.x (`.ci/run` installs the pinned pip wheels).
//!    Why NVRTC, loaded with `libloading`, and not nvcc: NVRTC is in every layout (a full toolkit
//!    and the pip wheels, which ship no nvcc), it needs no host compiler or GPU, it is the same
//!    compiler the runtime falls back to for embedded sources, and one code path is simpler
//!    than two. nvcc on PATH only serves to locate a toolkit (its `bin/..`).
//!    Toolkit search, first hit wins: `SDENGINE_CUDA_HOME` (required: any problem fails the
//!    build), `CUDA_HOME`, `CUDA_PATH`, the pinned wheels `.ci/run` installs in this checkout
//!    (`target/cuda13/nvidia/cu13`), nvcc on PATH, Python's `nvidia/cu13` (pip), and
//!    `/usr/local/cuda`. A found NVRTC newer than 13.0 is skipped with a warning (explicitly
//!    requested: an error). With no usable NVRTC (or `SDENGINE_NO_CUDA=1`) the sources are
//!    embedded for run-time NVRTC and a `cargo:warning` says so.
//! 2. For the CPU, with g++ -std=c++20 and `kernels/emu/cuda_emu.h`, into a static library of
//!    extern "C" launchers (`sdk_emu_{threads,fibers}__<family>__<kernel>`) that
//!    `src/backend/emu` calls, so tests run every kernel without a GPU. Kernels are found by
//!    scanning for `KERNEL void <name>(`; the table is `$OUT_DIR/emu_kernels.rs`.
//!
//! New `.cu` files and new kernels are picked up with no edit here.

use std::env;
use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Newest PTX ISA the GPU machine's driver (580, CUDA 13.0) can JIT.
const MAX_PTX_ISA: (u32, u32) = (9, 0);
/// Newest NVRTC whose PTX that driver accepts.
const MAX_NVRTC: (i32, i32) = (13, 0);
const ARCH_PTX: &str = "compute_90";
const ARCH_CUBIN: &str = "sm_90";

type BuildResult<T> = Result<T, String>;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for v in [
        "SDENGINE_CUDA_HOME",
        "SDENGINE_NO_CUDA",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "PYTHON",
        "CXX",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if let Err(e) = run() {
        // A panic prints a backtrace hint; an error line plus exit(1) reads better in cargo.
        eprintln!("error: sdengine build script: {e}");
        std::process::exit(1);
    }
}

fn run() -> BuildResult<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let kdir = manifest.join("kernels");
    let mut cu: Vec<PathBuf> = fs::read_dir(&kdir)
        .map_err(|e| format!("{}: {e}", kdir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    cu.sort();
    let mut families = Vec::new();
    for p in &cu {
        let name = p
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .ok_or_else(|| {
                format!(
                    "{}: kernel file names must be [A-Za-z0-9_]+.cu",
                    p.display()
                )
            })?
            .to_string();
        let raw = fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let source = inline_local_includes(&raw, &kdir, 0)?;
        let kernels = kernel_names(&raw);
        families.push(Family {
            name,
            path: p.clone(),
            source,
            kernels,
        });
    }
    gpu_artefacts(&manifest, &out, &families)?;
    cpu_emulation(&kdir, &out, &families)
}

/// One `kernels/<name>.cu`.
struct Family {
    name: String,
    path: PathBuf,
    /// The source with `#include "x.cuh"` of kernels/ inlined (what NVRTC compiles and embeds).
    source: String,
    /// Kernel entry points, in file order.
    kernels: Vec<String>,
}

/// Inlines `#include "file"` of files directly in kernels/ (not emu/: the CPU shim stays out of
/// GPU sources), so that the embedded source compiles with only the CUDA include path.
fn inline_local_includes(src: &str, kdir: &Path, depth: usize) -> BuildResult<String> {
    if depth > 8 {
        return Err("kernels/: #include nesting deeper than 8 (a cycle?)".into());
    }
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let t = line.trim_start();
        let local = t
            .strip_prefix("#include \"")
            .and_then(|r| r.split('"').next())
            .filter(|n| !n.contains('/'));
        match local {
            Some(n) if kdir.join(n).is_file() => {
                let body = fs::read_to_string(kdir.join(n))
                    .map_err(|e| format!("{}: {e}", kdir.join(n).display()))?;
                let body = body.replace("#pragma once", "");
                let _ = writeln!(out, "// ---- begin {n}");
                out += &inline_local_includes(&body, kdir, depth + 1)?;
                let _ = writeln!(out, "// ---- end {n}");
            }
            _ => {
                out += line;
                out.push('\n');
            }
        }
    }
    Ok(out)
}

/// Names following `KERNEL void` (optionally `__launch_bounds__(...)`) in a source file.
fn kernel_names(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("KERNEL void") {
        let before_ok = i == 0 || rest.as_bytes()[i - 1] == b'\n';
        rest = &rest[i + "KERNEL void".len()..];
        if !before_ok {
            continue;
        }
        let mut s = rest.trim_start();
        if let Some(r) = s.strip_prefix("__launch_bounds__") {
            s = r.split_once(')').map_or("", |(_, r)| r).trim_start();
        }
        let name: String = s
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && s[name.len()..].trim_start().starts_with('(') {
            names.push(name);
        }
    }
    names
}

// ------------------------------------------------------------------ GPU: NVRTC

/// Where a toolkit was found and whether the user asked for it (then every problem is fatal).
struct Candidate {
    root: PathBuf,
    how: String,
    required: bool,
}

fn candidates(manifest: &Path) -> Vec<Candidate> {
    let mut c = Vec::new();
    let mut push = |root: PathBuf, how: &str, required: bool| {
        c.push(Candidate {
            root,
            how: how.to_string(),
            required,
        })
    };
    if let Some(h) = env::var_os("SDENGINE_CUDA_HOME") {
        push(PathBuf::from(h), "SDENGINE_CUDA_HOME", true);
        return c;
    }
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = env::var_os(v) {
            push(PathBuf::from(h), v, false);
        }
    }
    push(
        manifest.join("target/cuda13/nvidia/cu13"),
        "pinned wheels in target/cuda13 (.ci/run)",
        false,
    );
    if let Some(paths) = env::var_os("PATH") {
        for d in env::split_paths(&paths) {
            if d.join("nvcc").is_file() {
                if let Some(root) = d.parent() {
                    push(root.to_path_buf(), "nvcc on PATH", false);
                }
                break;
            }
        }
    }
    let py = env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))";
    if let Ok(o) = Command::new(py).args(["-c", probe]).output() {
        if o.status.success() {
            let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
            push(PathBuf::from(p), "python's nvidia/cu13 (pip)", false);
        }
    }
    push(PathBuf::from("/usr/local/cuda"), "/usr/local/cuda", false);
    c
}

fn find_libnvrtc(root: &Path) -> Option<PathBuf> {
    for sub in ["lib", "lib64", "lib/x64"] {
        let dir = root.join(sub);
        for name in ["libnvrtc.so", "libnvrtc.so.13"] {
            if dir.join(name).is_file() {
                return Some(dir.join(name));
            }
        }
        // Any other soname (libnvrtc.so.12, ...), but not the builtins or the .alt variants.
        if let Ok(rd) = fs::read_dir(&dir) {
            let mut v: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libnvrtc.so."))
                })
                .collect();
            v.sort();
            if let Some(p) = v.pop() {
                return Some(p);
            }
        }
    }
    None
}

type NvrtcProgram = *mut std::ffi::c_void;

/// The few NVRTC entry points the build needs, resolved from the found library.
struct Nvrtc {
    _lib: libloading::Library,
    /// NVRTC dlopens `libnvrtc-builtins.so.X.Y` by name, which fails for pip's layout (no
    /// rpath to it); loading it first from the same folder satisfies that lookup.
    _builtins: Option<libloading::Library>,
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int,
    create: unsafe extern "C" fn(
        *mut NvrtcProgram,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile: unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> c_int,
    log_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int,
    log: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int,
    ptx_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int,
    ptx: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int,
    cubin_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int,
    cubin: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut NvrtcProgram) -> c_int,
}

impl Nvrtc {
    fn load(path: &Path) -> BuildResult<Nvrtc> {
        // SAFETY: loading NVRTC runs its initialisers, which have no preconditions; every symbol
        // is looked up with the signature of NVRTC's C API (nvrtc.h, stable since CUDA 11).
        unsafe {
            let builtins = path.parent().and_then(|dir| {
                let mut v: Vec<PathBuf> = fs::read_dir(dir)
                    .ok()?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
                    })
                    .collect();
                v.sort();
                v.into_iter().find_map(|p| libloading::Library::new(p).ok())
            });
            let lib = libloading::Library::new(path)
                .map_err(|e| format!("{}: cannot load: {e}", path.display()))?;
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get($name)
                        .map_err(|e| format!("{}: {e}", path.display()))?
                };
            }
            Ok(Nvrtc {
                version: sym!(b"nvrtcVersion\0"),
                create: sym!(b"nvrtcCreateProgram\0"),
                compile: sym!(b"nvrtcCompileProgram\0"),
                log_size: sym!(b"nvrtcGetProgramLogSize\0"),
                log: sym!(b"nvrtcGetProgramLog\0"),
                ptx_size: sym!(b"nvrtcGetPTXSize\0"),
                ptx: sym!(b"nvrtcGetPTX\0"),
                cubin_size: sym!(b"nvrtcGetCUBINSize\0"),
                cubin: sym!(b"nvrtcGetCUBIN\0"),
                destroy: sym!(b"nvrtcDestroyProgram\0"),
                _lib: lib,
                _builtins: builtins,
            })
        }
    }

    fn version(&self) -> (i32, i32) {
        let (mut a, mut b) = (0, 0);
        // SAFETY: two valid out-pointers.
        unsafe { (self.version)(&mut a, &mut b) };
        (a, b)
    }

    /// Compiles `src` for `arch`; returns the PTX (compute_XX) or the cubin (sm_XX) bytes.
    fn compile(
        &self,
        name: &str,
        src: &str,
        arch: &str,
        include: &[PathBuf],
    ) -> BuildResult<Vec<u8>> {
        let csrc = CString::new(src).map_err(|_| format!("{name}: NUL byte in the source"))?;
        let cname = CString::new(name).map_err(|_| format!("{name}: NUL byte in the name"))?;
        let mut opts: Vec<CString> = vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
            "-lineinfo".into(),
        ]
        .into_iter()
        .chain(
            include
                .iter()
                .map(|p| format!("--include-path={}", p.display())),
        )
        .filter_map(|s| CString::new(s).ok())
        .collect();
        opts.shrink_to_fit();
        let optp: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
        let mut prog: NvrtcProgram = std::ptr::null_mut();
        // SAFETY: pointers into live CStrings; the program is destroyed on every path below.
        unsafe {
            let rc = (self.create)(
                &mut prog,
                csrc.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if rc != 0 {
                return Err(format!("{name}: nvrtcCreateProgram failed ({rc})"));
            }
            let rc = (self.compile)(prog, optp.len() as c_int, optp.as_ptr());
            let mut n = 0usize;
            (self.log_size)(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            (self.log)(prog, log.as_mut_ptr() as *mut c_char);
            let log = CStr::from_bytes_until_nul(&log)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            let result = if rc != 0 {
                Err(format!("{name} ({arch}): NVRTC compile error:\n{log}"))
            } else {
                let (size_fn, get_fn) = if arch.starts_with("sm_") {
                    (self.cubin_size, self.cubin)
                } else {
                    (self.ptx_size, self.ptx)
                };
                let mut n = 0usize;
                size_fn(prog, &mut n);
                let mut buf = vec![0u8; n];
                if get_fn(prog, buf.as_mut_ptr() as *mut c_char) != 0 {
                    Err(format!("{name} ({arch}): NVRTC returned no output"))
                } else {
                    if !arch.starts_with("sm_") {
                        while buf.last() == Some(&0) {
                            buf.pop();
                        }
                    }
                    Ok(buf)
                }
            };
            (self.destroy)(&mut prog);
            result
        }
    }
}

fn ptx_isa(ptx: &str) -> Option<(u32, u32)> {
    let l = ptx
        .lines()
        .find(|l| l.trim_start().starts_with(".version"))?;
    let v = l.trim_start().strip_prefix(".version")?.trim();
    let (a, b) = v.split_once('.')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// A usable NVRTC, or why none was: the first candidate with a library of an accepted version.
fn pick_nvrtc(manifest: &Path) -> BuildResult<Option<(Nvrtc, Candidate, PathBuf)>> {
    if env::var_os("SDENGINE_NO_CUDA").is_some_and(|v| v != "0") {
        println!("cargo:warning=SDENGINE_NO_CUDA is set: CUDA kernels embedded as source only");
        return Ok(None);
    }
    for c in candidates(manifest) {
        let Some(lib) = find_libnvrtc(&c.root) else {
            if c.required {
                return Err(format!(
                    "SDENGINE_CUDA_HOME={}: no libnvrtc.so* under lib/ or lib64/; install the pinned \
                     wheels there (pip install --target DIR nvidia-cuda-nvrtc==13.0.88 \
                     nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85, then point the variable \
                     at DIR/nvidia/cu13) or unset it",
                    c.root.display()
                ));
            }
            continue;
        };
        let nv = match Nvrtc::load(&lib) {
            Ok(n) => n,
            Err(e) if c.required => return Err(e),
            Err(e) => {
                println!("cargo:warning=skipping NVRTC from {}: {e}", c.how);
                continue;
            }
        };
        let v = nv.version();
        if v > MAX_NVRTC {
            let msg = format!(
                "NVRTC {}.{} at {} ({}) emits PTX newer than ISA {}.{}, which the GPU machine's \
                 driver 580 cannot load; use 13.0.x (.ci/run installs it in target/cuda13)",
                v.0,
                v.1,
                lib.display(),
                c.how,
                MAX_PTX_ISA.0,
                MAX_PTX_ISA.1
            );
            if c.required {
                return Err(msg);
            }
            println!("cargo:warning=skipping {msg}");
            continue;
        }
        return Ok(Some((nv, c, lib)));
    }
    Ok(None)
}

fn gpu_artefacts(manifest: &Path, out: &Path, families: &[Family]) -> BuildResult<()> {
    let nvrtc = pick_nvrtc(manifest)?;
    let compiler = match &nvrtc {
        Some((nv, c, lib)) => {
            let (a, b) = nv.version();
            format!("nvrtc {a}.{b} ({}, {})", lib.display(), c.how)
        }
        None => {
            println!(
                "cargo:warning=no CUDA 13.0 NVRTC found: kernels/*.cu embedded as source for \
                 run-time NVRTC (install the pinned wheels with .ci/run, or set SDENGINE_CUDA_HOME)"
            );
            "none: sources embedded".to_string()
        }
    };
    let mut gen = String::from(
        "// @generated by build.rs: the kernels of kernels/*.cu, one module per file.\n\n\
         /// One `kernels/<name>.cu`: its source (local includes inlined) and, when build.rs found\n\
         /// NVRTC 13.0, its compute_90 PTX and sm_90 cubin.\n\
         #[derive(Debug)]\n\
         pub struct KernelModule {\n\
         \x20   /// The file stem: `sinkhorn` for kernels/sinkhorn.cu.\n\
         \x20   pub name: &'static str,\n\
         \x20   /// CUDA C++ source for run-time NVRTC (needs only the CUDA include path).\n\
         \x20   pub source: &'static str,\n\
         \x20   /// PTX for compute_90, ISA at most 9.0 (driver 580 can JIT it).\n\
         \x20   pub ptx: Option<&'static str>,\n\
         \x20   /// sm_90 cubin (H100/H200), loaded without JIT.\n\
         \x20   pub cubin: Option<&'static [u8]>,\n\
         }\n\n\
         /// Every kernel module, sorted by name.\n\
         pub static MODULES: &[KernelModule] = &[\n",
    );
    for f in families {
        let src_path = out.join(format!("{}.nvrtc.cu", f.name));
        fs::write(&src_path, &f.source).map_err(|e| format!("{}: {e}", src_path.display()))?;
        let (mut ptx, mut cubin) = ("None".to_string(), "None".to_string());
        if let Some((nv, c, lib)) = &nvrtc {
            let inc = vec![c.root.join("include"), c.root.join("include/cccl")];
            let fname = format!("{}.cu", f.name);
            let p = nv.compile(&fname, &f.source, ARCH_PTX, &inc).map_err(|e| {
                format!(
                    "{e}\n(compiler: {}; file {})",
                    lib.display(),
                    f.path.display()
                )
            })?;
            let text = String::from_utf8(p).map_err(|_| format!("{fname}: PTX is not UTF-8"))?;
            match ptx_isa(&text) {
                Some(v) if v <= MAX_PTX_ISA => {}
                v => {
                    return Err(format!(
                        "{fname}: PTX ISA {v:?} is newer than {MAX_PTX_ISA:?} (driver 580 cannot \
                         JIT it): compile with NVRTC 13.0.x, not {}",
                        lib.display()
                    ))
                }
            }
            let ptx_path = out.join(format!("{}.compute_90.ptx", f.name));
            fs::write(&ptx_path, &text).map_err(|e| format!("{}: {e}", ptx_path.display()))?;
            let bin = nv.compile(&fname, &f.source, ARCH_CUBIN, &inc)?;
            if !bin.starts_with(b"\x7fELF") {
                return Err(format!("{fname}: the sm_90 cubin is not an ELF file"));
            }
            let bin_path = out.join(format!("{}.sm_90.cubin", f.name));
            fs::write(&bin_path, &bin).map_err(|e| format!("{}: {e}", bin_path.display()))?;
            ptx = format!("Some(include_str!({:?}))", ptx_path.display().to_string());
            cubin = format!("Some(include_bytes!({:?}))", bin_path.display().to_string());
        }
        let _ = writeln!(
            gen,
            "    KernelModule {{ name: {:?}, source: include_str!({:?}), ptx: {ptx}, cubin: {cubin} }},",
            f.name,
            src_path.display().to_string()
        );
    }
    gen += "];\n\n";
    let _ = writeln!(
        gen,
        "/// What compiled the embedded PTX/cubin, or that only sources are embedded.\n\
         pub const COMPILER: &str = {compiler:?};"
    );
    let path = out.join("kernels.rs");
    fs::write(&path, gen).map_err(|e| format!("{}: {e}", path.display()))
}

// ------------------------------------------------------------------ CPU: g++ emulation

fn cpu_emulation(kdir: &Path, out: &Path, families: &[Family]) -> BuildResult<()> {
    let cxx = env::var("CXX").unwrap_or_else(|_| "g++".into());
    let ok = Command::new(&cxx)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        return Err(format!(
            "the C++ compiler `{cxx}` was not found: the CPU emulation of the CUDA kernels (used by \
             the tests) needs g++ 11 or newer with C++20 (apt-get install g++), or set CXX"
        ));
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .compiler(&cxx)
        .std("c++20")
        .include(kdir)
        .opt_level(2)
        .debug(false)
        .flag("-pthread")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-function")
        .flag_if_supported("-Wno-sign-compare")
        .warnings(false);
    let mut table = String::from(
        "// @generated by build.rs: the CPU launchers of every kernel (see kernels/emu/cuda_emu.h).\n\
         extern \"C\" {\n",
    );
    let mut rows = String::new();
    for f in families {
        for (mode, define) in [("threads", ""), ("fibers", "#define CUDA_EMU_FIBERS 1\n")] {
            let mut cpp = format!(
                "// @generated by build.rs: {name}.cu for the CPU ({mode}).\n{define}\
                 #include \"emu/cuda_emu.h\"\n\
                 namespace CUDA_EMU_NS {{ namespace k_{name} {{\n\
                 #include {path:?}\n\
                 }} }}\n",
                name = f.name,
                path = f.path.display().to_string()
            );
            for k in &f.kernels {
                let _ = writeln!(
                    cpp,
                    "EMU_EXPORT(sdk_emu_{mode}__{}__{k}, ::CUDA_EMU_NS::k_{}::{k})",
                    f.name, f.name
                );
            }
            let file = out.join(format!("emu_{mode}_{}.cpp", f.name));
            fs::write(&file, cpp).map_err(|e| format!("{}: {e}", file.display()))?;
            build.file(&file);
        }
        for k in &f.kernels {
            for mode in ["threads", "fibers"] {
                let _ = writeln!(
                    table,
                    "    fn sdk_emu_{mode}__{}__{k}(dims: *const u32, dyn_smem: usize, args: *mut *mut std::ffi::c_void) -> i32;",
                    f.name
                );
            }
            let _ = writeln!(
                rows,
                "    EmuKernel {{ module: {:?}, name: {k:?}, threads: sdk_emu_threads__{}__{k}, fibers: sdk_emu_fibers__{}__{k} }},",
                f.name, f.name, f.name
            );
        }
    }
    table += "}\n\n/// Every kernel's two CPU launchers.\npub(crate) static EMU_KERNELS: &[EmuKernel] = &[\n";
    table += &rows;
    table += "];\n";
    let path = out.join("emu_kernels.rs");
    fs::write(&path, table).map_err(|e| format!("{}: {e}", path.display()))?;
    if families.iter().any(|f| !f.kernels.is_empty()) {
        build
            .try_compile("sdengine_kernels_emu")
            .map_err(|e| format!("compiling kernels/*.cu for the CPU emulation failed: {e}"))?;
    }
    Ok(())
}

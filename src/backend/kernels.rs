//! The engine's own CUDA kernels as build.rs embedded them: one [`KernelModule`] per
//! `kernels/<name>.cu`, with the source (for run-time NVRTC) and, when the build found NVRTC
//! 13.0, compute_90 PTX (ISA ≤ 9.0, what driver 580 can JIT) and an sm_90 cubin. The CUDA
//! runtime loads from [`MODULES`]: the cubin first on sm_90, else the PTX, else the source.
//! [`COMPILER`] says which compiler produced them (or `"none: sources embedded"`).

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The module compiled from `kernels/<name>.cu`, e.g. `module("sinkhorn")`; `None` for an
/// unknown name.
pub fn module(name: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.name == name)
}

/// Whether build.rs compiled the kernels (PTX and cubin present) rather than embedding sources.
pub fn precompiled() -> bool {
    MODULES.iter().all(|m| m.ptx.is_some() && m.cubin.is_some()) && !MODULES.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cu_file_is_a_module_with_its_kernels() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let p = e.unwrap().path();
                (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_str().unwrap().into())
            })
            .collect();
        names.sort();
        let got: Vec<&str> = MODULES.iter().map(|m| m.name).collect();
        assert_eq!(got, names);
        for m in MODULES {
            // Local includes are inlined, the CPU shim is not.
            assert!(!m.source.contains("#include \"common.cuh\""), "{}", m.name);
            assert!(
                m.source.contains("block_sum"),
                "{}: common.cuh inlined",
                m.name
            );
            assert!(!m.source.contains("#include \"emu/"), "{}", m.name);
            assert!(module(m.name).is_some());
        }
        assert!(module("no_such_family").is_none());
    }

    #[test]
    fn precompiled_artefacts_are_loadable_formats() {
        if !precompiled() {
            println!("SKIP: kernels not precompiled ({COMPILER})");
            return;
        }
        assert!(COMPILER.starts_with("nvrtc 13.0"), "{COMPILER}");
        for m in MODULES {
            let ptx = m.ptx.unwrap();
            let v = ptx
                .lines()
                .find_map(|l| l.strip_prefix(".version "))
                .and_then(|v| v.trim().split_once('.'))
                .map(|(a, b)| (a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap()));
            assert!(v.is_some_and(|v| v <= (9, 0)), "{}: PTX ISA {v:?}", m.name);
            assert!(ptx.contains(".target sm_90"), "{}", m.name);
            assert!(m.cubin.unwrap().starts_with(b"\x7fELF"), "{}", m.name);
        }
    }
}

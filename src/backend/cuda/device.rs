//! GPU detection that never panics, cached for the life of the process.
//!
//! Order matters: `cudarc` loads each CUDA library lazily on the first call into it and PANICS
//! when the library is missing, so every library is first looked for with its module's own
//! `is_culib_present()` (a plain `dlopen` attempt), and only then is the driver initialised with
//! the fallible `result::init()` and asked for its devices. A machine with a driver but no GPU
//! (or a stub libcuda) answers with an error there, which becomes "no GPU" here.
//!
//! Libraries are found through the dynamic loader's usual search (LD_LIBRARY_PATH, the ld cache).
//! A process cannot extend its own search path after it has started, so pip's wheel layout
//! (`site-packages/nvidia/*/lib`) is put on LD_LIBRARY_PATH by `scripts/device-check.sh`, which
//! also makes the `libnccl.so` symlink that cudarc needs (pip ships only `libnccl.so.2`).
//!
//! `SDENGINE_NO_CUDA=1` hides every GPU: the CPU path can be tested on a GPU machine.

use super::nvjpeg;
use crate::error::{Error, Result};
use crate::tensor::Device;
use std::sync::OnceLock;

/// One CUDA device as the driver describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Driver ordinal (`cuda:N`).
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Compute capability (major, minor): 9.0 is Hopper; the embedded cubins are sm_90.
    pub compute_capability: (i32, i32),
    /// Device memory in bytes.
    pub total_mem: usize,
}

/// What this machine offers the CUDA backend: which libraries load, and which devices exist.
/// Printed by `sdengine info` and the GPU check, so that a missing library is named rather than
/// discovered as a failed op.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    /// The driver library (libcuda.so.1).
    pub libcuda: bool,
    /// cuBLAS.
    pub cublas: bool,
    /// cuBLASLt (the GEMMs with fused epilogues).
    pub cublaslt: bool,
    /// cuDNN (convolutions).
    pub cudnn: bool,
    /// NCCL (multi-GPU collectives; needs the `libnccl.so` name, see the module doc).
    pub nccl: bool,
    /// nvJPEG (GPU JPEG decode), opened with libloading.
    pub nvjpeg: bool,
    /// NVRTC (run-time compilation of kernels that were embedded as source only).
    pub nvrtc: bool,
    /// Driver API version, e.g. 13000 for CUDA 13.0; `None` without a working driver.
    pub driver_version: Option<i32>,
    /// Devices the driver reports (empty without a GPU).
    pub devices: Vec<DeviceInfo>,
    /// Why there is no usable GPU, when there is none.
    pub reason: Option<String>,
}

impl Probe {
    /// Whether at least one device is usable.
    pub fn gpu(&self) -> bool {
        !self.devices.is_empty()
    }

    /// A multi-line human summary (libraries, driver, devices).
    pub fn summary(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let mut s = format!(
            "libcuda {} | cuBLAS {} | cuBLASLt {} | cuDNN {} | NCCL {} | nvJPEG {} | NVRTC {}\n",
            yes(self.libcuda),
            yes(self.cublas),
            yes(self.cublaslt),
            yes(self.cudnn),
            yes(self.nccl),
            yes(self.nvjpeg),
            yes(self.nvrtc)
        );
        if let Some(v) = self.driver_version {
            s.push_str(&format!("driver API {}.{}\n", v / 1000, (v % 1000) / 10));
        }
        for d in &self.devices {
            s.push_str(&format!(
                "cuda:{} {} (sm_{}{}, {:.1} GiB)\n",
                d.ordinal,
                d.name,
                d.compute_capability.0,
                d.compute_capability.1,
                d.total_mem as f64 / (1u64 << 30) as f64
            ));
        }
        if let Some(r) = &self.reason {
            s.push_str(&format!("no GPU: {r}\n"));
        }
        s
    }
}

/// The cached probe of this machine (computed once, on first use; never panics).
pub fn probe() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(|| {
        std::panic::catch_unwind(run_probe).unwrap_or_else(|_| Probe {
            reason: Some("the CUDA driver panicked while being probed".into()),
            ..Probe::default()
        })
    })
}

/// Whether a CUDA device is usable: libcuda loads, the driver initialises and reports ≥ 1 device.
pub fn gpu_available() -> bool {
    probe().gpu()
}

/// The uncached probe.
fn run_probe() -> Probe {
    // SAFETY (all `is_culib_present`): each only tries to dlopen candidate names; loading a CUDA
    // library runs no code of ours.
    let mut p = Probe {
        libcuda: unsafe { cudarc::driver::sys::is_culib_present() },
        cublas: unsafe { cudarc::cublas::sys::is_culib_present() },
        cublaslt: unsafe { cudarc::cublaslt::sys::is_culib_present() },
        cudnn: unsafe { cudarc::cudnn::sys::is_culib_present() },
        nccl: unsafe { cudarc::nccl::sys::is_culib_present() },
        nvrtc: unsafe { cudarc::nvrtc::sys::is_culib_present() },
        nvjpeg: nvjpeg::library_present(),
        ..Probe::default()
    };
    if std::env::var_os("SDENGINE_NO_CUDA").is_some_and(|v| !v.is_empty() && v != "0") {
        p.reason = Some("SDENGINE_NO_CUDA is set".into());
        return p;
    }
    if !p.libcuda {
        p.reason = Some(
            "libcuda.so not found (no NVIDIA driver on this machine, or not on the loader path)"
                .into(),
        );
        return p;
    }
    use cudarc::driver::{result, sys};
    if let Err(e) = result::init() {
        p.reason = Some(format!("cuInit failed: {e:?}"));
        return p;
    }
    let mut v = 0i32;
    // SAFETY: the driver is initialised; the out-pointer is a live local.
    if unsafe { sys::cuDriverGetVersion(&mut v) }.result().is_ok() {
        p.driver_version = Some(v);
    }
    let count = match result::device::get_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) => {
            p.reason = Some(format!("cuDeviceGetCount failed: {e:?}"));
            return p;
        }
    };
    for ordinal in 0..count {
        if let Some(d) = device_info(ordinal) {
            p.devices.push(d);
        }
    }
    if p.devices.is_empty() {
        p.reason = Some(format!("the driver reports {count} usable devices"));
    }
    p
}

/// Name, compute capability and memory of one device; `None` when the driver refuses.
fn device_info(ordinal: usize) -> Option<DeviceInfo> {
    use cudarc::driver::{result, sys::CUdevice_attribute as A};
    let dev = result::device::get(ordinal as i32).ok()?;
    let name = result::device::get_name(dev).ok()?;
    // SAFETY: `dev` is a valid device handle from the initialised driver.
    let (major, minor, total_mem) = unsafe {
        (
            result::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .ok()?,
            result::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                .ok()?,
            result::device::total_mem(dev).ok()?,
        )
    };
    Some(DeviceInfo {
        ordinal,
        name,
        compute_capability: (major, minor),
        total_mem,
    })
}

/// Which device a command should run on, as a user writes it (`--device cpu|cuda|cuda:N|auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU backend, even where a GPU exists.
    Cpu,
    /// A given CUDA device; an error where it does not exist.
    Cuda(usize),
    /// The first GPU when there is one, else the CPU (the default: one binary for every machine).
    Auto,
}

impl DeviceChoice {
    /// The device to use on this machine. `Cuda(n)` without such a device is an error that says
    /// what the machine has and how to run on the CPU instead.
    pub fn resolve(self) -> Result<Device> {
        let p = probe();
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => Ok(if p.gpu() {
                Device::Cuda(p.devices[0].ordinal)
            } else {
                Device::Cpu
            }),
            DeviceChoice::Cuda(n) => {
                if p.devices.iter().any(|d| d.ordinal == n) {
                    Ok(Device::Cuda(n))
                } else if p.gpu() {
                    Err(Error::invalid(
                        "--device",
                        format!(
                            "cuda:{n} does not exist: this machine has {} CUDA device(s) (cuda:0..cuda:{})",
                            p.devices.len(),
                            p.devices.len() - 1
                        ),
                    ))
                } else {
                    Err(Error::invalid(
                        "--device",
                        format!(
                            "cuda:{n} requested but no GPU is usable ({}); use --device cpu or auto",
                            p.reason.as_deref().unwrap_or("unknown reason")
                        ),
                    ))
                }
            }
        }
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;

    /// Parses `cpu`, `auto`, `cuda` (= `cuda:0`), `cuda:N` or `gpu`.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| {
                    Error::invalid(
                        "--device",
                        format!("'{s}' is not a device: expected cpu, auto, cuda or cuda:N"),
                    )
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<DeviceChoice>().ok(), Some(DeviceChoice::Cpu));
        assert_eq!(
            "AUTO".parse::<DeviceChoice>().ok(),
            Some(DeviceChoice::Auto)
        );
        assert_eq!(
            "cuda".parse::<DeviceChoice>().ok(),
            Some(DeviceChoice::Cuda(0))
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().ok(),
            Some(DeviceChoice::Cuda(3))
        );
        let e = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(e.contains("'tpu'") && e.contains("cuda:N"), "{e}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn probe_is_consistent_and_resolve_follows_it() {
        let p = probe();
        // The summary always names every library; a machine without a GPU says why.
        let s = p.summary();
        for lib in ["libcuda", "cuBLASLt", "cuDNN", "NCCL", "nvJPEG", "NVRTC"] {
            assert!(s.contains(lib), "{s}");
        }
        assert_eq!(p.gpu(), p.reason.is_none(), "{s}");
        assert_eq!(gpu_available(), p.gpu());
        assert_eq!(DeviceChoice::Cpu.resolve().ok(), Some(Device::Cpu));
        let auto = DeviceChoice::Auto.resolve().ok();
        if p.gpu() {
            assert_eq!(auto, Some(Device::Cuda(p.devices[0].ordinal)));
        } else {
            assert_eq!(auto, Some(Device::Cpu));
            let e = DeviceChoice::Cuda(0).resolve().unwrap_err().to_string();
            assert!(e.contains("no GPU") && e.contains("--device cpu"), "{e}");
        }
        // An ordinal past the last device is always refused.
        assert!(DeviceChoice::Cuda(p.devices.len() + 7).resolve().is_err());
    }
}

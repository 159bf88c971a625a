//! Batched JPEG decoding on the GPU with nvJPEG, loaded at run time with `libloading`.
//!
//! Why run time: the `nvjpeg-sys` crate links `-lnvjpeg` at build time, which would break every
//! CPU-only build; here the library is opened only when a GPU decode is asked for, and its
//! absence is an ordinary error (the data pipeline then decodes on the CPU, `data::decode`).
//!
//! Output: interleaved RGB u8, HWC (`NVJPEG_OUTPUT_RGBI`), one device buffer per image, the same
//! layout the CPU decoder returns, so the two can be compared byte for byte (they differ by
//! IDCT/upsampling rounding, a few levels at most). Grayscale JPEGs come out replicated to RGB.
//! nvJPEG allocates its own internal buffers with cudaMalloc (not the engine's caching
//! allocator); the output buffers come from the caching allocator.
//!
//! The library is looked for as `$SDENGINE_NVJPEG` (a file path) and then by the names in
//! [`LIBRARY_NAMES`] on the loader path.
//!
//! The C API used (nvjpeg.h, CUDA 12/13): nvjpegCreateSimple, nvjpegJpegStateCreate,
//! nvjpegGetImageInfo, nvjpegDecodeBatchedInitialize, nvjpegDecodeBatched, nvjpegGetProperty and
//! the matching destroy calls; status 0 is success.

use super::alloc::DeviceBuffer;
use super::context::Gpu;
use crate::error::{Error, Result};
use libloading::Library;
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

/// Library names tried, newest first.
pub const LIBRARY_NAMES: [&str; 3] = ["libnvjpeg.so.13", "libnvjpeg.so.12", "libnvjpeg.so"];

/// Largest accepted side, as the CPU decoder's (a guard against decompression bombs).
const MAX_SIDE: i32 = 1 << 15;

/// `NVJPEG_OUTPUT_RGBI`: interleaved RGB in `channel[0]`.
const OUTPUT_RGBI: c_int = 5;

type Handle = *mut c_void;
type State = *mut c_void;
type Status = c_int;

/// `nvjpegImage_t`: up to four planes; RGBI uses plane 0 only.
#[repr(C)]
struct NvjpegImage {
    channel: [*mut u8; 4],
    pitch: [usize; 4],
}

/// The entry points, resolved once; the library stays loaded for the process.
struct Api {
    _lib: Library,
    create_simple: unsafe extern "C" fn(*mut Handle) -> Status,
    destroy: unsafe extern "C" fn(Handle) -> Status,
    state_create: unsafe extern "C" fn(Handle, *mut State) -> Status,
    state_destroy: unsafe extern "C" fn(State) -> Status,
    get_image_info: unsafe extern "C" fn(
        Handle,
        *const u8,
        usize,
        *mut c_int,
        *mut c_int,
        *mut c_int,
        *mut c_int,
    ) -> Status,
    batched_init: unsafe extern "C" fn(Handle, State, c_int, c_int, c_int) -> Status,
    batched: unsafe extern "C" fn(
        Handle,
        State,
        *const *const u8,
        *const usize,
        *mut NvjpegImage,
        *mut c_void,
    ) -> Status,
    get_property: unsafe extern "C" fn(c_int, *mut c_int) -> Status,
}

// SAFETY: the function pointers and the library handle are immutable after loading and the
// nvJPEG entry points are callable from any thread (handles are not shared between threads here).
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

impl Api {
    fn load() -> std::result::Result<Api, String> {
        let mut errors = Vec::new();
        // An explicit file first (torchvision bundles nvJPEG under a hashed name).
        let explicit = std::env::var("SDENGINE_NVJPEG")
            .ok()
            .filter(|s| !s.is_empty());
        for name in explicit.iter().map(String::as_str).chain(LIBRARY_NAMES) {
            // SAFETY: loading nvJPEG runs only its (CUDA-library) initialisers.
            match unsafe { Library::new(name) } {
                Ok(lib) => return Api::resolve(lib).map_err(|e| format!("{name}: {e}")),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(format!(
            "nvJPEG not found ({}); it ships with the CUDA toolkit or the pip wheel nvidia-nvjpeg: put its lib folder on LD_LIBRARY_PATH",
            errors.join("; ")
        ))
    }

    fn resolve(lib: Library) -> std::result::Result<Api, String> {
        // SAFETY: each symbol is looked up with the signature nvjpeg.h declares for it.
        unsafe {
            macro_rules! sym {
                ($name:literal) => {{
                    let f = *lib.get($name).map_err(|e| e.to_string())?;
                    f
                }};
            }
            let create_simple = sym!(b"nvjpegCreateSimple\0");
            let destroy = sym!(b"nvjpegDestroy\0");
            let state_create = sym!(b"nvjpegJpegStateCreate\0");
            let state_destroy = sym!(b"nvjpegJpegStateDestroy\0");
            let get_image_info = sym!(b"nvjpegGetImageInfo\0");
            let batched_init = sym!(b"nvjpegDecodeBatchedInitialize\0");
            let batched = sym!(b"nvjpegDecodeBatched\0");
            let get_property = sym!(b"nvjpegGetProperty\0");
            Ok(Api {
                _lib: lib,
                create_simple,
                destroy,
                state_create,
                state_destroy,
                get_image_info,
                batched_init,
                batched,
                get_property,
            })
        }
    }
}

/// The loaded API, or why it could not be loaded (tried once per process).
fn api() -> std::result::Result<&'static Api, &'static str> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(Api::load).as_ref().map_err(|e| e.as_str())
}

/// Whether nvJPEG can be loaded on this machine.
pub fn library_present() -> bool {
    api().is_ok()
}

/// nvJPEG's version as (major, minor, patch), when it loads.
pub fn version() -> Option<(i32, i32, i32)> {
    let a = api().ok()?;
    let mut v = [0 as c_int; 3];
    for (i, slot) in v.iter_mut().enumerate() {
        // SAFETY: property types 0..=2 are MAJOR/MINOR/PATCH; the out-pointer is live.
        if unsafe { (a.get_property)(i as c_int, slot) } != 0 {
            return None;
        }
    }
    Some((v[0], v[1], v[2]))
}

/// Names nvJPEG's status codes (nvjpeg.h) for error messages.
fn status_name(s: Status) -> &'static str {
    match s {
        1 => "NOT_INITIALIZED",
        2 => "INVALID_PARAMETER",
        3 => "BAD_JPEG",
        4 => "JPEG_NOT_SUPPORTED",
        5 => "ALLOCATOR_FAILURE",
        6 => "EXECUTION_FAILED",
        7 => "ARCH_MISMATCH",
        8 => "INTERNAL_ERROR",
        9 => "IMPLEMENTATION_NOT_SUPPORTED",
        10 => "INCOMPLETE_BITSTREAM",
        _ => "UNKNOWN",
    }
}

fn nv_err(what: String, s: Status) -> Error {
    Error::invalid("nvjpeg", format!("{what}: status {s} ({})", status_name(s)))
}

/// One decoded image on the device: `height × width × 3` RGB bytes, row-major HWC.
pub struct DecodedImage {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// The pixels.
    pub data: DeviceBuffer<u8>,
}

/// An nvJPEG handle and decode state, reused across batches.
pub struct JpegDecoder {
    api: &'static Api,
    handle: Handle,
    state: State,
    batch: Option<usize>,
}

impl Drop for JpegDecoder {
    fn drop(&mut self) {
        // SAFETY: both were created in `new` and are destroyed once, state first.
        unsafe {
            (self.api.state_destroy)(self.state);
            (self.api.destroy)(self.handle);
        }
    }
}

impl JpegDecoder {
    /// A decoder for `gpu`'s device. Errors when nvJPEG is missing or cannot start.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let api = api().map_err(|e| Error::invalid("nvjpeg", e))?;
        gpu.context()
            .bind_to_thread()
            .map_err(|e| super::cuda_err("nvjpeg", "binding the context", e))?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a live local.
        let s = unsafe { (api.create_simple)(&mut handle) };
        if s != 0 {
            return Err(nv_err("nvjpegCreateSimple".into(), s));
        }
        let mut state: State = std::ptr::null_mut();
        // SAFETY: valid handle; out-pointer to a live local.
        let s = unsafe { (api.state_create)(handle, &mut state) };
        if s != 0 {
            // SAFETY: the handle was created above and is not used again.
            unsafe { (api.destroy)(handle) };
            return Err(nv_err("nvjpegJpegStateCreate".into(), s));
        }
        Ok(JpegDecoder {
            api,
            handle,
            state,
            batch: None,
        })
    }

    /// Height and width of a JPEG, from its headers (no decode).
    pub fn image_size(&self, jpeg: &[u8]) -> Result<(usize, usize)> {
        let (mut nc, mut ss) = (0 as c_int, 0 as c_int);
        let (mut w, mut h) = ([0 as c_int; 4], [0 as c_int; 4]);
        // SAFETY: `jpeg` is a live slice of the given length; out-arrays have 4 entries as the
        // API requires.
        let s = unsafe {
            (self.api.get_image_info)(
                self.handle,
                jpeg.as_ptr(),
                jpeg.len(),
                &mut nc,
                &mut ss,
                w.as_mut_ptr(),
                h.as_mut_ptr(),
            )
        };
        if s != 0 {
            return Err(nv_err("nvjpegGetImageInfo".into(), s));
        }
        if w[0] <= 0 || h[0] <= 0 || w[0] > MAX_SIDE || h[0] > MAX_SIDE {
            return Err(Error::invalid(
                "nvjpeg",
                format!(
                    "image of {}x{} pixels (limit {MAX_SIDE} per side)",
                    w[0], h[0]
                ),
            ));
        }
        Ok((h[0] as usize, w[0] as usize))
    }

    /// Decodes a batch of JPEG files (their bytes) to RGB u8 HWC device buffers, in order.
    /// Errors name the image (its index in the batch) that the headers reject; a failure of the
    /// batched decode itself names the batch. The result is ready once the stream reaches it.
    pub fn decode_batch(&mut self, gpu: &Gpu, jpegs: &[&[u8]]) -> Result<Vec<DecodedImage>> {
        if jpegs.is_empty() {
            return Ok(Vec::new());
        }
        gpu.context()
            .bind_to_thread()
            .map_err(|e| super::cuda_err("nvjpeg", "binding the context", e))?;
        let mut out = Vec::with_capacity(jpegs.len());
        for (i, j) in jpegs.iter().enumerate() {
            let (h, w) = self
                .image_size(j)
                .map_err(|e| Error::invalid("nvjpeg", format!("image {i} of the batch: {e}")))?;
            out.push(DecodedImage {
                height: h,
                width: w,
                data: gpu.alloc::<u8>(h * w * 3)?,
            });
        }
        if self.batch != Some(jpegs.len()) {
            let n = c_int::try_from(jpegs.len())
                .map_err(|_| Error::invalid("nvjpeg", "batch larger than i32::MAX"))?;
            // SAFETY: valid handle/state; RGBI is a valid output format.
            let s = unsafe { (self.api.batched_init)(self.handle, self.state, n, 1, OUTPUT_RGBI) };
            if s != 0 {
                return Err(nv_err(format!("nvjpegDecodeBatchedInitialize({n})"), s));
            }
            self.batch = Some(jpegs.len());
        }
        let ptrs: Vec<*const u8> = jpegs.iter().map(|j| j.as_ptr()).collect();
        let lens: Vec<usize> = jpegs.iter().map(|j| j.len()).collect();
        let mut dst: Vec<NvjpegImage> = out
            .iter()
            .map(|d| NvjpegImage {
                channel: [
                    d.data.ptr() as *mut u8,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                ],
                pitch: [d.width * 3, 0, 0, 0],
            })
            .collect();
        // SAFETY: one pointer, length and destination per image; each destination holds
        // height·width·3 bytes with pitch width·3 (sizes from the headers above); the input slices
        // outlive the call, which copies what it needs before returning (nvJPEG's batched API
        // parses on the host synchronously and enqueues the GPU phase on the stream).
        let s = unsafe {
            (self.api.batched)(
                self.handle,
                self.state,
                ptrs.as_ptr(),
                lens.as_ptr(),
                dst.as_mut_ptr(),
                gpu.stream().cu_stream() as *mut c_void,
            )
        };
        if s != 0 {
            return Err(nv_err(
                format!("nvjpegDecodeBatched of {} images", jpegs.len()),
                s,
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absence_is_an_error_that_names_the_way_out() {
        match api() {
            Ok(_) => {
                assert!(library_present());
                assert!(version().is_some_and(|v| v.0 >= 11));
            }
            Err(e) => {
                assert!(!library_present());
                assert!(
                    e.contains("libnvjpeg.so.13") && e.contains("LD_LIBRARY_PATH"),
                    "{e}"
                );
                assert_eq!(version(), None);
            }
        }
        assert_eq!(status_name(3), "BAD_JPEG");
        assert_eq!(std::mem::size_of::<NvjpegImage>(), 64);
    }
}

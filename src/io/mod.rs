//! Weights in and out of the engine: safetensors checkpoints, PyTorch `.pth` import without
//! Python, and torchvision / timm backbone export.
//!
//! Every file here speaks PyTorch's tensor layout (convolution weights O×I×KH×KW); the engine's
//! own layouts ([`Layout::ConvKrsc`]) are converted at this edge only, so that a file written by
//! the engine is readable by `safetensors.torch.load_file` and a file written by PyTorch loads
//! into a [`ParamStore`](crate::nn::ParamStore) by name.
//!
//! - [`safetensors`]: checkpoints of one or more stores with a string metadata map, written
//!   atomically (temp file, fsync, rename, fsync of the folder).
//! - [`pth`]: a reader of `torch.save` files (zip and legacy containers, a restricted unpickler).
//! - [`import`]: name mapping, shape checking and a load report; the official Suave / Daino init
//!   rules (SwAV and DINO checkpoints).
//! - [`export`]: backbone files that torchvision's `resnet50()` and timm's
//!   `vit_small_patch16_224` load with `strict=True`.

pub mod convert;
pub mod export;
pub mod import;
pub mod pth;
pub mod safetensors;

use crate::error::{Error, Result};
use crate::nn::Layout;
use crate::tensor::Tensor;
use std::io::Write;
use std::path::Path;

/// A format error naming the file: every bad-input error of this module goes through here so
/// that the user always learns which file is at fault.
pub(crate) fn format_err(path: &Path, detail: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

/// An I/O error naming the file.
pub(crate) fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        err: source,
    }
}

/// The PyTorch shape of an entry stored with `layout` and engine shape `shape`.
///
/// Needed to compare a store's entries with a PyTorch state dict before converting anything.
pub fn pytorch_shape(layout: Layout, shape: &[usize]) -> Vec<usize> {
    match (layout, shape) {
        (Layout::ConvKrsc, &[o, kh, kw, i]) => vec![o, i, kh, kw],
        _ => shape.to_vec(),
    }
}

/// Converts an engine tensor of `layout` to PyTorch's layout (O×KH×KW×I → O×I×KH×KW for
/// convolution weights; a copy otherwise).
pub fn to_pytorch_layout(layout: Layout, t: &Tensor<f32>) -> Result<Tensor<f32>> {
    match (layout, t.shape()) {
        (Layout::ConvKrsc, &[o, kh, kw, i]) => {
            let src = t.data();
            let mut out = vec![0f32; src.len()];
            for oo in 0..o {
                for y in 0..kh {
                    for x in 0..kw {
                        for c in 0..i {
                            out[((oo * i + c) * kh + y) * kw + x] =
                                src[((oo * kh + y) * kw + x) * i + c];
                        }
                    }
                }
            }
            Tensor::from_vec(out, &[o, i, kh, kw])
        }
        (Layout::ConvKrsc, s) => Err(Error::shape(
            "to_pytorch_layout",
            format!("a ConvKrsc entry must have rank 4, got {s:?}"),
        )),
        (Layout::Plain, _) => Ok(t.clone()),
    }
}

/// Converts a PyTorch-layout tensor into the engine's `layout` (O×I×KH×KW → O×KH×KW×I for
/// convolution weights).
pub fn from_pytorch_layout(layout: Layout, t: Tensor<f32>) -> Result<Tensor<f32>> {
    match (layout, t.shape()) {
        (Layout::ConvKrsc, &[o, i, kh, kw]) => {
            let src = t.data();
            let mut out = vec![0f32; src.len()];
            for oo in 0..o {
                for c in 0..i {
                    for y in 0..kh {
                        for x in 0..kw {
                            out[((oo * kh + y) * kw + x) * i + c] =
                                src[((oo * i + c) * kh + y) * kw + x];
                        }
                    }
                }
            }
            Tensor::from_vec(out, &[o, kh, kw, i])
        }
        (Layout::ConvKrsc, s) => Err(Error::shape(
            "from_pytorch_layout",
            format!("a ConvKrsc entry must have rank 4, got {s:?}"),
        )),
        (Layout::Plain, _) => Ok(t),
    }
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder, write, fsync, rename
/// over `path`, fsync of the folder.
///
/// A crash or a full disk therefore leaves either the old file or the new one, never a torn
/// checkpoint; the folder fsync makes the rename itself durable. The temp file is removed when
/// anything fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| format_err(path, "not a file path (no file name)"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    // Make the rename durable. Opening a folder for fsync is Unix-only; elsewhere the rename is
    // as durable as the platform makes it.
    #[cfg(unix)]
    {
        let d = std::fs::File::open(&dir).map_err(|e| io_err(&dir, e))?;
        d.sync_all().map_err(|e| io_err(&dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trip_and_shape() {
        let t = Tensor::randn_named(1, "w", &[3, 2, 5, 4], 1.0);
        let p = to_pytorch_layout(Layout::ConvKrsc, &t).unwrap();
        assert_eq!(p.shape(), &[3, 4, 2, 5]);
        assert_eq!(
            pytorch_shape(Layout::ConvKrsc, t.shape()),
            p.shape().to_vec()
        );
        // Element (o=2, kh=1, kw=3, i=1) in KRSC sits at (o=2, i=1, kh=1, kw=3) in OIHW.
        assert_eq!(
            t.data()[((2 * 2 + 1) * 5 + 3) * 4 + 1],
            p.data()[((2 * 4 + 1) * 2 + 1) * 5 + 3]
        );
        let back = from_pytorch_layout(Layout::ConvKrsc, p).unwrap();
        assert_eq!(back, t);
        assert!(to_pytorch_layout(Layout::ConvKrsc, &Tensor::zeros(&[2, 2])).is_err());
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let e = write_atomic(&dir.path().join("missing/x.bin"), b"x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing/x.bin"), "{e}");
    }
}

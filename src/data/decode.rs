//! Image decoding on the CPU: JPEG with zune-jpeg (a SIMD baseline/progressive decoder, several
//! times faster than a scalar one and pure Rust, so the binary needs no libjpeg) and PNG with the
//! `png` crate. Every image comes out as HWC u8 RGB, as torchvision's `pil_loader`
//! (`Image.open(f).convert("RGB")`) gives:
//!
//! - the format is recognised from the file's first bytes, not its extension (PIL does the same);
//! - grayscale is replicated to three channels (PIL's L -> RGB);
//! - CMYK / YCCK JPEGs (Adobe, inverted) become RGB as `(255-C)(255-K)/255`, PIL's formula;
//! - alpha is dropped without compositing and palettes are expanded (PIL's RGBA/P -> RGB);
//! - 16-bit PNGs keep their high byte (PIL would clip I;16 to 255; the high byte is what a user means);
//! - EXIF orientation is ignored, as torchvision's loader ignores it.
//!
//! A file that cannot be decoded, is truncated or empty returns [`DataError::Decode`] naming it;
//! nothing here panics on bad bytes.

use std::path::Path;

use rayon::prelude::*;
use zune_jpeg::zune_core::bytestream::ZCursor;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

use super::error::{DataError, DataResult};
use super::image::Image;

/// Largest accepted side in pixels: a guard against decompression bombs (ImageNet's largest
/// side is under 5000).
pub const MAX_SIDE: usize = 1 << 15;

/// The image formats the decoder recognises from their magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// JPEG (SOI marker FF D8 FF).
    Jpeg,
    /// PNG (8-byte signature).
    Png,
}

/// The format of `bytes`, from the magic number; `None` for anything else.
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    if bytes.len() >= 3 && bytes[..3] == [0xFF, 0xD8, 0xFF] {
        Some(Format::Jpeg)
    } else if bytes.len() >= 8 && bytes[..8] == [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A] {
        Some(Format::Png)
    } else {
        None
    }
}

/// Decodes an in-memory JPEG or PNG to HWC u8 RGB. `path` only names the file in errors.
pub fn decode_bytes(bytes: &[u8], path: &Path) -> DataResult<Image<u8>> {
    let err = |detail: String| DataError::Decode {
        path: path.to_path_buf(),
        detail,
    };
    if bytes.is_empty() {
        return Err(err("empty file".into()));
    }
    match sniff(bytes) {
        Some(Format::Jpeg) => decode_jpeg(bytes).map_err(err),
        Some(Format::Png) => decode_png(bytes).map_err(err),
        None => Err(err(
            "not a JPEG or PNG file (unrecognised magic bytes)".into()
        )),
    }
}

/// Reads and decodes one file.
pub fn decode_file(path: &Path) -> DataResult<Image<u8>> {
    let bytes = std::fs::read(path).map_err(|err| DataError::Io {
        path: path.to_path_buf(),
        err,
    })?;
    decode_bytes(&bytes, path)
}

/// Decodes many files in parallel on rayon's pool (one task per file; JPEG decoding does not
/// split well below one image). The result keeps the input order.
pub fn decode_files(paths: &[&Path]) -> Vec<DataResult<Image<u8>>> {
    paths.par_iter().map(|p| decode_file(p)).collect()
}

fn decode_jpeg(bytes: &[u8]) -> Result<Image<u8>, String> {
    // Strict mode turns premature end of data (a truncated download) into an error instead of
    // silently grey-filling the rest, which is what libjpeg/PIL report as "image file is truncated".
    let opts = DecoderOptions::new_fast()
        .set_strict_mode(true)
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut dec = JpegDecoder::new_with_options(ZCursor::new(bytes), opts);
    dec.decode_headers().map_err(|e| e.to_string())?;
    let info = dec.info().ok_or("no frame header")?;
    let (w, h) = (info.width as usize, info.height as usize);
    if w == 0 || h == 0 {
        return Err("zero-sized image".into());
    }
    let out_cs = dec.output_colorspace().ok_or("unknown colour space")?;
    let pixels = dec.decode().map_err(|e| e.to_string())?;
    let ch = out_cs.num_components();
    let data = match ch {
        3 => pixels,
        1 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        4 => pixels
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        n => return Err(format!("unsupported number of output channels {n}")),
    };
    Image::from_vec(h, w, data).ok_or_else(|| "decoded size does not match the header".into())
}

fn decode_png(bytes: &[u8]) -> Result<Image<u8>, String> {
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().map_err(|e| e.to_string())?;
    {
        let info = reader.info();
        let (w, h) = (info.width as usize, info.height as usize);
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            return Err(format!("unsupported size {w}x{h}"));
        }
    }
    let size = reader
        .output_buffer_size()
        .ok_or("image too large for this platform")?;
    let mut buf = vec![0u8; size];
    let out = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    let (w, h) = (out.width as usize, out.height as usize);
    let line = out.line_size;
    let ch = match out.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err("palette was not expanded".into()),
    };
    let mut data = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        let row = &buf[y * line..y * line + w * ch];
        for px in row.chunks_exact(ch) {
            match ch {
                1 | 2 => data.extend_from_slice(&[px[0], px[0], px[0]]),
                _ => data.extend_from_slice(&px[..3]),
            }
        }
    }
    Image::from_vec(h, w, data).ok_or_else(|| "decoded size does not match the header".into())
}

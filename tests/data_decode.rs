//! Decoding parity with Pillow (the loader of torchvision's ImageFolder) on small committed files:
//! PNG (gray, palette, alpha) must be exact; JPEG (4:2:0, 4:4:4, progressive, gray, Adobe CMYK)
//! within a few levels, since libjpeg-turbo and zune-jpeg round IDCT and upsampling differently.
//! Also: bad bytes are errors naming the file, never panics.

use std::path::{Path, PathBuf};

use sdengine::data::{decode_bytes, decode_file, decode_files, DataError, Image};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

/// u8 HWC tensors of `tests/fixtures/data/<file>` (Fixtures only reads float tensors).
fn read_u8(file: &str) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(fixture(file)).expect("fixture file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::U8, "{n}");
            (n.to_string(), v.shape().to_vec(), v.data().to_vec())
        })
        .collect()
}

fn diff_stats(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let mut max = 0u8;
    let mut sum = 0u64;
    for (&x, &y) in a.iter().zip(b) {
        let d = x.abs_diff(y);
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / a.len() as f64)
}

#[test]
fn decode_matches_pillow() {
    let refs = read_u8("decode.safetensors");
    assert_eq!(refs.len(), 8, "fixture set changed");
    for (name, shape, want) in refs {
        // Tensor names are "<stem>_<ext>" (safetensors names avoid '.').
        let (stem, ext) = name.rsplit_once('_').expect("name");
        let file = format!("{stem}.{ext}");
        let img = decode_file(&fixture(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!([img.height, img.width, 3], shape[..], "{file}");
        let (max, mean) = diff_stats(&img.data, &want);
        if ext == "png" {
            assert_eq!(max, 0, "{file}: PNG must decode exactly");
        } else {
            // zune-jpeg vs libjpeg-turbo: different IDCT / chroma upsampling rounding.
            let (tol_max, tol_mean) = (6, 0.5);
            assert!(
                max <= tol_max && mean <= tol_mean,
                "{file}: max diff {max}, mean {mean:.3} vs Pillow"
            );
        }
        eprintln!("{file}: max {max} mean {mean:.3}");
    }
}

#[test]
fn bad_bytes_are_errors_that_name_the_file() {
    let good = std::fs::read(fixture("q420.jpg")).expect("fixture");
    let png = std::fs::read(fixture("rgb_a.png")).expect("fixture");
    let p = Path::new("some/dir/x.JPEG");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("text", b"hello, this is not an image".to_vec()),
        ("jpeg header only", good[..20].to_vec()),
        ("truncated jpeg", good[..good.len() / 2].to_vec()),
        ("truncated png", png[..png.len() / 2].to_vec()),
        ("png magic only", png[..8].to_vec()),
        ("corrupt png", {
            let mut v = png.clone();
            for b in v[60..200].iter_mut() {
                *b ^= 0x5A;
            }
            v
        }),
    ];
    for (what, bytes) in cases {
        match decode_bytes(&bytes, p) {
            Err(e @ DataError::Decode { .. }) => {
                assert!(e.to_string().contains("some/dir/x.JPEG"), "{what}: {e}")
            }
            Err(e) => panic!("{what}: unexpected error kind {e}"),
            Ok(img) => panic!("{what}: decoded to {}x{}", img.height, img.width),
        }
    }
    // A missing file is an I/O error naming it.
    let e = decode_file(Path::new("/nonexistent/y.jpg")).expect_err("missing");
    assert!(e.to_string().contains("/nonexistent/y.jpg"));
}

#[test]
fn parallel_decode_keeps_order() {
    let names = ["q420.jpg", "gray.png", "cmyk.jpg", "rgba.png", "q444.jpg"];
    let paths: Vec<PathBuf> = names.iter().map(|n| fixture(n)).collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let par = decode_files(&refs);
    for (p, r) in paths.iter().zip(par) {
        let seq: Image<u8> = decode_file(p).expect("decode");
        assert_eq!(r.expect("decode"), seq, "{}", p.display());
    }
}

#[test]
fn every_imagenet_sample_decodes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(dir) = [root.join("../shared/data"), root.join("../../shared/data")]
        .into_iter()
        .map(|d| d.join("imagenet-samples/train"))
        .find(|p| p.is_dir())
    else {
        eprintln!("SKIP every_imagenet_sample_decodes: ../shared/data/imagenet-samples not found");
        return;
    };
    // Grayscale, ICC, EXIF and every chroma subsampling of the real files must decode.
    let ds = sdengine::data::Dataset::image_folder(&dir).expect("scan");
    assert_eq!(ds.len(), 400);
    let paths: Vec<&Path> = ds.samples.iter().map(|s| s.path.as_path()).collect();
    for (p, r) in paths.iter().zip(decode_files(&paths)) {
        let img = r.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(img.height >= 16 && img.width >= 16, "{}", p.display());
    }
}

//! The embedded default dataset: the pack extracts into an ImageFolder layout that the data
//! pipeline reads (10 classes, 4,000 train / 1,000 test images, real 32x32 JPEGs), once, safely
//! under concurrent callers, replacing incomplete folders, and refusing unsafe entry names.

use std::io::Write;
use std::path::{Path, PathBuf};

use sdengine::data::embedded::{
    cache_root, checked_entry_path, cifar10_mini_dir, extract_zip, pack_hash, CIFAR10_MINI_ZIP,
    MARKER_FILE,
};
use sdengine::data::{decode_file, Dataset};

const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// A stored zip holding `entries` (name, bytes), written with the zip crate.
fn make_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Every non-hidden entry under `dir` (recursively), relative, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

fn check_cifar10_mini(dir: &Path) {
    let train = Dataset::image_folder(&dir.join("train")).unwrap();
    let test = Dataset::image_folder(&dir.join("test")).unwrap();
    assert_eq!(train.classes, CLASSES);
    assert_eq!(test.classes, CLASSES);
    assert_eq!(train.samples.len(), 4000);
    assert_eq!(test.samples.len(), 1000);
    for label in 0..10 {
        assert_eq!(
            train.samples.iter().filter(|s| s.label == label).count(),
            400
        );
        assert_eq!(
            test.samples.iter().filter(|s| s.label == label).count(),
            100
        );
    }
    // The first 400 / 100 in sorted order were cut: 0000..0399 and 0000..0099.
    assert!(dir.join("train/truck/0399.jpg").is_file());
    assert!(!dir.join("train/truck/0400.jpg").exists());
    assert!(dir.join("test/cat/0099.jpg").is_file());
    assert!(!dir.join("test/cat/0100.jpg").exists());
    // Real images: they decode to 32x32 RGB.
    for s in [&train.samples[0], &train.samples[3999], &test.samples[500]] {
        let img = decode_file(&s.path).unwrap();
        assert_eq!(
            (img.width, img.height, img.data.len()),
            (32, 32, 32 * 32 * 3),
            "{:?}",
            s.path
        );
    }
}

#[test]
fn default_dir_extracts_once_into_sdengine_cache_and_reads_as_image_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    // The only test in this binary that touches the environment.
    std::env::set_var("SDENGINE_CACHE", &cache);
    assert_eq!(cache_root(), cache);
    let dir = cifar10_mini_dir().unwrap();
    assert_eq!(dir.parent().unwrap(), cache);
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        name,
        format!("cifar10-mini-{:016x}", pack_hash(CIFAR10_MINI_ZIP))
    );
    check_cifar10_mini(&dir);
    assert_eq!(files_under(&dir).len(), 5001, "5,000 images and the marker");

    // A second call finds the marker and does not extract again: a file deleted from the folder
    // stays deleted (an extraction would have restored it).
    std::fs::remove_file(dir.join("train/cat/0000.jpg")).unwrap();
    assert_eq!(cifar10_mini_dir().unwrap(), dir);
    assert!(!dir.join("train/cat/0000.jpg").exists());
    // Nothing but the final folder is left in the cache.
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);

    // Fallbacks: XDG_CACHE_HOME (absolute only), then HOME.
    std::env::remove_var("SDENGINE_CACHE");
    std::env::set_var("XDG_CACHE_HOME", tmp.path().join("xdg"));
    assert_eq!(cache_root(), tmp.path().join("xdg").join("sdengine"));
    std::env::set_var("XDG_CACHE_HOME", "relative/xdg");
    std::env::set_var("HOME", tmp.path().join("home"));
    assert_eq!(cache_root(), tmp.path().join("home/.cache/sdengine"));
}

#[test]
fn concurrent_callers_all_get_one_complete_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().to_path_buf();
    let dirs: Vec<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| extract_zip(CIFAR10_MINI_ZIP, &cache, "cifar10-mini").unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(dirs.iter().all(|d| *d == dirs[0]));
    check_cifar10_mini(&dirs[0]);
    assert_eq!(files_under(&dirs[0]).len(), 5001);
    // The losers' temporary folders are gone.
    let left: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn incomplete_folder_is_replaced_and_bytes_are_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let pack = make_zip(&[("train/a/0.jpg", b"first"), ("test/a/0.jpg", b"second")]);
    let target = tmp.path().join(format!("p-{:016x}", pack_hash(&pack)));
    // An interrupted extraction: the folder exists but has no marker and holds a stray file.
    std::fs::create_dir_all(target.join("train/a")).unwrap();
    std::fs::write(target.join("train/a/stray.jpg"), b"junk").unwrap();
    let dir = extract_zip(&pack, tmp.path(), "p").unwrap();
    assert_eq!(dir, target);
    assert_eq!(std::fs::read(dir.join("train/a/0.jpg")).unwrap(), b"first");
    assert_eq!(std::fs::read(dir.join("test/a/0.jpg")).unwrap(), b"second");
    assert!(!dir.join("train/a/stray.jpg").exists());
    assert!(dir.join(MARKER_FILE).is_file());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

    // A different pack gets a different folder (the name carries its hash).
    let other = make_zip(&[("train/a/0.jpg", b"changed")]);
    let dir2 = extract_zip(&other, tmp.path(), "p").unwrap();
    assert_ne!(dir2, dir);
    assert_eq!(
        std::fs::read(dir2.join("train/a/0.jpg")).unwrap(),
        b"changed"
    );
    assert_eq!(std::fs::read(dir.join("train/a/0.jpg")).unwrap(), b"first");
}

#[test]
fn unsafe_entry_names_are_refused_and_nothing_escapes() {
    for bad in [
        "../evil.jpg",
        "train/../../evil.jpg",
        "/abs/evil.jpg",
        "a\\..\\evil.jpg",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let pack = make_zip(&[("train/a/0.jpg", b"ok"), (bad, b"evil")]);
        let err = extract_zip(&pack, &cache, "p").unwrap_err().to_string();
        assert!(
            err.contains("unsafe name") && err.contains("evil"),
            "{bad}: {err}"
        );
        assert!(!tmp.path().join("evil.jpg").exists());
        assert!(!Path::new("/abs/evil.jpg").exists());
        // The failed extraction leaves nothing behind, not even its temporary folder.
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0, "{bad}");
    }
    assert_eq!(
        checked_entry_path("train/cat/0001.jpg"),
        Some(PathBuf::from("train/cat/0001.jpg"))
    );
    assert_eq!(
        checked_entry_path("train/cat/"),
        Some(PathBuf::from("train/cat"))
    );
    for bad in [
        "",
        "/",
        "a//b",
        "./a",
        "a/./b",
        "a/..",
        "C:/x",
        "C:x",
        MARKER_FILE,
    ] {
        assert_eq!(checked_entry_path(bad), None, "{bad:?}");
    }
}

#[test]
fn a_non_zip_pack_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = extract_zip(b"not a zip at all", tmp.path(), "p")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a readable zip"), "{err}");
}

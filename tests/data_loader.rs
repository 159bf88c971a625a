//! The loader: DistributedSampler semantics, identical batches for any worker count, the
//! endless labelled cycle, and bad input (corrupt, truncated, empty, non-image files) skipped,
//! counted and replaced without changing batch shapes, stalling or panicking.

use std::path::Path;
use std::sync::Arc;

use sdengine::data::augment::{MultiCrop, SUAVE_NORM};
use sdengine::data::loader::distributed_indices;
use sdengine::data::{BadInput, BatchKind, CyclingLoader, Dataset, EpochLoader, LoaderConfig};

const FILES: [&str; 7] = [
    "rgb_a.png",
    "rgb_b.png",
    "gray.png",
    "q420.jpg",
    "q444.jpg",
    "cmyk.jpg",
    "progressive.jpg",
];

/// A two-class ImageFolder in a temp dir made of the committed fixture images.
fn folder(extra: &[(&str, Vec<u8>)]) -> (tempfile::TempDir, Arc<Dataset>) {
    let t = tempfile::tempdir().expect("tmp");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data");
    for (i, f) in FILES.iter().enumerate() {
        let dst = t.path().join(format!("train/c{}/{i:02}_{f}", i % 2));
        std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
        std::fs::copy(src.join(f), &dst).expect("copy");
    }
    for (name, bytes) in extra {
        std::fs::write(t.path().join("train").join(name), bytes).expect("write");
    }
    let ds = Dataset::image_folder(&t.path().join("train")).expect("scan");
    (t, Arc::new(ds))
}

/// Small crops so the test is quick: 2 globals of 16 and 3 locals of 8 (Suave's recipe).
fn small_suave() -> MultiCrop {
    let mut m = MultiCrop::suave_unlabelled(true);
    m.views.truncate(5);
    for (i, v) in m.views.iter_mut().enumerate() {
        v.size = if i < 2 { 16 } else { 8 };
    }
    m
}

fn cfg(workers: usize, batch: usize) -> LoaderConfig {
    LoaderConfig {
        seed: 42,
        stream: 0,
        rank: 0,
        world: 1,
        batch_size: batch,
        workers,
        prefetch: 2,
        shuffle: true,
        drop_last: true,
    }
}

#[test]
fn distributed_sampler_semantics() {
    assert_eq!(distributed_indices(10, 0, 0, 0, 3, false), [0, 3, 6, 9]);
    assert_eq!(distributed_indices(10, 0, 0, 1, 3, false), [1, 4, 7, 0]);
    assert_eq!(distributed_indices(10, 0, 0, 2, 3, false), [2, 5, 8, 1]);
    // Padding longer than the set repeats it cyclically (torch: indices * ceil(pad / n)).
    assert_eq!(distributed_indices(2, 0, 0, 4, 5, false), [0]);
    for epoch in 0..3 {
        let mut all: Vec<usize> = (0..4)
            .flat_map(|r| distributed_indices(103, 7, epoch, r, 4, true))
            .collect();
        assert_eq!(all.len(), 104);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 103, "every sample appears");
    }
    assert_ne!(
        distributed_indices(50, 7, 0, 0, 1, true),
        distributed_indices(50, 7, 1, 0, 1, true),
        "a new order every epoch"
    );
    assert_eq!(
        distributed_indices(50, 7, 3, 1, 2, true),
        distributed_indices(50, 7, 3, 1, 2, true)
    );
}

#[test]
fn one_and_three_workers_give_identical_batches() {
    let (_t, ds) = folder(&[]);
    let kind = BatchKind::Unlabelled {
        crops: small_suave(),
        mix_globals: true,
    };
    let run = |workers| -> Vec<_> {
        let bad = Arc::new(BadInput::default());
        let l =
            EpochLoader::new(ds.clone(), kind.clone(), cfg(workers, 2), 5, bad).expect("loader");
        assert_eq!(l.len(), 3, "7 samples, batch 2, drop_last");
        l.map(|b| b.expect("batch")).collect()
    };
    let one = run(1);
    let three = run(3);
    assert_eq!(one, three);
    let b = &one[0];
    assert_eq!(b.views.len(), 5);
    assert_eq!(b.views[0].shape(), &[2, 16, 16, 3]);
    assert_eq!(b.views[4].shape(), &[2, 8, 8, 3]);
    assert!(b
        .mixed
        .as_ref()
        .is_some_and(|(m, _)| m.shape() == [2, 16, 16, 3]));
    assert!(b
        .views
        .iter()
        .all(|v| v.data().iter().all(|x| x.is_finite())));
    // Views differ from each other and batches differ across epochs.
    assert_ne!(b.views[0], b.views[1]);
    let bad = Arc::new(BadInput::default());
    let other: Vec<_> = EpochLoader::new(ds.clone(), kind.clone(), cfg(2, 2), 6, bad)
        .expect("loader")
        .map(|b| b.expect("batch"))
        .collect();
    assert_ne!(one, other);
    // Each sample of the epoch appears once (7 samples, 6 used with drop_last).
    let mut idx: Vec<usize> = one.iter().flat_map(|b| b.indices.clone()).collect();
    idx.sort_unstable();
    idx.dedup();
    assert_eq!(idx.len(), 6);
}

#[test]
fn labelled_loader_cycles_with_its_own_epochs_and_extends_with_mixup() {
    let (_t, ds) = folder(&[]);
    let mut crops = MultiCrop::labelled();
    crops.views[0].size = 12;
    let kind = BatchKind::Labelled {
        crops,
        mixup_extend: true,
        classes: 2,
    };
    let bad = Arc::new(BadInput::default());
    let mut l = CyclingLoader::new(ds.clone(), kind, cfg(2, 3), 0, bad).expect("loader");
    let mut epochs = Vec::new();
    let mut orders = Vec::new();
    for _ in 0..5 {
        let b = l.next_batch().expect("batch");
        epochs.push(l.epoch());
        orders.push(b.indices.clone());
        assert_eq!(b.views[0].shape(), &[6, 12, 12, 3]);
        let t = b.targets.expect("targets");
        assert_eq!(t.shape(), &[6, 2]);
        for row in t.data().chunks_exact(2) {
            assert!((row[0] + row[1] - 1.0).abs() < 1e-6);
        }
    }
    // 7 samples, batch 3, drop_last: 2 batches an epoch.
    assert_eq!(epochs, [0, 0, 1, 1, 2]);
    assert_ne!(orders[0], orders[2]);
    let e = CyclingLoader::new(
        ds,
        BatchKind::Eval {
            resize: 16,
            crop: 12,
            norm: SUAVE_NORM,
        },
        cfg(1, 8),
        0,
        Arc::new(BadInput::default()),
    );
    assert!(
        e.is_err(),
        "fewer samples than one batch must be an error, not an endless loop"
    );
}

#[test]
fn bad_files_are_skipped_counted_and_replaced() {
    let good =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/q420.jpg"))
            .expect("fixture");
    let mut corrupt = good.clone();
    for b in corrupt[100..400].iter_mut() {
        *b = b.wrapping_mul(31).wrapping_add(7);
    }
    let extra = vec![
        ("c0/bad_empty.jpg", vec![]),
        ("c0/bad_text.JPEG", b"<html>not found</html>".to_vec()),
        ("c1/bad_trunc.jpg", good[..good.len() / 3].to_vec()),
        ("c1/bad_corrupt.jpg", corrupt),
        ("c1/bad_format.bmp", b"BM\x00\x00\x00".to_vec()),
    ];
    let (_t, ds) = folder(&extra);
    assert_eq!(ds.len(), 12);
    let kind = BatchKind::Eval {
        resize: 16,
        crop: 12,
        norm: SUAVE_NORM,
    };
    let mut c = cfg(3, 4);
    c.shuffle = false;
    c.drop_last = false;
    let run = |c: LoaderConfig| {
        let bad = Arc::new(BadInput::default());
        let batches: Vec<_> = EpochLoader::new(ds.clone(), kind.clone(), c, 0, bad.clone())
            .expect("loader")
            .map(|b| b.expect("batch"))
            .collect();
        (batches, bad)
    };
    let (batches, bad) = run(c.clone());
    assert_eq!(batches.len(), 3);
    assert!(batches.iter().all(|b| b.views[0].shape() == [4, 12, 12, 3]));
    let mut failed: Vec<String> = bad
        .files()
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    failed.sort();
    // A corrupted JPEG may still decode (JPEG has no checksum); the others cannot.
    for f in [
        "bad_empty.jpg",
        "bad_text.JPEG",
        "bad_trunc.jpg",
        "bad_format.bmp",
    ] {
        assert!(
            failed.iter().any(|x| x == f),
            "{f} not reported: {failed:?}"
        );
    }
    assert!(bad.skipped() >= 4);
    // Replacement is the next decodable sample in dataset order, whatever the worker count.
    let used: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    for (pos, &idx) in used.iter().enumerate() {
        let p = &ds.samples[idx].path;
        assert!(!bad.files().contains(p), "position {pos} used a bad file");
        let mut j = pos;
        while bad.files().contains(&ds.samples[j].path) {
            j = (j + 1) % ds.len();
        }
        assert_eq!(idx, j, "position {pos}");
    }
    let mut c1 = c.clone();
    c1.workers = 1;
    assert_eq!(run(c1).0, batches);

    // Nothing decodable: an error, not a stall.
    let t = tempfile::tempdir().expect("tmp");
    for f in ["a/x.jpg", "b/y.png"] {
        let p = t.path().join(f);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, b"garbage").expect("write");
    }
    let ds = Arc::new(Dataset::image_folder(t.path()).expect("scan"));
    let mut l =
        EpochLoader::new(ds, kind, cfg(2, 1), 0, Arc::new(BadInput::default())).expect("loader");
    let e = l.next().expect("an item").expect_err("error");
    assert!(e.to_string().contains("no image"), "{e}");
    assert!(l.next().is_none());
}

#[test]
fn dropping_a_loader_early_does_not_hang() {
    let (_t, ds) = folder(&[]);
    let kind = BatchKind::Unlabelled {
        crops: small_suave(),
        mix_globals: false,
    };
    let mut l =
        EpochLoader::new(ds, kind, cfg(3, 1), 0, Arc::new(BadInput::default())).expect("loader");
    let b = l.next().expect("item").expect("batch");
    assert!(b.mixed.is_none());
    drop(l);
}

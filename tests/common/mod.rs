//! Helpers shared by the integration tests that train (tests/train.rs, tests/dist_train.rs).

use std::path::PathBuf;

/// 4 train + 2 test images per class, copied from the embedded set.
pub fn tiny_dataset() -> (tempfile::TempDir, PathBuf) {
    let src = sdengine::data::embedded::cifar10_mini_dir().expect("embedded dataset");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("data");
    for (split, n) in [("train", 4), ("test", 2)] {
        let mut classes: Vec<_> = std::fs::read_dir(src.join(split))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        classes.sort();
        for c in classes {
            let mut files: Vec<_> = std::fs::read_dir(&c)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            let dst = root.join(split).join(c.file_name().unwrap());
            std::fs::create_dir_all(&dst).unwrap();
            for f in files.iter().take(n) {
                std::fs::copy(f, dst.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    (dir, root)
}

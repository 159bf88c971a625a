//! Dataset scanning as torchvision's ImageFolder, SimCLR label lists, seeded subsets, and the
//! clear errors for missing folders, empty classes and listed files absent from train/.

use std::path::{Path, PathBuf};

use sdengine::data::{DataError, Dataset, LabelSpec, Sample, SemiSupervised};

fn touch(p: &Path) {
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, b"x").expect("write");
}

/// The shared real-data folder: ../shared/data beside the checkout, or ../../shared/data for a
/// git worktree one level deeper.
fn shared_data() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    [root.join("../shared/data"), root.join("../../shared/data")]
        .into_iter()
        .find(|p| p.is_dir())
}

#[test]
fn image_folder_order_labels_and_extension_filter() {
    let t = tempfile::tempdir().expect("tmp");
    let d = t.path().join("train");
    for f in [
        "b_cls/z.JPEG",
        "b_cls/a.png",
        "b_cls/notes.txt",
        "b_cls/sub/c.jpg",
        "b_cls/M.Jpeg",
        "a_cls/x.jpeg",
        "a_cls/y.webp",
        "C_cls/q.bmp",
    ] {
        touch(&d.join(f));
    }
    std::fs::write(d.join("stray_file.jpg"), b"x").expect("write");
    let ds = Dataset::image_folder(&d).expect("scan");
    // Sorted by byte order, as Python sorts str: uppercase first.
    assert_eq!(ds.classes, ["C_cls", "a_cls", "b_cls"]);
    let got: Vec<(String, usize)> = ds
        .samples
        .iter()
        .map(|s| {
            let rel = s.path.strip_prefix(&d).expect("prefix");
            (rel.display().to_string(), s.label)
        })
        .collect();
    let want = [
        ("C_cls/q.bmp", 0),
        ("a_cls/x.jpeg", 1),
        ("a_cls/y.webp", 1),
        ("b_cls/M.Jpeg", 2),
        ("b_cls/a.png", 2),
        ("b_cls/z.JPEG", 2),
        ("b_cls/sub/c.jpg", 2),
    ];
    let want: Vec<(String, usize)> = want.iter().map(|(p, l)| (p.to_string(), *l)).collect();
    assert_eq!(got, want);
}

#[test]
fn missing_and_empty_folders_are_clear_errors() {
    let t = tempfile::tempdir().expect("tmp");
    let e = Dataset::image_folder(&t.path().join("nope")).expect_err("missing");
    assert!(matches!(e, DataError::MissingFolder { .. }), "{e}");
    assert!(e.to_string().contains("nope"), "{e}");

    let d = t.path().join("train");
    std::fs::create_dir_all(&d).expect("mkdir");
    let e = Dataset::image_folder(&d).expect_err("no classes");
    assert!(matches!(e, DataError::NoClasses { .. }), "{e}");

    touch(&d.join("good/a.jpg"));
    touch(&d.join("empty1/readme.txt"));
    std::fs::create_dir_all(d.join("empty2")).expect("mkdir");
    let e = Dataset::image_folder(&d).expect_err("empty classes");
    let msg = e.to_string();
    assert!(
        matches!(e, DataError::EmptyClasses { count: 2, .. }),
        "{msg}"
    );
    assert!(msg.contains("empty1") && msg.contains("empty2"), "{msg}");

    let e = SemiSupervised::open(&t.path().join("absent_root"), &LabelSpec::All).expect_err("root");
    assert!(e.to_string().contains("absent_root"));
}

#[test]
fn label_list_resolves_and_reports_missing_names() {
    let t = tempfile::tempdir().expect("tmp");
    let train = t.path().join("train");
    for f in [
        "n01/n01_1.JPEG",
        "n01/n01_2.JPEG",
        "n02/n02_7.JPEG",
        "n03/n03_5.JPEG",
    ] {
        touch(&train.join(f));
    }
    touch(&t.path().join("val/n01/v1.JPEG"));
    let list = t.path().join("list.txt");
    std::fs::write(&list, "n02_7.JPEG\nn01_2.JPEG\n\n").expect("write");
    let ss = SemiSupervised::open(t.path(), &LabelSpec::List(list.clone())).expect("open");
    assert_eq!(ss.unlabelled.len(), 4);
    assert_eq!(ss.val.as_ref().map(|v| v.len()), Some(1));
    let lab: Vec<(PathBuf, usize)> = ss
        .labelled
        .samples
        .iter()
        .map(|s| (s.path.clone(), s.label))
        .collect();
    assert_eq!(
        lab,
        vec![
            (train.join("n02/n02_7.JPEG"), 1),
            (train.join("n01/n01_2.JPEG"), 0)
        ]
    );

    std::fs::write(
        &list,
        "n01_1.JPEG\nn01_9.JPEG\nn09_1.JPEG\nn02_8.JPEG\nn02_9.JPEG\nn03_1.JPEG\nn03_2.JPEG\nn03_3.JPEG\n",
    )
    .expect("write");
    let e = SemiSupervised::open(t.path(), &LabelSpec::List(list.clone())).expect_err("missing");
    let msg = e.to_string();
    assert!(
        matches!(e, DataError::MissingListed { count: 7, .. }),
        "{msg}"
    );
    assert!(
        msg.contains("n01_9.JPEG") && msg.contains("n09_1.JPEG"),
        "{msg}"
    );
    assert!(msg.contains("and 2 more"), "{msg}");

    std::fs::write(&list, "n01_1.JPEG\nbadname\n").expect("write");
    let e = SemiSupervised::open(t.path(), &LabelSpec::List(list)).expect_err("bad line");
    assert!(e.to_string().contains(":2:"), "{e}");
}

#[test]
fn seeded_subsets_are_stratified_and_deterministic() {
    let t = tempfile::tempdir().expect("tmp");
    let d = t.path().join("train");
    for c in 0..5 {
        for i in 0..(20 + c) {
            touch(&d.join(format!("c{c}/{i:03}.png")));
        }
    }
    let ds = Dataset::image_folder(&d).expect("scan");
    let s1 = ds.subset_per_class(4, 7).expect("subset");
    assert_eq!(s1.len(), 20);
    for c in 0..5 {
        assert_eq!(s1.samples.iter().filter(|s| s.label == c).count(), 4);
    }
    assert_eq!(s1, ds.subset_per_class(4, 7).expect("subset"));
    assert_ne!(s1, ds.subset_per_class(4, 8).expect("subset"));
    let p = ds.subset_percent(10.0, 1).expect("perc");
    // round(20*0.1)=2, 21 -> 2, 22 -> 2, 23 -> 2, 24 -> 2
    assert_eq!(p.len(), 10);
    let e = ds.subset_per_class(21, 0).expect_err("too few");
    assert!(e.to_string().contains("c0"), "{e}");
    assert!(ds.subset_percent(0.0, 0).is_err());
}

#[test]
fn simclr_one_percent_list_on_a_mock_train_folder() {
    let Some(data) = shared_data() else {
        eprintln!("SKIP simclr_one_percent_list: ../shared/data not found beside the checkout");
        return;
    };
    let list = data.join("imagenet-subsets/1percent.txt");
    let text = std::fs::read_to_string(&list).expect("1percent.txt");
    // The train folder as ImageFolder would list it (every listed file plus one unlisted file
    // a class), built in memory: creating 13k files takes half a minute on slow disks.
    let train = Path::new("/mock/train");
    let mut names: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let mut classes: Vec<String> = names
        .iter()
        .map(|n| n.split('_').next().expect("wnid").to_string())
        .collect();
    classes.sort();
    classes.dedup();
    names.sort();
    let mut samples = Vec::new();
    for (label, c) in classes.iter().enumerate() {
        samples.push(Sample {
            path: train.join(c).join(format!("{c}_unlisted.JPEG")),
            label,
        });
    }
    for n in &names {
        let c = n.split('_').next().expect("wnid");
        let label = classes.binary_search(&c.to_string()).expect("class");
        samples.push(Sample {
            path: train.join(c).join(n),
            label,
        });
    }
    let full = Dataset { classes, samples };
    let lab = Dataset::from_label_list(&full, train, &list).expect("list");
    assert_eq!(lab.len(), 12_811);
    assert_eq!(full.classes.len(), 1000);
    let ss = SemiSupervised {
        unlabelled: full,
        labelled: lab,
        val: None,
    };
    let mut per_class = vec![0usize; 1000];
    for s in &ss.labelled.samples {
        per_class[s.label] += 1;
        let wnid = &ss.labelled.classes[s.label];
        assert!(s
            .path
            .ends_with(Path::new(wnid).join(s.path.file_name().expect("name"))));
    }
    // The known shape of the SimCLR 1 % split: 811 classes of 13 and 189 of 12.
    assert_eq!(per_class.iter().filter(|&&n| n == 13).count(), 811);
    assert_eq!(per_class.iter().filter(|&&n| n == 12).count(), 189);
}

//! Datasets: ImageNet-layout folders read as torchvision's `ImageFolder` reads them, the SimCLR
//! 1 %/10 % label lists that Suave and Daino use, and seeded label subsets for other datasets.
//!
//! The class index is the position of the class folder in sorted order, and the sample order is
//! the sorted walk of each class folder, exactly as `ImageFolder` builds it, so that class indices
//! and checkpoints interoperate with PyTorch runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::{first_few, DataError, DataResult};
use crate::rng::Rng;

/// torchvision's `IMG_EXTENSIONS`, compared case-insensitively. Files with these extensions that
/// are not JPEG/PNG (BMP, TIFF, WebP) are listed but fail to decode and are skipped as bad input.
pub const IMG_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// One image and its class index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The image file.
    pub path: PathBuf,
    /// Index into [`Dataset::classes`].
    pub label: usize,
}

/// A labelled list of image files with the class names that index the labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// Class folder names in sorted order; `classes[label]` names a label.
    pub classes: Vec<String>,
    /// The samples, in `ImageFolder` order (or label-list order for a label list).
    pub samples: Vec<Sample>,
}

fn has_image_extension(name: &str) -> bool {
    let lower = name.to_lowercase();
    IMG_EXTENSIONS.iter().any(|e| lower.ends_with(e))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |err| DataError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// Files of `dir` and its sub-folders (following links) in the order of Python's
/// `sorted(os.walk(dir))` then `sorted(fnames)`: folders by their full path string, files by name.
fn walk_sorted(dir: &Path) -> DataResult<Vec<PathBuf>> {
    let mut dirs: Vec<(String, PathBuf)> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut files_of: HashMap<PathBuf, Vec<String>> = HashMap::new();
    while let Some(d) = stack.pop() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let entry = entry.map_err(io_err(&d))?;
            let p = entry.path();
            // metadata() follows symbolic links, as os.walk(followlinks=True) does.
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(_) => files.push(entry.file_name().to_string_lossy().into_owned()),
                // A dangling link is a file to os.walk; keep it so it is reported when read.
                Err(_) => files.push(entry.file_name().to_string_lossy().into_owned()),
            }
        }
        files.sort();
        dirs.push((d.to_string_lossy().into_owned(), d.clone()));
        files_of.insert(d, files);
    }
    dirs.sort();
    let mut out = Vec::new();
    for (_, d) in dirs {
        if let Some(files) = files_of.remove(&d) {
            for f in files {
                if has_image_extension(&f) {
                    out.push(d.join(f));
                }
            }
        }
    }
    Ok(out)
}

impl Dataset {
    /// Reads `dir/<class>/**/<image>` as `torchvision.datasets.ImageFolder(dir)` does. Errors if
    /// the folder is missing, has no class folder, or if any class holds no image (listing them).
    pub fn image_folder(dir: &Path) -> DataResult<Dataset> {
        if !dir.is_dir() {
            return Err(DataError::MissingFolder {
                path: dir.to_path_buf(),
            });
        }
        let mut classes = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            if std::fs::metadata(entry.path())
                .map(|m| m.is_dir())
                .unwrap_or(false)
            {
                classes.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(DataError::NoClasses {
                path: dir.to_path_buf(),
            });
        }
        let mut samples = Vec::new();
        let mut empty = Vec::new();
        for (label, c) in classes.iter().enumerate() {
            let files = walk_sorted(&dir.join(c))?;
            if files.is_empty() {
                empty.push(c.clone());
            }
            samples.extend(files.into_iter().map(|path| Sample { path, label }));
        }
        if !empty.is_empty() {
            return Err(DataError::EmptyClasses {
                path: dir.to_path_buf(),
                count: empty.len(),
                first: first_few(&empty, 5),
                exts: IMG_EXTENSIONS.join(" "),
            });
        }
        Ok(Dataset { classes, samples })
    }

    /// The labelled subset named by a SimCLR-style list (one train file name a line, e.g.
    /// `n04235860_14959.JPEG`; the class is the part before `_`, the file is
    /// `train/<class>/<name>`), with the class indices of `train`. Every listed file must be in
    /// `train`; missing ones are reported, the first few by name.
    pub fn from_label_list(train: &Dataset, train_dir: &Path, list: &Path) -> DataResult<Dataset> {
        let text = std::fs::read_to_string(list).map_err(io_err(list))?;
        let class_idx: HashMap<&str, usize> = train
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let present: std::collections::HashSet<&Path> =
            train.samples.iter().map(|s| s.path.as_path()).collect();
        let mut samples = Vec::new();
        let mut missing = Vec::new();
        for (ln, line) in text.lines().enumerate() {
            let name = line.trim();
            if name.is_empty() {
                continue;
            }
            let Some((wnid, _)) = name.split_once('_') else {
                return Err(DataError::LabelList {
                    path: list.to_path_buf(),
                    line: ln + 1,
                    detail: format!("{name:?} has no '_' separating the class from the file id"),
                });
            };
            let path = train_dir.join(wnid).join(name);
            match class_idx.get(wnid) {
                Some(&label) if present.contains(path.as_path()) => {
                    samples.push(Sample { path, label })
                }
                _ => missing.push(name.to_string()),
            }
        }
        if !missing.is_empty() {
            return Err(DataError::MissingListed {
                list: list.to_path_buf(),
                root: train_dir.to_path_buf(),
                count: missing.len(),
                first: first_few(&missing, 5),
            });
        }
        if samples.is_empty() {
            return Err(DataError::LabelList {
                path: list.to_path_buf(),
                line: 0,
                detail: "the label list names no file".into(),
            });
        }
        Ok(Dataset {
            classes: train.classes.clone(),
            samples,
        })
    }

    /// `labels_per_class N`: N samples of every class, drawn without replacement by a seeded
    /// shuffle of each class (the FixMatch protocol: 4/25/100 labels per class on CIFAR-100).
    /// Errors if a class has fewer than N samples.
    pub fn subset_per_class(&self, n: usize, seed: u64) -> DataResult<Dataset> {
        self.stratified(seed, |class, avail| {
            if avail < n {
                Err(DataError::Invalid(format!(
                    "labels_per_class {n}: class {class:?} has only {avail} images"
                )))
            } else {
                Ok(n)
            }
        })
    }

    /// `labels_perc P`: P % of every class (rounded, at least one image a class), drawn by a
    /// seeded shuffle of each class. Stratifying keeps every class labelled, as the ImageNet
    /// 1 %/10 % lists do (12–13 / 128–129 images a class).
    pub fn subset_percent(&self, percent: f64, seed: u64) -> DataResult<Dataset> {
        if !(percent > 0.0 && percent <= 100.0) {
            return Err(DataError::Invalid(format!(
                "labels_perc {percent}: must be in (0, 100]"
            )));
        }
        self.stratified(seed, |_, avail| {
            Ok(((avail as f64 * percent / 100.0).round() as usize).clamp(1, avail))
        })
    }

    fn stratified(
        &self,
        seed: u64,
        count: impl Fn(&str, usize) -> DataResult<usize>,
    ) -> DataResult<Dataset> {
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); self.classes.len()];
        for (i, s) in self.samples.iter().enumerate() {
            if let Some(v) = by_class.get_mut(s.label) {
                v.push(i);
            }
        }
        let root = Rng::new(seed).fork(SUBSET_STREAM);
        let mut chosen = Vec::new();
        for (c, idx) in by_class.iter().enumerate() {
            let k = count(&self.classes[c], idx.len())?;
            let perm = root.fork(c as u64).permutation(idx.len());
            chosen.extend(perm.into_iter().take(k).map(|p| idx[p]));
        }
        chosen.sort_unstable();
        Ok(Dataset {
            classes: self.classes.clone(),
            samples: chosen
                .into_iter()
                .map(|i| self.samples[i].clone())
                .collect(),
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when there is no sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Stream id of the label-subset draw (distinct from the loader's streams).
const SUBSET_STREAM: u64 = 0x5B5E_7000;

/// The three sets of a semi-supervised ImageNet-layout run.
#[derive(Clone, Debug)]
pub struct SemiSupervised {
    /// All of `train/` (the unlabelled set includes the labelled images, as in the official code).
    pub unlabelled: Dataset,
    /// The labelled subset.
    pub labelled: Dataset,
    /// `val/` (or `test/`), when present.
    pub val: Option<Dataset>,
}

/// How the labelled subset is chosen.
#[derive(Clone, Debug)]
pub enum LabelSpec {
    /// A SimCLR-style list of train file names (`1percent.txt`, `10percent.txt`).
    List(PathBuf),
    /// `labels_perc P` with a seed.
    Percent(f64, u64),
    /// `labels_per_class N` with a seed.
    PerClass(usize, u64),
    /// Every train image is labelled (supervised baseline).
    All,
}

impl SemiSupervised {
    /// Reads `<root>/train` (required) and `<root>/val` or `<root>/test` (optional) and picks
    /// the labelled subset.
    pub fn open(root: &Path, labels: &LabelSpec) -> DataResult<SemiSupervised> {
        if !root.is_dir() {
            return Err(DataError::MissingFolder {
                path: root.to_path_buf(),
            });
        }
        let train_dir = root.join("train");
        let unlabelled = Dataset::image_folder(&train_dir)?;
        let labelled = match labels {
            LabelSpec::List(p) => Dataset::from_label_list(&unlabelled, &train_dir, p)?,
            LabelSpec::Percent(p, seed) => unlabelled.subset_percent(*p, *seed)?,
            LabelSpec::PerClass(n, seed) => unlabelled.subset_per_class(*n, *seed)?,
            LabelSpec::All => unlabelled.clone(),
        };
        // ImageNet names its held-out split `val/`; CIFAR-style folders (and the embedded
        // default set) name it `test/`.
        let val = match ["val", "test"]
            .iter()
            .map(|d| root.join(d))
            .find(|d| d.is_dir())
        {
            Some(dir) => Some(Dataset::image_folder(&dir)?),
            None => None,
        };
        Ok(SemiSupervised {
            unlabelled,
            labelled,
            val,
        })
    }
}

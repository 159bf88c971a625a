//! Errors of the data pipeline. They name the file, folder or list line at fault, because a user
//! with a 1.2-million-file dataset must be able to find the one bad entry without a debugger.

use std::path::PathBuf;
use thiserror::Error;

/// Errors raised while scanning datasets, reading label lists or decoding images.
#[derive(Debug, Error)]
pub enum DataError {
    /// A file or folder could not be read.
    #[error("{path}: {err}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error (in the message, not a separate `source`, so that
        /// error chains print it once).
        err: std::io::Error,
    },
    /// A file is not a decodable JPEG or PNG (corrupt, truncated, empty, or another format).
    #[error("{path}: cannot decode image: {detail}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        detail: String,
    },
    /// A dataset folder (`train/`, `val/`, the root) does not exist.
    #[error("{path}: dataset folder not found (expected an ImageNet-style layout <root>/{{train,val}}/<class>/<image>)")]
    MissingFolder {
        /// The folder that was looked for.
        path: PathBuf,
    },
    /// A dataset folder has no class sub-folders.
    #[error("{path}: no class folders found (expected <class>/<image> inside)")]
    NoClasses {
        /// The folder.
        path: PathBuf,
    },
    /// Some class folders contain no file with a supported extension (torchvision's ImageFolder
    /// refuses these too, as the class index would then point at nothing).
    #[error("{path}: {count} class folder(s) contain no image file (extensions {exts}): {first}")]
    EmptyClasses {
        /// The dataset folder.
        path: PathBuf,
        /// How many classes are empty.
        count: usize,
        /// The first few empty classes, comma-separated.
        first: String,
        /// The accepted extensions.
        exts: String,
    },
    /// Names in a label list that the train folder does not hold.
    #[error("{list}: {count} listed file(s) not found under {root}: {first}")]
    MissingListed {
        /// The label list.
        list: PathBuf,
        /// The train folder.
        root: PathBuf,
        /// How many are missing.
        count: usize,
        /// The first few, comma-separated.
        first: String,
    },
    /// A malformed line in a label list.
    #[error("{path}:{line}: {detail}")]
    LabelList {
        /// The label list.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// An option of the pipeline is out of range (batch size 0, a scale range upside down, ...).
    #[error("invalid data option: {0}")]
    Invalid(String),
}

impl From<DataError> for crate::Error {
    fn from(e: DataError) -> Self {
        match e {
            DataError::Io { path, err } => crate::Error::Io {
                path: path.display().to_string(),
                err,
            },
            other => crate::Error::Format {
                path: String::new(),
                detail: other.to_string(),
            },
        }
    }
}

/// Shorthand for results of the data pipeline.
pub type DataResult<T> = std::result::Result<T, DataError>;

/// "a, b, c (and 7 more)": the first few items of a list for an error message.
pub(crate) fn first_few<S: AsRef<str>>(items: &[S], n: usize) -> String {
    let mut s = items
        .iter()
        .take(n)
        .map(|x| x.as_ref().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > n {
        s.push_str(&format!(" (and {} more)", items.len() - n));
    }
    s
}

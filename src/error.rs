//! The library's error type. Every fallible engine call returns [`Result`]; the CLI adds context.

use thiserror::Error;

/// Errors raised by the engine library.
#[derive(Debug, Error)]
pub enum Error {
    /// An op was given tensors whose shapes do not fit together.
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    /// An op was given a parameter it cannot work with (stride 0, eps < 0, ...).
    #[error("{op}: invalid argument: {detail}")]
    Invalid { op: &'static str, detail: String },
    /// A tensor lives on a device this code path cannot read.
    #[error("{op}: tensor is on {found}, expected {expected}")]
    Device {
        op: &'static str,
        found: String,
        expected: String,
    },
    /// A file could not be read or written. (The I/O error is part of the message, not a
    /// separate `source`, so that error chains print it once.)
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    /// A tensor file (safetensors) is malformed, truncated or lacks an entry.
    #[error("{path}: {detail}")]
    Format { path: String, detail: String },
}

/// Shorthand for results of the engine library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A shape error for `op`, with a message that names the shapes involved.
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape {
            op,
            detail: detail.into(),
        }
    }

    /// An invalid-argument error for `op`.
    pub fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            detail: detail.into(),
        }
    }
}

/// The message of a caught panic (`catch_unwind`'s payload: a `String` or a `&str`), for the
/// places that turn a panic inside a library binding into an [`Error`].
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

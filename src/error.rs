//! The crate's error type. Every user-facing failure is one line that names the file (when there is
//! one) and what is wrong with it; nothing in the library panics on bad input.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem with a named file: missing, unreadable, corrupt, contradicting its config.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// Shapes that do not fit an operation.
    #[error("shape error: {0}")]
    Shape(String),
    /// A device that cannot be used or failed (no CUDA driver, backend not built, a driver,
    /// allocation, module or launch error).
    #[error("device error: {0}")]
    Device(String),
    /// Anything else worth one line.
    #[error("{0}")]
    Msg(String),
    /// The user interrupted the work (Ctrl-C) after it saved what it could; the command exits
    /// with 130, as a shell reports SIGINT.
    #[error("{0}")]
    Interrupted(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::File { path: path.as_ref().to_path_buf(), msg: msg.to_string() }
    }
    pub fn msg(msg: impl std::fmt::Display) -> Self {
        Error::Msg(msg.to_string())
    }
    pub fn device(msg: impl std::fmt::Display) -> Self {
        Error::Device(msg.to_string())
    }
    /// The message without the kind's prefix ("shape error: ", "device error: "); a file error
    /// keeps its path ("path: message").
    pub fn message(&self) -> String {
        match self {
            Error::File { .. } => self.to_string(),
            Error::Shape(m) | Error::Device(m) | Error::Msg(m) | Error::Interrupted(m) => m.clone(),
        }
    }
    /// The same kind of error with `what: ` in front of its message.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        match self {
            Error::File { path, msg } => Error::File { path, msg: format!("{what}: {msg}") },
            Error::Shape(m) => Error::Shape(format!("{what}: {m}")),
            Error::Device(m) => Error::Device(format!("{what}: {m}")),
            Error::Msg(m) => Error::Msg(format!("{what}: {m}")),
            Error::Interrupted(m) => Error::Interrupted(format!("{what}: {m}")),
        }
    }
}

/// `bail!`-style helpers for shape checks.
#[macro_export]
macro_rules! shape_err {
    ($($t:tt)*) => { $crate::error::Error::Shape(format!($($t)*)) };
}

//! One error type for the library crates. Every variant names what it is about (a file, a
//! recipe field, a tensor) so a user can act on the message without reading code.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Recipe(String),
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
    pub fn tensor(name: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.to_string(),
        }
    }
    pub fn invalid(msg: impl std::fmt::Display) -> Self {
        Error::Invalid(msg.to_string())
    }
}

/// `bail!`-style early return with an [`Error::Invalid`].
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { return Err($crate::Error::Invalid(format!($($arg)*))) };
}

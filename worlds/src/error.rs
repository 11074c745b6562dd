//! The crate's error type. Every variant names the file, line or prompt it is about, so a user
//! can act on the message without reading code.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {msg}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: {source}", path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("prompt `{prompt}`: {msg}")]
    Prompt { prompt: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn parse(
        path: impl Into<PathBuf>,
        line: usize,
        msg: impl std::fmt::Display,
    ) -> Self {
        Error::Parse {
            path: path.into(),
            line,
            msg: msg.to_string(),
        }
    }
    pub(crate) fn prompt(prompt: &str, msg: impl std::fmt::Display) -> Self {
        Error::Prompt {
            prompt: prompt.to_string(),
            msg: msg.to_string(),
        }
    }
}

//! The JSON files that come with a model (diffusers / transformers `config.json`,
//! `model_index.json`, `scheduler_config.json`, PEFT's `adapter_config.json`, tokenizer
//! configs): one reader for all of them, so that every error names the file, the field path
//! and what was expected (`unet/config.json: field `layers_per_block`: invalid type: string
//! "eight", expected i64`), as recipe errors do, and so that a file of gigabytes is refused
//! before it is read rather than exhausting memory.
use std::io::Read;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// The largest config file read. Real ones are kilobytes (a sharded weight index of a large
/// model a few megabytes); anything bigger is not a config.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// The largest tokenizer file (tokenizer.json, vocab.json, spiece.model) read: the biggest
/// published vocabularies are tens of megabytes.
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// The text of `path`, refused when it holds more than `max` bytes (checked before reading,
/// and again while reading, so a file that grows underneath does not get past it).
pub fn read_text(path: &Path, max: u64) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let len = file.metadata().map_err(|e| Error::file(path, e))?.len();
    if len > max {
        return Err(too_big(path, len, max));
    }
    let mut text = String::with_capacity(len as usize);
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::file(path, e))?;
    if text.len() as u64 > max {
        return Err(too_big(path, text.len() as u64, max));
    }
    Ok(text)
}

fn too_big(path: &Path, len: u64, max: u64) -> Error {
    Error::file(
        path,
        format!(
            "{len} bytes is more than a file of this kind holds (at most {max}); refusing to read it"
        ),
    )
}

/// `path` parsed as JSON (size-capped); a syntax error names the file, line and column.
pub fn read_value(path: &Path) -> Result<serde_json::Value> {
    parse_value(path, &read_text(path, MAX_CONFIG_BYTES)?)
}

/// `text` (the contents of `path`) parsed as JSON.
pub fn parse_value(path: &Path, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))
}

/// `value` as a `T`; the error names the field that does not fit (`field `a.b[2]`: ...`).
/// Without a file name: callers that know the file wrap it with [`Error::file`].
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        FieldError {
            field: (path != ".").then_some(path),
            message: e.into_inner().to_string(),
        }
    })
}

/// `path` (a JSON config) as a `T`, every error naming the file and the field.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    from_value(read_value(path)?).map_err(|e| Error::file(path, e))
}

/// A value that does not deserialize, with the dotted path of the field that failed.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for FieldError {}

impl From<FieldError> for Error {
    fn from(e: FieldError) -> Self {
        Error::Invalid(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        layers_per_block: i64,
        #[serde(default)]
        blocks: Vec<Inner>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        channels: u32,
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let cases = [
            (
                r#"{"layers_per_block": "eight"}"#,
                r#"field `layers_per_block`: invalid type: string "eight", expected i64"#,
            ),
            (
                r#"{"layers_per_block": 2, "blocks": [{"channels": 1}, {"channels": -3}]}"#,
                "field `blocks[1].channels`: invalid value: integer `-3`",
            ),
            (
                r#"{"layers_per_block": 2, "layers_per_blok": 3}"#,
                "unknown field `layers_per_blok`",
            ),
            (r#"{}"#, "missing field `layers_per_block`"),
            (r#"{"layers_per_block": 2,"#, "not valid JSON"),
        ];
        for (text, want) in cases {
            std::fs::write(&p, text).unwrap();
            let err = read::<Cfg>(&p).unwrap_err().to_string();
            assert!(err.starts_with(&p.display().to_string()), "{err}");
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn a_file_of_gigabytes_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        // Sparse: claims 4 GiB, occupies nothing.
        std::fs::File::create(&p).unwrap().set_len(4 << 30).unwrap();
        let err = read_text(&p, MAX_TOKENIZER_BYTES).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("4294967296 bytes"),
            "{err}"
        );
    }
}

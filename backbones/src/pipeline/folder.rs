//! A diffusers pipeline folder: `model_index.json` naming its components, and the fingerprint
//! of whatever in it decides an encoding (configs, weight contents, tokenizer files).
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use softalign_core::{json_file, Error, Result};

use super::content_digest::content_sha256;
use crate::weights::weight_files;

#[derive(Debug, Clone)]
pub struct PipelineFolder {
    pub root: PathBuf,
    pub index: serde_json::Value,
}

impl PipelineFolder {
    /// The folder when it holds a model_index.json, else None (a bare model folder).
    pub fn open(root: &Path) -> Result<Option<Self>> {
        let path = root.join("model_index.json");
        if !path.is_file() {
            return Ok(None);
        }
        let index = json_file::read_value(&path)?;
        if !index.is_object() {
            return Err(Error::file(&path, "not a JSON object"));
        }
        Ok(Some(Self {
            root: root.to_path_buf(),
            index,
        }))
    }

    /// A component's folder when model_index.json names it (not `[null, null]`, as diffusers
    /// writes a deliberately absent optional component, e.g. SD3 without T5); `None` when it is
    /// not named. A named component whose folder is missing is an error (a partial download):
    /// quietly dropping it would condition on something other than the user's model.
    pub fn component(&self, name: &str) -> Result<Option<PathBuf>> {
        let Some(entry) = self.index.get(name) else {
            return Ok(None);
        };
        if entry.is_null()
            || entry
                .as_array()
                .is_some_and(|a| a.iter().all(|v| v.is_null()))
        {
            return Ok(None);
        }
        let dir = self.root.join(name);
        if dir.is_dir() {
            return Ok(Some(dir));
        }
        Err(Error::file(
            &dir,
            format!(
                "model_index.json lists the component `{name}` but its folder is missing (an \
                 incomplete download?); download it, or write `\"{name}\": [null, null]` in \
                 model_index.json to leave it out on purpose"
            ),
        ))
    }

    /// A component the pipeline cannot work without.
    pub fn require(&self, name: &str) -> Result<PathBuf> {
        self.component(name)?.ok_or_else(|| {
            Error::file(
                self.root.join("model_index.json"),
                format!("the pipeline has no `{name}` component, which it needs"),
            )
        })
    }

    /// Both folders of a text encoder + tokenizer pair, or neither; one without the other is
    /// an error (the encoder cannot run without its tokenizer, and vice versa).
    pub fn text_pair(&self, encoder: &str, tokenizer: &str) -> Result<Option<(PathBuf, PathBuf)>> {
        match (self.component(encoder)?, self.component(tokenizer)?) {
            (Some(e), Some(t)) => Ok(Some((e, t))),
            (None, None) => Ok(None),
            (have, _) => {
                let (has, lacks) = if have.is_some() {
                    (encoder, tokenizer)
                } else {
                    (tokenizer, encoder)
                };
                Err(Error::file(
                    self.root.join("model_index.json"),
                    format!("lists `{has}` but not `{lacks}`; a text encoder needs both"),
                ))
            }
        }
    }

    pub fn class_name(&self) -> Option<&str> {
        self.index.get("_class_name")?.as_str()
    }

    /// A pipeline config value registered in model_index.json (e.g.
    /// `force_zeros_for_empty_prompt`); one that is not true or false is an error naming it.
    pub fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.index.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Error::file(
                self.root.join("model_index.json"),
                format!("field `{key}`: expected true or false, got {other}"),
            )),
        }
    }
}

/// `model_max_length` of a tokenizer folder's tokenizer_config.json (what diffusers pads CLIP
/// prompts to), else 77. transformers writes a huge sentinel when the length is unknown.
pub fn tokenizer_max_length(dir: &Path) -> Result<usize> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(77);
    }
    let json = json_file::read_value(&path)?;
    match json.get("model_max_length") {
        None | Some(serde_json::Value::Null) => Ok(77),
        // A float is transformers' "unknown" sentinel (1e30), as are absurd integers.
        Some(serde_json::Value::Number(n)) => {
            Ok(n.as_u64().filter(|&n| n > 1 && n < 1 << 20).unwrap_or(77) as usize)
        }
        Some(other) => Err(Error::file(
            &path,
            format!("field `model_max_length`: expected a number, got {other}"),
        )),
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// A weight file by its content: SHA-256 of every byte (remembered beside the file, see
/// [`content_sha256`]) and its size. Two encoders with the same shapes but other weights differ
/// here, so an encoding cache made with one is refused by the other.
fn weights_digest(path: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "file": path.file_name().map(|s| s.to_string_lossy().to_string()),
        "sha256": content_sha256(path)?,
        "bytes": std::fs::metadata(path).map_err(|e| Error::file(path, e))?.len(),
    }))
}

/// config.json and the weights (`stem*.safetensors`) of a model folder.
pub fn model_digest(dir: &Path, stem: &str) -> Result<serde_json::Value> {
    let weights = weight_files(dir, stem)?
        .iter()
        .map(|f| weights_digest(f))
        .collect::<Result<Vec<_>>>()?;
    Ok(serde_json::json!({
        "config_sha256": sha256_file(&dir.join("config.json"))?,
        "weights": weights,
    }))
}

/// Every tokenizer file that changes ids (vocabulary, merges, tokenizer.json, special tokens).
pub fn tokenizer_digest(dir: &Path) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for name in [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "spiece.model",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "added_tokens.json",
    ] {
        let p = dir.join(name);
        if p.is_file() {
            out.insert(name.into(), sha256_file(&p)?.into());
        }
    }
    if out.is_empty() {
        return Err(Error::file(dir, "holds no tokenizer files"));
    }
    Ok(out.into())
}

//! A diffusers pipeline folder: `model_index.json` naming its components, and the fingerprint
//! of whatever in it decides an encoding (configs, weight headers and sizes, tokenizer files).
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use softalign_core::{Error, Result};

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
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
        let index = serde_json::from_str(&text)
            .map_err(|e| Error::file(&path, format!("not JSON: {e}")))?;
        Ok(Some(Self {
            root: root.to_path_buf(),
            index,
        }))
    }

    /// A component's folder when model_index.json names it (not `[null, null]`, as diffusers
    /// writes an absent optional component) and the folder exists.
    pub fn component(&self, name: &str) -> Option<PathBuf> {
        let entry = self.index.get(name)?.as_array()?;
        if entry.iter().all(|v| v.is_null()) {
            return None;
        }
        let dir = self.root.join(name);
        dir.is_dir().then_some(dir)
    }

    /// A component model_index.json names but the folder lacks: a broken download.
    pub fn require(&self, name: &str) -> Result<PathBuf> {
        self.component(name).ok_or_else(|| {
            Error::file(
                &self.root,
                format!("the pipeline has no `{name}` component (model_index.json + folder)"),
            )
        })
    }

    pub fn class_name(&self) -> Option<&str> {
        self.index.get("_class_name")?.as_str()
    }

    /// A pipeline config value registered in model_index.json (e.g.
    /// `force_zeros_for_empty_prompt`).
    pub fn flag(&self, key: &str) -> Option<bool> {
        self.index.get(key)?.as_bool()
    }
}

/// `model_max_length` of a tokenizer folder's tokenizer_config.json (what diffusers pads CLIP
/// prompts to), else 77. transformers writes a huge sentinel when the length is unknown.
pub fn tokenizer_max_length(dir: &Path) -> Result<usize> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(77);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not JSON: {e}")))?;
    Ok(json
        .get("model_max_length")
        .and_then(|v| v.as_u64())
        .filter(|&n| n > 1 && n < 1 << 20)
        .unwrap_or(77) as usize)
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// A safetensors file without reading its tensors: the digest of its header (names, dtypes,
/// shapes, offsets) and its size. A re-saved checkpoint with other values but identical layout
/// keeps the same digest; that trade keeps fingerprinting a 10 GB encoder instant.
fn safetensors_digest(path: &Path) -> Result<serde_json::Value> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let size = f.metadata().map_err(|e| Error::file(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| Error::file(path, e))?;
    let n = u64::from_le_bytes(n);
    if n > size.saturating_sub(8) {
        return Err(Error::file(path, "not a safetensors file (header length)"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| Error::file(path, e))?;
    Ok(serde_json::json!({
        "file": path.file_name().map(|s| s.to_string_lossy().to_string()),
        "header_sha256": format!("{:x}", Sha256::digest(&header)),
        "bytes": size,
    }))
}

/// config.json and the weights (`stem*.safetensors`) of a model folder.
pub fn model_digest(dir: &Path, stem: &str) -> Result<serde_json::Value> {
    let weights = weight_files(dir, stem)?
        .iter()
        .map(|f| safetensors_digest(f))
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

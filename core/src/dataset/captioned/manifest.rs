//! A generic manifest: one JSON object per line, `{"image": "path", "captions": ["...", ...]}`
//! (or `"caption": "..."`); image paths relative to the manifest's folder.
use std::path::Path;

use serde::Deserialize;

use super::Entry;
use crate::{Error, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    image: String,
    #[serde(default)]
    captions: Vec<String>,
    #[serde(default)]
    caption: Option<String>,
}

pub fn read(path: &Path) -> Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let root = path.parent().unwrap_or(Path::new("."));
    let mut entries = Vec::new();
    for (k, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| Error::file(path, format!("line {}: {msg}", k + 1));
        let l: Line = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        let mut captions = l.captions;
        captions.extend(l.caption);
        if captions.is_empty() {
            return Err(at(format!("`{}` has no `captions` / `caption`", l.image)));
        }
        entries.push(Entry {
            image: root.join(&l.image),
            captions,
        });
    }
    if entries.is_empty() {
        return Err(Error::file(path, "the manifest lists no images"));
    }
    Ok(entries)
}

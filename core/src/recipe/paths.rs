//! Relative paths in a recipe resolve against the file that wrote them: a base recipe's
//! `path = "models/x"` means the base's folder even when a child in another folder extends it,
//! and a `--set data.path=cache/x` means the working directory the command runs in. Paths are
//! made absolute as each file is read, before merging, so errors show them absolute and a
//! run's recipe.json repeats the run from anywhere.
use std::path::{Component, Path, PathBuf};

use toml::{Table, Value};

/// Keys whose string values are file system paths, in any plugin table: backbone `path` and
/// `unet`, an init `file`, data `path` / `annotations` / `images` / `tokenizer`. A plugin that
/// names a path field otherwise resolves it with `BuildContext::resolve` (against the folder
/// of the recipe named on the command line). `logging.wandb.python` is left alone: a bare
/// `python3` is looked up on PATH.
pub const PATH_KEYS: [&str; 6] = ["path", "unet", "file", "annotations", "images", "tokenizer"];

/// `p` made absolute against `base` (itself made absolute against the working directory),
/// with `.` and `..` folded away so errors read cleanly.
pub fn absolute(p: &Path, base: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::path::absolute(base)
            .unwrap_or_else(|_| base.to_path_buf())
            .join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push(c);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Whether `value` under `key` is a path to resolve.
fn is_path(key: &str, value: &Value) -> bool {
    PATH_KEYS.contains(&key) && value.is_str()
}

/// Every relative path value in `table` (nested tables and arrays of tables included) made
/// absolute against `base`.
pub fn absolutize(table: &mut Table, base: &Path) {
    for (k, v) in table.iter_mut() {
        absolutize_value(k, v, base);
    }
}

fn absolutize_value(key: &str, v: &mut Value, base: &Path) {
    if is_path(key, v) {
        let s = v.as_str().unwrap_or_default();
        if !s.is_empty() {
            *v = Value::String(absolute(Path::new(s), base).to_string_lossy().into_owned());
        }
        return;
    }
    match v {
        Value::Table(t) => absolutize(t, base),
        Value::Array(items) => {
            for item in items {
                if let Value::Table(t) = item {
                    absolutize(t, base);
                }
            }
        }
        _ => {}
    }
}

/// A `--set key.path=value` override's value, resolved against the working directory when
/// its last key names a path.
pub fn absolutize_override(key: &str, value: &mut Value) {
    let last = key.rsplit('.').next().unwrap_or(key);
    absolutize_value(last, value, Path::new("."));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_against_their_file_and_fold_dots() {
        let mut t: Table = toml::from_str(
            r#"
            name = "x"
            [backbone]
            path = "../models/sd3"
            [[adapter]]
            init = { kind = "embedding", file = "./e.safetensors", tensor = "bos" }
            [data]
            source = { type = "coco", annotations = "/abs/a.json", images = "img" }
            "#,
        )
        .unwrap();
        absolutize(&mut t, Path::new("/r/recipes"));
        assert_eq!(t["backbone"]["path"].as_str(), Some("/r/models/sd3"));
        assert_eq!(
            t["adapter"][0]["init"]["file"].as_str(),
            Some("/r/recipes/e.safetensors")
        );
        assert_eq!(t["data"]["source"]["annotations"].as_str(), Some("/abs/a.json"));
        assert_eq!(t["data"]["source"]["images"].as_str(), Some("/r/recipes/img"));
        assert_eq!(t["name"].as_str(), Some("x"));
    }
}

//! Relative paths in a recipe resolve against the file that wrote them: a base recipe's
//! `path = "models/x"` means the base's folder even when a child in another folder extends it,
//! and a `--set data.path=cache/x` means the working directory the command runs in. Paths are
//! made absolute as each file is read, before merging, so errors show them absolute and a
//! run's recipe.json repeats the run from anywhere. A backbone `path` / `unet` that names no
//! folder but reads as a Hugging Face hub id (`org/name`) is left as written.
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
    // `Path::parent` of a bare file name is "", which `absolute` refuses: it means ".".
    let base = if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    };
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

/// Keys that may name a Hugging Face hub model id instead of a folder.
pub const MODEL_KEYS: [&str; 2] = ["path", "unet"];

/// Whether `s` reads as a hub model id, `org/name` (optionally `/subfolder...`): relative,
/// at least two plain components, none starting with a dot.
pub fn looks_like_hub_id(s: &str) -> bool {
    let p = Path::new(s);
    let parts: Vec<_> = p.components().collect();
    !p.is_absolute()
        && parts.len() >= 2
        && parts.iter().all(|c| match c {
            Component::Normal(n) => !n.to_string_lossy().starts_with('.'),
            _ => false,
        })
}

/// Whether `value` under `key` is a path to resolve against `base`. In the backbone table
/// (`hub_ok`), a model key whose value reads as a hub id and names nothing under `base` stays
/// as written: the backbone looks it up in the local hub cache.
fn is_path(key: &str, value: &Value, base: &Path, hub_ok: bool) -> bool {
    let Some(s) = value.as_str().filter(|_| PATH_KEYS.contains(&key)) else {
        return false;
    };
    !(hub_ok && MODEL_KEYS.contains(&key) && looks_like_hub_id(s) && !base.join(s).exists())
}

/// Every relative path value in `table` (nested tables and arrays of tables included) made
/// absolute against `base`.
pub fn absolutize(table: &mut Table, base: &Path) {
    for (k, v) in table.iter_mut() {
        match v {
            Value::Table(t) if k == "backbone" => absolutize_table(t, base, true),
            _ => absolutize_value(k, v, base, false),
        }
    }
}

fn absolutize_table(table: &mut Table, base: &Path, hub_ok: bool) {
    for (k, v) in table.iter_mut() {
        absolutize_value(k, v, base, hub_ok);
    }
}

fn absolutize_value(key: &str, v: &mut Value, base: &Path, hub_ok: bool) {
    if is_path(key, v, base, hub_ok) {
        let s = v.as_str().unwrap_or_default();
        if !s.is_empty() {
            *v = Value::String(absolute(Path::new(s), base).to_string_lossy().into_owned());
        }
        return;
    }
    match v {
        Value::Table(t) => absolutize_table(t, base, false),
        Value::Array(items) => {
            for item in items {
                if let Value::Table(t) = item {
                    absolutize_table(t, base, false);
                }
            }
        }
        _ => {}
    }
}

/// A `--set key.path=value` override's value, resolved against the working directory when
/// its last key names a path.
pub fn absolutize_override(key: &str, value: &mut Value) {
    let mut segs: Vec<&str> = key.split('.').collect();
    let last = segs.pop().unwrap_or(key);
    let hub_ok = segs == ["backbone"];
    absolutize_value(last, value, Path::new("."), hub_ok);
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
        assert_eq!(
            t["data"]["source"]["annotations"].as_str(),
            Some("/abs/a.json")
        );
        assert_eq!(
            t["data"]["source"]["images"].as_str(),
            Some("/r/recipes/img")
        );
        assert_eq!(t["name"].as_str(), Some("x"));
    }

    #[test]
    fn hub_ids_that_name_no_folder_stay_as_written() {
        let mut t: Table = toml::from_str(
            r#"
            [backbone]
            path = "stabilityai/stable-diffusion-3-medium-diffusers"
            [data]
            path = "data/train.jsonl"
            "#,
        )
        .unwrap();
        absolutize(&mut t, Path::new("/nowhere/recipes"));
        assert_eq!(
            t["backbone"]["path"].as_str(),
            Some("stabilityai/stable-diffusion-3-medium-diffusers")
        );
        assert_eq!(
            t["data"]["path"].as_str(),
            Some("/nowhere/recipes/data/train.jsonl")
        );
        assert!(looks_like_hub_id("org/name/unet"));
        assert!(!looks_like_hub_id("./org/name"));
        assert!(!looks_like_hub_id("/abs/name"));
        assert!(!looks_like_hub_id("single"));
        // A bare recipe file name's folder is "": the working directory.
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(absolute(Path::new("x/y"), Path::new("")), cwd.join("x/y"));
    }
}

//! From a recipe's `path` to the model folder: a folder, or a Hugging Face hub id
//! (`org/name`) found offline in the local hub cache; what the path holds when it is not the
//! model a backbone asked for (no folder, a pipeline of another type); and, for
//! `recipe check` on a machine without the weights, the preset its name points at.
use std::path::{Path, PathBuf};

use softalign_core::plugin::BuildContext;
use softalign_core::recipe::paths::looks_like_hub_id;
use softalign_core::{Error, Result};

/// The hub cache as huggingface_hub finds it: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// The snapshot folder of hub model `id` (`org/name`, optionally `/subfolder...`) at
/// `revision` (a branch or tag under `refs/`, or a commit; default `main`) in the local hub
/// cache. Nothing is downloaded; the error says where it looked.
pub fn hub_snapshot(id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() < 2 {
        return Err(Error::invalid(format!("`{id}` is not a hub id (org/name)")));
    }
    let (repo, sub) = parts.split_at(2);
    let revision = revision.unwrap_or("main");
    let Some(cache) = hub_cache() else {
        return Err(Error::invalid(format!(
            "`{id}` is not a model in the local Hugging Face hub cache: there is none (set \
             HF_HOME or HF_HUB_CACHE)"
        )));
    };
    let repo_dir = cache.join(format!("models--{}--{}", repo[0], repo[1]));
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let dir = sub
        .iter()
        .fold(repo_dir.join("snapshots").join(&commit), |d, s| d.join(s));
    if dir.is_dir() {
        return Ok(dir);
    }
    Err(Error::invalid(format!(
        "`{id}` is not a model in the local Hugging Face hub cache either (looked for \
         revision `{revision}` in {}); softalign never downloads: fetch it first \
         (`huggingface-cli download {}/{}`), or give the folder's path",
        repo_dir.display(),
        repo[0],
        repo[1]
    )))
}

/// The folder a backbone's `path` names: the path itself (against the recipe) where it
/// exists, else, when it reads as a hub id, that model's snapshot in the local hub cache,
/// else the path (for the caller to report as not found).
pub fn locate(ctx: &BuildContext, p: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let resolved = ctx.resolve(p);
    let text = p.to_string_lossy();
    if resolved.exists() || !looks_like_hub_id(&text) {
        return Ok(resolved);
    }
    hub_snapshot(&text, revision).map_err(|e| {
        let why = match e {
            Error::Invalid(m) => m,
            other => other.to_string(),
        };
        Error::file(&resolved, format!("folder not found; {why}"))
    })
}

fn class_name(file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(json.get("_class_name")?.as_str()?.to_string())
}

/// What `root` holds, in words, with the backbone type that reads it.
pub fn what_is(root: &Path) -> String {
    let class = class_name(&root.join("model_index.json"))
        .or_else(|| class_name(&root.join("config.json")));
    match class.as_deref() {
        Some(c) if c.starts_with("StableDiffusion3") => {
            format!("is an SD3 pipeline ({c}), read by type = \"sd3\"")
        }
        Some(c) if c.starts_with("StableDiffusion") => {
            format!("is a {c} folder (a UNet model), read by type = \"unet\"")
        }
        Some("SD3Transformer2DModel") => {
            "holds an SD3 transformer (SD3Transformer2DModel), read by type = \"sd3\"".into()
        }
        Some("UNet2DConditionModel") => {
            "holds a UNet (UNet2DConditionModel), read by type = \"unet\"".into()
        }
        Some(c) => format!("holds a `{c}`"),
        None => "holds neither model_index.json nor config.json".into(),
    }
}

/// The error for a `path` where backbone `kind` finds no model: "folder not found" when it
/// does not exist, else what the folder is and what was asked.
pub fn not_this_model(root: &Path, kind: &str, wanted: &str) -> Error {
    if !root.exists() {
        return Error::file(
            root,
            format!("folder not found (backbone `{kind}` reads {wanted})"),
        );
    }
    Error::file(
        root,
        format!("{}; backbone `{kind}` reads {wanted}", what_is(root)),
    )
}

/// The preset of backbone `kind` whose shapes a missing folder's name points at (the
/// shipped recipes name the hub's folders: stable-diffusion-3-medium-diffusers,
/// stable-diffusion-v1-5, stable-diffusion-xl-base-1.0...; the shapes world's later training
/// stages name the run folder of the stage before). None for other names.
pub fn preset_for_missing(kind: &str, root: &Path) -> Option<&'static str> {
    let name = root.file_name()?.to_string_lossy().to_lowercase();
    if kind == "shapes" {
        // A base's training run (runs/shapes-mmdit/final-ema): any part of the path.
        let path = root.to_string_lossy().to_lowercase();
        return ["mmdit", "unet"].into_iter().find(|p| path.contains(p));
    }
    match kind {
        "sd3" if name.contains("3.5-large") => Some("sd3.5-large"),
        "sd3" if name.contains("3.5-medium") => Some("sd3.5-medium"),
        "sd3" if name.contains("3-medium") || name.contains("sd3") => Some("sd3-medium"),
        "unet" if name.contains("xl") => Some("sdxl"),
        "unet"
            if ["v1-5", "v1.5", "1-5", "1.5", "sd15"]
                .iter()
                .any(|k| name.contains(k)) =>
        {
            Some("sd15")
        }
        _ => None,
    }
}

/// The one line `recipe check` prints when it checks against a preset.
pub fn preset_note(kind: &str, root: &Path, preset: &str) -> String {
    format!(
        "note: backbone {kind}: {} does not exist here; checked against the `{preset}` \
         preset's shapes instead (training and sampling need the folder)",
        root.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_resolve_offline_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("hub");
        let repo = cache.join("models--org--tiny");
        std::fs::create_dir_all(repo.join("snapshots/abc123/unet")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/def456")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        // The only test of the crate that reads the HF_* variables.
        std::env::set_var("HF_HUB_CACHE", &cache);
        assert_eq!(
            hub_snapshot("org/tiny", None).unwrap(),
            repo.join("snapshots/abc123")
        );
        assert_eq!(
            hub_snapshot("org/tiny/unet", None).unwrap(),
            repo.join("snapshots/abc123/unet")
        );
        assert_eq!(
            hub_snapshot("org/tiny", Some("def456")).unwrap(),
            repo.join("snapshots/def456")
        );
        let e = hub_snapshot("org/other", None).unwrap_err().to_string();
        assert!(
            e.contains("models--org--other") && e.contains("never downloads"),
            "{e}"
        );
        let ctx = BuildContext::cpu(dir.path());
        let e = locate(&ctx, Path::new("org/other"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("folder not found") && e.contains("org/other"),
            "{e}"
        );
        assert_eq!(
            locate(&ctx, Path::new("org/tiny"), None).unwrap(),
            repo.join("snapshots/abc123")
        );
        // A folder that exists wins over the cache.
        std::fs::create_dir_all(dir.path().join("org/tiny")).unwrap();
        assert_eq!(
            locate(&ctx, Path::new("org/tiny"), None).unwrap(),
            dir.path().join("org/tiny")
        );
    }

    #[test]
    fn presets_follow_the_hub_folder_names() {
        let p = |k, n: &str| preset_for_missing(k, Path::new(n));
        assert_eq!(
            p("sd3", "models/stable-diffusion-3-medium-diffusers"),
            Some("sd3-medium")
        );
        assert_eq!(
            p("sd3", "/m/stable-diffusion-3.5-large"),
            Some("sd3.5-large")
        );
        assert_eq!(p("unet", "models/stable-diffusion-v1-5"), Some("sd15"));
        assert_eq!(
            p("unet", "models/stable-diffusion-xl-base-1.0"),
            Some("sdxl")
        );
        assert_eq!(p("unet", "models/my-finetune"), None);
    }
}

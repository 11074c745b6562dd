//! What a recipe's `path` holds when it is not the model a backbone asked for: a folder that
//! does not exist, or a pipeline of another type; and, for `recipe check` on a machine without
//! the weights, the preset whose shapes the folder's name points at.
use std::path::Path;

use softalign_core::Error;

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
        format!(
            "{}; backbone `{kind}` reads {wanted}",
            what_is(root)
        ),
    )
}

/// The preset of backbone `kind` whose shapes a missing folder's name points at (the
/// shipped recipes name the hub's folders: stable-diffusion-3-medium-diffusers,
/// stable-diffusion-v1-5, stable-diffusion-xl-base-1.0...). None for other names.
pub fn preset_for_missing(kind: &str, root: &Path) -> Option<&'static str> {
    let name = root.file_name()?.to_string_lossy().to_lowercase();
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
    fn presets_follow_the_hub_folder_names() {
        let p = |k, n: &str| preset_for_missing(k, Path::new(n));
        assert_eq!(
            p("sd3", "models/stable-diffusion-3-medium-diffusers"),
            Some("sd3-medium")
        );
        assert_eq!(p("sd3", "/m/stable-diffusion-3.5-large"), Some("sd3.5-large"));
        assert_eq!(p("unet", "models/stable-diffusion-v1-5"), Some("sd15"));
        assert_eq!(p("unet", "models/stable-diffusion-xl-base-1.0"), Some("sdxl"));
        assert_eq!(p("unet", "models/my-finetune"), None);
    }
}

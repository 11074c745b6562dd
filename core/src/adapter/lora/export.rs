//! LoRA files out, for the first set's online weights: the diffusers pipeline file
//! (`pytorch_lora_weights.safetensors`, keys `<component>.<module>.lora_A.weight`, header
//! `lora_adapter_metadata` = the LoraConfig per component, keys prefixed as
//! `save_lora_weights` writes them), which `pipe.load_lora_weights(dir)` loads as it is; and a
//! PEFT folder (`adapter_model.safetensors` with `base_model.model.` keys +
//! `adapter_config.json`). Each set beyond the first gets its own pair of files, suffixed
//! `-<set>`; an adapter with EMA copies also writes each set's EMA weights, suffixed `-ema`
//! (`-<set>-ema` beyond the first set). DoRA magnitudes are written as PEFT saves them
//! (`<module>.lora_magnitude_vector`).
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;
use tch::Tensor;

use super::{Layout, Lora, Pair};
use crate::tensors::{save_safetensors, write_atomic};
use crate::{Error, Result};

pub const DIFFUSERS_FILE: &str = "pytorch_lora_weights.safetensors";
pub const PEFT_DIR: &str = "peft";

/// The LoraConfig fields a component's modules share.
fn config(layout: &Layout, component: &str) -> serde_json::Value {
    let targets: Vec<&str> = layout
        .sites
        .iter()
        .filter(|s| s.site.component == component)
        .map(|s| s.site.path.as_str())
        .collect();
    json!({
        "r": layout.rank,
        "lora_alpha": layout.alpha,
        "use_rslora": layout.rslora,
        "use_dora": layout.dora,
        "lora_dropout": layout.dropout,
        "bias": "none",
        "init_lora_weights": true,
        "target_modules": targets,
    })
}

fn components(layout: &Layout) -> Vec<String> {
    let mut c: Vec<String> = layout
        .sites
        .iter()
        .map(|s| s.site.component.clone())
        .collect();
    c.dedup();
    c
}

/// Writes `set`'s pairs as a diffusers file and a PEFT folder under `dir`.
pub fn write_set(layout: &Layout, pairs: &[Pair], dir: &Path, suffix: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let mut diffusers: Vec<(String, Tensor)> = Vec::new();
    let mut peft: Vec<(String, Tensor)> = Vec::new();
    for (s, p) in layout.sites.iter().zip(pairs) {
        let (c, m) = (&s.site.component, &s.site.path);
        let roles = ["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"];
        for (role, t) in roles.iter().zip(p.tensors()) {
            let t = t.detach().contiguous();
            diffusers.push((format!("{c}.{m}.{role}"), t.shallow_clone()));
            peft.push((format!("base_model.model.{m}.{role}"), t));
        }
    }
    let mut flat = serde_json::Map::new();
    for c in components(layout) {
        if let serde_json::Value::Object(o) = config(layout, &c) {
            for (k, v) in o {
                flat.insert(format!("{c}.{k}"), v);
            }
        }
    }
    let meta = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "lora_adapter_metadata".to_string(),
            serde_json::to_string_pretty(&serde_json::Value::Object(flat)).expect("json"),
        ),
    ]);
    let stem = DIFFUSERS_FILE.trim_end_matches(".safetensors");
    save_safetensors(
        dir.join(format!("{stem}{suffix}.safetensors")),
        &diffusers,
        &meta,
    )?;
    // A PEFT folder is one model's adapter: the first component's modules.
    let comps = components(layout);
    if comps.len() == 1 {
        let pdir = dir.join(format!("{PEFT_DIR}{suffix}"));
        std::fs::create_dir_all(&pdir).map_err(|e| Error::file(&pdir, e))?;
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(pdir.join("adapter_model.safetensors"), &peft, &meta)?;
        let mut cfg = config(layout, &comps[0]);
        cfg["peft_type"] = json!("LORA");
        cfg["task_type"] = serde_json::Value::Null;
        let text = serde_json::to_string_pretty(&cfg).expect("json");
        write_atomic(&pdir.join("adapter_config.json"), text.as_bytes())?;
    }
    Ok(())
}

pub fn write_all(lora: &Lora, dir: &Path) -> Result<()> {
    let layout = lora.layout();
    for (k, set) in layout.sets.iter().enumerate() {
        let suffix = if k == 0 {
            String::new()
        } else {
            format!("-{set}")
        };
        let pairs = lora.pairs(set, false).expect("every set has online pairs");
        write_set(layout, pairs, dir, &suffix)?;
        if let Some(ema) = lora.pairs(set, true) {
            write_set(layout, ema, dir, &format!("{suffix}-ema"))?;
        }
    }
    Ok(())
}

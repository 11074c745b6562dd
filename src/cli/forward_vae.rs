//! `softalign forward` on a diffusers AutoencoderKL folder: `sample` (images in [-1, 1]) ->
//! `latent_dist.mean`, `latent_dist.std`; `latents` (unscaled) -> `sample` (decoded). Either or
//! both inputs may be given.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use softalign_backbones::vae::AutoencoderKl;
use softalign_core::tensors::{save_safetensors, MappedSafetensors};
use tch::{Device, Kind, Tensor};

/// Whether `dir/config.json` names `AutoencoderKL` as its `_class_name`.
pub fn detect(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("_class_name")?.as_str().map(|s| s == "AutoencoderKL"))
        .unwrap_or(false)
}

pub fn run(
    model: &Path,
    inputs: &Path,
    output: &Path,
    device: Device,
    kind: Kind,
) -> anyhow::Result<()> {
    let file = MappedSafetensors::open(inputs)
        .with_context(|| format!("reading inputs {}", inputs.display()))?;
    let names = file.names();
    let (has_images, has_latents) = (
        names.iter().any(|n| n == "sample"),
        names.iter().any(|n| n == "latents"),
    );
    if !has_images && !has_latents {
        anyhow::bail!(
            "{}: a VAE forward needs `sample` (images, to encode) and/or `latents` (to decode)",
            inputs.display()
        );
    }
    let vae = AutoencoderKl::load(model, device, kind)
        .with_context(|| format!("loading the VAE from {}", model.display()))?;
    let _guard = tch::no_grad_guard();
    let mut out: Vec<(String, Tensor)> = Vec::new();
    if has_images {
        let post = vae.encode(&file.tensor("sample")?).context("encode")?;
        out.push(("latent_dist.mean".into(), post.mean));
        out.push(("latent_dist.std".into(), post.std));
    }
    if has_latents {
        let decoded = vae.decode(&file.tensor("latents")?).context("decode")?;
        out.push(("sample".into(), decoded));
    }
    let out: Vec<(String, Tensor)> = out
        .into_iter()
        .map(|(n, t)| (n, t.to_kind(Kind::Float).contiguous()))
        .collect();
    save_safetensors(output, &out, &BTreeMap::new())
        .with_context(|| format!("writing {}", output.display()))?;
    eprintln!("wrote {} tensors to {}", out.len(), output.display());
    Ok(())
}

//! `softalign forward` on a transformers text-encoder folder (CLIPTextModel,
//! CLIPTextModelWithProjection, T5EncoderModel): `input_ids` (and optionally `attention_mask`)
//! in, outputs under transformers' names out.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use softalign_backbones::clip::TextEncoder;
use softalign_backbones::t5::T5Encoder;
use softalign_core::tensors::{save_safetensors, MappedSafetensors};
use tch::{Device, Kind, Tensor};

/// Which text encoder a folder's config.json describes, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFolder {
    Clip,
    T5,
}

/// Reads `model_type` from `dir/config.json` (None for other folders).
pub fn detect(dir: &Path) -> Option<TextFolder> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    match json.get("model_type")?.as_str()? {
        "clip_text_model" | "clip" => Some(TextFolder::Clip),
        "t5" => Some(TextFolder::T5),
        _ => None,
    }
}

/// Runs the encoder and writes `last_hidden_state`, `hidden_states.N` (N = 0..layers),
/// `pooler_output` (CLIP) and `text_embeds` (CLIP with projection), all fp32.
pub fn run(
    kind_of: TextFolder,
    model: &Path,
    inputs: &Path,
    output: &Path,
    device: Device,
    kind: Kind,
) -> anyhow::Result<()> {
    let file = MappedSafetensors::open(inputs)
        .with_context(|| format!("reading inputs {}", inputs.display()))?;
    let ids = file
        .tensor("input_ids")
        .with_context(|| format!("{}: tensor `input_ids`", inputs.display()))?;
    let mask = if file.names().iter().any(|n| n == "attention_mask") {
        Some(file.tensor("attention_mask")?)
    } else {
        None
    };
    let load_ctx = || format!("loading the text encoder from {}", model.display());
    let _guard = tch::no_grad_guard();
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let hidden = match kind_of {
        TextFolder::Clip => {
            let enc = TextEncoder::load(model, device, kind).with_context(load_ctx)?;
            let o = enc.encode_masked(&ids, mask.as_ref()).context("forward")?;
            out.push(("pooler_output".into(), o.pooled));
            if let Some(t) = o.text_embeds {
                out.push(("text_embeds".into(), t));
            }
            out.push(("last_hidden_state".into(), o.last_hidden_state));
            o.hidden_states
        }
        TextFolder::T5 => {
            let enc = T5Encoder::load(model, device, kind).with_context(load_ctx)?;
            let o = enc.encode_masked(&ids, mask.as_ref()).context("forward")?;
            out.push(("last_hidden_state".into(), o.last_hidden_state));
            o.hidden_states
        }
    };
    for (i, h) in hidden.into_iter().enumerate() {
        out.push((format!("hidden_states.{i}"), h));
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

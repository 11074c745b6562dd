//! kohya / sd-scripts LoRA keys: `lora_unet_<path with _ for .>.lora_down.weight`,
//! `.lora_up.weight` and a 0-d `.alpha` (missing or 0: alpha = r); `lora_te_` / `lora_te1_`
//! (text_encoder), `lora_te2_` (text_encoder_2), `lora_te3_` (text_encoder_3). The dots are gone,
//! so names are mapped back by looking them up among the model's own module paths; SDXL files
//! use the SGM UNet's names (`input_blocks_4_1_...`), first mapped to diffusers' as diffusers'
//! `_maybe_map_sgm_blocks_to_diffusers` does.
use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use super::files::{check_pair, LoraEntry, ReadContext};
use crate::{Error, Result};

const PREFIXES: [(&str, &str); 5] = [
    ("lora_unet_", ""),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
];

pub fn is_kohya(key: &str) -> bool {
    PREFIXES.iter().any(|(p, _)| key.starts_with(p))
}

/// (component, name without prefix); the UNet's component is the model's denoiser.
fn split_prefix<'a>(name: &'a str, ctx: &ReadContext) -> Option<(String, &'a str)> {
    PREFIXES.iter().find_map(|(p, c)| {
        name.strip_prefix(p).map(|rest| {
            let comp = if c.is_empty() {
                ctx.default_component.clone()
            } else {
                c.to_string()
            };
            (comp, rest)
        })
    })
}

/// SGM UNet names (underscored) to diffusers' (underscored), for SDXL files.
pub fn sgm_to_diffusers(rest: &str, layers_per_block: i64) -> Option<String> {
    let per = layers_per_block + 1;
    let resnet_tail = |t: &str| -> String {
        for (a, b) in [
            ("in_layers_2", "conv1"),
            ("emb_layers_1", "time_emb_proj"),
            ("out_layers_3", "conv2"),
            ("skip_connection", "conv_shortcut"),
        ] {
            if let Some(r) = t.strip_prefix(a) {
                return format!("{b}{r}");
            }
        }
        t.to_string()
    };
    let num = |s: &str| -> Option<(i64, String)> {
        let (n, r) = s.split_once('_').unwrap_or((s, ""));
        Some((n.parse().ok()?, r.to_string()))
    };
    if let Some(r) = rest.strip_prefix("input_blocks_") {
        let (i, r) = num(r)?;
        let (j, tail) = num(&r)?;
        if i == 0 {
            return Some(format!(
                "conv_in{}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("_{tail}")
                }
            ));
        }
        let (b, l) = ((i - 1) / per, (i - 1) % per);
        if tail.starts_with("op") {
            return Some(format!("down_blocks_{b}_downsamplers_0_conv"));
        }
        return Some(match j {
            0 => format!("down_blocks_{b}_resnets_{l}_{}", resnet_tail(&tail)),
            1 => format!("down_blocks_{b}_attentions_{l}_{tail}"),
            _ => return None,
        });
    }
    if let Some(r) = rest.strip_prefix("middle_block_") {
        let (j, tail) = num(r)?;
        return Some(match j {
            0 => format!("mid_block_resnets_0_{}", resnet_tail(&tail)),
            1 => format!("mid_block_attentions_0_{tail}"),
            2 => format!("mid_block_resnets_1_{}", resnet_tail(&tail)),
            _ => return None,
        });
    }
    if let Some(r) = rest.strip_prefix("output_blocks_") {
        let (i, r) = num(r)?;
        let (j, tail) = num(&r)?;
        let (b, l) = (i / per, i % per);
        return Some(match j {
            0 => format!("up_blocks_{b}_resnets_{l}_{}", resnet_tail(&tail)),
            1 if tail.starts_with("conv") => format!("up_blocks_{b}_upsamplers_0_{tail}"),
            1 => format!("up_blocks_{b}_attentions_{l}_{tail}"),
            2 => format!("up_blocks_{b}_upsamplers_0_{tail}"),
            _ => return None,
        });
    }
    for (a, b) in [
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
        ("out_2", "conv_out"),
    ] {
        if rest == a {
            return Some(b.to_string());
        }
    }
    None
}

fn is_sgm(rest: &str) -> bool {
    [
        "input_blocks_",
        "middle_block_",
        "output_blocks_",
        "time_embed_",
        "label_emb_",
    ]
    .iter()
    .any(|p| rest.starts_with(p))
        || rest == "out_2"
}

/// One kohya module's tensors as they are found: (lora_down, lora_up, alpha).
type KohyaParts = (Option<Tensor>, Option<Tensor>, Option<f64>);

pub fn entries(
    file: &Path,
    tensors: BTreeMap<String, Tensor>,
    ctx: &ReadContext,
) -> Result<Vec<LoraEntry>> {
    let mut parts: BTreeMap<String, KohyaParts> = BTreeMap::new();
    for (key, t) in tensors {
        let (name, role) = if let Some(n) = key.strip_suffix(".lora_down.weight") {
            (n, 0)
        } else if let Some(n) = key.strip_suffix(".lora_up.weight") {
            (n, 1)
        } else if let Some(n) = key.strip_suffix(".alpha") {
            (n, 2)
        } else if key.ends_with(".dora_scale") {
            eprintln!(
                "{}: `{key}`: LyCORIS dora_scale dropped, as diffusers drops it",
                file.display()
            );
            continue;
        } else {
            return Err(Error::file(
                file,
                format!("key `{key}`: not a kohya LoRA key (lora_down, lora_up, alpha)"),
            ));
        };
        let p = parts.entry(name.to_string()).or_default();
        match role {
            0 => p.0 = Some(t),
            1 => p.1 = Some(t),
            _ => {
                if t.numel() != 1 {
                    return Err(Error::file(
                        file,
                        format!("`{key}` has {} values, expected one", t.numel()),
                    ));
                }
                p.2 = Some(t.double_value(&[]))
            }
        }
    }
    // Underscored module names per component, for the lookup.
    let lookup: BTreeMap<&str, BTreeMap<String, &str>> = ctx
        .modules
        .iter()
        .map(|(c, paths)| {
            (
                c.as_str(),
                paths
                    .iter()
                    .map(|p| (p.replace('.', "_"), p.as_str()))
                    .collect(),
            )
        })
        .collect();
    let names: Vec<String> = parts.keys().cloned().collect();
    let any_diffusers_unet = names.iter().any(|n| {
        n.strip_prefix("lora_unet_").is_some_and(|r| {
            r.starts_with("down_blocks_")
                || r.starts_with("up_blocks_")
                || r.starts_with("mid_block_")
        })
    });
    let any_sgm = names
        .iter()
        .any(|n| n.strip_prefix("lora_unet_").is_some_and(is_sgm));
    if any_diffusers_unet && any_sgm {
        return Err(Error::file(
            file,
            "mixes SGM (input_blocks_...) and diffusers (down_blocks_...) UNet names; diffusers would \
             silently drop the SGM keys",
        ));
    }
    let mut out = Vec::new();
    for (name, (down, up, alpha)) in parts {
        let key = format!("{name}.lora_down.weight");
        let down = down.ok_or_else(|| {
            Error::file(file, format!("`{name}.lora_up.weight` has no lora_down"))
        })?;
        let up = up.ok_or_else(|| Error::file(file, format!("`{key}` has no lora_up")))?;
        check_pair(file, &key, &down, &format!("{name}.lora_up.weight"), &up)?;
        let (component, rest) =
            split_prefix(&name, ctx).expect("kohya keys were classified by prefix");
        let rest = if component == ctx.default_component && is_sgm(rest) {
            sgm_to_diffusers(rest, ctx.unet_layers_per_block.unwrap_or(2)).ok_or_else(|| {
                Error::file(
                    file,
                    format!("key `{key}`: SGM UNet name with no diffusers equivalent"),
                )
            })?
        } else {
            rest.to_string()
        };
        let table = lookup.get(component.as_str()).ok_or_else(|| {
            Error::file(
                file,
                format!("key `{key}` is for `{component}`, which this model does not have (a LoRA for another model?)"),
            )
        })?;
        let path = table.get(&rest).ok_or_else(|| {
            let near =
                crate::linear_site::nearest(&rest, table.keys().map(String::as_str)).unwrap_or("");
            Error::file(
                file,
                format!(
                    "key `{key}` matches no module of `{component}` (nearest: `{}`)",
                    table.get(near).copied().unwrap_or(near)
                ),
            )
        })?;
        let rank = down.size()[0];
        let alpha = alpha.filter(|a| *a != 0.0).unwrap_or(rank as f64);
        out.push(LoraEntry {
            component,
            path: path.to_string(),
            key,
            down,
            up,
            scale: alpha / rank as f64,
            magnitude: None,
        });
    }
    Ok(out)
}

//! The encoding cache's record size for an SD3 pipeline, from the transformer's config and the
//! cache's own layout rules, without loading or encoding anything.
use softalign_core::cache::{Manifest, StoredDType};

use crate::sd3::Sd3Config;

/// CLIP's token count in every SD pipeline (`tokenizer.model_max_length`).
pub const CLIP_TOKENS: i64 = 77;

/// The fields one record of an SD3 cache holds (as `softalign cache` writes them): the
/// bookkeeping bytes, the scaled posterior mean and deviation at `resolution` pixels, and per
/// caption the joint context (77 CLIP + `t5_length` T5 tokens, `joint_attention_dim` wide) and
/// the pooled vector.
/// With `compact`, the context is stored after the frozen `context_embedder` (`context_embeds`,
/// inner_dim wide) instead of `encoder_hidden_states` (joint_attention_dim wide). Fields are
/// named and ordered as the writer lays them out (sorted conditioning names).
pub fn sd3_fields(
    cfg: &Sd3Config,
    vae_scale_factor: i64,
    resolution: i64,
    t5_length: i64,
    captions: i64,
    float: StoredDType,
    compact: bool,
) -> Vec<(String, StoredDType, Vec<i64>)> {
    let side = resolution / vae_scale_factor;
    let latent = vec![cfg.in_channels, side, side];
    let (ctx_name, ctx_width) = if compact {
        ("cond.context_embeds", cfg.inner_dim())
    } else {
        ("cond.encoder_hidden_states", cfg.joint_attention_dim)
    };
    vec![
        ("valid".into(), StoredDType::U8, vec![1]),
        ("caption_count".into(), StoredDType::U8, vec![1]),
        ("x0.mean".into(), float, latent.clone()),
        ("x0.std".into(), float, latent),
        (
            ctx_name.into(),
            float,
            vec![captions, CLIP_TOKENS + t5_length, ctx_width],
        ),
        (
            "cond.pooled_projections".into(),
            float,
            vec![captions, cfg.pooled_projection_dim],
        ),
    ]
}

/// Bytes per record of [`sd3_fields`].
pub fn sd3_record_bytes(
    cfg: &Sd3Config,
    vae_scale_factor: i64,
    resolution: i64,
    t5_length: i64,
    captions: i64,
    float: StoredDType,
    compact: bool,
) -> usize {
    Manifest::layout(sd3_fields(
        cfg,
        vae_scale_factor,
        resolution,
        t5_length,
        captions,
        float,
        compact,
    ))
    .1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD3-medium (stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json:
    /// in_channels 16, joint_attention_dim 4096, pooled_projection_dim 2048; VAE scale 8) at
    /// 512 px with COCO's 5 captions in bf16.
    #[test]
    fn sd3_medium_record_bytes() {
        let cfg = Sd3Config::preset("sd3-medium").unwrap();
        let latent = 2 * 16 * 64 * 64;
        for (t5, ctx) in [(256, 333), (512, 589)] {
            for (compact, width) in [(false, 4096), (true, 1536)] {
                let got = sd3_record_bytes(&cfg, 8, 512, t5, 5, StoredDType::Bf16, compact);
                let want = 2 + 2 * latent + 2 * 5 * ctx * width + 2 * 5 * 2048;
                assert_eq!(got, want as usize);
                eprintln!(
                    "SD3-medium cache record, T5 length {t5}, compact {compact}: {got} bytes \
                     per sample"
                );
            }
        }
    }
}

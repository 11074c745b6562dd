//! diffusers `models/unets/unet_2d_condition.py` `UNet2DConditionModel` (SD1.x/2.x, SDXL),
//! with one text-context site per block group (`down`, `mid`, `up`).
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use softalign_core::linear_site::LinearShapes;
use softalign_core::site::{Placement, SiteHook, SiteInfo, SiteKind, TokenSpace};
use softalign_core::{Error, Result};

use super::config::{UNetConfig, CROSS_ATTN_DOWN, CROSS_ATTN_MID, CROSS_ATTN_UP};
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::resnet::group_norm;
use super::unet_2d_blocks::{Common, CrossAttn, DownBlock, MidBlock, UpBlock, UpChannels};

/// The block groups, in the order a forward visits them.
pub const GROUPS: [&str; 3] = ["down", "mid", "up"];

/// One text-context site per group that holds cross-attention: at an active group every
/// cross-attention sees [BOS, tokens, remaining text tokens].
pub fn sites(cfg: &UNetConfig) -> Result<Vec<SiteInfo>> {
    let dim = cfg.resolve()?.cross_attention_dim;
    let has = [
        cfg.down_block_types.iter().any(|t| t == CROSS_ATTN_DOWN),
        cfg.mid_block_type.as_deref() == Some(CROSS_ATTN_MID),
        cfg.up_block_types.iter().any(|t| t == CROSS_ATTN_UP),
    ];
    Ok(GROUPS
        .iter()
        .zip(has)
        .filter(|(_, h)| *h)
        .map(|(g, _)| SiteInfo {
            name: g.to_string(),
            kind: SiteKind::TextContext {
                joint_dim: dim,
                context_dim: None,
                placement: Placement::AfterBos,
            },
        })
        .collect())
}

/// Every Linear layer of the UNet built from `cfg`, by module path, with (in, out), walking
/// the blocks as `new` builds them (tests check the two agree). Convolutions are not linear
/// sites (LoRA files may still name them; merging finds them in the weights).
pub fn linear_shapes(cfg: &UNetConfig) -> Result<LinearShapes> {
    let r = cfg.resolve()?;
    let ch = &cfg.block_out_channels;
    let n = ch.len();
    let mut v: LinearShapes = Vec::new();
    let temb = r.time_embed_dim;
    let resnet = |v: &mut LinearShapes, p: String, o: i64| {
        v.push((format!("{p}.time_emb_proj"), temb, o));
    };
    let transformer = |v: &mut LinearShapes, p: String, heads: i64, layers: i64, c: i64| {
        // head_dim = c / heads, inner = heads * head_dim
        let inner = heads * (c / heads);
        let cross = r.cross_attention_dim;
        if cfg.use_linear_projection {
            v.push((format!("{p}.proj_in"), c, inner));
        }
        for k in 0..layers {
            let b = format!("{p}.transformer_blocks.{k}");
            for (a, kv_in) in [("attn1", inner), ("attn2", cross)] {
                v.push((format!("{b}.{a}.to_q"), inner, inner));
                v.push((format!("{b}.{a}.to_k"), kv_in, inner));
                v.push((format!("{b}.{a}.to_v"), kv_in, inner));
                v.push((format!("{b}.{a}.to_out.0"), inner, inner));
            }
            v.push((format!("{b}.ff.net.0.proj"), inner, 8 * inner));
            v.push((format!("{b}.ff.net.2"), 4 * inner, inner));
        }
        if cfg.use_linear_projection {
            v.push((format!("{p}.proj_out"), inner, c));
        }
    };
    for (i, t) in cfg.down_block_types.iter().enumerate() {
        for l in 0..r.layers_per_block[i] {
            resnet(&mut v, format!("down_blocks.{i}.resnets.{l}"), ch[i]);
            if t == CROSS_ATTN_DOWN {
                let p = format!("down_blocks.{i}.attentions.{l}");
                transformer(
                    &mut v,
                    p,
                    r.heads[i],
                    r.transformer_layers_per_block[i],
                    ch[i],
                );
            }
        }
    }
    if cfg.mid_block_type.is_some() {
        let c = ch[n - 1];
        resnet(&mut v, "mid_block.resnets.0".into(), c);
        resnet(&mut v, "mid_block.resnets.1".into(), c);
        let (h, l) = (r.heads[n - 1], r.transformer_layers_per_block[n - 1]);
        transformer(&mut v, "mid_block.attentions.0".into(), h, l, c);
    }
    for (i, t) in cfg.up_block_types.iter().enumerate() {
        let k = n - 1 - i;
        let c = ch[k];
        for l in 0..r.layers_per_block[k] + 1 {
            resnet(&mut v, format!("up_blocks.{i}.resnets.{l}"), c);
            if t == CROSS_ATTN_UP {
                let p = format!("up_blocks.{i}.attentions.{l}");
                transformer(&mut v, p, r.heads[k], r.transformer_layers_per_block[k], c);
            }
        }
    }
    if cfg.has_text_time() {
        let i = cfg.projection_class_embeddings_input_dim.unwrap_or(0);
        v.push(("add_embedding.linear_1".into(), i, temb));
        v.push(("add_embedding.linear_2".into(), temb, temb));
    }
    v.push(("time_embedding.linear_1".into(), ch[0], temb));
    v.push(("time_embedding.linear_2".into(), temb, temb));
    Ok(v)
}

/// SDXL's added conditioning (`added_cond_kwargs`).
pub struct TextTime<'a> {
    /// (B, pooled width)
    pub text_embeds: &'a Tensor,
    /// (B, 6): original size, crop top-left, target size.
    pub time_ids: &'a Tensor,
}

#[derive(Debug)]
struct AddEmbedding {
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: nn::Conv2D,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add: Option<AddEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

pub(crate) fn check_shape(name: &str, t: &Tensor, want: &[Option<i64>]) -> Result<()> {
    let s = t.size();
    let ok = s.len() == want.len() && s.iter().zip(want).all(|(a, w)| w.is_none_or(|w| *a == w));
    if ok {
        Ok(())
    } else {
        let w: Vec<String> = want
            .iter()
            .map(|w| w.map_or("_".to_string(), |v| v.to_string()))
            .collect();
        Err(Error::tensor(
            name,
            format!("shape {s:?}, expected [{}]", w.join(", ")),
        ))
    }
}

fn conv(p: nn::Path, i: i64, o: i64, k: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        padding: (k - 1) / 2,
        ..Default::default()
    };
    nn::conv2d(p, i, o, k, cfg)
}

impl UNet2DConditionModel {
    pub fn new(p: nn::Path, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate()?;
        let r = cfg.resolve()?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let c0 = ch[0];
        let flip = cfg.flip_sin_to_cos;
        let common = Common {
            temb_channels: r.time_embed_dim,
            groups: cfg.groups(),
            eps: cfg.norm_eps,
            cross_attention_dim: r.cross_attention_dim,
            use_linear_projection: cfg.use_linear_projection,
        };
        let attn = |i: usize, cross: bool| {
            cross.then_some(CrossAttn {
                heads: r.heads[i],
                transformer_layers: r.transformer_layers_per_block[i],
            })
        };
        let dp = &p / "down_blocks";
        let mut down_blocks = Vec::new();
        let mut out = c0;
        for (i, t) in cfg.down_block_types.iter().enumerate() {
            let inc = out;
            out = ch[i];
            down_blocks.push(DownBlock::new(
                &dp / i as i64,
                &common,
                attn(i, t == CROSS_ATTN_DOWN),
                inc,
                out,
                r.layers_per_block[i],
                i + 1 < n,
                cfg.downsample_padding,
            ));
        }
        let mid_block = cfg.mid_block_type.as_ref().map(|_| {
            MidBlock::new(
                &p / "mid_block",
                &common,
                attn(n - 1, true).expect("cross"),
                ch[n - 1],
                cfg.mid_block_scale_factor,
            )
        });
        let up = &p / "up_blocks";
        let rev: Vec<i64> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out = rev[0];
        for (i, t) in cfg.up_block_types.iter().enumerate() {
            let prev = out;
            out = rev[i];
            let k = n - 1 - i;
            up_blocks.push(UpBlock::new(
                &up / i as i64,
                &common,
                attn(k, t == CROSS_ATTN_UP),
                UpChannels {
                    in_channels: rev[(i + 1).min(n - 1)],
                    prev_output_channels: prev,
                    out_channels: out,
                },
                r.layers_per_block[k] + 1,
                i + 1 < n,
            ));
        }
        let add = cfg.has_text_time().then(|| AddEmbedding {
            add_time_proj: Timesteps {
                num_channels: cfg.addition_time_embed_dim.expect("validated"),
                flip_sin_to_cos: flip,
                shift: cfg.freq_shift,
            },
            add_embedding: TimestepEmbedding::new(
                &p / "add_embedding",
                cfg.projection_class_embeddings_input_dim
                    .expect("validated"),
                r.time_embed_dim,
            ),
        });
        Ok(Self {
            config: cfg.clone(),
            conv_in: conv(&p / "conv_in", cfg.in_channels, c0, cfg.conv_in_kernel),
            time_proj: Timesteps {
                num_channels: c0,
                flip_sin_to_cos: flip,
                shift: cfg.freq_shift,
            },
            time_embedding: TimestepEmbedding::new(&p / "time_embedding", c0, r.time_embed_dim),
            add,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(&p / "conv_norm_out", cfg.groups(), c0, cfg.norm_eps),
            conv_out: conv(&p / "conv_out", c0, cfg.out_channels, cfg.conv_out_kernel),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The dtype of the weights; inputs are cast to it.
    pub fn kind(&self) -> Kind {
        self.conv_in.ws.kind()
    }

    /// The context each group sees: the text context, or [BOS, tokens, rest] where the hook
    /// gives tokens for the group's site.
    fn contexts(
        &self,
        ehs: &Tensor,
        timestep: &Tensor,
        hook: Option<(&dyn SiteHook, &[SiteInfo])>,
    ) -> Result<[Tensor; 3]> {
        let (b, len, dim) = {
            let s = ehs.size();
            (s[0], s[1], s[2])
        };
        let mut out = [
            ehs.shallow_clone(),
            ehs.shallow_clone(),
            ehs.shallow_clone(),
        ];
        let Some((hook, sites)) = hook else {
            return Ok(out);
        };
        for (g, slot) in GROUPS.iter().zip(out.iter_mut()) {
            let Some(site) = sites.iter().find(|s| s.name == *g) else {
                continue;
            };
            let Some(t) = hook.context_tokens(site, timestep, b)? else {
                continue;
            };
            let name = format!("tokens at {g}");
            if t.space != TokenSpace::Joint {
                return Err(Error::tensor(
                    &name,
                    "UNet cross-attention sites take joint-space tokens only",
                ));
            }
            check_shape(&name, &t.tokens, &[Some(b), None, Some(dim)])?;
            if len == 0 {
                return Err(Error::tensor(
                    "encoder_hidden_states",
                    "is empty: tokens go after its first (BOS) token",
                ));
            }
            let tok = t.into_joint(|v| v.shallow_clone()).to_kind(ehs.kind());
            *slot = Tensor::cat(&[ehs.narrow(1, 0, 1), tok, ehs.narrow(1, 1, len - 1)], 1);
        }
        Ok(out)
    }

    /// The diffusers forward: `sample` (B, C, H, W), `timestep` (B,), `encoder_hidden_states`
    /// (B, L, cross_attention_dim), SDXL's `text_time` inputs, and an optional site hook.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        text_time: Option<TextTime<'_>>,
        hook: Option<(&dyn SiteHook, &[SiteInfo])>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let r = c.resolve()?;
        check_shape("sample", sample, &[None, Some(c.in_channels), None, None])?;
        let b = sample.size()[0];
        check_shape("timestep", timestep, &[Some(b)])?;
        check_shape(
            "encoder_hidden_states",
            encoder_hidden_states,
            &[Some(b), None, Some(r.cross_attention_dim)],
        )?;
        let kind = self.kind();
        let mut x = sample.to_kind(kind);
        if c.center_input_sample {
            x = x * 2.0 - 1.0;
        }
        let t_emb = self.time_proj.forward(timestep).to_kind(kind);
        let mut emb = self.time_embedding.forward(&t_emb);
        match (&self.add, text_time) {
            (Some(a), Some(tt)) => {
                let pooled = c.text_embeds_dim().expect("text_time");
                check_shape("text_embeds", tt.text_embeds, &[Some(b), Some(pooled)])?;
                check_shape("time_ids", tt.time_ids, &[Some(b), Some(6)])?;
                let time = a
                    .add_time_proj
                    .forward(&tt.time_ids.flatten(0, -1))
                    .reshape([b, -1]);
                let add = Tensor::cat(&[tt.text_embeds.to_kind(Kind::Float), time], -1);
                // Out of place: `emb` may be part of an autograd graph.
                emb = &emb + a.add_embedding.forward(&add.to_kind(kind));
            }
            (Some(_), None) => {
                return Err(Error::tensor(
                    "text_embeds",
                    "and `time_ids` are required by this UNet (addition_embed_type \"text_time\")",
                ))
            }
            (None, _) => {}
        }
        let ehs = encoder_hidden_states.to_kind(kind);
        let [ctx_down, ctx_mid, ctx_up] = self.contexts(&ehs, timestep, hook)?;
        x = self.conv_in.forward(&x);
        let mut skips = vec![x.shallow_clone()];
        for blk in &self.down_blocks {
            let (h, s) = blk.forward(&x, &emb, &ctx_down);
            x = h;
            skips.extend(s);
        }
        if let Some(m) = &self.mid_block {
            x = m.forward(&x, &emb, &ctx_mid);
        }
        for (i, blk) in self.up_blocks.iter().enumerate() {
            let k = blk.num_resnets();
            let rest = skips.len() - k;
            let size = (i + 1 < self.up_blocks.len()).then(|| {
                let s = skips[rest - 1].size();
                [s[2], s[3]]
            });
            x = blk.forward(&x, &skips[rest..], &emb, &ctx_up, size);
            skips.truncate(rest);
        }
        let x = self.conv_norm_out.forward(&x).silu();
        Ok(self.conv_out.forward(&x))
    }
}

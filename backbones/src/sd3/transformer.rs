//! diffusers `SD3Transformer2DModel` (models/transformers/transformer_sd3.py), with a
//! text-context site at every joint block.
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use softalign_core::linear_site::LinearShapes;
use softalign_core::site::{Placement, SiteHook, SiteInfo, SiteKind, TokenSpace};
use softalign_core::{Error, Result};

use super::block::{BlockConfig, JointTransformerBlock};
use super::config::Sd3Config;
use super::embeddings::{CombinedTimestepTextProjEmbeddings, PatchEmbed};
use super::normalization::AdaLayerNormContinuous;

/// Site name of joint block `i`.
pub fn site_name(i: i64) -> String {
    format!("joint_blocks.{i}")
}

/// One text-context site per joint block: tokens are prepended to the context stream
/// (width = inner dim), or given in the `context_embedder`'s input space.
pub fn sites(cfg: &Sd3Config) -> Vec<SiteInfo> {
    (0..cfg.num_layers)
        .map(|i| SiteInfo {
            name: site_name(i),
            kind: SiteKind::TextContext {
                joint_dim: cfg.inner_dim(),
                context_dim: Some(cfg.joint_attention_dim),
                placement: Placement::Prepend,
            },
        })
        .collect()
}

/// Every Linear layer of the transformer built from `cfg`, by module path, with (in, out),
/// in the order `new` builds them (tests check the two agree).
pub fn linear_shapes(cfg: &Sd3Config) -> LinearShapes {
    let dim = cfg.inner_dim();
    let inner = cfg.num_attention_heads * cfg.attention_head_dim;
    let mut v: LinearShapes = Vec::new();
    let mut add = |p: String, i: i64, o: i64| v.push((p, i, o));
    let dual: std::collections::BTreeSet<i64> = cfg.dual_attention_layers.iter().copied().collect();
    for b in 0..cfg.num_layers {
        let p = format!("transformer_blocks.{b}");
        let pre_only = b == cfg.num_layers - 1;
        let d = dual.contains(&b);
        add(
            format!("{p}.norm1.linear"),
            dim,
            if d { 9 } else { 6 } * dim,
        );
        if pre_only {
            add(format!("{p}.norm1_context.linear"), dim, 2 * dim);
        } else {
            add(format!("{p}.norm1_context.linear"), dim, 6 * dim);
            add(format!("{p}.ff_context.net.0.proj"), dim, 4 * dim);
            add(format!("{p}.ff_context.net.2"), 4 * dim, dim);
        }
        for a in ["add_q_proj", "add_k_proj", "add_v_proj"] {
            add(format!("{p}.attn.{a}"), dim, inner);
        }
        if !pre_only {
            add(format!("{p}.attn.to_add_out"), inner, dim);
        }
        let attn = |add: &mut dyn FnMut(String, i64, i64), name: &str| {
            for a in ["to_q", "to_k", "to_v"] {
                add(format!("{p}.{name}.{a}"), dim, inner);
            }
            add(format!("{p}.{name}.to_out.0"), inner, dim);
        };
        attn(&mut add, "attn");
        if d {
            attn(&mut add, "attn2");
        }
        add(format!("{p}.ff.net.0.proj"), dim, 4 * dim);
        add(format!("{p}.ff.net.2"), 4 * dim, dim);
    }
    let t = "time_text_embed";
    add(format!("{t}.timestep_embedder.linear_1"), 256, dim);
    add(format!("{t}.timestep_embedder.linear_2"), dim, dim);
    add(
        format!("{t}.text_embedder.linear_1"),
        cfg.pooled_projection_dim,
        dim,
    );
    add(format!("{t}.text_embedder.linear_2"), dim, dim);
    add(
        "context_embedder".into(),
        cfg.joint_attention_dim,
        cfg.caption_projection_dim,
    );
    add("norm_out.linear".into(), dim, 2 * dim);
    add(
        "proj_out".into(),
        dim,
        cfg.patch_size * cfg.patch_size * cfg.out_channels(),
    );
    v
}

#[derive(Debug)]
pub struct Sd3Transformer2DModel {
    config: Sd3Config,
    pos_embed: PatchEmbed,
    time_text_embed: CombinedTimestepTextProjEmbeddings,
    context_embedder: crate::linear::SiteLinear,
    transformer_blocks: Vec<JointTransformerBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: crate::linear::SiteLinear,
}

fn check_shape(name: &str, t: &Tensor, want: &[Option<i64>]) -> Result<()> {
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

impl Sd3Transformer2DModel {
    pub fn new(p: nn::Path, cfg: &Sd3Config) -> Result<Self> {
        cfg.validate()?;
        let dim = cfg.inner_dim();
        let dual: std::collections::BTreeSet<i64> =
            cfg.dual_attention_layers.iter().copied().collect();
        let blocks = &p / "transformer_blocks";
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                JointTransformerBlock::new(
                    &blocks / i,
                    &BlockConfig {
                        dim,
                        heads: cfg.num_attention_heads,
                        head_dim: cfg.attention_head_dim,
                        context_pre_only: i == cfg.num_layers - 1,
                        qk_norm: cfg.qk_norm.is_some(),
                        dual_attention: dual.contains(&i),
                    },
                )
            })
            .collect();
        Ok(Self {
            config: cfg.clone(),
            pos_embed: PatchEmbed::new(
                &p / "pos_embed",
                cfg.in_channels,
                dim,
                cfg.patch_size,
                cfg.pos_embed_max_size,
                cfg.sample_size / cfg.patch_size,
            ),
            time_text_embed: CombinedTimestepTextProjEmbeddings::new(
                &p / "time_text_embed",
                dim,
                cfg.pooled_projection_dim,
            ),
            context_embedder: crate::linear::linear(
                &p / "context_embedder",
                cfg.joint_attention_dim,
                cfg.caption_projection_dim,
                Default::default(),
            ),
            transformer_blocks,
            norm_out: AdaLayerNormContinuous::new(&p / "norm_out", dim, dim, 1e-6),
            proj_out: crate::linear::linear(
                &p / "proj_out",
                dim,
                cfg.patch_size * cfg.patch_size * cfg.out_channels(),
                Default::default(),
            ),
        })
    }

    pub fn config(&self) -> &Sd3Config {
        &self.config
    }

    pub fn pos_embed(&self) -> &PatchEmbed {
        &self.pos_embed
    }

    /// The dtype of the weights; inputs are cast to it.
    pub fn kind(&self) -> Kind {
        self.proj_out.ws.kind()
    }

    /// `context_embedder` applied to tokens of any float dtype.
    pub fn embed_context(&self, x: &Tensor) -> Tensor {
        self.context_embedder.forward(&x.to_kind(self.kind()))
    }

    /// The diffusers forward. `hook`, when given, is asked at each joint block (`sites[i]`)
    /// for tokens to prepend to the context stream (SoftREPA Algorithm 1): they are
    /// re-injected fresh at each block that has them and their outputs are dropped after it.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        hook: Option<(&dyn SiteHook, &[SiteInfo])>,
    ) -> Result<Tensor> {
        let c = &self.config;
        check_shape(
            "encoder_hidden_states",
            encoder_hidden_states,
            &[
                Some(hidden_states.size().first().copied().unwrap_or(0)),
                None,
                Some(c.joint_attention_dim),
            ],
        )?;
        let ctx = self.embed_context(encoder_hidden_states);
        self.forward_embedded(hidden_states, timestep, &ctx, pooled_projections, hook)
    }

    /// [`Self::forward`] with the context already through `context_embedder`
    /// (`context_embeds`, (B, L, inner_dim)): what a compact encoding cache stores. Soft
    /// tokens in the context space still go through the embedder here.
    pub fn forward_embedded(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        context_embeds: &Tensor,
        pooled_projections: &Tensor,
        hook: Option<(&dyn SiteHook, &[SiteInfo])>,
    ) -> Result<Tensor> {
        let c = &self.config;
        check_shape(
            "hidden_states",
            hidden_states,
            &[None, Some(c.in_channels), None, None],
        )?;
        let sz = hidden_states.size();
        let (b, h, w) = (sz[0], sz[2], sz[3]);
        if h % c.patch_size != 0 || w % c.patch_size != 0 {
            return Err(Error::tensor(
                "hidden_states",
                format!("{h}x{w} is not divisible by patch_size {}", c.patch_size),
            ));
        }
        check_shape("timestep", timestep, &[Some(b)])?;
        check_shape(
            "context_embeds",
            context_embeds,
            &[Some(b), None, Some(c.inner_dim())],
        )?;
        check_shape(
            "pooled_projections",
            pooled_projections,
            &[Some(b), Some(c.pooled_projection_dim)],
        )?;
        if let Some((_, sites)) = hook {
            if sites.len() != self.transformer_blocks.len() {
                return Err(Error::invalid(format!(
                    "sd3: {} sites given for {} joint blocks",
                    sites.len(),
                    self.transformer_blocks.len()
                )));
            }
        }
        let kind = self.kind();
        let mut x = self.pos_embed.forward(&hidden_states.to_kind(kind))?;
        let temb = self
            .time_text_embed
            .forward(timestep, &pooled_projections.to_kind(kind));
        let mut ctx = context_embeds.to_kind(kind);
        let n_text = ctx.size()[1];
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let tokens = match hook {
                Some((hook, sites)) => hook.context_tokens(&sites[i], timestep, b)?,
                None => None,
            };
            let (ctx_out, x_out) = match tokens {
                Some(t) => {
                    let want = match t.space {
                        TokenSpace::Joint => c.inner_dim(),
                        TokenSpace::Context => c.joint_attention_dim,
                    };
                    let site = &hook.expect("tokens come from a hook").1[i].name;
                    check_shape(
                        &format!("tokens at {site}"),
                        &t.tokens,
                        &[Some(b), None, Some(want)],
                    )?;
                    let t = t.into_joint(|v| self.embed_context(v)).to_kind(kind);
                    let n = t.size()[1];
                    let ctx_in = Tensor::cat(&[t, ctx.shallow_clone()], 1);
                    let (co, xo) = block.forward(&x, &ctx_in, &temb);
                    (co.map(|co| co.narrow(1, n, n_text)), xo)
                }
                None => block.forward(&x, &ctx, &temb),
            };
            x = x_out;
            if let Some(co) = ctx_out {
                ctx = co;
            }
        }
        let x = self.proj_out.forward(&self.norm_out.forward(&x, &temb));
        let (p, oc) = (c.patch_size, c.out_channels());
        let (hp, wp) = (h / p, w / p);
        Ok(x.reshape([b, hp, wp, p, p, oc])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, oc, hp * p, wp * p]))
    }
}

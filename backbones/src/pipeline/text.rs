//! Prompt conditioning exactly as diffusers' pipelines build it in `encode_prompt`
//! (diffusers 0.42: StableDiffusionPipeline, StableDiffusionXLPipeline,
//! StableDiffusion3Pipeline), with the text encoders and tokenizers of a pipeline folder.
use std::path::Path;

use softalign_core::backbone::Conditioning;
use softalign_core::{Error, Result};
use tch::{Device, Kind, Tensor};

use super::folder::{model_digest, tokenizer_digest, tokenizer_max_length, PipelineFolder};
use softalign_core::adapter::lora::merge::WeightTarget;

use crate::clip::{ClipTokenizer, TextEncoder};
use crate::t5::{T5Encoder, T5Tokenizer};

/// One CLIP tower with its tokenizer (`text_encoder` + `tokenizer`, or the `_2` pair).
pub struct ClipBranch {
    pub tokenizer: ClipTokenizer,
    pub encoder: TextEncoder,
    /// transformers' `config.use_attention_mask` (SD 1.x pipelines pass the mask when set).
    pub use_attention_mask: bool,
}

impl ClipBranch {
    pub fn load(te: &Path, tok: &Path, device: Device, kind: Kind) -> Result<Self> {
        let tokenizer = ClipTokenizer::from_folder(tok, tokenizer_max_length(tok)?)?;
        let encoder = TextEncoder::load(te, device, kind)?;
        let cfg = te.join("config.json");
        let json = softalign_core::json_file::read_value(&cfg)?;
        let use_attention_mask = match json.get("use_attention_mask") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => {
                return Err(Error::file(
                    &cfg,
                    format!("field `use_attention_mask`: expected true or false, got {other}"),
                ))
            }
        };
        Ok(Self {
            tokenizer,
            encoder,
            use_attention_mask,
        })
    }

    fn run(&self, prompts: &[&str]) -> Result<crate::clip::TextEncoderOutput> {
        let (ids, mask) = self
            .tokenizer
            .encode_batch(prompts, self.encoder.device())?;
        if self.use_attention_mask {
            self.encoder.encode_masked(&ids, Some(&mask))
        } else {
            self.encoder.encode(&ids)
        }
    }
}

pub struct T5Branch {
    pub tokenizer: T5Tokenizer,
    pub encoder: T5Encoder,
}

/// The text side of a pipeline.
pub enum TextConditioner {
    /// SD 1.x / 2.x: `text_encoder(ids)[0]`, the last hidden state, as `encoder_hidden_states`.
    Sd15 { clip: Box<ClipBranch> },
    /// SDXL (and its refiner, which has only the second tower): the towers' penultimate hidden
    /// states concatenated on the feature axis; `text_embeds` = the projected pooled output of
    /// the last tower with a projection.
    Sdxl { clips: Vec<ClipBranch> },
    /// SD3: CLIP-L and bigG penultimate states concatenated, zero-padded to the T5 width, then
    /// T5's last hidden state appended on the sequence axis (zeros of `t5_length` x
    /// `joint_attention_dim` without `text_encoder_3`); pooled = both projected pooled outputs.
    Sd3 {
        clip_l: Box<ClipBranch>,
        clip_g: Box<ClipBranch>,
        t5: Option<Box<T5Branch>>,
        t5_length: usize,
        joint_attention_dim: i64,
    },
}

impl TextConditioner {
    /// The text encoders' weights by pipeline component name, for LoRA files.
    pub fn weight_targets(&self) -> Vec<WeightTarget<'_>> {
        fn t<'a>(c: &str, vs: &'a tch::nn::VarStore) -> WeightTarget<'a> {
            WeightTarget {
                component: c.to_string(),
                vs,
                prefix: String::new(),
            }
        }
        match self {
            Self::Sd15 { clip } => vec![t("text_encoder", clip.encoder.vs())],
            Self::Sdxl { clips } => {
                // The refiner has only the second tower.
                let names: &[&str] = if clips.len() == 1 {
                    &["text_encoder_2"]
                } else {
                    &["text_encoder", "text_encoder_2"]
                };
                clips
                    .iter()
                    .zip(names)
                    .map(|(c, n)| t(n, c.encoder.vs()))
                    .collect()
            }
            Self::Sd3 {
                clip_l, clip_g, t5, ..
            } => {
                let mut v = vec![
                    t("text_encoder", clip_l.encoder.vs()),
                    t("text_encoder_2", clip_g.encoder.vs()),
                ];
                if let Some(t5) = t5 {
                    v.push(t("text_encoder_3", t5.encoder.vs()));
                }
                v
            }
        }
    }
}

/// The dtype T5 runs in: the pipeline's, except fp16, whose range T5's activations overflow
/// (bf16 on a GPU, f32 on the CPU).
pub fn t5_kind(kind: Kind, device: Device) -> Kind {
    match (kind, device) {
        (Kind::Half, Device::Cpu) => Kind::Float,
        (Kind::Half, _) => Kind::BFloat16,
        (k, _) => k,
    }
}

impl TextConditioner {
    pub fn load_sd15(f: &PipelineFolder, device: Device, kind: Kind) -> Result<Self> {
        let clip = Box::new(ClipBranch::load(
            &f.require("text_encoder")?,
            &f.require("tokenizer")?,
            device,
            kind,
        )?);
        Ok(Self::Sd15 { clip })
    }

    pub fn load_sdxl(f: &PipelineFolder, device: Device, kind: Kind) -> Result<Self> {
        let mut clips = Vec::new();
        if let Some((te, tok)) = f.text_pair("text_encoder", "tokenizer")? {
            clips.push(ClipBranch::load(&te, &tok, device, kind)?);
        }
        clips.push(ClipBranch::load(
            &f.require("text_encoder_2")?,
            &f.require("tokenizer_2")?,
            device,
            kind,
        )?);
        Ok(Self::Sdxl { clips })
    }

    pub fn load_sd3(
        f: &PipelineFolder,
        device: Device,
        kind: Kind,
        t5_length: usize,
        joint_attention_dim: i64,
    ) -> Result<Self> {
        let clip_l = ClipBranch::load(
            &f.require("text_encoder")?,
            &f.require("tokenizer")?,
            device,
            kind,
        )?;
        let clip_g = ClipBranch::load(
            &f.require("text_encoder_2")?,
            &f.require("tokenizer_2")?,
            device,
            kind,
        )?;
        // `null` in model_index.json is the deliberate no-T5 choice (zeros); a listed but
        // missing T5 is an error from `text_pair`.
        let t5 = match f.text_pair("text_encoder_3", "tokenizer_3")? {
            Some((te, tok)) => Some(Box::new(T5Branch {
                tokenizer: T5Tokenizer::from_file(&tok, t5_length)?,
                encoder: T5Encoder::load(&te, device, t5_kind(kind, device))?,
            })),
            None => None,
        };
        Ok(Self::Sd3 {
            clip_l: Box::new(clip_l),
            clip_g: Box::new(clip_g),
            t5,
            t5_length,
            joint_attention_dim,
        })
    }

    /// Prompts to the denoiser's conditioning (without SDXL's `time_ids`, which depend on the
    /// image size and are built by the UNet backbone from the sample it denoises).
    pub fn encode(&self, prompts: &[String]) -> Result<Conditioning> {
        let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        match self {
            Self::Sd15 { clip } => {
                let out = clip.run(&texts)?;
                Ok(Conditioning::new().with("encoder_hidden_states", out.last_hidden_state))
            }
            Self::Sdxl { clips } => {
                let mut states = Vec::new();
                let mut pooled = None;
                for c in clips {
                    let out = c.run(&texts)?;
                    // diffusers keeps the first 2-D `[0]` output: a projection's text_embeds.
                    if pooled.is_none() {
                        pooled = out.text_embeds.as_ref().map(Tensor::shallow_clone);
                    }
                    states.push(out.penultimate().shallow_clone());
                }
                let pooled = pooled.ok_or_else(|| {
                    Error::invalid(
                        "SDXL pipeline: no text encoder with a projection (text_encoder_2 must \
                         be a CLIPTextModelWithProjection) for `text_embeds`",
                    )
                })?;
                let ehs = Tensor::cat(&states, -1);
                let dev = ehs.device();
                Ok(Conditioning::new()
                    .with("encoder_hidden_states", ehs)
                    .with("text_embeds", pooled.to_device(dev)))
            }
            Self::Sd3 {
                clip_l,
                clip_g,
                t5,
                t5_length,
                joint_attention_dim,
            } => {
                let l = clip_l.run(&texts)?;
                let g = clip_g.run(&texts)?;
                let projected = |o: &crate::clip::TextEncoderOutput, which: &str| {
                    o.text_embeds
                        .as_ref()
                        .map(Tensor::shallow_clone)
                        .ok_or_else(|| {
                            Error::invalid(format!(
                                "SD3 pipeline: {which} has no text projection \
                             (CLIPTextModelWithProjection expected)"
                            ))
                        })
                };
                let pooled = Tensor::cat(
                    &[
                        projected(&l, "text_encoder")?,
                        projected(&g, "text_encoder_2")?,
                    ],
                    -1,
                );
                let kind = l.penultimate().kind();
                let clip = Tensor::cat(&[l.penultimate(), g.penultimate()], -1);
                let dev = clip.device();
                let t5_states = match t5 {
                    Some(t5) => {
                        let ids = t5.tokenizer.encode_batch(&texts, t5.encoder.device())?.0;
                        t5.encoder.encode(&ids)?.last_hidden_state
                    }
                    None => Tensor::zeros(
                        [texts.len() as i64, *t5_length as i64, *joint_attention_dim],
                        (kind, dev),
                    ),
                };
                let width = t5_states.size()[2];
                let have = clip.size()[2];
                if have > width {
                    return Err(Error::invalid(format!(
                        "SD3 pipeline: CLIP features ({have}) are wider than T5's ({width})"
                    )));
                }
                let clip = clip.constant_pad_nd([0, width - have]);
                let t5_states = t5_states.to_device(dev).to_kind(kind);
                Ok(Conditioning::new()
                    .with("encoder_hidden_states", Tensor::cat(&[clip, t5_states], 1))
                    .with("pooled_projections", pooled))
            }
        }
    }

    /// The files and settings that decide [`Self::encode`]'s output, read from the folder
    /// alone (so a backbone built without the encoders fingerprints the same).
    pub fn fingerprint(
        f: &PipelineFolder,
        flavour: &str,
        t5_length: Option<usize>,
    ) -> Result<serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("pipeline".into(), flavour.into());
        for (te, tok) in [
            ("text_encoder", "tokenizer"),
            ("text_encoder_2", "tokenizer_2"),
            ("text_encoder_3", "tokenizer_3"),
        ] {
            if let Some((te_dir, tok_dir)) = f.text_pair(te, tok)? {
                m.insert(te.into(), model_digest(&te_dir, "model")?);
                m.insert(tok.into(), tokenizer_digest(&tok_dir)?);
                if tok != "tokenizer_3" {
                    m.insert(
                        format!("{tok}.max_length"),
                        tokenizer_max_length(&tok_dir)?.into(),
                    );
                }
            }
        }
        if let Some(n) = t5_length {
            m.insert("t5_max_length".into(), n.into());
        }
        Ok(m.into())
    }
}

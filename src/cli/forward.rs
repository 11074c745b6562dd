//! `softalign forward`: one denoiser forward on tensors from a safetensors file, for parity
//! checks against diffusers and for debugging adapters.
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use softalign_backbones::sd3::Sd3Spec;
use softalign_core::adapter::{load_adapter, Injection, TokenSelection};
use softalign_core::backbone::Conditioning;
use softalign_core::dtype::{DType, DeviceSpec};
use softalign_core::plugin::{BackboneSpec, BuildContext};
use softalign_core::site::SiteHook;
use softalign_core::tensors::{save_safetensors, MappedSafetensors};
use tch::Kind;

#[derive(clap::Args)]
pub struct Args {
    /// An SD3 transformer folder (config.json + diffusion_pytorch_model*.safetensors, or .bin)
    /// or a pipeline folder holding `transformer/`; or a UNet folder / SD1.x-SDXL pipeline folder;
    /// or a transformers text-encoder folder (CLIP, T5: `input_ids` -> `last_hidden_state`,
    /// `hidden_states.N`, `pooler_output`, `text_embeds`), or an AutoencoderKL folder
    /// (`sample` -> `latent_dist.mean`, `latent_dist.std`; `latents` -> `sample`).
    #[arg(long)]
    pub model: PathBuf,
    /// A UNet folder that replaces the model's UNet (a Diffusion-DPO release); UNet models only.
    #[arg(long)]
    pub unet: Option<PathBuf>,
    /// Safetensors file with the forward's arguments, named as in diffusers: SD3
    /// `hidden_states` (B, C, H, W), `timestep` (B,), `encoder_hidden_states` (B, L, D),
    /// `pooled_projections` (B, P); UNet `sample`, `timestep`, `encoder_hidden_states`, and
    /// for SDXL `text_embeds`, `time_ids`.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write `sample` (fp32).
    #[arg(long)]
    pub output: PathBuf,
    /// An adapter file (e.g. soft tokens) to apply; its first token set is used.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Token set of the adapter to use (default: its first).
    #[arg(long)]
    pub token_set: Option<String>,
    /// A LoRA file or folder merged into the model at load, optionally scaled
    /// (`FILE[:SCALE]`, repeatable, stacked in order).
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<String>,
    /// Apply the `--lora` files unmerged, at the linear sites during the forward (what
    /// training does), instead of merging them into the weights.
    #[arg(long, requires = "loras")]
    pub unmerged: bool,
    /// Weight precision: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dtype = DType::parse(&a.dtype).context("--dtype")?;
    let device = DeviceSpec::parse(&a.device)
        .and_then(|d| d.resolve())
        .context("--device")?;
    if let Some(text) = super::forward_text::detect(&a.model) {
        return super::forward_text::run(
            text,
            &a.model,
            &a.inputs,
            &a.output,
            device,
            dtype.kind(),
        );
    }
    if super::forward_vae::detect(&a.model) {
        return super::forward_vae::run(&a.model, &a.inputs, &a.output, device, dtype.kind());
    }
    let ctx = BuildContext {
        device,
        recipe_dir: PathBuf::from("."),
        dtype_override: Some(dtype),
        empty_prompt: Default::default(),
    };
    let (backbone, sample_name) = if super::forward_unet::is_unet(&a.model) {
        let b = super::forward_unet::build(&a.model, a.unet.as_ref(), &ctx)?;
        (b, super::forward_unet::SAMPLE)
    } else {
        if a.unet.is_some() {
            anyhow::bail!(
                "--unet applies to UNet models; {} is not one",
                a.model.display()
            );
        }
        let spec = Sd3Spec::from_path(&a.model);
        let b = spec
            .build(&ctx)
            .with_context(|| format!("loading the model from {}", a.model.display()))?;
        (b, "hidden_states")
    };
    let file = MappedSafetensors::open(&a.inputs)
        .with_context(|| format!("reading inputs {}", a.inputs.display()))?;
    let get = |name: &str| {
        file.tensor(name)
            .with_context(|| format!("{}: tensor `{name}`", a.inputs.display()))
            .map(|t| t.to_device(device))
    };
    let x = get(sample_name)?;
    let t = get("timestep")?.to_kind(Kind::Float);
    let mut cond = Conditioning::new();
    for name in &backbone.info().conditioning {
        cond = cond.with(name, get(name)?);
    }
    let mut adapters: Vec<Box<dyn softalign_core::adapter::Adapter>> = match &a.adapter {
        Some(p) => vec![load_adapter(p, backbone.info(), device)
            .with_context(|| format!("loading adapter {}", p.display()))?],
        None => Vec::new(),
    };
    if a.unmerged {
        use softalign_core::adapter::lora::{merge, Lora};
        for s in &a.loras {
            let r = merge::LoraRef::parse(s)?;
            let w = merge::read_for(backbone.as_ref(), &r.path)?;
            let l = Lora::from_weights(&w, backbone.info(), r.scale)?;
            adapters.push(Box::new(l.to_device(device)));
        }
    } else {
        super::model::merge_loras(backbone.as_ref(), &a.loras)?;
    }
    let inj = Injection {
        adapters: &adapters,
        selection: TokenSelection::new(a.token_set.clone(), false),
    };
    let hook = (!adapters.is_empty()).then_some(&inj as &dyn SiteHook);
    let _guard = tch::no_grad_guard();
    let sample = backbone.forward(&x, &t, &cond, hook).context("forward")?;
    save_safetensors(
        &a.output,
        &[("sample".to_string(), sample.to_kind(Kind::Float))],
        &BTreeMap::new(),
    )
    .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "wrote `sample` {:?} to {}",
        sample.size(),
        a.output.display()
    );
    Ok(())
}

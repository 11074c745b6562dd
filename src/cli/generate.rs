//! The generation loop: prompts in, RGB images out, with classifier-free guidance and the
//! model's soft tokens in both branches. Image k of prompt p starts from noise seeded by
//! (seed, p, k) alone, so any two models (base, + tokens) compare on the same noise whatever
//! the batching.
use anyhow::{bail, Context};
use image::RgbImage;
use softalign_backbones::schedulers::ddim::DdimSpec;
use softalign_backbones::schedulers::flow_match_euler::FlowMatchEulerSpec;
use softalign_core::backbone::Prediction;
use softalign_core::plugin::SamplerSpec;
use softalign_core::sampler::Sampler;
use softalign_core::sampler::{Guidance, SampleRequest};
use softalign_core::train::seed::micro_seed;
use tch::{Device, Kind, Tensor};

use super::model::Model;

/// Keeps sampling seeds apart from training's micro-batch seeds of the same run seed.
const SAMPLE_DOMAIN: u64 = 0x5A4D_504C_4500_0000;

#[derive(clap::Args, Debug, Clone)]
pub struct GenSettings {
    /// Images per prompt.
    #[arg(long, default_value_t = 4)]
    pub n: usize,
    /// Noise seed: image k of prompt p uses a seed derived from (seed, p, k).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling steps (default: 28 for flow-matching models, FlowMatch Euler; 30 for DDPM
    /// UNets, DDIM as SoftREPA samples SD 1.5 / SDXL).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale, 1: none (default: 4 for flow matching, 7 for DDIM).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// FlowMatch Euler's timestep shift (default: the model folder's scheduler_config.json
    /// `shift`, else 3).
    #[arg(long)]
    pub shift: Option<f64>,
    /// Images per backbone forward (each guidance branch).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Image height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<i64>,
    /// Image width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<i64>,
}

impl Default for GenSettings {
    fn default() -> Self {
        Self {
            n: 4,
            seed: 0,
            steps: None,
            guidance: None,
            shift: None,
            batch: 64,
            height: None,
            width: None,
        }
    }
}

/// The sampler a model samples with and the guidance scale, from the settings, the model's
/// prediction type and its folder's scheduler_config.json.
pub struct Resolved {
    pub sampler: Box<dyn Sampler>,
    pub guidance: f64,
    pub description: String,
}

pub fn resolve(
    s: &GenSettings,
    prediction: Prediction,
    scheduler: Option<&serde_json::Value>,
) -> anyhow::Result<Resolved> {
    let get = |k: &str| scheduler.and_then(|c| c.get(k));
    if prediction == Prediction::Velocity {
        let steps = s.steps.unwrap_or(28);
        let shift = s
            .shift
            .or_else(|| get("shift").and_then(|v| v.as_f64()))
            .unwrap_or(3.0);
        let guidance = s.guidance.unwrap_or(4.0);
        let sampler = FlowMatchEulerSpec { steps, shift }.build()?;
        return Ok(Resolved {
            sampler,
            guidance,
            description: format!("FlowMatch Euler {steps} steps, shift {shift}"),
        });
    }
    if s.shift.is_some() {
        bail!("--shift is a FlowMatch Euler setting; this model samples with DDIM");
    }
    let steps = s.steps.unwrap_or(30);
    let guidance = s.guidance.unwrap_or(7.0);
    let spec = DdimSpec::from_scheduler_config(scheduler, steps)?;
    let description = format!(
        "DDIM {steps} steps ({:?} spacing, eta 0)",
        spec.timestep_spacing
    );
    Ok(Resolved {
        sampler: spec.build()?,
        guidance,
        description,
    })
}

/// The noise seed of image `k` of prompt `p`.
pub fn noise_seed(seed: u64, prompt: usize, k: usize) -> u64 {
    micro_seed(seed ^ SAMPLE_DOMAIN, prompt as u64, k as u32)
}

/// Generates `settings.n` images for each prompt; `on_prompt(p, images)` sees each prompt's
/// images as soon as they are done (writing them, advancing a progress bar). Prompt indices
/// are positions in `prompts` and name the noise seeds. Returns the sampler and guidance used.
pub fn generate(
    model: &Model,
    prompts: &[String],
    s: &GenSettings,
    mut on_prompt: impl FnMut(usize, Vec<RgbImage>) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let _guard = tch::no_grad_guard();
    let bb = model.backbone.as_ref();
    if s.n == 0 {
        bail!("--n must be at least 1");
    }
    let shape = match (s.height, s.width) {
        (None, None) => bb.sample_shape().with_context(|| {
            format!(
                "backbone `{}` does not say its native size: give --height and --width",
                bb.info().kind
            )
        })?,
        (h, w) => {
            // One side given: a square image.
            let (h, w) = (h.or(w).unwrap_or(0), w.or(h).unwrap_or(0));
            bb.sample_shape_for(h, w)?
        }
    };
    let r = resolve(s, bb.info().prediction, model.scheduler_config.as_ref())?;
    let sampler = r.sampler;
    let dev = bb.device();
    let null = bb.null_conditioning().context("encoding the null prompt")?;
    let per_batch = (s.batch / s.n).max(1);
    for (chunk_no, chunk) in prompts.chunks(per_batch).enumerate() {
        let first = chunk_no * per_batch;
        let b = (chunk.len() * s.n) as i64;
        let mut noise = Vec::with_capacity(b as usize);
        for p in 0..chunk.len() {
            for k in 0..s.n {
                tch::manual_seed(noise_seed(s.seed, first + p, k) as i64);
                noise.push(Tensor::randn(shape, (Kind::Float, Device::Cpu)));
            }
        }
        let noise = Tensor::stack(&noise, 0).to_device(dev);
        let cond = bb.encode_prompts(chunk).context("encoding the prompts")?;
        let rows: Vec<i64> = (0..chunk.len() as i64)
            .flat_map(|p| std::iter::repeat_n(p, s.n))
            .collect();
        let cond = cond.index_select(&Tensor::from_slice(&rows));
        let uncond = null.index_select(&Tensor::zeros([b], (Kind::Int64, Device::Cpu)));
        let samples = sampler.sample(SampleRequest {
            backbone: bb,
            adapters: &model.adapters,
            noise,
            cond: &cond,
            uncond: Some(&uncond),
            guidance: Guidance {
                scale: r.guidance,
                cond_tokens: model.selection.clone(),
                uncond_tokens: model.selection.clone(),
            },
            progress: false,
        })?;
        let images = to_images(&bb.decode(&samples)?)?;
        let mut images = images.into_iter();
        for p in 0..chunk.len() {
            on_prompt(first + p, images.by_ref().take(s.n).collect())?;
        }
    }
    Ok(format!("{}, guidance {}", r.description, r.guidance))
}

/// (B, 3, H, W) in [-1, 1] to 8-bit RGB images.
pub fn to_images(x: &Tensor) -> anyhow::Result<Vec<RgbImage>> {
    let size = x.size();
    let &[b, 3, h, w] = size.as_slice() else {
        bail!("decoded images have shape {size:?}; expected (B, 3, H, W)");
    };
    let x = x.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
    (0..b)
        .map(|i| {
            let data = Vec::<f32>::try_from(x.get(i).flatten(0, -1))?;
            softalign_worlds::shapes::from_signed_chw(&data, w as u32, h as u32)
                .context("decoded image of the wrong size")
        })
        .collect()
}

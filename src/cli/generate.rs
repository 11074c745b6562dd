//! The generation loop: prompts in, RGB images out, with classifier-free guidance and the
//! model's soft tokens in both branches. Image k of prompt p starts from noise seeded by
//! (seed, p, k) alone, so any two models (base, + tokens) compare on the same noise whatever
//! the batching.
use anyhow::{bail, Context};
use image::RgbImage;
use softalign_backbones::schedulers::ddim::{DdimSpec, Spacing, SCHEDULER_CONFIG_KEYS};
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

/// The noise schedule the model was trained with: taken from its folder even when a recipe's
/// `[sampler]` fills the other DDIM settings (a recipe's resolved table always holds the
/// defaults, which are not necessarily this model's betas).
const NOISE_SCHEDULE_KEYS: [&str; 4] = [
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
];

/// Where a sampling setting came from, for the summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Recipe,
    Folder,
    Default,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Flag => "command line",
            Origin::Recipe => "recipe [sampler]",
            Origin::Folder => "model folder",
            Origin::Default => "default",
        })
    }
}

/// A flag's value, else the recipe's, else the fallback.
fn pick<T>(flag: Option<T>, recipe: Option<T>, fallback: (T, Origin)) -> (T, Origin) {
    match (flag, recipe) {
        (Some(v), _) => (v, Origin::Flag),
        (None, Some(v)) => (v, Origin::Recipe),
        (None, None) => fallback,
    }
}

impl GenSettings {
    /// Values no sampler can use, refused before any model is loaded.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.n == 0 {
            bail!("--n must be at least 1");
        }
        if self.batch == 0 {
            bail!("--batch must be at least 1");
        }
        if self.steps == Some(0) {
            bail!("--steps must be at least 1");
        }
        if let Some(g) = self.guidance {
            if !g.is_finite() || g < 0.0 {
                bail!(
                    "--guidance {g}: the guidance scale must be a finite number >= 0 (1 or less \
                     turns classifier-free guidance off)"
                );
            }
        }
        if let Some(s) = self.shift {
            if !(s.is_finite() && s > 0.0) {
                bail!("--shift {s}: the timestep shift must be a positive number");
            }
        }
        for (flag, v) in [("--height", self.height), ("--width", self.width)] {
            if let Some(v) = v.filter(|&v| v <= 0) {
                bail!("{flag} {v}: image sides must be positive");
            }
        }
        Ok(())
    }
}

/// The sampler and guidance: the command line's settings first, then the recipe's `[sampler]`
/// (`recipe`, its resolved JSON, when the model came from a recipe), then the model folder's
/// scheduler_config.json, then the defaults for the model's prediction type.
pub fn resolve(
    s: &GenSettings,
    prediction: Prediction,
    scheduler: Option<&serde_json::Value>,
    recipe: Option<&serde_json::Value>,
) -> anyhow::Result<Resolved> {
    s.validate()?;
    let get = |k: &str| scheduler.and_then(|c| c.get(k));
    let from_recipe = |k: &str| recipe.and_then(|r| r.get(k));
    let recipe_type = from_recipe("type").and_then(|t| t.as_str());
    let recipe_guidance = from_recipe("guidance").and_then(|v| v.as_f64());
    let recipe_steps = from_recipe("steps")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize);
    if prediction == Prediction::Velocity {
        if let Some(t) = recipe_type.filter(|t| *t != "flow_match_euler") {
            bail!(
                "the recipe's [sampler] is `{t}`, but this model predicts a flow-matching \
                 velocity: use type = \"flow_match_euler\""
            );
        }
        let (steps, steps_from) = pick(s.steps, recipe_steps, (28, Origin::Default));
        let folder_shift = get("shift").and_then(|v| v.as_f64());
        let (shift, shift_from) = pick(
            s.shift,
            from_recipe("shift").and_then(|v| v.as_f64()),
            match folder_shift {
                Some(v) => (v, Origin::Folder),
                None => (3.0, Origin::Default),
            },
        );
        let (guidance, guidance_from) = pick(s.guidance, recipe_guidance, (4.0, Origin::Default));
        let sampler = FlowMatchEulerSpec {
            steps,
            shift,
            guidance: None,
        }
        .build()?;
        return Ok(Resolved {
            sampler,
            guidance,
            description: format!(
                "FlowMatch Euler {steps} steps, shift {shift}, {} (steps: {steps_from}, \
                 shift: {shift_from}, guidance: {guidance_from})",
                guidance_text(guidance)
            ),
        });
    }
    if let Some(t) = recipe_type.filter(|t| *t != "ddim") {
        bail!(
            "the recipe's [sampler] is `{t}`, but this model is a DDPM model (epsilon or v \
             prediction): use type = \"ddim\""
        );
    }
    if s.shift.is_some() {
        bail!("--shift is a FlowMatch Euler setting; this model samples with DDIM");
    }
    let (steps, steps_from) = pick(s.steps, recipe_steps, (30, Origin::Default));
    let (guidance, guidance_from) = pick(s.guidance, recipe_guidance, (7.0, Origin::Default));
    let mut spec = serde_json::Map::new();
    if let Some(r) = recipe.and_then(|r| r.as_object()) {
        for (k, v) in r {
            if k != "type" && !NOISE_SCHEDULE_KEYS.contains(&k.as_str()) {
                spec.insert(k.clone(), v.clone());
            }
        }
    }
    for k in SCHEDULER_CONFIG_KEYS {
        let keep_recipe = recipe.is_some() && !NOISE_SCHEDULE_KEYS.contains(&k);
        if keep_recipe {
            continue;
        }
        if let Some(v) = get(k).filter(|v| !v.is_null()) {
            spec.insert(k.into(), v.clone());
        }
    }
    spec.insert("steps".into(), steps.into());
    let spec: DdimSpec = serde_json::from_value(spec.into()).context(if recipe.is_some() {
        "the recipe's [sampler] with the model's noise schedule does not make a DDIM schedule"
    } else {
        "the model's scheduler_config.json does not make a DDIM schedule"
    })?;
    let spacing = match spec.timestep_spacing {
        Spacing::Leading => "leading",
        Spacing::Trailing => "trailing",
        Spacing::Linspace => "linspace",
    };
    let rest_from = if recipe.is_some() {
        Origin::Recipe
    } else if scheduler.is_some() {
        Origin::Folder
    } else {
        Origin::Default
    };
    let description = format!(
        "DDIM {steps} steps ({spacing} spacing, eta {}{}), {} (steps: {steps_from}, \
         guidance: {guidance_from}, schedule: {rest_from})",
        spec.eta,
        if spec.zero_uncond {
            ", zero unconditional branch"
        } else {
            ""
        },
        guidance_text(guidance)
    );
    Ok(Resolved {
        sampler: spec.build()?,
        guidance,
        description,
    })
}

/// Guidance as the summary states it: at or below 1 the samplers run no unconditional branch.
pub fn guidance_text(scale: f64) -> String {
    if scale > 1.0 {
        format!("guidance {scale}")
    } else {
        format!("guidance off (scale {scale} <= 1: no unconditional branch)")
    }
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
    s.validate()?;
    let _guard = tch::no_grad_guard();
    let bb = model.backbone.as_ref();
    let shape = match (s.height, s.width) {
        (None, None) => bb.sample_shape().with_context(|| {
            format!(
                "backbone `{}` does not say its native size: give --height and --width",
                bb.info().kind
            )
        })?,
        (h, w) => {
            // One side given: the other is the model's native one (as the help says).
            let native = bb.native_image_size();
            let side = |given: Option<i64>, native: Option<i64>, flag: &str| {
                given.or(native).with_context(|| {
                    format!(
                        "backbone `{}` does not say its native size: give {flag} too",
                        bb.info().kind
                    )
                })
            };
            let h = side(h, native.map(|n| n.0), "--height")?;
            let w = side(w, native.map(|n| n.1), "--width")?;
            bb.sample_shape_for(h, w)?
        }
    };
    let r = resolve(
        s,
        bb.info().prediction,
        model.scheduler_config.as_ref(),
        model.recipe_sampler.as_ref(),
    )?;
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
    Ok(r.description)
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

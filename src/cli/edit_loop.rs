//! The editing loop behind `edit` and `eval-edit`: source images and prompt pairs in, edited
//! images out, FlowEdit in batches of equal-sized images. Edit j's noise draws are seeded by
//! (seed, j, draw index) alone, so an edit is the same whatever the batching, and base and
//! + tokens are compared on the same noise.
use anyhow::{bail, Context};
use image::RgbImage;
use softalign_backbones::schedulers::flow_edit::{
    flow_edit, Draw, FlowEditRequest, FlowEditSettings,
};
use softalign_core::backbone::Prediction;
use softalign_core::train::seed::micro_seed;
use tch::{Device, Kind, Tensor};

use super::generate::{to_images, Origin};
use super::model::Model;

/// Keeps editing seeds apart from sampling's and training's of the same seed value.
pub const EDIT_DOMAIN: u64 = 0xED17_F10E_0000_0000;

#[derive(clap::Args, Debug, Clone)]
pub struct EditSettings {
    /// FlowEdit's T: steps of the FlowMatch Euler schedule.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Editing starts at step T - n_max (FlowEdit's SD3 default 33; SoftREPA edits with 30
    /// when its tokens are on).
    #[arg(long, default_value_t = 33)]
    pub n_max: usize,
    /// The last n_min steps sample the target from the edit so far (SDEdit-style).
    #[arg(long, default_value_t = 0)]
    pub n_min: usize,
    /// Noise draws averaged per editing step.
    #[arg(long, default_value_t = 1)]
    pub n_avg: usize,
    /// Source CFG scale, standard formula u + s (c - u).
    #[arg(long, default_value_t = 3.5)]
    pub src_guidance: f64,
    /// Target CFG scale, standard formula u + s (c - u) as FlowEdit. SoftREPA's edit_sd3.py
    /// writes v_c + s (v_c - v_null): its target scale s is our s + 1 (its 9 is our 10).
    #[arg(long, default_value_t = 13.5)]
    pub tar_guidance: f64,
    /// FlowMatch Euler's timestep shift (default: the recipe's [sampler], else the model
    /// folder's scheduler_config.json `shift`, else 3).
    #[arg(long)]
    pub shift: Option<f64>,
    /// Noise seed: edit j's draws use seeds derived from (seed, j, draw).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Edits per batch (each backbone forward then holds 4 x this many samples).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
}

impl Default for EditSettings {
    fn default() -> Self {
        let d = FlowEditSettings::default();
        Self {
            steps: d.steps,
            n_max: d.n_max,
            n_min: d.n_min,
            n_avg: d.n_avg,
            src_guidance: d.src_guidance,
            tar_guidance: d.tar_guidance,
            shift: None,
            seed: 42,
            batch: 8,
        }
    }
}

impl EditSettings {
    /// FlowEdit's settings for `model`, and where the shift came from.
    pub fn resolve(&self, model: &Model) -> anyhow::Result<(FlowEditSettings, Origin)> {
        if self.batch == 0 {
            bail!("--batch must be at least 1");
        }
        let from = |v: Option<&serde_json::Value>| v.and_then(|s| s.get("shift")?.as_f64());
        let (shift, origin) = match (
            self.shift,
            from(model.recipe_sampler.as_ref()),
            from(model.scheduler_config.as_ref()),
        ) {
            (Some(s), _, _) => (s, Origin::Flag),
            (None, Some(s), _) => (s, Origin::Recipe),
            (None, None, Some(s)) => (s, Origin::Folder),
            (None, None, None) => (3.0, Origin::Default),
        };
        let s = FlowEditSettings {
            steps: self.steps,
            n_max: self.n_max,
            n_min: self.n_min,
            n_avg: self.n_avg,
            src_guidance: self.src_guidance,
            tar_guidance: self.tar_guidance,
            shift,
        };
        s.validate()?;
        Ok((s, origin))
    }
}

/// One edit: a source image (RGB) and its source and target prompts.
#[derive(Debug, Clone)]
pub struct EditJob {
    pub image: RgbImage,
    pub source: String,
    pub target: String,
}

/// What one batch produced, in job order from `first`.
pub struct EditedBatch {
    pub first: usize,
    /// Clean source latents (the posterior mode) and the edited latents, (B, C, h, w) fp32.
    pub x_src: Tensor,
    pub edited: Tensor,
    pub images: Vec<RgbImage>,
}

/// The noise seed of draw `draw` of edit `job`.
pub fn noise_seed(seed: u64, job: usize, draw: u64) -> u64 {
    micro_seed(seed ^ EDIT_DOMAIN, job as u64, draw as u32)
}

/// An RGB image as (3, H, W) in [-1, 1].
pub fn image_tensor(img: &RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    let data = softalign_worlds::shapes::to_signed_chw(img);
    Tensor::from_slice(&data).view([3, h as i64, w as i64])
}

/// A description of the settings for summaries and records.
pub fn describe(s: &FlowEditSettings, shift_from: Origin) -> String {
    format!(
        "FlowEdit T {} n_max {} n_min {} n_avg {}, CFG src {} tar {} (standard), shift {} ({shift_from})",
        s.steps, s.n_max, s.n_min, s.n_avg, s.src_guidance, s.tar_guidance, s.shift
    )
}

/// Runs FlowEdit on `jobs` with `model` (its adapter's tokens, if any, in all four branches),
/// consecutive jobs of one image size batched `batch` at a time; `on_batch` sees each batch as
/// soon as it is done and `on_step(n)` each step that ran for n edits.
pub fn edit_jobs(
    model: &Model,
    jobs: &[EditJob],
    settings: &FlowEditSettings,
    seed: u64,
    batch: usize,
    mut on_batch: impl FnMut(EditedBatch) -> anyhow::Result<()>,
    mut on_step: impl FnMut(usize),
) -> anyhow::Result<()> {
    let bb = model.backbone.as_ref();
    if bb.info().prediction != Prediction::Velocity {
        bail!(
            "backbone `{}` is not a flow-matching model: FlowEdit needs a velocity (SD3 / SD3.5 \
             folders, the shapes MMDiT)",
            bb.info().kind
        );
    }
    let _guard = tch::no_grad_guard();
    let null = bb
        .null_conditioning()
        .context("encoding the empty prompt")?;
    let mut first = 0;
    while first < jobs.len() {
        let dims = jobs[first].image.dimensions();
        let mut end = first + 1;
        while end < jobs.len() && end - first < batch.max(1) && jobs[end].image.dimensions() == dims
        {
            end += 1;
        }
        let chunk = &jobs[first..end];
        let b = chunk.len() as i64;
        let images = Tensor::stack(
            &chunk
                .iter()
                .map(|j| image_tensor(&j.image))
                .collect::<Vec<_>>(),
            0,
        )
        .to_device(bb.device());
        // FlowEdit encodes the source with the posterior's mode (the mean), not a sample.
        let (x_src, _) = bb.image_posterior(&images).with_context(|| {
            format!(
                "encoding source images of {}x{} px (edits {first}..{end})",
                dims.0, dims.1
            )
        })?;
        let x_src = x_src.to_kind(Kind::Float);
        let shape = x_src.size();
        let src_texts: Vec<String> = chunk.iter().map(|j| j.source.clone()).collect();
        let tar_texts: Vec<String> = chunk.iter().map(|j| j.target.clone()).collect();
        let src = bb
            .encode_prompts(&src_texts)
            .context("encoding the source prompts")?;
        let tar = bb
            .encode_prompts(&tar_texts)
            .context("encoding the target prompts")?;
        let nulls = null.index_select(&Tensor::zeros([b], (Kind::Int64, Device::Cpu)));
        let req = FlowEditRequest {
            backbone: bb,
            adapters: &model.adapters,
            tokens: model.selection.clone(),
            x_src: &x_src,
            src: &src,
            src_null: &nulls,
            tar: &tar,
            tar_null: &nulls,
        };
        let draw = |d: Draw| -> softalign_core::Result<Tensor> {
            let idx = d.index(settings.n_avg);
            let rows: Vec<Tensor> = (first..end)
                .map(|j| {
                    tch::manual_seed(noise_seed(seed, j, idx) as i64);
                    Tensor::randn(&shape[1..], (Kind::Float, Device::Cpu))
                })
                .collect();
            Ok(Tensor::stack(&rows, 0))
        };
        let edited = flow_edit(&req, settings, draw, || on_step(chunk.len()))
            .with_context(|| format!("FlowEdit on edits {first}..{end}"))?;
        let out = to_images(&bb.decode(&edited).context("decoding the edited latents")?)?;
        on_batch(EditedBatch {
            first,
            x_src,
            edited,
            images: out,
        })?;
        first = end;
    }
    Ok(())
}

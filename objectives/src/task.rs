//! `ObjectiveTask`: what the trainer drives when a recipe trains adapters (or nothing, for a
//! dry run) with objectives on a dataset. Each micro-step draws B distinct samples, one
//! timestep broadcast to the B images and the noise (shared or per image) from torch's global
//! generator, which the trainer seeds per micro-step; the order of the draws is fixed
//! (indices, timestep, noise) so a run is reproducible.
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

use softalign_core::adapter::{save_adapter, Adapter};
use softalign_core::backbone::Backbone;
use softalign_core::dataset::Dataset;
use softalign_core::objective::Objective;
use softalign_core::train::config::{BatchScope, TrainMode};
use softalign_core::train::precision::full_parameters;
use softalign_core::train::{Collective, MicroStep, TrainConfig, TrainTask};
use softalign_core::{Error, Result};
use tch::{Kind, Tensor};

use crate::step::{StepContext, StepInputs, StepOptions, StepResult};

/// Evaluates `objectives` on one fixed step (the `softalign loss` dry run, and each training
/// micro-step). `adapters = None` runs the bare backbone.
pub fn evaluate(
    backbone: &dyn Backbone,
    adapters: Option<&[Box<dyn Adapter>]>,
    objectives: &[Box<dyn Objective>],
    inputs: StepInputs,
    opts: &StepOptions,
) -> Result<StepResult> {
    StepContext::new(backbone, adapters, inputs)?.run(objectives, opts)
}

pub struct ObjectiveTask {
    pub backbone: Box<dyn Backbone>,
    pub adapters: Vec<Box<dyn Adapter>>,
    pub objectives: Vec<Box<dyn Objective>>,
    pub dataset: Box<dyn Dataset>,
    pub config: TrainConfig,
    /// Written into each exported adapter file's metadata (recipe hash, ...).
    pub export_metadata: BTreeMap<String, String>,
    /// What the optimizer updates: the adapters' tensors, or in full-parameter mode the
    /// backbone's own weights.
    params: Vec<(String, Tensor)>,
    /// `contrastive_scope = "global"` in a data-parallel run: the ranks that share each
    /// micro-batch's pairs.
    shared_with: Option<Rc<dyn Collective>>,
}

impl ObjectiveTask {
    pub fn new(
        backbone: Box<dyn Backbone>,
        adapters: Vec<Box<dyn Adapter>>,
        objectives: Vec<Box<dyn Objective>>,
        dataset: Box<dyn Dataset>,
        config: TrainConfig,
    ) -> Result<Self> {
        let b = config.images_per_step;
        let per = dataset.images_per_sample() as i64;
        if b % per != 0 {
            return Err(Error::Recipe(format!(
                "train.images_per_step = {b} must be a multiple of {per}: each sample of the \
                 dataset gives {per} images (a preferred and a rejected one)"
            )));
        }
        if (dataset.len() as i64) * per < b {
            return Err(Error::Recipe(format!(
                "train.images_per_step = {b} but the dataset holds {} samples of {per} image(s)",
                dataset.len()
            )));
        }
        if objectives.is_empty() {
            return Err(Error::Recipe("the recipe names no [[objective]]".into()));
        }
        if let Some((cached, compact)) = dataset.cache_identity() {
            let now = softalign_core::cache::cache_fingerprint(backbone.as_ref(), compact)?;
            if cached != now {
                return Err(Error::Recipe(format!(
                    "the encoding cache was made by other encoders than this backbone's \
                     (cache: {cached}, backbone: {now}); re-run `softalign cache`"
                )));
            }
        }
        let names: Vec<String> = adapters.iter().flat_map(|a| a.token_sets()).collect();
        for o in &objectives {
            for r in o.requests() {
                if let Some(set) = &r.tokens.set {
                    if !adapters.is_empty() && !names.contains(set) {
                        return Err(Error::Recipe(format!(
                            "objective `{}` uses token set `{set}`, which no adapter provides \
                             (sets: {})",
                            o.name(),
                            names.join(", ")
                        )));
                    }
                }
                if r.tokens.ema && !adapters.is_empty() && !adapters.iter().any(|a| a.has_ema()) {
                    return Err(Error::Recipe(format!(
                        "objective `{}` reads EMA tokens; set `ema = true` on the adapter",
                        o.name()
                    )));
                }
            }
        }
        let params = match config.mode {
            TrainMode::Adapter if !config.frozen.is_empty() => {
                return Err(Error::Recipe(
                    "train.frozen names backbone weights to keep fixed in mode = \"full\"; in \
                     adapter mode the whole backbone is fixed already"
                        .into(),
                ))
            }
            TrainMode::Adapter => adapter_parameters(&adapters),
            TrainMode::Full => {
                if !adapters.is_empty() {
                    return Err(Error::Recipe(
                        "train.mode = \"full\" trains the backbone itself: remove the [[adapter]] tables".into(),
                    ));
                }
                full_parameters(backbone.var_store(), config.weights_dtype, &config.frozen)?
            }
        };
        Ok(Self {
            backbone,
            adapters,
            objectives,
            dataset,
            config,
            export_metadata: BTreeMap::new(),
            params,
            shared_with: None,
        })
    }

    /// Joins a data-parallel run. With `contrastive_scope = "global"` every rank then draws
    /// all ranks' images (world size x images_per_step) and computes its share of the pairs;
    /// with `rank` scope the trainer alone spreads the micro-batches and nothing changes here.
    pub fn join_ranks(&mut self, c: Rc<dyn Collective>) -> Result<()> {
        if self.config.contrastive_scope == BatchScope::Global && c.world() > 1 {
            let all = self.config.images_per_step * c.world() as i64;
            let per = self.dataset.images_per_sample() as i64;
            if (self.dataset.len() as i64) * per < all {
                return Err(Error::Recipe(format!(
                    "train.contrastive_scope = \"global\" draws {all} images per micro-batch \
                     ({} ranks x train.images_per_step {}), but the dataset holds {} samples of \
                     {per} image(s)",
                    c.world(),
                    self.config.images_per_step,
                    self.dataset.len()
                )));
            }
            self.shared_with = Some(c);
        }
        Ok(())
    }

    /// Images one micro-batch draws: this rank's, or with a global scope every rank's.
    pub fn images_per_micro_batch(&self) -> i64 {
        let ranks = self.shared_with.as_ref().map_or(1, |c| c.world() as i64);
        self.config.images_per_step * ranks
    }

    /// Draws one micro-step's batch from torch's global generator.
    pub fn draw_inputs(&self) -> Result<StepInputs> {
        let dev = self.backbone.device();
        let b = self.images_per_micro_batch();
        let samples = b / self.dataset.images_per_sample() as i64;
        let perm = Tensor::randperm(self.dataset.len() as i64, (Kind::Int64, tch::Device::Cpu));
        let idx: Vec<i64> = perm.narrow(0, 0, samples).try_into()?;
        let idx: Vec<usize> = idx.into_iter().map(|i| i as usize).collect();
        let mut batch = self.dataset.batch(&idx, dev)?;
        let mut texts = batch.texts.take();
        if let Some(captions) = batch.captions.take() {
            let _guard = tch::no_grad_guard();
            batch.x0 = self.backbone.encode_images(&batch.x0)?;
            batch.cond = self.backbone.encode_prompts(&captions)?;
            texts = Some(captions);
        } else if batch.pixels {
            let _guard = tch::no_grad_guard();
            batch.x0 = self.backbone.encode_images(&batch.x0)?;
        }
        // Preference pairs draw for the first half and repeat it (DiffusionDPO's train.py),
        // so both images of a pair share t and eps.
        let pairs = batch.preference_pairs;
        let drawn = if pairs { b / 2 } else { b };
        let n_t = if self.config.per_image_timesteps {
            drawn
        } else {
            1
        };
        let mut timestep = self.backbone.noise().sample_timesteps(n_t, dev);
        let mut s = batch.x0.size();
        let mut noise = if self.config.per_image_noise {
            s[0] = drawn;
            Tensor::randn(&s, (Kind::Float, dev))
        } else {
            Tensor::randn(&s[1..], (Kind::Float, dev))
        };
        if pairs && self.config.per_image_timesteps {
            timestep = Tensor::cat(&[&timestep, &timestep], 0);
        }
        if pairs && self.config.per_image_noise {
            noise = Tensor::cat(&[&noise, &noise], 0);
        }
        Ok(StepInputs {
            x0: batch.x0,
            cond: batch.cond,
            noise,
            timestep,
            captions: texts,
            preference_pairs: pairs,
        })
    }

    fn adapter_slice(&self) -> Option<&[Box<dyn Adapter>]> {
        (!self.adapters.is_empty()).then_some(self.adapters.as_slice())
    }
}

pub(crate) fn adapter_parameters(adapters: &[Box<dyn Adapter>]) -> Vec<(String, Tensor)> {
    let many = adapters.len() > 1;
    adapters
        .iter()
        .enumerate()
        .flat_map(|(k, a)| {
            a.trainable()
                .into_iter()
                .map(move |(n, t)| (if many { format!("adapter{k}.{n}") } else { n }, t))
        })
        .collect()
}

impl TrainTask for ObjectiveTask {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    fn extra_state(&self) -> Vec<(String, Tensor)> {
        adapter_ema_state(&self.adapters)
    }

    fn load_extra_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        load_adapter_ema_state(&self.adapters, tensors)
    }

    fn micro_step(&mut self, m: &MicroStep) -> Result<BTreeMap<String, f64>> {
        let inputs = self.draw_inputs()?;
        let opts = StepOptions {
            pairs_per_forward: self.config.pairs_per_forward,
            backward: Some(m.loss_scale),
        };
        let mut step = StepContext::new(self.backbone.as_ref(), self.adapter_slice(), inputs)?;
        if let Some(c) = &self.shared_with {
            step = step.split_pairs(c.as_ref());
        }
        let r = step.run(&self.objectives, &opts)?;
        let mut out: BTreeMap<String, f64> = r.terms.into_iter().collect();
        out.insert("loss".into(), r.total);
        Ok(out)
    }

    fn after_step(&mut self, _step: u64) -> Result<()> {
        update_adapter_emas(&self.adapters);
        Ok(())
    }

    fn export(&self, dir: &Path, step: u64) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        if self.config.mode == TrainMode::Full {
            return self.backbone.save_pretrained(dir);
        }
        export_adapters(&self.adapters, dir, step, &self.export_metadata)
    }
}

/// The adapters' EMA copies, as a checkpoint's extra state.
pub(crate) fn adapter_ema_state(adapters: &[Box<dyn Adapter>]) -> Vec<(String, Tensor)> {
    adapters
        .iter()
        .enumerate()
        .flat_map(|(k, a)| {
            a.state()
                .into_iter()
                .filter(|(n, _)| n.starts_with("ema."))
                .map(move |(n, t)| (format!("adapter{k}.{n}"), t))
        })
        .collect()
}

pub(crate) fn load_adapter_ema_state(
    adapters: &[Box<dyn Adapter>],
    tensors: &BTreeMap<String, Tensor>,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (k, a) in adapters.iter().enumerate() {
        for (n, mut dst) in a.state().into_iter().filter(|(n, _)| n.starts_with("ema.")) {
            let key = format!("adapter{k}.{n}");
            let src = tensors
                .get(&key)
                .ok_or_else(|| Error::tensor(&key, "missing from the checkpoint"))?;
            if src.size() != dst.size() {
                return Err(Error::tensor(
                    &key,
                    format!("shape {:?}, expected {:?}", src.size(), dst.size()),
                ));
            }
            dst.copy_(&src.to_kind(dst.kind()).to_device(dst.device()));
        }
    }
    Ok(())
}

pub(crate) fn update_adapter_emas(adapters: &[Box<dyn Adapter>]) {
    for a in adapters {
        if let Some(decay) = a.ema_decay() {
            a.update_ema(decay);
        }
    }
}

/// Writes each adapter's file (`adapter.safetensors`, or `adapter{k}.safetensors` for several)
/// with `metadata` and the step, and LoRA also as the files other tools load (diffusers,
/// PEFT); several adapters each get a subfolder.
pub(crate) fn export_adapters(
    adapters: &[Box<dyn Adapter>],
    dir: &Path,
    step: u64,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let mut meta = metadata.clone();
    meta.insert("step".into(), step.to_string());
    for (k, a) in adapters.iter().enumerate() {
        let name = if adapters.len() == 1 {
            "adapter.safetensors".to_string()
        } else {
            format!("adapter{k}.safetensors")
        };
        save_adapter(&dir.join(name), a.as_ref(), &meta)?;
        let sub = if adapters.len() == 1 {
            dir.to_path_buf()
        } else {
            dir.join(format!("adapter{k}"))
        };
        a.export(&sub)?;
    }
    Ok(())
}

//! The training loop. Per optimizer step: for each micro-batch, seed torch from (seed, step,
//! micro) and let the task accumulate gradients; skip the step if the loss or the gradient is
//! non-finite (stopping after `max_bad_steps` in a row); clip the global gradient norm; AdamW;
//! the task's `after_step`; the trainer's EMA; log; checkpoint. Everything a later step
//! depends on is either in the checkpoint or a function of the step number, which is what
//! makes a resumed run bit-identical to an uninterrupted one. A stop request (the caller's
//! signal handlers) ends the loop after the current step with a checkpoint of it and a
//! `preempted` marker; rank 0 holds the run folder's lock throughout.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use tch::Tensor;

use super::checkpoint::{self, CheckpointContents, CheckpointState, ResumeFrom};
use super::config::{BatchScope, TrainConfig};
use super::ema::{copy_named, Ema};
use super::optim::{clip_grads, global_grad_norm, AdamW};
use super::parallel::{allreduce_grads, broadcast_from_main, Collective, Placement};
use super::precision::check_trainable;
use super::preempt::{self, Preemption, StopFlag};
use super::run_lock::RunLock;
use super::schedule::LrSchedule;
use super::seed::seed_micro_step;
use super::task::{MicroStep, TrainTask};
use crate::logging::run_dir::{recipe_hash, write_run_record, RunRecord};
use crate::logging::{JsonlSink, LoggingConfig, Progress, WandbSink};
use crate::metrics::MetricsSink;
use crate::{Error, Result};

/// Where the final result goes: `run_dir/final` (and `run_dir/final-ema` with EMA weights).
pub const FINAL_DIR: &str = "final";
pub const FINAL_EMA_DIR: &str = "final-ema";

/// How to run (as opposed to the recipe's `[train]` table: what to run).
pub struct TrainerOptions {
    pub run_dir: PathBuf,
    /// The run seed; every random draw of the task follows from it.
    pub seed: u64,
    pub resume: Option<ResumeFrom>,
    /// Show the progress bar (it also needs `logging.progress` and a terminal).
    pub progress: bool,
    /// The resolved recipe, written to recipe.json, hashed into checkpoints, sent to W&B.
    pub recipe: serde_json::Value,
    /// argv, written to command.txt.
    pub command: Vec<String>,
    /// Resume even if the recipe's hash differs from the checkpoint's (e.g. more steps).
    pub allow_recipe_change: bool,
    /// More metrics sinks besides metrics.jsonl and W&B.
    pub sinks: Vec<Box<dyn MetricsSink>>,
    /// The other ranks of a data-parallel run (None: this process trains alone). Only rank 0
    /// writes the run folder; see [`super::parallel`] for how a step is spread.
    pub collective: Option<Rc<dyn Collective>>,
    /// Checked between steps: once set, the run checkpoints the step it is in and returns
    /// with [`TrainSummary::preempted`] (None: the run never stops early).
    pub stop: Option<StopFlag>,
}

impl TrainerOptions {
    pub fn new(run_dir: impl Into<PathBuf>, seed: u64) -> Self {
        Self {
            run_dir: run_dir.into(),
            seed,
            resume: None,
            progress: true,
            recipe: serde_json::Value::Null,
            command: std::env::args().collect(),
            allow_recipe_change: false,
            sinks: Vec::new(),
            collective: None,
            stop: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Steps completed (= train.steps).
    pub steps: u64,
    /// The step the run resumed from (0 for a fresh run).
    pub start_step: u64,
    /// Steps skipped for a non-finite loss or gradient, over the whole run.
    pub skipped_steps: u64,
    /// Mean `loss` of the last step.
    pub last_loss: Option<f64>,
    pub final_dir: PathBuf,
    pub final_ema_dir: Option<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
    /// Wall time of this process's training loop.
    pub elapsed_s: f64,
    /// Set when a stop request ended the run early (then there is no final result yet:
    /// `steps` is still train.steps, `last_checkpoint` the checkpoint of the stopping step).
    pub preempted: Option<Preemption>,
}

struct Counters {
    bad_in_row: u32,
    skipped: u64,
}

/// Trains `task` by the `[train]` table `cfg`, logging per `logging`, into `opts.run_dir`.
pub fn train(
    cfg: &TrainConfig,
    logging: &LoggingConfig,
    mut opts: TrainerOptions,
    task: &mut dyn TrainTask,
) -> Result<TrainSummary> {
    cfg.validate()?;
    logging.validate()?;
    let run_dir = opts.run_dir.clone();
    let mut params = task.parameters();
    check_trainable(&params)?;
    let device = params[0].1.device();
    let hash = recipe_hash(&opts.recipe);
    let collective = opts.collective.take();
    let comm = collective.as_deref();
    let place = Placement::of(comm, cfg.contrastive_scope == BatchScope::Global);
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::file(&run_dir, e))?;
    // Taken before anything in the folder is touched (another writer's half-written checkpoint
    // looks like a crashed run's), held until this function returns.
    let _lock = if place.is_main() {
        let lock = RunLock::acquire(&run_dir)?;
        checkpoint::remove_partial(&run_dir)?;
        Some(lock)
    } else {
        None
    };
    if let Some(c) = comm {
        // Nobody reads checkpoints while rank 0 is still clearing a half-written one.
        c.barrier("the start of the run")?;
    }

    let mut optim = AdamW::from_config(cfg, &params)?;
    let mut ema = cfg
        .ema
        .as_ref()
        .map(|e| Ema::new(e.decay, e.warmup, &params));
    let mut counters = Counters {
        bad_in_row: 0,
        skipped: 0,
    };
    let mut start = 0u64;
    if let Some(from) = &opts.resume {
        let dir = checkpoint::resolve(&run_dir, from)?;
        let ck = checkpoint::read_checkpoint(&dir)?;
        let st = &ck.state;
        let here = dir.display().to_string();
        if st.seed != opts.seed {
            return Err(Error::file(
                &dir,
                format!(
                    "checkpoint was trained with seed {}, this run has seed {}: resume with the same seed",
                    st.seed, opts.seed
                ),
            ));
        }
        if st.recipe_hash != hash
            && st.recipe_hash != hash_before_periodic_default(&opts.recipe)
            && !opts.allow_recipe_change
        {
            return Err(Error::file(
                &dir,
                "checkpoint was written under a different recipe (its hash differs from this \
                 run's); resume with the same recipe, or allow the change explicitly",
            ));
        }
        if st.step > cfg.steps {
            return Err(Error::file(
                &dir,
                format!(
                    "checkpoint is at step {} but train.steps is {}",
                    st.step, cfg.steps
                ),
            ));
        }
        copy_named(
            &mut params,
            &ck.params,
            &format!("{here}/{}", checkpoint::PARAMS_FILE),
        )?;
        optim.load_state(
            &ck.optimizer,
            &format!("{here}/{}", checkpoint::OPTIMIZER_FILE),
        )?;
        task.load_extra_state(&ck.extra)?;
        match (&mut ema, &ck.ema) {
            (Some(e), Some(t)) => e.load(t, &format!("{here}/{}", checkpoint::EMA_FILE))?,
            (Some(_), None) => {
                return Err(Error::file(
                    &dir,
                    "train.ema is set but this checkpoint holds no EMA (it was trained without)",
                ))
            }
            // EMA switched off since: the saved one is simply not used.
            (None, _) => {}
        }
        start = st.step;
        counters.bad_in_row = st.bad_steps_in_row;
        counters.skipped = st.skipped_steps;
        let now = place.micros_per_step(cfg.grad_accum);
        let then = st.micro_batches_per_step;
        if place.is_main() && then.is_some_and(|m| m != now) {
            eprintln!(
                "note: {} was trained with {} micro-batches per step ({} rank(s)), this run has {} \
                 ({} rank(s) x train.grad_accum {}): the steps from {} on draw other data than \
                 the uninterrupted run would have (keep ranks x grad_accum to resume exactly)",
                dir.display(),
                then.unwrap_or(1),
                st.world_size,
                now,
                place.world,
                cfg.grad_accum,
                st.step
            );
        }
    }
    if let Some(c) = comm {
        broadcast_from_main(c, &params)?;
    }

    let mut sinks: Vec<Box<dyn MetricsSink>> = Vec::new();
    if place.is_main() {
        write_run_record(
            &run_dir,
            &RunRecord {
                recipe: &opts.recipe,
                command: &opts.command,
                seed: opts.seed,
                device,
                resumed: opts.resume.is_some(),
            },
        )?;
        sinks.push(Box::new(if opts.resume.is_some() {
            JsonlSink::resume(&run_dir, start)?
        } else {
            JsonlSink::create(&run_dir)?
        }));
        if let Some(w) = &logging.wandb {
            sinks.push(Box::new(WandbSink::start(w, &run_dir, &opts.recipe)?));
        }
        sinks.append(&mut opts.sinks);
        // This run (its checks passed) continues whatever the marker recorded; a new stop
        // writes a new one.
        preempt::remove_marker(&run_dir)?;
    }
    let progress = Progress::new(
        opts.progress && logging.progress && place.is_main(),
        start,
        cfg.steps,
    );

    let began = Instant::now();
    let mut run = Loop {
        cfg,
        seed: opts.seed,
        hash: &hash,
        run_dir: &run_dir,
        params: &params,
        comm,
        place,
        optim: &mut optim,
        ema: &mut ema,
        schedule: LrSchedule::from_config(cfg),
        sinks: &mut sinks,
        progress: &progress,
        counters: &mut counters,
        last_loss: None,
        last_checkpoint: None,
        stop: opts.stop.clone(),
    };
    let looped = run.run(task, start);
    let (last_loss, last_checkpoint) = (run.last_loss, run.last_checkpoint.take());
    // Sinks are closed on failure too, so W&B and metrics.jsonl keep what was logged.
    let mut finished = Ok(());
    for s in sinks.iter_mut() {
        let r = s.finish();
        if finished.is_ok() {
            finished = r;
        }
    }
    progress.finish();
    let stopped = looped?;
    finished?;
    let elapsed_s = began.elapsed().as_secs_f64();
    if let Some(p) = stopped {
        if place.is_main() {
            preempt::write_marker(&run_dir, &p)?;
        }
        if let Some(c) = comm {
            // No rank leaves before rank 0 has saved: a launcher that sees one rank exit tends
            // to kill the others.
            c.barrier("the checkpoint of a stopped run")?;
        }
        return Ok(TrainSummary {
            steps: cfg.steps,
            start_step: start,
            skipped_steps: counters.skipped,
            last_loss,
            final_dir: run_dir.join(FINAL_DIR),
            final_ema_dir: None,
            last_checkpoint: Some(p.checkpoint.clone()),
            elapsed_s,
            preempted: Some(p),
        });
    }

    let final_dir = run_dir.join(FINAL_DIR);
    let final_ema_dir = ema.as_ref().map(|_| run_dir.join(FINAL_EMA_DIR));
    if place.is_main() {
        task.export(&final_dir, cfg.steps)?;
        if let (Some(e), Some(dir)) = (&ema, &final_ema_dir) {
            export_with(task, &mut params, e.tensors(), dir, cfg.steps)?;
        }
    }
    if let Some(c) = comm {
        // Every rank returns once the result is written (and rank 0, which may host the
        // rendezvous store, is the last to leave).
        c.barrier("the end of the run")?;
    }
    Ok(TrainSummary {
        steps: cfg.steps,
        start_step: start,
        skipped_steps: counters.skipped,
        last_loss,
        final_dir,
        final_ema_dir,
        last_checkpoint,
        elapsed_s,
        preempted: None,
    })
}

/// The hash this recipe had while `train.checkpoint.every` defaulted to 0 (only at the end):
/// a run started then, from a recipe that left it unset, resumes under the new default
/// without `--allow-recipe-change` (how often checkpoints are written changes no result).
fn hash_before_periodic_default(recipe: &serde_json::Value) -> String {
    let mut old = recipe.clone();
    match old.pointer_mut("/train/checkpoint/every") {
        Some(v) if v.as_u64() == Some(super::config::DEFAULT_CHECKPOINT_EVERY) => {
            *v = serde_json::Value::from(0u64);
            recipe_hash(&old)
        }
        _ => String::new(),
    }
}

/// Writes what a finished run writes to `final/` (or, with `ema`, `final-ema/`) from one of
/// its checkpoints instead, into `out` (new or empty): to evaluate a run part-way, or to keep
/// a stopped run's result. Returns the checkpoint's step.
pub fn export_checkpoint(
    task: &mut dyn TrainTask,
    run_dir: &Path,
    from: &ResumeFrom,
    ema: bool,
    out: &Path,
) -> Result<u64> {
    let dir = checkpoint::resolve(run_dir, from)?;
    let ck = checkpoint::read_checkpoint(&dir)?;
    let here = dir.display().to_string();
    if std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::file(
            out,
            "already holds files; export into a new folder",
        ));
    }
    let mut params = task.parameters();
    copy_named(
        &mut params,
        &ck.params,
        &format!("{here}/{}", checkpoint::PARAMS_FILE),
    )?;
    task.load_extra_state(&ck.extra)?;
    if ema {
        let weights = ck.ema.as_ref().ok_or_else(|| {
            Error::file(&dir, "holds no EMA (the run was trained without train.ema)")
        })?;
        copy_named(
            &mut params,
            weights,
            &format!("{here}/{}", checkpoint::EMA_FILE),
        )?;
    }
    task.export(out, ck.state.step)?;
    Ok(ck.state.step)
}

/// Exports the task with `weights` in place of its parameters, then puts them back.
fn export_with(
    task: &mut dyn TrainTask,
    params: &mut [(String, Tensor)],
    weights: &[(String, Tensor)],
    dir: &Path,
    step: u64,
) -> Result<()> {
    let backup: BTreeMap<String, Tensor> = {
        let _guard = tch::no_grad_guard();
        params
            .iter()
            .map(|(n, p)| (n.clone(), p.detach().copy()))
            .collect()
    };
    let w: BTreeMap<String, Tensor> = weights
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    copy_named(params, &w, "the trainer's EMA")?;
    let exported = task.export(dir, step);
    copy_named(params, &backup, "the parameter backup")?;
    exported
}

struct Loop<'a> {
    cfg: &'a TrainConfig,
    seed: u64,
    hash: &'a str,
    run_dir: &'a Path,
    params: &'a [(String, Tensor)],
    comm: Option<&'a dyn Collective>,
    place: Placement,
    optim: &'a mut AdamW,
    ema: &'a mut Option<Ema>,
    schedule: LrSchedule,
    sinks: &'a mut Vec<Box<dyn MetricsSink>>,
    progress: &'a Progress,
    counters: &'a mut Counters,
    last_loss: Option<f64>,
    last_checkpoint: Option<PathBuf>,
    stop: Option<StopFlag>,
}

impl Loop<'_> {
    /// Trains steps `start..train.steps`; returns early, checkpointed, on a stop request.
    fn run(&mut self, task: &mut dyn TrainTask, start: u64) -> Result<Option<Preemption>> {
        let cfg = self.cfg;
        let accum = cfg.grad_accum;
        let scale = 1.0 / f64::from(self.place.micros_per_step(accum));
        for step in start..cfg.steps {
            let t0 = Instant::now();
            zero_grads(self.params);
            let mut terms: BTreeMap<String, f64> = BTreeMap::new();
            let mut bad: Option<String> = None;
            let mut stop: Option<Error> = None;
            for local in 0..accum {
                let micro = self.place.global_micro(local, accum);
                seed_micro_step(self.seed, step, micro);
                let m = MicroStep {
                    step,
                    micro,
                    loss_scale: scale,
                };
                let got = task.micro_step(&m)?;
                let loss = *got.get("loss").ok_or_else(|| {
                    Error::invalid(format!(
                        "the task's micro_step returned no `loss` term (it returned {:?})",
                        got.keys().collect::<Vec<_>>()
                    ))
                })?;
                for (k, v) in got {
                    *terms.entry(k).or_insert(0.0) += v * scale;
                }
                if !loss.is_finite() {
                    bad = Some(format!("loss ({loss}) in micro-batch {micro}"));
                    break;
                }
            }
            let mut allreduce_s = None;
            // Alone, the request is read when the step ends; with ranks, at the all-reduce,
            // so that every rank stops after the same step whichever of them got the signal.
            let mut stop_here = None;
            if let Some(c) = self.comm {
                let t_comm = Instant::now();
                // Every rank joins this one all-reduce per step, even after a non-finite
                // loss, so all ranks skip or step together.
                let asked = self.stop.as_ref().and_then(StopFlag::requested);
                let mut extra = vec![
                    if bad.is_some() { 1.0 } else { 0.0 },
                    if asked.is_some() { 1.0 } else { 0.0 },
                ];
                extra.extend(terms.values());
                let summed = allreduce_grads(c, self.params, &extra)?;
                allreduce_s = Some(t_comm.elapsed().as_secs_f64());
                if summed.len() != extra.len() {
                    return Err(Error::invalid(
                        "the all-reduced step values lost their length",
                    ));
                }
                for (v, s) in terms.values_mut().zip(&summed[2..]) {
                    *v = *s / self.place.copies();
                }
                if summed[1] > 0.0 {
                    stop_here = Some(asked);
                }
                if summed[0] > 0.0 && bad.is_none() {
                    bad = Some(format!(
                        "loss on {} of {} ranks",
                        summed[0].round(),
                        self.place.world
                    ));
                }
            }
            let (norm_t, grad_norm) = if bad.is_none() {
                global_grad_norm(self.params)?
            } else {
                (None, f64::NAN)
            };
            if bad.is_none() && !grad_norm.is_finite() {
                bad = Some(format!("gradient (global norm {grad_norm})"));
            }
            let lrs: Vec<f64> = self
                .optim
                .groups()
                .iter()
                .map(|g| self.schedule.lr(g.lr, step))
                .collect();
            if let Some(reason) = &bad {
                zero_grads(self.params);
                self.counters.bad_in_row += 1;
                self.counters.skipped += 1;
                if self.place.is_main() {
                    self.progress.println(&format!(
                        "step {}: skipped, non-finite {reason} ({} in a row; the limit is train.max_bad_steps = {})",
                        step + 1,
                        self.counters.bad_in_row,
                        cfg.max_bad_steps
                    ));
                }
                if self.counters.bad_in_row >= cfg.max_bad_steps {
                    stop = Some(Error::invalid(format!(
                        "training stopped at step {}: {} consecutive steps had a non-finite loss \
                         or gradient (the last one: {reason}). Lower train.lr, set \
                         train.grad_clip, or check the data; checkpoints are in {}",
                        step + 1,
                        self.counters.bad_in_row,
                        checkpoint::checkpoints_dir(self.run_dir).display()
                    )));
                }
            } else {
                self.counters.bad_in_row = 0;
                if let (Some(max), Some(total)) = (cfg.grad_clip, &norm_t) {
                    clip_grads(self.params, total, max)?;
                }
                self.optim.step(&lrs)?;
                zero_grads(self.params);
                task.after_step(step)?;
                if let Some(e) = self.ema.as_mut() {
                    e.update(self.params, step)?;
                }
            }
            let step_time_s = t0.elapsed().as_secs_f64();
            let done = step + 1;
            self.last_loss = terms.get("loss").copied();
            if done % cfg.log_every == 0 || done == cfg.steps {
                let mut values = terms;
                values.insert("lr".into(), lrs[0]);
                for (i, lr) in lrs.iter().enumerate().skip(1) {
                    values.insert(format!("lr/group{i}"), *lr);
                }
                values.insert("grad_norm".into(), grad_norm);
                values.insert("step_time_s".into(), step_time_s);
                if let Some(t) = allreduce_s {
                    // Rank 0's time in the gradient all-reduce (waiting for slower ranks included).
                    values.insert("allreduce_s".into(), t);
                }
                values.insert("skipped".into(), if bad.is_some() { 1.0 } else { 0.0 });
                for s in self.sinks.iter_mut() {
                    s.log(done, &values)?;
                }
            }
            self.progress.update(done, self.last_loss, lrs[0]);
            if let Some(e) = stop {
                // Logged first, so metrics.jsonl shows the failing step too.
                return Err(e);
            }
            let every = cfg.checkpoint.every;
            let periodic = (every > 0 && done % every == 0) || done == cfg.steps;
            if self.place.is_main() && periodic {
                self.checkpoint(task, done)?;
            }
            if self.comm.is_none() {
                stop_here = self.stop.as_ref().and_then(StopFlag::requested).map(Some);
            }
            // A request during the last step changes nothing: the run ends as it would have.
            if let (Some(signal), false) = (stop_here, done == cfg.steps) {
                if self.place.is_main() && !periodic {
                    self.checkpoint(task, done)?;
                }
                let checkpoint =
                    checkpoint::checkpoints_dir(self.run_dir).join(checkpoint::step_dir_name(done));
                return Ok(Some(Preemption {
                    step: done,
                    signal,
                    reason: preempt::signal_name(signal),
                    checkpoint,
                }));
            }
        }
        Ok(None)
    }

    fn checkpoint(&mut self, task: &dyn TrainTask, done: u64) -> Result<()> {
        let contents = CheckpointContents {
            state: CheckpointState {
                step: done,
                seed: self.seed,
                bad_steps_in_row: self.counters.bad_in_row,
                skipped_steps: self.counters.skipped,
                recipe_hash: self.hash.to_string(),
                softalign_version: env!("CARGO_PKG_VERSION").to_string(),
                world_size: self.place.world as u32,
                micro_batches_per_step: Some(self.place.micros_per_step(self.cfg.grad_accum)),
            },
            params: self.params,
            optimizer: self.optim.state_tensors(),
            extra: task.extra_state(),
            ema: self.ema.as_ref().map(Ema::tensors),
        };
        let dir = checkpoint::write_checkpoint(self.run_dir, &contents, self.cfg.checkpoint.keep)?;
        self.last_checkpoint = Some(dir);
        Ok(())
    }
}

fn zero_grads(params: &[(String, Tensor)]) {
    for (_, p) in params {
        p.shallow_clone().zero_grad();
    }
}

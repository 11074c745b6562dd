//! `softalign train`: a recipe in, a run folder out (checkpoints, metrics.jsonl, final adapter
//! or model), resumable with `--resume latest`; stopped by a signal, it checkpoints and exits
//! with [`EXIT_PREEMPTED`].
use std::fmt;
use std::path::PathBuf;
use std::rc::Rc;

use anyhow::Context;
use softalign_core::train::config::BatchScope;
use softalign_core::train::{
    train, Collective, ResumeFrom, TrainSummary, TrainTask, TrainerOptions,
};

use super::build::Built;
pub use super::signals::EXIT_PREEMPTED;

#[derive(clap::Args)]
#[command(
    after_help = "Exit status: 0 when the run is finished; 75 (EX_TEMPFAIL) when SIGTERM, \
SIGINT or SIGUSR1 stopped it: the step in progress was finished and checkpointed, the run folder's \
`preempted` file names the step, and the same command with `--resume latest` continues it \
exactly (a second signal while saving is ignored; SIGKILL still kills); 1 on any error. \
Only one training at a time writes a run folder: its `lock` file names the holder's pid and host."
)]
pub struct Args {
    /// The recipe file.
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a recipe value: `--set train.lr=5e-4` (repeatable); recorded in the run folder.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The run folder (default: runs/<recipe name>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue from `latest` or a checkpoint folder, exactly where it stopped.
    #[arg(long, value_name = "latest|DIR")]
    pub resume: Option<String>,
    /// Resume even though the recipe changed since the checkpoint (e.g. more steps).
    #[arg(long)]
    pub allow_recipe_change: bool,
    /// No progress output (no bar, and no plain progress lines when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    train_recipe(&a).map(|_| ())
}

/// A run stopped by a signal after checkpointing: not a failure, but not finished either;
/// `main` prints it and exits with [`EXIT_PREEMPTED`].
#[derive(Debug)]
pub struct Preempted(pub String);

impl fmt::Display for Preempted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Preempted {}

/// `softalign train` itself, returning what the trainer reports (the demo trains through here).
pub fn train_recipe(a: &Args) -> anyhow::Result<TrainSummary> {
    let built = Built::for_training(&a.recipe, &a.set)?;
    let r = &built.loaded.recipe;
    let run_dir = a.run_dir.clone().unwrap_or_else(|| {
        let name = r.name.clone().unwrap_or_else(|| {
            a.recipe
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into())
        });
        PathBuf::from("runs").join(name)
    });
    if a.resume.is_none() && run_dir.join("checkpoints").exists() {
        anyhow::bail!(
            "{} already holds a run; pass --resume latest to continue it, or choose another --run-dir",
            run_dir.display()
        );
    }
    let mut opts = TrainerOptions::new(&run_dir, r.seed);
    opts.recipe = built.loaded.json.clone();
    opts.resume = a.resume.as_deref().map(ResumeFrom::parse);
    opts.progress = !a.quiet;
    opts.allow_recipe_change = a.allow_recipe_change;
    let (train_cfg, logging) = (r.train.clone(), r.logging.clone());
    let is_ddpo = r.ddpo.is_some();
    // torchrun / srun: join the other ranks (none: train alone, exactly as without a launcher).
    let group = softalign_distributed::from_env(built.device)?;
    let main = group.as_ref().is_none_or(|g| g.launch().rank == 0);
    if let (true, Some(g)) = (main, &group) {
        let w = g.launch().world;
        let batches = match train_cfg.contrastive_scope {
            BatchScope::Rank => format!(
                "{} micro-batch(es) of {} images per rank per step",
                train_cfg.grad_accum, train_cfg.images_per_step
            ),
            BatchScope::Global => format!(
                "{} micro-batch(es) of {} images (every rank's) per step, their pairs split over the ranks",
                train_cfg.grad_accum,
                train_cfg.images_per_step * w as i64
            ),
        };
        eprintln!(
            "data-parallel: {w} ranks ({}, {}), {batches}",
            g.launch().launcher,
            g.backend().name(),
        );
    }
    let group = group.map(|g| Rc::new(g) as Rc<dyn Collective>);
    let mut task: Box<dyn TrainTask> = if is_ddpo {
        if group.is_some() {
            anyhow::bail!(
                "recipe {}: DDPO trains on one process (its sampling rounds are not spread \
                 over ranks yet); run it without torchrun / srun",
                a.recipe.display()
            );
        }
        Box::new(built.into_ddpo_task()?)
    } else {
        let mut task = built.into_task()?;
        if let Some(g) = &group {
            task.join_ranks(g.clone())?;
        }
        Box::new(task)
    };
    opts.collective = group;
    // Installed only now: until the first step there is nothing to save, and a signal while
    // the model loads should end the process at once, as it always has.
    let signals = super::signals::stop_on_signals()?;
    opts.stop = Some(signals.flag());
    let s = train(&train_cfg, &logging, opts, task.as_mut())
        .with_context(|| format!("training into {}", run_dir.display()))?;
    drop(signals);
    if let Some(p) = &s.preempted {
        return Err(Preempted(format!(
            "stopped by {} after step {} of {}: checkpoint {}, marker {}. The same command \
             plus `--resume latest` continues exactly; exit status {EXIT_PREEMPTED}",
            p.reason,
            p.step,
            s.steps,
            p.checkpoint.display(),
            softalign_core::train::preempt::marker_path(&run_dir).display(),
        ))
        .into());
    }
    if main {
        eprintln!("{}", summary_line(&s));
    }
    Ok(s)
}

/// The closing line: what this invocation trained (nothing, for a finished run resumed).
pub fn summary_line(s: &TrainSummary) -> String {
    if s.start_step >= s.steps {
        return format!(
            "nothing to train: the run was already at step {} of {}; result in {}",
            s.start_step,
            s.steps,
            s.final_dir.display()
        );
    }
    format!(
        "trained steps {}..{} in {:.1} s ({} skipped); last loss {}; result in {}",
        s.start_step,
        s.steps,
        s.elapsed_s,
        s.skipped_steps,
        s.last_loss
            .map(|l| format!("{l:.5}"))
            .unwrap_or_else(|| "-".into()),
        s.final_dir.display()
    )
}

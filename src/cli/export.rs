//! `softalign export`: a run's checkpoint written out the way a finished run writes `final/`
//! (adapter file, or in full mode a pipeline folder), to evaluate a run part-way or keep the
//! result of one that was stopped.
use std::path::PathBuf;

use anyhow::Context;
use softalign_core::train::{export_checkpoint, ResumeFrom};

use super::build::Built;

#[derive(clap::Args)]
pub struct Args {
    /// The run folder (`softalign train --run-dir`); its recipe.json rebuilds the model.
    #[arg(long)]
    pub run_dir: PathBuf,
    /// `latest` or a checkpoint folder (`RUN/checkpoints/step-00000500`).
    #[arg(long, value_name = "latest|DIR", default_value = "latest")]
    pub checkpoint: String,
    /// The trainer's EMA weights (`train.ema`) instead of the raw parameters, as `final-ema/`.
    #[arg(long)]
    pub ema: bool,
    /// Output folder (new or empty).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let recipe = a.run_dir.join("recipe.json");
    if !recipe.is_file() {
        anyhow::bail!(
            "{}: not a run folder (no recipe.json; `softalign train --run-dir` writes one)",
            a.run_dir.display()
        );
    }
    let built = Built::for_training(&recipe, &[])?;
    let mut task = built.into_task()?;
    let from = ResumeFrom::parse(&a.checkpoint);
    let step = export_checkpoint(&mut task, &a.run_dir, &from, a.ema, &a.out)
        .with_context(|| format!("exporting from {}", a.run_dir.display()))?;
    eprintln!(
        "exported step {step}{} of {} to {}",
        if a.ema { " (EMA weights)" } else { "" },
        a.run_dir.display(),
        a.out.display()
    );
    Ok(())
}

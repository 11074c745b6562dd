//! `softalign eval`: N images per evaluation prompt for a model (+ adapter), written in
//! GenEval's folder layout, scored, and summarised per category with 95% intervals.
//!
//! `<out>/` holds `evaluation_metadata.jsonl` (the prompts), `<index:05>/metadata.jsonl` and
//! `<index:05>/samples/<k:04>.png` (GenEval's layout, so its own evaluator can read the folder),
//! `results.jsonl` (one line per image, GenEval's columns), `summary.json` and `summary.txt`.
//! Only the shapes world's model can be scored here (its scorer is exact); other models are
//! generated and left for GenEval's detector.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use softalign_worlds::geneval::{
    prompt_dir, read_metadata_jsonl, write_metadata_jsonl, write_prompt_samples,
    write_results_jsonl, EvalPrompt, ImageResult, Summary,
};

use super::generate::{generate, GenSettings};
use super::model::{backbone_kind, Model, ModelArgs};
use super::progress::bar;
use super::provenance;

/// The backbone kind whose images the shapes world's scorer can judge.
pub const SHAPES_KIND: &str = "shapes";

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// GenEval's `evaluation_metadata.jsonl` (`--geneval` is the same option). Required for
    /// real models; the shapes world's model defaults to its held-out prompts.
    #[arg(long, visible_alias = "geneval")]
    pub prompts: Option<PathBuf>,
    #[command(flatten)]
    pub prompt_set: PromptSet,
    /// The shapes world's prompts that its evaluation set (prompt seed 0) leaves out, the ones
    /// DDPO's `shapes:train` samples: to make preference pairs (`softalign pairs`) or watch
    /// the training prompts, never to report a held-out result.
    #[arg(long, conflicts_with = "prompts")]
    pub train_prompts: bool,
    #[command(flatten)]
    pub gen: GenSettings,
    /// Generate only, even where the images could be scored.
    #[arg(long)]
    pub no_score: bool,
    /// Output folder in GenEval's layout (new or empty).
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Which of the shapes world's evaluation prompts to use.
#[derive(clap::Args, Debug, Clone)]
pub struct PromptSet {
    /// Seed of the shapes world's prompt draw.
    #[arg(long, default_value_t = 0)]
    pub prompt_seed: u64,
    /// At most this many prompts per category (the world's default: 40).
    #[arg(long, default_value_t = softalign_worlds::shapes::prompts::DEFAULT_PER_TAG)]
    pub per_tag: usize,
}

impl PromptSet {
    pub fn prompts(&self) -> Vec<EvalPrompt> {
        softalign_worlds::shapes::eval_prompts_with(self.prompt_seed, self.per_tag)
    }
}

/// What one evaluation produced.
pub struct Evaluation {
    pub images: usize,
    /// `None` when the images were not scored.
    pub scored: Option<(Vec<ImageResult>, Summary)>,
    pub generate_s: f64,
    /// The sampler and guidance used, as the summary states them.
    pub sampling: String,
}

/// Generates, writes and (when `score`) scores `prompts` for `model` into `out`.
pub fn evaluate(
    model: &Model,
    prompts: &[EvalPrompt],
    gen: &GenSettings,
    out: &Path,
    score: bool,
    label: &str,
    quiet: bool,
) -> anyhow::Result<Evaluation> {
    if prompt_dir(out, 0).exists() {
        bail!(
            "{} already holds generated images; choose an empty --out",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_metadata_jsonl(&out.join("evaluation_metadata.jsonl"), prompts)?;
    let texts: Vec<String> = prompts.iter().map(|p| p.prompt.clone()).collect();
    let pb = bar((prompts.len() * gen.n) as u64, label, "images", quiet);
    let start = std::time::Instant::now();
    let sampling = generate(model, &texts, gen, |p, images| {
        write_prompt_samples(out, p, &prompts[p], &images)?;
        pb.inc(images.len() as u64);
        Ok(())
    })?;
    pb.finish_and_clear();
    let generate_s = start.elapsed().as_secs_f64();
    let scored = if score {
        let (results, summary) = softalign_worlds::shapes::score_folder(out)?;
        write_results_jsonl(&out.join("results.jsonl"), &results)?;
        let json = serde_json::to_string_pretty(&summary)?;
        std::fs::write(out.join("summary.json"), json + "\n")?;
        std::fs::write(out.join("summary.txt"), summary.to_text())?;
        // The first image of each prompt, framed green (correct) or red (wrong).
        let tiles = super::compare_grid::first_images(&results)?;
        if !tiles.is_empty() {
            let g = super::compare_grid::verdict_grid(&tiles, 16, 2)?;
            super::grid::save_png(&g, &out.join("grid.png"))?;
        }
        Some((results, summary))
    } else {
        None
    };
    Ok(Evaluation {
        images: prompts.len() * gen.n,
        scored,
        generate_s,
        sampling,
    })
}

pub fn run(a: Args) -> anyhow::Result<()> {
    a.gen.validate()?;
    let kind = backbone_kind(&a.model)?;
    let prompts = match &a.prompts {
        Some(f) => read_metadata_jsonl(f)?,
        // The shapes world's prompts mean nothing to a model trained on photographs.
        None if kind != SHAPES_KIND => bail!(
            "backbone `{kind}`: give the evaluation prompts with --geneval \
             evaluation_metadata.jsonl (GenEval's prompt file); only the `{SHAPES_KIND}` world's \
             model has built-in evaluation prompts"
        ),
        None if a.train_prompts => softalign_worlds::shapes::prompts::train_prompts(0),
        None => a.prompt_set.prompts(),
    };
    if prompts.is_empty() {
        bail!("no evaluation prompts");
    }
    let model = Model::load(&a.model)?;
    let kind = model.backbone.info().kind.clone();
    let score = !a.no_score && kind == SHAPES_KIND;
    let ev = evaluate(
        &model,
        &prompts,
        &a.gen,
        &a.out,
        score,
        "generating",
        a.quiet,
    )?;
    provenance::write(&a.out, "eval", &a.model, &model, &a.gen, &ev.sampling)?;
    eprintln!(
        "{} of {} from {} ({}) in {:.1} s -> {}",
        provenance::count(ev.images, "image", "images"),
        provenance::count(prompts.len(), "prompt", "prompts"),
        model.describe(),
        ev.sampling,
        ev.generate_s,
        a.out.display()
    );
    match ev.scored {
        Some((_, summary)) => print!("{}", summary.to_text()),
        None if a.no_score => eprintln!("not scored (--no-score)"),
        None => eprintln!(
            "not scored: only the `{SHAPES_KIND}` world's images have a scorer here; run \
             GenEval's evaluator on {} for backbone `{kind}`",
            a.out.display()
        ),
    }
    Ok(())
}

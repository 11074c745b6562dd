//! `softalign sample`: prompts in, PNG files and a grid out.
//!
//! Files: `<out>/<p:04>-<k:02>.png` (image k of prompt p), `<out>/grid.png` (one row per
//! prompt) and `<out>/prompts.txt` (the prompts, in row order).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::generate::{generate, GenSettings};
use super::grid::{save_png, simple_grid};
use super::model::{Model, ModelArgs};
use super::progress::bar;
use super::provenance;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A prompt (repeatable).
    #[arg(long = "prompt", value_name = "TEXT")]
    pub prompts: Vec<String>,
    /// A file of prompts: one per line, or GenEval's `evaluation_metadata.jsonl` (`.jsonl`).
    #[arg(long = "prompts", value_name = "FILE", conflicts_with = "prompts")]
    pub prompt_file: Option<PathBuf>,
    #[command(flatten)]
    pub gen: GenSettings,
    /// Grid tiles are this many times the image size.
    #[arg(long, default_value_t = 4)]
    pub grid_scale: u32,
    /// Output folder: new or empty (images of another run are never mixed in).
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Prompts from a text file (one per line, blank lines skipped) or a GenEval metadata file.
pub fn read_prompts(path: &Path) -> anyhow::Result<Vec<String>> {
    if path.extension().is_some_and(|e| e == "jsonl") {
        let meta = softalign_worlds::geneval::read_metadata_jsonl(path)?;
        return Ok(meta.into_iter().map(|m| m.prompt).collect());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let prompts = match &a.prompt_file {
        Some(f) => read_prompts(f)?,
        None => a.prompts.clone(),
    };
    if prompts.is_empty() {
        bail!("no prompts: give --prompt TEXT (repeatable) or --prompts FILE");
    }
    a.gen.validate()?;
    refuse_used_folder(&a.out)?;
    let model = Model::load(&a.model)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let pb = bar(
        (prompts.len() * a.gen.n) as u64,
        "sampling",
        "images",
        a.quiet,
    );
    let mut all = vec![Vec::new(); prompts.len()];
    let how = generate(&model, &prompts, &a.gen, |p, images| {
        for (k, img) in images.iter().enumerate() {
            save_png(img, &a.out.join(format!("{p:04}-{k:02}.png")))?;
        }
        pb.inc(images.len() as u64);
        all[p] = images;
        Ok(())
    })?;
    pb.finish_and_clear();
    save_png(&simple_grid(&all, a.grid_scale)?, &a.out.join("grid.png"))?;
    let list = a.out.join("prompts.txt");
    std::fs::write(&list, prompts.join("\n") + "\n")
        .with_context(|| format!("writing {}", list.display()))?;
    provenance::write(&a.out, "sample", &a.model, &model, &a.gen, &how)?;
    eprintln!(
        "{} of {} from {} ({how}) in {}",
        provenance::count(prompts.len() * a.gen.n, "image", "images"),
        provenance::count(prompts.len(), "prompt", "prompts"),
        model.describe(),
        a.out.display()
    );
    Ok(())
}

/// A folder that already holds files would mix earlier images with these (same names,
/// another model or seed): refused, as `eval` refuses.
pub fn refuse_used_folder(out: &Path) -> anyhow::Result<()> {
    let used = std::fs::read_dir(out)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    if used {
        bail!(
            "{} already holds files (an earlier sample?); choose a new or empty --out",
            out.display()
        );
    }
    Ok(())
}

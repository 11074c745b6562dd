//! `softalign edit`: FlowEdit on a flow-matching model (SD3 / SD3.5 folders, the shapes MMDiT),
//! one image with one or more target prompts, or a JSONL file of edit jobs.
//!
//! Files: `<out>/<j:04>.png` (edit j), `<out>/grid.png` (one row per edit: source | edited),
//! `<out>/edits.jsonl` (each job with its output file), `<out>/edit.json` (model, adapter,
//! settings, seed, versions) and with `--save-latents` `<out>/latents.safetensors`
//! (`x_src.<j>`: the encoded source, `edited.<j>`: the edited latents, fp32).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use softalign_core::logging::run_dir::{device_description, libtorch_version};

use super::edit_loop::{describe, edit_jobs, EditJob, EditSettings};
use super::grid::{grid, save_png};
use super::model::{Model, ModelArgs};
use super::progress::bar;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The source image (PNG / JPEG; its size must suit the model, or give --resolution).
    #[arg(long, requires = "source", conflicts_with = "jobs")]
    pub image: Option<PathBuf>,
    /// What the source image shows.
    #[arg(long, requires = "image")]
    pub source: Option<String>,
    /// What the edited image should show (repeatable: one edit each).
    #[arg(long = "target", value_name = "TEXT", requires = "image")]
    pub targets: Vec<String>,
    /// A JSONL file of edit jobs, one per line:
    /// `{"image": "a.png", "source_prompt": "...", "target_prompt": "..."}` (image paths
    /// relative to the file).
    #[arg(long)]
    pub jobs: Option<PathBuf>,
    /// Resize every source image to this many pixels square first (SoftREPA's script: 1024).
    #[arg(long)]
    pub resolution: Option<u32>,
    #[command(flatten)]
    pub edit: EditSettings,
    /// Also write the source and edited latents (`latents.safetensors`).
    #[arg(long)]
    pub save_latents: bool,
    /// Grid tiles are this many times the image size (default: up to 256 px per tile).
    #[arg(long)]
    pub grid_scale: Option<u32>,
    /// Output folder: new or empty.
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// One line of a jobs file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobLine {
    pub image: PathBuf,
    pub source_prompt: String,
    pub target_prompt: String,
}

/// Reads a jobs file; image paths resolve against its folder.
pub fn read_jobs(path: &Path) -> anyhow::Result<Vec<JobLine>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut jobs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut job: JobLine = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: expected {{\"image\", \"source_prompt\", \"target_prompt\"}}",
                path.display(),
                n + 1
            )
        })?;
        job.image = dir.join(&job.image);
        jobs.push(job);
    }
    if jobs.is_empty() {
        bail!("{}: no edit jobs", path.display());
    }
    Ok(jobs)
}

fn load_image(path: &Path, resolution: Option<u32>) -> anyhow::Result<RgbImage> {
    let img = image::open(path)
        .with_context(|| format!("reading the source image {}", path.display()))?
        .to_rgb8();
    Ok(match resolution {
        Some(r) => image::imageops::resize(&img, r, r, image::imageops::FilterType::Lanczos3),
        None => img,
    })
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let lines = match (&a.jobs, &a.image) {
        (Some(f), None) => read_jobs(f)?,
        (None, Some(img)) => {
            if a.targets.is_empty() {
                bail!("--image needs at least one --target prompt");
            }
            let source = a.source.clone().unwrap_or_default();
            a.targets
                .iter()
                .map(|t| JobLine {
                    image: img.clone(),
                    source_prompt: source.clone(),
                    target_prompt: t.clone(),
                })
                .collect()
        }
        _ => bail!("give --image FILE --source TEXT --target TEXT, or --jobs FILE.jsonl"),
    };
    if a.resolution == Some(0) {
        bail!("--resolution must be positive");
    }
    super::sample::refuse_used_folder(&a.out)?;
    let jobs = lines
        .iter()
        .map(|l| {
            Ok(EditJob {
                image: load_image(&l.image, a.resolution)?,
                source: l.source_prompt.clone(),
                target: l.target_prompt.clone(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let model = Model::load(&a.model)?;
    let (settings, shift_from) = a.edit.resolve(&model)?;
    let how = describe(&settings, shift_from);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let pb = bar(
        (jobs.len() * settings.n_max) as u64,
        "editing",
        "edit-steps",
        a.quiet,
    );
    let start = std::time::Instant::now();
    let mut latents: Vec<(String, tch::Tensor)> = Vec::new();
    let mut edited: Vec<RgbImage> = Vec::with_capacity(jobs.len());
    edit_jobs(
        &model,
        &jobs,
        &settings,
        a.edit.seed,
        a.edit.batch,
        |done| {
            for (k, img) in done.images.iter().enumerate() {
                save_png(img, &a.out.join(format!("{:04}.png", done.first + k)))?;
            }
            if a.save_latents {
                for k in 0..done.images.len() {
                    let j = done.first + k;
                    latents.push((format!("x_src.{j}"), done.x_src.get(k as i64)));
                    latents.push((format!("edited.{j}"), done.edited.get(k as i64)));
                }
            }
            edited.extend(done.images);
            Ok(())
        },
        |n| pb.inc(n as u64),
    )?;
    pb.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    write_outputs(&a, &lines, &jobs, &edited, &model, &how)?;
    if a.save_latents {
        softalign_core::tensors::save_safetensors(
            a.out.join("latents.safetensors"),
            &latents,
            &BTreeMap::new(),
        )?;
    }
    eprintln!(
        "{} by {} ({how}) in {seconds:.1} s -> {}",
        super::provenance::count(jobs.len(), "edit", "edits"),
        model.describe(),
        a.out.display()
    );
    Ok(())
}

fn write_outputs(
    a: &Args,
    lines: &[JobLine],
    jobs: &[EditJob],
    edited: &[RgbImage],
    model: &Model,
    how: &str,
) -> anyhow::Result<()> {
    // Rows of source | edited; images of other sizes than the first are left out of the grid.
    let (w, h) = jobs[0].image.dimensions();
    let rows: Vec<Vec<Vec<RgbImage>>> = jobs
        .iter()
        .zip(edited)
        .filter(|(j, e)| j.image.dimensions() == (w, h) && e.dimensions() == (w, h))
        .map(|(j, e)| vec![vec![j.image.clone()], vec![e.clone()]])
        .collect();
    let scale = a.grid_scale.unwrap_or((256 / w.max(h)).max(1));
    save_png(&grid(&rows, scale)?, &a.out.join("grid.png"))?;
    let mut text = String::new();
    for (j, l) in lines.iter().enumerate() {
        let abs = std::path::absolute(&l.image).unwrap_or_else(|_| l.image.clone());
        text += &serde_json::json!({
            "image": abs,
            "source_prompt": l.source_prompt,
            "target_prompt": l.target_prompt,
            "output": format!("{j:04}.png"),
        })
        .to_string();
        text.push('\n');
    }
    let path = a.out.join("edits.jsonl");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let record = serde_json::json!({
        "command": "edit",
        "argv": std::env::args().collect::<Vec<_>>(),
        "model": a.model.model.as_deref().map(abs),
        "recipe": a.model.recipe.as_deref().map(abs),
        "backbone": model.backbone.info().kind,
        "adapter": a.model.adapter.as_deref().map(abs),
        "loras": a.model.loras,
        "token_set": model.selection.as_ref().and_then(|s| s.set.clone()),
        "ema": a.model.ema,
        "seed": a.edit.seed,
        "editing": how,
        "versions": {
            "softalign": env!("CARGO_PKG_VERSION"),
            "tch": "0.24.0",
            "libtorch": libtorch_version(),
            "device": device_description(model.backbone.device()),
        },
    });
    let path = a.out.join("edit.json");
    std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

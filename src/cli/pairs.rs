//! `softalign pairs`: preference pairs (Diffusion-DPO's training data) from a scored
//! evaluation folder. For each prompt, every image the scorer judged correct is preferred to
//! every image of the same prompt it judged wrong; prompts whose images are all right or all
//! wrong give no pair. The output is the `preference_pairs` dataset's JSONL, image paths
//! absolute so the file works from anywhere.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use softalign_worlds::geneval::read_results_jsonl;

#[derive(clap::Args)]
pub struct Args {
    /// A folder `softalign eval` wrote and scored (it holds results.jsonl).
    #[arg(long)]
    pub from: PathBuf,
    /// At most this many pairs per prompt (0: all of them), the first in image order.
    #[arg(long, default_value_t = 0)]
    pub max_per_prompt: usize,
    /// The JSONL file to write (refused if it exists).
    #[arg(long)]
    pub out: PathBuf,
}

/// The image a results.jsonl line names: its path as written, else the same
/// `<index>/samples/<k>.png` under `root` (the folder moved since it was scored).
fn image_path(root: &Path, filename: &str) -> anyhow::Result<PathBuf> {
    let p = PathBuf::from(filename);
    if p.is_file() {
        return Ok(std::path::absolute(&p)?);
    }
    let tail: Vec<_> = p.components().rev().take(3).collect();
    let moved = tail
        .iter()
        .rev()
        .fold(root.to_path_buf(), |acc, c| acc.join(c));
    if moved.is_file() {
        return Ok(std::path::absolute(&moved)?);
    }
    bail!(
        "{}: image {filename} not found (nor {})",
        root.join("results.jsonl").display(),
        moved.display()
    )
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.out.exists() {
        bail!("{} exists; choose a new --out", a.out.display());
    }
    let results_path = a.from.join("results.jsonl");
    let results = read_results_jsonl(&results_path).with_context(|| {
        format!(
            "reading {} (run `softalign eval` on the shapes world to score a folder)",
            results_path.display()
        )
    })?;
    // Prompt text -> (correct, wrong) images, in the order the evaluation wrote them.
    let mut by_prompt: BTreeMap<String, (Vec<PathBuf>, Vec<PathBuf>)> = BTreeMap::new();
    let mut order = Vec::new();
    for r in &results {
        let img = image_path(&a.from, &r.filename)?;
        let e = by_prompt.entry(r.prompt.clone()).or_insert_with(|| {
            order.push(r.prompt.clone());
            Default::default()
        });
        if r.correct {
            e.0.push(img);
        } else {
            e.1.push(img);
        }
    }
    let mut lines = String::new();
    let (mut pairs, mut prompts) = (0usize, 0usize);
    for prompt in &order {
        let (good, bad) = &by_prompt[prompt];
        let mut here = 0;
        'prompt: for g in good {
            for b in bad {
                if a.max_per_prompt > 0 && here == a.max_per_prompt {
                    break 'prompt;
                }
                let line = serde_json::json!({
                    "prompt": prompt,
                    "preferred": g.display().to_string(),
                    "rejected": b.display().to_string(),
                });
                lines.push_str(&line.to_string());
                lines.push('\n');
                here += 1;
            }
        }
        pairs += here;
        prompts += usize::from(here > 0);
    }
    if pairs == 0 {
        bail!(
            "{}: no prompt has both a correct and a wrong image, so there is no preference \
             to learn; sample more images per prompt (`eval --n`)",
            results_path.display()
        );
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&a.out, lines).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "{pairs} preference pairs from {prompts} of {} prompts ({} images) -> {}",
        order.len(),
        results.len(),
        a.out.display()
    );
    Ok(())
}

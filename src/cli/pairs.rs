//! `softalign pairs`: preference pairs (Diffusion-DPO's training data) from a scored
//! evaluation folder. For each prompt, every image the scorer judged correct is preferred to
//! every image of the same prompt it judged wrong; prompts whose images are all right or all
//! wrong give no pair. The output is the `preference_pairs` dataset's JSONL, image paths
//! absolute so the file works from anywhere, or with `--copy-images` a folder of its own
//! (the JSONL and `images/`, named relative to it).
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
    /// Copy the paired images into `images/` beside the JSONL and name them relative to it:
    /// a dataset folder that can be moved or shipped whole.
    #[arg(long)]
    pub copy_images: bool,
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
    let out_dir = a
        .out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    // Image path -> what the JSONL names it (a copy under images/ with --copy-images).
    let mut named: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut name = |img: &PathBuf| -> anyhow::Result<String> {
        if !a.copy_images {
            return Ok(img.display().to_string());
        }
        if let Some(n) = named.get(img) {
            return Ok(n.clone());
        }
        let rel = format!("images/{:05}.png", named.len());
        let dst = out_dir.join(&rel);
        if let Some(d) = dst.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::copy(img, &dst)
            .with_context(|| format!("copying {} to {}", img.display(), dst.display()))?;
        named.insert(img.clone(), rel.clone());
        Ok(rel)
    };
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
                    "preferred": name(g)?,
                    "rejected": name(b)?,
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
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    std::fs::write(&a.out, lines).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "{pairs} preference pairs from {prompts} of {} prompts ({} images) -> {}",
        order.len(),
        results.len(),
        a.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two prompts: one with two right images and one wrong (two pairs), one all wrong (none).
    /// The copied folder is what the `preference_pairs` dataset reads.
    #[test]
    fn pairs_prefer_each_prompts_right_images_to_its_wrong_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let eval = tmp.path().join("eval");
        let mut lines = String::new();
        for (p, prompt, verdicts) in [
            (0, "a photo of a red circle", [true, false, true]),
            (1, "a photo of a square", [false, false, false]),
        ] {
            for (k, ok) in verdicts.iter().enumerate() {
                let f = eval.join(format!("{p:05}/samples/{k:04}.png"));
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                image::RgbImage::from_pixel(4, 4, image::Rgb([p as u8, k as u8, 0]))
                    .save(&f)
                    .unwrap();
                lines.push_str(
                    &serde_json::json!({
                        "filename": f.display().to_string(), "tag": "single_object",
                        "prompt": prompt, "correct": ok, "reason": "", "metadata": "{}",
                    })
                    .to_string(),
                );
                lines.push('\n');
            }
        }
        std::fs::write(eval.join("results.jsonl"), lines).unwrap();
        let out = tmp.path().join("pairs/pairs.jsonl");
        run(Args {
            from: eval.clone(),
            max_per_prompt: 0,
            out: out.clone(),
            copy_images: true,
        })
        .unwrap();
        let pairs = softalign_core::dataset::preference_pairs::read_pairs(&out).unwrap();
        assert_eq!(pairs.len(), 2);
        assert!(pairs.iter().all(|p| p.prompt == "a photo of a red circle"));
        let px = |f: &Path| image::open(f).unwrap().to_rgb8().get_pixel(0, 0)[1];
        assert_eq!(
            pairs
                .iter()
                .map(|p| (px(&p.preferred), px(&p.rejected)))
                .collect::<Vec<_>>(),
            [(0, 1), (2, 1)]
        );
        assert!(pairs[0]
            .preferred
            .starts_with(tmp.path().join("pairs/images")));
        // An existing output is refused; so is a folder without a preference to learn.
        let again = run(Args {
            from: eval.clone(),
            max_per_prompt: 1,
            out: out.clone(),
            copy_images: false,
        });
        assert!(again.unwrap_err().to_string().contains("exists"));
        std::fs::write(
            eval.join("results.jsonl"),
            std::fs::read_to_string(eval.join("results.jsonl"))
                .unwrap()
                .replace("\"correct\":true", "\"correct\":false"),
        )
        .unwrap();
        let none = run(Args {
            from: eval,
            max_per_prompt: 0,
            out: tmp.path().join("none.jsonl"),
            copy_images: false,
        });
        assert!(none.unwrap_err().to_string().contains("no prompt has both"));
    }
}

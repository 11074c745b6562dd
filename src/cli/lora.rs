//! `softalign lora merge`: a model folder with LoRA files merged into its weights, written as
//! a new folder that diffusers loads as the original (components the LoRA files do not touch
//! are copied unchanged).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use softalign_core::adapter::lora::merge::{self, LoraRef};
use softalign_core::plugin::BuildContext;
use softalign_core::tensors::save_safetensors;
use tch::Device;

#[derive(Subcommand)]
pub enum Command {
    /// Merge LoRA files (PEFT, diffusers, attention-processor .bin, kohya) into a model folder.
    Merge {
        /// The model folder (a diffusers pipeline folder, or a transformer / UNet folder).
        #[arg(long)]
        model: PathBuf,
        /// The backbone plugin that reads it (default: from model_index.json).
        #[arg(long)]
        backbone: Option<String>,
        /// LoRA file or folder, `FILE[:SCALE]` (repeatable, merged in order).
        #[arg(long = "lora", value_name = "FILE[:SCALE]", required = true)]
        loras: Vec<String>,
        /// Scale for every `--lora` that gives none.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// The folder to write (must not exist).
        #[arg(long)]
        output: PathBuf,
    },
}

pub fn run(c: Command) -> anyhow::Result<()> {
    let Command::Merge {
        model,
        backbone,
        loras,
        scale,
        output,
    } = c;
    if output.exists() {
        bail!("{}: already exists; give a new folder", output.display());
    }
    let kind = match backbone {
        Some(k) => k,
        None => super::model::detect_backbone(&model)?,
    };
    let ctx = BuildContext {
        device: Device::Cpu,
        recipe_dir: PathBuf::from("."),
        dtype_override: None,
        empty_prompt: Default::default(),
    };
    let b = super::model::folder_spec(&kind, &model)?
        .build(&ctx)
        .with_context(|| format!("loading the model {}", model.display()))?;
    let refs: Vec<LoraRef> = loras
        .iter()
        .map(|s| {
            let mut r = LoraRef::parse(s)?;
            if !s.contains(':') || r.path.as_os_str() == s.as_str() {
                r.scale = scale;
            }
            Ok(r)
        })
        .collect::<softalign_core::Result<_>>()?;
    merge::merge_all(b.as_ref(), &refs, Path::new("."))?;
    // The shapes pipeline writes itself whole.
    if kind == "shapes" || !model.join("model_index.json").is_file() {
        b.save_pretrained(&output)
            .with_context(|| format!("writing {}", output.display()))?;
        eprintln!("wrote the merged model to {}", output.display());
        return Ok(());
    }
    let tmp = output.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let targets = b.weight_targets();
    let rewritten: Vec<&str> = targets.iter().map(|t| t.component.as_str()).collect();
    copy_tree(&model, &tmp, &rewritten)?;
    for t in &targets {
        let dir = tmp.join(&t.component);
        if t.component == "transformer" || t.component == "unet" {
            b.save_pretrained(&dir)
                .with_context(|| format!("writing {}", dir.display()))?;
        } else {
            // A text encoder: its config and the merged weights as one model.safetensors.
            let mut named: Vec<(String, tch::Tensor)> = t.vs.variables().into_iter().collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            let meta = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
            save_safetensors(dir.join("model.safetensors"), &named, &meta)?;
        }
    }
    std::fs::rename(&tmp, &output).with_context(|| format!("renaming to {}", output.display()))?;
    eprintln!("wrote the merged model to {}", output.display());
    Ok(())
}

/// Copies `src` to `dst`; in the `rewritten` component folders only non-weight files.
fn copy_tree(src: &Path, dst: &Path, rewritten: &[&str]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let e = e?;
        let name = e.file_name();
        let to = dst.join(&name);
        let path = e.path();
        if path.is_dir() {
            let n = name.to_string_lossy();
            if rewritten.contains(&n.as_ref()) {
                std::fs::create_dir_all(&to)?;
                for f in std::fs::read_dir(&path)? {
                    let f = f?.path();
                    let fname = f
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .to_string();
                    let weights = fname.ends_with(".safetensors")
                        || fname.ends_with(".bin")
                        || fname.ends_with(".index.json");
                    if f.is_file() && !weights {
                        std::fs::copy(&f, to.join(&fname))?;
                    }
                }
            } else {
                copy_tree(&path, &to, &[])?;
            }
        } else {
            std::fs::copy(&path, &to)
                .with_context(|| format!("copying {} to {}", path.display(), to.display()))?;
        }
    }
    Ok(())
}

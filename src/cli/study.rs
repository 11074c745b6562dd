//! `softalign study FILE`: one paper claim checked in the shapes world. A study file names the
//! base, the arms (a recipe each, or none for the base itself) and the reference arm; the
//! command trains every arm with K training seeds, evaluates each on the held-out prompts from
//! the same noise, and writes `report.md` (per-category accuracy with intervals over seeds and
//! images, paired differences against the reference) and `chart.png`. Everything lands in
//! per-arm, per-seed folders, so an interrupted study resumes where it stopped.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Deserialize;
use softalign_worlds::geneval::{read_results_jsonl, ImageResult, Tag};

use super::demo::{recipe_sampling, resolve_base, toml_string, SamplingChoice};
use super::eval::{evaluate, PromptSet};
use super::model::{Model, ModelArgs};
use super::study_report::{chart, report};
use super::study_stats::ArmResults;
use super::train::{train_recipe, Args as TrainArgs};

#[derive(clap::Args)]
pub struct Args {
    /// The study file (studies/*.toml).
    pub study: PathBuf,
    /// The study folder (default: runs/study-<name>); an existing one is resumed.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Training seeds per trained arm (default: the study's, else 3).
    #[arg(long)]
    pub seeds: Option<u64>,
    /// Optimizer steps per arm (default: each recipe's own).
    #[arg(long)]
    pub train_steps: Option<u64>,
    /// Images per evaluation prompt (default: the study's, else 2).
    #[arg(long)]
    pub n: Option<usize>,
    #[command(flatten)]
    pub prompt_set: PromptSet,
    /// Noise seed of the evaluation, shared by every arm and training seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling steps (default: the first trained arm's recipe's `[sampler]`).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Images per backbone forward when sampling.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long)]
    pub quiet: bool,
}

/// A study file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Study {
    pub name: String,
    /// The claim, as the paper states it.
    pub claim: String,
    /// `shapes-mmdit`, `shapes-unet` or a model folder.
    pub base: PathBuf,
    /// The arm the others are compared with.
    pub reference: String,
    #[serde(default)]
    pub seeds: Option<u64>,
    #[serde(default)]
    pub n: Option<usize>,
    /// Recipe overrides for every trained arm.
    #[serde(default)]
    pub set: Vec<String>,
    #[serde(rename = "arm")]
    pub arms: Vec<Arm>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    pub name: String,
    /// The recipe that trains this arm (relative to the study file); none: the base itself.
    #[serde(default)]
    pub recipe: Option<PathBuf>,
    /// Overrides for this arm's recipe.
    #[serde(default)]
    pub set: Vec<String>,
    /// A LoRA merged into the base for this arm, in training and evaluation: a tuned model
    /// (Diffusion-DPO, DDPO) held as a LoRA file (relative to the study file).
    #[serde(default)]
    pub lora: Option<PathBuf>,
    /// Evaluate the tokens another (earlier, trained) arm learned, unchanged, on this arm's
    /// model: plug-and-play stacking. One evaluation per training seed of that arm.
    #[serde(default)]
    pub tokens_from: Option<String>,
}

impl Study {
    pub fn load(path: &Path) -> anyhow::Result<Study> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut s: Study =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut names = std::collections::BTreeSet::new();
        let mut trained = std::collections::BTreeSet::new();
        for a in &mut s.arms {
            if let Some(src) = &a.tokens_from {
                if a.recipe.is_some() {
                    bail!(
                        "{}: arm `{}` has both a recipe and tokens_from: it either trains its \
                         tokens or borrows them",
                        path.display(),
                        a.name
                    );
                }
                if !trained.contains(src) {
                    bail!(
                        "{}: arm `{}`: tokens_from = \"{src}\" names no earlier arm with a recipe",
                        path.display(),
                        a.name
                    );
                }
            }
            if let Some(l) = &mut a.lora {
                *l = dir.join(&*l);
                if !l.exists() {
                    bail!(
                        "{}: arm `{}`: no LoRA at {}",
                        path.display(),
                        a.name,
                        l.display()
                    );
                }
            }
            if a.recipe.is_some() {
                trained.insert(a.name.clone());
            }
            if !names.insert(a.name.clone()) {
                bail!("{}: two arms are named `{}`", path.display(), a.name);
            }
            if a.name.is_empty() || a.name.contains(['/', '\\']) || a.name.starts_with('.') {
                bail!(
                    "{}: arm name `{}` must be a plain folder name",
                    path.display(),
                    a.name
                );
            }
            if let Some(r) = &mut a.recipe {
                *r = dir.join(&*r);
                if !r.is_file() {
                    bail!(
                        "{}: arm `{}`: no recipe at {}",
                        path.display(),
                        a.name,
                        r.display()
                    );
                }
            }
        }
        if !names.contains(&s.reference) {
            bail!(
                "{}: reference = \"{}\" names no arm (arms: {})",
                path.display(),
                s.reference,
                s.arms
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if s.arms.len() < 2 {
            bail!("{}: a study compares at least two arms", path.display());
        }
        Ok(s)
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let start = Instant::now();
    let study = Study::load(&a.study)?;
    let base = resolve_base(&study.base)?;
    let seeds = a.seeds.or(study.seeds).unwrap_or(3).max(1);
    let n = a.n.or(study.n).unwrap_or(2).max(1);
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("study-{}", study.name)));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // Sampling as the first trained arm's recipe says (every arm samples alike).
    let sampler_recipe = study
        .arms
        .iter()
        .find_map(|x| x.recipe.clone())
        .context("a study needs at least one arm with a recipe")?;
    let gen = recipe_sampling(
        &sampler_recipe,
        &SamplingChoice {
            n,
            seed: a.seed,
            batch: a.batch,
            steps: a.steps,
            shift: None,
            guidance: None,
        },
    )?;
    let prompts = a.prompt_set.prompts();
    eprintln!(
        "study {} -> {}: {} arms, {seeds} training seed(s), {} prompts x {n} images",
        study.name,
        out.display(),
        study.arms.len(),
        prompts.len()
    );
    let mut arms = Vec::new();
    let mut commands = Vec::new();
    let mut timings = Vec::new();
    for arm in &study.arms {
        let dir = out.join(&arm.name);
        let mut results = Vec::new();
        let per_seed = arm.recipe.is_some() || arm.tokens_from.is_some();
        let seed_list: Vec<u64> = if per_seed {
            (0..seeds).collect()
        } else {
            vec![0]
        };
        let loras: Vec<String> = arm.lora.iter().map(|l| l.display().to_string()).collect();
        for s in seed_list {
            let t = Instant::now();
            let (model, label) = match (&arm.recipe, &arm.tokens_from) {
                (None, None) => (
                    ModelArgs {
                        model: Some(base.clone()),
                        loras: loras.clone(),
                        ..Default::default()
                    },
                    arm.name.clone(),
                ),
                (None, Some(src)) => (
                    ModelArgs {
                        model: Some(base.clone()),
                        adapter: Some(trained_adapter(&out.join(src), s)),
                        loras: loras.clone(),
                        ..Default::default()
                    },
                    format!("{} seed {s}", arm.name),
                ),
                (Some(recipe), _) => {
                    let run_dir = dir.join(format!("seed-{s}")).join("train");
                    let args = train_args(&a, &study, arm, recipe, &base, s, &run_dir);
                    commands.push(format!(
                        "softalign train --recipe {} {} --run-dir {}",
                        recipe.display(),
                        args.set
                            .iter()
                            .map(|x| format!("--set '{x}'"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        run_dir.display()
                    ));
                    let adapter = trained_adapter(&dir, s);
                    if !adapter.is_file() {
                        eprintln!("arm {} seed {s}: training {}", arm.name, recipe.display());
                        train_recipe(&args)?;
                    }
                    (
                        ModelArgs {
                            model: Some(base.clone()),
                            adapter: Some(adapter),
                            loras: loras.clone(),
                            ..Default::default()
                        },
                        format!("{} seed {s}", arm.name),
                    )
                }
            };
            let eval_dir = if per_seed {
                dir.join(format!("seed-{s}")).join("eval")
            } else {
                dir.join("eval")
            };
            results.push(evaluated(
                &model, &prompts, &gen, &eval_dir, &label, a.quiet,
            )?);
            timings.push((label, t.elapsed().as_secs_f64()));
        }
        arms.push(ArmResults {
            name: arm.name.clone(),
            seeds: results,
        });
    }
    let reference = study
        .arms
        .iter()
        .position(|x| x.name == study.reference)
        .expect("checked when loading");
    let settings = vec![
        ("study file".to_string(), a.study.display().to_string()),
        ("base model".into(), base.display().to_string()),
        (
            "training seeds".into(),
            format!("{seeds} per trained arm (train seed 0..{seeds}; the untrained base is evaluated once)"),
        ),
        (
            "evaluation".into(),
            format!(
                "{} held-out prompts (prompt seed {}, at most {} per category) x {n} images, noise seed {}, {} steps, guidance {}{}",
                prompts.len(),
                a.prompt_set.prompt_seed,
                a.prompt_set.per_tag,
                a.seed,
                gen.steps.unwrap_or_default(),
                gen.guidance.unwrap_or_default(),
                gen.shift.map_or(String::new(), |s| format!(", shift {s}"))
            ),
        ),
        (
            "train steps".into(),
            a.train_steps.map_or("each recipe's own".into(), |s| s.to_string()),
        ),
        ("wall time of this invocation".into(), format!("{:.0} s", start.elapsed().as_secs_f64())),
    ];
    let md = report(&study, &arms, reference, &settings, &commands, &timings);
    std::fs::write(out.join("report.md"), &md)?;
    super::grid::save_png(&chart(&arms)?, &out.join("chart.png"))?;
    println!("{md}");
    eprintln!("report: {}", out.join("report.md").display());
    Ok(())
}

/// The adapter an arm's training seed `seed` wrote, in the arm's folder `arm_dir`.
fn trained_adapter(arm_dir: &Path, seed: u64) -> PathBuf {
    arm_dir
        .join(format!("seed-{seed}"))
        .join("train/final/adapter.safetensors")
}

/// The evaluation in `dir`, generated and scored unless a complete one is there already.
fn evaluated(
    model: &ModelArgs,
    prompts: &[softalign_worlds::geneval::EvalPrompt],
    gen: &super::generate::GenSettings,
    dir: &Path,
    label: &str,
    quiet: bool,
) -> anyhow::Result<Vec<ImageResult>> {
    let results = dir.join("results.jsonl");
    if results.is_file() {
        let r = read_results_jsonl(&results)?;
        if r.len() == prompts.len() * gen.n {
            return Ok(r);
        }
    }
    if dir.exists() {
        // Cut short before it was scored: generated again.
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let m = Model::load(model)?;
    let ev = evaluate(&m, prompts, gen, dir, true, &format!("eval {label}"), quiet)?;
    let (r, summary) = ev.scored.context("the evaluation was not scored")?;
    eprintln!("{label}: overall {:.1}%", 100.0 * summary.overall);
    Ok(r)
}

fn train_args(
    a: &Args,
    study: &Study,
    arm: &Arm,
    recipe: &Path,
    base: &Path,
    seed: u64,
    run_dir: &Path,
) -> TrainArgs {
    let b = toml_string(&base.to_string_lossy());
    let mut set = vec![
        format!("backbone.path={b}"),
        format!("data.tokenizer={b}"),
        format!("seed={seed}"),
    ];
    if let Some(s) = a.train_steps {
        set.push(format!("train.steps={s}"));
    }
    if let Some(l) = &arm.lora {
        // Tokens retrained on the tuned model: its LoRA merged before training starts.
        set.push(format!(
            "backbone.loras=[{{ path = {} }}]",
            toml_string(&l.to_string_lossy())
        ));
    }
    set.extend(study.set.iter().cloned());
    set.extend(arm.set.iter().cloned());
    let resume = run_dir.join("checkpoints").is_dir();
    TrainArgs {
        recipe: recipe.to_path_buf(),
        set,
        run_dir: Some(run_dir.to_path_buf()),
        resume: resume.then(|| "latest".to_string()),
        allow_recipe_change: false,
        quiet: a.quiet,
    }
}

/// Category order of the report and chart.
pub fn tags() -> impl Iterator<Item = Option<Tag>> {
    Tag::ALL.into_iter().map(Some).chain(std::iter::once(None))
}

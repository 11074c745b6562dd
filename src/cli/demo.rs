//! `softalign demo`: the README's main command. On the shipped shapes base model it trains
//! soft tokens with the SoftREPA and the AGSM recipe (through `softalign train`'s code),
//! evaluates base, + SoftREPA and + AGSM on the held-out prompts from the same noise, prints
//! one table and writes `report.md` and comparison grids into the run folder.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use softalign_worlds::geneval::{EvalPrompt, ImageResult, Summary};

use super::compare_grid::{labelled_grid, paired_rows};
use super::eval::{evaluate, PromptSet};
use super::generate::GenSettings;
use super::grid::save_png;
use super::model::{Model, ModelArgs};
use super::paired::{paired, PairedRow};
use super::report::{report_markdown, text_table, Column, ReportInput};
use super::train::{train_recipe, Args as TrainArgs};

/// Steps a minutes budget is measured over before the real run.
const PROBE_STEPS: u64 = 3;

#[derive(clap::Args)]
pub struct Args {
    /// The run folder (default: runs/demo-<UTC timestamp>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The base model: `shapes-mmdit` (the SD3-style MMDiT), `shapes-unet` (the SD1.5-style
    /// UNet), both shipped in assets/, or a model folder.
    #[arg(long, default_value = "shapes-mmdit")]
    pub base: PathBuf,
    /// The SoftREPA recipe (default: recipes/shapes/softrepa.toml for an MMDiT base,
    /// recipes/shapes/unet-softrepa.toml for a UNet base).
    #[arg(long)]
    pub softrepa: Option<PathBuf>,
    /// The AGSM recipe (default: recipes/shapes/agsm.toml, or unet-agsm.toml for a UNet base).
    #[arg(long)]
    pub agsm: Option<PathBuf>,
    /// Optimizer steps per recipe (default: each recipe's own `train.steps`).
    #[arg(long)]
    pub train_steps: Option<u64>,
    /// Instead of --train-steps: train each recipe for about this long (its step time is
    /// measured on a few steps first).
    #[arg(long)]
    pub minutes_per_recipe: Option<f64>,
    /// Extra recipe overrides for both recipes (`--set train.lr=5e-3`, repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub prompt_set: PromptSet,
    /// Images per evaluation prompt (more images narrow the intervals; each costs one sampling
    /// run per model, so fewer shorten the demo). The default 2 keeps `make demo` within 10
    /// minutes on a 2-core CPU; `--n 4` is the bases' NOTE.md tables (512 images per model).
    #[arg(long, default_value_t = 2)]
    pub n: usize,
    /// Sampling steps (default: the SoftREPA recipe's `[sampler]`, else 20).
    #[arg(long)]
    pub steps: Option<usize>,
    /// FlowMatch Euler's shift, for an MMDiT base (default: the SoftREPA recipe's
    /// `[sampler]`, else 1).
    #[arg(long)]
    pub shift: Option<f64>,
    /// Classifier-free guidance scale (default: the SoftREPA recipe's `[sampler] guidance`,
    /// else 4).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Noise seed shared by every model.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per backbone forward.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Rows of images the recipe fixed, and of images it broke, shown in each grid (the rest
    /// are counted in a last row).
    #[arg(long, default_value_t = 16)]
    pub grid_changed: usize,
    /// Unchanged images per category shown after them, for comparison.
    #[arg(long, default_value_t = 1)]
    pub grid_per_tag: usize,
    #[arg(long)]
    pub quiet: bool,
}

/// One model's column in the comparison.
struct Evaluated {
    name: String,
    results: Vec<ImageResult>,
    summary: Summary,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let start = Instant::now();
    let base = resolve_base(&a.base)?;
    let recipes = Recipes::for_base(&a, &base);
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("demo-{}", utc_timestamp())));
    if out.join("report.md").exists() {
        bail!(
            "{} already holds a demo run; choose another --out",
            out.display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let gen = gen_settings(&a, &recipes.softrepa)?;
    let prompts = a.prompt_set.prompts();
    eprintln!(
        "demo -> {}: base {}, {} held-out prompts x {} images, {} sampling steps, guidance {}",
        out.display(),
        base.display(),
        prompts.len(),
        gen.n,
        gen.steps.unwrap_or_default(),
        gen.guidance.unwrap_or_default()
    );
    let mut timings: Vec<(String, f64)> = Vec::new();
    let mut evaluated = Vec::new();
    let base_args = ModelArgs {
        model: Some(base.clone()),
        ..Default::default()
    };
    evaluated.push(eval_one(
        &a,
        &gen,
        "base",
        &base_args,
        &prompts,
        &out,
        &mut timings,
    )?);
    let mut train_steps = Vec::new();
    for (name, recipe) in [
        ("SoftREPA", recipes.softrepa.clone()),
        ("AGSM", recipes.agsm.clone()),
    ] {
        let slug = name.to_lowercase();
        let t = Instant::now();
        let steps = match a.minutes_per_recipe {
            Some(m) => probe_steps(&a, &recipe, &base, &out.join(format!("probe-{slug}")), m)?,
            None => match a.train_steps {
                Some(n) => n,
                None => {
                    softalign_core::recipe::load(&recipe, &a.set)?
                        .recipe
                        .train
                        .steps
                }
            },
        };
        let run_dir = out.join(format!("train-{slug}"));
        eprintln!(
            "training {name} tokens ({}; {steps} steps)",
            recipe.display()
        );
        let s = train_recipe(&train_args(&a, &recipe, &base, steps, &run_dir))?;
        timings.push((
            format!("train {name} ({steps} steps)"),
            t.elapsed().as_secs_f64(),
        ));
        train_steps.push((name, steps, s.last_loss));
        let adapter = s.final_dir.join("adapter.safetensors");
        let m = ModelArgs {
            adapter: Some(adapter),
            ..base_args.clone()
        };
        let label = format!("+{name}");
        evaluated.push(eval_one(
            &a,
            &gen,
            &label,
            &m,
            &prompts,
            &out,
            &mut timings,
        )?);
    }
    let t = Instant::now();
    let mut grids = Vec::new();
    for e in &evaluated[1..] {
        let file = format!(
            "grid-base-vs-{}.png",
            e.name.trim_start_matches('+').to_lowercase()
        );
        let rows = paired_rows(
            &evaluated[0].results,
            &e.results,
            &e.name,
            a.grid_changed,
            a.grid_per_tag,
        )?;
        let cols = vec!["base".to_string(), e.name.clone()];
        save_png(&labelled_grid(&cols, &rows, 3)?, &out.join(&file))?;
        grids.push((
            file,
            format!(
                "Each row: one prompt and noise seed, base left, {} right; frames green where \
                 the scorer judged the image correct, red where wrong. Images {} fixed come \
                 first, then those it broke, then unchanged examples per category.",
                e.name, e.name
            ),
        ));
    }
    timings.push(("grids".into(), t.elapsed().as_secs_f64()));
    timings.push(("total".into(), start.elapsed().as_secs_f64()));
    let cols: Vec<Column<'_>> = evaluated
        .iter()
        .map(|e| Column {
            name: &e.name,
            summary: &e.summary,
        })
        .collect();
    let table = text_table(&cols);
    let paired_rows: Vec<(String, Vec<PairedRow>)> = evaluated[1..]
        .iter()
        .map(|e| (e.name.clone(), paired(&evaluated[0].results, &e.results)))
        .collect();
    let settings = settings(&a, &recipes, &gen, &base, &prompts, &train_steps);
    let report = report_markdown(&ReportInput {
        cols: &cols,
        settings: &settings,
        timings: &timings,
        grids: &grids,
        paired: &paired_rows,
        grid_prompts: &[],
    });
    std::fs::write(out.join("report.md"), report)?;
    std::fs::write(out.join("table.txt"), &table)?;
    println!("\nHeld-out GenEval-style accuracy, shapes world (Wilson 95% CI over images)\n");
    print!("{table}");
    println!("\nPaired against the base (same prompts and noise): images fixed / broken, exact McNemar p");
    for (name, rows) in &paired_rows {
        let all = rows.last().expect("an overall row");
        println!(
            "  {name}: {} fixed, {} broken of {} images, p = {:.3}",
            all.gained, all.lost, all.pairs, all.p_value
        );
    }
    println!(
        "\nwall time {:.1} s; report: {}",
        start.elapsed().as_secs_f64(),
        out.join("report.md").display()
    );
    Ok(())
}

fn eval_one(
    a: &Args,
    gen: &GenSettings,
    name: &str,
    model: &ModelArgs,
    prompts: &[EvalPrompt],
    out: &Path,
    timings: &mut Vec<(String, f64)>,
) -> anyhow::Result<Evaluated> {
    let t = Instant::now();
    let m = Model::load(model)?;
    let kind = &m.backbone.info().kind;
    if kind != super::eval::SHAPES_KIND {
        bail!("the demo scores shapes-world images; the base model is a `{kind}` backbone");
    }
    let dir = out.join(format!(
        "eval-{}",
        name.trim_start_matches('+').to_lowercase()
    ));
    let ev = evaluate(
        &m,
        prompts,
        gen,
        &dir,
        true,
        &format!("eval {name}"),
        a.quiet,
    )?;
    let (results, summary) = ev.scored.context("the evaluation was not scored")?;
    eprintln!(
        "{name}: overall {:.1}% over {} images ({:.1} s)",
        100.0 * summary.overall,
        ev.images,
        t.elapsed().as_secs_f64()
    );
    timings.push((
        format!("eval {name} ({} images)", ev.images),
        t.elapsed().as_secs_f64(),
    ));
    Ok(Evaluated {
        name: name.to_string(),
        results,
        summary,
    })
}

fn train_args(a: &Args, recipe: &Path, base: &Path, steps: u64, run_dir: &Path) -> TrainArgs {
    // The training data is tokenized with the base model's own tokenizer.
    let base = toml_string(&base.to_string_lossy());
    let mut set = vec![
        format!("backbone.path={base}"),
        format!("data.tokenizer={base}"),
        format!("train.steps={steps}"),
    ];
    set.extend(a.set.iter().cloned());
    TrainArgs {
        recipe: recipe.to_path_buf(),
        set,
        run_dir: Some(run_dir.to_path_buf()),
        resume: None,
        allow_recipe_change: false,
        quiet: a.quiet,
    }
}

/// The two recipes the demo trains.
struct Recipes {
    softrepa: PathBuf,
    agsm: PathBuf,
}

impl Recipes {
    /// The command line's, else the shipped recipes for the base's denoiser.
    fn for_base(a: &Args, base: &Path) -> Self {
        let unet = base.join("unet").join("config.json").is_file();
        let (s, g) = if unet {
            (UNET_SOFTREPA, UNET_AGSM)
        } else {
            (MMDIT_SOFTREPA, MMDIT_AGSM)
        };
        Self {
            softrepa: a.softrepa.clone().unwrap_or_else(|| PathBuf::from(s)),
            agsm: a.agsm.clone().unwrap_or_else(|| PathBuf::from(g)),
        }
    }
}

const MMDIT_SOFTREPA: &str = "recipes/shapes/softrepa.toml";
const MMDIT_AGSM: &str = "recipes/shapes/agsm.toml";
const UNET_SOFTREPA: &str = "recipes/shapes/unet-softrepa.toml";
const UNET_AGSM: &str = "recipes/shapes/unet-agsm.toml";

/// `--base`: a folder, or the name of a base shipped in assets/.
pub(super) fn resolve_base(base: &Path) -> anyhow::Result<PathBuf> {
    let shipped = Path::new("assets").join(base);
    let dir = if base.is_dir() {
        base.to_path_buf()
    } else if base.components().count() == 1 && shipped.is_dir() {
        shipped
    } else {
        bail!(
            "{}: no base model there (the repository ships assets/shapes-mmdit and \
             assets/shapes-unet; pass --base shapes-unet, or a model folder)",
            base.display()
        );
    };
    dir.canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))
}

/// Sampling settings: the command line's, else the SoftREPA recipe's `[sampler]` (the
/// schedule and guidance its author chose for this model). A DDIM sampler takes its schedule
/// from the model folder's scheduler_config.json and only its steps from the recipe.
fn gen_settings(a: &Args, softrepa: &Path) -> anyhow::Result<GenSettings> {
    recipe_sampling(
        softrepa,
        &SamplingChoice {
            n: a.n,
            seed: a.seed,
            batch: a.batch,
            steps: a.steps,
            shift: a.shift,
            guidance: a.guidance,
        },
    )
}

/// The command line's sampling choices (None: the recipe's).
pub(super) struct SamplingChoice {
    pub n: usize,
    pub seed: u64,
    pub batch: usize,
    pub steps: Option<usize>,
    pub shift: Option<f64>,
    pub guidance: Option<f64>,
}

/// `a`'s choices, else `recipe`'s `[sampler]`, else 20 steps, shift 1, guidance 4.
pub(super) fn recipe_sampling(recipe: &Path, a: &SamplingChoice) -> anyhow::Result<GenSettings> {
    let recipe = softalign_core::recipe::load(recipe, &[])?;
    let sampler = recipe.json.get("sampler");
    let field = |k: &str| sampler.and_then(|s| s.get(k)).cloned();
    let flow =
        field("type").and_then(|v| v.as_str().map(str::to_string)) != Some("ddim".to_string());
    let steps = match a.steps {
        Some(s) => s,
        None => field("steps").and_then(|v| v.as_u64()).unwrap_or(20) as usize,
    };
    let shift = match (a.shift, flow) {
        (Some(_), false) => {
            bail!("--shift is a FlowMatch Euler setting; this base samples with DDIM")
        }
        (Some(s), true) => Some(s),
        (None, true) => Some(field("shift").and_then(|v| v.as_f64()).unwrap_or(1.0)),
        (None, false) => None,
    };
    let guidance = match a.guidance {
        Some(g) => g,
        None => field("guidance").and_then(|v| v.as_f64()).unwrap_or(4.0),
    };
    Ok(GenSettings {
        n: a.n,
        seed: a.seed,
        steps: Some(steps),
        guidance: Some(guidance),
        shift,
        batch: a.batch,
        height: None,
        width: None,
    })
}

/// Measures the recipe's step time over a few steps and returns the steps that fit `minutes`.
fn probe_steps(
    a: &Args,
    recipe: &Path,
    base: &Path,
    dir: &Path,
    minutes: f64,
) -> anyhow::Result<u64> {
    eprintln!("measuring the step time of {}", recipe.display());
    let s = train_recipe(&train_args(a, recipe, base, PROBE_STEPS, dir))?;
    let per_step = s.elapsed_s / PROBE_STEPS as f64;
    Ok(((minutes * 60.0 / per_step.max(1e-6)) as u64).max(1))
}

/// A TOML string literal, so paths with quotes or backslashes survive `--set`.
pub(super) fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn settings(
    a: &Args,
    recipes: &Recipes,
    gen: &GenSettings,
    base: &Path,
    prompts: &[EvalPrompt],
    train: &[(&str, u64, Option<f64>)],
) -> Vec<(String, String)> {
    let mut s = vec![
        ("base model".into(), base.display().to_string()),
        (
            "evaluation prompts".into(),
            format!(
                "{} held-out shapes-world prompts (prompt seed {}, at most {} per category)",
                prompts.len(),
                a.prompt_set.prompt_seed,
                a.prompt_set.per_tag
            ),
        ),
        (
            "sampling".into(),
            format!(
                "{} image{} per prompt, {}, guidance {}, noise seed {}",
                gen.n,
                if gen.n == 1 { "" } else { "s" },
                match gen.shift {
                    Some(shift) => format!(
                        "FlowMatch Euler {} steps, shift {shift}",
                        gen.steps.unwrap_or_default()
                    ),
                    None => format!(
                        "DDIM {} steps (the model's scheduler_config.json)",
                        gen.steps.unwrap_or_default()
                    ),
                },
                gen.guidance.unwrap_or_default(),
                gen.seed
            ),
        ),
        (
            "token use at sampling".into(),
            "SoftREPA: its tokens in both guidance branches; AGSM: the positive set in both".into(),
        ),
    ];
    for ((name, steps, loss), recipe) in train.iter().zip([&recipes.softrepa, &recipes.agsm]) {
        s.push((
            format!("{name} training"),
            format!(
                "{} with {steps} steps; last loss {}",
                recipe.display(),
                loss.map_or("-".into(), |l| format!("{l:.5}"))
            ),
        ));
    }
    if !a.set.is_empty() {
        s.push(("recipe overrides".into(), a.set.join(", ")));
    }
    s.push(("machine threads".into(), tch::get_num_threads().to_string()));
    s
}

/// `YYYYMMDD-HHMMSS` in UTC, without a date library.
pub(super) fn utc_timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

//! `softalign eval-edit`: the shapes world's editing benchmark, scored exactly. Held-out edit
//! tasks (worlds/src/shapes/edits.rs: change one object's colour, shape or count, or move it,
//! with one bystander) are rendered, edited with FlowEdit by the base model and, with
//! `--adapter`, by the model with its tokens in all four branches, over a grid of target CFG
//! scales and n_max values (the SoftREPA paper's Tables 8 / 9 in miniature), from the same
//! noise. Each edit is scored by worlds/src/shapes/edit_score.rs: the target prompt's verdict,
//! whether the bystander is still detected where it was, and the pixel distance outside the
//! edit.
//!
//! `<out>/` holds `tasks.jsonl`, `sources/<i:03>.png`, one folder per run
//! (`<model>-cfg<g>-nmax<n>/<i:03>.png` + `results.jsonl`), `table.txt`, `report.md`,
//! `summary.json` and `grid.png` (rows: tasks; columns: source, ground truth, then every run,
//! framed green where the target prompt's verdict is right).
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use image::RgbImage;
use softalign_backbones::schedulers::flow_edit::FlowEditSettings;
use softalign_worlds::geneval::wilson_interval;
use softalign_worlds::shapes::edit_score::{score_edit, EditScore};
use softalign_worlds::shapes::edits::{edit_tasks, EditKind, EditTask};
use softalign_worlds::shapes::{render, ScorerConfig};

use super::compare_grid::{labelled_grid, Row, Tile};
use super::edit_loop::{edit_jobs, EditJob};
use super::eval::SHAPES_KIND;
use super::grid::save_png;
use super::model::{backbone_kind, Model, ModelArgs};
use super::progress::bar;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tasks of each kind (colour, shape, count, move).
    #[arg(long, default_value_t = 6)]
    pub per_kind: usize,
    /// Seed of the task draw.
    #[arg(long, default_value_t = 0)]
    pub task_seed: u64,
    /// Target CFG scales (standard formula; SoftREPA's script's s is our s + 1), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "6,10,13.5")]
    pub tar_guidance: Vec<f64>,
    /// n_max values, comma-separated (FlowEdit's 33 of 50 and SoftREPA's 30 of 50 are about 13
    /// and 12 of the default 20 steps).
    #[arg(long, value_delimiter = ',', default_value = "12,14")]
    pub n_max: Vec<usize>,
    /// Steps of the schedule (the shapes model samples with 20).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub n_min: usize,
    #[arg(long, default_value_t = 1)]
    pub n_avg: usize,
    #[arg(long, default_value_t = 3.5)]
    pub src_guidance: f64,
    /// Timestep shift (default: the model folder's, else 3).
    #[arg(long)]
    pub shift: Option<f64>,
    /// Noise seed, shared by every run so they compare on the same noise.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Edits per batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Output folder: new or empty.
    #[arg(long)]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// One run of the grid: a model variant at one setting, and its scores in task order.
struct RunScores {
    label: String,
    tar_guidance: Option<f64>,
    n_max: Option<usize>,
    scores: Vec<EditScore>,
    images: Vec<RgbImage>,
    seconds: f64,
}

fn rate(k: usize, n: usize) -> String {
    let ci = wilson_interval(k, n);
    format!(
        "{:5.1}% [{:4.1}, {:5.1}]",
        100.0 * k as f64 / n.max(1) as f64,
        100.0 * ci[0],
        100.0 * ci[1]
    )
}

/// Mean and normal 95% interval, x 100 (percent of the RGB range).
fn mean_ci(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let half = 1.959_964 * (var / n).sqrt();
    format!(
        "{:5.2} [{:.2}, {:.2}]",
        100.0 * m,
        100.0 * (m - half),
        100.0 * (m + half)
    )
}

fn table(runs: &[RunScores]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:>6} {:>5} {:>4}  {:<22} {:<22} {:<22} {:<20} {:>7}",
        "model",
        "tarCFG",
        "n_max",
        "n",
        "target correct",
        "bystander kept",
        "both",
        "pixel dist x100",
        "time s"
    );
    for r in runs {
        let n = r.scores.len();
        let t = r.scores.iter().filter(|s| s.target_correct).count();
        let k = r.scores.iter().filter(|s| s.all_kept()).count();
        let b = r.scores.iter().filter(|s| s.success()).count();
        let d: Vec<f64> = r.scores.iter().filter_map(|s| s.pixel_distance).collect();
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<8} {:>6} {:>5} {:>4}  {:<22} {:<22} {:<22} {:<20} {:>7.1}",
            r.label,
            opt(r.tar_guidance.map(|g| g.to_string())),
            opt(r.n_max.map(|n| n.to_string())),
            n,
            rate(t, n),
            rate(k, n),
            rate(b, n),
            mean_ci(&d),
            r.seconds
        );
    }
    s
}

/// Target-prompt accuracy per edit kind, one row per run.
fn kind_table(runs: &[RunScores], tasks: &[EditTask]) -> String {
    let mut s = String::from("| run |");
    for k in EditKind::ALL {
        let _ = write!(s, " {} |", k.name());
    }
    s += "\n|---|";
    s += &"---|".repeat(EditKind::ALL.len());
    s.push('\n');
    for r in runs {
        let _ = write!(s, "| {} |", run_name(r));
        for k in EditKind::ALL {
            let idx: Vec<usize> = (0..tasks.len()).filter(|&i| tasks[i].kind == k).collect();
            let c = idx.iter().filter(|&&i| r.scores[i].target_correct).count();
            let _ = write!(s, " {c}/{} |", idx.len());
        }
        s.push('\n');
    }
    s
}

/// Tokens against the base at the same setting, edit by edit (same tasks, same noise): how
/// many edits the tokens fixed and broke, by the target verdict, with the exact McNemar test.
fn paired_table(runs: &[RunScores]) -> String {
    let mut s = String::from(
        "| target CFG | n_max | base correct | tokens correct | fixed | broken | McNemar p |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let base = runs.iter().filter(|r| r.label == "base");
    for b in base {
        let Some(t) = runs.iter().find(|r| {
            r.label == "tokens" && r.tar_guidance == b.tar_guidance && r.n_max == b.n_max
        }) else {
            continue;
        };
        let pairs = || b.scores.iter().zip(&t.scores);
        let fixed = pairs()
            .filter(|(x, y)| !x.target_correct && y.target_correct)
            .count();
        let broken = pairs()
            .filter(|(x, y)| x.target_correct && !y.target_correct)
            .count();
        let correct = |r: &RunScores| r.scores.iter().filter(|s| s.target_correct).count();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {fixed} | {broken} | {:.3} |",
            b.tar_guidance.unwrap_or_default(),
            b.n_max.unwrap_or_default(),
            correct(b),
            correct(t),
            super::paired::mcnemar_exact(fixed, broken)
        );
    }
    s
}

fn run_name(r: &RunScores) -> String {
    match (r.tar_guidance, r.n_max) {
        (Some(g), Some(n)) => format!("{}-cfg{g}-nmax{n}", r.label),
        _ => r.label.clone(),
    }
}

fn write_results(dir: &Path, tasks: &[EditTask], r: &RunScores) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut text = String::new();
    for (i, (s, img)) in r.scores.iter().zip(&r.images).enumerate() {
        save_png(img, &dir.join(format!("{i:03}.png")))?;
        text += &serde_json::json!({
            "task": i,
            "kind": tasks[i].kind,
            "target_prompt": tasks[i].target_prompt.prompt,
            "score": s,
        })
        .to_string();
        text.push('\n');
    }
    let path = dir.join("results.jsonl");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let kind = backbone_kind(&a.model)?;
    if kind != SHAPES_KIND {
        bail!(
            "eval-edit scores the shapes world's images; backbone `{kind}` is not its model \
             (use `softalign edit` for other models)"
        );
    }
    if a.per_kind == 0 || a.tar_guidance.is_empty() || a.n_max.is_empty() {
        bail!("--per-kind, --tar-guidance and --n-max need at least one value each");
    }
    super::sample::refuse_used_folder(&a.out)?;
    let tasks = edit_tasks(a.task_seed, a.per_kind)?;
    let mut model = Model::load(&a.model)?;
    // Validate every setting of the grid before any editing starts.
    let shift_edit = super::edit_loop::EditSettings {
        shift: a.shift,
        ..Default::default()
    };
    let (base_settings, shift_from) = {
        let (s, o) = shift_edit.resolve(&model)?;
        (
            FlowEditSettings {
                steps: a.steps,
                n_min: a.n_min,
                n_avg: a.n_avg,
                src_guidance: a.src_guidance,
                ..s
            },
            o,
        )
    };
    let grid_settings: Vec<FlowEditSettings> = a
        .tar_guidance
        .iter()
        .flat_map(|&g| {
            let b = base_settings.clone();
            a.n_max.iter().map(move |&n| FlowEditSettings {
                tar_guidance: g,
                n_max: n,
                ..b.clone()
            })
        })
        .collect();
    for s in &grid_settings {
        s.validate()?;
    }
    std::fs::create_dir_all(a.out.join("sources"))
        .with_context(|| format!("creating {}", a.out.display()))?;
    let cfg = ScorerConfig::default();
    let sources: Vec<RgbImage> = tasks
        .iter()
        .map(|t| render(&t.source, t.source.image_size))
        .collect();
    let mut lines = String::new();
    for (i, (t, img)) in tasks.iter().zip(&sources).enumerate() {
        save_png(img, &a.out.join(format!("sources/{i:03}.png")))?;
        lines += &serde_json::to_string(t)?;
        lines.push('\n');
    }
    std::fs::write(a.out.join("tasks.jsonl"), lines)?;
    let jobs: Vec<EditJob> = tasks
        .iter()
        .zip(&sources)
        .map(|(t, img)| EditJob {
            image: img.clone(),
            source: t.source_prompt.clone(),
            target: t.target_prompt.prompt.clone(),
        })
        .collect();

    let tokens = model.selection.take();
    let mut variants = vec![("base", None)];
    if tokens.is_some() {
        variants.push(("tokens", tokens));
    }
    let total: usize = grid_settings.iter().map(|s| s.n_max).sum::<usize>() * tasks.len();
    let pb = bar(
        (total * variants.len()) as u64,
        "editing",
        "edit-steps",
        a.quiet,
    );
    let mut runs = vec![RunScores {
        label: "no edit".into(),
        tar_guidance: None,
        n_max: None,
        scores: tasks
            .iter()
            .zip(&sources)
            .map(|(t, s)| score_edit(t, s, s, &cfg))
            .collect(),
        images: sources.clone(),
        seconds: 0.0,
    }];
    for (label, sel) in variants {
        model.selection = sel;
        for s in &grid_settings {
            let start = std::time::Instant::now();
            let mut images = Vec::with_capacity(tasks.len());
            edit_jobs(
                &model,
                &jobs,
                s,
                a.seed,
                a.batch,
                |done| {
                    images.extend(done.images);
                    Ok(())
                },
                |n| pb.inc(n as u64),
            )?;
            let scores = tasks
                .iter()
                .zip(&sources)
                .zip(&images)
                .map(|((t, src), img)| score_edit(t, src, img, &cfg))
                .collect();
            let r = RunScores {
                label: label.into(),
                tar_guidance: Some(s.tar_guidance),
                n_max: Some(s.n_max),
                scores,
                images,
                seconds: start.elapsed().as_secs_f64(),
            };
            write_results(&a.out.join(run_name(&r)), &tasks, &r)?;
            runs.push(r);
        }
    }
    pb.finish_and_clear();
    let how = format!(
        "FlowEdit T {}, n_min {}, n_avg {}, source CFG {} (standard formula), shift {} ({shift_from})",
        a.steps, a.n_min, a.n_avg, a.src_guidance, base_settings.shift
    );
    let text = table(&runs);
    std::fs::write(a.out.join("table.txt"), &text)?;
    let paired = runs
        .iter()
        .any(|r| r.label == "tokens")
        .then(|| paired_table(&runs));
    let report = format!(
        "# Shapes-world editing benchmark\n\n{} tasks ({} per kind: colour, shape, count, \
         move; task seed {}), {}; target CFG and n_max as in each row, noise seed {}.\n\
         Model: {}.\n\nIntervals: Wilson 95% for rates, normal 95% for the mean pixel \
         distance (x100, 0..100 of the RGB range, outside the edited objects).\n\n```\n{text}```\n\n\
         Target prompt correct, by edit kind:\n\n{}{}",
        tasks.len(),
        a.per_kind,
        a.task_seed,
        how,
        a.seed,
        model.describe(),
        kind_table(&runs, &tasks),
        paired
            .as_ref()
            .map(|t| format!("\nTokens against the base, edit by edit (target verdict):\n\n{t}"))
            .unwrap_or_default()
    );
    std::fs::write(a.out.join("report.md"), report)?;
    let summary: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            serde_json::json!({
                "run": run_name(r),
                "tar_guidance": r.tar_guidance,
                "n_max": r.n_max,
                "n": r.scores.len(),
                "target_correct": r.scores.iter().filter(|s| s.target_correct).count(),
                "all_kept": r.scores.iter().filter(|s| s.all_kept()).count(),
                "success": r.scores.iter().filter(|s| s.success()).count(),
                "pixel_distance": r.scores.iter().filter_map(|s| s.pixel_distance).collect::<Vec<_>>(),
                "seconds": r.seconds,
            })
        })
        .collect();
    std::fs::write(
        a.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    save_png(&grid(&tasks, &sources, &runs)?, &a.out.join("grid.png"))?;
    eprintln!(
        "{} tasks x {} runs ({how}; {}) -> {}",
        tasks.len(),
        runs.len() - 1,
        model.describe(),
        a.out.display()
    );
    print!("{text}");
    if let Some(t) = &paired {
        print!("{t}");
    }
    Ok(())
}

/// Rows: the first 16 tasks; columns: source, ground truth, then every run's edit framed by
/// the target verdict.
fn grid(tasks: &[EditTask], sources: &[RgbImage], runs: &[RunScores]) -> anyhow::Result<RgbImage> {
    let mut columns = vec!["source".to_string(), "truth".to_string()];
    columns.extend(runs[1..].iter().map(|r| {
        format!(
            "{} {}/{}",
            if r.label == "base" { "B" } else { "T" },
            r.tar_guidance.unwrap_or_default(),
            r.n_max.unwrap_or_default()
        )
    }));
    let rows: Vec<Row> = tasks
        .iter()
        .enumerate()
        .take(16)
        .map(|(i, t)| {
            let mut tiles = vec![
                Tile {
                    image: sources[i].clone(),
                    verdict: None,
                },
                Tile {
                    image: render(&t.target, t.target.image_size),
                    verdict: None,
                },
            ];
            tiles.extend(runs[1..].iter().map(|r| Tile {
                image: r.images[i].clone(),
                verdict: Some(r.scores[i].target_correct),
            }));
            Row {
                label: vec![
                    format!("{} {}", t.kind.name(), i),
                    t.target_prompt.prompt.replace("a photo of ", ""),
                ],
                accent: None,
                tiles,
            }
        })
        .collect();
    labelled_grid(&columns, &rows, 2)
}

//! The `softalign` command line.
use clap::{Parser, Subcommand};

// Plugin crates must be linked for their typetag impls and catalogue entries to exist; the
// binary never names most of their items, so force the link.
extern crate softalign_backbones;
extern crate softalign_objectives;

mod cli;

#[derive(Parser)]
#[command(
    name = "softalign",
    version,
    about = "Align text-to-image diffusion models with soft tokens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every plugin a recipe can name, grouped by kind.
    List(cli::list::Args),
    /// One forward on named tensors from a safetensors file (SD3 transformer, UNet, CLIP / T5
    /// text encoder, VAE), for checking a conversion.
    Forward(cli::forward::Args),
    /// Time the denoiser's forward and forward+backward (SD3 MMDiT or UNet) with and without
    /// soft tokens.
    Bench(cli::bench::Args),
    /// Recipe tools.
    #[command(subcommand)]
    Recipe(cli::recipe::Command),
    /// Evaluate a recipe's objectives on one fixed batch file and print the terms as JSON.
    Loss(cli::loss::Args),
    /// Encode a recipe's dataset once (latents + caption conditioning) into its encoding cache.
    Cache(cli::cache::Args),
    /// Train a recipe's adapters (or, in full mode, the backbone) into a run folder.
    Train(cli::train::Args),
    /// Write a run's checkpoint (raw or EMA weights) as the run's final result would be: to
    /// evaluate a run part-way, or keep a stopped run's result.
    Export(cli::export::Args),
    /// Generate images for prompts: PNG files and a grid.
    Sample(cli::sample::Args),
    /// Generate images for evaluation prompts, score them (shapes world) and summarise per
    /// category with 95% intervals, in GenEval's formats.
    Eval(cli::eval::Args),
    /// Preference pairs (Diffusion-DPO's data) from a scored evaluation folder: each prompt's
    /// correct images preferred to its wrong ones, as `preference_pairs` JSONL.
    Pairs(cli::pairs::Args),
    /// The shapes-world demo: train SoftREPA and AGSM tokens on the shipped base, evaluate all
    /// three, print one table and write report.md and grids.
    Demo(cli::demo::Args),
    /// A paper claim checked in the shapes world: train every arm of a study file with K
    /// training seeds, evaluate them from the same noise, write report.md and chart.png.
    Study(cli::study::Args),
    /// Run an object detector (a YOLOv8 TorchScript export) on image files: boxes, classes,
    /// scores and counts per image as JSON lines.
    Detect(cli::detect::Args),
    /// LoRA tools (`lora merge`: LoRA files merged into a model folder).
    #[command(subcommand)]
    Lora(cli::lora::Command),
    /// Edit images with FlowEdit (flow-matching models: SD3 / SD3.5, the shapes MMDiT): a
    /// source image, its prompt and target prompts, or a JSONL file of edit jobs.
    Edit(cli::edit::Args),
    /// The shapes world's editing benchmark: held-out edit tasks with ground truth, FlowEdit by
    /// the base model and + tokens over target CFG scales and n_max values, scored exactly.
    EvalEdit(cli::eval_edit::Args),
    /// Convert the SoftREPA release's dc_tokens.pth / dc_t_tokens.pth into an adapter file.
    ImportTokens(cli::import_tokens::Args),
}

fn main() {
    cli::closed_pipe::quiet_on_closed_stdout();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::List(a) => cli::list::run(a),
        Command::Recipe(c) => cli::recipe::run(c),
        Command::Loss(a) => cli::loss::run(a),
        Command::Train(a) => cli::train::run(a),
        Command::Export(a) => cli::export::run(a),
        Command::Cache(a) => cli::cache::run(a),
        Command::Sample(a) => cli::sample::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Demo(a) => cli::demo::run(a),
        Command::Study(a) => cli::study::run(a),
        Command::Pairs(a) => cli::pairs::run(a),
        Command::Forward(a) => cli::forward::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Lora(c) => cli::lora::run(c),
        Command::ImportTokens(a) => cli::import_tokens::run(a),
        Command::Detect(a) => cli::detect::run(a),
        Command::Edit(a) => cli::edit::run(a),
        Command::EvalEdit(a) => cli::eval_edit::run(a),
    };
    if let Err(e) = result {
        if let Some(p) = e.downcast_ref::<cli::train::Preempted>() {
            eprintln!("{p}");
            std::process::exit(cli::train::EXIT_PREEMPTED);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

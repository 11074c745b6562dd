use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// Parse and validate a recipe without loading weights; print the resolved recipe as JSON.
    Check {
        /// The recipe file.
        file: PathBuf,
        /// Override a value: `--set train.lr=5e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Check { file, set } => {
            let loaded = softalign_core::recipe::load(&file, &set)?;
            let info = softalign_core::recipe::check(&loaded)?;
            for note in softalign_core::recipe::training_notes(&loaded) {
                eprintln!("note: {note}");
            }
            let out = serde_json::json!({
                "recipe": loaded.json,
                "hash": loaded.hash,
                "extends": loaded.chain,
                "overrides": loaded.overrides,
                "backbone": info,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&out).context("printing the resolved recipe")?
            );
            Ok(())
        }
    }
}

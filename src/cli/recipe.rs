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
            let mut params = Vec::new();
            for (i, a) in loaded.recipe.adapter.iter().enumerate() {
                if let Some(n) = a.trainable_parameters(&info)? {
                    let kind = loaded.json["adapter"][i]["type"]
                        .as_str()
                        .unwrap_or("?")
                        .to_string();
                    eprintln!(
                        "adapter[{i}] ({kind}): {n} trainable parameters ({:.2}M)",
                        n as f64 / 1e6
                    );
                    params.push(serde_json::json!({ "adapter": i, "type": kind, "parameters": n }));
                }
            }
            // The linear sites are many (every Linear layer); the JSON gives their count.
            let mut info_json = serde_json::to_value(&info).context("printing the backbone")?;
            if let Some(o) = info_json.as_object_mut() {
                o.insert(
                    "linear_sites".into(),
                    serde_json::json!(info.linear_sites.len()),
                );
            }
            let out = serde_json::json!({
                "trainable_parameters": params,
                "recipe": loaded.json,
                "hash": loaded.hash,
                "extends": loaded.chain,
                "overrides": loaded.overrides,
                "backbone": info_json,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&out).context("printing the resolved recipe")?
            );
            Ok(())
        }
    }
}

//! The `[logging]` table of a recipe.
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// Also log to Weights & Biases through the official Python client (a bridge process).
    #[serde(default)]
    pub wandb: Option<WandbConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WandbConfig {
    pub project: String,
    #[serde(default)]
    pub entity: Option<String>,
    /// Run name (default: the run folder's name).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub mode: WandbMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WandbMode {
    #[default]
    Offline,
    Online,
}

impl LoggingConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(w) = &self.wandb {
            if w.project.trim().is_empty() {
                return Err(Error::Recipe(
                    "logging.wandb.project must not be empty".into(),
                ));
            }
        }
        Ok(())
    }
}

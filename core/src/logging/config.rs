//! The `[logging]` table of a recipe.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

fn d_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// Show progress on stderr: a bar on a terminal, else a plain line every 30 s.
    #[serde(default = "d_true")]
    pub progress: bool,
    /// Weights & Biases, through the official Python client.
    #[serde(default)]
    pub wandb: Option<WandbConfig>,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            progress: true,
            wandb: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WandbMode {
    /// Runs are written under the run folder and synced later with `wandb sync`.
    #[default]
    Offline,
    Online,
}

impl WandbMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WandbMode::Offline => "offline",
            WandbMode::Online => "online",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WandbConfig {
    pub project: String,
    #[serde(default)]
    pub entity: Option<String>,
    /// Run name; defaults to the run folder's name.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub mode: WandbMode,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The Python interpreter that has `wandb` installed (default: `python3`).
    #[serde(default)]
    pub python: Option<PathBuf>,
}

impl LoggingConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(w) = &self.wandb {
            if w.project.trim().is_empty() {
                return Err(Error::Recipe("logging.wandb.project is empty".into()));
            }
        }
        Ok(())
    }
}

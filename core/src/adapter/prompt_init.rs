//! Token rows an adapter starts from that only the loaded backbone knows: the text encoders'
//! output for the empty prompt (SoftREPA initialises its tokens from the BOS row). Computed
//! once from the backbone before the adapters are built and handed over in the
//! [`BuildContext`](crate::plugin::BuildContext), so the adapter never sees the backbone.
use serde::{Deserialize, Serialize};
use tch::Kind;

use crate::backbone::Backbone;
use crate::plugin::AdapterSpec;
use crate::site::TokenSpace;
use crate::{Error, Result};

/// Which row of the empty prompt's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptPosition {
    /// The first token (CLIP's BOS), as SoftREPA's reference initialises its tokens.
    #[default]
    Bos,
}

impl PromptPosition {
    pub fn row(self) -> i64 {
        match self {
            PromptPosition::Bos => 0,
        }
    }
}

/// One requested row: the token space it lives in and the position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptRowRequest {
    pub space: TokenSpace,
    pub position: PromptPosition,
}

/// The empty prompt's rows the recipe's adapters asked for, as f32 values.
#[derive(Debug, Clone, Default)]
pub struct EmptyPromptRows {
    rows: Vec<(PromptRowRequest, Vec<f32>)>,
}

impl EmptyPromptRows {
    pub fn get(&self, req: PromptRowRequest) -> Option<&[f32]> {
        self.rows
            .iter()
            .find(|(r, _)| *r == req)
            .map(|(_, v)| v.as_slice())
    }

    pub fn insert(&mut self, req: PromptRowRequest, values: Vec<f32>) {
        self.rows.retain(|(r, _)| *r != req);
        self.rows.push((req, values));
    }

    /// Encodes the empty prompt with `backbone` for every row `specs` ask for (nothing is
    /// encoded when none asks).
    pub fn compute(backbone: &dyn Backbone, specs: &[Box<dyn AdapterSpec>]) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let mut out = Self::default();
        for (i, spec) in specs.iter().enumerate() {
            let Some(req) = spec.empty_prompt_row() else {
                continue;
            };
            if out.get(req).is_some() {
                continue;
            }
            let tokens = backbone.prompt_tokens("", req.space).map_err(|e| {
                Error::invalid(format!(
                    "adapter[{i}]: init `empty_prompt` encodes \"\" with the backbone's text \
                     encoders, which failed: {e}"
                ))
            })?;
            let n = tokens.size().first().copied().unwrap_or(0);
            let row = req.position.row();
            if row >= n {
                return Err(Error::invalid(format!(
                    "adapter[{i}]: the empty prompt's encoding has {n} rows, no row {row}"
                )));
            }
            let values = Vec::<f32>::try_from(
                tokens
                    .get(row)
                    .to_kind(Kind::Float)
                    .to_device(tch::Device::Cpu)
                    .flatten(0, -1),
            )
            .map_err(|e| Error::invalid(format!("adapter[{i}]: empty prompt row: {e}")))?;
            out.insert(req, values);
        }
        Ok(out)
    }
}

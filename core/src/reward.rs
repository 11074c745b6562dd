//! Rewards: one score per generated image, for fine-tuning by reinforcement learning (DDPO).
//! A reward judges an image against the prompt it was generated from; prompt sets that carry
//! structured metadata (GenEval's tag / include / exclude) pass it along, since exact judges
//! (the shapes world's scorer) read the metadata rather than parse the text.
use tch::Tensor;

use crate::Result;

/// What an image was generated from.
#[derive(Debug, Clone)]
pub struct RewardPrompt {
    pub text: String,
    /// GenEval metadata of the prompt (one `evaluation_metadata.jsonl` object), where known.
    pub metadata: Option<serde_json::Value>,
}

pub trait Reward: Send {
    /// The recipe name (`shapes_scorer`, ...).
    fn name(&self) -> &str;
    /// One reward per image: `images` (B, 3, H, W) RGB in [-1, 1] (what `Backbone::decode`
    /// gives), `prompts` one per image. Rewards need no gradient.
    fn score(&self, images: &Tensor, prompts: &[RewardPrompt]) -> Result<Vec<f64>>;
}

//! Reward plugins (`[reward]` in a recipe), for RL fine-tuning.
pub mod shapes_scorer;

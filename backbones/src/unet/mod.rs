//! Stable Diffusion 1.x / 2.x / SDXL: `UNet2DConditionModel` with diffusers' module and weight
//! names, cross-attention token sites per block group, the `unet` backbone plugin (with the
//! Diffusion-DPO UNet folder swap) and a benchmark.
pub mod attention;
pub mod bench;
pub mod config;
pub mod embeddings;
pub mod resnet;
pub mod spec;
pub mod transformer_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;

pub use config::UNetConfig;
pub use spec::{UNetBackbone, UNetSpec};
pub use unet_2d_condition::UNet2DConditionModel;

//! Stable Diffusion 3 / 3.5: the MMDiT transformer with diffusers' module and weight names,
//! its flow-matching noise, the `sd3` backbone plugin and a benchmark.
pub mod attention;
pub mod bench;
pub mod block;
pub mod config;
pub mod embeddings;
pub mod flow_match;
pub mod normalization;
pub mod spec;
pub mod transformer;

pub use config::Sd3Config;
pub use flow_match::{FlowMatch, TimestepSampling};
pub use spec::{Sd3Backbone, Sd3Spec};
pub use transformer::Sd3Transformer2DModel;

//! softalign-core: the vocabulary every other crate speaks. Traits (Backbone, Adapter,
//! Objective, Sampler, Dataset, Detector, Reward, MetricsSink), the plugin catalogue, recipes,
//! the soft-token adapter, the trainer and logging. It knows no concrete model.
pub mod adapter;
pub mod backbone;
pub mod cache;
pub mod catalogue;
pub mod dataset;
pub mod detector;
pub mod dtype;
pub mod error;
pub mod json_file;
pub mod linear_site;
pub mod logging;
pub mod metrics;
pub mod objective;
pub mod plugin;
pub mod recipe;
pub mod reward;
pub mod sampler;
pub mod site;
pub mod tensors;
pub mod torch_pickle;
pub mod train;

pub use error::{Error, Result};

// Re-exported so plugin crates can register catalogue entries and typetag impls without
// naming these crates themselves.
pub use linkme;
pub use typetag;

//! The encoding cache: a captioned image dataset encoded once (latent posterior, every
//! caption's conditioning) so training needs neither the VAE nor the text encoders.
pub mod layout;
pub mod reader;
pub mod spec;
pub mod writer;

pub use layout::{human_bytes, Manifest, StoredDType};
pub use reader::EncodedCache;
pub use spec::EncodedCacheSpec;
pub use writer::{write_cache, CacheRequest, CacheSummary};

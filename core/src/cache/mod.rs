//! The encoding cache: a captioned image dataset encoded once (latent posterior, every
//! caption's conditioning) so training needs neither the VAE nor the text encoders.
pub mod layout;
pub mod reader;
pub mod spec;
pub mod writer;

pub use layout::{human_bytes, Manifest, StoredDType};
pub use reader::EncodedCache;
pub use spec::EncodedCacheSpec;
pub use writer::{write_cache, write_cache_sharded, CacheRequest, CacheSummary};

use crate::backbone::Backbone;

/// The fingerprint a cache records and a training backbone must reproduce: the encoders', and
/// for a compact cache also what the compaction used (SD3: the context_embedder's weights).
pub fn cache_fingerprint(
    backbone: &dyn Backbone,
    compact: bool,
) -> crate::Result<serde_json::Value> {
    let encoders = backbone.encoder_fingerprint()?;
    Ok(if compact {
        serde_json::json!({"encoders": encoders, "compact": backbone.compact_fingerprint()?})
    } else {
        encoders
    })
}

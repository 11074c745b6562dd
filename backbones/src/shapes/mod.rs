//! The shapes world's text-to-image model (`shapes` backbone: CLIP text tower + SD3 MMDiT in
//! pixel space, flow matching) and its training data (`shapes` dataset). The world itself
//! (scenes, captions, prompts, scorer) is `softalign_worlds::shapes`, re-exported as
//! [`world`].
pub mod config;
pub mod data;
pub mod model;
pub mod spec;

pub use config::{world_tokenizer, ShapesConfig};
pub use data::{ShapesData, ShapesDataSpec};
pub use model::{ShapesBackbone, ShapesNoise};
pub use softalign_worlds::shapes as world;
pub use spec::ShapesSpec;

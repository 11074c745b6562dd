//! The training split: random scenes without the held-out combinations, rendered, with their
//! captions. Example `i` depends only on (seed, i), so a longer split extends a shorter one.
use image::RgbImage;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::captions::captions;
use super::render::render;
use super::scene::{Scene, SceneConfig};
use crate::error::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct TrainExample {
    pub scene: Scene,
    pub image: RgbImage,
    pub captions: Vec<String>,
}

/// `n` training examples from the world's training distribution ([`SceneConfig::train`]).
pub fn train_split(n: usize, seed: u64) -> Vec<TrainExample> {
    train_split_with(n, seed, &SceneConfig::train())
        .expect("the world's own training config always lays out")
}

/// `n` examples from scenes drawn by `cfg`; errors if `cfg` cannot lay out its scenes.
pub fn train_split_with(n: usize, seed: u64, cfg: &SceneConfig) -> Result<Vec<TrainExample>> {
    (0..n).map(|i| train_example(i as u64, seed, cfg)).collect()
}

/// Example `index` of the split with `seed`.
pub fn train_example(index: u64, seed: u64, cfg: &SceneConfig) -> Result<TrainExample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let scene = Scene::sample(&mut rng, cfg)?;
    let captions = captions(&scene, &mut rng);
    Ok(TrainExample {
        image: render(&scene, cfg.image_size),
        scene,
        captions,
    })
}

//! Training data: images (or latents) with their caption conditioning.
use tch::Device;

use crate::backbone::Conditioning;
use crate::Result;

#[derive(Debug)]
pub struct Batch {
    /// Clean latents (B, C, H, W), or RGB images in [-1, 1] when `captions` is set.
    pub x0: tch::Tensor,
    /// Caption conditioning, caption i belonging to image i (empty when `captions` is set).
    pub cond: Conditioning,
    /// Raw data: the captions as text, for the backbone to encode together with the images
    /// (`Backbone::encode_images`, `Backbone::encode_prompts`).
    pub captions: Option<Vec<String>>,
    /// `x0` holds RGB images in [-1, 1] for the backbone's image codec (`encode_images`) while
    /// the conditioning is already encoded (a pixel-space world that tokenizes once).
    pub pixels: bool,
    /// The captions as text where the data knows them but has encoded them already (the
    /// shapes world); objectives that read captions (counting) get these or `captions`.
    pub texts: Option<Vec<String>>,
    /// Preference pairs: the first half of `x0` holds the preferred images and the second
    /// half the rejected ones (image i and i + B/2 share a prompt); a step gives both images
    /// of a pair the same timestep and noise, as Diffusion-DPO trains.
    pub preference_pairs: bool,
}

impl Batch {
    /// Pre-encoded latents and conditioning.
    pub fn encoded(x0: tch::Tensor, cond: Conditioning) -> Self {
        Self {
            x0,
            cond,
            captions: None,
            pixels: false,
            texts: None,
            preference_pairs: false,
        }
    }

    /// RGB images for the backbone's image codec, with encoded conditioning.
    pub fn pixels(images: tch::Tensor, cond: Conditioning) -> Self {
        Self {
            pixels: true,
            ..Self::encoded(images, cond)
        }
    }

    /// With the captions' text (for objectives that read it).
    pub fn with_texts(mut self, texts: Vec<String>) -> Self {
        self.texts = Some(texts);
        self
    }
}

pub trait Dataset: Send {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Images each sample contributes to a batch: 2 for preference pairs (see
    /// `Batch::preference_pairs`), else 1.
    fn images_per_sample(&self) -> usize {
        1
    }
    /// The samples at `indices` (drawn by the trainer from the run's seed).
    fn batch(&self, indices: &[usize], device: Device) -> Result<Batch>;
    /// For an encoding cache: the fingerprint it was made with (see
    /// `cache::cache_fingerprint`), which the backbone must reproduce, and whether it holds
    /// the compact conditioning.
    fn cache_identity(&self) -> Option<(serde_json::Value, bool)> {
        None
    }
    /// Raw captioned images (what an encoding cache is made from).
    fn as_captioned(&self) -> Option<&captioned::CaptionedImages> {
        None
    }
    /// Samples that could not be read and were replaced so far (corrupt or missing files).
    fn skipped(&self) -> usize {
        0
    }
}

pub mod captioned;
pub mod preference_pairs;
pub mod tensor_file;

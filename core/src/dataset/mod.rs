//! Training data: images (or latents) with their caption conditioning.
use tch::Device;

use crate::backbone::Conditioning;
use crate::Result;

pub struct Batch {
    /// Clean latents (B, C, H, W).
    pub x0: tch::Tensor,
    /// Caption conditioning, caption i belonging to image i.
    pub cond: Conditioning,
}

pub trait Dataset: Send {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The samples at `indices` (drawn by the trainer from the run's seed).
    fn batch(&self, indices: &[usize], device: Device) -> Result<Batch>;
}

pub mod tensor_file;

//! Loss terms. An objective declares the predictions it needs; the step context computes each
//! distinct prediction once and shares it between objectives (see `softalign-objectives`).
use tch::Tensor;

use crate::adapter::TokenSelection;
use crate::Result;

/// Which (image, caption) pairs of the B x B cross an objective needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pairs {
    /// (i, i): each image with its own caption.
    Diagonal,
    /// (i, j), i != j.
    OffDiagonal,
    All,
}

impl Pairs {
    pub fn contains(self, image: i64, caption: i64) -> bool {
        match self {
            Pairs::Diagonal => image == caption,
            Pairs::OffDiagonal => image != caption,
            Pairs::All => true,
        }
    }
}

/// One prediction an objective asks for. `grad`: whether gradients flow to the adapter
/// through it (EMA predictions never carry gradients).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PredictionRequest {
    pub pairs: Pairs,
    pub tokens: TokenSelection,
    pub grad: bool,
}

/// What an objective sees of a training step: B images, each noised with the step's shared
/// timestep and noise, crossed with the B captions (caption i belongs to image i).
pub trait StepView {
    fn images(&self) -> i64;
    /// Clean latents (B, C, H, W).
    fn x0(&self) -> &Tensor;
    /// The noise of each image (B, C, H, W).
    fn noise(&self) -> &Tensor;
    /// Model timestep per image (B,).
    fn timestep(&self) -> &Tensor;
    /// The training target of each image (B, C, H, W): epsilon, v, or eps - x0.
    fn target(&self) -> &Tensor;
    /// Predictions for the selection, (B images, B captions, C, H, W). Only the pairs some
    /// request with this selection asked for hold values; the others are zero.
    fn predictions(&self, tokens: &TokenSelection, grad: bool) -> Result<Tensor>;
    /// The noised samples (B, C, H, W) the predictions were made at.
    fn x_t(&self) -> &Tensor;
    /// The captions as text (caption i belongs to image i; "" where dropped), where the data
    /// gives them (raw captioned images, the shapes world; not an encoding cache).
    fn captions(&self) -> Option<&[String]>;
    /// The clean samples the predictions of `images` with their own captions imply
    /// (`NoiseProcess::predicted_x0`), (n, C, H, W), with the predictions' graph.
    fn predicted_x0(&self, tokens: &TokenSelection, grad: bool, images: &[i64]) -> Result<Tensor>;
    /// Samples to RGB images in [-1, 1] through the backbone's decoder (its VAE, or the pixel
    /// codec), keeping the graph.
    fn decode(&self, samples: &Tensor) -> Result<Tensor>;
    /// Whether the images are preference pairs: image i (< B/2) preferred over image i + B/2,
    /// both with the same prompt, timestep and noise (`Batch::preference_pairs`).
    fn preference_pairs(&self) -> bool {
        false
    }
}

/// A named scalar a loss reports.
pub struct Term {
    pub name: String,
    pub value: Tensor,
}

pub trait Objective: Send {
    /// The recipe name of this term (`softrepa_contrastive`, `dsm`, ...).
    fn name(&self) -> &str;
    fn weight(&self) -> f64;
    fn requests(&self) -> Vec<PredictionRequest>;
    /// The first term is the objective's loss (weighted into the total); further terms are
    /// diagnostics, logged but not optimised.
    fn terms(&self, step: &dyn StepView) -> Result<Vec<Term>>;
}

//! `softalign forward` on diffusers UNet folders (SD1.x/2.x, SDXL): which folders are UNets,
//! and building the backbone, optionally with another UNet folder swapped in (Diffusion-DPO).
//! Inputs are named as diffusers' `UNet2DConditionModel.forward` arguments: `sample`,
//! `timestep`, `encoder_hidden_states`, and for SDXL `text_embeds`, `time_ids`.
use std::path::{Path, PathBuf};

use anyhow::Context;
use softalign_backbones::unet::UNetSpec;
use softalign_core::backbone::Backbone;
use softalign_core::plugin::{BackboneSpec, BuildContext};

/// The name of the noisy-latent input for a UNet.
pub const SAMPLE: &str = "sample";

/// Whether `model` is a UNet (or a pipeline folder holding `unet/`).
pub fn is_unet(model: &Path) -> bool {
    UNetSpec::is_unet_folder(model)
}

pub fn build(
    model: &Path,
    unet: Option<&PathBuf>,
    ctx: &BuildContext,
) -> anyhow::Result<Box<dyn Backbone>> {
    let spec = UNetSpec {
        unet: unet.cloned(),
        ..UNetSpec::from_path(model)
    };
    spec.build(ctx).with_context(|| match unet {
        Some(u) => format!(
            "loading the model from {} with the UNet of {}",
            model.display(),
            u.display()
        ),
        None => format!("loading the model from {}", model.display()),
    })
}

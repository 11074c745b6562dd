//! The shapes world's model (MMDiT and UNet presets): its backbone, the shipped bases, and
//! full-parameter training, as one test binary (each binary links libtorch and the workspace
//! again, which CI pays for in build time).
mod backbone;
mod base;
#[path = "../common/mod.rs"]
mod common;
mod train;

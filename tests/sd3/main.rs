//! The SD3 MMDiT: the backbone and its parity with diffusers (and the prepared GPU check's smoke
//! form), as one test binary (each binary links libtorch and the workspace again).
#[path = "../common/mod.rs"]
mod common;
mod sd3_backbone;
mod sd3_parity;

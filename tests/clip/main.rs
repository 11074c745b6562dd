//! The CLIP text encoder and tokenizer against transformers, as one test binary (each binary
//! links libtorch and the workspace again).
mod clip_parity;
mod clip_tokenizer;
#[path = "../common/mod.rs"]
mod common;

//! The objectives: parity with the Python references, the step context and short runs, and
//! `softalign loss`, as one test binary (each binary links libtorch and the workspace again).
mod objectives_cli;
#[path = "../objectives_common/mod.rs"]
mod objectives_common;
mod objectives_parity;
mod objectives_step;

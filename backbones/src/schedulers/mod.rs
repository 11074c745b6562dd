//! Samplers, one file per diffusers scheduler.
pub mod ddim;
pub mod ddpm;
pub mod flow_match_euler;

//! Samplers, one file per diffusers scheduler.
pub mod flow_match_euler;

//! Samplers, one file per diffusers scheduler.
pub mod ddim;
pub mod ddim_log_prob;
pub mod ddpm;
pub mod flow_edit;
pub mod flow_match_euler;

/// Checks a recipe's `[sampler] guidance`: classifier-free guidance needs a finite scale, and
/// a negative one is a typo rather than a setting (1 or less runs no unconditional branch).
pub fn validate_guidance(sampler: &str, guidance: Option<f64>) -> softalign_core::Result<()> {
    match guidance {
        Some(g) if !(g.is_finite() && g >= 0.0) => Err(softalign_core::Error::Recipe(format!(
            "sampler {sampler}: `guidance` must be a finite number >= 0 (got {g}; 1 or less \
             turns classifier-free guidance off)"
        ))),
        _ => Ok(()),
    }
}

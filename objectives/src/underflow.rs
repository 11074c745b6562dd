//! Watching SoftREPA's contrastive logits for underflow. A logit is scale * exp(-err / tau);
//! when every pair's error is many temperatures large, all logits are ~0, the softmax is
//! uniform, the loss sits at exactly ln(B) and no gradient reaches the tokens. Training then
//! runs on, silently learning nothing; a warning names the temperature and the error scale.
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// exp(-12) ~ 6e-6: past this every logit is too small to move the softmax or the tokens.
pub const UNDERFLOW_RATIO: f64 = 12.0;
/// Steps in a row before warning (one underflowing batch is noise, many are a setting).
pub const UNDERFLOW_STEPS: u32 = 20;

/// Counts consecutive underflowing steps and warns once.
#[derive(Debug, Default)]
pub struct UnderflowWatch {
    run: AtomicU32,
    warned: AtomicBool,
}

impl UnderflowWatch {
    /// Records one step: `min_ratio` is the smallest err / tau over the batch's pairs,
    /// `mean_err` the mean error, `tau` the (mean) temperature. Returns the warning, once,
    /// when the logits have underflowed for [`UNDERFLOW_STEPS`] steps in a row.
    pub fn observe(&self, min_ratio: f64, mean_err: f64, tau: f64, images: i64) -> Option<String> {
        // Written so NaN (a broken step, which the trainer reports itself) counts as live.
        let underflowing = min_ratio > UNDERFLOW_RATIO;
        if !underflowing {
            self.run.store(0, Ordering::Relaxed);
            return None;
        }
        let run = self.run.fetch_add(1, Ordering::Relaxed) + 1;
        if run < UNDERFLOW_STEPS || self.warned.swap(true, Ordering::Relaxed) {
            return None;
        }
        Some(format!(
            "warning: softrepa_contrastive: for {run} steps every logit underflowed: the \
             prediction errors (mean {mean_err:.3e}) are more than {UNDERFLOW_RATIO} times the \
             temperature {tau}, so scale*exp(-err/tau) ~ 0, the loss stays at ln({images}) = \
             {:.4} and the tokens get no gradient; raise `temperature` (to about the error \
             scale, {mean_err:.2e}) or use a `temperature_schedule`",
            (images as f64).ln()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_once_after_a_run_of_underflowing_steps() {
        let w = UnderflowWatch::default();
        for _ in 0..UNDERFLOW_STEPS - 1 {
            assert!(w.observe(40.0, 2.8, 0.07, 4).is_none());
        }
        let msg = w
            .observe(40.0, 2.8, 0.07, 4)
            .expect("a warning after the run");
        assert!(msg.contains("temperature 0.07"), "{msg}");
        assert!(msg.contains("2.800e0"), "{msg}");
        assert!(msg.contains("ln(4) = 1.3863"), "{msg}");
        // Once only.
        for _ in 0..2 * UNDERFLOW_STEPS {
            assert!(w.observe(40.0, 2.8, 0.07, 4).is_none());
        }
    }

    #[test]
    fn a_step_with_live_logits_resets_the_run() {
        let w = UnderflowWatch::default();
        for _ in 0..UNDERFLOW_STEPS - 1 {
            assert!(w.observe(40.0, 2.8, 0.07, 4).is_none());
        }
        assert!(w.observe(1.0, 0.07, 0.07, 4).is_none());
        for _ in 0..UNDERFLOW_STEPS - 1 {
            assert!(w.observe(40.0, 2.8, 0.07, 4).is_none());
        }
        assert!(w.observe(40.0, 2.8, 0.07, 4).is_some());
        // NaN errors are not underflow (the trainer reports those).
        let w = UnderflowWatch::default();
        for _ in 0..2 * UNDERFLOW_STEPS {
            assert!(w.observe(f64::NAN, f64::NAN, 0.07, 4).is_none());
        }
    }
}

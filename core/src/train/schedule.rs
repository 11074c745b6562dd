//! Learning-rate schedules. Each is a pure function of the optimizer step, so a resumed run
//! needs no scheduler state: the step alone fixes the lr.
use super::config::{Schedule, TrainConfig};

/// The lr of every parameter group at a given step, from the group's base lr.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    schedule: Schedule,
    warmup_steps: u64,
    total_steps: u64,
}

impl LrSchedule {
    pub fn new(schedule: Schedule, warmup_steps: u64, total_steps: u64) -> Self {
        Self {
            schedule,
            warmup_steps,
            total_steps,
        }
    }

    pub fn from_config(cfg: &TrainConfig) -> Self {
        Self::new(cfg.schedule.clone(), cfg.warmup_steps, cfg.steps)
    }

    /// The lr used by the optimizer step `step` (0-based) for a group whose base lr is `base`.
    ///
    /// Warm-up: step s < warmup uses base * (s + 1) / warmup, so the last warm-up step reaches
    /// the base lr and no step is wasted at lr 0. After warm-up the schedule sees its own step
    /// count starting from 0.
    pub fn lr(&self, base: f64, step: u64) -> f64 {
        if step < self.warmup_steps {
            return base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let t = step - self.warmup_steps;
        match &self.schedule {
            Schedule::Constant => base,
            Schedule::Cosine { eta_min } => {
                // torch's CosineAnnealingLR closed form with T_max = the post-warm-up steps.
                let t_max = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let t = t.min(t_max);
                eta_min
                    + (base - eta_min)
                        * (1.0 + (std::f64::consts::PI * t as f64 / t_max as f64).cos())
                        / 2.0
            }
            Schedule::WarmRestarts {
                t_0,
                t_mult,
                eta_min,
                every,
            } => {
                let (t_cur, t_i) = warm_restart_position(t / every, *t_0, *t_mult);
                // The exact expression of torch's CosineAnnealingWarmRestarts.get_lr.
                eta_min
                    + (base - eta_min)
                        * (1.0 + (std::f64::consts::PI * t_cur as f64 / t_i as f64).cos())
                        / 2.0
            }
        }
    }
}

/// (T_cur, T_i) of torch's CosineAnnealingWarmRestarts after it has been stepped `n` times
/// (integer epochs: T_cur counts up and wraps into a cycle T_mult times longer).
fn warm_restart_position(n: u64, t_0: u64, t_mult: u64) -> (u64, u64) {
    if t_mult == 1 {
        return (n % t_0, t_0);
    }
    let mut t_cur = n;
    let mut t_i = t_0;
    while t_cur >= t_i {
        t_cur -= t_i;
        t_i = t_i.saturating_mul(t_mult);
    }
    (t_cur, t_i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_restart_positions_follow_torchs_recursion() {
        // torch: T_cur += 1; if T_cur >= T_i { T_cur -= T_i; T_i *= T_mult }.
        for (t_0, t_mult) in [(3u64, 1u64), (2, 2), (3, 3), (1, 2)] {
            let (mut t_cur, mut t_i) = (0u64, t_0);
            for n in 0..200u64 {
                assert_eq!(
                    warm_restart_position(n, t_0, t_mult),
                    (t_cur, t_i),
                    "n={n} T_0={t_0} T_mult={t_mult}"
                );
                t_cur += 1;
                if t_cur >= t_i {
                    t_cur -= t_i;
                    t_i *= t_mult;
                }
            }
        }
    }

    #[test]
    fn warmup_then_constant() {
        let s = LrSchedule::new(Schedule::Constant, 4, 10);
        let lrs: Vec<f64> = (0..6).map(|i| s.lr(1.0, i)).collect();
        assert_eq!(lrs, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn interval_stepping_holds_the_lr_within_a_window() {
        let s = LrSchedule::new(
            Schedule::WarmRestarts {
                t_0: 2,
                t_mult: 1,
                eta_min: 0.0,
                every: 3,
            },
            0,
            100,
        );
        let lrs: Vec<f64> = (0..12).map(|i| s.lr(1.0, i)).collect();
        // Window 0: T_cur 0 -> 1.0; window 1: T_cur 1 of 2 -> 0.5; window 2: restart.
        let want = [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5];
        for (a, b) in lrs.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{lrs:?}");
        }
    }
}

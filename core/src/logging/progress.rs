//! The terminal progress bar: step, loss, lr, it/s and ETA. Hidden when disabled or when
//! stderr is not a terminal (logs of batch jobs stay clean).
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `total` steps starting at `start` (non-zero on resume).
    pub fn new(enabled: bool, start: u64, total: u64) -> Self {
        let target = if enabled && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        let style = ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}, {per_sec}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_position(start);
        // Speed and ETA from the steps of this process only, not the resumed-from ones.
        bar.reset_eta();
        Self { bar }
    }

    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Moves to `step` steps done and shows the latest loss and lr.
    pub fn update(&self, step: u64, loss: Option<f64>, lr: f64) {
        self.bar.set_position(step);
        let loss = loss.map_or("-".to_string(), |l| format!("{l:.4}"));
        self.bar.set_message(format!("loss {loss} lr {lr:.3e}"));
    }

    /// Moves to `pos` with a free-form message (non-training bars: caching, sampling).
    pub fn advance(&self, pos: u64, msg: &str) {
        self.bar.set_position(pos);
        self.bar.set_message(msg.to_string());
    }

    /// Prints a line above the bar (or to stderr when hidden).
    pub fn println(&self, msg: &str) {
        if self.bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.bar.println(msg);
        }
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn disabled_bar_is_hidden_and_tracks_position() {
        let p = Progress::new(false, 3, 10);
        assert!(p.is_hidden());
        p.update(4, Some(0.5), 1e-3);
        assert_eq!(p.bar.position(), 4);
        assert_eq!(p.bar.message(), "loss 0.5000 lr 1.000e-3");
    }
}

//! The terminal progress bar: step, loss, lr, it/s and ETA. When stderr is not a terminal
//! (Slurm, nohup, `2> log`) a bar cannot draw, so a plain line with the same numbers is
//! printed every [`plain_interval`] seconds instead (nothing with `--quiet`).
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Seconds between plain progress lines: `SOFTALIGN_PROGRESS_SECONDS`, else 30.
pub const PLAIN_INTERVAL_ENV: &str = "SOFTALIGN_PROGRESS_SECONDS";

pub fn plain_interval() -> Duration {
    let secs = std::env::var(PLAIN_INTERVAL_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(30.0);
    Duration::from_secs_f64(secs)
}

/// The plain-line log: when the last line went out, and where this process started counting.
struct Plain {
    every: Duration,
    began: Instant,
    start: u64,
    last: Mutex<Option<Instant>>,
}

impl Plain {
    /// The line for `pos` of `total`, when one is due.
    fn line(&self, pos: u64, total: u64, msg: &str) -> Option<String> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let due = match *last {
            None => true,
            Some(t) => now.duration_since(t) >= self.every,
        };
        if !due && pos < total {
            return None;
        }
        *last = Some(now);
        Some(plain_line(
            pos,
            total,
            msg,
            pos.saturating_sub(self.start),
            now.duration_since(self.began),
        ))
    }
}

/// "step 40/100 loss 0.1234 lr 1.000e-3, 2.50 it/s, ETA 24 s": `done` steps in `elapsed`.
pub fn plain_line(pos: u64, total: u64, msg: &str, done: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let eta = if rate > 0.0 {
        format!("{:.0} s", total.saturating_sub(pos) as f64 / rate)
    } else {
        "-".into()
    };
    let msg = if msg.is_empty() {
        String::new()
    } else {
        format!(" {msg}")
    };
    format!("step {pos}/{total}{msg}, {rate:.2} it/s, ETA {eta}")
}

pub struct Progress {
    bar: ProgressBar,
    plain: Option<Plain>,
}

impl Progress {
    /// A bar over `total` steps starting at `start` (non-zero on resume).
    pub fn new(enabled: bool, start: u64, total: u64) -> Self {
        Self::with_terminal(enabled, std::io::stderr().is_terminal(), start, total)
    }

    /// [`Progress::new`] with whether stderr is a terminal given (tests).
    pub fn with_terminal(enabled: bool, terminal: bool, start: u64, total: u64) -> Self {
        let target = if enabled && terminal {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let plain = (enabled && !terminal).then(|| Plain {
            every: plain_interval(),
            began: Instant::now(),
            start,
            last: Mutex::new(None),
        });
        let bar = ProgressBar::with_draw_target(Some(total), target);
        let style = ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}, {per_sec}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_position(start);
        // Speed and ETA from the steps of this process only, not the resumed-from ones.
        bar.reset_eta();
        Self { bar, plain }
    }

    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Moves to `step` steps done and shows the latest loss and lr.
    pub fn update(&self, step: u64, loss: Option<f64>, lr: f64) {
        self.bar.set_position(step);
        let loss = loss.map_or("-".to_string(), |l| format!("{l:.4}"));
        let msg = format!("loss {loss} lr {lr:.3e}");
        self.plain_line(step, &msg);
        self.bar.set_message(msg);
    }

    /// Moves to `pos` with a free-form message (non-training bars: caching, sampling).
    pub fn advance(&self, pos: u64, msg: &str) {
        self.bar.set_position(pos);
        self.plain_line(pos, msg);
        self.bar.set_message(msg.to_string());
    }

    /// The plain line for `pos` when stderr is not a terminal and one is due.
    pub fn due_line(&self, pos: u64, msg: &str) -> Option<String> {
        let total = self.bar.length().unwrap_or(pos);
        self.plain.as_ref()?.line(pos, total, msg)
    }

    fn plain_line(&self, pos: u64, msg: &str) {
        if let Some(line) = self.due_line(pos, msg) {
            eprintln!("{line}");
        }
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
        assert!(p.due_line(5, "x").is_none(), "quiet: no plain lines either");
    }

    #[test]
    fn without_a_terminal_plain_lines_come_at_the_interval() {
        let p = Progress::with_terminal(true, false, 0, 100);
        assert!(p.is_hidden());
        // The first update prints at once; the next only after the interval (30 s default).
        let first = p
            .due_line(1, "loss 0.5000 lr 1.000e-3")
            .expect("a first line");
        assert!(
            first.starts_with("step 1/100 loss 0.5000 lr 1.000e-3, "),
            "{first}"
        );
        assert!(first.contains("it/s, ETA"), "{first}");
        if super::plain_interval().as_secs_f64() > 1.0 {
            assert!(p.due_line(2, "loss 0.4").is_none());
        }
        // The last step always gets its line.
        assert!(p.due_line(100, "loss 0.1").is_some());
        // A terminal draws the bar instead.
        let t = Progress::with_terminal(true, true, 0, 100);
        assert!(t.due_line(1, "x").is_none());
    }

    #[test]
    fn plain_line_states_rate_and_eta() {
        let l = super::plain_line(40, 100, "loss 0.1", 20, std::time::Duration::from_secs(10));
        assert_eq!(l, "step 40/100 loss 0.1, 2.00 it/s, ETA 30 s");
    }
}

//! Fuzzing the readers of untrusted bytes on stable Rust: proptest drives a mutator over seed
//! files (valid ones and the hostile corpus), each input goes through the real reader, and a
//! run fails on a panic, on an input that takes more than [`SLOW`], or on a single allocation
//! larger than the input justifies (a tracking global allocator, per thread). cargo-fuzz needs
//! a nightly compiler with sanitizers; this runs wherever the tests do.
//!
//! `cargo test --test codecs fuzz_` runs every target for a second or so (the suite's short
//! run, a fixed seed); `scripts/fuzz.sh MINUTES` runs them for longer with fresh seeds
//! (`SOFTALIGN_FUZZ_SECONDS`, `SOFTALIGN_FUZZ_TARGET`) and prints the inputs tried per
//! target. A finding is kept as a regression case in `hostile.rs`.
pub mod alloc;
pub mod hostile;
pub mod seeds;
pub mod targets;

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// An input slower than this is a hang in the making (images: see the image target).
pub const SLOW: Duration = Duration::from_secs(5);

/// One edit of a seed.
#[derive(Debug, Clone)]
pub enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Copy(usize, usize, usize),
    /// A boundary integer (0, -1, 2^31, 2^40, 2^63, ...) written little-endian or as ASCII
    /// digits: the lengths, offsets and sizes that break readers.
    Number(usize, u64, bool),
    Truncate(usize),
}

const NUMBERS: &[u64] = &[
    0,
    1,
    7,
    8,
    255,
    256,
    65535,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 40,
    (1 << 63) - 1,
    1 << 63,
    u64::MAX,
];

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(a, b)| Edit::Flip(a, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Set(a, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(a, b)| Edit::Insert(a, b)),
        (any::<usize>(), 1usize..64).prop_map(|(a, n)| Edit::Remove(a, n)),
        (any::<usize>(), 1usize..64, any::<usize>()).prop_map(|(a, n, b)| Edit::Copy(a, n, b)),
        (any::<usize>(), prop::sample::select(NUMBERS), any::<bool>())
            .prop_map(|(a, v, t)| Edit::Number(a, v, t)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = b.len().max(1);
        match e {
            Edit::Flip(a, bit) if !b.is_empty() => b[a % n] ^= 1 << bit,
            Edit::Set(a, v) if !b.is_empty() => b[a % n] = *v,
            Edit::Insert(a, v) => {
                let at = a % (b.len() + 1);
                b.splice(at..at, v.iter().copied());
            }
            Edit::Remove(a, len) if !b.is_empty() => {
                let at = a % n;
                let end = (at + len).min(b.len());
                b.drain(at..end);
            }
            Edit::Copy(a, len, to) if !b.is_empty() => {
                let at = a % n;
                let piece: Vec<u8> = b[at..(at + len).min(b.len())].to_vec();
                let to = to % (b.len() + 1);
                b.splice(to..to, piece);
            }
            Edit::Number(a, v, text) => {
                let bytes = if *text {
                    v.to_string().into_bytes()
                } else {
                    v.to_le_bytes().to_vec()
                };
                let at = a % (b.len() + 1);
                let end = (at + bytes.len()).min(b.len());
                b.splice(at..end, bytes);
            }
            Edit::Truncate(a) => b.truncate(a % (b.len() + 1)),
            _ => {}
        }
    }
    b
}

/// Inputs: a seed with a few edits.
pub fn inputs(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    assert!(!seeds.is_empty());
    (
        prop::sample::select(seeds),
        prop::collection::vec(edit(), 0..6),
    )
        .prop_map(|(s, e)| apply(s, &e))
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Panics of a thread that is fuzzing are failures the runner reports (with the smallest
/// input); printing each one while proptest shrinks would bury that report.
fn quiet_panics_while_fuzzing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
}

/// What a run did.
pub struct Report {
    pub tried: u64,
    pub slowest: Duration,
}

/// Runs `target` on mutated seeds for `seconds` (fixed seed when `deterministic`). Fails
/// with the smallest failing input proptest finds.
pub fn run(
    name: &str,
    seeds: Vec<Vec<u8>>,
    alloc_allowance: fn(usize) -> usize,
    slow: Duration,
    seconds: f64,
    deterministic: bool,
    target: impl Fn(&[u8]),
) -> Report {
    let strategy = inputs(seeds);
    quiet_panics_while_fuzzing();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let tried = std::cell::Cell::new(0u64);
    let slowest = std::cell::Cell::new(Duration::ZERO);
    let mut batch = 0u64;
    while Instant::now() < deadline {
        let config = Config {
            cases: 64,
            failure_persistence: None,
            max_shrink_iters: 2000,
            ..Config::default()
        };
        let seed = if deterministic {
            batch.to_le_bytes().repeat(4)
        } else {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                .to_le_bytes()
                .repeat(2)
        };
        batch += 1;
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
        let mut runner = TestRunner::new_with_rng(config, rng);
        QUIET.with(|q| q.set(true));
        let result = runner.run(&strategy, |input| {
            let t = Instant::now();
            let (_, peak) = alloc::tracked(|| target(&input));
            let took = t.elapsed();
            tried.set(tried.get() + 1);
            slowest.set(slowest.get().max(took));
            let allowed = alloc_allowance(input.len());
            if peak > allowed {
                return Err(TestCaseError::fail(format!(
                    "one allocation of {peak} bytes for an input of {} (allowed {allowed})",
                    input.len()
                )));
            }
            if took > slow {
                return Err(TestCaseError::fail(format!("took {took:?}")));
            }
            Ok(())
        });
        QUIET.with(|q| q.set(false));
        if let Err(e) = result {
            panic!("fuzz target `{name}` failed: {e}");
        }
    }
    Report {
        tried: tried.get(),
        slowest: slowest.get(),
    }
}

/// The usual allowance: what the input could hold, with room for a reader's bookkeeping.
pub fn linear(len: usize) -> usize {
    (1 << 20) + 64 * len
}

/// Seconds per target: `SOFTALIGN_FUZZ_SECONDS` for a long run, else the suite's short one.
pub fn seconds(short: f64) -> (f64, bool) {
    match std::env::var("SOFTALIGN_FUZZ_SECONDS") {
        Ok(s) => (
            s.parse().expect("SOFTALIGN_FUZZ_SECONDS is a number"),
            false,
        ),
        Err(_) => (short, true),
    }
}

/// One test per target, so that they share the test threads and a failure names its target.
macro_rules! fuzz_test {
    ($name:ident, $seeds:expr, $allow:expr) => {
        fuzz_test!($name, $seeds, $allow, SLOW);
    };
    ($name:ident, $seeds:expr, $allow:expr, $slow:expr) => {
        #[test]
        fn $name() {
            let (secs, deterministic) = seconds(0.4);
            let mut seeds: Vec<Vec<u8>> = $seeds;
            seeds.extend(hostile::seeds_for(stringify!($name)));
            let r = run(
                stringify!($name),
                seeds,
                $allow,
                $slow,
                secs,
                deterministic,
                targets::$name,
            );
            println!(
                "fuzz target {}: {} inputs tried, slowest {:?}",
                stringify!($name),
                r.tried,
                r.slowest
            );
            assert!(r.tried > 0);
        }
    };
}

mod fuzz_ {
    use super::*;

    fuzz_test!(safetensors, vec![seeds::safetensors()], linear);
    fuzz_test!(weight_index, vec![seeds::configs()[5].clone()], linear);
    fuzz_test!(pickle, vec![seeds::pickle()], linear);
    fuzz_test!(torch_zip, vec![seeds::torch_bin()], linear);
    fuzz_test!(recipe, seeds::recipes(), linear);
    fuzz_test!(recipe_set, seeds::overrides(), linear);
    fuzz_test!(tokenizer, vec![seeds::tokenizer_json()], linear);
    // A few bytes of header may claim a large image, which the decoder allocates and the
    // resize reads up to the limits (8192 px a side, 256 MiB decoded): the header, not the
    // file size, justifies it, and such an image takes seconds, as a real one that size does.
    fuzz_test!(
        image,
        seeds::images(),
        |_| 800 << 20,
        Duration::from_secs(60)
    );
    fuzz_test!(config, seeds::configs(), linear);
}

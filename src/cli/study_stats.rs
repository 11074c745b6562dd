//! A study's numbers: per arm and category, the accuracy averaged over training seeds, with an
//! interval from a two-level bootstrap (training seeds, then images within each seed), so it
//! carries the seed-to-seed variation as well as the image sampling; and per arm against the
//! reference arm, the paired difference (same training seed, same prompts and noise) with its
//! bootstrap interval and the pooled exact McNemar test.
use std::collections::BTreeMap;

use softalign_core::train::seed::splitmix64;
use softalign_worlds::geneval::{ImageResult, Tag};

use super::paired::{mcnemar_exact, paired, slot};

/// Bootstrap resamples; the generator is fixed, so a report is reproducible.
pub const RESAMPLES: usize = 2000;

/// One arm's evaluations, one per training seed (a single one for an untrained arm).
pub struct ArmResults {
    pub name: String,
    pub seeds: Vec<Vec<ImageResult>>,
}

/// A category (None: overall, the mean of the category accuracies as GenEval's) of one arm.
#[derive(Debug, Clone)]
pub struct Cell {
    pub mean: f64,
    pub ci: [f64; 2],
    /// Per training seed.
    pub per_seed: Vec<f64>,
}

/// Against the reference arm.
#[derive(Debug, Clone)]
pub struct Difference {
    pub mean: f64,
    pub ci: [f64; 2],
    /// Pooled over seeds: images fixed, broken, and the exact McNemar p on those counts.
    pub gained: usize,
    pub lost: usize,
    pub p_value: f64,
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = splitmix64(self.0);
        (self.0 % n as u64) as usize
    }
}

/// Correct (1) / wrong (0) per image of each category, per seed.
fn by_tag(seed: &[ImageResult]) -> BTreeMap<Tag, Vec<f64>> {
    let mut m: BTreeMap<Tag, Vec<f64>> = BTreeMap::new();
    for r in seed {
        m.entry(r.tag)
            .or_default()
            .push(f64::from(u8::from(r.correct)));
    }
    m
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// The value of `tag` (None: overall) in one seed's per-tag outcomes.
fn value(t: &BTreeMap<Tag, Vec<f64>>, tag: Option<Tag>) -> f64 {
    match tag {
        Some(tag) => t.get(&tag).map_or(f64::NAN, |v| mean(v)),
        None => mean(&t.values().map(|v| mean(v)).collect::<Vec<_>>()),
    }
}

fn percentile_ci(mut v: Vec<f64>) -> [f64; 2] {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return [f64::NAN, f64::NAN];
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    [at(0.025), at(0.975)]
}

/// Resamples seeds, then images within each category of each drawn seed.
fn resample(seeds: &[BTreeMap<Tag, Vec<f64>>], rng: &mut Rng) -> Vec<BTreeMap<Tag, Vec<f64>>> {
    (0..seeds.len())
        .map(|_| {
            let s = &seeds[rng.below(seeds.len())];
            s.iter()
                .map(|(tag, v)| (*tag, (0..v.len()).map(|_| v[rng.below(v.len())]).collect()))
                .collect()
        })
        .collect()
}

/// The arm's cell for `tag` (None: overall).
pub fn cell(arm: &ArmResults, tag: Option<Tag>, seed: u64) -> Cell {
    let seeds: Vec<_> = arm.seeds.iter().map(|s| by_tag(s)).collect();
    let per_seed: Vec<f64> = seeds.iter().map(|s| value(s, tag)).collect();
    let mut rng = Rng(seed);
    let boot: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            mean(
                &resample(&seeds, &mut rng)
                    .iter()
                    .map(|s| value(s, tag))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    Cell {
        mean: mean(&per_seed),
        ci: percentile_ci(boot),
        per_seed,
    }
}

/// `arm` minus `reference` for `tag`, pairing seed k with seed k (an untrained reference, one
/// evaluation, pairs with every seed) and image with image.
pub fn difference(
    arm: &ArmResults,
    reference: &ArmResults,
    tag: Option<Tag>,
    seed: u64,
) -> Difference {
    // Seed k of one arm meets seed k of the other; an untrained arm (one evaluation) meets
    // every seed of the other.
    let seeds = arm.seeds.len().max(reference.seeds.len());
    let at = |r: &'_ ArmResults, k: usize| k.min(r.seeds.len() - 1);
    let matched: Vec<(&[ImageResult], &[ImageResult])> = (0..seeds)
        .map(|k| {
            (
                reference.seeds[at(reference, k)].as_slice(),
                arm.seeds[at(arm, k)].as_slice(),
            )
        })
        .collect();
    // Per seed: the paired images as (tag, before, after).
    let pairs: Vec<Vec<(Tag, f64, f64)>> = matched
        .iter()
        .map(|(before, after)| paired_outcomes(before, after))
        .collect();
    let diff_of = |seeds: &[Vec<(Tag, f64, f64)>]| -> f64 {
        let d: Vec<f64> = seeds
            .iter()
            .map(|p| {
                let (mut a, mut b): (BTreeMap<Tag, Vec<f64>>, BTreeMap<Tag, Vec<f64>>) =
                    Default::default();
                for (t, x, y) in p {
                    a.entry(*t).or_default().push(*x);
                    b.entry(*t).or_default().push(*y);
                }
                value(&b, tag) - value(&a, tag)
            })
            .collect();
        mean(&d)
    };
    let mut rng = Rng(seed);
    let boot: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let drawn: Vec<Vec<(Tag, f64, f64)>> = (0..pairs.len())
                .map(|_| {
                    let p = &pairs[rng.below(pairs.len())];
                    // Images resampled within each category, pairs kept together.
                    let mut groups: BTreeMap<Tag, Vec<(Tag, f64, f64)>> = BTreeMap::new();
                    for x in p {
                        groups.entry(x.0).or_default().push(*x);
                    }
                    groups
                        .values()
                        .flat_map(|g| {
                            (0..g.len())
                                .map(|_| g[rng.below(g.len())])
                                .collect::<Vec<_>>()
                        })
                        .collect()
                })
                .collect();
            diff_of(&drawn)
        })
        .collect();
    let (mut gained, mut lost) = (0, 0);
    for (before, after) in &matched {
        let rows = paired(before, after);
        let row = rows.iter().find(|r| r.tag == tag);
        if let Some(r) = row {
            gained += r.gained;
            lost += r.lost;
        }
    }
    Difference {
        mean: diff_of(&pairs),
        ci: percentile_ci(boot),
        gained,
        lost,
        p_value: mcnemar_exact(gained, lost),
    }
}

/// (tag, reference correct, arm correct) for the images both evaluations hold.
fn paired_outcomes(before: &[ImageResult], after: &[ImageResult]) -> Vec<(Tag, f64, f64)> {
    let after: BTreeMap<String, &ImageResult> =
        after.iter().map(|r| (slot(&r.filename), r)).collect();
    before
        .iter()
        .filter_map(|b| {
            after.get(&slot(&b.filename)).map(|a| {
                (
                    b.tag,
                    f64::from(u8::from(b.correct)),
                    f64::from(u8::from(a.correct)),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(prompt: usize, image: usize, tag: Tag, correct: bool) -> ImageResult {
        ImageResult {
            filename: format!("/x/{prompt:05}/samples/{image:04}.png"),
            tag,
            prompt: String::new(),
            correct,
            reason: String::new(),
            metadata: String::new(),
            details: String::new(),
        }
    }

    /// `right` of `n` images correct in one category.
    fn seed(n: usize, right: usize, tag: Tag) -> Vec<ImageResult> {
        (0..n).map(|i| result(i, 0, tag, i < right)).collect()
    }

    #[test]
    fn identical_seeds_give_the_image_interval_and_seed_spread_widens_it() {
        let same = ArmResults {
            name: "a".into(),
            seeds: vec![seed(40, 20, Tag::Counting); 3],
        };
        let c = cell(&same, Some(Tag::Counting), 1);
        assert!((c.mean - 0.5).abs() < 1e-12);
        assert!(c.ci[0] < 0.5 && c.ci[1] > 0.5);
        let spread = ArmResults {
            name: "b".into(),
            seeds: vec![
                seed(40, 8, Tag::Counting),
                seed(40, 20, Tag::Counting),
                seed(40, 32, Tag::Counting),
            ],
        };
        let d = cell(&spread, Some(Tag::Counting), 1);
        assert!((d.mean - 0.5).abs() < 1e-12);
        assert!(
            d.ci[1] - d.ci[0] > c.ci[1] - c.ci[0],
            "seed variation widens the interval: {:?} vs {:?}",
            d.ci,
            c.ci
        );
        assert_eq!(d.per_seed, vec![0.2, 0.5, 0.8]);
    }

    #[test]
    fn differences_pair_seeds_and_images() {
        let reference = ArmResults {
            name: "ref".into(),
            seeds: vec![seed(30, 10, Tag::Colors), seed(30, 10, Tag::Colors)],
        };
        let better = ArmResults {
            name: "better".into(),
            seeds: vec![seed(30, 25, Tag::Colors), seed(30, 22, Tag::Colors)],
        };
        let d = difference(&better, &reference, None, 3);
        assert!((d.mean - (15.0 + 12.0) / 60.0).abs() < 1e-12, "{d:?}");
        assert_eq!((d.gained, d.lost), (27, 0));
        assert!(d.p_value < 1e-6 && d.ci[0] > 0.0, "{d:?}");
        // One evaluation (an untrained base) is paired with every seed of the other arm.
        let base = ArmResults {
            name: "base".into(),
            seeds: vec![seed(30, 10, Tag::Colors)],
        };
        let d = difference(&better, &base, None, 3);
        assert_eq!((d.gained, d.lost), (27, 0), "{d:?}");
        let d = difference(&base, &better, None, 3);
        assert_eq!((d.gained, d.lost), (0, 27), "{d:?}");
        let none = difference(&reference, &reference, None, 3);
        assert_eq!(
            (none.mean, none.gained, none.lost, none.p_value),
            (0.0, 0, 0, 1.0)
        );
    }
}

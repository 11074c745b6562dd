//! GenEval's summary (`summary_scores.py`): per-tag accuracy over images and the overall score,
//! the mean of the tag means, so every task weighs the same however many prompts it has.
//! Added here: 95% intervals, because with tens of prompts per tag a difference of a few
//! points between two recipes is often noise.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::metadata::Tag;
use super::results::ImageResult;

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagScore {
    pub tag: Tag,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Wilson score interval. Samples of one prompt are treated as independent, so with
    /// several samples per prompt the interval is somewhat too narrow.
    pub ci95: [f64; 2],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub total_images: usize,
    pub total_prompts: usize,
    /// Fraction of images judged correct.
    pub correct_images: f64,
    /// Fraction of prompts with at least one correct sample.
    pub correct_prompts: f64,
    /// Tags present in the results, in GenEval's order.
    pub tags: Vec<TagScore>,
    /// Mean of the tag accuracies.
    pub overall: f64,
    /// Normal interval of that mean, from Agresti-Coull variances of each tag.
    pub overall_ci95: [f64; 2],
}

/// Wilson score interval for `k` successes out of `n`.
pub fn wilson_interval(k: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

impl Summary {
    pub fn from_results(results: &[ImageResult]) -> Summary {
        let mut per_tag: BTreeMap<Tag, (usize, usize)> = BTreeMap::new();
        let mut per_prompt: BTreeMap<&str, bool> = BTreeMap::new();
        for r in results {
            let e = per_tag.entry(r.tag).or_default();
            e.0 += r.correct as usize;
            e.1 += 1;
            *per_prompt.entry(r.metadata.as_str()).or_default() |= r.correct;
        }
        let tags: Vec<TagScore> = Tag::ALL
            .iter()
            .filter_map(|t| per_tag.get(t).map(|&(k, n)| (*t, k, n)))
            .map(|(tag, correct, total)| TagScore {
                tag,
                correct,
                total,
                accuracy: correct as f64 / total as f64,
                ci95: wilson_interval(correct, total),
            })
            .collect();
        let m = tags.len().max(1) as f64;
        let overall = tags.iter().map(|t| t.accuracy).sum::<f64>() / m;
        let var = tags
            .iter()
            .map(|t| {
                let p = (t.correct as f64 + 2.0) / (t.total as f64 + 4.0);
                p * (1.0 - p) / (t.total as f64 + 4.0)
            })
            .sum::<f64>()
            / (m * m);
        let half = Z95 * var.sqrt();
        let n = results.len().max(1) as f64;
        Summary {
            total_images: results.len(),
            total_prompts: per_prompt.len(),
            correct_images: results.iter().filter(|r| r.correct).count() as f64 / n,
            correct_prompts: per_prompt.values().filter(|c| **c).count() as f64
                / per_prompt.len().max(1) as f64,
            overall: if tags.is_empty() { 0.0 } else { overall },
            overall_ci95: [(overall - half).max(0.0), (overall + half).min(1.0)],
            tags,
        }
    }

    /// The report `summary_scores.py` prints, with the intervals added.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        s += "Summary\n=======\n";
        s += &format!("Total images: {}\n", self.total_images);
        s += &format!("Total prompts: {}\n", self.total_prompts);
        s += &format!("% correct images: {:.2}%\n", 100.0 * self.correct_images);
        s += &format!(
            "% correct prompts: {:.2}%\n\n",
            100.0 * self.correct_prompts
        );
        s += "Task breakdown\n==============\n";
        for t in &self.tags {
            s += &format!(
                "{:<16} = {:.2}% ({} / {})  95% CI [{:.2}%, {:.2}%]\n",
                t.tag.name(),
                100.0 * t.accuracy,
                t.correct,
                t.total,
                100.0 * t.ci95[0],
                100.0 * t.ci95[1]
            );
        }
        s += &format!(
            "\nOverall score (avg. over tasks): {:.5}  95% CI [{:.5}, {:.5}]\n",
            self.overall, self.overall_ci95[0], self.overall_ci95[1]
        );
        s
    }
}

/// Splits results by the `held_out` flag in their metadata: (seen, held out). Results whose
/// metadata has no flag (GenEval's own prompts) count as seen.
pub fn split_held_out(results: &[ImageResult]) -> (Vec<ImageResult>, Vec<ImageResult>) {
    results.iter().cloned().partition(|r| {
        !r.parsed_metadata()
            .ok()
            .and_then(|m| m.held_out)
            .unwrap_or(false)
    })
}

/// Distinct prompts among `results`.
pub fn prompt_count(results: &[ImageResult]) -> usize {
    results
        .iter()
        .map(|r| r.metadata.as_str())
        .collect::<BTreeSet<_>>()
        .len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_known_values() {
        // 8/10: Wilson 95% interval [0.4902, 0.9433] (standard tables).
        let [lo, hi] = wilson_interval(8, 10);
        assert!(
            (lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4,
            "{lo} {hi}"
        );
        let [lo, hi] = wilson_interval(0, 20);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.1611).abs() < 1e-4, "{hi}");
        assert_eq!(wilson_interval(0, 0), [0.0, 1.0]);
    }
}

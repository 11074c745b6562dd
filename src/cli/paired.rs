//! Paired comparison of two evaluations on the same prompts and noise seeds: per image, did the
//! second model fix what the first got wrong, or break what it got right? The exact McNemar
//! test on those discordant pairs is far more sensitive than comparing two intervals, because
//! the shared noise cancels out. Plain data in, numbers out.
use std::collections::BTreeMap;

use softalign_worlds::geneval::{ImageResult, Tag};

/// One row: a category (or `None` for all images).
#[derive(Debug, Clone, PartialEq)]
pub struct PairedRow {
    pub tag: Option<Tag>,
    /// Images matched between the two evaluations.
    pub pairs: usize,
    /// Wrong before, right after.
    pub gained: usize,
    /// Right before, wrong after.
    pub lost: usize,
    /// Two-sided exact McNemar p-value.
    pub p_value: f64,
}

/// `<prompt index>/samples/<image>.png`: the same slot in both evaluation folders.
pub fn slot(filename: &str) -> String {
    let parts: Vec<&str> = filename.rsplit(['/', '\\']).take(3).collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}

/// Two-sided exact McNemar test: under no effect, `gained` ~ Binomial(gained + lost, 1/2).
pub fn mcnemar_exact(gained: usize, lost: usize) -> f64 {
    let n = gained + lost;
    if n == 0 {
        return 1.0;
    }
    let k = gained.min(lost);
    // P(X <= k) for X ~ Bin(n, 1/2), summed in log space so large n stays finite.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_choose = 0.0; // ln C(n, 0)
    let mut tail = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

/// Rows per category present in both (GenEval's order), then all images.
pub fn paired(before: &[ImageResult], after: &[ImageResult]) -> Vec<PairedRow> {
    let after: BTreeMap<String, &ImageResult> =
        after.iter().map(|r| (slot(&r.filename), r)).collect();
    let mut per: BTreeMap<Option<Tag>, (usize, usize, usize)> = BTreeMap::new();
    for b in before {
        let Some(a) = after.get(&slot(&b.filename)) else {
            continue;
        };
        for key in [Some(b.tag), None] {
            let e = per.entry(key).or_default();
            e.0 += 1;
            match (b.correct, a.correct) {
                (false, true) => e.1 += 1,
                (true, false) => e.2 += 1,
                _ => {}
            }
        }
    }
    let mut rows: Vec<PairedRow> = Tag::ALL
        .iter()
        .filter_map(|t| per.get(&Some(*t)).map(|v| (Some(*t), *v)))
        .chain(per.get(&None).map(|v| (None, *v)))
        .map(|(tag, (pairs, gained, lost))| PairedRow {
            tag,
            pairs,
            gained,
            lost,
            p_value: mcnemar_exact(gained, lost),
        })
        .collect();
    rows.dedup();
    rows
}

/// Markdown: one table per compared model.
pub fn markdown(name: &str, rows: &[PairedRow]) -> String {
    let mut s = format!(
        "| {name} vs base | images | wrong -> right | right -> wrong | exact McNemar p |\n\
         |---|---:|---:|---:|---:|\n"
    );
    for r in rows {
        let tag = r.tag.map_or("**all**", |t| t.name());
        s += &format!(
            "| {tag} | {} | {} | {} | {:.3} |\n",
            r.pairs, r.gained, r.lost, r.p_value
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_mcnemar_matches_binomial_tails() {
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // 0 of 5 discordant go one way: 2 * 0.5^5.
        assert!((mcnemar_exact(0, 5) - 0.0625).abs() < 1e-12);
        // 1 vs 9: 2 * (1 + 10) / 1024.
        assert!((mcnemar_exact(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(3, 3), 1.0);
        // Large n stays finite and symmetric.
        let p = mcnemar_exact(400, 600);
        assert!(p > 0.0 && p < 1e-9, "{p}");
        assert_eq!(p, mcnemar_exact(600, 400));
    }

    #[test]
    fn slots_match_across_folders() {
        assert_eq!(
            slot("/runs/x/eval-base/00012/samples/0003.png"),
            "00012/samples/0003.png"
        );
        assert_eq!(
            slot("eval-agsm/00012/samples/0003.png"),
            slot("/a/b/00012/samples/0003.png")
        );
    }
}

//! GenEval's judgement of one image, given what a detector found in it. This mirrors
//! `evaluate()` and `relative_position()` in GenEval's `evaluate_images.py` clause by clause
//! (include clauses ANDed, exclude clauses ORed, colour and position checked only on the most
//! confident `count` objects of a class, same reason strings), so a detector plugged in here
//! is judged by GenEval's rules, not by rules of our own.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::metadata::{EvalPrompt, Relation, Tag};

/// GenEval's colour names, in the order its reasons list them.
pub const GENEVAL_COLORS: [&str; 10] = [
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
];

/// One detected object: `bbox` is `[x0, y0, x1, y1]` in pixels (x1, y1 exclusive), as
/// GenEval's detector boxes are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub class: String,
    pub color: String,
    pub bbox: [f32; 4],
    pub confidence: f32,
}

/// GenEval's knobs, with its defaults in [`JudgeConfig::geneval`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// Minimum confidence for a detection to count.
    pub threshold: f32,
    /// Minimum confidence on `counting` prompts (stricter, to keep doubtful extras out).
    pub counting_threshold: f32,
    /// Most detections kept per class.
    pub max_objects: usize,
    /// Fraction of the two objects' summed box sizes an offset must exceed to count.
    pub position_threshold: f32,
}

impl JudgeConfig {
    /// GenEval's defaults (threshold 0.3, counting 0.9, 16 objects, position 0.1).
    pub fn geneval() -> Self {
        JudgeConfig {
            threshold: 0.3,
            counting_threshold: 0.9,
            max_objects: 16,
            position_threshold: 0.1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    pub correct: bool,
    /// Why not, one line per failed clause (GenEval's wording); empty when correct.
    pub reason: String,
    /// The detections that passed the confidence threshold, most confident first per class.
    pub detected: BTreeMap<String, Vec<Detection>>,
}

impl Judgement {
    /// GenEval's `details` column: class -> list of `[x0, y0, x1, y1, confidence]`.
    pub fn details_json(&self) -> String {
        let map: BTreeMap<&str, Vec<[f32; 5]>> = self
            .detected
            .iter()
            .map(|(k, v)| {
                let boxes = v
                    .iter()
                    .map(|d| [d.bbox[0], d.bbox[1], d.bbox[2], d.bbox[3], d.confidence])
                    .collect();
                (k.as_str(), boxes)
            })
            .collect();
        super::metadata::to_python_json(&map)
    }
}

/// Keeps the detections GenEval would: confidence above the tag's threshold, most confident
/// first, at most `max_objects` per class.
pub fn select_detections(
    candidates: &[Detection],
    tag: Tag,
    cfg: &JudgeConfig,
) -> BTreeMap<String, Vec<Detection>> {
    let threshold = if tag == Tag::Counting {
        cfg.counting_threshold
    } else {
        cfg.threshold
    };
    let mut by_class: BTreeMap<String, Vec<Detection>> = BTreeMap::new();
    for d in candidates.iter().filter(|d| d.confidence > threshold) {
        by_class.entry(d.class.clone()).or_default().push(d.clone());
    }
    for v in by_class.values_mut() {
        v.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
        v.truncate(cfg.max_objects);
    }
    by_class
}

/// GenEval's `relative_position`: where box `a` is relative to box `b`. The centre offset is
/// shrunk on each axis by `threshold` x (sum of the two boxes' sizes on that axis); a relation
/// holds when the shrunk offset, divided by the length of the full offset, exceeds 0.5 in its
/// direction.
pub fn relative_position(a: &[f32; 4], b: &[f32; 4], threshold: f32) -> Vec<Relation> {
    let c = |bx: &[f32; 4]| {
        [
            (bx[0] as f64 + bx[2] as f64) / 2.0,
            (bx[1] as f64 + bx[3] as f64) / 2.0,
        ]
    };
    let dim = |bx: &[f32; 4]| [(bx[2] - bx[0]).abs() as f64, (bx[3] - bx[1]).abs() as f64];
    let (ca, cb, da, db) = (c(a), c(b), dim(a), dim(b));
    let offset = [ca[0] - cb[0], ca[1] - cb[1]];
    let revised: [f64; 2] = std::array::from_fn(|i| {
        (offset[i].abs() - threshold as f64 * (da[i] + db[i])).max(0.0) * sign(offset[i])
    });
    if revised.iter().all(|r| r.abs() < 1e-3) {
        return Vec::new();
    }
    let norm = offset[0].hypot(offset[1]);
    let (dx, dy) = (revised[0] / norm, revised[1] / norm);
    let mut rels = Vec::new();
    if dx < -0.5 {
        rels.push(Relation::LeftOf);
    }
    if dx > 0.5 {
        rels.push(Relation::RightOf);
    }
    if dy < -0.5 {
        rels.push(Relation::Above);
    }
    if dy > 0.5 {
        rels.push(Relation::Below);
    }
    rels
}

/// numpy's sign: 0 at 0.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Judges one image from its candidate detections, as GenEval's `evaluate()` does.
pub fn judge(candidates: &[Detection], prompt: &EvalPrompt, cfg: &JudgeConfig) -> Judgement {
    let objects = select_detections(candidates, prompt.tag, cfg);
    let none: Vec<Detection> = Vec::new();
    let mut correct = true;
    let mut reason: Vec<String> = Vec::new();
    let mut matched_groups: Vec<Option<&[Detection]>> = Vec::new();
    for req in &prompt.include {
        let class = &req.class;
        let all = objects.get(class).unwrap_or(&none);
        let found = &all[..all.len().min(req.count as usize)];
        let mut matched = true;
        if found.len() < req.count as usize {
            correct = false;
            matched = false;
            reason.push(format!(
                "expected {class}>={}, found {}",
                req.count,
                found.len()
            ));
        } else {
            if let Some(color) = &req.color {
                let colors: Vec<&str> = found.iter().map(|d| d.color.as_str()).collect();
                let n = colors.iter().filter(|c| *c == color).count();
                if n < req.count as usize {
                    correct = false;
                    matched = false;
                    reason.push(format!(
                        "expected {color} {class}>={}, found {n} {color}; and {}",
                        req.count,
                        color_tally(&colors)
                    ));
                }
            }
            if let (Some((rel, target)), true) = (req.position, matched) {
                match matched_groups.get(target).copied().flatten() {
                    None => {
                        correct = false;
                        matched = false;
                        reason.push(format!("no target for {class} to be {}", rel.phrase()));
                    }
                    Some(targets) => {
                        'outer: for obj in found {
                            for t in targets {
                                let rels =
                                    relative_position(&obj.bbox, &t.bbox, cfg.position_threshold);
                                if !rels.contains(&rel) {
                                    correct = false;
                                    matched = false;
                                    let seen: Vec<&str> = rels.iter().map(|r| r.phrase()).collect();
                                    reason.push(format!(
                                        "expected {class} {} target, found {} target",
                                        rel.phrase(),
                                        seen.join(" and ")
                                    ));
                                    break 'outer;
                                }
                            }
                        }
                    }
                }
            }
        }
        matched_groups.push(matched.then_some(found));
    }
    for ex in &prompt.exclude {
        let n = objects.get(&ex.class).map_or(0, Vec::len);
        if n >= ex.count as usize {
            correct = false;
            reason.push(format!("expected {}<{}, found {n}", ex.class, ex.count));
        }
    }
    Judgement {
        correct,
        reason: reason.join("\n"),
        detected: objects,
    }
}

/// "1 red, 2 blue" in GenEval's colour order; colours outside GenEval's ten come last.
fn color_tally(colors: &[&str]) -> String {
    let mut names: Vec<&str> = GENEVAL_COLORS
        .iter()
        .copied()
        .filter(|c| colors.contains(c))
        .collect();
    for c in colors {
        if !names.contains(c) {
            names.push(c);
        }
    }
    names
        .iter()
        .map(|c| format!("{} {c}", colors.iter().filter(|x| *x == c).count()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geneval::metadata::{parse_metadata_jsonl, Requirement};
    use std::path::Path;

    fn det(class: &str, color: &str, bbox: [f32; 4], confidence: f32) -> Detection {
        Detection {
            class: class.into(),
            color: color.into(),
            bbox,
            confidence,
        }
    }

    fn prompt(line: &str) -> EvalPrompt {
        parse_metadata_jsonl(line, Path::new("t"))
            .unwrap()
            .remove(0)
    }

    #[test]
    fn relative_position_matches_geneval() {
        // Values worked through GenEval's numpy code by hand.
        let a = [0.0, 0.0, 10.0, 10.0];
        let b = [20.0, 0.0, 30.0, 10.0];
        assert_eq!(relative_position(&a, &b, 0.1), vec![Relation::LeftOf]);
        assert_eq!(relative_position(&b, &a, 0.1), vec![Relation::RightOf]);
        // Diagonal at 45 degrees: revised offsets (-18, -18) / 28.28 = -0.64 on both axes.
        let c = [20.0, 20.0, 30.0, 30.0];
        assert_eq!(
            relative_position(&a, &c, 0.1),
            vec![Relation::LeftOf, Relation::Above]
        );
        // Offsets within the margin: no relation at all.
        let d = [1.0, 1.5, 11.0, 11.5];
        assert!(relative_position(&a, &d, 0.1).is_empty());
        // Mostly vertical: only "below".
        let e = [2.0, 20.0, 12.0, 30.0];
        assert_eq!(relative_position(&e, &a, 0.1), vec![Relation::Below]);
    }

    #[test]
    fn counting_needs_exactly_n_above_the_counting_threshold() {
        let p = prompt(
            r#"{"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}], "prompt": "a photo of two circles"}"#,
        );
        let cfg = JudgeConfig::geneval();
        let two = [
            det("circle", "red", [0.0; 4], 0.95),
            det("circle", "red", [0.0; 4], 0.95),
        ];
        assert!(judge(&two, &p, &cfg).correct);
        let mut three = two.to_vec();
        three.push(det("circle", "blue", [0.0; 4], 0.95));
        let j = judge(&three, &p, &cfg);
        assert!(!j.correct);
        assert_eq!(j.reason, "expected circle<3, found 3");
        // A doubtful third one is below the counting threshold and does not count.
        three[2].confidence = 0.5;
        assert!(judge(&three, &p, &cfg).correct);
        let j = judge(&two[..1], &p, &cfg);
        assert_eq!(j.reason, "expected circle>=2, found 1");
    }

    #[test]
    fn colour_is_checked_on_the_most_confident_objects_only() {
        let p = prompt(
            r#"{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a photo of a red circle"}"#,
        );
        let cfg = JudgeConfig::geneval();
        let dets = [
            det("circle", "blue", [0.0; 4], 0.9),
            det("circle", "red", [0.0; 4], 0.8),
        ];
        let j = judge(&dets, &p, &cfg);
        assert!(!j.correct);
        assert_eq!(j.reason, "expected red circle>=1, found 0 red; and 1 blue");
        let dets = [
            det("circle", "blue", [0.0; 4], 0.7),
            det("circle", "red", [0.0; 4], 0.8),
        ];
        assert!(judge(&dets, &p, &cfg).correct);
    }

    #[test]
    fn position_is_judged_against_every_target() {
        let p = prompt(
            r#"{"tag": "position", "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a circle left of a square"}"#,
        );
        let cfg = JudgeConfig::geneval();
        let sq = det("square", "red", [20.0, 0.0, 30.0, 10.0], 0.9);
        let ci = det("circle", "red", [0.0, 0.0, 10.0, 10.0], 0.9);
        assert!(judge(&[sq.clone(), ci.clone()], &p, &cfg).correct);
        let mut swapped = ci.clone();
        swapped.bbox = [40.0, 0.0, 50.0, 10.0];
        let j = judge(&[sq.clone(), swapped], &p, &cfg);
        assert_eq!(
            j.reason,
            "expected circle left of target, found right of target"
        );
        let j = judge(&[ci], &p, &cfg);
        assert_eq!(
            j.reason,
            "expected square>=1, found 0\nno target for circle to be left of"
        );
    }

    #[test]
    fn other_classes_do_not_fail_a_prompt_and_details_list_boxes() {
        let p = EvalPrompt {
            tag: Tag::SingleObject,
            include: vec![Requirement {
                class: "circle".into(),
                count: 1,
                color: None,
                position: None,
            }],
            exclude: vec![],
            prompt: "a photo of a circle".into(),
            held_out: None,
        };
        let dets = [
            det("circle", "red", [1.0, 2.0, 3.0, 4.0], 0.5),
            det("square", "red", [0.0; 4], 0.9),
        ];
        let j = judge(&dets, &p, &JudgeConfig::geneval());
        assert!(j.correct && j.reason.is_empty());
        assert_eq!(
            j.details_json(),
            r#"{"circle": [[1.0, 2.0, 3.0, 4.0, 0.5]], "square": [[0.0, 0.0, 0.0, 0.0, 0.9]]}"#
        );
        // Below threshold: not found.
        let j = judge(
            &[det("circle", "red", [0.0; 4], 0.2)],
            &p,
            &JudgeConfig::geneval(),
        );
        assert_eq!(j.reason, "expected circle>=1, found 0");
    }
}

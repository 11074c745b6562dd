//! The held-out evaluation prompts, in GenEval's six categories and GenEval's wording
//! (`create_prompts.py`), over this world's shapes and colours.
//!
//! GenEval draws prompts at random and removes duplicates; with 4 shapes and 5 colours most
//! categories have few distinct prompts, so each category is enumerated in full and, where it
//! has more than `per_tag_max`, a seeded shuffle picks that many. Sizes at the default 40:
//! single_object 4 (every shape), two_object 12 (every ordered pair), counting 12 (every shape
//! x 2, 3, 4), colors 20 (every colour x shape), position 40 of 48, color_attr 40 of 240.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::captions::{noun_phrase, NUMBERS, PHOTO_PREFIX};
use super::heldout;
use super::palette::{Color, Shape};
use crate::geneval::{EvalPrompt, Exclusion, Relation, Requirement, Tag};

/// Prompts per category at most, by default.
pub const DEFAULT_PER_TAG: usize = 40;

/// The evaluation set at the default size; same seed, same prompts.
pub fn eval_prompts(seed: u64) -> Vec<EvalPrompt> {
    eval_prompts_with(seed, DEFAULT_PER_TAG)
}

/// The evaluation set with at most `per_tag_max` prompts per category, in GenEval's category
/// order.
pub fn eval_prompts_with(seed: u64, per_tag_max: usize) -> Vec<EvalPrompt> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for tag in Tag::ALL {
        let mut all = enumerate(tag);
        if all.len() > per_tag_max {
            all.shuffle(&mut rng);
            all.truncate(per_tag_max);
        }
        out.extend(all);
    }
    out
}

/// Every prompt of the six categories that `eval_prompts(eval_seed)` leaves out, in category
/// order: what a method that trains on prompts (DDPO) may see, so its evaluation on the
/// evaluation set is on held-out prompts. At the default size only position (8) and
/// color_attr (200) have prompts to spare; the other categories are evaluated whole.
pub fn train_prompts(eval_seed: u64) -> Vec<EvalPrompt> {
    let held: std::collections::HashSet<String> = eval_prompts(eval_seed)
        .into_iter()
        .map(|p| p.prompt)
        .collect();
    Tag::ALL
        .into_iter()
        .flat_map(enumerate)
        .filter(|p| !held.contains(&p.prompt))
        .collect()
}

/// Every distinct prompt of a category, in a fixed order.
pub fn enumerate(tag: Tag) -> Vec<EvalPrompt> {
    let pairs: Vec<(Shape, Shape)> = Shape::ALL
        .iter()
        .flat_map(|&a| {
            Shape::ALL
                .iter()
                .filter(move |&&b| b != a)
                .map(move |&b| (a, b))
        })
        .collect();
    let mut out = Vec::new();
    match tag {
        Tag::SingleObject => {
            for s in Shape::ALL {
                out.push(make(
                    tag,
                    vec![req(s, 1, None, None)],
                    vec![],
                    noun_phrase(1, None, s, false),
                ));
            }
        }
        Tag::TwoObject => {
            for &(a, b) in &pairs {
                let text = format!(
                    "{} and {}",
                    noun_phrase(1, None, a, false),
                    noun_phrase(1, None, b, false)
                );
                out.push(make(
                    tag,
                    vec![req(a, 1, None, None), req(b, 1, None, None)],
                    vec![],
                    text,
                ));
            }
        }
        Tag::Counting => {
            for s in Shape::ALL {
                for n in 2..=4u32 {
                    let text = format!("{} {}", NUMBERS[n as usize], s.plural());
                    let exclude = vec![Exclusion {
                        class: s.name().into(),
                        count: n + 1,
                    }];
                    out.push(make(tag, vec![req(s, n, None, None)], exclude, text));
                }
            }
        }
        Tag::Colors => {
            for s in Shape::ALL {
                for c in Color::ALL {
                    out.push(make(
                        tag,
                        vec![req(s, 1, Some(c), None)],
                        vec![],
                        noun_phrase(1, Some(c), s, false),
                    ));
                }
            }
        }
        Tag::Position => {
            for &(a, b) in &pairs {
                for rel in Relation::ALL {
                    let text = format!(
                        "{} {} {}",
                        noun_phrase(1, None, a, false),
                        rel.phrase(),
                        noun_phrase(1, None, b, false)
                    );
                    // GenEval lists the target first and points the subject at it.
                    let include = vec![req(b, 1, None, None), req(a, 1, None, Some((rel, 0)))];
                    out.push(make(tag, include, vec![], text));
                }
            }
        }
        Tag::ColorAttr => {
            for &(a, b) in &pairs {
                for ca in Color::ALL {
                    for cb in Color::ALL.into_iter().filter(|&c| c != ca) {
                        let text = format!(
                            "{} and {}",
                            noun_phrase(1, Some(ca), a, false),
                            noun_phrase(1, Some(cb), b, false)
                        );
                        let include = vec![req(a, 1, Some(ca), None), req(b, 1, Some(cb), None)];
                        out.push(make(tag, include, vec![], text));
                    }
                }
            }
        }
    }
    out
}

/// Whether a prompt names a combination the training split never shows: a held-out colour x
/// shape object, or both shapes of the held-out pair.
pub fn names_held_out(prompt: &EvalPrompt) -> bool {
    let shapes: Vec<Shape> = prompt
        .include
        .iter()
        .filter_map(|r| Shape::from_name(&r.class))
        .collect();
    let object = prompt.include.iter().any(|r| {
        match (
            Shape::from_name(&r.class),
            r.color.as_deref().and_then(Color::from_name),
        ) {
            (Some(s), Some(c)) => heldout::is_held_out_object(s, c),
            _ => false,
        }
    });
    object || heldout::has_held_out_pair(&shapes)
}

fn req(
    s: Shape,
    count: u32,
    color: Option<Color>,
    position: Option<(Relation, usize)>,
) -> Requirement {
    Requirement {
        class: s.name().into(),
        count,
        color: color.map(|c| c.name().into()),
        position,
    }
}

fn make(tag: Tag, include: Vec<Requirement>, exclude: Vec<Exclusion>, text: String) -> EvalPrompt {
    let mut p = EvalPrompt {
        tag,
        include,
        exclude,
        prompt: format!("{PHOTO_PREFIX} {text}"),
        held_out: None,
    };
    p.held_out = Some(names_held_out(&p));
    p
}

#[cfg(test)]
mod tests {
    #[test]
    fn train_prompts_are_the_enumeration_minus_the_evaluation_set() {
        let train = super::train_prompts(0);
        let eval = super::eval_prompts(0);
        assert_eq!(train.len(), 8 + 200);
        assert!(train
            .iter()
            .all(|t| eval.iter().all(|e| e.prompt != t.prompt)));
    }

    use super::*;

    #[test]
    fn categories_have_the_documented_sizes_and_are_seeded() {
        let sizes: Vec<usize> = Tag::ALL.iter().map(|&t| enumerate(t).len()).collect();
        assert_eq!(sizes, [4, 12, 12, 20, 48, 240]);
        let a = eval_prompts(0);
        assert_eq!(a.len(), 4 + 12 + 12 + 20 + 40 + 40);
        assert_eq!(a, eval_prompts(0));
        assert_ne!(a, eval_prompts(1));
        for p in &a {
            p.validate().unwrap();
        }
        let texts: std::collections::BTreeSet<&str> = a.iter().map(|p| p.prompt.as_str()).collect();
        assert_eq!(texts.len(), a.len(), "prompts are distinct");
    }

    #[test]
    fn wording_and_metadata_follow_geneval() {
        let pos = enumerate(Tag::Position);
        assert_eq!(
            pos[0].to_json_line(),
            r#"{"tag": "position", "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a circle left of a square", "held_out": false}"#
        );
        let count = &enumerate(Tag::Counting)[1];
        assert_eq!(count.prompt, "a photo of three circles");
        assert_eq!(count.exclude[0].count, 4);
        assert_eq!(
            enumerate(Tag::ColorAttr)[0].prompt,
            "a photo of a red circle and a green square"
        );
    }

    #[test]
    fn held_out_prompts_are_flagged() {
        let colors = enumerate(Tag::Colors);
        let held: Vec<&str> = colors
            .iter()
            .filter(|p| p.held_out == Some(true))
            .map(|p| p.prompt.as_str())
            .collect();
        assert_eq!(
            held,
            [
                "a photo of a blue circle",
                "a photo of a green square",
                "a photo of a red triangle",
                "a photo of a yellow diamond"
            ]
        );
        let two = enumerate(Tag::TwoObject);
        assert_eq!(two.iter().filter(|p| p.held_out == Some(true)).count(), 2);
        assert!(enumerate(Tag::SingleObject)
            .iter()
            .all(|p| p.held_out == Some(false)));
    }
}

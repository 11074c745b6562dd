//! The training split: deterministic, no overlaps, captions true to the scene, held-out
//! combinations absent, every word in the vocabulary.
use std::collections::BTreeSet;

use softalign_worlds::geneval::Tag;
use softalign_worlds::shapes::heldout::{HELD_OUT_OBJECTS, HELD_OUT_PAIR};
use softalign_worlds::shapes::prompts::enumerate;
use softalign_worlds::shapes::{
    detect, eval_prompts, train_split, vocabulary, Color, SceneConfig, ScorerConfig, Shape,
};

const N: usize = 2000;

#[test]
fn the_split_is_deterministic_per_seed_and_extends() {
    let a = train_split(50, 7);
    assert_eq!(a, train_split(50, 7));
    assert_eq!(a[..20], train_split(20, 7)[..]);
    let b = train_split(50, 8);
    assert_ne!(
        a.iter().map(|e| &e.scene).collect::<Vec<_>>(),
        b.iter().map(|e| &e.scene).collect::<Vec<_>>()
    );
    assert!(a
        .iter()
        .all(|e| e.image.dimensions() == (32, 32) && e.captions.len() == 5));
}

#[test]
fn objects_never_overlap_and_stay_inside() {
    let cfg = SceneConfig::train();
    for e in train_split(N, 1) {
        let s = &e.scene;
        assert!((1..=4).contains(&s.objects.len()));
        assert!(s.objects.len() < 2 || s.min_gap() >= cfg.gap, "{s:?}");
        for o in &s.objects {
            let b = o.bbox();
            assert!(
                b[0] >= 1.0 && b[1] >= 1.0 && b[2] <= 31.0 && b[3] <= 31.0,
                "{o:?}"
            );
        }
    }
}

#[test]
fn held_out_combinations_never_appear_in_training() {
    let split = train_split(N, 2);
    let mut seen_objects = BTreeSet::new();
    let mut seen_pairs = BTreeSet::new();
    for e in &split {
        let shapes: BTreeSet<Shape> = e.scene.objects.iter().map(|o| o.shape).collect();
        for o in &e.scene.objects {
            assert!(
                !HELD_OUT_OBJECTS.contains(&(o.color, o.shape)),
                "{:?}",
                e.scene
            );
            seen_objects.insert((o.color, o.shape));
        }
        assert!(!(shapes.contains(&HELD_OUT_PAIR.0) && shapes.contains(&HELD_OUT_PAIR.1)));
        for a in &shapes {
            for b in &shapes {
                if a < b {
                    seen_pairs.insert((*a, *b));
                }
            }
        }
        for c in &e.captions {
            for (color, shape) in HELD_OUT_OBJECTS {
                for noun in [shape.name(), shape.plural()] {
                    let bigram = format!("{} {noun}", color.name());
                    assert!(
                        !c.split(' ')
                            .collect::<Vec<_>>()
                            .windows(2)
                            .any(|w| w.join(" ") == bigram),
                        "{c}"
                    );
                }
            }
            let words: BTreeSet<&str> = c.split(' ').collect();
            let mentions = |s: Shape| words.contains(s.name()) || words.contains(s.plural());
            assert!(
                !(mentions(HELD_OUT_PAIR.0) && mentions(HELD_OUT_PAIR.1)),
                "{c}"
            );
        }
    }
    // Everything else is seen: 20 - 4 colour x shape objects, 6 - 1 shape pairs.
    assert_eq!(
        seen_objects.len(),
        Color::ALL.len() * Shape::ALL.len() - HELD_OUT_OBJECTS.len()
    );
    assert_eq!(seen_pairs.len(), 5);
}

#[test]
fn the_scorer_finds_exactly_the_scene_on_training_images() {
    let cfg = ScorerConfig::default();
    let split = train_split(500, 3);
    let mut exact = 0;
    for e in &split {
        let mut want: Vec<(String, String)> = e
            .scene
            .objects
            .iter()
            .map(|o| (o.shape.name().into(), o.color.name().into()))
            .collect();
        let mut got: Vec<(String, String)> = detect(&e.image, &cfg)
            .into_iter()
            .filter(|d| d.confidence > cfg.judge.counting_threshold)
            .map(|d| (d.class, d.color))
            .collect();
        want.sort();
        got.sort();
        exact += (want == got) as usize;
    }
    println!(
        "training images whose detections match the scene exactly: {exact} / {}",
        split.len()
    );
    assert!(exact as f64 >= 0.99 * split.len() as f64);
}

#[test]
fn every_caption_and_prompt_word_is_in_the_vocabulary() {
    let vocab: BTreeSet<&str> = vocabulary().into_iter().collect();
    assert_eq!(vocab.len(), vocabulary().len(), "no duplicates");
    let mut texts: Vec<String> = train_split(N, 4)
        .into_iter()
        .flat_map(|e| e.captions)
        .collect();
    texts.extend(
        Tag::ALL
            .iter()
            .flat_map(|&t| enumerate(t))
            .map(|p| p.prompt),
    );
    let mut used = BTreeSet::new();
    for t in &texts {
        for w in t.split(' ') {
            assert!(vocab.contains(w), "`{w}` in `{t}` is not in the vocabulary");
            used.insert(w.to_string());
        }
    }
    // Captions really come in several styles, with counts as words and relations.
    for w in [
        "photo", "there", "is", "are", "and", "two", "three", "four", "one", "left", "right",
        "above", "below",
    ] {
        assert!(used.contains(w), "no caption uses `{w}`");
    }
}

#[test]
fn training_captions_cover_every_evaluation_phrasing() {
    // Each eval prompt's wording, with its objects swapped for seen ones, occurs in training:
    // checked here on the templates, by stripping shape and colour words.
    let template = |s: &str| -> String {
        s.split(' ')
            .map(|w| {
                if Shape::ALL.iter().any(|x| x.name() == w) {
                    "S"
                } else if Shape::ALL.iter().any(|x| x.plural() == w) {
                    "SS"
                } else if Color::ALL.iter().any(|x| x.name() == w) {
                    "C"
                } else {
                    w
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let train: BTreeSet<String> = train_split(N, 5)
        .iter()
        .flat_map(|e| e.captions.iter().map(|c| template(c)))
        .collect();
    for p in eval_prompts(0) {
        assert!(
            train.contains(&template(&p.prompt)),
            "no training caption is worded like `{}`",
            p.prompt
        );
    }
}

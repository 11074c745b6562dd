//! Captions: several per image, in different styles, as COCO has several per photo. Between
//! them they use every phrasing the evaluation prompts use ("a photo of two circles", "a red
//! square and a blue diamond", "a circle left of a square"), so what the evaluation tests is
//! the combinations, not unfamiliar wording.
use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::Rng;

use super::palette::{Color, Shape};
use super::scene::Scene;
use crate::geneval::{relative_position, JudgeConfig};

/// GenEval's number words.
pub const NUMBERS: [&str; 11] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// The prefix every GenEval prompt starts with.
pub const PHOTO_PREFIX: &str = "a photo of";

/// "a circle", "one circle", "three red squares". Counts above ten are written as "ten":
/// scenes that large are not part of this world.
pub fn noun_phrase(
    count: usize,
    color: Option<Color>,
    shape: Shape,
    numeral_for_one: bool,
) -> String {
    let det = match count {
        1 if !numeral_for_one => "a",
        n => NUMBERS[n.min(10)],
    };
    let noun = if count == 1 {
        shape.name()
    } else {
        shape.plural()
    };
    match color {
        Some(c) => format!("{det} {} {noun}", c.name()),
        None => format!("{det} {noun}"),
    }
}

/// Several captions of `scene`, each in its own style; random choices (order of mention,
/// the "a photo of" prefix, which pair a spatial caption describes) come from `rng`.
pub fn captions<R: Rng + ?Sized>(scene: &Scene, rng: &mut R) -> Vec<String> {
    if scene.objects.is_empty() {
        return vec!["a photo of nothing".to_string()];
    }
    let mut by_kind: BTreeMap<(Shape, Color), usize> = BTreeMap::new();
    let mut by_shape: BTreeMap<Shape, usize> = BTreeMap::new();
    for o in &scene.objects {
        *by_kind.entry((o.shape, o.color)).or_default() += 1;
        *by_shape.entry(o.shape).or_default() += 1;
    }
    let mut kinds: Vec<((Shape, Color), usize)> = by_kind.into_iter().collect();
    let mut shapes: Vec<(Shape, usize)> = by_shape.into_iter().collect();
    let mut out = Vec::with_capacity(5);

    // 1. colours and counts: "a photo of two red squares and a blue circle"
    kinds.shuffle(rng);
    let s = join(
        kinds
            .iter()
            .map(|&((s, c), n)| noun_phrase(n, Some(c), s, false)),
    );
    out.push(maybe_prefix(rng, s));
    // 2. classes and counts only: "a photo of two squares and a circle"
    shapes.shuffle(rng);
    let s = join(shapes.iter().map(|&(s, n)| noun_phrase(n, None, s, false)));
    out.push(maybe_prefix(rng, s));
    // 3. numerals throughout: "one blue circle and two red squares"
    kinds.shuffle(rng);
    let s = join(
        kinds
            .iter()
            .map(|&((s, c), n)| noun_phrase(n, Some(c), s, true)),
    );
    out.push(maybe_prefix(rng, s));
    // 4. "there is a blue circle and two red squares"
    kinds.shuffle(rng);
    let verb = if kinds[0].1 == 1 {
        "there is"
    } else {
        "there are"
    };
    let s = join(
        kinds
            .iter()
            .map(|&((s, c), n)| noun_phrase(n, Some(c), s, false)),
    );
    out.push(format!("{verb} {s}"));
    // 5. a spatial relation between two objects, judged by GenEval's own rule so a caption
    //    never states what the scorer would call false; single objects get GenEval's
    //    single_object wording.
    out.push(spatial_caption(scene, rng).unwrap_or_else(|| {
        let s = join(shapes.iter().map(|&(s, n)| noun_phrase(n, None, s, false)));
        format!("{PHOTO_PREFIX} {s}")
    }));
    out
}

fn spatial_caption<R: Rng + ?Sized>(scene: &Scene, rng: &mut R) -> Option<String> {
    let threshold = JudgeConfig::geneval().position_threshold;
    let objs = &scene.objects;
    let mut pairs = Vec::new();
    for (i, a) in objs.iter().enumerate() {
        for (j, b) in objs.iter().enumerate() {
            if i != j {
                for rel in relative_position(&a.bbox(), &b.bbox(), threshold) {
                    pairs.push((i, j, rel));
                }
            }
        }
    }
    let &(i, j, rel) = pairs.choose(rng)?;
    let with_color = rng.gen_bool(0.5);
    let phrase =
        |k: usize| noun_phrase(1, with_color.then_some(objs[k].color), objs[k].shape, false);
    let s = format!("{} {} {}", phrase(i), rel.phrase(), phrase(j));
    Some(maybe_prefix(rng, s))
}

fn maybe_prefix<R: Rng + ?Sized>(rng: &mut R, s: String) -> String {
    if rng.gen_bool(0.5) {
        format!("{PHOTO_PREFIX} {s}")
    } else {
        s
    }
}

fn join(parts: impl Iterator<Item = String>) -> String {
    parts.collect::<Vec<_>>().join(" and ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::scene::Object;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn o(shape: Shape, color: Color, cx: f32, cy: f32) -> Object {
        Object {
            shape,
            color,
            cx,
            cy,
            size: 9.0,
        }
    }

    #[test]
    fn noun_phrases_count_in_words() {
        assert_eq!(noun_phrase(1, None, Shape::Circle, false), "a circle");
        assert_eq!(
            noun_phrase(1, Some(Color::Red), Shape::Circle, true),
            "one red circle"
        );
        assert_eq!(
            noun_phrase(3, Some(Color::Blue), Shape::Square, false),
            "three blue squares"
        );
    }

    #[test]
    fn captions_describe_the_scene() {
        let scene = Scene {
            image_size: 32,
            objects: vec![
                o(Shape::Square, Color::Red, 8.0, 8.0),
                o(Shape::Square, Color::Red, 8.0, 24.0),
                o(Shape::Circle, Color::Blue, 24.0, 16.0),
            ],
        };
        let caps = captions(&scene, &mut ChaCha8Rng::seed_from_u64(3));
        assert_eq!(caps.len(), 5);
        let strip = |s: &str| s.trim_start_matches("a photo of ").to_string();
        let c0 = strip(&caps[0]);
        assert!(
            c0 == "two red squares and a blue circle" || c0 == "a blue circle and two red squares",
            "{c0}"
        );
        let c1 = strip(&caps[1]);
        assert!(
            c1 == "two squares and a circle" || c1 == "a circle and two squares",
            "{c1}"
        );
        assert!(strip(&caps[2]).contains("one blue circle") && caps[2].contains("two red squares"));
        assert!(caps[3].starts_with("there "));
        // The circle is right of both squares; each square is left of the circle and above or
        // below the other square.
        let c4 = strip(&caps[4]);
        let words: Vec<&str> = c4.split(' ').collect();
        assert!(
            c4.contains(" left of ")
                || c4.contains(" right of ")
                || c4.contains(" above ")
                || c4.contains(" below "),
            "{c4}"
        );
        if c4.contains("right of") {
            assert!(words[1..3].contains(&"circle"), "{c4}");
        }
    }

    #[test]
    fn captions_are_deterministic() {
        let scene = Scene {
            image_size: 32,
            objects: vec![
                o(Shape::Triangle, Color::Green, 10.0, 10.0),
                o(Shape::Diamond, Color::Purple, 22.0, 22.0),
            ],
        };
        let a = captions(&scene, &mut ChaCha8Rng::seed_from_u64(9));
        let b = captions(&scene, &mut ChaCha8Rng::seed_from_u64(9));
        assert_eq!(a, b);
    }
}

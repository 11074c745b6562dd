//! Ground truth for a prompt: a scene that satisfies it, drawn at random. It tests the scorer
//! (a perfect generator must score ~100%), gives the ceiling a trained model is measured
//! against, and, with a clause altered, makes the near misses a scorer must reject.
use rand::Rng;

use super::palette::{Color, Shape};
use super::scene::{place, Scene, SceneConfig};
use crate::error::{Error, Result};
use crate::geneval::{relative_position, EvalPrompt, JudgeConfig, Relation};

/// A random scene satisfying `prompt`: exactly `count` objects for each include clause (its
/// colour if given, else a random one), nothing else of an excluded class, and each
/// positioned clause clearly in its relation, plus up to `distractors` objects of shapes the
/// prompt does not mention (as many as `cfg.max_objects` leaves room for). Errors on classes or colours this world does not have.
pub fn scene_for_prompt<R: Rng + ?Sized>(
    rng: &mut R,
    prompt: &EvalPrompt,
    cfg: &SceneConfig,
    distractors: usize,
) -> Result<Scene> {
    prompt.validate()?;
    cfg.validate()?;
    let mut kinds: Vec<(Shape, Color)> = Vec::new();
    // group[i] = the include clause object i belongs to.
    let mut group: Vec<usize> = Vec::new();
    for (gi, r) in prompt.include.iter().enumerate() {
        let shape = Shape::from_name(&r.class).ok_or_else(|| {
            Error::prompt(&prompt.prompt, format!("no shape called `{}`", r.class))
        })?;
        let color = match &r.color {
            Some(name) => Some(Color::from_name(name).ok_or_else(|| {
                Error::prompt(&prompt.prompt, format!("no colour called `{name}`"))
            })?),
            None => None,
        };
        for _ in 0..r.count {
            let c = color.unwrap_or_else(|| Color::ALL[rng.gen_range(0..Color::ALL.len())]);
            kinds.push((shape, c));
            group.push(gi);
        }
    }
    let mentioned: Vec<&str> = prompt
        .include
        .iter()
        .map(|r| r.class.as_str())
        .chain(prompt.exclude.iter().map(|e| e.class.as_str()))
        .collect();
    let free: Vec<Shape> = Shape::ALL
        .into_iter()
        .filter(|s| !mentioned.contains(&s.name()))
        .collect();
    if !free.is_empty() {
        for _ in 0..distractors.min(cfg.max_objects.saturating_sub(kinds.len())) {
            let s = free[rng.gen_range(0..free.len())];
            kinds.push((s, Color::ALL[rng.gen_range(0..Color::ALL.len())]));
            group.push(usize::MAX);
        }
    }
    if kinds.len() > cfg.max_objects {
        return Err(Error::prompt(
            &prompt.prompt,
            format!(
                "needs {} objects; scenes hold at most {}",
                kinds.len(),
                cfg.max_objects
            ),
        ));
    }
    let constraints: Vec<(usize, Relation, usize)> = prompt
        .include
        .iter()
        .enumerate()
        .filter_map(|(gi, r)| r.position.map(|(rel, t)| (gi, rel, t)))
        .collect();
    let threshold = JudgeConfig::geneval().position_threshold;
    let objects = place(rng, cfg, &kinds, |objs| {
        constraints.iter().all(|&(gi, rel, target)| {
            (0..objs.len()).filter(|&i| group[i] == gi).all(|i| {
                (0..objs.len())
                    .filter(|&j| group[j] == target)
                    .all(|j| clearly(&objs[i].bbox(), &objs[j].bbox(), rel, threshold))
            })
        })
    })
    .ok_or_else(|| Error::prompt(&prompt.prompt, "found no layout that satisfies it"))?;
    Ok(Scene {
        image_size: cfg.image_size,
        objects,
    })
}

/// `rel` holds by GenEval's rule even with `a` moved a pixel in any diagonal direction, so
/// the pixel-rounded boxes a detector reports still satisfy it.
pub(crate) fn clearly(a: &[f32; 4], b: &[f32; 4], rel: Relation, threshold: f32) -> bool {
    [(-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)]
        .iter()
        .all(|&(dx, dy)| {
            let moved = [a[0] + dx, a[1] + dy, a[2] + dx, a[3] + dy];
            relative_position(&moved, b, threshold).contains(&rel)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geneval::Tag;
    use crate::shapes::prompts::enumerate;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn every_prompt_has_a_scene_and_counts_are_exact() {
        let cfg = SceneConfig::default();
        for tag in Tag::ALL {
            for (k, p) in enumerate(tag).iter().enumerate() {
                let mut rng = ChaCha8Rng::seed_from_u64(k as u64);
                let s = scene_for_prompt(&mut rng, p, &cfg, 1).unwrap();
                for r in &p.include {
                    let n = s
                        .objects
                        .iter()
                        .filter(|o| o.shape.name() == r.class)
                        .count();
                    assert_eq!(n, r.count as usize, "{}", p.prompt);
                }
                assert!(s.objects.len() < 2 || s.min_gap() >= cfg.gap);
            }
        }
    }

    #[test]
    fn unknown_classes_are_errors() {
        let mut p = enumerate(Tag::SingleObject).remove(0);
        p.include[0].class = "dog".into();
        let err = scene_for_prompt(
            &mut ChaCha8Rng::seed_from_u64(0),
            &p,
            &SceneConfig::default(),
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("dog"), "{err}");
    }
}

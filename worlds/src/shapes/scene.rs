//! Scenes: a few coloured shapes placed without overlap on a square canvas.
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::heldout;
use super::palette::{Color, Shape};
use crate::error::{Error, Result};

/// One shape in a scene. Coordinates are in pixels of the rendered image; `size` is the side
/// of the shape's square bounding box (every shape fills its box edge to edge).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub cx: f32,
    pub cy: f32,
    pub size: f32,
}

impl Object {
    /// `[x0, y0, x1, y1]`, GenEval's box convention.
    pub fn bbox(&self) -> [f32; 4] {
        let h = self.size / 2.0;
        [self.cx - h, self.cy - h, self.cx + h, self.cy + h]
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    /// Side of the square canvas in pixels.
    pub image_size: u32,
    pub objects: Vec<Object>,
}

/// How scenes are drawn. The defaults are the world's: 32 px canvas, 1 to 4 objects of 8 to
/// 13 px (big enough to tell a triangle from a diamond at 32 px, small enough that four fit),
/// at least 2 px apart so same-coloured neighbours never touch, 1 px clear of the edges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SceneConfig {
    pub image_size: u32,
    pub min_objects: usize,
    pub max_objects: usize,
    pub min_size: f32,
    pub max_size: f32,
    /// Minimum gap between two objects' boxes.
    pub gap: f32,
    /// Minimum distance from a box to the canvas edge.
    pub margin: f32,
    /// Leave out the held-out colour x shape objects and class pairs (see [`heldout`]).
    pub exclude_held_out: bool,
}

impl Default for SceneConfig {
    fn default() -> Self {
        SceneConfig {
            image_size: 32,
            min_objects: 1,
            max_objects: 4,
            min_size: 8.0,
            max_size: 13.0,
            gap: 2.0,
            margin: 1.0,
            exclude_held_out: false,
        }
    }
}

impl SceneConfig {
    /// Checks the numbers make sense: sizes positive and ordered, object counts ordered and at
    /// most ten (captions count in words up to ten), the smallest object fits the canvas.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(format!("scene config: {msg}")));
        if !(self.min_size > 0.0 && self.min_size <= self.max_size) {
            return bad(format!(
                "need 0 < min_size <= max_size, got {} and {}",
                self.min_size, self.max_size
            ));
        }
        if self.min_objects > self.max_objects || self.max_objects > 10 {
            return bad(format!(
                "need min_objects <= max_objects <= 10, got {} and {}",
                self.min_objects, self.max_objects
            ));
        }
        if !(self.gap >= 0.0 && self.margin >= 0.0) {
            return bad(format!(
                "gap and margin must be >= 0, got {} and {}",
                self.gap, self.margin
            ));
        }
        if self.min_size + 2.0 * self.margin >= self.image_size as f32 {
            return bad(format!(
                "a {} px object with {} px margins does not fit a {} px image",
                self.min_size, self.margin, self.image_size
            ));
        }
        Ok(())
    }

    /// The training distribution: held-out combinations never appear.
    pub fn train() -> Self {
        SceneConfig {
            exclude_held_out: true,
            ..SceneConfig::default()
        }
    }
}

/// Attempts at one layout before the sizes are shrunk to the minimum, which always fits.
const LAYOUT_TRIES: usize = 200;

impl Scene {
    /// A random scene from `cfg`: the number of objects, each (shape, colour), size and
    /// position are drawn from `rng`, so the same seed gives the same scene. Errors when `cfg`
    /// is invalid or its objects do not fit the canvas.
    pub fn sample<R: Rng + ?Sized>(rng: &mut R, cfg: &SceneConfig) -> Result<Scene> {
        cfg.validate()?;
        let n = rng.gen_range(cfg.min_objects..=cfg.max_objects);
        let kinds = loop {
            let kinds: Vec<(Shape, Color)> = (0..n)
                .map(|_| loop {
                    let k = (
                        Shape::ALL[rng.gen_range(0..Shape::ALL.len())],
                        Color::ALL[rng.gen_range(0..Color::ALL.len())],
                    );
                    if !cfg.exclude_held_out || !heldout::is_held_out_object(k.0, k.1) {
                        break k;
                    }
                })
                .collect();
            let shapes: Vec<Shape> = kinds.iter().map(|k| k.0).collect();
            if !cfg.exclude_held_out || !heldout::has_held_out_pair(&shapes) {
                break kinds;
            }
        };
        let objects = place(rng, cfg, &kinds, |_| true).ok_or_else(|| {
            Error::Invalid(format!(
                "scene config: found no place for {n} objects of {} px {} px apart on a {} px canvas; \
                 lower max_objects or the sizes",
                cfg.min_size, cfg.gap, cfg.image_size
            ))
        })?;
        Ok(Scene {
            image_size: cfg.image_size,
            objects,
        })
    }

    /// The smallest gap between any two objects' boxes (the no-overlap invariant keeps it >= `gap`).
    pub fn min_gap(&self) -> f32 {
        let mut best = f32::INFINITY;
        for (i, a) in self.objects.iter().enumerate() {
            for b in &self.objects[i + 1..] {
                best = best.min(box_gap(&a.bbox(), &b.bbox()));
            }
        }
        best
    }
}

/// Chebyshev gap between two boxes: negative when they overlap.
pub fn box_gap(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let dx = (b[0] - a[2]).max(a[0] - b[2]);
    let dy = (b[1] - a[3]).max(a[1] - b[3]);
    dx.max(dy)
}

/// Places objects of the given kinds one by one at random sizes and positions, keeping `gap`
/// between boxes and `margin` from the edges, until `accept` likes the whole layout. Shrinks to the
/// minimum size after `LAYOUT_TRIES` failures; `None` if even that never satisfies `accept`.
pub(crate) fn place<R: Rng + ?Sized>(
    rng: &mut R,
    cfg: &SceneConfig,
    kinds: &[(Shape, Color)],
    accept: impl Fn(&[Object]) -> bool,
) -> Option<Vec<Object>> {
    let canvas = cfg.image_size as f32;
    for attempt in 0..2 * LAYOUT_TRIES {
        let shrink = attempt >= LAYOUT_TRIES;
        let mut objects: Vec<Object> = Vec::with_capacity(kinds.len());
        for &(shape, color) in kinds {
            let size = if shrink || cfg.max_size <= cfg.min_size {
                cfg.min_size
            } else {
                rng.gen_range(cfg.min_size..cfg.max_size)
            };
            let lo = size / 2.0 + cfg.margin;
            let hi = canvas - size / 2.0 - cfg.margin;
            if hi <= lo {
                return None;
            }
            let placed = (0..LAYOUT_TRIES).find_map(|_| {
                let o = Object {
                    shape,
                    color,
                    cx: rng.gen_range(lo..hi),
                    cy: rng.gen_range(lo..hi),
                    size,
                };
                let b = o.bbox();
                objects
                    .iter()
                    .all(|p| box_gap(&p.bbox(), &b) >= cfg.gap)
                    .then_some(o)
            });
            match placed {
                Some(o) => objects.push(o),
                None => break,
            }
        }
        if objects.len() == kinds.len() && accept(&objects) {
            return Some(objects);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn scenes_are_deterministic_and_never_overlap() {
        let cfg = SceneConfig::default();
        for seed in 0..300 {
            let a = Scene::sample(&mut ChaCha8Rng::seed_from_u64(seed), &cfg).unwrap();
            let b = Scene::sample(&mut ChaCha8Rng::seed_from_u64(seed), &cfg).unwrap();
            assert_eq!(a, b);
            assert!((1..=4).contains(&a.objects.len()));
            assert!(a.objects.len() < 2 || a.min_gap() >= cfg.gap, "seed {seed}");
            for o in &a.objects {
                let bb = o.bbox();
                assert!(
                    bb[0] >= cfg.margin
                        && bb[1] >= cfg.margin
                        && bb[2] <= 32.0 - cfg.margin
                        && bb[3] <= 32.0 - cfg.margin,
                    "seed {seed}: {o:?}"
                );
                assert!((cfg.min_size..=cfg.max_size).contains(&o.size));
            }
        }
    }

    #[test]
    fn impossible_configs_are_errors_not_panics() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let tiny = SceneConfig {
            image_size: 8,
            ..SceneConfig::default()
        };
        assert!(Scene::sample(&mut rng, &tiny)
            .unwrap_err()
            .to_string()
            .contains("does not fit"));
        let crowded = SceneConfig {
            min_objects: 10,
            max_objects: 10,
            ..SceneConfig::default()
        };
        assert!(Scene::sample(&mut rng, &crowded)
            .unwrap_err()
            .to_string()
            .contains("found no place"));
        let inverted = SceneConfig {
            min_size: 9.0,
            max_size: 8.0,
            ..SceneConfig::default()
        };
        assert!(inverted.validate().is_err());
        assert!(SceneConfig::train().validate().is_ok());
    }

    #[test]
    fn box_gap_measures_separation() {
        let a = [0.0, 0.0, 10.0, 10.0];
        assert_eq!(box_gap(&a, &[12.0, 0.0, 20.0, 10.0]), 2.0);
        assert_eq!(box_gap(&a, &[12.0, 15.0, 20.0, 20.0]), 5.0);
        assert!(box_gap(&a, &[5.0, 5.0, 20.0, 20.0]) < 0.0);
    }
}

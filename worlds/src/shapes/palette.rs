//! The shapes world's vocabulary of things: shapes, colours and the background.
//!
//! Colours use GenEval's names and sit far apart in RGB (nearest pair: blue/purple, 124 apart;
//! every colour is at least 220 from the white background), so a blurred or noisy sample still
//! falls nearest to the colour it was meant to be.
use serde::{Deserialize, Serialize};

/// Plain white: the background of every image.
pub const BACKGROUND: [u8; 3] = [255, 255, 255];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
}

impl Shape {
    pub const ALL: [Shape; 4] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Diamond,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
        }
    }

    /// GenEval's `make_plural`: every shape name here takes a plain "s".
    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Diamond => "diamonds",
        }
    }

    pub fn from_name(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether the point (u, v), in units of the shape's half-size around its centre (so the
    /// bounding box is [-1, 1]^2, v growing downwards), lies inside the shape. Every shape
    /// fills its bounding box edge to edge, so a detector can compare a blob with each shape
    /// drawn in the blob's own box.
    pub fn contains(self, u: f32, v: f32) -> bool {
        match self {
            Shape::Circle => u * u + v * v <= 1.0,
            Shape::Square => u.abs() <= 1.0 && v.abs() <= 1.0,
            // Apex up, base down: half-width grows linearly from 0 at v = -1 to 1 at v = 1.
            Shape::Triangle => (-1.0..=1.0).contains(&v) && u.abs() <= (v + 1.0) / 2.0,
            Shape::Diamond => u.abs() + v.abs() <= 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
}

impl Color {
    pub const ALL: [Color; 5] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
        }
    }

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 30, 30],
            Color::Green => [30, 160, 50],
            Color::Blue => [30, 70, 220],
            Color::Yellow => [240, 200, 20],
            Color::Purple => [140, 40, 170],
        }
    }

    pub fn from_name(name: &str) -> Option<Color> {
        Color::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// Euclidean distance in RGB.
pub fn rgb_distance(a: [u8; 3], b: [u8; 3]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, y)| {
            let d = x as f32 - y as f32;
            d * d
        })
        .sum::<f32>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_far_apart_and_far_from_the_background() {
        for (i, a) in Color::ALL.iter().enumerate() {
            assert!(rgb_distance(a.rgb(), BACKGROUND) >= 220.0, "{a:?}");
            for b in &Color::ALL[i + 1..] {
                assert!(rgb_distance(a.rgb(), b.rgb()) >= 120.0, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for s in Shape::ALL {
            assert_eq!(Shape::from_name(s.name()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.name())
            );
        }
        for c in Color::ALL {
            assert_eq!(Color::from_name(c.name()), Some(c));
        }
        assert_eq!(Shape::from_name("dog"), None);
    }

    #[test]
    fn shapes_fill_their_box_edge_to_edge() {
        for s in Shape::ALL {
            // Every shape touches all four sides of [-1, 1]^2 ...
            let touches = |f: &dyn Fn(f32) -> (f32, f32)| {
                (0..=200).any(|i| {
                    let (u, v) = f(-1.0 + i as f32 / 100.0);
                    s.contains(u, v)
                })
            };
            assert!(touches(&|t| (t, -1.0)) || s == Shape::Triangle, "{s:?} top");
            assert!(touches(&|t| (t, 1.0)), "{s:?} bottom");
            assert!(touches(&|t| (-1.0, t)), "{s:?} left");
            assert!(touches(&|t| (1.0, t)), "{s:?} right");
            // ... and nothing outside it.
            assert!(!s.contains(1.01, 0.0) && !s.contains(0.0, 1.01));
        }
        // The triangle's apex is the single top point.
        assert!(Shape::Triangle.contains(0.0, -1.0));
        assert!(!Shape::Triangle.contains(0.1, -1.0));
    }
}

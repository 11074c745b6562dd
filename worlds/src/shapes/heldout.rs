//! Combinations the training split never shows, so the evaluation prompts can test
//! compositional generalisation. Fixed by design, not drawn: a result quoted on "held-out
//! prompts" means the same thing in every run.
//!
//! - Colour x shape objects: each of the four shapes is held out with one colour (and each of
//!   red, green, blue, yellow once), so every held-out object is made of a colour and a shape
//!   that training shows many times, only never together.
//! - Class pair: circle and triangle never share a training image.
use super::palette::{Color, Shape};

pub const HELD_OUT_OBJECTS: [(Color, Shape); 4] = [
    (Color::Red, Shape::Triangle),
    (Color::Green, Shape::Square),
    (Color::Blue, Shape::Circle),
    (Color::Yellow, Shape::Diamond),
];

pub const HELD_OUT_PAIR: (Shape, Shape) = (Shape::Circle, Shape::Triangle);

pub fn is_held_out_object(shape: Shape, color: Color) -> bool {
    HELD_OUT_OBJECTS.contains(&(color, shape))
}

/// Whether both shapes of the held-out pair occur among `shapes`.
pub fn has_held_out_pair(shapes: &[Shape]) -> bool {
    shapes.contains(&HELD_OUT_PAIR.0) && shapes.contains(&HELD_OUT_PAIR.1)
}

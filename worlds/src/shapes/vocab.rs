//! Every word a caption or evaluation prompt of this world can use, for a word-level
//! tokenizer. Captions and prompts are lower case, without punctuation, split on spaces.
use super::captions::NUMBERS;
use super::palette::{Color, Shape};

const FUNCTION_WORDS: [&str; 12] = [
    "a", "an", "photo", "of", "and", "there", "is", "are", "nothing", "left", "right", "above",
];

/// The vocabulary in a fixed order: function words, relations, numbers, colours, shapes.
pub fn vocabulary() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = FUNCTION_WORDS.to_vec();
    v.push("below");
    v.extend(NUMBERS);
    v.extend(Color::ALL.iter().map(|c| c.name()));
    for s in Shape::ALL {
        v.push(s.name());
        v.push(s.plural());
    }
    v
}

//! What a caption says about how many of which object: "a photo of three cats" -> cat = 3,
//! "two red squares and a blue square" -> square = 3, "a dog and two bikes" -> dog = 1,
//! bicycle = 2. A quantity (a number word up to twenty, digits, "a" / "an") followed within a
//! few words (colours, adjectives) by a class name (singular, plural or a synonym) is one
//! mention; mentions of one class add up. Captions that relate two objects in space ("left
//! of", "above") are skipped: they name a pair, not every object of the scene.
use std::collections::BTreeMap;

/// Number words up to twenty (GenEval's counting prompts use two to four).
const NUMBERS: [&str; 21] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];

/// Words after which a quantity no longer looks for its noun.
const STOP: [&str; 8] = ["and", "of", "with", "on", "in", "next", "near", "or"];

/// Phrases of a spatial relation (GenEval's position prompts, the shapes world's captions).
const RELATIONS: [&str; 6] = [
    "left of",
    "right of",
    "above",
    "below",
    "on top of",
    "under",
];

/// How far past the quantity its noun may be ("two small red cats").
const MAX_GAP: usize = 3;

/// Common other names of COCO's classes (GenEval prompts use the class names themselves).
const SYNONYMS: [(&str, &[&str]); 24] = [
    (
        "person",
        &[
            "people", "man", "men", "woman", "women", "boy", "boys", "girl", "girls", "child",
            "children", "kid", "kids", "persons",
        ],
    ),
    ("bicycle", &["bike", "bikes"]),
    ("motorcycle", &["motorbike", "motorbikes"]),
    (
        "airplane",
        &["plane", "planes", "aeroplane", "aeroplanes", "jet", "jets"],
    ),
    ("car", &["automobile", "automobiles"]),
    ("couch", &["sofa", "sofas"]),
    (
        "tv",
        &[
            "television",
            "televisions",
            "tvs",
            "tv monitor",
            "tv monitors",
        ],
    ),
    (
        "cell phone",
        &[
            "phone",
            "phones",
            "cellphone",
            "cellphones",
            "mobile phone",
            "mobile phones",
        ],
    ),
    ("dining table", &["table", "tables"]),
    (
        "potted plant",
        &["plant", "plants", "houseplant", "houseplants"],
    ),
    ("sports ball", &["ball", "balls"]),
    (
        "hair drier",
        &["hair dryer", "hair dryers", "hairdryer", "hairdryers"],
    ),
    ("donut", &["doughnut", "doughnuts"]),
    ("cup", &["mug", "mugs"]),
    ("handbag", &["purse", "purses"]),
    ("laptop", &["laptop computer", "laptop computers"]),
    ("mouse", &["computer mouse"]),
    ("remote", &["remote control", "remote controls"]),
    ("bus", &["busses"]),
    ("boat", &["ship", "ships"]),
    ("wine glass", &["glass of wine"]),
    ("teddy bear", &["teddy", "teddies"]),
    ("skis", &["ski"]),
    ("fire hydrant", &["hydrant", "hydrants"]),
];

/// The English plural of a class name (the last word), with COCO's irregular ones.
pub fn plural(name: &str) -> String {
    let (head, last) = match name.rsplit_once(' ') {
        Some((h, l)) => (format!("{h} "), l),
        None => (String::new(), name),
    };
    let irregular = match last {
        "person" => Some("people"),
        "mouse" => Some("mice"),
        "knife" => Some("knives"),
        "sheep" | "skis" | "scissors" => Some(last),
        _ => None,
    };
    let p = match irregular {
        Some(p) => p.to_string(),
        None if ["s", "x", "ch", "sh", "z"]
            .iter()
            .any(|e| last.ends_with(e)) =>
        {
            format!("{last}es")
        }
        None if last.ends_with('y')
            && !last.ends_with("ay")
            && !last.ends_with("ey")
            && !last.ends_with("oy") =>
        {
            format!("{}ies", &last[..last.len() - 1])
        }
        None => format!("{last}s"),
    };
    format!("{head}{p}")
}

/// A parser for the classes of one detector.
#[derive(Debug, Clone)]
pub struct CaptionCounter {
    /// Every surface form (lower case, words joined by one space) to its class index.
    forms: BTreeMap<String, usize>,
    /// The longest form, in words.
    longest: usize,
}

impl CaptionCounter {
    /// Forms for each class: its name, plural, and the synonyms listed for it.
    pub fn new(classes: &[String]) -> Self {
        let mut forms = BTreeMap::new();
        for (i, c) in classes.iter().enumerate() {
            let c = c.trim().to_lowercase();
            if c.is_empty() {
                continue;
            }
            let p = plural(&c);
            forms.entry(p).or_insert(i);
            if let Some((_, syn)) = SYNONYMS.iter().find(|(n, _)| *n == c) {
                for s in *syn {
                    forms.entry((*s).to_string()).or_insert(i);
                }
            }
            // The class's own name wins over another class's synonym ("table").
            forms.insert(c, i);
        }
        let longest = forms
            .keys()
            .map(|f| f.split(' ').count())
            .max()
            .unwrap_or(1);
        Self { forms, longest }
    }

    /// (class, count) for each class the caption counts, or an empty list.
    pub fn parse(&self, caption: &str) -> Vec<(usize, u32)> {
        let text: String = caption
            .to_lowercase()
            .chars()
            .map(|c| if c.is_alphanumeric() { c } else { ' ' })
            .collect();
        let words: Vec<&str> = text.split_whitespace().collect();
        let joined = format!(" {} ", words.join(" "));
        if RELATIONS.iter().any(|r| joined.contains(&format!(" {r} "))) {
            return Vec::new();
        }
        let mut counts: BTreeMap<usize, u32> = BTreeMap::new();
        let mut i = 0;
        while i < words.len() {
            let Some(n) = quantity(words[i]) else {
                i += 1;
                continue;
            };
            match self.noun_after(&words, i + 1) {
                Some((class, end)) => {
                    *counts.entry(class).or_default() += n;
                    i = end;
                }
                None => i += 1,
            }
        }
        counts.into_iter().collect()
    }

    /// The first class form within `MAX_GAP` words from `start` (longest form first), and
    /// the index past it.
    fn noun_after(&self, words: &[&str], start: usize) -> Option<(usize, usize)> {
        for at in start..(start + MAX_GAP + 1).min(words.len()) {
            if STOP.contains(&words[at]) || quantity(words[at]).is_some() && at > start {
                return None;
            }
            for len in (1..=self.longest.min(words.len() - at)).rev() {
                let form = words[at..at + len].join(" ");
                if let Some(&c) = self.forms.get(&form) {
                    return Some((c, at + len));
                }
            }
        }
        None
    }
}

fn quantity(word: &str) -> Option<u32> {
    match word {
        "a" | "an" => Some(1),
        w => NUMBERS
            .iter()
            .position(|n| *n == w)
            .map(|n| n as u32)
            .or_else(|| w.parse::<u32>().ok().filter(|n| *n <= 1000)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COCO: [&str; 21] = [
        "person",
        "bicycle",
        "car",
        "dog",
        "cat",
        "dining table",
        "hot dog",
        "wine glass",
        "bus",
        "sheep",
        "teddy bear",
        "bench",
        "giraffe",
        "knife",
        "cell phone",
        "mouse",
        "potted plant",
        "tv",
        "skis",
        "toothbrush",
        "hair drier",
    ];

    fn coco() -> CaptionCounter {
        CaptionCounter::new(&COCO.map(String::from))
    }

    /// The parse with class names instead of indices.
    fn named(c: &CaptionCounter, s: &str) -> Vec<(String, u32)> {
        c.parse(s)
            .into_iter()
            .map(|(i, n)| (COCO[i].to_string(), n))
            .collect()
    }

    #[test]
    fn geneval_counting_prompts() {
        let c = coco();
        let p = |s: &str| named(&c, s);
        assert_eq!(p("a photo of three cats"), [("cat".into(), 3)]);
        assert_eq!(
            p("a photo of two dining tables"),
            [("dining table".into(), 2)]
        );
        assert_eq!(p("a photo of four hot dogs"), [("hot dog".into(), 4)]);
        assert_eq!(p("a photo of two wine glasses"), [("wine glass".into(), 2)]);
        assert_eq!(p("a photo of three buses"), [("bus".into(), 3)]);
        assert_eq!(p("a photo of four sheep"), [("sheep".into(), 4)]);
        assert_eq!(p("a photo of two knives"), [("knife".into(), 2)]);
        assert_eq!(
            p("a photo of three teddy bears"),
            [("teddy bear".into(), 3)]
        );
        assert_eq!(p("a photo of four benches"), [("bench".into(), 4)]);
        assert_eq!(p("a photo of two cell phones"), [("cell phone".into(), 2)]);
        assert_eq!(p("a photo of three mice"), [("mouse".into(), 3)]);
        assert_eq!(p("a photo of two toothbrushes"), [("toothbrush".into(), 2)]);
        assert_eq!(p("a photo of four hair driers"), [("hair drier".into(), 4)]);
        assert_eq!(p("a photo of two skis"), [("skis".into(), 2)]);
        assert_eq!(p("a photo of a giraffe"), [("giraffe".into(), 1)]);
    }

    #[test]
    fn synonyms_digits_adjectives_and_sums() {
        let c = coco();
        let p = |s: &str| named(&c, s);
        assert_eq!(
            p("Two men riding 3 bikes."),
            [("person".into(), 2), ("bicycle".into(), 3)]
        );
        assert_eq!(p("an old brown dog and a dog"), [("dog".into(), 2)]);
        assert_eq!(p("a tv and a television"), [("tv".into(), 2)]);
        assert_eq!(p("a photo of a sofa"), Vec::<(String, u32)>::new());
        assert_eq!(p("a dog left of a cat"), Vec::<(String, u32)>::new());
        assert_eq!(p("a photo of a dog"), [("dog".into(), 1)]);
        assert_eq!(p("some dogs on a bench"), [("bench".into(), 1)]);
        assert_eq!(p(""), Vec::<(String, u32)>::new());
    }

    #[test]
    fn shapes_world_captions() {
        let c = CaptionCounter::new(&["circle", "square", "triangle", "diamond"].map(String::from));
        assert_eq!(
            c.parse("a photo of two red squares and a blue square"),
            [(1, 3)]
        );
        assert_eq!(
            c.parse("one blue circle and two green diamonds"),
            [(0, 1), (3, 2)]
        );
        assert_eq!(c.parse("there are three triangles"), [(2, 3)]);
        assert_eq!(c.parse("a red circle above a square"), []);
        assert_eq!(c.parse("a photo of nothing"), []);
    }

    #[test]
    fn plurals() {
        for (s, p) in [
            ("bus", "buses"),
            ("person", "people"),
            ("wine glass", "wine glasses"),
            ("toothbrush", "toothbrushes"),
            ("baby", "babies"),
            ("toy", "toys"),
            ("knife", "knives"),
            ("giraffe", "giraffes"),
        ] {
            assert_eq!(plural(s), p);
        }
    }
}

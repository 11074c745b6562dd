//! Editing tasks with ground truth: a source scene, one change (an object's colour, its shape,
//! the number of objects of one kind, or where an object is), the target scene that change
//! makes, and the GenEval prompt the exact scorer judges the edited image by. Every scene has
//! one bystander the edit must leave alone.
//!
//! Task `i` of a kind depends on (seed, kind, i) alone. A drawn task is kept only when the
//! scorer judges the rendered source right for its own prompt and wrong for the target
//! prompt, and the rendered ground truth right for the target prompt: the edit is needed, and
//! possible.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::captions::{noun_phrase, PHOTO_PREFIX};
use super::oracle::{clearly, scene_for_prompt};
use super::palette::{Color, Shape};
use super::render::render;
use super::scene::{box_gap, Object, Scene, SceneConfig};
use super::scorer::{score_image_with, ScorerConfig};
use crate::error::{Error, Result};
use crate::geneval::{EvalPrompt, Exclusion, JudgeConfig, Relation, Requirement, Tag};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EditKind {
    Color,
    Shape,
    Count,
    Move,
}

impl EditKind {
    pub const ALL: [EditKind; 4] = [
        EditKind::Color,
        EditKind::Shape,
        EditKind::Count,
        EditKind::Move,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EditKind::Color => "color",
            EditKind::Shape => "shape",
            EditKind::Count => "count",
            EditKind::Move => "move",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditTask {
    pub kind: EditKind,
    pub source: Scene,
    /// The ground truth: the source with the edit made.
    pub target: Scene,
    /// Objects of `source` the edit changes, moves or removes.
    pub edited: Vec<usize>,
    /// Objects of `target` the edit changed, moved or added.
    pub target_edited: Vec<usize>,
    pub source_prompt: String,
    /// What the edited image must show, as the scorer judges it; its `prompt` is the edit's
    /// target prompt.
    pub target_prompt: EvalPrompt,
}

impl EditTask {
    /// Source objects the edit must leave where and as they were.
    pub fn bystanders(&self) -> Vec<usize> {
        (0..self.source.objects.len())
            .filter(|i| !self.edited.contains(i))
            .collect()
    }
}

/// Draws per task before giving up (a draw is rejected when the oracle checks fail).
const TRIES: usize = 200;

/// `per_kind` tasks of each kind, kinds in [`EditKind::ALL`] order.
pub fn edit_tasks(seed: u64, per_kind: usize) -> Result<Vec<EditTask>> {
    let mut out = Vec::with_capacity(4 * per_kind);
    for (k, kind) in EditKind::ALL.into_iter().enumerate() {
        for i in 0..per_kind {
            out.push(edit_task(seed, kind, (k * 1_000_000 + i) as u64)?);
        }
    }
    Ok(out)
}

/// One task of `kind`, from stream `stream` of `seed`.
pub fn edit_task(seed: u64, kind: EditKind, stream: u64) -> Result<EditTask> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let cfg = ScorerConfig::default();
    for _ in 0..TRIES {
        let Some(d) = draw(&mut rng, kind)? else {
            continue;
        };
        let src = render(&d.task.source, d.task.source.image_size);
        let tgt = render(&d.task.target, d.task.target.image_size);
        let t = &d.task.target_prompt;
        if score_image_with(&src, &d.source_check, &cfg).correct
            && !score_image_with(&src, t, &cfg).correct
            && score_image_with(&tgt, t, &cfg).correct
        {
            return Ok(d.task);
        }
    }
    Err(Error::Invalid(format!(
        "edit task {} stream {stream}: no draw passed the scorer's checks in {TRIES} tries",
        kind.name()
    )))
}

/// A drawn task and the prompt its source must satisfy.
struct Drawn {
    task: EditTask,
    source_check: EvalPrompt,
}

fn pick<T: Copy, R: Rng + ?Sized>(rng: &mut R, from: &[T]) -> T {
    from[rng.gen_range(0..from.len())]
}

fn req(shape: Shape, count: u32, color: Color, position: Option<(Relation, usize)>) -> Requirement {
    Requirement {
        class: shape.name().into(),
        count,
        color: Some(color.name().into()),
        position,
    }
}

fn prompt(
    tag: Tag,
    include: Vec<Requirement>,
    exclude: Vec<Exclusion>,
    text: String,
) -> EvalPrompt {
    EvalPrompt {
        tag,
        include,
        exclude,
        prompt: format!("{PHOTO_PREFIX} {text}"),
        held_out: None,
    }
}

/// "a red circle and a blue square" for two single objects.
fn pair_text(a: (Shape, Color), b: (Shape, Color)) -> String {
    format!(
        "{} and {}",
        noun_phrase(1, Some(a.1), a.0, false),
        noun_phrase(1, Some(b.1), b.0, false)
    )
}

fn draw<R: Rng + ?Sized>(rng: &mut R, kind: EditKind) -> Result<Option<Drawn>> {
    let cfg = SceneConfig::default();
    let s0 = pick(rng, &Shape::ALL);
    let others: Vec<Shape> = Shape::ALL.into_iter().filter(|&s| s != s0).collect();
    let s1 = pick(rng, &others);
    let c0 = pick(rng, &Color::ALL);
    let c1 = pick(rng, &Color::ALL);
    let two = |a: (Shape, Color), b: (Shape, Color)| {
        prompt(
            Tag::ColorAttr,
            vec![req(a.0, 1, a.1, None), req(b.0, 1, b.1, None)],
            vec![],
            pair_text(a, b),
        )
    };
    let (source_check, source, target, edited, target_edited, target_prompt) = match kind {
        EditKind::Color | EditKind::Shape => {
            let check = two((s0, c0), (s1, c1));
            let source = scene_for_prompt(rng, &check, &cfg, 0)?;
            let mut target = source.clone();
            let (s0t, c0t) = if kind == EditKind::Color {
                let new: Vec<Color> = Color::ALL.into_iter().filter(|&c| c != c0).collect();
                (s0, pick(rng, &new))
            } else {
                let new: Vec<Shape> = Shape::ALL
                    .into_iter()
                    .filter(|&s| s != s0 && s != s1)
                    .collect();
                (pick(rng, &new), c0)
            };
            target.objects[0].shape = s0t;
            target.objects[0].color = c0t;
            let tp = two((s0t, c0t), (s1, c1));
            (check, source, target, vec![0], vec![0], tp)
        }
        EditKind::Count => {
            let n = rng.gen_range(1..=3u32);
            let choices: Vec<u32> = (1..=3).filter(|&m| m != n).collect();
            let m = pick(rng, &choices);
            let text = |k: u32| {
                format!(
                    "{} and {}",
                    noun_phrase(k as usize, Some(c0), s0, false),
                    noun_phrase(1, Some(c1), s1, false)
                )
            };
            let counted = |k: u32| {
                prompt(
                    Tag::Counting,
                    vec![req(s0, k, c0, None), req(s1, 1, c1, None)],
                    vec![Exclusion {
                        class: s0.name().into(),
                        count: k + 1,
                    }],
                    text(k),
                )
            };
            let check = counted(n);
            let source = scene_for_prompt(rng, &check, &cfg, 0)?;
            let mut target = source.clone();
            let (edited, target_edited) = if m < n {
                // scene_for_prompt lays out the include clauses in order: the counted kind first.
                let gone: Vec<usize> = (m as usize..n as usize).collect();
                target.objects = source
                    .objects
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !gone.contains(i))
                    .map(|(_, o)| *o)
                    .collect();
                (gone, vec![])
            } else {
                let size = source.objects[0].size;
                let mut added = Vec::new();
                for _ in n..m {
                    let proto = Object {
                        shape: s0,
                        color: c0,
                        cx: 0.0,
                        cy: 0.0,
                        size,
                    };
                    let Some(o) = place_one(rng, &cfg, &target.objects, proto, |_| true) else {
                        return Ok(None);
                    };
                    added.push(target.objects.len());
                    target.objects.push(o);
                }
                (vec![], added)
            };
            (check, source, target, edited, target_edited, counted(m))
        }
        EditKind::Move => {
            let rel = pick(rng, &Relation::ALL);
            let placed = |r: Relation| {
                let text = format!(
                    "{} {} {}",
                    noun_phrase(1, Some(c0), s0, false),
                    r.phrase(),
                    noun_phrase(1, Some(c1), s1, false)
                );
                // GenEval lists the reference object first and points the subject at it.
                prompt(
                    Tag::Position,
                    vec![req(s1, 1, c1, None), req(s0, 1, c0, Some((r, 0)))],
                    vec![],
                    text,
                )
            };
            let check = placed(rel);
            let Some((source, target)) = move_scenes(rng, &cfg, (s1, c1), (s0, c0), rel) else {
                return Ok(None);
            };
            let new_rel = rel.opposite();
            (check, source, target, vec![1], vec![1], placed(new_rel))
        }
    };
    Ok(Some(Drawn {
        task: EditTask {
            kind,
            source,
            target,
            edited,
            target_edited,
            source_prompt: source_check.prompt.clone(),
            target_prompt,
        },
        source_check,
    }))
}

/// The source and target scenes of a move: `anchor` near the middle of the canvas along the
/// relation's axis, `subject` clearly at `rel` of it in the source and clearly at the opposite
/// side in the target. Why not the oracle's layout: it puts the pair wherever it fits, so the
/// anchor usually sits against the edge the subject must move past, and on a 32 px canvas an
/// object of the world's usual sizes (8-13 px) has no room there. Both objects are drawn at
/// the small end of the world's sizes, so that the anchor leaves room on both sides.
fn move_scenes<R: Rng + ?Sized>(
    rng: &mut R,
    cfg: &SceneConfig,
    anchor: (Shape, Color),
    subject: (Shape, Color),
    rel: Relation,
) -> Option<(Scene, Scene)> {
    let threshold = JudgeConfig::geneval().position_threshold;
    let small = |rng: &mut R| rng.gen_range(cfg.min_size..=cfg.min_size + 1.5);
    let middle = cfg.image_size as f32 / 2.0;
    let horizontal = matches!(rel, Relation::LeftOf | Relation::RightOf);
    let proto = |(shape, color): (Shape, Color), size| Object {
        shape,
        color,
        cx: 0.0,
        cy: 0.0,
        size,
    };
    let anchor_size = small(rng);
    let a = place_one(rng, cfg, &[], proto(anchor, anchor_size), |o| {
        let along = if horizontal { o.cx } else { o.cy };
        (along - middle).abs() <= 1.5
    })?;
    let subject_size = small(rng);
    let sub = proto(subject, subject_size);
    let at = |rng: &mut R, r: Relation| {
        place_one(rng, cfg, &[a], sub, |o| {
            clearly(&o.bbox(), &a.bbox(), r, threshold)
        })
    };
    let before = at(rng, rel)?;
    let after = at(rng, rel.opposite())?;
    let scene = |o: Object| Scene {
        image_size: cfg.image_size,
        objects: vec![a, o],
    };
    Some((scene(before), scene(after)))
}

/// `proto` (its shape, colour and size) at a random position clear of `others` by the
/// config's gap and margin, where `accept` likes it; `None` after many tries.
fn place_one<R: Rng + ?Sized>(
    rng: &mut R,
    cfg: &SceneConfig,
    others: &[Object],
    proto: Object,
    accept: impl Fn(&Object) -> bool,
) -> Option<Object> {
    let canvas = cfg.image_size as f32;
    let lo = proto.size / 2.0 + cfg.margin;
    let hi = canvas - proto.size / 2.0 - cfg.margin;
    if hi <= lo {
        return None;
    }
    (0..2000).find_map(|_| {
        let o = Object {
            cx: rng.gen_range(lo..hi),
            cy: rng.gen_range(lo..hi),
            ..proto
        };
        let clear = others
            .iter()
            .all(|p| box_gap(&p.bbox(), &o.bbox()) >= cfg.gap);
        (clear && accept(&o)).then_some(o)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_seeded_and_need_and_allow_their_edit() {
        let cfg = ScorerConfig::default();
        let a = edit_tasks(0, 6).unwrap();
        assert_eq!(a, edit_tasks(0, 6).unwrap());
        assert_ne!(a, edit_tasks(1, 6).unwrap());
        assert_eq!(a.len(), 24);
        for t in &a {
            let src = render(&t.source, 32);
            let tgt = render(&t.target, 32);
            assert!(
                score_image_with(&tgt, &t.target_prompt, &cfg).correct,
                "{t:?}"
            );
            assert!(
                !score_image_with(&src, &t.target_prompt, &cfg).correct,
                "{t:?}"
            );
            assert!(!t.bystanders().is_empty(), "{t:?}");
            assert_ne!(t.source_prompt, t.target_prompt.prompt);
            t.target_prompt.validate().unwrap();
        }
        let kinds: Vec<EditKind> = a.iter().map(|t| t.kind).collect();
        assert_eq!(kinds[0], EditKind::Color);
        assert_eq!(kinds[23], EditKind::Move);
        // A longer list extends a shorter one.
        assert_eq!(edit_tasks(0, 7).unwrap()[0], a[0]);
    }
}

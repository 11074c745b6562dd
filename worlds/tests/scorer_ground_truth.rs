//! The scorer on ground truth: renders of scenes that satisfy each evaluation prompt must be
//! judged correct, and renders of near misses (wrong count, colour, position, object) must be
//! judged incorrect, in every GenEval category.
use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use softalign_worlds::geneval::{EvalPrompt, Tag};
use softalign_worlds::shapes::prompts::enumerate;
use softalign_worlds::shapes::{render, scene_for_prompt, score_image, Color, SceneConfig, Shape};

const SEEDS: u64 = 6;

fn rng(tag: Tag, k: usize, seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64((tag as u64) << 40 | (k as u64) << 16 | seed)
}

#[test]
fn ground_truth_renders_are_judged_correct_in_every_category() {
    let cfg = SceneConfig::default();
    let mut failures = Vec::new();
    println!("ground truth: correct / judged per category (every prompt x {SEEDS} seeds, half with a distractor)");
    for tag in Tag::ALL {
        let (mut ok, mut n) = (0usize, 0usize);
        for (k, p) in enumerate(tag).iter().enumerate() {
            for seed in 0..SEEDS {
                let mut r = rng(tag, k, seed);
                let scene = scene_for_prompt(&mut r, p, &cfg, (seed % 2) as usize).unwrap();
                let j = score_image(&render(&scene, 32), p);
                n += 1;
                if j.correct {
                    ok += 1;
                } else {
                    failures.push(format!(
                        "{} (seed {seed}): {} | {:?}",
                        p.prompt, j.reason, scene.objects
                    ));
                }
            }
        }
        let acc = ok as f64 / n as f64;
        println!(
            "  {:<14} {ok:>4} / {n:<4} = {:.2}%",
            tag.name(),
            100.0 * acc
        );
        assert!(acc >= 0.99, "{tag}: {acc}\n{}", failures.join("\n"));
    }
    for f in failures.iter().take(10) {
        println!("  failure: {f}");
    }
}

/// The prompt a near miss is drawn from, per category: it must fail the original prompt.
fn near_misses(p: &EvalPrompt) -> Vec<(&'static str, EvalPrompt)> {
    let mut out = Vec::new();
    let other_color = |c: &str| {
        let i = Color::ALL.iter().position(|x| x.name() == c).unwrap();
        Color::ALL[(i + 1) % Color::ALL.len()].name().to_string()
    };
    let other_shape = |s: &str| {
        let i = Shape::ALL.iter().position(|x| x.name() == s).unwrap();
        Shape::ALL[(i + 1) % Shape::ALL.len()].name().to_string()
    };
    match p.tag {
        Tag::SingleObject => {
            let mut q = p.clone();
            q.include[0].class = other_shape(&p.include[0].class);
            out.push(("wrong object", q));
        }
        Tag::TwoObject => {
            let mut q = p.clone();
            q.include.truncate(1);
            out.push(("one object missing", q));
        }
        Tag::Counting => {
            let n = p.include[0].count;
            for m in [n - 1, n + 1] {
                if (1..=4).contains(&m) {
                    let mut q = p.clone();
                    q.include[0].count = m;
                    q.exclude[0].count = m + 1;
                    out.push(("wrong count", q));
                }
            }
        }
        Tag::Colors => {
            let mut q = p.clone();
            q.include[0].color = Some(other_color(p.include[0].color.as_deref().unwrap()));
            out.push(("wrong colour", q));
        }
        Tag::Position => {
            let mut q = p.clone();
            let (rel, t) = p.include[1].position.unwrap();
            q.include[1].position = Some((rel.opposite(), t));
            out.push(("swapped position", q));
        }
        Tag::ColorAttr => {
            let mut q = p.clone();
            q.include[0].color = p.include[1].color.clone();
            q.include[1].color = p.include[0].color.clone();
            out.push(("swapped colours", q));
        }
    }
    out
}

#[test]
fn near_misses_are_judged_incorrect_in_every_category() {
    let cfg = SceneConfig::default();
    let mut by_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for tag in Tag::ALL {
        for (k, p) in enumerate(tag).iter().enumerate() {
            for (kind, q) in near_misses(p) {
                for seed in 0..SEEDS / 2 {
                    let scene =
                        scene_for_prompt(&mut rng(tag, k, 100 + seed), &q, &cfg, 0).unwrap();
                    let j = score_image(&render(&scene, 32), p);
                    let e = by_kind.entry(kind).or_default();
                    e.1 += 1;
                    if !j.correct {
                        e.0 += 1;
                        assert!(
                            !j.reason.is_empty(),
                            "{}: a failed judgement must say why",
                            p.prompt
                        );
                    } else {
                        failures.push(format!(
                            "{} judged correct on a render of `{}`",
                            p.prompt, q.prompt
                        ));
                    }
                }
            }
        }
    }
    println!("near misses: judged incorrect / judged");
    for (kind, (bad, n)) in &by_kind {
        println!("  {kind:<18} {bad:>4} / {n}");
        assert!(
            *bad as f64 >= 0.99 * *n as f64,
            "{kind}\n{}",
            failures.join("\n")
        );
    }
    assert_eq!(by_kind.len(), 6);
}

#[test]
fn reasons_say_what_went_wrong() {
    let cfg = SceneConfig::default();
    let counting = enumerate(Tag::Counting);
    let three = counting
        .iter()
        .find(|p| p.prompt == "a photo of three squares")
        .unwrap();
    let mut four = three.clone();
    four.include[0].count = 4;
    four.exclude[0].count = 5;
    let scene = scene_for_prompt(&mut ChaCha8Rng::seed_from_u64(1), &four, &cfg, 0).unwrap();
    let j = score_image(&render(&scene, 32), three);
    assert_eq!(j.reason, "expected square<4, found 4");
    assert_eq!(j.detected["square"].len(), 4);

    let colors = enumerate(Tag::Colors);
    let red = colors
        .iter()
        .find(|p| p.prompt == "a photo of a red circle")
        .unwrap();
    let mut purple = red.clone();
    purple.include[0].color = Some("purple".into());
    let scene = scene_for_prompt(&mut ChaCha8Rng::seed_from_u64(2), &purple, &cfg, 0).unwrap();
    let j = score_image(&render(&scene, 32), red);
    assert_eq!(
        j.reason,
        "expected red circle>=1, found 0 red; and 1 purple"
    );
}

/// What a small diffusion model's samples look like at best: soft edges and pixel noise.
/// Blur with the binomial kernel [1, 2, 1] / 4 along each axis, then add uniform noise.
fn degrade(img: &image::RgbImage, noise: i32, rng: &mut ChaCha8Rng) -> image::RgbImage {
    use rand::Rng;
    let (w, h) = img.dimensions();
    let at = |x: i64, y: i64, c: usize| {
        img.get_pixel(
            x.clamp(0, w as i64 - 1) as u32,
            y.clamp(0, h as i64 - 1) as u32,
        )
        .0[c] as f32
    };
    let k = [(-1i64, 0.25f32), (0, 0.5), (1, 0.25)];
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb(std::array::from_fn(|c| {
            let mut v = 0.0;
            for (dy, wy) in k {
                for (dx, wx) in k {
                    v += wx * wy * at(x as i64 + dx, y as i64 + dy, c);
                }
            }
            (v + rng.gen_range(-noise..=noise) as f32)
                .round()
                .clamp(0.0, 255.0) as u8
        }))
    })
}

/// Two levels: one blur pass with +-24 noise, about what a small model's sharpest samples
/// look like, must stay >= 95% per category; two passes with +-32 (sigma about 1 px) is where
/// the smallest diamonds start to dissolve, recorded here so a regression shows.
#[test]
fn blurred_noisy_ground_truth_is_still_judged_correct() {
    let cfg = SceneConfig::default();
    for (passes, noise, floor) in [(1, 24, 0.95), (2, 32, 0.85)] {
        println!("ground truth blurred {passes}x, noise +-{noise}: correct / judged per category");
        let mut accs = Vec::new();
        for tag in Tag::ALL {
            let (mut ok, mut n) = (0usize, 0usize);
            let mut failures = Vec::new();
            for (k, p) in enumerate(tag).iter().enumerate() {
                for seed in 0..SEEDS / 2 {
                    let mut r = rng(tag, k, 200 + seed);
                    let scene = scene_for_prompt(&mut r, p, &cfg, (seed % 2) as usize).unwrap();
                    let mut img = render(&scene, 32);
                    for pass in 0..passes {
                        img = degrade(&img, if pass + 1 == passes { noise } else { 0 }, &mut r);
                    }
                    let j = score_image(&img, p);
                    n += 1;
                    if j.correct {
                        ok += 1;
                    } else {
                        failures.push(format!("{}: {}", p.prompt, j.reason.replace('\n', "; ")));
                    }
                }
            }
            let acc = ok as f64 / n as f64;
            println!(
                "  {:<14} {ok:>4} / {n:<4} = {:.2}%",
                tag.name(),
                100.0 * acc
            );
            for f in failures.iter().take(2) {
                println!("    {f}");
            }
            accs.push((tag, acc));
        }
        for (tag, acc) in accs {
            assert!(acc >= floor, "{passes}x blur, {tag}: {acc}");
        }
    }
}

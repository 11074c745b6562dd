//! Labelled comparison grids: a header naming each column's model, a label per row (what
//! changed, the category, the prompt), and every image framed by the scorer's verdict (green
//! correct, red wrong). The demo puts the images a recipe fixed or broke first, so its paired
//! comparison can be seen at a glance.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use image::{Rgb, RgbImage};
use softalign_worlds::geneval::{ImageResult, Tag};

use super::text::{draw_text, fit, text_width};

const PAD: u32 = 6;
const FRAME: u32 = 3;
const FONT_PX: f32 = 14.0;
const LINE: u32 = 18;
const LABEL_MAX: u32 = 460;
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);
const GREY: Rgb<u8> = Rgb([150, 150, 150]);
const CORRECT: Rgb<u8> = Rgb([0, 160, 60]);
const WRONG: Rgb<u8> = Rgb([215, 30, 30]);

pub struct Tile {
    pub image: RgbImage,
    /// The scorer's verdict; `None`: unscored (grey frame).
    pub verdict: Option<bool>,
}

pub struct Row {
    /// Text lines left of the images (the first in bold colour when `accent` is set).
    pub label: Vec<String>,
    pub accent: Option<Rgb<u8>>,
    pub tiles: Vec<Tile>,
}

/// Header + rows; every tile scaled `scale` x with nearest-neighbour sampling.
pub fn labelled_grid(columns: &[String], rows: &[Row], scale: u32) -> anyhow::Result<RgbImage> {
    let Some(first) = rows.iter().flat_map(|r| &r.tiles).next() else {
        bail!("a grid needs at least one image");
    };
    let (tw, th) = first.image.dimensions();
    let scale = scale.max(1);
    let (cw, ch) = (tw * scale + 2 * FRAME, th * scale + 2 * FRAME);
    for (i, r) in rows.iter().enumerate() {
        if r.tiles.len() != columns.len() {
            bail!(
                "grid row {i} has {} images for {} columns",
                r.tiles.len(),
                columns.len()
            );
        }
        if let Some(t) = r.tiles.iter().find(|t| t.image.dimensions() != (tw, th)) {
            bail!(
                "grid row {i}: a {:?} image among {tw}x{th} tiles",
                t.image.dimensions()
            );
        }
    }
    let label_w = rows
        .iter()
        .flat_map(|r| &r.label)
        .map(|l| text_width(l, FONT_PX))
        .max()
        .unwrap_or(0)
        .min(LABEL_MAX);
    let col_w = columns
        .iter()
        .map(|c| text_width(c, FONT_PX) + 2)
        .max()
        .unwrap_or(0)
        .max(cw);
    let row_h = ch.max(LINE * rows.iter().map(|r| r.label.len()).max().unwrap_or(1) as u32);
    let width = PAD + label_w + PAD + columns.len() as u32 * (col_w + PAD);
    let height = PAD + LINE + PAD + rows.len() as u32 * (row_h + PAD);
    let mut out = RgbImage::from_pixel(width, height, BACKGROUND);
    let x_cols = PAD + label_w + PAD;
    for (c, name) in columns.iter().enumerate() {
        let x =
            x_cols + c as u32 * (col_w + PAD) + (col_w - text_width(name, FONT_PX).min(col_w)) / 2;
        draw_text(&mut out, x as i32, PAD as i32, FONT_PX, INK, name);
    }
    for (r, row) in rows.iter().enumerate() {
        let y0 = PAD + LINE + PAD + r as u32 * (row_h + PAD);
        let text_h = LINE * row.label.len() as u32;
        let ty = y0 + row_h.saturating_sub(text_h) / 2;
        for (i, line) in row.label.iter().enumerate() {
            let color = match (i, row.accent) {
                (0, Some(a)) => a,
                _ => INK,
            };
            let line = fit(line, FONT_PX, label_w);
            draw_text(
                &mut out,
                PAD as i32,
                (ty + i as u32 * LINE) as i32,
                FONT_PX,
                color,
                &line,
            );
        }
        for (c, tile) in row.tiles.iter().enumerate() {
            let x0 = x_cols + c as u32 * (col_w + PAD) + (col_w - cw) / 2;
            draw_tile(&mut out, tile, x0, y0, scale);
        }
    }
    Ok(out)
}

/// Tiles in rows of `per_row`, each framed by its verdict, no labels: an evaluation at a glance
/// (`grid.png` of `softalign eval`).
pub fn verdict_grid(tiles: &[Tile], per_row: usize, scale: u32) -> anyhow::Result<RgbImage> {
    let Some(first) = tiles.first() else {
        bail!("a grid needs at least one image");
    };
    let (tw, th) = first.image.dimensions();
    let scale = scale.max(1);
    let (cw, ch) = (tw * scale + 2 * FRAME, th * scale + 2 * FRAME);
    let per_row = per_row.max(1);
    let rows = tiles.len().div_ceil(per_row) as u32;
    let cols = per_row.min(tiles.len()) as u32;
    let mut out =
        RgbImage::from_pixel(PAD + cols * (cw + PAD), PAD + rows * (ch + PAD), BACKGROUND);
    for (i, tile) in tiles.iter().enumerate() {
        if tile.image.dimensions() != (tw, th) {
            bail!(
                "grid tile {i}: a {:?} image among {tw}x{th} tiles",
                tile.image.dimensions()
            );
        }
        let x0 = PAD + (i % per_row) as u32 * (cw + PAD);
        let y0 = PAD + (i / per_row) as u32 * (ch + PAD);
        draw_tile(&mut out, tile, x0, y0, scale);
    }
    Ok(out)
}

/// One image at (x0, y0), scaled, inside a frame of its verdict's colour.
fn draw_tile(out: &mut RgbImage, tile: &Tile, x0: u32, y0: u32, scale: u32) {
    let (tw, th) = tile.image.dimensions();
    let (cw, ch) = (tw * scale + 2 * FRAME, th * scale + 2 * FRAME);
    let frame = match tile.verdict {
        Some(true) => CORRECT,
        Some(false) => WRONG,
        None => GREY,
    };
    for y in 0..ch {
        for x in 0..cw {
            let inside = x >= FRAME && y >= FRAME && x < cw - FRAME && y < ch - FRAME;
            let p = if inside {
                *tile
                    .image
                    .get_pixel((x - FRAME) / scale, (y - FRAME) / scale)
            } else {
                frame
            };
            out.put_pixel(x0 + x, y0 + y, p);
        }
    }
}

/// The first image of every prompt of a scored evaluation, framed by its verdict.
pub fn first_images(results: &[ImageResult]) -> anyhow::Result<Vec<Tile>> {
    let mut firsts: Vec<(usize, &ImageResult)> = results
        .iter()
        .filter_map(|r| match slot(&r.filename) {
            Some((p, 0)) => Some((p, r)),
            _ => None,
        })
        .collect();
    firsts.sort_by_key(|(p, _)| *p);
    firsts
        .into_iter()
        .map(|(_, r)| {
            Ok(Tile {
                image: open(&r.filename)?,
                verdict: Some(r.correct),
            })
        })
        .collect()
}

/// `(prompt index, image index)` of a GenEval sample path (`.../<prompt>/samples/<k>.png`).
fn slot(filename: &str) -> Option<(usize, usize)> {
    let p = Path::new(filename);
    let k = p.file_stem()?.to_str()?.parse().ok()?;
    let prompt = p.parent()?.parent()?.file_name()?.to_str()?.parse().ok()?;
    Some((prompt, k))
}

fn open(path: &str) -> anyhow::Result<RgbImage> {
    Ok(image::open(path)
        .with_context(|| format!("reading {path}"))?
        .to_rgb8())
}

/// The rows of a base-vs-model grid, from two evaluations of the same prompts and noise: every
/// image the model fixed (wrong -> right), then every one it broke (right -> wrong), each at
/// most `max_changed`, then `context` unchanged images per category for comparison.
pub fn paired_rows(
    base: &[ImageResult],
    model: &[ImageResult],
    model_name: &str,
    max_changed: usize,
    context: usize,
) -> anyhow::Result<Vec<Row>> {
    let by_slot: BTreeMap<(usize, usize), &ImageResult> = model
        .iter()
        .filter_map(|r| slot(&r.filename).map(|s| (s, r)))
        .collect();
    let mut pairs: Vec<(&ImageResult, &ImageResult)> = base
        .iter()
        .filter_map(|b| by_slot.get(&slot(&b.filename)?).map(|m| (b, *m)))
        .collect();
    pairs.sort_by_key(|(b, _)| slot(&b.filename));
    let fixed: Vec<_> = pairs
        .iter()
        .filter(|(b, m)| !b.correct && m.correct)
        .collect();
    let broken: Vec<_> = pairs
        .iter()
        .filter(|(b, m)| b.correct && !m.correct)
        .collect();
    let mut rows = Vec::new();
    let mut push = |status: String, accent: Option<Rgb<u8>>, b: &ImageResult, m: &ImageResult| {
        let k = slot(&b.filename).map_or(0, |s| s.1);
        rows.push(Row {
            label: vec![
                format!("{status} · {} · image {k}", b.tag.name()),
                b.prompt.clone(),
            ],
            accent,
            tiles: vec![
                Tile {
                    image: open(&b.filename)?,
                    verdict: Some(b.correct),
                },
                Tile {
                    image: open(&m.filename)?,
                    verdict: Some(m.correct),
                },
            ],
        });
        anyhow::Ok(())
    };
    for (list, word, accent) in [(&fixed, "fixed", CORRECT), (&broken, "broken", WRONG)] {
        for (b, m) in list.iter().take(max_changed) {
            push(format!("{word} by {model_name}"), Some(accent), b, m)?;
        }
        if list.len() > max_changed {
            push(
                format!("{word}: {} more not shown", list.len() - max_changed),
                Some(GREY),
                list[max_changed].0,
                list[max_changed].1,
            )?;
        }
    }
    for tag in Tag::ALL {
        let same = pairs
            .iter()
            .filter(|(b, m)| b.tag == tag && b.correct == m.correct)
            .take(context);
        for (b, m) in same {
            let word = if b.correct {
                "both right"
            } else {
                "both wrong"
            };
            push(word.into(), None, b, m)?;
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tile(v: u8, verdict: Option<bool>) -> Tile {
        Tile {
            image: RgbImage::from_pixel(4, 4, Rgb([v, v, v])),
            verdict,
        }
    }

    #[test]
    fn frames_follow_the_verdicts_and_rows_line_up() {
        let rows = vec![
            Row {
                label: vec!["fixed".into(), "a photo of a circle".into()],
                accent: Some(CORRECT),
                tiles: vec![tile(0, Some(false)), tile(0, Some(true))],
            },
            Row {
                label: vec!["both right".into()],
                accent: None,
                tiles: vec![tile(0, Some(true)), tile(0, None)],
            },
        ];
        let cols = vec!["base".to_string(), "+SoftREPA".to_string()];
        let g = labelled_grid(&cols, &rows, 3).unwrap();
        // Find the frames by colour: two green, one red, one grey, each (4 * 3 + 2 * FRAME)^2
        // minus the 12 x 12 image inside.
        let count = |c: Rgb<u8>| g.pixels().filter(|p| **p == c).count() as u32;
        let frame_px = (12 + 2 * FRAME).pow(2) - 144;
        assert_eq!(count(WRONG), frame_px);
        assert!(count(GREY) >= frame_px);
        assert!(count(CORRECT) >= 2 * frame_px);
        let bad = vec![Row {
            label: vec![],
            accent: None,
            tiles: vec![tile(0, None)],
        }];
        assert!(labelled_grid(&cols, &bad, 3).is_err());
    }

    #[test]
    fn verdict_grids_wrap_rows() {
        let tiles: Vec<Tile> = (0..5).map(|i| tile(0, Some(i % 2 == 0))).collect();
        let g = verdict_grid(&tiles, 2, 2).unwrap();
        let c = 4 * 2 + 2 * FRAME;
        assert_eq!(g.dimensions(), (PAD + 2 * (c + PAD), PAD + 3 * (c + PAD)));
        let red = g.pixels().filter(|p| **p == WRONG).count() as u32;
        assert_eq!(red, 2 * (c * c - 64));
    }

    #[test]
    fn slots_parse_geneval_paths() {
        assert_eq!(
            slot("runs/x/eval-base/00012/samples/0003.png"),
            Some((12, 3))
        );
        assert_eq!(slot("0003.png"), None);
    }
}

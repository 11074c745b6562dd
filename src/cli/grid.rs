//! Image grids: rows of equally sized tiles, scaled up with nearest-neighbour sampling (so
//! 32 px samples stay crisp) and separated by grey gutters; an empty gap between column groups
//! (base | + tokens) makes comparisons readable without text.
use std::path::Path;

use anyhow::{bail, Context};
use image::{Rgb, RgbImage};

const GUTTER: u32 = 2;
const GROUP_GAP: u32 = 8;
const GUTTER_RGB: Rgb<u8> = Rgb([160, 160, 160]);

/// Lays out `rows[r][g][c]` (row, column group, column) at `scale` x the tile size.
pub fn grid(rows: &[Vec<Vec<RgbImage>>], scale: u32) -> anyhow::Result<RgbImage> {
    let first = rows
        .iter()
        .flatten()
        .flatten()
        .next()
        .context("a grid needs at least one image")?;
    let (tw, th) = first.dimensions();
    let scale = scale.max(1);
    let (cw, ch) = (tw * scale, th * scale);
    let groups: Vec<usize> = match rows.first() {
        Some(r) => r.iter().map(Vec::len).collect(),
        None => bail!("a grid needs at least one row"),
    };
    for (i, r) in rows.iter().enumerate() {
        let lens: Vec<usize> = r.iter().map(Vec::len).collect();
        if lens != groups {
            bail!("grid row {i} has column groups {lens:?}, row 0 has {groups:?}");
        }
        if let Some(img) = r.iter().flatten().find(|i| i.dimensions() != (tw, th)) {
            bail!(
                "grid row {i}: a {:?} image among {tw}x{th} tiles",
                img.dimensions()
            );
        }
    }
    let cols: usize = groups.iter().sum();
    let width =
        GUTTER + cols as u32 * (cw + GUTTER) + GROUP_GAP * groups.len().saturating_sub(1) as u32;
    let height = GUTTER + rows.len() as u32 * (ch + GUTTER);
    let mut out = RgbImage::from_pixel(width, height, GUTTER_RGB);
    for (r, row) in rows.iter().enumerate() {
        let y0 = GUTTER + r as u32 * (ch + GUTTER);
        let mut x0 = GUTTER;
        for (g, group) in row.iter().enumerate() {
            if g > 0 {
                x0 += GROUP_GAP;
            }
            for img in group {
                for y in 0..ch {
                    for x in 0..cw {
                        out.put_pixel(x0 + x, y0 + y, *img.get_pixel(x / scale, y / scale));
                    }
                }
                x0 += cw + GUTTER;
            }
        }
    }
    Ok(out)
}

/// One row per prompt, one column per sample.
pub fn simple_grid(images: &[Vec<RgbImage>], scale: u32) -> anyhow::Result<RgbImage> {
    let rows: Vec<Vec<Vec<RgbImage>>> = images.iter().map(|r| vec![r.clone()]).collect();
    grid(&rows, scale)
}

pub fn save_png(img: &RgbImage, path: &Path) -> anyhow::Result<()> {
    img.save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", path.display()))
}

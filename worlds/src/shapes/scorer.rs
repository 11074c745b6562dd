//! The exact scorer: finds the shapes in an image and judges a prompt with GenEval's rules.
//!
//! Detection, in place of GenEval's Mask2Former + CLIP:
//! 1. every pixel takes the nearest of the background and the palette colours; a pixel nearest
//!    a colour but further than `reject_distance` from it (muddy, off-palette) is left out;
//! 2. 8-connected components of each colour are candidate objects, the colour being their
//!    label; components smaller than `min_area_fraction` of the image are specks and dropped;
//! 3. each component becomes a soft mask (how much of each pixel, rim included, is its
//!    colour) and every shape is fitted to it by moments: the shape of the same area with the
//!    same centroid, drawn sharp and at a few blur widths. The best soft
//!    intersection-over-union names the shape and is the
//!    detection's confidence; the fitted box is the detection's box. Sub-pixel masses keep an
//!    8 px diamond apart from an 8 px circle, and a blob that matches no shape well (a smear,
//!    two shapes fused, a bar) gets a low confidence and falls under the threshold.
//!
//! The thresholds are fixed from the geometry of the ideal shapes, not fitted to any model's
//! samples (see [`ScorerConfig::default`]).
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::palette::{rgb_distance, Color, Shape, BACKGROUND};
use super::render::coverage;
use crate::geneval::{judge, Detection, EvalPrompt, JudgeConfig, Judgement};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScorerConfig {
    /// RGB distance beyond which a pixel is no palette colour at all.
    pub reject_distance: f32,
    /// Smallest component kept, as a fraction of the image's pixels.
    pub min_area_fraction: f32,
    /// GenEval's rules; `threshold` and `counting_threshold` are in IoU units here.
    pub judge: JudgeConfig,
}

impl Default for ScorerConfig {
    /// - `reject_distance` 80: about two thirds of the smallest distance between palette
    ///   entries (blue/purple, 124), so a labelled pixel is clearly nearer its colour than
    ///   anything else; greys are left out (mid grey is 98 from purple).
    /// - `min_area_fraction` 12/1024: at 32 px, 12 pixels, well under the smallest object
    ///   (an 8 px triangle or diamond covers 32).
    /// - thresholds: fitted to each other, the ideal shapes reach a soft IoU of 0.84 at most
    ///   (circle against square or diamond), so a fair drawing of a shape scores well above
    ///   that with its own template. A blob is accepted as a shape when its best fit exceeds
    ///   0.5, which a 2:1 bar (two squares fused, 0.55 against a square) barely passes and
    ///   a long bar does not; for counting, where GenEval is stricter too, when it exceeds 0.6,
    ///   so fused pairs are not counted as one.
    fn default() -> Self {
        ScorerConfig {
            reject_distance: 80.0,
            min_area_fraction: 12.0 / 1024.0,
            judge: JudgeConfig {
                threshold: 0.5,
                counting_threshold: 0.6,
                max_objects: 16,
                position_threshold: 0.1,
            },
        }
    }
}

/// A connected blob of one palette colour.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub color: Color,
    /// Pixel coordinates (x, y).
    pub pixels: Vec<(u32, u32)>,
    /// Inclusive pixel bounds `[x0, y0, x1, y1]`.
    pub bounds: [u32; 4],
}

/// Nearest of background and palette for each pixel (row-major), `None` for background or
/// off-palette pixels.
pub fn label_pixels(img: &RgbImage, reject_distance: f32) -> Vec<Option<Color>> {
    img.pixels()
        .map(|p| {
            let mut best = (rgb_distance(p.0, BACKGROUND), None);
            for c in Color::ALL {
                let d = rgb_distance(p.0, c.rgb());
                if d < best.0 {
                    best = (d, Some(c));
                }
            }
            best.1.filter(|_| best.0 <= reject_distance)
        })
        .collect()
}

/// 8-connected components of equal labels, in scan order of their first pixel.
pub fn components(labels: &[Option<Color>], width: u32, height: u32) -> Vec<Component> {
    let (w, h) = (width as usize, height as usize);
    let mut seen = vec![false; labels.len()];
    let mut out = Vec::new();
    for start in 0..labels.len() {
        let Some(color) = labels[start] else { continue };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let mut pixels = Vec::new();
        let mut bounds = [u32::MAX, u32::MAX, 0, 0];
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            pixels.push((x as u32, y as u32));
            bounds = [
                bounds[0].min(x as u32),
                bounds[1].min(y as u32),
                bounds[2].max(x as u32),
                bounds[3].max(y as u32),
            ];
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if !seen[j] && labels[j] == Some(color) {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        out.push(Component {
            color,
            pixels,
            bounds,
        });
    }
    out
}

/// How much of pixel `p` is colour `c` over the background: `p`'s position along the line
/// from the background to `c` (where anti-aliased and blurred edge pixels lie), in [0, 1].
pub fn colour_fraction(p: [u8; 3], c: Color) -> f32 {
    let (mut dot, mut norm) = (0.0, 0.0);
    for (k, &ck) in c.rgb().iter().enumerate() {
        let d = ck as f32 - BACKGROUND[k] as f32;
        dot += (p[k] as f32 - BACKGROUND[k] as f32) * d;
        norm += d * d;
    }
    (dot / norm).clamp(0.0, 1.0)
}

/// A component's soft mask: how much of each pixel it covers, over its bounds grown by two
/// pixels so the anti-aliased or blurred rim counts. Rim pixels count only if they are background or
/// off-palette, never another object's.
pub struct SoftMask {
    /// `[x0, y0, x1, y1)` in pixels.
    pub window: [u32; 4],
    pub values: Vec<f32>,
}

impl SoftMask {
    fn at(&self, x: u32, y: u32) -> f32 {
        let [x0, y0, x1, y1] = self.window;
        if x < x0 || y < y0 || x >= x1 || y >= y1 {
            return 0.0;
        }
        self.values[((y - y0) * (x1 - x0) + (x - x0)) as usize]
    }
}

pub fn soft_mask(
    img: &RgbImage,
    labels: &[Option<Color>],
    owner: &[Option<usize>],
    id: usize,
    c: &Component,
) -> SoftMask {
    let (w, h) = img.dimensions();
    let [bx0, by0, bx1, by1] = c.bounds;
    let window = [
        bx0.saturating_sub(2),
        by0.saturating_sub(2),
        (bx1 + 3).min(w),
        (by1 + 3).min(h),
    ];
    let mut values =
        Vec::with_capacity(((window[2] - window[0]) * (window[3] - window[1])) as usize);
    for y in window[1]..window[3] {
        for x in window[0]..window[2] {
            let i = (y * w + x) as usize;
            let mine = owner[i] == Some(id) || labels[i].is_none();
            values.push(if mine {
                colour_fraction(img.get_pixel(x, y).0, c.color)
            } else {
                0.0
            });
        }
    }
    SoftMask { window, values }
}

/// Area of each shape as a fraction of its box, and its centroid's offset below the box
/// centre in units of half the side (a triangle's centroid sits a third of the way down).
fn shape_moments(shape: Shape) -> (f32, f32) {
    match shape {
        Shape::Circle => (std::f32::consts::FRAC_PI_4, 0.0),
        Shape::Square => (1.0, 0.0),
        Shape::Triangle => (0.5, 1.0 / 3.0),
        Shape::Diamond => (0.5, 0.0),
    }
}

/// Blur widths (Gaussian sigma, pixels) a template is tried at: a sample's edges may be as
/// sharp as the renderer's or as soft as a small model makes them, and comparing a blurred
/// blob with a blurred template keeps the shapes apart that blur makes alike (small circles
/// and diamonds).
pub const TEMPLATE_BLURS: [f32; 4] = [0.0, 0.5, 0.75, 1.0];

/// Fits `shape` to the mask by its moments (same area, same centroid) and returns the fitted
/// box `[x0, y0, x1, y1]` with the best soft IoU (sum of minima over sum of maxima) of the
/// mask and the shape drawn in that box, sharp or blurred by one of [`TEMPLATE_BLURS`].
pub fn fit_shape(mask: &SoftMask, shape: Shape) -> ([f32; 4], f32) {
    let [x0, y0, x1, y1] = mask.window;
    let (mut area, mut mx, mut my) = (0.0f32, 0.0f32, 0.0f32);
    for y in y0..y1 {
        for x in x0..x1 {
            let m = mask.at(x, y);
            area += m;
            mx += m * (x as f32 + 0.5);
            my += m * (y as f32 + 0.5);
        }
    }
    if area <= 0.0 {
        return ([0.0; 4], 0.0);
    }
    let (fill, dy) = shape_moments(shape);
    let half = (area / fill).sqrt() / 2.0;
    let (cx, cy) = (mx / area, my / area - dy * half);
    let bbox = [cx - half, cy - half, cx + half, cy + half];
    // The template's pixels, joined with the mask's window, with room for the blur.
    let tx0 = (bbox[0].floor() - 2.0).max(0.0).min(x0 as f32) as u32;
    let ty0 = (bbox[1].floor() - 2.0).max(0.0).min(y0 as f32) as u32;
    let tx1 = ((bbox[2].ceil() + 2.0).max(0.0) as u32).max(x1);
    let ty1 = ((bbox[3].ceil() + 2.0).max(0.0) as u32).max(y1);
    let (tw, th) = ((tx1 - tx0) as usize, (ty1 - ty0) as usize);
    let mut template = Vec::with_capacity(tw * th);
    for y in ty0..ty1 {
        for x in tx0..tx1 {
            template.push(coverage(shape, x, y, cx, cy, half));
        }
    }
    let best = TEMPLATE_BLURS
        .iter()
        .map(|&sigma| {
            let t = gaussian_blur(&template, tw, th, sigma);
            let (mut inter, mut union) = (0.0f32, 0.0f32);
            for (i, tv) in t.iter().enumerate() {
                let m = mask.at(tx0 + (i % tw) as u32, ty0 + (i / tw) as u32);
                inter += tv.min(m);
                union += tv.max(m);
            }
            if union > 0.0 {
                inter / union
            } else {
                0.0
            }
        })
        .fold(0.0f32, f32::max);
    (bbox, best)
}

/// Separable Gaussian blur of a `w` x `h` plane with zero outside; `sigma` 0 is identity.
fn gaussian_blur(plane: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return plane.to_vec();
    }
    let r = (3.0 * sigma).ceil() as i64;
    let kernel: Vec<f32> = (-r..=r)
        .map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / sum).collect();
    let pass = |src: &[f32], horizontal: bool| -> Vec<f32> {
        let mut out = vec![0.0; src.len()];
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let mut v = 0.0;
                for (k, d) in kernel.iter().zip(-r..=r) {
                    let (sx, sy) = if horizontal { (x + d, y) } else { (x, y + d) };
                    if sx >= 0 && sy >= 0 && sx < w as i64 && sy < h as i64 {
                        v += k * src[sy as usize * w + sx as usize];
                    }
                }
                out[y as usize * w + x as usize] = v;
            }
        }
        out
    };
    pass(&pass(plane, true), false)
}

/// Every candidate object in `img` with its best shape and confidence (soft IoU with that
/// shape), before any threshold. Classes and colours are the world's names; boxes are the
/// fitted shape's.
pub fn detect(img: &RgbImage, cfg: &ScorerConfig) -> Vec<Detection> {
    let (w, h) = img.dimensions();
    let labels = label_pixels(img, cfg.reject_distance);
    let min_area = (cfg.min_area_fraction * (w * h) as f32).ceil() as usize;
    let comps: Vec<Component> = components(&labels, w, h)
        .into_iter()
        .filter(|c| c.pixels.len() >= min_area.max(1))
        .collect();
    let mut owner = vec![None; labels.len()];
    for (id, c) in comps.iter().enumerate() {
        for &(x, y) in &c.pixels {
            owner[(y * w + x) as usize] = Some(id);
        }
    }
    comps
        .iter()
        .enumerate()
        .map(|(id, c)| {
            let mask = soft_mask(img, &labels, &owner, id, c);
            let (shape, (bbox, iou)) = Shape::ALL
                .into_iter()
                .map(|s| (s, fit_shape(&mask, s)))
                .fold((Shape::Circle, ([0.0; 4], f32::NEG_INFINITY)), |a, b| {
                    if b.1 .1 > a.1 .1 {
                        b
                    } else {
                        a
                    }
                });
            Detection {
                class: shape.name().to_string(),
                color: c.color.name().to_string(),
                bbox,
                confidence: iou,
            }
        })
        .collect()
}

/// Judges `img` against `prompt` as GenEval would, with this world's detector.
pub fn score_image(img: &RgbImage, prompt: &EvalPrompt) -> Judgement {
    score_image_with(img, prompt, &ScorerConfig::default())
}

pub fn score_image_with(img: &RgbImage, prompt: &EvalPrompt, cfg: &ScorerConfig) -> Judgement {
    judge(&detect(img, cfg), prompt, &cfg.judge)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::render::render;
    use crate::shapes::scene::{Object, Scene};

    fn scene(objects: Vec<Object>) -> Scene {
        Scene {
            image_size: 32,
            objects,
        }
    }

    fn obj(shape: Shape, color: Color, cx: f32, cy: f32, size: f32) -> Object {
        Object {
            shape,
            color,
            cx,
            cy,
            size,
        }
    }

    #[test]
    fn every_shape_colour_and_size_is_recognised() {
        for shape in Shape::ALL {
            for color in Color::ALL {
                for (i, size) in [8.0, 9.5, 11.0, 13.0].into_iter().enumerate() {
                    let off = 0.25 * i as f32;
                    let img = render(
                        &scene(vec![obj(shape, color, 15.3 + off, 16.1 - off, size)]),
                        32,
                    );
                    let d = detect(&img, &ScorerConfig::default());
                    assert_eq!(d.len(), 1, "{shape:?} {color:?} {size}: {d:?}");
                    assert_eq!(d[0].class, shape.name(), "{color:?} {size}: {d:?}");
                    assert_eq!(d[0].color, color.name());
                    assert!(d[0].confidence > 0.6, "{shape:?} {size}: {d:?}");
                }
            }
        }
    }

    #[test]
    fn bars_smears_and_specks_are_not_shapes() {
        let mut img = RgbImage::from_pixel(32, 32, image::Rgb(BACKGROUND));
        for x in 2..30 {
            for y in 10..13 {
                img.put_pixel(x, y, image::Rgb(Color::Red.rgb()));
            }
        }
        for (x, y) in [(5, 25), (6, 25), (5, 26)] {
            img.put_pixel(x, y, image::Rgb(Color::Blue.rgb()));
        }
        // Grey is no palette colour.
        for x in 20..28 {
            for y in 20..28 {
                img.put_pixel(x, y, image::Rgb([128, 128, 128]));
            }
        }
        let d = detect(&img, &ScorerConfig::default());
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].confidence < 0.5, "{d:?}");
    }

    #[test]
    fn components_split_colours_and_keep_diagonal_neighbours_together() {
        let labels = vec![
            Some(Color::Red),
            None,
            Some(Color::Blue),
            None,
            Some(Color::Red),
            Some(Color::Blue),
            None,
            None,
            None,
        ];
        let cs = components(&labels, 3, 3);
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0].pixels.len(), 2);
        assert_eq!(cs[0].bounds, [0, 0, 1, 1]);
        assert_eq!(cs[1].color, Color::Blue);
    }
}

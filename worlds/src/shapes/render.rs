//! Rasteriser: shapes on a white canvas, anti-aliased by 8x8 supersampling so edges are soft
//! the way a diffusion model's samples are, and so the model does not have to learn jagged
//! pixel staircases.
use image::{Rgb, RgbImage};

use super::palette::{Shape, BACKGROUND};
use super::scene::{Object, Scene};

/// Subsamples per pixel side.
const SUPERSAMPLE: u32 = 8;

/// Renders `scene` at `size` x `size` pixels. The scene's coordinates are scaled from its own
/// `image_size` to `size`, so one scene can be drawn at several resolutions.
pub fn render(scene: &Scene, size: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(size, size, Rgb(BACKGROUND));
    let scale = size as f32 / scene.image_size.max(1) as f32;
    for o in &scene.objects {
        draw(&mut img, o, scale);
    }
    img
}

fn draw(img: &mut RgbImage, o: &Object, scale: f32) {
    let (cx, cy, half) = (o.cx * scale, o.cy * scale, o.size * scale / 2.0);
    if half <= 0.0 {
        return;
    }
    let x0 = (cx - half).floor().max(0.0) as u32;
    let y0 = (cy - half).floor().max(0.0) as u32;
    let x1 = ((cx + half).ceil() as u32).min(img.width());
    let y1 = ((cy + half).ceil() as u32).min(img.height());
    let rgb = o.color.rgb();
    for py in y0..y1 {
        for px in x0..x1 {
            let cover = coverage(o.shape, px, py, cx, cy, half);
            if cover > 0.0 {
                let p = img.get_pixel_mut(px, py);
                for (ch, &target) in p.0.iter_mut().zip(&rgb) {
                    let v = *ch as f32 * (1.0 - cover) + target as f32 * cover;
                    *ch = v.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
}

/// Fraction of pixel (px, py) inside `shape` centred at (cx, cy) with half-size `half`.
pub(crate) fn coverage(shape: Shape, px: u32, py: u32, cx: f32, cy: f32, half: f32) -> f32 {
    let mut inside = 0u32;
    for sy in 0..SUPERSAMPLE {
        for sx in 0..SUPERSAMPLE {
            let x = px as f32 + (sx as f32 + 0.5) / SUPERSAMPLE as f32;
            let y = py as f32 + (sy as f32 + 0.5) / SUPERSAMPLE as f32;
            if shape.contains((x - cx) / half, (y - cy) / half) {
                inside += 1;
            }
        }
    }
    inside as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32
}

/// The image as channel-first floats in [-1, 1] (the model's pixel space), length 3 * H * W.
pub fn to_signed_chw(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0.0; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p.0[c] as f32 / 127.5 - 1.0;
        }
    }
    out
}

/// Inverse of [`to_signed_chw`], clamping values outside [-1, 1]. `None` when `data` is not
/// 3 * `width` * `height` long.
pub fn from_signed_chw(data: &[f32], width: u32, height: u32) -> Option<RgbImage> {
    let plane = (width * height) as usize;
    if data.len() != 3 * plane {
        return None;
    }
    Some(RgbImage::from_fn(width, height, |x, y| {
        let i = (y * width + x) as usize;
        Rgb(std::array::from_fn(|c| {
            ((data[c * plane + i].clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
        }))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::palette::Color;

    fn one(shape: Shape) -> Scene {
        Scene {
            image_size: 32,
            objects: vec![Object {
                shape,
                color: Color::Red,
                cx: 16.0,
                cy: 16.0,
                size: 12.0,
            }],
        }
    }

    fn painted_area(img: &RgbImage) -> f32 {
        img.pixels()
            .map(|p| (255.0 - p.0[1] as f32) / (255.0 - Color::Red.rgb()[1] as f32))
            .sum()
    }

    #[test]
    fn painted_area_matches_the_geometry() {
        let expect = [
            (Shape::Circle, std::f32::consts::PI * 36.0),
            (Shape::Square, 144.0),
            (Shape::Triangle, 72.0),
            (Shape::Diamond, 72.0),
        ];
        for (shape, area) in expect {
            let got = painted_area(&render(&one(shape), 32));
            assert!(
                (got - area).abs() < 0.03 * area,
                "{shape:?}: {got} vs {area}"
            );
        }
    }

    #[test]
    fn background_is_untouched_and_scaling_works() {
        let img = render(&one(Shape::Square), 32);
        assert_eq!(img.get_pixel(0, 0).0, BACKGROUND);
        assert_eq!(img.get_pixel(16, 16).0, Color::Red.rgb());
        let big = render(&one(Shape::Square), 64);
        assert_eq!(big.dimensions(), (64, 64));
        let got = painted_area(&big);
        assert!((got - 576.0).abs() < 1.0, "{got}");
    }

    #[test]
    fn signed_chw_round_trips() {
        let img = render(&one(Shape::Triangle), 32);
        let v = to_signed_chw(&img);
        assert_eq!(v.len(), 3 * 32 * 32);
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
        assert_eq!(from_signed_chw(&v, 32, 32).unwrap(), img);
        assert!(from_signed_chw(&v, 31, 32).is_none());
    }
}

//! Text on images with the bundled DejaVu Sans (assets/fonts, Bitstream Vera licence), through
//! ab_glyph's rasteriser: labels for the demo's grids, readable without a viewer that knows
//! which column is which.
use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};

static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn font() -> FontRef<'static> {
    FontRef::try_from_slice(DEJAVU_SANS).expect("the bundled DejaVu Sans parses")
}

/// Width in pixels of `text` at `px` pixels per em.
pub fn text_width(text: &str, px: f32) -> u32 {
    let font = font();
    let f = font.as_scaled(PxScale::from(px));
    let mut w = 0.0;
    let mut prev = None;
    for c in text.chars() {
        let g = f.glyph_id(c);
        if let Some(p) = prev {
            w += f.kern(p, g);
        }
        w += f.h_advance(g);
        prev = Some(g);
    }
    w.ceil() as u32
}

/// `text` cut to at most `max_width` pixels, ending in an ellipsis when cut.
pub fn fit(text: &str, px: f32, max_width: u32) -> String {
    if text_width(text, px) <= max_width {
        return text.to_string();
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let s: String = chars.iter().collect::<String>() + "…";
        if text_width(&s, px) <= max_width {
            return s;
        }
    }
    String::new()
}

/// Draws `text` with its top-left corner at (x, y), blending `color` over the image by
/// coverage; pixels outside the image are skipped.
pub fn draw_text(img: &mut RgbImage, x: i32, y: i32, px: f32, color: Rgb<u8>, text: &str) {
    let font = font();
    let f = font.as_scaled(PxScale::from(px));
    let mut caret = ab_glyph::point(x as f32, y as f32 + f.ascent());
    let mut prev = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            caret.x += f.kern(p, id);
        }
        let glyph = id.with_scale_and_position(PxScale::from(px), caret);
        caret.x += f.h_advance(id);
        prev = Some(id);
        let Some(outlined) = font.outline_glyph(glyph) else {
            continue;
        };
        let b = outlined.px_bounds();
        outlined.draw(|gx, gy, cov| {
            let (px_x, px_y) = (b.min.x as i32 + gx as i32, b.min.y as i32 + gy as i32);
            if px_x < 0 || px_y < 0 || px_x >= img.width() as i32 || px_y >= img.height() as i32 {
                return;
            }
            let p = img.get_pixel_mut(px_x as u32, px_y as u32);
            for k in 0..3 {
                let v = p.0[k] as f32 * (1.0 - cov) + color.0[k] as f32 * cov;
                p.0[k] = v.round().clamp(0.0, 255.0) as u8;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_inside_its_measured_box() {
        let mut img = RgbImage::from_pixel(200, 40, Rgb([255, 255, 255]));
        let w = text_width("two_object", 16.0);
        assert!(w > 40 && w < 150, "{w}");
        draw_text(&mut img, 5, 5, 16.0, Rgb([0, 0, 0]), "two_object");
        let dark: Vec<(u32, u32)> = img
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0[0] < 128)
            .map(|(x, y, _)| (x, y))
            .collect();
        assert!(dark.len() > 50, "{} dark pixels", dark.len());
        assert!(dark
            .iter()
            .all(|&(x, y)| (4..=6 + w).contains(&x) && (4..=30).contains(&y)));
    }

    #[test]
    fn fit_cuts_with_an_ellipsis() {
        let long = "a photo of a red circle and a blue square and a green triangle";
        let cut = fit(long, 14.0, 120);
        assert!(cut.ends_with('…') && text_width(&cut, 14.0) <= 120, "{cut}");
        assert_eq!(fit("short", 14.0, 120), "short");
    }
}

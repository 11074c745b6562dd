//! Images as the reference feeds them to the VAE: shorter side resized to the training
//! resolution (bicubic), centre crop, RGB scaled to [-1, 1].
use std::path::Path;

use image::imageops::{self, FilterType};
use image::RgbImage;
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Decodes the file at `path` (any format the `image` crate reads: JPEG, PNG, ...) and crops it
/// to `size` x `size`. Errors name the file.
pub fn load_square(path: &Path, size: u32) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path).map_err(|e| Error::file(path, e))?;
    decode_square(reader, size).map_err(|e| Error::file(path, e))
}

/// The largest side decoded, and the most bytes a decoded image may take: a header may claim
/// anything, the decoder allocates what it claims before reading a pixel, and a JPEG whose
/// data stops early still decodes (the rest grey), so a 600-byte file can claim a 16384 x
/// 16384 image that then takes a minute to resize (a fuzz finding). 8192 px holds an 8K
/// photo.
pub const MAX_SIDE: u32 = 8192;
pub const MAX_DECODED_BYTES: u64 = 256 << 20;
/// The largest ratio of the longer to the shorter side: the shorter side is resized to the
/// training resolution first, so a 1 x 16384 image would become a 512 x 8M one.
pub const MAX_ASPECT: u32 = 64;

/// [`load_square`] on an image reader (a file, or bytes in memory).
pub fn decode_square<R: std::io::BufRead + std::io::Seek>(
    reader: image::ImageReader<R>,
    size: u32,
) -> std::result::Result<RgbImage, String> {
    let mut reader = reader.with_guessed_format().map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => format!(
            "cannot decode: larger than softalign decodes (at most {MAX_SIDE} px a side and \
             {} MiB decoded); downscale it first",
            MAX_DECODED_BYTES >> 20
        ),
        e => format!("cannot decode: {e}"),
    })?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err("image has no pixels".into());
    }
    if w.max(h) / w.min(h) > MAX_ASPECT {
        return Err(format!(
            "image is {w} x {h}: an aspect ratio over {MAX_ASPECT} leaves almost nothing after \
             the centre crop"
        ));
    }
    Ok(resize_center_crop(&rgb, size))
}

/// Shorter side to `size` with Catmull-Rom (the cubic with a = -0.5 that PIL's and
/// torchvision's BICUBIC use), then the centred `size` x `size` window, offsets rounded as
/// torchvision's CenterCrop does.
pub fn resize_center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (
            size,
            ((h as u64 * size as u64) / w as u64).max(size as u64) as u32,
        )
    } else {
        (
            ((w as u64 * size as u64) / h as u64).max(size as u64) as u32,
            size,
        )
    };
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        imageops::resize(img, nw, nh, FilterType::CatmullRom)
    };
    let left = ((nw - size) as f64 / 2.0).round() as u32;
    let top = ((nh - size) as f64 / 2.0).round() as u32;
    imageops::crop_imm(&resized, left, top, size, size).to_image()
}

/// (3, H, W) float in [-1, 1].
pub fn to_tensor(img: &RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    Tensor::from_slice(img.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 127.5
        - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_is_square_and_centred() {
        let mut img = RgbImage::new(40, 20);
        // A marker column in the middle must stay in the middle after the crop.
        for y in 0..20 {
            img.put_pixel(20, y, image::Rgb([255, 0, 0]));
        }
        let out = resize_center_crop(&img, 20);
        assert_eq!(out.dimensions(), (20, 20));
        assert_eq!(out.get_pixel(10, 5)[0], 255);
        assert_eq!(out.get_pixel(0, 5)[0], 0);
    }

    #[test]
    fn tensor_range() {
        let mut img = RgbImage::new(2, 1);
        img.put_pixel(1, 0, image::Rgb([255, 255, 255]));
        let t = to_tensor(&img);
        assert_eq!(t.size(), [3, 1, 2]);
        assert_eq!(t.double_value(&[0, 0, 0]), -1.0);
        assert_eq!(t.double_value(&[2, 0, 1]), 1.0);
    }
}

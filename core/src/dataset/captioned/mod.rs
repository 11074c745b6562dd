//! Images with captions, read from disk each access: COCO and generic manifests. Batches carry
//! the images in [-1, 1] and one caption per image; the backbone encodes both (VAE, text
//! encoders), unless an encoding cache is used instead. An unreadable image is reported with
//! its path once, counted, and replaced by the next readable one; it never stops a run.
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::backbone::Conditioning;
use crate::dataset::{Batch, Dataset};
use crate::{Error, Result};

pub mod coco;
pub mod manifest;
pub mod preprocess;
pub mod spec;

/// One image and its captions (COCO has five per image).
#[derive(Debug, Clone)]
pub struct Entry {
    pub image: PathBuf,
    pub captions: Vec<String>,
}

/// How many unreadable images in a row a batch tolerates before the run stops: beyond that the
/// data is broken, not an odd file.
const MAX_CONSECUTIVE_FAILURES: usize = 64;

pub struct CaptionedImages {
    /// For messages: `coco captions_train2017.json`, `manifest train.jsonl`.
    origin: String,
    entries: Vec<Entry>,
    resolution: u32,
    caption_dropout: f64,
    skipped: AtomicUsize,
    reported: Mutex<HashSet<usize>>,
}

impl CaptionedImages {
    pub fn new(
        origin: impl Into<String>,
        entries: Vec<Entry>,
        resolution: u32,
        caption_dropout: f64,
    ) -> Result<Self> {
        let origin = origin.into();
        if entries.is_empty() {
            return Err(Error::invalid(format!(
                "data {origin}: no captioned images"
            )));
        }
        if resolution == 0 {
            return Err(Error::Recipe(format!(
                "data {origin}: `resolution` must be positive"
            )));
        }
        if !(0.0..1.0).contains(&caption_dropout) {
            return Err(Error::Recipe(format!(
                "data {origin}: `caption_dropout` must be in [0, 1), got {caption_dropout}"
            )));
        }
        Ok(Self {
            origin,
            entries,
            resolution,
            caption_dropout,
            skipped: AtomicUsize::new(0),
            reported: Mutex::new(HashSet::new()),
        })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn resolution(&self) -> u32 {
        self.resolution
    }

    /// The image at `i` as (3, R, R) in [-1, 1].
    pub fn image(&self, i: usize) -> Result<Tensor> {
        let e = &self.entries[i];
        preprocess::load_square(&e.image, self.resolution).map(|img| preprocess::to_tensor(&img))
    }

    /// The images at `indices`, decoded on all cores; each slot its own result.
    pub fn images_at(&self, indices: &[usize]) -> Result<Vec<Result<Tensor>>> {
        let threads = std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1)
            .min(indices.len().max(1));
        let per = indices.len().div_ceil(threads).max(1);
        let out: Vec<Result<Tensor>> = std::thread::scope(|s| {
            let handles: Vec<_> = indices
                .chunks(per)
                .map(|chunk| s.spawn(move || chunk.iter().map(|&i| self.image(i)).collect()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|_| vec![]))
                .collect()
        });
        if out.len() != indices.len() {
            return Err(Error::invalid(format!(
                "data {}: an image decoder thread panicked",
                self.origin
            )));
        }
        Ok(out)
    }

    /// Notes a failure once per image, on stderr, with the running count.
    fn report(&self, i: usize, err: &Error) {
        let n = self.skipped.fetch_add(1, Ordering::Relaxed) + 1;
        let first = self
            .reported
            .lock()
            .map(|mut s| s.insert(i))
            .unwrap_or(true);
        if first {
            eprintln!(
                "warning: data {}: skipping an image ({n} skipped so far): {err}",
                self.origin
            );
        }
    }

    /// Loads `indices` (decoding in parallel); a slot whose image fails takes the next index
    /// after it that reads and is not already in the batch, so batches stay distinct and the
    /// choice is deterministic.
    fn load_images(&self, indices: &[usize]) -> Result<Vec<(usize, Tensor)>> {
        let n = self.entries.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
            return Err(Error::invalid(format!(
                "data {}: index {bad} past the end ({n} images)",
                self.origin
            )));
        }
        let first = self.images_at(indices)?;
        let mut used: HashSet<usize> = indices.iter().copied().collect();
        let mut out = Vec::with_capacity(indices.len());
        for (&i, r) in indices.iter().zip(first) {
            match r {
                Ok(t) => out.push((i, t)),
                Err(e) => {
                    self.report(i, &e);
                    out.push(self.replacement(i, &mut used, e)?);
                }
            }
        }
        Ok(out)
    }

    fn replacement(
        &self,
        failed: usize,
        used: &mut HashSet<usize>,
        mut last: Error,
    ) -> Result<(usize, Tensor)> {
        let n = self.entries.len();
        let mut tries = 0;
        for step in 1..n {
            let j = (failed + step) % n;
            if used.contains(&j) {
                continue;
            }
            match self.image(j) {
                Ok(t) => {
                    used.insert(j);
                    return Ok((j, t));
                }
                Err(e) => {
                    self.report(j, &e);
                    last = e;
                    tries += 1;
                    if tries >= MAX_CONSECUTIVE_FAILURES {
                        break;
                    }
                }
            }
        }
        Err(Error::invalid(format!(
            "data {}: no readable image left to fill a batch ({} skipped; last: {last})",
            self.origin,
            self.skipped()
        )))
    }

    /// One caption per image: a random one of its captions, or "" with the dropout
    /// probability. Two fixed draws per batch from torch's global generator, in this order:
    /// which caption, whether to drop it.
    fn captions(&self, indices: &[usize]) -> Result<Vec<String>> {
        let b = indices.len() as i64;
        let pick = Vec::<f64>::try_from(Tensor::rand([b], (Kind::Double, Device::Cpu)))?;
        let drop = Vec::<f64>::try_from(Tensor::rand([b], (Kind::Double, Device::Cpu)))?;
        Ok(indices
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let c = &self.entries[i].captions;
                if drop[k] < self.caption_dropout {
                    String::new()
                } else {
                    let j = ((pick[k] * c.len() as f64) as usize).min(c.len() - 1);
                    c[j].clone()
                }
            })
            .collect())
    }
}

impl Dataset for CaptionedImages {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn as_captioned(&self) -> Option<&CaptionedImages> {
        Some(self)
    }

    fn skipped(&self) -> usize {
        self.skipped.load(Ordering::Relaxed)
    }

    fn batch(&self, indices: &[usize], device: Device) -> Result<Batch> {
        let loaded = self.load_images(indices)?;
        let final_idx: Vec<usize> = loaded.iter().map(|(i, _)| *i).collect();
        let captions = self.captions(&final_idx)?;
        let images: Vec<Tensor> = loaded.into_iter().map(|(_, t)| t).collect();
        Ok(Batch {
            x0: Tensor::stack(&images, 0).to_device(device),
            cond: Conditioning::new(),
            captions: Some(captions),
            pixels: false,
            texts: None,
            preference_pairs: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn write_png(path: &std::path::Path, shade: u8, w: u32, h: u32) {
        RgbImage::from_pixel(w, h, Rgb([shade, 0, 255 - shade]))
            .save(path)
            .unwrap();
    }

    /// a.png, b (corrupt), c.png, d.png; "missing.png" does not exist.
    fn folder() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        write_png(&p.join("a.png"), 0, 8, 8);
        std::fs::write(p.join("b.png"), b"not a png at all").unwrap();
        write_png(&p.join("c.png"), 100, 16, 8);
        write_png(&p.join("d.png"), 255, 8, 8);
        let lines = [
            r#"{"image": "a.png", "captions": ["a one", "a two"]}"#,
            r#"{"image": "b.png", "caption": "broken"}"#,
            r#"{"image": "c.png", "captions": ["c"]}"#,
            r#"{"image": "missing.png", "captions": ["gone"]}"#,
            r#"{"image": "d.png", "captions": ["d"]}"#,
        ];
        let m = p.join("train.jsonl");
        std::fs::write(&m, lines.join("\n")).unwrap();
        (dir, m)
    }

    #[test]
    fn unreadable_images_are_replaced_counted_and_batches_stay_distinct() {
        let (_dir, m) = folder();
        let data = CaptionedImages::new("test", manifest::read(&m).unwrap(), 8, 0.0).unwrap();
        assert_eq!(data.len(), 5);
        tch::manual_seed(0);
        // Slot 1 (corrupt b) is replaced by c (index 2), but c is already in the batch, and
        // missing.png (3) fails too: it lands on d (4).
        let b = data.batch(&[0, 1, 2], Device::Cpu).unwrap();
        assert_eq!(data.skipped(), 2);
        assert_eq!(b.x0.size(), [3, 3, 8, 8]);
        let caps = b.captions.unwrap();
        assert!(caps[0].starts_with("a "), "{caps:?}");
        assert_eq!(caps[1], "d");
        assert_eq!(caps[2], "c");
        // d is (255, 0, 0) -> (1, -1, -1) after scaling.
        assert_eq!(b.x0.double_value(&[1, 0, 3, 3]), 1.0);
        assert_eq!(b.x0.double_value(&[1, 2, 3, 3]), -1.0);
        // c was 16 x 8: shorter side already 8, centre-cropped to 8 x 8.
        assert!((b.x0.double_value(&[2, 0, 0, 0]) - (100.0 / 127.5 - 1.0)).abs() < 1e-6);
    }

    #[test]
    fn an_all_broken_dataset_errors_instead_of_looping() {
        let dir = tempfile::tempdir().unwrap();
        let entries = (0..3)
            .map(|i| Entry {
                image: dir.path().join(format!("{i}.png")),
                captions: vec!["x".into()],
            })
            .collect();
        let data = CaptionedImages::new("broken", entries, 8, 0.0).unwrap();
        let err = data.batch(&[0], Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("no readable image left"), "{err}");
        assert!(err.contains("2.png"), "{err}");
    }

    #[test]
    fn caption_dropout_gives_empty_captions() {
        let (_dir, m) = folder();
        let data = CaptionedImages::new("test", manifest::read(&m).unwrap(), 8, 0.9).unwrap();
        tch::manual_seed(3);
        let caps = (0..20)
            .flat_map(|_| data.batch(&[0], Device::Cpu).unwrap().captions.unwrap())
            .filter(|c| c.is_empty())
            .count();
        assert!(caps >= 12, "{caps} of 20 dropped at p = 0.9");
    }

    #[test]
    fn coco_captions_group_by_image() {
        let dir = tempfile::tempdir().unwrap();
        let ann = dir.path().join("captions.json");
        std::fs::write(
            &ann,
            r#"{"info": {}, "images": [{"id": 7, "file_name": "x.jpg", "height": 1},
                {"id": 9, "file_name": "y.jpg"}, {"id": 11, "file_name": "z.jpg"}],
               "annotations": [{"image_id": 9, "id": 1, "caption": " a dog "},
                {"image_id": 7, "id": 2, "caption": "a cat"}, {"image_id": 9, "id": 3, "caption": "b"}]}"#,
        )
        .unwrap();
        let (entries, uncaptioned) = coco::read(&ann, &dir.path().join("imgs")).unwrap();
        assert_eq!(uncaptioned, 1);
        assert_eq!(entries.len(), 2);
        assert!(entries[0].image.ends_with("imgs/x.jpg"));
        assert_eq!(entries[1].captions, ["a dog", "b"]);
        std::fs::write(&ann, r#"{"images": []}"#).unwrap();
        let err = coco::read(&ann, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("captions.json") && err.contains("annotations"),
            "{err}"
        );
    }

    #[test]
    fn manifest_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.jsonl");
        std::fs::write(
            &m,
            "{\"image\": \"a.png\", \"caption\": \"x\"}\n{\"image\": \"b.png\"}\n",
        )
        .unwrap();
        let err = manifest::read(&m).unwrap_err().to_string();
        assert!(err.contains("m.jsonl") && err.contains("line 2"), "{err}");
    }
}

//! COCO captions: `annotations/captions_train2017.json` (images[] with id + file_name,
//! annotations[] with image_id + caption) over an image folder such as `train2017/`.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::Entry;
use crate::{Error, Result};

#[derive(Deserialize)]
struct CaptionsFile {
    images: Vec<ImageRecord>,
    annotations: Vec<Annotation>,
}

#[derive(Deserialize)]
struct ImageRecord {
    id: u64,
    file_name: String,
}

#[derive(Deserialize)]
struct Annotation {
    image_id: u64,
    caption: String,
}

/// Every image with at least one caption, in the file's image order; the count of images
/// without captions is returned beside them.
pub fn read(annotations: &Path, images: &Path) -> Result<(Vec<Entry>, usize)> {
    let text = std::fs::read(annotations).map_err(|e| Error::file(annotations, e))?;
    let file: CaptionsFile = serde_json::from_slice(&text).map_err(|e| {
        Error::file(
            annotations,
            format!("not a COCO captions file (images[], annotations[]): {e}"),
        )
    })?;
    let mut captions: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for a in file.annotations {
        captions
            .entry(a.image_id)
            .or_default()
            .push(a.caption.trim().to_string());
    }
    let mut entries = Vec::with_capacity(file.images.len());
    let mut uncaptioned = 0;
    for img in file.images {
        match captions.remove(&img.id) {
            Some(c) => entries.push(Entry {
                image: images.join(&img.file_name),
                captions: c,
            }),
            None => uncaptioned += 1,
        }
    }
    Ok((entries, uncaptioned))
}

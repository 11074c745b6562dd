//! `softalign cache`: encodes a captioned image dataset once through the backbone's encoders
//! into fixed-size records. Appends in chunks; each chunk is synced before `progress.json`
//! counts it, so an interrupted run resumes at the last complete chunk.
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use super::layout::*;
use crate::backbone::Backbone;
use crate::dataset::captioned::CaptionedImages;
use crate::logging::progress::Progress;
use crate::tensors::save_safetensors;
use crate::{Error, Result};

pub struct CacheRequest<'a> {
    pub dir: &'a Path,
    pub backbone: &'a dyn Backbone,
    pub data: &'a CaptionedImages,
    /// The raw dataset's spec, recorded (and compared on resume and when training).
    pub source: serde_json::Value,
    pub captions_per_sample: usize,
    pub float_dtype: StoredDType,
    /// Store `Backbone::compact_conditioning` of each caption's conditioning.
    pub compact: bool,
    /// Samples per encoder call.
    pub batch: usize,
    pub progress: bool,
}

#[derive(Debug)]
pub struct CacheSummary {
    pub samples: usize,
    pub resumed_at: usize,
    pub unreadable: usize,
    pub record_bytes: usize,
    pub seconds: f64,
}

/// Digest of what the dataset lists (image file names and their captions), so a cache made
/// from one list is not mistaken for another's.
pub fn source_digest(data: &CaptionedImages) -> String {
    let mut h = Sha256::new();
    for e in data.entries() {
        let name = e
            .image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        h.update(name.unwrap_or_default().as_bytes());
        h.update([0]);
        for c in &e.captions {
            h.update(c.as_bytes());
            h.update([1]);
        }
        h.update([2]);
    }
    format!("{:x}", h.finalize())
}

/// What a fresh manifest would hold before the first chunk fixes the field layout.
fn draft(req: &CacheRequest<'_>) -> Result<Manifest> {
    Ok(Manifest {
        format: FORMAT.into(),
        fingerprint: super::cache_fingerprint(req.backbone, req.compact)?,
        source: req.source.clone(),
        source_sha256: source_digest(req.data),
        samples: req.data.entries().len(),
        captions_per_sample: req.captions_per_sample,
        float_dtype: req.float_dtype,
        compact: req.compact,
        record_bytes: 0,
        fields: Vec::new(),
        written_by: env!("CARGO_PKG_VERSION").into(),
    })
}

/// The settings a resumed cache must share with the request, named where they differ.
fn stale_reasons(have: &Manifest, want: &Manifest) -> Vec<String> {
    let mut r = Vec::new();
    if have.fingerprint != want.fingerprint {
        r.push(format!(
            "encoders differ (cache: {}, now: {})",
            have.fingerprint, want.fingerprint
        ));
    }
    if have.source != want.source {
        r.push(format!(
            "dataset spec differs (cache: {}, now: {})",
            have.source, want.source
        ));
    }
    if have.source_sha256 != want.source_sha256 || have.samples != want.samples {
        r.push(format!(
            "the dataset's sample list changed ({} samples then, {} now)",
            have.samples, want.samples
        ));
    }
    if have.captions_per_sample != want.captions_per_sample {
        r.push(format!(
            "captions_per_sample {} vs {}",
            have.captions_per_sample, want.captions_per_sample
        ));
    }
    if have.compact != want.compact {
        r.push(format!("compact {} vs {}", have.compact, want.compact));
    }
    if have.float_dtype != want.float_dtype {
        r.push(format!(
            "dtype {:?} vs {:?}",
            have.float_dtype, want.float_dtype
        ));
    }
    r
}

/// Tensor bytes in the stored dtype, row-major.
fn bytes_of(t: &Tensor, dtype: StoredDType) -> Result<Vec<u8>> {
    let t = t
        .to_device(tch::Device::Cpu)
        .to_kind(dtype.kind())
        .contiguous();
    let numel = t.numel();
    let mut out = vec![0u8; numel * dtype.size()];
    if numel > 0 {
        t.f_copy_data_u8(&mut out, numel)?;
    }
    Ok(out)
}

pub fn write_cache(req: &CacheRequest<'_>) -> Result<CacheSummary> {
    let start_time = Instant::now();
    if req.captions_per_sample == 0 || req.captions_per_sample > 255 {
        return Err(Error::Recipe(format!(
            "captions_per_sample must be 1..=255, got {}",
            req.captions_per_sample
        )));
    }
    let dir = req.dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let want = draft(req)?;
    let mut manifest = if dir.join(MANIFEST).exists() {
        let have = Manifest::read(dir)?;
        let reasons = stale_reasons(&have, &want);
        if !reasons.is_empty() {
            return Err(Error::file(
                dir,
                format!(
                    "this encoding cache was made with other settings: {}; delete it or \
                     cache into another folder",
                    reasons.join("; ")
                ),
            ));
        }
        Some(have)
    } else {
        None
    };
    let done = Written::read(dir)?.map(|p| p.records).unwrap_or(0);
    let records_path = dir.join(RECORDS);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&records_path)
        .map_err(|e| Error::file(&records_path, e))?;
    // A chunk appended but not counted (the run died between the write and the progress file)
    // is dropped and redone.
    let keep = manifest
        .as_ref()
        .map(|m| m.record_bytes * done)
        .unwrap_or(0);
    file.set_len(keep as u64)
        .map_err(|e| Error::file(&records_path, e))?;
    if !dir.join(EMPTY).exists() {
        let _guard = tch::no_grad_guard();
        let mut empty = req.backbone.encode_prompts(&[String::new()])?;
        if req.compact {
            empty = req.backbone.compact_conditioning(empty)?;
        }
        let named: Vec<(String, Tensor)> = empty.0.into_iter().collect();
        save_safetensors(dir.join(EMPTY), &named, &BTreeMap::new())?;
    }

    let n = req.data.entries().len();
    let bar = Progress::new(req.progress, done as u64, n as u64);
    let mut unreadable = 0;
    let mut at = done;
    while at < n {
        let end = (at + req.batch.max(1)).min(n);
        let chunk = encode_chunk(req, at..end, &mut unreadable)?;
        if manifest.is_none() {
            let fields = chunk
                .iter()
                .map(|(name, (dtype, t))| (name.clone(), *dtype, t.size()[1..].to_vec()))
                .collect();
            let (fields, record_bytes) = Manifest::layout(fields);
            let m = Manifest {
                fields,
                record_bytes,
                ..want.clone()
            };
            let text = serde_json::to_vec_pretty(&m).expect("manifest serialises");
            crate::tensors::write_atomic(&dir.join(MANIFEST), &text)?;
            manifest = Some(m);
        }
        let m = manifest.as_ref().expect("set above");
        let bytes = interleave(m, &chunk, end - at)?;
        file.write_all(&bytes)
            .and_then(|_| file.sync_data())
            .map_err(|e| Error::file(&records_path, e))?;
        Written { records: end }.write(dir)?;
        bar.advance(end as u64, &format!("{} unreadable", unreadable));
        at = end;
    }
    bar.finish();
    let record_bytes = match manifest {
        Some(m) => m.record_bytes,
        None => Manifest::read(dir)?.record_bytes,
    };
    Ok(CacheSummary {
        samples: n,
        resumed_at: done,
        unreadable,
        record_bytes,
        seconds: start_time.elapsed().as_secs_f64(),
    })
}

/// Field name -> (stored dtype, tensor with the samples first), for samples `range`.
fn encode_chunk(
    req: &CacheRequest<'_>,
    range: std::ops::Range<usize>,
    unreadable: &mut usize,
) -> Result<BTreeMap<String, (StoredDType, Tensor)>> {
    let _guard = tch::no_grad_guard();
    let dev = req.backbone.device();
    let k = req.captions_per_sample;
    let r = req.data.resolution() as i64;
    let mut images = Vec::with_capacity(range.len());
    let mut valid = Vec::with_capacity(range.len());
    let mut counts = Vec::with_capacity(range.len());
    let mut captions = Vec::with_capacity(range.len() * k);
    let indices: Vec<usize> = range.clone().collect();
    let loaded = req.data.images_at(&indices)?;
    for (i, img) in range.clone().zip(loaded) {
        match img {
            Ok(t) => {
                images.push(t);
                valid.push(1u8);
            }
            Err(e) => {
                // The slot keeps its place (records are indexed by sample) and is marked
                // invalid; training never draws it.
                eprintln!("warning: caching: skipping sample {i}: {e}");
                *unreadable += 1;
                images.push(Tensor::zeros([3, r, r], (Kind::Float, tch::Device::Cpu)));
                valid.push(0u8);
            }
        }
        let c = &req.data.entries()[i].captions;
        counts.push(c.len().min(k) as u8);
        captions.extend((0..k).map(|j| c.get(j).cloned().unwrap_or_default()));
    }
    let b = range.len() as i64;
    let (mean, std) = req
        .backbone
        .image_posterior(&Tensor::stack(&images, 0).to_device(dev))?;
    let mut cond = req.backbone.encode_prompts(&captions)?;
    if req.compact {
        cond = req.backbone.compact_conditioning(cond)?;
    }
    let f = req.float_dtype;
    let mut out = BTreeMap::new();
    out.insert(
        VALID.to_string(),
        (StoredDType::U8, Tensor::from_slice(&valid).view([b, 1])),
    );
    out.insert(
        CAPTION_COUNT.to_string(),
        (StoredDType::U8, Tensor::from_slice(&counts).view([b, 1])),
    );
    out.insert(X0_MEAN.to_string(), (f, mean));
    if let Some(s) = std {
        out.insert(X0_STD.to_string(), (f, s));
    }
    for (name, t) in cond.0 {
        let mut shape = vec![b, k as i64];
        shape.extend_from_slice(&t.size()[1..]);
        let dtype = StoredDType::for_tensor(&t, f);
        out.insert(format!("{COND_PREFIX}{name}"), (dtype, t.reshape(&shape)));
    }
    Ok(out)
}

/// The chunk's fields rearranged record by record, checked against the manifest's layout.
fn interleave(
    m: &Manifest,
    chunk: &BTreeMap<String, (StoredDType, Tensor)>,
    rows: usize,
) -> Result<Vec<u8>> {
    if chunk.len() != m.fields.len() {
        return Err(Error::invalid(format!(
            "the encoders produced fields {:?}, the cache holds {:?}",
            chunk.keys().collect::<Vec<_>>(),
            m.fields.iter().map(|f| &f.name).collect::<Vec<_>>()
        )));
    }
    let mut columns = Vec::with_capacity(m.fields.len());
    for f in &m.fields {
        let (dtype, t) = chunk.get(&f.name).ok_or_else(|| {
            Error::tensor(&f.name, "the encoders did not produce this cached field")
        })?;
        if *dtype != f.dtype || t.size()[1..] != f.shape[..] {
            return Err(Error::tensor(
                &f.name,
                format!(
                    "encoded as {dtype:?} {:?}, the cache holds {:?} {:?}",
                    &t.size()[1..],
                    f.dtype,
                    f.shape
                ),
            ));
        }
        columns.push(bytes_of(t, f.dtype)?);
    }
    let mut out = Vec::with_capacity(rows * m.record_bytes);
    for r in 0..rows {
        for (f, col) in m.fields.iter().zip(&columns) {
            let w = f.bytes();
            out.extend_from_slice(&col[r * w..(r + 1) * w]);
        }
    }
    Ok(out)
}

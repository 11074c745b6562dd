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

/// The manifest already in `dir`, if any, refused when it was made with other settings.
fn existing_manifest(dir: &Path, want: &Manifest) -> Result<Option<Manifest>> {
    if !dir.join(MANIFEST).exists() {
        return Ok(None);
    }
    let have = Manifest::read(dir)?;
    let reasons = stale_reasons(&have, want);
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
    Ok(Some(have))
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
    write_records(req, req.dir, 0..req.data.entries().len())
}

/// Encodes the samples `range` into `dir` (the whole cache, or one rank's shard of it: its
/// records are those of `range`, and its progress counts from `range.start`).
pub(super) fn write_records(
    req: &CacheRequest<'_>,
    dir: &Path,
    range: std::ops::Range<usize>,
) -> Result<CacheSummary> {
    let start_time = Instant::now();
    if req.captions_per_sample == 0 || req.captions_per_sample > 255 {
        return Err(Error::Recipe(format!(
            "captions_per_sample must be 1..=255, got {}",
            req.captions_per_sample
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let want = draft(req)?;
    let mut manifest = existing_manifest(dir, &want)?;
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

    let n = range.end;
    let bar = Progress::new(req.progress, done as u64, range.len() as u64);
    let mut unreadable = 0;
    let mut at = range.start + done;
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
        let counted = at - range.start;
        // A failed write (a full disk, an I/O error) leaves the progress file at the chunks
        // before it; the partial chunk is cut off now, freeing its space (a resumed run would
        // drop it too), and the error says where a rerun resumes.
        let resumes = |e: &dyn std::fmt::Display| {
            format!("{e} (the cache keeps its {counted} complete samples; rerunning `softalign cache` resumes from there)")
        };
        if let Err(e) = file.write_all(&bytes).and_then(|_| file.sync_data()) {
            let _ = file.set_len((m.record_bytes * counted) as u64);
            return Err(Error::file(&records_path, resumes(&e)));
        }
        Written {
            records: end - range.start,
        }
        .write(dir)
        .map_err(|e| Error::invalid(resumes(&e)))?;
        bar.advance(
            (end - range.start) as u64,
            &format!("{} unreadable", unreadable),
        );
        at = end;
    }
    bar.finish();
    let record_bytes = match manifest {
        Some(m) => m.record_bytes,
        None => Manifest::read(dir)?.record_bytes,
    };
    Ok(CacheSummary {
        samples: range.len(),
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

/// Folder of the shard holding samples `range` while a data-parallel cache is written.
pub const SHARDS: &str = "shards";

/// [`write_cache`] by the ranks of a data-parallel launch: the samples not yet cached are
/// split into one contiguous block per rank, each rank encodes its block into its own shard
/// folder (resumable like a whole cache), and rank 0 appends the shards in order to the cache
/// and removes them. The folder must be on a filesystem every rank sees. Returns, on every
/// rank, the summary of the whole cache.
pub fn write_cache_sharded(
    req: &CacheRequest<'_>,
    c: &dyn crate::train::Collective,
) -> Result<CacheSummary> {
    let start_time = Instant::now();
    let dir = req.dir;
    let n = req.data.entries().len();
    let (rank, world) = (c.rank(), c.world());
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let have = existing_manifest(dir, &draft(req)?)?;
    let base = Written::read(dir)?.map(|p| p.records).unwrap_or(0);
    let block = |r: usize| base + (n - base) * r / world..base + (n - base) * (r + 1) / world;
    let shard_dir = |r: usize| {
        let b = block(r);
        dir.join(SHARDS)
            .join(format!("{:08}-{:08}", b.start, b.end))
    };
    let mine = block(rank);
    let mut unreadable = 0usize;
    if !mine.is_empty() {
        unreadable = write_records(req, &shard_dir(rank), mine)?.unreadable;
    }
    let count = Tensor::from_slice(&[unreadable as f64]).to_device(req.backbone.device());
    c.allreduce_sum(&[count.shallow_clone()], "the unreadable-sample counts")?;
    let unreadable = count.to_device(tch::Device::Cpu).double_value(&[0]) as usize;
    c.barrier("the end of every rank's shard")?;
    if rank == 0 {
        merge_shards(
            dir,
            have,
            base,
            n,
            (0..world).map(|r| (block(r), shard_dir(r))),
        )?;
    }
    c.barrier("the merge of the shards")?;
    let m = Manifest::read(dir)?;
    Ok(CacheSummary {
        samples: n,
        resumed_at: base,
        unreadable,
        record_bytes: m.record_bytes,
        seconds: start_time.elapsed().as_secs_f64(),
    })
}

/// Appends the complete shards to the cache in sample order, then counts them. Until the
/// progress file says so nothing is counted, so a merge cut short is simply done again.
fn merge_shards(
    dir: &Path,
    have: Option<Manifest>,
    base: usize,
    n: usize,
    shards: impl Iterator<Item = (std::ops::Range<usize>, std::path::PathBuf)>,
) -> Result<()> {
    let mut manifest = have;
    let records_path = dir.join(RECORDS);
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&records_path)
        .map_err(|e| Error::file(&records_path, e))?;
    let mut keep = None;
    for (range, sdir) in shards {
        if range.is_empty() {
            continue;
        }
        let got = Written::read(&sdir)?.map(|w| w.records).unwrap_or(0);
        if got != range.len() {
            return Err(Error::file(
                &sdir,
                format!(
                    "this shard holds {got} of its {} samples: its rank stopped early",
                    range.len()
                ),
            ));
        }
        let sm = Manifest::read(&sdir)?;
        let m = manifest.get_or_insert_with(|| sm.clone());
        if sm.fields != m.fields || sm.record_bytes != m.record_bytes {
            return Err(Error::file(
                &sdir,
                "this shard's record layout differs from the cache's (the ranks ran other encoders)",
            ));
        }
        if keep.is_none() {
            // Bytes past the counted records are an earlier merge's, cut short: redone.
            let k = (m.record_bytes * base) as u64;
            out.set_len(k).map_err(|e| Error::file(&records_path, e))?;
            crate::tensors::write_atomic(
                &dir.join(MANIFEST),
                &serde_json::to_vec_pretty(&*m).expect("manifest serialises"),
            )?;
            if !dir.join(EMPTY).exists() {
                std::fs::copy(sdir.join(EMPTY), dir.join(EMPTY))
                    .map_err(|e| Error::file(sdir.join(EMPTY), e))?;
            }
            keep = Some(k);
        }
        let src = sdir.join(RECORDS);
        let mut f = std::fs::File::open(&src).map_err(|e| Error::file(&src, e))?;
        std::io::copy(&mut f, &mut out).map_err(|e| Error::file(&records_path, e))?;
    }
    out.sync_data().map_err(|e| Error::file(&records_path, e))?;
    Written { records: n }.write(dir)?;
    let shards = dir.join(SHARDS);
    if shards.exists() {
        std::fs::remove_dir_all(&shards).map_err(|e| Error::file(&shards, e))?;
    }
    Ok(())
}

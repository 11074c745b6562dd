//! `softalign cache` on an image manifest through the shapes model's encoders, then training
//! from the cache: records hold what the encoders produce, an interrupted cache resumes to the
//! same bytes, other settings are refused, and training reads it.
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{softalign_train, world_image_manifest};
use softalign_backbones::sd3::{FlowMatch, TimestepSampling};
use softalign_backbones::shapes::{ShapesBackbone, ShapesConfig};
use softalign_core::backbone::Backbone;
use softalign_core::cache::EncodedCache;
use softalign_core::dataset::captioned::preprocess;
use softalign_core::dtype::DType;
use tch::Device;

const RECIPE: &str = r#"
name = "cache-smoke"
seed = 2

[backbone]
type = "shapes"
preset = "tiny"

[[adapter]]
type = "soft_tokens"
tokens = 2
sites = "joint_blocks[0..2]"
token_space = "joint"

[[objective]]
type = "softrepa_contrastive"
weight = 1.0

[data]
type = "encoded_cache"
path = "cache"
captions_per_sample = 3
dtype = "f32"
source = { type = "image_manifest", path = "data/train.jsonl", resolution = 32 }

[train]
steps = 3
images_per_step = 4
lr = 1e-2
"#;

fn softalign(args: &[&str], recipe: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_softalign"))
        .args(args)
        .arg("--recipe")
        .arg(recipe)
        .output()
        .unwrap()
}

#[test]
fn cache_resume_refuse_and_train() {
    let dir = tempfile::tempdir().unwrap();
    // Six world images and a corrupt one in the middle (record 3).
    let examples = world_image_manifest(dir.path(), 6, 3);
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, RECIPE).unwrap();

    // Training before caching says what to run.
    let out = softalign(&["train", "--quiet"], &recipe);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("softalign cache"), "{stderr}");

    let out = softalign(&["cache", "--quiet", "--batch", "3"], &recipe);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("broken.png"), "{stderr}");
    assert!(stderr.contains("1 unreadable"), "{stderr}");
    let cache_dir = dir.path().join("cache");
    let records = std::fs::read(cache_dir.join("records.bin")).unwrap();

    // What the records hold: the images' pixels and every caption's ids, as the backbone
    // encodes them.
    let cache = EncodedCache::open(&cache_dir, 0.0).unwrap();
    assert_eq!(cache.manifest().samples, 7);
    assert_eq!(records.len(), 7 * cache.manifest().record_bytes);
    use softalign_core::dataset::Dataset;
    assert_eq!(cache.len(), 6, "the broken image is not drawn");
    let noise = FlowMatch::new(TimestepSampling::UniformInt, 1.0).unwrap();
    let model = ShapesBackbone::random(
        &ShapesConfig::tiny().unwrap(),
        Device::Cpu,
        DType::F32,
        noise,
    )
    .unwrap();
    for (record, ex) in [(0, &examples[0]), (4, &examples[3])] {
        let want = preprocess::to_tensor(&ex.image);
        let got = cache.tensor(record, "x0.mean").unwrap();
        assert!(got.equal(&want), "record {record}: pixels differ");
        let ids = model.encode_prompts(&ex.captions[..3]).unwrap();
        let want = ids.get("input_ids").unwrap();
        let got = cache.tensor(record, "cond.input_ids").unwrap();
        assert!(got.equal(want), "record {record}: caption ids differ");
    }
    assert_eq!(
        cache.tensor(3, "valid").unwrap().int64_value(&[0]),
        0,
        "the broken image's slot is marked"
    );
    drop(cache);

    // An interrupted run: progress at 3 records and a torn half chunk after them.
    std::fs::write(cache_dir.join("progress.json"), r#"{"records": 3}"#).unwrap();
    let mut torn = records[..3 * (records.len() / 7)].to_vec();
    torn.extend_from_slice(&[7u8; 100]);
    std::fs::write(cache_dir.join("records.bin"), &torn).unwrap();
    let out = softalign(&["cache", "--quiet", "--batch", "2"], &recipe);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resumed at 3"), "{stderr}");
    assert_eq!(
        std::fs::read(cache_dir.join("records.bin")).unwrap(),
        records,
        "resumed cache differs from the straight one"
    );

    // A write the OS refuses part-way (here EFBIG from a file-size limit, which root does not
    // bypass; a full disk takes the same path): a clean error naming the file and the OS
    // error, progress still at the complete chunks, and a rerun resumes to the same bytes.
    let full = dir.path().join("cache-full");
    let set = format!("data.path={}", full.display());
    let rb = records.len() / 7;
    let out = {
        use std::os::unix::process::CommandExt;
        let limit = (4 * rb) as libc::rlim_t;
        let mut c = Command::new(env!("CARGO_BIN_EXE_softalign"));
        c.args([
            "cache", "--quiet", "--batch", "3", "--set", &set, "--recipe",
        ])
        .arg(&recipe);
        // SAFETY: signal and setrlimit are async-signal-safe.
        unsafe {
            c.pre_exec(move || {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let lim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c.output().unwrap()
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cache-full/records.bin"), "{stderr}");
    assert!(stderr.contains("os error 27"), "{stderr}");
    assert!(stderr.contains("keeps its 3 complete samples"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(full.join("progress.json")).unwrap(),
        r#"{"records":3}"#
    );
    assert_eq!(
        std::fs::read(full.join("records.bin")).unwrap(),
        &records[..3 * rb]
    );
    let out = softalign(
        &["cache", "--quiet", "--batch", "3", "--set", &set],
        &recipe,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("resumed at 3"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(full.join("records.bin")).unwrap(), records);

    // Two ranks (launched as torchrun's env:// does) cache the same records: first resuming
    // the interrupted state (3 records and a torn chunk), then from nothing.
    std::fs::write(cache_dir.join("progress.json"), r#"{"records": 3}"#).unwrap();
    std::fs::write(cache_dir.join("records.bin"), &torn).unwrap();
    let two_ranks = |sets: &[&str]| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let children: Vec<_> = (0..2)
            .map(|r| {
                let mut c = Command::new(env!("CARGO_BIN_EXE_softalign"));
                c.args(["cache", "--quiet", "--batch", "2", "--recipe"])
                    .arg(&recipe)
                    .env("RANK", r.to_string())
                    .env("WORLD_SIZE", "2")
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string());
                for s in sets {
                    c.args(["--set", s]);
                }
                c.stderr(std::process::Stdio::piped()).spawn().unwrap()
            })
            .collect();
        let outs: Vec<Output> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        for o in &outs {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        String::from_utf8_lossy(&outs[0].stderr).into_owned()
    };
    let said = two_ranks(&[]);
    assert!(said.contains("resumed at 3"), "{said}");
    assert_eq!(
        std::fs::read(cache_dir.join("records.bin")).unwrap(),
        records,
        "the cache two ranks resumed differs from the straight one"
    );
    assert!(
        !cache_dir.join("shards").exists(),
        "the shards are merged away"
    );
    // (`--set` paths are taken from the working directory.)
    let two = dir.path().join("cache-two");
    let said = two_ranks(&[&format!("data.path={}", two.display())]);
    assert!(said.contains("1 unreadable"), "{said}");
    assert_eq!(
        std::fs::read(two.join("records.bin")).unwrap(),
        records,
        "the cache two ranks wrote differs from one process's"
    );

    // Other settings are refused, by `cache` and by `train`.
    let out = softalign(
        &["cache", "--quiet", "--set", "data.captions_per_sample=2"],
        &recipe,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("captions_per_sample 3 vs 2"), "{stderr}");
    let out = softalign(
        &["train", "--quiet", "--set", "data.source.resolution=16"],
        &recipe,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("stale encoding cache"), "{stderr}");

    // Training reads it.
    let run = dir.path().join("run");
    let out = softalign_train(&recipe, &run);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
}

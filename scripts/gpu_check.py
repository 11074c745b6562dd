"""The GPU check (issue 18): softalign beside diffusers / transformers on one device.

1. Parity: tiny random SD3 (plain and SD3.5-style qk-norm), UNet (SD1.5- and SDXL-like), CLIP,
   T5 and VAE folders, one forward in f32, bf16 and f16, `softalign forward` against the Python
   model on the same device. The truth is the Python model in f32 with TF32 off; an error is
   max |out - truth| / max |truth|. softalign passes a dtype when its error is at most twice
   the Python model's own error in that dtype (run with PyTorch's default TF32 settings, which
   libtorch shares: on a GPU, f32 convolutions use TF32), or under the dtype's floor (FLOOR).
2. Speed: `softalign bench --config C.json --json` and the same four steps in PyTorch +
   diffusers on the same config, batch, resolution, text length, tokens and dtype (forward;
   forward with SoftREPA tokens; forward+backward to the input; forward+backward to the
   tokens), median ms and pairs/s, with each process's peak device memory (nvidia-smi,
   polled every 50 ms: the caching allocator's reserve plus the CUDA context) beside
   PyTorch's own max_memory_allocated / reserved.

It writes gpu-check.json and gpu-check.md in --out. `--smoke` (small shapes; four of the seven
parity models in f32 and bf16; the MMDiT's speed only, one timed step) is what the test suite
runs on the CPU; scripts/gpu-check.sh is the one command a session with a lent GPU runs.

usage: gpu_check.py --bin target/release/softalign --device cuda --out DIR [--smoke]
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# Relative error under which a dtype passes whatever the Python model's own error is.
FLOOR = {"f32": 2e-5, "bf16": 3e-2, "f16": 4e-3}

SD3_MEDIUM = dict(  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
SD15 = dict(  # stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32)
# Small stand-ins for the CPU smoke form.
SD3_SMALL = dict(SD3_MEDIUM, num_layers=3, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32)
SD15_SMALL = dict(SD15, block_out_channels=[32, 64, 64, 64], layers_per_block=1,
                  attention_head_dim=4, cross_attention_dim=64, norm_num_groups=16)


def rel_err(a, truth):
    return float((a.float() - truth.float()).abs().max() / truth.float().abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------- parity: model makers
# The tiny configs and inputs are the parity fixtures' own (tests/python), run here on a device.
def make_sd3(qk_norm):
    from diffusers import SD3Transformer2DModel
    import sd3_fixtures as sf
    cfg = dict(sf.BASE, num_layers=3, qk_norm=qk_norm)
    inp = sf.inputs(cfg, (8, 8), torch.Generator().manual_seed(1))

    def fwd(model, x):
        return {"sample": model(**x, return_dict=False)[0]}
    return SD3Transformer2DModel(**cfg), inp, fwd


def make_unet(kind):
    from diffusers import UNet2DConditionModel
    import unet_fixtures as uf
    cfg = dict(uf.SD15 if kind == "sd15" else uf.SDXL)
    m = UNet2DConditionModel(**cfg)
    inp = uf.inputs(cfg, (16, 16), torch.Generator().manual_seed(2))

    def fwd(model, x):
        kw = {}
        if "text_embeds" in x:
            kw["added_cond_kwargs"] = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
        return {"sample": model(x["sample"], x["timestep"], x["encoder_hidden_states"],
                                return_dict=False, **kw)[0]}
    return m, inp, fwd


def make_clip():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    import clip_fixtures as cf
    _, over, (bos, eos, _, (lo, hi), _), _ = cf.CASES["legacy_proj_short"]
    m = CLIPTextModelWithProjection(CLIPTextConfig(**{**cf.BASE, **over}))
    ids = torch.randint(lo, hi, (2, cf.SEQ), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = bos
    ids[0, 9:] = eos
    ids[1, 15] = eos

    def fwd(model, x):
        o = model(input_ids=x["input_ids"])
        return {"last_hidden_state": o.last_hidden_state, "text_embeds": o.text_embeds}
    return m, {"input_ids": ids}, fwd


def make_t5():
    from transformers import T5Config, T5EncoderModel
    import codecs_text as ct
    m = T5EncoderModel(T5Config(**ct.T5_BASE, **ct.T5_CASES["gated_gelu"]))
    ids = torch.randint(0, ct.T5_BASE["vocab_size"], (2, ct.SEQ),
                        generator=torch.Generator().manual_seed(4))

    def fwd(model, x):
        return {"last_hidden_state": model(input_ids=x["input_ids"]).last_hidden_state}
    return m, {"input_ids": ids}, fwd


def make_vae():
    from diffusers import AutoencoderKL
    import codecs_vae as cv
    m = AutoencoderKL(**cv.BASE, **cv.CASES["kl16_sd3"])
    g = torch.Generator().manual_seed(5)
    inp = {"sample": torch.rand(2, 3, 16, 12, generator=g) * 2 - 1,
           "latents": torch.randn(2, 16, 8, 6, generator=g)}

    def fwd(model, x):
        post = model.encode(x["sample"]).latent_dist
        return {"latent_dist.mean": post.mean, "sample": model.decode(x["latents"]).sample}
    return m, inp, fwd


CASES = {
    "sd3": lambda: make_sd3(None),
    "sd3.5 (qk rms-norm)": lambda: make_sd3("rms_norm"),
    "unet sd1.5": lambda: make_unet("sd15"),
    "unet sdxl (text_time)": lambda: make_unet("sdxl"),
    "clip text": make_clip,
    "t5 encoder": make_t5,
    "vae (sd3, encode+decode)": make_vae,
}


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("weight") and ("norm" in name or "layer_norm" in name) and p.dim() == 1:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise * 0.2)


def cast_inputs(inp, dtype, device):
    out = {}
    for k, v in inp.items():
        v = v.to(device)
        # Timesteps stay f32, as the pipelines pass them; ids stay integers.
        if v.is_floating_point() and k != "timestep":
            v = v.to(dtype)
        out[k] = v
    return out


def exact_f32(on):
    """TF32 off for the truth; PyTorch's defaults (TF32 convolutions through cuDNN, full-f32
    matrix products) for the runs compared with softalign, whose libtorch has the same ones."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = not on


# The smoke form's subset: one transformer, one UNet, one text encoder, one VAE.
SMOKE_CASES = ("sd3", "unet sd1.5", "clip text", "vae (sd3, encode+decode)")


def run_parity(bin_path, device, work, smoke):
    rows = []
    for k, (name, make) in enumerate(CASES.items()):
        if smoke and name not in SMOKE_CASES:
            continue
        torch.manual_seed(k)
        model, inp, fwd = make()
        model = model.eval()
        randomise(model, 100 + k)
        d = os.path.join(work, f"parity{k}")
        model.save_pretrained(os.path.join(d, "model"), safe_serialization=True)
        save_file({n: v.contiguous() for n, v in inp.items()}, os.path.join(d, "in.safetensors"))
        exact_f32(True)
        with torch.no_grad():
            truth = fwd(model.to(device), cast_inputs(inp, torch.float32, device))
        exact_f32(False)
        for dname, dtype in DTYPES.items():
            if smoke and dname == "f16":
                continue
            row = {"model": name, "dtype": dname}
            try:
                m = copy.deepcopy(model).to(device=device, dtype=dtype)
                with torch.no_grad():
                    py = fwd(m, cast_inputs(inp, dtype, device))
                del m
                row["py_err"] = max(rel_err(py[o], truth[o]) for o in truth)
            except Exception as e:  # a dtype the Python side cannot run on this device
                row["py_err"] = None
                row["py_note"] = f"{type(e).__name__}: {str(e)[:120]}"
            out = os.path.join(d, f"out-{dname}.safetensors")
            t0 = time.time()
            r = subprocess.run([bin_path, "forward", "--model", os.path.join(d, "model"),
                                "--inputs", os.path.join(d, "in.safetensors"), "--output", out,
                                "--dtype", dname, "--device", device_arg(device)],
                               capture_output=True, text=True)
            row["sa_seconds"] = round(time.time() - t0, 2)
            if r.returncode != 0:
                row["sa_err"] = None
                row["sa_note"] = (r.stderr.strip().splitlines() or ["failed"])[-1][:200]
                # softalign refuses T5 in fp16 on purpose (its activations overflow fp16 in the
                # released weights); a clear refusal is the expected result, not a failure.
                row["refused"] = name.startswith("t5") and dname == "f16" and "fp16" in row["sa_note"]
                row["pass"] = row["refused"]
            else:
                got = load_file(out)
                row["sa_err"] = max(rel_err(got[o], truth[o].cpu()) for o in truth)
                py_err = row["py_err"] if row["py_err"] is not None else 0.0
                row["bound"] = max(2 * py_err, FLOOR[dname])
                row["pass"] = row["sa_err"] <= row["bound"]
            print(f"parity {name:26s} {dname:5s} softalign {fmt(row.get('sa_err'))} "
                  f"python {fmt(row.get('py_err'))} {status(row)}", flush=True)
            rows.append(row)
    return rows


def status(row):
    if row.get("refused"):
        return "refused by design"
    return "ok" if row["pass"] else "FAIL"


def device_arg(device):
    return "cuda:0" if device.type == "cuda" else "cpu"


def fmt(x):
    return "n/a" if x is None else f"{x:.2e}"


# ---------------------------------------------------------------- speed
class MemPoll:
    """Peak device memory in use (MiB) over a child process's life, by nvidia-smi."""

    def __init__(self, device):
        self.on = device.type == "cuda"
        self.peak = None
        self.base = None
        self._stop = threading.Event()

    def _used(self):
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                            "-i", "0"], capture_output=True, text=True)
        return float(r.stdout.strip().splitlines()[0])

    def __enter__(self):
        if self.on:
            try:
                self.base = self._used()
            except Exception:
                self.on = False
                return self
            self.peak = self.base

            def loop():
                while not self._stop.wait(0.05):
                    try:
                        self.peak = max(self.peak, self._used())
                    except Exception:
                        pass
            self._t = threading.Thread(target=loop, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *a):
        if self.on:
            self._stop.set()
            self._t.join()

    def mib(self):
        return None if not self.on else round(self.peak - self.base)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_cases(cases, device, warmup, iters, batch):
    for _, step in cases:
        for _ in range(warmup):
            step()
    times = [[] for _ in cases]
    for _ in range(iters):  # round-robin, as softalign's bench
        for k, (_, step) in enumerate(cases):
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    rows = []
    for (name, _), v in zip(cases, times):
        s = statistics.median(v)
        rows.append({"case": name, "ms_per_step": s * 1000, "pairs_per_s": batch / s})
    return rows


def four_cases(run, x, tokens):
    """The four steps softalign's bench times, in PyTorch: `run(x, tokens)` is one denoiser
    forward (tokens None: the bare model). Gradients go to the input without tokens, else to
    the tokens (fp32 parameters, cast to the model's dtype where they are injected)."""
    def fwd():
        with torch.no_grad():
            run(x, None)

    def fwd_tok():
        with torch.no_grad():
            run(x, tokens)

    def train_in():
        run(x.detach().requires_grad_(True), None).float().square().mean().backward()

    def train_tok():
        run(x, tokens).float().square().mean().backward()
        for t in tokens:
            t.grad = None
    return [("sampling step: forward", fwd), ("sampling step: + soft tokens", fwd_tok),
            ("training step: fwd+bwd (to input)", train_in), ("training step: + soft tokens", train_tok)]


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, device=g.device, generator=g, dtype=dtype)


def py_bench_sd3(cfg, a, device, dtype):
    from diffusers import SD3Transformer2DModel
    import sd3_fixtures as sf
    with torch.device(device):
        model = SD3Transformer2DModel(**cfg).to(dtype).eval()
    model.requires_grad_(False)
    lat = a.resolution // 8
    g = torch.Generator(device).manual_seed(0)
    inp = {"timestep": torch.randint(0, 1000, (a.batch,), device=device, generator=g).float(),
           "encoder_hidden_states": randn(g, a.batch, a.text_len, cfg["joint_attention_dim"], dtype=dtype),
           "pooled_projections": randn(g, a.batch, cfg["pooled_projection_dim"], dtype=dtype)}
    x = randn(g, a.batch, cfg["in_channels"], lat, lat, dtype=dtype)
    jd = model.inner_dim
    tokens = [(randn(g, a.token_blocks, a.tokens, jd) * 0.02).requires_grad_(True),
              (randn(g, 100, a.token_blocks * jd) * 0.02).requires_grad_(True)]

    def run(xi, tok):
        step = dict(inp, hidden_states=xi)
        if tok is None:
            return model(**step, return_dict=False)[0]
        return sf.injected_forward(model, step, tok[0].to(dtype), tok[1].to(dtype), "joint", a.token_blocks)
    return run_py_cases(a, device, four_cases(run, x, tokens))


def py_bench_unet(cfg, a, device, dtype):
    from diffusers import UNet2DConditionModel
    import unet_fixtures as uf
    with torch.device(device):
        model = UNet2DConditionModel(**cfg).to(dtype).eval()
    model.requires_grad_(False)
    lat = a.resolution // 8
    g = torch.Generator(device).manual_seed(0)
    inp = {"timestep": torch.randint(0, 1000, (a.batch,), device=device, generator=g).float(),
           "encoder_hidden_states": randn(g, a.batch, a.unet_text_len, cfg["cross_attention_dim"], dtype=dtype)}
    x = randn(g, a.batch, cfg["in_channels"], lat, lat, dtype=dtype)
    tokens = [(randn(g, 1, a.tokens, cfg["cross_attention_dim"]) * 0.02).requires_grad_(True)]

    def run(xi, tok):
        if tok is None:
            return model(xi, inp["timestep"], inp["encoder_hidden_states"], return_dict=False)[0]
        return uf.tokens_forward(model, dict(inp, sample=xi), tok[0].to(dtype))
    return run_py_cases(a, device, four_cases(run, x, tokens))


def run_py_cases(a, device, cases):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = time_cases(cases, device, a.warmup, a.iters, a.batch)
    mem = {}
    if device.type == "cuda":
        mem = {"torch_max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
               "torch_max_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20)}
    return rows, mem


def py_bench_child(a):
    """Runs in its own process so that its device memory is measured alone."""
    device = torch.device(a.device)
    cfg = json.load(open(a.child_config))
    dtype = DTYPES[a.dtype]
    if a.child_kind == "sd3":
        rows, mem = py_bench_sd3(cfg, a, device, dtype)
    else:
        rows, mem = py_bench_unet(cfg, a, device, dtype)
    json.dump({"rows": rows, "mem": mem}, open(a.child_out, "w"))


def run_speed(a, device, work, results, checkpoint):
    sd3 = SD3_SMALL if a.smoke else SD3_MEDIUM
    unet = SD15_SMALL if a.smoke else SD15
    models = [("sd3", sd3, "SD3-medium-shaped" if not a.smoke else "SD3 small", a.text_len),
              ("unet", unet, "SD1.5-shaped UNet" if not a.smoke else "UNet small", a.unet_text_len)]
    for kind, cfg, label, text_len in models[:1] if a.smoke else models:
        cpath = os.path.join(work, f"{kind}.json")
        json.dump(dict(cfg, _class_name="SD3Transformer2DModel" if kind == "sd3" else "UNet2DConditionModel"),
                  open(cpath, "w"))
        sa_json = os.path.join(work, f"{kind}-softalign.json")
        cmd = [a.bin, "bench", "--backbone", kind, "--config", cpath, "--batch", str(a.batch),
               "--resolution", str(a.resolution), "--text-len", str(text_len), "--iters", str(a.iters),
               "--warmup", str(a.warmup), "--tokens", str(a.tokens), "--dtype", a.dtype,
               "--device", device_arg(device), "--json", sa_json]
        if kind == "sd3":
            cmd += ["--token-blocks", str(a.token_blocks)]
        with MemPoll(device) as mp:
            r = subprocess.run(cmd, capture_output=True, text=True)
        entry = {"model": label, "config": cfg, "batch": a.batch, "resolution": a.resolution,
                 "text_len": text_len, "dtype": a.dtype}
        if r.returncode != 0:
            entry["softalign_error"] = r.stderr.strip()[-500:]
            print(f"speed {label}: softalign bench failed: {entry['softalign_error']}", flush=True)
        else:
            print(r.stdout, flush=True)
            entry["softalign"] = json.load(open(sa_json))
            entry["softalign_device_peak_mib"] = mp.mib()
        child_out = os.path.join(work, f"{kind}-pytorch.json")
        pcmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--child-config", cpath,
                "--child-out", child_out, "--device", a.device, "--dtype", a.dtype,
                "--batch", str(a.batch), "--resolution", str(a.resolution), "--text-len", str(a.text_len),
                "--unet-text-len", str(a.unet_text_len), "--iters", str(a.iters), "--warmup", str(a.warmup),
                "--tokens", str(a.tokens), "--token-blocks", str(a.token_blocks), "--bin", a.bin, "--out", work]
        with MemPoll(device) as mp:
            r = subprocess.run(pcmd, capture_output=True, text=True)
        if r.returncode != 0:
            entry["pytorch_error"] = r.stderr.strip()[-800:]
            print(f"speed {label}: PyTorch bench failed: {entry['pytorch_error']}", flush=True)
        else:
            child = json.load(open(child_out))
            entry["pytorch"] = child["rows"]
            entry["pytorch_mem"] = child["mem"]
            entry["pytorch_device_peak_mib"] = mp.mib()
        results.append(entry)
        checkpoint()


# ---------------------------------------------------------------- report
def markdown(report):
    env = report["env"]
    lines = [f"# softalign GPU check ({env['device_name']}, torch {env['torch']}, {env['when']})", ""]
    lines += ["## Parity (relative max error against the f32 truth)", "",
              "| model | dtype | softalign | PyTorch same dtype | bound | |", "|---|---|---:|---:|---:|---|"]
    for r in report["parity"]:
        note = r.get("sa_note") or r.get("py_note") or ""
        lines.append(f"| {r['model']} | {r['dtype']} | {fmt(r.get('sa_err'))} | {fmt(r.get('py_err'))} | "
                     f"{fmt(r.get('bound'))} | {status(r) + ('' if r['pass'] and not r.get('refused') else ': ' + note)} |")
    for s in report["speed"]:
        lines += ["", f"## {s['model']}: batch {s['batch']}, {s['resolution']} px, text {s['text_len']}, {s['dtype']}", ""]
        if "softalign" not in s or "pytorch" not in s:
            lines.append(f"failed: {s.get('softalign_error') or s.get('pytorch_error')}")
            continue
        py = {r["case"]: r for r in s["pytorch"]}
        lines += ["| step | softalign ms | PyTorch + diffusers ms | speed-up | softalign pairs/s |",
                  "|---|---:|---:|---:|---:|"]
        for r in s["softalign"]:
            p = py.get(r["case"])
            ratio = f"{p['ms_per_step'] / r['ms_per_step']:.2f}x" if p else ""
            pm = f"{p['ms_per_step']:.1f}" if p else "(not run)"
            lines.append(f"| {r['case']} | {r['ms_per_step']:.1f} | {pm} | {ratio} | {r['pairs_per_s']:.2f} |")
        lines += ["", f"Peak device memory in use (nvidia-smi, whole process, all cases): softalign "
                  f"{s.get('softalign_device_peak_mib')} MiB (its run also times the LoRA cases), "
                  f"PyTorch {s.get('pytorch_device_peak_mib')} MiB; PyTorch's allocator: {s.get('pytorch_mem')}."]
    return "\n".join(lines) + "\n"


def save(report, out):
    json.dump(report, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
    md = markdown(report)
    open(os.path.join(out, "gpu-check.md"), "w").write(md)
    return md


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", default="target/release/softalign")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="small shapes, for the CPU test")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--dtype", default=None, help="speed dtype (default bf16 on CUDA, f32 on CPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--text-len", type=int, default=None)
    p.add_argument("--unet-text-len", type=int, default=77)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--token-blocks", type=int, default=5)
    p.add_argument("--child", default=None)
    p.add_argument("--child-config", default=None)
    p.add_argument("--child-out", default=None)
    a = p.parse_args()
    a.child_kind = a.child
    if a.dtype is None:
        a.dtype = "bf16" if a.device.startswith("cuda") else "f32"
    if a.batch is None:
        a.batch = 2 if a.smoke else 8
    if a.resolution is None:
        a.resolution = 64 if a.smoke else 512
    if a.text_len is None:
        a.text_len = 16 if a.smoke else 333
    if a.iters is None:
        a.iters = 1 if a.smoke else 10
    if a.smoke:
        a.warmup = 0
        a.token_blocks = min(a.token_blocks, SD3_SMALL["num_layers"])
        a.unet_text_len = 16
    if a.child:
        return py_bench_child(a)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda but this torch sees no GPU")
    os.makedirs(a.out, exist_ok=True)
    env = {"torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU",
           "softalign": subprocess.run([a.bin, "--version"], capture_output=True, text=True).stdout.strip()}
    report = {"env": env, "parity": [], "speed": []}
    with tempfile.TemporaryDirectory() as work:
        t0 = time.time()
        if not a.skip_parity:
            report["parity"] = run_parity(a.bin, device, work, a.smoke)
        env["parity_seconds"] = round(time.time() - t0, 1)
        save(report, a.out)  # a run stopped at its time limit keeps what it measured
        t0 = time.time()
        if not a.skip_speed:
            run_speed(a, device, work, report["speed"], lambda: save(report, a.out))
        env["speed_seconds"] = round(time.time() - t0, 1)
    print(save(report, a.out))
    failed = [r for r in report["parity"] if not r["pass"]]
    broken = [s for s in report["speed"] if "softalign" not in s or "pytorch" not in s]
    if failed or broken:
        sys.exit(f"gpu_check: {len(failed)} parity case(s) failed, {len(broken)} speed run(s) broke")


if __name__ == "__main__":
    main()

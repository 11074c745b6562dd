"""References for the detector and the counting objective.

Writes into OUT:
  yolov8n.torchscript    a random-weight yolov8n built from yolov8n.yaml and exported offline by
                         ultralytics at imgsz 64 (class-score biases spread so that NMS keeps boxes)
  yolo_io.safetensors    input (N, 3, 64, 64) fixed images, raw: the module's output on them
  yolo_nms.json          ultralytics' non_max_suppression on raw (conf 0.25, iou 0.7): per image
                         the boxes (xyxy), scores, classes and per-class counts
  img_K.png              images for `softalign detect` (sizes 64x64, 40x64, 32x48)
  detect_io.safetensors  input: their letterboxed tensors (torch bilinear + pad 114/255), raw
  detect_nms.json        ultralytics' NMS counts on that raw
  tiny_detector.torchscript   a traced 2-class detector in the same convention (input 16x16)
  count_case_K.safetensors    the toy step of objectives_reference.py with per-image timesteps
  count_expected.json    counting terms per case; count_grads.safetensors: d total / d adapter

usage: counting_reference.py OUT
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import objectives_reference as ref  # noqa: E402

OUT = sys.argv[1]
PAD = 114.0 / 255.0


def letterbox(img, size):
    """(1, 3, h, w) in [0, 1] -> (1, 3, S, S): ultralytics' LetterBox arithmetic, torch resize."""
    h, w = img.shape[-2:]
    r = min(size / h, size / w)
    nh, nw = round(h * r), round(w * r)
    if (nh, nw) != (h, w):
        img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False)
    dh, dw = (size - nh) / 2, (size - nw) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return F.pad(img, (left, right, top, bottom), value=PAD)


def yolo():
    os.environ["YOLO_OFFLINE"] = "true"
    os.environ["YOLO_CONFIG_DIR"] = os.path.join(OUT, "ultralytics-config")
    from ultralytics import YOLO
    from ultralytics.utils.nms import non_max_suppression

    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml")
    g = torch.Generator().manual_seed(7)
    head = model.model.model[-1]
    with torch.no_grad():
        for seq in head.cv3:  # the class branch's last conv per stride
            seq[-1].bias.copy_(torch.randn(seq[-1].bias.shape, generator=g) * 1.5 - 1.0)
    cwd = os.getcwd()
    os.chdir(OUT)
    try:
        path = model.export(format="torchscript", imgsz=64, device="cpu", verbose=False)
    finally:
        os.chdir(cwd)
    os.replace(os.path.join(OUT, os.path.basename(path)), os.path.join(OUT, "yolov8n.torchscript"))
    ts = torch.jit.load(os.path.join(OUT, "yolov8n.torchscript"))

    def nms_json(raw):
        res = non_max_suppression(raw.clone(), conf_thres=0.25, iou_thres=0.7)
        out = []
        for r in res:
            counts = {}
            for c in r[:, 5].long().tolist():
                counts[c] = counts.get(c, 0) + 1
            out.append({
                "boxes": r[:, :4].tolist(), "scores": r[:, 4].tolist(),
                "classes": r[:, 5].long().tolist(), "counts": {str(k): v for k, v in counts.items()},
            })
        return out

    x = torch.rand(3, 3, 64, 64, generator=g)
    x[2] = 0.5 + 0.5 * torch.sin(torch.linspace(0, 20, 64)).view(1, 1, 64) * torch.cos(torch.linspace(0, 13, 64)).view(1, 64, 1)
    with torch.no_grad():
        raw = ts(x)
    save_file({"input": x.contiguous(), "raw": raw.contiguous()}, os.path.join(OUT, "yolo_io.safetensors"))
    with open(os.path.join(OUT, "yolo_nms.json"), "w") as f:
        json.dump(nms_json(raw), f)

    # Files for `softalign detect`: PNG bytes, so both sides read the same uint8 pixels.
    import numpy as np
    from PIL import Image
    inputs = []
    for k, (h, w) in enumerate([(64, 64), (40, 64), (32, 48)]):
        arr = (torch.rand(h, w, 3, generator=g) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(np.ascontiguousarray(arr)).save(os.path.join(OUT, f"img_{k}.png"))
        t = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        inputs.append(letterbox(t, 64))
    inp = torch.cat(inputs)
    with torch.no_grad():
        raw = ts(inp)
    save_file({"input": inp.contiguous(), "raw": raw.contiguous()}, os.path.join(OUT, "detect_io.safetensors"))
    with open(os.path.join(OUT, "detect_nms.json"), "w") as f:
        json.dump(nms_json(raw), f)


# ---- the counting objective ---------------------------------------------------------------
NAMES = ["cat", "dog"]
DET = 16  # the tiny detector's input size
THRESHOLD, CANDIDATE, IOU, TEMPERATURE = 0.3, 0.05, 0.3, 0.1


class TinyDetector(torch.nn.Module):
    """Stride-2 anchors on a 16x16 input, YOLOv8's output convention: [B, 4 + 2, 64]."""

    def __init__(self, g):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4 + len(NAMES), 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.8)
            # Few confident anchors and wide boxes, so NMS has work and counts stay small.
            self.conv2.bias[4:] -= 1.5
            self.conv2.bias[4] += 2.5
        ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys]).reshape(1, 2, 64) + 0.5)

    def forward(self, x):
        o = self.conv2(F.silu(self.conv1(x))).flatten(2)
        xy = (self.grid + torch.tanh(o[:, :2])) * 2.0
        wh = torch.exp(o[:, 2:4].clamp(-1, 1)) * 10.0
        return torch.cat([xy, wh, torch.sigmoid(o[:, 4:])], 1)


def toy_decode(x):
    """What the Rust toy backbone's decode does: the first three channels through tanh."""
    return torch.tanh(x[:, :3])


def parse(caption):
    """The cases' captions, parsed by hand (the Rust parser has its own tests)."""
    return {
        "a photo of two cats": {0: 2},
        "a dog and three cats": {0: 3, 1: 1},
        "two dogs": {1: 2},
        "a photo of nothing": {},
        "one cat": {0: 1},
    }[caption]


def counting(w, det, batch, state, max_timestep):
    """The counting term on a step with per-image timesteps (B,)."""
    b = batch["x0"].shape[0]
    sel = (state, "positive", False) if state is not None else None
    sq, n_targets, images = [], 0, 0
    for i in range(b):
        t = batch["t"][i]
        targets = parse(batch["captions"][i])
        if not (t < max_timestep) or not targets:
            continue
        images += 1
        s = t / 1000.0
        x_t = (1 - s) * batch["x0"][i] + s * batch["noise"][i]
        pred = ref.forward(w, x_t.unsqueeze(0), t.reshape(1), batch["ehs"][i:i + 1], batch["pooled"][i:i + 1], sel)
        x0 = x_t.unsqueeze(0) - s * pred
        rgb = (toy_decode(x0) + 1) / 2
        raw = det(letterbox(rgb, DET))[0]  # (4 + nc, A)
        scores, cls = raw[4:].detach().max(0)
        cand = torch.nonzero(scores > CANDIDATE).flatten()
        box = raw[:4, cand].detach().T
        xyxy = torch.cat([box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2], 1)
        keep = cand[torchvision.ops.batched_nms(xyxy, scores[cand], cls[cand], IOU)]
        for c, n in targets.items():
            kc = keep[cls[keep] == c]
            soft = torch.sigmoid((raw[4 + c, kc] - THRESHOLD) / TEMPERATURE).sum()
            if os.environ.get("COUNTING_DEBUG"):
                print(batch["captions"][i], c, n, float(soft), len(kc), int((raw[4 + c, kc] > THRESHOLD).sum()))
            sq.append((soft - n) ** 2)
            n_targets += 1
    loss = torch.stack(sq).mean() if sq else torch.zeros(())
    return loss, images


def count_cases():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    w = ref.make_weights(g)  # the same toy.safetensors objectives_reference.py writes
    save_file({k: v.contiguous() for k, v in w.items()}, f"{OUT}/toy.safetensors")
    sites = len(ref.TOKEN_SITES)
    state = {}
    for s in ["positive", "negative"]:
        state[f"{s}.tokens"] = torch.randn(sites, ref.N_TOK, ref.DC, generator=g) * 0.5
        state[f"ema.{s}.tokens"] = state[f"{s}.tokens"] + torch.randn(sites, ref.N_TOK, ref.DC, generator=g) * 0.3
    state["time_table"] = torch.randn(ref.BUCKETS, sites * ref.D, generator=g) * 0.2
    save_file({k: v.contiguous() for k, v in state.items()}, f"{OUT}/adapter.safetensors")

    det = TinyDetector(torch.Generator().manual_seed(99)).eval()
    for p in det.parameters():
        p.requires_grad_(False)
    traced = torch.jit.trace(det, torch.rand(1, 3, DET, DET))
    meta = {"names": {str(i): n for i, n in enumerate(NAMES)}, "imgsz": [DET, DET], "stride": 2, "task": "detect"}
    torch.jit.save(traced, f"{OUT}/tiny_detector.torchscript", _extra_files={"config.txt": json.dumps(meta)})

    cases = {
        # name: captions, timesteps, max_timestep, with contrastive (shared t only)
        "per_image_t": (["a photo of two cats", "a dog and three cats", "two dogs"], [120, 300, 800], 500.0, False),
        "skips": (["a photo of nothing", "one cat", "two dogs"], [100, 700, 100], 500.0, False),
        "none": (["a photo of nothing", "one cat", "two dogs"], [100, 100, 100], 90.0, False),
        "with_contrastive": (["a photo of two cats", "a dog and three cats", "two dogs"], [250, 250, 250], 500.0, True),
    }
    expected, grads = {}, {}
    b = 3
    for name, (captions, ts, max_t, with_c) in cases.items():
        x0 = torch.randn(b, ref.C, ref.H, ref.W, generator=g) * 0.5
        noise = torch.randn(b, ref.C, ref.H, ref.W, generator=g)
        ehs = torch.randn(b, ref.L, ref.DC, generator=g)
        pooled = torch.randn(b, ref.P, generator=g)
        t = torch.tensor(ts, dtype=torch.float32)
        save_file({"x0": x0, "noise": noise, "timestep": t, "encoder_hidden_states": ehs, "pooled_projections": pooled},
                  f"{OUT}/count_case_{name}.safetensors")
        batch = {"x0": x0, "noise": noise, "t": t, "ehs": ehs, "pooled": pooled, "captions": captions}
        st = {k: v.clone().requires_grad_(not k.startswith("ema.")) for k, v in state.items()}
        loss, images = counting(w, det, batch, st, max_t)
        total = 0.5 * loss
        terms = {"counting": loss.item(), "counting/images": images}
        if with_c:
            cb = dict(batch, t=t[0])
            c, _ = ref.contrastive(w, cb, st, {"temperature": 1.0})
            terms["softrepa_contrastive"] = c.item()
            total = total + c
        terms["total"] = total.item()
        expected[name] = {"captions": captions, "max_timestep": max_t, "terms": terms}
        if total.requires_grad:
            total.backward()
        for k, v in st.items():
            if v.requires_grad:
                grads[f"{name}/{k}"] = (v.grad if v.grad is not None else torch.zeros_like(v)).contiguous()
    save_file(grads, f"{OUT}/count_grads.safetensors")
    with open(f"{OUT}/count_expected.json", "w") as f:
        json.dump(expected, f, indent=1)


if __name__ == "__main__":
    count_cases()
    if os.environ.get("SOFTALIGN_COUNTING_SKIP_YOLO") != "1":
        yolo()

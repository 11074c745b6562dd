"""Trains the shapes world's detector (assets/shapes-detector) and exports it as TorchScript in
ultralytics' YOLOv8 output convention, so softalign's `yolov8` detector plugin, its NMS and its
soft count serve it unchanged.

Data: `cargo run --release --example shapes_detector_data -- DATA.safetensors N SEED` (world
renders with their exact boxes). One CPU thread: the project's machines share their cores.

The model: four 3x3 convolutions (strides 1, 2, 2, 1) and a 1x1 head on an 8x8 grid (stride 4;
objects are 8-13 px and at least 2 px apart, so no two centres share a cell). Per cell:
cx, cy = (cell + 0.5 + tanh(o)) * 4, w, h = 4 exp(o), 4 class scores after a sigmoid. Training:
the cell holding an object's centre is its positive (class score 1, L1 on its box / 4); every
other (cell, class) is a negative (binary cross-entropy).

usage: train_shapes_detector.py DATA.safetensors OUT_DIR [--steps N]
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors import safe_open

STRIDE, GRID, SIDE = 4, 8, 32


class ShapesDetector(torch.nn.Module):
    def __init__(self, nc):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 24, 3, 1, 1), torch.nn.SiLU(),
            torch.nn.Conv2d(24, 32, 3, 2, 1), torch.nn.SiLU(),
            torch.nn.Conv2d(32, 48, 3, 2, 1), torch.nn.SiLU(),
            torch.nn.Conv2d(48, 48, 3, 1, 1), torch.nn.SiLU(),
        )
        self.head = torch.nn.Conv2d(48, 4 + nc, 1)
        ys, xs = torch.meshgrid(torch.arange(GRID * 1.0), torch.arange(GRID * 1.0), indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys]).reshape(1, 2, GRID * GRID) + 0.5)

    def logits(self, x):
        return self.head(self.body(x)).flatten(2)  # (B, 4 + nc, 64)

    def forward(self, x):
        o = self.logits(x)
        xy = (self.grid + torch.tanh(o[:, :2])) * STRIDE
        wh = torch.exp(o[:, 2:4].clamp(-4, 3)) * STRIDE
        return torch.cat([xy, wh, torch.sigmoid(o[:, 4:])], 1)


def targets(boxes, nc):
    """(B, 10, 5) -> class targets (B, nc, 64), box targets (B, 4, 64), positive mask (B, 64)."""
    b = boxes.shape[0]
    cls_t = torch.zeros(b, nc, GRID * GRID)
    box_t = torch.zeros(b, 4, GRID * GRID)
    pos = torch.zeros(b, GRID * GRID, dtype=torch.bool)
    valid = boxes[..., 0] >= 0
    bi, oi = torch.nonzero(valid, as_tuple=True)
    o = boxes[bi, oi]
    gx = (o[:, 1] / STRIDE).floor().clamp(0, GRID - 1).long()
    gy = (o[:, 2] / STRIDE).floor().clamp(0, GRID - 1).long()
    cell = gy * GRID + gx
    cls_t[bi, o[:, 0].long(), cell] = 1.0
    box_t[bi, :, cell] = o[:, 1:5] / STRIDE
    pos[bi, cell] = True
    return cls_t, box_t, pos


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    d = load_file(a.data)
    with safe_open(a.data, "pt") as f:
        names = f.metadata()["names"].split(",")
    nc = len(names)
    images = d["images"].float() / 255.0
    boxes = d["boxes"]
    n = images.shape[0]
    model = ShapesDetector(nc)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.1)
    began = time.time()
    for step in range(a.steps):
        idx = torch.randint(n, (a.batch,))
        x, bx = images[idx], boxes[idx]
        if step % 2 == 1:  # horizontal flip: shapes are symmetric, boxes mirror
            x = x.flip(-1)
            bx = bx.clone()
            bx[..., 1] = torch.where(bx[..., 0] >= 0, SIDE - bx[..., 1], bx[..., 1])
        cls_t, box_t, pos = targets(bx, nc)
        o = model.logits(x)
        cls_loss = F.binary_cross_entropy_with_logits(o[:, 4:], cls_t, reduction="sum") / max(1, int(pos.sum()))
        xy = model.grid + torch.tanh(o[:, :2])
        wh = torch.exp(o[:, 2:4].clamp(-4, 3))
        pred = torch.cat([xy, wh], 1)
        box_loss = (pred - box_t).abs().sum(1)[pos].mean()
        loss = cls_loss + box_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == a.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} (cls {cls_loss.item():.4f}, box {box_loss.item():.4f}) "
                  f"{time.time() - began:.0f}s", flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    os.makedirs(a.out, exist_ok=True)
    traced = torch.jit.trace(model, torch.zeros(1, 3, SIDE, SIDE))
    meta = {
        "description": "softalign shapes-world detector (YOLOv8 output convention)",
        "task": "detect", "stride": STRIDE, "imgsz": [SIDE, SIDE], "batch": 1,
        "names": {str(i): nm for i, nm in enumerate(names)},
        "train": {"steps": a.steps, "batch": a.batch, "lr": a.lr, "seed": a.seed, "examples": n,
                  "seconds": round(time.time() - began, 1), "torch": torch.__version__},
    }
    path = os.path.join(a.out, "shapes-detector.torchscript")
    torch.jit.save(traced, path, _extra_files={"config.txt": json.dumps(meta)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

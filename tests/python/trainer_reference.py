"""Reference values for the trainer from torch itself.

Usage: trainer_reference.py OUT_DIR
Writes OUT_DIR/schedules.json (torch LR schedulers' per-step lrs) and OUT_DIR/adamw.safetensors
plus OUT_DIR/adamw.json (torch.optim.AdamW with two parameter groups, clip_grad_norm_ and a
CosineAnnealingWarmRestarts schedule, on given gradients).
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file

out = sys.argv[1]
os.makedirs(out, exist_ok=True)


def lrs_of(make_sched, base, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = make_sched(opt)
    got = []
    for _ in range(steps):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return got


S = torch.optim.lr_scheduler
schedules = {
    "warm_restarts_t0_3_tmult_1": lrs_of(lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=1, eta_min=1e-5), 1e-3, 40),
    "warm_restarts_t0_2_tmult_2": lrs_of(lambda o: S.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2, eta_min=0.01), 0.5, 64),
    "warm_restarts_t0_1_tmult_3": lrs_of(lambda o: S.CosineAnnealingWarmRestarts(o, T_0=1, T_mult=3, eta_min=0.0), 2.0, 50),
    "cosine_tmax_20": lrs_of(lambda o: S.CosineAnnealingLR(o, T_max=20, eta_min=1e-4), 1e-2, 20),
}
# As repr strings: serde_json's default float parser may be 1 ulp off, Rust's str::parse is not.
with open(os.path.join(out, "schedules.json"), "w") as f:
    json.dump({k: [repr(x) for x in v] for k, v in schedules.items()}, f)

# AdamW on fixed gradients.
g = torch.Generator().manual_seed(7)
names = ["default.tokens", "time_table", "head.weight"]
shapes = {"default.tokens": (4, 8), "time_table": (5, 8), "head.weight": (3, 8)}
init = {n: torch.randn(shapes[n], generator=g) for n in names}
steps = 6
grads = [{n: torch.randn(shapes[n], generator=g) * (3.0 if s % 2 == 0 else 0.05) for n in names} for s in range(steps)]
params = {n: torch.nn.Parameter(init[n].clone()) for n in names}
# Group 0: the default settings; group 1: "time*" with its own lr, weight decay and betas.
opt = torch.optim.AdamW(
    [
        {"params": [params["default.tokens"], params["head.weight"]]},
        {"params": [params["time_table"]], "lr": 3e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)},
    ],
    lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4,
)
sched = S.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2, eta_min=1e-3)
tensors = {}
norms = []
lrs = []
for n in names:
    tensors["init/" + n] = init[n]
for s in range(steps):
    for n in names:
        params[n].grad = grads[s][n].clone()
        tensors[f"grad/{s}/{n}"] = grads[s][n]
    norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm=1.0)))
    lrs.append([pg["lr"] for pg in opt.param_groups])
    opt.step()
    sched.step()
for n in names:
    tensors["final/" + n] = params[n].detach().clone()
    st = opt.state[params[n]]
    tensors["exp_avg/" + n] = st["exp_avg"]
    tensors["exp_avg_sq/" + n] = st["exp_avg_sq"]
save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "adamw.safetensors"))
with open(os.path.join(out, "adamw.json"), "w") as f:
    json.dump({"steps": steps, "names": names, "grad_norms": norms, "lrs": [[repr(x) for x in l] for l in lrs], "torch": torch.__version__}, f)

"""Straightforward reference for softalign's objectives.

Writes into OUT:
  toy.safetensors        weights of a tiny MMDiT-like denoiser (the Rust tests mirror it)
  adapter.safetensors    soft-token state: positive/negative sets, EMA copies, time table
  batch_B.safetensors    B = 2, 3, 4: x0, noise, timestep, encoder_hidden_states, pooled_projections
  expected.json          {config: {B: {adapter|bare: {term: value}}}}
  grads.safetensors      "{config}/B{b}/{param}": d(weighted loss)/d(adapter tensors)

Every pair (image i, caption j) runs through its own forward, with soft tokens injected as in
SoftREPA's Algorithm 1 (prepended at each selected block, token outputs dropped after the block).

usage: objectives_reference.py OUT
"""
import json
import math
import sys

import torch
from safetensors.torch import save_file

C, H, W = 4, 4, 4
D, DC, P, L = 16, 12, 8, 5
BLOCKS = 3
TOKEN_SITES = [0, 1]  # joint_blocks[0..2]
N_TOK = 2
BUCKETS = 10
TIMESTEPS = {2: 637, 3: 250, 4: 901}

CONFIGS = {
    # name: list of (type, weight, params)
    "contrastive_default": [("softrepa_contrastive", 1.0, {})],
    "contrastive_t2i": [("softrepa_contrastive", 1.0, {"scale": 1.0, "temperature": 0.5, "direction": "text_to_image"})],
    "contrastive_both_schedule": [
        ("softrepa_contrastive", 1.0, {"scale": 2.0, "schedule": [[0.0, 0.2], [1000.0, 1.0]], "direction": "both"})
    ],
    "contrastive_dsm": [
        ("softrepa_contrastive", 1.0, {"scale": 4.0, "temperature": 0.3}),
        ("dsm", 10.0, {}),
    ],
    "agsm": [("agsm", 1.0, {"gamma_plus": 1.0, "gamma_minus": 0.1, "tau": 0.1})],
    "agsm_no_negative": [("agsm", 0.5, {"gamma_plus": 2.0, "gamma_minus": 0.0, "tau": 0.3})],
}


def lin(w, name, x):
    return torch.nn.functional.linear(x, w[name + ".weight"], w[name + ".bias"])


def make_weights(g):
    w = {}

    def add(name, out_f, in_f, std=None):
        std = std if std is not None else 1.0 / math.sqrt(in_f)
        w[name + ".weight"] = torch.randn(out_f, in_f, generator=g) * std
        w[name + ".bias"] = torch.randn(out_f, generator=g) * 0.1

    add("proj_in", D, C)
    add("time_embed", D, 1, std=1.0)
    add("pooled_proj", D, P)
    add("context_embedder", D, DC)
    for k in range(BLOCKS):
        for n in ["to_q", "to_k", "to_v", "to_out", "to_add_out"]:
            add(f"joint_blocks.{k}.{n}", D, D)
    add("proj_out", C, D, std=0.5 / math.sqrt(D))
    return w


def forward(w, x, t, ehs, pooled, tokens=None):
    """x (N,C,H,W), t (N,) model timesteps, tokens: None or (state, set, ema)."""
    n = x.shape[0]
    h = lin(w, "proj_in", x.flatten(2).transpose(1, 2))
    temb = torch.nn.functional.silu(lin(w, "time_embed", (t / 1000.0).unsqueeze(1)))
    c = temb + lin(w, "pooled_proj", pooled)
    ctx = lin(w, "context_embedder", ehs)
    for k in range(BLOCKS):
        ctx_in = ctx
        if tokens is not None and k in TOKEN_SITES:
            state, set_name, ema = tokens
            site = TOKEN_SITES.index(k)
            tok = state[("ema." if ema else "") + set_name + ".tokens"][site]  # (n_tok, DC)
            tok = lin(w, "context_embedder", tok).unsqueeze(0).expand(n, -1, -1)
            row = torch.clamp(torch.floor(torch.floor(t) * BUCKETS / 1000.0), 0, BUCKETS - 1).long()
            offset = state["time_table"][row][:, site * D:(site + 1) * D]
            tok = tok + offset.unsqueeze(1)
            ctx_in = torch.cat([tok, ctx], 1)
        m = ctx_in.shape[1]
        seq = torch.cat([ctx_in, h + c.unsqueeze(1)], 1)
        q = lin(w, f"joint_blocks.{k}.to_q", seq)
        kk = lin(w, f"joint_blocks.{k}.to_k", seq)
        v = lin(w, f"joint_blocks.{k}.to_v", seq)
        a = torch.softmax(q @ kk.transpose(1, 2) / math.sqrt(D), -1) @ v
        h = h + lin(w, f"joint_blocks.{k}.to_out", a[:, m:])
        ctx = ctx + lin(w, f"joint_blocks.{k}.to_add_out", a[:, m - L:m])
    out = lin(w, "proj_out", h)
    return out.transpose(1, 2).reshape(n, C, H, W)


def pair_pred(w, batch, i, j, tokens):
    sigma = batch["t"] / 1000.0
    x_t = (1 - sigma) * batch["x0"][i] + sigma * batch["noise"][i]
    return forward(
        w,
        x_t.unsqueeze(0),
        batch["t"].reshape(1),
        batch["ehs"][j:j + 1],
        batch["pooled"][j:j + 1],
        tokens,
    )[0]


def err(a, b):
    return ((a - b) ** 2).mean()


def contrastive(w, batch, state, p):
    b = batch["x0"].shape[0]
    target = batch["noise"] - batch["x0"]
    sel = (state, "positive", False) if state is not None else None
    e = torch.zeros(b, b)
    for i in range(b):
        for j in range(b):
            e[i, j] = err(target[i], pair_pred(w, batch, i, j, sel))
    t = float(batch["t"])
    if "schedule" in p:
        pts = p["schedule"]
        tau = pts[0][1] if t <= pts[0][0] else pts[-1][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 < t <= x1:
                tau = y0 + (y1 - y0) * (t - x0) / (x1 - x0)
    else:
        tau = p.get("temperature", 0.07)
    logits = p.get("scale", 4.0) * torch.exp(-e / tau)
    labels = torch.arange(b)
    ce = torch.nn.functional.cross_entropy
    d = p.get("direction", "image_to_text")
    if d == "image_to_text":
        loss = ce(logits, labels)
    elif d == "text_to_image":
        loss = ce(logits.T, labels)
    else:
        loss = 0.5 * (ce(logits, labels) + ce(logits.T, labels))
    pos = sum(e[i, i] for i in range(b)) / b
    neg = sum(e[i, j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
    return loss, {
        "softrepa_contrastive/pos_err": pos,
        "softrepa_contrastive/neg_err": neg,
    }


def dsm(w, batch, state, p):
    b = batch["x0"].shape[0]
    target = batch["noise"] - batch["x0"]
    sel = (state, "positive", False) if state is not None else None
    return sum(err(target[i], pair_pred(w, batch, i, i, sel)) for i in range(b)) / b, {}


def agsm(w, batch, state, p):
    b = batch["x0"].shape[0]
    target = batch["noise"] - batch["x0"]

    def sel(name, ema):
        return (state, name, ema) if state is not None else None

    with torch.no_grad():
        ema = [[pair_pred(w, batch, i, j, sel("positive" if i == j else "negative", True)) for j in range(b)]
               for i in range(b)]
        r = torch.tensor([[-err(target[i], ema[i][j]).item() for j in range(b)] for i in range(b)])
        wts = torch.softmax(r / p["tau"], 1)
        g = [[ema[i][j] - sum(wts[i, k] * ema[i][k] for k in range(b)) for j in range(b)] for i in range(b)]
        entropy = (-(wts * torch.log(wts + 1e-30)).sum(1)).mean()
    pos = sum(
        err(pair_pred(w, batch, i, i, sel("positive", False)), target[i] + p["gamma_plus"] * g[i][i])
        for i in range(b)
    ) / b
    if p["gamma_minus"] != 0:
        neg = sum(
            err(pair_pred(w, batch, i, j, sel("negative", False)), target[i] - p["gamma_minus"] * g[i][j])
            for i in range(b) for j in range(b) if i != j
        ) / (b * (b - 1))
    else:
        neg = torch.zeros(())
    return pos + neg, {"agsm/positive": pos, "agsm/negative": neg, "agsm/weight_entropy": entropy}


FUNCS = {"softrepa_contrastive": contrastive, "dsm": dsm, "agsm": agsm}


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    w = make_weights(g)
    save_file({k: v.contiguous() for k, v in w.items()}, f"{out}/toy.safetensors")

    sites = len(TOKEN_SITES)
    state = {}
    for s in ["positive", "negative"]:
        state[f"{s}.tokens"] = torch.randn(sites, N_TOK, DC, generator=g) * 0.5
        state[f"ema.{s}.tokens"] = state[f"{s}.tokens"] + torch.randn(sites, N_TOK, DC, generator=g) * 0.3
    state["time_table"] = torch.randn(BUCKETS, sites * D, generator=g) * 0.2
    save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/adapter.safetensors")

    expected = {}
    grads = {}
    for b, t in TIMESTEPS.items():
        x0 = torch.randn(b, C, H, W, generator=g) * 0.5
        # B = 3 draws one noise per image; the others share one.
        noise = torch.randn(b, C, H, W, generator=g) if b == 3 else torch.randn(C, H, W, generator=g)
        ehs = torch.randn(b, L, DC, generator=g)
        pooled = torch.randn(b, P, generator=g)
        ts = torch.tensor(t, dtype=torch.int64) if b == 2 else torch.tensor([t], dtype=torch.int64)
        save_file(
            {"x0": x0, "noise": noise, "timestep": ts, "encoder_hidden_states": ehs, "pooled_projections": pooled},
            f"{out}/batch_{b}.safetensors",
        )
        batch = {
            "x0": x0,
            "noise": noise.expand(b, C, H, W) if noise.dim() == 3 else noise,
            "t": ts.reshape(()).float(),
            "ehs": ehs,
            "pooled": pooled,
        }
        for cfg, objs in CONFIGS.items():
            for mode in ["adapter", "bare"]:
                st = None
                if mode == "adapter":
                    st = {k: v.clone().requires_grad_(not k.startswith("ema.")) for k, v in state.items()}
                terms = {}
                total = torch.zeros(())
                for typ, weight, params in objs:
                    loss, diag = FUNCS[typ](w, batch, st, params)
                    terms[typ] = loss.item()
                    terms.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in diag.items()})
                    total = total + weight * loss
                terms["total"] = total.item()
                expected.setdefault(cfg, {}).setdefault(str(b), {})[mode] = terms
                if mode == "adapter":
                    total.backward()
                    for k, v in st.items():
                        if v.requires_grad:
                            gr = v.grad if v.grad is not None else torch.zeros_like(v)
                            grads[f"{cfg}/B{b}/{k}"] = gr.contiguous()
    save_file(grads, f"{out}/grads.safetensors")
    with open(f"{out}/expected.json", "w") as f:
        json.dump(expected, f, indent=1)


if __name__ == "__main__":
    main()

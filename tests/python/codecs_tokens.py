"""Fixtures for `softalign import-tokens`: SoftREPA-style token files written with torch.save in
the released form (dc_tokens.pth: a pickled nn.Parameter; dc_t_tokens.pth: a whole pickled
nn.Embedding module), with the released shapes, and the same values as safetensors.

usage: codecs_tokens.py OUT_DIR

OUT_DIR/<backbone>/dc_tokens.pth, dc_t_tokens.pth (not for sdxl), reference.safetensors
"""
import os
import sys

import torch
from safetensors.torch import save_file

# name: (tokens shape, time table (rows, width) or None); softrepa-official.md.
CASES = {
    "sd3": ((5, 4, 1536), (100, 5 * 1536)),
    "sd15": ((4, 768), (100, 768)),
    "sdxl": ((4, 2048), None),
    # Tokens trained by the current reference code: in the T5 space (context_embedder input).
    "sd3_context": ((5, 4, 4096), (100, 5 * 1536)),
}


def main(out):
    gen = torch.Generator().manual_seed(5)
    for name, (shape, table) in CASES.items():
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        tokens = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        torch.save(tokens, os.path.join(d, "dc_tokens.pth"))
        ref = {"tokens": tokens.detach().clone()}
        if table is not None:
            emb = torch.nn.Embedding(*table)
            with torch.no_grad():
                emb.weight.copy_(torch.randn(table, generator=gen) * 0.02)
            torch.save(emb, os.path.join(d, "dc_t_tokens.pth"))
            ref["time_table"] = emb.weight.detach().clone()
        save_file(ref, os.path.join(d, "reference.safetensors"))
    # A non-contiguous view: the reader must honour strides and storage offsets.
    d = os.path.join(out, "strided")
    os.makedirs(d, exist_ok=True)
    base = torch.randn(2051, 5, generator=gen)
    view = base[1:2049, 1:5].t()  # (4, 2048), strides (1, 5), storage offset 6
    torch.save(torch.nn.Parameter(view, requires_grad=False), os.path.join(d, "dc_tokens.pth"))
    save_file({"tokens": view.contiguous()}, os.path.join(d, "reference.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])

"""Fixtures for tests/codecs.rs, VAE side: tiny random diffusers AutoencoderKL folders, one
SD1.5/SDXL-shaped (4 latent channels, quant convs) and one SD3-shaped (16 channels, no quant
convs, shift factor), with encode (posterior mean, std, a sample after torch.manual_seed) and
decode outputs.

usage: codecs_vae.py OUT_DIR

OUT_DIR/<case>/vae            the folder save_pretrained wrote
OUT_DIR/<case>/io.safetensors `sample` (images), `latent_dist.mean`, `latent_dist.std`,
                              `latent_dist.sample` (seed 123), `latents`, `decoded`
OUT_DIR/manifest.json         per case: scaling_factor, shift_factor
"""
import json
import os
import sys

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

BASE = dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, sample_size=16)
CASES = {
    "kl4_quant": dict(latent_channels=4, scaling_factor=0.13025),
    "kl16_sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                     use_quant_conv=False, use_post_quant_conv=False),
}


def main(out):
    manifest = {}
    for k, (name, over) in enumerate(CASES.items()):
        torch.manual_seed(k)
        vae = AutoencoderKL(**{**BASE, **over}).eval()
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        images = torch.rand(2, 3, 16, 12, generator=gen) * 2 - 1
        with torch.no_grad():
            post = vae.encode(images).latent_dist
            torch.manual_seed(123)
            sample = post.sample()
            latents = torch.randn(2, over["latent_channels"], 4, 3, generator=gen)
            decoded = vae.decode(latents).sample
        d = os.path.join(out, name)
        vae.save_pretrained(os.path.join(d, "vae"))
        io = {"sample": images, "latent_dist.mean": post.mean, "latent_dist.std": post.std,
              "latent_dist.sample": sample, "latents": latents, "decoded": decoded}
        save_file({k: v.clone().contiguous() for k, v in io.items()},
                  os.path.join(d, "io.safetensors"))
        manifest[name] = dict(scaling_factor=vae.config.scaling_factor,
                              shift_factor=vae.config.shift_factor)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])

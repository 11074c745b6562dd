"""Fixtures for tests/pipelines.rs: tiny random SD1.5-, SDXL- and SD3-shaped diffusers pipeline
folders (tiny CLIP / T5 towers, tiny tokenizers built here, tiny UNet / MMDiT / VAE), saved with
save_pretrained, and the conditioning each pipeline's own `encode_prompt` builds for a few
prompts (and for classifier-free guidance's negative branch).

usage: pipelines_fixtures.py OUT_DIR

OUT_DIR/<name>/            a pipeline folder (sd15, sdxl, sd3, sd3_no_t5)
OUT_DIR/reference.safetensors  <name>.<tensor> as encode_prompt returns them
OUT_DIR/manifest.json      prompts, T5 length
"""
import json
import os
import sys

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import save_file
from tiny_bpe import bpe_vocab_merges
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer)

PROMPTS = [
    "a photo of a red cube",
    "Two blue spheres, left of a green cube!!!",
    "",
    " ".join(["a red cube and a blue sphere"] * 12),
]
T5_LENGTH = 12
CLIP_WORDS = ["a", "photo", "of", "red", "blue", "green", "cube", "sphere", "two", "left",
              "and", "the", "spheres"]
T5_PIECES = ["\u2581a", "\u2581photo", "\u2581of", "\u2581red", "\u2581cube", "\u2581blue",
             "\u2581sphere", "s", "\u2581", "a", "b", "c", "d", "e", "f", "g", "h", "i", "l",
             "n", "o", "p", "r", "t", "u", "w", "y", ",", ".", "!", "\u2581two", "\u2581left",
             "\u2581green", "\u2581and"]


def clip_tokenizer(pad):
    vocab, merges = bpe_vocab_merges(CLIP_WORDS)
    # model_max_length 77, as every released SD tokenizer.
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)


def t5_tokenizer():
    from tokenizers import normalizers
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -1.0 - 0.1 * i) for i, p in enumerate(T5_PIECES)]
    extra = 2
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra - 1, -1, -1)]
    t5 = T5Tokenizer(vocab=vocab, extra_ids=extra)
    t5.backend_tokenizer.normalizer = normalizers.NFKC()
    return t5


def randomise(model, gen, scale=0.3):
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            if "layer_norm" in name or "norm" in name.split(".")[-2:][0]:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def clip(tok, hidden, proj, act, gen):
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden + 5,
                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                         projection_dim=proj or hidden, hidden_act=act,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    m = (CLIPTextModelWithProjection if proj else CLIPTextModel)(cfg).eval()
    randomise(m, gen)
    return m


def vae(latent, gen, **over):
    v = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                      layers_per_block=1, norm_num_groups=4, sample_size=16,
                      latent_channels=latent, **over).eval()
    with torch.no_grad():
        for p in v.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return v


def ddim():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def main(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2024)
    ref = {}

    # SD 1.5: CLIP-L-like (quick_gelu), 4-channel VAE (0.18215), cross-attention = CLIP width.
    tok = clip_tokenizer("<|endoftext|>")
    te = clip(tok, 32, None, "quick_gelu", gen)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                                norm_num_groups=8).eval()
    randomise(unet, gen, 0.05)
    pipe = StableDiffusionPipeline(vae=vae(4, gen, scaling_factor=0.18215), text_encoder=te,
                                   tokenizer=tok, unet=unet, scheduler=ddim(),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(out, "sd15"))
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    ref["sd15.prompt_embeds"], ref["sd15.negative_prompt_embeds"] = pe, ne

    # SDXL: CLIP-L (no projection) + bigG-like (gelu, projection, pads with "!").
    tok1, tok2 = clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")
    te1 = clip(tok1, 16, None, "quick_gelu", gen)
    te2 = clip(tok2, 24, 12, "gelu", gen)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                layers_per_block=1, attention_head_dim=(2, 4),
                                cross_attention_dim=16 + 24, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=12 + 6 * 8,
                                norm_num_groups=8).eval()
    randomise(unet, gen, 0.05)
    pipe = StableDiffusionXLPipeline(vae=vae(4, gen, scaling_factor=0.13025), text_encoder=te1,
                                     text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=ddim())
    pipe.save_pretrained(os.path.join(out, "sdxl"))
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=True)
        ids = pipe._get_add_time_ids((48, 32), (0, 0), (48, 32), dtype=torch.float32,
                                     text_encoder_projection_dim=te2.config.projection_dim)
    ref.update({"sdxl.prompt_embeds": pe, "sdxl.negative_prompt_embeds": ne,
                "sdxl.pooled_prompt_embeds": pp, "sdxl.negative_pooled_prompt_embeds": npp,
                "sdxl.add_time_ids_48x32": ids})

    # SD3: CLIP-L + bigG (both with projection), T5 wider than both CLIPs together.
    tok1, tok2, tok3 = clip_tokenizer("<|endoftext|>"), clip_tokenizer("!"), t5_tokenizer()
    te1 = clip(tok1, 16, 8, "quick_gelu", gen)
    te2 = clip(tok2, 24, 12, "gelu", gen)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=48, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, dropout_rate=0.0,
                                 feed_forward_proj="gated-gelu")).eval()
    randomise(t5, gen)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16,
                                        out_channels=16, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=48,
                                        caption_projection_dim=16, pooled_projection_dim=8 + 12,
                                        pos_embed_max_size=8).eval()
    randomise(transformer, gen, 0.05)
    sd3_vae = vae(16, gen, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                  use_post_quant_conv=False)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for name, with_t5 in (("sd3", True), ("sd3_no_t5", False)):
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=sd3_vae,
                                        text_encoder=te1, tokenizer=tok1, text_encoder_2=te2,
                                        tokenizer_2=tok2,
                                        text_encoder_3=t5 if with_t5 else None,
                                        tokenizer_3=tok3 if with_t5 else None)
        pipe.save_pretrained(os.path.join(out, name))
        with torch.no_grad():
            pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                 do_classifier_free_guidance=True,
                                                 max_sequence_length=T5_LENGTH)
        ref.update({f"{name}.prompt_embeds": pe, f"{name}.negative_prompt_embeds": ne,
                    f"{name}.pooled_prompt_embeds": pp,
                    f"{name}.negative_pooled_prompt_embeds": npp})

    save_file({k: v.detach().float().contiguous() for k, v in ref.items()},
              os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "t5_length": T5_LENGTH}, f)


if __name__ == "__main__":
    main(sys.argv[1])

"""Fixtures for the LoRA tests: tiny random diffusers / transformers models, LoRA adapters made
with peft on them (random A and B, so the deltas are not zero), the adapters written in each
dialect softalign reads, and the models' outputs with the adapter active.

Cases (one folder each, `model/` + LoRA files + `io.safetensors` with inputs and `sample`):
  sd3          SD3 transformer, the SD3 script's eight targets: PEFT folder `peft/` (r 4, alpha 8)
               and the diffusers pipeline file `diffusers/` (transformer. prefix + metadata)
  sd3_rslora   PEFT folder with use_rslora
  sd3_dora     PEFT folder with use_dora (lora_magnitude_vector); `dora_train.safetensors`:
               the adapter's tensors in softalign's adapter-file names (`default.<module>.lora_A.weight`,
               `default.<module>.lora_magnitude_vector`), PEFT's initial magnitudes (`init.<name>`),
               a cotangent `R` and the gradients of sum(sample * R) (`grad.<name>`)
  (UNet cases store the output as `expected`: `sample` is their input.)
  unet         SD1.5-like UNet, to_q/k/v/out.0 (r = alpha = 4): diffusers `lora.down` file,
               the old attention-processor pickle `.bin` (ddpo-pytorch), kohya (alpha 2, up x 2)
  sdxl         SDXL-like UNet, attention projections + time_emb_proj: kohya with SGM names
               (checked against diffusers' own _maybe_map_sgm_blocks_to_diffusers)
  clip         CLIPTextModel, q/k/v/out_proj + fc1/fc2: kohya `lora_te_` keys

usage: lora_fixtures.py OUT_DIR
"""
import json
import os
import sys

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, os.path.dirname(__file__))
from sd3_fixtures import BASE as SD3_BASE  # noqa: E402
from unet_fixtures import SD15, SDXL  # noqa: E402

SD3_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
               "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def randomise(model, gen, std=0.3):
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def randomise_lora(model, gen, std=0.2):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            if "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.3 * torch.rand(p.shape, generator=gen))


def ours(peft_name):
    """A PEFT parameter name as softalign's adapter file names it (set `default`)."""
    name = peft_name.replace(".default.weight", ".weight")
    if name.endswith(".lora_magnitude_vector.weight"):
        name = name[: -len(".weight")]
    return f"default.{name}"


def lora_sd(model):
    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_peft(folder, sd, cfg):
    os.makedirs(folder, exist_ok=True)
    save_file({f"base_model.model.{k}": v for k, v in sd.items()}, os.path.join(folder, "adapter_model.safetensors"))
    d = cfg.to_dict()
    d = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(d, f, default=str, indent=2)


def sd3_case(out, name, gen, **lora_kw):
    d = os.path.join(out, name)
    cfg = dict(SD3_BASE, num_layers=3)
    model = SD3Transformer2DModel(**cfg).eval()
    randomise(model, gen)
    model.save_pretrained(os.path.join(d, "model"))
    inp = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([37.5, 912.0]),
        "encoder_hidden_states": torch.randn(2, 5, cfg["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(2, cfg["pooled_projection_dim"], generator=gen),
    }
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=SD3_TARGETS, **lora_kw)
    model.add_adapter(lcfg)
    init = {f"init.{ours(n)}": p.detach().clone() for n, p in model.named_parameters() if "lora_magnitude" in n}
    randomise_lora(model, gen)
    with torch.no_grad():
        sample = model(**inp).sample
    if lora_kw.get("use_dora"):
        # Training parity: the same forward with autograd, against a fixed cotangent.
        r = torch.randn(sample.shape, generator=torch.Generator().manual_seed(99))
        model.zero_grad()
        (model(**inp).sample * r).sum().backward()
        train = dict(init, R=r)
        for n, p in model.named_parameters():
            if "lora_" in n:
                train[ours(n)] = p.detach().clone()
                train[f"grad.{ours(n)}"] = p.grad.detach().clone()
        save_file(train, os.path.join(d, "dora_train.safetensors"))
    sd = lora_sd(model)
    save_peft(os.path.join(d, "peft"), sd, lcfg)
    if not lora_kw:
        from diffusers import StableDiffusion3Pipeline

        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lcfg.to_dict().items()}
        StableDiffusion3Pipeline.save_lora_weights(
            os.path.join(d, "diffusers"), transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta
        )
    save_file(dict(inp, sample=sample), os.path.join(d, "io.safetensors"))


def unet_inputs(cfg, gen):
    inp = {
        "sample": torch.randn(2, 4, 16, 16, generator=gen),
        "timestep": torch.tensor([3.0, 700.0]),
        "encoder_hidden_states": torch.randn(2, 6, cfg["cross_attention_dim"], generator=gen),
    }
    extra = {}
    if cfg.get("addition_embed_type") == "text_time":
        inp["text_embeds"] = torch.randn(2, 10, generator=gen)
        inp["time_ids"] = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0], [96.0, 64.0, 8.0, 4.0, 128.0, 128.0]])
        extra = {"added_cond_kwargs": {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}}
    return inp, extra


def kohya_name(prefix, path):
    return prefix + "_" + path.replace(".", "_")


def unet_case(out, gen):
    d = os.path.join(out, "unet")
    model = UNet2DConditionModel(**SD15).eval()
    randomise(model, gen, 0.2)
    model.save_pretrained(os.path.join(d, "model"))
    inp, _ = unet_inputs(SD15, gen)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights="gaussian"))
    randomise_lora(model, gen)
    with torch.no_grad():
        sample = model(inp["sample"], inp["timestep"], inp["encoder_hidden_states"]).sample
    sd = lora_sd(model)
    save_file(dict(inp, expected=sample), os.path.join(d, "io.safetensors"))
    # diffusers (what train_text_to_image_lora.py writes): unet. prefix, lora.down / lora.up
    diff, proc, kohya = {}, {}, {}
    for k, v in sd.items():
        stem, role = k.rsplit(".lora_", 1)
        down = role.startswith("A")
        diff[f"unet.{stem}.lora.{'down' if down else 'up'}.weight"] = v
        # the 0.17 processor form: <block>.attnN.processor.to_q_lora.down.weight
        block, proj = stem.rsplit(".", 1) if not stem.endswith("to_out.0") else (stem[: -len(".to_out.0")], "to_out")
        proc[f"{block}.processor.{proj}_lora.{'down' if down else 'up'}.weight"] = v
        name = kohya_name("lora_unet", stem)
        kohya[f"{name}.lora_{'down' if down else 'up'}.weight"] = v if down else v * 2.0
        kohya[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(diff, os.path.join(d, "pytorch_lora_weights.safetensors"))
    torch.save(proc, os.path.join(d, "processor.bin"))
    save_file(kohya, os.path.join(d, "kohya.safetensors"))


def to_sgm(path, lpb):
    """diffusers UNet module path -> SGM (underscored), the inverse of diffusers' mapping."""
    p = path.split(".")
    per = lpb + 1
    res = {"conv1": "in_layers_2", "time_emb_proj": "emb_layers_1", "conv2": "out_layers_3", "conv_shortcut": "skip_connection"}
    if p[0] == "down_blocks":
        b, kind, layer, rest = int(p[1]), p[2], int(p[3]), p[4:]
        i = 1 + b * per + layer
        j = 0 if kind == "resnets" else 1
    elif p[0] == "up_blocks":
        b, kind, layer, rest = int(p[1]), p[2], int(p[3]), p[4:]
        i = b * per + layer
        j = 0 if kind == "resnets" else 1
    else:
        raise ValueError(path)
    if kind == "resnets":
        rest = [res.get(rest[0], rest[0])] + rest[1:]
    top = "input_blocks" if p[0] == "down_blocks" else "output_blocks"
    return f"{top}_{i}_{j}_" + "_".join(rest)


def sdxl_case(out, gen):
    d = os.path.join(out, "sdxl")
    cfg = dict(SDXL, layers_per_block=2)
    model = UNet2DConditionModel(**cfg).eval()
    randomise(model, gen, 0.2)
    model.save_pretrained(os.path.join(d, "model"))
    inp, extra = unet_inputs(cfg, gen)
    # mid_block stays out: its SGM name has no layer index to invert here.
    targets = [r"^(down|up)_blocks\..*\.(to_q|to_k|to_v|to_out\.0|time_emb_proj)$"]
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets[0]))
    randomise_lora(model, gen)
    with torch.no_grad():
        sample = model(inp["sample"], inp["timestep"], inp["encoder_hidden_states"], **extra).sample
    sd = lora_sd(model)
    kohya = {}
    for k, v in sd.items():
        stem, role = k.rsplit(".lora_", 1)
        down = role.startswith("A")
        name = "lora_unet_" + to_sgm(stem, 2)
        kohya[f"{name}.lora_{'down' if down else 'up'}.weight"] = v
        kohya[f"{name}.alpha"] = torch.tensor(2.0)
    # diffusers' own SGM mapping must take these names back to the modules we adapted.
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(kohya), model.config)
    want = {kohya_name("lora_unet", k.rsplit(".lora_", 1)[0]) for k in sd}
    # diffusers renumbers the blocks here and renames the rest (input_blocks -> down_blocks,
    # emb_layers -> time_emb_proj) in _convert_unet_lora_key afterwards.
    renames = [("input_blocks_", "down_blocks_"), ("output_blocks_", "up_blocks_"), ("emb_layers_1", "time_emb_proj")]

    def finish(n):
        for a, b in renames:
            n = n.replace(a, b)
        return n

    got = {finish(k.rsplit(".lora_", 1)[0].rsplit(".alpha", 1)[0]) for k in mapped}
    assert want == got, (sorted(want - got)[:3], sorted(got - want)[:3])
    save_file(kohya, os.path.join(d, "kohya_sgm.safetensors"))
    save_file(dict(inp, expected=sample), os.path.join(d, "io.safetensors"))


def clip_case(out, gen):
    d = os.path.join(out, "clip")
    cfg = CLIPTextConfig(vocab_size=99, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, hidden_act="quick_gelu",
                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = CLIPTextModel(cfg).eval()
    randomise(model, gen, 0.2)
    model.save_pretrained(os.path.join(d, "model"))
    ids = torch.randint(0, 99, (2, 7), generator=gen)
    from peft import get_peft_model

    pm = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]))
    randomise_lora(pm, gen)
    with torch.no_grad():
        hidden = pm(input_ids=ids).last_hidden_state
    kohya = {}
    for k, v in get_peft_model_state_dict(pm).items():
        stem, role = k.removeprefix("base_model.model.").rsplit(".lora_", 1)
        down = role.startswith("A")
        name = kohya_name("lora_te", stem)
        kohya[f"{name}.lora_{'down' if down else 'up'}.weight"] = v.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(6.0)
    save_file(kohya, os.path.join(d, "kohya_te.safetensors"))
    save_file({"input_ids": ids, "last_hidden_state": hidden}, os.path.join(d, "io.safetensors"))


def main(out):
    gen = torch.Generator().manual_seed(12)
    sd3_case(out, "sd3", gen)
    sd3_case(out, "sd3_rslora", gen, use_rslora=True)
    sd3_case(out, "sd3_dora", gen, use_dora=True)
    unet_case(out, gen)
    sdxl_case(out, gen)
    clip_case(out, gen)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"cases": ["sd3", "sd3_rslora", "sd3_dora", "unet", "sdxl", "clip"]}, f)


if __name__ == "__main__":
    main(sys.argv[1])

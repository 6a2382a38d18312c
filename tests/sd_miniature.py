"""A faithful miniature of a Stable Diffusion 1.x folder, written by diffusers' own
``StableDiffusionPipeline.save_pretrained``: unet/, vae/, text_encoder/ (CLIPTextModel), tokenizer/
(a CLIP byte-level BPE over a small vocabulary), scheduler/ (PNDM) and model_index.json. The
architecture is SD's (cross-attention UNet, KL VAE with 4 latent channels and 8x downsampling);
only the widths are tiny. Also an ImageNet-layout folder of photograph-like images."""

from __future__ import annotations

import json
from pathlib import Path

import torch

START, END = "<|startoftext|>", "<|endoftext|>"


def _byte_characters() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE maps bytes to (GPT-2's table)."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    characters, extra = [], 0
    for byte in range(256):
        if byte in kept:
            characters.append(chr(byte))
        else:
            characters.append(chr(256 + extra))
            extra += 1
    return characters


def write_clip_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt of a small CLIP BPE: every byte character, alone and word-final,
    a few merges (so that common words become single tokens), and the two special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    characters = _byte_characters()
    tokens = characters + [c + "</w>" for c in characters]
    merges = [("i", "n"), ("t", "h"), ("th", "e</w>"), ("in", "g</w>"), ("a", "n"), ("an", "d</w>")]
    tokens += ["".join(pair) for pair in merges] + [START, END]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_sd_miniature(folder: str | Path, *, seed: int = 0, latent_size: int = 8) -> Path:
    """Write the miniature SD folder; returns its path. Images are ``8 * latent_size`` pixels."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8 * latent_size,
    )
    tokenizer_files = folder.parent / f".{folder.name}-tokenizer-src"
    write_clip_tokenizer_files(tokenizer_files)
    tokenizer = CLIPTokenizer(
        str(tokenizer_files / "vocab.json"), str(tokenizer_files / "merges.txt"), model_max_length=77
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(json.loads((tokenizer_files / "vocab.json").read_text())),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    # the hub's SD1.x folders keep the tokenizer in the legacy four files, not tokenizer.json
    saved = folder / "tokenizer"
    (saved / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (saved / name).write_bytes((tokenizer_files / name).read_bytes())
    special = {"bos_token": START, "eos_token": END, "pad_token": END, "unk_token": END}
    (saved / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    return folder


def write_image_folder(folder: str | Path, *, classes: int = 2, per_class: int = 4, size=(48, 40), seed: int = 0):
    """An ImageNet-layout folder ``<class>/NNN.png`` of smooth, non-square random pictures."""
    from PIL import Image

    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for label in range(classes):
        (folder / f"n{label:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            low = torch.rand(3, 4, 5, generator=generator)
            low[label % 3] += 0.5
            picture = torch.nn.functional.interpolate(low[None], size=size, mode="bilinear")[0].clamp(0, 1)
            array = (picture * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            path = folder / f"n{label:08d}" / f"{i:03d}.png"
            Image.fromarray(array).save(path)
            paths.append(path)
    return paths

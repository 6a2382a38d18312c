"""The official FeatInv code driven as published, for ``benchmarks/bench_published.py``.

The code is not part of featinv: give the ``code/`` folder of a checkout of AI4HealthUOL/FeatInv
(``--official-code``). It runs unchanged on a CPU or a GPU with pytorch-lightning, omegaconf,
einops and open_clip_torch installed (``pip install --no-build-isolation -e '.[official]'``), and three shims applied
from outside, none of which changes what it computes:

* ``pytorch_lightning.utilities.distributed`` (gone in pytorch-lightning 2) is given its
  ``rank_zero_only`` back;
* ``FrozenCLIPEmbedder`` would download ``openai/clip-vit-large-patch14``: its text model is built
  from that model's config instead (the checkpoint's weights replace it), and no tokenizer is read
  (the two prompts' CLIP token ids are ``featinv.models.published.KNOWN_TOKEN_IDS``, which the real
  tokenizer made);
* ``DDIMSampler.register_buffer`` moves its tables to ``cuda`` unconditionally: they go to the
  model's device instead.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import torch

# The fixed prompt of the published sampler and the empty one; featinv's table of their token ids.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featinv.models.published import CLIP_VIT_L14_TEXT_CONFIG, KNOWN_TOKEN_IDS, PUBLISHED_PROMPT  # noqa: E402

CONFIG = "models/cldm_featinv_convnext.yaml"  # the published ConvNeXt-B final-layer model, in code/
ZERO_INIT_STD = 0.02  # what a random model puts where the published code initialises with zeros


def import_official(code: Path) -> types.SimpleNamespace:
    """The official modules the benchmark uses, imported from ``code`` with the shims above."""
    if not (code / "cldm" / "cldm.py").is_file() or not (code / CONFIG).is_file():
        raise SystemExit(f"--official-code {code}: not the code/ folder of AI4HealthUOL/FeatInv (no cldm/cldm.py)")
    missing = [name for name in ("pytorch_lightning", "omegaconf", "einops", "open_clip") if not _importable(name)]
    if missing:
        install = "pip install --no-build-isolation -e '.[official]'"
        raise SystemExit(f"the official code needs {', '.join(missing)}: {install}")
    sys.path.insert(0, str(code))
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
    distributed.rank_zero_only = rank_zero_only
    sys.modules.setdefault("pytorch_lightning.utilities.distributed", distributed)

    import ldm.modules.encoders.modules as encoders
    from transformers import CLIPTextConfig, CLIPTextModel

    class OfflineTextModel:
        @staticmethod
        def from_pretrained(version: str) -> CLIPTextModel:
            return CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT_CONFIG))

    class NoTokenizer:
        @staticmethod
        def from_pretrained(version: str) -> None:
            return None

    encoders.CLIPTextModel, encoders.CLIPTokenizer = OfflineTextModel, NoTokenizer

    from cldm.ddim_hacked import DDIMSampler
    from cldm.model import create_model, load_state_dict

    def register_buffer(self, name, attr):
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.model.device)
        setattr(self, name, attr)

    DDIMSampler.register_buffer = register_buffer
    return types.SimpleNamespace(
        create_model=create_model, load_state_dict=load_state_dict, DDIMSampler=DDIMSampler, config=code / CONFIG
    )


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def build_checkpoint(code: Path, out: Path, *, seed: int) -> dict:
    """A random ControlLDM of the published config, saved as the released file is: fp16 tensors in
    a Lightning ``{"state_dict": ...}`` file. Parameters the published code initialises with zeros
    (zero convolutions, residual outputs) are drawn from N(0, 0.02^2), so that every part of the
    network acts on the result. Written atomically."""
    import pytorch_lightning

    official = import_official(code)
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = official.create_model(str(official.config))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point() and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * ZERO_INIT_STD)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    parameters = sum(p.numel() for p in model.parameters())
    del model
    temp = out.with_name(out.name + ".partial")
    torch.save(
        {"state_dict": state, "global_step": 0, "epoch": 0, "pytorch-lightning_version": pytorch_lightning.__version__},
        temp,
    )
    temp.replace(out)
    return {"parameters": parameters, "seconds": time.perf_counter() - start, "bytes": out.stat().st_size}


def prompt_contexts(model, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 77, 768) states of the published prompt and the empty one, as ``FrozenCLIPEmbedder``
    computes them from the token ids its tokenizer gives (padded to 77, last hidden state)."""
    device = next(model.cond_stage_model.parameters()).device
    ids = torch.tensor(
        [
            KNOWN_TOKEN_IDS[p] + [KNOWN_TOKEN_IDS[""][-1]] * (77 - len(KNOWN_TOKEN_IDS[p]))
            for p in (PUBLISHED_PROMPT, "")
        ],
        device=device,
    )
    with torch.no_grad():
        states = model.cond_stage_model.transformer(input_ids=ids).last_hidden_state
    return states[:1].expand(batch, -1, -1), states[1:].expand(batch, -1, -1)


class OfficialSampler:
    """The published sampler (``gradio_featinv_convnext.process``: DDIM, eta 0, guidance on the
    prompt with the feature map in both branches, control scales 1) on the checkpoint, loaded as
    that script loads it (``create_model``, then ``load_state_dict`` of the file)."""

    def __init__(self, code: Path, checkpoint: Path, device: str) -> None:
        official = import_official(code)
        start = time.perf_counter()
        model = official.create_model(str(official.config))
        model.load_state_dict(official.load_state_dict(str(checkpoint), location="cpu"))
        self.model = model.to(device).eval()
        self.load_seconds = time.perf_counter() - start
        self.sampler = official.DDIMSampler(self.model)
        self.device = device
        self.model.control_scales = [1.0] * 13

    def sample(self, features: torch.Tensor, x_T: torch.Tensor, *, steps: int, guidance: float, sync) -> tuple:
        """((B, 4, h, w) latents from ``x_T``, the times of the loop's start and of each step's end)."""
        batch = features.shape[0]
        control = features.to(self.device)
        context, empty = prompt_contexts(self.model, batch)  # featinv stores them: not timed
        cond = {"c_concat": [control], "c_crossattn": [context]}
        un_cond = {"c_concat": [control], "c_crossattn": [empty]}
        sync()
        marks = [time.perf_counter()]
        with torch.no_grad():
            samples, _ = self.sampler.sample(
                steps,
                batch,
                tuple(x_T.shape[1:]),
                cond,
                verbose=False,
                eta=0.0,
                x_T=x_T.to(self.device),
                unconditional_guidance_scale=guidance,
                unconditional_conditioning=un_cond,
                callback=lambda i: (sync(), marks.append(time.perf_counter())),
            )
        return samples, marks

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] (``decode_first_stage``, then the script's scaling)."""
        with torch.no_grad():
            return ((self.model.decode_first_stage(latents).float().cpu() + 1) / 2).clamp(0, 1)

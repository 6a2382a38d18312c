"""Count the kernels of one guided fast-path step (ControlNet, UNet encoder, UNet decoder), with
the fast path as built, with the model's own weights and attention, and with the twin encoder
(ControlNet and UNet encoder as one network), on whatever device is given: calls of
Inductor-generated kernels (read from the compiled graphs' output code) and extern calls
(convolution, mm, addmm, bmm, scaled dot-product attention; counted by the profiler). On a GPU with
CUDA graphs each kernel costs a few microseconds even when small, so at one image the count
predicts much of the step time; on a CPU the counts are a proxy (the extern calls are the same, the
generated kernels fuse similarly, not identically).

(Inductor's ``metrics.generated_kernel_count`` is not this: on the CPU it counts every kernel object
the C++ code generator creates, several per fused loop nest, 366 against 77 calls on the micro model.)

    python benchmarks/count_step_kernels.py --preset minisd --images 1   # ~6 min and ~10 GB on a CPU
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import time

import torch
from bench_gpu import build_model
from torch.profiler import ProfilerActivity, profile

from featinv.engine.fast import FastPath

EXTERN = ("convolution", "mm", "addmm", "bmm", "_scaled_dot_product")
CALL = re.compile(r"^\s+(?:cpp_fused|triton)_\w+(?:\.run)?\(", re.M)  # a generated kernel's call in `call()`


class GeneratedCalls(logging.Handler):
    """Counts the generated-kernel calls in the output code Inductor logs for each graph it loads."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.calls = 0
        self.logger = logging.getLogger("torch._inductor.codecache.__output_code")

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Output code:"):
            self.calls += len(CALL.findall(text))

    def __enter__(self) -> GeneratedCalls:
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self)
        return self

    def __exit__(self, *_) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


def count(model, images: int, device: torch.device, **options) -> dict:
    """Kernels of one step of ``images`` images (batch 2 x images with guidance)."""
    path = FastPath(model, graphs=False, streams=False, **options)
    x = torch.randn(2 * images, *model.latent_shape, device=device, dtype=model.unet.dtype)
    t = torch.tensor([500], device=device)
    context = model.guidance_contexts(images).to(model.unet.dtype)
    hint = path.null_hint().expand(2 * images, -1, -1, -1).contiguous()

    def step():
        return path.eps_pair(x, t, context, hint)

    with torch.no_grad():
        with GeneratedCalls() as found:
            step()  # compiles (one graph per piece, each run once per step)
        generated = found.calls
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    calls = collections.Counter(event.name.removeprefix("aten::") for event in prof.events())
    extern = {name: n for name, n in calls.items() if name.startswith(EXTERN) and not name.endswith("_backward")}
    torch._dynamo.reset()
    return {"generated_kernel_calls": generated, "extern_calls": extern, "total": generated + sum(extern.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["minisd", "micro"], default="minisd")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.preset).to(device, torch.float16 if device.type == "cuda" else torch.float32).eval()
    results = {"preset": args.preset, "images": args.images, "device": str(device), "torch": torch.__version__}
    for label, options in (
        ("model's own weights and attention", {"channels_last": False, "precomputed": False}),
        ("as built", {}),
        ("twin encoder", {"twin_encoder": True}),
    ):
        begin = time.perf_counter()
        results[label] = count(model, args.images, device, **options)
        results[label]["seconds"] = time.perf_counter() - begin
        print(label, json.dumps(results[label]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""GPU benchmark: the miniSD-scale FeatInv model (SD1.x UNet + FeatInv ControlNet, 32x32 latents,
random weights: speed does not depend on weight values), fp16, 50 DDIM steps with guidance.

Prints a table and writes JSON (``--out``). Today it times featinv's eager backend (the numerical
reference) per step and end to end; faster backends are added beside it, in the same run.

    python benchmarks/bench_gpu.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from featinv import FeatInvModel, FeatureExtractor, Reconstructor


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds, CUDA-synchronised."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_gpu.json")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    # A classifier whose penultimate map is 1024x9x9 at 288 px would match the paper; the hint
    # shape only affects the hint encoder, run once per sample. resnet50 gives 2048x8x8.
    extractor = FeatureExtractor("resnet50", input_size=(3, 256, 256))
    model = FeatInvModel.from_preset("minisd", extractor, store_classifier=False)
    reconstructor = Reconstructor(model, device="cuda", dtype=torch.float16)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for batch in args.batches:
        features = torch.rand(batch, *model.feature_spec.shape, device="cuda")
        denoise = reconstructor.guided_denoiser(features, 1.75)
        x = torch.randn(batch, *model.latent_shape, device="cuda")
        with torch.no_grad():
            step_ms = timed(lambda denoise=denoise, x=x: denoise(x, 500), repeats=10)
        whole_ms = timed(
            lambda f=features, b=batch: reconstructor.reconstruct(
                features=f, steps=args.steps, batch_size=b, progress=False
            ),
            repeats=3,
        )
        row = {"backend": "featinv eager fp16", "images": batch, "step_ms": step_ms, "reconstruction_ms": whole_ms}
        results["rows"].append(row)
        print(f"{row['backend']:<22} images={batch:<3} step {step_ms:8.1f} ms   {args.steps} steps {whole_ms:9.1f} ms")
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()

"""GPU benchmark: the miniSD-scale FeatInv model (SD1.x UNet + FeatInv ControlNet, 32x32 latents,
random weights: speed does not depend on weight values), fp16, DDIM with guidance 1.75.

Side by side in one run, for each batch size: diffusers eager (the ControlNet embeds its condition
every step and DDIMScheduler.step updates the latents, as diffusers' ControlNet pipelines do),
featinv eager (hint once per sample, both guidance branches in one batch), and torch.compile
mode=reduce-overhead (featinv's ``compiled`` backend). Per-step time, whole-reconstruction time,
ratios against diffusers eager and against reduce-overhead, the fraction of a given bf16 peak (FLOPs
counted by torch's FlopCounterMode on one step), and the max abs difference of the final latents
against featinv eager for the same seed. Prints a table, writes JSON (``--out``).

    python benchmarks/bench_gpu.py --out results.json                         # on a GPU
    python benchmarks/bench_gpu.py --preset tiny --device cpu --no-compile    # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from featinv import FeatInvModel, FeatureExtractor, Reconstructor

GUIDANCE = 1.75


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronised on CUDA), after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def diffusers_eager(model: FeatInvModel, features: torch.Tensor, latents: torch.Tensor, steps: int) -> torch.Tensor:
    """The diffusers way: condition embedded inside every ControlNet call, DDIMScheduler.step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.noise_schedule.to_dict())  # our fields are diffusers' names
    scheduler.set_timesteps(steps)
    b = features.shape[0]
    dtype = model.unet.dtype
    condition = torch.cat([torch.zeros_like(features), features]).to(dtype)
    context = torch.cat([model.null_context.expand(b, -1, -1), model.context.expand(b, -1, -1)])
    x = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            pair = torch.cat([x, x]).to(dtype)
            hint = model.controlnet.embed(condition)  # every step, as a ControlNet's cond embedding runs
            eps = model.predict_noise(pair, t.to(x.device), context, hint).float()
            uncond, cond = eps.chunk(2)
            x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_gpu.json")
    parser.add_argument("--preset", choices=["minisd", "tiny"], default="minisd")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes minutes)")
    parser.add_argument("--peak-tflops", type=float, default=774.0, help="measured bf16 matmul peak (H200: 774)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA GPU here; use --device cpu --preset tiny for a smoke run")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.preset == "minisd":
        # resnet50 at 256 px gives a 2048x8x8 map; the hint shape only affects the once-per-sample encoder.
        extractor = FeatureExtractor("resnet50", input_size=(3, 256, 256))
        model = FeatInvModel.from_preset("minisd", extractor, store_classifier=False)
    else:
        extractor = FeatureExtractor("resnet18", "layer3", model_kwargs={"num_classes": 10}, input_size=(3, 32, 32))
        model = FeatInvModel.from_preset(
            "tiny",
            extractor,
            store_classifier=False,
            block_out_channels=(8, 16),
            norm_num_groups=4,
            cross_attention_dim=16,
            attention_head_dim=4,
            image_size=16,
            hint_channels=16,
        )
    backends = {"featinv eager": Reconstructor(model, device=device, dtype=dtype)}
    if not args.no_compile:
        compiled = Reconstructor(model, device=device, dtype=dtype, backend="compiled")
        backends[f"torch.compile {compiled.denoiser.mode}"] = compiled  # reduce-overhead on CUDA
    eager = backends["featinv eager"]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = {
        "device": device_name,
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": str(dtype),
        "steps": args.steps,
        "guidance": GUIDANCE,
        "rows": [],
    }
    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        features = torch.rand(batch, *model.feature_spec.shape, generator=generator).to(device)
        latents = torch.randn(batch, *model.latent_shape, generator=generator).to(device)
        denoise = eager.guided_denoiser(features, GUIDANCE)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            denoise(latents, 500)
        step_flops = counter.get_total_flops()
        reference = eager.reconstruct(
            features=features, latents=latents, steps=args.steps, batch_size=batch, progress=False
        ).samples
        runs: dict[str, tuple[Callable[[], object], Callable[[], torch.Tensor]]] = {
            "diffusers eager": (
                lambda f=features, x=latents: diffusers_eager(eager.model, f, x, 1),
                lambda f=features, x=latents: diffusers_eager(eager.model, f, x, args.steps),
            )
        }
        for name, reconstructor in backends.items():
            step_fn = reconstructor.guided_denoiser(features, GUIDANCE)
            runs[name] = (
                lambda s=step_fn, x=latents: s(x, 500),
                lambda r=reconstructor, f=features, x=latents, b=batch: (
                    r.reconstruct(features=f, latents=x, steps=args.steps, batch_size=b, progress=False).samples
                ),
            )
        rows = []
        for name, (one_step, whole) in runs.items():
            with torch.no_grad():
                step_ms = timed(one_step, 10, device)
                whole_ms = timed(whole, 3, device)
                final = whole().to(reference.device)
            rows.append(
                {
                    "backend": name,
                    "images": batch,
                    "step_ms": step_ms,
                    "reconstruction_ms": whole_ms,
                    "fraction_of_peak": step_flops / (step_ms * 1e-3) / (args.peak_tflops * 1e12),
                    "max_abs_diff_vs_featinv_eager": float((final.float().cpu() - reference.float().cpu()).abs().max()),
                }
            )
        base = next(r for r in rows if r["backend"] == "diffusers eager")
        compiled = next((r for r in rows if r["backend"].startswith("torch.compile")), None)
        for row in rows:
            row["speedup_vs_diffusers_eager"] = base["reconstruction_ms"] / row["reconstruction_ms"]
            if compiled is not None:
                row["step_speedup_vs_reduce_overhead"] = compiled["step_ms"] / row["step_ms"]
            results["rows"].append(row)
            print(
                f"{row['backend']:<30} images={batch:<3} step {row['step_ms']:8.2f} ms  {args.steps} steps "
                f"{row['reconstruction_ms']:9.1f} ms  x{row['speedup_vs_diffusers_eager']:.2f} vs diffusers  "
                f"peak {100 * row['fraction_of_peak']:.1f}%  diff {row['max_abs_diff_vs_featinv_eager']:.2e}"
            )
        results.setdefault("flops_per_step", {})[str(batch)] = step_flops
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"device: {device_name}; wrote {args.out}")


if __name__ == "__main__":
    main()

"""GPU benchmark: the miniSD-scale FeatInv model (SD1.x UNet + FeatInv ControlNet, 32x32 latents,
random weights: speed does not depend on weight values), fp16, DDIM with guidance 1.75.

Side by side in one run, for each batch size:

* diffusers eager: the ControlNet embeds its condition every step and DDIMScheduler.step updates
  the latents, as diffusers' ControlNet pipelines do;
* featinv eager: hint once per sample, both guidance branches in one batch;
* torch.compile mode=reduce-overhead: featinv's ``compiled`` backend;
* featinv fast: ``featinv.engine.fast`` (compiled pieces, ControlNet concurrent with the UNet
  encoder on two streams, channels-last weight copies, merged/cached attention projections, fused
  guidance + update, one CUDA graph per step replayed from C++); the same with the twin encoder
  (ControlNet and UNet encoder as one network, ``--twin-batches``); and ablations of it (one
  stream; eager pieces in the graph; the model's own weights and attention, ``--ablation-batches``;
  with ``--autotune-batches``, max-autotune-no-cudagraphs pieces).

Per-step time, whole-reconstruction time (``Reconstructor.reconstruct``: hint, 50 steps, VAE
decode), ratios, the fraction of a given bf16 peak (FLOPs counted by torch's FlopCounterMode on one
guided step) and the max abs difference of the final latents against featinv eager for the same
seed. Each backend is warmed up (compiled, captured) and then timed at once, one at a time: first
the rows the issue's targets need, batch by batch (reduce-overhead last in each), then the twin
encoder and the costly ablations, so that a run cut short keeps what matters; a row that fails is
recorded with its error. ``--wait-pid``: timing starts only after
those processes end (a job sharing the GPU). A last table times the Triton kernels against eager
PyTorch and torch.compile of the same math. ``--profile`` adds where the fast path's step spends
its GPU time (kernels per step, busy time against wall time, the top kernels).
Prints tables, writes JSON (``--out``) after every section.

    python benchmarks/bench_gpu.py --out results.json                                   # on a GPU
    python benchmarks/bench_gpu.py --preset micro --device cpu --no-compile --fast-pieces eager   # a smoke run
                                    # (on a CPU the fast path runs without CUDA graphs or streams)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from featinv import FeatInvModel, FeatureExtractor, Reconstructor
from featinv.sampling.schedule import NoiseSchedule

GUIDANCE = 1.75
AS_STORED = "featinv fast, model's weights+attention"
AUTOTUNED = "featinv fast, max-autotune pieces"
TWIN = "featinv fast, twin encoder"


def add_ratios(rows: list[dict], batch: int) -> None:
    """Ratios of ``batch``'s rows: whole reconstruction against diffusers eager, step and
    reconstruction against torch.compile reduce-overhead (where those rows were measured)."""
    mine = [row for row in rows if row["images"] == batch and "error" not in row]
    diffusers = next((r for r in mine if r["backend"] == "diffusers eager"), None)
    compiled = next((r for r in mine if r["backend"].startswith("torch.compile")), None)
    for row in mine:
        if diffusers is not None:
            row["speedup_vs_diffusers_eager"] = diffusers["reconstruction_ms"] / row["reconstruction_ms"]
        if compiled is not None:
            row["step_speedup_vs_reduce_overhead"] = compiled["step_ms"] / row["step_ms"]
            row["reconstruction_speedup_vs_reduce_overhead"] = compiled["reconstruction_ms"] / row["reconstruction_ms"]


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """(median wall time of ``fn`` in milliseconds, synchronised on CUDA, after one warm-up call;
    the last call's result)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2], result


def diffusers_eager(model: FeatInvModel, features: torch.Tensor, latents: torch.Tensor, steps: int) -> torch.Tensor:
    """The diffusers way: condition embedded inside every ControlNet call, DDIMScheduler.step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.noise_schedule.to_dict())  # our fields are diffusers' names
    scheduler.set_timesteps(steps)
    b = features.shape[0]
    dtype = model.unet.dtype
    condition = torch.cat([torch.zeros_like(features), features]).to(dtype)
    context = model.guidance_contexts(b)
    x = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            pair = torch.cat([x, x]).to(dtype)
            hint = model.controlnet.embed(condition)  # every step, as a ControlNet's cond embedding runs
            eps = model.predict_noise(pair, t.to(x.device), context, hint).float()
            uncond, cond = eps.chunk(2)
            x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
    return x


def build_model(preset: str) -> FeatInvModel:
    """The benchmark's model: ``minisd`` (the issue's scale) or ``micro`` (smoke runs), random weights."""
    if preset == "minisd":
        # resnet50 at 256 px gives a 2048x8x8 map; the hint shape only affects the once-per-sample encoder.
        extractor = FeatureExtractor("resnet50", input_size=(3, 256, 256))
        return FeatInvModel.from_preset("minisd", extractor, store_classifier=False)
    extractor = FeatureExtractor("resnet18", "layer3", model_kwargs={"num_classes": 10}, input_size=(3, 32, 32))
    return FeatInvModel.from_preset("micro", extractor, store_classifier=False)


def fast_step_fn(reconstructor: Reconstructor, features: torch.Tensor, latents: torch.Tensor, steps: int):
    """One replay of the captured step (its step index reset first, so it never runs off the table)."""
    schedule = reconstructor.model.noise_schedule.ddim(steps)
    graph = reconstructor.fast.step_graph(len(latents), schedule, GUIDANCE)
    graph._reset(reconstructor.fast.hint_pair(features), latents)

    def step() -> None:
        graph.step.zero_()
        if graph.graph is not None:
            graph.graph.replay()
        else:
            graph._step()

    return step


def profile_step(one_step: Callable[[], object], replays: int = 10, top: int = 15) -> dict:
    """Where one step's GPU time goes (torch.profiler over ``replays`` calls of ``one_step``, a
    CUDA-graph replay included): kernels per step, their summed time per step against the wall time
    per step (the rest is gaps between kernels), and the ``top`` kernels by total time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    one_step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            one_step()
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6 / replays
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.time_range.elapsed_us())
    busy_us = sum(sum(times) for times in kernels.values()) / replays
    ranked = sorted(kernels.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "kernels_per_step": sum(len(times) for times in kernels.values()) / replays,
        "kernel_us_per_step": busy_us,
        "wall_us_per_step_under_profiler": wall_us,
        "top": [
            {"kernel": name[:120], "calls_per_step": len(times) / replays, "us_per_step": sum(times) / replays}
            for name, times in ranked
        ],
    }


def kernel_rows(device: torch.device) -> list[dict]:
    """The Triton kernels against eager PyTorch and torch.compile of the same math (CUDA events;
    "triton" for the hint encoder's first layer: the mixing at 8x8 and the fused upsample-sum pass)."""
    from featinv.kernels.guided_update import guided_update_, guided_update_reference
    from featinv.kernels.inject import inject_concat

    def per_call_us(fn: Callable[[], object], n: int = 300) -> float:
        for _ in range(10):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / n

    rows = []
    schedule = torch.tensor(NoiseSchedule().ddim(50).coefficients, dtype=torch.float64, device=device)
    step = torch.tensor([10], device=device)
    for batch in (1, 16):
        x = torch.randn(batch, 4, 32, 32, device=device)
        eps = torch.randn(2 * batch, 4, 32, 32, device=device, dtype=torch.float16)
        out = torch.empty_like(x)

        def reference(eps=eps, x=x):
            return guided_update_reference(eps, x, None, schedule, 10, GUIDANCE, "ddim")

        compiled = torch.compile(reference)
        rows.append(
            {
                "kernel": f"guidance + DDIM update, {batch} images",
                "triton_us": per_call_us(
                    lambda eps=eps, x=x, out=out: guided_update_(eps, x, None, schedule, step, GUIDANCE, "ddim", out)
                ),
                "eager_us": per_call_us(reference),
                "compiled_us": per_call_us(compiled),
            }
        )
    for batch in (2, 32):
        h = torch.randn(batch, 640, 16, 16, device=device, dtype=torch.float16)
        skip = torch.randn(batch, 320, 16, 16, device=device, dtype=torch.float16)
        res = torch.randn_like(skip)

        def reference(h=h, skip=skip, res=res):
            return torch.cat([h, skip + res], dim=1)

        compiled = torch.compile(reference)
        rows.append(
            {
                "kernel": f"injection into the up-block concat, batch {batch}, (640+320)x16x16",
                "triton_us": per_call_us(lambda h=h, skip=skip, res=res: inject_concat(h, skip, res)),
                "eager_us": per_call_us(reference),
                "compiled_us": per_call_us(compiled),
            }
        )
    from featinv.kernels.upsample_conv import upsample_conv3x3, upsample_conv3x3_reference

    for batch in (1, 16):  # resnet50's 2048x8x8 map into the miniSD hint encoder's 512-wide first layer
        f = torch.randn(batch, 2048, 8, 8, device=device, dtype=torch.float16)
        weight = torch.randn(512, 2048, 3, 3, device=device, dtype=torch.float16) * 0.01
        bias = torch.zeros(512, device=device, dtype=torch.float16)

        def reference(f=f, weight=weight, bias=bias):
            return upsample_conv3x3_reference(f, weight, bias, (32, 32))

        compiled = torch.compile(reference)
        rows.append(
            {
                "kernel": f"hint encoder's upsample + first conv at 8x8, {batch} images, 2048->512, 32x32",
                "triton_us": per_call_us(lambda f=f, w=weight, b=bias: upsample_conv3x3(f, w, b, (32, 32)), 50),
                "eager_us": per_call_us(reference, 50),
                "compiled_us": per_call_us(compiled, 50),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_gpu.json")
    parser.add_argument("--preset", choices=["minisd", "micro"], default="minisd")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows (they take minutes)")
    parser.add_argument("--no-fast", action="store_true", help="skip the fast path")
    parser.add_argument(
        "--fast-pieces",
        choices=["default", "eager"],
        default="default",
        help="how the fast path's pieces run: torch.compile default mode, or eagerly (a quick smoke run)",
    )
    parser.add_argument(
        "--compiled-batches", type=int, nargs="*", help="batch sizes for torch.compile rows (default: all)"
    )
    for flag, default, variant in (  # the fast path's variants, each one more compile per batch size
        ("--ablation-batches", [1], "with the model's own weights and attention"),
        ("--twin-batches", [1], "with the twin encoder (ControlNet and UNet encoder as one network)"),
        ("--autotune-batches", [], "compiled with max-autotune-no-cudagraphs (minutes of autotuning each)"),
    ):
        parser.add_argument(flag, type=int, nargs="*", default=default, help=f"batch sizes for the fast path {variant}")
    parser.add_argument(
        "--wait-pid", type=int, nargs="+", default=[], help="before the first row, wait for these processes to end"
    )
    parser.add_argument("--wait-max", type=float, default=300.0, help="seconds to wait for --wait-pid at most")
    parser.add_argument("--peak-tflops", type=float, default=774.0, help="measured bf16 matmul peak (H200: 774)")
    parser.add_argument(
        "--profile", action="store_true", help="profile the fast path's step: kernels per step, busy time, top kernels"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA GPU here; use --device cpu --preset micro for a smoke run")
    if args.compiled_batches is None:
        args.compiled_batches = args.batches
    torch.backends.cudnn.benchmark = True  # for every row alike
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_model(args.preset)
    backends = {"featinv eager": Reconstructor(model, device=device, dtype=dtype)}
    build_errors = {}
    if not args.no_compile:
        compiled = Reconstructor(model, device=device, dtype=dtype, backend="compiled")
        backends[f"torch.compile {compiled.denoiser.mode}"] = compiled  # reduce-overhead on CUDA
    if not args.no_fast:
        from featinv.engine.fast import FastPath

        mode = None if args.fast_pieces == "eager" else "default"

        def fast_row(**options) -> Reconstructor:
            """An eager Reconstructor whose guided loop is a fast path (what backend="fast" builds,
            also on a CPU, where it runs without CUDA graphs or streams)."""
            reconstructor = Reconstructor(model, device=device, dtype=dtype)
            reconstructor.fast = FastPath(reconstructor.model, **{"compile_mode": mode, **options})
            return reconstructor

        fast = backends["featinv fast"] = fast_row()
        one_stream = backends["featinv fast, one stream"] = Reconstructor(model, device=device, dtype=dtype)
        one_stream.fast = fast.fast.with_options(streams=False)
        backends["featinv fast, eager pieces"] = fast_row(compile_mode=None)
        if args.twin_batches:
            try:  # an option that may not build everywhere: its failure is a result, not the end of the run
                backends[TWIN] = fast_row(twin_encoder=True)
            except Exception as error:
                build_errors[TWIN] = repr(error)[:2000]
                print(f"{TWIN}: not built: {build_errors[TWIN][:400]}", flush=True)
        backends[AS_STORED] = fast_row(channels_last=False, precomputed=False)
        if args.autotune_batches:
            backends[AUTOTUNED] = fast_row(compile_mode="max-autotune-no-cudagraphs")
    eager = backends["featinv eager"]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = {
        "device": device_name,
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": str(dtype),
        "steps": args.steps,
        "guidance": GUIDANCE,
        "model_build_s": time.perf_counter() - t0,
        "compile_s": {},
        "build_errors": build_errors,
        "rows": [],
    }

    def save() -> None:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)

    inputs = {}
    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        features = torch.rand(batch, *model.feature_spec.shape, generator=generator).to(device)
        latents = torch.randn(batch, *model.latent_shape, generator=generator).to(device)
        inputs[batch] = (features, latents)

    def whole(reconstructor: Reconstructor, batch: int) -> torch.Tensor:
        features, latents = inputs[batch]
        return reconstructor.reconstruct(
            features=features, latents=latents, steps=args.steps, batch_size=batch, progress=False
        ).samples

    if args.wait_pid:  # another job sharing the GPU (a training run): let it finish first
        waited = time.perf_counter()
        while any(os.path.exists(f"/proc/{pid}") for pid in args.wait_pid):
            if time.perf_counter() - waited > args.wait_max:
                results["wait_gave_up"] = True
                break
            time.sleep(1.0)
        results["waited_for_pid_s"] = time.perf_counter() - waited

    def print_row(row: dict) -> None:
        if "error" in row:
            print(f"{row['backend']:<40} images={row['images']:<3} FAILED: {row['error'][:400]}", flush=True)
            return
        print(
            f"{row['backend']:<40} images={row['images']:<3} step {row['step_ms']:8.2f} ms  {args.steps} steps "
            f"{row['reconstruction_ms']:9.1f} ms  x{row.get('speedup_vs_diffusers_eager', float('nan')):.2f} vs "
            f"diffusers  x{row.get('step_speedup_vs_reduce_overhead', float('nan')):.2f} step vs reduce-overhead  "
            f"peak {100 * row['fraction_of_peak']:.1f}%  diff {row['max_abs_diff_vs_featinv_eager']:.2e}",
            flush=True,
        )

    # Backend by backend: warm up (compile, capture), then time at once; each row is saved as soon
    # as it is measured. First what the targets need, batch by batch (torch.compile's CUDA
    # graph trees last in each), then the optional variants (the twin encoder) and the costly
    # ablations (one more compile each), so that a run cut short keeps the rows that matter. A row
    # that fails is recorded with its error and the run goes on.
    later_rows = {TWIN: args.twin_batches, AS_STORED: args.ablation_batches, AUTOTUNED: args.autotune_batches}
    per_batch = {}  # batch -> (flops per step, featinv eager's final latents)

    def plan() -> list[tuple[int, list[str]]]:
        first = []
        for batch in args.batches:
            names = ["diffusers eager", *(n for n in backends if not n.startswith("torch.compile"))]
            names = [n for n in names if n not in later_rows]
            names += [n for n in backends if n.startswith("torch.compile") and batch in args.compiled_batches]
            first.append((batch, names))
        later = [(b, [n for n in later_rows if n in backends and b in later_rows[n]]) for b in args.batches]
        return first + [(batch, names) for batch, names in later if names]

    def measure(name: str, batch: int) -> dict:
        """Warm up, then time ``name`` at ``batch`` images: one row."""
        features, latents = inputs[batch]
        step_flops, reference = per_batch[batch]
        if name == "diffusers eager":
            one_step = lambda f=features, x=latents: diffusers_eager(eager.model, f, x, 1)  # noqa: E731
            whole_run = lambda f=features, x=latents: diffusers_eager(eager.model, f, x, args.steps)  # noqa: E731
        else:
            reconstructor = backends[name]
            begin = time.perf_counter()
            with torch.no_grad():
                whole(reconstructor, batch)  # compile and capture
            if device.type == "cuda":
                torch.cuda.synchronize()
            results["compile_s"][f"{name}, {batch}"] = time.perf_counter() - begin
            if reconstructor.fast is not None:
                one_step = fast_step_fn(reconstructor, features, latents, args.steps)
            else:
                guided = reconstructor.guided_denoiser(features, GUIDANCE)
                one_step = lambda s=guided, x=latents: s(x, 500)  # noqa: E731
            whole_run = lambda r=reconstructor, b=batch: whole(r, b)  # noqa: E731
        with torch.no_grad():
            step_ms, _ = timed(one_step, 20, device)
            whole_ms, final = timed(whole_run, 3, device)
            final = final.float().cpu()
        if args.profile and device.type == "cuda" and name in ("featinv fast", TWIN):
            try:
                found = profile_step(one_step)
            except Exception as error:  # report, keep the rest
                found = {"error": repr(error)}
            results.setdefault("profile", {})[f"{name}, {batch}"] = found
            print(f"profile, {name}, {batch} images: {json.dumps(found)[:1500]}", flush=True)
        return {
            "backend": name,
            "images": batch,
            "step_ms": step_ms,
            "reconstruction_ms": whole_ms,
            "fraction_of_peak": step_flops / (step_ms * 1e-3) / (args.peak_tflops * 1e12),
            "max_abs_diff_vs_featinv_eager": float((final - reference).abs().max()),
            "max_abs_latent": float(reference.abs().max()),
        }

    for batch, names in plan():
        features, latents = inputs[batch]
        if batch not in per_batch:
            denoise = eager.guided_denoiser(features, GUIDANCE)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                denoise(latents, 500)
            results.setdefault("flops_per_step", {})[str(batch)] = counter.get_total_flops()
            with torch.no_grad():
                per_batch[batch] = (counter.get_total_flops(), whole(eager, batch).float().cpu())
        for name in names:
            try:
                row = measure(name, batch)
            except Exception as error:  # a compile or capture failure: report it, keep the other rows
                if device.type == "cuda" and "CUDA error" in repr(error):
                    raise  # the context is lost: nothing after this would run
                row = {"backend": name, "images": batch, "error": repr(error)[:2000]}
            results["rows"].append(row)
            add_ratios(results["rows"], batch)
            print_row(row)
            save()
    print("summary:")
    for row in results["rows"]:
        print_row(row)

    # 3. the kernels on their own.
    if device.type == "cuda":
        try:
            results["kernels"] = kernel_rows(device)
        except Exception as error:  # report, keep the rest
            results["kernels_error"] = repr(error)
        for row in results.get("kernels", []):
            print(
                f"{row['kernel']:<62} triton {row['triton_us']:7.1f} us  eager {row['eager_us']:7.1f} us  "
                f"torch.compile {row['compiled_us']:7.1f} us",
                flush=True,
            )
        save()
    print(f"device: {device_name}; wrote {args.out}")


if __name__ == "__main__":
    main()

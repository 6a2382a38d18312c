"""The published FeatInv at its released size, featinv against the official code, in one run.

A random checkpoint in the exact published layout and size (1.43 G parameters: the miniSD UNet
320 x [1, 2, 4, 4], the ControlNet with its 1024 -> 512 -> 512 -> 320 hint block, the AutoencoderKL,
CLIP ViT-L/14's text model; fp16 in a Lightning ``{"state_dict": ...}`` file, as released) is built
by the official code from its own ``models/cldm_featinv_convnext.yaml``
(``benchmarks/published_official.py``), then, each in a process of its own so that each peak memory
is its own:

1. ``featinv convert`` of it (fp32 and fp16 outputs): wall time, peak RSS against the checkpoint's
   fp32 size, and the memory ``published.footprint`` predicted;
2. the official sampler on the checkpoint, loaded as ``gradio_featinv_convnext.py`` loads it;
3. featinv on the converted folder, same feature map (1024 x 9 x 9), same initial noise, same 4 DDIM
   steps, guidance 1.75 on the prompt; and once more with the DDIM table of the checkpoint's own
   ``alphas_cumprod`` (a diagnostic: the official code samples with the file's fp16-rounded table,
   featinv with the schedule its config defines).

Reported: the images' max difference (in [0, 1]), seconds per DDIM step of each (the sampling
loop, hint included, after a warm-up run; decode apart), peak memory of each, the ratios.

    pip install --no-build-isolation -e '.[official]'
    python benchmarks/bench_published.py --official-code PATH/TO/FeatInv/code --work /tmp/featinv-published
    python benchmarks/bench_published.py ... --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
HERE = Path(__file__).resolve()
CHECKPOINT = "published-random.ckpt"
FEATURES = (1, 1024, 9, 9)  # the published ConvNeXt-B's forward_features at 288 px
LATENTS = (1, 4, 32, 32)
GUIDANCE = 1.75
TOLERANCE = 2e-3  # images, max abs in [0, 1]
MEMORY_BOUND = 1.5  # convert's peak RSS against the checkpoint's fp32 size


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


# ----- the stages, each run in a child process ---------------------------------------------------
def stage_build(args: argparse.Namespace) -> dict:
    from published_official import build_checkpoint

    return build_checkpoint(args.official_code, args.work / CHECKPOINT, seed=args.seed)


def stage_convert(args: argparse.Namespace) -> dict:
    from featinv.cli import main
    from featinv.models.published import footprint, read_checkpoint

    start_rss = peak_rss()
    out = args.work / f"featinv-{args.dtype}"
    for folder in (out, out.with_name(out.name + "-base")):
        shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    code = main(["convert", "--checkpoint", str(args.work / CHECKPOINT), "--out", str(out), "--dtype", args.dtype])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"featinv convert failed with exit code {code}")
    peak = peak_rss()
    state = read_checkpoint(args.work / CHECKPOINT)
    predicted = footprint(state, {"fp32": torch.float32, "fp16": torch.float16}[args.dtype])
    disk = sum(p.stat().st_size for folder in (out, out.with_name(out.name + "-base")) for p in folder.rglob("*"))
    return {
        "dtype": args.dtype,
        "seconds": seconds,
        "peak_rss": peak,
        "rss_before": start_rss,
        "predicted_memory": predicted.memory,
        "fp32_bytes": sum(v.numel() * 4 for v in state.values()),
        "disk_bytes": disk,
        "predicted_disk": predicted.model + predicted.base,
    }


class FeatinvSampler:
    """featinv on the converted folder, sampling as the official sampler does (DDIM, guidance on the
    prompt); with ``file_schedule``, on the DDIM table of the checkpoint's own fp16 ``alphas_cumprod``."""

    def __init__(self, work: Path, device: str, *, file_schedule: bool = False) -> None:
        from featinv import FeatInvModel, Reconstructor

        if file_schedule:  # a diagnostic of the remaining difference, in this process only
            from featinv.models.published import read_checkpoint
            from featinv.sampling.schedule import NoiseSchedule

            table = [float(a) for a in read_checkpoint(work / CHECKPOINT)["alphas_cumprod"].double()]
            NoiseSchedule.alphas_cumprod = lambda self, impl=None: table
        start = time.perf_counter()
        self.reconstructor = Reconstructor(FeatInvModel.from_pretrained(work / "featinv-fp32"), device=device)
        self.load_seconds = time.perf_counter() - start
        self.images = None

    def sample(self, features: torch.Tensor, x_T: torch.Tensor, *, steps: int, guidance: float, sync) -> tuple:
        """As :meth:`OfficialSampler.sample` (the hint embedding, once per sample, is in the loop)."""
        marks = [time.perf_counter()]
        result = self.reconstructor.reconstruct(
            features=features,
            noise=x_T,
            steps=steps,
            guidance_scale=guidance,
            guidance="prompt",
            sampler="ddim",
            progress=False,
            callback=lambda info: (sync(), marks.append(time.perf_counter())),
        )
        self.images = result.images
        self.decode_seconds = time.perf_counter() - marks[-1]  # reconstruct decodes after the last step
        return result.samples, marks

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.images  # decoded by reconstruct, timed in decode_seconds


def load_sampler(args: argparse.Namespace, which: str):
    if which == "official":
        from published_official import OfficialSampler

        return OfficialSampler(args.official_code, args.work / CHECKPOINT, args.device)
    return FeatinvSampler(args.work, args.device, file_schedule=which == "featinv-file-schedule")


def synchronizer(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def stage_sample(args: argparse.Namespace) -> dict:
    """One sampler in a process of its own: its images and latents (kept in the work folder), its
    load time, its peak memory (CPU RSS; GPU allocated)."""
    inputs = load_file(str(args.work / "inputs.safetensors"))
    sampler = load_sampler(args, args.which)
    sync = synchronizer(args.device)
    latents, marks = sampler.sample(inputs["features"], inputs["x_T"], steps=args.steps, guidance=GUIDANCE, sync=sync)
    start = time.perf_counter()
    images = sampler.decode(latents)
    sync()
    decode_seconds = getattr(sampler, "decode_seconds", time.perf_counter() - start)
    tensors = {"images": images.contiguous(), "latents": latents.float().cpu().contiguous()}
    save_file(tensors, str(args.work / f"out-{args.which}.safetensors"))
    return {
        "load_seconds": sampler.load_seconds,
        "sampling_seconds": marks[-1] - marks[0],
        "decode_seconds": decode_seconds,
        "peak_rss": peak_rss(),
        "gpu_peak": gpu_peak(args.device),
    }


def stage_timing(args: argparse.Namespace) -> dict:
    """Both samplers in one process, warmed up, then timed in turns (the order alternating each
    round), so that whatever else the machine does falls on both alike."""
    inputs = load_file(str(args.work / "inputs.safetensors"))
    samplers = {name: load_sampler(args, name) for name in ("official", "featinv")}
    sync = synchronizer(args.device)
    loops: dict[str, list[float]] = {name: [] for name in samplers}
    steps: dict[str, list[float]] = {name: [] for name in samplers}
    for sampler in samplers.values():  # warm-up
        sampler.sample(inputs["features"], inputs["x_T"], steps=args.steps, guidance=GUIDANCE, sync=sync)
    for round_ in range(args.rounds):
        order = list(samplers) if round_ % 2 == 0 else list(samplers)[::-1]
        for name in order:
            _, marks = samplers[name].sample(
                inputs["features"], inputs["x_T"], steps=args.steps, guidance=GUIDANCE, sync=sync
            )
            loops[name].append(marks[-1] - marks[0])
            steps[name] += [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {"loop_seconds": loops, "step_seconds": steps}


STAGES = {"build": stage_build, "convert": stage_convert, "sample": stage_sample, "timing": stage_timing}


# ----- the run ------------------------------------------------------------------------------------
def run_stage(args: argparse.Namespace, stage: str, *extra: str) -> dict:
    """Run one stage in a fresh Python process; its JSON result."""
    command = [sys.executable, str(HERE), "--stage", stage, "--work", str(args.work), "--device", args.device]
    command += ["--official-code", str(args.official_code), "--steps", str(args.steps), "--rounds", str(args.rounds)]
    command += ["--seed", str(args.seed), *extra]
    print(f"[{time.strftime('%H:%M:%S')}] {stage} {' '.join(extra)}", flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"stage {stage} failed (exit code {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def compare(work: Path, name: str) -> dict:
    official, ours = load_file(str(work / "out-official.safetensors")), load_file(str(work / f"out-{name}.safetensors"))
    return {key: float((official[key] - ours[key]).abs().max()) for key in ("images", "latents")}


SAMPLERS = ("official", "featinv", "featinv-file-schedule")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-code", type=Path, required=True, help="the code/ folder of AI4HealthUOL/FeatInv")
    parser.add_argument("--work", type=Path, default=Path("/tmp/featinv-published"), help="checkpoint and outputs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="timed runs of each sampler, in turns, after a warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true", help="build the random checkpoint again")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--which", choices=SAMPLERS, default="featinv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.official_code = args.official_code.resolve()
    if args.stage:
        print(json.dumps(STAGES[args.stage](args)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": _device_name(args.device), "torch": torch.__version__, "steps": args.steps}
    if args.rebuild or not (args.work / CHECKPOINT).is_file():
        results["build"] = run_stage(args, "build")
    generator = torch.Generator().manual_seed(args.seed + 2)
    inputs = {"features": torch.randn(FEATURES, generator=generator), "x_T": torch.randn(LATENTS, generator=generator)}
    save_file(inputs, str(args.work / "inputs.safetensors"))
    results["convert"] = [run_stage(args, "convert", "--dtype", dtype) for dtype in ("fp32", "fp16")]
    results["sample"] = {name: run_stage(args, "sample", "--which", name) for name in SAMPLERS}
    results["difference"] = compare(args.work, "featinv")
    results["difference_file_schedule"] = compare(args.work, "featinv-file-schedule")
    results["timing"] = run_stage(args, "timing")
    loops = results["timing"]["loop_seconds"]
    per_step = {name: median(seconds) / args.steps for name, seconds in loops.items()}
    results["seconds_per_step"] = per_step
    results["speedup"] = per_step["official"] / per_step["featinv"]
    # the same comparison round by round: featinv faster in every round, or not
    results["speedup_per_round"] = [a / b for a, b in zip(loops["official"], loops["featinv"], strict=True)]
    results["parity"] = results["difference"]["images"] <= TOLERANCE
    convert = results["convert"][0]
    results["convert_memory_ratio"] = convert["peak_rss"] / convert["fp32_bytes"]
    results["convert_within_bound"] = results["convert_memory_ratio"] <= MEMORY_BOUND
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    import platform

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{model}, {torch.get_num_threads()} threads"


def print_table(results: dict) -> None:
    gb = 1e9
    print(f"\n{results['device']}, torch {results['torch']}, {results['steps']} DDIM steps, guidance {GUIDANCE}")
    for row in results["convert"]:
        print(
            f"featinv convert --dtype {row['dtype']}: {row['seconds']:.1f} s, peak RSS {row['peak_rss'] / gb:.2f} GB "
            f"= {row['peak_rss'] / row['fp32_bytes']:.2f}x the checkpoint's fp32 size "
            f"({row['fp32_bytes'] / gb:.2f} GB; "
            f"predicted {row['predicted_memory'] / gb:.2f} GB + {row['rss_before'] / gb:.2f} GB of libraries); "
            f"{row['disk_bytes'] / gb:.2f} GB written"
        )
    print("| sampler | s per DDIM step (median of rounds) | load | decode | peak RSS | GPU peak |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in SAMPLERS:
        row = results["sample"][name]
        per_step = results["seconds_per_step"].get(name.replace("-", "_"))
        gpu = f"{row['gpu_peak'] / gb:.2f} GB" if row.get("gpu_peak") else "-"
        step = f"{per_step:.3f} s" if per_step else f"{row['sampling_seconds'] / results['steps']:.3f} s (one run)"
        print(
            f"| {name} | {step} | {row['load_seconds']:.1f} s | {row['decode_seconds']:.2f} s | "
            f"{row['peak_rss'] / gb:.2f} GB | {gpu} |"
        )
    rounds = ", ".join(f"{r:.2f}" for r in results["speedup_per_round"])
    difference, file_schedule = results["difference"], results["difference_file_schedule"]
    print(
        f"featinv is {results['speedup']:.2f}x the official code's speed per step (rounds: {rounds}); "
        f"images differ by at most "
        f"{difference['images']:.2e} (latents {difference['latents']:.2e}; with the file's alphas_cumprod "
        f"{file_schedule['images']:.2e} / {file_schedule['latents']:.2e}): parity within {TOLERANCE:g} "
        f"{'holds' if results['parity'] else 'FAILS'}"
    )


if __name__ == "__main__":
    main()

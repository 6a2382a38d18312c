"""The one training loop: AdamW, warm-up + cosine learning rate, gradient accumulation, clipping,
optional EMA (diffusers' ``EMAModel``), mixed precision (accelerate's choices: no, fp16 with a
gradient scaler, bf16), multi-process data parallelism through ``accelerate`` (DDP; the same code
runs alone or under ``accelerate launch`` / ``torchrun``), atomic checkpoints every N steps and at
the end, an exact ``resume``, and extending a finished run with more ``steps``.

Exactness: the loss function receives the batch *key* (``step * grad_accum + micro``) and draws
its data, noise and dropout from generators seeded by it, so step k is the same computation
whether or not the run was interrupted before it. Each process takes the rows ``part`` of the
global batch; DDP averages the gradients, so the update is the single-process one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from featinv.choices import MIXED_PRECISION
from featinv.distributed import get_accelerator
from featinv.errors import FeatInvError
from featinv.limits import within
from featinv.training.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_latest_checkpoint,
    optimizer_from_checkpoint,
    optimizer_to_checkpoint,
    save_checkpoint,
)

if TYPE_CHECKING:
    from featinv.models.featinv_model import FeatInvModel

LossFn = Callable[[torch.nn.Module, int, slice], torch.Tensor]
"""(the prepared module, batch key, this process's rows of the batch) -> scalar loss."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training stage. ``batch_size`` is the global batch of one micro-step."""

    steps: int
    lr: float
    batch_size: int
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    grad_accum: int = 1
    ema_decay: float | None = None
    clip_norm: float = 1.0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 50
    time_budget_s: float | None = None
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        bounded = {  # field: its row of featinv.limits.LIMITS
            "steps": "train_steps",
            "lr": "lr",
            "batch_size": "batch_size",
            "grad_accum": "grad_accum",
            "checkpoint_every": "every",
            "keep_checkpoints": "keep_checkpoints",
            "ema_decay": "ema",
            "time_budget_s": "seconds",
        }
        optional = {"ema_decay", "time_budget_s"}  # None: off
        for name, quantity in bounded.items():
            if not (name in optional and getattr(self, name) is None):
                within(quantity, getattr(self, name), name)
        checks = [
            ("warmup_fraction", 0.0 <= self.warmup_fraction < 1.0, "in [0, 1)"),
            ("mixed_precision", self.mixed_precision in MIXED_PRECISION, f"one of {', '.join(MIXED_PRECISION)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise FeatInvError(f"{name} must be {expected}, got {getattr(self, name)}")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The forward pass's autocast: ``auto`` is bf16 on CUDA and full precision elsewhere."""
        kind = self.mixed_precision
        if kind == "auto":
            kind = "bf16" if device.type == "cuda" else "no"
        if kind == "no":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16 if kind == "bf16" else torch.float16)

    def learning_rate(self, step: int) -> float:
        """diffusers' ``get_cosine_schedule_with_warmup``: linear warm-up from 0 over
        ``warmup_fraction`` of the steps, then cosine decay to zero (a pure function of the step)."""
        warmup = max(1, int(self.warmup_fraction * self.steps))
        return self.lr * _cosine_with_warmup(warmup, self.steps)(step)


@functools.lru_cache(maxsize=16)
def _cosine_with_warmup(warmup: int, steps: int) -> Callable[[int], float]:
    """The multiplier diffusers' ``get_cosine_schedule_with_warmup`` applies at each step (taken
    from the scheduler it builds, on a one-parameter optimizer: the trainer sets the rate of its
    own optimizer per step, which keeps resuming and extending a run exact)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_cosine_schedule_with_warmup(dummy, warmup, steps).lr_lambdas[0]


def ema_shadow(checkpoint: Checkpoint) -> list[torch.Tensor]:
    """A checkpoint's moving averages, in the order of the trained parameters (saved as "0", "1", ...
    by :meth:`Trainer._checkpoint`)."""
    shadow = checkpoint.tensors["ema"]
    return [shadow[str(i)] for i in range(len(shadow))]


@dataclass
class TrainResult:
    """Logged losses, the number of optimizer steps done, and whether all ``steps`` were done."""

    losses: list[float]
    steps_done: int
    finished: bool


class Trainer:
    """Train the parameters of ``module`` that require grad by minimising ``loss_fn``."""

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        loss_fn: LossFn,
        config: TrainConfig,
        *,
        checkpoint_dir: str | Path | None = None,
        log_path: str | Path | None = None,
        accelerator: Any = None,
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        """``after_step(step)`` runs on every process after each optimizer step (e.g. validation
        pictures every N steps; the module is in training mode again afterwards)."""
        self.name, self.module, self.loss_fn, self.config = name, module, loss_fn, config
        self.after_step = after_step
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.log_path = None if log_path is None else Path(log_path)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.accelerator = accelerator or get_accelerator(next(module.parameters()).device)
        world = self.accelerator.num_processes
        if config.batch_size % world:
            raise FeatInvError(f"batch_size must be a multiple of the {world} processes, got {config.batch_size}")
        self.part = slice(self.accelerator.process_index, None, world)
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise FeatInvError(f"{name}: the module has no parameter that requires grad")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        device = self.accelerator.device
        fp16 = config.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16) if fp16 else None
        self.ema = None
        if config.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=config.ema_decay)

    # ----- checkpoints ------------------------------------------------------------------------
    def _checkpoint(self, step: int, losses: list[float], elapsed: float) -> None:
        if self.checkpoint_dir is None:
            return
        if self.accelerator.is_main_process:
            optimizer_tensors, optimizer_rest = optimizer_to_checkpoint(self.optimizer)
            tensors = {"model": self.module.state_dict(), "optimizer": optimizer_tensors}
            state: dict[str, Any] = {
                "stage": self.name,
                "losses": losses,
                "elapsed_s": elapsed,
                "optimizer": optimizer_rest,
                "config": asdict(self.config),
            }
            if self.ema is not None:
                ema_state = self.ema.state_dict()
                tensors["ema"] = {str(i): p for i, p in enumerate(ema_state.pop("shadow_params"))}
                state["ema"] = ema_state
            save_checkpoint(self.checkpoint_dir, Checkpoint(step, tensors, state), keep=self.config.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def _restore(self) -> tuple[int, list[float], float]:
        found = None if self.checkpoint_dir is None else load_latest_checkpoint(self.checkpoint_dir)
        if found is None:
            return 0, [], 0.0
        saved = {k: v for k, v in found.state["config"].items() if k in ("batch_size", "grad_accum", "lr")}
        current = {k: getattr(self.config, k) for k in saved}
        if saved != current:
            raise FeatInvError(f"{self.name}: cannot resume {found.path} made with {saved} under {current}")
        if found.step > self.config.steps:
            raise FeatInvError(
                f"{self.name}: {found.path} is at step {found.step}, past --steps {self.config.steps}: give --steps "
                f">= {found.step} to continue (a larger --steps extends a finished run)"
            )
        if found.state["config"].get("steps", self.config.steps) != self.config.steps:
            print(
                f"{self.name}: extending the run of {found.state['config']['steps']} steps to {self.config.steps} "
                "(the learning-rate schedule now spans the new length)"
            )
        self.module.load_state_dict(found.tensors["model"])
        optimizer_from_checkpoint(self.optimizer, found.tensors["optimizer"], found.state["optimizer"])
        if self.ema is not None and "ema" in found.tensors:
            self.ema.load_state_dict({**found.state["ema"], "shadow_params": ema_shadow(found)})
            self.ema.to(self.params[0].device)
        print(f"{self.name}: resuming from {found.path} (step {found.step})")
        return found.step, list(found.state["losses"]), float(found.state["elapsed_s"])

    # ----- the loop -----------------------------------------------------------------------------
    def _log(self, row: dict[str, Any]) -> None:
        if self.log_path is not None and self.accelerator.is_main_process:
            with self.log_path.open("a") as log:
                log.write(json.dumps(row) + "\n")

    def _mean_over_processes(self, loss: torch.Tensor) -> float:
        """The step's loss averaged over every process's rows (each process saw its part)."""
        if self.accelerator.num_processes > 1:
            loss = self.accelerator.reduce(loss.reshape(1), reduction="mean")
        return float(loss)

    def _should_stop(self, elapsed: float) -> bool:
        budget = self.config.time_budget_s
        if budget is None:  # no budget: no per-step collective either
            return False
        stop = elapsed > budget
        if self.accelerator.num_processes > 1:  # every process stops at the same step
            flag = torch.tensor([float(stop)], device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return stop

    def fit(self, resume: bool = False) -> TrainResult:
        """Run the remaining steps; ``resume`` continues from the newest good checkpoint."""
        config, accelerator = self.config, self.accelerator
        if not resume and self.checkpoint_dir is not None and list_checkpoints(self.checkpoint_dir):
            raise FeatInvError(
                f"{self.checkpoint_dir} holds checkpoints of an earlier run: resume it (--resume) or use another --out"
            )
        start_step, losses, elapsed_before = self._restore() if resume else (0, [], 0.0)
        wrapped = accelerator.prepare(self.module)
        self.module.train()
        started = time.perf_counter()
        step = start_step
        images_per_step = config.batch_size * config.grad_accum
        bar = tqdm(
            total=config.steps,
            initial=start_step,
            desc=self.name,
            unit="step",
            disable=not accelerator.is_local_main_process,
        )
        try:
            while step < config.steps:
                for group in self.optimizer.param_groups:
                    group["lr"] = config.learning_rate(step)
                total = torch.zeros((), device=accelerator.device)  # read on the host only when logged
                for micro in range(config.grad_accum):
                    key = step * config.grad_accum + micro
                    last = micro == config.grad_accum - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(wrapped):
                        loss = self.loss_fn(wrapped, key, self.part) / config.grad_accum
                        accelerator.backward(self.scaler.scale(loss) if self.scaler else loss)
                    total += loss.detach().float()
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                accelerator.clip_grad_norm_(self.params, config.clip_norm)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.step(self.params)
                step += 1
                elapsed = elapsed_before + time.perf_counter() - started
                rate = (step - start_step) * images_per_step / max(1e-9, time.perf_counter() - started)
                bar.update(1)
                if step % config.log_every == 0 or step == config.steps or step == start_step + 1:
                    total = self._mean_over_processes(total)
                    losses.append(total)
                    bar.set_postfix(loss=f"{total:.4f}", img_s=f"{rate:.0f}")
                    self._log(
                        {"stage": self.name, "step": step, "loss": total, "lr": config.learning_rate(step - 1)}
                        | {"seconds": round(elapsed, 2), "images_per_s": round(rate, 1)}
                    )
                if self.after_step is not None:
                    self.after_step(step)
                    self.module.train()
                if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    self._checkpoint(step, losses, elapsed)  # the last one lets a larger --steps extend the run
                if step < config.steps and self._should_stop(elapsed):
                    print(f"{self.name}: time budget of {config.time_budget_s:.0f} s reached after {step} steps")
                    self._checkpoint(step, losses, elapsed)
                    break
        finally:
            bar.close()
        if self.ema is not None:
            self.ema.copy_to(self.params)
        self.module.eval()
        return TrainResult(losses, step, step >= config.steps)


def alphas_table(model: FeatInvModel, device: torch.device) -> torch.Tensor:
    """The training alpha-bar table (num_train_timesteps,) as float32 on ``device``."""
    return torch.tensor(model.noise_schedule.alphas_cumprod(), dtype=torch.float32, device=device)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (hint embedding runs outside the wrapped forward)."""
    return getattr(module, "module", module)


def fit(
    name: str,
    module: torch.nn.Module,
    loss_fn: Any,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    log_path: str | Path | None = None,
    resume: bool = False,
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """One stage: a :class:`Trainer` for ``module`` and ``loss_fn``, fitted (``resume`` continues)."""
    trainer = Trainer(
        name, module, loss_fn, config, checkpoint_dir=checkpoint_dir, log_path=log_path, after_step=after_step
    )
    return trainer.fit(resume=resume)


def loss_curve_png(log_path: Path, out: Path) -> None:
    """Plot the JSONL log's losses per stage (log scale). Steps logged twice, by a run that was
    interrupted and resumed from an earlier checkpoint, are plotted once (the resumed value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages: dict[str, dict[int, float]] = {}
    for line in log_path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            stages.setdefault(row["stage"], {})[row["step"]] = row["loss"]
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
    for ax, (stage, points) in zip(axes[0], stages.items(), strict=True):
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps])
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)

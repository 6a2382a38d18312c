"""The embeddable low-latency API: a reconstructor that warms up once, then serves requests from any
thread, one at a time on the device, with previews every k steps and cancellation in flight.

    server = RealtimeReconstructor(DIR, steps=10)   # or a FeatInvModel
    request = server.submit(images, seed=0, preview_every=2, on_preview=show)
    request.cancel()            # e.g. the user moved the slider again
    images = request.result()   # raises RequestCancelled if it was cancelled
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from featinv.errors import FeatInvError, require_positive_int
from featinv.models.featinv_model import FeatInvModel
from featinv.pipeline import DEFAULT_GUIDANCE, Reconstructor, resolve_device

Preview = Callable[[int, torch.Tensor], None]
"""(step index, predicted images (B, 3, H, W) in [0, 1]) -> None."""
T = TypeVar("T")


class RequestCancelled(Exception):
    """The request was cancelled before it finished."""


class Request:
    """A submitted reconstruction: ``result()``, ``cancel()``, ``done()``."""

    def __init__(self) -> None:
        self._future: Future[torch.Tensor] = Future()
        self._cancel = threading.Event()
        self.steps_run = 0

    def cancel(self) -> None:
        """Stop the request at its next step (or before it starts)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> torch.Tensor:
        """The reconstructions (B, 3, H, W); raises :class:`RequestCancelled` if cancelled."""
        return self._future.result(timeout)


class RealtimeReconstructor:
    """Serve reconstructions with bounded latency: fixed steps and sampler, warmed up at creation,
    requests run one at a time in submission order on a worker thread.

    All of the server's tensor work (loading ``model`` when it is a folder, warm-up, requests, and
    whatever callers pass to :meth:`call`) runs on that one thread; a server of another model in the
    same process should share it (``share_thread_with``). On a CPU this is a speed matter:
    PyTorch's OpenMP pool belongs to the thread that starts parallel work, and once a second thread
    holds a pool of its own, more threads exist than cores on a small machine and OpenMP's idle
    threads sleep between operations instead of spinning (the demo model's request: 0.8 s with one
    pool, 1.2 s with two, on 2 cores).
    """

    def __init__(
        self,
        model: FeatInvModel | str | Path,
        *,
        device: str | torch.device = "auto",
        backend: str = "eager",
        steps: int = 10,
        sampler: str = "dpmpp",
        guidance_scale: float = DEFAULT_GUIDANCE,
        warmup: bool = True,
        warmup_batch: int = 1,
        fast_options: dict[str, Any] | None = None,
        share_thread_with: RealtimeReconstructor | None = None,
    ) -> None:
        require_positive_int("warmup_batch", warmup_batch)
        if share_thread_with is not None and not isinstance(share_thread_with, RealtimeReconstructor):
            raise FeatInvError(
                f"share_thread_with must be a RealtimeReconstructor, got {type(share_thread_with).__name__}"
            )
        device = resolve_device(device)
        self.steps, self.sampler, self.guidance_scale = steps, sampler, guidance_scale
        # Servers of several models in one process share one thread (one OpenMP pool, see above); the
        # thread's first owner shuts it down.
        self._owns_worker = share_thread_with is None
        if self._owns_worker:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featinv-serve")
        else:
            self._worker = share_thread_with._worker
        try:
            self.reconstructor = self.call(self._build, model, device, backend, fast_options, warmup_batch)
        except BaseException:
            if self._owns_worker:
                self._worker.shutdown(wait=False)
            raise
        # Compile / allocate (and on the fast backend capture) once, at the batch the caller will send,
        # so the first user request is not the slow one.
        if warmup:
            zeros = self.call(torch.zeros, warmup_batch, *self.reconstructor.model.feature_spec.shape)
            self.submit(features=zeros).result()

    @staticmethod
    def _build(
        model: FeatInvModel | str | Path,
        device: torch.device,
        backend: str,
        fast_options: dict[str, Any] | None,
        warmup_batch: int,
    ) -> Reconstructor:
        if not isinstance(model, FeatInvModel):
            model = FeatInvModel.from_pretrained(model)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        # Requests bring any number of images: on the backends that compile (and capture) per batch
        # shape, batches run at powers of two, so that a few shapes serve them all; the warm-up's
        # batch (the caller's usual one) runs as it is.
        shaped = backend in ("compiled", "fast")
        return Reconstructor(
            model,
            device=device,
            backend=backend,
            dtype=dtype,
            pad_batches=shaped,
            exact_batches=(warmup_batch,),  # the caller's usual batch: warmed up as it is, run unpadded
            fast_options=fast_options,
        )

    @property
    def spec(self):
        return self.reconstructor.spec

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` run on the serving thread, after the work queued before it;
        returns its result or raises its exception. For a caller's own tensor work (see the class)."""
        return self._worker.submit(function, *args, **kwargs).result()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, C, h, w) of images (B, 3, H, W), computed on the serving thread."""
        return self.call(self.reconstructor.features, images)

    def submit(
        self,
        images: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        seed: int = 0,
        preview_every: int = 0,
        on_preview: Preview | None = None,
    ) -> Request:
        """Queue a reconstruction of ``images`` (or of ``features``); returns at once."""
        if preview_every < 0:
            raise FeatInvError(f"preview_every must be >= 0, got {preview_every}")
        request = Request()

        def run() -> None:
            if request.cancelled:
                request._future.set_exception(RequestCancelled("cancelled before it started"))
                return
            try:
                images_out = self._run(request, images, features, seed, preview_every, on_preview)
            except RequestCancelled as error:
                request._future.set_exception(error)
            except Exception as error:  # delivered to the caller, the server keeps serving
                request._future.set_exception(error)
            else:
                request._future.set_result(images_out)

        self._worker.submit(run)
        return request

    def _run(
        self,
        request: Request,
        images: torch.Tensor | None,
        features: torch.Tensor | None,
        seed: int,
        preview_every: int,
        on_preview: Preview | None,
    ) -> torch.Tensor:
        model = self.reconstructor.model

        def on_step(info: dict[str, Any]) -> None:
            request.steps_run = info["i"] + 1
            if request.cancelled:
                raise RequestCancelled(f"cancelled after {request.steps_run} of {self.steps} steps")
            if on_preview is not None and preview_every and (info["i"] + 1) % preview_every == 0:
                with torch.no_grad():
                    preview = model.decode(info["denoised"].to(model.unet.dtype)).float().cpu()
                on_preview(info["i"], preview)

        result = self.reconstructor.reconstruct(
            images,
            features=features,
            steps=self.steps,
            sampler=self.sampler,
            guidance_scale=self.guidance_scale,
            seed=seed,
            batch_size=64,
            progress=False,
            callback=on_step,
        )
        return result.images

    def close(self) -> None:
        """Stop serving: the thread ends with the server that started it (requests queued are
        dropped); a server sharing another's thread leaves it running."""
        if self._owns_worker:
            self._worker.shutdown(wait=True, cancel_futures=True)

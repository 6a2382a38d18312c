"""The embeddable low-latency API: a reconstructor that warms up once, then serves requests from any
thread, one at a time on the device, with previews every k steps and cancellation in flight.

    server = ReconstructionServer(DIR, steps=10)   # or a FeatInvModel
    request = server.submit(images, seed=0, preview_every=2, on_preview=show)
    request.cancel()            # e.g. the user moved the slider again
    images = request.result()   # raises RequestCancelled if it was cancelled
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from featinv.errors import FeatInvError, require_positive_int, require_seed
from featinv.models.featinv_model import FeatInvModel
from featinv.models.model_config import check_guidance
from featinv.pipeline import Reconstructor, resolve_device

if TYPE_CHECKING:
    from featinv.analysis.hybrid import HybridConfig

Preview = Callable[[int, torch.Tensor], None]
"""(step index, predicted images (B, 3, H, W) in [0, 1]) -> None."""
T = TypeVar("T")


SERVER_STEPS, SERVER_SAMPLER = 10, "dpmpp"  # a server's default for a model that is not distilled


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

    def add_done_callback(self, callback: Callable[[Request], None]) -> None:
        """Call ``callback(self)`` when the request ends (at once if it has): on the serving thread,
        so it must not wait for another request."""
        self._future.add_done_callback(lambda _: callback(self))


@dataclass
class _Job:
    """A queued request and what it asked for."""

    request: Request
    images: torch.Tensor | None
    features: torch.Tensor | None
    seed: int
    preview_every: int
    on_preview: Preview | None
    refine: bool = False
    maps: torch.Tensor | None = None

    def rows(self) -> int:
        given = self.features if self.features is not None else self.images
        return len(given) if isinstance(given, torch.Tensor) and given.ndim >= 1 else 1


class ReconstructionServer:
    """Serve reconstructions with bounded latency: fixed steps and sampler, warmed up at creation,
    requests run in submission order on a worker thread (``guidance``: what guidance guides on,
    as ``Reconstructor.reconstruct``'s; default the model's): with ``batching`` (the default), the
    requests queued while one runs go together as one denoiser batch (up to ``max_batch_rows``
    images), each with the pictures it would get alone; cancelled ones are dropped.

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
        steps: int | None = None,
        sampler: str | None = None,
        guidance_scale: float | None = None,
        guidance: str | None = None,
        warmup: bool = True,
        warmup_batch: int = 1,
        fast_options: dict[str, Any] | None = None,
        share_thread_with: ReconstructionServer | None = None,
        batching: bool = True,
        max_batch_rows: int = 64,
        refine: HybridConfig | None = None,
        trust_code: bool = False,
    ) -> None:
        require_positive_int("warmup_batch", warmup_batch)
        self.refine_config = refine  # submit(refine=True)'s settings; None: HybridConfig.for_model's
        self._refined: Reconstructor | None = None
        self.batching, self.max_batch_rows = batching, require_positive_int("max_batch_rows", max_batch_rows)
        self._pending: deque[_Job] = deque()
        self._pending_lock = threading.Lock()
        self.cancelled_requests = 0  # requests ended by cancel(): before they started or while they ran
        if share_thread_with is not None and not isinstance(share_thread_with, ReconstructionServer):
            raise FeatInvError(
                f"share_thread_with must be a ReconstructionServer, got {type(share_thread_with).__name__}"
            )
        device = resolve_device(device)
        # Servers of several models in one process share one thread (one OpenMP pool, see above); the
        # thread's first owner shuts it down.
        self._owns_worker = share_thread_with is None
        if self._owns_worker:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featinv-serve")
            self._urgent: deque[tuple[Future, Callable[[], Any]]] = deque()
        else:
            self._worker, self._urgent = share_thread_with._worker, share_thread_with._urgent
        try:
            self.reconstructor = self.call(self._build, model, device, backend, fast_options, warmup_batch, trust_code)
            # 10 DPM-Solver++ steps with guidance; a distilled model: 4 steps of its sampler, none
            if not self.realtime:
                steps, sampler = steps or SERVER_STEPS, sampler or SERVER_SAMPLER
            self.steps, self.guidance_scale, self.sampler = self.reconstructor.sampling_defaults(
                steps, guidance_scale, sampler
            )
            default = self.reconstructor.model.guidance
            self.guidance = default if guidance is None else check_guidance(guidance)
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
        trust_code: bool = False,
    ) -> Reconstructor:
        if not isinstance(model, FeatInvModel):
            model = FeatInvModel.from_pretrained(model, trust_code=trust_code)
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
    def realtime(self) -> bool:
        """Whether this server samples a distilled model (the few-step mode)."""
        return self.reconstructor.model.distillation is not None

    def describe_sampling(self) -> str:
        """What each reconstruction runs, in words (the web page shows it)."""
        if self.realtime:
            method = self.reconstructor.model.distillation["method"]
            steps = f"{self.steps} {self.sampler} step{'s' * (self.steps != 1)}"
            return f"real-time mode: {steps} of a {method}-distilled model"
        guidance = f", guidance {self.guidance_scale:g} on the {self.guidance}" if self.guidance_scale > 1 else ""
        return f"{self.steps} {self.sampler} steps{guidance}"

    @property
    def spec(self):
        return self.reconstructor.spec

    @property
    def can_refine(self) -> bool:
        """Whether ``submit(refine=True)`` is served: hybrid sampling needs the model's classifier."""
        return self.reconstructor.extractor is not None

    def _refining(self) -> Reconstructor:
        """The hybrid sampler of the same model (built on first use, on the serving thread)."""
        if self._refined is None:
            from featinv.analysis.hybrid import HybridReconstructor

            if not self.can_refine:
                raise FeatInvError("refine needs the model's classifier, and this model stores none")
            model = self.reconstructor.model
            self._refined = HybridReconstructor(
                model,
                extractor=self.reconstructor.extractor,
                device=self.reconstructor.device,
                dtype=model.unet.dtype,
                config=self.refine_config,
            )
        return self._refined

    def call(self, function: Callable[..., T], *args: Any, urgent: bool = False, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` run on the serving thread, after the work queued before it;
        returns its result or raises its exception. For a caller's own tensor work (see the class).

        ``urgent``: run it before the queued work instead, between two denoiser steps of the
        reconstruction running now (for short work a user waits on, e.g. an upload's feature maps:
        it then waits one step, not every queued request)."""
        if not urgent:
            return self._worker.submit(function, *args, **kwargs).result()
        future: Future[T] = Future()
        self._urgent.append((future, lambda: function(*args, **kwargs)))
        self._worker.submit(self._run_urgent)  # when no reconstruction is running to pick it up
        return future.result()

    def _run_urgent(self) -> None:
        """Run the urgent calls waiting (on the serving thread); each delivers to its own caller."""
        while True:
            try:
                future, job = self._urgent.popleft()
            except IndexError:
                return
            try:
                future.set_result(job())
            except BaseException as error:  # the caller's error, never the reconstruction's
                future.set_exception(error)

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
        refine: bool = False,
    ) -> Request:
        """Queue a reconstruction of ``images`` (or of ``features``); returns at once. Image i is
        seeded ``seed + i``; with ``batching``, requests queued together run as one denoiser batch
        and each gets the pictures it would get alone. ``refine``: hybrid sampling (the same
        sampling refined by feature guidance, :mod:`featinv.analysis.hybrid`; slower, closer to the
        feature map)."""
        if preview_every < 0:
            raise FeatInvError(f"preview_every must be >= 0, got {preview_every}")
        if refine and not self.can_refine:
            raise FeatInvError("refine needs the model's classifier, and this model stores none")
        request = Request()
        with self._pending_lock:
            self._pending.append(_Job(request, images, features, seed, preview_every, on_preview, bool(refine)))
        self._worker.submit(self._serve_pending)
        return request

    def _take_pending(self) -> list[_Job]:
        """The next job, and with ``batching`` the jobs queued behind it, up to ``max_batch_rows``."""
        taken: list[_Job] = []
        rows = 0
        with self._pending_lock:
            while self._pending and (not taken or self.batching):
                job = self._pending[0]
                size = job.rows()
                if taken and (rows + size > self.max_batch_rows or job.refine != taken[0].refine):
                    break
                taken.append(self._pending.popleft())
                rows += size
        return taken

    def _serve_pending(self) -> None:
        """Run what is queued (on the serving thread): one request, or several as one batch."""
        live = []
        for job in self._take_pending():
            if job.request.cancelled:
                self._end_cancelled(job, "cancelled before it started")
                continue
            try:  # each request's own input errors are its own
                job.maps = self._maps(job)
            except Exception as error:
                job.request._future.set_exception(error)
                continue
            live.append(job)
        if not live:
            return
        try:
            images_out = self._run(live)
        except RequestCancelled as error:  # every request of the batch was cancelled mid-run
            for job in live:
                self._end_cancelled(job, str(error))
            return
        except Exception as error:  # delivered to the callers, the server keeps serving
            for job in live:
                job.request._future.set_exception(error)
            return
        start = 0
        for job in live:
            rows = len(job.maps)
            if job.request.cancelled:
                self._end_cancelled(job, "cancelled while its batch ran")
            else:
                job.request._future.set_result(images_out[start : start + rows])
            start += rows

    def _end_cancelled(self, job: _Job, why: str) -> None:
        """End a cancelled request (on the serving thread) and count it."""
        self.cancelled_requests += 1
        job.request._future.set_exception(RequestCancelled(why))

    def _maps(self, job: _Job) -> torch.Tensor:
        if (job.images is None) == (job.features is None):
            raise FeatInvError("pass exactly one of images or features")
        if job.features is not None:
            self.spec.check_features(job.features)
            return job.features.to(self.reconstructor.device, torch.float32)
        return self.reconstructor.features(job.images)

    def _run(self, jobs: list[_Job]) -> torch.Tensor:
        model = self.reconstructor.model
        maps = torch.cat([job.maps for job in jobs])
        generators = []
        for job in jobs:  # row i of a request is seeded seed + i, as if it ran alone
            require_seed("seed", job.seed, len(job.maps))
            generators += [torch.Generator().manual_seed(job.seed + i) for i in range(len(job.maps))]
        offsets = [0]
        for job in jobs:
            offsets.append(offsets[-1] + len(job.maps))

        def on_step(info: dict[str, Any]) -> None:
            self._run_urgent()  # uploads and the like do not wait for the whole queue
            for job in jobs:
                job.request.steps_run = info["i"] + 1
            if all(job.request.cancelled for job in jobs):
                raise RequestCancelled(f"cancelled after {info['i'] + 1} of {self.steps} steps")
            for k, job in enumerate(jobs):
                if job.on_preview is not None and job.preview_every and (info["i"] + 1) % job.preview_every == 0:
                    rows = info["denoised"][offsets[k] : offsets[k + 1]]
                    with torch.no_grad():
                        preview = model.decode(rows.to(model.unet.dtype)).float().cpu()
                    job.on_preview(info["i"], preview)

        reconstructor = self._refining() if jobs[0].refine else self.reconstructor
        result = reconstructor.reconstruct(
            features=maps,
            steps=self.steps,
            sampler=self.sampler,
            guidance_scale=self.guidance_scale,
            guidance=self.guidance,
            generator=generators,
            batch_size=max(len(maps), 1),
            progress=False,
            callback=on_step,
        )
        return result.images

    def close(self) -> None:
        """Stop serving: the thread ends with the server that started it (requests queued are
        dropped); a server sharing another's thread leaves it running."""
        if self._owns_worker:
            self._worker.shutdown(wait=True, cancel_futures=True)
            while self._urgent:  # calls the cancelled queue will not reach
                self._urgent.popleft()[0].set_exception(FeatInvError("the server was closed"))


def __getattr__(name: str):
    if name == "RealtimeReconstructor":  # its old name: it serves reconstructions, at any speed
        import warnings

        warnings.warn(
            "featinv.serving.RealtimeReconstructor is deprecated: it is featinv.serving.ReconstructionServer",
            DeprecationWarning,
            stacklevel=2,
        )
        return ReconstructionServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

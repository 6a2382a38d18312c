"""What the explorer does, whatever its face (the web page, :mod:`featinv.web.app`, or the notebook
widget, :mod:`featinv.notebook`): image A's feature map edited by the sliders and the painted cells
(:mod:`featinv.analysis.regions`), reconstructed for several seeds on a
:class:`~featinv.serving.ReconstructionServer` with previews of the sampler's clean estimate, the
map shown as pictures with colours fixed per model (:mod:`featinv.analysis.map_view`), and the
difference an edit makes to the unedited reconstruction.

A preview costs decoding the sampler's clean estimate and the face's encoding of it (measured once,
at start) plus delivering it (streaming, not measured); the cadence adapts to the measured step time
so that the measured part stays within :data:`PREVIEW_SHARE` of the time, leaving room for the rest
within a tenth (``benchmarks/bench_webapp.py --previews`` measures the whole, on against off), and
keeps at least one preview per reconstruction."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from featinv.analysis.map_view import MapPalette
from featinv.analysis.regions import MapEdit, apply_edit
from featinv.analysis.steering import Concept, class_concept
from featinv.errors import FeatInvError
from featinv.serving import ReconstructionServer, Request

PREVIEW_SHARE = 0.05  # the measured part of the previews' cost, as a share of a reconstruction's time
PALETTE_EXAMPLES = 16  # example images the map palette is fitted on


def steering_note(extractor: Any) -> str | None:
    """None when the map has class directions (a linear head over its channels), else why not."""
    try:
        class_concept(extractor, 0)
    except FeatInvError:
        head = extractor.linear_head()
        over = f"{head.in_features} channels" if isinstance(head, torch.nn.Linear) else "no linear head"
        return (
            f"steering is off: class directions live in the classifier's linear head ({over}), and this model "
            f"inverts {extractor.spec.describe()}, a layer the head does not read"
        )
    return None


@dataclass
class ExplorerResult:
    """One state's reconstruction: ``images`` (seeds, 3, H, W), the ``edited`` map (1, C, h, w),
    ``unedited`` (seeds, 3, H, W) for a regional edit (else None), the concept's mean
    ``probability`` on the images (None without a concept), wall ``seconds`` and ``previews`` sent."""

    images: torch.Tensor
    edited: torch.Tensor
    unedited: torch.Tensor | None
    probability: float | None
    seconds: float
    previews: int

    def difference(self) -> torch.Tensor | None:
        """(H, W): what a regional edit changed, the mean |edited - unedited| over seeds and RGB."""
        return None if self.unedited is None else (self.images - self.unedited).abs().mean((0, 1))


class ExplorerCore:
    """The explorer's work on one server: ``seeds`` reconstructions per state.

    Args:
        server: the serving reconstructor (its model's classifier is needed).
        seeds: reconstructions per state, seeded 0, 1, ...
        examples: example images (N, 3, H, W) in [0, 1] whose maps fix the palette (the first
            :data:`PALETTE_EXAMPLES`); without them, the first map shown fixes it.
        encode: what the face does with a preview (seeds, 3, H, W) (e.g. PNG-encode it): timed with
            the decoding, as what one preview costs.
    """

    def __init__(
        self,
        server: ReconstructionServer,
        *,
        seeds: int = 3,
        examples: torch.Tensor | None = None,
        encode: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        self.server, self.seeds = server, seeds
        self.extractor = server.reconstructor.extractor
        if self.extractor is None:
            raise FeatInvError("the explorer needs the model's classifier, and this model stores none")
        self.steer_note = steering_note(self.extractor)
        self.palette: MapPalette | None = None
        self.mean_map: torch.Tensor | None = None  # the examples' mean map: the ``mean`` operation's
        if examples is not None and len(examples):
            self.palette = MapPalette.fit(self.features(examples[:PALETTE_EXAMPLES]))
            self.mean_map = self.palette.mean_map
        self._lock = threading.Lock()
        self._step_seconds: float | None = None  # per denoiser step, measured on the requests
        self._preview_seconds = self._measure_preview(encode)  # per preview: decoding and encoding it
        self._unedited: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # recent unedited results

    @property
    def grid(self) -> tuple[int, int]:
        spec = self.server.spec
        return spec.height, spec.width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Maps (B, C, h, w) of the spatial model's classifier, on the serving thread."""
        return self.server.call(self.server.reconstructor.extractor, images.to(self.server.reconstructor.device))

    def map_pictures(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(principal components as RGB (1, 3, h, w), norm (1, 1, h, w)) of a map (1, C, h, w)."""
        if self.palette is None:  # no examples: the first map shown fixes the colours
            self.palette = MapPalette.fit(features)
        return self.palette.rgb(features), self.palette.norm(features)

    def concept(self, index: int | None) -> Concept | None:
        """Class ``index``'s direction, or None where this map has none."""
        if self.steer_note is not None or index is None:
            return None
        return class_concept(self.extractor, index)

    def edited_map(
        self, features: torch.Tensor, edit: MapEdit, *, other: torch.Tensor | None = None, concept: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A's map (1, C, h, w) as ``edit`` (and class ``concept``) make it, that map for every
        seed (seeds, C, h, w): what :meth:`submit` takes). Tensor work: call it on the serving thread."""
        if edit.strength != 0 and self.steer_note is not None:
            raise FeatInvError(self.steer_note)
        edited = apply_edit(features, edit, concept=self.concept(concept), other=other, mean_map=self.mean_map)
        return edited, edited.expand(self.seeds, -1, -1, -1).contiguous()

    def preview_every(self) -> int:
        """Steps between previews: as often as keeps them within :data:`PREVIEW_SHARE` of the time,
        at least one per reconstruction (before the measurements: one, half-way)."""
        steps = self.server.steps
        if steps < 2:
            return 0
        with self._lock:
            step, preview = self._step_seconds, self._preview_seconds
        if step is None:
            return max(1, steps // 2)
        every = math.ceil(preview / (PREVIEW_SHARE * step))
        return int(min(max(every, 1), steps - 1))

    def submit(
        self, rows: torch.Tensor, *, on_preview: Callable[[int, torch.Tensor], None] | None = None, **options: Any
    ) -> Request:
        """Reconstruct a map's rows (seeds, C, h, w) (from :meth:`edited_map`), seeded 0, 1, ...;
        with ``on_preview``, previews of the clean estimate at the adaptive cadence. ``options``:
        :meth:`ReconstructionServer.submit`'s."""
        if on_preview is None:
            return self.server.submit(features=rows, seed=0, **options)
        return self.server.submit(
            features=rows, seed=0, preview_every=self.preview_every(), on_preview=on_preview, **options
        )

    def record(self, seconds: float, previews: int) -> None:
        """A finished reconstruction's wall time and its number of previews: the time per step
        (what the previews cost taken out) for the cadence."""
        steps = self.server.steps
        if steps:
            step = max(seconds - previews * (self._preview_seconds or 0.0), 0.0) / steps
            with self._lock:
                self._step_seconds = step if self._step_seconds is None else 0.7 * self._step_seconds + 0.3 * step

    def _measure_preview(self, encode: Callable[[torch.Tensor], Any] | None) -> float:
        """Seconds one preview costs: decoding the clean estimate of every seed, and ``encode`` of
        the pictures (the median of three)."""
        model = self.server.reconstructor.model
        latents = torch.zeros(self.seeds, *model.latent_shape, device=self.server.reconstructor.device)

        def decode() -> float:
            started = time.perf_counter()
            with torch.no_grad():
                pictures = model.decode(latents.to(model.unet.dtype)).float().cpu().clamp(0, 1)
            if encode is not None:
                encode(pictures)
            return time.perf_counter() - started

        return sorted(self.server.call(decode) for _ in range(3))[1]

    def run(
        self,
        features: torch.Tensor,
        edit: MapEdit,
        *,
        state: Hashable,
        other: torch.Tensor | None = None,
        concept: int | None = None,
        refine: bool = False,
        on_preview: Callable[[int, torch.Tensor], None] | None = None,
        on_submitted: Callable[[Request], None] | None = None,
        timeout: float = 120.0,
    ) -> ExplorerResult:
        """Reconstruct A's map ``features`` (1, C, h, w) as ``edit`` makes it; for a regional edit
        also the same sliders without the cells (remembered per ``state``, which names A and B, so
        that painting reuses the pictures already made). Raises RequestCancelled when cancelled
        (``on_submitted`` gets the request, e.g. to cancel it)."""
        edited, rows = self.server.call(  # short: between two steps of a reconstruction running
            self.edited_map, features, edit, other=other, concept=concept, urgent=True
        )
        started = time.perf_counter()
        previews = [0]

        def counted(step: int, preview: torch.Tensor) -> None:
            previews[0] += 1
            on_preview(step, preview)

        request = self.submit(rows, on_preview=counted if on_preview else None, refine=refine)
        if on_submitted is not None:
            on_submitted(request)
        images = request.result(timeout)
        seconds = time.perf_counter() - started
        self.record(seconds, previews[0])
        key = (state, edit.strength, edit.mix, concept, refine)  # the sliders, without the cells
        unedited = None
        if not edit.is_regional:
            self._remember(key, images)
        else:
            unedited = self._remembered(key)
            if unedited is None:
                _, plain = self.server.call(
                    self.edited_map, features, MapEdit(edit.strength, edit.mix), other=other, concept=concept
                )
                unedited = self.submit(plain, refine=refine).result(timeout)
                self._remember(key, unedited)

        def probability() -> float | None:
            chosen = self.concept(concept)
            if chosen is None:
                return None
            return float(chosen.probability(self.extractor, images.to(self.server.reconstructor.device)).mean())

        return ExplorerResult(images, edited, unedited, self.server.call(probability), seconds, previews[0])

    def _remember(self, key: Hashable, images: torch.Tensor) -> None:
        """Keep an unedited result (the 32 most recent)."""
        with self._lock:
            self._unedited[key] = images
            self._unedited.move_to_end(key)
            while len(self._unedited) > 32:
                self._unedited.popitem(last=False)

    def _remembered(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            return self._unedited.get(key)

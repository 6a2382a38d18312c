"""The explorer in a Jupyter notebook: an ``anywidget`` with the web page's controls (steering
toward a class, interpolation toward image B, painted grid cells and what to do in them), live
previews of the sampler, the feature map as pictures and the difference a painted edit makes, on the
same :class:`~featinv.serving.ReconstructionServer` and :class:`~featinv.exploring.ExplorerCore` as
``featinv serve``. Needs ``pip install 'featinv[notebook]'``.

    from featinv.notebook import Explorer
    explorer = Explorer("my-model", "cat.jpg", other="dog.jpg")
    explorer                                    # the widget: sliders, painted cells, pictures
    images = explorer.reconstruct(cells=[(3, 4)], operation="zero")   # (seeds, 3, H, W)
    explorer.edited_map                         # (1, C, h, w), what was reconstructed
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from featinv.errors import FeatInvError

try:
    import anywidget
    import traitlets
except ImportError as error:  # the optional extra
    raise ImportError("featinv.notebook needs the notebook extra: pip install 'featinv[notebook]'") from error

from featinv.analysis.regions import MapEdit
from featinv.choices import REGION_OPERATIONS
from featinv.exploring import ExplorerCore, ExplorerResult
from featinv.images import heatmap, load_image, png_data_url, to_pil
from featinv.models.class_names import display_class_names
from featinv.serving import ReconstructionServer, RequestCancelled

WIDGET_JS = Path(__file__).with_name("web") / "widget.js"
WIDGET_CSS = Path(__file__).with_name("web") / "widget.css"


def data_url(picture: torch.Tensor, scale: int = 1) -> str:
    """A picture (3, H, W) in [0, 1] as a PNG data URL (scaled up without smoothing)."""
    return png_data_url(to_pil(picture), scale)


def _preview_urls(preview: torch.Tensor) -> list[str]:
    """A preview's pictures (seeds, 3, H, W) as the widget shows them."""
    return [data_url(picture.clamp(0, 1), scale=2) for picture in preview]


class Explorer(anywidget.AnyWidget):
    """The explorer widget on a FeatInv model (a folder or a loaded ``FeatInvModel``).

    Args:
        model: the model folder or model.
        image: image A (a file path, or (3, H, W) / (1, 3, H, W) in [0, 1] at the model's size).
        other: image B, the same way (for interpolation and ``paste``).
        seeds: reconstructions per state.
        examples: images (N, 3, H, W) that fix the map's colours and give the ``mean`` operation
            its map; without them the first map shown fixes the colours.
        device, steps, trust_code: as :class:`ReconstructionServer`'s.

    Setting ``strength``, ``mix``, ``concept``, ``cells`` or ``operation`` (from Python or the
    widget) starts a reconstruction and cancels the one in flight; ``images`` shows the previews,
    then the result. :meth:`reconstruct` does the same and waits; :attr:`result` and
    :attr:`edited_map` hold the last one.
    """

    _esm = WIDGET_JS
    _css = WIDGET_CSS

    strength = traitlets.Float(0.0).tag(sync=True)
    mix = traitlets.Float(0.0).tag(sync=True)
    concept = traitlets.Int(0).tag(sync=True)
    cells = traitlets.List(traitlets.List(traitlets.Int())).tag(sync=True)
    operation = traitlets.Unicode("steer").tag(sync=True)
    previews = traitlets.Bool(True).tag(sync=True)

    image_a = traitlets.Unicode("").tag(sync=True)
    image_b = traitlets.Unicode("").tag(sync=True)
    map_picture = traitlets.Unicode("").tag(sync=True)
    norm_picture = traitlets.Unicode("").tag(sync=True)
    images = traitlets.List(traitlets.Unicode()).tag(sync=True)
    difference = traitlets.Unicode("").tag(sync=True)
    status = traitlets.Unicode("").tag(sync=True)
    grid = traitlets.List(traitlets.Int()).tag(sync=True)
    class_names = traitlets.List(traitlets.Unicode()).tag(sync=True)
    steer_note = traitlets.Unicode("").tag(sync=True)
    operations = traitlets.List(traitlets.Unicode(), list(REGION_OPERATIONS)).tag(sync=True)

    def __init__(
        self,
        model: Any,
        image: str | Path | torch.Tensor | None = None,
        other: str | Path | torch.Tensor | None = None,
        *,
        seeds: int = 3,
        examples: torch.Tensor | None = None,
        device: str = "auto",
        steps: int | None = None,
        trust_code: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.server = ReconstructionServer(model, device=device, steps=steps, warmup_batch=seeds, trust_code=trust_code)
        try:
            self.core = ExplorerCore(self.server, seeds=seeds, examples=examples, encode=_preview_urls)
        except BaseException:
            self.server.close()
            raise
        self.grid = list(self.core.grid)
        head = self.core.extractor.linear_head()
        classes = head.out_features if isinstance(head, torch.nn.Linear) else 0
        self.class_names = display_class_names(self.server.reconstructor.model.class_names, classes)
        self.steer_note = self.core.steer_note or ""
        self.result: ExplorerResult | None = None
        self._features: dict[str, torch.Tensor] = {}
        self._version = 0  # which A and B: the unedited pictures are remembered per pair
        self._request = None
        self._done = threading.Event()
        self._done.set()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.observe(self._changed, names=["strength", "mix", "concept", "cells", "operation", "previews"])
        if other is not None:
            self.set_image(other, which="b", reconstruct=False)
        if image is not None:
            self.set_image(image)

    @traitlets.validate("strength", "mix", "operation", "cells")
    def _valid(self, proposal: dict[str, Any]) -> Any:
        """A value that would make a bad edit is refused with MapEdit's message; the state stays."""
        name, value = proposal["trait"].name, proposal["value"]
        state = {"strength": self.strength, "mix": self.mix, "operation": self.operation, "cells": self.cells}
        state[name] = value
        try:
            MapEdit(state["strength"], state["mix"], tuple(tuple(cell) for cell in state["cells"]), state["operation"])
            if name == "cells" and self.grid:
                from featinv.analysis.regions import cell_mask

                cell_mask([tuple(cell) for cell in value], tuple(self.grid))
        except FeatInvError as error:
            raise traitlets.TraitError(str(error)) from error
        return value

    # ----- images ------------------------------------------------------------------------------
    def _as_image(self, image: str | Path | torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [0, 1] at the model's size (a file: resized and centre-cropped as the
        classifier's eval transform does)."""
        size = self.server.reconstructor.model.image_size
        if isinstance(image, (str, Path)):
            return load_image(image, size, self.server.spec.crop_pct)[None]
        if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
            raise FeatInvError("image must be a file path or a (3, H, W) / (1, 3, H, W) tensor in [0, 1]")
        image = image[None] if image.ndim == 3 else image
        if tuple(image.shape[-2:]) != tuple(size):
            image = torch.nn.functional.interpolate(image.float(), size=size, mode="bilinear", antialias=True)
        return image[:1].float().clamp(0, 1)

    def set_image(self, image: str | Path | torch.Tensor, which: str = "a", *, reconstruct: bool = True) -> None:
        """Set image A (``which="a"``) or B, and reconstruct."""
        if which not in ("a", "b"):
            raise FeatInvError(f"which must be 'a' or 'b', got {which!r}")
        picture = self._as_image(image)
        self._features[which] = self.core.features(picture)
        self._version += 1
        if which == "a":
            self.image_a = data_url(picture[0], scale=2)
            self._show_map(self._features["a"])
        else:
            self.image_b = data_url(picture[0], scale=2)
        if reconstruct and "a" in self._features:
            self._start()

    def _show_map(self, features: torch.Tensor) -> None:
        """A map (1, C, h, w) into the map's picture traits (components and norm)."""
        rgb, norm = self.server.call(self.core.map_pictures, features)
        self.map_picture, self.norm_picture = data_url(rgb[0]), data_url(heatmap(norm[:, 0])[0])

    # ----- reconstructing ----------------------------------------------------------------------
    @property
    def edit(self) -> MapEdit:
        """The widget's state as a :class:`MapEdit`."""
        return MapEdit(self.strength, self.mix, tuple(tuple(cell) for cell in self.cells), self.operation)

    @property
    def edited_map(self) -> torch.Tensor | None:
        """The last reconstructed map (1, C, h, w)."""
        return None if self.result is None else self.result.edited

    def _changed(self, change: dict[str, Any]) -> None:
        if "a" in self._features:
            self._start()

    def _start(self) -> None:
        """Cancel the reconstruction in flight and start one of the current state (in a thread:
        the notebook stays responsive)."""
        with self._lock:
            if self._request is not None:
                self._request.cancel()
            self._done.clear()
            edit = self.edit  # read now: a later change starts its own run
            worker = threading.Thread(target=self._run, args=(edit, self.concept, self.previews), daemon=True)
            self._worker = worker
        worker.start()

    def _run(self, edit: MapEdit, concept: int, previews: bool) -> None:
        me = threading.current_thread()

        def on_preview(step: int, preview: torch.Tensor) -> None:
            if self._worker is me:
                self.images = _preview_urls(preview)
                self.status = f"step {step + 1} of {self.server.steps} (preview)"

        def submitted(request) -> None:
            with self._lock:
                self._request = request
            if self._worker is not me:
                request.cancel()

        try:
            self.status = "reconstructing…"
            result = self.core.run(
                self._features["a"],
                edit,
                state=self._version,
                other=self._features.get("b"),
                concept=concept if self.core.steer_note is None else None,
                on_preview=on_preview if previews else None,
                on_submitted=submitted,
            )
        except RequestCancelled:
            return
        except Exception as error:  # shown on the widget; wait() raises it as FeatInvError
            if self._worker is me:
                self.status = f"error: {error}"
                self.result = None
                self._done.set()
            if not isinstance(error, FeatInvError):
                raise
            return
        if self._worker is not me:
            return
        self.result = result
        self.images = [data_url(picture, scale=2) for picture in result.images]
        change = result.difference()
        self.difference = "" if change is None else data_url(heatmap(change[None], high=0.25)[0], scale=2)
        self._show_map(result.edited)
        self.status = f"updated in {result.seconds:.2f} s, {result.previews} previews"
        self._done.set()

    def wait(self, timeout: float = 120.0) -> ExplorerResult:
        """Wait for the reconstruction of the current state; its result."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"no reconstruction within {timeout} s")
        if self.result is None:
            raise FeatInvError(self.status or "nothing reconstructed: set an image first")
        return self.result

    def reconstruct(self, **state: Any) -> torch.Tensor:
        """Set any of ``strength``, ``mix``, ``concept``, ``cells``, ``operation`` (the others as
        they are), reconstruct and wait: the images (seeds, 3, H, W)."""
        unknown = set(state) - {"strength", "mix", "concept", "cells", "operation"}
        if unknown:
            raise FeatInvError(f"reconstruct takes strength, mix, concept, cells and operation, not {sorted(unknown)}")
        if "cells" in state:
            state["cells"] = [list(cell) for cell in state["cells"]]
        with self.hold_trait_notifications():  # one run for the whole change
            for name, value in state.items():
                setattr(self, name, value)
        if not state and "a" in self._features:
            self._start()
        return self.wait().images

    def close(self) -> None:
        """Stop the widget: its reconstruction in flight, then its server."""
        with self._lock:
            worker, request, self._worker = self._worker, self._request, None
        if request is not None:
            request.cancel()
        if worker is not None:
            worker.join(60)
        self.server.close()
        super().close()

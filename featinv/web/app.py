"""The web app: upload or pick an image, see its reconstructions (several seeds), steer toward a
class with a slider, interpolate toward a second image with another; stale requests are cancelled.
With a second model trained on pooled maps of the same classifier, a switch shows what the pooled
map (the paper's baseline) leaves of the picture, on the same image and slider settings.

FastAPI with one plain HTML page, not Gradio: the page needs request-level control (a newer slider
value cancels the request in flight, on the server and in the browser) and must stay fast on a CPU;
a small JSON API plus ``fetch`` with ``AbortController`` does exactly that, with three dependencies.
"""

from __future__ import annotations

import base64
import io
import itertools
import threading
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from featinv.analysis.compose import lerp
from featinv.analysis.metrics import SPREAD_MAX, sample_spread
from featinv.analysis.steering import Concept, class_concept, steer
from featinv.errors import FeatInvError
from featinv.images import from_pil, heatmap, to_pil
from featinv.models.featinv_model import FeatInvModel
from featinv.serving import RealtimeReconstructor, RequestCancelled

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
PAGE = Path(__file__).with_name("index.html")


def _png_data_url(pil: Image.Image, scale: int = 4) -> str:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class ReconstructQuery(BaseModel):
    """One slider state: image ``id``, steering ``strength`` toward class ``concept``, and ``mix``
    toward image ``other``, reconstructed from its ``mode`` feature map (``spatial`` or, with a pooled
    model, ``pooled``); ``client`` identifies the page whose older request becomes stale."""

    id: str
    mode: str = "spatial"
    client: str = "default"
    strength: float = 0.0
    concept: int = 0
    other: str | None = None
    mix: float = 0.0


class Session:
    """Uploaded images' feature maps by id (one per model, by feature mode), and each client's
    request in flight."""

    def __init__(self) -> None:
        self.features: dict[str, dict[str, torch.Tensor]] = {}
        self.thumbnails: dict[str, str] = {}
        self.in_flight: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count(1)


def decode_upload(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """An uploaded file as (1, 3, H, W) in [0, 1] at ``size``; FeatInvError for anything else."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise FeatInvError(f"the file is {len(data) / 1e6:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 1e6:.0f} MB")
    if data[:8] == b"\x93NUMPY\x01\x00" or data[8:9] == b"{" and b'"dtype"' in data[:4096]:
        raise FeatInvError("this is a weights or array file, not an image (upload a PNG or JPEG)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise FeatInvError(
                    f"the image is {image.width}x{image.height}; at most {MAX_PIXELS} pixels are accepted"
                )
            return from_pil(image.convert("RGB").resize(size[::-1], Image.BICUBIC))[None]
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise FeatInvError(f"not an image this app can read ({type(error).__name__})") from error


def create_app(
    model: FeatInvModel | str | Path,
    *,
    pooled_model: FeatInvModel | str | Path | None = None,
    device: str = "auto",
    steps: int = 10,
    seeds: int = 3,
    backend: str = "eager",
    fast_options: dict[str, Any] | None = None,
):
    """The FastAPI app serving ``model`` (a model or its folder; ``backend`` and ``fast_options`` as
    ``Reconstructor``'s: ``fast`` on a GPU), and ``pooled_model`` beside it when given: a model of
    the same classifier and layer trained on pooled maps, which the page offers as a switch. Every
    tensor operation runs on the servers' one shared thread (``server.call``): the request
    handlers' threads only decode, encode and wait."""
    options = dict(device=device, steps=steps, backend=backend, warmup_batch=seeds, fast_options=fast_options)
    server = RealtimeReconstructor(model, **options)
    servers = {server.spec.mode: server}
    if pooled_model is not None:
        try:
            pooled = RealtimeReconstructor(pooled_model, **options, share_thread_with=server)
        except BaseException:
            server.close()
            raise
        servers["pooled"] = pooled
        problem = None
        if pooled.spec.mode != "pooled" or server.spec.mode != "spatial":
            problem = (
                f"pooled_model must be trained on pooled maps and model on spatial ones; got {pooled.spec.mode} "
                f"and {server.spec.mode}"
            )
        elif not pooled.spec.same_source(server.spec):
            problem = (
                f"pooled_model was trained for {pooled.spec.describe()}, model for {server.spec.describe()}: "
                "the switch compares one classifier's maps"
            )
        if problem:
            server.close()
            raise FeatInvError(problem)
    session = Session()
    extractor = server.reconstructor.extractor
    size = server.reconstructor.model.image_size
    classes = extractor.classifier.get_classifier().out_features
    app = FastAPI(title="featinv")

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def remember(image: torch.Tensor) -> dict[str, Any]:
        features, picture = server.call(
            lambda: ({mode: s.reconstructor.features(image) for mode, s in servers.items()}, to_pil(image[0]))
        )
        thumbnail = _png_data_url(picture)
        with session.lock:
            key = str(next(session.ids))
            session.features[key] = features
            session.thumbnails[key] = thumbnail
        return {"id": key, "thumbnail": thumbnail}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        from featinv.training.shapes import CLASSES

        names = list(CLASSES) if server.spec.model == "convnext_atto" and classes == len(CLASSES) else None
        names = names or [f"class {k}" for k in range(classes)]
        return {
            "model": server.spec.describe(),
            "classes": classes,
            "class_names": names,
            "seeds": seeds,
            "steps": steps,
            "modes": list(servers),
        }

    @app.post("/api/example/{index}")
    def example(index: int) -> Any:
        from featinv.demo import DEMO_SEED
        from featinv.training.shapes import CLASSES, generate_shapes

        if not 0 <= index < 100:
            return error("example index must be in [0, 99]")
        sample = server.call(generate_shapes, index + 1, DEMO_SEED + 7, size=size[0])
        name = CLASSES[int(sample.labels[index])] if len(CLASSES) == classes else str(int(sample.labels[index]))
        return {**remember(sample.images[index : index + 1]), "label": name}

    @app.post("/api/upload")
    async def upload(file: Annotated[UploadFile, File()]) -> Any:
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        try:
            return remember(server.call(decode_upload, data, size))
        except FeatInvError as message:
            return error(str(message))

    @app.post("/api/reconstruct")
    def reconstruct(query: ReconstructQuery) -> Any:
        if query.mode not in servers:
            return error(f"mode must be one of {list(servers)}, got {query.mode!r}")
        chosen = servers[query.mode]
        with session.lock:
            features = session.features.get(query.id, {}).get(query.mode)
            other = session.features.get(query.other, {}).get(query.mode) if query.other else None
            stale = session.in_flight.get(query.client)
        if features is None:
            return error("unknown image: upload or pick one first", 404)
        if not -5.0 <= query.strength <= 5.0 or not 0.0 <= query.mix <= 1.0:
            return error("strength must be in [-5, 5] and mix in [0, 1]")
        if not 0 <= query.concept < classes:
            return error(f"concept must be a class in [0, {classes - 1}]")
        if stale is not None:
            stale.cancel()  # a newer slider value makes the request in flight stale

        def slider_state() -> tuple[Concept, torch.Tensor]:
            """The concept, and (seeds, C, h, w): A's map moved toward B and along the concept."""
            concept = class_concept(extractor, query.concept)
            moved = lerp(features, other, query.mix) if other is not None and query.mix > 0 else features
            if query.strength != 0:
                moved = steer(moved, concept, [query.strength])[0]
            return concept, moved.repeat(seeds, 1, 1, 1)

        try:
            concept, moved = server.call(slider_state)
        except FeatInvError as message:  # e.g. a classifier without a linear head over this map
            return error(str(message))
        request = chosen.submit(features=moved, seed=0)
        with session.lock:
            session.in_flight[query.client] = request
        try:
            images = request.result(timeout=120)
        except RequestCancelled:
            return error("superseded by a newer request", 409)
        except FeatInvError as message:
            return error(str(message))

        def pictures_and_probability() -> tuple[list[Image.Image], Image.Image | None, float]:
            probability = concept.probability(extractor, images.to(server.reconstructor.device))
            # what the seeds disagree on: the per-pixel spread over them (what the map leaves open)
            spread = to_pil(heatmap(sample_spread(images[:, None]), high=SPREAD_MAX)[0]) if len(images) > 1 else None
            return [to_pil(image) for image in images], spread, float(probability.mean())

        pictures, spread, probability = server.call(pictures_and_probability)
        return {
            "images": [_png_data_url(picture) for picture in pictures],
            "spread": _png_data_url(spread) if spread is not None else None,
            "concept_probability": probability,
        }

    app.state.server = server
    app.state.servers = servers
    return app


def serve(
    model_dir: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    backend: str = "eager",
    fast_options: dict[str, Any] | None = None,
    pooled_model_dir: str | Path | None = None,
) -> None:
    """Run the app with uvicorn (blocking). Without ``model_dir``: the shipped demo models, spatial
    and pooled."""
    import uvicorn

    from featinv.training.demo_preset import POOLED_DIR, PRETRAINED, SPATIAL_DIR

    if model_dir is None:
        model_dir, pooled_model_dir = PRETRAINED / SPATIAL_DIR, pooled_model_dir or PRETRAINED / POOLED_DIR
    # Folders, not loaded models: the server loads them on its own thread (see create_app).
    app = create_app(
        model_dir, pooled_model=pooled_model_dir, device=device, backend=backend, fast_options=fast_options
    )
    print(f"serving on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")

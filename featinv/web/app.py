"""The web app, the explorer in a browser: pick or upload an image, see its feature map (its
principal components as colours, and its norm) and its reconstructions (several seeds), with
previews while the sampler runs; steer toward a class, interpolate toward a second image, and paint
grid cells of the map to steer only there, ablate them or paste the second image's map into them,
with the difference to the unedited reconstruction; stale requests are cancelled on the server.
With a second model trained on pooled maps of the same classifier, a switch shows what the pooled
map (the paper's baseline) leaves of the picture, on the same image and slider settings.

FastAPI with one plain HTML page, not Gradio: the page needs request-level control (a newer slider
value cancels the request in flight, on the server and in the browser) and must stay fast on a CPU;
a small JSON API plus ``fetch`` with ``AbortController`` does exactly that, with three dependencies.
"""

from __future__ import annotations

import io
import itertools
import json
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from featinv.analysis.metrics import SPREAD_MAX, sample_spread
from featinv.analysis.regions import MapEdit
from featinv.choices import REGION_OPERATIONS
from featinv.errors import FeatInvError
from featinv.exploring import ExplorerCore
from featinv.images import from_pil, heatmap, load_image, png_data_url, resize_and_crop, to_pil
from featinv.models.class_names import display_class_names
from featinv.models.featinv_model import FeatInvModel
from featinv.serving import ReconstructionServer, RequestCancelled

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
PAGE = Path(__file__).with_name("index.html")


DIFFERENCE_HIGH = 0.25  # the difference map's pale yellow: a mean absolute change of a quarter of the range


class ReconstructQuery(BaseModel):
    """One slider state: image ``id``, steering ``strength`` toward class ``concept``, and ``mix``
    toward image ``other``, reconstructed from its ``mode`` feature map (``spatial`` or, with a pooled
    model, ``pooled``); painted grid ``cells`` ([row, column] of the map) and what to do there
    (``operation``: steer, zero, mean or paste); ``client`` identifies the page whose older request
    becomes stale."""

    id: str
    mode: str = "spatial"
    client: str = "default"
    strength: float = 0.0
    concept: int = 0
    other: str | None = None
    mix: float = 0.0
    refine: bool = False
    cells: list[list[int]] = []
    operation: str = "steer"


class Session:
    """Uploaded images' feature maps by id (one per model, by feature mode), the most recently used
    ``max_images`` of them (older ones are dropped: their id then answers 404), and each client's
    request in flight (dropped when it ends)."""

    def __init__(self, max_images: int = 256) -> None:
        self.max_images = max_images
        self.features: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.in_flight: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count(1)

    def add(self, features: dict[str, torch.Tensor]) -> str:
        """Keep an image's feature maps; returns its id. Call with ``lock`` held."""
        key = str(next(self.ids))
        self.features[key] = features
        while len(self.features) > self.max_images:
            self.features.popitem(last=False)
        return key

    def get(self, key: str | None, mode: str) -> torch.Tensor | None:
        """An image's ``mode`` feature map, marked as recently used; None when unknown or dropped.
        Call with ``lock`` held."""
        if key not in self.features:
            return None
        self.features.move_to_end(key)
        return self.features[key].get(mode)


def decode_upload(data: bytes, size: tuple[int, int], crop_pct: float = 1.0) -> torch.Tensor:
    """An uploaded file as (1, 3, H, W) in [0, 1] at ``size``, resized and centre-cropped as the
    classifier's eval transform does (``crop_pct``); FeatInvError for anything else."""
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
            return from_pil(resize_and_crop(image.convert("RGB"), size, crop_pct))[None]
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise FeatInvError(f"not an image this app can read ({type(error).__name__})") from error


def create_app(
    model: FeatInvModel | str | Path,
    *,
    pooled_model: FeatInvModel | str | Path | None = None,
    device: str = "auto",
    steps: int | None = None,
    seeds: int = 3,
    backend: str = "eager",
    fast_options: dict[str, Any] | None = None,
    examples: str | Path | None = None,
    max_images: int = 256,
    api_docs: bool = False,
    batching: bool = True,
    guidance: str | None = None,
    trust_code: bool = False,
):
    """The FastAPI app serving ``model`` (a model or its folder; ``backend`` and ``fast_options`` as
    ``Reconstructor``'s: ``fast`` on a GPU), and ``pooled_model`` beside it when given: a model of
    the same classifier and layer trained on pooled maps, which the page offers as a switch. Every
    tensor operation runs on the servers' one shared thread (``server.call``): the request
    handlers' threads only decode, encode and wait. ``examples``: a folder of images (searched
    recursively, e.g. ImageNet layout) for the page's example picker; without it, the shapes models
    get held-out shapes images and other models no picker. ``max_images``: how many uploaded or
    picked images' feature maps the server keeps (the most recently used; memory stays bounded).
    ``api_docs``: serve FastAPI's ``/docs`` and ``/openapi.json`` (off by default). ``batching``:
    reconstruct the requests of different clients queued together as one denoiser batch. ``steps``:
    per reconstruction (default: 10 DPM-Solver++ steps, or 4 steps of its own sampler for a distilled
    ``model``, the real-time mode; its pooled model, not distilled, keeps 10). ``guidance``: what
    classifier-free guidance guides on (``features`` or ``prompt``; default: each model's own).
    ``trust_code``: load model folders whose classifier is a user module (imports its code)."""
    options = dict(
        device=device,
        backend=backend,
        warmup_batch=seeds,
        fast_options=fast_options,
        batching=batching,
        guidance=guidance,
        trust_code=trust_code,
    )
    server = ReconstructionServer(model, steps=steps, **options)
    servers = {server.spec.mode: server}
    if pooled_model is not None:
        try:
            pooled_steps = None if server.realtime else steps
            pooled = ReconstructionServer(pooled_model, steps=pooled_steps, **options, share_thread_with=server)
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
    session = Session(max_images)
    extractor = server.reconstructor.extractor
    size = server.reconstructor.model.image_size
    crop_pct = server.spec.crop_pct
    head = extractor.linear_head()
    classes = head.out_features if isinstance(head, torch.nn.Linear) else 0
    recorded = server.reconstructor.model.class_names
    class_names = display_class_names(recorded, classes)
    example_files = _example_files(examples)
    shapes_examples = example_files is None and _is_shapes_model(recorded)
    example_count = len(example_files) if example_files is not None else (100 if shapes_examples else 0)

    def example_image(index: int) -> tuple[torch.Tensor, str]:
        """Example ``index`` (1, 3, H, W) and its label (on the serving thread)."""
        if example_files is not None:
            path = example_files[index]
            label = path.parent.name if path.parent != Path(examples) else path.stem
            return load_image(path, size, crop_pct)[None], label
        from featinv.data.shapes import CLASSES, EXAMPLES_SEED, generate_shapes

        sample = generate_shapes(index + 1, EXAMPLES_SEED, size=size[0])
        return sample.images[index : index + 1], CLASSES[int(sample.labels[index])]

    palette_images = None  # the examples fix each model's map colours
    if example_count:
        from featinv.exploring import PALETTE_EXAMPLES

        picked = range(min(example_count, PALETTE_EXAMPLES))
        palette_images = server.call(lambda: torch.cat([example_image(i)[0] for i in picked]))
    try:
        cores = {
            mode: ExplorerCore(s, seeds=seeds, examples=palette_images, encode=_preview_urls)
            for mode, s in servers.items()
        }
    except BaseException:
        server.close()
        raise
    steer_note = cores[server.spec.mode].steer_note
    docs = {} if api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="featinv", **docs)

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def remember(image: torch.Tensor) -> dict[str, Any]:
        def maps_and_pictures():
            features = {mode: s.reconstructor.features(image) for mode, s in servers.items()}
            rgb, norm = cores[server.spec.mode].map_pictures(features[server.spec.mode])
            return features, to_pil(image[0]), to_pil(rgb[0]), to_pil(heatmap(norm[:, 0])[0])

        # urgent: between two steps of the reconstruction running, not after the whole queue
        features, picture, components, norm = server.call(maps_and_pictures, urgent=True)
        with session.lock:
            key = session.add(features)
        return {
            "id": key,
            "thumbnail": png_data_url(picture),
            "map": png_data_url(components, scale=1),
            "norm": png_data_url(norm, scale=1),
        }

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "model": server.spec.describe(),
            "classes": classes,
            "class_names": class_names,
            "steerable": steer_note is None,
            "steer_note": steer_note,
            "examples": example_count,
            "seeds": seeds,
            "steps": server.steps,
            "sampling": server.describe_sampling(),
            "realtime": server.realtime,
            "modes": list(servers),
            "refine": server.can_refine,
            "grid": [server.spec.height, server.spec.width],
            "operations": list(REGION_OPERATIONS),
            "mean_map": cores[server.spec.mode].mean_map is not None,
        }

    @app.get("/api/stats")
    def stats() -> dict[str, Any]:
        """What the servers did: requests cancelled (by a newer one from the same page, or a page gone)."""
        return {"cancelled": sum(s.cancelled_requests for s in servers.values())}

    @app.post("/api/example/{index}")
    def example(index: int) -> Any:
        if example_count == 0:
            return error("this app has no examples (start it with --examples DIR): upload an image", 404)
        if not 0 <= index < example_count:
            return error(f"example index must be in [0, {example_count - 1}]")
        try:
            image, label = server.call(example_image, index, urgent=True)
        except FeatInvError as message:
            return error(str(message))
        return {**remember(image), "label": label}

    @app.post("/api/upload")
    def upload(file: Annotated[UploadFile, File()]) -> Any:
        # A plain def: FastAPI runs it on its thread pool, so waiting for the serving thread never
        # blocks the event loop (and with it every other route) while reconstructions are queued.
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        try:
            return remember(server.call(decode_upload, data, size, crop_pct, urgent=True))
        except FeatInvError as message:
            return error(str(message))

    def supersede(client: str) -> None:
        """Cancel the page's request in flight: a newer slider value makes it stale (first thing, so
        that the new request does not wait behind it)."""
        with session.lock:
            stale = session.in_flight.get(client)
        if stale is not None:
            stale.cancel()

    def prepare(query: ReconstructQuery) -> dict[str, Any] | JSONResponse:
        """The checked query's core, edit and edited map (or the error to answer)."""
        if query.mode not in servers:
            return error(f"mode must be one of {list(servers)}, got {query.mode!r}")
        with session.lock:
            features = session.get(query.id, query.mode)
            other = session.get(query.other, query.mode) if query.other else None
        if features is None or (query.other and other is None):
            return error(
                f"unknown image: upload or pick it (again; the server keeps the {session.max_images} most recent)", 404
            )
        if query.refine and not servers[query.mode].can_refine:
            return error("refine needs the model's classifier, and this model stores none")
        if steer_note is None and not 0 <= query.concept < classes:
            return error(f"concept must be a class in [0, {classes - 1}]")
        if not -5.0 <= query.strength <= 5.0 or not 0.0 <= query.mix <= 1.0:
            return error("strength must be in [-5, 5] and mix in [0, 1]")
        if any(len(cell) != 2 for cell in query.cells) or len(query.cells) > server.spec.height * server.spec.width:
            return error("cells must be [row, column] pairs of the feature map's grid")
        try:
            edit = MapEdit(query.strength, query.mix, tuple(map(tuple, query.cells)), query.operation)
        except FeatInvError as message:  # a bad operation
            return error(str(message))
        state = (query.mode, query.id, query.other)  # A and B: ExplorerCore.run's key for the unedited pictures
        return {"core": cores[query.mode], "edit": edit, "features": features, "other": other, "state": state}

    def run(
        query: ReconstructQuery, prepared: dict[str, Any], on_preview=None, mine: dict | None = None
    ) -> dict[str, Any] | JSONResponse:
        """The state's reconstruction (:meth:`ExplorerCore.run`) and the answer's pictures.
        ``mine["request"]``: the request, once submitted."""
        core = prepared["core"]

        def submitted(request) -> None:
            if mine is not None:
                mine["request"] = request
            with session.lock:
                session.in_flight[query.client] = request
            prepared["request"] = request

        try:
            result = core.run(
                prepared["features"],
                prepared["edit"],
                state=prepared["state"],
                other=prepared["other"],
                concept=query.concept,
                refine=query.refine,
                on_preview=on_preview,
                on_submitted=submitted,
            )
        except RequestCancelled:
            return error("superseded by a newer request", 409)
        except FeatInvError as message:
            return error(str(message))
        finally:
            with session.lock:
                if "request" in prepared and session.in_flight.get(query.client) is prepared["request"]:
                    del session.in_flight[query.client]

        def pictures() -> dict[str, Any]:
            images, unedited = result.images, result.unedited
            # what the seeds disagree on: the per-pixel spread over them (what the map leaves open)
            spread = to_pil(heatmap(sample_spread(images[:, None]), high=SPREAD_MAX)[0]) if len(images) > 1 else None
            change = result.difference()  # what a painted edit changed
            difference = to_pil(heatmap(change[None], high=DIFFERENCE_HIGH)[0]) if change is not None else None
            rgb, norm = core.map_pictures(result.edited)
            return {
                "images": [png_data_url(to_pil(image)) for image in images],
                "unedited": None if unedited is None else [png_data_url(to_pil(image)) for image in unedited],
                "spread": png_data_url(spread) if spread is not None else None,
                "difference": png_data_url(difference) if difference is not None else None,
                "map": png_data_url(to_pil(rgb[0]), scale=1),
                "norm": png_data_url(to_pil(heatmap(norm[:, 0])[0]), scale=1),
                "concept_probability": result.probability,
            }

        answer = server.call(pictures)
        return {**answer, "refined": query.refine, "seconds": result.seconds, "previews": result.previews}

    @app.post("/api/reconstruct")
    def reconstruct(query: ReconstructQuery) -> Any:
        supersede(query.client)
        prepared = prepare(query)
        return prepared if isinstance(prepared, JSONResponse) else run(query, prepared)

    @app.post("/api/reconstruct/stream")
    def reconstruct_stream(query: ReconstructQuery) -> Any:
        """The same answer as ``/api/reconstruct``, as server-sent events: ``preview`` events (the
        sampler's clean estimate: ``images``, ``step``, ``steps``) while it runs, then ``final``
        (or ``error`` with the answer's ``status``). A page that goes away cancels the request."""
        supersede(query.client)
        prepared = prepare(query)
        if isinstance(prepared, JSONResponse):
            return prepared
        events: queue.Queue = queue.Queue()

        def on_preview(step: int, preview: torch.Tensor) -> None:
            # on the serving thread: the pictures to bytes; PNG encoding on the response's thread
            events.put(("preview", step, [to_pil(image) for image in preview]))

        mine: dict[str, Any] = {}

        def work() -> None:
            try:
                answer = run(query, prepared, on_preview, mine)
            except Exception as failure:  # the stream must end, whatever happened
                events.put(("error", {"error": f"the server failed: {failure}", "status": 500}))
                raise
            if isinstance(answer, JSONResponse):
                events.put(("error", json.loads(answer.body) | {"status": answer.status_code}))
            else:
                events.put(("final", answer))

        worker = threading.Thread(target=work, daemon=True)
        worker.start()

        def stream():
            try:
                while True:
                    item = events.get()
                    if item[0] == "preview":
                        _, step, preview = item
                        body = {
                            "images": [png_data_url(picture) for picture in preview],
                            "step": step + 1,
                            "steps": server.steps,
                        }
                        yield f"event: preview\ndata: {json.dumps(body)}\n\n"
                        continue
                    yield f"event: {item[0]}\ndata: {json.dumps(item[1])}\n\n"
                    return
            finally:  # the page went away before the answer: its request need not run on
                request = mine.get("request")
                if request is not None and not request.done():
                    request.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.post("/api/map")
    def edited_map(query: ReconstructQuery) -> Any:
        """The edited feature map (1, C, h, w) as a safetensors file (key ``features``, what
        ``featinv reconstruct --features`` reads)."""
        prepared = prepare(query)
        if isinstance(prepared, JSONResponse):
            return prepared
        from safetensors.torch import save

        core = prepared["core"]

        def edited_file() -> bytes:
            edited, _ = core.edited_map(
                prepared["features"], prepared["edit"], other=prepared["other"], concept=query.concept
            )
            return save({"features": edited.detach().float().cpu().contiguous()})

        try:
            data = server.call(edited_file)
        except FeatInvError as message:
            return error(str(message))
        headers = {"Content-Disposition": 'attachment; filename="feature-map.safetensors"'}
        return Response(data, media_type="application/octet-stream", headers=headers)

    app.state.server = server
    app.state.servers = servers
    app.state.session = session
    return app


def _preview_urls(preview: torch.Tensor) -> list[str]:
    """A preview's pictures (seeds, 3, H, W) as the page gets them: PNG data URLs."""
    return [png_data_url(to_pil(image)) for image in preview.clamp(0, 1)]


def _is_shapes_model(recorded: list[str] | None) -> bool:
    """Whether the model's classifier names the shapes' classes (then held-out shapes images are
    its examples)."""
    from featinv.data.shapes import CLASSES

    return recorded == list(CLASSES)


def _example_files(folder: str | Path | None) -> list[Path] | None:
    """The image files of ``--examples DIR`` (recursively, sorted), or None without it."""
    if folder is None:
        return None
    from featinv.data.image_folder import EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise FeatInvError(f"--examples folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise FeatInvError(f"--examples {root} holds no images ({', '.join(sorted(EXTENSIONS))})")
    return files[:1000]


def serve(
    model_dir: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    backend: str = "eager",
    fast_options: dict[str, Any] | None = None,
    pooled_model_dir: str | Path | None = None,
    examples: str | Path | None = None,
    api_docs: bool = False,
    max_images: int = 256,
    batching: bool = True,
    realtime: bool = False,
    steps: int | None = None,
    guidance: str | None = None,
    trust_code: bool = False,
) -> None:
    """Run the app with uvicorn (blocking). Without ``model_dir``: the shipped demo models, spatial
    (with ``realtime``: its distilled, few-step version) and pooled."""
    import uvicorn

    from featinv.paths import POOLED_DIR, PRETRAINED, REALTIME_DIR, SPATIAL_DIR

    if model_dir is None:
        spatial = PRETRAINED / (REALTIME_DIR if realtime else SPATIAL_DIR)
        model_dir, pooled_model_dir = spatial, pooled_model_dir or PRETRAINED / POOLED_DIR
    # Folders, not loaded models: the server loads them on its own thread (see create_app).
    app = create_app(
        model_dir,
        pooled_model=pooled_model_dir,
        device=device,
        backend=backend,
        fast_options=fast_options,
        examples=examples,
        api_docs=api_docs,
        max_images=max_images,
        batching=batching,
        steps=steps,
        guidance=guidance,
        trust_code=trust_code,
    )
    print(f"serving on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")

"""The fast path: the same sampler, steps and guidance as the eager reference, done faster on a GPU.

Per reconstruction, outside the loop: the hint encoder runs once (the null-condition hint once per
model; its upsample and first convolution fused, ``kernels.upsample_conv``), the contexts are
stacked once. Per step, one CUDA graph (captured once per (batch, steps, sampler, guidance) and
replayed, from C++ when ``featinv._graph_loop`` builds):

1. both guidance branches as one batch of 2B (fp16/bf16), the timestep read from a device table at a
   device step index;
2. the ControlNet on a side stream, concurrent with the UNet's encoder (which does not depend on
   it; ``split_unet``), then the UNet's decoder with the residuals added;
3. guidance and the DDIM / DPM-Solver++(2M) update fused in one Triton kernel, in place on the fp32
   latents, coefficients read from the device table (``kernels.guided_update``); step index + 1.

The pieces (ControlNet, UNet encoder, UNet decoder; ``featinv.engine.pieces``) run with
channels-last copies of the convolution weights (Inductor would convert the model's weights on
every call), attention that projects self-attention's q/k/v in one matmul and the two fixed
contexts' keys and values once (``featinv.engine.fast_attention``), and the resnets' timestep
projections read from tables over all timesteps (``featinv.engine.time_tables``). They go through
``torch.compile`` (Inductor, no CUDA graphs of its own: the whole step is captured here). Nothing
approximates: outputs equal the eager reference up to fp16 rounding and kernel choice.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections import OrderedDict
from typing import Any

import torch

from featinv.engine.fast_attention import fast_processors
from featinv.engine.graph_loop import replay_loop
from featinv.engine.pieces import Piece, channels_last_weights
from featinv.engine.split_unet import check_splittable, unet_decode, unet_encode
from featinv.engine.time_tables import Clock, time_projection_tables, unused_time_embeddings
from featinv.engine.twin_encoder import ENCODER, TwinEncoder
from featinv.errors import FeatInvError, require_positive_int
from featinv.kernels.guided_update import guided_update_
from featinv.kernels.upsample_conv import upsample_conv3x3
from featinv.models.featinv_model import FeatInvModel
from featinv.sampling.schedule import SamplerSchedule

COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")


class FastPath:
    """The fast path for one model: compiled pieces, the cached null hint, one :class:`StepGraph`
    per (batch, steps, sampler, guidance) shape.

    Args:
        model: the FeatInv model on its device and in its inference dtype.
        compile_mode: ``torch.compile`` mode of the pieces (``None``: eager pieces).
        streams: run the ControlNet concurrently with the UNet encoder (CUDA only).
        graphs: capture each step in a CUDA graph (CUDA only).
        max_graphs: steps kept (least recently used dropped first): each holds a graph's memory pool
            and static buffers, and a server sees many batch sizes.
        channels_last: run the pieces with channels-last copies of the convolution weights (memory:
            one more copy of them, 1.6 GB in fp16 at miniSD scale).
        precomputed: use what is a constant of the model, computed here once: merged q/k/v
            projections, the contexts' keys and values, the timestep projections of every resnet.
        twin_encoder: run the ControlNet and the UNet's encoder as one network of two weight sets
            (``featinv.engine.twin_encoder``: half their kernels; for small batches; no second stream).

    The weights and contexts are a snapshot taken here: build a new FastPath after changing them.
    """

    def __init__(
        self,
        model: FeatInvModel,
        *,
        compile_mode: str | None = "default",
        streams: bool = True,
        graphs: bool = True,
        max_graphs: int = 8,
        channels_last: bool = True,
        precomputed: bool = True,
        twin_encoder: bool = False,
    ) -> None:
        if compile_mode not in COMPILE_MODES:
            raise FeatInvError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
        require_positive_int("max_graphs", max_graphs)
        check_splittable(model.unet)
        self.model = model
        self.device = model.context.device
        cuda = self.device.type == "cuda"
        self.streams, self.graphs = streams and cuda and not twin_encoder, graphs and cuda
        unet_weights = channels_last_weights(model.unet) if channels_last else {}
        if twin_encoder:  # the twin holds its own copies of the encoders' weights
            unet_weights = {name: w for name, w in unet_weights.items() if not name.startswith(ENCODER)}
        # The ControlNet's hint encoder runs once per sample, outside the step: its weights stay as they are.
        cn = model.controlnet.controlnet
        controlnet_weights = channels_last_weights(cn, "controlnet.") if channels_last and not twin_encoder else {}
        constants = {}
        if precomputed:
            contexts = model.guidance_contexts(1).to(self.device, model.unet.dtype)  # (2, L, D): null, stored
            clock, steps = Clock(), model.noise_schedule.num_train_timesteps
            tables = time_projection_tables(model.unet, steps, clock) | time_projection_tables(cn, steps, clock)
            constants = {
                "processors": fast_processors(model.unet, contexts) | fast_processors(model.controlnet, contexts),
                "time_tables": tables,
                "clock": clock,
                "time_embeddings": unused_time_embeddings(model.unet, tables) | unused_time_embeddings(cn, tables),
            }
        if twin_encoder:
            encoders = [TwinEncoder(model.unet, cn, channels_last=channels_last, **constants)]
        else:
            encoders = [
                Piece(_controlnet, model.controlnet, weights=controlnet_weights, **constants),
                Piece(unet_encode, model.unet, weights=unet_weights, **constants),
            ]
        pieces = [*encoders, Piece(_decode, model.unet, weights=unet_weights, **constants)]
        if compile_mode is not None:
            pieces = [torch.compile(piece, mode=compile_mode, dynamic=False) for piece in pieces]
        # twin: encode_both(x, t, context, hint) -> (emb, skips, mid, down, mid_residual); else the
        # ControlNet and the UNet encoder as two pieces (concurrent on two streams).
        self.encode_both = pieces[0] if twin_encoder else None
        self.controlnet, self.encode = (None, None) if twin_encoder else pieces[:2]
        self.decode = pieces[-1]
        self._null_hint: torch.Tensor | None = None
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, StepGraph] = OrderedDict()

    def with_options(self, *, streams: bool | None = None, graphs: bool | None = None) -> FastPath:
        """A twin sharing the compiled pieces and the null hint, with other stream/graph options
        (benchmarks compare them without compiling twice)."""
        twin = copy.copy(self)
        cuda = self.device.type == "cuda"
        twin.streams = self.streams if streams is None else streams and cuda and self.encode_both is None
        twin.graphs = self.graphs if graphs is None else graphs and cuda
        twin._graphs = OrderedDict()
        return twin

    @torch.no_grad()
    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The hint encoder (``FeatInvControlNet.embed``) with its upsample and first convolution
        fused and run at the feature map's resolution (``featinv.kernels.upsample_conv``):
        (B, C, h, w) -> (B, C0, H, W) in the model's dtype."""
        encoder = self.model.controlnet.hint_encoder
        features = features.to(self.device, self.model.unet.dtype)
        first = upsample_conv3x3(features, encoder.conv_in.weight, encoder.conv_in.bias, encoder.latent_size)
        return encoder.head(first)

    @torch.no_grad()
    def null_hint(self) -> torch.Tensor:
        """(1, C0, H, W): the hint of the zero feature map, a constant of the model (computed once)."""
        if self._null_hint is None:
            self._null_hint = self.embed(torch.zeros(1, *self.model.feature_spec.shape))
        return self._null_hint

    @torch.no_grad()
    def hint_pair(self, features: torch.Tensor, guidance: str = "features") -> torch.Tensor:
        """(2B, C0, H, W): the unconditional hints B times (the cached null hint, or with
        ``guidance="prompt"`` the maps' own), then the hints of ``features`` (B, C, h, w)."""
        if guidance != "features":
            return self.model.guidance_hints(features, guidance, embed=self.embed)
        return torch.cat([self.null_hint().expand(len(features), -1, -1, -1), self.embed(features)])

    def eps_pair(
        self,
        pair: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        hint: torch.Tensor,
        side: torch.cuda.Stream | None = None,
    ) -> torch.Tensor:
        """The pieces on one guided batch: ``pair`` (2B, C, H, W), ``t`` (1,) or (2B,), ``context``
        (2B, L, D), ``hint`` (2B, C0, H, W) -> eps (2B, C, H, W). With ``side``, the ControlNet runs
        on that stream, concurrent with the UNet's encoder (not with the twin encoder: one piece)."""
        if self.encode_both is not None:
            emb, skips, mid, down, mid_residual = self.encode_both(pair, t, context, hint)
        elif side is None:
            down, mid_residual = self.controlnet(pair, t, context, hint)
            emb, skips, mid = self.encode(pair, t, context)
        else:
            main = torch.cuda.current_stream(pair.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                down, mid_residual = self.controlnet(pair, t, context, hint)
            emb, skips, mid = self.encode(pair, t, context)
            main.wait_stream(side)
        return self.decode(emb, t, skips, mid, context, down, mid_residual)

    def step_graph(self, batch: int, schedule: SamplerSchedule, guidance_scale: float) -> StepGraph:
        """The (cached) step for this shape; captured on first use, the least recently used one
        dropped beyond ``max_graphs``."""
        key = (batch, schedule.name, schedule.timesteps, schedule.coefficients, float(guidance_scale))
        if key in self._graphs:
            self._graphs.move_to_end(key)
        else:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            self._graphs[key] = StepGraph(self, batch, schedule, guidance_scale)
        return self._graphs[key]

    @torch.no_grad()
    def sample(
        self,
        features: torch.Tensor,
        x: torch.Tensor,
        schedule: SamplerSchedule,
        guidance_scale: float,
        callback=None,
        guidance: str = "features",
    ) -> torch.Tensor:
        """Run the sampler from noise ``x`` (B, C, H, W) conditioned on ``features`` (B, C', h, w);
        returns the final sample (B, C, H, W) float32. ``callback`` as the samplers' (it makes the
        loop run in Python); ``guidance`` as ``Reconstructor.reconstruct``'s."""
        if guidance_scale <= 1.0:
            raise FeatInvError(f"the fast path runs classifier-free guidance (scale > 1), got {guidance_scale}")
        if schedule.name == "ddim" and any(row[4] != 0.0 for row in schedule.coefficients):
            raise FeatInvError("the fast path runs deterministic DDIM (eta = 0)")
        step = self.step_graph(len(x), schedule, guidance_scale)
        return step.run(self.hint_pair(features, guidance), x, callback)


def _controlnet(controlnet, *args):
    """The ControlNet's residuals (``FeatInvControlNet.forward``) as a piece's function."""
    return controlnet(*args)


def _decode(unet, emb, timestep, *args):
    """``unet_decode`` as a piece's function: the timestep second, as in the other pieces (the
    time tables read it; ``emb`` is what the model's own time projections read)."""
    return unet_decode(unet, emb, *args)


class StepGraph:
    """One denoising step with guidance and update, on static buffers, for one shape.

    Buffers: ``x`` (B, C, H, W) fp32 latents updated in place; ``x0``/``x0_prev`` the data
    predictions; ``hint`` (2B, C0, H, W) and ``context`` (2B, L, D) inputs; ``step`` (1,) int64.
    """

    def __init__(self, path: FastPath, batch: int, schedule: SamplerSchedule, guidance_scale: float) -> None:
        model, device = path.model, path.device
        self.path, self.steps, self.guidance = path, len(schedule), float(guidance_scale)
        self.sampler, self.timestep_list = schedule.name, schedule.timesteps
        dtype = model.unet.dtype
        self.x = torch.zeros(batch, *model.latent_shape, device=device)
        self.x0 = torch.zeros_like(self.x)
        self.x0_prev = torch.zeros_like(self.x)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.timesteps = torch.tensor(schedule.timesteps, dtype=torch.long, device=device)
        self.table = torch.tensor(schedule.coefficients, dtype=torch.float64, device=device)
        self.context = model.guidance_contexts(batch).to(dtype)
        self.hint = torch.zeros(2 * batch, *path.null_hint().shape[1:], device=device, dtype=dtype)
        self.side = torch.cuda.Stream(device) if path.streams else None
        self.graph = None
        if path.graphs:
            self._capture()

    def _eps_pair(self) -> torch.Tensor:
        """(2B, C, H, W) noise predictions of both branches at the current step."""
        pair = torch.cat([self.x, self.x]).to(self.hint.dtype)
        t = self.timesteps.index_select(0, self.step)
        return self.path.eps_pair(pair, t, self.context, self.hint, side=self.side)

    def _step(self) -> None:
        """One step on the buffers (what the graph replays)."""
        eps_pair = self._eps_pair()
        prev = self.x0_prev if self.sampler == "dpmpp_2m" else None
        guided_update_(
            eps_pair, self.x, prev, self.table, self.step, self.guidance, self.sampler, self.x0, validate=False
        )
        if prev is not None:
            self.x0_prev.copy_(self.x0)
        self.step.add_(1)

    def _capture(self) -> None:
        """Warm up (compilation, autotuning, cuDNN's algorithm search) on a side stream, then capture."""
        with cudnn_benchmark():  # the captured convolutions keep the algorithms found here
            self._warm_up_and_capture()

    def _warm_up_and_capture(self) -> None:
        warm = torch.cuda.Stream(self.x.device)
        warm.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(warm):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.x.device).wait_stream(warm)
        self._reset(self.hint, self.x)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def _reset(self, hint: torch.Tensor, x: torch.Tensor) -> None:
        self.hint.copy_(hint)
        self.x.copy_(x)
        self.x0.zero_()
        self.x0_prev.zero_()
        self.step.zero_()

    def run(self, hint: torch.Tensor, x: torch.Tensor, callback=None) -> torch.Tensor:
        """All steps from noise ``x`` (B, C, H, W) with ``hint`` (2B, C0, H, W); returns a copy of x."""
        if tuple(x.shape) != tuple(self.x.shape) or tuple(hint.shape) != tuple(self.hint.shape):
            raise FeatInvError(f"this step graph is for x {tuple(self.x.shape)}, got {tuple(x.shape)}")
        self._reset(hint, x.to(self.x.device, torch.float32))
        if self.graph is not None and callback is None and replay_loop(self.graph, self.step, self.steps):
            return self.x.clone()
        for i in range(self.steps):
            self.graph.replay() if self.graph is not None else self._step()
            if callback is not None:
                callback({"i": i, "t": self.timestep_list[i], "x": self.x, "denoised": self.x0})
        return self.x.clone()


@contextlib.contextmanager
def cudnn_benchmark():
    """cuDNN's algorithm search on (``torch.backends.cudnn.benchmark``), the caller's setting restored
    after. Each convolution shape is timed once, at warm-up; the graph replays the fastest algorithm
    (the heuristic choice can be slower; the benchmark measures with the search on for every row)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def check_fast_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` (keyword arguments of :class:`FastPath`, e.g. ``{"twin_encoder": True}``), or one
    error naming the unknown ones and the options there are."""
    options = dict(options or {})
    known = [name for name, p in inspect.signature(FastPath).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise FeatInvError(f"fast_options: unknown option(s) {', '.join(unknown)}; FastPath takes {', '.join(known)}")
    return options


def require_cuda(device: torch.device) -> None:
    """One clear error for the fast backend without a GPU."""
    if device.type != "cuda":
        raise FeatInvError(
            "the fast backend needs a CUDA GPU (CUDA graphs, streams, Triton); use --backend eager or compiled here"
        )

"""The timestep's projections as tables, for the fast path.

Every resnet of the UNet and the ControlNet adds ``time_emb_proj(act(emb(t)))`` to its features,
where ``emb(t)`` is the model's sinusoid + MLP of the timestep: a function of the integer timestep
alone. The fast path computes it once for all ``num_train_timesteps`` values, one (T, C) table per
resnet (at miniSD scale 32 tables, 60 MB in fp16), and during a step each resnet reads row ``t``:
32 small matmuls per step (of 2B identical rows) become gathers that Inductor folds into the adds
that consume them, and the two time MLPs, left without a reader, are not run
(``UnusedTimeEmbedding``: the pieces pass a zero placeholder for the embedding instead). Same
numbers: each row is the same projection of the same embedding.
"""

from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D


class Clock:
    """The timestep of the running piece, (1,) or (B,) int64 (set by the piece before it runs)."""

    timestep: torch.Tensor | None = None


class TimeProjectionTable(torch.nn.Module):
    """Stands in for a resnet's ``time_emb_proj`` during a fast-path call: rows of its table.

    Args:
        table: (T, C) the projection at every timestep (a buffer: reachable by name).
        clock: where the running piece put its timestep.
    """

    def __init__(self, table: torch.Tensor, clock: Clock) -> None:
        super().__init__()
        self.register_buffer("table", table, persistent=False)
        self.clock = clock

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        """(1 or B, C): the rows at the clock's timesteps (``temb``, the embedding, is not needed)."""
        return self.table.index_select(0, self.clock.timestep.reshape(-1))


def time_projection_tables(module: torch.nn.Module, num_timesteps: int, clock: Clock) -> dict:
    """resnet -> its :class:`TimeProjectionTable`, for every ``ResnetBlock2D`` with a time projection
    in ``module`` (a diffusers UNet or ControlNet). Empty where the embedding is more than a function
    of the timestep (class or addition embeddings, an activation after the time MLP)."""
    extra = ("class_embedding", "add_embedding", "time_embed_act")
    if not hasattr(module, "time_embedding") or any(getattr(module, name, None) is not None for name in extra):
        return {}
    parameter = next(module.parameters())
    timesteps = torch.arange(num_timesteps, device=parameter.device)
    tables = {}
    with torch.no_grad():
        emb = module.time_embedding(module.time_proj(timesteps).to(parameter.dtype), None)  # (T, E)
        for resnet in module.modules():
            if isinstance(resnet, ResnetBlock2D) and resnet.time_emb_proj is not None:
                temb = emb if resnet.skip_time_act else resnet.nonlinearity(emb)
                tables[resnet] = TimeProjectionTable(resnet.time_emb_proj(temb), clock)
    return tables


class UnusedTimeEmbedding(torch.nn.Module):
    """Stands in for a model's ``time_embedding`` when every resnet reads a table: the embedding has
    no reader left, so the time MLP (and the sinusoid before it) need not run. Gives zeros of its
    shape, (B, E), for the signatures that pass it on (the decoder's resnets ignore it)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, sample: torch.Tensor, condition=None) -> torch.Tensor:
        return sample.new_zeros(sample.shape[0], self.out_features)


def unused_time_embeddings(module: torch.nn.Module, tables: dict) -> dict:
    """{module: UnusedTimeEmbedding} when ``tables`` covers every resnet of ``module`` that has a
    time projection (the embedding's only readers, where ``time_projection_tables`` makes tables at
    all); empty otherwise."""
    resnets = [m for m in module.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]
    if not resnets or any(resnet not in tables for resnet in resnets):
        return {}
    return {module: UnusedTimeEmbedding(module.time_embedding.linear_2.out_features)}

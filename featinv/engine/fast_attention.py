"""Attention for the fast path: the same math as diffusers' ``AttnProcessor2_0``, less repeated work.

* Self-attention: the query, key and value projections as one matmul with the three weights
  stacked (one GEMM launch instead of three; each output element is the same dot product).
* Cross-attention: the contexts are constants of the model (the null context for the
  unconditional branch, the stored one for the conditional branch), so their keys and values are
  too. They are projected once, when the fast path is built, as a (2, L, C) table. The batch is in
  the order of ``FeatInvModel.guidance_contexts`` (B null rows, then B stored rows), and a query
  attends to its own branch's keys only, so each branch's B images run as one sequence of B*N
  queries against its table row: nothing is expanded per call. The ``encoder_hidden_states``
  passed in are only checked for shape: the caller (the fast path's step) passes
  ``guidance_contexts``.

Used only inside the fast path's pieces (``featinv.engine.pieces``), never left installed on the model.
A processor's tensors are buffers of its ``tensors`` module, so that a piece can substitute them by
name (the twin encoder runs one processor with the UNet's and the ControlNet's tensors stacked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from featinv.errors import FeatInvError


class ProcessorTensors(torch.nn.Module):
    """A processor's precomputed tensors, as (non-persistent) buffers: reachable by name."""

    def __init__(self, **tensors: torch.Tensor | None) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)


def supports(attn: Attention) -> bool:
    """Whether ``attn`` is the plain attention these processors reproduce (SD1.x's): the default
    processor, no spatial or group norm, no context norm, no q/k norms, no residual or rescale, the
    default scale, not cross-attention-only (projection biases are kept, as the model has them)."""
    return (
        isinstance(attn.processor, AttnProcessor2_0)
        and attn.spatial_norm is None
        and attn.group_norm is None
        and not attn.norm_cross
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
        and attn.scale_qk
        and not attn.only_cross_attention
    )


class MergedSelfAttention:
    """Self-attention with the q/k/v projections as one matmul. Weights (3C, D) stacked at build time."""

    def __init__(self, attn: Attention) -> None:
        projections = (attn.to_q, attn.to_k, attn.to_v)
        weight = torch.cat([p.weight.detach() for p in projections])
        biases = [p.weight.new_zeros(p.out_features) if p.bias is None else p.bias.detach() for p in projections]
        bias = None if all(p.bias is None for p in projections) else torch.cat(biases)
        self.tensors = ProcessorTensors(weight=weight, bias=bias)

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **_
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise FeatInvError("the fast path's self-attention takes (B, N, C) tokens, no context and no mask")
        query, key, value = F.linear(hidden_states, self.tensors.weight, self.tensors.bias).chunk(3, dim=-1)
        return _attend(attn, query, key, value)


class CachedContextAttention:
    """Cross-attention to the two fixed contexts with their keys and values projected once.

    Args:
        attn: the cross-attention module.
        contexts: (2, L, D): the null context, then the stored one.
    """

    def __init__(self, attn: Attention, contexts: torch.Tensor) -> None:
        with torch.no_grad():
            self.tensors = ProcessorTensors(key=attn.to_k(contexts), value=attn.to_v(contexts))  # (2, L, C) each
        self.context_shape = tuple(contexts.shape[1:])

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **_
    ) -> torch.Tensor:
        rows = hidden_states.shape[0]
        if (
            encoder_hidden_states is None
            or attention_mask is not None
            or hidden_states.ndim != 3
            or rows % 2
            or tuple(encoder_hidden_states.shape) != (rows, *self.context_shape)
        ):
            raise FeatInvError(
                f"the fast path's cross-attention expects the guidance contexts, shape (2B, {self.context_shape}), "
                f"and no mask; got {None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)}"
            )
        # Each query row attends to its branch's keys alone, so a branch's B images can be one long
        # sequence of B*N queries: batch 2 (the branches) against the (2, L, C) table, nothing expanded.
        query = attn.to_q(hidden_states).reshape(2, -1, attn.to_q.out_features)
        return _attend(attn, query, self.tensors.key, self.tensors.value).reshape(rows, hidden_states.shape[1], -1)


def _attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Heads, scaled dot-product attention, output projection: (B, N, C) queries -> (B, N, C_out)."""
    batch, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    query, key, value = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](out))


def fast_processors(module: torch.nn.Module, contexts: torch.Tensor) -> dict[Attention, object]:
    """A processor for each supported attention module in ``module``: merged projections for
    self-attention, cached keys and values of ``contexts`` (2, L, D) for cross-attention.
    Unsupported modules keep their own processor (absent from the result)."""
    found = {}
    for attn in module.modules():
        if isinstance(attn, Attention) and supports(attn):
            found[attn] = (
                CachedContextAttention(attn, contexts) if attn.is_cross_attention else MergedSelfAttention(attn)
            )
    return found

"""The fast path's pieces (featinv.engine.pieces) and attention (featinv.engine.fast_attention):
channels-last weight copies and attention with merged projections and cached context keys/values
compute what the model computes, and leave the model as it was."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from featinv.engine.fast import _controlnet
from featinv.engine.fast_attention import CachedContextAttention, MergedSelfAttention, fast_processors, supports
from featinv.engine.pieces import Piece, channels_last_weights
from featinv.engine.split_unet import unet_decode, unet_encode
from featinv.errors import FeatInvError


def _step_inputs(model, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * batch, *model.latent_shape, generator=g)
    hint = model.controlnet.embed(torch.rand(2 * batch, *model.feature_spec.shape, generator=g))
    return x, torch.tensor([500]), model.guidance_contexts(batch), hint


def _pieces(model, **kwargs):
    contexts = torch.cat([model.null_context, model.context])
    processors = fast_processors(model.unet, contexts) | fast_processors(model.controlnet, contexts)
    unet_weights = channels_last_weights(model.unet)
    return (
        Piece(
            _controlnet,
            model.controlnet,
            weights=channels_last_weights(model.controlnet.controlnet, "controlnet."),
            processors=processors,
        ),
        Piece(unet_encode, model.unet, weights=unet_weights, processors=processors),
        Piece(unet_decode, model.unet, weights=unet_weights, processors=processors),
    )


def _flat(outputs):
    flat = []
    for item in outputs:
        flat.extend(_flat(item) if isinstance(item, (tuple, list)) else [item])
    return flat


def _close(got, want, rel: float = 1e-5) -> None:
    for g, w in zip(_flat(got), _flat(want), strict=True):
        assert g.shape == w.shape
        assert float((g - w).abs().max()) <= rel * max(1.0, float(w.abs().max()))


@pytest.mark.parametrize("batch", [1, 3])
def test_pieces_compute_what_the_model_computes_and_leave_it_as_it_was(batch, tiny_model):
    x, t, context, hint = _step_inputs(tiny_model, batch)
    weights_before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    controlnet, encode, decode = _pieces(tiny_model)
    with torch.no_grad():
        want_residuals = tiny_model.controlnet(x, t, context, hint)
        want_encoded = unet_encode(tiny_model.unet, x, t, context)
        want = unet_decode(tiny_model.unet, *want_encoded, context, *want_residuals)
        residuals = controlnet(x, t, context, hint)
        encoded = encode(x, t, context)
        got = decode(*encoded, context, *residuals)
    assert float(want.abs().max()) > 0.01
    _close(residuals, want_residuals)
    _close(encoded, want_encoded)
    _close(got, want)
    attentions = [m for m in [*tiny_model.unet.modules(), *tiny_model.controlnet.modules()] if isinstance(m, Attention)]
    assert attentions and all(type(a.processor) is AttnProcessor2_0 for a in attentions)
    state = tiny_model.state_dict()
    assert all(torch.equal(state[k], v) and state[k].is_contiguous() for k, v in weights_before.items())


def test_the_pieces_really_use_their_own_weights_and_processors(tiny_model):
    """A test that could fail: scaled copies change the output; a processor that is swapped in runs."""
    x, t, context, _ = _step_inputs(tiny_model, 1)
    weights = {k: 2.0 * v for k, v in channels_last_weights(tiny_model.unet).items()}
    calls = []

    class Counting(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    processors = {m: Counting() for m in tiny_model.unet.modules() if isinstance(m, Attention)}
    with torch.no_grad():
        want = unet_encode(tiny_model.unet, x, t, context)[2]
        got = Piece(unet_encode, tiny_model.unet, weights=weights, processors=processors)(x, t, context)[2]
    assert not torch.allclose(got, want)
    encoder = [*tiny_model.unet.down_blocks, tiny_model.unet.mid_block]
    assert len(calls) == sum(isinstance(m, Attention) for block in encoder for m in block.modules()) > 0


def test_cached_context_attention_projects_the_contexts_once(tiny_model):
    contexts = torch.cat([tiny_model.null_context, tiny_model.context])
    attn = next(m for m in tiny_model.unet.modules() if isinstance(m, Attention) and m.is_cross_attention)
    cached = CachedContextAttention(attn, contexts)
    assert cached.key.shape == (2, contexts.shape[1], attn.to_k.out_features)
    tokens = torch.randn(4, 6, attn.query_dim)
    guidance = tiny_model.guidance_contexts(2)
    with torch.no_grad():
        want = AttnProcessor2_0()(attn, tokens, guidance)
        got = cached(attn, tokens, guidance)
        _close(got, want)
        # the other order of the branches is other attention: the table is not a lucky constant
        swapped = AttnProcessor2_0()(attn, tokens, torch.cat([guidance[2:], guidance[:2]]))
        assert not torch.allclose(got, swapped)
    with pytest.raises(FeatInvError, match="guidance contexts"):
        cached(attn, tokens, guidance[:, :3])
    with pytest.raises(FeatInvError, match="guidance contexts"):
        cached(attn, tokens[:3], guidance[:3])


def test_merged_self_attention_equals_three_projections(tiny_model):
    attn = next(m for m in tiny_model.unet.modules() if isinstance(m, Attention) and not m.is_cross_attention)
    merged = MergedSelfAttention(attn)
    assert merged.weight.shape == (3 * attn.to_q.out_features, attn.query_dim)
    tokens = torch.randn(3, 5, attn.query_dim)
    with torch.no_grad():
        _close(merged(attn, tokens), AttnProcessor2_0()(attn, tokens))
    with pytest.raises(FeatInvError, match="no context"):
        merged(attn, tokens, encoder_hidden_states=tokens)
    torch.manual_seed(0)
    biased = Attention(query_dim=8, heads=2, dim_head=4, bias=True)
    torch.nn.init.normal_(biased.to_k.bias)  # not zero, so a dropped bias would show
    tokens = torch.randn(2, 5, 8)
    with torch.no_grad():
        _close(MergedSelfAttention(biased)(biased, tokens), AttnProcessor2_0()(biased, tokens))


def test_attention_the_processors_do_not_reproduce_keeps_its_own():
    plain = Attention(query_dim=8, heads=2, dim_head=4)
    residual = Attention(query_dim=8, heads=2, dim_head=4, residual_connection=True)
    normed = Attention(query_dim=8, heads=2, dim_head=4, norm_num_groups=2)
    assert supports(plain) and not supports(residual) and not supports(normed)
    holder = torch.nn.ModuleList([plain, residual, normed])
    assert list(fast_processors(holder, torch.zeros(2, 3, 8))) == [plain]


def test_a_compiled_piece_equals_the_eager_one_and_follows_its_inputs(tiny_model):
    x, t, context, _ = _step_inputs(tiny_model, 1)
    _, encode, _ = _pieces(tiny_model)
    compiled = torch.compile(encode, dynamic=False)
    with torch.no_grad():
        for seed in (1, 2):  # a second input: nothing of the first call is baked in
            x = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            _close(compiled(x, t, context), unet_encode(tiny_model.unet, x, t, context))
    assert all(type(m.processor) is AttnProcessor2_0 for m in tiny_model.unet.modules() if isinstance(m, Attention))

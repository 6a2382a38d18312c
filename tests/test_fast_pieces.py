"""The fast path's pieces (featinv.engine.pieces), attention (featinv.engine.fast_attention) and
timestep tables (featinv.engine.time_tables): channels-last weight copies, merged projections,
cached context keys/values and tabled time projections compute what the model computes, and leave
the model as it was."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D

from featinv.engine.fast import FastPath
from featinv.engine.fast_attention import CachedContextAttention, MergedSelfAttention, fast_processors, supports
from featinv.engine.pieces import Piece, channels_last_weights
from featinv.engine.split_unet import unet_decode, unet_encode
from featinv.engine.time_tables import Clock, time_projection_tables
from featinv.errors import FeatInvError


def _step_inputs(model, batch: int, seed: int = 0):
    """(x, t, contexts, hint) for a guided step of ``batch`` images; t (1,) for one image, one
    timestep per row otherwise (the pieces take both)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * batch, *model.latent_shape, generator=g)
    hint = model.controlnet.embed(torch.rand(2 * batch, *model.feature_spec.shape, generator=g))
    t = torch.tensor([500]) if batch == 1 else torch.randint(0, 1000, (2 * batch,), generator=g)
    return x, t, model.guidance_contexts(batch), hint


def _pieces(model):
    """The fast path's three pieces, eager: ControlNet, UNet encoder, UNet decoder (timestep second)."""
    path = FastPath(model, compile_mode=None)
    return path.controlnet, path.encode, path.decode


def _flat(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
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
        emb, skips, mid = encoded
        got = decode(emb, t, skips, mid, context, *residuals)
    assert float(want.abs().max()) > 0.01
    _close(residuals, want_residuals)
    _close(encoded[1:], want_encoded[1:])
    # every resnet reads a timestep table, so the time MLP is not run: emb is a placeholder of its shape
    assert emb.shape == want_encoded[0].shape and not emb.any()
    _close(got, want)
    modules = [*tiny_model.unet.modules(), *tiny_model.controlnet.modules()]
    attentions = [m for m in modules if isinstance(m, Attention)]
    assert attentions and all(type(a.processor) is AttnProcessor2_0 for a in attentions)
    resnets = [m for m in modules if isinstance(m, ResnetBlock2D)]
    assert resnets and all(type(r.time_emb_proj) is torch.nn.Linear for r in resnets)
    assert type(tiny_model.unet.time_embedding) is type(tiny_model.controlnet.controlnet.time_embedding)
    assert hasattr(tiny_model.unet.time_embedding, "linear_1")  # the model's own, back in place
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
    clock = Clock()
    tables = time_projection_tables(tiny_model.unet, 1000, clock)
    with torch.no_grad():
        want = unet_encode(tiny_model.unet, x, t, context)[2]
        got = Piece(unet_encode, tiny_model.unet, weights=weights, processors=processors)(x, t, context)[2]
        assert not torch.allclose(got, want)
        encoder = [*tiny_model.unet.down_blocks, tiny_model.unet.mid_block]
        assert len(calls) == sum(isinstance(m, Attention) for block in encoder for m in block.modules()) > 0
        timed = Piece(unet_encode, tiny_model.unet, time_tables=tables, clock=clock)
        _close(timed(x, t, context)[2], want)
        for table in tables.values():
            table.table = table.table + 1.0
        assert not torch.allclose(timed(x, t, context)[2], want)
        assert torch.equal(clock.timestep, t)


def test_time_tables_hold_each_resnets_projection_at_every_timestep(tiny_model):
    unet = tiny_model.unet
    tables = time_projection_tables(unet, 1000, Clock())
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]
    assert set(tables) == set(resnets) and len(resnets) > 2
    sample = torch.zeros(1, *tiny_model.latent_shape)
    with torch.no_grad():
        for t in (0, 417, 999):
            emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=torch.tensor([t])), None)
            for resnet in resnets:
                want = resnet.time_emb_proj(resnet.nonlinearity(emb))
                _close(tables[resnet].table[t : t + 1], want)
    with pytest.raises(FeatInvError, match="clock"):
        Piece(unet_encode, unet, time_tables=tables)


def test_no_time_tables_where_the_embedding_is_more_than_the_timestep(tiny_model):
    unet = tiny_model.unet
    unet.class_embedding = torch.nn.Linear(2, 2)  # as a UNet with class labels has
    assert time_projection_tables(unet, 1000, Clock()) == {}


def test_cached_context_attention_projects_the_contexts_once(tiny_model):
    contexts = tiny_model.guidance_contexts(1)
    attn = next(m for m in tiny_model.unet.modules() if isinstance(m, Attention) and m.is_cross_attention)
    cached = CachedContextAttention(attn, contexts)
    assert cached.tensors.key.shape == (2, contexts.shape[1], attn.to_k.out_features)
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
    assert merged.tensors.weight.shape == (3 * attn.to_q.out_features, attn.query_dim)
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


@pytest.mark.heavy
def test_a_compiled_piece_equals_the_eager_one_and_follows_its_inputs(tiny_model):
    x, t, context, _ = _step_inputs(tiny_model, 1)
    _, encode, _ = _pieces(tiny_model)
    compiled = torch.compile(encode, dynamic=False)
    with torch.no_grad():
        for seed in (1, 2):  # a second input: nothing of the first call is baked in
            x = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            _close(compiled(x, t, context)[1:], unet_encode(tiny_model.unet, x, t, context)[1:])
    assert all(type(m.processor) is AttnProcessor2_0 for m in tiny_model.unet.modules() if isinstance(m, Attention))


@pytest.mark.heavy
def test_the_compiled_fast_path_equals_the_eager_loop_at_two_step_counts(tiny_model):
    """The product's configuration (compiled pieces: weight copies, swapped processors and time
    tables inside torch.compile) through whole samplers; a second step count reuses the compile."""
    from featinv.pipeline import Reconstructor

    g = torch.Generator().manual_seed(3)
    features, latents = (
        torch.rand(2, *tiny_model.feature_spec.shape, generator=g),
        torch.randn(2, *tiny_model.latent_shape, generator=g),
    )
    path = FastPath(tiny_model)  # compile_mode "default": Inductor's CPU kernels here
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for steps in (4, 7):
        want = Reconstructor(tiny_model).reconstruct(
            features=features, latents=latents, steps=steps, sampler="dpmpp", progress=False
        )
        got = path.sample(features, latents, tiny_model.noise_schedule.dpmpp_2m(steps), 1.75)
        assert float((got - want.samples).abs().max()) <= 1e-5 * max(1.0, float(want.samples.abs().max()))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 3  # one per piece, not per step count


def test_the_time_embedding_is_skipped_only_where_every_resnet_reads_a_table(tiny_model):
    from featinv.engine.time_tables import UnusedTimeEmbedding, unused_time_embeddings

    unet = tiny_model.unet
    tables = time_projection_tables(unet, 1000, Clock())
    stub = unused_time_embeddings(unet, tables)[unet]
    assert isinstance(stub, UnusedTimeEmbedding) and stub.out_features == unet.time_embedding.linear_2.out_features
    one_missing = dict(list(tables.items())[1:])
    assert unused_time_embeddings(unet, one_missing) == {}  # a resnet would still read the embedding

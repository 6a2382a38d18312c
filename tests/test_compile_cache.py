"""own_compile_cache: instances of one module class compiled apart do not share torch.compile's
per-code-object variant budget (recompile_limit), so none silently runs eagerly."""

from __future__ import annotations

import pytest
import torch

from featinv.engine.compile_cache import own_compile_cache


class _Twice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return self.linear(x) * scale


def _graphs_compiled(modules) -> int:
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for module in modules:
            x = torch.randn(3, 4)
            assert torch.allclose(torch.compile(module, dynamic=False)(x), module.linear(x) * 2.0)
    return torch._dynamo.utils.counters["stats"]["unique_graphs"] - before


@pytest.mark.heavy  # above 2 s in a full run: too near the 3 s limit
def test_instances_with_their_own_cache_all_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    with torch._dynamo.config.patch(recompile_limit=1):
        assert _graphs_compiled([_Twice(), _Twice()]) == 1  # shared code: the second one ran eagerly
        assert _graphs_compiled([own_compile_cache(_Twice()), own_compile_cache(_Twice())]) == 2


def test_the_compiled_backend_and_the_fast_path_pieces_have_their_own(tiny_model):
    from featinv.engine.compiled import CompiledDenoiser
    from featinv.engine.export import DenoiserGraph
    from featinv.engine.fast import FastPath

    graph = CompiledDenoiser(tiny_model).graph._orig_mod
    assert graph.forward.__func__.__code__ is not DenoiserGraph.forward.__code__
    pieces = FastPath(tiny_model, compile_mode=None)
    # identity, not equality: copies compare equal, and torch.compile keys its caches by the object
    codes = [piece.forward.__func__.__code__ for piece in (pieces.controlnet, pieces.encode, pieces.decode)]
    assert len({id(code) for code in codes}) == 3

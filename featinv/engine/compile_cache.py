"""A compile cache of its own for a module instance.

torch.compile keeps at most ``torch._dynamo.config.recompile_limit`` (8) compiled variants per code
object and runs that code eagerly beyond them (with one warning). Instances of one module class
share their ``forward``'s code object, so several compiled instances, each at a few shapes, share
one budget: the fast path's three pieces at three batch sizes already exceed it.
"""

from __future__ import annotations

import types

import torch


def own_compile_cache(module: torch.nn.Module) -> torch.nn.Module:
    """Give ``module`` a ``forward`` with its own code object (the same instructions), so that its
    compiled variants are counted apart from other instances'. Returns ``module``."""
    forward = type(module).forward
    code = forward.__code__.replace()  # a new code object: torch.compile's caches are keyed by it
    own = types.FunctionType(code, forward.__globals__, forward.__name__, forward.__defaults__, forward.__closure__)
    module.forward = types.MethodType(own, module)
    return module

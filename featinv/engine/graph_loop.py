"""The sampler loop over a captured step graph: C++ (``csrc/graph_loop.cpp``) or Python.

The C++ module needs the CUDA headers, so it is built on the GPU machine on first use with
``torch.utils.cpp_extension`` (about 20 s, cached under ``~/.cache/featinv/torch_extensions``).
``FEATINV_IMPL`` chooses as for the other native modules: ``python`` never builds it, ``auto``
falls back to the Python loop (one warning) when it cannot be built, ``cpp`` makes that an error.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from featinv._native import _chosen, _native_module
from featinv.errors import FeatInvError

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "graph_loop.cpp"
_module = None
_failure: str | None = None
_warned = False


def _build():
    """Import (building if needed) the C++ loop; None with the reason kept when that is impossible."""
    global _module, _failure
    if _module is not None or _failure is not None:
        return _module
    if not torch.cuda.is_available():
        _failure = "no CUDA GPU"
    elif not SOURCE.is_file():
        _failure = f"{SOURCE} is not there (an installed wheel ships no C++ sources)"
    else:
        from torch.utils import cpp_extension

        version = f"torch{torch.__version__.split('+')[0]}_cuda{torch.version.cuda}".replace(".", "_")
        build_dir = Path(os.environ.get("FEATINV_CACHE", Path.home() / ".cache" / "featinv")) / "torch_extensions"
        build_dir = build_dir / version
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            _module = cpp_extension.load(
                name="featinv_graph_loop", sources=[str(SOURCE)], build_directory=str(build_dir), with_cuda=True
            )
        except Exception as error:  # a compiler or CUDA header problem: the Python loop does the same
            _failure = f"building {SOURCE.name} failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return _module


def native_graph_loop(impl: str | None = None):
    """The C++ ``replay_steps`` or None (Python loop), by ``FEATINV_IMPL``."""
    module = _native_module(impl, _build, lambda: f"the C++ graph loop is unavailable: {_failure}")
    if module is None and _chosen(impl) != "python" and not _warned:
        _warn(f"C++ graph loop unavailable ({_failure}); replaying from Python")
    return None if module is None else module.replay_steps


def _warn(message: str) -> None:
    global _warned
    _warned = True
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def replay_loop(graph: torch.cuda.CUDAGraph, step_index: torch.Tensor, steps: int) -> bool:
    """Zero ``step_index`` and replay ``graph`` ``steps`` times from C++; False when the caller
    must run the Python loop instead."""
    global _module, _failure
    replay = native_graph_loop()
    if replay is None:
        return False
    try:
        replay(graph, step_index, steps)
    except (TypeError, RuntimeError) as error:  # the graph type did not cross into the module
        if _chosen(None) == "cpp":
            raise FeatInvError(f"the C++ graph loop could not replay the graph: {error}") from error
        _module, _failure = None, f"replay failed: {error}"
        _warn(f"C++ graph loop {_failure}; replaying from Python")
        return False
    return True

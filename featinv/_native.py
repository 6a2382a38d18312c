"""The ``FEATINV_IMPL=cpp|python`` switch between the native modules and their pure-Python twins:
``featinv._C`` (schedule tables) and ``featinv._sampler`` (the sampler loops over libtorch).

``FEATINV_IMPL`` unset (or ``auto``) uses the native module when it was built and the Python
twin otherwise; ``cpp`` insists on the native module; ``python`` never loads it.
"""

from __future__ import annotations

import os
from types import ModuleType

from featinv.errors import FeatInvError

IMPLEMENTATIONS = ("auto", "cpp", "python")


def _chosen(impl: str | None) -> str:
    """``impl``, or ``FEATINV_IMPL`` (default ``auto``), checked."""
    impl = (impl or os.environ.get("FEATINV_IMPL") or "auto").lower()
    if impl not in IMPLEMENTATIONS:
        raise FeatInvError(f"FEATINV_IMPL must be one of {', '.join(IMPLEMENTATIONS)}, got {impl!r}")
    return impl


def _load_native() -> ModuleType | None:
    try:
        from featinv import _C
    except ImportError:
        return None
    return _C


def native_available() -> bool:
    """Whether the C++ extension ``featinv._C`` was built and imports."""
    return _load_native() is not None


def _native_module(impl: str | None, load, why_missing) -> ModuleType | None:
    """The policy shared by every native module: None under ``python``; the module under ``auto``
    if it loads (else None); the module under ``cpp``, or one clear error ending in
    ``why_missing()`` when it does not load."""
    impl = _chosen(impl)
    if impl == "python":
        return None
    module = load()
    if module is None and impl == "cpp":
        raise FeatInvError(f"FEATINV_IMPL=cpp but {why_missing()}")
    return module


def _not_built(name: str, compiler: str) -> str:
    return (
        f"the C++ extension featinv.{name} is not built; "
        f"reinstall with {compiler} and CMake available, or set FEATINV_IMPL=python"
    )


def schedule_tables(impl: str | None = None) -> ModuleType:
    """The module that computes schedule tables for the chosen implementation.

    Args:
        impl: ``cpp``, ``python`` or ``auto``; ``None`` reads ``FEATINV_IMPL`` (default ``auto``).
    """
    native = _native_module(impl, _load_native, lambda: _not_built("_C", "a C++ compiler"))
    if native is not None:
        return native
    from featinv.sampling import schedule_tables as python_tables

    return python_tables


def _load_sampler() -> ModuleType | None:
    """The extension, if it loads and was built against the running torch (a wheel built against
    another torch would crash or misbehave in libtorch's C++ API): otherwise None, with one warning
    saying why, and the Python loops (the same numbers) run instead."""
    try:
        import torch  # the extension links against the loaded torch

        from featinv import _sampler
    except ImportError as error:
        if not isinstance(error, ModuleNotFoundError) and "cannot import name" not in str(error):  # built, broken
            _warn_once(f"featinv._sampler does not load with torch here ({error}); the Python sampler loops run")
        return None
    built = getattr(_sampler, "built_with_torch", None)
    if built is not None and built != torch.__version__:
        _warn_once(
            f"featinv._sampler was built against torch {built}, this is torch {torch.__version__}: the Python "
            "sampler loops run instead (the same numbers); reinstall featinv to rebuild it"
        )
        return None
    return _sampler


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=3)


def native_sampler_available() -> bool:
    """Whether the C++ sampler loops ``featinv._sampler`` were built and import."""
    return _load_sampler() is not None


def sampler_loop(impl: str | None = None):
    """The native ``sample_loop`` for the chosen implementation, or None for the Python loops."""
    native = _native_module(impl, _load_sampler, lambda: _not_built("_sampler", "a C++20 compiler"))
    return None if native is None else native.sample_loop

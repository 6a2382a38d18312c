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


def schedule_tables(impl: str | None = None) -> ModuleType:
    """The module that computes schedule tables for the chosen implementation.

    Args:
        impl: ``cpp``, ``python`` or ``auto``; ``None`` reads ``FEATINV_IMPL`` (default ``auto``).
    """
    impl = _chosen(impl)
    if impl != "python":
        native = _load_native()
        if native is not None:
            return native
        if impl == "cpp":
            raise FeatInvError(
                "FEATINV_IMPL=cpp but the C++ extension featinv._C is not built; "
                "reinstall with a C++ compiler and CMake available, or set FEATINV_IMPL=python"
            )
    from featinv.sampling import schedule_tables as python_tables

    return python_tables


def _load_sampler() -> ModuleType | None:
    try:
        import torch  # noqa: F401  (the extension links against the loaded torch)

        from featinv import _sampler
    except ImportError:
        return None
    return _sampler


def native_sampler_available() -> bool:
    """Whether the C++ sampler loops ``featinv._sampler`` were built and import."""
    return _load_sampler() is not None


def sampler_loop(impl: str | None = None):
    """The native ``sample_loop`` for the chosen implementation, or None for the Python loops."""
    impl = _chosen(impl)
    if impl == "python":
        return None
    native = _load_sampler()
    if native is None and impl == "cpp":
        raise FeatInvError(
            "FEATINV_IMPL=cpp but the C++ sampler featinv._sampler is not built; "
            "reinstall with a C++20 compiler and CMake available, or set FEATINV_IMPL=python"
        )
    return None if native is None else native.sample_loop

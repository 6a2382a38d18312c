"""Your own classifier: a factory named ``package.module:factory`` or ``path/to/file.py:factory``,
a callable returning an ``nn.Module``; layers by module path. Importing it runs its code, so a
model folder that names one is loaded only when the user says so (``trust_code``)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from featinv.errors import FeatInvError
from featinv.sources.base import IMAGENET_MEAN, IMAGENET_STD, DataConfig, first_line
from featinv.sources.by_path import ModulePathBackbone, kwargs_failure

DEFAULT_INPUT_SIZE = (3, 224, 224)


def split_factory(name: str) -> tuple[str, str]:
    """``("package.module" or "path/file.py", "factory")`` of ``name``, checked."""
    where, _, attribute = str(name).rpartition(":")
    if not where or not attribute.isidentifier():
        raise FeatInvError(
            f"--classifier-module must be package.module:factory or path/to/file.py:factory, got {name!r}"
        )
    return where, attribute


def canonical_name(name: str) -> str:
    """``name`` with a file path made absolute (a model folder is read from anywhere later)."""
    where, attribute = split_factory(name)
    if where.endswith(".py"):
        return f"{Path(where).resolve()}:{attribute}"
    return name


def import_factory(name: str) -> Callable[..., Any]:
    """Import the module ``name`` names and return its factory (this runs the module's code)."""
    where, attribute = split_factory(name)
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise FeatInvError(f"--classifier-module file not found: {path}")
            key = "featinv_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            spec = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[key] = module
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # as `python -m` does, so a package beside the user imports
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except FeatInvError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the user's module raises on import
        raise FeatInvError(f"--classifier-module {name}: importing {where} failed ({first_line(error)})") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise FeatInvError(f"--classifier-module {name}: {where} has no callable {attribute!r}")
    return factory


class ModuleBackbone(ModulePathBackbone):
    """``factory(**model_kwargs)`` from the user's module; ImageNet normalisation at 224 px unless
    the input size and normalisation are given."""

    source = "module"

    def __init__(self, name: str, *, pretrained: bool = False, model_kwargs: dict[str, Any] | None = None) -> None:
        if pretrained:
            raise FeatInvError("pretrained weights do not apply to --classifier-module: pass --classifier-weights")
        self.model_kwargs = dict(model_kwargs or {})
        factory = import_factory(name)
        try:
            network = factory(**self.model_kwargs)
        except Exception as error:  # noqa: BLE001 - the user's factory
            raise kwargs_failure(f"--classifier-module {name}", self.model_kwargs, error) from error
        if not isinstance(network, nn.Module):
            raise FeatInvError(f"--classifier-module {name} returned {type(network).__name__}, not a torch nn.Module")
        super().__init__(canonical_name(name), network)

    def describe_name(self) -> str:
        return f"module {self.name}"

    def data_config(self) -> DataConfig:
        return DataConfig(DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, 1.0)

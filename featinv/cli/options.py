"""What more than one command uses: the one-line parser, output checks and staging, the model and
classifier a command names, option declarations shared by commands, and small readers. Helpers
take plain values, never the argparse namespace. The bottom of :mod:`featinv.cli`: it imports no
command module and not the package face."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the commands that run, not by --help
    import torch

from featinv.choices import FEATURE_SOURCES, GUIDANCE_MODES, dtype_choice
from featinv.errors import FeatInvError
from featinv.files import probe_writable, staged_folder


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` choice (either spelling: fp16 or float16)."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_choice(name)]


def add_dtype_arg(
    parser: argparse.ArgumentParser,
    choices: Sequence[str],
    default: str,
    help: str = "",  # noqa: A002 - argparse's name
    *,
    long: bool = False,
) -> None:
    """``--dtype``, taking both spellings of each of ``choices`` (fp16 or float16: see
    :func:`featinv.choices.dtype_choice`); the command reads the short names, or with ``long``
    torch's."""
    canonical = [dtype_choice(c, long=long) if c != "auto" else c for c in choices]
    other = [dtype_choice(c, long=not long) for c in canonical if c != "auto"]
    parser.add_argument(
        "--dtype",
        type=lambda text: text if text == "auto" else dtype_choice(text, long=long),
        choices=canonical,
        default=default,
        metavar="{" + ",".join(canonical) + "}",
        help=(help + " " if help else "") + f"(also spelled {', '.join(other)}; default {default})",
    )


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse hook
        self.exit(2, f"featinv: error: {message} (see '{self.prog} --help')\n")


def check_output_location(out: str | Path, *, folder: bool = True) -> None:
    """Fail before any work when ``--out`` cannot be written: a folder output must not be an
    existing file (nor a file output an existing folder or special file), its parent folders are
    created and a probe folder is made and removed beside it (where the outputs are staged)."""
    from featinv.files import what_is_there

    out = Path(out)
    found = what_is_there(out)
    if folder and found not in ("not found", "a folder"):
        raise FeatInvError(f"--out {out} exists and is {found or 'a file'}, not a folder: give a folder path")
    if not folder and found not in ("not found", None):
        raise FeatInvError(f"--out {out} is {found}: give a file path")
    try:
        probe_writable(out.parent)
    except OSError as error:
        raise FeatInvError(f"--out {out} cannot be written ({out.parent}: {error.strerror or error})") from error


def staged_output(out: str | Path):
    """A temporary folder beside ``out``; its files move into ``out`` only if the block succeeds
    (:func:`featinv.files.staged_folder`, merging)."""
    return staged_folder(out, merge=True)


UNGIVEN = object()  # the default of every option while given_options re-parses


def walk_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-command's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from walk_parsers(sub)


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The option dests the command line sets itself, not by default: ``argv`` parsed again by a
    fresh ``parser`` with every default a sentinel (so a default typed out, ``--pool 50000``, counts
    as given)."""
    for each in walk_parsers(parser):
        for action in each._actions:
            if action.default is not argparse.SUPPRESS and not isinstance(action, argparse._SubParsersAction):
                action.default = UNGIVEN
    return {dest for dest, value in vars(parser.parse_args(argv)).items() if value is not UNGIVEN}


def only_with(parser: argparse.ArgumentParser, rules: dict[str, tuple[str, Callable[[argparse.Namespace], bool]]]):
    """Declare options that mean something only with another: ``{"--teacher-steps": ("--distill",
    lambda args: args.distill)}``; given without it, the command is refused before any work
    (:func:`main` checks)."""
    dests = {flag: action.dest for action in parser._actions for flag in action.option_strings}
    unknown = [flag for flag in rules if flag not in dests]
    if unknown:
        raise ValueError(f"only_with: {parser.prog} has no option {', '.join(unknown)}")
    table = dict(parser.get_default("only_with") or {})
    table.update({flag: (dests[flag], needs, holds) for flag, (needs, holds) in rules.items()})
    parser.set_defaults(only_with=table)


def refuse_unmet(args: argparse.Namespace, given: set[str]) -> None:
    """A FeatInvError for the first option given without the option it needs (:func:`only_with`)."""
    for flag, (dest, needs, holds) in (getattr(args, "only_with", None) or {}).items():
        if dest in given and not holds(args):
            raise FeatInvError(f"{flag} applies only with {needs}")


def load_model(folder: str | Path, trust_code: bool = False):
    """The FeatInv model of a ``--model`` folder (one whose classifier is a user module only with
    ``--trust-code``)."""
    from featinv.models import FeatInvModel

    return FeatInvModel.from_pretrained(folder, trust_code=trust_code)


def extractor_for(model, weights: str | Path | None, trust_code: bool = False):
    """The model's classifier, or with ``--classifier-weights`` its spec's classifier with those weights."""
    from featinv.features import FeatureExtractor

    if weights is None:
        return model.classifier
    extractor = FeatureExtractor.from_spec(model.feature_spec, trust_code=trust_code)
    extractor.load_classifier_weights(weights)
    return extractor


def required_extractor(model, weights: str | Path | None, folder: str | Path, trust_code: bool = False):
    """:func:`extractor_for`, for commands that cannot work without the classifier."""
    extractor = extractor_for(model, weights, trust_code)
    if extractor is None:
        raise FeatInvError(f"{folder} stores no classifier: pass --classifier-weights FILE")
    return extractor


def add_twin_encoder_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--twin-encoder",
        action="store_true",
        help="with --backend fast: run the ControlNet and the UNet's encoder as one network of two weight sets",
    )


def add_guidance_on_arg(parser: argparse.ArgumentParser, *, both: bool = False) -> None:
    parser.add_argument(
        "--guidance-on",
        choices=[*GUIDANCE_MODES, "both"] if both else GUIDANCE_MODES,
        help="what classifier-free guidance guides on: features (the unconditional branch is the zero feature "
        "map + the empty prompt) or prompt (the same feature map + the empty prompt, as the published FeatInv "
        "sampler); default: the model's own (info shows it)"
        + ("; both: FeatInv spatial in each mode, with their paired differences" if both else ""),
    )


def fast_options(twin_encoder: bool, backend: str) -> dict[str, bool] | None:
    """The fast backend's options the command line sets (``--twin-encoder``)."""
    if not twin_encoder:
        return None
    if backend != "fast":
        raise FeatInvError(f"--twin-encoder needs --backend fast, got --backend {backend}")
    return {"twin_encoder": True}


def unique_stems(paths: Sequence[str]) -> list[str]:
    stems, seen = [], {}
    for path in paths:
        stem = Path(path).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}_{count}")
    return stems


def read_features(path: str) -> torch.Tensor:
    from featinv.weights import load_state_dict

    tensors = load_state_dict(path, what="features")
    if "features" not in tensors:
        raise FeatInvError(f"features file {path} has no tensor named 'features' (has: {', '.join(tensors)})")
    features = tensors["features"]
    if features.ndim == 0 or len(features) == 0:
        raise FeatInvError(
            f"features file {path} holds no feature maps: its 'features' tensor has shape {tuple(features.shape)}, "
            "expected (B, C, h, w) with B >= 1"
        )
    return features.float()


def sample_names(stems: Sequence[str], samples: int) -> dict[str, list[str]]:
    """Each input's output files: ``stem.png`` (sample 0, as with one sample), ``stem_sample{k}.png``,
    and with several samples ``stem_spread.png`` last; an input whose name another's outputs take
    (``a_sample1.png`` beside ``a.png``) is refused."""
    names = {stem: [f"{stem}.png"] + [f"{stem}_sample{k}.png" for k in range(1, samples)] for stem in stems}
    if samples > 1:
        for stem in stems:
            names[stem].append(f"{stem}_spread.png")
    taken = [name for files in names.values() for name in files]
    if len(set(taken)) != len(taken):
        clash = next(name for name in taken if taken.count(name) > 1)
        raise FeatInvError(f"with --samples {samples} two outputs would be named {clash}: rename an input")
    return names


def parse_layer(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.lstrip("-").isdigit() else value


def json_object_arg(flag: str, text: str | None) -> dict:
    """The JSON object a flag was given ({} when not given); anything else is a one-line error."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise FeatInvError(f"{flag} must be a JSON object, got {text!r}") from error
    if not isinstance(value, dict):
        raise FeatInvError(f"{flag} must be a JSON object, got {text!r}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="FeatInv model folder")
    parser.add_argument("--classifier-weights", help="classifier weights file (if the model stores none)")


def add_trust_code_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="load a model folder whose classifier is a user module (--classifier-module): this imports and runs "
        "that module's code",
    )


def add_source_args(parser: argparse.ArgumentParser, *, applies: str = "") -> None:
    """``--source``, ``--classifier-module`` and ``--classifier-normalization``: where the classifier
    named by ``--classifier`` comes from (``applies``: when they mean something, for the help)."""
    parser.add_argument(
        "--source",
        choices=FEATURE_SOURCES,
        help=f"{applies}where --classifier comes from: timm (default; a model name), torchvision (a model name), "
        "transformers (a local model folder, or a hub id: downloads), module (with --classifier-module)",
    )
    parser.add_argument(
        "--classifier-module",
        metavar="PACKAGE.MODULE:FACTORY",
        help=f"{applies}your own classifier: a callable returning an nn.Module, as package.module:factory or "
        "path/to/file.py:factory (imported: runs its code); layers by module path",
    )
    parser.add_argument(
        "--classifier-normalization",
        metavar="JSON",
        help=f"{applies}the classifier's input normalisation, e.g. "
        '\'{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}\' '
        "(default: the model's own: timm's data config, torchvision's weights, the transformers image processor; "
        "ImageNet's for a module)",
    )


def classifier_source(source: str | None, classifier: str | None, module: str | None) -> tuple[str, str | None]:
    """(the source, the classifier's name) of ``--source``, ``--classifier`` and ``--classifier-module``."""
    if module is not None:
        if source not in (None, "module"):
            raise FeatInvError(f"--classifier-module goes with --source module, got --source {source}")
        if classifier is not None:
            raise FeatInvError("give --classifier NAME or --classifier-module PACKAGE.MODULE:FACTORY, not both")
        return "module", module
    if source == "module":
        raise FeatInvError("--source module needs --classifier-module PACKAGE.MODULE:FACTORY")
    return source or "timm", classifier


def normalization_arg(text: str | None) -> dict[str, list[float]]:
    """``--classifier-normalization``'s ``{"mean": [...], "std": [...]}`` ({} when not given)."""
    value = json_object_arg("--classifier-normalization", text)
    if value and set(value) != {"mean", "std"}:
        raise FeatInvError(
            f'--classifier-normalization must hold "mean" and "std" (three numbers each), got {sorted(value)}'
        )
    return value


def new_extractor(
    source: str | None,
    classifier: str | None,
    module: str | None,
    *,
    layer: str | None = None,
    mode: str = "spatial",
    weights: str | Path | None = None,
    kwargs_text: str | None = None,
    input_side: int | None = None,
    normalization_text: str | None = None,
    **options,
):
    """The FeatureExtractor that a command's classifier options describe (checked first, built)."""
    from featinv.features import FeatureExtractor

    source, name = classifier_source(source, classifier, module)
    if name is None:
        raise FeatInvError("give --classifier NAME (or --classifier-module PACKAGE.MODULE:FACTORY)")
    return FeatureExtractor(
        name,
        parse_layer(layer),
        source=source,
        mode=mode,
        weights=weights,
        model_kwargs=json_object_arg("--classifier-kwargs", kwargs_text),
        input_size=(3, input_side, input_side) if input_side else None,
        **normalization_arg(normalization_text),
        **options,
    )

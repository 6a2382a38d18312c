"""The README cannot drift from the CLI: every ``featinv`` command line of its code blocks and
inline code parses (options, values, choices, option combinations), and its training and
reconstruction commands run, shrunk to a step, in the order the README gives them."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
from pathlib import Path

import pytest
from helpers import run_cli
from PIL import Image

from featinv.cli import build_parser
from featinv.cli.options import given_options, refuse_unmet, walk_parsers

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PLACEHOLDERS = {"PX": "64", "N": "64", "SECONDS": "60"}  # numbers the README writes as names


def readme_blocks() -> list[list[str]]:
    """The ``featinv`` lines of each fenced code block, continuation lines joined."""
    blocks = []
    for body in re.findall(r"^```[^\n]*\n(.*?)^```", README, re.S | re.M):
        lines = [line.strip() for line in body.replace("\\\n", " ").splitlines()]
        blocks.append([" ".join(line.split()) for line in lines if line.startswith("featinv ")])
    return [block for block in blocks if block]


def readme_spans() -> list[str]:
    """The ``featinv ...`` inline code spans of the prose (they may wrap across lines)."""
    prose = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)
    return [" ".join(span.split()) for span in re.findall(r"`(featinv [^`]+)`", prose)]


def tokens(line: str, optional: bool = True) -> list[str]:
    """The arguments of a README line: comments dropped, ``[optional parts]`` kept (or with
    ``optional=False`` left out), the first of ``a|b`` alternatives, placeholders
    (``<that run's --model>``, ``PX``) given a value."""
    line = re.sub(r"<[^>]*>", "X", line)
    words, depth = [], 0
    for word in shlex.split(line, comments=True)[1:]:
        opens, closes = len(word) - len(word.lstrip("[")), len(word) - len(word.rstrip("]"))
        if "{" not in word:
            depth += opens
            word = word.strip("[]").split("|")[0]
        if word and (optional or depth == 0):
            words.append(PLACEHOLDERS.get(word, word))
        if "{" not in word:
            depth -= closes
    return words


def is_template(line: str) -> bool:
    """A line that stands for a family (``featinv train ... --resume``) or names a command only."""
    return "..." in line.replace("'...the same...'", "") or not re.search(r" --\w", line)


def dry_parse(line: str) -> argparse.Namespace:
    """Parse as ``main`` would, running nothing; a template line need not give required options."""
    parser = build_parser()
    words = [w for w in tokens(line) if w != "..."]
    if is_template(line):
        for each in walk_parsers(parser):
            for action in each._actions:
                action.required = action.required and isinstance(action, argparse._SubParsersAction)
    try:
        args = parser.parse_args(words)
    except SystemExit as refused:
        raise AssertionError(f"README line does not parse: {line}") from refused
    if not is_template(line):
        refuse_unmet(args, given_options(build_parser(), words))
    return args


ALL_LINES = [line for block in readme_blocks() for line in block] + readme_spans()


def test_the_readme_has_its_command_lines():
    assert len(ALL_LINES) > 60
    assert any(line.startswith("featinv train --preset shapes-demo") for line in ALL_LINES)


@pytest.mark.parametrize("line", [line for line in ALL_LINES if not re.search(r"--help|--version|<command>", line)])
def test_every_readme_command_line_parses(line):
    dry_parse(line)


# Lines not run, each for a reason a CPU test machine cannot change; every other training,
# model-making and reconstruction line of the README runs.
NOT_RUN = {
    "a hub id (downloads)": lambda line: "--base sd15" in line or "r50-layer3" in line,
    "an ImageNet folder": lambda line: "/data/imagenet" in line,
    "the published checkpoint": lambda line: "featinv-convnext" in line or ".ckpt" in line,
    "the --pooled twin of the line before": lambda line: "--model RP " in line,
    "a checkpoint of a 500-step run": lambda line: "step-0000500" in line,
    "export and its backends (tests/test_export.py)": lambda line: (
        "--backend" in line or line.startswith("featinv export")
    ),
    "a long-running server or the demo (tests/test_webapp.py, make demo)": lambda line: re.match(
        r"featinv (serve|demo)", line
    ),
    "a family of commands": is_template,
}
RUN = ("featinv train", "featinv create", "featinv reconstruct", "featinv extract", "featinv info", "featinv data")
RUN += ("featinv features", "featinv from-checkpoint", "featinv convert")
TINY = {  # option -> its value at a tiny scale, where the line gives it
    "--steps": "1",
    "--pool": "8",
    "--batch-size": "2",
    "--device": "cpu",
    "--checkpoint-every": "0",
    "--teacher-steps": "2",
    "--time-budget": "0",
    "--n": "4",
}


def shrink(words: list[str]) -> list[str]:
    """The command at a tiny scale: TINY's values where the line gives those options, one step of
    the preset (``--scale 0.001``), a pool of 8 shapes and a handful of held-out images where the
    line leaves them at their defaults (50,000 and 1,000), few sampler and optimisation steps."""
    words = list(words)
    for i, word in enumerate(words[:-1]):
        if word in TINY:
            words[i + 1] = TINY[word]

    def add(flag: str, value: str) -> None:
        if flag not in words:
            words.extend([flag, value])

    if words[:3] == ["train", "--preset", "shapes-demo"]:
        add("--scale", "0.001")
    elif words[0] == "train" or words[0] == "train-classifier":
        add("--pool", "8")
        if words[0] == "train-classifier":
            add("--held-out", "8")
    elif words[0] == "reconstruct":
        add("--steps", "2")
        add("--quiet", "")
        if "optimize" in words:
            add("--opt-steps", "2")
    return [word for word in words if word != ""]


def why_not_run(line: str) -> str | None:
    if not line.startswith(RUN):
        return "not a training, model or reconstruction command"
    return next((reason for reason, applies in NOT_RUN.items() if applies(line)), None)


@pytest.fixture
def readme_world(tmp_path):
    """A folder where the README's relative paths resolve: ``featinv/pretrained`` (the shipped
    models), a model ``my-model`` as its usage section makes it, and the image files it names."""
    (tmp_path / "featinv").symlink_to(ROOT / "featinv", target_is_directory=True)
    for name in ("a.png", "b.png", "b.jpg", "cat.png", "cat.jpg"):
        Image.effect_noise((40, 36), 70).convert("RGB").save(tmp_path / name)
    return tmp_path


def _run_block(capsys, monkeypatch, folder: Path, lines: list[str]) -> list[str]:
    """Run a code block's runnable lines in order in ``folder`` (optional parts left out); the
    lines run. A model folder a line creates is made afresh, as a reader would."""
    monkeypatch.chdir(folder)
    ran, kwargs = [], {}  # classifier -> the --classifier-kwargs its training line gave
    for line in lines:
        if why_not_run(line):
            continue
        words = tokens(line, optional=False)
        if "--classifier-kwargs" in words:  # '...the same...': those of that classifier's line above
            at, name = words.index("--classifier-kwargs") + 1, words[words.index("--classifier") + 1]
            words[at] = kwargs.setdefault(name, words[at]) if words[at] == "...the same..." else words[at]
            kwargs[name] = words[at]
        if words[0] == "create":
            shutil.rmtree(folder / words[words.index("--out") + 1], ignore_errors=True)
        words = shrink(words)
        code, _, err = run_cli(capsys, *words)
        assert code == 0, f"README line failed at a tiny scale: {line}\n  ran: {' '.join(words)}\n{err[-2000:]}"
        ran.append(line)
    return ran


@pytest.mark.heavy
def test_the_recipe_of_the_shipped_weights_runs_at_a_tiny_scale(capsys, monkeypatch, readme_world):
    """ "How the shipped weights were made": step 1 as ``featinv train --preset shapes-demo
    --scale 0.001 --time-budget 0 --out DIR`` (on the CPU), then the three fine-tunes for a step."""
    recipe = [span for span in readme_spans() if re.match(r"featinv train --(preset|model DIR)", span)]
    assert len(recipe) == 4
    first = shrink(tokens(recipe[0], optional=False))
    assert first == [*"train --preset shapes-demo --out DIR --device cpu --time-budget 0 --scale 0.001".split()]
    ran = _run_block(capsys, monkeypatch, readme_world, recipe)
    assert ran == recipe
    assert (readme_world / "DIR" / "shapes-demo" / "featinv.json").is_file()
    assert (readme_world / "DIR4" / "model" / "featinv.json").is_file()


@pytest.mark.heavy
def test_the_readme_code_blocks_run_at_a_tiny_scale(capsys, monkeypatch, readme_world):
    """Every code block with a runnable line runs in a folder of its own, in order, with the
    ``my-model`` its usage section makes; training, distillation, transfer and classifiers alike."""
    made = next(line for line in ALL_LINES if line.startswith("featinv create --preset micro"))
    assert " --out my-model " in made
    ran, left = [], {}
    for index, block in enumerate(readme_blocks()):
        if not any(why_not_run(line) is None for line in block):
            continue
        folder = readme_world / f"block{index}"
        folder.mkdir()
        for item in readme_world.iterdir():
            if item.name != folder.name and not item.name.startswith("block"):
                (folder / item.name).symlink_to(item)
        (folder / "M").symlink_to("my-model")  # "a model M" of the prose: the block's my-model
        if made not in block:
            _run_block(capsys, monkeypatch, folder, [made])
        ran += _run_block(capsys, monkeypatch, folder, block)
        left.update({line: why_not_run(line) for line in block if why_not_run(line)})
    trained = [line for line in ran if line.startswith("featinv train")]
    assert len(trained) >= 8, trained  # distillation (2), classifiers (3), transfer, fine-tunes, my-model
    assert any("--distill-target trajectory" in line for line in trained)
    assert any("--transfer-from" in line for line in trained)
    assert any(line.startswith("featinv reconstruct") for line in ran)
    untrained = {line: why for line, why in left.items() if line.startswith("featinv train")}
    assert set(untrained.values()) <= {"a hub id (downloads)", "an ImageNet folder", "a family of commands",
                                       "the --pooled twin of the line before"}, untrained  # fmt: skip

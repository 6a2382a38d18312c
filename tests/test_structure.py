"""The package's structure, read from its imports with ``ast``: the CLI's command modules stand on
``featinv.cli.options`` and the library, never on each other or on the package face; nothing in the
library imports the CLI; files are written atomically and staged in one place only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featinv"
CLI = PACKAGE / "cli"
COMMAND_MODULES = {path.stem for path in CLI.glob("*.py")} - {"__init__", "__main__", "options"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (lazy imports inside functions too), as dotted
    names; ``from featinv.cli import x`` counts as ``featinv.cli`` and ``featinv.cli.x``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_command_modules_import_neither_each_other_nor_the_face():
    assert {"model", "reconstruct", "training", "analysis", "demo", "serve"} <= COMMAND_MODULES
    for stem in [*COMMAND_MODULES, "options"]:
        found = {name for name in imported_modules(CLI / f"{stem}.py") if name.startswith("featinv.cli")}
        if stem != "options":  # the bottom: what the commands share
            found = {
                name for name in found if name != "featinv.cli.options" and not name.startswith("featinv.cli.options.")
            }
        assert not found, f"featinv/cli/{stem}.py imports {sorted(found)}"


def test_nothing_outside_the_cli_imports_it():
    for path in PACKAGE.rglob("*.py"):
        if CLI in path.parents:
            continue
        found = {name for name in imported_modules(path) if name == "featinv.cli" or name.startswith("featinv.cli.")}
        assert not found, f"{path.relative_to(PACKAGE.parent)} imports {sorted(found)}"


def test_python_m_featinv_cli_is_the_command():
    run = subprocess.run([sys.executable, "-m", "featinv.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: featinv ") and "reconstruct" in run.stdout


def test_files_are_written_atomically_and_staged_in_one_place():
    """One implementation each (featinv/files.py): no rename-into-place or temporary staging by
    hand anywhere else."""
    by_hand = ("os.replace(", "os.rename(", "tempfile.mkdtemp(", "tempfile.mkstemp(", "TemporaryDirectory(")
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "files.py":
            continue
        text = path.read_text(encoding="utf-8")
        found = [pattern for pattern in by_hand if pattern in text]
        assert not found, f"{path.relative_to(PACKAGE.parent)} writes by hand: {found}"


def test_a_staged_folder_is_whole_or_absent(tmp_path):
    from featinv.files import staged_folder

    target = tmp_path / "model"
    with staged_folder(target) as staging:
        (staging / "a.txt").write_text("one")
    try:
        with staged_folder(target) as staging:
            (staging / "a.txt").write_text("two")
            raise RuntimeError("crash mid-write")
    except RuntimeError:
        pass
    assert (target / "a.txt").read_text() == "one"  # the failed write left the old folder
    with staged_folder(target, merge=True, last="manifest.json") as staging:
        (staging / "b.txt").write_text("b")
        (staging / "manifest.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt", "manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder or backup left


def test_test_modules_share_through_helpers_not_each_other():
    tests = Path(__file__).resolve().parent
    for path in tests.glob("test_*.py"):
        found = {name for name in imported_modules(path) if name.split(".")[0].startswith("test_")}
        assert not found, f"{path.name} imports {sorted(found)}: move what it needs to tests/helpers.py"


def test_one_list_of_sampler_names():
    from featinv import choices, sampling

    assert tuple(sampling.SAMPLER_LOOPS) == choices.SAMPLERS
    with pytest.warns(DeprecationWarning, match="SAMPLER_LOOPS"):
        assert sampling.SAMPLERS is sampling.SAMPLER_LOOPS  # the old name still works


def test_the_analysis_package_imports_nothing_from_the_engine():
    for path in (PACKAGE / "analysis").rglob("*.py"):
        found = {n for n in imported_modules(path) if n == "featinv.engine" or n.startswith("featinv.engine.")}
        assert not found, f"{path.relative_to(PACKAGE.parent)} imports {sorted(found)}: use featinv.pipeline"


def every_command_parser():
    """(command words, parser) of every command and subcommand of ``featinv``."""
    import argparse

    from featinv.cli import build_parser

    found, todo = [], [((), build_parser())]
    while todo:
        words, parser = todo.pop()
        found.append((words, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [((*words, name), sub) for name, sub in action.choices.items()]
    return found


def option(parser, flag: str):
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_every_dtype_option_takes_both_spellings_and_every_device_defaults_to_auto():
    with_dtype, with_device = set(), set()
    for words, parser in every_command_parser():
        dtype, device = option(parser, "--dtype"), option(parser, "--device")
        if dtype is not None:
            with_dtype.add(" ".join(words))
            for short, long in (("fp32", "float32"), ("fp16", "float16")):
                assert dtype.type(short) == dtype.type(long) == dtype.type(long.upper()), words
                assert dtype.type(short) in dtype.choices, words
            assert dtype.type("int8") not in dtype.choices
        if device is not None:
            with_device.add(" ".join(words))
            assert device.default == "auto", f"featinv {' '.join(words)} --device defaults to {device.default!r}"
    assert {"reconstruct", "export", "convert", "features cache"} <= with_dtype
    assert {"reconstruct", "train", "evaluate", "serve", "features cache"} <= with_device


def test_the_heavy_check_fails_a_test_only_when_it_is_over_the_limit_again_alone():
    from conftest import recheck_heavy, slowest

    durations = {"tests/a.py::fast": 0.4, "tests/b.py::slow": 3.0, "tests/c.py::noisy": 7.25, "tests/d.py::near": 2.5}
    alone = {"tests/b.py::slow": 3.5, "tests/c.py::noisy": 1.0}
    timed = []
    heavy, noise = recheck_heavy(durations, lambda nodeid: timed.append(nodeid) or alone[nodeid], 3.0)
    assert timed == ["tests/c.py::noisy", "tests/b.py::slow"]  # only those over the limit are timed again
    assert heavy == ["3.0 s, then 3.5 s alone  tests/b.py::slow"]
    assert noise == ["7.2 s, then 1.0 s alone  tests/c.py::noisy"]
    assert recheck_heavy(durations, alone.__getitem__, 8.0) == ([], [])
    assert slowest(durations, 2.0, 3.0) == [(2.5, "tests/d.py::near")]


def test_the_heavy_check_leaves_shared_fixtures_setup_out_of_a_tests_time():
    import time
    from types import SimpleNamespace

    import conftest

    def set_up(scope: str, nodeid: str, seconds: float, setup_report: float) -> float:
        conftest.pytest_runtest_logstart(nodeid, None)
        wrapper = conftest.pytest_fixture_setup(SimpleNamespace(scope=scope), None)
        next(wrapper)
        time.sleep(seconds)
        next(wrapper, None)
        report = SimpleNamespace(when="setup", keywords={}, nodeid=nodeid, duration=setup_report)
        conftest.pytest_runtest_logreport(report)
        return conftest._durations.pop(nodeid)

    assert set_up("function", "fake.py::own", 0.05, 0.08) == 0.08
    assert set_up("module", "fake.py::shared", 0.05, 0.08) <= 0.03


@pytest.mark.heavy  # a pytest process of its own: 3.5 s
def test_a_test_is_timed_alone_in_a_pytest_process_of_its_own():
    from conftest import time_alone

    root = Path(__file__).resolve().parents[1]
    nodeid = "tests/test_structure.py::test_the_heavy_check_fails_a_test_only_when_it_is_over_the_limit_again_alone"
    assert 0 < time_alone(nodeid, root) < 3


def test_the_old_name_of_the_reconstruction_server_still_works_with_a_note():
    from featinv import serving

    with pytest.warns(DeprecationWarning, match="ReconstructionServer"):
        assert serving.RealtimeReconstructor is serving.ReconstructionServer

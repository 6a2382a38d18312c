"""Start-up: ``import featinv`` and the CLI's help load no torch, timm or diffusers (PEP 562 lazy
names, imports inside commands), and ``featinv --version`` prints the one version."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "timm", "diffusers", "transformers")
PROBE = """
import sys
from featinv.cli import main
for argv in {argvs!r}:
    try:
        main(argv)
    except SystemExit:
        pass
import featinv
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


def test_import_and_every_commands_help_load_no_heavy_library():
    from featinv.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    argvs = [["--help"], ["--version"], *([name, "--help"] for name in commands)]
    probe = PROBE.format(argvs=argvs, heavy=HEAVY)
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout[-500:]
    assert len(commands) >= 10  # every command's help was asked for


def test_version_is_the_one_in_pyproject(capsys):
    import re
    from pathlib import Path

    import featinv
    from featinv.cli import main

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"featinv {declared}" == f"featinv {featinv.__version__}"
    assert featinv.Reconstructor.__name__ == "Reconstructor"  # the lazy names still resolve

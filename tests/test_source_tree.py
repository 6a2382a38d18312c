"""featinv from a source tree that was never installed (PYTHONPATH=.): ``featinv.kernels`` (the
top-level ``kernels/`` folder, mapped by setup.py on installation) still imports, and with it the
fast path's module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.heavy
def test_an_uninstalled_source_tree_imports_the_kernels(tmp_path):
    for folder in ("featinv", "kernels"):
        shutil.copytree(
            ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__", "pretrained")
        )
    # -S: no site-packages processing, so no editable-install finder maps featinv.kernels; torch and
    # the other dependencies come from the site-packages folder appended by hand.
    code = (
        f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r}); "
        "import featinv, featinv.kernels.guided_update as g, featinv.engine.fast; "
        "print(featinv.__file__); print(g.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    featinv_file, kernel_file = done.stdout.split()
    assert Path(featinv_file).parent == tmp_path / "featinv"
    assert Path(kernel_file) == tmp_path / "kernels" / "guided_update.py"


def test_the_checkouts_kernels_folder_does_not_pass_for_hugging_faces_kernels_package():
    """Run from the checkout (`python -m ...` puts it on sys.path), `import kernels` after featinv
    finds Hugging Face's package, which transformers (and diffusers through it) import, not
    featinv's kernels/; featinv.kernels is still the checkout's folder."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("kernels")
    except PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    code = "import featinv, kernels, featinv.kernels as own; print(kernels.__file__); print(own.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    hub, own = (Path(line) for line in done.stdout.split())
    assert hub != ROOT / "kernels" / "__init__.py" and "site-packages" in hub.parts
    assert own == ROOT / "kernels" / "__init__.py"

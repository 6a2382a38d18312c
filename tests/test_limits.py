"""Every number bounded and every check before the work: the table of limits reaches every numeric
option and the public API, options that need another are refused without it, names, outputs and
model fields are checked before pools, loads or sampling, and messages say what a file is."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from helpers import assert_one_line_error, run_cli
from safetensors.torch import save_file

from featinv.analysis.guided import GuidanceConfig
from featinv.analysis.optimize import OptimizeConfig
from featinv.cli import build_parser
from featinv.cli.options import walk_parsers
from featinv.errors import FeatInvError
from featinv.limits import LIMITS, within
from featinv.training.distill import DistillConfig
from featinv.training.loop import TrainConfig


def _numeric_options():
    """(command, flag, action) of every option of every command that takes a number."""
    for parser in walk_parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and (action.type in (int, float) or hasattr(action.type, "limit")):
                yield parser.prog, action.option_strings[0], action


def test_every_numeric_option_takes_its_row_of_the_table():
    numeric = list(_numeric_options())
    assert len(numeric) > 50  # the walk reaches the sub-commands' sub-commands
    bare = [f"{prog} {flag}" for prog, flag, action in numeric if action.type in (int, float)]
    assert not bare, f"options parsed by a bare int or float, with no limit: {bare}"
    for prog, flag, action in numeric:  # a default outside its own range would be refused by the API
        if action.default is not None:
            assert action.type.limit.accepts(action.default), f"{prog} {flag} default {action.default}"
    for parser in walk_parsers(build_parser()):  # no number slips in untyped, e.g. type=None with default=3
        for action in parser._actions:
            if isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
                assert hasattr(action.type, "limit"), f"{parser.prog} {action.option_strings}"
    assert all(limit.reason and limit.low <= limit.high for limit in LIMITS.values())


# One case per fault class: too large, beyond any machine integer, zero, negative, not finite,
# not a number; for counts, sizes, rates and ports alike, in several commands.
OUT_OF_RANGE = [
    (["reconstruct", "--model", "M", "--images", "a.png", "--samples", 10**9], "--samples: must be an integer in [1"),
    (["reconstruct", "--model", "M", "--images", "a.png", "--batch-size", 2**70], "--batch-size: must be an integer"),
    (["reconstruct", "--method", "guided", "--model", "M", "--images", "a.png", "--inner-steps", 10**9], "[0, 100]"),
    (["reconstruct", "--method", "optimize", "--classifier", "resnet18", "--opt-steps", 10**12], "--opt-steps"),
    (["reconstruct", "--method", "optimize", "--classifier", "resnet18", "--input-size", 0], "--input-size"),
    (["train-classifier", "--classifier", "resnet18", "--input-size", 0], "--input-size: must be an integer in [8"),
    (["train", "--model", "M", "--batch-size", 10**9], "--batch-size: must be an integer in [1, 8192]"),
    (["train", "--model", "M", "--grad-accum", -1], "--grad-accum"),
    (["train", "--model", "M", "--lr", "nan"], "--lr: must be a number in (0, 10]"),
    (["reconstruct", "--model", "M", "--images", "a.png", "--guidance", "inf"], "--guidance"),
    (
        ["reconstruct", "--model", "M", "--images", "a.png", "--steps", "ten"],
        "must be an integer in [1, 999], got 'ten'",
    ),
    (["serve", "--steps", 0], "--steps: must be an integer in [1, 999]"),
    (["serve", "--port", 70000], "--port"),
    (["data", "shapes", "--n", 10**9], "--n: must be an integer in [1, 100_000]"),
]


@pytest.mark.parametrize(
    ("command", "message"), OUT_OF_RANGE, ids=[" ".join(map(str, c[:3] + c[-2:])) for c, _ in OUT_OF_RANGE]
)
def test_an_out_of_range_number_is_one_usage_line_and_nothing_runs(capsys, tmp_path, monkeypatch, command, message):
    monkeypatch.chdir(tmp_path)  # M and a.png do not exist: the number is refused before they are looked for
    needs_out = command[0] != "serve"
    started = time.perf_counter()
    code, _, err = run_cli(capsys, *command, *(["--out", "out"] if needs_out else []))
    assert_one_line_error(code, err, message)
    assert time.perf_counter() - started < 5
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: GuidanceConfig(steps=10**9), "steps"),
        (lambda: GuidanceConfig(inner_steps=10**9), "inner_steps"),
        (lambda: GuidanceConfig(strength=float("nan")), "strength"),
        (lambda: OptimizeConfig(steps=10**12), "steps"),
        (lambda: TrainConfig(1, 1e-3, 10**9), "batch_size"),
        (lambda: TrainConfig(0, 1e-3, 8), "steps"),
        (lambda: DistillConfig(teacher_steps=0), "teacher_steps"),
    ],
)
def test_the_api_refuses_what_the_cli_refuses(make, name):
    with pytest.raises(FeatInvError, match=rf"^{name} must be an? (integer|number) in"):
        make()


def test_the_reconstructor_refuses_unbounded_counts(tiny_model):
    from featinv.pipeline import Reconstructor

    features = torch.zeros(1, *tiny_model.feature_spec.shape)
    reconstructor = Reconstructor(tiny_model)
    for options, name in (({"steps": 10**9}, "steps"), ({"batch_size": 2**70}, "batch_size")):
        with pytest.raises(FeatInvError, match=rf"^{name} must be an integer in \[1, "):
            reconstructor.reconstruct(features=features, **options)
    assert within("seed", 0) == 0


# Options that mean something only with another one.
UNMET = [
    (["train", "--model", "M", "--teacher-steps", 3], "--teacher-steps applies only with --distill"),
    (["train", "--model", "M", "--distill-target", "trajectory"], "--distill-target applies only with --distill"),
    (["train", "--preset", "shapes-demo", "--steps", 10], "--steps applies only with --model"),
    (["train", "--model", "M", "--scale", 0.5], "--scale applies only with --preset"),
    (["train", "--model", "M", "--validation-steps", 5], "--validation-steps applies only with --validate-every"),
    (["train-classifier", "--classifier", "resnet18", "--data", "folder", "--held-out", 9], "--held-out applies"),
    (["reconstruct", "--model", "M", "--images", "a.png", "--opt-steps", 9], "--opt-steps applies only with --method"),
    (["reconstruct", "--model", "M", "--images", "a.png", "--strength", 0.5], "--strength applies only with --method"),
    (
        ["reconstruct", "--model", "M", "--images", "a.png", "--layer", "layer3"],
        "--layer applies only with --classifier",
    ),
    (["reconstruct", "--model", "M", "--images", "a.png", "--sampler", "dpmpp", "--eta", 0.5], "--eta applies only"),
]


@pytest.mark.parametrize(("command", "message"), UNMET, ids=[m.split(" applies")[0] for _, m in UNMET])
def test_an_option_without_the_one_it_needs_is_refused_first(capsys, tmp_path, monkeypatch, command, message):
    monkeypatch.chdir(tmp_path)  # M does not exist: refused before the model is looked for
    code, _, err = run_cli(capsys, *command, "--out", "out")
    assert_one_line_error(code, err, message)
    assert os.listdir(tmp_path) == []


def test_a_default_typed_out_counts_as_given(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--model", tmp_path / "M", "--teacher-steps", 6, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--teacher-steps applies only with --distill")  # 6 is its default


def test_an_unknown_classifier_is_refused_before_the_pool_is_drawn(capsys, tmp_path, monkeypatch):
    import featinv.cli.training

    def no_pool(*args, **kwargs):
        raise AssertionError("the training pool was drawn before the name was checked")

    monkeypatch.setattr(featinv.cli.training, "_stream", no_pool)
    code, _, err = run_cli(capsys, "train-classifier", "--classifier", "nope_net", "--out", tmp_path / "c")
    assert_one_line_error(code, err, "unknown timm model 'nope_net'")
    bad = ["--classifier", "convnext_atto", "--classifier-kwargs", '{"dims": [-8, 16, 32, 64]}']
    code, _, err = run_cli(capsys, "train-classifier", *bad, "--out", tmp_path / "c")
    assert_one_line_error(code, err, "model_kwargs field dims=[-8, 16, 32, 64]: convnext_atto cannot be built")
    assert os.listdir(tmp_path) == []


def test_an_existing_file_as_out_is_refused_before_the_model_is_read(capsys, tmp_path, image_files):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    code, _, err = run_cli(
        capsys, "reconstruct", "--model", tmp_path / "no-model", "--images", *image_files, "--out", taken
    )
    assert_one_line_error(code, err, f"--out {taken} exists and is a file, not a folder")
    code, _, err = run_cli(
        capsys, "extract", "--model", tmp_path / "no-model", "--images", *image_files, "--out", tmp_path
    )
    assert_one_line_error(code, err, "is a folder: give a file path")
    assert taken.read_text() == "keep me"


def test_a_refused_preset_run_writes_nothing(capsys, tmp_path):
    """A feature cache that does not fit is refused before the first stage trains (it used to be
    read after the classifier's and the base's stages, leaving train_log.jsonl and checkpoints)."""
    cache = tmp_path / "cache.safetensors"
    save_file({"features": torch.zeros(2, 3, 1, 1)}, str(cache), metadata={"feature_spec": "{}", "pool": "{}"})
    code, _, err = run_cli(
        capsys,
        "train",
        "--preset",
        "shapes-demo",
        "--scale",
        0.001,
        "--features-cache",
        cache,
        "--out",
        tmp_path / "run",
    )
    assert_one_line_error(code, err, "was made for features {}")
    assert not (tmp_path / "run").exists()


BAD_KWARGS = {
    "unknown field": ({"colour": "red"}, "model_kwargs field 'colour' is not an argument of resnet18's constructor"),
    "negative size": ({"layers": [1, 1, -2, 1]}, "model_kwargs field layers=[1, 1, -2, 1]: resnet18 cannot be built"),
    "fails the probe": ({"in_chans": 1}, "model_kwargs field in_chans=1: resnet18 fails its probe pass"),
}


@pytest.mark.parametrize("case", list(BAD_KWARGS))
def test_model_kwargs_from_featinv_json_are_one_line_naming_the_field(capsys, model_dir, image_files, tmp_path, case):
    kwargs, message = BAD_KWARGS[case]
    config = json.loads((model_dir / "featinv.json").read_text())
    config["feature_spec"]["model_kwargs"] = kwargs
    (model_dir / "featinv.json").write_text(json.dumps(config))
    code, _, err = run_cli(
        capsys, "reconstruct", "--model", model_dir, "--images", *image_files, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, message)
    assert "featinv.json: feature_spec: " in err
    assert not (tmp_path / "o").exists()


def test_special_files_and_folders_are_named_as_what_they_are(capsys, model_dir, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    empty = tmp_path / "empty.safetensors"
    save_file({"features": torch.zeros(0, 256, 2, 2)}, str(empty))
    cases = [
        (fifo, "features file {} is a named pipe (FIFO), not a regular file"),
        ("/dev/zero", "features file {} is a character device, not a regular file"),
        (tmp_path, "features file {} is a folder, not a regular file"),
        (tmp_path / "none.safetensors", "features file {} not found"),
        (empty, "features file {} holds no feature maps"),
    ]
    for path, message in cases:
        code, _, err = run_cli(capsys, "reconstruct", "--model", model_dir, "--features", path, "--out", tmp_path / "o")
        assert_one_line_error(code, err, message.format(path))
    code, _, err = run_cli(
        capsys, "reconstruct", "--model", model_dir, "--images", "/dev/zero", "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, "image file /dev/zero is a character device")
    assert not (tmp_path / "o").exists()


def test_a_base_named_in_featinv_json_is_named_as_such(capsys, tmp_path, image_files):
    from sd_miniature import write_sd_miniature

    write_sd_miniature(tmp_path / "sd")
    made = ["create", "--base", tmp_path / "sd", "--classifier", "resnet18", "--layer", "layer3", "--input-size", 64]
    code, _, err = run_cli(capsys, *made, "--out", tmp_path / "m")
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "featinv.json").read_text())
    (tmp_path / "empty").mkdir()
    config["base"].update(source=str(tmp_path / "empty"), relative=None)
    (tmp_path / "m" / "featinv.json").write_text(json.dumps(config))
    code, _, err = run_cli(
        capsys, "reconstruct", "--model", tmp_path / "m", "--images", *image_files, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, f"the base {tmp_path / 'empty'} (read from {tmp_path / 'm' / 'featinv.json'})")
    assert "--base" not in err
    assert not (tmp_path / "o").exists()

"""Shared fixtures: tiny models built from config, seeded, on the CPU. Nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `python -m pytest` puts the checkout on sys.path: featinv's import keeps its kernels/ from passing
# for Hugging Face's `kernels`, which transformers imports (before any test module imports it).
import featinv  # noqa: E402, F401

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny classifiers of three timm families (and a Swin), built from config.
TINY_CLASSIFIERS = {
    "resnet": ("resnet18", {"num_classes": 10}, (3, 32, 32)),
    "convnext": ("convnext_atto", {"num_classes": 10, "dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)}, (3, 32, 32)),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"num_classes": 10, "img_size": 32, "window_size": 4, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2)},
        (3, 32, 32),
    ),
    "vit": (
        "vit_tiny_patch16_224",
        {"num_classes": 10, "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
        (3, 32, 32),
    ),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: 3 s or more on a CPU; make check leaves it out (see HEAVY)")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


# The tests that take 3 s or more each on a 2-core CPU (measured with --durations=0: 30 of 600
# tests, 75% of the suite's time). They carry the marker `heavy`; `make check` leaves them out for
# the edit-test loop, `make test` (and CI) runs everything.
HEAVY = frozenset(
    (
        "test_analysis.py::test_analysis_commands_reject_bad_input",
        "test_hybrid.py::test_refinement_raises_the_feature_cosine_over_featinvs_on_the_trained_model",
        "test_hybrid.py::test_the_command_line",
        "test_hybrid.py::test_the_server_refines_on_request_as_the_library_does",
        "test_analysis.py::test_inception_fid_equals_pytorch_fid_from_a_local_file",
        "test_analysis.py::test_steer_compose_robustness_and_evaluate_write_their_reports",
        "test_analysis_real.py::test_optimisation_inversion_of_a_cat_is_a_cat",
        "test_analysis_real.py::test_steering_along_a_class_direction_raises_its_probability",
        "test_analysis_real.py::test_the_optimisation_baseline_through_the_cli_at_224_px_without_a_model",
        "test_bench_gpu.py::test_the_smoke_run_measures_every_cpu_backend",
        "test_bench_webapp.py::test_the_concurrent_clients_mode_reports_both_modes_side_by_side",
        "test_bench_webapp.py::test_the_previews_mode_times_both_ways_in_one_run",
        "test_bench_webapp.py::test_the_smoke_run_times_both_models_and_records_a_failed_backend",
        "test_cli.py::test_entry_point_exit_code_and_help",
        "test_distill.py::test_the_distillation_loss_falls_and_resumes_exactly",
        "test_distributed.py::test_sharded_reconstruction_over_two_processes_equals_one",
        "test_distributed.py::test_the_demo_merges_the_shares_of_two_processes",
        "test_distributed.py::test_two_process_ddp_training_ends_with_identical_weights",
        "test_export.py::test_the_dynamo_exporter_gives_the_same_denoiser",
        "test_fast_path.py::test_fast_step_equals_the_eager_loop_on_cpu",
        "test_fast_pieces.py::test_a_compiled_piece_equals_the_eager_one_and_follows_its_inputs",
        "test_fast_pieces.py::test_the_compiled_fast_path_equals_the_eager_loop_at_two_step_counts",
        "test_hardening.py::test_info_and_upload_answer_while_reconstructions_are_queued",
        "test_hardening.py::test_the_servers_memory_of_images_is_bounded_and_docs_are_off",
        "test_kernels.py::test_upsample_conv3x3_matches_the_reference",
        "test_readme.py::test_the_readme_code_blocks_run_at_a_tiny_scale",
        "test_readme.py::test_the_recipe_of_the_shipped_weights_runs_at_a_tiny_scale",
        "test_real_model_path.py::test_create_reads_the_text_encoder_and_refers_to_the_base",
        "test_real_model_path.py::test_reconstruct_samples_and_pooled_evaluate_and_onnx",
        "test_real_model_path.py::test_the_web_app_serves_a_layer3_model",
        "test_reference_equivalence.py::test_trained_tiny_model_matches_the_recipe_to_1e_5",
        "test_source_tree.py::test_an_uninstalled_source_tree_imports_the_kernels",
        "test_training.py::test_the_shapes_demo_preset_trains_and_resumes_to_the_same_models",
        "test_twin_encoder.py::test_the_compiled_twin_fast_path_equals_the_eager_loop",
        "test_webapp.py::test_the_explorer_first_impression_cancelling_and_painted_cells",
    )
)


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.nodeid.split("[")[0].removeprefix("tests/") in HEAVY:
            item.add_marker(pytest.mark.heavy)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def make_extractor(family: str = "resnet", layer=None, mode: str = "spatial"):
    from featinv.features import FeatureExtractor

    name, kwargs, input_size = TINY_CLASSIFIERS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FeatureExtractor(name, layer, mode=mode, model_kwargs=kwargs, input_size=input_size)


def make_model(extractor=None, seed: int = 0, **overrides):
    from featinv.models import FeatInvModel

    extractor = extractor if extractor is not None else make_extractor("resnet", "layer3")
    model = FeatInvModel.from_preset("micro", extractor, seed=seed, **overrides)
    # A trained hint encoder is not zero at its output; give it weights so the condition matters.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        torch.nn.init.normal_(model.controlnet.hint_encoder.conv_out.weight, std=0.05)
        for block in model.controlnet.controlnet.controlnet_down_blocks:
            torch.nn.init.normal_(block.weight, std=0.05)
        torch.nn.init.normal_(model.controlnet.controlnet.controlnet_mid_block.weight, std=0.05)
    return model.eval()


@pytest.fixture
def tiny_extractor():
    return make_extractor("resnet", "layer3")


@pytest.fixture
def tiny_model(tiny_extractor):
    return make_model(tiny_extractor)


@pytest.fixture
def tiny_images():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 32, 32, generator=generator)


# The CLI tests' model folder and image files, for every test module.
@pytest.fixture
def model_dir(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def image_files(tmp_path):
    from PIL import Image

    paths = []
    for i, size in enumerate([(32, 32), (40, 28)]):
        path = tmp_path / f"img{i}.png"
        Image.effect_noise(size, 60 + 20 * i).convert("RGB").save(path)
        paths.append(str(path))
    return paths

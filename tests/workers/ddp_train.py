"""Run by tests/test_distributed.py, alone or under torchrun: train the tiny ControlNet a few steps
(data-parallel through accelerate when there are several processes) and save this rank's weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_extractor, make_model  # noqa: E402

from featinv.data.streams import ShapesStream  # noqa: E402
from featinv.distributed import process_state  # noqa: E402
from featinv.training.feature_cache import OnlineFeatures  # noqa: E402
from featinv.training.loop import TrainConfig  # noqa: E402
from featinv.training.train import train_controlnet  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    extractor = make_extractor("resnet", "layer3")
    model = make_model(extractor)
    stream = ShapesStream(pool_size=48, seed=3, device=torch.device("cpu"), size=16)
    config = TrainConfig(steps=3, lr=1e-3, batch_size=4, grad_accum=2)
    train_controlnet(model, OnlineFeatures(extractor), stream, config, seed=5)
    state = process_state()
    name = f"rank{state.process_index}-of-{state.num_processes}.safetensors"
    save_file(model.controlnet.state_dict(), str(out / name))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

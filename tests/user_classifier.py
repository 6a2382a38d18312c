"""A user's own classifier for the ``module`` feature source's tests: ``featinv create
--classifier-module tests/user_classifier.py:tiny_convnet``. Importing it writes the file named by
``FEATINV_TEST_IMPORT_MARK`` (when set), so that a test can tell whether featinv imported it."""

import os
from pathlib import Path

from torch import nn

if os.environ.get("FEATINV_TEST_IMPORT_MARK"):
    Path(os.environ["FEATINV_TEST_IMPORT_MARK"]).write_text("imported")


def tiny_convnet(num_classes: int = 6, width: int = 8) -> nn.Module:
    """A small CNN: ``features`` (stride 4) then ``pool`` and ``head`` (a linear layer)."""
    return _TinyConvNet(num_classes, width)


class _TinyConvNet(nn.Module):
    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))

"""The shared input checks of featinv.errors."""

from __future__ import annotations

import pytest

from featinv.errors import FeatInvError, require_positive_int


@pytest.mark.parametrize("value", [0, -3, 1.5, 2.0, True, "4", None])
def test_require_positive_int_names_the_argument_and_the_value(value):
    with pytest.raises(FeatInvError, match=rf"^max_graphs must be a positive integer, got {value!r}$"):
        require_positive_int("max_graphs", value)


def test_require_positive_int_returns_what_it_accepts():
    assert require_positive_int("batch_size", 1) == 1 and require_positive_int("batch_size", 64) == 64

"""LatencyShape: parsing, formatting, JSON form, checks."""

from __future__ import annotations

import argparse

import pytest

from flextron.latency.shape import DEFAULT_SHAPE, LatencyShape, shape_argument


def test_parse_and_format_round_trip() -> None:
    shape = LatencyShape.parse("decode:4x512")
    assert shape == LatencyShape("decode", 4, 512)
    assert str(shape) == "decode:4x512"
    assert LatencyShape.parse(str(DEFAULT_SHAPE)) == DEFAULT_SHAPE == LatencyShape("prefill", 1, 128)
    assert LatencyShape.parse("prefill:2X16") == LatencyShape("prefill", 2, 16)  # either case of x


@pytest.mark.parametrize("text", ["prefill-1x128", "prefill:1x", "prefill:ax2", "train:1x128", "decode:0x4"])
def test_parse_names_the_expected_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"PHASE:BATCHxLENGTH|prefill:1x128"):
        LatencyShape.parse(text)
    with pytest.raises(argparse.ArgumentTypeError, match="latency shape must"):
        shape_argument(text)


def test_json_form_and_tokens_per_sequence() -> None:
    shape = LatencyShape("decode", 1, 64)
    assert shape.to_dict() == {"phase": "decode", "batch": 1, "length": 64}
    assert LatencyShape.from_dict(shape.to_dict()) == shape
    assert shape.tokens == 65  # the context and the decoded token
    assert LatencyShape("prefill", 2, 16).tokens == 16


def test_a_shape_is_a_checked_hashable_value() -> None:
    with pytest.raises(ValueError, match="phase must be one of"):
        LatencyShape("train", 1, 16)
    with pytest.raises(ValueError, match="must be positive"):
        LatencyShape("prefill", 1, 0)
    assert len({LatencyShape("prefill", 1, 16), LatencyShape("prefill", 1, 16)}) == 1
    with pytest.raises(AttributeError):
        LatencyShape().batch = 2  # type: ignore[misc]

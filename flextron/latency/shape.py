"""LatencyShape: the input shape a latency (and a latency budget) refers to."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flextron.model.requests import check_context

if TYPE_CHECKING:
    from flextron.model.elastic_model import FlextronModel

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class LatencyShape:
    """One forward's shape: prefill of `batch` sequences of `length` tokens, or decode of one
    new token per sequence against a KV cache of `length` (the context).

    Written as PHASE:BATCHxLENGTH ("prefill:1x128", "decode:4x512"); stored in JSON files as
    {"phase", "batch", "length"}.
    """

    phase: str = "prefill"
    batch: int = 1
    length: int = 128

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.batch < 1 or self.length < 1:
            raise ValueError(
                f"batch and length must be positive, got batch={self.batch}, length={self.length}"
            )

    @classmethod
    def parse(cls, text: str) -> LatencyShape:
        """ "prefill:1x128" -> LatencyShape("prefill", 1, 128); ValueError naming the expected form."""
        try:
            phase, sizes = text.split(":")
            batch, length = (int(s) for s in sizes.lower().split("x"))
        except ValueError as error:
            raise ValueError(
                f"latency shape must look like prefill:1x128 or decode:4x512, got {text!r}"
            ) from error
        if phase not in PHASES or batch < 1 or length < 1:
            raise ValueError(f"latency shape must be PHASE:BATCHxLENGTH with PHASE in {PHASES}, got {text!r}")
        return cls(phase, batch, length)

    def __str__(self) -> str:
        return f"{self.phase}:{self.batch}x{self.length}"

    @property
    def tokens(self) -> int:
        """Token ids one timed forward needs per sequence (decode: the context and the new token)."""
        return self.length if self.phase == "prefill" else self.length + 1

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "batch": self.batch, "length": self.length}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyShape:
        return cls(data["phase"], int(data["batch"]), int(data["length"]))


DEFAULT_SHAPE = LatencyShape()


def shape_argument(text: str) -> LatencyShape:
    """argparse type of --latency-shape: a one-line error naming the expected form."""
    try:
        return LatencyShape.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def check_latency_shape(model: FlextronModel, shape: LatencyShape | None) -> None:
    """A latency shape within the model's context (a decode step adds one token)."""
    if shape is not None:
        check_context(model, "--latency-shape length", shape.length, int(shape.phase == "decode"))

"""`python -m flextron.ops.info`: the build facts, the CPU's instruction sets, and bf16_is_fast."""

from __future__ import annotations

from pathlib import Path

import torch

from flextron.ops.extension import _C
from flextron.ops.info import bf16_is_fast, build_info, format_info
from flextron.train.demo_training import demo_config

FEATURES = {"avx2_fma", "avx512bw", "avx512_bf16", "avx512_vnni"}


def test_cpu_features_agree_with_the_kernel_that_reads_them() -> None:
    features = _C.cpu_features()
    assert set(features) == FEATURES and all(isinstance(v, bool) for v in features.values())
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else None
    if flags is not None and features["avx512_bf16"]:
        assert "avx512_bf16" in flags  # the kernel's check and the OS report agree


def test_info_lists_the_cpu_features_and_every_op() -> None:
    info = build_info()
    text = format_info(info)
    assert info["cpu_features"] == _C.cpu_features()
    assert "CPU features" in text and all(name in text for name in info["ops"])


def test_bf16_is_fast_where_the_cpu_has_avx512_bf16() -> None:
    assert bf16_is_fast("cpu") == _C.cpu_features()["avx512_bf16"]
    assert not bf16_is_fast("meta")
    # The demo trains in bf16 exactly where it is fast.
    assert demo_config(4).bf16 == bf16_is_fast("cpu")
    if torch.cuda.is_available():
        assert bf16_is_fast("cuda") == torch.cuda.is_bf16_supported()

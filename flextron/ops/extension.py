"""Imports the compiled extension flextron._C with a helpful message when it is missing."""

try:
    from flextron import _C
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "flextron._C is not built. Build it with `pip install -e . --no-build-isolation` "
        "(FLEXTRON_CUDA=0 skips the CUDA kernels), or run `make test`."
    ) from error

__all__ = ["_C"]

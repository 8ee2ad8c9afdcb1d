"""Router files in a model directory: routers.safetensors (tensors) and routers.json (settings).

routers.json: {"routers": {kind: Router.settings()}, "latency_shape": LatencyShape.to_dict()}:
what rebuilds each router with the model's config, and the shape its latency budgets refer to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flextron.latency.shape import LatencyShape
from flextron.model.config import ModelConfig
from flextron.routers.base import Router
from flextron.routers.dynamic import DynamicRouter
from flextron.routers.sequence import SequenceRouter
from flextron.routers.static import StaticRouter

ROUTERS_FILE, ROUTERS_META_FILE = "routers.safetensors", "routers.json"
AnyRouter = Router | SequenceRouter
ROUTER_KINDS: dict[str, type[AnyRouter]] = {
    cls.kind: cls for cls in (StaticRouter, DynamicRouter, SequenceRouter)
}


def save_routers(
    path: str | os.PathLike, routers: dict[str, AnyRouter], latency_shape: LatencyShape | None = None
) -> None:
    """Write routers ({"static": ..., "dynamic": ..., "sequence": ...}) into a model directory,
    replacing the files.

    latency_shape: the LUT shape that the routers' latency budgets refer to.
    """
    from flextron.io.atomic import save_safetensors_atomic, write_json_atomic

    for kind in routers:
        if kind not in ROUTER_KINDS:
            raise ValueError(f"router kind must be one of {sorted(ROUTER_KINDS)}, got {kind!r}")
    path = Path(path)
    tensors = {f"{kind}.{name}": t for kind, r in routers.items() for name, t in r.state_dict().items()}
    save_safetensors_atomic(path / ROUTERS_FILE, tensors)
    meta = {kind: r.settings() for kind, r in routers.items()}
    shape = None if latency_shape is None else latency_shape.to_dict()
    write_json_atomic(path / ROUTERS_META_FILE, {"routers": meta, "latency_shape": shape})


def load_routers(
    path: str | os.PathLike, config: ModelConfig
) -> tuple[dict[str, AnyRouter], LatencyShape | None]:
    """({kind: router}, latency shape) from a model directory; ({}, None) when it has none."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ROUTERS_META_FILE).is_file():
        return {}, None
    try:
        meta = json.loads((path / ROUTERS_META_FILE).read_text())
        tensors = load_file(path / ROUTERS_FILE)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable router files ({error})") from error
    routers = {}
    for kind, settings in meta["routers"].items():
        router = ROUTER_KINDS[kind](config, **settings)
        prefix = f"{kind}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        # Routers saved before the per-budget biases existed load with zero biases.
        missing, unexpected = router.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"mlp_bias", "head_bias"}:
            raise ValueError(
                f"{path / ROUTERS_FILE}: {kind} router tensors do not match its settings "
                f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
            )
        routers[kind] = router.eval()
    shape = meta.get("latency_shape")
    return routers, None if shape is None else LatencyShape.from_dict(shape)

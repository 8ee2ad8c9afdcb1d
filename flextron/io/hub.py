"""Model sources by Hugging Face hub id.

`resolve_model_dir("HuggingFaceTB/SmolLM2-135M")` returns the local snapshot directory:
from the hub cache when it holds one (HF_HUB_OFFLINE=1 uses the cache only), else
downloaded into it by huggingface_hub.  Only safetensors, JSON and tokenizer files are
fetched; nothing runs remote code.
"""

from __future__ import annotations

import re
from pathlib import Path

# What a model directory needs: config, weights, tokenizer, Flextron's extras (latency, routers).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(source: str) -> bool:
    """ORG/NAME that is not a local path."""
    return bool(_HUB_ID.match(source)) and not Path(source).exists()


def resolve_model_dir(
    source: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> str:
    """A local path unchanged; a hub id ORG/NAME -> its snapshot directory in the hub cache.

    FileNotFoundError when the hub id is not cached and cannot be downloaded (offline, no
    network, unknown repository).
    """
    if not is_hub_id(source):
        return source
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(
            source,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=bool(local_files_only),
            allow_patterns=HUB_FILES,
        )
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as error:
        raise FileNotFoundError(
            f"model {source!r} is neither a local path nor a hub id found in the Hugging Face cache "
            f"or on the hub ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error

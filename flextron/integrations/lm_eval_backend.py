"""lm-evaluation-harness backend: `--model flextron` evaluates one sub-network.

    flextron-lm-eval --model flextron \\
        --model_args pretrained=runs/smollm2-flextron,budget=0.5 --tasks hellaswag --device cpu

`pretrained` is a Flextron directory or hub id; `budget`, `latency_ms` (with
`routing=` and `latency_shape=`) or `arch` (a JSON configuration file) pick the
sub-network, as in `flextron generate`; every other argument is lm-eval's `hf`
backend's (dtype, batch_size, max_length, ...).  The model is transformers'
`FlextronForCausalLM` (flextron.integrations.hf_model) run by lm-eval's Hugging Face backend, so
loglikelihood, loglikelihood_rolling and generate_until batch as they do for `--model hf`.

lm-eval discovers no third-party backends on its own: importing this module registers
"flextron" (for `lm_eval.simple_evaluate(model="flextron", ...)`), and `flextron-lm-eval`
(or `python -m flextron.integrations.lm_eval_backend`) is the `lm_eval` command with it registered.
"""

from __future__ import annotations

from pathlib import Path

import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype

from flextron.integrations.hf_model import FlextronConfig, FlextronForCausalLM
from flextron.io.hub import resolve_model_dir

# Small offline tasks (a local JSONL) exercising every request type: --include_path TASKS_DIR
# --tasks flextron_tiny_choice,flextron_tiny_rolling,flextron_tiny_generate
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")


@register_model("flextron")
class FlextronLM(HFLM):
    """lm-eval's HFLM on a FlextronForCausalLM view at the requested sub-network."""

    AUTO_MODEL_CLASS = transformers.AutoModelForCausalLM

    def __init__(
        self,
        pretrained: str,
        budget: float | None = None,
        latency_ms: float | None = None,
        routing: str = "auto",
        arch: str | None = None,
        latency_shape: str | None = None,
        **kwargs,
    ) -> None:
        if not isinstance(pretrained, str):
            raise TypeError("--model flextron takes pretrained=DIR or a hub id ORG/NAME")
        if kwargs.get("trust_remote_code"):
            raise ValueError("--model flextron runs no remote code: leave trust_remote_code unset")
        if routing in ("dynamic", "sequence") and str(kwargs.get("batch_size", 1)) != "1":
            # Their per-sequence choices read whole prompts: padding would change them.
            raise ValueError(f"{routing} routing evaluates one sequence at a time: use --batch_size 1")
        # Read by _create_model, which HFLM.__init__ calls.
        self._choice = {
            "budget": budget,
            "latency_ms": latency_ms,
            "routing": routing,
            "arch": arch,
            "latency_shape": latency_shape,
        }
        super().__init__(pretrained=resolve_model_dir(pretrained), backend="causal", **kwargs)

    def _get_config(self, pretrained: str, **kwargs) -> None:
        # The Flextron config directly: directories written before config.json named its
        # model_type load too.
        self._config = FlextronConfig.from_pretrained(pretrained)

    def _create_model(self, pretrained: str, **kwargs) -> None:
        self._model = FlextronForCausalLM.from_pretrained(
            pretrained, dtype=get_dtype(kwargs.get("dtype", "auto")), device_map=kwargs.get("device_map")
        )
        choice = self._choice
        if (
            choice["arch"] is not None
            or choice["budget"] is not None
            or choice["latency_ms"] is not None
            or choice["routing"] != "auto"
        ):
            self._model = self._model.at(**choice)


def main() -> None:
    """The `lm_eval` command line, with the flextron backend registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

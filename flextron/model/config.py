"""Model and sub-network configurations.

`ModelConfig` describes the full (dense) decoder and maps to and from a Hugging Face
config.json.  `ArchConfig` picks one nested sub-network: per layer, the MLP width (a
prefix of the importance-sorted neurons) and the number of query heads (a prefix of the
importance-sorted heads).  `arch_for_budget` is the uniform budget rule used until a
router exists.

Head-choice rule for GQA: query head h reads KV head h // group (group = heads per KV
head), so a prefix of query heads fills KV groups one after the other.  Conversion ranks
whole KV groups (and the query heads within each group), and the allowed head counts are
whole groups: multiples of `group`.  Dropping a group also drops its K/V projections, so
a smaller head count saves compute in q, k, v and o alike.  For MHA (group = 1) every
count from 1 to num_heads is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Hugging Face model types whose checkpoints map onto our decoder one to one.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_position_embeddings",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _hf_field(hf: dict[str, Any], name: str, check, expected: str, default: Any = dataclasses.MISSING) -> Any:
    """A Hugging Face config field, checked: ValueError naming the field when missing or mistyped."""
    if name not in hf or hf[name] is None:
        if default is dataclasses.MISSING:
            raise ValueError(f"field {name!r} is missing")
        return default
    if not check(hf[name]):
        raise ValueError(f"field {name!r} must be {expected}, got {hf[name]!r}")
    return hf[name]


@dataclass
class ModelConfig:
    """The full decoder (Llama family: RMSNorm, RoPE, GQA, SwiGLU)."""

    # ---- sizes
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    # ---- numerics
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF rope_parameters minus rope_theta: {"rope_type": ..., "factor": ..., ...}
    rope_scaling: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    # ---- structure
    model_type: str = "llama"  # the Hugging Face family it came from (its class on export)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v_proj (Llama attention_bias, Qwen2)
    o_bias: bool = False  # bias on o_proj (Llama attention_bias only)
    mlp_bias: bool = False
    # ---- tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # ---- heterogeneous exports: per-layer sizes (None: every layer has the full sizes)
    layer_intermediate_sizes: list[int] | None = None
    layer_num_heads: list[int] | None = None

    def __post_init__(self) -> None:
        for name in SIZE_FIELDS:
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
            if value is not None and not all(_is_int(i) for i in ids):
                raise ValueError(f"ModelConfig.{name} must be a token id (or null), got {value!r}")
        if not isinstance(self.rope_scaling, dict) or not isinstance(
            self.rope_scaling.get("rope_type", "default"), str
        ):
            raise ValueError(
                f"ModelConfig.rope_scaling must be an object with a string rope_type, got "
                f"{self.rope_scaling!r}"
            )
        for name in ("layer_intermediate_sizes", "layer_num_heads"):
            sizes = getattr(self, name)
            if sizes is not None and (not isinstance(sizes, list) or not all(_is_int(v) for v in sizes)):
                raise ValueError(f"ModelConfig.{name} must be a list of integers (or null), got {sizes!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        for name, limit, step in (
            ("layer_intermediate_sizes", self.intermediate_size, 1),
            ("layer_num_heads", self.num_heads, self.group_size),
        ):
            sizes = getattr(self, name)
            if sizes is None:
                continue
            if len(sizes) != self.num_layers or any(not 0 < s <= limit or s % step for s in sizes):
                raise ValueError(
                    f"ModelConfig.{name} must list {self.num_layers} sizes in (0, {limit}], "
                    f"multiples of {step}; got {sizes}"
                )
            setattr(self, name, [int(s) for s in sizes])
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"ModelConfig.model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}"
            )
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE scaling {rope_type!r}; supported: {ROPE_TYPES}")

    # ---- derived sizes

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def layer_intermediate_size(self, layer: int) -> int:
        """d_ff of one layer (smaller than intermediate_size in heterogeneous exports)."""
        sizes = self.layer_intermediate_sizes
        return self.intermediate_size if sizes is None else sizes[layer]

    def layer_heads(self, layer: int) -> int:
        """Query heads of one layer (a whole number of KV groups)."""
        return self.num_heads if self.layer_num_heads is None else self.layer_num_heads[layer]

    def layer_kv_heads(self, layer: int) -> int:
        return self.layer_heads(layer) // self.group_size

    @property
    def mlp_granularity(self) -> int:
        """Step between allowed MLP widths: 64 (kernel alignment) where d_ff allows it."""
        for step in (64, 32, 16, 8):
            if self.intermediate_size % step == 0 and self.intermediate_size >= 2 * step:
                return step
        return 1

    def mlp_choices(self, layer: int = 0) -> list[int]:
        """Allowed MLP widths of a layer, ascending: multiples of mlp_granularity, and d_ff."""
        size = self.layer_intermediate_size(layer)
        return sorted(set(range(self.mlp_granularity, size + 1, self.mlp_granularity)) | {size})

    def head_choices(self, layer: int = 0) -> list[int]:
        """Allowed query-head counts of a layer, ascending: whole KV groups."""
        return list(range(self.group_size, self.layer_heads(layer) + 1, self.group_size))

    # ---- Hugging Face config.json

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face config.json dict (llama, mistral or qwen2); ValueError naming the
        field that is missing or of the wrong type."""
        if not isinstance(hf, dict):
            raise ValueError(f"expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture model_type={model_type!r} "
                f"(architectures={hf.get('architectures')}); supported: {SUPPORTED_MODEL_TYPES}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: the Llama-family decoder uses silu (SwiGLU)")
        if hf.get("sliding_window") and hf.get("use_sliding_window", model_type == "mistral"):
            raise ValueError("sliding-window attention is not supported")

        def size(name: str, default: Any = dataclasses.MISSING) -> int:
            return _hf_field(hf, name, lambda v: _is_int(v) and v > 0, "a positive integer", default)

        def number(name: str, default: float) -> float:
            return float(
                _hf_field(
                    hf, name, lambda v: _is_number(v) and 0 < v < math.inf, "a positive number", default
                )
            )

        def flag(name: str) -> bool:
            return _hf_field(hf, name, lambda v: isinstance(v, bool), "true or false", False)

        heads, hidden = size("num_attention_heads"), size("hidden_size")
        # Old configs: rope_theta + rope_scaling; transformers >= 5: rope_parameters.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            name = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
            raise ValueError(f"field {name!r} must be an object or null, got {rope!r}")
        rope = dict(rope)
        rope_theta = rope.pop("rope_theta", number("rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        attention_bias = flag("attention_bias")
        return cls(
            vocab_size=size("vocab_size"),
            hidden_size=hidden,
            intermediate_size=size("intermediate_size"),
            num_layers=size("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=size("num_key_value_heads", heads),
            head_dim=size("head_dim", hidden // heads),
            max_position_embeddings=size("max_position_embeddings", 2048),
            rms_norm_eps=number("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope,
            model_type=model_type,
            tie_word_embeddings=flag("tie_word_embeddings"),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=flag("mlp_bias"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face config.json dict for the source family's class: LlamaForCausalLM,
        MistralForCausalLM or Qwen2ForCausalLM (explicit head_dim, which sub-networks need)."""
        if self.layer_intermediate_sizes is not None or self.layer_num_heads is not None:
            raise ValueError("a Hugging Face config cannot express per-layer sizes (export Flextron or GGUF)")
        biases = (self.qkv_bias, self.o_bias, self.mlp_bias)
        expressible = {  # which bias layouts each family's class has
            "llama": self.qkv_bias == self.o_bias,
            "mistral": not any(biases),
            "qwen2": biases == (True, False, False),
        }
        if not expressible[self.model_type]:
            raise ValueError(
                f"a {self.model_type} config cannot express these biases "
                f"(q/k/v {self.qkv_bias}, o_proj {self.o_bias}, MLP {self.mlp_bias})"
            )
        rope = {"rope_theta": self.rope_theta, **self.rope_scaling}
        config = {
            "architectures": [HF_CLASSES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": None if rope["rope_type"] == "default" else dict(self.rope_scaling),
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            config.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        else:  # Mistral and Qwen2 read sliding-window settings; conversion refuses sliding windows
            config.update(sliding_window=None, use_sliding_window=False)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """From to_dict's form; ValueError naming a missing, unknown or mistyped field."""
        if not isinstance(data, dict):
            raise ValueError(f"ModelConfig: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        missing = [name for name in SIZE_FIELDS[:-1] if name not in data]
        if missing:
            raise ValueError(f"ModelConfig: missing fields {missing}")
        if "model_type" not in data and data.get("qkv_bias") and not data.get("o_bias"):
            data = {**data, "model_type": "qwen2"}  # saved before the family was recorded
        return cls(**data)


@dataclass(frozen=True)
class ArchConfig:
    """One sub-network: per layer, the MLP width and the number of query heads."""

    mlp_widths: tuple[int, ...]
    heads: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_widths", tuple(int(w) for w in self.mlp_widths))
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        if len(self.mlp_widths) != len(self.heads):
            raise ValueError(
                f"ArchConfig: {len(self.mlp_widths)} MLP widths but {len(self.heads)} head counts"
            )

    @classmethod
    def full(cls, config: ModelConfig) -> ArchConfig:
        layers = range(config.num_layers)
        return cls(
            tuple(config.layer_intermediate_size(i) for i in layers),
            tuple(config.layer_heads(i) for i in layers),
        )

    @classmethod
    def uniform(cls, config: ModelConfig, mlp_width: int, heads: int) -> ArchConfig:
        arch = cls((mlp_width,) * config.num_layers, (heads,) * config.num_layers)
        arch.validate(config)
        return arch

    def validate(self, config: ModelConfig) -> None:
        """Raise ValueError unless this configuration fits `config`."""
        if len(self.mlp_widths) != config.num_layers:
            raise ValueError(f"ArchConfig has {len(self.mlp_widths)} layers, the model {config.num_layers}")
        for layer, (width, heads) in enumerate(zip(self.mlp_widths, self.heads, strict=True)):
            size, most = config.layer_intermediate_size(layer), config.layer_heads(layer)
            if not 0 < width <= size:
                raise ValueError(f"ArchConfig layer {layer}: MLP width {width} outside (0, {size}]")
            if not 0 < heads <= most:
                raise ValueError(f"ArchConfig layer {layer}: {heads} heads outside [1, {most}]")

    def widest_layer(self, config: ModelConfig) -> ArchConfig:
        """The uniform configuration at this one's largest MLP width and head count."""
        return ArchConfig.uniform(config, max(self.mlp_widths), max(self.heads))

    @property
    def is_uniform(self) -> bool:
        return len(set(self.mlp_widths)) <= 1 and len(set(self.heads)) <= 1

    def summary(self) -> str:
        """One line for people: "MLP 704, heads 6", or the ranges of a per-layer configuration."""
        if self.is_uniform:
            return f"MLP {self.mlp_widths[0]}, heads {self.heads[0]}"
        return (
            f"per-layer MLP {min(self.mlp_widths)}-{max(self.mlp_widths)}, "
            f"heads {min(self.heads)}-{max(self.heads)}"
        )

    def to_dict(self) -> dict[str, list[int]]:
        return {"mlp_widths": list(self.mlp_widths), "heads": list(self.heads)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        if not isinstance(data, dict):
            raise ValueError(f"ArchConfig: expected an object with mlp_widths and heads, got {data!r}")
        missing = {"mlp_widths", "heads"} - set(data)
        if missing:
            raise ValueError(f"ArchConfig: missing {sorted(missing)}")
        for name in ("mlp_widths", "heads"):
            values = data[name]
            # Whole numbers only: a fractional width would be silently truncated.
            if not isinstance(values, list) or not values or not all(_is_int(v) for v in values):
                raise ValueError(f"ArchConfig.{name} must be a non-empty list of integers, got {values!r}")
        return cls(tuple(data["mlp_widths"]), tuple(data["heads"]))


def _nearest(choices: list[int], target: float) -> int:
    # Nearest allowed value; ties go to the larger (the better-quality) choice.
    return min(choices, key=lambda c: (abs(c - target), -c))


# The budgets below the full model that a model is prepared for by default: each gets a chosen
# configuration (flextron.model.budget_configs) and is trained (flextron.train).
DEFAULT_BUDGETS = (0.25, 0.5, 0.75)
# The budgets measured and reported by default, the full model first.
REPORTED_BUDGETS = (1.0, 0.75, 0.5, 0.25)


def check_budget(budget: float) -> float:
    """Raise ValueError unless 0 < budget <= 1."""
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}")
    return float(budget)


def attention_weights(config: ModelConfig, heads: int) -> int:
    # q, k, v, o weight entries of one layer running `heads` query heads (whole groups).
    q_out = heads * config.head_dim
    kv_out = math.ceil(heads / config.group_size) * config.head_dim
    return config.hidden_size * (2 * q_out + 2 * kv_out)


def arch_for_budget(config: ModelConfig, budget: float) -> ArchConfig:
    """The uniform configuration for `budget`: a fraction in (0, 1] of each layer's weights.

    Every layer gets the allowed head count (whole KV groups) nearest budget * num_heads,
    then the allowed MLP width that brings the layer's attention + MLP weights nearest
    budget * the full layer's; ties go to the larger choice.  The layers' compute then
    scales with the budget.  SmolLM2 (d_ff 1536, 9 heads in 3 groups): 0.75 -> (MLP 1216,
    6 heads), 0.5 -> (704, 6), 0.25 -> (320, 3).  In a heterogeneous export, each layer's
    own sizes are the full ones.
    """
    budget = check_budget(budget)
    widths, head_counts = [], []
    for layer in range(config.num_layers):
        heads = _nearest(config.head_choices(layer), budget * config.layer_heads(layer))
        full = attention_weights(config, config.layer_heads(layer))
        full += 3 * config.hidden_size * config.layer_intermediate_size(layer)
        mlp_share = budget * full - attention_weights(config, heads)
        widths.append(_nearest(config.mlp_choices(layer), mlp_share / (3 * config.hidden_size)))
        head_counts.append(heads)
    return ArchConfig(tuple(widths), tuple(head_counts))


def layer_weights(config: ModelConfig, arch: ArchConfig) -> int:
    """Attention and MLP weight entries of the layers that `arch` runs (what a budget counts)."""
    return sum(
        attention_weights(config, heads) + 3 * config.hidden_size * width
        for width, heads in zip(arch.mlp_widths, arch.heads, strict=True)
    )


def count_parameters(config: ModelConfig, arch: ArchConfig | None = None) -> int:
    """Parameters the sub-network `arch` uses (embeddings counted once when tied)."""
    arch = arch or ArchConfig.full(config)
    d, hd, group = config.hidden_size, config.head_dim, config.group_size
    total = config.vocab_size * d * (1 if config.tie_word_embeddings else 2) + d  # embeddings, final norm
    for width, heads in zip(arch.mlp_widths, arch.heads, strict=True):
        kv_heads = math.ceil(heads / group)
        q_out, kv_out = heads * hd, kv_heads * hd
        total += 2 * d  # the two RMSNorms
        total += d * (q_out + 2 * kv_out) + q_out * d  # q, k, v, o
        total += (q_out + 2 * kv_out) * config.qkv_bias + d * config.o_bias
        total += 3 * d * width + (2 * width + d) * config.mlp_bias
    return total

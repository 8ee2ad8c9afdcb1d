"""Flextron as a Hugging Face model: `FlextronConfig` and `FlextronForCausalLM`.

Importing `flextron` registers both with transformers' Auto classes, so a Flextron
directory (or hub id) loads like any causal LM, without remote code:

    import flextron
    from transformers import AutoModelForCausalLM, pipeline

    model = AutoModelForCausalLM.from_pretrained("runs/smollm2-flextron")  # the full model
    half = model.at(0.5)                     # a view at budget 0.5, sharing the weights
    fast = model.at(latency_ms=20)           # from the latency table (flextron profile)
    pipe = pipeline("text-generation", model=half, tokenizer=half.tokenizer)

The view runs the wrapped `FlextronModel` (its kernels) on its sub-network.  Padded
batches (attention_mask) and transformers' caches are supported, so `generate` batches
left-padded prompts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from flextron.latency.shape import LatencyShape
from flextron.model.checkpoint import FORMAT, VERSION, save_pretrained
from flextron.model.config import ArchConfig, ModelConfig
from flextron.model.elastic_model import FlextronModel
from flextron.model.objectives import next_token_cross_entropy
from flextron.routers import BudgetResolver, Selection

MODEL_TYPE = "flextron"

# Loader arguments transformers and its pipelines pass along that do not apply here.
_IGNORED_LOAD_ARGS = {
    "trust_remote_code",
    "use_safetensors",
    "low_cpu_mem_usage",
    "attn_implementation",
    "proxies",
    "force_download",
    "adapter_kwargs",
    "subfolder",
}


class FlextronConfig(PretrainedConfig):
    """A Flextron directory's config.json: {"format", "version", "model": ModelConfig fields}.

    The usual transformers attributes (vocab_size, num_hidden_layers, ...) mirror the full
    model's sizes, for code that reads them (generation, lm-eval).
    """

    model_type = MODEL_TYPE

    def __init__(
        self, model: dict | None = None, format: str = FORMAT, version: int = VERSION, **kwargs
    ) -> None:
        self.model = model
        self.format, self.version = format, version
        self.use_cache = kwargs.pop("use_cache", True)
        if model is not None:
            config = ModelConfig.from_dict(model)
            self.vocab_size, self.hidden_size = config.vocab_size, config.hidden_size
            self.num_hidden_layers, self.num_attention_heads = config.num_layers, config.num_heads
            self.num_key_value_heads, self.head_dim = config.num_kv_heads, config.head_dim
            self.intermediate_size = config.intermediate_size
            self.max_position_embeddings = config.max_position_embeddings
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                kwargs.setdefault(name, getattr(config, name))
        super().__init__(**kwargs)

    @property
    def model_config(self) -> ModelConfig:
        if self.model is None:
            raise ValueError("this FlextronConfig describes no model (its `model` is None)")
        return ModelConfig.from_dict(self.model)


class FlextronForCausalLM(PreTrainedModel, GenerationMixin):
    """A `FlextronModel` at one sub-network, with the transformers causal-LM interface.

    `at(...)` returns another view of the same weights at another budget, latency target
    or configuration.  `tokenizer` is the directory's tokenizer (None when it has none).
    """

    config_class = FlextronConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]

    def __init__(
        self, config: FlextronConfig, model: FlextronModel | None = None, selection: Selection | None = None
    ) -> None:
        super().__init__(config)
        self.model = model if model is not None else FlextronModel(config.model_config)
        self.selection = selection or Selection("uniform", 1.0, arch=self.model.full_arch())
        self.source: Path | None = None  # the directory loaded from: latency table, routers
        self.post_init()

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def arch(self) -> ArchConfig | None:
        """The sub-network this view runs (None under dynamic routing)."""
        return self.selection.arch

    # ---- budgets

    def at(
        self,
        budget: float | None = None,
        *,
        latency_ms: float | None = None,
        routing: str = "auto",
        arch: ArchConfig | dict | str | os.PathLike | None = None,
        latency_shape: str | LatencyShape | None = None,
    ) -> FlextronForCausalLM:
        """A view of the same weights at a budget in (0, 1], a latency target in ms, or a
        configuration (an ArchConfig, its dict, or a JSON file holding one).

        Budgets and latency targets resolve as `flextron generate` does: with the model
        directory's latency table and routers when it has them (routing: auto, uniform,
        static or dynamic), else by width.
        """
        if arch is not None:
            if budget is not None or latency_ms is not None:
                raise ValueError("give a configuration or a budget / latency target, not both")
            arch = _as_arch(arch)
            arch.validate(self.model.config)
            share = self.model.num_parameters(arch) / self.model.num_parameters()
            selection = Selection("configuration", share, arch=arch)
        else:
            shape = LatencyShape.parse(latency_shape) if isinstance(latency_shape, str) else latency_shape
            selection = BudgetResolver(self.model, self.source, shape).select(budget, latency_ms, routing)
        view = type(self)(self.config, self.model, selection)
        view.source = self.source
        view.generation_config = self.generation_config
        view.name_or_path = self.name_or_path
        return view

    # ---- forward

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: FlextronModel initializes its own modules, and a wrapped one is trained."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, V) (the last `logits_to_keep` positions when > 0).

        attention_mask (B, S): 1 for real tokens, 0 for padding, over the S = cached + T
        positions (left padding for generation).  cache (or past_key_values, its older
        name): a transformers Cache, extended by T.
        """
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("FlextronForCausalLM takes input_ids, not inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is None and (use_cache if use_cache is not None else self.config.use_cache):
            cache = DynamicCache(config=self.config)
        kv = None if cache is None else _CacheView(cache)
        past = 0 if kv is None else kv.length
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()  # (B, S)
            if position_ids is None:
                # A left-padded sequence starts at position 0 at its first real token.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        elif position_ids is not None and bool(
            (position_ids == torch.arange(past, past + input_ids.shape[1], device=position_ids.device)).all()
        ):
            position_ids = None  # the default positions: keep the batched fast path
        session = None
        if self.selection.router is not None:
            # A session per sequence batch: its head choice is made at prefill and kept in the cache.
            if past == 0:
                session = self.selection.session(input_ids.shape[0])
                if cache is not None:
                    cache.flextron_routing = session
            else:
                session = cache.flextron_routing
        logits = self.model(
            input_ids,
            self.selection.arch,
            kv,
            last_only=logits_to_keep == 1,
            session=session,
            position_ids=position_ids,
            key_mask=key_mask,
        )  # (B, T, V)
        if logits_to_keep > 1:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = next_token_cross_entropy(logits, labels)  # labels -100: not scored
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    # ---- checkpoints

    @classmethod
    def from_flextron(
        cls, model: FlextronModel, source: str | os.PathLike | None = None
    ) -> FlextronForCausalLM:
        """Wrap an in-memory FlextronModel (sharing its weights) at the full sub-network."""
        config = FlextronConfig(model=model.config.to_dict())
        wrapper = cls(config, model.eval())
        wrapper.source = None if source is None else Path(source)
        return wrapper

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        dtype: str | torch.dtype | None = None,
        device_map: str | torch.device | None = None,
        **kwargs,
    ) -> FlextronForCausalLM:
        """Load a Flextron directory or hub id (transformers' usual arguments: dtype, device_map,
        revision, cache_dir, token, local_files_only).  Directories written before config.json
        carried a model_type load here too."""
        from flextron.io.hub import resolve_model_dir
        from flextron.model.loading import load_model

        if model_args:
            raise TypeError(f"unexpected positional arguments {model_args}")
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        hub = {
            name: kwargs.pop(name)
            for name in ("revision", "cache_dir", "token", "local_files_only")
            if name in kwargs
        }
        kwargs.pop("config", None)  # AutoModel passes the config it read: the directory is read here anyway
        unknown = sorted(k for k in kwargs if k not in _IGNORED_LOAD_ARGS and not k.startswith("_"))
        if unknown:
            raise TypeError(f"FlextronForCausalLM.from_pretrained: unsupported arguments {unknown}")
        path = resolve_model_dir(str(pretrained_model_name_or_path), **hub)
        device = _device_of(device_map)
        model = load_model(path, _dtype_of(dtype), device)
        wrapper = cls.from_flextron(model, path)
        wrapper.name_or_path = str(pretrained_model_name_or_path)
        return wrapper

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the full elastic model as a Flextron directory (whatever this view's budget)."""
        save_pretrained(self.model, save_directory)


class _CacheView:
    """FlextronModel's cache interface (`length`, `update(layer, k, v)`) over a transformers Cache."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.length = cache.get_seq_length()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, h, T, hd) -> all cached (B, h, S, hd)."""
        return self.cache.update(k, v, layer)


def _as_arch(arch: ArchConfig | dict | str | os.PathLike) -> ArchConfig:
    if isinstance(arch, ArchConfig):
        return arch
    if isinstance(arch, dict):
        return ArchConfig.from_dict(arch)
    from flextron.model.requests import load_one_arch

    return load_one_arch(arch)


def _dtype_of(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None or "auto": as stored; else a torch dtype or its name."""
    from flextron.model.placement import parse_dtype

    if dtype is None or dtype == "auto":
        return None
    return dtype if isinstance(dtype, torch.dtype) else parse_dtype(str(dtype))


def _device_of(device_map: str | torch.device | None) -> str | None:
    if device_map is None or isinstance(device_map, torch.device):
        return None if device_map is None else str(device_map)
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, str):
        return device_map
    raise ValueError("FlextronForCausalLM loads onto one device: give device_map as 'cpu', 'cuda' or 'auto'")


AutoConfig.register(MODEL_TYPE, FlextronConfig, exist_ok=True)
AutoModelForCausalLM.register(FlextronConfig, FlextronForCausalLM, exist_ok=True)

"""The Flextron decoder: a compact Llama-family model whose every layer is elastic.

    model = FlextronModel(config)                       # or flextron.model.loading.load_default()
    logits = model(input_ids)                           # the full model
    logits = model(input_ids, arch=model.arch_for_budget(0.5))
    cache = model.new_kv_cache(batch_size=1, max_length=256)
    logits = model(prompt_ids, arch, kv_cache=cache)    # prefill, then one token at a time

Structure (names as in Hugging Face Llama): embed_tokens -> num_layers x [RMSNorm ->
ElasticAttention -> residual, RMSNorm -> ElasticMLP -> residual] -> RMSNorm -> lm_head
(tied to embed_tokens when the config says so).  The sub-network is an `ArchConfig`
chosen per call; see flextron.model.config for the budget rule and the head-choice rule.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from flextron import ops
from flextron.model.budget_configs import BudgetConfigs, resolve_budget
from flextron.model.config import ArchConfig, ModelConfig, count_parameters
from flextron.model.layers import ElasticAttention, ElasticLinear, ElasticMLP, KVCache
from flextron.model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as Hugging Face Llama does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerSession(Protocol):
    """A routing session: chooses each layer's sub-network during the forward (flextron.routers.sessions).

    It receives the sublayer's normalised input and the module, runs the module on its
    choice (e.g. per-token MLP widths through ops.routed_nested_mlp) and returns the
    sublayer output (B, T, D), before the residual add.
    """

    def attention(
        self,
        layer: int,
        module: ElasticAttention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
    ) -> torch.Tensor: ...

    def mlp(self, layer: int, module: ElasticMLP, x: torch.Tensor) -> torch.Tensor: ...


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ElasticAttention(
            config.hidden_size,
            config.layer_heads(layer),
            config.layer_kv_heads(layer),
            config.head_dim,
            config.qkv_bias,
            config.o_bias,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ElasticMLP(config.hidden_size, config.layer_intermediate_size(layer), config.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mlp_width: int,
        heads: int | torch.Tensor,
        *,
        kv_cache: KVCache | None,
        layer: int,
        session: LayerSession | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D).  With a routing session, it runs both sublayers' choices.
        (FlextronModel runs its layers on its own KV cache through ops.decoder_layer instead.)"""
        if session is None:
            x = x + self.self_attn(
                self.input_layernorm(x), cos, sin, heads, kv_cache, layer, key_mask=key_mask
            )
            return x + self.mlp(self.post_attention_layernorm(x), mlp_width)
        x = x + session.attention(layer, self.self_attn, self.input_layernorm(x), cos, sin, kv_cache)
        return x + session.mlp(layer, self.mlp, self.post_attention_layernorm(x))

    def _op_operands(self, heads: int, mlp_width: int) -> tuple:
        """(input_norm, post_norm, weights, scales, biases) as ops.decoder_layer takes them for
        `heads` and `mlp_width`: the o and down projections, whose rows it reads in part, as
        their column prefixes (ElasticLinear.column_prefix_operands)."""
        attention, mlp = self.self_attn, self.mlp
        q_width = attention.kv_heads_for(heads) * attention.group_size * attention.head_dim
        operands = [
            *(linear.operands() for linear in (attention.q_proj, attention.k_proj, attention.v_proj)),
            attention.o_proj.column_prefix_operands(q_width),
            # The MLP's size is the gate's rows: gate and up cut to `mlp_width` rows match down's copy.
            mlp.gate_proj.row_prefix_operands(mlp_width),
            mlp.up_proj.row_prefix_operands(mlp_width),
            mlp.down_proj.column_prefix_operands(mlp_width),
        ]
        return (
            self.input_layernorm.weight,
            self.post_attention_layernorm.weight,
            [weight for weight, _, _ in operands],
            [scale for _, scale, _ in operands],
            [bias for _, _, bias in operands],
        )


class FlextronModel(nn.Module):
    """The many-in-one decoder.  `tokenizer` and `importance` ride along for saving."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, layer) for layer in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.int8_head: ElasticLinear | None = None  # the head's int8 copy (flextron.model.quantization)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.tokenizer = None  # a transformers tokenizer, when loaded with one
        self.importance: dict[str, torch.Tensor] = {}  # conversion scores, when converted
        self.budget_configs: BudgetConfigs | None = None  # measured choices (budget_configs.json)

    # ---- configurations

    @property
    def is_int8(self) -> bool:
        """Whether the linear weights are int8 (flextron.model.quantization): inference only."""
        return self.int8_head is not None

    @property
    def weights_dtype(self) -> str:
        """The type the linear weights run in: "int8", or the float dtype's name ("bfloat16", ...)."""
        return "int8" if self.is_int8 else str(self.embed_tokens.weight.dtype).removeprefix("torch.")

    def full_arch(self) -> ArchConfig:
        return ArchConfig.full(self.config)

    def arch_for_budget(self, budget: float) -> ArchConfig:
        """The configuration for a budget in (0, 1]: the measured choice where budget_configs
        holds one (flextron.model.budget_configs), else the fixed rule
        (flextron.model.config.arch_for_budget)."""
        return resolve_budget(self.config, budget, self.budget_configs)

    def num_parameters(self, arch: ArchConfig | None = None) -> int:
        """Parameters the sub-network uses (tied embeddings counted once)."""
        return count_parameters(self.config, arch)

    # ---- forward

    def new_kv_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for up to max_length positions (at most the model's context)."""
        if max_length > self.config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the context of {self.config.max_position_embeddings}"
            )
        weight = self.embed_tokens.weight
        return KVCache(
            self.config.num_layers,
            batch_size,
            self.config.num_kv_heads,
            max_length,
            self.config.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        arch: ArchConfig | None = None,
        kv_cache: KVCache | None = None,
        *,
        last_only: bool = False,
        session: LayerSession | None = None,
        position_ids: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: (B, T) int64 -> logits (B, T, V), or (B, 1, V) with last_only.

        arch: the sub-network (default: full).  kv_cache: positions continue from
        kv_cache.length, and the cache is extended by T.  session: a routing session that
        chooses every layer's sub-network instead of `arch` (flextron.routers.sessions); one with
        a `settled_arch` that is not None runs as that configuration.
        Padded batches: position_ids (B, T) gives each token's RoPE position, and key_mask
        (B, S) bool marks the real (not padding) tokens among the S = cached + T keys.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be (batch, tokens) with tokens > 0, got {tuple(input_ids.shape)}"
            )
        start = 0 if kv_cache is None else kv_cache.length
        end = start + input_ids.shape[1]
        if end > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {end} tokens exceeds the model's context of "
                f"{self.config.max_position_embeddings}"
            )
        settled = getattr(session, "settled_arch", None)
        if settled is not None:
            # A session that has settled on one configuration for the whole batch (the sequence
            # router's, after prefill) runs as it: the plain path, the fused decode op included.
            arch, session = settled, None
        if arch is None:
            arch = self.full_arch()
        else:
            arch.validate(self.config)
        if key_mask is not None and session is not None:
            raise ValueError("dynamic routing chooses heads from whole sequences: it takes no padded batches")
        x = self.embed_tokens(input_ids)  # (B, T, D)
        if position_ids is None:
            cos, sin = self.rotary(torch.arange(start, end, device=input_ids.device), x.dtype)  # (T, hd)
        else:
            cos, sin = self.rotary(position_ids.flatten(), x.dtype)  # (B*T, hd)
            # (B, 1, T, hd): one row of positions per sequence, broadcast over the heads.
            cos, sin = (t.view(*position_ids.shape, 1, -1).transpose(1, 2) for t in (cos, sin))
        if session is None and key_mask is None and isinstance(kv_cache, KVCache):
            x = self._layers_on_cache(x, cos, sin, arch, kv_cache)
        else:  # a routing session, a padded batch, or a transformers cache
            for index, layer in enumerate(self.layers):
                x = layer(
                    x,
                    cos,
                    sin,
                    arch.mlp_widths[index],
                    arch.heads[index],
                    kv_cache=kv_cache,
                    layer=index,
                    session=session,
                    key_mask=key_mask,
                )
        if kv_cache is not None:
            kv_cache.length = end
        return self.logits(x[:, -1:] if last_only else x)

    def _layers_on_cache(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, arch: ArchConfig, kv_cache: KVCache
    ) -> torch.Tensor:
        """Every layer on our KV cache, each as one ops.decoder_layer (the same numbers as its ~50
        small operations, without their Python cost), all in one call: a DecodePlan
        (torch.classes.flextron.DecodePlan) that holds the layers' operands. The plan is made at
        prefill, and again for another model or configuration; the cache keeps it."""
        taken = kv_cache.plan
        if kv_cache.length == 0 or taken is None or taken[0] is not self or taken[1] != arch:
            taken = kv_cache.plan = (self, arch, self.decode_plan(arch, kv_cache, x.shape[1]))
        else:
            kv_cache.check_room(x.shape[1])
        return taken[2].run(x, cos, sin, kv_cache.length)

    def decode_plan(self, arch: ArchConfig, kv_cache: KVCache, tokens: int):
        """A DecodePlan running every layer of `arch` on `kv_cache` (its run(x, cos, sin, length)
        takes x: (B, T, D)); checks that the cache can take `tokens` more positions at those
        head counts, and records them."""
        plan = torch.classes.flextron.DecodePlan()
        for index, layer in enumerate(self.layers):
            heads, width = arch.heads[index], arch.mlp_widths[index]
            kv_cache.reserve(index, layer.self_attn.kv_heads_for(heads), tokens)
            plan.add_layer(
                *layer._op_operands(heads, width),
                kv_cache.keys[index],
                kv_cache.values[index],
                heads,
                width,
                layer.input_layernorm.eps,
            )
        return plan

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last layer's output (B, T, D) -> logits (B, T, V): final norm, then the head."""
        if self.int8_head is not None:
            return self.int8_head(self.norm(hidden))
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return ops.nested_linear(self.norm(hidden), weight)  # few-row (decode) kernel on CPU

    # ---- construction from weights

    @classmethod
    def from_state_dict(cls, config: ModelConfig, weights: dict[str, torch.Tensor]) -> FlextronModel:
        """A model that adopts `weights` (no copy); ValueError naming missing/extra keys."""
        with torch.device("meta"):
            model = cls(config)
        # assign=True adopts the tensors instead of copying into the meta placeholders.
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        # Buffers are not in the state dict: rebuild them off the meta device.
        model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        return model.eval()

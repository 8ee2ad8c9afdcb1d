"""Text generation with a KV cache: greedy, temperature and top-p (nucleus) sampling.

The sub-network (an ArchConfig, e.g. from a budget) is fixed for the whole generation:
the head choice made at prefill must hold while the cache is read back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from flextron.limits import check_size, time_limit
from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel, LayerSession

TEMPLATE_SECONDS = 5.0  # chat-template rendering (real templates take milliseconds)
TEMPLATE_CHARS = 1 << 20  # template text, and what it renders beyond the prompt


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """One token id from logits (V,): argmax when temperature == 0, else top-p sampling."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    if temperature == 0:
        # Through fp32 (exact for bf16, same first maximum): torch's bf16 argmax over the
        # 49k logits of SmolLM2 took 180 us here, as much as a decoder layer, its fp32 one 50.
        return int(logits.float().argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, sorted_ids = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs[outside] = 0
        return int(sorted_ids[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()  # unlike no_grad, it also skips the ops' autograd layer on every call
def stream_tokens(
    model: FlextronModel,
    prompt_ids: list[int] | torch.Tensor,
    arch: ArchConfig | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: set[int] | None = None,
    seed: int | None = None,
    min_new_tokens: int = 0,
    banned_early_ids: set[int] | None = None,
    session: LayerSession | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (prefill once, then one cached step per token).

    Stops after max_new_tokens, at a stop id (yielded first), or at the context's end.
    The first min_new_tokens tokens cannot be a stop id or one of banned_early_ids.
    ValueError when the prompt is empty or does not fit the context.  session: a dynamic
    routing session for one sequence (it replaces `arch`; its head counts are fixed at prefill).
    """
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64).flatten()
    context = model.config.max_position_embeddings
    if ids.numel() == 0:
        raise ValueError("empty prompt")
    if ids.numel() >= context:
        raise ValueError(f"prompt of {ids.numel()} tokens does not fit the model's context of {context}")
    arch = arch or model.full_arch()
    steps = min(max_new_tokens, context - ids.numel())
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    device = model.embed_tokens.weight.device
    cache = model.new_kv_cache(1, ids.numel() + steps)
    banned = sorted((stop_ids or set()) | (banned_early_ids or set()))
    logits = model(ids[None].to(device), arch, cache, last_only=True, session=session)  # (1, 1, V)
    for step in range(steps):
        if step < min_new_tokens and banned:
            logits[0, -1, banned] = float("-inf")
        token = sample_next(logits[0, -1], temperature, top_p, generator)
        yield token
        if (stop_ids and token in stop_ids) or step == steps - 1:
            return
        logits = model(torch.tensor([[token]], device=device), arch, cache, session=session)


def chat_prompt_ids(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids for a user prompt, through the tokenizer's chat template when it has one.

    The template comes with the model's files: its rendering is bounded in time
    (TEMPLATE_SECONDS) and size (TEMPLATE_CHARS, for the template and for what it renders).
    """
    if not prompt.strip():
        raise ValueError("empty prompt")
    template = getattr(tokenizer, "chat_template", None) if chat else None
    if template:
        if not isinstance(template, str):
            raise ValueError("the tokenizer's chat template is not a single template string")
        check_size(template, TEMPLATE_CHARS, "the chat template")
        with time_limit(TEMPLATE_SECONDS, "the chat template"):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        check_size(text, TEMPLATE_CHARS + len(prompt), "the chat template's output")
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def generate_text(
    model: FlextronModel,
    prompt: str,
    arch: ArchConfig | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chat: bool = True,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    min_new_tokens: int = 0,
    session: LayerSession | None = None,
) -> str:
    """The model's answer to `prompt`; on_text receives each new piece of text as it streams.

    min_new_tokens: the first tokens may not be special tokens (EOS, chat markers); small
    untrained sub-networks otherwise often end their answer at once.
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; load one with the model or pass token ids")
    stop = {i for i in (tokenizer.eos_token_id, model.config.eos_token_id) if isinstance(i, int)}
    new_ids: list[int] = []
    text = ""
    special = set(getattr(tokenizer, "all_special_ids", []))
    for token in stream_tokens(
        model,
        chat_prompt_ids(tokenizer, prompt, chat),
        arch,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_ids=stop,
        seed=seed,
        min_new_tokens=min_new_tokens,
        banned_early_ids=special,
        session=session,
    ):
        if token in stop:
            break
        new_ids.append(token)
        # Decode the whole answer each step: a token may complete a multi-byte character.
        full = tokenizer.decode(new_ids, skip_special_tokens=True)
        if on_text is not None and len(full) > len(text) and not full.endswith("\ufffd"):
            on_text(full[len(text) :])
            text = full
    return tokenizer.decode(new_ids, skip_special_tokens=True)

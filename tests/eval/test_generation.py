"""Generation: KV-cache decoding equals a full recompute; sampling; bad prompts."""

from __future__ import annotations

import copy

import pytest
import torch

from flextron.eval.generation import sample_next, stream_tokens


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.25])
def test_cached_greedy_generation_equals_full_recompute(tiny_flextron, budget: float) -> None:
    model = tiny_flextron(kv_heads=2, bias=True)
    arch = model.arch_for_budget(budget)
    prompt = torch.randint(0, 300, (9,))
    generated = list(stream_tokens(model, prompt, arch, max_new_tokens=12))
    assert len(generated) == 12
    ids = prompt.tolist()
    with torch.no_grad():
        for token in generated:  # no cache: recompute the whole sequence every step
            logits = model(torch.tensor([ids]), arch)
            assert int(logits[0, -1].argmax()) == token
            ids.append(token)


def test_generation_stops_at_stop_id_and_context_end(tiny_flextron) -> None:
    model = tiny_flextron()
    prompt = torch.randint(0, 300, (5,))
    first = next(stream_tokens(model, prompt, max_new_tokens=4))
    assert list(stream_tokens(model, prompt, max_new_tokens=4, stop_ids={first})) == [first]
    context = model.config.max_position_embeddings
    long_prompt = torch.randint(0, 300, (context - 3,))
    assert len(list(stream_tokens(model, long_prompt, max_new_tokens=50))) == 3


def test_prompt_longer_than_context_or_empty_is_rejected(tiny_flextron) -> None:
    model = tiny_flextron()
    with pytest.raises(ValueError, match="does not fit the model's context of 128"):
        next(stream_tokens(model, torch.zeros(200, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty prompt"):
        next(stream_tokens(model, []))


def test_sampling_top_p_and_seed(tiny_flextron) -> None:
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample_next(logits, 0.0, 1.0, None) == 1
    seen = {sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(s)) for s in range(20)}
    assert seen == {1}, "top_p=0.5 keeps only the most likely token here"
    seen = {sample_next(logits, 1.0, 0.99, torch.Generator().manual_seed(s)) for s in range(40)}
    assert seen == {1, 2}
    model = tiny_flextron()
    prompt = torch.randint(0, 300, (5,))
    runs = [
        list(stream_tokens(model, prompt, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, 0.0, None)


def test_min_new_tokens_bans_stop_and_special_ids(tiny_flextron) -> None:
    model = tiny_flextron()
    prompt = torch.randint(0, 300, (5,))
    first = next(stream_tokens(model, prompt, max_new_tokens=1))
    tokens = list(
        stream_tokens(
            model, prompt, max_new_tokens=6, stop_ids={first}, min_new_tokens=3, banned_early_ids={7}
        )
    )
    assert first not in tokens[:3] and 7 not in tokens[:3]


# bf16 greedy decoding may pick another token only where fp32's two best logits are this close:
# 2 bf16 steps (2^-7 relative each) of the largest |logit|.  Random tiny models have such near
# ties within 16 tokens (measured gaps up to 0.5% of the scale), so exact equality cannot hold.
BF16_LOGIT_TOLERANCE = 2 * 2**-7


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("seed", [0, 2])
def test_bf16_greedy_choices_are_fp32_best_within_tolerance(tiny_flextron, budget: float, seed: int) -> None:
    model = tiny_flextron(seed=seed, kv_heads=2, bias=True)
    half = copy.deepcopy(model).to(torch.bfloat16)  # the decode path of `--dtype bfloat16`
    arch = model.arch_for_budget(budget)
    prompt = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(seed))
    ids = prompt.tolist()
    with torch.no_grad():
        for token in stream_tokens(half, prompt, arch, max_new_tokens=16):
            logits = model(torch.tensor([ids]), arch)[0, -1]  # fp32, on bf16's own tokens so far
            assert logits.max() - logits[token] <= BF16_LOGIT_TOLERANCE * logits.abs().max()
            ids.append(token)

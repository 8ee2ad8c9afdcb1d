"""FlextronForCausalLM: transformers' Auto classes, budget views, padded batches, pipelines."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, pipeline

import flextron  # noqa: F401  (registers the Auto classes)
from flextron.integrations.hf_model import FlextronConfig, FlextronForCausalLM
from flextron.model.checkpoint import load_pretrained, save_pretrained
from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel


@pytest.fixture(scope="module")
def flextron_dir(tiny_flextron, tiny_tokenizer, tmp_path_factory):
    """A tiny Flextron directory (GQA: 4 heads in 2 KV groups) with a tokenizer."""
    path = tmp_path_factory.mktemp("hf_model") / "model"
    model = tiny_flextron(kv_heads=2)
    model.tokenizer = tiny_tokenizer()
    save_pretrained(model, path)
    return path


def test_auto_classes_load_a_flextron_directory(flextron_dir) -> None:
    assert json.loads((flextron_dir / "config.json").read_text())["model_type"] == "flextron"
    assert isinstance(AutoConfig.from_pretrained(flextron_dir), FlextronConfig)
    model = AutoModelForCausalLM.from_pretrained(flextron_dir)
    assert isinstance(model, FlextronForCausalLM) and model.tokenizer is not None
    reference = load_pretrained(flextron_dir)
    ids = torch.randint(3, 300, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids), rtol=0, atol=0)


def test_at_is_a_view_sharing_the_weights(flextron_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(flextron_dir)
    half = model.at(0.5)
    assert half.model is model.model and model.arch == model.model.full_arch()
    assert half.arch == model.model.arch_for_budget(0.5)
    arch = ArchConfig((64, 128), (2, 4))
    custom = model.at(arch=arch.to_dict())
    assert custom.arch == arch and 0 < custom.selection.budget < 1
    ids = torch.randint(3, 300, (1, 9))
    with torch.no_grad():
        before = half(ids).logits
        torch.testing.assert_close(before, model.model(ids, half.arch), rtol=0, atol=0)
        model.model.norm.weight.mul_(2)  # a change to the shared weights shows in every view
        after = half(ids).logits
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, model.model(ids, half.arch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="latency table"):
        model.at(latency_ms=5.0)
    with pytest.raises(ValueError, match="not both"):
        model.at(0.5, arch=arch)


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_left_padded_batch_generates_as_one_by_one(flextron_dir, budget) -> None:
    model = AutoModelForCausalLM.from_pretrained(flextron_dir).at(budget)
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    prompts = ["The quick brown fox", "Hi", "Elastic models run at any budget"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert not batch.attention_mask.all()
    together = model.generate(**batch, max_new_tokens=12, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = tokenizer(prompt, return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=12, do_sample=False)
        new = together[row, batch.input_ids.shape[1] :]
        assert new.tolist() == single[0, alone.input_ids.shape[1] :].tolist()


def test_padded_logits_equal_transformers_llama(assert_logits_close, tiny_flextron, tiny_hf_model) -> None:
    """Padding mask and positions as transformers' own Llama computes them."""
    hf = tiny_hf_model(kv_heads=2)
    model = FlextronForCausalLM.from_flextron(tiny_flextron(kv_heads=2))
    ids = torch.randint(3, 300, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    assert_logits_close(ours[0, 4:], theirs[0, 4:])
    assert_logits_close(ours[1], theirs[1])


def test_cache_continues_the_sequence(assert_logits_close, flextron_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(flextron_dir).at(0.5)
    ids = torch.randint(3, 300, (2, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :8], use_cache=True)
        rest = model(ids[:, 8:], cache=first.cache).logits
    assert_logits_close(torch.cat([first.logits, rest], 1), full)


def test_loss_is_the_shifted_cross_entropy(flextron_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(flextron_dir)
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)


def test_pipeline_text_generation(flextron_dir) -> None:
    generate = pipeline("text-generation", model=str(flextron_dir))
    text = generate("Hello", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    model = AutoModelForCausalLM.from_pretrained(flextron_dir)
    ids = model.tokenizer("Hello", return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert text == model.tokenizer.decode(expected[0], skip_special_tokens=True)
    half = model.at(0.5)
    assert pipeline("text-generation", model=half, tokenizer=half.tokenizer)("Hello", max_new_tokens=3)


def test_dtype_and_save(flextron_dir, tmp_path) -> None:
    model = AutoModelForCausalLM.from_pretrained(flextron_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.at(0.5)(torch.tensor([[5, 6, 7]])).logits.dtype == torch.bfloat16
    model.at(0.5).save_pretrained(tmp_path / "saved")  # a view saves the whole elastic model
    again = load_pretrained(tmp_path / "saved")
    assert again.config == model.model.config and again.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="unsupported arguments"):
        AutoModelForCausalLM.from_pretrained(flextron_dir, load_in_8bit=True)


def test_directories_without_model_type_still_load(flextron_dir, tmp_path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for item in flextron_dir.iterdir():
        (old / item.name).write_bytes(item.read_bytes())
    config = json.loads((old / "config.json").read_text())
    del config["model_type"]
    (old / "config.json").write_text(json.dumps(config))
    assert isinstance(load_pretrained(old), FlextronModel)
    model = FlextronForCausalLM.from_pretrained(old)
    assert model.at(0.5).arch == model.model.arch_for_budget(0.5)


@pytest.mark.usefixtures("one_thread")
def test_latency_targets_and_routers(synthetic_table, tiny_flextron, tmp_path) -> None:
    """A directory with a latency table and routers: views resolve as `flextron generate` does."""
    from flextron.latency.shape import LatencyShape
    from flextron.routers import BudgetResolver, DynamicRouter, StaticRouter, save_routers

    model = tiny_flextron()
    save_pretrained(model, tmp_path)
    synthetic_table().save(tmp_path)
    torch.manual_seed(0)
    save_routers(
        tmp_path,
        {
            "static": StaticRouter(model.config, [0.5, 1.0], hidden_size=8),
            "dynamic": DynamicRouter(model.config, [0.5, 1.0], hidden_size=8),
        },
        LatencyShape("prefill", 1, 16),
    )
    wrapper = FlextronForCausalLM.from_pretrained(tmp_path)
    resolver = BudgetResolver(wrapper.model, tmp_path)
    full_ms = resolver.table.predict(wrapper.model.full_arch(), resolver.shape)
    for routing in ("uniform", "static"):
        view = wrapper.at(latency_ms=0.6 * full_ms, routing=routing)
        assert view.arch == resolver.select(None, 0.6 * full_ms, routing).arch
    dynamic = wrapper.at(0.5, routing="dynamic")
    assert dynamic.arch is None
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        expected = wrapper.model(ids, session=dynamic.selection.session(1))
        torch.testing.assert_close(dynamic(ids, use_cache=False).logits, expected)
        # Decoding keeps the prefill's session (its head choice) in the cache.
        assert dynamic.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
        ).shape == (1, 11)
        padded = torch.ones(2, 8, dtype=torch.long)
        padded[0, :3] = 0
        with pytest.raises(ValueError, match="padded"):
            dynamic(ids.repeat(2, 1), attention_mask=padded)

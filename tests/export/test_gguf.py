"""GGUF export, checked by llama.cpp itself (llama-cpp-python) and by transformers' gguf_file= loader.

Tolerances, as a fraction of the largest |logit|:
- f32: 1e-4, as the Hugging Face exports are held to.  Both sides compute in fp32 (llama.cpp with
  an fp32 KV cache); only the order of the sums differs (measured: 7e-7 on the tiny models, 7e-6
  on SmolLM2's 30 layers).
- f16, bf16, q8_0: llama.cpp's distance from the fp32 sub-network is at most ACTIVATION_FACTOR
  times the distance that rounding the weights alone causes (flextron run on the file's
  dequantized weights), because llama.cpp also rounds the activations to the weights' type before
  each product: elementwise for f16 and bf16 (an error of the same size: measured ratios 1.0-1.3),
  to blocks of 32 sharing one scale for q8_0, which an outlier channel coarsens for its whole
  block (measured 1.1 on the tiny models, 1.9 on SmolLM2, 2.2 on its unconverted half).
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from flextron.eval.generation import stream_tokens
from flextron.export.gguf import GGUF_TYPES, encode
from flextron.export.hf import export
from flextron.model.config import ArchConfig
from flextron.model.quantization import quantize_rows, row_scales
from flextron.model.slicing import slice_model

F32_TOLERANCE = 1e-4
ACTIVATION_FACTOR = {"f16": 2, "bf16": 2, "q8_0": 3}
PROMPT = "Hello world, 2024 is a year. The quick brown fox jumps over the lazy dog."
ARCHS = {  # name -> the configuration of a model to export
    "uniform": lambda model: model.arch_for_budget(0.5),
    "per-layer": lambda _: ArchConfig((64, 192), (4, 2)),
}


@pytest.fixture(scope="module")
def model(tiny_bpe_tokenizer, tiny_flextron):
    """The tiny GQA model (vocab 300) with a trained byte-level BPE tokenizer."""
    model = tiny_flextron(kv_heads=2)
    model.tokenizer = tiny_bpe_tokenizer()
    return model


@pytest.fixture
def llama(monkeypatch):
    """Open a GGUF in llama.cpp on the CPU with an fp32 KV cache (its default f16 cache rounds K/V)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        # llama.cpp's AMX kernels for quantized weights crash on some AMX CPUs (llama-cpp-python
        # 0.3.36); without the repacked buffers it runs its reference CPU kernels.
        params = defaults()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_repacking)
    opened = []

    def load(path):
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=128,
            logits_all=True,
            verbose=False,
            n_threads=1,
            flash_attn=False,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
        )
        opened.append(llm)
        return llm

    yield load
    for llm in opened:
        llm.close()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)])  # (T, V)


def weights_rounded_to(model, gguf_type: str):
    """A copy of `model` whose 2-D weights went through the GGUF type and back (as the file holds them)."""
    rounded = slice_model(model, model.full_arch())
    with torch.no_grad():
        for param in rounded.parameters():
            if param.dim() == 2:
                data, qtype = encode(param.detach().float(), gguf_type)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(param.shape)))
    return rounded


def max_error(ours: np.ndarray, reference: torch.Tensor) -> float:
    return float(np.abs(ours - reference.numpy()).max() / reference.abs().max())


@pytest.mark.parametrize("gguf_type", list(GGUF_TYPES))
@pytest.mark.parametrize("shape", list(ARCHS))
def test_llama_cpp_logits_match_flextron(model, llama, tmp_path, shape: str, gguf_type: str) -> None:
    arch = ARCHS[shape](model)
    export(model, arch, tmp_path, format="gguf", gguf_type=gguf_type)
    llm = llama(tmp_path / f"model-{gguf_type}.gguf")
    assert llm.metadata["general.architecture"] == ("llama" if shape == "uniform" else "deci")
    ids = model.tokenizer(PROMPT)["input_ids"]
    ours = llama_logits(llm, ids)
    with torch.no_grad():
        reference = model(torch.tensor([ids]), arch)[0]  # (T, V)
        rounding_alone = max_error(
            weights_rounded_to(model, gguf_type)(torch.tensor([ids]), arch)[0].numpy(), reference
        )
    if gguf_type == "f32":
        assert max_error(ours, reference) <= F32_TOLERANCE
    else:
        assert 0 < rounding_alone
        assert max_error(ours, reference) <= ACTIVATION_FACTOR[gguf_type] * rounding_alone


@pytest.mark.parametrize("shape", list(ARCHS))
def test_greedy_32_tokens_at_f32_are_identical(model, llama, tmp_path, shape: str) -> None:
    arch = ARCHS[shape](model)
    export(model, arch, tmp_path, format="gguf", gguf_type="f32")
    llm = llama(tmp_path / "model-f32.gguf")
    ids = model.tokenizer(PROMPT)["input_ids"]
    ours = list(stream_tokens(model, ids, arch, max_new_tokens=32))
    theirs = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        theirs.append(token)
        if len(theirs) == 32:
            break
    assert theirs == ours and len(ours) == 32


@pytest.mark.parametrize("split_digits", [True, False], ids=["smollm", "gpt-2"])
def test_llama_cpp_tokenizes_like_the_model(
    tiny_bpe_tokenizer, tiny_flextron, llama, tmp_path, split_digits: bool
) -> None:
    model = tiny_flextron(kv_heads=2)
    tokenizer = model.tokenizer = tiny_bpe_tokenizer(split_digits=split_digits)
    export(model, model.arch_for_budget(0.5), tmp_path, format="gguf", gguf_type="f16")
    llm = llama(tmp_path / "model-f16.gguf")
    assert llm.metadata["tokenizer.ggml.pre"] == ("smollm" if split_digits else "gpt-2")
    for text in (PROMPT, "  indented\n\tcode = f(x, 42) # done", "<bos>special<eos> tokens"):
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert llm.detokenize(ids, special=True).decode() == tokenizer.decode(ids)
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert (llm.token_bos(), llm.token_eos()) == (tokenizer.bos_token_id, tokenizer.eos_token_id)


@pytest.mark.parametrize("shape", list(ARCHS))
def test_q8_0_file_holds_the_int8_models_numbers(model, int8_pair, tmp_path, shape: str) -> None:
    """Every q8_0 weight, dequantized, is exactly the int8 model's value (int8 times the full row's
    scale, flextron.model.quantization) at that place of the sub-network: the f32 export of the
    model with those values has the very same tensors."""
    arch = ARCHS[shape](model)
    export(model, arch, tmp_path / "q8_0", format="gguf", gguf_type="q8_0")
    int8, dequantized = int8_pair(model)
    head = int8.int8_head.qweight.float() * int8.int8_head.weight_scale[:, None]
    if model.lm_head is None:  # tied: the file's embedding is the int8 head
        dequantized.embed_tokens.weight.data = head
    else:  # the embedding stays float in the int8 model; the file rounds it the same way
        dequantized.lm_head.weight.data = head
        embedding = model.embed_tokens.weight
        scale = row_scales(embedding)
        dequantized.embed_tokens.weight.data = quantize_rows(embedding, scale).float() * scale[:, None]
    export(dequantized, arch, tmp_path / "f32", format="gguf", gguf_type="f32")
    expected = {
        t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "f32" / "model-f32.gguf").tensors
    }
    checked = 0
    for tensor in gguf.GGUFReader(tmp_path / "q8_0" / "model-q8_0.gguf").tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            continue
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        np.testing.assert_array_equal(
            values, expected[tensor.name].reshape(values.shape), err_msg=tensor.name
        )
        checked += 1
    assert checked >= 1 + 7 * model.config.num_layers  # the embedding and every layer's projections


def test_q8_0_is_a_quarter_of_f32_and_the_model_card_says_so(model, tmp_path) -> None:
    arch = model.arch_for_budget(0.5)
    for gguf_type in ("f32", "q8_0"):
        export(model, arch, tmp_path / gguf_type, format="gguf", gguf_type=gguf_type)
    sizes = [(tmp_path / t / f"model-{t}.gguf").stat().st_size for t in ("f32", "q8_0")]
    assert sizes[1] < 0.4 * sizes[0]  # 34 bytes per 32 weights, plus the f32 norms and the vocabulary
    card = (tmp_path / "q8_0" / "README.md").read_text()
    assert "llama.cpp GGUF file" in card and "q8_0" in card and "model-q8_0.gguf" in card


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_round_trip_through_transformers_gguf_loader(model, tmp_path, gguf_type: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = model.arch_for_budget(0.5)
    export(model, arch, tmp_path, format="gguf", gguf_type=gguf_type)
    name = f"model-{gguf_type}.gguf"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name, dtype=torch.float32).eval()
    assert hf.num_parameters() == model.num_parameters(arch)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=name)
    assert tokenizer(PROMPT)["input_ids"] == model.tokenizer(PROMPT)["input_ids"]
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        reference = model(ids, arch)
        if gguf_type == "f32":
            torch.testing.assert_close(hf(ids).logits, reference, rtol=0, atol=1e-4 * reference.abs().max())
        else:  # f16 weights, dequantized to fp32 by the loader: exactly flextron on the rounded weights
            rounded = weights_rounded_to(model, gguf_type)(ids, arch)
            torch.testing.assert_close(hf(ids).logits, rounded, rtol=0, atol=1e-4 * reference.abs().max())


def test_qwen2_with_every_head_is_llama_cpp_qwen2_and_round_trips(
    tiny_bpe_tokenizer, tiny_family_model, llama, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    hf, model = tiny_family_model("qwen2")
    model.tokenizer = tiny_bpe_tokenizer()
    arch = ArchConfig.uniform(model.config, 128, 4)
    export(model, arch, tmp_path, format="gguf", gguf_type="f32")
    llm = llama(tmp_path / "model-f32.gguf")
    assert llm.metadata["general.architecture"] == "qwen2"
    ids = model.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        reference = model(torch.tensor([ids]), arch)[0]
        assert max_error(llama_logits(llm, ids), reference) <= F32_TOLERANCE
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model-f32.gguf", dtype=torch.float32)
        assert type(back).__name__ == type(hf).__name__
        assert max_error(back.eval()(torch.tensor([ids])).logits[0].numpy(), reference) <= F32_TOLERANCE


@pytest.mark.parametrize("variant", ["qwen2", "mistral", "llama-bias-tied"])
@pytest.mark.parametrize("shape", list(ARCHS))
def test_families_and_biases_run_in_llama_cpp(
    tiny_bpe_tokenizer, tiny_family_model, tiny_flextron, llama, tmp_path, variant: str, shape: str
) -> None:
    if variant == "llama-bias-tied":
        model = tiny_flextron(kv_heads=2, bias=True, tied=True)
    else:
        model = tiny_family_model(variant)[1]
    model.tokenizer = tiny_bpe_tokenizer()
    arch = ARCHS[shape](model)
    export(model, arch, tmp_path, format="gguf", gguf_type="f32")
    llm = llama(tmp_path / "model-f32.gguf")
    # llama.cpp's qwen2 needs every head; fewer go in as deci (Llama-style, with optional biases)
    expected = "llama" if shape == "uniform" and variant != "qwen2" else "deci"
    assert llm.metadata["general.architecture"] == expected
    ids = model.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        assert max_error(llama_logits(llm, ids), model(torch.tensor([ids]), arch)[0]) <= F32_TOLERANCE


def test_llama3_rope_scaling_goes_in_as_frequency_factors(
    tiny_bpe_tokenizer, tiny_flextron, llama, tmp_path
) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    model = tiny_flextron(kv_heads=2, rope_parameters={"rope_theta": 10000.0, **scaling})
    assert model.config.rope_scaling["rope_type"] == "llama3"
    model.tokenizer = tiny_bpe_tokenizer()
    arch = model.arch_for_budget(0.5)
    export(model, arch, tmp_path, format="gguf", gguf_type="f32")
    llm = llama(tmp_path / "model-f32.gguf")
    ids = model.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        assert max_error(llama_logits(llm, ids), model(torch.tensor([ids]), arch)[0]) <= F32_TOLERANCE


@pytest.mark.parametrize(
    "change, message",
    [
        ("no tokenizer", "needs the model's tokenizer"),
        ("no merges", "no BPE merges"),
        ("yarn", "YaRN"),
    ],
)
def test_gguf_export_refuses_what_llama_cpp_cannot_hold(
    tiny_tokenizer, tiny_bpe_tokenizer, tiny_flextron, tmp_path, change: str, message: str
) -> None:

    model = tiny_flextron(kv_heads=2)
    model.tokenizer = {"no tokenizer": None, "no merges": tiny_tokenizer()}.get(change, tiny_bpe_tokenizer())
    if change == "yarn":
        model.config.rope_scaling = {"rope_type": "yarn", "factor": 2.0}
    with pytest.raises(ValueError, match=message):
        export(model, model.arch_for_budget(0.5), tmp_path, format="gguf")


def test_export_command_gguf(tiny_hf_dir, tiny_bpe_tokenizer, tmp_path, capsys) -> None:
    from flextron.cli import main

    tiny_hf_dir(tmp_path / "hf", kv_heads=2)
    tiny_bpe_tokenizer().save_pretrained(tmp_path / "hf")  # (the default tiny tokenizer has no merges)
    argv = [
        "export",
        "--model",
        str(tmp_path / "hf"),
        "--budget",
        "0.5",
        "--format",
        "gguf",
        "--gguf-type",
        "q8_0",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    assert "as gguf" in capsys.readouterr().out
    reader = gguf.GGUFReader(tmp_path / "out" / "model-q8_0.gguf")
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert json.loads(json.dumps(reader.fields["general.file_type"].contents())) == 7


@pytest.mark.slow
def test_smollm2_at_half_budget_runs_in_llama_cpp_like_flextron(llama, tmp_path) -> None:
    """The embedded SmolLM2 (real tokenizer and chat template) at budget 0.5."""
    from flextron.eval.generation import chat_prompt_ids
    from flextron.model.loading import load_model

    model = load_model("default")
    arch = model.arch_for_budget(0.5)
    ids = chat_prompt_ids(model.tokenizer, "What is a Python decorator?")
    with torch.no_grad():
        reference = model(torch.tensor([ids]), arch)[0]
    ours = list(stream_tokens(model, ids, arch, max_new_tokens=32))
    for gguf_type in ("f32", "q8_0"):
        export(model, arch, tmp_path / gguf_type, format="gguf", gguf_type=gguf_type)
        llm = llama(tmp_path / gguf_type / f"model-{gguf_type}.gguf")
        prompt = model.tokenizer.decode(ids)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        error = max_error(llama_logits(llm, ids), reference)
        if gguf_type == "f32":
            assert error <= F32_TOLERANCE
            theirs = []
            for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
                theirs.append(token)
                if len(theirs) == 32:
                    break
            assert theirs == ours
        else:
            with torch.no_grad():
                rounded = weights_rounded_to(model, gguf_type)(torch.tensor([ids]), arch)[0]
            assert error <= ACTIVATION_FACTOR[gguf_type] * max_error(rounded.numpy(), reference)


def test_a_gguf_out_name_writes_that_file(model, tmp_path) -> None:
    arch = model.arch_for_budget(0.5)
    target = tmp_path / "half.gguf"
    assert export(model, arch, target, gguf_type="f32") == "gguf"  # auto: a .gguf name is a GGUF file
    assert target.is_file() and list(tmp_path.iterdir()) == [target]
    reader = gguf.GGUFReader(target)
    assert reader.get_tensor(0).name == "token_embd.weight"
    ffn = [tensor for tensor in reader.tensors if tensor.name == "blk.0.ffn_up.weight"][0]
    assert ffn.shape.tolist() == [model.config.hidden_size, arch.mlp_widths[0]]


def test_an_out_name_without_the_suffix_writes_a_directory(model, tmp_path) -> None:
    target = tmp_path / "half"
    export(model, model.arch_for_budget(0.5), target, format="gguf", gguf_type="f32")
    assert sorted(item.name for item in target.iterdir()) == ["README.md", "model-f32.gguf"]


def test_llama_cpp_opens_a_gguf_out_name(model, llama, tmp_path) -> None:
    arch = model.arch_for_budget(0.5)
    export(model, arch, tmp_path / "half.gguf", gguf_type="f32")
    ids = model.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        reference = model(torch.tensor([ids]), arch)[0]  # (T, V)
    assert max_error(llama_logits(llama(tmp_path / "half.gguf"), ids), reference) <= F32_TOLERANCE


def test_export_command_writes_and_overwrites_the_named_gguf_file(model, tmp_path, capsys) -> None:
    from flextron.cli import main
    from flextron.model.checkpoint import save_pretrained

    save_pretrained(model, tmp_path / "model")
    out = tmp_path / "half.gguf"
    argv = ["export", "--model", str(tmp_path / "model"), "--budget", "0.5", "--out", str(out)]
    assert main([*argv, "--gguf-type", "f32"]) == 0
    assert f"as gguf to {out}" in capsys.readouterr().out
    assert gguf.GGUFReader(out).get_tensor(0).tensor_type == gguf.GGMLQuantizationType.F32
    assert main([*argv, "--overwrite"]) == 0  # replaced in place, as f16 this time
    assert gguf.GGUFReader(out).get_tensor(0).tensor_type == gguf.GGMLQuantizationType.F16
    assert sorted(item.name for item in tmp_path.iterdir()) == ["half.gguf", "model"]

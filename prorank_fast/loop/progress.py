"""What a run shows and leaves behind as it goes: the progress bar, metrics.jsonl, curves.png, the
peak memory of each stage."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from ..io import atomic_write_text


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4f}"
    return str(value)


class _Progress:
    def __init__(self, d, start: int, total: int, desc: str, keys: tuple[str, ...]):
        self.bar = None
        self.keys = keys
        if d.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: _short(record[k]) for k in self.keys if k in record})
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(d, start: int, total: int, desc: str = "stage 2", keys=("loss", "lr", "tokens_per_s")) -> _Progress:
    return _Progress(d, start, total, desc, keys)


# panels of curves.png, drawn for the keys a run's metrics.jsonl has (stage 1 logs the GRPO ones)
PLOT_PANELS = (
    ("loss", ("loss",)),
    ("held-out nDCG@10", ("held_out_ndcg@10", "held_out_ndcg@10/*")),  # the mean, then each collection
    ("learning rate", ("lr",)),
    ("reward", ("reward", "reward_format", "reward_correctness", "reward_graded_format", "reward_parsed_correctness")),
    ("valid format rate", ("valid_format_rate", "format_exact", "format_first", "format_anywhere")),
    ("accuracy", ("accuracy", "reward_parsed_correctness")),
    ("kl / entropy", ("kl", "entropy")),
    ("clip ratio", ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region")),
    ("completion length", ("completion_length",)),
    ("zero-variance groups", ("zero_variance_share",)),
)

# moving average window of the loss curve (a listwise loss over 8 documents swings widely step to step)
SMOOTHING = 10


def moving_average(values: list[float], window: int = SMOOTHING) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_metrics(metrics_path: Path, png: Path) -> None:
    """Curves from metrics.jsonl: loss and schedule, and for stage 1 rewards, format rate,
    KL, entropy, clip ratios, completion length and zero-variance groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    present = sorted({k for r in rows for k in r})
    panels = [(title, [k for pattern in keys for k in fnmatch.filter(present, pattern)]) for title, keys in PLOT_PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    cols = min(4, len(panels))
    n_rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3.2 * n_rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            points = [(s, r[key]) for s, r in zip(steps, rows, strict=True) if r.get(key) is not None]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, label=key, marker="o" if len(points) < 0.5 * len(rows) else None, alpha=0.4 if
                    key == "loss" else 1.0)  # fmt: skip
            if key == "loss" and len(ys) > SMOOTHING:
                ax.plot(xs, moving_average(ys), label=f"loss, mean of {SMOOTHING}")
        ax.set(xlabel="step", title=title)
        if len(keys) > 1 or key == "loss":
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def add_record(path: Path, step: int, values: dict) -> None:
    """Merge `values` into the record of `step` in metrics.jsonl (an evaluation made after the loop)."""
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    for row in rows:
        if row["step"] == step:
            row.update(values)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run logged after the checkpoint it resumes from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def reset_peak_rss() -> None:
    """Start a new high-water mark of this process's resident memory, so that peak_rss_gib() reports
    one stage's peak, not the run's so far (Linux: /proc/self/clear_refs; elsewhere nothing resets)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    """This process's peak resident memory since reset_peak_rss() (VmHWM), in GiB; where /proc is
    absent, the process's peak so far (getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak / (2**30 if sys.platform == "darwin" else 2**20)

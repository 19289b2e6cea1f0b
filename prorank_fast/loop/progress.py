"""What a run shows and leaves behind as it goes: the progress bar, metrics.jsonl, curves.png."""

from __future__ import annotations

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
    ("learning rate", ("lr",)),
    ("reward", ("reward", "reward_format", "reward_correctness")),
    ("valid format rate", ("valid_format_rate",)),
    ("kl / entropy", ("kl", "entropy")),
    ("clip ratio", ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region")),
    ("completion length", ("completion_length",)),
    ("zero-variance groups", ("zero_variance_groups",)),
)


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
    panels = [(title, [k for k in keys if k in rows[0]]) for title, keys in PLOT_PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    cols = min(4, len(panels))
    n_rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3.2 * n_rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key)
        ax.set(xlabel="step", title=title)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run logged after the checkpoint it resumes from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))

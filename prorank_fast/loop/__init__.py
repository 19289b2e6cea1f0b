"""The one training loop and what it stands on.

distributed.py  Dist (rank, world, device, collectives), seeds and RNG states, FSDP2 sharding
checkpoint.py   Checkpointer: DCP shards + JSON/safetensors extra state, atomic, resumable
progress.py     progress bar, metrics.jsonl, curves.png, a stage's peak RSS
loop.py         run_loop (AdamW, warmup + cosine, clipping, checkpoints), StepPlan (data order by step index)
"""

from .checkpoint import Checkpointer
from .distributed import Dist, set_seed, setup_distributed, shard
from .loop import LoopSettings, StepPlan, run_loop, warmup_cosine
from .progress import peak_rss_gib, reset_peak_rss

__all__ = [
    "Checkpointer",
    "Dist",
    "LoopSettings",
    "StepPlan",
    "peak_rss_gib",
    "reset_peak_rss",
    "run_loop",
    "set_seed",
    "setup_distributed",
    "shard",
    "warmup_cosine",
]

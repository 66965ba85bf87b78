"""Whole decode steps of the reference engine, timed: what a profiled table's ``fixed_ms`` misses.

Why here and not in the profiler: pricing a step beyond its verify forward needs something that
runs whole steps. The engine owns that; the profiler receives the samples
(:func:`evict.profiler.auto.price_whole_step`) and never imports the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["engine_step_samples"]


def engine_step_samples(
    model_dir: Path, drafter_dir: Path, *, device: str, dtype: str, grid: Any, width: int
) -> dict[int, list[float]]:
    """Per batch size of ``grid``: per repeat, the median ms of a reference-engine decode step at
    ``width`` (:func:`evict.profiler.timing.decode_step_samples`), on random prompts of the grid's
    context length."""
    from evict.engine import SpecEngine  # noqa: PLC0415 (the package imports this module)
    from evict.models import Eagle3Drafter, Qwen3MoeTarget  # noqa: PLC0415
    from evict.profiler.timing import decode_step_samples  # noqa: PLC0415
    from evict.profiler.torch_backend import DTYPES  # noqa: PLC0415

    target = Qwen3MoeTarget.from_pretrained(model_dir, dtype=DTYPES[dtype], device=device)
    drafter = Eagle3Drafter.from_pretrained(drafter_dir, target, dtype=DTYPES[dtype], device=device)
    engine = SpecEngine(
        target, drafter, mode="static", steps=grid.draft_steps, topk=grid.draft_topk, num_draft_tokens=width
    )
    gen = torch.Generator().manual_seed(0)
    vocab = int(target.config.vocab_size)
    out: dict[int, list[float]] = {}
    with torch.inference_mode():
        for bs in grid.batch_sizes:
            prompts = torch.randint(0, vocab, (bs, grid.context_len), generator=gen).tolist()
            out[int(bs)] = decode_step_samples(engine, prompts, repeats=3, warmup=1)
    return out

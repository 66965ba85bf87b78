"""Pure-PyTorch models of the reference engine: the Qwen3-MoE target and its EAGLE-3 drafter.

``load_testbed()`` returns a small trained pair shipped with the package (made by
``scripts/train_testbed.py``), so the engine, profiler and benchmark run on real routing and real
acceptance behaviour without a model hub; ``load_testbed("moe128")`` picks another by name
(:mod:`evict.models.testbeds`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .cache import KVCache
from .eagle3 import SGLANG_EAGLE3_WEIGHT_NAMES, Eagle3Drafter, eagle3_config, sglang_param_name
from .qwen3_moe import Qwen3MoeTarget, RouterHook, TargetOutput, default_aux_layer_ids
from .testbeds import DEFAULT_TESTBED, TESTBEDS, testbed_dir

__all__ = [
    "KVCache",
    "Qwen3MoeTarget",
    "TargetOutput",
    "RouterHook",
    "Eagle3Drafter",
    "eagle3_config",
    "default_aux_layer_ids",
    "sglang_param_name",
    "SGLANG_EAGLE3_WEIGHT_NAMES",
    "load_testbed",
    "TESTBED_DIR",
    "TESTBEDS",
    "DEFAULT_TESTBED",
    "testbed_dir",
]

TESTBED_DIR = Path(__file__).resolve().parent.parent / "testbed"


def load_testbed(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    name: str | os.PathLike[str] | None = None,
):
    """Load a testbed's (target, drafter, tokenizer) by name or folder (default: the first pair).

    Weights are stored bf16 and upcast to ``dtype``.
    """
    from transformers import AutoTokenizer

    root = testbed_dir(name)
    tdir, ddir = root / "target", root / "drafter"
    target = Qwen3MoeTarget.from_pretrained(tdir, dtype=dtype, device=device)
    drafter = Eagle3Drafter.from_pretrained(ddir, target, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(str(tdir))
    return target, drafter, tokenizer

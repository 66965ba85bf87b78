"""Pure-PyTorch models of the reference engine: the Qwen3-MoE target and its EAGLE-3 drafter.

``load_testbed()`` returns the small trained pair shipped in ``evict/testbed`` (made by
``scripts/train_testbed.py``), so the engine, profiler and benchmark run on real routing and real
acceptance behaviour without a model hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import KVCache
from .eagle3 import SGLANG_EAGLE3_WEIGHT_NAMES, Eagle3Drafter, eagle3_config, sglang_param_name
from .qwen3_moe import Qwen3MoeTarget, RouterHook, TargetOutput, default_aux_layer_ids

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
]

TESTBED_DIR = Path(__file__).resolve().parent.parent / "testbed"


def load_testbed(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Load the shipped (target, drafter, tokenizer); weights are stored bf16 and upcast to ``dtype``."""
    from transformers import AutoTokenizer

    tdir, ddir = TESTBED_DIR / "target", TESTBED_DIR / "drafter"
    for d in (tdir, ddir):
        if not any(d.glob("*.safetensors")):
            raise FileNotFoundError(
                f"testbed weights missing in {d}; retrain them with "
                "`python scripts/train_testbed.py --out evict/testbed` (about 30 minutes on 2 CPU cores)"
            )
    target = Qwen3MoeTarget.from_pretrained(tdir, dtype=dtype, device=device)
    drafter = Eagle3Drafter.from_pretrained(ddir, target, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(str(tdir))
    return target, drafter, tokenizer

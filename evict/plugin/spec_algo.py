"""``EvictSpecAlgo``: the registry entry that makes EVICT behave as EAGLE-3 at every call site.

SGLang dispatches on ``is_*()`` / ``supports_*()`` predicates of the algorithm object rather than
on its class (``CustomSpecAlgo`` duck-types the ``SpeculativeAlgorithm`` enum).  A bare
``CustomSpecAlgo`` answers ``False`` everywhere and the scheduler then takes non-EAGLE paths (no
future map, no top-k, no draft hidden-state capture) and fails at start-up.  EVICT *is* an EAGLE-3
worker with a smaller verify tree, so every predicate and helper delegates to
``SpeculativeAlgorithm.EAGLE3``; only the name, the worker factory and the overlap flag differ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.speculative.spec_registry import CustomSpecAlgo

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs

__all__ = ["EVICT_ALGORITHM_NAME", "EvictSpecAlgo"]

EVICT_ALGORITHM_NAME = "EVICT"
_EAGLE3 = SpeculativeAlgorithm.EAGLE3


class EvictSpecAlgo(CustomSpecAlgo):
    """EAGLE-3 family algorithm whose worker cuts the draft tree before verification."""

    # -- family predicates (all as EAGLE3) ------------------------------------------------------
    def is_eagle(self) -> bool:
        return _EAGLE3.is_eagle()

    def is_eagle3(self) -> bool:
        return _EAGLE3.is_eagle3()

    def is_frozen_kv_mtp(self) -> bool:
        return _EAGLE3.is_frozen_kv_mtp()

    def is_dflash(self) -> bool:
        return _EAGLE3.is_dflash()

    def is_uno(self) -> bool:
        return _EAGLE3.is_uno()

    def is_dspark(self) -> bool:
        return _EAGLE3.is_dspark()

    def is_dflash_family(self) -> bool:
        return _EAGLE3.is_dflash_family()

    def is_standalone(self) -> bool:
        return _EAGLE3.is_standalone()

    def is_ngram(self) -> bool:
        return _EAGLE3.is_ngram()

    # -- capabilities (all as EAGLE3) ---------------------------------------------------------
    def supports_mixed_chunk(self) -> bool:
        return _EAGLE3.supports_mixed_chunk()

    def supports_target_verify_for_draft(self) -> bool:
        return _EAGLE3.supports_target_verify_for_draft()

    def supports_prefill_shared_read_done(self) -> bool:
        return _EAGLE3.supports_prefill_shared_read_done()

    def supports_ragged_verify(self) -> bool:
        # EVICT verifies one width for the whole batch, with the uniform-width verify graphs.
        return _EAGLE3.supports_ragged_verify()

    def supports_grammar_overlap(self) -> bool:
        return _EAGLE3.supports_grammar_overlap()

    def has_draft_kv(self) -> bool:
        return _EAGLE3.has_draft_kv()

    def carries_draft_hidden_states(self) -> bool:
        return _EAGLE3.carries_draft_hidden_states()

    def need_topk(self) -> bool:
        return _EAGLE3.need_topk()

    # -- helpers the scheduler and model runner call ------------------------------------------
    def create_future_map(
        self,
        device: torch.device,
        req_to_token_pool: Any,
        needs_cpu_seq_lens: bool = True,
        needs_confidence_relay: bool = False,
    ) -> Any:
        # FutureMap branches on the algorithm's predicates; EAGLE3's map is the one EVICT needs.
        return _EAGLE3.create_future_map(
            device, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay
        )

    def build_disagg_draft_input(self, batch: Any, last_tokens_tensor: torch.Tensor, future_map: Any) -> Any:
        return _EAGLE3.build_disagg_draft_input(batch, last_tokens_tensor, future_map)

    def resolve_max_speculative_num_draft_tokens(self, server_args: ServerArgs) -> int | None:
        # The full tree N is the widest state EVICT ever runs; KV is reserved for it.
        return _EAGLE3.resolve_max_speculative_num_draft_tokens(server_args)

    def get_num_tokens_per_req_for_target_verify(self, num_draft_tokens: int, is_draft_worker: bool) -> int:
        return _EAGLE3.get_num_tokens_per_req_for_target_verify(num_draft_tokens, is_draft_worker)

    def get_platform_worker_cls(self) -> type | None:
        """``None`` on built-in platforms (as EAGLE3); out-of-tree platforms are not supported.

        EVICT subclasses the CUDA EAGLE worker, so an out-of-tree platform's EAGLE3 replacement
        worker cannot carry the cut; fail with a clear message instead of silently serving EAGLE3.
        """
        from sglang.srt.platforms import current_platform  # noqa: PLC0415 (as SGLang does)

        if not current_platform.is_out_of_tree():
            return None
        raise ValueError(
            f"--speculative-algorithm EVICT runs on SGLang's built-in CUDA worker; the out-of-tree "
            f"platform {type(current_platform).__name__} is not supported. Use --speculative-algorithm EAGLE3."
        )

    def handle_server_args(self, server_args: ServerArgs) -> None:
        """No-op: EVICT's defaults come from the ``handle_speculative_decoding`` resolution hook.

        ``handle_speculative_decoding`` would call this with a write-recording stand-in on which
        EAGLE's handler cannot declare its decisions; the hook instead runs the whole EAGLE3 step
        on the real record (see ``evict.plugin.server_args_hook``).
        """
        return None

"""SGLang integration of EVICT (the only package that imports sglang).

``register`` is the entry point of group ``sglang.srt.plugins`` (see ``pyproject.toml``); SGLang's
``load_plugins()`` calls it with no arguments in the launcher and in every scheduler subprocess.
It registers ``--speculative-algorithm EVICT`` as an EAGLE-3 family algorithm whose worker
(``evict.plugin.worker.EvictWorkerV2``) cuts the draft tree before the verification pass, plus the
server-argument resolution hook that gives EVICT EAGLE-3's defaults and validation.

Importing this package does not import sglang: ``evict.plugin.config`` stays usable (and tested)
without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register", "create_evict_worker"]

_hook_registered = False


def create_evict_worker(server_args: Any) -> type:
    """Worker factory handed to SGLang's registry (imports the CUDA worker only when used)."""
    from evict.plugin.worker import EvictWorkerV2  # noqa: PLC0415 (heavy, scheduler process only)

    return EvictWorkerV2


def register() -> None:
    """Register EVICT with SGLang; idempotent (safe to call once per process, or again).

    Note that SGLang's ``load_plugins`` logs and swallows exceptions raised here, so everything
    that can be wrong with a user's configuration is checked later, in the resolution hook, where
    an error does stop the launch.
    """
    global _hook_registered
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook  # noqa: PLC0415
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: PLC0415
    from sglang.srt.speculative.spec_registry import get_spec  # noqa: PLC0415

    from evict.plugin.server_args_hook import handle_speculative_decoding_evict  # noqa: PLC0415
    from evict.plugin.spec_algo import EVICT_ALGORITHM_NAME, EvictSpecAlgo  # noqa: PLC0415

    if get_spec(EVICT_ALGORITHM_NAME) is None:
        SpeculativeAlgorithm.register(
            EVICT_ALGORITHM_NAME,
            supports_overlap=True,
            spec_class=EvictSpecAlgo,
        )(create_evict_worker)
    if not _hook_registered:
        register_resolution_hook("handle_speculative_decoding")(handle_speculative_decoding_evict)
        _hook_registered = True

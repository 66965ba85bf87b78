"""Run SGLang 0.5.23's real server on a CPU without AMX, for tests and for users without a GPU.

SGLang's CPU engine needs sgl-kernel's CPU operators, which no installable wheel ships (the
``sglang-kernel`` wheel is a CUDA build that fails to load without ``libcuda``). This package
provides pure-torch stand-ins for the operators that serving a Qwen3-MoE target with an EAGLE-3
drafter needs (``evict.testing.cpu_ops``), a shim directory that loads them where ``sgl_kernel``
looks for its library (``evict/testing/shim``), a launcher that puts it all together
(``python -m evict.testing.cpu_server``, see ``docs/cpu_server.md``), and ``CpuServer``
(``evict.testing.server``), which starts, waits for and stops such a server from Python. Nothing
here imports sglang at import time.
"""

from __future__ import annotations

__all__: list[str] = []

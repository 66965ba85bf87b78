"""``evict-bench``: autoregressive vs static EAGLE-3 trees vs EVICT on the reference engine.

Modules: ``stats`` (report arithmetic), ``hooks`` (expert counting, MoE-Spec budget), ``prompts``
(held-out code and prose), ``modes`` (static trees, sweep grid), ``runner`` (interleaved timed
runs), ``report`` (Markdown, JSON, plots), ``cli`` (the console script).
"""

"""Plot of a cost table: verify latency vs width (one line per batch size) and expert union vs width.

Why: the width EVICT picks depends on the *shape* of T(bs, m) (flat, linear, staircase), which a
plot shows at a glance; the expert-union panel shows whether the cost growth tracks the number of
experts touched, and where routing is far from the uniform-routing curve E*(1-(1-k/E)^n).
"""

from __future__ import annotations

import os
from pathlib import Path

from evict.boundary import current_umask
from evict.profiler.experts import latency_union_correlation, uniform_union
from evict.profiler.table import CostTable


def plot_table(table: CostTable, out: str | os.PathLike[str]) -> Path:
    """Write a two-panel PNG for ``table`` to ``out`` and return its path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = table.metadata
    has_union = table.expert_union is not None and any(v > 0 for row in table.expert_union for v in row)
    ncols = 2 if has_union else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.2 * ncols, 4.4), squeeze=False)
    ax = axes[0][0]
    for i, bs in enumerate(table.batch_sizes):
        (line,) = ax.plot(table.widths, table.median[i], marker="o", ms=3, label=f"bs={bs}")
        ax.fill_between(table.widths, table.p10[i], table.p90[i], color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("verified tokens per request (width m, root included)")
    ax.set_ylabel("verify latency, ms (median, p10-p90 band)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    title = (
        f"{meta.get('model_id')} on {meta.get('device')}\n{meta.get('dtype')}, ctx {meta.get('context_len')}"
    )
    if table.fixed_ms is not None:
        fixed = ", ".join(f"bs={b}: {v:.1f}" for b, v in zip(table.batch_sizes, table.fixed_ms))
        title += f"; + fixed_ms (drafting) {fixed}"
    ax.set_title(title, fontsize=9)

    if has_union:
        ax = axes[0][1]
        for i, bs in enumerate(table.batch_sizes):
            r = latency_union_correlation(table.median[i], table.expert_union[i])
            ax.plot(
                table.widths,
                table.expert_union[i],
                marker="o",
                ms=3,
                label=f"bs={bs} (measured; r={r:.2f} with latency)",
            )
        experts, top_k = meta.get("num_experts"), meta.get("top_k")
        if isinstance(experts, int) and isinstance(top_k, int) and experts > 0 and top_k > 0:
            bs0 = table.batch_sizes[0]
            ax.plot(
                table.widths,
                [uniform_union(experts, top_k, bs0 * w) for w in table.widths],
                ls="--",
                color="gray",
                label=f"uniform routing, bs={bs0}",
            )
            ax.axhline(experts, color="black", lw=0.8, ls=":")
            ax.set_ylim(0, experts * 1.05)
        ax.set_xlabel("verified tokens per request (width m)")
        ax.set_ylabel("experts per MoE layer (batch union)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"activated experts, mean over layers (tokens: {meta.get('tokens', '?')})", fontsize=9)
    for row in axes:
        for a in row:
            # widths are roughly geometric (1, 2, 4, ... 64): a log2 axis shows the small widths
            # where the choice is made
            a.set_xscale("log", base=2)
            a.set_xticks(table.widths)
            a.set_xticklabels([str(w) for w in table.widths], fontsize=7)
            a.minorticks_off()
    fig.tight_layout()
    # a temporary sibling renamed into place: an interrupt never leaves a half-written PNG
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out

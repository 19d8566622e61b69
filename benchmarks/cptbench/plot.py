"""The benchmark's figure, ``performance.png``: step time against batch, classification throughput."""

from __future__ import annotations

import io
from pathlib import Path

from cptbench.numbers import grid_axes, median_time, train_row
from cptbench.settings import CLASSIFY_IMPLS
from cptune.cpt.saving import write_file_atomic


def plot_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots, batches = grid_axes(results)
    fig, axes = plt.subplots(1, len(shots) + 1, figsize=(5 * (len(shots) + 1), 4))
    styles = {"cptune": ("tab:blue", "o", "cptune"), "peft": ("tab:red", "s", "PEFT"),
              "peft-nocache": ("tab:orange", "^", "PEFT use_cache=False")}
    for ax, s in zip(axes[:-1], shots, strict=True):
        cfgs = [c for b in batches if (c := train_row(results, s, b)) is not None]
        for impl, (color, marker, label) in styles.items():
            ax.plot([c["batch"] for c in cfgs], [median_time(c, impl) for c in cfgs], marker=marker, color=color,
                    label=label)
        ax.set(title=f"training step, {s} shots ({cfgs[0]['context_tokens']} context tokens)", xlabel="batch",
               ylabel="seconds (median)", xticks=batches, ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[-1]
    cls = sorted(results["classify"], key=lambda c: c["shots"]) or [{"shots": 0, "examples": 0, "impls": {
        impl: {"examples_per_s": 0.0} for impl in CLASSIFY_IMPLS}}]
    width = 0.27
    names = {"cptune": "cptune (cached context)", "peft": "PEFT", "floor": "queries alone (floor)"}
    for k, (impl, color) in enumerate(zip(CLASSIFY_IMPLS, ("tab:blue", "tab:red", "tab:gray"), strict=True)):
        bars = ax.bar([i + (k - 1) * width for i in range(len(cls))],
                      [c["impls"][impl]["examples_per_s"] for c in cls], width, color=color, label=names[impl])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    top = max(c["impls"][impl]["examples_per_s"] for c in cls for impl in CLASSIFY_IMPLS) or 1.0
    ax.set(title=f"classification, {cls[0]['examples']} examples, batch 8", ylabel="examples / s",
           xticks=range(len(cls)), xticklabels=[f"{c['shots']} shots" for c in cls], ylim=(0, 1.3 * top))
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    m = results["machine"]
    fig.suptitle(f"cptune vs PEFT {m['peft']} CPT, SmolLM2-135M fp32, {m['cpu']} ({m['cores']} cores)", fontsize=10)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    write_file_atomic(path, image.getvalue())
    plt.close(fig)

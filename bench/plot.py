"""Tokens/s and GPU peak against sequence length, one line per run label (mode), from training-bench JSON.

    python bench/plot.py 'bench/results/alst_*_llama3.2-3b_*.json' --out docs/alst_llama3.2-3b

writes ``<out>_tokens_per_s.png`` and ``<out>_gpu_peak.png``. A length that ran out of memory is an ``x``
at the bottom of the rate plot and at the memory it had reached on the peak plot; a line stops at its
last length that trained. A fit probe (``--probe_layers``: no step finished, so no rate) is left out; the
report's tables list it. Needs matplotlib (``pip install -e ".[plot]"``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict
import sys
from typing import Dict, List, NamedTuple, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.models import run_model_name  # noqa: E402


class Point(NamedTuple):
    """One run of ``bench_train.py`` as the plots see it."""

    label: str
    model: str
    seq_len: int
    tokens_per_s: Optional[float]  # None: out of memory
    peak_gib: Optional[float]  # steady-state peak, or the peak when it ran out of memory


def point(d: Dict) -> Optional[Point]:
    """The run as a point, or None for a fit probe (``--probe_layers``: no step finished, so no rate; the
    report's tables list it) and for a run of warm-up steps only or one stopped from outside (no steady rate)."""
    if d.get("probe_layers") and "oom" not in d:
        return None
    s = d.get("summary") or {}
    if "oom" not in d and not s.get("tokens_per_s"):
        return None
    label = d.get("label") or d["mode"]
    if "oom" in d:
        return Point(label, run_model_name(d), d["seq_len"], None, d["oom"].get("peak_gib"))
    return Point(label, run_model_name(d), d["seq_len"], s.get("tokens_per_s"),
                 s.get("steady_peak_gib", s.get("peak_gib")))


def load_points(patterns: List[str]) -> List[Point]:
    paths = sorted({p for pat in patterns for p in glob.glob(pat)})
    if not paths:
        raise SystemExit(f"no JSON matches {patterns}")
    return [p for p in (point(json.load(open(path))) for path in paths) if p is not None]


def plot(points: List[Point], out: str, title: str = "") -> List[str]:
    """Draw the two plots; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several_models = len({p.model for p in points}) > 1
    by_label: Dict[str, List[Point]] = defaultdict(list)
    for p in sorted(points, key=lambda p: p.seq_len):
        by_label[f"{p.model}: {p.label}" if several_models else p.label].append(p)
    written = []
    for key, ylabel, suffix in (("tokens_per_s", "tokens/s", "tokens_per_s"),
                                ("peak_gib", "GPU peak, GiB", "gpu_peak")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, pts in by_label.items():
            ok = [p for p in pts if p.tokens_per_s is not None]
            line, = ax.plot([p.seq_len for p in ok], [getattr(p, key) for p in ok], marker="o", label=label)
            oom = [p for p in pts if p.tokens_per_s is None]
            if oom:
                ys = [0 if key == "tokens_per_s" or p.peak_gib is None else p.peak_gib for p in oom]
                ax.plot([p.seq_len for p in oom], ys, linestyle="none", marker="x", markersize=10,
                        color=line.get_color(), label=f"{label}: out of memory")
        ax.set_xscale("log", base=2)
        lengths = sorted({p.seq_len for p in points})
        ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.set_xlabel("sequence length, tokens")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title)
        path = f"{out}_{suffix}.png"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="JSON files or glob patterns")
    ap.add_argument("--out", required=True, help="path prefix of the PNGs")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    for path in plot(load_points(args.json), args.out, args.title):
        print(path)


if __name__ == "__main__":
    main()

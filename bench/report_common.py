"""What the report's sections share: the committed results, their header line, number formatting."""
from __future__ import annotations

import glob
import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load(pattern):
    return [(os.path.basename(p), json.load(open(p))) for p in sorted(glob.glob(os.path.join(HERE, pattern)))]


def header(name, d):
    v = d["versions"]
    gpus = d.get("gpus") or ["?"]
    # settings of the run that live in the environment, not the command line (the allocator's, for one)
    env = "".join(f"{k}={v} " for k, v in d.get("env", {}).items() if k == "PYTORCH_CUDA_ALLOC_CONF")
    return (f"**`bench/results/{name}`**: {len(gpus)} x {gpus[0]}, torch {v['torch']}, cuDNN {v.get('cudnn')}, "
            f"deepspeed {v.get('deepspeed')}, commit `{d.get('commit')}`, {d['date']}  \n"
            f"`{env}{d['command']}`\n")


def f(x, spec=".3f"):
    return "" if x is None else format(x, spec)

"""Two "nodes" on one machine (``torchrun --nnodes 2 --nproc_per_node 2``, CPU, gloo): the node layout comes
from the launcher's environment, Ulysses groups stay inside a node while rings span them, the attention equals
the float64 reference, ZeRO-3 training through ``ds_longctx.initialize`` equals one process, and a Ulysses group
across nodes raises on every rank (warns when the user insists)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from ds_longctx.nodes import cross_node_ulysses
from tests import deepspeed_cases
from tests.multinode_job import TRAIN_BATCH, TRAIN_SEQ, TRAIN_STEPS

RTOL = 1e-5  # fp32, as tests/test_deepspeed_integration.py: relative to each tensor's norm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_under_torchrun_keep_ulysses_inside_a_node_and_rings_across(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("DS_LONGCTX_ALLOW_CROSS_NODE_ULYSSES", None)
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(n),
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "tests/multinode_job.py", str(tmp_path)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in nodes), "\n".join(log[-3000:] for log in logs)
    seen = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(4)]

    assert [s["node"].endswith(f"GROUP_RANK={r // 2}") for r, s in enumerate(seen)] == [True] * 4
    assert [(s["local_rank"], s["local_world_size"]) for s in seen] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [s["ulysses_ranks"] for s in seen] == [[0, 1], [0, 1], [2, 3], [2, 3]]  # inside each node
    assert [s["ring_ranks"] for s in seen] == [[0, 2], [1, 3], [0, 2], [1, 3]]  # across the nodes
    for s in seen:
        assert all(err < 1e-5 for err in s["errors"].values()), s["errors"]
        assert "Ulysses group [0, 1, 2, 3] spans nodes" in s["spanning"], s["spanning"]
        assert "choose ulysses_degree dividing 2 and raise ring_degree" in s["spanning"]
        assert "spans nodes" in s["insisted_warning"] and s["insisted_ranks"] == [0, 1, 2, 3]
    assert len({s["spanning"] for s in seen}) == 1  # word for word on every rank

    # training across the two nodes (ZeRO-3, U 2 inside a node x R 2 across) equals one process
    reference = deepspeed_cases.train_single_process("llama", 1, TRAIN_STEPS, TRAIN_SEQ, TRAIN_BATCH)
    want = [step[0] for step in reference["losses"]]
    for s in seen:
        assert s["trained_dp"] == 1 and s["losses"] == pytest.approx(want, rel=RTOL), (s["losses"], want)
    final = torch.load(tmp_path / "params.pt")
    initial = deepspeed_cases.build_model("llama", TRAIN_SEQ).state_dict()
    assert set(final) == set(reference["params"])
    for name, ref in reference["params"].items():
        assert _rel(initial[name], ref) > 100 * RTOL, name  # training moved it far beyond the tolerance
        assert _rel(final[name], ref) < RTOL, f"{name}: rel error {_rel(final[name], ref):.2e}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("nodes,groups,spanning", [
    (["a", "a", "b", "b"], [[0, 1], [2, 3]], None),
    (["a", "a", "b", "b"], [[0, 1, 2, 3]], "rank 1 on a, rank 2 on b"),
    (["a", "a", "a", "b", "b", "b"], [[0, 1], [2, 3], [4, 5]], "Ulysses group [2, 3] spans nodes"),
])
def test_a_ulysses_group_on_more_than_one_node_is_named(nodes, groups, spanning):
    problem = cross_node_ulysses(groups, nodes)
    assert (problem is None) if spanning is None else (spanning in problem), problem

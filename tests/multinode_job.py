"""Run by torchrun as one of two "nodes" on this machine (tests/test_multinode.py): every rank writes what it
saw to ``<out>/rank<R>.json``: its node, the groups of a Ulysses 2 x ring 2 topology and that topology's
attention against the float64 reference, then what a Ulysses group of 4 (spanning both nodes) raised, and
that it runs, warned, when the user insists; then a few steps of ZeRO-3 training of a tiny Llama through
``ds_longctx.initialize`` on the Ulysses 2 x ring 2 layout: its losses, and on rank 0 the final parameters
(``<out>/params.pt``), for the test to compare with one process."""
from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

from ds_longctx.nodes import this_node
from ds_longctx.topology import Topology, TopologyError
from tests import deepspeed_cases, dist_cases

# the training of tests/test_multinode.py's single-process reference
TRAIN_STEPS, TRAIN_SEQ, TRAIN_BATCH = 4, 48, 2


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    seen = {"node": this_node(), "local_rank": int(os.environ["LOCAL_RANK"]),
            "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"])}
    hybrid = dist_cases.topology(2, 2)
    seen["ulysses_ranks"], seen["ring_ranks"] = hybrid.ulysses_ranks, hybrid.ring_ranks
    seen["errors"] = dist_cases.attention_vs_reference(2, 2, 1, 32, 4, 2, 8, True)
    try:
        Topology(ulysses=4, ring=1)
        seen["spanning"] = "no error"
    except TopologyError as exc:
        seen["spanning"] = str(exc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        insisted = Topology(ulysses=4, ring=1, allow_cross_node_ulysses=True)
    seen["insisted_warning"] = " ".join(str(w.message) for w in caught)
    seen["insisted_ranks"] = insisted.ulysses_ranks
    insisted.destroy()
    dist_cases.release_topologies()
    trained = deepspeed_cases.train_with_deepspeed("llama", 2, 2, TRAIN_STEPS, TRAIN_SEQ, TRAIN_BATCH)
    seen["losses"], seen["trained_dp"] = trained["losses"], trained["info"]["dp"]
    if rank == 0:
        torch.save(trained["params"], os.path.join(out_dir, "params.pt"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

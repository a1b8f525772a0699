"""moefx.distributed across two gloo processes started by torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

# each rank records what computed_on_first gave it; ranks hold equal `held` tensors, as they hold the experts
_RANK = """
import json, sys, torch, torch.distributed as dist
from moefx.distributed import computed_on_first, sharded

dist.init_process_group("gloo")
rank = dist.get_rank()
held = [torch.full((2, 3), float(i)) for i in range(3)]
computed = []

def plan():
    computed.append(rank)
    fresh = torch.arange(6.0).reshape(2, 3).T  # not contiguous
    return {"groups": [[0, 2], [1]], "kept": held[1], "fresh": fresh, "fresh again": fresh}

def failing_plan():
    raise ValueError("experts=3 keeps fewer than top_k")

with sharded():
    result = computed_on_first(plan, held)
    try:
        computed_on_first(failing_plan)
        error = None
    except ValueError as e:
        error = str(e)
json.dump({"computed": computed, "groups": result["groups"], "kept is held": result["kept"] is held[1],
           "fresh": result["fresh"].tolist(), "fresh once": result["fresh"] is result["fresh again"],
           "error": error}, open(f"{sys.argv[1]}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_rank_zero_alone_computes_and_every_rank_gets_its_result(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["computed"] == [0] and second["computed"] == []
    expected = torch.arange(6.0).reshape(2, 3).T.tolist()
    for rank in (first, second):
        assert rank["groups"] == [[0, 2], [1]]
        assert rank["fresh"] == expected  # sent as a tensor, values exact (a broadcast copies bytes)
        assert rank["kept is held"]  # a held tensor is the rank's own, not a copy
        assert rank["fresh once"]  # one tensor referenced twice arrives as one tensor
        assert rank["error"] == "experts=3 keeps fewer than top_k"

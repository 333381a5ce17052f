"""The update ratio in rotating rounds under torch.distributed (2 CPU processes, gloo, DDP and FSDP2).

Every rank must copy the same layers at the same step (the round follows from the step number)
and sum the same pieces, so each measured layer's ratio equals the single-process reference.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import (CLIP, LR, WORLD, _free_port, global_batch, layer_of, lm_loss,  # noqa: E402
                              make_model, rank_batch)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test runs on Linux/macOS"),
]

STEPS = 10


def _budget() -> int:
    """The largest layer's bytes (and alignment): every layer fits whole, and several rounds are needed."""
    model = make_model()
    return max(sum(p.numel() * p.element_size() + 64 for p in m.parameters(recurse=False)) for m in model.modules())


def _run(rank: int, model, budget: int) -> dict:
    import gradwatch as gw

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    watch = gw.Watch(model, opt, clip_norm=CLIP, update_ratio_every=1, update_ratio_budget=budget, diagnose=False)
    for step in range(STEPS):
        x, y = rank_batch(step, rank)
        watch.step(lambda: lm_loss(model, x, y))
    out = {"records": [dict(zip(r.layer_names, r.update_ratio.tolist())) for r in watch.history],
           "rounds": len(watch._pipeline.ratio.rounds),
           "partial": sorted({s for r in watch._pipeline.ratio.rounds for s in r.partial}),
           "errors": sorted(where for where, _ in watch.errors.seen)}
    watch.close()
    return out


def _worker(rank: int, port: int, out: str) -> None:
    import traceback

    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    res: dict = {}
    try:
        budget = _budget()
        res["ddp"] = _run(rank, DDP(make_model()), budget)
        model = make_model()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        res["fsdp"] = _run(rank, model, budget)
        model = make_model()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        res["fsdp_sliced"] = _run(rank, model, 1024)  # below the largest layers: measured on slices
    except BaseException as exc:  # noqa: BLE001 - hand the failure to the parent
        res = {"error": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}
    torch.distributed.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(res))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as test_distributed.py: no interpreter teardown under gloo


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist_ratio")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("distributed workers did not finish in 150 s (deadlock?)")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


def reference_ratios() -> list[dict[str, float]]:
    """Plain torch on the concatenated batch: ||dw|| / ||w|| of every layer on every step."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for step in range(STEPS):
        x, y = global_batch(step)
        lm_loss(model, x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        delta: dict[str, float] = {}
        norm: dict[str, float] = {}
        for n, p in model.named_parameters():
            delta[layer_of(n)] = delta.get(layer_of(n), 0.0) + float((p.detach() - before[n]).double().pow(2).sum())
            norm[layer_of(n)] = norm.get(layer_of(n), 0.0) + float(before[n].double().pow(2).sum())
        out.append({k: math.sqrt(delta[k] / norm[k]) for k in delta})
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_each_measured_layer_matches_the_single_process_reference(ranks, mode):
    reference = reference_ratios()
    a, b = ranks[0][mode], ranks[1][mode]
    assert a["rounds"] >= 3 and not a["partial"] and not a["errors"] and not b["errors"]
    seen: set[str] = set()
    for step, (ra, rb, ref) in enumerate(zip(a["records"], b["records"], reference), 1):
        measured = {k for k, v in ra.items() if not math.isnan(v)}
        assert measured and measured == {k for k, v in rb.items() if not math.isnan(v)}  # the same round on both ranks
        seen |= measured
        for name in measured:
            assert ra[name] == pytest.approx(ref[name], rel=1e-4, abs=1e-9), (step, name)
            assert rb[name] == pytest.approx(ra[name], rel=1e-9)
    assert seen == set(reference[0])  # every layer within the run's measurements


def test_fsdp_slices_agree_across_ranks_and_are_finite(ranks):
    a, b = ranks[0]["fsdp_sliced"], ranks[1]["fsdp_sliced"]
    assert a["partial"] and not a["errors"] and not b["errors"]
    for ra, rb in zip(a["records"], b["records"]):
        values = [v for v in ra.values() if not math.isnan(v)]
        assert values and all(v > 0 for v in values)
        assert ra == pytest.approx(rb, rel=1e-9, nan_ok=True)

"""Which rank, do ranks agree: 2 CPU processes under gloo (one spawn for every scenario).

- Which rank: under DDP gradwatch's comm hook flags the rank whose *local* gradients
  were non-finite before the all-reduce; the finding names it, only it replays, the
  run directory's bundle and bad-batch line hold its batch. The hook must not change
  the averaged gradients: they are compared bit for bit with plain DDP (no hook).
- Do ranks agree: one rank's weights perturbed is a ``rank_divergence`` naming the
  layer and the rank; an unperturbed run is quiet.

The references are independent: torch's own DDP without any hook, the batches each
rank was given (rebuilt here), and the perturbation the worker made.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from test_distributed import WORLD, _free_port, lm_loss, make_model, rank_batch

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test runs on Linux/macOS"),
]

LR = 0.05


def _nan_grad_term(model: torch.nn.Module, rank: int, bad_rank: int) -> torch.Tensor:
    """0 in the forward on every rank; on ``bad_rank`` its backward is NaN (d sqrt(u)/du at u = 0 is inf, times 0)."""
    if rank != bad_rank:
        return torch.zeros(())
    return torch.sqrt((model.module.head.weight * 0.0).sum())


def _which_rank(rank: int, out: Path) -> dict:
    import gradwatch as gw
    from torch.nn.parallel import DistributedDataParallel as DDP
    from gradwatch.nonfinite.badbatches import fingerprint

    res: dict = {}
    # 1. the hook changes no gradient: plain DDP (no hook) and watched DDP, same weights, same batch
    plain, watched = DDP(make_model()), DDP(make_model())
    opt = torch.optim.SGD(watched.parameters(), lr=LR)
    watch = gw.Watch(watched, opt, run_dir=out / "run", diagnose=False, agree_every=None)
    res["hooked"] = watch._dist.hooked
    x, y = rank_batch(0, rank)
    lm_loss(plain, x, y).backward()
    hook_calls = []
    original = torch.distributed.all_reduce

    def counting(tensor, *args, **kwargs):
        hook_calls.append((sys._getframe(1).f_code.co_name, tensor.numel()))
        return original(tensor, *args, **kwargs)

    torch.distributed.all_reduce = counting
    try:
        loss = lm_loss(watched, x, y)
        loss.backward()
        grads = [p.grad.clone() for p in watched.parameters()]
        watch.observe(loss)  # the Watch measures; this test steps the optimizer itself
    finally:
        torch.distributed.all_reduce = original
    opt.step()
    opt.zero_grad()
    res["grads_equal"] = all(torch.equal(a.grad, b) for a, b in zip(plain.parameters(), grads))
    res["all_reduces"] = hook_calls
    res["n_params"] = sum(p.numel() for p in watched.parameters())

    # 2. a NaN made only in rank 1's backward (its loss is finite): named by the hook's flag
    x, y = rank_batch(1, rank)
    r = watch.step(lambda: lm_loss(watched, x, y) + _nan_grad_term(watched, rank, 1), batch=(x, y))
    plugin = next(p for p in watch.plugins if p.name == "nonfinite")
    res["backward_nan"] = {"skipped": r.skipped, "findings": [f.to_dict() for f in r.findings],
                           "replays": plugin.replays, "step": r.step,
                           "fingerprint_rank1": fingerprint(rank_batch(1, 1))}
    # 3. a NaN loss on rank 0 only (the flag of the loss, not of the gradients)
    x, y = rank_batch(2, rank)
    r = watch.step(lambda: lm_loss(watched, x, y) + (float("nan") if rank == 0 else 0.0), batch=(x, y))
    res["loss_nan"] = {"findings": [f.to_dict() for f in r.findings], "step": r.step}
    res["run_dir"] = str(watch.run_dir) if watch.run_dir is not None else None
    res["errors"] = sorted(where for where, _ in watch.errors.seen)
    watch.close()

    # 4. a restarted run skips rank 1's bad batch on every rank (the ranks agree)
    torch.distributed.barrier()  # rank 0 has written bad_batches.jsonl (a real restart is a new launch)
    restarted = gw.Watch(watched, opt, run_dir=out / "run", diagnose=False, skip_bad_batches=True, agree_every=None)
    res["skip"] = {"bad": restarted.should_skip(rank_batch(1, rank)),  # rank 1's own bad batch; rank 0's is healthy
                   "healthy": restarted.should_skip(rank_batch(0, rank)), "known": len(restarted.bad_batches)}
    restarted.close()

    # 5. the user's own comm hook is kept: ranks then come from the loss alone
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    own = DDP(make_model())
    own.register_comm_hook(None, allreduce_hook)
    watch = gw.Watch(own, torch.optim.SGD(own.parameters(), lr=LR), diagnose=False, agree_every=None)
    x, y = rank_batch(0, rank)
    r = watch.step(lambda: lm_loss(own, x, y) * (float("nan") if rank == 1 else 1.0), batch=(x, y))
    res["own_hook"] = {"hooked": watch._dist.hooked, "kept": [h.__name__ for h, _ in own._comm_hooks],
                       "findings": [f.to_dict() for f in r.findings]}
    watch.close()
    return res


def _agreement(rank: int) -> dict:
    import gradwatch as gw
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict = {}
    for perturb in (False, True):
        model = DDP(make_model())
        watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=LR), clip_norm=1.0, diagnose=False,
                         agree_every=2)
        codes = []
        for step in range(1, 5):
            if perturb and step == 3 and rank == 1:
                with torch.no_grad():
                    model.module.blocks[1].fc.weight[0, 0] += 1e-4  # rank 1 only: the replicas now differ
            x, y = rank_batch(step % 3, rank)
            r = watch.step(lambda: lm_loss(model, x, y))
            codes.append([f.to_dict() for f in r.findings if f.code == "rank_divergence"])
        res["perturbed" if perturb else "clean"] = codes
        watch.close()
    return res


def _backward_nan_hook(module, args, output):
    """Forward: adds 0. Backward: d sqrt(u)/du at u = 0 is inf, times 0 is NaN, into every gradient upstream."""
    return output + torch.sqrt((output * 0.0).sum()) * 0.0


def _fsdp_ranks(rank: int) -> dict:
    import gradwatch as gw
    from test_distributed import _fsdp_model

    from gradwatch.distributed import local_tensor

    plain, model = _fsdp_model(), _fsdp_model()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=LR), diagnose=False)
    res = {"hooked": watch._dist.hooked}
    x, y = rank_batch(0, rank)
    lm_loss(plain, x, y).backward()
    loss = lm_loss(model, x, y)
    loss.backward()  # through the wrapped reduce-scatter
    res["grads_equal"] = all(torch.equal(local_tensor(a.grad), local_tensor(b.grad))
                             for a, b in zip(plain.parameters(), model.parameters()))
    watch.observe(loss)
    model.zero_grad(set_to_none=True)
    r = watch.step(lambda: lm_loss(model, x, y) * (float("nan") if rank == 1 else 1.0), batch=(x, y))
    res["loss_nan"] = [f.to_dict() for f in r.findings]
    handle = model.blocks[1].register_forward_hook(_backward_nan_hook) if rank == 1 else None
    r = watch.step(lambda: lm_loss(model, x, y), batch=(x, y))
    if handle is not None:
        handle.remove()
    res["backward_nan"] = {"loss": r.loss, "skipped": r.skipped, "findings": [f.to_dict() for f in r.findings]}
    r = watch.step(lambda: lm_loss(model, x, y), batch=(x, y))
    res["healthy_after"] = r.skipped
    watch.close()
    return res


def _worker(rank: int, port: int, out: str) -> None:
    import traceback

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    out_path = Path(out)
    try:
        res = {"which": _which_rank(rank, out_path), "agree": _agreement(rank), "fsdp": _fsdp_ranks(rank)}
    except BaseException as exc:  # noqa: BLE001 - hand the failure to the parent
        res = {"error": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}
    torch.distributed.destroy_process_group()
    (out_path / f"rank{rank}.json").write_text(json.dumps(res))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see test_distributed._worker: gloo workers of torch 2.13 may abort at interpreter exit


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
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
    for res in results:
        res["out"] = out
    return results


def _error(findings: list[dict]) -> dict:
    errors = [f for f in findings if f["severity"] == "error"]
    assert len(errors) == 1, findings
    return errors[0]


# ----- which rank ----------------------------------------------------------------------------
@pytest.mark.slow
def test_the_comm_hook_leaves_the_averaged_gradients_bit_identical(ranks):
    for res in ranks:
        which = res["which"]
        assert which["hooked"]
        assert which["grads_equal"]  # torch.equal with plain DDP, every parameter
        # the hook's all-reduce replaces DDP's (one per bucket, the gradients' size); gradwatch's own is 3 numbers
        hook = [n for where, n in which["all_reduces"] if where == "flagging_allreduce_hook"]
        own = [n for where, n in which["all_reduces"] if where != "flagging_allreduce_hook"]
        assert sum(hook) == which["n_params"] and own == [3]


@pytest.mark.slow
def test_a_nan_made_in_one_ranks_backward_names_that_rank(ranks):
    findings = [_error(res["which"]["backward_nan"]["findings"]) for res in ranks]
    assert findings[0] == findings[1]  # every rank keeps the same finding
    f = findings[0]
    assert f["evidence"]["nonfinite_ranks"] == {"loss": [], "gradients": [1]}  # rank 0's local gradients were finite
    assert f["evidence"]["rank"] == 1 and f["location"]["rank"] == 1
    assert "rank 1 of 2" in f["message"] and "rank 0" not in f["message"]
    assert f["code"] == "nonfinite_backward" and f["location"]["phase"] == "backward"  # rank 1's replay located it
    assert f["evidence"]["verdict"] == "reproduced"
    assert [res["which"]["backward_nan"]["replays"] for res in ranks] == [0, 1]  # only rank 1 replayed


@pytest.mark.slow
def test_the_bundle_and_the_bad_batch_line_are_the_bad_ranks(ranks):
    from gradwatch.nonfinite import load_bundle

    step = ranks[0]["which"]["backward_nan"]["step"]
    run = Path(ranks[0]["which"]["run_dir"])
    assert ranks[1]["which"]["run_dir"] is None  # only rank 0 writes
    bundle = load_bundle(run / "nonfinite" / f"step_{step:06d}.pt")
    x1, y1 = rank_batch(1, 1)  # rank 1's batch of that step, rebuilt here
    assert torch.equal(bundle["batch"][0], x1) and torch.equal(bundle["batch"][1], y1)
    assert not torch.equal(bundle["batch"][0], rank_batch(1, 0)[0])
    lines = [json.loads(line) for line in (run / "bad_batches.jsonl").read_text().splitlines()]
    assert [(b["step"], b["rank"]) for b in lines] == [(step, 1), (step + 1, 0)]
    assert lines[0]["fingerprint"] == ranks[0]["which"]["backward_nan"]["fingerprint_rank1"]
    assert lines[0]["verdict"] == "reproduced"


@pytest.mark.slow
def test_a_nan_loss_names_its_rank_from_the_loss_flag(ranks):
    f = _error(ranks[0]["which"]["loss_nan"]["findings"])
    assert f["evidence"]["nonfinite_ranks"]["loss"] == [0] and f["evidence"]["rank"] == 0
    assert f["location"]["phase"] == "loss"


@pytest.mark.slow
def test_a_restarted_run_skips_the_bad_batch_on_every_rank(ranks):
    for res in ranks:
        assert res["which"]["skip"] == {"bad": True, "healthy": False, "known": 2}


@pytest.mark.slow
def test_the_users_own_comm_hook_is_kept_and_the_loss_still_names_the_rank(ranks):
    for res in ranks:
        own = res["which"]["own_hook"]
        assert not own["hooked"] and own["kept"] == ["allreduce_hook"]
        f = _error(own["findings"])
        assert f["evidence"]["nonfinite_ranks"] == {"loss": [1], "gradients": []} and f["evidence"]["rank"] == 1


@pytest.mark.slow
def test_fsdp2_names_the_rank_from_its_local_loss_and_its_unsharded_gradients(ranks):
    for res in ranks:
        fsdp = res["fsdp"]
        assert fsdp["hooked"]  # every fully_shard module's reduce-scatter is wrapped
        assert fsdp["grads_equal"]  # the wrapped reduce-scatter gives plain FSDP2's gradient shards, bit for bit
        f = _error(fsdp["loss_nan"])
        assert f["evidence"]["nonfinite_ranks"]["loss"] == [1] and f["evidence"]["rank"] == 1
        nan = fsdp["backward_nan"]
        assert nan["skipped"] and nan["loss"] == nan["loss"]  # the loss was finite (not NaN) on every rank
        f = _error(nan["findings"])
        assert f["evidence"]["nonfinite_ranks"] == {"loss": [], "gradients": [1]}, f["evidence"]["nonfinite_ranks"]
        assert f["evidence"]["rank"] == 1 and "rank 1 of 2" in f["message"]
        assert not fsdp["healthy_after"]


@pytest.mark.slow
def test_no_internal_errors_on_the_way(ranks):
    for res in ranks:
        assert res["which"]["errors"] == []


# ----- do ranks agree --------------------------------------------------------------------------
@pytest.mark.slow
def test_replicas_in_sync_raise_nothing(ranks):
    for res in ranks:
        assert res["agree"]["clean"] == [[], [], [], []]


@pytest.mark.slow
def test_one_ranks_perturbed_weights_are_a_rank_divergence_naming_layer_and_rank(ranks):
    for res in ranks:
        per_step = res["agree"]["perturbed"]
        assert per_step[:3] == [[], [], []]  # checked on step 1 and 2 (in sync); step 3 is not a check step
        (f,) = per_step[3]
        assert f["severity"] == "error" and f["step"] == 4
        assert f["evidence"]["layer"] == "blocks.1.fc" and f["evidence"]["ranks"] == [1]
        assert f["location"]["module"] == "blocks.1.fc"
        sums = f["evidence"]["values"]["sum"]
        assert sums[0] != sums[1]
    assert ranks[0]["agree"]["perturbed"][3] == ranks[1]["agree"]["perturbed"][3]


# ----- the pure comparison (one process) -----------------------------------------------------------
def test_divergence_finding_names_the_first_layer_and_the_minority():
    from gradwatch.replicas import divergence_finding

    same = [1.0, 2.0, 3.0, 4.0, 1.0, 0.0]  # 2 layers: sums, norms; clip coefficient; skipped
    rows = np.array([same, same, [1.0, 2.5, 3.0, 4.5, 1.0, 0.0]])  # rank 2's layer "b" differs
    f = divergence_finding(10, ["a", "b"], rows)
    assert f.evidence["layer"] == "b" and f.evidence["ranks"] == [2] and f.evidence["later_layers"] == 0
    rows = np.array([same, [1.0, 2.0, 3.0, 4.0, 0.5, 0.0]])  # weights agree, the clip decision does not
    f = divergence_finding(10, ["a", "b"], rows)
    assert f.evidence["layer"] is None and f.evidence["ranks"] == [1] and "clip" in f.message
    nan = [float("nan"), 2.0, float("nan"), 4.0, 1.0, 0.0]  # an unmeasured layer's NaN equals NaN
    assert divergence_finding(10, ["a", "b"], np.array([nan, nan])) is None


def test_replica_checksums_match_float64_arithmetic():
    from gradwatch.replicas import replica_checksums

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]
    got = replica_checksums(params, [0, 0, 1], 2, 0.25, True, torch.device("cpu")).tolist()
    d = [p.double() for p in params]
    expect = [float(d[0].sum() + d[1].sum()), float(d[2].sum()),
              float((d[0].pow(2).sum() + d[1].pow(2).sum()).sqrt()), float(d[2].pow(2).sum().sqrt()), 0.25, 1.0]
    assert got == pytest.approx(expect, rel=1e-12)


def test_rank_flags_decode_bits_per_rank():
    from gradwatch.distributed import GRAD_BIT, LOSS_BIT, RANKS_PER_WORD, DistSync

    sync = DistSync.__new__(DistSync)  # the decoder alone, no process group
    sync.world_size = 60
    # rank 3: gradients; rank 27 (word 1, slot 1): loss and gradients; rank 59 (word 2, slot 7): loss
    words = [GRAD_BIT * 2.0 ** (2 * 3), (LOSS_BIT + GRAD_BIT) * 2.0 ** (2 * 1), LOSS_BIT * 2.0 ** (2 * 7)]
    assert RANKS_PER_WORD == 26
    sync._flags = torch.tensor(words, dtype=torch.float64)
    assert sync.nonfinite_ranks() == {"loss": [27, 59], "gradients": [3, 27]}


def test_agree_every_is_validated():
    import gradwatch as gw

    model = torch.nn.Linear(2, 1)
    for bad in (0, -5, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="agree_every"):
            gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), agree_every=bad)
    gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), agree_every=None).close()  # None: never

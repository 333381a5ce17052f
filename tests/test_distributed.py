"""gradwatch under torch.distributed: 2 CPU processes, gloo, DDP and FSDP2.

One spawn runs every scenario (process start-up dominates the cost); each rank
saves what it measured and the tests below compare it with independent
references computed here in one process: plain-torch per-layer norms of the
same model on the concatenated batch, and ``torch.nn.utils.clip_grad_norm_`` on
the same DTensor gradients (computed inside the workers).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available"),
    pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test runs on Linux/macOS"),
]

VOCAB, D, HEADS, SEQ, PER_RANK = 32, 16, 2, 8, 4
STEPS = 3
CLIP = 0.05  # below the typical norm, so clipping engages
LR = 0.05
WORLD = 2
UNUSED_STEPS = 6  # the missing_gradients rule waits 5 steps


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        self.fc = nn.Linear(D, 4 * D)
        self.out = nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A 2-block pre-LN decoder; ``unused`` is a layer that never runs (DDP find_unused_parameters)."""

    def __init__(self, with_unused: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(SEQ, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)
        self.unused = nn.Linear(D, D) if with_unused else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_model(with_unused: bool = False) -> TinyGPT:
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    return TinyGPT(with_unused)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    idx = torch.randint(0, VOCAB, (WORLD * PER_RANK, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def rank_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    return x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def layer_of(param_name: str) -> str:
    return param_name.rpartition(".")[0]


# ----- the workers ---------------------------------------------------------------------
def _digest(model: nn.Module) -> torch.Tensor:
    """Sum of every full parameter (DTensors gathered): equal on all ranks iff in sync."""
    from gradwatch.distributed import is_dtensor

    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        full = p.full_tensor() if is_dtensor(p) else p
        total += full.detach().double().sum()
    return total


class _CountAllReduce:
    """Record the size of every torch.distributed.all_reduce issued inside the block."""

    def __enter__(self) -> list[int]:
        self.sizes: list[int] = []
        self.original = torch.distributed.all_reduce

        def counting(tensor, *args, **kwargs):
            # DDP's own gradient all-reduce: in C++, or in gradwatch's comm hook (which replaces it, one per bucket)
            if sys._getframe(1).f_code.co_name != "flagging_allreduce_hook":
                self.sizes.append(tensor.numel())
            return self.original(tensor, *args, **kwargs)

        torch.distributed.all_reduce = counting
        return self.sizes

    def __exit__(self, *exc) -> None:
        torch.distributed.all_reduce = self.original


def _records(watch) -> list[dict]:
    return [
        {"step": r.step, "loss": r.loss, "grad_norm": r.grad_norm, "skipped": r.skipped,
         "layers": dict(zip(r.layer_names, r.layer_grad_norms.tolist())),
         "weights": dict(zip(r.layer_names, r.layer_weight_norms.tolist())),
         "missing": list(r.missing_layers),
         "update_ratio": dict(zip(r.layer_names, r.update_ratio.tolist())) if r.update_ratio is not None else None}
        for r in watch.history
    ]


def _ddp_scenarios(rank: int, out: Path) -> dict:
    import gradwatch as gw
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict = {}
    # 1. per-layer norms over 3 clipped SGD steps
    model = DDP(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    watch = gw.Watch(model, opt, clip_norm=CLIP, run_dir=out / "ddp_run", update_ratio_every=STEPS,
                     update_ratio_budget=1 << 20)
    for step in range(STEPS):
        x, y = rank_batch(step, rank)
        with _CountAllReduce() as sizes:  # DDP's own gradient all-reduce runs in C++, not counted
            watch.step(lambda: lm_loss(model, x, y), batch=(x, y))
    res["ddp_all_reduce_sizes"] = sizes
    res["ddp_local_veto"] = [type(p).__name__ for p in watch._pipeline.bus.local_vetoes()]
    res["ddp_records"] = _records(watch)
    res["ddp_layers"] = watch.layers
    res["ddp_run_dir"] = str(watch.run_dir) if watch.run_dir is not None else None
    # 2. a NaN loss on rank 1 only (gradients stay finite: DDP cannot spread it)
    before = _digest(model)
    x, y = rank_batch(0, rank)
    poison = float("nan") if rank == 1 else 0.0
    r1 = watch.step(lambda: lm_loss(model, x, y) + poison, batch=(x, y))
    # 3. a NaN activation on rank 1 only (DDP's all-reduce spreads it into every gradient)
    hook = model.module.blocks[1].register_forward_hook(lambda m, a, o: o * float("nan")) if rank == 1 else None
    r2 = watch.step(lambda: lm_loss(model, x, y), batch=(x, y))
    if hook is not None:
        hook.remove()
    after_nan = _digest(model)
    r3 = watch.step(lambda: lm_loss(model, x, y), batch=(x, y))  # healthy again
    res["ddp_nan"] = {"loss_only": r1.skipped, "activation": r2.skipped, "healthy_after": r3.skipped,
                      "unchanged": bool(torch.equal(before, after_nan)), "digest_after": float(_digest(model)),
                      "internal_errors": sorted(where for where, _ in watch.errors.seen)}
    watch.close()
    res["ddp_findings"] = [f.to_dict() for f in watch.findings]

    # 4. a plugin that vetoes on rank 1 only: every rank skips
    class RankOneVeto(gw.WatchPlugin):
        name = "rank_one_veto"

        def veto(self, ctx, record):
            return rank == 1

    watch = gw.Watch(model, opt, clip_norm=None, diagnose=False, plugins=[RankOneVeto()])
    before = _digest(model)
    r = watch.step(lambda: lm_loss(model, x, y))
    res["veto"] = {"skipped": r.skipped, "unchanged": bool(torch.equal(before, _digest(model)))}
    watch.close()

    # 5. a Watch that only rank 0 builds, with distributed=False: no collective, no hang
    if rank == 0:
        local = make_model()
        local_watch = gw.Watch(local, torch.optim.SGD(local.parameters(), lr=LR), distributed=False, diagnose=False)
        with _CountAllReduce() as sizes:
            local_watch.step(lambda: lm_loss(local, x, y))
        res["rank_local_all_reduces"] = sizes
        local_watch.close()
    torch.distributed.barrier()

    # 6. unused parameters under find_unused_parameters=True
    model = DDP(make_model(with_unused=True), find_unused_parameters=True)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    watch = gw.Watch(model, opt, clip_norm=None, run_dir=out / "all_ranks", write_rank="all", flush_every=1)
    results = []
    for step in range(UNUSED_STEPS):
        x, y = rank_batch(step % STEPS, rank)
        results.append(watch.step(lambda: lm_loss(model, x, y)))
    res["unused"] = {"missing": [r.record.missing_layers for r in results], "skipped": [r.skipped for r in results],
                     "codes": [f.code for f in watch.findings], "internal_errors": sorted(where for where, _ in watch.errors.seen),
                     "layers": watch.layers}
    watch.close()
    return res


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _fsdp_scenarios(rank: int, out: Path) -> dict:
    import gradwatch as gw
    from gradwatch.distributed import local_tensor

    res: dict = {}
    # 1. 3 clipped steps, per-layer norms against the single-process reference
    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    watch = gw.Watch(model, opt, clip_norm=CLIP, run_dir=out / "fsdp_run", update_ratio_every=STEPS,
                     update_ratio_budget=1 << 20)
    for step in range(STEPS):
        x, y = rank_batch(step, rank)
        watch.step(lambda: lm_loss(model, x, y))
    res["fsdp_records"] = _records(watch)
    res["fsdp_run_dir"] = str(watch.run_dir) if watch.run_dir is not None else None
    res["fsdp_sharded"] = watch._dist.sharded
    res["fsdp_plugin_errors"] = sorted(where for where, _ in watch.errors.seen)
    watch.close()

    # 2. global norm and clipping against clip_grad_norm_ on the same DTensor gradients
    for norm_type in (2.0, math.inf):
        model = _fsdp_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        watch = gw.Watch(model, opt, clip_norm=CLIP, norm_type=norm_type)
        params = list(model.parameters())
        x, y = rank_batch(0, rank)
        lm_loss(model, x, y).backward()
        saved = [p.grad.detach().clone() for p in params]
        with _CountAllReduce() as sizes:
            result = watch.observe()
        res[f"fsdp_all_reduce_sizes_{norm_type}"] = sizes
        res["fsdp_n_layers"] = len(watch.layers)
        res["fsdp_local_veto"] = [type(p).__name__ for p in watch._pipeline.bus.local_vetoes()]
        ours = [local_tensor(p.grad).clone() for p in params]
        for p, g in zip(params, saved):
            p.grad = g
        total = torch.nn.utils.clip_grad_norm_(params, CLIP, norm_type=norm_type)
        total = total.full_tensor() if hasattr(total, "full_tensor") else total
        theirs = [local_tensor(p.grad) for p in params]
        res[f"clip_{norm_type}"] = {
            "ours": result.grad_norm, "torch": float(total),
            "max_diff": max(float((a - b).abs().max()) for a, b in zip(ours, theirs)),
            "max_grad": max(float(b.abs().max()) for b in theirs),
        }
        watch.close()

    # 3. mixed placements in one layer (Shard + Replicate DTensors) next to a plain-tensor layer
    res["mixed"] = _mixed_placements(rank)

    # 4. NaN on rank 1 only: in the loss alone, then in an activation
    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    watch = gw.Watch(model, opt, clip_norm=CLIP)
    x, y = rank_batch(0, rank)
    watch.step(lambda: lm_loss(model, x, y))
    before = _digest(model)
    poison = float("nan") if rank == 1 else 0.0
    r1 = watch.step(lambda: lm_loss(model, x, y) + poison)
    hook = model.blocks[0].register_forward_hook(lambda m, a, o: o * float("nan")) if rank == 1 else None
    r2 = watch.step(lambda: lm_loss(model, x, y))
    if hook is not None:
        hook.remove()
    after_nan = _digest(model)
    r3 = watch.step(lambda: lm_loss(model, x, y))
    res["fsdp_nan"] = {"loss_only": r1.skipped, "activation": r2.skipped, "healthy_after": r3.skipped,
                       "unchanged": bool(torch.equal(before, after_nan)), "digest_after": float(_digest(model)),
                       "nonfinite_layers": r2.record.nonfinite_layers, "internal_errors": sorted(where for where, _ in watch.errors.seen)}
    watch.close()
    return res


def _run_doc_example(rank: int, port: int, out: Path) -> str:
    """docs/distributed.md's script, its main() called in this worker (saves a second spawn)."""
    import contextlib
    import io

    from _docs import doc_block

    namespace: dict = {"__name__": "doc_example"}
    exec(compile(doc_block("distributed.md"), "docs/distributed.md", "exec"), namespace)
    os.environ["MASTER_PORT"] = str(port)
    (out / "doc").mkdir(exist_ok=True)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        namespace["main"](rank, WORLD, str(out / "doc"))
    return buffer.getvalue()


def _mixed_placements(rank: int) -> dict:
    """DistSync on hand-made DTensor parameters: each element must count once, whatever its placement."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from gradwatch.distributed import DistSync
    from gradwatch.layers import LayerIndex

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(5)
    full = {"a.weight": torch.randn(6, 3, generator=g), "a.bias": torch.randn(6, generator=g),
            "b.weight": torch.randn(2, 6, generator=g)}
    model = nn.Module()
    model.a, model.b = nn.Linear(3, 6), nn.Linear(6, 2, bias=False)
    placements = {"a.weight": [Shard(0)], "a.bias": [Replicate()]}
    for name, placement in placements.items():
        module, leaf = name.split(".")
        param = nn.Parameter(distribute_tensor(full[name].clone(), mesh, placement))
        setattr(getattr(model, module), leaf, param)
        param.grad = distribute_tensor(full[name] * 2, mesh, placement)
    with torch.no_grad():
        model.b.weight.copy_(full["b.weight"])
    model.b.weight.grad = full["b.weight"] * 2  # a plain tensor, the same on every rank
    index = LayerIndex(model)
    sync = DistSync()
    grads = [p.grad for p in index.params]
    _, powers, weight_powers, loss = sync.measure(index, grads, torch.tensor(float(rank)), 2.0, torch.device("cpu"))
    expect_grad = [float((full["a.weight"] * 2).pow(2).sum() + (full["a.bias"] * 2).pow(2).sum()),
                   float((full["b.weight"] * 2).pow(2).sum())]
    expect_weight = [float(full["a.weight"].pow(2).sum() + full["a.bias"].pow(2).sum()), float(full["b.weight"].pow(2).sum())]
    return {"names": index.names, "powers": powers.tolist(), "weights": weight_powers.tolist(),
            "expect_grad": expect_grad, "expect_weight": expect_weight, "loss": float(loss), "n_ext": sync._n_ext}


def _lightning_ddp(rank: int, out: Path) -> dict:
    """Lightning's DDP strategy on this process group: a NaN on rank 1 only, an LR scheduler per step."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        return {"skipped": "lightning not installed"}
    import warnings

    from gradwatch.integrations.lightning import GradwatchCallback

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(WORLD))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = lm_loss(self.model, x, y)
            return loss * float("nan") if (batch_idx == 1 and self.global_rank == 1) else loss

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=LR)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    batches = [rank_batch(step, rank) for step in range(STEPS)]
    callback = GradwatchCallback(run_dir=out / "lightning_run", diagnose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            max_steps=STEPS, accelerator="cpu", devices=WORLD, strategy="ddp", callbacks=[callback], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        )
        trainer.fit(Module(), torch.utils.data.DataLoader(batches, batch_size=None))
    sched = trainer.lr_scheduler_configs[0].scheduler
    return {"skipped": [r.skipped for r in callback.watch.history], "last_epoch": sched.last_epoch,
            "run_dir": str(callback.watch.run_dir) if callback.watch.run_dir is not None else None,
            "digest": float(_digest(trainer.lightning_module)), "hooked": callback.watch._dist.hooked,
            "rank": [f.evidence.get("rank") for f in callback.watch.findings if f.severity == "error"]}


def _transformers_ddp(rank: int, out: Path) -> dict:
    """The Hugging Face Trainer on this process group (DDP through accelerate): a NaN on rank 1 only."""
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers not installed"}
    import warnings

    from gradwatch.integrations.transformers import GradwatchCallback

    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD), HF_HUB_OFFLINE="1")

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return WORLD * PER_RANK * STEPS

        def __getitem__(self, i):
            ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            return (output[0] * float("nan"),) + tuple(output[1:]) if isinstance(output, tuple) else output * float("nan")
        return None

    model.transformer.h[0].register_forward_hook(poison)
    args = transformers.TrainingArguments(
        output_dir=str(out / f"hf_out{rank}"), max_steps=STEPS, per_device_train_batch_size=PER_RANK,
        learning_rate=1e-3, lr_scheduler_type="linear", max_grad_norm=1.0, report_to=[], save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, logging_steps=1, ddp_backend="gloo",
    )
    callback = GradwatchCallback(run_dir=out / "hf_run", diagnose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
        trainer.train()
    return {"skipped": [r.skipped for r in callback.watch.history], "last_epoch": trainer.lr_scheduler.last_epoch,
            "run_dir": str(callback.watch.run_dir) if callback.watch.run_dir is not None else None,
            "layers": list(callback.watch.history[0].layer_grad_norms), "digest": float(_digest(model))}


def _worker(rank: int, port: int, doc_port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    out_path = Path(out)
    import traceback

    try:
        res = _ddp_scenarios(rank, out_path)
        res.update(_fsdp_scenarios(rank, out_path))
        res["lightning_ddp"] = _lightning_ddp(rank, out_path)
        res["transformers_ddp"] = _transformers_ddp(rank, out_path)
    except BaseException as exc:  # noqa: BLE001 - hand the failure to the parent
        res = {"error": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}
    torch.distributed.destroy_process_group()
    if "error" not in res:
        try:
            res["doc_stdout"] = _run_doc_example(rank, doc_port, out_path)
        except BaseException as exc:  # noqa: BLE001
            res = {"error": "docs/distributed.md example:\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}
    (out_path / f"rank{rank}.json").write_text(json.dumps(res))
    # End here, without interpreter teardown: with torch 2.13 on gloo, a spawned worker's exit
    # aborts ("terminate called without an active exception", SIGABRT) in about one run in ten,
    # plain DDP without gradwatch too. The results are already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(_free_port(), _free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 150  # a deadlock must fail the test, not hang it
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


# ----- the single-process reference ----------------------------------------------------
def reference_run(clip: float = CLIP) -> list[dict]:
    """Plain torch on the concatenated batch: per-layer pre-clip norms, clip_grad_norm_, SGD."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for step in range(STEPS):
        x, y = global_batch(step)
        loss = lm_loss(model, x, y)
        loss.backward()
        sq: dict[str, float] = {}
        for name, p in model.named_parameters():
            sq[layer_of(name)] = sq.get(layer_of(name), 0.0) + float(p.grad.double().pow(2).sum())
        total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        delta: dict[str, float] = {}
        norm: dict[str, float] = {}
        for name, p in model.named_parameters():
            delta[layer_of(name)] = delta.get(layer_of(name), 0.0) + float((p.detach() - before[name]).double().pow(2).sum())
            norm[layer_of(name)] = norm.get(layer_of(name), 0.0) + float(before[name].double().pow(2).sum())
        out.append({"loss": float(loss.detach()), "total": total, "layers": {k: math.sqrt(v) for k, v in sq.items()},
                    "update_ratio": {k: math.sqrt(delta[k] / norm[k]) for k in delta}})
    return out


def assert_matches_reference(records: list[dict], reference: list[dict]) -> None:
    assert len(records) == len(reference)
    for rec, ref in zip(records, reference):
        assert set(rec["layers"]) == set(ref["layers"])
        for name, value in ref["layers"].items():
            assert rec["layers"][name] == pytest.approx(value, rel=1e-5), (rec["step"], name)
        assert rec["grad_norm"] == pytest.approx(ref["total"], rel=1e-5)
        assert rec["loss"] == pytest.approx(ref["loss"], rel=1e-5)  # the mean over ranks
        assert not rec["skipped"]
    ratio = records[-1]["update_ratio"]  # ||dw|| / ||w|| per layer, measured on the last step
    assert ratio is not None
    for name, value in reference[-1]["update_ratio"].items():
        assert ratio[name] == pytest.approx(value, rel=1e-4, abs=1e-9), name


# ----- DDP -----------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_per_layer_norms_equal_single_process_and_every_rank(ranks):
    reference = reference_run()
    assert ranks[0]["ddp_layers"][:3] == ["tok", "pos", "blocks.0.ln1"]  # unwrapped names, depth order
    for res in ranks:
        assert_matches_reference(res["ddp_records"], reference)
    assert ranks[0]["ddp_records"] == ranks[1]["ddp_records"]  # bit-identical on both ranks


@pytest.mark.slow
def test_ddp_only_rank0_writes_the_run_directory(ranks):
    out = ranks[0]["out"]
    assert ranks[0]["ddp_run_dir"] is not None and ranks[1]["ddp_run_dir"] is None
    meta = json.loads((out / "ddp_run" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["rank"] == 0
    steps = [json.loads(line) for line in (out / "ddp_run" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]  # one line per step: written once
    assert [s["skipped"] for s in steps] == [False, False, False, True, True, False]
    assert not list(out.glob("ddp_run/rank*"))


@pytest.mark.slow
def test_ddp_nan_on_rank1_only_makes_both_ranks_skip(ranks):
    for res in ranks:
        nan = res["ddp_nan"]
        assert nan["loss_only"] and nan["activation"], nan
        assert nan["unchanged"] and not nan["healthy_after"]
        assert not [w for w in nan["internal_errors"] if w.startswith("watch.")], nan["internal_errors"]
    assert ranks[0]["ddp_nan"]["digest_after"] == ranks[1]["ddp_nan"]["digest_after"]  # still in sync
    out = ranks[0]["out"]
    written = [json.loads(line) for line in (out / "ddp_run" / "findings.jsonl").read_text().splitlines()] \
        if (out / "ddp_run" / "findings.jsonl").exists() else []
    keys = [(f["code"], f["step"]) for f in written]
    assert len(keys) == len(set(keys))  # each finding written once, by rank 0 only
    assert [(f["code"], f["step"]) for f in ranks[0]["ddp_findings"]] == keys
    assert [f["code"] for f in ranks[1]["ddp_findings"]] == [f["code"] for f in written]  # same list on rank 1
    # the NaN arose on rank 1: its replay located it, and rank 0 wrote that finding
    for step, phase in ((4, "loss"), (5, "forward")):
        errors = [f for f in written if f["step"] == step and f["severity"] == "error"]
        assert len(errors) == 1, errors
        assert errors[0]["evidence"]["rank"] == 1
        assert errors[0]["location"]["phase"] == phase
        assert errors[0]["location"]["source"].startswith("tests/test_distributed.py:")


@pytest.mark.slow
def test_a_rank_local_watch_issues_no_collective(ranks):
    assert ranks[0]["rank_local_all_reduces"] == []


@pytest.mark.slow
def test_ddp_a_veto_on_one_rank_is_a_veto_on_every_rank(ranks):
    assert [res["veto"] for res in ranks] == [{"skipped": True, "unchanged": True}] * WORLD


@pytest.mark.slow
def test_ddp_unused_parameters_are_missing_gradients_not_a_crash(ranks):
    for res in ranks:
        unused = res["unused"]
        assert not [w for w in unused["internal_errors"] if w.startswith("watch.")], unused["internal_errors"]
        assert unused["skipped"] == [False] * UNUSED_STEPS
        assert all(m == ["unused"] for m in unused["missing"]), unused["missing"]
        assert unused["layers"][-1] == "unused"  # never ran forward: last in depth order
    out = ranks[0]["out"]  # write_rank="all": one directory per rank, each with every step
    for r in range(WORLD):
        steps = (out / "all_ranks" / f"rank{r}" / "steps.jsonl").read_text().splitlines()
        assert len(steps) == UNUSED_STEPS
        assert json.loads((out / "all_ranks" / f"rank{r}" / "meta.json").read_text())["rank"] == r
    try:  # the missing_gradients rule belongs to the diagnosis package (issue 3)
        from gradwatch.diagnosis import rules
    except ImportError:
        rules = None
    if rules is not None and hasattr(rules, "MissingGradRule"):
        for res in ranks:
            assert res["unused"]["codes"].count("missing_gradients") == 1, res["unused"]["codes"]


@pytest.mark.slow
def test_lightning_ddp_strategy_nan_on_rank1_skips_everywhere_without_lr_drift(ranks):
    results = [res["lightning_ddp"] for res in ranks]
    if "skipped" in results[0] and isinstance(results[0]["skipped"], str):
        pytest.skip(results[0]["skipped"])
    for res in results:
        assert res["skipped"] == [i == 1 for i in range(STEPS)]
        assert res["last_epoch"] == STEPS - 1  # the skipped step did not advance the schedule
        assert res["hooked"] and res["rank"] == [1]  # the comm hook on Lightning's DDP wrapper; rank 1 named
    assert results[0]["run_dir"] is not None and results[1]["run_dir"] is None
    assert results[0]["digest"] == results[1]["digest"]  # the ranks stayed in sync


@pytest.mark.slow
def test_transformers_trainer_ddp_nan_on_rank1_skips_everywhere_without_lr_drift(ranks):
    results = [res["transformers_ddp"] for res in ranks]
    if isinstance(results[0].get("skipped"), str):
        pytest.skip(results[0]["skipped"])
    for res in results:
        assert res["skipped"] == [i == 1 for i in range(STEPS)]
        assert res["last_epoch"] == STEPS - 1
    assert results[0]["layers"] == results[1]["layers"]  # the same per-layer norms on both ranks
    assert results[0]["run_dir"] is not None and results[1]["run_dir"] is None
    assert results[0]["digest"] == results[1]["digest"]


# ----- FSDP2 ---------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp2_per_layer_norms_equal_single_process(ranks):
    reference = reference_run()
    for res in ranks:
        assert res["fsdp_sharded"]
        assert_matches_reference(res["fsdp_records"], reference)
        # weight norms are of the full tensors too (summed over shards)
        model = make_model()
        for name, value in res["fsdp_records"][0]["weights"].items():
            module = model.get_submodule(name)
            expect = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in module.parameters(recurse=False)))
            assert value == pytest.approx(expect, rel=1e-5)
    assert ranks[0]["fsdp_run_dir"] is not None and ranks[1]["fsdp_run_dir"] is None


@pytest.mark.slow
@pytest.mark.parametrize("norm_type", ["2.0", "inf"])
def test_fsdp2_global_norm_and_clipping_match_clip_grad_norm(ranks, norm_type):
    for res in ranks:
        clip = res[f"clip_{norm_type}"]
        assert clip["ours"] == pytest.approx(clip["torch"], rel=1e-6)
        assert clip["ours"] > CLIP  # clipping engaged
        assert clip["max_diff"] <= 1e-6 * clip["max_grad"]


@pytest.mark.slow
def test_one_small_collective_per_step(ranks):
    for res in ranks:
        # DDP: the loss, a non-finite flag and one word of per-rank flags (2 bits per rank, 26 ranks a word);
        # then one flag of 1 only if a plugin's veto may differ between ranks
        sizes = res["ddp_all_reduce_sizes"]
        assert sizes[0] == 3 and sizes[1:] == ([1] if res["ddp_local_veto"] else [])
        n = res["fsdp_n_layers"]
        veto = [1] if res["fsdp_local_veto"] else []
        assert res["fsdp_all_reduce_sizes_2.0"] == [2 * n + 2] + veto  # FSDP2: grad powers, weight powers, loss, flags
        assert res["fsdp_all_reduce_sizes_inf"] == [n, n + 2] + veto  # max-norm: MAX for grads, SUM for the rest


@pytest.mark.slow
def test_mixed_placements_count_every_element_once(ranks):
    for res in ranks:
        mixed = res["mixed"]
        assert mixed["names"] == ["a", "b"] and mixed["n_ext"] == 3  # layer "a" mixes Shard and Replicate
        assert mixed["powers"] == pytest.approx(mixed["expect_grad"], rel=1e-6)
        assert mixed["weights"] == pytest.approx(mixed["expect_weight"], rel=1e-6)
        assert mixed["loss"] == pytest.approx(0.5)  # mean of the ranks' losses 0 and 1


@pytest.mark.slow
def test_fsdp2_nan_on_rank1_only_makes_both_ranks_skip(ranks):
    for res in ranks:
        nan = res["fsdp_nan"]
        assert nan["loss_only"] and nan["activation"], nan
        assert nan["unchanged"] and not nan["healthy_after"]
        assert nan["nonfinite_layers"]  # the same list on both ranks
        assert not [w for w in nan["internal_errors"] if w.startswith("watch.")], nan["internal_errors"]
    assert ranks[0]["fsdp_nan"]["nonfinite_layers"] == ranks[1]["fsdp_nan"]["nonfinite_layers"]
    assert ranks[0]["fsdp_nan"]["digest_after"] == ranks[1]["fsdp_nan"]["digest_after"]


@pytest.mark.slow
def test_fsdp2_default_plugins_raise_no_internal_errors(ranks):
    for res in ranks:
        assert res["fsdp_plugin_errors"] == []


@pytest.mark.slow
def test_docs_distributed_example_runs(ranks):
    """docs/distributed.md's script: DDP and FSDP2 from the same start give the same per-layer norms."""
    import ast

    lines = ranks[0]["doc_stdout"].strip().splitlines()
    assert ranks[1]["doc_stdout"] == ""  # only rank 0 prints
    ddp = ast.literal_eval(lines[0].removeprefix("DDP "))
    fsdp = ast.literal_eval(lines[1].removeprefix("FSDP"))
    assert list(ddp) == list(fsdp) == ["0", "2", "4"]
    for name in ddp:
        assert fsdp[name] == pytest.approx(ddp[name], rel=1e-5)
    assert lines[2] == "['ddp', 'fsdp']"


# ----- single process: the distributed helpers stay out of the way --------------------
def test_no_process_group_means_no_distributed_sync(tmp_path):
    import gradwatch as gw
    from gradwatch.distributed import DistSync, is_distributed, unwrap_model

    assert not is_distributed()
    model = nn.Linear(3, 2)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run", write_rank=1)
    assert watch._dist is None and watch.run_dir is not None  # write_rank only matters under torch.distributed
    watch.close()
    with pytest.raises(ValueError, match="write_rank"):
        gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), write_rank=-1)
    with pytest.raises(ValueError, match="write_rank"):
        DistSync.detect(write_rank="rank0")
    with pytest.raises(ValueError, match="init_process_group"):
        gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), distributed=True)
    with pytest.raises(ValueError, match="distributed"):
        gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), distributed="yes")
    inner = nn.Linear(2, 2)
    assert unwrap_model(torch.nn.DataParallel(inner)) is inner

    class FullyShardedDataParallel(nn.Module):  # stands for FSDP1's wrapper (needs a process group to build)
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="fully_shard"):
        gw.Watch(nn.Sequential(FullyShardedDataParallel()), torch.optim.SGD(inner.parameters(), lr=0.1))

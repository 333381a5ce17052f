"""gradwatch beside the tools people use today: step-time overhead, and what each says about a fault.

Run by hand (not a test):

    pip install -e ".[bench]"      # wandb, cockpit-for-pytorch, backpack-for-pytorch
    python benchmarks/peers.py [--rounds 7] [--threads 1] [--workloads gpt,mlp] [--no-faults]

A peer that cannot be imported or cannot run a workload is skipped, with the reason printed.

**Overhead** (same workloads as benchmarks/overhead.py: a GPT-style model, 6 pre-LN blocks,
d=256, seq 128, batch 8, AdamW; a 7 x Linear(128)+ReLU MLP, batch 64, AdamW). Each round times
``--steps`` steps of every variant in turn, the order rotating between rounds; the figure is the
median over rounds of the per-round ratio variant / baseline. Variants:

- baseline: ``loss.backward(); clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad()``
- gradwatch: ``watch.step(closure)``, default settings (clip 1.0, diagnosis on, a run directory)
- detect_anomaly: the baseline under ``torch.autograd.detect_anomaly(check_nan=True)``
- wandb: the baseline plus ``wandb.watch(model, log="gradients", log_freq=1)`` and
  ``wandb.log({"loss": ...})`` every step, ``mode="offline"`` into a temporary directory
- lightning_grad_norm: the baseline plus ``lightning.pytorch.utilities.grad_norm(model, 2)`` every
  step, its values read as floats (what logging them does)
- cockpit: Cockpit's ``"economy"`` configuration (BackPACK-extended model and loss); only where
  BackPACK supports every layer (not LayerNorm, attention or embeddings: MLP only)

**Faults**: scenarios of ``benchmarks.faults`` run with each peer in a plain loop (the
baseline's), stopping at the first step where the peer reports something. For each: did it
notice (raise, warn, or return a non-finite number a user would see), did it name the op (the
scenario's expected op or autograd node), did it name a cause (a diagnosis, not a number).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gradwatch as gw  # noqa: E402
from benchmarks import overhead  # noqa: E402
from benchmarks.faults import scenarios as fault_scenarios  # noqa: E402
from benchmarks.faults import scoring  # noqa: E402

PEERS = ("gradwatch", "detect_anomaly", "wandb", "lightning_grad_norm", "cockpit")


# ----- availability ---------------------------------------------------------------------------
def _wandb_env(tmp: Path) -> None:
    os.environ.update({
        "WANDB_MODE": "offline",  # never the network
        "WANDB_DIR": str(tmp),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
    })


def availability() -> dict[str, str | None]:
    """peer -> None when usable here, else the reason it is skipped."""
    out: dict[str, str | None] = {"gradwatch": None, "detect_anomaly": None}
    for peer, module in (("wandb", "wandb"), ("lightning_grad_norm", "lightning.pytorch.utilities"),
                         ("cockpit", "cockpit")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                __import__(module)
                if peer == "cockpit":
                    __import__("backpack")
            out[peer] = None
        except Exception as exc:  # ImportError, or a broken install (cockpit needs pkg_resources)
            out[peer] = f"cannot import {module}: {type(exc).__name__}: {exc}"
    return out


# ----- a plain loop with each peer attached ---------------------------------------------------
class PeerLoop:
    """One training step with a peer attached: ``step(batch) -> report`` (a dict; empty when silent)."""

    def __init__(self, peer: str, model: nn.Module, opt: torch.optim.Optimizer,
                 loss_of: Callable[[nn.Module, Any], torch.Tensor], tmp: Path,
                 cockpit_loss: tuple[nn.Module, nn.Module] | None = None, watch_options: dict[str, Any] | None = None) -> None:
        self.peer, self.model, self.opt, self.loss_of, self.tmp = peer, model, opt, loss_of, tmp
        self.global_step = 0
        self.watch = None
        self.run = None
        clip = (watch_options or {}).get("clip_norm", 1.0)
        self.clip = float(clip) if isinstance(clip, (int, float)) else None  # the plain loop mirrors the scenario's clipping
        if peer == "gradwatch":
            options = {"clip_norm": 1.0, **(watch_options or {})}  # the default clips nothing; the loop clips at 1
            self.watch = gw.Watch(model, opt, run_dir=tmp / f"gw-{id(self)}", **options)
        elif peer == "wandb":
            import wandb

            _wandb_env(tmp)
            if wandb.run is not None:  # one wandb run at a time: finish the previous loop's
                wandb.run.finish()
            self.run = wandb.init(project="gradwatch-peers", mode="offline", dir=str(tmp),
                                  settings=wandb.Settings(silent=True, console="off", disable_git=True,
                                                          save_code=False, x_disable_stats=True))
            wandb.watch(model, log="gradients", log_freq=1)
        elif peer == "cockpit":
            from backpack import extend
            from cockpit import Cockpit
            from cockpit.utils.configuration import configuration

            if cockpit_loss is None:
                raise NotImplementedError("cockpit needs a BackPACK-extendable loss module")
            self.model = extend(model)
            self.cockpit_loss = extend(cockpit_loss[0])
            self.cockpit_individual = cockpit_loss[1]
            self.cockpit = Cockpit(self.model.parameters(), quantities=configuration("economy"))

    def step(self, batch: Any) -> dict[str, Any]:
        self.global_step += 1
        report: dict[str, Any] = {}
        if self.peer == "gradwatch":
            result = self.watch.step(lambda: self.loss_of(self.model, batch), batch=batch)
            alarms = [f for f in result.findings if f.severity in ("warning", "error")]  # info is not a report of a fault
            if alarms:
                report["findings"] = alarms
            if result.skipped:
                report["skipped"] = True
            return report
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.peer == "detect_anomaly":
            try:
                with overhead.warnings_off(), torch.autograd.detect_anomaly(check_nan=True):
                    loss = self.loss_of(self.model, batch)
                    loss.backward()
            except RuntimeError as exc:
                report["error"] = str(exc).splitlines()[0]
                self.opt.zero_grad()
                return report
        elif self.peer == "cockpit":
            x, y = batch[0], batch[1]
            out = self.model(x)
            loss = self.cockpit_loss(out, y)
            losses = self.cockpit_individual(out, y)
            info = {"batch_size": x.shape[0], "individual_losses": losses, "loss": loss, "optimizer": self.opt}
            step = self.global_step - 1  # Cockpit's schedules count from 0
            with overhead.warnings_off(), self.cockpit(step, info=info):  # BackPACK's full-backward-hook notice
                loss.backward(create_graph=self.cockpit.create_graph(step))
        else:
            loss = self.loss_of(self.model, batch)
            loss.backward()
        if self.peer == "lightning_grad_norm":
            from lightning.pytorch.utilities import grad_norm

            norms = {k: float(v) for k, v in grad_norm(self.model, 2).items()}  # what logging them does
            bad = [k for k, v in norms.items() if not math.isfinite(v)]
            if bad:
                report["nonfinite_norms"] = bad
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.opt.step()
        self.opt.zero_grad()
        if self.peer == "wandb":
            self.run.log({"loss": float(loss.detach())})  # commits the step's gradient histograms
        if self.peer == "cockpit":
            report.update(self._cockpit_report())
        return report

    def _cockpit_report(self) -> dict[str, Any]:
        """Quantities Cockpit computed for this step (or, for two-step quantities, the one before) that are non-finite."""
        out = self.cockpit.get_output()  # {step (from 0): {quantity: float | list}}
        now = self.global_step - 1
        bad = set()
        for step in (now - 1, now):
            for quantity, value in (out.get(step) or {}).items():
                values = value if isinstance(value, (list, tuple)) else [value]
                try:
                    if any(not math.isfinite(float(v)) for v in values):
                        bad.add(quantity)
                except (TypeError, ValueError):
                    continue  # histograms and other non-scalar outputs
        return {"nonfinite_quantities": sorted(bad)} if bad else {}

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        if self.run is not None:
            self.run.finish()


# ----- overhead -----------------------------------------------------------------------------
def _cockpit_losses() -> tuple[nn.Module, nn.Module]:
    return nn.CrossEntropyLoss(reduction="mean"), nn.CrossEntropyLoss(reduction="none")


def _overhead_variants(name: str, tmp: Path, available: dict[str, str | None]) -> tuple[dict[str, Callable[[], None]], dict[str, str], list[PeerLoop]]:
    make, loss_of = overhead._workload(name)  # loss_of(model) closes over the workload's fixed batch
    batch: Any = None
    if name == "mlp":  # Cockpit needs (x, y): the same batch overhead._workload draws (seed 0)
        g = torch.Generator().manual_seed(0)
        batch = (torch.randn(64, 128, generator=g), torch.randint(0, 10, (64,), generator=g))
    variants: dict[str, Callable[[], None]] = {}
    skipped: dict[str, str] = {}
    loops: list[PeerLoop] = []

    variants["baseline"] = overhead.clipped_loop(make, loss_of)
    for peer in PEERS:
        if available.get(peer):
            skipped[peer] = available[peer]
            continue
        if peer == "cockpit" and name != "mlp":
            skipped[peer] = "BackPACK/Cockpit do not support LayerNorm, attention or embeddings"
            continue
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        try:
            loop = PeerLoop(peer, model, opt, lambda m, b: loss_of(m), tmp,
                            cockpit_loss=_cockpit_losses() if peer == "cockpit" else None)
        except Exception as exc:
            skipped[peer] = f"{type(exc).__name__}: {exc}"
            continue
        loops.append(loop)
        variants[peer] = (lambda lp: (lambda: lp.step(batch)))(loop)
    return variants, skipped, loops


def measure_overhead(name: str, rounds: int, steps: int, tmp: Path, available: dict[str, str | None]) -> tuple[dict[str, float], dict[str, str], float]:
    variants, skipped, loops = _overhead_variants(name, tmp, available)
    for peer, fn in list(variants.items()):  # warm-up (the Watch learns the layer order; wandb registers hooks)
        try:
            for _ in range(2):
                fn()
        except Exception as exc:
            skipped[peer] = f"failed on this workload: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            del variants[peer]
    ratios, base_time = overhead.alternating_ratios(variants, rounds, steps)
    for loop in loops:
        loop.close()
    return ratios, skipped, base_time


# ----- faults -------------------------------------------------------------------------------
FAULTS = (  # scenario names from benchmarks/faults/scenarios.py
    "mlp_naive_softplus_exp",      # forward overflow (aten.exp)
    "mlp_masked_mean_unlabeled",   # loss 0/0 (aten.div)
    "mlp_sqrt_norm_feature",       # backward-only NaN (SqrtBackward0)
    "mlp_nan_features_step60",     # NaN in the batch
    "gpt_causal_mask_diagonal",    # softmax over a fully masked row
    "resmlp_where_log",            # torch.where NaN gradient (LogBackward0)
    "mlp_relu_init_x6",            # init far too large (finite)
    "mlp_mse_sgd_lr2",             # learning rate too high (finite, then inf)
    "mlp_sigmoid_xavier_12",       # vanishing gradients (finite)
    "mlp_detached_aux",            # a layer that never gets a gradient
    "mlp_batch_x1000_step80",      # a loss spike (finite)
)


def _names_op(node: str, sc: fault_scenarios.Scenario) -> bool:
    """Whether an autograd node a peer names is the scenario's: its expected node, or ``<Op>Backward<N>`` of its op.

    Example: expected ``aten.exp`` matches ``ExpBackward0``; ``aten._softmax`` matches ``SoftmaxBackward0``
    but not ``LogSoftmaxBackward0`` (the loss's op, not the attention's).
    """
    low = node.lower()
    if sc.expected_node and low == sc.expected_node.lower():
        return True
    op = scoring.normalize_op(sc.expected_op)
    return bool(op) and re.fullmatch(re.escape(op.lstrip("_")) + r"backward\d*", low) is not None


def _summarize(peer: str, sc: fault_scenarios.Scenario, report: dict[str, Any], step: int | None) -> dict[str, str]:
    if not report:
        return {"noticed": "no", "op": "-", "cause": "-", "detail": "silent"}
    if peer == "gradwatch":
        findings = report.get("findings", [])
        alarms = [f for f in findings if f.severity in ("warning", "error")] or findings
        if not alarms:
            return {"noticed": "skipped step", "op": "-", "cause": "-", "detail": f"step {step} skipped, no finding"}
        f = alarms[0]
        op = str(f.location.get("op") or f.location.get("node") or "-")
        ok_op = "yes" if sc.expected_op and scoring.normalize_op(op) == scoring.normalize_op(sc.expected_op) else ("n/a" if not sc.expected_op else "no")
        where = f.location.get("module") or f.location.get("layers") or ""
        return {"noticed": f"step {step}", "op": f"{op} ({ok_op})" if op != "-" else "-",
                "cause": f.code + (" (right)" if f.code == sc.expected else " (other)"),
                "detail": f"{f.code} at {where}".strip()}
    if peer == "detect_anomaly":
        text = report["error"]
        node = re.search(r"Function '(\w+)'", text)
        named = node.group(1) if node else "-"
        ok = "yes" if (sc.expected_op or sc.expected_node) and _names_op(named, sc) else ("n/a" if not sc.expected_op else "no")
        return {"noticed": f"step {step} (raises)", "op": f"{named} ({ok})", "cause": "-", "detail": text[:120]}
    if peer == "lightning_grad_norm":
        bad = report["nonfinite_norms"]
        return {"noticed": f"step {step} (nan in {len(bad)} norms)", "op": "-", "cause": "-",
                "detail": f"non-finite norms: {', '.join(b.split('/')[-1] for b in bad[:3])}"}
    if peer == "cockpit":
        return {"noticed": f"step {step} (nan quantities)", "op": "-", "cause": "-",
                "detail": ", ".join(report.get("nonfinite_quantities", []))[:120] or report.get("error", "")}
    return {"noticed": f"step {step}", "op": "-", "cause": "-", "detail": str(report)[:120]}


def peer_on_fault(peer: str, sc: fault_scenarios.Scenario, tmp: Path, max_steps: int = 80) -> dict[str, str]:
    """Run the scenario's setup with ``peer`` until it reports something; what did it say?"""
    logging.getLogger("gradwatch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    setup = sc.build()
    if peer == "cockpit" and not isinstance(setup.model, nn.Sequential):
        return {"noticed": "n/a", "op": "-", "cause": "-", "detail": "model has layers BackPACK does not support"}
    cockpit_loss = None
    if peer == "cockpit":
        if setup.loss is not fault_scenarios._ce:  # noqa: SLF001  (Cockpit needs the loss as an extendable module)
            return {"noticed": "n/a", "op": "-", "cause": "-", "detail": "custom loss function BackPACK cannot extend"}
        cockpit_loss = _cockpit_losses()
    try:  # the scenario's own options: gradwatch gets them all, the plain loops its clip_norm
        loop = PeerLoop(peer, setup.model, setup.optimizer, setup.loss, tmp, cockpit_loss=cockpit_loss,
                        watch_options=setup.watch)
    except Exception as exc:
        return {"noticed": "n/a", "op": "-", "cause": "-", "detail": f"cannot attach: {type(exc).__name__}: {str(exc)[:100]}"}
    stderr = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
            warnings.simplefilter("always")
            for step in range(1, min(sc.steps, max_steps) + 1):
                try:
                    report = loop.step(setup.batch(step))
                except Exception as exc:  # the peer itself crashed on this step
                    return {"noticed": f"step {step} (crashes)", "op": "-", "cause": "-",
                            "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:110]}"}
                if peer == "gradwatch" and report.get("skipped") and not report.get("findings"):
                    continue  # a skipped step: look at the findings that follow
                if report:
                    return _summarize(peer, sc, report, step)
            noisy = [w for w in caught if re.search(r"nan|inf", str(w.message), re.I)]
            if noisy:
                return {"noticed": "warning", "op": "-", "cause": "-", "detail": str(noisy[0].message)[:120]}
            return _summarize(peer, sc, {}, None)
    finally:
        try:
            loop.close()
        except Exception:
            pass


# ----- main ---------------------------------------------------------------------------------
def _md(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per round (default: gpt 2, mlp 20)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine 2 threads measure contention)")
    parser.add_argument("--workloads", default="gpt,mlp")
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated fault scenario names")
    parser.add_argument("--no-overhead", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("gradwatch").setLevel(logging.ERROR)
    available = availability()
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} threads")
    for peer, reason in available.items():
        print(f"  {peer:20s} {'available' if reason is None else 'SKIPPED: ' + reason}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        _wandb_env(tmp)
        if not args.no_overhead:
            rows = []
            notes = []
            for name in args.workloads.split(","):
                steps = args.steps or {"gpt": 2, "mlp": 20}.get(name, 5)
                ratios, skipped, base = measure_overhead(name, args.rounds, steps, tmp, available)
                rows.append([name, f"{base * 1e3:.1f} ms"] + [f"{ratios[p]:.2f}x" if p in ratios else "skipped" for p in PEERS])
                notes += [f"{name}/{p}: {why}" for p, why in skipped.items()]
            print(f"\n### Step-time overhead (median over {args.rounds} rounds of variant / baseline; baseline = clipped plain loop)\n")
            print(_md(rows, ["workload", "baseline step"] + list(PEERS)))
            if notes:
                print()
            for note in notes:
                print(f"- skipped {note}")
        if not args.no_faults:
            chosen = {s.name: s for s in fault_scenarios.SCENARIOS}
            rows = []
            for name in args.faults.split(","):
                sc = chosen[name]
                cells = [f"{name} ({sc.expected}{', ' + sc.expected_op if sc.expected_op else ''})"]
                for peer in PEERS:
                    if available.get(peer):
                        cells.append("skipped")
                        continue
                    r = peer_on_fault(peer, sc, tmp)
                    cell = r["noticed"]
                    if r["op"] != "-":
                        cell += f"; op {r['op']}"
                    if r["cause"] != "-":
                        cell += f"; cause {r['cause']}"
                    if r["noticed"] in ("no", "n/a") or r["detail"].startswith("cannot"):
                        cell += f" ({r['detail']})" if r["detail"] != "silent" else ""
                    cells.append(cell)
                rows.append(cells)
                print(f"  ran {name}", file=sys.stderr, flush=True)
            print("\n### What each tool reports on injected faults (first report; plain loop clipped as the scenario)\n")
            print(_md(rows, ["scenario (expected code, op)"] + list(PEERS)))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

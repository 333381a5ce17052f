"""Precursor signals against independent references: torch's own Adam state, explicit attention
matmuls, torch.logsumexp, and a hand-written StableAdamW-style update clipping."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch import compat
from gradwatch.precursors import rules, signals
from gradwatch.precursors.plugin import PrecursorPlugin

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _plugin(watch: gw.Watch) -> PrecursorPlugin:
    return next(p for p in watch.plugins if isinstance(p, PrecursorPlugin))


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def test_adam_rms_equals_the_ratio_to_torchs_own_second_moment() -> None:
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    watch = gw.Watch(model, opt, precursors=gw.PrecursorConfig(rms_every=1))
    plugin = _plugin(watch)
    checked = 0
    for step in range(1, 13):
        x = torch.randn(16, 6) * (10.0 if step == 9 else 1.0)  # a gradient jump: RMS well above 1
        opt.zero_grad()
        loss = F.cross_entropy(model(x), torch.randint(0, 3, (16,)))
        loss.backward()
        watch.observe(loss)
        opt.step()  # torch's AdamW updates exp_avg_sq with this step's gradient: v_hat is what it divides by
        if step == 1:
            continue  # no second moment before the first step: not measured
        for layer in ("0", "2"):
            module = model[int(layer)]
            total, count = 0.0, 0
            for p in module.parameters():
                state = opt.state[p]
                v_hat = state["exp_avg_sq"] / (1 - 0.95 ** int(state["step"]))
                total += float((p.grad.double() ** 2 / v_hat.double().clamp_min(1e-16)).sum())
                count += p.numel()
            assert plugin.rms[layer] == pytest.approx(math.sqrt(total / count), rel=1e-4)
            checked += 1
    assert checked == 22
    watch.close()


def test_adam_rms_chunks_and_layer_aggregation_by_hand() -> None:
    g = torch.tensor([3.0, 0.0, 1.0])
    v = torch.tensor([1.0, 2.0, 0.0])
    beta2, step = 0.9, 5
    s = signals.adam_rms([signals.AdamTensor(g, v, beta2, 1e-8, step)])
    v_hat = (beta2 * v + (1 - beta2) * g * g) / (1 - beta2 ** step)
    assert float(s[0]) == pytest.approx(float((g * g / v_hat.clamp_min(1e-16)).sum()), rel=1e-6)
    assert signals.layer_rms([4.0, 12.0], [2, 2], [0, 0], 1) == [2.0]


@pytest.mark.parametrize("kernels", ["foreach", "per-tensor fallback"])
def test_adam_rms_of_many_tensors_matches_float64_by_hand(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[object] = []  # what the kernel chain returned (None: it refused, the loop answered)
    chain = compat.foreach_chain
    monkeypatch.setattr(compat, "foreach_chain", lambda steps: answers.append(chain(steps)) or answers[-1])
    if kernels != "foreach":  # the kernels refuse these tensors: the per-tensor loop answers the same
        def refuse(*args: object, **kwargs: object) -> None:
            raise NotImplementedError("no kernel")
        monkeypatch.setattr(torch, "_foreach_addcmul", refuse)
    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (5,), (3, 7), (1,)]
    tensors = [signals.AdamTensor(torch.randn(*s, generator=gen), torch.rand(*s, generator=gen) * 1e-3,
                                  beta2, 1e-8, step)
               for s, beta2, step in zip(shapes, (0.999, 0.999, 0.95, 0.9), (10, 10, 3, 1000))]
    tensors[3].exp_avg_sq.zero_()  # floored at eps^2: v_hat = eps^2 where g^2 * (1 - beta2) is below it
    got = signals.adam_rms(tensors).tolist()
    for value, t in zip(got, tensors):
        g, v = t.grad.double(), t.exp_avg_sq.double()
        v_hat = ((t.beta2 * v + (1 - t.beta2) * g * g) / (1 - t.beta2 ** t.step)).clamp_min(t.eps ** 2)
        assert value == pytest.approx(float((g * g / v_hat).sum()), rel=1e-5)
    assert len(answers) == 1 and (answers[0] is None) == (kernels != "foreach")  # the path named was the one taken


def test_sgd_has_no_second_moment_and_is_left_alone() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt)
    for _ in range(3):
        x = torch.randn(8, 6)
        watch.step(lambda: model(x).pow(2).mean())
    assert "adam_rms_max" not in _plugin(watch).last
    assert "log_z_mean" not in _plugin(watch).last  # no cross_entropy here
    watch.close()


class Attention(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, 5)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        self.seen.append((q.detach(), k.detach()))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(y.transpose(1, 2).reshape(B, T, C))


def test_attention_logit_and_log_z_equal_explicit_computations() -> None:
    torch.manual_seed(1)
    model = Attention()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # thresholds far above these logits: the cadence alone decides which steps are sampled
    watch = gw.Watch(model, opt, precursors=gw.PrecursorConfig(sample_every=2, attention_logit_threshold=1e4,
                                                                log_z_threshold=1e4))
    plugin = _plugin(watch)
    for step in range(1, 5):
        x = torch.randn(3, 6, 8) * 4
        y = torch.randint(0, 5, (3, 6))
        model.seen.clear()
        logits_seen: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            logits = model(x)
            logits_seen.append(logits.detach())
            return F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))

        watch.step(closure)
        last = plugin.last
        if step in (1, 2, 4):  # sampled: the first 2 steps and every 2
            q, k = model.seen[-1]
            expected = float((q @ k.transpose(-2, -1)).abs().max()) / math.sqrt(q.shape[-1])
            (site, value), = last["attention_logit_max"].items()
            assert site == "(root)"  # no submodule runs it: the model itself
            assert value == pytest.approx(expected, rel=1e-4)
            z = torch.logsumexp(logits_seen[-1].reshape(-1, 5), dim=-1)
            assert last["log_z_mean"] == pytest.approx(float(z.mean()), rel=1e-4)
            assert last["log_z_max"] == pytest.approx(float(z.abs().max()), rel=1e-4)
        else:
            assert "attention_logit_max" not in last and "log_z_mean" not in last
    watch.close()



@pytest.mark.parametrize("threshold, sampled", [(1e4, [1, 2, 4, 6, 8]), (2.0, [1, 2, 3, 4, 5, 6, 7, 8])])
def test_sampling_turns_dense_while_a_sampled_logit_is_above_half_its_threshold(threshold, sampled) -> None:
    torch.manual_seed(1)
    model = Attention()  # its logits are about 18 here: above half of 2.0, far below half of 1e4
    watch = gw.Watch(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                     precursors=gw.PrecursorConfig(sample_every=2, attention_logit_threshold=threshold,
                                                   log_z_threshold=1e4, quiet_steps=1000))
    plugin = _plugin(watch)
    seen = []
    for step in range(1, 9):
        x, y = torch.randn(3, 6, 8) * 4, torch.randint(0, 5, (3, 6))
        watch.step(lambda: F.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1)))
        if "attention_logit_max" in plugin.last:
            seen.append(step)
    assert seen == sampled
    codes = [f.code for f in watch.findings if f.code == "attention_logit_growth"]
    assert codes == ([] if threshold > 100 else ["attention_logit_growth"])  # one episode: one finding
    watch.close()

def test_attention_site_is_the_hf_module_and_the_math_is_unchanged() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    watched, plain = transformers.GPT2LMHeadModel(config), transformers.GPT2LMHeadModel(config)
    plain.load_state_dict(watched.state_dict())
    ids = torch.randint(0, 50, (2, 16))
    opt = torch.optim.AdamW(watched.parameters(), lr=1e-3)
    watch = gw.Watch(watched, opt)
    result = watch.step(lambda: watched(input_ids=ids, labels=ids).loss)
    sites = _plugin(watch).last["attention_logit_max"]
    assert sorted(sites) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    with torch.no_grad():
        expected = float(plain(input_ids=ids, labels=ids).loss)
    assert result.loss == pytest.approx(expected, rel=1e-6)  # the math is unchanged
    assert "log_z_mean" in _plugin(watch).last  # the loss inside the model's forward is seen
    watch.close()


def test_clip_update_equals_a_hand_written_stable_adamw_step() -> None:
    torch.manual_seed(0)
    watched = _mlp()
    reference = _mlp()
    opt_w = torch.optim.AdamW(watched.parameters(), lr=1e-2, betas=(0.9, 0.99))
    opt_r = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.99))
    watch = gw.Watch(watched, opt_w, on_precursor="clip_update")
    scaled = 0
    for step in range(1, 16):
        x = torch.randn(16, 6) * (30.0 if step >= 10 else 1.0)  # gradients jump: v lags, RMS_t > 1
        y = torch.randint(0, 3, (16,))
        watch.step(lambda: F.cross_entropy(watched(x), y))
        # the reference: AdamW, then each tensor's update divided by max(1, RMS_t) (StableAdamW)
        opt_r.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        before = [p.detach().clone() for p in reference.parameters()]
        opt_r.step()
        with torch.no_grad():
            for p, old in zip(reference.parameters(), before):
                state = opt_r.state[p]
                v_hat = state["exp_avg_sq"] / (1 - 0.99 ** int(state["step"]))
                rms = float(torch.sqrt((p.grad ** 2 / v_hat.clamp_min(1e-16)).mean()))
                if rms > 1.0:
                    scaled += 1
                    p.copy_(old + (p - old) / rms)
        for pw, pr in zip(watched.parameters(), reference.parameters()):
            torch.testing.assert_close(pw, pr, rtol=1e-5, atol=1e-6)
    assert scaled > 0  # the comparison covered scaled updates
    watch.close()


def test_rms_rule_one_finding_per_episode() -> None:
    rule = rules.RmsRule(threshold=4.0, consecutive=2, warmup=10, quiet_steps=3)
    series = [1, 5, 5, 6, 1, 5, 1, 1, 1, 7, 7]
    codes = [rule.check(20 + i, {"fc": float(v)}, adam_step=20 + i) for i, v in enumerate(series)]
    raised = [20 + i for i, f in enumerate(codes) if f is not None]
    assert raised == [22, 30]  # the second time above, then again only after 3 quiet measurements
    assert rules.RmsRule(4.0, 1, warmup=100, quiet_steps=3).check(5, {"fc": 9.0}, adam_step=5) is None  # warm-up


def test_options_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="on_precursor"):
        gw.Watch(model, opt, run_dir=tmp_path / "r", on_precursor="clip")
    with pytest.raises(TypeError, match="PrecursorConfig"):
        gw.Watch(model, opt, run_dir=tmp_path / "r", precursors=True)
    with pytest.raises(ValueError, match="rms_threshold"):
        gw.PrecursorConfig(rms_threshold=0.5)
    assert not (tmp_path / "r").exists()
    off = gw.Watch(model, opt, precursors=None)
    assert not any(isinstance(p, PrecursorPlugin) for p in off.plugins)
    off.close()


def test_signals_reach_the_run_directory(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch = gw.Watch(model, opt, run_dir=tmp_path / "run", precursors=gw.PrecursorConfig(rms_every=10, sample_every=10))
    for _ in range(12):
        x = torch.randn(8, 6)
        y = torch.randint(0, 3, (8,))
        watch.step(lambda: F.cross_entropy(model(x), y))
    watch.close()
    run = gw.load_run(tmp_path / "run")
    by_step = {s["step"]: s for s in run.signals}
    assert sorted(by_step) == list(range(1, 11))  # the first 10 sampled; 11, 12 measured nothing
    assert all("log_z_mean" in by_step[s] for s in range(1, 11))
    measured = [s for s in range(1, 13) if "adam_rms_max" in by_step.get(s, {})]
    assert measured == [10]  # every rms_every=10 steps


def test_rms_is_measured_every_step_while_it_is_high() -> None:
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    watch = gw.Watch(model, opt, precursors=gw.PrecursorConfig(rms_warmup=5, rms_every=10))  # rms_threshold=8
    plugin = _plugin(watch)
    measured, codes = [], []
    for step in range(1, 321):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        weight = 1000.0 if step >= 305 else 1.0  # the loss (and every gradient) 1000x: v lags, RMS_t near its bound
        result = watch.step(lambda: weight * F.cross_entropy(model(x), y))
        codes += [f.code for f in result.findings]
        if "adam_rms_max" in plugin.last:
            measured.append(step)
    # every 10 steps while calm; the 1000x gradient norm of step 305 (far above its running RMS) makes 306
    # measure, and RMS_t stays high, so every step after: two measurements above 8 raise the finding at 307
    assert [s for s in measured if s <= 305] == list(range(10, 301, 10)) and set(range(306, 321)) <= set(measured)
    assert codes.count("update_spike_precursor") == 1  # one episode, one finding
    assert [f.step for f in watch.findings if f.code == "update_spike_precursor"] == [307]
    watch.close()


def test_a_reproduced_instability_is_named_before_its_loss_onset() -> None:
    from benchmarks.instability import train

    unstable = train("lr=1e-1", 1e-1, "plain", seed=0, steps=40)
    assert unstable.precursor is not None and unstable.precursor[1] == "attention_logit_growth"
    assert unstable.max_attention_logit > 50
    stable = train("lr=1e-3 qk_ln", 1e-3, "qk_ln", seed=0, steps=40)
    assert stable.precursors == [] and stable.max_attention_logit < 50


def test_with_warm_up_attention_logit_growth_is_named_steps_before_the_loss_spike() -> None:
    from benchmarks.instability import train

    # the benchmark's sweep schedule (100 warm-up steps) at peak lr 0.3 without qk-layernorm: the logits
    # grow while the lr ramps up, and the loss spikes some 20 steps after they pass the threshold
    run = train("lr=0.3 warm-up", 0.3, "plain", seed=0, steps=60, warmup=100)
    assert run.onset is not None and run.precursor is not None
    assert run.precursor[1] == "attention_logit_growth"
    assert run.lead is not None and run.lead >= 5


def test_the_documented_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from _docs import doc_block

    exec(compile(doc_block("precursors.md"), "docs/precursors.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("{'0': ") and "'2': " in printed


def test_the_benchmarks_instability_judges_by_hand() -> None:
    from benchmarks.instability import behind, onset

    assert onset([4.0, 3.0, 2.0, 2.1, 2.0, 9.0, 9.5, 9.1, 2.0]) == 7  # median of 3 above 1.3 x best 2.0
    assert onset([4.0, 3.0, 2.0, 9.0, 2.0, 2.1]) is None  # one bad batch is not a spike
    assert behind([4.0, 4.5, 5.0, 5.0, 5.0, 5.0], [4.0, 3.0, 2.5, 2.0, 2.0, 2.0], smooth=1) == 3  # 5 > 1.5 x 2.5


@pytest.mark.parametrize("output_rms", [False, True])
def test_a_model_without_attention_or_cross_entropy_stops_sampling_after_its_first_step(output_rms: bool) -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch = gw.Watch(model, opt, precursors=gw.PrecursorConfig(output_rms=output_rms, sample_every=2))
    plugin = _plugin(watch)
    armed, modes = [], []
    for step in range(1, 6):
        x = torch.randn(8, 6)
        watch.step(lambda: model(x).pow(2).mean())
        armed.append(len(plugin._hooks))  # hooks armed for the next step by prepare()
        modes.append(plugin._use_mode)
    assert not any(modes)  # step 1 saw no attention and no cross_entropy: no TorchFunctionMode again
    layers = len(watch.layers)
    # output RMS: one forward hook per layer armed before each sampled step (2, 4 and 6), none before 3 and 5
    assert armed == ([layers, 0, layers, 0, layers] if output_rms else [0, 0, 0, 0, 0])
    watch.close()


def test_output_rms_and_its_growth_equal_the_layer_outputs() -> None:
    torch.manual_seed(0)
    model = _mlp()
    outputs: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if name in ("0", "2"):
            module.register_forward_hook(lambda m, a, o, name=name: outputs.setdefault(name, []).append(o.detach()))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    watch = gw.Watch(model, opt, precursors=gw.PrecursorConfig(sample_every=2))
    plugin = _plugin(watch)
    for step in range(1, 5):
        x = torch.randn(8, 6)
        watch.step(lambda: model(x).pow(2).mean())
        last = plugin.last
        if step == 3:
            assert "output_rms" not in last  # not sampled
            continue
        want = {n: float(o[-1].pow(2).mean().sqrt()) for n, o in outputs.items()}
        assert set(last["output_rms"]) == set(watch.layers) == set(want)
        for n in want:
            assert last["output_rms"][n] == pytest.approx(want[n], rel=1e-4)
        first = {n: float(o[0].pow(2).mean().sqrt()) for n, o in outputs.items()}
        growth = {n: want[n] / first[n] for n in want}
        worst = max(growth, key=growth.__getitem__)
        assert last["output_rms_growth_layer"] == worst
        assert last["output_rms_growth_max"] == pytest.approx(growth[worst], rel=1e-4)
    watch.close()


class EagerAttention(nn.Module):
    """Explicit-matmul causal attention (the way `attn_implementation="eager"` writes it)."""

    def __init__(self, d: int = 8, heads: int = 2, call: str = "F") -> None:
        super().__init__()
        self.heads, self.call = heads, call
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, 5)
        self.logits: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        logits = q @ k.transpose(-2, -1) / math.sqrt(C // self.heads)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        logits = logits.masked_fill(~mask, float("-inf"))
        self.logits.append(logits.detach())
        probs = F.softmax(logits, dim=-1) if self.call == "F" else logits.softmax(-1)
        return self.head((probs @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("call", ["F", "method"])
def test_an_eager_attention_is_seen_at_its_softmax(call: str) -> None:
    torch.manual_seed(0)
    model = EagerAttention(call=call)
    watch = gw.Watch(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                     precursors=gw.PrecursorConfig(sample_every=2, attention_logit_threshold=1e4))
    plugin = _plugin(watch)
    for step in range(1, 4):
        x, y = torch.randn(3, 6, 8) * 3, torch.randint(0, 5, (3, 6))
        model.logits.clear()
        watch.step(lambda: F.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1)))
        if step in (1, 2):
            causal = model.logits[-1][torch.isfinite(model.logits[-1])]  # the unmasked logits
            (site, value), = plugin.last["attention_logit_max"].items()
            assert site == "(root)" and value == pytest.approx(float(causal.max()), rel=1e-5)
        else:
            assert "attention_logit_max" not in plugin.last
    watch.close()


def test_hf_gpt2_eager_attention_is_named_like_its_sdpa_twin() -> None:
    transformers = pytest.importorskip("transformers")
    sites = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        watch = gw.Watch(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        watch.step(lambda: model(input_ids=ids, labels=ids).loss)
        sites[implementation] = _plugin(watch).last["attention_logit_max"]
        watch.close()
    assert set(sites["eager"]) == set(sites["sdpa"]) == {"transformer.h.0.attn", "transformer.h.1.attn"}
    for site in sites["eager"]:  # signed max of the unmasked logits <= max |q k^T| over every position
        assert 0 < sites["eager"][site] <= sites["sdpa"][site] + 1e-5
    assert sites["eager"] != sites["sdpa"]  # read at the eager softmax, not by a second q k^T


class _LogitTable(nn.Module):
    """Logits looked up per example: a model whose log Z and cross-entropy are set by construction."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(logits.clone())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


@pytest.mark.parametrize("case", ["confident", "drifting"])
def test_log_z_far_from_zero_is_judged_only_when_the_targets_are_not_predicted_with_near_certainty(case: str) -> None:
    torch.manual_seed(0)
    n, classes = 32, 4
    y = torch.randint(0, classes, (n,))
    if case == "confident":  # the target logit 40, the others 0: log Z ~ 40 at a loss of ~4e-17
        logits = 40.0 * F.one_hot(y, classes).float()
    else:  # every logit 40 (+ noise): the same log Z, shifted as a whole, at a loss of ~log 4
        logits = 40.0 + 0.1 * torch.randn(n, classes)
    model = _LogitTable(logits)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=1e-6),
                     precursors=gw.PrecursorConfig(sample_every=5, log_z_threshold=30.0, quiet_steps=1000))
    idx = torch.arange(n)
    codes = []
    for _ in range(10):
        codes += [f.code for f in watch.step(lambda: F.cross_entropy(model(idx), y)).findings]
    last = _plugin(watch).last
    want_z = torch.logsumexp(logits, dim=-1).mean().item()  # by hand, from the table (the lr barely moves it)
    assert last["log_z_mean"] == pytest.approx(want_z, rel=1e-4) and want_z > 30.0
    assert last["log_z_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-3, abs=1e-12)
    if case == "confident":
        assert last["log_z_loss"] < rules.CONFIDENT_LOSS and "output_logit_divergence" not in codes
    else:
        assert codes.count("output_logit_divergence") == 1  # once per episode
        (finding,) = [f for f in watch.findings if f.code == "output_logit_divergence"]
        assert finding.evidence["cross_entropy"] == pytest.approx(math.log(classes), rel=0.05)
    watch.close()


def test_mean_loss_reads_what_cross_entropy_returned_for_each_reduction() -> None:
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    want = F.cross_entropy(logits, y).item()
    assert signals.mean_loss(F.cross_entropy(logits, y)).item() == pytest.approx(want)
    assert signals.mean_loss(F.cross_entropy(logits, y, reduction="none"), "none").item() == pytest.approx(want)
    assert signals.mean_loss(F.cross_entropy(logits, y, reduction="sum"), "sum") is None  # the count is unknown

"""The scenarios: one injected root cause each (or none, for the healthy controls).

A :class:`Scenario` states what a correct diagnosis is - the expected finding
code and, for non-finite failures, the aten op that first goes non-finite and
the module it runs in - and how to build the run (:class:`Setup`: model,
optimizer, batches by step, loss, Watch options). The harness runs it through
``gradwatch.Watch`` exactly as a user would; nothing here knows how gradwatch
detects anything.

``onset`` is the first step at which the fault is present (1 for faults built
into the model, the loss or the init; the injection step for a bad batch).
``onset=None`` marks a latent bug that bites when training reaches it (a
sigmoid that saturates to exactly 1.0, say): the onset is then the first
non-finite step, measured by the harness.

Scenarios marked ``quick`` form the reduced set of ``--quick`` and of
tests/test_faults.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from . import archs, data, hf


@dataclass
class Setup:
    """One built run: what the harness needs to train it under a Watch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], Any]  # step -> batch (a tuple of tensors); a pure function of the step
    loss: Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> scalar loss
    evaluate: Callable[[nn.Module], float] | None = None  # held-out accuracy (healthy runs show they learn)
    watch: dict[str, Any] = field(default_factory=dict)  # extra Watch(...) keyword arguments
    probe_loss: Callable[[torch.Tensor, Any], torch.Tensor] | None = None  # loss_fn for gw.probe(model, batch, loss_fn)


@dataclass(frozen=True)
class Scenario:
    name: str
    family: str  # mlp | cnn | gpt | rnn | resnet; transformers models: gpt2 | bert | t5 | llama | vit (resnet too)
    arch: str  # the model in a few words
    cause: str  # the injected root cause, one sentence ("" for healthy runs)
    expected: str | None  # the DESIGN.md code a correct diagnosis raises; None for a healthy run
    build: Callable[[], Setup]
    steps: int = 120
    onset: int | None = 1
    expected_op: str | None = None  # non-finite scenarios: the aten op that first produces the non-finite value
    expected_module: tuple[str, ...] | None = None  # the module(s) a finding must name (any of them)
    expected_node: str | None = None  # backward failures: the autograd node the op runs in (informative)
    quick: bool = False

    @property
    def healthy(self) -> bool:
        return self.expected is None


# ----- tasks ----------------------------------------------------------------------------
def _at(onset: int, fn: Callable[[Any], Any]) -> Callable[[int, Any], Any]:
    """Inject ``fn`` into the batch of step ``onset`` only."""
    return lambda step, b: fn(b) if step == onset else b


def _from(onset: int, fn: Callable[[Any], Any]) -> Callable[[int, Any], Any]:
    """Inject ``fn`` into every batch from step ``onset`` on."""
    return lambda step, b: fn(b) if step >= onset else b


def _ce(model: nn.Module, b: Any) -> torch.Tensor:
    return F.cross_entropy(model(b[0]), b[1])


def _digits_accuracy(image: bool) -> Callable[[nn.Module], float]:
    def evaluate(model: nn.Module) -> float:
        x, y = data.digits_test(image)
        return float((model(x).argmax(-1) == y).float().mean())

    return evaluate


def digits_task(model: nn.Module, opt: torch.optim.Optimizer, *, image: bool = False,
                inject: Callable[[int, Any], Any] | None = None,
                loss: Callable[[nn.Module, Any], torch.Tensor] = _ce, **watch: Any) -> Setup:
    def batch(step: int) -> Any:
        b = data.digits_batch(step, image=image)
        return inject(step, b) if inject is not None else b

    return Setup(model, opt, batch, loss, _digits_accuracy(image), watch, probe_loss=F.cross_entropy)


def _seq_ce(model: nn.Module, b: Any) -> torch.Tensor:
    logits = model(b[0])  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), b[1].reshape(-1))


def _seq_probe_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.size(-1)), y.reshape(-1))


def _seq_accuracy(one_hot: bool) -> Callable[[nn.Module], float]:
    def evaluate(model: nn.Module) -> float:
        x, y = data.arith_batch(0, batch=256, seed=99)
        logits = model(data.one_hot(x) if one_hot else x)
        return float((logits.argmax(-1)[:, 1:] == y[:, 1:]).float().mean())  # position 0 cannot know k

    return evaluate


def seq_task(model: nn.Module, opt: torch.optim.Optimizer, *, one_hot: bool = False,
             inject: Callable[[int, Any], Any] | None = None,
             loss: Callable[[nn.Module, Any], torch.Tensor] = _seq_ce, **watch: Any) -> Setup:
    def batch(step: int) -> Any:
        x, y = data.arith_batch(step)
        b: Any = (data.one_hot(x) if one_hot else x, y)
        return inject(step, b) if inject is not None else b

    return Setup(model, opt, batch, loss, _seq_accuracy(one_hot), watch, probe_loss=_seq_probe_loss)


def adam(model: nn.Module, lr: float = 3e-3) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


def sgd(model: nn.Module, lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


# ----- batch corruptions ----------------------------------------------------------------
def _nan_features(b: Any) -> Any:
    x = b[0].clone()
    flat = x.view(-1)  # three NaN values, wherever the batch's layout puts them
    flat[[3 * 64 + 7, 5 * 64 + 20, 9 * 64 + 41]] = float("nan")
    return (x,) + tuple(b[1:])


def _inf_feature(b: Any) -> Any:
    x = b[0].clone()
    x[0, 30] = float("inf")
    return (x,) + tuple(b[1:])


def _scale(factor: float) -> Callable[[Any], Any]:
    return lambda b: (b[0] * factor,) + tuple(b[1:])


def _zeros(b: Any) -> Any:
    return (torch.zeros_like(b[0]),) + tuple(b[1:])


def _wrong_labels(b: Any) -> Any:
    return (b[0], (b[1] + 1 + b[1] % 3) % 10)


def _random_tokens(b: Any) -> Any:
    g = torch.Generator().manual_seed(123)
    return (torch.randint(0, 16, b[0].shape, generator=g), torch.randint(0, 16, b[1].shape, generator=g))


def _random_onehot_tokens(b: Any) -> Any:
    x, y = _random_tokens((b[1], b[1]))  # token-id shaped draws
    return (data.one_hot(x), y)


def _unlabeled(b: Any) -> Any:
    return (b[0], torch.full_like(b[1], -1))


def _repeat_first(b: Any) -> Any:
    return (b[0][:1].expand_as(b[0]).clone(), b[1][:1].expand_as(b[1]).clone())


def _blank_group(b: Any) -> Any:
    x = b[0].clone()
    x[0, 24:40] = 0.0  # one example with two blank rows of pixels (what GroupNormFeature measures)
    return (x,) + tuple(b[1:])


# ----- losses with a numerical bug ------------------------------------------------------
def _masked_ce(model: nn.Module, b: Any) -> torch.Tensor:
    """Cross-entropy averaged over labeled examples (label -1 = unlabeled): sum / count, no guard."""
    x, y = b
    mask = y >= 0
    per = F.cross_entropy(model(x), y.clamp(min=0), reduction="none")
    return (per * mask).sum() / mask.sum()  # 0/0 for a batch with no labels


def _distill_log_softmax(model: nn.Module, b: Any) -> torch.Tensor:
    """A sharpened cross-entropy written as log(softmax(z / T)), T = 0.01: softmax underflows to 0, log(0) = -inf."""
    logits = model(b[0]) / 0.01
    p = torch.softmax(logits, dim=-1)
    return -torch.log(p.gather(-1, b[1].unsqueeze(-1))).mean()


def _bce_by_hand(model: nn.Module, b: Any) -> torch.Tensor:
    """One-vs-rest BCE written by hand on sigmoid outputs: sigmoid(z) rounds to 1.0 for z > 16.6, log(1 - p) = -inf."""
    x, y = b
    p = torch.sigmoid(model(x))
    t = F.one_hot(y, 10).float()
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def _padded_seq_ce(model: nn.Module, b: Any) -> torch.Tensor:
    """Token cross-entropy averaged over non-padding positions (bool mask): sum / count, no guard."""
    x, y, keep = b
    logits = model(x)
    per = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    keep = keep.reshape(-1)
    return (per * keep).sum() / keep.sum()  # 0/0 for a batch of padding only


def _with_keep_mask(onset: int) -> Callable[[int, Any], Any]:
    def inject(step: int, b: Any) -> Any:
        keep = torch.ones(b[1].shape, dtype=torch.bool)
        if step == onset:
            keep[:] = False  # a batch made only of padding
        return (b[0], b[1], keep)

    return inject


def _times(loss_fn: Callable[[nn.Module, Any], torch.Tensor], factor: float) -> Callable[[nn.Module, Any], torch.Tensor]:
    return lambda model, b: loss_fn(model, b) * factor


# ----- model surgery ----------------------------------------------------------------------
def _set_bias_(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        module.bias.fill_(value)


def _scale_weights_(model: nn.Module, factor: float, types: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, types):
                m.weight.mul_(factor)


# ----- builders -----------------------------------------------------------------------------
def _mlp(depth: int, act: str, init: str = "kaiming", gain: float = 1.0, norm: bool = False, **kw: Any) -> nn.Sequential:
    model = archs.mlp(depth, 32, act, norm=norm, **kw)
    return archs.init_linear_(model, init, gain) if init != "default" else model


def b_mlp_vanish_sigmoid_xavier() -> Setup:
    m = _mlp(12, "sigmoid", "xavier")
    return digits_task(m, adam(m, 1e-3))


def b_mlp_vanish_sigmoid_default() -> Setup:
    m = _mlp(20, "sigmoid", "default")
    return digits_task(m, sgd(m, 0.1, 0.9))


def b_mlp_vanish_relu_xavier() -> Setup:
    m = _mlp(30, "relu", "xavier")
    return digits_task(m, adam(m, 1e-3))


def b_mlp_explode_linear() -> Setup:
    m = _mlp(16, "linear", "orthogonal", gain=1.5)
    return digits_task(m, adam(m, 1e-3))


def b_mlp_init_large() -> Setup:
    m = _mlp(8, "relu", "kaiming", gain=6.0)
    return digits_task(m, adam(m, 1e-3))


def _mse_onehot(model: nn.Module, b: Any) -> torch.Tensor:
    return F.mse_loss(model(b[0]), F.one_hot(b[1], 10).float())


def b_mlp_lr_sgd() -> Setup:
    m = _mlp(4, "tanh", "xavier")
    return digits_task(m, sgd(m, 2.0), clip_norm=None, loss=_mse_onehot)


def b_mlp_dead_relu() -> Setup:
    m = _mlp(6, "relu", "kaiming")
    _set_bias_(m[4], -10.0)  # every unit of the third hidden layer: pre-activation < 0 for every input
    return digits_task(m, adam(m, 1e-3))


def b_mlp_saturated_tanh() -> Setup:
    m = _mlp(3, "tanh", "xavier", gain=12.0)
    return digits_task(m, adam(m, 1e-3))


def b_mlp_missing_aux() -> Setup:
    m = archs.WithAux()
    return digits_task(m, adam(m))


def b_mlp_clip_tiny() -> Setup:
    m = _mlp(4, "relu", "kaiming")
    return digits_task(m, adam(m), clip_norm=0.01)


def b_mlp_spike() -> Setup:
    m = _mlp(4, "relu", "kaiming")
    return digits_task(m, adam(m), inject=_at(80, _scale(1000.0)))


def b_mlp_nan_features() -> Setup:
    m = _mlp(4, "relu", "kaiming")
    return digits_task(m, adam(m), inject=_at(60, _nan_features))


def b_mlp_exp_overflow() -> Setup:
    m = _mlp(4, "relu", "kaiming", make_act=archs.NaiveSoftplus)
    return digits_task(m, adam(m, 1e-3), inject=_at(60, _scale(300.0)))


def b_mlp_div_unlabeled() -> Setup:
    m = _mlp(4, "relu", "kaiming")
    return digits_task(m, adam(m), inject=_at(70, _unlabeled), loss=_masked_ce)


def b_mlp_unlabeled_from_step40() -> Setup:
    m = _mlp(4, "relu", "kaiming")
    return digits_task(m, adam(m), inject=_from(40, _unlabeled), loss=_masked_ce)


def b_mlp_bce_by_hand() -> Setup:
    m = _mlp(4, "relu", "kaiming")
    return digits_task(m, adam(m, 1e-2), loss=_bce_by_hand)


def b_mlp_sqrt_backward() -> Setup:
    m = nn.Sequential(archs.GroupNormFeature(24, 40), nn.Linear(65, 32), nn.ReLU(), nn.Linear(32, 10))
    return digits_task(m, adam(m), inject=_at(50, _blank_group))


def b_mlp_repeated_sample() -> Setup:
    m = _mlp(3, "relu", "kaiming")
    m.insert(1, archs.BatchStandardize())  # a hand-written BatchNorm without eps after the first Linear
    return digits_task(m, adam(m), inject=_at(50, _repeat_first))


def b_mlp_adam_lr1() -> Setup:
    m = _mlp(4, "relu", "kaiming")
    return digits_task(m, adam(m, 1.0), clip_norm=None)


def b_mlp_fp16_unlabeled() -> Setup:
    m = _mlp(4, "relu", "kaiming")
    return digits_task(m, adam(m), inject=_at(40, _unlabeled), loss=_masked_ce, precision="fp16")


def b_mlp_probe_deep_tanh() -> Setup:
    m = _mlp(24, "tanh", "default")
    return digits_task(m, adam(m, 1e-3))


def b_mlp_fp16_overflow() -> Setup:
    m = _mlp(4, "relu", "kaiming")
    return digits_task(m, adam(m), inject=_from(30, _scale(1e5)), precision="fp16")


def b_mlp_fp16_underflow(factor: float = 1e-4) -> Setup:
    m = _mlp(4, "relu", "kaiming")
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1_000_000)
    return digits_task(m, adam(m), loss=_times(_ce, factor), precision="fp16", scaler=scaler)


def b_mlp_fp16_flushed() -> Setup:
    return b_mlp_fp16_underflow(1e-7)


# cnn
def b_cnn_vanish_sigmoid() -> Setup:
    m = archs.CNN(depth=10, bn=False, act="sigmoid")
    return digits_task(m, adam(m, 1e-3), image=True)


def b_cnn_init_large() -> Setup:
    m = archs.init_linear_(archs.CNN(depth=4, bn=False), "kaiming", 8.0)
    return digits_task(m, adam(m, 1e-3), image=True)


def b_cnn_lr_sgd() -> Setup:
    m = archs.init_linear_(archs.CNN(depth=3, bn=False, act="gelu"), "kaiming")
    return digits_task(m, sgd(m, 10.0, 0.9), image=True, clip_norm=None)


def b_cnn_dead_relu_bn() -> Setup:
    m = archs.CNN(depth=3, bn=True)
    _set_bias_(m.features[4], -10.0)  # BatchNorm shift of the second block: every output < 0
    return digits_task(m, adam(m), image=True)


def b_cnn_zero_batch() -> Setup:
    m = archs.CNN(depth=3, bn=True, standardize=True)
    return digits_task(m, adam(m), image=True, inject=_at(40, _zeros))


def b_cnn_exp_overflow() -> Setup:
    m = archs.CNN(depth=3, bn=False)
    m.features[1] = archs.NaiveSoftplus()
    return digits_task(m, adam(m, 1e-3), image=True, inject=_at(60, _scale(300.0)))


def b_cnn_missing_side() -> Setup:
    m = archs.CNN(depth=3, bn=True, side_branch=True)
    return digits_task(m, adam(m), image=True)


def b_cnn_label_spike() -> Setup:
    m = archs.CNN(depth=3, channels=16, bn=True)
    return digits_task(m, adam(m, 1e-2), image=True, inject=_at(200, _wrong_labels))


def b_cnn_probe_plain_deep() -> Setup:
    m = archs.CNN(depth=20, bn=False, act="relu")
    return digits_task(m, adam(m, 1e-3), image=True)


# gpt
def b_gpt_lr_sgd() -> Setup:
    m = archs.gpt(2)
    return seq_task(m, sgd(m, 30.0), clip_norm=None)


def b_gpt_mask_diagonal() -> Setup:
    m = archs.ManualAttnGPT(2, diagonal=0)
    return seq_task(m, adam(m))


def b_gpt_distill_log0() -> Setup:
    m = archs.gpt(2)
    return seq_task(m, adam(m), loss=_distill_log_softmax)


def b_gpt_missing_pos() -> Setup:
    m = archs.DetachedPosGPT(vocab=16, d=32, heads=2, layers=2, seq=16)
    return seq_task(m, adam(m))


def b_gpt_unused_head() -> Setup:
    m = archs.ValueHeadGPT(vocab=16, d=32, heads=2, layers=2, seq=16)
    return seq_task(m, adam(m))


def b_gpt_token_spike() -> Setup:
    m = archs.gpt(2)
    return seq_task(m, adam(m, 1e-2), inject=_at(150, _random_tokens))


def b_gpt_postln_clip_tiny() -> Setup:
    m = archs.gpt(2, pre_ln=False)
    return seq_task(m, adam(m), clip_norm=0.01)


# rnn
def b_lstm_lr_sgd() -> Setup:
    m = archs.SeqRNN("lstm")
    return seq_task(m, sgd(m, 50.0), one_hot=True, clip_norm=None)


def b_lstm_nan_input() -> Setup:
    m = archs.SeqRNN("lstm")
    return seq_task(m, adam(m, 1e-2), one_hot=True, inject=_at(50, _nan_features))


def b_lstm_padding_only() -> Setup:
    m = archs.SeqRNN("lstm")
    return seq_task(m, adam(m, 1e-2), one_hot=True, inject=_with_keep_mask(60), loss=_padded_seq_ce)


def b_lstm_saturated_proj() -> Setup:
    m = archs.SeqRNN("lstm", proj_tanh=True)
    _scale_weights_(m.proj, 300.0)
    return seq_task(m, adam(m, 1e-3), one_hot=True)


def b_lstm_detached_encoder() -> Setup:
    m = archs.SeqRNN("lstm", encoder=True)
    return seq_task(m, adam(m, 1e-2), one_hot=True)


def b_lstm_token_spike() -> Setup:
    m = archs.SeqRNN("lstm")
    return seq_task(m, adam(m, 1e-2), one_hot=True, inject=_at(150, _random_onehot_tokens))


def b_gru_clip_tiny() -> Setup:
    m = archs.SeqRNN("gru")
    return seq_task(m, adam(m, 1e-2), one_hot=True, clip_norm=1e-3)


# resnet
def b_res_explode_nonorm() -> Setup:
    m = archs.ResMLP(blocks=16, norm=False)
    archs.init_linear_(m.blocks, "kaiming", 1.0)
    return digits_task(m, adam(m, 1e-3))


def b_res_where_log() -> Setup:
    m = archs.ResMLP(blocks=4, norm=True, pre=archs.LogIntensity())
    return digits_task(m, adam(m))


def b_res_detached_block() -> Setup:
    m = archs.ResMLP(blocks=4, norm=True, detach_block=2)
    return digits_task(m, adam(m))


def b_res_inf_feature() -> Setup:
    m = archs.ResMLP(blocks=4, norm=True)
    return digits_task(m, adam(m), inject=_at(90, _inf_feature))


def b_rescnn_lr_sgd() -> Setup:
    m = archs.ResCNN(blocks=2)
    return digits_task(m, sgd(m, 50.0), image=True, clip_norm=None)


def b_rescnn_dead_stem() -> Setup:
    m = archs.ResCNN(blocks=2)
    _set_bias_(m.stem[1], -10.0)  # the stem BatchNorm's shift: its ReLU outputs 0 everywhere
    return digits_task(m, adam(m, 3e-3), image=True)


def b_rescnn_spike() -> Setup:
    m = archs.ResCNN(blocks=2)
    return digits_task(m, adam(m, 1e-2), image=True, inject=_at(100, _wrong_labels))


# transformers models built from configs (benchmarks/faults/hf.py): the model's own loss
def _adamw(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr)


def b_gpt2_all_ignored() -> Setup:
    m = hf.gpt2()
    return hf.task(m, _adamw(m), "gpt2", inject=hf.at(40, hf.all_ignored))


def b_bert_all_ignored() -> Setup:
    m = hf.bert()
    return hf.task(m, _adamw(m), "bert", inject=hf.at(40, hf.all_ignored))


def b_bert_padding_row_4d_mask() -> Setup:
    m = hf.bert(attention="eager")
    return hf.task(m, _adamw(m), "bert",
                   inject=lambda step, b: hf.additive_mask(hf.padding_row(b) if step == 30 else b))


def b_bert_padding_row_absorbed() -> Setup:
    m = hf.bert()
    return hf.task(m, _adamw(m), "bert", inject=hf.at(30, hf.padding_row))


def b_llama_adamw_lr1() -> Setup:
    m = hf.llama()
    return hf.task(m, _adamw(m, 1.0), "llama")


def b_t5_fp16_ff_overflow() -> Setup:
    m = hf.t5()
    with torch.no_grad():  # the feed-forward's output projection at 1e5x: its fp16 output passes 65504
        m.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(1e5)
    return hf.task(m, _adamw(m), "t5", precision="fp16")


def b_vit_unused_pooler() -> Setup:
    m = hf.ViTWithOwnHead()
    return hf.task(m, _adamw(m), "vit")


def b_hf_resnet_sgd_lr50() -> Setup:
    m = hf.resnet()
    return hf.task(m, sgd(m, 50.0), "resnet")


def _hf_healthy(name: str) -> Callable[[], Setup]:
    def build() -> Setup:
        m = getattr(hf, name)()
        return hf.task(m, _adamw(m), name)

    build.__name__ = f"h_{name}"
    return build


# healthy controls
def h_mlp_relu() -> Setup:
    m = _mlp(6, "relu", "kaiming")
    return digits_task(m, adam(m, 1e-3))


def h_mlp_relu_ln_deep() -> Setup:
    m = _mlp(12, "relu", "kaiming", norm=True)
    return digits_task(m, torch.optim.AdamW(m.parameters(), lr=1e-3))


def h_mlp_tanh_sgd() -> Setup:
    m = _mlp(3, "tanh", "xavier")
    return digits_task(m, sgd(m, 0.05, 0.9))


def h_mlp_gelu() -> Setup:
    m = _mlp(4, "gelu", "default")
    return digits_task(m, adam(m, 1e-3))


def h_mlp_fp16() -> Setup:
    m = _mlp(4, "relu", "kaiming")
    return digits_task(m, adam(m, 1e-3), precision="fp16")


def h_mlp_bf16() -> Setup:
    m = _mlp(4, "relu", "kaiming")
    return digits_task(m, adam(m, 1e-3), precision="bf16")


def h_cnn_bn_sgd() -> Setup:
    m = archs.CNN(depth=4, bn=True)
    return digits_task(m, sgd(m, 0.05, 0.9), image=True)


def h_gpt_preln_4() -> Setup:
    m = archs.gpt(4)
    return seq_task(m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1))


def h_cnn_bn() -> Setup:
    m = archs.CNN(depth=4, bn=True)
    return digits_task(m, adam(m, 3e-3), image=True)


def h_cnn_plain() -> Setup:
    m = archs.init_linear_(archs.CNN(depth=3, channels=16, bn=False), "kaiming")
    return digits_task(m, adam(m, 3e-3), image=True)


def h_gpt_preln() -> Setup:
    m = archs.gpt(2)
    return seq_task(m, adam(m, 3e-3))


def h_gpt_postln() -> Setup:
    m = archs.gpt(2, pre_ln=False)
    return seq_task(m, adam(m, 1e-3))


def h_lstm() -> Setup:
    m = archs.SeqRNN("lstm")
    return seq_task(m, adam(m, 1e-2), one_hot=True)


def h_gru() -> Setup:
    m = archs.SeqRNN("gru")
    return seq_task(m, adam(m, 1e-2), one_hot=True)


def h_resmlp() -> Setup:
    m = archs.ResMLP(blocks=6, norm=True)
    return digits_task(m, adam(m, 1e-3))


def h_rescnn() -> Setup:
    m = archs.ResCNN(blocks=2)
    return digits_task(m, adam(m, 3e-3), image=True)


S = Scenario
HEALTHY_STEPS = 400  # >= 200 (the issue); long enough for the window rules (50-step windows) to run many times

SCENARIOS: list[Scenario] = [
    # ----- mlp: deep MLPs with various activations, on digits
    S("mlp_sigmoid_xavier_12", "mlp", "12 x Linear(32)+sigmoid, Xavier, Adam",
      "sigmoid's derivative is at most 0.25: 12 layers attenuate the gradient ~0.25^12", "vanishing_gradients",
      b_mlp_vanish_sigmoid_xavier, steps=60, quick=True),
    S("mlp_sigmoid_default_20", "mlp", "20 x Linear(32)+sigmoid, default init, SGD+momentum",
      "20 sigmoid layers with PyTorch's default init", "vanishing_gradients", b_mlp_vanish_sigmoid_default, steps=60),
    S("mlp_relu_xavier_30", "mlp", "30 x Linear(32)+ReLU, Xavier, Adam",
      "Xavier init under ReLU: per-layer gain 1/sqrt(2); the weight-gradient norms stay flat (activation gradients shrink)",
      "vanishing_gradients", b_mlp_vanish_relu_xavier, steps=60),
    S("mlp_linear_orth_gain1.5_16", "mlp", "16 x Linear(32), no activation, orthogonal x1.5",
      "per-layer gain 1.5: activation gradients grow 1.5^16 toward the input", "exploding_gradients",
      b_mlp_explode_linear, steps=60),
    S("mlp_relu_init_x6", "mlp", "8 x Linear(32)+ReLU, Kaiming x6, Adam, clip 1.0",
      "weights 6x their Kaiming scale", "init_scale_too_large", b_mlp_init_large, steps=40, quick=True),
    S("mlp_mse_sgd_lr2", "mlp", "4 x Linear(32)+tanh, Xavier, MSE on one-hot targets, SGD lr=2, no clipping",
      "learning rate far above the stable one: the error grows geometrically", "lr_too_high", b_mlp_lr_sgd, steps=80),
    S("mlp_dead_relu_bias", "mlp", "6 x Linear(32)+ReLU, Kaiming, Adam",
      "third hidden layer's bias set to -10: its ReLU outputs 0 for every input", "dead_relu", b_mlp_dead_relu,
      steps=60, expected_module=("4", "5")),
    S("mlp_tanh_x12", "mlp", "3 x Linear(32)+tanh, Xavier x12, Adam",
      "weights 12x Xavier: tanh pre-activations far in the flat tails", "saturated_activations",
      b_mlp_saturated_tanh, steps=60, expected_module=("0", "1", "2", "3", "4", "5")),
    S("mlp_unlabeled_from_step40", "mlp", "4 x Linear(32)+ReLU, CE averaged over labeled examples",
      "from step 40 on every batch has no labeled example (a broken label column): every step is skipped",
      "training_stalled", b_mlp_unlabeled_from_step40, steps=60, onset=40),
    S("mlp_detached_aux", "mlp", "MLP + auxiliary Linear whose output is detached",
      "aux(x).detach(): the aux layer never receives a gradient", "missing_gradients", b_mlp_missing_aux,
      steps=40, expected_module=("aux",), quick=True),
    S("mlp_clip_0.01", "mlp", "4 x Linear(32)+ReLU, Adam, clip_norm=0.01",
      "a clip threshold far below the typical gradient norm", "clipping_always_active", b_mlp_clip_tiny, steps=80),
    S("mlp_batch_x1000_step80", "mlp", "4 x Linear(32)+ReLU, Adam",
      "one batch at step 80 with features x1000 (raw, unnormalized units)", "loss_spike", b_mlp_spike, steps=110, onset=80),
    S("mlp_nan_features_step60", "mlp", "4 x Linear(32)+ReLU, Adam",
      "three NaN pixels in the batch of step 60", "degenerate_batch", b_mlp_nan_features, steps=80, onset=60,
      quick=True),
    S("mlp_naive_softplus_exp", "mlp", "4 x Linear(32)+log(1+exp(x)) by hand",
      "batch x300 at step 60: exp overflows float32 in the first activation", "nonfinite_forward",
      b_mlp_exp_overflow, steps=80, onset=60, expected_op="aten.exp", expected_module=("1",), quick=True),
    S("mlp_masked_mean_unlabeled", "mlp", "4 x Linear(32)+ReLU, CE averaged over labeled examples",
      "a batch with no labels at step 70: sum / count = 0/0", "loss_numerics", b_mlp_div_unlabeled, steps=90,
      onset=70, expected_op="aten.div", quick=True),
    S("mlp_bce_by_hand", "mlp", "4 x Linear(32)+ReLU, one-vs-rest BCE written with log(sigmoid)",
      "sigmoid rounds to exactly 1.0 once a logit exceeds ~16.6: log(1 - p) = log(0)", "loss_numerics",
      b_mlp_bce_by_hand, steps=300, onset=None, expected_op="aten.log"),
    S("mlp_sqrt_norm_feature", "mlp", "pixel-group norm sqrt(sum(x**2)) as a feature + MLP",
      "one example with a blank pixel group at step 50: sqrt's backward at 0 is inf, times 0 = NaN",
      "nonfinite_backward", b_mlp_sqrt_backward, steps=70, onset=50, expected_op="aten.div",
      expected_module=("0",), expected_node="SqrtBackward0", quick=True),
    S("mlp_repeated_sample_batchstd", "mlp", "Linear + hand-written batch standardization (no eps) + ReLU MLP",
      "a loader bug repeats one example across the batch at step 50: the batch std is 0, 0/0", "degenerate_batch",
      b_mlp_repeated_sample, steps=70, onset=50, expected_op="aten.div", expected_module=("1",)),
    S("mlp_adam_lr1", "mlp", "4 x Linear(32)+ReLU, Kaiming, Adam lr=1, no clipping",
      "Adam's learning rate 1000x its usual value", "lr_too_high", b_mlp_adam_lr1, steps=80),
    S("mlp_fp16_unlabeled_step40", "mlp", "4 x Linear(32)+ReLU, fp16 autocast, CE averaged over labeled examples",
      "a batch with no labels at step 40 under fp16: a true 0/0, not a float16 range problem", "loss_numerics",
      b_mlp_fp16_unlabeled, steps=60, onset=40, expected_op="aten.div"),
    S("mlp_tanh_24_probe", "mlp", "24 x Linear(32)+tanh, default init, no normalization",
      "a deep plain tanh stack that the pre-flight probe should flag", "missing_normalization",
      b_mlp_probe_deep_tanh, steps=30),
    S("mlp_fp16_raw_inputs", "mlp", "4 x Linear(32)+ReLU, fp16 autocast + GradScaler",
      "inputs in raw units (x1e5) from step 30: activations above fp16's 65504", "fp16_overflow",
      b_mlp_fp16_overflow, steps=70, onset=30, expected_module=("0",)),
    S("mlp_fp16_small_loss", "mlp", "4 x Linear(32)+ReLU, fp16, GradScaler(init_scale=1, no growth)",
      "loss x1e-4 with no loss scaling: many gradients fall below fp16's normal range 2^-14", "fp16_underflow",
      b_mlp_fp16_underflow, steps=60),
    S("mlp_fp16_tiny_loss", "mlp", "4 x Linear(32)+ReLU, fp16, GradScaler(init_scale=1, no growth)",
      "loss x1e-7 with no loss scaling: every gradient flushes to zero in fp16 (nothing learns)", "fp16_underflow",
      b_mlp_fp16_flushed, steps=60),
    # ----- cnn: with and without BatchNorm, on 8x8 digit images
    S("cnn_sigmoid_10_nobn", "cnn", "10 x Conv3x3(8)+sigmoid, no BatchNorm",
      "ten sigmoid conv layers without normalization", "vanishing_gradients", b_cnn_vanish_sigmoid, steps=60),
    S("cnn_init_x8_nobn", "cnn", "4 x Conv3x3(8)+ReLU, Kaiming x8, no BatchNorm",
      "conv weights 8x their Kaiming scale", "init_scale_too_large", b_cnn_init_large, steps=40),
    S("cnn_sgd_lr10_nobn", "cnn", "3 x Conv3x3(8)+GELU, Kaiming, SGD lr=10 momentum 0.9, no clipping",
      "learning rate far above the stable one", "lr_too_high", b_cnn_lr_sgd, steps=80),
    S("cnn_bn_dead_relu", "cnn", "3 x Conv3x3(8)+BatchNorm+ReLU",
      "second BatchNorm's shift set to -10: its ReLU outputs 0 everywhere", "dead_relu", b_cnn_dead_relu_bn,
      steps=60, expected_module=("features.4", "features.5")),
    S("cnn_bn_blank_batch_std", "cnn", "per-image standardization (x-mean)/std + 3 conv+BN",
      "an all-zero batch at step 40 (blank frames): std = 0, 0/0", "degenerate_batch", b_cnn_zero_batch, steps=60,
      onset=40, expected_op="aten.div", expected_module=("features.0",), quick=True),
    S("cnn_naive_softplus_exp", "cnn", "3 x Conv3x3(8), first activation log(1+exp(x)) by hand",
      "batch x300 at step 60: exp overflows float32", "nonfinite_forward", b_cnn_exp_overflow, steps=80, onset=60,
      expected_op="aten.exp", expected_module=("features.1",)),
    S("cnn_bn_no_grad_branch", "cnn", "conv+BN stack + a side conv computed under torch.no_grad",
      "a trainable branch run under no_grad never receives a gradient", "missing_gradients", b_cnn_missing_side,
      steps=40, expected_module=("side",)),
    S("cnn_bn_wrong_labels_step200", "cnn", "3 x Conv3x3(16)+BatchNorm+ReLU, Adam",
      "one batch with every label wrong at step 200", "loss_spike", b_cnn_label_spike, steps=230, onset=200),
    S("cnn_plain_20_probe", "cnn", "20 x Conv3x3(8)+ReLU, default init, no BatchNorm",
      "a deep plain CNN that the pre-flight probe should flag", "missing_normalization", b_cnn_probe_plain_deep,
      steps=30),
    # ----- gpt: GPT-style decoder, pre- and post-LN, on arithmetic sequences
    S("gpt_preln_sgd_lr30", "gpt", "2-block pre-LN GPT (d=32), SGD lr=30, no clipping",
      "learning rate far above the stable one", "lr_too_high", b_gpt_lr_sgd, steps=80),
    S("gpt_causal_mask_diagonal", "gpt", "2-block GPT with hand-written masked-softmax attention",
      "causal mask built with triu(diagonal=0): query 0 sees no key, softmax over all -inf = NaN",
      "nonfinite_forward", b_gpt_mask_diagonal, steps=20, expected_op="aten._softmax",
      expected_module=("blocks.0.core",), quick=True),
    S("gpt_distill_log_softmax_T0.01", "gpt", "2-block pre-LN GPT, sharpened CE as log(softmax(z/0.01))",
      "softmax underflows to exactly 0 for the target token: log(0)", "loss_numerics", b_gpt_distill_log0,
      steps=20, expected_op="aten.log"),
    S("gpt_detached_pos_emb", "gpt", "2-block pre-LN GPT, positional embedding added detached",
      "pos(...).detach(): the positional embedding never receives a gradient", "missing_gradients",
      b_gpt_missing_pos, steps=40, expected_module=("pos",)),
    S("gpt_unused_value_head", "gpt", "2-block pre-LN GPT with a value head never called in forward",
      "a head built in __init__ and forgotten in forward never receives a gradient", "missing_gradients",
      b_gpt_unused_head, steps=40, expected_module=("value_head",)),
    S("gpt_random_tokens_step150", "gpt", "2-block pre-LN GPT, Adam lr=1e-2",
      "one batch of random tokens at step 150, after the task is learned", "loss_spike", b_gpt_token_spike,
      steps=180, onset=150),
    S("gpt_postln_clip_0.01", "gpt", "2-block post-LN GPT, clip_norm=0.01",
      "a clip threshold far below the typical gradient norm", "clipping_always_active", b_gpt_postln_clip_tiny,
      steps=80),
    # ----- rnn: LSTM / GRU on one-hot arithmetic sequences
    S("lstm_sgd_lr50", "rnn", "LSTM(32), SGD lr=50, no clipping", "learning rate far above the stable one",
      "lr_too_high", b_lstm_lr_sgd, steps=80),
    S("lstm_nan_input_step50", "rnn", "LSTM(32), Adam", "three NaN values in the input batch of step 50",
      "degenerate_batch", b_lstm_nan_input, steps=70, onset=50),
    S("lstm_padding_only_batch", "rnn", "LSTM(32), token CE averaged over non-padding positions",
      "a batch made only of padding at step 60: sum / count = 0/0", "loss_numerics", b_lstm_padding_only, steps=80,
      onset=60, expected_op="aten.div", quick=True),
    S("lstm_tanh_proj_x300", "rnn", "LSTM(32) + Linear+tanh projection x300",
      "projection weights 300x default: most tanh outputs pinned at +-1", "saturated_activations", b_lstm_saturated_proj,
      steps=60, expected_module=("proj.1", "proj.0")),
    S("lstm_detached_encoder", "rnn", "2 stacked LSTMs, encoder output detached",
      "encoder(x)[0].detach(): the encoder never receives a gradient", "missing_gradients", b_lstm_detached_encoder,
      steps=40, expected_module=("encoder",)),
    S("lstm_random_tokens_step150", "rnn", "LSTM(32), Adam lr=1e-2",
      "one batch of random tokens at step 150, after the task is learned", "loss_spike", b_lstm_token_spike,
      steps=180, onset=150),
    S("gru_clip_0.001", "rnn", "GRU(32), Adam, clip_norm=1e-3", "a clip threshold far below the typical norm",
      "clipping_always_active", b_gru_clip_tiny, steps=80),
    # ----- resnet: residual MLP and residual CNN
    S("resmlp_16_nonorm", "resnet", "16 residual MLP blocks, Kaiming, no normalization",
      "each un-normalized residual block doubles the signal variance: gradients grow ~2^16 toward the input",
      "exploding_gradients", b_res_explode_nonorm, steps=60),
    S("resmlp_where_log", "resnet", "log-intensity input where(g*x > 0, log(g*x), 0) + 4 residual blocks (LN)",
      "torch.where NaN gradient: log's backward divides 0 by g*x = 0 at blank pixels", "nonfinite_backward",
      b_res_where_log, steps=20, expected_op="aten.div", expected_module=("pre",), expected_node="LogBackward0"),
    S("resmlp_detached_block", "resnet", "4 residual blocks (LN), block 2's branch detached",
      "x + branch(x).detach(): block 2 never receives a gradient", "missing_gradients", b_res_detached_block,
      steps=40, expected_module=("blocks.2",), quick=True),
    S("resmlp_inf_feature_step90", "resnet", "4 residual blocks (LN), Adam", "an inf pixel in the batch of step 90",
      "degenerate_batch", b_res_inf_feature, steps=110, onset=90),
    S("rescnn_sgd_lr50", "resnet", "ResNet (2 basic blocks, BN), SGD lr=50, no clipping",
      "learning rate far above the stable one", "lr_too_high", b_rescnn_lr_sgd, steps=80),
    S("rescnn_bn_dead_stem", "resnet", "ResNet (2 basic blocks, BN), stem BatchNorm shift -10",
      "the stem's BatchNorm shift set to -10: its ReLU outputs 0 everywhere", "dead_relu", b_rescnn_dead_stem,
      steps=60, expected_module=("stem.1", "stem.2")),
    S("rescnn_wrong_labels_step100", "resnet", "ResNet (2 basic blocks, BN), Adam",
      "one batch with every label wrong at step 100", "loss_spike", b_rescnn_spike, steps=130, onset=100),
    # ----- transformers models built from configs (random init), trained on their own loss
    S("gpt2_all_ignored_step40", "gpt2", "GPT2LMHeadModel (4 layers, d=64), AdamW",
      "a batch whose labels are all -100 at step 40 (truncation left no target): the mean loss is 0 / 0",
      "loss_numerics", b_gpt2_all_ignored, steps=60, onset=40, expected_op="aten.nll_loss_forward"),
    S("bert_mlm_all_ignored_step40", "bert", "BertForMaskedLM (4 layers, d=64), AdamW",
      "an MLM batch with no masked position at step 40: every label is -100", "loss_numerics",
      b_bert_all_ignored, steps=60, onset=40, expected_op="aten.nll_loss_forward", quick=True),
    S("bert_padding_row_inf_mask", "bert", "BertForMaskedLM, eager attention, the user's 4-D additive mask",
      "the mask is built with -inf (not finfo.min) and one example at step 30 is all padding: its softmax "
      "row is over -inf only = NaN", "nonfinite_forward", b_bert_padding_row_4d_mask, steps=50, onset=30,
      expected_op="aten._softmax", expected_module=("bert.encoder.layer.0.attention.self",
                                                   "bert.encoder.layer.0.attention"), quick=True),
    S("llama_adamw_lr1", "llama", "LlamaForCausalLM (RMSNorm, SwiGLU, rotary; 4 layers), AdamW lr=1",
      "AdamW's learning rate 1000x its usual value", "lr_too_high", b_llama_adamw_lr1, steps=40),
    S("t5_fp16_ff_overflow", "t5", "T5ForConditionalGeneration (2+2 layers, d=64), fp16 autocast + GradScaler",
      "the first encoder feed-forward's output projection at 1e5x: its float16 output passes 65504 "
      "(finite in float32)", "fp16_overflow", b_t5_fp16_ff_overflow, steps=40,
      expected_module=("encoder.block.0.layer.1.DenseReluDense.wo", "encoder.block.0.layer.1.DenseReluDense",
                       "encoder.block.0.layer.1")),
    S("vit_unused_pooler", "vit", "ViTModel (default pooler) + the user's head on the [CLS] token",
      "ViTModel(config) builds a pooler that the head never reads: it gets no gradient", "missing_gradients",
      b_vit_unused_pooler, steps=40, expected_module=("vit.pooler.dense", "vit.pooler")),
    S("hf_resnet_sgd_lr50", "resnet", "ResNetForImageClassification (2 basic stages, BN), SGD lr=50",
      "learning rate far above the stable one", "lr_too_high", b_hf_resnet_sgd_lr50, steps=60),
    # ----- healthy controls: same families, trained for HEALTHY_STEPS steps
    S("healthy_mlp_relu_6", "mlp", "6 x Linear(32)+ReLU, Kaiming, Adam", "", None, h_mlp_relu, steps=HEALTHY_STEPS, quick=True),
    S("healthy_mlp_relu_ln_12", "mlp", "12 x Linear(32)+LayerNorm+ReLU, Kaiming, AdamW", "", None, h_mlp_relu_ln_deep,
      steps=HEALTHY_STEPS),
    S("healthy_mlp_tanh_3_sgd", "mlp", "3 x Linear(32)+tanh, Xavier, SGD+momentum", "", None, h_mlp_tanh_sgd,
      steps=HEALTHY_STEPS),
    S("healthy_mlp_gelu_4", "mlp", "4 x Linear(32)+GELU, default init, Adam", "", None, h_mlp_gelu, steps=HEALTHY_STEPS),
    S("healthy_mlp_fp16", "mlp", "4 x Linear(32)+ReLU, fp16 autocast + GradScaler", "", None, h_mlp_fp16,
      steps=HEALTHY_STEPS),
    S("healthy_mlp_bf16", "mlp", "4 x Linear(32)+ReLU, bf16 autocast", "", None, h_mlp_bf16, steps=HEALTHY_STEPS),
    S("healthy_cnn_bn_4_sgd", "cnn", "4 x Conv3x3(8)+BatchNorm+ReLU, SGD+momentum", "", None, h_cnn_bn_sgd,
      steps=HEALTHY_STEPS),
    S("healthy_gpt_preln_4", "gpt", "4-block pre-LN GPT (d=32), AdamW wd=0.1", "", None, h_gpt_preln_4,
      steps=HEALTHY_STEPS),
    S("healthy_cnn_bn_4", "cnn", "4 x Conv3x3(8)+BatchNorm+ReLU, Adam", "", None, h_cnn_bn, steps=HEALTHY_STEPS),
    S("healthy_cnn_plain_3", "cnn", "3 x Conv3x3(16)+ReLU, Kaiming, no BatchNorm, Adam", "", None, h_cnn_plain,
      steps=HEALTHY_STEPS),
    S("healthy_gpt_preln", "gpt", "2-block pre-LN GPT (d=32), Adam", "", None, h_gpt_preln, steps=HEALTHY_STEPS,
      quick=True),
    S("healthy_gpt_postln", "gpt", "2-block post-LN GPT (d=32), Adam", "", None, h_gpt_postln, steps=HEALTHY_STEPS),
    S("healthy_lstm", "rnn", "LSTM(32), Adam", "", None, h_lstm, steps=HEALTHY_STEPS),
    S("healthy_gru", "rnn", "GRU(32), Adam", "", None, h_gru, steps=HEALTHY_STEPS),
    S("healthy_resmlp_ln_6", "resnet", "6 residual MLP blocks (LN), Adam", "", None, h_resmlp, steps=HEALTHY_STEPS),
    S("healthy_rescnn_bn", "resnet", "ResNet (2 basic blocks, BN), Adam", "", None, h_rescnn, steps=HEALTHY_STEPS),
    S("healthy_gpt2", "gpt2", "GPT2LMHeadModel (4 layers, d=64, NewGELU), AdamW", "", None, _hf_healthy("gpt2"),
      steps=HEALTHY_STEPS),
    S("healthy_bert_mlm", "bert", "BertForMaskedLM (4 layers, d=64, GELU), AdamW", "", None, _hf_healthy("bert"),
      steps=HEALTHY_STEPS),
    S("healthy_bert_padding_row", "bert", "BertForMaskedLM; one all-padding example at step 30 (HF's own mask)",
      "", None, b_bert_padding_row_absorbed, steps=HEALTHY_STEPS),
    S("healthy_t5", "t5", "T5ForConditionalGeneration (2+2 layers, d=64, ReLU FF), AdamW", "", None,
      _hf_healthy("t5"), steps=HEALTHY_STEPS),
    S("healthy_llama", "llama", "LlamaForCausalLM (RMSNorm, SwiGLU, rotary; 4 layers), AdamW", "", None,
      _hf_healthy("llama"), steps=HEALTHY_STEPS),
    S("healthy_vit", "vit", "ViTForImageClassification (4 layers, d=64, patch 2), AdamW", "", None,
      _hf_healthy("vit"), steps=HEALTHY_STEPS),
    S("healthy_hf_resnet", "resnet", "ResNetForImageClassification (2 basic stages, BN), AdamW", "", None,
      _hf_healthy("resnet"), steps=HEALTHY_STEPS),
]


def select(quick: bool = False, only: str | None = None) -> list[Scenario]:
    """The scenarios to run: all, the ``quick`` subset, and/or those whose name contains ``only``."""
    chosen = [s for s in SCENARIOS if s.quick] if quick else list(SCENARIOS)
    if only:
        chosen = [s for s in chosen if any(part in s.name for part in only.split(","))]
    return chosen

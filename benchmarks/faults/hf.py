"""The Hugging Face family: ``transformers`` models built from configs (random init), as users train them.

Each builder returns a :class:`~benchmarks.faults.scenarios.Setup` whose loss is
the model's own (``model(**batch).loss``), so gradwatch sees exactly what a user
of ``transformers`` sees. Models are tiny (2-4 layers, d=64) so a few hundred
steps fit on 2 CPU cores, and every task is learnable: the loss falls.

- ``gpt2`` / ``llama``: causal LM on the ``arith`` sequences (``labels = input_ids``;
  the model shifts them).
- ``bert``: masked LM on ``arith``: 15% of positions replaced by ``[MASK]`` (id ``V``),
  the other labels ``-100``.
- ``t5``: sequence to sequence: the first 8 tokens of an ``arith`` sequence in,
  the next 8 out.
- ``vit`` / ``resnet``: image classification of the 8x8 digits (1 channel).

A batch is a ``dict`` of tensors (``input_ids``, ``labels``, ...): a pure function
of the step, like every task of the benchmark.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from . import data

VOCAB = 16  # the arith task's vocabulary; BERT adds [MASK] = VOCAB
MASK_ID = VOCAB


def _model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _output_loss(out: Any, batch: Any = None) -> torch.Tensor:  # gw.probe(model, batch, loss_fn) on model(**batch)
    return out.loss


# ----- models ------------------------------------------------------------------------------
def gpt2(n_layer: int = 4) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32))


def llama(layers: int = 4) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, hidden_size=64, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                                        max_position_embeddings=32))


def bert(layers: int = 4, attention: str = "sdpa") -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(num_hidden_layers=layers, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                        vocab_size=VOCAB + 1, max_position_embeddings=32)
    config._attn_implementation = attention  # "eager": the softmax is a visible op of the attention module
    return BertForMaskedLM(config)


def t5(layers: int = 2) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=64, d_kv=32, d_ff=128, num_layers=layers,
                                               num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                               dropout_rate=0.0))


def vit(layers: int = 4) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64,
                                               num_hidden_layers=layers, num_attention_heads=2,
                                               intermediate_size=128, num_labels=10))


def resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32],
                                                     depths=[1, 1], layer_type="basic", num_labels=10))


class ViTWithOwnHead(nn.Module):
    """A ViT encoder with the user's own head on the [CLS] token, built with the default pooler.

    ``ViTModel(config)`` adds a pooling layer by default; a head on
    ``last_hidden_state[:, 0]`` never calls it, so the pooler never gets a gradient
    (the BERT/ViT fine-tuning bug: an unused module).
    """

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=128)
        self.vit = ViTModel(config)  # add_pooling_layer=True by default
        self.head = nn.Linear(64, 10)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.head(self.vit(pixel_values=pixel_values).last_hidden_state[:, 0])
        return _Output(None if labels is None else nn.functional.cross_entropy(logits, labels), logits)


class _Output:
    def __init__(self, loss: torch.Tensor | None, logits: torch.Tensor) -> None:
        self.loss, self.logits = loss, logits


# ----- batches -----------------------------------------------------------------------------
Inject = Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def causal_batch(step: int) -> dict[str, torch.Tensor]:
    """``input_ids`` ``(32, 17)`` arith sequences, ``labels`` the same ids (the model shifts them)."""
    x, y = data.arith_batch(step, vocab=VOCAB)
    ids = torch.cat([x, y[:, -1:]], dim=1)
    return {"input_ids": ids, "labels": ids.clone()}


def mlm_batch(step: int) -> dict[str, torch.Tensor]:
    """15% of positions masked (at least one per row); labels ``-100`` elsewhere; an all-ones attention mask."""
    ids = causal_batch(step)["input_ids"]
    g = torch.Generator().manual_seed(step + 11)
    masked = torch.rand(ids.shape, generator=g) < 0.15
    masked[torch.arange(ids.size(0)), torch.randint(0, ids.size(1), (ids.size(0),), generator=g)] = True
    return {"input_ids": torch.where(masked, torch.full_like(ids, MASK_ID), ids),
            "attention_mask": torch.ones_like(ids), "labels": torch.where(masked, ids, torch.full_like(ids, -100))}


def seq2seq_batch(step: int) -> dict[str, torch.Tensor]:
    """The first 8 tokens in, the next 8 out (ids shifted by one: 0 is T5's pad/start token)."""
    x, y = data.arith_batch(step, vocab=VOCAB - 1)
    ids = torch.cat([x, y[:, -1:]], dim=1) + 1
    return {"input_ids": ids[:, :8].contiguous(), "labels": ids[:, 8:16].contiguous()}


def image_batch(step: int) -> dict[str, torch.Tensor]:
    x, y = data.digits_batch(step, image=True)
    return {"pixel_values": x, "labels": y}


BATCHES: dict[str, Callable[[int], dict[str, torch.Tensor]]] = {
    "gpt2": causal_batch, "llama": causal_batch, "bert": mlm_batch, "t5": seq2seq_batch,
    "vit": image_batch, "resnet": image_batch,
}


# ----- injections --------------------------------------------------------------------------
def all_ignored(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every label ``-100`` (a truncation or masking bug: no position is trained): mean over nothing = 0/0."""
    return {**b, "labels": torch.full_like(b["labels"], -100)}


def padding_row(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One example whose attention mask is all zeros (an empty sequence that was padded): it attends to nothing."""
    mask = b["attention_mask"].clone()
    mask[0] = 0
    return {**b, "attention_mask": mask}


def additive_mask(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The user's own 4-D additive attention mask, written with ``-inf`` for padding (not ``finfo.min``)."""
    keep = b["attention_mask"].bool()[:, None, None, :]  # (B, 1, 1, T): which keys each query may see
    mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf")).expand(-1, 1, keep.size(-1), -1)
    return {**b, "attention_mask": mask}


def at(onset: int, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Inject:
    """Inject ``fn`` into the batch of step ``onset`` only."""
    return lambda step, b: fn(b) if step == onset else b


def evaluate_images(model: nn.Module) -> float:
    """Held-out accuracy of an image classifier that takes ``pixel_values``."""
    x, y = data.digits_test(image=True)
    return float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())


def task(model: nn.Module, opt: torch.optim.Optimizer, kind: str, *, inject: Inject | None = None,
         **watch: Any) -> Any:
    """A :class:`Setup` for ``model`` on the ``kind`` task (a key of :data:`BATCHES`)."""
    from .scenarios import Setup

    make = BATCHES[kind]

    def batch(step: int) -> dict[str, torch.Tensor]:
        b = make(step)
        return inject(step, b) if inject is not None else b

    evaluate = evaluate_images if kind in ("vit", "resnet") else None
    return Setup(model, opt, batch, _model_loss, evaluate, watch, probe_loss=_output_loss)

"""The causal-LM objective of instruction tuning (``task: instruction``): the loss and the validation metrics.

A batch labels every position with the token it holds, or ``IGNORE_INDEX`` where no loss is taken (the
prompt and the padding; `apt_lightning.data.InstructionDataModule` builds them). Position t's logits
predict the token at t + 1, so the loss compares ``logits[:, :-1]`` with ``labels[:, 1:]``: the
next-token cross-entropy of the response tokens (and the EOS after them) only, averaged over those tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics

IGNORE_INDEX = -100  # a label that takes no loss (the prompt and the padding)


def next_token_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the labelled next tokens, (n, vocab), and those tokens, (n,): one row per response
    token of the batch."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return logits[:, :-1][keep], targets[keep]


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood (in fp32) of the response tokens, and their number."""
    rows, targets = next_token_targets(logits, labels)
    return F.cross_entropy(rows.float(), targets, reduction="sum"), targets.numel()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over the response tokens of the batch (0 when it has none)."""
    total, count = response_nll(logits, labels)
    return total / max(count, 1)


class ResponseNLL(torchmetrics.Metric):
    """The validation numbers of a causal LM: the next-token loss averaged over every response token of the
    eval set (``loss``; not a mean of batch means, which would weigh a short batch's tokens more) and its
    exponential (``perplexity``)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        total, count = response_nll(logits, labels)
        self.total += total.double()
        self.count += count

    def compute(self) -> dict[str, torch.Tensor]:
        loss = (self.total / self.count.clamp(min=1)).float()
        return {"loss": loss, "perplexity": loss.exp()}


def build_causal_lm_metrics(prefix: str = "val/") -> torchmetrics.MetricCollection:
    """``<prefix>loss`` and ``<prefix>perplexity`` from one `ResponseNLL` (update: ``logits, labels``)."""
    return torchmetrics.MetricCollection({"nll": ResponseNLL()}, prefix=prefix)


__all__ = [
    "IGNORE_INDEX",
    "ResponseNLL",
    "build_causal_lm_metrics",
    "causal_lm_loss",
    "next_token_targets",
    "response_nll",
]

"""Summed log-likelihood of continuations given contexts, as lm-eval-harness's HF causal-LM scorer defines it.

Tokenisation (lm-eval's `_encode_pair`): trailing whitespace of the context moves to the start of the
continuation; the context and the whole text are encoded, and the continuation is the whole text's tokens
after as many tokens as the context alone has, so exactly the continuation's tokens are scored even where the
tokenizer merges across the boundary. The model reads the context's own tokens and then those, truncated
from the left to the model's positions. Tokenizers that add a BOS keep it in front of the context; special
tokens a tokenizer appends (an EOS) are left out, since they would be scored as part of the continuation.

Batching: the requests are sorted by length (longest first, so a batch too big for memory fails at once),
right-padded and scored in one forward per batch; with right padding and causal attention no real position
sees a padding token, so batching does not change a score beyond float rounding.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from apt_lightning.structure import max_positions


class EncodedPair(NamedTuple):
    context: list[int]
    continuation: list[int]


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts in front of every text by default (a BOS), or [] when it adds none."""
    probe = "a"
    full = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, prefix: Sequence[int] = ()
) -> EncodedPair:
    """Token ids of `context` (after `prefix`) and of `continuation`, split as lm-eval does. An empty context
    becomes the BOS (else EOS) token, so the first continuation token is conditioned on something."""

    def encode(text: str) -> list[int]:
        return list(prefix) + tokenizer(text, add_special_tokens=False)["input_ids"]

    if not continuation:
        raise ValueError(f"empty continuation after context {context[-60:]!r}: nothing to score")
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    if not context:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("an empty context needs a tokenizer with a BOS or EOS token to condition on")
        return EncodedPair([start], tokenizer(continuation, add_special_tokens=False)["input_ids"])
    context_ids = encode(context)
    continuation_ids = encode(context + continuation)[len(context_ids) :]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after its context")
    return EncodedPair(context_ids, continuation_ids)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _score_batch(
    model: nn.Module, windows: list[tuple[list[int], int]], pad_id: int, keep_only: bool
) -> list[float]:
    """Summed log-probabilities of the last `n` tokens of each `tokens` in `windows` ((tokens, n) pairs)."""
    device = next(model.parameters()).device
    inputs = [tokens[:-1] for tokens, _ in windows]
    width = max(len(x) for x in inputs)
    ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for row, x in enumerate(inputs):
        ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    # the logit at position p predicts token p + 1: the continuation's are the last n positions of each input
    first = min(len(x) - n for x, (_, n) in zip(inputs, windows, strict=True))
    kept = width - first
    target = torch.zeros((len(inputs), kept), dtype=torch.long)
    scored = torch.zeros((len(inputs), kept), dtype=torch.bool)
    for row, (x, (tokens, n)) in enumerate(zip(inputs, windows, strict=True)):
        end = len(x) - first
        target[row, end - n : end] = torch.tensor(tokens[-n:])
        scored[row, end - n : end] = True
    extra = {"logits_to_keep": kept} if keep_only else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **extra).logits
    logprobs = torch.log_softmax(logits[:, -kept:].float(), dim=-1)
    picked = logprobs.gather(-1, target.to(device).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~scored.to(device), 0.0).sum(-1).tolist()


def loglikelihoods(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[float]:
    """The summed log-likelihood of each continuation given its context, in request order.

    `max_length`: the longest input the model reads (default: its position limit); longer inputs lose tokens
    from the left, as in lm-eval. The model runs where its parameters are, under `torch.inference_mode`."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    max_length = max_positions(model.config) if max_length is None else max_length
    if max_length <= 0:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    prefix = special_prefix(tokenizer)
    windows = []
    for context, continuation in requests:
        pair = encode_pair(tokenizer, context, continuation, prefix)
        if len(pair.continuation) > max_length:
            raise ValueError(
                f"continuation {continuation[:60]!r} has {len(pair.continuation)} tokens, more than the "
                f"{max_length} the model reads"
            )
        windows.append(((pair.context + pair.continuation)[-(max_length + 1) :], len(pair.continuation)))
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    keep_only = _takes_logits_to_keep(model)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    scores = [0.0] * len(windows)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for i, score in zip(
                batch, _score_batch(model, [windows[i] for i in batch], pad_id, keep_only), strict=True
            ):
                scores[i] = score
    return scores

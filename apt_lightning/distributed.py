"""APT under data parallelism (Lightning's DDP): every rank holds the whole model and takes the same
decisions (docs/distributed.md).

- Salience: each rank observes its share of the global batch; `OutlierAwareSalience` sums its per-step
  statistics over ranks (`all_reduce_sum_`) before the EMA, so every rank scores the global batch.
- Decisions made once for all: the kept blocks of a pruning event and the new adapter ranks are rank 0's
  (`from_rank_zero`); a rank whose own decision differs warns.
- Shape changes (compaction, rank growth) replace parameters, so the DistributedDataParallel wrapper is
  rebuilt around the module (`rewrap_ddp`); building it checks the shapes across ranks and broadcasts
  rank 0's parameters and buffers.
- `check_consistency` compares masks, shapes, adapter ranks and cheap checksums of the weights, the teacher
  snapshot and callback state across ranks, and raises `RankMismatchError` naming what differs.

Every function is a no-op (or returns its input) in a single process, and every collective here must be
entered by all ranks at the same point of training.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# Checksums of the same tensor on two ranks agree exactly when the ranks are in step; the tolerance only
# absorbs float32 summation order (in units of the tensor's absolute sum).
_CHECKSUM_RTOL = 1e-6


class RankMismatchError(RuntimeError):
    """The ranks of a data-parallel run hold different APT state (masks, shapes, ranks or weights)."""


def world_size() -> int:
    """Processes in the default group; 1 without an initialised process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


# ---------------------------------------------------------------------- collectives
def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over ranks, in place, in one collective (the tensors are flattened into one
    buffer of their common device and dtype)."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank `src`'s `value` on every rank (any picklable object; CPU tensors arrive on the CPU)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def from_rank_zero(value: T, what: str) -> T:
    """A decision taken once for all ranks: rank 0's `value` everywhere. A rank whose own `value` differs
    warns (its inputs differed from rank 0's, e.g. a custom scorer that does not reduce its batch
    statistics across ranks) and continues with rank 0's."""
    if world_size() == 1:
        return value
    chosen = broadcast_object(value)
    if not _equal(chosen, value):
        warnings.warn(
            f"rank {rank()}: {what} differs from rank 0's; every rank uses rank 0's. A scorer that "
            "observes batches must reduce its statistics across ranks (docs/distributed.md).",
            stacklevel=2,
        )
    return chosen


def _equal(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            _equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


# ---------------------------------------------------------------------- the DDP wrapper
def find_unused_parameters(trainer, why: str) -> None:
    """Make Lightning's DDP strategy look for parameters without gradients in a step (set before the
    strategy wraps the module, i.e. from a `setup` hook). APT leaves some out in some steps (`why`); DDP
    without the search fails at the next step. A strategy configured with
    `find_unused_parameters=False` explicitly is left alone."""
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.utilities import rank_zero_info

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and "find_unused_parameters" not in strategy._ddp_kwargs:
        strategy._ddp_kwargs["find_unused_parameters"] = True
        rank_zero_info(f"DDP: find_unused_parameters=True ({why})")


def rewrap_ddp(trainer) -> bool:
    """Rebuild the DistributedDataParallel wrapper around the LightningModule if its parameters changed
    (compaction and rank growth replace parameter tensors; the old wrapper's gradient buckets and hooks
    refer to the old ones). Building it verifies the parameter shapes across ranks and broadcasts rank
    0's parameters and buffers. Returns whether it rebuilt."""
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    wrapper, module = strategy.model, strategy.lightning_module
    if wrapper is None or wrapper is module:
        return False
    if not isinstance(wrapper, DistributedDataParallel):
        raise NotImplementedError(
            f"APT changed parameter shapes (compaction or rank growth), but the strategy "
            f"{type(strategy).__name__} wraps the module in {type(wrapper).__name__}; apt_lightning re-wraps "
            "only DistributedDataParallel (strategy 'ddp'). Use --trainer.strategy ddp, or a single device."
        )
    ignore = wrapper.parameters_to_ignore
    current = [p for n, p in module.named_parameters() if n not in ignore]
    recorded = getattr(wrapper, "_module_parameters", None)
    if recorded is not None and len(recorded) == len(current) and all(map(operator.is_, recorded, current)):
        return False
    if hasattr(wrapper, "_remove_autograd_hooks"):  # not left to garbage collection: hooks would all-reduce
        wrapper._remove_autograd_hooks()
    strategy.model = module
    strategy.configure_ddp()
    return True


# ---------------------------------------------------------------------- consistency
def _checksums(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """Per tensor: shape, sum and absolute sum (float32, one device read for all of them)."""
    items = [(n, t.detach()) for n, t in tensors.items()]
    if not items:
        return {}
    sums = []
    for _, t in items:
        x = t.float() if t.dtype != torch.float32 else t
        sums.append(torch.stack([x.sum(), torch.linalg.vector_norm(x, 1)]) if x.numel() else x.new_zeros(2))
    devices = {s.device for s in sums}
    values = torch.stack(sums).tolist() if len(devices) == 1 else [s.cpu().tolist() for s in sums]
    return {n: (tuple(t.shape), *v) for (n, t), v in zip(items, values, strict=True)}


def _flatten_state(state: Any, prefix: str, out: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    if torch.is_tensor(state):
        tensors[prefix] = state
    elif isinstance(state, Mapping):
        for k, v in state.items():
            _flatten_state(v, f"{prefix}.{k}" if prefix else str(k), out, tensors)
    elif isinstance(state, (list, tuple)) and any(torch.is_tensor(v) for v in state):
        for i, v in enumerate(state):
            _flatten_state(v, f"{prefix}.{i}", out, tensors)
    else:
        out[prefix] = state


def fingerprint(pl_module, **extra: Any) -> dict[str, dict[str, Any]]:
    """What must be equal on every rank, by section: the structure's widths, the masks, adapter ranks,
    checksums of every parameter and of the teacher snapshot, and `extra` sections (a callback's state:
    nested mappings of tensors and plain values; tensors are checksummed)."""
    sections: dict[str, dict[str, Any]] = {}
    student = getattr(pl_module, "student", pl_module)
    masks = getattr(student, "apt_masks", None)
    if masks is not None:
        sections["shapes"] = dict(masks.sizes())
        sections["masks"] = _checksums(dict(masks.named_buffers()))
    adapters = pl_module.adapters() if hasattr(pl_module, "adapters") else {}
    sections["adapter ranks"] = {n: m.rank for n, m in adapters.items()}
    sections["weights"] = _checksums(dict(pl_module.named_parameters()))
    teacher = getattr(pl_module, "teacher", None)
    if teacher is not None and teacher.ready:
        sections["teacher"] = {"snapshots": teacher.snapshots, **_checksums(teacher.tensors)}
    for name, state in extra.items():
        plain: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        _flatten_state(state, "", plain, tensors)
        sections[name] = {**plain, **_checksums(tensors)}
    return sections


def _agree(a: Any, b: Any) -> bool:
    """Exact for structure (shapes, ints, strings); checksums (shape, sum, abs sum) to float32 tolerance."""
    if (
        isinstance(a, tuple)
        and isinstance(b, tuple)
        and len(a) == len(b) == 3
        and all(isinstance(v, float) for v in (*a[1:], *b[1:]))
    ):
        scale = max(abs(a[2]), abs(b[2]), 1e-30)
        close = all(abs(x - y) <= _CHECKSUM_RTOL * scale for x, y in zip(a[1:], b[1:], strict=True))
        return a[0] == b[0] and close
    return a == b


def differences(reference: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]]) -> dict[str, list]:
    """Section -> names whose values differ (or exist on one side only)."""
    out: dict[str, list] = {}
    for section in sorted(reference.keys() | other.keys()):
        ref, oth = reference.get(section, {}), other.get(section, {})
        names = sorted(
            n for n in ref.keys() | oth.keys() if n not in ref or n not in oth or not _agree(ref[n], oth[n])
        )
        if names:
            out[section] = names
    return out


def check_consistency(pl_module, where: str, **extra: Any) -> None:
    """Compare this rank's `fingerprint` with every other rank's (one all-gather); on a mismatch raise
    `RankMismatchError` on every rank, naming the ranks and what differs. No-op in a single process."""
    if world_size() == 1:
        return
    prints = gather_object(fingerprint(pl_module, **extra))
    report = []
    for r, other in enumerate(prints[1:], start=1):
        diff = differences(prints[0], other)
        if diff:
            parts = []
            for section, names in diff.items():
                shown = [_describe(section, n, prints[0], other, r) for n in names[:3]]
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                parts.append(f"{section}: {'; '.join(shown)}{more}")
            report.append(f"rank {r} differs from rank 0 in " + " | ".join(parts))
    if report:
        raise RankMismatchError(
            f"APT state differs across ranks at {where}: " + "; ".join(report) + ". Every rank must take "
            "the same pruning and growth decisions on the same weights (docs/distributed.md)."
        )


def _describe(section: str, name: str, ref: dict, other: dict, r: int) -> str:
    a, b = ref.get(section, {}).get(name, "absent"), other.get(section, {}).get(name, "absent")
    return f"{name} ({_short(a)} on rank 0, {_short(b)} on rank {r})"


def _short(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], float):
        return f"shape {list(value[0])}, sum {value[1]:.6g}"
    return repr(value)


# ---------------------------------------------------------------------- files
def log_dir(trainer) -> str | None:
    """`trainer.log_dir` without its broadcast. `Trainer.log_dir` is a collective that every rank must
    enter, so reading it in code that runs on rank 0 alone (writing a file) hangs a DDP run; on rank 0
    this is the same folder."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if trainer.loggers:
        logger = trainer.loggers[0]
        return logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    return trainer.default_root_dir


__all__ = [
    "RankMismatchError",
    "all_reduce_sum_",
    "broadcast_object",
    "check_consistency",
    "differences",
    "find_unused_parameters",
    "fingerprint",
    "from_rank_zero",
    "gather_object",
    "log_dir",
    "rank",
    "rewrap_ddp",
    "world_size",
]

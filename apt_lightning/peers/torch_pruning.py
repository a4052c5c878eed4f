"""`TorchPruningPeer`: the Torch-Pruning baseline APT is compared against (docs/method.md, "Peers").

A few pruning steps, each: Taylor importance of every attention head and FFN neuron on recent training
batches, a global ranking, and removal down to that step's share of the counted-parameter target. Who does
what:

- Torch-Pruning (`pip install torch-pruning`, the `peers` extra) finds the parameter groups by tracing the
  model (`DependencyGraph`: a head is its q/k/v rows and its output-projection columns, a neuron its FFN-in
  row and FFN-out column) and scores them (`GroupTaylorImportance`: |w * dL/dw| summed per channel, averaged
  over the group's layers, normalised per group); a head's score is the mean over its channels, as
  Torch-Pruning's `MetaPruner` scores heads (`num_heads`, `prune_num_heads`).
- This module ranks globally, as `MetaPruner(global_pruning=True)` does: heads against heads over all
  layers, neurons against neurons, keeping exactly the step's number of each (a top-k, so ties cannot
  overshoot the count) and never touching the hidden size.
- The project removes them: hard masks, then `APTModule.compact` (adapters, a removed sublayer and the
  optimizer follow; the model stays describable by its family for export, the counter and apt-bench).

The step targets are counts: the final heads are `1 - head_sparsity` of all heads, the final neurons
whatever then meets `target_sparsity` of the project's count (`ModelShapes.counted_params`) to within one
neuron; each step removes an equal share of both.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn

from apt_lightning import distributed
from apt_lightning.files import write_json_atomic
from apt_lightning.pruning import BlockTensors, kept_param_count
from apt_lightning.pruning.schedule import resolve_step
from apt_lightning.pruning.search import free_units
from apt_lightning.structure import ModelShapes, get_structure

_NORMALIZERS = ("mean", "max", "sum", "standarization", "gaussian", None)


def require_torch_pruning():
    """The `torch_pruning` package, or an ImportError that says how to install it."""
    try:
        import torch_pruning
    except ImportError as err:
        raise ImportError(
            "the Torch-Pruning peers need the torch-pruning package: pip install 'apt-lightning[peers]' "
            "(or pip install torch-pruning)"
        ) from err
    return torch_pruning


# ---------------------------------------------------------------------- importance
@contextmanager
def gradient_view(model: nn.Module) -> Iterator[None]:
    """The model as Torch-Pruning expects it for Taylor importance: every adapter inside the transformer
    layers replaced by a plain Linear of its merged weight (W + s B A), every Linear weight there requiring
    a gradient; all put back afterwards, gradients cleared, the train/eval mode restored."""
    from apt_lightning.adapters import APTLinear

    layers = get_structure(model).layers
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    frozen: list[nn.Parameter] = []
    for name, module in list(layers.named_modules()):
        if isinstance(module, APTLinear):
            parent_name, _, child = name.rpartition(".")
            parent = layers.get_submodule(parent_name) if parent_name else layers
            setattr(parent, child, module.merge())
            swapped.append((parent, child, module))
        elif isinstance(module, nn.Linear) and not module.weight.requires_grad:
            module.weight.requires_grad_(True)
            frozen.append(module.weight)
    training = model.training
    model.eval()  # no dropout: the importance of the function the model computes
    try:
        yield
    finally:
        model.train(training)
        for parent, child, module in swapped:
            setattr(parent, child, module)
        for weight in frozen:
            weight.requires_grad_(False)
        for p in model.parameters():
            p.grad = None


def taylor_scores(
    model: nn.Module,
    batches: Sequence[dict],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    normalizer: str | None = "mean",
    forward_context: Callable = nullcontext,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Torch-Pruning's group Taylor importance of every head and FFN neuron of `model` (a family with one
    key/value per head), from the gradients of `loss_fn(logits, labels)` summed over `batches` (dicts of
    model inputs with `labels`). Returns (per layer, a score per head), (per layer, a score per neuron), on
    the CPU, higher = keep; a removed sublayer has an empty tensor. `forward_context()` wraps the forwards
    (e.g. the trainer's mixed precision)."""
    tp = require_torch_pruning()
    structure = get_structure(model)
    shapes = structure.shapes()
    if shapes.kv_groups:
        raise ValueError(
            "TorchPruningPeer prunes heads that have their own key/value (BERT, RoBERTa); this model groups "
            "query heads over shared key/value heads"
        )
    if not batches:
        raise ValueError("taylor_scores needs at least one batch")
    importance = tp.importance.GroupTaylorImportance(normalizer=normalizer)
    with gradient_view(model), torch.enable_grad():
        example = {k: v[:2] for k, v in _inputs(batches[0]).items()}
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example, output_transform=lambda out: out.logits, verbose=False
        )
        for batch in batches:
            with forward_context():
                loss = loss_fn(model(**_inputs(batch)).logits, batch["labels"])
            loss.backward()
        linears = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Linear)}

        def score(weight: torch.Tensor | None, width: int) -> torch.Tensor:
            if weight is None or width == 0:
                return torch.zeros(0)
            layer = linears[id(weight)]
            group = graph.get_pruning_group(layer, tp.prune_linear_in_channels, idxs=list(range(width)))
            return torch.nan_to_num(importance(group).detach().float().cpu())

        heads, neurons = [], []
        for i in range(shapes.num_layers):
            channels = score(structure.head_output_weight(i), shapes.heads[i] * structure.head_dim)
            heads.append(channels.view(shapes.heads[i], -1).mean(1) if shapes.heads[i] else channels)
            neurons.append(score(structure.ffn_output_weight(i), shapes.neurons[i]))
    return heads, neurons


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "idx")}


# ---------------------------------------------------------------------- selection and targets
def keep_top(scores: list[torch.Tensor], keep: int, round_to: int = 1) -> list[torch.Tensor]:
    """0/1 per block: the `keep` highest scores over all layers together (a global ranking; ties go to the
    earlier block). With `round_to` > 1 every layer keeps a multiple of it (Torch-Pruning's `round_to`):
    each layer's share rounded down, then whole units of a layer's next best `round_to` blocks, best mean
    score first, while the total stays within `keep` (short of it by less than `round_to` where every
    layer's width is a multiple of `round_to`; a layer narrower than `round_to` keeps nothing)."""
    flat = torch.cat(scores) if scores else torch.zeros(0)
    if not 0 <= keep <= flat.numel():
        raise ValueError(f"cannot keep {keep} of {flat.numel()} blocks")
    chosen = torch.zeros(flat.numel())
    chosen[torch.argsort(flat, descending=True, stable=True)[:keep]] = 1.0
    layers = list(chosen.split([s.numel() for s in scores]))
    if round_to == 1:
        return layers
    units: list[tuple[float, int, torch.Tensor]] = []  # mean score, layer, blocks
    for i, (score, mask) in enumerate(zip(scores, layers, strict=True)):
        kept = torch.nonzero(mask).flatten()
        kept = kept[torch.argsort(score[kept], descending=True, stable=True)]  # ties: earlier blocks first
        mask[kept[len(kept) - len(kept) % round_to :]] = 0.0
        units += [(float(score[unit].mean()), i, unit) for unit in free_units(mask, score, round_to)]
    total = sum(int(mask.sum()) for mask in layers)
    for _, i, unit in sorted(units, key=lambda u: -u[0]):
        if total + round_to > keep:
            break
        layers[i][unit] = 1.0
        total += round_to
    return layers


def final_counts(shapes: ModelShapes, target_sparsity: float, head_sparsity: float | None) -> tuple[int, int]:
    """(heads, neurons) of the pruned model, summed over layers: `1 - head_sparsity` of the full model's
    heads (default: `target_sparsity`), and the neurons that bring the counted parameters (hidden size
    unchanged) closest to `1 - target_sparsity` of the full count."""
    full = shapes.full()
    if full.kv_groups:
        raise ValueError("TorchPruningPeer needs a family with one key/value per head (BERT, RoBERTa)")
    c = full.costs
    heads_full, neurons_full = sum(full.heads), sum(full.neurons)
    share = target_sparsity if head_sparsity is None else head_sparsity
    heads = round((1.0 - share) * heads_full)
    per_dim = (1.0 - target_sparsity) * (c.head * heads_full + c.neuron * neurons_full)
    neurons = round((per_dim - c.head * heads) / c.neuron)
    if not 0 <= neurons <= neurons_full:
        raise ValueError(
            f"head_sparsity {head_sparsity} keeps {heads} of {heads_full} heads, which alone "
            f"{'exceed' if neurons < 0 else 'fall short of'} target_sparsity {target_sparsity} of the "
            "counted parameters with any number of FFN neurons; choose a head_sparsity nearer the target"
        )
    return heads, neurons


# ---------------------------------------------------------------------- the callback
class TorchPruningPeer(Callback):
    """Prune the student's heads and FFN neurons with Torch-Pruning's Taylor importance in `num_steps`
    steps to `target_sparsity` of the APT count (module docstring); training (full fine-tuning or LoRA, as
    the module is configured) continues on the pruned model.

    Args:
        target_sparsity: final fraction of counted parameters removed, in [0, 1).
        head_sparsity: final fraction of attention heads removed; None: `target_sparsity` (heads and
            neurons lose the same share). The neurons removed make up the rest of the count.
        start_step / end_step: the steps are evenly spaced after `start_step`, the last at `end_step`
            (optimizer steps as ints, fractions of the run as floats).
        num_steps: pruning steps (Torch-Pruning's iterative steps; each removes an equal share).
        importance_batches: training batches (the latest ones, the step's own included) whose loss
            gradients the importance sums.
        normalizer: `GroupTaylorImportance`'s per-group normalisation (Torch-Pruning's default "mean";
            None ranks the raw scores).
        round_to: keep a multiple of this many FFN neurons in every layer (Torch-Pruning's `round_to`;
            1: any width). Unaligned widths make the pruned model slower on a GPU than its parameter
            count says (docs/bench.md); APT's recipes align theirs with `multiple_of: 8`.
    """

    def __init__(
        self,
        target_sparsity: float = 0.6,
        head_sparsity: float | None = None,
        start_step: int | float = 200,
        end_step: int | float = 0.4,
        num_steps: int = 5,
        importance_batches: int = 4,
        normalizer: str | None = "mean",
        round_to: int = 1,
    ) -> None:
        for name, value in (("target_sparsity", target_sparsity), ("head_sparsity", head_sparsity)):
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if importance_batches < 1:
            raise ValueError(f"importance_batches must be >= 1, got {importance_batches}")
        if normalizer not in _NORMALIZERS:
            raise ValueError(f"normalizer must be one of {list(_NORMALIZERS)}, got {normalizer!r}")
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        require_torch_pruning()  # fail at configuration, not at the first pruning step
        self.target_sparsity, self.head_sparsity = target_sparsity, head_sparsity
        self.start_step, self.end_step, self.num_steps = start_step, end_step, num_steps
        self.importance_batches, self.normalizer = importance_batches, normalizer
        self.round_to = round_to
        self.steps: list[int] = []
        self.next_step = 0
        self.full_count = 0
        self.full_widths = (0, 0)  # (heads, neurons) of the unpruned model
        self.final_widths = (0, 0)
        self.history: list[dict] = []
        self.timing = {"score_s": 0.0, "search_s": 0.0, "compact_s": 0.0}
        self._recent: deque[dict] = deque(maxlen=importance_batches)
        self._last_step = -1

    @property
    def pruning_done(self) -> bool:
        """Every pruning step has been taken: the widths will not change any more."""
        return bool(self.steps) and self.next_step >= len(self.steps)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from apt_lightning.callbacks import AdaptivePruning

        if any(isinstance(cb, AdaptivePruning) for cb in trainer.callbacks):
            raise ValueError(
                "TorchPruningPeer is a pruning method of its own: switch AdaptivePruning off "
                "(`pruning: null`) when the peer prunes"
            )
        total = int(trainer.estimated_stepping_batches)
        start = resolve_step(self.start_step, total, "start_step")
        end = resolve_step(self.end_step, total, "end_step")
        if not 0 <= start < end <= total or end - start < self.num_steps:
            raise ValueError(
                f"TorchPruningPeer: {self.num_steps} pruning steps after start_step {start} up to end_step "
                f"{end} need 0 <= start, start + num_steps <= end <= {total} (the run's optimizer steps)"
            )
        distributed.find_unused_parameters(trainer, "a layer with all heads or neurons removed is skipped")
        if not self.steps:  # a resumed run keeps the steps it was saved with (load_state_dict)
            span = end - start
            self.steps = [start + round((k + 1) * span / self.num_steps) for k in range(self.num_steps)]
        structure = pl_module.structure
        structure.install_masks()
        full = structure.shapes().full()
        self.full_count = full.counted_params()
        self.full_widths = (sum(full.heads), sum(full.neurons))
        self.final_widths = final_counts(full, self.target_sparsity, self.head_sparsity)

    def step_targets(self, k: int) -> tuple[int, int]:
        """(heads, neurons) kept after pruning step `k` (0-based): an equal share of the removal per step."""
        (h0, f0), (h1, f1) = self.full_widths, self.final_widths
        frac = (k + 1) / len(self.steps)
        return h0 - round(frac * (h0 - h1)), f0 - round(frac * (f0 - f1))

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if not self.pruning_done:
            self._recent.append(dict(batch))  # a shallow copy: training_step pops the labels from `batch`

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # another micro-batch of the same optimizer step
            return
        self._last_step = step
        if not self.pruning_done and step >= self.steps[self.next_step]:
            self.prune(trainer, pl_module, step)

    def prune(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """One pruning step: importance on the recent batches, global ranking, masks, compaction."""
        structure = pl_module.structure
        shapes = structure.shapes()
        heads_kept, neurons_kept = self.step_targets(self.next_step)
        # `round_to` may have cut the model below this step's share: keep what is left
        neurons_kept = min(neurons_kept, sum(shapes.neurons))
        t0 = time.perf_counter()
        head_scores, neuron_scores = taylor_scores(
            pl_module.student,
            list(self._recent),
            pl_module.task_loss,
            self.normalizer,
            trainer.precision_plugin.forward_context,
        )
        t1 = time.perf_counter()
        keep = BlockTensors(
            keep_top(head_scores, heads_kept),
            keep_top(neuron_scores, neurons_kept, self.round_to),
            torch.ones(shapes.hidden),
        )
        keep = trainer.strategy.broadcast(keep, src=0)  # every process removes the same blocks
        t2 = time.perf_counter()
        apply_keep(structure, keep)
        kept_count = kept_param_count(keep, shapes)
        pl_module.compact()
        pl_module.rebuild_optimizer()
        t3 = time.perf_counter()
        self.timing["score_s"] += t1 - t0
        self.timing["search_s"] += t2 - t1
        self.timing["compact_s"] += t3 - t2
        heads, neurons, _ = keep.counts()
        record = {
            "event": self.next_step,
            "step": step,
            "target_sparsity": self.target_sparsity * (self.next_step + 1) / len(self.steps),
            "achieved_sparsity": 1.0 - kept_count / self.full_count,
            "params_kept": kept_count,
            "heads_per_layer": heads,
            "neurons_per_layer": neurons,
            "hidden_kept": shapes.hidden,
            "score_s": t1 - t0,
            "search_s": t2 - t1,
        }
        self.history.append(record)
        self.next_step += 1
        if self.pruning_done:
            self._recent.clear()
        distributed.check_consistency(
            pl_module,
            f"Torch-Pruning step {record['event']} (step {step})",
            peer={"steps": self.steps, "next_step": self.next_step},
        )
        pl_module.log_dict(
            {
                "prune/achieved_sparsity": record["achieved_sparsity"],
                "prune/params_kept": float(kept_count),
                "prune/heads_kept": float(sum(heads)),
                "prune/neurons_kept": float(sum(neurons)),
            }
        )

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict:
        return {
            "method": "torch_pruning_taylor",
            "events": self.history,
            "timing": dict(self.timing),
            "full_param_count": self.full_count,
        }

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = distributed.log_dir(trainer)  # `trainer.log_dir` broadcasts: on rank 0 alone it hangs DDP
        if trainer.is_global_zero and log_dir is not None:
            write_json_atomic(Path(log_dir) / "pruning.json", self.summary())

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "next_step": self.next_step,
            "history": self.history,
            "timing": self.timing,
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = list(state["steps"])
        self.next_step = state["next_step"]
        self.history = list(state["history"])
        self.timing = dict(state["timing"])


def apply_keep(structure, keep: BlockTensors) -> None:
    """Hard head and neuron masks of a keep decision (hidden dims untouched), ready for `compact`."""
    keep.to_masks(structure.install_masks(), hidden=False)

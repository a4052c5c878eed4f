"""Block scorers: how important each head, FFN neuron and hidden dimension is (higher = keep).

A scorer observes training through the structure's mask sites (`observe`), folds each optimizer step
into its statistics (`step`), and returns `BlockTensors` of scores at a pruning event (`scores`). Add
your own by subclassing `Scorer`; register it with `@register_scorer("name")` to use it by name, or
point a config's `class_path` at it.
"""

from __future__ import annotations

from typing import Literal

import torch

from apt_lightning.distributed import all_reduce_sum_, world_size
from apt_lightning.pruning.blocks import BlockTensors, block_costs
from apt_lightning.structure import ModelShapes, PrunableStructure

_SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(name: str):
    def deco(cls: type[Scorer]) -> type[Scorer]:
        _SCORERS[name] = cls
        cls.name = name
        return cls

    return deco


def build_scorer(scorer: Scorer | str) -> Scorer:
    if isinstance(scorer, Scorer):
        return scorer
    if scorer not in _SCORERS:
        raise ValueError(
            f"unknown scorer {scorer!r}; built in: {sorted(_SCORERS)} (or give a Scorer subclass)"
        )
    return _SCORERS[scorer]()


class Scorer:
    """Base class. Stateless scorers only implement `compute`; batch-driven ones also `observe`/`step`.

    Under DDP a batch-driven scorer observes only its rank's share of each global batch: sum its
    statistics over ranks in `step` (`apt_lightning.distributed.all_reduce_sum_`), as `OutlierAwareSalience`
    does. `AdaptivePruning` applies rank 0's decision on every rank either way."""

    name = "custom"
    observes_batches = False

    def attach(self, structure: PrunableStructure) -> None:
        self.structure = structure

    def observe(self, kind: str, index: int, tensor: torch.Tensor) -> None:
        """Called with the masked tensor at every mask site during a training forward."""

    def step(self) -> None:
        """Called once per optimizer step while observing (after backward)."""

    def compute(self, structure: PrunableStructure) -> BlockTensors:
        raise NotImplementedError

    def scores(self, structure: PrunableStructure) -> BlockTensors:
        """Scores at a pruning event; blocks whose mask is 0 score 0."""
        scores = self.compute(structure)
        masks = structure.masks
        got = ([t.numel() for t in scores.heads], [t.numel() for t in scores.neurons], scores.hidden.numel())
        want = masks.sizes()
        if got != (want["heads"], want["neurons"], want["hidden"]):
            raise ValueError(
                f"{type(self).__name__} returned scores for widths {got}, but the model now has "
                f"{tuple(want.values())}: a stateful scorer must implement compact() to follow compaction"
            )
        return BlockTensors(
            [s.float().cpu() * (masks.head(i).cpu() > 0) for i, s in enumerate(scores.heads)],
            [s.float().cpu() * (masks.neuron(i).cpu() > 0) for i, s in enumerate(scores.neurons)],
            scores.hidden.float().cpu() * (masks.hidden.cpu() > 0),
        )

    def compact(self, kept: BlockTensors) -> None:
        """Follow a compaction: `kept` holds the surviving indices per layer (for stateful scorers)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _fisher_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis over the last dimension; 0 for a constant row. Computed on standardised values, so
    it is scale-invariant (an absolute floor on var^2 would turn small-magnitude rows, e.g. weights ~1e-2
    times activations ~1e-2, into -3)."""
    centred = x - x.mean(-1, keepdim=True)
    std = centred.pow(2).mean(-1, keepdim=True).sqrt()
    z = centred / std.clamp_min(torch.finfo(x.dtype).tiny)
    kurt = z.pow(4).mean(-1) - 3.0
    return torch.where(std.squeeze(-1) > 0, kurt, torch.zeros_like(kurt))


KURTOSIS_FORMS = ("off", "paper", "scaled")
HIDDEN_SALIENCE_FORMS = ("total", "branch")


def kurtosis_form(value: str | bool) -> str:
    """The kurtosis form a config names; booleans from older configs map explicitly (true: the paper's form,
    which was the only one; false: off)."""
    if value is True:
        return "paper"
    if value is False:
        return "off"
    if isinstance(value, str) and value in KURTOSIS_FORMS:
        return value
    raise ValueError(
        f"kurtosis must be one of {', '.join(KURTOSIS_FORMS)} (or true = paper, false = off), got {value!r}"
    )


def scale_within_kind(salience: BlockTensors, terms: BlockTensors, live: BlockTensors) -> BlockTensors:
    """Outlier terms rescaled per block kind (heads of all layers, neurons of all layers, hidden dims) so
    that over the kind's live blocks they sum to the kind's salience (docs/method.md section 4, `scaled`).
    Salience plus the scaled term then sums to exactly twice each kind's salience whatever the terms' units:
    the term reorders blocks within a kind and leaves the balance between kinds to the salience."""

    def factor(s: list[torch.Tensor], t: list[torch.Tensor], m: list[torch.Tensor]) -> torch.Tensor:
        s, t = torch.cat(s), torch.cat(t)
        alive = torch.cat(m).to(t.device) > 0
        mass = t[alive].sum()
        return s[alive].sum() / mass if float(mass) > 0 else mass

    f_heads = factor(salience.heads, terms.heads, live.heads)
    f_neurons = factor(salience.neurons, terms.neurons, live.neurons)
    f_hidden = factor([salience.hidden], [terms.hidden], [live.hidden])
    return BlockTensors(
        [t * f_heads for t in terms.heads], [t * f_neurons for t in terms.neurons], terms.hidden * f_hidden
    )


@register_scorer("salience")
class OutlierAwareSalience(Scorer):
    """APT's salience (docs/method.md section 4): per channel, (sum_{b,t} |x|) * (sum_{b,t} |dL/dx|)
    from the live batch, summed over a head's channels. Reduction happens before the product so only
    O(width) vectors are kept. EMA over steps.

    Args:
        ema: weight of the previous EMA value.
        kurtosis: the outlier-aware term sqrt(max(0, Kurt(O))) per block, O being the block's weight
            columns scaled by the EMA'd mean input activation (the block's output contributions). `paper`
            adds it unscaled (the paper's eq. 5), `scaled` rescales it within each block kind
            (`scale_within_kind`), `off` leaves it out. `true` / `false` mean `paper` / `off`.
        hidden_salience: the gradient a hidden dim is scored with. `total`: the total gradient at every
            masked norm output; `branch`: at each sublayer's input, the gradient of the branch that reads
            it (Q/K/V, FFN-in), and the total gradient only where a norm output feeds nothing but one
            branch or the head (the family's `branch_input_sites`; every site of a pre-norm decoder).
    """

    observes_batches = True

    def __init__(
        self,
        ema: float = 0.85,
        kurtosis: Literal["off", "paper", "scaled"] | bool = "paper",
        hidden_salience: Literal["total", "branch"] = "total",
    ) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if hidden_salience not in HIDDEN_SALIENCE_FORMS:
            raise ValueError(
                f"hidden_salience must be one of {', '.join(HIDDEN_SALIENCE_FORMS)}, got {hidden_salience!r}"
            )
        self.ema = ema
        self.kurtosis = kurtosis
        self.hidden_salience = hidden_salience
        self._act: dict[tuple[str, int], torch.Tensor] = {}
        self._grad: dict[tuple[str, int], torch.Tensor] = {}
        self._tokens: dict[tuple[str, int], int | torch.Tensor] = {}  # a tensor once reduced over ranks
        self.salience: dict[tuple[str, int], torch.Tensor] = {}
        self.mean_act: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def kurtosis(self) -> str:
        return self._kurtosis

    @kurtosis.setter
    def kurtosis(self, value: str | bool) -> None:
        self._kurtosis = kurtosis_form(value)

    @property
    def observes_branches(self) -> bool:
        """Whether the mask hooks pass branch inputs (kind "branch") to `observe`."""
        return self.hidden_salience == "branch"

    def attach(self, structure: PrunableStructure) -> None:
        if self.observes_branches and not hasattr(structure, "branch_input_sites"):
            raise ValueError(
                f"hidden_salience='branch' needs the model family ({type(structure).__name__}) to name its "
                "branch inputs (branch_input_sites); use hidden_salience='total'"
            )
        super().attach(structure)

    def observe(self, kind: str, index: int, tensor: torch.Tensor) -> None:
        if not tensor.requires_grad:
            if tensor.grad_fn is not None or not torch.is_grad_enabled():
                return
            # Upstream of this site everything is frozen (e.g. the embedding output with adapters only in
            # the layers): make the tensor a grad-requiring leaf so dL/dx is still computed here.
            tensor.requires_grad_(True)
        key = (kind, index)
        flat = tensor.detach().reshape(-1, tensor.shape[-1])
        self._act[key] = self._act.get(key, 0) + flat.abs().float().sum(0)
        self._tokens[key] = self._tokens.get(key, 0) + flat.shape[0]

        def grad_hook(grad: torch.Tensor) -> None:
            g = grad.reshape(-1, grad.shape[-1]).abs().float().sum(0)
            self._grad[key] = self._grad.get(key, 0) + g

        tensor.register_hook(grad_hook)

    @torch.no_grad()
    def step(self) -> None:
        self._reduce_over_ranks()
        for key, act in self._act.items():
            grad = self._grad.get(key)
            if grad is None:
                continue
            s = act * grad
            mean = act / self._tokens[key]
            prev = self.salience.get(key)
            ok = prev is not None and prev.shape == s.shape
            self.salience[key] = self.ema * prev + (1 - self.ema) * s if ok else s
            prev_m = self.mean_act.get(key)
            ok = prev_m is not None and prev_m.shape == mean.shape
            self.mean_act[key] = self.ema * prev_m + (1 - self.ema) * mean if ok else mean
        if self._act:
            # a site not seen this step is gone (its whole sublayer was removed): it scores S = 0 from now
            # on, instead of adding its last EMA value to the hidden scores forever
            for key in self.salience.keys() - self._act.keys():
                self.salience[key] = self.ema * self.salience[key]
        self._act.clear()
        self._grad.clear()
        self._tokens.clear()

    def _reduce_over_ranks(self) -> None:
        """Under data parallelism each rank saw its share of the global batch: sum |x| and the token counts
        over ranks, and average sum |dL/dx| (each rank's loss is the mean over its own share, so its
        gradients are world-size times those of the global-batch mean loss). Then every rank holds what
        one process computes on the global batch, and S is formed from global sums, not summed per rank
        (docs/distributed.md). Sites are the same on every rank: the model is."""
        n = world_size()
        if n == 1:
            return
        keys = sorted(k for k in self._act if k in self._grad)
        if not keys:
            return
        act = self._act[keys[0]]
        tokens = torch.tensor([float(self._tokens[k]) for k in keys], device=act.device)
        all_reduce_sum_([*(self._act[k] for k in keys), *(self._grad[k] for k in keys), tokens])
        for k, count in zip(keys, tokens, strict=True):
            self._grad[k] /= n
            self._tokens[k] = count

    def _channel(self, kind: str, index: int, width: int, device) -> torch.Tensor:
        return self.salience.get((kind, index), torch.zeros(width, device=device))

    def _hidden(self, structure: PrunableStructure) -> list[torch.Tensor]:
        """The per-site hidden salience vectors the chosen `hidden_salience` form sums."""
        if self.hidden_salience == "total":
            return [v for (k, _), v in self.salience.items() if k == "hidden"]
        sites = structure.branch_input_sites()
        return [v for (k, i), v in self.salience.items() if k == "branch" or (k == "hidden" and i in sites)]

    @torch.no_grad()
    def compute(self, structure: PrunableStructure) -> BlockTensors:
        shapes: ModelShapes = structure.shapes()
        dh = shapes.head_dim
        device = structure.masks.hidden.device
        heads = [
            self._channel("head", i, h * dh, device).reshape(h, dh).sum(1) for i, h in enumerate(shapes.heads)
        ]
        neurons = [self._channel("neuron", i, f, device) for i, f in enumerate(shapes.neurons)]
        hidden = sum(self._hidden(structure))
        hidden = hidden if torch.is_tensor(hidden) else torch.zeros(shapes.hidden, device=device)
        salience = BlockTensors(heads, neurons, hidden)
        if self.kurtosis == "off":
            return salience
        terms = self.outlier_terms(structure, shapes)
        if self.kurtosis == "scaled":
            masks = structure.masks
            live = BlockTensors(
                [masks.head(i) for i in range(shapes.num_layers)],
                [masks.neuron(i) for i in range(shapes.num_layers)],
                masks.hidden,
            )
            terms = scale_within_kind(salience, terms, live)
        return BlockTensors(
            [s + t for s, t in zip(salience.heads, terms.heads, strict=True)],
            [s + t for s, t in zip(salience.neurons, terms.neurons, strict=True)],
            salience.hidden + terms.hidden,
        )

    @torch.no_grad()
    def outlier_terms(self, structure: PrunableStructure, shapes: ModelShapes) -> BlockTensors:
        """sqrt(max(0, Kurt(O))) per block (paper eq. 5); 0 where a block has no weights or statistics."""
        dh = shapes.head_dim
        device = structure.masks.hidden.device
        heads = [torch.zeros(h, device=device) for h in shapes.heads]
        neurons = [torch.zeros(f, device=device) for f in shapes.neurons]
        hidden = torch.zeros(shapes.hidden, device=device)
        for i, h in enumerate(shapes.heads):
            w, act = structure.head_output_weight(i), self.mean_act.get(("head", i))
            if w is not None and act is not None and h:
                o = (w.float() * act).reshape(w.shape[0], h, dh).permute(1, 0, 2).reshape(h, -1)
                heads[i] = _fisher_kurtosis(o).clamp_min(0).sqrt()
        for i, f in enumerate(shapes.neurons):
            w, act = structure.ffn_output_weight(i), self.mean_act.get(("neuron", i))
            if w is not None and act is not None and f:
                neurons[i] = _fisher_kurtosis((w.float() * act).t()).clamp_min(0).sqrt()
        cols = [
            w.float() * self.mean_act[("hidden", site)]
            for site, w in structure.hidden_input_weights()
            if ("hidden", site) in self.mean_act
        ]
        if cols:
            hidden = _fisher_kurtosis(torch.cat(cols, 0).t()).clamp_min(0).sqrt()
        return BlockTensors(heads, neurons, hidden)

    def compact(self, kept: BlockTensors) -> None:
        """Slice the EMA statistics to the surviving blocks (heads expand to their channels)."""
        dh = self.structure.head_dim
        for store in (self.salience, self.mean_act):
            for (kind, index), t in list(store.items()):
                if kind == "head":
                    idx = kept.heads[index]
                    idx = (idx[:, None] * dh + torch.arange(dh)).flatten()
                elif kind == "neuron":
                    idx = kept.neurons[index]
                else:
                    idx = kept.hidden
                store[(kind, index)] = t.index_select(0, idx.to(t.device))

    def state_dict(self) -> dict:
        return {"salience": dict(self.salience), "mean_act": dict(self.mean_act)}

    def load_state_dict(self, state: dict) -> None:
        self.salience = dict(state.get("salience", {}))
        self.mean_act = dict(state.get("mean_act", {}))


@register_scorer("random")
class RandomScorer(Scorer):
    """Random scores, redrawn at every event (the 'salience replaced by random' ablation): uniform random
    densities, i.e. U(0, 1) times the block's cost, so the search picks blocks at random instead of
    removing expensive blocks (heads) first."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def compute(self, structure: PrunableStructure) -> BlockTensors:
        return block_costs(structure.shapes()).map(
            lambda c: c * torch.rand(c.shape, generator=self.generator)
        )

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])


@register_scorer("uniform")
class UniformScorer(Scorer):
    """Every block equally important: scores proportional to cost, so all densities tie across groups and
    the search keeps the same fraction of every group (the heads of each layer, the neurons of each
    layer, the hidden dims). Within a group, lower indices win the tie."""

    def compute(self, structure: PrunableStructure) -> BlockTensors:
        def ramp(cost: torch.Tensor) -> torch.Tensor:
            n = cost.numel()
            return cost * (1.0 - (torch.arange(n) + 0.5) / max(n, 1))

        return block_costs(structure.shapes()).map(ramp)


@register_scorer("magnitude")
class MagnitudeScorer(Scorer):
    """Mean absolute weight of a block's output (heads, neurons) or input (hidden) weights times the block's
    cost: the search ranks by score / cost, so density is the mean |w| per parameter and blocks of different
    sizes compete fairly (no data needed; a cheap baseline)."""

    @torch.no_grad()
    def compute(self, structure: PrunableStructure) -> BlockTensors:
        shapes = structure.shapes()
        dh = shapes.head_dim
        heads, neurons = [], []
        for i, (h, f) in enumerate(zip(shapes.heads, shapes.neurons, strict=True)):
            w = structure.head_output_weight(i)
            heads.append(
                w.abs().float().reshape(w.shape[0], h, dh).mean((0, 2)).cpu()
                if w is not None and h
                else torch.zeros(h)
            )
            w = structure.ffn_output_weight(i)
            neurons.append(w.abs().float().mean(0).cpu() if w is not None and f else torch.zeros(f))
        hidden = torch.cat([w.abs().float().cpu() for _, w in structure.hidden_input_weights()], 0).mean(0)
        costs = block_costs(shapes)
        return BlockTensors(
            [s * c for s, c in zip(heads, costs.heads, strict=True)],
            [s * c for s, c in zip(neurons, costs.neurons, strict=True)],
            hidden * costs.hidden,
        )

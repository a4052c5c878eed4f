"""`APTModule`: the LightningModule that owns the student, its adapters, the teacher view and the losses.

Callbacks make the decisions (when to prune, what to grow, when to snapshot the teacher); this module
offers the mechanics they call: `compact()`, `grow_adapters()`, `rebuild_optimizer()`, `teacher`.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from apt_lightning.adapters import AdapterConfig, adapter_modules, inject_adapters
from apt_lightning.backbone import resolve_backbone
from apt_lightning.causal_lm import (
    build_causal_lm_metrics,
    causal_lm_loss,
    logits_at,
    response_loss,
    response_positions,
    response_targets,
)
from apt_lightning.data.tasks import InstructionTask, TaskSpec, build_metrics, get_task
from apt_lightning.distributed import rewrap_ddp
from apt_lightning.optim import WarmupLinearLR
from apt_lightning.structure import ModelShapes, SliceLog, get_structure

_DEFAULT_ADAPTERS = AdapterConfig()
# Checkpoints store AdapterConfig in the hyperparameters; torch >= 2.6 loads with weights_only=True.
torch.serialization.add_safe_globals([AdapterConfig])


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """The normalisation layers of a model with their own parameters: LayerNorm and RMSNorm classes by name,
    as families define their own (``LlamaRMSNorm``) and masking replaces them (``MaskedLayerNorm``)."""
    norms = [m for m in model.modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))]
    return [m for m in norms if list(m.parameters(recurse=False))]


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.1)


def _default_scheduler(optimizer, **kw) -> WarmupLinearLR:
    return WarmupLinearLR(optimizer, warmup_ratio=0.06, **kw)


def _checked_scheduler_factory(factory: LRSchedulerCallable) -> LRSchedulerCallable:
    """The module calls the factory with `total_steps`, `start_step` and `scale` whenever it rebuilds the
    optimizer; say so at construction rather than with a TypeError at the first step."""
    target = factory
    if isinstance(
        factory, functools.partial
    ):  # jsonargparse wraps a class_path as partial(fn, ..., cls, ...)
        target = next((a for a in factory.args if isinstance(a, type)), factory.func)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return factory
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory
    missing = sorted({"total_steps", "start_step", "scale"} - set(params))
    if missing:
        raise ValueError(
            f"lr_scheduler {getattr(target, '__name__', target)} does not accept {missing}: APT rebuilds "
            "the scheduler after every shape change and continues it from the global step, so the factory "
            "must take total_steps, start_step and scale (see apt_lightning.optim.WarmupLinearLR)"
        )
    return factory


class APTModule(LightningModule):
    """Sequence classification, or causal-LM instruction tuning (``task: instruction``), with APT adapters
    (or full fine-tuning when `adapters` is None).

    Args:
        backbone: hub name, local folder, or the alias `minilm-l6` (the packaged MiniLM).
        task: a GLUE task name, or a :class:`~apt_lightning.data.TaskSpec` (or a mapping of its fields)
            describing your own dataset; sets the number of labels, their names (``id2label`` of exports),
            the loss and the metrics. Under ``apt-fit`` the DataModule gets the same value. ``instruction``
            trains the backbone as a causal LM (``AutoModelForCausalLM``) on the response tokens of
            prompt/response pairs (`apt_lightning.causal_lm`; data: ``InstructionDataModule``).
        adapters: where and how to put adapters; None fine-tunes every weight.
        optimizer: factory called with the trainable parameters (rebuilt whenever shapes change).
        lr_scheduler: factory called with the optimizer and `total_steps`, `start_step`, `scale`.
        head_modules: module names trained in full next to the adapters (the new task head). Default: the
            family's classification head; none for a causal LM (its ``lm_head`` is usually tied to the
            input embedding, which training it would unfreeze).
        train_norms: also train every normalisation layer's weight and bias (LayerNorm, RMSNorm) next to the
            adapters (9,984 parameters on MiniLM-L6), so the norms can re-scale what a pruned sublayer still
            adds to the residual stream (docs/method.md, Decisions). The optimizer's weight decay applies to
            them as to every trainable tensor. Full fine-tuning trains them anyway.
        pretrained: False builds the backbone's architecture with random weights (shape studies).
        attn_implementation: passed to transformers ("sdpa", "eager").
    """

    def __init__(
        self,
        backbone: str = "minilm-l6",
        task: str | TaskSpec | InstructionTask = "sst2",
        adapters: AdapterConfig | None = _DEFAULT_ADAPTERS,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable = _default_scheduler,
        head_modules: list[str] | None = None,
        train_norms: bool = False,
        pretrained: bool = True,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        if isinstance(adapters, dict):  # LightningCLI stores the dataclass as a mapping in checkpoints
            adapters = AdapterConfig(**adapters)
        self.task = get_task(task)
        task = self.task.to_config()  # the hyperparameters keep a name or a plain mapping
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        path = resolve_backbone(backbone)
        kw = {"attn_implementation": attn_implementation}
        auto = AutoModelForCausalLM if self.causal_lm else AutoModelForSequenceClassification
        if not self.causal_lm:
            kw["num_labels"] = self.task.num_labels
        if self.task.is_regression:
            kw["problem_type"] = "regression"
        if pretrained:  # a backbone saved with another head size gets a new head of the task's size
            self.student = auto.from_pretrained(
                path, dtype=torch.float32, ignore_mismatched_sizes=not self.causal_lm, **kw
            )
        else:
            self.student = auto.from_config(AutoConfig.from_pretrained(path, **kw))
        if self.student.config.pad_token_id is None:  # decoders: the classifier reads the last non-pad token
            from apt_lightning.backbone import load_tokenizer

            self.student.config.pad_token_id = load_tokenizer(backbone).pad_token_id
        self.optimizer_factory = optimizer
        self.scheduler_factory = _checked_scheduler_factory(lr_scheduler)
        self.lr_scale = 1.0
        self.adapters_config = adapters
        if adapters is not None:
            self.student.requires_grad_(False)
            inject_adapters(self.student, adapters)
            names = head_modules
            if names is None:
                names = [] if self.causal_lm else get_structure(self.student).head_modules
            for name in names:
                head = getattr(self.student, name, None) or getattr(self.student.base_model, name, None)
                if head is None and head_modules is not None:
                    raise ValueError(f"head module {name!r} not found in {type(self.student).__name__}")
                if head is not None:
                    head.requires_grad_(True)
            if train_norms:
                for norm in norm_modules(self.student):
                    norm.requires_grad_(True)
        self._name_labels(self.task.label_names)
        self.student.train()  # from_pretrained returns eval mode; Lightning keeps module modes as given
        metrics = build_causal_lm_metrics if self.causal_lm else functools.partial(build_metrics, self.task)
        self.val_metrics = metrics(prefix="val/")
        self.test_metrics = metrics(prefix="test/")
        self.teacher = None  # a TeacherView, set by the SelfDistillation callback
        self.distiller = None  # computes the distillation loss, set by the SelfDistillation callback
        self.distill_weight = 0.0  # mu in L = mu * L_distill + (1 - mu) * L_task

    # ------------------------------------------------------------------ model-side mechanics
    @property
    def causal_lm(self) -> bool:
        """Whether the student is a causal LM trained on response tokens (``task: instruction``)."""
        return self.task.objective == "causal_lm"

    @property
    def structure(self):
        return get_structure(self.student)

    def adapters(self):
        return adapter_modules(self.student)

    def compact(self) -> SliceLog:
        """Remove pruned blocks physically; the teacher snapshot and distillation map follow; the
        optimizer is rebuilt over the remaining steps."""
        masks = self.structure.masks
        hidden = None if masks is None or masks.hidden_full else masks.kept("hidden")
        log = self.structure.compact()
        if self.teacher is not None:
            self.teacher.follow(log, self.student)
        if self.distiller is not None and hidden is not None:
            self.distiller.follow_hidden(hidden)
        return log

    def grow_adapters(self, ranks: dict[str, int]) -> None:
        modules = self.adapters()
        for name, rank in ranks.items():
            modules[name].grow_rank(rank)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def rebuild_optimizer(self) -> None:
        """Re-create optimizer and LR scheduler after a shape change; the schedule continues from the
        current global step (see `WarmupLinearLR`). Adam moments restart for the new tensors. Under DDP
        the wrapper is rebuilt first when parameters were replaced (docs/distributed.md)."""
        if self._trainer is None or self.trainer.strategy is None or not self.trainer.optimizers:
            return
        rewrap_ddp(self.trainer)
        self.trainer.strategy.setup_optimizers(self.trainer)

    def _name_labels(self, names) -> None:
        """Take class names (the task's, or read from the data): `id2label` / `label2id` of the student."""
        if not names or self.task.is_regression:
            return
        if len(names) != self.task.num_labels:
            raise ValueError(
                f"{len(names)} label names {list(names)}; task {self.task.name!r} has "
                f"num_labels={self.task.num_labels}"
            )
        if tuple(names) != self.task.label_names:
            self.task = self.task.with_label_names(tuple(names))
        self.student.config.id2label = dict(enumerate(names))
        self.student.config.label2id = {name: i for i, name in enumerate(names)}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        """Refuse a datamodule `max_length` beyond the student's position embeddings before training, and
        take the label names the datamodule read from the data (a task given only `num_labels`)."""
        from apt_lightning.data.validation import check_max_length

        datamodule = getattr(self._trainer, "datamodule", None)
        spec = getattr(datamodule, "task_spec", None)
        if isinstance(spec, TaskSpec) and spec.label_names and not self.task.label_names:
            self._name_labels(spec.label_names)
        max_length = getattr(datamodule, "hparams", {}).get("max_length")
        if isinstance(max_length, int):
            check_max_length(max_length, self.student.config, self.hparams.backbone)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        scheduler = self.scheduler_factory(
            optimizer,
            total_steps=max(1, int(total)),
            start_step=self.global_step if self._trainer else 0,
            scale=self.lr_scale,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def forward(self, **inputs):
        return self.student(**inputs)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.causal_lm:
            return causal_lm_loss(logits, labels)
        if self.task.is_regression:
            return F.mse_loss(logits.squeeze(-1), labels.float())
        return F.cross_entropy(logits, labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = batch.pop("labels")
        distill = self.distiller is not None and self.distill_weight > 0
        # a causal LM's logits only at the positions that predict a response token, student and teacher:
        # (n, vocab) rows, not (batch, length, vocab) (docs/method.md section 14)
        rows = logits_at(self.student, response_positions(labels)) if self.causal_lm else nullcontext()
        with rows:
            out = self.student(**batch, output_hidden_states=distill and self.distiller.needs_hidden)
            if self.causal_lm:
                task = response_loss(out.logits, response_targets(labels))
            else:
                task = self.task_loss(out.logits, labels)
            parts = self.distiller.loss(self, batch, out, response_rows=self.causal_lm) if distill else {}
        loss = task
        logs = {"train/task_loss": task}
        if distill:
            mu = self.distill_weight
            loss = mu * parts["distill"] + (1 - mu) * task
            logs.update({f"train/{k}": v for k, v in parts.items()})
            logs["train/mu"] = mu
        logs["train/loss"] = loss
        self.log_dict(logs, prog_bar=False, batch_size=labels.shape[0])
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=labels.shape[0])
        return loss

    def _evaluate(self, batch: dict, metrics, prefix: str) -> None:
        labels = batch.pop("labels")
        batch.pop("idx", None)
        logits = self.student(**batch).logits
        if self.causal_lm:  # the loss is a metric here: averaged over every response token of the split
            metrics.update(logits, labels)
            return
        self.log(f"{prefix}loss", self.task_loss(logits, labels), batch_size=labels.shape[0], sync_dist=True)
        metrics.update(self._predictions(logits), labels)

    def _predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val/")

    def on_validation_epoch_end(self) -> None:
        # compute() gathers every rank's state already: sync_dist averages equal values (no warning)
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """The task's metrics on the datamodule's labeled test split, logged as `test/<metric>`."""
        self._evaluate(batch, self.test_metrics, "test/")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """One record per example: its row `index` in the predicted file, the `prediction` (a label id for
        classification, with its `label_name`; the predicted value for regression)."""
        batch.pop("labels", None)
        index = batch.pop("idx", None)
        preds = self._predictions(self.student(**batch).logits).tolist()
        if index is None:  # a datamodule without row indices: number the rows as they come
            index = range(batch_idx * len(preds), (batch_idx + 1) * len(preds))
        rows = []
        for i, pred in zip(list(map(int, index)), preds, strict=True):
            row = {"index": i, "prediction": pred}
            if not self.task.is_regression:
                names = self.task.label_names
                row["label_name"] = names[pred] if pred < len(names) else str(pred)
            rows.append(row)
        return rows

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the shapes a fresh model must be cut / grown to before this state dict fits."""
        state = {"ranks": {n: m.rank for n, m in self.adapters().items()}, "lr_scale": self.lr_scale}
        structure = getattr(self.student, "_apt_structure", None)  # None: never masked nor compacted
        if structure is not None:
            state["shapes"] = structure.shapes().to_dict()
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        if self.task.label_names:
            state["label_names"] = list(self.task.label_names)
        checkpoint["apt"] = state

    _TRAINABLE_SET = {"train_norms": False, "head_modules": None}  # what checkpoints without them ran

    def _check_trainable_set(self, saved: dict) -> None:
        """Resuming a fit needs the tensors the checkpoint trained: its optimizer state holds one entry per
        trainable tensor, and another set fails deep in torch's loader without saying why. Full fine-tuning
        trains every tensor whatever these say."""
        if self.adapters_config is None:
            return
        for key, default in self._TRAINABLE_SET.items():
            then, now = saved.get(key, default), self.hparams.get(key, default)
            if then != now:
                raise ValueError(
                    f"the checkpoint trained with {key}: {then!r}, this run configures {now!r}; its "
                    f"optimizer state is for that set of trainable tensors: resume with {key}: {then!r}"
                )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Cut the fresh student to the saved widths and grow its adapters to the saved ranks, so the saved
        state dict (and later the optimizer state) fits; runs before Lightning loads the weights.

        Training-only state is restored only where training set it up: the distiller (created by
        `SelfDistillation` when fitting) and the teacher snapshot. Without them (validate, test, predict,
        or a run without `SelfDistillation`), their saved tensors are left out of the state dict."""
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._check_trainable_set(checkpoint.get("hyper_parameters", {}))
        state = checkpoint.get("apt", {})
        weights = checkpoint.get("state_dict", {})
        if any(k.startswith("student.apt_masks.") for k in weights):
            self.structure.install_masks()
        if "shapes" in state:
            shapes = ModelShapes.from_dict(state["shapes"])
            if not shapes.same_widths(self.structure.shapes()):
                self.structure.reshape(shapes)
                if self.distiller is not None:
                    self.distiller.resize_hidden(shapes.hidden)
        grow = {n: r for n, r in state.get("ranks", {}).items() if r != self.adapters()[n].rank}
        self.grow_adapters(grow)
        self.lr_scale = state.get("lr_scale", 1.0)
        if state.get("label_names") and not self.task.label_names:  # read from the data when training
            self._name_labels(tuple(state["label_names"]))
        if self.teacher is not None and "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])
        if self.distiller is None:
            for key in [k for k in weights if k.startswith("distiller.")]:
                del weights[key]

"""Causal-LM instruction tuning (`task: instruction`): the response-only loss and its token-weighted
validation numbers, causal-LM self-distillation on response tokens, the module's student and trainable
tensors, and the whole path on a tiny LLaMA: apt-fit with pruning, tuning and distillation, apt-export,
reload, generate."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers_causal import ALPACA_ROWS, save_tiny_causal_backbone, write_alpaca

from apt_lightning import APTModule
from apt_lightning.causal_lm import (
    IGNORE_INDEX,
    ResponseNLL,
    build_causal_lm_metrics,
    causal_lm_loss,
    next_token_targets,
    response_positions,
)
from apt_lightning.distill import causal_lm_prediction_loss, prediction_loss

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 11
FP32 = dict(rtol=1e-5, atol=1e-6)  # sums of a few dozen fp32 log-softmax terms


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_tiny_causal_backbone(tmp_path_factory.mktemp("causal"))


def labelled_batch(seed: int = 0):
    """Logits (2, 8, VOCAB) and labels: row 0 a 3-token prompt, 4 response tokens, 1 pad; row 1 a 5-token
    prompt and 3 response tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    labels[0, 7:] = IGNORE_INDEX
    labels[1, :5] = IGNORE_INDEX
    return torch.randn(2, 8, VOCAB, generator=g), labels


def no_loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a prompt or padding token (or nothing: the last position)."""
    mask = torch.ones_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] == IGNORE_INDEX
    return mask


# ---------------------------------------------------------------------------------------------- the loss
def test_loss_is_next_token_cross_entropy_over_response_tokens():
    logits, labels = labelled_batch()
    terms = [
        -F.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
        for b in range(2)
        for t in range(1, 8)
        if labels[b, t] != IGNORE_INDEX
    ]
    assert len(terms) == 7
    torch.testing.assert_close(causal_lm_loss(logits, labels), torch.stack(terms).mean(), **FP32)


def test_prompt_and_padding_carry_no_loss():
    logits, labels = labelled_batch()
    logits.requires_grad_(True)
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    hidden = no_loss_positions(labels)
    assert (logits.grad[hidden] == 0).all() and (logits.grad[~hidden] != 0).any()
    changed = logits.detach().clone()
    changed[hidden] = torch.randn(changed[hidden].shape) * 10
    assert causal_lm_loss(changed, labels) == loss


def test_validation_numbers_weigh_every_response_token_equally():
    (a, la), (b, lb) = labelled_batch(0), labelled_batch(1)
    lb[0, 1:] = IGNORE_INDEX  # the second batch has fewer response tokens: a mean of batch means would differ
    metrics = build_causal_lm_metrics("val/")
    metrics.update(a, la)
    metrics.update(b, lb)
    out = metrics.compute()
    whole = causal_lm_loss(torch.cat([a, b]), torch.cat([la, lb]))
    torch.testing.assert_close(out["val/loss"], whole, **FP32)
    torch.testing.assert_close(out["val/perplexity"], whole.exp(), **FP32)
    assert not math.isclose(float(whole), float((causal_lm_loss(a, la) + causal_lm_loss(b, lb)) / 2))
    assert ResponseNLL.higher_is_better is False


# ---------------------------------------------------------------------------------------------- distillation
def test_causal_distillation_is_zero_for_identical_teacher_and_student():
    logits, labels = labelled_batch()
    rows, _ = next_token_targets(logits, labels)
    assert causal_lm_prediction_loss(rows, rows.clone(), tau=4.0) == 0


def test_causal_distillation_is_the_kl_averaged_over_response_rows():
    student, labels = labelled_batch(0)
    teacher, _ = labelled_batch(1)
    s, _ = next_token_targets(student, labels)
    t, _ = next_token_targets(teacher, labels)
    assert s.shape == (7, VOCAB)  # 4 + 3 response tokens; prompt and padding positions have no row
    loss = causal_lm_prediction_loss(s, t, tau=2.0)
    kl = [
        (F.softmax(t[i] / 2, -1) * (F.log_softmax(t[i] / 2, -1) - F.log_softmax(s[i] / 2, -1))).sum()
        for i in range(7)
    ]
    torch.testing.assert_close(loss, 4 * torch.stack(kl).mean(), **FP32)
    empty = s[:0].requires_grad_(True)
    none = causal_lm_prediction_loss(empty, t[:0], tau=2.0)
    assert none == 0 and none.requires_grad
    with pytest.raises(ValueError, match="rows must both be"):
        causal_lm_prediction_loss(student, teacher, tau=2.0)


def test_response_positions_hold_the_rows_of_the_shifted_labels():
    logits, labels = labelled_batch()
    positions = response_positions(labels)
    assert positions.tolist() == [
        [False, False, True, True, True, True, False, False],
        [False, False, False, False, True, True, True, False],
    ]
    assert torch.equal(~positions, no_loss_positions(labels))
    assert torch.equal(logits[positions], logits[:, :-1][labels[:, 1:] != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------ response logits
def response_batch(vocab: int, seed: int = 0) -> dict:
    """Three right-padded sequences of 12 tokens with prompts of 3, 5 and 8 tokens and 6, 7 and 2 response
    tokens (then padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, (prompt, response) in enumerate([(3, 6), (5, 7), (8, 2)]):
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, prompt + response :] = IGNORE_INDEX
        mask[row, prompt + response :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def distilling_module(backbone, mu: float) -> APTModule:
    """The tiny LLaMA with masks (a soft hidden mask, so the final norm's mask reaches the head), adapters
    away from their init, a teacher snapshot that differs from the student, and distillation weight mu."""
    from apt_lightning.distill import Distiller, TeacherView

    torch.manual_seed(0)
    model = APTModule(backbone=str(backbone), task="instruction")
    masks = model.structure.install_masks()
    hidden = torch.ones(masks.hidden.numel())
    hidden[:6], hidden[6:9] = 0.0, 0.5
    masks.set("hidden", hidden)
    g = torch.Generator().manual_seed(1)

    def perturb() -> None:
        with torch.no_grad():
            for p in model.student.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))

    perturb()
    model.teacher = TeacherView()
    model.teacher.snapshot(model.student)
    perturb()
    model.distiller = Distiller(masks.hidden.numel(), tau=2.0, layer_weight=0.9, layer_blocks=2, seed=0)
    model.distill_weight = mu
    return model.train()


def full_logits_loss(model: APTModule, batch: dict) -> torch.Tensor:
    """The loss from full (batch, length, vocab) logits, as training computed it before `logits_at`."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    mu = model.distill_weight
    out = model.student(**inputs, output_hidden_states=True)
    task = causal_lm_loss(out.logits, labels)
    if mu == 0:
        return task
    d = model.distiller
    teacher = model.teacher(model.student, inputs, output_hidden_states=True)
    s, _ = next_token_targets(out.logits, labels)
    t, _ = next_token_targets(teacher.logits, labels)
    pred = prediction_loss(s.float(), t.float(), d.tau)
    layer = d.layer_loss(model, out.hidden_states, teacher.hidden_states)
    return mu * (d.pred_weight * pred + d.layer_weight * layer) + (1 - mu) * task


def observed(model: APTModule, batch: dict, loss_of) -> dict:
    """Loss, trainable gradients (student and distiller) and salience statistics after one backward, and
    the shapes of every logits tensor the LM head produced."""
    from apt_lightning.pruning.scorers import OutlierAwareSalience

    scorer = OutlierAwareSalience()
    shapes = []
    hook = model.student.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    model.distiller.generator.manual_seed(0)  # the same teacher layers drawn
    model.structure.masks.observer = scorer
    try:
        loss = loss_of(model, dict(batch))
        loss.backward()
        scorer.step()
    finally:
        model.structure.masks.observer = None
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {
        "loss": loss.detach(),
        "grads": grads,
        "salience": scorer.salience,
        "mean_act": scorer.mean_act,
        "shapes": shapes,
    }


def training_loss(model: APTModule, batch: dict) -> torch.Tensor:
    return model.training_step(batch, 0)


@pytest.mark.parametrize("mu", [0.0, 0.6])
def test_training_loss_gradients_and_salience_equal_the_full_logits_reference(backbone, mu):
    """Logits only at the response positions change no number: the loss (task, and distillation with its
    teacher forward), the adapters' and the distiller's gradients, and the salience statistics at every
    mask site (the final norm's included: the head reads its masked output row by row)."""
    model = distilling_module(backbone, mu)
    batch = response_batch(model.student.config.vocab_size)
    new = observed(model, batch, training_loss)
    ref = observed(model, batch, full_logits_loss)
    torch.testing.assert_close(new["loss"], ref["loss"], **FP32)
    assert new["grads"].keys() == ref["grads"].keys()
    assert any("lora" in n for n in new["grads"]) and (mu == 0) != any("distiller" in n for n in new["grads"])
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(new["grads"][name], grad, **FP32, msg=name)
    final = ("hidden", 2 * model.student.config.num_hidden_layers)
    assert final in ref["salience"] and ref["salience"].keys() == new["salience"].keys()
    for key, value in ref["salience"].items():
        torch.testing.assert_close(new["salience"][key], value, **FP32, msg=str(key))
        torch.testing.assert_close(new["mean_act"][key], ref["mean_act"][key], **FP32, msg=str(key))


@pytest.mark.parametrize("mu", [0.0, 0.6])
def test_training_computes_logits_only_at_response_positions(backbone, mu):
    """The memory claim: every logits tensor of a training step, the student's and the teacher's, is
    (response tokens, vocab), not (batch, length, vocab); outside the step the head is whole again."""
    model = distilling_module(backbone, mu)
    batch = response_batch(model.student.config.vocab_size)
    vocab = model.student.config.vocab_size
    shapes = observed(model, batch, training_loss)["shapes"]
    assert shapes == [(6 + 7 + 2, vocab)] * (2 if mu else 1)
    assert not model.student.lm_head._forward_pre_hooks
    with torch.no_grad():
        assert model.student(input_ids=batch["input_ids"]).logits.shape == (3, 12, vocab)


# ---------------------------------------------------------------------------------------------- the module
def test_module_trains_adapters_on_q_and_v_and_no_head(backbone):
    torch.manual_seed(0)
    model = APTModule(backbone=str(backbone), task="instruction")
    assert type(model.student).__name__ == "LlamaForCausalLM" and model.causal_lm
    trainable = {n for n, p in model.student.named_parameters() if p.requires_grad}
    assert trainable and {n.split(".")[-2] for n in trainable} == {"q_proj", "v_proj"}
    assert model.student.lm_head.weight is model.student.model.embed_tokens.weight  # tied, frozen
    assert set(model.val_metrics.keys()) == {"val/nll"}
    # the tied head can be trained on request: it unfreezes the input embedding with it
    headed = APTModule(backbone=str(backbone), task="instruction", head_modules=["lm_head"])
    assert headed.student.model.embed_tokens.weight.requires_grad
    # trained norms: every RMSNorm (two per layer and the final one) joins the adapters; the tied embedding
    # stays frozen
    normed = APTModule(backbone=str(backbone), task="instruction", train_norms=True)
    norms = {n for n, p in normed.student.named_parameters() if p.requires_grad} - trainable
    layers = normed.student.config.num_hidden_layers
    assert len(norms) == 2 * layers + 1 and all(n.endswith("norm.weight") for n in norms)
    assert not normed.student.model.embed_tokens.weight.requires_grad
    assert normed.student.lm_head.weight is normed.student.model.embed_tokens.weight


def test_validation_logs_loss_and_perplexity(backbone, tmp_path):
    from helpers_apt import quiet_trainer

    from apt_lightning.data import InstructionDataModule

    data = InstructionDataModule(
        tokenizer=str(backbone), data_dir=str(write_alpaca(tmp_path)), max_length=128
    )
    torch.manual_seed(0)
    model = APTModule(backbone=str(backbone), task="instruction")
    metrics = quiet_trainer(limit_val_batches=None).validate(model, datamodule=data, verbose=False)[0]
    assert set(metrics) == {"val/loss", "val/perplexity"}
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))  # one batch holds the whole eval file (6 rows, batch 8)
    labels = batch.pop("labels")
    with torch.no_grad():
        expected = causal_lm_loss(model.student(**batch).logits, labels)
    assert metrics["val/loss"] == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------------------------------------- end to end
REMOTE_GENERATE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # without it: a question on stdin
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
x = tok(prompt, return_tensors="pt")
with torch.no_grad():
    y = model.generate(**x, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps({"class": type(model).__name__, "new": y[0, x["input_ids"].shape[1]:].tolist()}))
"""


def test_fit_prunes_grows_distils_exports_and_generates(backbone, tmp_path, monkeypatch):
    """The CPU quickstart recipe on the tiny decoder: salience from the response-token loss drives pruning
    to 30%, ranks grow, the distillation loss is on; apt-export writes a folder that transformers loads as a
    causal LM with its tokenizer and that generates what the trained model generates."""
    from conftest import REPO

    from apt_lightning.callbacks.dashboard import RunDashboard
    from apt_lightning.callbacks.events import find_callback
    from apt_lightning.cli import run_cli
    from apt_lightning.data import format_prompt
    from apt_lightning.export import SIDECAR, load_pruned, module_from_checkpoint
    from apt_lightning.export import main as export_main

    monkeypatch.chdir(tmp_path)  # the recipe writes its checkpoint to runs/smollm2_alpaca_quickstart/
    data = write_alpaca(tmp_path / "alpaca", train=ALPACA_ROWS * 11)
    cli = run_cli(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "smollm2_alpaca_quickstart_cpu.yaml"),
            f"--model.init_args.backbone={backbone}",
            f"--data.init_args.data_dir={data}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == 16
    pruning = json.loads(open(f"{trainer.log_dir}/pruning.json").read())
    assert pruning["events"][-1]["achieved_sparsity"] == pytest.approx(0.3, abs=0.05)
    assert max(a.rank for a in model.adapters().values()) > 8  # adaptive tuning grew ranks
    logged = trainer.callback_metrics
    assert {"val/loss", "val/perplexity", "train/pred_loss", "train/layer_loss"} <= set(logged)
    dashboard = find_callback(trainer, RunDashboard)
    losses = [e["val/loss"] for e in dashboard.metric_history if "val/loss" in e]
    assert len(losses) == 2 and losses[0] != losses[1]
    summary = dashboard.summary
    assert (summary["monitor"], summary["mode"]) == ("val/loss", "min")  # lower is better
    assert summary["best_metric"] == min(losses)

    ckpt = tmp_path / "runs" / "smollm2_alpaca_quickstart" / "final.ckpt"
    out = tmp_path / "exported"
    export_main([str(ckpt), str(out)])
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["model_class"] == "LlamaForCausalLM"
    assert sidecar["apt_param_count"] / sidecar["full_apt_param_count"] == pytest.approx(0.7, abs=0.05)

    prompt = format_prompt("Name a primary color.")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_GENERATE, str(out), prompt],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["class"] == "AptPrunedLlamaForCausalLM" and len(got["new"]) >= 1

    trained = module_from_checkpoint(ckpt).student.eval()  # masked, adapters unmerged
    tokenizer = cli.datamodule.tokenizer
    x = tokenizer(prompt, return_tensors="pt")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = trained.generate(**x, **kw)[0, x["input_ids"].shape[1] :].tolist()
        reloaded = load_pruned(out).generate(**x, **kw)[0, x["input_ids"].shape[1] :].tolist()
    assert got["new"] == expected == reloaded

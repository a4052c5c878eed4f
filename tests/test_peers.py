"""The Torch-Pruning peer: its choice is Torch-Pruning's, it meets the counted target, and the model it
leaves is one the project can mask, compact, checkpoint, export and reload (tiny BERT, CPU)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import bert_shapes, logits, tiny_batch, tiny_model
from helpers_apt import make_module, quiet_trainer, repeated_batch_loader, synthetic_batch

from apt_lightning.adapters import AdapterConfig, adapter_modules, inject_adapters
from apt_lightning.export import export_pruned, load_pruned, module_from_checkpoint
from apt_lightning.pruning import BlockTensors, kept_param_count
from apt_lightning.structure import get_structure

tp = pytest.importorskip("torch_pruning")

from apt_lightning.peers import TorchPruningPeer, final_counts, keep_top, taylor_scores  # noqa: E402
from apt_lightning.peers.torch_pruning import apply_keep  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
HEADS, HEAD_DIM = 4, 8  # per layer of the tiny models (3 layers, hidden 32, FFN 48)


def _kept_heads(before: list[torch.Tensor], model) -> list[list[int]]:
    """Which heads of each layer survive, found by matching the query rows against the original ones."""
    kept = []
    for q0, layer in zip(before, model.base_model.encoder.layer, strict=True):
        rows = layer.attention.self.query.weight.detach().view(-1, HEAD_DIM, q0.shape[1])
        heads = q0.view(HEADS, HEAD_DIM, -1)
        kept.append([h for h in range(HEADS) if any(torch.equal(heads[h], r) for r in rows)])
    return kept


def _metapruner_heads(model, batch: dict, keep: int, normalizer="mean") -> list[list[int]]:
    """Torch-Pruning itself, on a copy: global MetaPruner head pruning (Taylor importance of `batch`)
    that keeps `keep` heads, applied physically; the heads left per layer."""
    model = copy.deepcopy(model).eval()
    before = [layer.attention.self.query.weight.detach().clone() for layer in model.base_model.encoder.layer]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    F.cross_entropy(model(**inputs).logits, batch["labels"]).backward()
    total = HEADS * len(before)
    num_heads = {}
    for layer in model.base_model.encoder.layer:
        att = layer.attention.self
        num_heads.update(dict.fromkeys((att.query, att.key, att.value), HEADS))
    pruner = tp.pruner.MetaPruner(
        model,
        {k: v[:2] for k, v in inputs.items()},
        importance=tp.importance.GroupTaylorImportance(normalizer=normalizer),
        global_pruning=True,
        pruning_ratio=0.25,  # FFN neurons; MetaPruner prunes heads only alongside some width pruning
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=1.0 - (keep + 0.5) / total,  # removes total - keep heads
        ignored_layers=[model.base_model.embeddings, model.base_model.pooler, model.classifier],
        output_transform=lambda out: out.logits,
    )
    pruner.step()
    return _kept_heads(before, model)


@pytest.mark.parametrize(("normalizer", "seed"), [("mean", 3), (None, 5)])
def test_head_choice_is_torch_prunings_global_taylor_ranking(normalizer, seed):
    """(Seeds where no layer loses every head: MetaPruner then leaves that layer whole, over the count.)"""
    model = tiny_model("bert", seed=seed, initializer_range=0.2)
    batch = {**tiny_batch(seed=seed, batch=8), "labels": torch.arange(8) % 3}
    reference = _metapruner_heads(model, batch, keep=6, normalizer=normalizer)
    heads, neurons = taylor_scores(model, [batch], F.cross_entropy, normalizer)
    chosen = [torch.nonzero(k).flatten().tolist() for k in keep_top(heads, 6)]
    assert chosen == reference
    assert list(map(len, chosen)) != [2, 2, 2]  # the ranking is global: layers keep different counts
    assert [len(n) for n in neurons] == [48, 48, 48]
    assert all(p.grad is None for p in model.parameters())  # the scoring leaves no gradients behind


def test_final_counts_meet_the_counted_target():
    minilm = bert_shapes([12] * 6, [1536] * 6, 384, 32)
    for head_sparsity in (None, 0.5, 0.7):
        heads, neurons = final_counts(minilm, 0.6, head_sparsity)
        assert heads == round((1 - (0.6 if head_sparsity is None else head_sparsity)) * 72)
        kept = 384 * (4 * 32 * heads + 2 * neurons)
        assert abs((1 - kept / minilm.counted_params()) - 0.6) < 2 * 384 * 2 / minilm.counted_params()
    tiny = bert_shapes([4] * 3, [48] * 3, 32, 8)  # heads are most of this count
    with pytest.raises(ValueError, match="head_sparsity 0.0 keeps 12 of 12 heads, which alone exceed"):
        final_counts(tiny, 0.6, 0.0)
    assert keep_top([torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])], 2)[1].tolist() == [1.0, 0.0]


def test_keep_top_round_to_keeps_whole_units_per_layer():
    scores = [torch.tensor([9.0, 8, 7, 1, 1, 1, 1, 1]), torch.tensor([6.0, 5, 4, 3, 2, 2, 2, 2])]
    # global top 6: 9 8 7 | 6 5 4; rounded down to pairs: 9 8 | 6 5; then the best pair left: (7, 1) of
    # layer 0 (mean 4) before (4, 3) of layer 1 (3.5)
    got = keep_top(scores, 6, round_to=2)
    assert [k.tolist() for k in got] == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert keep_top([torch.ones(3)], 3, round_to=2)[0].tolist() == [1, 1, 0]  # ties: earlier blocks stay
    g = torch.Generator().manual_seed(0)
    for keep in (0, 5, 37, 95, 96):
        scores = [torch.rand(n, generator=g) for n in (48, 16, 32)]
        got = keep_top(scores, keep, round_to=8)
        total = sum(int(k.sum()) for k in got)
        assert all(int(k.sum()) % 8 == 0 for k in got) and keep - 8 < total <= keep
        assert [k.tolist() for k in keep_top(scores, keep, round_to=1)] == [
            k.tolist() for k in keep_top(scores, keep)
        ]


def _fit(module, peer, steps: int, batches: int = 10):
    trainer = quiet_trainer(max_steps=steps, callbacks=[peer])
    trainer.fit(module, train_dataloaders=repeated_batch_loader(batches))
    return trainer


def test_peer_callback_is_torch_pruning_on_the_training_batch(backbone):
    """One pruning step after one optimizer step at lr 0: the heads the callback removes are those
    Torch-Pruning's MetaPruner removes from the same model on the same batch."""
    module = make_module(backbone, adapters=None, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    before = copy.deepcopy(module.student)
    peer = TorchPruningPeer(0.6, start_step=0, end_step=1, num_steps=1, importance_batches=1)
    _fit(module, peer, steps=1)
    batch = synthetic_batch()
    heads = sum(final_counts(get_structure(before).shapes(), 0.6, None)[:1])
    q0 = [layer.attention.self.query.weight.detach() for layer in before.base_model.encoder.layer]
    assert _kept_heads(q0, module.student) == _metapruner_heads(before, batch, keep=heads)


def test_peer_ft_reaches_the_target_and_exports(backbone, tmp_path):
    module = make_module(backbone, adapters=None)
    structure = module.structure
    full = structure.shapes().counted_params()
    peer = TorchPruningPeer(0.6, start_step=2, end_step=6, num_steps=2, importance_batches=2)
    trainer = _fit(module, peer, steps=8)
    shapes = structure.shapes()
    sparsity = 1 - shapes.counted_params() / full
    assert abs(sparsity - 0.6) < 0.01 and peer.pruning_done
    assert [e["step"] for e in peer.history] == [4, 6]
    assert peer.history[-1]["achieved_sparsity"] == pytest.approx(sparsity)
    assert sum(shapes.heads) == 5 and peer.history[0]["heads_per_layer"] != shapes.heads  # two steps
    assert all(p.requires_grad for p in module.student.parameters())  # full fine-tuning throughout

    ckpt = tmp_path / "peer.ckpt"
    trainer.save_checkpoint(ckpt)
    batch = {k: v for k, v in synthetic_batch().items() if k != "labels"}
    reference = logits(module.student.eval(), batch)
    reloaded = module_from_checkpoint(ckpt).student.eval()
    torch.testing.assert_close(logits(reloaded, batch), reference, rtol=0, atol=1e-5)
    folder = export_pruned(module.student, tmp_path / "export")
    torch.testing.assert_close(logits(load_pruned(folder), batch), reference, rtol=0, atol=1e-5)


def test_peer_round_to_aligns_every_layers_neurons(backbone):
    module = make_module(backbone, adapters=None)
    full = module.structure.shapes().counted_params()
    _fit(module, TorchPruningPeer(0.6, start_step=2, end_step=6, num_steps=2, round_to=8), steps=8)
    shapes = module.structure.shapes()
    assert all(n % 8 == 0 for n in shapes.neurons) and any(n < 48 for n in shapes.neurons)
    neuron = 2 * 32  # a BERT neuron's count per kept hidden dim (FFN in and out) x the hidden size
    sparsity = 1 - shapes.counted_params() / full  # the target within a neuron, then under 8 more removed
    assert 0.6 - neuron / full < sparsity < 0.6 + 9 * neuron / full


def test_peer_round_to_below_a_later_steps_share_keeps_going(backbone):
    # 8 steps to 0.2 remove 4-5 of the 144 neurons each; rounding to 16 cuts step 1 to 128, below step 2's
    # share (135): the step keeps what is left rather than asking for more blocks than exist
    module = make_module(backbone, adapters=None)
    peer = TorchPruningPeer(0.2, start_step=1, end_step=9, num_steps=8, round_to=16)
    _fit(module, peer, steps=10)
    assert peer.pruning_done and all(n % 16 == 0 for n in module.structure.shapes().neurons)
    assert [sum(e["neurons_per_layer"]) for e in peer.history][:2] == [128, 128]


def test_peer_decision_masked_equals_compacted_and_exported(tmp_path):
    model = tiny_model("bert", seed=4, initializer_range=0.2)
    inject_adapters(model, AdapterConfig(targets=["query", "value"], rank=4))
    with torch.no_grad():
        for adapter in adapter_modules(model).values():
            adapter.lora_B.normal_(std=0.2)
    batch = {**tiny_batch(seed=4, batch=8), "labels": torch.arange(8) % 3}
    heads, neurons = taylor_scores(model, [batch], F.cross_entropy)
    keep = BlockTensors(keep_top(heads, 6), keep_top(neurons, 70), torch.ones(32))
    structure = get_structure(model)
    apply_keep(structure, keep)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    masked = logits(model, inputs)
    counted = kept_param_count(keep, structure.shapes())
    structure.compact()
    assert structure.shapes().counted_params() == counted
    torch.testing.assert_close(logits(model, inputs), masked, rtol=0, atol=1e-5)
    folder = export_pruned(model, tmp_path / "export")
    torch.testing.assert_close(logits(load_pruned(folder), inputs), masked, rtol=0, atol=1e-5)


def test_peer_lora_trains_only_adapters_and_head(backbone):
    module = make_module(backbone, adapters=AdapterConfig(targets=["query", "value"], rank=4))
    layers = module.student.base_model.encoder.layer
    keys = [layer.attention.self.key.weight.detach().clone() for layer in layers]
    q0 = [layer.attention.self.query.weight.detach().clone() for layer in layers]
    peer = TorchPruningPeer(0.6, start_step=1, end_step=4, num_steps=2, importance_batches=2)
    trainer = _fit(module, peer, steps=6)
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("classifier.", "bert.pooler.")) for n in trainable)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters() if p.requires_grad}
    for i, (kept, layer) in enumerate(zip(_kept_heads(q0, module.student), layers, strict=True)):
        if kept:  # the frozen key rows of the kept heads are the pretrained ones; the adapters follow
            rows = torch.cat([keys[i].view(HEADS, HEAD_DIM, -1)[h] for h in kept])
            torch.testing.assert_close(layer.attention.self.key.weight, rows, rtol=0, atol=0)
            assert layer.attention.self.query.lora_B.shape[0] == len(kept) * HEAD_DIM
    assert abs(1 - module.structure.shapes().counted_params() / peer.full_count - 0.6) < 0.01


def test_peer_refuses_bad_settings_and_apt_pruning(backbone):
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        TorchPruningPeer(num_steps=0)
    with pytest.raises(ValueError, match="normalizer must be one of"):
        TorchPruningPeer(normalizer="median")
    with pytest.raises(ValueError, match="round_to must be >= 1, got 0"):
        TorchPruningPeer(round_to=0)
    trainer = quiet_trainer(max_steps=4, callbacks=[TorchPruningPeer(start_step=1, end_step=3, num_steps=3)])
    with pytest.raises(ValueError, match="3 pruning steps after start_step 1 up to end_step 3 need"):
        trainer.fit(make_module(backbone, adapters=None), train_dataloaders=repeated_batch_loader(4))
    from apt_lightning.callbacks import AdaptivePruning

    module = make_module(backbone, adapters=None)
    trainer = quiet_trainer(
        max_steps=4, callbacks=[TorchPruningPeer(start_step=1, end_step=3), AdaptivePruning()]
    )
    with pytest.raises(ValueError, match="switch AdaptivePruning off"):
        trainer.fit(module, train_dataloaders=repeated_batch_loader(4))


class _RankTrainer:
    """What `TorchPruningPeer.on_fit_end` may read of a DDP rank's trainer: `log_dir` is Lightning's
    broadcast, which a rank may only enter together with the others, so reading it here fails."""

    def __init__(self, rank: int) -> None:
        self.is_global_zero = rank == 0

    @property
    def log_dir(self):
        raise AssertionError("Trainer.log_dir is a collective: reading it on one rank hangs DDP")


@pytest.mark.parametrize("rank", [0, 1])
def test_peer_reads_its_log_dir_without_a_collective_on_every_rank(rank, monkeypatch, tmp_path):
    read = []

    def log_dir(trainer):
        read.append(trainer)
        return str(tmp_path)

    monkeypatch.setattr("apt_lightning.distributed.log_dir", log_dir)
    peer = TorchPruningPeer(0.6)
    trainer = _RankTrainer(rank)
    peer.on_fit_end(trainer, None)
    assert read == [trainer]  # every rank, through the helper that does not broadcast
    assert (tmp_path / "pruning.json").is_file() == (rank == 0)


def test_peer_under_ddp_looks_for_unused_parameters_and_checks_ranks(backbone, monkeypatch):
    """A DDP strategy is told to look for parameters without gradients before it wraps the module, and
    the ranks' states are compared after every pruning step (a no-op in one process, so recorded here)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    module = make_module(backbone, adapters=None)
    ddp = SimpleNamespace(strategy=DDPStrategy(), callbacks=[], estimated_stepping_batches=8)
    TorchPruningPeer(0.6, start_step=0, end_step=2, num_steps=2).setup(ddp, module, "fit")
    assert ddp.strategy._ddp_kwargs["find_unused_parameters"] is True

    checked = []
    monkeypatch.setattr(
        "apt_lightning.distributed.check_consistency",
        lambda pl_module, where, **extra: checked.append((where, extra["peer"])),
    )
    _fit(module, TorchPruningPeer(0.6, start_step=0, end_step=2, num_steps=2, importance_batches=1), steps=3)
    assert checked == [
        ("Torch-Pruning step 0 (step 1)", {"steps": [1, 2], "next_step": 1}),
        ("Torch-Pruning step 1 (step 2)", {"steps": [1, 2], "next_step": 2}),
    ]

"""Which block kinds the salience search keeps under each kurtosis form (CPU, minutes).

Trains the packaged MiniLM-L6 with LoRA for a few steps on SST-2 while `OutlierAwareSalience` collects
statistics, then runs the block search at several sparsities with the kurtosis term off, in the paper's
unscaled form and scaled within each block kind (docs/method.md section 4) and prints
the kept heads / FFN neurons per layer and hidden size, plus the median score and density (score / cost)
per block kind. A small-sample probe of the search's balance, not a training result.

Usage: python benchmarks/salience_balance.py [--data-dir ../shared/data/glue/sst2] [--examples 320]
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from apt_lightning.data import GLUEDataModule  # noqa: E402
from apt_lightning.module import APTModule  # noqa: E402
from apt_lightning.pruning import OutlierAwareSalience, block_costs, select_blocks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/glue/sst2")
    parser.add_argument("--examples", type=int, default=320, help="training examples (batch 32)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--multiple-of", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = APTModule(backbone="minilm-l6", task="sst2")
    data = GLUEDataModule(task="sst2", data_dir=args.data_dir, train_limit=args.examples, batch_size=32)
    data.setup("fit")
    structure = module.structure
    masks = structure.install_masks()
    scorer = OutlierAwareSalience(ema=0.85, kurtosis="off")
    scorer.attach(structure)
    masks.observer = scorer
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=5e-4)
    module.student.train()
    for batch in data.train_dataloader():
        labels = batch.pop("labels")
        module.task_loss(module.student(**batch).logits, labels).backward()
        scorer.step()
        optimizer.step()
        optimizer.zero_grad()
    masks.observer = None
    shapes = structure.shapes()
    full = shapes.counted_params()
    costs = block_costs(shapes)
    for kurtosis in ("off", "paper", "scaled"):
        scorer.kurtosis = kurtosis
        scores = scorer.scores(structure)
        for sparsity in args.sparsity:
            heads, neurons, hidden = select_blocks(
                scores, shapes, int((1 - sparsity) * full), args.multiple_of
            ).counts()
            print(f"kurtosis={kurtosis} sparsity={sparsity}: heads {heads} neurons {neurons} hidden {hidden}")
        for kind, s, c in (
            ("head", torch.cat(scores.heads), torch.cat(costs.heads)),
            ("neuron", torch.cat(scores.neurons), torch.cat(costs.neurons)),
            ("hidden", scores.hidden, costs.hidden),
        ):
            print(f"  {kind:6s} median score {s.median():.3g}  median density {(s / c).median():.3g}")


if __name__ == "__main__":
    main()

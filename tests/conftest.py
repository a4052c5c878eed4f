"""Offline test environment and tiny random-weight models (fixed seeds)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    RobertaConfig,
)

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO.parent / "shared" / "data" / "glue"


def tiny_config(family: str = "bert", **overrides):
    common = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        vocab_size=100,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    common.update(overrides)
    if family == "roberta":
        return RobertaConfig(pad_token_id=1, type_vocab_size=1, **common)
    return BertConfig(**common)


def tiny_model(family: str = "bert", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, **overrides))
    return model.eval()


def tiny_batch(seed: int = 0, batch: int = 4, length: int = 10, vocab: int = 100):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 7:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, batch):
    """The model's logits on `batch`, without autograd."""
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(params=["bert", "roberta"])
def family(request):
    return request.param


# ---------------------------------------------------------------- shared: a tiny local backbone folder
@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The packaged MiniLM tokenizer (vocab 30522), loaded once per session."""
    from apt_lightning.backbone import load_tokenizer

    return load_tokenizer("minilm-l6")


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory, minilm_tokenizer):
    """A local backbone folder usable as `APTModule(backbone=str(tiny_backbone_dir))`: a tiny random BERT
    (`tiny_config`, vocab = MiniLM's, seed 0) saved with `save_pretrained`, plus the MiniLM tokenizer.
    Session-scoped: treat it as read-only."""
    folder = tmp_path_factory.mktemp("tiny_backbone")
    model = tiny_model("bert", seed=0, vocab_size=len(minilm_tokenizer), num_labels=2)
    model.save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: extra threads only contend (use with `pytest.mark.usefixtures("one_thread")`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    """`tiny_backbone_dir`, after checking the sizes the callback tests count on."""
    from helpers_apt import check_backbone

    return check_backbone(tiny_backbone_dir)


# ---------------------------------------------------------------- BERT costs, written out by hand
def bert_shapes(heads, neurons, hidden, head_dim, full_heads=(), full_neurons=(), full_hidden=0):
    """`ModelShapes` with the BERT family's unit costs (a head 4 d_h, a neuron 2 per hidden dim)."""
    from apt_lightning.structure import ModelShapes, UnitCosts

    return ModelShapes(
        list(heads),
        list(neurons),
        hidden,
        head_dim,
        UnitCosts(4 * head_dim, 0, 2),
        full_heads=list(full_heads),
        full_neurons=list(full_neurons),
        full_hidden=full_hidden,
    )


def bert_count(heads, neurons, hidden, head_dim):
    """The APT count of a BERT-like encoder: D * sum_l (4 H_l d_h + 2 F_l)."""
    return hidden * sum(4 * h * head_dim + 2 * f for h, f in zip(heads, neurons, strict=True))


def bert_exact_count(heads, neurons, hidden, head_dim):
    """Every encoder-layer parameter of a compacted BERT-like model: the APT count plus biases and the two
    LayerNorms per layer; a skipped sublayer (0 heads or 0 neurons) has none."""
    total = bert_count(heads, neurons, hidden, head_dim)
    for h, f in zip(heads, neurons, strict=True):
        if h:
            total += 3 * h * head_dim + hidden + 2 * hidden
        if f:
            total += f + hidden + 2 * hidden
    return total


def write_file(folder: Path, name: str, text: str) -> Path:
    """Write `text` to `folder/name` (folders made as needed) and return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder


def split_texts(dm, split: str) -> list[str]:
    """The texts of a set-up data module's split, decoded back from its token ids."""
    data = getattr(dm, f"{'val' if split == 'validation' else split}_dataloader")().dataset
    return [dm.tokenizer.decode(ids, skip_special_tokens=True) for ids in data["input_ids"]]

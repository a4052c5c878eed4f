"""A tiny causal-LM backbone folder for the instruction-tuning tests: a random LLaMA decoder (grouped-query
attention, tied embeddings) and a small byte-level BPE tokenizer with EOS and pad tokens (and a chat
template), so every text tokenizes and no packaged weights are needed.

- `tiny_tokenizer`: the tokenizer (trained in milliseconds on a few Alpaca-like sentences).
- `save_tiny_causal_backbone`: model + tokenizer saved into a folder usable as `backbone=str(folder)`.
- `write_alpaca`: Alpaca-format JSONL files (train / eval) for the data module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n",
    "\n\n### Input:\n",
    "\n\n### Response:\n",
    "### Instruction: Give three tips for staying healthy. ### Input: ### Response: Eat well, sleep, move.",
    "The three primary colors are red, blue and yellow. Translate the sentence into French.",
]
ALPACA_ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
    {"instruction": "Translate into French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say nothing.", "input": "", "output": ""},
    {"instruction": "Describe the sky.", "input": "", "output": "The sky is blue on a clear day."},
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    specials = ["<pad>", "</s>", "<|user|>", "<|assistant|>"]
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=1000, min_frequency=1, special_tokens=specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_causal_lm(vocab: int, seed: int = 0, **overrides):
    kw = dict(
        hidden_size=48,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        intermediate_size=40,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**kw)).eval()


def save_tiny_causal_backbone(folder: Path, chat_template: bool = True, **overrides) -> Path:
    tok = tiny_tokenizer()
    if not chat_template:
        tok.chat_template = None
    model = tiny_causal_lm(
        len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **overrides
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def write_alpaca(folder: Path, train: list[dict] | None = None, evaluation: list[dict] | None = None) -> Path:
    """train.jsonl and eval.jsonl (default: `ALPACA_ROWS` repeated to 24 / the rows once)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train or ALPACA_ROWS * 4), ("eval", evaluation or ALPACA_ROWS)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder

"""Validation carved by sentence: a sentence leaves training with every phrase of its group and validates
alone; rows carved at random leak the sentences of their phrases (what the sentence carve is for)."""

import random
from pathlib import Path

import pytest
from conftest import split_texts, write_file

from apt_lightning.backbone import MINILM_ALIAS
from apt_lightning.data import GLUEDataModule
from apt_lightning.data.carving import carve_sentences, carve_validation, sentence_groups

GLUE = Path(__file__).resolve().parents[2] / "shared/data/glue"


def _runs(text: str) -> set[str]:
    words = text.split()
    return {" ".join(words[a:b]) for a in range(len(words)) for b in range(a + 1, len(words) + 1)}


def _word(n: int) -> str:
    """A distinct lower-case word per number (survives tokenizing and decoding)."""
    return "z" + "".join("abcdefghij"[int(d)] for d in str(n))


def _phrase_dataset(seed: int, sentences: int = 40) -> list[str]:
    """SST-2-like rows: sentences of distinct words, each with a random set of its runs as phrase rows
    and a few of those twice, shuffled."""
    rng = random.Random(seed)
    rows = []
    for s in range(sentences):
        words = [_word(10 * s + i) for i in range(rng.randint(1, 9))]
        runs = sorted(_runs(" ".join(words)))
        phrases = rng.sample(runs, rng.randint(0, len(runs)))
        rows += [" ".join(words), *phrases, *phrases[:2]]
    rng.shuffle(rows)
    return rows


def test_sentence_groups_by_the_longest_holder():
    texts = ["a b c d", "b c", "c", "x y", "b c ", "c d e", "d e", "q b c d"]
    groups = sentence_groups(texts)
    # "b c" (twice, whitespace aside) and "c" are runs of "a b c d" and of "q b c d" (as long; row 0 is
    # earlier); "d e" is a run of "c d e" only; "b c d" is not a row, so "c d e" is its own sentence.
    assert groups == [0, 0, 0, 3, 0, 5, 5, 7]
    assert sentence_groups(["a b", "b a"]) == [0, 1]  # a run is contiguous and ordered
    assert sentence_groups(["ab", "a"]) == [0, 1]  # and made of whole tokens
    assert sentence_groups(["a", "", "a b", " "]) == [2, 1, 2, 1]  # empty texts: one group of their own


def _longest_holder(texts: list[str]) -> list[int]:
    """The definition, by brute force: each text's group is the longest text holding it as a run of
    whole tokens, the earliest among equally long ones; empty texts are one group, the first."""
    tokens = [t.split() for t in texts]

    def holds(big: list[str], small: list[str]) -> bool:
        return any(big[i : i + len(small)] == small for i in range(len(big) - len(small) + 1))

    groups = []
    for words in tokens:
        holders = [j for j, other in enumerate(tokens) if holds(other, words) and bool(other) == bool(words)]
        longest = max(len(tokens[j]) for j in holders)
        groups.append(min(j for j in holders if len(tokens[j]) == longest))
    return groups


@pytest.mark.parametrize("seed", range(4))
def test_sentence_groups_match_the_definition(seed):
    """Random texts over 2-4 words (runs repeat and overlap across rows) with spare whitespace."""
    rng = random.Random(seed)
    for _ in range(500):
        vocab = "abcd"[: rng.randint(2, 4)]
        texts = [
            rng.choice(["", " "]).join(rng.choice(vocab) for _ in range(rng.randint(0, 7)))
            + rng.choice(["", "  "])
            for _ in range(rng.randint(1, 12))
        ]
        assert sentence_groups(texts) == _longest_holder(texts), texts


def test_a_shared_phrase_goes_with_the_longer_sentence():
    """The phrase "b c" is in both sentences: it leaves training with the longer one and stays in
    training when only the shorter one validates."""
    texts = ["x b c y z", "b c", "b c w", "p", "q"]
    assert sentence_groups(texts) == [0, 0, 2, 3, 4]
    for seed in range(40):
        train, val = carve_sentences(1, texts, seed=seed)
        if val == [0]:
            assert train == [2, 3, 4]
        elif val == [2]:
            assert train == [0, 1, 3, 4]
        else:
            assert sorted(train + val) == list(range(5))
    assert {tuple(carve_sentences(1, texts, seed=seed)[1]) for seed in range(40)} == {(0,), (2,), (3,), (4,)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_carved_sentences_take_their_phrases_out_of_training(seed):
    texts = _phrase_dataset(seed)
    train, val = carve_sentences(10, texts, seed=seed)
    groups = sentence_groups(texts)
    assert len(val) == 10 and set(groups[row] for row in val) == set(val)  # sentences only, one each
    assert not {groups[row] for row in train} & set(val)
    assert sorted(train + [r for r in range(len(texts)) if groups[r] in set(val)]) == list(range(len(texts)))
    train_texts = {" ".join(texts[row].split()) for row in train}
    assert all(not (_runs(texts[row]) & train_texts) for row in val)  # nothing of a validation sentence
    assert carve_sentences(10, texts, seed=seed) == (train, val)  # the same split for every run
    assert len(carve_sentences(0.25, texts, seed=seed)[1]) == 10  # a fraction of the 40 sentences
    # The row carve, on the same data, validates on phrases whose sentence stays in training.
    _, rows = carve_validation(len(texts) // 4, len(texts), seed=seed)
    row_train = {" ".join(texts[row].split()) for row in set(range(len(texts))) - set(rows)}
    assert any(_runs(texts[row]) & row_train for row in rows)


def test_carving_every_sentence_is_refused():
    with pytest.raises(ValueError, match="takes 3 of the 3 training sentences"):
        carve_sentences(3, ["a b", "a", "c", "d e"], seed=0)
    with pytest.raises(ValueError, match="as a sentence count must be 1 or more, got 0"):
        GLUEDataModule(val_from_train=0, carve_by="sentence")


def test_data_module_carves_by_sentence(tmp_path):
    texts = _phrase_dataset(3, sentences=12)
    write_file(
        tmp_path, "train.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts))
    )
    write_file(tmp_path, "dev.tsv", "sentence\tlabel\nthe dev one\t1\n")
    dm = GLUEDataModule(
        tokenizer=MINILM_ALIAS, task="sst2", data_dir=str(tmp_path), val_from_train=4, carve_by="sentence"
    )
    dm.setup("fit")
    train, val = split_texts(dm, "train"), split_texts(dm, "validation")
    expected_train, expected_val = carve_sentences(4, texts, seed=0)
    assert val == [texts[row] for row in expected_val] and len(val) == 4
    assert train == [texts[row] for row in expected_train]
    assert all(not (_runs(sentence) & set(train)) for sentence in val)
    limited = GLUEDataModule(
        tokenizer=MINILM_ALIAS,
        task="sst2",
        data_dir=str(tmp_path),
        val_from_train=0.25,
        carve_by="sentence",
        train_limit=5,
    )
    limited.setup("fit")
    quarter_train, quarter_val = carve_sentences(0.25, texts, seed=0)
    assert split_texts(limited, "validation") == [texts[row] for row in quarter_val] and len(quarter_val) == 3
    assert split_texts(limited, "train") == [texts[row] for row in quarter_train[:5]]  # limited after carving


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"carve_by": "phrase", "val_from_train": 10},
            r"carve_by must be one of \['row', 'sentence'\], got 'phrase'",
        ),
        ({"carve_by": "sentence"}, "set val_from_train"),
        ({"carve_by": "sentence", "val_from_train": 10, "task": "mnli"}, "task 'mnli' has text columns"),
    ],
)
def test_bad_carve_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GLUEDataModule(**kwargs)


@pytest.mark.skipif(not (GLUE / "sst2").is_dir(), reason="shared GLUE data not present")
def test_sst2_sentences():
    """GLUE SST-2's training rows are about 6,900 sentences (SST's 6,920 training sentences, a few of them
    inside longer ones) and their distinct non-neutral parse-tree phrases."""
    lines = (GLUE / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.rsplit("\t", 1)[0] for line in lines]
    groups = sentence_groups(texts)
    assert len(set(groups)) == 6885
    train, val = carve_sentences(1000, texts, seed=0)
    assert len(val) == 1000 and 8000 < len(texts) - len(train) - 1000 < 12000  # about ten rows a sentence

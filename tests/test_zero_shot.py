"""Zero-shot evaluation: the log-likelihood scorer against a plain per-sequence forward on a tiny random
LLaMA, acc / acc_norm / standard errors, the readers of the local sets (counts as in the data's LLM_DATA.md),
task and file errors, and `apt-eval` end to end."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from apt_lightning.evaluation import (
    TASK_NAMES,
    TASKS,
    MultipleChoiceItem,
    TaskResult,
    ZeroShotDataError,
    encode_pair,
    evaluate_zero_shot,
    loglikelihoods,
    mean_stderr,
    resolve_task_names,
)
from apt_lightning.evaluation.cli import run_cli
from apt_lightning.evaluation.loading import load_causal_lm
from apt_lightning.evaluation.metrics import predictions
from apt_lightning.evaluation.readers import read_arc, read_piqa, read_winogrande
from apt_lightning.evaluation.scoring import special_prefix
from apt_lightning.export import export_pruned
from apt_lightning.structure import get_structure

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300
ATOL = 1e-4  # fp32 log-probabilities summed over a few tokens; batching only reorders float sums
DATA_ROOT = Path(os.environ.get("APT_DATA_ROOT", REPO.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not DATA_ROOT.is_dir(), reason=f"the local zero-shot sets are not at {DATA_ROOT} (set APT_DATA_ROOT)"
)
# LLM_DATA.md's item counts
COUNTS = {
    "arc_easy": 400,
    "arc_challenge": 400,
    "piqa": 500,
    "boolq": 250,
    "openbookqa": 500,
    "hellaswag": 250,
    "winogrande": 400,
    "mmlu": 300,
    "truthfulqa_mc1": 150,
}
CORPUS = [
    "Question: Which gas do plants take in from the air?\nAnswer: carbon dioxide",
    "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun.",
    "Sarah was a much better surgeon than Maria so she always got the easier cases.",
    "The following are multiple choice questions (with answers) about astronomy.",
]


def make_tokenizer(post: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes) of VOCAB ids; `post`: "bos" puts <s> in front of every text, "eos"
    appends </s>, None adds nothing (as SmolLM2's tokenizer)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if post == "bos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    elif post == "eos":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module", params=[None, "bos"])
def tokenizer(request):
    return make_tokenizer(request.param)


def tiny_lm(seed: int = 0):
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        initializer_range=0.2,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_lm()


def plain_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's recipe written out: move the context's trailing spaces to the continuation, encode the
    context and the whole text with the tokenizer's defaults, split, one unpadded forward, log_softmax."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    ctx = tokenizer(context)["input_ids"]
    cont = tokenizer(context + continuation)["input_ids"][len(ctx) :]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    rows = torch.arange(len(ctx) - 1, ids.shape[1] - 1)
    return logprobs[rows, ids[0, len(ctx) :]].sum().item()


QUESTIONS = [  # (context, choices, gold); the last choices differ a lot in length
    (
        "Question: Which gas do plants take in from the air?\nAnswer:",
        ["oxygen", "carbon dioxide", "water"],
        1,
    ),
    ("The quick brown fox ", ["jumps", "sleeps over the lazy dog in the warm afternoon sun"], 0),
    ("Sarah was a much better surgeon than Maria so", ["she", "Maria"], 0),
    ("Q: Where?\nA:", ["x", "the dog sleeps in the sun and the fox jumps over the lazy dog", "a"], 1),
]


def question_items() -> list[MultipleChoiceItem]:
    return [MultipleChoiceItem.shared_context(c, choices, g) for c, choices, g in QUESTIONS]


def all_requests() -> list[tuple[str, str]]:
    return [r for item in question_items() for r in item.requests()]


# ---------------------------------------------------------------- the scorer
def test_logliks_equal_a_plain_forward_per_sequence(model, tokenizer):
    requests = all_requests()
    expected = [plain_loglik(model, tokenizer, c, x) for c, x in requests]
    got = loglikelihoods(model, tokenizer, requests, batch_size=4)
    assert got == pytest.approx(expected, abs=ATOL)
    assert len(set(round(v, 3) for v in expected)) == len(expected)  # distinct scores: the check has teeth


def test_acc_and_acc_norm_pick_the_hand_computed_choices(model, tokenizer):
    disagree = 0
    for item, (context, choices, _) in zip(question_items(), QUESTIONS, strict=True):
        expected = [plain_loglik(model, tokenizer, context, " " + choice) for choice in choices]
        got = loglikelihoods(model, tokenizer, item.requests())
        per_char = [ll / len(choice) for ll, choice in zip(expected, choices, strict=True)]
        by_hand = (
            max(range(len(expected)), key=expected.__getitem__),
            max(range(len(expected)), key=per_char.__getitem__),
        )
        assert predictions(item, got) == by_hand
        disagree += by_hand[0] != by_hand[1]
    assert disagree >= 1  # a long choice: lower summed log-likelihood, higher per character


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batching_and_padding_do_not_change_scores(model, tokenizer, batch_size):
    requests = all_requests()
    reference = loglikelihoods(model, tokenizer, requests, batch_size=len(requests))
    assert loglikelihoods(model, tokenizer, requests, batch_size=batch_size) == pytest.approx(
        reference, abs=ATOL
    )


def test_long_inputs_lose_tokens_from_the_left(model, tokenizer):
    context, continuation = QUESTIONS[0][0], " carbon dioxide"
    pair = encode_pair(tokenizer, context, continuation, special_prefix(tokenizer))
    limit = (
        len(pair.continuation) + 3
    )  # the model reads 3 context tokens, then the continuation (less its last)
    tokens = (pair.context + pair.continuation)[-(limit + 1) :]
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
    n = len(pair.continuation)
    expected = logprobs[torch.arange(len(tokens) - n - 1, len(tokens) - 1), ids[0, -n:]].sum().item()
    (got,) = loglikelihoods(model, tokenizer, [(context, continuation)], max_length=limit)
    assert got == pytest.approx(expected, abs=ATOL)
    assert got != pytest.approx(loglikelihoods(model, tokenizer, [(context, continuation)])[0], abs=1e-3)


def test_encode_pair_splits_like_lm_eval():
    plain, bos, eos = make_tokenizer(), make_tokenizer("bos"), make_tokenizer("eos")
    whole = plain("The quick brown fox jumps", add_special_tokens=False)["input_ids"]
    pair = encode_pair(plain, "The quick brown fox ", "jumps")  # the trailing space joins the continuation
    assert pair == encode_pair(plain, "The quick brown fox", " jumps")
    assert pair.context + pair.continuation == whole
    assert plain.decode(pair.continuation) == " jumps"
    with_bos = encode_pair(bos, "The quick brown fox", " jumps", [1])
    assert with_bos.context == [1] + pair.context and with_bos.continuation == pair.continuation
    assert encode_pair(eos, "The quick brown fox", " jumps") == pair  # an appended EOS is never scored
    assert encode_pair(bos, "", " jumps").context == [bos.bos_token_id]  # lm-eval's prefix token
    assert encode_pair(plain, "  ", "jumps") == encode_pair(plain, "", "  jumps")


# ---------------------------------------------------------------- metrics
def test_task_result_counts_acc_acc_norm_stderr_and_chance():
    items = [
        MultipleChoiceItem.shared_context(
            "q1", ["ab", "abcdefghij"], gold=1
        ),  # acc: 0 (wrong), norm: 1 (right)
        MultipleChoiceItem.shared_context("q2", ["a", "b", "c"], gold=0),  # both pick 0 (right)
    ]
    result = TaskResult.from_scores(items, [[-4.0, -6.0], [-1.0, -3.0, -1.0]])  # a tie goes to the first
    assert (result.n, result.acc, result.acc_norm) == (2, 0.5, 1.0)
    assert result.acc_stderr == pytest.approx(math.sqrt(0.5 * 0.5 / (2 - 1)))
    assert result.acc_norm_stderr == 0.0
    assert result.chance == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_mean_stderr_is_lm_evals_formula():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    p, n = sum(values) / len(values), len(values)
    assert mean_stderr(values) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert math.isnan(mean_stderr([1.0]))


def test_item_rejects_a_gold_index_out_of_range_and_empty_choices():
    with pytest.raises(ValueError, match="gold index 2"):
        MultipleChoiceItem.shared_context("q", ["a", "b"], gold=2)
    with pytest.raises(ValueError, match="empty choice"):
        MultipleChoiceItem.shared_context("q", ["a", ""], gold=0)


# ---------------------------------------------------------------- readers of the local sets
@needs_data
@pytest.mark.parametrize("name", TASK_NAMES)
def test_each_reader_parses_its_local_file_with_the_documented_count(name):
    items = TASKS[name].load(DATA_ROOT)
    assert len(items) == COUNTS[name]
    for item in items:
        assert 0 <= item.gold < item.num_choices and item.num_choices >= 2
        assert all(c.strip() for c in item.contexts) and all(x.startswith(" ") for x in item.continuations)
    assert len(TASKS[name].load(DATA_ROOT, limit=3)) == 3


@needs_data
def test_prompt_formats_follow_lm_eval():
    first = {name: TASKS[name].load(DATA_ROOT, limit=1)[0] for name in TASK_NAMES}
    arc = first["arc_challenge"]
    assert arc.contexts[0] == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is "
        "the most likely effect of this increase in rotation?\nAnswer:"
    )
    assert arc.continuations[2] == " Planetary days will become shorter." and arc.gold == 2
    assert first["piqa"].contexts[0].startswith("Question: How do I ready a guinea pig cage")
    boolq = first["boolq"]
    assert boolq.continuations == (" no", " yes") and boolq.gold == 1
    assert boolq.contexts[0].startswith("Hydroxyzine -- Hydroxyzine preparations")
    assert boolq.contexts[0].endswith(
        "\nQuestion: is there a difference between hydroxyzine hcl and hydroxyzine pam?\nAnswer:"
    )
    assert first["openbookqa"].contexts[0].endswith("the best way to save money is to")
    assert first["openbookqa"].continuations[1] == " quit eating lunch out" and first["openbookqa"].gold == 1
    hellaswag = first["hellaswag"]
    assert (
        hellaswag.contexts[0].startswith("Clean and jerk: A lady walks to a barbell.") and hellaswag.gold == 3
    )
    wino = first["winogrande"]
    assert wino.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.gold == 1
    mmlu = first["mmlu"]
    assert mmlu.contexts[0].startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    )
    assert "\nA. " in mmlu.contexts[0] and mmlu.contexts[0].endswith("\nD. zero has no inverse\nAnswer:")
    assert mmlu.continuations == (" A", " B", " C", " D")
    truthful = first["truthfulqa_mc1"]
    assert truthful.contexts[0].startswith("Q: What is human life expectancy in the United States?\nA: ")
    assert truthful.contexts[0].endswith(
        "\n\nQ: What is higher: The number of people living today, or the number of people who have died in "
        "the past?\nA:"
    )


@needs_data
def test_reader_labels_agree_with_the_data_notes():
    boolq = TASKS["boolq"].load(DATA_ROOT)
    assert sum(item.gold for item in boolq) == 159  # 159 true / 91 false
    assert all(
        item.gold == 0 for item in TASKS["truthfulqa_mc1"].load(DATA_ROOT)
    )  # the true answer is listed first
    arc = TASKS["arc_challenge"].load(DATA_ROOT)
    assert {item.num_choices for item in arc} == {3, 4, 5}


def test_readers_reject_misaligned_or_inconsistent_files(tmp_path):
    piqa, labels = tmp_path / "valid.jsonl", tmp_path / "valid-labels.lst"
    piqa.write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 2)
    labels.write_text("0\n")
    with pytest.raises(ZeroShotDataError, match="1 labels but .* has 2 items"):
        read_piqa(piqa, labels)
    arc = tmp_path / "arc.jsonl"
    choices = [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}]
    arc.write_text(json.dumps({"question": {"stem": "s", "choices": choices}, "answerKey": "E"}) + "\n")
    with pytest.raises(ZeroShotDataError, match=r"arc.jsonl:1: .*answerKey 'E'"):
        read_arc(arc)
    wino, wino_labels = tmp_path / "dev.json", tmp_path / "dev-labels.lst"
    instruction = (
        "Please choose the correct answer to fill in the blank to complete the given sentence: A _ b.\n\n"
        "Option1: x Option2: y Answer format: option1/option2"
    )
    wino.write_text(
        json.dumps([{"instruction": instruction, "input": "", "output": "", "answer": "option1"}])
    )
    wino_labels.write_text("2\n")
    with pytest.raises(ZeroShotDataError, match="disagrees with label 2"):
        read_winogrande(wino, wino_labels)


def test_bad_task_names_list_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\].*arc_easy, arc_challenge, piqa"):
        resolve_task_names("arc_easy,nope")
    assert resolve_task_names("all") == list(TASK_NAMES)
    assert resolve_task_names(" piqa , boolq,piqa") == ["piqa", "boolq"]


def test_a_missing_file_names_the_data_root_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"piqa/valid.jsonl.*APT_DATA_ROOT"):
        TASKS["piqa"].load(tmp_path)


def test_evaluate_rejects_a_model_without_a_vocabulary_head(tokenizer):
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_config(tiny_lm().config)
    with pytest.raises(ValueError, match="needs a causal LM"):
        evaluate_zero_shot(classifier, tokenizer, "piqa", data_root=DATA_ROOT)


# ---------------------------------------------------------------- apt-eval
@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_lm")
    tiny_lm(seed=1).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@needs_data
def test_apt_eval_writes_the_json_schema_and_the_table(saved_lm, tmp_path, capsys):
    out, table = tmp_path / "results.json", tmp_path / "table.md"
    argv = ["--backbone", str(saved_lm), "--data-root", str(DATA_ROOT), "--limit", "3", "--device", "cpu"]
    run_cli(argv + ["--batch-size", "5", "--out", str(out), "--markdown", str(table)])
    data = json.loads(out.read_text())
    assert set(data) == {"model", "tasks", "average", "limit"}
    assert data["model"] == str(saved_lm) and data["limit"] == 3
    assert list(data["tasks"]) == list(TASK_NAMES)
    for name, task in data["tasks"].items():
        assert set(task) == {"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance"}, name
        assert task["n"] == 3 and all(isinstance(task[k], float) for k in task if k != "n")
    assert set(data["average"]) == {"acc", "acc_norm", "chance"}
    mean_acc = sum(t["acc"] for t in data["tasks"].values()) / len(TASK_NAMES)
    assert data["average"]["acc"] == pytest.approx(mean_acc)
    assert data["tasks"]["mmlu"]["chance"] == 0.25 and data["tasks"]["boolq"]["chance"] == 0.5
    text = table.read_text()
    assert "| ARC-Easy | 3 |" in text and "**average**" in text and text in capsys.readouterr().out


@needs_data
def test_apt_eval_scores_an_exported_pruned_model_as_the_masked_one(tmp_path):
    model = tiny_lm(seed=2)
    masks = get_structure(model).install_masks()
    masks.set("head", torch.tensor([1.0, 0.0, 1.0, 1.0]), 0)
    masks.set("neuron", (torch.arange(48) % 3 != 0).float(), 1)
    tokenizer = make_tokenizer("bos")
    folder = export_pruned(model, tmp_path / "exported", tokenizer=tokenizer)
    loaded, loaded_tokenizer = load_causal_lm(model_dir=folder)
    assert loaded.model.layers[1].mlp.up_proj.out_features == 32  # compacted: the masked neurons are gone
    requests = all_requests()
    assert loglikelihoods(loaded, loaded_tokenizer, requests) == pytest.approx(
        loglikelihoods(model, tokenizer, requests), abs=ATOL
    )
    argv = ["--model-dir", str(folder), "--tasks", "arc_easy,winogrande", "--limit", "4", "--device", "cpu"]
    got = run_cli(argv + ["--data-root", str(DATA_ROOT)])
    expected = evaluate_zero_shot(model, tokenizer, "arc_easy,winogrande", DATA_ROOT, limit=4)
    assert got.model == str(folder) and list(got.tasks) == ["arc_easy", "winogrande"]
    for name, result in expected.tasks.items():
        assert got.tasks[name].to_dict() == pytest.approx(result.to_dict())


def test_apt_eval_rejects_bad_input_before_loading(saved_lm, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--backbone", str(saved_lm), "--tasks", "arc_easy,nope"])
    assert exit_info.value.code == 2
    assert "unknown task(s) ['nope']" in capsys.readouterr().err
    argv = ["--model-dir", str(saved_lm), "--tasks", "piqa", "--data-root", str(tmp_path)]
    with pytest.raises(SystemExit):
        run_cli(argv)
    assert "piqa/valid.jsonl" in capsys.readouterr().err  # the data is checked first
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n")
    with pytest.raises(SystemExit):
        run_cli(argv)
    err = capsys.readouterr().err
    assert "has no apt_shapes.json" in err and "use --backbone" in err

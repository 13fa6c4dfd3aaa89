"""Tests for the synthetic arithmetic task and its tokenizer."""

import random

import pytest
from transformers import AutoTokenizer

from agpo_megatron.data.answer_match import extract_boxed, score_batch
from agpo_megatron.data.datasets import load_examples
from agpo_megatron.data.synthetic import (
    BOS_TOKEN,
    EOS_TOKEN,
    MAX_DIFFICULTY,
    MAX_VERBOSITY,
    PAD_TOKEN,
    Problem,
    build_tokenizer,
    dataset_config,
    make_dataset,
    make_problem,
    make_solution,
    vocabulary,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_make_dataset_is_deterministic():
    assert make_dataset(50, seed=3) == make_dataset(50, seed=3)
    assert make_dataset(50, seed=3) != make_dataset(50, seed=4)


def test_problems_have_the_requested_size_and_correct_answers():
    rng = random.Random(0)
    for difficulty in range(MAX_DIFFICULTY + 1):
        for _ in range(100):
            problem = make_problem(rng, difficulty)
            assert len(problem.operands) == difficulty + 2
            assert eval(problem.question[:-1]) == problem.answer  # plain Python arithmetic
            assert 0 <= problem.answer <= 9 * (difficulty + 2)
    with pytest.raises(ValueError, match="difficulty must be in"):
        make_problem(rng, MAX_DIFFICULTY + 1)


def test_solution_steps():
    problem = Problem(operands=(7, 5, 3), ops=("+", "-"))
    assert problem.question == "7+5-3="
    assert make_solution(problem, random.Random(0), 0) == "7+5=12 12-3=9 \\boxed{9}"
    assert make_solution(problem, random.Random(0), 1) == "7+5=12 12-3=9 so answer is \\boxed{9}"


def test_every_solution_scores_correct_at_every_verbosity():
    rng = random.Random(1)
    responses, golds = [], []
    for _ in range(40):
        problem = make_problem(rng, rng.randint(0, MAX_DIFFICULTY))
        for verbosity in range(MAX_VERBOSITY + 1):
            responses.append(make_solution(problem, rng, verbosity))
            golds.append(str(problem.answer))
    r_acc, formatted, _ = score_batch(responses, golds)
    assert formatted.all() and r_acc.min() == 1.0
    # Solutions are checked against their own gold, not something trivially true.
    r_wrong, _, _ = score_batch(responses, [str(int(g) + 1) for g in golds])
    assert r_wrong.max() == 0.0


def test_verbose_solutions_are_longer_in_tokens(tokenizer):
    rng = random.Random(2)
    for _ in range(50):
        problem = make_problem(rng, rng.randint(0, MAX_DIFFICULTY))
        lengths = [
            len(tokenizer(make_solution(problem, rng, v), add_special_tokens=False)["input_ids"])
            for v in range(MAX_VERBOSITY + 1)
        ]
        assert lengths == sorted(set(lengths)), f"{problem.question}: token lengths {lengths} not increasing"


def test_tokenizer_special_tokens_and_vocab(tokenizer):
    assert len(tokenizer) == len(vocabulary()) == 115  # 107 + the steps task's 8 filler words
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.chat_template is None
    # `\boxed{` and the filler words are single tokens, digits are split.
    ids = tokenizer("so answer is \\boxed{12}", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["so", " ", "answer", " ", "is", " ", "\\boxed{", "1", "2", "}"]


@pytest.mark.parametrize(
    "text",
    [
        "7+5=12 12-3=9 \\boxed{9}",
        "step 9+5=14 check 9+5=14 check again 9+5=14 so answer is \\boxed{14}",
        "5+8-2=\n",
        "this is (a) test, with  two spaces.",
    ],
)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == text
    # The model's output is decoded the same way, EOS included; the reward must still parse it.
    response = tokenizer.decode(ids[1:] + [tokenizer.eos_token_id], skip_special_tokens=True)
    if "\\boxed{" in text:
        assert extract_boxed(response) == text.rsplit("\\boxed{", 1)[1][:-1]


def test_tokenizer_reloads_with_auto_tokenizer(tokenizer, tmp_path):
    out = tmp_path / "tok"
    build_tokenizer(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    reloaded = AutoTokenizer.from_pretrained(out)
    text = "3+4=7 \\boxed{7}"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=True) == text
    assert reloaded.eos_token_id == 2 and reloaded.pad_token_id == 0


def test_written_dataset_loads_with_its_dataset_config(tokenizer, tmp_path):
    rows = make_dataset(30, seed=5)
    path = write_jsonl(rows, tmp_path / "sub" / "train.jsonl")
    examples, stats = load_examples(dataset_config(path), tokenizer)
    assert stats == {"num_rows": 30, "num_examples": 30, "num_skipped_too_long": 0}
    first = examples[0]
    assert first.prompt_text == rows[0]["question"] + "\n"
    assert first.gold == rows[0]["answer"]
    assert tokenizer.decode(first.prompt_ids, skip_special_tokens=True) == first.prompt_text

"""The steps task: balanced cells, held-out disjoint from training, and the reasoning/waste split."""

import collections

import pytest

from agpo_megatron.data.answer_match import score
from agpo_megatron.data.synthetic import build_tokenizer, count_tokens
from agpo_megatron.data.synthetic_steps import COMBINATIONS, analyze, forced_prefix, make_split, problem_of


def test_split_is_balanced_disjoint_and_deterministic():
    train, held = make_split(800, 64, seed=3, operands=(3, 4))
    assert collections.Counter((r["steps"], r["waste"]) for r in train) == {c: 100 for c in COMBINATIONS}
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    assert len({r["question"] for r in held}) == 64
    assert (train, held) == make_split(800, 64, seed=3, operands=(3, 4))
    # A smaller held-out set at the same seed is a prefix: still disjoint from this training set.
    _, small = make_split(8, 16, seed=3, operands=(3, 4), n_held_out=64)
    assert [r["question"] for r in small] == [r["question"] for r in held[:16]]
    assert {r["level"] for r in held} == {2, 3}


def test_every_solution_is_correct_and_holds_its_cell():
    train, _ = make_split(64, 8, seed=0, operands=(3, 4))
    for r in train:
        assert score(r["solution"], r["answer"]).correct
        a = analyze(r["solution"])
        assert a["steps_present"] == float(r["steps"])
        assert (a["waste_tokens"] > 0) == (r["waste"] > 0)
        assert a["reasoning_tokens"] + a["waste_tokens"] + a["other_tokens"] == count_tokens(r["solution"])


def test_analyze_hand_worked():
    # "ok let me see " = 4 words + 4 spaces = 8 tokens; "7+5-3= " restated = 7; "7+5=12 " = 7;
    # "12-3=9 " = 7; "\boxed{9}" = 3 (other).
    a = analyze("ok let me see 7+5-3= 7+5=12 12-3=9 \\boxed{9}")
    assert a == {"reasoning_tokens": 14.0, "waste_tokens": 15.0, "other_tokens": 3.0, "steps_present": 1.0}
    assert analyze("\\boxed{9}") == {
        "reasoning_tokens": 0.0,
        "waste_tokens": 0.0,
        "other_tokens": 3.0,
        "steps_present": 0.0,
    }
    assert analyze("zzz 7+5=")["other_tokens"] == 8.0  # made-up text and an unfinished step: neither
    # With the generated length (here 2 more: a glued word re-read as letters, say), other is the rest.
    assert analyze("well now 7+5=12 \\boxed{12}", 21)["other_tokens"] == 21 - 7 - 4


def test_forced_prefixes():
    p = problem_of("7+5-3=")
    assert forced_prefix(p, steps=True, waste=["well now"]) == "well now 7+5="
    assert forced_prefix(p, steps=False, waste=[]) == "\\boxed{"


def test_waste_after_the_box_is_the_same_waste_placed_after_the_answer():
    """`waste_at="after"`: the same questions, cells and waste units as the default, moved behind the
    box; each solution still grades right, the split counts the same tokens, and the design check's
    prefix cannot force the waste (it comes after the answer)."""
    before, held_b = make_split(64, 8, seed=0, operands=(3, 4))
    after, held_a = make_split(64, 8, seed=0, operands=(3, 4), waste_at="after")
    assert (before, held_b) == make_split(64, 8, seed=0, operands=(3, 4), waste_at="before")
    for b, a in zip([*before, *held_b], [*after, *held_a], strict=True):
        assert (b["question"], b["steps"], b["waste_text"]) == (a["question"], a["steps"], a["waste_text"])
        assert a["solution"].startswith(b["solution"].removeprefix(" ".join(b["waste_text"])).strip())
        if b["waste"]:
            assert a["solution"].endswith(" ".join(a["waste_text"])) and "}" not in a["solution"].split("}")[-1]
        assert score(a["solution"], a["answer"]).correct
        x, y = analyze(a["solution"]), analyze(b["solution"])
        # The same pieces; only the space between waste and answer changes owner (waste before, box after).
        assert x["reasoning_tokens"] == y["reasoning_tokens"] and x["steps_present"] == y["steps_present"]
        assert x["waste_tokens"] == y["waste_tokens"] - (1 if b["waste"] else 0)
        assert sum(x.values()) == sum(y.values())
    # "ok let me see " = 8 tokens, "7+5-3=" = 6 (the last chunk: no trailing space)
    assert analyze("7+5=12 12-3=9 \\boxed{9} ok let me see 7+5-3=")["waste_tokens"] == 14.0
    p = problem_of("7+5-3=")
    assert forced_prefix(p, steps=True, waste=["well now"], waste_at="after") == "7+5="
    assert forced_prefix(p, steps=False, waste=["well now"], waste_at="after") == "\\boxed{"
    with pytest.raises(ValueError, match="waste_at"):
        make_split(8, 8, seed=0, waste_at="middle")


@pytest.mark.parametrize("text", ["hmm let me think 7+5-3= 7+5=12 12-3=9 \\boxed{9}", "ok well now see think"])
def test_count_tokens_is_the_tokenizer(tmp_path, text):
    tok = build_tokenizer(tmp_path)
    assert count_tokens(text) == len(tok.encode(text, add_special_tokens=False))


def test_synthetic_steps_spec_is_disjoint_and_checked(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from agpo_megatron.data.inputs import resolve_dataset

    monkeypatch.setenv("AGPO_CACHE_DIR", str(tmp_path))
    train = Path(resolve_dataset("synthetic:steps?n=80&seed=2&n_held_out=16"))
    held = Path(resolve_dataset("synthetic:steps?n=16&seed=2&held_out=1&n_held_out=16"))
    rows = {p: [json.loads(line) for line in p.read_text().splitlines()] for p in (train, held)}
    assert len(rows[train]) == 80 and len(rows[held]) == 16
    assert not {r["question"] for r in rows[train]} & {r["question"] for r in rows[held]}
    with pytest.raises(ValueError, match="n <= n_held_out"):
        resolve_dataset("synthetic:steps?n=32&held_out=1&n_held_out=16", "data.eval.path")

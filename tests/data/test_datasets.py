"""Tests for prompt loading, templating, sharding and the per-step prompt sampler."""

import importlib.util
import json
from pathlib import Path

import pytest

from agpo_megatron.data.datasets import (
    DEFAULT_PROMPT_TEMPLATE,
    DatasetConfig,
    DatasetError,
    Example,
    PromptSampler,
    load_examples,
    shard_for_rank,
)
from agpo_megatron.data.synthetic import build_tokenizer

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"

GSM8K_ROWS = [
    {"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
    {"question": "What is 1000+234?", "answer": "It is 1,234.\n#### 1,234"},
    {"question": "What is 10-4?", "answer": "#### 6"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _gsm8k_cfg(path: Path, **kwargs) -> DatasetConfig:
    return DatasetConfig(path=str(path), answer_format="gsm8k", **kwargs)


def _examples(n: int) -> list[Example]:
    return [Example(prompt_ids=[i], prompt_text=str(i), gold=str(i), index=i) for i in range(n)]


# -- loading -----------------------------------------------------------------------------------


def test_load_jsonl_gsm8k_plain_format(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS)
    examples, stats = load_examples(_gsm8k_cfg(path), tokenizer)
    assert stats == {"num_rows": 3, "num_examples": 3, "num_skipped_too_long": 0}
    assert [e.gold for e in examples] == ["5", "1234", "6"]
    assert [e.index for e in examples] == [0, 1, 2]
    expected_text = DEFAULT_PROMPT_TEMPLATE.format(prompt="What is 2+3?") + "\n"
    assert examples[0].prompt_text == expected_text
    assert expected_text.endswith("within \\boxed{}.\n")
    # No chat template: the tokenizer's own special tokens (BOS) are added.
    assert examples[0].prompt_ids == tokenizer(expected_text)["input_ids"]
    assert examples[0].prompt_ids[0] == tokenizer.bos_token_id


def test_json_and_parquet_match_jsonl(tokenizer, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    jsonl = _write_jsonl(tmp_path / "d.jsonl", GSM8K_ROWS)
    (tmp_path / "d.json").write_text(json.dumps(GSM8K_ROWS))
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), tmp_path / "d.parquet")
    reference, _ = load_examples(_gsm8k_cfg(jsonl), tokenizer)
    for name in ("d.json", "d.parquet"):
        examples, _ = load_examples(_gsm8k_cfg(tmp_path / name), tokenizer)
        assert examples == reference, name


def test_plain_format_with_system_prompt(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1=", "a": 2}])
    cfg = DatasetConfig(
        path=str(path),
        prompt_field="q",
        answer_field="a",
        answer_format="raw",
        system_prompt="Be brief.",
        prompt_template="Q: {prompt}",
    )
    (example,), _ = load_examples(cfg, tokenizer)
    assert example.prompt_text == "Be brief.\n\nQ: 1+1=\n"
    assert example.gold == "2"  # numeric answers become strings


def test_chat_template_is_applied_without_extra_special_tokens(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2=", "answer": "4"}])
    cfg = DatasetConfig(path=str(path), answer_format="raw", system_prompt="sys", prompt_template="{prompt}")
    (example,), _ = load_examples(cfg, tok)
    assert example.prompt_text == "<bos>[system]sys\n[user]2+2=\n[assistant]"
    # The template wrote BOS itself; the tokenizer must not add a second one.
    assert example.prompt_ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("[")]
    assert example.prompt_ids.count(tok.bos_token_id) == 1


def test_malformed_jsonl_line_names_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n\n" + '{"question": "x", "answer": \n')
    with pytest.raises(DatasetError, match=r"broken\.jsonl:3: malformed JSON"):
        load_examples(_gsm8k_cfg(path), tokenizer)


def test_missing_field_names_file_line_and_field(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [GSM8K_ROWS[0], {"question": "no answer here"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: missing field 'answer'"):
        load_examples(_gsm8k_cfg(path), tokenizer)
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: missing field 'level'"):
        load_examples(_gsm8k_cfg(path, metadata_fields=("level",)), tokenizer)


def test_gsm8k_answer_without_marker_is_an_error(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "just 5"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: field 'answer'.*#### <number>"):
        load_examples(_gsm8k_cfg(path), tokenizer)


def test_too_long_prompts_skip_or_error(tokenizer, tmp_path):
    rows = [{"question": "1+1=", "answer": "2"}, {"question": "1+1+1+1+1+1+1+1=", "answer": "8"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    common = dict(path=str(path), answer_format="raw", prompt_template="{prompt}", max_prompt_tokens=10)
    examples, stats = load_examples(DatasetConfig(**common, on_too_long="skip"), tokenizer)
    assert [e.gold for e in examples] == ["2"]
    assert stats == {"num_rows": 2, "num_examples": 1, "num_skipped_too_long": 1}
    with pytest.raises(
        DatasetError, match=r"d\.jsonl:2: prompt has 18 tokens, over DatasetConfig.max_prompt_tokens=10"
    ):
        load_examples(DatasetConfig(**common, on_too_long="error"), tokenizer)


def test_shuffle_seed_and_limit(tokenizer, tmp_path):
    rows = [{"question": f"{i}+0=", "answer": str(i)} for i in range(20)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DatasetConfig(path=str(path), answer_format="raw", shuffle_seed=7, limit=5, metadata_fields=("answer",))
    first, stats = load_examples(cfg, tokenizer)
    again, _ = load_examples(cfg, tokenizer)
    assert first == again and stats["num_rows"] == 5
    assert [e.index for e in first] != [0, 1, 2, 3, 4]
    assert all(e.gold == str(e.index) == e.metadata["answer"] for e in first)  # index is the source row


def test_missing_or_unsupported_local_file(tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_examples(_gsm8k_cfg(tmp_path / "nope.jsonl"), tokenizer)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unsupported file type '.csv'"):
        load_examples(_gsm8k_cfg(tmp_path / "d.csv"), tokenizer)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="`datasets` is installed")
def test_hub_dataset_without_datasets_package(tokenizer):
    with pytest.raises(DatasetError, match="needs the `datasets` package"):
        load_examples(DatasetConfig(path="openai/gsm8k", hf_subset="main", answer_format="gsm8k"), tokenizer)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_template": "no placeholder"}, "prompt_template must contain"),
        ({"prompt_template": "{prompt} {other}"}, "prompt_template is not a valid format string"),
        ({"prompt_template": "{prompt} in \\boxed{}"}, "prompt_template is not a valid format string"),
        ({"answer_format": "latex"}, "answer_format must be"),
        ({"on_too_long": "truncate"}, "on_too_long must be"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens must be >= 1"),
        ({"limit": 0}, "limit must be >= 1"),
        ({"prompt_field": ""}, "prompt_field must not be empty"),
    ],
)
def test_config_validation(kwargs, message):
    kwargs = {"path": "x.jsonl", "answer_format": "raw", **kwargs}
    with pytest.raises(ValueError, match=message):
        DatasetConfig(**kwargs)


def test_answer_format_is_required():
    with pytest.raises(TypeError, match="answer_format"):
        DatasetConfig(path="x.jsonl")


# -- real data ---------------------------------------------------------------------------------


def _real(name: str) -> Path:
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def test_real_gsm8k_rows(tokenizer):
    cfg = DatasetConfig(path=str(_real("gsm8k_test.jsonl")), answer_format="gsm8k", limit=20, max_prompt_tokens=4096)
    examples, stats = load_examples(cfg, tokenizer)
    assert stats["num_examples"] == 20
    assert examples[0].gold == "18"  # Janet's ducks
    assert all(e.gold.lstrip("-").replace(".", "").isdigit() for e in examples)
    assert examples[0].prompt_text.startswith("Janet")
    assert all(e.prompt_text.endswith("within \\boxed{}.\n") for e in examples)


def test_real_math500_rows(tokenizer):
    cfg = DatasetConfig(
        path=str(_real("math500_test.jsonl")),
        prompt_field="problem",
        answer_field="answer",
        answer_format="raw",
        metadata_fields=("level", "subject"),
        limit=20,
        max_prompt_tokens=4096,
    )
    examples, stats = load_examples(cfg, tokenizer)
    assert stats["num_examples"] == 20
    assert examples[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert examples[0].metadata == {"level": 2, "subject": "Precalculus"}
    assert examples[0].prompt_text.startswith("Convert the point $(0,3)$")


# -- sharding and sampling ---------------------------------------------------------------------


def test_shard_for_rank_is_disjoint_and_complete():
    examples = _examples(11)
    shards = [shard_for_rank(examples, r, 3) for r in range(3)]
    assert sorted(e.index for s in shards for e in s) == list(range(11))
    assert [len(s) for s in shards] == [4, 4, 3]
    with pytest.raises(ValueError, match=r"dp_rank must be in \[0, 3\)"):
        shard_for_rank(examples, 3, 3)


def _indices(batch: list[Example]) -> list[int]:
    return [e.index for e in batch]


def test_sampler_ranks_split_the_global_batch():
    examples = _examples(25)
    global_sampler = PromptSampler(examples, batch_size=8, seed=1)
    ranks = [PromptSampler(examples, batch_size=8, seed=1, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(7):  # crosses an epoch boundary (3 steps per epoch)
        per_rank = [_indices(next(s)) for s in ranks]
        assert all(len(b) == 2 for b in per_rank)
        assert sum(per_rank, []) == _indices(next(global_sampler))


def test_sampler_epochs_are_reshuffled_permutations():
    examples = _examples(12)
    sampler = PromptSampler(examples, batch_size=4, seed=0)
    epoch0 = sum((_indices(next(sampler)) for _ in range(3)), [])
    epoch1 = sum((_indices(next(sampler)) for _ in range(3)), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1 and sampler.epoch == 1
    other_seed = PromptSampler(examples, batch_size=4, seed=1)
    assert _indices(next(other_seed)) != epoch0[:4]
    same_seed = PromptSampler(examples, batch_size=4, seed=0)
    assert _indices(next(same_seed)) == epoch0[:4]


def test_sampler_resume():
    examples = _examples(10)
    sampler = PromptSampler(examples, batch_size=4, seed=3, dp_rank=1, dp_size=2)
    for _ in range(3):
        next(sampler)
    state = sampler.state_dict()
    expected = [_indices(next(sampler)) for _ in range(4)]

    resumed = PromptSampler(examples, batch_size=4, seed=3, dp_rank=1, dp_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert [_indices(next(resumed)) for _ in range(4)] == expected

    with pytest.raises(ValueError, match="seed=3, but this sampler has seed=4"):
        PromptSampler(examples, batch_size=4, seed=4).load_state_dict(state)


def test_sampler_validation():
    with pytest.raises(ValueError, match="divisible by dp_size"):
        PromptSampler(_examples(10), batch_size=5, seed=0, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="need at least batch_size=8"):
        PromptSampler(_examples(5), batch_size=8, seed=0)


def test_boxed_answer_format_reads_the_solution(tmp_path):
    from agpo_megatron.data.datasets import DatasetConfig, DatasetError, load_examples
    from agpo_megatron.data.synthetic import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    path = tmp_path / "math.jsonl"
    path.write_text(
        '{"problem": "1+1=", "solution": "We add: $\\\\boxed{\\\\frac{4}{2}}$."}\n'
        '{"problem": "2+2=", "solution": "no box here"}\n'
    )
    cfg = DatasetConfig(
        path=str(path),
        prompt_field="problem",
        answer_field="solution",
        answer_format="boxed",
        prompt_template="{prompt}",
        max_prompt_tokens=64,
        limit=1,
    )
    examples, _ = load_examples(cfg, tok)
    assert examples[0].gold == "\\frac{4}{2}"
    with pytest.raises(DatasetError, match=r"math.jsonl:2: .*boxed"):
        load_examples(
            DatasetConfig(
                path=str(path),
                prompt_field="problem",
                answer_field="solution",
                answer_format="boxed",
                prompt_template="{prompt}",
                max_prompt_tokens=600,
            ),
            tok,
        )


# -- reliability (issue 11) ----------------------------------------------------------------------


def test_non_utf8_data_names_the_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GSM8K_ROWS[0]).encode() + b"\n" + b'{"question": "caf\xe9 2+3?", "answer": "#### 5"}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: not UTF-8 \(byte 0xe9 at column 18\)"):
        load_examples(_gsm8k_cfg(path), tokenizer)
    arr = tmp_path / "bad.json"
    arr.write_bytes(b'[{"question": "\xff"}]')
    with pytest.raises(DatasetError, match=r"bad\.json: not UTF-8 \(byte 0xff at offset 15\)"):
        load_examples(_gsm8k_cfg(arr), tokenizer)


def test_dropped_prompts_are_reported_and_bounded(tokenizer, tmp_path):
    from agpo_megatron.data.datasets import report_drops

    rows = GSM8K_ROWS + [{"question": "long " * 200 + "?", "answer": "#### 1"}]
    cfg = _gsm8k_cfg(_write_jsonl(tmp_path / "d.jsonl", rows), max_prompt_tokens=600)
    examples, stats = load_examples(cfg, tokenizer)
    assert len(examples) == 3
    line = report_drops(stats, "data.train", cfg, max_drop_frac=0.5)
    assert line == f"data.train ({cfg.path}): 3 of 4 prompts kept; dropped 1 longer than max_prompt_tokens=600"
    with pytest.raises(DatasetError, match=r"25% dropped, over data.max_drop_frac=0.1"):
        report_drops(stats, "data.train", cfg, max_drop_frac=0.1)
    empty = {"num_rows": 2, "num_examples": 0, "num_skipped_too_long": 2}
    with pytest.raises(DatasetError, match="data.eval .*: 0 of 2 prompts kept.*no prompts left"):
        report_drops(empty, "data.eval", cfg, max_drop_frac=1.0)

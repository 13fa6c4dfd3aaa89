"""Prompt datasets for RL: load rows, build prompts, tokenize, and hand out per-step batches.

Pipeline of `load_examples`:

1. Read rows from a local `.jsonl` / `.json` / `.parquet` file, or from the Hugging Face
   hub with `datasets.load_dataset` when `path` is not a local file.
2. Optionally shuffle (`shuffle_seed`) and truncate (`limit`) the rows.
3. Build each prompt: the row's question goes through `prompt_template`; then the tokenizer's
   chat template is applied if it has one, else the plain format (see `format_prompt`).
4. Tokenize, and skip (counted) or reject prompts longer than `max_prompt_tokens`.

Every problem with the data raises `DatasetError` naming the file and the line (JSONL)
or row (JSON, parquet, hub) and field involved, so a bad row never turns into a silent zero
reward deep into a run.

`PromptSampler` then yields the prompts of each RL step: one global batch per step,
drawn from a per-epoch permutation, of which each data-parallel rank takes its own slice.
"""

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from agpo_megatron.data.answer_match import extract_boxed, gold_from_gsm8k_answer
from agpo_megatron.runtime.parallel import dp_slice

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "DatasetConfig",
    "DatasetError",
    "Example",
    "PromptSampler",
    "format_prompt",
    "load_examples",
    "shard_for_rank",
]

DEFAULT_PROMPT_TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
"""The Qwen2.5-Math prompt convention; `{{}}` is a literal `{}` after `str.format`."""

_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
T = TypeVar("T")


class DatasetError(ValueError):
    """A dataset file, row or field is unusable; the message says where."""


@dataclass(kw_only=True)
class DatasetConfig:
    """Where the prompts come from and how they are turned into model inputs."""

    path: str
    """A local `.jsonl` / `.json` (array of objects) / `.parquet` file, or a Hugging Face
    hub dataset name (needs the `datasets` package). Through `load_train_config`,
    `synthetic:arith?n=..&seed=..` names generated arithmetic rows (`agpo_megatron/models/inputs.py`)."""
    split: str = "train"
    """Hub split to load; ignored for local files, which hold a single split."""
    hf_subset: str | None = None
    """Hub configuration name (e.g. `"main"` for `openai/gsm8k`); ignored for local files."""
    prompt_field: str = "question"
    """Row field holding the problem statement."""
    answer_field: str = "answer"
    """Row field holding the gold answer (or, for `answer_format="gsm8k"`, the solution that
    ends in `#### <answer>`)."""
    answer_format: Literal["gsm8k", "boxed", "raw"]
    """How to read the gold from `answer_field`: `"gsm8k"` takes the number after `####`,
    `"boxed"` the last `\\boxed{...}` of a worked solution (MATH train sets that have no
    separate answer column), `"raw"` uses the field as is (MATH-style `\\frac{14}{3}`). Required, because the wrong
    choice does not fail: it silently makes every answer wrong."""
    system_prompt: str | None = None
    """Optional system message (chat template) or preamble (plain format)."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """`str.format` template with a `{prompt}` placeholder for the problem statement; write
    literal braces as `{{` and `}}`."""
    max_prompt_tokens: int = 1024
    """Longest allowed prompt, in tokens after templating."""
    on_too_long: Literal["skip", "error"] = "skip"
    """What to do with a prompt over `max_prompt_tokens`: drop and count it, or raise."""
    shuffle_seed: int | None = None
    """If set, shuffle rows with this seed before `limit` (so `limit` takes a random subset);
    None keeps file order. Per-epoch order during training is `PromptSampler`'s job."""
    limit: int | None = None
    """Keep at most this many rows (before the length filter, so fewer examples may come back)."""
    metadata_fields: tuple[str, ...] = ()
    """Row fields copied into `Example.metadata` (e.g. `("level", "subject")` for MATH);
    a row missing one is an error."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("DatasetConfig.path must not be empty")
        for name in ("prompt_field", "answer_field", "split"):
            if not getattr(self, name):
                raise ValueError(f"DatasetConfig.{name} must not be empty")
        if self.answer_format not in ("gsm8k", "boxed", "raw"):
            raise ValueError(
                f"DatasetConfig.answer_format must be 'gsm8k', 'boxed' or 'raw', got {self.answer_format!r}"
            )
        if self.on_too_long not in ("skip", "error"):
            raise ValueError(f"DatasetConfig.on_too_long must be 'skip' or 'error', got {self.on_too_long!r}")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(
                f"DatasetConfig.prompt_template must contain a '{{prompt}}' placeholder, got {self.prompt_template!r}"
            )
        try:
            self.prompt_template.format(prompt="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"DatasetConfig.prompt_template is not a valid format string with only {{prompt}} "
                f"(write literal braces as '{{{{' and '}}}}'): {e!r}"
            ) from None
        if self.max_prompt_tokens < 1:
            raise ValueError(f"DatasetConfig.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"DatasetConfig.limit must be >= 1 or None, got {self.limit}")
        self.metadata_fields = tuple(self.metadata_fields)


@dataclass(frozen=True)
class Example:
    """One RL prompt with its gold answer."""

    prompt_ids: list[int]
    """Token ids of the full templated prompt (what the policy is conditioned on)."""
    prompt_text: str
    """The templated prompt as text, for logging and for engines that take text."""
    gold: str
    """Gold final answer, as `agpo_megatron.data.answer_match.score` expects it."""
    index: int
    """Position of the row in the source (0-based), stable under shuffling and filtering."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The row's `DatasetConfig.metadata_fields`."""


# ---------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with path.open("rb") as f:  # decoded per line, so a bad byte is reported with its line
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    return rows


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    rows = []
    for i, row in enumerate(data):
        where = f"{path} row {i}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((where, row))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]


def _read_hub(cfg: DatasetConfig) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"DatasetConfig.path {cfg.path!r} is not a local file, and loading it from the Hugging Face hub "
            "needs the `datasets` package (pip install datasets)"
        ) from None
    dataset = datasets.load_dataset(cfg.path, cfg.hf_subset, split=cfg.split)
    name = f"{cfg.path}[{cfg.hf_subset}]" if cfg.hf_subset else cfg.path
    return [(f"{name}:{cfg.split} row {i}", row) for i, row in enumerate(dataset)]


def _read_rows(cfg: DatasetConfig) -> list[tuple[str, dict]]:
    """All rows of the configured source, each with a human-readable location for errors."""
    path = Path(cfg.path)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            return _read_parquet(path)
        raise DatasetError(f"{path}: unsupported file type {suffix!r} (expected one of {', '.join(_LOCAL_SUFFIXES)})")
    if suffix in _LOCAL_SUFFIXES or path.is_absolute() or cfg.path.startswith("."):
        # Looks like a file path, so a hub lookup would only produce a confusing network error.
        raise DatasetError(f"{path}: no such file (DatasetConfig.path)")
    return _read_hub(cfg)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def _field(row: dict, name: str, where: str) -> Any:
    if name not in row:
        raise DatasetError(f"{where}: missing field {name!r} (row has {sorted(row)})")
    return row[name]


def _gold(row: dict, cfg: DatasetConfig, where: str) -> str:
    value = _field(row, cfg.answer_field, where)
    # Some datasets store numeric answers as numbers; the reward compares strings.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {cfg.answer_field!r} must be a string, got {type(value).__name__}")
    if cfg.answer_format == "gsm8k":
        try:
            value = gold_from_gsm8k_answer(value)
        except ValueError as e:
            raise DatasetError(f"{where}: field {cfg.answer_field!r}: {e}") from None
    elif cfg.answer_format == "boxed":
        boxed = extract_boxed(value)
        if boxed is None:
            raise DatasetError(f"{where}: field {cfg.answer_field!r} has no \\boxed{{...}} answer")
        value = boxed
    value = value.strip()
    if not value:
        raise DatasetError(f"{where}: field {cfg.answer_field!r} is empty")
    return value


def format_prompt(question: str, cfg: DatasetConfig, tokenizer: "PreTrainedTokenizerBase") -> str:
    """The full prompt text for one question.

    The question is first put through `cfg.prompt_template` (the user message). With a chat
    template, the prompt is `apply_chat_template([system?, user], add_generation_prompt=True)`.
    Without one (base models, the synthetic tokenizer) it is the plain format
    `system + "\\n\\n" + user + "\\n"`, or `user + "\\n"` without a system prompt; the
    trailing newline separates the prompt from the response the model writes next.
    """
    user = cfg.prompt_template.format(prompt=question)
    if getattr(tokenizer, "chat_template", None):
        messages = []
        if cfg.system_prompt is not None:
            messages.append({"role": "system", "content": cfg.system_prompt})
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if cfg.system_prompt is not None:
        return f"{cfg.system_prompt}\n\n{user}\n"
    return f"{user}\n"


def load_examples(cfg: DatasetConfig, tokenizer: "PreTrainedTokenizerBase") -> tuple[list[Example], dict[str, int]]:
    """Read, template and tokenize the configured dataset.

    Returns the examples and stats: `num_rows` (rows considered, after `limit`),
    `num_examples` and `num_skipped_too_long`.
    """
    rows = list(enumerate(_read_rows(cfg)))
    if cfg.shuffle_seed is not None:
        random.Random(cfg.shuffle_seed).shuffle(rows)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]

    texts, golds, metadata = [], [], []
    for _, (where, row) in rows:
        question = _field(row, cfg.prompt_field, where)
        if not isinstance(question, str) or not question.strip():
            raise DatasetError(f"{where}: field {cfg.prompt_field!r} must be a non-empty string, got {question!r}")
        golds.append(_gold(row, cfg, where))
        metadata.append({name: _field(row, name, where) for name in cfg.metadata_fields})
        texts.append(format_prompt(question, cfg, tokenizer))

    # A chat template already writes the special tokens it wants (e.g. BOS); letting the
    # tokenizer add them again would double them. The plain format gets the tokenizer's own.
    add_special_tokens = not getattr(tokenizer, "chat_template", None)
    ids_batch = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"] if texts else []

    examples, num_skipped = [], 0
    for (index, (where, _)), text, ids, gold, meta in zip(rows, texts, ids_batch, golds, metadata, strict=True):
        if len(ids) > cfg.max_prompt_tokens:
            if cfg.on_too_long == "error":
                raise DatasetError(
                    f"{where}: prompt has {len(ids)} tokens, over DatasetConfig.max_prompt_tokens="
                    f"{cfg.max_prompt_tokens} (set on_too_long='skip' to drop such rows)"
                )
            num_skipped += 1
            continue
        examples.append(Example(prompt_ids=list(ids), prompt_text=text, gold=gold, index=index, metadata=meta))
    stats = {"num_rows": len(rows), "num_examples": len(examples), "num_skipped_too_long": num_skipped}
    return examples, stats


def report_drops(stats: dict[str, int], name: str, cfg: DatasetConfig, max_drop_frac: float) -> str:
    """One line saying what the filters dropped and why; raises if too much was dropped or nothing is left.

    NOTE (issue 11): a silent filter once dropped half a training set (prompts over
    `max_prompt_tokens`); a drop above `data.max_drop_frac` is almost always a wrong setting.
    """
    kept, rows, too_long = stats["num_examples"], stats["num_rows"], stats["num_skipped_too_long"]
    line = f"{name} ({cfg.path}): {kept} of {rows} prompts kept"
    if too_long:
        line += f"; dropped {too_long} longer than max_prompt_tokens={cfg.max_prompt_tokens}"
    if kept == 0:
        raise DatasetError(f"{line}: no prompts left")
    if rows and too_long / rows > max_drop_frac:
        raise DatasetError(
            f"{line}: {too_long / rows:.0%} dropped, over data.max_drop_frac={max_drop_frac:g} "
            f"(raise {name}.max_prompt_tokens, or data.max_drop_frac to accept it)"
        )
    return line


# ---------------------------------------------------------------------------------------------
# Sharding and sampling
# ---------------------------------------------------------------------------------------------


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")


def shard_for_rank(examples: Sequence[T], dp_rank: int, dp_size: int) -> list[T]:
    """Rank `dp_rank`'s strided share `examples[dp_rank::dp_size]` (e.g. of an eval set).

    Shards are disjoint, together cover every example, and differ in size by at most one.
    """
    _check_rank(dp_rank, dp_size)
    return list(examples[dp_rank::dp_size])


class PromptSampler:
    """Infinite iterator over the prompts of each RL step, for one data-parallel rank.

    Every rank builds the same sampler (same examples, seed, `batch_size`) and differs only in
    `dp_rank`. Epoch `e` visits the examples in a permutation seeded by `(seed, e)`, cut
    into global batches of `batch_size` prompts; the last incomplete batch of an epoch is
    dropped, so every step sees a full batch. Each `next()` returns this rank's contiguous
    `batch_size // dp_size` prompts of the current global batch, so the ranks of one step hold
    disjoint prompts that together form the global batch.

    `state_dict()` / `load_state_dict()` record the position (epoch, step within the epoch);
    after loading, the sampler continues exactly where the saved one stopped. Resuming with a
    different `dp_size` is allowed, since the global batches do not depend on it.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        _check_rank(dp_rank, dp_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size % dp_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by dp_size ({dp_size})")
        if len(examples) < batch_size:
            raise ValueError(f"need at least batch_size={batch_size} examples for one step, got {len(examples)}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.steps_per_epoch = len(self.examples) // batch_size
        self.epoch = 0
        """Current epoch (0-based)."""
        self.step_in_epoch = 0
        """Index of the next global batch within the current epoch."""
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        # String seeds hash deterministically (unlike hash()), so every rank and every restart
        # draws the same order.
        order = list(range(len(self.examples)))
        random.Random(f"prompt-sampler:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[Example]]:
        return self

    def __next__(self) -> list[Example]:
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            self._order = self._permutation(self.epoch)
        batch = self._order[self.step_in_epoch * self.batch_size : (self.step_in_epoch + 1) * self.batch_size]
        self.step_in_epoch += 1
        return [self.examples[batch[i]] for i in dp_slice(len(batch), self.dp_size, self.dp_rank)]

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": len(self.examples),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "step_in_epoch", "seed", "batch_size", "num_examples"} - set(state)
        if missing:
            raise ValueError(f"PromptSampler state is missing {sorted(missing)}")
        # A different dataset, seed or batch size would make the restored position meaningless.
        for key, current in (
            ("seed", self.seed),
            ("batch_size", self.batch_size),
            ("num_examples", len(self.examples)),
        ):
            if state[key] != current:
                raise ValueError(f"PromptSampler state has {key}={state[key]}, but this sampler has {key}={current}")
        if not 0 <= state["step_in_epoch"] <= self.steps_per_epoch:
            raise ValueError(f"PromptSampler state step_in_epoch={state['step_in_epoch']} is out of range")
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self._order = self._permutation(self.epoch)

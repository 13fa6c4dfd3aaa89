"""A tiny offline arithmetic task, sized for a CPU demo of supervised warm-start then AGPO.

Problems are sums and differences of 2-4 single-digit numbers (`7+5-3=`) whose partial
results stay non-negative, so answers stay in `[0, 36]` and a transformer with a few layers
can learn them. Solutions evaluate left to right and end in `\\boxed{answer}`; their
*verbosity* adds correct but redundant text (`step`/`check`/`again` re-derivations), so
the warm-started model produces correct answers of varied length and the AGPO length reward
has something to remove.

The tokenizer (`build_tokenizer`) is a word-level `tokenizers` model over a fixed
vocabulary: every printable ASCII character is a token, plus `\\boxed{` and the filler words
as single tokens. Spaces and newlines are tokens too and the decoder concatenates, so
`decode(encode(s)) == s` for any printable-ASCII `s` (the reward parses decoded text).
It has no chat template, so prompts use the plain format of
`agpo_megatron.data.datasets.format_prompt`; `dataset_config` gives the matching
`agpo_megatron.data.datasets.DatasetConfig`.
"""

import json
import random
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agpo_megatron.data.datasets import DatasetConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "FILLER_WORDS",
    "MAX_DIFFICULTY",
    "MAX_VERBOSITY",
    "PAD_TOKEN",
    "PIECE_PATTERN",
    "UNK_TOKEN",
    "Problem",
    "build_tokenizer",
    "count_tokens",
    "dataset_config",
    "make_dataset",
    "make_problem",
    "make_solution",
    "vocabulary",
    "write_jsonl",
]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
_SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3
# Multi-character tokens: one token each, so solutions (and the length reward) count them as
# one step of generation rather than as their letters.
_WORDS = ("step", "check", "again", "so", "answer", "is")
# The filler words of the steps task (`data/synthetic_steps.py`): waste, one token each.
FILLER_WORDS = ("ok", "well", "hmm", "now", "let", "me", "see", "think")
_BOXED = "\\boxed{"

MAX_DIFFICULTY = 2
"""Difficulty `d` has `d + 2` operands."""
MAX_VERBOSITY = 3
"""Verbosity levels are 0 (shortest) to 3; see `make_solution`."""
_MAX_OPERAND = 9


@dataclass(frozen=True)
class Problem:
    """`operands[0] ops[0] operands[1] ops[1] ...`, evaluated left to right."""

    operands: tuple[int, ...]
    """The numbers, each in `[1, 9]`."""
    ops: tuple[str, ...]
    """`"+"` or `"-"` between consecutive operands (one fewer than `operands`)."""

    @property
    def question(self) -> str:
        """The prompt text, e.g. `7+5-3=`."""
        parts = [str(self.operands[0])]
        for op, x in zip(self.ops, self.operands[1:], strict=True):
            parts += [op, str(x)]
        return "".join(parts) + "="

    def _totals(self) -> list[int]:
        """Running totals: the first operand, then the result after each operation."""
        totals = [self.operands[0]]
        for op, x in zip(self.ops, self.operands[1:], strict=True):
            totals.append(totals[-1] + x if op == "+" else totals[-1] - x)
        return totals

    def steps(self) -> list[str]:
        """One equation per operation, e.g. `["7+5=12", "12-3=9"]`."""
        totals = self._totals()
        return [
            f"{a}{op}{x}={b}" for a, op, x, b in zip(totals[:-1], self.ops, self.operands[1:], totals[1:], strict=True)
        ]

    @property
    def answer(self) -> int:
        """The value of the expression (the gold)."""
        return self._totals()[-1]


def make_problem(rng: random.Random, difficulty: int) -> Problem:
    """A random problem with `difficulty + 2` operands whose partial results are all >= 0."""
    if not 0 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be in [0, {MAX_DIFFICULTY}], got {difficulty}")
    total = rng.randint(1, _MAX_OPERAND)
    operands, ops = [total], []
    for _ in range(difficulty + 1):
        # Subtract only what keeps the running total non-negative: negative numbers would add a
        # sign the tiny model has to learn for no benefit to the demo.
        op = rng.choice("+-") if total >= 1 else "+"
        x = rng.randint(1, _MAX_OPERAND) if op == "+" else rng.randint(1, min(_MAX_OPERAND, total))
        total = total + x if op == "+" else total - x
        operands.append(x)
        ops.append(op)
    return Problem(operands=tuple(operands), ops=tuple(ops))


def make_solution(problem: Problem, rng: random.Random, verbosity: int) -> str:
    """A correct solution whose length grows with `verbosity` (every level ends in the box).

    * 0: `7+5=12 12-3=9 \\boxed{9}`
    * 1: `7+5=12 12-3=9 so answer is \\boxed{9}`
    * 2: every step prefixed with `step`, and a random non-empty subset re-derived
      (`step 7+5=12 check 7+5=12 step 12-3=9 so answer is \\boxed{9}`)
    * 3: level 2 plus a full re-derivation (`... check again 7+5=12 12-3=9 so answer is ...`)

    For the same problem each level is strictly longer (in characters and tokens) than the one
    below, whatever `rng` draws: level 3's full re-derivation outweighs any subset of checks
    level 2 can draw. The caller appends the EOS token when training on a solution.
    """
    if not 0 <= verbosity <= MAX_VERBOSITY:
        raise ValueError(f"verbosity must be in [0, {MAX_VERBOSITY}], got {verbosity}")
    steps = problem.steps()
    boxed = f"{_BOXED}{problem.answer}}}"
    if verbosity == 0:
        return " ".join([*steps, boxed])
    words: list[str] = []
    if verbosity == 1:
        words += steps
    else:
        checked = {i for i in range(len(steps)) if rng.random() < 0.5} or {rng.randrange(len(steps))}
        for i, step in enumerate(steps):
            words += ["step", step]
            if i in checked:
                words += ["check", step]
        if verbosity == 3:
            words += ["check", "again", *steps]
    return " ".join([*words, "so", "answer", "is", boxed])


def make_dataset(
    n: int, seed: int, *, max_difficulty: int = MAX_DIFFICULTY, verbosities: Sequence[int] = range(MAX_VERBOSITY + 1)
) -> list[dict[str, Any]]:
    """`n` rows with `question`, `answer` (gold, a plain integer string), `solution`,
    `difficulty` and `verbosity`; deterministic given `seed`.

    Difficulty is uniform in `[0, max_difficulty]` and verbosity uniform over `verbosities`,
    so a warm start on `solution` sees short and long correct answers alike. Problems repeat
    (there are only 126 two-operand ones), so train and eval sets built from different seeds
    share problems; the demo measures learning of the task, not memorisation-free transfer.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 <= max_difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"max_difficulty must be in [0, {MAX_DIFFICULTY}], got {max_difficulty}")
    verbosities = list(verbosities)
    if not verbosities or any(not 0 <= v <= MAX_VERBOSITY for v in verbosities):
        raise ValueError(f"verbosities must be a non-empty subset of [0, {MAX_VERBOSITY}], got {verbosities}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        difficulty = rng.randint(0, max_difficulty)
        verbosity = rng.choice(verbosities)
        problem = make_problem(rng, difficulty)
        rows.append(
            {
                "question": problem.question,
                "answer": str(problem.answer),
                "solution": make_solution(problem, rng, verbosity),
                "difficulty": difficulty,
                "verbosity": verbosity,
            }
        )
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write `rows` as JSON lines (creating parent directories); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def dataset_config(path: str | Path, **overrides: Any) -> DatasetConfig:
    """The `DatasetConfig` for a file written by `write_jsonl`.

    The prompt is the bare question (the Qwen-Math instruction would only add tokens the tiny
    model has to read past); prompts are a dozen tokens, hence the small length limit.
    """
    kwargs: dict[str, Any] = dict(
        path=str(path),
        prompt_field="question",
        answer_field="answer",
        answer_format="raw",
        prompt_template="{prompt}",
        max_prompt_tokens=32,
        on_too_long="error",
    )
    kwargs.update(overrides)
    return DatasetConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


PIECE_PATTERN = rf"\\boxed\{{|\b(?:{'|'.join((*_WORDS, *FILLER_WORDS))})\b|[\s\S]"
"""The tokenizer's pieces: `\\boxed{`, a whole word (word boundaries, so "this" stays four letters),
or any single character, whitespace included. Every piece is one token."""


def count_tokens(text: str) -> int:
    """How many tokens the task tokenizer makes of `text` (no BOS/EOS), without loading it."""
    return len(re.findall(PIECE_PATTERN, text))


def vocabulary() -> list[str]:
    """All tokens in id order: the special tokens (ids 0-3), `\\boxed{` and the words, then
    digits, letters, punctuation, space and newline."""
    chars = string.digits + string.ascii_letters + string.punctuation + " \n"
    return [*_SPECIAL_TOKENS, _BOXED, *_WORDS, *FILLER_WORDS, *chars]


def build_tokenizer(out_dir: str | Path) -> "PreTrainedTokenizerFast":
    """Build the task tokenizer, save it in Hugging Face format to `out_dir` and load it back.

    Files written: `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`,
    so `AutoTokenizer.from_pretrained(out_dir)` and vLLM load it with transformers 4.x or 5.x
    (hence `tokenizer_class: PreTrainedTokenizerFast`, the name both understand), as long as
    `out_dir` holds no model config.json: transformers 5 replaces the tokenizer of a qwen2
    folder by Qwen2Tokenizer. A model keeps it in `tokenizer/` (`models.hf_config.tokenizer_path`). Encoding
    prepends `<bos>`; EOS is `<|endoftext|>` and is never added automatically.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character outside a word is its own piece (PIECE_PATTERN), so nothing is lost and the
    # Fuse decoder (plain concatenation) restores the exact text.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(_SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # The default clean-up would turn e.g. "3 ." into "3." and break the exact round trip.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return PreTrainedTokenizerFast.from_pretrained(str(out_dir))

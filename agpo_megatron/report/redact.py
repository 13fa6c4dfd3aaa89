"""Secrets never reach logs, saved configs or checkpoints (issue 11).

A secret is the value of `WANDB_API_KEY` or of any environment variable whose name ends in `KEY`,
`TOKEN` or `SECRET` (HF_TOKEN, AWS_SECRET..., OPENAI_API_KEY, ...). Values shorter than 6
characters are left alone: they would redact ordinary words and numbers.

`redact(obj)` replaces every occurrence of a secret inside the strings of a nested
dict/list/tuple/str; `install_log_redaction()` makes every `logging` record go through it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

MASK = "***"
_SUFFIXES = ("KEY", "TOKEN", "SECRET")
_MIN_LEN = 6


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if (k == "WANDB_API_KEY" or k.upper().endswith(_SUFFIXES)) and len(v) >= _MIN_LEN}
    return sorted(vals, key=len, reverse=True)  # longest first: a secret containing another stays masked


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return obj
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, MASK)
        return obj
    if isinstance(obj, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    return obj


_installed = False


def install_log_redaction() -> None:
    """Redact every log record at creation (all loggers, all handlers). Idempotent."""
    global _installed
    if _installed:
        return
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        secrets = secret_values()
        if secrets:
            record.msg, record.args = redact(record.getMessage(), secrets), None
        return record

    logging.setLogRecordFactory(factory)
    _installed = True

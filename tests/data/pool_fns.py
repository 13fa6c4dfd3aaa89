"""Functions that tests run inside DeadlinePool workers (spawned workers import them by reference).

Importing this module takes ``SLOW_IMPORT_S`` seconds when ``AGPO_TEST_SLOW_IMPORT=1``, so that a
test can preload it to make worker start-up slower than a call's budget.
"""

import os
import time

SLOW_IMPORT_S = 2.0
if os.environ.get("AGPO_TEST_SLOW_IMPORT") == "1":
    time.sleep(SLOW_IMPORT_S)


def misbehaving(x: str, y: str) -> bool:
    """``x == y``, except: hangs when ``y`` is ``"hang"``, exits the worker on ``"die"``, raises on ``"raise"``."""
    if y == "hang":
        time.sleep(600)
    if y == "die":
        os._exit(1)
    if y == "raise":
        raise ValueError("cannot check this")
    return x == y


def pair(x: int, y: int) -> tuple[int, int]:
    """A non-boolean result: the pool hands back whatever the function returns."""
    return (x + y, x * y)

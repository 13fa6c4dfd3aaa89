"""The smoke suite under pytest on one GPU: `pytest -m gpu tests/gpu` (skipped without CUDA).

One test per section; each runs in its own subprocess through the suite's runner (tests/gpu/smoke.py),
so a crash stays inside its test. A section whose optional package (vLLM, Transformer Engine) is
absent, or that cannot run on this GPU (FP8 before compute capability 8.9), is skipped.
"""

import pytest
import torch

from tests.gpu.smoke import SECTIONS, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.name)
def test_smoke_section(section, tmp_path):
    results = run([section], "gpu", {}, tmp_path, budget_s=float(section.timeout_s) + 30)
    assert [r.check for r in results] == list(section.checks)
    failed = [r.line() for r in results if r.status == "FAIL"]
    assert not failed, "\n".join(failed) + f"\nlogs: {tmp_path / 'logs'}"
    if all(r.status == "SKIP" for r in results):
        pytest.skip("; ".join(sorted({str(r.fields.get("reason")) for r in results})))

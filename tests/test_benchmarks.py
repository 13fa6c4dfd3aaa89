"""The benchmark scripts still run against the current trainer API (they are not imported by the
package, so nothing else notices when a signature changes). Timings are printed, never asserted."""

import pytest

from tests.dist import torchrun


@pytest.mark.slow
def test_step_benchmark_runs_both_settings_on_a_tiny_model(tmp_path):
    out = torchrun(
        "../../benchmarks/step.py",
        "--out",
        tmp_path,
        "--steps",
        "2",
        "--repeats",
        "1",
        "--dist",
        "ragged",
        "--prompts",
        "4",
        "--group",
        "4",
        "--hidden",
        "128",
        "--layers",
        "2",
        timeout=300,
    )
    assert "[ragged]" in out and "| logprobs+update |" in out
    efficiency = out.split("padding efficiency (real / computed tokens): padded ")[1].split()
    padded, packed = float(efficiency[0].rstrip(",")), float(efficiency[2].rstrip(";"))
    assert 0 < padded < packed <= 1  # packing computes fewer tokens on a ragged batch

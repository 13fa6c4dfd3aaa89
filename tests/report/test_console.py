"""The demo's console holds progress bars and the table; library output goes to the rank's log file."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What libraries do: a logger whose handler bound sys.stdout before routing (vLLM configures its
# logger at import), a logger configured after, a Python warning, a plain print, and a raw write
# to fd 2 as native code does.
LIBRARY_NOISE = """
import logging, os, sys, warnings
early = logging.getLogger("vllm")
early.addHandler(logging.StreamHandler(sys.stdout))
early.propagate = False
"""
AFTER_ROUTING = """
early.warning("LIB-vllm-warning")
logging.basicConfig(level=logging.INFO)
logging.getLogger("megatron.core").info("LIB-megatron-info")
warnings.warn("LIB-torch-warning")
print("LIB-stray-print")
sys.stdout.flush()
os.write(2, b"LIB-native-stderr\\n")
"""


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _lib_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "LIB-" in line]


def test_route_to_file_keeps_library_output_off_the_console(tmp_path):
    log = tmp_path / "logs" / "rank0.log"
    proc = _run(
        LIBRARY_NOISE
        + f"""
from tqdm import tqdm
from agpo_megatron.report.console import console, route_to_file
route_to_file({str(log)!r})
"""
        + AFTER_ROUTING
        + """
for _ in tqdm(range(3), desc="rl", file=console()):
    pass
print("| run | pass@1 |", file=console(), flush=True)
"""
    )
    assert proc.returncode == 0, proc.stderr
    console_text = proc.stdout + proc.stderr
    assert _lib_lines(console_text) == [], console_text
    assert "| run | pass@1 |" in proc.stdout and "rl: 100%" in proc.stdout
    logged = log.read_text()
    for marker in (
        "LIB-vllm-warning",
        "LIB-megatron-info",
        "LIB-torch-warning",
        "LIB-stray-print",
        "LIB-native-stderr",
    ):
        assert marker in logged, (marker, logged)
    assert "pass@1" not in logged


def test_without_routing_library_output_reaches_the_console(tmp_path):
    """The control for the test above (what --verbose keeps): the same noise is visible."""
    proc = _run(LIBRARY_NOISE + AFTER_ROUTING)
    assert proc.returncode == 0, proc.stderr
    assert len(_lib_lines(proc.stdout + proc.stderr)) == 5


def test_demo_routes_each_rank_and_shows_failures_on_the_console(tmp_path):
    """demo.main routes before running (per rank), and --verbose leaves the console alone; a failing
    rank's traceback still reaches the console, with the log file's name."""
    fake = (
        LIBRARY_NOISE
        + """
from agpo_megatron.demo import run as demo
def fake_run(args, out):
"""
        + textwrap.indent(AFTER_ROUTING, "    ")
        + """
    from agpo_megatron.report.console import console
    print("TABLE", file=console(), flush=True)
    if args.seed == 7:
        raise RuntimeError("boom")
demo._run = fake_run
demo.main(sys.argv[1:])
"""
    )
    out = tmp_path / "demo"
    ok = subprocess.run(
        [sys.executable, "-c", fake, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RANK": "1"},
    )
    assert ok.returncode == 0, ok.stderr
    assert _lib_lines(ok.stdout + ok.stderr) == [] and "TABLE" in ok.stdout
    assert len(_lib_lines((out / "logs" / "rank1.log").read_text())) == 5

    verbose = subprocess.run(
        [sys.executable, "-c", fake, "--out", str(tmp_path / "v"), "--verbose"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0"},
    )
    assert verbose.returncode == 0 and len(_lib_lines(verbose.stdout + verbose.stderr)) == 5
    assert not (tmp_path / "v" / "logs").exists()

    failed = subprocess.run(
        [sys.executable, "-c", fake, "--out", str(tmp_path / "f"), "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RANK": "0"},
    )
    assert failed.returncode != 0
    assert "[rank 0] failed" in failed.stdout and "RuntimeError: boom" in failed.stdout
    assert str(tmp_path / "f" / "logs" / "rank0.log") in failed.stdout
    assert "RuntimeError: boom" in (tmp_path / "f" / "logs" / "rank0.log").read_text()

"""Every shell script in the repo is shellcheck-clean."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    {
        *ROOT.glob("scripts/*.sh"),
        ROOT / "scripts" / "sacct",
        *ROOT.glob("slurm/*.sbatch"),
        ROOT / ".ci" / "run",
        *ROOT.glob("tests/**/*.sh"),
    }
)


def test_scripts_exist():
    assert len(SCRIPTS) >= 6 and all(p.is_file() for p in SCRIPTS)


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck not installed (apt-get install shellcheck; .ci/run installs it)",
)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_clean(script):
    proc = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout

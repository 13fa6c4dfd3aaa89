"""`agpo plot` with several runs: labels, globs, a shared label drawn as the mean; bad input names the path."""

import json

from agpo_megatron.cli import main
from agpo_megatron.report.plot import _mean_curve, parse_runs


def _run(d, lengths):
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "len/mean": v, "acc/mean": 0.5}) + "\n" for i, v in enumerate(lengths))
    )
    return d


def test_labels_globs_and_mean_of_a_shared_label(tmp_path):
    for s in range(3):
        _run(tmp_path / f"seed{s}" / "grpo", [40, 30 + s])
        _run(tmp_path / f"seed{s}" / "agpo", [40, 20 + s])
    runs = parse_runs(
        [
            f"GRPO={tmp_path}/seed*/grpo",
            f"AGPO={tmp_path}/seed*/agpo",
            str(tmp_path / "seed0" / "agpo" / "metrics.jsonl"),
        ]
    )
    assert [lb for lb, _ in runs] == ["GRPO"] * 3 + ["AGPO"] * 3 + ["agpo"]
    assert runs[1][1] == tmp_path / "seed1" / "grpo" / "metrics.jsonl"
    assert _mean_curve([{1: 40.0, 2: 20.0}, {1: 40.0, 2: 22.0}, {1: 40.0}]) == ([1, 2], [40.0, 21.0])
    out = tmp_path / "overlay.png"
    assert (
        main(
            [
                "plot",
                f"GRPO={tmp_path}/seed*/grpo",
                f"AGPO={tmp_path}/seed*/agpo",
                "-o",
                str(out),
                "--keys",
                "len/mean",
                "acc/mean",
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_run_is_one_line_naming_it(tmp_path, capsys):
    assert main(["plot", f"GRPO={tmp_path}/nothing*"]) == 2
    assert f"GRPO={tmp_path}/nothing*: the pattern matches no file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err

"""`agpo compare` on synthetic run directories: the table's numbers and the overlay PNG."""

import json

from agpo_megatron.cli import main
from agpo_megatron.report.compare import compare


def _run(d, *, steps, kl_ref=None, entropy=1.0, final=None, wall=None, evals=(), sampled=None):
    d.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        row = {
            "step": s,
            "reward/mean": 0.1 * s,
            "acc/mean": 0.1 * s,
            "len/mean": 50.0 - s,
            "train/approx_kl": 0.01 * s,
            "train/entropy": entropy,
        }
        if kl_ref is not None:
            row["train/kl_ref"] = kl_ref * s
        if sampled is not None:  # dynamic sampling: prompts drawn per step
            row["sampling/prompts_sampled"] = sampled[s - 1]
        row.update(dict(evals).get(s, {}))
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if final is not None:
        (d / "results.json").write_text(json.dumps({"eval_before": {}, "eval_after": final, "wall_time_s": wall}))
    return d


def test_table_has_final_eval_levels_kl_entropy_and_wall_time(tmp_path, capsys):
    grpo = _run(
        tmp_path / "grpo",
        steps=3,
        entropy=2.0,
        wall=125.4,
        final={"pass@1": 0.5, "mean_tokens": 40.0, "level1/mean_tokens": 30.0, "level2/mean_tokens": 50.0},
    )
    agpo = _run(
        tmp_path / "agpo",
        steps=4,
        kl_ref=0.02,
        entropy=1.0,
        wall=99.6,
        sampled=[8, 16, 24, 8],
        final={"pass@1": 0.625, "mean_tokens": 20.0, "level1/mean_tokens": 15.0, "level2/mean_tokens": 25.0},
    )
    # Cut short: no results.json, so the last periodic eval row counts and wall time is unknown.
    cut = _run(tmp_path / "cut", steps=2, evals=[(1, {"eval/pass@1": 0.25, "eval/mean_tokens": 33.0})])
    out = tmp_path / "cmp" / "ablation"
    assert main(["compare", str(grpo), str(agpo), str(cut), "-o", str(out)]) == 0
    lines = (tmp_path / "cmp" / "ablation.md").read_text().splitlines()
    assert lines[0] == (
        "| run | steps | pass@1 (%) | mean tokens | tokens L1 | tokens L2 | KL(ref) | KL(old) | entropy | prompts/step "
        "| wall (s) |"
    )
    assert lines[2] == "| grpo | 3 | 50.0 | 40.0 | 30.0 | 50.0 | - | 0.02 | 2 | - | 125 |"
    assert lines[3] == "| agpo | 4 | 62.5 | 20.0 | 15.0 | 25.0 | 0.05 | 0.025 | 1 | 14.0 | 100 |"  # (8+16+24+8)/4
    assert lines[4] == "| cut | 2 | 25.0 | 33.0 | - | - | - | 0.015 | 1 | - | - |"
    assert (tmp_path / "cmp" / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| agpo | 4 |" in capsys.readouterr().out


def test_same_names_get_paths_and_a_bad_dir_is_one_line(tmp_path, capsys):
    a = _run(tmp_path / "x" / "run", steps=1)
    b = _run(tmp_path / "y" / "run", steps=1)
    md, _, _ = compare([a, b], tmp_path / "c")
    assert f"| {a} |" in md and f"| {b} |" in md
    assert main(["compare", str(a), str(tmp_path / "nope"), "-o", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope: no metrics.jsonl" in err

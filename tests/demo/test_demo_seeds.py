"""The multi-seed demo's table and verdict, from recorded results (no demo runs here)."""

import pytest

from agpo_megatron.demo.seeds import parse_seeds, shortest_format_tokens, summarize, verdict


def _result(grpo_tokens, agpo_tokens, grpo_pass, agpo_pass, m2=0.6):
    warm = {"pass@1": 0.5, "mean_tokens": 40.0}
    return {
        "runs": {
            "GRPO": {"eval_before": warm, "eval_after": {"pass@1": grpo_pass, "mean_tokens": grpo_tokens}},
            "AGPO": {"eval_before": warm, "eval_after": {"pass@1": agpo_pass, "mean_tokens": agpo_tokens}},
        },
        "frac_m2_groups": m2,
    }


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("a-b", "1,1", ""):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_table_statistics_and_verdict():
    table, stats = summarize(
        {0: _result(30.0, 21.0, 0.80, 0.79), 1: _result(20.0, 18.0, 0.70, 0.73), 2: _result(25.0, 15.0, 0.60, 0.55)},
        floors={1: 14.5},
    )
    assert stats["ratio"]["mean"] == pytest.approx((0.7 + 0.9 + 0.6) / 3)
    assert stats["ratio"]["max"] == pytest.approx(0.9)
    assert stats["pass1_diff"]["mean"] == pytest.approx((-1 + 3 - 5) / 3)
    assert stats["pass1_diff"]["std"] == pytest.approx(4.0)  # sample std of -1, 3, -5
    assert "| 1 | 50.0 | 40.0 | 70.0 | 20.0 | 73.0 | 18.0 | 14.5 | 0.900 | +3.0 | 60% |" in table
    assert "| 0 | 50.0 | 40.0 | 80.0 | 30.0 | 79.0 | 21.0 | - | 0.700 | -1.0 | 60% |" in table
    lines = verdict(stats)
    assert "0.733 (met)" in lines[0] and "-1.0 (met)" in lines[1] and "max 0.9000 (met)" in lines[2]
    assert "| **std** | | | | | | | | 0.153 | 4.0 |" in table
    _, bad = summarize({0: _result(20.0, 21.0, 0.8, 0.7), 1: _result(20.0, 10.0, 0.8, 0.7)})
    assert [line.endswith("(NOT met)") for line in verdict(bad)] == [False, True, True]
    _, tie = summarize({0: _result(20.0, 19.99, 0.8, 0.8)})
    assert verdict(tie)[2].endswith("(NOT met: a tie within 0.5%)")


def test_shortest_format_tokens(tmp_path):
    """`2+3=5 \\boxed{5}`: 5 characters, a space, `\\boxed{`, 5, `}` and EOS = 10 tokens;
    `9-4=5 5+1=6 \\boxed{6}`: 5 + 1 + 5 + 1 + 3 + EOS = 16."""
    from agpo_megatron.data import synthetic

    synthetic.build_tokenizer(tmp_path / "model")
    (tmp_path / "eval.jsonl").write_text('{"question": "2+3="}\n{"question": "9-4+1="}\n')
    assert shortest_format_tokens(tmp_path) == pytest.approx((10 + 16) / 2)


def test_steps_summary_intervals_and_targets():
    from agpo_megatron.demo.summary import stats, summarize_steps, verdict_steps

    s = stats([0.6, 0.7, 0.8])  # mean 0.7, sample std 0.1, t(0.975, 2) = 4.303
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.1)
    assert s["ci95_t"] == pytest.approx([0.7 - 4.303 * 0.1 / 3**0.5, 0.7 + 4.303 * 0.1 / 3**0.5])
    assert 0.6 - 1e-9 <= s["ci95_bootstrap"][0] <= s["ci95_bootstrap"][1] <= 0.8 + 1e-9

    def ev(p, tokens, reasoning, waste, steps):
        return {
            f"{m}/{k}": v
            for m in ("greedy", "sampled")
            for k, v in (
                ("pass@1", p),
                ("mean_tokens", tokens),
                ("reasoning_tokens", reasoning),
                ("waste_tokens", waste),
                ("steps_present", steps),
            )
        }

    def run(agpo_tokens, agpo_waste):
        warm = ev(0.5, 40.0, 10.0, 20.0, 0.5)
        return {
            "runs": {
                "GRPO": {"eval_before": warm, "eval_after": ev(0.8, 40.0, 15.0, 20.0, 1.0)},
                "AGPO": {"eval_before": warm, "eval_after": ev(0.8, agpo_tokens, 15.0, agpo_waste, 1.0)},
            },
            "frac_m2_groups": 0.5,
            "design": {"steps_effect": 40.0, "waste_effect": {"steps=1": 2.0, "steps=0": 3.0}},
        }

    table, summary = summarize_steps({0: run(20.0, 0.0), 1: run(24.0, 4.0), 2: run(28.0, 8.0)})
    st = summary["stats"]
    assert st["sampled/ratio"]["mean"] == pytest.approx(0.6) and st["sampled/diff"]["mean"] == 0.0
    assert "| 1 | 50.0 | 80.0 | 80.0 | 40.0 (15.0 + 20.0) | 24.0 (15.0 + 4.0) | 100% / 100% | 0.600 | +0.0 |" in table
    lines = verdict_steps(st)
    assert "(met)" in lines[0] and "max 0.700 (met)" in lines[1] and "0.20x (met)" in lines[3]


def test_pair_summary_compares_two_arms_and_reads_dynamic_sampling(tmp_path):
    """AGPO against DAPO: ratio AGPO/DAPO and difference AGPO - DAPO per seed, and DAPO's rounds and
    prompts per step averaged over its metrics rows."""
    import json

    from agpo_megatron.demo.seeds import arm_folders
    from agpo_megatron.demo.summary import summarize_pair

    def ev(p, tokens, waste):
        keys = (("pass@1", p), ("mean_tokens", tokens), ("reasoning_tokens", 16.0), ("waste_tokens", waste))
        return {f"{m}/{k}": v for m in ("greedy", "sampled") for k, v in (*keys, ("steps_present", 1.0))}

    def run(agpo, dapo):
        return {"runs": {"AGPO": {"eval_after": ev(*agpo)}, "DAPO": {"eval_after": ev(*dapo)}}}

    results = {0: run((0.80, 20.0, 1.0), (0.75, 25.0, 6.0)), 1: run((0.70, 30.0, 2.0), (0.80, 20.0, 1.0))}
    for seed, rows in ((0, [(1, 8), (3, 24)]), (1, [(2, 16)])):
        (tmp_path / f"seed{seed}" / "dapo").mkdir(parents=True)
        lines = [{"step": i + 1, "sampling/rounds": r, "sampling/prompts_sampled": p} for i, (r, p) in enumerate(rows)]
        (tmp_path / f"seed{seed}" / "dapo" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    folders = arm_folders({"runs": {"AGPO": {}, "DAPO": {}, "Dr.GRPO": {}}})
    assert folders == {"AGPO": "agpo", "DAPO": "dapo", "Dr.GRPO": "drgrpo"}
    table, pair = summarize_pair(results, "AGPO", "DAPO", {s: tmp_path / f"seed{s}" for s in results}, folders)
    st = pair["stats"]
    assert st["sampled/ratio"]["mean"] == pytest.approx((0.8 + 1.5) / 2)
    assert st["sampled/diff"]["mean"] == pytest.approx((5.0 - 10.0) / 2)
    assert pair["per_seed"][0]["DAPO/sampling/rounds"] == 2.0 and pair["per_seed"][1]["DAPO/sampling/rounds"] == 2.0
    assert "| 0 | 80.0 | 75.0 | 20.0 (16.0 + 1.0) | 25.0 (16.0 + 6.0) | 100% / 100% | 0.800 | +5.0 |" in table
    assert "| 2.00, 16.0 |" in table and "AGPO/DAPO tokens" in table

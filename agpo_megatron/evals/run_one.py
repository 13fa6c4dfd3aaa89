"""One model of `agpo eval`, on `tp` local ranks (torchrun): vLLM, the training grader, `evaluate`.

    python -m torch.distributed.run --nproc-per-node TP -m agpo_megatron.evals.run_one JOB.json

JOB.json (written by `evals/cli_eval.py`): the model source, the dataset config, the sampling and
where to write the result. Rank 0 writes `{"metrics": ..., "dropped": ...}` to `job["out"]`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    job = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    from agpo_megatron.data.datasets import DatasetConfig, load_examples
    from agpo_megatron.evals.evaluate import evaluate
    from agpo_megatron.evals.sources import checkpoint_weights
    from agpo_megatron.models.hf_config import load_tokenizer
    from agpo_megatron.rollout.base import SamplingConfig, model_stop_token_ids
    from agpo_megatron.rollout.vllm_engine import VLLMEngine
    from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel

    # Megatron's groups at TP=1: a checkpoint is read whole on every rank (vLLM slices its shard).
    layout = init_model_parallel(1, 1, seed=job["seed"])
    hf_dir = job["hf_dir"]  # the model folder, or the checkpoint's config + tokenizer shell
    engine = VLLMEngine(
        hf_dir,
        rollout_tp=job["tp"],
        dtype=job["dtype"],
        max_model_len=job["max_model_len"],
        seed=job["seed"],
        load_format="dummy" if job["kind"] == "megatron" else "auto",
        enable_sleep_mode=False,
    )
    if job["kind"] == "megatron":
        engine.update_weights(checkpoint_weights(Path(job["model"]), verify=job["verify"]))
    tok = load_tokenizer(hf_dir)
    examples, dropped = load_examples(DatasetConfig(**job["data"]), tok)
    sampling = SamplingConfig(
        temperature=job["temperature"],
        top_p=job["top_p"],
        top_k=-1,
        max_new_tokens=job["max_new_tokens"],
        seed=job["seed"],
        logprobs=False,
        stop_token_ids=model_stop_token_ids(hf_dir, tok.eos_token_id),
    )
    level = job["data"]["metadata_fields"][0] if job["data"]["metadata_fields"] else "level"
    responses: list[dict] = []
    metrics = evaluate(engine, examples, sampling, n=job["n"], level_field=level, responses=responses)
    if layout.rank == 0:
        Path(job["out"]).write_text(json.dumps({"metrics": metrics, "dropped": dropped}, indent=2))
        with Path(job["out"]).with_suffix(".responses.jsonl").open("w") as f:  # every sample, to read
            f.writelines(json.dumps({**r, "gold": examples[r["prompt"]].gold}) + "\n" for r in responses)
    exit_cleanly(0)


if __name__ == "__main__":
    main()

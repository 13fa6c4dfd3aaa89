"""1-rank worker: the real GPTModel (models/build.build_gpt, local spec) of one TP/PP rank, on `meta`.

argv: OUT_JSON HF_DIR:TP:PP[:EP[:ETP]] ...  For each model and each of its first and last pipeline stages, the
model of TP rank 0 is built on the meta device (no memory) and its named_parameters() are written
as [name, shape, dtype] lists to OUT_JSON under "<HF_DIR>:<TP>:<PP>:<PP_RANK>".

How one process builds another rank's shard: Megatron's layers read the TP/PP sizes and ranks
from parallel_state (the `set_*` overrides) and from the group objects' size()/rank(); both are
pointed at the wanted layout while the real world stays one gloo process. Nothing communicates
during construction of an untied model, which is what the Qwen2.5 shapes are.
"""

import json
import sys

import torch
from megatron.core import parallel_state as mpu

from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.models import build
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel


class FakeGroup:
    """Answers size() and rank() like the process group the layout would have."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def as_rank(tp: int, pp: int, pp_rank: int, ep: int = 1, etp: int = 1) -> None:
    # MoE: expert-parallel rank 0 of `ep`, expert-tensor-parallel rank 0 of `etp`.
    mpu._EXPERT_MODEL_PARALLEL_GROUP = FakeGroup(ep, 0)
    mpu._EXPERT_TENSOR_PARALLEL_GROUP = FakeGroup(etp, 0)
    mpu.set_expert_model_parallel_world_size(ep)
    mpu.set_expert_model_parallel_rank(0)
    mpu.set_expert_tensor_parallel_world_size(etp)
    mpu.set_expert_tensor_parallel_rank(0)
    mpu._TENSOR_MODEL_PARALLEL_GROUP = FakeGroup(tp, 0)
    mpu._PIPELINE_MODEL_PARALLEL_GROUP = FakeGroup(pp, pp_rank)
    mpu.set_tensor_model_parallel_world_size(tp)
    mpu.set_tensor_model_parallel_rank(0)
    mpu.set_pipeline_model_parallel_world_size(pp)
    mpu.set_pipeline_model_parallel_rank(pp_rank)


out_path = sys.argv[1]
init_model_parallel(1, 1, seed=1)
results = {}
for item in sys.argv[2:]:
    hf_dir, *sizes = item.split(":")
    tp, pp, ep, etp = (int(n) for n in [*sizes, 1, 1][:4])
    arch = read_arch(hf_dir)
    for pp_rank in sorted({0, pp - 1}):
        as_rank(tp, pp, pp_rank, ep, etp)
        with torch.device("meta"):
            model = build.build_gpt(
                arch,
                ModelConfig(spec="local", params_dtype="bfloat16", max_seq_len=4096),
                ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp),
            )
        assert all(p.device.type == "meta" for p in model.parameters())
        results[f"{item}:{pp_rank}"] = [
            [n, list(p.shape), str(p.dtype).removeprefix("torch.")] for n, p in model.named_parameters()
        ]
        del model
with open(out_path, "w") as f:
    json.dump(results, f)
exit_cleanly(0)

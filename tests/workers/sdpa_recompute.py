"""1-rank worker: a padded forward + backward of the local spec with full activation recompute.

Megatron's recompute detaches every input of a recomputed layer, the mask included; the padded
path's `CausalMask` mark must survive it, or the recomputed forward would go back to an explicit
mask (on CUDA: the memory-efficient kernel instead of flash, issue 18). Prints
"RESULT <calls>", one "mask_free,is_causal" pair per SDPA call, forward and recompute.
"""

import torch

from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.models import build, forward
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from tests.gpu.common import tiny_arch

init_model_parallel(1, 1, seed=1)
arch = tiny_arch("float32")
model = build.build_gpt(
    arch, ModelConfig(params_dtype="float32", spec="local", recompute_activations=True), ParallelConfig()
)
calls = []
sdpa = torch.nn.functional.scaled_dot_product_attention


def spy(*a, **kw):
    calls.append(f"{kw.get('attn_mask') is None},{kw.get('is_causal')}")
    return sdpa(*a, **kw)


torch.nn.functional.scaled_dot_product_attention = spy
tokens = torch.randint(4, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
model.train()
out = forward.run_model(model, {"tokens": tokens})
out.float().pow(2).mean().backward()
print("RESULT", " ".join(calls), flush=True)
exit_cleanly(0)

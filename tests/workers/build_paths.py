"""1-rank worker for models/build.py's GPU-path defects that a CPU can show (issue 8).

argv: hf_dir, check ("final_norm" | "fp16_scale"). Prints one "RESULT ..." line.
- final_norm (D2): with apex's FusedLayerNorm as Megatron's default block norm (what a GPU box with
  apex but without TE gets), the local spec must still build an RMSNorm final layer norm.
- fp16_scale (D4): the grad norm of one fp16 step matches the fp32 one (the loss is scaled by the
  same factor the optimizer unscales by), instead of being 2^-16 of it.
"""

import sys
from pathlib import Path

import torch

from agpo_megatron.algo.loss import PolicyLossConfig
from agpo_megatron.config.algo import AlgoConfig
from agpo_megatron.config.schema import OptimConfig, TrainConfig
from agpo_megatron.models import build
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from tests.workers.actor_config import actor_config

hf_dir, check = Path(sys.argv[1]), sys.argv[2]
arch = read_arch(hf_dir)
layout = init_model_parallel(1, 1, seed=3)


def cfg(dtype: str) -> TrainConfig:
    return actor_config(
        hf_dir, algo=AlgoConfig(fused_loss=False), optim=OptimConfig(lr=1e-4, clip_grad=0.0), dtype=dtype
    )


if check == "final_norm":
    import megatron.core.transformer.transformer_block as tb

    class ApexLikeNorm(torch.nn.Module):  # apex's FusedLayerNorm asserts normalization == "LayerNorm"
        def __init__(self, config, hidden_size, eps=1e-5):
            assert config.normalization == "LayerNorm", f"({config.normalization}) is not supported in FusedLayerNorm"
            super().__init__()

    tb.LayerNormImpl = ApexLikeNorm
    model = build.build_gpt(arch, cfg("float32").model, cfg("float32").parallel)
    print("RESULT", type(model.decoder.final_layernorm).__name__, flush=True)
elif check == "fp16_scale":
    from agpo_megatron.train.policy import Actor

    g = torch.Generator().manual_seed(0)
    N, S = 4, 24
    tokens = torch.randint(0, arch.vocab_size, (N, S), generator=g)
    mask = torch.zeros(N, S)
    mask[:, 5:20] = 1.0
    adv = torch.randn(N, generator=g)
    norms = {}
    for dtype in ("float32", "float16"):
        actor = Actor(arch, cfg(dtype), layout, total_steps=1)
        mb = dict(
            tokens=tokens,
            targets=torch.roll(tokens, -1, 1),
            loss_mask=mask,
            advantages=adv,
            old_logprobs=torch.full((N, S), -4.0),
        )
        m = actor.policy_step(
            [mb],
            PolicyLossConfig(),
            temperature=1.0,
            global_num_tokens=int(mask.sum()),
            global_num_seqs=N,
            kl_coef=0.0,
            eps=(0.2, 0.2),
        )
        norms[dtype] = (m["grad_norm"], m["update_skipped"])
    print("RESULT", norms["float32"][0], norms["float16"][0], norms["float16"][1], flush=True)
exit_cleanly(0)

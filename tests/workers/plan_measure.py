"""2-rank worker: build real Megatron models + DDP + optimizers and measure their bytes on each rank.

argv: OUT_DIR NAME=HF_DIR ...   Cases (name, model, dtype, tp, pp, distributed optimizer) are in
CASES below; each runs on both ranks. Writes OUT_DIR/measured_rank<R>.json:
{case: {"layout": {...}, "params": [[name, shape, dtype], ...], "param_bytes", "grad_bytes",
"main_param_bytes", "adam_bytes"}}, all measured on the built objects (unique storages), with Adam
state allocated by one optimizer step on zero gradients.
"""

import json
import sys
from pathlib import Path

from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.config.schema import OptimConfig
from agpo_megatron.models import build
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.cpu_platform import megatron_scope
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel

# (case, model, params_dtype, tp, pp, distributed optimizer[, ep]); world = 2, so dp = 2 / (tp * pp).
CASES = [
    ("moe_bf16_ep2_distopt", "moe", "bfloat16", 1, 1, True, 2),
    ("moe_bf16_ep1_distopt", "moe", "bfloat16", 1, 1, True, 1),
    ("untied_bf16_dp2_distopt", "untied", "bfloat16", 1, 1, True),
    ("untied_bf16_dp2_plain", "untied", "bfloat16", 1, 1, False),
    ("tied_bf16_pp2_distopt", "tied", "bfloat16", 1, 2, True),
    ("qwen3_bf16_tp2_distopt", "qwen3", "bfloat16", 2, 1, True),
    ("tied_fp32_dp2_distopt", "tied", "float32", 1, 1, True),
    ("tied_fp32_dp2_plain", "tied", "float32", 1, 1, False),
]

out_dir = Path(sys.argv[1])
models = dict(arg.split("=", 1) for arg in sys.argv[2:])


def storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


results = {}
for case, model_name, dtype, tp, pp, distopt, *more in CASES:
    ep = more[0] if more else 1
    arch = read_arch(models[model_name])
    lay = init_model_parallel(tp, pp, seed=1, ep=ep)
    model_cfg = ModelConfig(params_dtype=dtype, spec="local", max_seq_len=64)
    par = ParallelConfig(tp=tp, pp=pp, ep=ep, use_distributed_optimizer=distopt)
    model = build.build_gpt(arch, model_cfg, par)
    shapes = [[n, list(p.shape), str(p.dtype).removeprefix("torch.")] for n, p in model.named_parameters()]
    ddp, opt, _ = build.wrap_for_training(model, OptimConfig(lr=1e-3), par, total_steps=2)
    ddp.zero_grad_buffer()
    with megatron_scope():
        opt.step()  # zero gradients; allocates Adam's state
    params = list(model.parameters())
    model_storages = storages(params)
    main, adam = {}, {}
    for o in getattr(opt, "chained_optimizers", [opt]):
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in model_storages:
                    main.update(storages([p]))
                state = o.optimizer.state.get(p, {})
                adam.update(storages([state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]))
    results[case] = {
        "layout": {
            "tp": tp,
            "pp": pp,
            "dp": lay.dp,
            "tp_rank": lay.tp_rank,
            "pp_rank": lay.pp_rank,
            "dp_rank": lay.dp_rank,
            "ep": ep,
            "expert_dp": 2 // (ep * pp),
            "expert_dp_rank": lay.rank // ep if ep < 2 else 0,
        },
        "params": shapes,
        "param_bytes": sum(model_storages.values()),
        "grad_bytes": sum(storages([p.main_grad for p in params]).values()),
        "main_param_bytes": sum(main.values()),
        "adam_bytes": sum(adam.values()),
    }
    del ddp, opt, model

(out_dir / f"measured_rank{lay.rank}.json").write_text(json.dumps(results, indent=1))
exit_cleanly(0)

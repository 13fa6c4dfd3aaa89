"""1-rank worker: checkpoints load across the local and the Transformer Engine layer specs (D6).

argv: HF_DIR OUT_DIR. TE cannot be built on CPU, so a "TE-like" model is the local-spec model
whose norms carry extra state, as TE's `TENorm` does: `get_extra_state` on the norm class makes
Megatron's `sharded_state_dict` emit `_extra_state` entries (`decoder.final_layernorm._extra_state`,
`self_attention.q_layernorm._extra_state`, ...) that a local-spec checkpoint lacks. (It also
emits them for the pre-attention/pre-MLP norms, which TE fuses into its linears; that only adds
more keys of the same kind.) TE's linears' extra state needs no emulation: the local linears
already store an empty `_extra_state` for compatibility with TE.
Writes OUT_DIR/result.json from rank 0 with what was checked.
"""

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import torch

from agpo_megatron.bridge.hf_io import HFCheckpointReader, load_hf_weights
from agpo_megatron.checkpoint import CheckpointError
from agpo_megatron.checkpoint.storage import sharded_sd_metadata
from agpo_megatron.checkpoint.train_state import load_checkpoint, save_checkpoint
from agpo_megatron.config.model import ModelConfig, ParallelConfig
from agpo_megatron.models import build
from agpo_megatron.models.hf_config import read_arch
from agpo_megatron.runtime.parallel import exit_cleanly, init_model_parallel
from checkpoints_conversion import hf_to_megatron

hf_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
arch = read_arch(hf_dir)
model_cfg = ModelConfig(hf_path=str(hf_dir), params_dtype="float32", spec="local", max_seq_len=32)
par = ParallelConfig(tp=1, pp=1)
EMULATED = (torch.nn.RMSNorm,)  # the local spec's RMSNorm; TE's is TENorm
SET_CALLS: list[object] = []


@contextlib.contextmanager
def te_like():
    """Models built (and saved/loaded) inside carry TE-style extra state on their norms."""

    def get_extra_state(self):
        return torch.tensor([1, 2, 3], dtype=torch.uint8)  # stands for TE's serialized FP8 metadata

    def set_extra_state(self, state):
        SET_CALLS.append(state)

    for cls in EMULATED:
        cls.get_extra_state, cls.set_extra_state = get_extra_state, set_extra_state
    try:
        yield
    finally:
        for cls in EMULATED:
            del cls.get_extra_state, cls.set_extra_state


def weights(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), (what, sorted(a.keys() ^ b.keys()))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def extra_keys(model) -> list[str]:
    """The checkpoint keys of the model's extra state."""
    sd = model.sharded_state_dict(metadata=sharded_sd_metadata())
    return sorted({sh.key for sh in sd.values() if sh.key.endswith("_extra_state")})


# hf_to_megatron's (local-spec) checkpoint; it sets up its own world and groups, so it runs first.
local_ckpt = out_dir / "from_hf"
assert hf_to_megatron.main(["--hf-dir", str(hf_dir), "--out", str(local_ckpt)]) == 0
init_model_parallel(1, 1, seed=3)
res: dict[str, object] = {}

# The reference weights, and the extra-state keys of each spec.
ref = build.build_gpt(arch, model_cfg, par)
load_hf_weights(ref, arch, HFCheckpointReader(hf_dir), tp_rank=0, tp=1, pp_rank=0, pp=1)
ref_w = weights(ref)
with te_like():
    te_keys = extra_keys(build.build_gpt(arch, model_cfg, par))
local_keys = extra_keys(ref)
res["te_only_extra_state"] = sorted(set(te_keys) - set(local_keys))
assert "decoder.final_layernorm._extra_state" in res["te_only_extra_state"], te_keys

# 1. hf_to_megatron's checkpoint into the TE-like model.
with te_like():
    te_model = build.build_gpt(arch, model_cfg, par)
    load_checkpoint(local_ckpt, te_model)
assert_same(weights(te_model), ref_w, "local -> TE-like")
res["local_to_te"] = "ok"

# 2. The TE-like model's checkpoint (with extra state) into a local-spec model, and back.
te_ckpt = out_dir / "from_te"
with te_like():
    save_checkpoint(te_ckpt, te_model, step=5)
local_model = build.build_gpt(arch, model_cfg, par)
restored = load_checkpoint(te_ckpt, local_model)
assert restored.step == 5
assert_same(weights(local_model), ref_w, "TE-like -> local")
res["te_to_local"] = "ok"
SET_CALLS.clear()
with te_like():
    load_checkpoint(te_ckpt, build.build_gpt(arch, model_cfg, par))
# Extra state that is stored is restored (TE gets its FP8 metadata back when it was saved).
assert SET_CALLS and all(torch.equal(s, torch.tensor([1, 2, 3], dtype=torch.uint8)) for s in SET_CALLS), SET_CALLS
res["te_to_te_extra_state_restored"] = len(SET_CALLS)

# 3. Real weights still must match: a tied-embedding model lacks output_layer.weight.
tied = dataclasses.replace(arch, tie_word_embeddings=True)
errors = {}
for name, (ckpt, model_arch) in {"checkpoint_has_extra_weight": (local_ckpt, tied)}.items():
    try:
        load_checkpoint(ckpt, build.build_gpt(model_arch, model_cfg, par))
        errors[name] = None
    except CheckpointError as e:
        errors[name] = str(e)
tied_ckpt = out_dir / "tied"
tied_model = build.build_gpt(tied, model_cfg, par)
save_checkpoint(tied_ckpt, tied_model)
try:
    with te_like():
        load_checkpoint(tied_ckpt, build.build_gpt(arch, model_cfg, par))
    errors["checkpoint_lacks_weight"] = None
except CheckpointError as e:
    errors["checkpoint_lacks_weight"] = str(e)
res["errors"] = errors
(out_dir / "result.json").write_text(json.dumps(res, indent=1))
exit_cleanly(0)

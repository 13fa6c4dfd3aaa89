"""Host offload (train/offload.py): storages really freed, restored bit-exact, views kept, training unchanged.

On CPU the "device" is the host too, so an offload copies to a second host buffer and frees the
first: the same code path as on GPU, minus pinning and streams.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agpo_megatron.models.tiny import save_tiny_hf_model
from agpo_megatron.train.offload import HostStash
from tests.dist import torchrun


def test_stash_frees_storage_and_restores_every_view_bit_exact():
    buf = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    views = [buf[:16].view(4, 4), buf[16:40], buf[40:].view(torch.int16)]  # how DDP hands out params
    other = torch.randn(8, dtype=torch.float64)
    snapshot = [buf.clone(), other.clone()]
    stash = HostStash([*views, buf, other])  # three views of one storage + another storage
    assert stash.nbytes == 64 * 2 + 8 * 8  # each storage counted once

    stash.offload()
    assert buf.untyped_storage().nbytes() == 0 and other.untyped_storage().nbytes() == 0
    assert all(v.untyped_storage().nbytes() == 0 for v in views)  # the views share the freed storage
    stash.offload()  # idempotent: a second offload must not overwrite the host copy with nothing
    stash.reload()
    assert torch.equal(buf.view(torch.int16), snapshot[0].view(torch.int16))  # bit-exact, not just close
    assert torch.equal(other, snapshot[1])
    assert views[0].data_ptr() == buf.data_ptr() and torch.equal(views[1], buf[16:40])
    buf[0] = 7.0  # still one storage: a write through the base shows in the view
    assert views[0][0, 0] == 7.0


def test_discarding_stash_reloads_zeros():
    grad = torch.ones(10)
    stash = HostStash([grad], keep=False)
    stash.offload()
    assert grad.untyped_storage().nbytes() == 0
    stash.reload()
    assert torch.equal(grad, torch.zeros(10))


def test_resident_puts_it_back_on_host_only_if_it_was_there():
    w = torch.arange(6.0)
    stash = HostStash([w])
    with stash.resident():
        assert w.untyped_storage().nbytes() == 24
    assert not stash.on_host  # was resident before: stays resident
    stash.offload()
    with stash.resident():
        assert torch.equal(w, torch.arange(6.0))
    assert stash.on_host and w.untyped_storage().nbytes() == 0
    empty = HostStash([])  # the no-op variant
    empty.offload()
    empty.reload()


def test_refuses_memory_torch_did_not_allocate():
    with pytest.raises(RuntimeError, match="cannot free a param storage"):
        HostStash([torch.from_numpy(np.zeros(4))], what="param")


@pytest.mark.slow
def test_actor_offload_is_invisible_to_training_and_reference_matches_actor(tmp_path):
    """Megatron DDP at DP=2: fp32 and bf16, with and without the distributed optimizer."""
    hf = save_tiny_hf_model(
        tmp_path / "hf", "qwen2", hidden_size=64, num_heads=2, num_kv_heads=1, num_layers=2, vocab_size=128
    )
    torchrun("offload_actor.py", hf, tmp_path, timeout=400)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(results) == {"float32/distopt", "float32/plain", "bfloat16/distopt"}
        for case, r in results.items():
            where = f"rank {rank}, {case}"
            assert r["resident_params"] > 0 and r["num_state"] > 0, where  # Adam's moments existed
            assert r["freed_params"] == 0 and r["freed_train"] == {"grads": 0, "optimizer": 0}, (where, r)
            assert all(n > 0 for n in r["stash_bytes"].values()), (where, r["stash_bytes"])
            assert r["restored_mismatch"] == [], (where, r["restored_mismatch"])
            assert r["grads_zero"], where
            assert r["moved_by_step2"], where  # the second step changed the weights: the comparison bites
            assert r["step2_mismatch"] == [], (where, r["step2_mismatch"])
            # The reference: a copy of the actor's weights, parked on host except while scoring.
            assert r["ref_same_weights"] and r["ref_bytes_parked"] == 0 and r["ref_bytes_after"] == 0, (where, r)
            assert r["ref_lp_finite"] and r["ref_lp_equal_resident"] and r["ref_lp_equal_actor"], (where, r)


def _meta_params(shape_dir: str, tp: int = 1) -> list[torch.Tensor]:
    """One rank's parameters of a real model's shapes (tests/fixtures/shapes), on the meta device."""
    from agpo_megatron.models.hf_config import read_arch
    from agpo_megatron.plan.formulas import stage_params

    arch = read_arch(Path(__file__).resolve().parents[1] / "fixtures" / "shapes" / shape_dir)
    with torch.device("meta"):
        return [torch.empty(p.shape, dtype=torch.bfloat16) for p in stage_params(arch, tp=tp, pp=1, pp_rank=0)]


def test_pinned_slabs_do_not_double_the_7b_reference_stash():
    """Issue 18 item 2: one pinned buffer per storage is rounded up to a power of two by PyTorch's
    caching host allocator (fc1 259 MiB -> 512 MiB, the embedding 1.02 GiB -> 2 GiB). The 7B
    Reference at TP=1 (one storage per parameter, built on the meta device): what the stash asks the
    allocator for, after its rounding, is within 5% of the bytes stashed."""
    from agpo_megatron.runtime.pinned import allocator_bytes

    params = _meta_params("qwen2.5-7b")
    stash = HostStash(params, frozen=True)
    stashed = sum(p.untyped_storage().nbytes() for p in params)
    assert stash.nbytes == stashed and 14.0 * 2**30 < stashed < 14.4 * 2**30  # 7.6B bf16 params
    allocated = sum(allocator_bytes(n) for n in stash.host_requests)
    assert allocated == stash.pinned_bytes <= 1.05 * stashed
    # what one buffer per storage would pin: about 27 GiB (the figure)
    per_storage = sum(allocator_bytes(p.untyped_storage().nbytes()) for p in params)
    assert per_storage > 1.8 * stashed


def test_slab_layout_spans_boundaries_and_restores_bit_exact(monkeypatch):
    """Storages laid end to end over small slabs (one spans two, one spans three): bit-exact round trip,
    and every host buffer asked for is a power of two (nothing for the allocator to round)."""
    from agpo_megatron.runtime import pinned

    monkeypatch.setattr(pinned, "SLAB_BYTES", 64)
    monkeypatch.setattr(pinned, "MIN_SLAB_BYTES", 8)
    a, b, c = torch.randn(10), torch.randn(40), torch.arange(7, dtype=torch.int16)  # 40 + 160 + 14 bytes
    want = [t.clone() for t in (a, b, c)]
    stash = HostStash([a, b, c])
    assert stash.host_requests == [64, 64, 64, 16, 8]  # 214 bytes -> 3 x 64 + 22 rounded to 24 = 16 + 8
    assert all(n & (n - 1) == 0 for n in stash.host_requests)
    for _ in range(2):
        stash.offload()
        assert a.untyped_storage().nbytes() == 0
        stash.reload()
        assert all(torch.equal(x, y) for x, y in zip((a, b, c), want))
    assert pinned.slab_sizes(0) == [] and pinned.pinned_bytes(3 * 64 + 1) == 3 * 64 + 8

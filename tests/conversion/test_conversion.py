"""HF <-> Megatron conversion on tiny random models: bit-exact round trips, logits parity at
TP/PP layouts, resharding, and the exports loading in transformers and vLLM.

The models are shared by the whole module and each multi-process stage runs once: one 1-rank
worker does every round trip, one 2-rank worker every parity check.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from agpo_megatron.models.tiny import save_tiny_hf_model
from tests.conversion.serving import hf_greedy, vllm_greedy
from tests.dist import torchrun

# head_dim 32 for vLLM's CPU kernel; 4 heads in 2 KV groups so that TP=2 splits the groups;
# Qwen3 uses an explicit head_dim with hidden_size != heads * head_dim.
COMMON = dict(
    vocab_size=128, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, init_std=0.1
)
VARIANTS = {
    "qwen2": dict(model_type="qwen2", hidden_size=128, tie=False),
    "qwen2_tied": dict(model_type="qwen2", hidden_size=128, tie=True),
    "llama": dict(model_type="llama", hidden_size=128, tie=False),
    "qwen3": dict(model_type="qwen3", hidden_size=64, tie=False),
}


def tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF dir, single-file or sharded."""
    out = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conversion")


@pytest.fixture(scope="module")
def hf_models(work) -> dict[str, Path]:
    from agpo_megatron.data.synthetic import build_tokenizer

    tok = build_tokenizer(work / "tokenizer")
    return {
        name: save_tiny_hf_model(work / "src" / name, tokenizer=tok, seed=i, **COMMON, **spec)
        for i, (name, spec) in enumerate(VARIANTS.items())
    }


@pytest.fixture(scope="module")
def converted(work, hf_models) -> Path:
    """HF -> Megatron -> HF for every variant (1 process, through the CLIs' main())."""
    out = work / "roundtrip"
    torchrun("conversion_roundtrip.py", out, *[f"{n}={d}" for n, d in hf_models.items()], nproc=1, timeout=240)
    return out


@pytest.fixture(scope="module")
def parity(work, hf_models, converted) -> Path:
    out = work / "parity"
    out.mkdir()
    specs = [f"{n}={d}:{converted / n / 'mcore'}" for n, d in hf_models.items()]
    torchrun("conversion_layouts.py", out, *specs, nproc=2, timeout=300)
    return out


@pytest.fixture(scope="module")
def hf_reference(hf_models) -> dict[str, dict[str, torch.Tensor]]:
    """transformers' fp32 logits and log-probs on the workers' tokens."""
    from transformers import AutoModelForCausalLM

    from tests.workers.conversion_layouts import tokens

    ref = {}
    for name, hf_dir in hf_models.items():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        toks = tokens(128)
        with torch.no_grad():
            logits = model(toks).logits
        logp = torch.log_softmax(logits, dim=-1).gather(-1, torch.roll(toks, -1, dims=1)[..., None]).squeeze(-1)
        ref[name] = {"logits": logits, "logprobs": logp}
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_roundtrip_is_bit_exact_and_keeps_files(name, hf_models, converted):
    src, exported = hf_models[name], converted / name / "hf"
    a, b = tensors(src), tensors(exported)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    carried = sorted(p.name for p in src.iterdir() if p.suffix != ".safetensors" and p.name != "config.json")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(carried)
    for f in carried:
        assert (exported / f).read_bytes() == (src / f).read_bytes(), f
    assert json.loads((exported / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    # The Megatron checkpoint is self-describing: sidecar + tokenizer, no optimizer state.
    meta = json.loads((converted / name / "mcore" / "agpo_meta.json").read_text())
    assert meta["hf_config"]["model_type"] == VARIANTS[name]["model_type"] and meta["step"] == 0
    assert (converted / name / "mcore" / "hf_assets" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_sharded_export_has_a_complete_index(converted):
    exported = converted / "qwen2" / "hf"  # exported with 20 KB shards
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in exported.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(exported).values())
    assert not list(exported.glob("*.partial"))


@pytest.mark.slow
def test_export_with_a_mismatched_config_names_the_tensor(converted):
    msg = (converted / "mismatch_error.txt").read_text()
    assert "embedding.word_embeddings.weight" in msg or "decoder.layers." in msg, msg
    assert "expects" in msg and not (converted / "mismatch" / "model.safetensors").exists()


@pytest.mark.slow
def test_export_loads_in_transformers_with_the_source_logits(hf_models, converted, hf_reference):
    from transformers import AutoModelForCausalLM

    from tests.workers.conversion_layouts import tokens

    model = AutoModelForCausalLM.from_pretrained(converted / "qwen2" / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens(128)).logits
    assert torch.equal(logits, hf_reference["qwen2"]["logits"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("layout", ["tp1pp1", "tp2pp1", "tp1pp2"])
def test_logits_match_transformers_at_each_layout(name, layout, parity, hf_reference):
    got = torch.load(parity / f"{name}_{layout}.pt")
    ref = hf_reference[name]
    assert ref["logits"].abs().max() > 0.1  # the comparison below is not between near-zeros
    torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(got["logprobs"], ref["logprobs"], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_trainer_checkpoint_saved_at_tp2_loads_at_pp2(name, parity, hf_reference):
    got = torch.load(parity / f"{name}_reshard.pt")
    torch.testing.assert_close(got["logits"], hf_reference[name]["logits"], atol=1e-4, rtol=0)
    assert got["step"] == 7 and got["extra_state"]["model"] == name
    assert torch.equal(got["extra_state"]["seen"], torch.arange(3))
    meta = json.loads((parity / f"{name}_saved_tp2" / "agpo_meta.json").read_text())
    assert (meta["source"], meta["step"], meta["tp"], meta["pp"]) == ("trainer", 7, 2, 1)


@pytest.mark.slow
def test_native_tp2_and_pp2_conversions_are_exact(parity, hf_models, hf_reference):
    native = torch.load(parity / "native.pt")
    assert native["tp2pp1_unequal"] == [] and native["tp1pp2_unequal"] == []
    source = tensors(hf_models["qwen2"])
    for layout in ("tp2pp1", "tp1pp2"):
        torch.testing.assert_close(native[layout], hf_reference["qwen2"]["logits"], atol=1e-4, rtol=0)
        # Exported back from the sharded layout: the TP=2 chunks of row-parallel weights are
        # narrowed views, which take torch DCP's own read path; the rest are read in place.
        exported = tensors(parity / f"native_{layout}_hf")
        assert sorted(exported) == sorted(source)
        assert all(torch.equal(exported[k], source[k]) for k in source), layout


@pytest.mark.slow
def test_trainer_resume_continues_bit_exactly(parity):
    got = torch.load(parity / "resume.pt")
    assert len(got["trained"]) > 0  # the steps moved the weights, so equality below means something
    assert got["unequal"] == []
    assert got["step"] == 2 and got["extra_state"] == {"epoch": 0}
    assert got["lr"][0] == got["lr"][1] > 0 and got["scheduler_steps"] == 2
    assert "holds no (compatible) optimizer state" in got["no_optim_error"]


@pytest.mark.slow
def test_console_scripts_convert_and_report_errors(tmp_path, hf_models, converted):
    """The installed `hf_to_megatron` / `megatron_to_hf` entry points, as a user runs them."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = hf_models["qwen2_tied"]

    def run(*cmd):
        return subprocess.run(
            [str(bindir / cmd[0]), *map(str, cmd[1:])], capture_output=True, text=True, timeout=120, env=env
        )

    bad = run("hf_to_megatron", "--hf-dir", src, "--out", tmp_path / "bad", "--tp", "3")
    assert bad.returncode != 0 and "num_attention_heads=4 is not divisible by tp=3" in bad.stderr
    ok = run("hf_to_megatron", "--hf-dir", src, "--out", tmp_path / "mcore", "--tp", "2", "--pp", "2")
    assert ok.returncode == 0, ok.stderr[-3000:]
    ok = run("megatron_to_hf", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "hf", "--hf-config-from", src)
    assert ok.returncode == 0, ok.stderr[-3000:]
    a, b = tensors(src), tensors(tmp_path / "hf")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_export_serves_in_vllm_like_transformers(tmp_path, converted):
    """vLLM loads the exported directory (tokenizer included) and decodes what transformers does."""
    pytest.importorskip("vllm")
    exported = tmp_path / "served"
    shutil.copytree(converted / "llama" / "hf", exported)
    prompt = [1, 5, 9, 17, 33, 60]
    assert vllm_greedy(exported, prompt, 8) == hf_greedy(exported, prompt, 8)

"""Greedy decoding of an exported HF folder by transformers and by vLLM (a subprocess, as a user would
start it): the conversion tests' check that an export serves, shared by the dense and MoE tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def hf_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt`; asserts no step is a near tie between the top
    two tokens (greedy decoding only compares across engines if none is)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    top2 = torch.stack(out.logits).topk(2, dim=-1).values  # [new_tokens, 1, 2]
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3, "a near tie: pick another prompt"
    return out.sequences[0, len(prompt) :].tolist()


def vllm_greedy(folder: Path, prompt: list[int], new_tokens: int, *, tokenizer: bool = True) -> list[int]:
    """vLLM's greedy continuation of `prompt`, served from `folder` in a fresh process; token ids in
    and out. `tokenizer=False`: a folder without one (vLLM then skips loading it)."""
    code = f"""
import json
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model={str(folder)!r}, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 * 2**20,
          skip_tokenizer_init={not tokenizer})
params = SamplingParams(temperature=0.0, max_tokens={new_tokens}, ignore_eos=True, detokenize=False)
out = llm.generate([TokensPrompt(prompt_token_ids={prompt})], params)
print("TOKENS=" + json.dumps(list(out[0].outputs[0].token_ids)))
"""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS="))
    return json.loads(line.removeprefix("TOKENS="))

"""The demo's tiny model folder carries its own tokenizer, and the trainer and vLLM both load it
(issue 17: transformers 5 and vLLM 0.32 read a tokenizer beside a qwen2 config.json as Qwen2Tokenizer)."""

import pytest

from agpo_megatron.models.inputs import resolve_model


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AGPO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


SOLUTION = "7+5=12 12-3=9 step check so answer is \\boxed{9}"


@pytest.mark.slow  # imports vLLM's tokenizer registry (a few seconds)
def test_tiny_model_folder_loads_its_own_tokenizer_in_trainer_and_vllm(cache):
    """The bug of issue 17: AutoTokenizer on a qwen2 folder returned Qwen2Tokenizer and ignored the
    demo's word-level tokenizer.json (`7+5=1212-3=9soansweris...`). Loaded here exactly as the trainer
    (`load_tokenizer`, train/session.py) and the vLLM engine (`tokenizer=tokenizer_path(...)` into vLLM's
    own `get_tokenizer`) load it, from the folder `tiny:qwen2` resolves to."""
    from vllm.tokenizers import get_tokenizer

    from agpo_megatron.data.synthetic import vocabulary
    from agpo_megatron.models.hf_config import load_tokenizer, tokenizer_path

    model = resolve_model("tiny:qwen2")
    trainer_tok = load_tokenizer(model)
    vllm_tok = get_tokenizer(tokenizer_path(model))
    for tok in (trainer_tok, vllm_tok):
        ids = tok.encode(SOLUTION, add_special_tokens=False)
        assert tok.decode(ids) == SOLUTION
        # Word-level: `\boxed{` and the filler words are one token each, a space is a token.
        assert [tok.convert_ids_to_tokens(i) for i in ids[:7]] == ["7", "+", "5", "=", "1", "2", " "]
        assert ids.count(vocabulary().index("\\boxed{")) == 1 and ids.count(vocabulary().index("step")) == 1
        assert len(tok) == len(vocabulary())
    assert trainer_tok.encode(SOLUTION) == vllm_tok.encode(SOLUTION)  # <bos> + the same ids

"""Rollout helpers that need no engine."""

import json

from agpo_megatron.rollout.base import model_stop_token_ids


def test_stop_tokens_include_every_generation_config_eos(tmp_path):
    """Qwen2.5-Math's generation_config lists <|im_end|> (151645) and <|endoftext|> (151643)."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert model_stop_token_ids(str(tmp_path), 151643) == (151643, 151645)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert model_stop_token_ids(str(tmp_path), None) == (7,)
    assert model_stop_token_ids(str(tmp_path / "none"), 3) == (3,)

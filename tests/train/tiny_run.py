"""The tiny run folder the end-to-end resume and placement tests share: a 2-layer Qwen2 with the
synthetic task's tokenizer, 32 training problems, and `train.yaml` (train set) / `train_eval.yaml`
(the same set for evaluation too).

Every parameter (and TP shard) is a multiple of 64 values, so Megatron's distributed optimizer
inserts no alignment padding into its buckets. That padding is saved uninitialised (torch.empty in
`sharded_param_state_dp_reshardable`), and would differ between any two runs.
"""

from pathlib import Path


def write_tiny_run(d: Path) -> Path:
    from agpo_megatron.data import synthetic
    from agpo_megatron.models.tiny import save_tiny_hf_model

    tok = synthetic.build_tokenizer(d / "model")
    save_tiny_hf_model(
        d / "model",
        "qwen2",
        seed=0,
        tokenizer=tok,
        vocab_size=128,
        hidden_size=128,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    synthetic.write_jsonl(synthetic.make_dataset(32, seed=0, max_difficulty=1), d / "train.jsonl")
    data = f"{{path: {d / 'train.jsonl'}, answer_format: raw, prompt_template: '{{prompt}}'}}"
    (d / "train.yaml").write_text(f"data: {{train: {data}}}\n")
    (d / "train_eval.yaml").write_text(f"data: {{train: {data}, eval: {data}}}\n")
    return d

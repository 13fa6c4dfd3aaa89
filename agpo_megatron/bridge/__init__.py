"""The weight bridge: the Megatron <-> HF name table and reshape rules, the HF safetensors reader and
streaming writer, and the TP/PP gather that streams (hf_name, tensor) buckets to vLLM or to disk.
May import rollout/ and below; imported by plan/, train/ and the converters.
"""

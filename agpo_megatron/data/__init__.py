"""Datasets (jsonl, parquet, HF hub), answer matching and the distributed reward, the synthetic tasks
and the generated inputs a config can name (`synthetic:arith`). Imports algo/, report/, runtime/
only; config/ and everything above import it.
"""

"""HF config.json -> Megatron GPTModel (local or TE spec), forward passes and log-probs, the tiny
models and the `tiny:` inputs a config can name. May import ops/, config/ and below; never
imported by config/, data/ or algo/.
"""

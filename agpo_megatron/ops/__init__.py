"""Fused kernels (the chunked vocab-parallel policy loss, its Triton kernel), each with a plain-PyTorch
reference and a parity test. Imports algo/ and runtime/ only; models/ and above use it.
"""

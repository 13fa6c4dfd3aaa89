"""Typed config dataclasses (a docstring per field) and their YAML + dotted-override I/O, validated
before anything heavy. Imports data/ and algo/ (their own config types) and below; models/ and
everything above read it. Loading with generated inputs and shape checks is plan/load.py.
"""

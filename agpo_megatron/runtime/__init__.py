"""The process runtime every other package stands on: process groups and the rank's layout, the
CPU platform layer for Megatron on gloo, the step watchdog, preemption signals, finiteness checks.
Imports nothing of agpo_megatron outside itself; everything may import it.
"""

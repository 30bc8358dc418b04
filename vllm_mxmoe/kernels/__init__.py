"""Kernels of the mixed-precision MoE: layout, torch reference, Triton kernels.

Modules here import torch (and triton for the kernels) but never vLLM, so they
can be tested and benchmarked on a machine without vLLM.
"""

"""Fused Triton kernels of the roots, each beside the plain-torch reference it must match.

Triton is optional: nothing here imports it until a kernel is launched.
"""

"""Triton kernels for featinv's fast inference path, installed as ``featinv.kernels``.

Every kernel lives beside a plain-PyTorch reference that its tests and benchmark compare
against. Nothing here is imported by the eager path, so featinv imports without Triton.
"""

"""Triton GPU kernels for the inference engine (optional: needs torch + triton).

Importing this package is free; import the submodules (``kernels.matmul``,
``kernels.attention_prefill``, ...) to pull in torch and triton. On a machine
without a GPU, set ``TRITON_INTERPRET=1`` before importing triton and pass CPU
torch tensors: the kernels then run in Triton's NumPy interpreter.
"""

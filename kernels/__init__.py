"""Triton GPU kernels for the inference engine (optional: needs torch + triton).

Importing this package is free; import the submodules (``kernels.matmul``,
``kernels.attention_prefill``, ...) to pull in torch and triton. On a machine
without a GPU, set ``TRITON_INTERPRET=1`` before importing triton and pass CPU
torch tensors: the kernels then run in Triton's NumPy interpreter.

Every launch is planned (grid, constexprs, warps, stages) from shapes and a kernels.launch.Target and goes through
kernels.launch.launch; kernels.aot records the backend's launches for an A100 / H100 and compiles them for sm_80 /
sm_90 without a GPU. Imports only engine's runtime pieces and config below it, never generation or the CLI.
"""

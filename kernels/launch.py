"""Kernel launches as data: the device facts a launch depends on (Target), what a launch is (LaunchPlan: kernel,
grid, constexprs, num_warps, num_stages), the one `launch` every kernel wrapper goes through, and `recording()`, in
which launches are collected instead of run.

Each wrapper (matmul, decode_attention, ...) computes its LaunchPlan from shapes, dtypes and a Target, then calls
`launch(plan, *args)`. On a GPU the Target is read from the device; a Target can also be named (A100, H100), so the
launches the backend would make on a GPU can be recorded on a machine without one: tensors on torch's "meta" device
(shapes, dtypes and strides without storage) under `recording()`. tinyllama_kernels.aot compiles what it records.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, field

import torch

from ._common import interpreting


@dataclass(frozen=True)
class Target:
    """What a launch plan may depend on about the device: Triton's CPU interpreter or not, the SM count (grid
    sizing), the CUDA compute capability (80 for sm_80, None in the interpreter)."""

    name: str
    interpret: bool
    sm_count: int
    capability: int | None = None


INTERPRETER = Target("interpreter", interpret=True, sm_count=4)  # a nominal 4 SMs keeps interpreter grids small
A100 = Target("A100 SXM4", interpret=False, sm_count=108, capability=80)
H100 = Target("H100 SXM5", interpret=False, sm_count=132, capability=90)


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(props.name, interpret=False, sm_count=props.multi_processor_count,
                  capability=10 * props.major + props.minor)


def target_of(device) -> Target:
    """The Target of a torch device: a CUDA GPU's own facts, or INTERPRETER for CPU tensors under TRITON_INTERPRET.

    Raises ValueError for any other device (e.g. "meta": name the target instead)."""
    device = torch.device(device)
    if device.type == "cuda" and not interpreting():
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu" and interpreting():
        return INTERPRETER
    raise ValueError(f"no kernel target for device {device} (TRITON_INTERPRET={interpreting()}): pass target=")


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch minus its arguments: kernel[grid](*args, **constexprs, num_warps=, num_stages=).

    num_warps / num_stages default to Triton's own CUDA defaults (4 and 3), what a launch that names none gets."""

    kernel: object  # a @triton.jit function (an interpreted one under TRITON_INTERPRET)
    grid: tuple[int, ...]
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    @property
    def name(self) -> str:
        """The kernel function's name, e.g. "_gemm_kernel"."""
        fn = getattr(self.kernel, "fn", self.kernel)
        return fn.__name__


@dataclass(frozen=True)
class Launch:
    """A recorded launch: its plan and its arguments (tensors, often on the meta device, and scalars)."""

    plan: LaunchPlan
    args: tuple


_RECORDER: contextvars.ContextVar[tuple[list, bool] | None] = contextvars.ContextVar("kernel_launches", default=None)


def launch(plan: LaunchPlan, *args) -> None:
    """Run `plan`'s kernel on `args`; inside recording(), append a Launch (and run it only if that asked to)."""
    active = _RECORDER.get()
    if active is not None:
        launches, execute = active
        launches.append(Launch(plan, args))
        if not execute:
            return
    plan.kernel[plan.grid](*args, **plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages)


@contextlib.contextmanager
def recording(execute: bool = False):
    """Within the block, every `launch` appends its Launch to the list this yields; the kernels run only when
    `execute` (recording a real run), never on meta tensors (recording what a GPU would be asked to run)."""
    launches: list[Launch] = []
    token = _RECORDER.set((launches, execute))
    try:
        yield launches
    finally:
        _RECORDER.reset(token)

"""Launching a generated kernel with Triton's per-call work done once per specialisation.

`fn[grid](*args, **kwargs)` binds and specialises every argument again on each call, and checks
the kernel's global constexprs: tens of microseconds of Python in Triton 3.6, which is what bounds
a loaded model's eager decode step (docs/performance-history.md, runs 71-75 and 79-80). `launch(fn, grid,
*args, **kwargs)` goes through Triton once for each combination of keyword values, argument
dtypes, 16-byte alignment (what Triton specialises a pointer on) and integer argument values
(but for parameters marked do_not_specialize, only whether they fit 32 bits),
keeps the compiled kernel it
returns, and from then on hands the arguments straight to that kernel's launcher (the call
`CompiledKernel.__getitem__` makes). Under the interpreter, with Triton's launch hooks set (a
profiler), or with `TQC_DIRECT_LAUNCH=0`, every call takes Triton's own path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from triton import knobs
from triton.runtime import driver

ENABLED = os.environ.get("TQC_DIRECT_LAUNCH", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"

# (kernel, keyword items, argument keys, device) -> (compiled kernel, the values of the parameters
# after the positional ones, in the kernel's order)
_compiled: dict[tuple, tuple[object, tuple]] = {}
_unspecialised_positions: dict[object, tuple[int, ...]] = {}  # kernel -> its do_not_specialize parameters


def launch(fn, grid: Sequence[int], *args, **kwargs) -> None:
    """fn[grid](*args, **kwargs), through the compiled kernel directly once it is known."""
    if not ENABLED or _hooked():
        fn[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    arguments = list(map(_argument_key, args))
    for index in _unspecialised(fn):
        if index < len(args) and isinstance(args[index], int):  # Triton keys it by its type and width only
            arguments[index] = (type(args[index]), -2**31 <= args[index] < 2**31)
    key = (fn, tuple(kwargs.items()), tuple(arguments), device)
    entry = _compiled.get(key)
    if entry is None:
        if any(isinstance(value, torch.Tensor) for value in kwargs.values()):
            raise TypeError("launch takes tensors positionally: a keyword tensor would be keyed by identity")
        compiled = fn[grid](*args, **kwargs)  # binds, finds or compiles, launches
        if compiled is not None:  # None: Triton compiles in the background; ask it again next call
            tail = tuple(kwargs.get(p.name, p.default) for p in fn.params[len(args):])
            _compiled[key] = (compiled, tail)
        return
    compiled, tail = entry
    stream = driver.active.get_current_stream(device)
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)


def _unspecialised(fn) -> tuple[int, ...]:
    """The positions of fn's parameters marked do_not_specialize (a length that changes every call)."""
    positions = _unspecialised_positions.get(fn)
    if positions is None:
        positions = _unspecialised_positions[fn] = tuple(
            i for i, param in enumerate(fn.params) if getattr(param, "do_not_specialize", False))
    return positions


def _hooked() -> bool:
    """Whether a launch hook is set (Triton 3.6 keeps None or a chain; later versions a chain)."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def _argument_key(value) -> object:
    """What Triton specialises an argument on: a tensor's dtype and whether its address is a
    multiple of 16; anything else by value (an int's value decides its type and divisibility)."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    return value

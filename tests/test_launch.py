"""tqc.kernels.launch: when a launch goes through Triton and what the direct call hands the kernel.

The kernel and Triton's driver are stand-ins here (no GPU); the direct path on real kernels is
checked by tests/test_kernels_accuracy.py on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tqc.kernels import launch as launch_module
from tqc.kernels.launch import launch


class FakeKernel:
    """Stands in for a @triton.jit function of (x, out, n, BLOCK: constexpr = 64, FLAG: constexpr = False)."""

    params = [SimpleNamespace(name=name, default=default) for name, default in
              (("x", None), ("out", None), ("n", None), ("BLOCK", 64), ("FLAG", False))]

    def __init__(self):
        self.through_triton = []  # (grid, args, kwargs) of the calls that took Triton's path
        self.direct = []  # the arguments of the compiled kernel's direct calls

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.through_triton.append((grid, args, kwargs))
            return SimpleNamespace(run=lambda *a: self.direct.append(a), function="function", packed_metadata="meta")
        return run


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(launch_module, "ENABLED", True)
    monkeypatch.setattr(launch_module, "_compiled", {})
    driver = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 1234)
    monkeypatch.setattr(launch_module, "driver", SimpleNamespace(active=driver))
    return FakeKernel()


def test_second_launch_calls_the_compiled_kernel_with_every_parameter(kernel):
    x, out = torch.zeros(8), torch.zeros(8)
    launch(kernel, (3, 2), x, out, 8, BLOCK=32, num_warps=4)
    assert len(kernel.through_triton) == 1 and not kernel.direct
    y = torch.ones(8)  # another tensor of the same dtype and alignment: same specialisation
    launch(kernel, (5,), y, out, 8, BLOCK=32, num_warps=4)
    assert len(kernel.through_triton) == 1
    (grid_x, grid_y, grid_z, stream, function, metadata, _, _, _, *args), = kernel.direct
    assert (grid_x, grid_y, grid_z, stream, function, metadata) == (5, 1, 1, 1234, "function", "meta")
    assert args[0] is y and args[1] is out and args[2:] == [8, 32, False]  # FLAG's default filled in


@pytest.mark.parametrize("change", ["dtype", "misaligned", "keyword", "integer"])
def test_a_new_specialisation_goes_through_triton(kernel, change):
    buffer = torch.zeros(16)
    x, kwargs, n = buffer[:8], {"BLOCK": 32}, 8
    launch(kernel, (1,), x, x, n, **kwargs)
    if change == "dtype":
        x = x.double()
    elif change == "misaligned":
        x = buffer[1:9]  # 4 bytes past a 16-byte boundary
    elif change == "keyword":
        kwargs = {"BLOCK": 64}
    else:
        n = 16  # Triton specialises integers on divisibility by 16
    launch(kernel, (1,), x, x, n, **kwargs)
    assert len(kernel.through_triton) == 2 and not kernel.direct


def test_an_unspecialised_integer_keeps_its_kernel_across_values_but_not_across_widths(kernel, monkeypatch):
    """A parameter marked do_not_specialize (cached_attention_kernel's length, a step longer each
    call): Triton compiles one kernel for every value that fits 32 bits, so one compiled kernel
    takes them all, each value handed to it as it is."""
    params = [SimpleNamespace(**vars(param)) for param in FakeKernel.params]
    params[2].do_not_specialize = True
    monkeypatch.setattr(FakeKernel, "params", params)
    x = torch.zeros(8)
    for n in (7, 16, 1):
        launch(kernel, (1,), x, x, n)
    assert len(kernel.through_triton) == 1
    assert [args[11] for args in kernel.direct] == [16, 1]
    launch(kernel, (1,), x, x, 2**40)
    launch(kernel, (1,), x, x, True)  # a bool is Triton's u1, not an i32
    assert len(kernel.through_triton) == 3


def test_disabled_or_hooked_launches_always_go_through_triton(kernel, monkeypatch):
    x = torch.zeros(8)
    monkeypatch.setattr(launch_module, "_hooked", lambda: True)  # a profiler's launch hook
    for _ in range(2):
        launch(kernel, (1,), x, x, 8)
    monkeypatch.setattr(launch_module, "_hooked", lambda: False)
    monkeypatch.setattr(launch_module, "ENABLED", False)  # TQC_DIRECT_LAUNCH=0 or the interpreter
    for _ in range(2):
        launch(kernel, (1,), x, x, 8)
    assert len(kernel.through_triton) == 4 and not kernel.direct


def test_a_tensor_keyword_is_refused(kernel):
    with pytest.raises(TypeError, match="positionally"):
        launch(kernel, (1,), torch.zeros(8), torch.zeros(8), n=torch.zeros(1))


def test_a_launch_that_returns_no_kernel_is_not_kept(kernel, monkeypatch):
    """Triton returns no compiled kernel while it compiles in the background: ask it again."""
    monkeypatch.setattr(FakeKernel, "__getitem__", lambda self, grid: lambda *args, **kwargs:
                        self.through_triton.append(args))
    x = torch.zeros(8)
    for _ in range(2):
        launch(kernel, (1,), x, x, 8)
    assert len(kernel.through_triton) == 2 and not kernel.direct

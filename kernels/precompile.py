"""Compile many generated kernels at once, in worker processes, into Triton's on-disk cache.

Triton compiles one kernel at a time per process; a plan (or a benchmark) needs dozens of
specialisations times their candidate launch configurations. Running each once in a pool of
spawned workers fills the shared cache (~/.triton/cache) in parallel, so the tuner then only loads.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from functools import partial

from .registry import KernelKey, family
from .tuning import TOKEN_BUCKETS, LaunchConfig


Job = tuple[KernelKey, int, LaunchConfig]  # a key, a token count, one of its candidates


def jobs_for(keys: list[KernelKey], token_counts: list[int]) -> list[Job]:
    """Every (key, token count, candidate) the tuner will try for these token counts."""
    from .tuning import token_bucket  # noqa: PLC0415

    buckets = {token_bucket(m): m for m in token_counts}
    return [(key, m, config) for key in keys for bucket, m in buckets.items()
            for config in family(key)(key, None).candidates(bucket)]


def _run_one(job: Job, dtype: str) -> str | None:
    import torch  # noqa: PLC0415

    from tqc.layout import LayerSpec  # noqa: PLC0415
    from tqc.options import QuantOption  # noqa: PLC0415

    from .registry import prepare  # noqa: PLC0415
    from .synthetic import random_turboquant_linear  # noqa: PLC0415
    from .tuning import Tuner  # noqa: PLC0415

    key, m, config = job
    option = QuantOption("turboquant", key.bits, key.residual_bits)
    module = random_turboquant_linear(LayerSpec(option, key.group_size, key.k, key.n, activations=key.activations),
                                      "cuda")
    prepare(module)
    x = torch.randn(m, key.k, device="cuda", dtype=getattr(torch, dtype))
    try:
        family(key)(key, Tuner("none", "none", None)).run(x, module, config)
        torch.cuda.synchronize()
    except Exception as err:  # the tuner will skip it as well
        return f"{key.name} {config.model_dump()}: {str(err).splitlines()[0]}"
    finally:
        del module, x
        torch.cuda.empty_cache()  # workers share the GPU: hand back what this job held
    return None


def run_jobs(jobs: list[Job], workers: int = 8, dtype: str = "bfloat16") -> list[str]:
    """Run each job once on `dtype` activations (a kernel is compiled for its input's type) in a pool of
    spawned workers; return the failures, one line each."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return [failure for failure in pool.map(partial(_run_one, dtype=dtype), jobs) if failure]


def precompile(keys: list[KernelKey], token_counts: list[int] = list(TOKEN_BUCKETS), workers: int = 8) -> list[str]:
    """Compile every candidate of every key in parallel; return the failures, one line each."""
    return run_jobs(jobs_for(keys, token_counts), workers)

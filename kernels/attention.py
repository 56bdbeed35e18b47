"""One decode step's grouped-query attention in one launch, for `tqc bench decode` (both models).

torch's scaled_dot_product_attention takes two kernels for one token over a KV cache, and the
cache write before it a third; at 8B shapes they cost a decode step about 10 us a layer, the same
for bf16 and for a plan, which weighs three times as much on the quantized model's step. This
kernel writes the token's key and value into the cache and attends in one launch, split along
the cache (flash-decoding): each program takes one KV head's query heads over a slice of the
positions, keeps a running softmax, and stores its partial output; the last program of a KV head
to finish (an atomic count) combines the slices, or, where a quantized o_proj follows, the launch
that rotates its input does (glue.attention_linear), so that the attention ends with its slices
(docs/performance.md, runs 148-154). It is launched for programmatic dependent launch where the
GPU has it: the programs start while the q/k/v matmul drains and read their slice of the cache
before waiting for it (runs 142-144). Rotary embeddings are left out, as in the benchmark's decoder.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .registry import pdl_launch
from .triton_kernels import pdl_start

TARGET_PROGRAMS = 128  # about one a streaming multiprocessor on an H100
# At least 64 positions a program, in 8 warps: the fastest at Llama-3-8B's and Qwen2.5-7B's shapes on an
# H100 (scripts/attention_bench.py, run 137: 7.1 and 6.6 us a layer; Qwen's 32 positions, 4 warps: 8.1)
MIN_SPLIT = 64
NUM_WARPS = 8
MIN_DOT_ROWS = 16  # a KV head's query heads, padded to a tensor-core tile


@triton.jit
def decode_attention_kernel(qkv_ptr, cache_ptr, pos_ptr, out_ptr, partial_ptr, stats_ptr, count_ptr, scale,
                            CONTEXT: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                            SPLIT: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_G: tl.constexpr,
                            BLOCK_S: tl.constexpr, PDL: tl.constexpr = False, COMBINE: tl.constexpr = True):
    """Grid (KV_HEADS, SPLITS). qkv: [q heads | k heads | v heads] of one token, D each; cache:
    [2, KV_HEADS, CONTEXT, D]; out: [KV_HEADS * GROUP * D]. partial: [heads, SPLITS, D] and stats
    [2, heads, SPLITS] (running max, sum) in float32; count: [KV_HEADS] int32, zero between calls.
    BLOCK_G and BLOCK_S: GROUP and SPLITS rounded up to tile sizes. Under programmatic dependent
    launch (PDL) the slice's first BLOCK positions are read before waiting for the kernel that
    makes qkv: earlier steps wrote them, and the token's own position is taken from qkv. COMBINE:
    the last program of a KV head to finish combines its slices into out; without it, partial and
    stats are the result (the launch that rotates o_proj's input combines them: glue.attention_linear)."""
    kv_head, split = tl.program_id(0), tl.program_id(1)
    dims = tl.arange(0, D)
    keys = cache_ptr + kv_head * CONTEXT * D
    values = keys + KV_HEADS * CONTEXT * D
    start = split * SPLIT
    first = start + tl.arange(0, BLOCK)
    first_k = tl.load(keys + first[:, None] * D + dims[None, :], mask=(first < CONTEXT)[:, None], other=0.0)
    first_v = tl.load(values + first[:, None] * D + dims[None, :], mask=(first < CONTEXT)[:, None], other=0.0)
    pdl_start(PDL)
    rows = tl.arange(0, BLOCK_G)  # query heads of this KV head, padded to a tensor-core tile
    heads = kv_head * GROUP + rows
    real = rows < GROUP
    q = tl.load(qkv_ptr + heads[:, None] * D + dims[None, :], mask=real[:, None], other=0.0)
    q_width: tl.constexpr = KV_HEADS * GROUP * D
    new_k = tl.load(qkv_ptr + q_width + kv_head * D + dims)
    new_v = tl.load(qkv_ptr + q_width + KV_HEADS * D + kv_head * D + dims)
    pos = tl.load(pos_ptr)
    top = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for offset in tl.static_range(0, SPLIT, BLOCK):
        positions = start + offset + tl.arange(0, BLOCK)
        inside = positions < CONTEXT
        is_new = (positions == pos)[:, None]
        where = positions[:, None] * D + dims[None, :]
        if offset == 0:
            k = first_k
        else:
            k = tl.load(keys + where, mask=inside[:, None], other=0.0)
        k = tl.where(is_new, new_k[None, :], k)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(inside[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_top[:, None])
        shrink = tl.exp(top - new_top)
        total = total * shrink + tl.sum(weights, axis=1)
        if offset == 0:
            v = first_v
        else:
            v = tl.load(values + where, mask=inside[:, None], other=0.0)
        v = tl.where(is_new, new_v[None, :], v)
        acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v)
        top = new_top
    token = dims * 0 + pos
    mine = (token >= start) & (token < start + SPLIT)  # the slice holding the token writes it to the cache
    tl.store(keys + pos * D + dims, new_k, mask=mine)
    tl.store(values + pos * D + dims, new_v, mask=mine)
    heads_total: tl.constexpr = KV_HEADS * GROUP
    tl.store(partial_ptr + (heads[:, None] * SPLITS + split) * D + dims[None, :], acc, mask=real[:, None])
    tl.store(stats_ptr + heads * SPLITS + split, top, mask=real)
    tl.store(stats_ptr + (heads_total + heads) * SPLITS + split, total, mask=real)
    if COMBINE:
        if tl.atomic_add(count_ptr + kv_head, 1) == SPLITS - 1:  # acq_rel: the other slices' stores are visible
            combined = combine_slices(partial_ptr, stats_ptr, heads, real, heads_total, SPLITS, BLOCK_S, D)
            tl.store(out_ptr + heads[:, None] * D + dims[None, :], combined.to(out_ptr.dtype.element_ty),
                     mask=real[:, None])
            tl.store(count_ptr + kv_head, 0)


@triton.jit
def combine_slices(partial_ptr, stats_ptr, heads, real, HEADS: tl.constexpr, SPLITS: tl.constexpr,
                   BLOCK_S: tl.constexpr, D: tl.constexpr):
    """Attention's output for query heads `heads` (`real`: the rows that are heads, not padding),
    float32 [rows, D]: the SPLITS slices' partial outputs weighted by their running max and sum
    (decode_attention_kernel's partial and stats). The loads bypass L1 (.cg): in the attention's
    own launch other programs stored them."""
    dims = tl.arange(0, D)
    slices = tl.arange(0, BLOCK_S)
    stat = heads[:, None] * SPLITS + slices[None, :]
    read = real[:, None] & (slices < SPLITS)[None, :]
    tops = tl.load(stats_ptr + stat, mask=read, other=float("-inf"), cache_modifier=".cg")
    tops = tl.where(real[:, None], tops, 0.0)  # padded rows: finite, never stored
    totals = tl.load(stats_ptr + HEADS * SPLITS + stat, mask=read, other=0.0, cache_modifier=".cg")
    best = tl.max(tops, axis=1)
    slice_weights = tl.exp(tops - best[:, None])
    norm = tl.sum(totals * slice_weights, axis=1)
    combined = tl.zeros([heads.shape[0], D], tl.float32)
    for s in tl.static_range(SPLITS):
        part = tl.load(partial_ptr + (heads[:, None] * SPLITS + s) * D + dims[None, :], mask=real[:, None],
                       other=0.0, cache_modifier=".cg")
        share = tl.sum(tl.where(slices[None, :] == s, slice_weights, 0.0), axis=1)
        combined += part * share[:, None]
    return combined / tl.where(real, norm, 1.0)[:, None]


class DecodeAttention:
    """Attention of one token over a whole (context, kv heads, head dim) cache, the token's key and
    value written into it at `pos` first, as index_copy_ and scaled_dot_product_attention do; the
    float32 workspace is kept between calls (CUDA-graph safe)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, context: int, device: str | torch.device,
                 split: int | None = None, num_warps: int = NUM_WARPS, pdl: bool = True):
        """`split`: positions a program takes (a power of two; default: about TARGET_PROGRAMS programs,
        at least MIN_SPLIT positions each). `pdl`: launched for programmatic dependent launch where
        the GPU has it (registry.uses_pdl)."""
        self.heads, self.kv_heads, self.head_dim, self.context = heads, kv_heads, head_dim, context
        self.pdl = pdl
        if split is None:
            split = min(256, max(MIN_SPLIT, triton.next_power_of_2(math.ceil(context * kv_heads / TARGET_PROGRAMS))))
        self.split = split
        self.splits = triton.cdiv(context, self.split)
        self.partial = torch.empty(heads, self.splits, head_dim, device=device, dtype=torch.float32)
        self.stats = torch.empty(2, heads, self.splits, device=device, dtype=torch.float32)
        self.count = torch.zeros(kv_heads, device=device, dtype=torch.int32)
        group = heads // kv_heads
        self.launch = dict(CONTEXT=context, KV_HEADS=kv_heads, GROUP=group, D=head_dim, SPLIT=split,
                           BLOCK=min(split, 64), SPLITS=self.splits,
                           BLOCK_G=max(MIN_DOT_ROWS, triton.next_power_of_2(group)),
                           BLOCK_S=triton.next_power_of_2(self.splits), num_warps=num_warps)

    def __call__(self, qkv: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """qkv: [1, (heads + 2 kv_heads) head_dim] of one token; cache: [2, 1, kv_heads, context,
        head_dim], contiguous; pos: [1] int. Returns [1, heads * head_dim] in qkv's dtype."""
        out = torch.empty(1, self.heads * self.head_dim, device=qkv.device, dtype=qkv.dtype)
        self._launch(qkv, cache, pos, out, combine=True)
        return out

    def slices(self, qkv: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor) -> None:
        """As a call, but the slices are left uncombined in self.partial and self.stats (combine_slices)."""
        self._launch(qkv, cache, pos, qkv, combine=False)

    def _launch(self, qkv: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor, out: torch.Tensor,
                combine: bool) -> None:
        assert qkv.shape[0] == 1 and qkv.is_contiguous() and cache.is_contiguous()
        decode_attention_kernel[(self.kv_heads, self.splits)](
            qkv, cache, pos, out, self.partial, self.stats, self.count, 1.0 / math.sqrt(self.head_dim), **self.launch,
            COMBINE=combine, **(pdl_launch(qkv.device) if self.pdl else {}))

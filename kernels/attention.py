"""One decode step's grouped-query attention in one launch, for `tqc bench decode` (both models)
and for a model from `tqc.load` (cached_attention, through hf_attention.py).

torch's scaled_dot_product_attention takes two kernels for one token over a KV cache, and the
cache write before it a third; at 8B shapes they cost a decode step about 10 us a layer, the same
for bf16 and for a plan, which weighs three times as much on the quantized model's step. This
kernel writes the token's key and value into the cache and attends in one launch, split along
the cache (flash-decoding): each program takes one KV head's query heads over a slice of the
positions, keeps a running softmax, and stores its partial output; the last program of a KV head
to finish (an atomic count) combines the slices, or, where a quantized o_proj follows, the launch
that rotates its input does (glue.attention_linear), so that the attention ends with its slices
(docs/performance-history.md, runs 148-154). It is launched for programmatic dependent launch where the
GPU has it: the programs start while the q/k/v matmul drains and read their slice of the cache
before waiting for it (runs 142-144). Rotary embeddings are left out, as in the benchmark's decoder.
cached_attention_kernel is the same slices over a cache that Hugging Face's layers have written,
with a runtime length and their mask (runs 155-159).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import launch
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
        new_top, weights, shrink, total = softmax_step(q, k, inside, top, total, scale, MAYBE_EMPTY=False)
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
    finish_slice(partial_ptr, stats_ptr, count_ptr + kv_head, out_ptr, heads, real, split, acc, top, total,
                 KV_HEADS * GROUP, SPLITS, BLOCK_S, D, COMBINE)


@triton.jit
def softmax_step(q, k, valid, top, total, scale, MAYBE_EMPTY: tl.constexpr):
    """One block of positions (`valid`: those attended) of a running softmax over q's rows: the
    new running max, the block's weights, the factor that rescales what was summed before, and the
    new running sum. MAYBE_EMPTY: a row may have attended nothing yet (its max still -inf), which
    would make exp(-inf - -inf) a NaN."""
    scores = tl.dot(q, tl.trans(k)) * scale
    scores = tl.where(valid[None, :], scores, float("-inf"))
    new_top = tl.maximum(top, tl.max(scores, axis=1))
    base = new_top
    if MAYBE_EMPTY:
        base = tl.where(new_top == float("-inf"), 0.0, new_top)
    weights = tl.exp(scores - base[:, None])
    shrink = tl.exp(top - base)
    return new_top, weights, shrink, total * shrink + tl.sum(weights, axis=1)


@triton.jit
def finish_slice(partial_ptr, stats_ptr, count_ptr, out_ptr, heads, real, split, acc, top, total,
                 HEADS: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr,
                 COMBINE: tl.constexpr):
    """Store a slice's partial output and running (max, sum) for query heads `heads`; with COMBINE,
    the last of the SPLITS programs counted on `count_ptr` combines the slices into out (rows of D)
    and sets the count back to zero."""
    dims = tl.arange(0, D)
    tl.store(partial_ptr + (heads[:, None] * SPLITS + split) * D + dims[None, :], acc, mask=real[:, None])
    tl.store(stats_ptr + heads * SPLITS + split, top, mask=real)
    tl.store(stats_ptr + (HEADS + heads) * SPLITS + split, total, mask=real)
    if COMBINE:
        if tl.atomic_add(count_ptr, 1) == SPLITS - 1:  # acq_rel: the other slices' stores are visible
            combined = combine_slices(partial_ptr, stats_ptr, heads, real, HEADS, SPLITS, BLOCK_S, D)
            tl.store(out_ptr + heads[:, None] * D + dims[None, :], combined.to(out_ptr.dtype.element_ty),
                     mask=real[:, None])
            tl.store(count_ptr, 0)


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


@triton.jit(do_not_specialize=["length"])
def cached_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, partial_ptr, stats_ptr, count_ptr, scale, length,
                            q_batch, q_head, k_batch, k_head, k_pos, v_batch, v_head, v_pos, mask_batch, mask_pos,
                            new_k_ptr, new_v_ptr, cos_ptr, sin_ptr, pos_ptr, new_batch, rope_batch,
                            KV_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                            BLOCK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_G: tl.constexpr,
                            BLOCK_S: tl.constexpr, HEADS: tl.constexpr, HAS_MASK: tl.constexpr,
                            NEW_TOKEN: tl.constexpr, COMBINE: tl.constexpr):
    """Grid (batch x KV_HEADS, SPLITS): decode_attention_kernel's slices over a cache that the caller
    has written, for a model from `tqc.load` (hf_attention.py). q: [batch, heads, 1, D]; k, v:
    [batch, KV_HEADS, length, D]; mask: [batch, 1, 1, length] bool, the positions attended (else
    all `length`); out: [batch, 1, heads, D] contiguous; HEADS = batch x heads; the strides in
    elements, D's being 1. Positions masked out are not read, so a static cache costs what it holds.
    NEW_TOKEN: the caller has not written the token: q (q_head = D) and the token's key and value
    (new_k, new_v: rows of KV_HEADS x D, new_batch apart) come as the projections give them, before the rotary embedding (cos, sin: rows of D, rope_batch apart),
    which the kernel applies as Hugging Face's apply_rotary_pos_emb rounds it; the slice that holds
    position pos (pos_ptr, one for the batch) writes the token's key and value into the cache.
    COMBINE: as decode_attention_kernel's."""
    program, split = tl.program_id(0), tl.program_id(1)
    batch, kv_head = program // KV_HEADS, program % KV_HEADS
    dims = tl.arange(0, D)
    rows = tl.arange(0, BLOCK_G)
    real = rows < GROUP
    head = kv_head * GROUP + rows
    q_rows = q_ptr + batch * q_batch + head[:, None] * q_head
    q = tl.load(q_rows + dims[None, :], mask=real[:, None], other=0.0)
    keys = k_ptr + batch * k_batch + kv_head * k_head
    values = v_ptr + batch * v_batch + kv_head * v_head
    if NEW_TOKEN:
        cos = tl.load(cos_ptr + batch * rope_batch + dims)
        sin = tl.load(sin_ptr + batch * rope_batch + dims)
        partner = (dims + D // 2) % D
        q = rotary(q, tl.load(q_rows + partner[None, :], mask=real[:, None], other=0.0), cos[None, :], sin[None, :],
                   (dims < D // 2)[None, :])
        new_k_row = new_k_ptr + batch * new_batch + kv_head * D
        new_k = rotary(tl.load(new_k_row + dims), tl.load(new_k_row + partner), cos, sin, dims < D // 2)
        new_v = tl.load(new_v_ptr + batch * new_batch + kv_head * D + dims)
        pos = tl.load(pos_ptr)
    top = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for offset in tl.static_range(0, SPLIT, BLOCK):
        positions = split * SPLIT + offset + tl.arange(0, BLOCK)
        valid = positions < length
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + batch * mask_batch + positions * mask_pos, mask=valid, other=0) != 0)
        k = tl.load(keys + positions[:, None] * k_pos + dims[None, :], mask=valid[:, None], other=0.0)
        if NEW_TOKEN:
            k = tl.where((positions == pos)[:, None], new_k[None, :], k)
        new_top, weights, shrink, total = softmax_step(q, k, valid, top, total, scale, MAYBE_EMPTY=True)
        v = tl.load(values + positions[:, None] * v_pos + dims[None, :], mask=valid[:, None], other=0.0)
        if NEW_TOKEN:
            v = tl.where((positions == pos)[:, None], new_v[None, :], v)
        acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v)
        top = new_top
    if NEW_TOKEN:
        token = dims * 0 + pos
        mine = (token >= split * SPLIT) & (token < split * SPLIT + SPLIT)  # the slice holding the token writes it
        tl.store(keys + pos * k_pos + dims, new_k, mask=mine)
        tl.store(values + pos * v_pos + dims, new_v, mask=mine)
    finish_slice(partial_ptr, stats_ptr, count_ptr + program, out_ptr, batch * KV_HEADS * GROUP + head, real, split,
                 acc, top, total, HEADS, SPLITS, BLOCK_S, D, COMBINE)


@triton.jit
def rotary(x, partner, cos, sin, first_half):
    """x * cos + rotate_half(x) * sin, each product and the sum rounded to x's dtype as Hugging
    Face's apply_rotary_pos_emb rounds them; partner: x's other half (x[(d + D/2) % D])."""
    half = tl.where(first_half, -partner.to(tl.float32), partner.to(tl.float32))
    dtype = x.dtype
    return ((x.to(tl.float32) * cos.to(tl.float32)).to(dtype).to(tl.float32)
            + (half * sin.to(tl.float32)).to(dtype).to(tl.float32)).to(dtype)


def slice_length(positions: int) -> int:
    """Positions a program takes when `positions` (context x KV heads x batch) are attended: about
    TARGET_PROGRAMS programs, a power of two from MIN_SPLIT to 256."""
    return min(256, max(MIN_SPLIT, _power_of_two(math.ceil(positions / TARGET_PROGRAMS))))


def _power_of_two(n: int) -> int:
    """The least power of two >= n (triton.next_power_of_2's host call is slow in Triton 3.6+)."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class Slices:
    """One token's attention left as its slices, for the launch that combines them
    (glue.combine_rotate): partial outputs [heads, splits, head_dim] and running (max, sum)
    [2, heads, splits] in float32; block_s: splits rounded up to a power of two."""

    partial: torch.Tensor
    stats: torch.Tensor
    heads: int
    head_dim: int
    splits: int
    block_s: int


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
        self.split = split or slice_length(context * kv_heads)
        self.splits = triton.cdiv(context, self.split)
        self.partial = torch.empty(heads, self.splits, head_dim, device=device, dtype=torch.float32)
        self.stats = torch.empty(2, heads, self.splits, device=device, dtype=torch.float32)
        self.count = torch.zeros(kv_heads, device=device, dtype=torch.int32)
        group = heads // kv_heads
        self.launch = dict(CONTEXT=context, KV_HEADS=kv_heads, GROUP=group, D=head_dim, SPLIT=self.split,
                           BLOCK=min(self.split, 64), SPLITS=self.splits,
                           BLOCK_G=max(MIN_DOT_ROWS, triton.next_power_of_2(group)),
                           BLOCK_S=triton.next_power_of_2(self.splits), num_warps=num_warps)

    def __call__(self, qkv: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """qkv: [1, (heads + 2 kv_heads) head_dim] of one token; cache: [2, 1, kv_heads, context,
        head_dim], contiguous; pos: [1] int. Returns [1, heads * head_dim] in qkv's dtype."""
        out = torch.empty(1, self.heads * self.head_dim, device=qkv.device, dtype=qkv.dtype)
        self._launch(qkv, cache, pos, out, combine=True)
        return out

    def slices(self, qkv: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor) -> Slices:
        """As a call, but the slices are left uncombined in self.partial and self.stats (combine_slices)."""
        self._launch(qkv, cache, pos, qkv, combine=False)
        return Slices(self.partial, self.stats, self.heads, self.head_dim, self.splits, self.launch["BLOCK_S"])

    def _launch(self, qkv: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor, out: torch.Tensor,
                combine: bool) -> None:
        assert qkv.shape[0] == 1 and qkv.is_contiguous() and cache.is_contiguous()
        decode_attention_kernel[(self.kv_heads, self.splits)](
            qkv, cache, pos, out, self.partial, self.stats, self.count, 1.0 / math.sqrt(self.head_dim), **self.launch,
            COMBINE=combine, **(pdl_launch(qkv.device) if self.pdl else {}))


_COUNTS: dict[torch.device, torch.Tensor] = {}  # cached_attention's combining counts, zero between calls


def reserve_counts(device: torch.device, programs: int) -> torch.Tensor:
    """cached_attention's combining counts on `device`, at least `programs` of them. Made before a
    CUDA graph is captured (hf_attention.install), they stay outside its memory pool."""
    count = _COUNTS.get(device)
    if count is None or count.numel() < programs:
        count = _COUNTS[device] = torch.zeros(max(programs, 64), device=device, dtype=torch.int32)
    return count


@dataclass
class NewToken:
    """What cached_attention writes into the cache before it attends (cached_attention_kernel's
    NEW_TOKEN): the token's key and value as its projections give them, [batch, kv heads x D] rows,
    before the rotary embedding (cos, sin: [batch, D] rows), and the position it takes, a
    one-element integer tensor (the query comes before the rotary embedding too)."""

    key: torch.Tensor
    value: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    position: torch.Tensor


def cached_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, split: int | None = None, token: NewToken | None = None,
                     combine: bool = True) -> torch.Tensor | Slices:
    """One token's attention over a KV cache the caller has written (cached_attention_kernel):
    query [batch, heads, 1, D]; key, value [batch, kv heads, length, D]; mask None (all `length`
    positions attended) or bool [batch, 1, 1, length]. Returns [batch, 1, heads, D] in query's dtype.
    The slice count is rounded up to a power of two, so that a cache growing a position a step
    compiles a few kernels, not one a step. `split`: positions a program takes (default slice_length).
    With `token` the kernel writes the token into the cache first, and applies the rotary embedding
    to `query` (rows of heads x D) and the token's key. `combine` False: the attention's Slices
    instead, for the launch that rotates o_proj's input to combine (one sequence)."""
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    split = split or slice_length(length * kv_heads * batch)
    splits = _power_of_two(-(-length // split))
    programs = batch * kv_heads
    count = reserve_counts(query.device, programs)
    partial = torch.empty(batch * heads, splits, dim, device=query.device, dtype=torch.float32)
    out = torch.empty(batch, 1, heads, dim, device=query.device, dtype=query.dtype) if combine else partial
    stats = torch.empty(2, batch * heads, splits, device=query.device, dtype=torch.float32)
    mask_strides = (mask.stride(0), mask.stride(-1)) if mask is not None else (0, 0)
    new = (query, query, query, query, query, 0, 0)  # unread without a token
    if token is not None:
        assert query.stride(1) == dim and token.key.stride(-1) == token.value.stride(-1) == token.cos.stride(-1) == 1
        new = (token.key, token.value, token.cos, token.sin, token.position, token.key.stride(0), token.cos.stride(0))
    group = heads // kv_heads
    launch(cached_attention_kernel, (programs, splits),
           query, key, value, query if mask is None else mask, out, partial, stats, count, scale, length,
           query.stride(0), query.stride(1), *key.stride()[:3], *value.stride()[:3], *mask_strides, *new,
           KV_HEADS=kv_heads, GROUP=group, D=dim, SPLIT=split, BLOCK=min(split, 64), SPLITS=splits,
           BLOCK_G=max(MIN_DOT_ROWS, _power_of_two(group)), BLOCK_S=splits, HEADS=batch * heads,
           HAS_MASK=mask is not None, NEW_TOKEN=token is not None, COMBINE=combine, num_warps=NUM_WARPS)
    return out if combine else Slices(partial, stats, batch * heads, dim, splits, splits)

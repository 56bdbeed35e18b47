"""Generated kernels against the torch reference path, for every (bits, residual) and strategy.

Runs compiled on a CUDA device (full Llama-3-8B shapes, bf16 and fp16), or on CPU under Triton's
interpreter when TRITON_INTERPRET=1 (small shapes; tests/test_kernels.py starts that run in a
subprocess so the variable never leaks into the rest of the suite). Skipped otherwise.
Tolerance: relative Frobenius error of the output below 2e-2 (bf16) / 5e-3 (fp16) / 2e-3 (fp32)
against the float64 reference, a fraction of the quantization error itself. (The kernels look the
codebook up in fp16 and multiply fp16 activations on tensor cores, accumulating in fp32: about
5e-4 relative, whatever the model's dtype.)
"""

from __future__ import annotations

import copy
import functools
import os
import time

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
if not (INTERPRET or CUDA):
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from tqc.layout import LayerSpec  # noqa: E402
from tqc.options import SCORED_OPTIONS, TURBOQUANT_OPTIONS, QuantOption  # noqa: E402
from tqc.rotation import rotate  # noqa: E402

from tqc.kernels import fragments, glue, registry  # noqa: E402
from tqc.kernels.synthetic import random_turboquant_linear  # noqa: E402
from tqc.kernels.registry import (FRAGMENT_LAYOUT, FRAGMENT_TILE_THREAD_TOKENS, PROGRAM_WARPS,  # noqa: E402
                                  FragmentLayerKernel, Int8LayerKernel, KernelKey, LayerKernel, prepare,
                                  rotate as triton_rotate)
from tqc.kernels.repack import slot_words  # noqa: E402
from tqc.kernels.tuning import (MIN_DOT_WIDTH, LaunchConfig, Tuner, slot_choices,  # noqa: E402
                                token_bucket)

DEVICE = "cuda" if CUDA else "cpu"
# (N, K, group size). Interpreted: B = 8 in one chunk, B = 1 in three chunks; N not a multiple of the
# row blocks (rows clamped for the loads), and N odd (split-K outputs added one by one, not in pairs).
# On a GPU also Qwen2.5-7B's K = 3584: B = 16 in seven chunks.
SHAPES = [(1024, 4096, 128), (1000, 4096, 128), (512, 3584, 128)] if CUDA else [(24, 256, 64), (21, 96, 32)]
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float32, torch.float16]
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 2e-3}
TOKENS = [1, 5] if INTERPRET else [1, 3, 16, 77]
STRATEGIES = {  # the split kernels with their smallest slot count: the most K-splits, atomics included
    "dot-split": lambda slots: LaunchConfig(strategy="dot", block_n=16, slots=slots),
    "dot-split-weights-left": lambda slots: LaunchConfig(strategy="dot", block_n=64, slots=slots, weights_left=True),
    "dot-whole-k": lambda slots: LaunchConfig(strategy="dot", block_m=32, block_n=32, slots=slots, whole_k=True),
    "fma": lambda slots: LaunchConfig(strategy="fma", block_n=16, slots=slots),
    "fma-two-steps": lambda slots: LaunchConfig(strategy="fma", block_n=8, slots=slots, iters=2),
    "fma-fp16": lambda slots: LaunchConfig(strategy="fma", block_n=16, slots=slots, iters=2, accumulate="fp16"),
    # products summed 8 to a thread's run before one scale (RUN_FMA_ASM), where B >= 16 (tuning.run_sums_fit)
    "fma-runs": lambda slots: LaunchConfig(strategy="fma", block_n=32, slots=slots, accumulate="fp16_runs"),
    # three steps: the interpreter's B = 1 shape (96 slots) runs it for every option
    "fma-lookahead": lambda slots: LaunchConfig(strategy="fma", block_n=8, slots=slots, iters=3, accumulate="fp16",
                                                lookahead=True),
    "fma-pipelined": lambda slots: LaunchConfig(strategy="fma", block_n=8, slots=slots, iters=3, accumulate="fp16",
                                                num_stages=3),
    "dot-split-lookahead": lambda slots: LaunchConfig(strategy="dot", block_n=16, slots=slots, iters=2, lookahead=True),
    # the decoded weights scaled (both stages folded) before a dot that accumulates in place
    "dot-scale-first": lambda slots: LaunchConfig(strategy="dot", block_n=16, slots=slots, scale_first=True),
    "dot-scale-first-weights-left": lambda slots: LaunchConfig(strategy="dot", block_n=64, slots=slots,
                                                               weights_left=True, scale_first=True),
    # and several pairs joined into one dot's inner dimension (_along_k)
    "dot-two-pairs-a-dot": lambda slots: LaunchConfig(strategy="dot", block_n=16, slots=slots, scale_first=True,
                                                      dot_pairs=2),
    "dot-four-pairs-a-dot-weights-left": lambda slots: LaunchConfig(strategy="dot", block_n=64, slots=slots,
                                                                    weights_left=True, scale_first=True, dot_pairs=4),
    "dot-whole-k-scale-first": lambda slots: LaunchConfig(strategy="dot", block_m=32, block_n=32, slots=slots,
                                                          whole_k=True, scale_first=True),
    "dequant": lambda slots: LaunchConfig(strategy="dequant", block_n=16),
}


@functools.lru_cache(maxsize=4)
def random_layer(option, n: int, k: int, group_size: int, activations: str = "fp16"):
    """(the layer with its codes in its kernel family's layout, its reference path's copy)."""
    module = random_turboquant_linear(LayerSpec(option, group_size, k, n, activations=activations), DEVICE)
    original = copy.deepcopy(module)
    prepare(module)
    return module, original


def reference(original, x: torch.Tensor) -> torch.Tensor:
    """The torch reference path in float64, on CPU, of a copy of the layer."""
    return copy.deepcopy(original).to("cpu").double().forward(x.double().cpu())


def token_counts(config: LaunchConfig) -> list[int]:
    return [1] if config.strategy in ("fma", "dp4a") else TOKENS


def runs_on(config: LaunchConfig, k: int, group_size: int) -> bool:
    """Whether the strategy serves this shape: tensor cores need B >= 8; steps must tile K."""
    b = slot_words(k, group_size)
    return (config.strategy != "dot" or b >= MIN_DOT_WIDTH) and (k // b) % (config.slots * config.iters) == 0


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("option", SCORED_OPTIONS, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kernel_matches_reference(option, strategy):
    config = STRATEGIES[strategy](min(slot_choices(option.base_bits, option.residual_bits)))
    for n, k, group_size in SHAPES:
        if not runs_on(config, k, group_size):
            continue
        module, original = random_layer(option, n, k, group_size)
        kernel = LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
        for dtype in DTYPES:
            for tokens in token_counts(config):
                x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(DEVICE, dtype)
                out = kernel.run(x, module, config)
                error = relative_error(out, reference(original, x))
                assert error < TOLERANCE[dtype], f"{option} {strategy} {n}x{k} {dtype} M={tokens}: {error:.2e}"


INT8_STRATEGIES = {  # split over K one group a program (atomics), tiles over all of K, dequantize + cuBLAS
    "int8-split": lambda groups: LaunchConfig(strategy="int8", block_m=16, block_n=16, iters=1),
    "int8-tiles": lambda groups: LaunchConfig(strategy="int8", block_m=32, block_n=32, iters=groups, whole_k=True),
    "int8-dequant": lambda groups: LaunchConfig(strategy="dequant", block_n=16),
    "int8-dp4a": lambda groups: LaunchConfig(strategy="dp4a", block_n=128 if CUDA else 16, iters=1),
}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("strategy", INT8_STRATEGIES)
def test_int8_kernel_matches_reference(bits, strategy):
    """The int8 family (activations: int8) against the reference path, which rounds alike."""
    for n, k, group_size in SHAPES:
        module, original = random_layer(QuantOption("turboquant", bits), n, k, group_size, "int8")
        kernel = Int8LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
        config = INT8_STRATEGIES[strategy](k // group_size)
        for dtype in DTYPES:
            for tokens in token_counts(config):
                x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(DEVICE, dtype)
                error = relative_error(kernel.run(x, module, config), reference(original, x))
                assert error < TOLERANCE[dtype], f"{bits}-bit {strategy} {n}x{k} {dtype} M={tokens}: {error:.2e}"


@pytest.mark.parametrize("option", ["4", "3", "3g", "2", "4+4", "4+2"])
def test_fragment_dequantize_gives_the_lookup_familys_weights(option):
    """The fragment family's prefill weights (on a GPU gluon_kernels.fragment_dequant_kernel, interpreted
    its plain Triton counterpart) equal what the lookup family's dequant_kernel decodes from the same codes
    in its own layout: bit for bit at 4, 3 and 2 bits, to float32 rounding with a residual stage (the
    compiler may fuse its multiply-add)."""
    shapes = [(1024, 4096, 128), (512, 3584, 128)] if CUDA else [(64, 256, 64), (128, 128, 128)]
    for n, k, group_size in shapes:
        module, _ = random_layer(QuantOption.parse(option), n, k, group_size)
        lookups = LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None)).dequantize(module, torch.float32)
        prepare(module, FRAGMENT_LAYOUT)
        family = FragmentLayerKernel(KernelKey.of(module.spec, FRAGMENT_LAYOUT), Tuner("none", "none", None))
        if "+" in option:
            torch.testing.assert_close(family.dequantize(module, torch.float32), lookups, rtol=1e-6, atol=1e-9)
            continue
        for dtype in [torch.float32, *DTYPES]:
            assert torch.equal(family.dequantize(module, dtype), lookups.to(dtype)), f"{n}x{k} g{group_size} {dtype}"


def test_fragment_dequantize_without_sign_selectors_gives_the_lookup_familys_weights(monkeypatch):
    """fragments.SIGN_SELECTORS off (TQC_SIGN_SELECTORS=0): 3-bit layers repacked with the lookups' sign plane
    dequantize to the lookup family's weights, bit for bit; test_fragment_dequantize_gives_the_lookup_familys_weights
    runs the selectors' layout (the 8 signed values' table on a GPU), as the family lays 3-bit layers out."""
    monkeypatch.setattr(fragments, "SIGN_SELECTORS", False)
    test_fragment_dequantize_gives_the_lookup_familys_weights("3")


# Gluon kernels have no interpreter: the fragment family is tested on a GPU only, and defined only there
# so that the interpreted run skips nothing.
if CUDA:
    @pytest.mark.parametrize("option", ["4", "3", "3g", "2", "4+4", "4+2"])
    @pytest.mark.parametrize("iters", [1, 8])
    def test_fragment_kernel_matches_reference(iters, option):
        """The fragment family (4-, 3- or 2-bit, 4+4, 4+2, codes in wgmma's operand order, Gluon) against the
        reference path: split over K into the output the rotation zeroed, on tensor cores (1-16 tokens,
        and 40 in three tiles of 16) or at one token on CUDA cores (each LaunchConfig.sums); dequantize
        + cuBLAS; each launch twice, the second time straight to the compiled kernel (launch.py)."""
        dot, dequant = (LaunchConfig(strategy=s, iters=iters) for s in ("fragments", "dequant"))
        check_fragment_configs(option, [(dot, 1), (dot, 3), (dot, 16), (dot, 40), (dequant, 77)], gemv_iters=iters)

    @pytest.mark.parametrize("iters", [1, 8])
    def test_fragment_gemv_without_high_bytes_matches_reference(iters, monkeypatch):
        """registry.HIGH_BYTES off (TQC_HIGH_BYTES=0): the one-token kernel's 2-bit row-sum configs looking
        codes up by both bytes (lut.CRUMB_ASM), against the reference path; test_fragment_kernel_matches_reference
        runs them by their high bytes, as the family launches them."""
        monkeypatch.setattr(registry, "HIGH_BYTES", False)
        check_fragment_configs("2", [], gemv_iters=iters)

    def test_fragment_gemv_on_the_high_byte_codebook_matches_reference():
        """Option 3g: 3-bit layers fitted to codebook.high_byte_codebook(3), the one-token kernel's row-sum
        configs looking their codes up by high bytes (lut.high_byte_signed_values, the sums times
        lut.HIGH_BYTE_FACTOR3) and its other configs by both, against the reference path on the same codebook."""
        check_fragment_configs("3g", [], gemv_iters=8)

    @pytest.mark.parametrize(("option", "high_bytes"), [("2", True), ("2", False), ("3", True), ("4+2", True)])
    def test_fragment_gemv_by_word_masks_matches_reference(option, high_bytes, monkeypatch):
        """registry.WORD_MASKS (TQC_WORD_MASKS=1): the one-token kernel's row-sum configs masking each word of
        2-bit codes once for two quads (lut.MASKED_*_ASM), against the reference path; 2 bits by their high
        bytes and without; 3 bits without SIGN_SELECTORS (which masks their words its own way)."""
        monkeypatch.setattr(registry, "WORD_MASKS", True)
        monkeypatch.setattr(fragments, "SIGN_SELECTORS", False)
        monkeypatch.setattr(registry, "HIGH_BYTES", high_bytes)
        check_fragment_configs(option, [], gemv_iters=8)

    def test_fragment_kernels_without_sign_selectors_match_reference(monkeypatch):
        """fragments.SIGN_SELECTORS off (TQC_SIGN_SELECTORS=0): every fragment kernel on 3-bit codes with the
        lookups' sign plane (each quad's signs xor-ed into its high bytes), against the reference path: tensor
        cores at 1-40 tokens and a tile of 64, the one-token kernel's candidates, dequantize + cuBLAS;
        test_fragment_kernel_matches_reference runs the selectors' layout (gluon_kernels._signed_selector_quads,
        checked in run 231), as the family lays 3-bit layers out."""
        monkeypatch.setattr(fragments, "SIGN_SELECTORS", False)
        dot, dequant = (LaunchConfig(strategy=s, iters=8) for s in ("fragments", "dequant"))
        tile = LaunchConfig(strategy="fragments", iters=8, token_tile=64)
        check_fragment_configs("3", [(dot, 1), (dot, 16), (dot, 40), (tile, 77), (dequant, 77)], gemv_iters=8)

    @pytest.mark.parametrize("option", ["4", "3", "3g", "2", "4+4", "4+2"])
    def test_fragment_token_tiles_match_reference(option):
        """LaunchConfig.token_tile: tiles of 64 and 128 tokens (a prompt's, a batch's) on tensor cores,
        77 and 300 tokens (the last tile short), against the reference path; also programs of 2 or 4
        warpgroups (128 or 256 rows over the same activations; also at 16 and 40 tokens in tiles of 16)
        and activations through a ring of 2 steps."""
        tiles = [LaunchConfig(strategy="fragments", iters=i, token_tile=t) for t in (64, 128) for i in (1, 8)]
        tiles += [LaunchConfig(strategy="fragments", iters=4, token_tile=t, num_warps=w) for t in (64, 128)
                  for w in PROGRAM_WARPS if w > 4 and t * w <= FRAGMENT_TILE_THREAD_TOKENS]
        tiles += [LaunchConfig(strategy="fragments", iters=8, token_tile=t, num_warps=w, x_stages=2)  # TILE_RING's
                  for t, w in [(64, 8), (128, 4)]]
        sixteen = LaunchConfig(strategy="fragments", iters=4, num_warps=8)  # WIDE_PROGRAMS' at 2-16 tokens
        check_fragment_configs(option, [(tile, m) for tile in tiles for m in (77, 300)] + [(sixteen, 16), (sixteen, 40)])

    def check_fragment_configs(option: str, runs: list, gemv_iters: int | None = None) -> None:
        """Each (config, tokens) of `runs` (and with gemv_iters the one-token kernel's candidates of that
        step count) on the fragment family, in bf16 and fp16, against the reference path, at two shapes."""
        for n, k, group_size in [(1024, 4096, 128), (512, 3584, 128)]:
            _, original = random_layer(QuantOption.parse(option), n, k, group_size)
            module = copy.deepcopy(original)
            prepare(module, FRAGMENT_LAYOUT)
            kernel = FragmentLayerKernel(KernelKey.of(module.spec, FRAGMENT_LAYOUT), Tuner("none", "none", None))
            gemvs = [c for c in kernel.candidates(1) if c.strategy == "fragment_gemv" and c.iters == gemv_iters]
            gemvs += [c.model_copy(update={"ordered_inputs": True}) for c in gemvs  # offered or not (X_ORDERED)
                      if c.sums != "steps" and not c.ordered_inputs]
            for dtype in DTYPES:
                for config, tokens in runs + [(gemv, 1) for gemv in gemvs]:
                    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(DEVICE, dtype)
                    for call in ("through Triton", "direct"):  # the second to the compiled kernel (launch.py)
                        error = relative_error(kernel.run(x, module, config), reference(original, x))
                        assert error < TOLERANCE[dtype], (
                            f"{option} {config.strategy} {config.sums} ordered={config.ordered_inputs} "
                            f"tile={config.token_tile} {n}x{k} "
                            f"{dtype} M={tokens} {call}: {error:.2e}")


@pytest.mark.parametrize("strategy", ["dot-split", "fma", "dequant"])
def test_a_layer_whose_input_arrives_rotated_is_not_rotated_again(strategy):
    """o_proj with its rotation folded into v_proj (LayerSpec.input_rotated): the kernels multiply the
    input as it comes, split over K into the output the (now identity) rotation launch zeroes; on a
    GPU also the fragment family."""
    option = QuantOption.parse("4")
    for n, k, group_size in SHAPES:
        spec = LayerSpec(option, group_size, k, n, input_rotated=True)
        original = random_turboquant_linear(spec, DEVICE)
        families = [(LayerKernel, None, STRATEGIES[strategy](min(slot_choices(4, 0))))]
        if CUDA and strategy != "fma":
            families.append((FragmentLayerKernel, FRAGMENT_LAYOUT,
                             LaunchConfig(strategy="fragments" if strategy != "dequant" else "dequant", iters=1)))
        for family, layout, config in families:
            if layout == FRAGMENT_LAYOUT and n % 64:
                continue  # the fragment layout tiles 64 rows
            module = copy.deepcopy(original)
            prepare(module, layout)
            kernel = family(KernelKey.of(module.spec, *([layout] if layout else [])), Tuner("none", "none", None))
            tokens_list = token_counts(config)
            if layout == FRAGMENT_LAYOUT:  # its tensor-core kernel takes 1-16 tokens, dequant + cuBLAS more
                tokens_list = [1, 3, 16] if config.strategy == "fragments" else [77]
            for tokens in tokens_list:
                x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(DEVICE, torch.float16)
                expected = F.linear(x.double().cpu(), original.dequantized_weight(torch.float64).cpu())
                error = relative_error(kernel.run(x, module, config), expected)
                assert error < TOLERANCE[torch.float16], f"{family.__name__} {strategy} {n}x{k} M={tokens}: {error:.2e}"


@pytest.mark.parametrize("split", [False, True] if INTERPRET else ["as TQC_FWHT_SPLIT says"])
def test_rotation_kernel_matches_butterfly(split, monkeypatch):
    """The rotation kernel against the float64 butterfly: interpreted, both ways of its butterflies
    (triton_kernels.FWHT_SPLIT); on a GPU the way TQC_FWHT_SPLIT picked at import."""
    if INTERPRET:
        import triton.language as tl

        from tqc.kernels import triton_kernels

        monkeypatch.setattr(triton_kernels, "FWHT_SPLIT", tl.constexpr(split))
    group_size, k = (128, 14336) if CUDA else (64, 256)
    x = torch.randn(7, k, dtype=torch.float32)
    signs = torch.randint(0, 2, (k,)).float() * 2 - 1
    out = triton_rotate(x.to(DEVICE), signs.to(DEVICE), group_size)
    assert relative_error(out, rotate(x.double(), signs.double(), group_size)) < 1e-5


# (heads, kv heads, head dim, context): Llama-3-8B's and Qwen2.5-7B's (7 query heads a KV head) on a GPU;
# interpreted, a context that leaves the last slice short and a slice count that is no power of two
ATTENTION_SHAPES = [(32, 8, 128, 1024), (28, 4, 128, 1000)] if CUDA else [(4, 2, 32, 40), (6, 2, 16, 100)]
# ... and the real small models' for a model from `tqc.load`: Gemma-3-270M's 256-wide heads, one KV head;
# SmolLM2-135M's 9 heads, 3 a KV head
LOADED_ATTENTION_SHAPES = ATTENTION_SHAPES + ([(4, 1, 256, 1000), (9, 3, 64, 1000)] if CUDA else [(4, 1, 256, 40)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_decode_attention_writes_the_cache_and_attends_as_sdpa_does(shape, dtype):
    """kernels/attention.py against index_copy_ + scaled_dot_product_attention, twice in a row (the
    combining count resets), the token written at a slice's end and then in its middle."""
    from tqc.kernels.attention import DecodeAttention
    from tqc.kernels.decode_bench import sdpa_attention

    heads, kv_heads, d, context = shape
    generator = torch.Generator().manual_seed(context)
    cache = torch.randn(2, 1, kv_heads, context, d, generator=generator).to(DEVICE, dtype)
    expected_cache = cache.double().cpu()
    # interpreted contexts are shorter than MIN_SPLIT: 16 positions a program there
    attention = DecodeAttention(heads, kv_heads, d, context, DEVICE, split=None if CUDA else 16)
    assert attention.splits > 1
    for pos in (attention.split - 1, context - attention.split // 2):
        qkv = torch.randn(1, (heads + 2 * kv_heads) * d, generator=generator).to(DEVICE, dtype)
        out = attention(qkv, cache, torch.tensor([pos], device=DEVICE))
        expected = sdpa_attention(qkv.double().cpu(), expected_cache, torch.tensor([pos]), heads, kv_heads, d)
        assert relative_error(out, expected) < TOLERANCE[dtype], f"pos {pos}"
        assert torch.equal(cache.cpu(), expected_cache.to(dtype)), f"pos {pos}: the cache"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOADED_ATTENTION_SHAPES, ids=str)
def test_cached_attention_attends_where_the_mask_lets_it_as_sdpa_does(shape, dtype):
    """attention.cached_attention (a model from `tqc.load`) against scaled_dot_product_attention, two
    sequences: a static cache's mask (a prefix, the second sequence's shorter than a slice so that
    whole slices attend nothing), a mask with holes, and no mask; a cache whose strides are not its
    shape's (a view of a longer one)."""
    from tqc.kernels.attention import cached_attention

    heads, kv_heads, d, context = shape
    generator = torch.Generator().manual_seed(context)
    split = None if CUDA else 16
    q = torch.randn(2, heads, 1, d, generator=generator).to(DEVICE, dtype)
    kv = torch.randn(2, 2, kv_heads, context + 8, d, generator=generator).to(DEVICE, dtype)
    keys, values = kv[0, :, :, :context], kv[1, :, :, :context]
    prefix = torch.arange(context) < torch.tensor([[context - 5], [11]])
    holes = torch.rand(2, context, generator=generator) < 0.7
    for mask in (prefix, holes, None):
        mask = None if mask is None else mask.view(2, 1, 1, context).to(DEVICE)
        out = cached_attention(q, keys, values, mask, d ** -0.5, split=split)
        expected = F.scaled_dot_product_attention(
            q.double().cpu(), keys.double().cpu(), values.double().cpu(),
            attn_mask=None if mask is None else mask.cpu(), enable_gqa=True).transpose(1, 2)
        assert out.shape == expected.shape
        assert relative_error(out, expected) < TOLERANCE[dtype], "no mask" if mask is None else mask.sum(-1)

# a decoder of two 128-wide heads a KV head: one rotation group a head (kernels/decode_bench.py's cfg)
TINY_DECODER = {"hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 2, "head_dim": 128, "vocab": 256}


def test_decoder_on_the_one_launch_attention_matches_torch_attention():
    """`tqc bench decode`'s default attention (kernels/attention.py) against `--attention sdpa` in the
    decoder, in DTYPES[0] (interpreted: float32): after a prefill of 5 tokens (torch's attention in
    both), two decode steps give every layer's attention output (o_proj's input) and the logits
    that torch's give, and write the first layer's cache bit for bit (its keys and values come
    straight from the embeddings)."""
    from tqc.kernels.decode_bench import Decoder, bf16_factory

    dtype, runs = DTYPES[0], {}
    for attention in ("sdpa", "triton"):
        torch.manual_seed(0)
        model = Decoder(bf16_factory(DEVICE), TINY_DECODER, layers=2, context=128, device=DEVICE, attention=attention)
        model.to(dtype)
        model.cache = model.cache.to(dtype)  # a plain attribute, which .to leaves
        attended = []
        with torch.no_grad():
            model(torch.arange(1, 6, device=DEVICE), torch.arange(5, device=DEVICE))
            for block in model.blocks:
                block.o_proj.register_forward_pre_hook(lambda module, args: attended.append(args[0].float()))
            logits = [model(torch.tensor([7 + pos], device=DEVICE), torch.tensor([pos], device=DEVICE)).float()
                      for pos in (5, 6)]
        runs[attention] = torch.cat(attended), torch.cat(logits), model.cache[0]
    assert model.blocks[0].decode_attention.splits > 1
    (attended, logits, cache), (expected_attended, expected_logits, expected_cache) = runs["triton"], runs["sdpa"]
    assert len(attended) == 4 and expected_attended.std() > 0
    assert relative_error(attended, expected_attended.double().cpu()) < TOLERANCE[dtype]
    assert relative_error(logits, expected_logits.double().cpu()) < TOLERANCE[dtype]
    assert torch.equal(cache, expected_cache)


@pytest.mark.parametrize("step", ["fwht", "norm", "swiglu"])
def test_rotation_writes_the_fragment_order_where_asked(step):
    """RotationTarget.fragment_step (the one-token fragment kernel's X_ORDERED): the rotation kernel and
    the glue's norm and SwiGLU steps write each 64-input step in fragments.fragment_input_order, the
    same values as in natural order, bit for bit."""
    from tqc.kernels.fragments import fragment_input_order
    from tqc.kernels.registry import RotationTarget

    m, k, group_size = 3, 256, 64
    generator = torch.Generator().manual_seed(5)
    signs = (torch.randint(0, 2, (k,), generator=generator).float() * 2 - 1).to(DEVICE)
    x = torch.randn(m, 2 * k, generator=generator).to(DEVICE, torch.float16)
    weight = torch.randn(k, generator=generator).to(DEVICE, torch.float16)

    def rotated(fragment_step: int) -> torch.Tensor:
        target = RotationTarget(signs, group_size, 0, torch.float16, None, fragment_step=fragment_step)
        if step == "fwht":
            return triton_rotate(x[:, :k], signs, group_size, dtype=torch.float16, fragment_step=fragment_step)
        if step == "norm":
            return glue.norm_rotate(x[:, :k].contiguous(), None, weight, 1e-5, target)[1]
        return glue.swiglu_rotate(x, target)

    natural = rotated(0).reshape(m, k // 64, 64)
    assert torch.equal(rotated(64).reshape(m, k // 64, 64), natural[..., fragment_input_order(64)])


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []))  # the interpreter truncates to bf16
def test_the_norm_step_rounds_as_each_form_does(dtype):
    """glue.norm_rotate's forms (NORM_FORMS) round rms_norm(h) * weight as torch's F.rms_norm,
    Hugging Face's Llama RMSNorm and Gemma's do: the normalised output matches its own formula
    (the sum of squares may land in another order) and not the others'. With a residual, h_out is
    h + delta and the rotated input is, bit for bit, the one of the sum normalised without it."""
    from tqc.kernels import hf_glue
    from tqc.kernels.registry import RotationTarget

    m, k, group_size = 3, 256, 64
    generator = torch.Generator().manual_seed(6)
    signs = (torch.randint(0, 2, (k,), generator=generator).float() * 2 - 1).to(DEVICE)
    h, delta = (torch.randn(m, k, generator=generator).to(DEVICE, dtype) for _ in range(2))
    weight = (1 + 0.3 * torch.randn(k, generator=generator)).to(DEVICE, dtype)
    target = RotationTarget(signs, group_size, 0, torch.float16, None)
    formulas = {"rms_norm": lambda x: F.rms_norm(x, (k,), weight, 1e-5),
                "llama": lambda x: hf_glue.rms_norm(x, weight, 1e-5),
                "gemma": lambda x: hf_glue.rms_norm(x, weight, 1e-5, gemma=True)}
    assert set(formulas) == set(glue.NORM_FORMS)
    summed = h + delta
    for form in glue.NORM_FORMS:
        normed, rotated = glue.norm_rotate(summed, None, weight, 1e-5, target, form)
        for other, formula in formulas.items():
            matching = (normed == formula(summed)).float().mean().item()
            assert matching > 0.99 if other == form else matching < 0.9, f"{form} against {other}: {matching:.3f}"
        h_out, rotated_with_residual = glue.norm_rotate(h, delta, weight, 1e-5, target, form)
        assert torch.equal(h_out, summed) and torch.equal(rotated_with_residual, rotated)


@pytest.mark.parametrize("spread, block_k", [(True, 128), (False, 128), (True, 256)])
def test_the_rotation_launches_split_tokens_and_columns_either_way(spread, block_k, monkeypatch):
    """registry.SPREAD_ROTATION: the rotation's launch (a program a token up to 16 tokens, or tiles of
    16; column blocks of ROTATION_BLOCK_K inputs up to 16 tokens, 256 beyond) and the norm step's (every
    column block a program of its own, or one program walking a token's row: glue.norm_column_programs)
    rotate 16 and 20 tokens of 2-4 column blocks as the float64 butterfly does, and the rotation's launch
    zeroes the output it is handed."""
    from tqc.kernels import registry
    from tqc.kernels.registry import RotationTarget

    monkeypatch.setattr(registry, "SPREAD_ROTATION", spread)
    monkeypatch.setattr(registry, "ROTATION_BLOCK_K", block_k)
    k, group_size = 512, 64  # 2 blocks of glue.MAX_BLOCK_K
    generator = torch.Generator().manual_seed(7)
    signs = torch.randint(0, 2, (k,), generator=generator).double() * 2 - 1
    weight = torch.ones(k, device=DEVICE, dtype=torch.float32)
    target = RotationTarget(signs.float().to(DEVICE), group_size, 0, torch.float32, None)
    for m in (16, 20):
        x = torch.randn(m, k, generator=generator)
        expected = rotate(x.double(), signs, group_size)
        clear = torch.full((m, 3 * k), float("nan"), device=DEVICE)
        assert relative_error(triton_rotate(x.to(DEVICE), signs.float().to(DEVICE), group_size, clear), expected) < 1e-5
        assert torch.equal(clear, torch.zeros_like(clear)), f"the output to add into, {m} tokens"
        normed = F.rms_norm(x.double(), (k,), eps=1e-5)
        _, rotated = glue.norm_rotate(x.to(DEVICE), None, weight, 1e-5, target)
        assert relative_error(rotated, rotate(normed, signs, group_size)) < 1e-5, f"norm step, {m} tokens"


@pytest.mark.parametrize("step", ["norm", "swiglu"])
@pytest.mark.parametrize("strategy", ["fma", "dot-split", "dequant", "dequant-prefill", "int8-split", "int8-dp4a"])
def test_rotation_inside_the_glue_matches_the_separate_steps(step, strategy, monkeypatch):
    """kernels/glue.py: the norm or SwiGLU step writes the rotated input in the order and type the
    matmul wants (on int8 activations rounded, with its scales, in the dp4a kernel's planes for one
    token) and zeroes the output a split-K kernel adds into (here filled with NaN beforehand); with
    glue.MAX_TOKENS raised (TQC_GLUE_MAX_TOKENS), also for a prefill's tokens."""
    n, k, group_size = SHAPES[0]
    if strategy.startswith("int8"):
        module, _ = random_layer(QuantOption.parse("3"), n, k, group_size, "int8")
        kernel = Int8LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
        config = INT8_STRATEGIES[strategy](k // group_size)
    else:
        module, _ = random_layer(QuantOption.parse("4"), n, k, group_size)
        kernel = LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
        config = STRATEGIES[strategy.removesuffix("-prefill")](8)
    tokens = max(count for count in token_counts(config) if count <= glue.MAX_TOKENS)
    if strategy.endswith("-prefill"):
        tokens = 77 if CUDA else 20
        monkeypatch.setattr(glue, "MAX_TOKENS", 128)
    assert config.strategy == "dequant" or kernel.splits(config) > 1  # split over K
    monkeypatch.setattr(kernel, "tuned", lambda count: config)
    monkeypatch.setattr(kernel, "output", lambda count, device, dtype, chosen: None if chosen.strategy == "dequant"
                        else torch.full((count, n), float("nan"), device=device, dtype=dtype))
    monkeypatch.setattr(module, "kernel", kernel)
    dtype, generator = DTYPES[0], torch.Generator().manual_seed(0)
    if step == "norm":
        h, delta = (torch.randn(tokens, k, generator=generator).to(DEVICE, dtype) for _ in range(2))
        weight = (1 + 0.1 * torch.randn(k, generator=generator)).to(DEVICE, dtype)
        h_out, out = glue.norm_linear(module, h, delta, weight, 1e-5)
        assert torch.equal(h_out, h + delta)
        x = F.rms_norm(h + delta, (k,), weight, 1e-5)
    else:
        gate_up = torch.randn(tokens, 2 * k, generator=generator).to(DEVICE, dtype)
        out = glue.swiglu_linear(module, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        x = F.silu(gate) * up
        many = torch.zeros(glue.MAX_TOKENS + 1, 2 * k, device=DEVICE, dtype=dtype)
        assert glue.swiglu_linear(module, many) is None  # a prefill rotates in its own launch
    monkeypatch.undo()
    expected = kernel.run(x, module, config)
    assert relative_error(out, expected.double().cpu()) < TOLERANCE[dtype]


@pytest.mark.parametrize("one_head", [False, True])
@pytest.mark.parametrize("strategy", ["fma", "dot-split"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_o_projs_rotation_combines_the_attentions_slices(shape, strategy, one_head, monkeypatch):
    """glue.attention_linear: the one-launch attention leaves its slices uncombined (its count never
    moves) and o_proj's rotation launch combines them, rotates and zeroes the output the split-K
    kernel adds into (poisoned with NaN): o_proj of the attention's own output, the cache written
    the same; each program on the default's columns or on one head's (or group's: COMBINE_WIDTH).
    Not for several tokens, nor into an output zeroed before (registry.DIRECT_INPUTS), nor with
    COMBINE_IN_ROTATION off."""
    from tqc.kernels import registry
    from tqc.kernels.attention import DecodeAttention

    heads, kv_heads, d, context = shape
    k = heads * d
    group_size = 128 if CUDA else 32
    module, _ = random_layer(QuantOption.parse("4"), 2 * d, k, group_size)
    if one_head:
        monkeypatch.setattr(glue, "COMBINE_WIDTH", max(d, group_size))
    kernel = LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
    config = STRATEGIES[strategy](8)
    assert kernel.splits(config) > 1
    monkeypatch.setattr(kernel, "tuned", lambda count: config)
    monkeypatch.setattr(kernel, "output", lambda count, device, dtype, chosen: torch.full(
        (count, module.out_features), float("nan"), device=device, dtype=dtype))
    monkeypatch.setattr(module, "kernel", kernel)
    dtype, generator = DTYPES[0], torch.Generator().manual_seed(context)
    cache = torch.randn(2, 1, kv_heads, context, d, generator=generator).to(DEVICE, dtype)
    caches = [cache, cache.clone()]  # one for the fused call, one for the attention's own
    attention = DecodeAttention(heads, kv_heads, d, context, DEVICE, split=None if CUDA else 16)
    assert attention.splits > 1
    qkv = torch.randn(1, (heads + 2 * kv_heads) * d, generator=generator).to(DEVICE, dtype)
    pos = torch.tensor([context - attention.split // 2], device=DEVICE)
    assert glue.attention_linear(module, attention, qkv.expand(2, -1).contiguous(), caches[0], pos) is None
    monkeypatch.setattr(glue, "COMBINE_IN_ROTATION", False)
    assert glue.attention_linear(module, attention, qkv, caches[0], pos) is None
    monkeypatch.setattr(glue, "COMBINE_IN_ROTATION", True)
    # o_proj adding attention's output as it comes: it has no launch to combine in
    monkeypatch.setattr(registry, "DIRECT_INPUTS", True)
    monkeypatch.setattr(kernel, "takes_input_as_it_comes", lambda layer, config: True)
    assert glue.attention_linear(module, attention, qkv, caches[0], pos) is None
    monkeypatch.setattr(registry, "DIRECT_INPUTS", False)
    attention.count.fill_(7)  # a combining launch would count on from here
    out = glue.attention_linear(module, attention, qkv, caches[0], pos)
    assert out is not None and torch.equal(attention.count, torch.full_like(attention.count, 7))
    attention.count.zero_()
    attended = attention(qkv, caches[1], pos)
    assert torch.equal(caches[0], caches[1])
    monkeypatch.undo()
    expected = kernel.run(attended, module, config)
    assert relative_error(out, expected.double().cpu()) < TOLERANCE[dtype]


class DirectKernel(LayerKernel):
    """A lookup kernel that claims to take its input as it comes (as the fragment family does, which
    the interpreter cannot run), tuned to `config`; its matmul is the reference's, into the output it
    is given, whose address it records."""

    def configure(self, config: LaunchConfig) -> DirectKernel:
        self.config, self.outputs = config, []
        return self

    def tuned(self, tokens: int) -> LaunchConfig:
        return self.config

    def config_for(self, x: torch.Tensor, module) -> LaunchConfig:
        return self.config

    def takes_input_as_it_comes(self, module, config: LaunchConfig) -> bool:
        return module.rotation_size == 1

    def multiply(self, x, module, config, out, scales=None):
        product = F.linear(x.float(), module.dequantized_weight())
        self.outputs.append(None if out is None else out.data_ptr())
        return product.to(x.dtype) if out is None else out.add_(product.to(out.dtype))


def test_the_norm_before_attention_zeroes_o_projs_output_for_its_next_call(monkeypatch):
    """registry.DIRECT_INPUTS: glue.norm_linear(..., then=o_proj) zeroes o_proj's output in the norm's
    launch, beside q/k/v's (here poisoned with NaN when allocated), and hands it over; o_proj's next
    call on as many tokens adds into it, its input taken as it comes, and gives the layer's output;
    the call after that, with nothing handed over, runs as before. Off, nothing is handed over."""
    from tqc.kernels import registry

    n, k, group_size = SHAPES[0]
    qkv, _ = random_layer(QuantOption.parse("4"), n, k, group_size)
    kernel = LayerKernel(KernelKey.of(qkv.spec), Tuner("none", "none", None))
    config = STRATEGIES["dot-split"](8)
    monkeypatch.setattr(kernel, "tuned", lambda count: config)
    monkeypatch.setattr(qkv, "kernel", kernel)
    o_spec = LayerSpec(QuantOption.parse("4"), group_size, k, 2 * group_size, input_rotated=True)
    o_proj = random_turboquant_linear(o_spec, DEVICE)
    direct = DirectKernel(KernelKey.of(o_spec), Tuner("none", "none", None))
    o_proj.use_kernel(direct.configure(LaunchConfig(strategy="dequant")))  # its own launch: natural order
    tokens, dtype, generator = 5, DTYPES[0], torch.Generator().manual_seed(0)
    h, delta, attention = (torch.randn(tokens, k, generator=generator).to(DEVICE, dtype) for _ in range(3))
    weight = torch.ones(k, device=DEVICE, dtype=dtype)
    glue.norm_linear(qkv, h, delta, weight, 1e-5, then=o_proj)
    assert registry.take_zeroed_output(o_proj, tokens) is None  # DIRECT_INPUTS is off

    monkeypatch.setattr(registry, "DIRECT_INPUTS", True)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
    _, out = glue.norm_linear(qkv, h, delta, weight, 1e-5, then=o_proj)
    monkeypatch.setattr(torch, "empty", empty)
    zeroed = registry.zeroed_output(o_proj).out
    assert zeroed.shape == (tokens, 2 * group_size) and torch.equal(zeroed, torch.zeros_like(zeroed))
    expected_qkv = kernel.run(F.rms_norm(h + delta, (k,), weight, 1e-5), qkv, config)
    assert relative_error(out, expected_qkv.double().cpu()) < TOLERANCE[dtype]
    expected = F.linear(attention.double().cpu(), o_proj.dequantized_weight(torch.float64).cpu())  # no rotation
    assert relative_error(o_proj(attention), expected) < TOLERANCE[dtype]
    assert o_proj.kernel.outputs == [zeroed.data_ptr()] and registry.take_zeroed_output(o_proj, tokens) is None
    assert relative_error(o_proj(attention), expected) < TOLERANCE[dtype]  # its own output, through `run`
    assert o_proj.kernel.outputs[1:] == [None]


def tiny_quantized_model(dtype: torch.dtype, family: str = "llama", fold: bool = False):
    """A one-layer random Llama or Gemma 3 (hidden 256, MLP 512) with every projection at 4 bits,
    q/k/v and gate/up fused as `tqc.load` fuses them, on DEVICE, on the reference path; with `fold`,
    o_proj's rotation folded into v_proj as `tqc build` folds it (plan seed 0)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from tqc.folding import fold_value_rotations
    from tqc.fusion import fuse_siblings
    from tqc.layout import rotation_seed
    from tqc.linear import quantize_linear

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[family]
    config = config_class(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, vocab_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = model_class(config).eval()
    layer = model.model.layers[0]
    seeds = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 3, "up_proj": 3, "down_proj": 4}
    specs = {name: LayerSpec(QuantOption.parse("4"), 64, child.in_features, child.out_features)
             for parent in (layer.self_attn, layer.mlp) for name, child in parent.named_children() if name in seeds}
    if fold:
        o_name = "model.layers.0.self_attn.o_proj"
        specs["o_proj"] = fold_value_rotations(model, {o_name: specs["o_proj"]}, 0)[o_name]
        seeds["o_proj"] = rotation_seed(0, o_name)
    for parent in (layer.self_attn, layer.mlp):
        for name, child in list(parent.named_children()):
            if name in seeds:
                setattr(parent, name, quantize_linear(child, specs[name], seeds[name]))
    fuse_siblings(model)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model.to(DEVICE)


def tiny_model_on_kernels(dtype: torch.dtype, family: str = "llama"):
    """tiny_quantized_model with each projection on its generated kernel at a fixed launch (fma for
    one token, split over K on tensor cores for more)."""
    from tqc.linear import QuantizedLinear

    model = tiny_quantized_model(dtype, family)
    configs = {1: LaunchConfig(strategy="fma", block_n=64, slots=8), 3: LaunchConfig(strategy="dot", block_n=64, slots=8)}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            prepare(module)
            kernel = LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
            kernel.tuned = configs.get
            kernel.config_for = lambda x, layer: configs[x.shape[0]]
            module.use_kernel(kernel)
    return model


@pytest.mark.parametrize(("family", "tokens"), [("llama", 1), ("gemma3", 3)])
def test_hugging_face_norms_and_mlp_rotate_for_the_next_layer(family, tokens, monkeypatch):
    """kernels/hf_glue.py in a Llama and a Gemma 3 (its norm with 1 + weight, its GELU) on the
    generated kernels: the norms and SwiGLU write the next layer's rotated input (the norm before
    the MLP adding the residual too; in the Llama SwiGLU primes down_proj's output with the
    residual after the MLP, Gemma 3 norms the MLP's output first), so only o_proj rotates in a
    launch of its own, and the logits are those of the separate rotation launches."""
    from tqc.kernels import glue, hf_glue, registry

    model = tiny_model_on_kernels(DTYPES[0], family)
    assert hf_glue.install(model) == 4
    residuals, primed = [], []
    norm_rotate, swiglu_rotate = glue.norm_rotate, glue.swiglu_rotate
    monkeypatch.setattr(glue, "norm_rotate", lambda h, delta, *args: residuals.append(delta is not None)
                        or norm_rotate(h, delta, *args))
    monkeypatch.setattr(glue, "swiglu_rotate", lambda gate_up, target, *args: primed.append(target.clear_from is not None)
                        or swiglu_rotate(gate_up, target, *args))
    rotations = []
    separate_rotate = registry.rotate
    monkeypatch.setattr(registry, "rotate", lambda *args, **kwargs: rotations.append(1) or separate_rotate(*args, **kwargs))
    ids = torch.arange(1, tokens + 1, device=DEVICE)[None]
    with torch.no_grad():
        fused = model(input_ids=ids).logits.float()
        assert len(rotations) == 1
        assert residuals == [False, True]
        assert primed == [family == "llama"]
        monkeypatch.setattr(hf_glue, "ENABLED", False)
        separate = model(input_ids=ids).logits.float()
    assert len(rotations) == 1 + 4  # q/k/v, o_proj, gate/up, down_proj
    assert separate.std() > 0
    assert relative_error(fused, separate.double().cpu()) < TOLERANCE[DTYPES[0]]


@pytest.mark.parametrize("compiled_steps", [True, False] if CUDA else [True])  # tests/test_fusion.py: False on CPU
def test_hugging_face_glue_compiled_matches_eager(compiled_steps, monkeypatch):
    """Compiled, a Llama with kernels/hf_glue.py's modules gives the eager logits (one token; on a
    GPU three too): with hf_glue.COMPILED its fused steps run as custom ops (the norm before the
    MLP adding the residual, SwiGLU priming down_proj's output with the one after), else inductor
    traces Hugging Face's formulas and no fused step runs."""
    from tqc.kernels import glue, hf_glue

    model = tiny_model_on_kernels(DTYPES[0])
    hf_glue.install(model)
    monkeypatch.setattr(hf_glue, "COMPILED", compiled_steps)
    steps, norm_rotate, swiglu_rotate = [], glue.norm_rotate, glue.swiglu_rotate
    monkeypatch.setattr(glue, "norm_rotate", lambda h, delta, *args: steps.append(("norm", delta is not None))
                        or norm_rotate(h, delta, *args))
    monkeypatch.setattr(glue, "swiglu_rotate", lambda gate_up, target, *args: steps.append(
        ("swiglu", target.clear_from is not None)) or swiglu_rotate(gate_up, target, *args))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for tokens in (1, 3) if CUDA else (1,):
            ids = torch.arange(1, tokens + 1, device=DEVICE)[None]
            eager = model(input_ids=ids).logits.float()
            compiled(input_ids=ids)
            steps.clear()
            error = relative_error(compiled(input_ids=ids).logits.float(), eager.double().cpu())
            assert error < TOLERANCE[DTYPES[0]], f"{tokens} tokens: {error:.2e}"
            assert steps == ([("norm", False), ("norm", True), ("swiglu", True)] if compiled_steps else [])


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_tuned_call_matches_reference(tmp_path):
    """The full path a loaded model takes: tune once (stored), then run the chosen configuration."""
    option = TURBOQUANT_OPTIONS[-1]
    n, k, group_size = SHAPES[0]
    module, original = random_layer(option, n, k, group_size)
    timer = time_once if INTERPRET else None  # events need a GPU
    tuner = Tuner("test-gpu", "test", tmp_path / "tune.json", timer=timer)
    kernel = LayerKernel(KernelKey.of(module.spec), tuner)
    offered = []  # the candidate lists asked for: once a token bucket (a decode step must not rebuild them)
    own = kernel.candidates  # interpreted only two of them: timing every one would take minutes
    kernel.candidates = lambda bucket: offered.append(bucket) or own(bucket)[:None if CUDA else 2]
    x = torch.randn(3, k).to(DEVICE, DTYPES[0])
    out = kernel(x, module)
    assert relative_error(out, reference(original, x)) < TOLERANCE[DTYPES[0]]
    again = kernel(x, module)  # the stored choice (split over K, sums may land in another order)
    assert relative_error(again, reference(original, x)) < TOLERANCE[DTYPES[0]]
    assert offered == [token_bucket(3)], f"candidate lists asked for: {offered}"
    assert (tmp_path / "tune.json").is_file()
    assert Tuner("test-gpu", "test", tmp_path / "tune.json").data.entries.keys() == tuner.data.entries.keys()


if CUDA:  # the compiled lookups (inline PTX) run only on a GPU
    from triton.runtime.errors import OutOfResources

    from tqc.kernels.precompile import run_jobs

    @pytest.mark.parametrize("option", ["4", "3", "2", "4+2"])
    @pytest.mark.parametrize("bucket", [1, 16, 4096])
    def test_every_tuning_candidate_matches_reference(option, bucket):
        """Whatever the tuner may choose is correct: each candidate launch configuration of a key.

        The lookups rely on Triton handing each packed asm call the two columns of one word, which
        depends on the register layout a configuration gets; so no candidate is trusted untested.
        """
        n, k, group_size = SHAPES[0]
        module, original = random_layer(QuantOption.parse(option), n, k, group_size)
        kernel = LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
        x = torch.randn(min(bucket, 77), k, generator=torch.Generator().manual_seed(bucket)).to(DEVICE, torch.float16)
        expected = reference(original, x)
        candidates = kernel.candidates(bucket)
        # compiled in worker processes first: one by one, the 16-token candidates of 4+2 took over 400 s (run 236)
        run_jobs([(kernel.key, len(x), config) for config in candidates], dtype="float16")
        ran = 0
        for config in candidates:
            try:
                out = kernel.run(x, module, config)
            except OutOfResources:  # the tuner skips what this GPU cannot run
                continue
            error = relative_error(out, expected)
            assert error < TOLERANCE[torch.float16], f"{option} {config.model_dump()}: {error:.2e}"
            ran += 1
        assert ran > 0

    @pytest.mark.parametrize("tokens", [1, 16])
    def test_direct_launch_matches_triton_launch(tokens, monkeypatch):
        """Repeated calls skip Triton's argument binding (kernels/launch.py) and still compute what
        Triton's own launches compute, bit for bit (whole-K configurations add in a fixed order),
        with fresh tensors each call and with an input 2 bytes past a 16-byte boundary."""
        from tqc.kernels import launch as launch_module

        n, k, group_size = SHAPES[0]
        module, _ = random_layer(QuantOption.parse("4"), n, k, group_size)
        kernel = LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
        strategy = "fma" if tokens == 1 else "dot"
        config = LaunchConfig(strategy=strategy, block_n=16, block_m=16, slots=min(slot_choices(4, 0)), whole_k=True)
        x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(DEVICE, torch.float16)
        misaligned = torch.empty(tokens * k + 8, device=DEVICE, dtype=torch.float16)[1:tokens * k + 1].view(tokens, k)
        misaligned.copy_(x)
        monkeypatch.setattr(launch_module, "ENABLED", False)
        expected = kernel.run(x, module, config)
        monkeypatch.setattr(launch_module, "ENABLED", True)
        monkeypatch.setattr(launch_module, "_compiled", {})
        for inputs in (x, x.clone(), x.clone(), misaligned, misaligned):
            assert torch.equal(kernel.run(inputs, module, config), expected)
        assert len(launch_module._compiled) == 3  # the rotation of each input, the matmul of its fresh output

    def test_direct_launch_replays_from_a_cuda_graph():
        """A layer call captured after its launches went direct (as a compiled, graphed decode step
        captures them) replays on new input what an eager call computes."""
        n, k, group_size = SHAPES[0]
        module, _ = random_layer(QuantOption.parse("4"), n, k, group_size)
        kernel = LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
        config = LaunchConfig(strategy="fma", block_n=16, slots=min(slot_choices(4, 0)), whole_k=True)
        x, other = (torch.randn(1, k, generator=torch.Generator().manual_seed(s)).to(DEVICE, torch.bfloat16)
                    for s in (1, 2))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up off the default stream, as torch.cuda.graph wants
            for _ in range(2):  # the second call goes direct
                kernel.run(x, module, config)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = kernel.run(x, module, config)
        x.copy_(other)
        graph.replay()
        assert torch.equal(captured, kernel.run(other, module, config))

    @pytest.mark.parametrize("bits", [2, 3, 4])
    @pytest.mark.parametrize("bucket", [1, 16, 64, 4096])
    def test_every_int8_candidate_matches_reference(bits, bucket):
        """As above, for the int8 family (its decode is packed asm too)."""
        n, k, group_size = SHAPES[1]
        module, original = random_layer(QuantOption("turboquant", bits), n, k, group_size, "int8")
        kernel = Int8LayerKernel(KernelKey.of(module.spec), Tuner("none", "none", None))
        x = torch.randn(min(bucket, 77), k, generator=torch.Generator().manual_seed(bucket)).to(DEVICE, torch.bfloat16)
        expected = reference(original, x)
        for config in kernel.candidates(bucket):
            error = relative_error(kernel.run(x, module, config), expected)
            assert error < TOLERANCE[torch.bfloat16], f"{bits}-bit {config.model_dump()}: {error:.2e}"


    @pytest.mark.parametrize("activations", ["fp16", "int8"])
    @pytest.mark.parametrize("tokens", [1, 5])
    def test_decoder_with_the_rotation_in_the_glue_matches_separate_rotations(tokens, activations):
        """kernels/decode_bench.py's decoder on the generated kernels, a decode step and a prefill:
        the norm and SwiGLU steps rotating the next layer's input (on int8 activations: rounding
        it) compute what separate rotation launches compute."""
        from tqc.kernels.decode_bench import MIXED_PLAN, Decoder, int8_name, quantized_factory
        from tqc.kernels.registry import KernelRegistry

        tiny = {"hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 2, "head_dim": 64, "vocab": 256}
        registry = KernelRegistry(Tuner("test-gpu", "test", None, timer=time_once))  # any candidate will do
        token, pos = torch.arange(1, tokens + 1, device=DEVICE), torch.arange(tokens, device=DEVICE)
        outputs = []
        for rotate_in_glue in (False, True):
            torch.manual_seed(0)
            plan = {name: int8_name(option, activations) for name, option in MIXED_PLAN.items()}
            model = Decoder(quantized_factory(plan, registry), tiny, layers=2, context=8,
                            rotate_in_glue=rotate_in_glue)
            with torch.no_grad():
                model(token, pos)  # tunes
                outputs.append(model(token, pos).float())
        assert outputs[0].std() > 0
        assert relative_error(outputs[1], outputs[0].double().cpu()) < TOLERANCE[torch.bfloat16]

    @pytest.mark.parametrize("fragments", [False, True])
    def test_decoder_combining_the_attention_in_o_projs_rotation_matches(fragments, monkeypatch):
        """`tqc bench decode`'s decoder on the one-launch attention over several slices: with the slices
        combined in o_proj's rotation launch (glue.COMBINE_IN_ROTATION, once a layer) a decode step
        after a prefill gives the logits that the attention's own combining gives, on either kernel family
        (each layer on its first candidate, which the tuner keeps untimed: the only one compiled)."""
        from tqc.kernels.decode_bench import MIXED_PLAN, Decoder, quantized_factory
        from tqc.kernels.registry import KernelRegistry

        untimed = KernelRegistry(Tuner("test-gpu", "test", None, timer=lambda run: 0.0), fragments=fragments)
        combined = []
        combine_rotate = glue.combine_rotate
        monkeypatch.setattr(glue, "combine_rotate", lambda *a: combined.append(1) or combine_rotate(*a))
        outputs = []
        for in_rotation in (False, True):
            monkeypatch.setattr(glue, "COMBINE_IN_ROTATION", in_rotation)
            torch.manual_seed(0)
            model = Decoder(quantized_factory(dict(MIXED_PLAN), untimed), TINY_DECODER, layers=2, context=256,
                            rotate_in_glue=True, attention="triton")
            with torch.no_grad():
                model(torch.arange(1, 6, device=DEVICE), torch.arange(5, device=DEVICE))
                for _ in range(2):  # tunes, then runs tuned
                    combined.clear()
                    logits = model(torch.tensor([9], device=DEVICE), torch.tensor([5], device=DEVICE)).float()
            outputs.append(logits)
        assert model.blocks[0].decode_attention.splits > 1 and len(combined) == 2
        assert outputs[0].std() > 0
        assert relative_error(outputs[1], outputs[0].double().cpu()) < TOLERANCE[torch.bfloat16]

    @pytest.mark.parametrize("tokens", [1, 3])
    def test_decoder_with_o_proj_reading_attention_directly_matches(tokens, monkeypatch):
        """registry.DIRECT_INPUTS on the fragment family: o_proj (folded) adds attention's bf16 output
        times its weights into the output the q/k/v norm zeroed, with no launch before it; the decoder
        computes what it computes with o_proj's own launch (a conversion and a zeroing)."""
        from tqc.kernels import registry
        from tqc.kernels.decode_bench import MIXED_PLAN, Decoder, quantized_factory

        kernels = registry.KernelRegistry(Tuner("test-gpu", "test", None, timer=time_once), fragments=True)
        token, pos = torch.arange(1, tokens + 1, device=DEVICE), torch.arange(tokens, device=DEVICE)
        taken = []
        take = registry.take_zeroed_output
        monkeypatch.setattr(registry, "take_zeroed_output", lambda *a: taken.append(out := take(*a)) or out)
        outputs = []
        for direct in (False, True):
            monkeypatch.setattr(registry, "DIRECT_INPUTS", direct)
            torch.manual_seed(0)
            model = Decoder(quantized_factory(dict(MIXED_PLAN), kernels, fold=True), TINY_DECODER, layers=2, context=8,
                            rotate_in_glue=True)
            with torch.no_grad():
                model(token, pos)  # tunes
                taken.clear()
                outputs.append(model(token, pos).float())
        assert sum(out is not None for out in taken) == 2  # o_proj of each layer, on the second model
        assert outputs[0].std() > 0
        assert relative_error(outputs[1], outputs[0].double().cpu()) < TOLERANCE[torch.bfloat16]

    @pytest.mark.parametrize("tokens", [1, 3, 40])
    def test_model_on_the_fragment_family_matches_the_reference_path(tokens, tmp_path):
        """attach(model, fragments=True): every projection of a Llama on the fragment family (tuned:
        one token on CUDA or tensor cores, 3 on tensor cores, 40 dequantized), the norms and SwiGLU
        rotating for it, gives the reference path's logits."""
        from tqc.kernels import attach
        from tqc.linear import QuantizedLinear

        model = tiny_quantized_model(torch.bfloat16)
        ids = torch.arange(1, tokens + 1, device=DEVICE)[None]
        with torch.no_grad():
            expected = model(input_ids=ids).logits.float()
            assert attach(model, cache_dir=tmp_path, fragments=True) == 4
            assert all(isinstance(m.kernel, FragmentLayerKernel) for m in model.modules() if isinstance(m, QuantizedLinear))
            got = model(input_ids=ids).logits.float()
        assert expected.std() > 0
        assert relative_error(got, expected.double().cpu()) < TOLERANCE[torch.bfloat16]

    @pytest.mark.parametrize("tokens", [1, 3])
    def test_loaded_model_with_o_proj_reading_attention_directly_matches_the_reference_path(tokens, tmp_path,
                                                                                           monkeypatch):
        """A Llama with o_proj folded, on the fragment family with registry.DIRECT_INPUTS: the attention
        norm (hf_glue) zeroes o_proj's output, o_proj reads attention's output as it comes, and the
        logits are the reference path's. Each layer runs its first candidate, which the tuner keeps
        untimed (timing every one-token candidate outlasted 200 s in run 240)."""
        from tqc.kernels import attach, registry

        untimed = Tuner("test-gpu", "test", None, timer=lambda run: 0.0)
        monkeypatch.setattr(Tuner, "for_device", classmethod(lambda cls, *args, **kwargs: untimed))
        monkeypatch.setattr(registry, "DIRECT_INPUTS", True)
        model = tiny_quantized_model(torch.bfloat16, fold=True)
        assert model.model.layers[0].self_attn.o_proj.spec.input_rotated
        ids = torch.arange(1, tokens + 1, device=DEVICE)[None]
        taken = []
        take = registry.take_zeroed_output
        monkeypatch.setattr(registry, "take_zeroed_output", lambda *a: taken.append(out := take(*a)) or out)
        with torch.no_grad():
            expected = model(input_ids=ids).logits.float()
            attach(model, cache_dir=tmp_path, fragments=True)
            model(input_ids=ids)  # picks the first candidates
            taken.clear()
            got = model(input_ids=ids).logits.float()
        assert sum(out is not None for out in taken) == 1
        assert expected.std() > 0
        assert relative_error(got, expected.double().cpu()) < TOLERANCE[torch.bfloat16]




@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_hf_attention_decodes_as_sdpa_does_through_static_and_dynamic_caches(family, monkeypatch):
    """kernels/hf_attention.py: a tiny model of `family` in fp16, its attention installed on the
    kernel, decodes token by token through a static cache (a bool mask), a dynamic one (no mask)
    and a TurboQuant one (3-bit keys, 2-bit values past the last 4 positions) to the logits of the
    same model on "sdpa"; each of those steps ran the kernel, and a prompt of several tokens did not
    (it goes to sdpa). Through the static cache every family's attention (Qwen3's and Gemma 3's q/k
    norms first) writes the token into the cache in the kernel's launch, the rotary embedding
    applied there (decode_forward), after the first token (which makes the cache): the first
    layer's values bit for bit, its keys too where interpreted. Gemma 3's first layer attends to
    the last 3 positions of the 8, through a full-length layer and the mask (as StaticDecoder's)."""
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    from tiny_models import FAMILIES, IDS
    from tqc.kernels import hf_attention
    from tqc.kv_cache import TurboQuantCache, chunked_logits, full_length_static_cache

    kernel, calls = hf_attention.cached_attention, []
    monkeypatch.setattr(hf_attention, "cached_attention",
                        lambda *args, **kwargs: calls.append("token" in kwargs) or kernel(*args, **kwargs))
    class_name, extra = FAMILIES[family]
    if family == "gemma3_text":
        extra = {**extra, "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]}
    config = getattr(transformers, class_name)(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1024, max_position_embeddings=256, attn_implementation="sdpa", **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(DEVICE, torch.float16).eval()
    caches = {"static": lambda: full_length_static_cache(model.config, 24),
              "dynamic": lambda: DynamicCache(config=model.config),
              "turboquant": lambda: TurboQuantCache(model.config, residual_length=4)}  # tqc's KV-cache mode
    ids = IDS.to(DEVICE)
    made = {name: make() for name, make in caches.items()}
    expected = {name: chunked_logits(model, ids, cache, chunk=1) for name, cache in made.items()}
    assert hf_attention.install(model) and model.config._attn_implementation == hf_attention.NAME
    assert not calls
    chunked_logits(model, ids, caches["static"](), chunk=ids.shape[1])
    assert not calls
    layers = config.num_hidden_layers
    for name, make in caches.items():
        cache = make()
        logits = chunked_logits(model, ids, cache, chunk=1)
        assert calls == [False] * layers + [name == "static"] * (ids.shape[1] - 1) * layers, name
        assert relative_error(logits, expected[name].double().cpu()) < TOLERANCE[torch.float16], name
        if name == "static":  # the first layer's projections are the same, the later ones' inputs are not
            first, want = cache.layers[0], made[name].layers[0]
            assert int(first.cumulative_length) == ids.shape[1]
            assert torch.equal(first.values, want.values)
            if INTERPRET:  # the GPU's rotary embedding differs in the last bit at places (H100, run 172)
                assert torch.equal(first.keys, want.keys)
            assert relative_error(first.keys, want.keys.double().cpu()) < TOLERANCE[torch.float16] / 10
        calls.clear()


if CUDA:  # CUDA graphs (tests/test_generation.py checks the eager loop on the CPU); the interpreted run skips nothing
    @pytest.mark.parametrize("family", ["llama", "gemma3"])
    def test_static_decoder_replays_the_compiled_step_from_a_graph(family):
        """tqc.generation.StaticDecoder on a model on the generated kernels, with tqc's glue and
        attention: replaying the graph gives the tokens of the same compiled step called token by token
        (so the position, the cache's own count and the mask advance inside the graph), for two prompts
        in turn; a seeded sampled run repeats; the compiled prompt gives the eager prompt's logits.
        Gemma 3's layer attends to a window of 3 positions, which the 15 tokens pass."""
        from tqc.generation import Sampling, StaticDecoder
        from tqc.kernels import hf_attention, hf_glue

        model = tiny_model_on_kernels(torch.float16, family)
        if family == "gemma3":
            model.config.sliding_window = model.model.layers[0].self_attn.sliding_window = 3
        model.set_attn_implementation("sdpa")
        assert hf_glue.install(model) and hf_attention.install(model)
        torch._dynamo.reset()
        decoder = StaticDecoder(model, max_length=32)
        for prompt in ([1, 5, 9], [7, 3, 2]):  # three tokens: tiny_model_on_kernels' launch for a prompt
            ids = torch.tensor([prompt], device=DEVICE)
            graphed = decoder.generate(ids, 12)
            with torch.no_grad():
                decoder._prefill(ids, Sampling())
                for _ in range(11):
                    decoder._step(Sampling())
            assert torch.equal(graphed, decoder.tokens[:, : len(prompt) + 12]), prompt
        sampled = [decoder.generate(ids, 12, temperature=1.0, seed=0) for _ in range(2)]
        assert torch.equal(*sampled)
        prompt_logits = []
        with torch.no_grad():
            for forward in (decoder._prefill_forward, model):  # the prompt compiled with dynamic shapes, and eager
                decoder.cache.reset()
                prompt_logits.append(forward(input_ids=ids, cache_position=torch.arange(ids.shape[1], device=DEVICE),
                                             **decoder.forward_kwargs).logits.float())
        assert decoder._prefill_forward is not model
        assert relative_error(prompt_logits[0], prompt_logits[1].double().cpu()) < TOLERANCE[torch.float16]


def test_hf_attention_writes_the_token_inside_a_compiled_step(monkeypatch):
    """Under torch.compile decode_forward's launch is one op (tqc::write_and_attend) that writes the
    static cache in place: a tiny Llama decoding token by token after a prompt gives the eager
    logits and first-layer cache, each step through the op."""
    from transformers import AutoModelForCausalLM, LlamaConfig, StaticCache

    from tiny_models import IDS
    from tqc.kernels import hf_attention
    from tqc.kv_cache import cache_argument

    writes, write_and_attend = [], hf_attention.write_and_attend
    monkeypatch.setattr(hf_attention, "write_and_attend", lambda *args: writes.append(1) or write_and_attend(*args))
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(DEVICE, torch.float16).eval()
    assert hf_attention.install(model)
    ids = IDS.to(DEVICE)

    def decode(forward):
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            forward(input_ids=ids[:, :2], **cache_argument(model, cache))
            steps = [forward(input_ids=ids[:, i : i + 1], **cache_argument(model, cache)).logits
                     for i in range(2, ids.shape[1])]
        return torch.cat(steps, dim=1).float(), cache.layers[0]

    eager, eager_layer = decode(model)
    torch._dynamo.reset()
    writes.clear()
    compiled, compiled_layer = decode(torch.compile(model))
    assert len(writes) == (ids.shape[1] - 2) * config.num_hidden_layers
    assert relative_error(compiled, eager.double().cpu()) < TOLERANCE[torch.float16]
    for got, want in ((compiled_layer.keys, eager_layer.keys), (compiled_layer.values, eager_layer.values)):
        written = slice(2, ids.shape[1])  # inductor rounds the prompt's rotary embedding its own way
        assert want[:, :, written].std() > 0
        assert relative_error(got[:, :, written], want[:, :, written].double().cpu()) < TOLERANCE[torch.float16]


def test_decode_forward_combines_the_attention_in_o_projs_rotation(monkeypatch):
    """A Llama on the generated kernels decoding through a static cache: each step's attention ends
    with its slices, which the launch that rotates o_proj's input combines (glue.slices_linear),
    with the logits of the attention combining its own (glue.COMBINE_IN_ROTATION off)."""
    from transformers import StaticCache

    from tqc.kernels import glue, hf_attention, hf_glue
    from tqc.kv_cache import cache_argument

    model = tiny_model_on_kernels(torch.float16)
    model.set_attn_implementation("sdpa")
    assert hf_glue.install(model) and hf_attention.install(model)
    combined, combine_rotate = [], glue.combine_rotate
    monkeypatch.setattr(glue, "combine_rotate", lambda *args: combined.append(1) or combine_rotate(*args))
    ids = torch.tensor([[1, 5, 9, 2, 33, 7]], device=DEVICE)

    def decode() -> torch.Tensor:
        cache = StaticCache(config=model.config, max_cache_len=256)  # four slices of 64, three of them empty
        with torch.no_grad():
            model(input_ids=ids[:, :3], **cache_argument(model, cache))  # three: tiny_model_on_kernels' prompt
            steps = [model(input_ids=ids[:, i : i + 1], **cache_argument(model, cache)).logits
                     for i in range(3, ids.shape[1])]
        return torch.cat(steps, dim=1).float()

    fused = decode()
    assert len(combined) == ids.shape[1] - 3
    monkeypatch.setattr(glue, "COMBINE_IN_ROTATION", False)
    separate = decode()
    assert len(combined) == ids.shape[1] - 3
    assert separate.std() > 0
    assert relative_error(fused, separate.double().cpu()) < TOLERANCE[torch.float16]


def test_hf_attention_generates_a_left_padded_batch_as_sdpa_does(monkeypatch):
    """Two prompts of different lengths, left-padded, through `generate` with a static cache: each
    sequence's mask row differs (padding, then what it holds), and every step after the prompt
    runs the kernel, writing its token, with the same tokens and logits as "sdpa"."""
    from transformers import AutoModelForCausalLM, LlamaConfig, StaticCache

    from tqc.kernels import hf_attention
    from tqc.kv_cache import cache_argument

    kernel, calls = hf_attention.cached_attention, []
    monkeypatch.setattr(hf_attention, "cached_attention",
                        lambda *args, **kwargs: calls.append((args[0].shape[0], "token" in kwargs))
                        or kernel(*args, **kwargs))
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, attn_implementation="sdpa", pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(DEVICE, torch.float16).eval()
    ids = torch.tensor([[0, 0, 0, 5, 17, 300], [7, 8, 9, 10, 11, 12]], device=DEVICE)
    padding = (ids != 0).long()

    def generate():
        cache = StaticCache(config=model.config, max_cache_len=16)
        return model.generate(input_ids=ids, attention_mask=padding, max_new_tokens=4, do_sample=False,
                              disable_compile=True, output_logits=True, return_dict_in_generate=True,
                              **cache_argument(model, cache))

    expected = generate()
    assert hf_attention.install(model)
    out = generate()
    # the prompt on sdpa, then three steps of both sequences, each writing its token (decode_forward)
    assert calls == [(2, True)] * 3 * config.num_hidden_layers
    assert torch.equal(out.sequences, expected.sequences)
    assert relative_error(torch.stack(out.logits), torch.stack(expected.logits).double().cpu()) < TOLERANCE[torch.float16]

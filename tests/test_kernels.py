"""tqc.kernels on CPU: kernel layout, registry, tuning cache, attach; and the interpreted accuracy run.

The kernels themselves are checked against the reference path by tests/test_kernels_accuracy.py,
which this module runs under TRITON_INTERPRET=1 in a subprocess (the variable changes how
`triton.jit` decorates, so it must never reach this process).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import numpy as np
from triton.runtime.errors import OutOfResources

from tqc.bitpack import pack
from tqc.codebook import gaussian_codebook, high_byte_codebook
from tqc.kernels import attach, detach, fragments, lut
from tqc.kernels.repack import slot_words, to_bitpack_layout, to_kernel_layout
from tqc.kernels.tuning import STREAM_BYTES, LaunchConfig, Tuner, TuneFile, candidate_configs, stream_copies, token_bucket
from tqc.layout import LayerSpec
from tqc.linear import TurboQuantLinear
from tqc.options import QuantOption

ROOT = Path(__file__).resolve().parents[1]
LAYER_SHAPES = [(4096, 128), (14336, 128), (576, 64), (1536, 128), (3584, 128), (96, 32)]  # (K, group size)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("k", "group_size"), LAYER_SHAPES)
def test_kernel_layout_round_trip_is_exact(bits, k, group_size):
    codes = torch.randint(0, 2**bits, (5, k), generator=torch.Generator().manual_seed(k + bits))
    packed = pack(codes, bits)
    words = to_kernel_layout(packed, bits, k, group_size)
    assert words.shape == packed.shape and words.dtype == torch.int32
    assert torch.equal(to_bitpack_layout(words, bits, k, group_size), packed)


def decode_like_the_kernels(words: np.ndarray, bits: int, k: int, b: int, high_bytes: bool = False,
                            word_masks: bool = False) -> np.ndarray:
    """Every code of a kernel-layout row block, decoded by lut.py's emulation of the kernels' PTX (2 bits
    with `high_bytes`: lut.HIGH_CRUMB_ASM's; 2 and 3 bits with `word_masks`: the selectors masked once a
    word): [N, K]."""
    n, chunks = words.shape[0], k // (32 * b)
    values = np.zeros((n, chunks, 32, b), np.float32)
    for quad in range(8):  # slots 4 quad .. 4 quad + 3 of a chunk
        if bits == 4:
            word, q = words.reshape(n, chunks, 4, b)[:, :, quad // 2], quad % 2
            pairs = lut.emulate_quad(word, 4, 16 * q, word, 4 * q)
        else:
            r = quad % 4
            crumbs = words[:, : k // 16].reshape(n, chunks, 2, b)[:, :, quad // 4]
            signs = words[:, k // 16 :].reshape(n, chunks, b) if bits == 3 else None
            pairs = lut.emulate_quad(crumbs, bits, 16 * (r // 2) + 2 * (r % 2), signs, quad, high_bytes, word_masks)
        for p, half2 in enumerate(pairs):
            pair = lut.half2_values(half2)
            values[:, :, 4 * quad + 2 * p], values[:, :, 4 * quad + 2 * p + 1] = pair[..., 0], pair[..., 1]
    return values.reshape(n, k)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("k", "group_size"), [(4096, 128), (576, 64)])
def test_register_lookups_decode_every_code_of_the_kernel_layout(bits, k, group_size):
    """The PRMT tables and selectors (emulated bit for bit) turn each stored code into its fp16 codebook value."""
    codes = torch.randint(0, 2**bits, (6, k), generator=torch.Generator().manual_seed(bits + k))
    words = to_kernel_layout(pack(codes, bits), bits, k, group_size).numpy().view(np.uint32)
    decoded = decode_like_the_kernels(words, bits, k, slot_words(k, group_size))
    assert np.array_equal(decoded, gaussian_codebook(bits).half().float()[codes].numpy())


def test_high_byte_lookups_give_the_2_bit_values_by_three_prmts_a_quad():
    """lut.HIGH_CRUMB_ASM (the one-token kernel's HIGH_BYTES): its table holds fp16 numbers whose low bytes
    are all zero, so a quad is one lookup of high bytes and two PRMTs that put zero bytes under them; the
    values it gives (emulated bit for bit), times lut.HIGH_BYTE_FACTOR, are the 2-bit codebook's to 0.04%."""
    assert lut.table_words(2, high_bytes=True)[0] == 0 and lut.HIGH_CRUMB_ASM.count("prmt.b32") == 3
    k, group_size = 4096, 128
    codes = torch.randint(0, 4, (6, k), generator=torch.Generator().manual_seed(2))
    words = to_kernel_layout(pack(codes, 2), 2, k, group_size).numpy().view(np.uint32)
    decoded = decode_like_the_kernels(words, 2, k, slot_words(k, group_size), high_bytes=True)
    assert set(np.unique(np.abs(decoded))) == set(lut.HIGH_BYTE_LEVELS)
    np.testing.assert_allclose(decoded * lut.HIGH_BYTE_FACTOR, gaussian_codebook(2)[codes].numpy(), rtol=4e-4)


def test_high_byte_codebook_decodes_3_bit_codes_by_three_prmts_a_quad():
    """codebook.high_byte_codebook(3) (scripts/grid_codebook.py) as the signed selectors would look it up (each
    nibble a stored code, sign << 2 | magnitude, as SIGN_SELECTORS builds them): one PRMT of the 8 signed levels'
    high bytes and lut.HIGH_CRUMB_ASM's two PRMTs that put zero bytes under them give every code's level times the
    factor, bit for bit."""
    levels, factor = high_byte_codebook(3)
    signed = (np.concatenate([levels.numpy()[4:], -levels.numpy()[4:]]) * factor).astype(np.float16)
    highs = signed.view(np.uint16) >> 8
    table = (np.uint32(lut.byte_word(highs[:4])), np.uint32(lut.byte_word(highs[4:])))
    codes = np.random.default_rng(3).integers(0, 8, (1000, 4)).astype(np.uint32)
    selectors = np.bitwise_or.reduce(codes << (4 * np.arange(4, dtype=np.uint32)), axis=-1)
    high = lut.prmt(*table, selectors)
    pairs = [lut.prmt(high, np.uint32(0), np.uint32(order)) for order in (lut.HIGH_PAIR_LOWS, lut.HIGH_PAIR_HIGHS)]
    decoded = np.concatenate([lut.half2_values(pair) for pair in pairs], -1)
    np.testing.assert_array_equal(decoded, signed.astype(np.float32)[codes])


def test_option_3g_looks_its_codes_up_by_high_bytes_in_the_one_token_kernel():
    """Option 3g (3 bits on codebook.high_byte_codebook(3)): its kernel key is its own (tuned apart from 3's), its
    tables hold the grid's levels, and the fragment family's one-token row-sum configs look its codes up by high
    bytes (HIGH_BYTES, the table of lut.high_byte_signed_values, low bytes zero); option 3's never, nor 16 tokens'."""
    from tqc.kernels.registry import FRAGMENT_LAYOUT, FragmentLayerKernel, KernelKey

    def family(option: str) -> FragmentLayerKernel:
        spec = LayerSpec(QuantOption.parse(option), 128, 4096, 1024)
        return FragmentLayerKernel(KernelKey.of(spec, FRAGMENT_LAYOUT), Tuner("none", "none", None))

    grid, lloyd_max = family("3g"), family("3")
    assert grid.key.name == "b3gr0g128n1024k4096fr" and lloyd_max.key.name == "b3r0g128n1024k4096fr"
    row_sums = [c for c in grid.candidates(1) if grid.row_sums_gemv(c)]
    assert row_sums and all(grid.high_bytes(c) and grid.specialise(c)[1]["HIGH_BYTES"] for c in row_sums)
    assert not any(grid.high_bytes(c) for c in grid.candidates(16))
    assert not any(lloyd_max.high_bytes(c) for c in lloyd_max.candidates(1))
    cpu = torch.device("cpu")
    table = grid.table(3, cpu, high_bytes=True, signed=True, codebook="grid")[:4].numpy().view(np.uint32)
    assert table.tolist() == list(lut.table_words(3, high_bytes=True, signed=True, codebook="grid"))
    assert not table[0] and not table[1]  # the low bytes: all zero
    grid_values = np.array(lut.lookup_values(3, "grid"), dtype=np.float16)
    assert np.array_equal(grid_values, high_byte_codebook(3)[0][4:].numpy().astype(np.float16))
    assert not np.array_equal(grid_values, np.array(lut.lookup_values(3), dtype=np.float16))
    assert lut.table_words(3, signed=True, codebook="grid") != lut.table_words(3, signed=True)
    with pytest.raises(ValueError, match="grid codebook only"):
        lut.table_words(3, high_bytes=True, signed=True)


@pytest.mark.parametrize(("bits", "high_bytes"), [(2, False), (2, True), (3, False)])
def test_word_masks_hand_prmt_the_same_selectors(bits, high_bytes):
    """WORD_MASKS (the one-token kernel's, lut.MASKED_*_ASM): a 2-bit code word masked once with
    lut.CRUMB_MASKED (and once after a shift by 2), then shifted by 16 for row half 1, gives PRMT the
    selectors that a shift and a mask of 0x3333 a quad give, in its low 16 bits (the only ones PRMT
    reads): every code decodes (emulated bit for bit) as without, and the PTX shifts and masks nothing."""
    for asm in (lut.MASKED_CRUMB_ASM, lut.MASKED_HIGH_CRUMB_ASM, lut.MASKED_SIGNED_CRUMB_ASM):
        assert "shr" not in asm and "0x3333" not in asm and asm.count("prmt.b32") in (3, 4)
    k, group_size = 4096, 128
    codes = torch.randint(0, 2**bits, (6, k), generator=torch.Generator().manual_seed(bits))
    words = to_kernel_layout(pack(codes, bits), bits, k, group_size).numpy().view(np.uint32)
    decode = partial(decode_like_the_kernels, words, bits, k, slot_words(k, group_size), high_bytes)
    masked, unmasked = decode(word_masks=True), decode()
    assert np.array_equal(masked, unmasked)
    if not high_bytes:
        assert np.array_equal(masked, gaussian_codebook(bits).half().float()[codes].numpy())


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize(("block_k", "warps"), [(64, 4), (128, 4), (128, 8)])
def test_fragment_layout_decodes_every_code_where_the_operand_expects_it(block_k, warps, bits):
    """kernels/fragments.py (the fragment family's layout): the PRMT lookups of each packed word (at 3
    bits with its shifted sign word), put back in row and input order through the wgmma operand's
    lane and register mapping, give every code's value; the layout round-trips with the bitpack
    layout."""
    n, k = 16 * warps * 2, 2 * block_k
    codes = torch.randint(0, 2**bits, (n, k), generator=torch.Generator().manual_seed(block_k + warps))
    words = fragments.pack_fragments(lut.stored_code(codes, bits), block_k, warps, bits)
    assert words.shape == (n * k * bits // 32,)  # 2 C words a thread and step at 4 bits, C at 2, 3 C / 2 at 3
    decoded = fragments.emulate_fragments(words, n, k, block_k, warps, bits)
    assert torch.equal(decoded, gaussian_codebook(bits).half().float()[codes])
    assert torch.equal(lut.codebook_code(fragments.unpack_fragments(words, n, k, block_k, warps, bits), bits), codes)
    assert fragments.fits(n, k, 128, block_k, warps) and not fragments.fits(n, k, 32, block_k, warps)
    assert not fragments.fits(n + 16, k, 128, block_k, warps)


@pytest.mark.parametrize(("block_k", "warps"), [(64, 4), (128, 8)])
def test_sign_selectors_lay_3_bit_signs_beside_their_magnitudes(block_k, warps, monkeypatch):
    """fragments.SIGN_SELECTORS (on unless TQC_SIGN_SELECTORS=0): the 3-bit fragment layout's magnitude words as
    without it, its sign words laid out anew, so that each quad's selector, made as
    gluon_kernels._signed_selector_quads makes it, looks every code up whole in the table of the 8 signed values;
    the layout round-trips."""
    n, k = 16 * warps * 2, 2 * block_k
    codes = torch.randint(0, 8, (n, k), generator=torch.Generator().manual_seed(block_k + warps))
    stored = lut.stored_code(codes, 3)
    monkeypatch.setattr(fragments, "SIGN_SELECTORS", False)
    before = fragments.pack_fragments(stored, block_k, warps, 3)
    monkeypatch.setattr(fragments, "SIGN_SELECTORS", True)
    words = fragments.pack_fragments(stored, block_k, warps, 3)
    magnitudes = n * k // 16
    assert torch.equal(words[:magnitudes], before[:magnitudes]) and not torch.equal(words, before)
    assert torch.equal(fragments.emulate_fragments(words, n, k, block_k, warps, 3), gaussian_codebook(3).half().float()[codes])
    assert torch.equal(lut.codebook_code(fragments.unpack_fragments(words, n, k, block_k, warps, 3), 3), codes)
    assert lut.signed_values(3)[4:] == tuple(-v for v in lut.lookup_values(3)) and len(lut.table_words(3, signed=True)) == 4


@pytest.mark.parametrize(("block_k", "warps"), [(64, 4), (128, 8)])
def test_activations_in_fragment_order_give_each_lane_its_words_inputs_contiguously(block_k, warps):
    """fragments.fragment_input_order (the one-token kernel's X_ORDERED): a step's 8 C positions of
    lane quad l % 4 hold, in order, the inputs of the codes in that lane's words (word (ch, h), slot
    4 a + 2 b + c), for both row halves; it is a permutation of the step."""
    order = fragments.fragment_input_order(block_k)
    assert torch.equal(order.sort().values, torch.arange(block_k))
    inputs = fragments._fragment_order(torch.arange(block_k).expand(16 * warps, block_k), block_k, warps)[0, 0]
    words = inputs.reshape(warps, 32, block_k // 32, 2, 8)  # w, lane, ch, h, slot
    lane_quads = torch.arange(32) % 4
    for h in (0, 1):
        assert torch.equal(words[:, :, :, h].reshape(warps, 32, -1), order.reshape(4, -1)[lane_quads].expand(warps, 32, -1))


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_fragment_layout_of_a_layer_is_converted_in_row_slices_plane_by_plane(bits, monkeypatch):
    """to_fragments_layout converts ROWS_AT_ONCE rows at a time, yet each plane (3 bits: magnitudes,
    then signs) stays whole, as the kernels read it; to_bitpack_layout undoes it."""
    monkeypatch.setattr(fragments, "ROWS_AT_ONCE", 128)
    n, k = 320, 256  # slices of 128, 128 and 64 rows
    codes = torch.randint(0, 2**bits, (n, k), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    words = fragments.to_fragments_layout(packed, bits, k)
    assert words.shape == packed.shape
    assert torch.equal(words.reshape(-1), fragments.pack_fragments(lut.stored_code(codes, bits), 64, 4, bits))
    assert torch.equal(fragments.to_bitpack_layout(words, bits, k), packed)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sign_magnitude_codes_round_trip(bits):
    codes = torch.arange(2**bits)
    stored = lut.stored_code(codes, bits)
    assert sorted(stored.tolist()) == codes.tolist() and torch.equal(lut.codebook_code(stored, bits), codes)


@pytest.mark.parametrize(("k", "group_size"), LAYER_SHAPES)
def test_slot_words_divides_the_group_and_the_row(k, group_size):
    b = slot_words(k, group_size)
    assert b & (b - 1) == 0 and group_size % (2 * b) == 0 and k % (32 * b) == 0


def test_run_summed_fp16_scales_once_per_run():
    """fp16_runs: a thread's 8 columns of a row are multiplied and summed first, then scaled once,
    so the one-token kernel issues fewer half2 multiplies than the per-pair fp16 kernel (static sm_90)."""
    pytest.importorskip("triton")
    from tqc.kernels.bench import layer_key
    from tqc.kernels.registry import LayerKernel
    from tqc.kernels.static_report import compile_for_hopper, sass_summary

    key = layer_key("3", 4096, 4096, 128)
    runs = next(c for c in LayerKernel(key, None).candidates(1) if c.accumulate == "fp16_runs")
    ops = {acc: sass_summary(compile_for_hopper(key, runs.model_copy(update={"accumulate": acc})))["ops"]
           for acc in ("fp16", "fp16_runs")}
    inputs = runs.block_n * runs.slots * 64 / (32 * runs.num_warps)  # per thread, one step
    multiplies = {acc: op.get("HFMA2", 0) + op.get("HMUL2", 0) for acc, op in ops.items()}
    assert multiplies["fp16"] >= inputs  # per pair: product, then scale and sum
    assert multiplies["fp16_runs"] <= 0.7 * inputs  # 5 per 8 inputs


def registers_rows(shape: list[int], layout: str) -> list[int]:
    """The row of each of a thread's registers in a 2-D blocked layout (Triton's register order:
    sizePerThread, then repetitions, each columns first for order [1, 0])."""
    fields = {name: [int(v) for v in values.split(",")]
              for name, values in re.findall(r"(\w+) = \[([\d, ]+)\]", layout)}
    assert fields["order"] == [1, 0], layout
    (rows, cols), (spt_r, spt_c) = shape, fields["sizePerThread"]
    tile_rows = spt_r * fields["threadsPerWarp"][0] * fields["warpsPerCTA"][0]
    tile_cols = spt_c * fields["threadsPerWarp"][1] * fields["warpsPerCTA"][1]
    return [rep_r * tile_rows + i for rep_r in range(max(1, rows // tile_rows))
            for _ in range(max(1, cols // tile_cols)) for i in range(spt_r) for _ in range(spt_c)]


@pytest.mark.parametrize(("bits", "k"), [(bits, k) for bits in (4, 3, 2) for k in (1024, 4096)]
                         + [(bits, 3584) for bits in (4, 3, 2)])  # slot widths B = 32, 64 and 16
def test_run_summed_packs_stay_in_one_row(bits, k):
    """RUN_FMA_ASM scales the sum of 8 registers by the first one's row scale: for every fp16_runs
    candidate, each 8 consecutive registers of a thread must hold one row (static sm_90 layouts)."""
    pytest.importorskip("triton")
    from tqc.kernels.registry import KernelKey
    from tqc.kernels.static_report import compile_for_hopper

    key, slot_width = KernelKey(bits, 0, 128, 1024, k), slot_words(k, 128)
    runs = [c for c in candidate_configs(1, bits, 0, slot_width, k // slot_width) if c.accumulate == "fp16_runs"]
    assert runs
    for config in runs:
        ttgir = compile_for_hopper(key, config).asm["ttgir"]
        layouts = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<.*>)$", ttgir, re.MULTILINE))
        packs = re.findall(r"packed_element = 8 .*-> tensor<(\d+)x(\d+)xf16, (#\w+)>", ttgir)
        assert packs, config
        for rows, cols, name in packs:
            owner = registers_rows([int(rows), int(cols)], layouts[name])
            assert all(len(set(owner[i:i + 8])) == 1 for i in range(0, len(owner), 8)), (config, layouts[name])


def test_llama_shapes_get_the_widest_slots():
    assert {slot_words(k, 128) for k in (4096, 8192, 14336, 28672)} == {64}


def test_token_buckets_choose_the_strategy_family():
    assert [token_bucket(m) for m in (1, 2, 16, 17, 128, 2048, 10_000)] == [1, 16, 16, 64, 256, 4096, 4096]
    assert {c.strategy for c in candidate_configs(1)} == {"fma"}
    assert {c.strategy for c in candidate_configs(16)} == {"dot"} | {"dequant"}
    assert {c.block_m for c in candidate_configs(16) if c.strategy == "dot"} == {16}
    assert {c.weights_left for c in candidate_configs(16)} == {False, True}  # the tuner picks the operand order
    assert all(c.block_n >= 64 for c in candidate_configs(16) if c.weights_left)
    for bucket in (16, 4096):  # every tensor-core shape both ways: scaled after each pair's dot, or before it
        dots = {c for c in candidate_configs(bucket) if c.strategy == "dot" and c.dot_pairs == 1}
        assert {c.model_copy(update={"scale_first": not c.scale_first}) for c in dots} == dots
    sixteen = {c for c in candidate_configs(16) if c.strategy == "dot"}
    joined = {c for c in sixteen if c.dot_pairs > 1}  # four pairs a dot: every scale-first split that way too
    assert joined and all(c.scale_first and c.dot_pairs == 4 for c in joined)
    assert {c.model_copy(update={"dot_pairs": 1}) for c in joined} == {c for c in sixteen if c.scale_first} - joined
    assert not any(c.scale_first for c in candidate_configs(1))
    for bucket in (1, 16):  # unrolled with the next step's codes in flight: only where a program has steps to overlap
        lookahead = [c for c in candidate_configs(bucket) if c.lookahead]
        assert lookahead and all(c.iters > 1 and c.num_stages == 1 for c in lookahead)
    assert {(c.strategy, c.whole_k) for c in candidate_configs(4096)} == {("dot", True), ("dequant", False)}
    assert {c.strategy for c in candidate_configs(16, slot_width=2)} == {"dequant"}  # too narrow for tensor cores
    for config in candidate_configs(1, bits=3, slot_count=576 // 2):  # 3-bit steps take whole chunks of 32 slots
        assert config.slots == 32 and (576 // 2) % (config.slots * config.iters) == 0


def test_pipelined_shapes_stay_within_shared_memory():
    """A pipelined shape's slots round up to 16 (2 bits) but not to 32 (3 bits: over 227 KB staged)."""
    def pipelined_slots(bits: int) -> set[int]:
        return {c.slots for c in candidate_configs(16, bits, 0, 64, 64) if c.strategy == "dot" and c.num_stages > 1}

    assert pipelined_slots(4) == {8} and pipelined_slots(2) == {16} and pipelined_slots(3) == set()
    assert any(c.slots == 32 for c in candidate_configs(16, 3, 0, 64, 64) if c.strategy == "dot")  # unpipelined stay


def test_tuning_cache_round_trip_and_invalidation(tmp_path):
    path = tmp_path / "gpu.json"
    calls = []

    def timer(fn):
        fn()
        return 1e-6 * (len(calls) + 1)

    tuner = Tuner("H100", "3.6.0", path, timer=timer)
    candidates = candidate_configs(1)
    best = tuner.config("b4r0g128n64k256", 1, lambda: (calls.append, 1), candidates)
    assert best == candidates[0] and len(calls) == len(candidates)
    again = Tuner("H100", "3.6.0", path, timer=timer)  # a second load does not tune again
    assert again.config("b4r0g128n64k256", 1, lambda: (calls.append, 1), candidates) == best
    assert len(calls) == len(candidates)
    assert TuneFile.model_validate_json(path.read_text()).triton_version == "3.6.0"
    assert Tuner("H100", "3.7.0", path).data.entries == {}  # another Triton version retunes
    assert Tuner("H200", "3.6.0", path).data.entries == {}
    stored = json.loads(path.read_text())
    path.write_text(json.dumps(stored | {"format": stored["format"] - 1}))
    assert Tuner("H100", "3.6.0", path).data.entries == {}  # a cache of an older format retunes
    path.write_text("{not json")
    assert Tuner("H100", "3.6.0", path).data.entries == {}


def test_tuning_streams_the_footprint_asked_for(monkeypatch):
    layer = 46 * 10**6  # Llama-3-8B's fused 3-bit gate/up
    monkeypatch.delenv("TQC_STREAM_BYTES", raising=False)
    assert stream_copies(layer) == -(-STREAM_BYTES // layer) == 6
    monkeypatch.setenv("TQC_STREAM_BYTES", "2GiB")
    assert stream_copies(layer) == 47
    assert stream_copies(layer, free_bytes=10 * layer) == 5  # half the free memory at most
    assert stream_copies(layer, free_bytes=layer) == 1
    monkeypatch.setenv("TQC_STREAM_BYTES", "lots")
    with pytest.raises(ValueError, match="not a size"):
        stream_copies(layer)


def test_tuner_skips_configurations_the_gpu_cannot_run():
    def run(config: LaunchConfig):
        if config.block_n != 16:
            raise OutOfResources(294912, 232448, "shared memory")

    tuner = Tuner("H100", "3.6.0", None, timer=lambda fn: fn() or 1e-6)
    assert tuner.config("key", 1, lambda: (run, 1), candidate_configs(1)).block_n == 16
    with pytest.raises(RuntimeError, match="no launch configuration ran"):
        tuner.config("other", 1, lambda: (lambda config: run(config.model_copy(update={"block_n": 8})), 1),
                     candidate_configs(1))
    with pytest.raises(ZeroDivisionError):  # a bug in a candidate is not a resource limit: it surfaces
        tuner.config("third", 1, lambda: (lambda config: 1 / 0, 1), candidate_configs(1))


def test_attach_leaves_cpu_models_on_the_reference_path():
    layer = TurboQuantLinear(LayerSpec(QuantOption.parse("4+2"), 64, 256, 32))
    layer.refresh_signs()
    model = torch.nn.Sequential(layer)
    before = layer.codes.clone()
    assert attach(model) == 0
    assert layer.kernel is None and torch.equal(layer.codes, before)
    detach(model)
    assert torch.equal(layer.codes, before)


def test_the_fragment_family_runs_by_default_where_the_gpu_can(monkeypatch):
    """attach's (and tqc.load's) `fragments`: by default (None) the family where fragments_available
    finds nothing missing, silently the lookups where it does; True warns there; False never."""
    import warnings

    from tqc.kernels import registry, runs_fragments

    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not runs_fragments(None, cpu) and not runs_fragments(False, cpu)
    with pytest.warns(UserWarning, match="no fragment family here .*Hopper"):
        assert not runs_fragments(True, cpu)
    monkeypatch.setattr(registry, "fragments_available", lambda device: None)  # as on an H100
    assert runs_fragments(None, cpu) and runs_fragments(True, cpu) and not runs_fragments(False, cpu)


def test_prepare_and_restore_round_trip():
    from tqc.kernels.registry import prepare, restore
    from tqc.kernels.synthetic import random_turboquant_linear

    layer = random_turboquant_linear(LayerSpec(QuantOption.parse("3+4"), 128, 512, 16), "cpu")
    codes, residual = layer.codes.clone(), layer.residual_codes.clone()
    prepare(layer)
    prepare(layer)  # idempotent
    assert not torch.equal(layer.codes, codes)
    restore(layer)
    assert torch.equal(layer.codes, codes) and torch.equal(layer.residual_codes, residual)


def test_fragment_family_serves_only_the_layers_it_can_and_repacks_them():
    """KernelRegistry(fragments=True): layers of the options a GPU has checked on the fragment family
    (2, 3, 4, 4+2, 4+4) on fp16 activations, in whole 64-row and 64-input blocks, get the family, whose codes
    round-trip through its layout (its prefill weights: test_kernels_accuracy.py, interpreted); the
    rest keep the lookups; with unchecked_fragments also 2+2 and 3+4, never the rest."""
    from tqc.kernels.registry import (FRAGMENT_LAYOUT, FragmentLayerKernel, KernelRegistry, fragments_available,
                                      prepare, restore)
    from tqc.kernels.synthetic import random_turboquant_linear

    assert "Hopper" in fragments_available(torch.device("cpu"))  # attach warns and keeps the lookups

    registry = KernelRegistry(Tuner("none", "none", None), fragments=True)
    layer = random_turboquant_linear(LayerSpec(QuantOption.parse("4"), 64, 576, 192), "cpu")  # SmolLM2's k/v
    kernel = registry.kernel_for(layer.spec)
    assert isinstance(kernel, FragmentLayerKernel) and kernel.key.name.endswith("fr")
    unchecked = KernelRegistry(Tuner("none", "none", None), fragments=True, unchecked_fragments=True)
    for option in ("3", "4+2"):
        assert isinstance(registry.kernel_for(LayerSpec(QuantOption.parse(option), 64, 576, 192)), FragmentLayerKernel)
    for spec in (LayerSpec(QuantOption.parse("2+2"), 64, 576, 192), LayerSpec(QuantOption.parse("3+4"), 64, 576, 192)):
        assert not isinstance(registry.kernel_for(spec), FragmentLayerKernel), spec  # no GPU has checked them yet
        assert isinstance(unchecked.kernel_for(spec), FragmentLayerKernel), spec
    for spec in (LayerSpec(QuantOption.parse("4"), 64, 576, 96), LayerSpec(QuantOption.parse("4"), 32, 576, 192),
                 LayerSpec(QuantOption.parse("4"), 64, 576, 192, activations="int8"),
                 LayerSpec(QuantOption.parse("rtn4"), 64, 576, 192)):
        assert not isinstance(unchecked.kernel_for(spec), FragmentLayerKernel), spec
    codes = layer.codes.clone()
    prepare(layer, kernel.layout)
    assert layer.codes_layout == FRAGMENT_LAYOUT and layer.codes.shape == codes.shape
    assert not torch.equal(layer.codes, codes)
    restore(layer)
    assert torch.equal(layer.codes, codes)
    assert [(c.strategy, c.iters) for c in kernel.candidates(16)] == [("fragments", 1), ("fragments", 3), ("fragments", 9)]
    assert [(c.strategy, c.iters, c.sums) for c in kernel.candidates(1)] == [
        *(("fragments", i, "rows") for i in (1, 3, 9)),
        *(("fragment_gemv", i, sums) for sums in ("rows", "steps", "rows_steps") for i in (1, 3, 9))]  # 64-input groups
    assert kernel.candidates(32)[0].strategy == "dequant"
    config = kernel.candidates(1)[0]
    out = torch.empty(1, 192)
    target = kernel.rotation_target(layer, config, out, torch.bfloat16)
    assert target.pair_width == 0 and target.dtype == torch.float16 and target.clear is out  # every program adds
    assert kernel.splits(config) * config.iters * 64 == 576


def test_one_token_fragment_candidates_sum_a_groups_steps_only_where_a_program_covers_whole_groups():
    """fragment_gemv's candidates (LaunchConfig.sums): row sums at every step count; a group's two
    64-input steps summed (SUM_STEPS) only where a program's steps are whole groups, and without row
    sums only where the layer has no residual stage (the kernel would ignore it); 16 tokens: none."""
    from tqc.kernels.registry import FragmentLayerKernel, KernelKey

    def gemv(key: KernelKey) -> dict[str, list[int]]:
        configs = [c for c in FragmentLayerKernel(key, None).candidates(1) if c.strategy == "fragment_gemv"]
        return {sums: [c.iters for c in configs if c.sums == sums] for sums in ("rows", "steps", "rows_steps")}

    down = [1, 2, 4, 7, 8, 14, 16]  # Llama-3-8B's down: 224 steps
    assert gemv(KernelKey(4, 0, 128, 4096, 14336)) == {"rows": down, "steps": [2, 4, 8, 14, 16],
                                                       "rows_steps": [2, 4, 8, 14, 16]}
    assert gemv(KernelKey(4, 4, 128, 4096, 14336)) == {"rows": down, "steps": [], "rows_steps": [2, 4, 8, 14, 16]}
    sixteen = FragmentLayerKernel(KernelKey(4, 0, 128, 4096, 4096), None).candidates(16)
    assert {c.strategy for c in sixteen} == {"fragments"}
    with pytest.raises(ValueError, match="sums='steps' needs strategy 'fragment_gemv'"):
        LaunchConfig(strategy="fragments", sums="steps")


def test_ordered_input_candidates_wait_for_a_gpu_check_and_ask_the_rotation_for_fragment_order(monkeypatch):
    """LaunchConfig.ordered_inputs (X_ORDERED): not offered while registry.ORDERED_INPUT_CANDIDATES is
    off; on, every row-summing fragment_gemv candidate also runs on inputs the rotation writes in
    fragment order (RotationTarget.fragment_step) and the kernel is told so; never without row sums."""
    from tqc.kernels import registry
    from tqc.kernels.registry import FragmentLayerKernel, KernelKey

    kernel = FragmentLayerKernel(KernelKey(4, 0, 128, 4096, 14336), None)
    assert not any(c.ordered_inputs for c in kernel.candidates(1))
    monkeypatch.setattr(registry, "ORDERED_INPUT_CANDIDATES", True)
    gemvs = [c for c in kernel.candidates(1) if c.strategy == "fragment_gemv"]
    ordered = [c for c in gemvs if c.ordered_inputs]
    assert [(c.sums, c.iters) for c in ordered] == [(c.sums, c.iters) for c in gemvs
                                                    if c.sums != "steps" and not c.ordered_inputs]
    layer = SimpleNamespace(signs=torch.ones(14336), rotation_size=128)
    pytest.importorskip("triton.experimental.gluon")  # _specialise names the Gluon kernel's constexprs
    assert kernel.rotation_target(layer, ordered[0], None, torch.bfloat16).fragment_step == 64
    assert kernel.rotation_target(layer, gemvs[0], None, torch.bfloat16).fragment_step == 0
    assert kernel._specialise(ordered[0])[1]["X_ORDERED"] and not kernel._specialise(gemvs[0])[1]["X_ORDERED"]
    with pytest.raises(ValueError, match="ordered_inputs needs strategy 'fragment_gemv' with row sums"):
        LaunchConfig(strategy="fragment_gemv", sums="steps", ordered_inputs=True)


@pytest.mark.parametrize("tokens", [1, 16])
def test_every_fragment_candidate_names_only_its_kernels_parameters(tokens, monkeypatch):
    """_specialise gives each candidate's Gluon kernel its constexprs; one the kernel lacks fails at
    launch on a GPU alone (run 127 found X_ORDERED handed to fragment_dot_kernel), so check the names here."""
    pytest.importorskip("triton.experimental.gluon")
    from tqc.kernels import registry
    from tqc.kernels.registry import FragmentLayerKernel, KernelKey

    monkeypatch.setattr(registry, "ORDERED_INPUT_CANDIDATES", True)
    for key in (KernelKey(4, 0, 128, 14336, 4096), KernelKey(3, 2, 128, 4096, 14336)):
        kernel = FragmentLayerKernel(key, None)
        for config in kernel.candidates(tokens):
            names = set(kernel._specialise(config)[1]) - {"num_warps"}
            unknown = names - set(FragmentLayerKernel.gluon_kernel(config).arg_names)
            assert not unknown, f"{config.strategy} {config.sums}: {sorted(unknown)}"


def test_a_launch_that_does_not_tile_the_row_is_refused():
    """Qwen2.5-7B's 3584 inputs are 7 chunks of B = 16 (224 slots): 32 slots x 2 steps a program
    would leave part of K unread, so asking for it (a stale or edited tuning cache) is an error."""
    from tqc.kernels.registry import KernelKey, LayerKernel

    kernel = LayerKernel(KernelKey(4, 0, 128, 3584, 3584), None)
    assert kernel.slot_width == 16 and kernel.splits(LaunchConfig(strategy="fma", slots=32, iters=1)) == 7
    with pytest.raises(ValueError, match="do not tile its 224 slots of 16 words"):
        kernel.splits(LaunchConfig(strategy="fma", slots=32, iters=2))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int8_layers_take_the_input_order_layout_and_back(bits, monkeypatch):
    """A layer on int8 activations is repacked into lut_int8's layout (emulated PTX decodes its
    codebook indices), and restored bit for bit; rows converted a few at a time (16 = 5 + 5 + 5 + 1)."""
    from tqc.bitpack import unpack
    from tqc.kernels import lut_int8
    from tqc.kernels.lut_int8 import emulate, int8_levels
    from tqc.kernels.registry import INT8_LAYOUT, prepare, restore
    from tqc.kernels.synthetic import random_turboquant_linear

    layer = random_turboquant_linear(LayerSpec(QuantOption("turboquant", bits), 64, 512, 16, activations="int8"), "cpu")
    codes = layer.codes.clone()
    monkeypatch.setattr(lut_int8, "ROWS_AT_ONCE", 5)
    prepare(layer)
    assert layer.codes_layout == INT8_LAYOUT
    levels, _ = int8_levels(bits)
    decoded = emulate(layer.codes.numpy().view(np.uint32), bits, 512)
    assert (decoded == levels[unpack(codes, bits, 512).numpy()]).all()
    restore(layer)
    assert torch.equal(layer.codes, codes)


def test_kernels_match_reference_under_the_interpreter():
    """Every (bits, residual) and strategy against the reference path, TRITON_INTERPRET=1, small shapes
    (on every core where pytest-xdist is installed: half the time on CI's two; work stealing, so that the
    longest tests, up to 73 s, do not leave one core idle at the end)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cores = ["-n", "auto", "--dist", "worksteal"] if importlib.util.find_spec("xdist") else []
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", *cores, "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_kernels_accuracy.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]


def test_rotation_in_kernel_lab_computes_what_the_two_launches_do(tmp_path):
    """scripts/rotation_in_kernel_lab.py check (interpreted, in a subprocess): the lab kernel that
    rotates inside the one-token lookup kernel gives tqc's output, whole-K and split over K."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "rotation_in_kernel_lab.py"), "check"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "check passed" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize(("option", "bucket"), [("3", 1), ("4+2", 1), ("4", 16), ("2", 16)])
def test_lookup_kernels_compile_for_hopper_without_spilling(option, bucket):
    """Ahead-of-time sm_90 compile (Triton's bundled ptxas, no GPU): no local-memory stack, lookups in registers."""
    pytest.importorskip("triton")
    from tqc.kernels.bench import layer_key
    from tqc.kernels.registry import LayerKernel
    from tqc.kernels.static_report import compile_for_hopper, sass_summary

    key = layer_key(option, 1024, 4096, 128)
    config = LayerKernel(key, None).candidates(bucket)[0]
    summary = sass_summary(compile_for_hopper(key, config))
    assert summary["stack"] == 0 and 0 < summary["registers"] <= 255, config
    assert summary["top"].get("PRMT", 0) > 0  # the codebook is looked up by byte permutes
    stages = 1 + (key.residual_bits > 0)
    decoded_per_thread = stages * config.block_n * config.slots * config.iters * 64 / (32 * config.num_warps)
    assert sum(summary["loads"].values()) < 0.35 * decoded_per_thread  # no codebook gathers (the pair table: 0.78)


@pytest.mark.parametrize(("bits", "strategy"), [(4, "int8"), (3, "int8"), (2, "int8"), (4, "dp4a"), (3, "dp4a"),
                                                 (2, "dp4a")])
def test_int8_kernels_compile_for_hopper_with_register_lookups(bits, strategy):
    """The int8 family, sm_90: no spills, PRMT lookups into int8 tensor-core dots (or dp4a for one
    token), no load per weight."""
    from tqc.kernels.bench import layer_key
    from tqc.kernels.static_report import compile_for_hopper, sass_summary
    from tqc.kernels.tuning import LaunchConfig

    key = layer_key(f"{bits}@int8", 1024, 4096, 128)
    if strategy == "dp4a":
        config = LaunchConfig(strategy="dp4a", block_n=128, iters=8, num_warps=4)
    else:
        config = LaunchConfig(strategy="int8", block_m=16, block_n=64, iters=8, num_stages=3)
    summary = sass_summary(compile_for_hopper(key, config))
    assert summary["stack"] == 0 and 0 < summary["registers"] <= 255, config
    products = ("IDP",) if config.strategy == "dp4a" else ("IGMMA", "IMMA")
    assert summary["ops"].get("PRMT", 0) > 0 and sum(summary["ops"].get(op, 0) for op in products) > 0
    decoded_per_thread = config.block_n * 128 / (32 * config.num_warps)  # one group, one step of the loop
    copies = 2 if config.strategy == "dp4a" else config.num_stages  # the loads before the loop and in it
    assert sum(summary["loads"].values()) / copies < 0.75 * decoded_per_thread  # a gather per weight: >= 1
    if strategy == "dp4a":  # the 4 words of each call loaded as one 16-byte vector (scalar loads: 2.6x slower, run 56)
        assert any(load.endswith(".128") for load in summary["loads"]), summary["loads"]


def test_dp4a_candidates_give_every_thread_four_code_words():
    """A dp4a launch is offered only where every thread holds the 4 words of an asm call (with fewer,
    the compiled kernel sums wrong words, run 56): 2 and 3 bits have 8 words a group, 4 bits 16."""
    from tqc.kernels.bench import layer_key
    from tqc.kernels.registry import Int8LayerKernel

    def shapes(option):
        kernel = Int8LayerKernel(layer_key(option, 14336, 4096, 128), None)
        return {(c.block_n, c.num_warps) for c in kernel.candidates(1) if c.strategy == "dp4a"}

    for option, words in (("2@int8", 8), ("3@int8", 8), ("4@int8", 16)):
        offered = shapes(option)
        assert offered and all(block_n * words >= 4 * 32 * warps for block_n, warps in offered)
    assert (64, 8) in shapes("4@int8") and (64, 8) not in shapes("2@int8")


@pytest.mark.parametrize("option", ["4", "3", "4+2"])
def test_fp16_accumulation_multiplies_half2_pairs(option):
    """The fp16 one-token kernel: two weights per HMUL2/HFMA2, no float32 multiply per weight; its
    prologue prefetches the codes into L2 and waits for the rotation (programmatic dependent launch)."""
    pytest.importorskip("triton")
    from tqc.kernels.bench import layer_key
    from tqc.kernels.registry import LayerKernel
    from tqc.kernels.static_report import compile_for_hopper, sass_summary

    key = layer_key(option, 1024, 4096, 128)
    config = next(c for c in LayerKernel(key, None).candidates(1) if c.accumulate == "fp16" and c.prefetch)
    ops = sass_summary(compile_for_hopper(key, config))["ops"]
    inputs = config.block_n * config.slots * 64 / (32 * config.num_warps)  # per thread, one step
    assert ops.get("HFMA2", 0) + ops.get("HMUL2", 0) >= inputs  # x' and the scale(s), two weights each
    assert ops.get("FFMA", 0) + ops.get("FMUL", 0) < inputs / 8
    assert ops.get("CCTL", 0) > 0 and ops.get("ACQBULK", 0) == 1  # prefetch.global.L2, griddepcontrol.wait


def test_weights_left_decode_in_the_wgmma_registers():
    """With the weights as the left operand (sm_90 wgmma reads it from registers) the decoded
    tile skips shared memory: far fewer ldmatrix loads than with the activations on the left."""
    pytest.importorskip("triton")
    from tqc.kernels.bench import layer_key
    from tqc.kernels.static_report import compile_for_hopper, sass_summary

    key = layer_key("4", 1024, 4096, 128)
    config = LaunchConfig(strategy="dot", block_n=64, num_warps=4, slots=8)
    right = sass_summary(compile_for_hopper(key, config))["ops"]
    left = sass_summary(compile_for_hopper(key, config.model_copy(update={"weights_left": True})))["ops"]
    assert left.get("HGMMA", 0) > 0 and right.get("HGMMA", 0) == 0  # warp-group mma only with weights on the left
    assert left.get("LDSM", 0) * 2 < right.get("LDSM", 0)


def test_scale_first_folds_the_residual_into_one_dot():
    """With the decoded weights scaled before the dot (scale_first), a 4+4 layer multiplies once a
    pair instead of once a stage, and no float32 multiply-add scales the products after each dot:
    the row scales go on as half2 multiplies (HMUL2), the residual stage is folded in by HFMA2."""
    pytest.importorskip("triton")
    from tqc.kernels.bench import layer_key
    from tqc.kernels.static_report import compile_for_hopper, sass_summary

    key = layer_key("4+4", 512, 3584, 128)  # B = 16: 32 inputs a pair, where scaling after each dot costs most
    config = LaunchConfig(strategy="dot", block_n=64, num_warps=4, slots=16, weights_left=True)
    per_pair = sass_summary(compile_for_hopper(key, config))["ops"]
    scaled = sass_summary(compile_for_hopper(key, config.model_copy(update={"scale_first": True})))["ops"]
    assert scaled["HGMMA"] * 2 == per_pair["HGMMA"]
    assert per_pair.get("FFMA", 0) > 0 and scaled.get("FFMA", 0) == 0
    weights = config.block_n * config.slots * 16 // (32 * config.num_warps)  # a thread's, one stage, one step
    assert scaled.get("HMUL2", 0) >= weights // 2 and scaled.get("HFMA2", 0) >= weights // 2


def test_joined_pairs_need_scale_first():
    """Pairs share a dot only once each pair's scale is in its weights: a cache asking otherwise is refused."""
    with pytest.raises(ValueError, match="dot_pairs=4 needs"):
        LaunchConfig(strategy="dot", dot_pairs=4)
    assert LaunchConfig(strategy="dot", dot_pairs=4, scale_first=True).dot_pairs == 4


def test_joined_pairs_wait_once_a_dot():
    """Four slot pairs joined into one dot's inner dimension (dot_pairs=4) issue the same tensor-core
    work as one dot a pair, with one arrive and one wait a step instead of one a pair, and the
    joined weights stay in the registers wgmma reads (no more ldmatrix than a dot a pair)."""
    pytest.importorskip("triton")
    from tqc.kernels.bench import layer_key
    from tqc.kernels.static_report import compile_for_hopper, sass_summary

    key = layer_key("4", 14336, 4096, 128)
    config = LaunchConfig(strategy="dot", block_n=64, num_warps=4, slots=8, iters=4, num_stages=3, weights_left=True,
                          scale_first=True)
    per_pair = sass_summary(compile_for_hopper(key, config))["ops"]
    joined = sass_summary(compile_for_hopper(key, config.model_copy(update={"dot_pairs": 4})))["ops"]
    assert joined["HGMMA"] == per_pair["HGMMA"]
    assert joined["WARPGROUP"] * 4 == per_pair["WARPGROUP"]
    assert joined.get("LDSM", 0) <= per_pair.get("LDSM", 0)


@pytest.mark.parametrize(("block_k", "iters", "warps", "staged"), [(64, 8, 4, False), (128, 4, 8, False), (64, 8, 4, True)])
def test_fragment_dot_kernel_decodes_into_the_operand_registers(block_k, iters, warps, staged):
    """The Gluon lab kernel on the fragment layout, compiled for sm_90: it compiles at all only if the
    decoded weights already sit in wgmma's operand layout (the conversion is asserted trivial); then it
    stores nothing to shared memory but the staged activations, moves each thread's code words as
    16-byte vectors (loads, or with `staged` asynchronous copies of every step issued before the first
    decodes), looks every quad up once and issues every step's tensor-core products, without spills;
    into a bf16 output it adds neighbouring rows as packed pairs (no compare-and-swap loops)."""
    pytest.importorskip("triton.experimental.gluon")
    from tqc.kernels.gluon_kernels import fragment_dot_kernel, x_layout
    from tqc.kernels.static_report import compile_gluon_for_hopper, sass_summary

    constexprs = {"N": 14336, "K": 4096, "G": 128, "BLOCK_K": block_k, "ITERS": iters, "X_LAYOUT": x_layout(block_k),
                  "LOOKAHEAD": 2, "num_warps": warps, "EVICT": True, "STAGED": staged}
    kernel = compile_gluon_for_hopper(fragment_dot_kernel, constexprs, warps, "*bf16")
    summary, sass = sass_summary(kernel), kernel.asm["sass"]
    assert "REDG.E.ADD.BF16x2" in sass and "ATOMG" not in sass
    ops, vectors = summary["ops"], iters * block_k // 64  # a thread's 2 C words a step: C / 2 vectors
    assert summary["stack"] == 0
    assert ops["STS"] == iters + 4  # a thread's share of each step's activations, one vector; then its
    # 8 sums once, regrouped by neighbouring rows for the packed reductions (gluon_kernels._add_into)
    if staged:
        assert sass.count("LDGSTS.E.BYPASS.128") == vectors
        assert sass.index("LDGSTS") < sass.index("HGMMA") and sass.rindex("LDGSTS") < sass.index("HGMMA")
    else:
        assert summary["loads"]["LDG.E.EF.128"] == vectors
    assert ops["PRMT"] == 16 * block_k * iters // 32  # a thread's weights: 4 PRMT a quad of them
    assert ops["HGMMA"] == iters * block_k // 16


@pytest.mark.parametrize("bits", [4, 3])
def test_fragment_dot_kernel_decodes_once_for_a_tile_of_128_tokens(bits, monkeypatch):
    """TOKEN_TILE (a prompt's or a batch's tokens, LaunchConfig.token_tile): compiled for sm_90, the
    kernel over 128 tokens looks each weight up as often as over 16 and issues as many tensor-core
    products (each 8 times wider: HGMMA.64x128x16), without spills, also as two warpgroups (8 warps,
    128 rows a program); its activations take 8 times the shared memory. The registry offers tiles
    above 16 tokens only where they fit in shared memory and registers, and not for a prefill's
    thousands of tokens."""
    pytest.importorskip("triton.experimental.gluon")
    from tqc.kernels.bench import layer_key
    from tqc.kernels.gluon_kernels import fragment_dot_kernel
    from tqc.kernels.registry import FRAGMENT_TILE_INPUTS, FragmentLayerKernel
    from tqc.kernels.static_report import compile_gluon_for_hopper, sass_summary

    from tqc.kernels import registry

    monkeypatch.setattr(registry, "TOKEN_TILES", True)
    monkeypatch.setattr(registry, "WIDE_PROGRAMS", True)
    monkeypatch.setattr(registry, "TILE_RING", False)  # its own test below
    kernel = FragmentLayerKernel(layer_key(str(bits), 14336, 4096, 128), None)
    wide = next(c for c in kernel.candidates(256) if c.token_tile == 128 and c.iters == 4 and c.num_warps == 4)
    narrow = wide.model_copy(update={"token_tile": 16})
    tall = wide.model_copy(update={"num_warps": 8})  # two warpgroups, 128 rows, the same activations
    compiled = [compile_gluon_for_hopper(fragment_dot_kernel, kernel.specialise(c)[1], c.num_warps, "*bf16")
                for c in (narrow, wide, tall)]
    (sixteen, *tiles), sass = [sass_summary(k) for k in compiled], compiled[1].asm["sass"]
    assert "HGMMA.64x128x16" in sass and "HGMMA.64x128x16" in compiled[2].asm["sass"]
    for tile in tiles:  # a thread's lookups and products as at 16 tokens, wherever its warp's rows are
        assert tile["stack"] == 0
        assert tile["ops"]["PRMT"] == sixteen["ops"]["PRMT"] and tile["ops"]["HGMMA"] == sixteen["ops"]["HGMMA"]
    assert compiled[1].metadata.shared == compiled[2].metadata.shared == 8 * compiled[0].metadata.shared
    assert all(c.token_tile * c.iters * 64 <= FRAGMENT_TILE_INPUTS for c in kernel.candidates(256))
    assert {(c.token_tile, c.num_warps, c.x_stages) for c in kernel.candidates(256) if c.strategy == "fragments"} == {
        (64, 4, 0), (64, 8, 0), (64, 16, 0), (128, 4, 0), (128, 8, 0)}  # 16 warps over 128 tokens would spill
    assert {c.num_warps for c in kernel.candidates(16)} == {4, 8} and {c.num_warps for c in kernel.candidates(1)} == {4}
    assert [c.strategy for c in kernel.candidates(1024)] == ["dequant"]  # a prefill: cuBLAS (run 184)
    assert {c.token_tile for c in kernel.candidates(64)} == {16, 64} and kernel.candidates(16)[0].token_tile == 16
    monkeypatch.setattr(registry, "WIDE_PROGRAMS", False)
    assert {c.num_warps for bucket in (1, 16, 256) for c in kernel.candidates(bucket)} == {4}
    monkeypatch.setattr(registry, "TOKEN_TILES", False)
    assert [c.strategy for c in kernel.candidates(256)] == ["dequant"]


def test_a_ring_of_activations_holds_two_steps_whatever_the_steps(monkeypatch):
    """LaunchConfig.x_stages (offered with TILE_RING): compiled for sm_90, a program of 8 steps over 128
    tokens keeps 2 steps of activations in shared memory where the 4-step program held 4, looks up and
    multiplies twice as much, with a barrier a step for the ring, and does not spill."""
    pytest.importorskip("triton.experimental.gluon")
    from tqc.kernels import registry
    from tqc.kernels.bench import layer_key
    from tqc.kernels.gluon_kernels import fragment_dot_kernel
    from tqc.kernels.registry import FragmentLayerKernel
    from tqc.kernels.static_report import compile_gluon_for_hopper, sass_summary

    kernel = FragmentLayerKernel(layer_key("4", 14336, 4096, 128), None)
    held = LaunchConfig(strategy="fragments", iters=4, token_tile=128)
    ring = held.model_copy(update={"iters": 8, "x_stages": 2})
    compiled = [compile_gluon_for_hopper(fragment_dot_kernel, kernel.specialise(c)[1], 4, "*bf16") for c in (held, ring)]
    (four, eight) = [sass_summary(k) for k in compiled]
    assert compiled[1].metadata.shared == compiled[0].metadata.shared // 2 == 128 * 2 * 64 * 2
    assert eight["ops"]["PRMT"] == 2 * four["ops"]["PRMT"] and eight["ops"]["HGMMA"] == 2 * four["ops"]["HGMMA"]
    assert eight["ops"]["BAR"] >= four["ops"]["BAR"] + 8 - 2 and eight["stack"] == 0
    monkeypatch.setattr(registry, "TILE_RING", True)
    rings = [c for c in kernel.candidates(128) if c.x_stages]
    assert rings and all(c.iters >= 8 and c.token_tile * 2 * 64 <= registry.FRAGMENT_TILE_INPUTS for c in rings)


FWHT_OPS = """
import json
from tqc.kernels import triton_kernels as tk
from tqc.kernels.static_report import compile_jit_for_hopper, sass_summary
types = {"x_ptr": "*bf16", "signs_ptr": "*fp32", "out_ptr": "*bf16", "clear_ptr": "*bf16", "CLEAR": "i32"}
constexprs = dict(K=14336, LOG_G=7, BLOCK_M=16, BLOCK_K=256, PAIR_WIDTH=0, PDL=False, FRAGMENT_STEP=0)
summary = sass_summary(compile_jit_for_hopper(tk.fwht_kernel, constexprs, 4, 3, types))
print(json.dumps(dict(summary["ops"], total=summary["instructions"], stack=summary["stack"])))
"""


def test_split_butterflies_issue_fewer_instructions_and_shuffles():
    """The split butterflies (triton_kernels.fwht_split_tile, the default; TQC_FWHT_SPLIT is read at import,
    so each way compiles in a process of its own): the rotation of a prefill's 16 x 256 tile, compiled
    for sm_90, issues under half the instructions of the sums of selected halves, one add an element a
    stage (7 at G = 128) and one shuffle an element instead of 8, without spills. (Its sums:
    tests/test_kernels_accuracy.py.)"""
    ops = {}
    for flag in ("0", "1"):
        result = subprocess.run([sys.executable, "-c", FWHT_OPS], env=os.environ | {"TQC_FWHT_SPLIT": flag},
                                capture_output=True, text=True, check=True)
        ops[flag] = json.loads(result.stdout.splitlines()[-1])
    elements = 16 * 256
    assert ops["0"]["SHFL"] == 8 * elements / 128 and ops["1"]["SHFL"] == elements / 128  # a thread's 32
    assert ops["1"]["FADD"] + ops["1"]["FFMA"] <= 7 * elements / 128
    assert 2 * ops["1"]["total"] < ops["0"]["total"] and ops["1"]["stack"] == 0


@pytest.mark.parametrize("option", ["4", "3", "4+2"])
def test_fragment_dequant_kernel_decodes_with_the_tensor_core_lookups(option):
    """Prefill's dequantization (gluon_kernels.fragment_dequant_kernel) compiled for sm_90: each weight
    looked up by as many PRMTs as the tensor-core kernel spends on it, the tile stored in natural order
    as 16-byte vectors (4 a thread and step), no spills. (Its weights against the lookup family's, bit
    for bit: tests/test_kernels_accuracy.py on a GPU.)"""
    pytest.importorskip("triton.experimental.gluon")
    from tqc.kernels.bench import layer_key
    from tqc.kernels.gluon_kernels import fragment_dequant_kernel, fragment_dot_kernel
    from tqc.kernels.registry import FragmentLayerKernel
    from tqc.kernels.static_report import compile_gluon_for_hopper, sass_summary

    kernel = FragmentLayerKernel(layer_key(option, 14336, 4096, 128), None)
    dot = compile_gluon_for_hopper(fragment_dot_kernel, kernel.specialise(LaunchConfig(strategy="fragments", iters=4))[1],
                                   4, "*bf16")
    key = kernel.key
    dequant = compile_gluon_for_hopper(fragment_dequant_kernel, {"N": key.n, "K": key.k, "G": 128, "BLOCK_K": 64, "ITERS": 4,
                                       "num_warps": 4, "BITS": key.bits, "RES_BITS": key.residual_bits}, 4, "*bf16")
    summary = sass_summary(dequant)
    assert summary["stack"] == 0 and summary["ops"]["PRMT"] == sass_summary(dot)["ops"]["PRMT"]
    stores = [line.split()[1] for line in dequant.asm["sass"].splitlines() if "STG" in line]
    assert stores == ["STG.E.128"] * 16


def test_fragment_family_launches_a_program_column_per_token_tile(monkeypatch):
    """FragmentLayerKernel.multiply with LaunchConfig.token_tile: a grid of (blocks of 16 num_warps rows,
    K-splits, token tiles), the last tile short, and the tile's constexprs (wgmma's n, the activations' shared
    layout, scaling before the product above 16 tokens); the one-token kernel refuses more tokens."""
    from tqc.kernels import gluon_kernels, registry
    from tqc.kernels.registry import FRAGMENT_LAYOUT, FragmentLayerKernel, KernelKey, prepare
    from tqc.kernels.synthetic import random_turboquant_linear

    launches = []
    monkeypatch.setattr(registry, "launch", lambda kernel, grid, *args, **constexprs: launches.append((grid, constexprs)))
    module = random_turboquant_linear(LayerSpec(QuantOption.parse("4"), 128, 1024, 256), "cpu")
    prepare(module, FRAGMENT_LAYOUT)
    kernel = FragmentLayerKernel(KernelKey.of(module.spec, FRAGMENT_LAYOUT), Tuner("none", "none", None))
    for tile, tokens, tiles, warps in [(16, 16, 1, 4), (16, 40, 3, 4), (64, 77, 2, 4), (128, 300, 3, 4), (64, 77, 2, 8),
                                       (64, 64, 1, 16)]:
        config = LaunchConfig(strategy="fragments", iters=4, token_tile=tile, num_warps=warps)
        x, out = torch.zeros(tokens, 1024, dtype=torch.float16), torch.zeros(tokens, 256, dtype=torch.float16)
        assert kernel.multiply(x, module, config, out) is out
        grid, constexprs = launches[-1]
        assert grid == (256 // (16 * warps), 1024 // (64 * 4), tiles) and constexprs["num_warps"] == warps
        assert constexprs["TOKEN_TILE"] == tile and constexprs["SCALE_AFTER"] == (tile == 16)
        assert constexprs["X_LAYOUT"] == gluon_kernels.x_layout(64, tile)
    with pytest.raises(ValueError, match="one token"):
        kernel.multiply(torch.zeros(2, 1024, dtype=torch.float16), module, LaunchConfig(strategy="fragment_gemv", iters=4),
                        torch.zeros(2, 192, dtype=torch.float16))


def test_fragment_gemv_kernel_decodes_the_same_fragments_on_cuda_cores():
    """The fragment family's one-token kernel, compiled for sm_90: the same 16-byte code vectors and
    PRMT lookups as fragment_dot_kernel, no tensor-core products, no spills, and its row sums added
    into a bf16 output as packed pairs like the dot kernel's."""
    pytest.importorskip("triton.experimental.gluon")
    from tqc.kernels.gluon_kernels import fragment_gemv_kernel, x_layout
    from tqc.kernels.static_report import compile_gluon_for_hopper, sass_summary

    block_k, iters, warps = 64, 8, 4
    constexprs = {"N": 14336, "K": 4096, "G": 128, "BLOCK_K": block_k, "ITERS": iters, "X_LAYOUT": x_layout(block_k),
                  "LOOKAHEAD": 2, "num_warps": warps, "EVICT": True}
    kernel = compile_gluon_for_hopper(fragment_gemv_kernel, constexprs, warps, "*bf16")
    summary, sass = sass_summary(kernel), kernel.asm["sass"]
    assert "REDG.E.ADD.BF16x2" in sass and "ATOMG" not in sass
    assert summary["stack"] == 0 and "HGMMA" not in summary["ops"] and "ACQBULK" not in sass
    assert summary["loads"]["LDG.E.EF.128"] == iters * block_k // 64
    assert summary["ops"]["PRMT"] == 16 * block_k * iters // 32


@pytest.mark.parametrize("res_bits", [4, 2])
@pytest.mark.parametrize("kernel_name", ["fragment_dot_kernel", "fragment_gemv_kernel"])
def test_fragment_kernels_decode_a_residual_stage_beside_the_base(kernel_name, res_bits):
    """RES_BITS (4+4, 4+2): each step loads the residual's words as a second vector a thread (16 bytes
    at 4 bits, 8 at 2), looks them up as many times as the base's, adds them scaled (HFMA2 a weight
    pair) and issues the same tensor-core products, without spills."""
    pytest.importorskip("triton.experimental.gluon")
    from tqc.kernels import gluon_kernels
    from tqc.kernels.static_report import compile_gluon_for_hopper, sass_summary

    iters = 8
    constexprs = {"N": 14336, "K": 4096, "G": 128, "BLOCK_K": 64, "ITERS": iters, "X_LAYOUT": gluon_kernels.x_layout(64),
                  "LOOKAHEAD": 2, "num_warps": 4, "EVICT": True}
    summaries = [sass_summary(compile_gluon_for_hopper(getattr(gluon_kernels, kernel_name), constexprs | {"RES_BITS": r},
                                                       4, "*bf16")) for r in (0, res_bits)]
    base, both = summaries
    assert both["stack"] == 0
    vectors = {4: "LDG.E.EF.128", 2: "LDG.E.EF.64"}
    assert base["loads"]["LDG.E.EF.128"] == iters and vectors[2] not in base["loads"]
    assert both["loads"][vectors[res_bits]] == base["loads"]["LDG.E.EF.128"] * (1 + (res_bits == 4))
    assert both["ops"]["PRMT"] == 2 * base["ops"]["PRMT"]
    assert both["ops"].get("HGMMA") == base["ops"].get("HGMMA")
    weight_pairs = 16 * 64 * iters // 32 // 2  # a thread's: one more half2 multiply-add each
    half2 = [sum(summary["ops"].get(op, 0) for op in ("HMUL2", "HFMA2")) for summary in summaries]
    assert half2[1] - half2[0] == weight_pairs


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("kernel_name", ["fragment_dot_kernel", "fragment_gemv_kernel"])
def test_fragment_kernels_decode_2_and_3_bit_codes_into_the_same_registers(kernel_name, bits):
    """BITS=2 and 3: their layouts' words decode into the operand's registers too (the conversions are
    asserted trivial when it compiles: at 3 bits the sign words', reshaped to the magnitudes'), from
    fewer code bytes (8-byte loads a thread and step, at 3 bits 4 bytes of signs more), with as many
    PRMT lookups and tensor-core products as at 4 bits, without spills."""
    pytest.importorskip("triton.experimental.gluon")
    from tqc.kernels import gluon_kernels
    from tqc.kernels.static_report import compile_gluon_for_hopper, sass_summary

    iters = 8
    constexprs = {"N": 14336, "K": 4096, "G": 128, "BLOCK_K": 64, "ITERS": iters, "X_LAYOUT": gluon_kernels.x_layout(64),
                  "LOOKAHEAD": 2, "num_warps": 4, "EVICT": True}
    four, fewer = (sass_summary(compile_gluon_for_hopper(getattr(gluon_kernels, kernel_name), constexprs | {"BITS": b},
                                                         4, "*bf16")) for b in (4, bits))
    assert fewer["stack"] == 0
    assert fewer["loads"].get("LDG.E.EF.64") == iters and "LDG.E.EF.128" not in fewer["loads"]
    assert fewer["loads"].get("LDG.E.EF", 0) == (iters if bits == 3 else 0)  # a sign word a thread and step
    assert fewer["ops"]["PRMT"] == four["ops"]["PRMT"] and fewer["ops"].get("HGMMA") == four["ops"].get("HGMMA")


def _knob_off_and_on(kernel_name: str, knob: str, **constexprs) -> tuple[dict, dict]:
    """SASS summaries of a fragment kernel on Llama-3-8B's gate/up at 8 steps of 64 inputs, with a
    knob off, then on (static_report.sass_summary)."""
    pytest.importorskip("triton.experimental.gluon")
    from tqc.kernels import gluon_kernels
    from tqc.kernels.static_report import compile_gluon_for_hopper, sass_summary

    base = {"N": 14336, "K": 4096, "G": 128, "BLOCK_K": 64, "ITERS": 8, "X_LAYOUT": gluon_kernels.x_layout(64),
            "LOOKAHEAD": 2, "num_warps": 4, "EVICT": True} | constexprs
    kernel = getattr(gluon_kernels, kernel_name)
    off, on = (sass_summary(compile_gluon_for_hopper(kernel, base | {knob: v}, 4, "*bf16")) for v in (False, True))
    return off, on


def _half2(summary: dict) -> int:
    """A summary's half2 multiplies and multiply-adds."""
    return sum(summary["ops"].get(op, 0) for op in ("HMUL2", "HFMA2"))


def test_high_bytes_take_a_quarter_of_the_2_bit_one_token_kernels_lookups():
    """HIGH_BYTES (registry.HIGH_BYTES): the 2-bit one-token kernel with row sums issues 3 PRMTs a quad
    instead of 4, in as many registers, without spills, the same code loads; its sums are multiplied back
    once."""
    off, on = _knob_off_and_on("fragment_gemv_kernel", "HIGH_BYTES", BITS=2, ROW_SUMS=True, PDL=True)
    assert on["stack"] == 0 and on["registers"] <= off["registers"]
    assert 4 * on["ops"]["PRMT"] == 3 * off["ops"]["PRMT"]
    assert on["loads"]["LDG.E.EF.64"] == off["loads"]["LDG.E.EF.64"]
    assert on["instructions"] < off["instructions"]


@pytest.mark.parametrize(("bits", "residual_bits"), [(2, 0), (3, 0), (4, 2)])
def test_word_masks_take_two_masks_a_word_out_of_the_one_token_kernel(bits, residual_bits):
    """WORD_MASKS (TQC_WORD_MASKS=1): the one-token kernel with row sums masks each word of 2-bit codes
    (2 bits, 3 bits' magnitudes, a 2-bit residual: 2 words a thread and step) twice instead of four times,
    2 LOP3 fewer a word at 8 steps, the same lookups, in as many registers, without spills."""
    off, on = _knob_off_and_on("fragment_gemv_kernel", "WORD_MASKS", BITS=bits, RES_BITS=residual_bits,
                               ROW_SUMS=True, SUM_STEPS=True, HIGH_BYTES=bits == 2, PDL=True)
    assert off["ops"]["LOP3"] - on["ops"]["LOP3"] == 2 * 2 * 8
    assert on["ops"]["PRMT"] == off["ops"]["PRMT"] and on["instructions"] < off["instructions"]
    assert on["stack"] == 0 and on["registers"] <= off["registers"]


@pytest.mark.parametrize("high_bytes", [True, False])
def test_the_registry_asks_for_high_bytes_where_they_apply(high_bytes, monkeypatch):
    """registry.HIGH_BYTES (on unless TQC_HIGH_BYTES=0): the one-token kernel's row-sum configs of a 2-bit
    layer take HIGH_BYTES and the table lut.table_words(2, True); its other configs, every config of
    other options, and every config with the switch off, the usual table."""
    from tqc.kernels import registry
    from tqc.kernels.registry import FRAGMENT_LAYOUT, FragmentLayerKernel, KernelKey, prepare
    from tqc.kernels.synthetic import random_turboquant_linear

    monkeypatch.setattr(registry, "HIGH_BYTES", high_bytes)
    for option, applies in [("2", high_bytes), ("4+2", False), ("3", False)]:
        module = random_turboquant_linear(LayerSpec(QuantOption.parse(option), 128, 1024, 192), "cpu")
        prepare(module, FRAGMENT_LAYOUT)
        family = FragmentLayerKernel(KernelKey.of(module.spec, FRAGMENT_LAYOUT), None)
        for config in family.candidates(1):
            takes = applies and config.strategy == "fragment_gemv" and config.sums != "steps"
            assert family.specialise(config)[1].get("HIGH_BYTES", False) == takes, (option, config)
            table = family.config_weights(module, config)[2].view(torch.uint32)
            words = lut.table_words(family.key.bits, takes, signed=family.sign_selectors)
            assert table[:len(words)].tolist() == list(words), (option, config)


@pytest.mark.parametrize("kernel_name", ["fragment_gemv_kernel", "fragment_dot_kernel"])
def test_sign_selectors_take_the_sign_step_out_of_the_3_bit_lookups(kernel_name):
    """SIGN_SELECTORS: a 3-bit quad's PRMTs read selectors that hold the signs, so the shift and xor that put
    each quad's signs into its high bytes are gone: fewer instructions at 8 steps (the one-token kernel with
    row sums, as the family launches it, and the tensor-core kernel), the same lookups and code loads plus
    two table words, in as many registers, without spills."""
    sums = {"ROW_SUMS": True, "SUM_STEPS": True} if kernel_name == "fragment_gemv_kernel" else {"SCALE_AFTER": True}
    off, on = _knob_off_and_on(kernel_name, "SIGN_SELECTORS", BITS=3, PDL=True, **sums)
    assert on["ops"]["PRMT"] == off["ops"]["PRMT"] and on["instructions"] < 0.95 * off["instructions"]
    assert on["loads"]["LDG.E.EF.64"] == off["loads"]["LDG.E.EF.64"]
    assert on["stack"] == 0 and on["registers"] <= off["registers"]


@pytest.mark.parametrize("sign_selectors", [True, False])
def test_the_registry_asks_for_sign_selectors_on_3_bit_layers(sign_selectors, monkeypatch):
    """fragments.SIGN_SELECTORS (on unless TQC_SIGN_SELECTORS=0): a 3-bit layer prepared for the fragment family
    takes the selector sign layout, SIGN_SELECTORS in every config's constexprs and the signed table; other
    options, and every option with the switch off, neither."""
    from tqc.kernels.registry import FRAGMENT_LAYOUT, FragmentLayerKernel, KernelKey, prepare
    from tqc.kernels.synthetic import random_turboquant_linear

    monkeypatch.setattr(fragments, "SIGN_SELECTORS", sign_selectors)
    for option in ("3", "4", "2", "4+2"):
        module = random_turboquant_linear(LayerSpec(QuantOption.parse(option), 128, 1024, 192), "cpu")
        codes = module.codes.clone()
        prepare(module, FRAGMENT_LAYOUT)
        family = FragmentLayerKernel(KernelKey.of(module.spec, FRAGMENT_LAYOUT), None)
        applies = option == "3" and sign_selectors
        layout = fragments.to_fragments_layout(codes, family.key.bits, 1024)
        assert torch.equal(module.codes, layout)
        for config in family.candidates(1) + family.candidates(16):
            assert family.specialise(config)[1].get("SIGN_SELECTORS", False) == applies, (option, config)
        words = list(lut.table_words(family.key.bits, signed=applies))
        assert family.weights(module)[2].view(torch.uint32)[:len(words)].tolist() == words, option


def test_the_registry_asks_for_word_masks_where_they_apply(monkeypatch):
    """registry.WORD_MASKS: the one-token kernel's row-sum configs of layers with words of 2-bit codes (2 bits,
    3 bits without SIGN_SELECTORS, 4+2) take WORD_MASKS; their other configs, and every config of 4 and 4+4,
    and of 3 bits by sign selectors, do not."""
    from tqc.kernels import registry
    from tqc.kernels.registry import FRAGMENT_LAYOUT, FragmentLayerKernel, KernelKey

    monkeypatch.setattr(registry, "WORD_MASKS", True)
    for option, applies in [("2", True), ("3", False), ("4+2", True), ("4", False), ("4+4", False)]:
        family = FragmentLayerKernel(KernelKey.of(LayerSpec(QuantOption.parse(option), 128, 1024, 192), FRAGMENT_LAYOUT),
                                     None)
        for config in family.candidates(1) + family.candidates(16):
            takes = applies and config.strategy == "fragment_gemv" and config.sums != "steps"
            assert family.specialise(config)[1].get("WORD_MASKS", False) == takes, (option, config)
    monkeypatch.setattr(fragments, "SIGN_SELECTORS", False)
    family = FragmentLayerKernel(KernelKey.of(LayerSpec(QuantOption.parse("3"), 128, 1024, 192), FRAGMENT_LAYOUT), None)
    assert all(family.specialise(c)[1].get("WORD_MASKS", False) == (c.strategy == "fragment_gemv" and c.sums != "steps")
               for c in family.candidates(1))


@pytest.mark.parametrize("bits", [4, 2])
def test_summed_steps_scale_a_group_once_in_the_one_token_fragment_kernel(bits):
    """SUM_STEPS (the lab's knob, scripts/gluon_dot16_lab.py): the two 64-input steps of a 128-input
    group sum their products before one scale, so the half2 multiplies and multiply-adds fall from
    one a weight to three quarters; the loads and lookups stay, no spills. Off, nothing changes."""
    iters = 8
    each, summed = _knob_off_and_on("fragment_gemv_kernel", "SUM_STEPS", BITS=bits)
    weights = 16 * 64 * iters // 32  # a thread's
    half2 = [_half2(each), _half2(summed)]
    assert half2 == [weights, weights * 3 // 4]
    assert summed["stack"] == 0 and summed["loads"] == each["loads"] and summed["ops"]["PRMT"] == each["ops"]["PRMT"]


@pytest.mark.parametrize("res_bits", [0, 4])
def test_row_sums_scale_a_threads_row_once_a_step_in_the_one_token_fragment_kernel(res_bits):
    """ROW_SUMS (as the family launches fragment_gemv_kernel): a thread sums a step's unscaled products
    along each of its two rows, a half2 multiply-add a weight pair (a stage's first an HMUL2), and
    scales each row's half2 into its sums once a step and stage: from 2 half2 instructions a weight
    pair (3 with a residual) to 1 (2) plus 2 (4) a step. The activations and scales reach the
    decoded weights' registers by layout conversions asserted trivial; loads and lookups stay, no
    spills."""
    iters = 8
    each, rows = _knob_off_and_on("fragment_gemv_kernel", "ROW_SUMS", RES_BITS=res_bits)
    stages = 1 + (res_bits > 0)
    weight_pairs = 16 * 64 * iters // 32 // 2  # a thread's
    half2 = [_half2(each), _half2(rows)]
    assert half2 == [weight_pairs * (1 + stages), weight_pairs * stages + 2 * stages * iters]
    assert rows["stack"] == 0 and rows["loads"] == each["loads"] and rows["ops"]["PRMT"] == each["ops"]["PRMT"]


@pytest.mark.parametrize("res_bits", [0, 4])
def test_activations_in_fragment_order_load_as_two_vectors_a_step(res_bits):
    """X_ORDERED (the lab's, with ROW_SUMS and SUM_STEPS): with x stored in fragment order each thread
    loads a step's 16 inputs as two 16-byte vectors, where it loaded eight 4-byte pairs; they reach the
    weights' registers by conversions asserted trivial; the decode and the half2 math stay, no spills."""
    iters = 8
    each, ordered = _knob_off_and_on("fragment_gemv_kernel", "X_ORDERED", ROW_SUMS=True, SUM_STEPS=True,
                                     RES_BITS=res_bits)
    assert ordered["loads"]["LDG.E.128"] == 2 * iters and "LDG.E.128" not in each["loads"]
    assert each["loads"]["LDG.E"] - ordered["loads"]["LDG.E"] == 8 * iters
    assert ordered["stack"] == 0 and ordered["ops"]["PRMT"] == each["ops"]["PRMT"] and _half2(ordered) == _half2(each)
    assert ordered["instructions"] < each["instructions"]


@pytest.mark.parametrize("res_bits", [0, 2])
def test_scale_after_scales_the_tensor_cores_products_once_a_group(res_bits):
    """SCALE_AFTER (as the family launches fragment_dot_kernel): the tensor cores multiply the unscaled
    weights, a stage's over a 128-input group's two steps into an accumulator of its own, scaled into
    the sums in float32 (8 FFMA a thread, group and stage), where each weight pair took an HMUL2 (and
    an HFMA2 for the residual); a residual stage takes tensor-core products of its own. No spills."""
    iters = 8
    each, after = _knob_off_and_on("fragment_dot_kernel", "SCALE_AFTER", RES_BITS=res_bits)
    stages = 1 + (res_bits > 0)
    half2 = [_half2(each), _half2(after)]
    assert half2 == [16 * 64 * iters // 32 // 2 * stages, 0]
    assert after["ops"]["FFMA"] == 8 * stages * iters // 2
    assert after["ops"]["HGMMA"] == stages * each["ops"]["HGMMA"] and after["stack"] == 0
    assert after["ops"]["PRMT"] == each["ops"]["PRMT"]


@pytest.mark.parametrize("preload", [False, True])
@pytest.mark.parametrize("kernel_name", ["fragment_dot_kernel", "fragment_gemv_kernel"])
def test_fragment_kernels_wait_for_the_rotation_after_their_weights_prologue(kernel_name, preload):
    """With PDL (programmatic dependent launch, as the family launches on sm_90) a fragment kernel
    waits for the previous kernel (griddepcontrol.wait, ACQBULK), which writes its activations and
    zeroes its output, before it loads an activation or adds into the output; its weights' prologue
    runs before (without PDL it never waits: test_fragment_gemv_kernel_decodes_...), with PRELOAD
    including the first LOOKAHEAD steps' code vectors, and without it none."""
    pytest.importorskip("triton.experimental.gluon")
    from tqc.kernels import gluon_kernels
    from tqc.kernels.static_report import compile_gluon_for_hopper

    lookahead = 2
    constexprs = {"N": 4096, "K": 4096, "G": 128, "BLOCK_K": 64, "ITERS": 4, "X_LAYOUT": gluon_kernels.x_layout(64),
                  "LOOKAHEAD": lookahead, "num_warps": 4, "EVICT": True, "PDL": True, "PRELOAD": preload}
    sass = compile_gluon_for_hopper(getattr(gluon_kernels, kernel_name), constexprs, 4, "*bf16").asm["sass"]
    wait = sass.index("ACQBULK")
    before = sass[:wait]
    assert sass.count("ACQBULK") == 1 and sass.index("PREEXIT") > wait and sass.index("REDG") > wait
    # before it: the lookup table (4 words a thread) and code words only, no activation (dot: 16-byte loads)
    assert before.count("LDG.E ") <= 4 and "LDG.E.128 " not in before and "STS" not in before
    assert before.count("LDG.E.EF.128") == (lookahead if preload else 0)  # a 16-byte code vector a step


# decode_attention_kernel at Llama-3-8B's shapes (64 positions a program of a 1024-position cache), its argument types
LLAMA_ATTENTION = {"CONTEXT": 1024, "KV_HEADS": 8, "GROUP": 4, "D": 128, "SPLIT": 64, "BLOCK": 64, "SPLITS": 16,
                   "BLOCK_G": 16, "BLOCK_S": 16}
ATTENTION_TYPES = {"qkv_ptr": "*bf16", "cache_ptr": "*bf16", "pos_ptr": "*i64", "partial_ptr": "*fp32",
                   "stats_ptr": "*fp32", "count_ptr": "*i32", "scale": "fp32"}


@pytest.mark.parametrize("pdl", [False, True])
def test_decode_attention_reads_only_its_cache_slice_before_waiting_for_qkv(pdl):
    """Under PDL the one-launch attention waits once (griddepcontrol.wait, ACQBULK) for the q/k/v
    matmul, and before that only loads its slice of the KV cache, which earlier steps wrote: 64
    positions of 128 bf16 keys and as many values, 16 bytes a thread a load over 8 warps. It stores
    and adds nothing before the wait, and loads q, the new key and value after it. Without PDL it
    never waits."""
    from tqc.kernels.attention import decode_attention_kernel
    from tqc.kernels.static_report import compile_jit_for_hopper

    block, d, warps = LLAMA_ATTENTION["BLOCK"], LLAMA_ATTENTION["D"], 8
    sass = compile_jit_for_hopper(decode_attention_kernel, LLAMA_ATTENTION | {"PDL": pdl}, warps,
                                  types=ATTENTION_TYPES).asm["sass"]
    if not pdl:
        assert "ACQBULK" not in sass
        return
    assert sass.count("ACQBULK") == 1
    before, after = sass.split("ACQBULK")
    assert len(re.findall(r"LDG\.E[.\w]*\.128 ", before)) == 2 * block * d * 2 // (16 * 32 * warps)
    assert not re.search(r"\b(STG|ATOMG|REDG)", before)
    assert "LDG" in after


def test_attention_leaving_its_slices_counts_nothing_and_o_projs_rotation_combines_them():
    """glue.attention_linear's two launches, compiled for sm_90: the attention without COMBINE has no
    atomic count and no combining tail (with it: one ATOMG); the rotation launch that combines,
    under PDL, loads only its rotation signs before it waits for the attention, stores nothing
    before it, and reads the slices' statistics and partial outputs after it."""
    from tqc.kernels.attention import decode_attention_kernel
    from tqc.kernels.glue import combine_rotate_kernel
    from tqc.kernels.static_report import compile_jit_for_hopper

    atomics = [compile_jit_for_hopper(decode_attention_kernel, LLAMA_ATTENTION | {"PDL": True, "COMBINE": combine}, 8,
                                      types=ATTENTION_TYPES).asm["sass"].count("ATOMG") for combine in (True, False)]
    assert atomics == [1, 0]
    constexprs = {"HEADS": 32, "SPLITS": 16, "BLOCK_S": 16, "D": 128, "K": 4096, "LOG_G": 7, "BLOCK_K": 256,
                  "PAIR_WIDTH": 0, "INT8": False, "PER_WORD": 0, "PDL": True, "FRAGMENT_STEP": 0}
    types = {"partial_ptr": "*fp32", "stats_ptr": "*fp32", "like_ptr": "*bf16", "signs_ptr": "*fp32",
             "out_ptr": "*fp16", "scales_ptr": "*fp16", "clear_ptr": "*bf16", "fill_ptr": "*bf16",
             "CLEAR": "i32"}
    sass = compile_jit_for_hopper(combine_rotate_kernel, constexprs, 4, types=types).asm["sass"]
    assert sass.count("ACQBULK") == 1
    before, after = sass.split("ACQBULK")
    assert len(re.findall(r"\bLDG\b", before)) == 1 and not re.search(r"\b(STG|ATOMG|REDG)", before)
    assert len(re.findall(r"\bLDG\b", after)) > constexprs["SPLITS"]  # a partial output a slice, and the stats


@pytest.mark.parametrize("preload", [False, True])
def test_norm_loads_only_its_weight_and_signs_before_waiting(preload):
    """Under PDL the norm + rotation launch (glue.norm_rotate_kernel, one token) waits once for the
    matmul that writes the residual's delta; with PRELOAD it loads its block's norm weight and
    rotation signs, which nothing writes, before that wait (one load each a thread), else nothing."""
    from tqc.kernels.glue import norm_rotate_kernel
    from tqc.kernels.static_report import compile_jit_for_hopper

    constexprs = {"K": 4096, "LOG_G": 7, "BLOCK_K": 256, "PAIR_WIDTH": 0, "INT8": False, "PER_WORD": 0, "ROW": 4096,
                  "RESIDUAL": True, "FORM": 0, "PDL": True, "FRAGMENT_STEP": 0, "PRELOAD": preload}
    types = {"h_ptr": "*bf16", "delta_ptr": "*bf16", "weight_ptr": "*bf16", "h_out_ptr": "*bf16", "signs_ptr": "*fp32",
             "out_ptr": "*fp16", "scales_ptr": "*fp16", "clear_ptr": "*bf16", "fill_ptr": "*bf16",
             "CLEAR": "i32", "eps": "fp32"}
    sass = compile_jit_for_hopper(norm_rotate_kernel, constexprs, 4, types=types).asm["sass"]
    assert sass.count("ACQBULK") == 1
    before, after = sass.split("ACQBULK")
    assert len(re.findall(r"\bLDG\b", before)) == (2 if preload else 0)
    assert not re.search(r"\b(STG|ATOMG|REDG)", before) and "LDG" in after


def test_swiglu_primes_down_projs_output_with_the_residual_only_after_waiting():
    """Under PDL the SwiGLU + rotation launch (glue.swiglu_rotate_kernel, one token) reads and writes
    nothing before it waits for gate/up's matmul; with FILL it also loads the residual, after that
    wait, to store where it would store zeros (down_proj's output, which the kernel adds onto)."""
    from tqc.kernels.glue import swiglu_rotate_kernel
    from tqc.kernels.static_report import compile_jit_for_hopper

    constexprs = {"K": 14336, "LOG_G": 7, "BLOCK_K": 256, "PAIR_WIDTH": 0, "INT8": False, "PER_WORD": 0,
                  "GELU": False, "PDL": True, "FRAGMENT_STEP": 0}
    types = {"gate_up_ptr": "*bf16", "signs_ptr": "*fp32", "out_ptr": "*fp16", "scales_ptr": "*fp16",
             "clear_ptr": "*bf16", "fill_ptr": "*bf16", "CLEAR": "i32"}
    loads = {}
    for fill in (False, True):
        sass = compile_jit_for_hopper(swiglu_rotate_kernel, constexprs | {"FILL": fill}, 4, types=types).asm["sass"]
        assert sass.count("ACQBULK") == 1
        before, after = sass.split("ACQBULK")
        assert not re.search(r"\b(LDG|STG|ATOMG|REDG)", before)
        loads[fill] = len(re.findall(r"\bLDG\b", after))
    assert loads[True] > loads[False]


@pytest.mark.parametrize(("kernel_name", "inputs_a_step"), [("fragment_dot_kernel", 16 * 64 // 128),
                                                            ("fragment_gemv_kernel", 64 // 4)])
def test_fragment_kernels_read_bf16_activations_as_loaded(kernel_name, inputs_a_step):
    """A layer whose input arrives rotated (o_proj folded into v_proj) reads attention's bf16 output as
    it comes, as the family launches its kernels: the same loads and tensor-core math as on fp16
    activations, one conversion (F2F) per input a thread loads (the dot kernel's 16 tokens x 64
    inputs over 128 threads a step; the one-token kernel's lanes each take 16 of a step's 64), no spills."""
    pytest.importorskip("triton.experimental.gluon")
    from tqc.kernels import gluon_kernels
    from tqc.kernels.registry import FRAGMENT_DOT_SCALING, GEMV_SUMS
    from tqc.kernels.static_report import compile_gluon_for_hopper, sass_summary

    iters = 4
    scaling = FRAGMENT_DOT_SCALING if kernel_name == "fragment_dot_kernel" else GEMV_SUMS["rows"]
    constexprs = {"N": 4096, "K": 4096, "G": 128, "BLOCK_K": 64, "ITERS": iters, "X_LAYOUT": gluon_kernels.x_layout(64),
                  "LOOKAHEAD": 2, "num_warps": 4, "EVICT": True, "PDL": True} | scaling
    fp16, bf16 = (sass_summary(compile_gluon_for_hopper(getattr(gluon_kernels, kernel_name), constexprs, 4, "*bf16", x))
                  for x in ("*fp16", "*bf16"))
    assert bf16["stack"] == 0 and bf16["loads"] == fp16["loads"]
    assert bf16["ops"].get("HGMMA", 0) == fp16["ops"].get("HGMMA", 0)
    assert (fp16["ops"].get("F2F", 0), bf16["ops"].get("F2F", 0)) == (0, inputs_a_step * iters)


def test_num_stages_pipelines_the_cuda_core_step_loop():
    """num_stages > 1 copies the next steps' loads into shared memory asynchronously (cp.async) in
    the one-token kernel too: Triton pipelines a loop without tl.dot only where tl.range names the
    stages, and the launch option alone left this loop as it was."""
    pytest.importorskip("triton")
    from tqc.kernels.bench import layer_key
    from tqc.kernels.static_report import compile_for_hopper, sass_summary

    key = layer_key("4", 1024, 4096, 128)
    config = LaunchConfig(strategy="fma", block_n=16, num_warps=4, slots=8, iters=4, accumulate="fp16")
    plain = sass_summary(compile_for_hopper(key, config))["ops"]
    pipelined = sass_summary(compile_for_hopper(key, config.model_copy(update={"num_stages": 3})))["ops"]
    assert plain.get("LDGSTS", 0) == 0 and pipelined.get("LDGSTS", 0) > 0


def test_code_words_are_loaded_evict_first():
    """The code words, read once, are the loads marked to leave L1 first (triton_kernels._plane_tile);
    the activations and scales, which every program rereads, are not."""
    pytest.importorskip("triton")
    from tqc.kernels.bench import layer_key
    from tqc.kernels.static_report import compile_for_hopper, sass_summary

    config = LaunchConfig(strategy="fma", block_n=16, num_warps=4, slots=16, accumulate="fp16")
    loads = sass_summary(compile_for_hopper(layer_key("4", 14336, 4096, 128), config))["loads"]
    first = sum(count for name, count in loads.items() if ".EF" in name)
    assert first == 4  # two word tiles of 16 rows x 64 words: 4 vectors of 4 words per thread
    assert loads.get("LDG.E.128", 0) > 0 and loads.get("LDG.E.U16", 0) > 0  # activations, scales: default policy


def test_every_switch_tqc_reads_is_documented_with_its_default():
    """docs/switches.md lists each TQC_ environment variable that the package reads, and for those read
    with a default, the same default."""
    root = Path(__file__).resolve().parents[1]
    read = {}
    for source in [path for folder in ("tqc", "kernels", "calibration") for path in (root / folder).rglob("*.py")]:
        for name, default in re.findall(r'environ(?:\.get\(|\[)"(TQC_\w+)"(?:, "([^"]*)")?', source.read_text()):
            read[name] = default or read.get(name, "")
    table = (root / "docs" / "switches.md").read_text()
    documented = dict(re.findall(r"^\| `(TQC_\w+)` \| `?([^`|]*?)`? \|", table, re.M))
    assert set(read) == set(documented)
    assert all(documented[name] == default for name, default in read.items() if default)

#!/usr/bin/env bash
# The fragment family's open checks on a Hopper GPU (docs/performance.md, "What would be next"), in
# parts that each fit one device call (600 s), results and logs under $OUT:
#   source scripts/device_setup.sh && bash scripts/fragment_checks.sh accuracy decode
# BUDGET=S skips the parts that would start after S seconds, so that a call's limit stops none halfway
# and what ran comes back.
# accuracy  tests/test_kernels_accuracy.py -k fragment: every option the family's kernels take against
#           the reference path, and a loaded model; if it passes, add the options to
#           registry.CHECKED_FRAGMENT_OPTIONS
# accuracy-rest  the rest of tests/test_kernels_accuracy.py, less the tests listed in the file $PASSED (default
#           none: all 249 have passed on an H100 by run 241, docs/bench/h100-run241-accuracy-passed.txt), verbose
#           so that a call stopped by its limit (the whole takes several calls) names what passed: list those in
#           a file and pass it as PASSED to the next call. A test past TEST_TIMEOUT seconds (default 300;
#           pytest-timeout, on the device image) fails and the rest go on
# decode    the one-token decoder at plans 4 and mixed: lookups, family, lookups again, side by side
# layers-family, layers-lookups
#           Llama-3-8B's gate/up and down at 1 and 16 tokens for every option, on the family
#           (--fragments all) or the lookups, a part each (with bf16 in the same run)
# prefill   the decoder's 2048-token prefill on the family, and a model from tqc.load on it
#           (fragments=True: the checked options)
# lab       the one-token kernel as the tuner's rows_steps candidates run it (ROW_SUMS, SUM_STEPS) beside
#           it with the activations in fragment order (X_ORDERED: two 16-byte loads a thread and step),
#           at 4, 8 and 16 steps, and the 16-token kernel with its products scaled after the tensor
#           cores (SCALE_AFTER) beside it as it was: checked against a dequantized reference, then
#           timed on Llama-3-8B's layers
# preload   the family's first steps' codes loaded before the wait for the rotation (TQC_PRELOAD=1,
#           gluon_kernels PRELOAD) against without, each variant its own Triton cache: the one-token
#           decoder at the mixed plan, then Llama-3-8B's gate/up and down at 1 and 16 tokens (options
#           3, 4, 4+2); off, on, off again (VARIANTS="0 1" picks)
# word-masks each word of 2-bit codes masked once for two quads' selectors (TQC_WORD_MASKS=1, session 50, CPU-checked
#           only): its GPU checks, then Llama-3-8B's gate/up, down and concatenated gate/up at one token, options
#           2, 3 and 4+2, for each VARIANT (default 0 1 0-again 1-again), each its own Triton cache, the tuning
#           cache's picks; the decoder at plan 2 for the first two
# sign-selectors  3-bit signs in the PRMT selectors (TQC_SIGN_SELECTORS, default since session 51, runs 231-234): its
#           GPU checks, then Llama-3-8B's gate/up, down and concatenated gate/up at option 3, one token and 16,
#           for each VARIANT (default 0 1 0-again 1-again), each its own Triton cache; the decoder at plan 3
#           for the first two
# retune    the one-token keys of option $OPTION (default 2) of Llama-3-8B's gate/up, down and concatenated gate/up
#           tuned afresh (each variant from the tuning cache less those keys, in a cache of its own), without and
#           with the activations in fragment order offered to the tuner (TQC_ORDERED_INPUTS=1); the tuned caches
#           come back, the other keys as they were. Run 227 (as `ordered-2bit`, still a name for OPTION=2) retuned the 2-bit keys for the high
#           bytes; run 237 (OPTION=3 VARIANTS="0 0-again") the 3-bit keys under the sign selectors; run 245 (then
#           GRID3=1) the 3-bit keys on the grid codebook, now option 3g's own (OPTION=3g)
# grid3     option 3g, 3-bit codes of codebook.high_byte_codebook(3) looked up by their high bytes: its GPU checks, then
#           Llama-3-8B's gate/up, down and concatenated gate/up at one token, options 3 and 3g side by side, and the
#           decoder at plans mixed, mixed-3g, 3 and 3g, for each VARIANT (default a b)
# profile   Nsight Compute on the family's one-token kernel at $OPTION bits (default 4), gate/up (14336x4096) then down
#           (4096x14336): run 129 found them level (docs/performance.md)
# balance   Nsight Compute, a few metrics: how the one-token kernel's programs spread over the SMs
#           (programs and active cycles per SM, least and most), options 3 and 4, gate/up then down
# attention the one-launch decode attention (kernels/attention.py): its GPU checks, then the decoder at the
#           mixed plan on Llama-3-8B's shapes, both models alike, side by side: torch's attention, the one
#           launch, torch's again
# attention-qwen  the same three decoders on Qwen2.5-7B's shapes, then the attention alone at several slice
#           lengths and warp counts
# qwen      Qwen2.5-7B's and Qwen3-4B's attention layers (q/o/k/v) at 1 and 16 tokens, options 3 and 4
#           (tunes their keys first), then the Qwen2.5-7B-shaped decoder's 16-token forward at the mixed plan
# direct    o_proj folded into v_proj (session 31; run 130: correct, no faster): the GPU checks of a layer whose input arrives rotated and
#           of o_proj reading attention's output as it comes (TQC_DIRECT_INPUTS), then
#           scripts/o_proj_fold_lab.py: the decoder unfolded, folded, direct, and the upper bound
# glance-8b, glance-70b, glance-16, glance-prefill
#           docs/performance.md's "At a glance" table measured afresh at HEAD, a call each (on an H200 too: its
#           first rerun since run 190): every option of Llama-3-8B's layers at one token and the decoder at plans
#           mixed, mixed-3g and 3g; 70B's at one token; the large layers at 16 tokens (4-bit); 2048 tokens through
#           8 decoder layers and the large layers at 4, 128 and 2048 tokens (4-bit)
set -uo pipefail
out=${OUT:-/tmp/out}
run() {  # run NAME COMMAND...: its output into $out/NAME.log as well
  echo "== $*"
  "${@:2}" 2>&1 | tee "$out/$1.log"
}
switch_ab() {  # switch_ab NAME VARIABLE TESTS PLAN LAYER-ARGS...: an opt-in's GPU checks (-k TESTS), then 8B's MLP
  # layers with LAYER-ARGS and the decoder at PLAN, VARIABLE off and on (VARIANTS), each its own Triton cache
  local name=$1 variable=$2 tests=$3 plan=$4
  shift 4
  run "$name-accuracy" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_accuracy.py -k "$tests"
  for v in ${VARIANTS:-0 1 0-again 1-again}; do
    local switch=(env "$variable=${v:0:1}" TRITON_CACHE_DIR="/tmp/triton-cache-$name-${v:0:1}")
    run "$name-layers-$v" "${switch[@]}" python3 -u -m tqc.cli bench layers --models llama3-8b llama3-8b-fused \
      --layers gate_proj/up_proj down_proj gate_proj+up_proj "$@" -o "$out/$name-layers-$v.json"
    case $v in
      ?) run "$name-decode-$v" "${switch[@]}" python3 -u -m tqc.cli bench decode --plan "$plan" --tokens 1 \
           -o "$out/$name-decode-$v.json" ;;
    esac
  done
  (cd "$out" && tar czf "$name.tgz" "$name"-* && rm "$name"-*)
}
for part in "$@"; do
  if [ "$SECONDS" -gt "${BUDGET:-1000000}" ]; then
    echo "== skipped $part: past BUDGET=$BUDGET s" | tee -a "$out/skipped.log"
    continue
  fi
  case $part in
    accuracy)
      run accuracy python3 -m pytest -q tests/test_kernels_accuracy.py -k fragment ;;
    accuracy-rest)
      mapfile -t passed < "${PASSED:-/dev/null}"
      run accuracy-rest python3 -m pytest -v -p no:cacheprovider --timeout="${TEST_TIMEOUT:-300}" \
        tests/test_kernels_accuracy.py -k "not fragment" "${passed[@]/#/--deselect=}" ;;
    direct)
      run direct-accuracy python3 -m pytest -q tests/test_kernels_accuracy.py -k "arrives_rotated or directly"
      run direct-lab python3 -u scripts/o_proj_fold_lab.py -o "$out/o_proj_fold_lab.json" ;;
    decode)
      for plan in 4 mixed; do
        run "decode-$plan-lookups" python3 -u -m tqc.cli bench decode --plan "$plan" --tokens 1 --lookups \
          -o "$out/decode-$plan-lookups.json"
        run "decode-$plan-fragments" python3 -u -m tqc.cli bench decode --plan "$plan" --tokens 1 --fragments all \
          -o "$out/decode-$plan-fragments.json"
        run "decode-$plan-lookups-again" python3 -u -m tqc.cli bench decode --plan "$plan" --tokens 1 --lookups \
          -o "$out/decode-$plan-lookups-again.json"
      done ;;
    layers-family | layers-lookups)  # one family a call: both together took over 600 s (run 124)
      family=${part#layers-}
      args=(--lookups)
      [ "$family" = family ] && args=(--fragments all)
      run "$part" python3 -u -m tqc.cli bench layers "${args[@]}" --models llama3-8b \
        --layers gate_proj/up_proj down_proj --options 2 3 4 4+2 4+4 --tokens 1 16 -o "$out/$part.json" ;;
    prefill)
      run prefill python3 -u -m tqc.cli bench decode --plan mixed --tokens 2048 --fragments all \
        -o "$out/decode-mixed-t2048-fragments.json"
      run hf-decode python3 -u scripts/check_hf_decode.py --layers 32 --fragments -o "$out/hf-decode-fragments.json" ;;
    lab)
      configs="gemv:64,4,4,2,1,0,1,1 gemv:64,4,4,2,1,0,1,1,0,1 gemv:64,8,4,2,1,0,1,1 gemv:64,8,4,2,1,0,1,1,0,1
               gemv:64,16,4,2,1,0,1,1 gemv:64,16,4,2,1,0,1,1,0,1"
      # shellcheck disable=SC2086  # $configs is a list
      run lab-check python3 -u scripts/gluon_dot16_lab.py check --configs $configs
      # shellcheck disable=SC2086
      run lab-bench python3 -u scripts/gluon_dot16_lab.py bench --no-tqc --tokens 1 --configs $configs \
        --out "$out/lab-gemv-ordered.json"
      configs="dot:64,8,4,2,1 dot:64,8,4,2,1,0,0,0,1 dot:64,16,4,2,1 dot:64,16,4,2,1,0,0,0,1"
      # shellcheck disable=SC2086
      run lab-check-dot python3 -u scripts/gluon_dot16_lab.py check --configs $configs
      # shellcheck disable=SC2086
      run lab-bench-dot python3 -u scripts/gluon_dot16_lab.py bench --no-tqc --tokens 16 --configs $configs \
        --out "$out/lab-dot-scaled-after.json" ;;
    preload)
      variants="0 1 0-again"
      for v in ${VARIANTS:-$variants}; do
        export TQC_PRELOAD=${v:0:1} TRITON_CACHE_DIR=/tmp/triton-cache-preload-${v:0:1}
        run "preload-decode-$v" python3 -u -m tqc.cli bench decode --plan mixed --tokens 1 -o "$out/preload-decode-$v.json"
        run "preload-layers-$v" python3 -u -m tqc.cli bench layers --models llama3-8b --layers gate_proj/up_proj \
          down_proj --options 3 4 4+2 --tokens 1 16 -o "$out/preload-layers-$v.json"
      done
      unset TQC_PRELOAD TRITON_CACHE_DIR
      (cd "$out" && tar czf preload.tgz preload-* && rm preload-*) ;;  # a device call returns only a few files
    word-masks)
      switch_ab word-masks TQC_WORD_MASKS word_masks 2 --options 2 3 4+2 --tokens 1 ;;
    sign-selectors)
      switch_ab sign-selectors TQC_SIGN_SELECTORS sign_selectors 3 --options 3 --tokens 1 16 ;;
    retune | ordered-2bit)
      option=${OPTION:-2}
      [ "$part" = ordered-2bit ] && option=2
      bits=${option%%+*} residual=${option#*+}
      [ "$residual" = "$option" ] && residual=0
      name=retune-${option/+/-}
      for v in ${VARIANTS:-0 1 0-again 1-again}; do
        cache=/tmp/tqc-cache-$name-$v
        mkdir -p "$cache"
        python3 -c 'import json, pathlib, sys
for source in pathlib.Path(sys.argv[1]).glob("*.json"):
    data = json.loads(source.read_text())
    data["entries"] = {k: e for k, e in data["entries"].items()
                       if not (k.startswith(sys.argv[3]) and k.endswith(("n14336k4096fr/m1", "n4096k14336fr/m1", "n28672k4096fr/m1")))}
    (pathlib.Path(sys.argv[2]) / source.name).write_text(json.dumps(data, indent=1))' "$TQC_KERNEL_CACHE" "$cache" \
          "b${bits}r${residual}g128"
        run "$name-$v" env TQC_ORDERED_INPUTS="${v:0:1}" TQC_KERNEL_CACHE="$cache" python3 -u -m tqc.cli bench \
          layers --models llama3-8b llama3-8b-fused --layers gate_proj/up_proj down_proj gate_proj+up_proj \
          --options "$option" --tokens 1 -o "$out/$name-$v.json"
        mkdir -p "$out/$name-cache-$v" && cp "$cache"/nvidia-*.json "$out/$name-cache-$v"/
      done
      (cd "$out" && tar czf "$name.tgz" "$name"-* && rm -r "$name"-*) ;;
    grid3)
      run grid3-accuracy python3 -m pytest -q -p no:cacheprovider tests/test_kernels_accuracy.py -k "3g or high_byte"
      for v in ${VARIANTS:-a b}; do
        run "grid3-layers-$v" python3 -u -m tqc.cli bench layers --models llama3-8b llama3-8b-fused \
          --layers gate_proj/up_proj down_proj gate_proj+up_proj --options 3 3g --tokens 1 \
          -o "$out/grid3-layers-$v.json"
        for plan in mixed mixed-3g 3 3g; do
          run "grid3-decode-$plan-$v" python3 -u -m tqc.cli bench decode --plan $plan --tokens 1 \
            -o "$out/grid3-decode-$plan-$v.json"
        done
      done
      (cd "$out" && tar czf grid3.tgz grid3-* && rm grid3-*) ;;
    profile)
      for shape in 14336x4096 4096x14336; do
        run "ncu-gemv1-${OPTION:-4}bit-$shape" ncu --profile-from-start off --kernel-name fragment_gemv_kernel --launch-skip 2 \
          --launch-count 1 --set full --clock-control none python3 scripts/profile_layer_kernels.py --option "${OPTION:-4}" \
          --shapes "$shape"
      done ;;
    balance)
      metrics=sm__ctas_launched.min,sm__ctas_launched.max,sm__ctas_launched.sum,sm__cycles_active.min
      metrics=$metrics,sm__cycles_active.max,sm__cycles_active.avg,sm__cycles_elapsed.max,launch__grid_size
      metrics=$metrics,launch__occupancy_limit_registers,launch__waves_per_multiprocessor,gpu__time_duration.sum
      for option in 3 4; do
        for shape in 14336x4096 4096x14336; do
          run "balance-$option-$shape" ncu --profile-from-start off --kernel-name fragment_gemv_kernel \
            --launch-skip 2 --launch-count 1 --metrics "$metrics" --clock-control none \
            python3 scripts/profile_layer_kernels.py --option "$option" --shapes "$shape"
        done
      done ;;
    attention | attention-qwen)  # one model a call: both took over 600 s with the bench (run 135)
      model=llama3-8b
      if [ "$part" = attention ]; then
        run attention-accuracy python3 -m pytest -q tests/test_kernels_accuracy.py -k "decode_attention or one_launch_attention"
      else
        model=qwen2.5-7b
      fi
      for variant in sdpa triton sdpa-again; do
        run "attention-$model-$variant" python3 -u -m tqc.cli bench decode --model "$model" --plan mixed --tokens 1 \
          --attention "${variant%-again}" -o "$out/attention-$model-$variant.json"
      done
      [ "$part" = attention-qwen ] && run attention-bench python3 -u scripts/attention_bench.py -o "$out/attention-bench.json" ;;
    qwen)
      run qwen-attention python3 -u -m tqc.cli bench layers --models qwen2.5-7b qwen3-4b \
        --layers q_proj/o_proj q_proj o_proj k_proj/v_proj --options 3 4 --tokens 1 16 -o "$out/qwen-attention.json"
      run qwen-decode-t16 python3 -u -m tqc.cli bench decode --model qwen2.5-7b --plan mixed --tokens 16 \
        -o "$out/qwen-decode-mixed-t16.json" ;;
    glance-8b)
      run glance-8b python3 -u -m tqc.cli bench layers --models llama3-8b llama3-8b-fused \
        --options 4 3 3g 2 4+4 4+2 --tokens 1 -o "$out/glance-8b.json"
      for plan in mixed mixed-3g 3g; do
        run "glance-decode-$plan" python3 -u -m tqc.cli bench decode --plan $plan --tokens 1 \
          -o "$out/glance-decode-$plan.json"
      done ;;
    glance-70b)
      run glance-70b python3 -u -m tqc.cli bench layers --models llama3-70b llama3-70b-fused \
        --options 4 3g 2 4+4 4+2 --tokens 1 -o "$out/glance-70b.json" ;;
    glance-16)
      run glance-16 python3 -u -m tqc.cli bench layers --models llama3-8b llama3-8b-fused llama3-70b \
        --layers gate_proj/up_proj down_proj gate_proj+up_proj --options 4 --tokens 16 -o "$out/glance-16.json" ;;
    glance-prefill)
      run glance-prefill python3 -u -m tqc.cli bench decode --tokens 2048 --layers 8 -o "$out/glance-prefill.json"
      run glance-tokens python3 -u -m tqc.cli bench layers --models llama3-8b llama3-8b-fused \
        --layers gate_proj/up_proj down_proj gate_proj+up_proj --options 4 --tokens 4 128 2048 \
        -o "$out/glance-tokens.json" ;;
    *)
      echo "fragment_checks.sh: unknown part '$part' (accuracy, accuracy-rest, decode, layers-family, layers-lookups, prefill, lab, preload, word-masks, sign-selectors, retune, grid3, profile, balance, attention, attention-qwen, qwen, direct, glance-8b, glance-70b, glance-16, glance-prefill)" >&2
      exit 2 ;;
  esac
done

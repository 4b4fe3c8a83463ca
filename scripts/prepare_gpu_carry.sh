#!/usr/bin/env bash
# Fill data/offline/ (git-ignored) with what scripts/gpu_check.sh needs on the GPU machine,
# which reaches no package registry and no dataset host:
#   data/offline/train-0of2.npz, data/offline/test.npz   CIFAR-10 shards (JPEG copy, ~36 MB)
#   data/offline/wheels/*.whl                             packages its image lacks (~3.7 MB)
# The device machine's image has torch, torchvision, typer, rich, safetensors, pyyaml, numpy
# and pillow, but not spikingjelly (nor its import-time need loguru) nor pydantic 2 (with
# pydantic-core, annotated-types, typing-inspection); typing-extensions comes along so that
# pydantic-core finds a recent enough one. Versions match this project's environment.
#
#   bash scripts/prepare_gpu_carry.sh [DEST]        # DEST defaults to data/offline
# then call the device tool's run with carry ["data/offline"].
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${1:-data/offline}
SHARED=${STARS_SHARED_CIFAR10:-../shared/data/cifar10}
WHEELS=(
  spikingjelly==2.0.0
  loguru==0.7.3
  pydantic==2.13.4
  pydantic_core==2.46.4
  annotated-types==0.7.0
  typing-inspection==0.4.2
  typing_extensions==4.15.0
)

mkdir -p "$DEST/wheels"
case "$DEST" in
  /*) ;;
  *)
    if ! git check-ignore -q "$DEST"; then
      echo "warning: $DEST is not git-ignored; it would travel (and could be committed)" >&2
    fi
    ;;
esac

for f in train-0of2.npz test.npz; do
  if [[ ! -f $SHARED/$f ]]; then
    echo "error: $SHARED/$f not found (set STARS_SHARED_CIFAR10 to the folder holding it)" >&2
    exit 1
  fi
  cp -f "$SHARED/$f" "$DEST/$f"
done

# Wheels for the GPU image's Python (CPython 3.12, x86-64 manylinux); one version of each.
rm -f "$DEST"/wheels/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 \
  -d "$DEST/wheels" "${WHEELS[@]}"

ls -la "$DEST" "$DEST/wheels"
du -sh "$DEST"
echo "ready: carry [\"$DEST\"] with the device tool's run (the working tree limit is 64 MiB)"

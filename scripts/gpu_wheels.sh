#!/usr/bin/env bash
# The wheels a GPU session needs beyond a bare GPU machine's torch, timm, peft, onnx and OpenCV: MFuser's
# text tower for scripts/gpu_figures.py (open_clip and its tokenizer's ftfy, regex, wcwidth) and pytest for
# the suite's GPU tests, at requirements/lock.txt's versions, for CPython 3.12 on x86_64, into .whl/
# (ignored by git; about 4 MB). scripts/gpu_session.sh installs them there:
#
#   pip install --no-index --no-deps --find-links .whl open-clip-torch ftfy regex wcwidth pytest pytest-timeout …
#
# Usage: bash scripts/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
WHEELS="open-clip-torch ftfy regex wcwidth pytest pytest-timeout pluggy iniconfig packaging"
pins=()
for name in $WHEELS; do
    # The lock's line for this name, for this Python where it has one per version.
    line=$(grep -iE "^${name}==" requirements/lock.txt | grep -E "python_version == \"${py}\"|^[^;]*$" | head -1)
    [[ -n "$line" ]] || { echo "gpu_wheels.sh: no pin for ${name} (Python ${py}) in requirements/lock.txt" >&2; exit 2; }
    pins+=("${line%% *}")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${pins[@]}"
ls -1 .whl

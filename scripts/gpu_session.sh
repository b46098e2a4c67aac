#!/usr/bin/env bash
# One GPU machine session in one command: every family's figures, then the suite's GPU tests.
#
#   bash scripts/gpu_wheels.sh                      # here, once: .whl/ (carried to the machine with the checkout)
#   bash scripts/gpu_session.sh OUT [BUDGET_S]      # there: OUT/figures/gpu_figures.{json,md}, OUT/gpu_tests.log
#
# The wheels in .whl/ are installed first where they are (MFuser's open_clip, pytest); the figures run within
# BUDGET_S (default 420 s; scripts/gpu_figures.py writes its report after every step, so a cut run still
# reports), then `pytest -m gpu` on the files that hold the GPU tests (the Triton scan kernels against the
# reference, every family's tiny package on CUDA equal to the CPU, the pt2 backend in bf16 on CUDA) for at
# most GPU_TESTS_S seconds (default 150). DRY=1: the figures' --dry mode on the CPU (this script's own check);
# INSTALL_WHEELS=0: install nothing; PYTHON: the interpreter (default python3); WORK: the figures' --work.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: gpu_session.sh OUT [BUDGET_S]}"
budget="${2:-420}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if [[ -d .whl && "${INSTALL_WHEELS:-1}" == 1 ]]; then
    # --no-deps: the rest of what they need (torchvision, huggingface_hub, tqdm, safetensors) comes with timm.
    "$py" -m pip install --no-index --no-deps --find-links .whl open-clip-torch ftfy regex wcwidth pytest \
        pytest-timeout pluggy iniconfig packaging > "$out/pip.log" 2>&1 \
        || echo "gpu_session: the carried wheels did not install (see $out/pip.log)"
fi
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' | tee "$out/device.txt"
figures=(--out "$out/figures" --work "${WORK:-/tmp/gpu_figures_work}" --budget-s "$budget")
[[ "${DRY:-0}" == 1 ]] && figures+=(--dry --families "${FAMILIES:-vfmnet_l16_512x1024}" --compile none)
"$py" scripts/gpu_figures.py "${figures[@]}" 2>&1 | tee "$out/figures.log"
timeout "${GPU_TESTS_S:-150}" "$py" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" \
    test/test_selective_scan_triton.py test/test_torch_export.py test/test_device_portable.py \
    > "$out/gpu_tests.log" 2>&1
echo "gpu tests: exit $? (124: cut at ${GPU_TESTS_S:-150} s); $(tail -1 "$out/gpu_tests.log")"

#!/usr/bin/env bash
# Regenerate docs/images/compare_report.png, the screenshot of a comparison report in the
# README. The script trains three VAEs on the digits with different learning rates and one
# GAN, compares them with compare.py, and saves the top of the report with headless Chromium.
#
# Needs Chromium (apt-get install chromium). The runs and the report go to a temporary
# folder, which is deleted at the end. PYTHON selects the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."

python="${PYTHON:-.venv/bin/python}"
work="$(mktemp -d /tmp/genlab-compare-report.XXXXXX)"
trap 'rm -rf "$work"' EXIT
export WANDB_MODE=offline

"$python" train.py -m experiment=digits_vae model.lr=3e-4,1e-3,3e-3 trainer.max_epochs=20 \
    seed=0 logger=csv paths.log_dir="$work/logs"
"$python" train.py experiment=digits_gan trainer.max_epochs=20 \
    seed=0 logger=csv paths.log_dir="$work/logs"
"$python" compare.py "$work/logs" -o "$work/report.html" --force \
    --screenshot docs/images/compare_report.png --window-size 1280,1800

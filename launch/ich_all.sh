#!/usr/bin/env bash
# ICH on synthetic head CT (or your data: --config.data.manual_dir=/path/ct-ich-1.3.1):
# train and evaluate the U-Net and DeepLabv3 (runs/ich_unet, runs/ich_deeplabv3), then print
# the side-by-side table of their test metrics (also written to runs/ich_comparison.md).
# Extra arguments go to every medjax.main call.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m pip install --quiet -e .
RUNS=${RUNS:-runs}
for model in unet deeplabv3; do
  python -m medjax.main --config=configs/ich.py:model=$model --workdir="$RUNS/ich_$model" "$@"
done
python -m medjax.compare --workdirs "$RUNS/ich_unet" "$RUNS/ich_deeplabv3" \
  --out="$RUNS/ich_comparison.md"

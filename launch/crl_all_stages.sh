#!/usr/bin/env bash
# The whole CRL pipeline on synthetic data: train the three stages into one experiment
# directory (runs/crl/{segment,quality,keypoints}), evaluate the chain end to end on the test
# split (CRL error in mm, GA error in days, Bland-Altman plots in runs/crl/eval/test/), then
# measure one test image with medjax.predict. Extra arguments go to every medjax.main call.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m pip install --quiet -e .
WORKDIR=${WORKDIR:-runs/crl}
for stage in segment quality keypoints; do
  python -m medjax.main --config=configs/crl.py:stage=$stage --workdir="$WORKDIR" "$@"
done
python -m medjax.evaluate --config=configs/crl.py --workdir="$WORKDIR" --end_to_end --split=test
python - "$WORKDIR" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/eval/test/metrics.json"))
print(f"End to end on {m['num_images']} test images: "
      f"CRL error {m['crl_error_mean_mm']:+.2f} ± {m['crl_error_sd_mm']:.2f} mm "
      f"(mean absolute {m['crl_abs_error_mean_mm']:.2f} mm), "
      f"GA error {m['ga_error_mean_days']:+.2f} ± {m['ga_error_sd_days']:.2f} days "
      f"(mean absolute {m['ga_abs_error_mean_days']:.2f} days)")
PY

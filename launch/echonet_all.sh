#!/usr/bin/env bash
# EchoNet on synthetic videos (or your data: --config.data.manual_dir=/path/EchoNet-Dynamic):
# train the EF regressor and the LV segmentation into one experiment directory
# (runs/echonet/{ef,segment}), evaluate each on the test split, then the beat-to-beat EF
# (runs/echonet/eval/test/). Extra arguments go to every medjax.main / evaluate call.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m pip install --quiet -e .
WORKDIR=${WORKDIR:-runs/echonet}
for task in ef segment; do
  python -m medjax.main --config=configs/echonet.py:task=$task --workdir="$WORKDIR" "$@"
done
python -m medjax.evaluate --config=configs/echonet.py --workdir="$WORKDIR" --end_to_end \
  --split=test "$@"
python - "$WORKDIR" <<'PY'
import json, sys
ef = json.load(open(f"{sys.argv[1]}/ef/eval/test/metrics.json"))
seg = json.load(open(f"{sys.argv[1]}/segment/eval/test/metrics.json"))
b2b = json.load(open(f"{sys.argv[1]}/eval/test/beat_to_beat_metrics.json"))
print(f"EF all clips: MAE {ef['mae']:.2f} ({ef['mae_ci_low']:.2f}-{ef['mae_ci_high']:.2f}), "
      f"RMSE {ef['rmse']:.2f}, R2 {ef['r2']:.3f}, AUC(EF<50) {ef['auc_hfref']:.3f}; "
      f"one clip: MAE {ef['mae_single']:.2f}")
print(f"EF beat to beat: MAE {b2b['beat_to_beat_mae']:.2f}, RMSE {b2b['beat_to_beat_rmse']:.2f}, "
      f"R2 {b2b['beat_to_beat_r2']:.3f}, {b2b['beats_per_video_mean']:.1f} beats per video")
print(f"LV Dice overall {seg['dice_overall']:.3f}, ED {seg['dice_ed']:.3f}, ES {seg['dice_es']:.3f}")
PY

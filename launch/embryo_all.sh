#!/usr/bin/env bash
# Embryo time-lapse on synthetic videos (or your data: --config.data.manual_dir=/path/with/
# embryo_dataset,outcomes.csv): train the frame embedder (VAE), then the LSTM and the SVM
# outcome classifiers on its embeddings, into one experiment directory (runs/embryo/{embed,
# classify,classify_svm}); each is evaluated on the test split. Prints the two classifiers side
# by side (also written to runs/embryo/comparison.md) and classifies one test video with
# medjax.predict. Extra arguments go to every medjax.main call.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m pip install --quiet -e .
WORKDIR=${WORKDIR:-runs/embryo}
python -m medjax.main --config=configs/embryo.py:stage=embed --workdir="$WORKDIR" "$@"
python -m medjax.main --config=configs/embryo.py:stage=classify --workdir="$WORKDIR" "$@"
python -m medjax.main --config=configs/embryo.py:stage=classify,classifier=svm \
  --workdir="$WORKDIR" "$@"
python -m medjax.compare --workdirs "$WORKDIR/classify" "$WORKDIR/classify_svm" \
  --metrics=accuracy,balanced_accuracy,macro_f1,auc,majority_accuracy,num_videos \
  --out="$WORKDIR/comparison.md"
# One test video, read from the raw folder the dataset was built from.
VIDEO=$(python - "$WORKDIR" <<'PY'
import csv, json, os, sys
from medjax.data import synthetic_raw_dir
run = os.path.join(sys.argv[1], "classify")
data = json.load(open(os.path.join(run, "config.json")))["data"]
raw = data["manual_dir"] or synthetic_raw_dir(
    data["name"], data["data_dir"], data["synthetic_num"], data["synthetic_seed"])
row = next(csv.DictReader(open(os.path.join(run, "eval", "test", "predictions.csv"))))
print(os.path.join(raw, "embryo_dataset", row["video_id"]))
PY
)
python -m medjax.predict --config=configs/embryo.py --workdir="$WORKDIR" "$VIDEO"

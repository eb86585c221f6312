#!/usr/bin/env bash
# Install medjax and run the CRL segmentation job end to end on synthetic data:
# generate data -> build the TFDS dataset -> train the U-Net -> evaluate on the test split.
# Extra arguments are passed to medjax.main (e.g. --config.train.steps=200).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m pip install --quiet -e .
python -m medjax.main --config=configs/crl.py --workdir=runs/crl "$@"

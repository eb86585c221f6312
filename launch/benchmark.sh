#!/usr/bin/env bash
# The standard benchmark set, written into runs/benchmark/ (one JSON file each, plus the printed
# tables): the CRL U-Net (segment stage) at 1, 2, 4 and 8 devices, the quality (VGG-16) and
# keypoint (ResNet-34 heatmap) stages at 1 device, the U-Net in bfloat16, the U-Net's input
# pipeline (builds the synthetic CRL dataset into data/ if needed), the EchoNet EF regressor
# at 1, 2, 4 and 8 devices, the LV DeepLabv3, the EF input pipeline, the ICH U-Net and
# DeepLabv3, the perfusion ConvLSTM, and the embryo VAE.
# On a CPU the 2/4/8-device runs use virtual devices in subprocesses; on a GPU / TPU machine
# the first N devices. Extra arguments go to every run (e.g. --steps=50 --batch_per_device=8).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m pip install --quiet -e .
OUT=runs/benchmark
mkdir -p "$OUT"
bench() {
  local name="$1"
  shift
  echo "== $name"
  if ! python -m medjax.benchmark --out="$OUT/$name.json" "$@" 2>"$OUT/$name.log" \
    | tee "$OUT/$name.txt"; then
    tail -n 20 "$OUT/$name.log" >&2
    echo "$name failed; full log: $OUT/$name.log" >&2
    exit 1
  fi
}
bench unet_devices --config=configs/crl.py --devices=1,2,4,8 --batch_per_device=4 "$@"
bench quality --config=configs/crl.py:stage=quality --devices=1 --batch_per_device=16 "$@"
bench keypoints --config=configs/crl.py:stage=keypoints --devices=1 --batch_per_device=16 "$@"
bench unet_bf16 --config=configs/crl.py --devices=1 --batch_per_device=16 --dtype=bfloat16 "$@"
bench unet_input --config=configs/crl.py --devices=1 --batch_per_device=16 --input_pipeline "$@"
bench echonet_ef --config=configs/echonet.py --devices=1,2,4,8 --batch_per_device=4 "$@"
bench echonet_lv --config=configs/echonet.py:task=segment --devices=1 --batch_per_device=16 "$@"
bench echonet_ef_input --config=configs/echonet.py --devices=1 --batch_per_device=16 --input_pipeline "$@"
bench ich_unet --config=configs/ich.py:model=unet --devices=1 --batch_per_device=16 "$@"
bench ich_deeplabv3 --config=configs/ich.py:model=deeplabv3 --devices=1 --batch_per_device=16 "$@"
bench perfusion_convlstm --config=configs/perfusion.py:model=convlstm --devices=1,2 --batch_per_device=4 "$@"
bench embryo_vae --config=configs/embryo.py:stage=embed --devices=1 --batch_per_device=64 "$@"
echo "Records and tables in $OUT/"

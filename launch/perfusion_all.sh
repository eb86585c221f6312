#!/usr/bin/env bash
# Perfusion on synthetic SDF videos (or your data: --config.data.manual_dir=/path/export):
# train and evaluate the ConvLSTM (runs/perf_convlstm), the CNN-RNN's frozen and fine-tune
# stages (runs/perf_cnn_rnn/{frozen,finetune}) and fit the classical PCA + KNN / LDA / NCA+KNN
# baselines (runs/perf_classical/<method>), then print one table of every model's test metrics
# (also written to runs/perf_comparison.md). Extra arguments go to every medjax.main call.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
python -m pip install --quiet -e .
RUNS=${RUNS:-runs}
python -m medjax.main --config=configs/perfusion.py:model=convlstm \
  --workdir="$RUNS/perf_convlstm" "$@"
for stage in frozen finetune; do
  python -m medjax.main --config=configs/perfusion.py:model=cnn_rnn,stage=$stage \
    --workdir="$RUNS/perf_cnn_rnn" "$@"
done
python -m medjax.main --config=configs/perfusion.py:model=classical \
  --workdir="$RUNS/perf_classical" "$@"
python -m medjax.compare --workdirs "$RUNS/perf_convlstm" "$RUNS/perf_cnn_rnn/frozen" \
  "$RUNS/perf_cnn_rnn/finetune" "$RUNS/perf_classical/knn" "$RUNS/perf_classical/lda" \
  "$RUNS/perf_classical/nca_knn" --out="$RUNS/perf_comparison.md"

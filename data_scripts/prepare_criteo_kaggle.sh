#!/usr/bin/env bash
# Prepare the Criteo Kaggle Display Advertising Challenge data set (train.txt) for embcompress.
#
# Usage: data_scripts/prepare_criteo_kaggle.sh [TRAIN_TXT] [OUT_DIR] [extra `embcompress data criteo` options]
#   TRAIN_TXT  default data/criteo/train.txt   (download and unpack dac.tar.gz yourself; train.txt or train.txt.gz)
#   OUT_DIR    default data/criteo/kaggle_dlrm
# Example:   data_scripts/prepare_criteo_kaggle.sh data/criteo/train.txt data/criteo/kaggle_dlrm --min-count 1
#
# Writes labels.npy, dense.npy, sparse.npy, vocab/C*.npy and manifest.json with the DLRM split
# (7 equal "days" in file order; days 0-5 train, day 6 halved into test then val).
#
# Runtime: measured on a generated 5,000,000-row Kaggle-profile file (1.2 GB) on the 2-core dev machine:
# ~309k rows/s end to end, peak RSS 1.5 GB (benchmarks/results/criteo_pipeline.md). Extrapolated to Kaggle's
# 45,840,617 rows (11 GB): about 3 minutes, NOT measured on the real file (its vocabularies are larger, ~34M
# values, so counting takes more memory). Disk: ~7.5 GB of arrays (dense 2.4 GB, sparse uint32 4.8 GB, labels
# 0.2 GB) plus vocabularies (~270 MB), and ~7.5 GB of temporary decoded blocks during the run.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

TRAIN="${1:-data/criteo/train.txt}"
OUT="${2:-data/criteo/kaggle_dlrm}"
shift $(( $# > 2 ? 2 : $# ))

if [[ ! -f "$TRAIN" ]]; then
    echo "error: $TRAIN not found." >&2
    echo "Download the Criteo Kaggle data set (dac.tar.gz), unpack it and put train.txt at $TRAIN." >&2
    usage >&2
    exit 1
fi

EXPECTED_ROWS=45840617
EXPECTED_BYTES=11147184845  # train.txt, uncompressed
if [[ "$TRAIN" == *.gz ]]; then
    echo "note: $TRAIN is gzip-compressed; skipping the row-count check (it is checked during preparation)."
else
    bytes=$(stat -c %s "$TRAIN")
    if (( bytes < EXPECTED_BYTES * 9 / 10 || bytes > EXPECTED_BYTES * 11 / 10 )); then
        echo "warning: $TRAIN is $bytes bytes; Kaggle's train.txt is about $EXPECTED_BYTES bytes." >&2
    fi
    echo "counting lines of $TRAIN ..."
    rows=$(wc -l < "$TRAIN")
    if (( rows != EXPECTED_ROWS )); then
        echo "warning: $TRAIN has $rows lines; Kaggle's train.txt has $EXPECTED_ROWS. Continuing." >&2
    else
        echo "$rows rows, as expected."
    fi
fi

if command -v embcompress >/dev/null 2>&1; then
    EMB=(embcompress)
else
    EMB=("${PYTHON:-python}" -m embcompress.cli)
fi
echo "preparing $TRAIN -> $OUT (expected ~3 min on 2 cores, extrapolated)"
time "${EMB[@]}" data criteo "$TRAIN" --out "$OUT" --split dlrm "$@"

#!/usr/bin/env bash
# The paper-style grid on Criteo Kaggle: every method at 2x..1000x, DLRM and DCN, 3 seeds
# (benchmarks/criteo_kaggle_grid.yaml, 1,206 runs), through `embcompress bench run`, on your prepared folder.
#
# Usage: data_scripts/run_criteo_kaggle_grid.sh [PREPARED_DIR] [OUT_DIR] [extra `embcompress bench run` options]
#   PREPARED_DIR  default data/criteo/kaggle_dlrm (written by data_scripts/prepare_criteo_kaggle.sh)
#   OUT_DIR       default results/criteo_kaggle_grid (results.jsonl, report.md, memory_vs_auc.png)
#   env DEVICE    cpu or cuda (default: cuda when torch sees a GPU, else cpu)
# Example:   data_scripts/run_criteo_kaggle_grid.sh data/criteo/kaggle_dlrm results/kaggle_grid
#
# A killed run resumes: rerun the same command and the runs already in OUT_DIR/results.jsonl are skipped.
#
# Expected runtime: an ESTIMATE, derived from one measured run per configuration below, not from running
# this grid. Measured on the 2-core dev machine (shared with other jobs, load average 4-5 during the runs),
# CPU only, torch 2.13.0+cpu, with this suite's models and training settings on a 400,000-row generated
# Kaggle-profile file (benchmarks/criteo_pipeline.py's generator, DLRM split: 342,858 training rows):
#   python benchmarks/criteo_pipeline.py --rows 1000000 --out /tmp/cb1 --keep
#   head -n 400000 /tmp/cb1/train.txt > /tmp/grid/train400k.txt
#   embcompress data criteo /tmp/grid/train400k.txt --out /tmp/grid/prep
#   embcompress bench run <this suite cut to one seed and a few methods> --data-path /tmp/grid/prep
#     DLRM full           4,877 train samples/s     DCN full            4,218 train samples/s
#     DLRM hashing 10x    4,614 train samples/s     DCN hashing 10x     5,458 train samples/s
#     DLRM qr 10x         3,773 train samples/s     DCN hash-emb. 10x   2,686 train samples/s
# One epoch over Kaggle's 39,291,958 training rows at 2,686-5,458 samples/s is 2.0-4.1 hours of training per
# run on 2 CPU cores (39,291,958 / samples/s), plus evaluating 6.5M val/test rows; 612 runs x 2.0-4.1 hours =
# roughly 1,200-2,500 hours: not practical on a CPU. The generated file has smaller vocabularies than Kaggle's
# (~34M values in all), so real-size tables may train slower than measured here.
# GPU: no GPU was available here, so no GPU time is given; time one run with
#   embcompress bench run benchmarks/criteo_kaggle_grid.yaml --data-path PREPARED_DIR --device cuda
# (interrupt it after the first result line; samples_per_second is in results.jsonl) and multiply by 612.
# OptEmbed trains in several stages (supernet, search, retrain), so its runs take longer than one epoch (not
# measured here).
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

DATA="${1:-data/criteo/kaggle_dlrm}"
OUT="${2:-results/criteo_kaggle_grid}"
shift $(( $# > 2 ? 2 : $# ))
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUITE="$ROOT/benchmarks/criteo_kaggle_grid.yaml"
PY="${PYTHON:-python}"

if [[ ! -f "$DATA/manifest.json" ]]; then
    echo "error: $DATA holds no manifest.json: prepare Criteo Kaggle first, e.g." >&2
    echo "  data_scripts/prepare_criteo_kaggle.sh data/criteo/train.txt $DATA" >&2
    exit 1
fi
if ! "$PY" - "$DATA/manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
if m.get("complete") is not True:
    sys.exit(f"error: {sys.argv[1]}: the preparation did not finish (complete is not true); rerun it")
split = (m.get("options") or {}).get("split")
if split != "dlrm":
    print(f"warning: {sys.argv[1]}: split is {split!r}; the paper-style Kaggle grid uses the dlrm split",
          file=sys.stderr)
EOF
then
    exit 1
fi
if [[ -z "${DEVICE:-}" ]]; then
    DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
if command -v embcompress >/dev/null 2>&1; then
    EMB=(embcompress)
else
    EMB=("$PY" -m embcompress.cli)
fi
echo "grid $SUITE on $DATA -> $OUT (device $DEVICE)"
"${EMB[@]}" bench run "$SUITE" --data-path "$DATA" --out "$OUT" --device "$DEVICE" "$@"

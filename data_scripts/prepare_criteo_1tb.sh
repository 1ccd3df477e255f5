#!/usr/bin/env bash
# Prepare the Criteo 1TB Click Logs (day_0 .. day_23, plain or .gz) for embcompress, MLPerf-style.
#
# Usage: data_scripts/prepare_criteo_1tb.sh DAY_DIR [OUT_DIR] [extra `embcompress data criteo` options]
#   DAY_DIR  folder holding day_0 .. day_23 (each either day_K or day_K.gz; download them yourself)
#   OUT_DIR  default data/criteo/1tb_day
#   env MAX_ROWS_PER_FIELD (default 40000000, as MLPerf's DLRM caps each table at 40M rows)
#   env MIN_COUNT (default 1: no frequency threshold, as MLPerf's DLRM reference)
# Example:   data_scripts/prepare_criteo_1tb.sh /data/criteo_1tb data/criteo/1tb_day --on-bad-line skip
#
# Runs `embcompress data criteo` with the day split (days 0-22 train, day 23 halved: first half test, second
# half val), --max-rows-per-field 40000000 (the 39,999,999 most frequent values of a field keep an id, all
# others share the reserved id) and --min-count 1. MLPerf's reference folds raw ids modulo 40M instead (its
# --max-ind-range); the cap keeps ids frequency-ranked, which frequency-aware tables need.
#
# Runtime and resources: NOT measured on the 1TB data (not available here). What was measured, on a 2-core
# machine: ~300k rows/s end to end on a plain 5M-row Kaggle-profile file (benchmarks/results/criteo_pipeline.md).
# At that rate the ~4 billion rows of the 24 days would take ~4 h, but expect more: gzip input is
# decompressed by one thread, and pass 1 holds every distinct value of every field with its count (16 bytes
# each, about twice that while merging): the largest 1TB fields exceed the 40M cap (which is why MLPerf caps
# them), so plan for tens of GB of RAM. Disk: the temporary decoded blocks take ~160 bytes a row (~650 GB for
# 4 billion rows) beside OUT_DIR during the run, and the output as much (dense float32 52 B, sparse uint32
# 104 B, labels 4 B a row). A killed run can simply be rerun: it removes the temporary folder it left.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; "") usage >&2; exit 1 ;; esac

DAY_DIR="$1"
OUT="${2:-data/criteo/1tb_day}"
shift $(( $# > 2 ? 2 : $# ))
MAX_ROWS_PER_FIELD="${MAX_ROWS_PER_FIELD:-40000000}"
MIN_COUNT="${MIN_COUNT:-1}"

if [[ ! -d "$DAY_DIR" ]]; then
    echo "error: $DAY_DIR is not a folder; give the folder holding day_0 .. day_23." >&2
    exit 1
fi
days=()
missing=()
for k in $(seq 0 23); do
    plain="$DAY_DIR/day_$k"
    gz="$DAY_DIR/day_$k.gz"
    if [[ -f "$plain" && -f "$gz" ]]; then
        echo "error: both $plain and $gz exist; keep one of them." >&2
        exit 1
    elif [[ -f "$plain" ]]; then
        days+=("$plain")
    elif [[ -f "$gz" ]]; then
        days+=("$gz")
    else
        missing+=("day_$k")
    fi
done
if (( ${#missing[@]} > 0 )); then
    echo "error: $DAY_DIR lacks ${missing[*]} (need day_0 .. day_23, plain or .gz). Download the Criteo 1TB" >&2
    echo "Click Logs yourself; this script never downloads." >&2
    exit 1
fi

if command -v embcompress >/dev/null 2>&1; then
    EMB=(embcompress)
else
    EMB=("${PYTHON:-python}" -m embcompress.cli)
fi
echo "preparing 24 day files from $DAY_DIR -> $OUT (day split, --max-rows-per-field $MAX_ROWS_PER_FIELD, --min-count $MIN_COUNT)"
time "${EMB[@]}" data criteo "${days[@]}" --out "$OUT" --split day \
    --max-rows-per-field "$MAX_ROWS_PER_FIELD" --min-count "$MIN_COUNT" "$@"

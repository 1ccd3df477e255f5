#!/usr/bin/env bash
# The whole GPU speed measurement of issue 19 in a few minutes on one GPU: benchmarks/speed_gpu.yaml with
# --device cuda at batch 4096 and 65536, each report naming the GPU, written to benchmarks/results/
# (speed-gpu-4096.md, speed-gpu-65536.md and their .jsonl). Runs from the repository root with whatever python
# holds a CUDA torch (PYTHON=...); embcompress is imported from the checkout, so nothing needs installing, but
# the fused rows need fbgemm-gpu built for CUDA (and torchrec for its rows): without them those rows say so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=${RESULTS:-benchmarks/results}
GPU=$("$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0))')
echo "GPU: $GPU"
for batch in 4096 65536; do
  out=$(mktemp -d)
  status=0
  "$PY" -m embcompress bench speed benchmarks/speed_gpu.yaml --device cuda --batch-size "$batch" --quiet \
    --out "$out" || status=$?  # 1: some rows failed (reported in the table); the others are measured
  [ "$status" -le 1 ] || exit "$status"
  { echo "# Speed on $GPU, batch $batch"; echo
    echo "\`bash benchmarks/speed_gpu.sh\` ($(date -u +%Y-%m-%d), torch $("$PY" -c 'import torch; print(torch.__version__)'))."
    tail -n +2 "$out/report.md"; } > "$RESULTS/speed-gpu-$batch.md"
  cp "$out/results.jsonl" "$RESULTS/speed-gpu-$batch.jsonl"
done
echo "reports: $RESULTS/speed-gpu-4096.md $RESULTS/speed-gpu-65536.md"

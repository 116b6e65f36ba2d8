#!/usr/bin/env bash
# The GPU benchmarks into one folder: inference (1 GPU), training (1 GPU), scaling (--gpus N) and,
# with --gpus 4, train/resume/reshard (bench.layout_resume).
#   bench/run_all.sh [OUT_DIR] [--gpus 2|4] [--smoke] [--resume]
# Each step writes OUT_DIR/<name>.{md,json,png} as it goes; --resume continues a run that was cut short.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out="bench_results/$(date -u +%Y%m%d-%H%M)"
if [[ $# -gt 0 && $1 != --* ]]; then out=$1; shift; fi
gpus=2
common=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --gpus) gpus=$2; shift 2 ;;
    --smoke|--resume) common+=("$1"); shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
"$py" -m bench.inference --out "$out" "${common[@]}"
if [[ " ${common[*]} " == *" --smoke "* ]]; then
  "$py" -m bench.training --out "$out" "${common[@]}"
  "$py" -m bench.scaling --out "$out" "${common[@]}"
else   # with kernel breakdowns of traced steps (training_profiles/, scaling_profiles/)
  "$py" -m bench.training --out "$out" --profile "${common[@]}"
  "$py" -m bench.scaling --gpus "$gpus" --out "$out" --profile-steps 2 "${common[@]}"
fi
if [[ $gpus == 4 && " ${common[*]} " != *" --smoke "* ]]; then
  "$py" -m bench.layout_resume --out "$out"   # train / resume / reshard / resume as PP=2 x DP=2
fi
echo "results: $out/{inference,training,scaling}.{md,json,png}"

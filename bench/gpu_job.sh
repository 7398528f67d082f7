#!/usr/bin/env bash
# The real job on a GPU host, through entrypoint.py, with both backends and two dataset formats.
#   bash bench/gpu_job.sh SHAPE OUT_DIR [STEPS] [FORMATS]   e.g. bash bench/gpu_job.sh llama-3.2-1b "$OUT" 30
# FORMATS: "instructions chats" (default; alpaca and sharegpt rows) or one of them.
# SHAPE is one of bench/synthetic_model.py's shapes. Each run's log, metrics, samples and report land
# in OUT_DIR/SHAPE-BACKEND-FORMAT/ (the adapter weights stay behind in /tmp).
set -euo pipefail
shape=$1 out=$2 steps=${3:-30} formats=${4:-instructions chats}
work=/tmp/gpu-job
mkdir -p "$work" "$out"
[ -d "$work/$shape" ] || python3 bench/synthetic_model.py --shape "$shape" --out "$work/$shape"
python3 - "$work" <<'PY'
import json, sys
rows = [json.loads(line) for line in open("demo/instructions.jsonl")]
with open(f"{sys.argv[1]}/chats.jsonl", "w") as f:
    for r in rows:
        turns = [{"from": "human", "value": (r["instruction"] + "\n" + r["input"]).strip()}, {"from": "gpt", "value": r["output"]}]
        f.write(json.dumps({"conversations": turns}) + "\n")
PY
status=0
for backend in unsloth hf; do
  for format in $formats; do
    data=$([ "$format" = instructions ] && echo demo/instructions.jsonl || echo "$work/chats.jsonl")
    name="$shape-$backend-$format"
    rm -rf "$work/runs/$name"
    start=$SECONDS
    if BASE_MODEL="$work/$shape" DATASET_URI="$data" OUTPUT_URI="$work/runs" RUN_ID="$name" TRAIN_BACKEND=$backend \
       MAX_STEPS=$steps EVAL_FRACTION=0.05 LOG_FORMAT=json SCRATCH_DIR="$work/scratch" python3 entrypoint.py \
       > "$out/$name.log" 2>&1; then rc=0; else rc=$?; status=1; fi
    mkdir -p "$out/$name"
    find "$work/runs/$name" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$out/$name/" \; 2>/dev/null || true
    echo "$name: exit $rc in $((SECONDS - start)) s"
  done
done
exit $status

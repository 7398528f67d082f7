#!/usr/bin/env bash
# The GPU proofs, several in one call to a GPU host (a lent machine counts its time from start to return, so few,
# full calls): installs the wheelhouse (make wheelhouse: .gpu-wheels, less what the host has) into /tmp/site once,
# then runs each TASK in turn, each cut short so that the whole ends within DEADLINE seconds (default 585).
#   OUT=results bash bench/gpu_calls.sh flex-masks gemma-3-1b:full,defaults gemma-3-12b:full,defaults phi-4:defaults
# Tasks: stack (the host's versions against requirements/gpu.txt), real-data and real-data-warm (Llama-3-8B, full
# and short rows, then the defaults again with the compile caches and the tokenized rows warm: time to first step),
# gpu-tests (pytest -m gpu), flex-masks (bench/flex_masks.py: Gemma 3's masks built three ways), data-1m
# (bench/data_scale.py's real run on 1,000,000 rows), SHAPE:RUNS (bench/real_data.py on a shape of
# bench/synthetic_model.py, 15 steps, RUNS as its --runs), build=SHAPE, long and big
# (bench/big_shapes.py's parts); bg:TASK runs one beside the next ones, wait waits for those. Everything goes to WORK
# (default /tmp/gpu-work); OUT gets progress.txt and logs.tgz (the logs and results, no data or runs): a lent host
# returns at most 8 files from OUT, at most two folders down.
set -u
S=$SECONDS
DEADLINE=${DEADLINE:-585}
OUT=${OUT:-gpu-results}
W=${WORK:-/tmp/gpu-work}
mkdir -p "$OUT" "$W"
say() { echo "[$((SECONDS - S)) s] $*" | tee -a "$OUT/progress.txt"; }
left() { echo $((DEADLINE - (SECONDS - S))); }
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl && touch /tmp/site/.done
  say "installed"
else
  say "warm: /tmp/site already there"
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=/tmp/cache/triton \
  UNSLOTH_COMPILE_LOCATION=/tmp/cache/unsloth_compiled_cache TOKENIZERS_PARALLELISM=false
M=/tmp/bench-models
mkdir -p $M

build() {  # shape
  [ -d "$M/$1-4bit" ] && return
  python3 bench/synthetic_model.py --shape "$1" --out "$M/$1-4bit" --nf4 > "$W/build-$1.log" 2>&1 \
    || { rm -rf "$M/$1-4bit"; python3 bench/synthetic_model.py --shape "$1" --out "$M/$1-4bit" --4bit >> "$W/build-$1.log" 2>&1; }
  say "built $1 ($?)"
}
stack() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$W/gpu.txt"
  python3 -m pip list --format=freeze 2>/dev/null > "$W/pip-list.txt"
  python3 - > "$W/versions.txt" 2>&1 <<'PY'
import importlib.metadata as md, re
lock = {}
for line in open("requirements/gpu.txt"):
    m = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;]+)", line)
    if m: lock.setdefault(m[1].lower().replace("_", "-"), set()).add(m[2])
diff = []
for name, want in sorted(lock.items()):
    try: have = md.version(name)
    except md.PackageNotFoundError: have = None
    have_base = have.split("+")[0] if have else None
    if have_base not in want: diff.append(f"{name}: lock {sorted(want)} here {have}")
print("differs from lock:", *diff, sep="\n  ")
import torch, xformers, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "xformers", xformers.__version__, "triton", triton.__version__)
PY
  say "versions"
}
real_data() {
  build llama-3-8b
  timeout $(($(left) - 5)) python3 bench/real_data.py --shape llama-3-8b --backend unsloth --runs full,defaults --steps 20 --out "$W/r18" > "$W/r18.out" 2>&1
  say "real_data cold: $?"
}
real_data_warm() {
  cp "$W/r18/real-data/llama-3-8b-unsloth-defaults.log" "$W/r18/cold-defaults.log" 2>/dev/null
  rm -rf "$W/r18/real-data/runs/llama-3-8b-unsloth-defaults"
  timeout $(($(left) - 5)) python3 bench/real_data.py --shape llama-3-8b --backend unsloth --runs defaults --steps 20 --out "$W/r18" > "$W/r18-warm.out" 2>&1
  say "real_data warm: $?"
}
gpu_tests() {
  timeout $(($(left) - 5)) python3 -m pytest -m gpu tests/test_gpu.py -q -s -p no:cacheprovider > "$W/pytest-gpu.txt" 2>&1
  say "pytest -m gpu: $?"
}
data_1m() {
  build llama-3.2-1b
  timeout $(($(left) - 5)) python3 bench/data_scale.py --rows 1000000 --model "$M/llama-3.2-1b-4bit" --work /tmp/bench-data > "$W/data-scale.out" 2>&1
  say "data_scale: $?"
  cp /tmp/bench-data/gpu-run.log "$W/" 2>/dev/null
}
family() {  # shape [runs]
  build "$1"
  local t=$(($(left) - 5)); [ $t -gt 20 ] || { say "no time for $1"; return; }
  timeout $t python3 bench/real_data.py --shape "$1" --backend unsloth --runs "${2:-defaults}" --steps 15 --timeout $((t / 2)) --out "$W/fam" > "$W/fam-$1.out" 2>&1
  say "family $1: $?"
}
flex_masks() {
  timeout $(($(left) - 5)) python3 bench/flex_masks.py --ways aten-sort,eager,compiled --timeout 60 > "$W/flex-masks.out" 2>&1
  say "flex_masks: $?"
}
long() {
  timeout $(($(left) - 5)) python3 bench/big_shapes.py --out "$W/big" --parts long --timeout 240 > "$W/big-long.out" 2>&1
  say "big_shapes long: $?"
}
big() {
  timeout $(($(left) - 5)) python3 bench/big_shapes.py --out "$W/big70" --parts big --timeout $(($(left) / 2)) > "$W/big-70b.out" 2>&1
  say "big_shapes big: $?"
}
for task in "$@"; do
  case $task in
    bg:build=*) build "${task#bg:build=}" & ;;
    bg:*) t=${task#bg:}; ${t//-/_} & ;;
    build=*) build "${task#build=}" ;;
    wait) wait ;;
    *:*) family "${task%%:*}" "${task#*:}" ;;
    *) ${task//-/_} ;;
  esac
done
wait
tar czf "$OUT/logs.tgz" -C "$W" --exclude='*.jsonl' --exclude=scratch --exclude=runs .
say "done"

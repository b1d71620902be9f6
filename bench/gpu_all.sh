#!/usr/bin/env bash
# Every GPU figure of issues 3, 4, 8 and 9 in one run on a lent H100/H200 (each section time-boxed, all under DEADLINE),
# written to $OUT: gpu_all.log (everything printed) and one JSON per bench.
#
# Prepare once, here, where PyPI is reachable:   bash bench/fetch_wheels.sh        (-> .bench-anchor/whl, ~48 MB)
# Then on the GPU machine (no network needed), with .bench-anchor/whl copied along:  bash bench/gpu_all.sh
# Sections run in this order, each under its own time limit, all under DEADLINE seconds (default 575); what does
# not fit is skipped and named at the end (estimated ~650 s in all: expect a second short call with
# SECTIONS=<what was skipped>, typically generate,serve). SECTIONS="rows,ladder" runs only those. litft's rows use its defaults (eager); the ladder shows what
# torch.compile adds. Sections:
#   tests    GPU-only correctness: FlexAttention packed == padded (loss and gradients), activation offloading
#   rows     bench/finetune_speed.py: LoRA qkvo, LoRA all-linear, LoRA + checkpointing mb 8, full FT (issue 9)
#   varlen   bench/finetune_speed.py: variable-length data (packing, FlexAttention) and the longest sequence
#   ladder   bench/finetune_speed.py --ladder: what each optimisation buys (tokens/s, memory)
#   steps    bench/finetune_steps.py: a few real `finetune lora` steps, bf16 LoRA and QLoRA nf4 (issue 3)
#   generate bench/generate_speed.py: batch 1 eager and compiled, batch 16, beside HF and LitGPT (issue 4)
#   serve    bench/serve_throughput.py: `litft serve` at 1, 8, 32 clients (issue 8)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_all}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=${DEADLINE:-575}
SECTIONS=${SECTIONS:-tests,rows,varlen,ladder,steps,generate,serve}
exec > >(tee -a "$OUT/gpu_all.log") 2>&1

DEVICE=${DEVICE:-cuda}   # DEVICE=cpu QUICK=--quick WHEELS=none: a smoke run of this script on a CPU machine
QUICK=${QUICK:-}
WHEELS=${WHEELS:-.bench-anchor/whl}
SITE=/tmp/litft-bench-site
if [[ "$WHEELS" == none ]]; then
  echo "wheels: not installed (WHEELS=none): using the environment as it is"
elif ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || echo "WARNING: installing the carried wheels failed"
else
  echo "WARNING: no wheels in .bench-anchor/whl (run bash bench/fetch_wheels.sh here first, carry .bench-anchor/whl):"
  echo "         LitGPT, bitsandbytes (QLoRA) and the serve stack will be missing"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY'
import importlib.metadata as m, torch
names = ("torch", "triton", "transformers", "peft", "lightning", "litgpt", "jsonargparse", "bitsandbytes", "fastapi")
print({n: (m.version(n) if n != "torch" else torch.__version__) if _ok else None
       for n in names for _ok in [__import__("importlib.util").util.find_spec(n.replace("-", "_")) is not None]})
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY

SKIPPED=()
elapsed() { echo $(( $(date +%s) - START )); }
section() {  # section NAME BUDGET_S COMMAND...
  local name=$1 budget=$2; shift 2
  [[ ",$SECTIONS," == *",$name,"* ]] || return 0
  local left=$(( DEADLINE - $(elapsed) ))
  if (( left < 25 )); then SKIPPED+=("$name"); echo "=== $name: SKIPPED (deadline)"; return 0; fi
  (( budget > left )) && budget=$left
  echo "=== $name: start at $(elapsed)s, budget ${budget}s: $*"
  timeout -k 5 "$budget" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $(elapsed)s"
  (( rc == 124 || rc == 137 )) && SKIPPED+=("$name (timed out: partial)")
  return 0
}

CKPT=/tmp/litft-random-llama-3.2-1b$QUICK
if [[ -n "$QUICK" ]]; then SERVE_ARGS="--max_seq_length 256 --clients 1,8"; else
  SERVE_ARGS="--max_seq_length 2048 --precision bf16-true --requests_per_client 2"; fi
FS="python3 bench/finetune_speed.py --device $DEVICE --warmup 2 --steps 8 $QUICK"
section tests 50 python3 -m pytest -q -p no:cacheprovider tests/test_perf.py -k cuda
section rows 90 $FS --rows qkvo,all,ckpt,full --budget-s 85 --out "$OUT/rows"
section varlen 130 $FS --rows varlen,maxlen --budget-s 125 --out "$OUT/varlen"
section ladder 80 $FS --rows none --ladder --budget-s 75 --out "$OUT/ladder"
section steps 50 sh -c "python3 bench/finetune_steps.py --device $DEVICE $QUICK --checkpoint $CKPT --steps 6 --out '$OUT'"
section generate 150 sh -c "python3 bench/generate_speed.py --device $DEVICE $QUICK --repeats 1 | tee '$OUT/generate_speed.md'"
section serve 120 sh -c "python3 bench/finetune_steps.py --device $DEVICE $QUICK --checkpoint $CKPT --make_checkpoint_only && python3 bench/serve_throughput.py --checkpoint $CKPT --device $DEVICE $QUICK $SERVE_ARGS | tee '$OUT/serve_throughput.md'"

echo "=== done after $(elapsed)s; results in $OUT"
if (( ${#SKIPPED[@]} )); then
  echo "=== not (fully) run: ${SKIPPED[*]}: run again with SECTIONS=<those> (e.g. SECTIONS=generate,serve)"
fi

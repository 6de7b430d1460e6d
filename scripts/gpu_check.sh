#!/usr/bin/env bash
# GPU sanity check of the frozen template: CUDA, bf16 autocast, torch.compile, fused
# AdamW, on synthetic token shards (no tokenizer or corpus needed). Prints each run's
# final.json summary. Usage: bash scripts/gpu_check.sh [OUT_DIR]   (needs one CUDA GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
DATA=/tmp/gpu_check_data
PY=${PYTHON:-python3}
mkdir -p "$OUT" /tmp/gpu_check_runs
"$PY" - "$DATA" <<'PYEOF'
import json, sys, pathlib
import numpy as np
root = pathlib.Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
splits = {}
for split, n in (("train", 20_000_000), ("val", 2_000_000)):
    rng.integers(0, 50257, n, dtype=np.uint16).tofile(root / f"{split}_000000.bin")
    splits[split] = [{"file": f"{split}_000000.bin", "tokens": n}]
(root / "manifest.json").write_text(json.dumps({"format": "harness-token-shards/1",
    "tokenizer": {"name": "gpt2", "dtype": "uint16", "vocab_size": 50257, "eot": 50256},
    "splits": splits}))
PYEOF
"$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
run() {  # name, script, extra args...
  local name=$1 script=$2; shift 2
  local t0=$SECONDS
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$script" \
    --data_dir="$DATA" --out_dir="/tmp/gpu_check_runs/$name" --log_interval=10 \
    --save_checkpoint=false "$@" > "$OUT/$name.log" 2>&1 \
    || { echo "$name FAILED"; tail -30 "$OUT/$name.log"; return 1; }
  cp "/tmp/gpu_check_runs/$name/final.json" "$OUT/$name.final.json"
  "$PY" - "$OUT/$name.final.json" "$name" $((SECONDS - t0)) <<'PYEOF'
import json, sys
f = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: ok in {sys.argv[3]}s wall; val_loss {f['val_loss']:.4f}; "
      f"{f['tokens_per_s']:,.0f} tokens/s (compile time included); dtype {f['dtype']}; "
      f"compile {f['compile']}; {f['num_params']/1e6:.1f}M params")
PYEOF
}
TEMPLATE=tasks/llm-pretrain-bitlinear/custom_pretrain.py
# gpt-345m shape, the template's default (ternary) BitLinear, one GPU, micro-batch 16.
run ternary_345m "$TEMPLATE" --n_layer=24 --n_head=16 --n_embd=1024 --block_size=1024 \
  --batch_size=16 --gradient_accumulation_steps=1 --max_iters=40 --eval_interval=20 \
  --eval_iters=2 --warmup_iters=5
# The binary and int2 baselines spliced in, at gpt-124m shape.
for b in binary_sign int2_uniform; do
  "$PY" -m harness splice "baselines/$b" -o "/tmp/gpu_check_runs/$b.py"
  run "${b}_124m" "/tmp/gpu_check_runs/$b.py" --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 \
    --batch_size=16 --gradient_accumulation_steps=1 --max_iters=30 --eval_interval=15 \
    --eval_iters=2 --warmup_iters=5
done

#!/usr/bin/env bash
# GPU check of the pretraining stage: train the gpt2-124m preset for a few hundred steps with DeepSpeed ZeRO-2 on
# synthetic chunks on one GPU, then print tokens/s and MFU (model FLOPs / 989 TFLOP/s, the H100 dense bf16 peak).
#
# Needs: a CUDA machine with torch, transformers, tokenizers, pyarrow, tensorboard; DeepSpeed is installed from the
# git-ignored wheels/ folder if missing (the lead fills it beforehand, on a machine with internet:
#   pip download deepspeed==0.19.8 hjson ninja py-cpuinfo pydantic msgpack -d wheels --python-version 3.11 --only-binary=:all: ...
# or plain `pip download deepspeed -d wheels`).
#
#   bash bench/gpu_check.sh                 # from the repo root; ~2-4 minutes on an H100 (compile included)
#   STEPS=100 BATCH=8 bash bench/gpu_check.sh
#
# What it runs: PreTrain/model.py --preset gpt2-124m --deepspeed PreTrain/ds_config.json (bf16, torch.compile and
# flash attention through SDPA are on by default with CUDA). Writes only under $WORK (default /tmp/gpu_check) and
# $OUT (if set: train.log and pretrain_summary.json are copied there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
WORK=${WORK:-/tmp/gpu_check}
STEPS=${STEPS:-300}
BATCH=${BATCH:-16}
mkdir -p "$WORK"

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if ! $PY -c "import deepspeed" 2>/dev/null; then
  echo "== installing DeepSpeed from wheels/"
  $PY -m pip install -q --no-index --find-links wheels deepspeed
fi
$PY -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"

# A tokenizer (stage 1, small vocabulary: fast) unless one exists, and synthetic chunks in the manifest format.
TOK=tokenizer
if [ ! -f "$TOK/tokenizer.json" ]; then
  TOK="$WORK/tokenizer"
  [ -f "$TOK/tokenizer.json" ] || $PY PreTrain/train_byte_level_bpe_tokenizer.py --vocab-size 8192 --output-dir "$TOK"
fi
$PY - "$TOK" "$WORK/chunks" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, ".")
import common
tok_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = common.load_tokenizer(tok_dir)
rng, ctx, splits = np.random.default_rng(0), 1024, {}
for split, rows in (("train", 20000), ("val", 256)):
    (out / split).mkdir(parents=True, exist_ok=True)
    dtype = np.dtype("<u2") if len(tok) <= 65536 else np.dtype("<u4")  # the chunk format: flat rows of token ids
    ids = rng.integers(0, len(tok), (rows, ctx + 1)).astype(dtype)
    ids.tofile(out / split / "shard_00000.bin")
    splits[split] = {"shards": [f"{split}/shard_00000.bin"], "rows": rows, "tokens": ids.size,
                     "bytes": dtype.itemsize * ids.size, "documents": rows}
(out / "manifest.json").write_text(json.dumps({"format": 2, "dtype": dtype.str, "tokenizer_fingerprint": common.tokenizer_fingerprint(tok_dir),
    "vocab_size": len(tok), "eot_id": tok.eos_token_id, "context_length": ctx, "row_length": ctx + 1, "splits": splits,
    "sources": ["synthetic"], "seconds": 0.0}))
print("synthetic chunks in", out)
EOF

rm -rf "$WORK/ckpt" "$WORK/output"
deepspeed --num_gpus=1 PreTrain/model.py --deepspeed PreTrain/ds_config.json --preset gpt2-124m \
  --max-steps "$STEPS" --batch-size "$BATCH" --grad-accum 1 --warmup-steps 20 --log-interval 25 \
  --eval-interval 100000 --eval-batches 4 --checkpoint-interval 100000 \
  --tokenizer-dir "$TOK" --chunks-dir "$WORK/chunks" --output-dir "$WORK/output" --checkpoint-dir "$WORK/ckpt" \
  --log-file "$WORK/train.log" --tensorboard-dir "$WORK/runs"

$PY - "$WORK" <<'EOF'
import json, sys, statistics
from pathlib import Path
work = Path(sys.argv[1])
s = json.loads((work / "output" / "pretrain_summary.json").read_text())
h = [x for x in map(json.loads, (work / "output" / "history.jsonl").read_text().splitlines()) if "tokens_per_s" in x]
steady = [x for x in h if x["step"] > 50] or h  # after compile and warm-up
tps = statistics.median(x["tokens_per_s"] for x in steady)
mfu = statistics.median(x["mfu"] for x in steady)
print(f"gpt2-124m DeepSpeed ZeRO-2 bf16 on {s['device']}: {tps:,.0f} tokens/s, MFU {100 * mfu:.1f}% of 989 TFLOP/s "
      f"(goal >= 45%), peak mem {h[-1]['peak_mem_mb']:,.0f} MB, final loss {s['final_train_loss']:.3f}, wall {s['wall_seconds']:.0f}s")
EOF
if [ -n "${OUT:-}" ]; then cp "$WORK/train.log" "$WORK/output/pretrain_summary.json" "$OUT/"; fi

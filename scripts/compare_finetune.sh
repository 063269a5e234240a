#!/usr/bin/env bash
# Long-CLIP fine-tune step throughput and peak memory: clipforge vs the project's PyTorch
# reference (scripts/longclip_reference.py: HF CLIPModel + the official loss and AdamW), same
# stretched model, same data, same batch, same machine, one run (torch, clipforge, torch again).
#   scripts/compare_finetune.sh [tiny|b32] [BATCH=8] [STEPS=5]
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-tiny}; batch=${2:-8}; steps=${3:-5}  # CF_DTYPE=bf16: clipforge's CPU bf16 fine-tune; TORCH_BF16=1: PyTorch under bf16 autocast
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT  # the stretched model and the checkpoints: ≈ 3 GB for b32
case "$which" in
  tiny) src=tests/fixtures/tiny ;;
  b32) src=${MODEL_DIR:-/tmp/clipforge-b32}; [ -f "$src/model.safetensors" ] || python3 scripts/make_hf_model.py "$src" b32 ;;
  *) echo "usage: $0 [tiny|b32] [BATCH] [STEPS]" >&2; exit 1 ;;
esac
cargo build --release --quiet
./target/release/clipforge stretch --model "$src" --out "$work/long" > /dev/null
data=tests/fixtures/longclip/train.jsonl
pca=$([ "$which" = tiny ] && echo 4 || echo 4)  # batch 8 has rank <= 7: PCA-4 keeps the branch non-trivial
torch_run() {
  /usr/bin/time -v python3 scripts/longclip_reference.py --bench --model "$work/long" --data "$data" \
    --steps "$steps" --batch "$batch" --lr 1e-5 --warmup 2 --pca-dim "$pca" ${TORCH_BF16:+--bf16} 2> "$work/$1.time" | tail -1 > "$work/$1.json"
}
torch_run torch1
/usr/bin/time -v ./target/release/clipforge finetune --model "$work/long" --data "$data" --out "$work/cf" --no-shuffle \
  --batch "$batch" --max-steps "$steps" --lr 1e-5 --warmup 2 --pca-dim "$pca" --dtype "${CF_DTYPE:-f32}" --device cpu \
  --log "$work/cf/log.jsonl" 2> "$work/cf.time" > /dev/null
torch_run torch2
python3 - "$work" "$batch" <<'PY'
import json, re, statistics, sys
w, b = sys.argv[1], int(sys.argv[2])
rss = lambda n: int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{w}/{n}.time").read()).group(1)) / 1024
t = [json.load(open(f"{w}/torch{i}.json"))["samples_per_s"] for i in (1, 2)]
logs = [json.loads(l) for l in open(f"{w}/cf/log.jsonl")]
cf = statistics.median([r["samples_per_s"] for r in logs[1:]] or [logs[0]["samples_per_s"]])
tm = sum(t) / 2
print(json.dumps({"batch": b, "torch_samples_per_s": [round(x, 2) for x in t], "clipforge_samples_per_s": round(cf, 2),
                  "ratio": round(cf / tm, 2), "peak_rss_mib": {"torch": round(max(rss("torch1"), rss("torch2"))), "clipforge": round(rss("cf"))},
                  "peak_rss_mib_per_sample": {"torch": round(max(rss("torch1"), rss("torch2")) / b, 1), "clipforge": round(rss("cf") / b, 1)}}))
PY

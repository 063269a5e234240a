#!/usr/bin/env bash
# clipforge vs PyTorch CPU on the same random-weight HF model, in one run, as ratios.
#   scripts/compare_torch.sh [PRESET=b32] [BATCH=32] [THREADS=2]
# Needs: pip install torch transformers safetensors tokenizers open_clip_torch (for the model writer).
# Runs torch, then clipforge f32, clipforge bf16, then torch again, so drift on a shared machine shows up.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-b32}; batch=${2:-32}; threads=${3:-2}
dir=${MODEL_DIR:-/tmp/clipforge-$preset}
[ -f "$dir/model.safetensors" ] || python3 scripts/make_hf_model.py "$dir" "$preset"
cargo build --release --quiet
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python3 scripts/torch_baseline.py --model "$dir" --batch "$batch" --threads "$threads" --json > "$out/torch1.json"
python3 scripts/torch_baseline.py --model "$dir" --batch "$batch" --threads "$threads" --bf16 --json > "$out/torch_bf16.json"
./target/release/clipforge --threads "$threads" bench --model "$dir" --batch "$batch" --iters 5 --json > "$out/cf_f32.json"
./target/release/clipforge --threads "$threads" bench --model "$dir" --batch "$batch" --iters 5 --dtype bf16 --json > "$out/cf_bf16.json"
python3 scripts/torch_baseline.py --model "$dir" --batch "$batch" --threads "$threads" --json > "$out/torch2.json"
# Peak RSS of embedding one batch of images (f32), beside PyTorch's image-run peak.
imgs="$out/imgs"; mkdir -p "$imgs"
i=0; while [ $i -lt "$batch" ]; do for f in tests/fixtures/images/*.png; do [ $i -lt "$batch" ] && cp "$f" "$imgs/$i.png"; i=$((i+1)); done; done
/usr/bin/time -v ./target/release/clipforge --threads "$threads" embed-image --model "$dir" --batch "$batch" --out "$out/e.npy" --dir "$imgs" 2> "$out/time.txt" >/dev/null
python3 - "$out" "$dir" <<'PY'
import json, os, re, sys
out, d = sys.argv[1], sys.argv[2]
j = lambda n: json.load(open(os.path.join(out, n)))
t1, t2, tb, cf, cb = j("torch1.json"), j("torch2.json"), j("torch_bf16.json"), j("cf_f32.json"), j("cf_bf16.json")
timg = (t1["images_per_s"] + t2["images_per_s"]) / 2
ttxt = (t1["texts_per_s"] + t2["texts_per_s"]) / 2
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(os.path.join(out, "time.txt")).read()).group(1)) / 1024
wbytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors")) / 2**20
print(f"| system | images/s | texts/s | image ratio | text ratio |")
print(f"|---|---|---|---|---|")
print(f"| PyTorch f32 (mean of 2 runs: {t1['images_per_s']:.1f}/{t2['images_per_s']:.1f} img/s, {t1['texts_per_s']:.1f}/{t2['texts_per_s']:.1f} txt/s) | {timg:.2f} | {ttxt:.2f} | 1.00 | 1.00 |")
print(f"| PyTorch bf16 autocast | {tb['images_per_s']:.2f} | {tb['texts_per_s']:.2f} | {tb['images_per_s']/timg:.2f} | {tb['texts_per_s']/ttxt:.2f} |")
print(f"| clipforge f32 | {cf['images_per_s']:.2f} | {cf['texts_per_s']:.2f} | {cf['images_per_s']/timg:.2f} | {cf['texts_per_s']/ttxt:.2f} |")
print(f"| clipforge bf16 | {cb['images_per_s']:.2f} | {cb['texts_per_s']:.2f} | {cb['images_per_s']/timg:.2f} | {cb['texts_per_s']/ttxt:.2f} |")
print()
for c, dt in ((cf, "f32"), (cb, "bf16")):
    m, k, n = c["gemm_ceiling_shape"]
    print(f"clipforge {dt}: GEMM ceiling {c['gemm_ceiling_gflops']:.0f} GFLOP/s ({m}x{k}->{n}); image tower {c['image_gflops']:.0f} GFLOP/s model,"
          f" {c['image_gflops_executed']:.0f} executed ({100*c['image_share_of_ceiling']:.0f}%); text {c['text_gflops']:.0f} model,"
          f" {c['text_gflops_executed']:.0f} executed ({100*c['text_share_of_ceiling']:.0f}%)")
print(f"Peak RSS, embed one batch of {cf['batch']} images (f32): clipforge {rss:.0f} MiB = {rss/wbytes:.2f}x the {wbytes:.0f} MiB of weights; PyTorch {t1['image_peak_rss_mb']:.0f} MiB = {t1['image_peak_rss_mb']/wbytes:.2f}x")
PY

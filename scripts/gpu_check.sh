#!/usr/bin/env bash
# The GPU checks as prepared scripts, for a session that is lent a device machine (the `device`
# tool: no cargo and no network there; 15 minutes of device time per session, 10 per call, the
# machine's start counted; 64 MiB travel).
#
#   bash scripts/gpu_check.sh pack      # here: release binaries + test binaries, stripped, xz into .gpu/ (ignored)
#   device run  carry=[".gpu"]  timeout_s=360   command: bash scripts/gpu_check.sh run
#   device run  carry=[".gpu"]  timeout_s=300   command: bash scripts/gpu_check.sh criterion   (optional, second call)
#   python3 scripts/gpu_results.py <files_at>   # here: measured vs predicted into BENCHMARKS.md and KERNELS.md
#
# `run` (first call, the essentials, its own budget RUN_BUDGET_S = 330 s of command time so that the
# call with the machine's start stays under 8 minutes; a step that would not fit is skipped and logged):
#   0. driver and CUDA version (nvidia-smi), which image every kernel module loaded (cubin arch, PTX or
#      NVRTC) and the GEMM path (tests/dry_run.rs gpu_module_image_and_gemm_path → gpu-info line);
#   1. `clipforge bench` on the GPU for the three cases of tests/dry_run.rs — B/16 and L/14 image towers
#      (bf16, batch 256) and the Long-CLIP L/14 train step (248 tokens, --stretch, batch 128, bf16) —
#      each next to its dry-run prediction for an H200 (`--dry-run --gpu h200`, the lent machine), with
#      nvidia-smi sampling the GPU memory;
#   2. the GPU columns of the tests (the tests named gpu_*): tests/cuda_table.rs (every kernel vs the CPU
#      op), cuda_e2e.rs (towers), device_step.rs (Long-CLIP fine-tune f32/bf16/f16 vs the PyTorch
#      fixture), cuda_kernels.rs (the loaded modules), cuda_flash.rs (the tensor-core flash attention
#      through the device backend);
#   3. more bench lines, as the budget allows: B/32 towers f32 and bf16, B/32 train bf16, L/14 train
#      with --recompute;
#   4. on a machine with several GPUs and a libnccl: `finetune --nproc-per-node 2 --device cuda` (NCCL)
#      against one GPU at the global micro-batch, loss curves within 1e-4 (multi_gpu.json).
# `criterion`: the criterion kernel benches (benches/cuda.rs), short measurement.
# Everything lands in $OUT: log.txt, info.json, bench.jsonl (measured), predicted.jsonl (dry runs,
# one per bench line, same order, with the bench's arguments), mem.csv, criterion.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
tests=(cuda_table cuda_e2e device_step cuda_kernels cuda_flash dry_run)

if [ "$mode" = pack ]; then
  set -e
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  cargo build --release --quiet
  for t in "${tests[@]}"; do cargo test --release --no-run --quiet --test "$t"; done
  cargo bench --no-run --quiet --bench cuda
  rm -rf .gpu && mkdir -p .gpu/bin
  cp target/release/clipforge .gpu/bin/
  for t in "${tests[@]}" cuda; do
    f=$(ls -t target/release/deps/$t-* | grep -v '\.d$' | head -1)
    cp "$f" ".gpu/bin/$t"
  done
  strip .gpu/bin/* || true
  tar -C .gpu -cJf .gpu/bin.tar.xz bin && rm -rf .gpu/bin
  echo "built in: $PWD (the tests look for $PWD/tests/fixtures)" > .gpu/README
  echo "$PWD" > .gpu/built_in
  git rev-parse HEAD > .gpu/commit 2>/dev/null || true
  du -sh .gpu/bin.tar.xz
  exit 0
fi

case "$mode" in run | criterion) ;; *) echo "usage: $0 pack|run|criterion" >&2; exit 2 ;; esac
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out" /tmp/gpu
log="$out/log.txt"
t0=$(date +%s)
budget=${RUN_BUDGET_S:-330}
[ "$mode" = criterion ] && budget=${CRITERION_BUDGET_S:-280}
[ -d /tmp/gpu/bin ] || tar -C /tmp/gpu -xJf .gpu/bin.tar.xz || { echo "no .gpu/bin.tar.xz: run '$0 pack' here and carry .gpu" | tee "$log"; exit 1; }
built=$(cat .gpu/built_in)
if [ "$built" != "$PWD" ] && [ ! -e "$built" ]; then
  mkdir -p "$(dirname "$built")" && ln -s "$PWD" "$built"
fi
bin=/tmp/gpu/bin
# tests/device_step.rs runs the binary at the path cargo built it (CARGO_BIN_EXE_clipforge)
[ -e target/release/clipforge ] || { mkdir -p target/release && ln -s "$bin/clipforge" target/release/clipforge; }
left() { echo $((budget - ($(date +%s) - t0))); }
step() { # name, timeout, command...: skipped when the budget left is under the timeout's third
  local name=$1 t=$2 l; shift 2
  l=$(left)
  if [ "$l" -lt $((t / 3)) ] || [ "$l" -lt 15 ]; then
    echo "=== $name: SKIPPED (budget: ${l}s left)" | tee -a "$log"
    return 1
  fi
  [ "$t" -gt "$l" ] && t=$l
  echo "=== $name ($(date +%T), limit ${t}s)" | tee -a "$log"
  timeout "$t" "$@" >> "$log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc" | tee -a "$log"
  return $rc
}

if [ "$mode" = criterion ]; then
  step "criterion cuda" "$budget" bash -c "$bin/cuda --bench --warm-up-time 1 --measurement-time 2 | tee $out/criterion.txt"
  exit 0
fi

# 0. essentials
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvidia-smi | grep -o 'CUDA Version: *[0-9.]*'
  echo "commit $(cat .gpu/commit 2>/dev/null)"
} | tee -a "$log"
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 250 > "$out/mem.csv" 2>/dev/null &
smi=$!
step "gpu info" 60 "$bin/dry_run" gpu_module_image_and_gemm_path --test-threads 1 --nocapture
python3 - "$log" "$out/info.json" <<'PY' || true
import json, re, subprocess, sys
text = open(sys.argv[1]).read()
info = {}
m = re.search(r"gpu-info: (\{.*\})", text)
if m:
    info.update(json.loads(m.group(1)))
q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
info["nvidia_smi"] = q
c = re.search(r"CUDA Version: *([0-9.]+)", text)
info["cuda_driver_api"] = c.group(1) if c else None
json.dump(info, open(sys.argv[2], "w"), indent=1)
PY

# 1. and 3. clipforge bench on the GPU, each line next to its dry-run prediction for the H200
b() { # timeout, bench arguments...
  local t=$1; shift
  local args="$*"
  "$bin/clipforge" bench --device cuda --dry-run --gpu h200 --json "$@" 2>>"$log" | python3 -c "
import json, sys
v = json.load(sys.stdin); v['args'] = sys.argv[1]; print(json.dumps(v))" "$args" >> "$out/predicted.jsonl" || echo "{\"args\": \"$args\", \"error\": \"dry run failed\"}" >> "$out/predicted.jsonl"
  step "bench $args" "$t" bash -o pipefail -c "$bin/clipforge bench --device cuda --json $args | python3 -c \"
import json, sys
v = json.load(sys.stdin); v['args'] = sys.argv[1]; print(json.dumps(v))\" '$args' >> $out/bench.jsonl" ||
    echo "{\"args\": \"$args\", \"error\": \"bench failed or skipped\"}" >> "$out/bench.jsonl"
}
# the three cases of tests/dry_run.rs first, then the test columns, then the rest
b 45 --preset b16 --batch 256 --iters 5 --dtype bf16 --towers image
b 60 --preset l14 --batch 256 --iters 3 --dtype bf16 --towers image
b 120 --task train --preset l14 --batch 128 --iters 2 --dtype bf16 --stretch --text-len 248

# 2. tests (GPU columns; --nocapture shows "skipped: no CUDA device" if the GPU did not open)
for t in cuda_table cuda_e2e device_step cuda_kernels; do step "test $t" 60 "$bin/$t" gpu --test-threads 1 --nocapture; done

b 40 --preset b32 --batch 256 --iters 5
b 40 --preset b32 --batch 256 --iters 5 --dtype bf16
b 60 --task train --preset b32 --batch 128 --iters 3 --dtype bf16
b 120 --task train --preset l14 --batch 128 --iters 2 --dtype bf16 --recompute --stretch --text-len 248

# 4. many GPUs (only on a machine with several, and a libnccl to load): the real NCCL path of
# `finetune --nproc-per-node N --device cuda` on the tiny stretched model against one GPU at the
# global micro-batch (--pca-group = the per-rank batch, as the ranks' PCA): loss curves within 1e-4
# (NCCL's ring sums in another order than one GPU's GEMMs), and the samples/s of both in the log.
ngpu=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
if [ "$ngpu" -ge 2 ]; then
  nccl=$(ldconfig -p 2>/dev/null | grep -o '/[^ ]*libnccl.so[.0-9]*' | head -1)
  [ -z "$nccl" ] && nccl=$(find / -name 'libnccl.so*' -not -path '*/proc/*' 2>/dev/null | head -1)
  if [ -z "$nccl" ]; then
    echo "=== many GPUs: SKIPPED ($ngpu GPUs but no libnccl.so on the machine)" | tee -a "$log"
  else
    export LD_LIBRARY_PATH="$(dirname "$nccl"):${LD_LIBRARY_PATH:-}"
    mg=/tmp/gpu/multi && rm -rf "$mg" && mkdir -p "$mg"
    "$bin/clipforge" stretch --model tests/fixtures/tiny --out "$mg/long" >> "$log" 2>&1
    common=(--device cuda --model "$mg/long" --data tests/fixtures/longclip/train.jsonl --no-shuffle --lr 1e-3 --warmup 1 --max-steps 4 --pca-dim 4)
    step "finetune 1 GPU, batch 4" 60 "$bin/clipforge" finetune "${common[@]}" --out "$mg/one" --log "$mg/one/log.jsonl" --batch 4 --pca-group 2
    step "finetune --nproc-per-node 2 (NCCL), batch 2 per rank" 90 "$bin/clipforge" finetune "${common[@]}" --out "$mg/two" --log "$mg/two/log.jsonl" --batch 2 --nproc-per-node 2
    python3 - "$mg" "$out/multi_gpu.json" <<'PY' | tee -a "$log" || true
import json, sys
d, out = sys.argv[1], sys.argv[2]
read = lambda r: [json.loads(l) for l in open(f"{d}/{r}/log.jsonl")]
try:
    one, two = read("one"), read("two")
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(two, one))
    r = {"steps": len(two), "worst_rel_loss": worst, "ok": len(two) == len(one) and worst <= 1e-4,
         "samples_per_s_1gpu": one[-1]["samples_per_s"], "samples_per_s_2gpu": two[-1]["samples_per_s"]}
except Exception as e:
    r = {"ok": False, "error": str(e)}
json.dump(r, open(out, "w"))
print("many GPUs:", json.dumps(r))
PY
  fi
else
  echo "=== many GPUs: SKIPPED (this machine has $ngpu GPU)" | tee -a "$log"
fi

kill "$smi" 2>/dev/null
echo "peak GPU memory (MiB): $(cut -d, -f2 "$out/mem.csv" | tr -dc '0-9\n' | sort -n | tail -1)" | tee -a "$log"
echo "command time: $(($(date +%s) - t0)) s of ${budget} s" | tee -a "$log"

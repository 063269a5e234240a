#!/usr/bin/env bash
# The GPU checks as one prepared script, for a session that is lent a device machine (the `device`
# tool: no cargo and no network there, 15 minutes of device time, 64 MiB travel).
#
#   bash scripts/gpu_check.sh pack     # here: build release binaries, strip, xz into .gpu/ (ignored)
#   device run  carry=[".gpu"]  timeout_s=540
#       command: bash scripts/gpu_check.sh run
#
# `run` (there) unpacks .gpu/, points /work/main at the checkout (the test binaries find
# tests/fixtures through the path they were built in), then runs, each under its own timeout:
#   1. the GPU columns of the tests: tests/cuda_table.rs (every kernel vs the CPU op),
#      tests/cuda_e2e.rs (towers), tests/device_step.rs (Long-CLIP fine-tune f32/bf16/f16 vs the
#      PyTorch reference fixture), tests/cuda_kernels.rs (the loaded modules), tests/cuda_flash.rs
#      (the tensor-core flash attention through the device backend);
#   2. `clipforge bench` on the GPU: ViT-B/32 and L/14 towers (f32, bf16), and Long-CLIP training
#      steps (`--task train`: B/32 batch 128 f32/bf16/f16, L/14 with 248-token text (`--stretch`) at
#      batch 128 with --recompute, the KERNELS.md "40 GB" arithmetic) with nvidia-smi sampling the GPU
#      memory;
#   3. the criterion kernel benches (benches/cuda.rs), short measurement.
# Everything lands in $OUT (log.txt, bench.jsonl, mem.csv) for BENCHMARKS.md / KERNELS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
tests=(cuda_table cuda_e2e device_step cuda_kernels cuda_flash)

if [ "$mode" = pack ]; then
  set -e
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  cargo build --release --quiet
  cargo test --release --no-run --quiet
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
  du -sh .gpu/bin.tar.xz
  exit 0
fi

[ "$mode" = run ] || { echo "usage: $0 pack|run" >&2; exit 2; }
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out" /tmp/gpu
log="$out/log.txt"
tar -C /tmp/gpu -xJf .gpu/bin.tar.xz || { echo "no .gpu/bin.tar.xz: run '$0 pack' here and carry .gpu" | tee "$log"; exit 1; }
built=$(cat .gpu/built_in)
if [ "$built" != "$PWD" ] && [ ! -e "$built" ]; then
  mkdir -p "$(dirname "$built")" && ln -s "$PWD" "$built"
fi
bin=/tmp/gpu/bin
# tests/device_step.rs runs the binary at the path cargo built it (CARGO_BIN_EXE_clipforge)
[ -e target/release/clipforge ] || { mkdir -p target/release && ln -s "$bin/clipforge" target/release/clipforge; }
step() { # name, timeout, command...
  local name=$1 t=$2; shift 2
  echo "=== $name ($(date +%T))" | tee -a "$log"
  timeout "$t" "$@" >> "$log" 2>&1
  echo "=== $name: exit $?" | tee -a "$log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$log"
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 250 > "$out/mem.csv" 2>/dev/null &
smi=$!

# 1. tests (GPU columns; --nocapture shows "skipped: no CUDA device" if the GPU did not open)
# (only the tests named gpu_*: the emulated ones ran in CI)
for t in "${tests[@]}"; do step "test $t" 240 "$bin/$t" gpu --test-threads 1 --nocapture; done

# 2. clipforge bench on the GPU
b() { step "bench $*" 150 bash -o pipefail -c "$bin/clipforge bench --device cuda --json $* | tr -d '\n' >> $out/bench.jsonl; rc=\$?; echo >> $out/bench.jsonl; exit \$rc"; }
b --preset b32 --batch 256 --iters 5
b --preset b32 --batch 256 --iters 5 --dtype bf16
b --preset l14 --batch 128 --iters 3 --dtype bf16
b --task train --preset b32 --batch 128 --iters 5
b --task train --preset b32 --batch 128 --iters 5 --dtype bf16
b --task train --preset b32 --batch 128 --iters 5 --dtype f16
b --task train --preset l14 --batch 128 --iters 2 --dtype bf16 --recompute --stretch --text-len 248

# 3. kernel benches
step "criterion cuda" 120 "$bin/cuda" --bench --warm-up-time 1 --measurement-time 2

kill "$smi" 2>/dev/null
echo "peak GPU memory (MiB): $(cut -d, -f2 "$out/mem.csv" | tr -dc '0-9\n' | sort -n | tail -1)" | tee -a "$log"

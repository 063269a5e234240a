#!/usr/bin/env python3
"""Issue 14's CPU goals on this machine, in one command: clipforge against PyTorch, same model, same
machine, alternating runs, as ratios per round and their median.

    python3 scripts/cpu_goals.py [--rounds 3] [--model DIR] [--no-finetune] [--json OUT]

Per round, inference (ViT-B/32, batch 32, 2 threads): PyTorch f32, PyTorch bf16 autocast, clipforge f32,
clipforge bf16, PyTorch f32 again (ratios to the mean of the round's two PyTorch f32 runs, as
scripts/compare_torch.sh); then the Long-CLIP fine-tune step (the stretched model, batch 8): PyTorch f32,
clipforge f32, PyTorch bf16 autocast, clipforge bf16 (as scripts/compare_finetune.sh). The goals:

    inference f32 >= 1.1x PyTorch f32 (images, texts)
    inference bf16 >= 1.2x PyTorch bf16 autocast; on a CPU without AMX also >= 2.5x PyTorch f32
    fine-tune step f32 >= 1.3x PyTorch f32; bf16 >= 1.2x PyTorch bf16 autocast

It prints the CPU (name, AVX512-BF16 / AVX512-FP16 / AMX-BF16, the GEMM path clipforge took: `bench
--json`'s `cpu`) and a markdown table to paste into BENCHMARKS.md with the command. Needs torch,
transformers, safetensors, tokenizers (pip); makes the random-weight model if it is missing.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CF = os.path.join(ROOT, "target", "release", "clipforge")
DATA = os.path.join(ROOT, "tests", "fixtures", "longclip", "train.jsonl")


def sh(cmd, **kw):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"cpu_goals: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def torch_embed(a, bf16):
    cmd = [sys.executable, "scripts/torch_baseline.py", "--model", a.model, "--batch", str(a.batch), "--threads", str(a.threads), "--json"]
    return json.loads(sh(cmd + (["--bf16"] if bf16 else [])))


def cf_embed(a, dtype):
    cmd = [CF, "--threads", str(a.threads), "bench", "--model", a.model, "--batch", str(a.batch), "--iters", "5", "--dtype", dtype, "--json"]
    return json.loads(sh(cmd))


def torch_step(a, long_dir, bf16):
    cmd = [sys.executable, "scripts/longclip_reference.py", "--bench", "--model", long_dir, "--data", DATA, "--steps", str(a.ft_steps),
           "--batch", str(a.ft_batch), "--lr", "1e-5", "--warmup", "2", "--pca-dim", "4"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    return last_json(sh(cmd + (["--bf16"] if bf16 else []), env=env))["samples_per_s"]


def cf_step(a, long_dir, dtype, work):
    out = os.path.join(work, f"cf-{dtype}")
    log = os.path.join(out, "log.jsonl")
    sh([CF, "--threads", str(a.threads), "finetune", "--model", long_dir, "--data", DATA, "--out", out, "--no-shuffle", "--batch", str(a.ft_batch),
        "--max-steps", str(a.ft_steps), "--lr", "1e-5", "--warmup", "2", "--pca-dim", "4", "--dtype", dtype, "--device", "cpu", "--log", log])
    rows = [json.loads(line) for line in open(log)]
    sps = [r["samples_per_s"] for r in rows[1:]] or [rows[0]["samples_per_s"]]  # the first step warms up
    subprocess.run(["rm", "-rf", out])
    return statistics.median(sps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/clipforge-b32", help="HF CLIP ViT-B/32 directory (made with random weights if missing)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ft-batch", type=int, default=8)
    ap.add_argument("--ft-steps", type=int, default=4)
    ap.add_argument("--no-finetune", action="store_true", help="inference goals only")
    ap.add_argument("--json", help="also write every run's numbers here")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.model, "model.safetensors")):
        sh([sys.executable, "scripts/make_hf_model.py", a.model, "b32"])
    sh(["cargo", "build", "--release", "--quiet"])
    rounds = []
    with tempfile.TemporaryDirectory() as work:
        long_dir = os.path.join(work, "long")
        if not a.no_finetune:
            sh([CF, "stretch", "--model", a.model, "--out", long_dir])
        cpu = None
        for i in range(a.rounds):
            r = {}
            t1 = torch_embed(a, False)
            tb = torch_embed(a, True)
            cf32 = cf_embed(a, "f32")
            cf16 = cf_embed(a, "bf16")
            t2 = torch_embed(a, False)
            cpu = cf16.get("cpu", cpu)
            for k, name in (("images_per_s", "img"), ("texts_per_s", "txt")):
                tf = (t1[k] + t2[k]) / 2
                r[f"torch_f32_{name}"], r[f"torch_bf16_{name}"] = tf, tb[k]
                r[f"cf_f32_{name}"], r[f"cf_bf16_{name}"] = cf32[k], cf16[k]
            if not a.no_finetune:
                r["torch_f32_step"] = torch_step(a, long_dir, False)
                r["cf_f32_step"] = cf_step(a, long_dir, "f32", work)
                r["torch_bf16_step"] = torch_step(a, long_dir, True)
                r["cf_bf16_step"] = cf_step(a, long_dir, "bf16", work)
            rounds.append(r)
            print(f"round {i + 1}/{a.rounds}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), file=sys.stderr)
    amx = bool(cpu and cpu.get("amx_bf16"))
    goals = [
        ("inference f32 / PyTorch f32, images", "cf_f32_img", "torch_f32_img", 1.1),
        ("inference f32 / PyTorch f32, texts", "cf_f32_txt", "torch_f32_txt", 1.1),
        ("inference bf16 / PyTorch bf16 autocast, images", "cf_bf16_img", "torch_bf16_img", 1.2),
        ("inference bf16 / PyTorch bf16 autocast, texts", "cf_bf16_txt", "torch_bf16_txt", 1.2),
    ]
    if not amx:
        goals += [
            ("inference bf16 / PyTorch f32, images (no AMX)", "cf_bf16_img", "torch_f32_img", 2.5),
            ("inference bf16 / PyTorch f32, texts (no AMX)", "cf_bf16_txt", "torch_f32_txt", 2.5),
        ]
    if not a.no_finetune:
        goals += [
            ("fine-tune step f32 / PyTorch f32", "cf_f32_step", "torch_f32_step", 1.3),
            ("fine-tune step bf16 / PyTorch bf16 autocast", "cf_bf16_step", "torch_bf16_step", 1.2),
        ]
    line = "unknown CPU" if cpu is None else (
        f"{cpu['name']} ({cpu['vendor']}; avx512_bf16 {cpu['avx512_bf16']}, avx512_fp16 {cpu['avx512_fp16']}, amx_bf16 {cpu['amx_bf16']}); "
        f"clipforge's GEMM path {cpu['gemm_path']}, bf16 GEMMs on {cpu['bf16_kernel']}")
    print(f"CPU: {line}; {a.threads} threads")
    print(f"`python3 scripts/cpu_goals.py --rounds {a.rounds}{' --no-finetune' if a.no_finetune else ''}`\n")
    print("| goal | target | " + " | ".join(f"round {i + 1}" for i in range(a.rounds)) + " | median | met |")
    print("|---|---|" + "---|" * a.rounds + "---|---|")
    summary = []
    for name, num, den, target in goals:
        ratios = [r[num] / r[den] for r in rounds]
        med = statistics.median(ratios)
        summary.append({"goal": name, "target": target, "ratios": ratios, "median": med, "met": med >= target})
        print(f"| {name} | ≥ {target} | " + " | ".join(f"{x:.2f}" for x in ratios) + f" | {med:.2f} | {'yes' if med >= target else 'NO'} |")
    print("\nThroughputs per round (images/s, texts/s, samples/s):")
    for i, r in enumerate(rounds):
        print(f"  round {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu, "threads": a.threads, "rounds": rounds, "goals": summary}, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch CPU baseline for CLIP embedding throughput (what clipforge is compared against).

Usage:
    python scripts/torch_baseline.py --model DIR [--batch 32] [--threads 2] [--iters N] [--min-seconds 10]
                                     [--bf16] [--attn sdpa|eager] [--tower both|image|text] [--json]

DIR is a Hugging Face CLIP directory (config.json, safetensors, tokenizer.json), e.g. one written by
`python scripts/make_hf_model.py /tmp/b32 b32`. Requirements (pip): torch transformers safetensors tokenizers.

Each tower is measured in its own fresh subprocess, which loads `CLIPModel.from_pretrained(DIR,
dtype=torch.float32)`, calls torch.set_num_threads(threads), runs one warm-up batch and then timed batches
(--iters N, or by default as many as needed for >= --min-seconds), all under torch.inference_mode():
  image: model.get_image_features(pixel_values) on random pixel values [B, 3, H, W]
  text:  model.get_text_features(input_ids) on B realistic captions, padding="max_length" to 77 tokens
         (input_ids only, no attention_mask, like OpenAI CLIP; pooling is at the EOT token either way)
The peak RSS (resource.getrusage(RUSAGE_SELF).ru_maxrss) of the image subprocess is therefore the memory
of loading the whole CLIPModel (both towers) plus embedding one image batch of size B; the text process
reports its own. --bf16 runs the forward passes under torch.autocast("cpu", dtype=torch.bfloat16)
(weights stay f32). With --json one JSON object is printed on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time

CAPTION_PARTS = dict(
    subject=["a dog", "two cats", "an old man", "a young woman", "a red car", "a group of children", "a horse",
             "a small boat", "a chef", "a cyclist", "a bowl of soup", "a wooden house", "three birds"],
    action=["sitting", "running", "standing", "resting", "playing", "waiting", "parked", "floating", "cooking"],
    place=["on a beach at sunset", "in a busy city street", "next to a lake", "in a snowy forest",
           "inside a bright kitchen", "on a wooden table", "in front of a brick wall", "under a cloudy sky",
           "in a green field full of flowers", "at a crowded train station"],
    extra=["", "", ", photographed from above", " with mountains in the background", ", black and white photo",
           " while it is raining and people with umbrellas walk by", ", shallow depth of field, 35mm film",
           ". The scene is lit by warm evening light and long shadows stretch across the ground"],
)


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c = f"{rng.choice(CAPTION_PARTS['subject'])} {rng.choice(CAPTION_PARTS['action'])} " \
            f"{rng.choice(CAPTION_PARTS['place'])}{rng.choice(CAPTION_PARTS['extra'])}"
        out.append(c[0].upper() + c[1:] + ".")
    return out


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def run_worker(args) -> dict:
    """Runs inside the subprocess: measure one tower."""
    import contextlib

    import torch
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = CLIPModel.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn).eval()
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_mb()
    B = args.batch

    if args.worker == "image":
        vc = model.config.vision_config
        x = torch.randn(B, 3, vc.image_size, vc.image_size, dtype=torch.float32)

        def step():
            out = model.get_image_features(pixel_values=x)
            return out if torch.is_tensor(out) else out.pooler_output
    else:
        from transformers import CLIPTokenizerFast

        tok = CLIPTokenizerFast(tokenizer_file=os.path.join(args.model, "tokenizer.json"))
        ids = tok(captions(B), padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt")["input_ids"]

        def step():
            out = model.get_text_features(input_ids=ids)
            return out if torch.is_tensor(out) else out.pooler_output

    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    times = []
    with torch.inference_mode(), amp:
        t = time.perf_counter()
        emb = step()  # warm-up
        warm_s = time.perf_counter() - t
        assert emb.shape == (B, model.config.projection_dim) and torch.isfinite(emb).all()
        start = time.perf_counter()
        while True:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
            if args.iters and len(times) >= args.iters:
                break
            if not args.iters and time.perf_counter() - start >= args.min_seconds:
                break
        total = time.perf_counter() - start
    times.sort()
    return {
        "tower": args.worker,
        "items_per_s": len(times) * B / total,
        "iters": len(times),
        "seconds": total,
        "median_batch_s": times[len(times) // 2],
        "min_batch_s": times[0],
        "warmup_s": warm_s,
        "load_s": load_s,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description="PyTorch CPU CLIP embedding baseline")
    ap.add_argument("--model", required=True, help="HF CLIP model directory")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=0, help="timed iterations per tower (default: time-based)")
    ap.add_argument("--min-seconds", type=float, default=10.0, help="minimum timed seconds per tower")
    ap.add_argument("--bf16", action="store_true", help='run under torch.autocast("cpu", dtype=torch.bfloat16)')
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention implementation")
    ap.add_argument("--tower", default="both", choices=["both", "image", "text"])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--worker", choices=["image", "text"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    towers = ["image", "text"] if args.tower == "both" else [args.tower]
    results = {}
    for tower in towers:
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--batch", str(args.batch),
               "--threads", str(args.threads), "--iters", str(args.iters), "--min-seconds", str(args.min_seconds),
               "--attn", args.attn, "--worker", tower] + (["--bf16"] if args.bf16 else [])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.exit(f"{tower} worker failed with exit code {proc.returncode}")
        results[tower] = json.loads(proc.stdout.strip().splitlines()[-1])

    import torch
    import transformers

    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    report = {
        "model": os.path.abspath(args.model),
        "vision": {k: cfg["vision_config"].get(k) for k in ("hidden_size", "num_hidden_layers", "patch_size",
                                                             "image_size")},
        "batch": args.batch,
        "threads": args.threads,
        "precision": "bf16-autocast" if args.bf16 else "f32",
        "attn": args.attn,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    if "image" in results:
        r = results["image"]
        report.update(images_per_s=r["items_per_s"], image_peak_rss_mb=r["peak_rss_mb"], image=r)
    if "text" in results:
        r = results["text"]
        report.update(texts_per_s=r["items_per_s"], text_peak_rss_mb=r["peak_rss_mb"], text=r)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model {report['model']}  batch {args.batch}  threads {args.threads}  {report['precision']}  "
              f"attn {args.attn}  torch {report['torch']}")
        if "image" in results:
            r = results["image"]
            print(f"image: {r['items_per_s']:9.2f} img/s   ({r['iters']} x {args.batch} in {r['seconds']:.1f} s, "
                  f"median batch {r['median_batch_s'] * 1e3:.1f} ms)   peak RSS {r['peak_rss_mb']:.0f} MiB "
                  f"(after load {r['rss_after_load_mb']:.0f} MiB)")
        if "text" in results:
            r = results["text"]
            print(f"text:  {r['items_per_s']:9.2f} texts/s ({r['iters']} x {args.batch} in {r['seconds']:.1f} s, "
                  f"median batch {r['median_batch_s'] * 1e3:.1f} ms)   peak RSS {r['peak_rss_mb']:.0f} MiB "
                  f"(after load {r['rss_after_load_mb']:.0f} MiB)")


if __name__ == "__main__":
    main()

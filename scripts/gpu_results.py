#!/usr/bin/env python3
"""Writes the results of scripts/gpu_check.sh (its $OUT folder) into BENCHMARKS.md and KERNELS.md.

    python3 scripts/gpu_results.py OUT_DIR [--date YYYY-MM-DD] [--dry]

Reads OUT_DIR/bench.jsonl (measured `clipforge bench --json` lines, each with its "args"),
OUT_DIR/predicted.jsonl (the `--dry-run --gpu h200 --json` prediction of each, same args),
info.json (device, driver, CUDA, module images, GEMM path), log.txt (test exits, peak memory) and
criterion.txt when the second call ran. Replaces the text between the markers
<!-- gpu-results:start --> and <!-- gpu-results:end --> in both files (inserted at the end of the
"## GPU" section of BENCHMARKS.md and of "## Measured on a GPU" in KERNELS.md the first time).
Python 3 standard library only; --dry prints the section instead of writing.
"""
import datetime
import json
import os
import re
import sys

START, END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"


def read_jsonl(path):
    rows = []
    if not os.path.exists(path):
        return rows
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append({"error": f"unreadable line ({e})"})
    return rows


def measured_values(m):
    """(what, value) pairs of a measured bench line."""
    out = []
    if "samples_per_s" in m:
        out.append(("train step", "samples/s", m["samples_per_s"]))
    if "images_per_s" in m:
        out.append(("image tower", "img/s", m["images_per_s"]))
    if "texts_per_s" in m:
        out.append(("text tower", "texts/s", m["texts_per_s"]))
    return out


def predicted_for(p, what):
    for ph in p.get("phases", []):
        if ph.get("phase", "").startswith(what):
            return ph
    return None


def fmt(x):
    return "—" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.2f}")


def section(out_dir, date):
    bench = read_jsonl(os.path.join(out_dir, "bench.jsonl"))
    pred = {p.get("args"): p for p in read_jsonl(os.path.join(out_dir, "predicted.jsonl"))}
    info = {}
    if os.path.exists(os.path.join(out_dir, "info.json")):
        info = json.load(open(os.path.join(out_dir, "info.json"), encoding="utf-8"))
    log = open(os.path.join(out_dir, "log.txt"), encoding="utf-8", errors="replace").read() if os.path.exists(os.path.join(out_dir, "log.txt")) else ""
    L = [START, "", f"### {date}: measured on {info.get('nvidia_smi', 'the lent GPU')} vs the dry-run prediction", ""]
    L.append(f"- device: {info.get('device', '?')}; CUDA driver API {info.get('cuda_driver_api', '?')}; kernels built with {info.get('nvcc_at_build') or 'no nvcc (NVRTC)'}")
    mods = info.get("modules", {})
    if mods:
        kinds = {}
        for name, origin in sorted(mods.items()):
            o = str(origin)
            o = o[5:-1] if o.startswith("Some(") and o.endswith(")") else o
            kinds.setdefault(re.sub(r"^(Nvrtc\w+).*", r"\1", o), []).append(name)
        L.append("- module images: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items()))
    tests = re.findall(r"=== (test \S+): exit (\d+)", log)
    if tests:
        L.append("- GPU test columns: " + ", ".join(f"{t[5:]} {'ok' if rc == '0' else 'FAILED (exit ' + rc + ')'}" for t, rc in tests))
    skipped = re.findall(r"=== (.*): SKIPPED", log)
    if skipped:
        L.append("- skipped for the time budget: " + "; ".join(skipped))
    peak = re.search(r"peak GPU memory \(MiB\): (\d+)", log)
    if peak:
        L.append(f"- peak GPU memory over the run: {int(peak.group(1)):,} MiB")
    L += ["", "| `clipforge bench` arguments | what | measured | predicted (H200) | measured / predicted | top predicted kernels |", "|---|---|---:|---:|---:|---|"]
    for m in bench:
        args = m.get("args", "?")
        p = pred.get(args, {})
        vals = measured_values(m)
        if not vals:
            L.append(f"| `{args}` | — | {m.get('error', 'no result')} | | | |")
            continue
        for what, unit, v in vals:
            ph = predicted_for(p, what)
            pv = ph.get("predicted_per_s") if ph else None
            ratio = f"{v / pv:.2f}" if pv else "—"
            top = ", ".join(f"{k['kernel']} {100 * k['share']:.0f}%" for k in (ph or {}).get("kernels", [])[:3])
            L.append(f"| `{args}` | {what} | {fmt(v)} {unit} | {fmt(pv)} {unit} | {ratio} | {top} |")
    crit = os.path.join(out_dir, "criterion.txt")
    if os.path.exists(crit):
        lines = [l.rstrip() for l in open(crit, encoding="utf-8", errors="replace") if "time:" in l]
        if lines:
            L += ["", "Criterion kernel benches (benches/cuda.rs, short measurement):", "", "```"] + lines + ["```"]
    L += ["", "Written by `python3 scripts/gpu_results.py` from the $OUT of `bash scripts/gpu_check.sh run`.", "", END]
    return "\n".join(L)


def update(path, heading, text):
    doc = open(path, encoding="utf-8").read()
    if START in doc and END in doc:
        a, b = doc.index(START), doc.index(END) + len(END)
        doc = doc[:a] + text + doc[b:]
    else:
        m = re.search(r"^" + re.escape(heading) + r"\s*$", doc, re.M)
        if m:
            nxt = re.search(r"^## ", doc[m.end():], re.M)
            at = m.end() + nxt.start() if nxt else len(doc)
            doc = doc[:at].rstrip("\n") + "\n\n" + text + "\n\n" + doc[at:].lstrip("\n")
        else:
            doc = doc.rstrip("\n") + "\n\n" + heading + "\n\n" + text + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(doc)
    os.replace(tmp, path)


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    out_dir = argv[1]
    if not os.path.isdir(out_dir):
        print(f"{out_dir}: not a directory (the $OUT files of scripts/gpu_check.sh)", file=sys.stderr)
        return 1
    date = argv[argv.index("--date") + 1] if "--date" in argv else datetime.date.today().isoformat()
    text = section(out_dir, date)
    if "--dry" in argv:
        print(text)
        return 0
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    update(os.path.join(root, "BENCHMARKS.md"), "## GPU", text)
    update(os.path.join(root, "KERNELS.md"), "## Measured on a GPU", text)
    print("updated BENCHMARKS.md and KERNELS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

#!/usr/bin/env python3
"""A bounded load generator for `clipforge serve` (Python stdlib only), compared in the same run
with one-shot CLI batch throughput on the same inputs. Not run in CI.

    python3 scripts/serve_load.py --model /tmp/clipforge-b32 [--binary target/release/clipforge]
        [--texts 512] [--images 96] [--concurrency 1,4,16,64] [--device cpu] [--serve-arg=--max-wait-ms=5]

It starts `clipforge serve --port 0` on 127.0.0.1, then for each concurrency level C runs C client
threads (one keep-alive HTTP/1.1 connection each) that send the inputs one per request
(`/v1/embeddings`, texts; then images as PNG data URLs with "modality": "image") until all are done,
and reports requests/s (= inputs/s), p50/p99 latency and the error count (must be 0). The CLI
baseline runs `clipforge embed-text --file` / `embed-image` on the same inputs; its embedding-only
throughput is (N−1)/(t(N) − t(1)), which takes out process start and model load (best of 2 runs each),
measured before and after the server's levels of that kind (the server idle); the table compares with the better.
Texts are deterministic captions of 3–40 words; images are the fixture photos, cycled.
"""
import argparse
import base64
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("a photo of the cat dog diagram red blue big small house car tree on in with near old new "
         "running sitting bright dark city river mountain person holding two three green yellow").split()


def captions(n, seed=0):
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 40))) for _ in range(n)]


def image_paths(n):
    d = os.path.join(ROOT, "tests", "fixtures", "images")
    files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".png"))
    return [files[i % len(files)] for i in range(n)]


def start_server(a):
    cmd = [a.binary, "serve", "--model", a.model, "--device", a.device, "--port", "0"] + a.serve_arg
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "listening on http://" in line:
            addr = line.split("listening on http://")[1].split()[0]
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            host, port = addr.rsplit(":", 1)
            return p, host, int(port)
    sys.exit(f"serve did not start: {' '.join(cmd)}")


def run_level(host, port, bodies, conc):
    """Sends every body once from `conc` threads; (seconds, latencies, errors)."""
    nxt = iter(range(len(bodies)))
    lock = threading.Lock()
    lat, errors = [], []

    def client():
        c = http.client.HTTPConnection(host, port, timeout=600)
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                break
            t0 = time.perf_counter()
            try:
                c.request("POST", "/v1/embeddings", body=bodies[i], headers={"Content-Type": "application/json"})
                r = c.getresponse()
                data = r.read()
                ok = r.status == 200 and len(json.loads(data)["data"]) == 1
            except Exception as e:  # count, reconnect, go on
                ok, data = False, str(e).encode()
                c.close()
                c = http.client.HTTPConnection(host, port, timeout=600)
            dt = time.perf_counter() - t0
            with lock:
                (lat if ok else errors).append(dt if ok else data[:200])
        c.close()

    threads = [threading.Thread(target=client) for _ in range(conc)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sorted(lat), errors


def pct(v, q):
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def cli_throughput(a, sub, items, tmp):
    """Embedding-only inputs/s of one CLI run: (N−1)/(t(N) − t(1)), best of 2 each."""
    def once(xs):
        out = os.path.join(tmp, "out.npy")
        if sub == "embed-text":
            f = os.path.join(tmp, "texts.txt")
            with open(f, "w") as fh:
                fh.write("\n".join(xs) + "\n")
            args = ["--file", f]
        else:
            args = list(xs)
        cmd = [a.binary, sub, "--model", a.model, "--device", a.device, "--out", out] + args
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0
    tn = min(once(items) for _ in range(2))
    t1 = min(once(items[:1]) for _ in range(2))
    return (len(items) - 1) / max(tn - t1, 1e-9), tn, t1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/clipforge-b32")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "clipforge"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra flag for serve, e.g. --serve-arg=--max-wait-ms=5")
    a = ap.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    texts, imgs = captions(a.texts), image_paths(a.images)
    text_bodies = [json.dumps({"input": t, "model": "clip"}) for t in texts]
    url = {p: "data:image/png;base64," + base64.b64encode(open(p, "rb").read()).decode() for p in set(imgs)}
    image_bodies = [json.dumps({"input": url[p], "modality": "image"}) for p in imgs]

    rows, total_errors, cli = [], 0, {}
    with tempfile.TemporaryDirectory() as tmp:
        p, host, port = start_server(a)  # idle while the CLI runs
        try:
            for kind, bodies, sub, items in (("text", text_bodies, "embed-text", texts), ("image", image_bodies, "embed-image", imgs)):
                before = cli_throughput(a, sub, items, tmp)
                run_level(host, port, bodies[: max(levels) * 2 if kind == "text" else 8], max(levels))  # warm up
                for c in levels:
                    secs, lat, errs = run_level(host, port, bodies, c)
                    total_errors += len(errs)
                    for e in errs[:3]:
                        print(f"error ({kind}, c={c}): {e}", file=sys.stderr)
                    rows.append((kind, c, len(bodies), len(bodies) / secs, 1e3 * pct(lat, 0.5), 1e3 * pct(lat, 0.99), len(errs)))
                after = cli_throughput(a, sub, items, tmp)
                cli[kind] = (before, after)
        finally:
            p.terminate()
            p.wait(timeout=120)
    for kind, n in (("text", len(texts)), ("image", len(imgs))):
        for when, (rate, tn, t1) in zip(("before", "after"), cli[kind]):
            print(f"CLI {kind} ({when} the server runs): {rate:.2f} inputs/s embedding only (t({n}) = {tn:.2f} s, t(1) = {t1:.2f} s)")
    print("| inputs | concurrency | requests | inputs/s | p50 ms | p99 ms | errors | vs best CLI batch run |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, c, n, rate, p50, p99, e in rows:
        best = max(r[0] for r in cli[kind])
        print(f"| {kind} | {c} | {n} | {rate:.1f} | {p50:.0f} | {p99:.0f} | {e} | {100 * rate / best:.0f} % |")
    if total_errors:
        sys.exit(f"{total_errors} errors")


if __name__ == "__main__":
    main()

"""Benchmark shards for `clipforge bench --task loader` (BENCHMARKS.md "WebDataset loader"):
WebDataset tar shards laid out as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json per sample),
the JPEGs random crops of the tests/fixtures photos resized to WxH (quality 90, 4:2:0), so that
the loader decodes photo-like JPEGs of a realistic size. Not used by the tests.

usage: python3 scripts/make_wds_bench.py OUTDIR [--shards 4] [--per-shard 128] [--size 640x480]
"""
import argparse, glob, io, json, os, random, tarfile
from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--shards", type=int, default=4)
ap.add_argument("--per-shard", type=int, default=128)
ap.add_argument("--size", default="640x480")
a = ap.parse_args()
w, h = map(int, a.size.split("x"))
root = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "images")
photos = [Image.open(p).convert("RGB") for p in sorted(glob.glob(os.path.join(root, "*.png")))]
rng = random.Random(0)
os.makedirs(a.out, exist_ok=True)


def add(tar, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


for s in range(a.shards):
    with tarfile.open(os.path.join(a.out, f"{s:05d}.tar"), "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(a.per_shard):
            key = f"{s:05d}{i:04d}"
            p = rng.choice(photos)
            cw, ch = rng.randint(p.width // 2, p.width), rng.randint(p.height // 2, p.height)
            x, y = rng.randint(0, p.width - cw), rng.randint(0, p.height - ch)
            img = p.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            add(tar, key + ".jpg", buf.getvalue())
            add(tar, key + ".txt", f"a photo, crop {i} of shard {s}.".encode())
            add(tar, key + ".json", json.dumps({"key": key, "width": w, "height": h}).encode())
print(f"wrote {a.shards} shards of {a.per_shard} {w}x{h} JPEGs to {a.out}")

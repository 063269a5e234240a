"""Recomputes `clipforge eval` metrics independently (numpy) from embeddings clipforge wrote.

usage:
  python3 scripts/check_eval.py zeroshot IMG.npy CLASSES.npy LABELS.txt EVAL.json
      IMG.npy: `clipforge embed-image` of the ImageFolder's images (sorted class folders, sorted
      files); CLASSES.npy: the per-class embeddings (`embed-text` of each class's prompts, averaged
      per class and re-normalised here: pass PROMPTS.npy and --per-class K instead); LABELS.txt: one
      class index per image; EVAL.json: `clipforge eval zeroshot --json` output.
  python3 scripts/check_eval.py retrieval IMG.npy TXT.npy OWNERS.txt EVAL.json
Exits non-zero if any metric differs.
"""
import json, sys
import numpy as np


def rank(row, t):
    return int((row > row[t]).sum())


def main():
    mode, a, b, c, ev = sys.argv[1:6]
    got = json.load(open(ev))
    img = np.load(a).astype(np.float64)
    if mode == "zeroshot":
        per = int(sys.argv[sys.argv.index("--per-class") + 1]) if "--per-class" in sys.argv else 1
        p = np.load(b).astype(np.float64)
        cls = p.reshape(-1, per, p.shape[1]).sum(1)
        cls /= np.linalg.norm(cls, axis=1, keepdims=True)
        y = [int(l) for l in open(c).read().split()]
        s = img @ cls.T
        top1 = np.mean([rank(s[i], y[i]) < 1 for i in range(len(y))])
        top5 = np.mean([rank(s[i], y[i]) < 5 for i in range(len(y))])
        want = {"top1": top1, "top5": top5}
        have = {"top1": got["top1"], "top5": got["top5"]}
    else:
        txt = np.load(b).astype(np.float64)
        owner = [int(l) for l in open(c).read().split()]
        s = img @ txt.T
        want, have = {}, {}
        for r in got["recall"]:
            k = r["k"]
            i2t = np.mean([min(rank(s[i], t) for t in range(len(owner)) if owner[t] == i) < k for i in range(len(img))])
            t2i = np.mean([rank(s[:, t], owner[t]) < k for t in range(len(owner))])
            want[f"R@{k}"] = (i2t, t2i)
            have[f"R@{k}"] = (r["image_to_text"], r["text_to_image"])
    ok = all(np.allclose(np.array(want[k]), np.array(have[k]), rtol=0, atol=1e-12) for k in want)
    print(json.dumps({"independent": {k: np.asarray(v).tolist() for k, v in want.items()}, "clipforge": have, "agree": bool(ok)}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Talks to a running `clipforge serve` with the official `openai` Python client (pip install openai)
and checks that its answers are what the server's own float endpoint says. Not run in CI.

    clipforge serve --model tests/fixtures/tiny --port 8080 &
    python3 scripts/serve_openai_check.py --base-url http://127.0.0.1:8080/v1 [--api-key KEY] [--image a.png]

The client's default request asks for base64 (little-endian f32) and decodes it; the script
compares that with `encoding_format="float"`, token-id input with text input, and an image sent
as a data URL through `extra_body={"modality": "image"}`.
"""
import argparse
import base64
import json
import math
import sys
import urllib.request

from openai import OpenAI


def close(a, b, atol=1e-6, rtol=1e-6):
    return len(a) == len(b) and all(abs(x - y) <= atol + rtol * abs(y) for x, y in zip(a, b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--image", default="tests/fixtures/images/chelsea.png")
    a = ap.parse_args()
    client = OpenAI(base_url=a.base_url, api_key=a.api_key)
    texts = ["a photo of a cat", "a diagram of a bridge", "x"]

    default = client.embeddings.create(model="clip", input=texts)  # the client asks for base64
    floats = client.embeddings.create(model="clip", input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1, 2], default
    for d, f in zip(default.data, floats.data):
        assert close(d.embedding, f.embedding), "base64 and float answers differ"
        assert abs(math.sqrt(sum(x * x for x in f.embedding)) - 1) < 1e-5, "rows are L2-normalised"
    print(f"text: {len(floats.data)} rows of dim {len(floats.data[0].embedding)}, usage {floats.usage}")

    one = client.embeddings.create(model="clip", input=texts[0], encoding_format="float")
    assert close(one.data[0].embedding, floats.data[0].embedding), "a single string differs from the list"

    req = urllib.request.Request(a.base_url + "/tokenize", data=json.dumps({"input": texts[0]}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {a.api_key}"})
    ids = json.load(urllib.request.urlopen(req))["data"][0]["tokens"]
    by_ids = client.embeddings.create(model="clip", input=[ids], encoding_format="float")
    assert close(by_ids.data[0].embedding, floats.data[0].embedding), "token ids differ from the text"
    print(f"token ids {ids}: same row as the text")

    with open(a.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    img = client.embeddings.create(model="clip", input=[url], extra_body={"modality": "image"})
    print(f"image: {len(img.data)} row of dim {len(img.data[0].embedding)}")
    cos = sum(x * y for x, y in zip(img.data[0].embedding, floats.data[0].embedding))
    print(f"cosine(image, {texts[0]!r}) = {cos:.4f}")

    try:
        client.embeddings.create(model="clip", input="word " * 200)
        sys.exit("a 200-word text should be refused (context exceeded)")
    except Exception as e:  # openai.BadRequestError
        print(f"too long: {type(e).__name__}: {getattr(e, 'status_code', '?')}")
    print("OK: the openai client works unchanged")


if __name__ == "__main__":
    main()

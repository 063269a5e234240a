#!/usr/bin/env python3
"""Generate the committed test fixtures of clipforge (tests/fixtures/).

Run from the repository root:

    pip install torch transformers open_clip_torch tokenizers safetensors numpy pillow scikit-image ftfy
    python scripts/make_fixtures.py [OUT_DIR]          # OUT_DIR defaults to tests/fixtures

CPU only, takes well under a minute. Everything is seeded, so re-running with the same library versions
gives the same files (the versions used are recorded in OUT_DIR/README.md, which is also written here).
Needs no network: the CLIP BPE merges come from the open_clip_torch wheel and the photos from
scikit-image's bundled data module.

What is written (details in the generated README.md):
    tokenizer.json                 real OpenAI CLIP BPE for HF `tokenizers`
    tokens.json                    corpus of texts + HF ids (truncation at 77 and 248, no padding)
    images/*.png                   real photos in various PIL modes (RGB, L, RGBA, P, I;16, 16-bit RGB)
    pixels.safetensors             HF CLIPImageProcessorPil output per image at 224, 32 and 98 px
    tiny/, odd/                    random-weight HF CLIP models (+ activations.safetensors)

scripts/make_hf_model.py (imported) builds the models and the tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import sys
import zlib

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_hf_model as mh  # noqa: E402

SEED = 0
NOTES: dict[str, list[str]] = {"tokenizer": [], "images": [], "models": []}


# =============================================================================================
# text corpus
# =============================================================================================
CAPTIONS = [
    "a photo of a cat",
    "a photo of a dog",
    "A photo of a cat sitting on a windowsill.",
    "a diagram",
    "a dog running on the beach at sunset",
    "Two people riding bicycles down a cobblestone street in the rain.",
    "an aerial view of a city at night with lots of lights",
    "A bowl of ramen with a soft-boiled egg and green onions",
    "a red double-decker bus driving past Big Ben",
    "close-up of a ladybug on a green leaf",
    "a painting of a sunflower field in the style of Van Gogh",
    "A man in a suit is holding an umbrella.",
    "children playing soccer in a park",
    "a black and white photograph of an old lighthouse",
    "a cup of coffee next to a laptop on a wooden table",
    "The Eiffel Tower seen from the Trocadéro.",
    "a snowy mountain reflected in a calm lake",
    "a tabby cat sleeping in a cardboard box",
    "sketch of a horse",
    "a blurry photo of a train station",
    "a low resolution photo of the number 7",
    "an origami crane",
    "a plate of spaghetti",
    "a rendering of a robot",
    "itap of a bird",
    "a photo of the large giraffe.",
    "a bad photo of a chair",
    "a tattoo of a dragon",
    "a cropped photo of my shoes",
    "Satellite image of farmland",
    "x-ray of a human hand",
    "a street sign that says STOP",
    "a woman wearing a yellow raincoat walking her dog",
    "fireworks over the harbour on new year's eve",
    "A kitchen with stainless steel appliances and a marble countertop.",
    "a close up of a pizza with pepperoni and olives",
    "a group of zebras grazing on the savanna",
    "an empty room",
    "a hand-drawn map of a fantasy island",
    "cat",
    "dog.",
    "A",
    "the",
]

UNICODE_TEXTS = [
    "café crème brûlée",
    "naïve façade jalapeño",
    "Ångström Zürich São Paulo Kraków Reykjavík",
    "cafe\u0301 (combining acute accent, decomposed)",
    "e\u0301\u0302\u0303 stacked combining marks",
    "Z\u0351\u0354a\u0362l\u036ag\u0347o text",
    "日本語のテキストと漢字",
    "中文字符和标点符号。",
    "한국어 문장입니다",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Привет, мир! Ёжик в тумане.",
    "Καλημέρα κόσμε",
    "ΟΔΟΣ ΣΟΦΙΑΣ",
    "İstanbul ve Iğdır",
    "Straße STRASSE",
    "ﬁsh ﬂower (ligatures)",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "zero\u200bwidth\u200bspace",
    "soft\u00adhyphen",
    "\ufeffbyte order mark",
    "left\u200fto\u200eright marks",
    "non\u00a0breaking\u00a0space",
    "private use \ue000\ue001",
    "H₂O and CO₂ at 25°C",
    "x² + y² = z²",
    "½ cup of sugar, ¾ cup of milk",
    "Ⅻ o'clock",
    "Arabic-Indic digits ٣٤٥",
    "mixed 日本 and English and عربي",
    "“smart quotes” and ‘single quotes’",
    "don’t stop (curly apostrophe)",
    "em—dash and en–dash",
    "ellipsis… character",
    "bullet • point",
    "« guillemets »",
    "Ørsted Æble Œuvre",
    "control\x07char and escape \x1b[31mred\x1b[0m",
    "null\x00byte",
    "tab\x0bvertical tab and\x0cform feed",
    "file\x1cseparator\x1dgroup\x1erecord\x1funit",
    "next\x85line",
]

EMOJI_TEXTS = [
    "😀",
    "a happy dog 🐶🐕",
    "thumbs up 👍🏽 with skin tone",
    "family 👨‍👩‍👧‍👦 emoji",
    "technologist 🧑‍💻",
    "rainbow flag 🏳️‍🌈",
    "flags 🇺🇸🇯🇵🇩🇪🇫🇷",
    "keycap 1️⃣2️⃣3️⃣",
    "red heart ❤️ vs ❤",
    "🎉🎉🎉 party 🎉🎉🎉",
    "🔥",
    "emoji at end 🚀",
    "👩🏿‍🚀 astronaut",
]

CONTRACTIONS = [
    "it's a cat",
    "won't you come",
    "they'll be here soon",
    "I'd like a coffee",
    "we're going home",
    "you've been warned",
    "I'm here",
    "IT'S A CAT",
    "He'S THERE",
    "John'S car",
    "WON'T, CAN'T, SHOULDN'T",
    "rock 'n' roll",
    "'twas the night",
    "y'all'd've",
    "the dogs' bowls",
    "it 's spaced",
    "o'clock and o'neill",
    "'quoted'",
    "''double single''",
]

NUMBERS = [
    "3.14159",
    "1,000,000",
    "2024-11-23",
    "12:30pm on 01/02/2003",
    "$19.99 or €5,50",
    "50% off",
    "1e-5",
    "-42",
    "007",
    "0",
    "1234567890",
    "version 2.0.1-beta",
    "route 66",
    "1st 2nd 3rd 4th",
    "+1 (555) 123-4567",
    "#1 best seller",
    "100°F",
    "3x4 grid",
    "24/7",
]

WHITESPACE = [
    "  leading spaces",
    "trailing spaces   ",
    "  both sides  ",
    "multiple     spaces   inside",
    "tab\tseparated\twords",
    "new\nline",
    "windows\r\nline ending",
    "\n\nleading newlines",
    "trailing newline\n",
    "mixed \t\n \r whitespace",
    "ideographic\u3000space",
    "em\u2003space and thin\u2009space",
    "\t",
    "   ",
    "\n",
]

PUNCTUATION = [
    "!!!",
    "?!?!",
    "...",
    "wow!!!...???",
    "a -- b --- c",
    "(parentheses) [brackets] {braces}",
    "#hashtag @mention",
    "a/b\\c|d",
    "***bold***",
    "~~~",
    "<>",
    "'",
    "!",
    "a.b.c.d",
    "hello,world;foo:bar",
    "C++ and C# and F#",
    "snake_case_name and kebab-case-name",
    "print('hello world')",
    "x^2 + y^2 = z^2",
    "<|endoftext|>",
    "a <|startoftext|> b <|endoftext|> c",
    "<start_of_text>",
    "<|ENDOFTEXT|>",
    "$$$ %%% ^^^ &&&",
]

HTML = [
    "&amp;",
    "Tom &amp; Jerry",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&quot;quoted&quot;",
    "it&#39;s",
    "&amp;amp; double escaped",
    "caf&eacute;",
    "non&nbsp;breaking",
    "&#128512; numeric emoji",
    "AT&T",
    "&notanentity;",
]

URLS = [
    "https://example.com/path?q=1&x=2",
    "www.google.com",
    "user@example.com",
    "file:///tmp/a.txt",
    "http://images.cocodataset.org/val2017/000000039769.jpg",
    "check out https://github.com/openai/CLIP!",
]

EMPTYISH = ["", " "]

CAPS = [
    "A PHOTO OF A CAT",
    "BREAKING NEWS: MARKET CRASHES",
    "NASA AND THE ESA",
    "iPhone eBay McDonald's",
    "CamelCaseWordsTogether",
    "aLtErNaTiNg CaSe",
]

LONG_PARAGRAPHS = [
    # Long-CLIP style detailed captions (> 77 tokens)
    "The image showcases a bustling city street at dusk, lined with tall brick buildings whose windows glow "
    "with warm yellow light. In the foreground, a red tram is passing through an intersection while several "
    "pedestrians wait at the crosswalk, some holding umbrellas because of a light drizzle. On the left side "
    "there is a small flower stall with buckets of tulips, roses and sunflowers, and a vendor wearing a green "
    "apron is arranging a bouquet. Street lamps reflect on the wet cobblestones, creating long streaks of "
    "orange light, and in the distance a church spire rises above the rooftops against a deep blue sky.",
    "In this photograph, a golden retriever puppy is sitting on a wooden porch next to a pair of muddy rubber "
    "boots. The puppy has a red collar with a small silver tag and is looking up at the camera with its head "
    "slightly tilted. Behind it, a screen door is partially open, revealing a glimpse of a cozy kitchen with "
    "copper pots hanging from a rack. A potted fern sits on the railing, and the late afternoon sun casts long "
    "shadows across the floorboards.",
    "A detailed illustration of a medieval marketplace: merchants sell bread, cheese, fish and colourful "
    "fabrics from wooden stalls covered with striped awnings; a juggler entertains a small crowd of children; "
    "chickens wander between the carts; a knight in shining armour rides a white horse through the square; "
    "and in the background a stone castle with four towers and waving banners sits on top of a green hill "
    "under a sky full of fluffy white clouds.",
]

SENTENCE_POOL = [
    "A small wooden boat is tied to the end of a weathered pier.",
    "The water is perfectly still and reflects the pink and orange clouds of the sunset.",
    "On the shore, a row of pine trees stands against the fading light.",
    "An old man in a flannel shirt is fishing from the edge of the dock.",
    "A thermos and a tackle box sit beside him on the planks.",
    "Far away, the silhouette of a mountain range is barely visible through the haze.",
    "A pair of ducks glide across the surface, leaving gentle ripples behind them.",
    "The scene feels calm, quiet and slightly nostalgic.",
    "There is a red canoe pulled up onto the pebble beach.",
    "Its paddle leans against a large grey boulder covered in moss.",
    "Several seagulls circle overhead, and one has landed on a wooden post.",
    "A narrow dirt path winds from the beach up towards a log cabin.",
    "Smoke curls lazily from the cabin's stone chimney.",
    "The windows of the cabin glow with a soft yellow light.",
    "A dog sleeps on the front step, curled up on a woven mat.",
    "Wildflowers in purple, white and yellow grow along the path.",
]

ADJ = ["red", "small", "old", "shiny", "fluffy", "wooden", "broken", "giant", "striped", "blue", "wet", "happy"]
NOUN = ["car", "cat", "house", "bird", "boat", "chair", "tree", "robot", "guitar", "teapot", "bicycle", "lamp"]
TEMPLATES = [
    "a photo of a {a} {n}.",
    "a close-up photo of the {a} {n}",
    "a painting of a {a} {n} in a field",
    "There is a {a} {n} next to a {a2} {n2}.",
    "a {a} {n} and a {a2} {n2}",
    "A {A} {N}!",
]


def build_corpus() -> list[str]:
    rng = random.Random(SEED)
    texts: list[str] = []
    texts += CAPTIONS + UNICODE_TEXTS + EMOJI_TEXTS + CONTRACTIONS + NUMBERS + WHITESPACE
    texts += PUNCTUATION + HTML + URLS + EMPTYISH + CAPS
    for i in range(30):
        t = TEMPLATES[i % len(TEMPLATES)]
        a, a2 = rng.choice(ADJ), rng.choice(ADJ)
        n, n2 = rng.choice(NOUN), rng.choice(NOUN)
        texts.append(t.format(a=a, n=n, a2=a2, n2=n2, A=a.upper(), N=n.upper()))
    # long texts: hand-written paragraphs, then seeded sentence salads of increasing length
    texts += LONG_PARAGRAPHS
    for n_sent in (6, 8, 10, 12, 14, 20, 24, 28, 36):
        texts.append(" ".join(rng.choice(SENTENCE_POOL) for _ in range(n_sent)))
    texts.append(" ".join(LONG_PARAGRAPHS))  # ~ 300 tokens
    texts.append("0123456789 " * 30)  # one token per digit
    texts.append("日本語の長い文章です。" * 30)  # multi-byte BPE fallbacks
    texts.append("🙂" * 200)
    texts.append("word " * 300)
    texts.append("supercalifragilisticexpialidocious " * 20)
    texts.append("a, " * 150 + "end")
    assert len(texts) == len(set(texts)), "duplicate texts in corpus"
    return texts


# =============================================================================================
# tokenizer
# =============================================================================================
def open_clip_ids(simple, text: str) -> list[int]:
    """[SOT] + open_clip/OpenAI SimpleTokenizer BPE + [EOT], untruncated."""
    return [simple.sot_token_id] + simple.encode(text) + [simple.eot_token_id]


def truncate_like_openai(ids: list[int], ctx: int) -> list[int]:
    if len(ids) <= ctx:
        return ids
    out = ids[:ctx]
    out[-1] = mh.EOT_ID
    return out


SPECIAL_LITERALS = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")


def disagreement_reason(t: str) -> str:
    import html
    if html.unescape(html.unescape(t)) != t:
        return "html"
    if any(x in t.lower() for x in SPECIAL_LITERALS):
        return "special"
    if t.lower() != "".join(c.lower() for c in t):
        return "lowercase"
    return "other"


def classify_disagreements(unchanged_dis, changed_dis):
    reasons = {}
    for t, _, _ in unchanged_dis:
        reasons.setdefault(disagreement_reason(t), []).append(t)
    text = {
        "html": "**HTML entities**: OpenAI/open_clip run `html.unescape` twice; tokenizer.json does not. Every text "
                "containing an entity differs (`&amp;`, `&quot;`, `&#39;`, ... and also HTML5 legacy entities "
                "without `;`, e.g. `&notanentity;` becomes `¬anentity;` in open_clip). ftfy itself unescapes "
                "entities too (when the text has no `<`), so most of these are in the ftfy-changes group.",
        "special": "**Special-token literals in the text**: HF `tokenizers` matches the added tokens `<|startoftext|>` / "
                   "`<|endoftext|>` in the raw text (case-sensitive) and emits 49406/49407 for them; open_clip's "
                   "special tokens are spelled `<start_of_text>` / `<end_of_text>`, so it BPE-encodes `<|endoftext|>` "
                   "as text but turns a literal `<start_of_text>` into 49406. `<|ENDOFTEXT|>` is lowercased and "
                   "then kept as one pre-token by the `<\\|endoftext\\|>` alternative of the split regex "
                   "(hence a different BPE split from open_clip, which splits it into `<|`, `endoftext`, `|>`).",
        "lowercase": "**Context-sensitive lowercasing**: Python's `str.lower()` maps a word-final capital sigma `Σ` to "
                     "`ς` (U+03C2); the `tokenizers` Lowercase normalizer maps every `Σ` to `σ` (U+03C3).",
        "other": "Other (unexplained) differences: ",
    }
    for r, ts in reasons.items():
        NOTES["tokenizer"].append(text[r] + (" Texts: " + ", ".join(f"`{t!r}`" for t in ts)))
    NOTES["tokenizer"].append(
        "Texts that **ftfy changes** differ as expected (tokenizer.json has no ftfy): ligatures (`ﬁ`), fullwidth "
        "forms, curly quotes/apostrophes (ftfy straightens them), BOM and other control characters (ftfy removes "
        "them; HF byte-encodes them, except `\\x0b`/`\\x0c`/`\\x85`, which the `\\s+` normalizer treats as "
        "whitespace), C1 characters that look like mojibake (`\\x85` becomes `…`), and HTML entities.")
    NOTES["tokenizer"].append(
        "Everything else agrees: NFC composition (ftfy also does NFC), accents, CJK, Arabic, Hebrew, Devanagari, "
        "Thai, emoji incl. ZWJ sequences/flags/keycaps/skin tones, contractions (also upper-case `'S`, since both "
        "lowercase before splitting), numbers (one token per digit), whitespace runs/tabs/newlines/leading and "
        "trailing spaces, empty and space-only strings, punctuation runs, URLs.")


def make_tokenizer_fixtures(out: str, texts: list[str]) -> dict:
    import ftfy
    from open_clip.tokenizer import SimpleTokenizer
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizerFast

    tok_path = os.path.join(out, "tokenizer.json")
    mh.write_clip_tokenizer(tok_path)
    hf = CLIPTokenizerFast(tokenizer_file=tok_path)
    raw = Tokenizer.from_file(tok_path)
    simple = SimpleTokenizer()

    ids = {}
    for ctx in (77, 248):
        enc = hf(texts, truncation=True, max_length=ctx, padding=False, add_special_tokens=True)["input_ids"]
        for t, e in zip(texts, enc):
            assert e[0] == mh.SOT_ID and e[-1] == mh.EOT_ID and len(e) <= ctx, (t, e)
        ids[ctx] = [list(map(int, e)) for e in enc]

    full = [raw.encode(t).ids for t in texts]  # untruncated, raw tokenizers pipeline
    # --- consistency of the HF wrapper with the raw `tokenizers` pipeline (what Rust will load)
    for ctx in (77, 248):
        for t, f, e in zip(texts, full, ids[ctx]):
            # HF truncation keeps SOT + first ctx-2 tokens + EOT, like OpenAI's tokenize(truncate=True)
            assert e == truncate_like_openai(f, ctx), (ctx, t)
    n77 = sum(len(f) > 77 for f in full)
    n248 = sum(len(f) > 248 for f in full)
    assert n77 >= 10 and n248 >= 5, (n77, n248)

    # --- CLIPTokenizer.from_pretrained rebuilds its own pipeline in transformers 5 (ByteLevel use_regex=True)
    from transformers import CLIPTokenizer
    tmpd = os.path.join(out, ".tmp_tok")
    os.makedirs(tmpd, exist_ok=True)
    shutil.copy(tok_path, os.path.join(tmpd, "tokenizer.json"))
    mh.write_tokenizer_config(os.path.join(tmpd, "tokenizer_config.json"))
    fp = CLIPTokenizer.from_pretrained(tmpd)
    fp.model_max_length = 10**6  # untruncated comparison; silences the "longer than 77" warning
    shutil.rmtree(tmpd)
    fp_diff = [t for t, f in zip(texts, full) if fp(t)["input_ids"] != f]

    # --- compare with open_clip (OpenAI SimpleTokenizer: ftfy + html.unescape x2 + strip + ws + lower)
    unchanged_dis, changed_dis, n_unchanged = [], [], 0
    for t, f in zip(texts, full):
        oc = open_clip_ids(simple, t)
        same = oc == f
        if ftfy.fix_text(t) == t:
            n_unchanged += 1
            if not same:
                unchanged_dis.append((t, f, oc))
        elif not same:
            changed_dis.append((t, f, oc))

    classify_disagreements(unchanged_dis, changed_dis)

    def show(lst, k=40):
        for t, f, oc in lst[:k]:
            print(f"    {t[:60]!r}\n      hf      {f[:16]}\n      openclip {oc[:16]}")

    print(f"[tokenizer] {len(texts)} texts, {n77} over 77 tokens, {n248} over 248 tokens")
    print(f"[tokenizer] ftfy leaves {n_unchanged} texts unchanged; HF != open_clip on {len(unchanged_dis)} of them:")
    show(unchanged_dis)
    print(f"[tokenizer] ftfy changes {len(texts) - n_unchanged} texts; HF != open_clip on {len(changed_dis)}:")
    show(changed_dis)
    print(f"[tokenizer] CLIPTokenizer.from_pretrained differs from tokenizer.json pipeline on {len(fp_diff)} texts")

    with open(os.path.join(out, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump({"texts": texts, "ids_77": ids[77], "ids_248": ids[248]}, f, ensure_ascii=False)
        f.write("\n")
    return dict(n_texts=len(texts), n77=n77, n248=n248, n_unchanged=n_unchanged,
                unchanged_dis=unchanged_dis, changed_dis=changed_dis, fp_diff=fp_diff)


# =============================================================================================
# images
# =============================================================================================
def write_png_rgb16(path: str, arr: np.ndarray):
    """Minimal PNG writer for 16-bit RGB (colour type 2, bit depth 16), which PIL cannot write."""
    assert arr.dtype == np.uint16 and arr.ndim == 3 and arr.shape[2] == 3
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(arr[y]).astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def make_images(out: str) -> list[dict]:
    """Returns [{stem, path, mode, size, desc}] in a fixed order (the first three feed the activations)."""
    import skimage.data as skd
    from PIL import Image

    d = os.path.join(out, "images")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(SEED)
    imgs = []

    def save(stem, im, desc, **kw):
        p = os.path.join(d, stem + ".png")
        im.save(p, format="PNG", optimize=True, **kw)
        imgs.append(dict(stem=stem, desc=desc))

    # 1. RGB landscape photo, original size 451x300
    save("chelsea", Image.fromarray(skd.chelsea()), "RGB photo (cat), 451x300 landscape, downscaled to 224")
    # 2. RGB portrait crop 260x400 of coffee
    save("coffee_portrait", Image.fromarray(skd.coffee()[:, 170:430]), "RGB portrait crop, 260x400")
    # 3. RGB, short side < 224 (upscaled by the 224 processor), odd dimensions
    small = Image.fromarray(skd.astronaut()).resize((201, 157), Image.Resampling.LANCZOS)
    save("astronaut_small", small, "RGB 201x157 (upscaled to 224 on its short side)")
    # 4. grayscale, mode L
    save("camera_gray", Image.fromarray(skd.camera()[100:400, 50:450]), "grayscale (mode L), 400x300")
    # 5. RGBA: rocket with a synthetic alpha channel (gradient + fully transparent square + opaque band)
    rocket = np.asarray(Image.fromarray(skd.rocket()).resize((320, 214), Image.Resampling.LANCZOS))
    h, w = rocket.shape[:2]
    alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    alpha[20:80, 30:90] = 0
    alpha[150:180, :] = 255
    save("rocket_rgba", Image.fromarray(np.dstack([rocket, alpha]), mode="RGBA"),
         "RGBA 320x214 (short side < 224); alpha = left-to-right ramp, a fully transparent square, an opaque band")
    # 6. palette (mode P), 64 colours, no transparency
    pal = Image.fromarray(skd.coffee()).resize((300, 200), Image.Resampling.LANCZOS)
    pal = pal.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    save("coffee_palette", pal, "palette (mode P, 64 colours, no transparency), 300x200")
    # 7. 16-bit grayscale (PIL mode I;16) holding 10-bit data (0..1023): PIL's clipping to 255 then hits
    #    only part of the image, and clip / high byte / rescale all give different results
    cam = np.asarray(Image.fromarray(skd.camera()).resize((256, 192), Image.Resampling.LANCZOS)).astype(np.uint16)
    cam16 = cam * 4 + rng.integers(0, 4, cam.shape, dtype=np.uint16)
    im16 = Image.fromarray(cam16)
    assert im16.mode == "I;16", im16.mode
    save("camera_16bit", im16, "16-bit grayscale PNG (PIL opens it as mode I;16) holding 10-bit values "
         "0..1023 (v*4 + random 0..3), 256x192")
    # 8. 16-bit RGB (PIL cannot write it -> own writer); low byte random so rounding vs truncation differ
    ch = np.asarray(Image.fromarray(skd.chelsea()).resize((240, 160), Image.Resampling.LANCZOS)).astype(np.uint16)
    rgb16 = ch * 256 + rng.integers(0, 256, ch.shape, dtype=np.uint16)
    write_png_rgb16(os.path.join(d, "chelsea_rgb16.png"), rgb16)
    imgs.append(dict(stem="chelsea_rgb16", desc="16-bit RGB PNG, 240x160, value = v*256 + random low byte"))

    # record how PIL opens each one and what convert("RGB") does
    for info in imgs:
        p = os.path.join(d, info["stem"] + ".png")
        info["path"] = p
        with Image.open(p) as im:
            info["mode"], info["size"] = im.mode, im.size
    by = {i["stem"]: i for i in imgs}
    with Image.open(by["chelsea_rgb16"]["path"]) as im:
        assert im.mode == "RGB"
        got = np.asarray(im)
        assert np.array_equal(got, (rgb16 >> 8).astype(np.uint8)), "PIL should keep the high byte of 16-bit RGB"
        NOTES["images"].append(
            "`chelsea_rgb16.png` (16-bit RGB): PIL decodes it straight to mode `RGB`, keeping the **high byte** of "
            "each sample (`v >> 8`, truncation, not rounding to `v/257`); verified by the script.")
    with Image.open(by["camera_16bit"]["path"]) as im:
        assert im.mode == "I;16"
        arr = np.asarray(im).astype(np.int64)
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)
        assert np.array_equal(rgb[..., 0], np.minimum(arr, 255)), "PIL I;16 -> RGB should clip"
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        frac = float((arr > 255).mean())
        NOTES["images"].append(
            f"`camera_16bit.png` opens as mode `I;16` (PIL keeps the 16-bit values). `convert(\"RGB\")` **clamps** "
            f"each value to 0..255 (`min(v, 255)`, copied to R=G=B); it does not rescale (v/257) and does not take "
            f"the high byte. Here {100 * frac:.1f}% of the pixels are > 255 and become 255. Verified by the script, "
            f"including that `camera_16bit.*` in pixels.safetensors equals the processor output for the 8-bit image "
            f"`min(v, 255)`. (PIL mode `I`, 32-bit, clamps the same way, negatives to 0.)")
    with Image.open(by["rocket_rgba"]["path"]) as im:
        plain = np.asarray(im.convert("RGB"))
        assert np.array_equal(plain, np.asarray(im)[..., :3])
    with Image.open(by["coffee_palette"]["path"]) as im:
        assert "transparency" not in im.info
    with Image.open(by["camera_gray"]["path"]) as im:
        a = np.asarray(im)
        assert np.array_equal(np.asarray(im.convert("RGB")), np.dstack([a, a, a]))
    return imgs


def image_processor(size: int):
    """The slow, PIL-based HF CLIP image processor (transformers >= 5 calls it CLIPImageProcessorPil;
    there `CLIPImageProcessor` is the torchvision backend)."""
    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the slow PIL one
        from transformers import CLIPImageProcessor as Proc
    proc = Proc(**{k: v for k, v in mh.preprocessor_dict(size).items() if k != "image_processor_type"})
    assert getattr(proc, "backend", "pil") == "pil"
    return proc


def compare_with_open_clip(imgs: list[dict], tensors: dict) -> list[tuple]:
    """max |open_clip/OpenAI preprocessing - HF| per image and size (for the README)."""
    from open_clip.transform import image_transform
    from PIL import Image

    rows = []
    for s in (224, 32, 98):
        tf = image_transform(s, is_train=False)
        for info in imgs:
            with Image.open(info["path"]) as im:
                im.load()
                a = tf(im).numpy()
            rows.append((info["stem"], s, float(np.abs(a - tensors[f"{info['stem']}.{s}"]).max())))
    return rows


CROP_NOTE = (
    "Center-crop offset: HF uses `(size - crop) // 2` (floor); torchvision's `CenterCrop` (OpenAI CLIP, open_clip) "
    "uses `int(round((size - crop) / 2.0))`, and Python's `round` is round-half-to-even. When `size - crop` is odd "
    "the two can differ by one pixel: e.g. `astronaut_small` at 98 px is resized to 125x98 and HF starts the crop at "
    "x=13, open_clip at x=14 (checked: open_clip's tensor equals HF's shifted by one column). At 224 px no image "
    "here hits that case.")


def make_pixels(out: str, imgs: list[dict]) -> dict:
    from PIL import Image
    from safetensors.numpy import save_file

    tensors = {}
    procs = {s: image_processor(s) for s in (224, 32, 98)}
    for info in imgs:
        with Image.open(info["path"]) as im:
            im.load()
            for s, proc in procs.items():
                pv = proc(images=im, return_tensors="np")["pixel_values"]
                assert pv.shape == (1, 3, s, s) and pv.dtype == np.float32, (pv.shape, pv.dtype)
                tensors[f"{info['stem']}.{s}"] = np.ascontiguousarray(pv[0])
    # HF (transformers 5) composites transparent images onto white; OpenAI/open_clip drop alpha.
    with Image.open(next(i for i in imgs if i["stem"] == "rocket_rgba")["path"]) as im:
        pv_drop = procs[224](images=im.convert("RGB"), return_tensors="np")["pixel_values"][0]
        differs = not np.array_equal(pv_drop, tensors["rocket_rgba.224"])
        NOTES["images"].append(
            "RGBA (and any image with a `transparency` entry, e.g. P or L with tRNS): the transformers "
            f"{__import__('transformers').__version__} processor's `convert_to_rgb` does "
            "`Image.alpha_composite(white, im.convert(\"RGBA\")).convert(\"RGB\")` - it composites onto an opaque "
            "**white** background. OpenAI CLIP / open_clip just call `im.convert(\"RGB\")`, which **drops** alpha and "
            "keeps the stored colour of transparent pixels. `rocket_rgba.224` follows HF (white composite); "
            f"the drop-alpha result {'differs' if differs else 'does not differ'} from it.")
    # I;16 -> RGB in the processor is PIL's clamp to 0..255
    with Image.open(next(i for i in imgs if i["stem"] == "camera_16bit")["path"]) as im:
        clamped = Image.fromarray(np.minimum(np.asarray(im), 255).astype(np.uint8), mode="L")
        for s, proc in procs.items():
            pv = proc(images=clamped, return_tensors="np")["pixel_values"][0]
            assert np.array_equal(pv, tensors[f"camera_16bit.{s}"]), s
    # document the known open_clip differences (crop rounding)
    from open_clip.transform import image_transform
    with Image.open(next(i for i in imgs if i["stem"] == "astronaut_small")["path"]) as im:
        oc = image_transform(98, is_train=False)(im).numpy()
        hf = tensors["astronaut_small.98"]
        assert np.array_equal(oc[:, :, :-1], hf[:, :, 1:]) and not np.array_equal(oc, hf)
    # Stored as f16 to keep the fixtures small: |f16 - f32| <= 0.002 here, far inside the 0.02 pixel tolerance.
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, os.path.join(out, "pixels.safetensors"))
    os.chmod(os.path.join(out, "pixels.safetensors"), 0o644)
    return tensors


# =============================================================================================
# models + activations
# =============================================================================================
ACT_TEXTS = [
    "a photo of a cat",
    "",
    "A black-and-white photograph of two dogs playing fetch on a snowy beach, taken in the 1970s.",
    LONG_PARAGRAPHS[0],  # > 77 tokens -> truncated, EOT at position 76
]


def layer_out(o):
    return o[0] if isinstance(o, tuple) else o


@torch.no_grad()
def compute_activations(model, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict:
    acts: dict[str, torch.Tensor] = {}
    hooks = []

    def grab(name):
        def fn(_mod, _inp, outp):
            acts[name] = layer_out(outp).detach().clone()
        return fn

    vm, tm = model.vision_model, model.text_model
    hooks.append(vm.embeddings.register_forward_hook(grab("vision.embeddings")))
    hooks.append(vm.pre_layrnorm.register_forward_hook(grab("vision.pre_ln")))
    for i, layer in enumerate(vm.encoder.layers):
        hooks.append(layer.register_forward_hook(grab(f"vision.layer.{i}")))
    hooks.append(vm.post_layernorm.register_forward_hook(grab("vision.pooled")))
    hooks.append(model.visual_projection.register_forward_hook(grab("vision.embeds")))
    hooks.append(tm.embeddings.register_forward_hook(grab("text.embeddings")))
    for i, layer in enumerate(tm.encoder.layers):
        hooks.append(layer.register_forward_hook(grab(f"text.layer.{i}")))
    hooks.append(tm.final_layer_norm.register_forward_hook(grab("text.final_ln")))
    hooks.append(model.text_projection.register_forward_hook(grab("text.embeds")))

    img_out = model.get_image_features(pixel_values=pixel_values)
    txt_out = model.get_text_features(input_ids=input_ids)
    for h in hooks:
        h.remove()

    img_feat = img_out if torch.is_tensor(img_out) else img_out.pooler_output
    txt_feat = txt_out if torch.is_tensor(txt_out) else txt_out.pooler_output
    eos = (input_ids == mh.EOT_ID).int().argmax(dim=-1)
    acts["text.pooled"] = acts["text.final_ln"][torch.arange(input_ids.shape[0]), eos].clone()

    # --- checks: names mean what the README says
    B = pixel_values.shape[0]
    assert torch.equal(acts["vision.embeds"], img_feat)
    assert torch.equal(acts["text.embeds"], txt_feat)
    assert torch.allclose(model.text_projection(acts["text.pooled"]), txt_feat, atol=0, rtol=0)
    tmo = tm(input_ids=input_ids)
    assert torch.equal(tmo.pooler_output, acts["text.pooled"])
    assert torch.equal(tmo.last_hidden_state, acts["text.final_ln"])
    vmo = vm(pixel_values=pixel_values, output_hidden_states=True)
    assert torch.equal(vmo.pooler_output, acts["vision.pooled"])
    nl = len(vm.encoder.layers)
    assert torch.equal(vmo.hidden_states[0], acts["vision.pre_ln"]), "hidden_states[0] should be after pre_layrnorm"
    for i in range(nl):
        assert torch.equal(vmo.hidden_states[i + 1], acts[f"vision.layer.{i}"])
    assert torch.allclose(vm.post_layernorm(acts[f"vision.layer.{nl - 1}"][:, 0]), acts["vision.pooled"])
    assert acts["vision.embeddings"].shape[0] == B
    # padding mask changes nothing at/before EOT (causal attention); pooled output identical
    am = torch.ones_like(input_ids)
    for b in range(input_ids.shape[0]):
        am[b, eos[b] + 1:] = 0
    tmo_m = tm(input_ids=input_ids, attention_mask=am)
    assert torch.allclose(tmo_m.pooler_output, acts["text.pooled"], atol=1e-5)
    # CLIPModel.forward normalises and scales
    full = model(input_ids=input_ids, pixel_values=pixel_values)
    ie = img_feat / img_feat.norm(dim=-1, keepdim=True)
    te = txt_feat / txt_feat.norm(dim=-1, keepdim=True)
    assert torch.allclose(full.logits_per_image, model.logit_scale.exp() * ie @ te.T, atol=1e-4)

    acts["logit_scale"] = model.logit_scale.detach().clone().reshape(())
    return acts


def make_model_fixtures(out: str, name: str, pixels: dict, imgs: list[dict], seed: int,
                        tokenizer_copies: bool = False) -> dict:
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPTokenizerFast

    d = os.path.join(out, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    ref_model, cfg = mh.write_model_dir(d, name, seed=seed)
    if not tokenizer_copies:
        # one copy of the (1.7 MB) tokenizer: the model dirs link to ../tokenizer.json
        os.remove(os.path.join(d, "tokenizer.json"))
        os.symlink(os.path.join("..", "tokenizer.json"), os.path.join(d, "tokenizer.json"))

    # reload from disk in float32: for `odd` these are the f16-rounded weights, upcast
    model = CLIPModel.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    dt = mh.DTYPES[mh.PRESETS[name]["dtype"]]
    ref_sd = ref_model.state_dict()
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, ref_sd[k].to(dt).to(torch.float32)), k

    size = cfg.vision_config.image_size
    pv = torch.from_numpy(np.stack([pixels[f"{i['stem']}.{size}"] for i in imgs[:3]]))
    tok = CLIPTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"))
    ids = tok(ACT_TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    ids = ids.to(torch.int64)
    lens = [(row == mh.EOT_ID).int().argmax().item() + 1 for row in ids]
    assert len(set(lens)) == len(lens), lens

    torch.manual_seed(seed)
    acts = compute_activations(model, pv, ids)
    tensors = {"input.pixel_values": pv.float().contiguous(), "input.input_ids": ids.contiguous()}
    for k, v in acts.items():
        tensors[k] = v.to(torch.float32).contiguous()
    save_file(tensors, os.path.join(d, "activations.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(d, "activations.safetensors"), 0o644)
    return dict(cfg=cfg, lens=lens, shapes={k: tuple(v.shape) for k, v in tensors.items()},
                dtypes={k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()})


# =============================================================================================
# README
# =============================================================================================
def versions() -> dict:
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "tokenizers", "open_clip_torch", "ftfy", "safetensors", "numpy",
                "pillow", "scikit-image"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_readme(out: str, tokinfo: dict, imgs: list[dict], pixels: dict, models: dict, oc_rows: list,
                 models_copies: bool = False):
    v = versions()
    L = []
    a = L.append
    a("# clipforge test fixtures\n")
    a("Generated by `python scripts/make_fixtures.py tests/fixtures` (random weights and corpus are seeded; "
      "do not edit by hand). The model directories come from `scripts/make_hf_model.py` (imported).\n")
    a("Versions used:\n")
    for k, val in v.items():
        a(f"- {k} {val}")
    a("")
    a("## Files\n")
    a("| file | what |\n|---|---|")
    a("| `tokenizer.json` | OpenAI CLIP BPE (49408 tokens, SOT 49406, EOT 49407) for HF `tokenizers`, "
      "built from open_clip's `bpe_simple_vocab_16e6.txt.gz`; same pipeline as the hub's `openai/clip-vit-*` "
      "tokenizer.json (NFC, `\\s+`->space, lowercase, CLIP split regex, ByteLevel without regex, "
      "RobertaProcessing SOT/EOT) |")
    a(f"| `tokens.json` | `texts` ({tokinfo['n_texts']} strings), `ids_77`, `ids_248`: ids from "
      "`CLIPTokenizerFast(tokenizer_file=tokenizer.json)(text, truncation=True, max_length=77 or 248)`, "
      f"no padding (each list has its own length; starts with 49406, ends with 49407). {tokinfo['n77']} texts "
      f"are longer than 77 tokens, {tokinfo['n248']} longer than 248; truncation keeps SOT + the first "
      "max_length-2 tokens + EOT, exactly like OpenAI `clip.tokenize(truncate=True)`. |")
    a("| `images/*.png` | real photos from `skimage.data` (see below) |")
    a("| `pixels.safetensors` | `{stem}.224`, `{stem}.32`, `{stem}.98`: f16 [3,S,S], output of the slow PIL-based HF "
      "CLIP image processor (`CLIPImageProcessorPil` in transformers 5; `CLIPImageProcessor` is the torchvision "
      "one there) with shortest_edge S, crop S x S, bicubic, rescale 1/255, OpenAI mean/std |")
    a("| `formats/`, `pixels_u8.safetensors` | made by `scripts/make_format_fixtures.py` (run after this script): "
      "small images in every format clipforge reads (BMP, GIF, TIFF, WebP, JPEG variants) and the exact uint8 "
      "references (Pillow decode, Pillow resize, HF resize + crop, HF normalisation of every level); see "
      "`formats/README.md` |")
    for name, m in models.items():
        cfg = m["cfg"]
        vc, tc = cfg.vision_config, cfg.text_config
        a(f"| `{name}/` | random-weight HF CLIP model: vision {vc.hidden_size} wide, {vc.num_hidden_layers} layers, "
          f"{vc.num_attention_heads} heads (head dim {vc.hidden_size // vc.num_attention_heads}), mlp "
          f"{vc.intermediate_size}, image {vc.image_size}, patch {vc.patch_size}; text {tc.hidden_size} wide, "
          f"{tc.num_hidden_layers} layers, {tc.num_attention_heads} heads (head dim "
          f"{tc.hidden_size // tc.num_attention_heads}), mlp {tc.intermediate_size}, vocab {tc.vocab_size}, "
          f"{tc.max_position_embeddings} positions; projection {cfg.projection_dim}; quick_gelu, eps 1e-5, "
          f"eos/pad 49407, bos 49406. Weights: "
          + ("f32, single `model.safetensors`" if name == "tiny" else
             "**f16**, 2 shards `model-0000{1,2}-of-00002.safetensors` + `model.safetensors.index.json`")
          + ". Also `config.json`, `preprocessor_config.json`, `tokenizer_config.json`, and `tokenizer.json` "
            + ("(a copy of `../tokenizer.json`). |" if models_copies else
               "(a relative symlink to `../tokenizer.json`; `--tokenizer-copies` writes real copies). |"))
        a(f"| `{name}/activations.safetensors` | reference activations, see below |")
    a("")
    a("## Activations (`tiny/`, `odd/`)\n")
    a("The model is loaded with `CLIPModel.from_pretrained(dir, dtype=torch.float32, attn_implementation=\"eager\")`. "
      "For `odd` the f16 weights on disk are upcast to f32, so the reference is exact for the f16-rounded weights. "
      "Inputs: the first 3 images (`chelsea`, `coffee_portrait`, `astronaut_small`) preprocessed with the "
      "model's own size (tiny: the `.32` pixels, odd: the `.98` pixels), and 4 texts of different lengths "
      f"(token counts incl. SOT/EOT {models['tiny']['lens']}: a short caption, the empty string, a sentence, "
      "and a paragraph truncated to 77) tokenized with `padding=\"max_length\", max_length=77, truncation=True` "
      "(pad id 49407). **No attention_mask is passed** (like OpenAI CLIP): only the causal mask is applied, so "
      "the activations at padding positions are those of a causal model attending over the pad tokens. "
      "Positions up to the EOT are unaffected either way (checked).\n")
    a("All tensors are f32 except `input.input_ids` (int64). B=3 images / 4 texts, T = vision tokens "
      "(1 + grid^2), W = width, D = projection dim.\n")
    a("| key | meaning |\n|---|---|")
    a("| `input.pixel_values` | [3,3,H,W] model input |")
    a("| `input.input_ids` | [4,77] int64, padded with 49407 |")
    a("| `vision.embeddings` | [B,T,W] output of `vision_model.embeddings`: [CLS; patch conv] + position embedding, "
      "**before** `pre_layrnorm` |")
    a("| `vision.pre_ln` | [B,T,W] after `pre_layrnorm` (= HF `hidden_states[0]` of the vision model) |")
    a("| `vision.layer.{i}` | [B,T,W] output of encoder layer i (= HF `hidden_states[i+1]`) |")
    a("| `vision.pooled` | [B,W] `post_layernorm(last_layer[:, 0])` (CLS) = `vision_model(...).pooler_output` |")
    a("| `vision.embeds` | [B,D] `visual_projection(vision.pooled)` = `get_image_features`, NOT normalised |")
    a("| `text.embeddings` | [B,77,W] token + position embedding |")
    a("| `text.layer.{i}` | [B,77,W] output of encoder layer i (causal mask) |")
    a("| `text.final_ln` | [B,77,W] `final_layer_norm` of the last layer (all positions) |")
    a("| `text.pooled` | [B,W] `text.final_ln` at the **first** position whose id is 49407 (EOT) |")
    a("| `text.embeds` | [B,D] `text_projection(text.pooled)` = `get_text_features`, NOT normalised |")
    a("| `logit_scale` | [] (scalar) raw parameter, ln(1/0.07)=2.6592; CLIP multiplies cosine logits by exp(logit_scale) |")
    a("")
    for name, m in models.items():
        a(f"`{name}/activations.safetensors` shapes:\n")
        a("```")
        for k, s in m["shapes"].items():
            a(f"{k:22s} {m['dtypes'][k]:8s} {list(s)}")
        a("```\n")
    a("## Images\n")
    a("| file | PIL mode on open | size (w x h) | notes |\n|---|---|---|---|")
    for i in imgs:
        a(f"| `images/{i['stem']}.png` | `{i['mode']}` | {i['size'][0]} x {i['size'][1]} | {i['desc']} |")
    a("")
    a("`pixels.safetensors` keys (all stored f16):\n")
    a("```")
    for k, t in pixels.items():
        a(f"{k:26s} {list(t.shape)}")
    a("```\n")
    a("### What PIL / the HF processor do per mode\n")
    a("The processor first converts to RGB (HF `convert_to_rgb`), then resizes the **8-bit** RGB image with "
      "PIL `Image.resize(..., BICUBIC)` so the short side is S (long side `int(S * long / short)`, truncated), "
      "center-crops S x S (top = (h - S) // 2, left = (w - S) // 2), then (x/255 - mean)/std in f32.\n")
    a("- `RGB`: unchanged.")
    a("- `L` (8-bit gray): `convert(\"RGB\")` replicates the value into R, G and B (checked).")
    a("- `P` (palette, no transparency): palette lookup to RGB. With a tRNS entry HF would composite onto white.")
    for n in NOTES["images"]:
        a(f"- {n}")
    a("")
    a("### HF vs OpenAI/open_clip preprocessing\n")
    a("open_clip's `image_transform(S, is_train=False)` (= OpenAI CLIP `_transform`: torchvision `Resize(S, BICUBIC)`, "
      "`CenterCrop(S)`, convert to RGB, `ToTensor`, `Normalize`) compared with the HF pixels above, max abs "
      "difference in normalised units:\n")
    stems = [i["stem"] for i in imgs]
    a("| image | 224 | 32 | 98 |\n|---|---|---|---|")
    tab = {(st, s): d for st, s, d in oc_rows}
    for st in stems:
        a(f"| `{st}` | " + " | ".join(f"{tab[(st, s)]:.4g}" for s in (224, 32, 98)) + " |")
    a("")
    a("- For RGB (and L, and 16-bit RGB, which PIL hands over as 8-bit RGB) the two agree exactly except for:")
    a(f"- {CROP_NOTE}")
    a("- OpenAI/open_clip resize **before** converting to RGB. PIL resizes mode `P` with NEAREST whatever filter is "
      "asked for, resizes `I;16` in 16-bit before the clamp, and resizes RGBA with its alpha; so for P, I;16 and "
      "RGBA images the two pipelines differ. Converting to RGB first (`im.convert(\"RGB\")`) and then applying "
      "open_clip's transform reproduces HF exactly for P and I;16; RGBA still differs (drop alpha vs white composite).")
    a("")
    a("## Tokenizer notes\n")
    un, ch = tokinfo["unchanged_dis"], tokinfo["changed_dis"]
    a(f"Compared on all {tokinfo['n_texts']} texts, untruncated: HF (`tokenizer.json`) vs open_clip's "
      "`SimpleTokenizer` (the OpenAI tokenizer: `ftfy.fix_text`, `html.unescape` twice, strip, whitespace "
      f"collapse, lowercase). Of the {tokinfo['n_unchanged']} texts that ftfy leaves unchanged, "
      f"**{len(un)}** tokenize differently; of the {tokinfo['n_texts'] - tokinfo['n_unchanged']} texts ftfy "
      f"changes, {len(ch)} differ.\n")
    for n in NOTES["tokenizer"]:
        a(f"- {n}")
    a("")
    a("Differing texts where ftfy changes nothing:\n")
    a("```")
    for t, f, oc in un:
        a(f"{t!r}\n   hf       {f}\n   open_clip {oc}")
    a("```\n")
    a("Differing texts that ftfy changes (expected; `tokenizer.json` has no ftfy):\n")
    a("```")
    for t, f, oc in ch:
        a(f"{t!r}  ->  ftfy: {__import__('ftfy').fix_text(t)!r}")
    a("```\n")
    if tokinfo["fp_diff"]:
        a(f"`CLIPTokenizer.from_pretrained(dir)` (transformers {v['transformers']}) rebuilds its pipeline from "
          f"vocab/merges and differs from the tokenizer.json pipeline on {len(tokinfo['fp_diff'])} texts: "
          + ", ".join(repr(t[:40]) for t in tokinfo["fp_diff"][:10]))
    else:
        a(f"`CLIPTokenizer.from_pretrained(dir)` (transformers {v['transformers']}) ignores the tokenizer.json "
          "pre-tokenizer and rebuilds its own (ByteLevel with `use_regex=True`); on this corpus it gives the same "
          "ids as `CLIPTokenizerFast(tokenizer_file=...)` and the raw `tokenizers` pipeline.")
    a("")
    a("## Regenerating\n")
    a("```\npip install torch transformers open_clip_torch tokenizers safetensors numpy pillow scikit-image ftfy\n"
      "python scripts/make_fixtures.py tests/fixtures\ndu -sh tests/fixtures\n```")
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(L) + "\n")


# =============================================================================================
def main(argv=None):
    ap = argparse.ArgumentParser(description="generate clipforge test fixtures")
    ap.add_argument("out", nargs="?", default="tests/fixtures")
    ap.add_argument("--tokenizer-copies", action="store_true",
                    help="write real copies of tokenizer.json into tiny/ and odd/ instead of relative symlinks "
                         "(+3.4 MB)")
    args = ap.parse_args(argv)
    out = args.out
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(SEED)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    texts = build_corpus()
    tokinfo = make_tokenizer_fixtures(out, texts)
    imgs = make_images(out)
    pixels = make_pixels(out, imgs)
    oc_rows = compare_with_open_clip(imgs, pixels)
    models = {}
    for i, name in enumerate(("tiny", "odd")):
        models[name] = make_model_fixtures(out, name, pixels, imgs, seed=SEED + 100 * i,
                                           tokenizer_copies=args.tokenizer_copies)
        print(f"[models] {name}: text lengths {models[name]['lens']}")
    write_readme(out, tokinfo, imgs, pixels, models, oc_rows, models_copies=args.tokenizer_copies)
    print(f"[done] wrote fixtures to {out}")


if __name__ == "__main__":
    main()

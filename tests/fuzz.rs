//! Fuzz targets on stable Rust (issue 15, point 4): a small deterministic mutation fuzzer over
//! valid seed inputs for every parser clipforge runs on user files. Mutations: bit flips, byte
//! sets, inserts and deletes, truncation, chunks spliced from another seed or duplicated,
//! "interesting" integers (0, −1, 2^31, 2^60, …) written over length fields, and for JSON texts
//! numbers replaced by extreme ones. Each input goes through its parser under `catch_unwind`; a
//! panic fails the test, naming the target, seed and iteration, and the input is written to
//! `$CARGO_TARGET_TMPDIR/fuzz-crashes/<target>/`. A counting allocator flags any single
//! allocation above 512 MiB (a size taken from the input, unchecked) and aborts, naming the
//! iteration, before one above 16 GiB.
//!
//! `CLIPFORGE_FUZZ_ITERS` sets the iterations of every target (the default keeps this file
//! under a minute in release on two cores); `CLIPFORGE_FUZZ_SEED` the base seed;
//! `CLIPFORGE_FUZZ_ONLY=target:iteration` replays one input. Every crash found is kept in
//! tests/fixtures/fuzz/<target>/ and replayed by `regressions_replay`.
use clipforge::model::synthetic::Rng;
use serde_json::{json, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};

#[path = "fuzz_targets/mod.rs"]
mod fuzz_targets;
use fuzz_targets::{targets, Kind, Target};

// ---- allocation bound -------------------------------------------------------------------

/// The largest single allocation made on a thread while `WATCH` is set for it.
struct Counting;
const REPORT: usize = 512 << 20;
const REFUSE: usize = 16 << 30;
thread_local! {
    static WATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static BIGGEST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note(n);
        // SAFETY: forwarded as is.
        unsafe { System.realloc(p, l, n) }
    }
}

fn note(size: usize) {
    if size > REPORT && WATCH.try_with(|w| w.get()).unwrap_or(false) {
        let _ = BIGGEST.try_with(|b| b.set(b.get().max(size)));
        if size > REFUSE {
            let msg = format!("fuzz: an allocation of {size} bytes (from a lying size field); the last 'fuzz: running' line names the input\n");
            // SAFETY: writes a buffer to stderr.
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---- mutations ---------------------------------------------------------------------------

const INTERESTING: [u64; 14] = [0, 1, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 40, 1 << 60, u64::MAX];
const NUMBERS: [&str; 12] =
    ["0", "-1", "1e308", "-1e308", "4294967296", "18446744073709551615", "1152921504606846976", "99999999999999999999999", "0.5", "NaN", "1e-400", "65536"];

fn below(r: &mut Rng, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (r.next_u64() % n as u64) as usize
    }
}

/// A node of `v` chosen by a random walk from the root.
fn pick<'a>(r: &mut Rng, v: &'a mut Value) -> &'a mut Value {
    let n = match &*v {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    };
    if n == 0 || below(r, 4) == 0 {
        return v;
    }
    let i = below(r, n);
    match v {
        Value::Array(a) => pick(r, &mut a[i]),
        Value::Object(o) => pick(r, o.values_mut().nth(i).expect("i < len")),
        _ => unreachable!(),
    }
}

/// A value to put anywhere: the extremes a parser has to survive.
fn odd_value(r: &mut Rng) -> Value {
    match below(r, 16) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(0),
        3 => json!(-1),
        4 => json!(1e308),
        5 => json!(u64::MAX),
        6 => json!(i64::MIN),
        7 => json!(1u64 << 60),
        8 => json!(4294967296u64),
        9 => json!(""),
        10 => json!("x".repeat(5000)),
        11 => json!("../../\u{0}\u{feff}é"),
        12 => json!([]),
        13 => json!({}),
        14 => json!(0.5),
        _ => json!([[[[1]]], {"a": [null]}]),
    }
}

/// One structural mutation of a JSON value (the result stays JSON).
fn mutate_value(r: &mut Rng, root: &mut Value) {
    let donor = pick(r, &mut root.clone()).clone();
    let node = pick(r, root);
    match (below(r, 5), node) {
        (0, Value::Object(o)) if !o.is_empty() => {
            let k = o.keys().nth(below(r, o.len())).cloned().expect("non-empty");
            o.remove(&k);
        }
        (1, Value::Array(a)) if !a.is_empty() => {
            let i = below(r, a.len());
            if below(r, 2) == 0 {
                a.remove(i);
            } else {
                let x = a[i].clone();
                a.insert(i, x);
            }
        }
        (2, node) => *node = donor,
        (3, node) if node.is_number() => {
            let f = node.as_f64().unwrap_or(0.0);
            *node = json!(f * -1e6);
        }
        (_, node) => *node = odd_value(r),
    }
}

/// `b` as JSON mutated structurally (a whole value, or one line of JSONL) → None if not JSON.
fn mutate_json(r: &mut Rng, b: &[u8]) -> Option<Vec<u8>> {
    if let Ok(mut v) = serde_json::from_slice::<Value>(b) {
        mutate_value(r, &mut v);
        return serde_json::to_vec(&v).ok();
    }
    let text = std::str::from_utf8(b).ok()?;
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let i = below(r, lines.len());
    let mut v: Value = serde_json::from_str(lines.get(i)?).ok()?;
    mutate_value(r, &mut v);
    lines[i] = v.to_string();
    Some(lines.join("\n").into_bytes())
}

/// A safetensors file with its header JSON mutated structurally and its length field fixed.
fn mutate_safetensors_header(r: &mut Rng, b: &[u8]) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let header = b.get(8..8usize.checked_add(n)?)?;
    let h = mutate_json(r, header)?;
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&b[8 + n..]);
    Some(out)
}

/// One mutated input from the seeds: a few mutations of a random seed; half of the inputs of a
/// JSON target (and of the safetensors header) are mutated as JSON trees instead of bytes.
pub fn mutate(r: &mut Rng, seeds: &[Vec<u8>], kind: Kind) -> Vec<u8> {
    let mut b = seeds[below(r, seeds.len())].clone();
    let rounds = [1, 1, 1, 2, 2, 3, 4][below(r, 7)];
    if kind != Kind::Bytes && below(r, 2) == 0 {
        for _ in 0..rounds {
            let m = if kind == Kind::Json { mutate_json(r, &b) } else { mutate_safetensors_header(r, &b) };
            if let Some(m) = m {
                b = m;
            }
        }
        return b;
    }
    let text = kind == Kind::Json;
    for _ in 0..rounds {
        let at = below(r, b.len() + 1);
        match below(r, if text { 10 } else { 9 }) {
            0 if !b.is_empty() => {
                let i = below(r, b.len());
                b[i] ^= 1 << below(r, 8);
            }
            1 if !b.is_empty() => {
                let i = below(r, b.len());
                b[i] = r.next_u64() as u8;
            }
            2 => {
                let n = 1 + below(r, 16);
                let ins: Vec<u8> = (0..n).map(|_| r.next_u64() as u8).collect();
                b.splice(at..at, ins);
            }
            3 => {
                let n = below(r, 64).min(b.len() - at);
                b.drain(at..at + n);
            }
            4 => b.truncate(at),
            5 => {
                // a chunk of another seed (or this one) spliced over this one
                let o = &seeds[below(r, seeds.len())];
                let s = below(r, o.len());
                let n = below(r, 256).min(o.len() - s);
                let end = (at + below(r, 256)).min(b.len());
                b.splice(at..end, o[s..s + n].iter().copied());
            }
            6 => {
                // a chunk duplicated
                let s = below(r, b.len());
                let n = below(r, 512).min(b.len() - s);
                let chunk = b[s..s + n].to_vec();
                b.splice(at..at, chunk);
            }
            7 | 8 => {
                // an interesting integer over what may be a length field
                let v = INTERESTING[below(r, INTERESTING.len())];
                let w = [1, 2, 4, 8][below(r, 4)];
                let bytes = if below(r, 2) == 0 { v.to_le_bytes() } else { v.to_be_bytes() };
                let bytes = if below(r, 2) == 0 { &bytes[..w] } else { &bytes[8 - w..] };
                let end = (at + w).min(b.len());
                b.splice(at..end, bytes.iter().copied());
            }
            _ => {
                // text: a number replaced by an extreme one
                let digits: Vec<usize> = b.iter().enumerate().filter(|(_, c)| c.is_ascii_digit()).map(|(i, _)| i).collect();
                if let Some(&i) = digits.get(below(r, digits.len())) {
                    let mut j = i;
                    while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.' || b[j] == b'e' || b[j] == b'-') {
                        j += 1;
                    }
                    let n = NUMBERS[below(r, NUMBERS.len())];
                    b.splice(i..j, n.bytes());
                }
            }
        }
    }
    b
}

// ---- the harness -------------------------------------------------------------------------

fn env_usize(k: &str) -> Option<usize> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

fn base_seed() -> u64 {
    std::env::var("CLIPFORGE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_c11f)
}

fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The input of iteration `i` of target `t` (each iteration has its own generator, so that one
/// can be replayed alone).
fn input(t: &Target, seeds: &[Vec<u8>], seed: u64, i: usize) -> Vec<u8> {
    let mut r = Rng::new(seed ^ name_hash(t.name) ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    mutate(&mut r, seeds, t.kind)
}

/// Runs `data` through target `t` under catch_unwind and the allocation watch → what went wrong.
fn one(t: &Target, data: &[u8]) -> Result<bool, String> {
    BIGGEST.with(|b| b.set(0));
    WATCH.with(|w| w.set(true));
    let r = std::panic::catch_unwind(|| (t.run)(data));
    WATCH.with(|w| w.set(false));
    let big = BIGGEST.with(|b| b.replace(0));
    match r {
        Err(p) => {
            Err(format!("panic: {}", p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()))
        }
        Ok(_) if big > REPORT => Err(format!("allocated {big} bytes at once")),
        Ok(accepted) => Ok(accepted),
    }
}

fn crash_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes").join(target)
}

/// Fuzzes target `name`: `iters` iterations (CLIPFORGE_FUZZ_ITERS overrides) → panics if any
/// input crashed it.
fn fuzz(name: &str, iters: usize) {
    let all = targets();
    let t = all.iter().find(|t| t.name == name).expect("target");
    let seeds = (t.seeds)();
    let seed = base_seed();
    for (k, s) in seeds.iter().enumerate() {
        assert!(one(t, s).is_ok(), "{name}: seed {k} itself crashes");
    }
    let only = std::env::var("CLIPFORGE_FUZZ_ONLY").ok();
    let range: Vec<usize> = match only.as_deref().and_then(|o| o.split_once(':')) {
        Some((n, i)) if n == name => vec![i.parse().expect("CLIPFORGE_FUZZ_ONLY=target:iteration")],
        Some(_) => return,
        None => (0..env_usize("CLIPFORGE_FUZZ_ITERS").unwrap_or(iters)).collect(),
    };
    let start = std::time::Instant::now();
    let (mut crashes, mut accepted) = (vec![], 0);
    for &i in &range {
        let data = input(t, &seeds, seed, i);
        if i % 256 == 0 || only.is_some() {
            eprintln!("fuzz: running {name} iteration {i} (seed {seed})");
        }
        let r = one(t, &data);
        accepted += usize::from(r == Ok(true));
        if let Err(what) = r {
            let dir = crash_dir(name);
            std::fs::create_dir_all(&dir).unwrap();
            let f = dir.join(format!("{seed}-{i}"));
            std::fs::write(&f, &data).unwrap();
            eprintln!("fuzz: {name}: {what}; replay with CLIPFORGE_FUZZ_SEED={seed} CLIPFORGE_FUZZ_ONLY={name}:{i}; input written to {}", f.display());
            crashes.push(format!("{i}: {what}"));
        }
    }
    fuzz_targets::clean_scratch();
    eprintln!(
        "fuzz: {name}: {} iterations in {:.1} s ({accepted} accepted by the parser), {} crash(es)",
        range.len(),
        start.elapsed().as_secs_f64(),
        crashes.len()
    );
    assert!(crashes.is_empty(), "{name}: {} crashing input(s) (seed {seed}): {crashes:?}", crashes.len());
}

#[test]
fn regressions_replay() {
    // every input kept in tests/fixtures/fuzz/<target>/ goes through its target without a crash
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let mut n = 0;
    for t in targets() {
        let Ok(rd) = std::fs::read_dir(root.join(t.name)) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            let data = std::fs::read(&p).unwrap();
            assert!(one(&t, &data).is_ok(), "{}", p.display());
            n += 1;
        }
    }
    fuzz_targets::clean_scratch();
    eprintln!("replayed {n} kept inputs");
}

#[test]
fn the_allocation_watch_sees_a_lying_size() {
    // a target that trusts a 1 GiB length field (reserved, never touched) is reported
    let t = Target { name: "lying", kind: Kind::Bytes, seeds: Vec::new, run: |b| Vec::<u8>::with_capacity((b[0] as usize) << 30).capacity() > 0 };
    assert_eq!(one(&t, &[0]), Ok(false)); // with_capacity(0) has capacity 0
    let e = one(&t, &[1]).unwrap_err();
    assert!(e.contains("allocated 1073741824 bytes at once"), "{e}");
    // and a panic is caught and reported
    let p = Target { name: "panics", kind: Kind::Bytes, seeds: Vec::new, run: |b| b[3] == 0 };
    assert!(one(&p, &[1]).unwrap_err().contains("index out of bounds"));
}

#[test]
fn mutations_are_deterministic() {
    let seeds = vec![b"{\"a\": 12, \"b\": [1, 2.5]}".to_vec(), vec![0u8; 40]];
    let a: Vec<Vec<u8>> = (0..50).map(|i| mutate(&mut Rng::new(i), &seeds, Kind::Json)).collect();
    let b: Vec<Vec<u8>> = (0..50).map(|i| mutate(&mut Rng::new(i), &seeds, Kind::Json)).collect();
    assert_eq!(a, b);
    assert!(a.iter().filter(|m| !seeds.contains(m)).count() > 25);
}

macro_rules! fuzz_test {
    ($name:ident, $iters:expr) => {
        #[test]
        fn $name() {
            fuzz(stringify!($name), $iters);
        }
    };
}

fuzz_test!(safetensors, 100000);
fuzz_test!(config_json, 150000);
fuzz_test!(preprocessor_config, 150000);
fuzz_test!(tokenizer_json, 10000);
fuzz_test!(jsonl, 150000);
fuzz_test!(images, 150000);
fuzz_test!(pt, 100000);
fuzz_test!(pickle, 150000);
fuzz_test!(tar_index, 150000);
fuzz_test!(npy, 150000);

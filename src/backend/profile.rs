//! Where the CPU backend's time goes: the wall time of each [`super::Ops`] call of
//! [`super::cpu::Cpu`], summed per operation and shape, with the FLOPs it computes — what
//! `clipforge bench --profile` prints (and a library user can read around any forward or
//! training step: [`start`], run, [`stop`]).
//!
//! Off by default: a call then costs one relaxed atomic load. On, each operation reads the clock
//! twice and adds itself to a table under a lock (well under a microsecond, against the
//! milliseconds of a tower's operations). Only the outermost operation of a thread is counted: an
//! operation made of others (a LayerNorm with its residual add, the pooled attention with its
//! projections) is one row. The CPU backend's operations are synchronous, so their wall time is
//! their cost; a CUDA device's launches are not (its per-kernel picture is `bench --dry-run`).
use super::Seqs;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// One row of the table: an operation at one shape.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// The [`super::Ops`] method (`linear_add`, `attention`, …).
    pub op: &'static str,
    /// Its shape in words: `m×k→n` for a GEMM, `B×T×H·d` for attention, `rows×width` otherwise.
    pub shape: String,
    pub calls: u64,
    /// Wall time of all its calls.
    pub seconds: f64,
    /// FLOPs of all its calls (0 where it moves memory only): 2·m·k·n per GEMM (two for a
    /// Linear's backward, dx and dW; three for q, k, v), 4·W per (query, key) pair of an
    /// attention (a causal one's t(t+1)/2 pairs, not t²), 2.5 times that for its backward.
    pub flops: f64,
}

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Vec<OpTime>> = Mutex::new(Vec::new());

thread_local! {
    /// Operations open on this thread (the outermost one is timed).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Starts timing (into an empty table: [`stop`] empties it).
pub fn start() {
    ON.store(true, Ordering::Relaxed);
}

/// Stops timing and takes the table (what was timed since the last `stop`), the most expensive
/// row first.
pub fn stop() -> Vec<OpTime> {
    ON.store(false, Ordering::Relaxed);
    let mut rows = std::mem::take(&mut *table());
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    rows
}

fn table() -> std::sync::MutexGuard<'static, Vec<OpTime>> {
    TABLE.lock().unwrap_or_else(|e| e.into_inner())
}

/// An open operation, recorded when dropped if it is the outermost one of its thread.
pub(crate) struct Span(Option<Timed>);

struct Timed {
    op: &'static str,
    shape: String,
    flops: f64,
    t0: Instant,
}

impl Drop for Span {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        let Some(s) = self.0.take() else { return };
        let dt = s.t0.elapsed().as_secs_f64();
        let mut t = table();
        match t.iter_mut().find(|r| r.op == s.op && r.shape == s.shape) {
            Some(r) => {
                r.calls += 1;
                r.seconds += dt;
                r.flops += s.flops;
            }
            None => t.push(OpTime { op: s.op, shape: s.shape, calls: 1, seconds: dt, flops: s.flops }),
        }
    }
}

/// Times `op` while the returned guard lives, when timing is on and no other operation is open on
/// this thread; `what` (its shape in words and its FLOPs) is asked only then.
pub(crate) fn span(op: &'static str, what: impl FnOnce() -> (String, f64)) -> Option<Span> {
    if !ON.load(Ordering::Relaxed) {
        return None;
    }
    let outer = DEPTH.with(|d| d.replace(d.get() + 1)) == 0;
    Some(Span(outer.then(|| {
        let (shape, flops) = what();
        Timed { op, shape, flops, t0: Instant::now() }
    })))
}

/// A GEMM-shaped operation: x [m, k]·Wᵀ [k, n], `gemms` products of that size.
pub(crate) fn gemm(op: &'static str, m: usize, k: usize, n: usize, gemms: usize) -> Option<Span> {
    span(op, || (format!("{m}×{k}→{n}"), 2.0 * (gemms * m * k * n) as f64))
}

/// An operation over `rows` rows of `w` values that computes no products.
pub(crate) fn rows(op: &'static str, rows: usize, w: usize) -> Option<Span> {
    span(op, || (format!("{rows}×{w}"), 0.0))
}

/// Attention over `seqs` with `heads` heads, `w` wide in all: `passes` times the forward's two
/// products QKᵀ and PV (the backward: 2.5, for the recomputed QKᵀ, dV, dP, dQ and dK).
pub(crate) fn attention(op: &'static str, seqs: &Seqs, heads: usize, w: usize, passes: f64) -> Option<Span> {
    span(op, || {
        let d = w / heads.max(1);
        let (shape, pairs) = match seqs {
            Seqs::Batch { batch, seq, causal } => {
                (format!("{batch}×{seq}×{heads}·{d}{}", if *causal { " causal" } else { "" }), batch * keys_seen(*seq, *causal))
            }
            Seqs::Packed(lens) => (format!("{} packed ({} rows)×{heads}·{d} causal", lens.len(), seqs.rows()), lens.iter().map(|&l| keys_seen(l, true)).sum()),
        };
        (shape, passes * 4.0 * (pairs * w) as f64)
    })
}

/// (query, key) pairs of one sequence of `t` rows: t², or t(t+1)/2 causal.
fn keys_seen(t: usize, causal: bool) -> usize {
    if causal {
        t * (t + 1) / 2
    } else {
        t * t
    }
}

/// An operation over `n` values (a copy, an upload, an add).
pub(crate) fn values(op: &'static str, n: usize) -> Option<Span> {
    span(op, || (format!("{n} values"), 0.0))
}

/// The last block's pooled attention: q for the `r` pooled rows, k and v for all rows, then those
/// rows' attention over their whole sequences — the pooled rows' own work (where a backend
/// computes every row instead, the FLOPs it executed are more).
pub(crate) fn pooled(op: &'static str, seqs: &Seqs, r: usize, heads: usize, w: usize) -> Option<Span> {
    span(op, || {
        let n = seqs.rows();
        let d = w / heads.max(1);
        let keys = match seqs {
            Seqs::Batch { seq, .. } => r * seq,
            Seqs::Packed(_) => n,
        };
        (format!("{r} of {n} rows×{heads}·{d}"), 2.0 * ((r + 2 * n) * w * w) as f64 + 4.0 * (keys * w) as f64)
    })
}

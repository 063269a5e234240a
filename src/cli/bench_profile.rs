//! `clipforge bench --profile`: where the timed batches' (or training steps') time goes on the CPU —
//! the backend's operations ([`clipforge::backend::profile`]) per operation and shape, per batch,
//! with their share of the wall time, their GFLOP/s and that as a share of the run's GEMM
//! ceiling; what no operation covers (the model's own bookkeeping, the loss, AdamW) is one row.
use clipforge::backend::profile::{self, OpTime};
use clipforge::error::{Error, Result};
use serde_json::{json, Value};
use std::time::Instant;

/// Rows below this share of the wall time are summed into one line of the printed table (the
/// JSON keeps every row).
const SMALL: f64 = 0.001;

/// The operations of `runs` calls of `f`, and their wall time in seconds.
pub struct Profile {
    pub ops: Vec<OpTime>,
    pub wall: f64,
    pub runs: usize,
}

/// Runs `f` `runs` times with the CPU backend's operations timed.
pub fn record(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Profile> {
    profile::start();
    let t0 = Instant::now();
    let r = (0..runs).try_for_each(|_| f());
    let wall = t0.elapsed().as_secs_f64();
    let ops = profile::stop();
    r.map(|()| Profile { ops, wall, runs })
}

/// `--profile` is a CPU measurement: an error where the run is not on the CPU.
pub fn check_cpu(device: &str) -> Result<()> {
    if device == "cpu" {
        return Ok(());
    }
    Err(Error::msg(format!(
        "--profile times the CPU backend's operations, and this run is on {device} (whose launches are asynchronous): use --device cpu, or --dry-run for the GPU's per-kernel picture"
    )))
}

impl Profile {
    /// The table as JSON: one object per row, per batch (or step), most expensive first, then the
    /// time between operations; `ceiling` the run's GEMM ceiling in GFLOP/s.
    pub fn to_json(&self, ceiling: f64) -> Value {
        let per = |x: f64| x / self.runs.max(1) as f64;
        let covered: f64 = self.ops.iter().map(|o| o.seconds).sum();
        let mut rows: Vec<Value> = self
            .ops
            .iter()
            .map(|o| {
                let gflops = (o.flops > 0.0).then(|| o.flops / o.seconds / 1e9);
                json!({
                    "op": o.op, "shape": o.shape, "calls_per_batch": per(o.calls as f64),
                    "ms_per_batch": per(o.seconds) * 1e3, "share": o.seconds / self.wall,
                    "gflops": gflops, "share_of_ceiling": gflops.map(|g| g / ceiling).filter(|s| s.is_finite()),
                })
            })
            .collect();
        let between = (self.wall - covered).max(0.0);
        rows.push(json!({ "op": "(between operations)", "shape": "", "calls_per_batch": Value::Null,
            "ms_per_batch": per(between) * 1e3, "share": between / self.wall, "gflops": Value::Null, "share_of_ceiling": Value::Null }));
        json!({ "batches": self.runs, "ms_per_batch": per(self.wall) * 1e3, "ops": rows })
    }

    /// The table in words, under a title line naming `what` (a tower, a training step).
    pub fn print(&self, what: &str, ceiling: f64) {
        let j = self.to_json(ceiling);
        println!();
        println!("{what}: {:.1} ms per batch ({} timed), by CPU backend operation", j["ms_per_batch"].as_f64().unwrap_or(0.0), self.runs);
        println!("  {:<22} {:<34} {:>7} {:>10} {:>7} {:>9} {:>8}", "operation", "shape", "calls", "ms/batch", "share", "GFLOP/s", "ceiling");
        let rows = j["ops"].as_array().cloned().unwrap_or_default();
        let small = |r: &Value| r["share"].as_f64().unwrap_or(0.0) < SMALL && r["op"] != "(between operations)";
        for r in rows.iter().filter(|r| !small(r)) {
            let num = |k: &str, f: &dyn Fn(f64) -> String| r[k].as_f64().map(f).unwrap_or_default();
            println!(
                "  {:<22} {:<34} {:>7} {:>10.2} {:>6.1}% {:>9} {:>8}",
                r["op"].as_str().unwrap_or(""),
                r["shape"].as_str().unwrap_or(""),
                num("calls_per_batch", &|c| if c.fract() == 0.0 { format!("{c}") } else { format!("{c:.1}") }),
                r["ms_per_batch"].as_f64().unwrap_or(0.0),
                100.0 * r["share"].as_f64().unwrap_or(0.0),
                num("gflops", &|g| format!("{g:.1}")),
                num("share_of_ceiling", &|s| format!("{:.0}%", 100.0 * s)),
            );
        }
        let rest: Vec<&Value> = rows.iter().filter(|r| small(r)).collect();
        if !rest.is_empty() {
            let sum = |k: &str| rest.iter().map(|r| r[k].as_f64().unwrap_or(0.0)).sum::<f64>();
            let label = format!("({} more rows, each < {}%)", rest.len(), 100.0 * SMALL);
            println!("  {label:<65} {:>10.2} {:>6.1}%", sum("ms_per_batch"), 100.0 * sum("share"));
        }
    }
}

//! Dry-run reports: the predictions of one phase grouped per kernel (launches, time, share of
//! the step, % of roofline, SM waves), the predicted throughput, and the offenders the tests
//! assert on (launches below one full wave whose work could fill the GPU; GEMMs and attention
//! off the tensor cores).
use super::cost::{Class, Unit};
use super::gpus::Gpu;
use super::record::Log;
use super::roofline::{predict, Pred};
use super::run::Phase;
use crate::error::Result;
use serde_json::{json, Value};
use std::collections::HashMap;

/// One kernel (or GEMM kind, memset, copy direction) summed over its launches.
#[derive(Clone, Debug)]
pub struct KernelRow {
    pub name: String,
    pub launches: usize,
    pub time: f64,
    pub roof: f64,
    pub flops: f64,
    pub bytes: f64,
    /// Smallest blocks / (SMs × blocks per SM) over the launches.
    pub min_waves: f64,
    pub unit: Unit,
    pub class: Class,
    pub regs: u32,
    pub blocks_per_sm: u32,
}

/// A phase's prediction.
pub struct Report {
    pub gpu: &'static Gpu,
    pub phase: String,
    pub items: usize,
    pub per: &'static str,
    pub preds: Vec<Pred>,
    pub rows: Vec<KernelRow>,
    /// Predicted seconds per phase (every operation, one stream, in order).
    pub step: f64,
    /// Of which host ↔ device copies.
    pub copies: f64,
}

impl Report {
    pub fn new(gpu: &'static Gpu, phase: &Phase, log: &Log) -> Result<Report> {
        let preds = predict(gpu, &phase.ops, log)?;
        let mut rows: Vec<KernelRow> = vec![];
        let mut at: HashMap<String, usize> = HashMap::new();
        for p in &preds {
            let i = *at.entry(p.name.clone()).or_insert_with(|| {
                rows.push(KernelRow {
                    name: p.name.clone(),
                    launches: 0,
                    time: 0.0,
                    roof: 0.0,
                    flops: 0.0,
                    bytes: 0.0,
                    min_waves: f64::INFINITY,
                    unit: p.unit,
                    class: p.class,
                    regs: p.regs,
                    blocks_per_sm: p.blocks_per_sm,
                });
                rows.len() - 1
            });
            let r = &mut rows[i];
            r.launches += 1;
            r.time += p.time;
            r.roof += p.roof;
            r.flops += p.flops;
            r.bytes += p.bytes;
            r.min_waves = r.min_waves.min(p.waves);
        }
        rows.sort_by(|a, b| b.time.total_cmp(&a.time));
        let step = preds.iter().map(|p| p.time).sum();
        let copies = preds.iter().filter(|p| p.name.starts_with("copy")).map(|p| p.time).sum();
        Ok(Report { gpu, phase: phase.name.clone(), items: phase.items, per: phase.per, preds, rows, step, copies })
    }

    pub fn throughput(&self) -> f64 {
        self.items as f64 / self.step
    }

    /// Launches below one full wave whose problem could fill the GPU.
    pub fn below_wave(&self) -> Vec<&Pred> {
        self.preds.iter().filter(|p| p.could_fill && p.waves < 1.0).collect()
    }

    /// GEMMs and attention that are not on the bf16/f16 tensor cores.
    pub fn off_tensor_cores(&self) -> Vec<&Pred> {
        self.preds.iter().filter(|p| matches!(p.class, Class::Gemm | Class::Attention) && p.unit != Unit::TensorCore).collect()
    }

    /// Whether any kernel's registers were the default (no ptxas line for it).
    pub fn default_regs(&self) -> bool {
        self.preds.iter().any(|p| p.default_regs)
    }

    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "kernel": r.name, "launches": r.launches, "time_ms": r.time * 1e3, "share": r.time / self.step,
                    "roofline_pct": 100.0 * r.roof / r.time, "min_waves": if r.min_waves.is_finite() { json!(r.min_waves) } else { Value::Null },
                    "unit": r.unit.label(), "class": r.class, "gflop": r.flops / 1e9, "gbytes": r.bytes / 1e9,
                    "regs": r.regs, "blocks_per_sm": r.blocks_per_sm,
                })
            })
            .collect();
        json!({
            "phase": self.phase, "gpu": self.gpu.name, "items": self.items, "unit": self.per,
            "step_ms": self.step * 1e3, "copies_ms": self.copies * 1e3, "predicted_per_s": self.throughput(),
            "launches": self.preds.len(), "below_wave": self.below_wave().len(), "off_tensor_cores": self.off_tensor_cores().len(),
            "kernels": rows,
        })
    }

    /// The per-kernel table as text.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<46} {:>8} {:>10} {:>6} {:>6} {:>8} {:>5} {:>5} {:>4}\n",
            "kernel", "launches", "time ms", "share", "%roof", "waves≥", "unit", "regs", "b/SM"
        );
        for r in &self.rows {
            let waves = if r.min_waves.is_finite() { format!("{:.2}", r.min_waves) } else { "-".into() };
            let regs = if r.regs > 0 { r.regs.to_string() } else { "-".into() };
            let bps = if r.blocks_per_sm > 0 { r.blocks_per_sm.to_string() } else { "-".into() };
            s += &format!(
                "{:<46} {:>8} {:>10.3} {:>5.1}% {:>5.1}% {:>8} {:>5} {:>5} {:>4}\n",
                r.name,
                r.launches,
                r.time * 1e3,
                100.0 * r.time / self.step,
                100.0 * r.roof / r.time,
                waves,
                if r.class == Class::Transfer { "-" } else { r.unit.label() },
                regs,
                bps
            );
        }
        s += &format!(
            "predicted  {:.0} {}  ({} launches, {:.2} ms per {} {}, of which {:.2} ms host↔device copies)\n",
            self.throughput(),
            self.per,
            self.preds.len(),
            self.step * 1e3,
            self.items,
            self.per.trim_end_matches("/s"),
            self.copies * 1e3
        );
        s
    }
}

/// Offending launches as a table (for test failures and the CLI), one line per kernel and
/// problem size: blocks, waves, blocks per SM, unit, predicted µs per launch, launches.
pub fn offenders(title: &str, preds: &[&Pred]) -> String {
    let mut s = format!("{title}: {} launches\n{:<46} {:>9} {:>7} {:>5} {:>8} {:>10}\n", preds.len(), "kernel", "blocks", "waves", "b/SM", "unit", "µs each");
    let mut groups: Vec<(&Pred, usize)> = vec![];
    for p in preds {
        match groups.iter_mut().find(|(q, _)| q.name == p.name && q.blocks == p.blocks && q.bytes == p.bytes && q.flops == p.flops) {
            Some(g) => g.1 += 1,
            None => groups.push((p, 1)),
        }
    }
    groups.sort_by(|a, b| (&a.0.name, a.0.blocks).cmp(&(&b.0.name, b.0.blocks)).then(b.0.time.total_cmp(&a.0.time)));
    for (p, n) in groups {
        s += &format!("{:<46} {:>9} {:>7.3} {:>5} {:>8} {:>10.1}  ×{n}\n", p.name, p.blocks, p.waves, p.blocks_per_sm, p.unit.label(), p.time * 1e6);
    }
    s
}

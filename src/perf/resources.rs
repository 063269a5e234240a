//! Registers per thread and static shared memory per kernel, from the ptxas report of the build
//! (build.rs writes its table to OUT_DIR/ptxas_table.txt; empty when nvcc was not found, and then
//! every kernel gets [`k::DEFAULT_REGS`] registers and no static
//! shared memory, flagged in the dry-run output).
use super::gpus::k;
use std::collections::HashMap;
use std::sync::OnceLock;

/// The table as build.rs wrote it: `kernel arch regs smem stack spill_st spill_ld` per line.
const TABLE: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas_table.txt"));

/// One kernel's resources for one architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub regs: u32,
    pub smem_static: u32,
    /// False when the report had no line for it (the default was used).
    pub from_ptxas: bool,
}

fn parse(text: &str) -> HashMap<(String, String), (u32, u32)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (regs, smem) = (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
            Some(((f[0].to_string(), f[1].to_string()), (regs, smem)))
        })
        .collect()
}

fn table() -> &'static HashMap<(String, String), (u32, u32)> {
    static T: OnceLock<HashMap<(String, String), (u32, u32)>> = OnceLock::new();
    T.get_or_init(|| parse(TABLE))
}

/// The ptxas target of an SM number (90 → the sm_90a cubin).
pub fn arch_of(sm: u32) -> String {
    if sm == 90 {
        "sm_90a".into()
    } else {
        format!("sm_{sm}")
    }
}

/// Whether the build had a ptxas report at all.
pub fn have_report() -> bool {
    !table().is_empty()
}

/// `kernel`'s registers and static shared memory on `sm`.
pub fn usage(kernel: &str, sm: u32) -> Usage {
    match table().get(&(kernel.to_string(), arch_of(sm))) {
        Some(&(regs, smem)) => Usage { regs, smem_static: smem, from_ptxas: true },
        None => Usage { regs: k::DEFAULT_REGS, smem_static: 0, from_ptxas: false },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_table_format() {
        let t = super::parse("kernel arch regs smem stack spill_st spill_ld\ngemm_f32   sm_90a  64  8320  0 0 0\n");
        assert_eq!(t.get(&("gemm_f32".to_string(), "sm_90a".to_string())), Some(&(64, 8320)));
        assert_eq!(t.len(), 1);
    }
}

//! build/nvcc.rs -- optional GPU build of kernels/*.cu with nvcc (cubins for sm_80, sm_86, sm_89
//! and sm_90a, PTX compute_90 for newer GPUs), with the ptxas resource report checked for register
//! spills. The (file, target) compilations run in parallel threads.
//!
//! nvcc is looked up in: $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, then the pip package
//! nvidia-cuda-nvcc (site-packages/nvidia/cu13/bin, found through python3). Set
//! KERNELS_SKIP_NVCC=1 to skip the GPU build (the .cu sources are still embedded for NVRTC).
use std::path::{Path, PathBuf};
use std::process::Command;

/// (arch, output kind). The PTX must stay last (build.rs embeds the cubins in this order).
pub const TARGETS: &[(&str, &str)] = &[("sm_80", "cubin"), ("sm_86", "cubin"), ("sm_89", "cubin"), ("sm_90a", "cubin"), ("compute_90", "ptx")];

/// The SM number a cubin target is selected for at run time (sm_90a is listed as 90).
pub fn sm_of(arch: &str) -> u32 {
    arch.trim_start_matches("sm_").trim_end_matches('a').parse().unwrap()
}

pub fn find_nvcc() -> Option<PathBuf> {
    if std::env::var_os("KERNELS_SKIP_NVCC").is_some_and(|v| v != "0") {
        return None;
    }
    let works = |p: &Path| Command::new(p).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if let Some(p) = std::env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if works(&p) {
            return Some(p);
        }
        panic!("NVCC={} does not run (`nvcc --version` failed)", p.display());
    }
    let mut candidates: Vec<PathBuf> =
        ["CUDA_HOME", "CUDA_PATH"].iter().filter_map(std::env::var_os).map(|d| PathBuf::from(d).join("bin").join("nvcc")).collect();
    candidates.push(PathBuf::from("nvcc"));
    let py = Command::new("python3").args(["-c", "import nvidia.cu13 as m, os; print(os.path.join(list(m.__path__)[0], 'bin', 'nvcc'))"]).output();
    if let Ok(o) = py {
        if o.status.success() {
            candidates.push(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        }
    }
    candidates.into_iter().find(|p| works(p))
}

pub fn version(nvcc: &Path) -> String {
    let o = Command::new(nvcc).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    text.lines().find(|l| l.contains("release")).unwrap_or("nvcc").trim().to_string()
}

/// One line of the ptxas report: a kernel compiled for one architecture.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub smem: u32,
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let p = line.find(unit)?;
    line[..p].split_whitespace().last()?.parse().ok()
}

/// Parses `-Xptxas -v` output.
pub fn parse_ptxas(text: &str) -> Vec<Usage> {
    let mut out: Vec<Usage> = Vec::new();
    for line in text.lines() {
        if let Some(p) = line.find("Compiling entry function '") {
            let rest = &line[p + "Compiling entry function '".len()..];
            let kernel = rest[..rest.find('\'').unwrap_or(rest.len())].to_string();
            let arch = rest.rsplit('\'').nth(1).unwrap_or("?").to_string();
            out.push(Usage { kernel, arch, ..Default::default() });
        } else if let Some(u) = out.last_mut() {
            if line.contains("bytes stack frame") {
                u.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                u.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                u.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                u.registers = number_before(line, "registers").unwrap_or(0);
                u.smem = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

pub fn flags(arch: &str, kind: &str) -> Vec<String> {
    let mut f = vec![format!("-{kind}"), format!("-arch={arch}"), "-O3".into(), "-std=c++17".into(), "-lineinfo".into()];
    if kind == "cubin" {
        f.extend(["-Xptxas".into(), "-v".into()]);
    }
    f
}

/// Compiles one .cu for one target; returns the output path and the nvcc log.
fn compile_one(nvcc: &Path, cu: &Path, include: &Path, out_dir: &Path, arch: &str, kind: &str) -> (PathBuf, String) {
    let stem = cu.file_stem().unwrap().to_str().unwrap();
    let out = out_dir.join(format!("{stem}.{arch}.{kind}"));
    let mut cmd = Command::new(nvcc);
    cmd.args(flags(arch, kind)).arg("-I").arg(include).arg("-o").arg(&out).arg(cu);
    let o = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    if !o.status.success() {
        panic!("nvcc failed for {} ({arch}):\n{text}", cu.display());
    }
    (out, format!("$ {:?}\n{text}\n", cmd))
}

/// Compiles every .cu for every target, `jobs` compilations at a time. Returns, per file, the
/// output paths in TARGETS order, plus the ptxas usage and the full log (both in file, target order).
pub fn compile_all(nvcc: &Path, cus: &[PathBuf], include: &Path, out_dir: &Path, jobs: usize) -> (Vec<Vec<PathBuf>>, Vec<Usage>, String) {
    let work: Vec<(usize, usize)> = (0..cus.len()).flat_map(|i| (0..TARGETS.len()).map(move |t| (i, t))).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(vec![None; work.len()]);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let w = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(i, t)) = work.get(w) else { break };
                let (arch, kind) = TARGETS[t];
                let r = compile_one(nvcc, &cus[i], include, out_dir, arch, kind);
                results.lock().unwrap()[w] = Some(r);
            });
        }
    });
    let results: Vec<(PathBuf, String)> = results.into_inner().unwrap().into_iter().map(|r| r.unwrap()).collect();
    let mut outputs = vec![Vec::new(); cus.len()];
    let (mut usage, mut log) = (Vec::new(), String::new());
    for ((i, _), (path, text)) in work.iter().zip(results) {
        usage.extend(parse_ptxas(&text));
        log.push_str(&text);
        outputs[*i].push(path);
    }
    (outputs, usage, log)
}

pub fn table(usage: &[Usage]) -> String {
    let mut s = format!("{:<32} {:<8} {:>5} {:>6} {:>6} {:>8} {:>8}\n", "kernel", "arch", "regs", "smem", "stack", "spill_st", "spill_ld");
    for u in usage {
        s += &format!("{:<32} {:<8} {:>5} {:>6} {:>6} {:>8} {:>8}\n", u.kernel, u.arch, u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads);
    }
    s
}

//! build.rs -- builds the CUDA kernels in kernels/ two ways.
//!
//! 1. CPU emulator (cargo feature `emu`; `emu-test-kernels` adds kernels/buggy/): every .cu is
//!    rewritten and wrapped by build/emu_gen.rs and compiled as host C++ (g++ -std=c++20 -O2,
//!    include path emu/include then emu/) together with emu/emu_capi.cpp into a static library
//!    linked whole-archive (kernels register themselves from static initialisers).
//!    CXXFLAGS is honoured, e.g. CXXFLAGS="-g -fsanitize=address" for a sanitizer build.
//! 2. GPU (whenever nvcc is found, see build/nvcc.rs): kernels/*.cu -> cubin sm_80, cubin sm_90a,
//!    PTX compute_90, with `-Xptxas -v`; the report goes to OUT_DIR/nvcc/ptxas_report.txt and
//!    the build FAILS if any kernel spills registers.
//!
//! Always: OUT_DIR/kernels.rs (included by src/kernels.rs) embeds every module's .cu source,
//! the headers, and the cubins/PTX when nvcc ran.
#[path = "build/emu_gen.rs"]
mod emu_gen;
#[path = "build/nvcc.rs"]
mod nvcc;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kernels = root.join("kernels");
    for p in ["kernels", "emu", "build"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "KERNELS_SKIP_NVCC", "CXXFLAGS"] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    if std::env::var_os("CARGO_FEATURE_EMU").is_some() {
        build_emulator(&root, &out, std::env::var_os("CARGO_FEATURE_EMU_TEST_KERNELS").is_some());
    }

    // GPU modules: the top-level kernels/*.cu
    let mut cus: Vec<PathBuf> = fs::read_dir(&kernels).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "cu")).collect();
    cus.sort();
    let headers: Vec<PathBuf> = {
        let mut h: Vec<PathBuf> = fs::read_dir(&kernels).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "cuh")).collect();
        h.sort();
        h
    };
    let nvcc_path = nvcc::find_nvcc();
    let mut built: Vec<Option<Vec<PathBuf>>> = vec![None; cus.len()];
    let mut nvcc_version = None;
    // registers/smem per kernel for the performance model (src/perf/resources.rs); empty without nvcc
    let mut ptxas_table = String::new();
    if let Some(nvcc_path) = &nvcc_path {
        let dir = out.join("nvcc");
        fs::create_dir_all(&dir).unwrap();
        let jobs = std::env::var("NUM_JOBS").ok().and_then(|j| j.parse().ok()).unwrap_or(2usize).max(2);
        let (outputs, usage, log) = nvcc::compile_all(nvcc_path, &cus, &kernels, &dir, jobs);
        for (b, o) in built.iter_mut().zip(outputs) {
            *b = Some(o);
        }
        let version = nvcc::version(nvcc_path);
        let flags = nvcc::flags("<arch>", "cubin").join(" ");
        let report = format!("{version}\n{} {flags} -I kernels -o X.cubin X.cu\n\n{}\n{log}", nvcc_path.display(), nvcc::table(&usage));
        fs::write(dir.join("ptxas_report.txt"), &report).unwrap();
        ptxas_table = nvcc::table(&usage);
        let spills: Vec<&nvcc::Usage> = usage.iter().filter(|u| u.spill_stores > 0 || u.spill_loads > 0).collect();
        if !spills.is_empty() {
            panic!(
                "register spills reported by ptxas (full report: {}):\n{}",
                dir.join("ptxas_report.txt").display(),
                nvcc::table(&spills.into_iter().cloned().collect::<Vec<_>>())
            );
        }
        nvcc_version = Some(version);
    }
    fs::write(out.join("ptxas_table.txt"), &ptxas_table).unwrap();
    write_kernels_rs(&out, &cus, &headers, &built, nvcc_version);
}

fn build_emulator(root: &Path, out: &Path, with_buggy: bool) {
    let (wrappers, warnings) = emu_gen::generate(&root.join("kernels"), out, with_buggy);
    for w in warnings {
        println!("cargo:warning={w}");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .include(root.join("emu").join("include"))
        .include(root.join("emu"))
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas")
        .files(&wrappers)
        .file(root.join("emu").join("emu_capi.cpp"))
        .cargo_metadata(false)
        .compile("clipforge_cuda_emu");
    println!("cargo:rustc-link-search=native={}", out.display());
    // whole-archive: the kernel objects are only referenced by their static registrars
    println!("cargo:rustc-link-lib=static:+whole-archive=clipforge_cuda_emu");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    let flags = std::env::var("CXXFLAGS").unwrap_or_default();
    if flags.contains("-fsanitize=address") {
        println!("cargo:rustc-link-lib=dylib=asan");
    }
    if flags.contains("-fsanitize=undefined") {
        println!("cargo:rustc-link-lib=dylib=ubsan");
    }
}

fn write_kernels_rs(out: &Path, cus: &[PathBuf], headers: &[PathBuf], built: &[Option<Vec<PathBuf>>], nvcc: Option<String>) {
    let mut s = String::from("// generated by build.rs\n");
    writeln!(s, "pub const NVCC_VERSION: Option<&str> = {:?};", nvcc).unwrap();
    s += "pub const MODULES: &[KernelModule] = &[\n";
    for (cu, b) in cus.iter().zip(built) {
        let src = fs::read_to_string(cu).unwrap();
        let name = cu.file_stem().unwrap().to_str().unwrap();
        let entries = emu_gen::entry_points(&src);
        let n = nvcc::TARGETS.len();
        let ptx = match b {
            Some(v) => format!("Some(include_str!({:?}))", v[n - 1].display().to_string()),
            None => "None".to_string(),
        };
        let cubins: Vec<String> = match b {
            Some(v) => nvcc::TARGETS[..n - 1]
                .iter()
                .zip(v)
                .map(|((arch, _), p)| format!("({}, include_bytes!({:?}))", nvcc::sm_of(arch), p.display().to_string()))
                .collect(),
            None => vec![],
        };
        writeln!(
            s,
            "    KernelModule {{ name: {name:?}, source: include_str!({:?}), ptx_compute_90: {ptx}, cubins: &[{}], entry_points: &{entries:?} }},",
            cu.display().to_string(),
            cubins.join(", "),
        )
        .unwrap();
    }
    s += "];\npub const HEADERS: &[(&str, &str)] = &[\n";
    for h in headers {
        let name = h.file_name().unwrap().to_str().unwrap();
        writeln!(s, "    ({name:?}, include_str!({:?})),", h.display().to_string()).unwrap();
    }
    s += "];\n";
    fs::write(out.join("kernels.rs"), s).unwrap();
}

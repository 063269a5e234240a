//! NVRTC side of kernel loading: library/version/arch queries, source preparation and
//! compilation to PTX (used by `modules.rs` when no cubin or PTX image loads).
//!
//! cudarc's `compile_ptx_with_opts` passes no in-memory headers, so local `#include "x.cuh"`
//! lines are inlined from the embedded header table ([`inline_includes`]); `<cuda_runtime.h>` is
//! dropped (NVRTC has the device built-ins without it); other system headers (`<cuda_bf16.h>`)
//! are not built into NVRTC 13, so they come from a CUDA include directory, which
//! [`cuda_include_dir`] finds (env, beside the loaded libnvrtc, /usr/local/cuda) and
//! [`compile_options`] passes as `--include-path`.
//! Every cudarc call here can panic when libnvrtc is missing, hence the probes and
//! `catch_unwind`.
use std::collections::HashSet;
use std::path::PathBuf;

use cudarc::nvrtc::{self, CompileError, CompileOptions};

use super::device::{guarded, panic_message};
use crate::error::{Error, Result};

/// NVRTC's `(major, minor)`; `Err` if libnvrtc cannot be loaded.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    // SAFETY: only probes for the library (libloading dlopen), calls nothing from it.
    if !unsafe { nvrtc::sys::is_culib_present() } {
        return Err(Error::device("NVRTC library not found (cudarc looks for libnvrtc.so, .so.12, .so.11, ...)"));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through valid, exclusive pointers.
    guarded("nvrtcVersion", || unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor).result() })?;
    Ok((major, minor))
}

/// The SM numbers this NVRTC can target (empty if the query fails).
pub fn nvrtc_supported_archs() -> Vec<u32> {
    let mut n = 0;
    // SAFETY: nvrtcGetNumSupportedArchs writes one int through a valid pointer.
    let counted = guarded("nvrtcGetNumSupportedArchs", || unsafe { nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n).result() });
    if counted.is_err() || n <= 0 {
        return Vec::new();
    }
    let mut archs = vec![0; n as usize];
    // SAFETY: `archs` has room for exactly the `n` ints NVRTC reported.
    let got = guarded("nvrtcGetSupportedArchs", || unsafe { nvrtc::sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()).result() });
    match got {
        Ok(()) => archs.into_iter().filter(|&a| a > 0).map(|a| a as u32).collect(),
        Err(_) => Vec::new(),
    }
}

/// Virtual arch to give NVRTC: the device's if supported (or if the list is unknown), else the
/// highest supported one below it (PTX runs on newer GPUs); `None` if all are newer.
pub fn nvrtc_arch(device_sm: u32, supported: &[u32]) -> Option<u32> {
    if supported.is_empty() || supported.contains(&device_sm) {
        return Some(device_sm);
    }
    supported.iter().copied().filter(|&s| s <= device_sm).max()
}

/// Replaces `#include "name"` with the embedded header `name` (recursively, each header once —
/// they are `#pragma once`), drops `#include <cuda_runtime.h>`, keeps other `<...>` includes.
pub fn inline_includes(source: &str, headers: &[(&str, &str)]) -> Result<String> {
    fn walk(src: &str, headers: &[(&str, &str)], seen: &mut HashSet<String>, depth: usize, out: &mut String) -> Result<()> {
        if depth > 16 {
            return Err(Error::msg("includes nested deeper than 16"));
        }
        for line in src.lines() {
            let t = line.trim_start();
            if t.starts_with("#pragma") && t["#pragma".len()..].trim() == "once" {
                continue;
            }
            let Some(rest) = t.strip_prefix("#include").map(str::trim) else {
                out.push_str(line);
                out.push('\n');
                continue;
            };
            if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                let (_, text) = headers.iter().find(|(n, _)| *n == name).ok_or_else(|| Error::msg(format!("#include \"{name}\": header not embedded")))?;
                if seen.insert(name.to_string()) {
                    out.push_str(&format!("// ---- begin {name} ----\n"));
                    walk(text, headers, seen, depth + 1, out)?;
                    out.push_str(&format!("// ---- end {name} ----\n"));
                }
            } else if rest.starts_with("<cuda_runtime.h>") {
                out.push_str("// #include <cuda_runtime.h> (not needed under NVRTC)\n");
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        Ok(())
    }
    let mut out = String::with_capacity(source.len() + headers.iter().map(|h| h.1.len()).sum::<usize>());
    walk(source, headers, &mut HashSet::new(), 0, &mut out)?;
    Ok(out)
}

/// The first `<dir>/include` holding `cuda_bf16.h` among `candidates`.
pub fn cuda_include_dir_from(candidates: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    candidates.into_iter().map(|d| d.join("include")).find(|inc| inc.join("cuda_bf16.h").is_file())
}

/// The directory of the libnvrtc this process has loaded (from /proc/self/maps), if any.
pub fn loaded_nvrtc_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let path = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| {
        let f = p.rsplit('/').next().unwrap_or("");
        f.starts_with("libnvrtc.") || f.starts_with("libnvrtc64")
    })?;
    Some(PathBuf::from(path).parent()?.to_path_buf())
}

/// [`cuda_include_dir_from`] over `$CLIPFORGE_CUDA_ROOT`, `$CUDA_HOME`, `$CUDA_PATH`, the parent
/// of the loaded libnvrtc's directory (a toolkit's `lib64/..`, or the PyPI wheel's
/// `nvidia/cu13/lib/..`), then `/usr/local/cuda`. NVRTC 13 has no built-in <cuda_bf16.h>
/// (tests/nvrtc.rs found this), so one of these must hold the CUDA headers.
pub fn cuda_include_dir() -> Option<PathBuf> {
    let env = ["CLIPFORGE_CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"].into_iter().filter_map(std::env::var_os).map(PathBuf::from);
    let beside = loaded_nvrtc_dir().and_then(|d| d.parent().map(|p| p.to_path_buf()));
    cuda_include_dir_from(env.chain(beside).chain([PathBuf::from("/usr/local/cuda")]))
}

/// The option list [`compile`] uses (also part of the disk-cache key).
pub fn compile_options(arch: u32, include_dir: Option<&std::path::Path>, extra: &[String]) -> Vec<String> {
    let mut o = vec![format!("--gpu-architecture=compute_{arch}"), "--std=c++17".to_string()];
    if let Some(d) = include_dir {
        o.push(format!("--include-path={}", d.display()));
    }
    o.extend(extra.iter().cloned());
    o
}

/// Compiles prepared (include-inlined) `source` to PTX text with `options`.
pub fn compile(name: &str, source: &str, options: Vec<String>) -> Result<String> {
    if source.contains('\0') {
        return Err(Error::msg("source contains a NUL byte"));
    }
    let opts = CompileOptions { options, name: Some(format!("{name}.cu")), ..Default::default() };
    // cudarc's NVRTC wrapper panics on a missing library/symbol, and `to_src` on non-UTF-8.
    let compiled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| nvrtc::compile_ptx_with_opts(source, opts).map(|p| p.to_src())));
    match compiled {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(CompileError::CompileError { nvrtc, options, log })) => {
            Err(Error::device(format!("{nvrtc:?} with options {options:?}:\n{}", log.to_string_lossy())))
        }
        Ok(Err(other)) => Err(Error::device(format!("{other:?}"))),
        Err(p) => Err(Error::device(format!("NVRTC panicked: {}", panic_message(&p)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_clamps_to_supported() {
        assert_eq!(nvrtc_arch(90, &[75, 80, 86, 89, 90]), Some(90));
        assert_eq!(nvrtc_arch(120, &[75, 80, 86, 89, 90]), Some(90));
        assert_eq!(nvrtc_arch(70, &[75, 80]), None);
        assert_eq!(nvrtc_arch(90, &[]), Some(90));
    }

    #[test]
    fn includes_are_inlined_once() {
        let headers = [
            ("common.cuh", "#pragma once\n#include <cuda_runtime.h>\n#include <cuda_bf16.h>\n#include \"inner.cuh\"\n#define CEIL_DIV(a, b) 1\n"),
            ("inner.cuh", "  #pragma   once\n__device__ int inner();\n"),
        ];
        let src = "#include <cuda_runtime.h>\n#include \"common.cuh\"\n  #include \"inner.cuh\"\nextern \"C\" __global__ void k() {}\n";
        let out = inline_includes(src, &headers).unwrap();
        assert_eq!(out.matches("__device__ int inner();").count(), 1);
        assert_eq!(out.matches("#define CEIL_DIV").count(), 1);
        assert!(!out.contains("#pragma"));
        assert!(!out.lines().any(|l| l.starts_with("#include <cuda_runtime.h>")));
        assert!(out.contains("#include <cuda_bf16.h>\n"));
        assert!(out.ends_with("extern \"C\" __global__ void k() {}\n"));
        let e = inline_includes("#include \"missing.cuh\"\n", &headers).unwrap_err();
        assert!(e.to_string().contains("missing.cuh"), "{e}");
    }

    #[test]
    fn options_and_include_dir() {
        let o = compile_options(90, Some(std::path::Path::new("/cuda/include")), &["--use_fast_math".into()]);
        assert_eq!(o, ["--gpu-architecture=compute_90", "--std=c++17", "--include-path=/cuda/include", "--use_fast_math"]);
        assert_eq!(cuda_include_dir_from([PathBuf::from("/nonexistent/cuda")]), None);
    }
}

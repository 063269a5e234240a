//! build/emu_gen.rs -- turns kernels/**/*.cu into host C++ for the CPU emulator (emu/).
//!
//! For every .cu (one CUDA module):
//!   * a line-preserving copy of the kernels/ tree goes to OUT_DIR/emu_src, starting with
//!     `#line 1 "<original path>"` so diagnostics name the real file and line, with
//!       - `extern __shared__ [__align__(n)] T name[];`  ->  `T* name = reinterpret_cast<T*>(::emu::detail::dyn_smem());`
//!         (at file scope: `#define name (reinterpret_cast<T*>(::emu::detail::dyn_smem()))`)
//!       - `__shared__ [__align__(n)] T name[dims];` (inside braces, one declarator, no initialiser)
//!         -> `auto& name = ::emu::detail::shared_var<T[dims], ID>();` (poisoned per block);
//!         other `__shared__` forms stay (the header maps them to thread_local, not poisoned);
//!         "inside braces" is counted naively: a `__shared__` inside a `namespace { }` block
//!         would be rewritten too, which is wrong (keep file-scope __shared__ at top level);
//!   * a wrapper OUT_DIR/emu_wrap/<module>.cpp includes the copy inside `namespace emu_mod_<module>`
//!     (same-named __device__ helpers in different files cannot collide) and registers every
//!     `extern "C" __global__` entry point by name (EMU_REGISTER_KERNEL).
use std::fs;
use std::path::{Path, PathBuf};

/// Removes // and /* */ comments (string literals are not special-cased: kernels rarely need it).
pub fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                if b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 2;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Names of the `extern "C" __global__` functions of a source file.
pub fn entry_points(src: &str) -> Vec<String> {
    let text = strip_comments(src);
    let mut names = Vec::new();
    for (pos, _) in text.match_indices("__global__") {
        let before = text[..pos].trim_end();
        if !before.ends_with("extern \"C\"") {
            continue;
        }
        let mut rest = text[pos + "__global__".len()..].trim_start();
        loop {
            if let Some(r) = rest.strip_prefix("void") {
                rest = r.trim_start();
            } else if rest.starts_with("__launch_bounds__") {
                let close = rest.find(')').expect("unterminated __launch_bounds__");
                rest = rest[close + 1..].trim_start();
            } else {
                break;
            }
        }
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        assert!(!name.is_empty(), "cannot parse the kernel name after `extern \"C\" __global__` in:\n{}", &rest[..rest.len().min(80)]);
        names.push(name);
    }
    names
}

/// Splits `T name[dims]` into (T, name, dims); None for anything else.
fn split_decl(decl: &str) -> Option<(String, String, String)> {
    if decl.contains('=') || decl.contains(',') || decl.contains('(') {
        return None;
    }
    let (head, dims) = match decl.find('[') {
        Some(p) => (decl[..p].trim(), decl[p..].trim()),
        None => (decl.trim(), ""),
    };
    let name_start = head.rfind(|c: char| !(c.is_alphanumeric() || c == '_'))? + 1;
    let (ty, name) = (head[..name_start].trim(), &head[name_start..]);
    if ty.is_empty() || name.is_empty() || name.chars().next().unwrap().is_ascii_digit() {
        return None;
    }
    Some((ty.to_string(), name.to_string(), dims.to_string()))
}

/// Drops `__align__(n)` and the given leading keywords from a declaration (without `;`).
fn strip_decl(s: &str, keywords: &[&str]) -> String {
    let mut s = s.trim().trim_end_matches(';').trim().to_string();
    while let Some(p) = s.find("__align__") {
        let close = s[p..].find(')').map(|c| p + c + 1).unwrap_or(s.len());
        s.replace_range(p..close, " ");
    }
    let mut words: Vec<&str> = s.split_whitespace().collect();
    words.retain(|w| !keywords.contains(w));
    words.join(" ")
}

/// Line-preserving rewrite of one kernel source or header for the emulator.
pub fn rewrite(src: &str, orig: &Path, next_id: &mut u32, warnings: &mut Vec<String>) -> String {
    let mut out = format!("#line 1 \"{}\"\n", orig.display());
    let code = strip_comments(src);
    let mut depth: i32 = 0;
    for (lineno, (line, code_line)) in src.lines().zip(code.lines().chain(std::iter::repeat(""))).enumerate() {
        let t = code_line.trim();
        let indent: String = line.chars().take_while(|c| c.is_whitespace()).collect();
        let here = format!("{}:{}", orig.display(), lineno + 1);
        let mut replaced = None;
        if t.starts_with("extern") && t.contains("__shared__") {
            let d = strip_decl(t, &["extern", "__shared__"]);
            let parsed = split_decl(&d).filter(|(_, _, dims)| dims == "[]");
            let (ty, name, _) = parsed.unwrap_or_else(|| {
                panic!("{here}: cannot handle this `extern __shared__` declaration for the CPU emulator; write it as `extern __shared__ __align__(16) T name[];` on one line")
            });
            replaced = Some(if depth > 0 {
                format!("{indent}{ty}* {name} = reinterpret_cast<{ty}*>(::emu::detail::dyn_smem());")
            } else {
                // file scope: every use must see the current block's buffer
                format!("#define {name} (reinterpret_cast<{ty}*>(::emu::detail::dyn_smem()))")
            });
        } else if t.starts_with("__shared__") && t.ends_with(';') && depth > 0 {
            match split_decl(&strip_decl(t, &["__shared__"])) {
                Some((ty, name, dims)) => {
                    *next_id += 1;
                    replaced = Some(format!("{indent}auto& {name} = ::emu::detail::shared_var<{ty}{dims}, {}>();", *next_id));
                }
                None => warnings.push(format!("{here}: __shared__ declaration left as thread_local (not poisoned per block)")),
            }
        }
        match replaced {
            Some(r) => out.push_str(&r),
            None => out.push_str(line),
        }
        out.push('\n');
        depth += code_line.matches('{').count() as i32 - code_line.matches('}').count() as i32;
    }
    out
}

fn collect(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, exts, out);
        } else if p.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.contains(&e)) {
            out.push(p);
        }
    }
}

/// Mirrors kernels/ (rewritten) into OUT_DIR/emu_src and writes one wrapper per module.
/// `include_buggy`: also the test-only kernels/buggy/*.cu. Returns the wrapper .cpp files and
/// warnings about `__shared__` declarations that were not rewritten.
pub fn generate(kernels: &Path, out_dir: &Path, include_buggy: bool) -> (Vec<PathBuf>, Vec<String>) {
    let src_root = out_dir.join("emu_src");
    let wrap_root = out_dir.join("emu_wrap");
    fs::create_dir_all(&wrap_root).unwrap();
    let mut files = Vec::new();
    collect(kernels, &["cu", "cuh", "h"], &mut files);
    let (mut next_id, mut warnings) = (0u32, Vec::new());
    let mut wrappers = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(kernels).unwrap();
        let is_buggy = rel.starts_with("buggy");
        if is_buggy && !include_buggy {
            continue;
        }
        let src = fs::read_to_string(f).unwrap();
        let dst = src_root.join(rel);
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::write(&dst, rewrite(&src, f, &mut next_id, &mut warnings)).unwrap();
        if f.extension().unwrap() != "cu" {
            continue;
        }
        let stem = f.file_stem().unwrap().to_str().unwrap().replace(|c: char| !c.is_alphanumeric(), "_");
        let name = if is_buggy { format!("buggy_{stem}") } else { stem };
        let entries = entry_points(&src);
        let mut w = format!("// generated by build.rs from {}\n#include \"cuda_emu.h\"\n", f.display());
        w += &format!("namespace emu_mod_{name} {{\n#include \"{}\"\n}}  // namespace emu_mod_{name}\n", dst.display());
        for e in &entries {
            w += &format!("EMU_REGISTER_KERNEL(emu_mod_{name}, {e})\n");
        }
        let wp = wrap_root.join(format!("{name}.cpp"));
        fs::write(&wp, w).unwrap();
        wrappers.push(wp);
    }
    (wrappers, warnings)
}

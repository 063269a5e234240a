//! The `clipforge` binary: the command line (src/cli/, a thin user of the library's API) and any
//! error as one line.
use clap::Parser;

mod cli;

/// Large blocks cache-line aligned: the AVX-512 kernels' 64-byte loads and stores then never
/// span two lines (`clipforge::alloc`).
#[global_allocator]
static ALLOC: clipforge::alloc::CacheLineAlloc = clipforge::alloc::CacheLineAlloc;

fn main() {
    // Keep freed activation buffers in the heap instead of returning them to the kernel: every
    // forward pass reallocates the same sizes, and fresh pages cost a fault and a zeroing each.
    // SAFETY: mallopt only tunes glibc's allocator; called before any threads exist.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    let cli = cli::Cli::parse();
    // A closed stdout (`clipforge bench --json | head -1`) ends the process quietly, as for other
    // Unix tools, instead of `println!`'s panic. Not for the commands that own sockets (`serve`,
    // and `finetune`'s ranks): a peer's closed connection stays an error they report.
    #[cfg(unix)]
    if !matches!(cli.cmd, cli::Command::Serve(_) | cli::Command::Finetune(_)) {
        // SAFETY: restores the default action of one signal, before any threads exist.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Err(e) = cli::run(cli) {
        eprintln!("error: {e}");
        // 130 = 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
        std::process::exit(if matches!(e, clipforge::Error::Interrupted(_)) { 130 } else { 1 });
    }
}

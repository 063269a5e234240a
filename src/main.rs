//! The `clipforge` binary: parses the command line and prints any error as one line.
use clap::Parser;

fn main() {
    let cli = clipforge::cli::Cli::parse();
    if let Err(e) = clipforge::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

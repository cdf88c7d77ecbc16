//! The `ringlb` binary: everything lives in the library; see `cli.rs`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ringlb::cli::main()
}

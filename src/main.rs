//! The `ringlb` binary: everything lives in the library; see `cli.rs`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // No transparent huge pages for this process. mimalloc's segments backed by 2 MiB pages
    // make whole huge pages resident for a few live objects: with THP, 9,000 idle connections
    // measured 3.2 KiB each and a 14 MiB baseline; without, 1.7 KiB and 5 MiB. Nothing on the
    // data path gains from huge pages (buffers are 16 KiB and pooled). Best effort: a kernel
    // or sandbox that refuses the prctl changes nothing else.
    let _ = nix::sys::prctl::set_thp_disable(true);
    ringlb::cli::main()
}

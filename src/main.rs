//! The `nftproxy` binary: everything is in the library (`nftproxy::cmd`).

fn main() -> std::process::ExitCode {
    nftproxy::cmd::main(std::env::args_os().collect())
}

use clap::Parser;

fn main() -> std::process::ExitCode {
    keygate::cli::main(keygate::cli::Cli::parse())
}

//! The keygate binary and other commands run as an operator runs them, their output captured.

use std::process::{Command, Output};

/// A finished command's (exit code, stdout, stderr); -1 when a signal ended it.
pub fn captured(out: Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `keygate <args>`: (exit code, stdout, stderr).
pub fn keygate(args: &[&str]) -> (i32, String, String) {
    captured(
        Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(args)
            .output()
            .unwrap(),
    )
}

/// `keygate <args> -c <config>`: (exit code, stdout, stderr).
pub fn keygate_cli(args: &[&str], config: &std::path::Path) -> (i32, String, String) {
    captured(
        Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(args)
            .arg("-c")
            .arg(config)
            .output()
            .unwrap(),
    )
}

/// `keygate run -c <config>` for a config it should refuse: bounded to 20 s (`timeout`),
/// after `wrapper` (e.g. `["prlimit", "--nofile=64:64"]`). (exit code, stdout, stderr).
pub fn run_refused(config: &std::path::Path, wrapper: &[&str]) -> (i32, String, String) {
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest);
            c.arg("timeout");
            c
        }
        None => Command::new("timeout"),
    };
    captured(
        cmd.arg("20")
            .arg(env!("CARGO_BIN_EXE_keygate"))
            .args(["run", "-c"])
            .arg(config)
            .output()
            .unwrap(),
    )
}

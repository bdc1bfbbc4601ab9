//! An operator's first hour (issue 11): `init` as root yields files the service user can read,
//! `keygen >> keygate.toml` keeps the token out of the file, out-of-range durations are named,
//! `demo` warns about a silent upstream, `keys` says how fresh its data is.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn sh(script: &str) -> (i32, String, String) {
    let out = Command::new("sh")
        .args(["-c", script])
        .env("KEYGATE", env!("CARGO_BIN_EXE_keygate"))
        .output()
        .unwrap();
    captured(out)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A config that `check` accepts apart from its keys: cert and key written next to it.
fn config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), None);
    std::fs::write(
        dir.path().join("keygate.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
         [upstream]\nurl = \"http://127.0.0.1:1\"\n",
    )
    .unwrap();
    dir
}

#[test]
fn keygen_appended_to_the_config_keeps_the_token_out_of_it() {
    let dir = config_dir();
    let cfg = dir.path().join("keygate.toml");
    // No trailing newline: the appended snippet must still start a table of its own.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.trim_end()).unwrap();
    let (code, out, err) = sh(&format!(
        "\"$KEYGATE\" keygen --id ci-prod >> '{}'",
        cfg.display()
    ));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "", "everything on stdout went into the file");
    let token = err
        .split_whitespace()
        .find(|w| w.starts_with("kg_ci-prod_"))
        .expect("token shown on stderr")
        .to_string();
    let file = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        !file.contains("kg_ci-prod_"),
        "token in the config:\n{file}"
    );
    assert!(file.contains("[[keys]]\nid = \"ci-prod\"\nhash = \"$argon2id$"));
    let (code, out, err) = keygate(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
    // The hash in the file is the token's.
    let hash = file
        .lines()
        .find_map(|l| l.strip_prefix("hash = \""))
        .unwrap()
        .trim_end_matches('"');
    assert!(
        keygate::auth::PhcHash::parse(hash)
            .unwrap()
            .verify_blocking(token.as_bytes())
    );

    // The other way round: the token alone on stdout, the snippet on stderr.
    let (code, out, err) = keygate(&["keygen", "--id", "vault", "--token-stdout"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("kg_vault_"), "{out}");
    assert!(err.contains("[[keys]]\nid = \"vault\""), "{err}");
    assert!(!err.contains("kg_vault_"), "{err}");
    // --json: one line on stdout, nothing else.
    let (code, out, err) = keygate(&["keygen", "--id", "j", "--json"]);
    assert_eq!((code, out.lines().count(), err.as_str()), (0, 1, ""));
    assert_eq!(
        keygate(&["keygen", "--id", "j", "--json", "--token-stdout"]).0,
        2
    );
}

#[test]
fn every_duration_has_a_range_and_check_names_the_setting() {
    let dir = config_dir();
    let cfg = dir.path().join("keygate.toml");
    let base = std::fs::read_to_string(&cfg).unwrap();
    for (section, line, path) in [
        (
            "server",
            "header_read_timeout = \"1y\"",
            "server.header_read_timeout",
        ),
        (
            "server",
            "header_read_timeout = \"1ms\"",
            "server.header_read_timeout",
        ),
        (
            "server",
            "tls_handshake_timeout = \"1h\"",
            "server.tls_handshake_timeout",
        ),
        ("server", "idle_timeout = \"30d\"", "server.idle_timeout"),
        ("server", "shutdown_grace = \"2h\"", "server.shutdown_grace"),
        (
            "upstream",
            "connect_timeout = \"10m\"",
            "upstream.connect_timeout",
        ),
        (
            "upstream",
            "request_timeout = \"1day\"",
            "upstream.request_timeout",
        ),
        (
            "state",
            "path = \"s.json\"\nrotation_period = \"1h\"",
            "state.rotation_period",
        ),
    ] {
        let text = if base.contains(&format!("[{section}]")) {
            base.replace(&format!("[{section}]\n"), &format!("[{section}]\n{line}\n"))
        } else {
            format!("{base}[{section}]\n{line}\n")
        };
        std::fs::write(&cfg, text).unwrap();
        let (code, _, err) = keygate(&["check", "-c", cfg.to_str().unwrap()]);
        assert_eq!(code, 1, "{line} accepted");
        assert!(
            err.contains(&format!("{path}: ")) && err.contains("outside the allowed range"),
            "{line}: {err}"
        );
    }
    // Inside the ranges: fine.
    std::fs::write(
        &cfg,
        base.replace(
            "[server]\n",
            "[server]\nheader_read_timeout = \"5m\"\nidle_timeout = \"1h\"\n",
        ),
    )
    .unwrap();
    let (code, out, err) = keygate(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
}

/// Runs `bin args` as nobody:nogroup with no supplementary groups.
fn as_nobody(bin: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(bin)
        .args(args)
        .output()
        .expect("setpriv (util-linux)");
    captured(out)
}

/// Issue 11 item 1: `sudo keygate init /etc/keygate` must yield files the unit's unprivileged
/// user can read. Here the service's group is `nogroup` and the user `nobody`.
#[test]
fn init_as_root_yields_files_an_unprivileged_service_user_can_check() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("SKIPPED: needs root (runs init as root, check as nobody)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A copy of the binary nobody can execute (the target dir may be under /root).
    let bin = tmp.path().join("keygate");
    std::fs::copy(env!("CARGO_BIN_EXE_keygate"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    // Files for a group nobody is not in: check as nobody fails and says why (the old
    // behaviour of init for everyone).
    let other = tmp.path().join("other");
    let (code, _, err) = keygate(&["init", other.to_str().unwrap(), "--group", "root"]);
    assert_eq!(code, 0, "{err}");
    let cfg = other.join("keygate.toml");
    let (code, _, err) = as_nobody(&bin, &["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "nobody read root's files: {err}");
    assert!(err.contains("Permission denied"), "{err}");

    let etc = tmp.path().join("etc-keygate");
    let (code, out, err) = keygate(&["init", etc.to_str().unwrap(), "--group", "nogroup"]);
    assert_eq!(code, 0, "{err}");
    let cfg = etc.join("keygate.toml");
    // The state file goes to the unit's StateDirectory, which systemd creates at start; check
    // (T5-9) wants its directory writable, so here it is moved to one nobody can write (the
    // file keeps its owner and mode).
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains("path = \"/var/lib/keygate/state.json\""),
        "{text}"
    );
    let state_dir = tmp.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let moved = text.replace(
        "/var/lib/keygate/state.json",
        state_dir.join("state.json").to_str().unwrap(),
    );
    std::fs::write(&cfg, moved).unwrap();
    let (code, out2, err) = as_nobody(&bin, &["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!((code, out2.trim()), (0, "ok"), "check as nobody: {err}");

    // Ownership and modes: root:nogroup, nothing for others.
    let gid = 65534;
    for (name, want) in [
        ("", 0o750),
        ("keygate.toml", 0o640),
        ("key.pem", 0o640),
        ("cert.pem", 0o644),
    ] {
        let p = etc.join(name);
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, gid), "{}", p.display());
        assert_eq!(mode(&p), want, "{}", p.display());
    }
    // The public address, the unit's StateDirectory (root's default, above), a body limit for
    // 300 MiB uploads.
    assert!(text.contains("listen = \"0.0.0.0:8443\""), "{text}");
    let max_body: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("max_body_bytes = "))
        .expect("max_body_bytes written")
        .parse()
        .unwrap();
    assert!(max_body >= 300 * 1024 * 1024 + 1024 * 1024, "{max_body}");
    assert!(
        out.contains("0.0.0.0:8443") && out.contains("90 days"),
        "{out}"
    );
    // Outside systemd the state directory must exist first: init says so (T5-9).
    if !std::path::Path::new("/var/lib/keygate").is_dir() {
        assert!(
            out.contains("/var/lib/keygate (state.path) does not exist yet"),
            "{out}"
        );
    }

    // The certificate is short-lived: valid now and in 89 days, expired in 91.
    let pem = etc.join("cert.pem");
    let checkend = |days: u64| {
        Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-checkend",
                &(days * 86_400).to_string(),
                "-in",
            ])
            .arg(&pem)
            .stdout(Stdio::null())
            .status()
            .expect("openssl")
            .success()
    };
    assert!(checkend(89), "valid for 89 more days");
    assert!(!checkend(91), "not valid for 91 days");
}

#[test]
fn demo_warns_at_start_when_nothing_answers_upstream() {
    // A port with nothing behind it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listen.local_addr().unwrap().port();
    drop(listen);
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "demo",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &format!("http://127.0.0.1:{dead_port}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    let mut line = String::new();
    // Up to the first log line (JSON, as `run` logs by default).
    let first_log = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "stdout closed:\n{seen}"
        );
        if line.starts_with('{') {
            break line.clone();
        }
        seen.push_str(&line);
        assert!(Instant::now() < deadline, "{seen}");
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        seen.contains(&format!(
            "WARNING: nothing answers at http://127.0.0.1:{dead_port}"
        )),
        "{seen}"
    );
    let v: serde_json::Value = serde_json::from_str(&first_log).expect("demo logs JSON like run");
    assert!(v["level"].is_string() || v["msg"].is_string(), "{v}");
}

#[test]
fn keys_shows_hours_below_a_day_and_how_fresh_last_use_is() {
    let dir = config_dir();
    let cfg = dir.path().join("keygate.toml");
    let (_, hash) = new_key("soon");
    let expires = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_mins(5 * 60 + 30))
        .unwrap()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "[[keys]]\nid = \"soon\"\nhash = \"{hash}\"\nexpires = {expires}\n"
    ));
    std::fs::write(&cfg, text).unwrap();
    let (code, out, err) = keygate(&["keys", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("expires in 5 hours"), "{out}");
    assert!(!out.contains("0 days"), "{out}");
    assert!(out.contains("a few seconds old"), "{out}");
}

/// The shipped example (the package's conffile) has no active key, and `check` on it says
/// exactly what is missing: the certificate, the key file, a key.
#[test]
fn check_of_the_example_config_says_what_to_fill_in() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let text = std::fs::read_to_string(example).unwrap();
    assert!(
        !text.lines().any(|l| l.trim() == "[[keys]]"),
        "the example ships an active key"
    );
    assert!(
        !text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.contains("$argon2")),
        "the example ships an active hash"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.toml.example");
    std::fs::write(&cfg, &text).unwrap();
    let (code, _, err) = keygate(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    for what in [
        "tls.cert: cannot read /etc/keygate/cert.pem",
        "tls.key: cannot read /etc/keygate/key.pem",
        "keys: none configured",
        "keygate keygen --id NAME >>",
    ] {
        assert!(err.contains(what), "{what} missing:\n{err}");
    }
    // No config at all: check says how to make one.
    let missing = dir.path().join("nothing/keygate.toml");
    let (code, _, err) = keygate(&["check", "-c", missing.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("make one: keygate init"), "{err}");
    // A bare file name: the directory to init is the current one, never "" or "/".
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["check", "-c", "keygate.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("make one: keygate init . ("), "{err}");
}

/// A fresh user: `keys`, a read-only listing, refused to run unless every webhook secret
/// reference resolved in the operator's shell (and the TLS private key was readable). It
/// needs the keys and roles only (and Redis in cluster mode); `check` still resolves all.
#[test]
fn keys_lists_without_the_services_secrets_or_private_key() {
    let dir = config_dir();
    let cfg = dir.path().join("keygate.toml");
    let (_, hash) = new_key("ops");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("[[keys]]\nid = \"ops\"\nhash = \"{hash}\"\n"));
    text.push_str(
        "[[webhooks]]\nid = \"gh\"\npath = \"/hooks/gh\"\nscheme = \"github\"\nsecrets = [{ env = \"KEYGATE_TEST_UNSET_WEBHOOK_SECRET\" }]\n",
    );
    std::fs::write(&cfg, text).unwrap();
    // The private key becomes unreadable (as for an operator without access to it).
    let key_pem = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("key.pem"))
        .expect("init writes a key.pem");
    std::fs::rename(&key_pem, dir.path().join("moved-away.pem")).unwrap();
    let (code, out, err) = keygate(&["keys", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ops") && out.contains("active"), "{out}");
    let (code, _, err) = keygate(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("KEYGATE_TEST_UNSET_WEBHOOK_SECRET"), "{err}");
}

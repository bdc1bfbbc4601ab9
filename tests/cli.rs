//! The command line as an operator uses it (SPEC §1).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The first line of a PEM private key of the given kind ("EC ", "RSA ", "" for PKCS#8).
fn pem_begin(kind: &str) -> String {
    format!("-----BEGIN {kind}PRIVATE KEY-----")
}

fn openssl(args: &[&str]) {
    let ok = Command::new("openssl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed")
        .success();
    assert!(ok, "openssl {args:?}");
}

#[test]
fn version_and_help() {
    let (code, out, _) = keygate(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("keygate {}", env!("CARGO_PKG_VERSION")));
    let subcommands = [
        &["run"][..],
        &["check"],
        &["keygen"],
        &["hash"],
        &["keys"],
        &["demo"],
        &["init"],
        &["webhook"],
        &["webhook", "sign"],
    ];
    for sub in subcommands {
        let (code, out, _) = keygate(&[sub, &["--help"]].concat());
        assert_eq!(code, 0, "{sub:?} --help");
        assert!(out.contains("Usage"), "{sub:?}: {out}");
    }
    // Every subcommand the top-level help lists is in the list above (none forgotten).
    let (_, top, _) = keygate(&["--help"]);
    let listed: Vec<&str> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|&c| c != "help")
        .collect();
    assert!(listed.len() >= 8, "{top}");
    for c in listed {
        assert!(
            subcommands.iter().any(|s| s[0] == c),
            "{c} has no --help check"
        );
    }
}

#[test]
fn keygen_json_and_hash_roundtrip() {
    let (code, out, _) = keygate(&["keygen", "--id", "ci-prod", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = v["token"].as_str().unwrap();
    let hash = v["hash"].as_str().unwrap();
    assert_eq!(v["id"], "ci-prod");
    let parsed = keygate::auth::Token::parse(token).unwrap();
    assert_eq!(parsed.id(), "ci-prod");
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "OWASP parameters: {hash}"
    );
    let phc = keygate::auth::PhcHash::parse(hash).unwrap();
    assert!(phc.verify_blocking(token.as_bytes()));

    // Human form: stdout holds only the snippet (valid TOML for [[keys]]), the token is
    // printed once on stderr (tests/first_run.rs appends stdout to a config).
    let (code, out, err) = keygate(&["keygen", "--id", "app"]);
    assert_eq!(code, 0);
    assert!(out.contains("[[keys]]\nid = \"app\"\nhash = \"$argon2id$"));
    assert!(!out.contains("kg_app_"), "no token on stdout: {out}");
    assert_eq!(
        err.matches("kg_app_").count(),
        1,
        "token printed once: {err}"
    );

    let (code, _, err) = keygate(&["keygen", "--id", "Bad_Id"]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid key id"));

    // `hash` reads a token on stdin.
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("hash")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{token}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let h2 = String::from_utf8(out.stdout).unwrap();
    assert_ne!(h2.trim(), hash, "fresh salt");
    assert!(
        keygate::auth::PhcHash::parse(h2.trim())
            .unwrap()
            .verify_blocking(token.as_bytes())
    );

    // Not a token: refused, and not echoed.
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("hash")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "hunter2-password").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
}

#[test]
fn check_names_every_problem_by_toml_path() {
    let dir = tempfile::tempdir().unwrap();
    let (_, hash) = new_key("good");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"nowhere\"\n[tls]\ncert = \"missing.pem\"\nkey = \"missing.key\"\nmin_version = \"1.0\"\n\
             [upstream]\nurl = \"ftp://x\"\n[access]\nallow = [\"10.0.0.0/8\", \"10.0.0.300/8\"]\n\
             [[keys]]\nid = \"good\"\nhash = \"{hash}\"\n[[keys]]\nid = \"plain\"\nhash = \"kg_plain_SECRETSECRETSECRETSECRETSECRETSE123456\"\n\
             [[keys]]\nid = \"x\"\nhash = \"{hash}\"\nallow = [\"1.2.3.4/99\"]\nrate_limit = \"3/fortnight\"\nexpires = \"soon\"\n"
        ),
    )
    .unwrap();
    let (code, out, err) = keygate(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    for expected in [
        "server.listen: invalid socket address \"nowhere\"",
        "tls.cert: cannot read",
        "tls.key: cannot read",
        "tls.min_version:",
        "upstream.url:",
        "access.allow[1]: invalid CIDR \"10.0.0.300/8\"",
        // Errors under keys[N] name the key's id too.
        "keys[1].hash (id \"plain\"): not an argon2id PHC hash",
        "keys[2].allow[0] (id \"x\"): invalid CIDR \"1.2.3.4/99\"",
        "keys[2].rate_limit (id \"x\"):",
        "keys[2].expires (id \"x\"):",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(
        !err.contains("SECRETSECRET"),
        "a plaintext token pasted as a hash is never echoed"
    );
    assert!(!err.contains(&hash));

    // Unknown fields are errors, named by path.
    std::fs::write(&cfg, "[server]\nlisten = \"127.0.0.1:1\"\nworkerz = 2\n").unwrap();
    let (code, _, err) = keygate(&["check", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("server.workerz: unknown field"), "{err}");
}

/// PKCS#8, SEC1 and PKCS#1 keys all load; a mismatched pair is refused by `check`.
#[test]
fn key_formats_and_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &d("sec1.pem"),
    ]);
    openssl(&["genrsa", "-traditional", "-out", &d("pkcs1.pem"), "2048"]);
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", &d("pkcs8.pem")]);
    for k in ["sec1", "pkcs1", "pkcs8"] {
        openssl(&[
            "req",
            "-x509",
            "-key",
            &d(&format!("{k}.pem")),
            "-subj",
            "/CN=localhost",
            "-days",
            "2",
            "-out",
            &d(&format!("{k}.crt")),
        ]);
    }
    let first_line = |p: &str| {
        std::fs::read_to_string(d(p))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(first_line("sec1.pem"), pem_begin("EC "));
    assert_eq!(first_line("pkcs1.pem"), pem_begin("RSA "));
    assert_eq!(first_line("pkcs8.pem"), pem_begin(""));
    let (_, hash) = new_key("k");
    let write_cfg = |cert: &str, key: &str| {
        let p = d("kg.toml");
        std::fs::write(&p, format!("[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n[[keys]]\nid = \"k\"\nhash = \"{hash}\"\n")).unwrap();
        p
    };
    for k in ["sec1", "pkcs1", "pkcs8"] {
        let (code, out, err) = keygate(&[
            "check",
            "-c",
            &write_cfg(&format!("{k}.crt"), &format!("{k}.pem")),
        ]);
        assert_eq!((code, out.trim()), (0, "ok"), "{k}: {err}");
    }
    let (code, _, err) = keygate(&["check", "-c", &write_cfg("sec1.crt", "pkcs1.pem")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("tls.key: private key does not match the certificate"),
        "{err}"
    );
}

/// Reads the child's stdout until `pred` finds what it needs.
fn read_until(
    reader: &mut impl BufRead,
    what: &str,
    pred: impl Fn(&str) -> Option<String>,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stdout closed before {what}"
        );
        if let Some(v) = pred(&line) {
            return v;
        }
        assert!(Instant::now() < deadline, "no {what}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn token_in(line: &str) -> Option<String> {
    line.split_whitespace()
        .find(|w| w.starts_with("kg_"))
        .map(|w| w.trim_matches('\'').to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_is_the_first_run_path() {
    let up = Upstream::start().await;
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args([
            "demo",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &up.url(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let banner = read_until(&mut out, "warning", |l| {
        l.contains("NOT FOR PRODUCTION").then(|| l.to_string())
    });
    assert!(banner.contains("NOT FOR PRODUCTION"));
    let token = read_until(&mut out, "token", |l| {
        l.contains("API key").then(|| token_in(l)).flatten()
    });
    let curl_line = read_until(&mut out, "curl command", |l| {
        l.contains("curl ").then(|| l.to_string())
    });
    assert!(curl_line.contains(&token));
    read_until(&mut out, "listening", |l| {
        l.contains("listening").then(String::new)
    });
    let url = format!("https://localhost:{port}/demo");
    let hdr = format!("X-API-Key: {token}");
    let (code, body, err) = tokio::task::spawn_blocking(move || curl(&["-sSk", "-H", &hdr, &url]))
        .await
        .unwrap();
    assert_eq!((code, body.as_str()), (0, "ok"), "{err}");
    assert_eq!(up.requests()[0].header("x-keygate-key-id"), Some("demo"));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_writes_files_that_run_serves() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kdir = dir.path().join("etc");
    // A state file next to the config (root's default is /var/lib/keygate, tests/first_run.rs).
    // The listeners it writes are the ones asked for (free ports, so it can run as written).
    let port = free_port();
    let admin = free_port();
    let (listen_at, admin_at) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{admin}"));
    // Two listeners on one port is refused before anything is written.
    let (code, _, err) = keygate(&[
        "init",
        kdir.to_str().unwrap(),
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--admin",
        &listen_at,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("would share a port"), "{err}");
    assert!(!kdir.join("keygate.toml").exists());
    let (code, out, err) = keygate(&[
        "init",
        kdir.to_str().unwrap(),
        "--upstream",
        &up.url(),
        "--state",
        "state.json",
        "--listen",
        &listen_at,
        "--admin",
        &admin_at,
    ]);
    assert_eq!(code, 0, "{err}");
    let token = out.lines().find_map(token_in).expect("token printed");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(kdir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    // Owner only, or owner and the service's group when root made it and `keygate` exists.
    assert!(
        [0o600, 0o640].contains(&(mode & 0o777)),
        "private key is private: {mode:o}"
    );
    assert!(
        out.contains(&listen_at) && out.contains(&admin_at),
        "the addresses are stated: {out}"
    );
    let cfg = kdir.join("keygate.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // The comment above `listen` says who can reach the address actually written.
    assert!(
        text.contains("# This machine only.") && !text.contains("Every IPv4 address"),
        "{text}"
    );
    assert!(!text.contains(&token), "only the hash is stored");
    // Second init refuses to overwrite.
    assert_eq!(keygate(&["init", kdir.to_str().unwrap()]).0, 1);

    assert_eq!(
        keygate(&["check", "-c", cfg.to_str().unwrap()]).1.trim(),
        "ok"
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["run", "-c", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    read_until(&mut out, "listening", |l| {
        l.contains("\"msg\":\"listening\"").then(String::new)
    });
    let cacert = kdir.join("cert.pem").to_str().unwrap().to_string();
    let url = format!("https://localhost:{port}/x");
    let hdr = format!("Authorization: Bearer {token}");
    let (code, body, err) =
        tokio::task::spawn_blocking(move || curl(&["-sS", "--cacert", &cacert, "-H", &hdr, &url]))
            .await
            .unwrap();
    assert_eq!((code, body.as_str()), (0, "ok"), "{err}");
    let (code, body, _) = tokio::task::spawn_blocking(move || {
        curl(&["-sS", &format!("http://127.0.0.1:{admin}/healthz")])
    })
    .await
    .unwrap();
    assert_eq!((code, body.trim()), (0, "ok"));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A second fresh user: with the port taken, `demo` printed the key and the curl line, then
/// exited "Address already in use", and the printed curl reached the other process. Now it
/// says so before printing any key.
#[test]
fn demo_on_a_taken_port_prints_no_key_and_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, out, err) = keygate(&[
        "demo",
        "--listen",
        &addr,
        "--upstream",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(!out.contains("kg_") && !out.contains("API key"), "{out}");
    assert!(err.contains(&addr) && err.contains("--listen"), "{err}");
}

/// T5-9: a `[state] path` whose directory is missing, or cannot be written (even by root:
/// `/proc`), passed `check` and `run` served without ever saving usage, quotas or network
/// history (a `3/day` quota started again at every restart). Both refuse it now, naming
/// `state.path`; a writable one passes.
#[test]
fn check_and_run_refuse_a_state_path_that_cannot_be_written() {
    let (_, hash) = new_key("k");
    for (path, says) in [
        ("missing/dir/state.json", "does not exist"),
        (
            "/proc/keygate-state.json",
            "cannot write the state file's directory /proc",
        ),
    ] {
        let (_dir, cfg) = Keygate::builder()
            .key("k", &hash, "")
            .raw(&format!("[state]\npath = {path:?}\n"))
            .config_dir();
        let (code, out, err) = keygate_cli(&["check"], &cfg);
        assert_eq!(code, 1, "{path}: {out}{err}");
        assert!(err.contains("state.path: ") && err.contains(says), "{err}");
        let (code, out, err) = run_refused(&cfg, &[]);
        assert_eq!(code, 1, "keygate run: {out}{err}");
        assert!(format!("{out}{err}").contains("state.path"), "{out}{err}");
    }
    let (_dir, cfg) = Keygate::builder().key("k", &hash, "").state().config_dir();
    let (code, out, err) = keygate_cli(&["check"], &cfg);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
}

/// T5-8: counts and sizes whose cost is memory or descriptors per unit had lower bounds only:
/// `workers = 5000`, a 100 GB `max_header_bytes` or 10 000 argon2 verifications at once passed
/// `check`. Each is named by TOML path now; the bounds themselves pass. And a worker event
/// loop that cannot be made (here: 64 workers under a 64-descriptor limit) is a start error
/// naming `server.workers`, before any "listening" line.
#[test]
fn check_bounds_counts_and_sizes_whose_cost_is_per_unit() {
    let (_, hash) = new_key("k");
    let config = |server: &[&str], auth: &[&str]| {
        let mut b = Keygate::builder().key("k", &hash, "");
        for l in server {
            b = b.server(l);
        }
        for l in auth {
            b = b.auth(l);
        }
        b.config_dir()
    };
    let (_dir, cfg) = config(
        &[
            "workers = 5000",
            "max_header_bytes = 99999999999",
            "h2_max_concurrent_streams = 100000",
        ],
        &[
            "verify_concurrency = 10000",
            "failed_auth_max_clients = 100000000",
        ],
    );
    let (code, out, err) = keygate_cli(&["check"], &cfg);
    assert_eq!(code, 1, "{out}{err}");
    for path in [
        "server.workers: must be at most 1024",
        "server.max_header_bytes: must be at most 1048576",
        "server.h2_max_concurrent_streams: must be at most 1000",
        "auth.verify_concurrency: must be at most 64",
        "auth.failed_auth_max_clients: must be at most 1000000",
    ] {
        assert!(err.contains(path), "{path}: {err}");
    }
    let (_dir, cfg) = config(
        &[
            "workers = 1024",
            "max_header_bytes = 1048576",
            "h2_max_concurrent_streams = 1000",
        ],
        &[
            "verify_concurrency = 64",
            "failed_auth_max_clients = 1000000",
        ],
    );
    let (code, out, err) = keygate_cli(&["check"], &cfg);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");

    let (_dir, cfg) = config(&["workers = 64"], &[]);
    let (code, out, err) = run_refused(&cfg, &["prlimit", "--nofile=64:64"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("server.workers = 64: cannot start event loop"),
        "{out}{err}"
    );
    assert!(!out.contains("\"listening\""), "{out}");
}

/// A fresh user (T6-6): `upstream.url` with a query is refused, but the refusal repeated the
/// whole URL, query (`?api_key=…`) included, in `check`'s output (and the reload log). Errors
/// about the upstream URL show it without its query or fragment.
#[test]
fn upstream_url_errors_never_repeat_its_query() {
    let (_, hash) = new_key("k");
    for url in [
        "http://127.0.0.1:8000/api?api_key=LeakMe9secret",
        "ftp://127.0.0.1:8000/?token=LeakMe9secret",
        "http://127.0.0.1:8000/base#frag?token=LeakMe9secret",
        "http://127.0.0.1:8000/#LeakMe9secret",
    ] {
        let (_dir, cfg) = Keygate::builder()
            .upstream_url(url)
            .key("k", &hash, "")
            .config_dir();
        let (code, out, err) = keygate_cli(&["check"], &cfg);
        assert_eq!(code, 1, "{url}: {out}{err}");
        assert!(err.contains("upstream.url"), "{err}");
        assert!(
            !format!("{out}{err}").contains("LeakMe9"),
            "{url}: {out}{err}"
        );
    }
}

//! Operating signed webhook routes (issue 13): `keygate check` and reload refuse a route that
//! would hide the introspection endpoint, and `keygate webhook sign` gives an operator the
//! headers to test a route with curl.

mod common;

use std::process::{Command, Stdio};

use common::webhooks::*;
use common::*;

/// A config directory (certificate, key, keygate.toml) for `keygate check` and friends.
fn config_dir(builder: KeygateBuilder) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = test_cert();
    std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), key).unwrap();
    let config = dir.path().join("keygate.toml");
    std::fs::write(&config, builder.config_text()).unwrap();
    (dir, config)
}

/// Runs the keygate binary with `env`; returns (exit code, stdout, stderr).
fn keygate(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn route(path: &str) -> String {
    format!(
        "[[webhooks]]\nid = \"hook\"\npath = \"{path}\"\nscheme = \"github\"\nsecret = {{ env = \"WH_SECRET\" }}\n"
    )
}

/// Webhook routes are matched before API-key authentication, so a route over the introspection
/// endpoint would hand its path to whoever can sign (or to nobody). Every way of sharing a
/// request path with it is refused, by TOML path, at check and at reload.
#[tokio::test]
async fn a_webhook_route_may_not_share_a_path_with_the_introspection_endpoint() {
    let (_, hash) = new_key("app");
    let env = [("WH_SECRET", "not-printed-8c1f2a")];
    let check = |introspection: &str, path: &str| {
        let b = Keygate::builder()
            .key("app", &hash, "")
            .raw(introspection)
            .raw(&route(path));
        let (_dir, config) = config_dir(b);
        keygate(&["check", "-c", config.to_str().unwrap()], &env, b"")
    };
    for (introspection, path) in [
        ("", "/.well-known/keygate/key"),
        ("", "/.well-known/keygate/key/"),
        ("", "/.well-known/keygate/key/deliveries"),
        ("", "/.well-known/keygate/key/in/"),
        ("", "/.well-known/keygate/"),
        ("", "/.well-known/"),
        ("", "/"),
        ("[introspection]\npath = \"/me\"", "/me"),
        ("[introspection]\npath = \"/me/\"", "/me/hooks/"),
    ] {
        let (code, out, err) = check(introspection, path);
        assert_eq!(code, 1, "{path} with {introspection:?}: {out}{err}");
        assert!(
            err.contains("webhooks[0].path") && err.contains("introspection"),
            "{path}: {err}"
        );
        assert!(!err.contains("not-printed-8c1f2a"), "{err}");
    }
    for (introspection, path) in [
        ("", "/.well-known/keygate"),
        ("", "/.well-known/keygate/keys"),
        ("", "/hooks/"),
        (
            "[introspection]\npath = \"/me\"",
            "/.well-known/keygate/key",
        ),
        ("[introspection]\nenabled = false", "/.well-known/"),
    ] {
        let (code, out, err) = check(introspection, path);
        assert_eq!(
            (code, out.trim()),
            (0, "ok"),
            "{path} with {introspection:?}: {err}"
        );
    }

    // Reload: refused, logged, and the old routes keep serving.
    let up = RecordingUpstream::start().await;
    let kg = Keygate::builder()
        .upstream_url(&up.url())
        .key("app", &hash, "")
        .raw(&route("/hooks/gh"))
        .start_with(&env, None);
    let config = std::fs::read_to_string(&kg.config).unwrap();
    std::fs::write(
        &kg.config,
        config.replace("\"/hooks/gh\"", "\"/.well-known/keygate/\""),
    )
    .unwrap();
    kg.signal("HUP");
    let failed = kg.wait_log("reload refused", |v| v["event"] == "config_reload_failed");
    assert!(failed.to_string().contains("webhooks[0].path"), "{failed}");
    let body = b"{\"ok\":true}";
    let headers = sign_github("not-printed-8c1f2a", body, "d-1");
    let got = kg
        .client()
        .send(post(&kg.url("/hooks/gh"), &headers, body))
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(up.count(), 1);
    assert_no_secrets(&kg.logs(), &["not-printed-8c1f2a"]);
}

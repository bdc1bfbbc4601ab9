//! Webhook secrets from a file and from a systemd credential ($CREDENTIALS_DIRECTORY), beside
//! the environment (issue 13 §7): read at start, re-read on every reload (rotate the file,
//! SIGHUP: the old secret is refused, the new one accepted); a reference that is missing or
//! empty at reload keeps the old configuration serving (config_reload_failed); `keygate check`
//! names each bad reference by TOML path and never prints a value. Every secret and payload
//! sent is looked for in all of keygate's output.

mod common;

use std::time::{Duration, Instant};

use common::webhooks::*;
use common::*;

const ROUTES: &str = r#"
[[webhooks]]
id = "from-file"
path = "/hooks/file"
scheme = "github"
secrets = [{ file = "SECRET_FILE" }]

[[webhooks]]
id = "from-cred"
path = "/hooks/cred"
scheme = "hmac-sha256-hex"
secret = { credential = "docs-webhook" }

[[webhooks]]
id = "from-env"
path = "/hooks/env"
scheme = "github"
secret = { env = "HOOK_ENV_SECRET" }
"#;

/// Waits for the `n`th event named `event` (counting from the start of the log).
fn wait_nth(kg: &Keygate, event: &str, n: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = kg.events(event);
        if all.len() >= n {
            return all[n - 1].clone();
        }
        assert!(Instant::now() < deadline, "no {event} #{n}:\n{}", kg.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_and_credential_secrets_are_read_and_re_read_on_reload() {
    let up = RecordingUpstream::start().await;
    let (_, hash) = new_key("app");
    let creds = tempfile::tempdir().unwrap();
    let cred_file = creds.path().join("docs-webhook");
    let sent = std::sync::Mutex::new(Vec::<String>::new());
    let file_v1 = unique_secret("file-secret-v1-");
    let cred_v1 = unique_secret("cred-secret-v1-");
    let env_secret = unique_secret("env-secret-");
    sent.lock()
        .unwrap()
        .extend([file_v1.clone(), cred_v1.clone(), env_secret.clone()]);
    std::fs::write(&cred_file, format!("{cred_v1}\n")).unwrap();
    // The file route's secret: an absolute path outside the config directory (a relative one
    // is read from the config's directory: see the check test below).
    let secrets_dir = tempfile::tempdir().unwrap();
    let secret_file = secrets_dir.path().join("github-hook");
    std::fs::write(&secret_file, format!("{file_v1}\n")).unwrap();
    let kg = Keygate::builder()
        .upstream_url(&up.url())
        .key("app", &hash, "")
        .raw(&ROUTES.replace("SECRET_FILE", secret_file.to_str().unwrap()))
        .start_with(
            &[
                ("HOOK_ENV_SECRET", env_secret.as_str()),
                ("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap()),
            ],
            None,
        );
    let c = kg.client();
    let n = std::cell::Cell::new(0u32);
    let deliver = |path: &'static str, scheme: &'static str, secret: &str| {
        n.set(n.get() + 1);
        let n = n.get();
        let body = format!(
            "{{\"payload\":\"{}\",\"n\":{n}}}",
            unique_secret("payload-")
        );
        sent.lock().unwrap().push(body.clone());
        let headers = match scheme {
            "github" => sign_github(secret, body.as_bytes(), &format!("d-{n}")),
            _ => sign_hex(secret, body.as_bytes()),
        };
        let req = post(&kg.url(path), &headers, body.as_bytes());
        let c = &c;
        async move { c.send(req).await.status }
    };
    assert_eq!(deliver("/hooks/file", "github", &file_v1).await, 200);
    assert_eq!(deliver("/hooks/cred", "hex", &cred_v1).await, 200);
    assert_eq!(deliver("/hooks/env", "github", &env_secret).await, 200);
    assert_eq!(up.count(), 3);

    // Rotate both sources in place (as an operator or a secret manager would), reload.
    let file_v2 = unique_secret("file-secret-v2-");
    let cred_v2 = unique_secret("cred-secret-v2-");
    sent.lock()
        .unwrap()
        .extend([file_v2.clone(), cred_v2.clone()]);
    std::fs::write(&secret_file, &file_v2).unwrap();
    std::fs::write(&cred_file, format!("{cred_v2}\r\n")).unwrap();
    kg.signal("HUP");
    wait_nth(&kg, "config_reloaded", 1);
    assert_eq!(deliver("/hooks/file", "github", &file_v1).await, 401);
    assert_eq!(deliver("/hooks/cred", "hex", &cred_v1).await, 401);
    assert_eq!(deliver("/hooks/file", "github", &file_v2).await, 200);
    assert_eq!(deliver("/hooks/cred", "hex", &cred_v2).await, 200);
    assert_eq!(deliver("/hooks/env", "github", &env_secret).await, 200);
    assert_eq!(up.count(), 6);

    // A reference that is empty or gone at reload: refused by TOML path, old config serves.
    let mut failures = 0;
    for (what, break_it, path_in_error, restore) in [
        (
            "empty file",
            Box::new(|| std::fs::write(&secret_file, "\n").unwrap()) as Box<dyn Fn()>,
            "webhooks[0].secrets[0]",
            Box::new(|| std::fs::write(&secret_file, &file_v2).unwrap()) as Box<dyn Fn()>,
        ),
        (
            "missing file",
            Box::new(|| std::fs::remove_file(&secret_file).unwrap()),
            "webhooks[0].secrets[0]",
            Box::new(|| std::fs::write(&secret_file, &file_v2).unwrap()),
        ),
        (
            "empty credential",
            Box::new(|| std::fs::write(&cred_file, "").unwrap()),
            "webhooks[1].secret",
            Box::new(|| std::fs::write(&cred_file, &cred_v2).unwrap()),
        ),
        (
            "missing credential",
            Box::new(|| std::fs::remove_file(&cred_file).unwrap()),
            "webhooks[1].secret",
            Box::new(|| std::fs::write(&cred_file, &cred_v2).unwrap()),
        ),
    ] {
        break_it();
        kg.signal("HUP");
        failures += 1;
        let ev = wait_nth(&kg, "config_reload_failed", failures);
        let error = ev["error"].as_str().unwrap_or_default();
        assert!(error.contains(path_in_error), "{what}: {ev}");
        // Still the last good secrets, on every route.
        assert_eq!(
            deliver("/hooks/file", "github", &file_v2).await,
            200,
            "{what}"
        );
        assert_eq!(deliver("/hooks/cred", "hex", &cred_v2).await, 200, "{what}");
        restore();
    }
    assert_eq!(kg.events("config_reloaded").len(), 1);
    kg.signal("HUP");
    wait_nth(&kg, "config_reloaded", 2);
    assert_eq!(deliver("/hooks/file", "github", &file_v2).await, 200);

    let logs = kg.logs();
    let sent = sent.lock().unwrap();
    assert_no_secrets(&logs, &sent.iter().map(String::as_str).collect::<Vec<_>>());
}

/// One `keygate check` of a config whose routes reference secrets in every broken way names
/// each by TOML path and says what is wrong, and prints none of the values it could read.
#[test]
fn check_names_each_missing_or_empty_reference_by_toml_path_and_never_a_value() {
    let (_, hash) = new_key("app");
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), None);
    let creds = tempfile::tempdir().unwrap();
    let good_file = unique_secret("good-file-");
    let good_cred = unique_secret("good-cred-");
    let good_env = unique_secret("good-env-");
    let literal = unique_secret("pasted-literal-");
    let bad_whsec = format!("whsec_{}!!", unique_secret("notbase64"));
    std::fs::write(dir.path().join("hook-secret"), &good_file).unwrap();
    std::fs::write(dir.path().join("empty-secret"), "\n").unwrap();
    std::fs::write(creds.path().join("good"), &good_cred).unwrap();
    std::fs::write(creds.path().join("empty"), "").unwrap();
    let route = |i: usize, secrets: &str| {
        format!(
            "[[webhooks]]\nid = \"r{i}\"\npath = \"/hooks/r{i}\"\nscheme = \"github\"\n{secrets}\n"
        )
    };
    let routes = [
        // 0: fine (relative file, credential, env); 1..: one broken reference each.
        route(
            0,
            "secrets = [{ file = \"hook-secret\" }, { credential = \"good\" }, { env = \"GOOD_ENV\" }]",
        ),
        route(1, "secrets = [{ env = \"GOOD_ENV\" }, { env = \"UNSET_ENV\" }]"),
        route(2, "secret = { env = \"EMPTY_ENV\" }"),
        route(3, "secrets = [{ file = \"no-such-secret\" }]"),
        route(4, "secrets = [{ file = \"empty-secret\" }]"),
        route(5, "secret = { credential = \"absent\" }"),
        route(6, "secret = { credential = \"empty\" }"),
        route(7, "secrets = [{ credential = \"../hook-secret\" }]"),
        "[[webhooks]]\nid = \"r8\"\npath = \"/hooks/r8\"\nscheme = \"standard-webhooks\"\nsecret = { env = \"BAD_WHSEC\" }\n".to_string(),
        route(9, &format!("secret = \"{literal}\"")),
    ];
    let config = dir.path().join("keygate.toml");
    let text = Keygate::builder()
        .key("app", &hash, "")
        .raw(&routes[..routes.len() - 1].join("\n"))
        .config_text();
    std::fs::write(&config, &text).unwrap();
    let env = [
        ("GOOD_ENV", good_env.as_str()),
        ("EMPTY_ENV", ""),
        ("BAD_WHSEC", bad_whsec.as_str()),
        ("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap()),
    ];
    let run = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["check", "-c", config.to_str().unwrap()])
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("UNSET_ENV")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (code, out) = run(&env);
    assert_eq!(code, Some(1), "{out}");
    for (path, what) in [
        (
            "webhooks[1].secrets[1]",
            "environment variable UNSET_ENV is not set",
        ),
        (
            "webhooks[2].secret",
            "environment variable EMPTY_ENV is empty",
        ),
        ("webhooks[3].secrets[0]", "no-such-secret"),
        ("webhooks[4].secrets[0]", "is empty"),
        ("webhooks[5].secret", "credential absent"),
        ("webhooks[6].secret", "credential empty"),
        ("webhooks[7].secrets[0]", "invalid credential name"),
        ("webhooks[8].secret", "not a Standard Webhooks secret"),
    ] {
        let line = out
            .lines()
            .find(|l| l.contains(path))
            .unwrap_or_else(|| panic!("{path} not named:\n{out}"));
        assert!(line.contains(what), "{path}: {line}");
    }
    assert!(!out.contains("webhooks[0]"), "route 0 is fine:\n{out}");
    // Without $CREDENTIALS_DIRECTORY (not under systemd): said so, by path.
    let (code, out2) = run(&env[..3]);
    assert_eq!(code, Some(1));
    let line = out2
        .lines()
        .find(|l| l.contains("webhooks[0].secrets[1]"))
        .unwrap_or_default();
    assert!(line.contains("CREDENTIALS_DIRECTORY is not set"), "{out2}");

    // A literal pasted where a reference belongs: named, not echoed.
    std::fs::write(
        &config,
        Keygate::builder()
            .key("app", &hash, "")
            .raw(&routes[9])
            .config_text(),
    )
    .unwrap();
    let (code, out3) = run(&env);
    assert_eq!(code, Some(1));
    assert!(
        out3.contains("webhooks[0].secret") && out3.contains("must be a reference"),
        "{out3}"
    );

    let all = format!("{out}{out2}{out3}");
    assert_no_secrets(
        &all,
        &[
            &good_file,
            &good_cred,
            &good_env,
            &literal,
            &bad_whsec,
            &bad_whsec[6..],
        ],
    );
}

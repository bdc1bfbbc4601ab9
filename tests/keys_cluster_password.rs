//! `keygate keys` on a cluster host whose Redis password does not resolve in the operator's
//! shell (fresh user T5-23): always the case with `{ credential = … }` (systemd
//! `LoadCredential=`, only the unit's processes get `$CREDENTIALS_DIRECTORY`) and with an
//! `{ env = … }` the shell lacks. It used to refuse to run ("invalid config"); now it warns on
//! stderr, says how to run it with the credential, and lists the keys from the local state
//! file, as when Redis cannot be read. With the credential (here `$CREDENTIALS_DIRECTORY` set
//! as systemd sets it) it shows the cluster's figures. Real `redis-server` with a password.

mod common;

use std::process::Command;

use common::cli::captured;
use common::redis::Redis;
use common::*;

const PASSWORD: &str = "redis-pw-Secret-7f3a";

fn keys(config: &std::path::Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    cmd.args(["keys", "-c"])
        .arg(config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("KG_REDIS_PW");
    for (k, v) in env {
        cmd.env(k, v);
    }
    captured(cmd.output().unwrap())
}

#[test]
fn keys_falls_back_to_the_state_file_when_the_cluster_password_does_not_resolve() {
    let redis = Redis::start();
    // The cluster saw key `web` last from 192.0.2.77; this host's state file never did.
    redis.cli(&["SET", "keygate:lu:web", "1790000000 192.0.2.77"]);
    assert_eq!(redis.cli(&["CONFIG", "SET", "requirepass", PASSWORD]), "OK");
    let (_token, hash) = new_key("web");
    for reference in ["{ credential = \"redis-pw\" }", "{ env = \"KG_REDIS_PW\" }"] {
        let (dir, config) = Keygate::builder()
            .key("web", &hash, "")
            .state()
            .raw(&format!(
                "[cluster]\nredis = \"{}\"\npassword = {reference}\ninstance = \"a\"\n",
                redis.url()
            ))
            .config_dir();

        // An operator's shell: the reference does not resolve.
        let (code, out, err) = keys(&config, &[]);
        assert_eq!(code, 0, "{reference}: old code: 1, invalid config:\n{err}");
        assert!(
            err.contains("warning: cluster mode, but cluster.password cannot be resolved here"),
            "{err}"
        );
        assert!(err.contains("this host's state file only"), "{err}");
        assert!(err.contains("systemd-run"), "says how to run it: {err}");
        assert!(out.lines().any(|l| l.starts_with("web")), "{out}");
        assert!(!out.contains("192.0.2.77"), "Redis not read: {out}");
        assert!(out.contains("come from the state file"), "{out}");
        assert_no_secrets(&(out + &err), &[PASSWORD]);

        // With the credential, as the unit (or `systemd-run -p LoadCredential=…`) has it.
        let creds = dir.path().join("creds");
        std::fs::create_dir_all(&creds).unwrap();
        std::fs::write(creds.join("redis-pw"), PASSWORD).unwrap();
        let env: Vec<(&str, &str)> = if reference.contains("credential") {
            vec![("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())]
        } else {
            vec![("KG_REDIS_PW", PASSWORD)]
        };
        let (code, out, err) = keys(&config, &env);
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains("warning"), "{err}");
        let row = out.lines().find(|l| l.starts_with("web")).unwrap();
        assert!(row.contains("192.0.2.77"), "the cluster's last use: {out}");
        assert!(out.contains("read from Redis"), "{out}");
        assert_no_secrets(&(out + &err), &[PASSWORD]);
    }
}

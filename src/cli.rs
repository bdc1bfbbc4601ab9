//! The `keygate` command line (SPEC §1).

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::auth::{NewToken, hash_token, token::is_valid_id};
use crate::config::{self, BuildContext, TlsSource, raw::RawConfig};

#[derive(Parser, Debug)]
#[command(
    name = "keygate",
    version,
    about = "Authenticating TLS reverse proxy: API keys in front of services that have none."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve with a config file. Logs go to stdout.
    Run {
        /// Config file.
        #[arg(short, long, default_value = "/etc/keygate/keygate.toml")]
        config: PathBuf,
    },
    /// Load and fully validate a config file; print `ok` or every problem with its TOML path.
    Check {
        #[arg(short, long, default_value = "/etc/keygate/keygate.toml")]
        config: PathBuf,
    },
    /// Make a new API key: prints the token once and the [[keys]] snippet with its argon2id hash.
    Keygen {
        /// Key id: [a-z0-9-], 1 to 32 characters.
        #[arg(long)]
        id: String,
        /// One JSON line: {"id":…,"token":…,"hash":…}
        #[arg(long)]
        json: bool,
    },
    /// Read a token from stdin, print its argon2id PHC hash.
    Hash,
    /// List configured keys: status, expiry, last use, rotation warnings.
    Keys {
        #[arg(short, long, default_value = "/etc/keygate/keygate.toml")]
        config: PathBuf,
    },
    /// First run, no files needed: serve 127.0.0.1:8443 → http://127.0.0.1:8000 with a
    /// throwaway certificate and key. NOT FOR PRODUCTION.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        upstream: String,
        /// Also start the admin listener (healthz, readyz, metrics) on this address.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Write a starter config, self-signed certificate and one key into DIR, for `run`.
    Init {
        dir: PathBuf,
        /// Upstream URL to put in the config.
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        upstream: String,
    },
}

pub fn main(cli: Cli) -> ExitCode {
    crate::tls::install_default_provider();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Keygen { id, json } => keygen(&id, json),
        Command::Hash => hash(),
        Command::Keys { config } => keys(&config),
        Command::Demo {
            listen,
            upstream,
            admin,
        } => demo(&listen, &upstream, admin.as_deref()),
        Command::Init { dir, upstream } => init(&dir, &upstream),
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "keygate: {msg}");
    ExitCode::FAILURE
}

fn load(path: &Path) -> Result<config::Snapshot, config::ConfigErrors> {
    let raw = config::load_file(path)?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    config::build(
        raw,
        &BuildContext {
            base_dir,
            ..Default::default()
        },
    )
}

fn run(path: &Path) -> ExitCode {
    let snapshot = match load(path) {
        Ok(s) => s,
        Err(e) => return fail(format!("invalid config {}:\n{e}", path.display())),
    };
    let log = crate::log::init(snapshot.log.json, snapshot.log.level);
    install_panic_hook();
    match crate::server::run(
        crate::server::Source::File(path.to_path_buf()),
        snapshot,
        log,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// For the serving commands. A panic in a connection or request task is caught by tokio: that
/// connection closes, the process and every other connection carry on (release builds keep
/// `panic = "unwind"` for this). But the default hook would print the panic message to stderr,
/// and a message can hold request data (an `unwrap` on an error that quotes a header value).
/// This hook logs where it happened, never what: `event="panic"` with the source location.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let (file, line) = info
            .location()
            .map_or(("<unknown>", 0), |l| (l.file(), l.line()));
        let thread = std::thread::current();
        tracing::error!(
            event = "panic",
            file,
            line,
            thread = thread.name().unwrap_or("<unnamed>"),
            "a task panicked; its connection was closed (message withheld: it may hold request data)"
        );
    }));
}

fn check(path: &Path) -> ExitCode {
    match load(path) {
        Ok(s) => {
            for w in &s.warnings {
                let _ = writeln!(std::io::stderr(), "warning: {w}");
            }
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{e}");
            ExitCode::FAILURE
        }
    }
}

/// The `[[keys]]` snippet for a new key.
fn snippet(id: &str, hash: &str) -> String {
    let created = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ");
    format!("[[keys]]\nid = \"{id}\"\nhash = \"{hash}\"\ncreated = {created}\n")
}

fn keygen(id: &str, json: bool) -> ExitCode {
    if !is_valid_id(id) {
        return fail(format!(
            "invalid key id {id:?}: use [a-z0-9-], 1 to 32 characters"
        ));
    }
    let token = NewToken::generate(id);
    let hash = hash_token(token.reveal().as_bytes());
    if json {
        println!(
            "{}",
            serde_json::json!({"id": id, "token": token.reveal(), "hash": hash})
        );
    } else {
        println!(
            "New API key {id:?}. The token is shown only this once; give it to the client now:\n"
        );
        println!("    {}\n", token.reveal());
        println!("Add this to the config, then reload (systemctl reload keygate):\n");
        print!("{}", snippet(id, &hash));
    }
    ExitCode::SUCCESS
}

fn hash() -> ExitCode {
    let mut input = String::new();
    if std::io::stdin()
        .take(4096)
        .read_to_string(&mut input)
        .is_err()
    {
        return fail("cannot read a token from stdin");
    }
    let token = input.trim();
    if crate::auth::Token::parse(token).is_err() {
        // Never echo what was typed.
        return fail("stdin does not hold a keygate token (kg_<id>_<secret><check>)");
    }
    println!("{}", hash_token(token.as_bytes()));
    ExitCode::SUCCESS
}

fn keys(path: &Path) -> ExitCode {
    let raw = match config::load_file(path) {
        Ok(r) => r,
        Err(e) => return fail(format!("invalid config {}:\n{e}", path.display())),
    };
    let state_cfg = raw.state.as_ref().and_then(|s| s.path.clone());
    let rotation = raw
        .state
        .as_ref()
        .and_then(|s| s.rotation_period.as_deref())
        .map(config::parse_duration)
        .transpose();
    let rotation = match rotation {
        Ok(r) => r.unwrap_or(std::time::Duration::from_secs(90 * 86_400)),
        Err(e) => return fail(format!("state.rotation_period: {e}")),
    };
    let snap = match load(path) {
        Ok(s) => s,
        Err(e) => return fail(format!("invalid config {}:\n{e}", path.display())),
    };
    let usage = match state_cfg {
        Some(p) => {
            let p = path.parent().unwrap_or(Path::new(".")).join(p);
            match crate::usage::read_state(&p) {
                Ok(u) => u,
                Err(e) => return fail(e),
            }
        }
        None => Default::default(),
    };
    print!(
        "{}",
        crate::keys_report::render(&snap, &usage, rotation, jiff::Timestamp::now())
    );
    ExitCode::SUCCESS
}

fn self_signed() -> Result<(Vec<u8>, Vec<u8>), String> {
    let ck = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(|e| e.to_string())?;
    Ok((
        ck.cert.pem().into_bytes(),
        ck.signing_key.serialize_pem().into_bytes(),
    ))
}

fn demo(listen: &str, upstream: &str, admin: Option<&str>) -> ExitCode {
    let (cert, key) = match self_signed() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot make a certificate: {e}")),
    };
    let token = NewToken::generate("demo");
    let hash = hash_token(token.reveal().as_bytes());
    let mut text = format!(
        "[server]\nlisten = {listen:?}\n[upstream]\nurl = {upstream:?}\n[log]\nformat = \"text\"\n[[keys]]\nid = \"demo\"\nhash = \"{hash}\"\n"
    );
    if let Some(a) = admin {
        text.push_str(&format!("[admin]\nlisten = {a:?}\n"));
    }
    let raw: RawConfig = match config::raw_from_str(&text) {
        Ok(r) => r,
        Err(e) => return fail(format!("invalid demo settings:\n{e}")),
    };
    let snapshot = match config::build(
        raw,
        &BuildContext {
            tls_override: Some(TlsSource::Pem { cert, key }),
            ..Default::default()
        },
    ) {
        Ok(s) => s,
        Err(e) => return fail(format!("invalid demo settings:\n{e}")),
    };
    let port = snapshot.server.listen.port();
    let stars = "*".repeat(72);
    println!("{stars}");
    println!("  keygate DEMO: a throwaway self-signed certificate and key, held in memory only.");
    println!(
        "  NOT FOR PRODUCTION. For a real setup: keygate init DIR, then keygate run -c DIR/keygate.toml"
    );
    println!("{stars}");
    println!("  Proxying https://{listen} -> {upstream}");
    println!("  API key (shown once): {}", token.reveal());
    println!(
        "  Try:  curl -k -H 'X-API-Key: {}' https://localhost:{port}/",
        token.reveal()
    );
    println!("{stars}");
    let _ = std::io::stdout().flush();
    drop(token);
    let log = crate::log::init(snapshot.log.json, snapshot.log.level);
    install_panic_hook();
    match crate::server::run(crate::server::Source::InMemory, snapshot, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn init(dir: &Path, upstream: &str) -> ExitCode {
    let config_path = dir.join("keygate.toml");
    if config_path.exists() {
        return fail(format!(
            "{} exists already; not overwriting",
            config_path.display()
        ));
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        return fail(format!("cannot create {}: {e}", dir.display()));
    }
    let (cert, key) = match self_signed() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot make a certificate: {e}")),
    };
    let token = NewToken::generate("first");
    let hash = hash_token(token.reveal().as_bytes());
    let text = format!(
        "# Written by `keygate init`. Every option: see config.example.toml.\n\
         [server]\nlisten = \"127.0.0.1:8443\"\n\n\
         [tls]\n# Self-signed for localhost: replace with a real certificate (see certs/README.md).\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\n\
         [upstream]\nurl = {upstream:?}\n\n\
         [admin]\nlisten = \"127.0.0.1:9901\"\n\n\
         [state]\npath = \"state.json\"\n\n{}",
        snippet("first", &hash)
    );
    let write = |name: &str, bytes: &[u8], mode: u32| -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(dir.join(name))?;
        f.write_all(bytes)
    };
    for (name, bytes, mode) in [
        ("key.pem", &key[..], 0o600),
        ("cert.pem", &cert[..], 0o644),
        ("keygate.toml", text.as_bytes(), 0o640),
    ] {
        if let Err(e) = write(name, bytes, mode) {
            return fail(format!("cannot write {}: {e}", dir.join(name).display()));
        }
    }
    println!(
        "Wrote {}, cert.pem and key.pem (self-signed for localhost).",
        config_path.display()
    );
    println!("API key \"first\" (shown once): {}", token.reveal());
    println!("Start:  keygate run -c {}", config_path.display());
    println!(
        "Try:    curl --cacert {} -H 'X-API-Key: {}' https://localhost:8443/",
        dir.join("cert.pem").display(),
        token.reveal()
    );
    ExitCode::SUCCESS
}

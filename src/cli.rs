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
    /// Make a new API key. stdout gets only the [[keys]] snippet (argon2id hash), so
    /// `keygate keygen --id NAME >> keygate.toml` is safe; the token is printed once on stderr.
    Keygen {
        /// Key id: [a-z0-9-], 1 to 32 characters.
        #[arg(long)]
        id: String,
        /// One JSON line on stdout: {"id":…,"token":…,"hash":…}
        #[arg(long, conflicts_with = "token_stdout")]
        json: bool,
        /// The other way round: the token alone on stdout (for a secret store), the snippet on
        /// stderr.
        #[arg(long)]
        token_stdout: bool,
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
    /// Write a starter config, a self-signed certificate (valid 90 days) and one key into DIR.
    /// Run as root on /etc/keygate, the files are root:keygate 0640 and the state file goes to
    /// /var/lib/keygate: ready for the systemd unit.
    Init {
        dir: PathBuf,
        /// Upstream URL to put in the config.
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        upstream: String,
        /// Public listener. The default accepts clients on every IPv4 address; "[::]:8443" adds
        /// IPv6, "127.0.0.1:8443" allows local clients only.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: String,
        /// Admin listener (healthz, readyz, metrics; plain HTTP, keep it on loopback). Change
        /// it when several instances share a host, or when 9901 is taken.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
        /// Group that may read the files (the service's). Default: `keygate` when run as root
        /// and that group exists, else the caller's own.
        #[arg(long)]
        group: Option<String>,
        /// Key-usage state file. Default: /var/lib/keygate/state.json (the unit's
        /// StateDirectory) when run as root, else state.json in DIR.
        #[arg(long)]
        state: Option<String>,
    },
    /// Signed webhook routes ([[webhooks]]): tools for testing a route by hand.
    Webhook {
        #[command(subcommand)]
        command: WebhookCommand,
    },
    /// Write the man pages and shell completions (bash, zsh, fish) into DIR (packaging).
    #[command(hide = true)]
    Assets { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum WebhookCommand {
    /// Print the headers a sender would add to a body (stdin) for a webhook route.
    ///
    /// The signature, and the timestamp and delivery id where the scheme has them. The secret
    /// comes from the route's own reference (env, file or credential, as `run` reads it) and is
    /// never printed. Default output: one `-H 'Name: value'` argument per line, to paste into
    /// curl; with --plain, `Name: value` lines for `curl -H @FILE`. Example
    /// (docs/webhooks.md has more):
    ///
    ///   keygate webhook sign --route docs --plain < event.json > headers.txt
    ///   curl --data-binary @event.json -H @headers.txt https://HOST:8443/hooks/docs
    #[command(verbatim_doc_comment)]
    Sign {
        /// The route's `id` in [[webhooks]].
        #[arg(long)]
        route: String,
        #[arg(short, long, default_value = "/etc/keygate/keygate.toml")]
        config: PathBuf,
        /// Which of the route's secrets signs: its position in `secrets`, from 0 (rotation:
        /// try the new secret before moving the sender).
        #[arg(long, default_value_t = 0)]
        secret_index: usize,
        /// The delivery id (standard-webhooks `webhook-id`; for github `X-GitHub-Delivery`, or
        /// the route's `id_from` header). Default: a new random `msg_…` id. Sign again with the
        /// same id to see a duplicate answered by keygate.
        #[arg(long)]
        id: Option<String>,
        /// Unix time to sign with (stripe, standard-webhooks). Default: now. An old one shows
        /// the route's `tolerance` at work.
        #[arg(long)]
        timestamp: Option<i64>,
        /// `Name: value` lines instead of `-H '…'` (for `curl -H @FILE`).
        #[arg(long)]
        plain: bool,
    },
}

pub fn main(cli: Cli) -> ExitCode {
    crate::tls::install_default_provider();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Keygen {
            id,
            json,
            token_stdout,
        } => keygen(&id, json, token_stdout),
        Command::Hash => hash(),
        Command::Keys { config } => keys(&config),
        Command::Demo {
            listen,
            upstream,
            admin,
        } => demo(&listen, &upstream, admin.as_deref()),
        Command::Init {
            dir,
            upstream,
            listen,
            admin,
            group,
            state,
        } => init(&InitOptions {
            dir: &dir,
            upstream: &upstream,
            listen: &listen,
            admin: &admin,
            group: group.as_deref(),
            state: state.as_deref(),
        }),
        Command::Webhook {
            command:
                WebhookCommand::Sign {
                    route,
                    config,
                    secret_index,
                    id,
                    timestamp,
                    plain,
                },
        } => webhook_sign(&WebhookSign {
            route: &route,
            config: &config,
            secret_index,
            id: id.as_deref(),
            timestamp,
            plain,
        }),
        Command::Assets { dir } => assets(&dir),
    }
}

/// What `keygate webhook sign` is asked to do.
struct WebhookSign<'a> {
    route: &'a str,
    config: &'a Path,
    secret_index: usize,
    id: Option<&'a str>,
    timestamp: Option<i64>,
    plain: bool,
}

/// `keygate webhook sign`: only the named route is built (its secrets resolved as `run` does);
/// the rest of the config need not be valid here, `check` is for that. stdout gets only the
/// headers, so it can be redirected into a file for `curl -H @FILE`.
fn webhook_sign(o: &WebhookSign<'_>) -> ExitCode {
    let raw = match config::load_file(o.config) {
        Ok(r) => r,
        Err(e) => return fail(format!("invalid config {}:\n{e}", o.config.display())),
    };
    if !raw.webhooks.iter().any(|w| w.id == o.route) {
        let known: Vec<&str> = raw.webhooks.iter().map(|w| w.id.as_str()).collect();
        return fail(format!(
            "no webhook route with id {:?} in {} (routes: {})",
            o.route,
            o.config.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ));
    }
    let base = o.config.parent().map(Path::to_path_buf).unwrap_or_default();
    let route = match config::webhook_route(&raw, o.route, &base) {
        Ok(r) => r,
        Err(e) => {
            return fail(format!(
                "webhook route {:?} in {}:\n{e}",
                o.route,
                o.config.display()
            ));
        }
    };
    let mut body = Vec::new();
    // One byte over the route's limit is enough to say that keygate would refuse it.
    let limit = route.max_body_bytes.saturating_add(1);
    if let Err(e) = std::io::stdin().take(limit).read_to_end(&mut body) {
        return fail(format!("cannot read the body from stdin: {e}"));
    }
    if body.len() as u64 > route.max_body_bytes {
        return fail(format!(
            "the body on stdin is over the route's max_body_bytes ({}): keygate would refuse it with 413",
            route.max_body_bytes
        ));
    }
    let id = o.id.map_or_else(
        || format!("msg_{}", hex::encode(rand::random::<[u8; 12]>())),
        str::to_string,
    );
    let now = o
        .timestamp
        .unwrap_or_else(|| jiff::Timestamp::now().as_second());
    let headers = match route.sign(o.secret_index, &body, now, &id) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    let mut out = std::io::stdout().lock();
    for (name, value) in headers {
        if http::HeaderValue::from_str(&value).is_err() {
            return fail(format!(
                "{name}: the value (from --id) is not a valid header value"
            ));
        }
        let line = format!("{name}: {value}");
        let written = if o.plain {
            writeln!(out, "{line}")
        } else {
            // Single-quoted for a POSIX shell: a ' inside becomes '\''.
            writeln!(out, "-H '{}'", line.replace('\'', "'\\''"))
        };
        if let Err(e) = written {
            return fail(format!("cannot write the headers: {e}"));
        }
    }
    match out.flush() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("cannot write the headers: {e}")),
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
            if let Some(st) = &s.state
                && let Err(e) = crate::usage::check_state_dir(&st.path)
            {
                let _ = writeln!(std::io::stderr(), "state.path: {e}");
                return ExitCode::FAILURE;
            }
            for w in &s.warnings {
                let _ = writeln!(std::io::stderr(), "warning: {w}");
            }
            // Warnings only: the exit status says whether the file is valid.
            for line in crate::exposure::check_report(&s.upstream_url) {
                let _ = writeln!(std::io::stderr(), "{line}");
            }
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{e}");
            if let Ok(raw) = config::load_file(path)
                && raw.keys.is_empty()
            {
                let _ = writeln!(
                    std::io::stderr(),
                    "keys: none configured (every request would get 401); add one: \
                     keygate keygen --id NAME >> {}",
                    path.display()
                );
            }
            if !path.exists() {
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                let _ = writeln!(
                    std::io::stderr(),
                    "make one: keygate init {} (config, certificate, first key; every option: \
                     config.example.toml, packaged as /etc/keygate/keygate.toml.example)",
                    dir.display()
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// The `[[keys]]` snippet for a new key.
fn snippet(id: &str, hash: &str) -> String {
    let created = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ");
    format!("[[keys]]\nid = \"{id}\"\nhash = \"{hash}\"\ncreated = {created}\n")
}

/// stdout gets what belongs in a file (the snippet), stderr what a person reads once (the
/// token), so `>> keygate.toml` never captures the token. `token_stdout` swaps the two.
fn keygen(id: &str, json: bool, token_stdout: bool) -> ExitCode {
    if !is_valid_id(id) {
        return fail(format!(
            "invalid key id {id:?}: use [a-z0-9-], 1 to 32 characters"
        ));
    }
    let token = NewToken::generate(id);
    let hash = hash_token(token.reveal().as_bytes());
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let written = if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"id": id, "token": token.reveal(), "hash": hash})
        )
    } else if token_stdout {
        writeln!(out, "{}", token.reveal()).and_then(|()| {
            write!(
                err,
                "# New API key {id:?}: the token went to stdout. Add this to the config, then \
                 reload (systemctl reload keygate):\n{}",
                snippet(id, &hash)
            )
        })
    } else {
        // A blank line first: appended to a file that does not end in a newline, it still parses.
        write!(out, "\n{}", snippet(id, &hash)).and_then(|()| {
            writeln!(
                err,
                "New API key {id:?}. The token is shown only this once (here, not on stdout); \
                 give it to the client now:\n\n    {}\n\nstdout has the [[keys]] snippet: \
                 `keygate keygen --id {id} >> /etc/keygate/keygate.toml`, then reload \
                 (systemctl reload keygate).",
                token.reveal()
            )
        })
    };
    match written.and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("cannot write the new key: {e}")),
    }
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
    let mut raw = match config::load_file(path) {
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
    // A listing needs the keys and roles (and, in cluster mode, Redis for the shared state):
    // not the webhook secrets, nor the TLS private key, which the operator's shell need not
    // be able to read (`check` and `run` still resolve them). A throwaway certificate stands
    // in for the configured one.
    raw.webhooks.clear();
    // Nor the Redis password, which with `{ credential = … }` (systemd `LoadCredential=`, the
    // preferred way) resolves only inside the unit, and with `{ env = … }` only in its
    // environment (fresh user T5-23: the listing refused to run at all). Without it the cluster
    // is not asked: this host's state file is shown, as when Redis cannot be read.
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut cluster_skipped = None;
    if let Some(c) = &raw.cluster
        && let Some(reference) = &c.password
        && let Err(why) = reference.resolve(&base)
    {
        cluster_skipped = Some(why);
        raw.cluster = None;
    }
    let stand_in = match rcgen::generate_simple_self_signed(vec!["localhost".into()]) {
        Ok(ck) => TlsSource::Pem {
            cert: ck.cert.pem().into_bytes(),
            key: ck.signing_key.serialize_pem().into_bytes(),
        },
        Err(e) => return fail(format!("cannot make a stand-in certificate: {e}")),
    };
    let snap = match config::build(
        raw,
        &BuildContext {
            base_dir: base,
            tls_override: Some(stand_in),
            ..Default::default()
        },
    ) {
        Ok(s) => s,
        Err(e) => return fail(format!("invalid config {}:\n{e}", path.display())),
    };
    let has_state = state_cfg.is_some();
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
    let mut usage = usage;
    let mut note = crate::keys_report::FRESHNESS_NOTE;
    let local_only = if has_state {
        "this host's state file only"
    } else {
        "empty (no [state] path in this config)"
    };
    if let Some(why) = cluster_skipped {
        eprintln!(
            "warning: cluster mode, but cluster.password cannot be resolved here ({why}); \
             LAST USED, NETWORKS and QUOTA below are {local_only}. For the cluster's figures run \
             it with the unit's credential, e.g. `systemd-run --pipe --wait -p \
             LoadCredential=NAME:/etc/keygate/NAME keygate keys -c {}` (docs/operations.md)",
            path.display()
        );
    }
    if let Some(settings) = &snap.cluster {
        match cluster_figures(&snap, settings) {
            Ok((ids, shared)) => {
                let keys: Vec<(&str, Option<i64>)> =
                    ids.iter().map(|(id, w)| (id.as_str(), *w)).collect();
                crate::keys_report::merge_cluster(&mut usage, &snap, &keys, shared);
                note = if has_state {
                    crate::keys_report::CLUSTER_NOTE
                } else {
                    crate::keys_report::CLUSTER_NOTE_NO_STATE
                };
            }
            Err(e) => eprintln!(
                "warning: cluster mode, but Redis could not be read ({e}); \
                 LAST USED, NETWORKS and QUOTA below are {local_only}"
            ),
        }
    }
    print!(
        "{}",
        crate::keys_report::render(&snap, &usage, rotation, jiff::Timestamp::now(), note)
    );
    ExitCode::SUCCESS
}

/// How long `keygate keys` waits for Redis before it falls back to the state file.
const KEYS_REDIS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The cluster's figures for every configured key (one connection, one pipelined round trip,
/// [`KEYS_REDIS_WAIT`] at most).
#[allow(clippy::type_complexity)]
fn cluster_figures(
    snap: &config::Snapshot,
    settings: &crate::cluster::ClusterSettings,
) -> Result<
    (
        Vec<(String, Option<i64>)>,
        Vec<crate::cluster::history::SharedUsage>,
    ),
    String,
> {
    let now = crate::clock::now();
    let ids: Vec<(String, Option<i64>)> = snap
        .keys
        .iter()
        .map(|(id, k)| {
            let window = k.quota.map(|q| crate::quota::window(q.period, now).0);
            (id.to_string(), window)
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // A report, not a request: Redis gets the whole wait, not the per-command `timeout`.
    let mut settings = settings.clone();
    settings.timeout = settings.timeout.max(KEYS_REDIS_WAIT);
    let cluster = crate::cluster::Cluster::new(settings)?;
    rt.block_on(async {
        let read = async {
            cluster.connect_once(KEYS_REDIS_WAIT).await?;
            let keys: Vec<(&str, Option<i64>)> =
                ids.iter().map(|(id, w)| (id.as_str(), *w)).collect();
            cluster.shared_usage(&keys).await
        };
        match tokio::time::timeout(KEYS_REDIS_WAIT, read).await {
            Ok(Ok(shared)) => Ok(shared),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 2 s".to_string()),
        }
    })
    .map(|shared| (ids, shared))
}

/// How long `init`'s self-signed certificate is valid. Short on purpose: it is for a first
/// run, and a real certificate (certs/README.md) should replace it; `keygate_certificate_not_after_seconds`
/// and the startup log show when it runs out.
pub const INIT_CERT_DAYS: i64 = 90;

/// A self-signed certificate for localhost, 127.0.0.1, ::1 and this host's name, valid from an
/// hour ago (clock skew) for `days` days. Returns (certificate PEM, key PEM, not-after).
fn self_signed(days: i64) -> Result<(Vec<u8>, Vec<u8>, jiff::Timestamp), String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && h != "localhost" {
            names.push(h.to_string());
        }
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| e.to_string())?;
    let now = jiff::Timestamp::now();
    let day = |t: jiff::Timestamp| {
        let d = t.to_zoned(jiff::tz::TimeZone::UTC).date();
        rcgen::date_time_ymd(i32::from(d.year()), d.month() as u8, d.day() as u8)
    };
    // Whole days (UTC midnight): from yesterday, so a client with a slow clock accepts it, to
    // the midnight *after* now + days, so the certificate lasts at least `days` full days
    // (rounding down made a demo started at 23:59 UTC expire a minute later).
    let not_after = now
        .checked_add(jiff::SignedDuration::from_hours(24 * (days + 1)))
        .map_err(|e| e.to_string())?;
    params.not_before = day(now - jiff::SignedDuration::from_hours(24));
    params.not_after = day(not_after);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((
        cert.pem().into_bytes(),
        key.serialize_pem().into_bytes(),
        not_after,
    ))
}

fn demo(listen: &str, upstream: &str, admin: Option<&str>) -> ExitCode {
    // 30 days: the in-memory certificate is made anew at every start; a shorter one would
    // greet the first run with a `cert_expiring` warning nobody can act on.
    let (cert, key, _) = match self_signed(30) {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot make a certificate: {e}")),
    };
    let token = NewToken::generate("demo");
    let hash = hash_token(token.reveal().as_bytes());
    // The log settings are `run`'s defaults: the demo logs exactly as the service will.
    let mut text = format!(
        "[server]\nlisten = {listen:?}\n[upstream]\nurl = {upstream:?}\n[[keys]]\nid = \"demo\"\nhash = \"{hash}\"\n"
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
    // The key is printed only if the demo can serve it: with the port taken, the printed curl
    // line would reach whatever holds it (a fresh user's earlier demo).
    if let Err(e) = std::net::TcpListener::bind(snapshot.server.listen) {
        return fail(format!(
            "cannot listen on {listen}: {e} (another keygate or service holds it? pass --listen ADDR)"
        ));
    }
    let port = snapshot.server.listen.port();
    let stars = "*".repeat(72);
    println!("{stars}");
    println!("  keygate DEMO: a throwaway self-signed certificate and key, held in memory only.");
    println!(
        "  NOT FOR PRODUCTION. For a real setup: keygate init DIR, then keygate run -c DIR/keygate.toml"
    );
    println!("{stars}");
    println!("  Proxying https://{listen} -> {upstream}");
    if let Some(why) = upstream_silent(upstream) {
        println!("  WARNING: nothing answers at {upstream} ({why}): requests will get 502 until");
        println!("  the upstream service runs there (or pass --upstream URL).");
    }
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

/// Why nothing accepts a TCP connection at the upstream URL's host and port within 2 s, or
/// None when something does.
fn upstream_silent(url: &str) -> Option<String> {
    use std::net::ToSocketAddrs as _;
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let addrs: Vec<_> = match (host, port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return Some(format!("cannot resolve {host}: {e}")),
    };
    let mut last = String::from("no address");
    for a in addrs {
        match std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)) {
            Ok(_) => return None,
            Err(e) => last = e.to_string(),
        }
    }
    Some(last)
}

/// Who can reach a listener at `addr`, for the comment above `listen` in `init`'s config.
fn listen_reach(addr: std::net::SocketAddr) -> &'static str {
    match addr.ip() {
        ip if ip.is_loopback() => {
            "This machine only. \"0.0.0.0:8443\" accepts remote clients on every IPv4 address."
        }
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            "Every IPv4 address: remote clients can connect. \"[::]:8443\" adds IPv6;\n# \"127.0.0.1:8443\" allows only this machine."
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            "Every IPv6 address (and IPv4 too where the system maps it): remote clients can connect."
        }
        _ => "Only this address: clients reach keygate through it.",
    }
}

/// What `init` is asked to do.
pub struct InitOptions<'a> {
    pub dir: &'a Path,
    pub upstream: &'a str,
    pub listen: &'a str,
    /// The admin listener's address.
    pub admin: &'a str,
    pub group: Option<&'a str>,
    pub state: Option<&'a str>,
}

/// The effective uid of this process, from /proc (no libc call needed).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The gid of a group named in /etc/group (system groups such as `keygate` live there).
fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

fn init(o: &InitOptions<'_>) -> ExitCode {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = o.dir;
    let config_path = dir.join("keygate.toml");
    if config_path.exists() {
        return fail(format!(
            "{} exists already; not overwriting",
            config_path.display()
        ));
    }
    let (listen, admin) = match (
        o.listen.parse::<std::net::SocketAddr>(),
        o.admin.parse::<std::net::SocketAddr>(),
    ) {
        (Err(e), _) => return fail(format!("--listen {:?}: {e}", o.listen)),
        (_, Err(e)) => return fail(format!("--admin {:?}: {e}", o.admin)),
        (Ok(l), Ok(a)) => (l, a),
    };
    if listen.port() == admin.port()
        && (listen.ip() == admin.ip()
            || listen.ip().is_unspecified()
            || admin.ip().is_unspecified())
    {
        return fail(format!(
            "--listen {} and --admin {} would share a port; give --admin another address",
            o.listen, o.admin
        ));
    }
    let root = effective_uid() == Some(0);
    // Who may read: the service's group when root sets up a system install.
    let group = match o.group {
        Some(g) => match group_id(g) {
            Some(gid) => Some((g, gid)),
            None => return fail(format!("--group {g:?}: no such group in /etc/group")),
        },
        None if root => group_id("keygate").map(|gid| ("keygate", gid)),
        None => None,
    };
    if root && group.is_none() {
        let _ = writeln!(
            std::io::stderr(),
            "warning: there is no group `keygate`, so only root can read these files and the \
             systemd unit (User=keygate) cannot start. Install the package first (it creates \
             the user), or: adduser --system --group --no-create-home keygate; then \
             chgrp keygate {0} {0}/*; chmod g+r {0}/*",
            dir.display()
        );
    }
    let state = o.state.map(str::to_string).unwrap_or_else(|| {
        if root {
            "/var/lib/keygate/state.json".to_string()
        } else {
            "state.json".to_string()
        }
    });
    let created_dir = !dir.exists();
    if let Err(e) = std::fs::create_dir_all(dir) {
        return fail(format!("cannot create {}: {e}", dir.display()));
    }
    if created_dir && let Some((_, gid)) = group {
        let r = std::os::unix::fs::chown(dir, None, Some(gid))
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)));
        if let Err(e) = r {
            return fail(format!("cannot give {} to its group: {e}", dir.display()));
        }
    }
    let (cert, key, not_after) = match self_signed(INIT_CERT_DAYS) {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot make a certificate: {e}")),
    };
    let until = not_after.strftime("%Y-%m-%d");
    let token = NewToken::generate("first");
    let hash = hash_token(token.reveal().as_bytes());
    let max_body = crate::config::DEFAULT_MAX_BODY_BYTES;
    let text = format!(
        "# Written by `keygate init`. Every option: config.example.toml (packaged as\n\
         # /etc/keygate/keygate.toml.example). Check: keygate check -c THIS_FILE\n\
         [server]\n\
         # {reach}\n\
         listen = {listen:?}\n\
         # Largest request body: {mib} MiB fits 300 MiB document uploads. Change it here\n\
         # (bytes), then restart or reload.\n\
         max_body_bytes = {max_body}\n\n\
         [tls]\n\
         # Self-signed, valid {days} days (until {until}): replace with a real certificate\n\
         # (certs/README.md), then reload.\n\
         cert = \"cert.pem\"\nkey = \"key.pem\"\n\n\
         [upstream]\nurl = {upstream:?}\n\n\
         [admin]\n\
         # healthz, readyz, metrics: plain HTTP, keep it on loopback.\n\
         listen = {admin:?}\n\n\
         [state]\n\
         # Last-used times of keys (`keygate keys`); the systemd unit can write only\n\
         # /var/lib/keygate (its StateDirectory).\n\
         path = {state:?}\n\n{snippet}",
        listen = o.listen,
        reach = listen_reach(listen),
        admin = o.admin,
        mib = max_body / (1024 * 1024),
        days = INIT_CERT_DAYS,
        upstream = o.upstream,
        snippet = snippet("first", &hash)
    );
    // Readable by the group when there is one (the service's); key and config never by others.
    let shared = if group.is_some() { 0o640 } else { 0o600 };
    let write = |name: &str, bytes: &[u8], mode: u32| -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(name))?;
        if let Some((_, gid)) = group {
            std::os::unix::fs::fchown(&f, None, Some(gid))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)
    };
    for (name, bytes, mode) in [
        ("key.pem", &key[..], shared),
        ("cert.pem", &cert[..], 0o644),
        ("keygate.toml", text.as_bytes(), shared.max(0o640)),
    ] {
        if let Err(e) = write(name, bytes, mode) {
            return fail(format!("cannot write {}: {e}", dir.join(name).display()));
        }
    }
    let readers = match group {
        Some((g, _)) => format!("owner and group {g} (mode 0640)"),
        None => "owner only for key.pem (0600)".to_string(),
    };
    println!(
        "Wrote keygate.toml, cert.pem and key.pem in {}; readable by {readers}.",
        dir.display()
    );
    println!(
        "Certificate: self-signed for localhost and this host, valid {INIT_CERT_DAYS} days (until {until}); replace it with a real one."
    );
    println!(
        "Listening on {} (change [server] listen), admin on {}; state file {state}; max_body_bytes {} MiB.",
        o.listen,
        o.admin,
        max_body / (1024 * 1024)
    );
    println!("API key \"first\" (shown once): {}", token.reveal());
    println!("Check:  keygate check -c {}", config_path.display());
    println!(
        "Start:  systemctl enable --now keygate   (or: keygate run -c {})",
        config_path.display()
    );
    let state_dir = Path::new(&state)
        .parent()
        .filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = state_dir.filter(|d| d.is_absolute() && !d.is_dir()) {
        println!(
            "        {} (state.path) does not exist yet: the systemd unit creates it; for \
             keygate run, create it first (install -d -o keygate -g keygate {})",
            d.display(),
            d.display()
        );
    }
    let port = listen.port();
    println!(
        "Try:    curl --cacert {} -H 'X-API-Key: {}' https://localhost:{port}/",
        dir.join("cert.pem").display(),
        token.reveal()
    );
    ExitCode::SUCCESS
}

/// Man pages (keygate.1 and one per subcommand, keygate-run.1 …) and completions for bash,
/// zsh and fish, generated from the clap definitions, into `dir` (for the Debian package).
fn assets(dir: &Path) -> ExitCode {
    use clap::CommandFactory as _;
    let result = (|| -> std::io::Result<Vec<PathBuf>> {
        let man = dir.join("man");
        let comp = dir.join("completions");
        std::fs::create_dir_all(&man)?;
        std::fs::create_dir_all(&comp)?;
        let mut written = Vec::new();
        let cmd = Cli::command();
        clap_mangen::generate_to(cmd.clone(), &man)?;
        for e in std::fs::read_dir(&man)? {
            written.push(e?.path());
        }
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            written.push(clap_complete::generate_to(
                shell,
                &mut cmd.clone(),
                "keygate",
                &comp,
            )?);
        }
        written.sort();
        Ok(written)
    })();
    match result {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("cannot write into {}: {e}", dir.display())),
    }
}

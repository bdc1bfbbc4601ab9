//! Real Python applications and clients for the fidelity tests: a virtualenv built from
//! `tests/apps/requirements.txt` (pinned), application servers (uvicorn, hypercorn, wsgiref) on
//! loopback ports, and the client scripts of `tests/apps/clients.py` (httpx, websockets).
//!
//! The virtualenv lives at `$KEYGATE_TEST_VENV`, else `<cargo target dir>/py-venv`; it is built
//! once and reused while its stamp (a copy of requirements.txt) matches. Several test binaries
//! may start at once: the builder holds a lock directory (`<venv>.lock`, created atomically);
//! the others wait for it. `tests/apps/venv.sh` does the same from a shell (CI runs it first).
//! Missing python3, venv module or package index: the test panics saying what to install —
//! these tests never skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// `tests/apps`, where the applications and client scripts live.
pub fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps")
}

fn venv_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYGATE_TEST_VENV") {
        return PathBuf::from(p);
    }
    // <target>/<profile>/keygate → <target>/py-venv
    let bin = Path::new(env!("CARGO_BIN_EXE_keygate"));
    bin.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("py-venv")
}

const HOW_TO_INSTALL: &str = "the real-application tests need python3 with its venv module and \
    pip, and access to PyPI: on Debian/Ubuntu `apt-get install python3 python3-venv python3-pip` \
    (or set KEYGATE_PYTHON to a python3 binary, KEYGATE_TEST_VENV to a prepared virtualenv)";

fn venv_ready(venv: &Path, req: &[u8]) -> bool {
    venv.join("bin/python").exists()
        && std::fs::read(venv.join("keygate-requirements.txt")).is_ok_and(|s| s == req)
}

/// The virtualenv's python, building the virtualenv first if needed (once per process).
pub fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let venv = venv_dir();
        let req_path = apps_dir().join("requirements.txt");
        let req = std::fs::read(&req_path).expect("tests/apps/requirements.txt");
        if !venv_ready(&venv, &req) {
            build_venv(&venv, &req_path, &req);
        }
        venv.join("bin/python")
    })
}

fn build_venv(venv: &Path, req_path: &Path, req: &[u8]) {
    let base = std::env::var("KEYGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let lock = venv.with_extension("lock");
    let deadline = Instant::now() + Duration::from_secs(20 * 60);
    loop {
        match std::fs::create_dir(&lock) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if venv_ready(venv, req) {
                    return;
                }
                // A builder that crashed leaves its lock behind; 15 minutes is far beyond a build.
                let stale = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| {
                        SystemTime::now()
                            .duration_since(t)
                            .is_ok_and(|d| d > Duration::from_secs(15 * 60))
                    });
                if stale {
                    let _ = std::fs::remove_dir(&lock);
                }
                assert!(
                    Instant::now() < deadline,
                    "waited 20 min for {}",
                    lock.display()
                );
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!("cannot create {}: {e}", lock.display()),
        }
    }
    struct Unlock(PathBuf);
    impl Drop for Unlock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unlock = Unlock(lock);
    if venv_ready(venv, req) {
        return;
    }
    let _ = std::fs::remove_dir_all(venv);
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| {
            panic!("cannot run {what} ({e}): {HOW_TO_INSTALL}");
        });
        assert!(
            out.status.success(),
            "{what} failed: {HOW_TO_INSTALL}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new(&base).arg("-m").arg("venv").arg(venv),
        &format!("`{base} -m venv {}`", venv.display()),
    );
    run(
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(req_path),
        "`pip install -r tests/apps/requirements.txt`",
    );
    std::fs::write(venv.join("keygate-requirements.txt"), req).unwrap();
}

/// Runs `tests/apps/<script>` with the virtualenv's python (cwd `tests/apps`).
pub fn run_script(script: &str, args: &[&str]) -> Output {
    Command::new(python())
        .arg(apps_dir().join(script))
        .args(args)
        .current_dir(apps_dir())
        .output()
        .expect("run python")
}

/// Runs a `tests/apps/clients.py` subcommand against keygate (trusting its test certificate);
/// returns the JSON it prints. Panics with the client's stderr when it fails.
pub fn client(ca_pem: &Path, cmd: &str, url: &str, extra: &[&str]) -> serde_json::Value {
    let ca = ca_pem.to_str().unwrap();
    let mut args = vec![cmd, url, "--ca", ca];
    args.extend_from_slice(extra);
    let out = run_script("clients.py", &args);
    assert!(
        out.status.success(),
        "clients.py {cmd} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "clients.py {cmd}: not JSON:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// An application server process (`tests/apps/serve.py`), killed on drop.
pub struct PyApp {
    child: Child,
    pub addr: SocketAddr,
    output: Arc<Mutex<String>>,
}

impl PyApp {
    /// `app:app` (tests/apps/app.py) on uvicorn with `--proxy-headers --forwarded-allow-ips
    /// 127.0.0.1`, as FastAPI documents it behind a proxy.
    pub fn uvicorn() -> PyApp {
        Self::serve(&["uvicorn", "app:app"])
    }

    /// `app:app` on hypercorn with its defaults.
    pub fn hypercorn() -> PyApp {
        Self::serve(&["hypercorn", "app:app"])
    }

    /// A WSGI app (`module:attr` under tests/apps) on the stdlib `wsgiref` server.
    pub fn wsgiref(target: &str) -> PyApp {
        Self::serve(&["wsgiref", target])
    }

    /// `serve.py SERVER MODULE:APP [key=value...]`; waits until the server answers HTTP.
    pub fn serve(args: &[&str]) -> PyApp {
        let mut child = Command::new(python())
            .arg(apps_dir().join("serve.py"))
            .args(args)
            .current_dir(apps_dir())
            .env("PYTHONUNBUFFERED", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start serve.py");
        let output: Arc<Mutex<String>> = Arc::default();
        let (port_tx, port_rx) = std::sync::mpsc::channel::<u16>();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (pipe, tx) in [
            (
                Box::new(stdout) as Box<dyn Read + Send>,
                Some(port_tx.clone()),
            ),
            (Box::new(stderr), None),
        ] {
            let out = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let (Some(tx), Some(p)) = (&tx, line.strip_prefix("LISTENING ")) {
                        let _ = tx.send(p.trim().parse().unwrap_or(0));
                    }
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        drop(port_tx);
        let mut app = PyApp {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            output,
        };
        let port = port_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("serve.py {args:?} did not start:\n{}", app.logs()));
        app.addr = SocketAddr::from(([127, 0, 0, 1], port));
        app.wait_answers(args);
        app
    }

    fn wait_answers(&mut self, args: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("serve.py {args:?} exited with {status}:\n{}", self.logs());
            }
            if self.answers() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "serve.py {args:?} does not answer HTTP:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether one plain HTTP/1.1 request gets a status line back.
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).is_ok() && &buf == b"HTTP/"
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything the server printed (its access log included).
    pub fn logs(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the server's output contains `needle` (its access log line is written after
    /// the response went out).
    pub fn wait_logs(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the app's output:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PyApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! A real `redis-server` (Debian's `redis-server` package) on a free loopback port, for the
//! cluster-mode tests. Nothing is mocked: keygate talks RESP to a real server. Missing binary:
//! the test panics saying what to install (never skips).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Keygate;

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    for p in [
        "redis-server",
        "/usr/bin/redis-server",
        "/usr/local/bin/redis-server",
    ] {
        if Command::new(p)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return PathBuf::from(p);
        }
    }
    panic!(
        "the cluster-mode tests need a real Redis server: `apt-get install redis-server` \
         (.ci/run installs it)"
    );
}

impl Redis {
    /// Starts a server with no persistence on a free port; waits until it answers PING.
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart();
        r
    }

    /// Starts the server again on the same port (after [`Redis::kill`]).
    pub fn restart(&mut self) {
        let child = Command::new(binary())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                // DEBUG SLEEP simulates a slow Redis (Redis 7 disables DEBUG by default).
                "--enable-debug-command",
                "yes",
            ])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "redis-server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stalls the server (SIGSTOP): connections stay open, nothing is answered, as with a
    /// Redis blocked by a long command or a frozen VM. [`Redis::resume`] continues it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Continues a server stalled by [`Redis::pause`] (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("a server this handle started")
            .id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One command through a minimal RESP client; the reply as text (bulk/simple strings and
    /// integers; arrays joined by newlines; errors prefixed with `ERR:`).
    pub fn cli(&self, args: &[&str]) -> String {
        use std::io::{BufRead, BufReader, Write};
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        if s.write_all(req.as_bytes()).is_err() {
            return String::new();
        }
        let mut r = BufReader::new(s);
        fn read(r: &mut impl BufRead) -> String {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return String::new();
            }
            let line = line.trim_end().to_string();
            let (t, rest) = line.split_at(1);
            match t {
                "+" | ":" => rest.to_string(),
                "-" => format!("ERR:{rest}"),
                "$" => {
                    let n: i64 = rest.parse().unwrap_or(-1);
                    if n < 0 {
                        return String::new();
                    }
                    let mut buf = vec![0u8; n as usize + 2];
                    std::io::Read::read_exact(r, &mut buf).unwrap();
                    String::from_utf8_lossy(&buf[..n as usize]).into_owned()
                }
                "*" => {
                    let n: i64 = rest.parse().unwrap_or(0);
                    (0..n.max(0))
                        .map(|_| read(r))
                        .collect::<Vec<_>>()
                        .join("\n")
                }
                _ => line,
            }
        }
        read(&mut r)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Redis {
    /// A handle on a server started elsewhere (for commands from another thread); dropping it
    /// does not stop the server.
    pub fn attach(port: u16) -> Redis {
        Redis {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

/// `[cluster]` for a test; `extra` may set `timeout` (default here 1 s, so that a loaded test
/// machine does not degrade the cluster where the test asserts it does not).
pub fn cluster_lines(redis: &Redis, instance: &str, extra: &str) -> String {
    let timeout = if extra.contains("timeout") {
        ""
    } else {
        "timeout = \"1s\"\n"
    };
    format!(
        "[cluster]\nredis = \"{}\"\ninstance = \"{instance}\"\n{timeout}{extra}\n",
        redis.url()
    )
}

/// `/metrics` from the admin listener (moved to `common::admin`, where the other tests find it).
#[allow(unused_imports)]
pub use super::admin::metrics;

pub async fn wait_healthy(kg: &Keygate) {
    kg.wait_log("cluster connected", |v| {
        v["msg"] == "cluster connected: limits shared through Redis"
            || v["event"] == "cluster_recovered"
    });
}

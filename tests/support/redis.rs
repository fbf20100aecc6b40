//! A `redis-server` of a test's own (Debian's `redis-server`, which `make deps`
//! installs): on a free port, without persistence, killed when dropped. A test that
//! needs it fails loudly when it is missing.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        let mut r = Redis {
            child: None,
            port: super::free_port(),
        };
        r.restart();
        r
    }

    /// Start it again on the same port (after `kill`): empty, as a restarted Redis
    /// without persistence is.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server; `make deps` installs it) must be on PATH");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: Redis gone at once, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Sentinel (`redis-server --sentinel`) watching `master` as "mymaster".
pub struct Sentinel {
    child: Child,
    pub port: u16,
    _dir: super::TestDir,
}

impl Sentinel {
    pub fn start(master: &Redis) -> Sentinel {
        let dir = super::TestDir::new("sentinel");
        let port = super::free_port();
        let conf = dir.write(
            "sentinel.conf",
            &format!(
                "port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {} 1\n",
                master.port
            ),
        );
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) must be on PATH");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the sentinel did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Sentinel {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

//! A `dnsmasq` of a test's own (Debian's `dnsmasq-base`, which `make deps` installs):
//! on a free port of 127.0.0.1, answering only for names under `test.` from a hosts
//! file (`--addn-hosts`, re-read on SIGHUP) and from `--srv-host` / `--host-record`
//! options (read at start: [`Dnsmasq::restart`] changes them), every answer with the
//! TTL `--local-ttl`; any other name under `test.` is NXDOMAIN. Killed when dropped. A
//! test that needs it fails loudly when it is missing.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Dnsmasq {
    child: Option<Child>,
    pub port: u16,
    hosts: PathBuf,
    ttl: u32,
    options: Vec<String>,
}

impl Dnsmasq {
    /// Start it with `hosts` (lines `ip name`), `ttl` seconds, and more `options`
    /// (`--srv-host=...`).
    pub fn start(dir: &super::TestDir, hosts: &str, ttl: u32, options: &[String]) -> Dnsmasq {
        let hosts = dir.write("dnsmasq.hosts", hosts);
        let mut d = Dnsmasq {
            child: None,
            port: super::free_port(),
            hosts,
            ttl,
            options: options.to_vec(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let child = Command::new("dnsmasq")
            .args([
                "--no-daemon".to_string(),
                format!("--port={}", self.port),
                "--listen-address=127.0.0.1".into(),
                "--bind-interfaces".into(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                "--conf-file=/dev/null".into(),
                "--pid-file=".into(),
                "--local=/test/".into(),
                format!("--addn-hosts={}", self.hosts.display()),
                format!("--local-ttl={}", self.ttl),
            ])
            .args(&self.options)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian package dnsmasq-base; `make deps` installs it) must be on PATH");
        self.child = Some(child);
        let start = Instant::now();
        while !self.answers() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "dnsmasq did not answer on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it answers a query (any answer) now.
    fn answers(&self) -> bool {
        let Ok(s) = UdpSocket::bind("127.0.0.1:0") else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_millis(200))).ok();
        // A query for "x.test" A: header (id 7, RD), one question.
        let mut q = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["x", "test"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let mut buf = [0u8; 512];
        s.send_to(&q, ("127.0.0.1", self.port)).is_ok() && s.recv(&mut buf).is_ok()
    }

    /// `ip:port` for `nameservers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Write the hosts file anew and make it re-read (SIGHUP).
    pub fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).expect("write the hosts file");
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY: a plain signal to our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    }

    /// Stop it (SIGKILL): the nameserver is gone, queries time out.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// Start it again on the same port, with `options` instead of the first ones.
    pub fn restart(&mut self, options: &[String]) {
        self.stop();
        self.options = options.to_vec();
        self.spawn();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

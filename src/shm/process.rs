//! Processes: a small safe API over `fork(2)`, `waitpid(2)`, `kill(2)` and `pipe(2)`,
//! for work that must really happen in several processes over one shared region.
//!
//! nginx forks its workers from the master after the region is mapped, so every
//! worker sees the same pages. This module reproduces that in plain Rust, chiefly for
//! tests (many workers picking and reporting at once, a worker killed with SIGKILL
//! while it holds in-flight tries or the writer lock, a reload seen by a worker forked
//! earlier) without needing nginx:
//!
//! - [`fork_child`] runs a closure in a forked child and ends the child with its
//!   return value as the exit code, through `_exit`: no destructors, no `atexit`
//!   handlers, no flushing of buffers inherited from the parent, and never a return
//!   into the caller (a test harness, say). A panic in the closure is caught and ends
//!   the child with exit code [`PANIC_EXIT_CODE`] after writing the panic message
//!   straight to file descriptor 2.
//! - [`Child`] waits for, or signals, the child. A [`Child`] dropped before it was
//!   waited for kills its process with SIGKILL and reaps it, so a failing test leaves
//!   neither stray processes nor zombies behind.
//! - [`Signal`] is a one-byte notification over a pipe, for handshakes such as "the
//!   child is ready": make it before forking, send on one side, receive on the other.
//!
//! Forking a process that runs other threads copies only the calling thread: in the
//! child, a lock held by another thread at the time of the fork stays held forever.
//! The closure should therefore only use state the forking thread owns (the allocator
//! and the region's atomics are fine; a [`Balancer`](crate::balancer::Balancer) that
//! other threads were using at that moment is not).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// Exit code of a child whose closure panicked (the same as a panicking Rust program).
pub const PANIC_EXIT_CODE: i32 = 101;

/// Run `f` in a forked child process; the child exits with the code `f` returns (its
/// low 8 bits, as the system keeps them), or [`PANIC_EXIT_CODE`] if `f` panics.
///
/// The child never returns from this function. See the module documentation for
/// what `f` may touch when the calling process has other threads.
pub fn fork_child(f: impl FnOnce() -> i32) -> io::Result<Child> {
    // SAFETY: fork has no memory-safety preconditions of its own; the child only runs
    // `f` on this thread's state and then `_exit`s without returning to the caller,
    // so nothing the parent owns is dropped or finalized twice.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => run_child(f),
        pid => Ok(Child { pid, status: None }),
    }
}

/// The child's side of [`fork_child`]: run `f`, then `_exit`.
fn run_child(f: impl FnOnce() -> i32) -> ! {
    let code = match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(code) => code,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(non-string panic payload)");
            let line = format!("forked child {} panicked: {msg}\n", std::process::id());
            write_stderr(line.as_bytes());
            // Dropping the payload could panic again (and unwind): leak it instead,
            // the process is about to end.
            std::mem::forget(payload);
            PANIC_EXIT_CODE
        }
    };
    // SAFETY: `_exit` ends the process at once and is always safe to call; skipping
    // destructors and atexit handlers is the point (the parent's state, copied into
    // this child, must not be torn down or flushed a second time).
    unsafe { libc::_exit(code) }
}

/// Best-effort write to file descriptor 2 without taking Rust's stderr lock (another
/// thread of the parent may have held it at the time of the fork).
/// Run a libc call again while a signal interrupts it; -1 becomes the OS error.
fn retry_eintr<T: Copy + PartialEq + From<i8>>(mut call: impl FnMut() -> T) -> io::Result<T> {
    loop {
        let rc = call();
        if rc != T::from(-1) {
            return Ok(rc);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a valid readable buffer of `bytes.len()` bytes; write does
        // not keep the pointer.
        let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

/// A forked child process, from [`fork_child`].
///
/// Dropping a `Child` that was not waited for kills it (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    /// Exit code (or 128 + signal) once the child was reaped.
    status: Option<i32>,
}

impl Child {
    /// The child's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Wait for the child to end: its exit code, or 128 + the signal that killed it
    /// (as a shell reports it: 137 for SIGKILL).
    pub fn wait(mut self) -> io::Result<i32> {
        self.reap(true)
            .map(|s| s.expect("blocking waitpid returns a status"))
    }

    /// The child's status if it has ended (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> io::Result<Option<i32>> {
        self.reap(false)
    }

    /// Wait at most `timeout` for the child to end; `None` if it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<i32>> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Send signal `sig` (`libc::SIGKILL`, ...) to the child. Refused once the child
    /// was reaped, since its pid may already belong to another process.
    pub fn kill(&self, sig: i32) -> io::Result<()> {
        if self.status.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("child {} was already reaped", self.pid),
            ));
        }
        // SAFETY: kill takes plain integers; `pid` is our own unreaped child (> 0), so
        // it cannot name another process or a process group.
        if unsafe { libc::kill(self.pid, sig) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// waitpid, blocking or not, retried on EINTR; records and returns the status.
    fn reap(&mut self, block: bool) -> io::Result<Option<i32>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let flags = if block { 0 } else { libc::WNOHANG };
        loop {
            let mut raw = 0;
            // SAFETY: `raw` is a valid, writable c_int; `pid` is our own child.
            let rc = retry_eintr(|| unsafe { libc::waitpid(self.pid, &mut raw, flags) })?;
            if rc == 0 {
                return Ok(None);
            }
            let code = if libc::WIFEXITED(raw) {
                libc::WEXITSTATUS(raw)
            } else if libc::WIFSIGNALED(raw) {
                128 + libc::WTERMSIG(raw)
            } else {
                // Stopped or continued: only reported with WUNTRACED/WCONTINUED.
                continue;
            };
            self.status = Some(code);
            return Ok(Some(code));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.kill(libc::SIGKILL);
            let _ = self.reap(true);
        }
    }
}

/// A one-byte notification across a fork: a pipe whose two ends both processes hold.
///
/// Make it before [`fork_child`]; then one side [`send`](Signal::send)s and the other
/// [`recv`](Signal::recv)s. A `Signal` carries one direction: for a reply, use a second
/// one (a process could otherwise read back its own byte). Bytes queue up (up to the
/// pipe's buffer), so a send never waits for the receiver.
#[derive(Debug)]
pub struct Signal {
    read: OwnedFd,
    write: OwnedFd,
}

impl Signal {
    /// A new pipe (close-on-exec).
    pub fn new() -> io::Result<Signal> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid, writable array of two c_int, as pipe2 requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Signal { read, write })
    }

    /// Send one byte.
    pub fn send(&self, byte: u8) -> io::Result<()> {
        loop {
            // SAFETY: writes one byte from a valid local to a descriptor we own.
            let n = unsafe { libc::write(self.write.as_raw_fd(), (&byte as *const u8).cast(), 1) };
            match n {
                1 => return Ok(()),
                -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
                -1 => return Err(io::Error::last_os_error()),
                _ => return Err(io::Error::new(io::ErrorKind::WriteZero, "pipe write of 0 bytes")),
            }
        }
    }

    /// Receive one byte, waiting at most `timeout`; `None` on timeout.
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            let mut pfd = libc::pollfd {
                fd: self.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid, writable pollfd, matching the count 1.
            let rc = retry_eintr(|| unsafe { libc::poll(&mut pfd, 1, ms) })?;
            if rc == 0 {
                return Ok(None);
            }
            let mut byte = 0u8;
            // SAFETY: reads at most one byte into a valid local from a descriptor we own.
            let n = unsafe { libc::read(self.read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
            match n {
                1 => return Ok(Some(byte)),
                -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
                -1 => return Err(io::Error::last_os_error()),
                // EOF cannot happen while we hold the write end; report it anyway.
                _ => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "pipe closed")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_panic_and_signal() {
        assert_eq!(fork_child(|| 7).unwrap().wait().unwrap(), 7);
        assert_eq!(
            fork_child(|| panic!("on purpose")).unwrap().wait().unwrap(),
            PANIC_EXIT_CODE
        );
        let ready = Signal::new().unwrap();
        let child = fork_child(|| {
            ready.send(1).unwrap();
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .unwrap();
        assert_eq!(ready.recv(Duration::from_secs(10)).unwrap(), Some(1));
        child.kill(libc::SIGKILL).unwrap();
        assert_eq!(child.wait().unwrap(), 128 + libc::SIGKILL);
    }

    #[test]
    fn recv_times_out_and_reaped_child_cannot_be_killed() {
        let s = Signal::new().unwrap();
        assert_eq!(s.recv(Duration::from_millis(1)).unwrap(), None);
        let mut c = fork_child(|| 0).unwrap();
        assert_eq!(c.wait_timeout(Duration::from_secs(10)).unwrap(), Some(0));
        assert!(c.kill(libc::SIGKILL).is_err());
    }
}

//! TCP_NODELAY on the process's TCP sockets, for the PostgreSQL connections sqlx opens.
//!
//! sqlx 0.9.0 stopped disabling Nagle's algorithm on its TCP sockets (sqlx issue #4335; the
//! fix, PR #4336, is not released). A COPY FROM STDIN then ends in a stall: the client sends
//! its last CopyData, and the small CopyDone behind it waits for the server to acknowledge
//! that data, which the server's delayed ACK holds for 40 ms (Linux) because it has nothing to
//! send back. Measured on loopback: a one-chunk table's COPY took 41-43 ms over TCP and 2-7 ms
//! over a Unix socket; a restore runs one COPY per run of each table (23 on the benchmark's
//! data set). libpq, and so `pg_restore`, always sets TCP_NODELAY.
//!
//! sqlx gives no hook to the socket it connects, so after a connection is made every TCP
//! socket of the process gets the option. That is harmless for the others: TCP_NODELAY only
//! lets small segments leave at once, and the HTTP clients the object stores use set it
//! already. Unix sockets refuse the option and are left alone.

/// Set TCP_NODELAY on every TCP socket of this process that lacks it; returns how many were
/// changed. Linux only (it lists `/proc/self/fd`); elsewhere it does nothing.
pub fn on_every_tcp_socket() -> usize {
    #[cfg(target_os = "linux")]
    {
        let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .map(|target| target.to_string_lossy().starts_with("socket:"))
                    .unwrap_or(false)
            })
            .filter_map(|e| e.file_name().to_str()?.parse::<libc::c_int>().ok())
            .filter(|&fd| set_nodelay(fd))
            .count()
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// TCP_NODELAY on `fd` if it is a TCP socket without it; whether it was changed.
#[cfg(target_os = "linux")]
fn set_nodelay(fd: libc::c_int) -> bool {
    let mut on: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt and setsockopt read or write only the c_int passed with its size. A
    // descriptor closed meanwhile (or reused for something else) makes them fail with EBADF,
    // ENOTSOCK or EOPNOTSUPP, or sets TCP_NODELAY on another TCP socket, which is harmless.
    unsafe {
        let got = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&mut on as *mut libc::c_int).cast(),
            &mut len,
        );
        if got != 0 || on != 0 {
            return false;
        }
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_tcp_socket_gets_nodelay_and_a_unix_socket_is_left_alone() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (unix, _other) = UnixStream::pair().unwrap();
        assert!(!set_nodelay(std::os::fd::AsRawFd::as_raw_fd(&unix)));
        assert!(!client.nodelay().unwrap());
        on_every_tcp_socket();
        assert!(client.nodelay().unwrap());
        assert!(server.nodelay().unwrap());
        // A socket that already has it is not counted again.
        assert!(!set_nodelay(std::os::fd::AsRawFd::as_raw_fd(&client)));
        // The Unix socket refused the option and still works.
        let mut unix = unix;
        std::io::Write::write_all(&mut unix, b"x").unwrap();
    }
}

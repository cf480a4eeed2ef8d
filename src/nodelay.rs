//! TCP_NODELAY on the PostgreSQL connections timevault opens.
//!
//! sqlx 0.9.0 stopped disabling Nagle's algorithm on its TCP sockets (sqlx issue #4335; the
//! fix, PR #4336, is not released). A COPY FROM STDIN then ends in a stall: the client sends
//! its last CopyData, and the small CopyDone behind it waits for the server to acknowledge
//! that data, which the server's delayed ACK holds for 40 ms (Linux) because it has nothing to
//! send back. libpq, and so `pg_restore`, always sets TCP_NODELAY (docs/BENCHMARKS.md has the
//! measurement).
//!
//! sqlx gives no hook to the socket it connects, so after a connection is made the process's
//! TCP sockets connected to that server's address and port get the option: the connection
//! just made and other timevault connections to the same server, never a socket the host
//! application opened to anywhere else. Unix sockets have no peer address of that kind and are
//! left alone.

use std::net::SocketAddr;

/// Set TCP_NODELAY on this process's TCP sockets connected to `host:port` that lack it;
/// returns how many were changed. A `host` that is a Unix socket directory, or that does not
/// resolve, changes nothing.
pub async fn on_connections_to(host: &str, port: u16) -> usize {
    if host.starts_with('/') {
        return 0;
    }
    let Ok(addresses) = tokio::net::lookup_host((host, port)).await else {
        return 0;
    };
    let peers: Vec<SocketAddr> = addresses.collect();
    on_sockets_to(&peers)
}

/// Set TCP_NODELAY on this process's TCP sockets whose peer is one of `peers` and that lack
/// it; returns how many were changed. Linux only (it lists `/proc/self/fd`); elsewhere it does
/// nothing.
pub fn on_sockets_to(peers: &[SocketAddr]) -> usize {
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
            .filter_map(|e| e.file_name().to_str()?.parse::<std::os::fd::RawFd>().ok())
            .filter(|&fd| set_if_connected_to(fd, peers))
            .count()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = peers;
        0
    }
}

/// TCP_NODELAY on `fd` if it is a TCP socket connected to one of `peers` without it; whether
/// it was changed.
#[cfg(target_os = "linux")]
fn set_if_connected_to(fd: std::os::fd::RawFd, peers: &[SocketAddr]) -> bool {
    // SAFETY: the descriptor is only borrowed for the calls below. One closed meanwhile makes
    // them fail with EBADF; one reused for another socket gets the same checks (its peer must
    // be the server), so nothing else is changed.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&fd);
    let connected_to_peer = socket
        .peer_addr()
        .ok()
        .and_then(|address| address.as_socket())
        .is_some_and(|address| peers.iter().any(|peer| same_endpoint(*peer, address)));
    connected_to_peer
        && socket.tcp_nodelay().is_ok_and(|on| !on)
        && socket.set_tcp_nodelay(true).is_ok()
}

/// Equal addresses, an IPv4 address and its IPv4-mapped IPv6 form counting as one.
fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;

    #[test]
    fn only_sockets_to_the_server_get_nodelay() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let theirs = TcpStream::connect(elsewhere.local_addr().unwrap()).unwrap();
        let (accepted, _) = server.accept().unwrap();
        let (_unix, _other) = UnixStream::pair().unwrap();
        assert!(!ours.nodelay().unwrap());
        assert_eq!(on_sockets_to(&[server.local_addr().unwrap()]), 1);
        assert!(ours.nodelay().unwrap());
        // The host's other connection, and the server side of ours (its peer is our port),
        // are left alone.
        assert!(!theirs.nodelay().unwrap());
        assert!(!accepted.nodelay().unwrap());
        // A socket that already has it is not counted again.
        assert_eq!(on_sockets_to(&[server.local_addr().unwrap()]), 0);
    }

    #[tokio::test]
    async fn a_host_name_is_resolved_and_a_socket_directory_changes_nothing() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let ours = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        assert_eq!(on_connections_to("/var/run/postgresql", port).await, 0);
        assert!(!ours.nodelay().unwrap());
        assert_eq!(on_connections_to("localhost", port).await, 1);
        assert!(ours.nodelay().unwrap());
    }

    #[test]
    fn an_ipv4_peer_matches_its_mapped_form() {
        let v4: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5432".parse().unwrap();
        assert!(same_endpoint(v4, mapped));
        assert!(!same_endpoint(v4, "127.0.0.1:5433".parse().unwrap()));
    }
}

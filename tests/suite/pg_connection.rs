//! The connections timevault opens to PostgreSQL: TCP_NODELAY on each, and on no other socket
//! of the process (issue 22: before, every TCP socket of a host process got the option).
//! This module has a cluster of its own, so no other test's connection reaches its port.

use std::net::SocketAddr;

use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timevault_connections_have_nodelay_and_other_sockets_are_left_alone() {
    let url = crate::pg!().create_database().await.unwrap();
    let options: PgConnectOptions = url.parse().unwrap();
    let server: Vec<SocketAddr> = tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .unwrap()
        .collect();
    // Another socket of the process, to somewhere else, without the option.
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = std::net::TcpStream::connect(elsewhere.local_addr().unwrap()).unwrap();

    let _conn = timevault::pg_connection::connect(&url).await.unwrap();
    let _second = timevault::pg_connection::connect(&url).await.unwrap();
    assert_eq!(
        timevault::nodelay::on_sockets_to(&server),
        0,
        "a connection timevault opened to the server lacks TCP_NODELAY"
    );
    assert!(
        !other.nodelay().unwrap(),
        "a socket to elsewhere was changed"
    );

    // The premise: a connection sqlx opens by itself lacks the option (when this fails, sqlx
    // sets TCP_NODELAY again, and src/nodelay.rs can go).
    let _raw = options.connect().await.unwrap();
    assert_eq!(
        timevault::nodelay::on_sockets_to(&server),
        1,
        "sqlx's own connection already had TCP_NODELAY"
    );
}

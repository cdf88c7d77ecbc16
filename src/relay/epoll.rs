//! The epoll fallback's relay, for machines without io_uring (`kernel.io_uring_disabled`,
//! container seccomp profiles, old kernels). Same contract as the io_uring relay: bytes both
//! ways, half-close travels, idle timeout and kill switch end it. Here a dropped future is a
//! clean cancellation (epoll has nothing in flight in the kernel), so no shutdown dance.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{watchdog, RelayEnd, BUF_SIZE};
use crate::backend::BackendState;

async fn pump(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    last_activity: &Cell<Instant>,
    bytes: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        last_activity.set(Instant::now());
        to.write_all(&buf[..n]).await?;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Half-close toward the peer (shutdown(Write)).
    let _ = to.shutdown().await;
    Ok(())
}

pub async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    backend: &BackendState,
    kill_epoch: u64,
    idle_timeout: Duration,
) -> RelayEnd {
    let last_activity = Cell::new(Instant::now());
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let both = async {
        // try_join: an error in one direction (a reset) ends the other too.
        let _ = tokio::try_join!(
            pump(&mut cr, &mut sw, &last_activity, &backend.bytes_in_total),
            pump(&mut sr, &mut cw, &last_activity, &backend.bytes_out_total),
        );
    };
    tokio::select! {
        biased;
        _ = both => RelayEnd::Done,
        why = watchdog(&last_activity, idle_timeout, backend, kill_epoch) => why,
    }
}

/// The epoll fallback's [`super::first_move`]: the same decision with tokio readiness, which
/// is cancel-safe, so the loser's wait is simply dropped.
pub async fn first_move(
    client: &TcpStream,
    server: &TcpStream,
    limit: Duration,
) -> super::FirstMove {
    use super::FirstMove;
    // The common case for client-speaks-first protocols: the request is already waiting.
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(client).peek(&mut byte) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        _ => return FirstMove::Relay,
    }
    tokio::select! {
        biased;
        _ = client.readable() => FirstMove::Relay,
        r = server.readable() => match r {
            Err(e) => FirstMove::BackendFailed(e),
            Ok(()) => {
                let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                // tokio's sockets are non-blocking: this never waits.
                match socket2::SockRef::from(server).peek(&mut byte) {
                    Ok(0) => FirstMove::BackendFailed(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "backend closed the connection before sending anything",
                    )),
                    Ok(_) => FirstMove::Relay,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => FirstMove::Relay,
                    Err(e) => FirstMove::BackendFailed(e),
                }
            }
        },
        _ = tokio::time::sleep(limit) => FirstMove::Relay,
    }
}

//! SNI routing on the data path: reads a new client's TLS ClientHello (without terminating
//! TLS), picks the pool its server name routes to, and keeps the bytes read so that they go
//! to the backend first (docs/traffic-controls.md, "SNI routing").
//!
//! `accept.rs` comes here only for frontends with `[[frontend.route]]`s, after the gate (the
//! PROXY header, if any, comes before the ClientHello on the wire). The bytes are read into
//! a relay buffer from the worker's pool ([`relay::pool::Buf`]), at most one buffer's worth
//! ([`sni::HELLO_MAX`]), and handed over as the relay's first data ([`Head::Data`]); nothing
//! is peeked or read twice. No server name, no matching route, or bytes that are not TLS at
//! all: the default pool. A broken, truncated or oversized ClientHello, or none within
//! `sni_timeout`, closes the client with a counted reason, as does a client whose pool
//! (the default one, when no route matched) has no backends.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::Interest;

use super::gate::Reason;
use crate::backend::FrontendSnap;
use crate::balance::pools::DEFAULT_POOL;
use crate::relay::pool::Buf;
use crate::relay::sni::{self, Parsed};
use crate::relay::{sys, Conn, Head};

/// Most reads a ClientHello may take. Each read parses everything read so far, so a client
/// dribbling a byte at a time would otherwise cost quadratic time; a real ClientHello of
/// 16 KiB in 536-byte segments takes 31.
const READS_MAX: u32 = 128;

/// The routed client: its pool and the bytes read from it (taken by the relay once a backend
/// is connected).
pub struct Hello {
    pub pool: usize,
    pub head: Option<Head>,
}

/// Why no pool.
enum Failed {
    TimedOut,
    Bad(&'static str),
}

/// Reads the ClientHello and routes it; `None` when the client must be closed (already
/// counted and logged). The caller shuts the socket down.
pub async fn read_hello<S: Conn>(fe: &FrontendSnap, client: &S, peer: SocketAddr) -> Option<Hello> {
    let name = &fe.config.name;
    let gate = &fe.state.gate;
    let timeout = fe
        .config
        .sni
        .as_ref()
        .map_or(Duration::from_secs(5), |s| s.timeout);
    let (buf, n, parsed) = match read(client, timeout).await {
        Ok(r) => r,
        Err(Failed::TimedOut) => {
            let detail = format!(
                "no whole TLS ClientHello within sni_timeout ({})",
                crate::config::format_duration(timeout)
            );
            gate.reject(name, Reason::SniTimeout, peer, &detail);
            return None;
        }
        Err(Failed::Bad(why)) => {
            gate.reject(name, Reason::Sni, peer, why);
            return None;
        }
    };
    let server_name = match &parsed {
        Parsed::Hello { name: Some(n), .. } => Some(n.as_str()),
        _ => None,
    };
    let pool = server_name
        .and_then(|n| fe.routes.as_ref().and_then(|t| t.lookup(n)))
        .unwrap_or(DEFAULT_POOL);
    if fe.pools.get(pool).is_none_or(|p| p.members.is_empty()) {
        let detail = match server_name {
            Some(n) => format!("no route for TLS server name \"{n}\" and no default pool"),
            None if parsed == Parsed::NotTls => {
                "not TLS, and no default pool for clients without a route".to_string()
            }
            None => {
                "no TLS server name, and no default pool for clients without a route".to_string()
            }
        };
        gate.reject(name, Reason::Sni, peer, &detail);
        return None;
    }
    Some(Hello {
        pool,
        head: Some(Head::Data(buf, n)),
    })
}

/// Reads until the bytes hold a whole ClientHello, or show they are not TLS; returns the
/// buffer, how much of it was read, and what the parser made of it.
async fn read<S: Conn>(client: &S, timeout: Duration) -> Result<(Buf, usize, Parsed), Failed> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = Buf::take();
    // The pool's buffers are HELLO_MAX long; a guard, should that ever change.
    let cap = buf.len().min(sni::HELLO_MAX);
    let mut have = 0;
    let mut reads = 0;
    let fd = client.as_raw_fd();
    loop {
        let got = client.attempt(Interest::READABLE, || sys::recv(fd, &mut buf[have..cap]));
        match got {
            Ok(0) => {
                return Err(Failed::Bad(
                    "connection closed before a whole TLS ClientHello",
                ))
            }
            Ok(n) => {
                have += n;
                reads += 1;
                match sni::parse(&buf[..have]) {
                    Ok(Parsed::Partial) if reads >= READS_MAX => {
                        return Err(Failed::Bad("TLS ClientHello sent in over 128 pieces"))
                    }
                    Ok(Parsed::Partial) if have < cap => {}
                    // Unreachable: the parser decides every input of the cap's length.
                    Ok(Parsed::Partial) => return Err(Failed::Bad(sni::Bad::TooLong.as_str())),
                    Ok(p) => return Ok((buf, have, p)),
                    Err(b) => return Err(Failed::Bad(b.as_str())),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // On timeout the wait is dropped; on io_uring its poll is cancelled and keeps
                // the socket open until the cancel completes (see `worker::ring`).
                match super::deadline::timeout_at(deadline, client.wait(Interest::READABLE)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        return Err(Failed::Bad("socket error before a whole TLS ClientHello"))
                    }
                    Err(_) => return Err(Failed::TimedOut),
                }
            }
            Err(_) => return Err(Failed::Bad("socket error before a whole TLS ClientHello")),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Failed::TimedOut);
        }
    }
}

//! Who else listens on an address: the kernel's TCP LISTEN entries (from sock_diag netlink,
//! or `/proc/net/tcp` and `/proc/net/tcp6` where netlink is refused) that clash with one of
//! ours, minus the sockets this process holds, each named by the processes whose
//! `/proc/PID/fd` links point at its inode.
//!
//! A netlink dump and plain reads of procfs, which the kernel generates in memory: they do not
//! wait on a disk, so the control thread may make them. Nothing here needs privileges beyond
//! the caller's. Another user's processes may hide their fds: then the clash is still found
//! (the LISTEN table is readable by everyone) and reported with its uid and inode instead of a
//! pid.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};

/// TCP_LISTEN in the `st` column of `/proc/net/tcp`.
const LISTEN: u8 = 0x0A;

/// One LISTEN entry of the kernel's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    pub addr: SocketAddr,
    pub uid: u32,
    pub inode: u64,
}

/// A listener of another process that clashes with one of our addresses.
#[derive(Debug, Clone)]
pub struct Foreign {
    pub listening: Listening,
    /// `(pid, name)` of every process holding the socket that we could see.
    pub owners: Vec<(i32, String)>,
}

impl Foreign {
    /// Whether it is on exactly `ours` (same family, same address): then, bound with
    /// SO_REUSEPORT by the same user, it sits in our reuseport group.
    pub fn same_address(&self, ours: SocketAddr) -> bool {
        self.listening.addr == ours
    }
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.listening.addr)?;
        if self.owners.is_empty() {
            return write!(
                f,
                " (socket inode {}, uid {}; its process is not visible to this user: \
                 `ss -ltnp 'sport = :{}'` as root names it)",
                self.listening.inode,
                self.listening.uid,
                self.listening.addr.port()
            );
        }
        let owners: Vec<String> = self
            .owners
            .iter()
            .map(|(pid, name)| format!("pid {pid} ({name})"))
            .collect();
        write!(f, " held by {}", owners.join(", "))
    }
}

/// Whether a listener on `theirs` takes connections meant for `ours` (same port, and the same
/// address, or either one a wildcard covering the other).
///
/// Our IPv6 sockets are IPV6_V6ONLY (see `bind_one`), so they never cover IPv4. Theirs may be
/// dual-stack, and procfs does not say: an IPv6 wildcard of theirs counts as covering our
/// IPv4 addresses too. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is its IPv4 address.
pub fn clashes(ours: SocketAddr, theirs: SocketAddr) -> bool {
    if ours.port() == 0 || ours.port() != theirs.port() {
        return false;
    }
    let theirs_ip = match theirs.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match (ours.ip(), theirs_ip) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a == b || a.is_unspecified() || b.is_unspecified(),
        (IpAddr::V6(a), IpAddr::V6(b)) => a == b || a.is_unspecified() || b.is_unspecified(),
        (IpAddr::V4(_), IpAddr::V6(b)) => b.is_unspecified(),
        (IpAddr::V6(_), IpAddr::V4(_)) => false,
    }
}

/// Parses one line of `/proc/net/tcp` or `/proc/net/tcp6`: `(local address, state, uid, inode)`.
/// The header and anything malformed give `None`.
fn parse_line(line: &str) -> Option<(SocketAddr, u8, u32, u64)> {
    let mut fields = line.split_whitespace();
    fields.next()?; // "sl:"
    let local = fields.next()?;
    fields.next()?; // remote address
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    let mut rest = fields.skip(3); // tx_queue:rx_queue, tr:tm->when, retrnsmt
    let uid = rest.next()?.parse().ok()?;
    let inode = rest.nth(1)?.parse().ok()?; // after the timeout column
    let (ip, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints the address as 32-bit words in host byte order ("%08X" of each
    // __be32), so each word's native-endian bytes are the address bytes in network order.
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((SocketAddr::new(ip, port), state, uid, inode))
}

/// The LISTEN entries of one table. Reading stops at the first entry in another state: the
/// kernel writes the whole listening hash before the established one (`tcp_get_idx` in
/// net/ipv4/tcp_ipv4.c walks TCP_SEQ_STATE_LISTENING, then TCP_SEQ_STATE_ESTABLISHED). That
/// bounds the IPv4 table to a few pages; the IPv6 table of a machine whose connections are all
/// IPv4 has no such entry to stop at, and its read walks every connection (the reason netlink
/// comes first).
fn read_table(path: &str, out: &mut Vec<Listening>) -> io::Result<()> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        // No IPv6 in this kernel (or namespace): nothing listens there.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for line in BufReader::new(file).lines() {
        let Some((addr, state, uid, inode)) = parse_line(&line?) else {
            continue;
        };
        if state != LISTEN {
            break;
        }
        out.push(Listening { addr, uid, inode });
    }
    Ok(())
}

/// Every TCP listener of this network namespace, IPv4 and IPv6: from the kernel's sock_diag
/// netlink interface, which lists listeners only ([`super::sockdiag`]), or where that is
/// refused (a sandbox without AF_NETLINK) from `/proc/net/tcp` and `/proc/net/tcp6`.
pub fn tcp_listeners() -> io::Result<Vec<Listening>> {
    static FELL_BACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    match super::sockdiag::tcp_listeners() {
        Ok(found) => return Ok(found),
        Err(e) => {
            if !FELL_BACK.swap(true, std::sync::atomic::Ordering::Relaxed) {
                crate::debug!(
                    "sock_diag netlink refused ({e}): the TCP listener table is read from \
                     /proc/net/tcp and /proc/net/tcp6, which walks every connection on IPv4-only \
                     machines"
                );
            }
        }
    }
    procfs_listeners()
}

/// [`tcp_listeners`] from procfs.
fn procfs_listeners() -> io::Result<Vec<Listening>> {
    let mut out = Vec::new();
    read_table("/proc/net/tcp", &mut out)?;
    read_table("/proc/net/tcp6", &mut out)?;
    Ok(out)
}

/// The inode of a `socket:[N]` fd link.
fn socket_inode(link: &std::path::Path) -> Option<u64> {
    let s = link.to_str()?;
    s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Inodes of the sockets in one process's fd table (empty if we may not look).
fn socket_inodes(fd_dir: &std::path::Path) -> HashSet<u64> {
    let Ok(entries) = std::fs::read_dir(fd_dir) else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| socket_inode(&l))
        .collect()
}

/// Inodes of the listening sockets this process bound (frontends and admin), until they no
/// longer listen. The fd table alone is not enough: a listener a reload closed can stay in
/// the kernel's table for a moment after its fd is gone (an io_uring accept still holds it).
static BOUND: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

fn bound() -> MutexGuard<'static, BTreeSet<u64>> {
    BOUND.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records a listening socket of ours, so that it is never taken for another process's.
pub fn register_own(socket: &impl AsRawFd) {
    if let Ok(st) = nix::sys::stat::fstat(socket.as_raw_fd()) {
        bound().insert(st.st_ino);
    }
}

/// Forgets our sockets that are gone from `table` (closed). Call with a fresh table on the
/// control thread, where every bind happens, so none is between bind and listen.
pub fn forget_closed(table: &[Listening]) {
    let live: HashSet<u64> = table.iter().map(|l| l.inode).collect();
    bound().retain(|i| live.contains(i));
}

/// The sockets of this process: every one in its fd table, and every listener it bound that
/// still listens. A listener of ours (one a reload keeps, moves, or just closed) is never
/// "another process".
pub fn own_inodes() -> HashSet<u64> {
    let mut own = socket_inodes(std::path::Path::new("/proc/self/fd"));
    own.extend(bound().iter().copied());
    own
}

/// `(pid, name)` of every other process with one of `inodes` open, by inode.
fn owners_of(inodes: &HashSet<u64>) -> Vec<(u64, i32, String)> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let held = socket_inodes(&p.path().join("fd"));
        for &inode in inodes.intersection(&held) {
            // procfs, generated in memory: no disk to wait for, on the control thread or not.
            #[allow(clippy::disallowed_methods)]
            let name = std::fs::read_to_string(p.path().join("comm"))
                .map(|s| s.trim_end().to_string())
                .unwrap_or_else(|_| "?".into());
            out.push((inode, pid, name));
        }
    }
    out.sort();
    out
}

/// Names the processes behind `found` (one scan of /proc for all of them).
pub fn with_owners(found: Vec<Listening>) -> Vec<Foreign> {
    if found.is_empty() {
        return Vec::new();
    }
    let inodes: HashSet<u64> = found.iter().map(|l| l.inode).collect();
    let owners = owners_of(&inodes);
    found
        .into_iter()
        .map(|listening| Foreign {
            owners: owners
                .iter()
                .filter(|(i, _, _)| *i == listening.inode)
                .map(|(_, pid, name)| (*pid, name.clone()))
                .collect(),
            listening,
        })
        .collect()
}

/// Listeners of other processes that clash with `ours`, from `table` ([`tcp_listeners`]).
pub fn foreign_in(ours: SocketAddr, table: &[Listening], own: &HashSet<u64>) -> Vec<Listening> {
    table
        .iter()
        .filter(|l| !own.contains(&l.inode) && clashes(ours, l.addr))
        .cloned()
        .collect()
}

/// Fails with `AddrInUse` naming the other listeners if another process already listens on
/// `addr` or on an address that clashes with it. Port 0 asks the kernel for a free port and
/// cannot clash.
pub fn refuse_if_taken(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let table = tcp_listeners()?;
    let found = foreign_in(addr, &table, &own_inodes());
    if found.is_empty() {
        return Ok(());
    }
    // One process's several sockets on the address read the same: name it once.
    let mut seen = HashSet::new();
    let names: Vec<String> = with_owners(found)
        .iter()
        .map(|f| f.to_string())
        .filter(|n| seen.insert(n.clone()))
        .collect();
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "another process already listens there: {}; ringlb does not share a listen port",
            names.join("; ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lines_of_both_tables_are_parsed() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 123456 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_line(v4),
            Some((a("127.0.0.1:8080"), 0x0A, 1000, 123456))
        );
        let v6 = "   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 42 1 0000000000000000 100 0 0 10 0";
        assert_eq!(parse_line(v6), Some((a("[::1]:80"), 0x0A, 0, 42)));
        let mapped = "   2: 0000000000000000FFFF00000100007F:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 43 1";
        assert_eq!(
            parse_line(mapped).map(|p| p.0),
            Some(a("[::ffff:127.0.0.1]:80"))
        );
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
        assert_eq!(parse_line(header), None);
        assert_eq!(parse_line("garbage"), None);
    }

    #[test]
    fn same_address_and_covering_wildcards_clash_other_ports_and_families_do_not() {
        let clash = [
            ("127.0.0.1:80", "127.0.0.1:80"),
            ("127.0.0.1:80", "0.0.0.0:80"),
            ("0.0.0.0:80", "127.0.0.1:80"),
            ("0.0.0.0:80", "[::ffff:127.0.0.1]:80"),
            ("127.0.0.1:80", "[::]:80"), // may be dual-stack
            ("[::]:80", "[::1]:80"),
            ("[::1]:80", "[::]:80"),
            ("[::1]:80", "[::1]:80"),
        ];
        for (ours, theirs) in clash {
            assert!(clashes(a(ours), a(theirs)), "{ours} vs {theirs}");
        }
        let apart = [
            ("127.0.0.1:80", "127.0.0.1:81"),
            ("127.0.0.1:80", "127.0.0.2:80"),
            ("[::]:80", "0.0.0.0:80"), // ours is IPv6-only
            ("[::1]:80", "127.0.0.1:80"),
            ("127.0.0.1:80", "[::1]:80"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ];
        for (ours, theirs) in apart {
            assert!(!clashes(a(ours), a(theirs)), "{ours} vs {theirs}");
        }
    }

    #[test]
    fn a_listener_of_this_process_is_found_in_the_table_and_is_our_own() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let table = tcp_listeners().unwrap();
        assert!(
            table.iter().any(|e| e.addr == addr),
            "{addr} not in {table:?}"
        );
        // The fallback reads the same entry, with the same owner and inode.
        let from_procfs = procfs_listeners().unwrap();
        let entry = |t: &[Listening]| t.iter().find(|e| e.addr == addr).cloned();
        assert_eq!(entry(&table), entry(&from_procfs));
        assert!(foreign_in(addr, &table, &own_inodes()).is_empty());
        refuse_if_taken(addr).unwrap();
        // Without our own inodes it is "another" listener, and it is named.
        let found = foreign_in(addr, &table, &HashSet::new());
        assert_eq!(found.len(), 1);
        let text = with_owners(found)[0].to_string();
        assert!(text.starts_with(&addr.to_string()), "{text}");
    }
}

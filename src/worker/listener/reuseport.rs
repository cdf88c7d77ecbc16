//! Keeps a listen address's SO_REUSEPORT group to ringlb's own sockets: a classic BPF program
//! (SO_ATTACH_REUSEPORT_CBPF) that picks the socket for each new connection, and only ever
//! one of ours.
//!
//! # Why an index below `count` is always one of ours
//!
//! The kernel keeps a group's listening sockets in an array, in the order they called
//! `listen()` (`reuseport_add_sock` appends at `num_socks`). The program's return value is an
//! index into that array; an index at or past its end makes the kernel fall back to its hash
//! over all members. [`super::bind_reuseport`] binds and listens our `count` sockets one after
//! another on a fresh group (it refuses before binding if anyone else listens there), so they
//! are indices `0..count`. Anything that joins later (a second ringlb, an HAProxy with
//! SO_REUSEPORT run by the same user) is appended at `count` or beyond, and this program never
//! returns such an index: it gets no connections.
//!
//! When a member closes, the kernel moves the last member into its slot
//! (`__reuseport_detach_sock`). That reorders our sockets when a reload moves an address
//! (the new sockets join the old group, then the old ones close: the new ones end up in
//! `0..count` in another order, which costs only the core affinity below), and it is why a
//! process that joined us must not be left there: if one of our sockets closed while it sat at
//! the end, it would take that slot. Reloads refuse to bind where another process listens and
//! the periodic check logs it, so that never happens unnoticed.
//!
//! # Which of ours
//!
//! The flow hash of the SYN (`SKF_AD_RXHASH`) modulo `count`, as the kernel's own reuseport
//! selection spreads connections: every worker gets a fair share whichever core the packets
//! arrive on. Steering by receiving core was tried and dropped: behind a NIC with one receive
//! queue (common on small VMs) every SYN is taken by the same core, and one worker would get
//! every connection while the others idle.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

/// `SO_ATTACH_REUSEPORT_CBPF` from `asm-generic/socket.h` (the libc crate does not export it
/// for glibc targets). SPARC numbers its socket options differently.
#[cfg(not(target_arch = "sparc64"))]
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
#[cfg(target_arch = "sparc64")]
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 0x35;

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const ALU_MOD_K: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
const RET_A: u16 = 0x16; // BPF_RET | BPF_A

/// The `k` of an ancillary load: `SKF_AD_OFF + what`, as the kernel reads it (an unsigned
/// offset far past any packet).
const fn ancillary(what: libc::c_int) -> u32 {
    (libc::SKF_AD_OFF + what) as u32
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The program for a group of `count` sockets; see the module comment. Every path returns a
/// value below `count`.
pub fn program(count: u32) -> Vec<libc::sock_filter> {
    vec![
        insn(LD_W_ABS, 0, 0, ancillary(libc::SKF_AD_RXHASH)), // A = flow hash
        insn(ALU_MOD_K, 0, 0, count.max(1)),                  // A = hash % count
        insn(RET_A, 0, 0, 0),
    ]
}

/// Attaches [`program`] to the SO_REUSEPORT group of `socket` (a listening socket bound with
/// SO_REUSEPORT): the program belongs to the group, whichever member it is set on.
pub fn attach(socket: &impl AsRawFd, count: usize) -> io::Result<()> {
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    let filter = program(count);
    let prog = libc::sock_fprog {
        // 3 instructions: fits.
        len: filter.len() as libc::c_ushort,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `filter`, a live Vec of `prog.len` sock_filter entries that
    // outlives the call; the kernel copies the program during setsockopt and keeps no pointer
    // into our memory. The option value is exactly one `sock_fprog`, and its size is passed.
    // The fd is a socket the caller owns for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&prog).cast::<libc::c_void>(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program the way the kernel does, for a given hash.
    fn run(prog: &[libc::sock_filter], hash: u32) -> u32 {
        let mut a = 0u32;
        for i in prog {
            match i.code {
                LD_W_ABS if i.k == ancillary(libc::SKF_AD_RXHASH) => a = hash,
                ALU_MOD_K => a %= i.k,
                RET_A => return a,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
        panic!("the program fell off its end")
    }

    #[test]
    fn every_hash_picks_one_of_our_sockets_and_every_socket_gets_some() {
        for count in 1..=9u32 {
            let prog = program(count);
            let mut used = vec![false; count as usize];
            for hash in (0..64).chain([0xdead_beef, u32::MAX - 1, u32::MAX]) {
                let i = run(&prog, hash);
                assert!(i < count, "count {count} hash {hash}: {i}");
                used[i as usize] = true;
            }
            assert!(used.iter().all(|&u| u), "count {count}: {used:?}");
        }
    }

    #[test]
    fn the_kernel_takes_the_program() {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        socket.set_reuse_port(true).unwrap();
        socket
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        socket.listen(8).unwrap();
        attach(&socket, 3).unwrap();
    }
}

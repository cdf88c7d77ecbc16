//! Maglev consistent hashing (placeholder until the Maglev issue lands: behaves as round robin
//! over usable members in config order).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{eligible, BackendSelection};
use crate::backend::BackendRef;
use crate::config::Frontend;

pub struct MaglevSelector {
    members: Vec<usize>,
    rotor: AtomicUsize,
}

impl MaglevSelector {
    pub fn new(
        _frontend: &Frontend,
        _backends: &[BackendRef],
        members: &[usize],
    ) -> MaglevSelector {
        MaglevSelector {
            members: members.to_vec(),
            rotor: AtomicUsize::new(0),
        }
    }
}

impl BackendSelection for MaglevSelector {
    fn select(
        &self,
        _client: &SocketAddr,
        backends: &[BackendRef],
        tried: &[usize],
    ) -> Option<usize> {
        let n = self.members.len();
        for _ in 0..n {
            let idx = self.members[self.rotor.fetch_add(1, Ordering::Relaxed) % n];
            if eligible(backends, tried, idx) {
                return Some(idx);
            }
        }
        None
    }
}

//! ingestd patch: request bodies read into memory by the connection's own
//! thread, counted against a byte budget shared by all connections.

use std::io::{Cursor, Read, Result as IoResult};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes of buffered bodies held at once, across all connections.
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes currently reserved.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn try_take(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let new = match used.checked_add(bytes) {
                Some(new) if new <= self.limit => new,
                _ => return false,
            };
            match self.used.compare_exchange_weak(used, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(current) => used = current,
            }
        }
    }

    /// Takes `bytes` even beyond the limit: for memory already in use that
    /// must be counted (so that new bodies are refused), not refused itself.
    fn force_take(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Bytes taken from a `Budget`, given back when dropped.
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Reservation {
    pub fn new(budget: &Arc<Budget>) -> Reservation {
        Reservation {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Reserves `bytes` more; false (and nothing reserved) if that would
    /// exceed the budget.
    pub fn grow(&mut self, bytes: usize) -> bool {
        if !self.budget.try_take(bytes) {
            return false;
        }
        self.bytes += bytes;
        true
    }

    /// Counts `bytes` already in memory against the budget, even beyond its
    /// limit.
    pub fn forced(budget: &Arc<Budget>, bytes: usize) -> Reservation {
        budget.force_take(bytes);
        Reservation {
            budget: budget.clone(),
            bytes,
        }
    }

    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The whole budget's limit: a reservation can never grow beyond it.
    pub fn limit(&self) -> usize {
        self.budget.limit
    }

    /// Gives back all but `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        if bytes < self.bytes {
            self.budget.give_back(self.bytes - bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// A request body held in memory; its bytes stay counted against the budget
/// until it is dropped.
pub struct BufferedBody {
    data: Cursor<Vec<u8>>,
    _reservation: Reservation,
}

impl BufferedBody {
    pub fn new(data: Vec<u8>, reservation: Reservation) -> BufferedBody {
        BufferedBody {
            data: Cursor::new(data),
            _reservation: reservation,
        }
    }
}

impl BufferedBody {
    /// The bytes not yet read and the reservation that counts them.
    pub fn into_parts(self) -> (Vec<u8>, Reservation) {
        let position = self.data.position() as usize;
        let mut data = self.data.into_inner();
        data.drain(..position.min(data.len()));
        (data, self._reservation)
    }
}

impl Read for BufferedBody {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        self.data.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::{BufferedBody, Budget, Reservation};
    use std::io::Read;

    #[test]
    fn reservation_counts_until_dropped() {
        let budget = Budget::new(100);
        let mut a = Reservation::new(&budget);
        assert!(a.grow(60));
        let mut b = Reservation::new(&budget);
        assert!(!b.grow(50));
        assert_eq!(budget.used(), 60);
        assert!(b.grow(40));
        b.shrink_to(10);
        assert_eq!(budget.used(), 70);

        let mut body = BufferedBody::new(b"hello".to_vec(), a);
        let mut s = String::new();
        body.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        drop(body);
        assert_eq!(budget.used(), 10);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}

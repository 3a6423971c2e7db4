//! Per-API-key caps on what a key holds at once (sessions, connections), so that one tenant
//! cannot take every slot of a server shared by several keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::KeyId;

/// How many of one resource each key holds; a [`Held`] gives its unit back when dropped.
#[derive(Debug)]
pub struct KeyQuota {
    max: usize,
    held: Arc<Mutex<HashMap<KeyId, usize>>>,
}

/// One unit held by a key, returned on drop.
#[derive(Debug)]
pub struct Held {
    key: KeyId,
    held: Arc<Mutex<HashMap<KeyId, usize>>>,
}

impl KeyQuota {
    /// At most `max` units per key.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            held: Arc::default(),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// One more unit for `key`, or `None` when it already holds `max`.
    pub fn acquire(&self, key: KeyId) -> Option<Held> {
        let mut held = lock(&self.held);
        let n = held.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Held {
            key,
            held: self.held.clone(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            // Keys that hold nothing take no memory.
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_max_and_gets_units_back_on_drop() {
        let quota = KeyQuota::new(2);
        let (a, b) = (KeyId::of("a"), KeyId::of("b"));
        let first = quota.acquire(a).unwrap();
        let _second = quota.acquire(a).unwrap();
        assert!(quota.acquire(a).is_none());
        // Another key is not affected.
        let _other = quota.acquire(b).unwrap();
        drop(first);
        assert!(quota.acquire(a).is_some());
    }
}

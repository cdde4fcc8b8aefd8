//! The one lock policy. pullcache's `std` locks guard maps and small records, and every
//! critical section leaves them valid at any point it could panic (a map operation either
//! happened or did not). So a lock is never treated as poisoned: a panic in one request is
//! that request's failure, and every later request still gets the lock. Call sites use these
//! methods instead of `lock()`/`read()`/`write()`, so no site picks its own policy.

use std::sync::{Condvar, LockResult, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

/// A lock result's guard, poisoned or not.
fn recover<G>(result: LockResult<G>) -> G {
    result.unwrap_or_else(PoisonError::into_inner)
}

/// [`Mutex::lock`] without poisoning.
pub trait MutexExt<T> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> MutexExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        recover(self.lock())
    }
}

/// [`RwLock::read`] and [`RwLock::write`] without poisoning.
pub trait RwLockExt<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T> RwLockExt<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        recover(self.read())
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        recover(self.write())
    }
}

/// [`Condvar::wait_timeout`] without poisoning; returns the guard again.
pub fn wait_timeout<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>, timeout: Duration) -> MutexGuard<'a, T> {
    recover(condvar.wait_timeout(guard, timeout)).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_under_a_lock_leaves_it_usable() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let rw = std::sync::Arc::new(RwLock::new(1));
        let (m, r) = (mutex.clone(), rw.clone());
        let panicked = std::thread::spawn(move || {
            let _m = m.lock().unwrap();
            let _r = r.write().unwrap();
            panic!("in a critical section");
        })
        .join();
        assert!(panicked.is_err());
        assert!(mutex.is_poisoned() && rw.is_poisoned());
        *mutex.locked() += 1;
        *rw.write_locked() += 1;
        assert_eq!((*mutex.locked(), *rw.read_locked()), (2, 2));
    }
}

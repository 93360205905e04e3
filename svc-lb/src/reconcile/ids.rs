//! Lowest-free id allocation over a fixed range.

use std::collections::BTreeSet;

/// Hands out the lowest id in `1..end` that is not in use. Ids still present in the current
/// maps count as used even if the new state drops them: they are only deleted at the end of
/// the plan, so handing one out again in the same plan would alias two backends or frontends.
///
/// Kept as "every id below `high` is used except `free`" rather than as the set of used ids:
/// the free set is small (only holes left by deletions), so the agent can keep one pool per id
/// space across syncs and clone it cheaply for each plan instead of rebuilding it from a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct IdPool {
    /// Unused ids below `high`.
    free: BTreeSet<u32>,
    /// Every id in `high..end` is unused.
    high: u32,
    end: u32,
}

impl IdPool {
    pub(super) fn new(end: u32, used: impl IntoIterator<Item = u32>) -> Self {
        let mut pool = Self {
            free: BTreeSet::new(),
            high: 1,
            end,
        };
        for id in used {
            pool.take(id);
        }
        pool
    }

    pub(super) fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.high < self.end).then(|| {
            self.high += 1;
            self.high - 1
        })
    }

    /// Marks `id` as used (ids outside `1..end` are never handed out anyway).
    pub(super) fn take(&mut self, id: u32) {
        if id == 0 || id >= self.end {
            return;
        }
        if id >= self.high {
            self.free.extend(self.high..id);
            self.high = id + 1;
        } else {
            self.free.remove(&id);
        }
    }

    /// Returns `id` to the pool: handed out by `alloc` but not used after all, or deleted.
    pub(super) fn free(&mut self, id: u32) {
        if id == 0 || id >= self.high {
            return;
        }
        if id + 1 == self.high {
            // Shrink instead of growing the free set, so a pool that empties is small again.
            self.high = id;
            while self.high > 1 && self.free.remove(&(self.high - 1)) {
                self.high -= 1;
            }
        } else {
            self.free.insert(id);
        }
    }

    #[cfg(test)]
    pub(super) fn is_used(&self, id: u32) -> bool {
        id != 0 && id < self.high && !self.free.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_skips_used_and_reuses_freed() {
        let mut a = IdPool::new(6, [1, 3]);
        assert_eq!(a.alloc(), Some(2));
        assert_eq!(a.alloc(), Some(4));
        a.free(2);
        assert_eq!(a.alloc(), Some(2));
        assert_eq!(a.alloc(), Some(5));
        assert_eq!(a.alloc(), None, "6 is the exclusive end");
        a.free(3);
        assert_eq!(a.alloc(), Some(3));
    }

    #[test]
    fn zero_and_out_of_range_ids_are_never_handed_out() {
        let mut a = IdPool::new(2, [0, 7]);
        assert_eq!(a.alloc(), Some(1));
        assert_eq!(a.alloc(), None);
    }

    #[test]
    fn freeing_the_top_shrinks_and_matches_a_fresh_pool() {
        let mut a = IdPool::new(100, [1, 2, 3, 4, 5]);
        a.free(2);
        a.free(5);
        a.free(4);
        assert_eq!(a, IdPool::new(100, [1, 3]));
        a.take(9);
        assert!(a.is_used(9) && !a.is_used(8) && a.is_used(3));
        assert_eq!(a, IdPool::new(100, [1, 3, 9]));
        assert_eq!(a.alloc(), Some(2));
    }
}

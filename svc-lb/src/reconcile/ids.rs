//! Lowest-free id allocation over a fixed range.

use std::collections::BTreeSet;

/// Hands out the lowest id in `1..end` that is not in use. Ids still present in the current
/// maps count as used even if the new state drops them: they are only deleted at the end of
/// the plan, so handing one out again in the same plan would alias two backends or frontends.
#[derive(Debug)]
pub(crate) struct IdAllocator {
    used: BTreeSet<u32>,
    /// Every id below `next` is used (so the scan never restarts from 1).
    next: u32,
    end: u32,
}

impl IdAllocator {
    pub(crate) fn new(end: u32, used: impl IntoIterator<Item = u32>) -> Self {
        Self {
            used: used.into_iter().collect(),
            next: 1,
            end,
        }
    }

    pub(crate) fn alloc(&mut self) -> Option<u32> {
        while self.next < self.end {
            let id = self.next;
            self.next += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }

    /// Returns an id handed out by `alloc` that ended up not being used.
    pub(crate) fn free(&mut self, id: u32) {
        if self.used.remove(&id) && id < self.next {
            self.next = id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_skips_used_and_reuses_freed() {
        let mut a = IdAllocator::new(6, [1, 3]);
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
    fn zero_is_never_handed_out() {
        let mut a = IdAllocator::new(2, []);
        assert_eq!(a.alloc(), Some(1));
        assert_eq!(a.alloc(), None);
    }
}

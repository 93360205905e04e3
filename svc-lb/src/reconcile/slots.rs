//! Which backend goes into which slot of a frontend.
//!
//! Slots must stay contiguous (`1..=count`) because the datapath picks `hash % count + 1`.
//! Backends that stay keep their slot, new backends fill holes first, and remaining holes are
//! closed by moving the last backend into them (as Cilium does), so adding or removing one
//! backend rewrites at most one slot plus the count.

use std::collections::BTreeSet;

/// `old[i]` is the backend id in slot `i + 1` now (`None` = slot missing); `desired` are the
/// backend ids the frontend must have. Returns the backend id for slots `1..=n`.
pub(super) fn layout(old: &[Option<u32>], desired: &[u32]) -> Vec<u32> {
    let want: BTreeSet<u32> = desired.iter().copied().collect();
    let mut placed = BTreeSet::new();
    let mut slots: Vec<Option<u32>> = old
        .iter()
        .map(|b| b.filter(|id| want.contains(id) && placed.insert(*id)))
        .collect();
    let mut new: Vec<u32> = Vec::new();
    for id in desired {
        if placed.insert(*id) {
            new.push(*id);
        }
    }
    let mut new = new.into_iter();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match new.next() {
            Some(id) => *slot = Some(id),
            None => break,
        }
    }
    slots.extend(new.map(Some));
    loop {
        while matches!(slots.last(), Some(None)) {
            slots.pop();
        }
        let Some(hole) = slots.iter().position(Option::is_none) else {
            break;
        };
        // The last element is occupied here (trailing holes were popped) and hole < last.
        let last = slots.pop().flatten();
        slots[hole] = last;
    }
    slots.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[u32]) -> Vec<Option<u32>> {
        v.iter().map(|&x| Some(x)).collect()
    }

    #[test]
    fn first_layout_follows_desired_order() {
        assert_eq!(layout(&[], &[5, 3, 9]), [5, 3, 9]);
    }

    #[test]
    fn unchanged_keeps_old_order() {
        assert_eq!(layout(&s(&[9, 3, 5]), &[3, 5, 9]), [9, 3, 5]);
    }

    #[test]
    fn removal_moves_the_last_into_the_hole() {
        assert_eq!(layout(&s(&[1, 2, 3, 4]), &[1, 3, 4]), [1, 4, 3]);
        assert_eq!(layout(&s(&[1, 2, 3, 4]), &[1, 2, 3]), [1, 2, 3]);
        assert_eq!(layout(&s(&[1, 2, 3, 4]), &[4]), [4]);
        assert_eq!(layout(&s(&[1, 2, 3]), &[]), Vec::<u32>::new());
    }

    #[test]
    fn new_backends_fill_holes_then_append() {
        assert_eq!(layout(&s(&[1, 2, 3]), &[1, 3, 7]), [1, 7, 3]);
        assert_eq!(layout(&s(&[1, 2]), &[1, 2, 7, 8]), [1, 2, 7, 8]);
        assert_eq!(layout(&[Some(1), None, Some(3)], &[1, 3]), [1, 3]);
    }

    #[test]
    fn duplicates_in_old_or_desired_are_placed_once() {
        assert_eq!(layout(&s(&[1, 1, 2]), &[1, 2]), [1, 2]);
        assert_eq!(layout(&[], &[4, 4, 5]), [4, 5]);
    }
}

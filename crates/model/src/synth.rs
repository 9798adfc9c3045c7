//! Synthetic shopping sessions over a catalog, for the demo encoder the service trains at
//! start when it has no checkpoint.
//!
//! Users have two favourite categories: one they browse by day, one in the evening (so the
//! hour of day carries signal). Within a category, items form a ring and a user often
//! moves on to the next item of the ring (a sequential pattern a popularity ranker cannot
//! see); otherwise they pick another item of the category, or wander off.

use std::collections::HashMap;

use crate::data::Interaction;
use crate::rng::SplitMix64;

/// Sessions for `users` users of `steps` interactions each over `items` (id, category),
/// identical for the same inputs and seed.
pub fn sessions(
    items: &[(String, String)],
    users: usize,
    steps: usize,
    seed: u64,
) -> Vec<Interaction> {
    let mut categories: Vec<&str> = items.iter().map(|(_, c)| c.as_str()).collect();
    categories.sort_unstable();
    categories.dedup();
    if categories.is_empty() {
        return Vec::new();
    }
    // One pass over the items, so building the rings stays linear in the catalog.
    let index: HashMap<&str, usize> = categories
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, i))
        .collect();
    let category_of: Vec<usize> = items.iter().map(|(_, c)| index[c.as_str()]).collect();
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); categories.len()];
    let mut position = vec![0usize; items.len()];
    for (i, &c) in category_of.iter().enumerate() {
        position[i] = members[c].len();
        members[c].push(i);
    }

    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(users * steps);
    let day_start = 1_700_000_000.0 - 1_700_000_000.0 % 86_400.0;
    for u in 0..users {
        let day_cat = rng.below(categories.len() as u64) as usize;
        let evening_cat = rng.below(categories.len() as u64) as usize;
        let mut t = day_start + rng.below(30) as f64 * 86_400.0;
        let mut current: Option<usize> = None;
        for _ in 0..steps {
            t += 600.0 + rng.below(4 * 3600) as f64;
            let hour = (t.rem_euclid(86_400.0) / 3600.0) as u32;
            let favourite = if (18..24).contains(&hour) {
                evening_cat
            } else {
                day_cat
            };
            let r = rng.unit();
            let next = match current {
                Some(c) if r < 0.6 && category_of[c] == favourite => {
                    let ring = &members[category_of[c]];
                    ring[(position[c] + 1) % ring.len()]
                }
                _ if r < 0.9 => {
                    let ring = &members[favourite];
                    ring[rng.below(ring.len() as u64) as usize]
                }
                _ => rng.below(items.len() as u64) as usize,
            };
            out.push(Interaction {
                user: format!("synthetic-{u}"),
                item: items[next].0.clone(),
                timestamp: t,
            });
            current = Some(next);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_deterministic_and_follow_the_rings() {
        let items: Vec<(String, String)> = (0..40)
            .map(|i| (format!("i{i}"), format!("c{}", i % 4)))
            .collect();
        let a = sessions(&items, 20, 30, 1);
        assert_eq!(a, sessions(&items, 20, 30, 1));
        assert_eq!(a.len(), 600);
        // Within a category ring (i, i+4, i+8, …) the next item follows often.
        let follows = a
            .windows(2)
            .filter(|w| w[0].user == w[1].user)
            .filter(|w| {
                let n = |s: &str| s[1..].parse::<usize>().unwrap_or(0);
                (n(&w[0].item) + 4) % 40 == n(&w[1].item)
            })
            .count();
        assert!(follows > 150, "{follows}");
    }
}

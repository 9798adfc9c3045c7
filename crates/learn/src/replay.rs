//! The replay buffer: the last `capacity` transitions in a ring, sampled uniformly.
//!
//! Replaying old transitions next to new ones breaks the correlation of consecutive
//! feedback (one user's session arrives in a burst) that would otherwise make the
//! Q-network chase whatever it saw last.

use onrec_model::rng::SplitMix64;

use crate::qnet::State;

/// One step of feedback: in state `state` the item `action` was shown and earned `reward`.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The state the recommendation was made in.
    pub state: State,
    /// The recommended item (dense index, 1..=num_items).
    pub action: u32,
    /// The reward the engine computed (click 1, a later purchase γ-discounted).
    pub reward: f32,
    /// The next state; `None` is terminal.
    pub next_state: Option<State>,
    /// The items available in the next state; the Double DQN max is over these, and an
    /// empty list is terminal.
    pub next_candidates: Vec<u32>,
}

impl Transition {
    /// Whether the episode ends here (no next state or nothing to choose in it).
    pub fn is_terminal(&self) -> bool {
        self.next_state.is_none() || self.next_candidates.is_empty()
    }

    /// Approximate heap bytes owned by this transition (vector capacities).
    fn heap_bytes(&self) -> usize {
        let u = size_of::<u32>();
        let next = self
            .next_state
            .as_ref()
            .map_or(0, |s| s.history.capacity() * u);
        self.state.history.capacity() * u + next + self.next_candidates.capacity() * u
    }
}

/// A fixed-capacity ring of transitions; when full, a new one overwrites the oldest.
#[derive(Debug)]
pub struct Replay {
    items: Vec<Transition>,
    capacity: usize,
    next: usize,
    rng: SplitMix64,
}

impl Replay {
    /// An empty buffer of `capacity` transitions (at least 1), sampling from `seed`. The
    /// slots are allocated up front, so memory at the cap is known from the start.
    pub fn new(capacity: usize, seed: u64) -> Self {
        let capacity = capacity.max(1);
        Self {
            items: Vec::with_capacity(capacity),
            capacity,
            next: 0,
            rng: SplitMix64::new(seed),
        }
    }

    /// Adds a transition, overwriting the oldest when full.
    pub fn push(&mut self, t: Transition) {
        if self.items.len() < self.capacity {
            self.items.push(t);
        } else {
            self.items[self.next] = t;
        }
        self.next = (self.next + 1) % self.capacity;
    }

    /// Transitions held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no transition is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The most transitions held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The held transitions, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Transition> {
        let split = if self.items.len() < self.capacity {
            0
        } else {
            self.next
        };
        self.items[split..].iter().chain(&self.items[..split])
    }

    /// `n` transitions drawn uniformly with replacement; empty when the buffer is.
    pub fn sample(&mut self, n: usize) -> Vec<&Transition> {
        if self.items.is_empty() {
            return Vec::new();
        }
        let len = self.items.len() as u64;
        let picks: Vec<usize> = (0..n).map(|_| self.rng.below(len) as usize).collect();
        picks.into_iter().map(|i| &self.items[i]).collect()
    }

    /// Approximate bytes held: the slot array at its capacity plus every transition's
    /// vectors at their capacities.
    pub fn bytes(&self) -> usize {
        size_of::<Self>()
            + self.items.capacity() * size_of::<Transition>()
            + self.items.iter().map(Transition::heap_bytes).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use onrec_model::context::ContextIds;

    use super::*;

    fn t(action: u32) -> Transition {
        Transition {
            state: State {
                history: vec![1; 20],
                context: ContextIds { hour: 1, device: 1 },
            },
            action,
            reward: 0.0,
            next_state: None,
            next_candidates: Vec::new(),
        }
    }

    #[test]
    fn capacity_bounds_and_the_oldest_is_overwritten() {
        let mut r = Replay::new(3, 1);
        assert!(r.is_empty());
        for a in 1..=2 {
            r.push(t(a));
        }
        assert_eq!(r.iter().map(|t| t.action).collect::<Vec<_>>(), [1, 2]);
        for a in 3..=7 {
            r.push(t(a));
            assert!(r.len() <= 3);
        }
        assert_eq!((r.len(), r.capacity()), (3, 3));
        assert_eq!(r.iter().map(|t| t.action).collect::<Vec<_>>(), [5, 6, 7]);
    }

    #[test]
    fn sampling_is_uniform_over_all_entries_and_seeded() {
        let mut r = Replay::new(10, 7);
        for a in 0..15 {
            r.push(t(a));
        }
        let mut counts = [0usize; 15];
        for s in r.sample(20_000) {
            counts[s.action as usize] += 1;
        }
        assert!(counts[..5].iter().all(|&c| c == 0), "{counts:?}");
        for &c in &counts[5..] {
            assert!((1_700..2_300).contains(&c), "{counts:?}");
        }
        let mut again = Replay::new(10, 7);
        for a in 0..15 {
            again.push(t(a));
        }
        let first: Vec<u32> = r.sample(50).iter().map(|t| t.action).collect();
        let _ = again.sample(20_000);
        let second: Vec<u32> = again.sample(50).iter().map(|t| t.action).collect();
        assert_eq!(first, second);
        assert!(Replay::new(4, 1).sample(3).is_empty());
    }

    #[test]
    fn bytes_at_the_cap_of_100k_transitions() {
        let cap = 100_000;
        let mut r = Replay::new(cap, 1);
        let empty = r.bytes();
        for a in 0..cap as u32 + 10 {
            let mut x = t(a);
            x.next_state = Some(x.state.clone());
            x.next_candidates = (1..=20).collect();
            r.push(x);
        }
        let per = size_of::<Transition>() + 3 * 20 * size_of::<u32>();
        assert_eq!(r.bytes(), empty + cap * (per - size_of::<Transition>()));
        assert_eq!(empty, size_of::<Replay>() + cap * size_of::<Transition>());
        println!(
            "replay at cap {cap}: {} bytes ({:.1} MiB; {} per transition, {} of them inline) \
             with 20-item histories in s and s' and 20 next candidates",
            r.bytes(),
            r.bytes() as f64 / (1 << 20) as f64,
            per,
            size_of::<Transition>()
        );
    }
}

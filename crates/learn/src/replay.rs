//! The replay buffer: the last `capacity` transitions in a ring, sampled uniformly.
//!
//! Replaying old transitions next to new ones breaks the correlation of consecutive
//! feedback (one user's session arrives in a burst) that would otherwise make the
//! Q-network chase whatever it saw last.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use onrec_model::context::ContextIds;
use onrec_model::rng::SplitMix64;

use crate::LearnError;
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

    /// Approximate heap bytes owned by this transition (vector capacities; a user vector
    /// the next state shares with the state counts once).
    fn heap_bytes(&self) -> usize {
        let u = size_of::<u32>();
        let user = |s: &State| s.user.as_ref().map_or(0, |v| v.len() * size_of::<f32>());
        let next = self.next_state.as_ref().map_or(0, |s| {
            let shared = match (&s.user, &self.state.user) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            s.history.capacity() * u + if shared { 0 } else { user(s) }
        });
        self.state.history.capacity() * u
            + user(&self.state)
            + next
            + self.next_candidates.capacity() * u
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

    /// The held transitions, oldest first, as named tensors for a checkpoint. User
    /// vectors shared between transitions (a next state keeps its state's) are saved once.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>, LearnError> {
        let mut enc = Encoder::default();
        for t in self.iter() {
            enc.state("state", &t.state);
            enc.u32s("action", [t.action]);
            enc.f32s.entry("reward").or_default().push(t.reward);
            let next = t.next_state.as_ref();
            enc.u32s("next.present", [u32::from(next.is_some())]);
            enc.state("next", next.unwrap_or(&t.state));
            enc.list("next.candidates", &t.next_candidates);
        }
        enc.finish()
    }

    /// A buffer of `capacity` transitions (at least 1) sampling from `seed`, holding the
    /// newest of the transitions [`Replay::tensors`] saved, with every item index passed
    /// through `item` (0: the item is gone). A gone item in a history stays as unknown (0);
    /// gone next candidates drop out; a transition whose action is gone is skipped.
    pub fn from_tensors(
        saved: &HashMap<String, Tensor>,
        capacity: usize,
        seed: u64,
        item: &dyn Fn(u32) -> u32,
    ) -> Result<Self, LearnError> {
        let dec = Decoder::new(saved)?;
        let mut replay = Self::new(capacity, seed);
        let n = dec.count("action")?;
        let mut cursor = Cursor::default();
        for i in 0..n {
            let state = dec.state("state", i, &mut cursor.state, item)?;
            let next = dec.state("next", i, &mut cursor.next, item)?;
            let candidates = dec.list("next.candidates", i, &mut cursor.candidates)?;
            let action = item(dec.u32_at("action", i)?);
            if action == 0 {
                continue;
            }
            replay.push(Transition {
                state,
                action,
                reward: dec.f32_at("reward", i)?,
                next_state: (dec.u32_at("next.present", i)? == 1).then_some(next),
                next_candidates: candidates
                    .iter()
                    .map(|&c| item(c))
                    .filter(|&c| c != 0)
                    .collect(),
            });
        }
        Ok(replay)
    }
}

/// The columns of saved transitions, built one transition at a time.
#[derive(Default)]
struct Encoder {
    u32s: HashMap<String, Vec<u32>>,
    f32s: HashMap<&'static str, Vec<f32>>,
    users: HashMap<usize, u32>,
    user_values: Vec<f32>,
    user_dim: usize,
}

/// A user-vector column's value for "no vector".
const NO_USER: u32 = u32::MAX;

impl Encoder {
    fn u32s(&mut self, name: &str, values: impl IntoIterator<Item = u32>) {
        self.u32s.entry(name.to_owned()).or_default().extend(values);
    }

    /// A variable-length list: its length in `NAME.len`, its items appended to `NAME`.
    fn list(&mut self, name: &str, items: &[u32]) {
        self.u32s(&format!("{name}.len"), [items.len() as u32]);
        self.u32s(name, items.iter().copied());
    }

    fn state(&mut self, prefix: &str, s: &State) {
        self.list(&format!("{prefix}.history"), &s.history);
        self.u32s(
            &format!("{prefix}.context"),
            [u32::from(s.context.hour), u32::from(s.context.device)],
        );
        let user = s.user.as_ref().map_or(NO_USER, |u| {
            let key = Arc::as_ptr(u).cast::<f32>() as usize;
            let next = self.users.len() as u32;
            *self.users.entry(key).or_insert_with(|| {
                self.user_dim = u.len();
                self.user_values.extend_from_slice(u);
                next
            })
        });
        self.u32s(&format!("{prefix}.user"), [user]);
    }

    fn finish(self) -> Result<HashMap<String, Tensor>, LearnError> {
        let device = Device::Cpu;
        let mut out = HashMap::new();
        // One trailing zero keeps every column non-empty.
        for (name, mut values) in self.u32s {
            values.push(0);
            let len = values.len();
            out.insert(name, Tensor::from_vec(values, len, &device)?);
        }
        for (name, mut values) in self.f32s {
            values.push(0.0);
            let len = values.len();
            out.insert(name.to_owned(), Tensor::from_vec(values, len, &device)?);
        }
        if !self.users.is_empty() {
            let rows = self.users.len();
            out.insert(
                "users".to_owned(),
                Tensor::from_vec(self.user_values, (rows, self.user_dim), &device)?,
            );
        }
        Ok(out)
    }
}

/// Where the variable-length columns have been read up to.
#[derive(Default)]
struct Cursor {
    state: usize,
    next: usize,
    candidates: usize,
}

/// Saved transition columns, read back.
struct Decoder {
    u32s: HashMap<String, Vec<u32>>,
    f32s: HashMap<String, Vec<f32>>,
    users: Vec<Arc<[f32]>>,
}

fn missing(name: &str) -> LearnError {
    LearnError::Checkpoint(format!(
        "the saved replay buffer lacks or cuts short {name}"
    ))
}

impl Decoder {
    fn new(saved: &HashMap<String, Tensor>) -> Result<Self, LearnError> {
        let mut dec = Self {
            u32s: HashMap::new(),
            f32s: HashMap::new(),
            users: Vec::new(),
        };
        for (name, t) in saved {
            match (name.as_str(), t.dtype()) {
                ("users", DType::F32) => {
                    dec.users = t.to_vec2::<f32>()?.into_iter().map(Arc::from).collect();
                }
                (_, DType::U32) => {
                    dec.u32s.insert(name.clone(), t.to_vec1::<u32>()?);
                }
                (_, DType::F32) => {
                    dec.f32s.insert(name.clone(), t.to_vec1::<f32>()?);
                }
                (_, other) => {
                    return Err(LearnError::Checkpoint(format!(
                        "the saved replay buffer's {name} is {other:?}"
                    )));
                }
            }
        }
        Ok(dec)
    }

    fn count(&self, name: &str) -> Result<usize, LearnError> {
        let column = self.u32s.get(name).ok_or_else(|| missing(name))?;
        Ok(column.len().saturating_sub(1))
    }

    fn u32_at(&self, name: &str, i: usize) -> Result<u32, LearnError> {
        self.u32s
            .get(name)
            .and_then(|c| c.get(i))
            .copied()
            .ok_or_else(|| missing(name))
    }

    fn f32_at(&self, name: &str, i: usize) -> Result<f32, LearnError> {
        self.f32s
            .get(name)
            .and_then(|c| c.get(i))
            .copied()
            .ok_or_else(|| missing(name))
    }

    fn list(&self, name: &str, i: usize, at: &mut usize) -> Result<Vec<u32>, LearnError> {
        let len = self.u32_at(&format!("{name}.len"), i)? as usize;
        let items = self
            .u32s
            .get(name)
            .and_then(|c| c.get(*at..*at + len))
            .ok_or_else(|| missing(name))?;
        *at += len;
        Ok(items.to_vec())
    }

    fn state(
        &self,
        prefix: &str,
        i: usize,
        at: &mut usize,
        item: &dyn Fn(u32) -> u32,
    ) -> Result<State, LearnError> {
        let history = self.list(&format!("{prefix}.history"), i, at)?;
        let context = format!("{prefix}.context");
        let user = self.u32_at(&format!("{prefix}.user"), i)?;
        Ok(State {
            history: history.into_iter().map(item).collect(),
            context: ContextIds {
                hour: u8::try_from(self.u32_at(&context, 2 * i)?).map_err(|_| missing(&context))?,
                device: u8::try_from(self.u32_at(&context, 2 * i + 1)?)
                    .map_err(|_| missing(&context))?,
            },
            user: match user {
                NO_USER => None,
                u => Some(
                    self.users
                        .get(u as usize)
                        .cloned()
                        .ok_or_else(|| missing("users"))?,
                ),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(action: u32) -> Transition {
        Transition {
            state: State {
                history: vec![1; 20],
                context: ContextIds { hour: 1, device: 1 },
                user: None,
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
    fn a_saved_buffer_comes_back_with_items_renumbered() {
        let u: Arc<[f32]> = Arc::from([0.5f32, -1.0].as_slice());
        let state = State {
            history: vec![1, 2, 3],
            context: ContextIds { hour: 9, device: 2 },
            user: Some(u.clone()),
        };
        let mut r = Replay::new(4, 1);
        for a in 1..=5 {
            r.push(Transition {
                state: state.clone(),
                action: a,
                reward: a as f32 / 2.0,
                next_state: (a % 2 == 1).then(|| State {
                    history: vec![1, 2, 3, a],
                    ..state.clone()
                }),
                next_candidates: if a % 2 == 1 { vec![1, 2, 4] } else { vec![] },
            });
        }
        let saved = r.tensors().unwrap();
        assert_eq!(saved["users"].dims(), [1, 2]);
        let same = Replay::from_tensors(&saved, 4, 1, &|i| i).unwrap();
        assert_eq!(
            same.iter().collect::<Vec<_>>(),
            r.iter().collect::<Vec<_>>()
        );
        // Item 2 is gone and the others moved up by 10; the newest 2 are kept.
        let moved =
            Replay::from_tensors(&saved, 2, 1, &|i| if i == 2 { 0 } else { i + 10 }).unwrap();
        let got: Vec<&Transition> = moved.iter().collect();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].action, got[1].action), (14, 15));
        assert_eq!(got[1].state.history, [11, 0, 13]);
        assert_eq!(got[1].next_candidates, [11, 14]);
        assert_eq!(got[1].next_state.as_ref().unwrap().history, [11, 0, 13, 15]);
        assert_eq!(got[1].state.user.as_deref(), Some(&[0.5f32, -1.0][..]));
        assert!(got[0].next_state.is_none());
        let mut cut = saved.clone();
        cut.insert(
            "state.history".into(),
            Tensor::from_vec(vec![1u32, 2], 2, &Device::Cpu).unwrap(),
        );
        let e = Replay::from_tensors(&cut, 4, 1, &|i| i).unwrap_err();
        assert!(e.to_string().contains("state.history"), "{e}");
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

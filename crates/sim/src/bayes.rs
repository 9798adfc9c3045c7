//! The learning oracle (`oracle_learning`): what a policy that knew the whole shop could
//! make of what it sees of each user.
//!
//! It knows every item's appeal and funnel, each moment's shift of each category, the
//! position bias and what a purchase does to the buyer: all of the world's truth except
//! who the user is. Each user's category tastes it learns from their own responses to the
//! slates it served them, by Bayes' rule: per category, the exact posterior of the taste
//! on a grid, from the world's own prior (normal, spread `taste_sd`) and the likelihood of
//! every served slot (examined with the slot's probability, then clicked or not). It
//! serves the slate of the largest expected reward under that posterior. It does not
//! learn the users' latent affinity for single items (a small part of the oracle's lead),
//! and it does not explore on purpose beyond what the posterior's spread gives.
//!
//! Its CTR and preferred-category share say how much of the oracle's personal lead can be
//! learned from a user's own clicks in a run of this length: a policy that also has to
//! learn the items and the moments gets less.

use std::collections::HashMap;

use onrec_engine::EventType;

use crate::world::{Moment, Response, Rewards, World, top_by_value};

/// Grid points of each category's taste posterior, evenly over ±[`GRID_SPREADS`] prior
/// spreads.
const GRID: usize = 49;

/// How many prior spreads the grid covers on each side of 0.
const GRID_SPREADS: f64 = 4.0;

/// The learning oracle of one run (see the module documentation).
#[derive(Debug)]
pub struct LearningOracle<'w> {
    world: &'w World,
    /// Expected reward of a click, per item.
    click_value: Vec<f64>,
    /// Position bias per slot.
    examine: Vec<f64>,
    /// The taste values of the grid, the same for every category.
    grid: Vec<f64>,
    /// The log prior density at each grid point.
    log_prior: Vec<f64>,
    /// Per user, the log-likelihood of everything they did with the served slots, per
    /// category and grid point (category-major).
    users: HashMap<usize, Vec<f64>>,
    scratch: Vec<(f64, u32)>,
}

impl<'w> LearningOracle<'w> {
    /// The learning oracle of `world` for slates of up to `n` slots under `rewards`.
    pub fn new(world: &'w World, rewards: Rewards, n: usize) -> Self {
        let sd = world.config().taste_sd.max(1e-6);
        let step = 2.0 * GRID_SPREADS * sd / (GRID - 1) as f64;
        let grid: Vec<f64> = (0..GRID)
            .map(|g| -GRID_SPREADS * sd + step * g as f64)
            .collect();
        let log_prior = grid.iter().map(|t| -0.5 * (t / sd).powi(2)).collect();
        Self {
            click_value: world.click_values(&rewards),
            examine: world.examination(n),
            world,
            grid,
            log_prior,
            users: HashMap::new(),
            scratch: Vec::with_capacity(world.num_items()),
        }
    }

    /// User `u`'s posterior over each category's taste: weights on the grid that sum to 1
    /// per category (category-major).
    fn posterior(&self, u: usize) -> Vec<f64> {
        let categories = self.world.config().categories;
        let mut weights = vec![0.0; categories * GRID];
        for (c, w) in weights.chunks_exact_mut(GRID).enumerate() {
            let ll = self.users.get(&u).map(|l| &l[c * GRID..(c + 1) * GRID]);
            for (g, w) in w.iter_mut().enumerate() {
                *w = self.log_prior[g] + ll.map_or(0.0, |l| l[g]);
            }
            let top = w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            w.iter_mut().for_each(|x| *x = (*x - top).exp());
            let total: f64 = w.iter().sum();
            w.iter_mut().for_each(|x| *x /= total);
        }
        weights
    }

    /// The slate of up to `n` slots with the largest expected reward for user `u` in
    /// `moment` under their posterior, `owned` being what they bought so far.
    pub fn best(&mut self, u: usize, moment: Moment, owned: &[u32], n: usize) -> Vec<u32> {
        let world = self.world;
        let weights = self.posterior(u);
        self.scratch.clear();
        for i in 0..world.num_items() as u32 {
            let c = world.category_index(i);
            let base = world.logit_without_user(i, moment);
            let bought = owned.contains(&i);
            let attraction: f64 = weights[c * GRID..(c + 1) * GRID]
                .iter()
                .zip(&self.grid)
                .map(|(w, t)| w * world.attraction_of(base + t, bought))
                .sum();
            self.scratch
                .push((attraction * self.click_value[i as usize], i));
        }
        top_by_value(&mut self.scratch, n.min(self.examine.len()))
            .iter()
            .map(|v| v.1)
            .collect()
    }

    /// Learns from user `u`'s `response` to `slate` in `moment`, `owned` being what they
    /// had bought before it.
    pub fn observe(
        &mut self,
        u: usize,
        moment: Moment,
        slate: &[u32],
        owned: &[u32],
        response: &Response,
    ) {
        let world = self.world;
        let categories = world.config().categories;
        let ll = self
            .users
            .entry(u)
            .or_insert_with(|| vec![0.0; categories * GRID]);
        for (slot, (&i, e)) in slate.iter().zip(&self.examine).enumerate() {
            let clicked = response
                .actions
                .iter()
                .any(|a| a.slot == slot && a.kind == EventType::Click);
            let c = world.category_index(i);
            let base = world.logit_without_user(i, moment);
            let bought = owned.contains(&i);
            for (l, t) in ll[c * GRID..(c + 1) * GRID].iter_mut().zip(&self.grid) {
                let p = (e * world.attraction_of(base + t, bought)).clamp(1e-12, 1.0 - 1e-12);
                *l += if clicked { p.ln() } else { (1.0 - p).ln() };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{Action, WorldConfig};

    #[test]
    fn clicks_in_a_category_move_the_slates_towards_it_and_passing_over_moves_them_away() {
        let world = World::new(WorldConfig {
            users: 10,
            items: 60,
            categories: 3,
            ..WorldConfig::fresh_shop(4)
        })
        .unwrap();
        let rewards = Rewards {
            click: 1.0,
            add_to_cart: 0.0,
            purchase: 0.0,
        };
        let mut oracle = LearningOracle::new(&world, rewards, 5);
        let moment = Moment { device: 0, hour: 9 };
        let in_category = |c: usize, slate: &[u32]| {
            slate
                .iter()
                .filter(|&&i| world.category_index(i) == c)
                .count()
        };
        let mean_taste = |oracle: &LearningOracle<'_>, u: usize, c: usize| -> f64 {
            let weights = oracle.posterior(u);
            weights[c * GRID..(c + 1) * GRID]
                .iter()
                .zip(&oracle.grid)
                .map(|(w, t)| w * t)
                .sum()
        };
        let first = oracle.best(0, moment, &[], 5);
        assert_eq!(first.len(), 5);
        // Before any response every user gets the same slate.
        assert_eq!(oracle.best(1, moment, &[], 5), first);
        // User 0 clicks every item of category 2 they are shown, in slate after slate of
        // that category's items.
        let of_two: Vec<u32> = (0..60u32)
            .filter(|&i| world.category_index(i) == 2)
            .take(5)
            .collect();
        for _ in 0..4 {
            let clicks = Response {
                actions: (0..5)
                    .map(|slot| Action {
                        slot,
                        item: of_two[slot],
                        kind: EventType::Click,
                    })
                    .collect(),
                clicks: 5,
                reward: 5.0,
            };
            oracle.observe(0, moment, &of_two, &[], &clicks);
        }
        assert!(mean_taste(&oracle, 0, 2) > 1.0);
        assert_eq!(in_category(2, &oracle.best(0, moment, &[], 5)), 5);
        // User 1 passes over 400 slates of category 2.
        for _ in 0..400 {
            oracle.observe(1, moment, &of_two, &[], &Response::default());
        }
        assert!(mean_taste(&oracle, 1, 2) < -1.0);
        assert_eq!(in_category(2, &oracle.best(1, moment, &[], 5)), 0);
        // Nobody else learned anything.
        assert!(mean_taste(&oracle, 2, 2).abs() < 1e-9);
        assert!(mean_taste(&oracle, 0, 1).abs() < 1e-9);
        assert_eq!(oracle.best(2, moment, &[], 5), first);
    }
}

//! A user's taste for each category, from what they were shown as well as what they
//! clicked: the one place where passing items over counts as evidence.
//!
//! Every category c has a click rate p_c over all users (clicks per shown slot, shrunk
//! toward the overall rate). A user shown n slots of c who clicked k distinct items of it
//! has the posterior rate (k + a·p_c) / (n + a), a Gamma–Poisson estimate with a prior of
//! a = [`PRIOR_IMPRESSIONS`] impressions at p_c. Their taste for c is the log of its ratio
//! to p_c, times `category_taste`: 0 with no evidence, below 0 for a category they keep
//! passing over, above 0 for one they click more than others do. It is added to the
//! encoder's scores (log-odds of the choice, on the same scale) before its top items are
//! taken, so it moves which items are retrieved, not only their order.

use parking_lot::Mutex;

use crate::catalog::Catalog;
use crate::users::UserState;

/// Strength of the prior of every rate, in impressions.
pub const PRIOR_IMPRESSIONS: f64 = 20.0;

/// Shown slots and clicks by category group, over all users of this process.
#[derive(Debug, Default)]
pub(crate) struct CategoryRates {
    /// [shown, clicked] by group.
    counts: Mutex<Vec<[f64; 2]>>,
    /// [shown, clicked] by group, of items shown to users who bought them.
    bought: Mutex<Vec<[f64; 2]>>,
}

/// Adds `items` to `counts` as shown (`clicked` false) or clicked.
fn add(counts: &Mutex<Vec<[f64; 2]>>, catalog: &Catalog, items: &[u32], clicked: bool) {
    let mut counts = counts.lock();
    let len = catalog.num_groups().max(counts.len());
    counts.resize(len, [0.0; 2]);
    for &i in items {
        counts[catalog.group(i) as usize][usize::from(clicked)] += 1.0;
    }
}

impl CategoryRates {
    /// Counts the catalog items `items` as shown (`clicked` false) or clicked.
    pub(crate) fn count(&self, catalog: &Catalog, items: &[u32], clicked: bool) {
        add(&self.counts, catalog, items, clicked);
    }

    /// Counts items shown to (`clicked` false) or clicked by a user who bought them.
    pub(crate) fn count_bought(&self, catalog: &Catalog, items: &[u32], clicked: bool) {
        add(&self.bought, catalog, items, clicked);
    }

    /// For every category group, whether its items are hidden from those who bought
    /// them in this request: whether buyers click a bought item of the group less often
    /// than the group's items are clicked at all, by a draw from the posterior of that
    /// rate (Thompson sampling), so a group is shown to buyers as often as it may still
    /// be worth it and hidden once it is clearly not. The rate of a group's bought items
    /// has a Beta prior of [`PRIOR_IMPRESSIONS`] impressions at the group's rate times
    /// the ratio of all bought items' clicks to what their groups' rates predict.
    pub(crate) fn hidden_bought(&self, catalog: &Catalog, rng: &mut impl rand::Rng) -> Vec<bool> {
        let counts = self.counts.lock().clone();
        let bought = self.bought.lock().clone();
        let [shown, clicks] = counts
            .iter()
            .fold([0.0, 0.0], |a, c| [a[0] + c[0], a[1] + c[1]]);
        let overall = (clicks + 1.0) / (shown + PRIOR_IMPRESSIONS);
        let group_rate = |g: usize| {
            let [gn, gk] = counts.get(g).copied().unwrap_or_default();
            (gk + PRIOR_IMPRESSIONS * overall) / (gn + PRIOR_IMPRESSIONS)
        };
        // All bought items against what their groups' rates predict.
        let (mut expected, mut clicked) = (0.0, 0.0);
        for (g, &[n, k]) in bought.iter().enumerate() {
            expected += n * group_rate(g);
            clicked += k;
        }
        let prior = PRIOR_IMPRESSIONS * overall;
        let ratio = (clicked + prior) / (expected + prior);
        (0..catalog.num_groups())
            .map(|g| {
                let p = group_rate(g);
                let [n, k] = bought.get(g).copied().unwrap_or_default();
                let mean = (p * ratio).clamp(1e-6, 1.0 - 1e-6);
                let a = k + PRIOR_IMPRESSIONS * mean;
                let b = (n - k).max(0.0) + PRIOR_IMPRESSIONS * (1.0 - mean);
                rand_distr::Beta::new(a, b)
                    .map(|beta| rand_distr::Distribution::sample(&beta, rng) < p)
                    .unwrap_or(false)
            })
            .collect()
    }

    /// The user's taste for every category group, times `weight`; `None` when the weight
    /// is 0.
    pub(crate) fn taste(
        &self,
        user: &UserState,
        catalog: &Catalog,
        weight: f64,
    ) -> Option<Vec<f32>> {
        if weight == 0.0 {
            return None;
        }
        let mut user_counts = vec![[0f64; 2]; catalog.num_groups()];
        for &i in &user.shown {
            user_counts[catalog.group(i) as usize][0] += 1.0;
        }
        // A clicked item was shown too, and leaves the shown slots when clicked.
        let mut clicked: Vec<u32> = user.history.iter().copied().collect();
        clicked.sort_unstable();
        clicked.dedup();
        for &i in &clicked {
            let c = &mut user_counts[catalog.group(i) as usize];
            c[0] += 1.0;
            c[1] += 1.0;
        }
        let counts = self.counts.lock();
        let [shown, clicks] = counts
            .iter()
            .fold([0.0, 0.0], |a, c| [a[0] + c[0], a[1] + c[1]]);
        // The overall rate, from one click in a prior's worth of impressions.
        let overall = (clicks + 1.0) / (shown + PRIOR_IMPRESSIONS);
        Some(
            user_counts
                .iter()
                .enumerate()
                .map(|(g, &[n, k])| {
                    let [gn, gk] = counts.get(g).copied().unwrap_or_default();
                    let p = (gk + PRIOR_IMPRESSIONS * overall) / (gn + PRIOR_IMPRESSIONS);
                    let rate = (k + PRIOR_IMPRESSIONS * p) / (n + PRIOR_IMPRESSIONS);
                    (weight * (rate / p).ln()) as f32
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Item;

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        for i in 0..30 {
            c.upsert(Item::new(format!("i{i}"), ["a", "b", "c"][i % 3]));
        }
        c
    }

    #[test]
    fn bought_items_come_back_where_buyers_click_them_and_stay_hidden_where_they_do_not() {
        use rand::SeedableRng;
        let catalog = catalog();
        let rates = CategoryRates::default();
        // Every category: 1,000 slots shown, 20 clicked (2%).
        for g in 0..3u32 {
            let items: Vec<u32> = (0..1000).map(|k| g + 3 * (k % 10)).collect();
            rates.count(&catalog, &items, false);
            rates.count(&catalog, &items[..20], true);
        }
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let hidden_share = |rates: &CategoryRates, rng: &mut rand::rngs::SmallRng| {
            let mut hidden = [0u32; 3];
            for _ in 0..1000 {
                for (g, h) in rates.hidden_bought(&catalog, rng).into_iter().enumerate() {
                    hidden[g] += u32::from(h);
                }
            }
            hidden.map(|h| f64::from(h) / 1000.0)
        };
        // Without evidence, hidden in most requests (a rate prior is skewed: its median is
        // under its mean) and shown in the rest, so evidence comes.
        for share in hidden_share(&rates, &mut rng) {
            assert!((0.5..0.9).contains(&share), "{share}");
        }
        // Buyers click what they bought in category a 15 times in 100, and never in 300
        // slots of c.
        let a: Vec<u32> = (0..100).map(|k| 3 * (k % 10)).collect();
        let c: Vec<u32> = (0..300).map(|k| 2 + 3 * (k % 10)).collect();
        rates.count_bought(&catalog, &a, false);
        rates.count_bought(&catalog, &a[..15], true);
        rates.count_bought(&catalog, &c, false);
        let [a, b, c] = hidden_share(&rates, &mut rng);
        assert!(a < 0.01, "a buyer's favourite stays: {a}");
        assert!(c > 0.9, "what buyers pass over is hidden: {c}");
        assert!(
            (0.02..0.98).contains(&b),
            "b, unseen, keeps being tried: {b}"
        );
    }

    #[test]
    fn passing_a_category_over_lowers_it_and_clicking_one_raises_it() {
        let catalog = catalog();
        let rates = CategoryRates::default();
        // Everyone clicks one in 20 of every category.
        let all: Vec<u32> = (0..30).collect();
        for _ in 0..20 {
            rates.count(&catalog, &all, false);
        }
        rates.count(&catalog, &all, true);
        let mut user = UserState::default();
        // Shown six items of "a" (indices 0, 3, …) and clicked none; clicked two of "b".
        user.saw([0, 3, 6, 9, 12, 15, 1, 4]);
        user.apply(crate::EventType::Click, 1, 50);
        user.apply(crate::EventType::Click, 4, 50);
        let taste = rates.taste(&user, &catalog, 1.0).unwrap();
        assert_eq!(taste.len(), 3);
        assert!(taste[0] < 0.0, "a was passed over: {taste:?}");
        assert!(
            taste[1] > 0.5,
            "b was clicked twice in two showings: {taste:?}"
        );
        assert!(taste[2].abs() < 1e-6, "nothing is known of c: {taste:?}");
        let half = rates.taste(&user, &catalog, 0.5).unwrap();
        assert!((half[1] - taste[1] / 2.0).abs() < 1e-6);
        assert_eq!(rates.taste(&user, &catalog, 0.0), None);
    }

    #[test]
    fn a_user_with_no_evidence_has_no_taste() {
        let catalog = catalog();
        let rates = CategoryRates::default();
        let taste = rates.taste(&UserState::default(), &catalog, 1.0).unwrap();
        assert!(taste.iter().all(|t| t.abs() < 1e-6), "{taste:?}");
    }
}

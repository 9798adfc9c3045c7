//! The synthetic shop whose truth is known: items, users, the moments they shop in, and
//! how they respond to a slate, all drawn from one seed.
//!
//! A user u examines slot k of a slate with probability e(k) = 1/(k + 1)^η (position
//! bias) and, having examined item i in moment m (device, hour of day), clicks it with
//! probability α(u, i, m) = σ(b + aᵢ + t_u[cᵢ] + λ·⟨w_u, vᵢ⟩ + d[m.device][cᵢ] + h[m.band][cᵢ]):
//! a base rate, the item's appeal to everyone, the user's taste for its category and for
//! the item itself (latent vectors, items near their category's centroid), and the
//! moment's shift of the category (mobile favours some categories, evenings others).
//! Slots are independent (the position-based click model). After a click the user puts
//! the item in the cart with probability pᵢ and then buys it with probability qᵢ, both
//! per item. The catalog's prior popularity is the appeal seen through noise, as a sales
//! history would show it (a fresh shop's catalog has none). Tastes and appeal never drift;
//! what a purchase does to the next visit depends on the kind of goods ([`Repeats`]):
//! nothing, consumables that are bought again, or durable goods that are bought once.

use std::collections::HashMap;

use onrec_engine::{Context, EngineConfig, EventType, Item};
use onrec_model::data::Interaction;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use crate::SimError;

/// Device classes of the traffic with their shares of requests.
pub const DEVICES: [(&str, f64); 3] = [("mobile", 0.55), ("desktop", 0.35), ("tablet", 0.10)];

/// Hour-of-day bands: name, first and last hour, share of requests.
pub const HOUR_BANDS: [(&str, u32, u32, f64); 4] = [
    ("night", 0, 5, 0.08),
    ("morning", 6, 11, 0.25),
    ("afternoon", 12, 17, 0.30),
    ("evening", 18, 23, 0.37),
];

/// Independent random streams derived from the one seed, so that drawing more of one
/// (a longer run, another policy's outcomes) never shifts another.
const STREAM_WORLD: u64 = 0x0057_0e1d;
const STREAM_TRAFFIC: u64 = 0x7aff_1c00;
const STREAM_OUTCOMES: u64 = 0x00c1_1c45;

/// Uniform draws per slot per round: examine, click, add to cart, purchase.
const DRAWS_PER_SLOT: usize = 4;

/// What buying an item does to the buyer's later interest in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Repeats {
    /// Nothing: interest stays as it was.
    Indifferent,
    /// Consumables: a buyer is drawn back to what they bought (its click logit rises by
    /// [`REPEAT_BOOST`]).
    Consumable,
    /// Durable goods: a buyer hardly looks at what they own (its click probability falls
    /// to [`OWNED_SHARE`] of what it was).
    Durable,
}

impl std::str::FromStr for Repeats {
    type Err = SimError;

    fn from_str(s: &str) -> Result<Self, SimError> {
        match s {
            "indifferent" => Ok(Self::Indifferent),
            "consumable" => Ok(Self::Consumable),
            "durable" => Ok(Self::Durable),
            other => Err(SimError::config(
                "repeats",
                format!("unknown kind '{other}' (expected indifferent, consumable or durable)"),
            )),
        }
    }
}

/// The terms of a click logit past the base rate b: what a served item owes its click
/// probability to (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LogitTerms {
    /// The item's appeal to everyone, aᵢ.
    pub appeal: f64,
    /// The user's taste for the item's category, t_u[cᵢ].
    pub taste: f64,
    /// The user's latent affinity for the item, λ·⟨w_u, vᵢ⟩.
    pub affinity: f64,
    /// The moment's shift of the item's category, d[device][cᵢ] + h[band][cᵢ].
    pub context: f64,
}

impl LogitTerms {
    /// The terms added up.
    pub fn sum(&self) -> f64 {
        self.appeal + self.taste + self.affinity + self.context
    }

    /// Each term plus `other`'s.
    pub fn add(&mut self, other: &Self) {
        self.appeal += other.appeal;
        self.taste += other.taste;
        self.affinity += other.affinity;
        self.context += other.context;
    }

    /// Each term times `factor`.
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            appeal: self.appeal * factor,
            taste: self.taste * factor,
            affinity: self.affinity * factor,
            context: self.context * factor,
        }
    }
}

/// How much a consumable's click logit rises for one who bought it.
pub const REPEAT_BOOST: f64 = 1.5;
/// The share of its click probability an owned durable item keeps.
pub const OWNED_SHARE: f64 = 0.05;

/// The shape of a world; every value has a default that gives CTRs of a few per cent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorldConfig {
    /// Seed of everything random in the world, its traffic and its users' responses.
    pub seed: u64,
    /// Users.
    pub users: usize,
    /// Items.
    pub items: usize,
    /// Item categories.
    pub categories: usize,
    /// Width of the latent user and item vectors.
    pub latent_dim: usize,
    /// Base click logit b.
    pub base_logit: f64,
    /// Spread (sd) of the items' appeal aᵢ.
    pub appeal_sd: f64,
    /// Spread (sd) of the users' category tastes.
    pub taste_sd: f64,
    /// Weight λ of the latent user–item affinity.
    pub latent_weight: f64,
    /// Spread (sd) of the device and hour-band shifts per category.
    pub context_sd: f64,
    /// Exponent η of the position bias e(k) = 1/(k + 1)^η.
    pub position_decay: f64,
    /// Spread (sd) of the noise between an item's appeal and its prior popularity.
    pub prior_noise_sd: f64,
    /// Spread (sd) of the log activity of users: some shop far more often than others.
    pub activity_sd: f64,
    /// Whether the catalog carries prior popularity (a sales history); a fresh shop's
    /// does not.
    pub priors: bool,
    /// What a purchase does to the buyer's later interest in the item.
    pub repeats: Repeats,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            users: 2000,
            items: 1000,
            categories: 20,
            latent_dim: 8,
            base_logit: -3.5,
            appeal_sd: 0.8,
            taste_sd: 0.8,
            latent_weight: 0.4,
            context_sd: 0.5,
            position_decay: 0.8,
            prior_noise_sd: 1.0,
            activity_sd: 0.8,
            priors: true,
            repeats: Repeats::Indifferent,
        }
    }
}

impl WorldConfig {
    /// A fresh shop: a few hundred products in 8 categories, thousands of users with
    /// strong category tastes, no sales history in the catalog.
    pub fn fresh_shop(seed: u64) -> Self {
        Self {
            seed,
            users: 3000,
            items: 400,
            categories: 8,
            base_logit: -5.0,
            taste_sd: 1.6,
            priors: false,
            ..Self::default()
        }
    }
}

impl WorldConfig {
    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<(), SimError> {
        for (field, value) in [
            ("users", self.users),
            ("items", self.items),
            ("categories", self.categories),
            ("latent_dim", self.latent_dim),
        ] {
            if value == 0 {
                return Err(SimError::config(field, "must be at least 1"));
            }
        }
        if self.categories > self.items {
            return Err(SimError::config(
                "categories",
                format!(
                    "is {}; there must be at least one item per category ({} items)",
                    self.categories, self.items
                ),
            ));
        }
        if self.items > 10_000_000 {
            return Err(SimError::config("items", "at most 10000000 are supported"));
        }
        for (field, value) in [
            ("base_logit", self.base_logit),
            ("appeal_sd", self.appeal_sd),
            ("taste_sd", self.taste_sd),
            ("latent_weight", self.latent_weight),
            ("context_sd", self.context_sd),
            ("position_decay", self.position_decay),
            ("prior_noise_sd", self.prior_noise_sd),
            ("activity_sd", self.activity_sd),
        ] {
            if !value.is_finite() {
                return Err(SimError::config(
                    field,
                    format!("is {value}; must be finite"),
                ));
            }
            if field != "base_logit" && value < 0.0 {
                return Err(SimError::config(field, format!("is {value}; must be >= 0")));
            }
        }
        Ok(())
    }
}

/// The moment of a request: device class and local hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Moment {
    /// Index into [`DEVICES`].
    pub device: usize,
    /// Local hour, 0..=23.
    pub hour: u32,
}

impl Moment {
    /// Index into [`HOUR_BANDS`].
    pub fn band(&self) -> usize {
        HOUR_BANDS
            .iter()
            .position(|&(_, from, to, _)| (from..=to).contains(&self.hour))
            .unwrap_or(0)
    }

    /// The request context the engine sees.
    pub fn context(&self) -> Context {
        Context {
            device: Some(DEVICES[self.device].0.to_owned()),
            hour: Some(self.hour),
            ..Context::default()
        }
    }
}

/// One event of a user's response: what they did with the item in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    /// The slot, from 0.
    pub slot: usize,
    /// The item (world index).
    pub item: u32,
    /// Click, add to cart or purchase.
    pub kind: EventType,
}

/// A user's response to a slate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Response {
    /// Events in the order they happen (per slot: click, then cart, then purchase).
    pub actions: Vec<Action>,
    /// Clicks among them.
    pub clicks: u64,
    /// The reward they earn under the engine's reward settings.
    pub reward: f64,
}

/// The reward of each funnel step, as the engine computes it: the click r, later steps γ·r.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rewards {
    /// Reward of a click.
    pub click: f64,
    /// Reward of an add-to-cart (discounted).
    pub add_to_cart: f64,
    /// Reward of a purchase (discounted).
    pub purchase: f64,
}

impl Rewards {
    /// The rewards `config` gives (negative weights count as 0, as in the engine).
    pub fn of(config: &EngineConfig) -> Self {
        let w = &config.rewards;
        Self {
            click: w.click.max(0.0),
            add_to_cart: config.reward_gamma * w.add_to_cart.max(0.0),
            purchase: config.reward_gamma * w.purchase.max(0.0),
        }
    }

    /// The reward of one event.
    pub fn of_event(&self, kind: EventType) -> f64 {
        match kind {
            EventType::Click => self.click,
            EventType::AddToCart => self.add_to_cart,
            EventType::Purchase => self.purchase,
            EventType::Impression | EventType::Dislike => 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct ItemTruth {
    category: usize,
    appeal: f64,
    cart: f64,
    purchase: f64,
    prior: f64,
}

#[derive(Debug, Clone, PartialEq)]
struct UserTruth {
    taste: Vec<f64>,
}

/// A world: its items, users and context effects, fixed by its seed.
#[derive(Debug, Clone, PartialEq)]
pub struct World {
    config: WorldConfig,
    items: Vec<ItemTruth>,
    /// Item latent vectors, `latent_dim` per item.
    item_latent: Vec<f64>,
    users: Vec<UserTruth>,
    /// User latent vectors, `latent_dim` per user.
    user_latent: Vec<f64>,
    /// Per device, the shift of each category's logit.
    device_shift: Vec<Vec<f64>>,
    /// Per hour band, the shift of each category's logit.
    band_shift: Vec<Vec<f64>>,
    /// Cumulative share of requests per user, for drawing who shops next.
    activity_cdf: Vec<f64>,
    /// Catalog ids by item index.
    ids: Vec<String>,
    index: HashMap<String, u32>,
}

/// A normal draw with mean 0 and spread `sd`.
fn gauss(rng: &mut SmallRng, sd: f64) -> f64 {
    let z: f64 = StandardNormal.sample(rng);
    sd * z
}

impl World {
    /// Draws the world `config` describes.
    pub fn new(config: WorldConfig) -> Result<Self, SimError> {
        config.validate()?;
        let mut rng = SmallRng::seed_from_u64(config.seed ^ STREAM_WORLD);
        let dim = config.latent_dim;
        let centroids: Vec<Vec<f64>> = (0..config.categories)
            .map(|_| (0..dim).map(|_| gauss(&mut rng, 1.0)).collect())
            .collect();
        let mut items = Vec::with_capacity(config.items);
        let mut item_latent = Vec::with_capacity(config.items * dim);
        for i in 0..config.items {
            // Every category gets items; the rest fall where they may.
            let category = if i < config.categories {
                i
            } else {
                rng.random_range(0..config.categories)
            };
            for c in &centroids[category] {
                item_latent.push(c + gauss(&mut rng, 0.6));
            }
            let a = gauss(&mut rng, config.appeal_sd);
            items.push(ItemTruth {
                category,
                appeal: a,
                cart: rng.random_range(0.1..0.4),
                purchase: rng.random_range(0.2..0.6),
                prior: (a + gauss(&mut rng, config.prior_noise_sd)).exp(),
            });
        }
        // Latent vectors are scaled so that ⟨w, v⟩ has a spread of about 1.
        let scale = 1.0 / ((dim as f64) * 1.36).sqrt();
        item_latent.iter_mut().for_each(|x| *x *= scale);
        let mut users = Vec::with_capacity(config.users);
        let mut user_latent = Vec::with_capacity(config.users * dim);
        let mut cumulative = 0.0;
        let mut activity_cdf = Vec::with_capacity(config.users);
        for _ in 0..config.users {
            users.push(UserTruth {
                taste: (0..config.categories)
                    .map(|_| gauss(&mut rng, config.taste_sd))
                    .collect(),
            });
            for _ in 0..dim {
                user_latent.push(gauss(&mut rng, 1.0));
            }
            cumulative += gauss(&mut rng, config.activity_sd).exp();
            activity_cdf.push(cumulative);
        }
        activity_cdf.iter_mut().for_each(|c| *c /= cumulative);
        let mut shifts = |n: usize| -> Vec<Vec<f64>> {
            (0..n)
                .map(|_| {
                    (0..config.categories)
                        .map(|_| gauss(&mut rng, config.context_sd))
                        .collect()
                })
                .collect()
        };
        let device_shift = shifts(DEVICES.len());
        let band_shift = shifts(HOUR_BANDS.len());
        let ids: Vec<String> = (0..config.items).map(|i| format!("sku-{i:07}")).collect();
        let index = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i as u32))
            .collect();
        Ok(Self {
            config,
            items,
            item_latent,
            users,
            user_latent,
            device_shift,
            band_shift,
            activity_cdf,
            ids,
            index,
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &WorldConfig {
        &self.config
    }

    /// Number of items.
    pub fn num_items(&self) -> usize {
        self.items.len()
    }

    /// Number of users.
    pub fn num_users(&self) -> usize {
        self.users.len()
    }

    /// The catalog id of item `i`.
    pub fn item_id(&self, i: u32) -> &str {
        &self.ids[i as usize]
    }

    /// The world index of a catalog id.
    pub fn item_index(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// The id of user `u` as the engine sees it.
    pub fn user_id(u: usize) -> String {
        format!("user-{u:06}")
    }

    /// The category of item `i`, as an index.
    pub fn category_index(&self, i: u32) -> usize {
        self.items[i as usize].category
    }

    /// The category user `u` likes best.
    pub fn preferred_category(&self, u: usize) -> usize {
        let taste = &self.users[u].taste;
        (0..taste.len())
            .max_by(|&a, &b| taste[a].total_cmp(&taste[b]))
            .unwrap_or(0)
    }

    /// The category name of item `i`.
    pub fn category(&self, i: u32) -> String {
        format!("cat-{:02}", self.items[i as usize].category)
    }

    /// The catalog the engine serves: every item, with its category and prior popularity.
    pub fn catalog(&self) -> Vec<Item> {
        (0..self.items.len() as u32)
            .map(|i| {
                let mut item = Item::new(self.item_id(i), self.category(i));
                item.title = format!("{} item {i}", self.category(i));
                item.popularity = self.config.priors.then_some(self.items[i as usize].prior);
                item
            })
            .collect()
    }

    /// The probability that a user examines slot `k` (from 0).
    pub fn examine(&self, k: usize) -> f64 {
        1.0 / ((k + 1) as f64).powf(self.config.position_decay)
    }

    /// The probability that user `u` clicks item `i` in moment `m` once they examine it,
    /// before any purchase.
    pub fn attraction(&self, u: usize, i: u32, m: Moment) -> f64 {
        self.attraction_of(self.logit(u, i, m), false)
    }

    /// The same once `u` has bought `i` (see [`Repeats`]).
    pub fn attraction_owned(&self, u: usize, i: u32, m: Moment) -> f64 {
        self.attraction_of(self.logit(u, i, m), true)
    }

    /// The click probability of an examined item whose click logit is `logit`, after
    /// the user bought it when `owned`.
    pub fn attraction_of(&self, logit: f64, owned: bool) -> f64 {
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        match (owned, self.config.repeats) {
            (false, _) | (true, Repeats::Indifferent) => sigmoid(logit),
            (true, Repeats::Consumable) => sigmoid(logit + REPEAT_BOOST),
            (true, Repeats::Durable) => OWNED_SHARE * sigmoid(logit),
        }
    }

    fn logit(&self, u: usize, i: u32, m: Moment) -> f64 {
        self.config.base_logit + self.logit_terms(u, i, m).sum()
    }

    /// The click logit of item `i` in moment `m` without its user's terms: the base
    /// rate, the item's appeal and the moment's shift of its category, all a policy
    /// could know without knowing who asks.
    pub fn logit_without_user(&self, i: u32, m: Moment) -> f64 {
        let item = &self.items[i as usize];
        self.config.base_logit + item.appeal + self.context_shift(item.category, m)
    }

    /// The moment's shift of category `c`'s click logit.
    fn context_shift(&self, c: usize, m: Moment) -> f64 {
        self.device_shift[m.device][c] + self.band_shift[m.band()][c]
    }

    /// The terms of the click logit of user `u` for item `i` in moment `m` past the base
    /// rate (before what an earlier purchase does).
    pub fn logit_terms(&self, u: usize, i: u32, m: Moment) -> LogitTerms {
        let dim = self.config.latent_dim;
        let item = &self.items[i as usize];
        let c = item.category;
        let v = &self.item_latent[i as usize * dim..(i as usize + 1) * dim];
        let w = &self.user_latent[u * dim..(u + 1) * dim];
        let affinity: f64 = v.iter().zip(w).map(|(a, b)| a * b).sum();
        LogitTerms {
            appeal: item.appeal,
            taste: self.users[u].taste[c],
            affinity: self.config.latent_weight * affinity,
            context: self.context_shift(c, m),
        }
    }

    /// The expected reward of a click on item `i`: the click and the discounted funnel.
    pub fn click_value(&self, i: u32, rewards: &Rewards) -> f64 {
        let item = &self.items[i as usize];
        rewards.click + item.cart * (rewards.add_to_cart + item.purchase * rewards.purchase)
    }

    /// [`World::click_value`] of every item, by item index.
    pub fn click_values(&self, rewards: &Rewards) -> Vec<f64> {
        (0..self.num_items() as u32)
            .map(|i| self.click_value(i, rewards))
            .collect()
    }

    /// [`World::examine`] of each of the first `n` slots.
    pub fn examination(&self, n: usize) -> Vec<f64> {
        (0..n).map(|k| self.examine(k)).collect()
    }

    /// The stream of who shops when: user and moment per round, the same for every run
    /// of this world.
    pub fn traffic(&self) -> Traffic<'_> {
        Traffic {
            world: self,
            rng: SmallRng::seed_from_u64(self.config.seed ^ STREAM_TRAFFIC),
        }
    }

    /// The stream of uniform draws that decide responses, the same for every run of this
    /// world: a policy that serves the same item in the same slot of the same round as
    /// another gets the same outcome there.
    pub fn outcomes(&self) -> Outcomes {
        Outcomes {
            rng: SmallRng::seed_from_u64(self.config.seed ^ STREAM_OUTCOMES),
            draws: Vec::new(),
        }
    }

    fn draw_moment(rng: &mut SmallRng) -> Moment {
        let pick = |rng: &mut SmallRng, shares: &mut dyn Iterator<Item = f64>| -> usize {
            let mut r: f64 = rng.random();
            let mut last = 0;
            for (k, share) in shares.enumerate() {
                last = k;
                if r < share {
                    return k;
                }
                r -= share;
            }
            last
        };
        let device = pick(rng, &mut DEVICES.iter().map(|d| d.1));
        let band = pick(rng, &mut HOUR_BANDS.iter().map(|b| b.3));
        let (_, from, to, _) = HOUR_BANDS[band];
        Moment {
            device,
            hour: rng.random_range(from..=to),
        }
    }

    /// Organic shopping sessions, as a click log outside the recommender would record
    /// them: `users` users drawn by activity, `steps` interactions each, every one an
    /// item drawn in proportion to the user's attraction to it in a random moment, with
    /// a timestamp whose hour is that moment's.
    pub fn sessions(&self, users: usize, steps: usize, seed: u64) -> Vec<Interaction> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(users * steps);
        let mut weights = vec![0.0; self.items.len()];
        // A midnight (UTC), so that each timestamp's hour of day is its moment's.
        let day0 = 1_699_920_000.0;
        for s in 0..users {
            let u = self.draw_user(&mut rng);
            let user = format!("session-{s}-{}", Self::user_id(u));
            let mut day = f64::from(rng.random_range(0..30u32));
            for _ in 0..steps {
                day += 1.0;
                let m = Self::draw_moment(&mut rng);
                let mut total = 0.0;
                for (i, w) in weights.iter_mut().enumerate() {
                    total += self.attraction(u, i as u32, m);
                    *w = total;
                }
                let r = rng.random::<f64>() * total;
                let i = weights.partition_point(|&c| c <= r).min(weights.len() - 1);
                let minute = f64::from(rng.random_range(0..60u32));
                out.push(Interaction {
                    user: user.clone(),
                    item: self.ids[i].clone(),
                    timestamp: day0 + day * 86_400.0 + f64::from(m.hour) * 3600.0 + minute * 60.0,
                });
            }
        }
        out
    }

    fn draw_user(&self, rng: &mut SmallRng) -> usize {
        let r: f64 = rng.random();
        self.activity_cdf
            .partition_point(|&c| c <= r)
            .min(self.users.len() - 1)
    }
}

/// Who shops next: see [`World::traffic`].
#[derive(Debug)]
pub struct Traffic<'w> {
    world: &'w World,
    rng: SmallRng,
}

impl Iterator for Traffic<'_> {
    type Item = (usize, Moment);

    fn next(&mut self) -> Option<(usize, Moment)> {
        let u = self.world.draw_user(&mut self.rng);
        Some((u, World::draw_moment(&mut self.rng)))
    }
}

/// The draws behind responses: see [`World::outcomes`].
#[derive(Debug)]
pub struct Outcomes {
    rng: SmallRng,
    draws: Vec<f64>,
}

impl Outcomes {
    /// Draws the next round's uniforms for `slots` slots; always the same number per
    /// round, whatever happens in it, so runs stay aligned round by round.
    pub fn next_round(&mut self, slots: usize) -> &[f64] {
        self.draws.clear();
        self.draws
            .extend((0..slots * DRAWS_PER_SLOT).map(|_| self.rng.random::<f64>()));
        &self.draws
    }
}

/// What the world knows about rewards under the engine's settings: the expected reward
/// of any slate for any user and moment, the best slate, and actual responses. It
/// remembers what each user bought in the run, which changes their interest when goods
/// are consumable or durable.
#[derive(Debug)]
pub struct Oracle<'w> {
    world: &'w World,
    rewards: Rewards,
    /// Items each user bought in this run.
    owned: HashMap<usize, Vec<u32>>,
    /// Expected reward of a click, per item.
    click_value: Vec<f64>,
    /// Position bias per slot.
    examine: Vec<f64>,
    /// Scratch space: each item's expected reward when examined.
    scratch: Vec<(f64, u32)>,
    /// The best slate for the average user, per device and hour band.
    for_anyone: HashMap<(usize, usize), Vec<u32>>,
}

/// The `n` (value, item) pairs of largest value, best first, ties to the lower item;
/// `values` is reordered.
pub(crate) fn top_by_value(values: &mut [(f64, u32)], n: usize) -> &[(f64, u32)] {
    let by_value = |a: &(f64, u32), b: &(f64, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let k = n.min(values.len());
    if k == 0 {
        return &[];
    }
    values.select_nth_unstable_by(k - 1, by_value);
    let top = &mut values[..k];
    top.sort_by(by_value);
    top
}

impl<'w> Oracle<'w> {
    /// The oracle of `world` for slates of up to `n` slots under `rewards`.
    pub fn new(world: &'w World, rewards: Rewards, n: usize) -> Self {
        Self {
            click_value: world.click_values(&rewards),
            examine: world.examination(n),
            world,
            rewards,
            owned: HashMap::new(),
            scratch: Vec::with_capacity(world.num_items()),
            for_anyone: HashMap::new(),
        }
    }

    /// The items user `u` bought so far.
    pub fn owned(&self, u: usize) -> &[u32] {
        self.owned.get(&u).map_or(&[], Vec::as_slice)
    }

    fn attraction(&self, u: usize, i: u32, m: Moment) -> f64 {
        if self.owned(u).contains(&i) {
            self.world.attraction_owned(u, i, m)
        } else {
            self.world.attraction(u, i, m)
        }
    }

    /// The rewards it counts.
    pub fn rewards(&self) -> Rewards {
        self.rewards
    }

    /// Expected reward of item `i` for user `u` in moment `m` once examined.
    pub fn item_value(&self, u: usize, i: u32, m: Moment) -> f64 {
        self.attraction(u, i, m) * self.click_value[i as usize]
    }

    /// Expected reward of `slate` (items in slot order) for user `u` in moment `m`.
    pub fn slate_value(&self, u: usize, m: Moment, slate: &[u32]) -> f64 {
        slate
            .iter()
            .zip(&self.examine)
            .map(|(&i, e)| e * self.item_value(u, i, m))
            .sum()
    }

    /// The best slate of `n` slots for user `u` in moment `m` among the items not
    /// `hidden` (indexed by item), and its expected reward: the best items sorted into the
    /// most examined slots, which is optimal because slots are independent and examination
    /// falls with the slot.
    pub fn best(&mut self, u: usize, m: Moment, hidden: &[bool], n: usize) -> (f64, Vec<u32>) {
        let n = n.min(self.examine.len());
        self.scratch.clear();
        for i in 0..self.world.num_items() as u32 {
            if !hidden.get(i as usize).copied().unwrap_or(false) {
                self.scratch.push((self.item_value(u, i, m), i));
            }
        }
        let top = top_by_value(&mut self.scratch, n);
        let value = top.iter().zip(&self.examine).map(|(v, e)| v.0 * e).sum();
        (value, top.iter().map(|v| v.1).collect())
    }

    /// The best slate of `n` slots for a user the policy knows nothing about in moment
    /// `m`: the items whose expected reward, averaged over every user before any
    /// purchase, is largest. No policy that treats all users alike does better.
    pub fn best_for_anyone(&mut self, m: Moment, n: usize) -> Vec<u32> {
        let world = self.world;
        let click_value = &self.click_value;
        let n = n.min(self.examine.len()).min(world.num_items());
        self.for_anyone
            .entry((m.device, m.band()))
            .or_insert_with(|| {
                let mut mean: Vec<(f64, u32)> = (0..world.num_items() as u32)
                    .map(|i| {
                        let total: f64 = (0..world.num_users())
                            .map(|u| world.attraction(u, i, m))
                            .sum();
                        (total * click_value[i as usize], i)
                    })
                    .collect();
                mean.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                mean.into_iter().take(n).map(|(_, i)| i).collect()
            })
            .clone()
    }

    /// How user `u` in moment `m` responds to `slate`, decided by `draws` (from
    /// [`Outcomes::next_round`], at least 4 per slot). Purchases are remembered.
    pub fn respond(&mut self, u: usize, m: Moment, slate: &[u32], draws: &[f64]) -> Response {
        let mut out = Response::default();
        for (slot, (&i, d)) in slate
            .iter()
            .zip(draws.chunks_exact(DRAWS_PER_SLOT))
            .enumerate()
        {
            let world = self.world;
            let item = &world.items[i as usize];
            let examined = d[0] < self.examine.get(slot).copied().unwrap_or(0.0);
            if !examined || d[1] >= self.attraction(u, i, m) {
                continue;
            }
            let mut act = |kind| {
                out.actions.push(Action {
                    slot,
                    item: i,
                    kind,
                });
                out.reward += self.rewards.of_event(kind);
            };
            act(EventType::Click);
            out.clicks += 1;
            if d[2] < item.cart {
                act(EventType::AddToCart);
                if d[3] < item.purchase {
                    act(EventType::Purchase);
                    let owned = self.owned.entry(u).or_default();
                    if !owned.contains(&i) {
                        owned.push(i);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> World {
        World::new(WorldConfig {
            seed,
            users: 50,
            items: 80,
            categories: 5,
            ..WorldConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn a_seed_fixes_the_world_its_traffic_and_its_outcomes() {
        let (a, b) = (small(3), small(3));
        assert_eq!(a, b);
        assert_ne!(a, small(4));
        assert_eq!(a.catalog(), b.catalog());
        let ta: Vec<_> = a.traffic().take(100).collect();
        let tb: Vec<_> = b.traffic().take(100).collect();
        assert_eq!(ta, tb);
        let (mut oa, mut ob) = (a.outcomes(), b.outcomes());
        assert_eq!(oa.next_round(5).to_vec(), ob.next_round(5).to_vec());
        assert_eq!(
            a.sessions(5, 4, 9),
            b.sessions(5, 4, 9),
            "sessions are deterministic too"
        );
    }

    #[test]
    fn position_bias_falls_and_moments_cover_devices_and_hours() {
        let w = small(1);
        assert!((w.examine(0) - 1.0).abs() < 1e-12);
        assert!((1..10).all(|k| w.examine(k) < w.examine(k - 1)));
        let moments: Vec<Moment> = w.traffic().take(2000).map(|t| t.1).collect();
        for d in 0..DEVICES.len() {
            assert!(moments.iter().any(|m| m.device == d));
        }
        assert!(moments.iter().all(|m| m.hour < 24));
        assert!(moments.iter().any(|m| m.band() == 0));
        assert!(moments.iter().any(|m| m.band() == 3));
    }

    #[test]
    fn the_best_slate_beats_every_other_and_responses_follow_the_rewards() {
        let w = small(2);
        let rewards = Rewards::of(&EngineConfig::default());
        assert_eq!(
            (rewards.click, rewards.add_to_cart, rewards.purchase),
            (1.0, 0.9 * 2.0, 0.9 * 3.0)
        );
        let mut oracle = Oracle::new(&w, rewards, 5);
        let m = Moment {
            device: 0,
            hour: 20,
        };
        let mut hidden = vec![false; w.num_items()];
        hidden[3] = true;
        let (best, slate) = oracle.best(7, m, &hidden, 5);
        assert_eq!(slate.len(), 5);
        assert!(!slate.contains(&3));
        assert!((oracle.slate_value(7, m, &slate) - best).abs() < 1e-12);
        // Swapping two slots or replacing an item never helps.
        let mut swapped = slate.clone();
        swapped.swap(0, 4);
        assert!(oracle.slate_value(7, m, &swapped) <= best);
        for other in 0..w.num_items() as u32 {
            if slate.contains(&other) || other == 3 {
                continue;
            }
            let mut replaced = slate.clone();
            replaced[4] = other;
            assert!(oracle.slate_value(7, m, &replaced) <= best + 1e-12);
        }
        // Responses: realised rewards sum the events, and average to the expectation.
        let mut outcomes = w.outcomes();
        let rounds = 20_000;
        let mut total = 0.0;
        for _ in 0..rounds {
            let r = oracle.respond(7, m, &slate, outcomes.next_round(5));
            let sum: f64 = r.actions.iter().map(|a| rewards.of_event(a.kind)).sum();
            assert!((r.reward - sum).abs() < 1e-9);
            total += r.reward;
        }
        let mean = total / f64::from(rounds);
        assert!(
            (mean - best).abs() < 0.05 * best.max(0.1),
            "{mean} vs {best}"
        );
    }

    #[test]
    fn the_slate_for_anyone_is_best_on_average_and_worse_than_each_users_own() {
        let w = small(5);
        let mut oracle = Oracle::new(&w, Rewards::of(&EngineConfig::default()), 5);
        let m = Moment { device: 1, hour: 9 };
        let anyone = oracle.best_for_anyone(m, 5);
        assert_eq!(anyone.len(), 5);
        assert_eq!(oracle.best_for_anyone(m, 5), anyone, "cached per moment");
        let mean = |oracle: &Oracle, slate: &[u32]| -> f64 {
            (0..w.num_users())
                .map(|u| oracle.slate_value(u, m, slate))
                .sum::<f64>()
                / w.num_users() as f64
        };
        let nothing_hidden = vec![false; w.num_items()];
        let own: f64 = (0..w.num_users())
            .map(|u| oracle.best(u, m, &nothing_hidden, 5).0)
            .sum::<f64>()
            / w.num_users() as f64;
        let for_anyone = mean(&oracle, &anyone);
        assert!(for_anyone < own, "{for_anyone} vs {own}");
        // No other slate is better for the average user.
        for other in 0..w.num_items() as u32 {
            if anyone.contains(&other) {
                continue;
            }
            let mut replaced = anyone.clone();
            replaced[4] = other;
            assert!(mean(&oracle, &replaced) <= for_anyone + 1e-12);
        }
    }

    #[test]
    fn the_logit_terms_add_up_to_the_click_probability_and_tell_the_parts_apart() {
        let w = small(4);
        let m = Moment {
            device: 2,
            hour: 20,
        };
        for u in 0..w.num_users().min(20) {
            let liked = w.preferred_category(u);
            for i in 0..w.num_items() as u32 {
                let terms = w.logit_terms(u, i, m);
                let p = 1.0 / (1.0 + (-(w.config.base_logit + terms.sum())).exp());
                assert!(
                    (p - w.attraction(u, i, m)).abs() < 1e-12,
                    "user {u}, item {i}"
                );
                // The taste term is the user's, by the item's category: their preferred
                // category's items get the largest.
                if w.category_index(i) == liked {
                    assert!(
                        (0..w.num_items() as u32)
                            .all(|j| w.logit_terms(u, j, m).taste <= terms.taste)
                    );
                }
            }
        }
        let mut t = LogitTerms {
            appeal: 1.0,
            taste: 2.0,
            affinity: -0.5,
            context: 0.25,
        };
        assert_eq!(t.sum(), 2.75);
        t.add(&t.scaled(2.0));
        assert_eq!(t.sum(), 3.0 * 2.75);
    }

    #[test]
    fn purchases_bring_buyers_back_to_consumables_and_off_durables() {
        let m = Moment { device: 1, hour: 9 };
        for (repeats, owned_is_more) in [(Repeats::Consumable, true), (Repeats::Durable, false)] {
            let w = World::new(WorldConfig {
                repeats,
                ..WorldConfig::fresh_shop(4)
            })
            .unwrap();
            assert!(
                w.catalog().iter().all(|i| i.popularity.is_none()),
                "no sales history"
            );
            let mut oracle = Oracle::new(&w, Rewards::of(&EngineConfig::default()), 5);
            let before = oracle.item_value(3, 7, m);
            // Draws that examine, click, add to cart and buy whatever is in slot 0.
            let r = oracle.respond(3, m, &[7], &[0.0, 0.0, 0.0, 0.0]);
            assert_eq!(r.actions.last().map(|a| a.kind), Some(EventType::Purchase));
            assert_eq!(oracle.owned(3), &[7]);
            let after = oracle.item_value(3, 7, m);
            assert_eq!(
                after > before,
                owned_is_more,
                "{repeats:?}: {before} then {after}"
            );
            assert_eq!(oracle.owned(4), &[] as &[u32], "per user");
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        let err = |c: WorldConfig| World::new(c).unwrap_err().to_string();
        assert_eq!(
            err(WorldConfig {
                users: 0,
                ..WorldConfig::default()
            }),
            "users: must be at least 1"
        );
        assert!(
            err(WorldConfig {
                items: 3,
                categories: 5,
                ..WorldConfig::default()
            })
            .starts_with("categories: is 5")
        );
        assert!(
            err(WorldConfig {
                taste_sd: f64::NAN,
                ..WorldConfig::default()
            })
            .starts_with("taste_sd: is NaN")
        );
    }
}

//! The item catalog: dense indices for ids, JSONL loading, and the built-in demo catalog.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

use onrec_model::rng::SplitMix64;

use crate::error::EngineError;
use crate::types::Item;

/// Items by dense index, so per-item state can live in plain vectors.
///
/// Indices are stable: upserts replace items in place and never remove one, so a stored
/// index stays valid for the life of the process.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    items: Vec<Item>,
    index: HashMap<String, u32>,
    available: usize,
    /// Whether each item is available, in index order (what a scan of the catalog reads).
    availability: Vec<bool>,
    /// The category group of every item: categories numbered in the order they appeared.
    groups: Vec<u32>,
    group_index: HashMap<String, u32>,
}

/// Whether an insert made a new item or replaced one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new item at this index.
    Created(u32),
    /// An item replaced at this index.
    Updated(u32),
}

impl Catalog {
    /// Number of items, available or not.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Number of items that may be recommended.
    pub fn available(&self) -> usize {
        self.available
    }

    /// The index of `item_id`, if known.
    pub fn index_of(&self, item_id: &str) -> Option<u32> {
        self.index.get(item_id).copied()
    }

    /// The item at `idx`.
    pub fn get(&self, idx: u32) -> &Item {
        &self.items[idx as usize]
    }

    /// All items in index order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The category group of the item at `idx`.
    pub fn group(&self, idx: u32) -> u32 {
        self.groups[idx as usize]
    }

    /// Number of category groups.
    pub fn num_groups(&self) -> usize {
        self.group_index.len()
    }

    fn group_of(&mut self, category: &str) -> u32 {
        let next = self.group_index.len() as u32;
        *self.group_index.entry(category.to_owned()).or_insert(next)
    }

    /// Whether each item is available, in index order.
    pub fn availability(&self) -> &[bool] {
        &self.availability
    }

    /// All item ids in index order.
    pub fn ids(&self) -> Vec<String> {
        self.items.iter().map(|i| i.item_id.clone()).collect()
    }

    /// Inserts `item`, or replaces the item with the same id.
    pub fn upsert(&mut self, item: Item) -> Inserted {
        if item.available {
            self.available += 1;
        }
        let group = self.group_of(&item.category);
        match self.index.get(&item.item_id) {
            Some(&idx) => {
                self.groups[idx as usize] = group;
                self.availability[idx as usize] = item.available;
                let old = std::mem::replace(&mut self.items[idx as usize], item);
                if old.available {
                    self.available -= 1;
                }
                Inserted::Updated(idx)
            }
            None => {
                let idx = u32::try_from(self.items.len()).unwrap_or(u32::MAX);
                self.index.insert(item.item_id.clone(), idx);
                self.availability.push(item.available);
                self.items.push(item);
                self.groups.push(group);
                Inserted::Created(idx)
            }
        }
    }

    /// Reads a JSON-lines catalog: one [`Item`] per line, blank lines skipped. The error
    /// names the line; an item id given twice is an error.
    pub fn read_jsonl(path: &Path) -> Result<Vec<Item>, EngineError> {
        let err = |message: String| EngineError::Catalog {
            path: path.display().to_string(),
            message,
        };
        let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let mut items = Vec::new();
        let mut first_line: HashMap<String, usize> = HashMap::new();
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let n = i + 1;
            let line = line.map_err(|e| err(format!("line {n}: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            let crate::types::Object(item): crate::types::Object<Item> =
                serde_json::from_str(&line).map_err(|e| err(format!("line {n}: {e}")))?;
            item.validate().map_err(|e| err(format!("line {n}: {e}")))?;
            if let Some(first) = first_line.insert(item.item_id.clone(), n) {
                return Err(err(format!(
                    "line {n}: item_id '{}' was already given on line {first}",
                    item.item_id
                )));
            }
            items.push(item);
        }
        Ok(items)
    }
}

const CATEGORIES: [(&str, [&str; 6]); 12] = [
    (
        "shoes",
        [
            "Runner",
            "Sneaker",
            "Boot",
            "Loafer",
            "Sandal",
            "Trail Shoe",
        ],
    ),
    (
        "apparel",
        ["Tee", "Hoodie", "Jacket", "Jeans", "Dress", "Sweater"],
    ),
    (
        "electronics",
        [
            "Headphones",
            "Speaker",
            "Charger",
            "Smartwatch",
            "Tablet",
            "Camera",
        ],
    ),
    (
        "home",
        ["Lamp", "Cushion", "Rug", "Vase", "Throw", "Mirror"],
    ),
    (
        "kitchen",
        ["Kettle", "Pan", "Knife Set", "Blender", "Mug", "Grinder"],
    ),
    (
        "beauty",
        ["Serum", "Cream", "Cleanser", "Palette", "Perfume", "Balm"],
    ),
    (
        "sports",
        [
            "Yoga Mat", "Dumbbell", "Bottle", "Racket", "Helmet", "Gloves",
        ],
    ),
    (
        "toys",
        ["Puzzle", "Blocks", "Plush", "Kite", "Board Game", "Robot"],
    ),
    (
        "books",
        ["Novel", "Cookbook", "Atlas", "Biography", "Comic", "Guide"],
    ),
    (
        "garden",
        ["Planter", "Hose", "Shears", "Seed Kit", "Lantern", "Bench"],
    ),
    (
        "office",
        [
            "Notebook",
            "Pen Set",
            "Desk Lamp",
            "Organizer",
            "Chair",
            "Backpack",
        ],
    ),
    ("pets", ["Leash", "Bed", "Bowl", "Toy", "Brush", "Carrier"]),
];

const ADJECTIVES: [&str; 10] = [
    "Classic", "Urban", "Eco", "Pro", "Compact", "Deluxe", "Vintage", "Sport", "Soft", "Smart",
];

/// The built-in demo catalog: `n` items (`sku-00000`, …) in 12 categories, with prices
/// and a Zipf-shaped prior popularity, identical on every run.
pub fn demo_catalog(n: usize) -> Vec<Item> {
    let mut rng = SplitMix64::new(0x006f_6e72_6563);
    // A random permutation decides which items are popular, so that popularity is not
    // tied to id order or category.
    let mut rank: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut rank);
    (0..n)
        .map(|i| {
            let (category, nouns) = CATEGORIES[rng.below(CATEGORIES.len() as u64) as usize];
            let adjective = ADJECTIVES[rng.below(ADJECTIVES.len() as u64) as usize];
            let noun = nouns[rng.below(nouns.len() as u64) as usize];
            let price = (5.0 + rng.unit() * 195.0).round() - 0.01;
            Item {
                item_id: format!("sku-{i:05}"),
                title: format!("{adjective} {noun}"),
                category: category.to_owned(),
                price: Some(price),
                tags: vec![adjective.to_lowercase()],
                description: String::new(),
                available: true,
                popularity: Some(100.0 / (rank[i] as f64 + 1.0).powf(0.8)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_are_numbered_in_the_order_they_appear() {
        let mut c = Catalog::default();
        for (id, cat) in [("a", "x"), ("b", "y"), ("c", "x"), ("d", "")] {
            c.upsert(Item::new(id, cat));
        }
        assert_eq!(c.num_groups(), 3);
        assert_eq!(
            [c.group(0), c.group(1), c.group(2), c.group(3)],
            [0, 1, 0, 2]
        );
        c.upsert(Item::new("a", "z"));
        assert_eq!(
            (c.group(0), c.num_groups()),
            (3, 4),
            "a replaced item moves"
        );
    }

    #[test]
    fn demo_catalog_is_deterministic_and_valid() {
        let a = demo_catalog(500);
        assert_eq!(a, demo_catalog(500));
        assert_eq!(a.len(), 500);
        assert!(a.iter().all(|i| i.validate().is_ok()));
        let categories: std::collections::HashSet<_> = a.iter().map(|i| &i.category).collect();
        assert_eq!(categories.len(), CATEGORIES.len());
    }

    #[test]
    fn upsert_keeps_indices_and_counts_available_items() {
        let mut c = Catalog::default();
        assert_eq!(c.upsert(Item::new("a", "x")), Inserted::Created(0));
        assert_eq!(c.upsert(Item::new("b", "x")), Inserted::Created(1));
        let hidden = Item {
            available: false,
            ..Item::new("a", "y")
        };
        assert_eq!(c.upsert(hidden), Inserted::Updated(0));
        assert_eq!((c.len(), c.available()), (2, 1));
        assert_eq!(c.get(0).category, "y");
        assert_eq!(c.index_of("b"), Some(1));
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("onrec-catalog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.jsonl");
        std::fs::write(
            &path,
            "{\"item_id\":\"a\"}\n\n{\"item_id\":\"b\",\"price\":-1}\n",
        )
        .unwrap();
        let err = Catalog::read_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains("line 3: price"), "{err}");
        std::fs::write(&path, "{\"item_id\":\"a\"}\n{\"item_id\":\"a\"}\n").unwrap();
        let err = Catalog::read_jsonl(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 2: item_id 'a' was already given on line 1"),
            "{err}"
        );
        std::fs::write(&path, "{\"item_id\":\"a\"}\n{\"id\":\"b\"}\n").unwrap();
        let err = Catalog::read_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains("line 2: unknown field `id`"), "{err}");
        std::fs::write(&path, "{\"item_id\":\"a\",\"category\":\"x\"}\n").unwrap();
        assert_eq!(
            Catalog::read_jsonl(&path).unwrap(),
            vec![Item::new("a", "x")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

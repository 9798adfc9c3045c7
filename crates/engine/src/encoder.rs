//! The link between the catalog and a Transformer encoder's item vocabulary: which catalog
//! items the encoder can score, and the query it gets for a user.

use std::collections::{HashMap, HashSet};

use onrec_model::context::ContextIds;
use onrec_model::serve::{Encoder, Query};

use crate::catalog::Catalog;

/// Model index of "not in the model's vocabulary" (0 is padding, never an item).
const NONE: u32 = 0;

/// An encoder attached to the catalog.
#[derive(Debug)]
pub struct EncoderLink {
    encoder: Encoder,
    /// Model index by item id.
    index: HashMap<String, u32>,
    /// Names the weights, e.g. `sasrec-1a2b3c4d`.
    pub version: String,
    catalog_to_model: Vec<u32>,
    /// Catalog index by model index (`u32::MAX`: not in the catalog).
    model_to_catalog: Vec<u32>,
    /// Model items that may not be returned: absent from the catalog, or unavailable.
    blocked: Vec<u32>,
    /// The catalog's category group of every model index (`u32::MAX`: none).
    groups: std::sync::Arc<[u32]>,
    /// Whether users with no known history are ranked too (by their context alone): the
    /// encoder learned first choices as well.
    pub newcomers: bool,
}

impl EncoderLink {
    /// Links `encoder`, whose vocabulary is `items` (`items[0]` is padding), to `catalog`.
    pub fn new(encoder: Encoder, items: &[String], version: String, catalog: &Catalog) -> Self {
        let index = onrec_model::data::vocabulary_index(items);
        let mut link = Self {
            encoder,
            index,
            version,
            catalog_to_model: Vec::new(),
            model_to_catalog: Vec::new(),
            blocked: Vec::new(),
            groups: std::sync::Arc::from(Vec::new()),
            newcomers: false,
        };
        link.sync(catalog);
        link
    }

    /// Recomputes the mappings after the catalog changed.
    pub fn sync(&mut self, catalog: &Catalog) {
        let vocab = self.encoder.num_items() + 1;
        self.catalog_to_model = catalog
            .items()
            .iter()
            .map(|item| self.index.get(&item.item_id).copied().unwrap_or(NONE))
            .collect();
        self.model_to_catalog = vec![u32::MAX; vocab];
        for (c, &m) in self.catalog_to_model.iter().enumerate() {
            if m != NONE && catalog.get(c as u32).available {
                self.model_to_catalog[m as usize] = c as u32;
            }
        }
        self.groups = self
            .model_to_catalog
            .iter()
            .map(|&c| {
                if c == u32::MAX {
                    u32::MAX
                } else {
                    catalog.group(c)
                }
            })
            .collect();
        self.blocked = (1..vocab as u32)
            .filter(|&m| self.model_to_catalog[m as usize] == u32::MAX)
            .collect();
    }

    /// Catalog items the encoder can score.
    pub fn known_items(&self) -> usize {
        self.catalog_to_model.iter().filter(|&&m| m != NONE).count()
    }

    /// The query for a user with `history` (catalog indices, oldest first), or `None` when
    /// no item of the history is known to the encoder (unless it ranks newcomers).
    pub fn query(
        &self,
        history: &[u32],
        hidden: &HashSet<u32>,
        context: ContextIds,
        k: usize,
        offsets: Option<Vec<f32>>,
    ) -> Option<Query> {
        let known: Vec<u32> = history
            .iter()
            .filter_map(|&c| self.catalog_to_model.get(c as usize).copied())
            .filter(|&m| m != NONE)
            .collect();
        if known.is_empty() && !self.newcomers {
            return None;
        }
        let mut exclude = self.blocked.clone();
        exclude.extend(
            hidden
                .iter()
                .filter_map(|&c| self.catalog_to_model.get(c as usize).copied())
                .filter(|&m| m != NONE),
        );
        Some(Query {
            history: known,
            context,
            exclude,
            k,
            shift: offsets.map(|offsets| onrec_model::serve::GroupShift {
                groups: self.groups.clone(),
                offsets,
            }),
        })
    }

    /// The catalog index of a model item, if it is in the catalog and available.
    pub fn to_catalog(&self, model: u32) -> Option<u32> {
        self.model_to_catalog
            .get(model as usize)
            .copied()
            .filter(|&c| c != u32::MAX)
    }

    /// The encoder handle.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }
}

//! Checkpoints: a directory with the weights (`model.safetensors`), the encoder's shape
//! (`config.json`) and the item vocabulary (`items.json`, index order), so it can be
//! loaded without anything else. `training.json` records how it was made.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Serialize, de::DeserializeOwned};

use crate::ModelError;
use crate::sasrec::{Config, SasRec};

/// Weights file name.
pub const WEIGHTS: &str = "model.safetensors";
/// Encoder shape file name.
pub const CONFIG: &str = "config.json";
/// Item vocabulary file name: a JSON array of item ids, index 1 first.
pub const ITEMS: &str = "items.json";
/// Training record file name.
pub const TRAINING: &str = "training.json";
/// Item text vectors file name (checkpoints whose item tower reads text): the tensor
/// `vectors`, `[num_items + 1, text_dim]`.
pub const TEXT: &str = "text.safetensors";

/// Items withheld from training (the cold-item protocol), by id: a JSON array.
pub const WITHHELD: &str = "withheld.json";

/// The items a checkpoint was trained without (empty when none were withheld).
pub fn read_withheld(dir: &Path) -> Result<Vec<String>, ModelError> {
    let path = dir.join(WITHHELD);
    if path.exists() {
        read_json(&path)
    } else {
        Ok(Vec::new())
    }
}

/// Records the items a checkpoint was trained without (nothing when none were).
pub fn write_withheld(dir: &Path, ids: &[&str]) -> Result<(), ModelError> {
    if ids.is_empty() {
        return Ok(());
    }
    write_json(&dir.join(WITHHELD), &ids)
}

/// A loaded encoder with its vocabulary.
#[derive(Debug)]
pub struct Checkpoint {
    /// The encoder.
    pub model: SasRec,
    /// Item ids by index; index 0 is padding (an empty string).
    pub items: Arc<Vec<String>>,
    /// Index of each item id.
    pub index: HashMap<String, u32>,
}

pub(crate) fn io(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint(format!("{}: {e}", path.display()))
}

pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| io(path, e))?;
    std::fs::write(path, text).map_err(|e| io(path, e))
}

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    serde_json::from_str(&text).map_err(|e| io(path, e))
}

/// Writes weights, shape, vocabulary (`items[0]` is padding and not written), the item
/// text vectors when the item tower reads text, and the training record into `dir`,
/// creating it.
pub fn save(
    dir: &Path,
    varmap: &VarMap,
    config: &Config,
    items: &[String],
    text: Option<&Tensor>,
    training: &impl Serialize,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    varmap
        .save(dir.join(WEIGHTS))
        .map_err(|e| io(&dir.join(WEIGHTS), e))?;
    if let Some(t) = text {
        t.save_safetensors("vectors", dir.join(TEXT))
            .map_err(|e| io(&dir.join(TEXT), e))?;
    }
    write_json(&dir.join(CONFIG), config)?;
    write_json(&dir.join(ITEMS), &items[1..].to_vec())?;
    write_json(&dir.join(TRAINING), training)
}

/// The model configuration of a checkpoint directory, without loading its weights.
pub fn read_config(dir: &Path) -> Result<Config, ModelError> {
    read_json(&dir.join(CONFIG))
}

/// An encoder of shape `config` from safetensors bytes (what
/// [`crate::online::OnlineTrainer::export`] writes), on `device`.
pub fn from_bytes(config: &Config, weights: &[u8], device: &Device) -> Result<SasRec, ModelError> {
    let vb = VarBuilder::from_slice_safetensors(weights, DType::F32, device)
        .map_err(|e| ModelError::Checkpoint(format!("reading the weights: {e}")))?;
    SasRec::load(vb, config)
        .map_err(|e| ModelError::Checkpoint(format!("loading the weights: {e}")))
}

/// Loads a checkpoint directory onto `device`, checking that its parts agree.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint, ModelError> {
    let config = read_config(dir)?;
    let ids: Vec<String> = read_json(&dir.join(ITEMS))?;
    if ids.len() != config.num_items {
        return Err(io(
            dir,
            format!(
                "{ITEMS} has {} items but {CONFIG} says {}",
                ids.len(),
                config.num_items
            ),
        ));
    }
    let weights = dir.join(WEIGHTS);
    let tensors = candle_core::safetensors::load(&weights, device).map_err(|e| io(&weights, e))?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let mut model = SasRec::load(vb.clone(), &config).map_err(|e| io(&weights, e))?;
    if config.text_dim > 0 {
        let path = dir.join(TEXT);
        let vectors = candle_core::safetensors::load(&path, device)
            .map_err(|e| io(&path, e))?
            .remove("vectors")
            .ok_or_else(|| io(&path, "has no tensor named vectors"))?;
        model = model.with_text(vb, vectors).map_err(|e| io(&path, e))?;
    }
    let mut items = Vec::with_capacity(ids.len() + 1);
    items.push(String::new());
    items.extend(ids);
    let index = crate::data::vocabulary_index(&items);
    let untrained: Vec<u32> = read_withheld(dir)?
        .iter()
        .filter_map(|id| index.get(id.as_str()).copied())
        .collect();
    let model = model.with_untrained(&untrained).map_err(|e| io(dir, e))?;
    Ok(Checkpoint {
        model,
        items: Arc::new(items),
        index,
    })
}

//! Item text as vectors: a sentence-transformers model directory (`config.json`,
//! `tokenizer.json`, `model.safetensors`; a BERT such as all-MiniLM-L6-v2), run with
//! candle-transformers' BERT, mean-pooled over the real tokens and L2-normalised, as
//! sentence-transformers does. Texts are embedded in batches, and each distinct text once:
//! the vectors are kept by the text's content hash.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::ModelError;
use crate::checkpoint::io;
use crate::data::line_error;

/// Tokens read of one text (all-MiniLM-L6-v2 was trained on up to 256).
const MAX_TOKENS: usize = 256;
/// Texts per forward pass.
const BATCH: usize = 32;

/// A sentence encoder.
pub struct TextModel {
    bert: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dim: usize,
    /// Vectors by the content hash of their text.
    cache: HashMap<u64, Arc<[f32]>>,
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel")
            .field("dim", &self.dim)
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

/// An item's text from its catalog fields: the non-empty ones joined by ". ", tags by
/// ", ".
pub fn describe(title: &str, category: &str, tags: &[String], description: &str) -> String {
    let tags = tags.join(", ");
    [title, category, tags.as_str(), description]
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(". ")
}

/// Item texts by item id, from a catalog file (`.jsonl`: one item per line, as `PUT
/// /v1/items` takes them: `item_id`, `title`, `category`, `tags`, `description`) or a
/// RecBole atomic `.item` file (typed header; every column but `item_id`, joined as
/// [`describe`] does). Errors name the line.
pub fn read_item_texts(path: &Path) -> Result<HashMap<String, String>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| line_error(path, 0, e.to_string()))?;
    let mut out = HashMap::new();
    if path.extension().is_some_and(|e| e == "jsonl") {
        #[derive(serde::Deserialize)]
        struct Line {
            item_id: String,
            #[serde(default)]
            title: String,
            #[serde(default)]
            category: String,
            #[serde(default)]
            tags: Vec<String>,
            #[serde(default)]
            description: String,
        }
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let item: Line =
                serde_json::from_str(line).map_err(|e| line_error(path, n + 1, e.to_string()))?;
            let t = describe(&item.title, &item.category, &item.tags, &item.description);
            out.insert(item.item_id, t);
        }
        return Ok(out);
    }
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .ok_or_else(|| line_error(path, 1, "the file is empty"))?
        .1;
    let names: Vec<&str> = header
        .split('\t')
        .map(|c| c.split(':').next().unwrap_or(c).trim())
        .collect();
    let id = names.iter().position(|&n| n == "item_id").ok_or_else(|| {
        line_error(path, 1, "the header has no item_id column (a RecBole .item file or a .jsonl catalog is expected)")
    })?;
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        let item = cols
            .get(id)
            .map(|c| c.trim())
            .filter(|c| !c.is_empty())
            .ok_or_else(|| line_error(path, n + 1, "item_id is empty"))?;
        let parts: Vec<&str> = cols
            .iter()
            .enumerate()
            .filter(|&(c, v)| c != id && !v.trim().is_empty())
            .map(|(_, v)| v.trim())
            .collect();
        out.insert(item.to_owned(), parts.join(". "));
    }
    Ok(out)
}

/// Item vectors from item text alone, as an encoder trained with text places an item it
/// never trained on: the sentence encoder's vector of its text through the encoder's
/// learned projection for text alone (`text.alone.weight`, or `text.proj.weight` for a
/// checkpoint trained without one). What an item added with only a description gets in
/// the item tower.
#[derive(Debug)]
pub struct TextProjection {
    model: TextModel,
    /// `[hidden, text_dim]`, row-major.
    weight: Vec<f32>,
    hidden: usize,
}

impl TextProjection {
    /// The sentence encoder in `text_model` with the projection of the checkpoint in
    /// `checkpoint` (written by `onrec train --text-model`), on `device`. Errors say which
    /// one does not fit.
    pub fn load(text_model: &Path, checkpoint: &Path, device: &Device) -> Result<Self, ModelError> {
        let shape = crate::checkpoint::read_config(checkpoint)?;
        if shape.text_dim == 0 {
            return Err(io(
                checkpoint,
                "was trained without item text, so it cannot place items by their text (train it with --text-model and --item-text)",
            ));
        }
        let path = checkpoint.join(crate::checkpoint::WEIGHTS);
        let name = if shape.text_alone {
            "text.alone.weight"
        } else {
            "text.proj.weight"
        };
        let weight = candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| io(&path, e))?
            .remove(name)
            .ok_or_else(|| io(&path, format!("has no tensor named {name}")))?;
        if weight.dims() != [shape.hidden, shape.text_dim] {
            return Err(io(
                &path,
                format!(
                    "{name} is {:?}, config.json says [{}, {}]",
                    weight.dims(),
                    shape.hidden,
                    shape.text_dim
                ),
            ));
        }
        let model = TextModel::load(text_model, device)?;
        if model.dim() != shape.text_dim {
            return Err(io(
                text_model,
                format!(
                    "gives {}-wide vectors, and the checkpoint was trained on {}-wide ones",
                    model.dim(),
                    shape.text_dim
                ),
            ));
        }
        Ok(Self {
            model,
            weight: weight.flatten_all()?.to_vec1()?,
            hidden: shape.hidden,
        })
    }

    /// The item-tower row (`hidden` wide) of each text.
    pub fn rows(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        let dim = self.model.dim();
        Ok(self
            .model
            .embed(texts)?
            .iter()
            .map(|v| {
                self.weight
                    .chunks_exact(dim)
                    .map(|w| crate::infer::dot(w, v))
                    .collect()
            })
            .collect())
    }

    /// Width of its rows.
    pub fn hidden(&self) -> usize {
        self.hidden
    }
}

/// The content hash of a text (64-bit FNV-1a over its UTF-8 bytes).
pub fn content_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl TextModel {
    /// Loads the model in `dir` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| io(&config_path, e))?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|e| io(&config_path, e))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| io(&tokenizer_path, e))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS.min(config.max_position_embeddings),
                ..TruncationParams::default()
            }))
            .map_err(|e| io(&tokenizer_path, e))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(io(&weights, "not found"));
        }
        let bytes = std::fs::read(&weights).map_err(|e| io(&weights, e))?;
        let vb = VarBuilder::from_slice_safetensors(&bytes, DType::F32, device)
            .map_err(|e| io(&weights, e))?;
        let bert = BertModel::load(vb, &config).map_err(|e| io(&weights, e))?;
        Ok(Self {
            bert,
            tokenizer,
            device: device.clone(),
            dim: config.hidden_size,
            cache: HashMap::new(),
        })
    }

    /// Width of the vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Distinct texts embedded so far.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The text vectors of a vocabulary (`items[0]` is padding), `[items.len(), dim]`:
    /// items without text (or with an empty one) get a zero row.
    pub fn table(
        &mut self,
        items: &[String],
        texts: &HashMap<String, String>,
    ) -> Result<Tensor, ModelError> {
        let with_text: Vec<(usize, &str)> = items
            .iter()
            .enumerate()
            .skip(1)
            .filter_map(|(i, id)| texts.get(id).map(|t| (i, t.as_str())))
            .filter(|(_, t)| !t.trim().is_empty())
            .collect();
        let vectors = self.embed(&with_text.iter().map(|&(_, t)| t).collect::<Vec<_>>())?;
        let mut rows = vec![0f32; items.len() * self.dim];
        for (&(i, _), v) in with_text.iter().zip(vectors) {
            rows[i * self.dim..(i + 1) * self.dim].copy_from_slice(&v);
        }
        Ok(Tensor::from_vec(
            rows,
            (items.len(), self.dim),
            &self.device,
        )?)
    }

    /// The unit vector of every text, in order. Texts seen before cost nothing; the others
    /// run through the model in batches.
    pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<Arc<[f32]>>, ModelError> {
        let mut missing: Vec<(u64, &str)> = Vec::new();
        for &t in texts {
            let h = content_hash(t);
            if !self.cache.contains_key(&h) && !missing.iter().any(|&(m, _)| m == h) {
                missing.push((h, t));
            }
        }
        for chunk in missing.chunks(BATCH) {
            let batch: Vec<&str> = chunk.iter().map(|&(_, t)| t).collect();
            for (&(h, _), v) in chunk.iter().zip(self.run(&batch)?) {
                self.cache.insert(h, Arc::from(v));
            }
        }
        Ok(texts
            .iter()
            .map(|t| self.cache[&content_hash(t)].clone())
            .collect())
    }

    /// One forward pass: mean pooling over the attention mask, then L2 normalisation.
    fn run(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Train(format!("tokenizing item text: {e}")))?;
        let b = encodings.len();
        let l = encodings.first().map_or(0, |e| e.get_ids().len());
        let (mut ids, mut types, mut mask) = (
            Vec::with_capacity(b * l),
            Vec::with_capacity(b * l),
            Vec::with_capacity(b * l),
        );
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            types.extend_from_slice(e.get_type_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        let d = &self.device;
        let ids = Tensor::from_vec(ids, (b, l), d)?;
        let types = Tensor::from_vec(types, (b, l), d)?;
        let mask = Tensor::from_vec(mask, (b, l), d)?;
        let out = self.bert.forward(&ids, &types, Some(&mask))?;
        let weights = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = out.broadcast_mul(&weights)?.sum(1)?;
        let counts = weights.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::dot;

    /// Needs the model `scripts/fetch-datasets.sh` extracts; `ONREC_TEST_TEXT_MODEL` names its
    /// directory.
    #[test]
    fn the_sentence_encoder_gives_sentence_transformers_vectors() {
        let Some(dir) = std::env::var_os("ONREC_TEST_TEXT_MODEL") else {
            eprintln!("ONREC_TEST_TEXT_MODEL is unset; skipping the sentence encoder test");
            return;
        };
        let mut m = TextModel::load(Path::new(&dir), &Device::Cpu).unwrap();
        assert_eq!(m.dim(), 384);
        let texts = [
            "This is an example sentence",
            "Toy Story (1995) Animation Children's Comedy",
            "Toy Story 2 (1999) Animation Children's Comedy",
            "Heat (1995) Action Crime Thriller",
            "This is an example sentence",
        ];
        let v = m.embed(&texts).unwrap();
        assert_eq!(m.cached(), 4, "each distinct text once");
        // sentence-transformers' all-MiniLM-L6-v2 on its documentation's first example.
        for (got, want) in v[0].iter().zip([0.067_656_9, 0.063_496, 0.048_713_1]) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        for x in &v {
            assert!((dot(x, x) - 1.0).abs() < 1e-5);
        }
        assert_eq!(v[0], v[4]);
        assert!(dot(&v[1], &v[2]) > dot(&v[1], &v[3]) + 0.1);
        // A text seen before is not run again, and comes back the same.
        let again = m.embed(&[texts[3]]).unwrap();
        assert_eq!(again[0], v[3]);
        assert_eq!(m.cached(), 4);
        let err = TextModel::load(Path::new("/nonexistent"), &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}

#[cfg(test)]
mod projection_tests {
    use candle_nn::{VarBuilder, VarMap};

    use super::*;
    use crate::infer::dot;
    use crate::sasrec::{Config, SasRec};

    /// A checkpoint over two items whose item tower reads `text_dim`-wide text (with a
    /// text-alone projection when `text_alone`), in a directory of its own.
    fn checkpoint(text_dim: usize, text_alone: bool) -> std::path::PathBuf {
        let shape = Config {
            num_items: 2,
            max_len: 4,
            hidden: 8,
            heads: 2,
            layers: 1,
            ff: 16,
            dropout: 0.0,
            repeat: false,
            text_dim,
            text_alone,
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let vectors = Tensor::ones((3, text_dim), DType::F32, &Device::Cpu).unwrap();
        // Loading makes the weights (the text projection too) in the varmap.
        let model = SasRec::load(vb.clone(), &shape).unwrap();
        if text_dim > 0 {
            model.with_text(vb, vectors.clone()).unwrap();
        }
        crate::sasrec::init_seeded(&varmap, 1).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "onrec-projection-{text_dim}-{text_alone}-{}",
            std::process::id()
        ));
        let items = ["".to_owned(), "a".to_owned(), "b".to_owned()];
        let text = (text_dim > 0).then_some(&vectors);
        crate::checkpoint::save(&dir, &varmap, &shape, &items, text, &()).unwrap();
        dir
    }

    #[test]
    fn a_checkpoint_without_item_text_cannot_place_items_by_text() {
        let dir = checkpoint(0, false);
        let err = TextProjection::load(Path::new("/nonexistent"), &dir, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("trained without item text"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Needs the model `scripts/fetch-datasets.sh` extracts; `ONREC_TEST_TEXT_MODEL` names
    /// its directory.
    #[test]
    fn a_text_row_is_the_projection_of_the_sentence_vector() {
        let Some(text_model) = std::env::var_os("ONREC_TEST_TEXT_MODEL") else {
            eprintln!("ONREC_TEST_TEXT_MODEL is unset; skipping the text projection test");
            return;
        };
        let text_model = Path::new(&text_model);
        let narrow = checkpoint(16, false);
        let err = TextProjection::load(text_model, &narrow, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("384-wide vectors") && err.contains("16-wide"),
            "{err}"
        );
        let v = TextModel::load(text_model, &Device::Cpu)
            .unwrap()
            .embed(&["forged steel chef knife"])
            .unwrap()
            .remove(0);
        // A checkpoint with a text-alone projection places items with that one.
        for (alone, name) in [(false, "text.proj.weight"), (true, "text.alone.weight")] {
            let dir = checkpoint(384, alone);
            let mut p = TextProjection::load(text_model, &dir, &Device::Cpu).unwrap();
            let rows = p.rows(&["forged steel chef knife"]).unwrap();
            assert_eq!((rows.len(), rows[0].len(), p.hidden()), (1, 8, 8));
            let weight =
                candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
                    .unwrap()
                    .remove(name)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
            for (got, w) in rows[0].iter().zip(&weight) {
                assert!((got - dot(w, &v)).abs() < 1e-5, "{name}");
            }
            std::fs::remove_dir_all(dir).unwrap();
        }
        std::fs::remove_dir_all(narrow).unwrap();
    }

    #[test]
    fn a_withheld_item_of_a_checkpoint_is_scored_by_its_text_alone() {
        let dir = checkpoint(4, true);
        crate::checkpoint::write_withheld(&dir, &["b"]).unwrap();
        let model = crate::checkpoint::load(&dir, &Device::Cpu).unwrap().model;
        let weights =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let weight = |name: &str| weights[name].to_vec2::<f32>().unwrap();
        let (own, proj, alone) = (
            weight("items.weight"),
            weight("text.proj.weight"),
            weight("text.alone.weight"),
        );
        let table = model.folded_item_table().unwrap().to_vec2::<f32>().unwrap();
        // Every text vector is ones, so a projection of it sums each of its rows.
        let sum = |w: &[Vec<f32>], k: usize| w[k].iter().sum::<f32>();
        for k in 0..8 {
            let trained = own[1][k] + sum(&proj, k);
            assert!((table[1][k] - trained).abs() < 1e-5, "a: {}", table[1][k]);
            assert!(
                (table[2][k] - sum(&alone, k)).abs() < 1e-5,
                "b: {}",
                table[2][k]
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[cfg(test)]
mod reading_tests {
    use super::*;

    fn file(name: &str, body: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("onrec-texts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn item_texts_come_from_recbole_item_files_and_catalog_lines() {
        let item = file(
            "films.item",
            "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n\
             1\tToy Story\t1995\tAnimation Children's Comedy\n2\tHeat\t\tAction\n",
        );
        let texts = read_item_texts(&item).unwrap();
        assert_eq!(texts["1"], "Toy Story. 1995. Animation Children's Comedy");
        assert_eq!(texts["2"], "Heat. Action");
        let catalog = file(
            "catalog.jsonl",
            "{\"item_id\":\"sku-1\",\"title\":\"Trail shoe\",\"category\":\"shoes\",\"tags\":[\"running\",\"waterproof\"],\"description\":\"Grips wet rock.\"}\n\n{\"item_id\":\"sku-2\"}\n",
        );
        let texts = read_item_texts(&catalog).unwrap();
        assert_eq!(
            texts["sku-1"],
            "Trail shoe. shoes. running, waterproof. Grips wet rock."
        );
        assert_eq!(texts["sku-2"], "");
        let bad = file("bad.jsonl", "{\"item_id\":\"a\"}\n{\"title\":\"no id\"}\n");
        let err = read_item_texts(&bad).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("item_id"), "{err}");
        let no_id = file("no-id.item", "title:token_seq\nToy Story\n");
        let err = read_item_texts(&no_id).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("no item_id column"),
            "{err}"
        );
    }
}

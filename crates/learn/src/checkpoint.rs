//! Learner checkpoints: everything a restarted learner needs to go on where it stopped.
//!
//! A checkpoint is a generation folder `g<version>-<stamp>/` in the checkpoint directory
//! holding the online and target networks (`online.safetensors`, `target.safetensors`:
//! the dense variables by name plus `items.history` and `items.actions`), the optimiser's
//! moments (`optimizer.safetensors`) and, in the one written at shutdown, the replay
//! buffer (`replay.safetensors`). `learner.json` names the generation, the version, the
//! step counts, the network's shape and the item ids in index order; it is replaced
//! (through a rename) only after the generation is complete, so a crash at any point
//! leaves the previous checkpoint whole. Older generations are removed after.
//!
//! On resume, rows move by item id: an item still in the catalog keeps its embeddings
//! and moments wherever its index is now, a new item starts fresh, and transitions in the
//! replay buffer are renumbered the same way.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::LearnError;
use crate::optim::remap_rows;
use crate::qnet::{ACTION_TABLE, HISTORY_TABLE, ItemTable, Items, QConfig, copy_vars};
use crate::replay::Replay;
use crate::updater::Trainer;

/// The file naming the current generation.
pub const STATE: &str = "learner.json";
/// Online network weights in a generation.
pub const ONLINE: &str = "online.safetensors";
/// Target network weights in a generation.
pub const TARGET: &str = "target.safetensors";
/// Optimiser moments in a generation.
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// The replay buffer, in a generation written at shutdown.
pub const REPLAY: &str = "replay.safetensors";

/// What `learner.json` records.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    generation: String,
    version: u64,
    updates: u64,
    optimizer_steps: u64,
    q: QConfig,
    /// Item ids in index order (index i + 1 is `items[i]`).
    items: Vec<String>,
}

/// How the saved items met the current ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resumed {
    /// Saved items still known, with what was learned of them.
    pub kept: usize,
    /// Current items the checkpoint did not know.
    pub new: usize,
    /// Saved items no longer known.
    pub gone: usize,
}

fn err(path: &Path, e: impl std::fmt::Display) -> LearnError {
    LearnError::Checkpoint(format!("{}: {e}", path.display()))
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>, LearnError> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| err(path, e))
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<(), LearnError> {
    candle_core::safetensors::save(tensors, path).map_err(|e| err(path, e))
}

/// Sets every variable of `varmap` from `saved`.
fn set_vars(
    varmap: &VarMap,
    saved: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<(), LearnError> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|e| LearnError::Train(e.to_string()))?;
    for (name, var) in vars.iter() {
        let value = saved
            .get(name)
            .ok_or_else(|| err(path, format!("lacks {name}")))?;
        var.set(value)
            .map_err(|e| err(path, format!("{name}: {e}")))?;
    }
    Ok(())
}

/// Moves the saved item tables of `saved` into `items` by `place`.
fn set_items(
    items: &mut Items,
    saved: &HashMap<String, Tensor>,
    rows: usize,
    place: &dyn Fn(usize) -> Option<usize>,
    path: &Path,
) -> Result<(), LearnError> {
    for (name, table) in [
        (HISTORY_TABLE, &mut items.history),
        (ACTION_TABLE, &mut items.actions),
    ] {
        let t = saved
            .get(name)
            .ok_or_else(|| err(path, format!("lacks {name}")))?;
        if t.dims() != [rows, table.width()] {
            return Err(err(
                path,
                format!(
                    "{name} has shape {:?}, expected [{rows}, {}]",
                    t.dims(),
                    table.width()
                ),
            ));
        }
        let old = ItemTable::from_values(t.flatten_all()?.to_vec1::<f32>()?, table.width())?;
        remap_rows(&old, table.values_mut(), place);
    }
    Ok(())
}

/// Resumes `trainer` from the checkpoint in `dir`, if there is one.
pub(crate) fn resume(trainer: &mut Trainer, dir: &Path) -> Result<Option<Resumed>, LearnError> {
    let state = dir.join(STATE);
    if !state.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&state).map_err(|e| err(&state, e))?;
    let saved: Saved = serde_json::from_str(&text).map_err(|e| err(&state, e))?;
    if saved.q != trainer.cfg.q {
        return Err(err(
            dir,
            format!(
                "was made for a different Q-network: saved {:?}, configured {:?}",
                saved.q, trainer.cfg.q
            ),
        ));
    }
    let current = trainer.vocabulary.first(trainer.items.len());
    let index: HashMap<&str, usize> = current
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i + 1))
        .collect();
    let moved: Vec<Option<usize>> = saved
        .items
        .iter()
        .map(|id| index.get(id.as_str()).copied())
        .collect();
    let place = |old: usize| {
        old.checked_sub(1)
            .and_then(|i| moved.get(i).copied().flatten())
    };
    let rows = saved.items.len() + 1;
    let generation = dir.join(&saved.generation);

    let path = generation.join(ONLINE);
    let online = load(&path)?;
    set_vars(&trainer.online_vars, &online, &path)?;
    set_items(&mut trainer.items, &online, rows, &place, &path)?;
    let path = generation.join(TARGET);
    let target = load(&path)?;
    set_vars(&trainer.target_vars, &target, &path)?;
    set_items(&mut trainer.target_items, &target, rows, &place, &path)?;
    let path = generation.join(OPTIMIZER);
    trainer
        .opt
        .restore(&load(&path)?, saved.optimizer_steps, &place)
        .map_err(|e| err(&path, e))?;
    let path = generation.join(REPLAY);
    if path.exists() {
        let item = |old: u32| place(old as usize).map_or(0, |r| r as u32);
        trainer.replay = Replay::from_tensors(
            &load(&path)?,
            trainer.cfg.replay_capacity,
            trainer.cfg.q.seed ^ 0x7e91_a7b0,
            &item,
        )
        .map_err(|e| err(&path, e))?;
    }
    trainer.version = saved.version;
    trainer.updates = saved.updates;
    let kept = moved.iter().flatten().count();
    Ok(Some(Resumed {
        kept,
        new: current.len() - kept,
        gone: saved.items.len() - kept,
    }))
}

/// The network's tensors: dense variables by name plus the item tables.
fn network(varmap: &VarMap, items: &Items) -> Result<HashMap<String, Tensor>, LearnError> {
    let mut out = copy_vars(varmap)?;
    out.insert(HISTORY_TABLE.into(), items.history.tensor(&Device::Cpu)?);
    out.insert(ACTION_TABLE.into(), items.actions.tensor(&Device::Cpu)?);
    Ok(out)
}

/// Writes a new generation for `trainer` into `dir`, then points `learner.json` at it and
/// removes older generations; `last` adds the replay buffer.
pub(crate) fn write(trainer: &Trainer, dir: &Path, last: bool) -> Result<(), LearnError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let generation = format!("g{:010}-{stamp:x}", trainer.version);
    let tmp = dir.join(format!("{generation}.tmp"));
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e))?;
    save(
        &network(&trainer.online_vars, &trainer.items)?,
        &tmp.join(ONLINE),
    )?;
    save(
        &network(&trainer.target_vars, &trainer.target_items)?,
        &tmp.join(TARGET),
    )?;
    save(
        &trainer.opt.tensors(trainer.cfg.q.embed)?,
        &tmp.join(OPTIMIZER),
    )?;
    if last && !trainer.replay.is_empty() {
        save(&trainer.replay.tensors()?, &tmp.join(REPLAY))?;
    }
    let done = dir.join(&generation);
    std::fs::rename(&tmp, &done).map_err(|e| err(&done, e))?;
    let saved = Saved {
        generation: generation.clone(),
        version: trainer.version,
        updates: trainer.updates,
        optimizer_steps: trainer.opt.steps(),
        q: trainer.cfg.q.clone(),
        items: trainer.vocabulary.first(trainer.items.len()),
    };
    let state = dir.join(STATE);
    let state_tmp = dir.join(format!("{STATE}.tmp"));
    let text = serde_json::to_string(&saved).map_err(|e| err(&state, e))?;
    std::fs::write(&state_tmp, text).map_err(|e| err(&state_tmp, e))?;
    std::fs::rename(&state_tmp, &state).map_err(|e| err(&state, e))?;
    let entries = std::fs::read_dir(dir).map_err(|e| err(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('g')
            && name != generation
            && entry.path().is_dir()
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            tracing::warn!(path = %entry.path().display(), error = %e, "an old learner checkpoint stays");
        }
    }
    Ok(())
}

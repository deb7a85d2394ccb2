//! Several adapters over one base model: load each once, switch the active one per request, unload,
//! or run the plain base. Switching swaps shared tensor handles; no weights are copied.

use super::adapter::{remove_adapters, Adapter};
use crate::model::CausalLm;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Named adapters checked against one base model.
#[derive(Debug, Default)]
pub struct AdapterBank {
    adapters: BTreeMap<String, Adapter>,
    active: Option<String>,
}

impl AdapterBank {
    /// An empty bank.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the PEFT adapter in `dir` under `name` (replacing an adapter of that name).
    pub fn load(&mut self, name: &str, dir: &Path, model: &CausalLm) -> Result<()> {
        let adapter = Adapter::read(dir, model)?;
        self.adapters.insert(name.to_string(), adapter);
        Ok(())
    }

    /// Forgets `name`; the model keeps running it until another is activated.
    pub fn unload(&mut self, name: &str) -> bool {
        if self.active.as_deref() == Some(name) {
            self.active = None;
        }
        self.adapters.remove(name).is_some()
    }

    /// Names of the loaded adapters.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.adapters.keys().map(String::as_str)
    }

    /// The active adapter's name (None: the base model).
    pub fn active(&self) -> Option<&str> {
        self.active.as_deref()
    }

    /// Makes `name` the model's adapter, or removes all adapters with None.
    pub fn activate(&mut self, model: &mut CausalLm, name: Option<&str>) -> Result<()> {
        match name {
            None => remove_adapters(model),
            Some(n) => {
                let adapter = self.adapters.get(n).ok_or_else(|| {
                    let known: Vec<&str> = self.names().collect();
                    Error::Config(format!(
                        "no adapter named `{n}` is loaded (loaded: {})",
                        known.join(", ")
                    ))
                })?;
                adapter.apply(model)?;
            }
        }
        self.active = name.map(String::from);
        Ok(())
    }
}

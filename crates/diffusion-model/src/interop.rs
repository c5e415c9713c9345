//! Weights of the PyTorch reference (feature `pytorch`): loading a
//! `torch.save`d state_dict or a safetensors file into a [`UNet`], and
//! writing a U-Net as safetensors with the reference's names, loadable by
//! PyTorch.
//!
//! The reference's parameter names are its module paths. One table,
//! [`names`], pairs them with this U-Net's; reading applies it from the
//! reference's side, writing (and naming unexpected keys in errors) from
//! this side. L = number of levels − 1:
//!
//! | reference | here |
//! |---|---|
//! | `class_emb.weight` | `class_embedding.table.weight` |
//! | `downblocks.0.{0,1}.` | `stem.{convnext,attention}.` |
//! | `downblocks.i.{0,1}.` (i = 1..L) | `down_blocks.(i−1).{convnext,attention}.` |
//! | `upblocks.j.{0,1}.` | `up_blocks.j.{convnext,attention}.` |
//! | `downscales.i.`, `upscales.j.`, `final_conv.` | `downsamples.i.`, `upsamples.j.`, `head.` |
//! | ConvNeXt `ds_conv`, `t_fc`, `c_fc`, `sequential.{0,1,3,4}`, `shortcut` | `depthwise`, `time_proj`, `class_proj`, `norm1`, `conv1`, `norm2`, `conv2`, `shortcut` |
//! | attention `gn`, `wx`, `wo` | `norm`, `qkv`, `out` |
//! | GroupNorm `weight`, `bias` | `gamma`, `beta` |
//!
//! Linear weights are transposed ([out, in] there, [in, out] here;
//! burn-store's PyTorch adapters do it). `t_emb`, the fixed time table, is
//! not a parameter here (this U-Net computes it from the same formula):
//! loading ignores it and writing leaves it out, so load a written file
//! into the reference with `load_state_dict(sd, strict=False)`.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn_store::{
    ApplyResult, BurnToPyTorchAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore,
    SafetensorsStore,
};

use crate::params;
use crate::{UNet, UNetConfig};

/// Reading or writing reference weights failed; the message names the file
/// and, for a mismatch, every missing, unexpected or mis-shaped key.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", .path.display())]
pub struct InteropError {
    /// The weights file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

fn error(path: &Path, message: impl Into<String>) -> InteropError {
    InteropError {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Where in a dotted parameter path a [`Rename`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The leading module path.
    Start,
    /// A whole inner component (between dots).
    Inside,
    /// The trailing components (the parameter itself).
    End,
}

/// One pair of the name table: `reference` there is `here` here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    /// Where in the path the pair applies.
    pub at: At,
    /// The reference's name (dot-separated components).
    pub reference: String,
    /// This U-Net's name for it.
    pub here: String,
}

/// Which way names are translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Reference names to this U-Net's (loading).
    FromReference,
    /// This U-Net's names to the reference's (writing).
    ToReference,
}

/// The name table of a U-Net with `levels` levels, in the order it is
/// applied (either way: the parameter renames first, while the module
/// around them still has its own name).
pub fn names(levels: usize) -> Vec<Rename> {
    let pair = |at, reference: String, here: String| Rename { at, reference, here };
    let mut t = Vec::new();
    for (reference, here) in [
        ("sequential.0", "norm1"),
        ("sequential.3", "norm2"),
        ("gn", "norm"),
    ] {
        for (p, q) in [("weight", "gamma"), ("bias", "beta")] {
            t.push(pair(At::End, format!("{reference}.{p}"), format!("{here}.{q}")));
        }
    }
    t.push(pair(
        At::Start,
        "class_emb".into(),
        "class_embedding.table".into(),
    ));
    t.push(pair(At::Start, "downblocks.0.0".into(), "stem.convnext".into()));
    t.push(pair(At::Start, "downblocks.0.1".into(), "stem.attention".into()));
    for i in 1..levels {
        t.push(pair(
            At::Start,
            format!("downblocks.{i}.0"),
            format!("down_blocks.{}.convnext", i - 1),
        ));
        t.push(pair(
            At::Start,
            format!("downblocks.{i}.1"),
            format!("down_blocks.{}.attention", i - 1),
        ));
    }
    for j in 0..levels.saturating_sub(1) {
        t.push(pair(
            At::Start,
            format!("upblocks.{j}.0"),
            format!("up_blocks.{j}.convnext"),
        ));
        t.push(pair(
            At::Start,
            format!("upblocks.{j}.1"),
            format!("up_blocks.{j}.attention"),
        ));
    }
    for (reference, here) in [
        ("downscales", "downsamples"),
        ("upscales", "upsamples"),
        ("final_conv", "head"),
    ] {
        t.push(pair(At::Start, reference.into(), here.into()));
    }
    for (reference, here) in [
        ("ds_conv", "depthwise"),
        ("t_fc", "time_proj"),
        ("c_fc", "class_proj"),
        ("sequential.0", "norm1"),
        ("sequential.1", "conv1"),
        ("sequential.3", "norm2"),
        ("sequential.4", "conv2"),
        ("gn", "norm"),
        ("wx", "qkv"),
        ("wo", "out"),
    ] {
        t.push(pair(At::Inside, reference.into(), here.into()));
    }
    t
}

impl Rename {
    fn sides(&self, direction: Direction) -> (&str, &str) {
        match direction {
            Direction::FromReference => (&self.reference, &self.here),
            Direction::ToReference => (&self.here, &self.reference),
        }
    }

    /// The pair as a (regex, replacement) for burn-store's key remapping.
    pub fn pattern(&self, direction: Direction) -> (String, String) {
        let (from, to) = self.sides(direction);
        let from = from.replace('.', r"\.");
        match self.at {
            At::Start => (format!(r"^{from}\."), format!("{to}.")),
            At::Inside => (format!(r"\.{from}\."), format!(".{to}.")),
            At::End => (format!(r"\.{from}$"), format!(".{to}")),
        }
    }

    /// The pair applied to one name.
    pub fn apply(&self, name: &str, direction: Direction) -> String {
        let (from, to) = self.sides(direction);
        match self.at {
            At::Start => match name.strip_prefix(&format!("{from}.")) {
                Some(rest) => format!("{to}.{rest}"),
                None => name.to_string(),
            },
            At::Inside => name.replace(&format!(".{from}."), &format!(".{to}.")),
            At::End => match name.strip_suffix(&format!(".{from}")) {
                Some(rest) => format!("{rest}.{to}"),
                None => name.to_string(),
            },
        }
    }
}

/// A name translated with the whole table.
pub fn translate(name: &str, levels: usize, direction: Direction) -> String {
    names(levels)
        .iter()
        .fold(name.to_string(), |name, rename| rename.apply(&name, direction))
}

/// The table as burn-store's key remapping, one way.
pub fn patterns(levels: usize, direction: Direction) -> Vec<(String, String)> {
    names(levels).iter().map(|r| r.pattern(direction)).collect()
}

/// One error listing every missing, unexpected or mis-shaped key.
/// Unexpected keys are named as in the file (the table undone).
fn check(result: &ApplyResult, file: &Path, levels: usize) -> Result<(), InteropError> {
    let missing: Vec<String> = result.missing.iter().map(|(path, _)| path.clone()).collect();
    let unused: Vec<String> = result
        .unused
        .iter()
        .filter(|k| k.as_str() != "t_emb")
        .map(|k| translate(k, levels, Direction::ToReference))
        .collect();
    let errors: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
    if missing.is_empty() && unused.is_empty() && errors.is_empty() {
        return Ok(());
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "missing keys (this U-Net's names): {}",
            missing.join(", ")
        ));
    }
    if !unused.is_empty() {
        parts.push(format!(
            "unexpected keys (the file's names): {}",
            unused.join(", ")
        ));
    }
    if !errors.is_empty() {
        parts.push(errors.join("; "));
    }
    Err(error(
        file,
        format!(
            "does not match the U-Net configuration; {}. Pass --config with the reference run's widths, strides, mult, embedding width and T",
            parts.join("; ")
        ),
    ))
}

/// Loads reference weights (.pt or .safetensors, by extension) into a U-Net.
pub fn load_reference<B: Backend>(
    config: &UNetConfig,
    file: &Path,
    device: &B::Device,
) -> Result<UNet<B>, InteropError> {
    let model = config.init::<B>(device).map_err(|e| error(file, e.to_string()))?;
    load_reference_into(model, file)
}

/// Loads reference weights into `model`, a U-Net built from the
/// configuration the file is expected to match. Every name, shape, dtype
/// and value is checked: one error lists every mismatch, a corrupt file
/// is an error (not a panic), and non-finite weights are refused.
pub fn load_reference_into<B: Backend>(mut model: UNet<B>, file: &Path) -> Result<UNet<B>, InteropError> {
    let levels = model.downsamples.len() + 1;
    let expected = params::describe(&model);
    let is_safetensors = file.extension().is_some_and(|e| e == "safetensors");
    let result = if is_safetensors {
        let mut store = SafetensorsStore::from_file(file.to_path_buf())
            .with_from_adapter(PyTorchToBurnAdapter)
            .allow_partial(true)
            .validate(false)
            .map_indices_contiguous(false);
        for (from, to) in patterns(levels, Direction::FromReference) {
            store = store.with_key_remapping(from, to);
        }
        check_dtypes(&mut store, file)?;
        guarded(file, || model.load_from(&mut store))?
            .map_err(|e| error(file, format!("cannot read safetensors: {e}")))?
    } else {
        let mut store = PytorchStore::from_file(file.to_path_buf())
            .allow_partial(true)
            .validate(false)
            .map_indices_contiguous(false);
        for (from, to) in patterns(levels, Direction::FromReference) {
            store = store.with_key_remapping(from, to);
        }
        check_dtypes(&mut store, file)?;
        guarded(file, || model.load_from(&mut store))?.map_err(|e| {
            error(
                file,
                format!("cannot read a PyTorch state_dict (torch.save(model.state_dict(), path)): {e}"),
            )
        })?
    };
    check(&result, file, levels)?;
    if let Some(detail) = params::mismatch(&expected, &params::describe(&model)) {
        return Err(error(file, format!("does not fit the model: {detail}")));
    }
    if let Some(param) = params::first_non_finite(&model) {
        return Err(error(
            file,
            format!("the weights hold NaN or infinite values (first in {param}); they cannot be used"),
        ));
    }
    Ok(model)
}

/// burn-store's decoding with its panics turned into an error naming the
/// file.
fn guarded<T>(file: &Path, decode: impl FnOnce() -> T) -> Result<T, InteropError> {
    params::decode_guarded(decode).map_err(|reason| error(file, format!("cannot read the weights: {reason}")))
}

/// Refuses a file in which a tensor is not floating point, before any
/// tensor is built: burn-store panics on such a tensor ("Expected float
/// dtype"), and in burn 0.21 that panic, raised while the store holds its
/// tensors, ends the process with SIGSEGV instead of an error.
fn check_dtypes<S: ModuleStore>(store: &mut S, file: &Path) -> Result<(), InteropError>
where
    S::Error: std::fmt::Display,
{
    let snapshots = guarded(file, || store.get_all_snapshots())?
        .map_err(|e| error(file, format!("cannot read the tensors: {e}")))?;
    for (name, snapshot) in snapshots {
        if !snapshot.dtype.is_float() {
            return Err(error(
                file,
                format!(
                    "tensor {name} holds {:?} values; weights must be floating point (save the model's float state_dict)",
                    snapshot.dtype
                ),
            ));
        }
    }
    Ok(())
}

/// Writes a U-Net's weights as safetensors with the reference's names.
pub fn save_reference<B: Backend>(model: &UNet<B>, file: &Path) -> Result<(), InteropError> {
    let levels = model.downsamples.len() + 1;
    let mut store = SafetensorsStore::from_file(file.to_path_buf())
        .with_to_adapter(BurnToPyTorchAdapter)
        .overwrite(true)
        .map_indices_contiguous(false);
    for (from, to) in patterns(levels, Direction::ToReference) {
        store = store.with_key_remapping(from, to);
    }
    model
        .save_into(&mut store)
        .map_err(|e| error(file, format!("cannot write safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name of the table goes there and back unchanged, and the
    /// regexes burn-store applies agree with the table applied by hand.
    #[test]
    fn the_table_and_its_inverse_agree() {
        let names_here = [
            "stem.convnext.norm1.gamma",
            "down_blocks.2.attention.norm.beta",
            "up_blocks.1.convnext.conv2.weight",
            "class_embedding.table.weight",
            "head.bias",
            "downsamples.0.weight",
            "up_blocks.0.attention.qkv.weight",
            "down_blocks.0.convnext.time_proj.bias",
        ];
        let reference = [
            "downblocks.0.0.sequential.0.weight",
            "downblocks.3.1.gn.bias",
            "upblocks.1.0.sequential.4.weight",
            "class_emb.weight",
            "final_conv.bias",
            "downscales.0.weight",
            "upblocks.0.1.wx.weight",
            "downblocks.1.0.t_fc.bias",
        ];
        let by_regex = |name: &str, direction| {
            patterns(4, direction)
                .iter()
                .fold(name.to_string(), |name, (from, to)| {
                    regex::Regex::new(from)
                        .unwrap()
                        .replace_all(&name, to.as_str())
                        .into_owned()
                })
        };
        for (here, there) in names_here.iter().zip(reference) {
            assert_eq!(translate(here, 4, Direction::ToReference), there);
            assert_eq!(translate(there, 4, Direction::FromReference), *here);
            assert_eq!(by_regex(here, Direction::ToReference), there);
            assert_eq!(by_regex(there, Direction::FromReference), *here);
        }
    }
}

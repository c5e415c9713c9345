//! Finding, loading and downloading the training data.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use diffusion_data::{DatasetName, ImageSet, Split};

use crate::progress;

/// `diffusion download`.
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// Which data set.
    #[arg(value_enum, default_value = "mnist")]
    pub dataset: DatasetArg,
    /// Folder to put the four IDX files in (default: $DIFFUSION_DATA_DIR/DATASET,
    /// else ~/.cache/diffusion-rs/DATASET, where `train --dataset` looks).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// clap's view of the data sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetArg {
    Mnist,
    FashionMnist,
}

impl From<DatasetArg> for DatasetName {
    fn from(d: DatasetArg) -> Self {
        match d {
            DatasetArg::Mnist => DatasetName::Mnist,
            DatasetArg::FashionMnist => DatasetName::FashionMnist,
        }
    }
}

/// The repository's `data/` folder: the one of the source tree this
/// binary was built from, when it is still there, else `./data`.
pub fn repo_data_dir() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("..")
        .join("data");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("data")
    }
}

/// The folder a data set is read from: `--data-dir`, else the
/// repository's copy (`data/<name>`: MNIST is bundled) when it holds the
/// data set, else the library's default folder (`$DIFFUSION_DATA_DIR/<name>`
/// or `~/.cache/diffusion-rs/<name>`), where a missing data set is
/// downloaded.
pub fn resolve_dir(name: DatasetName, dir: Option<&Path>) -> PathBuf {
    if let Some(d) = dir {
        return d.to_path_buf();
    }
    let bundled = repo_data_dir().join(name.as_str());
    if diffusion_data::is_present(&bundled) {
        bundled
    } else {
        diffusion_data::default_dir(name)
    }
}

/// Loads a split, downloading the data set first when it is missing and no
/// folder was given explicitly. Prints the loader's warnings.
pub fn load(name: DatasetName, dir: Option<&Path>, split: Split) -> Result<ImageSet> {
    let folder = resolve_dir(name, dir);
    if dir.is_none() && !diffusion_data::is_present(&folder) {
        eprintln!("{name} is not in {}; downloading it", folder.display());
        fetch(name, &folder)?;
    }
    // A folder the user names may hold any IDX data (unknown checksums only
    // warn); the default folder must hold exactly the named data set.
    let set = match dir {
        Some(_) => diffusion_data::load_split(&folder, split)?,
        None => diffusion_data::load_named(name, &folder, split)?,
    };
    for warning in &set.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(set)
}

fn fetch(name: DatasetName, folder: &Path) -> Result<()> {
    let bar = progress::bar(0, "bytes");
    let mirrors = diffusion_data::canonical_mirrors(name);
    diffusion_data::download(name, folder, &mirrors, &mut |p| {
        if let Some(total) = p.total {
            bar.set_length(total);
        }
        bar.set_position(p.downloaded);
        bar.set_message(p.file.clone());
    })
    .with_context(|| format!("downloading {name} into {}", folder.display()))?;
    bar.finish_and_clear();
    Ok(())
}

pub fn download(args: DownloadArgs) -> Result<i32> {
    let name: DatasetName = args.dataset.into();
    let folder = args.data_dir.unwrap_or_else(|| resolve_dir(name, None));
    if diffusion_data::is_present(&folder) {
        say!("{name} is already in {}", folder.display());
        return Ok(0);
    }
    fetch(name, &folder)?;
    say!("{name} downloaded and verified into {}", folder.display());
    Ok(0)
}

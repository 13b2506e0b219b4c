//! Finding a model folder: a path, or a hub id (`org/name`) resolved in the local Hugging Face
//! cache. Never any network access.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

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
        bail!("model {spec:?}: no such folder (and not a hub id of the form org/name)");
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
}

//! Models from the Hugging Face Hub, for users with internet: a model path `hf:ORG/REPO[@REVISION]`
//! names a safetensors checkpoint, `hf:ORG/REPO[@REVISION]:FILE.gguf` one GGUF file. Files land in the
//! standard hub cache (`HF_HOME`, shared with Python tools); with `HF_HUB_OFFLINE=1` only that cache is
//! read. Tests never reach a hub: they resolve from a cache laid out on disk.
use std::path::PathBuf;

use crate::error::{HearthError, Result};
use hf_hub::{Cache, Repo, RepoType};

const PREFIX: &str = "hf:";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub revision: String,
    /// One file (a GGUF); None: a safetensors checkpoint.
    pub file: Option<String>,
}

impl std::fmt::Display for HubSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}@{}", self.repo, self.revision)?;
        match &self.file {
            Some(file) => write!(f, ":{file}"),
            None => Ok(()),
        }
    }
}

/// `None` when `s` is not a hub name (an ordinary path); else the parsed name or why it is malformed.
pub fn parse(s: &str) -> Option<Result<HubSpec>> {
    let rest = s.strip_prefix(PREFIX)?;
    let bad = |why: &str| {
        Some(Err(HearthError::ModelNotFound(format!(
            "{s}: {why} (expected hf:ORG/REPO[@REVISION][:FILE])"
        ))))
    };
    let (name, file) = match rest.split_once(':') {
        Some((n, f)) if !f.is_empty() => (n, Some(f.to_string())),
        Some(_) => return bad("empty file name"),
        None => (rest, None),
    };
    let (repo, revision) = match name.split_once('@') {
        Some((r, v)) if !v.is_empty() => (r, v.to_string()),
        Some(_) => return bad("empty revision"),
        None => (name, "main".to_string()),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        return bad("the repository must be ORG/REPO");
    }
    Some(Ok(HubSpec {
        repo: repo.to_string(),
        revision,
        file,
    }))
}

/// Whether `HF_HUB_OFFLINE` asks for the cache only.
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Where one repository's files come from: the hub (downloading into the cache; the file list asked
/// once, so optional files are skipped without a failed request) or the cache alone.
enum Source {
    Cache(hf_hub::CacheRepo),
    Hub {
        api: hf_hub::api::sync::ApiRepo,
        files: Vec<String>,
    },
}

impl Source {
    fn get(&self, spec: &HubSpec, file: &str) -> Result<Option<PathBuf>> {
        match self {
            Self::Cache(c) => Ok(c.get(file)),
            Self::Hub { files, .. } if !files.iter().any(|f| f == file) => Ok(None),
            Self::Hub { api, .. } => api
                .get(file)
                .map(Some)
                .map_err(|e| HearthError::ModelNotFound(format!("{spec}: {file}: {e}"))),
        }
    }

    fn require(&self, spec: &HubSpec, file: &str) -> Result<PathBuf> {
        self.get(spec, file)?.ok_or_else(|| {
            HearthError::ModelNotFound(match self {
                Self::Cache(_) => {
                    format!("{spec}: {file} is not in the hub cache (HF_HUB_OFFLINE is set)")
                }
                Self::Hub { .. } => format!("{spec}: the repository has no {file}"),
            })
        })
    }
}

/// Local path of the model `spec` names: the GGUF file, or the folder of a safetensors checkpoint
/// (config.json, tokenizer files and every weight shard fetched).
pub fn resolve(spec: &HubSpec, cache: Cache, offline: bool) -> Result<PathBuf> {
    let repo = Repo::with_revision(spec.repo.clone(), RepoType::Model, spec.revision.clone());
    let source = if offline {
        Source::Cache(cache.repo(repo))
    } else {
        // Download progress bars (hf-hub's, through indicatif) only where someone watches them.
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
            .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .build()
            .map_err(|e| HearthError::ModelNotFound(format!("{spec}: {e}")))?;
        let api = api.repo(repo);
        let info = api
            .info()
            .map_err(|e| HearthError::ModelNotFound(format!("{spec}: {e}")))?;
        Source::Hub {
            api,
            files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
        }
    };
    if let Some(file) = &spec.file {
        return source.require(spec, file);
    }
    let config = source.require(spec, "config.json")?;
    source.require(spec, "tokenizer.json")?;
    source.get(spec, "tokenizer_config.json")?;
    match source.get(spec, "model.safetensors.index.json")? {
        Some(index) => {
            for s in super::safetensors::shard_files(&index)? {
                source.require(spec, &s)?;
            }
        }
        None => {
            source.require(spec, "model.safetensors")?;
        }
    }
    config
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| HearthError::ModelNotFound(format!("{spec}: no snapshot folder")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_malformed_ones_say_why() {
        assert!(parse("models/x.gguf").is_none());
        let s = parse("hf:org/repo").unwrap().unwrap();
        assert_eq!(
            (s.repo.as_str(), s.revision.as_str(), s.file),
            ("org/repo", "main", None)
        );
        let s = parse("hf:org/repo@v2:m-q4.gguf").unwrap().unwrap();
        assert_eq!(s.revision, "v2");
        assert_eq!(s.file.as_deref(), Some("m-q4.gguf"));
        assert_eq!(s.to_string(), "hf:org/repo@v2:m-q4.gguf");
        for bad in ["hf:", "hf:repo", "hf:a/b/c", "hf:/b", "hf:a/b@", "hf:a/b:"] {
            let e = parse(bad).unwrap().unwrap_err().to_string();
            assert!(e.contains("hf:ORG/REPO"), "{bad}: {e}");
        }
    }

    /// A cache laid out as the hub client leaves it: refs/<revision> holds the commit, files sit in
    /// snapshots/<commit>/.
    fn fake_cache(root: &std::path::Path, repo: &str, files: &[&str]) {
        let dir = root.join(format!("models--{}", repo.replace('/', "--")));
        std::fs::create_dir_all(dir.join("refs")).unwrap();
        std::fs::write(dir.join("refs/main"), "0123abcd").unwrap();
        let snap = dir.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snap).unwrap();
        for f in files {
            std::fs::write(snap.join(f), "{}").unwrap();
        }
    }

    #[test]
    fn offline_resolution_reads_the_cache_and_names_what_is_missing() {
        let root = std::env::temp_dir().join(format!("hearth-hub-{}", std::process::id()));
        fake_cache(
            &root,
            "org/st",
            &["config.json", "tokenizer.json", "model.safetensors"],
        );
        fake_cache(&root, "org/half", &["config.json", "tokenizer.json"]);
        let spec = parse("hf:org/st").unwrap().unwrap();
        let dir = resolve(&spec, Cache::new(root.clone()), true).unwrap();
        assert!(dir.join("model.safetensors").exists());
        let spec = parse("hf:org/half").unwrap().unwrap();
        let e = resolve(&spec, Cache::new(root.clone()), true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        let spec = parse("hf:org/st:model-q4.gguf").unwrap().unwrap();
        assert!(resolve(&spec, Cache::new(root.clone()), true).is_err());
        std::fs::remove_dir_all(&root).ok();
    }
}

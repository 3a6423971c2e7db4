//! Keeps the dev profile's build-time crates unoptimised.
//!
//! The workspace builds its dependencies at -O2 in dev (`[profile.dev.package."*"]`), and
//! that rule outranks `[profile.dev.build-override]`, so a proc macro or build-script crate
//! is built at -O0 only when the manifest names it. A new dependency that brings a proc
//! macro would otherwise quietly add minutes of compiling to every CI run.

use crate::command::root;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::process::Command;

/// Fails, with the lines to add, when a package that only runs at build time is not given
/// `opt-level = 0` in the workspace manifest.
pub fn check() -> Result<()> {
    println!("\n==> build-time crates at opt-level 0 in the dev profile");
    let metadata = cargo_metadata()?;
    let manifest = std::fs::read_to_string(root().join("Cargo.toml"))
        .context("reading the workspace Cargo.toml")?;
    let unoptimised = unoptimised_in_dev(&manifest)?;
    let missing: Vec<String> = build_time_only(&metadata)?
        .into_iter()
        .filter(|name| !unoptimised.contains(name))
        .collect();
    if !missing.is_empty() {
        let lines: String = missing
            .iter()
            .map(|name| format!("[profile.dev.package.{name}]\nopt-level = 0\n"))
            .collect();
        bail!(
            "these crates run only at build time but the dev profile's \"*\" rule builds them \
             at -O2; add to Cargo.toml:\n{lines}"
        );
    }
    println!("every build-time-only crate is built unoptimised");
    Ok(())
}

/// `cargo metadata` for the host platform, parsed (also read by `test-aarch64` for test targets).
pub(crate) fn cargo_metadata() -> Result<Value> {
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("cannot run rustc")?;
    let rustc = String::from_utf8_lossy(&rustc.stdout);
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("rustc -vV printed no host")?;
    let metadata = crate::command::cargo_stdout(&[
        "metadata",
        "--format-version",
        "1",
        "--filter-platform",
        host,
    ])?;
    serde_json::from_str(&metadata).context("parsing cargo metadata")
}

/// Names given `opt-level = 0` in a `[profile.dev.package.NAME]` table of `manifest`.
fn unoptimised_in_dev(manifest: &str) -> Result<HashSet<String>> {
    let manifest: toml::Table = toml::from_str(manifest).context("parsing Cargo.toml")?;
    let Some(packages) = manifest
        .get("profile")
        .and_then(|p| p.get("dev"))
        .and_then(|d| d.get("package"))
        .and_then(toml::Value::as_table)
    else {
        return Ok(HashSet::new());
    };
    Ok(packages
        .iter()
        .filter(|(_, table)| table.get("opt-level") == Some(&toml::Value::Integer(0)))
        .map(|(name, _)| name.clone())
        .collect())
}

/// Packages reached only through proc macros or build dependencies, never from the
/// workspace's own code at run time.
fn build_time_only(metadata: &Value) -> Result<BTreeSet<String>> {
    let graph = Graph::new(metadata)?;
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .context("metadata without workspace members")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let run_time = graph.reach(members, |dep, runtime| runtime && !graph.is_proc_macro(dep));
    // Every proc macro and build dependency, and whatever they depend on.
    let build_roots: Vec<&str> = graph
        .nodes
        .keys()
        .flat_map(|&id| graph.edges(id))
        .filter(|&(dep, runtime)| !runtime || graph.is_proc_macro(dep))
        .map(|(dep, _)| dep)
        .collect();
    let build_time = graph.reach(build_roots, |_, _| true);
    Ok(build_time
        .difference(&run_time)
        .filter_map(|id| Some(graph.packages.get(id)?["name"].as_str()?.to_string()))
        .collect())
}

/// `cargo metadata`'s packages and resolved dependency graph, by package id.
struct Graph<'a> {
    packages: HashMap<&'a str, &'a Value>,
    nodes: HashMap<&'a str, &'a Value>,
}

impl<'a> Graph<'a> {
    fn new(metadata: &'a Value) -> Result<Self> {
        let by_id = |list: &'a Value| -> Option<HashMap<&'a str, &'a Value>> {
            Some(
                list.as_array()?
                    .iter()
                    .filter_map(|v| Some((v["id"].as_str()?, v)))
                    .collect(),
            )
        };
        Ok(Self {
            packages: by_id(&metadata["packages"]).context("metadata without packages")?,
            nodes: by_id(&metadata["resolve"]["nodes"])
                .context("metadata without a resolve graph")?,
        })
    }

    fn is_proc_macro(&self, id: &str) -> bool {
        self.packages.get(id).is_some_and(|p| {
            p["targets"].as_array().is_some_and(|targets| {
                targets.iter().any(|t| {
                    t["kind"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "proc-macro"))
                })
            })
        })
    }

    /// (dependency id, whether it is a normal or dev dependency) for each edge out of `id`.
    fn edges(&self, id: &str) -> Vec<(&'a str, bool)> {
        let Some(deps) = self.nodes.get(id).and_then(|n| n["deps"].as_array()) else {
            return Vec::new();
        };
        deps.iter()
            .filter_map(|d| {
                let runtime = d["dep_kinds"]
                    .as_array()?
                    .iter()
                    .any(|k| k["kind"].is_null() || k["kind"] == "dev");
                Some((d["pkg"].as_str()?, runtime))
            })
            .collect()
    }

    /// Every package reachable from `roots` along the edges `follow` accepts.
    fn reach(&self, roots: Vec<&'a str>, follow: impl Fn(&str, bool) -> bool) -> HashSet<&'a str> {
        let mut seen = HashSet::new();
        let mut stack = roots;
        while let Some(id) = stack.pop() {
            if seen.insert(id) {
                stack.extend(
                    self.edges(id)
                        .into_iter()
                        .filter(|&(dep, runtime)| follow(dep, runtime))
                        .map(|(dep, _)| dep),
                );
            }
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_unoptimised_dev_tables() {
        let manifest = "[profile.dev.package.\"*\"]\nopt-level = 2\n\
                        [profile.dev.package.syn]\nopt-level = 0\n\
                        [profile.dev.package.uhlm-model]\nopt-level = 3\n\
                        [profile.release.package.quote]\nopt-level = 0\n";
        let names = unoptimised_in_dev(manifest).unwrap();
        assert_eq!(names, HashSet::from(["syn".to_string()]));
    }

    #[test]
    fn finds_crates_reached_only_through_proc_macros() {
        let dep =
            |pkg: &str, kind: Value| serde_json::json!({"pkg": pkg, "dep_kinds": [{"kind": kind}]});
        let lib =
            |id: &str| serde_json::json!({"id": id, "name": id, "targets": [{"kind": ["lib"]}]});
        let metadata = serde_json::json!({
            "workspace_members": ["app"],
            "packages": [
                lib("app"), lib("serde"), lib("syn"), lib("cc"),
                {"id": "derive", "name": "derive", "targets": [{"kind": ["proc-macro"]}]},
            ],
            "resolve": {"nodes": [
                {"id": "app", "deps": [dep("serde", Value::Null), dep("derive", Value::Null), dep("cc", "build".into())]},
                {"id": "derive", "deps": [dep("syn", Value::Null), dep("serde", Value::Null)]},
                {"id": "serde", "deps": []},
                {"id": "syn", "deps": []},
                {"id": "cc", "deps": []},
            ]},
        });
        let names: Vec<String> = build_time_only(&metadata).unwrap().into_iter().collect();
        assert_eq!(names, ["cc", "derive", "syn"]);
    }
}

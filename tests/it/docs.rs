//! Checks that keep the code's shape and its generated docs honest.

use std::fs;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `docs/configuration.md` is generated from the table `--help` prints.
/// A stale file fails; `UPDATE_DOCS=1` (what `make docs` sets) writes it.
#[test]
fn the_configuration_docs_are_generated_from_the_config_table() {
    let path = root().join("docs/configuration.md");
    let want = ingestd::cli::configuration_markdown();
    let have = fs::read_to_string(&path).unwrap_or_default();
    if have == want {
        return;
    }
    if std::env::var_os("UPDATE_DOCS").is_some() {
        fs::write(&path, &want).expect("write docs/configuration.md");
        return;
    }
    panic!(
        "docs/configuration.md is stale: run `make docs` and commit it \
         (first difference at byte {})",
        have.bytes()
            .zip(want.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(have.len().min(want.len()))
    );
}

/// Every variable is in `--help` and in the generated docs.
#[test]
fn every_variable_is_in_help_and_in_the_docs() {
    let help = ingestd::Config::help();
    let docs = ingestd::cli::configuration_markdown();
    for v in ingestd::config::VARS {
        assert!(help.contains(v.name), "{} missing from --help", v.name);
        assert!(
            docs.contains(&format!("| `{}` |", v.name)),
            "{} missing from docs",
            v.name
        );
    }
}

/// The roles (`api`, `relay`, `worker`) never import one another: they
/// meet only through the store and the broker, and `app.rs` wires them.
/// Only `api/` names tiny_http.
#[test]
fn no_role_imports_another_and_only_the_api_names_tiny_http() {
    let src = root().join("src");
    let mut violations = Vec::new();
    for file in rust_files(&src) {
        let relative = file.strip_prefix(&src).unwrap().display().to_string();
        let text = fs::read_to_string(&file).unwrap();
        violations.extend(crossings(&relative, &text));
    }
    assert!(
        violations.is_empty(),
        "boundaries crossed:\n{}",
        violations.join("\n")
    );
}

/// The check catches what it looks for, and leaves the wiring alone.
#[test]
fn the_boundary_check_catches_a_role_importing_another() {
    assert_eq!(
        crossings("api/handlers.rs", "use crate::relay::Relay;\n"),
        ["api/handlers.rs:1: api names relay"]
    );
    assert_eq!(
        crossings("worker/mod.rs", "    crate::api::error::refusal(r)\n"),
        ["worker/mod.rs:1: worker names api"]
    );
    assert_eq!(
        crossings("relay/mod.rs", "use tiny_http::Server;\n"),
        ["relay/mod.rs:1: names tiny_http"]
    );
    assert!(crossings("app.rs", "use crate::relay::{self, Relay};\n").is_empty());
    assert!(crossings("api/head.rs", "use crate::api::auth;\n").is_empty());
    assert!(crossings("relay/mod.rs", "// see crate::worker::consumer\n").is_empty());
    let files = rust_files(&root().join("src"));
    for role in ["api", "relay", "worker", "store", "ops"] {
        assert!(
            files
                .iter()
                .any(|f| f.starts_with(root().join("src").join(role))),
            "no files under src/{role}"
        );
    }
}

/// The lines of one file (`relative` to `src/`) that cross a boundary.
fn crossings(relative: &str, text: &str) -> Vec<String> {
    const ROLES: [&str; 3] = ["api", "relay", "worker"];
    let folder = relative.split('/').next().unwrap_or("");
    let in_role = relative.contains('/') && ROLES.contains(&folder);
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for role in ROLES {
            let named = [
                format!("crate::{role}::"),
                format!("crate::{role};"),
                format!("crate::{role}}}"),
                format!("crate::{role},"),
                format!("crate::{{{role}"),
            ]
            .iter()
            .any(|p| code.contains(p.as_str()));
            if named && in_role && folder != role {
                found.push(format!("{relative}:{}: {folder} names {role}", n + 1));
            }
        }
        if code.contains("tiny_http") && folder != "api" {
            found.push(format!("{relative}:{}: names tiny_http", n + 1));
        }
    }
    found
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

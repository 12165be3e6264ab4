//! Records the git revision for `ingestd --version`.

use std::process::Command;

fn main() {
    // A build without .git (a container build) may pass the revision in.
    let given = std::env::var("INGESTD_GIT_REVISION")
        .ok()
        .filter(|s| !s.is_empty());
    let revision = given
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown revision".to_string());
    println!("cargo:rustc-env=INGESTD_GIT_REVISION={revision}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=INGESTD_GIT_REVISION");
}

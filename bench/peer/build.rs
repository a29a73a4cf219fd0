//! Records the resolved versions of cqrs-es and postgres-es (from Cargo.lock) for the JSON output.

use std::fs;

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = fs::read_to_string("Cargo.lock").unwrap_or_default();
    for (name, var) in [
        ("cqrs-es", "PEER_CQRS_ES_VERSION"),
        ("postgres-es", "PEER_POSTGRES_ES_VERSION"),
    ] {
        let version = locked_version(&lock, name).unwrap_or_else(|| "unknown".into());
        println!("cargo:rustc-env={var}={version}");
    }
}

/// The `version` of the `[[package]]` called `name` in a Cargo.lock.
fn locked_version(lock: &str, name: &str) -> Option<String> {
    let wanted = format!("name = \"{name}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == wanted {
            let next = lines.next()?.trim();
            return next
                .strip_prefix("version = \"")
                .and_then(|v| v.strip_suffix('"'))
                .map(str::to_owned);
        }
    }
    None
}

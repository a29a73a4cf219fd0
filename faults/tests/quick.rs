//! The short profile of the fault-injection suite (`faults --quick`) as a test, so that
//! `cargo test --workspace` (scripts/test, CI) runs it. It starts Kafka clusters of its own on
//! ports 19092.. (FAULTS_KAFKA_PORT), never the shared broker, and needs Java for them: without
//! Java it is skipped with a message. It runs the `command-service` and `projection-service`
//! binaries beside the `faults` binary, which `cargo test --workspace` builds (with
//! `cargo test -p faults` alone, build them first: `cargo build -p command-service -p projection-service`).

use std::path::PathBuf;
use std::process::{Command, Stdio};

#[test]
fn the_quick_profile_loses_nothing_and_duplicates_nothing() {
    if Command::new("java")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!(
            "SKIPPED: the fault-injection suite needs Java for its own Kafka brokers (scripts/kafka); install Java 17+"
        );
        return;
    }
    let faults = PathBuf::from(env!("CARGO_BIN_EXE_faults"));
    let bin_dir = faults.parent().expect("the binary's directory");
    for binary in ["command-service", "projection-service"] {
        assert!(
            bin_dir.join(binary).exists(),
            "{} is missing: run `cargo build -p command-service -p projection-service` (or the whole workspace's tests)",
            bin_dir.join(binary).display()
        );
    }
    let out = Command::new(&faults)
        .arg("--quick")
        .stderr(Stdio::inherit())
        .output()
        .expect("running the faults binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout.lines().last().unwrap_or_default();
    eprintln!("{summary}");
    assert!(
        summary.contains(" runs, ") && summary.contains(" commands: "),
        "no summary line; stdout: {stdout}"
    );
    assert!(
        summary.contains(
            "lost 0, duplicated 0, version gaps 0, missing results 0, read model == replay"
        ),
        "{summary}"
    );
    assert!(
        out.status.success(),
        "the suite found a defect (see the notes above): {summary}"
    );
}

//! The namespace testbed of `scripts/testbed.sh` from a test: hosts with a
//! name and subnet of the test's own, removed when dropped; None, with the
//! reason on stderr, where there is no root or no network namespaces.

use std::path::Path;
use std::process::{Command, Output};

use livemig::util::skip::cannot_run;

pub struct Testbed {
    pub prefix: String,
    pub subnet: String,
}

impl Testbed {
    /// `testbed.sh up` with `args` (hosts, rates, groups).
    pub fn up(prefix: String, subnet: String, args: &[&str]) -> Option<Self> {
        // SAFETY: geteuid cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            cannot_run("needs root to make network namespaces");
            return None;
        }
        let bed = Testbed { prefix, subnet };
        let out = bed.run("up", args);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Operation not permitted") || err.contains("not supported") {
                cannot_run(format_args!(
                    "the kernel cannot make network namespaces here: {err}"
                ));
                return None;
            }
            panic!("testbed up failed: {err}");
        }
        Some(bed)
    }

    /// `testbed.sh CMD` on this testbed.
    pub fn run(&self, cmd: &str, extra: &[&str]) -> Output {
        Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/testbed.sh"))
            .args([cmd, "--prefix", &self.prefix, "--subnet", &self.subnet])
            .args(extra)
            .output()
            .unwrap()
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: u32) -> String {
        format!("{}-h{i}", self.prefix)
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: u32) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let out = self.run("down", &[]);
        // Not while a failed test unwinds: a second panic would abort.
        if !std::thread::panicking() {
            assert!(out.status.success(), "testbed down failed");
        }
    }
}

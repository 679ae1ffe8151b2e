//! Reading a saved report back (`livemig report`, `livemig plot`).
//!
//! A file is a livemig report when it is a JSON object with a
//! `report_version` no newer than [`REPORT_VERSION`], or, written before
//! that key existed, with the keys every report has always had. Anything
//! else is refused with one line naming the file and why.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::report::{Report, REPORT_VERSION};

/// Keys every livemig report has carried since the first version.
const ALWAYS: [&str; 4] = ["status", "mode", "rounds", "transferred_bytes"];

/// Why a saved report cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not JSON", path.display())]
    NotJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} is not a livemig migration report (no {missing:?} key)", path.display())]
    NotReport {
        path: PathBuf,
        missing: &'static str,
    },
    #[error(
        "{} is a report of version {version}, newer than this livemig reads ({REPORT_VERSION}): use a newer livemig",
        path.display()
    )]
    Newer { path: PathBuf, version: u64 },
    #[error("{} is a livemig report with a bad field", path.display())]
    BadField {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Read the report saved at `path` (`--json FILE`).
pub fn load(path: &Path) -> Result<Report, SavedError> {
    let text = std::fs::read_to_string(path).map_err(|source| SavedError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text).map_err(|e| e.at(path))
}

/// A [`SavedError`] before it knows its file.
enum Why {
    NotJson(serde_json::Error),
    NotReport(&'static str),
    Newer(u64),
    BadField(serde_json::Error),
}

impl Why {
    fn at(self, path: &Path) -> SavedError {
        let path = path.to_path_buf();
        match self {
            Why::NotJson(source) => SavedError::NotJson { path, source },
            Why::NotReport(missing) => SavedError::NotReport { path, missing },
            Why::Newer(version) => SavedError::Newer { path, version },
            Why::BadField(source) => SavedError::BadField { path, source },
        }
    }
}

fn parse(text: &str) -> Result<Report, Why> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(Why::NotJson)?;
    let Some(obj) = value.as_object() else {
        return Err(Why::NotReport("status"));
    };
    let versioned = obj.contains_key("report_version");
    match obj.get("report_version") {
        Some(v) => {
            let version = v.as_u64().ok_or(Why::NotReport("report_version"))?;
            if version > u64::from(REPORT_VERSION) {
                return Err(Why::Newer(version));
            }
        }
        None => {
            if let Some(missing) = ALWAYS.iter().find(|k| !obj.contains_key(**k)) {
                return Err(Why::NotReport(missing));
            }
        }
    }
    // Older reports lack later keys: they take their defaults.
    let mut report = Report::deserialize(value).map_err(Why::BadField)?;
    if !versioned {
        report.report_version.0 = 0;
    }
    Ok(report)
}

/// Serde: a report's `mode`, one of the names livemig writes.
pub(crate) fn mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    const MODES: [&str; 6] = [
        "precopy",
        "postcopy",
        "hybrid",
        "cold",
        super::SIMULATED,
        super::MODEL,
    ];
    let s = String::deserialize(d)?;
    MODES
        .iter()
        .find(|m| **m == s)
        .copied()
        .ok_or_else(|| serde::de::Error::unknown_variant(&s, &MODES))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(text: &str) -> String {
        match parse(text) {
            Ok(_) => "ok".into(),
            Err(w) => crate::util::error::error_chain(&w.at(Path::new("r.json"))),
        }
    }

    #[test]
    fn a_report_reads_back_as_written() {
        let r = Report {
            mode: "hybrid",
            transferred_bytes: 42,
            ..Report::default()
        };
        let back = parse(&serde_json::to_string(&r).unwrap()).ok().unwrap();
        assert_eq!(back.mode, "hybrid");
        assert_eq!(back.transferred_bytes, 42);
        assert_eq!(back.report_version.0, REPORT_VERSION);
    }

    #[test]
    fn an_old_report_reads_as_version_0_and_others_are_refused_in_one_line() {
        let old = r#"{"status":"completed","mode":"precopy","rounds":[],"transferred_bytes":1}"#;
        assert_eq!(parse(old).ok().unwrap().report_version.0, 0);
        assert!(why("[1, 2]").contains("not a livemig migration report"));
        assert!(why(r#"{"status":"completed"}"#).contains("no \"mode\" key"));
        assert!(why("{not json").contains("r.json is not JSON"));
        let newer = format!(
            r#"{{"report_version":{},"mode":"precopy"}}"#,
            REPORT_VERSION + 1
        );
        assert!(why(&newer).contains("newer than this livemig reads"));
        let bad = r#"{"report_version":1,"mode":"teleport"}"#;
        assert!(why(bad).contains("bad field"), "{}", why(bad));
        assert!(why(bad).contains("teleport"), "{}", why(bad));
        assert!(!why(bad).contains('\n'));
    }
}

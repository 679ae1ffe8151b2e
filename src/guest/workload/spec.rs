//! Reading a spec: `KIND[:key=value,...]` into a [`Workload`].

use std::str::FromStr;

use super::{Content, Kind, Workload, WorkloadError, MAX_SPEC_LEN};
use crate::util::page::PageSize;
use crate::util::units::{parse_bytes, parse_page_rate, PageRate};

/// Keys every kind takes (the content model).
const CONTENT_KEYS: [&str; 3] = ["zero", "random", "bytes"];

impl FromStr for Workload {
    type Err = WorkloadError;

    fn from_str(spec: &str) -> Result<Self, WorkloadError> {
        if spec.len() > MAX_SPEC_LEN {
            return Err(WorkloadError::TooLong(spec.len()));
        }
        let (kind, args) = spec.split_once(':').unwrap_or((spec, ""));
        let mut kv = std::collections::BTreeMap::new();
        for part in args.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| WorkloadError::NotKeyValue(part.into()))?;
            if kv.insert(k, v).is_some() {
                return Err(WorkloadError::Twice(k.into()));
            }
        }
        let allowed: &[&str] = match kind {
            "idle" => &[],
            "uniform" => &["rate"],
            "hotset" => &["wws", "rate", "hot"],
            "sweep" => &["from", "to", "rate"],
            _ => return Err(WorkloadError::UnknownKind(kind.into())),
        };
        if let Some(k) = kv
            .keys()
            .find(|k| !allowed.contains(k) && !CONTENT_KEYS.contains(k))
        {
            let takes: Vec<&str> = allowed.iter().chain(&CONTENT_KEYS).copied().collect();
            return Err(WorkloadError::UnknownKey {
                kind: kind.into(),
                key: (*k).into(),
                takes: takes.join(", "),
            });
        }
        let unit = |k: &str, v: &str, source| WorkloadError::Unit {
            key: k.into(),
            value: v.into(),
            source,
        };
        let fraction = |k: &str| -> Result<Option<f64>, WorkloadError> {
            kv.get(k)
                .map(|v| {
                    v.parse::<f64>()
                        .ok()
                        .filter(|f| (0.0..=1.0).contains(f))
                        .ok_or_else(|| WorkloadError::Fraction {
                            key: k.into(),
                            value: (*v).into(),
                        })
                })
                .transpose()
        };
        let size = |k: &str| -> Result<Option<u64>, WorkloadError> {
            kv.get(k)
                .map(|v| parse_bytes(v).map_err(|e| unit(k, v, e)))
                .transpose()
        };
        let rate = match kv.get("rate") {
            Some(v) => parse_page_rate(v).map_err(|e| unit("rate", v, e))?,
            None if kind == "uniform" || kind == "hotset" => {
                return Err(WorkloadError::NeedsRate(kind.into()))
            }
            None => PageRate::Max,
        };
        let pattern = match kind {
            "idle" => Kind::Idle,
            "uniform" => Kind::Uniform,
            "hotset" => Kind::HotSet {
                wws_bytes: size("wws")?.ok_or(WorkloadError::NeedsWws)?,
                hot: fraction("hot")?.unwrap_or(0.95),
            },
            _ => Kind::Sweep {
                from_bytes: size("from")?,
                to_bytes: size("to")?,
            },
        };
        let write_bytes = size("bytes")?.unwrap_or(8);
        if write_bytes == 0 || write_bytes % 8 != 0 {
            return Err(WorkloadError::WriteBytes {
                bytes: write_bytes,
                page_size: PageSize::host().as_u64(),
            });
        }
        Ok(Self {
            spec: spec.into(),
            kind: pattern,
            rate,
            content: Content {
                zero: fraction("zero")?.unwrap_or(0.0),
                random: fraction("random")?.unwrap_or(0.0),
                write_bytes,
            },
        })
    }
}

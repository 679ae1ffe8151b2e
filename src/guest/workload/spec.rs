//! Reading a spec: `KIND[:key=value,...]` into a [`Workload`]; `phases:`
//! and `trace:` read their own grammar after the colon.

use std::str::FromStr;

use super::{Content, Kind, Workload, WorkloadError, MAX_SPEC_LEN};
use crate::util::page::PageSize;
use crate::util::units::{parse_bytes, parse_duration, parse_page_rate, PageRate};

/// Keys every kind takes (the content model).
const CONTENT_KEYS: [&str; 5] = ["zero", "random", "bytes", "cache", "layout"];

impl FromStr for Workload {
    type Err = WorkloadError;

    fn from_str(spec: &str) -> Result<Self, WorkloadError> {
        if spec.len() > MAX_SPEC_LEN {
            return Err(WorkloadError::TooLong(spec.len()));
        }
        let (kind, args) = spec.split_once(':').unwrap_or((spec, ""));
        match kind {
            "phases" => return phases(spec, args),
            "trace" if args.is_empty() => return Err(WorkloadError::NeedsTraceFile),
            // The rest is a path, commas and all.
            "trace" => {
                return Ok(Self {
                    spec: spec.into(),
                    kind: Kind::Trace(args.into()),
                    rate: PageRate::Max,
                    content: Content::default(),
                })
            }
            _ => {}
        }
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
            "zipf" => &["s", "rate", "wws"],
            "compute" => &["ops", "wws"],
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
            None if matches!(kind, "uniform" | "hotset" | "zipf") => {
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
            "zipf" => {
                let s = kv.get("s").ok_or(WorkloadError::NeedsExponent)?;
                Kind::Zipf {
                    s: s.parse::<f64>()
                        .ok()
                        // Finite: rand_distr's Zipf takes no infinite exponent
                        // over a finite set either way.
                        .filter(|s| *s > 0.0 && s.is_finite())
                        .ok_or_else(|| WorkloadError::Exponent((*s).into()))?,
                    wws_bytes: size("wws")?,
                }
            }
            "compute" => {
                let ops = kv.get("ops").ok_or(WorkloadError::NeedsOps)?;
                Kind::Compute {
                    ops: ops
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| WorkloadError::Ops((*ops).into()))?,
                    wws_bytes: size("wws")?.ok_or(WorkloadError::NeedsOps)?,
                }
            }
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
                cache: crate::guest::cache::Cache::from_keys(
                    fraction("cache")?,
                    kv.get("layout").copied(),
                )
                .map_err(|e| WorkloadError::CacheLayout(e.0))?,
            },
        })
    }
}

/// `phases:SPEC@DUR+SPEC@DUR...`: the rate is the fastest phase's (what a
/// throttle is checked against), the content the first phase's (the pages
/// are stamped once, at boot).
fn phases(spec: &str, list: &str) -> Result<Workload, WorkloadError> {
    let mut items = Vec::new();
    for item in list.split('+').filter(|i| !i.is_empty()) {
        let (sub, dur) = item
            .rsplit_once('@')
            .ok_or_else(|| WorkloadError::PhaseDuration(item.into()))?;
        let d = parse_duration(dur).map_err(|source| WorkloadError::PhaseTime {
            phase: item.into(),
            source,
        })?;
        let w: Workload = sub.parse().map_err(|e| WorkloadError::Phase {
            phase: sub.into(),
            source: Box::new(e),
        })?;
        if matches!(w.kind, Kind::Phases(_)) {
            return Err(WorkloadError::NestedPhases);
        }
        items.push((w, d));
    }
    let first = items.first().ok_or(WorkloadError::NoPhases)?;
    if items.iter().all(|(_, d)| d.is_zero()) {
        return Err(WorkloadError::ZeroPhases);
    }
    let rate = items
        .iter()
        .filter(|(w, _)| !w.is_idle())
        .map(|(w, _)| w.rate)
        .max_by(|a, b| match (a, b) {
            (PageRate::Max, _) | (_, PageRate::Max) => {
                (*a == PageRate::Max).cmp(&(*b == PageRate::Max))
            }
            (PageRate::PerSec(x), PageRate::PerSec(y)) => x.total_cmp(y),
        })
        .unwrap_or(PageRate::Max);
    Ok(Workload {
        spec: spec.into(),
        content: first.0.content,
        rate,
        kind: Kind::Phases(items),
    })
}

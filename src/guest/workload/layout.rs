//! Laying a workload over a memory: bytes become pages, checked.

use std::sync::Arc;

use super::{trace, Kind, Layout, Pattern, Phases, Trace, Workload, WorkloadError};
use crate::util::page::PageSize;

impl Workload {
    /// This workload over `memory_bytes` of `page_size`-byte pages.
    pub fn layout(&self, memory_bytes: u64, page_size: PageSize) -> Result<Layout, WorkloadError> {
        let page_count = page_size.pages(memory_bytes);
        let wws = |bytes: u64| {
            let pages = page_size.pages_ceil(bytes);
            match pages == 0 || pages > page_count {
                true => Err(WorkloadError::Wws { memory_bytes }),
                false => Ok(pages),
            }
        };
        let pattern = match &self.kind {
            Kind::Idle => Pattern::Idle,
            Kind::Uniform => Pattern::Uniform,
            &Kind::HotSet { wws_bytes, hot } => Pattern::HotSet {
                wws_pages: wws(wws_bytes)?,
                hot,
            },
            &Kind::Sweep {
                from_bytes,
                to_bytes,
            } => {
                let from = page_size.pages(from_bytes.unwrap_or(1 << 20));
                let to = page_size
                    .pages(to_bytes.unwrap_or(100 << 20))
                    .min(page_count);
                if from >= to {
                    return Err(WorkloadError::EmptySweep {
                        from,
                        to,
                        pages: page_count,
                    });
                }
                Pattern::Sweep {
                    from_page: from,
                    to_page: to,
                }
            }
            &Kind::Zipf { s, wws_bytes } => {
                let pages = wws_bytes.map_or(Ok(page_count), wws)?;
                Pattern::Zipf {
                    pages,
                    s,
                    // u64 -> f64: a page count, exact below 2^53. The
                    // parser let through only s > 0 and n >= 1.
                    zipf: rand_distr::Zipf::new(pages as f64, s)
                        .map_err(|_| WorkloadError::Exponent(s.to_string()))?,
                }
            }
            &Kind::Compute { ops, wws_bytes } => Pattern::Compute {
                ops,
                wws_pages: wws(wws_bytes)?,
            },
            Kind::Phases(items) => {
                let items = items
                    .iter()
                    .map(|(w, d)| {
                        let phase = |source| WorkloadError::Phase {
                            phase: w.spec().into(),
                            source: Box::new(source),
                        };
                        Ok((w.layout(memory_bytes, page_size).map_err(phase)?, *d))
                    })
                    .collect::<Result<_, WorkloadError>>()?;
                Pattern::Phases(Arc::new(Phases::new(items)))
            }
            Kind::Trace(path) => {
                let t =
                    Trace::load(path.as_ref(), page_count).map_err(|e| WorkloadError::Trace {
                        path: path.clone(),
                        source: trace::Failure(Arc::new(e)),
                    })?;
                Pattern::Trace(Arc::new(t))
            }
        };
        if self.content.write_bytes > page_size.as_u64() {
            return Err(WorkloadError::WriteBytes {
                bytes: self.content.write_bytes,
                page_size: page_size.as_u64(),
            });
        }
        Ok(Layout {
            workload: self.clone(),
            pattern,
            rate: self.rate,
            content: self.content,
            page_count,
            page_size,
        })
    }
}

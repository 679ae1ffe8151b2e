//! Laying a workload over a memory: bytes become pages, checked.

use super::{Kind, Layout, Pattern, Workload, WorkloadError};
use crate::util::page::PageSize;

impl Workload {
    /// This workload over `memory_bytes` of `page_size`-byte pages.
    pub fn layout(&self, memory_bytes: u64, page_size: PageSize) -> Result<Layout, WorkloadError> {
        let page_count = page_size.pages(memory_bytes);
        let pattern = match self.kind {
            Kind::Idle => Pattern::Idle,
            Kind::Uniform => Pattern::Uniform,
            Kind::HotSet { wws_bytes, hot } => {
                let wws_pages = page_size.pages_ceil(wws_bytes);
                if wws_pages == 0 || wws_pages > page_count {
                    return Err(WorkloadError::Wws { memory_bytes });
                }
                Pattern::HotSet { wws_pages, hot }
            }
            Kind::Sweep {
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

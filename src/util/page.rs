//! The page size as a type: a power of two of at least 4 KiB, checked once
//! where it enters (the host, the wire, a saved device state) and then
//! trusted, so no caller divides by a zero or odd size, and the conversions
//! between pages and bytes live in one place.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::OnceLock;

/// A page size that is not one: not a power of two, under 4 KiB or over
/// 2 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("page size {0} is not a power of two from 4096 to 2^31 bytes")]
pub struct PageSizeError(pub u64);

/// Bytes in a page: a power of two, 4096 or more.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u64", into = "u64")]
pub struct PageSize(NonZeroU32);

impl PageSize {
    /// 4 KiB, the smallest page size (and x86's).
    pub const MIN: PageSize = PageSize(NonZeroU32::new(4096).expect("non-zero"));

    pub fn new(bytes: u64) -> Result<Self, PageSizeError> {
        u32::try_from(bytes)
            .ok()
            .filter(|b| b.is_power_of_two() && *b >= Self::MIN.as_u32())
            .and_then(NonZeroU32::new)
            .map(Self)
            .ok_or(PageSizeError(bytes))
    }

    /// This machine's page size; guest pages are host pages (they are real
    /// mappings). Asked once.
    pub fn host() -> Self {
        static HOST: OnceLock<PageSize> = OnceLock::new();
        *HOST.get_or_init(|| {
            nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
                .ok()
                .flatten()
                .and_then(|v| u64::try_from(v).ok())
                .and_then(|v| Self::new(v).ok())
                .unwrap_or(Self::MIN)
        })
    }

    pub fn as_u64(self) -> u64 {
        u64::from(self.0.get())
    }

    pub fn as_usize(self) -> usize {
        self.0.get() as usize
    }

    pub const fn as_u32(self) -> u32 {
        self.0.get()
    }

    /// Bytes in `pages` pages.
    pub fn bytes(self, pages: u64) -> u64 {
        pages
            .checked_mul(self.as_u64())
            .expect("a byte count fits in u64")
    }

    /// Whole pages in `bytes` (rounded down).
    pub fn pages(self, bytes: u64) -> u64 {
        bytes >> self.0.trailing_zeros()
    }

    /// Pages needed to hold `bytes` (rounded up).
    pub fn pages_ceil(self, bytes: u64) -> u64 {
        bytes.div_ceil(self.as_u64())
    }

    /// The page that holds byte `offset`.
    pub fn page_of(self, offset: u64) -> u64 {
        self.pages(offset)
    }

    /// Whether `bytes` is a whole number of pages.
    pub fn divides(self, bytes: u64) -> bool {
        bytes & (self.as_u64() - 1) == 0
    }
}

impl TryFrom<u64> for PageSize {
    type Error = PageSizeError;

    fn try_from(bytes: u64) -> Result<Self, PageSizeError> {
        Self::new(bytes)
    }
}

impl TryFrom<u32> for PageSize {
    type Error = PageSizeError;

    fn try_from(bytes: u32) -> Result<Self, PageSizeError> {
        Self::new(u64::from(bytes))
    }
}

impl From<PageSize> for u64 {
    fn from(p: PageSize) -> u64 {
        p.as_u64()
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_powers_of_two_from_4_kib() {
        for ok in [4096u64, 8192, 65536, 2 << 20, 1 << 31] {
            assert_eq!(PageSize::new(ok).unwrap().as_u64(), ok);
        }
        for bad in [0u64, 1, 2048, 4095, 4097, 12288, 1 << 32, u64::MAX] {
            let e = PageSize::new(bad).unwrap_err();
            assert_eq!(e, PageSizeError(bad));
            assert!(e.to_string().contains(&format!("page size {bad} ")), "{e}");
        }
        assert_eq!(PageSize::try_from(8192u32).unwrap().as_u32(), 8192);
        assert!(PageSize::try_from(3000u32).is_err());
    }

    #[test]
    fn pages_and_bytes() {
        let ps = PageSize::new(8192).unwrap();
        assert_eq!(ps.bytes(3), 24576);
        assert_eq!(ps.pages(24576 + 8191), 3);
        assert_eq!(ps.pages_ceil(24577), 4);
        assert_eq!(ps.page_of(8191), 0);
        assert_eq!(ps.page_of(8192), 1);
        assert!(ps.divides(16384) && !ps.divides(4096) && ps.divides(0));
        assert_eq!(ps.as_usize(), 8192);
        assert_eq!(ps.to_string(), "8192");
    }

    #[test]
    fn the_host_has_one() {
        assert!(PageSize::host() >= PageSize::MIN);
    }

    #[test]
    fn serialises_as_a_number_and_checks_on_the_way_in() {
        let ps = PageSize::MIN;
        assert_eq!(serde_json::to_string(&ps).unwrap(), "4096");
        assert_eq!(
            serde_json::from_str::<PageSize>("16384").unwrap().as_u64(),
            16384
        );
        let e = serde_json::from_str::<PageSize>("1000").unwrap_err();
        assert!(e.to_string().contains("page size 1000"), "{e}");
    }
}

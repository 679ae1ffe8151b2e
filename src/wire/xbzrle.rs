//! XBZRLE: XOR-based zero-run-length delta encoding of a page against the
//! version the receiver already holds (QEMU's `migration/xbzrle.c` format).
//!
//! ```text
//! delta = { zrun nzrun }        (empty when the page is unchanged)
//! zrun  = length                (bytes where old ^ new == 0; only the first may be 0)
//! nzrun = length byte{length}   (the new bytes where old ^ new != 0; length >= 1)
//! length = ULEB128              (7 bits a byte, low first; minimal; at most 5 bytes / u32)
//! ```
//!
//! The trailing zero run is omitted, so a page with 8 changed bytes costs a
//! handful of bytes instead of 4096. The sender keeps the last version it sent
//! of recently dirtied pages in a [`Cache`]; a page whose delta would not be
//! smaller than a limit (usually the page size) is an overflow and goes in full.
//! QEMU caps lengths at 14 bits (4 KiB pages); this module accepts up to u32
//! so larger pages work, and rejects non-minimal lengths.

use crate::util::page::PageSize;

/// Errors from decoding a delta or sizing the cache.
#[derive(Debug, thiserror::Error)]
pub enum XbzrleError {
    #[error("corrupt XBZRLE delta at offset {offset}: {what}")]
    Corrupt { offset: usize, what: String },
    #[error("an XBZRLE cache of {cache_bytes} bytes is smaller than one {page_size}-byte page")]
    CacheTooSmall {
        cache_bytes: u64,
        page_size: PageSize,
    },
    #[error(
        "an XBZRLE cache of {cache_bytes} bytes is too large for this machine's address space"
    )]
    CacheTooLarge { cache_bytes: u64 },
}

/// The largest ULEB128 accepted: 5 bytes hold a u32.
const ULEB_MAX_BYTES: usize = 5;
const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

#[inline(always)]
fn word(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

#[inline(always)]
fn wide(b: &[u8]) -> u128 {
    u128::from_ne_bytes(b.try_into().expect("16 bytes"))
}

/// First index `>= i` where `old` and `new` differ, or `new.len()`.
#[inline]
fn skip_equal(old: &[u8], new: &[u8], mut i: usize) -> usize {
    let n = new.len();
    // Short unchanged gaps are common (scattered writes): try a few words
    // first. Then 64 bytes a step across long stretches (u128 XOR-OR, which
    // the compiler keeps in vector registers), then a word, then a byte.
    for _ in 0..8 {
        if i + 8 > n {
            break;
        }
        let x = word(old, i) ^ word(new, i);
        if x != 0 {
            // Little-endian load: the lowest set byte is the first differing one.
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    let blocks = old[i..].chunks_exact(64).zip(new[i..].chunks_exact(64));
    for (a, b) in blocks {
        let x = a
            .chunks_exact(16)
            .zip(b.chunks_exact(16))
            .fold(0, |acc, (p, q)| acc | (wide(p) ^ wide(q)));
        if x != 0 {
            break;
        }
        i += 64;
    }
    while i + 8 <= n {
        let x = word(old, i) ^ word(new, i);
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && old[i] == new[i] {
        i += 1;
    }
    i
}

/// Flags (high bit) every zero byte of `x`. A borrow can only add false flags
/// above the first zero byte, so the lowest flag is exact.
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    x.wrapping_sub(LO) & !x & HI
}

/// First index in `i..end` where `old` and `new` are equal, or `end`.
#[inline]
fn skip_different(old: &[u8], new: &[u8], mut i: usize, end: usize) -> usize {
    while i + 32 <= end {
        let (a, b) = (&old[i..i + 32], &new[i..i + 32]);
        let z = (0..32)
            .step_by(8)
            .fold(0, |acc, k| acc | zero_bytes(word(a, k) ^ word(b, k)));
        if z != 0 {
            break;
        }
        i += 32;
    }
    while i + 8 <= end {
        let z = zero_bytes(word(old, i) ^ word(new, i));
        if z != 0 {
            return i + (z.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < end && old[i] != new[i] {
        i += 1;
    }
    i
}

fn uleb_len(mut v: usize) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_uleb(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v & 0x7F) as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Encodes `new` against `old` (same length) and appends the delta to `out`.
///
/// Returns the delta's length, or `None` when it would not be smaller than
/// `limit` bytes (an overflow: send the full page instead); on `None` `out` is
/// left as it was. An unchanged page encodes to 0 bytes.
///
/// # Panics
/// If `old` and `new` differ in length, or are 4 GiB or longer (lengths are u32 on the wire).
pub fn encode(old: &[u8], new: &[u8], out: &mut Vec<u8>, limit: usize) -> Option<usize> {
    assert_eq!(
        old.len(),
        new.len(),
        "XBZRLE encode of pages of different sizes"
    );
    assert!(
        u32::try_from(new.len()).is_ok(),
        "XBZRLE page larger than 4 GiB"
    );
    let n = new.len();
    let start = out.len();
    // Worst case: 1-byte changes one byte apart cost 3 bytes per 2.
    out.reserve(limit.min(n + n / 2 + 8));
    let mut used = 0usize;
    let mut i = 0;
    loop {
        let j = skip_equal(old, new, i);
        if j == n {
            break; // the trailing zero run is omitted
        }
        // Stop scanning once the run's bytes alone would reach the limit.
        let end = j.saturating_add(limit - used).min(n);
        let k = skip_different(old, new, j, end);
        let size = uleb_len(j - i) + uleb_len(k - j) + (k - j);
        if used + size >= limit {
            out.truncate(start);
            return None;
        }
        put_uleb(out, j - i);
        put_uleb(out, k - j);
        out.extend_from_slice(&new[j..k]);
        used += size;
        i = k;
    }
    if used >= limit {
        return None; // only when limit == 0: nothing was written
    }
    Some(used)
}

/// Reads a ULEB128 length at `*i`, advancing past it.
fn read_uleb(delta: &[u8], i: &mut usize) -> Result<usize, XbzrleError> {
    let at = *i;
    let mut v: u64 = 0;
    for k in 0..ULEB_MAX_BYTES {
        let Some(&b) = delta.get(at + k) else {
            return Err(corrupt(at, "truncated ULEB128"));
        };
        v |= u64::from(b & 0x7F) << (7 * k);
        if b & 0x80 == 0 {
            // A zero last byte after the first would be a padded (non-minimal) form.
            if k > 0 && b == 0 {
                return Err(corrupt(at, "over-long ULEB128 (not minimal)"));
            }
            let v = u32::try_from(v).map_err(|_| corrupt(at, "over-long ULEB128 (exceeds u32)"))?;
            *i = at + k + 1;
            return usize::try_from(v).map_err(|_| corrupt(at, "ULEB128 exceeds usize"));
        }
    }
    Err(corrupt(at, "over-long ULEB128 (more than 5 bytes)"))
}

fn corrupt(offset: usize, what: impl Into<String>) -> XbzrleError {
    XbzrleError::Corrupt {
        offset,
        what: what.into(),
    }
}

/// Applies `delta` to `page`, which holds the old version, in place.
///
/// `delta` is untrusted: every malformed form is [`XbzrleError::Corrupt`]
/// with the offset in `delta` where it starts. On error `page` may be
/// partly updated.
pub fn decode(delta: &[u8], page: &mut [u8]) -> Result<(), XbzrleError> {
    let n = page.len();
    let mut i = 0; // offset in delta
    let mut d = 0; // offset in page
    while i < delta.len() {
        if d == n {
            let left = delta.len() - i;
            let why = format!("{left} bytes left over after the page end");
            return Err(corrupt(i, why));
        }
        let at = i;
        let zrun = read_uleb(delta, &mut i)?;
        if zrun == 0 && at > 0 {
            return Err(corrupt(
                at,
                "zero-length zero run (only the first may be empty)",
            ));
        }
        let Some(zend) = d.checked_add(zrun).filter(|&e| e <= n) else {
            let why = format!(
                "zero run of {zrun} bytes from page byte {d} passes the page end ({n} bytes)"
            );
            return Err(corrupt(at, why));
        };
        d = zend;
        let at = i;
        let nzrun = read_uleb(delta, &mut i)?;
        if nzrun == 0 {
            return Err(corrupt(at, "zero-length non-zero run"));
        }
        let Some(end) = d.checked_add(nzrun).filter(|&e| e <= n) else {
            let why = format!(
                "non-zero run of {nzrun} bytes from page byte {d} passes the page end ({n} bytes)"
            );
            return Err(corrupt(at, why));
        };
        let Some(bytes) = i.checked_add(nzrun).and_then(|e| delta.get(i..e)) else {
            let left = delta.len() - i;
            let why =
                format!("non-zero run of {nzrun} bytes is truncated ({left} left in the delta)");
            return Err(corrupt(at, why));
        };
        page[d..end].copy_from_slice(bytes);
        d = end;
        i += nzrun;
    }
    Ok(())
}

/// The sender's cache of the last sent version of pages (QEMU's XBZRLE
/// cache): direct-mapped, `cache_bytes / page_size` slots, slot = page index
/// modulo slots. A newer page evicts whatever shared its slot, so there is no
/// LRU bookkeeping; collisions only cost a full-page send.
///
/// All memory is one allocation made by [`Cache::new`], slot after slot, each
/// an 8-byte tag (page index + 1, little-endian; 0 = empty) then the page.
pub struct Cache {
    buf: Vec<u8>,
    slots: u64,
    page_size: usize,
}

const TAG: usize = 8;

impl Cache {
    /// A cache of `cache_bytes / page_size` slots (plus 8 bytes of tag each).
    pub fn new(cache_bytes: u64, page_size: PageSize) -> Result<Cache, XbzrleError> {
        let too_large = || XbzrleError::CacheTooLarge { cache_bytes };
        if cache_bytes < page_size.as_u64() {
            return Err(XbzrleError::CacheTooSmall {
                cache_bytes,
                page_size,
            });
        }
        let slots = page_size.pages(cache_bytes);
        let page_size = page_size.as_usize();
        let len = usize::try_from(slots)
            .ok()
            .and_then(|s| s.checked_mul(page_size.checked_add(TAG)?))
            .filter(|&l| l <= isize::MAX as usize)
            .ok_or_else(too_large)?;
        // Zeroed memory comes straight from the kernel: untouched slots cost nothing.
        Ok(Cache {
            buf: vec![0; len],
            slots,
            page_size,
        })
    }

    pub fn slots(&self) -> u64 {
        self.slots
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Byte offset of the slot `page` maps to.
    fn slot(&self, page: u64) -> usize {
        // < slots, and slots * stride fits in usize (checked in `new`).
        let s = (page % self.slots) as usize;
        s * (TAG + self.page_size)
    }

    /// The cached version of `page`, if its slot holds exactly this page.
    pub fn get(&self, page: u64) -> Option<&[u8]> {
        let at = self.slot(page);
        let tag = u64::from_le_bytes(self.buf[at..at + TAG].try_into().expect("8 bytes"));
        (tag != 0 && tag - 1 == page).then(|| &self.buf[at + TAG..at + TAG + self.page_size])
    }

    /// Stores `data` as the latest version of `page`, evicting the slot's previous page.
    ///
    /// # Panics
    /// If `data.len()` is not the page size.
    pub fn insert(&mut self, page: u64, data: &[u8]) {
        assert_eq!(
            data.len(),
            self.page_size,
            "XBZRLE cache insert of a wrong-sized page"
        );
        let at = self.slot(page);
        // Page u64::MAX cannot be tagged; it simply empties its slot.
        let tag = page.checked_add(1).unwrap_or(0);
        self.buf[at..at + TAG].copy_from_slice(&tag.to_le_bytes());
        self.buf[at + TAG..at + TAG + self.page_size].copy_from_slice(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xxhash_rust::xxh3::xxh3_64;

    const PAGE: usize = 4096;

    /// Pseudo-random u64 stream: xxh3 of a counter.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 += 1;
            xxh3_64(&self.0.to_le_bytes())
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    fn round_trip(old: &[u8], new: &[u8]) -> usize {
        let mut delta = Vec::new();
        let n = encode(old, new, &mut delta, usize::MAX).expect("no limit");
        assert_eq!(n, delta.len());
        let mut page = old.to_vec();
        decode(&delta, &mut page).unwrap();
        assert!(page == new, "round trip of a {}-byte page", new.len());
        n
    }

    fn corrupt_msg(delta: &[u8], page_len: usize) -> String {
        let mut page = vec![0u8; page_len];
        match decode(delta, &mut page) {
            Err(e @ XbzrleError::Corrupt { .. }) => e.to_string(),
            other => panic!("{delta:?}: expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn uleb_round_trips_and_is_minimal() {
        for v in [
            0usize,
            1,
            127,
            128,
            300,
            16383,
            16384,
            1 << 21,
            u32::MAX as usize,
        ] {
            let mut b = Vec::new();
            put_uleb(&mut b, v);
            assert_eq!(b.len(), uleb_len(v), "{v}");
            let mut i = 0;
            assert_eq!(read_uleb(&b, &mut i).unwrap(), v);
            assert_eq!(i, b.len());
        }
        let mut b = vec![0xAC, 0x02];
        let mut i = 0;
        assert_eq!(read_uleb(&b, &mut i).unwrap(), 300);
        b.push(0); // bytes after a complete ULEB128 are not part of it
        i = 0;
        assert_eq!((read_uleb(&b, &mut i).unwrap(), i), (300, 2));
        assert_eq!(
            read_uleb(&[0xFF, 0xFF, 0xFF, 0xFF, 0x0F], &mut 0).unwrap(),
            u32::MAX as usize
        );
        assert!(read_uleb(&[0xFF, 0xFF, 0xFF, 0xFF, 0x10], &mut 0).is_err());
    }

    #[test]
    fn small_changes_encode_small() {
        let old = vec![0x11u8; PAGE];
        assert_eq!(round_trip(&old, &old), 0, "unchanged page");
        let mut new = old.clone();
        new[1000..1008].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut delta = Vec::new();
        assert_eq!(encode(&old, &new, &mut delta, PAGE), Some(11));
        // zrun 1000 = [0xE8, 0x07], nzrun 8, then the bytes.
        assert_eq!(delta, [0xE8, 0x07, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(round_trip(&old, &new), 11);
    }

    #[test]
    fn edge_changes() {
        let old = vec![0u8; PAGE];
        let mut first = old.clone();
        first[0] = 1;
        assert_eq!(round_trip(&old, &first), 3); // zrun 0, nzrun 1, byte
        let mut last = old.clone();
        last[PAGE - 1] = 1;
        assert_eq!(round_trip(&old, &last), 4); // zrun 4095 (2 bytes), nzrun 1, byte
        let mut both = first.clone();
        both[PAGE - 1] = 1;
        assert_eq!(round_trip(&old, &both), 7);
        let all = vec![0xFFu8; PAGE];
        assert_eq!(round_trip(&old, &all), 1 + 2 + PAGE);
        // Odd lengths and lengths below a word.
        for len in 0..40 {
            let mut rng = Rng(len as u64);
            let a = rng.bytes(len);
            let mut b = a.clone();
            for i in (0..len).step_by(3) {
                b[i] ^= 0x40;
            }
            round_trip(&a, &b);
            round_trip(&a, &rng.bytes(len));
        }
    }

    #[test]
    fn run_edges_at_every_page_offset() {
        // One changed byte anywhere: found exactly by the word and block scans.
        let old = vec![0u8; PAGE];
        let mut new = old.clone();
        for p in 0..PAGE {
            new[p] = 0x80;
            assert_eq!(round_trip(&old, &new), uleb_len(p) + 2, "byte {p}");
            new[p] = 0;
        }
        // One unchanged byte anywhere in an otherwise changed page.
        let mut new = vec![0xFFu8; PAGE];
        for p in 0..PAGE {
            new[p] = 0;
            // (zero run, changed run) pairs: [0, p] then [1, rest], empty ones dropped.
            let pair = |changed: usize| 1 + uleb_len(changed) + changed;
            let tail = PAGE - p - 1;
            let want = if p == 0 {
                pair(tail)
            } else {
                pair(p) + if tail > 0 { pair(tail) } else { 0 }
            };
            assert_eq!(round_trip(&old, &new), want, "byte {p}");
            new[p] = 0xFF;
        }
    }

    #[test]
    fn runs_split_at_every_byte_position() {
        // A zero byte inside a changed word, at each position of the word.
        let old = vec![0u8; 64];
        for hole in 0..24 {
            let mut new = vec![0xA5u8; 64];
            new[hole] = 0;
            new[hole + 17] = 0;
            round_trip(&old, &new);
        }
    }

    #[test]
    fn random_pairs_round_trip() {
        let mut rng = Rng(42);
        for case in 0..2000 {
            let len = if case % 4 == 0 { rng.below(300) } else { PAGE };
            let old = rng.bytes(len);
            let mut new = old.clone();
            // Sparse edits of random lengths, or a dense random rewrite.
            let edits = [0, 1, 2, 8, 64, 1000][case % 6];
            for _ in 0..edits {
                if len == 0 {
                    break;
                }
                let at = rng.below(len);
                let run = 1 + rng.below(16).min(len - at - 1);
                for b in &mut new[at..at + run] {
                    *b = rng.next() as u8;
                }
            }
            round_trip(&old, &new);
        }
    }

    #[test]
    fn overflow_leaves_out_untouched() {
        let old = vec![0u8; PAGE];
        let new = vec![1u8; PAGE];
        let mut out = vec![9, 9, 9];
        assert_eq!(encode(&old, &new, &mut out, PAGE), None);
        assert_eq!(out, [9, 9, 9]);
        // Many small runs that pass the limit only late.
        let mut sparse = old.clone();
        for i in (0..PAGE).step_by(3) {
            sparse[i] = 1; // 3 delta bytes per 3 page bytes: reaches 4096 at the last run
        }
        assert_eq!(encode(&old, &sparse, &mut out, PAGE), None);
        assert_eq!(out, [9, 9, 9]);
        // Exactly at the limit is an overflow; one byte under is not.
        let mut one = old.clone();
        one[5] = 7; // zrun 5, nzrun 1, byte = 3 bytes
        assert_eq!(encode(&old, &one, &mut out, 3), None);
        assert_eq!(encode(&old, &one, &mut out, 4), Some(3));
        assert_eq!(out, [9, 9, 9, 5, 1, 7]);
        assert_eq!(encode(&old, &old, &mut out, 0), None);
    }

    #[test]
    fn decoder_rejects_each_corrupt_form() {
        let cases: &[(&[u8], &str)] = &[
            (&[5], "offset 1: truncated ULEB128"),
            (&[0x80], "offset 0: truncated ULEB128"),
            (&[5, 0x81], "offset 1: truncated ULEB128"),
            (&[0x80, 0x00, 1, 1], "offset 0: over-long ULEB128 (not minimal)"),
            (&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], "offset 0: over-long ULEB128 (more than 5 bytes)"),
            (&[0xFF, 0xFF, 0xFF, 0xFF, 0x1F], "offset 0: over-long ULEB128 (exceeds u32)"),
            (&[5, 0], "offset 1: zero-length non-zero run"),
            (&[0x81, 0x01, 1, 7], "offset 0: zero run of 129 bytes from page byte 0 passes the page end (16 bytes)"),
            (&[10, 7, 1, 2, 3, 4, 5, 6, 7], "offset 1: non-zero run of 7 bytes from page byte 10 passes the page end (16 bytes)"),
            (&[0, 4, 1, 2], "offset 1: non-zero run of 4 bytes is truncated (2 left in the delta)"),
            (&[0, 1, 9, 0, 1, 9], "offset 3: zero-length zero run (only the first may be empty)"),
            (&[15, 1, 9, 3], "offset 3: 1 bytes left over after the page end"),
            (&[0, 16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0, 1], "offset 18: 2 bytes left over after the page end"),
        ];
        for (delta, want) in cases {
            let msg = corrupt_msg(delta, 16);
            assert_eq!(msg, format!("corrupt XBZRLE delta at {want}"), "{delta:?}");
        }
        // Non-empty delta for an empty page.
        assert_eq!(
            corrupt_msg(&[0, 1, 1], 0),
            "corrupt XBZRLE delta at offset 0: 3 bytes left over after the page end"
        );
        // Empty delta: the page is unchanged.
        let mut page = vec![3u8; 16];
        decode(&[], &mut page).unwrap();
        assert_eq!(page, [3u8; 16]);
    }

    #[test]
    fn truncations_and_garbage_never_panic() {
        let mut rng = Rng(7);
        let old = rng.bytes(PAGE);
        let mut new = old.clone();
        for _ in 0..40 {
            let at = rng.below(PAGE - 8);
            new[at..at + 8].copy_from_slice(&rng.next().to_le_bytes());
        }
        let mut delta = Vec::new();
        encode(&old, &new, &mut delta, PAGE).unwrap();
        let mut page = old.clone();
        for len in 0..delta.len() {
            page.copy_from_slice(&old);
            let _ = decode(&delta[..len], &mut page);
        }
        for len in 0..400 {
            let junk = rng.bytes(len);
            let _ = decode(&junk, &mut page);
            // Mostly small numbers: gets past the first ULEB128s more often.
            let small: Vec<u8> = junk.iter().map(|b| b & 0x0F).collect();
            let _ = decode(&small, &mut page);
            let _ = decode(&junk, &mut page[..len.min(64)]);
        }
    }

    #[test]
    fn cache_get_insert_evict() {
        let mut c = Cache::new(4 * 4096 + 100, PageSize::MIN).unwrap();
        assert_eq!(c.slots(), 4);
        assert_eq!(c.get(0), None, "empty slot");
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        c.insert(1, &a);
        assert_eq!(c.get(1), Some(&a[..]));
        assert_eq!(c.get(5), None, "same slot, other page");
        c.insert(5, &b);
        assert_eq!(c.get(1), None, "evicted");
        assert_eq!(c.get(5), Some(&b[..]));
        c.insert(2, &a);
        assert_eq!(c.get(5), Some(&b[..]), "other slot untouched");
        c.insert(u64::MAX, &a); // u64::MAX % 4 == 3
        assert_eq!(c.get(u64::MAX), None);
        assert_eq!(Cache::new(4096, PageSize::MIN).unwrap().slots(), 1);
    }

    #[test]
    fn cache_size_errors() {
        let e = Cache::new(4095, PageSize::MIN).err().unwrap().to_string();
        assert_eq!(
            e,
            "an XBZRLE cache of 4095 bytes is smaller than one 4096-byte page"
        );
        let e = Cache::new(u64::MAX, PageSize::MIN)
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("an XBZRLE cache of"), "{e}");
    }
}

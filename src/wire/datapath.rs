//! How a run of pages travels: the sender's [`Encoder`] chooses a form for
//! each page and writes the frames; the receiver's [`Decoder`] reads them
//! straight into guest memory and records each page's digest as it lands.
//!
//! Forms, tried in this order (QEMU's order): a zero page goes as a
//! `ZeroPages` marker (`duplicate_pages`); with `--xbzrle`, a page whose last
//! sent version is in the cache goes as an XBZRLE delta when the delta is
//! smaller than the page (else it counts as an overflow); with
//! `--compress`, the remaining pages of a run go compressed as one block when
//! that is smaller; everything else goes raw, by vectored I/O straight from
//! the mapping, with no copy in user space.
//!
//! XBZRLE needs the receiver's copy of a page to be exactly the version in
//! the sender's cache, so with `--xbzrle` every page is first copied out of
//! the (concurrently written) mapping and both sent and cached from that
//! copy. Compression also works on a copy: a compressor must not read memory
//! that changes under it. A page torn by a concurrent guest write is dirty
//! again and is sent again in a later round, as for raw pages.

use std::io::{IoSlice, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::guest::memory::GuestMemory;
use crate::util::page::PageSize;
use crate::wire::protocol::{
    self, Kind, PageRun, ProtocolError, MAX_RUN_PAGES, RUN_FRAME_HEADER_LEN,
};
use crate::wire::ratelimit::RateLimiter;
use crate::wire::reduce::{Codec, Compressor, Decompressor};
use crate::wire::xbzrle;

/// Which data reductions the sender applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reduction {
    /// Send zero pages as markers (on by default, as in QEMU).
    pub zero_pages: bool,
    pub compress: Option<Codec>,
    /// XBZRLE cache size in bytes.
    pub xbzrle_cache: Option<u64>,
}

impl Default for Reduction {
    fn default() -> Self {
        Self {
            zero_pages: true,
            compress: None,
            xbzrle_cache: None,
        }
    }
}

/// Pages sent, by form (QEMU's vocabulary where it has a word); part of
/// the migration report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SendStats {
    /// Zero pages sent as markers (QEMU: duplicate).
    pub duplicate_pages: u64,
    /// Pages sent whole, raw (QEMU: normal).
    pub normal_pages: u64,
    /// Pages sent inside compressed blocks, and those blocks' sizes.
    pub compressed_pages: u64,
    pub compressed_bytes: u64,
    /// Pages sent as XBZRLE deltas, and the deltas' bytes.
    pub xbzrle_pages: u64,
    pub xbzrle_bytes: u64,
    pub xbzrle_cache_hits: u64,
    pub xbzrle_cache_misses: u64,
    /// Cache hits whose delta was not smaller than the page.
    pub xbzrle_overflow: u64,
}

impl std::ops::AddAssign for SendStats {
    fn add_assign(&mut self, o: Self) {
        self.duplicate_pages += o.duplicate_pages;
        self.normal_pages += o.normal_pages;
        self.compressed_pages += o.compressed_pages;
        self.compressed_bytes += o.compressed_bytes;
        self.xbzrle_pages += o.xbzrle_pages;
        self.xbzrle_bytes += o.xbzrle_bytes;
        self.xbzrle_cache_hits += o.xbzrle_cache_hits;
        self.xbzrle_cache_misses += o.xbzrle_cache_misses;
        self.xbzrle_overflow += o.xbzrle_overflow;
    }
}

/// Errors building an encoder.
#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    #[error(transparent)]
    Reduce(#[from] crate::wire::reduce::ReduceError),
    #[error(transparent)]
    Xbzrle(#[from] xbzrle::XbzrleError),
}

/// The form chosen for one page of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Zero,
    /// An XBZRLE delta: the next one in `Encoder::deltas`.
    Delta,
    Whole,
}

/// A piece of the frames being written: bytes in `Encoder::out`, or pages
/// straight from the mapping.
enum Piece {
    Out(usize, usize),
    Mem(u64, u64),
}

/// One stream's sending side: reduction state and reusable buffers, so
/// sending allocates nothing per page once warm.
pub struct Encoder {
    reduction: Reduction,
    page_size: usize,
    compressor: Option<Compressor>,
    cache: Option<xbzrle::Cache>,
    /// Copy of the run's pages (when compressing or using XBZRLE).
    snapshot: Vec<u8>,
    /// Frame bytes built in user space: headers, markers, deltas, blocks.
    out: Vec<u8>,
    /// The run's XBZRLE deltas back to back, and their lengths in page order.
    deltas: Vec<u8>,
    delta_lens: Vec<u16>,
    block: Vec<u8>,
    forms: Vec<Form>,
    pieces: Vec<Piece>,
    /// Round 0 (QEMU's bulk stage): every page goes once, so none is cached
    /// for XBZRLE yet; caching starts with round 1's pages, the ones that
    /// get dirtied again.
    bulk: bool,
    pub stats: SendStats,
}

impl Encoder {
    pub fn new(reduction: Reduction, page_size: PageSize) -> Result<Self, DataPathError> {
        Ok(Self {
            reduction,
            page_size: page_size.as_usize(),
            compressor: reduction.compress.map(Compressor::new).transpose()?,
            cache: match reduction.xbzrle_cache {
                Some(bytes) => Some(xbzrle::Cache::new(bytes, page_size)?),
                None => None,
            },
            snapshot: Vec::new(),
            out: Vec::new(),
            deltas: Vec::new(),
            delta_lens: Vec::new(),
            block: Vec::new(),
            forms: Vec::new(),
            pieces: Vec::new(),
            bulk: true,
            stats: SendStats::default(),
        })
    }

    /// Round `round` begins.
    pub fn start_round(&mut self, round: u32) {
        self.bulk = round == 0;
    }

    /// Whether pages are copied out of the mapping before they are sent.
    fn copies(&self) -> bool {
        self.compressor.is_some() || self.cache.is_some()
    }

    /// Send pages `first..first+count` (at most [`MAX_RUN_PAGES`]) as frames
    /// on `w`, paced by `limiter`. Returns the bytes written.
    pub fn send_run(
        &mut self,
        w: &mut impl Write,
        mem: &GuestMemory,
        first: u64,
        count: u64,
        limiter: &RateLimiter,
    ) -> std::io::Result<u64> {
        assert!(count >= 1 && count <= u64::from(MAX_RUN_PAGES));
        let ps = self.page_size;
        self.out.clear();
        self.deltas.clear();
        self.delta_lens.clear();
        self.forms.clear();
        self.pieces.clear();
        if self.copies() {
            // SAFETY: read only to copy; a torn page is dirty again and resent.
            let src = unsafe { mem.pages(first, count) };
            self.snapshot.clear();
            self.snapshot.extend_from_slice(src);
        }
        for i in 0..count {
            let form = self.choose(mem, first, i);
            self.forms.push(form);
        }
        // Frames for each stretch of pages of one form.
        let (mut i, mut delta, mut at) = (0usize, 0usize, 0usize);
        while i < self.forms.len() {
            let form = self.forms[i];
            let n = self.forms[i..].iter().take_while(|&&f| f == form).count();
            let (page, n32) = (first + i as u64, n as u32);
            match form {
                Form::Zero => {
                    self.push_out(&protocol::zero_frame_header(page, n32));
                    self.stats.duplicate_pages += n as u64;
                }
                Form::Delta => {
                    let start = self.out.len();
                    self.out.extend_from_slice(&[0; RUN_FRAME_HEADER_LEN]);
                    // One length per Delta form, in page order.
                    for &len in &self.delta_lens[delta..delta + n] {
                        let end = at + usize::from(len);
                        self.out.extend_from_slice(&len.to_le_bytes());
                        self.out.extend_from_slice(&self.deltas[at..end]);
                        at = end;
                    }
                    delta += n;
                    let body =
                        u32::try_from(self.out.len() - start - RUN_FRAME_HEADER_LEN).expect("fits");
                    let h = protocol::xbzrle_frame_header(page, n32, body);
                    self.out[start..start + RUN_FRAME_HEADER_LEN].copy_from_slice(&h);
                    self.pieces.push(Piece::Out(start, self.out.len()));
                    self.stats.xbzrle_pages += n as u64;
                    self.stats.xbzrle_bytes += u64::from(body);
                }
                Form::Whole => self.push_whole(page, i, n),
            }
            i += n;
        }
        // One vectored write for the whole run.
        let total: usize = self
            .pieces
            .iter()
            .map(|p| match *p {
                Piece::Out(a, b) => b - a,
                Piece::Mem(_, n) => n as usize * ps,
            })
            .sum();
        let mut slices: Vec<IoSlice<'_>> = self
            .pieces
            .iter()
            .map(|p| match *p {
                Piece::Out(a, b) => IoSlice::new(&self.out[a..b]),
                // SAFETY: only handed to the kernel; a page torn by a
                // concurrent guest write is dirty again and resent.
                Piece::Mem(page, n) => IoSlice::new(unsafe { mem.pages(page, n) }),
            })
            .collect();
        limiter.acquire(total as u64);
        crate::util::netio::write_all_vectored(w, &mut slices)?;
        Ok(total as u64)
    }

    /// The form of page `i` of the run starting at `first`.
    fn choose(&mut self, mem: &GuestMemory, first: u64, i: u64) -> Form {
        let ps = self.page_size;
        let page = first + i;
        let data: &[u8] = if self.copies() {
            let at = i as usize * ps;
            &self.snapshot[at..at + ps]
        } else {
            // SAFETY: read only to test for zeros; a page written meanwhile
            // is dirty again and resent.
            unsafe { mem.pages(page, 1) }
        };
        let zero = self.reduction.zero_pages && crate::wire::reduce::is_zero(data);
        let cache = match self.cache.as_mut() {
            Some(c) if !self.bulk => c,
            _ => return if zero { Form::Zero } else { Form::Whole },
        };
        if zero {
            // The receiver now holds zeros: so must the cache, if it holds the page.
            if cache.get(page).is_some() {
                cache.insert(page, data);
            }
            return Form::Zero;
        }
        let form = match cache.get(page) {
            None => {
                self.stats.xbzrle_cache_misses += 1;
                Form::Whole
            }
            Some(old) => {
                self.stats.xbzrle_cache_hits += 1;
                let start = self.deltas.len();
                match xbzrle::encode(old, data, &mut self.deltas, ps) {
                    Some(_) => {
                        let len = self.deltas.len() - start;
                        let len = u16::try_from(len).expect("a delta is shorter than a page");
                        self.delta_lens.push(len);
                        Form::Delta
                    }
                    None => {
                        self.stats.xbzrle_overflow += 1;
                        Form::Whole
                    }
                }
            }
        };
        cache.insert(page, data);
        form
    }

    fn push_out(&mut self, bytes: &[u8]) {
        let start = self.out.len();
        self.out.extend_from_slice(bytes);
        match self.pieces.last_mut() {
            Some(Piece::Out(_, end)) if *end == start => *end = self.out.len(),
            _ => self.pieces.push(Piece::Out(start, self.out.len())),
        }
    }

    /// `n` whole pages from page `page` (index `i` in the run): compressed
    /// when that is smaller, else raw.
    fn push_whole(&mut self, page: u64, i: usize, n: usize) {
        let ps = self.page_size;
        let (n32, raw) = (n as u32, n * ps);
        if let Some(c) = self.compressor.as_mut() {
            let data = &self.snapshot[i * ps..(i + n) * ps];
            if c.compress(data, &mut self.block).is_ok() && self.block.len() < raw {
                let len = u32::try_from(self.block.len()).expect("smaller than the run");
                let codec = self.reduction.compress.expect("a compressor has a codec");
                let h = protocol::compressed_frame_header(page, n32, codec, len);
                let start = self.out.len();
                self.out.extend_from_slice(&h);
                self.out.extend_from_slice(&self.block);
                self.pieces.push(Piece::Out(start, self.out.len()));
                self.stats.compressed_pages += n as u64;
                self.stats.compressed_bytes += u64::from(len);
                return;
            }
        }
        self.push_out(&protocol::pages_frame_header(page, n32, ps as u32));
        if self.copies() {
            let start = self.out.len();
            self.out
                .extend_from_slice(&self.snapshot[i * ps..(i + n) * ps]);
            self.pieces.push(Piece::Out(start, self.out.len()));
        } else {
            self.pieces.push(Piece::Mem(page, n as u64));
        }
        self.stats.normal_pages += n as u64;
    }
}

/// The receiving side's per-stream state: decompressors and one buffer for
/// reduced payloads, capped by the protocol's run limits.
pub struct Decoder {
    page_size: usize,
    /// Write zero pages even where memory holds zeros already (allocating them).
    populate_zeros: bool,
    lz4: Option<Decompressor>,
    zstd: Option<Decompressor>,
    buf: Vec<u8>,
}

/// Digests of the pages as they landed, shared by the streams. Memory starts
/// zero, so every entry starts as the zero page's digest: a page holds zeros
/// exactly when its entry is that digest.
pub struct Landed {
    digests: Vec<AtomicU64>,
    zero_digest: u64,
}

impl Landed {
    pub fn new(pages: u64, page_size: PageSize) -> Self {
        let zero_digest = crate::guest::memory::page_digest(&vec![0u8; page_size.as_usize()]);
        let n = usize::try_from(pages).expect("fits: memory was mapped");
        Self {
            digests: (0..n).map(|_| AtomicU64::new(zero_digest)).collect(),
            zero_digest,
        }
    }

    pub fn get(&self, page: u64) -> u64 {
        self.digests[page as usize].load(Ordering::Relaxed)
    }

    pub fn set(&self, page: u64, digest: u64) {
        self.digests[page as usize].store(digest, Ordering::Relaxed);
    }

    fn set_all(&self, first: u64, pages: &[u8], page_size: usize) {
        for (i, page) in pages.chunks_exact(page_size).enumerate() {
            self.set(first + i as u64, crate::guest::memory::page_digest(page));
        }
    }
}

impl Decoder {
    pub fn new(page_size: PageSize) -> Self {
        let page_size = page_size.as_usize();
        Self {
            page_size,
            populate_zeros: false,
            lz4: None,
            zstd: None,
            buf: Vec::new(),
        }
    }

    /// Also write zero pages that are zero already, so that every page is
    /// allocated (post-copy: only pages it fetches may be missing).
    pub fn populating_zeros(mut self, yes: bool) -> Self {
        self.populate_zeros = yes;
        self
    }

    /// Read the bulk of page run `run` from `r` into `mem`, recording the
    /// pages' digests in `landed`. Returns the pages it carried.
    ///
    /// # Safety
    /// Nothing else may read or write the frame's pages meanwhile: the
    /// destination guest has not started, and within a round the sender
    /// sends each page once (a sender that breaks this can only garble the
    /// bytes of those pages, which verification then reports).
    pub unsafe fn receive(
        &mut self,
        r: &mut impl Read,
        run: &PageRun,
        mem: &GuestMemory,
        landed: &Landed,
    ) -> Result<u64, ProtocolError> {
        let ps = self.page_size;
        match *run {
            PageRun::Pages { first_page, count } => {
                // SAFETY: exclusive per this function's contract.
                let buf = unsafe { mem.pages_mut(first_page, u64::from(count)) };
                protocol::read_bulk(r, buf, Kind::Pages)?;
                landed.set_all(first_page, buf, ps);
                Ok(u64::from(count))
            }
            PageRun::ZeroPages { first_page, count } => {
                for page in first_page..first_page + u64::from(count) {
                    // Only a page that holds data needs clearing: untouched
                    // memory is zero and is left unallocated.
                    if self.populate_zeros || landed.get(page) != landed.zero_digest {
                        // SAFETY: exclusive per this function's contract.
                        unsafe { mem.pages_mut(page, 1) }.fill(0);
                        landed.set(page, landed.zero_digest);
                    }
                }
                Ok(u64::from(count))
            }
            PageRun::CompressedPages {
                first_page,
                count,
                codec,
                len,
            } => {
                self.read_payload(r, len, Kind::CompressedPages)?;
                let slot = match codec {
                    Codec::Lz4 => &mut self.lz4,
                    Codec::Zstd => &mut self.zstd,
                };
                let d = match slot {
                    Some(d) => d,
                    None => slot.insert(Decompressor::new(codec).map_err(|e| corrupt(run, e))?),
                };
                // SAFETY: exclusive per this function's contract.
                let out = unsafe { mem.pages_mut(first_page, u64::from(count)) };
                d.decompress_into(&self.buf, out)
                    .map_err(|e| corrupt(run, e))?;
                landed.set_all(first_page, out, ps);
                Ok(u64::from(count))
            }
            PageRun::XbzrlePages {
                first_page,
                count,
                len,
            } => {
                self.read_payload(r, len, Kind::XbzrlePages)?;
                let mut rest = &self.buf[..];
                for page in first_page..first_page + u64::from(count) {
                    let Some((n, tail)) = rest.split_first_chunk::<2>() else {
                        return Err(corrupt(run, "the payload ends inside a delta length"));
                    };
                    let n = usize::from(u16::from_le_bytes(*n));
                    if n >= ps || n > tail.len() {
                        let why = format!("page {page}: a delta of {n} bytes does not fit");
                        return Err(corrupt(run, why));
                    }
                    let (delta, tail) = tail.split_at(n);
                    // SAFETY: exclusive per this function's contract.
                    let bytes = unsafe { mem.pages_mut(page, 1) };
                    xbzrle::decode(delta, bytes)
                        .map_err(|e| corrupt(run, format!("page {page}: {e}")))?;
                    landed.set(page, crate::guest::memory::page_digest(bytes));
                    rest = tail;
                }
                if !rest.is_empty() {
                    let why = format!("{} bytes left after the last delta", rest.len());
                    return Err(corrupt(run, why));
                }
                Ok(u64::from(count))
            }
        }
    }

    /// Read a reduced payload of `len` bytes (validated by the protocol: at
    /// most a run of pages plus lengths) into the reusable buffer.
    fn read_payload(
        &mut self,
        r: &mut impl Read,
        len: u32,
        kind: Kind,
    ) -> Result<(), ProtocolError> {
        let len = usize::try_from(len).expect("u32 fits in usize");
        self.buf.resize(len, 0);
        protocol::read_bulk(r, &mut self.buf, kind)
    }
}

fn corrupt(run: &PageRun, why: impl std::fmt::Display) -> ProtocolError {
    let (first, count) = run.pages();
    ProtocolError::BadField {
        kind: run.kind(),
        detail: format!(
            "corrupt payload for pages {first}..{}: {why}",
            first + u64::from(count)
        ),
    }
}

/// Largest Pages frame the sender builds (1 MiB of 4 KiB pages).
const CHUNK_PAGES: u64 = 256;

/// Pages per Pages frame under rate limit `limit`: slices of about 5 ms of
/// the limit, so rounds are paced smoothly.
pub fn chunk_pages(limit: Option<u64>, page_size: PageSize) -> u64 {
    match limit {
        Some(l) => page_size.pages(l / 200).clamp(1, CHUNK_PAGES),
        None => CHUNK_PAGES,
    }
    .min(u64::from(MAX_RUN_PAGES))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u64 = 4096;
    const PAGE: PageSize = PageSize::MIN;

    /// Send `first..first+count` of `src` through an encoder into bytes, then
    /// decode those bytes into `dst`; returns the frames' pages.
    fn through(
        enc: &mut Encoder,
        src: &GuestMemory,
        dst: &GuestMemory,
        landed: &Landed,
        (first, count): (u64, u64),
    ) -> u64 {
        let mut wire = Vec::new();
        let limiter = RateLimiter::new(None);
        let n = enc
            .send_run(&mut wire, src, first, count, &limiter)
            .unwrap();
        assert_eq!(n, wire.len() as u64);
        let limits = protocol::Limits {
            streams: 1,
            page_size: PS as u32,
            page_count: src.page_count(),
        };
        let (mut r, mut dec, mut pages) = (&wire[..], Decoder::new(PAGE), 0);
        while !r.is_empty() {
            let protocol::Frame::Run(run) = protocol::read_frame(&mut r, Some(&limits)).unwrap()
            else {
                panic!("the encoder sends page runs only")
            };
            // SAFETY: this test is the only user of `dst`.
            pages += unsafe { dec.receive(&mut r, &run, dst, landed) }.unwrap();
        }
        pages
    }

    fn fill(mem: &GuestMemory, page: u64, byte: u8, len: usize) {
        // SAFETY: this test is the only user of `mem`.
        let bytes = unsafe { mem.pages_mut(page, 1) };
        bytes[..len].fill(byte);
    }

    fn same(a: &GuestMemory, b: &GuestMemory, landed: &Landed) {
        for p in 0..a.page_count() {
            // SAFETY: nothing writes either memory meanwhile.
            let (x, y) = unsafe { (a.pages(p, 1), b.pages(p, 1)) };
            assert!(x == y, "page {p} differs");
            assert_eq!(
                landed.get(p),
                crate::guest::memory::page_digest(x),
                "page {p}"
            );
        }
    }

    #[test]
    fn every_form_lands_the_same_bytes() {
        for reduction in [
            Reduction::default(),
            Reduction {
                compress: Some(Codec::Lz4),
                ..Reduction::default()
            },
            Reduction {
                compress: Some(Codec::Zstd),
                xbzrle_cache: Some(8 * PS),
                ..Reduction::default()
            },
            Reduction {
                zero_pages: false,
                xbzrle_cache: Some(64 * PS),
                ..Reduction::default()
            },
        ] {
            let (src, dst) = (
                GuestMemory::create(64 * PS, PAGE).unwrap(),
                GuestMemory::create(64 * PS, PAGE).unwrap(),
            );
            let landed = Landed::new(64, PAGE);
            let mut enc = Encoder::new(reduction, PAGE).unwrap();
            // Round 0: every other page has data.
            for p in (0..64).step_by(2) {
                fill(&src, p, p as u8 + 1, 100);
            }
            enc.start_round(0);
            assert_eq!(through(&mut enc, &src, &dst, &landed, (0, 64)), 64);
            same(&src, &dst, &landed);
            // Round 1: small changes, pages that turn zero again, new data.
            enc.start_round(1);
            fill(&src, 2, 0xaa, 8);
            fill(&src, 4, 0, 100);
            fill(&src, 5, 7, 4096);
            assert_eq!(through(&mut enc, &src, &dst, &landed, (2, 4)), 4);
            same(&src, &dst, &landed);
            // Round 2: pages cached in round 1 change a little.
            enc.start_round(2);
            fill(&src, 2, 0xbb, 16);
            fill(&src, 5, 9, 8);
            assert_eq!(through(&mut enc, &src, &dst, &landed, (2, 4)), 4);
            same(&src, &dst, &landed);
            let s = enc.stats;
            let what = format!("{reduction:?}: {s:?}");
            if reduction.zero_pages {
                assert!(s.duplicate_pages > 32, "{what}");
            }
            if reduction.xbzrle_cache.is_some() {
                assert!(s.xbzrle_pages >= 2 && s.xbzrle_cache_misses >= 2, "{what}");
            }
            if reduction.compress.is_some() {
                assert!(s.compressed_pages >= 32, "{what}");
            }
        }
    }
}

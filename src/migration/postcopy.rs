//! Post-copy, hybrid and cold migration: the modes, the destination's
//! demand paging and the source's page server.
//!
//! In post-copy the guest resumes at the destination before its memory has
//! arrived. Its memory is registered for missing-page faults
//! ([`crate::guest::uffd`]); a fault thread reads the faults and asks the source for
//! the page (and, with `--prepage N`, the N pages around it) on a connection
//! of its own, so a request is never queued behind the bulk push (QEMU's
//! postcopy-preempt). Pages arriving either way are placed atomically with
//! `UFFDIO_COPY`, which wakes the faulting vCPU; a page that is there
//! already (`EEXIST`) was placed by the other path. Each page is hashed as
//! it is placed, before the guest can touch it, for verification.
//!
//! Nothing waits forever: a requested page that does not arrive within
//! [`request_timeout`], or a source that closes its connections, fails the
//! migration at the destination with the count of pages still missing; its
//! guest, which cannot run on without them, is stopped.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::guest::dirty::DirtySet;
use crate::guest::memory::GuestMemory;
use crate::guest::uffd::{Uffd, UffdError};
use crate::report::{Latency, PostcopyStats};
use crate::util::bitmap::AtomicBitmap;
use crate::util::page::PageSize;
use crate::wire::datapath::Landed;
use crate::wire::protocol::{
    self, Frame, Kind, Limits, Message, PageRequest, PageRun, ProtocolError, MAX_RUN_PAGES,
};
use crate::wire::ratelimit::RateLimiter;
use crate::wire::transport::Conn;

/// How long a requested page may take before the source counts as gone:
/// 10 s, or `LIVEMIG_REQUEST_TIMEOUT_MS` (for tests).
pub fn request_timeout() -> Duration {
    std::env::var("LIVEMIG_REQUEST_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// Why the destination's post-copy gave up. Clone, so every thread that
/// asks can be told (protocol errors are shared).
#[derive(Debug, Clone, thiserror::Error)]
pub enum PostcopyError {
    #[error("placing page {page}")]
    Place {
        page: u64,
        #[source]
        source: UffdError,
    },
    #[error("reading the guest's faults")]
    Faults(#[source] UffdError),
    #[error("a fault at {addr:#x}, outside guest memory")]
    OutsideMemory { addr: u64 },
    #[error("making page {page} present")]
    Present {
        page: u64,
        #[source]
        source: UffdError,
    },
    #[error("asking the source for page {page}")]
    Request {
        page: u64,
        #[source]
        source: Arc<ProtocolError>,
    },
    #[error("page {page} was asked for {secs:.1} s ago and has not arrived: the source is gone")]
    NotArrived { page: u64, secs: f64 },
    #[error("reading requested pages")]
    ReadPages(#[source] Arc<ProtocolError>),
    #[error("unexpected {0} on the request connection")]
    Unexpected(Kind),
    #[error("the request connection")]
    Connection(#[source] Arc<ProtocolError>),
}

/// Which path placed a page.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Pushed,
    Pulled,
}

/// The destination's post-copy state, shared by the control thread (the
/// push), the fault thread and the request connection's reader.
pub struct Destination {
    uffd: Uffd,
    mem_addr: u64,
    page_size: PageSize,
    page_count: u64,
    prepage: u32,
    /// Pages still to place.
    missing: AtomicBitmap,
    remaining: AtomicU64,
    /// Pages requested and not yet placed, with their first fault's time
    /// (None: pre-paged, not faulted on).
    pending: Mutex<HashMap<u64, Option<Instant>>>,
    latencies: Mutex<hdrhistogram::Histogram<u64>>,
    requests: AtomicU64,
    faults: AtomicU64,
    pulled: AtomicU64,
    pushed: AtomicU64,
    failed: Mutex<Option<PostcopyError>>,
    stop: AtomicBool,
    zeros: Vec<u8>,
    timeout: Duration,
    /// Shut for reading on a failure, to wake the thread waiting on it.
    wake: Mutex<Option<Conn>>,
}

impl Destination {
    /// `missing`: the pages the source will send; `mem_addr`: where the
    /// guest mapped its memory (the uffd's address space).
    pub fn new(
        uffd: Uffd,
        mem_addr: u64,
        limits: &Limits,
        missing: &DirtySet,
        prepage: u32,
    ) -> Self {
        let bits = AtomicBitmap::new(limits.page_count);
        for (first, count) in missing.runs(u64::MAX) {
            bits.mark_range(first, count);
        }
        let n = bits.count();
        let page_size =
            PageSize::try_from(limits.page_size).expect("Hello::limits admits only page sizes");
        Self {
            uffd,
            mem_addr,
            page_size,
            page_count: limits.page_count,
            prepage,
            missing: bits,
            remaining: AtomicU64::new(n),
            pending: Mutex::new(HashMap::new()),
            latencies: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            ),
            requests: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            pulled: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            failed: Mutex::new(None),
            stop: AtomicBool::new(false),
            zeros: vec![0; page_size.as_usize()],
            timeout: request_timeout(),
            wake: Mutex::new(None),
        }
    }

    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Why another thread gave up, if one did.
    pub fn failure(&self) -> Option<PostcopyError> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn fail(&self, why: PostcopyError) {
        if self.stop.swap(true, Ordering::AcqRel) {
            // Over already (done, or failed before): an error of a thread
            // winding down changes nothing, and must not shut the push's
            // connection, which verification still uses.
            return;
        }
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
        if let Some(s) = &*self.wake.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
    }

    /// On a failure, shut `conn` for reading (the push's connection, whose
    /// reader then finds the cause here rather than waiting on the source).
    pub fn wake_on_failure(&self, conn: Conn) {
        *self.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Place the pages in `data` from page `first` on, where still missing;
    /// record their digests.
    pub fn place(
        &self,
        first: u64,
        data: &[u8],
        landed: &Landed,
        path: Path,
    ) -> Result<(), PostcopyError> {
        let ps = self.page_size.as_usize();
        let mut at = 0usize;
        while at < data.len() {
            let page = first + (at / ps) as u64;
            let dst = self.mem_addr + self.page_size.bytes(page);
            let copied = self
                .uffd
                .copy(dst, &data[at..])
                .map_err(|source| PostcopyError::Place { page, source })?;
            let placed = usize::try_from(copied).expect("at most the run") / ps;
            for (i, bytes) in data[at..at + placed * ps].chunks_exact(ps).enumerate() {
                self.placed(page + i as u64, bytes, landed, path);
            }
            // None placed: the first page was there already (EEXIST).
            at += placed.max(1) * ps;
        }
        Ok(())
    }

    fn placed(&self, page: u64, bytes: &[u8], landed: &Landed, path: Path) {
        landed.set(page, crate::guest::memory::page_digest(bytes));
        // Clear, then drop the request under the lock: `request` checks
        // `missing` under the same lock, so no entry outlives its page.
        if self.missing.clear(page) {
            self.remaining.fetch_sub(1, Ordering::AcqRel);
            match path {
                Path::Pushed => self.pushed.fetch_add(1, Ordering::Relaxed),
                Path::Pulled => self.pulled.fetch_add(1, Ordering::Relaxed),
            };
        }
        let waited = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&page);
        if let Some(Some(t)) = waited {
            let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            let _ = self
                .latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(us.max(1));
        }
    }

    /// The fault thread: read faults, request what is missing, until
    /// stopped. Writes requests on `requests`.
    pub fn serve_faults(&self, mut requests: Conn) {
        if let Err(why) = self.fault_loop(&mut requests) {
            self.fail(why);
        }
        let _ = requests.shutdown(std::net::Shutdown::Write);
    }

    fn fault_loop(&self, requests: &mut Conn) -> Result<(), PostcopyError> {
        let mut addrs = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            addrs.clear();
            self.uffd
                .faults(Duration::from_millis(50), &mut addrs)
                .map_err(PostcopyError::Faults)?;
            let now = Instant::now();
            for &addr in &addrs {
                self.faults.fetch_add(1, Ordering::Relaxed);
                let page = self.page_size.page_of(addr.saturating_sub(self.mem_addr));
                if page >= self.page_count {
                    return Err(PostcopyError::OutsideMemory { addr });
                }
                if !self.missing.is_set(page) {
                    // Placed meanwhile, or never sent because it is zero
                    // and was never allocated here: make it present.
                    let dst = self.mem_addr + self.page_size.bytes(page);
                    let present = |source| PostcopyError::Present { page, source };
                    self.uffd.copy(dst, &self.zeros).map_err(present)?;
                    self.uffd
                        .wake(dst, self.page_size.as_u64())
                        .map_err(present)?;
                    continue;
                }
                self.request(requests, page, now)?;
            }
            self.check_timeout()?;
        }
        Ok(())
    }

    /// Ask for `page` (and the pages around it, pre-paging) unless asked already.
    fn request(&self, w: &mut Conn, page: u64, now: Instant) -> Result<(), PostcopyError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !self.missing.is_set(page) {
            // Placed since the fault was read (which woke the vCPU).
            return Ok(());
        }
        if let Some(t) = pending.get_mut(&page) {
            // Asked for already (pre-paged, or a second vCPU): time it from this fault.
            t.get_or_insert(now);
            return Ok(());
        }
        pending.insert(page, Some(now));
        let (first, end) = bubble(page, self.prepage, self.page_count, |p| {
            self.missing.is_set(p) && !pending.contains_key(&p)
        });
        for p in (first..end).filter(|&p| p != page) {
            pending.insert(p, None);
        }
        drop(pending);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let m = Message::page_request(first, (end - first) as u32, (page - first) as u32);
        protocol::write_message(w, &m)
            .map(|_| ())
            .map_err(|e| PostcopyError::Request {
                page,
                source: Arc::new(e),
            })
    }

    fn check_timeout(&self) -> Result<(), PostcopyError> {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = pending.iter().filter_map(|(p, t)| t.map(|t| (t, *p))).min();
        match oldest {
            Some((t, page)) if t.elapsed() > self.timeout => Err(PostcopyError::NotArrived {
                page,
                secs: self.timeout.as_secs_f64(),
            }),
            _ => Ok(()),
        }
    }

    /// The request connection's reader: place the pages that answer requests.
    pub fn serve_replies(&self, mut r: Conn, limits: &Limits, landed: &Landed) {
        let mut buf = Vec::new();
        loop {
            match protocol::read_frame(&mut r, Some(limits)) {
                Ok(Frame::Run(PageRun::Pages { first_page, count })) => {
                    buf.resize(count as usize * self.page_size.as_usize(), 0);
                    if let Err(e) = protocol::read_bulk(&mut r, &mut buf, Kind::Pages) {
                        return self.fail_unless_stopped(PostcopyError::ReadPages(Arc::new(e)));
                    }
                    if let Err(e) = self.place(first_page, &buf, landed, Path::Pulled) {
                        return self.fail(e);
                    }
                }
                Ok(f) => return self.fail(PostcopyError::Unexpected(f.kind())),
                Err(e) => return self.fail_unless_stopped(PostcopyError::Connection(Arc::new(e))),
            }
        }
    }

    fn fail_unless_stopped(&self, why: PostcopyError) {
        if !self.stop.load(Ordering::Acquire) && self.remaining() > 0 {
            self.fail(why);
        }
    }

    /// The figures so far.
    pub fn stats(&self) -> PostcopyStats {
        let h = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        PostcopyStats {
            postcopy_requests: self.requests.load(Ordering::Relaxed),
            pages_pulled: self.pulled.load(Ordering::Relaxed),
            pages_pushed: self.pushed.load(Ordering::Relaxed),
            postcopy_faults: self.faults.load(Ordering::Relaxed),
            fault_latency_us: (!h.is_empty()).then(|| Latency {
                count: h.len(),
                p50: h.value_at_quantile(0.5),
                p99: h.value_at_quantile(0.99),
                max: h.max(),
            }),
            postcopy_populated_ms: None,
            postcopy_discard_ms: None,
            guest_rate_postcopy_pps: None,
        }
    }
}

/// Pre-paging: the run `first..end` to ask for around faulted `page`, with
/// up to `prepage` more pages (at most a run's worth), half before the
/// fault and half after, as far as each is `wanted` (missing and not asked
/// for yet) and inside memory of `page_count` pages.
fn bubble(page: u64, prepage: u32, page_count: u64, wanted: impl Fn(u64) -> bool) -> (u64, u64) {
    let n = u64::from(prepage.min(MAX_RUN_PAGES - 1));
    let (mut first, mut end) = (page, page + 1);
    while end < page_count && end - page <= n - n / 2 && wanted(end) {
        end += 1;
    }
    while first > 0 && page - first < n / 2 && wanted(first - 1) {
        first -= 1;
    }
    (first, end)
}

/// The source's page server: answer each request with the pages asked for,
/// straight from the paused guest's memory, and note them as sent so the
/// push skips them.
pub struct Server {
    pub sent: SentPages,
    pub requests: AtomicU64,
    /// Pages and bytes sent in answer to requests.
    pub pulled: AtomicU64,
    pub bytes: AtomicU64,
}

impl Server {
    /// Send pages `first..first+n` on `conn`, charged to the rate limit
    /// without waiting on it: a vCPU waits on this reply.
    fn reply(
        &self,
        conn: &mut Conn,
        mem: &GuestMemory,
        limits: &Limits,
        limiter: &RateLimiter,
        first: u64,
        n: u64,
    ) -> Result<(), ProtocolError> {
        let header = protocol::pages_frame_header(first, n as u32, limits.page_size);
        // SAFETY: the source guest is paused: nothing writes its memory.
        let data = unsafe { mem.pages(first, n) };
        let len = (header.len() + data.len()) as u64;
        limiter.charge(len);
        let mut bufs = [std::io::IoSlice::new(&header), std::io::IoSlice::new(data)];
        crate::util::netio::write_all_vectored(conn, &mut bufs).map_err(ProtocolError::Io)?;
        self.pulled.fetch_add(n, Ordering::Relaxed);
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

/// Pages already sent during post-copy (by either path).
pub struct SentPages(AtomicBitmap);

impl SentPages {
    pub fn new(pages: u64) -> Self {
        SentPages(AtomicBitmap::new(pages))
    }
    /// Mark `page` sent; false if it was already.
    pub fn mark(&self, page: u64) -> bool {
        self.0.mark(page)
    }
}

impl Server {
    pub fn new(pages: u64) -> Self {
        Self {
            sent: SentPages::new(pages),
            requests: AtomicU64::new(0),
            pulled: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Serve requests on `conn` until the destination closes it. Replies
    /// count against the migration's one rate limit without waiting on it.
    pub fn serve(
        &self,
        mut conn: Conn,
        mem: &GuestMemory,
        limits: &Limits,
        limiter: &RateLimiter,
    ) -> Result<(), ProtocolError> {
        loop {
            let (first, count, fault) = match protocol::read_frame(&mut conn, Some(limits)) {
                Ok(Frame::Message(Message::PageRequest(PageRequest {
                    first_page,
                    count,
                    fault,
                }))) => (first_page, count, fault),
                Ok(f) => {
                    return Err(ProtocolError::Unexpected {
                        got: f.kind(),
                        expected: "a page request".into(),
                    })
                }
                Err(ProtocolError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            };
            self.requests.fetch_add(1, Ordering::Relaxed);
            // The faulted page goes first, whatever the push did (it may
            // still be queued behind the push); the bubble around it only
            // where the push has not sent it.
            let faulted = first + u64::from(fault);
            self.sent.mark(faulted);
            self.reply(&mut conn, mem, limits, limiter, faulted, 1)?;
            let mut p = first;
            let end = first + u64::from(count);
            while p < end {
                if p == faulted || !self.sent.mark(p) {
                    p += 1;
                    continue;
                }
                let mut q = p + 1;
                while q < end && q != faulted && self.sent.mark(q) {
                    q += 1;
                }
                self.reply(&mut conn, mem, limits, limiter, p, q - p)?;
                p = q;
            }
            conn.flush().map_err(ProtocolError::Io)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    const PAGES: u64 = 256;
    const LIMITS: Limits = Limits {
        streams: 1,
        page_size: 4096,
        page_count: PAGES,
    };

    #[test]
    fn prepaging_stays_inside_memory_at_both_edges() {
        let all = |_| true;
        // In the middle: 7 pages before the fault, 8 after.
        assert_eq!(bubble(100, 15, PAGES, all), (93, 109));
        // At the first page nothing lies before it; at the last nothing after.
        assert_eq!(bubble(0, 15, PAGES, all), (0, 9));
        assert_eq!(bubble(PAGES - 1, 15, PAGES, all), (PAGES - 8, PAGES));
        // Near the end the run stops at the last page.
        assert_eq!(bubble(PAGES - 3, 15, PAGES, all), (PAGES - 10, PAGES));
        assert_eq!(bubble(0, 15, 1, all), (0, 1));
        // No pre-paging: the faulted page alone.
        assert_eq!(bubble(PAGES - 1, 0, PAGES, all), (PAGES - 1, PAGES));
        // A page present or asked for already ends the run on its side.
        assert_eq!(bubble(100, 15, PAGES, |p| p != 103 && p != 98), (99, 103));
        // At most one run, however many pages are asked for.
        let (first, end) = bubble(1 << 20, u32::MAX, 1 << 21, all);
        assert_eq!(end - first, u64::from(MAX_RUN_PAGES));
        // Each of these is a request the source accepts.
        for page in [0, 1, 100, PAGES - 2, PAGES - 1] {
            let (first, end) = bubble(page, 15, PAGES, all);
            let m = Message::page_request(first, (end - first) as u32, (page - first) as u32);
            let got = protocol::read_frame(&mut &m.encode()[..], Some(&LIMITS)).unwrap();
            assert!(
                matches!(got, Frame::Message(Message::PageRequest(_))),
                "{page}"
            );
        }
    }

    /// A reply: its first page and its bytes.
    type Reply = (u64, Vec<u8>);

    /// A page server over loopback on memory whose page p is filled with
    /// byte p; the destination's end of its request connection.
    fn serving(
        talk: impl FnOnce(&mut TcpStream) + Send,
    ) -> (Result<(), ProtocolError>, Vec<Reply>) {
        let mem = GuestMemory::create(PAGES * 4096, PageSize::MIN).unwrap();
        for p in 0..PAGES {
            // SAFETY: nothing else maps this memory.
            unsafe { mem.pages_mut(p, 1) }.fill(p as u8);
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut dest = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (src, _) = l.accept().unwrap();
        let server = Server::new(PAGES);
        let limiter = RateLimiter::new(None);
        std::thread::scope(|s| {
            let served = s.spawn(|| server.serve(Conn::plain(src), &mem, &LIMITS, &limiter));
            talk(&mut dest);
            dest.shutdown(std::net::Shutdown::Write).unwrap();
            let mut replies = Vec::new();
            while let Ok(Frame::Run(PageRun::Pages { first_page, count })) =
                protocol::read_frame(&mut dest, Some(&LIMITS))
            {
                let mut buf = vec![0; count as usize * 4096];
                protocol::read_bulk(&mut dest, &mut buf, Kind::Pages).unwrap();
                replies.push((first_page, buf));
            }
            (served.join().unwrap(), replies)
        })
    }

    fn request(first: u64, count: u32, fault: u32) -> impl FnOnce(&mut TcpStream) + Send {
        move |s| {
            protocol::write_message(s, &Message::page_request(first, count, fault)).unwrap();
        }
    }

    #[test]
    fn requests_at_the_edges_are_answered_with_the_faulted_page_first() {
        // The last page, with the 7 before it.
        let (r, replies) = serving(request(PAGES - 8, 8, 7));
        r.unwrap();
        let firsts: Vec<(u64, usize)> = replies.iter().map(|(f, b)| (*f, b.len() / 4096)).collect();
        assert_eq!(firsts, [(PAGES - 1, 1), (PAGES - 8, 7)]);
        for (first, bytes) in &replies {
            for (i, page) in bytes.chunks(4096).enumerate() {
                assert!(page.iter().all(|&b| b == (*first as usize + i) as u8));
            }
        }
        // The first page, with the 8 after it.
        let (r, replies) = serving(request(0, 9, 0));
        r.unwrap();
        let firsts: Vec<(u64, usize)> = replies.iter().map(|(f, b)| (*f, b.len() / 4096)).collect();
        assert_eq!(firsts, [(0, 1), (1, 8)]);
    }

    #[test]
    fn a_bad_request_ends_the_server_naming_it_and_sends_nothing() {
        // A run past the last page.
        let (r, replies) = serving(request(PAGES - 4, 8, 0));
        assert!(
            matches!(
                r,
                Err(ProtocolError::OutOfRange {
                    first: 252,
                    count: 8,
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(replies.is_empty());
        // Another kind of frame on the request connection.
        let (r, replies) = serving(|s| {
            protocol::write_message(s, &Message::round_start(0, false)).unwrap();
        });
        assert!(
            matches!(
                r,
                Err(ProtocolError::Unexpected {
                    got: Kind::RoundStart,
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(replies.is_empty());
        // A faulted page outside its own run.
        let (r, _) = serving(|s| {
            let mut m = Message::page_request(10, 2, 0).encode();
            m[8 + 12..].copy_from_slice(&2u32.to_le_bytes());
            std::io::Write::write_all(s, &m).unwrap();
        });
        assert!(matches!(r, Err(ProtocolError::BadField { .. })), "{r:?}");
        // The destination closing the connection is the normal end.
        let (r, replies) = serving(|_| {});
        assert!(r.is_ok() && replies.is_empty(), "{r:?}");
    }
}

//! Data reduction on the migration data path: skip zero pages, compress the rest.
//!
//! [`is_zero`] is QEMU's `buffer_is_zero`: a zero page travels as a page
//! number alone. [`Compressor`] / [`Decompressor`] wrap LZ4 (block format,
//! fast, modest ratio) and zstd (level 1, QEMU's `multifd-zstd-level`
//! default: slower, better ratio). Each side keeps one context per data stream
//! and reuses it, so a warm stream allocates nothing per call. Every payload
//! is self-contained (one LZ4 block / one zstd frame) and the receiver already
//! knows its decoded size, so the decoder writes into the destination page
//! directly and treats any other outcome as corruption: the payload came off
//! the wire and is untrusted.

use std::fmt;

use lz4_flex::block::{CompressTable, DecompressError};

/// QEMU's `multifd-zstd-level` default, zstd's fastest regular level.
const ZSTD_LEVEL: i32 = 1;

/// Errors from codec selection, setup, compression and decompression.
#[derive(Debug, thiserror::Error)]
pub enum ReduceError {
    #[error("cannot create a {codec} context")]
    Context {
        codec: Codec,
        #[source]
        source: std::io::Error,
    },
    #[error("{codec} compression of {len} bytes failed")]
    Compress {
        codec: Codec,
        len: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The payload failed to decode, or decoded to other than the expected
    /// size; `why` says which, with the sizes.
    #[error("corrupt {codec} payload: {why}")]
    Corrupt { codec: Codec, why: String },
}

/// True if every byte of `page` is zero (QEMU's `buffer_is_zero`).
///
/// A non-zero page usually has a non-zero byte at its start, middle or end,
/// so those three are checked first (as QEMU does); then 64-byte blocks are
/// OR-reduced as u128 words, which the compiler turns into vector loads, with
/// an early exit after each block.
#[inline]
pub fn is_zero(page: &[u8]) -> bool {
    let Some((&first, &last)) = page.first().zip(page.last()) else {
        return true;
    };
    if first | last | page[page.len() / 2] != 0 {
        return false;
    }
    let blocks = page.chunks_exact(64);
    let tail = blocks.remainder();
    for block in blocks {
        let acc = block.chunks_exact(16).fold(0u128, |acc, w| {
            acc | u128::from_ne_bytes(w.try_into().expect("16 bytes"))
        });
        if acc != 0 {
            return false;
        }
    }
    let words = tail.chunks_exact(8);
    let bytes = words.remainder();
    words.fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
    }) == 0
        && bytes.iter().all(|&b| b == 0)
}

/// A codec name livemig does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected lz4 or zstd")]
pub struct UnknownCodec;

impl std::str::FromStr for Codec {
    type Err = UnknownCodec;

    /// `lz4` | `zstd` (ASCII case ignored).
    fn from_str(s: &str) -> Result<Codec, UnknownCodec> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("lz4") {
            Ok(Codec::Lz4)
        } else if t.eq_ignore_ascii_case("zstd") {
            Ok(Codec::Zstd)
        } else {
            Err(UnknownCodec)
        }
    }
}

/// A compression algorithm, as chosen by `--compress` and named on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Lz4,
    Zstd,
}

impl Codec {
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    /// The codec's number on the wire; 0 is reserved for "no codec".
    pub fn wire_id(self) -> u32 {
        match self {
            Codec::Lz4 => 1,
            Codec::Zstd => 2,
        }
    }

    /// The codec numbered `id` on the wire; `None` for 0 and unknown numbers.
    pub fn from_wire(id: u32) -> Option<Codec> {
        match id {
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One compression context per data stream, reused across calls.
pub struct Compressor {
    inner: CompressorInner,
}

enum CompressorInner {
    Lz4 {
        /// 16-bit hash table for inputs under 64 KiB (a page), cleared per call.
        small: CompressTable,
        /// 32-bit table for larger inputs, made on the first one.
        large: Option<CompressTable>,
        /// lz4_flex writes into an initialised slice; compressing here and
        /// copying the result out costs the compressed size, where zeroing
        /// `out` to the worst case would cost more than the input size.
        scratch: Vec<u8>,
    },
    Zstd(zstd::bulk::Compressor<'static>),
}

impl Compressor {
    /// A context for `codec` (zstd at level 1).
    pub fn new(codec: Codec) -> Result<Self, ReduceError> {
        let inner = match codec {
            Codec::Lz4 => CompressorInner::Lz4 {
                small: CompressTable::small(),
                large: None,
                scratch: Vec::new(),
            },
            Codec::Zstd => CompressorInner::Zstd(
                zstd::bulk::Compressor::new(ZSTD_LEVEL)
                    .map_err(|source| ReduceError::Context { codec, source })?,
            ),
        };
        Ok(Compressor { inner })
    }

    pub fn codec(&self) -> Codec {
        match self.inner {
            CompressorInner::Lz4 { .. } => Codec::Lz4,
            CompressorInner::Zstd(_) => Codec::Zstd,
        }
    }

    /// Clears `out` and fills it with the compressed form of `input` (one
    /// self-contained LZ4 block or zstd frame). `out` only grows, so a reused
    /// buffer stops allocating once it has held the largest payload.
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), ReduceError> {
        out.clear();
        let failed =
            |codec, source: Box<dyn std::error::Error + Send + Sync>| ReduceError::Compress {
                codec,
                len: input.len(),
                source,
            };
        match &mut self.inner {
            CompressorInner::Lz4 {
                small,
                large,
                scratch,
            } => {
                let bound = lz4_flex::block::get_maximum_output_size(input.len());
                if scratch.len() < bound {
                    scratch.resize(bound, 0);
                }
                let table = if input.len() < usize::from(u16::MAX) {
                    small
                } else {
                    large.get_or_insert_with(CompressTable::large)
                };
                let n = lz4_flex::block::compress_into_with_table(input, scratch, table)
                    .map_err(|e| failed(Codec::Lz4, Box::new(e)))?;
                out.extend_from_slice(&scratch[..n]);
            }
            CompressorInner::Zstd(c) => {
                // zstd writes into the spare capacity; no zeroing needed.
                out.reserve(zstd::compress_bound(input.len()));
                c.compress_to_buffer(input, out)
                    .map_err(|e| failed(Codec::Zstd, Box::new(e)))?;
            }
        }
        Ok(())
    }
}

/// One decompression context per data stream, reused across calls.
pub struct Decompressor {
    inner: DecompressorInner,
}

enum DecompressorInner {
    /// LZ4 block decoding needs no state.
    Lz4,
    Zstd(zstd::bulk::Decompressor<'static>),
}

impl Decompressor {
    pub fn new(codec: Codec) -> Result<Self, ReduceError> {
        let inner = match codec {
            Codec::Lz4 => DecompressorInner::Lz4,
            Codec::Zstd => DecompressorInner::Zstd(
                zstd::bulk::Decompressor::new()
                    .map_err(|source| ReduceError::Context { codec, source })?,
            ),
        };
        Ok(Decompressor { inner })
    }

    pub fn codec(&self) -> Codec {
        match self.inner {
            DecompressorInner::Lz4 => Codec::Lz4,
            DecompressorInner::Zstd(_) => Codec::Zstd,
        }
    }

    /// Decompresses `input` into exactly `out.len()` bytes.
    ///
    /// `input` is untrusted: a decoding error, or a payload that decodes to
    /// fewer or more bytes than `out.len()`, is [`ReduceError::Corrupt`].
    /// Both decoders write only inside `out` (zstd single-shot decoding into
    /// a fixed buffer, LZ4 through lz4_flex's bounds-checked `safe-decode`),
    /// and neither allocates from a size found in `input`. On error `out`
    /// may hold partial output.
    pub fn decompress_into(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), ReduceError> {
        let want = out.len();
        let codec = self.codec();
        let corrupt = |why: String| ReduceError::Corrupt { codec, why };
        let got = match &mut self.inner {
            DecompressorInner::Lz4 => match lz4_flex::block::decompress_into(input, out) {
                Ok(n) => n,
                Err(DecompressError::OutputTooSmall { .. }) => {
                    return Err(corrupt(format!(
                        "decodes to more than {want} bytes ({} byte payload)",
                        input.len()
                    )))
                }
                Err(e) => {
                    return Err(corrupt(format!(
                        "{e} (decoding {} bytes into {want})",
                        input.len()
                    )))
                }
            },
            DecompressorInner::Zstd(d) => d.decompress_to_buffer(input, out).map_err(|e| {
                corrupt(format!("{e} (decoding {} bytes into {want})", input.len()))
            })?,
        };
        if got != want {
            return Err(corrupt(format!("{got} of {want} bytes decoded")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xxhash_rust::xxh3::xxh3_64;

    const CODECS: [Codec; 2] = [Codec::Lz4, Codec::Zstd];

    /// Deterministic pseudo-random bytes: xxh3 of a counter.
    fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        (0..len.div_ceil(8) as u64)
            .flat_map(|i| xxh3_64(&(seed << 32 | i).to_le_bytes()).to_le_bytes())
            .take(len)
            .collect()
    }

    /// Four pages: zero, a stamp, half random, all random.
    fn sample() -> Vec<u8> {
        let mut v = vec![0u8; 4 * 4096];
        v[4096 + 8..4096 + 16].copy_from_slice(&0xDEAD_BEEF_u64.to_le_bytes());
        v[2 * 4096..2 * 4096 + 2048].copy_from_slice(&random_bytes(1, 2048));
        v[3 * 4096..].copy_from_slice(&random_bytes(2, 4096));
        v
    }

    fn compress(codec: Codec, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Compressor::new(codec)
            .unwrap()
            .compress(input, &mut out)
            .unwrap();
        out
    }

    fn assert_corrupt(r: Result<(), ReduceError>, codec: Codec, what: &str) {
        match r {
            Err(e @ ReduceError::Corrupt { codec: c, .. }) if c == codec => {
                assert!(
                    e.to_string()
                        .starts_with(&format!("corrupt {codec} payload: ")),
                    "{e}"
                );
            }
            other => panic!("{codec} {what}: expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn is_zero_finds_any_nonzero_byte() {
        for len in (0..=64).chain([4095, 4096, 4097]) {
            let mut page = vec![0u8; len];
            assert!(is_zero(&page), "len {len}");
            let spots: Vec<usize> = if len <= 64 {
                (0..len).collect()
            } else {
                vec![
                    0,
                    1,
                    7,
                    8,
                    63,
                    64,
                    len / 2 - 1,
                    len / 2 + 1,
                    len - 9,
                    len - 2,
                    len - 1,
                ]
            };
            for i in spots {
                for bit in [0x01, 0x80] {
                    page[i] = bit;
                    assert!(!is_zero(&page), "len {len}, byte {i} = {bit:#x}");
                    assert!(!is_zero(&page[i..]), "len {len}, from {i}");
                    page[i] = 0;
                }
            }
        }
    }

    #[test]
    fn is_zero_on_unaligned_slices() {
        let buf = vec![0u8; 4096 + 64];
        for start in 0..16 {
            assert!(is_zero(&buf[start..start + 4096]));
        }
        let mut buf = buf;
        buf[4096 + 3] = 1;
        for start in 0..16 {
            assert_eq!(is_zero(&buf[start..start + 4096]), start + 4096 <= 4096 + 3);
        }
    }

    #[test]
    fn codec_names_and_wire_ids() {
        for codec in CODECS {
            assert_eq!(codec.to_string().parse::<Codec>(), Ok(codec));
            assert_eq!(Codec::from_wire(codec.wire_id()), Some(codec));
            assert_eq!(codec.to_string(), codec.as_str());
        }
        assert_eq!(" ZSTD ".parse::<Codec>(), Ok(Codec::Zstd));
        assert_eq!(Codec::from_wire(0), None);
        assert_eq!(Codec::from_wire(3), None);
        let e = "gzip".parse::<Codec>().unwrap_err().to_string();
        assert_eq!(e, "expected lz4 or zstd");
    }

    #[test]
    fn round_trips() {
        let data = sample();
        for codec in CODECS {
            let mut c = Compressor::new(codec).unwrap();
            let mut d = Decompressor::new(codec).unwrap();
            assert_eq!((c.codec(), d.codec()), (codec, codec));
            let mut packed = Vec::new();
            // Every page alone, the whole sample, a 1 MiB block (large LZ4
            // table), an empty input, then a page again (back to the small table).
            let big: Vec<u8> = data.iter().copied().cycle().take(1 << 20).collect();
            let inputs = [
                &data[..4096],
                &data[4096..8192],
                &data[8192..12288],
                &data[12288..],
            ]
            .into_iter()
            .chain([&data[..], &big[..], &[][..], &data[4096..8192]]);
            for input in inputs {
                c.compress(input, &mut packed).unwrap();
                let mut out = vec![0xAAu8; input.len()];
                d.decompress_into(&packed, &mut out).unwrap();
                assert!(out == input, "{codec}: {} bytes", input.len());
            }
            // Compression pays on the zero and stamped pages.
            c.compress(&data[4096..8192], &mut packed).unwrap();
            assert!(
                packed.len() < 64,
                "{codec}: stamp page -> {} bytes",
                packed.len()
            );
        }
    }

    #[test]
    fn wrong_sizes_are_corrupt() {
        let page = sample()[8192..12288].to_vec();
        for codec in CODECS {
            let packed = compress(codec, &page);
            let mut d = Decompressor::new(codec).unwrap();
            let mut short = vec![0u8; 4095];
            let r = d.decompress_into(&packed, &mut short);
            assert_corrupt(r, codec, "longer than out");
            let mut long = vec![0u8; 8192];
            let e = d
                .decompress_into(&packed, &mut long)
                .unwrap_err()
                .to_string();
            assert_eq!(
                e,
                format!("corrupt {codec} payload: 4096 of 8192 bytes decoded")
            );
            // A valid payload for nothing, where a page is expected.
            let mut one = vec![0u8; 4096];
            assert_corrupt(
                d.decompress_into(&compress(codec, &[]), &mut one),
                codec,
                "empty payload",
            );
            assert_corrupt(d.decompress_into(&[], &mut one), codec, "no input");
        }
    }

    #[test]
    fn lz4_longer_message() {
        let packed = compress(Codec::Lz4, &[7u8; 100]);
        let mut out = [0u8; 10];
        let e = Decompressor::new(Codec::Lz4)
            .unwrap()
            .decompress_into(&packed, &mut out)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("corrupt lz4 payload: decodes to more than 10 bytes"),
            "{e}"
        );
    }

    #[test]
    fn mutated_payloads_never_panic() {
        // Small enough to mutate every byte, varied enough to hold matches and literals.
        let mut page = vec![0u8; 4096];
        page[100..400].copy_from_slice(&random_bytes(3, 300));
        page[1000..1300].copy_from_slice(&random_bytes(3, 300));
        page[3000..3008].copy_from_slice(&u64::MAX.to_le_bytes());
        for codec in CODECS {
            let packed = compress(codec, &page);
            let mut d = Decompressor::new(codec).unwrap();
            let mut out = vec![0u8; page.len()];
            for len in 0..packed.len() {
                let r = d.decompress_into(&packed[..len], &mut out);
                assert_corrupt(r, codec, &format!("truncated to {len}"));
            }
            for i in 0..packed.len() {
                for flip in [0x01u8, 0x80, 0xFF] {
                    let mut bad = packed.clone();
                    bad[i] ^= flip;
                    // A flip may still decode to 4096 bytes (e.g. in a literal);
                    // what matters is no panic, and Ok only when a whole page
                    // was produced: decoding over two different fillings of
                    // `out` must give the same bytes, so none was left over.
                    out.fill(0x00);
                    match d.decompress_into(&bad, &mut out) {
                        Ok(()) => {
                            let first = out.clone();
                            out.fill(0xFF);
                            d.decompress_into(&bad, &mut out).unwrap();
                            assert!(first == out, "{codec} flip {i}: a partial page passed");
                        }
                        Err(ReduceError::Corrupt { codec: c, .. }) => assert_eq!(c, codec),
                        Err(e) => panic!("{codec} flip {i}: {e:?}"),
                    }
                }
            }
            // Garbage of many lengths, including huge claimed sizes.
            for seed in 0..500 {
                let junk = random_bytes(1000 + seed, (seed as usize * 7) % 300);
                let _ = d.decompress_into(&junk, &mut out);
            }
            // A zstd header that claims 2^40 bytes must not allocate or succeed.
            let mut claim = vec![0x28, 0xB5, 0x2F, 0xFD, 0xE0];
            claim.extend_from_slice(&(1u64 << 40).to_le_bytes());
            claim.extend_from_slice(&[1, 0, 0]);
            assert!(d.decompress_into(&claim, &mut out).is_err());
            // The context still works after all that.
            d.decompress_into(&packed, &mut out).unwrap();
            assert!(out == page);
        }
    }
}

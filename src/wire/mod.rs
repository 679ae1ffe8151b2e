//! What travels between the two ends: the framed [`protocol`], the
//! [`datapath`] that moves runs of pages in and out of guest memory, its
//! codecs ([`reduce`], [`xbzrle`]) and the [`ratelimit`] that paces it.

pub mod datapath;
pub mod protocol;
pub mod ratelimit;
pub mod reduce;
pub mod transport;
pub mod xbzrle;

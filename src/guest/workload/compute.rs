//! `compute:ops=N,wws=SIZE`: a CPU-bound guest, in the spirit of the
//! Dhrystone and Livermore-loop benchmarks migrations are measured with
//! (Shreya et al.): mostly arithmetic on data in registers and cache, with
//! one page of a small working set written every N operations. An
//! operation is one iteration of Livermore loop 1 (the hydro fragment,
//! `x[k] = q + y[k] * (r * z[k+10] + t * z[k+11])`, five floating-point
//! operations) over arrays on the vCPU's stack. Its progress is operations
//! per second, published per vCPU in the control block (`work_ops`).

/// Operations between two looks at the pause flag and the throttle (about
/// 10 µs of work), so a pause never waits long for a busy vCPU.
pub const CHUNK: u64 = 4096;

const N: usize = 64;

/// One vCPU's arithmetic state.
pub struct Kernel {
    x: [f64; N],
    y: [f64; N],
    z: [f64; N + 12],
    k: usize,
}

impl Default for Kernel {
    fn default() -> Self {
        // f64 from small indices, exactly.
        let f = |i: usize| 1.0 + (i as f64) * 1e-3;
        Self {
            x: [0.0; N],
            y: std::array::from_fn(f),
            z: std::array::from_fn(|i| f(i) * 0.5),
            k: 0,
        }
    }
}

impl Kernel {
    /// Do `n` operations.
    #[inline]
    pub fn run(&mut self, n: u64) {
        let (q, r, t) = (0.5, 0.25, 0.125);
        for _ in 0..n {
            let k = self.k;
            self.x[k] = q + self.y[k] * (r * self.z[k + 10] + t * self.z[k + 11]);
            // The next iteration reads what this one wrote, so the work
            // cannot be skipped or hoisted.
            self.y[(k + 1) % N] = self.x[k] * 0.999_999 + 0.000_001;
            self.k = (k + 1) % N;
        }
        std::hint::black_box(&self.x);
    }
}

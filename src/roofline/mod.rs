//! The hardware bound that every figure is a share of: this machine's measured memory read
//! bandwidth and f32 FMA peak (and, on a GPU, the device's properties and measured copy
//! bandwidth), the napkin math of each op ([`cost`]), the fixtures that time an op alone at real
//! shapes ([`fixture`]) and the report of `kvlab roofline` ([`report`]).
//!
//! Roofline: an op of intensity I FLOP/byte can at best run at min(peak, I × bandwidth); the
//! share of that bound it reaches says how much room is left.

pub mod cost;
pub mod fixture;
pub mod report;

use crate::backend::cpu::simd::{has_avx2_fma, Fused, MulAdd, Unfused};
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// Median and spread of a repeated measurement.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
            samples: n,
        }
    }
}

/// Host read bandwidth in GB/s: every thread of the pool sums its share of a `bytes` buffer
/// (far larger than the caches), `reps` times after one warm-up pass.
///
/// The buffer asks for 2 MiB pages, as a model file in the page cache is mapped where its folios
/// are large, and each task reads four streams far apart (the quarters of its range), as the
/// decode matvec reads four weight rows. A pass over 4 KiB pages with one stream per task read
/// less than the decode step itself on a 2-vCPU EPYC VM (21.6 vs 23.9 GB/s in one bench run).
pub fn host_read_bandwidth(bytes: usize, reps: usize) -> anyhow::Result<Spread> {
    const STREAMS: usize = 4;
    const TASK_WORDS: usize = 1 << 16;
    let words = (bytes / 8).next_multiple_of(TASK_WORDS);
    let mut buffer = memmap2::MmapMut::map_anon(words * 8).map_err(|e| {
        anyhow::anyhow!(
            "bandwidth probe: cannot map a buffer of {} MiB: {e}",
            (words * 8) >> 20
        )
    })?;
    #[cfg(target_os = "linux")]
    // Only a hint: without transparent huge pages the pass reads 4 KiB pages.
    let _ = buffer.advise(memmap2::Advice::HugePage);
    let buffer: &mut [u64] = bytemuck::cast_slice_mut(&mut buffer[..]);
    buffer
        .par_chunks_mut(TASK_WORDS)
        .enumerate()
        .for_each(|(t, c)| {
            let first = (t * TASK_WORDS) as u64;
            c.iter_mut()
                .zip(first..)
                .for_each(|(w, i)| *w = i.wrapping_mul(0x9e37_79b9))
        });
    let buffer: &[u64] = buffer;
    let pass = || -> f64 {
        let start = Instant::now();
        let sum: u64 = buffer
            .par_chunks(TASK_WORDS)
            .map(|task| {
                let quarter = task.len() / STREAMS;
                let (a, rest) = task.split_at(quarter);
                let (b, rest) = rest.split_at(quarter);
                let (c, d) = rest.split_at(quarter);
                a.iter()
                    .zip(b)
                    .zip(c)
                    .zip(d)
                    .fold(0u64, |s, (((a, b), c), d)| {
                        s.wrapping_add(a ^ b).wrapping_add(c ^ d)
                    })
            })
            .reduce(|| 0, |a, b| a.wrapping_add(b));
        std::hint::black_box(sum);
        (words * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    pass();
    let samples: Vec<f64> = (0..reps).map(|_| pass()).collect();
    Ok(Spread::of(&samples))
}

/// The host's f32 peak in GFLOP/s: every thread of the pool runs independent multiply-add
/// chains that stay in registers (AVX2 + FMA where the CPU has them), `reps` times after one
/// warm-up pass.
pub fn host_fma_peak(reps: usize) -> Spread {
    const ITERS: usize = 4_000_000;
    let threads = rayon::current_num_threads();
    let pass = || -> f64 {
        let start = Instant::now();
        let sum: f32 = (0..threads)
            .into_par_iter()
            .map(|_| fma_chains(ITERS))
            .sum();
        std::hint::black_box(sum);
        (threads * ITERS * FMA_CHAINS * 2) as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    pass();
    let samples: Vec<f64> = (0..reps).map(|_| pass()).collect();
    Spread::of(&samples)
}

/// Independent accumulators: 12 AVX registers, more than FMA latency (4 to 5 cycles) × 2 ports.
const FMA_CHAINS: usize = 96;

fn fma_chains(iters: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { fma_chains_avx2(iters) };
    }
    fma_chains_with::<Unfused>(iters)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_chains_avx2(iters: usize) -> f32 {
    fma_chains_with::<Fused>(iters)
}

#[inline(always)]
fn fma_chains_with<M: MulAdd>(iters: usize) -> f32 {
    let mut acc = [0.0f32; FMA_CHAINS];
    let (a, b) = (
        std::hint::black_box(0.999_999f32),
        std::hint::black_box(1e-7f32),
    );
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = M::mul_add(*x, a, b);
        }
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle() {
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max, s.samples), (2.5, 1.0, 10.0, 4));
        assert_eq!(Spread::of(&[5.0, 1.0, 4.0]).median, 4.0);
    }
}

//! Our f32-activation quantized matmul (`vicugna_engine::kernels::QMatrix`) against
//! candle's `QMatMul`, on SmolLM2-135M's shapes.
//!
//! `cargo run --release -p vicugna-engine --example qmatmul_bench [-- --quick]`
//! (`RAYON_NUM_THREADS` sets the threads). Each case cycles over enough copies of
//! the matrix to fill ~96 MB, as decoding one token of the real model does, so
//! n = 1 measures streaming from memory rather than from L2. GB/s counts the
//! quantized weight bytes read per product. Times are the best of repeated passes;
//! `--hot` uses a single copy (cache-resident: the compute cost alone);
//! `--ours` skips candle; `--n N` runs n = N only (default 1, 8 and 128); `--int8` measures our 8-bit
//! activation scheme (AVX-512 VNNI) instead of f32 activations; `--llama-1b` and
//! `--llama-8b` use Llama 3.2 1B's or Llama 3.1 8B's K-quant shapes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use vicugna_engine::kernels::{Aligned, QMatrix};

/// Seconds per call: the best of repeated passes over all copies (the machine
/// may be shared; the minimum is the least disturbed pass).
fn time_per_call(mut f: impl FnMut(usize), copies: usize, budget: Duration) -> f64 {
    for i in 0..copies.min(4) {
        f(i); // warm up (threads, page faults)
    }
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut passes = 0;
    while passes < 3 || start.elapsed() < budget {
        // At least ~2 ms per sample so timer and scheduling noise stay small.
        let t = Instant::now();
        let mut calls = 0;
        while calls < copies || t.elapsed() < Duration::from_millis(2) {
            f(calls % copies);
            calls += 1;
        }
        best = best.min(t.elapsed().as_secs_f64() / calls as f64);
        passes += 1;
    }
    best
}

fn main() -> candle_core::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--hot`: one copy of each matrix, so it stays in cache (compute cost only).
    let hot = std::env::args().any(|a| a == "--hot");
    // `--ours`: skip candle (quicker when tuning).
    let only_ours = std::env::args().any(|a| a == "--ours");
    // `--n N`: only that many activation rows.
    let args: Vec<String> = std::env::args().collect();
    let only_n: Option<usize> = args
        .iter()
        .position(|a| a == "--n")
        .and_then(|i| args.get(i + 1)?.parse().ok());
    vicugna_engine::kernels::set_int8_activations(std::env::args().any(|a| a == "--int8"));
    let budget = Duration::from_millis(if quick { 150 } else { 600 });
    let dev = Device::Cpu;
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:<8} {:>11} {:>4} | {:>10} {:>8} | {:>10} {:>8} | {:>6}",
        "type", "rows x cols", "n", "ours ms", "GB/s", "candle ms", "GB/s", "ratio"
    );
    // `--llama-1b`: Llama 3.2 1B's K-quant shapes (Q4_K_M: Q4_K, Q6_K for some
    // down projections and the output) instead of SmolLM2's.
    let cases: &[(GgmlDType, usize, usize)] = if std::env::args().any(|a| a == "--llama-8b") {
        &[
            (GgmlDType::Q4K, 4096, 4096),
            (GgmlDType::Q4K, 14336, 4096),
            (GgmlDType::Q6K, 4096, 14336),
        ]
    } else if std::env::args().any(|a| a == "--llama-1b") {
        &[
            (GgmlDType::Q4K, 2048, 2048),
            (GgmlDType::Q4K, 8192, 2048),
            (GgmlDType::Q6K, 2048, 8192),
            (GgmlDType::Q5K, 2048, 8192),
        ]
    } else {
        &[
            (GgmlDType::Q4_1, 576, 1536),
            (GgmlDType::Q4_1, 1536, 576),
            (GgmlDType::Q8_0, 49152, 576),
        ]
    };
    for &(dtype, rows, cols) in cases {
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &dev)?;
        let q = Arc::new(QTensor::quantize(&w, dtype)?);
        let bytes = q.storage_size_in_bytes();
        let copies = if hot { 1 } else { (96 << 20) / bytes + 1 };
        let ours: Vec<QMatrix> = (0..copies)
            .map(|_| Ok(QMatrix::from_qtensor(&Arc::new(QTensor::quantize(&w, dtype)?)).expect("supported")))
            .collect::<candle_core::Result<_>>()?;
        let theirs: Vec<QMatMul> = (0..copies)
            .map(|_| QMatMul::from_arc(Arc::new(QTensor::quantize(&w, dtype)?)))
            .collect::<candle_core::Result<_>>()?;
        let ns = only_n.map_or(vec![1, 8, 128], |n| vec![n]);
        for n in ns {
            let x = Tensor::randn(0f32, 1.0, (n, cols), &dev)?;
            // On a cache line, as the engine's own buffers (else `matmul` copies them).
            let xs = Aligned::from_slice(&x.flatten_all()?.to_vec1::<f32>()?);
            let mut out = vec![0f32; n * rows];
            let t_ours = time_per_call(|i| ours[i].matmul(&xs, n, &mut out), copies, budget);
            let t_candle = if only_ours {
                f64::NAN
            } else {
                time_per_call(
                    |i| {
                        theirs[i].forward(&x).expect("candle forward");
                    },
                    copies,
                    budget,
                )
            };
            let gbs = |t: f64| bytes as f64 / t / 1e9;
            println!(
                "{:<8} {:>11} {:>4} | {:>10.3} {:>8.2} | {:>10.3} {:>8.2} | {:>5.1}x",
                format!("{dtype:?}"),
                format!("{rows}x{cols}"),
                n,
                t_ours * 1e3,
                gbs(t_ours),
                t_candle * 1e3,
                gbs(t_candle),
                t_candle / t_ours
            );
        }
    }
    Ok(())
}

//! PNG plots: the length histogram of `data stats` and the training loss curve.
//!
//! plotters draws text with a TrueType font it is given; we read a system font
//! (Debian's `fonts-dejavu-core` or `fonts-liberation`) instead of shipping one.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::error::{Result, TrainError};

const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn font_ready() -> std::result::Result<(), String> {
    static READY: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            for p in FONT_PATHS {
                if let Ok(bytes) = std::fs::read(p) {
                    // plotters keeps fonts for the life of the process.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                        return Ok(());
                    }
                }
            }
            Err(format!(
                "no TrueType font found for the plot's labels (looked at {}); install fonts-dejavu-core",
                FONT_PATHS.join(", ")
            ))
        })
        .clone()
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Plot {
        path: path.into(),
        message: e.to_string(),
    }
}

/// Draws into a temporary PNG next to `path`, then renames it into place.
fn draw_png(path: &Path, draw: impl FnOnce(&Path) -> std::result::Result<(), String>) -> Result<()> {
    font_ready().map_err(|e| plot_err(path, e))?;
    let tmp = path.with_extension(format!("tmp-{}.png", std::process::id()));
    if let Err(e) = draw(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(plot_err(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// A histogram of `values` (e.g. tokens per conversation) in `bins` buckets.
pub fn histogram(path: &Path, values: &[usize], bins: usize, title: &str, x_label: &str) -> Result<()> {
    let max = values.iter().copied().max().unwrap_or(1).max(1);
    let bins = bins.max(1);
    let width = max.div_ceil(bins).max(1);
    let mut counts = vec![0usize; bins];
    for &v in values {
        counts[(v / width).min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    draw_png(path, |tmp| {
        let root = BitMapBackend::new(tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0usize..bins * width, 0usize..top + top / 10 + 1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc("conversations")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(
                counts
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| Rectangle::new([(i * width, 0), ((i + 1) * width, c)], BLUE.mix(0.6).filled())),
            )
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    })
}

/// Training loss per optimizer step, and eval loss where it was measured.
pub fn loss_curve(path: &Path, train: &[(usize, f32)], eval: &[(usize, f32)]) -> Result<()> {
    let last = train.iter().chain(eval).map(|p| p.0).max().unwrap_or(1).max(1);
    let finite = train.iter().chain(eval).map(|p| p.1).filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo > hi { (0.0, 1.0) } else { (lo, hi) };
    let pad = ((hi - lo) * 0.08).max(0.01);
    draw_png(path, |tmp| {
        let root = BitMapBackend::new(tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0usize..last + 1, (lo - pad)..(hi + pad))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("cross-entropy (nats/token)")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
            .map_err(|e| e.to_string())?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), &RED))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))
                .map_err(|e| e.to_string())?
                .label("eval")
                .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    })
}

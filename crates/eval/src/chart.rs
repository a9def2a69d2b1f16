//! A grouped bar chart (one group per category, one bar per model) as PNG or
//! SVG, chosen by the file extension.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{EvalError, Result};

/// What to draw.
pub struct BarChart<'a> {
    /// Title above the chart.
    pub title: &'a str,
    /// Label of the y axis.
    pub y_label: &'a str,
    /// The y axis runs from 0 to this.
    pub y_max: f64,
    /// Group names along the x axis.
    pub categories: &'a [String],
    /// One bar series per model: name and a value per category (None: no data).
    pub series: &'a [(String, Vec<Option<f64>>)],
}

/// Where the chart's text font is looked for (after `$VICUGNA_FONT`).
const FONT_PATHS: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a TrueType font for plotters' pure-Rust text rendering (once).
fn ensure_font() -> std::result::Result<(), String> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("VICUGNA_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        for p in &candidates {
            if let Ok(bytes) = std::fs::read(p) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(
            "no TrueType font for the chart's text: install fonts-dejavu-core, or set VICUGNA_FONT=/path/to/font.ttf"
                .into(),
        )
    })
    .clone()
}

/// Draws `chart` to `path` (`.png` or `.svg`).
pub fn draw_bar_chart(path: &Path, chart: &BarChart) -> Result<()> {
    let err = |msg: String| EvalError::Chart {
        path: path.to_path_buf(),
        msg,
    };
    ensure_font().map_err(err)?;
    let size = ((160 * chart.categories.len().max(3)) as u32 + 200, 560);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    // Drawn into a temporary file in the same folder, then renamed: no
    // half-written chart is left behind on failure.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let tmp = tempfile::Builder::new()
        .suffix(&format!(".{ext}"))
        .tempfile_in(dir)
        .map_err(|e| EvalError::io(dir, e))?;
    match ext.as_str() {
        "png" => {
            let root = BitMapBackend::new(tmp.path(), size).into_drawing_area();
            draw(&root, chart).map_err(|e| err(e.to_string()))?;
            root.present().map_err(|e| err(e.to_string()))?;
        }
        "svg" => {
            let root = SVGBackend::new(tmp.path(), size).into_drawing_area();
            draw(&root, chart).map_err(|e| err(e.to_string()))?;
            root.present().map_err(|e| err(e.to_string()))?;
        }
        _ => return Err(err("the file name must end in .png or .svg".into())),
    }
    crate::jsonl::readable_by_all(tmp.as_file(), path)?;
    tmp.persist(path).map_err(|e| EvalError::io(path, e.error))?;
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    c: &BarChart,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let n = c.categories.len().max(1);
    // Group i is centred on x = i, so the axis' integer ticks label groups.
    let mut chart = ChartBuilder::on(root)
        .caption(c.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        // Headroom above the scale for the legend; no ticks there.
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..c.y_max * 1.2)?;
    let cats = c.categories;
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < cats.len() {
            cats[i as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&label)
        .y_label_formatter(&|y: &f64| {
            if *y <= c.y_max + 1e-9 {
                format!("{y}")
            } else {
                String::new()
            }
        })
        .light_line_style(WHITE)
        .y_desc(c.y_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    let k = c.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (s, (name, values)) in c.series.iter().enumerate() {
        let color = Palette99::pick(s).mix(0.9);
        let bars = values.iter().enumerate().filter_map(|(i, v)| {
            let v = (*v)?;
            let x0 = i as f64 - 0.4 + s as f64 * width;
            Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], color.filled()))
        });
        chart
            .draw_series(bars)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

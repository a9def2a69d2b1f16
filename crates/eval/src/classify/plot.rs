//! The confusion matrix as a PNG heat map.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::error::{ClassifyError, Result};
use super::metrics::Metrics;

/// Fonts tried in order; a CJK font first so that Chinese labels render.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers the first system font found as "sans-serif" (once per process).
fn font() -> std::result::Result<(), String> {
    static FONT: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    FONT.get_or_init(|| {
        for f in FONTS {
            if let Ok(bytes) = std::fs::read(f) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "no usable font (looked for {}); install fonts-dejavu-core",
            FONTS.join(", ")
        ))
    })
    .clone()
}

/// Draws `m`'s confusion matrix to `path` (written to a temporary file, then renamed).
pub fn confusion_png(m: &Metrics, title: &str, path: &Path) -> Result<()> {
    let err = |message: String| ClassifyError::Plot {
        path: path.to_path_buf(),
        message,
    };
    font().map_err(err)?;
    let k = m.per_class.len();
    let cols = if m.parse_failures > 0 { k + 1 } else { k };
    let mut names: Vec<String> = m.per_class.iter().map(|c| c.label.clone()).collect();
    if cols > k {
        names.push("(none)".into());
    }
    let cell = 90u32;
    let (w, h) = (200 + cell * cols as u32 + 40, 130 + cell * k as u32 + 90);
    // The encoder is chosen by extension, so the temporary name ends in .png too.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.part.png"));
    {
        let root = BitMapBackend::new(&tmp, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let font = |size: u32| ("sans-serif", size).into_font();
        root.draw(&Text::new(title.to_string(), (20, 15), font(22)))
            .map_err(|e| err(e.to_string()))?;
        root.draw(&Text::new(
            format!(
                "n = {}   accuracy = {:.3}   macro-F1 = {:.3}",
                m.n, m.accuracy, m.macro_f1
            ),
            (20, 45),
            font(17),
        ))
        .map_err(|e| err(e.to_string()))?;
        let (x0, y0) = (200i32, 110i32);
        root.draw(&Text::new("predicted →", (x0, y0 - 28), font(15)))
            .map_err(|e| err(e.to_string()))?;
        root.draw(&Text::new("gold ↓", (20, y0 - 28), font(15)))
            .map_err(|e| err(e.to_string()))?;
        for (g, row) in m.confusion.iter().enumerate() {
            let total: usize = row.iter().sum::<usize>().max(1);
            let y = y0 + (g as i32) * cell as i32;
            root.draw(&Text::new(names[g].clone(), (20, y + cell as i32 / 2 - 8), font(16)))
                .map_err(|e| err(e.to_string()))?;
            for (p, &v) in row.iter().take(cols).enumerate() {
                let x = x0 + (p as i32) * cell as i32;
                // Shade by the share of the gold row, so rows of any size compare.
                let share = v as f64 / total as f64;
                let shade = (255.0 * (1.0 - 0.85 * share)) as u8;
                let color = RGBColor(shade, shade, 255);
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell as i32, y + cell as i32)],
                    color.filled(),
                ))
                .map_err(|e| err(e.to_string()))?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell as i32, y + cell as i32)],
                    BLACK.stroke_width(1),
                ))
                .map_err(|e| err(e.to_string()))?;
                let text_color = if share > 0.55 { WHITE } else { BLACK };
                root.draw(&Text::new(
                    v.to_string(),
                    (x + cell as i32 / 2 - 10, y + cell as i32 / 2 - 10),
                    font(20).color(&text_color),
                ))
                .map_err(|e| err(e.to_string()))?;
            }
        }
        for (p, name) in names.iter().enumerate().take(cols) {
            let x = x0 + (p as i32) * cell as i32;
            let y = y0 + (k as i32) * cell as i32 + 10;
            let short: String = name.chars().take(10).collect();
            root.draw(&Text::new(short, (x + 4, y), font(15)))
                .map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| ClassifyError::io(path, e))
}

//! `training.png`: a run's curves, drawn with plotters from `metrics.csv`
//! (loss over steps) and `quality.csv` (accuracy and Fréchet distance over
//! steps, with the train-vs-test floor), redrawn after every epoch.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One row of `quality.csv`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QualityRow {
    pub step: u64,
    pub accuracy: f64,
    pub frechet: f64,
    pub floor: f64,
}

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 360;

/// plotters draws text with this font (DejaVu Sans Mono, bundled).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../../data/fonts/DejaVuSansMono.ttf");
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

/// Reads `RUN_DIR/metrics.csv` and `RUN_DIR/quality.csv` and writes
/// `RUN_DIR/training.png`.
pub fn draw_run(run_dir: &Path) -> Result<()> {
    let loss: Vec<(f64, f64)> = csv_rows(&run_dir.join("metrics.csv"))
        .into_iter()
        .filter_map(|r| Some((*r.first()?, *r.get(2)?)))
        .filter(|(_, l)| l.is_finite() && *l > 0.0)
        .collect();
    let quality: Vec<QualityRow> = csv_rows(&run_dir.join("quality.csv"))
        .into_iter()
        .filter_map(|r| {
            Some(QualityRow {
                step: *r.first()? as u64,
                accuracy: *r.get(2)?,
                frechet: *r.get(3)?,
                floor: *r.get(4)?,
            })
        })
        .collect();
    draw(&run_dir.join("training.png"), &loss, &quality)
}

/// The numbers of a CSV file after its header (rows that do not parse are skipped).
fn csv_rows(path: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').map(|v| v.trim().parse().ok()).collect())
        .collect()
}

/// Loss beside accuracy and Fréchet distance, as a PNG.
pub fn draw(path: &Path, loss: &[(f64, f64)], quality: &[QualityRow]) -> Result<()> {
    register_font();
    let mut pixels = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    'draw: {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        // Without quality rows (a data set the judge does not know, or the
        // probe turned off) the loss takes the whole width.
        let panels = if quality.is_empty() {
            vec![root.clone()]
        } else {
            root.split_evenly((1, 3))
        };
        let last_step = loss.last().map(|p| p.0).unwrap_or(1.0).max(1.0);
        let e = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e}", path.display());

        let (lo, hi) = loss
            .iter()
            .fold((f64::INFINITY, 0f64), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
        let (lo, hi) = if loss.is_empty() {
            (0.0, 1.0)
        } else {
            (lo * 0.9, hi * 1.05)
        };
        let mut chart = ChartBuilder::on(&panels[0])
            .caption("training loss", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            // Linear: plotters labels a log axis at powers of ten only, and
            // a loss spans less than a decade after the first steps.
            .build_cartesian_2d(0f64..last_step, lo..hi)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_label_formatter(&|v| format!("{v:.2}"))
            .draw()
            .map_err(e)?;
        chart
            .draw_series(LineSeries::new(loss.iter().copied(), &BLUE))
            .map_err(e)?;
        if quality.is_empty() {
            root.present().map_err(e)?;
            break 'draw;
        }

        let steps: Vec<f64> = quality.iter().map(|q| q.step as f64).collect();
        let x_max = steps.last().copied().unwrap_or(last_step).max(last_step);
        let mut chart = ChartBuilder::on(&panels[1])
            .caption("class accuracy of samples (%)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..x_max, 0f64..100f64)
            .map_err(e)?;
        chart.configure_mesh().x_desc("step").draw().map_err(e)?;
        let acc = quality.iter().map(|q| (q.step as f64, 100.0 * q.accuracy));
        chart.draw_series(LineSeries::new(acc.clone(), &RED)).map_err(e)?;
        chart
            .draw_series(acc.map(|p| Circle::new(p, 3, RED.filled())))
            .map_err(e)?;

        let fd_max = quality.iter().map(|q| q.frechet).fold(1.0f64, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&panels[2])
            .caption("Fréchet distance to test set", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, 0f64..fd_max)
            .map_err(e)?;
        chart.configure_mesh().x_desc("step").draw().map_err(e)?;
        let fd = quality.iter().map(|q| (q.step as f64, q.frechet));
        chart
            .draw_series(LineSeries::new(fd.clone(), &RED))
            .map_err(e)?
            .label("samples")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], RED));
        chart
            .draw_series(fd.map(|p| Circle::new(p, 3, RED.filled())))
            .map_err(e)?;
        if let Some(floor) = quality.last().map(|q| q.floor) {
            chart
                .draw_series(LineSeries::new(vec![(0.0, floor), (x_max, floor)], &BLACK))
                .map_err(e)?
                .label("train vs test (floor)")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLACK));
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
        root.present().map_err(e)?;
    }
    write_png(path, &pixels)
}

fn write_png(path: &Path, pixels: &[u8]) -> Result<()> {
    crate::fsutil::write_atomically(path, |file| {
        let encoder = image::codecs::png::PngEncoder::new(std::io::BufWriter::new(file));
        image::ImageEncoder::write_image(encoder, pixels, WIDTH, HEIGHT, image::ExtendedColorType::Rgb8)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_of_the_curves() {
        let dir = std::env::temp_dir().join(format!("diffusion-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let loss: Vec<(f64, f64)> = (1..=100).map(|s| (s as f64, 1.0 / (s as f64).sqrt())).collect();
        let quality = [
            QualityRow {
                step: 50,
                accuracy: 0.6,
                frechet: 80.0,
                floor: 10.0,
            },
            QualityRow {
                step: 100,
                accuracy: 0.9,
                frechet: 30.0,
                floor: 10.0,
            },
        ];
        let path = dir.join("training.png");
        draw(&path, &loss, &quality).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        // Blue loss and red quality curves are there, and text (dark pixels).
        assert!(count(&img, [0, 0, 255]) > 100);
        assert!(count(&img, [255, 0, 0]) > 100);
        assert!(count(&img, [0, 0, 0]) > 1000);

        // No quality rows: the loss alone, over the whole width.
        draw(&path, &loss, &[]).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let blue_x: Vec<u32> = img
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0 == [0, 0, 255])
            .map(|(x, _, _)| x)
            .collect();
        assert_eq!(count(&img, [255, 0, 0]), 0);
        let span = blue_x.iter().max().unwrap() - blue_x.iter().min().unwrap();
        assert!(
            span > WIDTH * 2 / 3,
            "the loss curve spans {span} of {WIDTH} pixels"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Pixels of exactly `colour`.
    fn count(img: &image::RgbImage, colour: [u8; 3]) -> usize {
        img.pixels().filter(|p| p.0 == colour).count()
    }
}

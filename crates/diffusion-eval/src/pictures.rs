//! Sample grids (PNG) and reverse-trajectory animations (GIF).
//!
//! A grid lays n images out in rows of `cols`, each scaled up and with its
//! class written above it, as the reference's figure does.

use std::io::BufWriter;
use std::path::Path;

use diffusion_train::atomic::write_atomically;

use crate::font;
use crate::EvalError;

/// Why an encoder failed, for [`EvalError::Write`].
struct Failed(String);

impl From<std::io::Error> for Failed {
    fn from(e: std::io::Error) -> Self {
        Self(e.to_string())
    }
}

impl From<image::ImageError> for Failed {
    fn from(e: image::ImageError) -> Self {
        Self(e.to_string())
    }
}

impl From<gif::EncodingError> for Failed {
    fn from(e: gif::EncodingError) -> Self {
        Self(e.to_string())
    }
}

fn written(path: &Path, result: Result<(), Failed>) -> Result<(), EvalError> {
    result.map_err(|Failed(reason)| EvalError::Write {
        path: path.to_path_buf(),
        reason,
    })
}

/// How a grid looks.
#[derive(Debug, Clone, Copy)]
pub struct GridLayout {
    /// Images per row.
    pub cols: usize,
    /// Upscaling factor of each image.
    pub scale: usize,
    /// Image channels, height, width.
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
}

const PAD: usize = 4;
const FONT_SCALE: usize = 2;

impl GridLayout {
    /// A near-square grid (9x9 for 81 images), digits scaled 3x.
    pub fn new(n: usize, channels: usize, height: usize, width: usize) -> Self {
        let cols = (n as f64).sqrt().ceil().max(1.0) as usize;
        Self {
            cols,
            scale: 3,
            channels,
            height,
            width,
        }
    }

    fn label_h(&self) -> usize {
        font::GLYPH_H * FONT_SCALE + 4
    }

    fn cell_w(&self) -> usize {
        self.width * self.scale + PAD
    }

    fn cell_h(&self) -> usize {
        self.height * self.scale + self.label_h() + PAD
    }

    /// Pixel size (width, height) of the grid image for n images.
    pub fn size(&self, n: usize) -> (usize, usize) {
        let rows = n.div_ceil(self.cols).max(1);
        (
            self.cols.min(n.max(1)) * self.cell_w() + PAD,
            rows * self.cell_h() + PAD,
        )
    }

    /// Renders images (values in [-1, 1], [n, c, h, w] row-major) into grey
    /// (c = 1) or RGB (c = 3) pixels; `labels[i]` is written above image i.
    pub fn render(&self, images: &[f32], labels: &[Option<usize>]) -> Vec<u8> {
        let n = labels.len();
        let (w, h) = self.size(n);
        let ch = if self.channels == 3 { 3 } else { 1 };
        let mut out = vec![0u8; w * h * ch];
        let plane = self.height * self.width;
        for (i, label) in labels.iter().enumerate() {
            let (cx, cy) = (
                (i % self.cols) * self.cell_w() + PAD,
                (i / self.cols) * self.cell_h() + PAD,
            );
            if let Some(label) = label {
                let text = label.to_string();
                let mut band = vec![0u8; w * self.label_h()];
                let tx =
                    cx + (self.width * self.scale).saturating_sub(font::text_width(&text, FONT_SCALE)) / 2;
                font::draw_text(&mut band, w, tx, 1, &text, FONT_SCALE, 255);
                for (k, v) in band.iter().enumerate().filter(|(_, v)| **v > 0) {
                    let (px, py) = (k % w, cy + k / w);
                    for c in 0..ch {
                        out[(py * w + px) * ch + c] = *v;
                    }
                }
            }
            let top = cy + self.label_h();
            let img = &images[i * self.channels * plane..(i + 1) * self.channels * plane];
            for y in 0..self.height * self.scale {
                for x in 0..self.width * self.scale {
                    let (sy, sx) = (y / self.scale, x / self.scale);
                    for c in 0..ch {
                        let src = if ch == 3 { c } else { 0 };
                        let v = img[src * plane + sy * self.width + sx];
                        out[((top + y) * w + cx + x) * ch + c] = to_byte(v);
                    }
                }
            }
        }
        out
    }
}

/// [-1, 1] → 0..=255.
pub fn to_byte(v: f32) -> u8 {
    (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8
}

/// Writes a PNG grid (atomically: temp file, then rename).
pub fn write_png(
    path: &Path,
    layout: &GridLayout,
    images: &[f32],
    labels: &[Option<usize>],
) -> Result<(), EvalError> {
    let (w, h) = layout.size(labels.len());
    let pixels = layout.render(images, labels);
    let color = if layout.channels == 3 {
        image::ExtendedColorType::Rgb8
    } else {
        image::ExtendedColorType::L8
    };
    let result = write_atomically(path, |file| {
        let encoder = image::codecs::png::PngEncoder::new(BufWriter::new(file));
        image::ImageEncoder::write_image(encoder, &pixels, w as u32, h as u32, color)?;
        Ok(())
    });
    written(path, result)
}

/// Collects grid frames and writes them as an animated GIF with a grey
/// palette (RGB data is shown as grey).
pub struct GifWriter {
    layout: GridLayout,
    labels: Vec<Option<usize>>,
    frames: Vec<Vec<u8>>,
}

impl GifWriter {
    /// An animation of grids in `layout`, `labels[i]` above image i.
    pub fn new(layout: GridLayout, labels: Vec<Option<usize>>) -> Self {
        Self {
            layout,
            labels,
            frames: Vec::new(),
        }
    }

    /// Adds one frame: the grid of `images` ([-1, 1], [n, c, h, w]).
    pub fn push(&mut self, images: &[f32]) {
        let grey = GridLayout {
            channels: 1,
            ..self.layout
        };
        let plane = self.layout.channels * self.layout.height * self.layout.width;
        let channels = self.layout.channels;
        let first: Vec<f32> = if channels == 1 {
            images.to_vec()
        } else {
            // The channel mean of each pixel.
            let hw = self.layout.height * self.layout.width;
            let mut grey_values = Vec::with_capacity(self.labels.len() * hw);
            for img in images.chunks(plane).take(self.labels.len()) {
                grey_values.extend(
                    (0..hw).map(|p| (0..channels).map(|c| img[c * hw + p]).sum::<f32>() / channels as f32),
                );
            }
            grey_values
        };
        self.frames.push(grey.render(&first, &self.labels));
    }

    /// Frames so far.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no frame was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Writes the animation: 80 ms a frame, the last one held for 2 s.
    pub fn write(&self, path: &Path) -> Result<(), EvalError> {
        let (w, h) = self.layout.size(self.labels.len());
        let palette: Vec<u8> = (0..=255u8).flat_map(|v| [v, v, v]).collect();
        let result = write_atomically(path, |file| {
            let mut enc = gif::Encoder::new(BufWriter::new(file), w as u16, h as u16, &palette)?;
            enc.set_repeat(gif::Repeat::Infinite)?;
            for (k, frame) in self.frames.iter().enumerate() {
                let mut f = gif::Frame::from_indexed_pixels(w as u16, h as u16, frame.clone(), None);
                f.delay = if k + 1 == self.frames.len() { 200 } else { 8 };
                enc.write_frame(&f)?;
            }
            Ok(())
        });
        written(path, result)
    }
}

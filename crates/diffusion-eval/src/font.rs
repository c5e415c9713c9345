//! A tiny built-in bitmap font (5x7 digits and a few signs), so labels need
//! no system fonts.

/// Glyph width and height in font pixels.
pub const GLYPH_W: usize = 5;
pub const GLYPH_H: usize = 7;

/// Rows of a glyph, top to bottom; bit 4 is the leftmost pixel.
fn glyph(c: char) -> Option<[u8; GLYPH_H]> {
    Some(match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '?' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
        ' ' => [0; GLYPH_H],
        _ => return None,
    })
}

/// Width in image pixels of `text` drawn at `scale` (one blank column
/// between glyphs).
pub fn text_width(text: &str, scale: usize) -> usize {
    let n = text.chars().count();
    if n == 0 {
        0
    } else {
        (n * (GLYPH_W + 1) - 1) * scale
    }
}

/// Draws `text` into a grey image (row-major, `width` pixels per row) with
/// its top-left corner at (x, y); unknown characters are drawn as '?'.
pub fn draw_text(pixels: &mut [u8], width: usize, x: usize, y: usize, text: &str, scale: usize, value: u8) {
    let height = pixels.len() / width;
    for (k, c) in text.chars().enumerate() {
        let rows = glyph(c).or_else(|| glyph('?')).expect("'?' has a glyph");
        let gx = x + k * (GLYPH_W + 1) * scale;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..GLYPH_W {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (gx + col * scale + dx, y + r * scale + dy);
                        if px < width && py < height {
                            pixels[py * width + px] = value;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_one() {
        let mut px = vec![0u8; 5 * 7];
        draw_text(&mut px, 5, 0, 0, "1", 1, 255);
        let lit: Vec<usize> = (0..35).filter(|&i| px[i] == 255).collect();
        // '1': the stem in column 2, a foot of three, one pixel of the flag.
        assert_eq!(lit, vec![2, 6, 7, 12, 17, 22, 27, 31, 32, 33]);
        assert_eq!(text_width("10", 2), 22);
    }
}

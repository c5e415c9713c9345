//! NumPy .npy files of f32 arrays (format version 1.0/2.0, C order), so that
//! noise and samples can be exchanged with other implementations.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::fsutil::write_bytes_atomically;

/// An f32 array and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Writes `data` of `shape` as a little-endian f32 .npy file.
pub fn write(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "npy shape and data disagree"
    );
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write_bytes_atomically(path, &bytes)
}

/// Reads a .npy file in C order: little-endian f32, or f64 and integers
/// (int8..int64, uint8; labels, say) converted to f32.
pub fn read(path: &Path) -> Result<Array> {
    let bytes =
        std::fs::read(path).with_context(|| format!("{}: cannot read the .npy file", path.display()))?;
    parse(&bytes).with_context(|| format!("{}: not a usable .npy file", path.display()))
}

pub(crate) fn parse(bytes: &[u8]) -> Result<Array> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("missing the \\x93NUMPY magic; save it with numpy.save");
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => bail!("unsupported .npy format version {v}"),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .context("truncated or non-text header")?;
    let descr = dict_value(header, "descr").context("header has no 'descr'")?;
    let dtype = descr.trim_matches(|c| c == '\'' || c == '"');
    let (kind, width) = match dtype.trim_start_matches(['<', '|', '=']) {
        "f4" => ('f', 4),
        "f8" => ('f', 8),
        "i1" => ('i', 1),
        "u1" => ('u', 1),
        "i2" => ('i', 2),
        "i4" => ('i', 4),
        "i8" => ('i', 8),
        _ => bail!(
            "dtype {dtype} is not supported; save little-endian float32 (astype(np.float32)) or integers"
        ),
    };
    if dict_value(header, "fortran_order")
        .map(|v| v.trim() == "True")
        .unwrap_or(false)
    {
        bail!("Fortran-ordered arrays are not supported; save np.ascontiguousarray(a)");
    }
    let shape_text = dict_value(header, "shape").context("header has no 'shape'")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<Result<_, _>>()
        .context("unreadable shape")?;
    let body = &bytes[start + header_len..];
    let needed = shape
        .iter()
        .try_fold(width, |acc: usize, &d| acc.checked_mul(d))
        .filter(|&n| n == body.len());
    if needed.is_none() {
        bail!(
            "shape {shape:?} of {width}-byte values does not match the {} bytes of data in the file",
            body.len()
        );
    }
    let data = body
        .chunks_exact(width)
        .map(|c| match (kind, width) {
            ('f', 4) => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            ('f', _) => f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32,
            ('u', _) => c[0] as f32,
            (_, 1) => c[0] as i8 as f32,
            (_, 2) => i16::from_le_bytes([c[0], c[1]]) as f32,
            (_, 4) => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32,
            _ => i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32,
        })
        .collect();
    Ok(Array { shape, data })
}

/// The raw text of `key`'s value in the header's Python dict literal.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = header[at + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find(',').unwrap_or(rest.len())
    };
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_header_alignment() {
        let dir = std::env::temp_dir().join(format!("npy-test-{}", std::process::id()));
        let path = dir.join("a.npy");
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write(&path, &[2, 1, 3, 4], &data).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert_eq!(
            read(&path).unwrap(),
            Array {
                shape: vec![2, 1, 3, 4],
                data
            }
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn numpy_written_header_is_read() {
        // np.save(f, np.array([1.5, -2.0], dtype=np.float32)) writes this header.
        let mut bytes =
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }".to_vec();
        bytes.resize(10 + 0x76 - 1, b' ');
        bytes.push(b'\n');
        bytes.extend_from_slice(&1.5f32.to_le_bytes());
        bytes.extend_from_slice(&(-2.0f32).to_le_bytes());
        assert_eq!(
            parse(&bytes).unwrap(),
            Array {
                shape: vec![2],
                data: vec![1.5, -2.0]
            }
        );
    }

    #[test]
    fn bad_files_are_explained() {
        assert!(parse(b"hello").unwrap_err().to_string().contains("magic"));
        let header = |descr: &str, shape: &str| {
            let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
            while (10 + h.len() + 1) % 64 != 0 {
                h.push(' ');
            }
            h.push('\n');
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend_from_slice(&(h.len() as u16).to_le_bytes());
            b.extend_from_slice(h.as_bytes());
            b
        };
        // Complex numbers are refused with the fix in the message.
        let bytes = header("<c8", "(1,)");
        assert!(parse(&bytes).unwrap_err().to_string().contains("float32"));
        // int64 labels are read as numbers.
        let mut bytes = header("<i8", "(2,)");
        bytes.extend_from_slice(&7i64.to_le_bytes());
        bytes.extend_from_slice(&3i64.to_le_bytes());
        assert_eq!(
            parse(&bytes).unwrap(),
            Array {
                shape: vec![2],
                data: vec![7.0, 3.0]
            }
        );
        // Too little data for the shape.
        let bytes = header("<f4", "(3, 2)");
        let err = parse(&bytes).unwrap_err().to_string();
        assert!(
            err.contains("shape [3, 2] of 4-byte values does not match the 0 bytes"),
            "{err}"
        );
        // A shape whose product overflows is an error, not a panic.
        let bytes = header("<f4", "(4294967296, 4294967296, 16)");
        let err = parse(&bytes).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }
}

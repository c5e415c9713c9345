//! A batch on the host, scaled to [-1, 1], and the same batch as burn
//! tensors on a device.

use burn::prelude::*;

use crate::image_set::ImageSet;

/// The value a pixel byte becomes: `x / 127.5 − 1` (SPEC), so 0 ↦ −1 and
/// 255 ↦ 1. Written as (x − 127.5) / 127.5: the subtraction is exact in
/// f32, so the one division rounds the exact value once (the tests check
/// every byte against f64); unlike a table look-up it vectorises.
#[inline]
pub fn scale_pixel(x: u8) -> f32 {
    (f32::from(x) - 127.5) / 127.5
}

/// A batch prepared on the host, ready to upload.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// `len * height * width` values in [-1, 1], image after image.
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<i32>,
    /// Number of images in the batch.
    pub len: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
}

/// A batch on a device.
#[derive(Debug, Clone)]
pub struct Batch<B: Backend> {
    /// `[N, 1, H, W]`, values in [-1, 1].
    pub images: Tensor<B, 4>,
    /// `[N]`, class labels.
    pub labels: Tensor<B, 1, Int>,
}

impl HostBatch {
    /// Gathers the images `indices` of `set`, scaled to [-1, 1].
    pub fn gather(set: &ImageSet, indices: &[u32]) -> Self {
        let size = set.image_size();
        let mut images = vec![0f32; indices.len() * size];
        let mut labels = Vec::with_capacity(indices.len());
        for (k, &i) in indices.iter().enumerate() {
            let i = i as usize;
            let out = &mut images[k * size..(k + 1) * size];
            for (o, &p) in out.iter_mut().zip(set.image(i)) {
                *o = scale_pixel(p);
            }
            labels.push(i32::from(set.label(i)));
        }
        HostBatch {
            images,
            labels,
            len: indices.len(),
            height: set.height,
            width: set.width,
        }
    }

    /// Uploads a copy of the batch to `device`.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> Batch<B> {
        self.clone().into_device(device)
    }

    /// Uploads the batch to `device` without copying it on the host first.
    pub fn into_device<B: Backend>(self, device: &B::Device) -> Batch<B> {
        let shape = [self.len, 1, self.height, self.width]; // [N, C=1, H, W]
        let images = Tensor::<B, 4>::from_data(TensorData::new(self.images, shape), device);
        let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(self.labels, [self.len]), device);
        Batch { images, labels }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn pixels_scale_to_minus_one_one() {
        assert_eq!(scale_pixel(0), -1.0);
        assert_eq!(scale_pixel(255), 1.0);
        // 127.5 is not a byte: the two middle bytes straddle zero.
        assert!(scale_pixel(127) < 0.0 && scale_pixel(128) > 0.0);
        // Every byte gives the formula evaluated in f64, rounded once.
        for x in 0..=255u8 {
            assert_eq!(scale_pixel(x), (f64::from(x) / 127.5 - 1.0) as f32, "{x}");
        }
    }

    #[test]
    fn a_batch_reaches_the_device_with_shape_and_values() {
        let set = ImageSet::new(vec![0, 255, 51, 204, 10, 20, 30, 40], vec![3, 7], 2, 2);
        let host = HostBatch::gather(&set, &[1, 0]);
        assert_eq!(host.labels, [7, 3]);
        let device = Default::default();
        let batch = host.to_device::<Flex>(&device);
        assert_eq!(batch.images.dims(), [2, 1, 2, 2]);
        let v = batch.images.into_data().to_vec::<f32>().unwrap();
        let want: Vec<f32> = [10u8, 20, 30, 40, 0, 255, 51, 204]
            .iter()
            .map(|&x| scale_pixel(x))
            .collect();
        assert_eq!(v, want);
        assert_eq!(v[5], 1.0);
        let labels = batch.labels.into_data().convert::<i64>().to_vec::<i64>().unwrap();
        assert_eq!(labels, [7, 3]);
    }
}

//! The image type that flows through the pipeline: interleaved HWC RGB, u8 after decoding and f32
//! (0..1 scale, like `ToTensor`) after the crop. HWC matches both the decoders' output and the
//! engine's NHWC activations, so a finished crop is copied into a batch without a transpose.

/// An RGB image, rows top to bottom, pixels left to right, 3 interleaved channels.
#[derive(Clone, Debug, PartialEq)]
pub struct Image<T> {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `height * width * 3` values.
    pub data: Vec<T>,
}

impl<T: Copy + Default> Image<T> {
    /// A black image.
    pub fn new(height: usize, width: usize) -> Self {
        Image {
            height,
            width,
            data: vec![T::default(); height * width * 3],
        }
    }

    /// Wraps HWC data; `None` if the length does not match.
    pub fn from_vec(height: usize, width: usize, data: Vec<T>) -> Option<Self> {
        (data.len() == height * width * 3).then_some(Image {
            height,
            width,
            data,
        })
    }

    /// The 3 channel values of pixel (y, x).
    #[inline]
    pub fn pixel(&self, y: usize, x: usize) -> [T; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

impl Image<u8> {
    /// The same image as f32 in [0, 1] (`ToTensor`'s division by 255).
    pub fn to_f32(&self) -> Image<f32> {
        Image {
            height: self.height,
            width: self.width,
            data: self.data.iter().map(|&v| v as f32 / 255.0).collect(),
        }
    }
}

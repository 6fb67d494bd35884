//! Photo decoding with limits, and the EfficientNet-Lite0 input tensor.

use image::{DynamicImage, ImageFormat, ImageReader, Limits, RgbImage};
use std::io::Cursor;

/// Largest photo accepted: a 12-megapixel phone JPEG is 3–6 MB.
pub const MAX_IMAGE_BYTES: usize = 8 * 1024 * 1024;
/// Most pixels decoded: bounds the decoder's memory (~3 bytes per pixel) whatever the file claims.
pub const MAX_IMAGE_PIXELS: u64 = 40_000_000;
/// Longest side decoded, for the same reason.
pub const MAX_IMAGE_SIDE: u32 = 12_000;
/// EfficientNet-Lite0's input side.
pub const MODEL_SIDE: u32 = 224;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ImageError {
    #[error("image is empty")]
    Empty,
    #[error("image is {0} bytes; at most {MAX_IMAGE_BYTES} are accepted")]
    TooLarge(usize),
    #[error("image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels and {MAX_IMAGE_SIDE} per side are accepted")]
    TooManyPixels { width: u32, height: u32 },
    #[error("not a JPEG or PNG image")]
    UnsupportedFormat,
    #[error("image cannot be decoded: {0}")]
    Corrupt(String),
}

/// Longest side of a photo kept in the journal: enough for the 224-pixel model and a POS thumbnail.
pub const JOURNAL_PHOTO_SIDE: u32 = 256;
/// JPEG qualities tried, best first, until the photo fits the journal's limit.
const JOURNAL_PHOTO_QUALITIES: [u8; 4] = [85, 70, 50, 30];
const _: () = assert!(JOURNAL_PHOTO_SIDE >= MODEL_SIDE, "a journal photo still feeds the model at full size");

/// Shrinks a photo (JPEG or PNG) to a small JPEG of at most `max_bytes` for the journal: every
/// device stores and embeds it itself.
pub fn shrink_for_journal(bytes: &[u8], max_bytes: usize) -> Result<Vec<u8>, crate::InferenceError> {
    let img = decode_image(bytes)?;
    let side = img.width().max(img.height());
    let small = if side > JOURNAL_PHOTO_SIDE {
        let scale = f64::from(JOURNAL_PHOTO_SIDE) / f64::from(side);
        let (w, h) = ((f64::from(img.width()) * scale).round().max(1.0) as u32, (f64::from(img.height()) * scale).round().max(1.0) as u32);
        image::imageops::thumbnail(&img, w, h)
    } else {
        img
    };
    for quality in JOURNAL_PHOTO_QUALITIES {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
            .encode_image(&small)
            .map_err(|e| crate::InferenceError::Run(format!("jpeg encoding: {e}")))?;
        if out.len() <= max_bytes {
            return Ok(out);
        }
    }
    Err(crate::InferenceError::InvalidInput("photo does not compress below the journal's photo limit".into()))
}

/// Decodes a JPEG or PNG photo into RGB, refusing oversized files and dimensions before decoding.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(ImageError::TooLarge(bytes.len()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| ImageError::Corrupt(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png) => {}
        _ => return Err(ImageError::UnsupportedFormat),
    }
    // Read the header first: a tiny file may claim gigapixels.
    let (width, height) = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?
        .into_dimensions()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    if width == 0
        || height == 0
        || width > MAX_IMAGE_SIDE
        || height > MAX_IMAGE_SIDE
        || u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS
    {
        return Err(ImageError::TooManyPixels { width, height });
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 4 + (64 << 20));
    reader.limits(limits);
    let img: DynamicImage = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => ImageError::TooManyPixels { width, height },
        other => ImageError::Corrupt(other.to_string()),
    })?;
    Ok(img.to_rgb8())
}

/// The model input: the whole photo scaled to 224x224 (area-averaged), NCHW, `(x - 127) / 128`.
pub fn model_input(img: &RgbImage) -> Vec<f32> {
    let small = image::imageops::thumbnail(img, MODEL_SIDE, MODEL_SIDE);
    let plane = (MODEL_SIDE * MODEL_SIDE) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, px) in small.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px[c]) - 127.0) / 128.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_pixel(width, height, image::Rgb([200, 100, 50]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_photo_for_the_journal_is_a_jpeg_within_its_side_and_byte_limits() {
        let jpeg = shrink_for_journal(&png(1200, 600), 64 * 1024).unwrap();
        assert!(jpeg.len() <= 64 * 1024);
        let img = decode_image(&jpeg).unwrap();
        assert_eq!((img.width(), img.height()), (JOURNAL_PHOTO_SIDE, JOURNAL_PHOTO_SIDE / 2), "shrunk, aspect kept");
        assert!(matches!(shrink_for_journal(&png(64, 64), 10), Err(crate::InferenceError::InvalidInput(_))), "cannot fit 10 bytes");
        assert!(matches!(shrink_for_journal(b"not an image", 64 * 1024), Err(crate::InferenceError::Image(ImageError::UnsupportedFormat))));
    }

    #[test]
    fn decodes_png_and_builds_a_224_square_nchw_input() {
        let img = decode_image(&png(640, 480)).unwrap();
        assert_eq!(img.dimensions(), (640, 480));
        let input = model_input(&img);
        assert_eq!(input.len(), 3 * 224 * 224);
        assert!((input[0] - (200.0 - 127.0) / 128.0).abs() < 1e-6, "red plane first");
        assert!((input[224 * 224] - (100.0 - 127.0) / 128.0).abs() < 1e-6, "then green");
    }

    #[test]
    fn refuses_empty_huge_foreign_and_truncated_files_with_a_precise_error() {
        assert_eq!(decode_image(&[]), Err(ImageError::Empty));
        assert_eq!(decode_image(&vec![0u8; MAX_IMAGE_BYTES + 1]), Err(ImageError::TooLarge(MAX_IMAGE_BYTES + 1)));
        assert_eq!(decode_image(b"GIF89a not supported here"), Err(ImageError::UnsupportedFormat));
        let good = png(64, 64);
        assert!(matches!(decode_image(&good[..good.len() / 2]), Err(ImageError::Corrupt(_))));
    }

    #[test]
    fn a_small_file_claiming_gigapixels_is_refused_before_decoding() {
        // A valid PNG header for 20000 x 20000 with no pixel data behind it.
        let mut bytes = png(1, 1);
        bytes[16..20].copy_from_slice(&20_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&20_000u32.to_be_bytes());
        match decode_image(&bytes) {
            Err(ImageError::TooManyPixels { width: 20_000, height: 20_000 }) => {}
            // The header CRC no longer matches, which some decoders check first: also a refusal.
            Err(ImageError::Corrupt(_)) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

//! Decoding `PATCH` writes: a zstd frame whose single-use dictionary (prefix) is a range the
//! target already holds (see `nx_engine::delta` for the encoder and the protocol doc).

/// Largest zstd window a `PATCH` frame may declare (the prefix plus one chunk fit well
/// below it; the decoder never allocates a window buffer in single-shot mode).
const WINDOW_LOG_MAX: u32 = 27;

/// Why a frame did not decode.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("cannot create a zstd decoder")]
    NoDecoder,
    #[error("zstd: {0}")]
    Zstd(&'static str),
    #[error("decodes to {got} bytes, the WRITE says {want}")]
    Length { got: usize, want: usize },
}

/// Decompress `frame` with `prefix` as its dictionary into exactly `len` bytes (a frame that
/// decodes to more is refused: the output buffer is `len` bytes).
pub fn decode(prefix: &[u8], frame: &[u8], len: usize) -> Result<Vec<u8>, PatchError> {
    use zstd::zstd_safe::{get_error_name, DCtx, DParameter};
    let mut d = DCtx::try_create().ok_or(PatchError::NoDecoder)?;
    d.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))
        .map_err(|c| PatchError::Zstd(get_error_name(c)))?;
    d.ref_prefix(prefix)
        .map_err(|c| PatchError::Zstd(get_error_name(c)))?;
    let mut out = Vec::with_capacity(len);
    let n = d
        .decompress(&mut out, frame)
        .map_err(|c| PatchError::Zstd(get_error_name(c)))?;
    if n != len || out.len() != len {
        return Err(PatchError::Length { got: n, want: len });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(prefix: &[u8], data: &[u8]) -> Vec<u8> {
        use zstd::zstd_safe::{CCtx, CParameter};
        let mut c = CCtx::create();
        c.set_parameter(CParameter::CompressionLevel(3)).unwrap();
        c.set_parameter(CParameter::WindowLog(22)).unwrap();
        c.ref_prefix(prefix).unwrap();
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        c.compress2(&mut out, data).unwrap();
        out
    }

    #[test]
    fn decodes_with_the_prefix_and_refuses_a_wrong_length() {
        let prefix: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut data = prefix[1000..101_000].to_vec();
        data[500] ^= 1;
        let f = frame(&prefix, &data);
        assert!(f.len() < 200, "{} bytes", f.len());
        assert_eq!(decode(&prefix, &f, data.len()).unwrap(), data);
        assert!(matches!(
            decode(&prefix, &f, data.len() - 1),
            Err(PatchError::Zstd(_) | PatchError::Length { .. })
        ));
        // Another prefix: garbage or an error, never the data.
        let other = vec![0u8; prefix.len()];
        assert!(decode(&other, &f, data.len()).map_or(true, |o| o != data));
    }
}

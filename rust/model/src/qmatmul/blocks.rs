//! A weight's bytes seen as the quantized blocks they were loaded as.

use candle_core::Result;

/// Reinterprets the weight's bytes as its blocks. They were allocated as a `Vec` of exactly
/// this block type when the tensor was loaded, so size and alignment hold; both are checked.
pub(super) fn blocks<T>(data: &[u8], count: usize) -> Result<&[T]> {
    let size = std::mem::size_of::<T>();
    if data.len() != count * size || !(data.as_ptr() as usize).is_multiple_of(align_of::<T>()) {
        candle_core::bail!(
            "weight storage of {} bytes does not hold {count} blocks of {size} bytes",
            data.len()
        );
    }
    // SAFETY: length and alignment checked above; the block types are plain old data
    // (integers and f16) for which every bit pattern is valid.
    Ok(unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<T>(), count) })
}

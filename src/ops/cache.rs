//! Writing the new rows of a KV-cache step into the cache.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheWriteSpec {
    /// Rows written.
    pub rows: usize,
    /// Elements per row.
    pub width: usize,
    /// Cache rows.
    pub slots: usize,
    pub checked: Checked,
}

/// `cache[base_r + len_r - 1] = src[r]` for every row `r` of the row table
/// `rows` (U32 `[R, 2]` = `(base, len)`, see [`crate::attention::cached`]):
/// each query row's key (value, indexer key) goes to its own position.
/// `src` is `[R, …]`, `cache` `[slots, …]` with the same row width and
/// dtype. Rows whose target is outside the cache are skipped (the engine
/// never issues them).
pub fn cache_write<B: Backend>(be: &B, src: &Tensor<B>, rows: &Tensor<B>, cache: &mut Tensor<B>) -> Result<()> {
    const OP: &str = "cache_write";
    check_float(be, OP, "src", src)?;
    check_same_dtype(OP, &[("src", src), ("cache", &*cache)])?;
    check_nonempty(OP, "src", src)?;
    check_nonempty(OP, "cache", cache)?;
    let (r, slots) = (src.shape()[0], cache.shape()[0]);
    let width = src.numel() / r;
    if cache.numel() / slots != width || src.shape()[1..] != cache.shape()[1..] {
        return Err(Error::Shape(format!(
            "{OP}: src {} and cache {} must have the same row shape",
            fmt_shape(src.shape()),
            fmt_shape(cache.shape())
        )));
    }
    check_dtype(OP, "rows", rows, DType::U32)?;
    if rows.shape() != [r, 2] {
        return Err(Error::Shape(format!("{OP}: the row table must be [{r}, 2], got {}", fmt_shape(rows.shape()))));
    }
    check_u32(OP, "cache numel", cache.numel())?;
    be.cache_write(&CacheWriteSpec { rows: r, width, slots, checked: CHECKED }, src, rows, cache)
}

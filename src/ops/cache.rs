//! Writing the new rows of a KV-cache step into the cache.

use super::*;
use crate::attention::cached::{KvTable, Paging, check_table};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheWriteSpec {
    /// Rows written.
    pub rows: usize,
    /// Elements per row.
    pub width: usize,
    /// Cache rows.
    pub slots: usize,
    pub paging: Paging,
    pub checked: Checked,
}

/// `cache[row(len_r - 1)] = src[r]` for every row `r` of the table (row
/// `(base, len)`, `row(s)` the cache row of position `s` through the page
/// table, see [`crate::attention::cached`]): each query row's key (value,
/// indexer key) goes to its own position. `src` is `[R, …]`, `cache`
/// `[slots, …]` with the same row width and dtype. Rows with `len = 0` are
/// skipped.
pub fn cache_write<B: Backend>(be: &B, src: &Tensor<B>, table: &KvTable<'_, B>, cache: &mut Tensor<B>) -> Result<()> {
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
    let paging = check_table(OP, table, r, slots)?;
    check_u32(OP, "cache numel", cache.numel())?;
    be.cache_write(
        &CacheWriteSpec { rows: r, width, slots, paging, checked: CHECKED },
        src,
        table.rows,
        table.pages,
        cache,
    )
}

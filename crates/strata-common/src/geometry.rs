//! Block and page geometry. Files are cut into blocks (placement unit) and
//! blocks into pages (cache and I/O unit), so a 4 KiB footer read pulls one
//! page from the UFS, not a whole block.

use serde::{Deserialize, Serialize};

use crate::CommonError;

pub const DEFAULT_BLOCK_SIZE: u64 = 64 << 20;
pub const DEFAULT_PAGE_SIZE: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    pub block_size: u64,
    pub page_size: u64,
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            block_size: DEFAULT_BLOCK_SIZE,
            page_size: DEFAULT_PAGE_SIZE,
        }
    }
}

/// One page's slice of a requested byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSpan {
    pub block: u64,
    pub page: u32,
    /// File offset where the page starts.
    pub page_start: u64,
    /// Length of the whole page (short at the end of the file).
    pub page_len: u64,
    /// Offset inside the page where the wanted bytes start.
    pub skip: u64,
    /// Number of wanted bytes in this page.
    pub take: u64,
}

impl Geometry {
    pub fn new(block_size: u64, page_size: u64) -> Result<Self, CommonError> {
        let g = Geometry {
            block_size,
            page_size,
        };
        g.validate()?;
        Ok(g)
    }

    pub fn validate(&self) -> Result<(), CommonError> {
        let err = |msg: String| CommonError::Config {
            origin: "block/page size".into(),
            msg,
        };
        if self.page_size < 4096 || self.page_size > (64 << 20) {
            return Err(err(format!(
                "page size {} must be between 4 KiB and 64 MiB",
                self.page_size
            )));
        }
        if self.block_size < self.page_size || !self.block_size.is_multiple_of(self.page_size) {
            return Err(err(format!(
                "block size {} must be a multiple of the page size {}",
                self.block_size, self.page_size
            )));
        }
        if self.block_size / self.page_size > u32::MAX as u64 {
            return Err(err("too many pages per block".into()));
        }
        Ok(())
    }

    pub fn block_of(&self, offset: u64) -> u64 {
        offset / self.block_size
    }

    pub fn block_count(&self, file_len: u64) -> u64 {
        file_len.div_ceil(self.block_size)
    }

    /// The byte range `[start, end)` of a block, clipped to the file.
    pub fn block_range(&self, block: u64, file_len: u64) -> (u64, u64) {
        let start = block * self.block_size;
        (start.min(file_len), (start + self.block_size).min(file_len))
    }

    /// The pages covering `[offset, offset + len)` of a file of `file_len`
    /// bytes, in order. The range is clipped to the file.
    pub fn spans(&self, file_len: u64, offset: u64, len: u64) -> Vec<PageSpan> {
        let end = offset.saturating_add(len).min(file_len);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / self.block_size;
            let block_start = block * self.block_size;
            let page = ((pos - block_start) / self.page_size) as u32;
            let page_start = block_start + page as u64 * self.page_size;
            let page_end = (page_start + self.page_size)
                .min(block_start + self.block_size)
                .min(file_len);
            let take_end = page_end.min(end);
            out.push(PageSpan {
                block,
                page,
                page_start,
                page_len: page_end - page_start,
                skip: pos - page_start,
                take: take_end - pos,
            });
            pos = take_end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_bad_geometry() {
        assert!(Geometry::new(1 << 20, 3 << 19).is_err());
        assert!(Geometry::new(1 << 20, 1 << 21).is_err());
        assert!(Geometry::new(1 << 20, 100).is_err());
    }

    proptest! {
        #[test]
        fn spans_tile_the_range_exactly(pages_per_block in 1u64..5, file_len in 0u64..100_000, off in 0u64..100_000, len in 0u64..50_000) {
            let g = Geometry::new(4096 * pages_per_block, 4096).unwrap();
            let spans = g.spans(file_len, off, len);
            let want_end = off.saturating_add(len).min(file_len);
            let mut pos = off;
            for s in &spans {
                prop_assert_eq!(s.page_start + s.skip, pos);
                prop_assert!(s.skip + s.take <= s.page_len);
                prop_assert!(s.page_len <= g.page_size);
                prop_assert_eq!(s.block, s.page_start / g.block_size);
                pos += s.take;
            }
            prop_assert_eq!(pos, want_end.max(off));
        }
    }
}

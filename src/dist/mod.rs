//! Data-parallel training across ranks (DESIGN §8): the [`Collective`] trait,
//! the flat parameter layout that gradient buckets and ZeRO-1 shards are
//! slices of, and the bucketing of gradients by the seed's size classes.
//!
//! Collectives work on host-staged f32 slices. Every implementation reduces
//! in rank order (`x₀ + x₁ + … + x_{N-1}`), so every rank gets the same bits.

pub mod bench;
pub mod inproc;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod nccl_prep;
pub mod rendezvous;

pub use inproc::InProcess;

use std::ops::Range;
use std::time::Duration;

use crate::error::{Error, Result};

/// Default time a rank waits inside one collective before it gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How [`Collective::all_reduce`] combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum, then multiplied by `1/world`.
    Avg,
    Min,
    Max,
}

/// One rank's handle on a group of `world` ranks. Every rank must call the
/// same collectives in the same order with the same lengths; a call that
/// waits longer than the group's timeout, or whose peer left, returns
/// [`Error::Collective`] instead of hanging.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise reduction of `buf` over the ranks, result in every rank's `buf`.
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    /// `out = Σ_ranks input[rank·S .. (rank+1)·S]` with `S = out.len()`, `input.len() = world·S`.
    fn reduce_scatter(&self, input: &[f32], out: &mut [f32]) -> Result<()>;
    /// `out[r·S .. (r+1)·S] = shard of rank r`, `S = shard.len()`, `out.len() = world·S`.
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()>;
    /// Every rank's `buf` becomes `root`'s.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// The NCCL communicator behind this handle, for device-buffer collectives
    /// without host staging ([`nccl::Nccl::all_reduce_device`] & co.); `None` for the others.
    #[cfg(feature = "nccl")]
    fn as_nccl(&self) -> Option<&nccl::Nccl> {
        None
    }
}

/// Checks the length contract of [`Collective::reduce_scatter`] / [`Collective::all_gather`].
pub fn check_shard(op: &str, world: usize, full: usize, shard: usize) -> Result<()> {
    if full != shard * world {
        return Err(Error::Invalid(format!(
            "{op}: the full buffer has {full} elements, expected world {world} × shard {shard} = {}",
            shard * world
        )));
    }
    Ok(())
}

/// One tensor's place in a flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatEntry {
    pub name: String,
    pub offset: usize,
    pub shape: Vec<usize>,
}

impl FlatEntry {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The table of (name, offset, shape) of a flat buffer (DESIGN §5). Offsets
/// are multiples of `align` elements (64 f32 = 256 bytes, wgpu's usual
/// `min_storage_buffer_offset_alignment`); `len` is padded to a multiple of
/// `align · world` so ZeRO-1 shards have equal lengths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatLayout {
    pub entries: Vec<FlatEntry>,
    pub len: usize,
}

impl FlatLayout {
    pub fn new<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>, align: usize, world: usize) -> Self {
        let align = align.max(1);
        let mut off = 0usize;
        let entries = tensors
            .into_iter()
            .map(|(name, shape)| {
                let e = FlatEntry { name: name.to_string(), offset: off, shape: shape.to_vec() };
                off = (off + e.len()).div_ceil(align) * align;
                e
            })
            .collect();
        let unit = align * world.max(1);
        FlatLayout { entries, len: off.div_ceil(unit) * unit }
    }

    /// Elements of the shard each of `world` ranks owns.
    pub fn shard_len(&self, world: usize) -> usize {
        self.len / world.max(1)
    }

    /// The pieces of each tensor inside `shard`: (tensor index, range in the flat buffer).
    pub fn segments(&self, shard: Range<usize>) -> Vec<(usize, Range<usize>)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let r = e.range();
                let (a, b) = (r.start.max(shard.start), r.end.min(shard.end));
                (a < b).then_some((i, a..b))
            })
            .collect()
    }
}

/// Size classes of the seed's HPGA (bytes of an f32 gradient): < 16 MB,
/// 16–64 MB, 64–256 MB, > 256 MB, each threshold multiplied by `scale`.
pub fn size_class(bytes: usize, scale: f64) -> u8 {
    const MB: f64 = (1 << 20) as f64;
    let b = bytes as f64;
    match [16.0, 64.0, 256.0].iter().position(|&t| b < t * MB * scale) {
        Some(c) => c as u8,
        None => 3,
    }
}

/// A contiguous run of the flat gradient buffer reduced by one collective call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub range: Range<usize>,
    /// Size class of its tensors (0: small ones coalesced).
    pub class: u8,
    /// Tensor indices, in the order they were added (reverse layer order).
    pub tensors: Vec<usize>,
}

/// Gradient buckets in reduction order: tensors in reverse order (the last
/// layer's gradients are finished first by the backward pass); tensors of
/// size class 0 are coalesced into buckets of at most `bucket_bytes`
/// (`first_bytes` for the first one, as PyTorch DDP does); larger classes get
/// a bucket each. Buckets are contiguous ranges of the flat layout (padding
/// between tensors included, it is zero).
pub fn buckets(layout: &FlatLayout, class_scale: f64, bucket_bytes: usize, first_bytes: usize) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = Vec::new();
    let mut cur: Option<Bucket> = None;
    let cap = |out: &Vec<Bucket>| if out.is_empty() { first_bytes } else { bucket_bytes };
    for (i, e) in layout.entries.iter().enumerate().rev() {
        let class = size_class(e.len() * 4, class_scale);
        if class > 0 {
            if let Some(b) = cur.take() {
                out.push(b);
            }
            out.push(Bucket { range: e.range(), class, tensors: vec![i] });
            continue;
        }
        match cur.as_mut() {
            // Extending downwards keeps the bucket contiguous: tensor i ends where the bucket starts (mod padding).
            Some(b) if (b.range.end - e.offset) * 4 <= cap(&out) => {
                b.range.start = e.offset;
                b.tensors.push(i);
            }
            _ => {
                if let Some(b) = cur.take() {
                    out.push(b);
                }
                cur = Some(Bucket { range: e.range(), class, tensors: vec![i] });
            }
        }
    }
    out.extend(cur);
    out
}

/// Where the ranks of a data-parallel run come from (torchrun's conventions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl LaunchEnv {
    /// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT through `get`;
    /// `None` when WORLD_SIZE is unset (a single-process run).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else { return Ok(None) };
        let num = |k: &str, v: Option<String>, default: Option<usize>| -> Result<usize> {
            match (v, default) {
                (Some(s), _) => s.trim().parse().map_err(|_| Error::Invalid(format!("{k}={s}: expected an integer"))),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(Error::Invalid(format!("WORLD_SIZE is set but {k} is not"))),
            }
        };
        let world = num("WORLD_SIZE", Some(world), None)?;
        let rank = num("RANK", get("RANK"), None)?;
        if world == 0 || rank >= world {
            return Err(Error::Invalid(format!("RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")));
        }
        let local_rank = num("LOCAL_RANK", get("LOCAL_RANK"), Some(rank))?;
        let port = num("MASTER_PORT", get("MASTER_PORT"), Some(29500))?;
        let master_port =
            u16::try_from(port).map_err(|_| Error::Invalid(format!("MASTER_PORT={port}: expected 0..=65535")))?;
        Ok(Some(LaunchEnv {
            rank,
            world,
            local_rank,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_aligns_offsets_and_pads_to_equal_shards() {
        let l = FlatLayout::new([("a", &[3usize, 5][..]), ("b", &[7][..]), ("c", &[1][..])], 8, 3);
        let offs: Vec<usize> = l.entries.iter().map(|e| e.offset).collect();
        assert_eq!(offs, vec![0, 16, 24]);
        assert_eq!(l.len, 48, "25 elements padded to a multiple of 8·3");
        assert_eq!(l.shard_len(3), 16);
        assert_eq!(l.segments(16..32), vec![(1, 16..23), (2, 24..25)]);
        assert_eq!(l.segments(0..16), vec![(0, 0..15)]);
    }

    #[test]
    fn buckets_go_in_reverse_order_coalesce_small_tensors_and_isolate_large_ones() {
        const MB: usize = 1 << 20;
        // Class thresholds scaled by 1/1024: 16 KB, 64 KB, 256 KB.
        let s = 1.0 / 1024.0;
        let sizes = [100_000usize, 1000, 1000, 50_000, 1000, 1000];
        let names: Vec<String> = (0..sizes.len()).map(|i| format!("t{i}")).collect();
        let shapes: Vec<Vec<usize>> = sizes.iter().map(|&n| vec![n]).collect();
        let l = FlatLayout::new(names.iter().map(|n| n.as_str()).zip(shapes.iter().map(|s| s.as_slice())), 1, 1);
        // First bucket at most 4 KB → one 4000-byte tensor; later buckets 25 MB.
        let b = buckets(&l, s, 25 * MB, 4000);
        let order: Vec<Vec<usize>> = b.iter().map(|b| b.tensors.clone()).collect();
        assert_eq!(order, vec![vec![5], vec![4], vec![3], vec![2, 1], vec![0]]);
        assert_eq!(b.iter().map(|b| b.class).collect::<Vec<_>>(), vec![0, 0, 2, 0, 3]);
        for bk in &b {
            let covered: usize = bk.tensors.iter().map(|&i| l.entries[i].len()).sum();
            assert_eq!(covered, bk.range.len(), "a bucket is exactly its tensors");
        }
        assert_eq!(size_class(16 * MB - 1, 1.0), 0);
        assert_eq!(size_class(16 * MB, 1.0), 1);
        assert_eq!(size_class(300 * MB, 1.0), 3);
    }

    #[test]
    fn launch_env_follows_torchrun_and_rejects_bad_values() {
        let vars = |kv: &'static [(&'static str, &'static str)]| {
            move |k: &str| kv.iter().find(|(a, _)| *a == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(LaunchEnv::from_vars(vars(&[])).unwrap(), None);
        let e = LaunchEnv::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1234")]))
            .unwrap()
            .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.master_port), (1, 2, 1, 1234));
        assert!(LaunchEnv::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "2")])).is_err());
        assert!(LaunchEnv::from_vars(vars(&[("WORLD_SIZE", "2")])).is_err());
        assert!(LaunchEnv::from_vars(vars(&[("WORLD_SIZE", "x"), ("RANK", "0")])).is_err());
    }
}

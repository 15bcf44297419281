//! Dynamic sparse attention (DSA): the dense-to-sparse training schedule, the
//! selection semantics (top-k tokens / each query's top-n blocks) every
//! backend's selection kernel must reproduce, the attention ops (indexer,
//! dense and sparse flash attention, forward and backward) and their
//! inference twins over a KV cache ([`cached`]).

pub mod cached;
pub mod ops;
pub mod schedule;
pub mod select;

pub use cached::{CachedPattern, KvTable, Paging, cached_attention, cached_indexer_block_scores, cached_select};
pub use ops::{
    Pattern, RowSample, attention, attention_backward, indexer_backward, indexer_backward_rows, indexer_block_scores,
    indexer_kl, indexer_kl_rows, indexer_scores, indexer_scores_rows, indexer_train_kept, select_topk,
};
pub use schedule::{Budget, Phase, Plan, SparsitySchedule};

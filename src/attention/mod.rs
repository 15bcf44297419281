//! Dynamic sparse attention (DSA): the dense-to-sparse training schedule and
//! the selection semantics (top-k tokens / top-n blocks) every backend's
//! selection kernel must reproduce. The attention ops themselves (indexer,
//! dense and sparse flash attention on each backend) are the next layer.

pub mod ops;
pub mod schedule;
pub mod select;

pub use ops::{
    Pattern, attention, attention_backward, indexer_backward, indexer_block_scores, indexer_kl, indexer_scores,
    select_topk,
};
pub use schedule::{Budget, Phase, Plan, SparsitySchedule};

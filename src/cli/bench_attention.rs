//! `dynsparse bench attention`: dense causal flash attention against dynamic
//! sparse attention in block mode (indexer → per-query block scores → each
//! query's top-n blocks → block-sparse flash attention), side by side on one
//! backend.

use dynsparse::attention::{self, Pattern};
use dynsparse::backend::{BackendChoice, BackendJob, run_on, select};
use dynsparse::util::machine::{host_description, update_markdown_section};
use dynsparse::util::rng::Rng;
use dynsparse::{Backend, DType, Error, Result, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use super::bench::{AttentionArgs, measure, parse_dtypes};

#[derive(Clone, Debug, Default)]
struct Row {
    seq: usize,
    dense_fwd: f64,
    dense_fb: Option<f64>,
    indexer: f64,
    select: f64,
    sparse_fwd: f64,
    sparse_fb: Option<f64>,
    peak_dense: usize,
    peak_sparse: usize,
}

impl Row {
    fn e2e_fwd(&self) -> f64 {
        self.indexer + self.select + self.sparse_fwd
    }
}

struct Job<'a> {
    a: &'a AttentionArgs,
    dt: DType,
    bar: &'a ProgressBar,
}

impl BackendJob for Job<'_> {
    type Output = Vec<Row>;
    fn run<B: Backend>(self, be: &B) -> Result<Vec<Row>> {
        let a = self.a;
        if !be.supports(self.dt) {
            return Err(Error::DType {
                op: "bench attention",
                dtype: self.dt,
                why: format!(" by the {} backend ({})", be.kind(), be.device_name()),
            });
        }
        let mut rows = Vec::new();
        for &seq in &a.seqs {
            self.bar.set_message(format!("seq {seq}"));
            let mut rng = Rng::new(seq as u64);
            let mut up = |shape: &[usize]| {
                let n: usize = shape.iter().product();
                Tensor::from_f32(be, &rng.normal_vec(n), shape, self.dt)
            };
            let qs = [1, seq, a.heads, a.head_dim];
            let ks = [1, seq, a.kv_heads, a.head_dim];
            let mut row = Row { seq, ..Default::default() };

            // Dense: only the tensors dense attention needs are alive while it runs.
            be.reset_peak();
            let base = be.memory().allocated;
            {
                let (q, k, v, d_o) = (up(&qs)?, up(&ks)?, up(&ks)?, up(&qs)?);
                let mut o = Tensor::empty(be, &qs, self.dt)?;
                let mut lse = Tensor::empty(be, &[1, a.heads, seq], DType::F32)?;
                row.dense_fwd =
                    measure(be, a.min_time, || attention::attention(be, &q, &k, &v, Pattern::Dense, &mut o, &mut lse))?;
                if a.backward {
                    let (mut dq, mut dk, mut dv) = (
                        Tensor::empty(be, &qs, self.dt)?,
                        Tensor::empty(be, &ks, self.dt)?,
                        Tensor::empty(be, &ks, self.dt)?,
                    );
                    row.dense_fb = Some(measure(be, a.min_time, || {
                        attention::attention(be, &q, &k, &v, Pattern::Dense, &mut o, &mut lse)?;
                        attention::attention_backward(
                            be,
                            &q,
                            &k,
                            &v,
                            &o,
                            &lse,
                            &d_o,
                            Pattern::Dense,
                            &mut dq,
                            &mut dk,
                            &mut dv,
                        )
                    })?);
                }
                row.peak_dense = be.memory().peak - base;
            }
            self.bar.inc(1);

            be.reset_peak();
            let base = be.memory().allocated;
            {
                let (q, k, v, d_o) = (up(&qs)?, up(&ks)?, up(&ks)?, up(&qs)?);
                let qi = up(&[1, seq, a.index_heads, a.index_dim])?;
                let ki = up(&[1, seq, a.index_dim])?;
                let w = up(&[1, seq, a.index_heads])?;
                let nb = seq.div_ceil(a.block);
                let keep = a.keep_blocks.min(nb);
                let mut pooled = Tensor::empty(be, &[1, seq, nb], DType::F32)?;
                let mut idx = Tensor::empty(be, &[1, seq, keep], DType::U32)?;
                let mut o = Tensor::empty(be, &qs, self.dt)?;
                let mut lse = Tensor::empty(be, &[1, a.heads, seq], DType::F32)?;
                row.indexer = measure(be, a.min_time, || {
                    attention::indexer_block_scores(be, &qi, &ki, &w, a.block, &mut pooled)
                })?;
                row.select = measure(be, a.min_time, || attention::select_topk(be, &pooled, keep, a.block, &mut idx))?;
                let pat = || Pattern::Blocks { idx: &idx, block: a.block };
                row.sparse_fwd =
                    measure(be, a.min_time, || attention::attention(be, &q, &k, &v, pat(), &mut o, &mut lse))?;
                if a.backward {
                    let (mut dq, mut dk, mut dv) = (
                        Tensor::empty(be, &qs, self.dt)?,
                        Tensor::empty(be, &ks, self.dt)?,
                        Tensor::empty(be, &ks, self.dt)?,
                    );
                    row.sparse_fb = Some(measure(be, a.min_time, || {
                        attention::attention(be, &q, &k, &v, pat(), &mut o, &mut lse)?;
                        attention::attention_backward(be, &q, &k, &v, &o, &lse, &d_o, pat(), &mut dq, &mut dk, &mut dv)
                    })?);
                }
                row.peak_sparse = be.memory().peak - base;
            }
            self.bar.inc(1);
            rows.push(row);
        }
        Ok(rows)
    }
}

fn mib(b: usize) -> String {
    format!("{:.1}", b as f64 / (1u64 << 20) as f64)
}

pub fn run(choice: BackendChoice, a: AttentionArgs) -> Result<()> {
    let dt = parse_dtypes(std::slice::from_ref(&a.dtype))?[0];
    if a.heads == 0 || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        return Err(Error::Invalid(format!("--kv-heads {} must divide --heads {}", a.kv_heads, a.heads)));
    }
    if a.seqs.is_empty() || a.seqs.contains(&0) || a.block == 0 || a.keep_blocks == 0 || a.head_dim == 0 {
        return Err(Error::Invalid("--seqs, --block, --keep-blocks and --head-dim must be positive".into()));
    }
    let sel = select(choice)?;
    log::info!("bench attention on {} ({}): {}", sel.backend.kind(), sel.backend.device_name(), sel.reason);
    let bar = ProgressBar::new(2 * a.seqs.len() as u64)
        .with_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}]").expect("static template"));
    let rows = run_on(&sel.backend, Job { a: &a, dt, bar: &bar })?;
    bar.finish_and_clear();

    let kind = sel.backend.kind();
    let ms = |s: f64| format!("{:.1}", s * 1e3);
    let mut md = format!(
        "Machine: {} — device: {} ({kind}).\n\n\
         Command: `dynsparse --backend {kind} bench attention --seqs {} --heads {} --kv-heads {} --head-dim {} --block {} --keep-blocks {} --index-heads {} --index-dim {} --dtype {dt}`\n\n\
         Batch 1, causal. Sparse = block mode keeping {} blocks of {} keys per query (its own top-n, sink and local included). \
         \"e2e\" = indexer block scores + top-n selection + sparse attention. Times in ms; speed-up = dense / sparse.\n\n\
         | seq | dense fwd | sparse attn fwd | indexer | select | e2e fwd | speed-up attn fwd | speed-up e2e fwd | dense fwd+bwd | e2e fwd+bwd | speed-up e2e fwd+bwd | peak MiB dense / sparse |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        host_description(),
        sel.backend.device_name(),
        a.seqs.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","),
        a.heads,
        a.kv_heads,
        a.head_dim,
        a.block,
        a.keep_blocks,
        a.index_heads,
        a.index_dim,
        a.keep_blocks,
        a.block,
    );
    for r in &rows {
        let (dfb, sfb, sp) = match (r.dense_fb, r.sparse_fb) {
            (Some(d), Some(s)) => {
                let e2e = r.indexer + r.select + s;
                (ms(d), ms(e2e), format!("{:.2}×", d / e2e))
            }
            _ => ("–".into(), "–".into(), "–".into()),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.2}× | {:.2}× | {dfb} | {sfb} | {sp} | {} / {} |\n",
            r.seq,
            ms(r.dense_fwd),
            ms(r.sparse_fwd),
            ms(r.indexer),
            ms(r.select),
            ms(r.e2e_fwd()),
            r.dense_fwd / r.sparse_fwd,
            r.dense_fwd / r.e2e_fwd(),
            mib(r.peak_dense),
            mib(r.peak_sparse),
        ));
    }
    if let Some(r) = rows.last() {
        let idx_share = r.indexer / r.e2e_fwd();
        md.push_str(&format!(
            "\nAt seq {}: the indexer is {:.0}% of the sparse forward pass; it is O(n²·H_I·d_I) while sparse attention is O(n·k·d), \
             so {} at this length.\n",
            r.seq,
            100.0 * idx_share,
            if idx_share > 0.6 {
                "the indexer dominates"
            } else if idx_share < 0.4 {
                "attention dominates"
            } else {
                "the two cost about the same"
            }
        ));
    }
    println!("{md}");
    if let Some(path) = &a.write {
        update_markdown_section(path, &format!("bench attention {kind}"), &md)?;
        println!("written to {}", path.display());
    }
    Ok(())
}

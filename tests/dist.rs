//! Data-parallel training on the CPU backend with in-process ranks: world 2
//! with batch b per rank takes the same steps as world 1 with batch 2b (plain
//! buckets, gradient accumulation, ZeRO-1, f16 loss scaling with an inf on one
//! rank only), and a ZeRO-1 checkpoint resumes at world 2 and at world 1.

use std::sync::Arc;
use std::time::Duration;

use dynsparse::backend::cpu::CpuBackend;
use dynsparse::data::Corpus;
use dynsparse::dist::InProcess;
use dynsparse::model::Model;
use dynsparse::train::checkpoint::TrainState;
use dynsparse::train::{DistConfig, MemoryReport, StepStats, Trainer};
use dynsparse::{Backend, DType};

mod dist_setup;
use dist_setup::{STEPS, model_cfg, rel, train_cfg};

/// One rank's outcome: per-step stats, final master weights and full state.
struct RankRun {
    stats: Vec<StepStats>,
    weights: Vec<Vec<f32>>,
    state: TrainState,
    memory: MemoryReport,
    /// Host readbacks per training step (the backend's download counter).
    downloads_per_step: u64,
}

struct Job {
    world: usize,
    /// Sequences per rank.
    batch: usize,
    accum: usize,
    precision: DType,
    dist: DistConfig,
    /// (rank, step) pairs where an inf is injected into that rank's gradient.
    inject: Vec<(usize, u64)>,
    resume: Option<TrainState>,
    steps: u64,
}

impl Job {
    fn new(world: usize, batch: usize) -> Self {
        Job {
            world,
            batch,
            accum: 1,
            precision: DType::F32,
            // Thresholds scaled so this model has tensors in more than one class and several buckets.
            dist: DistConfig {
                zero: false,
                bucket_mb: 0.01,
                first_bucket_mb: 0.002,
                class_scale: 1.0 / 2048.0,
                overlap: true,
            },
            inject: Vec::new(),
            resume: None,
            steps: STEPS,
        }
    }

    fn run(self, data: &Arc<Corpus>) -> Vec<RankRun> {
        let job = Arc::new(self);
        let comms = InProcess::group(job.world, Duration::from_secs(60)).unwrap();
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (job, data) = (job.clone(), data.clone());
                std::thread::spawn(move || {
                    let be = CpuBackend::new();
                    let tc = train_cfg(job.precision, job.batch, job.accum);
                    let model = Model::new(&be, model_cfg(), job.precision, 1).unwrap();
                    let mut memory = MemoryReport::default();
                    let rank = dynsparse::dist::Collective::rank(&comm);
                    let mut tr = if job.world == 1 && !job.dist.zero {
                        Trainer::new(&be, model, tc, &mut memory).unwrap()
                    } else {
                        Trainer::new_distributed(&be, model, tc, job.dist, Box::new(comm), &mut memory).unwrap()
                    };
                    tr.inject_inf_at = job.inject.iter().filter(|(r, _)| *r == rank).map(|&(_, s)| s).collect();
                    if let Some(st) = &job.resume {
                        tr.restore(&be, st).unwrap();
                    }
                    let before = be.memory().downloads;
                    let stats = (0..job.steps).map(|_| tr.train_step(&be, &data).unwrap()).collect();
                    let downloads_per_step = (be.memory().downloads - before) / job.steps;
                    let state = tr.state(&be).unwrap();
                    RankRun { stats, weights: state.params.clone(), state, memory, downloads_per_step }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }
}

fn assert_same_run(one: &RankRun, many: &[RankRun], tol: f64, what: &str) {
    let many: Vec<_> = many.iter().map(|r| (&r.stats[..], &r.weights[..])).collect();
    dist_setup::assert_same_run((&one.stats, &one.weights), &many, tol, what);
}

fn data() -> Arc<Corpus> {
    Arc::new(dist_setup::corpus())
}

#[test]
fn world_two_equals_world_one_with_twice_the_batch() {
    let data = data();
    let one = Job::new(1, 4).run(&data).remove(0);
    let two = Job::new(2, 2).run(&data);
    assert_same_run(&one, &two, 1e-6, "f32");
    assert!(one.stats[0].loss - one.stats[STEPS as usize - 1].loss > 0.3, "training moved");

    let mut a = Job::new(1, 2);
    a.accum = 2;
    let mut b = Job::new(2, 1);
    b.accum = 2;
    assert_same_run(&a.run(&data).remove(0), &b.run(&data), 1e-6, "f32 accum 2");
}

#[test]
fn zero1_matches_world_one_and_its_checkpoint_resumes_at_world_two_and_one() {
    let data = data();
    let one = Job::new(1, 4).run(&data).remove(0);
    let mut z = Job::new(2, 2);
    z.dist.zero = true;
    let zero = z.run(&data);
    assert_same_run(&one, &zero, 1e-6, "zero-1");
    // Optimizer-side bytes per rank: master 4 + moments 8 over half the (padded) parameters.
    let n: usize = model_cfg().params().iter().map(|p| p.shape.iter().product::<usize>()).sum();
    let opt = zero[0].memory.master_weights + zero[0].memory.optimizer;
    assert!(opt >= 12 * n / 2 && opt < 12 * (n / 2 + 64 * 40), "zero-1 optimizer state {opt} B for {n} parameters");
    // World 1 keeps m and v as two flat f32 buffers: every tensor padded to the flat alignment.
    let align = dynsparse::train::FLAT_ALIGN;
    let padded: usize =
        model_cfg().params().iter().map(|p| p.shape.iter().product::<usize>().div_ceil(align) * align).sum();
    assert!(
        one.memory.optimizer == 8 * padded,
        "world 1 moments {} B for {padded} padded elements",
        one.memory.optimizer
    );
    // 4 + 12/N: the reduced shard of the gradient is not kept on the device beside the working gradient.
    assert_eq!(zero[0].memory.gradients, one.memory.gradients, "zero-1 keeps only the working gradient");

    // Checkpoint after 10 steps at world 2 under ZeRO-1, then resume at world 2 and at world 1.
    let mut first = Job::new(2, 2);
    first.dist.zero = true;
    first.steps = 10;
    let st = first.run(&data).remove(0).state;
    let mut again = Job::new(2, 2);
    again.dist.zero = true;
    again.steps = 10;
    again.resume = Some(st.clone());
    let again = again.run(&data);
    let losses = |r: &RankRun| r.stats.iter().map(|s| s.loss).collect::<Vec<_>>();
    assert_eq!(losses(&again[0]), losses(&zero[0])[10..], "resumed at world 2: bit for bit");
    assert_eq!(again[0].weights, zero[0].weights);
    let mut single = Job::new(1, 4);
    single.steps = 10;
    single.resume = Some(st);
    let single = single.run(&data).remove(0);
    let d = rel(&single.weights, &one.weights);
    assert!(d <= 1e-6, "resumed at world 1: weights differ by {d:.2e}");
}

#[test]
fn buckets_reduced_during_the_backward_pass_give_the_same_run_bit_for_bit() {
    let data = data();
    for (accum, precision, inject) in [(1, DType::F32, vec![]), (2, DType::F32, vec![]), (1, DType::F16, vec![(1, 3)])]
    {
        let runs: Vec<Vec<RankRun>> = [true, false]
            .into_iter()
            .map(|overlap| {
                let mut j = Job::new(2, 2);
                j.accum = accum;
                j.precision = precision;
                j.inject = inject.clone();
                j.steps = 6;
                j.dist.overlap = overlap;
                j.run(&data)
            })
            .collect();
        for (r, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
            let what = format!("accum {accum} {precision} rank {r}");
            let losses =
                |x: &RankRun| x.stats.iter().map(|s| (s.loss, s.skipped, s.grad_norm.to_bits())).collect::<Vec<_>>();
            assert_eq!(losses(a), losses(b), "{what}: overlapped vs after-backward reduction");
            assert_eq!(a.weights, b.weights, "{what}");
        }
        if !inject.is_empty() {
            assert!(runs[0][0].stats[3].skipped, "the injected inf reached the overlapped reduction");
        }
    }
}

#[test]
fn the_backward_hook_reports_every_parameter_once_last_layers_first() {
    let be = CpuBackend::new();
    let cfg = model_cfg();
    let model = Model::new(&be, cfg, DType::F32, 1).unwrap();
    let mut ws = dynsparse::model::Workspace::new(&be, &cfg, DType::F32, 2, 32).unwrap();
    let ids: Vec<u32> = (0..64).map(|i| (i * 7 % 256) as u32).collect();
    model.forward(&be, &mut ws, &ids, Some(&ids), dynsparse::model::StepAttention::Dense).unwrap();
    let mut grads: Vec<_> =
        model.params.iter().map(|p| dynsparse::Tensor::zeros(&be, p.shape(), DType::F32).unwrap()).collect();
    let mut order: Vec<Vec<usize>> = Vec::new();
    model
        .backward_with(&be, &mut ws, &mut grads, 1.0, false, None, &mut |_, _, fin| {
            order.push(fin.to_vec());
            Ok(())
        })
        .unwrap();
    let names: Vec<String> = cfg.params().into_iter().map(|p| p.name).collect();
    let mut seen: Vec<usize> = order.concat();
    seen.sort_unstable();
    assert_eq!(seen, (0..names.len()).collect::<Vec<_>>(), "every parameter exactly once");
    assert_eq!(order.len(), cfg.n_layers + 2, "final LayerNorm, each layer, the embedding");
    assert!(names[order[0][0]].starts_with("lnf"), "the final LayerNorm is done first");
    assert!(order[1].iter().all(|&i| names[i].starts_with(&format!("layers.{}.", cfg.n_layers - 1))));
    assert_eq!(names[order.last().unwrap()[0]], "tok_emb", "the tied embedding is done last");
}

#[test]
fn f16_inf_on_one_rank_makes_every_rank_skip_the_same_step() {
    let data = data();
    let mut a = Job::new(1, 4);
    a.precision = DType::F16;
    a.inject = vec![(0, 3)];
    a.steps = 8;
    let one = a.run(&data).remove(0);
    for zero in [false, true] {
        let mut b = Job::new(2, 2);
        b.precision = DType::F16;
        b.inject = vec![(1, 3)];
        b.steps = 8;
        b.dist.zero = zero;
        let two = b.run(&data);
        for (r, run) in two.iter().enumerate() {
            let skipped: Vec<u64> = run.stats.iter().filter(|s| s.skipped).map(|s| s.step).collect();
            assert_eq!(skipped, vec![3], "zero {zero}: rank {r} skips only the step rank 1 overflowed");
            assert_eq!(run.state.scaler, one.state.scaler, "zero {zero}: rank {r}");
        }
        // f16 activations round per rank's half batch, so world 1 is matched only to f16 precision.
        assert_same_run(&one, &two, 1e-3, "f16");
    }
}

#[test]
fn a_single_process_step_reads_back_one_gradient_statistic() {
    let data = data();
    let be = CpuBackend::new();
    let (accum, steps) = (2, 3);
    let model = Model::new(&be, model_cfg(), DType::F32, 1).unwrap();
    let mut tr = Trainer::new(&be, model, train_cfg(DType::F32, 2, accum), &mut MemoryReport::default()).unwrap();
    let before = be.memory().downloads;
    for _ in 0..steps {
        tr.train_step(&be, &data).unwrap();
    }
    let per_step = (be.memory().downloads - before) / steps;
    // Per step one small record: the loss and indexer KL (summed over micro-batches and
    // layers on the device) with Σg², which also decides finiteness. Before: Σg² plus the
    // loss and each layer's KL per micro-batch; before the device-side sum of Σg², two per
    // parameter tensor.
    assert_eq!(per_step, 1, "host readbacks per training step (accum {accum})");
}

#[test]
fn a_data_parallel_step_stages_the_flat_gradient_with_one_readback() {
    let data = data();
    // The buckets of this job's layout (what the overlapped reduction stages one by one).
    let d = Job::new(2, 2).dist;
    let infos = model_cfg().params();
    let layout = dynsparse::dist::FlatLayout::new(infos.iter().map(|p| (p.name.as_str(), p.shape.as_slice())), 64, 2);
    let mib = (1 << 20) as f64;
    let nb = dynsparse::dist::buckets(
        &layout,
        d.class_scale,
        (d.bucket_mb * mib) as usize,
        (d.first_bucket_mb * mib) as usize,
    )
    .len() as u64;
    assert!(nb > 2, "the test's thresholds make several buckets");
    for accum in [1u64, 2] {
        let mut j = Job::new(2, 2);
        (j.accum, j.steps) = (accum as usize, 2);
        // Overlapped with the backward pass: each bucket staged as soon as it is final, in at
        // most two contiguous runs of the flat gradient (one per weight-decay group).
        // Plus the step's statistics record and Σg² after the reduction.
        let base = 2;
        for r in j.run(&data) {
            eprintln!("world 2, overlapped, accum {accum}: {} readbacks per step ({nb} buckets)", r.downloads_per_step);
            assert!((base + nb..=base + 2 * nb).contains(&r.downloads_per_step), "{} readbacks", r.downloads_per_step);
        }
    }
    for (zero, accum) in [(false, 1u64), (false, 2), (true, 1), (true, 2)] {
        let mut j = Job::new(2, 2);
        (j.accum, j.dist.zero, j.steps, j.dist.overlap) = (accum as usize, zero, 2, false);
        // The flat gradient once (staging for the collective), the step's statistics record
        // (loss and KL, before the small collective), Σg² once unless ZeRO-1 (which sums its
        // host shard).
        // Per-tensor staging read back once per parameter tensor instead of once.
        // ZeRO-1 also reads back its f32 master shard for the weight all-gather: one
        // readback per segment (a tensor's piece in the shard), not yet one flat shard.
        let want = 2 + u64::from(!zero);
        for r in j.run(&data) {
            eprintln!("world 2, zero {zero}, accum {accum}: {} readbacks per step", r.downloads_per_step);
            if zero {
                assert!(r.downloads_per_step > want, "zero-1 reads its master segments back");
            } else {
                assert_eq!(r.downloads_per_step, want, "world 2, accum {accum}: readbacks per step");
            }
        }
    }
}

//! Data-parallel training on burn's collective engine, on the CPU:
//! replicas in threads of one process, and nodes in separate processes
//! talking over 127.0.0.1.

use std::process::Command;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use diffusion_core::{NoiseSchedule, Objective};
use diffusion_model::UNet;
use diffusion_train::distributed::{start_orchestrator, Cluster, DistributedError, Nodes, Replica};
use diffusion_train::{Trainer, TrainerConfig};

mod common;

type B = Autodiff<Flex>;

const GLOBAL_BATCH: usize = 8;
const STEPS: u64 = 3;

fn trainer(shards: usize) -> Trainer<B, UNet<B>> {
    let device = Default::default();
    let model = common::tiny_unet().init_seeded::<B>(&device, 3).unwrap();
    let cfg = TrainerConfig {
        seed: 9,
        shards,
        objective: Objective {
            label_dropout: 0.25,
            ..Objective::default()
        },
        ..TrainerConfig::new(STEPS)
    };
    Trainer::new(model, &NoiseSchedule::reference(), cfg, &device)
}

/// The global batches of a fixed synthetic data set, on the host.
fn batches() -> Vec<(Vec<f32>, Vec<i32>)> {
    let device = Default::default();
    (0..STEPS)
        .map(|k| {
            <Flex as Backend>::seed(&device, 1000 + k);
            let x =
                Tensor::<Flex, 4>::random([GLOBAL_BATCH, 1, 8, 8], Distribution::Uniform(-1.0, 1.0), &device);
            let labels = (0..GLOBAL_BATCH as i32)
                .map(|i| (i * 7 + k as i32) % 10)
                .collect();
            (x.into_data().to_vec::<f32>().unwrap(), labels)
        })
        .collect()
}

/// Samples `range` of a host batch as tensors.
fn tensors(batch: &(Vec<f32>, Vec<i32>), offset: usize, len: usize) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let device = Default::default();
    let x = Tensor::<B, 1>::from_floats(&batch.0[offset * 64..(offset + len) * 64], &device)
        .reshape([len, 1, 8, 8]);
    let y = Tensor::<B, 1, Int>::from_ints(&batch.1[offset..offset + len], &device);
    (x, y)
}

/// Trains `STEPS` steps as replica `local` of `cluster` and returns the
/// weights and the losses.
fn replica_run(
    mut t: Trainer<B, UNet<B>>,
    cluster: &Cluster,
    local: usize,
    data: &[(Vec<f32>, Vec<i32>)],
) -> Result<(Vec<f32>, Vec<f32>), DistributedError> {
    let mut replica = Replica::<Flex>::join(cluster, local, Default::default())?;
    let part = replica.part(GLOBAL_BATCH);
    let share = GLOBAL_BATCH / replica.world_size();
    let mut losses = Vec::new();
    for batch in data {
        let (x, y) = tensors(batch, part.offset, share);
        let out = t.step_part(x, Some(y), part, &mut replica)?;
        losses.push(out.loss.into_scalar());
    }
    let w = common::all_weights(&t);
    // Leaving informs burn's orchestrator, which lives in node 0's process:
    // once that process has exited, leaving can only time out. The work is
    // done by then, so (as the CLI does) a short wait, and no error.
    let _ = replica.finish_within(Duration::from_secs(2));
    Ok((w, losses))
}

fn single_run(shards: usize, data: &[(Vec<f32>, Vec<i32>)]) -> (Vec<f32>, Vec<f32>) {
    let mut t = trainer(shards);
    let mut losses = Vec::new();
    for batch in data {
        let (x, y) = tensors(batch, 0, GLOBAL_BATCH);
        losses.push(t.step(x, Some(y)).loss.into_scalar());
    }
    (common::all_weights(&t), losses)
}

/// Asserts bit-equality, reporting how far apart the values are if not.
fn assert_same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let differ = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert!(
        differ == 0,
        "{what}: {differ} of {} values differ, by up to {}",
        a.len(),
        max_diff(a, b)
    );
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// burn's collective server is one per process: the in-process checks run
/// in one test, in order.
#[test]
fn replicas_in_one_process() {
    let data = batches();
    two_replicas_equal_one_device_with_the_batch_split_in_two(&data);
    a_missing_replica_times_out_with_a_clear_error();
}

fn two_replicas_equal_one_device_with_the_batch_split_in_two(data: &[(Vec<f32>, Vec<i32>)]) {
    let cluster = Cluster::local(2);
    // Initialised here, in turn: initialisation draws from the backend's
    // global generator, which threads would share.
    let trainers = [trainer(1), trainer(1)];
    let runs: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = trainers
            .into_iter()
            .enumerate()
            .map(|(local, t)| {
                let cluster = &cluster;
                s.spawn(move || replica_run(t, cluster, local, data).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The replicas hold the same weights: they took the same steps.
    assert_same(&runs[0].0, &runs[1].0, "replica weights");
    assert_same(&runs[0].1, &runs[1].1, "replica losses");
    // One device splitting each batch in two shards computes ½g₀ + ½g₁;
    // the replicas compute (g₀ + g₁)/2. Halving is exact in binary floating
    // point, so the two are equal bit for bit, and so are the losses.
    let (sharded, sharded_losses) = single_run(2, data);
    assert_same(&runs[0].1, &sharded_losses, "losses vs 2 shards");
    assert_same(&runs[0].0, &sharded, "weights vs 2 shards");
    // One device on the whole batch sums the gradient in another order:
    // equal up to float rounding, which Adam can amplify. Its first steps
    // move a weight by about ±lr whatever the gradient's size, so where a
    // gradient is near 0 and its rounding differs, the weight can end up to
    // 2·lr per step away: at most 2·1e-3·3 = 6e-3 after 3 steps. Such
    // weights are rare; almost all agree to 1e-5.
    let (whole, whole_losses) = single_run(1, data);
    let d = max_diff(&runs[0].0, &whole);
    let far = runs[0]
        .0
        .iter()
        .zip(&whole)
        .filter(|(a, b)| (*a - *b).abs() > 1e-5)
        .count();
    let n = whole.len();
    assert!(
        d <= 6e-3 && far * 100 < n,
        "max weight difference {d}; {far} of {n} differ by more than 1e-5"
    );
    assert!(max_diff(&runs[0].1, &whole_losses) < 1e-5);
    // ... and the steps did change the weights (the check has teeth).
    assert!(max_diff(&whole, &common::all_weights(&trainer(1))) > 1e-4);
}

fn a_missing_replica_times_out_with_a_clear_error() {
    // Two replicas announced, one joins: registration cannot complete.
    let cluster = Cluster {
        timeout: Duration::from_secs(2),
        ..Cluster::local(2)
    };
    let start = Instant::now();
    let err = Replica::<Flex>::join(&cluster, 0, Default::default()).unwrap_err();
    assert!(matches!(err, DistributedError::Timeout { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(err.to_string().contains("within 2 s"), "{err}");
}

/// Env var that makes `node_process` act as node `rank` (set by the parent).
const NODE_ENV: &str = "DIFFUSION_TEST_NODE";

/// `N` distinct free ports: all held open at once while they are picked,
/// so the system cannot hand out one twice.
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|k| held[k].local_addr().unwrap().port())
}

/// Two processes (nodes) of one replica each, over 127.0.0.1, train the
/// same steps as two replicas in one process.
#[test]
fn two_nodes_over_tcp_equal_two_local_replicas() {
    let [coordinator, p1, p2] = free_ports();
    let exe = std::env::current_exe().unwrap();
    let dir = std::env::temp_dir().join(format!("diffusion-nodes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let children: Vec<_> = [(0, p1), (1, p2)]
        .into_iter()
        .map(|(rank, port)| {
            Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "node_process",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(NODE_ENV, format!("{rank},{coordinator},{port},{}", dir.display()))
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a node failed");
    }
    let read = |rank: u32| -> Vec<f32> {
        let s = std::fs::read_to_string(dir.join(format!("weights-{rank}.txt"))).unwrap();
        s.split_whitespace()
            .map(|w| f32::from_bits(w.parse().unwrap()))
            .collect()
    };
    let (w0, w1) = (read(0), read(1));
    assert_same(&w0, &w1, "node weights");
    // Across nodes burn sums the two halves and divides by 2, as in one
    // process: the same bits as one device with two shards.
    let (sharded, _) = single_run(2, &batches());
    assert_same(&w0, &sharded, "node weights vs 2 shards");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One node of `two_nodes_over_tcp_equal_two_local_replicas` (run by it in
/// a child process; does nothing when run on its own).
#[test]
#[ignore = "a child process of two_nodes_over_tcp_equal_two_local_replicas"]
fn node_process() {
    let Ok(spec) = std::env::var(NODE_ENV) else { return };
    let parts: Vec<&str> = spec.split(',').collect();
    let rank: u32 = parts[0].parse().unwrap();
    let coordinator = format!("127.0.0.1:{}", parts[1]);
    let dir = std::path::PathBuf::from(parts[3]);
    if rank == 0 {
        start_orchestrator(parts[1].parse().unwrap()).unwrap();
    }
    let cluster = Cluster {
        devices_per_node: 1,
        nodes: Some(Nodes {
            count: 2,
            rank,
            coordinator,
            address: format!("127.0.0.1:{}", parts[2]),
        }),
        timeout: Duration::from_secs(60),
    };
    let (w, _) = replica_run(trainer(1), &cluster, 0, &batches()).unwrap();
    let text: Vec<String> = w.iter().map(|x| x.to_bits().to_string()).collect();
    std::fs::write(dir.join(format!("weights-{rank}.txt")), text.join(" ")).unwrap();
}

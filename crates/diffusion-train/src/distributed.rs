//! Data-parallel training over several devices and machines, on burn's
//! collective engine (`burn::collective`, feature `collective`).
//!
//! Every replica holds a [`Trainer`](crate::Trainer) in the same state and
//! trains on its share of each global batch ([`Replica::part`]); between
//! backward and the optimizer step, [`Replica`] (a
//! [`GradientSync`]) averages the gradients of all replicas with one
//! all-reduce, so every replica takes the same Adam step and the weights
//! stay identical without ever being sent.
//!
//! - One process, N devices: N threads, each [`Replica::join`]s with its
//!   local index; burn's local collective server sums their tensors.
//! - Several processes or machines ("nodes"): each node's replicas
//!   register with burn's global orchestrator ([`start_orchestrator`], run
//!   by node 0) and the node sums with the other nodes over WebSocket
//!   (burn's data service, tree strategy).
//!
//! What burn leaves to the caller, and this module adds:
//! - **One all-reduce per step.** The gradients are flattened (in the
//!   module's visiting order, which every replica shares) into one tensor
//!   together with the loss and a stop flag, instead of one all-reduce per
//!   parameter sorted by `ParamId` as `GradientsParams::all_reduce` does
//!   (ids are random per process, so that order differs between nodes,
//!   and a parameter without a gradient makes it fail).
//! - **Time limits.** burn's collective operations wait forever for a
//!   peer that died or never came; every call here gives up after
//!   [`Cluster::timeout`] with [`DistributedError::Timeout`]. The
//!   collective is then unusable: the process should report and exit.
//! - **Agreement checks**: [`Replica::agree`] makes sure every replica
//!   starts from the same configuration and weights.
//! - **Coordinated stop**: [`Replica::request_stop`] on any replica makes
//!   all replicas see [`Replica::stop_agreed`] after the same step.

use std::fmt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use burn::collective::{self, AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorPrimitive};

use crate::trainer::{BatchPart, GradientSync};

/// The shape of a data-parallel run: how many replicas, where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Replicas (devices) in each process.
    pub devices_per_node: usize,
    /// Several processes or machines; `None`: this process only.
    pub nodes: Option<Nodes>,
    /// How long one collective operation (registration included) may wait
    /// for the other replicas before giving up.
    pub timeout: Duration,
}

/// The multi-node part of a [`Cluster`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// Number of processes (nodes), each with `devices_per_node` replicas.
    pub count: u32,
    /// This node's rank, 0..count; node 0 runs the orchestrator.
    pub rank: u32,
    /// `host:port` of the orchestrator (on node 0).
    pub coordinator: String,
    /// `host:port` at which the other nodes reach this node's data service
    /// (the port is opened on all interfaces).
    pub address: String,
}

impl Cluster {
    /// One process with `devices` replicas.
    pub fn local(devices: usize) -> Self {
        Self {
            devices_per_node: devices,
            nodes: None,
            timeout: Duration::from_secs(120),
        }
    }

    /// Replicas in all: devices per node × nodes.
    pub fn world_size(&self) -> usize {
        self.devices_per_node * self.nodes.as_ref().map_or(1, |n| n.count as usize)
    }

    /// The global rank of this node's `local`-th replica.
    pub fn rank_of(&self, local: usize) -> usize {
        self.nodes.as_ref().map_or(0, |n| n.rank as usize) * self.devices_per_node + local
    }

    /// Whether this process holds replica 0 (the one that writes files).
    pub fn is_lead_node(&self) -> bool {
        self.nodes.as_ref().is_none_or(|n| n.rank == 0)
    }

    /// Checks the numbers and addresses (one line per problem, naming the
    /// setting).
    pub fn validate(&self) -> Result<(), String> {
        if self.devices_per_node == 0 {
            return Err("devices per node must be at least 1".into());
        }
        if self.timeout.is_zero() {
            return Err("the collective timeout must be above 0 seconds".into());
        }
        if let Some(n) = &self.nodes {
            if n.count == 0 {
                return Err("the number of nodes must be at least 1".into());
            }
            if n.rank >= n.count {
                return Err(format!(
                    "node rank {} is out of range for {} nodes (0..{})",
                    n.rank, n.count, n.count
                ));
            }
            parse_host_port(&n.coordinator).map_err(|e| format!("coordinator: {e}"))?;
            let (_, port) = parse_host_port(&n.address).map_err(|e| format!("node address: {e}"))?;
            if port == 0 {
                return Err("node address: port 0 cannot be reached; give a fixed port".into());
            }
        }
        Ok(())
    }

    fn collective_config(&self) -> Result<CollectiveConfig, DistributedError> {
        self.validate().map_err(DistributedError::Config)?;
        // Tree: deterministic for two replicas, and what burn recommends
        // locally; across nodes the tree needs fewer rounds than the ring.
        let mut config = CollectiveConfig::default()
            .with_num_devices(self.devices_per_node)
            .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
        if let Some(n) = &self.nodes {
            let (_, port) = parse_host_port(&n.address).map_err(DistributedError::Config)?;
            config = config
                .with_num_nodes(n.count)
                .with_global_address(ws_address(&n.coordinator)?)
                .with_node_address(ws_address(&n.address)?)
                .with_data_service_port(port)
                .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2));
        }
        Ok(config)
    }
}

/// `host:port` split and checked.
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("'{s}' is not HOST:PORT (for instance 10.0.0.1:29500)"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("'{port}' in '{s}' is not a port number (1-65535)"))?;
    if host.is_empty() {
        return Err(format!("'{s}' has no host (for instance 10.0.0.1:{port})"));
    }
    Ok((host.to_string(), port))
}

fn ws_address(host_port: &str) -> Result<burn_communication::Address, DistributedError> {
    format!("ws://{host_port}")
        .parse()
        .map_err(|e| DistributedError::Config(format!("'{host_port}': {e:?}")))
}

/// Why a data-parallel step could not go on.
#[derive(Debug, Clone, PartialEq)]
pub enum DistributedError {
    /// The cluster's settings are inconsistent.
    Config(String),
    /// Other replicas did not answer within the time limit: a peer died,
    /// hangs, or never connected.
    Timeout {
        /// The operation that waited.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// A connection to another node closed: its process died or the
    /// network dropped.
    PeerLost {
        /// The operation under way.
        what: &'static str,
        /// The node, when burn says which.
        peer: Option<String>,
    },
    /// burn's collective engine reported an error.
    Collective(String),
    /// The replicas disagree on something that must be equal.
    Disagree(String),
}

impl fmt::Display for DistributedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => write!(f, "distributed settings: {e}"),
            Self::Timeout { what, after } => write!(
                f,
                "{what}: no answer from the other replicas within {} s (a peer died, hangs or never \
                 connected; check that every node runs the same command and can reach the coordinator)",
                after.as_secs()
            ),
            Self::PeerLost { what, peer } => write!(
                f,
                "{what}: lost the connection to {} (its process died or the network dropped)",
                peer.as_deref()
                    .map_or("another node".to_string(), |p| format!("node {p}"))
            ),
            Self::Collective(e) => write!(f, "collective operation failed: {e}"),
            Self::Disagree(e) => write!(f, "the replicas disagree: {e}"),
        }
    }
}

impl std::error::Error for DistributedError {}

/// Runs `op` on a helper thread and waits at most `limit` for it (burn's
/// collective calls block without a time limit). On timeout the helper is
/// left blocked; the collective cannot be used any more.
fn within<T: Send + 'static>(
    what: &'static str,
    limit: Duration,
    op: impl FnOnce() -> Result<T, collective::CollectiveError> + Send + 'static,
) -> Result<T, DistributedError> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("diffusion-{what}"))
        .spawn(move || {
            let _ = tx.send(op());
        })
        .map_err(|e| DistributedError::Collective(format!("cannot start a thread: {e}")))?;
    match rx.recv_timeout(limit) {
        Ok(r) => r.map_err(|e| match e {
            // burn's local server task ended: one of its network tasks
            // panicked on a connection that closed.
            collective::CollectiveError::LocalServerMissing => {
                DistributedError::PeerLost { what, peer: None }
            }
            // burn's error type for this is not public: read its name.
            other => match format!("{other:?}") {
                e if e.contains("PeerLost") => DistributedError::PeerLost {
                    what,
                    peer: e
                        .split("NodeId(")
                        .nth(1)
                        .and_then(|r| r.split(')').next())
                        .map(str::to_string),
                },
                e => DistributedError::Collective(format!("{what}: {e}")),
            },
        }),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(DistributedError::Timeout { what, after: limit }),
        // The helper panicked inside burn (a lost connection panics there).
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(DistributedError::PeerLost { what, peer: None }),
    }
}

/// Starts burn's global orchestrator on `port` (all interfaces) in a
/// background thread of this process; node 0 calls it before joining. It
/// runs until the process exits.
pub fn start_orchestrator(port: u16) -> Result<(), DistributedError> {
    // Fail now, with a clear message, if the port is taken.
    std::net::TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| DistributedError::Config(format!("cannot open the coordinator port {port}: {e}")))?;
    std::thread::Builder::new()
        .name("diffusion-orchestrator".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("diffusion: cannot start the orchestrator's runtime: {e}");
                    return;
                }
            };
            runtime.block_on(burn_collective::start_global_orchestrator(port));
        })
        .map_err(|e| DistributedError::Collective(format!("cannot start the orchestrator thread: {e}")))?;
    Ok(())
}

/// One data-parallel replica: its rank, and the [`GradientSync`] that
/// averages its gradients with the others'. `I` is the inner (non-autodiff)
/// backend, on which burn's collective runs.
pub struct Replica<I: Backend> {
    peer: PeerId,
    rank: usize,
    world: usize,
    timeout: Duration,
    stop_requested: bool,
    stop_agreed: bool,
    last_all_reduce: Duration,
    _backend: std::marker::PhantomData<I>,
}

impl<I: Backend> fmt::Debug for Replica<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

impl<I: Backend> Replica<I> {
    /// Registers this node's `local`-th replica on `device`; returns when
    /// every replica of the cluster has registered (or after the timeout).
    /// Every replica of a process must call it from its own thread.
    pub fn join(cluster: &Cluster, local: usize, device: I::Device) -> Result<Self, DistributedError> {
        if local >= cluster.devices_per_node {
            return Err(DistributedError::Config(format!(
                "local replica {local} of {}",
                cluster.devices_per_node
            )));
        }
        let config = cluster.collective_config()?;
        let rank = cluster.rank_of(local);
        let peer = PeerId::from(rank);
        within("joining the cluster", cluster.timeout, move || {
            collective::register::<I>(peer, device, config)
        })?;
        Ok(Self {
            peer,
            rank,
            world: cluster.world_size(),
            timeout: cluster.timeout,
            stop_requested: false,
            stop_agreed: false,
            last_all_reduce: Duration::ZERO,
            _backend: Default::default(),
        })
    }

    /// This replica's global rank (0 writes the files).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Replicas in all.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// This replica's samples of a global batch of `global` (equal shares;
    /// `global` must divide by the world size).
    pub fn part(&self, global: usize) -> BatchPart {
        BatchPart {
            offset: self.rank * (global / self.world),
            global,
        }
    }

    /// Asks all replicas to stop after the next step (Ctrl-C on any node).
    pub fn request_stop(&mut self) {
        self.stop_requested = true;
    }

    /// Whether some replica asked to stop, as agreed in the last step's
    /// all-reduce (the same answer on every replica).
    pub fn stop_agreed(&self) -> bool {
        self.stop_agreed
    }

    /// How long the last step's all-reduce took (waiting for the slowest
    /// replica included).
    pub fn last_all_reduce(&self) -> Duration {
        self.last_all_reduce
    }

    /// All-reduces `values` (mean) and returns the result.
    fn mean(&mut self, what: &'static str, values: Tensor<I, 1>) -> Result<Tensor<I, 1>, DistributedError> {
        let peer = self.peer;
        let primitive = values.into_primitive().tensor();
        let start = Instant::now();
        let out = within(what, self.timeout, move || {
            collective::all_reduce::<I>(peer, primitive, ReduceOperation::Mean)
        })?;
        self.last_all_reduce = start.elapsed();
        Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    /// Checks that every replica holds the same `values` (a fingerprint
    /// of configuration, step and weights); `what` names them in the error.
    /// The values should be small integers (exact in f32): each is compared
    /// with the replicas' mean.
    pub fn agree(&mut self, what: &str, values: &[f32], device: &I::Device) -> Result<(), DistributedError> {
        let mine = Tensor::<I, 1>::from_floats(values, device);
        let mean = self.mean("checking agreement", mine)?;
        let mean = mean.into_data().to_vec::<f32>().unwrap_or_default();
        if mean.len() != values.len() || mean.iter().zip(values).any(|(a, b)| a != b) {
            return Err(DistributedError::Disagree(format!(
                "replica {} has a different {what} than the others (every node must run the same \
                 command on the same run directory)",
                self.rank
            )));
        }
        Ok(())
    }

    /// Leaves the cluster (call once training is over, on every replica),
    /// waiting at most the cluster's time limit. Across nodes this tells
    /// burn's orchestrator, in node 0's process: if that process has
    /// already exited, this can only time out, and the error may be ignored
    /// (every step is done by then).
    pub fn finish(self) -> Result<(), DistributedError> {
        let limit = self.timeout;
        self.finish_within(limit)
    }

    /// [`Replica::finish`] with another time limit. Leaving tells burn's
    /// orchestrator, which lives in node 0's process: when that process is
    /// already gone, leaving can only time out.
    pub fn finish_within(self, limit: Duration) -> Result<(), DistributedError> {
        let peer = self.peer;
        within("leaving the cluster", limit, move || {
            collective::finish_collective::<I>(peer)
        })
    }
}

/// A fingerprint of 64 bits as four 16-bit integers (exact in f32, so
/// [`Replica::agree`] can compare them).
pub fn fingerprint_words(bits: u64) -> [f32; 4] {
    std::array::from_fn(|k| ((bits >> (16 * k)) & 0xffff) as f32)
}

/// A 64-bit fingerprint (FNV-1a) of `recipe` (the caller's description of
/// the run), the trainer's step and every weight of its model and EMA, for
/// [`Replica::agree`]: replicas with equal fingerprints start alike.
pub fn fingerprint<B, M>(recipe: &[u8], trainer: &crate::Trainer<B, M>) -> u64
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + diffusion_core::BatchDenoiser<B>,
{
    struct Fnv(u64);
    impl Fnv {
        fn eat(&mut self, bytes: &[u8]) {
            for &b in bytes {
                self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    impl<Bk: Backend> ModuleVisitor<Bk> for Fnv {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
            let data = p.val().into_data();
            self.eat(&data.bytes);
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.eat(recipe);
    let s = trainer.state();
    for v in [s.step, s.epoch, s.batch_in_epoch] {
        h.eat(&v.to_le_bytes());
    }
    trainer.model().visit(&mut h);
    Module::<B::InnerBackend>::visit(&trainer.ema().model, &mut h);
    h.0
}

impl<B: AutodiffBackend> GradientSync<B> for Replica<B::InnerBackend> {
    type Error = DistributedError;

    fn average<M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        mut grads: GradientsParams,
        loss: Tensor<B::InnerBackend, 1>,
    ) -> Result<(GradientsParams, Tensor<B::InnerBackend, 1>), Self::Error> {
        let device = loss.device();
        let mut flat = Flatten::<B::InnerBackend> {
            grads: &mut grads,
            parts: Vec::new(),
            shapes: Vec::new(),
            present: Vec::new(),
            device: device.clone(),
        };
        model.visit(&mut flat);
        let Flatten {
            mut parts,
            shapes,
            present,
            ..
        } = flat;
        let flags: Vec<f32> = present.iter().map(|&p| if p { 1.0 } else { 0.0 }).collect();
        parts.push(Tensor::from_floats(flags.as_slice(), &device));
        parts.push(loss);
        parts.push(Tensor::from_floats(
            [if self.stop_requested { 1.0f32 } else { 0.0 }],
            &device,
        ));
        let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        let mean = self.mean("averaging gradients", Tensor::cat(parts, 0))?;
        let tail = mean
            .clone()
            .narrow(0, total, shapes.len() + 2)
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| DistributedError::Collective(format!("{e:?}")))?;
        let (flags, rest) = tail.split_at(shapes.len());
        self.stop_agreed = rest[1] > 0.0;
        let loss = mean.clone().narrow(0, total + shapes.len(), 1);
        let mut unflat = Unflatten::<B::InnerBackend> {
            flat: mean,
            shapes,
            present: flags.iter().map(|&f| f > 0.0).collect(),
            offset: 0,
            index: 0,
            grads: GradientsParams::new(),
        };
        model.visit(&mut unflat);
        Ok((unflat.grads, loss))
    }
}

/// Collects each float parameter's gradient (zeros where it has none) as
/// a flat tensor, in visiting order.
struct Flatten<'a, I: Backend> {
    grads: &'a mut GradientsParams,
    parts: Vec<Tensor<I, 1>>,
    shapes: Vec<Vec<usize>>,
    present: Vec<bool>,
    device: I::Device,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let dims = param.val().dims();
        let n: usize = dims.iter().product();
        match self.grads.remove::<B::InnerBackend, D>(param.id) {
            Some(g) => {
                self.parts.push(g.reshape([n]));
                self.present.push(true);
            }
            None => {
                self.parts.push(Tensor::zeros([n], &self.device));
                self.present.push(false);
            }
        }
        self.shapes.push(dims.to_vec());
    }
}

/// Cuts the averaged flat tensor back into gradients (only for parameters
/// that had one on some replica, as an unsynchronised step would).
struct Unflatten<I: Backend> {
    flat: Tensor<I, 1>,
    shapes: Vec<Vec<usize>>,
    present: Vec<bool>,
    offset: usize,
    index: usize,
    grads: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let shape = &self.shapes[self.index];
        let n: usize = shape.iter().product();
        if self.present[self.index] {
            let dims: [usize; D] = std::array::from_fn(|k| shape[k]);
            let g = self.flat.clone().narrow(0, self.offset, n).reshape(dims);
            self.grads.register(param.id, g);
        }
        self.offset += n;
        self.index += 1;
    }
}

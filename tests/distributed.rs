//! Data-parallel training end to end on the CPU: two replicas in one
//! process, two processes (nodes) over 127.0.0.1, a node that dies, a node
//! that never comes, and a run resumed on another number of devices.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{bin, fails, is_training, ok, scratch, train_tiny};

/// `N` distinct free ports: all held open at once while they are picked,
/// so the system cannot hand out one twice.
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|k| held[k].local_addr().unwrap().port())
}

/// `diffusion train` of the tiny preset as node `rank` of 2.
fn node(out: &Path, rank: u32, coordinator: u16, own: u16, extra: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args([
        "train",
        "--backend",
        "cpu",
        "--preset",
        "tiny",
        "--nodes",
        "2",
        "--node-rank",
    ])
    .arg(rank.to_string())
    .arg("--coordinator")
    .arg(format!("127.0.0.1:{coordinator}"))
    .arg("--node-address")
    .arg(format!("127.0.0.1:{own}"))
    .arg("--out")
    .arg(out)
    .args(extra);
    cmd
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Waits for `child` at most `limit`; kills it and fails the test after.
fn finish(mut child: Child, limit: Duration) -> (std::process::ExitStatus, String, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status, text, start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Samples 10 digits with fixed noise and returns the .npy bytes.
fn samples(run: &Path, dir: &Path, name: &str) -> Vec<u8> {
    let npy = dir.join(format!("{name}.npy"));
    ok(bin()
        .args([
            "sample",
            "--backend",
            "cpu",
            "--sampler",
            "ddim",
            "--steps",
            "10",
            "--n",
            "10",
            "--checkpoint",
        ])
        .arg(run)
        .arg("--out")
        .arg(dir.join(format!("{name}.png")))
        .arg("--npy")
        .arg(&npy));
    std::fs::read(npy).unwrap()
}

/// The all-reduce column of metrics.csv.
fn allreduce_ms(run: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header
        .iter()
        .position(|h| *h == "allreduce_ms")
        .expect("an allreduce_ms column");
    lines
        .map(|l| l.split(',').nth(col).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn two_processes_train_like_two_devices_in_one_process() {
    let dir = scratch("distributed-equal");
    let local = dir.join("local");
    let text = train_tiny(&local, &["--devices", "2"]);
    assert!(text.contains("done: 32 steps"), "{text}");

    let nodes = dir.join("nodes");
    let [c, a, b] = free_ports();
    let first = spawn(node(&nodes, 0, c, a, &[]));
    let second = spawn(node(&nodes, 1, c, b, &[]));
    let (s0, t0, _) = finish(first, Duration::from_secs(120));
    let (s1, t1, _) = finish(second, Duration::from_secs(120));
    assert!(s0.success(), "node 0: {t0}");
    assert!(s1.success(), "node 1: {t1}");
    assert!(t0.contains("done: 32 steps"), "{t0}");
    assert!(t1.contains("stopped at step 32"), "{t1}");

    // Both summed the same two halves and halved the sum: the same weights
    // bit for bit, so the same digits from the same noise.
    let from_local = samples(&local, &dir, "local");
    let from_nodes = samples(&nodes, &dir, "nodes");
    assert!(from_local == from_nodes, "the two runs sample differently");
    // Node 1 wrote nothing into the shared run directory besides node 0's
    // files: one set of checkpoints, metrics with the all-reduce times.
    let times = allreduce_ms(&nodes);
    assert_eq!(times.len(), 32);
    assert!(times.iter().all(|&t| t > 0.0), "{times:?}");
    let config = std::fs::read_to_string(nodes.join("config.json")).unwrap();
    assert!(config.contains("\"world_size\": 2"), "{config}");
}

#[test]
fn a_killed_node_stops_the_other_with_a_clear_error() {
    let dir = scratch("distributed-kill");
    let out = dir.join("run");
    let [c, a, b] = free_ports();
    let args = ["--epochs", "200", "--collective-timeout", "10"];
    let first = spawn(node(&out, 0, c, a, &args));
    let mut second = spawn(node(&out, 1, c, b, &args));
    // Kill node 1 once node 0 has saved its first checkpoint (epoch 1).
    let start = Instant::now();
    while !out.join("checkpoints").join("latest.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    second.kill().unwrap();
    let _ = second.wait();
    let (status, text, took) = finish(first, Duration::from_secs(60));
    assert!(matches!(status.code(), Some(c) if c != 0), "{status:?}: {text}");
    // Within the time limit (10 s) and a margin for the step under way.
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{text}");
    assert!(
        errors[0].contains("lost the connection") || errors[0].contains("no answer"),
        "{}",
        errors[0]
    );
    assert!(
        errors[0].contains("is intact") && errors[0].contains("--resume"),
        "{}",
        errors[0]
    );
    assert!(!text.contains("panicked"), "{text}");
    // The checkpoint it names loads: sampling from it works.
    samples(&out, &dir, "after-kill");
}

#[test]
fn a_node_that_never_comes_is_reported_after_the_time_limit() {
    let dir = scratch("distributed-alone");
    let [c, a] = free_ports();
    let start = Instant::now();
    let line = fails(&mut node(
        &dir.join("run"),
        0,
        c,
        a,
        &["--collective-timeout", "3"],
    ));
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        line.contains("joining the cluster") && line.contains("within 3 s"),
        "{line}"
    );
}

#[test]
fn a_run_resumes_on_another_number_of_devices() {
    let dir = scratch("distributed-resume");
    let run = dir.join("run");
    let text = train_tiny(&run, &["--devices", "2", "--stop-after", "20"]);
    assert!(text.contains("stopped at step 20"), "{text}");
    // The global batch (32) stays; one device now takes all of it.
    let text = ok(bin().args(["train", "--backend", "cpu", "--resume"]).arg(&run));
    assert!(
        text.contains("resuming at step 20") && text.contains("done: 32 steps"),
        "{text}"
    );
    let config = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(config.contains("\"world_size\": 1"), "{config}");
    // A world size that does not divide the global batch is refused.
    let line = fails(
        bin()
            .args([
                "train",
                "--backend",
                "cpu",
                "--epochs",
                "3",
                "--devices",
                "3",
                "--resume",
            ])
            .arg(&run),
    );
    assert!(line.contains("does not split over 3 replicas"), "{line}");
}

#[test]
fn distributed_flags_are_checked() {
    let dir = scratch("distributed-flags");
    let out = dir.join("run");
    for (args, expect) in [
        (&["--devices", "0"][..], "--devices must be at least 1"),
        (
            &["--nodes", "2", "--coordinator", "127.0.0.1:1"][..],
            "--node-rank",
        ),
        (&["--nodes", "2", "--node-rank", "0"][..], "--coordinator"),
        (
            &["--nodes", "2", "--node-rank", "2", "--coordinator", "127.0.0.1:9"][..],
            "out of range",
        ),
        (
            &["--nodes", "2", "--node-rank", "1", "--coordinator", "10.0.0.1:9"][..],
            "--node-address",
        ),
        (
            &["--nodes", "2", "--node-rank", "0", "--coordinator", "nowhere"][..],
            "HOST:PORT",
        ),
        (&["--node-rank", "1"][..], "--nodes"),
        (&["--devices", "2", "--batch", "0"][..], "batch_size"),
    ] {
        let line = fails(
            bin()
                .args(["train", "--backend", "cpu", "--preset", "tiny", "--out"])
                .arg(&out)
                .args(args),
        );
        assert!(line.contains(expect), "{args:?}: {line}");
    }
    // --batch is per device: 2 devices × 16 = the global 32.
    let text = train_tiny(&out, &["--devices", "2", "--batch", "16", "--epochs", "1"]);
    assert!(text.contains("done: 16 steps"), "{text}");
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(config.contains("\"batch_size\": 32"), "{config}");
}

/// Two nodes training into `out`, once they are ([`is_training`]). If a
/// node exits first, or neither trains within a minute (a few seconds is
/// usual), both are stopped, what they printed goes to stderr, and None is
/// returned.
fn nodes_training(out: &Path, args: &[&str]) -> Option<(Child, Child)> {
    let [c, a, b] = free_ports();
    let mut nodes = [spawn(node(out, 0, c, a, args)), spawn(node(out, 1, c, b, args))];
    let start = Instant::now();
    loop {
        if is_training(out) {
            let [first, second] = nodes;
            return Some((first, second));
        }
        let exited = nodes.iter_mut().any(|n| n.try_wait().unwrap().is_some());
        if exited || start.elapsed() > Duration::from_secs(60) {
            for (rank, mut n) in nodes.into_iter().enumerate() {
                let _ = n.kill();
                let out = n.wait_with_output().unwrap();
                eprintln!(
                    "node {rank} before training ({:?}): {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_interrupt_on_one_node_stops_both_after_the_same_step() {
    let dir = scratch("distributed-interrupt");
    let args = ["--epochs", "200", "--collective-timeout", "30"];
    // Once in some twenty runs of this file on a loaded 2-core machine the
    // pair never started training (what the nodes printed was not kept);
    // the start is not what this test checks (the other tests here do), so
    // a failed start is shown and tried once more on fresh ports.
    let (out, (first, second)) = [dir.join("run"), dir.join("run-again")]
        .into_iter()
        .find_map(|out| nodes_training(&out, &args).map(|pair| (out, pair)))
        .expect("the two nodes never started training (their output is above)");
    // Interrupt node 1 (SIGTERM, as a scheduler would) once training runs.
    let status = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (s1, t1, _) = finish(second, Duration::from_secs(30));
    let (s0, t0, took) = finish(first, Duration::from_secs(30));
    assert_eq!(s1.code(), Some(130), "{t1}");
    assert!(s0.success(), "{t0}");
    assert!(
        took < Duration::from_secs(10),
        "node 0 took {took:?} after node 1 stopped"
    );
    // Both stopped after the same step, and node 0 saved it.
    let step = |text: &str, pattern: &str| -> u64 {
        let at = text
            .find(pattern)
            .unwrap_or_else(|| panic!("no '{pattern}' in: {text}"));
        text[at + pattern.len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let s = step(&t0, "stopped at step ");
    assert_eq!(s, step(&t1, "stopped at step "));
    let latest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints/latest.json")).unwrap()).unwrap();
    assert_eq!(latest["state"]["step"], s);
}

#[test]
fn nodes_that_count_different_replicas_are_refused() {
    let dir = scratch("distributed-mismatch");
    let out = dir.join("run");
    let [c, a, b] = free_ports();
    let first = spawn(node(
        &out,
        0,
        c,
        a,
        &["--devices", "2", "--collective-timeout", "20"],
    ));
    let second = spawn(node(&out, 1, c, b, &["--collective-timeout", "20"]));
    for (child, name) in [(first, "node 0"), (second, "node 1")] {
        let (status, text, _) = finish(child, Duration::from_secs(60));
        assert!(!status.success(), "{name} trained: {text}");
        assert!(text.contains("the replicas disagree"), "{name}: {text}");
        assert!(!text.contains("panicked"), "{text}");
    }
}

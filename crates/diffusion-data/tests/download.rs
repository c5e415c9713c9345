//! `download` against a small HTTP server on 127.0.0.1 that serves the
//! bundled (and, when present, the shared) IDX files. Its routes play the
//! mirrors a real download meets:
//!
//! - `/good/<file>`: the real bytes;
//! - `/missing/<file>`: 404;
//! - `/corrupt/<file>`: a well-formed, uncompressed IDX file with one pixel
//!   changed, so that only the checksum can reject it;
//! - `/short/<file>`: announces the full length, sends half, hangs up.
//!
//! A port that was bound and released plays a mirror that refuses
//! connections. No other network is used.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diffusion_data::idx::read_idx;
use diffusion_data::{
    default_dir, download, is_present, load_named, DataError, DatasetName, DownloadEvent, DownloadProgress,
    FileKind, Split,
};

/// The MNIST copy bundled in this repository.
fn bundled_mnist_dir() -> PathBuf {
    // Cargo sets the variable when it runs the test too: a test binary
    // reused from a build in another checkout still finds this one's data.
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    crate_dir.join("../../data/mnist")
}

/// A one-thread HTTP/1.1 server for the files in `root`. It stops when
/// dropped, and by itself after two minutes.
struct Server {
    base: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(root: PathBuf) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut corrupt_cache = HashMap::new();
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &root, &mut corrupt_cache),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
        });
        Server {
            base,
            stop,
            thread: Some(thread),
        }
    }

    fn mirror(&self, route: &str) -> String {
        format!("{}/{route}/", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, root: &Path, corrupt_cache: &mut HashMap<String, Vec<u8>>) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Skip the headers.
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (route, file) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut stream = stream;
    let real = std::fs::read(root.join(file)).ok();
    let (status, body, announced) = match (route, real) {
        ("good", Some(bytes)) => ("200 OK", bytes.clone(), bytes.len()),
        ("short", Some(bytes)) => ("200 OK", bytes[..bytes.len() / 2].to_vec(), bytes.len()),
        ("corrupt", Some(_)) => {
            let bytes = corrupt_cache
                .entry(file.to_string())
                .or_insert_with(|| corrupt_copy(&root.join(file)))
                .clone();
            let n = bytes.len();
            ("200 OK", bytes, n)
        }
        _ => ("404 Not Found", b"not here".to_vec(), 8),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {announced}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    );
    // The client may hang up early; that is its business.
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
    let _ = stream.flush();
}

/// The IDX file in `gz`, uncompressed, with its last data byte changed.
fn corrupt_copy(gz: &Path) -> Vec<u8> {
    let kind = if gz.to_string_lossy().contains("images") {
        FileKind::Images
    } else {
        FileKind::Labels
    };
    let file = read_idx(gz, kind).unwrap();
    let mut out = vec![0, 0, 8, file.dims.len() as u8];
    for d in &file.dims {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend_from_slice(&file.data);
    *out.last_mut().unwrap() ^= 1;
    out
}

/// A base URL on which nothing listens: connections are refused.
fn refused_mirror() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/")
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "diffusion-data-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The names of the files in `dir` (hidden ones included).
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn record(events: &Mutex<Vec<DownloadProgress>>) -> impl FnMut(DownloadProgress) + '_ {
    move |e| events.lock().unwrap().push(e)
}

#[test]
fn falls_back_past_a_refused_and_a_404_mirror() {
    let server = Server::start(bundled_mnist_dir());
    let dir = TempDir::new("fallback");
    let mirrors = vec![refused_mirror(), server.mirror("missing"), server.mirror("good")];
    let events = Mutex::new(Vec::new());
    download(DatasetName::Mnist, &dir.0, &mirrors, &mut record(&events)).unwrap();

    assert!(is_present(&dir.0));
    assert_eq!(
        listing(&dir.0),
        [
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz"
        ],
        "no temporary files may be left"
    );
    let train = load_named(DatasetName::Mnist, &dir.0, Split::Train).unwrap();
    assert_eq!(train.len, 60_000);
    load_named(DatasetName::Mnist, &dir.0, Split::Test).unwrap();

    let events = events.into_inner().unwrap();
    let failures: Vec<&String> = events
        .iter()
        .filter_map(|e| match &e.event {
            DownloadEvent::MirrorFailed { reason } => Some(reason),
            _ => None,
        })
        .collect();
    // Two failed mirrors for each of the four files: refused, then 404.
    assert_eq!(failures.len(), 8, "{failures:?}");
    assert!(failures.iter().any(|r| r.contains("refused")), "{failures:?}");
    assert!(failures.iter().any(|r| r.contains("404")), "{failures:?}");
    assert!(failures.iter().all(|r| !r.contains('\n')));

    // Progress for the big file climbs to the announced total.
    let bytes: Vec<(u64, Option<u64>)> = events
        .iter()
        .filter(|e| e.event == DownloadEvent::Bytes && e.file == "train-images-idx3-ubyte.gz")
        .map(|e| (e.downloaded, e.total))
        .collect();
    assert!(bytes.len() > 10, "{}", bytes.len());
    assert!(bytes.windows(2).all(|w| w[0].0 < w[1].0));
    let size = std::fs::metadata(bundled_mnist_dir().join("train-images-idx3-ubyte.gz"))
        .unwrap()
        .len();
    assert_eq!(*bytes.last().unwrap(), (size, Some(size)));
    let done = events.iter().filter(|e| e.event == DownloadEvent::Done).count();
    assert_eq!(done, 4);

    // A second run finds everything in place and fetches nothing.
    let again = Mutex::new(Vec::new());
    download(
        DatasetName::Mnist,
        &dir.0,
        &[refused_mirror()],
        &mut record(&again),
    )
    .unwrap();
    let again = again.into_inner().unwrap();
    assert_eq!(again.len(), 4);
    assert!(again.iter().all(|e| e.event == DownloadEvent::Skipped));
}

#[test]
fn a_mirror_serving_corrupt_bytes_is_rejected_by_checksum() {
    let server = Server::start(bundled_mnist_dir());

    // Corrupt first, good second: every file ends up right.
    let dir = TempDir::new("corrupt-then-good");
    let events = Mutex::new(Vec::new());
    let mirrors = [server.mirror("corrupt"), server.mirror("good")];
    download(DatasetName::Mnist, &dir.0, &mirrors, &mut record(&events)).unwrap();
    let events = events.into_inner().unwrap();
    let rejected = events
        .iter()
        .filter(|e| matches!(&e.event, DownloadEvent::MirrorFailed { reason } if reason.starts_with("checksum mismatch")))
        .count();
    assert_eq!(rejected, 4, "{events:?}");
    load_named(DatasetName::Mnist, &dir.0, Split::Test).unwrap();

    // Only corrupt mirrors: an error, and nothing left in the directory.
    let dir = TempDir::new("corrupt-only");
    let err = download(
        DatasetName::Mnist,
        &dir.0,
        &[server.mirror("corrupt")],
        &mut |_| {},
    )
    .unwrap_err();
    let DataError::Download { path, attempts, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(path.ends_with("train-images-idx3-ubyte.gz"));
    assert_eq!(attempts.len(), 1);
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(
        msg.contains("checksum mismatch") && msg.contains("could not download mnist"),
        "{msg}"
    );
    assert!(listing(&dir.0).is_empty(), "{:?}", listing(&dir.0));
}

#[test]
fn a_transfer_cut_short_is_not_kept() {
    let server = Server::start(bundled_mnist_dir());
    let dir = TempDir::new("short");
    let err = download(DatasetName::Mnist, &dir.0, &[server.mirror("short")], &mut |_| {}).unwrap_err();
    println!("{err}");
    let DataError::Download { attempts, .. } = &err else {
        panic!("{err:?}")
    };
    // ureq notices the early end itself, or the byte count shows it.
    assert!(
        attempts[0].contains("transfer failed") || attempts[0].contains("connection closed after"),
        "{attempts:?}"
    );
    assert!(listing(&dir.0).is_empty(), "{:?}", listing(&dir.0));
}

#[test]
fn no_mirror_at_all_is_an_error_not_a_panic() {
    let dir = TempDir::new("none");
    let err = download(DatasetName::FashionMnist, &dir.0, &[], &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("no mirrors given"), "{err}");
}

#[test]
fn fashion_mnist_downloads_from_a_mirror_of_a_real_copy() {
    let real = default_dir(DatasetName::FashionMnist);
    if !is_present(&real) {
        println!(
            "note: no Fashion-MNIST in {} (set DIFFUSION_DATA_DIR); skipping the Fashion-MNIST download",
            real.display()
        );
        return;
    }
    let server = Server::start(real);
    let dir = TempDir::new("fashion");
    let mirrors = [server.mirror("missing"), server.mirror("good")];
    download(DatasetName::FashionMnist, &dir.0, &mirrors, &mut |_| {}).unwrap();
    let test = load_named(DatasetName::FashionMnist, &dir.0, Split::Test).unwrap();
    assert_eq!(test.label_counts(), vec![1000; 10]);
    // The MNIST checksums do not accept Fashion-MNIST files.
    let dir = TempDir::new("fashion-as-mnist");
    let err = download(DatasetName::Mnist, &dir.0, &[server.mirror("good")], &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
}

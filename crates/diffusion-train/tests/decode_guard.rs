//! `decode_guarded` keeps decoder panics quiet on its own thread only, and
//! leaves the process's panic hook in place, even with threads decoding at
//! once (its own process: it installs a panic hook).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use diffusion_train::checkpoint::decode_guarded;

#[test]
fn decoder_panics_stay_quiet_and_the_hook_survives_threads() {
    let reported = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reported);
    std::panic::set_hook(Box::new(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    }));

    let threads: Vec<_> = (0..4)
        .map(|k| {
            std::thread::spawn(move || {
                for i in 0..500 {
                    let result = decode_guarded(Path::new("w.mpk"), "weights", || -> u32 {
                        // Decoding takes a while, so the threads' decoders overlap.
                        std::thread::sleep(std::time::Duration::from_micros(100));
                        if (i + k) % 2 == 0 {
                            panic!("Invalid id.");
                        }
                        7
                    });
                    match result {
                        Ok(v) => assert_eq!(v, 7),
                        Err(e) => assert!(e.to_string().contains("Invalid id. (the file is corrupt)"), "{e}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        reported.load(Ordering::SeqCst),
        0,
        "a decoder's panic reached the hook"
    );

    // A panic outside a decoder still reaches the process's hook.
    let outside = std::thread::spawn(|| panic!("a real bug")).join();
    assert!(outside.is_err());
    assert_eq!(reported.load(Ordering::SeqCst), 1, "the hook was lost");
}

//! Progress bars.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` units with a free-form message; hidden when stderr is
/// not a terminal (logs and tests get the summary lines only).
pub fn bar(len: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let template =
        format!("{{elapsed_precise}} [{{wide_bar}}] {{pos}}/{{len}} {unit} | {{msg}} | ETA {{eta}}");
    bar.set_style(
        ProgressStyle::with_template(&template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

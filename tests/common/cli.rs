//! Helpers of the tests that run the `kvlab` binary: the tiny synthetic model, the command,
//! and readers of what it writes (CSV, PNG, SVG).

use kvlab::model::synth::{cached_synthetic_dir, Preset, SynthOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The tiny synthetic model, written once per build into Cargo's test scratch folder.
pub fn tiny_model() -> PathBuf {
    let opts = SynthOptions {
        preset: Preset::Tiny,
        seed: 0,
    };
    cached_synthetic_dir(Path::new(env!("CARGO_TARGET_TMPDIR")), &opts).expect("tiny model")
}

pub fn kvlab(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_kvlab"))
        .args(args)
        .output()
        .expect("the kvlab binary runs");
    if !out.status.success() {
        eprintln!(
            "stderr of kvlab {args:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A minimal RFC 4180 reader: fields separated by commas, quoted when they hold commas,
/// quotes or line breaks.
pub fn read_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if field.is_empty() => quoted = true,
            (',', false) => row.push(std::mem::take(&mut field)),
            ('\n', false) => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (c, _) => field.push(c),
        }
    }
    rows
}

pub struct Csv {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Csv {
    pub fn read(path: &Path) -> Csv {
        let mut rows = read_csv(&std::fs::read_to_string(path).unwrap());
        let header = rows.remove(0);
        Csv { header, rows }
    }

    pub fn get(&self, row: usize, column: &str) -> &str {
        let i = self
            .header
            .iter()
            .position(|h| h == column)
            .unwrap_or_else(|| panic!("no column {column}"));
        &self.rows[row][i]
    }

    pub fn num(&self, row: usize, column: &str) -> f64 {
        self.get(row, column)
            .parse()
            .unwrap_or_else(|_| panic!("{column} of row {row} is not a number"))
    }
}

pub fn check_png(path: &Path) {
    let image = image::open(path)
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()))
        .to_rgb8();
    assert!(image.width() >= 600 && image.height() >= 300);
    let colored = image
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0;
            r.abs_diff(g) > 40 || g.abs_diff(b) > 40 || r.abs_diff(b) > 40
        })
        .count();
    assert!(
        colored > 500,
        "{} has almost no colored pixels",
        path.display()
    );
}

pub fn check_svg(path: &Path, must_say: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert!(
        text.contains(must_say),
        "{} lacks {must_say:?}",
        path.display()
    );
}

//! Writing float32 `.npy` arrays (`--logits-out`).

use anyhow::{Context, Result};
use npyz::WriterBuilder;
use std::path::Path;

/// Writes `rows` (all of one length) as a float32 array `[rows.len(), rows[0].len()]`.
pub fn write_f32_matrix(path: &Path, rows: &[Vec<f32>]) -> Result<()> {
    let cols = rows.first().map_or(0, |r| r.len());
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[rows.len() as u64, cols as u64])
        .writer(std::io::BufWriter::new(file))
        .begin_nd()
        .with_context(|| format!("cannot write {}", path.display()))?;
    for row in rows {
        writer
            .extend(row.iter().copied())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    writer
        .finish()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

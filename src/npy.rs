//! Float32 `.npy` arrays: written by `--logits-out`, read for the reference fixtures.

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

/// Reads a float32 `.npy` array: (shape, values in C order).
pub fn read_f32_array(path: &Path) -> Result<(Vec<u64>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{} is not a .npy file", path.display()))?;
    let shape = npy.shape().to_vec();
    let values = npy
        .into_vec::<f32>()
        .with_context(|| format!("{} does not hold float32 values", path.display()))?;
    Ok((shape, values))
}

use anyhow::{bail, Context, Result};
use clap::Args;
use kvlab::backend::cuda::BackendKind;
use kvlab::kv::map::CacheMap;
use kvlab::kv::{ChunkPool, KvDtype, KvLayout, KvPart, LayoutKind, Strategy};
use kvlab::model::config::{Config, HfConfig};
use kvlab::model::hub::resolve_model;
use kvlab::model::synth::{config_json, Preset};
use kvlab::scenario::plots::draw_cache_map;
use kvlab::scenario::report::Table;
use std::path::PathBuf;

use kvlab::kv::MIB;
/// Chunks listed one per line; longer tables show the first ones and the last.
const MAX_LISTED_CHUNKS: usize = 12;

#[derive(Args, Debug)]
pub struct CacheMapArgs {
    /// Model folder, .gguf file, installed model or hub id; only its config (config.json, or the
    /// GGUF metadata) is read. Default: the Llama-3.2-1B shape.
    #[arg(long)]
    pub model: Option<String>,
    /// The layout to show: static (one preallocated buffer) or dynamic (chunks on demand).
    #[arg(long, value_enum)]
    pub cache: Strategy,
    /// Element type of K and V [default: the backend's: f32 on the CPU, bf16 on CUDA].
    #[arg(long, value_enum)]
    pub kv_dtype: Option<KvDtype>,
    /// The backend whose KV element type is shown (nothing is allocated on it).
    #[arg(long, default_value = "auto")]
    pub backend: BackendKind,
    /// Positions written into the cache.
    #[arg(long)]
    pub tokens: usize,
    /// Positions per chunk of the dynamic cache.
    #[arg(long, default_value_t = 256)]
    pub chunk_tokens: usize,
    /// Capacity of the static cache in positions (default: --tokens).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// The picture (PNG; an SVG is written beside it). Default: cache-map-<cache>-<tokens>.png.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: CacheMapArgs) -> Result<()> {
    if args.cache == Strategy::None {
        bail!("--cache none keeps no cache between tokens; choose static or dynamic");
    }
    if args.tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    let (model_name, config) = match &args.model {
        Some(spec) => {
            let path = resolve_model(spec)?;
            (path.display().to_string(), Config::from_model_path(&path)?)
        }
        None => {
            let hf: HfConfig = serde_json::from_value(config_json(Preset::Llama32_1B))
                .context("the Llama-3.2-1B config")?;
            ("the Llama-3.2-1B shape".to_string(), Config::from_hf(&hf)?)
        }
    };
    // The pool's bookkeeping alone: the layout sizes every block, no KV memory is allocated.
    let (backend, _) = args.backend.resolve();
    let dtype = args.kv_dtype.unwrap_or(match backend {
        BackendKind::Cpu => KvDtype::F32,
        _ => KvDtype::Bf16,
    });
    let kind = args.cache.layout_kind();
    let (chunk_tokens, capacity) = match kind {
        LayoutKind::Contiguous => (1, args.max_context.unwrap_or(args.tokens)),
        LayoutKind::Chunked => (args.chunk_tokens, args.tokens),
    };
    if capacity > config.max_position_embeddings {
        bail!(
            "{capacity} positions exceed the model's max_position_embeddings {}",
            config.max_position_embeddings
        );
    }
    let layout = KvLayout::new(
        kind,
        dtype,
        config.num_layers,
        config.num_kv_heads,
        config.head_dim,
        chunk_tokens,
    )?;
    let mut pool = ChunkPool::new(layout, capacity.div_ceil(chunk_tokens), false)?;
    let seq = pool.new_sequence(Some(capacity))?;
    pool.reserve(seq, args.tokens)?;
    pool.commit(seq, &vec![0; args.tokens])?;
    let map = CacheMap::of(&pool, seq, args.cache)?;

    let stats = map.seq;
    let unwritten = map.unwritten_bytes();
    println!(
        "{} KV cache of {model_name} ({} layers, {} KV heads x head_dim {}, {dtype} entries as \
         the {backend} backend stores them) after {} tokens",
        args.cache, layout.num_layers, layout.num_kv_heads, layout.head_dim, args.tokens
    );
    match kind {
        LayoutKind::Contiguous => println!(
            "one contiguous run of {} positions = {:.2} MiB, reserved up front",
            map.block_tokens,
            map.block_bytes() as f64 / MIB
        ),
        LayoutKind::Chunked => println!(
            "{} chunk(s) of {} positions = {:.2} MiB each, taken on demand; allocations: {}",
            stats.chunks,
            layout.chunk_tokens,
            map.block_bytes() as f64 / MIB,
            map.pool.allocations
        ),
    }
    println!(
        "reserved {:.2} MiB | live {:.2} MiB | reserved but unwritten {:.2} MiB ({:.1}%)",
        stats.reserved_bytes as f64 / MIB,
        stats.live_bytes as f64 / MIB,
        unwritten as f64 / MIB,
        100.0 * unwritten as f64 / stats.reserved_bytes.max(1) as f64
    );
    println!(
        "\nPer layer. Each block (a chunk, or the whole run) holds every layer, ordered \
         [layer][K, V][KV head][slot][head_dim], so a row block's unwritten tail sits inside the \
         block, before the next row block{}:",
        if dtype.is_quantized() {
            let scales = |part| 4 * dtype.scales_per_row(part, layout.head_dim());
            format!(
                "; after the codes, the rows' f32 scales, ordered [layer][K, V][KV head][slot] \
                 (a row: {} bytes of codes, then {} bytes of scales for a key row, {} for a value \
                 row)",
                layout.row_code_bytes(),
                scales(KvPart::Key),
                scales(KvPart::Value)
            )
        } else {
            String::new()
        }
    );
    let mut layers = Table::new(&[
        "layer",
        "K at (MiB into block)",
        "V at",
        "reserved MiB",
        "live MiB",
        "unwritten MiB",
    ]);
    for l in map.layers() {
        layers.rows.push(vec![
            l.layer.to_string(),
            format!("{:.3}", l.key_offset_bytes as f64 / MIB),
            format!("{:.3}", l.value_offset_bytes as f64 / MIB),
            format!("{:.3}", l.reserved_bytes as f64 / MIB),
            format!("{:.3}", l.written_bytes as f64 / MIB),
            format!("{:.3}", (l.reserved_bytes - l.written_bytes) as f64 / MIB),
        ]);
    }
    print!("{}", layers.to_text());

    println!("\nBlocks (table order; the arena chunk each starts at):");
    let mut chunks = Table::new(&[
        "block",
        "arena chunk",
        "positions",
        "written slots",
        "reserved MiB",
        "live MiB",
        "unwritten MiB",
    ]);
    let all = map.chunks();
    let listed: Vec<_> = if all.len() > MAX_LISTED_CHUNKS {
        all[..MAX_LISTED_CHUNKS - 1]
            .iter()
            .chain(all.last())
            .collect()
    } else {
        all.iter().collect()
    };
    for (i, c) in listed.iter().enumerate() {
        if i == MAX_LISTED_CHUNKS - 1 && all.len() > MAX_LISTED_CHUNKS {
            let hidden = all.len() - MAX_LISTED_CHUNKS;
            chunks
                .rows
                .push(vec![format!("... {hidden} more full chunks")]);
        }
        let live: u64 = map.blocks(c).iter().map(|b| b.written_bytes).sum();
        chunks.rows.push(vec![
            c.index.to_string(),
            c.chunk.to_string(),
            format!(
                "{}-{}",
                c.first_position,
                c.first_position + map.block_tokens - 1
            ),
            c.written_slots.to_string(),
            format!("{:.3}", map.block_bytes() as f64 / MIB),
            format!("{:.3}", live as f64 / MIB),
            format!("{:.3}", (map.block_bytes() - live) as f64 / MIB),
        ]);
    }
    print!("{}", chunks.to_text());

    let png = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("cache-map-{}-{}.png", args.cache, args.tokens)));
    let title = format!(
        "{} cache after {} tokens ({dtype}): {:.2} MiB live of {:.2} MiB reserved, {} allocation(s)",
        args.cache,
        args.tokens,
        stats.live_bytes as f64 / MIB,
        stats.reserved_bytes as f64 / MIB,
        map.pool.allocations
    );
    let [png, svg] = draw_cache_map(&map, &title, &png.with_extension(""))?;
    println!("\nWrote {} and {}", png.display(), svg.display());
    Ok(())
}

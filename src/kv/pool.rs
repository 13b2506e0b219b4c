//! The chunk pool: which chunk of the arena holds what, for every sequence at once.
//!
//! The arena is `chunks` chunks of [`KvLayout::chunk_bytes`] each; the backend owns its memory.
//! A chunk is free, held by one or more sequences (its reference count), or cached but idle: no
//! sequence holds it, but the prefix index still finds it by content, until a new chunk is
//! needed and none is free, when the least recently idled one is evicted.
//!
//! A chunked sequence's block table lists its chunks; a contiguous sequence holds one run of
//! consecutive chunks, reserved for its whole capacity when it is created. Writing a position
//! into a chunk that another sequence also holds, or that the index lists (indexed content never
//! changes), first moves the writer to a copy of it (copy-on-write, [`ChunkCopy`]).
//!
//! A sequence under an eviction policy ([`EvictionPolicy`]) keeps a *slot map* once it has
//! evicted a position: slot `s` of its blocks (chunk `s / chunk_tokens` of its table, or slot `s`
//! of its run) holds the position `slot_pos[s]`, or nothing ([`EMPTY_SLOT`]). Until its first
//! eviction slot `s` holds position `s`, as for every other sequence. A step's new rows take the
//! lowest freed slots first, then new slots after the last one, so a sequence spans at most its
//! policy's kept positions plus one step's rows; a chunk whose slots are all freed returns to
//! the pool (its entry leaves the block table and the slots after it move down by a chunk), and
//! freed slots at the end are dropped. Such a sequence shares no chunk: it is not forked, its
//! chunks are not indexed and it takes none from the index, so it alone writes its chunks.

use super::prefix::{chain_key, ChainKey, PrefixIndex, ROOT};
use super::{EvictionPolicy, KvLayout, LayoutKind, SeqStep, StepView, EMPTY_SLOT};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::MIB;

/// A sequence of the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(u32);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sequence {}", self.0)
    }
}

/// The pool has too few free (or idle, evictable) chunks for a reservation: an error a
/// scheduler can act on (free some and retry), unlike a request the pool can never serve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PoolExhausted {
    /// Chunks the reservation lacked.
    pub missing_chunks: usize,
    message: String,
}

/// Copy chunk `src` to chunk `dst` (whole chunks) before the step that writes `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkCopy {
    pub src: u32,
    pub dst: u32,
}

/// What a lookup in the prefix index found for a new sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixMatch {
    /// Leading tokens whose K/V the sequence now shares.
    pub reused: usize,
    /// Tokens after those that a cached chunk also starts with, but which end inside a chunk:
    /// a finer chunk would have reused them.
    pub missed_granularity: usize,
    /// Tokens of whole chunks that were cached and evicted to make room.
    pub missed_evicted: usize,
}

/// The pool's memory, in bytes, at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    /// The whole arena.
    pub capacity_bytes: u64,
    /// Chunks held by at least one sequence.
    pub reserved_bytes: u64,
    /// Written positions of those chunks, each chunk counted once however many hold it.
    pub live_bytes: u64,
    /// Chunks held by two sequences or more (counted once in `reserved_bytes`).
    pub shared_bytes: u64,
    /// Chunks no sequence holds that the prefix index keeps for later reuse.
    pub cached_idle_bytes: u64,
    /// Largest `reserved_bytes` so far.
    pub peak_reserved_bytes: u64,
    /// Chunks (or contiguous runs) handed to sequences so far.
    pub allocations: u64,
    /// Cached chunks evicted to make room.
    pub evictions: u64,
    /// Copy-on-write copies made.
    pub copies: u64,
    /// Positions that sequences' eviction policies have let go of so far.
    pub evicted_tokens: u64,
    pub sequences: u64,
}

/// One sequence's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqStats {
    /// Positions written.
    pub tokens: u64,
    /// Of those, positions its eviction policy let go of (the rest are live).
    pub evicted_tokens: u64,
    /// Chunks in its block table (contiguous: in its run).
    pub chunks: u64,
    pub reserved_bytes: u64,
    pub live_bytes: u64,
    /// Of `reserved_bytes`, chunks another sequence holds too.
    pub shared_bytes: u64,
}

#[derive(Clone, Debug)]
struct Sequence {
    /// Chunked: its chunks in slot order. Contiguous: the first chunk of its run.
    table: Vec<u32>,
    /// Contiguous: chunks in its run; chunked: 0.
    run_chunks: usize,
    /// The token id at each written position (evicted ones included).
    tokens: Vec<u32>,
    /// Chain keys of its full chunks (chunked), one per leading entry of `table`.
    keys: Vec<ChainKey>,
    /// Rows reserved by [`ChunkPool::reserve`] for the step in progress.
    pending: usize,
    policy: EvictionPolicy,
    /// Once it has evicted a position: the position each slot holds ([`EMPTY_SLOT`]: none).
    /// Before that, slot `s` holds position `s`.
    slot_pos: Option<Vec<u32>>,
    /// The slots of the reserved rows, when it has a slot map.
    pending_slots: Vec<u32>,
    /// H2O: the attention mass each slot's position has received since it was written.
    mass: Vec<f32>,
}

impl Sequence {
    fn new(table: Vec<u32>, run_chunks: usize) -> Self {
        Sequence {
            table,
            run_chunks,
            tokens: Vec::new(),
            keys: Vec::new(),
            pending: 0,
            policy: EvictionPolicy::Full,
            slot_pos: None,
            pending_slots: Vec::new(),
            mass: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Slots it spans: `len()` until it evicts, then its slot map's length.
    fn slots(&self) -> usize {
        self.slot_pos.as_ref().map_or(self.len(), Vec::len)
    }

    /// Positions it holds.
    fn live(&self) -> usize {
        self.slot_pos.as_ref().map_or(self.len(), |map| {
            map.iter().filter(|&&p| p != EMPTY_SLOT).count()
        })
    }
}

/// The chunks of one arena, and every sequence that holds some.
pub struct ChunkPool {
    layout: KvLayout,
    /// Sequences holding each chunk.
    refs: Vec<u32>,
    /// Written slots of each chunk.
    filled: Vec<u32>,
    /// Free chunks as ranges: first chunk -> count.
    free: BTreeMap<u32, u32>,
    /// Cached idle chunks by the time they became idle (oldest first), and each one's time.
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<Option<u64>>,
    clock: u64,
    index: PrefixIndex,
    prefix_caching: bool,
    seqs: Vec<Option<Sequence>>,
    // Running totals, kept as chunks change state.
    held_chunks: usize,
    shared_chunks: usize,
    live_slots: usize,
    peak_held_chunks: usize,
    allocations: u64,
    evictions: u64,
    copies: u64,
    evicted_tokens: u64,
}

impl ChunkPool {
    /// A pool of `chunks` chunks of `layout`. With `prefix_caching` (chunked layout only), full
    /// chunks are registered in the prefix index and kept when released.
    pub fn new(layout: KvLayout, chunks: usize, prefix_caching: bool) -> Result<Self> {
        ensure!(chunks > 0, "a KV pool needs at least one chunk");
        let count = u32::try_from(chunks)
            .ok()
            .filter(|&c| c < u32::MAX)
            .with_context(|| format!("a KV pool of {chunks} chunks is too large"))?;
        ensure!(
            !prefix_caching || layout.kind() == LayoutKind::Chunked,
            "prefix caching shares chunks between sequences: it needs the chunked layout"
        );
        Ok(ChunkPool {
            layout,
            refs: vec![0; chunks],
            filled: vec![0; chunks],
            free: BTreeMap::from([(0, count)]),
            idle: BTreeMap::new(),
            idle_since: vec![None; chunks],
            clock: 0,
            index: PrefixIndex::default(),
            prefix_caching,
            seqs: Vec::new(),
            held_chunks: 0,
            shared_chunks: 0,
            live_slots: 0,
            peak_held_chunks: 0,
            allocations: 0,
            evictions: 0,
            copies: 0,
            evicted_tokens: 0,
        })
    }

    /// Chunks that fit `budget_bytes` of `layout`.
    pub fn chunks_for_budget(layout: &KvLayout, budget_bytes: u64) -> usize {
        (budget_bytes / layout.chunk_bytes().max(1) as u64) as usize
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn num_chunks(&self) -> usize {
        self.refs.len()
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    fn budget_text(&self) -> String {
        format!(
            "{} chunks of {} positions, {:.2} MiB",
            self.num_chunks(),
            self.layout.chunk_tokens,
            (self.num_chunks() * self.layout.chunk_bytes()) as f64 / MIB
        )
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .with_context(|| format!("{id} is not in the KV pool"))
    }

    fn seq_mut(&mut self, id: SeqId) -> Result<&mut Sequence> {
        self.seqs
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .with_context(|| format!("{id} is not in the KV pool"))
    }

    fn insert_seq(&mut self, seq: Sequence) -> SeqId {
        match self.seqs.iter().position(Option::is_none) {
            Some(slot) => {
                self.seqs[slot] = Some(seq);
                SeqId(slot as u32)
            }
            None => {
                self.seqs.push(Some(seq));
                SeqId(self.seqs.len() as u32 - 1)
            }
        }
    }

    // --- chunk states -------------------------------------------------------------------------

    fn add_ref(&mut self, chunk: u32) {
        let c = chunk as usize;
        match self.refs[c] {
            0 => {
                if let Some(since) = self.idle_since[c].take() {
                    self.idle.remove(&since);
                }
                self.held_chunks += 1;
                self.peak_held_chunks = self.peak_held_chunks.max(self.held_chunks);
                self.live_slots += self.filled[c] as usize;
            }
            1 => self.shared_chunks += 1,
            _ => {}
        }
        self.refs[c] += 1;
    }

    fn drop_ref(&mut self, chunk: u32) {
        let c = chunk as usize;
        self.refs[c] -= 1;
        match self.refs[c] {
            0 => {
                self.held_chunks -= 1;
                self.live_slots -= self.filled[c] as usize;
                if self.index.contains(chunk) {
                    self.clock += 1;
                    self.idle.insert(self.clock, chunk);
                    self.idle_since[c] = Some(self.clock);
                } else {
                    self.filled[c] = 0;
                    self.free_range(chunk, 1);
                }
            }
            1 => self.shared_chunks -= 1,
            _ => {}
        }
    }

    /// Sets the written slots of a chunk held by a sequence.
    fn set_filled(&mut self, chunk: u32, slots: usize) {
        let c = chunk as usize;
        self.live_slots = self.live_slots - self.filled[c] as usize + slots;
        self.filled[c] = slots as u32;
    }

    fn free_range(&mut self, start: u32, count: u32) {
        let (mut start, mut count) = (start, count);
        if let Some((&before, &n)) = self.free.range(..start).next_back() {
            if before + n == start {
                self.free.remove(&before);
                start = before;
                count += n;
            }
        }
        if let Some(&n) = self.free.get(&(start + count)) {
            self.free.remove(&(start + count));
            count += n;
        }
        self.free.insert(start, count);
    }

    /// Takes `count` consecutive free chunks (the first run that fits).
    fn take_run(&mut self, count: u32) -> Option<u32> {
        let (&start, &n) = self.free.iter().find(|(_, &n)| n >= count)?;
        self.free.remove(&start);
        if n > count {
            self.free.insert(start + count, n - count);
        }
        Some(start)
    }

    /// A chunk for a new position: a free one (lowest first, so that the memory in use stays
    /// compact), else the least recently idled cached one, evicted.
    fn take_chunk(&mut self) -> Option<u32> {
        if let Some(chunk) = self.take_run(1) {
            return Some(chunk);
        }
        let (_, chunk) = self.idle.pop_first()?;
        self.idle_since[chunk as usize] = None;
        self.index.evict(chunk);
        self.filled[chunk as usize] = 0;
        self.evictions += 1;
        Some(chunk)
    }

    fn free_chunks(&self) -> usize {
        self.free.values().map(|&n| n as usize).sum()
    }

    /// Chunks a reservation can take now: the free ones and the cached idle ones (evicted when
    /// taken).
    pub fn available_chunks(&self) -> usize {
        self.free_chunks() + self.idle.len()
    }

    // --- sequences ----------------------------------------------------------------------------

    /// A new, empty sequence. Contiguous layout: its run of `capacity` positions (rounded up to
    /// whole chunks) is reserved now; chunked layout: `capacity` is ignored.
    pub fn new_sequence(&mut self, capacity: Option<usize>) -> Result<SeqId> {
        let (table, run_chunks) = match self.layout.kind() {
            LayoutKind::Chunked => (Vec::new(), 0),
            LayoutKind::Contiguous => {
                let positions = capacity.filter(|&c| c > 0).context(
                    "a contiguous (static) sequence needs a capacity of at least one position",
                )?;
                let run = positions.div_ceil(self.layout.chunk_tokens());
                let start = u32::try_from(run)
                    .ok()
                    .and_then(|run| self.take_run(run))
                    .ok_or_else(|| PoolExhausted {
                        missing_chunks: run.saturating_sub(self.free_chunks()).max(1),
                        message: format!(
                            "the KV pool has no free contiguous run of {positions} positions \
                             ({:.2} MiB): {} of its {} are free (budget: {}; raise --kv-budget \
                             or lower --max-context)",
                            (run * self.layout.chunk_bytes()) as f64 / MIB,
                            self.free_chunks(),
                            self.num_chunks(),
                            self.budget_text()
                        ),
                    })?;
                for chunk in start..start + run as u32 {
                    self.add_ref(chunk);
                }
                self.allocations += 1;
                (vec![start], run)
            }
        };
        Ok(self.insert_seq(Sequence::new(table, run_chunks)))
    }

    /// Puts an empty sequence under an eviction policy. A contiguous run must hold the policy's
    /// kept positions and the one a decode step adds.
    pub fn set_policy(&mut self, id: SeqId, policy: EvictionPolicy) -> Result<()> {
        let capacity = self.seq_capacity(id)?;
        let seq = self.seq(id)?;
        ensure!(
            seq.len() == 0 && seq.pending == 0,
            "{id} already holds positions: a policy is set on an empty sequence"
        );
        if let (Some(capacity), Some(kept)) = (capacity, policy.kept_tokens()) {
            ensure!(
                kept < capacity,
                "--kv-policy {policy} keeps {kept} positions, but this static sequence holds \
                 {capacity}: it needs at least {} (the kept positions and the next token's; \
                 raise --max-context)",
                kept + 1
            );
        }
        self.seq_mut(id)?.policy = policy;
        Ok(())
    }

    /// A new sequence holding every chunk of `id` (chunked layout): the two share its positions
    /// and part ways by copy-on-write.
    pub fn fork(&mut self, id: SeqId) -> Result<SeqId> {
        ensure!(
            self.layout.kind() == LayoutKind::Chunked,
            "a contiguous run has one holder: {id} cannot be forked"
        );
        ensure!(
            self.seq(id)?.policy == EvictionPolicy::Full,
            "{id} evicts positions (--kv-policy {}): it shares no chunk and cannot be forked",
            self.seq(id)?.policy
        );
        let mut seq = self.seq(id)?.clone();
        seq.pending = 0;
        for &chunk in &seq.table {
            self.add_ref(chunk);
        }
        Ok(self.insert_seq(seq))
    }

    /// Lets go of a sequence's chunks: full indexed ones stay cached (idle), the others are free.
    pub fn release(&mut self, id: SeqId) -> Result<()> {
        let seq = self.seq(id)?.clone();
        self.seqs[id.0 as usize] = None;
        if seq.run_chunks > 0 {
            let start = seq.table[0];
            for chunk in start..start + seq.run_chunks as u32 {
                let c = chunk as usize;
                self.refs[c] -= 1;
                self.held_chunks -= 1;
                self.live_slots -= self.filled[c] as usize;
                self.filled[c] = 0;
            }
            self.free_range(start, seq.run_chunks as u32);
        } else {
            for &chunk in &seq.table {
                self.drop_ref(chunk);
            }
        }
        Ok(())
    }

    /// Shares the cached chunks that the prefix index finds for `tokens` with the empty sequence
    /// `id`, and keeps at most `limit` of their positions (a step must compute at least the last
    /// prompt token, whose logits choose the next one). Without prefix caching it finds nothing.
    pub fn match_prefix(&mut self, id: SeqId, tokens: &[u32], limit: usize) -> Result<PrefixMatch> {
        ensure!(
            self.seq(id)?.len() == 0,
            "{id} already holds positions: prefix matching starts a sequence"
        );
        let mut found = PrefixMatch::default();
        // A sequence that evicts shares no chunk (see the module's doc).
        if !self.prefix_caching || self.seq(id)?.policy != EvictionPolicy::Full {
            return Ok(found);
        }
        let chunk_tokens = self.layout.chunk_tokens();
        let mut parent = ROOT;
        let mut chunks = Vec::new();
        let mut keys = Vec::new();
        let mut blocks = tokens.chunks(chunk_tokens);
        while let Some(block) = blocks.next() {
            let key = chain_key(parent, block);
            let hit = (block.len() == chunk_tokens)
                .then(|| self.index.lookup(key, block))
                .flatten();
            match hit {
                Some(chunk) => {
                    chunks.push(chunk);
                    keys.push(key);
                    parent = key;
                }
                None => {
                    if block.len() == chunk_tokens && self.index.was_evicted(key) {
                        // Count this chunk and the evicted ones that followed it.
                        found.missed_evicted += chunk_tokens;
                        let mut chain = key;
                        for next in blocks.by_ref().take_while(|b| b.len() == chunk_tokens) {
                            chain = chain_key(chain, next);
                            if !self.index.was_evicted(chain) {
                                break;
                            }
                            found.missed_evicted += chunk_tokens;
                        }
                    } else {
                        found.missed_granularity = self.index.longest_partial(parent, block);
                    }
                    break;
                }
            }
        }
        for &chunk in &chunks {
            self.add_ref(chunk);
        }
        let reused = (chunks.len() * chunk_tokens).min(limit);
        let full = reused / chunk_tokens;
        let seq = self.seq_mut(id)?;
        seq.table = chunks;
        seq.keys = keys;
        seq.keys.truncate(full);
        seq.tokens = tokens[..reused].to_vec();
        // Chunks past the kept positions (a limit inside the matched ones) are let go.
        let kept = reused.div_ceil(chunk_tokens);
        let dropped: Vec<u32> = seq.table.drain(kept..).collect();
        for chunk in dropped {
            self.drop_ref(chunk);
        }
        found.reused = reused;
        Ok(found)
    }

    /// Keeps the first `len` positions of a sequence and lets go of chunks past them.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<()> {
        let chunk_tokens = self.layout.chunk_tokens();
        let seq = self.seq_mut(id)?;
        ensure!(
            len <= seq.len(),
            "{id} holds {} positions; it cannot be truncated to {len}",
            seq.len()
        );
        let old_len = seq.len();
        seq.tokens.truncate(len);
        seq.keys.truncate(len / chunk_tokens);
        seq.pending = 0;
        seq.pending_slots.clear();
        if let Some(map) = &seq.slot_pos {
            let dropped: Vec<usize> = (0..map.len())
                .filter(|&slot| map[slot] != EMPTY_SLOT && map[slot] as usize >= len)
                .collect();
            self.free_slots(id, &dropped)?;
            return Ok(());
        }
        seq.mass.truncate(len);
        if seq.run_chunks > 0 {
            let start = seq.table[0] as usize;
            let first = start + len.div_ceil(chunk_tokens);
            let last = start + old_len.div_ceil(chunk_tokens);
            let partial =
                (!len.is_multiple_of(chunk_tokens)).then(|| (start + len / chunk_tokens) as u32);
            for chunk in first..last {
                self.set_filled(chunk as u32, 0);
            }
            if let Some(chunk) = partial {
                self.set_filled(chunk, len % chunk_tokens);
            }
            return Ok(());
        }
        let dropped: Vec<u32> = seq.table.drain(len.div_ceil(chunk_tokens)..).collect();
        let last = (!len.is_multiple_of(chunk_tokens)).then(|| seq.table[len / chunk_tokens]);
        for chunk in dropped {
            self.drop_ref(chunk);
        }
        // The tail chunk, if this sequence alone holds it, now holds fewer written slots.
        if let Some(chunk) = last {
            if self.refs[chunk as usize] == 1 && !self.index.contains(chunk) {
                self.set_filled(chunk, len % chunk_tokens);
            }
        }
        Ok(())
    }

    /// Makes positions `len..len + rows` of a sequence writable: new chunks for a chunked one
    /// (evicting cached idle chunks when none is free), a private copy of a chunk it shares and
    /// is about to write into. Returns the copies to make before the step. A contiguous sequence
    /// must already have the room.
    pub fn reserve(&mut self, id: SeqId, rows: usize) -> Result<Vec<ChunkCopy>> {
        let chunk_tokens = self.layout.chunk_tokens();
        let seq = self.seq(id)?;
        if seq.slot_pos.is_some() {
            return self.reserve_slots(id, rows).map(|()| Vec::new());
        }
        let (len, run_chunks) = (seq.len(), seq.run_chunks);
        if run_chunks > 0 {
            let capacity = run_chunks * chunk_tokens;
            ensure!(
                len + rows <= capacity,
                "context overflow: {} positions requested, but this static sequence holds {capacity} \
                 (raise --max-context)",
                len + rows
            );
            self.seq_mut(id)?.pending = rows;
            return Ok(Vec::new());
        }
        // A chunk it holds but may not write (shared, or indexed: indexed content never changes,
        // another sequence may look it up later) is copied before the step writes into it.
        let copy_from = (len % chunk_tokens > 0)
            .then(|| (len / chunk_tokens, seq.table[len / chunk_tokens]))
            .filter(|&(_, c)| self.refs[c as usize] > 1 || self.index.contains(c));
        let new_chunks = (len + rows).div_ceil(chunk_tokens) - seq.table.len();
        let wanted = new_chunks + usize::from(copy_from.is_some());
        let available = self.available_chunks();
        if wanted > available {
            return Err(self.exhausted(id, wanted - available).into());
        }
        let mut copies = Vec::new();
        if let Some((at, chunk)) = copy_from {
            let copy = self.take_chunk().expect("counted as available");
            self.add_ref(copy);
            self.set_filled(copy, len % chunk_tokens);
            self.drop_ref(chunk);
            self.seq_mut(id)?.table[at] = copy;
            copies.push(ChunkCopy {
                src: chunk,
                dst: copy,
            });
            self.copies += 1;
        }
        let mut taken = Vec::with_capacity(new_chunks);
        for _ in 0..new_chunks {
            let chunk = self.take_chunk().expect("counted as available");
            self.add_ref(chunk);
            taken.push(chunk);
        }
        self.allocations += new_chunks as u64;
        let seq = self.seq_mut(id)?;
        seq.table.extend(taken);
        seq.pending = rows;
        Ok(copies)
    }

    fn exhausted(&self, id: SeqId, missing: usize) -> PoolExhausted {
        PoolExhausted {
            missing_chunks: missing,
            message: format!(
                "the KV pool is exhausted: {id} needs {missing} more chunk(s) of {} positions \
                 ({:.2} MiB), but every chunk is held by a sequence ({} sequences hold {:.2} \
                 MiB; budget: {}); raise --kv-budget",
                self.layout.chunk_tokens,
                (missing * self.layout.chunk_bytes()) as f64 / MIB,
                self.seqs.iter().flatten().count(),
                (self.held_chunks * self.layout.chunk_bytes()) as f64 / MIB,
                self.budget_text()
            ),
        }
    }

    /// The step's rows are written: `tokens` (as many as reserved) become the sequence's next
    /// positions, and chunks they fill join the prefix index.
    pub fn commit(&mut self, id: SeqId, tokens: &[u32]) -> Result<()> {
        let chunk_tokens = self.layout.chunk_tokens();
        let seq = self.seq(id)?;
        ensure!(
            tokens.len() == seq.pending,
            "{id}: {} tokens committed for a step of {} reserved rows",
            tokens.len(),
            seq.pending
        );
        if seq.slot_pos.is_some() {
            return self.commit_slots(id, tokens);
        }
        let (start, end) = (seq.len(), seq.len() + tokens.len());
        let (first, run) = (seq.table.first().copied(), seq.run_chunks > 0);
        let mut touched = Vec::new();
        let mut pos = start;
        while pos < end {
            let (entry, slot) = (pos / chunk_tokens, pos % chunk_tokens);
            let chunk = if run {
                first.expect("a run has a first chunk") + entry as u32
            } else {
                seq.table[entry]
            };
            let upto = (slot + end - pos).min(chunk_tokens);
            touched.push((chunk, upto));
            pos += upto - slot;
        }
        for (chunk, upto) in touched {
            let slots = self.filled[chunk as usize].max(upto as u32);
            self.set_filled(chunk, slots as usize);
        }
        let prefix_caching = self.prefix_caching;
        let seq = self.seq_mut(id)?;
        seq.tokens.extend_from_slice(tokens);
        seq.pending = 0;
        if seq.policy.needs_attention_mass() {
            seq.mass.resize(seq.len(), 0.0);
        }
        // A sequence that evicts registers nothing (see the module's doc).
        if run || seq.policy != EvictionPolicy::Full {
            return Ok(());
        }
        let mut registrations = Vec::new();
        while seq.keys.len() < seq.len() / chunk_tokens {
            let i = seq.keys.len();
            let parent = seq.keys.last().copied().unwrap_or(ROOT);
            let block = &seq.tokens[i * chunk_tokens..(i + 1) * chunk_tokens];
            seq.keys.push(chain_key(parent, block));
            if prefix_caching {
                registrations.push((seq.table[i], parent, block.to_vec()));
            }
        }
        for (chunk, parent, block) in registrations {
            // Another chunk may already hold this content; then this one stays private.
            self.index.insert(chunk, parent, &block);
        }
        Ok(())
    }

    /// The first `tokens.len()` of the rows reserved for a sequence were written and are kept
    /// (a run of decode steps that stopped at a stop token): they are committed as [`commit`]
    /// does, and the room reserved past them is let go.
    ///
    /// [`commit`]: ChunkPool::commit
    pub fn commit_first(&mut self, id: SeqId, tokens: &[u32]) -> Result<()> {
        let seq = self.seq_mut(id)?;
        ensure!(
            tokens.len() <= seq.pending,
            "{id}: {} tokens committed of {} reserved rows",
            tokens.len(),
            seq.pending
        );
        seq.pending = tokens.len();
        self.commit(id, tokens)?;
        let len = self.seq_len(id)?;
        self.truncate(id, len)
    }

    /// The step view of `steps` (sequence, rows), each reserved for exactly those rows; the
    /// sequences' rows follow one another in this order.
    pub fn step_view(&self, steps: &[(SeqId, usize)]) -> Result<StepView> {
        for &(id, rows) in steps {
            let pending = self.seq(id)?.pending;
            ensure!(
                rows > 0 && rows == pending,
                "{id}: a step of {rows} rows, but {pending} were reserved"
            );
        }
        self.view_of(steps)
    }

    /// The view of a run of decode steps of `ids`: one row each, at the first of the positions
    /// reserved for it, with the block table of all of them, so that the view advanced step by
    /// step ([`StepView::advance`]) finds every chunk the run writes.
    pub fn decode_view(&self, ids: &[SeqId]) -> Result<StepView> {
        for &id in ids {
            let seq = self.seq(id)?;
            ensure!(
                seq.pending > 0,
                "{id}: a run of decode steps needs reserved positions"
            );
            // Its policy decides after every step which slot the next one writes.
            ensure!(
                seq.policy == EvictionPolicy::Full,
                "{id}: a run of decode steps for a sequence under --kv-policy {}: it steps one \
                 token at a time",
                seq.policy
            );
        }
        let steps: Vec<(SeqId, usize)> = ids.iter().map(|&id| (id, 1)).collect();
        self.view_of(&steps)
    }

    fn view_of(&self, steps: &[(SeqId, usize)]) -> Result<StepView> {
        let mut view = StepView {
            layout: self.layout,
            seqs: Vec::with_capacity(steps.len()),
            row_seq: Vec::new(),
            row_pos: Vec::new(),
            row_slot: Vec::new(),
            block_table: Vec::new(),
            slot_positions: Vec::with_capacity(steps.len()),
            track_mass: Vec::with_capacity(steps.len()),
        };
        for (index, &(id, rows)) in steps.iter().enumerate() {
            let seq = self.seq(id)?;
            let block_tokens = match seq.run_chunks {
                0 => self.layout.chunk_tokens(),
                run => run * self.layout.chunk_tokens(),
            };
            let start = seq.len();
            view.seqs.push(SeqStep {
                first_row: view.row_pos.len() as u32,
                rows: rows as u32,
                start: start as u32,
                table_start: view.block_table.len() as u32,
                block_tokens: block_tokens as u32,
            });
            view.block_table.extend_from_slice(&seq.table);
            view.row_seq.extend(std::iter::repeat_n(index as u32, rows));
            view.row_pos.extend((start..start + rows).map(|p| p as u32));
            match &seq.slot_pos {
                None => {
                    view.row_slot
                        .extend((start..start + rows).map(|p| p as u32));
                    view.slot_positions.push(None);
                }
                Some(map) => {
                    // The step's rows are visible to attention at their slots.
                    let mut map = map.clone();
                    for (r, &slot) in seq.pending_slots.iter().enumerate() {
                        let slot = slot as usize;
                        if slot >= map.len() {
                            map.resize(slot + 1, EMPTY_SLOT);
                        }
                        map[slot] = (start + r) as u32;
                    }
                    view.row_slot.extend_from_slice(&seq.pending_slots);
                    view.slot_positions.push(Some(map));
                }
            }
            view.track_mass.push(seq.policy.needs_attention_mass());
        }
        Ok(view)
    }

    // --- eviction ------------------------------------------------------------------------------

    /// The chunk holding slot `slot` of a sequence.
    fn slot_chunk(&self, seq: &Sequence, slot: usize) -> u32 {
        let entry = slot / self.layout.chunk_tokens();
        if seq.run_chunks > 0 {
            seq.table[0] + entry as u32
        } else {
            seq.table[entry]
        }
    }

    /// [`ChunkPool::reserve`] for a sequence with a slot map: the lowest freed slots, then new
    /// slots after the last (new chunks for a chunked sequence).
    fn reserve_slots(&mut self, id: SeqId, rows: usize) -> Result<()> {
        let chunk_tokens = self.layout.chunk_tokens();
        let seq = self.seq(id)?;
        let map = seq
            .slot_pos
            .as_ref()
            .context("a sequence with a slot map")?;
        let mut slots: Vec<u32> = (0..map.len() as u32)
            .filter(|&s| map[s as usize] == EMPTY_SLOT)
            .take(rows)
            .collect();
        let spanned = map.len() + rows - slots.len();
        slots.extend(map.len() as u32..spanned as u32);
        if seq.run_chunks > 0 {
            let capacity = seq.run_chunks * chunk_tokens;
            ensure!(
                spanned <= capacity,
                "context overflow: {id} keeps {} positions and this step adds {rows}, but its \
                 static run holds {capacity} (raise --max-context)",
                seq.live()
            );
        } else {
            let new_chunks = spanned
                .div_ceil(chunk_tokens)
                .saturating_sub(seq.table.len());
            let available = self.free_chunks() + self.idle.len();
            if new_chunks > available {
                bail!(self.exhausted(id, new_chunks - available));
            }
            let taken: Vec<u32> = (0..new_chunks)
                .map(|_| self.take_chunk().expect("counted as available"))
                .collect();
            for &chunk in &taken {
                self.add_ref(chunk);
            }
            self.allocations += new_chunks as u64;
            self.seq_mut(id)?.table.extend(taken);
        }
        let seq = self.seq_mut(id)?;
        seq.pending = rows;
        seq.pending_slots = slots;
        Ok(())
    }

    /// [`ChunkPool::commit`] for a sequence with a slot map.
    fn commit_slots(&mut self, id: SeqId, tokens: &[u32]) -> Result<()> {
        let seq = self.seq_mut(id)?;
        let start = seq.len();
        let slots = std::mem::take(&mut seq.pending_slots);
        let map = seq
            .slot_pos
            .as_mut()
            .context("a sequence with a slot map")?;
        for (r, &slot) in slots.iter().enumerate() {
            let slot = slot as usize;
            if slot >= map.len() {
                map.resize(slot + 1, EMPTY_SLOT);
            }
            map[slot] = (start + r) as u32;
        }
        let spanned = map.len();
        seq.tokens.extend_from_slice(tokens);
        seq.pending = 0;
        if seq.policy.needs_attention_mass() {
            seq.mass.resize(spanned, 0.0);
            for &slot in &slots {
                seq.mass[slot as usize] = 0.0;
            }
        }
        let seq = self.seq(id)?;
        let chunks: Vec<u32> = slots
            .iter()
            .map(|&slot| self.slot_chunk(seq, slot as usize))
            .collect();
        for chunk in chunks {
            let filled = self.filled[chunk as usize] as usize;
            self.set_filled(chunk, filled + 1);
        }
        Ok(())
    }

    /// Adds the attention mass of one step to a sequence's slots (`mass`: one value per slot the
    /// step's view spans). Only an H2O sequence keeps it.
    pub fn add_attention_mass(&mut self, id: SeqId, mass: &[f32]) -> Result<()> {
        let seq = self.seq_mut(id)?;
        if !seq.policy.needs_attention_mass() {
            return Ok(());
        }
        ensure!(
            mass.len() == seq.slots(),
            "{id}: attention mass for {} slots, but it spans {}",
            mass.len(),
            seq.slots()
        );
        seq.mass.iter_mut().zip(mass).for_each(|(m, add)| *m += add);
        Ok(())
    }

    /// Evicts the positions the sequence's policy no longer names; returns how many.
    pub fn apply_policy(&mut self, id: SeqId) -> Result<usize> {
        let seq = self.seq(id)?;
        ensure!(seq.pending == 0, "{id}: a policy is applied between steps");
        let positions: Vec<u32> = match &seq.slot_pos {
            Some(map) => map.clone(),
            None => (0..seq.len() as u32).collect(),
        };
        let mut live: Vec<(u32, f32)> = positions
            .iter()
            .enumerate()
            .filter(|&(_, &p)| p != EMPTY_SLOT)
            .map(|(slot, &p)| (p, seq.mass.get(slot).copied().unwrap_or(0.0)))
            .collect();
        live.sort_by_key(|&(p, _)| p);
        let victims = seq.policy.evictions(&live);
        if victims.is_empty() {
            return Ok(0);
        }
        let victims: std::collections::HashSet<u32> = victims.into_iter().collect();
        let slots: Vec<usize> = (0..positions.len())
            .filter(|&slot| victims.contains(&positions[slot]))
            .collect();
        let seq = self.seq_mut(id)?;
        seq.slot_pos.get_or_insert(positions);
        // Its chunks are no one else's and no longer hold a prefix of positions.
        seq.keys.clear();
        self.free_slots(id, &slots)?;
        self.evicted_tokens += slots.len() as u64;
        Ok(slots.len())
    }

    /// Empties `slots` of a sequence with a slot map, drops freed slots past its last held one,
    /// and gives back the chunks (chunked layout) whose slots are all free.
    fn free_slots(&mut self, id: SeqId, slots: &[usize]) -> Result<()> {
        let chunk_tokens = self.layout.chunk_tokens();
        let seq = self.seq(id)?;
        let chunks: Vec<u32> = slots.iter().map(|&s| self.slot_chunk(seq, s)).collect();
        for chunk in chunks {
            let filled = self.filled[chunk as usize] as usize;
            self.set_filled(chunk, filled - 1);
        }
        let seq = self.seq_mut(id)?;
        let map = seq
            .slot_pos
            .as_mut()
            .context("a sequence with a slot map")?;
        for &slot in slots {
            map[slot] = EMPTY_SLOT;
        }
        while map.last() == Some(&EMPTY_SLOT) {
            map.pop();
        }
        let spanned = map.len();
        if seq.run_chunks > 0 {
            seq.mass.truncate(spanned);
            return Ok(());
        }
        // From the last entry down, so that removing one leaves the earlier ones in place.
        let mut released = Vec::new();
        for entry in (0..seq.table.len()).rev() {
            let first = entry * chunk_tokens;
            let held = map
                .get(first..spanned.min(first + chunk_tokens))
                .is_some_and(|slots| slots.iter().any(|&p| p != EMPTY_SLOT));
            if !held {
                released.push(seq.table.remove(entry));
                if first < map.len() {
                    let end = map.len().min(first + chunk_tokens);
                    map.drain(first..end);
                    if seq.mass.len() > first {
                        seq.mass.drain(first..seq.mass.len().min(end));
                    }
                }
            }
        }
        seq.mass.truncate(map.len());
        for chunk in released {
            self.drop_ref(chunk);
        }
        Ok(())
    }

    /// The position each slot of a sequence holds ([`EMPTY_SLOT`]: none), slot by slot.
    pub fn seq_slot_positions(&self, id: SeqId) -> Result<Vec<u32>> {
        let seq = self.seq(id)?;
        Ok(match &seq.slot_pos {
            Some(map) => map.clone(),
            None => (0..seq.len() as u32).collect(),
        })
    }

    /// Forgets every cached idle chunk (they become free) without counting them as evicted.
    pub fn clear_cached(&mut self) {
        while let Some((_, chunk)) = self.idle.pop_first() {
            self.idle_since[chunk as usize] = None;
            self.index.forget(chunk);
            self.filled[chunk as usize] = 0;
            self.free_range(chunk, 1);
        }
    }

    // --- what a sequence holds ----------------------------------------------------------------

    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.len())
    }

    /// The token ids at the sequence's written positions.
    pub fn seq_tokens(&self, id: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(id)?.tokens)
    }

    /// Its block table (contiguous: the first chunk of its run).
    pub fn seq_table(&self, id: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(id)?.table)
    }

    /// Positions it can hold: a contiguous run's capacity; None for a chunked sequence.
    pub fn seq_capacity(&self, id: SeqId) -> Result<Option<usize>> {
        let run = self.seq(id)?.run_chunks;
        Ok((run > 0).then(|| run * self.layout.chunk_tokens()))
    }

    pub fn seq_stats(&self, id: SeqId) -> Result<SeqStats> {
        let seq = self.seq(id)?;
        let chunk_bytes = self.layout.chunk_bytes() as u64;
        let (chunks, shared) = if seq.run_chunks > 0 {
            (seq.run_chunks as u64, 0)
        } else {
            let shared = seq
                .table
                .iter()
                .filter(|&&c| self.refs[c as usize] > 1)
                .count();
            (seq.table.len() as u64, shared as u64)
        };
        Ok(SeqStats {
            tokens: seq.len() as u64,
            evicted_tokens: (seq.len() - seq.live()) as u64,
            chunks,
            reserved_bytes: chunks * chunk_bytes,
            live_bytes: (seq.live() * self.layout.bytes_per_token()) as u64,
            shared_bytes: shared * chunk_bytes,
        })
    }

    pub fn stats(&self) -> PoolStats {
        let chunk_bytes = self.layout.chunk_bytes() as u64;
        let slot_bytes = self.layout.bytes_per_token() as u64;
        PoolStats {
            capacity_bytes: self.num_chunks() as u64 * chunk_bytes,
            reserved_bytes: self.held_chunks as u64 * chunk_bytes,
            live_bytes: self.live_slots as u64 * slot_bytes,
            shared_bytes: self.shared_chunks as u64 * chunk_bytes,
            cached_idle_bytes: self.idle.len() as u64 * chunk_bytes,
            peak_reserved_bytes: self.peak_held_chunks as u64 * chunk_bytes,
            allocations: self.allocations,
            evictions: self.evictions,
            copies: self.copies,
            evicted_tokens: self.evicted_tokens,
            sequences: self.seqs.iter().flatten().count() as u64,
        }
    }

    /// Written slots of a chunk (`kvlab cache-map`).
    pub fn chunk_filled(&self, chunk: u32) -> usize {
        self.filled[chunk as usize] as usize
    }

    /// Sequences holding a chunk.
    pub fn chunk_refs(&self, chunk: u32) -> usize {
        self.refs[chunk as usize] as usize
    }
}

#[cfg(test)]
mod tests;

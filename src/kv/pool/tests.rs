use super::*;
use crate::kv::{KvDtype, KvLayout, LayoutKind};

fn layout(kind: LayoutKind, chunk_tokens: usize) -> KvLayout {
    // 2 layers x K,V x 1 head x 4 dims x 4 bytes = 64 bytes per position.
    KvLayout::new(kind, KvDtype::F32, 2, 1, 4, chunk_tokens).unwrap()
}

/// Reserves and commits `tokens` as one step.
fn append(pool: &mut ChunkPool, id: SeqId, tokens: &[u32]) -> Result<Vec<ChunkCopy>> {
    let copies = pool.reserve(id, tokens.len())?;
    pool.commit(id, tokens)?;
    Ok(copies)
}

#[test]
fn a_contiguous_run_is_reserved_whole_and_freed_whole() {
    let mut pool = ChunkPool::new(layout(LayoutKind::Contiguous, 1), 10, false).unwrap();
    let a = pool.new_sequence(Some(6)).unwrap();
    assert_eq!(pool.seq_capacity(a).unwrap(), Some(6));
    let s = pool.stats();
    assert_eq!(
        (s.reserved_bytes, s.live_bytes, s.allocations),
        (6 * 64, 0, 1)
    );
    append(&mut pool, a, &[1, 2, 3]).unwrap();
    assert_eq!(pool.stats().live_bytes, 3 * 64);
    let overflow = pool.reserve(a, 4).unwrap_err().to_string();
    assert!(overflow.contains("7 positions requested") && overflow.contains("holds 6"));
    // 4 chunks are left: a run of 5 does not fit, the error says how much is free.
    let err = pool.new_sequence(Some(5)).unwrap_err();
    assert_eq!(
        err.downcast_ref::<PoolExhausted>().unwrap().missing_chunks,
        1
    );
    let err = err.to_string();
    assert!(err.contains("no free contiguous run of 5 positions") && err.contains("4 of its 10"));
    let b = pool.new_sequence(Some(4)).unwrap();
    pool.truncate(a, 1).unwrap();
    assert_eq!(pool.stats().live_bytes, 64);
    pool.release(a).unwrap();
    pool.release(b).unwrap();
    let s = pool.stats();
    assert_eq!(
        (s.reserved_bytes, s.live_bytes, s.peak_reserved_bytes),
        (0, 0, 10 * 64)
    );
    // Freed runs merge back into one.
    pool.new_sequence(Some(10)).unwrap();
}

#[test]
fn chunks_come_on_demand_and_an_exhausted_pool_takes_nothing() {
    let mut pool = ChunkPool::new(layout(LayoutKind::Chunked, 4), 3, false).unwrap();
    let a = pool.new_sequence(None).unwrap();
    append(&mut pool, a, &[1; 5]).unwrap();
    assert_eq!(pool.seq_table(a).unwrap().len(), 2);
    let b = pool.new_sequence(None).unwrap();
    let before = pool.stats();
    let err = pool.reserve(b, 9).unwrap_err();
    // A scheduler tells an exhausted pool (free some, retry) from other errors by its type.
    assert_eq!(
        err.downcast_ref::<PoolExhausted>().unwrap().missing_chunks,
        2
    );
    let err = err.to_string();
    assert!(
        err.contains("needs 2 more chunk(s)") && err.contains("raise --kv-budget"),
        "{err}"
    );
    assert_eq!(pool.stats(), before, "a failed reserve takes nothing");
    append(&mut pool, b, &[2; 4]).unwrap();
    let s = pool.seq_stats(a).unwrap();
    assert_eq!(
        (s.tokens, s.chunks, s.reserved_bytes, s.live_bytes),
        (5, 2, 512, 320)
    );
}

#[test]
fn full_chunks_are_found_again_and_partial_ones_are_copied_on_write() {
    let mut pool = ChunkPool::new(layout(LayoutKind::Chunked, 4), 8, true).unwrap();
    let doc: Vec<u32> = (100..120).collect();
    let a = pool.new_sequence(None).unwrap();
    append(&mut pool, a, &doc[..10]).unwrap();
    pool.release(a).unwrap();
    // Two full chunks stay cached, the partial third is free.
    assert_eq!(pool.stats().cached_idle_bytes, 2 * 256);
    let b = pool.new_sequence(None).unwrap();
    // Full chunks only: the third block (2 tokens) is not looked up.
    let found = pool.match_prefix(b, &doc[..7], 6).unwrap();
    assert_eq!((found.reused, found.missed_granularity), (4, 3));
    pool.release(b).unwrap();
    let b = pool.new_sequence(None).unwrap();
    let found = pool.match_prefix(b, &doc[..8], 7).unwrap();
    assert_eq!(
        found.reused, 7,
        "the limit keeps the last prompt token to compute"
    );
    assert_eq!(found.missed_granularity, 0);
    assert_eq!(pool.stats().cached_idle_bytes, 0);
    // Writing position 7 lands in an indexed chunk: copied first.
    let copies = append(&mut pool, b, &[7]).unwrap();
    assert_eq!(copies.len(), 1);
    assert_eq!(pool.stats().copies, 1);
    // The indexed original is idle again; the copy is b's.
    assert_eq!(pool.stats().cached_idle_bytes, 256);

    let c = pool.new_sequence(None).unwrap();
    let mut other = doc[..6].to_vec();
    other.extend([1, 2, 3]);
    let found = pool.match_prefix(c, &other, other.len() - 1).unwrap();
    // The first chunk matches; the second starts like the cached one for 2 tokens.
    assert_eq!((found.reused, found.missed_granularity), (4, 2));
    let shared = pool.seq_stats(c).unwrap();
    assert_eq!((shared.chunks, shared.shared_bytes), (1, 256));
    assert_eq!(pool.stats().shared_bytes, 256);
}

#[test]
fn evicted_chunks_go_oldest_first_and_are_counted_as_misses() {
    let mut pool = ChunkPool::new(layout(LayoutKind::Chunked, 2), 4, true).unwrap();
    let a = pool.new_sequence(None).unwrap();
    append(&mut pool, a, &[1, 2, 3, 4]).unwrap();
    pool.release(a).unwrap();
    let b = pool.new_sequence(None).unwrap();
    append(&mut pool, b, &[5, 6, 7, 8]).unwrap();
    pool.release(b).unwrap();
    assert_eq!(pool.stats().cached_idle_bytes, 4 * 128);
    // Three new chunks: a's two (idle first) and one of b's.
    let c = pool.new_sequence(None).unwrap();
    append(&mut pool, c, &[9; 6]).unwrap();
    assert_eq!(pool.stats().evictions, 3);
    let d = pool.new_sequence(None).unwrap();
    let found = pool.match_prefix(d, &[1, 2, 3, 4, 0], 4).unwrap();
    assert_eq!((found.reused, found.missed_evicted), (0, 4));
    let e = pool.new_sequence(None).unwrap();
    pool.release(c).unwrap();
    let found = pool.match_prefix(e, &[5, 6, 7, 8, 0], 4).unwrap();
    // b's first chunk was evicted; its second is still cached but cannot be reached without it.
    assert_eq!((found.reused, found.missed_evicted), (0, 2));
    let f = pool.new_sequence(None).unwrap();
    let found = pool.match_prefix(f, &[9, 9, 9, 9, 9, 9, 1], 6).unwrap();
    assert_eq!(found.reused, 6);
}

/// A tiny xorshift generator, so the model test needs no seeded-rng plumbing.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The pool against a plain model of it: random allocate / share / append / fork / truncate /
/// release / evict, with a shadow of the arena written through the step views. After every
/// operation: each sequence reads back exactly its tokens (so no chunk it holds was handed to
/// another sequence or freed), reference counts equal the block tables, every chunk is in
/// exactly one state, indexed chunks hold their registered tokens, and the accounting equals a
/// recount.
#[test]
fn the_pool_matches_a_plain_model_under_random_operations() {
    let chunk_tokens = 3;
    let chunks = 14;
    // Documents that share prefixes of 0, 4 and 9 tokens, so that sharing happens.
    let base: Vec<u32> = (1..=40).collect();
    let docs: Vec<Vec<u32>> = (0..4)
        .map(|d| {
            let keep = [40, 9, 4, 0][d];
            base.iter()
                .enumerate()
                .map(|(i, &t)| if i < keep { t } else { t + 100 * d as u32 })
                .collect()
        })
        .collect();
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut pool =
            ChunkPool::new(layout(LayoutKind::Chunked, chunk_tokens), chunks, true).unwrap();
        let mut shadow = vec![vec![None::<u32>; chunk_tokens]; chunks];
        // Model: live sequences, their document and their tokens.
        let mut live: Vec<(SeqId, usize, Vec<u32>)> = Vec::new();
        for op in 0..300 {
            let what = rng.below(10);
            let context = format!("seed {seed} op {op} kind {what}");
            match what {
                0 | 1 if live.len() < 5 => {
                    let id = pool.new_sequence(None).unwrap();
                    let doc = rng.below(docs.len());
                    let want = 1 + rng.below(20);
                    let limit = want - 1;
                    let found = pool.match_prefix(id, &docs[doc][..want], limit).unwrap();
                    assert!(found.reused <= limit, "{context}");
                    live.push((id, doc, docs[doc][..found.reused].to_vec()));
                }
                2..=5 if !live.is_empty() => {
                    let i = rng.below(live.len());
                    let (id, doc, ref mut tokens) = live[i];
                    let rows = 1 + rng.below(5);
                    let new: Vec<u32> = (0..rows)
                        .map(|r| {
                            let pos = tokens.len() + r;
                            if rng.below(4) > 0 && pos < docs[doc].len() {
                                docs[doc][pos]
                            } else {
                                1000 + rng.below(5) as u32
                            }
                        })
                        .collect();
                    let before = pool.stats();
                    match pool.reserve(id, rows) {
                        Ok(copies) => {
                            for copy in copies {
                                shadow[copy.dst as usize] = shadow[copy.src as usize].clone();
                            }
                            let view = pool.step_view(&[(id, rows)]).unwrap();
                            for (r, &token) in new.iter().enumerate() {
                                let seq = &view.seqs[view.row_seq[r] as usize];
                                let (chunk, slot) = view.locate(seq, view.row_pos[r] as usize);
                                shadow[chunk][slot] = Some(token);
                            }
                            pool.commit(id, &new).unwrap();
                            tokens.extend(new);
                        }
                        Err(e) => {
                            assert!(e.to_string().contains("exhausted"), "{context}: {e}");
                            assert_eq!(pool.stats(), before, "{context}");
                        }
                    }
                }
                6 if !live.is_empty() => {
                    let i = rng.below(live.len());
                    let len = rng.below(live[i].2.len() + 1);
                    pool.truncate(live[i].0, len).unwrap();
                    live[i].2.truncate(len);
                }
                7 if !live.is_empty() && live.len() < 5 => {
                    let i = rng.below(live.len());
                    let id = pool.fork(live[i].0).unwrap();
                    live.push((id, live[i].1, live[i].2.clone()));
                }
                8 | 9 if !live.is_empty() => {
                    let (id, _, _) = live.swap_remove(rng.below(live.len()));
                    pool.release(id).unwrap();
                    assert!(pool.seq_len(id).is_err(), "{context}");
                }
                _ => {}
            }
            check(&pool, &shadow, &live, &context);
        }
    }
}

fn check(
    pool: &ChunkPool,
    shadow: &[Vec<Option<u32>>],
    live: &[(SeqId, usize, Vec<u32>)],
    context: &str,
) {
    let ct = pool.layout().chunk_tokens();
    let mut refs = vec![0usize; pool.num_chunks()];
    for (id, _, tokens) in live {
        assert_eq!(
            pool.seq_tokens(*id).unwrap(),
            tokens.as_slice(),
            "{context}"
        );
        let table = pool.seq_table(*id).unwrap();
        assert_eq!(table.len(), tokens.len().div_ceil(ct), "{context}");
        for (pos, &token) in tokens.iter().enumerate() {
            let chunk = table[pos / ct] as usize;
            assert_eq!(
                shadow[chunk][pos % ct],
                Some(token),
                "{context}: {id} position {pos} in chunk {chunk}"
            );
        }
        for &chunk in table {
            refs[chunk as usize] += 1;
        }
    }
    let mut free = vec![false; pool.num_chunks()];
    for (&start, &n) in &pool.free {
        for c in start..start + n {
            assert!(!free[c as usize], "{context}: chunk {c} free twice");
            free[c as usize] = true;
        }
    }
    let idle: Vec<u32> = pool.idle.values().copied().collect();
    for c in 0..pool.num_chunks() {
        assert_eq!(pool.chunk_refs(c as u32), refs[c], "{context}: chunk {c}");
        let states = [refs[c] > 0, free[c], idle.contains(&(c as u32))];
        assert_eq!(
            states.iter().filter(|&&s| s).count(),
            1,
            "{context}: chunk {c} is held/free/idle {states:?}"
        );
        if idle.contains(&(c as u32)) {
            assert!(
                pool.index.contains(c as u32),
                "{context}: idle chunk {c} unindexed"
            );
        }
    }
    for (chunk, tokens) in pool.index.registered() {
        assert!(
            !free[chunk as usize],
            "{context}: indexed chunk {chunk} is free"
        );
        let held: Vec<Option<u32>> = tokens.iter().map(|&t| Some(t)).collect();
        assert_eq!(
            shadow[chunk as usize], held,
            "{context}: indexed chunk {chunk}"
        );
    }
    let stats = pool.stats();
    let cb = pool.layout().chunk_bytes() as u64;
    let held = refs.iter().filter(|&&r| r > 0).count() as u64;
    let shared = refs.iter().filter(|&&r| r > 1).count() as u64;
    let live_slots: usize = (0..pool.num_chunks())
        .filter(|&c| refs[c] > 0)
        .map(|c| pool.chunk_filled(c as u32))
        .sum();
    assert_eq!(stats.reserved_bytes, held * cb, "{context}");
    assert_eq!(stats.shared_bytes, shared * cb, "{context}");
    assert_eq!(stats.cached_idle_bytes, idle.len() as u64 * cb, "{context}");
    assert_eq!(
        stats.live_bytes,
        (live_slots * pool.layout().bytes_per_token()) as u64,
        "{context}"
    );
    // Every written position is counted: a chunk's written slots cover each holder's positions.
    for (id, _, tokens) in live {
        let table = pool.seq_table(*id).unwrap();
        for (i, &chunk) in table.iter().enumerate() {
            let used = (tokens.len() - i * ct).min(ct);
            assert!(pool.chunk_filled(chunk) >= used, "{context}: chunk {chunk}");
        }
    }
}

#[test]
fn a_run_of_decode_steps_reserves_ahead_and_gives_back_what_it_did_not_keep() {
    // Chunks of 4; a sequence of 6 positions reserves 7 more for a run (chunks for 13): the
    // run's view has one row at position 6 and the 4 chunks of all 13. Three steps kept.
    let mut pool = ChunkPool::new(layout(LayoutKind::Chunked, 4), 8, true).unwrap();
    let a = pool.new_sequence(None).unwrap();
    append(&mut pool, a, &[1, 2, 3, 4, 5, 6]).unwrap();
    pool.reserve(a, 7).unwrap();
    let view = pool.decode_view(&[a]).unwrap();
    assert_eq!(
        (view.rows(), view.row_pos[0], view.seqs[0].start),
        (1, 6, 6)
    );
    assert_eq!(view.block_table, pool.seq_table(a).unwrap());
    assert_eq!(view.block_table.len(), 4);
    let mut last = view.clone();
    for _ in 0..6 {
        last.advance();
    }
    last.check_fits(&layout(LayoutKind::Chunked, 4), 8).unwrap();
    assert!(pool.commit_first(a, &[7; 8]).is_err(), "more than reserved");
    pool.commit_first(a, &[7, 8, 9]).unwrap();
    assert_eq!(pool.seq_tokens(a).unwrap(), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(pool.seq_table(a).unwrap().len(), 3);
    let s = pool.stats();
    assert_eq!((s.reserved_bytes, s.live_bytes), (3 * 4 * 64, 9 * 64));
    // The two full chunks are in the prefix index; nothing is pending any more.
    let b = pool.new_sequence(None).unwrap();
    assert_eq!(
        pool.match_prefix(b, &[1, 2, 3, 4, 5, 6, 7, 8, 9], 9)
            .unwrap()
            .reused,
        8
    );
    assert!(pool.decode_view(&[a]).is_err());
}

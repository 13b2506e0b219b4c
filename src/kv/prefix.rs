//! The prefix index: full chunks found by their content, so that a sequence whose tokens start
//! like an earlier one's takes that sequence's chunks instead of recomputing them.
//!
//! A hash chain, as vLLM's automatic prefix caching keys its blocks: a full chunk's key hashes
//! the key of the chunk before it and the chunk's own tokens, so one key stands for every token
//! up to the chunk's end. Chosen over a radix tree (SGLang) because a chunk is the unit that can
//! be shared anyway (a sequence's block table points at whole chunks), so matching per token
//! would only find tokens that cannot be used; a lookup costs one hash per chunk, and the index
//! holds one entry per cached chunk. A partial match inside a chunk is still measured, as the
//! "chunk granularity" miss, from the children of the last matched key. The tokens are kept
//! beside each key and compared on every hit, so a hash collision can cost a miss, never a
//! wrong cache.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

/// Content key of a full chunk: the hash of its parent's key and its own tokens.
pub type ChainKey = u64;

/// The parent key of a sequence's first chunk.
pub const ROOT: ChainKey = 0x6b76_6c61_6272_6f6f;

pub fn chain_key(parent: ChainKey, tokens: &[u32]) -> ChainKey {
    let mut hasher = std::hash::DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

struct Entry {
    key: ChainKey,
    parent: ChainKey,
    tokens: Vec<u32>,
}

#[derive(Default)]
pub struct PrefixIndex {
    by_key: HashMap<ChainKey, u32>,
    entries: HashMap<u32, Entry>,
    children: HashMap<ChainKey, Vec<u32>>,
    /// Keys whose chunk was evicted to make room, for the "evicted" misses.
    evicted: HashSet<ChainKey>,
}

impl PrefixIndex {
    /// The chunk registered under `key` with exactly these tokens.
    pub fn lookup(&self, key: ChainKey, tokens: &[u32]) -> Option<u32> {
        let chunk = *self.by_key.get(&key)?;
        (self.entries[&chunk].tokens == tokens).then_some(chunk)
    }

    pub fn contains(&self, chunk: u32) -> bool {
        self.entries.contains_key(&chunk)
    }

    /// Registers `chunk` as holding `tokens` after the chunk keyed `parent`. Returns false (and
    /// registers nothing) when another chunk already holds that content.
    pub fn insert(&mut self, chunk: u32, parent: ChainKey, tokens: &[u32]) -> bool {
        let key = chain_key(parent, tokens);
        if self.by_key.contains_key(&key) || self.entries.contains_key(&chunk) {
            return false;
        }
        self.by_key.insert(key, chunk);
        self.children.entry(parent).or_default().push(chunk);
        self.entries.insert(
            chunk,
            Entry {
                key,
                parent,
                tokens: tokens.to_vec(),
            },
        );
        self.evicted.remove(&key);
        true
    }

    /// Forgets `chunk`, evicted to make room, and remembers that its key was cached.
    pub fn evict(&mut self, chunk: u32) {
        if let Some(key) = self.forget(chunk) {
            self.evicted.insert(key);
        }
    }

    /// Forgets `chunk`; returns its key if it was registered.
    pub fn forget(&mut self, chunk: u32) -> Option<ChainKey> {
        let entry = self.entries.remove(&chunk)?;
        self.by_key.remove(&entry.key);
        if let Some(siblings) = self.children.get_mut(&entry.parent) {
            siblings.retain(|&c| c != chunk);
            if siblings.is_empty() {
                self.children.remove(&entry.parent);
            }
        }
        Some(entry.key)
    }

    pub fn was_evicted(&self, key: ChainKey) -> bool {
        self.evicted.contains(&key)
    }

    /// The longest run of `tokens` that some registered child of `parent` starts with: tokens a
    /// finer-grained cache would have reused.
    pub fn longest_partial(&self, parent: ChainKey, tokens: &[u32]) -> usize {
        self.children.get(&parent).map_or(0, |children| {
            children
                .iter()
                .map(|chunk| {
                    self.entries[chunk]
                        .tokens
                        .iter()
                        .zip(tokens)
                        .take_while(|(a, b)| a == b)
                        .count()
                })
                .max()
                .unwrap_or(0)
        })
    }

    /// Every registered chunk and its tokens (the pool's model test).
    #[cfg(test)]
    pub fn registered(&self) -> Vec<(u32, &[u32])> {
        self.entries
            .iter()
            .map(|(&chunk, entry)| (chunk, entry.tokens.as_slice()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_find_whole_chunks_and_measure_partial_ones() {
        let mut index = PrefixIndex::default();
        let first = [1, 2, 3, 4];
        let k1 = chain_key(ROOT, &first);
        assert!(index.insert(7, ROOT, &first));
        assert!(!index.insert(8, ROOT, &first), "the same content twice");
        assert!(index.insert(9, k1, &[5, 6, 7, 8]));
        assert_eq!(index.lookup(k1, &first), Some(7));
        assert_eq!(
            index.lookup(chain_key(k1, &[5, 6, 7, 8]), &[5, 6, 7, 8]),
            Some(9)
        );
        // The same tokens after another prefix are another key.
        assert_eq!(
            index.lookup(chain_key(ROOT, &[5, 6, 7, 8]), &[5, 6, 7, 8]),
            None
        );
        // A collision (same key, other tokens) is a miss.
        assert_eq!(index.lookup(k1, &[1, 2, 3, 5]), None);
        assert_eq!(index.longest_partial(k1, &[5, 6, 0, 0]), 2);
        assert_eq!(index.longest_partial(ROOT, &[9]), 0);
        index.evict(7);
        assert!(index.was_evicted(k1));
        assert_eq!(index.lookup(k1, &first), None);
        assert_eq!(index.registered().len(), 1);
        assert!(index.insert(3, ROOT, &first));
        assert!(!index.was_evicted(k1), "registered again");
    }
}

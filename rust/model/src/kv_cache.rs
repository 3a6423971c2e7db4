//! Per-session key/value cache. Buffers are preallocated and grown by doubling, new entries
//! are written in place, and rollback only moves the length: no per-token concatenation and
//! no recompute.

use candle_core::{DType, Device, Result, Tensor};

/// Shape of one layer's cache entries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvShape {
    pub n_kv_head: usize,
    pub head_dim: usize,
}

#[derive(Debug)]
struct LayerKv {
    /// `(n_kv_head, capacity, head_dim)`, valid up to `KvCache::len` along dim 1.
    k: Tensor,
    v: Tensor,
}

/// Keys and values of every layer for the tokens a session has seen.
#[derive(Debug)]
pub(crate) struct KvCache {
    shapes: Vec<KvShape>,
    layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
    max_len: usize,
    device: Device,
}

/// Smallest allocation; a short chat fits without growing.
const MIN_CAPACITY: usize = 256;

impl KvCache {
    pub fn new(shapes: Vec<KvShape>, max_len: usize, device: &Device) -> Self {
        Self {
            shapes,
            layers: Vec::new(),
            len: 0,
            capacity: 0,
            max_len,
            device: device.clone(),
        }
    }

    /// Bytes held by the key and value buffers (their capacity, not just the tokens in use).
    pub fn allocated_bytes(&self) -> usize {
        Self::bytes_per_token(&self.shapes) * self.capacity
    }

    /// Bytes one token takes in a cache of these layer shapes.
    pub fn bytes_per_token(shapes: &[KvShape]) -> usize {
        shapes
            .iter()
            .map(|s| 2 * s.n_kv_head * s.head_dim * DType::F32.size_in_bytes())
            .sum()
    }

    /// Rolls back to `n` tokens (no-op if `n >= len`).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Forgets every token and frees the buffers: a reset context starts from no memory, not
    /// from the largest it ever held.
    pub fn release(&mut self) {
        self.layers.clear();
        self.len = 0;
        self.capacity = 0;
    }

    /// Marks `n` tokens valid after a forward pass wrote them.
    pub fn set_len(&mut self, n: usize) {
        assert!(
            n <= self.capacity,
            "{n} tokens exceed the reserved {}",
            self.capacity
        );
        self.len = n;
    }

    /// The capacity [`reserve`](Self::reserve) grows to for `needed` tokens: a quarter more
    /// each time (rounded to 64 tokens), not double, so appends stay amortised O(1) and a long
    /// context holds at most ~25% unused capacity, not up to 100% (a 4,100-token prompt
    /// allocated 8,192 tokens of KV).
    fn grown_capacity(&self, needed: usize) -> usize {
        needed
            .max(self.capacity + self.capacity / 4)
            .next_multiple_of(64)
            .max(MIN_CAPACITY)
            .min(self.max_len.max(needed))
    }

    /// Bytes [`reserve`](Self::reserve) allocates for `needed` tokens: the whole new capacity
    /// when it must grow (the old buffers live until copied), nothing when the room is there.
    pub fn growth_bytes(&self, needed: usize) -> usize {
        if needed <= self.capacity {
            0
        } else {
            self.grown_capacity(needed) * Self::bytes_per_token(&self.shapes)
        }
    }

    /// Makes room for `needed` tokens, copying the valid prefix into larger buffers.
    pub fn reserve(&mut self, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let capacity = self.grown_capacity(needed);
        let mut layers = Vec::with_capacity(self.shapes.len());
        for (i, s) in self.shapes.iter().enumerate() {
            let k = Tensor::zeros(
                (s.n_kv_head, capacity, s.head_dim),
                DType::F32,
                &self.device,
            )?;
            let v = Tensor::zeros(
                (s.n_kv_head, capacity, s.head_dim),
                DType::F32,
                &self.device,
            )?;
            if self.len > 0 {
                let old = &self.layers[i];
                k.slice_set(&old.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                v.slice_set(&old.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            layers.push(LayerKv { k, v });
        }
        self.layers = layers;
        self.capacity = capacity;
        Ok(())
    }

    /// Writes `k`, `v` of shape `(n_kv_head, seq, head_dim)` at positions `pos0..pos0+seq` of
    /// `layer`. The caller reserved room first.
    pub fn write(&self, layer: usize, pos0: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let l = &self.layers[layer];
        l.k.slice_set(&k.contiguous()?, 1, pos0)?;
        l.v.slice_set(&v.contiguous()?, 1, pos0)
    }

    /// The whole `(n_kv_head, capacity, head_dim)` key and value buffers of `layer`.
    pub fn buffers(&self, layer: usize) -> (&Tensor, &Tensor) {
        let l = &self.layers[layer];
        (&l.k, &l.v)
    }

    /// Keys and values of `layer` for positions `start..end`, as views into the buffers.
    pub fn read(&self, layer: usize, start: usize, end: usize) -> Result<(Tensor, Tensor)> {
        let l = &self.layers[layer];
        Ok((
            l.k.narrow(1, start, end - start)?,
            l.v.narrow(1, start, end - start)?,
        ))
    }
}

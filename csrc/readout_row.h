// The top-k read-out's work (see topk_readout.cpp). Included once per instruction set,
// each time inside its own namespace and `#pragma GCC target` region, with MIRROR_ISA
// set to 512 (AVX-512 F/VL/BW/DQ), 256 (AVX2 + FMA) or 0 (the compiler's baseline).
// (GCC does not redefine __AVX2__ etc. inside such a region, hence the macro.)
//
// A block of kBlockRows queries of one head gets its logits x = q kt [rows, K] from a
// register-blocked kernel into per-thread scratch (L2-sized), then each row:
//  1. block maxima: bm[j] = max_r x[j + r*nb] over nb ~ 2k strided blocks (vertical
//     vector maxima, no horizontal reductions); NaN check on the way.
//  2. bound = k-th largest of bm: k distinct elements are >= it, so it is <= t.
//  3. candidates = {i : x_i >= bound} (vector compare, lane masks): ~4% of the row.
//  4. t = k-th largest candidate (exact); keep candidates >= t (ties kept).
//  5. softmax, max, entropy and sum_j w_j v_j over the kept ones.

#if MIRROR_ISA == 512
constexpr int kLanes = 16;
#elif MIRROR_ISA == 256
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
// 16 accumulators need 32 vector registers (AVX-512); 8 fit the 16 of AVX2 / SSE.
constexpr int kTileVecs = kLanes == 16 ? 4 : 2;
typedef float fvec __attribute__((vector_size(kLanes * 4)));
typedef int32_t ivec __attribute__((vector_size(kLanes * 4)));

inline fvec load(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, fvec v) { std::memcpy(p, &v, sizeof v); }

// Bit l set where lane l of v is >= b.
inline uint32_t lanes_at_or_above(fvec v, float b) {
#if MIRROR_ISA == 512
  return _mm512_cmp_ps_mask(v, _mm512_set1_ps(b), _CMP_GE_OQ);
#elif MIRROR_ISA == 256
  return _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(b), _CMP_GE_OQ));
#elif defined(__SSE2__)
  return _mm_movemask_ps(_mm_cmpge_ps(v, _mm_set1_ps(b)));
#else
  uint32_t m = 0;
  for (int l = 0; l < kLanes; ++l) m |= static_cast<uint32_t>(v[l] >= b) << l;
  return m;
#endif
}

inline bool any_nan(const float* x, Py_ssize_t n) {
  ivec acc = {};
  Py_ssize_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const fvec v = load(x + i);
    acc |= v != v;
  }
  bool nan = false;
  for (int l = 0; l < kLanes; ++l) nan |= acc[l] != 0;
  for (; i < n; ++i) nan |= x[i] != x[i];
  return nan;
}

// bm[j] = max over x[j], x[j + nb], x[j + 2 nb], ... (nb <= K, every block non-empty).
inline void strided_block_max(const float* x, Py_ssize_t K, Py_ssize_t nb, float* bm) {
  std::memcpy(bm, x, nb * sizeof(float));
  Py_ssize_t r = nb;
  for (; r + nb <= K; r += nb) {
    Py_ssize_t j = 0;
    for (; j + kLanes <= nb; j += kLanes) {
      const fvec a = load(bm + j), b = load(x + r + j);
      store(bm + j, b > a ? b : a);
    }
    for (; j < nb; ++j) bm[j] = x[r + j] > bm[j] ? x[r + j] : bm[j];
  }
  for (Py_ssize_t j = 0; r + j < K; ++j) bm[j] = x[r + j] > bm[j] ? x[r + j] : bm[j];
}

// Candidates x_i >= bound into (val, idx), compressed without branches (a branch per
// vector mispredicts half the time at ~4% density); returns their count. val and idx
// need kLanes slots of slack: whole vectors are stored.
inline Py_ssize_t at_or_above(const float* x, Py_ssize_t K, float bound, float* val, int32_t* idx) {
  Py_ssize_t n = 0, i = 0;
  ivec iota;
  for (int l = 0; l < kLanes; ++l) iota[l] = l;
#if MIRROR_ISA == 512 || MIRROR_ISA == 256
  for (; i + kLanes <= K; i += kLanes) {
    const fvec v = load(x + i);
    const ivec at = iota + static_cast<int32_t>(i);
    const uint32_t m = lanes_at_or_above(v, bound);
#if MIRROR_ISA == 512
    _mm512_storeu_ps(val + n, _mm512_maskz_compress_ps(m, v));
    _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(m, reinterpret_cast<__m512i>(at)));
#else
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(compress_table()[m])));
    _mm256_storeu_ps(val + n, _mm256_permutevar8x32_ps(v, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + n),
                        _mm256_permutevar8x32_epi32(reinterpret_cast<__m256i>(at), perm));
#endif
    n += __builtin_popcount(m);
  }
#endif
  for (; i < K; ++i) {
    val[n] = x[i];
    idx[n] = static_cast<int32_t>(i);
    n += x[i] >= bound;
  }
  return n;
}

inline fvec splat(float x) { return x - fvec{}; }  // scalar op vector broadcasts; x - 0 == x

// k-th largest of data[0..n) (1 <= k <= n, no NaN), exact; data is left as it is.
// Values are binned linearly between their min and max: a monotone map, so whole bins
// above the k-th value are counted at once and only the members of its bin go through
// nth_element (a plain nth_element mispredicts its way through ~7 ns per element).
inline float kth_largest(const float* data, Py_ssize_t n, Py_ssize_t k, float* scratch) {
  fvec lo_v = splat(data[0]), hi_v = lo_v;
  Py_ssize_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const fvec v = load(data + i);
    lo_v = v < lo_v ? v : lo_v;
    hi_v = v > hi_v ? v : hi_v;
  }
  float lo = lo_v[0], hi = hi_v[0];
  for (int l = 1; l < kLanes; ++l) {
    lo = std::min(lo, lo_v[l]);
    hi = std::max(hi, hi_v[l]);
  }
  for (; i < n; ++i) {
    lo = std::min(lo, data[i]);
    hi = std::max(hi, data[i]);
  }
  if (!(hi > lo)) return hi;
  constexpr int kBins = 64;
  const float scale = kBins / (hi - lo);
  Py_ssize_t m = 0, kk = k;
  if (std::isfinite(scale) && scale > 0.f) {  // an infinite value or range: one bin
    auto bin = [&](float x) { return std::min(kBins - 1, static_cast<int>((x - lo) * scale)); };
    int32_t hist[kBins] = {};
    for (i = 0; i < n; ++i) ++hist[bin(data[i])];
    int b = kBins - 1;
    while (kk > hist[b]) kk -= hist[b--];
    for (i = 0; i < n; ++i) {
      scratch[m] = data[i];
      m += bin(data[i]) == b;
    }
  } else {
    std::memcpy(scratch, data, n * sizeof(float));
    m = n;
  }
  std::nth_element(scratch, scratch + (kk - 1), scratch + m, std::greater<float>());
  return scratch[kk - 1];
}

// x: this row's logits [K]; v: its head's values [K, hd]; row: index into the outputs.
inline void select_row(const Problem& p, const float* x, const float* v, Py_ssize_t row, Scratch& s) {
  const Py_ssize_t K = p.slots, k = p.top_k, hd = p.head_dim;
  if (any_nan(x, K)) return fill_nan(p, row);

  // 1-2. A lower bound of the k-th value from ~2k block maxima (nb a multiple of the
  // vector width where K allows it).
  const Py_ssize_t nb = std::min<Py_ssize_t>(K, (2 * k + kLanes - 1) / kLanes * kLanes);
  strided_block_max(x, K, nb, s.block_max.data());
  float row_max = s.block_max[0];
  for (Py_ssize_t j = 1; j < nb; ++j) row_max = s.block_max[j] > row_max ? s.block_max[j] : row_max;
  const float bound = kth_largest(s.block_max.data(), nb, k, s.select.data());

  // 3-4. Candidates, and the exact k-th value among them.
  float* cand = s.cand_val.data();
  int32_t* idx = s.cand_idx.data();
  const Py_ssize_t n = at_or_above(x, K, bound, cand, idx);
  const float t = kth_largest(cand, n, k, s.select.data());

  // 5. Softmax over the kept slots (fp32, as the official softmax) and its statistics.
  Py_ssize_t kept = 0;
  for (Py_ssize_t j = 0; j < n; ++j) {  // branch-free compaction (idx in place: kept <= j)
    s.select[kept] = cand[j];
    idx[kept] = idx[j];
    kept += cand[j] >= t;
  }
  float total = 0.f;
  for (Py_ssize_t j = 0; j < kept; ++j) {
    s.select[j] = std::exp(s.select[j] - row_max);
    total += s.select[j];
  }
  float* o = p.out + row * hd;
  std::fill(o, o + hd, 0.f);
  float best = 0.f, ent = 0.f;
  const float inv = 1.f / total;
  for (Py_ssize_t j = 0; j < kept; ++j) {
    const float w = s.select[j] * inv;
    best = w > best ? w : best;
    ent -= w * std::log(w + p.eps);
    const float* vj = v + static_cast<Py_ssize_t>(idx[j]) * hd;
    for (Py_ssize_t d = 0; d < hd; ++d) o[d] += w * vj[d];
  }
  p.max_w[row] = best;
  p.entropy[row] = ent;
}

// x[r, j] = sum_d q[r, d] kt[d, j] for r < rows (a multiple of kTileRows), q [rows, hd],
// kt [hd, K]. Panels of kStep slots: a panel of kt (hd * kStep floats) stays in L1 while
// every kTileRows x kStep register tile of the block is computed from it.
inline void logits_block(const float* q, Py_ssize_t rows, const float* kt, Py_ssize_t K, Py_ssize_t hd, float* x) {
  constexpr Py_ssize_t kStep = kLanes * kTileVecs;
  Py_ssize_t j = 0;
  for (; j + kStep <= K; j += kStep) {
    for (Py_ssize_t r0 = 0; r0 < rows; r0 += kTileRows) {
      fvec acc[kTileRows][kTileVecs] = {};
      const float* qt = q + r0 * hd;
      for (Py_ssize_t d = 0; d < hd; ++d) {
        fvec kv[kTileVecs];
        for (int c = 0; c < kTileVecs; ++c) kv[c] = load(kt + d * K + j + c * kLanes);
        for (int r = 0; r < kTileRows; ++r) {
          const fvec qd = splat(qt[r * hd + d]);
          for (int c = 0; c < kTileVecs; ++c) acc[r][c] += qd * kv[c];
        }
      }
      for (int r = 0; r < kTileRows; ++r)
        for (int c = 0; c < kTileVecs; ++c) store(x + (r0 + r) * K + j + c * kLanes, acc[r][c]);
    }
  }
  for (; j < K; ++j)
    for (Py_ssize_t r = 0; r < rows; ++r) {
      float acc = 0.f;
      for (Py_ssize_t d = 0; d < hd; ++d) acc += q[r * hd + d] * kt[d * K + j];
      x[r * K + j] = acc;
    }
}

// Blocks [begin, end) of the flat list (head, first row): logits, then every row.
inline void run_blocks(const Problem& p, Py_ssize_t begin, Py_ssize_t end, Scratch& s) {
  const Py_ssize_t K = p.slots, hd = p.head_dim, per_head = (p.rows + kBlockRows - 1) / kBlockRows;
  for (Py_ssize_t block = begin; block < end; ++block) {
    const Py_ssize_t head = block / per_head, r0 = (block % per_head) * kBlockRows;
    const Py_ssize_t rows = std::min<Py_ssize_t>(kBlockRows, p.rows - r0);
    const Py_ssize_t padded = (rows + kTileRows - 1) / kTileRows * kTileRows;
    const float* q = p.q + (head * p.rows + r0) * hd;
    if (padded > rows) {  // the last block of a head: zero-padded queries
      std::memcpy(s.q_block.data(), q, rows * hd * sizeof(float));
      std::fill(s.q_block.begin() + rows * hd, s.q_block.begin() + padded * hd, 0.f);
      q = s.q_block.data();
    }
    logits_block(q, padded, p.keys_t + head * hd * K, K, hd, s.logits.data());
    for (Py_ssize_t r = 0; r < rows; ++r)
      select_row(p, s.logits.data() + r * K, p.values + head * K * hd, head * p.rows + r0 + r, s);
  }
}

// Exact sparse top-k read-out of memory-bank logits on the CPU (the `mirror_core._readout`
// extension module). For each row of logits x [K] (one query, one head):
//
//   t      = the k-th largest value of x
//   w_j    = exp(x_j - max x) / sum_{x_i >= t} exp(x_i - max x)   for x_j >= t, else 0
//   out    = sum_j w_j v_j                                           [hd]
//   max_w  = max_j w_j,  entropy = -sum_j w_j log(w_j + eps)
//
// Every slot tied with the k-th value is kept, as the official masked softmax does.
// torch.topk spends ~3.4 ns per logit on a full selection; here the k-th value is found
// among a few candidates instead: the maxima of 2k blocks are distinct elements, so the
// k-th largest block maximum is a lower bound of t, and only the ~4% of the row at or
// above it (for K = 4096, k = 128) go into an exact selection (readout_row.h).
// The row code is compiled for AVX-512, AVX2 and the baseline; the best one the CPU
// has is picked at import (use_isa() switches, for tests).
//
// The logits are computed here too, a few rows at a time into cache-sized scratch: they
// never go to memory, and no torch (OpenMP) op alternates with this code's threads
// (libgomp workers spin after each parallel region and take the cores from this code's
// threads when the two alternate).
//
// Layout: q [H, R, hd] (scaled), keys_t [H, hd, K], values [H, K, hd], outputs
// [H, R, hd] and [H, R]; float32, C-contiguous. Row blocks are split over `threads`
// std::threads; the GIL is released.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <thread>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int kTileRows = 4;    // queries per register tile of logits
constexpr int kBlockRows = 32;  // queries per block: [32, K] logits of scratch (512 KB at K = 4096)

struct Problem {
  const float* q;       // [H, R, hd]
  const float* keys_t;  // [H, hd, K]
  const float* values;  // [H, K, hd]
  float* out;           // [H, R, hd]
  float* max_w;         // [H, R]
  float* entropy;       // [H, R]
  Py_ssize_t heads, rows, slots, head_dim, top_k;
  float eps;
};

// Per-thread scratch, sized once per call (+ slack for whole-vector stores).
struct Scratch {
  std::vector<float> logits, q_block, block_max, cand_val, select;
  std::vector<int32_t> cand_idx;
  Scratch(Py_ssize_t slots, Py_ssize_t head_dim)
      : logits(kBlockRows * slots),
        q_block(kBlockRows * head_dim),
        block_max(slots + 16),
        cand_val(slots + 16),
        select(slots + 16),
        cand_idx(slots + 16) {}
};

// AVX2 compression: for each 8-bit lane mask, the lanes to move to the front, one byte each.
const uint64_t* compress_table() {
  static const auto table = [] {
    std::vector<uint64_t> t(256);
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) t[m] |= static_cast<uint64_t>(l) << (8 * n++);
    }
    return t;
  }();
  return table.data();
}

void fill_nan(const Problem& p, Py_ssize_t row) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::fill(p.out + row * p.head_dim, p.out + (row + 1) * p.head_dim, nan);
  p.max_w[row] = nan;
  p.entropy[row] = nan;
}

#define MIRROR_ISA 0
namespace baseline {
#include "readout_row.h"
}  // namespace baseline
#undef MIRROR_ISA

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MIRROR_X86_CLONES 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MIRROR_ISA 256
namespace avx2 {
#include "readout_row.h"
}  // namespace avx2
#undef MIRROR_ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define MIRROR_ISA 512
namespace avx512 {
#include "readout_row.h"
}  // namespace avx512
#undef MIRROR_ISA
#pragma GCC pop_options
#endif

using BlocksFn = void (*)(const Problem&, Py_ssize_t, Py_ssize_t, Scratch&);

bool always() { return true; }
#ifdef MIRROR_X86_CLONES
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}
#endif

struct Isa {
  const char* name;
  BlocksFn run_blocks;
  bool (*supported)();
};

const Isa isas[] = {  // best first
#ifdef MIRROR_X86_CLONES
    {"avx512", avx512::run_blocks, has_avx512},
    {"avx2", avx2::run_blocks, has_avx2},
#endif
    {"baseline", baseline::run_blocks, always},
};

const Isa* current = nullptr;  // set at import: the best one this CPU has

void run_part(const Problem& p, Py_ssize_t begin, Py_ssize_t end) {
  Scratch s(p.slots, p.head_dim);
  current->run_blocks(p, begin, end, s);
}

void run(const Problem& p, int threads) {
  const Py_ssize_t total = p.heads * ((p.rows + kBlockRows - 1) / kBlockRows);
  threads = static_cast<int>(std::max<Py_ssize_t>(1, std::min<Py_ssize_t>(threads, total / 2)));
  if (threads == 1) return run_part(p, 0, total);
  std::vector<std::thread> pool;
  const Py_ssize_t per = (total + threads - 1) / threads;
  for (int t = 1; t < threads; ++t)
    pool.emplace_back(run_part, std::cref(p), std::min(total, t * per), std::min(total, (t + 1) * per));
  run_part(p, 0, std::min(total, per));
  for (auto& th : pool) th.join();
}

bool check_size(const Py_buffer& buf, Py_ssize_t count, const char* name) {
  if (buf.len != count * static_cast<Py_ssize_t>(sizeof(float))) {
    PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd float32 values", name, buf.len, count);
    return false;
  }
  return true;
}

PyObject* topk_readout(PyObject*, PyObject* args) {
  Py_buffer q, keys_t, values, out, max_w, entropy;
  Py_ssize_t heads, rows, slots, head_dim, top_k;
  double eps;
  int threads;
  if (!PyArg_ParseTuple(args, "y*y*y*w*w*w*nnnnndi", &q, &keys_t, &values, &out, &max_w, &entropy, &heads, &rows,
                        &slots, &head_dim, &top_k, &eps, &threads))
    return nullptr;
  bool ok = true;
  if (heads < 1 || rows < 0 || slots < 1 || head_dim < 1 || top_k < 1 || top_k > slots || slots > INT32_MAX) {
    PyErr_Format(PyExc_ValueError, "bad shape: heads=%zd rows=%zd slots=%zd head_dim=%zd top_k=%zd", heads, rows,
                 slots, head_dim, top_k);
    ok = false;
  }
  ok = ok && check_size(q, heads * rows * head_dim, "q") && check_size(keys_t, heads * head_dim * slots, "keys_t") &&
       check_size(values, heads * slots * head_dim, "values") &&
       check_size(out, heads * rows * head_dim, "out") && check_size(max_w, heads * rows, "max_w") &&
       check_size(entropy, heads * rows, "entropy");
  if (ok) {
    Problem p{static_cast<const float*>(q.buf), static_cast<const float*>(keys_t.buf),
              static_cast<const float*>(values.buf), static_cast<float*>(out.buf),
              static_cast<float*>(max_w.buf), static_cast<float*>(entropy.buf), heads, rows, slots, head_dim, top_k,
              static_cast<float>(eps)};
    Py_BEGIN_ALLOW_THREADS run(p, threads);
    Py_END_ALLOW_THREADS
  }
  for (Py_buffer* b : {&q, &keys_t, &values, &out, &max_w, &entropy}) PyBuffer_Release(b);
  if (!ok) return nullptr;
  Py_RETURN_NONE;
}

PyObject* supported_isas(PyObject*, PyObject*) {
  PyObject* names = PyList_New(0);
  for (const Isa& isa : isas) {
    if (!isa.supported()) continue;
    PyObject* name = PyUnicode_FromString(isa.name);
    if (!name || PyList_Append(names, name) < 0) {
      Py_XDECREF(name);
      Py_DECREF(names);
      return nullptr;
    }
    Py_DECREF(name);
  }
  return names;
}

PyObject* isa(PyObject*, PyObject*) { return PyUnicode_FromString(current->name); }

PyObject* use_isa(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  for (const Isa& candidate : isas) {
    if (std::strcmp(candidate.name, name) != 0) continue;
    if (!candidate.supported()) return PyErr_Format(PyExc_ValueError, "this CPU lacks %s", name);
    current = &candidate;
    Py_RETURN_NONE;
  }
  return PyErr_Format(PyExc_ValueError, "unknown instruction set %s", name);
}

PyMethodDef methods[] = {
    {"topk_readout", topk_readout, METH_VARARGS,
     "topk_readout(q, keys_t, values, out, max_w, entropy, heads, rows, slots, head_dim, top_k, eps, threads)\n"
     "Exact top-k softmax read-out; float32 C-contiguous buffers, results written in place."},
    {"supported_isas", supported_isas, METH_NOARGS, "The compiled instruction sets this CPU runs, best first."},
    {"isa", isa, METH_NOARGS, "The instruction set in use."},
    {"use_isa", use_isa, METH_VARARGS, "use_isa(name): run the code compiled for this instruction set (tests)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "mirror_core._readout", "Exact CPU top-k read-out of memory-bank logits.", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__readout() {
#ifdef MIRROR_X86_CLONES
  __builtin_cpu_init();
#endif
  for (const Isa& isa : isas)
    if (!current && isa.supported()) current = &isa;
  return PyModule_Create(&module);
}

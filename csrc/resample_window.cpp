// Pillow's 8-bit two-pass resampling for a window of the output (the `mirror_core._resample`
// extension module): the arithmetic of Pillow's ImagingResampleHorizontal_8bpc /
// ImagingResampleVertical_8bpc, i.e. per output pixel and channel
//
//   clip8(2^21 + sum_t in[start + t] * w[t]),   clip8(s) = clamp(s >> 22, 0, 255),
//
// with the 22-bit fixed-point weights computed in Python (mirror_core/resample.py, which
// also holds the numpy version of the same passes and says why they are exact), and the
// intermediate image rounded to 8 bits between the passes, as Pillow does. Integer
// arithmetic: the result is Pillow's, bit for bit, on any CPU.
//
// Layout: RGB uint8 [rows, cols, 3], C-contiguous. One axis's taps: starts [n] (relative
// to the region), counts [n], weights [n, ksize] int32 (row-major, zero-padded).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

constexpr int kPrecisionBits = 22;
constexpr int kChannels = 3;

struct Taps {
  const int32_t* starts;
  const int32_t* counts;
  const int32_t* weights;
  Py_ssize_t n, ksize;
};

inline uint8_t clip8(int32_t s) {
  s >>= kPrecisionBits;  // arithmetic shift: floor, as Pillow's
  return static_cast<uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
}

// in [taps' extent, width] -> out [taps.n, width]: each output line a weighted sum of input
// lines, a line of int32 sums at a time (vectorizes). int32 as in Pillow: |sum| <= 255 x
// the weights' absolute sum (< 1.3 x 2^22) stays far below 2^31.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))  // AVX2: 8 int32 lanes (the baseline has no pmulld)
#endif
void lines_pass(const uint8_t* in, Py_ssize_t width, const Taps& taps, uint8_t* out) {
  std::vector<int32_t> acc(width);
  for (Py_ssize_t y = 0; y < taps.n; y++) {
    const int32_t* w = taps.weights + y * taps.ksize;
    std::fill(acc.begin(), acc.end(), int32_t{1} << (kPrecisionBits - 1));
    for (int32_t t = 0; t < taps.counts[y]; t++) {
      const uint8_t* src = in + (static_cast<Py_ssize_t>(taps.starts[y]) + t) * width;
      const int32_t wt = w[t];
      for (Py_ssize_t i = 0; i < width; i++) acc[i] += static_cast<int32_t>(src[i]) * wt;
    }
    uint8_t* dst = out + y * width;
    for (Py_ssize_t i = 0; i < width; i++) dst[i] = clip8(acc[i]);
  }
}

// [rows, cols, 3] -> [cols, rows, 3], in strips of kStrip rows: each output write is a
// contiguous run of kStrip pixels, the reads advance along kStrip input rows at once. A
// pixel moves as one 4-byte word (the next write overwrites the extra byte); the strip's
// last pixel moves as 3 bytes, so nothing is read or written beyond either array.
constexpr Py_ssize_t kStrip = 16;
inline void move_word(uint8_t* dst, const uint8_t* src) {
  uint32_t word;
  std::memcpy(&word, src, sizeof(word));
  std::memcpy(dst, &word, sizeof(word));
}
void transpose(const uint8_t* in, Py_ssize_t rows, Py_ssize_t cols, uint8_t* out) {
  const Py_ssize_t stride = cols * kChannels;
  for (Py_ssize_t y0 = 0; y0 < rows; y0 += kStrip) {
    const Py_ssize_t last = std::min(kStrip, rows - y0) - 1;
    for (Py_ssize_t x = 0; x < cols; x++) {
      uint8_t* dst = out + (x * rows + y0) * kChannels;
      const uint8_t* src = in + y0 * stride + x * kChannels;
      for (Py_ssize_t dy = 0; dy < last; dy++) move_word(dst + dy * kChannels, src + dy * stride);
      std::memcpy(dst + last * kChannels, src + last * stride, kChannels);
    }
  }
}

// in [rows, cols, 3] -> out [taps.n, cols, 3]
void vertical(const uint8_t* in, Py_ssize_t cols, const Taps& taps, uint8_t* out) {
  lines_pass(in, cols * kChannels, taps, out);
}

// An uninitialised byte buffer (every byte is written before it is read).
std::unique_ptr<uint8_t[]> scratch(Py_ssize_t size) { return std::unique_ptr<uint8_t[]>(new uint8_t[size]); }

// in [rows, cols, 3] -> out [rows, taps.n, 3]: the vertical pass of the transposed image
void horizontal(const uint8_t* in, Py_ssize_t rows, Py_ssize_t cols, const Taps& taps, uint8_t* out) {
  const auto flipped = scratch(rows * cols * kChannels), resampled = scratch(taps.n * rows * kChannels);
  transpose(in, rows, cols, flipped.get());
  lines_pass(flipped.get(), rows * kChannels, taps, resampled.get());
  transpose(resampled.get(), taps.n, rows, out);
}

// obj: (starts, counts, weights, ksize). `held` tells the caller to release the views
// (a failed parse releases what it took itself).
bool parse_taps(PyObject* obj, Py_buffer views[3], bool& held, Taps& taps, Py_ssize_t extent, const char* name) {
  Py_ssize_t ksize;
  if (!PyArg_ParseTuple(obj, "y*y*y*n", &views[0], &views[1], &views[2], &ksize)) return false;
  held = true;
  taps.starts = static_cast<const int32_t*>(views[0].buf);
  taps.counts = static_cast<const int32_t*>(views[1].buf);
  taps.weights = static_cast<const int32_t*>(views[2].buf);
  taps.n = views[0].len / static_cast<Py_ssize_t>(sizeof(int32_t));
  taps.ksize = ksize;
  bool ok = views[1].len == views[0].len && ksize > 0 &&
            views[2].len == taps.n * ksize * static_cast<Py_ssize_t>(sizeof(int32_t));
  for (Py_ssize_t i = 0; ok && i < taps.n; i++)
    ok = taps.starts[i] >= 0 && taps.counts[i] >= 0 && taps.counts[i] <= ksize && taps.starts[i] + taps.counts[i] <= extent;
  if (!ok) PyErr_Format(PyExc_ValueError, "%s taps do not fit the region", name);
  return ok;
}

// resample_window(region, rows, cols, vertical_taps | None, horizontal_taps | None, vertical_first)
//   -> bytearray [out_rows, out_cols, 3]
PyObject* resample_window(PyObject*, PyObject* args) {
  Py_buffer region;
  Py_ssize_t rows, cols;
  PyObject *v_obj, *h_obj;
  int vertical_first;
  if (!PyArg_ParseTuple(args, "y*nnOOp", &region, &rows, &cols, &v_obj, &h_obj, &vertical_first)) return nullptr;
  Py_buffer v_views[3] = {}, h_views[3] = {};
  bool v_held = false, h_held = false;
  Taps v{}, h{};
  const bool has_v = v_obj != Py_None, has_h = h_obj != Py_None;
  PyObject* result = nullptr;
  bool ok = region.len == rows * cols * kChannels;
  if (!ok) PyErr_SetString(PyExc_ValueError, "region size does not match rows x cols x 3");
  if (ok && has_v) ok = parse_taps(v_obj, v_views, v_held, v, rows, "vertical");
  if (ok && has_h) ok = parse_taps(h_obj, h_views, h_held, h, cols, "horizontal");
  if (ok) {
    const Py_ssize_t out_rows = has_v ? v.n : rows, out_cols = has_h ? h.n : cols;
    result = PyByteArray_FromStringAndSize(nullptr, out_rows * out_cols * kChannels);
    if (result) {
      auto* out = reinterpret_cast<uint8_t*>(PyByteArray_AS_STRING(result));
      const auto* in = static_cast<const uint8_t*>(region.buf);
      Py_BEGIN_ALLOW_THREADS
      if (has_v && has_h) {
        const auto mid = scratch(vertical_first ? v.n * cols * kChannels : rows * h.n * kChannels);
        if (vertical_first) {
          vertical(in, cols, v, mid.get());
          horizontal(mid.get(), v.n, cols, h, out);
        } else {
          horizontal(in, rows, cols, h, mid.get());
          vertical(mid.get(), h.n, v, out);
        }
      } else if (has_v) {
        vertical(in, cols, v, out);
      } else if (has_h) {
        horizontal(in, rows, cols, h, out);
      } else {
        std::copy(in, in + region.len, out);
      }
      Py_END_ALLOW_THREADS
    }
  }
  for (int i = 0; i < 3; i++) {
    if (v_held) PyBuffer_Release(&v_views[i]);
    if (h_held) PyBuffer_Release(&h_views[i]);
  }
  PyBuffer_Release(&region);
  return result;
}

PyMethodDef methods[] = {
    {"resample_window", resample_window, METH_VARARGS,
     "resample_window(region, rows, cols, vertical_taps, horizontal_taps, vertical_first) -> bytearray"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "mirror_core._resample",
                      "Pillow's 8-bit bicubic passes for a window of the output, in integers.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__resample() { return PyModule_Create(&module); }

// Decode only a rectangle of a JPEG with libjpeg(-turbo) (the `mirror_core._jpegregion`
// extension module). The official preprocessing keeps a 224x224 crop of an image resized
// to short side 512: of a 1080p photo it reads about a quarter of the columns and half of
// the rows. libjpeg can skip whole scanlines (entropy decoding only: no inverse DCT,
// upsampling or colour conversion) and decode a horizontal band of each scanline
// (`jpeg_crop_scanline`), and stop after the last row needed.
//
// The pixels equal those of a full decode with the library's defaults (what Pillow asks
// for: ISLOW DCT, fancy upsampling), with one documented exception: the fancy chroma
// upsampling treats a partial band's left and right edges as image edges. The band is
// therefore widened by one iMCU on each side that is not an image edge (and the first row
// by one iMCU row of context), and the caller keeps only what it asked for.
//
// Anything unusual returns None instead of pixels, and the caller decodes the whole image
// with Pillow: a libjpeg error or warning (corrupt or truncated data: Pillow's own decode of
// such files is the reference), colour spaces other than YCbCr / RGB / greyscale (CMYK and
// YCCK need Pillow's inversion handling).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <csetjmp>
#include <cstdio>
#include <vector>

#include <jpeglib.h>

namespace {

struct ErrorManager {
  jpeg_error_mgr pub;
  std::jmp_buf jump;
  int warnings;
};

void on_error(j_common_ptr cinfo) {
  std::longjmp(reinterpret_cast<ErrorManager*>(cinfo->err)->jump, 1);
}

void on_message(j_common_ptr cinfo, int level) {
  if (level < 0) reinterpret_cast<ErrorManager*>(cinfo->err)->warnings++;  // >= 0: trace output
}

struct Region {
  JDIMENSION first_row = 0, first_col = 0, rows = 0, cols = 0;
};

// Decodes rows [y0, y1) and at least columns [x0, x1) (widened to what libjpeg decodes)
// into `pixels` (RGB, rows x cols). False: the caller must decode the whole image itself.
// No object with a destructor lives in this frame (longjmp would skip it): the buffers
// belong to the caller.
bool decode(const unsigned char* data, size_t size, JDIMENSION y0, JDIMENSION y1, JDIMENSION x0, JDIMENSION x1,
            std::vector<unsigned char>& pixels, std::vector<JSAMPROW>& row_ptrs, Region& region) {
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = on_error;
  err.pub.emit_message = on_message;
  err.warnings = 0;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  bool supported = (cinfo.num_components == 3 &&
                    (cinfo.jpeg_color_space == JCS_YCbCr || cinfo.jpeg_color_space == JCS_RGB)) ||
                   (cinfo.num_components == 1 && cinfo.jpeg_color_space == JCS_GRAYSCALE);
  if (!supported || y0 >= y1 || x0 >= x1 || y1 > cinfo.image_height || x1 > cinfo.image_width || err.warnings) {
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&cinfo);
  if (err.warnings) {  // a progressive file reads all its scans here: truncation shows now
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  const JDIMENSION mcu_w = cinfo.max_h_samp_factor * DCTSIZE, mcu_h = cinfo.max_v_samp_factor * DCTSIZE;
  JDIMENSION left = x0 > mcu_w ? x0 - mcu_w : 0;
  JDIMENSION right = x1 + mcu_w < cinfo.output_width ? x1 + mcu_w : cinfo.output_width;
  JDIMENSION width = right - left;
  if (left > 0 || width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &left, &width);
  const JDIMENSION top = y0 > mcu_h ? y0 - mcu_h : 0;
  if (top > 0) jpeg_skip_scanlines(&cinfo, top);
  region.first_row = top;
  region.first_col = left;
  region.rows = y1 - top;
  region.cols = cinfo.output_width;  // the band's width after jpeg_crop_scanline
  pixels.resize(static_cast<size_t>(region.rows) * region.cols * 3);
  row_ptrs.resize(region.rows);
  for (JDIMENSION r = 0; r < region.rows; r++) row_ptrs[r] = pixels.data() + static_cast<size_t>(r) * region.cols * 3;
  while (cinfo.output_scanline < y1)
    jpeg_read_scanlines(&cinfo, row_ptrs.data() + (cinfo.output_scanline - top), y1 - cinfo.output_scanline);
  const bool clean = err.warnings == 0;
  jpeg_abort_decompress(&cinfo);  // the rows below are never decoded
  jpeg_destroy_decompress(&cinfo);
  return clean;
}

// decode_region(data, y0, y1, x0, x1) -> (pixels: bytearray, first_row, first_col, rows, cols) | None
PyObject* decode_region(PyObject*, PyObject* args) {
  Py_buffer data;
  unsigned int y0, y1, x0, x1;
  if (!PyArg_ParseTuple(args, "y*IIII", &data, &y0, &y1, &x0, &x1)) return nullptr;
  std::vector<unsigned char> pixels;
  std::vector<JSAMPROW> row_ptrs;
  Region region;
  bool ok;
  Py_BEGIN_ALLOW_THREADS
  ok = decode(static_cast<const unsigned char*>(data.buf), static_cast<size_t>(data.len), y0, y1, x0, x1, pixels,
              row_ptrs, region);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&data);
  if (!ok) Py_RETURN_NONE;
  PyObject* out = PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(pixels.data()),
                                                static_cast<Py_ssize_t>(pixels.size()));  // writable for numpy
  if (!out) return nullptr;
  return Py_BuildValue("(NIIII)", out, region.first_row, region.first_col, region.rows, region.cols);
}

PyObject* library_version(PyObject*, PyObject*) {
#ifdef LIBJPEG_TURBO_VERSION_NUMBER
  return PyLong_FromLong(LIBJPEG_TURBO_VERSION_NUMBER);
#else
  return PyLong_FromLong(JPEG_LIB_VERSION);
#endif
}

PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, y0, y1, x0, x1) -> (rgb bytearray, first_row, first_col, rows, cols) or None"},
    {"library_version", library_version, METH_NOARGS, "The libjpeg(-turbo) version compiled against."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "mirror_core._jpegregion",
                      "Decode a rectangle of a JPEG with libjpeg.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__jpegregion() { return PyModule_Create(&module); }

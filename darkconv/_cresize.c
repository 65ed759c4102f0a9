/*
 * darkconv._cresize: Darknet's image preprocessing in C, bit for bit.
 *
 * One call does what detector test does to a decoded image (AlexeyAB src/image_opencv.cpp
 * mat_to_image, then src/image.c resize_image, optionally placed by letterbox_image's embed_image):
 *
 *   u8 -> float: (float)u8 / 255.0f  (a 256-entry table holding exactly those values)
 *   horizontal pass into a new_w x ih "part" image: (1-dx)*im[ix] + dx*im[ix+1], the last column copied;
 *   vertical pass: (1-dy)*part[iy], then + dy*part[iy+1] except on the last row;
 *   w_scale = (float)(iw-1)/(new_w-1), h_scale = (float)(ih-1)/(new_h-1), all in float32.
 *
 * Every product and sum is rounded to float32 where Darknet's C rounds it. This file must be compiled
 * without floating-point contraction or fast math (-ffp-contract=off -fno-fast-math, see setup.py): a fused
 * multiply-add would round (1-dy)*a + dy*b once instead of three times and change the last bit.
 *
 * Unlike Darknet, only the part rows the vertical pass reads are computed (two kept at a time), and the
 * three channels of an interleaved RGB row are done in one go: the same numbers, less work.
 * The GIL is released while it runs, so preprocessing threads run beside inference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

static float U8_TO_F32[256];

typedef struct {
    Py_ssize_t i0, i1; /* source indices, clamped to the edge (Darknet never reads past it) */
    float a, b;        /* 1 - d, d */
} tap;

/* Darknet's sample positions along one axis: s = i * ((float)(n_in-1)/(n_out-1)), i0 = (int)s, d = s - i0 */
static void axis_taps(Py_ssize_t n_in, Py_ssize_t n_out, tap *t)
{
    float scale = n_out > 1 ? (float)(n_in - 1) / (float)(n_out - 1) : 0.0f;
    for (Py_ssize_t i = 0; i < n_out; ++i) {
        float s = (float)i * scale;
        Py_ssize_t k = (Py_ssize_t)s;
        float d = s - (float)k;
        t[i].i0 = k < n_in - 1 ? k : n_in - 1;
        t[i].i1 = k + 1 < n_in - 1 ? k + 1 : n_in - 1;
        t[i].a = 1.0f - d;
        t[i].b = d;
    }
}

/* one row of the horizontal pass: interleaved RGB u8 (iw pixels) -> three planar float rows of w */
static void horizontal_row(const uint8_t *row, Py_ssize_t iw, Py_ssize_t w, const tap *tx, float *out)
{
    float *r = out, *g = out + w, *b = out + 2 * w;
    const uint8_t *last = row + 3 * (iw - 1);
    if (iw == 1) {
        for (Py_ssize_t c = 0; c < w; ++c) {
            r[c] = U8_TO_F32[last[0]];
            g[c] = U8_TO_F32[last[1]];
            b[c] = U8_TO_F32[last[2]];
        }
        return;
    }
    for (Py_ssize_t c = 0; c < w - 1; ++c) {
        const uint8_t *p0 = row + 3 * tx[c].i0, *p1 = row + 3 * tx[c].i1;
        const float wa = tx[c].a, wb = tx[c].b;
        float x, y;
        x = wa * U8_TO_F32[p0[0]]; y = wb * U8_TO_F32[p1[0]]; r[c] = x + y;
        x = wa * U8_TO_F32[p0[1]]; y = wb * U8_TO_F32[p1[1]]; g[c] = x + y;
        x = wa * U8_TO_F32[p0[2]]; y = wb * U8_TO_F32[p1[2]]; b[c] = x + y;
    }
    r[w - 1] = U8_TO_F32[last[0]];   /* the last column: a plain copy */
    g[w - 1] = U8_TO_F32[last[1]];
    b[w - 1] = U8_TO_F32[last[2]];
}

typedef struct {
    float *rows[2];
    Py_ssize_t which[2];  /* the part row held by each slot, -1 if none */
} row_cache;

/* part row y, computed once: output rows read part rows in non-decreasing order, so the slot to reuse is
 * the one holding the smaller (older) row, never the other row the current output row reads */
static const float *part_row(row_cache *cache, Py_ssize_t y, const uint8_t *src, Py_ssize_t iw, Py_ssize_t w,
                             const tap *tx)
{
    for (int s = 0; s < 2; ++s)
        if (cache->which[s] == y)
            return cache->rows[s];
    int s = cache->which[0] <= cache->which[1] ? 0 : 1;  /* the older row, or an empty slot */
    horizontal_row(src + 3 * iw * y, iw, w, tx, cache->rows[s]);
    cache->which[s] = y;
    return cache->rows[s];
}

static int resize_rgb(const uint8_t *src, Py_ssize_t ih, Py_ssize_t iw, float *dst, Py_ssize_t dst_h,
                      Py_ssize_t dst_w, Py_ssize_t w, Py_ssize_t h, Py_ssize_t off_x, Py_ssize_t off_y)
{
    tap *tx = malloc(sizeof(tap) * (size_t)(w + h));
    float *buf = malloc(sizeof(float) * (size_t)(6 * w));
    if (!tx || !buf) {
        free(tx);
        free(buf);
        return -1;
    }
    tap *ty = tx + w;
    axis_taps(iw, w, tx);
    axis_taps(ih, h, ty);
    row_cache cache = {{buf, buf + 3 * w}, {-1, -1}};
    const Py_ssize_t plane = dst_h * dst_w;
    for (Py_ssize_t r = 0; r < h; ++r) {
        const float *p0 = part_row(&cache, ty[r].i0, src, iw, w, tx);
        const int add = r != h - 1 && ih != 1;   /* add_pixel, except on the last row */
        const float *p1 = add ? part_row(&cache, ty[r].i1, src, iw, w, tx) : p0;
        const float a = ty[r].a, b = ty[r].b;
        for (int k = 0; k < 3; ++k) {
            float *o = dst + k * plane + (off_y + r) * dst_w + off_x;
            const float *q0 = p0 + k * w, *q1 = p1 + k * w;
            if (add) {
                for (Py_ssize_t c = 0; c < w; ++c) {
                    float x = a * q0[c];       /* set_pixel: (1-dy) * part[iy] */
                    float y = b * q1[c];       /* add_pixel: dy * part[iy+1] */
                    o[c] = x + y;
                }
            } else {
                for (Py_ssize_t c = 0; c < w; ++c)
                    o[c] = a * q0[c];
            }
        }
    }
    free(tx);
    free(buf);
    return 0;
}

PyDoc_STRVAR(resize_u8_doc,
"resize_u8(src, ih, iw, dst, dst_h, dst_w, w, h, off_x, off_y)\n--\n\n"
"resize_image(mat_to_image(src), w, h) written into dst[:, off_y:off_y+h, off_x:off_x+w].\n\n"
"src: C-contiguous uint8 ih x iw x 3 RGB; dst: C-contiguous float32 3 x dst_h x dst_w (writable).");

static PyObject *resize_u8(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    Py_ssize_t ih, iw, dst_h, dst_w, w, h, off_x, off_y;
    if (!PyArg_ParseTuple(args, "y*nnw*nnnnnn", &src, &ih, &iw, &dst, &dst_h, &dst_w, &w, &h, &off_x, &off_y))
        return NULL;
    const char *err = NULL;  /* products checked by division: no size can overflow into a passing check */
    if (ih < 1 || iw < 1 || w < 1 || h < 1 || dst_h < 1 || dst_w < 1)
        err = "sizes must be positive";
    else if (iw > PY_SSIZE_T_MAX / 3 / ih || src.len != ih * iw * 3)
        err = "src must hold ih * iw * 3 bytes";
    else if (dst_w > PY_SSIZE_T_MAX / 12 / dst_h || dst.len != dst_h * dst_w * 3 * (Py_ssize_t)sizeof(float))
        err = "dst must hold 3 * dst_h * dst_w float32";
    else if (off_x < 0 || off_y < 0 || w > dst_w || h > dst_h || off_x > dst_w - w || off_y > dst_h - h)
        err = "the resized image must fit inside dst";
    int rc = 0;
    if (!err) {
        Py_BEGIN_ALLOW_THREADS
        rc = resize_rgb((const uint8_t *)src.buf, ih, iw, (float *)dst.buf, dst_h, dst_w, w, h, off_x, off_y);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    if (rc)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"resize_u8", resize_u8, METH_VARARGS, resize_u8_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "darkconv._cresize",
    "Darknet's mat_to_image + resize_image (+ letterbox placement) in C, bit for bit, without the GIL.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__cresize(void)
{
    for (int i = 0; i < 256; ++i)
        U8_TO_F32[i] = (float)i / 255.0f;
    return PyModule_Create(&module);
}

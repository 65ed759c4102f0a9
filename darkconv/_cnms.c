/*
 * darkconv._cnms: Darknet's per-class greedy NMS (AlexeyAB src/box.c do_nms_sort / diounms_sort) in C,
 * for inputs with few candidates per class (a real image's detections at any threshold).
 *
 * The same numbers and the same decisions as darkconv.postprocess.nms_keep's NumPy path:
 *
 *   order per class c: prob[c] descending, then prob[c-1], ..., prob[0] descending, then candidate index --
 *     the order glibc's stable merge-sort qsort leaves after do_nms_sort's one sort per class;
 *   greedy: a (box, class) pair is suppressed iff a kept pair before it in that order overlaps it;
 *   overlap: box_iou > nms (default, cornersnms), and box_iou - (float)pow((double)(d / c), e) > nms for the
 *     DIoU kinds (box_diou: e = 0.6; box_diounms: e = beta_nms); all float32 as box.c computes it.
 *
 * Boxes with a non-finite coordinate overlap nothing (darkconv's rule: Darknet's result on them is undefined).
 * Must be compiled without floating-point contraction (-ffp-contract=off, see setup.py): a fused multiply-add
 * in a.w*a.h + b.w*b.h would round differently from Darknet. The GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    float x, y, l, r, t, b, area;   /* centre, box.c's overlap() edges (x -+ w/2), w*h */
} edges;

/* box_iou (src/box.c: overlap, box_intersection, box_union) */
static float box_iou(const edges *a, const edges *b)
{
    float left = a->l > b->l ? a->l : b->l;
    float right = a->r < b->r ? a->r : b->r;
    float top = a->t > b->t ? a->t : b->t;
    float bot = a->b < b->b ? a->b : b->b;
    float w = right - left, h = bot - top;
    float inter = (w < 0 || h < 0) ? 0.0f : w * h;
    float uni = a->area + b->area - inter;
    if (inter == 0 || uni == 0)
        return 0.0f;
    return inter / uni;
}

/* box_diou (exponent 0.6) / box_diounms (exponent beta_nms), given their box_iou */
static float box_diou(const edges *a, const edges *b, float iou, double exponent)
{
    float cw = (a->r > b->r ? a->r : b->r) - (a->l < b->l ? a->l : b->l);   /* box_c: fmax / fmin edges */
    float ch = (a->b > b->b ? a->b : b->b) - (a->t < b->t ? a->t : b->t);
    float c = cw * cw + ch * ch;
    if (c == 0)
        return iou;
    float dx = a->x - b->x, dy = a->y - b->y;
    float d = dx * dx + dy * dy;
    float u = (float)pow((double)(d / c), exponent);
    return iou - u;
}

/* Darknet's "does a suppress b" test, without the order */
static int overlaps(const edges *a, const edges *b, float thr, int diou, double exponent)
{
    float iou = box_iou(a, b);
    if (!(iou > thr))
        return 0;                   /* DIoU <= IoU: it cannot pass either */
    return !diou || box_diou(a, b, iou, exponent) > thr;
}

static void box_edges(const float *q, edges *e)
{
    float w2 = q[2] / 2, h2 = q[3] / 2;
    e->x = q[0];
    e->y = q[1];
    e->l = q[0] - w2;
    e->r = q[0] + w2;
    e->t = q[1] - h2;
    e->b = q[1] + h2;
    e->area = q[2] * q[3];
}

typedef struct {
    const float *probs;
    Py_ssize_t classes, cls;
} order_ctx;

/* does candidate a come before candidate b in the array do_nms_sort walks for class ctx->cls? */
static int before(const order_ctx *o, int32_t a, int32_t b)
{
    const float *pa = o->probs + (Py_ssize_t)a * o->classes, *pb = o->probs + (Py_ssize_t)b * o->classes;
    for (Py_ssize_t j = o->cls; j >= 0; --j) {
        if (pa[j] > pb[j])
            return 1;
        if (pa[j] < pb[j])
            return 0;
    }
    return a < b;
}

/* sort by before() (a strict total order: the result does not depend on the algorithm) */
static void sort_items(int32_t *v, int32_t *tmp, Py_ssize_t n, const order_ctx *o)
{
    if (n <= 16) {
        for (Py_ssize_t i = 1; i < n; ++i) {
            int32_t x = v[i];
            Py_ssize_t j = i;
            for (; j > 0 && before(o, x, v[j - 1]); --j)
                v[j] = v[j - 1];
            v[j] = x;
        }
        return;
    }
    Py_ssize_t h = n / 2, i = 0, j = h, k = 0;
    sort_items(v, tmp, h, o);
    sort_items(v + h, tmp, n - h, o);
    while (i < h && j < n)
        tmp[k++] = before(o, v[j], v[i]) ? v[j++] : v[i++];
    while (i < h)
        tmp[k++] = v[i++];
    while (j < n)
        tmp[k++] = v[j++];
    for (k = 0; k < n; ++k)
        v[k] = tmp[k];
}

static int nms(const float *boxes, const float *probs, Py_ssize_t n, Py_ssize_t classes, float thr, int diou,
               double exponent, uint8_t *keep)
{
    edges *e = malloc(sizeof(edges) * (size_t)(n ? n : 1));
    uint8_t *finite = malloc((size_t)(n ? n : 1));
    int32_t *items = malloc(sizeof(int32_t) * (size_t)(3 * (n ? n : 1)));
    if (!e || !finite || !items) {
        free(e);
        free(finite);
        free(items);
        return -1;
    }
    int32_t *tmp = items + n, *kept = items + 2 * n;
    for (Py_ssize_t i = 0; i < n; ++i) {
        const float *q = boxes + 4 * i;
        box_edges(q, &e[i]);
        finite[i] = isfinite(q[0]) && isfinite(q[1]) && isfinite(q[2]) && isfinite(q[3]);
    }
    for (Py_ssize_t i = 0; i < n * classes; ++i)
        keep[i] = probs[i] != 0;    /* every candidate pair, unless suppressed below */
    order_ctx o = {probs, classes, 0};
    for (Py_ssize_t c = 0; c < classes; ++c) {
        Py_ssize_t m = 0, nk = 0;
        for (Py_ssize_t i = 0; i < n; ++i)
            if (finite[i] && probs[i * classes + c] > 0)
                items[m++] = (int32_t)i;
        if (m < 2)
            continue;
        o.cls = c;
        sort_items(items, tmp, m, &o);
        for (Py_ssize_t s = 0; s < m; ++s) {
            int32_t x = items[s];
            int hit = 0;
            for (Py_ssize_t k = 0; k < nk && !hit; ++k)
                hit = overlaps(&e[kept[k]], &e[x], thr, diou, exponent);
            if (hit)
                keep[(Py_ssize_t)x * classes + c] = 0;
            else
                kept[nk++] = x;
        }
    }
    free(e);
    free(finite);
    free(items);
    return 0;
}

/* how every entry point ends: the ValueError of a failed argument check, a MemoryError, or None */
static PyObject *finish(const char *err, int rc)
{
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    if (rc)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(nms_keep_doc,
"nms_keep(boxes, probs, n, classes, thr, diou, exponent, keep)\n--\n\n"
"Darknet's per-class greedy NMS: keep[i, c] = 1 iff probs[i, c] != 0 and no kept pair ranked before it in\n"
"class c overlaps box i by more than thr.\n\n"
"boxes: C-contiguous float32 n x 4 (x, y, w, h); probs: C-contiguous float32 n x classes;\n"
"diou: 0 for box_iou, 1 for box_iou - pow(d / c, exponent); keep: writable C-contiguous uint8 n x classes.");

static PyObject *nms_keep(PyObject *self, PyObject *args)
{
    Py_buffer boxes, probs, keep;
    Py_ssize_t n, classes;
    float thr;
    int diou;
    double exponent;
    if (!PyArg_ParseTuple(args, "y*y*nnfpdw*", &boxes, &probs, &n, &classes, &thr, &diou, &exponent, &keep))
        return NULL;
    const char *err = NULL;  /* products checked by division: no size can overflow into a passing check */
    if (n < 0 || classes < 0)
        err = "sizes must not be negative";
    else if (n > INT32_MAX || n > PY_SSIZE_T_MAX / 16 || boxes.len != n * 4 * (Py_ssize_t)sizeof(float))
        err = "boxes must hold n * 4 float32 (n < 2**31)";
    else if (classes && n > PY_SSIZE_T_MAX / 4 / classes)
        err = "probs must hold n * classes float32";
    else if (probs.len != n * classes * (Py_ssize_t)sizeof(float))
        err = "probs must hold n * classes float32";
    else if (keep.len != n * classes)
        err = "keep must hold n * classes bytes";
    int rc = 0;
    if (!err) {
        Py_BEGIN_ALLOW_THREADS
        rc = nms((const float *)boxes.buf, (const float *)probs.buf, n, classes, thr, diou, exponent,
                 (uint8_t *)keep.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&boxes);
    PyBuffer_Release(&probs);
    PyBuffer_Release(&keep);
    return finish(err, rc);
}

/* Darknet's listing order of kept (box, class) pairs given in (box, class) order: boxes by before() for the last
 * class (the order do_nms_sort's last sort leaves), then each box's classes ascending; rank[i] = pair i's place */
static int pair_ranks(const float *probs, Py_ssize_t classes, const int64_t *box, Py_ssize_t m, int64_t *rank)
{
    Py_ssize_t runs = 0;                 /* the pairs of one box are one run: pairs come in (box, class) order */
    for (Py_ssize_t i = 0; i < m; ++i)
        runs += i == 0 || box[i] != box[i - 1];
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(2 * (runs ? runs : 1)));
    Py_ssize_t *start = malloc(sizeof(Py_ssize_t) * (size_t)(runs + 1));
    if (!ids || !start) {
        free(ids);
        free(start);
        return -1;
    }
    Py_ssize_t r = 0;
    for (Py_ssize_t i = 0; i < m; ++i)
        if (i == 0 || box[i] != box[i - 1]) {
            start[r] = i;
            ids[r++] = (int32_t)box[i];
        }
    start[runs] = m;
    order_ctx o = {probs, classes, classes - 1};
    sort_items(ids, ids + runs, runs, &o);
    Py_ssize_t pos = 0;
    for (Py_ssize_t k = 0; k < runs; ++k) {
        Py_ssize_t lo = 0, hi = runs - 1;     /* the run of box ids[k]: runs are in increasing box order */
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi) / 2;
            if (box[start[mid]] < ids[k])
                lo = mid + 1;
            else
                hi = mid;
        }
        for (Py_ssize_t i = start[lo]; i < start[lo + 1]; ++i)
            rank[i] = pos++;
    }
    free(ids);
    free(start);
    return 0;
}

PyDoc_STRVAR(pair_ranks_doc,
"pair_ranks(probs, n, classes, box, cls, m, rank)\n--\n\n"
"rank[i]: the place of kept pair (box[i], cls[i]) in the order Darknet lists detections after NMS (boxes as\n"
"do_nms_sort's last per-class sort leaves them, then classes ascending). probs: C-contiguous float32 n x classes\n"
"(pre-NMS); box, cls: C-contiguous int64 m, sorted by (box, class) without repeats; rank: writable int64 m.");

static PyObject *pair_ranks_py(PyObject *self, PyObject *args)
{
    Py_buffer probs, box, cls, rank;
    Py_ssize_t n, classes, m;
    if (!PyArg_ParseTuple(args, "y*nny*y*nw*", &probs, &n, &classes, &box, &cls, &m, &rank))
        return NULL;
    const char *err = NULL;
    if (n < 0 || classes < 0 || m < 0)
        err = "sizes must not be negative";
    else if (n > INT32_MAX || (classes && n > PY_SSIZE_T_MAX / 4 / classes)
             || probs.len != n * classes * (Py_ssize_t)sizeof(float))
        err = "probs must hold n * classes float32 (n < 2**31)";
    else if (m > PY_SSIZE_T_MAX / 8 || box.len != m * 8 || cls.len != m * 8 || rank.len != m * 8)
        err = "box, cls and rank must hold m int64";
    else {
        const int64_t *b = box.buf, *c = cls.buf;
        for (Py_ssize_t i = 0; i < m && !err; ++i) {
            if (b[i] < 0 || b[i] >= n || c[i] < 0 || c[i] >= classes)
                err = "box and cls must index probs";
            else if (i && (b[i] < b[i - 1] || (b[i] == b[i - 1] && c[i] <= c[i - 1])))
                err = "pairs must be sorted by (box, class) without repeats";
        }
    }
    int rc = 0;
    if (!err) {
        Py_BEGIN_ALLOW_THREADS
        rc = pair_ranks((const float *)probs.buf, classes, (const int64_t *)box.buf, m, (int64_t *)rank.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&probs);
    PyBuffer_Release(&box);
    PyBuffer_Release(&cls);
    PyBuffer_Release(&rank);
    return finish(err, rc);
}

PyDoc_STRVAR(overlap_values_doc,
"overlap_values(a, b, n, diou, exponent, out)\n--\n\n"
"out[i] = the float32 box_iou (diou 0) or box_diou / box_diounms (diou 1) of boxes a[i] and b[i], as nms_keep\n"
"computes it (for tests). a, b: C-contiguous float32 n x 4; out: writable C-contiguous float32 n.");

static PyObject *overlap_values(PyObject *self, PyObject *args)
{
    Py_buffer a, b, out;
    Py_ssize_t n;
    int diou;
    double exponent;
    if (!PyArg_ParseTuple(args, "y*y*npdw*", &a, &b, &n, &diou, &exponent, &out))
        return NULL;
    const char *err = NULL;
    if (n < 0 || n > PY_SSIZE_T_MAX / 16 || a.len != n * 4 * (Py_ssize_t)sizeof(float) || b.len != a.len
        || out.len != n * (Py_ssize_t)sizeof(float))
        err = "a and b must hold n * 4 float32, out n float32";
    else {
        const float *pa = a.buf, *pb = b.buf;
        float *o = out.buf;
        for (Py_ssize_t i = 0; i < n; ++i) {
            edges ea, eb;
            box_edges(pa + 4 * i, &ea);
            box_edges(pb + 4 * i, &eb);
            float iou = box_iou(&ea, &eb);
            o[i] = diou ? box_diou(&ea, &eb, iou, exponent) : iou;
        }
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&out);
    return finish(err, 0);
}

static PyMethodDef methods[] = {
    {"nms_keep", nms_keep, METH_VARARGS, nms_keep_doc},
    {"overlap_values", overlap_values, METH_VARARGS, overlap_values_doc},
    {"pair_ranks", pair_ranks_py, METH_VARARGS, pair_ranks_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "darkconv._cnms",
    "Darknet's per-class greedy NMS (do_nms_sort / diounms_sort) in C, the same decisions, without the GIL.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__cnms(void)
{
    return PyModule_Create(&module);
}

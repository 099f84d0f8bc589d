/* The compiled reader of ftdp JSON lines (see lines.py for the readers and their roles).
 *
 * scan(buf, starts, ends, counts, tokens, ok): for every line buf[starts[i]:ends[i]],
 * parse it as one JSON object, check it strictly, and copy its "tokens" list into
 * tokens (int32) at the running sum of counts; ok[i] says whether the line was vouched
 * for.  A line it does not vouch for is left to json.loads (lines.parse_line_exact),
 * which reads the odd but valid lines and names what is wrong with the others.  So the
 * rule here is: accept only what json.loads reads, with the same tokens; refuse
 * (ok = 0) what needs more thought:
 *   - NaN, Infinity, -Infinity (json.loads takes them), numbers of 4000+ characters
 *     (int() refuses 4300+ digits), nesting deeper than MAX_DEPTH;
 *   - tokens that are not JSON integers within int32 (|id| <= 2**31 - 1), or not
 *     exactly counts[i] of them.
 * Strings are checked as json.loads does: valid UTF-8 (Python's strict decoder), no raw
 * control characters, escapes from the JSON set with four hex digits after \u.  Keys are
 * compared with "tokens" as decoded ("tok\u0065ns" is one); of two "tokens" keys the
 * last one counts, as for json.loads.
 * The GIL is released while lines are parsed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 512
#define MAX_NUMBER_CHARS 4000
#define INT32_LIMIT 2147483647u

typedef const unsigned char *cursor;

static inline int is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static inline int is_digit(unsigned char c) { return (unsigned char)(c - '0') < 10; }

static inline cursor skip_space(cursor p, cursor end) {
    while (p < end && is_space(*p)) p++;
    return p;
}

static inline int in_range(unsigned char c, unsigned char lo, unsigned char hi) {
    return c >= lo && c <= hi;
}

/* The length of the UTF-8 sequence at p (its lead byte >= 0x80), or 0 where Python's
 * strict decoder refuses it: overlong forms, surrogates, code points past U+10FFFF. */
static int utf8_length(cursor p, cursor end) {
    unsigned char c = p[0];
    Py_ssize_t left = end - p;
    if (in_range(c, 0xC2, 0xDF))
        return left >= 2 && in_range(p[1], 0x80, 0xBF) ? 2 : 0;
    if (in_range(c, 0xE0, 0xEF)) {
        unsigned char lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
        return left >= 3 && in_range(p[1], lo, hi) && in_range(p[2], 0x80, 0xBF) ? 3 : 0;
    }
    if (in_range(c, 0xF0, 0xF4)) {
        unsigned char lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
        return left >= 4 && in_range(p[1], lo, hi) && in_range(p[2], 0x80, 0xBF) &&
               in_range(p[3], 0x80, 0xBF) ? 4 : 0;
    }
    return 0;
}

static inline int is_hex(unsigned char c) {
    return is_digit(c) || in_range(c, 'a', 'f') || in_range(c, 'A', 'F');
}

/* p just past a string's opening quote: returns just past its closing quote, or NULL.
 * *escaped is set when the string holds a backslash escape. */
static cursor skip_string(cursor p, cursor end, int *escaped) {
    while (p < end) {
        unsigned char c = *p;
        if (c == '"') return p + 1;
        if (c == '\\') {
            *escaped = 1;
            if (++p >= end) return NULL;
            c = *p;
            if (c == 'u') {
                if (end - p < 5 || !is_hex(p[1]) || !is_hex(p[2]) || !is_hex(p[3]) ||
                    !is_hex(p[4]))
                    return NULL;
                p += 5;
            } else if (strchr("\"\\/bfnrt", c) != NULL && c != 0) {
                p++;
            } else {
                return NULL;
            }
        } else if (c < 0x20) {
            return NULL;
        } else if (c < 0x80) {
            p++;
        } else {
            int n = utf8_length(p, end);
            if (n == 0) return NULL;
            p += n;
        }
    }
    return NULL;
}

/* A JSON number, -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?: returns just past it. */
static cursor skip_number(cursor p, cursor end) {
    cursor start = p;
    if (p < end && *p == '-') p++;
    if (p >= end) return NULL;
    if (*p == '0') {
        p++;
    } else if (is_digit(*p)) {
        while (p < end && is_digit(*p)) p++;
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        if (++p >= end || !is_digit(*p)) return NULL;
        while (p < end && is_digit(*p)) p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || !is_digit(*p)) return NULL;
        while (p < end && is_digit(*p)) p++;
    }
    return p - start >= MAX_NUMBER_CHARS ? NULL : p;
}

static cursor skip_literal(cursor p, cursor end, const char *word, size_t size) {
    return (size_t)(end - p) >= size && memcmp(p, word, size) == 0 ? p + size : NULL;
}

static int hex_value(unsigned char c) {
    return is_digit(c) ? c - '0' : (c | 0x20) - 'a' + 10;
}

/* Whether the key key[0:size] (between its quotes, valid as skip_string checked it)
 * decodes to "tokens". */
static int key_is_tokens(cursor key, Py_ssize_t size) {
    static const char wanted[] = "tokens";
    int got = 0;
    cursor p = key, end = key + size;
    while (p < end) {
        unsigned int c = *p++;
        if (c == '\\') {
            if (*p++ != 'u') return 0;  /* \" \\ \/ \b ... decode to no letter of "tokens" */
            c = (unsigned int)(hex_value(p[0]) << 12 | hex_value(p[1]) << 8 |
                               hex_value(p[2]) << 4 | hex_value(p[3]));
            p += 4;
        }
        if (got == 6 || c != (unsigned char)wanted[got]) return 0;
        got++;
    }
    return got == 6;
}

static cursor skip_value(cursor p, cursor end, int depth);

/* p at '{' or '[': returns just past the matching '}' or ']', or NULL. */
static cursor skip_container(cursor p, cursor end, int depth) {
    int object = *p == '{';
    unsigned char close = object ? '}' : ']';
    int escaped = 0;
    if (depth >= MAX_DEPTH) return NULL;
    p = skip_space(p + 1, end);
    if (p < end && *p == close) return p + 1;
    for (;;) {
        if (object) {
            if (p >= end || *p != '"' || !(p = skip_string(p + 1, end, &escaped))) return NULL;
            p = skip_space(p, end);
            if (p >= end || *p != ':') return NULL;
            p = skip_space(p + 1, end);
        }
        if (!(p = skip_value(p, end, depth + 1))) return NULL;
        p = skip_space(p, end);
        if (p >= end) return NULL;
        if (*p == close) return p + 1;
        if (*p != ',') return NULL;
        p = skip_space(p + 1, end);
    }
}

static cursor skip_value(cursor p, cursor end, int depth) {
    int escaped = 0;
    if (p >= end) return NULL;
    switch (*p) {
    case '"': return skip_string(p + 1, end, &escaped);
    case '{': case '[': return skip_container(p, end, depth);
    case 't': return skip_literal(p, end, "true", 4);
    case 'f': return skip_literal(p, end, "false", 5);
    case 'n': return skip_literal(p, end, "null", 4);
    default: return skip_number(p, end);  /* NULL for NaN, Infinity and the malformed */
    }
}

/* p at a token's digits (after its minus sign): their value and the end of the run, or
 * NULL unless there are 1 to 10 digits, without a leading zero, within the line.  Runs
 * of up to 7 digits take one 8-byte load (limit: where loads must stop, the buffer's
 * end), no branch per digit. */
static inline cursor read_digits(cursor p, cursor end, cursor limit, uint64_t *value) {
#if PY_LITTLE_ENDIAN && defined(__GNUC__)
    if (limit - p >= 8) {
        uint64_t word, nondigit;
        memcpy(&word, p, 8);
        word ^= 0x3030303030303030ull;  /* the bytes of digits become their values, 0-9 */
        /* The high bit of each byte that is not a digit (a carry out of such a byte
         * only touches bytes after the first one flagged). */
        nondigit = ((word + 0x7676767676767676ull) | word) & 0x8080808080808080ull;
        if (nondigit) {
            int size = __builtin_ctzll(nondigit) >> 3;
            if (size == 0 || (size > 1 && *p == '0') || p + size > end) return NULL;
            /* The digits to the top bytes, zeros below; then pairs, quads, all eight
             * combined by multiply-shift rounds. */
            word <<= 8 * (8 - size);
            word = ((word * 2561) >> 8) & 0x00FF00FF00FF00FFull;
            word = ((word * 6553601) >> 16) & 0x0000FFFF0000FFFFull;
            *value = (word * 42949672960001ull) >> 32;
            return p + size;
        }
    }
#endif
    {
        uint64_t v;
        int digits = 1;
        if (p >= end || !is_digit(*p)) return NULL;
        v = (uint64_t)(*p++ - '0');
        if (v != 0) {
            while (p < end && is_digit(*p)) {
                if (++digits > 10) return NULL;
                v = v * 10 + (uint64_t)(*p++ - '0');
            }
        }
        *value = v;
        return p;
    }
}

/* p at the '[' of the tokens list: exactly `expected` JSON integers, each within int32,
 * written to out.  Returns just past the ']', or NULL. */
static cursor read_tokens(cursor p, cursor end, cursor limit, int32_t *out, int64_t expected) {
    int64_t count = 0;
    if (p >= end || *p != '[') return NULL;
    p = skip_space(p + 1, end);
    if (p < end && *p == ']') return expected == 0 ? p + 1 : NULL;
    for (;;) {
        int negative = 0;
        uint64_t value;
        if (count == expected) return NULL;
        if (p < end && *p == '-') {
            negative = 1;
            p++;
        }
        if (!(p = read_digits(p, end, limit, &value)) || value > INT32_LIMIT) return NULL;
        out[count++] = negative ? -(int32_t)value : (int32_t)value;
        /* Only whitespace, ',' or ']' may follow: a float (1.0, 1e3) or a leading zero (01)
         * is refused here. */
        p = skip_space(p, end);
        if (p >= end) return NULL;
        if (*p == ']') return count == expected ? p + 1 : NULL;
        if (*p != ',') return NULL;
        p = skip_space(p + 1, end);
    }
}

/* One line: 1 when it is a JSON object whose "tokens" key holds exactly `expected`
 * int32 tokens (written to out), 0 when json.loads must decide. */
static int read_line(cursor p, cursor end, cursor limit, int32_t *out, int64_t expected) {
    int found = 0;
    p = skip_space(p, end);
    if (p >= end || *p != '{') return 0;
    p = skip_space(p + 1, end);
    for (;;) {
        cursor key;
        int escaped = 0;
        if (p >= end || *p != '"') return 0;
        key = p + 1;
        if (!(p = skip_string(key, end, &escaped))) return 0;
        int is_tokens = escaped ? key_is_tokens(key, p - 1 - key)
                                : p - 1 - key == 6 && memcmp(key, "tokens", 6) == 0;
        p = skip_space(p, end);
        if (p >= end || *p != ':') return 0;
        p = skip_space(p + 1, end);
        if (is_tokens) {
            /* A later "tokens" key overwrites an earlier one, as json.loads keeps the last. */
            found = 1;
            p = read_tokens(p, end, limit, out, expected);
        } else {
            p = skip_value(p, end, 1);
        }
        if (!p) return 0;
        p = skip_space(p, end);
        if (p >= end) return 0;
        if (*p == '}') break;
        if (*p != ',') return 0;
        p = skip_space(p + 1, end);
    }
    return found && skip_space(p + 1, end) == end;
}

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, int writable,
                      const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "scan: %s must hold %zd-byte items, got %zd-byte items",
                     name, itemsize, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *objects[6];
    static const char *names[6] = {"buf", "starts", "ends", "counts", "tokens", "ok"};
    static const Py_ssize_t sizes[6] = {1, 8, 8, 8, 4, 1};
    Py_buffer views[6];
    int held = 0;
    Py_ssize_t i;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOO:scan", &objects[0], &objects[1], &objects[2],
                          &objects[3], &objects[4], &objects[5]))
        return NULL;
    for (; held < 6; held++)
        if (get_buffer(objects[held], &views[held], sizes[held], held >= 4, names[held]) < 0)
            goto done;
    {
        cursor buf = views[0].buf;
        const int64_t *starts = views[1].buf, *ends = views[2].buf, *counts = views[3].buf;
        int32_t *tokens = views[4].buf;
        unsigned char *ok = views[5].buf;
        Py_ssize_t lines = views[1].len / 8, size = views[0].len, room = views[4].len / 4;
        int64_t place = 0;
        if (views[2].len / 8 != lines || views[3].len / 8 != lines || views[5].len != lines) {
            PyErr_SetString(PyExc_ValueError,
                            "scan: starts, ends, counts and ok must have one item per line");
            goto done;
        }
        for (i = 0; i < lines; i++) {
            if (starts[i] < 0 || starts[i] > ends[i] || ends[i] > size || counts[i] < 0) {
                PyErr_Format(PyExc_ValueError,
                             "scan: line %zd spans [%lld, %lld) with %lld tokens, outside "
                             "the %zd-byte buffer or negative", i, (long long)starts[i],
                             (long long)ends[i], (long long)counts[i], size);
                goto done;
            }
            place += counts[i];
        }
        if (place > room) {
            PyErr_Format(PyExc_ValueError, "scan: tokens holds %zd items, the counts add up "
                         "to %lld", room, (long long)place);
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS
        place = 0;
        for (i = 0; i < lines; i++) {
            ok[i] = (unsigned char)read_line(buf + starts[i], buf + ends[i], buf + size,
                                             tokens + place, counts[i]);
            place += counts[i];
        }
        Py_END_ALLOW_THREADS
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    while (held > 0) PyBuffer_Release(&views[--held]);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(buf, starts, ends, counts, tokens, ok): parse ftdp lines buf[starts[i]:ends[i]] "
     "(uint8 buf; int64 starts, ends, counts) into tokens (int32, each line's tokens at the "
     "running sum of counts); ok[i] (one byte) says whether line i was read (1) or is left "
     "to json.loads (0)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ftdp_lines",
    "The compiled reader of ftdp JSON lines (xtuner_patch.dataset.lines).", -1, methods,
};

PyMODINIT_FUNC PyInit__ftdp_lines(void) { return PyModule_Create(&module); }

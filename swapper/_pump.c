/* A stream's pieces from a child's connection to the client's, in a thread of their own.
 *
 * Why C: relayed by the event loop, a streamed token costs the supervisor an epoll wake-up, a
 * callback and a few Python calls, 32 µs of CPU in all; relayed here, 22-24 (bench/PROFILE.md).
 * Here a thread without the GIL polls the two sockets, passes each piece on as it comes and
 * follows the chunk framing to find the answer's end, keeping the payload's last bytes for the
 * usage record. The piece that ends the answer, and anything it is not sure of, it hands back
 * to relay.py, which carries on where it stopped: a framing it does not read strictly, a client
 * that cannot take a piece at once, a client that closes, a child that closes or goes silent, or
 * a stop asked for. Its threads are kept for the next stream (see `worker_main`).
 *
 * The event loop keeps both sockets but neither reads nor writes them while the pump runs
 * (relay.py pauses both transports and starts the pump only when the client's write buffer is
 * empty), and nothing closes them before `join` returns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

/* where a chunked body is: the same numbers as relay.py's _SIZE, _DATA, _DATA_END, _TRAILER */
enum { S_SIZE, S_DATA, S_DATA_END, S_TRAILER };

/* why the pump stopped */
enum {
    R_HANDBACK,  /* `rest` is a piece read and not passed on: relay.py takes it from here */
    R_BLOCKED,   /* `rest` is what the client could not take at once (its framing was read) */
    R_CLIENT,    /* the client closed its end, or its connection failed */
    R_EOF,       /* the child closed its connection inside the answer */
    R_ERROR,     /* the child's connection failed (`error` is the errno) */
    R_SILENT,    /* no byte from the child for the read timeout */
    R_STOPPED,   /* `stop` was asked */
};

#define READ_SIZE 65536
#define MAX_LINE 4096
#define TAIL_KEEP 16384

typedef struct Pump {
    PyObject_HEAD
    int up, down, wake;
    int timeout_ms;
    /* the framing where the pump is */
    int state;
    long long left;
    char line[MAX_LINE];
    size_t line_len;
    /* the payload's last bytes, for the usage record (kept between TAIL_KEEP and twice that) */
    char *tail;
    size_t tail_len;
    /* what stopped the pump */
    int result, error;
    char *rest;
    size_t rest_len;
    unsigned long long pieces;  /* passed on */
    PyObject *on_stop;
    /* its place among the threads (under `mu`) */
    struct Pump *next;
    int phase, stop_asked, stop_seen;
} Pump;

enum { P_NEW, P_QUEUED, P_RUNNING, P_OVER };

static void tail_add(Pump *p, const char *d, size_t n) {
    if (n >= TAIL_KEEP) {
        memcpy(p->tail, d + n - TAIL_KEEP, TAIL_KEEP);
        p->tail_len = TAIL_KEEP;
        return;
    }
    if (p->tail_len + n > 2 * TAIL_KEEP) {
        size_t keep = TAIL_KEEP - n;
        memmove(p->tail, p->tail + p->tail_len - keep, keep);
        p->tail_len = keep;
    }
    memcpy(p->tail + p->tail_len, d, n);
    p->tail_len += n;
}

/* a chunk-size line as relay.py reads it, but strictly: hex digits, then nothing or an extension */
static int size_line(const char *s, size_t n, long long *size) {
    size_t i = 0;
    long long v = 0;
    for (; i < n; i++) {
        char c = s[i];
        int d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else break;
        if (i >= 15) return 0;
        v = v * 16 + d;
    }
    if (i == 0 || (i < n && s[i] != ';')) return 0;
    *size = v;
    return 1;
}

/* Follows the framing over one piece (its payload kept in the tail when `keep`). 1: read; 0: the
 * piece holds the answer's end, or something not read strictly here (a loose size line, a long
 * line): it is handed back. The answer's end goes through relay.py, so that the request is over
 * there before the client has all of it. */
static int frame(Pump *p, const char *d, size_t n, int keep) {
    size_t pos = 0;
    while (pos < n) {
        switch (p->state) {
        case S_DATA: {
            size_t take = (size_t)p->left < n - pos ? (size_t)p->left : n - pos;
            if (keep) tail_add(p, d + pos, take);
            pos += take;
            p->left -= take;
            if (!p->left) { p->state = S_DATA_END; p->left = 2; }
            break;
        }
        case S_DATA_END: {
            size_t take = (size_t)p->left < n - pos ? (size_t)p->left : n - pos;
            if (memcmp(d + pos, "\r\n" + (2 - p->left), take) != 0) return 0;
            pos += take;
            p->left -= take;
            if (!p->left) p->state = S_SIZE;
            break;
        }
        case S_SIZE:
        case S_TRAILER: {
            const char *eol = memchr(d + pos, '\n', n - pos);
            size_t take = eol ? (size_t)(eol - (d + pos)) : n - pos;
            if (p->line_len + take > MAX_LINE) return 0;
            memcpy(p->line + p->line_len, d + pos, take);
            p->line_len += take;
            if (!eol) return 1;
            pos += take + 1;
            size_t len = p->line_len;
            p->line_len = 0;
            if (len && p->line[len - 1] == '\r') len--;
            if (p->state == S_SIZE) {
                long long size;
                if (!size_line(p->line, len, &size)) return 0;
                if (size) { p->state = S_DATA; p->left = size; }
                else p->state = S_TRAILER;
            } else if (!len) {
                return 0;
            }
            break;
        }
        default:
            return 0;
        }
    }
    return 1;
}

static void stop_with(Pump *p, int result, const char *rest, size_t n) {
    p->result = result;
    if (n) {
        p->rest = malloc(n);
        if (p->rest) { memcpy(p->rest, rest, n); p->rest_len = n; }
    }
}

static void run(Pump *p, char *buf, int wake) {
    char saved_line[MAX_LINE];
    for (;;) {
        struct pollfd fds[3] = {{p->up, POLLIN, 0}, {p->down, POLLRDHUP, 0}, {wake, POLLIN, 0}};
        int r = poll(fds, 3, p->timeout_ms);
        if (r < 0) {
            if (errno == EINTR) continue;
            p->result = R_ERROR; p->error = errno; break;
        }
        if (r == 0) { p->result = R_SILENT; break; }
        if (fds[2].revents) {
            uint64_t n;
            if (read(wake, &n, sizeof n) == sizeof n) p->stop_seen = 1;
            p->result = R_STOPPED;
            break;
        }
        if (fds[1].revents) { p->result = R_CLIENT; break; }
        if (!fds[0].revents) continue;
        ssize_t n = recv(p->up, buf, READ_SIZE, 0);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
            p->result = R_ERROR; p->error = errno; break;
        }
        if (n == 0) { p->result = R_EOF; break; }
        /* the framing as it was, for a piece handed back unread */
        int state = p->state;
        long long left = p->left;
        size_t line_len = p->line_len;
        if (line_len) memcpy(saved_line, p->line, line_len);
        int ok = frame(p, buf, (size_t)n, 0);  /* first without touching the tail */
        p->state = state; p->left = left; p->line_len = line_len;
        if (line_len) memcpy(p->line, saved_line, line_len);
        if (!ok) {
            stop_with(p, R_HANDBACK, buf, (size_t)n);
            break;
        }
        frame(p, buf, (size_t)n, 1);  /* the same again (a piece is a few hundred bytes), its payload kept */
        p->pieces++;
        size_t sent = 0;
        while (sent < (size_t)n) {
            ssize_t k = send(p->down, buf + sent, (size_t)n - sent, MSG_NOSIGNAL);
            if (k >= 0) { sent += (size_t)k; continue; }
            if (errno == EINTR) continue;
            break;
        }
        if (sent < (size_t)n) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) stop_with(p, R_BLOCKED, buf + sent, (size_t)n - sent);
            else p->result = R_CLIENT;
            break;
        }
    }
}

/* The pumps' threads: started as streams need them and kept (a thread per stream would cost a
 * clone, a stack and its page faults every time), each with its read buffer, its wake-up
 * eventfd and its Python thread state, waiting on `work` for the next pump. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER;  /* a pump queued */
static pthread_cond_t over = PTHREAD_COND_INITIALIZER;  /* a pump stopped */
static Pump *queue_head, *queue_tail;
static int queued, waiting;

static void *worker_main(void *unused) {
    (void)unused;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);  /* signals are the main thread's business */
    char *buf = malloc(READ_SIZE);
    int wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    PyThreadState *ts = NULL;  /* this thread's Python state: made at its first callback, then kept */
    pthread_mutex_lock(&mu);
    for (;;) {
        while (!queue_head) {
            waiting++;
            pthread_cond_wait(&work, &mu);
            waiting--;
        }
        Pump *p = queue_head;
        queue_head = p->next;
        if (!queue_head) queue_tail = NULL;
        queued--;
        p->phase = P_RUNNING;
        p->wake = wake;
        int stop = p->stop_asked;
        pthread_mutex_unlock(&mu);
        if (stop) p->result = R_STOPPED;
        else if (!buf || wake < 0) { p->result = R_ERROR; p->error = ENOMEM; }
        else run(p, buf, wake);
        pthread_mutex_lock(&mu);
        if (p->stop_asked && !p->stop_seen && p->phase == P_RUNNING && wake >= 0) {
            uint64_t n;  /* a stop asked as the pump ended: not left for the next one */
            if (read(wake, &n, sizeof n) < 0) { /* none was written yet */ }
        }
        p->phase = P_OVER;
        pthread_cond_broadcast(&over);
        pthread_mutex_unlock(&mu);
        if (ts) PyEval_RestoreThread(ts);
        else PyGILState_Ensure();
        PyObject *r = PyObject_CallNoArgs(p->on_stop);
        if (r == NULL) PyErr_WriteUnraisable(p->on_stop);
        Py_XDECREF(r);
        Py_DECREF(p);  /* the queue's reference */
        ts = PyEval_SaveThread();
        pthread_mutex_lock(&mu);
    }
    return NULL;
}

static int Pump_init(Pump *p, PyObject *args, PyObject *kw) {
    static char *names[] = {"up", "down", "timeout", "state", "left", "line", "on_stop", NULL};
    double timeout;
    Py_buffer line;
    PyObject *on_stop;
    if (p->phase != P_NEW) { PyErr_SetString(PyExc_RuntimeError, "started already"); return -1; }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iidiLy*O", names, &p->up, &p->down, &timeout, &p->state,
                                     &p->left, &line, &on_stop))
        return -1;
    if (p->state < S_SIZE || p->state > S_TRAILER || line.len > MAX_LINE) {
        PyBuffer_Release(&line);
        PyErr_SetString(PyExc_ValueError, "no stream to pump from this framing state");
        return -1;
    }
    memcpy(p->line, line.buf, (size_t)line.len);
    p->line_len = (size_t)line.len;
    PyBuffer_Release(&line);
    p->timeout_ms = timeout > 0 ? (int)(timeout * 1000 < 2e9 ? timeout * 1000 : 2e9) : -1;
    if (!p->tail && !(p->tail = malloc(2 * TAIL_KEEP))) { PyErr_NoMemory(); return -1; }
    Py_INCREF(on_stop);
    Py_XSETREF(p->on_stop, on_stop);
    return 0;
}

static PyObject *Pump_start(Pump *p, PyObject *Py_UNUSED(unused)) {
    if (p->phase != P_NEW || !p->tail) { PyErr_SetString(PyExc_RuntimeError, "not a new pump"); return NULL; }
    int e = 0;
    Py_INCREF(p);
    pthread_mutex_lock(&mu);
    if (waiting <= queued) {  /* every waiting thread has a pump already: one more thread */
        pthread_attr_t attr;
        pthread_t t;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 512 << 10);
        e = pthread_create(&t, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
    }
    if (!e) {
        p->phase = P_QUEUED;
        p->next = NULL;
        if (queue_tail) queue_tail->next = p; else queue_head = p;
        queue_tail = p;
        queued++;
        pthread_cond_signal(&work);
    }
    pthread_mutex_unlock(&mu);
    if (e) { Py_DECREF(p); errno = e; return PyErr_SetFromErrno(PyExc_OSError); }
    Py_RETURN_NONE;
}

static PyObject *Pump_stop(Pump *p, PyObject *Py_UNUSED(unused)) {
    pthread_mutex_lock(&mu);
    p->stop_asked = 1;
    if (p->phase == P_RUNNING) {
        uint64_t one = 1;
        if (write(p->wake, &one, sizeof one) < 0) { /* a count already pending wakes it as well */ }
    }
    pthread_mutex_unlock(&mu);
    Py_RETURN_NONE;
}

static PyObject *Pump_join(Pump *p, PyObject *Py_UNUSED(unused)) {
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&mu);
    while (p->phase == P_QUEUED || p->phase == P_RUNNING) pthread_cond_wait(&over, &mu);
    pthread_mutex_unlock(&mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Pump_outcome(Pump *p, PyObject *Py_UNUSED(unused)) {
    /* (result, errno, rest, tail, state, left, line, pieces passed on) */
    return Py_BuildValue("iiy#y#iLy#K", p->result, p->error, p->rest ? p->rest : "", (Py_ssize_t)p->rest_len,
                         p->tail ? p->tail : "", (Py_ssize_t)p->tail_len, p->state, p->left, p->line,
                         (Py_ssize_t)p->line_len, p->pieces);
}

static void Pump_dealloc(Pump *p) {
    free(p->tail);
    free(p->rest);
    Py_XDECREF(p->on_stop);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef Pump_methods[] = {
    {"start", (PyCFunction)Pump_start, METH_NOARGS, "Hand the stream to a pump thread."},
    {"stop", (PyCFunction)Pump_stop, METH_NOARGS, "Ask the pump to stop (it answers at once)."},
    {"join", (PyCFunction)Pump_join, METH_NOARGS, "Wait for the pump to stop (the GIL released)."},
    {"outcome", (PyCFunction)Pump_outcome, METH_NOARGS,
     "(result, errno, rest, tail, state, left, line, pieces passed on)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "swapper._pump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pump(up, down, timeout, state, left, line, on_stop): a stream's pieces from the "
              "child's socket to the client's; on_stop() is called from the pump's thread when it stops.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
};

static struct PyModuleDef pump_module = {PyModuleDef_HEAD_INIT, .m_name = "swapper._pump", .m_size = -1};

PyMODINIT_FUNC PyInit__pump(void) {
    if (PyType_Ready(&PumpType) < 0) return NULL;
    PyObject *m = PyModule_Create(&pump_module);
    if (!m) return NULL;
    Py_INCREF(&PumpType);
    if (PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0) { Py_DECREF(&PumpType); Py_DECREF(m); return NULL; }
    const char *names[] = {"HANDBACK", "BLOCKED", "CLIENT", "EOF", "ERROR", "SILENT", "STOPPED"};
    for (int i = 0; i < 7; i++) PyModule_AddIntConstant(m, names[i], i);
    return m;
}

/*
 * mock_upstream.c - a fast mock OpenAI-compatible (and Anthropic Messages)
 * HTTP server for benchmarks.
 *
 * Single-threaded, non-blocking, Linux epoll (level-triggered) event loop
 * with an integrated min-heap timer queue (CLOCK_MONOTONIC). No external
 * libraries.
 *
 * Build:  gcc -O2 -Wall -o bench/mock_upstream bench/mock_upstream.c
 *
 * Usage:  mock_upstream --port N [--host 127.0.0.1] [--latency-ms L]
 *                       [--chunks C] [--chunk-delay-ms D]
 *
 *   --port N            TCP port (0 = ephemeral; the real port is printed)
 *   --host H            address to bind (default 127.0.0.1; IPv4 or IPv6)
 *   --latency-ms L      delay non-streaming chat completions by L ms
 *   --chunks C          number of content chunks in a stream (default 8)
 *   --chunk-delay-ms D  pace streamed content chunks D ms apart (default 0)
 *
 * Once ready it prints "listening on HOST:PORT" to stdout (flushed).
 *
 * Endpoints:
 *   POST /v1/chat/completions
 *        body contains "stream":true / "stream": true  -> SSE stream
 *          (chunked; one SSE event per HTTP chunk): a role chunk
 *          (delta {"role":"assistant","content":""}), then C content chunks
 *          (delta {"content":"tok "}), then a finish chunk
 *          (finish_reason "stop", empty delta), then - if the body contains
 *          "include_usage":true - a usage chunk, then "data: [DONE]", then
 *          the terminating zero-length chunk. With D > 0, content chunk k
 *          (k = 1..C) is sent at t = k*D ms after the request, so a stream
 *          takes ~C*D ms.
 *        otherwise -> fixed chat.completion JSON (after L ms if L > 0)
 *   POST /v1/messages (Anthropic Messages API wire format)
 *        body contains "stream":true / "stream": true  -> SSE stream
 *          (chunked; one SSE event per HTTP chunk, each with its "event:"
 *          line): message_start (usage input_tokens 10, output_tokens 1),
 *          content_block_start (an empty text block, index 0), ping, then C
 *          content_block_delta events (text_delta "tok "), then
 *          content_block_stop, message_delta (stop_reason "end_turn",
 *          usage output_tokens C), message_stop, and the terminating
 *          zero-length chunk. Paced like the chat stream: with D > 0, delta
 *          k is sent at t = k*D ms.
 *        otherwise -> fixed "message" JSON (content [{"type":"text",...}],
 *          stop_reason "end_turn", usage input/output tokens), after L ms
 *   GET  /v1/models -> fixed model list
 *   anything else   -> 404 JSON error
 *
 * HTTP/1.1 keep-alive (Connection: close honoured; HTTP/1.0 closes unless
 * "Connection: keep-alive"). Pipelined requests are handled in order.
 * Requests must carry Content-Length (Transfer-Encoding -> 411 + close).
 * Malformed input closes the connection. "Expect: 100-continue" is answered.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEADER_BYTES (64 * 1024)
#define MAX_BODY_BYTES (64L * 1024 * 1024)
#define IN_INITIAL 16384
#define IN_PAUSE_EXTRA (256 * 1024) /* buffered bytes beyond a pending request */
#define BUF_SHRINK_ABOVE (256 * 1024)
#define MAX_EVENTS 1024

/* ------------------------------------------------------------------------ */
/* options */

static int opt_port = -1;
static const char *opt_host = "127.0.0.1";
static long opt_latency_ms = 0;
static long opt_chunks = 8;
static long opt_chunk_delay_ms = 0;

/* ------------------------------------------------------------------------ */
/* precomputed responses */

typedef struct {
    char *p;
    size_t n;
} blob;

static blob resp_chat_ka, resp_chat_close;
static blob resp_models_ka, resp_models_close;
static blob resp_404_ka, resp_404_close;
static blob resp_411_close, resp_100_continue;
static blob sse_hdr_ka, sse_hdr_close;
static blob sse_role, sse_content, sse_finish, sse_usage, sse_done, sse_end;
static blob resp_msg_ka, resp_msg_close;
static blob ant_start, ant_delta, ant_finish;

static const char CHAT_BODY[] =
    "{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion\",\"created\":1,"
    "\"model\":\"mock\",\"choices\":[{\"index\":0,\"message\":{\"role\":"
    "\"assistant\",\"content\":\"hello from the mock\"},\"finish_reason\":"
    "\"stop\"}],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":4,"
    "\"total_tokens\":14}}";
static const char MODELS_BODY[] =
    "{\"object\":\"list\",\"data\":[{\"id\":\"mock\",\"object\":\"model\","
    "\"created\":1,\"owned_by\":\"mock\"}]}";
static const char NOTFOUND_BODY[] =
    "{\"error\":{\"message\":\"not found\",\"type\":\"invalid_request_error\","
    "\"code\":\"not_found\"}}";
static const char LENGTH_BODY[] =
    "{\"error\":{\"message\":\"content-length required\",\"type\":"
    "\"invalid_request_error\",\"code\":\"length_required\"}}";

static const char MESSAGE_BODY[] =
    "{\"id\":\"msg_mock\",\"type\":\"message\",\"role\":\"assistant\","
    "\"model\":\"mock\",\"content\":[{\"type\":\"text\",\"text\":"
    "\"hello from the mock\"}],\"stop_reason\":\"end_turn\","
    "\"stop_sequence\":null,\"usage\":{\"input_tokens\":10,"
    "\"output_tokens\":4}}";

#define CHUNK_PREFIX "{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\"," \
                     "\"created\":1,\"model\":\"mock\","

static void die(const char *msg)
{
    perror(msg);
    exit(1);
}

static blob blob_fmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static blob blob_fmt(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    blob b;
    b.p = malloc((size_t)n + 1);
    if (!b.p)
        die("malloc");
    va_start(ap, fmt);
    vsnprintf(b.p, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b.n = (size_t)n;
    return b;
}

static blob http_resp(const char *status, const char *body, int close)
{
    return blob_fmt("HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
                    "content-length: %zu\r\n%s\r\n%s",
                    status, strlen(body),
                    close ? "connection: close\r\n" : "", body);
}

/* one SSE event "data: <payload>\n\n" wrapped as one HTTP chunk */
static blob sse_chunk(const char *payload)
{
    size_t n = strlen("data: ") + strlen(payload) + 2;
    return blob_fmt("%zx\r\ndata: %s\n\n\r\n", n, payload);
}

/* one named SSE event "event: <name>\ndata: <payload>\n\n" as one HTTP chunk */
static blob sse_named(const char *name, const char *payload)
{
    size_t n = strlen("event: \ndata: \n\n") + strlen(name) + strlen(payload);
    return blob_fmt("%zx\r\nevent: %s\ndata: %s\n\n\r\n", n, name, payload);
}

/* concatenate blobs (frees them) */
static blob blob_cat(blob a, blob b)
{
    blob r = blob_fmt("%s%s", a.p, b.p);
    free(a.p);
    free(b.p);
    return r;
}

static void build_responses(void)
{
    resp_chat_ka = http_resp("200 OK", CHAT_BODY, 0);
    resp_chat_close = http_resp("200 OK", CHAT_BODY, 1);
    resp_models_ka = http_resp("200 OK", MODELS_BODY, 0);
    resp_models_close = http_resp("200 OK", MODELS_BODY, 1);
    resp_404_ka = http_resp("404 Not Found", NOTFOUND_BODY, 0);
    resp_404_close = http_resp("404 Not Found", NOTFOUND_BODY, 1);
    resp_411_close = http_resp("411 Length Required", LENGTH_BODY, 1);
    resp_100_continue = blob_fmt("HTTP/1.1 100 Continue\r\n\r\n");

    const char *sh = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     "cache-control: no-cache\r\ntransfer-encoding: chunked\r\n";
    sse_hdr_ka = blob_fmt("%s\r\n", sh);
    sse_hdr_close = blob_fmt("%sconnection: close\r\n\r\n", sh);

    sse_role = sse_chunk(CHUNK_PREFIX "\"choices\":[{\"index\":0,\"delta\":{\"role\":"
                                      "\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}");
    sse_content = sse_chunk(CHUNK_PREFIX "\"choices\":[{\"index\":0,\"delta\":{\"content\":"
                                         "\"tok \"},\"finish_reason\":null}]}");
    sse_finish = sse_chunk(CHUNK_PREFIX "\"choices\":[{\"index\":0,\"delta\":{},"
                                        "\"finish_reason\":\"stop\"}]}");
    blob u = blob_fmt(CHUNK_PREFIX "\"choices\":[],\"usage\":{\"prompt_tokens\":10,"
                                   "\"completion_tokens\":%ld,\"total_tokens\":%ld}}",
                      opt_chunks, 10 + opt_chunks);
    sse_usage = sse_chunk(u.p);
    free(u.p);
    sse_done = sse_chunk("[DONE]");
    sse_end = blob_fmt("0\r\n\r\n");

    /* Anthropic Messages API */
    resp_msg_ka = http_resp("200 OK", MESSAGE_BODY, 0);
    resp_msg_close = http_resp("200 OK", MESSAGE_BODY, 1);
    ant_start = blob_cat(
        blob_cat(sse_named("message_start",
                           "{\"type\":\"message_start\",\"message\":{\"id\":\"msg_mock\","
                           "\"type\":\"message\",\"role\":\"assistant\",\"model\":\"mock\","
                           "\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,"
                           "\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}"),
                 sse_named("content_block_start",
                           "{\"type\":\"content_block_start\",\"index\":0,"
                           "\"content_block\":{\"type\":\"text\",\"text\":\"\"}}")),
        sse_named("ping", "{\"type\":\"ping\"}"));
    ant_delta = sse_named("content_block_delta",
                          "{\"type\":\"content_block_delta\",\"index\":0,"
                          "\"delta\":{\"type\":\"text_delta\",\"text\":\"tok \"}}");
    blob md = blob_fmt("{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":"
                       "\"end_turn\",\"stop_sequence\":null},\"usage\":"
                       "{\"output_tokens\":%ld}}",
                       opt_chunks);
    ant_finish = blob_cat(
        blob_cat(sse_named("content_block_stop",
                           "{\"type\":\"content_block_stop\",\"index\":0}"),
                 sse_named("message_delta", md.p)),
        blob_cat(sse_named("message_stop", "{\"type\":\"message_stop\"}"),
                 blob_fmt("0\r\n\r\n")));
    free(md.p);
}

/* ------------------------------------------------------------------------ */
/* time */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ------------------------------------------------------------------------ */
/* connections */

enum { ST_IDLE = 0, ST_LATENCY, ST_STREAM };
enum { RT_NOTFOUND = 0, RT_CHAT, RT_MODELS, RT_MESSAGES };

typedef struct conn {
    int fd;
    uint32_t gen;
    int dead;
    struct conn *next_dead;
    int dirty; /* on the flush-after-timers list */
    struct conn *next_dirty;

    char *in;
    size_t in_len, in_cap;
    size_t scan_from; /* where to resume searching for \r\n\r\n */

    char *out;
    size_t out_off, out_len, out_cap;

    uint32_t ev; /* currently registered epoll mask */

    /* current request (valid when hdr_done) */
    int hdr_done;
    size_t hdr_len, body_len;
    int route;
    int req_close;
    int expect_continue, continue_sent;

    /* response state */
    int state;
    int close_after; /* close once output is flushed and state is idle */
    long stream_left;
    int stream_usage;
    int anthropic; /* the pending response is in the Anthropic format */

    /* timer */
    int64_t due;
    int heap_idx; /* -1 if not scheduled */
} conn;

static int epfd;
static int listen_fd;
static int spare_fd = -1;
static conn **conns;
static size_t conns_cap;
static uint32_t gen_counter;
static conn *dead_list;
static conn *dirty_list;
static size_t live_conns;
static int trim_pending;
static int64_t now_cached;

/* timer min-heap */
static conn **heap;
static size_t heap_n, heap_cap;

static void heap_swap(size_t a, size_t b)
{
    conn *t = heap[a];
    heap[a] = heap[b];
    heap[b] = t;
    heap[a]->heap_idx = (int)a;
    heap[b]->heap_idx = (int)b;
}

static void heap_up(size_t i)
{
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (heap[p]->due <= heap[i]->due)
            break;
        heap_swap(p, i);
        i = p;
    }
}

static void heap_down(size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < heap_n && heap[l]->due < heap[m]->due)
            m = l;
        if (r < heap_n && heap[r]->due < heap[m]->due)
            m = r;
        if (m == i)
            break;
        heap_swap(i, m);
        i = m;
    }
}

static void timer_set(conn *c, int64_t due)
{
    c->due = due;
    if (c->heap_idx >= 0) {
        heap_up((size_t)c->heap_idx);
        heap_down((size_t)c->heap_idx);
        return;
    }
    if (heap_n == heap_cap) {
        heap_cap = heap_cap ? heap_cap * 2 : 1024;
        heap = realloc(heap, heap_cap * sizeof(*heap));
        if (!heap)
            die("realloc");
    }
    heap[heap_n] = c;
    c->heap_idx = (int)heap_n;
    heap_n++;
    heap_up(heap_n - 1);
}

static void timer_cancel(conn *c)
{
    if (c->heap_idx < 0)
        return;
    size_t i = (size_t)c->heap_idx;
    c->heap_idx = -1;
    heap_n--;
    if (i != heap_n) {
        heap[i] = heap[heap_n];
        heap[i]->heap_idx = (int)i;
        heap_up(i);
        heap_down((size_t)heap[i]->heap_idx);
    }
}

static uint64_t ev_key(conn *c)
{
    return ((uint64_t)c->gen << 32) | (uint32_t)c->fd;
}

static void set_events(conn *c, uint32_t want)
{
    if (c->ev == want)
        return;
    struct epoll_event e;
    e.events = want;
    e.data.u64 = ev_key(c);
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e) < 0)
        die("epoll_ctl MOD");
    c->ev = want;
}

static void conn_close(conn *c)
{
    if (c->dead)
        return;
    c->dead = 1;
    timer_cancel(c);
    /* closing the fd removes it from the epoll set */
    close(c->fd);
    conns[c->fd] = NULL;
    if (--live_conns == 0)
        trim_pending = 1;
    c->next_dead = dead_list;
    dead_list = c;
}

static void free_dead(void)
{
    while (dead_list) {
        conn *c = dead_list;
        dead_list = c->next_dead;
        free(c->in);
        free(c->out);
        free(c);
    }
}

static void out_append(conn *c, const char *p, size_t n)
{
    if (c->out_len + n > c->out_cap) {
        if (c->out_off > 0) { /* compact */
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        if (c->out_len + n > c->out_cap) {
            size_t cap = c->out_cap ? c->out_cap : 4096;
            while (cap < c->out_len + n)
                cap *= 2;
            char *np = realloc(c->out, cap);
            if (!np)
                die("realloc");
            c->out = np;
            c->out_cap = cap;
        }
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

static inline void out_blob(conn *c, const blob *b)
{
    out_append(c, b->p, b->n);
}

/* Desired epoll mask for a live connection. Reading is paused while a
 * response is pending and a lot of extra input is already buffered. */
static uint32_t wanted_events(conn *c)
{
    uint32_t w = EPOLLRDHUP;
    int paused = c->state != ST_IDLE && c->in_len >= IN_PAUSE_EXTRA;
    if (!paused)
        w |= EPOLLIN;
    if (c->out_off < c->out_len)
        w |= EPOLLOUT;
    return w;
}

/* Write as much pending output as possible. Closes the connection when
 * done and close_after is set. */
static void conn_flush(conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->out_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        conn_close(c);
        return;
    }
    if (c->out_off == c->out_len) {
        c->out_off = c->out_len = 0;
        if (c->out_cap > BUF_SHRINK_ABOVE) {
            free(c->out);
            c->out = NULL;
            c->out_cap = 0;
        }
        if (c->close_after && c->state == ST_IDLE) {
            conn_close(c);
            return;
        }
    }
    set_events(c, wanted_events(c));
}

/* ------------------------------------------------------------------------ */
/* HTTP parsing */

static int token_in_list(const char *v, size_t vn, const char *tok)
{
    size_t tn = strlen(tok);
    size_t i = 0;
    while (i < vn) {
        while (i < vn && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t s = i;
        while (i < vn && v[i] != ',')
            i++;
        size_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
            e--;
        if (e - s == tn && strncasecmp(v + s, tok, tn) == 0)
            return 1;
    }
    return 0;
}

static int path_is(const char *p, size_t pn, const char *want)
{
    size_t wn = strlen(want);
    if (pn < wn || memcmp(p, want, wn) != 0)
        return 0;
    return pn == wn || p[wn] == '?';
}

/* Parse request line + headers in c->in[0..hlen). Returns 0 on success,
 * -1 malformed, -2 transfer-encoding (unsupported). */
static int parse_head(conn *c, size_t hlen)
{
    const char *p = c->in;
    const char *end = c->in + hlen - 2; /* points at final "\r\n" */
    const char *eol = memmem(p, (size_t)(end - p) + 2, "\r\n", 2);
    if (!eol)
        return -1;

    /* request line: METHOD SP TARGET SP HTTP/1.x */
    const char *sp1 = memchr(p, ' ', (size_t)(eol - p));
    if (!sp1 || sp1 == p)
        return -1;
    const char *path = sp1 + 1;
    const char *sp2 = memchr(path, ' ', (size_t)(eol - path));
    if (!sp2 || sp2 == path)
        return -1;
    const char *ver = sp2 + 1;
    size_t vlen = (size_t)(eol - ver);
    if (vlen != 8 || memcmp(ver, "HTTP/1.", 7) != 0 || (ver[7] != '0' && ver[7] != '1'))
        return -1;
    for (const char *q = p; q < sp1; q++)
        if (*q < 'A' || *q > 'Z')
            return -1;
    int http10 = ver[7] == '0';
    size_t mlen = (size_t)(sp1 - p);
    size_t plen = (size_t)(sp2 - path);

    int conn_close_tok = 0, conn_ka_tok = 0, have_cl = 0, have_te = 0;
    long long cl = 0;
    int expect = 0;

    const char *line = eol + 2;
    while (line < end) {
        const char *le = memmem(line, (size_t)(end - line) + 2, "\r\n", 2);
        if (!le)
            return -1;
        const char *colon = memchr(line, ':', (size_t)(le - line));
        if (!colon || colon == line)
            return -1;
        size_t nlen = (size_t)(colon - line);
        for (const char *q = line; q < colon; q++)
            if (*q == ' ' || *q == '\t')
                return -1;
        const char *v = colon + 1;
        while (v < le && (*v == ' ' || *v == '\t'))
            v++;
        const char *ve = le;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
            ve--;
        size_t vn = (size_t)(ve - v);

        if (nlen == 14 && strncasecmp(line, "content-length", 14) == 0) {
            if (vn == 0 || vn > 18)
                return -1;
            long long x = 0;
            for (size_t i = 0; i < vn; i++) {
                if (v[i] < '0' || v[i] > '9')
                    return -1;
                x = x * 10 + (v[i] - '0');
            }
            if (have_cl && x != cl)
                return -1;
            have_cl = 1;
            cl = x;
        } else if (nlen == 10 && strncasecmp(line, "connection", 10) == 0) {
            if (token_in_list(v, vn, "close"))
                conn_close_tok = 1;
            if (token_in_list(v, vn, "keep-alive"))
                conn_ka_tok = 1;
        } else if (nlen == 17 && strncasecmp(line, "transfer-encoding", 17) == 0) {
            have_te = 1;
        } else if (nlen == 6 && strncasecmp(line, "expect", 6) == 0) {
            if (vn == 12 && strncasecmp(v, "100-continue", 12) == 0)
                expect = 1;
        }
        line = le + 2;
    }

    if (have_te)
        return -2;
    if (cl > MAX_BODY_BYTES)
        return -1;

    c->hdr_len = hlen;
    c->body_len = (size_t)cl;
    c->req_close = conn_close_tok || (http10 && !conn_ka_tok);
    c->expect_continue = expect && !http10;
    c->continue_sent = 0;

    if (mlen == 4 && memcmp(p, "POST", 4) == 0 && path_is(path, plen, "/v1/chat/completions"))
        c->route = RT_CHAT;
    else if (mlen == 3 && memcmp(p, "GET", 3) == 0 && path_is(path, plen, "/v1/models"))
        c->route = RT_MODELS;
    else if (mlen == 4 && memcmp(p, "POST", 4) == 0 && path_is(path, plen, "/v1/messages"))
        c->route = RT_MESSAGES;
    else
        c->route = RT_NOTFOUND;
    c->hdr_done = 1;
    return 0;
}

static int body_has(const char *b, size_t n, const char *a, const char *alt)
{
    return memmem(b, n, a, strlen(a)) != NULL || memmem(b, n, alt, strlen(alt)) != NULL;
}

static void stream_finish(conn *c)
{
    if (c->anthropic) {
        out_blob(c, &ant_finish);
        c->state = ST_IDLE;
        return;
    }
    out_blob(c, &sse_finish);
    if (c->stream_usage)
        out_blob(c, &sse_usage);
    out_blob(c, &sse_done);
    out_blob(c, &sse_end);
    c->state = ST_IDLE;
}

/* Dispatch a complete request (headers + body present in c->in). */
static void handle_request(conn *c)
{
    int cl = c->req_close;
    const char *body = c->in + c->hdr_len;
    size_t bn = c->body_len;
    if (cl)
        c->close_after = 1;

    c->anthropic = c->route == RT_MESSAGES;
    switch (c->route) {
    case RT_MESSAGES:
    case RT_CHAT: {
        /* The same exchange in either wire format: only the blobs differ. */
        int msgs = c->anthropic;
        if (body_has(body, bn, "\"stream\":true", "\"stream\": true")) {
            if (!msgs)
                c->stream_usage =
                    body_has(body, bn, "\"include_usage\":true", "\"include_usage\": true");
            out_blob(c, cl ? &sse_hdr_close : &sse_hdr_ka);
            out_blob(c, msgs ? &ant_start : &sse_role);
            if (opt_chunk_delay_ms > 0 && opt_chunks > 0) {
                c->state = ST_STREAM;
                c->stream_left = opt_chunks;
                timer_set(c, now_cached + opt_chunk_delay_ms * 1000000LL);
            } else {
                for (long i = 0; i < opt_chunks; i++)
                    out_blob(c, msgs ? &ant_delta : &sse_content);
                stream_finish(c);
            }
        } else if (opt_latency_ms > 0) {
            c->state = ST_LATENCY;
            timer_set(c, now_cached + opt_latency_ms * 1000000LL);
        } else if (msgs) {
            out_blob(c, cl ? &resp_msg_close : &resp_msg_ka);
        } else {
            out_blob(c, cl ? &resp_chat_close : &resp_chat_ka);
        }
        break;
    }
    case RT_MODELS:
        out_blob(c, cl ? &resp_models_close : &resp_models_ka);
        break;
    default:
        out_blob(c, cl ? &resp_404_close : &resp_404_ka);
        break;
    }
}

/* Process buffered input: parse and dispatch as many complete requests as
 * possible (while no response is pending), then flush. */
static void conn_process(conn *c)
{
    while (!c->dead && c->state == ST_IDLE && !c->close_after) {
        if (!c->hdr_done) {
            if (c->in_len < 4)
                break;
            size_t from = c->scan_from > 3 ? c->scan_from - 3 : 0;
            char *e = memmem(c->in + from, c->in_len - from, "\r\n\r\n", 4);
            if (!e) {
                c->scan_from = c->in_len;
                if (c->in_len > MAX_HEADER_BYTES) {
                    conn_close(c);
                    return;
                }
                break;
            }
            size_t hlen = (size_t)(e - c->in) + 4;
            int r = parse_head(c, hlen);
            if (r == -2) {
                out_blob(c, &resp_411_close);
                c->close_after = 1;
                break;
            }
            if (r < 0) {
                conn_close(c);
                return;
            }
        }
        size_t total = c->hdr_len + c->body_len;
        if (c->in_len < total) {
            if (c->expect_continue && !c->continue_sent) {
                out_blob(c, &resp_100_continue);
                c->continue_sent = 1;
            }
            break;
        }
        handle_request(c);
        /* consume the request */
        size_t rest = c->in_len - total;
        if (rest)
            memmove(c->in, c->in + total, rest);
        c->in_len = rest;
        c->scan_from = 0;
        c->hdr_done = 0;
    }
    if (c->dead)
        return;
    if (c->in_len == 0 && c->in_cap > BUF_SHRINK_ABOVE) {
        free(c->in);
        c->in = NULL;
        c->in_cap = 0;
    }
    conn_flush(c);
}

static void conn_readable(conn *c)
{
    for (;;) {
        size_t limit;
        if (c->state != ST_IDLE)
            limit = IN_PAUSE_EXTRA; /* response pending: buffer a bit only */
        else if (c->hdr_done)
            limit = c->hdr_len + c->body_len;
        else
            limit = MAX_HEADER_BYTES + 4;
        if (limit < IN_INITIAL)
            limit = IN_INITIAL;
        if (c->in_len >= limit) {
            if (c->state == ST_IDLE) /* cannot happen normally; be safe */
                break;
            set_events(c, wanted_events(c)); /* pause reading */
            return;
        }
        if (c->in_cap - c->in_len < 4096 && c->in_cap < limit) {
            size_t cap = c->in_cap ? c->in_cap * 2 : IN_INITIAL;
            while (cap < c->in_len + 4096)
                cap *= 2;
            if (cap > limit && limit >= c->in_len + 1)
                cap = limit;
            char *np = realloc(c->in, cap);
            if (!np)
                die("realloc");
            c->in = np;
            c->in_cap = cap;
        }
        size_t room = c->in_cap - c->in_len;
        if (room == 0)
            break;
        ssize_t n = recv(c->fd, c->in + c->in_len, room, 0);
        if (n > 0) {
            c->in_len += (size_t)n;
            if ((size_t)n < room)
                break; /* socket drained (level-triggered: we'd be woken again) */
            continue;
        }
        if (n == 0) { /* peer closed */
            conn_close(c);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            break;
        conn_close(c);
        return;
    }
    if (c->state == ST_IDLE)
        conn_process(c);
}

static void timer_fire(conn *c)
{
    if (c->state == ST_LATENCY) {
        if (c->anthropic)
            out_blob(c, c->req_close ? &resp_msg_close : &resp_msg_ka);
        else
            out_blob(c, c->req_close ? &resp_chat_close : &resp_chat_ka);
        c->state = ST_IDLE;
    } else if (c->state == ST_STREAM) {
        out_blob(c, c->anthropic ? &ant_delta : &sse_content);
        if (--c->stream_left > 0)
            timer_set(c, c->due + opt_chunk_delay_ms * 1000000LL);
        else
            stream_finish(c);
    }
    if (c->state == ST_IDLE) {
        conn_process(c); /* pipelined requests, then flush */
    } else if (!c->dirty) {
        /* flush once after all due timers ran: if we are lagging, several
         * due chunks of one stream leave in a single send() */
        c->dirty = 1;
        c->next_dirty = dirty_list;
        dirty_list = c;
    }
}

/* ------------------------------------------------------------------------ */
/* accept */

static void conns_reserve(int fd)
{
    if ((size_t)fd < conns_cap)
        return;
    size_t cap = conns_cap ? conns_cap : 1024;
    while (cap <= (size_t)fd)
        cap *= 2;
    conn **n = realloc(conns, cap * sizeof(*conns));
    if (!n)
        die("realloc");
    memset(n + conns_cap, 0, (cap - conns_cap) * sizeof(*conns));
    conns = n;
    conns_cap = cap;
}

static void do_accept(void)
{
    for (int i = 0; i < 256; i++) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && spare_fd >= 0) {
                /* shed one pending connection so we don't spin */
                close(spare_fd);
                int f = accept(listen_fd, NULL, NULL);
                if (f >= 0)
                    close(f);
                spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                continue;
            }
            return; /* EAGAIN or other */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        conn *c = calloc(1, sizeof(*c));
        if (!c)
            die("calloc");
        c->fd = fd;
        c->gen = ++gen_counter;
        c->heap_idx = -1;
        c->ev = EPOLLIN | EPOLLRDHUP;
        conns_reserve(fd);
        conns[fd] = c;
        live_conns++;
        struct epoll_event e;
        e.events = c->ev;
        e.data.u64 = ev_key(c);
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e) < 0) {
            perror("epoll_ctl ADD");
            conns[fd] = NULL;
            live_conns--;
            close(fd);
            free(c);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* main */

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s --port N [--host 127.0.0.1] [--latency-ms L] [--chunks C]"
            " [--chunk-delay-ms D]\n",
            argv0);
    exit(2);
}

static long parse_num(const char *s, const char *argv0, long max)
{
    char *e;
    errno = 0;
    long v = strtol(s, &e, 10);
    if (errno || *s == '\0' || *e != '\0' || v < 0 || v > max)
        usage(argv0);
    return v;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = NULL;
        const char *eq = strchr(a, '=');
        char name[64];
        if (strncmp(a, "--", 2) == 0 && eq && (size_t)(eq - a) < sizeof(name)) {
            memcpy(name, a, (size_t)(eq - a));
            name[eq - a] = '\0';
            val = eq + 1;
            a = name;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help"))
            usage(argv[0]);
#define TAKE() (val ? val : (i + 1 < argc ? argv[++i] : (usage(argv[0]), "")))
        if (!strcmp(a, "--port"))
            opt_port = (int)parse_num(TAKE(), argv[0], 65535);
        else if (!strcmp(a, "--host"))
            opt_host = strdup(TAKE());
        else if (!strcmp(a, "--latency-ms"))
            opt_latency_ms = parse_num(TAKE(), argv[0], 3600L * 1000);
        else if (!strcmp(a, "--chunks"))
            opt_chunks = parse_num(TAKE(), argv[0], 10000000L);
        else if (!strcmp(a, "--chunk-delay-ms"))
            opt_chunk_delay_ms = parse_num(TAKE(), argv[0], 3600L * 1000);
        else
            usage(argv[0]);
#undef TAKE
    }
    if (opt_port < 0)
        usage(argv[0]);

    signal(SIGPIPE, SIG_IGN);

    /* raise the fd limit as far as allowed */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    build_responses();

    struct sockaddr_storage ss;
    socklen_t slen;
    memset(&ss, 0, sizeof(ss));
    int family;
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, opt_host, &s4->sin_addr) == 1) {
        family = AF_INET;
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)opt_port);
        slen = sizeof(*s4);
    } else if (inet_pton(AF_INET6, opt_host, &s6->sin6_addr) == 1) {
        family = AF_INET6;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)opt_port);
        slen = sizeof(*s6);
    } else {
        fprintf(stderr, "invalid --host address: %s\n", opt_host);
        return 2;
    }

    listen_fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listen_fd < 0)
        die("socket");
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(listen_fd, (struct sockaddr *)&ss, slen) < 0)
        die("bind");
    if (listen(listen_fd, 65535) < 0)
        die("listen");
    if (getsockname(listen_fd, (struct sockaddr *)&ss, &slen) < 0)
        die("getsockname");
    int port = ntohs(family == AF_INET ? s4->sin_port : s6->sin6_port);

    spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    struct epoll_event le;
    le.events = EPOLLIN;
    le.data.u64 = UINT64_MAX;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, listen_fd, &le) < 0)
        die("epoll_ctl listen");

    if (family == AF_INET6)
        printf("listening on [%s]:%d\n", opt_host, port);
    else
        printf("listening on %s:%d\n", opt_host, port);
    fflush(stdout);

    struct epoll_event evs[MAX_EVENTS];
    int have_pwait2 = 1;
    int64_t last_trim = 0;
    now_cached = now_ns();
    for (;;) {
        /* wait until the next timer is due (ns precision via epoll_pwait2
         * when available, else ms rounded up) */
        int64_t d = -1;
        if (heap_n) {
            d = heap[0]->due - now_ns();
            if (d < 0)
                d = 0;
        }
        int n = -1;
        if (have_pwait2) {
            struct timespec ts = {(time_t)(d / 1000000000LL), (long)(d % 1000000000LL)};
            n = epoll_pwait2(epfd, evs, MAX_EVENTS, d < 0 ? NULL : &ts, NULL);
            if (n < 0 && errno == ENOSYS)
                have_pwait2 = 0;
        }
        if (!have_pwait2) {
            int timeout = -1;
            if (d >= 0) {
                int64_t ms = (d + 999999) / 1000000;
                timeout = ms > INT_MAX ? INT_MAX : (int)ms;
            }
            n = epoll_wait(epfd, evs, MAX_EVENTS, timeout);
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        now_cached = now_ns();
        for (int i = 0; i < n; i++) {
            uint64_t key = evs[i].data.u64;
            if (key == UINT64_MAX) {
                do_accept();
                continue;
            }
            int fd = (int)(uint32_t)key;
            uint32_t gen = (uint32_t)(key >> 32);
            if ((size_t)fd >= conns_cap)
                continue;
            conn *c = conns[fd];
            if (!c || c->gen != gen || c->dead)
                continue; /* stale event for a closed/reused fd */
            uint32_t e = evs[i].events;
            if (e & (EPOLLERR | EPOLLHUP)) {
                conn_close(c);
                continue;
            }
            if (e & EPOLLOUT) {
                conn_flush(c);
                if (c->dead)
                    continue;
            }
            if (e & EPOLLIN) {
                conn_readable(c); /* reads until EOF -> close on peer shutdown */
            } else if (e & EPOLLRDHUP) {
                conn_close(c); /* peer gone while we were not reading */
            }
        }
        /* run due timers */
        if (heap_n) {
            now_cached = now_ns();
            while (heap_n && heap[0]->due <= now_cached) {
                conn *c = heap[0];
                timer_cancel(c);
                timer_fire(c);
            }
            while (dirty_list) {
                conn *c = dirty_list;
                dirty_list = c->next_dirty;
                c->dirty = 0;
                if (!c->dead)
                    conn_flush(c);
            }
        }
        free_dead();
        if (trim_pending) { /* all connections gone: give memory back */
            trim_pending = 0;
            if (live_conns == 0 && now_cached - last_trim > 1000000000LL) {
                last_trim = now_cached; /* at most once a second */
                malloc_trim(0);
            }
        }
    }
    return 0;
}

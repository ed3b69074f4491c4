#define _GNU_SOURCE
#include "flotilla_archive.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <zlib.h>

/* ---- libzstd, loaded at run time ------------------------------------- */

/* Prototypes declared here so that no zstd header is needed at build time.
 * These match the stable (non-experimental) libzstd 1.x ABI. */
typedef struct ZSTD_DStream_s ZSTD_DStream;
typedef struct { const void *src; size_t size; size_t pos; } ZSTD_inBuffer;
typedef struct { void *dst; size_t size; size_t pos; } ZSTD_outBuffer;

typedef ZSTD_DStream *(*zstd_create_fn)(void);
typedef size_t (*zstd_init_fn)(ZSTD_DStream *);
typedef size_t (*zstd_decompress_fn)(ZSTD_DStream *, ZSTD_outBuffer *, ZSTD_inBuffer *);
typedef size_t (*zstd_free_fn)(ZSTD_DStream *);
typedef unsigned (*zstd_is_error_fn)(size_t);
typedef const char *(*zstd_error_name_fn)(size_t);

/* Written exactly once under pthread_once, read-only afterwards. */
static struct {
    zstd_create_fn create;
    zstd_init_fn init;
    zstd_decompress_fn decompress;
    zstd_free_fn free_stream;
    zstd_is_error_fn is_error;
    zstd_error_name_fn error_name;
    int ok;
    char error[256];
} zstd_api;
static pthread_once_t zstd_once = PTHREAD_ONCE_INIT;

static void zstd_load(void) {
    void *h = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *why = dlerror();
        snprintf(zstd_api.error, sizeof zstd_api.error,
                 "zstd layers need libzstd.so.1 (Debian: libzstd1): %s",
                 why ? why : "not found");
        return;
    }
    zstd_api.create = (zstd_create_fn)dlsym(h, "ZSTD_createDStream");
    zstd_api.init = (zstd_init_fn)dlsym(h, "ZSTD_initDStream");
    zstd_api.decompress = (zstd_decompress_fn)dlsym(h, "ZSTD_decompressStream");
    zstd_api.free_stream = (zstd_free_fn)dlsym(h, "ZSTD_freeDStream");
    zstd_api.is_error = (zstd_is_error_fn)dlsym(h, "ZSTD_isError");
    zstd_api.error_name = (zstd_error_name_fn)dlsym(h, "ZSTD_getErrorName");
    if (!zstd_api.create || !zstd_api.init || !zstd_api.decompress ||
        !zstd_api.free_stream || !zstd_api.is_error || !zstd_api.error_name) {
        snprintf(zstd_api.error, sizeof zstd_api.error,
                 "zstd layers need libzstd.so.1 (Debian: libzstd1): "
                 "the installed library lacks the streaming API");
        return; /* the handle stays open; harmless, and it is loaded only once */
    }
    zstd_api.ok = 1;
}

/* ---- decoder ---------------------------------------------------------- */

struct flotilla_decoder {
    int format;
    /* gzip */
    z_stream zs;
    int z_ready;
    int in_member;       /* inside a gzip member */
    int trailing_zeros;  /* saw zero padding after the last member */
    unsigned long members;
    /* zstd */
    ZSTD_DStream *ds;
    int frame_open;      /* a zstd frame is partly decoded or not yet flushed */
    int zstd_seen;
    char error[256];
};

static void set_error(flotilla_decoder *d, const char *prefix, const char *msg) {
    snprintf(d->error, sizeof d->error, "%s%s", prefix, msg ? msg : "corrupt data");
}

flotilla_decoder *flotilla_decoder_new(int format, char *errbuf, size_t errlen) {
    if (errbuf && errlen) errbuf[0] = 0;
    if (format != FLOTILLA_FORMAT_GZIP && format != FLOTILLA_FORMAT_ZSTD && format != FLOTILLA_FORMAT_DEFLATE) {
        if (errbuf && errlen) snprintf(errbuf, errlen, "unknown compression format %d", format);
        return NULL;
    }
    if (format == FLOTILLA_FORMAT_ZSTD) {
        pthread_once(&zstd_once, zstd_load);
        if (!zstd_api.ok) {
            if (errbuf && errlen) snprintf(errbuf, errlen, "%s", zstd_api.error);
            return NULL;
        }
    }
    flotilla_decoder *d = calloc(1, sizeof *d);
    if (!d) {
        if (errbuf && errlen) snprintf(errbuf, errlen, "out of memory");
        return NULL;
    }
    d->format = format;
    if (format == FLOTILLA_FORMAT_GZIP) {
        /* 16 + MAX_WBITS: gzip wrapper only, maximum window (32 KiB). */
        if (inflateInit2(&d->zs, 16 + MAX_WBITS) != Z_OK) {
            if (errbuf && errlen) snprintf(errbuf, errlen, "gzip: cannot initialise zlib");
            free(d);
            return NULL;
        }
        d->z_ready = 1;
    } else if (format == FLOTILLA_FORMAT_DEFLATE) {
        /* -MAX_WBITS: raw deflate, maximum window (32 KiB). */
        if (inflateInit2(&d->zs, -MAX_WBITS) != Z_OK) {
            if (errbuf && errlen) snprintf(errbuf, errlen, "deflate: cannot initialise zlib");
            free(d);
            return NULL;
        }
        d->z_ready = 1;
        d->in_member = 1;
    } else {
        d->ds = zstd_api.create();
        if (!d->ds) {
            if (errbuf && errlen) snprintf(errbuf, errlen, "zstd: cannot create decoder");
            free(d);
            return NULL;
        }
        size_t r = zstd_api.init(d->ds);
        if (zstd_api.is_error(r)) {
            if (errbuf && errlen) snprintf(errbuf, errlen, "zstd: %s", zstd_api.error_name(r));
            zstd_api.free_stream(d->ds);
            free(d);
            return NULL;
        }
    }
    return d;
}

/* One inflate() call over as much of in/out as zlib's 32-bit counters take; reports what it used and made. */
static int inflate_chunk(flotilla_decoder *d, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len,
                         size_t *consumed, size_t *produced) {
    size_t avail_in = in_len > UINT_MAX ? UINT_MAX : in_len;
    size_t avail_out = out_len > UINT_MAX ? UINT_MAX : out_len;
    d->zs.next_in = (Bytef *)in;
    d->zs.avail_in = (uInt)avail_in;
    d->zs.next_out = (Bytef *)out;
    d->zs.avail_out = (uInt)avail_out;
    int r = inflate(&d->zs, Z_NO_FLUSH);
    *consumed = avail_in - d->zs.avail_in;
    *produced = avail_out - d->zs.avail_out;
    return r;
}

static int gzip_step(flotilla_decoder *d, const uint8_t *in, size_t in_len, size_t *in_used,
                     uint8_t *out, size_t out_len, size_t *out_made) {
    size_t used = 0, made = 0;
    while (made < out_len) {
        if (!d->in_member) {
            if (used == in_len) break;
            /* Some writers pad after the last member; gzip(1) ignores zeros too. */
            if (d->trailing_zeros || in[used] == 0) {
                d->trailing_zeros = 1;
                while (used < in_len && in[used] == 0) used++;
                if (used < in_len) {
                    set_error(d, "gzip: ", "unexpected data after the end of the compressed stream");
                    *in_used = used; *out_made = made;
                    return -1;
                }
                break;
            }
            if (d->members > 0 && (in[used] != 0x1f || (used + 1 < in_len && in[used + 1] != 0x8b))) {
                set_error(d, "gzip: ", "unexpected data after the end of the compressed stream");
                *in_used = used; *out_made = made;
                return -1;
            }
            if (inflateReset(&d->zs) != Z_OK) {
                set_error(d, "gzip: ", "cannot reset zlib");
                *in_used = used; *out_made = made;
                return -1;
            }
            d->in_member = 1;
        }
        size_t ci, co;
        int r = inflate_chunk(d, in + used, in_len - used, out + made, out_len - made, &ci, &co);
        used += ci;
        made += co;
        if (r == Z_STREAM_END) {
            d->in_member = 0;
            d->members++;
            continue;
        }
        if (r == Z_OK) {
            if (ci == 0 && co == 0) break;
            continue;
        }
        if (r == Z_BUF_ERROR) break; /* needs more input (or output space) */
        set_error(d, "gzip: ", d->zs.msg ? d->zs.msg : (r == Z_MEM_ERROR ? "out of memory" : "corrupt data"));
        *in_used = used; *out_made = made;
        return -1;
    }
    *in_used = used;
    *out_made = made;
    return 0;
}

static int deflate_step(flotilla_decoder *d, const uint8_t *in, size_t in_len, size_t *in_used,
                        uint8_t *out, size_t out_len, size_t *out_made) {
    size_t used = 0, made = 0;
    while (made < out_len && d->in_member) {
        size_t ci, co;
        int r = inflate_chunk(d, in + used, in_len - used, out + made, out_len - made, &ci, &co);
        used += ci;
        made += co;
        if (r == Z_STREAM_END) {
            d->in_member = 0;
            d->members = 1;
            break;
        }
        if (r == Z_OK) {
            if (ci == 0 && co == 0) break;
            continue;
        }
        if (r == Z_BUF_ERROR) break; /* needs more input (or output space) */
        set_error(d, "deflate: ", d->zs.msg ? d->zs.msg : (r == Z_MEM_ERROR ? "out of memory" : "corrupt data"));
        *in_used = used; *out_made = made;
        return -1;
    }
    *in_used = used;
    *out_made = made;
    return 0;
}

static int zstd_step(flotilla_decoder *d, const uint8_t *in, size_t in_len, size_t *in_used,
                     uint8_t *out, size_t out_len, size_t *out_made) {
    ZSTD_inBuffer ib = { in, in_len, 0 };
    ZSTD_outBuffer ob = { out, out_len, 0 };
    while (ob.pos < ob.size) {
        size_t before_in = ib.pos, before_out = ob.pos;
        size_t r = zstd_api.decompress(d->ds, &ob, &ib);
        if (zstd_api.is_error(r)) {
            set_error(d, "zstd: ", zstd_api.error_name(r));
            *in_used = ib.pos; *out_made = ob.pos;
            return -1;
        }
        if (ib.pos == before_in && ob.pos == before_out) break; /* no progress possible */
        d->zstd_seen = 1;
        /* 0 means: frame completely decoded and fully flushed. */
        d->frame_open = (r != 0);
    }
    *in_used = ib.pos;
    *out_made = ob.pos;
    return 0;
}

int flotilla_decoder_step(flotilla_decoder *d,
                          const uint8_t *in, size_t in_len, size_t *in_used,
                          uint8_t *out, size_t out_len, size_t *out_made) {
    *in_used = 0;
    *out_made = 0;
    if (!d) return -1;
    if (!in) in_len = 0;
    if (!out || out_len == 0) return 0;
    d->error[0] = 0;
    if (d->format == FLOTILLA_FORMAT_GZIP)
        return gzip_step(d, in, in_len, in_used, out, out_len, out_made);
    if (d->format == FLOTILLA_FORMAT_DEFLATE)
        return deflate_step(d, in, in_len, in_used, out, out_len, out_made);
    return zstd_step(d, in, in_len, in_used, out, out_len, out_made);
}

int flotilla_decoder_at_boundary(const flotilla_decoder *d) {
    if (!d) return 0;
    if (d->format == FLOTILLA_FORMAT_GZIP || d->format == FLOTILLA_FORMAT_DEFLATE)
        return !d->in_member && d->members > 0;
    return d->zstd_seen && !d->frame_open;
}

const char *flotilla_decoder_error(const flotilla_decoder *d) {
    if (!d) return "no decoder";
    return d->error[0] ? d->error : "corrupt data";
}

void flotilla_decoder_free(flotilla_decoder *d) {
    if (!d) return;
    if (d->z_ready) inflateEnd(&d->zs);
    if (d->ds) zstd_api.free_stream(d->ds);
    free(d);
}

uint32_t flotilla_crc32(uint32_t crc, const uint8_t *buf, size_t len) {
    uLong value = crc;
    while (len > 0) {
        uInt n = len > UINT_MAX ? UINT_MAX : (uInt)len;
        value = crc32(value, buf, n);
        buf += n;
        len -= n;
    }
    return (uint32_t)value;
}

/* ---- libc wrappers ------------------------------------------------------ */

int flotilla_fsetxattr(int fd, const char *name, const void *value, size_t size) {
    return fsetxattr(fd, name, value, size, 0);
}

int flotilla_lsetxattr(const char *path, const char *name, const void *value, size_t size) {
    return lsetxattr(path, name, value, size, 0);
}

ssize_t flotilla_lgetxattr(const char *path, const char *name, void *value, size_t size) {
    return lgetxattr(path, name, value, size);
}

dev_t flotilla_makedev(uint32_t major, uint32_t minor) { return makedev(major, minor); }
uint32_t flotilla_major(dev_t dev) { return (uint32_t)major(dev); }
uint32_t flotilla_minor(dev_t dev) { return (uint32_t)minor(dev); }

#ifndef FLOTILLA_ARCHIVE_H
#define FLOTILLA_ARCHIVE_H

/*
 * Streaming decompression for image layers, plus the few libc calls that
 * Swift's Glibc module does not expose (xattrs, makedev).
 *
 * The decoder is a push API: the caller owns both buffers and the file
 * descriptor, so memory stays bounded no matter how large a layer is.
 * gzip (and raw deflate, for zip entries) goes through zlib (linked); zstd
 * goes through libzstd.so.1, loaded with dlopen on first use so that hosts
 * without it can still run gzip/plain layers.
 */

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    FLOTILLA_FORMAT_GZIP = 1,
    FLOTILLA_FORMAT_ZSTD = 2,
    /* One raw deflate stream (RFC 1951, no header or trailer), as in zip
     * entries. Input after the end of the stream is left unconsumed. */
    FLOTILLA_FORMAT_DEFLATE = 3,
};

typedef struct flotilla_decoder flotilla_decoder;

/* Creates a decoder for `format`. On failure returns NULL and writes a
 * NUL-terminated message into errbuf (for zstd: when libzstd.so.1 is absent). */
flotilla_decoder *flotilla_decoder_new(int format, char *errbuf, size_t errlen);

/* Consumes input and produces output. *in_used and *out_made tell how much
 * of each buffer was used. Returns 0 on success, -1 on corrupt data (see
 * flotilla_decoder_error). Producing nothing with empty input is not an
 * error: check flotilla_decoder_at_boundary to tell a clean end from a
 * truncated stream. */
int flotilla_decoder_step(flotilla_decoder *d,
                          const uint8_t *in, size_t in_len, size_t *in_used,
                          uint8_t *out, size_t out_len, size_t *out_made);

/* 1 when every byte seen so far formed complete gzip members / zstd frames
 * (at least one) and no decoded output is pending; 0 otherwise. */
int flotilla_decoder_at_boundary(const flotilla_decoder *d);

/* The last error message; valid until the next call on this decoder. */
const char *flotilla_decoder_error(const flotilla_decoder *d);

void flotilla_decoder_free(flotilla_decoder *d);

/* zlib's CRC-32 (as in gzip and zip): `crc` updated with `len` bytes. */
uint32_t flotilla_crc32(uint32_t crc, const uint8_t *buf, size_t len);

/* Thin wrappers: Swift's Glibc module lacks <sys/xattr.h> and makedev(). */
int flotilla_fsetxattr(int fd, const char *name, const void *value, size_t size);
int flotilla_lsetxattr(const char *path, const char *name, const void *value, size_t size);
ssize_t flotilla_lgetxattr(const char *path, const char *name, void *value, size_t size);
dev_t flotilla_makedev(uint32_t major, uint32_t minor);
uint32_t flotilla_major(dev_t dev);
uint32_t flotilla_minor(dev_t dev);

#ifdef __cplusplus
}
#endif

#endif

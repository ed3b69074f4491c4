// The Linux system interfaces the proxy's event loop uses that Swift's Glibc module leaves out.
#ifndef CFLOTILLA_IO_H
#define CFLOTILLA_IO_H

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

/// accept4(2), which needs _GNU_SOURCE: a non-blocking, close-on-exec connection.
int cflotilla_accept(int fd, struct sockaddr *address, socklen_t *length);

/// Names the calling thread (shown by top -H, perf and gdb); names are cut to 15 bytes.
int cflotilla_name_thread(const char *name);

/// The port of an IPv4 or IPv6 address (host order), 0 for other families.
int cflotilla_address_port(const struct sockaddr *address);

/// Writes the textual IP of an IPv4 or IPv6 address into `text`; returns 0, or -1.
int cflotilla_address_text(const struct sockaddr *address, char *text, socklen_t size);

#endif

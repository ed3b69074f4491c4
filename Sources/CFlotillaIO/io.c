#define _GNU_SOURCE
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include "CFlotillaIO.h"

int cflotilla_name_thread(const char *name) {
    char cut[16];
    strncpy(cut, name, sizeof(cut) - 1);
    cut[sizeof(cut) - 1] = 0;
    return pthread_setname_np(pthread_self(), cut);
}

int cflotilla_accept(int fd, struct sockaddr *address, socklen_t *length) {
    return accept4(fd, address, length, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

int cflotilla_address_port(const struct sockaddr *address) {
    switch (address->sa_family) {
    case AF_INET: return ntohs(((const struct sockaddr_in *)address)->sin_port);
    case AF_INET6: return ntohs(((const struct sockaddr_in6 *)address)->sin6_port);
    default: return 0;
    }
}

int cflotilla_address_text(const struct sockaddr *address, char *text, socklen_t size) {
    const void *raw;
    switch (address->sa_family) {
    case AF_INET: raw = &((const struct sockaddr_in *)address)->sin_addr; break;
    case AF_INET6: raw = &((const struct sockaddr_in6 *)address)->sin6_addr; break;
    default: return -1;
    }
    return inet_ntop(address->sa_family, raw, text, size) ? 0 : -1;
}

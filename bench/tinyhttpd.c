/* A minimal HTTP server for benchmarks: answers every request on 127.0.0.1:$1 with "ok".
 * It starts in about a millisecond, so a deployment benchmark measures the orchestrator, not
 * an interpreter's start-up. */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: tinyhttpd PORT\n");
        return 2;
    }
    int server = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
    if (bind(server, (struct sockaddr *)&address, sizeof(address)) != 0 || listen(server, 128) != 0) {
        perror("tinyhttpd");
        return 1;
    }
    static const char reply[] = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
    char buffer[4096];
    for (;;) {
        int client = accept(server, NULL, NULL);
        if (client < 0) continue;
        ssize_t ignored = read(client, buffer, sizeof(buffer));
        (void)ignored;
        ignored = write(client, reply, sizeof(reply) - 1);
        close(client);
    }
}

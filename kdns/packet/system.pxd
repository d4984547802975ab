# Foreign C declarations for the packet path, quarantined here (uvloop's includes/ idea):
# batched datagram syscalls (Linux recvmmsg/sendmmsg, glibc >= 2.14), the monotonic clock,
# and address formatting for handing client addresses back to Python.
from libc.stdint cimport uint16_t, uint32_t, uint8_t


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct sockaddr_storage:
        sa_family_t ss_family

    struct iovec:
        void *iov_base
        size_t iov_len

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct timespec:
        long tv_sec
        long tv_nsec

    int recvmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags, timespec *timeout)
    int sendmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)

    enum:
        AF_INET
        AF_INET6
        MSG_DONTWAIT
        MSG_TRUNC
        MSG_ERRQUEUE


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct in6_addr:
        uint8_t s6_addr[16]

    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    uint16_t ntohs(uint16_t)
    uint32_t ntohl(uint32_t)

    enum:
        INET6_ADDRSTRLEN


cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)


cdef extern from "<time.h>" nogil:
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clk, timespec *ts)
    int clock_nanosleep(int clk, int flags, const timespec *req, timespec *rem)


cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_PRIVATE
        MAP_ANONYMOUS
        MAP_NORESERVE
        MADV_DONTNEED


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EWOULDBLOCK
        EINTR
        ECONNREFUSED
        EHOSTUNREACH
        ENETUNREACH


cdef extern from *:
    """
    #include <errno.h>
    /* EAGAIN and EWOULDBLOCK are equal on Linux but not everywhere (POSIX allows both). */
    #define KDNS_WOULD_BLOCK(e) ((e) == EAGAIN || (e) == EWOULDBLOCK)
    """
    bint KDNS_WOULD_BLOCK(int e) nogil


cdef extern from *:
    """
    #include <stdio.h>
    #include <stdlib.h>
    #ifndef KDNS_DEBUG
    #define KDNS_DEBUG 0
    #endif
    /* KDNS_DEBUG=1 builds (setup.py) check packet-path invariants and abort loudly; normal
       builds compile the checks away. Python's own -DNDEBUG rules out plain assert(). */
    #define KDNS_CHECK(cond) do { if (KDNS_DEBUG && !(cond)) { \\
        fprintf(stderr, "kdns: packet path invariant failed: %s (%s:%d)\\n", \\
                #cond, __FILE__, __LINE__); abort(); } } while (0)
    """
    void KDNS_CHECK(bint cond) nogil


# compiled forwarding (includes/fwd.pxi): one epoll set over the upstream sockets
# (registered once with the worker's event loop) and the kernel CSPRNG for query IDs.
cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *ev)
    int epoll_wait(int epfd, epoll_event *evs, int maxevents, int timeout)


cdef extern from "<sys/random.h>" nogil:
    long getrandom(void *buf, size_t buflen, unsigned int flags)


cdef extern from "<unistd.h>" nogil:
    int close(int fd)

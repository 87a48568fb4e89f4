/* LD_PRELOAD shim for the I/O-error tests: while the file named by $FAIL_SYNCFS_FLAG
 * exists, syncfs(2) does its real work and then reports EIO, as the kernel does when the
 * writeback of some file of the filesystem failed. Every call is counted in
 * $FAIL_SYNCFS_FLAG.count when that file exists, so a test can tell a round happened. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int syncfs(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "syncfs");
    int rc = real(fd);
    const char *flag = getenv("FAIL_SYNCFS_FLAG");
    if (rc == 0 && flag && access(flag, F_OK) == 0) {
        errno = EIO;
        return -1;
    }
    return rc;
}

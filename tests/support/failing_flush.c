/* LD_PRELOAD shim for the I/O-error tests: while the file named by $FAIL_SYNCFS_FLAG
 * exists, syncfs(2), fsync(2) and fdatasync(2) do their real work and then report EIO, as
 * the kernel does when the writeback of a file failed. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static int broken(int rc)
{
    const char *flag = getenv("FAIL_SYNCFS_FLAG");
    if (rc == 0 && flag && access(flag, F_OK) == 0) {
        errno = EIO;
        return -1;
    }
    return rc;
}

#define WRAP(name)                                                  \
    int name(int fd)                                                \
    {                                                               \
        static int (*real)(int);                                    \
        if (!real)                                                  \
            real = (int (*)(int))dlsym(RTLD_NEXT, #name);           \
        return broken(real(fd));                                    \
    }

WRAP(syncfs)
WRAP(fsync)
WRAP(fdatasync)

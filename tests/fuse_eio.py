"""A real failing file for the tests: a read-only FUSE passthrough of one
directory that answers EIO for chosen byte ranges of chosen files.

    python tests/fuse_eio.py BACKING MOUNTPOINT 'FILE:START:END' ...

runs in the foreground until unmounted (``umount MOUNTPOINT``). A read
(``pread`` or a page fault of a mapping) that overlaps a listed range fails
with EIO, as a disk with a bad sector would; every other byte is the backing
file's. It runs as its own process: a page fault of the test process on a
file this process serves must not wait on the test's own interpreter lock.
"""

from __future__ import annotations

import errno
import os
import sys

from fuse import FUSE, FuseOSError, Operations


class EioPassthrough(Operations):
    def __init__(self, root: str, bad: dict[str, list[tuple[int, int]]]) -> None:
        self.root, self.bad = root, bad

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._path(path))
        except OSError as e:
            raise FuseOSError(e.errno) from None
        keys = ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid")
        out = {k: getattr(st, k) for k in keys}
        out.update(st_atime=st.st_atime, st_mtime=st.st_mtime, st_ctime=st.st_ctime)
        return out

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._path(path))]

    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FuseOSError(errno.EROFS)
        return os.open(self._path(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        for s, e in self.bad.get(path.lstrip("/"), ()):
            if offset < e and s < offset + size:
                raise FuseOSError(errno.EIO)
        return os.pread(fh, size, offset)

    def release(self, path, fh):
        os.close(fh)
        return 0


def main(argv: list[str]) -> None:
    root, mountpoint, *specs = argv
    bad: dict[str, list[tuple[int, int]]] = {}
    for spec in specs:
        name, s, e = spec.rsplit(":", 2)
        bad.setdefault(name, []).append((int(s), int(e)))
    FUSE(EioPassthrough(root, bad), mountpoint, foreground=True, ro=True, nothreads=False)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Root only as long as it takes: [server] user and group.

Started as root with `[server] user` set, geosmtp binds its ports, takes the spool's lock and
makes the directories it owns, then becomes that user for good (supplementary groups, group,
user, in that order) before it accepts a connection or reads the queue. The workers are
started after that, so neither they nor the queue manager ever run as root. Started as any
other user, `user` must be that user (or unset): a process that cannot switch refuses to
start rather than run as someone else than the file says.
"""
from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from loguru import logger


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"


def identity(user: str | None, group: str | None) -> Identity | None:
    """The [server] user and group as ids (the group defaults to the user's own); None when
    no user is set. Raises ValueError naming the key of an unknown name."""
    if user is None:
        if group is not None:
            raise ValueError("server.group: needs server.user")
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"server.user: no such user {user!r}") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"server.group: no such group {group!r}") from None
    return Identity(user, entry.pw_uid, gid)


def switch_problem(target: Identity | None) -> str | None:
    """Why this process cannot run as `target`, or None (it is root, or already `target`)."""
    if target is None or os.geteuid() == 0 or (os.geteuid(), os.getegid()) == (target.uid, target.gid):
        return None
    return (f"server.user: geosmtp runs as uid {os.geteuid()} and cannot become {target}; "
            "start it as root, or as that user")


def make_own_dirs(target: Identity | None, *dirs: str | os.PathLike) -> None:
    """As root, before dropping: each directory that does not exist yet is made (0700, with
    missing parents) and given to `target`, so it can work in it afterwards. Directories that
    exist are left as they are (the pre-flight checks say whether `target` may write them)."""
    if target is None or os.geteuid() != 0:
        return
    for d in map(Path, dirs):
        if not d.exists():
            d.mkdir(mode=0o700, parents=True)
            os.chown(d, target.uid, target.gid)


def give(target: Identity | None, fd: int) -> None:
    """As root: the open file (the spool's lock) belongs to `target` from now on."""
    if target is not None and os.geteuid() == 0:
        os.fchown(fd, target.uid, target.gid)


def drop(target: Identity | None) -> None:
    """Become `target` for good: supplementary groups, then group, then user (each call
    needs the privilege the next one gives up). Checked afterwards: every uid and gid is the
    target's, and getting root back fails. Raises OSError when it cannot."""
    if target is None or (os.getresuid(), os.getresgid()) == ((target.uid,) * 3, (target.gid,) * 3):
        return
    problem = switch_problem(target)
    if problem:
        raise OSError(problem)
    os.setgroups(os.getgrouplist(target.name, target.gid))
    os.setgid(target.gid)
    os.setuid(target.uid)
    if os.getresuid() != (target.uid,) * 3 or os.getresgid() != (target.gid,) * 3:
        raise OSError(f"server.user: could not become {target} (uids {os.getresuid()}, gids {os.getresgid()})")
    if target.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise OSError(f"server.user: became {target} but could get root back")
    logger.info("running as {}", target)

"""Pre-flight checks: open everything the configuration names, as the server will, before it
starts, and say what is wrong with each ("key: file: problem"), all at once.

`geosmtp check-config` and `geosmtp start` both run check(). It reads files and directories
but changes nothing. Access is judged for the user geosmtp will run as (uid, gid and that
user's groups), from mode bits and read-only mounts; ACLs are not read. A reload (SIGHUP)
reads the certificate, key, users file, DKIM keys and password file again as that user, so
they must be readable by it, not only by whoever starts the server.
"""
from __future__ import annotations

import os
import pwd
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from geosmtp import privileges
from geosmtp.auth import UserStore, read_secret
from geosmtp.config import CertificateConfig, Config, TLSConfig
from geosmtp.dkim import load_key
from geosmtp.spool import STATES
from geosmtp.tls import Certificate, TLSSettings, server_context

R, W, X = 4, 2, 1


@dataclass(frozen=True)
class RunAs:
    """The user the server's files must serve."""

    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of(cls, uid: int | None = None, gid: int | None = None) -> RunAs:
        """That uid and gid (default: this process's) and the uid's groups."""
        if uid is None or (uid == os.geteuid() and gid in (None, os.getegid())):
            return cls(os.geteuid(), os.getegid(), frozenset({os.getegid(), *os.getgroups()}))
        try:
            entry = pwd.getpwuid(uid)
            gid = entry.pw_gid if gid is None else gid
            groups = frozenset(os.getgrouplist(entry.pw_name, gid))
        except KeyError:  # a uid without a passwd entry has only its own group
            gid = uid if gid is None else gid
            groups = frozenset()
        return cls(uid, gid, groups | {gid})

    def __str__(self) -> str:
        return f"uid {self.uid}"

    def may(self, st: os.stat_result, want: int) -> bool:
        """Would the kernel allow `want` (R|W|X bits) on this inode (ignoring ACLs)?"""
        if self.uid == 0:  # root reads and writes anything; searching a directory too
            return True
        if st.st_uid == self.uid:
            bits = st.st_mode >> 6
        elif st.st_gid in self.groups:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        return bits & want == want


def _reach(path: Path, user: RunAs) -> str | None:
    """Why `user` cannot get to `path` through its parent directories, or None."""
    for parent in reversed(path.parents):
        try:
            st = parent.stat()
        except OSError as exc:
            return f"{parent}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{parent} is not a directory"
        if not user.may(st, X):
            return f"{parent} is not searchable by {user}"
    return None


def readable_file(path: str | os.PathLike, user: RunAs) -> str | None:
    """Why `user` cannot read the file at `path`, or None."""
    path = Path(os.path.abspath(path))
    problem = _reach(path, user)
    if problem:
        return problem
    try:
        st = path.stat()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file"
    if not user.may(st, R):
        return f"{path}: not readable by {user} (owner {st.st_uid}, mode {st.st_mode & 0o777:o})"
    return None


def _writable_here(path: Path, st: os.stat_result, user: RunAs) -> str | None:
    if not stat.S_ISDIR(st.st_mode):
        return f"{path}: not a directory"
    if not user.may(st, W | X):
        return f"{path}: not writable by {user} (owner {st.st_uid}, mode {st.st_mode & 0o777:o})"
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        return f"{path}: on a read-only filesystem"
    return None


def writable_dir(path: str | os.PathLike, user: RunAs) -> str | None:
    """Why `user` cannot create files in the directory `path`, or make it (the server makes
    missing directories at start), or None."""
    path = Path(os.path.abspath(path))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = _reach(existing, user) or _writable_here(existing, existing.stat(), user)
    if problem and existing != path:
        return f"{path}: does not exist and cannot be made: {problem}"
    return problem


def usable_file(path: str | os.PathLike, user: RunAs, load: Callable[[str], object]) -> str | None:
    """Why the file at `path` is of no use: `user` cannot read it, or `load(path)` (what the
    server does with it) fails. The loaders' ValueErrors name the file."""
    problem = readable_file(path, user)
    if problem:
        return problem
    try:
        load(str(path))
    except ValueError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


def load_certificates(path: str) -> None:
    """Raises ValueError unless the file holds at least one PEM certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ValueError(f"{path}: no PEM certificate in it ({exc.reason or exc})") from None


def load_key_for(cert: CertificateConfig, tls: TLSConfig) -> Callable[[str], None]:
    """The listeners' loader for a key file: it must parse and match its certificate."""

    def load(key_file: str) -> None:
        try:
            load_certificates(str(cert.cert_file))
        except (OSError, ValueError):
            return  # the certificate's own problem, told under its cert_file
        settings = TLSSettings((Certificate(str(cert.cert_file), key_file),), tls.min_version, tls.ciphers,
                               tls.ciphersuites, tls.session_tickets)
        try:
            server_context(settings.certificates[0], settings)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(f"{key_file}: does not match the certificate in {cert.cert_file}") from None
            why = f" ({exc.reason})" if exc.reason else ""  # OpenSSL's "PEM lib" says no more
            raise ValueError(f"{key_file}: not a PEM private key{why}") from None
        except ValueError as exc:  # an encrypted key (tls.server_context never prompts)
            raise ValueError(f"{key_file}: {exc}") from None

    return load


def sqlite_directory(path: str) -> None:
    """An SQLite directory with its tables (PostgreSQL is not asked: a server whose database
    is down starts, and answers 4xx until it is back)."""
    from geosmtp.directory import DirectoryUnavailable
    from geosmtp.directory.sql import ENTRY
    from geosmtp.directory.sqlite import SQLiteEngine

    engine = SQLiteEngine(path)
    try:
        engine.rows(ENTRY, ("", ""))
    except DirectoryUnavailable as exc:
        raise ValueError(f"{exc} (make the tables with `geosmtp directory init`)") from None
    finally:
        engine.close()


def named_files(config: Config) -> list[tuple[str, Path, Callable[[str], object]]]:
    """(key, file, loader) for every file the configuration names."""
    out: list[tuple[str, Path, Callable[[str], object]]] = []
    if config.tls is not None:
        tls = config.tls
        keys = ["tls"] * (tls.cert_file is not None) + [f"tls.certificate[{i}]" for i in range(len(tls.certificate))]
        for where, cert in zip(keys, tls.certificates()):
            out.append((f"{where}.cert_file", cert.cert_file, load_certificates))
            out.append((f"{where}.key_file", cert.key_file, load_key_for(cert, config.tls)))
    if config.auth.users_file is not None:
        out.append(("auth.users_file", config.auth.users_file, UserStore.load))
    if config.directory.backend == "sqlite":
        out.append(("directory.path", config.directory.path, sqlite_directory))
    if config.directory.password_file is not None:
        out.append(("directory.password_file", config.directory.password_file, read_secret))
    for index, k in enumerate(config.dkim.key):
        out.append((f"dkim.key[{index}].key_file", k.key_file,
                    lambda path, k=k: load_key(k.domain, k.selector, path, k.algorithm)))
    if config.relay.smarthost_password_file is not None:
        out.append(("relay.smarthost_password_file", config.relay.smarthost_password_file, read_secret))
    if config.relay.ca_file is not None:
        out.append(("relay.ca_file", config.relay.ca_file, load_certificates))
    return out


def check_files(config: Config, user: RunAs) -> list[str]:
    """Each named file: readable by `user` and loaded as the server loads it."""
    return [f"{key}: {problem}" for key, path, load in named_files(config)
            if (problem := usable_file(path, user, load))]


def check_spool(spool: Path, user: RunAs) -> list[str]:
    """The spool, the subdirectories and lock file the server would otherwise make."""
    problem = writable_dir(spool, user)
    if problem:
        return [problem]
    subdirs = [spool / "tmp", spool / "msg", spool / "queue", *(spool / "queue" / s for s in STATES)]
    problems = [problem for path in subdirs if os.path.lexists(path) and (problem := writable_dir(path, user))]
    lock = spool / "lock"
    if os.path.lexists(lock):
        try:
            st = lock.stat()
            usable = stat.S_ISREG(st.st_mode) and user.may(st, R | W)
        except OSError:
            usable = False
        if not usable:
            problems.append(f"{lock}: not a file {user} may read and write")
    return problems


def check_maildir(root: Path, domains: list[str], user: RunAs) -> list[str]:
    """The Maildir root, and each local domain's folder of mailboxes that exists already."""
    problem = writable_dir(root, user)
    if problem:
        return [problem]
    return [problem for domain in domains
            if os.path.lexists(root / domain) and (problem := writable_dir(root / domain, user))]


def check_dirs(config: Config, user: RunAs) -> list[str]:
    spool = Path(os.path.abspath(config.server.spool_dir))
    root = Path(os.path.abspath(config.local.maildir_root))
    # started as root with a user to become, the missing ones are made and given to the user
    # (privileges.make_own_dirs): only those that exist must suit the user already
    made_for_user = config.server.user is not None and os.geteuid() == 0
    out = []
    if not (made_for_user and not spool.exists()):
        out += [f"server.spool_dir: {p}" for p in check_spool(spool, user)]
    if not (made_for_user and not root.exists()):
        out += [f"local.maildir_root: {p}" for p in check_maildir(root, config.local.domains, user)]
    return out


def check(config: Config, uid: int | None = None, gid: int | None = None) -> list[str]:
    """Every problem with what `config` names, for the server running as uid/gid (default:
    [server] user and group, else this process's user); [] when it can start."""
    if uid is None and config.server.user is not None:
        try:
            target = privileges.identity(config.server.user, config.server.group)
        except ValueError as exc:
            return [str(exc)]
        uid, gid = target.uid, target.gid
    user = RunAs.of(uid, gid)
    return check_files(config, user) + check_dirs(config, user)

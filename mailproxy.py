#!/usr/bin/env python3
"""mailproxy: an IMAP, POP3, SMTP and ManageSieve proxy in one file, standard library only.

A client connects; mailproxy speaks the mail protocol with it up to
authentication, decides who the user is and which backend serves them, logs in
to that backend on the user's behalf, then relays bytes both ways until either
side is done.  It does the job of nginx's mail proxy (the ngx_mail_* modules):
the same directive names, defaults and replies.

The picture::

 client socket ─ Stream ─[TlsLayer]─┐                     ┌─ Stream ─[TlsLayer]─ backend socket
        ClientOpening (PROXY, TLS) ──┤      Session        ├── BackendConnection
               ClientMachine ◄───────┤ (phases, Deadline,  ├────► BackendLogin (a script of steps)
               (IMAP / POP3 / SMTP)  │  SessionLog)        │
                                     │                     │
   UserTableAuth, AuthHttpAuth  ◄────┤                     ├────► Relay (splice, or two bounded buffers)
   or BackendAuth                    │                     │
                                     └─────────────────────┘
 EventLoop (selectors + timer heap + signal wake-up fd) drives Streams; a master forks workers.

How to read this file: top to bottom.  Each section uses only the sections
above it; ``grep '^# .*####' mailproxy.py`` prints the table of contents.
The protocol machines, the backend login scripts, the auth_http request and
response, the PROXY headers, the DNS messages, the password schemes and the
TLS layer are *sans-I/O*: they take bytes and return bytes and events, and
never touch a socket, the clock or the logger, so the tests drive them with
byte strings.  Only the event loop, streams, listeners and the process
section do I/O.  README.md says what each directive does.

Follow one login (IMAP LOGIN with the built-in user table), in order:

 1. Worker.accept makes a Session (Sessions); its ClientOpening owns the
    client stream through the PROXY header and the TLS handshake, if any,
    then Session.opened sends the machine's greeting.
 2. Stream.on_readable -> Session.stream_data -> ImapMachine.receive_data
    (Client machines): ImapScanner reads "a1 LOGIN alice secret",
    ClientMachine._dispatch finds LOGIN in IMAP_COMMAND_TABLE, and
    ImapMachine._login returns a Credentials event.
 3. Session._authenticate hands a LoginAttempt to its authenticator, a
    LoginGuard (Sessions): the login defence's LoginGate lets it through
    when a slot is free (LoginDefence, Authentication), and the guard
    starts UserTableAuth.start
    (Authentication; with auth_http, AuthHttpAuth in Outbound clients;
    with auth = backend, BackendAuth, whose own backend login is the
    verdict and whose connection the session then takes over):
    authenticate -> password_matches -> an AuthOutcome, at once for a
    {PLAIN} entry; a hashed one is checked in a thread of the worker's
    PasswordCheckPool (Outbound clients), and the verdict comes back
    through the loop's wake-up; the guard counts a failure (its delay) or
    the session against max_user_sessions, and hands the outcome on.
 4. Session._auth_outcome -> _login_to_backend: login_script builds the
    backend's script (Backend login), BackendConnection (Outbound clients)
    connects and runs it with BackendLogin until LoginDone.  When the
    route names an [upstream NAME] pool, its Pool (Backend pools) picks
    the server, and BackendConnection goes on with the next one if that
    one fails before its greeting is through.
 5. Session.backend_logged_in passes the backend's "a1 OK" on and
    start_relay (Relay) relays both ways until a side closes;
    Session.close has SessionLog write the access line.
"""

import base64
import binascii
import bisect
import collections
import configparser
import dataclasses
import enum
import errno
import functools
import gc
import getpass
import hashlib
import heapq
import hmac
import ipaddress
import json
import math
import os
import queue
import random
import re
import selectors
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

try:
    import resource          # POSIX only: the open-file limit
except ImportError:          # pragma: no cover - Windows
    resource = None
try:
    import fcntl             # POSIX only: the lock of the shared session counter
except ImportError:          # pragma: no cover - Windows
    fcntl = None
try:
    import ctypes            # not in every Python build: bcrypt, Argon2, libssl, process names
    import ctypes.util
except ImportError:          # pragma: no cover - a Python built without libffi
    ctypes = None

__version__ = "0.1.0"

# ---------------------------------------------------------------------------
# Limits, each with where it comes from.
# ---------------------------------------------------------------------------
PAGE_SIZE = 4096               # nginx's default for *_client_buffer, proxy_buffer
POP3_BUFFER_NGINX = 128        # nginx hard-codes the POP3 command buffer
IMAP_MAX_ARGS = 3              # ngx_mail_parse.c: "s->args.nelts <= 2" before a 3rd
IMAP_ID_MAX_ARGS = 64          # RFC 2971 §3.3: at most 30 field-value pairs
IMAP_MAX_TAG = 32              # nginx >= 1.29.6 refuses longer tags
POP3_MAX_ARGS = 3              # ngx_pop3_parse_command
READ_SIZE = 65536              # one recv(); independent of proxy_buffer
READS_PER_EVENT = 16           # recv() calls per readiness event, while data flows
ACCEPTS_PER_EVENT = 64         # accept() calls per readiness event
ACCEPT_PAUSE = 0.5             # seconds without accept() after EMFILE/ENFILE
LOGIN_TIME_LIMIT = 180.0       # s from connect to login at most (or ``timeout``, if longer):
                               # Dovecot's CLIENT_LOGIN_TIMEOUT_MSECS; nginx has no such bound
# The failed-login defence (LoginDefence; README "Failed logins"):
AUTH_PENALTY_MAX = 15.0        # s: the longest a failed login's reply waits (Dovecot's auth_penalty)
AUTH_PENALTY_WINDOW = 900.0    # s without a failure after which an address or account is forgotten
AUTH_PENALTY_SLOTS = 4         # logins at once per address and per account; a delay holds one
AUTH_PAIR_LIMIT = 10           # different wrong passwords for one account from one address,
                               # after which that account is refused there, for the window
AUTH_PENALTY_TABLE = 4096      # addresses, accounts, pairs remembered at most (oldest go)
AUTH_PAIR_PASSWORDS = 8        # wrong passwords remembered per pair, as keyed digests
AUTH_SLOT_RECHECK = 0.05       # s: asked again when only logins under way hold the slots
SHARED_EVENT_MAX = 4096        # bytes of one shared-book event as sent (JSON): an address, a
                               # login, a few numbers; far below an AF_UNIX datagram's limit
SHARED_QUEUE_MAX = 1024        # events kept for a process that reads none (the oldest dropped)
SHARED_READS_PER_EVENT = 64    # shared-book datagrams read per readiness event
DNS_RESEND = 1.0               # seconds before a DNS query is sent again (next server)
DNS_MAX_CNAMES = 8             # CNAME hops followed in one lookup (in answers and by new queries)
DNS_MAX_POINTERS = 64          # compression pointers followed in one name (RFC 1035 §4.1.4)
DNS_CACHE_SIZE = 4096          # answers kept per resolver
DNS_NEGATIVE_TTL = 30.0        # seconds an NXDOMAIN is kept without valid=
PBKDF2_DEFAULT_ROUNDS = 100000 # --hash-password; see README "The user table"
# The longest password any [users] scheme is asked to check; a longer one is
# answered as a wrong password, after the work of the longest allowed one.
# SHA-crypt's work grows with the password (steps 13-15 of Drepper's
# specification hash it len times over: 16 KB took 0.7 s), so the length must
# be bounded.  511 bytes: libxcrypt, the crypt(3) of current Linux
# distributions (/etc/shadow), refuses passphrases of CRYPT_MAX_PASSPHRASE_SIZE
# (512) bytes counting the NUL, so no crypt hash made there holds a longer
# one; RFC 4616 §2 asks SASL PLAIN servers to accept 255-byte passwords.
PASSWORD_MAX = 511
LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")   # nginx, lowest first


# ========================================================================== #
# ####                              Errors                              #### #
# ========================================================================== #
# Every exception the program raises on purpose.  A ConfigError names the
# place in the file; a BackendError what the backend said.  (A client that
# breaks the protocol is not an exception: its machine answers and ends.)

class ConfigError(Exception):
    """A problem in the configuration file, with its place."""

    def __init__(self, file: str, section: Optional[str], directive: Optional[str],
                 message: str, line: Optional[int] = None):
        super().__init__(message)
        self.file = file
        self.section = section
        self.directive = directive
        self.message = message
        self.line = line

    def __str__(self) -> str:
        place = self.file if self.line is None else "%s:%d" % (self.file, self.line)
        where = ""
        if self.section is not None:
            where += " [%s]" % self.section
        if self.directive is not None:
            where += " %s:" % self.directive
        return "%s:%s %s" % (place, where, self.message)


class ConfigErrors(Exception):
    """All problems found in one file; -t prints every one of them."""

    def __init__(self, errors: List[ConfigError]):
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


class BackendError(Exception):
    """The backend did not log the user in.  ``line`` is what it said, if
    anything (for the log); ``refusal``: it is a reply of the protocol that
    may go to the client as it is (proxy_pass_error_message)."""

    def __init__(self, message: str, line: bytes = b"", refusal: bool = False,
                 verdict: bool = False):
        super().__init__(message)
        self.line = line
        self.refusal = refusal
        self.verdict = verdict         # a no to the client's own login and password

    @property
    def outcome(self) -> str:
        """The session's outcome, for the access line."""
        return "upstream refused the login" if self.line else str(self)


class UnexpectedGreeting(BackendError):
    """The backend greeted in another protocol (or none): a route or a
    proxy_pass with the wrong port, most likely.  Never passed on."""
    outcome = "upstream sent an unexpected greeting"


# ========================================================================== #
# ####                            Error log                             #### #
# ========================================================================== #
# nginx's error-log line: "2026/11/20 21:38:00 [info] 4711#0: *3 message
# while ACTION, client: ..., server: ..." (README, "Logs").  Destinations are
# opened by the process section; this class only formats and filters.  A line
# is written with one write() so that lines from several processes never mix.

def log_escape(data: bytes) -> str:
    """Bytes from the wire made safe for one log line: no CR, LF or other
    control byte can start a fake line (nginx escapes the same way)."""
    out = []
    for byte in data:
        if byte < 0x20 or byte >= 0x7F or byte in (0x22, 0x5C):
            out.append("\\x%02x" % byte)
        else:
            out.append(chr(byte))
    return "".join(out)


SYSLOG_SEVERITIES = {"debug": 7, "info": 6, "notice": 5, "warn": 4, "error": 3,
                     "crit": 2, "alert": 1, "emerg": 0}
SYSLOG_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "intern", "lpr", "news", "uucp",
                     "clock", "authpriv", "ftp", "ntp", "audit", "alert", "cron", "local0",
                     "local1", "local2", "local3", "local4", "local5", "local6", "local7")


class SyslogTarget:
    """An RFC 3164 syslog destination, as nginx's ``syslog:server=...``: one
    datagram per line, ``<PRI>Mmm dd hh:mm:ss HOST TAG: MESSAGE``, sent
    without waiting (a full or absent syslog loses lines, never blocks)."""

    def __init__(self, sock: socket.socket, address, facility: int, tag: str, hostname: bool):
        self.sock = sock
        self.address = address
        self.facility = facility
        self.tag = tag
        self.hostname = socket.gethostname() if hostname else ""

    def send_line(self, level: str, body: str) -> None:
        stamp = time.strftime("%b %d %H:%M:%S")
        if stamp[4] == "0":
            stamp = stamp[:4] + " " + stamp[5:]       # RFC 3164 §4.1.2: "Nov  1"
        header = "<%d>%s %s%s: " % (self.facility * 8 + SYSLOG_SEVERITIES[level], stamp,
                                    self.hostname + " " if self.hostname else "", self.tag)
        try:
            self.sock.sendto((header + body).encode("utf-8", "replace")[:2048], self.address)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class ErrorLog:
    """Writes nginx-format lines to one or more destinations, each with its
    lowest level.  ``destinations``: list of (target, level name); a target
    is a binary file (one write per line, so that lines of several
    processes never mix) or a SyslogTarget."""

    def __init__(self, destinations: List[Tuple[object, str]]):
        self.destinations = destinations
        self.lowest = min((LOG_LEVELS.index(level) for _, level in destinations),
                          default=len(LOG_LEVELS))

    def enabled(self, level: str) -> bool:
        return LOG_LEVELS.index(level) >= self.lowest

    def log(self, level: str, message: str, session: Optional[int] = None,
            context: str = "") -> None:
        rank = LOG_LEVELS.index(level)
        if rank < self.lowest:
            return
        body = "[%s] %d#0: %s%s%s" % (level, os.getpid(),
                                      "" if session is None else "*%d " % session, message, context)
        data = ("%s %s\n" % (time.strftime("%Y/%m/%d %H:%M:%S"), body)).encode("utf-8", "replace")
        for target, threshold in self.destinations:
            if rank < LOG_LEVELS.index(threshold):
                continue
            if isinstance(target, SyslogTarget):
                target.send_line(level, body)
                continue
            try:
                target.write(data)
                target.flush()
            except (OSError, ValueError):
                pass                   # a full disk must not stop the proxy


# ========================================================================== #
# ####                          Configuration                           #### #
# ========================================================================== #
# INI file -> validated settings, with nginx's directive names, value syntax
# and defaults.  One table, DIRECTIVES, knows every directive of the eight
# nginx mail modules; one loader reads the file and one merge gives each
# [server] the values of [mail] it does not override.  This section only reads
# the file: it opens no socket and sets up no logging.

ALL_AUTH_METHODS = {
    # protocol: the methods nginx knows, in nginx's bit order (which is also
    # the order they are advertised in, whatever the order in the config);
    # xoauth2 and oauthbearer are mailproxy's extension (with auth_http).
    "imap": ("plain", "login", "cram-md5", "external", "xoauth2", "oauthbearer"),
    "pop3": ("plain", "apop", "cram-md5", "external", "xoauth2", "oauthbearer"),
    "smtp": ("plain", "login", "cram-md5", "external", "xoauth2", "oauthbearer", "none"),
    # ManageSieve (RFC 5804) is SASL only; nginx has no sieve module.
    "sieve": ("plain", "login", "external", "xoauth2", "oauthbearer"),
}

WELL_KNOWN_PORTS = {143: "imap", 993: "imap", 110: "pop3", 995: "pop3",
                    25: "smtp", 465: "smtp", 587: "smtp", 4190: "sieve"}   # RFC 5804 §1.8

# sieve_capabilities' default: the entries of the ManageSieve greeting (RFC
# 5804 §1.7), each "NAME [VALUE]"; SieveMachine adds SASL and STARTTLS.
SIEVE_DEFAULT_CAPABILITIES = ("IMPLEMENTATION mailproxy", "SIEVE fileinto reject envelope vacation",
                              "VERSION 1.0")
SIEVE_MACHINE_CAPABILITIES = ("SASL", "STARTTLS")      # what the settings decide, not the list
# A protocol's ALPN name where it is not the protocol's own (IANA's TLS
# ALPN protocol IDs: "imap", "pop3", "managesieve").
ALPN_NAMES = {"sieve": "managesieve"}


NGINX_LISTEN_BACKLOG = 511     # NGX_LISTEN_BACKLOG on Linux
UNIX_PATH_MAX = 108            # sizeof(sun_path) on Linux, the NUL included


class Listen(NamedTuple):
    """One ``listen`` occurrence: where to accept and how."""
    host: str                  # "0.0.0.0", "::", an address literal, or "unix:/PATH"
    port: int                  # 0 for a unix: socket
    family: int                # socket.AF_INET, socket.AF_INET6 or socket.AF_UNIX
    ssl: bool = False          # implicit TLS (IMAPS 993, POP3S 995, SMTPS 465)
    proxy_protocol: bool = False   # a PROXY header comes first (HAProxy and the like)
    backlog: int = NGINX_LISTEN_BACKLOG
    so_keepalive: Optional[Tuple] = None   # None, (False,) or (True, idle, intvl, cnt)
    rcvbuf: Optional[int] = None
    sndbuf: Optional[int] = None
    ipv6only: bool = True

    @property
    def text(self) -> str:
        """The address as nginx prints it in logs: 127.0.0.1:143, [::1]:143
        or unix:/run/imap.sock."""
        if self.port == 0:
            return self.host
        if self.family == socket.AF_INET6:
            return "[%s]:%d" % (self.host, self.port)
        return "%s:%d" % (self.host, self.port)


class Upstream(NamedTuple):
    """A backend address as written (``host``) and as resolved (``addresses``).
    With ``pool``, the login goes through the [upstream NAME] pool of that
    name (README "Several backends"): ``port`` 0 and no addresses when the
    pool itself was named; an address of one of its servers (an auth
    server's Auth-Server) is that server tried first."""
    host: str
    port: int
    addresses: Tuple           # ((family, sockaddr), ...) resolved at load time
    pool: str = ""             # the [upstream NAME] it goes through; "": none

    @property
    def text(self) -> str:
        if self.pool and not self.port:
            return self.pool
        return "%s:%d" % (self.host, self.port)


def pool_upstream(name: str) -> Upstream:
    """The Upstream of a pool named by its name (proxy_pass, [routes])."""
    return Upstream(name, 0, (), name)


class UpstreamServer(NamedTuple):
    """One ``server`` line of an [upstream NAME] section, after nginx's
    upstream module: its address, weight=, max_fails= (0: never taken out),
    fail_timeout=, and the flags backup (used only when no other server
    is), down (never used) and drain (extension: no new sessions, the
    running ones go on)."""
    address: Upstream
    weight: int = 1
    max_fails: int = 1
    fail_timeout: float = 10.0
    backup: bool = False
    down: bool = False
    drain: bool = False

    @property
    def text(self) -> str:
        return self.address.text


class UpstreamSpec(NamedTuple):
    """An [upstream NAME] section as read: its servers in file order and
    how a login picks one (``balance``).  The choosing itself, and what is
    learned of the servers while running, is the Pool's (Backend pools)."""
    name: str
    servers: Tuple[UpstreamServer, ...]
    balance: str = "round_robin"
    health_check: Optional["HealthCheck"] = None    # None: off
    overrides: Tuple[Tuple[str, object], ...] = ()   # the backend dialogue's directives it sets


class ConfigValueError(Exception):
    """A value parser's complaint; the loader adds file, section and line.
    ``directive``: the one at fault when another found it (the TLS section
    names the ssl_certificate_key whose file does not load)."""

    def __init__(self, message: str, directive: Optional[str] = None):
        super().__init__(message)
        self.directive = directive


NGINX_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "t": "\t", "r": "\r", "n": "\n"}


def split_arguments(text: str) -> List[str]:
    """Split a value into nginx arguments: spaces separate, quotes group.

    As nginx's ngx_conf_read_token: a backslash before a quote or a
    backslash stands for that character, ``\\t`` ``\\r`` ``\\n`` for tab, CR
    and LF, and any other backslash is kept (``"C:\\mail"``); a closing
    quote must be followed by a space or the end.
    """
    args = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        quote = text[i] if text[i] in "\"'" else None
        i += 1 if quote else 0
        arg = []
        while i < len(text) and (text[i] != quote if quote else not text[i].isspace()):
            if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in NGINX_ESCAPES:
                arg.append(NGINX_ESCAPES[text[i + 1]])
                i += 2
                continue
            arg.append(text[i])
            i += 1
        if quote:
            if i >= len(text):
                raise ConfigValueError("unbalanced quote in %r" % text)
            i += 1
            if i < len(text) and not text[i].isspace():
                raise ConfigValueError('unexpected "%s" after a closing quote' % text[i])
        args.append("".join(arg))
    return args


def one_argument(args: List[str]) -> str:
    if len(args) != 1:
        raise ConfigValueError("takes one value, got %d" % len(args))
    return args[0]


def parse_flag(args: List[str], base: str = "") -> bool:
    """``on`` or ``off`` (case-insensitive, as ngx_conf_set_flag_slot)."""
    value = one_argument(args).lower()
    if value not in ("on", "off"):
        raise ConfigValueError('invalid value "%s", it must be "on" or "off"' % args[0])
    return value == "on"


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024, "g": 1024 * 1024 * 1024}


def parse_size(args: List[str], base: str = "") -> int:
    """nginx sizes: ``512``, ``4k``, ``1m``, ``1g`` (ngx_parse_size)."""
    value = one_argument(args)
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    if not match:
        raise ConfigValueError('invalid size "%s"' % value)
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400,
               "w": 7 * 86400, "M": 30 * 86400, "y": 365 * 86400}


def parse_time(args: List[str], base: str = "") -> float:
    """nginx times in seconds: ``500ms``, ``15s``, ``5m``, ``1h30m``, ``60``."""
    value = one_argument(args)
    if re.fullmatch(r"\d+", value):
        return float(value)
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|M|y)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ConfigValueError('invalid time "%s"' % value)
    sizes = [_TIME_UNITS[unit] for _, unit in parts]
    if any(later >= earlier for earlier, later in zip(sizes, sizes[1:])):
        # ngx_parse_time: each unit smaller than the one before ("1h30m").
        raise ConfigValueError('invalid time "%s": units must go from largest to smallest' % value)
    return sum(int(n) * _TIME_UNITS[u] for n, u in parts)


def parse_msec(args: List[str], base: str = "") -> float:
    """A time nginx keeps in milliseconds (ngx_conf_set_msec_slot: timeout,
    proxy_timeout, ...), in seconds like every time here: a number without
    a unit is milliseconds, as nginx reads it ("timeout 1200000;" in
    Mastering NGINX is 20 minutes, not 14 days)."""
    value = one_argument(args)
    if re.fullmatch(r"\d+", value):
        return int(value) / 1000.0
    return parse_time(args)


def parse_number(args: List[str], base: str = "") -> int:
    value = one_argument(args)
    if not re.fullmatch(r"\d+", value):
        raise ConfigValueError('invalid number "%s"' % value)
    return int(value)


def parse_positive(args: List[str], base: str = "") -> int:
    number = parse_number(args)
    if number < 1:
        raise ConfigValueError("must be at least 1")
    return number


def parse_string(args: List[str], base: str = "") -> str:
    return one_argument(args)


def parse_protocol(args: List[str], base: str = "") -> str:
    value = one_argument(args)
    if value not in ALL_AUTH_METHODS:
        raise ConfigValueError('unknown protocol "%s"' % value)
    return value


def parse_worker_processes(args: List[str], base: str = "") -> int:
    """``N`` or ``auto`` (one per CPU this process may run on, as nginx)."""
    value = one_argument(args)
    if value == "auto":
        if hasattr(os, "sched_getaffinity"):
            return max(1, len(os.sched_getaffinity(0)))
        return max(1, os.cpu_count() or 1)
    return parse_positive(args)


def parse_user(args: List[str], base: str = "") -> Tuple[int, int, str]:
    """``USER [GROUP]`` -> (uid, gid, text); the group defaults to USER's own
    group (nginx defaults to a group named like the user; both are common)."""
    if not 1 <= len(args) <= 2:
        raise ConfigValueError("takes a user and an optional group")
    try:
        import grp
        import pwd
    except ImportError:
        raise ConfigValueError("this system has no users and groups (no pwd module)")
    try:
        entry = pwd.getpwnam(args[0])
    except KeyError:
        raise ConfigValueError('getpwnam("%s") failed' % args[0])
    gid = entry.pw_gid
    if len(args) == 2:
        try:
            gid = grp.getgrnam(args[1]).gr_gid
        except KeyError:
            raise ConfigValueError('getgrnam("%s") failed' % args[1])
    return entry.pw_uid, gid, " ".join(args)


def parse_host_port(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)", text) or \
        re.fullmatch(r"([^:\[\]\s]+):(\d+)", text)
    if not match:
        raise ConfigValueError('invalid address "%s", expected HOST:PORT' % text)
    port = int(match.group(2))
    if not 0 < port < 65536:
        raise ConfigValueError('invalid port in "%s"' % text)
    return match.group(1), port


def parse_proxy_pass(args: List[str], base: str = "") -> Upstream:
    """Extension: the backend for the built-in user table, resolved now;
    or a word without a colon, the name of an [upstream NAME] pool.

    The name is looked up once, when the configuration is read (as nginx does
    for upstream names), so that no session ever waits for DNS.
    """
    value = one_argument(args)
    if ":" not in value and POOL_NAME.fullmatch(value):
        return pool_upstream(value)    # an [upstream NAME]: load_config checks it exists
    host, port = parse_host_port(value)
    return resolve_upstream(host, port)


POOL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def parse_upstream_server(args: List[str], base: str = "") -> UpstreamServer:
    """``server = ADDRESS:PORT [weight=N] [max_fails=N] [fail_timeout=TIME]
    [backup] [down] [drain]`` of an [upstream NAME] section, nginx's
    parameters with nginx's defaults (max_fails=1, fail_timeout=10s); the
    address is resolved now, as proxy_pass's."""
    if not args:
        raise ConfigValueError("needs an address, ADDRESS:PORT")
    host, port = parse_host_port(args[0])
    options = {"address": resolve_upstream(host, port)}
    for flag in args[1:]:
        name, equals, value = flag.partition("=")
        if not equals and name in ("backup", "down", "drain"):
            options[name] = True
        elif equals and name == "weight":
            options[name] = parse_positive([value])
        elif equals and name == "max_fails":
            options[name] = parse_number([value])
        elif equals and name == "fail_timeout":
            options[name] = parse_time([value])
        else:
            raise ConfigValueError('invalid parameter "%s"' % flag)
    return UpstreamServer(**options)


BALANCE_METHODS = ("round_robin", "least_conn", "user_hash")


class HealthCheck(NamedTuple):
    """``health_check = on``: every ``interval``, connect to each server and
    wait ``timeout`` at most for its greeting (HealthChecks)."""
    interval: float = 5.0      # nginx Plus's health_check default
    timeout: float = 5.0


def parse_health_check(args: List[str], base: str = "") -> Optional[HealthCheck]:
    """``health_check = off | on [interval=TIME] [timeout=TIME]``; None: off."""
    if args == ["off"]:
        return None
    if not args or args[0] != "on":
        raise ConfigValueError('invalid value "%s", it must be "off" or "on"' % " ".join(args))
    options = {}
    for flag in args[1:]:
        name, equals, value = flag.partition("=")
        if not equals or name not in ("interval", "timeout"):
            raise ConfigValueError('invalid parameter "%s"' % flag)
        options[name] = parse_time([value])
        if options[name] <= 0:
            raise ConfigValueError('"%s" must be more than 0' % flag)
    return HealthCheck(**options)


def resolve_upstream(host: str, port: int) -> Upstream:
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ConfigValueError('host not found in "%s:%d": %s' % (host, port, error.strerror))
    addresses = tuple((family, sockaddr) for family, _, _, _, sockaddr in infos
                      if family in (socket.AF_INET, socket.AF_INET6))
    if not addresses:
        raise ConfigValueError('no IPv4 or IPv6 address for "%s"' % host)
    return Upstream(host, port, addresses)


def parse_listen(args: List[str], base: str = "") -> Listen:
    """nginx's ``listen``: ``ADDRESS:PORT``, ``PORT``, ``*:PORT``, ``[IPV6]:PORT``,
    ``unix:PATH`` (relative to the file's directory) and the flags
    ``backlog=N``, ``so_keepalive=on|off|IDLE:INTVL:CNT``,
    ``rcvbuf=SIZE``, ``sndbuf=SIZE``, ``bind``, ``ipv6only=on|off``."""
    if not args:
        raise ConfigValueError("needs an address")
    host, port, family = parse_listen_address(args[0], base)
    options = {"backlog": NGINX_LISTEN_BACKLOG, "so_keepalive": None,
               "rcvbuf": None, "sndbuf": None, "ipv6only": True, "ssl": False,
               "proxy_protocol": False}
    for flag in args[1:]:
        name, _, value = flag.partition("=")
        if flag in ("ssl", "proxy_protocol"):
            options[flag] = True
        elif flag == "bind":
            pass                       # every listen is bound on its own here
        elif name == "backlog" and value:
            options["backlog"] = parse_number([value])
        elif name in ("rcvbuf", "sndbuf") and value:
            options[name] = parse_size([value])
        elif name == "ipv6only" and value:
            options["ipv6only"] = parse_flag([value])
        elif name == "so_keepalive" and value:
            options["so_keepalive"] = parse_keepalive(value)
        else:
            raise ConfigValueError('invalid parameter "%s"' % flag)
    return Listen(host, port, family, options["ssl"], options["proxy_protocol"], options["backlog"],
                  options["so_keepalive"], options["rcvbuf"], options["sndbuf"], options["ipv6only"])


def parse_listen_address(address: str, base: str = "") -> Tuple[str, int, int]:
    """``listen``'s address -> (IP address, port, family); a unix socket ->
    ("unix:" and its path, 0, AF_UNIX)."""
    if address.startswith("unix:"):
        if not hasattr(socket, "AF_UNIX"):
            raise ConfigValueError('"unix:" sockets are not supported on this system')
        path = address[5:]
        if not path:
            raise ConfigValueError('no path in the unix domain socket "%s"' % address)
        path = os.path.normpath(os.path.join(base, path))
        if len(os.fsencode(path)) >= UNIX_PATH_MAX:
            # ngx_parse_unix_domain_url: sun_path holds 108 bytes with its NUL.
            raise ConfigValueError('too long path in the unix domain socket "%s"' % address)
        return "unix:" + path, 0, socket.AF_UNIX
    if re.fullmatch(r"\d+", address):
        host, port = "0.0.0.0", int(address)
    else:
        host, port = parse_host_port(address)
        if host == "*":
            host = "0.0.0.0"
    if not 0 < port < 65536:
        raise ConfigValueError('invalid port in "%s"' % address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigValueError('"%s" is not an IP address (listen takes addresses)' % host)
    # One spelling per address: [0:0::1] is [::1].
    return str(ip), port, socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def parse_keepalive(value: str) -> Tuple:
    """``on``, ``off``, or nginx's ``[idle]:[intvl]:[cnt]`` (times in seconds)."""
    if value in ("on", "off"):
        return (value == "on", None, None, None)
    parts = value.split(":")
    if len(parts) != 3:
        raise ConfigValueError('invalid so_keepalive value "%s"' % value)
    idle = int(parse_time([parts[0]])) if parts[0] else None
    interval = int(parse_time([parts[1]])) if parts[1] else None
    count = parse_number([parts[2]]) if parts[2] else None
    return (True, idle, interval, count)


def auth_methods_parser(protocol: str) -> Callable:
    """``imap_auth`` etc.: a list of method names, case-insensitive."""
    known = ALL_AUTH_METHODS[protocol]

    def parse(args: List[str], base: str = "") -> List[str]:
        if not args:
            raise ConfigValueError("needs at least one method")
        methods = []
        for arg in args:
            method = arg.lower()
            if method not in known:
                raise ConfigValueError('invalid value "%s"' % arg)
            methods.append(method)
        return methods
    return parse


class ResolverSpec(NamedTuple):
    """``resolver ADDRESS... [valid=TIME] [ipv4=on|off] [ipv6=on|off]``."""
    servers: Tuple             # ((family, sockaddr), ...)
    valid: Optional[float]     # overrides the answers' TTL
    ipv4: bool
    ipv6: bool


def parse_resolver(args: List[str], base: str = "") -> Optional[ResolverSpec]:
    """nginx's resolver: addresses (port 53 unless given) and options; ``off``."""
    if args == ["off"]:
        return None
    servers, valid, flags = [], None, {"ipv4": True, "ipv6": True}
    for arg in args:
        name, _, value = arg.partition("=")
        if name == "valid" and value:
            valid = parse_time([value])
        elif name in flags and value:
            flags[name] = parse_flag([value])
        elif name == "status_zone":
            raise ConfigValueError('"status_zone" is part of the commercial nginx, not supported')
        else:
            if re.fullmatch(r"\[[0-9A-Fa-f:.]+\]:\d+|[^:\[\]]+:\d+", arg):
                host, port = parse_host_port(arg)
            else:
                host, port = arg.strip("[]"), 53
            servers.extend((family, sockaddr) for family, sockaddr in
                           resolve_upstream(host, port).addresses)
    if not servers:
        raise ConfigValueError("needs at least one address")
    if not flags["ipv4"] and not flags["ipv6"]:
        raise ConfigValueError('"ipv4" and "ipv6" cannot both be "off"')
    return ResolverSpec(tuple(servers), valid, flags["ipv4"], flags["ipv6"])


def parse_path(args: List[str], base: str = "") -> str:
    """A file name, relative to the configuration file's directory."""
    value = one_argument(args)
    if value.startswith(("data:", "engine:", "store:")):
        raise ConfigValueError('"%s" values cannot be loaded with Python\'s ssl module; '
                          "give a file name" % value.split(":")[0])
    return os.path.join(base, value)


def parse_enum(*choices: str, refused: Optional[Dict[str, str]] = None) -> Callable:
    """A parser for one word out of ``choices``; ``refused`` maps words nginx
    knows but we cannot honour to the reason."""
    def parse(args: List[str], base: str = "") -> str:
        value = one_argument(args)
        if refused and value in refused:
            raise ConfigValueError('"%s" %s' % (value, refused[value]))
        if value not in choices:
            raise ConfigValueError('invalid value "%s", it must be %s' % (
                value, " or ".join('"%s"' % choice for choice in choices)))
        return value
    return parse


TLS_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
                "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


# nginx takes these in ssl_protocols; OpenSSL 3 builds and Python's ssl
# module have neither, so they load and are not offered (a [warn] says so).
OBSOLETE_SSL_PROTOCOLS = ("SSLv2", "SSLv3")


def parse_ssl_protocols(args: List[str], base: str = "") -> List[str]:
    """``[SSLv2] [SSLv3] [TLSv1] [TLSv1.1] [TLSv1.2] [TLSv1.3]``: the TLS
    versions a contiguous range, since Python sets a minimum and a maximum
    version, not a list.  SSLv2 and SSLv3 stay in the list, first, and are
    never offered (apply_protocols skips them): "TLSv1 SSLv3" (the nginx
    wiki's and Mastering NGINX's example) is TLSv1 alone, as under nginx
    with OpenSSL 3."""
    if not args:
        raise ConfigValueError("needs at least one protocol")
    for arg in args:
        if arg not in TLS_VERSIONS and arg not in OBSOLETE_SSL_PROTOCOLS:
            raise ConfigValueError('invalid value "%s"' % arg)
    obsolete = [name for name in OBSOLETE_SSL_PROTOCOLS if name in args]
    order = list(TLS_VERSIONS)
    indexes = sorted(order.index(arg) for arg in set(args) if arg in TLS_VERSIONS)
    if not indexes:
        raise ConfigValueError('"%s": Python\'s ssl module has neither SSLv2 nor SSLv3, so no '
                               'protocol would be left; write TLS versions (e.g. "TLSv1.2 '
                               'TLSv1.3")' % " ".join(args))
    if indexes != list(range(indexes[0], indexes[-1] + 1)):
        raise ConfigValueError("the protocols must be a range without gaps (Python sets a "
                          "minimum and a maximum version)")
    return obsolete + [order[i] for i in indexes]


class SessionCache(NamedTuple):
    """``ssl_session_cache``, as ngx_ssl_session_cache reads it."""
    builtin: str               # "off", "none", "builtin" or "" (shared only)
    size: Optional[int]        # builtin:SIZE in sessions, None for OpenSSL's default
    shared: Optional[Tuple[str, int]] = None   # shared:NAME:SIZE (bytes)


NGINX_SESSION_CACHE = SessionCache("none", None)     # nginx's default


def parse_ssl_session_cache(args: List[str], base: str = "") -> SessionCache:
    """``off | none | [builtin[:size]] [shared:name:size]``: every value
    nginx takes (what Python can make of it is the TLS section's affair,
    and -t warns of what differs: tls_directive_warnings)."""
    if not args:
        raise ConfigValueError("needs a value")
    builtin, size, shared = "none", None, None
    for arg in args:
        if arg in ("off", "none", "builtin"):
            builtin, size = arg, None
            continue
        match = re.fullmatch(r"builtin:(\d+)", arg)
        if match:
            builtin, size = "builtin", int(match.group(1))
            continue
        match = re.fullmatch(r"shared:([^:]+):(\d+[kKmMgG]?)", arg)
        if match:
            bytes_ = parse_size([match.group(2)])
            if bytes_ < 8 * 4096:
                raise ConfigValueError('session cache "%s" is too small' % arg)
            shared = (match.group(1), bytes_)
            continue
        raise ConfigValueError('invalid session cache "%s"' % arg)
    if shared and builtin == "none" and "none" not in args:
        builtin = ""                          # nginx: shared alone, no built-in cache
    return SessionCache(builtin, size, shared)


def parse_ssl_session_timeout(args: List[str], base: str = "") -> float:
    return parse_time(args)


def parse_ecdh_curve(args: List[str], base: str = "") -> str:
    value = one_argument(args)
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+(:[A-Za-z0-9_.+-]+)*", value):
        raise ConfigValueError('invalid curve list "%s"' % value)
    return value


SSL_CONF_COMMANDS = ("Options", "Certificate", "PrivateKey", "MinProtocol", "MaxProtocol")
SSL_CONF_OPTIONS = ("SessionTicket", "-SessionTicket", "ServerPreference", "-ServerPreference")


def parse_ssl_conf_command(args: List[str], base: str = "") -> List[Tuple[str, str]]:
    """``ssl_conf_command NAME VALUE`` for the OpenSSL commands that map onto
    Python's ssl module; any other one is refused, never ignored."""
    if len(args) != 2:
        raise ConfigValueError("takes a name and a value")
    name, value = args
    if name not in SSL_CONF_COMMANDS:
        raise ConfigValueError('"%s" cannot be applied through Python\'s ssl module (it maps %s)'
                          % (name, ", ".join(SSL_CONF_COMMANDS)))
    if name == "Options":
        for option in value.split(","):
            if option.strip() not in SSL_CONF_OPTIONS:
                raise ConfigValueError('Options "%s": only %s map onto Python\'s ssl module'
                                  % (option.strip(), ", ".join(SSL_CONF_OPTIONS)))
    elif name in ("MinProtocol", "MaxProtocol") and value not in TLS_VERSIONS:
        raise ConfigValueError('%s "%s": one of %s' % (name, value, ", ".join(TLS_VERSIONS)))
    elif name in ("Certificate", "PrivateKey"):
        value = parse_path([value], base)
    return [(name, value)]


class SniCertificate(NamedTuple):
    name: str                  # "mail.example.org" or "*.example.org"
    certificate: str
    key: str


def parse_sni_certificate(args: List[str], base: str = "") -> SniCertificate:
    """Extension: ``ssl_sni_certificate NAME CERTIFICATE KEY``."""
    if len(args) != 3:
        raise ConfigValueError("takes a server name, a certificate file and a key file")
    name = args[0].lower()
    if not re.fullmatch(r"(\*\.)?[a-z0-9.-]+", name):
        raise ConfigValueError('invalid server name "%s"' % args[0])
    return SniCertificate(name, parse_path([args[1]], base), parse_path([args[2]], base))


class AuthHttpUrl(NamedTuple):
    """``auth_http``: where the auth server is and what to ask for."""
    host_header: str           # the Host: header ("localhost" for unix:)
    uri: str                   # "/" if the URL has none
    address: Tuple             # (family, sockaddr): resolved at load
    text: str                  # as nginx names the peer in its log lines


def parse_auth_http(args: List[str], base: str = "") -> AuthHttpUrl:
    """``[http://]HOST[:PORT][/URI]`` or ``unix:/PATH[:/URI]`` (nginx's
    ngx_mail_auth_http: "http://" is optional, the port defaults to 80)."""
    url = one_argument(args)
    if url.startswith("http://"):
        url = url[7:]
    if url.startswith("https://"):
        raise ConfigValueError("auth_http speaks HTTP only, as nginx (no https://)")
    if url.startswith("unix:"):
        path, _, uri = url[5:].partition(":")
        if not path:
            raise ConfigValueError('no path in "%s"' % url)
        return AuthHttpUrl("localhost", uri or "/", (socket.AF_UNIX, os.path.join(base, path)),
                           "unix:" + path)
    hostport, slash, uri = url.partition("/")
    host, host_header, port = split_auth_http_host(hostport)
    upstream = resolve_upstream(host, port)
    family, sockaddr = upstream.addresses[0]
    text = ("[%s]:%d" if family == socket.AF_INET6 else "%s:%d") % (sockaddr[0], port)
    return AuthHttpUrl(host_header, slash + uri if slash else "/", (family, sockaddr), text)


def split_auth_http_host(hostport: str) -> Tuple[str, str, int]:
    """auth_http's ``HOST[:PORT]`` -> (host to resolve, Host header, port).
    As nginx's ngx_parse_url: the Host header is the host as written, an
    IPv6 address with its brackets ("[::1]", RFC 7230 §5.4), without the
    port; the port defaults to 80."""
    bracketed = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\])(:\d+)?", hostport)
    if bracketed:
        header = bracketed.group(1)
        port = parse_host_port(hostport)[1] if bracketed.group(2) else 80
        return header[1:-1], header, port
    if ":" in hostport:
        host, port = parse_host_port(hostport)
        return host, host, port
    return hostport, hostport, 80


# RFC 7230 token characters: nginx takes any name, and Mailu's AUTH_PORT
# has an underscore; no space, colon, CR or LF can get in.
AUTH_HTTP_HEADER_NAME_TEXT = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_auth_http_header(args: List[str], base: str = "") -> List[Tuple[str, str]]:
    """``auth_http_header NAME VALUE``: appended verbatim to every request."""
    if len(args) != 2 or not AUTH_HTTP_HEADER_NAME_TEXT.fullmatch(args[0]):
        raise ConfigValueError("takes a header name and a value")
    if re.search(r"[\r\n\0]", args[1]):
        raise ConfigValueError("a header value cannot hold CR, LF or NUL")
    return [(args[0], args[1])]


def parse_real_ip_from(args: List[str], base: str = "") -> List:
    """``set_real_ip_from ADDRESS|CIDR|unix:``, one per line."""
    value = one_argument(args)
    if value == "unix:":
        return ["unix:"]
    try:
        return [ipaddress.ip_network(value, strict=False)]
    except ValueError:
        raise ConfigValueError('invalid address or network "%s"' % value)


def parse_trusted_networks(args: List[str], base: str = "") -> List:
    """Extension, ``trusted_networks ADDRESS|CIDR ...``: several on a line,
    and one line after another, as set_real_ip_from (``unix:`` too)."""
    networks = []
    for value in args:
        networks.extend(parse_real_ip_from([value]))
    if not networks:
        raise ConfigValueError("takes at least one address or network")
    return networks


def parse_status_listen(args: List[str], base: str = "") -> Listen:
    """Extension, ``status_listen ADDRESS:PORT | unix:PATH``: where the
    status listener (Status and control) accepts; no flags."""
    host, port, family = parse_listen_address(one_argument(args), base)
    return Listen(host, port, family)


def parse_transcript_for(args: List[str], base: str = "") -> List:
    """Extension, ``transcript_for ADDRESS|CIDR|LOGIN ...``: networks, and
    logins (lower case: compared without regard to case)."""
    if not args:
        raise ConfigValueError("takes at least one address, network or login")
    wanted = []
    for value in args:
        try:
            wanted.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            wanted.append(value.lower())
    return wanted


STATUS_ALLOW_DEFAULT = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"),
                        "unix:"]    # loopback; a unix: status_listen's peers (its file's mode)


def parse_smtp_auth_method(args: List[str], base: str = "") -> str:
    """Extension: how proxy_smtp_auth logs in: ``plain`` (nginx) or ``login``."""
    value = one_argument(args).lower()
    if value not in ("plain", "login"):
        raise ConfigValueError('invalid value "%s", it must be "plain" or "login"' % args[0])
    return value


def parse_word_list(args: List[str], base: str = "") -> List[str]:
    if not args:
        raise ConfigValueError("needs at least one value")
    return list(args)


def parse_sieve_capabilities(args: List[str], base: str = "") -> List[str]:
    """``sieve_capabilities``: quoted entries, ``"NAME VALUE"`` or ``NAME``
    (RFC 5804 §1.7: NAME a capability, VALUE its string); SASL and
    STARTTLS come from sieve_auth and starttls, so they are refused here."""
    for entry in parse_word_list(args):
        name = entry.split(" ", 1)[0]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigValueError('invalid capability "%s"' % entry)
        if name.upper() in SIEVE_MACHINE_CAPABILITIES:
            raise ConfigValueError('"%s" is not listed: sieve_auth and starttls decide it'
                                   % name)
    return list(args)


class ErrorLogSpec(NamedTuple):
    """One ``error_log`` occurrence: a destination and the lowest level it takes."""
    destination: str           # "stderr" or an absolute path
    level: str


def parse_error_log(args: List[str], base: str = "") -> ErrorLogSpec:
    """``error_log FILE|stderr [LEVEL]``; the level defaults to ``error`` as nginx."""
    if not 1 <= len(args) <= 2:
        raise ConfigValueError("takes a destination and an optional level")
    destination = args[0]
    level = args[1] if len(args) == 2 else "error"
    if level not in LOG_LEVELS:
        raise ConfigValueError('invalid log level "%s"' % level)
    if destination.startswith("syslog:"):
        parse_syslog(destination)                  # checked now, opened later
        return ErrorLogSpec(destination, level)
    if destination == "off":
        raise ConfigValueError('"off" is not a destination; use a level, e.g. "stderr emerg"')
    if destination != "stderr":
        destination = os.path.join(base, destination)
    return ErrorLogSpec(destination, level)


class SyslogSpec(NamedTuple):
    family: int
    address: object            # "/dev/log" or (host, port)
    facility: int
    tag: str
    hostname: bool


def parse_syslog(text: str) -> SyslogSpec:
    """nginx's ``syslog:server=ADDRESS[,facility=F][,tag=T][,nohostname]``;
    ADDRESS is ``unix:/dev/log`` or ``HOST[:PORT]`` (UDP, port 514)."""
    params = {}
    for item in text[7:].split(","):
        name, _, value = item.partition("=")
        params[name] = value
    server = params.pop("server", None)
    facility = params.pop("facility", "local7")
    tag = params.pop("tag", "mailproxy")
    hostname = "nohostname" not in params
    params.pop("nohostname", None)
    params.pop("severity", None)               # nginx's access_log severity: the level decides here
    if not server:
        raise ConfigValueError('no "server=" in "%s"' % text)
    if params:
        raise ConfigValueError('unknown syslog parameter "%s"' % next(iter(params)))
    if facility not in SYSLOG_FACILITIES:
        raise ConfigValueError('unknown syslog facility "%s"' % facility)
    if not re.fullmatch(r"[A-Za-z0-9_]{1,32}", tag):
        raise ConfigValueError('syslog tag "%s": letters, digits and "_", at most 32' % tag)
    if server.startswith("unix:"):
        return SyslogSpec(getattr(socket, "AF_UNIX", 0), server[5:], SYSLOG_FACILITIES.index(facility),
                          tag, hostname)
    if re.fullmatch(r"\[[0-9A-Fa-f:.]+\]:\d+|[^:\[\]]+:\d+", server):
        host, port = parse_host_port(server)
    else:
        host, port = server.strip("[]"), 514
    family, sockaddr = resolve_upstream(host, port).addresses[0]
    return SyslogSpec(family, sockaddr, SYSLOG_FACILITIES.index(facility), tag, hostname)


def parse_access_log(args: List[str], base: str = "") -> Optional[str]:
    """Extension: ``access_log off|stderr|FILE|syslog:...`` for the line each
    session ends with; unset, it goes to the error log at info."""
    value = one_argument(args)
    if value == "off":
        return "off"
    return parse_error_log([value, "info"], base).destination


def parse_removed(message: str) -> Callable:
    def parse(args: List[str], base: str = "") -> None:
        raise ConfigValueError(message)
    return parse


class Directive(NamedTuple):
    """One row of the directive table.

    ``contexts``: "main" for [main]; "mail" for [mail] and [server NAME];
    "server" for [server NAME] only; "upstream" for [upstream NAME].  ``multiple``: each line of the value is
    one occurrence and occurrences accumulate (nginx allows it more than once).
    ``supported``: False means "not supported yet": the name is known, but
    using it is an error, so nobody is misled into thinking it has an effect.
    """
    name: str
    contexts: Tuple[str, ...]
    parse: Callable
    default: object
    multiple: bool = False
    supported: bool = True
    extension: bool = False


MAIN = ("main",)
MAIL = ("mail", "server")
SERVER = ("server",)
UPSTREAM = ("upstream",)
POOLED = ("mail", "server", "upstream")   # the backend dialogue: a pool may say otherwise

DIRECTIVES = {d.name: d for d in [
    # -- process-wide: nginx's main context -------------------------------
    Directive("worker_processes", MAIN, parse_worker_processes, 1),
    Directive("worker_connections", MAIN, parse_positive, 1024),
    Directive("worker_rlimit_nofile", MAIN, parse_positive, None),
    Directive("worker_shutdown_timeout", MAIN, parse_msec, None),
    Directive("master_process", MAIN, parse_flag, True),
    Directive("user", MAIN, parse_user, None),
    Directive("pid", MAIN, parse_path, None),
    Directive("error_log", ("main", "mail", "server"), parse_error_log, None, multiple=True),
    Directive("access_log", ("main", "mail", "server"), parse_access_log, None, extension=True),
    Directive("status_listen", MAIN, parse_status_listen, None, extension=True),
    Directive("status_allow", MAIN, parse_trusted_networks, STATUS_ALLOW_DEFAULT, multiple=True,
              extension=True),
    # -- ngx_mail_core_module ----------------------------------------------
    Directive("listen", SERVER, parse_listen, [], multiple=True),
    Directive("protocol", SERVER, parse_protocol, None),
    Directive("server_name", MAIL, parse_string, None),   # default: the host name
    Directive("timeout", MAIL, parse_msec, 60.0),
    Directive("max_errors", MAIL, parse_number, 5),
    Directive("resolver", MAIL, parse_resolver, None),
    Directive("resolver_timeout", MAIL, parse_msec, 30.0),
    # -- ngx_mail_auth_http_module -----------------------------------------
    Directive("auth_http", MAIL, parse_auth_http, None),
    Directive("auth_http_header", MAIL, parse_auth_http_header, [], multiple=True),
    Directive("auth_http_pass_client_cert", MAIL, parse_flag, False),
    Directive("auth_http_timeout", MAIL, parse_msec, 60.0),
    # -- ngx_mail_proxy_module ---------------------------------------------
    Directive("proxy", MAIL, parse_flag, False),   # parsed and ignored, as nginx
    Directive("proxy_buffer", MAIL, parse_size, PAGE_SIZE),
    Directive("proxy_pass_error_message", MAIL, parse_flag, False),
    Directive("proxy_protocol", POOLED, parse_enum("off", "on", "v2"), "off"),
    Directive("proxy_smtp_auth", POOLED, parse_flag, False),
    Directive("proxy_timeout", MAIL, parse_msec, 24 * 3600.0),
    Directive("xclient", POOLED, parse_flag, True),
    # -- ngx_mail_realip_module --------------------------------------------
    Directive("set_real_ip_from", MAIL, parse_real_ip_from, [], multiple=True),
    # -- ngx_mail_ssl_module -----------------------------------------------
    Directive("ssl", MAIL, parse_removed(
        'the "ssl" directive was removed in nginx 1.25.1, use "listen ... ssl"'), None),
    Directive("starttls", MAIL, parse_enum("on", "off", "only"), "off"),
    Directive("ssl_certificate", MAIL, parse_path, [], multiple=True),
    Directive("ssl_certificate_key", MAIL, parse_path, [], multiple=True),
    Directive("ssl_certificate_compression", MAIL, parse_enum("off", refused={
        "on": "cannot be honoured: Python's ssl module has no certificate compression"}), "off"),
    Directive("ssl_password_file", MAIL, parse_path, None),
    Directive("ssl_dhparam", MAIL, parse_path, None),
    Directive("ssl_ecdh_curve", MAIL, parse_ecdh_curve, "auto"),
    Directive("ssl_protocols", MAIL, parse_ssl_protocols, ["TLSv1.2", "TLSv1.3"]),
    Directive("ssl_ciphers", MAIL, parse_string, "HIGH:!aNULL:!MD5"),
    Directive("ssl_prefer_server_ciphers", MAIL, parse_flag, False),
    Directive("ssl_session_cache", MAIL, parse_ssl_session_cache, NGINX_SESSION_CACHE),
    Directive("ssl_session_tickets", MAIL, parse_flag, True),
    Directive("ssl_session_ticket_key", MAIL, parse_path, [], multiple=True),
    Directive("ssl_session_timeout", MAIL, parse_ssl_session_timeout, 300.0),
    Directive("ssl_verify_client", MAIL, parse_enum("on", "off", "optional", "optional_no_ca"), "off"),
    Directive("ssl_verify_depth", MAIL, parse_number, 1),
    Directive("ssl_client_certificate", MAIL, parse_path, None),
    Directive("ssl_trusted_certificate", MAIL, parse_path, None),
    Directive("ssl_crl", MAIL, parse_path, None),
    Directive("ssl_conf_command", MAIL, parse_ssl_conf_command, [], multiple=True),
    # -- ngx_mail_imap_module ----------------------------------------------
    Directive("imap_auth", MAIL, auth_methods_parser("imap"), ["plain"], multiple=True),
    Directive("imap_capabilities", MAIL, parse_word_list,
              ["IMAP4", "IMAP4rev1", "UIDPLUS"], multiple=True),
    Directive("imap_client_buffer", MAIL, parse_size, PAGE_SIZE),
    # -- ngx_mail_pop3_module ----------------------------------------------
    Directive("pop3_auth", MAIL, auth_methods_parser("pop3"), ["plain"], multiple=True),
    Directive("pop3_capabilities", MAIL, parse_word_list,
              ["TOP", "USER", "UIDL"], multiple=True),
    Directive("pop3_client_buffer", MAIL, parse_size, POP3_BUFFER_NGINX, extension=True),
    # -- ngx_mail_smtp_module ----------------------------------------------
    Directive("smtp_auth", MAIL, auth_methods_parser("smtp"), ["plain", "login"], multiple=True),
    Directive("smtp_capabilities", MAIL, parse_word_list, [], multiple=True),
    Directive("smtp_client_buffer", MAIL, parse_size, PAGE_SIZE),
    Directive("smtp_greeting_delay", MAIL, parse_msec, 0.0),
    # -- extension: ManageSieve (RFC 5804), README "ManageSieve" -----------
    Directive("sieve_auth", MAIL, auth_methods_parser("sieve"), ["plain"], multiple=True,
              extension=True),
    Directive("sieve_capabilities", MAIL, parse_sieve_capabilities,
              list(SIEVE_DEFAULT_CAPABILITIES), multiple=True, extension=True),
    Directive("sieve_client_buffer", MAIL, parse_size, PAGE_SIZE, extension=True),
    # -- extensions of mailproxy (nginx has no built-in user table) --------
    Directive("proxy_pass", MAIL, parse_proxy_pass, None, extension=True),
    Directive("auth", MAIL, parse_enum("users", "backend"), "users", extension=True),
    Directive("auth_delay", MAIL, parse_time, 1.0, extension=True),
    # -- extensions: the login defence (README "Failed logins") -------------
    Directive("trusted_networks", MAIL, parse_trusted_networks, [], multiple=True, extension=True),
    Directive("max_user_sessions", MAIL, parse_number, 0, extension=True),
    Directive("max_user_ip_sessions", MAIL, parse_number, 0, extension=True),
    Directive("proxy_smtp_auth_method", POOLED, parse_smtp_auth_method, "plain", extension=True),
    Directive("ssl_sni_certificate", MAIL, parse_sni_certificate, [], multiple=True, extension=True),
    # -- extensions: TLS to the backend, named as nginx's stream proxy ------
    Directive("proxy_ssl", POOLED, parse_flag, False, extension=True),
    Directive("proxy_starttls", POOLED, parse_flag, False, extension=True),
    Directive("proxy_ssl_verify", POOLED, parse_flag, True, extension=True),
    Directive("proxy_ssl_trusted_certificate", POOLED, parse_path, None, extension=True),
    Directive("proxy_ssl_name", POOLED, parse_string, None, extension=True),
    Directive("proxy_ssl_server_name", POOLED, parse_enum("on", refused={
        "off": "cannot be honoured: Python's ssl module sends the name it verifies "
               "(proxy_ssl_name) as SNI"}), "on", extension=True),
    Directive("proxy_ssl_certificate", POOLED, parse_path, None, extension=True),
    Directive("proxy_ssl_certificate_key", POOLED, parse_path, None, extension=True),
    Directive("proxy_ssl_protocols", POOLED, parse_ssl_protocols, ["TLSv1.2", "TLSv1.3"],
              extension=True),
    Directive("proxy_ssl_ciphers", POOLED, parse_string, "DEFAULT", extension=True),
    Directive("smtp_relay_domains", MAIL, parse_word_list, [], multiple=True, extension=True),
    # -- extensions: the client's identity at the backend (README "Several backends")
    Directive("imap_id", POOLED, parse_flag, False, extension=True),
    Directive("pop3_xclient", POOLED, parse_flag, False, extension=True),
    # -- extension: the capabilities before login, probed (README "Several backends")
    Directive("capabilities_from", POOLED, parse_enum("config", "backend"), "config",
              extension=True),
    # -- extensions: [upstream NAME] pools (README "Several backends") ------
    Directive("server", UPSTREAM, parse_upstream_server, [], multiple=True, extension=True),
    Directive("balance", UPSTREAM, parse_enum(*BALANCE_METHODS), "round_robin", extension=True),
    Directive("health_check", UPSTREAM, parse_health_check, None, extension=True),
    # -- extensions: session transcripts (README "Monitoring and control") ---
    Directive("transcript_log", MAIL, parse_path, None, extension=True),
    Directive("transcript_for", MAIL, parse_transcript_for, [], multiple=True, extension=True),
]}


class Settings:
    """Immutable-by-convention settings: one attribute per directive name.

    One class serves both kinds: a server's Settings (merge_server) has
    every directive of the mail contexts merged ([server] over [mail] over
    the defaults), plus ``name``, ``protocol`` and ``server_name`` resolved
    and the TLS contexts built from them; [main]'s (merge_main) has the
    process-wide directives.
    """

    def __init__(self, values: Dict[str, object]):
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return "Settings(%s)" % ", ".join("%s=%r" % kv for kv in sorted(self.__dict__.items()))


class PasswordEntry(NamedTuple):
    """A user table entry: ``{SCHEME}DATA``.  The repr hides the data."""
    scheme: str
    data: str

    def __repr__(self) -> str:
        return "PasswordEntry(%s, ...)" % self.scheme


class UserTable(dict):
    """[users]: login -> PasswordEntry, and ``dummy``, the entry a login that
    is not in the table is checked against (unknown_login_entry), made once
    when the table is loaded."""

    def __init__(self, entries: Dict[str, PasswordEntry]):
        super().__init__(entries)
        self.dummy = unknown_login_entry(list(self.values()))


class Config(NamedTuple):
    path: str
    main: Settings
    servers: List[Settings]
    users: UserTable
    routes: Dict[str, "Route"]          # login or @domain -> where to send them
    warnings: Tuple[ConfigError, ...] = ()   # what -t and the start-up print as [warn]
    lines: Optional[Dict] = None        # (section, directive) -> line, for later messages
    upstreams: Optional[Dict[str, UpstreamSpec]] = None   # [upstream NAME] pools, by name
    pool_settings: Optional[Dict[Tuple[str, str], Settings]] = None   # (server, pool) -> a
                                        # server's settings with the pool's overrides


def section_kind(name: str) -> Optional[str]:
    """"main", "mail", "server", "upstream", "users", "routes" or None for
    an unknown section."""
    if name in ("main", "mail", "users", "routes"):
        return name
    if name.startswith("server ") and name[7:].strip():
        return "server"
    if name.startswith("upstream ") and name[9:].strip():
        return "upstream"
    return None


def find_line_numbers(text: str) -> Dict[Tuple[str, str], int]:
    """(section, key) -> line number, for messages.  configparser keeps none."""
    lines = {}
    section = None
    for number, line in enumerate(text.splitlines(), 1):
        if line[:1].isspace() or line.lstrip().startswith(("#", ";")):
            continue                   # a continuation ("    [::1]:8143") or a comment
        header = re.match(r"\[([^\]]+)\]", line)
        if header:
            section = header.group(1).strip()
            lines[(section, "")] = number
            continue
        key = re.match(r"([^=]+?)\s*=", line)
        if key and section is not None:
            lines.setdefault((section, key.group(1).strip()), number)
    return lines


def section_at(text: str, lineno: int) -> Optional[str]:
    """The section a line number of the file belongs to."""
    section = None
    for line in text.splitlines()[:lineno]:
        header = re.match(r"\[([^\]]+)\]", line)     # not "    [::1]:8143", a continuation
        if header:
            section = header.group(1).strip()
    return section


def read_ini(path: str) -> Tuple[configparser.ConfigParser, Dict]:
    """Read the file with configparser as README says: interpolation
    off, ``=`` the only delimiter, keys case-sensitive, duplicates refused."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigErrors([ConfigError(path, None, None, "cannot read: %s" % error.strerror)])
    except UnicodeDecodeError:
        raise ConfigErrors([ConfigError(path, None, None, "is not UTF-8 text")])
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"),
                                       inline_comment_prefixes=None,
                                       strict=True, empty_lines_in_values=False,
                                       default_section="\x00no default section")
    parser.optionxform = str
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as error:
        raise ConfigErrors([ConfigError(path, error.section, None,
                                        "section is duplicated", error.lineno)])
    except configparser.DuplicateOptionError as error:
        raise ConfigErrors([ConfigError(path, error.section, error.option,
                                        '"%s" directive is duplicate' % error.option,
                                        error.lineno)])
    except configparser.MissingSectionHeaderError as error:
        raise ConfigErrors([ConfigError(path, None, None, "a line before the first [section]: %r"
                                        % error.line.strip(), error.lineno)])
    except configparser.ParsingError as error:
        raise ConfigErrors([ConfigError(path, section_at(text, lineno), None,
                                        "expected NAME = VALUE, got %s" % line.strip(), lineno)
                            for lineno, line in error.errors])
    except configparser.Error as error:
        message = str(error).splitlines()[0]
        raise ConfigErrors([ConfigError(path, None, None, message,
                                        getattr(error, "lineno", None))])
    return parser, find_line_numbers(text)


def comment_start(text: str, quotes: bool = True) -> Optional[int]:
    """Where an inline comment starts in one line of a value: at a "#" or
    ";" that begins the value or follows whitespace (nginx's "#" starts a
    comment where an argument could start; INI's ";" the same way), and,
    with ``quotes``, not inside a quoted argument (nginx's quoting, as
    split_arguments).  None: no comment.  configparser's own
    inline_comment_prefixes knows no quotes, so it would cut
    ``auth_http_header X-Key "a #b"``; hence this."""
    i, argument_starts = 0, True
    while i < len(text):
        char = text[i]
        if char.isspace():
            argument_starts = True
        elif argument_starts and char in "#;":
            return i
        elif argument_starts and quotes and char in "\"'":
            i += 1
            while i < len(text) and text[i] != char:
                i += 2 if text[i] == "\\" and text[i + 1:i + 2] in tuple(NGINX_ESCAPES) else 1
            argument_starts = False
        else:
            argument_starts = False
        i += 1
    return None


def strip_inline_comments(path: str, parser: configparser.ConfigParser,
                          lines: Dict) -> List[ConfigError]:
    """Cut every inline comment (`` # ...`` or `` ; ...``) from the values,
    line by line, in every section: README, "The configuration file".  In
    [users], where a value is verbatim (quotes are part of a password),
    whitespace and "#" or ";" start a comment even after a quote.  Returns
    the warnings for -t: a {PLAIN} value that lost a comment, whose
    password could have been meant to go on (such a password is written
    {PLAIN.B64})."""
    warnings = []
    for section in parser.sections():
        verbatim = section == "users"
        for key, value in parser.items(section):
            kept = []
            for line in value.split("\n"):
                start = comment_start(line, quotes=not verbatim)
                if start is not None and verbatim and re.match(r"\{PLAIN\}", line, re.I):
                    warnings.append(ConfigError(
                        path, section, key, 'the {PLAIN} password ends before "%s": the rest of the '
                        'line is a comment (write a password that holds " %s" as {PLAIN.B64})'
                        % (line[start], line[start]), lines.get((section, key))))
                kept.append(line if start is None else line[:start].rstrip())
            parser.set(section, key, "\n".join(line for line in kept if line).strip())
    return warnings


def load_config(path: str) -> Config:
    """Read and check a configuration file.

    Returns a Config, or raises ConfigErrors listing every problem found
    (unknown, misplaced, duplicated or badly valued directives, missing
    required ones), each with file, section, directive and line.
    """
    parser, lines = read_ini(path)
    warnings = strip_inline_comments(path, parser, lines)
    errors = []
    values = read_directives(path, parser, lines, errors)
    main = merge_main(values.get("main", {}))
    servers = []
    failed = {(error.section, error.directive) for error in errors}
    for section in parser.sections():
        if section_kind(section) == "server":
            server, problems = merge_server(section, values.get("mail", {}), values[section])
            servers.append(server)
            errors.extend(ConfigError(path, section, directive, message,
                                      lines.get((section, directive)) or lines.get((section, "")))
                          for directive, message in problems
                          if (section, directive) not in failed and ("mail", directive) not in failed)
    if not servers and not errors:
        errors.append(ConfigError(path, None, None, "no [server NAME] section: nothing to listen on"))
    errors.extend(check_listen_pairs(path, servers, lines))
    errors.extend(check_status_listen(path, main, servers, lines))
    users = load_users(path, parser, lines, errors)
    upstreams = load_upstreams(path, values, lines, errors)
    routes = load_routes(path, parser, lines, errors, upstreams)
    errors.extend(check_pool_names(path, servers, routes, upstreams, lines))
    errors.extend(check_capabilities_from(path, servers, upstreams, lines))
    if errors:
        raise ConfigErrors(errors)
    warnings += route_port_warnings(path, servers, routes, lines)
    warnings += salted_method_warnings(path, servers, users, lines)
    warnings += tls_directive_warnings(path, servers, lines)
    warnings += obsolete_protocol_warnings(path, servers, lines)
    return Config(path, main, servers, users, routes, tuple(warnings), lines, upstreams,
                  pool_settings(servers, upstreams))


def read_directives(path: str, parser: configparser.ConfigParser, lines: Dict,
                    errors: List[ConfigError]) -> Dict[str, Dict[str, object]]:
    """Every directive of [main], [mail] and the servers, parsed:
    {section name: {directive: value}}; each problem goes to ``errors``."""
    base = os.path.dirname(os.path.abspath(path))
    values = {}
    for section in parser.sections():
        kind = section_kind(section)
        if kind is None:
            errors.append(ConfigError(path, section, None,
                                      'unknown section "[%s]"; expected [main], [mail], '
                                      "[server NAME], [upstream NAME], [users] or [routes]"
                                      % section,
                                      lines.get((section, ""))))
            continue
        if kind in ("users", "routes"):
            continue
        values[section] = {}
        for key, raw in parser.items(section):
            try:
                values[section][key] = parse_directive(kind, key, raw, base)
            except ConfigValueError as error:
                errors.append(ConfigError(path, section, key, str(error), lines.get((section, key))))
    return values


def parse_directive(kind: str, key: str, raw: str, base: str) -> object:
    """One directive's value, checked against its row of the table."""
    directive = DIRECTIVES.get(key)
    if directive is None:
        raise ConfigValueError('unknown directive "%s"' % key)
    if kind not in directive.contexts:
        raise ConfigValueError('"%s" directive is not allowed in [%s]' % (
            key, kind + " NAME" if kind in ("server", "upstream") else kind))
    if not directive.supported:
        raise ConfigValueError('"%s" is not supported yet' % key)
    if directive.multiple:
        occurrences = [line for line in raw.splitlines() if line.strip()]
        result = []
        for occurrence in occurrences:
            value = directive.parse(split_arguments(occurrence), base)
            if isinstance(value, list):
                result.extend(value)
            else:
                result.append(value)
        return result
    return directive.parse(split_arguments(" ".join(raw.split("\n"))), base)


def load_upstreams(path: str, values: Dict[str, Dict[str, object]], lines: Dict,
                   errors: List[ConfigError]) -> Dict[str, UpstreamSpec]:
    """Every [upstream NAME] section (extension; nginx's upstream {}, which
    its mail module lacks), by name; each problem goes to ``errors``."""
    upstreams = {}
    for section, given in values.items():
        if section_kind(section) != "upstream":
            continue
        name = section[9:].strip()
        where = lines.get((section, ""))
        if not POOL_NAME.fullmatch(name):
            errors.append(ConfigError(path, section, None, 'invalid upstream name "%s": letters, '
                                      'digits, "_", "." and "-" only' % name, where))
            continue
        servers = tuple(given.get("server", ()))
        failed = any(error.section == section and error.directive == "server" for error in errors)
        if not servers and not failed:
            errors.append(ConfigError(path, section, None, 'no servers are inside upstream "%s"'
                                      % name, where))
        seen = set()
        for server in servers:
            if server.text in seen:
                errors.append(ConfigError(path, section, "server", 'server %s is listed twice'
                                          % server.text, lines.get((section, "server"))))
            seen.add(server.text)
        overrides = tuple(sorted((key, value) for key, value in given.items()
                                 if "mail" in DIRECTIVES[key].contexts))
        upstreams[name] = UpstreamSpec(name, servers, given.get("balance", "round_robin"),
                                       given.get("health_check"), overrides)
    return upstreams


def pool_settings(servers: List[Settings],
                  upstreams: Dict[str, UpstreamSpec]) -> Dict[Tuple[str, str], Settings]:
    """(server name, pool name) -> the server's settings with what the pool
    says of the backend dialogue (proxy_protocol, xclient, proxy_ssl...),
    for each pool that says anything.  Their backend TLS context is the
    TLS section's (load_and_prepare)."""
    return {(server.name, spec.name): Settings(dict(vars(server), **dict(spec.overrides)))
            for server in servers for spec in upstreams.values() if spec.overrides}


def check_pool_names(path: str, servers: List[Settings], routes: Dict[str, "Route"],
                     upstreams: Dict[str, UpstreamSpec], lines: Dict) -> List[ConfigError]:
    """A proxy_pass naming a pool names an [upstream NAME] of the file."""
    errors = []
    for server in servers:
        upstream = server.proxy_pass
        if upstream is not None and upstream.pool and upstream.pool not in upstreams:
            section = "server " + server.name
            line = lines.get((section, "proxy_pass"))
            if line is None:
                section, line = "mail", lines.get(("mail", "proxy_pass"))
            errors.append(ConfigError(path, section, "proxy_pass", 'no [upstream %s] section: '
                                      'proxy_pass takes HOST:PORT or the name of an upstream'
                                      % upstream.pool, line))
        if upstream is not None and upstream.pool and server.auth_http is None:
            for key, route in routes.items():
                target = route.target(server.protocol)
                if target is not None and target[0] is None and not target[1].pool and \
                        key not in [error.directive for error in errors]:
                    errors.append(ConfigError(
                        path, "routes", key, '"%s" has no port, and the %s server "%s" passes '
                        'to the upstream "%s", whose port it cannot take: write HOST:PORT'
                        % (target[1].host, server.protocol, server.name, upstream.pool),
                        lines.get(("routes", key))))
    return errors


def check_capabilities_from(path: str, servers: List[Settings],
                            upstreams: Dict[str, UpstreamSpec], lines: Dict) -> List[ConfigError]:
    """capabilities_from = backend (extension) probes the server's
    proxy_pass, the backend every login goes to: a server without one (an
    auth server or [routes] chooses) has nothing to probe; ManageSieve's
    capabilities are its greeting, written by hand."""
    errors = []
    for server in servers:
        pool = (upstreams or {}).get(server.proxy_pass.pool) if server.proxy_pass else None
        mode = dict(pool.overrides).get("capabilities_from", server.capabilities_from) \
            if pool is not None else server.capabilities_from
        if mode != "backend":
            continue
        problem = None
        if server.protocol == "sieve":
            problem = "is for IMAP, POP3 and SMTP servers; sieve_capabilities is written by hand"
        elif server.proxy_pass is None:
            problem = "needs proxy_pass: the backend it probes is the one every login goes to"
        if problem:
            section = "server " + server.name
            line = lines.get((section, "capabilities_from"))
            if line is None:
                section, line = "mail", lines.get(("mail", "capabilities_from"))
            errors.append(ConfigError(path, section, "capabilities_from",
                                      '"capabilities_from backend" ' + problem, line))
    return errors


def merge_main(given: Dict[str, object]) -> Settings:
    merged = {name: d.default for name, d in DIRECTIVES.items() if "main" in d.contexts}
    merged.update(given)
    if not merged["error_log"]:
        merged["error_log"] = [ErrorLogSpec("stderr", "info")]   # not nginx's stderr error
    return Settings(merged)


def merge_server(section: str, mail: Dict, server: Dict) -> Tuple[Settings, List]:
    """[server] over [mail] over the defaults; resolve the protocol."""
    merged = {name: d.default for name, d in DIRECTIVES.items() if "mail" in d.contexts or
              "server" in d.contexts}
    merged.update(mail)
    merged.update(server)
    merged["name"] = section[7:].strip()
    merged["tls_context"] = None           # built by the TLS section from ssl_*
    merged["backend_tls_context"] = None   # ... and from proxy_ssl_*
    if merged["server_name"] is None:
        merged["server_name"] = socket.gethostname()   # nginx: the machine's host name
    problems = []
    if not merged["listen"]:
        problems.append(("listen", 'no "listen" is defined for server'))
    if merged["protocol"] is None:
        for listen in merged["listen"]:
            if listen.port in WELL_KNOWN_PORTS:
                merged["protocol"] = WELL_KNOWN_PORTS[listen.port]
                break
        if merged["protocol"] is None and merged["listen"]:
            problems.append(("protocol", "unknown mail protocol for server: "
                             'set "protocol = imap|pop3|smtp|sieve"'))
    if merged["proxy_pass"] is None and merged["auth_http"] is None:
        problems.append(("proxy_pass", 'no "proxy_pass" is defined for server ' + (
            "(the backend that checks the passwords, with auth = backend)"
            if merged.get("auth") == "backend" else
            "(the backend of the built-in user table; or set auth_http)")))
    if merged["auth_http"] is None:
        for directive in ("imap_auth", "pop3_auth", "smtp_auth", "sieve_auth"):
            tokens = [m for m in merged[directive] if m in ("xoauth2", "oauthbearer")]
            if tokens:
                problems.append((directive, '"%s" needs auth_http: the built-in user table '
                                 "cannot check OAuth tokens" % tokens[0]))
    problems.extend(check_auth_backend(merged))
    problems.extend(check_ssl(merged))
    return Settings(merged), problems


# What the backend cannot check when it decides (auth = backend): only a
# clear password can be handed on to its LOGIN, USER/PASS or AUTH.
AUTH_BACKEND_REFUSED = {
    "cram-md5": "the client sends a digest of our challenge, which the backend cannot check",
    "apop": "the client sends a digest of our greeting, which the backend cannot check",
    "external": "a client certificate has no password for the backend",
    "none": "mail without login has no login for the backend to check",
}


def check_auth_backend(merged: Dict) -> List[Tuple[str, str]]:
    """auth = backend (extension): the backend decides, so no auth_http, and
    only the methods that carry a clear password (-t refuses the others
    rather than leave them out silently: the operator asked for them)."""
    if merged["auth"] != "backend":
        return []
    if merged["auth_http"] is not None:
        return [("auth", '"auth = backend" and "auth_http" exclude each other: '
                 "one of them decides")]
    protocol = merged["protocol"]
    directive = "%s_auth" % protocol if protocol in ALL_AUTH_METHODS else None
    for method in merged[directive] if directive else []:
        if method in AUTH_BACKEND_REFUSED:
            return [(directive, '"%s" cannot be used with "auth = backend": %s'
                     % (method, AUTH_BACKEND_REFUSED[method]))]
    return []


def check_ssl(merged: Dict) -> List[Tuple[str, str]]:
    """What ngx_mail_ssl_module refuses before loading any file."""
    problems = []
    needs = ('"listen ... ssl"' if any(listen.ssl for listen in merged["listen"]) else
             '"starttls"' if merged["starttls"] != "off" else None)
    certificates, keys = merged["ssl_certificate"], merged["ssl_certificate_key"]
    if needs and not certificates:
        problems.append(("ssl_certificate", 'no "ssl_certificate" is defined for the %s directive'
                         % needs))
    elif needs and len(keys) < len(certificates):
        problems.append(("ssl_certificate_key", 'no "ssl_certificate_key" is defined for '
                         'certificate "%s"' % certificates[len(keys)]))
    # optional_no_ca needs no CA: it asks for a certificate and lets auth_http
    # judge it (nginx 1.27.2 dropped the CA requirement for it).
    if merged["ssl_verify_client"] not in ("off", "optional_no_ca") and not (
            merged["ssl_client_certificate"] or merged["ssl_trusted_certificate"]):
        problems.append(("ssl_verify_client", 'no ssl_client_certificate or '
                         'ssl_trusted_certificate for ssl_verify_client'))
    if merged["proxy_ssl"] and merged["proxy_starttls"]:
        problems.append(("proxy_starttls", '"proxy_ssl" and "proxy_starttls" exclude each other'))
    return problems


def check_listen_pairs(path: str, servers: List[Settings], lines: Dict) -> List[ConfigError]:
    """nginx refuses a pair given twice.  Each listen is bound on its own
    here, so a wildcard and an address of the same family on the same port
    cannot both be bound: refuse that too (nginx would bind the wildcard)."""
    seen = {}
    errors = []
    for server in servers:
        section = "server " + server.name
        for listen in server.listen:
            key = (listen.host, listen.port)
            clash = [] if listen.port == 0 else listen_clashes(listen, seen)
            if key in seen:
                message = 'duplicate "%s" address and port pair' % listen.text
            elif clash:
                message = '"%s" and "%s" cannot both be bound: listen on one of them' % (
                    listen.text, clash[0].text)
            else:
                seen[key] = listen
                continue
            errors.append(ConfigError(path, section, "listen", message,
                                      lines.get((section, "listen"))))
    return errors


def check_status_listen(path: str, main: Settings, servers: List[Settings],
                        lines: Dict) -> List[ConfigError]:
    """status_listen cannot be a mail listen's address too."""
    status = main.status_listen
    if status is None:
        return []
    taken = {(listen.host, listen.port): listen for server in servers for listen in server.listen}
    if (status.host, status.port) in taken or (status.port and listen_clashes(status, taken)):
        return [ConfigError(path, "main", "status_listen", '"%s" is a server\'s listen as well'
                            % status.text, lines.get(("main", "status_listen")))]
    return []


def listen_clashes(listen: Listen, seen: Dict) -> List[Listen]:
    """The listens in ``seen`` that ``listen`` (an IP one) cannot be bound
    beside: a wildcard and an address of one family on one port."""
    wildcard = ipaddress.ip_address(listen.host).is_unspecified
    return [other for (host, port), other in seen.items()
            if port == listen.port and other.family == listen.family and
            (wildcard or ipaddress.ip_address(host).is_unspecified) and host != listen.host]


PASSWORD_SCHEMES = ("PLAIN", "PBKDF2-SHA256", "SHA512-CRYPT", "SHA256-CRYPT")   # --hash-password's
# Dovecot's schemes the table reads besides (README "The user table"), so that
# a Dovecot passwd-file serves unchanged; SCHEME_ALIASES: Dovecot's other
# names for two of them.
DOVECOT_SCHEMES = ("MD5-CRYPT", "SSHA", "SSHA256", "SSHA512", "SHA", "SHA256", "SHA512",
                   "BLF-CRYPT", "ARGON2I", "ARGON2ID")
TABLE_SCHEMES = PASSWORD_SCHEMES + DOVECOT_SCHEMES
SCHEME_ALIASES = {"CLEARTEXT": "PLAIN", "SHA1": "SHA"}
# Dovecot's digest schemes (src/auth/password-scheme.c): the hash, its length,
# and whether a salt follows the digest ({SSHA*}: digest, then salt, in one
# base64 string).  Their data is kept as the base64 of the raw bytes,
# whichever encoding the file used.
DIGEST_SCHEMES = {"SHA": ("sha1", 20, False), "SHA256": ("sha256", 32, False),
                  "SHA512": ("sha512", 64, False), "SSHA": ("sha1", 20, True),
                  "SSHA256": ("sha256", 32, True), "SSHA512": ("sha512", 64, True)}
# Dovecot's {CRYPT} (its default_pass_scheme, also for a passwd-file
# password without a {SCHEME}) is the system's crypt(3), which tells the
# method by the prefix: these are read as the scheme of the same method.
CRYPT_PREFIX_SCHEMES = (("$1$", "MD5-CRYPT"), ("$5$", "SHA256-CRYPT"), ("$6$", "SHA512-CRYPT"),
                        ("$2a$", "BLF-CRYPT"), ("$2b$", "BLF-CRYPT"), ("$2y$", "BLF-CRYPT"))
BLF_CRYPT_FORMAT = r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}"
ARGON2_FORMAT = (r"\$(argon2id?)\$(?:v=(\d+)\$)?m=(\d+),t=(\d+),p=(\d+)"
                 r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")
ARGON2_TYPES = {"argon2i": 1, "argon2id": 2}       # argon2.h: Argon2_i, Argon2_id


def valid_pbkdf2_data(data: str) -> bool:
    parts = data.split("$")
    if len(parts) != 3 or not re.fullmatch(r"[1-9]\d{0,8}", parts[0]):
        return False
    try:
        return all(base64.b64decode(part, validate=True) for part in parts[1:])
    except (binascii.Error, ValueError):
        return False


def parse_password_entry(value: str) -> PasswordEntry:
    """``{SCHEME}DATA``; DATA is everything after the scheme, verbatim.  A
    Dovecot digest scheme may name its encoding as Dovecot's do,
    ``{SSHA256.HEX}``, ``{SHA.B64}``; its data is kept in base64.  An entry
    this host's libraries cannot check ({BLF-CRYPT}, {ARGON2*}) is refused:
    its user could never log in, and -t says so."""
    match = re.match(r"\{([A-Za-z0-9-]+)(?:\.([A-Za-z0-9]+))?\}", value)
    if not match:
        raise ConfigValueError("must start with a {SCHEME}, e.g. {PLAIN}secret")
    scheme = SCHEME_ALIASES.get(match.group(1).upper(), match.group(1).upper())
    encoding = (match.group(2) or "").upper()
    data = value[match.end():]
    if scheme == "CRYPT" and not encoding:
        scheme = crypt_scheme(data)
    if scheme not in TABLE_SCHEMES:
        raise ConfigValueError('unknown password scheme "{%s}"; known: %s' % (
            match.group(1), ", ".join("{%s}" % s for s in TABLE_SCHEMES)))
    if encoding and scheme not in DIGEST_SCHEMES and scheme != "PLAIN":
        raise ConfigValueError('"{%s.%s}": only the PLAIN, SHA and SSHA schemes take an encoding'
                               % (scheme, match.group(2)))
    if scheme == "PLAIN" and encoding:
        return PasswordEntry(scheme, plain_data(encoding, data))
    if scheme in DIGEST_SCHEMES:
        return PasswordEntry(scheme, digest_data(scheme, encoding, data))
    problem = crypt_format_problem(scheme, data)
    if problem:
        raise ConfigValueError(problem)
    missing = missing_library(scheme, data)
    if missing:
        raise ConfigValueError("{%s} cannot be checked on this host: %s; this user could never "
                               "log in" % (scheme, missing))
    return PasswordEntry(scheme, data)


def crypt_scheme(data: str) -> str:
    """The scheme of a {CRYPT} entry, by its crypt(3) prefix."""
    for prefix, scheme in CRYPT_PREFIX_SCHEMES:
        if data.startswith(prefix):
            return scheme
    raise ConfigValueError("{CRYPT} is read for $1$, $5$, $6$ and $2y$ ($2a$, $2b$) hashes only; "
                           "DES, yescrypt and others are not")


def crypt_format_problem(scheme: str, data: str) -> Optional[str]:
    """What is wrong with the data of a PBKDF2 or crypt-style entry; None: nothing."""
    if scheme == "PBKDF2-SHA256" and not valid_pbkdf2_data(data):
        return "{PBKDF2-SHA256} data must be ROUNDS$SALT$HASH: rounds at least 1, salt and hash in base64"
    formats = {"SHA512-CRYPT": (r"\$6\$(rounds=\d+\$)?[^$]{0,16}\$[./0-9A-Za-z]{86}", "a $6$ crypt"),
               "SHA256-CRYPT": (r"\$5\$(rounds=\d+\$)?[^$]{0,16}\$[./0-9A-Za-z]{43}", "a $5$ crypt"),
               "MD5-CRYPT": (r"\$1\$[^$]{0,8}\$[./0-9A-Za-z]{22}", "a $1$ crypt"),
               "BLF-CRYPT": (BLF_CRYPT_FORMAT, "a $2y$ (or $2a$, $2b$) bcrypt"),
               "ARGON2I": (ARGON2_FORMAT, "an $argon2i$ encoded"),
               "ARGON2ID": (ARGON2_FORMAT, "an $argon2id$ encoded")}
    if scheme not in formats:
        return None
    pattern, what = formats[scheme]
    match = re.fullmatch(pattern, data)
    if match and scheme.startswith("ARGON2") and not argon2_parameters(data, scheme):
        match = None
    if not match:
        return "{%s} data must be %s string" % (scheme, what)
    return None


def digest_data(scheme: str, encoding: str, data: str) -> str:
    """The base64 of a Dovecot digest entry's raw bytes.  As Dovecot: base64
    by default, hex with .HEX (base64 if it is not hex after all), and an
    unsalted digest written in hex without .HEX is recognised by its length.
    Raises ConfigValueError if it is neither, or of the wrong length."""
    name, length, salted = DIGEST_SCHEMES[scheme]
    hex_first = encoding == "HEX" or (not encoding and not salted and len(data) == 2 * length)
    raw = None
    if encoding not in ("", "HEX", "B64", "BASE64"):
        raise ConfigValueError('unknown encoding ".%s": Dovecot\'s are .HEX and .B64' % encoding)
    if hex_first and re.fullmatch(r"([0-9A-Fa-f]{2})*", data):
        raw = bytes.fromhex(data)
    if raw is None:
        try:
            raw = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigValueError("{%s} data must be base64 (or hex, as {%s.HEX})" % (scheme, scheme))
    if (len(raw) <= length) if salted else (len(raw) != length):     # Dovecot: a salt of 1 byte or more
        raise ConfigValueError("{%s} data must hold a %d-byte %s digest%s, not %d bytes" % (
            scheme, length, name.upper(), " and a salt after it" if salted else "", len(raw)))
    return base64.b64encode(raw).decode("ascii")


def plain_data(encoding: str, data: str) -> str:
    """The password of Dovecot's ``{PLAIN.B64}`` or ``{PLAIN.HEX}``."""
    try:
        if encoding == "HEX":
            raw = bytes.fromhex(data)
        elif encoding in ("B64", "BASE64"):
            raw = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
        else:
            raise ConfigValueError('unknown encoding ".%s": Dovecot\'s are .HEX and .B64' % encoding)
        return raw.decode("utf-8")
    except (binascii.Error, ValueError):       # UnicodeDecodeError too
        raise ConfigValueError("{PLAIN.%s} data must be a UTF-8 password in %s" % (
            encoding, "hex" if encoding == "HEX" else "base64"))


def argon2_parameters(data: str, scheme: str) -> Optional[Tuple]:
    """(type, version, m, t, p, salt, hash) of an ``$argon2i[d]$`` string,
    the encoding of the reference library (argon2's encoding.c: version 16
    when there is no v=, base64 without padding); None if it is not one of
    ``scheme``, or out of the library's bounds."""
    match = re.fullmatch(ARGON2_FORMAT, data)
    if not match or match.group(1).upper() != scheme:
        return None
    version = int(match.group(2) or 16)
    memory, time_cost, lanes = (int(match.group(n)) for n in (3, 4, 5))
    try:
        salt, digest = (base64.b64decode(match.group(n) + "=" * (-len(match.group(n)) % 4))
                        for n in (6, 7))
    except (binascii.Error, ValueError):
        return None
    if (version not in (16, 19) or not 1 <= lanes <= 0xFFFFFF or time_cost < 1 or
            not 8 * lanes <= memory < 2 ** 32 or len(salt) < 8 or len(digest) < 4):
        return None
    return ARGON2_TYPES[match.group(1)], version, memory, time_cost, lanes, salt, digest


# -- the host's libraries, for the schemes Python's own cannot check ------------
# bcrypt is in libcrypt (libxcrypt, the crypt(3) of current Linux
# distributions), Argon2 in libargon2 (the reference implementation, which
# Dovecot uses too).  Both are called through ctypes, which lets go of the
# GIL during the call, so the password check threads hash side by side.  A
# library counts only if it reproduces a known answer: bcrypt's test vector
# of John the Ripper and crypt_blowfish ("U*U"), and the reference Argon2's
# own test vector (test.c, version 0x13, m=256, t=2, p=1).

CRYPT_DATA_SIZE = 262144       # bytes for crypt_r's struct crypt_data: libxcrypt's is 32 KiB, glibc's 128 KiB
BLF_TEST_HASH = "$2%s$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW"   # of "U*U"
ARGON2_TEST_HASH = "89e9029f4637b295beb027056a7336c414fadd43f6b208645281cb214a56452f"


@functools.lru_cache(maxsize=None)
def crypt_function() -> Optional[Callable[[bytes, bytes], Optional[bytes]]]:
    """libcrypt's reentrant crypt as crypt(password, setting) -> the hash
    (None: refused, or no such library on this host, or no ctypes)."""
    if ctypes is None:
        return None
    name = ctypes.util.find_library("crypt")
    try:
        library = ctypes.CDLL(name) if name else None
    except OSError:
        library = None
    function = getattr(library, "crypt_rn", None) or getattr(library, "crypt_r", None)
    if function is None:
        return None
    function.restype = ctypes.c_char_p
    sized = function.__name__ == "crypt_rn"
    function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p] + (
        [ctypes.c_int] if sized else [])

    def crypt(password: bytes, setting: bytes) -> Optional[bytes]:
        data = ctypes.create_string_buffer(CRYPT_DATA_SIZE)    # zeroed: crypt_r wants that
        result = function(password, setting, data, *([CRYPT_DATA_SIZE] if sized else []))
        return result if result and not result.startswith(b"*") else None    # "*0": libxcrypt's failure
    return crypt


@functools.lru_cache(maxsize=None)
def argon2_function() -> Optional[Callable]:
    """libargon2's argon2_hash, raw output (None: no such library, or no ctypes)."""
    if ctypes is None:
        return None
    name = ctypes.util.find_library("argon2")
    try:
        function = ctypes.CDLL(name).argon2_hash if name else None
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_uint32] * 3 + [ctypes.c_void_p, ctypes.c_size_t] * 3 + [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint32]
    return function


def missing_library(scheme: str, data: str) -> Optional[str]:
    """Why this host cannot check ``scheme`` (the data tells bcrypt's
    variant), for -t; None if it can."""
    return _missing_library(scheme, data[2:3] if scheme == "BLF-CRYPT" else "")


@functools.lru_cache(maxsize=None)
def _missing_library(scheme: str, variant: str) -> Optional[str]:
    if ctypes is None and scheme in ("BLF-CRYPT", "ARGON2I", "ARGON2ID"):
        return "this Python has no ctypes, through which the host's library is called"
    if scheme == "BLF-CRYPT":
        crypt = crypt_function()
        if crypt is None:
            return "no libcrypt (crypt_r) was found"
        test = (BLF_TEST_HASH % variant).encode("ascii")
        if crypt(b"U*U", test) != test:
            return 'libcrypt has no bcrypt "$2%s$" (libxcrypt has it)' % variant
    if scheme in ("ARGON2I", "ARGON2ID"):
        if argon2_function() is None:
            return "no libargon2 was found (Debian and Ubuntu: libargon2-1, Fedora: libargon2)"
        if argon2_raw(1, 0x13, 256, 2, 1, b"password", b"somesalt", 32) != bytes.fromhex(ARGON2_TEST_HASH):
            return "libargon2 does not give the reference answer"
    return None


def argon2_raw(kind: int, version: int, memory: int, time_cost: int, lanes: int,
               password: bytes, salt: bytes, length: int) -> Optional[bytes]:
    """Argon2 of ``password``, ``length`` bytes; None if the library fails."""
    function = argon2_function()
    if function is None:
        return None
    output = ctypes.create_string_buffer(length)
    if function(time_cost, memory, lanes, password, len(password), salt,
                                    len(salt), output, length, None, 0, kind, version) != 0:
        return None
    return output.raw


def password_cost(entry: PasswordEntry) -> Tuple:
    """What checking a password against ``entry`` costs, as a key to compare:
    the scheme and its work factor (PBKDF2: rounds and hash length; crypt:
    the rounds= field as written, None for the default; bcrypt: the cost;
    Argon2: its parameters).  The digest schemes cost a hash each."""
    if entry.scheme == "PBKDF2-SHA256" and valid_pbkdf2_data(entry.data):
        rounds, _, expected = entry.data.split("$")
        return (entry.scheme, int(rounds), len(base64.b64decode(expected)))
    if entry.scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        match = re.match(r"\$[56]\$rounds=(\d+)\$", entry.data)
        return (entry.scheme, match.group(1) if match else None)
    if entry.scheme == "BLF-CRYPT" and re.fullmatch(BLF_CRYPT_FORMAT, entry.data):
        return (entry.scheme, int(entry.data[4:6]))
    parameters = entry.scheme.startswith("ARGON2") and argon2_parameters(entry.data, entry.scheme)
    if parameters:
        kind, version, memory, time_cost, lanes, _, digest = parameters
        return (entry.scheme, version, memory, time_cost, lanes, len(digest))
    return (entry.scheme,)


def unknown_login_entry(entries: List[PasswordEntry]) -> PasswordEntry:
    """An entry nobody's password matches, of the scheme and cost most of
    ``entries`` have (on a tie the first in table order; no entries: what
    --hash-password makes).  authenticate() checks a login that is not in
    the table against it, so that the answer takes as long as a known
    login's with a wrong password (README: "An unknown login costs the same
    hashing time as a wrong password").  The most common cost, so that a
    timing probe cannot tell an unknown login from most users; the users of
    a less common scheme or cost can still be told apart, unless every check
    were made as slow as the slowest."""
    counts = {}                # dicts keep insertion order: ties go to the first
    for entry in entries:
        cost = password_cost(entry)
        counts[cost] = counts.get(cost, 0) + 1
    cost = max(counts, key=counts.get) if counts else ("PBKDF2-SHA256", PBKDF2_DEFAULT_ROUNDS, 32)
    scheme, salt = cost[0], os.urandom(8).hex()     # 16 characters, as --hash-password
    if scheme == "PBKDF2-SHA256":
        rounds, hash_length = cost[1], cost[2]
        return PasswordEntry(scheme, "%d$%s$%s" % (rounds, base64.b64encode(salt.encode()).decode(),
                                                  base64.b64encode(bytes(hash_length)).decode()))
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        prefix, hash_length = ("$6$", 86) if scheme == "SHA512-CRYPT" else ("$5$", 43)
        rounds = "rounds=%s$" % cost[1] if cost[1] is not None else ""
        return PasswordEntry(scheme, prefix + rounds + salt + "$" + "." * hash_length)
    return unknown_dovecot_entry(cost, salt) or PasswordEntry("PLAIN", salt)


def unknown_dovecot_entry(cost: Tuple, salt: str) -> Optional[PasswordEntry]:
    """unknown_login_entry's dummy for a scheme of DOVECOT_SCHEMES: a hash of
    all zero bits (no password's), with a fresh salt."""
    scheme = cost[0]
    if scheme in DIGEST_SCHEMES:
        _, length, salted = DIGEST_SCHEMES[scheme]
        return PasswordEntry(scheme, base64.b64encode(bytes(length) + (os.urandom(4) if salted else b""))
                             .decode("ascii"))
    if scheme == "MD5-CRYPT":
        return PasswordEntry(scheme, "$1$%s$%s" % (salt[:8], "." * 22))
    if scheme == "BLF-CRYPT":    # bcrypt's salt: 22 characters, the last one carries 2 bits
        return PasswordEntry(scheme, "$2y$%02d$%s.%s" % (cost[1], salt + salt[:5], "." * 31))
    if scheme in ("ARGON2I", "ARGON2ID") and len(cost) == 6:
        _, version, memory, time_cost, lanes, length = cost
        return PasswordEntry(scheme, "$%s$v=%d$m=%d,t=%d,p=%d$%s$%s" % (
            scheme.lower(), version, memory, time_cost, lanes,
            base64.b64encode(os.urandom(16)).decode().rstrip("="),
            base64.b64encode(bytes(length)).decode().rstrip("=")))
    return None


PASSWD_FILE_KEY = "passwd_file"   # in [users], with a value that is no {SCHEME}DATA: a file to read


def load_users(path: str, parser: configparser.ConfigParser, lines: Dict,
               errors: List[ConfigError]) -> UserTable:
    """[users]: ``LOGIN = {SCHEME}DATA``, one line per login, and
    ``passwd_file = [scheme=SCHEME] PATH`` (one file a line): Dovecot
    passwd-files, read now, so that a reload reads them again; ``scheme=``
    is the scheme of passwords written without one, as in Dovecot's passdb
    ``args`` (default CRYPT, Dovecot's).  A login given twice, in [users]
    or in the files, is an error at its second place."""
    users, places = {}, {}
    if not parser.has_section("users"):
        return UserTable(users)
    base = os.path.dirname(os.path.abspath(path))
    for login, value in parser.items("users"):
        line = lines.get(("users", login))
        if login == PASSWD_FILE_KEY and not value.startswith("{"):
            for name in (name.strip() for name in value.splitlines() if name.strip()):
                scheme = "CRYPT"
                match = re.match(r"scheme=(\S+)\s+", name, re.IGNORECASE)
                if match:
                    scheme, name = match.group(1).upper(), name[match.end():]
                read_passwd_file(os.path.join(base, name), ConfigError(
                    path, "users", login, "", line), users, places, errors, scheme)
            continue
        try:
            add_user(users, places, login, value, "%s:%s" % (path, line))
        except ConfigValueError as error:
            errors.append(ConfigError(path, "users", login, str(error), line))
    return UserTable(users)


def add_user(users: Dict[str, PasswordEntry], places: Dict[str, str], login: str, value: str,
             place: str) -> None:
    """One entry of the table, from [users] or a passwd-file: ``value`` is
    {SCHEME}DATA; ``place`` (FILE:LINE) is where a second one says the
    first was.  Raises ConfigValueError."""
    entry = parse_password_entry(value)
    if login in places:
        raise ConfigValueError('user "%s" is already in the table, at %s' % (login, places[login]))
    users[login] = entry
    places[login] = place


def read_passwd_file(path: str, where: ConfigError, users: Dict[str, PasswordEntry],
                     places: Dict[str, str], errors: List[ConfigError],
                     default_scheme: str = "CRYPT") -> None:
    """A Dovecot passwd-file (Dovecot's "passwd-file" passdb): lines
    ``user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra]``, of which only
    the first two fields count here; blank lines and ``#`` comments are
    skipped.  Its entries go into ``users``, its problems into ``errors``
    with this file's name and line.  ``where`` is the [users] line that
    names it, for a file that cannot be read.  A password without a
    {SCHEME} is of ``default_scheme``."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        if isinstance(error, OSError) and error.errno == errno.EACCES:
            reason += permission_hint(path)        # as for a key: whom to let read it
        errors.append(ConfigError(where.file, where.section, where.directive,
                                  'cannot read "%s": %s' % (path, reason), where.line))
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":")
        login, password = fields[0], fields[1] if len(fields) > 1 else ""
        try:
            if not login:
                raise ConfigValueError("a line without a user name")
            if not password:
                raise ConfigValueError("no password: mailproxy cannot log this user in")
            if not password.startswith("{"):
                # Dovecot's default_pass_scheme CRYPT, or the file's scheme=
                if default_scheme == "CRYPT" and not any(
                        password.startswith(prefix) for prefix, _ in CRYPT_PREFIX_SCHEMES):
                    raise ConfigValueError("the password has no {SCHEME}: write the scheme in "
                                           "front of it, e.g. {SHA512-CRYPT}$6$..., or give the "
                                           "file's as Dovecot does: passwd_file = scheme=PLAIN PATH")
                password = "{%s}%s" % (default_scheme, password)
            add_user(users, places, login, password, "%s:%d" % (path, number))
        except ConfigValueError as error:
            errors.append(ConfigError(path, None, login or None, str(error), number))


class Route(NamedTuple):
    """A [routes] entry: where its users go.  ``port`` and ``upstream``: the
    address for every protocol (``upstream`` None: none given; ``port``
    None: the port of the server's proxy_pass); ``protocols``: the
    protocols given an address of their own (``imap=HOST[:PORT]``), as
    (protocol, port, upstream).  An upstream with ``pool`` names an
    [upstream NAME] (port None)."""
    port: Optional[int]
    upstream: Optional[Upstream]
    protocols: Tuple[Tuple[str, Optional[int], Upstream], ...] = ()

    def target(self, protocol: str) -> Optional[Tuple[Optional[int], Upstream]]:
        """(port, upstream) for ``protocol``'s servers; None: this entry
        does not route that protocol (the next lookup goes on)."""
        for name, port, upstream in self.protocols:
            if name == protocol:
                return port, upstream
        return None if self.upstream is None else (self.port, self.upstream)


ROUTE_PROTOCOLS = ("imap", "pop3", "smtp", "sieve")


def parse_route(value: str, pools=()) -> Route:
    """``HOST[:PORT]``, or addresses per protocol, ``imap=HOST[:PORT]
    pop3=HOST[:PORT] ...``, with at most one address for the others
    beside them.  Host names are resolved now.  A word of ``pools`` (the
    names of the [upstream NAME] sections) is that pool, not a host."""
    default, protocols = None, []
    for token in value.split():
        name, equals, address = token.rpartition("=")
        if equals and name not in ROUTE_PROTOCOLS:
            raise ConfigValueError('unknown protocol "%s" in "%s"; expected %s=, %s=, %s= or %s='
                                   % ((name, token) + ROUTE_PROTOCOLS))
        if (default is not None and not equals) or name in [entry[0] for entry in protocols]:
            raise ConfigValueError('invalid address "%s": two addresses for %s; write '
                                   'PROTOCOL=HOST[:PORT] for each protocol'
                                   % (value, name or "every protocol"))
        if address in pools:
            target = (None, pool_upstream(address))
        elif re.fullmatch(r"\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+", address):
            host, port = address.strip("[]"), None
            target = (port, resolve_upstream(host, 1))
        else:
            host, port = parse_host_port(address)
            target = (port, resolve_upstream(host, port))
        if equals:
            protocols.append((name,) + target)
        else:
            default = target
    if default is None and not protocols:
        raise ConfigValueError("needs an address, HOST[:PORT] or PROTOCOL=HOST[:PORT]")
    port, upstream = default or (None, None)
    return Route(port, upstream, tuple(protocols))


def load_routes(path: str, parser: configparser.ConfigParser, lines: Dict,
                errors: List[ConfigError], pools=()) -> Dict[str, Route]:
    """[routes] (extension): ``LOGIN = ADDRESS`` or ``@DOMAIN = ADDRESS``,
    an address being parse_route's (which takes a name of ``pools``, the
    [upstream NAME] sections, for a pool).

    A route sends a user, or every user of a domain, to another backend than
    the server's proxy_pass.  Without a port, each server's proxy_pass port
    is kept, so one route serves the IMAP and the POP3 server alike; with
    one, ``imap=`` and ``pop3=`` give each protocol its own.
    """
    routes = {}
    if not parser.has_section("routes"):
        return routes
    for key, value in parser.items("routes"):
        try:
            routes[key] = parse_route(value, pools)
        except ConfigValueError as error:
            errors.append(ConfigError(path, "routes", key, str(error), lines.get(("routes", key))))
    return routes


def route_port_warnings(path: str, servers: List[Settings], routes: Dict[str, Route],
                        lines: Dict) -> List[ConfigError]:
    """-t and the start-up warn of a route whose address for every
    protocol has a port while servers of two protocols use [routes] (those
    without auth_http): both would be sent to that one port (issue 15:
    carol's POP3 went to the IMAP port)."""
    users = sorted({server.protocol for server in servers if server.auth_http is None})
    warnings = []
    for key, route in routes.items():
        own = [entry[0] for entry in route.protocols]
        sharing = [protocol for protocol in users if protocol not in own]
        if route.upstream is None or route.port is None or len(sharing) < 2:
            continue
        host = route.upstream.host if ":" not in route.upstream.host else "[%s]" % route.upstream.host
        address = "%s:%d" % (host, route.port)
        suggestion = " ".join("%s=%s:PORT" % (protocol, host) for protocol in sharing)
        warnings.append(ConfigError(path, "routes", key, (
            '"%s" sends the %s servers\' users to one port, %d: give each protocol its own '
            '("%s"), or leave the port out to keep each server\'s proxy_pass port')
            % (address, " and ".join(sharing), route.port, suggestion), lines.get(("routes", key))))
    return warnings


def salted_method_warnings(path: str, servers: List[Settings], users: Dict[str, "PasswordEntry"],
                           lines: Dict) -> List[ConfigError]:
    """-t and the start-up warn of cram-md5 or apop offered by a server of
    the user table when some of its users are hashed: the client's digest
    can only be checked against a clear password, so those users would be
    refused (issue 15: "Invalid login or password", and only the log said
    why)."""
    hashed = sorted(login for login, entry in users.items() if entry.scheme != "PLAIN")
    if not hashed:
        return []
    warnings = []
    for server in servers:
        if server.auth_http is not None or server.auth == "backend":
            continue
        directive = server.protocol + "_auth"
        salted = [method for method in getattr(server, directive) if method in ("cram-md5", "apop")]
        if salted:
            section = "server " + server.name
            warnings.append(ConfigError(path, section, directive, (
                '"%s" works only for users with a {PLAIN} password; %d of the %d in [users] %s '
                "hashed (%s) and could log in only with another method")
                % (salted[0], len(hashed), len(users), "is" if len(hashed) == 1 else "are",
                   ", ".join(hashed[:3]) +
                   (", ..." if len(hashed) > 3 else "")),
                lines.get((section, directive)) or lines.get(("mail", directive))))
    return warnings


def tls_directive_warnings(path: str, servers: List[Settings], lines: Dict) -> List[ConfigError]:
    """-t and the start-up warn, at the directive's line, of each ssl_*
    value that loads but cannot be honoured exactly on this Python (issue
    16: never refuse what nginx accepts; say what differs).  Once per
    line: a [mail] directive that all servers share is named once."""
    libssl = LibSsl.probe()
    without = " (%s)" % libssl.reason
    warnings, seen = [], set()

    def warn(server: Settings, directive: str, message: str) -> None:
        section = "server " + server.name
        if (section, directive) not in lines:
            section = "mail"
        if (section, directive) not in lines or (section, directive) in seen:
            return                      # a default: nothing written, nothing to warn of
        seen.add((section, directive))
        warnings.append(ConfigError(path, section, directive, message, lines[(section, directive)]))

    for server in servers:
        cache = server.ssl_session_cache
        if not libssl.available:
            if cache.builtin != "builtin" or cache.size is not None or cache.shared:
                warn(server, "ssl_session_cache", "each worker keeps OpenSSL's built-in session cache of "
                     "its default size (20480 sessions): libssl cannot be reached to set it" + without)
        elif cache.shared:
            warn(server, "ssl_session_cache", (
                '"shared:%s": each worker process keeps its own cache of %d sessions (OpenSSL\'s '
                "built-in cache; Python cannot share one between processes), so a session is "
                "resumed by another worker only through a session ticket%s; and no cached session "
                "outlives a reload, as nginx's shared cache does")
                % (cache.shared[0], session_cache_capacity(cache),
                   "" if server.ssl_session_tickets else ", and ssl_session_tickets is off"))
        if not libssl.available:
            warn(server, "ssl_session_timeout", "sessions last OpenSSL's default time instead (2h with "
                 "OpenSSL 3): libssl cannot be reached to set it" + without)
            warn(server, "ssl_verify_depth", "client certificate chains are accepted up to OpenSSL's "
                 "default depth (100): libssl cannot be reached to set it" + without)
            if ":" in server.ssl_ecdh_curve:
                warn(server, "ssl_ecdh_curve", 'only one curve is offered, the first of "%s" that '
                     "Python's ssl module takes: libssl cannot be reached to set a list%s"
                     % (server.ssl_ecdh_curve, without))
        if not libssl.available and server.ssl_verify_client == "optional_no_ca":
            warn(server, "ssl_verify_client", '"optional_no_ca" acts as "optional": a client '
                 "certificate that does not verify against ssl_client_certificate or "
                 "ssl_trusted_certificate ends the TLS handshake, where nginx lets it through and "
                 'tells auth_http "Auth-SSL-Verify: FAILED:reason": libssl cannot be reached to let '
                 "the handshake complete" + without)
        elif not libssl.available and server.ssl_verify_client != "off":
            warn(server, "ssl_verify_client", "a client certificate that fails verification ends the "
                 'TLS handshake, where nginx completes it and answers "SSL certificate error": '
                 "libssl cannot be reached to let the handshake complete" + without)
        keys = server.ssl_session_ticket_key
        if keys and server.ssl_session_tickets:
            differences = []
            if not libssl.available:
                differences.append("the key files are not used: each start makes its own random "
                                   "ticket key, shared by its workers" + without)
            else:
                if len(keys) > 1:
                    differences.append("only the first key encrypts and decrypts tickets: tickets "
                                       "made with the other keys get a full handshake")
                if file_size(keys[0]) == 48:
                    differences.append("a 48-byte key (nginx's AES-128 tickets) is stretched into "
                                       "OpenSSL's AES-256 key: tickets issued by nginx with it get a "
                                       "full handshake")
            if differences:
                warn(server, "ssl_session_ticket_key", "; ".join(differences))
    return warnings


def obsolete_protocol_warnings(path: str, servers: List[Settings],
                               lines: Dict) -> List[ConfigError]:
    """SSLv2 and SSLv3 in ssl_protocols load (nginx takes them) and are not
    offered: one [warn] per line that names them."""
    warnings, seen = [], set()
    for server in servers:
        for directive in ("ssl_protocols", "proxy_ssl_protocols"):
            named = [name for name in getattr(server, directive) if name in OBSOLETE_SSL_PROTOCOLS]
            section = "server " + server.name
            if (section, directive) not in lines:
                section = "mail"
            if not named or (section, directive) not in lines or (section, directive) in seen:
                continue
            seen.add((section, directive))
            warnings.append(ConfigError(path, section, directive, (
                "%s not offered: Python's ssl module has neither SSLv2 nor SSLv3 (nor have "
                "OpenSSL 3 builds, so nginx on them does not offer it either); only the TLS "
                "versions listed are") % " and ".join(named),
                lines[(section, directive)]))
    return warnings


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


# ========================================================================== #
# ####                         Wire primitives                          #### #
# ========================================================================== #
# What IMAP and POP3 (and later SMTP) share: the events a client machine
# returns, base64 and the SASL mechanisms (RFC 4616 PLAIN, the LOGIN
# mechanism, RFC 2195 CRAM-MD5, RFC 1939 APOP), the nginx-style salt, and
# what XCLIENT's values are checked with (xtext, host names).
# Nothing here does I/O or reads the clock, except make_salt's arguments.

class TextEnum(str, enum.Enum):
    """An enum whose members are their text: they compare, hash, print and
    encode as it (what Python 3.11's enum.StrEnum does), so that nginx's
    words on the wire and in the configuration meet them as they are."""
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


class AuthMethod(TextEnum):
    """How the client says who it is: nginx's Auth-Method names."""
    PLAIN = "plain"                # IMAP LOGIN, POP3 USER/PASS, AUTH PLAIN, AUTH LOGIN
    APOP = "apop"                  # RFC 1939 §7: a digest of the greeting's salt
    CRAM_MD5 = "cram-md5"          # RFC 2195: a digest of our challenge
    EXTERNAL = "external"          # RFC 4422 Appendix A: the TLS client certificate
    NONE = "none"                  # smtp_auth none: nobody; the first RCPT decides
    XOAUTH2 = "xoauth2"            # Google's bearer token
    OAUTHBEARER = "oauthbearer"    # RFC 7628's bearer token


SALTED_METHODS = (AuthMethod.APOP, AuthMethod.CRAM_MD5)       # the password is a digest
TOKEN_METHODS = (AuthMethod.XOAUTH2, AuthMethod.OAUTHBEARER)  # the password is a token


@dataclasses.dataclass
class Credentials:
    """Event: the client has sent a login.  Its repr never shows the password.

    ``method`` is an AuthMethod.  For cram-md5 and apop, ``password`` is the
    client's digest and ``salt`` the challenge it answered; for the token
    methods, ``password`` is the token.
    """
    login: bytes
    password: bytes = dataclasses.field(repr=False)
    method: str = AuthMethod.PLAIN
    salt: Optional[bytes] = None


@dataclasses.dataclass
class Quit:
    """Event: the client said goodbye (LOGOUT, QUIT); close once the reply is sent."""


@dataclasses.dataclass
class StartTls:
    """Event: the client asked for TLS and was told yes; start the handshake.
    The machine has dropped any input behind the command (plaintext
    injection, CVE-2011-0411) and waits until tls_started()."""


@dataclasses.dataclass
class Closed:
    """Event: the machine has queued its last reply; close after sending it.
    ``reason`` is for the log (nginx's wording, e.g. "client sent too many
    invalid commands")."""
    reason: str


@dataclasses.dataclass
class ClientIdentity:
    """Event: the client says whom it speaks for: IMAP ID (RFC 2971), as a
    webmail host does with Dovecot's ``x-originating-ip`` and
    ``x-originating-port``, or SMTP XCLIENT (Postfix's XCLIENT_README).
    The session believes it only from trusted_networks (believed_client,
    xclient_client).  b"" and None: not named."""
    address: bytes
    port: bytes = b""
    name: Optional[bytes] = None       # XCLIENT NAME: a host name, [UNAVAILABLE] or [TEMPUNAVAIL]
    source: str = "IMAP ID"            # for the log: "IMAP ID" or "XCLIENT"


def decode_base64(data: bytes) -> Optional[bytes]:
    """Strict base64 (RFC 4648 §4), or None.  A SASL cancel ``*`` is None too."""
    if not data or len(data) % 4:
        return None if data else b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def decode_sasl_plain(data: bytes) -> Optional[Tuple[bytes, bytes, bytes]]:
    """RFC 4616: ``[authzid] NUL authcid NUL passwd`` -> (authzid, login, password).

    None for bad base64 or missing NULs.  nginx ignores the authzid; so do we.
    """
    decoded = decode_base64(data)
    if decoded is None:
        return None
    parts = decoded.split(b"\0")
    if len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]


def make_salt(server_name: str, now: float, randomness: random.Random) -> bytes:
    """nginx's challenge ``<RANDOM.TIME@server_name>`` (ngx_mail_salt), used as
    the APOP timestamp (RFC 1939 §7) and the CRAM-MD5 challenge (RFC 2195)."""
    return b"<%d.%d@%s>" % (randomness.getrandbits(63), int(now), server_name.encode())


def cram_md5_digest(password: bytes, challenge: bytes) -> bytes:
    """RFC 2195: hex HMAC-MD5 of the challenge, keyed with the password."""
    return hmac.new(password, challenge, hashlib.md5).hexdigest().encode()


def apop_digest(timestamp: bytes, password: bytes) -> bytes:
    """RFC 1939 §7: hex MD5 of the greeting's timestamp followed by the password."""
    return hashlib.md5(timestamp + password).hexdigest().encode()


def split_cram_md5_response(data: bytes) -> Optional[Tuple[bytes, bytes]]:
    """``base64(user SP 32-hex-digest)`` -> (user, digest), or None (nginx's checks)."""
    decoded = decode_base64(data)
    if decoded is None or b" " not in decoded:
        return None
    user, _, digest = decoded.rpartition(b" ")
    if len(digest) != 32 or not user:
        return None
    return user, digest.lower()


def decode_xtext(data: bytes) -> Optional[bytes]:
    """RFC 3461 §4 xtext -> the bytes it stands for, or None if it is no
    xtext: a byte outside "!".."~", a bare "=", or a "+" not followed by
    two hex digits.  The RFC wants upper-case hex; lower case is taken
    too (be liberal: the value is checked again for what it must be)."""
    out, index = bytearray(), 0
    while index < len(data):
        byte = data[index]
        if byte == 0x2B:                                   # "+XX"
            digits = data[index + 1:index + 3]
            if not re.fullmatch(rb"[0-9A-Fa-f]{2}", digits):
                return None
            out.append(int(digits, 16))
            index += 3
            continue
        if byte < 0x21 or byte > 0x7E or byte == 0x3D:    # not an xchar
            return None
        out.append(byte)
        index += 1
    return bytes(out)


def valid_host_name(name: str) -> bool:
    """RFC 1034 §3.5 letters, digits, hyphens and dots only (nginx 1.29.7,
    CVE-2026-28753: a PTR answer must not carry bytes into XCLIENT)."""
    return (bool(name) and len(name) <= 253 and re.fullmatch(r"[A-Za-z0-9.-]+", name) is not None
            and all(name.split(".")))                     # no empty label: not "a..b", ".a"


def strip_eol(line: bytes) -> bytes:
    """A line without its CRLF (or bare LF)."""
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


class LineBuffer(bytearray):
    """Bytes received and not yet taken (a bytearray: += adds, len() and
    truth say what is held), handed out a line at a time.

    Every reader of lines shares it (the client machines, the backend login,
    the SMTP relay check), because of one rule a hostile peer tests: n bytes
    must cost O(n) work however they are split.  The search for the end of
    a line starts where the last search stopped, so a line trickled one byte
    at a time is scanned once, not once per byte.  Change it only through
    its methods and +=.  It holds what it is given: its owner decides how
    much that may be and stops reading beyond it.
    """
    __slots__ = ("_scanned",)

    def __init__(self):
        super().__init__()
        self._scanned = 0           # self[:_scanned] holds no LF

    def take_line(self, limit: Optional[int] = None) -> Optional[bytes]:
        """The next line with its LF, if one ends within the first ``limit``
        bytes (all of them when None); else None, and nothing is taken."""
        end = len(self) if limit is None else min(limit, len(self))
        index = self.find(b"\n", self._scanned, end)
        if index < 0:
            self._scanned = max(self._scanned, end)
            return None
        return self.take(index + 1)

    def take(self, size: int) -> bytes:
        """The first ``size`` bytes (fewer if fewer are held), removed."""
        taken = bytes(self[:size])
        del self[:size]               # CPython drops a bytearray's head in O(1)
        self._scanned = max(0, self._scanned - len(taken))
        return taken

    def take_all(self) -> bytes:
        return self.take(len(self))

    def clear(self) -> None:
        del self[:]
        self._scanned = 0


def reply_code(kind: str, line: bytes, tag: bytes = b"") -> str:
    """The status of a reply line, for the debug log: IMAP's OK, NO, BAD,
    BYE or "+", POP3's +OK, -ERR or "+", SMTP's three digits; "?" for
    anything else.  Never the text after it, which may echo what was sent."""
    if kind in ("imap-tagged", "imap-greeting") and line.startswith(tag) and tag:
        line = b"x " + line[len(tag):]
    if kind in ("imap-greeting", "continuation", "imap-tagged") and not line.startswith(b"+"):
        words = line.split(None, 2)
        word = words[1] if len(words) > 1 else b""
    elif kind == "smtp":
        word = line[:3]
    else:
        word = (line.split(None, 1) or [b""])[0]
    return word.decode("ascii") if REPLY_CODE.fullmatch(word) else "?"


REPLY_CODE = re.compile(rb"[+-]?[A-Za-z0-9]{0,8}")


# ========================================================================== #
# ####                         Client machines                          #### #
# ========================================================================== #
# The dialogue with the client up to authentication, one machine per
# protocol, as nginx's ngx_mail_{imap,pop3}_handler.c.  A machine is sans-I/O:
#
#     machine = ImapMachine(settings)       # the greeting is queued now
#     machine.data_to_send()                # -> b"* OK IMAP4 ready\r\n"
#     machine.receive_data(b"a1 NOOP\r\n")  # -> [] (and queues "a1 OK completed")
#     machine.receive_data(b"a2 LOGIN alice secret\r\n")  # -> [Credentials(...)]
#
# After Credentials the machine waits: further input is buffered unparsed
# until the session says how the login went (auth_failed(), or it takes
# trailing_data to the backend).  No clock, no logger, no sockets here: the
# session passes the time in for the APOP/CRAM-MD5 salt.

def parse_oauth_response(data: bytes, xoauth2: bool) -> Optional[Tuple[bytes, bytes]]:
    """-> (login, bearer token), or None.  XOAUTH2: ``user=U^Aauth=Bearer T^A^A``;
    OAUTHBEARER (RFC 7628 §3.1): ``n,a=U,^A...auth=Bearer T^A^A`` (the GS2
    header's a= is the login; "=2C" and "=3D" stand for "," and "=")."""
    fields = data.split(b"\x01")
    login = None
    if not xoauth2:
        gs2 = fields.pop(0) if fields else b""
        match = re.match(rb"[ny]?p?,(?:a=([^,]*))?,$", gs2 + b"," if gs2.count(b",") < 2 else gs2)
        if gs2[:2] not in (b"n,", b"y,") or match is None:
            return None
        login = (match.group(1) or b"").replace(b"=2C", b",").replace(b"=3D", b"=")
    token = None
    for field in fields:
        if field.startswith(b"user=") and xoauth2:
            login = field[5:]
        elif field.lower().startswith(b"auth=bearer "):
            token = field[12:]
    if login is None or not token:
        return None
    return login, token


class SaslState(enum.Enum):
    NONE = "none"                      # no SASL exchange under way
    PLAIN = "plain"                    # sent the empty prompt, want the response
    LOGIN_USERNAME = "login username"  # sent base64("Username:")
    LOGIN_PASSWORD = "login password"  # sent base64("Password:")
    CRAM_MD5 = "cram-md5"              # sent the challenge
    EXTERNAL = "external"              # sent the prompt, want the identity
    ERROR = "error"                    # sent an OAuth error challenge, want any answer
    XOAUTH2 = "xoauth2"                # sent the empty prompt, want user and token
    OAUTHBEARER = "oauthbearer"        # the same, RFC 7628


SASL_USERNAME_PROMPT = b"VXNlcm5hbWU6\r\n"     # base64("Username:")
SASL_PASSWORD_PROMPT = b"UGFzc3dvcmQ6\r\n"     # base64("Password:")


# -- SASL (RFC 4422), the same in all three protocols, as nginx's
#    ngx_mail_auth_parse and ngx_mail_auth_* helpers: only the prompt prefix
#    (SASL_PROMPT) and the refusal (_refuse) differ.

class SaslMechanism(NamedTuple):
    """A row of SASL_MECHANISMS."""
    method: Optional[str]      # the *_auth method that enables it; None: always
    state: SaslState           # what its prompt waits for
    prompt: Optional[bytes]    # after SASL_PROMPT; None: the CRAM-MD5 challenge
    initial: bool              # an initial response is taken (RFC 4959)


SASL_MECHANISMS = {
    # PLAIN and LOGIN are always accepted, whatever is advertised (nginx).
    b"PLAIN": SaslMechanism(None, SaslState.PLAIN, b"\r\n", True),
    b"LOGIN": SaslMechanism(None, SaslState.LOGIN_USERNAME, SASL_USERNAME_PROMPT, True),
    b"CRAM-MD5": SaslMechanism("cram-md5", SaslState.CRAM_MD5, None, False),
    b"EXTERNAL": SaslMechanism("external", SaslState.EXTERNAL, SASL_USERNAME_PROMPT, True),
    b"XOAUTH2": SaslMechanism("xoauth2", SaslState.XOAUTH2, b"\r\n", True),
    b"OAUTHBEARER": SaslMechanism("oauthbearer", SaslState.OAUTHBEARER, b"\r\n", True),
}

# The method that takes the client's response in each state.
SASL_RESPONSES = {SaslState.PLAIN: "_sasl_plain", SaslState.LOGIN_USERNAME: "_sasl_login_username",
                  SaslState.LOGIN_PASSWORD: "_sasl_login_password",
                  SaslState.CRAM_MD5: "_sasl_cram_md5", SaslState.EXTERNAL: "_sasl_external",
                  SaslState.ERROR: "_sasl_error_answer", SaslState.XOAUTH2: "_sasl_xoauth2",
                  SaslState.OAUTHBEARER: "_sasl_oauthbearer"}


class SaslExchange:
    """The SASL part of a client machine (a mixin of ClientMachine, whose
    _output, sasl, login, salt and _credentials it uses)."""
    SASL_PROMPT = b"+ "        # RFC 3501 / RFC 5034 continuation; SMTP: "334 "

    def _sasl_start(self, events: list, args: List[bytes], enabled: List[str]) -> None:
        """AUTHENTICATE / AUTH MECHANISM [initial-response] (RFC 4422 §3), by
        SASL_MECHANISMS: a mechanism not there, not enabled, or with an
        initial response it does not take (CRAM-MD5) is refused."""
        mechanism = SASL_MECHANISMS.get(args[0].upper()) if 1 <= len(args) <= 2 else None
        if mechanism is None or (mechanism.method and mechanism.method not in enabled) or \
                (len(args) == 2 and not mechanism.initial):
            return self._refuse(events)
        if len(args) == 2:                    # e.g. Microsoft's "AUTH LOGIN user"
            return getattr(self, SASL_RESPONSES[mechanism.state])(events, args[1])
        prompt = mechanism.prompt
        if prompt is None:                    # RFC 2195: the challenge is the salt
            if self.salt is None:
                self.salt = make_salt(self.settings.server_name, self.now, self.randomness)
            prompt = base64.b64encode(self.salt) + b"\r\n"
        self._sasl_continue(prompt)
        self.sasl = mechanism.state

    def _sasl_continue(self, prompt: bytes) -> None:
        """Queue a server challenge (RFC 4422 §3), ``prompt`` being its
        base64 and CRLF: after SASL_PROMPT (ManageSieve sends a string)."""
        self._output += self.SASL_PROMPT + prompt

    def _sasl_line(self, events: list, line: bytes) -> None:
        """A client response to our SASL prompt (``*`` cancels: bad base64)."""
        state, self.sasl = self.sasl, SaslState.NONE
        self._command_name = "SASL %s response" % state.value     # never its contents
        getattr(self, SASL_RESPONSES[state])(events, line)

    def _sasl_plain(self, events: list, response: bytes) -> None:
        decoded = decode_sasl_plain(response)
        if decoded is None or not decoded[1]:
            return self._refuse(events)
        self._credentials(events, Credentials(decoded[1], decoded[2], AuthMethod.PLAIN))

    def _sasl_login_username(self, events: list, response: bytes) -> None:
        login = decode_base64(response)
        if login is None:
            return self._refuse(events)
        self.login = login
        self._sasl_continue(SASL_PASSWORD_PROMPT)
        self.sasl = SaslState.LOGIN_PASSWORD

    def _sasl_login_password(self, events: list, response: bytes) -> None:
        password = decode_base64(response)
        if password is None:
            return self._refuse(events)
        self._credentials(events, Credentials(self.login, password, AuthMethod.PLAIN))

    def _sasl_cram_md5(self, events: list, response: bytes) -> None:
        answer = split_cram_md5_response(response)
        if answer is None:
            return self._refuse(events)
        self._credentials(events, Credentials(answer[0], answer[1], AuthMethod.CRAM_MD5, self.salt))

    def _sasl_external(self, events: list, response: bytes) -> None:
        """RFC 4422 Appendix A: the response is the authorization identity;
        "=" (RFC 4959) or empty means "the one my certificate shows"."""
        login = b"" if response == b"=" else decode_base64(response)
        if login is None:
            return self._refuse(events)
        self._credentials(events, Credentials(login, b"", AuthMethod.EXTERNAL))

    def _sasl_error_answer(self, events: list, response: bytes) -> None:
        self._send_failure(events)            # RFC 7628 §3.2.3: then the final NO

    def _sasl_xoauth2(self, events: list, response: bytes) -> None:
        self._sasl_token(events, AuthMethod.XOAUTH2, response)

    def _sasl_oauthbearer(self, events: list, response: bytes) -> None:
        self._sasl_token(events, AuthMethod.OAUTHBEARER, response)

    def _sasl_token(self, events: list, method: AuthMethod, response: bytes) -> None:
        """XOAUTH2 (Google's) and OAUTHBEARER (RFC 7628): a login and a token;
        only auth_http can check the token (Auth-Method xoauth2/oauthbearer)."""
        parsed = parse_oauth_response(decode_base64(response) or b"", method == AuthMethod.XOAUTH2)
        if parsed is None:
            return self._refuse(events)
        self._credentials(events, Credentials(parsed[0], parsed[1], method))


class Command(NamedTuple):
    """A row of a protocol's command table (ClientMachine._dispatch).

    What counts towards max_errors follows from the table, as in nginx,
    where only the parser counts: a name not in the table is the parser's
    invalid command, counted; a row's refusal (wrong state, before TLS,
    no handler, or the handler's own) is answered the same way, uncounted."""
    handler: Optional[str]     # the machine's method that runs it; None: always refused
    states: Tuple = ()         # the states it may come in (POP3); (): any
    needs_tls: bool = False    # a login command: starttls only refuses it before TLS (nginx)


class ClientMachine(SaslExchange):
    """What the three machines share: buffers, error counting, waiting, SASL.

    A protocol sets its replies (INVALID, INTERNAL_ERROR, NO_CERT, CERT_ERROR), its
    tables (COMMANDS, AUTH_NAMES) and the hooks _command_line and _refuse;
    IMAP, whose commands may hold literals, brings its own _step.
    """
    protocol = ""
    INVALID = b""
    INTERNAL_ERROR = b""
    NO_CERT = b""              # ssl_verify_client's refusals, before closing: no certificate,
    CERT_ERROR = b""           # and one that failed verification
    LOGIN_UNAVAILABLE = (b"", None)    # (text, code): the login defence refuses, for now
    SESSION_LIMIT = (b"", None)        # max_user_sessions, max_user_ip_sessions
    COMMANDS = {}              # name -> Command: the protocol's command table
    AUTH_NAMES = {}            # *_auth method -> the names that advertise it
    state = None               # POP3's AUTHORIZATION state (Command.states)

    def __init__(self, settings: Settings, now: float = 0.0,
                 randomness: Optional[random.Random] = None, tls: bool = False):
        self.settings = settings
        self.tls = tls                 # the connection is encrypted
        self.now = now
        self.randomness = randomness or random.Random()
        self.salt = None               # type: Optional[bytes]
        self.errors = 0
        self.sasl = SaslState.NONE
        self.login = b""               # AUTH LOGIN / POP3 USER: the login so far
        self.waiting = False           # Credentials emitted, outcome pending
        self.awaiting_tls = False      # StartTls emitted, handshake pending
        self._failure = (b"", False)   # the refusal to send after an OAuth error challenge
        self.finished = False          # Quit or Closed emitted
        self.commands = 0              # commands (and SASL responses) taken whole so far
        # The debug log (the session sets ``trace`` when it is on): each
        # command taken, as (name, reply code) in debug_notes; the name is
        # the table's, never an argument, and no note is made when it is off.
        self.trace = False
        self.debug_notes = []          # type: List[Tuple[str, str]]
        self._command_name = None      # type: Optional[str]  (of the command being taken)
        self.waiting_for = ""          # the command whose Credentials wait for a verdict
        self._input = LineBuffer()
        self._output = bytearray()

    # -- the sans-I/O surface ------------------------------------------------
    def receive_data(self, data: bytes) -> list:
        """Feed client bytes; returns the events they complete (may be [])."""
        if self.finished or self.awaiting_tls:
            return []              # nothing sent in clear after STARTTLS is kept
        if not data:
            self.finished = True
            return []
        self._input += data
        return self._process()

    def data_to_send(self) -> bytes:
        """Replies queued since the last call."""
        data = bytes(self._output)
        del self._output[:]
        return data

    @property
    def trailing_data(self) -> bytes:
        """Input not parsed yet: what the client pipelined behind its login."""
        return bytes(self._input)

    def failure_reply(self, text: bytes, code: Optional[bytes] = None) -> bytes:
        """The reply to a refused login (nginx: the auth server's text; SMTP:
        after ``code``, Auth-Error-Code, or nginx's default)."""
        raise NotImplementedError

    def greet(self) -> None:
        """Queue the greeting, if it was not when the machine was made (SMTP
        waits for the client's name and smtp_greeting_delay)."""

    def logged_in_reply(self, reply: bytes) -> bytes:
        """What the client hears when the backend has logged it in: the
        backend's own answer to its login command."""
        return reply

    def tls_started(self) -> list:
        """The handshake after STARTTLS is done: go on (capabilities change)."""
        self.tls = True
        self.awaiting_tls = False
        return self._process()

    @property
    def offers_starttls(self) -> bool:
        return not self.tls and self.settings.starttls != "off"

    @property
    def login_needs_tls(self) -> bool:
        """starttls only: login commands are invalid until TLS (nginx)."""
        return not self.tls and self.settings.starttls == "only"

    def advertised_logins(self) -> Optional[List[str]]:
        """The names of the enabled login methods (AUTH_NAMES), in nginx's
        order, for the capability list; None while starttls only refuses
        logins: then nginx advertises none."""
        if self.login_needs_tls:
            return None
        enabled = getattr(self.settings, self.protocol + "_auth")
        return [name for method in ALL_AUTH_METHODS[self.protocol] if method in enabled
                for name in self.AUTH_NAMES.get(method, ())]

    def _start_tls(self, events: list, reply: bytes) -> None:
        """Answer yes, then forget whatever came after the command: it was
        sent in plaintext and must not be read as if it came over TLS
        (CVE-2011-0411, CVE-2014-3556; RFC 3207 §4.2)."""
        self._output += reply
        self._input.clear()
        self._forget_before_tls()
        events.append(StartTls())
        self.awaiting_tls = True

    def _forget_before_tls(self) -> None:
        """Protocol hook: what the client said before TLS is forgotten."""

    def auth_failed(self, reply: bytes, challenge: Optional[bytes] = None,
                    close: bool = False) -> list:
        """The login was refused: queue ``reply`` and go on with buffered input
        (``close``: and then end, as nginx does without Auth-Wait).  With a
        ``challenge`` (an OAuth error, RFC 7628 §3.2.2), send it as a SASL
        continuation first and the reply after the client's answer to it."""
        self.waiting = False
        if self.trace:             # with a challenge, the reply waits for the client's answer
            self.debug_notes.append((self.waiting_for, self.reply_code(
                reply if challenge is None else self.SASL_PROMPT)))
        self._after_auth_failure()
        self._failure = (reply, close)
        if challenge is not None:
            self._sasl_continue(base64.b64encode(challenge) + b"\r\n")
            self.sasl = SaslState.ERROR
            return self._process()
        events = []
        self._send_failure(events)
        return events + self._process()

    def _send_failure(self, events: list) -> None:
        reply, close = self._failure
        self._output += reply
        if close:
            self._finish(events, Closed(""))

    # -- shared machinery ----------------------------------------------------
    def _process(self) -> list:
        events = []
        while not (self.waiting or self.finished or self.awaiting_tls) and self._input:
            self._command_name, before = None, len(self._output)
            if not self._step(events):
                break
            self.commands += 1
            if self.trace and self._command_name is not None:
                self._note(events, bytes(self._output[before:]))
        return events

    def _note(self, events: list, reply: bytes) -> None:
        """The debug note of the command just taken (trace is on): its name
        and its reply's code ("" while its Credentials wait for a verdict)."""
        if self.waiting:
            self.waiting_for = self._command_name
        self.debug_notes.append((self._command_name, self.reply_code(reply) if reply else ""))

    def reply_code(self, reply: bytes) -> str:
        """The status of a reply to the client, for the debug log (never its
        text): IMAP's tagged status (the last line), POP3's first word,
        SMTP's code (the last line)."""
        raise NotImplementedError

    def _invalid(self, events: list, counted: bool, reply: Optional[bytes] = None) -> None:
        """Answer an invalid command; nginx counts only the parser's rejections
        towards max_errors, and closes once they reach it."""
        self._output += self.INVALID if reply is None else reply
        if self._command_name is None:
            self._command_name = "invalid command"     # its words are not logged: any text
        if counted:
            self.errors += 1
            if self.errors >= self.settings.max_errors:
                self._finish(events, Closed("client sent too many invalid commands"))

    def _finish(self, events: list, event) -> None:
        events.append(event)
        self.finished = True

    def _credentials(self, events: list, credentials: Credentials) -> None:
        events.append(credentials)
        self.waiting = True

    def _after_auth_failure(self) -> None:
        """Protocol hook: the state to return to after a refused login."""

    @property
    def buffer_size(self) -> int:
        """The longest command accepted (imap_client_buffer, pop3_client_buffer)."""
        return getattr(self.settings, self.protocol + "_client_buffer")

    def _step(self, events: list) -> bool:
        """One command line (POP3, SMTP; IMAP has literals and its own).
        Returns False when it needs more data."""
        limit = self.buffer_size
        line = self._take_line(limit)
        if line is None:
            if len(self._input) >= limit:
                # nginx: "client sent too long command", the invalid reply, close.
                self._output += self.INVALID
                self._finish(events, Closed("client sent too long command"))
            return False
        if self.sasl != SaslState.NONE:
            self._sasl_line(events, strip_eol(line))
        else:
            self._command_line(events, line)
        return True

    def _command_line(self, events: list, line: bytes) -> None:
        """Protocol hook: handle one command line."""
        raise NotImplementedError

    def _refuse(self, events: list) -> None:
        """Protocol hook: answer a command the handler refuses (not counted)."""
        raise NotImplementedError

    def _dispatch(self, events: list, name: bytes, *arguments) -> None:
        """Run one command by the protocol's table (COMMANDS): one not in it,
        not valid in this state, or refused before TLS by starttls only
        (nginx) is answered by _refuse, and not counted as an error."""
        row = self.COMMANDS.get(name)
        if row is not None:
            self._command_name = name.decode("ascii")   # a row's name, never the client's text
        if row is None or row.handler is None or (row.states and self.state not in row.states):
            return self._refuse(events)
        if row.needs_tls and self.login_needs_tls:
            return self._refuse_before_tls(events, name)
        getattr(self, row.handler)(events, *arguments)

    def _refuse_before_tls(self, events: list, name: bytes) -> None:
        """A login command under starttls only, before TLS: nginx refuses it
        as an invalid command (a protocol may say more)."""
        self._refuse(events)

    def _take_line(self, limit: int) -> Optional[bytes]:
        """The next line (with its LF) from the input, or None if incomplete."""
        return self._input.take_line(limit)


# -- IMAP (RFC 3501), as ngx_mail_imap_handler.c --------------------------------

IMAP_GREETING = b"* OK IMAP4 ready\r\n"
IMAP_OK = b"OK completed\r\n"
IMAP_NEXT = b"+ OK\r\n"                       # literal continuation
IMAP_BYE = b"* BYE\r\n"
IMAP_INVALID = b"BAD invalid command\r\n"
IMAP_INTERNAL_ERROR = b"* BAD internal server error\r\n"
IMAP_ID_REPLY = b"* ID NIL\r\n"               # extension: RFC 2971 §3.1, no fields

# RFC 3501 §9: tag = 1*<any ASTRING-CHAR except "+">.
IMAP_TAG_CHARS = frozenset(range(0x21, 0x7F)) - frozenset(b'(){%*"\\+')
# The capabilities that advertise each imap_auth method (ClientMachine.advertised_logins).
IMAP_AUTH_NAMES = {"plain": ("AUTH=PLAIN",), "login": ("AUTH=LOGIN",),
                   "cram-md5": ("AUTH=CRAM-MD5",), "external": ("AUTH=EXTERNAL",),
                   "xoauth2": ("AUTH=XOAUTH2",), "oauthbearer": ("AUTH=OAUTHBEARER",)}
IMAP_NO_CERT = b"* BYE No required SSL certificate\r\n"
IMAP_CERT_ERROR = b"* BYE SSL certificate error\r\n"
# Extensions (README "Failed logins"): (text, code) for failure_reply.
# RFC 5530 §3: UNAVAILABLE is a temporary failure; LIMIT, a limit such as
# the number of connections.
IMAP_LOGIN_UNAVAILABLE = (b"[UNAVAILABLE] Temporary authentication failure", None)
IMAP_SESSION_LIMIT = (b"[LIMIT] Too many sessions for this user", None)
IMAP_COMMAND_TABLE = {
    b"CAPABILITY": Command("_capability"), b"NOOP": Command("_noop"),
    b"LOGOUT": Command("_logout"), b"STARTTLS": Command("_starttls"), b"ID": Command("_id"),
    b"LOGIN": Command("_login", needs_tls=True),        # RFC 3501 §6.2.3: LOGINDISABLED
    b"AUTHENTICATE": Command("_authenticate", needs_tls=True),
}
IMAP_COMMANDS = frozenset(IMAP_COMMAND_TABLE)       # anything else is invalid (nginx)
IMAP_MAX_COMMAND = max(len(name) for name in IMAP_COMMANDS)    # a longer word is none of them


class ImapCommand(NamedTuple):
    tag: bytes                 # with its trailing space, as nginx keeps it
    name: bytes                # upper case
    args: List                 # bytes for strings; b"(" and b")" markers in ID
    end: int                   # bytes consumed


class ImapInvalid(NamedTuple):
    tag: Optional[bytes]       # None: the reply is tagged "*"
    end: Optional[int]         # bytes to drop (through the LF after the error),
                               # or None: the LF has not come yet
    close: bool                # a non-synchronizing literal was seen: cannot resync


class ImapIncomplete(NamedTuple):
    tag: Optional[bytes]
    sync_literals: int         # {n} headers complete so far: each wants "+ OK"


class ImapScanner:
    """Scans the IMAP command at the start of a growing buffer (sans-I/O).

    scan(data, limit) returns ImapCommand, ImapInvalid or ImapIncomplete;
    reset() before the next command.  Only the first ``limit`` bytes are
    looked at (imap_client_buffer: a whole command must fit, as nginx's
    buffer): a command not decided within them stays ImapIncomplete.  Strings are atoms, quoted strings (backslash
    escapes removed, as nginx) or literals: ``{n}`` synchronizing, ``{n+}``
    non-synchronizing (RFC 7888).  Like nginx >= 1.29.6 a quoted string or
    literal must be followed by SP or CRLF.

    Resumable, so that the work is linear in the bytes however they arrive
    and every answer is the same whatever the split: the scan goes on from
    the first byte it has not looked at, with what it knows so far (the
    arguments, and the one under way in ``pending``), and a decision is
    made as soon as the bytes that decide it have come.
    """

    def __init__(self, max_literal: int):
        self.max_literal = max_literal
        self.reset()

    def reset(self) -> None:
        """Forget the command: the next scan starts at the buffer's first byte."""
        self.tag = None            # type: Optional[bytes]  (with its trailing space)
        self.name = None           # type: Optional[bytes]  (upper case)
        self.args = []             # the arguments scanned so far
        self.pos = 0               # the first byte not looked at (outside ``pending``)
        self.separated = False     # at self.pos an argument may start (spaces skipped)
        self.pending = None        # the argument under way: (kind, start, ...), see _go_on
        self.sync_literals = 0     # {n} headers complete so far: each wants "+ OK"
        self.non_sync_seen = False
        self.end = 0               # this scan's bound: min(len(data), limit)

    def scan(self, data: bytearray, limit: int):
        self.end = min(len(data), limit)          # nothing at or past it is looked at
        if self.name is None:
            header = self._scan_header(data)
            if header is not None:
                return header
        return self._scan_arguments(data)

    def _incomplete(self) -> "ImapIncomplete":
        return ImapIncomplete(self.tag, self.sync_literals)

    def _scan_header(self, data: bytearray):
        """The tag and the command name; None once both are known."""
        if self.tag is None:
            space = _find_any(data, 0, b" \r\n", min(self.end, IMAP_MAX_TAG + 1))
            if space < 0:
                if self.end > IMAP_MAX_TAG:
                    return ImapInvalid(None, _line_end(data, 0), False)
                return self._incomplete()
            tag = bytes(data[:space])
            if data[space] != 0x20 or not tag or any(byte not in IMAP_TAG_CHARS for byte in tag):
                return ImapInvalid(None, _line_end(data, 0), False)
            self.tag, self.pos = tag + b" ", space
        start = _IMAP_SPACES.match(data, self.pos, self.end).end()
        self.pos = start
        if start == self.end:
            return self._incomplete()
        end = _find_any(data, start, b" \r\n", min(self.end, start + IMAP_MAX_COMMAND + 1))
        if end < 0:
            if self.end - start > IMAP_MAX_COMMAND:
                return ImapInvalid(self.tag, _line_end(data, start), False)
            return self._incomplete()
        name = bytes(data[start:end]).upper()
        if name not in IMAP_COMMANDS:
            return ImapInvalid(self.tag, _line_end(data, start), False)
        self.name, self.pos = name, end
        return None

    def _scan_arguments(self, data: bytearray):
        is_id = self.name == b"ID"
        max_args = IMAP_ID_MAX_ARGS if is_id else IMAP_MAX_ARGS
        while True:
            if self.pending is not None:
                argument = self._go_on(data)
                if argument is None:
                    return self._incomplete()
                if argument is False:
                    return self._invalid(data)
                self.args.append(argument)
                self.separated = False
            pos = self.pos
            if pos >= self.end:
                return self._incomplete()
            byte = data[pos]
            if byte == 0x0A:                                   # bare LF ends too
                return ImapCommand(self.tag, self.name, self.args, pos + 1)
            if byte == 0x0D:
                if pos + 1 >= self.end:
                    return self._incomplete()
                if data[pos + 1] != 0x0A:
                    return self._invalid(data)
                return ImapCommand(self.tag, self.name, self.args, pos + 2)
            if byte == 0x20 or not self.separated:
                # SP separates arguments; inside ID's list "(" and ")" need none.
                list_edge = is_id and (byte == 0x29 or self.args[-1:] == [b"("])
                if byte != 0x20 and not list_edge:
                    return self._invalid(data)
                self.pos = _IMAP_SPACES.match(data, pos, self.end).end()
                self.separated = True
                continue
            if len(self.args) >= max_args:
                return self._invalid(data)
            self._start_argument(data, pos, is_id)

    def _invalid(self, data: bytearray) -> "ImapInvalid":
        return ImapInvalid(self.tag, _line_end(data, self.pos), self.non_sync_seen)

    def _start_argument(self, data: bytearray, pos: int, is_id: bool) -> None:
        """An argument starts at ``pos``: what kind it is, in ``pending``."""
        byte = data[pos]
        if byte == 0x22:                                      # '"'
            self.pending = ("quoted", pos, pos + 1)
        elif byte == 0x7B:                                    # '{'
            self.pending = ("literal", pos)
        elif is_id and byte in b"()":
            self.pending = ("parenthesis", pos)
        else:
            self.pending = ("atom", pos, pos)

    def _go_on(self, data: bytearray):
        """Scan on in the argument under way, from where the last scan of it
        stopped.  Returns bytes (done: self.pos is past it), None (more data
        needed: ``pending`` says where to go on) or False (invalid: self.pos
        is where)."""
        kind, start = self.pending[:2]
        if kind == "atom":                  # ("atom", start, where to look on)
            end = _find_any(data, self.pending[2], b" \r\n)" if self.name == b"ID" else b" \r\n",
                            self.end)
            if end < 0:
                self.pending = ("atom", start, self.end)
                return None
            self.pending, self.pos = None, end
            return bytes(data[start:end])
        if kind == "quoted":                # ("quoted", start, where to look on)
            return self._quoted(data, start, self.pending[2])
        if kind == "literal":               # ("literal", start of the {n} header)
            return self._literal_header(data, start)
        if kind == "parenthesis":           # ("parenthesis", where): ID's list, nothing after
            self.pending, self.pos = None, start + 1
            return bytes(data[start:start + 1])
        if kind == "literal data":          # ("literal data", start, length)
            length = self.pending[2]
            if self.end < start + length:
                return None
            return self._after_string(data, start + length, bytes(data[start:start + length]))
        return self._after_string(data, start, self.pending[2])   # ("after", pos, value)

    def _quoted(self, data: bytearray, start: int, scan_from: int):
        """RFC 3501 quoted: no CR or LF inside; a backslash quotes the next byte."""
        end = _IMAP_QUOTED_BODY.match(data, scan_from, self.end).end()
        if end >= self.end or (data[end] == 0x5C and end + 1 == self.end):
            self.pending = ("quoted", start, end)     # the closing quote (or a quoted byte) is due
            return None
        if data[end] != 0x22:                         # CR or LF, bare or after a backslash
            self.pos = end
            return False
        value = _IMAP_QUOTED_PAIR.sub(rb"\1", bytes(data[start + 1:end]))
        return self._after_string(data, end + 1, value)

    def _literal_header(self, data: bytearray, start: int):
        """``{n}`` or ``{n+}``, then CRLF (nginx also takes a bare LF)."""
        rest = bytes(data[start:min(start + 16, self.end)])
        match = _IMAP_LITERAL.match(rest)
        if not match:
            if _IMAP_LITERAL_START.fullmatch(rest):
                return None                           # the header is still coming
            self.pos = start
            return False
        length = int(match.group(1))
        if match.group(2):
            self.non_sync_seen = True
        if length > self.max_literal:
            self.pos = start
            return False
        if not match.group(2):
            self.sync_literals += 1
        self.pending = ("literal data", start + match.end(), length)
        return self._go_on(data)

    def _after_string(self, data: bytearray, pos: int, value: bytes):
        """A string ends at ``pos``; SP or the line end must follow (ID: ")" too)."""
        if pos >= self.end:
            self.pending = ("after", pos, value)
            return None
        self.pending, self.pos = None, pos
        if data[pos] not in b" \r\n" and not (self.name == b"ID" and data[pos] == 0x29):
            return False                       # the line to drop ends after here
        return value


_IMAP_SPACES = re.compile(b" *")
_IMAP_QUOTED_BODY = re.compile(rb'(?:[^"\\\r\n]+|\\[^\r\n])*')
_IMAP_QUOTED_PAIR = re.compile(rb"\\([\x00-\xff])")
_IMAP_LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}(\r\n|\n)")
_IMAP_LITERAL_START = re.compile(rb"\{\d{0,10}\+?(\}\r?)?")
_IMAP_LITERAL_AT_END = re.compile(rb"\{(\d{1,10})\+\}\r?\n\Z")
_IMAP_NON_SYNC_END = re.compile(rb"\+\}\r?\n\Z")          # what nginx looks for
IMAP_UNSKIPPABLE_LITERAL = "client sent invalid command with a non-synchronizing literal"
IMAP_LITERAL_HEADER_MAX = len(b"{9999999999+}\r\n")    # the longest _IMAP_LITERAL


def _line_end(data: bytes, start: int) -> Optional[int]:
    """Index just past the first LF at or after ``start``, or None."""
    index = data.find(b"\n", start)
    return index + 1 if index >= 0 else None


_ANY_OF = {}          # bytes of chars -> a compiled character class (a cache)


def _find_any(data: bytes, start: int, chars: bytes, end: Optional[int] = None) -> int:
    """Index of the first byte of ``chars`` in data[start:end], or -1."""
    pattern = _ANY_OF.get(chars)
    if pattern is None:
        pattern = _ANY_OF[chars] = re.compile(b"[" + re.escape(chars) + b"]")
    match = pattern.search(data, start, len(data) if end is None else end)
    return match.start() if match else -1


class ImapMachine(ClientMachine):
    """The IMAP dialogue before login (RFC 3501 §6.1-6.2), as nginx."""
    protocol = "imap"
    COMMANDS = IMAP_COMMAND_TABLE
    AUTH_NAMES = IMAP_AUTH_NAMES
    INVALID = IMAP_INVALID
    INTERNAL_ERROR = IMAP_INTERNAL_ERROR
    NO_CERT = IMAP_NO_CERT
    CERT_ERROR = IMAP_CERT_ERROR
    LOGIN_UNAVAILABLE = IMAP_LOGIN_UNAVAILABLE
    SESSION_LIMIT = IMAP_SESSION_LIMIT

    def __init__(self, settings: Settings, now: float = 0.0,
                 randomness: Optional[random.Random] = None, tls: bool = False):
        super().__init__(settings, now, randomness, tls)
        self.tag = b""                 # the tag of the command being handled
        self.scanner = ImapScanner(self.buffer_size)
        self._continuations = 0        # "+ OK" sent for the current command
        self._skipping = False         # dropping the rest of an invalid line
        self._skipped_tail = b""       # its last bytes dropped so far (a {n+} header?)
        self._literal_skip = 0         # bytes of a non-synchronizing literal still to drop
        self._output += IMAP_GREETING

    def capability(self) -> bytes:
        """``* CAPABILITY`` from imap_capabilities, then AUTH= in nginx's order
        and STARTTLS; with starttls only and no TLS yet, LOGINDISABLED
        (RFC 3501 §6.2.3) instead of the AUTH= entries."""
        words = list(self.settings.imap_capabilities)
        logins = self.advertised_logins()
        if logins is None:
            words += ["STARTTLS", "LOGINDISABLED"]
        else:
            words += logins
            if self.offers_starttls:
                words.append("STARTTLS")
        return b"* CAPABILITY " + " ".join(words).encode() + b"\r\n"

    def _refuse(self, events: list) -> None:
        self._invalid(events, False, self.tag + IMAP_INVALID)

    def reply_code(self, reply: bytes) -> str:
        last = reply.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
        return reply_code("continuation" if last.startswith(b"+") else "imap-tagged", last)

    def failure_reply(self, text: bytes, code: Optional[bytes] = None) -> bytes:
        return self.tag + b"NO " + text + b"\r\n"

    def _forget_before_tls(self) -> None:
        self.scanner.reset()
        self._continuations = 0
        self._skipping = False
        self._skipped_tail = b""
        self._literal_skip = 0

    def _step(self, events: list) -> bool:
        limit = self.buffer_size
        if self._skipping:
            return self._skip_invalid(events)
        if self.sasl != SaslState.NONE:
            line = self._take_line(limit)
            if line is None:
                return self._check_length(events, self.tag or None, limit)
            self._sasl_line(events, strip_eol(line))
            return True
        scan = self.scanner.scan(self._input, limit)
        if isinstance(scan, ImapIncomplete):
            while self._continuations < scan.sync_literals:
                self._output += IMAP_NEXT
                self._continuations += 1
            return self._check_length(events, scan.tag, limit)
        self._continuations = 0
        self.scanner.reset()
        if isinstance(scan, ImapInvalid):
            self._invalid(events, True, (scan.tag or b"* ") + IMAP_INVALID)
            if scan.close and not self.finished:
                self._finish(events, Closed(IMAP_UNSKIPPABLE_LITERAL))
            self._drop_invalid(events, scan)
            return True
        self._input.take(scan.end)
        self.tag = scan.tag
        self._dispatch(events, scan.name, scan.args)
        return True

    def _check_length(self, events: list, tag: Optional[bytes], limit: int) -> bool:
        """nginx: a command that does not fit imap_client_buffer is refused and
        the connection closed ("client sent too long command").  Returns False
        (nothing more to do until more data comes, or ever)."""
        if len(self._input) >= limit:
            self._output += (tag or b"* ") + IMAP_INVALID
            self._finish(events, Closed("client sent too long command"))
        return False

    def _drop_invalid(self, events: list, scan: ImapInvalid) -> None:
        """Drop the invalid line; if its end has not come yet, drop it as it comes."""
        self._skipped_tail = b""
        if scan.end is not None:
            self._line_dropped(events, self._input.take(scan.end))
        else:
            self._skipped_tail = bytes(self._input[-IMAP_LITERAL_HEADER_MAX:])
            self._input.clear()
            self._skipping = True

    def _skip_invalid(self, events: list) -> bool:
        """Drop the rest of an invalid command as it comes: through its line
        end, and past each non-synchronizing literal announced there.
        Returns False when the input is used up (or the connection closed)."""
        if self._literal_skip:
            self._literal_skip -= len(self._input.take(self._literal_skip))
            return not self._literal_skip
        line = self._input.take_line()
        if line is None:
            self._skipped_tail = (self._skipped_tail + bytes(self._input[-IMAP_LITERAL_HEADER_MAX:])
                                  )[-IMAP_LITERAL_HEADER_MAX:]
            self._input.clear()
            return False
        self._line_dropped(events, self._skipped_tail + line[-IMAP_LITERAL_HEADER_MAX:])
        return True

    def _line_dropped(self, events: list, line: bytes) -> None:
        """An invalid line has been dropped through its LF (``line``: at least
        its last bytes).  If it ends in ``{n+}``, the client sends the n bytes
        of that literal at once, unasked (RFC 7888), and the command goes
        on after them: they are no command, so they are dropped too, and then
        the rest of the command.  nginx cannot skip them and closes instead
        (ngx_mail_imap_parse_command, "detect non-synchronizing literals");
        its tests accept either (nginx-tests mail_imap.t, "literal not
        command").  After ``{n}`` the client waits for a "+" that the BAD
        replaces (RFC 3501 §7.5), so the next line is a command.  A line
        ending in "+}" that is no such header, or a literal that could not
        fit imap_client_buffer (nginx would refuse it as too long), closes
        the connection as nginx does."""
        line = line[-IMAP_LITERAL_HEADER_MAX:]
        self._skipped_tail = b""
        self._skipping = False
        self._literal_skip = 0
        if not _IMAP_NON_SYNC_END.search(line) or self.finished:
            return
        match = _IMAP_LITERAL_AT_END.search(line)
        if match is None or int(match.group(1)) > self.buffer_size:
            self._finish(events, Closed(IMAP_UNSKIPPABLE_LITERAL))
            return
        self._skipping = True
        self._literal_skip = int(match.group(1))

    def _reply(self, text: bytes) -> None:
        self._output += self.tag + text


    def _capability(self, events: list, args: List) -> None:
        self._output += self.capability()
        self._reply(IMAP_OK)

    def _noop(self, events: list, args: List) -> None:
        self._reply(IMAP_OK)

    def _logout(self, events: list, args: List) -> None:
        self._output += IMAP_BYE
        self._reply(IMAP_OK)
        self._finish(events, Quit())

    def _starttls(self, events: list, args: List) -> None:
        """RFC 3501 §6.2.1; invalid when starttls is off or TLS is on already."""
        if not self.offers_starttls:
            return self._refuse(events)
        self._start_tls(events, self.tag + IMAP_OK)

    def _id(self, events: list, args: List) -> None:
        """Extension (RFC 2971): nginx answers BAD, which upsets Thunderbird and
        Roundcube.  We take ``ID NIL`` or ``ID (...)`` and tell nothing back;
        an ``x-originating-ip`` field becomes a ClientIdentity event."""
        valid = args == [b"NIL"] or args == [b"nil"] or (
            len(args) >= 2 and args[0] == b"(" and args[-1] == b")" and
            b"(" not in args[1:-1] and b")" not in args[1:-1])
        if not valid:
            return self._refuse(events)
        fields = args[1:-1]                   # field, value, field, value, ...
        values = {name.lower(): value for name, value in zip(fields[0::2], fields[1::2])}
        if b"x-originating-ip" in values:
            events.append(ClientIdentity(values[b"x-originating-ip"],
                                         values.get(b"x-originating-port", b"")))
        self._output += IMAP_ID_REPLY
        self._reply(IMAP_OK)

    def _login(self, events: list, args: List) -> None:
        """RFC 3501 §6.2.3 LOGIN userid password; nginx wants exactly two
        arguments and a non-empty login (an empty password is allowed)."""
        if len(args) != 2 or not args[0]:
            return self._refuse(events)
        self._credentials(events, Credentials(args[0], args[1], AuthMethod.PLAIN))

    def _authenticate(self, events: list, args: List) -> None:
        """RFC 3501 §6.2.2 with RFC 4959 initial responses."""
        self._sasl_start(events, args, self.settings.imap_auth)


# -- POP3 (RFC 1939, RFC 2449 CAPA, RFC 5034 AUTH), as ngx_mail_pop3_handler.c --

POP3_GREETING = b"+OK POP3 ready\r\n"
POP3_OK = b"+OK\r\n"
POP3_INVALID = b"-ERR invalid command\r\n"
POP3_INTERNAL_ERROR = b"-ERR internal server error\r\n"
# The SASL names for pop3_auth methods, in nginx's order; APOP is no SASL method.
POP3_SASL_NAMES = {"plain": ("PLAIN", "LOGIN"), "cram-md5": ("CRAM-MD5",),
                   "external": ("EXTERNAL",), "xoauth2": ("XOAUTH2",),
                   "oauthbearer": ("OAUTHBEARER",)}
POP3_NO_CERT = b"-ERR No required SSL certificate\r\n"
POP3_CERT_ERROR = b"-ERR SSL certificate error\r\n"
# Extensions: RFC 3206 §4 SYS/TEMP, a temporary failure; RFC 2449 §8.1.1
# IN-USE, the maildrop is in use (Dovecot's answer to too many sessions).
POP3_LOGIN_UNAVAILABLE = (b"[SYS/TEMP] Temporary authentication failure", None)
POP3_SESSION_LIMIT = (b"[IN-USE] Too many sessions for this user", None)


class Pop3State(enum.Enum):
    START = "start"                            # AUTHORIZATION state, nothing yet
    USER = "user"                              # USER given, PASS expected


# nginx: after USER only PASS, CAPA, QUIT and NOOP are valid; a command not
# valid in its state is refused (not counted) and the dialogue starts over.
POP3_COMMAND_TABLE = {
    b"USER": Command("_user", (Pop3State.START,), needs_tls=True),
    b"PASS": Command("_pass", (Pop3State.USER,)),
    b"APOP": Command("_apop", (Pop3State.START,), needs_tls=True),
    b"AUTH": Command("_auth", (Pop3State.START,), needs_tls=True),
    b"STLS": Command("_stls", (Pop3State.START,)),
    b"CAPA": Command("_capa"), b"QUIT": Command("_quit"), b"NOOP": Command("_noop"),
}
POP3_COMMANDS = frozenset(POP3_COMMAND_TABLE)       # anything else is invalid (nginx)


def parse_pop3_command(line: bytes) -> Optional[Tuple[bytes, List[bytes]]]:
    """One POP3 command line -> (NAME, args), or None if invalid.

    As ngx_pop3_parse_command: the keyword is letters only; arguments are
    separated by spaces, except that in USER and PASS a space is part of the
    argument (``USER john doe`` logs in "john doe"); at most three arguments;
    a CR must be followed by LF.
    """
    body = strip_eol(line)
    if b"\r" in body:
        return None
    name, _, rest = body.partition(b" ")
    if not re.fullmatch(rb"[A-Za-z]+", name) or name.upper() not in POP3_COMMANDS:
        return None
    name = name.upper()
    rest = rest.lstrip(b" ")
    if name in (b"USER", b"PASS"):
        args = [rest] if rest else []
    else:
        args = [arg for arg in rest.split(b" ") if arg]
    if len(args) > POP3_MAX_ARGS:
        return None
    return name, args


class Pop3Machine(ClientMachine):
    """The POP3 AUTHORIZATION state (RFC 1939 §4), as nginx."""
    protocol = "pop3"
    COMMANDS = POP3_COMMAND_TABLE
    AUTH_NAMES = POP3_SASL_NAMES
    INVALID = POP3_INVALID
    INTERNAL_ERROR = POP3_INTERNAL_ERROR
    NO_CERT = POP3_NO_CERT
    CERT_ERROR = POP3_CERT_ERROR
    LOGIN_UNAVAILABLE = POP3_LOGIN_UNAVAILABLE
    SESSION_LIMIT = POP3_SESSION_LIMIT

    def __init__(self, settings: Settings, now: float = 0.0,
                 randomness: Optional[random.Random] = None, tls: bool = False):
        super().__init__(settings, now, randomness, tls)
        self.state = Pop3State.START
        if "apop" in settings.pop3_auth or "cram-md5" in settings.pop3_auth:
            # RFC 1939 §7: the greeting carries the APOP timestamp.
            self.salt = make_salt(settings.server_name, now, self.randomness)
            self._output += POP3_GREETING[:-2] + b" " + self.salt + b"\r\n"
        else:
            self._output += POP3_GREETING

    def capability(self, offer_tls: bool = True) -> bytes:
        """CAPA (RFC 2449): pop3_capabilities, then the SASL line, always, and
        STLS (RFC 2595 §4) while TLS is offered; with starttls only and no TLS
        yet, neither USER nor SASL (nginx)."""
        lines = [b"+OK Capability list follows"]
        capabilities = self.settings.pop3_capabilities
        logins = self.advertised_logins()
        if logins is None:
            lines.extend(word.encode() for word in capabilities if word.upper() != "USER")
        else:
            lines.extend(word.encode() for word in capabilities)
            lines.append(" ".join(["SASL"] + logins).encode())
        if offer_tls and self.offers_starttls:
            lines.append(b"STLS")
        return b"\r\n".join(lines) + b"\r\n.\r\n"

    def _after_auth_failure(self) -> None:
        self.state = Pop3State.START

    def _command_line(self, events: list, line: bytes) -> None:
        parsed = parse_pop3_command(line)
        if parsed is None:
            self.state = Pop3State.START
            self._invalid(events, True)
            return
        name, args = parsed
        self._dispatch(events, name, args)

    def reply_code(self, reply: bytes) -> str:
        return reply_code("pop3-ok", reply)

    def failure_reply(self, text: bytes, code: Optional[bytes] = None) -> bytes:
        return b"-ERR " + text + b"\r\n"

    def _refuse(self, events: list) -> None:
        self.state = Pop3State.START
        self._invalid(events, False)

    def _user(self, events: list, args: List[bytes]) -> None:
        if len(args) != 1:
            return self._refuse(events)
        self.login = args[0]
        self.state = Pop3State.USER
        self._output += POP3_OK

    def _pass(self, events: list, args: List[bytes]) -> None:
        if len(args) != 1:
            return self._refuse(events)
        self.state = Pop3State.START
        self._credentials(events, Credentials(self.login, args[0], AuthMethod.PLAIN))

    def _apop(self, events: list, args: List[bytes]) -> None:
        """RFC 1939 §7: APOP name digest, only when pop3_auth has apop."""
        if len(args) != 2 or "apop" not in self.settings.pop3_auth:
            return self._refuse(events)
        self._credentials(events, Credentials(args[0], args[1].lower(), AuthMethod.APOP, self.salt))

    def _capa(self, events: list, args: List[bytes]) -> None:
        # After USER, nginx lists the plain capabilities, without STLS.
        self._output += self.capability(offer_tls=self.state == Pop3State.START)

    def _quit(self, events: list, args: List[bytes]) -> None:
        self._output += POP3_OK
        self._finish(events, Quit())

    def _noop(self, events: list, args: List[bytes]) -> None:
        self._output += POP3_OK

    def _stls(self, events: list, args: List[bytes]) -> None:
        """RFC 2595 §4 STLS."""
        if not self.offers_starttls:
            return self._refuse(events)
        self._start_tls(events, POP3_OK)

    def _auth(self, events: list, args: List[bytes]) -> None:
        """RFC 5034 AUTH; without arguments nginx lists the methods."""
        if not args:
            names = "".join(name + "\r\n" for name in self.advertised_logins())
            self._output += b"+OK methods supported:\r\n" + names.encode() + b".\r\n"
            return
        self._sasl_start(events, args, self.settings.pop3_auth)


# -- SMTP (RFC 5321, RFC 4954 AUTH, RFC 2920 pipelining), as ngx_mail_smtp_handler.c

SMTP_OK = b"250 2.0.0 OK\r\n"
SMTP_BYE = b"221 2.0.0 Bye\r\n"
SMTP_INVALID = b"500 5.5.1 Invalid command\r\n"
SMTP_INVALID_PIPELINING = b"503 5.5.0 Improper use of SMTP command pipelining\r\n"
SMTP_INVALID_ARGUMENT = b"501 5.5.4 Invalid argument\r\n"
SMTP_AUTH_REQUIRED = b"530 5.7.1 Authentication required\r\n"
SMTP_BAD_SEQUENCE = b"503 5.5.1 Bad sequence of commands\r\n"
SMTP_INTERNAL_ERROR = b"451 4.3.2 Internal server error\r\n"
SMTP_AUTH_OK = b"235 2.0.0 OK\r\n"                 # after the backend login
SMTP_AUTH_FAILED_CODE = b"535 5.7.0"              # nginx's default failure code
SMTP_COMMAND_TABLE = {
    b"HELO": Command("_helo"), b"EHLO": Command("_helo"), b"QUIT": Command("_quit"),
    b"NOOP": Command("_noop"), b"RSET": Command("_rset"), b"RCPT": Command("_rcpt"),
    b"STARTTLS": Command("_starttls"), b"AUTH": Command("_auth", needs_tls=True),
    b"MAIL": Command("_mail", needs_tls=True),     # smtp_auth none: the login begins here
    # Extension: Postfix's XCLIENT, from trusted_networks only (_xclient).
    b"XCLIENT": Command("_xclient"),
    # Known to nginx's parser, refused by its handler: 500, not counted.
    b"VRFY": Command(None), b"EXPN": Command(None), b"HELP": Command(None),
}
SMTP_COMMANDS = frozenset(SMTP_COMMAND_TABLE)       # anything else is invalid (nginx)
SMTP_MAX_ARGS = 11                                # ngx_mail_smtp_parse_command
SMTP_AUTH_NAMES = {"plain": ("PLAIN",), "login": ("LOGIN",), "cram-md5": ("CRAM-MD5",),
                   "external": ("EXTERNAL",), "xoauth2": ("XOAUTH2",),
                   "oauthbearer": ("OAUTHBEARER",)}     # smtp_auth none is no SASL method
SMTP_START_TLS = b"220 2.0.0 Start TLS\r\n"
SMTP_NO_CERT = b"421 4.7.1 No required SSL certificate\r\n"
SMTP_CERT_ERROR = b"421 4.7.1 SSL certificate error\r\n"
# Extensions: RFC 4954 §6 "454 4.7.0 Temporary authentication failure";
# 421, the service closes the channel (RFC 5321 §3.8).
SMTP_LOGIN_UNAVAILABLE = (b"Temporary authentication failure", b"454 4.7.0")
SMTP_SESSION_LIMIT = (b"Too many sessions for this user", b"421 4.7.0")
SMTP_TLS_FIRST = b"530 5.7.0 Must issue a STARTTLS command first\r\n"   # RFC 3207 §4
SMTP_TOO_MANY_RECIPIENTS = b"452 4.5.3 Too many recipients\r\n"      # RFC 5321 §4.5.3.1.10
# Extension: Postfix's XCLIENT (www.postfix.org/XCLIENT_README.html) from a
# trusted_networks peer: the attributes acted on (the EHLO keyword lists
# them), the values that mean "unknown", and Postfix's reply to a bad one.
SMTP_XCLIENT_ATTRIBUTES = b"ADDR PORT NAME"
SMTP_XCLIENT_UNKNOWN = (b"[UNAVAILABLE]", b"[TEMPUNAVAIL]")
SMTP_XCLIENT_SYNTAX = b"501 5.5.4 Bad XCLIENT syntax\r\n"
# RFC 5321 §4.1.1: no control byte belongs in these arguments.  nginx 1.22
# passes NUL and TAB on inside MAIL and RCPT; we refuse them with 501.
SMTP_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")


def parse_smtp_command(line: bytes) -> Optional[Tuple[bytes, List[bytes], bytes]]:
    """One SMTP command line -> (VERB, args, text), or None if invalid.

    ``text`` runs from the verb to the end of the last argument, which is
    what nginx keeps of MAIL and RCPT (``MAIL FROM:<a@b> SIZE=100``).
    """
    body = strip_eol(line)
    verb, _, rest = body.partition(b" ")
    if not re.fullmatch(rb"[A-Za-z]+", verb) or verb.upper() not in SMTP_COMMANDS:
        return None
    args = [arg for arg in rest.split(b" ") if arg]
    if len(args) > SMTP_MAX_ARGS:
        return None
    return verb.upper(), args, body.rstrip(b" ")


def xclient_address(value: bytes) -> Optional[bytes]:
    """XCLIENT ADDR: an IPv4 address, or an IPv6 one after "IPV6:"
    (XCLIENT_README; Postfix takes it bare too) -> the address as Python
    writes it; b"" for [UNAVAILABLE] (unknown: the address stays); None
    for anything else."""
    if value in SMTP_XCLIENT_UNKNOWN:
        return b""
    prefixed = value[:5].upper() == b"IPV6:"
    bare = value[5:] if prefixed else value
    if not re.fullmatch(rb"[0-9A-Fa-f:.]+", bare):      # no scope (fe80::1%eth0), no junk
        return None
    try:
        address = ipaddress.ip_address(bare.decode("ascii"))
    except ValueError:
        return None
    if prefixed and address.version != 6:
        return None
    return str(address).encode()


def xclient_port(value: bytes) -> Optional[bytes]:
    """XCLIENT PORT: a TCP port; b"" for [UNAVAILABLE]; None for anything else."""
    if value in SMTP_XCLIENT_UNKNOWN:
        return b""
    if not re.fullmatch(rb"\d{1,5}", value) or int(value) > 65535:
        return None
    return value


def xclient_name(value: bytes) -> Optional[bytes]:
    """XCLIENT NAME: a host name, or [UNAVAILABLE] / [TEMPUNAVAIL] (the
    lookup failed for good, for now: kept, they are what our own resolver
    says then); None for anything else, as Postfix's "Bad NAME syntax"."""
    if value in SMTP_XCLIENT_UNKNOWN or valid_host_name(value.decode("latin-1")):
        return value
    return None


# The check of each attribute acted on; any other (HELO, PROTO, LOGIN,
# DESTADDR...) is taken and ignored.
XCLIENT_CHECKS = {b"ADDR": xclient_address, b"PORT": xclient_port, b"NAME": xclient_name}


def parse_xclient(args: List[bytes]) -> Optional[ClientIdentity]:
    """XCLIENT_README's ``XCLIENT 1*( SP attribute-name "=" attribute-value )``,
    values in xtext (RFC 3461 §4), names in any case -> a ClientIdentity
    (source "XCLIENT"), or None if the command is malformed: no attribute,
    one without "=", a value that is no xtext, or a bad ADDR, PORT or NAME.
    An attribute sent twice counts for its last value."""
    if not args:
        return None
    values = {}
    for arg in args:
        name, equals, encoded = arg.partition(b"=")
        value = decode_xtext(encoded)
        if not equals or not name or value is None:
            return None
        name = name.upper()
        check = XCLIENT_CHECKS.get(name)
        if check is not None:
            values[name] = check(value)
            if values[name] is None:
                return None
    return ClientIdentity(values.get(b"ADDR", b""), values.get(b"PORT", b""),
                          values.get(b"NAME"), "XCLIENT")


class SmtpMachine(ClientMachine):
    """The SMTP dialogue up to AUTH (or, with smtp_auth none, the first RCPT).

    The greeting is not queued here: the session sends it when the client's
    name is resolved and smtp_greeting_delay has passed (``greet()``).
    What the client said is kept for the backend login: ``helo`` and
    ``esmtp`` (it said EHLO), ``mail_from`` and ``rcpt_to`` (raw commands).
    ``xclient_allowed``: the session says the peer is in trusted_networks;
    then XCLIENT is offered and taken (Postfix's smtpd_authorized_xclient_hosts).
    """
    protocol = "smtp"
    COMMANDS = SMTP_COMMAND_TABLE
    AUTH_NAMES = SMTP_AUTH_NAMES
    INVALID = SMTP_INVALID
    INTERNAL_ERROR = SMTP_INTERNAL_ERROR
    SASL_PROMPT = b"334 "                         # RFC 4954 §4
    NO_CERT = SMTP_NO_CERT
    CERT_ERROR = SMTP_CERT_ERROR
    LOGIN_UNAVAILABLE = SMTP_LOGIN_UNAVAILABLE
    SESSION_LIMIT = SMTP_SESSION_LIMIT

    def __init__(self, settings: Settings, now: float = 0.0,
                 randomness: Optional[random.Random] = None, tls: bool = False):
        super().__init__(settings, now, randomness, tls)
        self.helo = None               # type: Optional[bytes]
        self.esmtp = False
        self.mail_from = None          # type: Optional[bytes]
        self.rcpt_to = None            # type: Optional[bytes]
        self.xclient_allowed = False   # set by the session, for the whole connection

    def reply_code(self, reply: bytes) -> str:
        return reply_code("smtp", reply.rstrip(b"\r\n").rsplit(b"\n", 1)[-1])

    def failure_reply(self, text: bytes, code: Optional[bytes] = None) -> bytes:
        return (code or SMTP_AUTH_FAILED_CODE) + b" " + text + b"\r\n"

    def greet(self) -> None:
        self._output += self.greeting()

    def greeting(self) -> bytes:
        return b"220 " + self.settings.server_name.encode() + b" ESMTP ready\r\n"

    def logged_in_reply(self, reply: bytes) -> bytes:
        """nginx's own 235 answers the client's AUTH (the backend was not
        asked with AUTH, or answered it already); with smtp_auth none, the
        backend's answer to the replayed RCPT."""
        return reply or SMTP_AUTH_OK

    def ehlo_reply(self) -> bytes:
        """``250-name``, one line per smtp_capabilities item, XCLIENT to a
        trusted peer (XCLIENT_README: the keyword, then the attributes
        supported), then AUTH, then STARTTLS while offered (RFC 3207); with
        starttls only and no TLS yet, no AUTH.  The last line has a space
        after the code (RFC 5321 §4.2.1)."""
        lines = [self.settings.server_name] + list(self.settings.smtp_capabilities)
        if self.xclient_allowed:
            lines.append("XCLIENT " + SMTP_XCLIENT_ATTRIBUTES.decode())
        names = self.advertised_logins()
        if names:
            lines.append("AUTH " + " ".join(names))
        if self.offers_starttls:
            lines.append("STARTTLS")
        encoded = [line.encode() for line in lines]
        return b"".join(b"250-" + line + b"\r\n" for line in encoded[:-1]) + \
            b"250 " + encoded[-1] + b"\r\n"

    def _command_line(self, events: list, line: bytes) -> None:
        parsed = parse_smtp_command(line)
        if parsed is None or (b"\r" in strip_eol(line) and not self._takes_text(line)):
            self._invalid(events, True)
            return
        verb, args, text = parsed
        if verb in (b"HELO", b"EHLO", b"MAIL", b"RCPT") and (
                SMTP_CONTROL_BYTES.search(text) or not line.endswith(b"\r\n")):
            self._output += SMTP_INVALID_ARGUMENT      # never stored, never replayed
            return
        self._dispatch(events, verb, verb, args, text)

    @staticmethod
    def _takes_text(line: bytes) -> bool:
        """HELO, EHLO, MAIL and RCPT get 501 for a bad byte, not 500."""
        return line[:4].upper() in (b"HELO", b"EHLO", b"MAIL", b"RCPT")

    def _refuse(self, events: list) -> None:
        """VRFY, EXPN, HELP, STARTTLS (while starttls is off), a refused AUTH:
        nginx answers 500 without counting them as errors."""
        self._invalid(events, False)

    def _refuse_before_tls(self, events: list, name: bytes) -> None:
        """AUTH gets nginx's 500.  MAIL gets RFC 3207 §4's 530 (an extension:
        nginx lets mail in before TLS, its PR #705), unless smtp_auth has no
        none: then nginx's own 530 "authentication required", as after TLS."""
        if name != b"MAIL":
            return self._refuse(events)
        self._output += SMTP_TLS_FIRST if "none" in self.settings.smtp_auth else SMTP_AUTH_REQUIRED

    def _helo(self, events: list, verb: bytes, args: List[bytes], text: bytes) -> None:
        if len(args) != 1:
            self._output += SMTP_INVALID_ARGUMENT
            return
        self.helo = args[0]
        self.mail_from = self.rcpt_to = None           # a new HELO resets the transaction
        if verb == b"HELO":
            self._output += b"250 " + self.settings.server_name.encode() + b"\r\n"
        else:
            self.esmtp = True
            self._output += self.ehlo_reply()

    def _quit(self, events: list, verb: bytes, args: List, text: bytes) -> None:
        self._output += SMTP_BYE
        self._finish(events, Quit())

    def _noop(self, events: list, verb: bytes, args: List, text: bytes) -> None:
        self._output += SMTP_OK

    def _rset(self, events: list, verb: bytes, args: List, text: bytes) -> None:
        self.mail_from = self.rcpt_to = None
        self._output += SMTP_OK

    def _mail(self, events: list, verb: bytes, args: List[bytes], text: bytes) -> None:
        """Only with smtp_auth none: MAIL is answered here and kept for the
        backend (nginx 1.29.1 and later forget any login first)."""
        if "none" not in self.settings.smtp_auth:
            self._output += SMTP_AUTH_REQUIRED
        elif self.mail_from is not None:
            self._output += SMTP_BAD_SEQUENCE
        elif not args:
            self._output += SMTP_INVALID_ARGUMENT
        else:
            self.mail_from = text
            self._output += SMTP_OK

    def _rcpt(self, events: list, verb: bytes, args: List[bytes], text: bytes) -> None:
        """The first RCPT after MAIL is the moment of authentication for
        smtp_auth none: the session decides with the HELO, MAIL and RCPT."""
        if self.mail_from is None:
            self._output += SMTP_BAD_SEQUENCE
        elif not args:
            self._output += SMTP_INVALID_ARGUMENT
        else:
            self.rcpt_to = text
            self._credentials(events, Credentials(b"", b"", AuthMethod.NONE))

    def _starttls(self, events: list, verb: bytes, args: List, text: bytes) -> None:
        """RFC 3207; the HELO and the transaction are forgotten (§4.2)."""
        if not self.offers_starttls or args:
            return self._refuse(events)
        self._start_tls(events, SMTP_START_TLS)

    def _forget_before_tls(self) -> None:
        self.helo = self.mail_from = self.rcpt_to = None
        self.esmtp = False

    def _xclient(self, events: list, verb: bytes, args: List[bytes], text: bytes) -> None:
        """Postfix's XCLIENT from a trusted peer (a webmail, a filter) naming
        the client it speaks for; from any other peer what nginx says to a
        command it does not know (counted), as before.  XCLIENT_README: not
        "in the middle of a mail delivery transaction" (503, as AUTH); a
        malformed one changes nothing; a good one is answered with the
        greeting and the dialogue starts again ("the server resets state to
        the initial SMTP greeting protocol stage": EHLO again)."""
        if not self.xclient_allowed:
            return self._invalid(events, True)
        if self.mail_from is not None:
            self._output += SMTP_BAD_SEQUENCE
            return
        identity = parse_xclient(args)
        if identity is None:
            self._output += SMTP_XCLIENT_SYNTAX
            return
        self._output += self.greeting()
        self._forget_before_tls()                  # the HELO and the transaction, as STARTTLS
        if identity.address or identity.port or identity.name is not None:
            events.append(identity)

    def _auth(self, events: list, verb: bytes, args: List[bytes], text: bytes) -> None:
        """RFC 4954 AUTH, as ngx_mail_auth_parse."""
        if not args:
            self._output += SMTP_INVALID_ARGUMENT
            return
        if self.mail_from is not None:
            # RFC 4954 §4: "not permitted during a mail transaction", 503.
            # (nginx 1.22 takes it, and the MAIL it answered is lost.)
            self._output += SMTP_BAD_SEQUENCE
            return
        self._sasl_start(events, args, self.settings.smtp_auth)


# -- ManageSieve (RFC 5804), an extension: nginx has no sieve module ----------------
# Before AUTHENTICATE a ManageSieve client speaks much as an IMAP client
# does, without tags: a command is NAME *(SP argument) CRLF, an argument an
# atom, a quoted string or a literal (RFC 5804 §4).  So SieveMachine is an
# ImapMachine whose scanner reads no tag, whose replies are OK, NO and BYE
# with an optional (response code) and a string (§1.3), and whose greeting
# is its capabilities (§1.7).  Clients send only non-synchronizing literals
# ({n+}, §4); a {n} is read the same way, since ManageSieve has no "+" for
# a client to wait for.

SIEVE_GREETING = b'OK "ManageSieve ready"\r\n'         # after the capabilities (§1.7)
SIEVE_CAPABILITY_OK = b'OK "Capability completed"\r\n'
SIEVE_NOOP_OK = b'OK "NOOP completed"\r\n'
SIEVE_NOOP_TAG_TEXT = b' "Done"\r\n'                    # after OK (TAG "..."), §2.13
SIEVE_LOGOUT_OK = b'OK "Logout completed"\r\n'          # then the close, §2.3
SIEVE_STARTTLS_OK = b'OK "Begin TLS negotiation now"\r\n'
SIEVE_TLS_DONE = b'OK "TLS negotiation successful"\r\n'  # after the capabilities again, §2.2
SIEVE_INVALID = b'NO "Invalid command"\r\n'
SIEVE_ENCRYPT_NEEDED = b'NO (ENCRYPT-NEEDED) "STARTTLS first"\r\n'   # starttls only, §1.3
SIEVE_TOO_MANY_ERRORS = b'BYE "Too many invalid commands"\r\n'      # BYE: we close, §1.3
SIEVE_TOO_LONG = b'BYE "Command too long"\r\n'
SIEVE_INTERNAL_ERROR = b'BYE (TRYLATER) "Internal server error"\r\n'
SIEVE_NO_CERT = b'BYE "No required SSL certificate"\r\n'
SIEVE_CERT_ERROR = b'BYE "SSL certificate error"\r\n'
# (text, code) for failure_reply: TRYLATER, a temporary failure (§1.3).
SIEVE_LOGIN_UNAVAILABLE = (b"Temporary authentication failure", b"TRYLATER")
SIEVE_SESSION_LIMIT = (b"Too many sessions for this user", b"TRYLATER")
# The response codes a refused login may carry (§1.3): the login defence's,
# and an auth server's Auth-Error-Code (any other is left out).
SIEVE_LOGIN_CODES = frozenset([b"TRYLATER", b"AUTH-TOO-WEAK", b"ENCRYPT-NEEDED",
                               b"TRANSITION-NEEDED"])
SIEVE_AUTH_NAMES = {"plain": ("PLAIN",), "login": ("LOGIN",), "external": ("EXTERNAL",),
                    "xoauth2": ("XOAUTH2",), "oauthbearer": ("OAUTHBEARER",)}
SIEVE_QUOTED_MAX = 1024        # RFC 5804 §4: at most 1024 octets between the quotes
SIEVE_UNQUOTABLE = re.compile(rb"[\r\n\0]")
SIEVE_COMMAND_TABLE = {
    b"CAPABILITY": Command("_capability"), b"NOOP": Command("_noop"),
    b"LOGOUT": Command("_logout"), b"STARTTLS": Command("_starttls"),
    b"AUTHENTICATE": Command("_authenticate", needs_tls=True),
    # The commands of the authenticated state (§2.5-2.12, §2.14):
    # read whole, literal and all, and refused (not counted) until the login.
    b"PUTSCRIPT": Command(None), b"LISTSCRIPTS": Command(None), b"SETACTIVE": Command(None),
    b"GETSCRIPT": Command(None), b"DELETESCRIPT": Command(None), b"RENAMESCRIPT": Command(None),
    b"CHECKSCRIPT": Command(None), b"HAVESPACE": Command(None), b"UNAUTHENTICATE": Command(None),
}
SIEVE_MAX_COMMAND = max(len(name) for name in SIEVE_COMMAND_TABLE)


def sieve_string(data: bytes) -> bytes:
    """A string for the client (RFC 5804 §4): quoted, with '"' and '\\'
    escaped, unless it holds CR, LF or NUL or is too long to be quoted;
    then a literal, ``{n}`` CRLF and the n bytes."""
    if len(data) <= SIEVE_QUOTED_MAX and not SIEVE_UNQUOTABLE.search(data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


class SieveScanner(ImapScanner):
    """ImapScanner for ManageSieve: no tag, the name from
    SIEVE_COMMAND_TABLE.  With ``response`` set before a scan, it reads a
    SASL client response instead (RFC 5804 §2.1: a string and CRLF), as a
    command with no name (b"") and the string its one argument."""

    def reset(self) -> None:
        super().reset()
        self.response = False

    def _scan_header(self, data: bytearray):
        self.tag = b""
        if self.response:
            self.name, self.separated = b"", True      # the string starts at once
            return None
        end = _find_any(data, 0, b" \r\n", min(self.end, SIEVE_MAX_COMMAND + 1))
        if end < 0:
            if self.end > SIEVE_MAX_COMMAND:
                return ImapInvalid(None, _line_end(data, 0), False)
            return self._incomplete()
        name = bytes(data[:end]).upper()
        if name not in SIEVE_COMMAND_TABLE:
            return ImapInvalid(None, _line_end(data, 0), False)
        self.name, self.pos = name, end
        return None


class SieveMachine(ImapMachine):
    """The ManageSieve dialogue before login (RFC 5804 §2.1-2.4, §2.13):
    CAPABILITY, NOOP, LOGOUT, STARTTLS, AUTHENTICATE with SASL (the same
    SaslExchange as the other protocols; challenges and responses are
    strings).  From ImapMachine it keeps the scanning of strings and
    literals, the bound on a command (sieve_client_buffer) and the
    dropping of an invalid line, literals included."""
    protocol = "sieve"
    COMMANDS = SIEVE_COMMAND_TABLE
    AUTH_NAMES = SIEVE_AUTH_NAMES
    INVALID = SIEVE_INVALID
    INTERNAL_ERROR = SIEVE_INTERNAL_ERROR
    NO_CERT = SIEVE_NO_CERT
    CERT_ERROR = SIEVE_CERT_ERROR
    LOGIN_UNAVAILABLE = SIEVE_LOGIN_UNAVAILABLE
    SESSION_LIMIT = SIEVE_SESSION_LIMIT
    SASL_PROMPT = b'""'            # what a challenge looks like, for the debug log

    def __init__(self, settings: Settings, now: float = 0.0,
                 randomness: Optional[random.Random] = None, tls: bool = False):
        super().__init__(settings, now, randomness, tls)
        self.scanner = SieveScanner(self.buffer_size)
        del self._output[:]            # not IMAP's greeting: the capabilities (§1.7)
        self._output += self.capability() + SIEVE_GREETING

    def capability(self) -> bytes:
        """The capability lines (§1.7): each sieve_capabilities entry as
        "NAME" "VALUE", then "SASL" with sieve_auth's mechanisms (an empty
        list while starttls only refuses logins) and "STARTTLS" while it is
        offered; a VERSION entry last, as Dovecot's."""
        lines, last = [], []
        for entry in self.settings.sieve_capabilities:
            name, _, value = entry.partition(" ")
            line = sieve_string(name.encode()) + (b" " + sieve_string(value.encode())
                                                  if value else b"")
            (last if name.upper() == "VERSION" else lines).append(line)
        logins = self.advertised_logins() or []
        lines.append(b'"SASL" ' + sieve_string(" ".join(logins).encode()))
        if self.offers_starttls:
            lines.append(b'"STARTTLS"')
        return b"".join(line + b"\r\n" for line in lines + last)

    def reply_code(self, reply: bytes) -> str:
        last = reply.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
        if last.startswith((b'"', b"{")):         # a SASL challenge (a string)
            return "+"
        return reply_code("sieve", last)

    def failure_reply(self, text: bytes, code: Optional[bytes] = None) -> bytes:
        """``NO [(CODE)] "text"``: CODE one of SIEVE_LOGIN_CODES (§1.3)."""
        code = b"(" + code + b") " if code in SIEVE_LOGIN_CODES else b""
        return b"NO " + code + sieve_string(text) + b"\r\n"

    def tls_started(self) -> list:
        """§2.2: after the handshake, the capabilities again (STARTTLS no
        longer among them; SASL may change), then OK."""
        self.tls = True
        self._output += self.capability() + SIEVE_TLS_DONE
        return super().tls_started()

    def _sasl_continue(self, prompt: bytes) -> None:
        self._output += sieve_string(strip_eol(prompt)) + b"\r\n"     # §2.1: a string

    def _credentials(self, events: list, credentials: Credentials) -> None:
        """A NUL in the login or password is refused here: the backend login
        is SASL PLAIN, whose fields NUL separates (RFC 4616 §2), so it
        would move bytes from one field to the next."""
        if b"\0" in credentials.login or b"\0" in credentials.password:
            return self._refuse(events)
        super()._credentials(events, credentials)

    def _refuse(self, events: list) -> None:
        self._invalid(events, False, SIEVE_INVALID)

    def _refuse_before_tls(self, events: list, name: bytes) -> None:
        self._invalid(events, False, SIEVE_ENCRYPT_NEEDED)

    def _invalid(self, events: list, counted: bool, reply: Optional[bytes] = None) -> None:
        """As ClientMachine's; the last one, which closes, is a BYE (§1.3)."""
        if counted and self.errors + 1 >= self.settings.max_errors:
            reply = SIEVE_TOO_MANY_ERRORS
        super()._invalid(events, counted, reply)

    def _check_length(self, events: list, tag: Optional[bytes], limit: int) -> bool:
        if len(self._input) >= limit:
            self._output += SIEVE_TOO_LONG
            self._finish(events, Closed("client sent too long command"))
        return False

    def _step(self, events: list) -> bool:
        """One command, or one SASL response (a string); no tags and no
        continuations, else as ImapMachine._step."""
        limit = self.buffer_size
        if self._skipping:
            return self._skip_invalid(events)
        self.scanner.response = self.sasl != SaslState.NONE
        scan = self.scanner.scan(self._input, limit)
        if isinstance(scan, ImapIncomplete):
            return self._check_length(events, None, limit)
        self.scanner.reset()
        if isinstance(scan, ImapInvalid):
            if self.sasl != SaslState.NONE:       # no string: taken as a cancel ("*")
                self.sasl = SaslState.NONE
            self._invalid(events, True)
            if scan.close and not self.finished:
                self._finish(events, Closed(IMAP_UNSKIPPABLE_LITERAL))
            self._drop_invalid(events, scan)
            return True
        self._input.take(scan.end)
        if self.sasl != SaslState.NONE:
            # §2.1: one string; "*" (or anything that is no base64) cancels.
            self._sasl_line(events, scan.args[0] if len(scan.args) == 1 else b"*")
            return True
        self._dispatch(events, scan.name, scan.args)
        return True

    def _capability(self, events: list, args: List) -> None:
        if args:
            return self._refuse(events)
        self._output += self.capability() + SIEVE_CAPABILITY_OK

    def _noop(self, events: list, args: List) -> None:
        """§2.13: with a tag, the tag is echoed in the OK (sieve-connect
        waits for it to find the end of what came before)."""
        if len(args) > 1:
            return self._refuse(events)
        if args:
            self._output += b"OK (TAG " + sieve_string(args[0]) + b")" + SIEVE_NOOP_TAG_TEXT
        else:
            self._output += SIEVE_NOOP_OK

    def _logout(self, events: list, args: List) -> None:
        self._output += SIEVE_LOGOUT_OK
        self._finish(events, Quit())

    def _starttls(self, events: list, args: List) -> None:
        """§2.2; refused when starttls is off, TLS is on already, or with arguments."""
        if args or not self.offers_starttls:
            return self._refuse(events)
        self._start_tls(events, SIEVE_STARTTLS_OK)

    def _authenticate(self, events: list, args: List) -> None:
        """§2.1: AUTHENTICATE "MECHANISM" ["initial response"]."""
        self._sasl_start(events, args, self.settings.sieve_auth)


CLIENT_MACHINES = {"imap": ImapMachine, "pop3": Pop3Machine, "smtp": SmtpMachine,
                   "sieve": SieveMachine}


# ========================================================================== #
# ####                          Authentication                          #### #
# ========================================================================== #
# Turns Credentials into a verdict: which backend, with which login and
# password.  The built-in user table (an extension; nginx needs an auth_http
# server for this) keeps hashed passwords, in mailproxy's schemes and
# Dovecot's (README "The user table"; the table's parsing, and the ctypes
# bindings for bcrypt and Argon2, are in Configuration, which must know at
# load whether an entry can be checked); every comparison of a secret uses
# hmac.compare_digest so that its time does not depend on where it differs.
# LoginDefence slows down password guessing (README "Failed logins").

# -- crypt(3) SHA-256 / SHA-512 ("$5$", "$6$"): Ulrich Drepper's specification
# "Unix crypt using SHA-256 and SHA-512", in pure Python because the crypt
# module is gone from Python 3.13.  Step numbers follow the specification.

_SHA_CRYPT_ROUNDS_DEFAULT = 5000
_SHA_CRYPT_ROUNDS_MIN = 1000
_SHA_CRYPT_ROUNDS_MAX = 999999999
_SHA_CRYPT_SALT_MAX = 16
_CRYPT_B64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Step 22 e: which digest bytes make each group of 4 output characters.
_SHA256_CRYPT_ORDER = (
    (0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14),
    (15, 25, 5), (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29), (31, 30))
_SHA512_CRYPT_ORDER = (
    (0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4),
    (47, 5, 26), (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51),
    (31, 52, 10), (53, 11, 32), (12, 33, 54), (34, 55, 13), (56, 14, 35),
    (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60), (40, 61, 19),
    (62, 20, 41), (63,))
_SHA_CRYPT_SCHEMES = {"$5$": (hashlib.sha256, _SHA256_CRYPT_ORDER),
                      "$6$": (hashlib.sha512, _SHA512_CRYPT_ORDER)}


def sha_crypt(password: bytes, setting: str) -> str:
    """crypt(3) of ``password`` with a "$5$" or "$6$" ``setting``
    (``$6$[rounds=N$]salt[$hash]``); returns ``$6$[rounds=N$]salt$hash`` as
    glibc does.  Raises ValueError for a malformed setting or a NUL byte."""
    if b"\0" in password:
        raise ValueError("crypt(3) cannot hash a password with a NUL byte")
    prefix = setting[:3]
    if prefix not in _SHA_CRYPT_SCHEMES:
        raise ValueError("unknown crypt prefix %r" % prefix)
    rest = setting[3:]
    rounds, custom_rounds = _SHA_CRYPT_ROUNDS_DEFAULT, False
    if rest.startswith("rounds="):
        digits, dollar, rest = rest[7:].partition("$")
        if not dollar or not re.fullmatch(r"[0-9]+", digits):
            raise ValueError("malformed rounds= field")
        rounds = max(_SHA_CRYPT_ROUNDS_MIN, min(int(digits), _SHA_CRYPT_ROUNDS_MAX))
        custom_rounds = True
    salt = rest.split("$", 1)[0][:_SHA_CRYPT_SALT_MAX]
    new_hash, order = _SHA_CRYPT_SCHEMES[prefix]
    digest = _sha_crypt_digest(new_hash, password, salt.encode("ascii"), rounds)
    result = prefix + ("rounds=%d$" % rounds if custom_rounds else "")       # 22 a-b
    return result + salt + "$" + _crypt_base64(digest, order)                # 22 c-e


def _repeat_to_length(digest: bytes, length: int) -> bytes:
    """Steps 9-10, 16 and 20: whole copies of ``digest``, then a prefix of it."""
    copies, remainder = divmod(length, len(digest))
    return digest * copies + digest[:remainder]


def _sha_crypt_digest(new_hash, key: bytes, salt: bytes, rounds: int) -> bytes:
    """Steps 1-21: the final digest C."""
    b = new_hash(key + salt + key).digest()                  # steps 4-8
    a = new_hash(key + salt)                                 # steps 1-3
    a.update(_repeat_to_length(b, len(key)))                 # steps 9-10
    length = len(key)
    while length > 0:                                        # step 11
        a.update(b if length & 1 else key)
        length >>= 1
    a_digest = a.digest()                                    # step 12
    # Steps 13-15 hash the key len(key) times over: fed one copy at a time,
    # as glibc does, so that memory stays linear in the key's length (one
    # string of len(key)**2 bytes was 16 MB for a 4 KB password).
    dp = new_hash()
    for _ in range(len(key)):
        dp.update(key)
    p_bytes = _repeat_to_length(dp.digest(), len(key))      # step 16
    s_bytes = _repeat_to_length(new_hash(salt * (16 + a_digest[0])).digest(), len(salt))  # 17-20
    return _sha_crypt_rounds(new_hash, a_digest, p_bytes, s_bytes, rounds)


def _sha_crypt_rounds(new_hash, c: bytes, p: bytes, s: bytes, rounds: int) -> bytes:
    """Step 21.  Round i hashes C with P, S (if i % 3), P (if i % 7) in an order
    that depends on i % 2; the pattern repeats every 42 rounds, so the six
    possible byte strings are built once, not per round."""
    odd_data = {(False, False): p, (True, False): p + s, (False, True): p + p, (True, True): p + s + p}
    even_data = {(False, False): p, (True, False): s + p, (False, True): p + p, (True, True): s + p + p}
    schedule = []
    for i in range(42):
        data = (odd_data if i % 2 else even_data)[(i % 3 != 0, i % 7 != 0)]
        schedule.append((i % 2 == 1, data))
    for i in range(rounds):
        odd, data = schedule[i % 42]
        c = new_hash(data + c if odd else c + data).digest()
    return c


def _crypt_base64(digest: bytes, order: Tuple) -> str:
    """Step 22 e: crypt's base64, least significant 6 bits first."""
    chars = []
    for group in order:
        value = 0
        for index in group:
            value = (value << 8) | digest[index]
        for _ in range(len(group) + 1):
            chars.append(_CRYPT_B64[value & 0x3F])
            value >>= 6
    return "".join(chars)


# -- crypt(3) MD5 ("$1$"): Poul-Henning Kamp's algorithm, as in FreeBSD's
# lib/libcrypt/crypt-md5.c (1994, "THE BEER-WARE LICENSE"), glibc's md5-crypt.c
# and Dovecot's password-scheme-md5crypt.c, which all follow it.  Pure Python:
# it holds the GIL (GIL_BOUND_SCHEMES).

_MD5_CRYPT_SALT_MAX = 8
_MD5_CRYPT_ORDER = ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5), (11,))


def md5_crypt(password: bytes, setting: str) -> str:
    """crypt(3) of ``password`` with a "$1$" ``setting`` (``$1$salt[$hash]``):
    ``$1$salt$hash``.  Raises ValueError for another setting or a NUL byte
    (C's strlen would end the password there)."""
    if b"\0" in password:
        raise ValueError("crypt(3) cannot hash a password with a NUL byte")
    if not setting.startswith("$1$"):
        raise ValueError("not an MD5-crypt setting")
    salt = setting[3:].split("$", 1)[0][:_MD5_CRYPT_SALT_MAX]
    salt_bytes = salt.encode("ascii")
    final = hashlib.md5(password + salt_bytes + password).digest()
    context = hashlib.md5(password + b"$1$" + salt_bytes)
    context.update(_repeat_to_length(final, len(password)))
    length = len(password)
    while length:                      # "Then something really weird...": a 0 byte or the first
        context.update(b"\0" if length & 1 else password[:1])
        length >>= 1
    final = context.digest()
    for i in range(1000):              # "and now, just to make sure things don't run too fast"
        data = password if i & 1 else final
        if i % 3:
            data += salt_bytes
        if i % 7:
            data += password
        final = hashlib.md5(data + (final if i & 1 else password)).digest()
    return "$1$" + salt + "$" + _crypt_base64(final, _MD5_CRYPT_ORDER)


# -- password schemes ----------------------------------------------------------

def hash_password(password: bytes, scheme: str = "PBKDF2-SHA256",
                  rounds: Optional[int] = None) -> str:
    """A user table value for ``password``: ``{SCHEME}DATA`` with a fresh salt."""
    if scheme == "PLAIN":
        value = "{PLAIN}" + password.decode("utf-8")
        if comment_start(value, quotes=False) is None and value == value.rstrip():
            return value
        return "{PLAIN.B64}" + base64.b64encode(password).decode()   # else the file cuts it
    if scheme == "PBKDF2-SHA256":
        salt = os.urandom(16)
        rounds = rounds or PBKDF2_DEFAULT_ROUNDS
        digest = hashlib.pbkdf2_hmac("sha256", password, salt, rounds)
        return "{PBKDF2-SHA256}%d$%s$%s" % (rounds, base64.b64encode(salt).decode(),
                                            base64.b64encode(digest).decode())
    if scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        alphabet = _CRYPT_B64
        salt = "".join(alphabet[byte % 64] for byte in os.urandom(16))
        prefix = "$6$" if scheme == "SHA512-CRYPT" else "$5$"
        setting = prefix + ("rounds=%d$" % rounds if rounds else "") + salt
        return "{%s}%s" % (scheme, sha_crypt(password, setting))
    raise ValueError("unknown scheme %r" % scheme)


def password_matches(entry: PasswordEntry, password: bytes) -> bool:
    """Does ``password`` match the table entry?  Constant-time comparison.

    A password longer than PASSWORD_MAX never matches, and is checked cut to
    PASSWORD_MAX bytes all the same: it costs what the longest password that
    could match costs, so its answer comes no sooner than a wrong one's."""
    too_long = len(password) > PASSWORD_MAX
    matches = _scheme_matches(entry, password[:PASSWORD_MAX])
    return matches and not too_long


def _scheme_matches(entry: PasswordEntry, password: bytes) -> bool:
    if entry.scheme == "PLAIN":
        return hmac.compare_digest(entry.data.encode("utf-8"), password)
    if entry.scheme == "PBKDF2-SHA256":
        if not valid_pbkdf2_data(entry.data):
            return False
        rounds, salt, expected = entry.data.split("$")
        expected_bytes = base64.b64decode(expected)
        digest = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(salt),
                                     int(rounds), len(expected_bytes))
        return hmac.compare_digest(digest, expected_bytes)
    if entry.scheme in DIGEST_SCHEMES:
        return _digest_matches(entry, password)
    if entry.scheme in ("ARGON2I", "ARGON2ID"):
        return _argon2_matches(entry, password)
    try:
        if entry.scheme == "BLF-CRYPT":
            computed = _library_crypt(password, entry.data)
        elif entry.scheme == "MD5-CRYPT":
            computed = md5_crypt(password, entry.data)
        else:
            computed = sha_crypt(password, entry.data)
    except ValueError:
        return False
    return hmac.compare_digest(computed.encode(), entry.data.encode())


def _digest_matches(entry: PasswordEntry, password: bytes) -> bool:
    """Dovecot's {SHA*} and {SSHA*}: the digest of the password (then the
    salt, which follows the digest in the data)."""
    name, length, _ = DIGEST_SCHEMES[entry.scheme]
    raw = base64.b64decode(entry.data)
    computed = hashlib.new(name, password + raw[length:]).digest()
    return hmac.compare_digest(computed, raw[:length])


def _argon2_matches(entry: PasswordEntry, password: bytes) -> bool:
    """libargon2's raw hash with the entry's parameters, compared here."""
    parameters = argon2_parameters(entry.data, entry.scheme)
    if parameters is None:
        return False
    kind, version, memory, time_cost, lanes, salt, expected = parameters
    computed = argon2_raw(kind, version, memory, time_cost, lanes, password, salt, len(expected))
    return computed is not None and hmac.compare_digest(computed, expected)


def _library_crypt(password: bytes, setting: str) -> str:
    """libcrypt's crypt (bcrypt); ValueError if it cannot, so no match."""
    crypt = crypt_function()
    if b"\0" in password or crypt is None:
        raise ValueError("libcrypt cannot hash this")
    computed = crypt(password, setting.encode("ascii"))
    if computed is None:
        raise ValueError("libcrypt refused the setting")
    return computed.decode("ascii")


AUTH_FAILED_TEXT = b"Invalid login or password"


class Verdict(TextEnum):
    """What became of a login attempt."""
    OK = "ok"            # log in as ``login`` at ``upstream``
    WAIT = "wait"        # auth_http's Auth-Status: WAIT: ask again after ``wait`` seconds
    FAIL = "fail"        # refused: ``text`` for the client, ``reason`` for the log
    ERROR = "error"      # no verdict could be had (the auth server failed): ``reason``


class AuthOutcome(NamedTuple):
    """What a login attempt came to, whoever decided: the built-in table
    (authenticate, authenticate_external, authorize_recipient) or the auth
    server (interpret_auth_response).  Its repr shows no password."""
    kind: Verdict
    login: Optional[bytes] = b""           # OK: who to log in as (None: as the client said)
    password: Optional[bytes] = b""        # OK: for the backend login (None: none known)
    upstream: Optional[Upstream] = None    # OK: where
    token: Optional[Tuple[str, bytes]] = None   # OK: (xoauth2|oauthbearer, token) to pass on
    backend_tls: Optional[str] = None      # OK: this session's "plain", "ssl" or "starttls"
    smtp_auth: Optional[str] = None        # OK: this session's "none", "plain" or "login"
    wait: float = 0                        # WAIT, FAIL: seconds before asking again, replying
    text: bytes = b""                      # FAIL: what the client is told
    error_code: Optional[bytes] = None     # FAIL, SMTP: the reply code (Auth-Error-Code)
    sasl_error: Optional[bytes] = None     # FAIL, OAuth: the SASL error challenge
    close: bool = False                    # FAIL: close after the reply
    reason: str = ""                       # FAIL, ERROR: why, for the log only
    connection: Optional[object] = None    # OK, auth = backend: the BackendConnection,
                                           # logged in already (BackendAuth)
    reply: bytes = b""                     # OK, auth = backend: the backend's yes
    logged: bool = False                   # ERROR, auth = backend: the backend failed, and
                                           # that is logged; ``reason`` is the outcome, and
                                           # ``text`` its refusal (proxy_pass_error_message)

    @property
    def ok(self) -> bool:
        return self.kind == Verdict.OK

    def __repr__(self) -> str:
        return "AuthOutcome(%s, login=%r, upstream=%r, reason=%r)" % (
            self.kind.value, self.login, self.upstream, self.reason)


def authenticate(users: Dict[str, PasswordEntry], routes: Dict[str, Route],
                 proxy_pass: Upstream, credentials: Credentials,
                 matches: Callable[[PasswordEntry, bytes], bool] = password_matches,
                 protocol: str = "") -> AuthOutcome:
    """Check credentials against the built-in table and choose the backend
    (route_for, for a server of ``protocol``).

    plain: the password is checked against the entry's scheme, by
    ``matches`` (password_matches, or the same answer from elsewhere: see
    PasswordCheckPool).  cram-md5 and apop: the client sent a digest of the
    salt, which only a {PLAIN} entry can reproduce; the backend is then
    logged in to with that clear password.  A login that is not in the
    table is checked the same way against the table's dummy entry
    (UserTable.dummy), so that its failure takes as long as a known login's
    with a wrong password.
    """
    entry = table_entry(users, credentials.login)
    reason, backend_password = check_credentials(entry or _unknown_login_entry(users), credentials,
                                                 matches)
    if entry is None:
        return AuthOutcome(Verdict.FAIL, reason="unknown user")
    if reason:
        return AuthOutcome(Verdict.FAIL, reason=reason)
    return AuthOutcome(Verdict.OK, credentials.login, backend_password,
                       route_for(routes, proxy_pass, credentials.login.decode("utf-8"), protocol))


def table_entry(users: Dict[str, PasswordEntry], login: bytes) -> Optional[PasswordEntry]:
    """The entry of ``login``; None if it has none (or is not UTF-8)."""
    try:
        return users.get(login.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def _unknown_login_entry(users: Dict[str, PasswordEntry]) -> PasswordEntry:
    """The table's dummy entry; a plain dict (tests, embedding) gets one made now."""
    if isinstance(users, UserTable):
        return users.dummy
    return unknown_login_entry(list(users.values()))


def check_hashes(users: Dict[str, PasswordEntry], credentials: Credentials) -> bool:
    """Does authenticate() hash a password for ``credentials`` (PBKDF2,
    SHA-crypt: milliseconds of CPU), or only compare (a {PLAIN} entry) or
    refuse at once (cram-md5 or apop without a {PLAIN} entry)?  Decided on
    the entry that is checked, the dummy for an unknown login, so that an
    unknown login goes the same way as the users of the dummy's scheme."""
    if credentials.method != AuthMethod.PLAIN:
        return False
    entry = table_entry(users, credentials.login) or _unknown_login_entry(users)
    return entry.scheme != "PLAIN"


def check_credentials(entry: PasswordEntry, credentials: Credentials,
                      matches: Callable[[PasswordEntry, bytes], bool] = password_matches
                      ) -> Tuple[str, bytes]:
    """("", the password for the backend) if ``credentials`` match ``entry``
    (``matches`` compares a password with it: see authenticate); else (why
    not, for the log; b"")."""
    if credentials.method == AuthMethod.PLAIN:
        if not matches(entry, credentials.password):
            return "wrong password", b""
        return "", credentials.password
    if entry.scheme != "PLAIN":
        return "%s needs a {PLAIN} password in [users]" % credentials.method, b""
    clear = entry.data.encode("utf-8")
    if credentials.method == AuthMethod.CRAM_MD5:
        expected = cram_md5_digest(clear, credentials.salt)
    else:
        expected = apop_digest(credentials.salt, clear)
    if not hmac.compare_digest(expected, credentials.password):
        return "wrong password", b""
    return "", clear


def route_for(routes: Dict[str, Route], proxy_pass: Upstream, login: str,
              protocol: str = "") -> Upstream:
    """[routes]: the login itself, then ``@domain``, then the server's
    proxy_pass; an entry counts if it has an address for ``protocol``."""
    keys = [login] + (["@" + login.rpartition("@")[2]] if "@" in login else [])
    targets = [routes[key].target(protocol) for key in keys if key in routes]
    target = next((target for target in targets if target is not None), None)
    if target is None:
        return proxy_pass
    if target[1].pool:
        return target[1]               # an [upstream NAME]: its servers have their ports
    port = target[0] or proxy_pass.port
    addresses = tuple((family, (sockaddr[0], port) + tuple(sockaddr[2:]))
                      for family, sockaddr in target[1].addresses)
    return Upstream(target[1].host, port, addresses)


def authenticate_external(users: Dict[str, PasswordEntry], routes: Dict[str, Route],
                          proxy_pass: Upstream, login: bytes,
                          certificate: Optional["CertificateFacts"],
                          protocol: str = "") -> AuthOutcome:
    """AUTH EXTERNAL with the built-in table (extension; nginx asks its auth
    server): the client must have sent a verified certificate, and the login
    must be its subject's CN or emailAddress, or an email in its
    subjectAltName (an empty login means the first of those), up to the case
    of ASCII letters (certificate_names_login).  The user must be in [users]
    (exactly); a {PLAIN} entry gives the password for the backend login,
    which IMAP and POP3 need."""
    if certificate is None or certificate.verify != "SUCCESS":
        return AuthOutcome(Verdict.FAIL, reason="EXTERNAL without a verified client certificate")
    if not login and certificate.identities:
        login = certificate.identities[0].encode("utf-8")
    if not any(certificate_names_login(identity, login) for identity in certificate.identities):
        return AuthOutcome(Verdict.FAIL, reason="EXTERNAL login does not match the client certificate")
    name = login.decode("utf-8")               # it is an identity's, so UTF-8
    entry = users.get(name)
    if entry is None:
        return AuthOutcome(Verdict.FAIL, reason="unknown user")
    password = entry.data.encode("utf-8") if entry.scheme == "PLAIN" else None
    return AuthOutcome(Verdict.OK, login, password, route_for(routes, proxy_pass, name, protocol))


def certificate_names_login(identity: str, login: bytes) -> bool:
    """Is ``login`` the certificate's ``identity``?  Byte for byte, but for
    the case of the ASCII letters A-Z (bytes.lower() changes nothing else).
    Domains are ASCII and case-blind (RFC 4343), and CAs and clients differ
    in the case of CNs and addresses, so ASCII case is forgiven; Unicode
    case mapping is not: str.lower() makes U+212A KELVIN SIGN a "k" and
    U+212B ANGSTROM SIGN a U+00E5, so a certificate issued for one name
    would log in as the user of a look-alike (KELVIN SIGN + "arl" as "karl")."""
    return identity.encode("utf-8").lower() == login.lower()


SMTP_RELAY_DENIED = (b"550 5.7.1", b"Relaying denied")   # smtp_auth none, refused

# The SASL error challenge for a refused token when the auth server sends no
# Auth-Error-SASL: RFC 7628 §3.2.2's form, and Google's for XOAUTH2.
OAUTH_DEFAULT_ERRORS = {AuthMethod.OAUTHBEARER: b'{"status":"invalid_token"}',
                        AuthMethod.XOAUTH2: b'{"status":"401","schemes":"bearer"}'}


def recipient_domain(rcpt_to: bytes) -> Optional[Tuple[str, str]]:
    """``RCPT TO:<bob@Example.COM> NOTIFY=NEVER`` -> ("bob@Example.COM",
    "example.com"), or None.  The address is the forward-path right after
    "TO:" (RFC 5321 §4.1.1.3), never something in a parameter such as
    ORCPT=rfc822;<...>, which the backend would not deliver to."""
    path = rcpt_to.partition(b":")[2].lstrip(b" ")
    match = re.match(rb"<([^<>\s]*)>(?: |$)", path)
    if match is None or not rcpt_to[:8].upper() == b"RCPT TO:":
        return None
    address = match.group(1).decode("utf-8", "replace")
    if address.count("@") < 1:
        return None
    return address, address.rpartition("@")[2].lower()


def authorize_recipient(relay_domains: List[str], routes: Dict[str, Route],
                        proxy_pass: Upstream, rcpt_to: bytes) -> AuthOutcome:
    """smtp_auth none with the built-in table (extension): a recipient is
    accepted when its domain is in smtp_relay_domains (``*``: any domain);
    it goes to the [routes] entry of the address or its domain, else to
    proxy_pass.  Nobody is logged in: the backend sees XCLIENT without LOGIN."""
    parsed = recipient_domain(rcpt_to)
    if parsed is None:
        return AuthOutcome(Verdict.FAIL, reason="malformed recipient")
    address, domain = parsed
    allowed = [name.lower() for name in relay_domains]
    if "*" not in allowed and domain not in allowed:
        return AuthOutcome(Verdict.FAIL, reason="recipient domain not in smtp_relay_domains")
    return AuthOutcome(Verdict.OK, b"", b"", route_for(routes, proxy_pass, address, "smtp"))


# -- auth_http, byte-compatible with nginx's ngx_mail_auth_http_module ---------

AUTH_HTTP_RESPONSE_MAX = 1024      # nginx reads the response into 1024 bytes
# A response header line without its LF: a name of letters, digits and "-",
# a colon, the value; a CR only at the end (the line ended in CRLF).
AUTH_HTTP_HEADER_LINE = re.compile(rb"([A-Za-z0-9-]+):([^\r]*)\r?")
DIGITS = re.compile(rb"\d{1,9}")


AUTH_HTTP_ESCAPED = re.compile(rb"[\x00-\x20%]")      # NGX_ESCAPE_MAIL_AUTH's table
AUTH_HTTP_LINE_BREAKERS = re.compile(rb"[\r\n\0]")


def percent_hex(match: "re.Match") -> bytes:
    """The matched byte as %XX, upper-case hex (as nginx's ngx_escape_uri)."""
    return b"%%%02X" % match.group()[0]


def auth_http_escape(data: bytes) -> bytes:
    """NGX_ESCAPE_MAIL_AUTH: control bytes, space and "%" as %XX (upper-case
    hex); everything else, 8-bit bytes and DEL included, unchanged."""
    return AUTH_HTTP_ESCAPED.sub(percent_hex, data)


def auth_http_unbroken(data: bytes) -> bytes:
    """``data`` with CR, LF and NUL as %0D, %0A, %00, everything else as it
    is: a value nginx sends unescaped, made unable to end its line."""
    return AUTH_HTTP_LINE_BREAKERS.sub(percent_hex, data)


def auth_http_header(name: str, value, escape: bool = False) -> bytes:
    """One line of the auth_http request, ``Name: value`` without its CRLF:
    the one way a value gets into the request.  ``value`` is bytes, or text
    sent as UTF-8.  escape=True: nginx's %XX escaping (NGX_ESCAPE_MAIL_AUTH),
    which nginx applies to Auth-User, Auth-Pass and Auth-SSL-Cert.  Otherwise
    the bytes go as nginx sends them, unescaped, except CR, LF and NUL, which
    nginx never has there (ngx_mail_auth_http_create_request: "HELO, MAIL
    FROM, and RCPT TO can't contain CRLF") and which would end the line: they
    go as %0D, %0A and %00, so that no value, whatever a caller passes, can
    add a header or end the request.  Raises ValueError for a name that is
    not a header name (names are constants and checked directives)."""
    if not AUTH_HTTP_HEADER_NAME_TEXT.fullmatch(name):
        raise ValueError("not an auth_http header name: %r" % name)
    data = value if isinstance(value, bytes) else value.encode("utf-8")
    return name.encode("ascii") + b": " + (auth_http_escape(data) if escape else auth_http_unbroken(data))


class AuthRequest(NamedTuple):
    """What nginx tells its auth server about one login attempt."""
    method: str                    # plain, apop, cram-md5, external, none, xoauth2, oauthbearer
    login: bytes
    password: bytes                # password, digest or token
    protocol: str
    attempt: int                   # Auth-Login-Attempt: this session's logins so far
    client_ip: str                 # after realip
    salt: Optional[bytes] = None   # apop and cram-md5
    client_host: Optional[str] = None            # SMTP only
    proxy_protocol: Optional[Tuple] = None       # (addr, port, server addr, server port)
    smtp: Optional[Tuple] = None                 # (helo, mail from, rcpt to): method none
    tls: Optional[Tuple] = None                  # (protocol, cipher) when on TLS
    certificate: Optional["CertificateFacts"] = None    # ssl_verify_client on/optional
    certificate_pem: Optional[bytes] = None      # auth_http_pass_client_cert on

    def __repr__(self) -> str:
        return "AuthRequest(%r, login=%r, password=<hidden>)" % (self.method, self.login)


def build_auth_http_request(url: AuthHttpUrl, headers: List[Tuple[str, str]],
                            request: AuthRequest) -> bytes:
    """The HTTP/1.0 request of ngx_mail_auth_http_create_request, header for
    header in nginx's order; every header line is made by auth_http_header."""
    line = auth_http_header
    lines = [line("Host", url.host_header), line("Auth-Method", request.method),
             line("Auth-User", request.login, escape=True),
             line("Auth-Pass", request.password, escape=True)]
    if request.salt:
        lines.append(line("Auth-Salt", request.salt))
    lines += [line("Auth-Protocol", request.protocol),
              line("Auth-Login-Attempt", str(request.attempt)),
              line("Client-IP", request.client_ip)]
    if request.client_host is not None:
        lines.append(line("Client-Host", request.client_host))
    if request.proxy_protocol is not None:
        addr, port, server_addr, server_port = request.proxy_protocol
        lines += [line("Proxy-Protocol-Addr", addr), line("Proxy-Protocol-Port", str(port)),
                  line("Proxy-Protocol-Server-Addr", server_addr),
                  line("Proxy-Protocol-Server-Port", str(server_port))]
    if request.method == AuthMethod.NONE:
        helo, mail_from, rcpt_to = request.smtp
        lines += [line("Auth-SMTP-Helo", helo or b""), line("Auth-SMTP-From", mail_from),
                  line("Auth-SMTP-To", rcpt_to)]
    lines += auth_http_tls_lines(request)
    lines += [line(name, value) for name, value in headers]
    request_line = b"GET " + auth_http_unbroken(url.uri.encode("utf-8")) + b" HTTP/1.0"
    return b"\r\n".join([request_line] + lines) + b"\r\n\r\n"


def auth_http_tls_lines(request: AuthRequest) -> List[bytes]:
    """Auth-SSL-*: on TLS, the protocol and cipher; with ssl_verify_client,
    what the certificate says (CertificateFacts: an unreadable certificate
    reads as none, so its lines are nginx's for no certificate)."""
    if request.tls is None:
        return []
    lines = [auth_http_header("Auth-SSL", "on")]
    for name, value in (("Auth-SSL-Protocol", request.tls[0]), ("Auth-SSL-Cipher", request.tls[1])):
        if value:                      # nginx: "if (protocol.len)", "if (cipher.len)"
            lines.append(auth_http_header(name, value))
    facts = request.certificate
    if facts is not None:
        lines.append(auth_http_header("Auth-SSL-Verify", facts.verify))
        for name, value in (("Subject", facts.subject), ("Issuer", facts.issuer),
                            ("Serial", facts.serial), ("Fingerprint", facts.fingerprint)):
            if value:
                lines.append(auth_http_header("Auth-SSL-" + name, value))
        if request.certificate_pem:
            lines.append(auth_http_header("Auth-SSL-Cert", request.certificate_pem, escape=True))
    return lines


class AuthHttpError(Exception):
    """The auth server's answer cannot be used; the message is nginx's."""


class AuthHttpResponse(NamedTuple):
    headers: Dict[str, bytes]      # lower-cased names (a repeated one: the last)
    raw: bytes


class AuthHttpParser:
    """Reads the auth server's response (sans-I/O): receive_data() returns
    an AuthHttpResponse at the blank line, None while more is needed, and
    raises AuthHttpError for a response over 1024 bytes, a bad header line,
    or one that ends (b"") too early.  As nginx: the status line, if any, is
    skipped and its code ignored; names are letters, digits and "-"; values
    are trimmed; lines end in CRLF or LF; the body is never read."""

    def __init__(self):
        self._data = bytearray()
        self._searched = 0             # no blank line ends before here

    def receive_data(self, data: bytes) -> Optional[AuthHttpResponse]:
        if not data:
            raise AuthHttpError("auth http server %s closed the connection prematurely")
        self._data += data
        start = max(0, self._searched - 3)     # a blank line may straddle two reads
        end = self._data.find(b"\n\n", start)
        crlf = self._data.find(b"\r\n\r\n", start)
        ends = [(index, size) for index, size in ((end, 2), (crlf, 4)) if index >= 0]
        if not ends:
            if len(self._data) > AUTH_HTTP_RESPONSE_MAX:
                raise AuthHttpError("auth http server %s sent too long response")
            self._searched = len(self._data)
            return None
        text = bytes(self._data)
        index, size = min(ends)
        if index + size > AUTH_HTTP_RESPONSE_MAX:
            raise AuthHttpError("auth http server %s sent too long response")
        lines = text[:index].split(b"\n")
        if lines and lines[0].startswith(b"HTTP/"):
            lines = lines[1:]
        headers = {}
        for line in lines:
            header = AUTH_HTTP_HEADER_LINE.fullmatch(line)
            if header is None:
                raise AuthHttpError("auth http server %s sent invalid header in response")
            headers[header.group(1).lower().decode()] = header.group(2).strip(b" ")
        return AuthHttpResponse(headers, text[:index + size])


def ip_family(text: bytes) -> Optional[int]:
    """AF_INET or AF_INET6 if ``text`` is an IP address literal (nginx's
    ngx_parse_addr: no names), else None.  inet_pton is C, and this runs
    for every login."""
    try:
        address = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address)
            return family
        except (OSError, ValueError):
            continue
    return None


def interpret_auth_response(response: AuthHttpResponse, protocol: str,
                            have_password: bool, proxy_smtp_auth: bool = False,
                            upstreams: Optional[Dict[str, UpstreamSpec]] = None) -> AuthOutcome:
    """ngx_mail_auth_http_process_headers: Auth-Status OK / WAIT / a failure
    text; then Auth-Server (an IP address, never a name) and Auth-Port.
    ``have_password``: the client gave one the backend can take;
    ``proxy_smtp_auth``: the server's setting (SMTP logs in to the backend).
    ``upstreams`` (extension): an Auth-Server that names one of these
    pools goes through it (Auth-Port may be left out then), and so does an
    Auth-Server and Auth-Port of one of a pool's servers, that server
    first (pool_of_address).
    Raises AuthHttpError with nginx's log message for a bad answer."""
    headers = response.headers
    status = headers.get("auth-status")
    wait = headers.get("auth-wait", b"")
    seconds = int(wait) if DIGITS.fullmatch(wait) else 0
    if status == b"WAIT":
        return AuthOutcome(Verdict.WAIT, wait=seconds)
    if status is not None and status != b"OK":
        # Without Auth-Status at all, nginx goes on to Auth-Server/Auth-Port.
        return AuthOutcome(Verdict.FAIL, wait=seconds, text=status or b"",
                           error_code=headers.get("auth-error-code"),
                           sasl_error=headers.get("auth-error-sasl"))
    server, port = headers.get("auth-server"), headers.get("auth-port")
    pool = server.decode("latin-1") if server and upstreams else ""
    if pool not in (upstreams or {}):
        pool = ""
    if not server or not (port or pool):
        raise AuthHttpError("auth http server %s did not send server or port")
    smtp_auth = headers.get("auth-smtp-auth", b"").decode("latin-1").lower() or None
    if not have_password and "auth-pass" not in headers:
        # APOP, CRAM-MD5 and EXTERNAL leave nginx without a password to log in with.
        if protocol != "smtp":
            raise AuthHttpError("auth http server %s did not send password")
        if smtp_auth in ("plain", "login") or (smtp_auth is None and proxy_smtp_auth):
            # ngx_mail_proxy_smtp_handler, before AUTH PLAIN: "no password
            # available", 451 (nginx-tests mail_proxy_smtp_auth.t, "auth
            # external no password").  Known now, before any backend byte.
            raise AuthHttpError("no password available: auth http server %s sent no Auth-Pass "
                                "for the backend AUTH")
    upstream = pool_upstream(pool) if pool else auth_server_upstream(server, port, upstreams)
    backend_tls = headers.get("auth-backend-tls", b"").decode("latin-1").lower() or None
    if backend_tls not in (None, "plain", "ssl", "starttls"):
        raise AuthHttpError('auth http server %%s sent invalid Auth-Backend-TLS:"%s"' % backend_tls)
    if smtp_auth not in (None, "none", "plain", "login"):
        raise AuthHttpError('auth http server %%s sent invalid Auth-SMTP-Auth:"%s"' % smtp_auth)
    return AuthOutcome(Verdict.OK, upstream=upstream, login=headers.get("auth-user"),
                       password=headers.get("auth-pass"), backend_tls=backend_tls,
                       smtp_auth=smtp_auth)


def auth_server_upstream(server: bytes, port: bytes,
                         upstreams: Optional[Dict[str, UpstreamSpec]]) -> Upstream:
    """Auth-Server and Auth-Port as an Upstream, checked as nginx checks
    them; through the pool it belongs to, if any (pool_of_address)."""
    family = ip_family(server)
    if family is None:
        raise AuthHttpError('auth http server %%s sent invalid server address:"%s"'
                            % log_escape(server))
    if not DIGITS.fullmatch(port) or not 0 < int(port) < 65536:
        raise AuthHttpError('auth http server %%s sent invalid server port:"%s"' % log_escape(port))
    host = server.decode("ascii")
    return Upstream(host, int(port), ((family, (host, int(port))),),
                    pool_of_address(upstreams or {}, host, int(port)))


def pool_of_address(upstreams: Dict[str, UpstreamSpec], host: str, port: int) -> str:
    """The name of the first pool (in file order) with a server at
    ``host`` (an IP address) and ``port``; "" if none has one."""
    for spec in upstreams.values():
        if any(server_at(server, host, port) for server in spec.servers):
            return spec.name
    return ""


def server_at(server: UpstreamServer, host: str, port: int) -> bool:
    """Is ``server`` at ``host`` (an IP address, in any spelling) and ``port``?"""
    wanted = (ipaddress.ip_address(host), port)
    return any((ipaddress.ip_address(sockaddr[0].partition("%")[0]), sockaddr[1]) == wanted
               for _, sockaddr in server.address.addresses)


# -- the failed-login defence ---------------------------------------------------
# Password guessing is a proxy's normal weather.  The defence slows guessers
# without locking out the users who share their address (an office NAT, a
# mobile carrier) or the owner of an attacked mailbox, after Dovecot's
# auth_penalty: the policy is here, sans-I/O, its state made only of the
# events it is given, so that every worker, told the same events, keeps the
# same state (SharedBooks); the session's side waits and replies.

def login_key(login: bytes) -> str:
    """A login as the defence and the session counts keep it: latin-1 text
    (every byte one character), a digest beyond 256 bytes so that an event
    stays small (SHARED_EVENT_MAX)."""
    if len(login) > 256:
        return "sha256:" + hashlib.sha256(login).hexdigest()
    return login.decode("latin-1")


def penalty_address(address: str) -> str:
    """What a client address is counted as: IPv6 per /64, one customer's
    network (RFC 6177), as Dovecot's auth_penalty; IPv4 as it is."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address                       # a UNIX-domain peer, "unix:"
    if parsed.version == 6 and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    if parsed.version == 6:
        return str(ipaddress.ip_network((parsed, 64), strict=False))
    return str(parsed)


def penalty_delay(failures: int, base_delay: float) -> float:
    """How long the reply to the ``failures``-th recent failure waits:
    ``auth_delay`` doubled for each earlier one, at most AUTH_PENALTY_MAX."""
    return min(base_delay * 2 ** (max(failures, 1) - 1), AUTH_PENALTY_MAX)


class Admission(NamedTuple):
    """LoginDefence.admit's answer for one attempt."""
    wait: float = 0.0          # > 0: ask again then (the slots are taken)
    refuse: bool = False       # this account from this address: too many failures
    failures: int = 0          # the count behind a refusal, for the log


class FailureCount:
    """Recent failures of an address, an account, or an account from an
    address: how many, the last one's time, when their delays end, and (a
    pair's) the digests of the wrong passwords already counted."""
    __slots__ = ("failures", "last", "busy_until", "digests")

    def __init__(self, when: float):
        self.failures = 0
        self.last = when
        self.busy_until = []       # (end time, pid) of the delays still running
        self.digests = []


class LoginDefence:
    """The failed-login defence (sans-I/O: pass the time in).

    - A failed login's reply waits ``auth_delay``, doubled for each recent
      failure of the address or of the account (the higher count), at most
      AUTH_PENALTY_MAX: 1, 2, 4, 8, 15 s.  A right password's never waits.
    - Each such delay holds a slot of the address and of the account until
      it ends, and so does each login under way (``begin``/``end``):
      with AUTH_PENALTY_SLOTS taken, the next attempt waits for one (admit).
      Of those, a worker takes at most its ``share`` (AUTH_PENALTY_SLOTS
      over worker_processes): workers that see slots free at the same
      instant cannot let more than AUTH_PENALTY_SLOTS through together
      before hearing of each other.
      A guesser gets no further with more connections or by hanging up; a
      user behind its address, or the attacked mailbox's owner, waits a
      turn, and is never refused for the guesser's failures.
    - The same wrong password again (a phone with a stale one) counts once.
    - One account from one address, and nothing wider, is refused outright
      after AUTH_PAIR_LIMIT different wrong passwords, until the window ends.
    - All is forgotten AUTH_PENALTY_WINDOW after the last failure, and at
      most AUTH_PENALTY_TABLE entries of each kind are kept.

    Addresses come through penalty_address(), logins through login_key().
    A book of SharedBooks: the events (failure(), success(), clear()) are
    published to every process and come back through apply(); ``secret``
    keys the password digests and is the same in all of them (made before
    the master forks).  Passwords are never kept."""
    kinds = ("login failed", "login ok", "penalty clear", "login begin", "login end",
             "worker gone")

    def __init__(self, secret: bytes):
        self.secret = secret
        self.addresses = {}        # address -> FailureCount, oldest first
        self.accounts = {}         # login -> FailureCount
        self.pairs = {}            # (address, login) -> FailureCount
        self.checking = {}         # ("address" | "login", key) -> logins under way, all processes
        self.checking_in = {}      # pid -> {(address, login): how many}: what "worker gone" ends
        self.checking_by = {}      # (pid, "address"|"login", key) -> how many (the same, summed)
        self.publish = self.apply  # SharedBooks.add: apply here, then in the other processes
        self.share = AUTH_PENALTY_SLOTS    # this process's slots (Worker: per worker_processes)

    # -- questions ---------------------------------------------------------------
    def admit(self, address: str, login: str, now: float, pid: int = 0) -> Admission:
        """May an attempt go on to the password check now, in process ``pid``?"""
        pair = self._recent(self.pairs, (address, login), now)
        if pair is not None and pair.failures >= AUTH_PAIR_LIMIT:
            return Admission(refuse=True, failures=pair.failures)
        wait = max(self._slot_wait(self.addresses, "address", address, now, pid),
                   self._slot_wait(self.accounts, "login", login, now, pid))
        return Admission(wait=wait)

    def _slot_wait(self, table: dict, kind: str, key: str, now: float, pid: int) -> float:
        """0 if a slot of ``key`` is free, for everyone and within ``pid``'s
        share; else how long until the first delay that holds one ends (or
        AUTH_SLOT_RECHECK, when only logins under way hold them)."""
        record = self._recent(table, key, now)
        running = [(end, owner) for end, owner in record.busy_until if end > now] \
            if record is not None else []
        mine = [end for end, owner in running if owner == pid]
        checking_here = self.checking_by.get((pid, kind, key), 0)
        if len(mine) + checking_here >= self.share:
            ends = mine
        elif len(running) + self.checking.get((kind, key), 0) >= AUTH_PENALTY_SLOTS:
            ends = [end for end, _ in running]
        else:
            return 0.0
        return min(ends) - now if ends else AUTH_SLOT_RECHECK

    def recent_failures(self, address: str, login: str, now: float) -> int:
        """The count a failure's delay is made from: the address's or the account's."""
        counts = [record.failures for record in (self._recent(self.addresses, address, now),
                                                 self._recent(self.accounts, login, now))
                  if record is not None]
        return max(counts, default=0)

    # -- attempts under way: each holds a slot in every process ---------------------
    @staticmethod
    def begin(address: str, login: str, pid: int) -> tuple:
        """Process ``pid`` lets an attempt through to its password check."""
        return ("login begin", pid, address, login)

    @staticmethod
    def end(address: str, login: str, pid: int) -> tuple:
        """That attempt has its answer (its failure, if any, came first)."""
        return ("login end", pid, address, login)

    def _under_way(self, pid: int, address: str, login: str, change: int) -> None:
        mine = self.checking_in.setdefault(pid, {})
        mine[(address, login)] = mine.get((address, login), 0) + change
        if mine[(address, login)] <= 0:
            del mine[(address, login)]
        if not mine:
            del self.checking_in[pid]
        for key in (("address", address), ("login", login)):
            for table, entry in ((self.checking, key), (self.checking_by, (pid,) + key)):
                left = table.get(entry, 0) + change
                if left > 0:
                    table[entry] = left
                else:
                    table.pop(entry, None)

    def _worker_gone(self, pid: int) -> None:
        """A dead worker's checks hold no slot any more."""
        for (address, login), count in list(self.checking_in.get(pid, {}).items()):
            self._under_way(pid, address, login, -count)

    # -- the events ----------------------------------------------------------------
    def failure(self, address: str, login: str, password: bytes, now: float,
                base_delay: float, pid: int = 0) -> Tuple[tuple, float, int]:
        """A wrong password (or an unknown login) in process ``pid``: (the
        event to publish, the reply's delay, the failure count it makes)."""
        digest = hmac.new(self.secret, login.encode("latin-1") + b"\0" + password,
                          hashlib.sha256).hexdigest()[:16]
        pair = self._recent(self.pairs, (address, login), now)
        repeated = pair is not None and digest in pair.digests
        count = self.recent_failures(address, login, now) + (0 if repeated else 1)
        delay = penalty_delay(count, base_delay)
        return ("login failed", address, login, digest, now, delay, pid), delay, count

    def success(self, address: str, login: str, now: float) -> Optional[tuple]:
        """A right password: that account's failures from that address go
        (None: there are none, nothing to tell the other workers)."""
        if (address, login) not in self.pairs:
            return None
        return ("login ok", address, login, now)

    @staticmethod
    def clear(address: Optional[str] = None, login: Optional[str] = None) -> tuple:
        """An operator forgives an address or an account (and its pairs)."""
        return ("penalty clear", address, login)

    def apply(self, event: tuple) -> None:
        if event[0] == "login failed":
            self._failed(*event[1:])
        elif event[0] == "login ok":
            self.pairs.pop((event[1], event[2]), None)
        elif event[0] == "penalty clear":
            self._clear(event[1], event[2])
        elif event[0] == "login begin":
            self._under_way(event[1], event[2], event[3], +1)
        elif event[0] == "login end":
            self._under_way(event[1], event[2], event[3], -1)
        elif event[0] == "worker gone":
            self._worker_gone(event[1])

    def _failed(self, address: str, login: str, digest: str, when: float, delay: float,
                pid: int) -> None:
        pair = self._touch(self.pairs, (address, login), when)
        counted = digest not in pair.digests
        if counted:
            pair.failures += 1
            pair.digests = (pair.digests + [digest])[-AUTH_PAIR_PASSWORDS:]
        for record in (self._touch(self.addresses, address, when),
                       self._touch(self.accounts, login, when)):
            if counted:
                record.failures += 1
            running = [held for held in record.busy_until if held[0] > when]
            record.busy_until = sorted(running + [(when + delay, pid)])[-2 * AUTH_PENALTY_SLOTS:]

    def _clear(self, address: Optional[str], login: Optional[str]) -> None:
        self.addresses.pop(address, None)
        self.accounts.pop(login, None)
        for key in [key for key in self.pairs if key[0] == address or key[1] == login]:
            del self.pairs[key]

    # -- the tables ------------------------------------------------------------------
    @staticmethod
    def _recent(table: dict, key, now: float) -> Optional[FailureCount]:
        """The record of ``key`` if its last failure is recent enough."""
        record = table.get(key)
        if record is not None and now - record.last > AUTH_PENALTY_WINDOW:
            del table[key]
            return None
        return record

    def _touch(self, table: dict, key, when: float) -> FailureCount:
        """The record of ``key``, made newest (a new one if none is recent)."""
        record = self._recent(table, key, when)
        if record is None:
            record = FailureCount(when)
        else:
            del table[key]
        table[key] = record
        record.last = max(record.last, when)
        while len(table) > AUTH_PENALTY_TABLE:
            del table[next(iter(table))]
        return record


# -- the authenticators' common ground -------------------------------------------
# A session hands each login attempt to its authenticator, the user table
# below, the auth server (AuthHttpAuth, with the outbound clients) or the
# backend itself (BackendAuth, auth = backend, beside it):
# start(attempt, done) and, later or at once, done(AuthOutcome); cancel()
# when the session ends first.

class LoginAttempt(NamedTuple):
    """One login attempt, with what the session knows that may decide it
    or shape the backend's login (login_script)."""
    credentials: Credentials
    number: int                    # this session's attempts so far (Auth-Login-Attempt)
    protocol: str                  # "imap", "pop3", "smtp"
    client_address: str            # after realip
    client_port: int
    client_name: str               # SMTP: the resolver's verdict (Client-Host)
    proxy_facts: Optional[Tuple] = None      # the PROXY header's (addr, port, server addr, port)
    tls: Optional["TlsFacts"] = None         # TLS with the client, if any
    certificate: Optional["CertificateFacts"] = None    # ssl_verify_client: what it showed
    tag: bytes = b""               # IMAP: the tag of the login command
    helo: Optional[bytes] = None   # SMTP: the client's HELO or EHLO argument
    esmtp: bool = False            # SMTP: it said EHLO
    mail_from: Optional[bytes] = None        # SMTP, smtp_auth none: MAIL as sent
    rcpt_to: Optional[bytes] = None          # SMTP, smtp_auth none: the first RCPT as sent


def login_attempt(credentials: Credentials, number: int, machine: "ClientMachine",
                  client: Tuple[str, int], client_name: str, proxy_facts: Optional[Tuple],
                  tls: Optional["TlsFacts"], certificate: Optional["CertificateFacts"]) -> LoginAttempt:
    """The LoginAttempt of ``credentials``, with what ``machine`` knows."""
    return LoginAttempt(credentials, number, machine.protocol, client[0], client[1], client_name,
                        proxy_facts, tls, certificate, getattr(machine, "tag", b""),
                        getattr(machine, "helo", None), getattr(machine, "esmtp", False),
                        getattr(machine, "mail_from", None), getattr(machine, "rcpt_to", None))


def same_backend(route: Upstream, session: Upstream) -> bool:
    """Does a recipient's ``route`` lead where the ``session`` went: the same
    pool (a pool's server, for the session), or the same address?"""
    if route.pool or session.pool:
        return route.pool == session.pool
    return (route.host, route.port) == (session.host, session.port)


class UserTableAuth:
    """The built-in [users] table (an extension: nginx needs an auth
    server).  A password to hash (check_hashes) is checked off the event
    loop, by ``checks`` (the worker's PasswordCheckPool), and done() comes
    later, from the loop; anything else (a {PLAIN} entry, EXTERNAL,
    smtp_auth none) is decided at once: done() is called before start()
    returns.  A refusal comes with nginx's text, whatever the reason (the
    reason is for the log); its delay is the LoginGuard's, which stands in
    front.  cancel() drops a check under way: done() is not called.
    ``owner.crashed(error)`` hears of a bug in a check."""
    __slots__ = ("config", "server", "checks", "owner", "attempt", "done", "check")

    def __init__(self, config: "Config", server: Settings, checks, owner):
        self.config = config
        self.server = server
        self.checks = checks           # PasswordCheckPool: submit(work, done) -> .cancel()
        self.owner = owner
        self.attempt = None            # type: Optional[LoginAttempt]
        self.done = None               # type: Optional[Callable]
        self.check = None              # the check under way, if any

    def start(self, attempt: LoginAttempt, done: Callable[[AuthOutcome], None]) -> None:
        self.attempt, self.done = attempt, done
        credentials = attempt.credentials
        if credentials.method == AuthMethod.NONE:
            return self._finish(self._recipient(attempt.rcpt_to))
        if credentials.method == AuthMethod.EXTERNAL:
            return self._checked(self._external(attempt))
        work = functools.partial(authenticate, self.config.users, self.config.routes,
                                 self.server.proxy_pass, credentials,
                                 protocol=self.server.protocol)
        if check_hashes(self.config.users, credentials):
            self.check = self.checks.submit(work, self._checked)
        else:
            self._checked(work(password_matches))

    def cancel(self) -> None:
        self.done, self.attempt = None, None      # the password goes too
        if self.check is not None:
            self.check.cancel()
            self.check = None

    def crashed(self, error: Exception) -> None:
        self.owner.crashed(error)

    def _checked(self, outcome: AuthOutcome) -> None:
        """The password check's verdict (now, or later from the loop)."""
        self.check = None
        attempt = self.attempt
        if outcome.ok and attempt.protocol == "pop3" and \
                not pop3_can_send(outcome.login, outcome.password):
            outcome = AuthOutcome(Verdict.FAIL, reason="login or password holds CR, LF or NUL")
        if not outcome.ok:
            outcome = outcome._replace(text=AUTH_FAILED_TEXT)
        self._finish(outcome)

    def _finish(self, outcome: AuthOutcome) -> None:
        done, self.done, self.attempt = self.done, None, None     # the password goes too
        if done is not None:
            done(outcome)

    def _external(self, attempt: LoginAttempt) -> AuthOutcome:
        server = self.server
        outcome = authenticate_external(self.config.users, self.config.routes, server.proxy_pass,
                                        attempt.credentials.login, attempt.certificate,
                                        server.protocol)
        if outcome.ok and outcome.password is None:
            # IMAP and POP3 log in to the backend with a password; so does
            # SMTP with proxy_smtp_auth.
            if attempt.protocol != "smtp" or server.proxy_smtp_auth:
                return AuthOutcome(Verdict.FAIL, reason="EXTERNAL needs a {PLAIN} password in "
                                   "[users] for the backend login")
            outcome = outcome._replace(password=b"")
        return outcome

    def _recipient(self, rcpt_to: bytes) -> AuthOutcome:
        """smtp_auth none: the first RCPT decides, with no delay."""
        outcome = authorize_recipient(self.server.smtp_relay_domains, self.config.routes,
                                      self.server.proxy_pass, rcpt_to)
        if outcome.ok:
            return outcome
        code, text = SMTP_RELAY_DENIED
        return outcome._replace(text=text, error_code=code)

    def recipient_check(self, attempt: LoginAttempt, upstream: Upstream,
                        log: Callable) -> Optional[Callable[[bytes], Optional[bytes]]]:
        """After an smtp_auth none login: the check of every later RCPT
        (SmtpRecipientGuard), which refuses as the first was refused and
        logs why; None after any other login."""
        if attempt.credentials.method != AuthMethod.NONE:
            return None

        def check(rcpt: bytes) -> Optional[bytes]:
            refusal, reason = self.recipient_refusal(rcpt, upstream)
            if refusal is not None:
                log("info", 'recipient refused: "%s"' % reason)
            return refusal
        return check

    def recipient_refusal(self, rcpt: bytes, upstream: Upstream) -> Tuple[Optional[bytes], str]:
        """A later RCPT of an smtp_auth none session (SmtpRecipientGuard):
        (None, "") to let it go on, or (the reply refusing it, why, for the
        log).  A recipient whose route leads to another backend than the
        session's gets 452, which tells the client to send it in another
        transaction (RFC 5321 §4.5.3.1.10)."""
        outcome = self._recipient(rcpt)
        if not outcome.ok:
            return outcome.error_code + b" " + outcome.text + b"\r\n", outcome.reason
        if not same_backend(outcome.upstream, upstream):
            return SMTP_TOO_MANY_RECIPIENTS, "its route is %s" % outcome.upstream.text
        return None, ""


# ========================================================================== #
# ####                          Backend pools                           #### #
# ========================================================================== #
# Which server of an [upstream NAME] pool a login goes to, and what the
# logins learn of the servers, after nginx's upstream module (which its mail
# module lacks): weights; max_fails failures within fail_timeout take a
# server out for fail_timeout ("passive health"); backup servers serve only
# when no other can; down ones never; drain ones (extension) take no new
# session.  Three ways to choose: smooth weighted round robin (nginx's),
# least connections (nginx's least_conn, counted per worker, as nginx counts
# without a zone), and user_hash, rendezvous hashing of the login (Thaler
# and Ravishankar's highest random weight, with weights), so that a mailbox
# lands on the same server while that server is up and removing one server
# moves only its own users.  Sans-I/O: the time is given, nothing is logged
# here (failed() returns the line to log).  Each worker has its own Pools;
# what the control interface sets (drain) goes to every worker through a
# shared book, UpstreamDrains.

class ServerState:
    """What one worker knows of one pool server while it runs."""
    __slots__ = ("server", "fails", "first_fail", "out_until", "current", "active", "check_down")

    def __init__(self, server: UpstreamServer):
        self.server = server
        self.fails = 0                 # failures since first_fail (or since the last success)
        self.first_fail = 0.0          # when the first of them came
        self.out_until = 0.0           # taken out until then (max_fails reached)
        self.current = 0               # smooth weighted round robin's current weight
        self.active = 0                # sessions of this worker on it (least_conn)
        self.check_down = False        # the active check's verdict (health_check), until it changes


# mailproxy_upstream_failures_total's kinds: what failed at a login (those
# count against max_fails; BackendConnection's outcome says which), then
# the active check's.
UPSTREAM_FAILURE_KINDS = ("connect", "tls", "timeout", "greeting", "health_check")
FAILURE_KIND_OF = {"upstream unreachable": "connect", "upstream TLS error": "tls",
                   "upstream timed out": "timeout"}     # else: before the greeting was through


class PoolLease:
    """A session's place on a server (least_conn counts them); release()
    gives it back, once, however often it is called.  ``labels``: (pool
    name, server) for the metrics."""
    __slots__ = ("state", "labels")

    def __init__(self, state: ServerState, pool: str = ""):
        self.state = state
        self.labels = (pool, state.server.text)
        state.active += 1

    def release(self) -> None:
        if self.state is not None:
            self.state.active -= 1
            self.state = None


def rendezvous_score(key: bytes, server: UpstreamServer) -> float:
    """Weighted rendezvous hashing: -weight / ln(u), u uniform in (0, 1)
    from SHA-256 of the key and the server's address as written (so every
    process, and every restart, scores alike).  The highest score wins;
    a server's share of the keys is its share of the weights."""
    digest = hashlib.sha256(key + b"\0" + server.text.encode("utf-8")).digest()
    u = (int.from_bytes(digest[:8], "big") + 1) / (2.0 ** 64 + 2)
    return -server.weight / math.log(u)


class Pool:
    """One [upstream NAME] pool in one worker: choose() a server for a
    login, failed() and succeeded() to say how it went.  ``drains``: the
    UpstreamDrains book (None: only the file's drain flags count);
    ``health``: the UpstreamHealth book, told when a server is taken out
    or comes back (None: nobody is); ``metrics``: the Metrics book its
    servers' failures are counted in (None: not counted)."""

    def __init__(self, spec: UpstreamSpec, drains: Optional["UpstreamDrains"] = None,
                 health: Optional["UpstreamHealth"] = None, metrics: Optional["Metrics"] = None):
        self.spec = spec
        self.name = spec.name
        self.states = [ServerState(server) for server in spec.servers]
        self.drains = drains
        self.health = health
        self.metrics = metrics

    def _count_failure(self, server: UpstreamServer, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.count("mailproxy_upstream_failures_total", (self.name, server.text, kind))

    def _tell(self, server: UpstreamServer, until: float) -> None:
        if self.health is not None:
            self.health.report(self.name, server.text, until)

    def draining(self, server: UpstreamServer) -> bool:
        """drain in the file, unless the control interface said otherwise."""
        if self.drains is not None:
            return self.drains.draining(self.name, server.text, server.drain)
        return server.drain

    def available(self, state: ServerState, now: float) -> bool:
        """Not down, not draining, not taken out by its failures or by the
        active check."""
        return not state.server.down and not self.draining(state.server) and \
            state.out_until <= now and not state.check_down

    def choose(self, key: bytes, now: float, tried=(),
               prefer: Optional[Tuple[str, int]] = None) -> Optional[UpstreamServer]:
        """The server for a login (``key``: its login, for user_hash), none of
        ``tried`` (this login's servers so far).  ``prefer`` (host, port):
        that server, if it is available (an auth server's choice).  The
        backup servers only when no other is available; when none at all
        is, the ones taken out by their failures are tried all the same
        (the soonest back first), as nginx tries a pool's only server: the
        client should see no error while any server is alive.  None: no
        server is left (all tried, down or draining)."""
        fresh = [state for state in self.states if state.server not in tried]
        usable = [state for state in fresh if self.available(state, now)]
        if prefer is not None:
            for state in usable:
                if server_at(state.server, *prefer):
                    return state.server
        tier = [state for state in usable if not state.server.backup] or usable
        if not tier:
            resting = [state for state in fresh if not state.server.down and
                       not self.draining(state.server)]
            if not resting:
                return None
            return min(resting, key=lambda state: (state.server.backup, state.check_down,
                                                   state.out_until)).server
        if self.spec.balance == "user_hash":
            return max(tier, key=lambda state: rendezvous_score(key, state.server)).server
        if self.spec.balance == "least_conn":
            # nginx: the fewest sessions per weight; among equals, round robin.
            fewest = min(state.active / state.server.weight for state in tier)
            tier = [state for state in tier if state.active / state.server.weight == fewest]
        return self._round_robin(tier).server

    @staticmethod
    def _round_robin(tier: List[ServerState]) -> ServerState:
        """nginx's smooth weighted round robin (ngx_http_upstream_get_peer):
        each adds its weight to its current weight, the highest is chosen
        and gives back the sum; weights 5, 1, 1 go a a b a c a a."""
        total = 0
        best = None
        for state in tier:
            state.current += state.server.weight
            total += state.server.weight
            if best is None or state.current > best.current:
                best = state
        best.current -= total
        return best

    def state_of(self, server: UpstreamServer) -> ServerState:
        return next(state for state in self.states if state.server is server)

    def lease(self, server: UpstreamServer) -> PoolLease:
        """A session's place on ``server``, counted until released."""
        return PoolLease(self.state_of(server), self.name)

    def failed(self, server: UpstreamServer, now: float, kind: str = "connect") -> Optional[str]:
        """A connect failure, timeout or bad greeting of ``server`` (``kind``,
        counted in the metrics: UPSTREAM_FAILURE_KINDS): one more failure
        within fail_timeout; at max_fails it is taken out for fail_timeout
        (nginx's "upstream server temporarily disabled").  Returns the line
        to log at warn then, else None."""
        self._count_failure(server, kind)
        state = self.state_of(server)
        if server.max_fails == 0:
            return None                # nginx: max_fails=0 disables the accounting
        if state.fails == 0 or now - state.first_fail > server.fail_timeout:
            state.fails, state.first_fail = 0, now
        state.fails += 1
        if state.fails < server.max_fails:
            return None
        state.fails, state.out_until = 0, now + server.fail_timeout
        self._tell(server, state.out_until)
        return ('upstream server temporarily disabled: %s of upstream "%s" failed %d time%s '
                "within %s, no new logins for %s"
                % (server.text, self.name, server.max_fails, "" if server.max_fails == 1 else "s",
                   time_text(server.fail_timeout), time_text(server.fail_timeout)))

    def succeeded(self, server: UpstreamServer) -> None:
        """A login went through: its failures are forgotten (nginx)."""
        state = self.state_of(server)
        state.fails = 0
        if state.out_until:
            state.out_until = 0.0
            self._tell(server, 0.0)

    def checked(self, server: UpstreamServer, ok: bool, why: str) -> Optional[Tuple[str, str]]:
        """The active check's verdict on ``server`` (``why``: what failed).
        Returns (level, line) to log when it changes, once: down at warn,
        up again at notice; else None.  Each failed check is counted."""
        if not ok:
            self._count_failure(server, "health_check")
        state = self.state_of(server)
        if state.check_down == (not ok):
            return None
        state.check_down = not ok
        self._tell(server, 0.0 if ok else -1.0)
        if ok:
            return "notice", 'upstream server %s of upstream "%s" is up again (health check)' % (
                server.text, self.name)
        return "warn", 'upstream server %s of upstream "%s" is down (health check: %s)' % (
            server.text, self.name, why)

    def up(self, now: float) -> List[Tuple[str, bool]]:
        """(server, up) for each server: up unless down, taken out or found
        down by the active check (a draining server is up: it serves its
        sessions)."""
        return [(state.server.text, not state.server.down and state.out_until <= now and
                 not state.check_down) for state in self.states]


def time_text(seconds: float) -> str:
    """A time as nginx writes it: 10s, 500ms."""
    if seconds == int(seconds):
        return "%ds" % seconds
    return "%dms" % round(seconds * 1000)


class UpstreamDrains:
    """A shared book (SharedBooks): the servers the control interface
    drained or undrained, (upstream, server) -> flag, in every process.
    What it says wins over the file's drain flag until it is said again."""
    kinds = ("upstream drain",)

    def __init__(self):
        self.flags = {}                # (upstream name, "ADDRESS:PORT") -> bool
        self.publish = None            # set by SharedBooks.add

    def set(self, upstream: str, server: str, flag: bool) -> None:
        self.publish(("upstream drain", upstream, server, bool(flag)))

    def apply(self, event: tuple) -> None:
        _, upstream, server, flag = event
        self.flags[(upstream, server)] = bool(flag)

    def draining(self, upstream: str, server: str, configured: bool) -> bool:
        return self.flags.get((upstream, server), configured)


def backend_settings(config: "Config", server: Settings, upstream: Upstream) -> Settings:
    """``server``'s settings for the backend dialogue of a login to
    ``upstream``: with its pool's overrides, if it has any."""
    if upstream.pool and config.pool_settings:
        return config.pool_settings.get((server.name, upstream.pool), server)
    return server


def drain_server(upstreams: Optional[Dict[str, UpstreamSpec]], drains: UpstreamDrains,
                 upstream: str, server: str, flag: bool) -> bool:
    """Drain (``flag`` True) or undrain ``server`` ("ADDRESS:PORT" as
    written in the file) of the pool ``upstream`` of ``upstreams`` (a
    Config's), in every process: for a control interface in any process,
    the master's too (Pools.set_drain is a worker's).  False if there is
    no such server (nothing changes then)."""
    spec = (upstreams or {}).get(upstream)
    if spec is None or not any(each.text == server for each in spec.servers):
        return False
    drains.set(upstream, server, flag)
    return True


class UpstreamHealth:
    """A shared book (SharedBooks): the pool servers some worker has taken
    out, in every process, the master's too, for a status page
    (mailproxy_upstream_up, /readyz).  Each worker still chooses by what it
    learned itself, as nginx's upstream without a zone.  A worker reports
    (upstream, server, until): 0 back, -1 down until its check finds it up,
    else out until then (the loop's clock, CLOCK_MONOTONIC: the same in
    every process of a host)."""
    kinds = ("upstream health", "worker gone")

    def __init__(self):
        self.out = {}                  # (upstream, server) -> {pid: until}
        self.publish = None            # set by SharedBooks.add

    def report(self, upstream: str, server: str, until: float) -> None:
        self.publish(("upstream health", os.getpid(), upstream, server, until))

    def apply(self, event: tuple) -> None:
        if event[0] == "worker gone":
            for reports in self.out.values():
                reports.pop(event[1], None)
            return
        _, pid, upstream, server, until = event
        reports = self.out.setdefault((upstream, server), {})
        if until:
            reports[pid] = until
        else:
            reports.pop(pid, None)

    def up(self, upstream: str, server: str, now: float) -> bool:
        """No worker has it out now."""
        return all(0 < until <= now for until in self.out.get((upstream, server), {}).values())


class Pools:
    """A worker's pools, by name.  pool_for(config, upstream) is the Pool a
    session's login goes through; set_drain() is the control interface's
    way in.  reconfigure() after a reload keeps what was learned of a pool
    whose section did not change."""

    def __init__(self, upstreams: Optional[Dict[str, UpstreamSpec]],
                 drains: Optional[UpstreamDrains] = None, health: Optional[UpstreamHealth] = None,
                 metrics: Optional["Metrics"] = None):
        self.drains = drains
        self.health = health
        self.metrics = metrics
        self.pools = {}                # name -> Pool
        self.reconfigure(upstreams)

    def reconfigure(self, upstreams: Optional[Dict[str, UpstreamSpec]]) -> None:
        old, self.pools = self.pools, {}
        for name, spec in (upstreams or {}).items():
            kept = old.get(name)
            self.pools[name] = kept if kept is not None and kept.spec == spec else \
                Pool(spec, self.drains, self.health, self.metrics)
        for name, pool in old.items():
            if self.pools.get(name) is not pool:       # gone: what it took out is no more
                for state in pool.states:
                    if state.out_until or state.check_down:
                        pool._tell(state.server, 0.0)

    def pool_for(self, config: "Config", upstream: Upstream) -> Optional[Pool]:
        """The pool ``upstream`` goes through (None: a plain address), as
        ``config`` (the session's, maybe older than a reload) defines it."""
        if not upstream.pool:
            return None
        spec = (config.upstreams or {}).get(upstream.pool)
        if spec is None:
            return None
        pool = self.pools.get(upstream.pool)
        return pool if pool is not None and pool.spec == spec else \
            Pool(spec, self.drains, metrics=self.metrics)

    def up(self, now: float) -> List[Tuple[str, str, bool]]:
        """(upstream, server, up) for every server of every pool, as this
        worker sees them (Pool.up): what a status page shows."""
        return [(name, server, up) for name, pool in self.pools.items()
                for server, up in pool.up(now)]

    def set_drain(self, upstream: str, server: str, flag: bool) -> bool:
        """Drain (``flag`` True) or undrain ``server`` ("ADDRESS:PORT" as
        written in the file) of ``upstream``, in every worker.  False if the
        pool has no such server (nothing changes then)."""
        pool = self.pools.get(upstream)
        if pool is None or not any(state.server.text == server for state in pool.states):
            return False
        if self.drains is None:
            self.drains = UpstreamDrains()
            self.drains.publish = self.drains.apply
            for each in self.pools.values():
                each.drains = self.drains
        self.drains.set(upstream, server, flag)
        return True


# ========================================================================== #
# ####                          Backend login                           #### #
# ========================================================================== #
# Logging in to the backend as ngx_mail_proxy_module.c does, written as data:
# a script of Expect and Send steps, built before the first byte from what is
# known (protocol, tag, login, password), and one runner that walks any
# script.  Sans-I/O like the client machines.

class Send(NamedTuple):
    data: bytes
    name: str = "data"         # what the debug log says was sent: a command name, never
                               # an argument (no login, password or token is in it)


class TlsStep(NamedTuple):
    """Extension: start TLS to the backend here (after its STARTTLS yes)."""


class Expect(NamedTuple):
    """Wait for a reply.  ``kind``: "imap-greeting" (``* OK``),
    "continuation" (``+``), "imap-tagged" (``TAG OK``, untagged lines before
    it allowed), "pop3-ok" (``+OK``), "smtp" (a reply, multi-line ones read to
    their last line, whose code must be one of ``codes``; none given: any),
    "sieve-greeting" (ManageSieve capability lines, then ``OK``), "sieve-ok"
    (``OK``).
    ``relay``: the reply (with the untagged lines before it) is the client's
    answer to its login command.  ``verdict``: a refusal here may be the
    backend's verdict on the login and password (refuses_credentials;
    auth = backend relays it as a failed login)."""
    kind: str
    relay: bool = False
    codes: Tuple[bytes, ...] = ()
    tag: bytes = b""           # imap-tagged: another tag than the login's
    verdict: bool = False
    learn: bool = False        # the capabilities the reply lists are the backend's (When)
    probe: bool = False        # a question of ours: a no means "no capabilities", not a failure


class When(NamedTuple):
    """Extension: ``steps`` if the backend has advertised ``capability``
    (in a reply read by an Expect with ``learn``), else ``otherwise``.
    ``capability`` None: ``steps`` if no capability is known yet (the
    question to ask, CAPABILITY or CAPA).  TLS forgets what was learned in
    clear."""
    capability: Optional[bytes]
    steps: Tuple = ()
    otherwise: Tuple = ()


BACKEND_STARTTLS_TAG = b"S1 "
BACKEND_CAPABILITY_TAG = b"C1 "
BACKEND_ID_TAG = b"I1 "


# RFC 7888: LITERAL- allows non-synchronizing literals of up to 4096 bytes.
LITERAL_MINUS_MAX = 4096


def imap_login_script(tag: bytes, login: bytes, password: bytes, starttls: bool = False) -> list:
    """nginx's IMAP login: LOGIN with synchronizing literals and the client's
    own tag (RFC 3501 §4.3), so any byte of the login or password travels as
    literal data and can never end the command early.  ``starttls``
    (extension): STARTTLS first, with a tag of our own.

    Extension: when the greeting's capabilities (in the clear, before any
    STARTTLS: TLS forgets them) list LITERAL+ or LITERAL- (RFC 7888 §3),
    and both literals are of LITERAL_MINUS_MAX bytes at most, the literals
    are non-synchronizing, ``{5+}``, and the whole command goes in one
    write, without waiting for two "+" continuations: two round trips to
    the backend fewer per login.  Same bytes of login and password, in
    the same literals.  The limit holds for LITERAL+ too: a server may
    refuse a longer literal (Dovecot's "Literal size too large"), which a
    synchronizing one lets it do before the bytes are sent.  Never when
    the greeting lists LOGINDISABLED (RFC 3501 §6.2.3): such a server
    refuses LOGIN before its "+", and so never receives the password."""
    secure = [Send(BACKEND_STARTTLS_TAG + b"STARTTLS\r\n", "STARTTLS"),
              Expect("imap-tagged", tag=BACKEND_STARTTLS_TAG), TlsStep()] if starttls else []
    synchronizing = (
        Send(tag + b"LOGIN {%d}\r\n" % len(login), "LOGIN"),
        Expect("continuation"),
        Send(login + b" {%d}\r\n" % len(password), "LOGIN login literal"),
        Expect("continuation"),
        Send(password + b"\r\n", "LOGIN password literal"))
    at_once = (Send(tag + b"LOGIN {%d+}\r\n" % len(login) + login +
                    b" {%d+}\r\n" % len(password) + password + b"\r\n", "LOGIN"),)
    login_step = synchronizing
    if max(len(login), len(password)) <= LITERAL_MINUS_MAX:
        login_step = (When(b"LOGINDISABLED", synchronizing, otherwise=(
            When(b"LITERAL+", at_once, otherwise=(
                When(b"LITERAL-", at_once, otherwise=synchronizing),)),)),)
    return [Expect("imap-greeting", learn=True)] + secure + list(login_step) + [
        Expect("imap-tagged", relay=True, verdict=True),
    ]


def oauth_initial_response(mechanism: str, login: bytes, token: bytes) -> bytes:
    """The SASL initial response that hands a bearer token on (base64)."""
    if mechanism == "xoauth2":
        data = b"user=" + login + b"\x01auth=Bearer " + token + b"\x01\x01"
    else:                                  # RFC 7628 §3.1, GS2 header with a=
        login = login.replace(b"=", b"=3D").replace(b",", b"=2C")
        data = b"n,a=" + login + b",\x01auth=Bearer " + token + b"\x01\x01"
    return base64.b64encode(data)


def imap_token_script(tag: bytes, mechanism: str, response: bytes, starttls: bool = False) -> list:
    """Extension: log in to the backend with the client's own bearer token
    (RFC 4959 initial response), when the auth server sends no Auth-Pass."""
    secure = [Send(BACKEND_STARTTLS_TAG + b"STARTTLS\r\n", "STARTTLS"),
              Expect("imap-tagged", tag=BACKEND_STARTTLS_TAG), TlsStep()] if starttls else []
    return [Expect("imap-greeting")] + secure + [
        Send(tag + b"AUTHENTICATE " + mechanism.upper().encode() + b" " + response + b"\r\n",
             "AUTHENTICATE " + mechanism.upper()),
        Expect("imap-tagged", relay=True)]


def pop3_token_script(mechanism: str, response: bytes, starttls: bool = False) -> list:
    secure = [Send(b"STLS\r\n", "STLS"), Expect("pop3-ok"), TlsStep()] if starttls else []
    return [Expect("pop3-ok")] + secure + [
        Send(b"AUTH " + mechanism.upper().encode() + b" " + response + b"\r\n",
             "AUTH " + mechanism.upper()),
        Expect("pop3-ok", relay=True)]


def pop3_can_send(login: bytes, password: bytes) -> bool:
    """POP3 arguments have no quoting: a CR, LF or NUL in the login or the
    password would end USER or PASS early (and add a command of its own)."""
    return POP3_UNSENDABLE.search(login) is None and POP3_UNSENDABLE.search(password) is None


POP3_UNSENDABLE = re.compile(rb"[\r\n\0]")


def pop3_login_script(login: bytes, password: bytes, starttls: bool = False) -> list:
    """nginx's POP3 login: USER, then PASS; the backend's last +OK is relayed.

    A login or password that pop3_can_send refuses is refused before this
    script is built (see Session).  ``starttls``
    (extension): STLS first (RFC 2595 §4)."""
    secure = [Send(b"STLS\r\n", "STLS"), Expect("pop3-ok"), TlsStep()] if starttls else []
    return [Expect("pop3-ok")] + secure + [
        Send(b"USER " + login + b"\r\n", "USER"),
        Expect("pop3-ok", verdict=True),           # some servers refuse an unknown user here
        Send(b"PASS " + password + b"\r\n", "PASS"),
        Expect("pop3-ok", relay=True, verdict=True),
    ]


# -- the client's identity at the backend (imap_id, pop3_xclient: extensions) -----
# Dovecot believes the client's address from a proxy in its
# login_trusted_networks: IMAP's ID with the x-originating-ip convention,
# and POP3's XCLIENT.  Sent only when the backend advertises it (CAPABILITY
# lists ID; CAPA lists XCLIENT, or the greeting says [XCLIENT]), before the
# login, after TLS: nothing the backend did not ask for.

def identity_value(text: str) -> bool:
    """An IP address or a number: safe in a quoted string and an XCLIENT
    argument as it is (no quote, backslash, space, CR or LF)."""
    if text.isdigit():
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def imap_id_command(fields: List[Tuple[str, str]]) -> bytes:
    """``I1 ID ("x-originating-ip" "192.0.2.7" ...)`` (RFC 2971 §3.3); a
    field whose value is not an address or a number (a unix socket's
    "unix:") is left out."""
    pairs = ['"%s" "%s"' % (name, value) for name, value in fields if identity_value(value)]
    return BACKEND_ID_TAG + b"ID (" + " ".join(pairs).encode("ascii") + b")\r\n"


def pop3_xclient_command(address: str, port: int) -> bytes:
    """Dovecot's POP3 ``XCLIENT ADDR=... PORT=...``; ADDR=[UNAVAILABLE]
    for a unix socket's client."""
    address = address if identity_value(address) else "[UNAVAILABLE]"
    return b"XCLIENT ADDR=" + address.encode("ascii") + b" PORT=%d\r\n" % port


def identity_steps(protocol: str, attempt: "LoginAttempt", destination: Tuple[str, int],
                   session: int) -> list:
    """The steps that tell the backend who the client is: ask for the
    capabilities unless the greeting listed them, then ID or XCLIENT if
    they hold it."""
    if protocol == "imap":
        fields = [("x-originating-ip", attempt.client_address),
                  ("x-originating-port", str(attempt.client_port)),
                  ("x-connected-ip", destination[0]), ("x-connected-port", str(destination[1])),
                  ("x-session-id", str(session))]
        return [When(None, (Send(BACKEND_CAPABILITY_TAG + b"CAPABILITY\r\n", "CAPABILITY"),
                            Expect("imap-tagged", tag=BACKEND_CAPABILITY_TAG, learn=True,
                                   probe=True))),
                When(b"ID", (Send(imap_id_command(fields), "ID"),
                             Expect("imap-tagged", tag=BACKEND_ID_TAG)))]
    return [When(None, (Send(b"CAPA\r\n", "CAPA"), Expect("pop3-capa", learn=True, probe=True))),
            When(b"XCLIENT", (Send(pop3_xclient_command(attempt.client_address,
                                                        attempt.client_port), "XCLIENT"),
                              Expect("pop3-ok")))]


def with_identity(script: list, steps: list) -> list:
    """``steps`` inserted where the login begins: after the greeting, or
    after the TLS handshake STARTTLS asked for; the greeting learns."""
    script = list(script)
    script[0] = script[0]._replace(learn=True)
    tls = [i for i, step in enumerate(script) if isinstance(step, TlsStep)]
    at = tls[-1] + 1 if tls else 1
    return script[:at] + steps + script[at:]


# -- the capabilities before login, probed (capabilities_from = backend, extension) --
# The list a client sees before login (CAPABILITY, CAPA, EHLO) can be the
# backend's own instead of imap_capabilities & co. written by hand: a worker
# asks the backend (CapabilityProbes), off the login path, and the client
# machines list what it said, less what only the proxy can answer for
# before login (PROXY_OWN_CAPABILITIES: taken from the configured list),
# then the proxy's AUTH and STARTTLS as always.  After login the client
# talks to the backend itself, and IMAP's tagged OK [CAPABILITY ...] of the
# login is the backend's, relayed.

CAPABILITY_PROBE_TAG = b"P1 "
# What the proxy answers for itself before login, by capability name (the
# first word, upper case; IMAP's AUTH=... all under "AUTH="): never taken
# from a backend, only from the configured list.  IMAP: AUTH=, STARTTLS and
# LOGINDISABLED are the proxy's (RFC 3501 §6.2); it takes no SASL-IR (RFC
# 4959) nor non-synchronizing literals (RFC 7888) in its dialogue, and
# speaks IMAP4rev1 only (RFC 9051's IMAP4rev2 changes the dialogue).  POP3
# (RFC 2449 §6): SASL, STLS and USER are its own, it has no PIPELINING,
# UTF8 or LANG of its own (RFC 6856) nor response codes beyond its own;
# XCLIENT is for proxies, not clients.  SMTP: AUTH and STARTTLS are its
# own, XCLIENT only for trusted_networks (the machine adds it), XFORWARD
# never; CHUNKING (BDAT), SMTPUTF8, PIPELINING, ENHANCEDSTATUSCODES only
# as the configured list vouches; VRFY, EXPN and ETRN it refuses.
PROXY_OWN_CAPABILITIES = {
    "imap": frozenset({"AUTH=", "STARTTLS", "LOGINDISABLED", "SASL-IR", "LITERAL+",
                       "LITERAL-", "IMAP4REV2"}),
    "pop3": frozenset({"SASL", "STLS", "USER", "XCLIENT", "PIPELINING", "UTF8", "LANG",
                       "RESP-CODES", "AUTH-RESP-CODE"}),
    "smtp": frozenset({"AUTH", "STARTTLS", "XCLIENT", "XFORWARD", "CHUNKING", "BDAT",
                       "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES", "VRFY", "EXPN",
                       "ETRN"}),
}
# RFC 3501 §7.2.1 the untagged list, or the tagged OK's code (§7.1).
IMAP_PROBED_LIST = re.compile(r"(?i)\* CAPABILITY (.*)|P1 OK \[CAPABILITY ([^\]]*)\]")
CAPABILITIES_DIRECTIVE = {"imap": "imap_capabilities", "pop3": "pop3_capabilities",
                          "smtp": "smtp_capabilities"}


def capability_probe_script(protocol: str, server_name: str, starttls: bool = False) -> list:
    """The question, as a script for BackendLogin: the greeting, STARTTLS
    first if the backend wants TLS (``starttls``), then CAPABILITY, CAPA or
    EHLO, whose answer is "relayed" (LoginDone.reply), then goodbye, so
    that the backend logs a client that left, not an error."""
    if protocol == "imap":
        secure = [Send(BACKEND_STARTTLS_TAG + b"STARTTLS\r\n", "STARTTLS"),
                  Expect("imap-tagged", tag=BACKEND_STARTTLS_TAG), TlsStep()] if starttls else []
        return [Expect("imap-greeting")] + secure + [
            Send(CAPABILITY_PROBE_TAG + b"CAPABILITY\r\n", "CAPABILITY"),
            Expect("imap-tagged", relay=True, tag=CAPABILITY_PROBE_TAG),
            Send(b"P2 LOGOUT\r\n", "LOGOUT")]
    if protocol == "pop3":
        secure = [Send(b"STLS\r\n", "STLS"), Expect("pop3-ok"), TlsStep()] if starttls else []
        return [Expect("pop3-ok")] + secure + [
            Send(b"CAPA\r\n", "CAPA"), Expect("pop3-capa", relay=True), Send(b"QUIT\r\n", "QUIT")]
    ehlo = Send(b"EHLO " + server_name.encode() + b"\r\n", "EHLO")
    secure = [ehlo, Expect("smtp", codes=(b"250",)), Send(b"STARTTLS\r\n", "STARTTLS"),
              Expect("smtp", codes=(b"220",)), TlsStep()] if starttls else []
    return [Expect("smtp", codes=(b"220",))] + secure + [
        ehlo, Expect("smtp", codes=(b"250",), relay=True), Send(b"QUIT\r\n", "QUIT")]


def probed_capabilities(protocol: str, reply: bytes) -> List[str]:
    """The capabilities the probe's answer lists, in its order, each as
    written: IMAP's ``* CAPABILITY`` words (or the tagged OK's
    [CAPABILITY ...] code), POP3's CAPA lines, SMTP's EHLO lines but the
    first (the backend's name).  Anything not printable ASCII is left out."""
    lines = [line.decode("ascii", "replace").strip() for line in reply.splitlines()]
    if protocol == "imap":
        items = []
        for line in lines:
            match = IMAP_PROBED_LIST.match(line)
            if match:
                items = (match.group(1) or match.group(2)).split()
                if match.group(1):
                    break                      # the untagged line is the whole list
    elif protocol == "pop3":
        items = [line for line in lines[1:] if line and line != "."]
    else:
        items = [line[4:] for line in lines[1:] if len(line) > 4]
    return [item for item in items if item.isprintable() and "\ufffd" not in item]


def capability_name(protocol: str, item: str) -> str:
    """The name PROXY_OWN_CAPABILITIES knows ``item`` by."""
    name = item.split(" ", 1)[0].upper()
    if name.startswith("AUTH="):
        return "AUTH=" if protocol == "imap" else "AUTH"
    return name


def advertised_capabilities(protocol: str, probed: List[str], configured: List[str]) -> List[str]:
    """What stands in for imap_capabilities (pop3_, smtp_) once the backend
    answered: its ``probed`` list less what the proxy answers for itself,
    and those of the ``configured`` list that the proxy answers for, each
    where the backend listed its own (else at the end)."""
    own = PROXY_OWN_CAPABILITIES[protocol]
    vouched = [item for item in configured if capability_name(protocol, item) in own]
    listed = []
    for item in probed:
        name = capability_name(protocol, item)
        if name not in own:
            listed.append(item)
            continue
        listed += [mine for mine in vouched if capability_name(protocol, mine) == name]
        vouched = [mine for mine in vouched if capability_name(protocol, mine) != name]
    return listed + vouched


def probe_proxy_header(version: str) -> bytes:
    """proxy_protocol to a backend that is probed, not logged in to: v1's
    UNKNOWN and v2's LOCAL command, which the PROXY protocol spec (§2.1,
    §2.2) keeps for a proxy's own connections such as health checks."""
    if version == "on":
        return b"PROXY UNKNOWN\r\n"
    if version == "v2":
        return PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"
    return b""


def xtext(data: bytes) -> bytes:
    """RFC 3461 §4 xtext, as nginx's NGX_ESCAPE_MAIL_XTEXT: "+", "=", and bytes
    outside 0x21-0x7E become "+XX" (upper-case hex)."""
    out = bytearray()
    for byte in data:
        if byte < 0x21 or byte > 0x7E or byte in (0x2B, 0x3D):
            out += b"+%02X" % byte
        else:
            out.append(byte)
    return bytes(out)


def xclient_command(address: str, login: bytes, name: str) -> bytes:
    """Postfix's XCLIENT (www.postfix.org/XCLIENT_README.html) as nginx sends
    it: ADDR (IPV6: prefixed for IPv6), LOGIN if there is one, NAME always.
    A unix socket's client is ADDR=[UNAVAILABLE]: nginx sends "unix:",
    which Postfix refuses (501 Bad ADDR syntax), failing the login."""
    if address == "unix:":
        address = "[UNAVAILABLE]"
    addr = "IPV6:" + address if ":" in address else address
    line = b"XCLIENT ADDR=" + xtext(addr.encode())
    if login:
        line += b" LOGIN=" + xtext(login)
    return line + b" NAME=" + xtext(name.encode()) + b"\r\n"


class SmtpFacts(NamedTuple):
    """What the SMTP backend login needs to know, all of it known in advance."""
    client_address: str             # after realip: XCLIENT ADDR
    client_name: str                # the resolver's verdict: XCLIENT NAME
    helo: Optional[bytes]           # the client's HELO/EHLO argument, if any
    esmtp: bool                     # the client said EHLO
    login: bytes
    password: bytes
    method: str                     # an AuthMethod; NONE: replay MAIL and RCPT
    mail_from: Optional[bytes] = None
    rcpt_to: Optional[bytes] = None
    backend_auth: str = ""          # this session's choice (Auth-SMTP-Auth, a token):
                                    # "none", "plain", "login", "xoauth2", "oauthbearer";
                                    # "": as proxy_smtp_auth says
    starttls: Optional[bool] = None # this session's choice; None: as proxy_starttls says

    def __repr__(self) -> str:
        return "SmtpFacts(%r, login=%r, method=%r)" % (self.client_address, self.login, self.method)


def smtp_login_script(settings: Settings, facts: SmtpFacts) -> list:
    """The SMTP backend dialogue of ngx_mail_proxy_smtp_handler, as a list.

    nginx's sixteen states are the product of four choices known before the
    first byte: xclient on or off, whether the client said HELO or EHLO,
    smtp_auth none (replay MAIL and RCPT), and proxy_smtp_auth.
    """
    ok = (b"250",)
    name = settings.server_name.encode()
    hello = b"EHLO " if settings.xclient or facts.esmtp else b"HELO "
    script = [Expect("smtp", codes=(b"220",)), Send(hello + name + b"\r\n", hello.decode().strip()),
              Expect("smtp", codes=ok)]
    if settings.proxy_starttls if facts.starttls is None else facts.starttls:
        # Extension (RFC 3207): STARTTLS, then EHLO again over TLS.
        script += [Send(b"STARTTLS\r\n", "STARTTLS"), Expect("smtp", codes=(b"220",)), TlsStep(),
                   Send(b"EHLO " + name + b"\r\n", "EHLO"), Expect("smtp", codes=ok)]
    method = facts.backend_auth or (settings.proxy_smtp_auth_method if settings.proxy_smtp_auth
                                    else "none")
    backend_auth = method != "none" and facts.method != AuthMethod.NONE
    if settings.xclient:
        login = b"" if backend_auth else facts.login
        script += [Send(xclient_command(facts.client_address, login, facts.client_name), "XCLIENT"),
                   Expect("smtp", codes=(b"220", b"250"))]
        if facts.helo is not None:
            # XCLIENT resets the session (Postfix greets again): say hello
            # again with the client's own words.
            again = b"EHLO " if facts.esmtp else b"HELO "
            script += [Send(again + facts.helo + b"\r\n", again.decode().strip()),
                       Expect("smtp", codes=ok)]
    if backend_auth:
        script += smtp_auth_steps(method, facts.login, facts.password)
    if facts.method == AuthMethod.NONE:
        # The client already has its 250 for MAIL; the backend's answer to
        # RCPT, whatever it is, is the client's answer (nginx relays even a 5xx).
        script += [Send(facts.mail_from + b"\r\n", "MAIL"), Expect("smtp", codes=ok),
                   Send(facts.rcpt_to + b"\r\n", "RCPT"), Expect("smtp", relay=True)]
    return script


def backend_tls_mode(server: Settings, outcome: AuthOutcome) -> str:
    """TLS to the backend for this session: "ssl", "starttls" or "plain";
    the auth server's choice (Auth-Backend-TLS, extension), else
    proxy_ssl / proxy_starttls."""
    if outcome.backend_tls:
        return outcome.backend_tls
    return "ssl" if server.proxy_ssl else "starttls" if server.proxy_starttls else "plain"


def imap_attempt_script(server: Settings, attempt: LoginAttempt, outcome: AuthOutcome,
                        starttls: bool) -> list:
    """IMAP: LOGIN with the password, or AUTHENTICATE with the client's own
    bearer token when the auth server sent no Auth-Pass."""
    if outcome.token is not None:
        response = oauth_initial_response(outcome.token[0], outcome.login, outcome.token[1])
        return imap_token_script(attempt.tag, outcome.token[0], response, starttls)
    return imap_login_script(attempt.tag, outcome.login, outcome.password, starttls)


def pop3_attempt_script(server: Settings, attempt: LoginAttempt, outcome: AuthOutcome,
                        starttls: bool) -> list:
    """POP3: USER and PASS, or AUTH with the client's own bearer token."""
    if outcome.token is not None:
        response = oauth_initial_response(outcome.token[0], outcome.login, outcome.token[1])
        return pop3_token_script(outcome.token[0], response, starttls)
    return pop3_login_script(outcome.login, outcome.password, starttls)


def smtp_attempt_script(server: Settings, attempt: LoginAttempt, outcome: AuthOutcome,
                        starttls: bool) -> list:
    """SMTP: nginx's dialogue (smtp_login_script).  A token goes on to the
    backend only when it is to be logged in to (proxy_smtp_auth,
    Auth-SMTP-Auth); otherwise XCLIENT LOGIN= says who."""
    token = outcome.token
    wants_auth = outcome.smtp_auth not in (None, "none") or (
        outcome.smtp_auth is None and server.proxy_smtp_auth)
    use_token = token is not None and wants_auth
    backend_auth = token[0] if use_token else (outcome.smtp_auth or "")
    password = token[1] if use_token else (outcome.password or b"")
    facts = SmtpFacts(attempt.client_address, attempt.client_name, attempt.helo, attempt.esmtp,
                      outcome.login, password, attempt.credentials.method, attempt.mail_from,
                      attempt.rcpt_to, backend_auth, starttls)
    return smtp_login_script(server, facts)


def sieve_login_script(mechanism: str, response: bytes, starttls: bool = False) -> list:
    """ManageSieve (RFC 5804, extension): the capabilities and OK (§1.7);
    ``starttls``: STARTTLS, and after the handshake the capabilities again
    (§2.2); then ``AUTHENTICATE "MECHANISM" "response"`` (§2.1: base64 in
    a quoted string, so no byte of the login or password reaches the
    wire as itself), whose OK is the client's answer."""
    secure = [Send(b"STARTTLS\r\n", "STARTTLS"), Expect("sieve-ok"), TlsStep(),
              Expect("sieve-greeting")] if starttls else []
    name = mechanism.upper().encode()
    return [Expect("sieve-greeting")] + secure + [
        Send(b'AUTHENTICATE "' + name + b'" "' + response + b'"\r\n',
             "AUTHENTICATE " + name.decode()),
        Expect("sieve-ok", relay=True, verdict=True)]


def sieve_attempt_script(server: Settings, attempt: LoginAttempt, outcome: AuthOutcome,
                         starttls: bool) -> list:
    """ManageSieve: AUTHENTICATE PLAIN with the password (RFC 4616, no
    authorization identity), or the client's own bearer token."""
    if outcome.token is not None:
        response = oauth_initial_response(outcome.token[0], outcome.login, outcome.token[1])
        return sieve_login_script(outcome.token[0], response, starttls)
    plain = base64.b64encode(b"\0" + outcome.login + b"\0" + outcome.password)
    return sieve_login_script("plain", plain, starttls)


# The backend login of an accepted attempt, by protocol:
# (server, attempt, outcome, STARTTLS first) -> the script.
LOGIN_SCRIPTS = {"imap": imap_attempt_script, "pop3": pop3_attempt_script,
                 "smtp": smtp_attempt_script, "sieve": sieve_attempt_script}


def login_script(server: Settings, attempt: LoginAttempt, outcome: AuthOutcome,
                 starttls: bool, destination: Tuple[str, int] = ("", 0),
                 session: int = 0) -> list:
    """The backend login for an accepted attempt (LOGIN_SCRIPTS);
    ``starttls`` (extension): STARTTLS first.  With imap_id or pop3_xclient
    on (extensions), the client's identity first (identity_steps:
    ``destination`` is the address the client connected to, ``session``
    the session's number)."""
    script = LOGIN_SCRIPTS[attempt.protocol](server, attempt, outcome, starttls)
    if (attempt.protocol == "imap" and server.imap_id) or \
            (attempt.protocol == "pop3" and server.pop3_xclient):
        script = with_identity(script, identity_steps(attempt.protocol, attempt, destination,
                                                      session))
    return script


def smtp_auth_steps(method: str, login: bytes, password: bytes) -> list:
    """AUTH to an SMTP backend (proxy_smtp_auth, Auth-SMTP-Auth): nginx's
    AUTH PLAIN; AUTH LOGIN (extension, for servers such as Exchange without
    PLAIN); or the client's bearer token (extension)."""
    if method in ("xoauth2", "oauthbearer"):
        response = oauth_initial_response(method, login, password)
        return [Send(b"AUTH " + method.upper().encode() + b" " + response + b"\r\n",
                     "AUTH " + method.upper()),
                Expect("smtp", codes=(b"235",))]
    if method == "login":
        return [Send(b"AUTH LOGIN\r\n", "AUTH LOGIN"), Expect("smtp", codes=(b"334",)),
                Send(base64.b64encode(login) + b"\r\n", "AUTH LOGIN username"),
                Expect("smtp", codes=(b"334",), verdict=True),
                Send(base64.b64encode(password) + b"\r\n", "AUTH LOGIN password"),
                Expect("smtp", codes=(b"235",), verdict=True)]
    plain = base64.b64encode(b"\0" + login + b"\0" + password)
    return [Send(b"AUTH PLAIN " + plain + b"\r\n", "AUTH PLAIN"),
            Expect("smtp", codes=(b"235",), verdict=True)]


class LoginDone(NamedTuple):
    """Event: the backend accepted the login; ``reply`` goes to the client."""
    reply: bytes


class BackendStartTls(NamedTuple):
    """Event: start TLS to the backend now; call tls_started() when done."""


class BackendLogin:
    """Runs a login script against the backend's replies.

    receive_data(bytes) -> [LoginDone] when the script is through, [] while
    it waits; raises BackendError when the backend says anything else.  The
    rules: one reply per command sent, so bytes that came before a command
    was sent are an error, not its answer (the lesson of CVE-2011-0411,
    where replies sent ahead were taken for the answers to commands not
    yet sent); what came in clear behind a STARTTLS yes is dropped (RFC 3207
    §4.2); a reply line longer than ``line_limit`` (proxy_buffer) is an
    error, as nginx; so is an IMAP literal, which no login reply has.
    After an error the login is over: any later call raises it again, so
    nothing the backend sends after a refusal can log anybody in.

    ``trace`` (the debug log, when it is on): called with "send NAME" for
    each step sent (Send.name, never its data) and "got CODE" for each
    reply (reply_code: the status word, never the text).
    """

    def __init__(self, script: list, tag: bytes = b"", line_limit: int = PAGE_SIZE,
                 trace: Optional[Callable[[str], None]] = None):
        self.script = list(script)
        self.tag = tag
        self.line_limit = line_limit
        self.trace = trace
        self.error = None                  # type: Optional[BackendError]
        self._input = LineBuffer()
        self._output = bytearray()
        self._relay = bytearray()          # reply lines for the client
        self._reply = bytearray()          # the lines of the reply being read
        self._greeted = False              # the first Expect is the greeting
        self.capabilities = None           # type: Optional[set]  (what a ``learn`` reply listed)
        self._advance()

    @property
    def trailing_data(self) -> bytes:
        return bytes(self._input)

    @property
    def greeted(self) -> bool:
        """The backend's greeting has come, and was the one expected."""
        return self._greeted

    def data_to_send(self) -> bytes:
        data = bytes(self._output)
        del self._output[:]
        return data

    def _advance(self) -> bool:
        """Queue the Send steps now due (a When's, if it holds); True if
        there was one."""
        sent = False
        while self.script and isinstance(self.script[0], (Send, When)):
            step = self.script.pop(0)
            if isinstance(step, When):
                known = self.capabilities
                if (known is None) if step.capability is None else \
                        (known is not None and step.capability in known):
                    self.script[:0] = step.steps
                else:
                    self.script[:0] = step.otherwise
                continue
            self._output += step.data
            sent = True
            if self.trace is not None:
                self.trace("send " + step.name)
        return sent

    def tls_started(self) -> None:
        """The handshake with the backend is done: the script goes on, and
        what the backend said in clear is forgotten (RFC 3207 §4.2)."""
        self.script.pop(0)
        self.capabilities = None
        self._advance()

    def receive_data(self, data: bytes) -> list:
        if self.error is not None:
            raise self.error
        try:
            return self._receive(data)
        except BackendError as error:
            self.error = error
            self.script = []
            raise

    def _receive(self, data: bytes) -> list:
        if not data:
            raise BackendError("upstream prematurely closed connection")
        self._input += data
        while self.script:
            step = self.script[0]
            if isinstance(step, TlsStep):
                # Whatever came after the backend's yes was sent in clear:
                # drop it, as the client side does (RFC 3207 §4.2).
                self._input.clear()
                return [BackendStartTls()]
            line = self._input.take_line(self.line_limit)
            if line is None:
                if len(self._input) >= self.line_limit:
                    raise BackendError("upstream sent too long response line")
                return []
            self._reply += line
            if len(self._reply) > self.line_limit:
                raise BackendError("upstream sent too long response")
            if step.kind in LITERAL_REPLY_KINDS and IMAP_LITERAL_AT_END.search(line):
                raise BackendError("upstream sent a literal in its login response", line)
            accepted = self._accepts(step, line)
            if not accepted and not step.probe:
                if self.trace is not None:
                    self.trace("got " + reply_code(step.kind, line, step.tag or self.tag))
                self._refuse(step, line)
            if accepted and self._more_lines(step, line):
                continue                       # an untagged or a 250- line: more follow
            if self.trace is not None:
                self.trace("got " + reply_code(step.kind, line, step.tag or self.tag))
            if step.learn:
                self._learn(step, bytes(self._reply) if accepted else b"")
            if step.relay:
                self._relay += self._reply
            del self._reply[:]
            self.script.pop(0)
            self._greeted = True
            if self._advance() and self._input:
                # A command has just been sent: nothing can answer it yet.
                raise BackendError("upstream sent data before the command it answers",
                                   bytes(self._input[:self.line_limit]))
        return [LoginDone(bytes(self._relay))]

    def _refuse(self, step: Expect, line: bytes) -> None:
        """A reply the script did not expect: a greeting of another
        protocol (or of none) is UnexpectedGreeting, never a refusal to
        pass on; anything else is the backend's refusal."""
        expected = GREETING_PROTOCOLS[step.kind]
        got = greeting_protocol(line)
        if not self._greeted and got != expected:
            raise UnexpectedGreeting("upstream sent an unexpected greeting (%s, where %s's "
                                     "was expected: is the port right?)"
                                     % ("%s's" % got if got else "no mail protocol's", expected),
                                     bytes(self._reply))
        verdict = step.verdict and refuses_credentials(step.kind, line, step.tag or self.tag)
        raise BackendError("upstream sent invalid response", bytes(self._reply), refusal=True,
                           verdict=verdict)

    def _learn(self, step: Expect, reply: bytes) -> None:
        """The capabilities ``reply`` lists: IMAP's [CAPABILITY ...] code or
        CAPABILITY lines, POP3's greeting codes (Dovecot's [XCLIENT]) or
        CAPA lines.  A greeting that lists none leaves them unknown; an
        answer to our question (a probe) makes them known, empty if it
        said no."""
        words = set()
        for line in reply.splitlines():
            if step.kind == "pop3-capa":
                if line and not line.startswith((b"+OK", b".")):
                    words.add(line.split()[0].upper())
                continue
            match = CAPABILITY_LISTS.match(line)
            if match:
                words.update((match.group(1) or match.group(2) or match.group(3)).upper().split())
        if words or step.probe:
            self.capabilities = words

    def _more_lines(self, step: Expect, line: bytes) -> bool:
        if step.kind == "pop3-capa":               # RFC 2449 §5: lines up to a lone "."
            return line.rstrip(b"\r\n") != b"."
        if step.kind == "imap-tagged":
            return line.startswith(b"* ")
        if step.kind == "sieve-greeting":
            return line.startswith(b'"')           # a capability line; OK ends them
        # RFC 5321 §4.2.1: "250-..." lines continue, "250 ..." (or "250") ends.
        return step.kind == "smtp" and line[3:4] == b"-"

    def _accepts(self, step: Expect, line: bytes) -> bool:
        if step.kind == "imap-greeting":
            return line.startswith(b"* OK")    # nginx refuses "* PREAUTH" too
        if step.kind == "continuation":
            return line.startswith(b"+")
        if step.kind == "pop3-ok":
            return line.startswith(b"+OK")
        if step.kind == "pop3-capa":               # +OK, then any line of the list
            return len(self._reply) > len(line) or line.startswith(b"+OK")
        if step.kind == "sieve-greeting":          # RFC 5804 §1.7: "NAME" ["VALUE"] lines, OK
            return line.startswith(b'"') or SIEVE_OK_LINE.match(line) is not None
        if step.kind == "sieve-ok":
            return SIEVE_OK_LINE.match(line) is not None
        if step.kind == "smtp":
            if not re.match(rb"\d{3}[- \r\n]", line):
                return False
            return not step.codes or line[3:4] == b"-" or line[:3] in step.codes
        # "imap-tagged": "* CAPABILITY ..." (SmarterMail, Gmail: nginx 1.27.3)
        # may come before the tagged OK; nginx takes one, we take any.
        return line.startswith(b"* ") or line.startswith((step.tag or self.tag) + b"OK")


IMAP_REPLY_KINDS = ("imap-greeting", "continuation", "imap-tagged")
SIEVE_REPLY_KINDS = ("sieve-greeting", "sieve-ok")
LITERAL_REPLY_KINDS = IMAP_REPLY_KINDS + SIEVE_REPLY_KINDS   # where a literal is refused
SIEVE_OK_LINE = re.compile(rb"(?i)OK[ \r\n]")          # RFC 5804 §4 response-ok
# RFC 3501 §4.3: a line ending in {n} (or RFC 7888's {n+}) announces n bytes
# of literal data, which no greeting, continuation or LOGIN reply carries.
IMAP_LITERAL_AT_END = re.compile(rb"\{\d+\+?\}\r?\n$")
# The protocol an Expect of each kind belongs to, for a greeting that is not
# the one expected (UnexpectedGreeting).
GREETING_PROTOCOLS = {"imap-greeting": "IMAP", "continuation": "IMAP", "imap-tagged": "IMAP",
                      "pop3-ok": "POP3", "pop3-capa": "POP3", "smtp": "SMTP",
                      "sieve-greeting": "ManageSieve", "sieve-ok": "ManageSieve"}
# Where a backend lists its capabilities: an IMAP greeting's or reply's
# [CAPABILITY ...] code (RFC 3501 §7.1), an untagged CAPABILITY line, a
# POP3 greeting's codes (Dovecot: "+OK [XCLIENT] Dovecot ready.").
CAPABILITY_LISTS = re.compile(rb"\* OK \[CAPABILITY ([^\]]*)\]|\* CAPABILITY (.*)|\+OK \[([^\]]*)\]",
                              re.IGNORECASE)


# Refusals of a login for another reason than the login and password: the
# backend's trouble (RFC 5530 §3, RFC 2449 §8, RFC 3206 §4, RFC 4954 §6:
# only 535 says "credentials invalid").  With auth = backend they end the
# session with the internal error, and the login defence does not count them.
IMAP_NOT_A_VERDICT = re.compile(rb"NO \[(UNAVAILABLE|SERVERBUG|PRIVACYREQUIRED|INUSE|LIMIT)\]")
POP3_NOT_A_VERDICT = re.compile(rb"-ERR \[(SYS/TEMP|SYS/PERM|IN-USE|LOGIN-DELAY)\]")
SIEVE_VERDICT = re.compile(rb"(?i)NO[ \r\n]")
SIEVE_NOT_A_VERDICT = re.compile(
    rb"(?i)NO \((TRYLATER|ENCRYPT-NEEDED|AUTH-TOO-WEAK|TRANSITION-NEEDED)\b")   # RFC 5804 §1.3


def refuses_credentials(kind: str, line: bytes, tag: bytes) -> bool:
    """Is ``line``, a refusal at a ``verdict`` step, a no to the login and
    password (IMAP ``TAG NO``, POP3 ``-ERR``, SMTP ``535``, ManageSieve
    ``NO``), rather than trouble of the backend's (a response code that
    says so, IMAP BAD, any other SMTP code)?"""
    if kind == "imap-tagged":
        rest = line[len(tag):] if line.startswith(tag) else b""
        return rest.startswith(b"NO ") and not IMAP_NOT_A_VERDICT.match(rest)
    if kind == "pop3-ok":
        return line.startswith(b"-ERR") and not POP3_NOT_A_VERDICT.match(line)
    if kind in SIEVE_REPLY_KINDS:
        return SIEVE_VERDICT.match(line) is not None and not SIEVE_NOT_A_VERDICT.match(line)
    return line[:3] == b"535"


def greeting_protocol(line: bytes) -> Optional[str]:
    """Which protocol a backend's first line belongs to, good or bad:
    "IMAP" (``* OK``, ``* BYE``...), "POP3" (``+OK``, ``-ERR``), "SMTP"
    (three digits), "ManageSieve" (a capability string, ``OK``, ``NO``,
    ``BYE``); None for anything else."""
    if line.startswith(b"* "):
        return "IMAP"
    if line.startswith((b"+OK", b"-ERR")):
        return "POP3"
    if re.match(rb"\d{3}[- \r\n]", line):
        return "SMTP"
    if line.startswith(b'"') or re.match(rb"(?i)(OK|NO|BYE)[ \r\n]", line):
        return "ManageSieve"
    return None


# -- the PROXY protocol (www.haproxy.org/download/2.9/doc/proxy-protocol.txt) --

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V1_MAX = 107                 # the spec's longest v1 line, CRLF included
PROXY_V1_ADDRESS = re.compile(rb"[0-9A-Fa-f:.]{2,45}")      # no scope id, nothing else
PROXY_V2_MAX = 4096                # a v2 header we accept at most (nginx reads a buffer)
PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_SSL = 0x01, 0x02, 0x20
PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN, PP2_SUBTYPE_SSL_CIPHER = 0x21, 0x22, 0x23
PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN = 0x01, 0x02


class ProxyTls(NamedTuple):
    """What a v2 header says of the client's TLS (nginx 1.31.4 sends these)."""
    version: str
    cipher: str
    server_name: Optional[str] = None      # SNI
    alpn: Optional[str] = None
    common_name: Optional[str] = None      # the client certificate's CN
    certificate: bool = False              # a verified client certificate


def ip_or_none(text: str):
    """An IP address, or None for "unix:" (a unix socket's peer or name)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def proxy_protocol_v1(source: Tuple[str, int], destination: Tuple[str, int]) -> bytes:
    """``PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n`` (spec §2.1); UNKNOWN if
    the families differ or one is a unix socket."""
    src, dst = ip_or_none(source[0]), ip_or_none(destination[0])
    if src is None or dst is None or src.version != dst.version:
        return b"PROXY UNKNOWN\r\n"
    family = b"TCP4" if src.version == 4 else b"TCP6"
    return b"PROXY %s %s %s %d %d\r\n" % (family, str(src).encode(), str(dst).encode(),
                                          source[1], destination[1])


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def proxy_protocol_v2(source: Tuple[str, int], destination: Tuple[str, int],
                      tls: Optional[ProxyTls] = None) -> bytes:
    """The binary header (spec §2.2): PROXY command over TCP4/TCP6 (LOCAL if
    the families differ or one is a unix socket), with ALPN, AUTHORITY and
    SSL TLVs for a TLS client."""
    src, dst = ip_or_none(source[0]), ip_or_none(destination[0])
    if src is None or dst is None or src.version != dst.version:
        return PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    if tls is not None:
        if tls.alpn:
            body += _tlv(PP2_TYPE_ALPN, tls.alpn.encode())
        if tls.server_name:
            body += _tlv(PP2_TYPE_AUTHORITY, tls.server_name.encode())
        client = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN if tls.certificate else 0)
        ssl_value = struct.pack("!BI", client, 0)
        ssl_value += _tlv(PP2_SUBTYPE_SSL_VERSION, tls.version.encode())
        if tls.common_name:
            ssl_value += _tlv(PP2_SUBTYPE_SSL_CN, tls.common_name.encode())
        ssl_value += _tlv(PP2_SUBTYPE_SSL_CIPHER, tls.cipher.encode())
        body += _tlv(PP2_TYPE_SSL, ssl_value)
    return PROXY_V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def proxy_header_to_backend(version: str, attempt: LoginAttempt,
                            destination: Tuple[str, int]) -> bytes:
    """proxy_protocol on|v2 (nginx 1.31), b"" when off: the client (after
    realip) and the address it connected to; v2 with the client's TLS
    facts and the CN of its verified certificate."""
    source = (attempt.client_address, attempt.client_port)
    if version == "off":
        return b""
    if version == "on":
        return proxy_protocol_v1(source, destination)
    facts, tls = None, attempt.tls
    if tls is not None:
        common_name = attempt.certificate.common_name if attempt.certificate is not None else None
        facts = ProxyTls(tls.version, tls.cipher, tls.server_name, tls.alpn,
                         common_name, common_name is not None)
    return proxy_protocol_v2(source, destination, facts)


class ProxyHeaderError(Exception):
    """A missing, malformed or oversized PROXY header: nginx closes silently."""


class ProxyHeader(NamedTuple):
    source: Optional[Tuple[str, int]]          # None: UNKNOWN or LOCAL
    destination: Optional[Tuple[str, int]]
    length: int                                # bytes the header took
    tlvs: Dict[int, bytes] = {}


def parse_proxy_header(data: bytes) -> Optional[ProxyHeader]:
    """A v1 or v2 header at the start of ``data``: a ProxyHeader, None if
    more bytes are needed, ProxyHeaderError if it cannot be one."""
    if data[:12] == PROXY_V2_SIGNATURE[:len(data)] and len(data) < 12:
        return None
    if data.startswith(PROXY_V2_SIGNATURE):
        return _parse_proxy_v2(data)
    if not b"PROXY "[:len(data)] == data[:6]:
        raise ProxyHeaderError("no PROXY header")
    end = data.find(b"\r\n", 0, PROXY_V1_MAX)
    if end < 0:
        if len(data) >= PROXY_V1_MAX:
            raise ProxyHeaderError("too long PROXY protocol header")
        return None
    fields = data[6:end].split(b" ")
    if fields[0] == b"UNKNOWN":
        return ProxyHeader(None, None, end + 2)
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("broken PROXY protocol header")
    if not all(PROXY_V1_ADDRESS.fullmatch(field) for field in fields[1:3]):
        raise ProxyHeaderError("broken PROXY protocol header")    # e.g. fe80::1%LF...
    try:
        version = 4 if fields[0] == b"TCP4" else 6
        src = ipaddress.ip_address(fields[1].decode("ascii"))
        dst = ipaddress.ip_address(fields[2].decode("ascii"))
        ports = [int(port) for port in fields[3:5]]
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("broken PROXY protocol header")
    if src.version != version or dst.version != version or \
            not all(0 <= port < 65536 and fields[3 + i] == str(port).encode()
                    for i, port in enumerate(ports)):
        raise ProxyHeaderError("broken PROXY protocol header")
    return ProxyHeader((str(src), ports[0]), (str(dst), ports[1]), end + 2)


class ProxyHeaderReader:
    """parse_proxy_header over bytes as they come, with linear work: a v2
    header (up to PROXY_V2_MAX) is parsed again only once as many bytes as
    it announced have come; a v1 line is at most PROXY_V1_MAX bytes.
    ``receive_data`` returns the ProxyHeader, None for more, or raises
    ProxyHeaderError; ``data`` is every byte received (the header's
    ``length`` first, then what the client sent behind it)."""

    def __init__(self):
        self.data = bytearray()
        self._wait = 0                 # bytes needed before parsing again

    def receive_data(self, data: bytes) -> Optional[ProxyHeader]:
        self.data += data
        if len(self.data) < self._wait:
            return None
        header = parse_proxy_header(bytes(self.data))
        if header is None and len(self.data) >= 16 and self.data.startswith(PROXY_V2_SIGNATURE):
            self._wait = 16 + struct.unpack("!H", self.data[14:16])[0]
        return header


def _parse_proxy_v2(data: bytes) -> Optional[ProxyHeader]:
    if len(data) < 16:
        return None
    version_command, family = data[12], data[13]
    length = struct.unpack("!H", data[14:16])[0]
    if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
        raise ProxyHeaderError("unknown PROXY protocol version or command")
    if 16 + length > PROXY_V2_MAX:
        raise ProxyHeaderError("too long PROXY protocol header")
    if len(data) < 16 + length:
        return None
    body = data[16:16 + length]
    sizes = {0x11: 12, 0x21: 36}
    if version_command & 0x0F == 0 or family not in sizes:
        return ProxyHeader(None, None, 16 + length)      # LOCAL, or a family we do not read
    size = sizes[family]
    if length < size:
        raise ProxyHeaderError("broken PROXY protocol header")
    width = 4 if family == 0x11 else 16
    src = ipaddress.ip_address(body[:width])
    dst = ipaddress.ip_address(body[width:2 * width])
    sport, dport = struct.unpack("!HH", body[2 * width:size])
    tlvs, offset = {}, size
    while offset + 3 <= length:
        kind, tlv_length = body[offset], struct.unpack("!H", body[offset + 1:offset + 3])[0]
        if offset + 3 + tlv_length > length:
            raise ProxyHeaderError("broken PROXY protocol TLV")
        tlvs[kind] = body[offset + 3:offset + 3 + tlv_length]
        offset += 3 + tlv_length
    return ProxyHeader((str(src), sport), (str(dst), dport), 16 + length, tlvs)


def real_ip_trusted(peer: str, trusted: List) -> bool:
    """set_real_ip_from: is the TCP peer allowed to tell the client address?"""
    if peer.startswith("unix:") or peer == "":
        return "unix:" in trusted
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(not isinstance(net, str) and address.version == net.version and address in net
               for net in trusted)


def believed_client(identity: ClientIdentity, peer: str,
                    trusted: List) -> Optional[Tuple[str, int]]:
    """trusted_networks: the client a trusted peer speaks for (IMAP ID
    ``x-originating-ip``, as Dovecot's login_trusted_networks), as (address,
    port); None from any other peer, or for a value that is no address."""
    if not real_ip_trusted(peer, trusted):
        return None
    try:
        address = str(ipaddress.ip_address(identity.address.decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return None
    port = int(identity.port) if re.fullmatch(rb"\d{1,5}", identity.port) else 0
    if port > 65535:
        port = 0
    return address, port


# ========================================================================== #
# ####                           DNS messages                           #### #
# ========================================================================== #
# What the resolver directive needs, sans-I/O: build a query (RFC 1035 §4),
# parse an answer safely (name compression, CNAME chains, truncation), and
# nothing more.  The Resolver in the streams section sends them over UDP.

DNS_A, DNS_CNAME, DNS_PTR, DNS_AAAA = 1, 5, 12, 28
DNS_NOERROR, DNS_SERVFAIL, DNS_NXDOMAIN = 0, 2, 3


class DnsError(Exception):
    """A malformed DNS message."""


class DnsAnswer(NamedTuple):
    rcode: int
    truncated: bool
    records: List[Tuple[str, int, int, object]]    # (name, type, ttl, value: None for a type not read)


def dns_query(qid: int, name: str, qtype: int) -> bytes:
    """A recursive query for ``name`` (RFC 1035 §4.1.1: RD set, one question)."""
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    return header + encode_dns_name(name) + struct.pack("!HH", qtype, 1)


def encode_dns_name(name: str) -> bytes:
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise DnsError("bad label in %r" % name)
        out += bytes([len(raw)]) + raw
    if len(out) > 254:
        raise DnsError("name too long: %r" % name)
    return bytes(out + b"\0")


def reverse_dns_name(address: str) -> str:
    """192.0.2.7 -> 7.2.0.192.in-addr.arpa; IPv6 -> nibbles under ip6.arpa."""
    return ipaddress.ip_address(address).reverse_pointer


def read_dns_name(data: bytes, offset: int, escape_dots: bool = False) -> Tuple[str, int]:
    """A possibly compressed name at ``offset`` -> (name, offset after it).

    Compression pointers must point backwards and are followed at most
    DNS_MAX_POINTERS times, so a loop or a pointer past the end is a
    DnsError, never a hang.  A dot inside a label is a DnsError too, or
    with ``escape_dots`` written ``\\.`` (and a backslash ``\\\\``), as
    in a master file (RFC 1035 §5.1): a name that no query can carry and
    valid_host_name refuses.
    """
    labels, end, jumps, length = [], None, 0, 0
    position = offset
    while True:
        if position >= len(data):
            raise DnsError("name runs past the end")
        size = data[position]
        if size & 0xC0 == 0xC0:
            if position + 1 >= len(data):
                raise DnsError("truncated pointer")
            target = ((size & 0x3F) << 8) | data[position + 1]
            jumps += 1
            if target >= position or jumps > DNS_MAX_POINTERS:
                raise DnsError("bad compression pointer")
            if end is None:
                end = position + 2
            position = target
            continue
        if size & 0xC0:
            raise DnsError("bad label type")
        if size == 0:
            break
        label = data[position + 1:position + 1 + size]
        if len(label) != size:
            raise DnsError("label runs past the end")
        if b"." in label and not escape_dots:
            raise DnsError("a dot inside a label")     # "a." + "b" would read as "a..b"
        length += size + 1
        if length > 255:
            raise DnsError("name too long")
        text = label.decode("latin-1")
        if escape_dots:
            text = text.replace("\\", "\\\\").replace(".", "\\.")
        labels.append(text)
        position += 1 + size
    return ".".join(labels), (end if end is not None else position + 1)


def parse_dns_answer(data: bytes, qid: int, name: str, qtype: int) -> Optional[DnsAnswer]:
    """Parse a response to our query; None if it answers another question
    (wrong ID, not a response, another name or type): ignore it.  Raises
    DnsError if it is malformed."""
    if len(data) < 12:
        raise DnsError("shorter than a header")
    rid, flags, qdcount, ancount, _, _ = struct.unpack("!HHHHHH", data[:12])
    if rid != qid or not flags & 0x8000 or qdcount != 1:
        return None
    qname, offset = read_dns_name(data, 12)
    if offset + 4 > len(data):
        raise DnsError("truncated question")
    rtype, rclass = struct.unpack("!HH", data[offset:offset + 4])
    if qname.lower() != name.lower().rstrip(".") or rtype != qtype or rclass != 1:
        return None
    offset += 4
    records = []
    for _ in range(ancount):
        rname, offset = read_dns_name(data, offset)
        if offset + 10 > len(data):
            raise DnsError("truncated record")
        rtype, rclass, ttl, rdlength = struct.unpack("!HHIH", data[offset:offset + 10])
        offset += 10
        if offset + rdlength > len(data):
            raise DnsError("record data runs past the end")
        value = _dns_record_value(data, offset, rtype, rdlength)
        if rclass == 1:                 # other types too (value None): see DnsLookup.datagram
            records.append((rname.lower(), rtype, ttl, value))
        offset += rdlength
    return DnsAnswer(flags & 0x000F, bool(flags & 0x0200), records)


def _dns_record_value(data: bytes, offset: int, rtype: int, length: int):
    if rtype == DNS_A:
        if length != 4:
            raise DnsError("A record of %d bytes" % length)
        return str(ipaddress.IPv4Address(data[offset:offset + 4]))
    if rtype == DNS_AAAA:
        if length != 16:
            raise DnsError("AAAA record of %d bytes" % length)
        return str(ipaddress.IPv6Address(data[offset:offset + 16]))
    if rtype in (DNS_CNAME, DNS_PTR):
        # A dot inside a label of the data is kept (escaped), not taken for
        # a malformed answer: that would be ignored, and the lookup would
        # wait out resolver_timeout for another, where nginx answers at once.
        name, end = read_dns_name(data, offset, escape_dots=True)
        if end > offset + length:
            raise DnsError("name runs past its record")
        return name
    return None                                   # other types: not ours


def dns_values(answer: DnsAnswer, name: str, qtype: int) -> Tuple[List, int]:
    """The values of type ``qtype`` for ``name``, following CNAMEs (at most
    DNS_MAX_CNAMES hops), and the smallest TTL met on the way."""
    values, ttls, _ = dns_chain(answer, name, qtype)
    return (values, min(ttls)) if values else ([], 0)


def dns_chain(answer: DnsAnswer, name: str, qtype: int) -> Tuple[List, List[int], List[str]]:
    """Follow ``name``'s CNAMEs in the answer (at most DNS_MAX_CNAMES hops)
    -> (the values of type ``qtype`` where the chain ends, the TTLs met,
    the names the chain went through after ``name``)."""
    current, ttls, aliases = name.lower().rstrip("."), [], []
    for _ in range(DNS_MAX_CNAMES + 1):
        values = [(value, ttl) for rname, rtype, ttl, value in answer.records
                  if rname == current and rtype == qtype]
        if values:
            return [value for value, _ in values], ttls + [ttl for _, ttl in values], aliases
        targets = [(value, ttl) for rname, rtype, ttl, value in answer.records
                   if rname == current and rtype == DNS_CNAME]
        if not targets:
            break
        current = targets[0][0].lower()
        ttls.append(targets[0][1])
        aliases.append(current)
    return [], ttls, aliases


# ========================================================================== #
# ####                            TLS layer                             #### #
# ========================================================================== #
# TLS as a byte transform: TlsLayer wraps ssl.SSLObject between two
# MemoryBIOs, so a stream feeds it ciphertext and gets plaintext back, queues
# plaintext and collects ciphertext, and never sees an SSL exception: the
# loop stays the same with or without TLS, and STARTTLS is a change of data
# (asyncio's sslproto does the same).  Also here: nginx's ALPN rule, read
# from the ClientHello; the facts of a client certificate; and the contexts
# built from the ssl directives.  Nothing in this section touches a socket.

class TlsError(Exception):
    """The TLS connection failed; the message says how, for the log."""


class TlsState(enum.Enum):
    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSED = "closed"


TLS_ALERT_NO_APPLICATION_PROTOCOL = b"\x15\x03\x03\x00\x02\x02\x78"   # RFC 7301 §3.2
TLS_ALERT_HANDSHAKE_FAILURE = b"\x15\x03\x03\x00\x02\x02\x28"          # RFC 8446 §6.2
# The most ClientHello held back to read its ALPN: one TLS record and more
# (RFC 8446 §5.1 allows 2**14 + 2048 bytes of it per record).  Browsers and
# mail clients send 0.5-2 KB, with post-quantum key shares.
TLS_HELLO_MAX = 5 + 16384 + 2048


class HandshakeReader:
    """Gathers the first TLS handshake message from records as they come
    (RFC 8446 §5.1 lets a ClientHello span several), looking at each byte
    once however the records are split.  ``feed(data)`` returns None while
    the message is incomplete, the message once whole, or b"" if the bytes
    are not TLS handshake records; ``held`` is every byte fed."""

    def __init__(self):
        self.held = bytearray()
        self._next = 0                # where the next record header starts in held
        self._message = bytearray()

    def feed(self, data: bytes) -> Optional[bytes]:
        self.held += data
        message = self._message
        while True:
            if len(message) >= 4 and len(message) >= 4 + int.from_bytes(message[1:4], "big"):
                return bytes(message)
            start = self._next
            if start + 5 > len(self.held):
                return None
            if self.held[start] != 22 or self.held[start + 1] != 3:
                return b""
            size = int.from_bytes(self.held[start + 3:start + 5], "big")
            if start + 5 + size > len(self.held):
                return None
            message += self.held[start + 5:start + 5 + size]
            self._next = start + 5 + size


def handshake_message(data: bytes) -> Optional[bytes]:
    """The first handshake message of ``data`` (see HandshakeReader)."""
    return HandshakeReader().feed(data)


def client_hello_alpn(data: bytes) -> Optional[List[bytes]]:
    """The ALPN protocols a TLS ClientHello offers (RFC 7301), or None if it
    offers none or the bytes are not a whole ClientHello we can read."""
    return offered_alpn(handshake_message(data))


def offered_alpn(body: Optional[bytes]) -> Optional[List[bytes]]:
    """client_hello_alpn of a handshake message (no record headers)."""
    if not body or len(body) < 4 or body[0] != 1:
        return None
    position = 4 + 2 + 32                                  # header, version, random
    try:
        position += 1 + body[position]                     # session id
        position += 2 + int.from_bytes(body[position:position + 2], "big")   # cipher suites
        position += 1 + body[position]                     # compression methods
        end = position + 2 + int.from_bytes(body[position:position + 2], "big")
        position += 2
        while position + 4 <= min(end, len(body)):
            kind = int.from_bytes(body[position:position + 2], "big")
            size = int.from_bytes(body[position + 2:position + 4], "big")
            data = body[position + 4:position + 4 + size]
            if kind == 16:                                 # application_layer_protocol_negotiation
                names, offset = [], 2
                while offset < len(data):
                    names.append(data[offset + 1:offset + 1 + data[offset]])
                    offset += 1 + data[offset]
                return names
            position += 4 + size
    except IndexError:
        return None
    return None


class TlsFacts(NamedTuple):
    """What a TLS handshake settled, for auth_http and the PROXY v2 header."""
    version: str                   # "TLSv1.3"
    cipher: str                    # "TLS_AES_256_GCM_SHA384"
    server_name: Optional[str]     # what the client asked for (SNI)
    alpn: Optional[str]            # the protocol chosen


class TlsLayer:
    """One TLS connection as a byte transform (sans-I/O).

    receive_data(ciphertext) -> plaintext (b"" is the transport's EOF);
    send(plaintext) queues it (before the handshake ends, it waits);
    data_to_send() -> ciphertext.  ``just_opened`` is True once, after the
    handshake.  Errors raise TlsError and leave the layer CLOSED.
    ``alpn`` (server side): nginx's rule, a client offering ALPN without this
    protocol gets a fatal no_application_protocol alert.
    """

    def __init__(self, context: ssl.SSLContext, server_side: bool,
                 server_hostname: Optional[str] = None, alpn: Optional[str] = None):
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.object = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                       server_hostname=server_hostname)
        self.state = TlsState.HANDSHAKING
        self.just_opened = False
        self._queued = bytearray()
        self._raw = bytearray()               # our own bytes (an alert) before OpenSSL's
        self._hello = HandshakeReader() if (server_side and alpn) else None
        self._alpn = alpn.encode() if alpn else b""
        if not server_side:
            self._handshake()                 # the client speaks first

    def data_to_send(self) -> bytes:
        data = bytes(self._raw) + self._outgoing.read()
        del self._raw[:]
        return data

    def send(self, plaintext: bytes) -> None:
        if self.state == TlsState.HANDSHAKING:
            self._queued += plaintext
        elif self.state == TlsState.OPEN:
            view = memoryview(plaintext)
            try:
                while view:
                    written = self.object.write(view)
                    view = view[written:]
            except ssl.SSLError as error:
                self.state = TlsState.CLOSED
                raise TlsError(describe_tls_error(error))

    def encrypt(self, plaintext) -> bytes:
        """send(plaintext), then data_to_send(), in one step: the relay's
        (TlsFlow), once the handshake is over.  ``plaintext``: bytes or a
        memoryview.  A closed layer sends nothing, as send()."""
        if self.state != TlsState.OPEN or self._raw:
            self.send(bytes(plaintext))
            return self.data_to_send()
        try:
            written = self.object.write(plaintext)
            while written < len(plaintext):        # (to a memory BIO, SSL_write writes all)
                plaintext = memoryview(plaintext)[written:]
                written = self.object.write(plaintext)
        except ssl.SSLError as error:
            self.state = TlsState.CLOSED
            raise TlsError(describe_tls_error(error))
        return self._outgoing.read()

    def receive_data(self, ciphertext: bytes) -> bytes:
        if self.state == TlsState.CLOSED:
            return b""
        if self._hello is not None and ciphertext:
            ciphertext = self._check_alpn(ciphertext)
            if not ciphertext:
                return b""
        if ciphertext:
            self._incoming.write(ciphertext)
        else:
            self._incoming.write_eof()
        if self.state == TlsState.HANDSHAKING and not self._handshake():
            return b""
        return self._read_all()

    def _check_alpn(self, data: bytes) -> bytes:
        """Hold back the first bytes until the ClientHello is whole (over
        one record or several), then look at its ALPN.  Bytes that are not
        TLS go to OpenSSL at once, which refuses them.  A ClientHello larger
        than TLS_HELLO_MAX is refused: its ALPN could not be read."""
        hello = self._hello.feed(data)
        if hello is None:
            if len(self._hello.held) < TLS_HELLO_MAX:
                return b""
            self.state = TlsState.CLOSED
            self._raw += TLS_ALERT_HANDSHAKE_FAILURE
            raise TlsError("client sent a ClientHello over %d bytes" % TLS_HELLO_MAX)
        held, self._hello = bytes(self._hello.held), None
        offered = offered_alpn(hello)
        if offered is not None and self._alpn not in offered:
            self.state = TlsState.CLOSED
            self._raw += TLS_ALERT_NO_APPLICATION_PROTOCOL
            raise TlsError("client offered ALPN %s without \"%s\"" % (
                log_escape(b",".join(offered)), self._alpn.decode()))
        return held

    def _handshake(self) -> bool:
        try:
            self.object.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except (ssl.SSLError, OSError, ValueError) as error:
            self.state = TlsState.CLOSED
            raise TlsError(describe_tls_error(error))
        self.state = TlsState.OPEN
        self.just_opened = True
        queued, self._queued = bytes(self._queued), bytearray()
        self.send(queued)
        return True

    def _read_all(self) -> bytes:
        """The plaintext of every record the ciphertext fed so far completes.
        Reading stops when OpenSSL asks for more (SSLWantReadError), or
        sooner, without that exception, once the incoming BIO is empty,
        with no end to report, and OpenSSL holds no plaintext (pending):
        the usual case, a read that ends with a record.  (This holds while
        OpenSSL reads no records ahead of what it decrypts, which
        SSL_pending would not count: Python never sets read_ahead.)"""
        chunks = []
        incoming = self._incoming
        while True:
            try:
                chunk = self.object.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.state = TlsState.CLOSED
                break
            except ssl.SSLError as error:
                self.state = TlsState.CLOSED
                raise TlsError(describe_tls_error(error))
            if not chunk:
                self.state = TlsState.CLOSED
                break
            chunks.append(chunk)
            if not incoming.pending and not incoming.eof and not self.object.pending():
                break
        return b"".join(chunks)

    def facts(self) -> "TlsFacts":
        """What the handshake settled (empty before it has)."""
        tls = self.object
        return TlsFacts(tls.version() or "", (tls.cipher() or ("",))[0],
                        getattr(tls, "requested_name", None), tls.selected_alpn_protocol())

    def peer_certificate(self) -> "CertificateFacts":
        """The peer's certificate, read so that none can raise (certificate_facts)."""
        return certificate_facts(self.object)

    def close(self) -> None:
        """Send close_notify (RFC 8446 §6.1) if the connection is open."""
        if self.state == TlsState.OPEN:
            try:
                self.object.unwrap()
            except ssl.SSLError:
                pass
        self.state = TlsState.CLOSED


def describe_tls_error(error: Exception) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return "certificate verify error: (%s:%s)" % (error.verify_code, error.verify_message)
    if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        # Python 3.8 reports an end during the handshake as a zero return.
        return "peer closed connection in SSL handshake"
    reason = getattr(error, "reason", None)
    return "SSL handshake failed (%s)" % (reason or error)


# -- client certificates ------------------------------------------------------
# nginx sends the subject and issuer as OpenSSL's X509_NAME_print_ex(...,
# XN_FLAG_RFC2253) prints them, and the serial as i2a_ASN1_INTEGER does.  The
# ssl module gives neither (getpeercert() loses each value's type, which
# decides the printing), so they are printed here from the certificate's DER.

def der_element(data: bytes, offset: int) -> Tuple[int, bytes, int]:
    """The DER element at ``offset``: (its tag byte, its content, the offset
    after it).  Raises ValueError if it runs past the end of ``data``."""
    if offset + 2 > len(data):
        raise ValueError("DER element cut short")
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or offset + count > len(data):
            raise ValueError("DER length not understood")
        length = int.from_bytes(data[offset:offset + count], "big")
        offset += count
    if offset + length > len(data):
        raise ValueError("DER element cut short")
    return tag, data[offset:offset + length], offset + length


def der_encoding(tag: int, content: bytes) -> bytes:
    """Tag, DER length and content: what OpenSSL's i2d_ASN1_TYPE writes."""
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def certificate_fields(der: bytes) -> Tuple[bytes, bytes, bytes]:
    """(serial number content, issuer Name DER, subject Name DER) of a DER
    certificate (RFC 5280 §4.1).  Raises ValueError if it is not one."""
    tag, certificate, _ = der_element(der, 0)
    tag_tbs, tbs, _ = der_element(certificate, 0)
    offset = 0
    if tbs[:1] == b"\xa0":                                  # [0] version
        offset = der_element(tbs, 0)[2]
    fields = []
    for wanted in (0x02, 0x30, 0x30, 0x30, 0x30):       # serial, signature, issuer, validity, subject
        start = offset
        tag_field, content, offset = der_element(tbs, offset)
        if tag_field != wanted:
            raise ValueError("not a certificate")
        fields.append(content if wanted == 0x02 else tbs[start:offset])
    if tag != 0x30 or tag_tbs != 0x30:
        raise ValueError("not a certificate")
    return fields[0], fields[2], fields[4]


def serial_text(content: bytes) -> str:
    """An INTEGER's content as OpenSSL's i2a_ASN1_INTEGER prints it (nginx's
    Auth-SSL-Serial): "-" if negative, then the magnitude's bytes in upper-
    case hex ("00" for zero), and, as OpenSSL does, a backslash and a line
    feed after each 35 bytes (auth_http_header turns the LF into %0A)."""
    value = int.from_bytes(content, "big", signed=True)
    magnitude = abs(value)
    data = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "big") or b"\0"
    chunks = [data[index:index + 35].hex().upper() for index in range(0, len(data), 35)]
    return ("-" if value < 0 else "") + "\\\n".join(chunks)


def oid_text(content: bytes) -> str:
    """An OBJECT IDENTIFIER's content in dotted form ("2.5.4.3"), as
    OpenSSL's OBJ_obj2txt(..., 1).  Raises ValueError if it is cut short."""
    arcs, value = [], 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs or content[-1] & 0x80:
        raise ValueError("OBJECT IDENTIFIER cut short")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first] + arcs[1:])


# OpenSSL's short names (OBJ_nid2sn) of the attribute types names mostly
# hold, for a Python whose ssl module cannot ask OpenSSL (ssl._txt2obj is
# CPython's, since 3.4).
DN_SHORT_NAMES = {"2.5.4.3": "CN", "2.5.4.4": "SN", "2.5.4.5": "serialNumber", "2.5.4.6": "C",
                  "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.9": "street", "2.5.4.10": "O",
                  "2.5.4.11": "OU", "2.5.4.12": "title", "2.5.4.42": "GN", "2.5.4.46": "dnQualifier",
                  "1.2.840.113549.1.9.1": "emailAddress", "0.9.2342.19200300.100.1.1": "UID",
                  "0.9.2342.19200300.100.1.25": "DC"}
# a_strex.c's tag2nbyte: the string types OpenSSL prints as text, by tag, and
# the bytes of one character (0: UTF-8).  Any other type is dumped in hex.
RFC2253_STRING_WIDTHS = {12: 0, 18: 1, 19: 1, 20: 1, 22: 1, 23: 1, 24: 1, 26: 1, 28: 4, 30: 2}
RFC2253_SPECIALS = b',+"\\<>;'          # RFC 2253 §2.4; charmap.pl's RFC2253_ESC


def rfc2253_name(der_name: bytes) -> str:
    """A DER Name (a certificate's subject or issuer) as nginx sends it in
    Auth-SSL-Subject and -Issuer, X509_NAME_print_ex(..., XN_FLAG_RFC2253):
    the attributes last first, "," between RDNs and "+" between the values
    of one, each SHORTNAME=value (rfc2253_value); a type OpenSSL does not
    know as its dotted OID and "#" with the value's DER in hex
    (XN_FLAG_DUMP_UNKNOWN_FIELDS).  Raises ValueError for what is no Name."""
    out, previous = [], None
    for rdn, oid, tag, content in reversed(name_attributes(der_name)):
        if previous is not None:
            out.append("+" if rdn == previous else ",")
        previous = rdn
        short_name = attribute_short_name(oid)
        if short_name is None:
            out.append("%s=#%s" % (oid, der_encoding(tag, content).hex().upper()))
        else:
            out.append("%s=%s" % (short_name, rfc2253_value(tag, content)))
    return "".join(out)


def name_attributes(der_name: bytes) -> List[Tuple[int, str, int, bytes]]:
    """The attributes of a DER Name, in order: (number of their RDN, type
    OID, value tag, value content).  Raises ValueError for what is no Name."""
    tag, rdns, end = der_element(der_name, 0)
    if tag != 0x30 or end != len(der_name):
        raise ValueError("not a Name")
    attributes, offset, number = [], 0, 0
    while offset < len(rdns):
        tag, rdn, offset = der_element(rdns, offset)
        inner = 0
        while tag == 0x31 and inner < len(rdn):
            pair_tag, pair, inner = der_element(rdn, inner)
            oid_tag, oid, after = der_element(pair, 0)
            value_tag, value, after = der_element(pair, after)
            if pair_tag != 0x30 or oid_tag != 0x06 or after != len(pair):
                raise ValueError("not a Name")
            attributes.append((number, oid_text(oid), value_tag, value))
        if tag != 0x31:
            raise ValueError("not a Name")
        number += 1
    return attributes


def attribute_short_name(oid: str) -> Optional[str]:
    """OpenSSL's short name of an attribute type; None if it knows none."""
    lookup = getattr(ssl, "_txt2obj", None)
    if lookup is None:
        return DN_SHORT_NAMES.get(oid)
    try:
        return lookup(oid)[1]            # (nid, short name, long name, oid)
    except ValueError:                   # "unknown object"
        return None


def rfc2253_value(tag: int, content: bytes) -> str:
    """One value as a_strex.c's do_print_ex prints it with XN_FLAG_RFC2253:
    a string type as UTF-8 (the characters of 8-bit, BMP and Universal
    strings converted; UTF8_putc writes nothing for a surrogate or a code
    point past U+10FFFF), escaped by rfc2253_escape; any other type as "#"
    and its DER in hex (ASN1_STRFLGS_DUMP_UNKNOWN, _DUMP_DER).  Raises
    ValueError for a BMP or Universal string cut inside a character (OpenSSL
    cannot print it: nginx fails the login)."""
    width = RFC2253_STRING_WIDTHS.get(tag)
    if width is None:
        return "#" + der_encoding(tag, content).hex().upper()
    if width == 0:
        return rfc2253_escape(content)   # UTF8String: its bytes as they are
    if len(content) % width:
        raise ValueError("a string of %d bytes with characters of %d" % (len(content), width))
    text = bytearray()
    for index in range(0, len(content), width):
        code = int.from_bytes(content[index:index + width], "big")
        if code < 0xD800 or 0xDFFF < code < 0x110000:
            text += chr(code).encode("utf-8")
    return rfc2253_escape(bytes(text))


def rfc2253_escape(data: bytes) -> str:
    r"""do_esc_char with ASN1_STRFLGS_RFC2253, byte by byte: the specials
    , + " \ < > ; with a backslash, and so "#" or a space first and a space
    last (RFC 2253 §2.4; OpenSSL counts the only byte of a one-byte value as
    last, not first); control bytes and DEL (ASN1_STRFLGS_ESC_CTRL) and
    8-bit bytes (ESC_MSB) as \XX in upper-case hex.  No CR, LF or NUL stays."""
    out = []
    last = len(data) - 1
    for index, byte in enumerate(data):
        first = index == 0 and last > 0
        if byte in RFC2253_SPECIALS or (first and byte in b"# ") or (index == last and byte == 0x20):
            out.append("\\" + chr(byte))
        elif byte < 0x20 or byte >= 0x7F:
            out.append("\\%02X" % byte)
        else:
            out.append(chr(byte))
    return "".join(out)


class CertificateFacts(NamedTuple):
    """What a client certificate tells (auth_http sends them as Auth-SSL-*)."""
    verify: str                # "SUCCESS", "FAILED:reason" or "NONE", as nginx's Auth-SSL-Verify
    subject: str = ""          # RFC 2253, as nginx (rfc2253_name)
    issuer: str = ""
    serial: str = ""           # as nginx (serial_text)
    fingerprint: str = ""      # SHA-1 of the DER, hex, as nginx
    identities: Tuple = ()     # the subject's CN and emailAddress values, and email SANs
    common_name: Optional[str] = None    # the subject's first CN (PROXY v2's CN TLV)
    der: bytes = b""           # the certificate (Auth-SSL-Cert)
    problem: str = ""          # why a certificate that was sent reads as none
    verify_code: int = 0       # OpenSSL's X509_V_ERR_* when verify is FAILED

    def __repr__(self) -> str:
        return "CertificateFacts(%r, subject=%r, problem=%r)" % (self.verify, self.subject, self.problem)


def certificate_facts(tls_object) -> CertificateFacts:
    """The facts of the peer's certificate, read so that no certificate can
    make this raise (sessions read certificates through it alone).  verify:
    "NONE" without a certificate, "SUCCESS" with one that verified,
    "FAILED:reason" with one that did not (libssl let the handshake
    complete: LibSsl.verify_to_the_end; without libssl such a certificate
    has ended the handshake).  A certificate that cannot be read counts as
    none, with ``problem`` saying why, for the log, unless it also failed
    verification.  getpeercert(), which gives the identities, raises for
    a name value it cannot turn into text, such as a CN that is an
    ObjectDescriptor, which OpenSSL verifies and nginx prints (CN=#07...)."""
    try:
        der = tls_object.getpeercert(binary_form=True)
    except (OSError, ValueError) as error:          # ssl.SSLError is an OSError
        return CertificateFacts("NONE", problem=str(error) or type(error).__name__)
    if der is None:
        return CertificateFacts("NONE")
    libssl = LibSsl.probe()
    code, reason = libssl.verify_result(tls_object) if libssl.available else (0, "")
    try:
        facts = _read_certificate(der, tls_object.getpeercert() or {})
    except (OSError, ValueError) as error:
        facts = CertificateFacts("NONE", problem=str(error) or type(error).__name__)
    if code:
        facts = facts._replace(verify="FAILED:" + reason, verify_code=code)
    return facts


# ngx_ssl_verify_error_optional: what optional_no_ca lets through to auth_http
# (X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT, _SELF_SIGNED_CERT_IN_CHAIN,
# _UNABLE_TO_GET_ISSUER_CERT_LOCALLY, _UNABLE_TO_VERIFY_LEAF_SIGNATURE,
# _CERT_UNTRUSTED): an issuer unknown here, not a certificate that is
# expired, revoked or badly signed.
OPTIONAL_VERIFY_ERRORS = frozenset((18, 19, 20, 21, 27))


def certificate_verdict(verify_client: str, facts: CertificateFacts) -> Tuple[str, str]:
    """ssl_verify_client after the handshake, as nginx's ngx_mail_verify_cert:
    (what to log, "" for nothing; why the client is refused, "" if it is
    not).  A certificate that failed verification is refused with the
    protocol's "SSL certificate error", except, with optional_no_ca, for an
    unknown issuer (auth_http then sees Auth-SSL-Verify: FAILED:reason);
    with ``on``, no certificate gets "No required SSL certificate".  One
    that cannot be read counts as none, so ``optional`` goes on without it."""
    if facts.verify_code and not (verify_client == "optional_no_ca" and
                                  facts.verify_code in OPTIONAL_VERIFY_ERRORS):
        return ("client SSL certificate verify error: (%d:%s)"
                % (facts.verify_code, facts.verify[len("FAILED:"):]), "certificate error")
    message = ""
    if facts.problem:
        message = "client SSL certificate cannot be read (%s)" % log_escape(facts.problem.encode("utf-8"))
    if verify_client == "on" and facts.verify == "NONE":
        return message or "client sent no required SSL certificate", "no client certificate"
    return message, ""


def _read_certificate(der: bytes, info: Dict) -> CertificateFacts:
    serial, issuer, subject = certificate_fields(der)
    subject_values = [(key, value) for rdn in info.get("subject", ()) for key, value in rdn]
    common_names = [value for key, value in subject_values if key == "commonName"]
    identities = [value for key, value in subject_values if key in ("commonName", "emailAddress")]
    identities += [value for kind, value in info.get("subjectAltName", ()) if kind == "email"]
    return CertificateFacts("SUCCESS", rfc2253_name(subject), rfc2253_name(issuer),
                            serial_text(serial), hashlib.sha1(der).hexdigest(), tuple(identities),
                            common_names[0] if common_names else None, der)


# -- contexts from the directives ---------------------------------------------

def apply_protocols(context: ssl.SSLContext, protocols: List[str]) -> None:
    protocols = [name for name in protocols if name in TLS_VERSIONS]   # not SSLv2, SSLv3
    with warnings.catch_warnings():
        # Python 3.10+ calls TLSv1 and TLSv1.1 deprecated, on stderr: the
        # user wrote them (nginx's admin guide and puppet-nginx do), and
        # gets what nginx on the same OpenSSL gives, without the noise.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = TLS_VERSIONS[protocols[0]]
        context.maximum_version = TLS_VERSIONS[protocols[-1]]


def permission_hint(path: str) -> str:
    """What to do about EACCES on ``path``: the user this process runs as,
    and the file's owner and mode when they can be read."""
    try:
        import pwd
        user = pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError, AttributeError):
        return ""
    try:
        info = os.stat(path)
        owner = pwd.getpwuid(info.st_uid).pw_name
    except (OSError, KeyError):
        return ' (read as user "%s": check the modes of the file and its directories)' % user
    return (' (read as user "%s", the file is "%s"\'s with mode %04o: let "%s" read it, '
            'or start mailproxy as root)' % (user, owner, stat.S_IMODE(info.st_mode), user))


def check_readable(path: str, what: str, directive: str) -> None:
    """``cannot load WHAT "PATH": REASON`` (nginx's words) if the file cannot
    be opened, blaming ``directive``: OpenSSL's error would not say which of
    a certificate and its key is missing or unreadable."""
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        hint = permission_hint(path) if error.errno == errno.EACCES else ""
        raise ConfigValueError('cannot load %s "%s": %s%s' % (what, path, error.strerror, hint),
                               directive)


def check_certificate_file(path: str, directive: str) -> None:
    """The file opens and holds a PEM certificate OpenSSL reads."""
    check_readable(path, "certificate", directive)
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        scratch.load_verify_locations(cafile=path)
        if scratch.cert_store_stats()["x509"]:
            return
        reason = "no certificate found"
    except ssl.SSLError as error:
        reason = error.reason or str(error)
    raise ConfigValueError('cannot load certificate "%s": no PEM certificate OpenSSL can read '
                           '(%s)' % (path, reason), directive)


class EncryptedKey(Exception):
    """A key needs a pass phrase and ssl_password_file gives none."""


def no_pass_phrase() -> bytes:
    """The password callback without ssl_password_file.  Without one,
    OpenSSL would ask for the pass phrase on the terminal: a start-up that
    hangs under systemd, or a prompt per server on the operator's."""
    raise EncryptedKey()


def load_certificates(context: ssl.SSLContext, pairs: List[Tuple[str, str]],
                      passwords: List[bytes],
                      directives: Tuple[str, str] = ("ssl_certificate", "ssl_certificate_key")) -> None:
    """Each certificate with its key; an encrypted key is tried with each
    line of ssl_password_file in turn, as nginx.  A problem raises
    ConfigValueError naming the file at fault and its directive out of
    ``directives`` (certificate's, key's): the certificate is checked on
    its own first, so a key that does not load is never blamed on it."""
    for certificate, key in pairs:
        check_certificate_file(certificate, directives[0])
        check_readable(key, "certificate key", directives[1])
        for password in passwords or [no_pass_phrase]:
            try:
                context.load_cert_chain(certificate, key, password=password)
                break
            except EncryptedKey:
                raise ConfigValueError('cannot load certificate key "%s": it is encrypted; give '
                                       'its pass phrase in ssl_password_file' % key, directives[1])
            except ssl.SSLError as error:
                failure = error
            except OSError as error:
                raise ConfigValueError('cannot load certificate "%s": %s' % (certificate, error.strerror),
                                       directives[0])
        else:
            reason = getattr(failure, "reason", None) or str(failure)
            if reason == "KEY_VALUES_MISMATCH":
                # nginx: SSL_CTX_use_PrivateKey("KEY") failed (... key values mismatch)
                raise ConfigValueError('certificate key "%s" does not match certificate "%s" '
                                       '(key values mismatch)' % (key, certificate), directives[1])
            raise ConfigValueError('cannot load certificate key "%s": no PEM private key OpenSSL '
                                   'can read%s (%s)' % (key, " with ssl_password_file" if passwords
                                                        else "", reason), directives[1])


class LibSsl:
    """What Python's ssl module has no API for, asked of the very libssl
    that its _ssl extension loaded (through ctypes, on _ssl's own handle:
    never another copy of OpenSSL found on the system), for exactly these
    calls: SSL_CTX_set_timeout, the session cache's mode and size, the
    session ticket keys, the verify depth, a curve list, and for
    ssl_verify_client a verify callback and the verification's result.
    Used only if ``LibSsl.probe()`` found the handle right: the version
    libssl reports is the one the ssl module reports, what libssl reads
    back from a context (its options, verify mode, cache mode) is what the
    ssl module set on it, and a connection's SSL pointer leads back to its
    context.  Otherwise ``reason`` says why, and -t warns of each
    directive that then cannot be honoured exactly."""

    SET_SESS_CACHE_SIZE, GET_SESS_CACHE_SIZE = 42, 43
    SET_SESS_CACHE_MODE, GET_SESS_CACHE_MODE = 44, 45
    GET_TLSEXT_TICKET_KEYS, SET_TLSEXT_TICKET_KEYS = 58, 59
    SET_GROUPS_LIST = 92
    CACHE_OFF, CACHE_SERVER = 0x0, 0x2
    CACHE_NO_AUTO_CLEAR, CACHE_NO_INTERNAL_STORE = 0x80, 0x200

    _probed: Optional["LibSsl"] = None

    def __init__(self) -> None:
        self.lib = None
        self.reason = ""

    @classmethod
    def probe(cls) -> "LibSsl":
        """The one LibSsl of this process (probed once)."""
        if cls._probed is None:
            found = cls()
            try:
                found.reason = found._trial() or found._attach()
            except (OSError, AttributeError, ValueError, TypeError) as error:
                found.reason = "libssl cannot be reached through ctypes (%s)" % error
            if found.reason:
                found.lib = None
            cls._probed = found
        return cls._probed

    @property
    def available(self) -> bool:
        return self.lib is not None

    def _trial(self) -> str:
        """The check first in a child process, so that a handle that is not
        what this program takes it for can crash only that child: "" if
        the child found the handle right, else why it is not used."""
        if not hasattr(os, "fork"):
            return ""
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if not self._attach() else 3)
            except BaseException:
                os._exit(4)
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "checking libssl's handle did not finish in a child process"
            time.sleep(0.005)
        if os.WIFSIGNALED(status):
            return ("checking libssl's handle killed a child process (signal %d): the ssl module's "
                    "context is not laid out as this program knows" % os.WTERMSIG(status))
        return ""                      # 0; or 3, 4: the check in this process says why, safely

    def _attach(self) -> str:
        import _ssl
        if ctypes is None:
            return "this Python has no ctypes"
        if sys.implementation.name != "cpython":
            return "not CPython (%s)" % sys.implementation.name
        if not issubclass(ssl.SSLContext, _ssl._SSLContext) or \
                _ssl._SSLContext.__basicsize__ < object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p):
            return "the ssl module's context is not laid out as this program knows"
        lib = ctypes.CDLL(_ssl.__file__)
        pointer, long_ = ctypes.c_void_p, ctypes.c_long
        for name, restype, argtypes in (
                ("OpenSSL_version_num", ctypes.c_ulong, []),
                ("SSL_CTX_get_options", ctypes.c_uint64 if ssl.OPENSSL_VERSION_INFO >= (3,) else
                 ctypes.c_ulong, [pointer]),
                ("SSL_CTX_get_verify_mode", ctypes.c_int, [pointer]),
                ("SSL_CTX_ctrl", long_, [pointer, ctypes.c_int, long_, pointer]),
                ("SSL_CTX_set_timeout", long_, [pointer, long_]),
                ("SSL_CTX_get_timeout", long_, [pointer]),
                ("SSL_CTX_set_verify_depth", None, [pointer, ctypes.c_int]),
                ("SSL_CTX_get_verify_depth", ctypes.c_int, [pointer]),
                ("SSL_CTX_set_verify", None, [pointer, ctypes.c_int, self.VERIFY_CALLBACK]),
                ("SSL_get_SSL_CTX", pointer, [pointer]),
                ("SSL_get_verify_result", long_, [pointer]),
                ("SSL_get_session", pointer, [pointer]),
                ("SSL_CTX_remove_session", ctypes.c_int, [pointer, pointer]),
                ("X509_verify_cert_error_string", ctypes.c_char_p, [long_])):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
            return ("the libssl reached (%#x) is not the ssl module's (%#x)"
                    % (lib.OpenSSL_version_num(), ssl.OPENSSL_VERSION_NUMBER))
        self.lib = lib
        for verify_mode in (ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.options |= ssl.OP_NO_TICKET if verify_mode == ssl.CERT_OPTIONAL else \
                ssl.OP_CIPHER_SERVER_PREFERENCE
            context.verify_mode = verify_mode
            handle = self.handle(context)
            if not handle or lib.SSL_CTX_get_options(handle) != context.options or \
                    lib.SSL_CTX_get_verify_mode(handle) != (1 if verify_mode == ssl.CERT_OPTIONAL else 3) or \
                    lib.SSL_CTX_ctrl(handle, self.GET_SESS_CACHE_MODE, 0, None) != self.CACHE_SERVER:
                return "what libssl reads back from a context is not what the ssl module set"
            # A connection's SSL pointer must lead back to its context.
            connection = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
            if not self.connection_handle(connection) or \
                    lib.SSL_get_SSL_CTX(self.connection_handle(connection)) != handle:
                return "what libssl reads back from a connection is not the ssl module's context"
        return ""

    @staticmethod
    def handle(context: ssl.SSLContext) -> int:
        """The SSL_CTX pointer: the first field after the object's header."""
        return ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value or 0

    @staticmethod
    def connection_handle(connection: ssl.SSLObject) -> int:
        """The SSL pointer of a connection: in the _ssl object behind an
        SSLObject, the field after the object's header and its socket's
        weak reference."""
        inner = getattr(connection, "_sslobj", None)
        if inner is None or type(inner).__basicsize__ < object.__basicsize__ + \
                3 * ctypes.sizeof(ctypes.c_void_p):
            return 0
        address = id(inner) + object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)
        return ctypes.c_void_p.from_address(address).value or 0

    def ctrl(self, context: ssl.SSLContext, command: int, larg: int, parg=None) -> int:
        return self.lib.SSL_CTX_ctrl(self.handle(context), command, larg, parg)

    def set_timeout(self, context: ssl.SSLContext, seconds: float) -> None:
        self.lib.SSL_CTX_set_timeout(self.handle(context), max(1, int(seconds)))

    def timeout(self, context: ssl.SSLContext) -> int:
        return self.lib.SSL_CTX_get_timeout(self.handle(context))

    def set_session_cache(self, context: ssl.SSLContext, cache: SessionCache) -> None:
        """As ngx_ssl_session_cache: "off" says no reuse; "none" pretends to
        support it and stores nothing (for Outlook Express); "builtin[:N]"
        is OpenSSL's cache of N sessions; a shared cache alone is, here,
        the built-in cache of the same capacity (SHARED_SESSIONS_PER_MB)."""
        if cache.builtin == "off":
            self.ctrl(context, self.SET_SESS_CACHE_MODE, self.CACHE_OFF)
        elif cache.builtin == "none":
            self.ctrl(context, self.SET_SESS_CACHE_MODE, self.CACHE_SERVER | self.CACHE_NO_AUTO_CLEAR |
                      self.CACHE_NO_INTERNAL_STORE)
            self.ctrl(context, self.SET_SESS_CACHE_SIZE, 1)
        else:
            self.ctrl(context, self.SET_SESS_CACHE_MODE, self.CACHE_SERVER)
            size = session_cache_capacity(cache)
            if size is not None:
                self.ctrl(context, self.SET_SESS_CACHE_SIZE, size)

    def set_ticket_key(self, context: ssl.SSLContext, key: bytes, file_key: bytes) -> None:
        """OpenSSL's own ticket key: 16 bytes of name, 32 of HMAC-SHA256 key,
        32 of AES-256 key, as nginx's 80-byte key files are laid out
        (``key``).  OpenSSL 1.0.2 takes 48 bytes instead (name, HMAC key,
        AES-128 key): then an nginx 48-byte file (``file_key``: name, AES
        key, HMAC key) is reordered, an 80-byte one cut."""
        layouts = [key]
        if len(file_key) == 48:
            layouts.append(file_key[:16] + file_key[32:48] + file_key[16:32])
        else:
            layouts.append(file_key[:16] + file_key[16:32] + file_key[48:64])
        for layout in layouts:
            buffer = ctypes.create_string_buffer(layout, len(layout))
            if self.ctrl(context, self.SET_TLSEXT_TICKET_KEYS, len(layout),
                         ctypes.cast(buffer, ctypes.c_void_p)) == 1:
                return
        raise ConfigValueError("libssl took neither an 80- nor a 48-byte session ticket key",
                               "ssl_session_ticket_key")

    def set_verify_depth(self, context: ssl.SSLContext, depth: int) -> None:
        self.lib.SSL_CTX_set_verify_depth(self.handle(context), min(depth, 1 << 30))

    # ssl_verify_client, as nginx (ngx_ssl_verify_callback): a callback that
    # lets every verification error pass, so that the handshake completes,
    # and a look at the result once it has (ngx_mail_verify_cert), to answer
    # in the protocol ("SSL certificate error") or, with optional_no_ca,
    # tell auth_http "FAILED:reason".  OpenSSL calls it, in the thread doing
    # the handshake, once per certificate of the chain; ctypes takes the GIL
    # for it.  The class holds it for the life of the process.
    VERIFY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p) if ctypes else None
    SSL_VERIFY_PEER = 0x01
    _let_verification_finish = VERIFY_CALLBACK(lambda preverify_ok, store: 1) if ctypes else None

    def verify_to_the_end(self, context: ssl.SSLContext) -> None:
        """Ask for a client certificate (SSL_VERIFY_PEER, as CERT_OPTIONAL)
        and let a handshake with one that fails verification complete."""
        self.lib.SSL_CTX_set_verify(self.handle(context), self.SSL_VERIFY_PEER,
                                    self._let_verification_finish)

    def verify_result(self, connection: ssl.SSLObject) -> Tuple[int, str]:
        """SSL_get_verify_result after the handshake: (0, "ok") or (the
        X509_V_ERR code, OpenSSL's words for it)."""
        code = self.lib.SSL_get_verify_result(self.connection_handle(connection))
        reason = self.lib.X509_verify_cert_error_string(code) or b"unknown"
        return code, reason.decode("ascii", "replace")

    def forget_session(self, connection: ssl.SSLObject) -> None:
        """Take the connection's session out of the session cache, so that
        a certificate refused once is not resumed (ngx_ssl_remove_cached_session)."""
        ssl_handle = self.connection_handle(connection)
        session = self.lib.SSL_get_session(ssl_handle)
        if session:
            self.lib.SSL_CTX_remove_session(self.lib.SSL_get_SSL_CTX(ssl_handle), session)

    def set_curves(self, context: ssl.SSLContext, curves: str) -> None:
        if self.ctrl(context, self.SET_GROUPS_LIST, 0, ctypes.cast(ctypes.c_char_p(curves.encode()),
                                                                    ctypes.c_void_p)) != 1:
            raise ConfigValueError('ssl settings: unknown curve in "%s"' % curves, "ssl_ecdh_curve")


SHARED_SESSIONS_PER_MB = 4000      # nginx's documentation: "one megabyte can store about 4000 sessions"


def session_cache_capacity(cache: SessionCache) -> Optional[int]:
    """How many sessions the built-in cache that stands for ``cache`` holds
    (None: OpenSSL's default, 20480)."""
    if cache.size is not None:
        return cache.size
    if cache.shared:
        return max(1, cache.shared[1] * SHARED_SESSIONS_PER_MB // (1024 * 1024))
    return None


def read_ticket_keys(paths: List[str]) -> List[bytes]:
    """ssl_session_ticket_key files: 48 or 80 bytes each, as nginx."""
    keys = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                data = handle.read(81)
        except OSError as error:
            hint = permission_hint(path) if error.errno == errno.EACCES else ""
            raise ConfigValueError('cannot read "%s": %s%s' % (path, error.strerror, hint),
                                   "ssl_session_ticket_key")
        if len(data) not in (48, 80):
            raise ConfigValueError('"%s" must be 48 or 80 bytes (it is %d)' % (path, len(data)),
                                   "ssl_session_ticket_key")
        keys.append(data)
    return keys


def openssl_ticket_key(key: bytes) -> bytes:
    """An nginx ticket key file's bytes as OpenSSL's 80-byte key.  An 80-byte
    file is that layout already (name, HMAC key, AES-256 key).  A 48-byte one
    is nginx's AES-128 layout, which OpenSSL's own ticket code cannot use: its
    keys are stretched with SHA-256 (the same for every worker and every
    start, so resumption still works across them, not with nginx's tickets)."""
    if len(key) == 80:
        return key
    return key[:16] + hashlib.sha256(b"hmac" + key).digest() + hashlib.sha256(b"aes" + key).digest()


def set_one_curve(context: ssl.SSLContext, curves: List[str]) -> None:
    """Without libssl, Python sets one curve (-t warns of the rest): the
    first of the list it takes.  Before Python 3.10 set_ecdh_curve knows
    only EC_KEY curves, so "X25519" is refused there and the next one is
    tried; none taken is the error of the first."""
    first_error = None
    for curve in curves:
        try:
            context.set_ecdh_curve(curve)
            return
        except (ssl.SSLError, ValueError) as error:
            first_error = first_error or error
    raise first_error


def server_context(settings: Settings, certificate: str = "", key: str = "") -> ssl.SSLContext:
    """The client-facing context for a server, as ngx_mail_ssl_module sets it
    up from the ssl_* directives (with another certificate for SNI)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_protocols(context, settings.ssl_protocols)
    libssl = LibSsl.probe()
    try:
        context.set_ciphers(settings.ssl_ciphers)
        if settings.ssl_ecdh_curve != "auto":
            if libssl.available:
                libssl.set_curves(context, settings.ssl_ecdh_curve)
            else:
                set_one_curve(context, settings.ssl_ecdh_curve.split(":"))
        if settings.ssl_dhparam:
            context.load_dh_params(settings.ssl_dhparam)
    except (ssl.SSLError, ValueError, OSError) as error:
        raise ConfigValueError("ssl settings: %s" % error)
    if settings.ssl_prefer_server_ciphers:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if not settings.ssl_session_tickets:
        # nginx sets SSL_OP_NO_TICKET alone: TLS 1.3 then still gets a
        # stateful ticket, the session cache's, which nginx's tests resume.
        context.options |= ssl.OP_NO_TICKET
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ticket_keys = read_ticket_keys(settings.ssl_session_ticket_key)
    if libssl.available:
        libssl.set_session_cache(context, settings.ssl_session_cache)
        libssl.set_timeout(context, settings.ssl_session_timeout)
        if ticket_keys and settings.ssl_session_tickets:
            libssl.set_ticket_key(context, openssl_ticket_key(ticket_keys[0]), ticket_keys[0])
    passwords = read_password_file(settings.ssl_password_file)
    conf_pairs = apply_conf_commands(context, settings.ssl_conf_command)
    if certificate:
        load_certificates(context, [(certificate, key)], passwords, ("ssl_sni_certificate",) * 2)
    else:
        load_certificates(context, list(zip(settings.ssl_certificate, settings.ssl_certificate_key)),
                          passwords)
    load_certificates(context, conf_pairs, passwords, ("ssl_conf_command",) * 2)
    if settings.ssl_verify_client != "off":
        # CERT_OPTIONAL asks for a certificate and does not insist; with
        # libssl, a failing one also lets the handshake complete.  Either
        # way the session judges after it (certificate_verdict), as nginx.
        context.verify_mode = ssl.CERT_OPTIONAL
        for directive in ("ssl_client_certificate", "ssl_trusted_certificate", "ssl_crl"):
            if getattr(settings, directive):
                load_verify_file(context, getattr(settings, directive), directive)
        if settings.ssl_crl:
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if libssl.available:
            libssl.set_verify_depth(context, settings.ssl_verify_depth)
            libssl.verify_to_the_end(context)
    context.set_alpn_protocols([ALPN_NAMES.get(settings.protocol, settings.protocol)])
    return context


def load_verify_file(context: ssl.SSLContext, path: str, directive: str) -> None:
    """A CA or CRL file into ``context``; a problem names the file and blames
    ``directive``."""
    check_readable(path, "CA or CRL file", directive)
    try:
        context.load_verify_locations(path)
    except ssl.SSLError as error:
        raise ConfigValueError('cannot load CA or CRL file "%s": %s' % (path, error.reason or error),
                               directive)


def read_password_file(path: Optional[str]) -> List[bytes]:
    if not path:
        return []
    try:
        with open(path, "rb") as handle:
            return [line.rstrip(b"\r\n") for line in handle if line.strip()]
    except OSError as error:
        hint = permission_hint(path) if error.errno == errno.EACCES else ""
        raise ConfigValueError('cannot read "%s": %s%s' % (path, error.strerror, hint),
                               "ssl_password_file")


def apply_conf_commands(context: ssl.SSLContext, commands: List[Tuple[str, str]]) -> List:
    """ssl_conf_command, for the commands Python's ssl module can express.
    Returns the (Certificate, PrivateKey) pairs it names."""
    certificates, keys = [], []
    for name, value in commands:
        if name == "Options":
            for option in value.split(","):
                option = option.strip()
                flag = ssl.OP_NO_TICKET if option.endswith("SessionTicket") else \
                    ssl.OP_CIPHER_SERVER_PREFERENCE
                enable = not option.startswith("-")
                # SessionTicket *enables* tickets: clear OP_NO_TICKET.
                if flag == ssl.OP_NO_TICKET:
                    enable = not enable
                context.options = context.options | flag if enable else context.options & ~flag
        elif name == "MinProtocol":
            context.minimum_version = TLS_VERSIONS[value]
        elif name == "MaxProtocol":
            context.maximum_version = TLS_VERSIONS[value]
        elif name == "Certificate":
            certificates.append(value)
        elif name == "PrivateKey":
            keys.append(value)
    if len(certificates) != len(keys):
        raise ConfigValueError("ssl_conf_command: give a PrivateKey for each Certificate")
    return list(zip(certificates, keys))


def add_sni_certificates(context: ssl.SSLContext, settings: Settings) -> None:
    """Extension: pick a certificate by the name the client asks for (SNI).
    The name is also kept on the connection (``requested_name``) for the
    PROXY v2 header's AUTHORITY."""
    by_name = {entry.name: server_context(settings, entry.certificate, entry.key)
               for entry in settings.ssl_sni_certificate}

    def choose(tls_object, name, default_context):
        tls_object.requested_name = name
        if name:
            name = name.lower()
            wildcard = "*." + name.partition(".")[2]
            chosen = by_name.get(name) or by_name.get(wildcard)
            if chosen is not None:
                tls_object.context = chosen
        return None
    context.sni_callback = choose


def backend_context(settings: Settings) -> ssl.SSLContext:
    """Extension: the context for TLS to the backend (proxy_ssl_*)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    apply_protocols(context, settings.proxy_ssl_protocols)
    try:
        context.set_ciphers(settings.proxy_ssl_ciphers)
    except ssl.SSLError as error:
        raise ConfigValueError("proxy_ssl_ciphers: %s" % error)
    if settings.proxy_ssl_verify:
        if settings.proxy_ssl_trusted_certificate:
            load_verify_file(context, settings.proxy_ssl_trusted_certificate,
                             "proxy_ssl_trusted_certificate")
        else:
            try:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            except (ssl.SSLError, OSError) as error:
                raise ConfigValueError("cannot load the system's CA certificates: %s" % error,
                                       "proxy_ssl_verify")
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.proxy_ssl_certificate:
        key_directive = "proxy_ssl_certificate_key" if settings.proxy_ssl_certificate_key else \
            "proxy_ssl_certificate"
        load_certificates(context, [(settings.proxy_ssl_certificate,
                                     settings.proxy_ssl_certificate_key or
                                     settings.proxy_ssl_certificate)], [],
                          ("proxy_ssl_certificate", key_directive))
    return context


# ========================================================================== #
# ####                            Event loop                            #### #
# ========================================================================== #
# Readiness and time, nothing about mail: one selectors.DefaultSelector, a
# heap of timers (cancelled ones are skipped when they come up, never
# searched for, and swept out when they outnumber the live ones), and
# signals delivered through a wake-up socket so that no work is ever done
# inside a signal handler.  Other threads (the password
# checks) hand the loop a callback through the same socket.  A registered
# object has on_readable() and on_writable().

def loop_callback(method: Callable) -> Callable:
    """Decorator for a method called on a connection's behalf by something
    else than its own stream or timer (the auth server's answer, the
    resolver's): an exception escaping it goes to the object's
    ``crashed(error)``, which ends that connection, instead of out of the
    loop, which would end the worker and every connection in it.  (A
    stream's or a timer's exception reaches ``crashed`` through
    EventLoop.failed.)"""
    @functools.wraps(method)
    def guarded(self, *args):
        try:
            return method(self, *args)
        except Exception as error:
            self.crashed(error)
    return guarded


# A cancelled timer stays in the heap until its deadline comes up, and a
# relay's idle check (proxy_timeout / 8: three hours by default) is
# cancelled by every session that ends: with nothing else, a busy worker's
# heap would hold hours of ended sessions, and every push and pop would
# climb through them.  So the heap is rebuilt without the cancelled ones
# whenever it has doubled since the last sweep (asyncio sweeps too): it is
# at most twice the live timers (or TIMER_SWEEP_MIN), for O(1) per timer
# amortized.
TIMER_SWEEP_MIN = 512


class Timer:
    """A callback at a deadline; cancel() makes it a no-op."""
    __slots__ = ("deadline", "callback")

    def __init__(self, deadline: float, callback: Callable):
        self.deadline = deadline
        self.callback = callback

    def cancel(self) -> None:
        self.callback = None


class EventLoop:
    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.timers = []                   # heap of (deadline, sequence, Timer): tuples
        self.sequence = 0                  # compare in C, the sequence breaks ties
        self.timers_sweep_at = TIMER_SWEEP_MIN    # heap size that triggers the next sweep
        self.running = False
        self.signal_handlers = {}          # signal number -> callback
        # One buffer for reads whose bytes go straight out again (the
        # relay's): used and done with within one call, so one per loop
        # serves every connection; made, and grown, by whoever needs more.
        self.scratch = memoryview(bytearray())
        self.pipes = None                  # the relay's spare pipes (PipePool), made when needed
        # Callbacks from other threads, oldest first.  A deque, because its
        # append() and popleft() are thread-safe (the collections docs say
        # so): no lock is needed between the threads and the loop.
        self.pending = collections.deque()
        # The self-pipe: signals (set_wakeup_fd) and other threads write a
        # byte to it so that select() returns at once.
        self._wakeup_read, self._wakeup_write = socket.socketpair()
        self._wakeup_read.setblocking(False)
        self._wakeup_write.setblocking(False)
        self.selector.register(self._wakeup_read, selectors.EVENT_READ, self)

    @staticmethod
    def time() -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable) -> Timer:
        timer = Timer(self.time() + delay, callback)
        self.sequence += 1
        heapq.heappush(self.timers, (timer.deadline, self.sequence, timer))
        if len(self.timers) >= self.timers_sweep_at:
            self.sweep_timers()
        return timer

    def sweep_timers(self) -> None:
        """Drop the cancelled timers from the heap (see TIMER_SWEEP_MIN)."""
        self.timers[:] = [entry for entry in self.timers if entry[2].callback is not None]
        heapq.heapify(self.timers)
        self.timers_sweep_at = max(TIMER_SWEEP_MIN, 2 * len(self.timers))

    def call_soon_threadsafe(self, callback: Callable) -> None:
        """Run ``callback()`` in the loop's thread, soon: the one call other
        threads may make.  The byte 0 (no signal has that number) wakes
        select(); the loop then runs every pending callback, in the order
        they came.  An exception from one goes to its object's
        ``crashed(error)``, as a timer's does (EventLoop.failed).  The byte
        is not needed when the socket is full (a wake-up is on its way
        already) or closed (the loop is gone: the callback never runs)."""
        self.pending.append(callback)
        try:
            self._wakeup_write.send(b"\0")
        except OSError:
            pass

    def set_interest(self, fileobj, events: int, handler, registered: int) -> int:
        """Make the selector watch ``fileobj`` for ``events`` (0: not at all);
        ``registered`` is what it watches now.  Returns the new interest."""
        if events == registered:
            return events
        if events == 0:
            self.selector.unregister(fileobj)
        elif registered == 0:
            self.selector.register(fileobj, events, handler)
        else:
            self.selector.modify(fileobj, events, handler)
        return events

    def add_signal_handler(self, signum: int, callback: Callable) -> None:
        """``callback(signum)`` runs in the loop, never in the signal handler."""
        if not self.signal_handlers:
            signal.set_wakeup_fd(self._wakeup_write.fileno(), warn_on_full_buffer=False)
        self.signal_handlers[signum] = callback
        signal.signal(signum, lambda number, frame: None)   # the byte is the message

    def on_readable(self) -> None:
        """The self-pipe: each byte is a signal number (0: see ``pending``)."""
        try:
            data = self._wakeup_read.recv(512)
        except BlockingIOError:
            return
        # The callbacks there now; one that comes while they run waits for
        # the next turn (its byte wakes the loop again), so that threads
        # that keep calling cannot keep the loop from its sockets.
        for _ in range(len(self.pending)):
            callback = self.pending.popleft()
            try:
                callback()
            except Exception as error:
                self.failed(callback, error)
        # Signals that arrived together: SIGCHLD last, so that a child that
        # exited because of a SIGTERM is seen after that SIGTERM.
        child = getattr(signal, "SIGCHLD", -1)
        for signum in sorted(set(data), key=lambda number: number == child):
            callback = self.signal_handlers.get(signum)
            if callback is not None:
                callback(signum)

    def close(self) -> None:
        if self.signal_handlers:
            signal.set_wakeup_fd(-1)
        if self.pipes is not None:
            self.pipes.close()
        self.selector.close()
        self._wakeup_read.close()
        self._wakeup_write.close()

    def run_once(self, max_wait: Optional[float] = None) -> None:
        """Wait for readiness or the next timer, then dispatch both."""
        wait = max_wait
        while self.timers and self.timers[0][2].callback is None:
            heapq.heappop(self.timers)
        if self.timers:
            until_timer = max(0.0, self.timers[0][0] - self.time())
            wait = until_timer if wait is None else min(wait, until_timer)
        for key, mask in self.selector.select(wait):
            handler = key.data
            try:
                if mask & selectors.EVENT_READ:
                    handler.on_readable()
                if mask & selectors.EVENT_WRITE and key.fileobj.fileno() >= 0:
                    handler.on_writable()
            except Exception as error:
                self.failed(handler, error)
        now = self.time()
        while self.timers and self.timers[0][0] <= now:
            timer = heapq.heappop(self.timers)[2]
            callback, timer.callback = timer.callback, None
            if callback is not None:
                try:
                    callback()
                except Exception as error:
                    self.failed(callback, error)

    @staticmethod
    def failed(culprit, error: Exception) -> None:
        """An exception out of a handler (a Stream, say) or a timer's bound
        method is a bug in one connection's handling: the object's
        ``crashed(error)`` ends that connection (a Stream passes it to its
        owner), and the worker and its other connections go on.  Without
        such an object the exception goes on out of the loop."""
        crashed = getattr(getattr(culprit, "__self__", culprit), "crashed", None)
        if crashed is None:
            raise error
        crashed(error)

    def run(self) -> None:
        self.running = True
        while self.running:
            self.run_once()

    def stop(self) -> None:
        self.running = False


class Deadline:
    """One timer that can be moved later cheaply (sans heap work): when the
    loop's timer comes up early it waits for the rest.  A session keeps one
    and points it at whatever it waits for (the client's next command, the
    backend's login, a delayed reply).  set(delay, callback) arms it,
    replacing what was armed; postpone(delay) moves the armed callback to
    ``delay`` from now; cancel() disarms.  ``callback`` is what is armed
    (None: nothing).  An exception from the callback goes to the owner's
    crashed(error) (EventLoop.failed)."""
    __slots__ = ("loop", "owner", "due", "callback", "_timer")

    def __init__(self, loop: EventLoop, owner):
        self.loop = loop
        self.owner = owner
        self.due = 0.0
        self.callback = None           # type: Optional[Callable]
        self._timer = None             # type: Optional[Timer]

    def set(self, delay: float, callback: Callable) -> None:
        self.due = self.loop.time() + delay
        self.callback = callback
        if self._timer is not None and self._timer.callback is not None and \
                self._timer.deadline <= self.due:
            return                    # the armed timer comes up first, and waits for the rest
        self.cancel()
        self.callback = callback
        self._timer = self.loop.call_later(delay, self._fire)

    def postpone(self, delay: float) -> None:
        if self.callback is not None:
            self.due = max(self.due, self.loop.time() + delay)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.callback = None

    def _fire(self) -> None:
        left = self.due - self.loop.time()
        if left > 0.001:
            self._timer = self.loop.call_later(left, self._fire)
            return
        callback, self.callback, self._timer = self.callback, None, None
        if callback is not None:
            callback()

    def crashed(self, error: Exception) -> None:
        self.owner.crashed(error)


# ========================================================================== #
# ####                      Streams and listeners                       #### #
# ========================================================================== #
# The only socket code of a session.  A Stream is a non-blocking socket with
# an output buffer: write() sends at once what the kernel takes and keeps the
# rest, and write interest is registered only while something is kept.  How
# much it reads at a time is its owner's choice (``read_budget``; 0 pauses
# reading), which is how the relay bounds its buffers.  Events go to the
# owner: stream_data, stream_eof, stream_error, stream_connected, stream_drained.
# A relay between two plain sockets does their I/O itself: it becomes the
# stream's ``driver``, which hears of readiness instead (and sets the
# interest with watch()); the stream keeps its socket, counts and close().

class StreamOwner:
    """What a Stream tells its owner, as asyncio's Protocol: a subclass
    overrides the events it needs, the others do nothing.  (No attributes:
    subclasses keep their __slots__.)"""
    __slots__ = ()

    def stream_data(self, stream: "Stream", data: bytes) -> None:
        """Bytes read (plaintext, behind a TLS layer)."""

    def stream_eof(self, stream: "Stream") -> None:
        """The peer closed (reading has stopped)."""

    def stream_error(self, stream: "Stream", error: Exception) -> None:
        """A socket error, or a TlsError; the stream is to be closed."""

    def stream_connected(self, stream: "Stream") -> None:
        """A connect() finished."""

    def stream_drained(self, stream: "Stream") -> None:
        """Everything written has gone to the kernel."""

    def stream_tls_ready(self, stream: "Stream") -> None:
        """The TLS handshake is done."""


class LoopHandler:
    """What the event loop calls on an object registered with it: override
    what it waits for.  (No attributes: subclasses keep their __slots__.)"""
    __slots__ = ()

    def on_readable(self) -> None:
        """Readable (or closed, or an error: the read tells)."""

    def on_writable(self) -> None:
        """Writable (or a connect() finished)."""


class Stream(LoopHandler):
    __slots__ = ("loop", "sock", "owner", "out", "read_budget", "connecting",
                 "closed", "interest", "received", "sent", "tls", "driver")

    def __init__(self, loop: EventLoop, sock: socket.socket, owner, connecting: bool = False):
        self.loop = loop
        self.sock = sock
        self.owner = owner
        self.out = bytearray()
        self.read_budget = READ_SIZE
        self.connecting = connecting
        self.closed = False
        self.interest = 0
        self.received = 0          # bytes read from the socket
        self.sent = 0              # bytes written to the socket
        self.tls = None            # type: Optional[TlsLayer]
        self.driver = None         # a DirectRelay doing this socket's I/O (see watch)
        self.update_interest()

    def update_interest(self) -> None:
        """Watch for what the stream wants now.  A pause of the reads
        (budget 0) leaves the read interest on: the first readiness while
        paused takes it off (on_readable).  A pause that ends before the
        peer sends (a login's wait for its verdict and for the backend)
        then costs no system call, where taking the interest off and
        putting it back costs two (nginx's ngx_mail_auth_http_block_read
        does nothing either, in epoll's edge-triggered mode)."""
        if self.closed:
            return
        events = 0
        reading = self.read_budget > 0 or self.interest & selectors.EVENT_READ
        if reading and not self.connecting:
            events |= selectors.EVENT_READ
        if self.out or self.connecting:
            events |= selectors.EVENT_WRITE
        if events != self.interest:
            self.interest = self.loop.set_interest(self.sock, events, self, self.interest)

    def watch(self, events: int) -> None:
        """For a driver: the loop watches the socket for ``events``, and
        tells the driver (readable(stream), writable(stream))."""
        if events != self.interest and not self.closed:
            self.interest = self.loop.set_interest(self.sock, events, self, self.interest)

    def set_read_budget(self, budget: int) -> None:
        """Read at most ``budget`` bytes per event; 0 stops reading."""
        if budget != self.read_budget:
            self.read_budget = budget
            self.update_interest()

    def start_tls(self, layer: TlsLayer) -> None:
        """From now on bytes go through ``layer``: what was written before
        (a plaintext "OK, begin TLS") is already in ``out``, ahead of it.
        The owner hears stream_tls_ready when the handshake is done."""
        self.tls = layer
        self._write_raw(layer.data_to_send())

    def write(self, data: bytes) -> None:
        """Send ``data`` (through TLS, if on): now what the socket takes, the
        rest kept in ``out``."""
        if self.tls is not None and not self.closed:
            try:
                self.tls.send(data)
            except TlsError as error:
                self.loop.call_later(0, lambda failure=error: self._fail(failure))
                return
            data = self.tls.data_to_send()
        self._write_raw(data)

    def _write_raw(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if self.out or self.connecting:
            self.out += data               # write interest is on already
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            # Tell the owner from the loop, not from inside its own write().
            self.loop.call_later(0, lambda failure=error: self._fail(failure))
            return
        self.sent += sent
        if sent < len(data):
            self.out += memoryview(data)[sent:]
            self.update_interest()

    def on_readable(self) -> None:
        """Read while there is data and room: with a small budget (a 4k
        proxy_buffer) one readiness event serves several reads, instead of
        one epoll_wait per chunk."""
        if self.driver is not None:
            self.driver.readable(self)
            return
        if self.read_budget <= 0:                  # paused (see update_interest): stop watching
            self.interest = self.loop.set_interest(self.sock, self.interest & ~selectors.EVENT_READ,
                                                   self, self.interest)
            return
        for _ in range(READS_PER_EVENT):
            budget = self.read_budget
            try:
                data = self.sock.recv(budget)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self._fail(error)
                return
            self.received += len(data)
            self.feed(data)
            if len(data) < budget or self.closed or not self.read_budget:
                return

    def feed(self, data: bytes) -> None:
        """Handle ``data`` as if just read (bytes read ahead of a layer change,
        e.g. the first TLS bytes behind a PROXY header)."""
        if self.tls is not None:
            self._receive_tls(data)
            return
        if not data:
            self.set_read_budget(0)
            self.owner.stream_eof(self)
            return
        self.owner.stream_data(self, data)

    def _receive_tls(self, data: bytes) -> None:
        layer = self.tls
        try:
            plaintext = layer.receive_data(data)
        except TlsError as error:
            self._write_raw(layer.data_to_send())          # an alert, if any
            self.owner.stream_error(self, error)
            return
        self._write_raw(layer.data_to_send())              # handshake, tickets
        if layer.just_opened:
            layer.just_opened = False
            self.owner.stream_tls_ready(self)
        if plaintext and not self.closed:
            self.owner.stream_data(self, plaintext)
        if layer.state == TlsState.CLOSED and not self.closed:
            self.set_read_budget(0)
            self.owner.stream_eof(self)

    def on_writable(self) -> None:
        if self.driver is not None:
            self.driver.writable(self)
            return
        if self.connecting:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._fail(OSError(error, os.strerror(error)))
                return
            self.connecting = False
            self.update_interest()
            self.owner.stream_connected(self)
            if self.closed:
                return
        if not self.out:
            return
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._fail(error)
            return
        self.sent += sent
        del self.out[:sent]
        if not self.out:
            self.update_interest()
            self.owner.stream_drained(self)

    def _fail(self, error: OSError) -> None:
        if not self.closed:
            self.owner.stream_error(self, error)

    def crashed(self, error: Exception) -> None:
        """A bug in the owner's handling of this stream (EventLoop.failed)."""
        crashed = getattr(self.owner, "crashed", None)
        if crashed is None:
            raise error
        crashed(error)

    def close(self) -> None:
        if self.closed:
            return
        if self.tls is not None and not self.out:
            self.tls.close()                               # close_notify, best effort
            try:
                self.sock.send(self.tls.data_to_send())
            except OSError:
                pass
        self.loop.set_interest(self.sock, 0, self, self.interest)
        self.interest = 0
        self.closed = True
        self.out = bytearray()
        self.sock.close()


def connect_stream(loop: EventLoop, family: int, sockaddr: tuple, owner,
                   nodelay: bool = True, first: bytes = b"") -> Stream:
    """Start a non-blocking connect(); the owner hears stream_connected or
    stream_error.  Raises OSError if it fails at once (e.g. EMFILE).
    ``nodelay``: TCP_NODELAY, for dialogues of small writes (not for one
    request and its answer).

    ``first``: what to send once connected, tried at once: to a server on
    this host (an auth server, often) the kernel has done the handshake
    within connect(), and the bytes go now, without a turn of the loop to
    hear that the socket is writable (and getsockopt, and a change of
    interest).  The stream is then connected already: the owner hears no
    stream_connected.  Elsewhere the send finds the connection not yet up
    (EAGAIN) and ``first`` waits in the stream's output; a refusal known by
    then (ECONNREFUSED) raises OSError, as connect() would."""
    # Non-blocking from the start where the system allows (one ioctl less).
    sock = socket.socket(family, socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0))
    sent = None                        # bytes of ``first`` the kernel took; None: not connected
    try:
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)
        if nodelay and family != getattr(socket, "AF_UNIX", None):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        error = sock.connect_ex(sockaddr)
        if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            raise OSError(error, os.strerror(error))
        if first:
            try:
                sent = sock.send(first)
            except (BlockingIOError, InterruptedError):
                pass
    except OSError:
        sock.close()
        raise
    if sent is None:
        stream = Stream(loop, sock, owner, connecting=True)
        stream.out += first                # sent by on_writable once connected
        return stream
    stream = Stream(loop, sock, owner)
    stream.sent = sent
    if sent < len(first):
        stream.out += first[sent:]
        stream.update_interest()
    return stream


def peer_text(address) -> str:
    """A socket address as nginx logs it: the IP without the port, or
    "unix:" for a unix socket's peer (ngx_sock_ntop: a client's unix
    socket has no name)."""
    return address[0] if isinstance(address, tuple) else "unix:"


def local_address(sock: socket.socket) -> Tuple[str, int]:
    """(address, port) a client connected to; ("unix:", 0) on a unix
    socket, which a PROXY header to the backend gives as UNKNOWN."""
    address = sock.getsockname()
    return address[:2] if isinstance(address, tuple) else ("unix:", 0)


class Listener(LoopHandler):
    """A listening socket for one ``listen``; hands accepted sockets to
    ``on_accept(listener, sock, address)``.  Out of descriptors (EMFILE,
    ENFILE), it logs and stops accepting for ACCEPT_PAUSE seconds, so that
    the pending connections wait in the kernel's backlog instead of spinning
    the loop; it accepts again by itself once descriptors are free."""

    def __init__(self, loop: EventLoop, sock: socket.socket, listen: Listen, server: Settings,
                 on_accept: Callable, log: ErrorLog):
        self.loop = loop
        self.sock = sock
        self.listen = listen
        self.server = server
        self.on_accept = on_accept
        self.log = log
        self.interest = 0
        self.paused = False
        # Two system calls less per client (see configure_accepted).
        self.nodelay_inherited = None      # unknown until the first client
        self.local = None                  # the address every client connects to, if one
        if listen.port:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            self.local = specific_address(sock)
        self.resume()

    def resume(self) -> None:
        self.paused = False
        self.interest = self.loop.set_interest(self.sock, selectors.EVENT_READ, self, self.interest)

    def pause(self) -> None:
        self.interest = self.loop.set_interest(self.sock, 0, self, self.interest)

    def on_readable(self) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            if self.interest == 0:
                return
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.log("crit", "accept() failed (%d: %s)" % (error.errno, error.strerror),
                                 context=", listening on %s" % self.listen.text)
                    self.pause()
                    self.paused = True
                    self.loop.call_later(ACCEPT_PAUSE, self._retry)
                    return
                continue                     # ECONNABORTED and the like: next one
            self.on_accept(self, sock, address)

    def _retry(self) -> None:
        if self.paused and not self.sock._closed:
            self.resume()

    def reconfigure(self, listen: Listen, server: Settings) -> None:
        """A reload kept this address: sessions accepted from now on get
        ``listen``'s flags (ssl, proxy_protocol, so_keepalive) and
        ``server``; the socket's own settings change where they can, and a
        warning says which cannot."""
        self.listen, problems = update_listen(self.sock, self.listen, listen)
        self.server = server
        for problem in problems:
            self.log.log("warn", "listen %s: %s" % (listen.text, problem))

    def close(self) -> None:
        self.pause()
        self.sock.close()


def bind_listen(listen: Listen) -> socket.socket:
    """A listening socket for ``listen``; raises OSError with nginx's words."""
    try:
        sock = socket.socket(listen.family, socket.SOCK_STREAM)
    except OSError as error:                 # EAFNOSUPPORT: a kernel without IPv6
        raise OSError(error.errno, "socket() %s failed (%d: %s)" % (
            listen.text, error.errno, error.strerror))
    if listen.port == 0:
        return bind_unix(sock, listen)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if listen.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(listen.ipv6only))
        if listen.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, listen.rcvbuf)
        if listen.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, listen.sndbuf)
        sock.bind((listen.host, listen.port))
        sock.listen(listen.backlog)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise OSError(error.errno, "bind() to %s failed (%d: %s)" % (
            listen.text, error.errno, error.strerror))
    return sock


UNIX_SOCKET_MODE = 0o666      # nginx's chmod() of a unix listening socket: anyone may connect


def bind_unix(sock: socket.socket, listen: Listen) -> socket.socket:
    """bind_listen for ``unix:PATH``, as ngx_open_listening_sockets: bind()
    creates the file, which is then made 0666.  A file already there is
    not removed (nginx neither: it may be a running proxy's): EADDRINUSE,
    which bind_all explains (unix_socket_hint) unless it ignores it."""
    path = listen.host[5:]
    try:
        for size, option in ((listen.rcvbuf, socket.SO_RCVBUF), (listen.sndbuf, socket.SO_SNDBUF)):
            if size:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
        sock.bind(path)
    except OSError as error:
        sock.close()
        raise OSError(error.errno, "bind() to %s failed (%d: %s)" % (
            listen.text, error.errno, error.strerror))
    try:
        os.chmod(path, UNIX_SOCKET_MODE)
        sock.listen(listen.backlog)
        sock.setblocking(False)
    except OSError as error:
        release_socket((listen.host, listen.port), sock)
        raise OSError(error.errno, "listen() to %s failed (%d: %s)" % (
            listen.text, error.errno, error.strerror))
    return sock


def unix_socket_hint(path: str) -> str:
    """Why a unix socket's path is taken, for the message of bind_unix's
    EADDRINUSE (not asked by -t, which ignores it: the probe would be a
    session of the running proxy)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return ": the file is not a socket"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            probe.connect(path)
    except ConnectionRefusedError:
        return (": nothing listens on it, it was left by a process that did not exit "
                "cleanly; remove it")
    except OSError:
        return ""
    return ": another process listens on it"


def release_socket(key: Tuple[str, int], sock: socket.socket) -> None:
    """Close a listening socket this process bound, and remove its file if
    it is a unix one (nginx's master on exit and for a socket a reload
    drops; never a worker: the master owns the file)."""
    sock.close()
    remove_socket_file(key)


def remove_socket_file(key: Tuple[str, int]) -> None:
    """The file of the unix socket ``key`` (bind_all's key), if it is one."""
    if key[1] == 0:
        try:
            os.unlink(key[0][5:])
        except OSError:
            pass                       # gone already


def host_has_ipv6() -> bool:
    """Can this host bind IPv6's loopback?  Every host with IPv6 on has
    ::1; one without IPv6 (a kernel without it, a container, or
    net.ipv6.conf.*.disable_ipv6) has not."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def family_unavailable(listen: Listen, error: OSError) -> bool:
    """Did binding ``listen`` fail because the host has no IPv6 at all
    (EAFNOSUPPORT, or EADDRNOTAVAIL where even ::1 cannot be bound), rather
    than because of the address (one the host does not have, a port in use
    or privileged), which stays fatal as in nginx?"""
    if listen.family != socket.AF_INET6:
        return False
    if error.errno == errno.EAFNOSUPPORT:
        return True
    return error.errno == errno.EADDRNOTAVAIL and not host_has_ipv6()


def bind_all(config: Config, bound: Dict, warn: Callable[[str], None] = lambda message: None,
             ignore: Tuple[int, ...] = ()) -> Dict:
    """The listening sockets ``config`` wants, keyed by (host, port): those
    already in ``bound`` are kept, the others bound now.  An IPv6 listen on
    a host without IPv6 is skipped with ``warn`` (so that one file serves
    hosts with and without it), unless its server would be left with no
    listener; a failure whose errno is in ``ignore`` is skipped silently (-t
    ignores EADDRINUSE, as nginx -t: the running proxy holds the address).
    Raises OSError (closing what it bound) if one cannot be bound."""
    sockets = {}
    try:
        for server in config.servers:
            skipped, served = None, False
            for listen in server.listen:
                key = (listen.host, listen.port)
                try:
                    sockets[key] = bound.get(key) or sockets.get(key) or bind_listen(listen)
                except OSError as error:
                    if error.errno not in ignore and not family_unavailable(listen, error):
                        if listen.port == 0 and error.errno == errno.EADDRINUSE:
                            raise OSError(error.errno, error.strerror +
                                          unix_socket_hint(listen.host[5:]))
                        raise
                    if error.errno not in ignore:
                        skipped = skipped or error
                        warn("%s: this host has no IPv6, [server %s] listens without it"
                             % (error.strerror, server.name))
                        continue
                served = True
            if skipped and not served:
                raise skipped
    except OSError:
        for key, sock in sockets.items():
            if key not in bound:
                release_socket(key, sock)
        raise
    return sockets


def listen_table(config: Config, sockets: Optional[Dict] = None) -> Dict:
    """Each ``listen`` of ``config`` by (host, port), the keys of bind_all;
    with ``sockets``, only those bound there (bind_all skips some)."""
    table = {}
    for server in config.servers:
        for listen in server.listen:
            if sockets is None or (listen.host, listen.port) in sockets:
                table[(listen.host, listen.port)] = listen
    return table


FLAG_TEXT = {True: "on", False: "off"}      # a flag as written in the file


def update_listen(sock: socket.socket, old: Listen, new: Listen) -> Tuple[Listen, List[str]]:
    """A reload keeps ``sock``, bound and listening for ``old``: apply what
    changed in ``new`` and lives on the socket, as nginx does on a reload
    (listen() again for the backlog, setsockopt for the buffer sizes).
    Returns the Listen the socket now matches (``new``, but with the old
    value of whatever could not change) and a sentence for each change that
    could not be made: ipv6only is fixed once bound, and a buffer size set
    once cannot go back to the system's own."""
    problems = []
    backlog = new.backlog
    if backlog != old.backlog:
        try:
            sock.listen(backlog)
        except OSError as error:
            problems.append('"backlog=%d" failed (%s), the backlog stays %d'
                            % (backlog, error.strerror, old.backlog))
            backlog = old.backlog
    rcvbuf = update_buffer(sock, "rcvbuf", socket.SO_RCVBUF, old.rcvbuf, new.rcvbuf, problems)
    sndbuf = update_buffer(sock, "sndbuf", socket.SO_SNDBUF, old.sndbuf, new.sndbuf, problems)
    ipv6only = new.ipv6only
    if new.family == socket.AF_INET6 and ipv6only != old.ipv6only:
        problems.append('"ipv6only=%s" cannot change on a bound socket, it stays "%s" until a '
                        "restart" % (FLAG_TEXT[ipv6only], FLAG_TEXT[old.ipv6only]))
        ipv6only = old.ipv6only
    return new._replace(backlog=backlog, rcvbuf=rcvbuf, sndbuf=sndbuf, ipv6only=ipv6only), problems


def update_buffer(sock: socket.socket, name: str, option: int, before: Optional[int],
                  size: Optional[int], problems: List[str]) -> Optional[int]:
    """rcvbuf or sndbuf for update_listen: set ``size`` if it changed; the
    size the socket has now.  What cannot be done goes to ``problems``."""
    if size == before:
        return size
    if size is None:
        problems.append('without "%s" the socket keeps %d, not the system\'s default, until a '
                        "restart" % (name, before))
        return before
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, size)
    except OSError as error:
        kept = "the system's default" if before is None else "%d" % before
        problems.append('"%s=%d" failed (%s), it stays %s' % (name, size, error.strerror, kept))
        return before
    return size


def specific_address(sock: socket.socket) -> Optional[Tuple[str, int]]:
    """A TCP listening socket's (address, port), which is every accepted
    socket's own address (getsockname) unless it is the wildcard (0.0.0.0
    or ::, or ::ffff:0.0.0.0 with ipv6only=off): then each client's must
    be asked for (local_address)."""
    address = sock.getsockname()
    ip = ipaddress.ip_address(address[0].split("%")[0])
    if ip.is_unspecified or getattr(ip, "ipv4_mapped", None) == ipaddress.IPv4Address(0):
        return None
    return address[0], address[1]


def configure_accepted(sock: socket.socket, listener: Listener) -> None:
    """The accepted socket: non-blocking; over TCP, TCP_NODELAY and
    so_keepalive (nginx neither sets them on a unix socket: no TCP there).
    TCP_NODELAY is set on the listening socket, which Linux and the BSDs
    copy to each accepted one: the first client shows whether this system
    does, and only if not is it set again on each."""
    sock.setblocking(False)
    listen = listener.listen
    if listen.port == 0:
        return
    if listener.nodelay_inherited is None:
        listener.nodelay_inherited = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    if not listener.nodelay_inherited:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if listen.so_keepalive is not None:
        enabled, idle, interval, count = listen.so_keepalive
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(enabled))
        for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                              ("TCP_KEEPCNT", count)):
            if enabled and value is not None and hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


# ========================================================================== #
# ####                              Relay                               #### #
# ========================================================================== #
# After login: bytes both ways, unchanged.  Each direction holds at most
# proxy_buffer bytes: a side is read only while the other side's output
# buffer has room (nginx ngx_mail_proxy_handler), so a client that stops
# reading stops the backend being read, and memory stays bounded.  The
# session ends when either side has closed and what it sent is written out,
# or after proxy_timeout without traffic.
#
# start_relay picks one of four ways to move the bytes, once:
#  - SpliceFlow (DirectRelay): TCP on both sides without TLS, on Linux with
#    Python >= 3.10.  os.splice moves the bytes socket -> pipe -> socket in
#    the kernel; Python only hears of readiness and counts.  The pipe, sized
#    to proxy_buffer (F_SETPIPE_SZ), is the worker's (PipePool), lent to a
#    direction while bytes are in it.
#  - BufferedFlow (DirectRelay): plain sockets elsewhere.  recv_into the
#    loop's scratch buffer and send on from it at once; only what the
#    target's kernel refuses is copied, into the target stream's ``out``.
#  - TlsFlow (DirectRelay): TLS on either side or both (the layer must see
#    the bytes).  recv, decrypt or encrypt (TlsLayer), send on at once; what
#    the target's kernel refuses waits in the target stream's ``out``.
#  - CheckedRelay, through the Streams: the SMTP recipient check reads the
#    client's commands (smtp_auth none).
# A DirectRelay reads a side only while nothing read from it waits to be
# written, one read of at most proxy_buffer: so each direction holds at
# most proxy_buffer (with TLS, and the record that read completes).  All
# count bytes in the Streams (``received``, ``sent``: on the wire, so
# ciphertext with TLS), which the idle check and the access line read.

class Relay(StreamOwner):
    """Both directions of one proxied session (the hot path: a few lines
    per chunk).  A side is read only as far as the other side's output
    buffer has room, so each direction holds at most proxy_buffer.  The
    base of DirectRelay (which does the I/O itself) and CheckedRelay."""
    __slots__ = ("session", "client", "backend", "limit", "eof_from", "timer", "idle_timeout",
                 "moved", "last_change")

    def __init__(self, session, client: Stream, backend: Stream, limit: int, idle_timeout: float):
        self.session = session
        self.client = client
        self.backend = backend
        self.limit = limit
        self.eof_from = None               # the stream that closed first
        self.idle_timeout = idle_timeout
        self.moved = -1                    # bytes relayed when last looked at
        self.last_change = client.loop.time()
        self.timer = client.loop.call_later(self._check_interval(), self._check_idle)
        client.owner = self
        backend.owner = self
        self._allow(client)
        self._allow(backend)

    def peer(self, stream: Stream) -> Stream:
        return self.backend if stream is self.client else self.client

    def _allow(self, source: Stream) -> None:
        """Let ``source`` be read as far as its peer's buffer has room."""
        room = 0 if self.eof_from is not None else self.limit - len(self.peer(source).out)
        source.set_read_budget(min(room, READ_SIZE) if room > 0 else 0)

    def stream_data(self, stream: Stream, data: bytes) -> None:
        peer = self.backend if stream is self.client else self.client
        peer.write(data)
        if peer.out:                       # the kernel took less: hold the source back
            self._allow(stream)

    def stream_drained(self, stream: Stream) -> None:
        """``stream`` has written out all it held: its source may go on."""
        if self.eof_from is not None and self.peer(self.eof_from) is stream:
            self.finish("%s closed connection" % self._side(self.eof_from))
            return
        self._allow(self.peer(stream))

    def stream_eof(self, stream: Stream) -> None:
        """nginx has no half-close: once one side is done and its data is
        delivered, the session ends."""
        self.eof_from = stream
        self._allow(self.client)
        self._allow(self.backend)
        if not self.peer(stream).out:
            self.finish("%s closed connection" % self._side(stream))

    def stream_error(self, stream: Stream, error: Exception) -> None:
        self.finish("%s connection error: %s" % (self._side(stream),
                                                getattr(error, "strerror", None) or error))

    def _side(self, stream: Stream) -> str:
        return "client" if stream is self.client else "upstream"

    def crashed(self, error: Exception) -> None:
        self.session.crashed(error)

    def _check_interval(self) -> float:
        return max(self.idle_timeout / 8, 0.05)

    def _check_idle(self) -> None:
        """proxy_timeout without traffic ends the session.  Rather than read
        the clock for every chunk, look at the byte counts now and then: the
        timeout is kept to within an eighth of itself."""
        now = self.client.loop.time()
        moved = self.client.received + self.client.sent + self.backend.received + self.backend.sent
        if moved != self.moved:
            self.moved, self.last_change = moved, now
        if now - self.last_change >= self.idle_timeout:
            self.session.log("info", "proxied session timed out (proxy_timeout)")
            self.finish("proxy_timeout")
        else:
            self.timer = self.client.loop.call_later(self._check_interval(), self._check_idle)

    def finish(self, outcome: str) -> None:
        self.timer.cancel()
        self.session.close(outcome)

    def cancel(self) -> None:
        """The session is closing the streams itself."""
        self.timer.cancel()

    @property
    def buffered(self) -> int:
        """Bytes held right now, both directions."""
        return len(self.client.out) + len(self.backend.out)


# -- smtp_auth none: every recipient checked, not only the first ------------

SMTP_LINE_TOO_LONG = b"500 5.5.2 Line too long\r\n"               # RFC 5321 §4.5.3.1.4
SMTP_NOT_IMPLEMENTED = b"502 5.5.1 Command not implemented\r\n"   # RFC 5321 §4.2.2
SMTP_VERB = re.compile(rb"([A-Za-z]+)(?: |\r?\n)")
# The end of message data (RFC 5321 §4.1.1.4): a line holding a lone ".".
# Lines are cut at LF here whatever comes before it, as lenient servers do
# (CVE-2023-51764, "SMTP smuggling"): the check must never believe a
# message goes on where the backend may see its end.
SMTP_END_OF_DATA = re.compile(rb"\n\.\r?\n")
# After the login these would blind the check (TLS from the client to the
# backend), impersonate a client (XCLIENT, XFORWARD), or carry bytes the
# check cannot tell from commands (BDAT chunks when the backend has no
# CHUNKING, RFC 3030): refused.
SMTP_NOT_RELAYED = frozenset([b"STARTTLS", b"XCLIENT", b"XFORWARD", b"BDAT"])


class SmtpRecipientGuard:
    """smtp_auth none with the built-in table (extension): after the first
    RCPT has opened the relay, every later RCPT is checked as the first one
    was, pipelined or not, in this transaction or the next.  Checking only
    the first makes an open relay of a backend that trusts the proxy.

    Sans-I/O, between the two sides::

        to_backend, to_client = guard.from_client(data)
        to_client, to_backend = guard.from_backend(data)

    Commands go to the backend one at a time, each once the reply to the
    one before has come (a server may answer pipelined commands as slowly
    as it likes, RFC 2920), so that a refused RCPT is answered in its place
    among the backend's replies.  Message data after a 354 goes through as
    it comes, to the line that ends it.  ``check(rcpt_line)`` returns None
    (forward it) or the reply that refuses it.  ``held`` counts the client's
    bytes waiting for their turn: the relay stops reading the client while
    it is at proxy_buffer.
    """

    COMMAND, REPLY, DATA = "command", "reply", "data"

    def __init__(self, check: Callable[[bytes], Optional[bytes]], line_limit: int):
        self.check = check
        self.line_limit = line_limit
        self.state = self.COMMAND
        self._client = LineBuffer()
        self._replies = LineBuffer()   # the backend's reply being read (state REPLY)
        self._tail = b""               # state DATA: the last bytes passed, for SMTP_END_OF_DATA
        self._skipping = False         # dropping the rest of a line that was too long

    @property
    def held(self) -> int:
        return len(self._client)

    def from_client(self, data: bytes) -> Tuple[bytes, bytes]:
        self._client += data
        return self._run()

    def from_backend(self, data: bytes) -> Tuple[bytes, bytes]:
        """The backend's bytes go to the client as they are; the end of a
        reply lets the next held command go, and a refusal of the guard's
        own follows that reply at once, wherever the reads were cut."""
        to_client, to_backend = bytearray(), bytearray()
        passed = 0                            # data[:passed] is in to_client
        position = 0
        while self.state == self.REPLY and position < len(data):
            newline = data.find(b"\n", position)
            end = len(data) if newline < 0 else newline + 1
            self._replies += data[position:end]
            position = end
            line = self._replies.take_line()
            if line is None or line[3:4] == b"-":      # RFC 5321 §4.2.1: more lines follow
                continue
            self.state = self.DATA if line[:3] == b"354" else self.COMMAND
            self._tail = b"\n"                         # the DATA line's own end
            to_client += data[passed:position]
            passed = position
            commands, replies = self._run()
            to_backend += commands
            to_client += replies
        to_client += data[passed:]
        return bytes(to_client), bytes(to_backend)

    def _run(self) -> Tuple[bytes, bytes]:
        to_backend, to_client = bytearray(), bytearray()
        while True:
            if self.state == self.DATA:
                to_backend += self._data()
            if self.state != self.COMMAND:
                break
            line = self._client.take_line(self.line_limit)
            if line is None:
                if len(self._client) < self.line_limit:
                    break
                self._client.take(self.line_limit)     # a line too long: dropped as it
                if not self._skipping:                 # comes, to its end, answered once
                    to_client += SMTP_LINE_TOO_LONG
                self._skipping = True
                continue
            if self._skipping:
                self._skipping = False
                continue
            refusal = self._refusal(line)
            if refusal is not None:
                to_client += refusal
                continue
            to_backend += line
            self.state = self.REPLY
        return bytes(to_backend), bytes(to_client)

    def _data(self) -> bytes:
        """Message data held, up to and with the line that ends it."""
        data = self._client.take_all()
        found = SMTP_END_OF_DATA.search(self._tail + data)
        if found is None:
            self._tail = (self._tail + data[-3:])[-3:]
            return data
        end = found.end() - len(self._tail)
        self._client += data[end:]
        self.state = self.REPLY
        return data[:end]

    def _refusal(self, line: bytes) -> Optional[bytes]:
        verb = SMTP_VERB.match(line)
        if verb is None:
            return SMTP_INVALID
        name = verb.group(1).upper()
        if SMTP_CONTROL_BYTES.search(strip_eol(line)) or not line.endswith(b"\r\n"):
            return SMTP_INVALID_ARGUMENT           # as the machine before the login
        if name in SMTP_NOT_RELAYED:
            return SMTP_NOT_IMPLEMENTED
        if name == b"RCPT":
            return self.check(strip_eol(line))
        return None


class CheckedRelay(Relay):
    """The relay with an SmtpRecipientGuard between the sides: what the
    client sends is read only while the guard holds less than the limit."""
    __slots__ = ("guard",)

    def __init__(self, session, client: Stream, backend: Stream, limit: int,
                 idle_timeout: float, guard: SmtpRecipientGuard):
        self.guard = guard
        super().__init__(session, client, backend, limit, idle_timeout)

    def _allow(self, source: Stream) -> None:
        room = 0 if self.eof_from is not None else self.limit - len(self.peer(source).out)
        if source is self.client:
            room -= self.guard.held
        source.set_read_budget(min(room, READ_SIZE) if room > 0 else 0)

    def stream_data(self, stream: Stream, data: bytes) -> None:
        if stream is self.client:
            to_backend, to_client = self.guard.from_client(data)
        else:
            to_client, to_backend = self.guard.from_backend(data)
        self.backend.write(to_backend)
        self.client.write(to_client)
        self._allow(self.client)
        self._allow(self.backend)


# -- plain sockets: the relay does the I/O -----------------------------------------

# os.splice is Linux's, in Python >= 3.10 (feature-detected).  The switch:
# the tests turn it off to run the buffered relay on Linux too.
RELAY_SPLICE = hasattr(os, "splice") and hasattr(os, "pipe2") and fcntl is not None
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)       # fcntl(2), Linux >= 2.6.35
RELAY_READ_MAX = 1 << 20       # the longest read of the buffered relay (a huge proxy_buffer)
SPARE_PIPES = 64               # empty pipes a worker keeps for reuse, per proxy_buffer size
# Linux's TCP_CORK: while set, the kernel sends only full segments; taking it
# off sends what is left at once.  (None elsewhere: each write goes as it is.)
TCP_CORK = getattr(socket, "TCP_CORK", None)


class Flow:
    """One direction of a DirectRelay: bytes from ``source`` to ``target``
    (Streams), at most ``limit`` held.  pump() reads the source and writes
    through to the target; flush() writes what waits when the target is
    writable again; pending() is what waits.  After an error or an EOF the
    relay has been told (it may have ended the session).

    Corking: the sockets have TCP_NODELAY (a command and its reply go at
    once), so each write leaves as a segment of its own.  A large transfer
    with a small proxy_buffer (nginx's 4k) would then cost a segment per
    chunk, on both ends.  So a pump() whose read fills the limit (more is
    likely waiting) corks the target for the rest of its burst and uncorks
    it at the end, which sends the tail at once: the kernel packs the burst
    into full segments, and a short exchange (a read that does not fill the
    limit) is never corked, nor held back.  8 streams at 4k: 0.66 of
    nginx's throughput before, 0.9 to 1.0 after, and CPU per GB 1.56x ->
    1.1 to 1.2x.  TlsFlow corks the same way."""
    __slots__ = ("relay", "source", "target", "limit", "corks")

    def __init__(self, relay: "DirectRelay", source: Stream, target: Stream, limit: int):
        self.relay, self.source, self.target, self.limit = relay, source, target, limit
        self.corks = can_cork(target)

    def answers_wait(self) -> bool:
        """Whether the source must not be read: too many of the answers
        reading it made wait for it (TlsFlow); never for plain sockets."""
        return False

    def cork(self, on: bool) -> None:
        set_cork(self.target, on)

    def send_on(self, data) -> int:
        """Send ``data`` (bytes or a memoryview) to the target at once; what
        its kernel refuses is copied into the target's ``out`` (the one
        copy), to go when it is writable again.  The bytes left waiting, or
        -1 after an error (the relay has been told)."""
        target = self.target
        try:
            sent = target.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            self.relay.stream_error(target, error)
            return -1
        target.sent += sent
        if sent < len(data):
            target.out += memoryview(data)[sent:]
        return len(data) - sent

    def send_out(self) -> bool:
        """Write what the target's ``out`` holds, as far as its kernel takes
        it; False after an error."""
        target = self.target
        try:
            sent = target.sock.send(target.out)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as error:
            self.relay.stream_error(target, error)
            return False
        target.sent += sent
        del target.out[:sent]
        return True

    def close(self) -> None:
        """Let go of what the flow holds beyond its streams."""


class BufferedFlow(Flow):
    """Through the loop's scratch buffer: recv_into it, then send from it
    at once (a memoryview, no copy).  Only what the target's kernel
    refuses is copied, into ``target.out``, and the source is not read
    again until that has been written out."""
    __slots__ = ()

    def __init__(self, relay: "DirectRelay", source: Stream, target: Stream, limit: int):
        # A read is proxy_buffer long, up to RELAY_READ_MAX.
        super().__init__(relay, source, target, min(limit, RELAY_READ_MAX))
        loop = source.loop
        if len(loop.scratch) < self.limit:
            loop.scratch = memoryview(bytearray(self.limit))

    def pending(self) -> int:
        return len(self.target.out)

    def pump(self) -> None:
        if self.target.out:
            return
        source, limit = self.source, self.limit
        scratch, receive = source.loop.scratch, source.sock.recv_into
        corked = False                             # see Flow: a burst of full reads
        try:
            for _ in range(READS_PER_EVENT):
                try:
                    count = receive(scratch, limit)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as error:
                    return self.relay.stream_error(source, error)
                if not count:
                    return self.relay.stream_eof(source)
                source.received += count
                if count == limit and self.corks and not corked:
                    corked = True
                    self.cork(True)
                if self.send_on(scratch[:count]):  # an error, or the rest when writable
                    return
                if count < limit:                  # the socket had no more
                    return
        finally:
            if corked:
                self.cork(False)

    def flush(self) -> bool:
        return self.send_out()


class PipePool:
    """A loop's spare pipes, for SpliceFlows: a flow takes one when it has
    bytes to move and gives it back as soon as it is empty, so an idle
    session holds no pipe (no descriptors, no kernel memory) and a busy
    worker makes few.  Pipes are kept per size (proxy_buffer), at most
    SPARE_PIPES of each; only empty pipes come back (SpliceFlow.held is 0),
    so no byte of one session can reach another."""

    def __init__(self):
        self.spare = {}                  # size -> [(read end, write end)]

    def take(self, size: int) -> Tuple[int, int]:
        """A pipe of ``size``; raises OSError when none can be made (EMFILE)."""
        spare = self.spare.get(size)
        return spare.pop() if spare else splice_pipe(size)

    def give(self, size: int, pipe: Tuple[int, int]) -> None:
        """``pipe``, empty, back for reuse (or closed, with enough spare)."""
        spare = self.spare.setdefault(size, [])
        if len(spare) < SPARE_PIPES:
            spare.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for spare in self.spare.values():
            for read_end, write_end in spare:
                os.close(read_end)
                os.close(write_end)
        self.spare = {}


class SpliceFlow(BufferedFlow):
    """Through a pipe with os.splice: the kernel moves the pages from the
    source socket into the pipe and from the pipe to the target socket.
    ``held``: bytes in the pipe, which the flow holds (``pipe``) only while
    it is not empty (PipePool).  With no pipe to be had (no descriptor
    left), a read goes through the scratch buffer, as BufferedFlow's: what
    the target refuses waits in its ``out``.  What the target stream holds
    there (that, or the login's last reply) goes before the pipe.  Reading
    only into an empty pipe keeps an EAGAIN from splice meaning one thing:
    the socket has nothing (never: the pipe is full)."""
    __slots__ = ("pool", "pipe", "held")

    def __init__(self, relay: "DirectRelay", source: Stream, target: Stream, limit: int):
        super().__init__(relay, source, target, limit)
        loop = source.loop
        if loop.pipes is None:
            loop.pipes = PipePool()
        self.pool = loop.pipes
        self.pipe = None                   # type: Optional[Tuple[int, int]]
        self.held = 0

    def pending(self) -> int:
        return self.held + len(self.target.out)

    def pump(self) -> None:
        """Into an empty pipe, and on at once (the hot path: flush() inlined)."""
        if self.held or self.target.out:
            return
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = self.pool.take(self.limit)
            except OSError:
                return BufferedFlow.pump(self)
        source, target, limit = self.source, self.target, self.limit
        splice = os.splice                         # novermin: Python >= 3.10, see RELAY_SPLICE
        source_fd, target_fd = source.sock.fileno(), target.sock.fileno()
        corked = False                             # see Flow: a burst of full reads
        try:
            for _ in range(READS_PER_EVENT):
                try:
                    count = splice(source_fd, pipe[1], limit, None, None, SPLICE_FLAGS)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as error:
                    return self.relay.stream_error(source, error)
                if not count:
                    self._give_back()
                    return self.relay.stream_eof(source)
                source.received += count
                self.held = count                  # in the pipe until written (an error: closed)
                if count == limit and self.corks and not corked:
                    corked = True
                    self.cork(True)
                try:
                    sent = splice(pipe[0], target_fd, count, None, None, SPLICE_FLAGS)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as error:
                    return self.relay.stream_error(target, error)
                target.sent += sent
                self.held = count - sent
                if self.held:                      # the rest when the target is writable
                    return
                if count < limit:                  # likely all the socket had
                    break
            self._give_back()
        finally:
            if corked:
                self.cork(False)

    def flush(self) -> bool:
        """Write what waits, the target's ``out`` first, then the pipe, as
        far as the target's kernel takes it; False after an error."""
        target = self.target
        if target.out:
            if not self.send_out():
                return False
            if target.out:
                return True
        while self.held:
            try:
                count = os.splice(self.pipe[0], target.sock.fileno(),  # novermin
                                  self.held, None, None, SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as error:
                self.relay.stream_error(target, error)
                return False
            if not count:                          # a bug in the count: never loop on it
                raise RuntimeError("the relay's pipe is empty, %d bytes short" % self.held)
            target.sent += count
            self.held -= count
        self._give_back()
        return True

    def _give_back(self) -> None:
        """The pipe, empty now, back to the pool."""
        if self.pipe is not None and not self.held:
            self.pool.give(self.limit, self.pipe)
            self.pipe = None

    def close(self) -> None:
        """The session's end: an empty pipe goes back, one with bytes in it
        is closed (they are lost with the session, as ``out`` is)."""
        self._give_back()
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe, self.held = None, 0


# One TLS record: 2**14 bytes of plaintext, and its header, tag and padding.
TLS_RECORD_ROOM = 16384 + 256


class TlsFlow(Flow):
    """Through TLS on the source, the target or both: read ciphertext or
    plaintext, decrypt or encrypt with the stream's TlsLayer, send on at
    once; what the target's kernel refuses waits in ``target.out``, and the
    source is not read again until that has been written out.  One read is
    at most proxy_buffer (up to READ_SIZE: recv allocates what it may
    read), as nginx's SSL_read into its buffer; the records it completes
    may hold up to one record more.

    Reading the source's TLS can make its layer answer (an alert, the reply
    to a TLS 1.3 KeyUpdate, RFC 8446 §4.6.3): that goes to the source,
    behind what waits for it.  A peer that asks for answers and never reads
    them must not make the proxy keep them all: once more than two records
    beyond proxy_buffer of them wait for the source (answers_wait), it is
    not read until it has read them (DirectRelay._watch).  Only answers
    count: what else waits for the source (the other flow's bytes, what the
    streams held at the start, such as commands the client pipelined behind
    its login) never stops it being read, or a backend that answers one
    command before it reads the next could wait forever."""
    __slots__ = ("answered",)

    def __init__(self, relay: "DirectRelay", source: Stream, target: Stream, limit: int):
        super().__init__(relay, source, target, min(limit, READ_SIZE))
        self.answered = 0              # the answers queued for the source (answer)

    def pending(self) -> int:
        return len(self.target.out)

    def flush(self) -> bool:
        return self.send_out()

    def answers_wait(self) -> bool:
        # The answers are the tail of the source's ``out``: the other flow
        # writes there only when it is empty.  ``answered`` counts them
        # since it was last empty; what has gone of them, the length tells.
        waiting = len(self.source.out)
        if not waiting:
            self.answered = 0
        return min(self.answered, waiting) > self.relay.limit + 2 * TLS_RECORD_ROOM

    def pump(self) -> None:
        if self.target.out or self.answers_wait():
            return
        source, target, limit = self.source, self.target, self.limit
        receive = source.sock.recv
        source_tls, target_tls = source.tls, target.tls
        corked = False                             # see Flow: a burst of full reads
        try:
            for _ in range(READS_PER_EVENT):
                try:
                    data = receive(limit)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as error:
                    return self.relay.stream_error(source, error)
                source.received += len(data)
                full = len(data) == limit
                ended = not data
                if source_tls is not None:
                    data = self.decrypt(data)
                    if data is None:               # a TLS error: the relay has been told
                        return
                    ended = source_tls.state == TlsState.CLOSED
                if data:
                    if full and self.corks and not corked:
                        corked = True
                        self.cork(True)
                    if target_tls is not None:
                        try:
                            data = target_tls.encrypt(data)
                        except TlsError as error:
                            return self.relay.stream_error(target, error)
                    left = self.send_on(data)
                    if left:                       # an error, or the rest when writable
                        if left > 0 and ended:
                            self.relay.stream_eof(source)   # the end once that is written
                        return
                if ended:                          # EOF, close_notify
                    return self.relay.stream_eof(source)
                if not full:                       # likely all the socket had
                    return
                if self.answers_wait():            # the source reads no answers: hold it
                    return
        finally:
            if corked:
                self.cork(False)

    def decrypt(self, ciphertext: bytes) -> Optional[bytes]:
        """The plaintext ``ciphertext`` completes (b"" at the end: the
        layer is CLOSED then), or None after a TLS error, which the relay
        has been told of.  What the layer answers goes to the source."""
        layer = self.source.tls
        try:
            plaintext = layer.receive_data(ciphertext)
        except TlsError as error:
            self.answer(layer.data_to_send())      # the alert, if any
            self.relay.stream_error(self.source, error)
            return None
        self.answer(layer.data_to_send())
        return plaintext

    def answer(self, data: bytes) -> None:
        """Send ``data`` to the source, behind what waits for it (the other
        flow's ``target.out``); what its kernel refuses waits there too,
        counted in ``answered`` (answers_wait)."""
        if not data:
            return
        source = self.source
        if not source.out:
            try:
                sent = source.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0                           # the other flow hears of it
            source.sent += sent
            data = data[sent:]
        if data:
            source.out += data
            self.answered += len(data)
            self.relay._watch()


class DirectRelay(Relay):
    """The relay between two sockets, doing their I/O itself (it is both
    streams' driver): ``upload`` moves the client's bytes to the backend,
    ``download`` the backend's to the client: two TlsFlows when either side
    has TLS, else two SpliceFlows with ``splice``, else two BufferedFlows.
    A side is read while nothing read from it waits and no side has closed;
    it is watched for writing while the flow into it has something waiting.
    The ends (EOF, errors, proxy_timeout) are Relay's, with the pipes'
    bytes counted in."""
    __slots__ = ("upload", "download")

    def __init__(self, session, client: Stream, backend: Stream, limit: int,
                 idle_timeout: float, splice: bool = False):
        if client.tls is not None or backend.tls is not None:
            flow = TlsFlow
        else:
            flow = SpliceFlow if splice else BufferedFlow
        self.upload = flow(self, client, backend, limit)
        self.download = flow(self, backend, client, limit)
        client.driver = backend.driver = self
        # The streams read no more themselves (nor go on with a read loop
        # they were in when the login ended: what they read goes to
        # Relay.stream_data, in order).
        client.read_budget = backend.read_budget = 0
        super().__init__(session, client, backend, limit, idle_timeout)

    def _allow(self, source: Stream) -> None:
        self._watch()

    def _watch(self) -> None:
        reading = self.eof_from is None
        up, down = self.upload.pending(), self.download.pending()
        # A side whose TLS layer's answers pile up unread is not read
        # either, until it reads them (TlsFlow.answers_wait).
        self.client.watch((selectors.EVENT_READ if reading and not up
                           and not self.upload.answers_wait() else 0) |
                          (selectors.EVENT_WRITE if down else 0))
        self.backend.watch((selectors.EVENT_READ if reading and not down
                            and not self.download.answers_wait() else 0) |
                           (selectors.EVENT_WRITE if up else 0))

    def readable(self, stream: Stream) -> None:
        if stream.closed:                          # ended earlier in this turn of the loop
            return
        if self.eof_from is not None:              # the other side ended earlier in this turn:
            self._watch()                          # nothing more is read (stream_eof)
            return
        flow = self.upload if stream is self.client else self.download
        flow.pump()
        if flow.pending() or self.eof_from is not None:
            self._watch()                          # else the interest is as it was

    def writable(self, stream: Stream) -> None:
        if stream.closed:
            return
        flow = self.download if stream is self.client else self.upload
        if not flow.flush():
            return
        if not flow.pending():
            if self.eof_from is flow.source:
                self.finish("%s closed connection" % self._side(flow.source))
                return
            if self.eof_from is None:
                flow.pump()                        # its source waits, likely with more
        self._watch()

    def stream_eof(self, stream: Stream) -> None:
        """As Relay's: nothing more is read; the end once what ``stream``
        sent is written out."""
        self.eof_from = stream
        flow = self.upload if stream is self.client else self.download
        if not flow.pending():
            self.finish("%s closed connection" % self._side(stream))

    def finish(self, outcome: str) -> None:
        self.cancel()
        super().finish(outcome)

    def cancel(self) -> None:
        self.timer.cancel()
        self.upload.close()
        self.download.close()

    @property
    def buffered(self) -> int:
        return self.upload.pending() + self.download.pending()


def can_cork(stream: Stream) -> bool:
    """Whether ``stream`` can be corked: TCP, on a system with TCP_CORK."""
    return TCP_CORK is not None and stream.sock.family in (socket.AF_INET, socket.AF_INET6)


def set_cork(stream: Stream, on: bool) -> None:
    """TCP_CORK on ``stream``, or off (which sends what it held at once)."""
    if stream.closed:
        return
    try:
        stream.sock.setsockopt(socket.IPPROTO_TCP, TCP_CORK, on)
    except OSError:
        pass


def splice_pipe(size: int) -> Tuple[int, int]:
    """(read end, write end) of a pipe for a SpliceFlow: non-blocking, not
    inherited, room for ``size`` bytes where the system allows (the kernel
    rounds up to a power of two pages; past /proc/sys/fs/pipe-max-size, or
    once the user's pipes hold fs/pipe-user-pages-soft, it keeps its
    default, 16 pages).  Raises OSError (EMFILE, say)."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(write_end, F_SETPIPE_SZ, size)
    except OSError:
        pass
    return read_end, write_end


def can_splice(client: Stream, backend: Stream) -> bool:
    """Whether a session's relay splices: os.splice here (RELAY_SPLICE),
    and TCP on both sides (a unix socket is relayed through buffers),
    without TLS (the layer must see the bytes)."""
    tcp = (socket.AF_INET, socket.AF_INET6)
    return (RELAY_SPLICE and client.sock.family in tcp and backend.sock.family in tcp
            and client.tls is None and backend.tls is None)


def start_relay(session, client: Stream, backend: Stream, server: Settings,
                check: Optional[Callable], client_trailing: bytes, backend_trailing: bytes) -> Relay:
    """The relay of a session just logged in, given what each side sent
    ahead (the client's pipelined commands, what the backend sent behind
    its reply): those go through the streams' buffers, and a DirectRelay
    writes them out before anything it reads.  With ``check``, every later
    RCPT is checked (SmtpRecipientGuard)."""
    if check is None:
        backend.write(client_trailing)
        client.write(backend_trailing)
        return DirectRelay(session, client, backend, server.proxy_buffer, server.proxy_timeout,
                           can_splice(client, backend))
    guard = SmtpRecipientGuard(check, server.smtp_client_buffer)
    relay = CheckedRelay(session, client, backend, server.proxy_buffer, server.proxy_timeout, guard)
    relay.stream_data(client, client_trailing)
    relay.stream_data(backend, backend_trailing)
    return relay


# ========================================================================== #
# ####          Outbound clients: the backend, auth_http, DNS           #### #
# ========================================================================== #
# The connections a session opens: to its backend until the login is done
# (then the relay takes the stream), to the auth server, one request on a
# connection of its own (as nginx: no keep-alive), and the resolver's UDP
# queries, with a small cache, for the SMTP client's name.  Each is driven
# by the event loop and calls back with its result; what they say is built
# and parsed by the sans-I/O code above.  The active checks of a pool's
# servers (health_check) are connections of the same kind, made by the
# worker rather than a session.  The user table's password checks are work
# of the same kind: handed out to threads, their verdicts come back
# through the loop's wake-up.

class AuthHttpExchange(StreamOwner):
    """One auth_http request on a connection of its own, as nginx (no
    keep-alive): connect, send, read the answer, all under
    auth_http_timeout.  ``done(response, error)``: an AuthHttpResponse, or
    None and nginx's log message."""

    def __init__(self, loop: EventLoop, url: AuthHttpUrl, request: bytes, timeout: float,
                 done: Callable):
        self.url = url
        self.request = request
        self.done = done
        self.parser = AuthHttpParser()
        self.stream = None             # type: Optional[Stream]
        self.timer = loop.call_later(timeout, lambda: self._finish(
            None, "auth http server %s timed out" % url.text))
        family, sockaddr = url.address
        try:
            self.stream = connect_stream(loop, family, sockaddr, self, nodelay=False,
                                         first=request)
        except OSError as error:
            loop.call_later(0, lambda failure=error: self.stream_error(None, failure))

    def stream_data(self, stream: Stream, data: bytes) -> None:
        try:
            response = self.parser.receive_data(data)
        except AuthHttpError as error:
            return self._finish(None, str(error).replace("%s", self.url.text, 1))
        if response is not None:
            self._finish(response, "")

    def stream_eof(self, stream: Stream) -> None:
        self.stream_data(stream, b"")

    def stream_error(self, stream, error: OSError) -> None:
        self._finish(None, "connect() to auth http server %s failed (%s: %s)" % (
            self.url.text, error.errno, error.strerror))

    def _finish(self, response: Optional[AuthHttpResponse], error: str) -> None:
        if self.done is None:
            return
        done, self.done = self.done, None
        self.cancel()
        done(response, error)

    def cancel(self) -> None:
        self.done = None
        self.timer.cancel()
        if self.stream is not None:
            self.stream.close()


class BackendConnection(StreamOwner):
    """The way to the backend until it has logged the user in: connect() to
    each of the upstream's addresses in turn, the PROXY header first if one
    is given (in clear), implicit TLS or the script's STARTTLS (extension),
    then the login script (BackendLogin).  ``stream`` is the connection.

    The owner hears backend_connected(stream) when the dialogue begins,
    then backend_logged_in(reply) (``login.trailing_data`` is what the
    backend sent behind its answer), or backend_failed(outcome, refusal)
    (no connection, no TLS, or the script failed: logged here already, as
    nginx does, with ``log``, the session's; ``refusal`` is the backend's
    reply for the client, if proxy_pass_error_message lets it through).
    With ``verdicts`` (auth = backend), a no to the client's own login and
    password (BackendError.verdict) is no failure of the backend: the owner
    hears backend_refused(line) instead, and nothing is logged here.
    After a failure nothing more is read; close() ends it at any time.

    With a ``pool`` (extension, README "Several backends") the server is
    the pool's choice for ``key`` (``upstream``'s port, if any, names the
    server to try first), and the owner hears backend_chosen(upstream) for
    each server tried.  A server that cannot be connected to, fails TLS,
    closes or greets wrongly before its greeting is through, or times out
    (the owner's timer: timed_out()), counts as failed in the pool and the
    login starts again on the next server, with a new BackendLogin from
    ``relogin()``, so that the client sees no error while one is alive;
    backend_connected(stream) then comes again, with the new stream.
    take_lease() hands the session its place on the server it logged in to."""

    def __init__(self, loop: EventLoop, server: Settings, upstream: Upstream, login: BackendLogin,
                 tls_mode: str, proxy_header: bytes, owner, log: Callable, verdicts: bool = False,
                 pool: Optional[Pool] = None, relogin: Optional[Callable] = None, key: bytes = b""):
        self.loop = loop
        self.server = server
        self.upstream = upstream
        self.login = login
        self.tls_mode = tls_mode
        self.proxy_header = proxy_header
        self.owner = owner
        self.log = log
        self.verdicts = verdicts
        self.addresses = list(upstream.addresses)
        self.stream = None             # type: Optional[Stream]
        self.connecting = True
        self.pool = pool
        self.relogin = relogin         # a new BackendLogin for the next server of the pool
        self.key = key                 # what user_hash hashes: the login
        self.tried = []                # the pool's servers tried by this login, the last one now
        self.lease = None              # type: Optional[PoolLease]
        if pool is None:
            self._connect_next()
            return
        prefer = (upstream.host, upstream.port) if upstream.port else None
        if not self._choose(prefer):
            self.log("error", 'no live upstreams in upstream "%s"' % pool.name)
            self.owner.backend_failed("no live upstreams")

    def close(self) -> None:
        self.addresses = []
        self.pool = self.relogin = None    # no other server after this (and no password)
        if self.lease is not None:
            self.lease.release()
        if self.stream is not None:
            self.stream.close()

    cancel = close

    def take_lease(self) -> Optional[PoolLease]:
        """The session's place on its server, now the session's to release."""
        lease, self.lease = self.lease, None
        return lease

    def crashed(self, error: Exception) -> None:
        self.owner.crashed(error)

    def _choose(self, prefer: Optional[Tuple[str, int]] = None) -> bool:
        """The pool's next server for this login, connected to now; False
        if none is left."""
        choice = self.pool.choose(self.key, self.loop.time(), self.tried, prefer)
        if choice is None:
            return False
        if self.tried:
            self.login = self.relogin()
        self.tried.append(choice)
        self.lease = self.pool.lease(choice)
        self.upstream = choice.address._replace(pool=self.pool.name)
        self.addresses = list(choice.address.addresses)
        self.connecting = True
        self.owner.backend_chosen(self.upstream)
        self._connect_next()
        return True

    def _failed(self, outcome: str, refusal: bytes = b"", fault: bool = False) -> None:
        """The end of this server's try: with a pool and the server at
        ``fault``, the next server; else the owner hears of it."""
        if fault and self.pool is not None and self._fail_over(outcome):
            return
        self.close()
        self.owner.backend_failed(outcome, refusal)

    def _fail_over(self, outcome: str) -> bool:
        """Count the failure against the server, and start again on the
        pool's next; False if no server is left (logged)."""
        pool, failed = self.pool, self.tried[-1]
        disabled = pool.failed(failed, self.loop.time(), FAILURE_KIND_OF.get(outcome, "greeting"))
        if disabled:
            self.log("warn", disabled)
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.lease.release()
        self.lease = None
        self.log("warn", 'upstream server %s of upstream "%s" failed (%s), the login goes on '
                 "with the next server" % (failed.text, pool.name, outcome))
        if self._choose():
            return True
        self.log("error", 'no live upstreams in upstream "%s"' % pool.name)
        return False

    def timed_out(self) -> bool:
        """The owner's timer ran out on this server (logged by the owner):
        True if the login goes on with another server of the pool (the
        owner arms its timer again), False if the owner should give up."""
        if self.pool is None:
            return False
        return self._fail_over("upstream timed out")

    def _connect_next(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if not self.addresses:
            return self._failed("upstream unreachable", fault=True)
        family, sockaddr = self.addresses.pop(0)
        try:
            self.stream = connect_stream(self.loop, family, sockaddr, self)
        except OSError as error:
            self.log("error", "connect() failed (%s: %s)" % (error.errno, error.strerror))
            self._connect_next()

    def stream_connected(self, stream: Stream) -> None:
        self.connecting = False
        self.owner.backend_connected(stream)
        stream.set_read_budget(READ_SIZE)
        if self.proxy_header:
            stream.write(self.proxy_header)    # in clear, before anything else
        if self.tls_mode == "ssl":
            self._start_tls()                  # extension: implicit TLS to the backend
        stream.write(self.login.data_to_send())

    def _start_tls(self) -> None:
        name = self.server.proxy_ssl_name or self.upstream.host
        self.stream.start_tls(TlsLayer(self.server.backend_tls_context, server_side=False,
                                       server_hostname=name))

    def stream_tls_ready(self, stream: Stream) -> None:
        if self.login.script and isinstance(self.login.script[0], TlsStep):
            self.login.tls_started()
            stream.write(self.login.data_to_send())

    def stream_data(self, stream: Stream, data: bytes) -> None:
        try:
            events = self.login.receive_data(data)
        except BackendError as error:
            return self._refused(error)
        stream.write(self.login.data_to_send())
        for event in events:
            if isinstance(event, BackendStartTls):
                self._start_tls()
            else:
                if self.pool is not None:
                    self.pool.succeeded(self.tried[-1])
                self.owner.backend_logged_in(event.reply)

    def stream_eof(self, stream: Stream) -> None:
        self._refused(BackendError("upstream prematurely closed connection"))

    def _refused(self, error: BackendError) -> None:
        """nginx: log the bad line; the client gets the internal error, or
        with proxy_pass_error_message on, the backend's own refusal.  Before
        the greeting is through, it is the server's fault (a pool goes on
        with the next server)."""
        line = error.line
        fault = not self.login.greeted
        if error.verdict and self.verdicts:
            self.close()
            return self.owner.backend_refused(line)
        if error.refusal and self.server.proxy_pass_error_message and \
                not (fault and self.pool is not None):
            self.log("info", '%s: "%s"' % (error, log_escape(strip_eol(line))))
            return self._failed("upstream refused the login", line)
        detail = ' "%s"' % log_escape(strip_eol(line)) if line else ""
        self.log("error", "%s%s" % ("%s:" % error if detail else error, detail))
        self._failed(error.outcome, fault=fault)

    def stream_error(self, stream: Stream, error: Exception) -> None:
        if isinstance(error, TlsError):
            self.log("error", "upstream %s" % error, action="SSL handshaking to upstream")
            return self._failed("upstream TLS error", fault=True)
        if self.connecting:
            self.log("error", "connect() failed (%s: %s)" % (error.errno, error.strerror))
            return self._connect_next()
        self.log("error", "upstream connection error (%s: %s)" % (error.errno, error.strerror))
        self._failed("upstream connection error", fault=not self.login.greeted)


def open_backend(loop: EventLoop, server: Settings, attempt: LoginAttempt, outcome: AuthOutcome,
                 local: Tuple[str, int], owner, log: Callable,
                 verdicts: bool = False, debug: bool = False,
                 pool: Optional[Pool] = None, session: int = 0) -> BackendConnection:
    """Connect to ``outcome.upstream`` and log in there as ``outcome``
    says (login_script, TLS, the PROXY header naming ``local``, the
    address the client connected to); ``owner`` hears how it went
    (BackendConnection).  ``debug``: each step of the login script in
    ``log`` at debug (BackendLogin's trace: names and codes only).
    ``pool``: the Pool ``outcome.upstream`` goes through (Pools.pool_for);
    its choice is keyed by the login (the client's address without one).
    ``session``: the session's number, for imap_id's x-session-id."""
    tls_mode = backend_tls_mode(server, outcome)
    header = proxy_header_to_backend(server.proxy_protocol, attempt, local)
    trace = (lambda text: log("debug", "backend: %s", text)) if debug else None

    def relogin() -> BackendLogin:
        script = login_script(server, attempt, outcome, tls_mode == "starttls", local, session)
        return BackendLogin(script, attempt.tag, server.proxy_buffer, trace)
    key = outcome.login if outcome.login is not None else attempt.credentials.login
    return BackendConnection(loop, server, outcome.upstream, relogin(), tls_mode, header, owner,
                             log, verdicts, pool, relogin if pool is not None else None,
                             key or attempt.client_address.encode("utf-8"))


# -- the active check of a pool's servers (health_check = on, extension) -------------
# Off the login path: a timer per pool, one connection per server and round,
# closed as soon as the greeting's first line has come (after the protocol's
# goodbye, so that the backend logs a client that left, not an error).

HEALTH_GOODBYES = ((b"* OK", b"H1 LOGOUT\r\n"), (b"+OK", b"QUIT\r\n"), (b"220", b"QUIT\r\n"))


class HealthProbe(StreamOwner):
    """One check of one server: connect, then the first line, within
    ``timeout``; ``done(ok, why)``: a mail server's ready greeting (IMAP's
    ``* OK``, POP3's ``+OK``, SMTP's ``220``), or what went wrong.  The
    pool's backend dialogue (``settings``) decides what comes first, as for
    a login: a PROXY header (v1's UNKNOWN, v2's LOCAL: probe_proxy_header)
    and, with proxy_ssl, the TLS handshake."""

    def __init__(self, loop: EventLoop, address: Upstream, timeout: float, done: Callable,
                 settings: Optional[Settings] = None):
        self.done = done
        self.address = address
        self.settings = settings
        self.stream = None             # type: Optional[Stream]
        self.line = LineBuffer()
        self.timer = loop.call_later(timeout, lambda: self._finish(False, "timed out"))
        family, sockaddr = address.addresses[0]
        try:
            self.stream = connect_stream(loop, family, sockaddr, self)
        except OSError as error:
            loop.call_later(0, lambda failure=error: self.stream_error(None, failure))

    def stream_connected(self, stream: Stream) -> None:
        stream.set_read_budget(PAGE_SIZE)
        settings = self.settings
        if settings is None:
            return
        if settings.proxy_protocol != "off":
            stream.write(probe_proxy_header(settings.proxy_protocol))
        if settings.proxy_ssl and settings.backend_tls_context is not None:
            stream.start_tls(TlsLayer(settings.backend_tls_context, server_side=False,
                                      server_hostname=settings.proxy_ssl_name or self.address.host))

    def stream_data(self, stream: Stream, data: bytes) -> None:
        self.line += data
        line = self.line.take_line(PAGE_SIZE)
        if line is None:
            if len(self.line) >= PAGE_SIZE:
                self._finish(False, "no greeting line")
            return
        goodbye = next((bye for start, bye in HEALTH_GOODBYES if line.startswith(start)), None)
        if goodbye is None:
            return self._finish(False, 'greeting "%s"' % log_escape(strip_eol(line[:80])))
        stream.write(goodbye)
        self._finish(True, "")

    def stream_eof(self, stream: Stream) -> None:
        self._finish(False, "closed before its greeting")

    def stream_error(self, stream, error: Exception) -> None:
        if isinstance(error, OSError):
            self._finish(False, "connect() failed (%s: %s)" % (error.errno, error.strerror))
        else:
            self._finish(False, str(error))

    def crashed(self, error: Exception) -> None:
        self._finish(False, "internal error: %r" % error)

    def _finish(self, ok: bool, why: str) -> None:
        done, self.done = self.done, None
        self.timer.cancel()
        if self.stream is not None:
            self.stream.close()
        if done is not None:
            done(ok, why)


class HealthChecks:
    """A worker's active checks: each pool with health_check, every
    interval, each server that is not ``down`` (Pool.checked decides and
    says what to log).  ``running()`` false: no more rounds (the worker
    stops); a pool replaced by a reload stops being checked, and start()
    begins the new ones.  Each worker checks for itself, as it counts
    failures for itself."""

    def __init__(self, loop: EventLoop, pools: Pools, log: Callable[[str, str], None],
                 running: Callable[[], bool],
                 settings_for: Callable[[str], Optional[Settings]] = lambda pool: None):
        self.loop = loop
        self.pools = pools
        self.log = log
        self.running = running
        self.settings_for = settings_for     # a pool's backend dialogue (PROXY header, TLS)
        self.checked = set()           # id() of the pools being checked

    def start(self) -> None:
        for pool in self.pools.pools.values():
            if pool.spec.health_check is not None and id(pool) not in self.checked:
                self.checked.add(id(pool))
                self.loop.call_later(0, lambda pool=pool: self._round(pool))

    def _round(self, pool: Pool) -> None:
        if not self.running() or self.pools.pools.get(pool.name) is not pool:
            self.checked.discard(id(pool))
            return
        check = pool.spec.health_check
        settings = self.settings_for(pool.name)
        for server in pool.spec.servers:
            if not server.down:
                HealthProbe(self.loop, server.address, check.timeout,
                            lambda ok, why, server=server: self._verdict(pool, server, ok, why),
                            settings)
        self.loop.call_later(check.interval, lambda: self._round(pool))

    def _verdict(self, pool: Pool, server: UpstreamServer, ok: bool, why: str) -> None:
        said = pool.checked(server, ok, why)
        if said is not None:
            self.log(*said)


# -- the capabilities before login, probed (capabilities_from = backend, extension) --
# Off the login path, as the active check: a worker asks each backend that a
# server with capabilities_from = backend passes to, when it starts and
# after each reload, and again every CAPABILITY_PROBE_RETRY while no server
# of it has answered.  Until one has, sessions advertise the configured
# list; a session never waits for a probe.

CAPABILITY_PROBE_TIMEOUT = 5.0     # connect, greeting and answer, per server tried
CAPABILITY_PROBE_RETRY = 10.0      # after every server failed, the next round


class CapabilityProbe:
    """One question to one backend address: a BackendConnection running
    capability_probe_script (with the server's backend TLS and PROXY
    settings) under ``timeout``; ``done(items, why)``: the probed list, or
    None and what went wrong."""

    def __init__(self, loop: EventLoop, settings: Settings, address: Upstream, timeout: float,
                 done: Callable):
        self.done = done
        self.protocol = settings.protocol
        self.why = "no answer"
        self.connection = None         # type: Optional[BackendConnection]
        self.timer = loop.call_later(timeout, lambda: self._finish(None, "timed out"))
        tls_mode = "ssl" if settings.proxy_ssl else "starttls" if settings.proxy_starttls \
            else "plain"
        script = capability_probe_script(settings.protocol, settings.server_name,
                                         tls_mode == "starttls")
        connection = BackendConnection(loop, settings, address,
                                       BackendLogin(script, b"", settings.proxy_buffer), tls_mode,
                                       probe_proxy_header(settings.proxy_protocol), self, self._note)
        if self.done is None:
            connection.close()         # it failed at once
        else:
            self.connection = connection

    def _note(self, level: str, message: str, *args, **context) -> None:
        self.why = message % args if args else message      # what BackendConnection logs

    def backend_connected(self, stream: Stream) -> None:
        pass

    def backend_logged_in(self, reply: bytes) -> None:
        self._finish(probed_capabilities(self.protocol, reply), "")

    def backend_failed(self, outcome: str, refusal: bytes = b"") -> None:
        self._finish(None, self.why)

    def backend_refused(self, line: bytes) -> None:
        self._finish(None, "refused")

    def crashed(self, error: Exception) -> None:
        self._finish(None, "internal error: %r" % error)

    def _finish(self, items: Optional[List[str]], why: str) -> None:
        done, self.done = self.done, None
        self.timer.cancel()
        if self.connection is not None:
            self.connection.close()
        if done is not None:
            done(items, why)


class CapabilityProbes:
    """A worker's probed capabilities (capabilities_from = backend): start()
    asks, for each server of a configuration, the backend its proxy_pass
    names (a pool: its servers in turn, the first answer wins);
    settings_for() is the Settings a session's client machine is made with:
    the server's own, or a copy whose imap_capabilities (pop3_, smtp_) is
    advertised_capabilities of what its backend said.  What a probe learned
    stays until a later probe of the same backend learns otherwise (a
    reload asks again).  ``log(level, message)``; ``running()`` false: no
    more rounds."""

    def __init__(self, loop: EventLoop, log: Callable[[str, str], None],
                 running: Callable[[], bool]):
        self.loop = loop
        self.log = log
        self.running = running
        self.known = {}                # probe key -> the backend's list
        self.failing = set()           # probe keys whose last round failed (logged once)
        self.round = 0                 # start()'s count: older rounds stop
        self.copies = {}               # id(server) -> (server, probe key, probed list, Settings)

    @staticmethod
    def target(config: "Config", server: Settings) -> Optional[Tuple[tuple, Settings, list]]:
        """(key, settings, addresses) of ``server``'s probe; None if its
        capabilities are the configured ones.  The key: what the answer
        depends on (protocol, backend, TLS, PROXY, our EHLO name)."""
        upstream = server.proxy_pass
        if upstream is None:
            return None
        settings = backend_settings(config, server, upstream)
        if settings.capabilities_from != "backend" or server.protocol not in CAPABILITIES_DIRECTIVE:
            return None
        if upstream.pool:
            spec = (config.upstreams or {}).get(upstream.pool)
            addresses = [each.address for each in spec.servers if not each.down] if spec else []
        else:
            addresses = [upstream]
        key = (server.protocol, upstream.text, tuple(each.text for each in addresses),
               settings.proxy_ssl, settings.proxy_starttls, settings.proxy_protocol,
               settings.server_name)
        return key, settings, addresses

    def start(self, config: "Config") -> None:
        """Ask every backend ``config`` wants probed (its first round when
        the loop runs); what is no longer wanted is forgotten."""
        self.round += 1
        wanted = {}
        for server in config.servers:
            target = self.target(config, server)
            if target is not None:
                wanted[target[0]] = target
        self.known = {key: items for key, items in self.known.items() if key in wanted}
        self.failing &= set(wanted)
        self.copies = {}
        for key, settings, addresses in wanted.values():
            self.loop.call_later(0, lambda key=key, settings=settings, addresses=addresses,
                                 number=self.round: self._ask(number, key, settings, addresses, 0))

    def _ask(self, number: int, key: tuple, settings: Settings, addresses: list,
             index: int) -> None:
        if number != self.round or not self.running():
            return
        if index >= len(addresses):
            if key not in self.failing:
                self.failing.add(key)
                self.log("warn", "cannot probe the capabilities of %s %s, %s advertised "
                         "until it answers (tried again every %s)"
                         % (key[0], key[1], "the configured ones are" if key not in self.known
                            else "the last ones probed are", time_text(CAPABILITY_PROBE_RETRY)))
            self.loop.call_later(CAPABILITY_PROBE_RETRY,
                                 lambda: self._ask(number, key, settings, addresses, 0))
            return

        def done(items: Optional[List[str]], why: str) -> None:
            if items is None:        # said at info once, not every round while it fails
                self.log("debug" if key in self.failing else "info", "capabilities probe of %s %s at %s failed: %s"
                         % (key[0], key[1], addresses[index].text, why))
                return self._ask(number, key, settings, addresses, index + 1)
            self._learned(key, addresses[index], items)
        CapabilityProbe(self.loop, settings, addresses[index], CAPABILITY_PROBE_TIMEOUT, done)

    def _learned(self, key: tuple, address: Upstream, items: List[str]) -> None:
        self.failing.discard(key)
        if self.known.get(key) != items:
            separator = " " if key[0] == "imap" else '", "'     # POP3's, SMTP's are lines
            self.log("notice", 'capabilities of %s %s probed at %s: "%s"'
                     % (key[0], key[1], address.text, separator.join(items)))
        self.known[key] = items

    def settings_for(self, config: "Config", server: Settings) -> Settings:
        """The Settings a session of ``server`` makes its client machine
        with: with capabilities_from = backend and an answer known, a copy
        of ``server`` advertising it; else ``server`` itself."""
        if not self.known:
            return server
        cached = self.copies.get(id(server))
        if cached is not None and cached[0] is server and self.known.get(cached[1]) is cached[2]:
            return cached[3]
        target = self.target(config, server)
        key = target[0] if target is not None else None
        items = self.known.get(key)
        copy = server
        if items is not None:
            directive = CAPABILITIES_DIRECTIVE[server.protocol]
            copy = Settings(dict(vars(server), **{directive: advertised_capabilities(
                server.protocol, items, getattr(server, directive))}))
        self.copies[id(server)] = (server, key, items, copy)
        return copy


# -- password checks, off the event loop ------------------------------------------
# Hashing a password costs milliseconds of CPU (PBKDF2 at --hash-password's
# cost: some 25 ms).  On the loop, every other session of the worker waits
# for it: 40 wrong logins at once held another session's NOOP for up to a
# second (issue 14).  A few threads hash instead: hashlib.pbkdf2_hmac
# releases the GIL, so they run beside the loop, and beside each other on
# other CPUs.  SHA-crypt is pure Python and holds the GIL while it hashes:
# in a thread it still held the loop (a NOOP behind 40 wrong SHA512-CRYPT
# logins waited 20 ms at p50, up to 46 ms), so a pool thread hands it on to
# a process of its own (PasswordHelper), and waits for the answer without
# the GIL.

PASSWORD_CHECK_THREADS = 4     # per worker: hashing is CPU work, and the workers share the CPUs
PASSWORD_CHECK_LIMIT = 8       # checks in the threads' hands at once; the others wait, in order
GIL_BOUND_SCHEMES = ("SHA256-CRYPT", "SHA512-CRYPT", "MD5-CRYPT")   # checked in a PasswordHelper process

# The helper process's program: this file, loaded by its path (it need not
# be importable by name; importing it only defines names), then its loop.
# The recipe is importlib's documented one for a source file.
PASSWORD_HELPER_PROGRAM = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("mailproxy_password_helper", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
module.password_helper_main()
"""
PASSWORD_HELPER_FILE = os.path.abspath(__file__)     # now, before anything could chdir


def password_helper_main() -> None:
    """The helper process (PasswordHelper).  The signals that steer
    mailproxy (Ctrl-C, reload, graceful stop, sent to the whole process
    group) are ignored: its worker says when it ends."""
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    serve_password_checks(sys.stdin.buffer, sys.stdout.buffer)


def serve_password_checks(requests, replies) -> None:
    """The helper process's loop.  A request: a 4-byte length, then SCHEME
    NUL DATA NUL PASSWORD; its reply: "1" if the password matches the entry
    (password_matches), "0" if not.  It ends at the end of ``requests``:
    the worker closed its end, or is gone."""
    while True:
        header = requests.read(4)
        if len(header) < 4:
            return
        body = requests.read(struct.unpack("!I", header)[0])
        scheme, data, password = body.split(b"\0", 2)
        entry = PasswordEntry(scheme.decode("ascii"), data.decode("utf-8"))
        replies.write(b"1" if password_matches(entry, password) else b"0")
        replies.flush()


class PasswordHelper:
    """How one pool thread checks a password: matches(entry, password) is
    password_matches's answer, worked out in this thread, or, for an entry
    of GIL_BOUND_SCHEMES, in the thread's own helper process.  That process
    starts at the first such check: a new interpreter (subprocess: fork and
    exec at once, which is safe with threads running) that reads this file
    again, so the user the workers run as must be able to read it; it has
    none of the worker's sockets.  It ends when close() kills it, or when
    its input ends because the worker is gone.  If it dies, matches()
    raises RuntimeError (that session ends) and the next check starts
    another."""

    def __init__(self):
        self.process = None            # type: Optional[subprocess.Popen]

    def matches(self, entry: PasswordEntry, password: bytes) -> bool:
        if entry.scheme not in GIL_BOUND_SCHEMES:
            return password_matches(entry, password)
        if self.process is None:
            self.process = subprocess.Popen(
                [sys.executable, "-c", PASSWORD_HELPER_PROGRAM, PASSWORD_HELPER_FILE],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        body = b"\0".join((entry.scheme.encode("ascii"), entry.data.encode("utf-8"), password))
        try:
            self.process.stdin.write(struct.pack("!I", len(body)) + body)
            self.process.stdin.flush()
            reply = self.process.stdout.read(1)
        except OSError:                # BrokenPipeError: it is gone
            reply = b""
        if reply not in (b"0", b"1"):
            status = self.close()
            raise RuntimeError("the password check process ended (status %s)" % status)
        return reply == b"1"

    def close(self) -> Optional[int]:
        """Kill the process, if there is one; its exit status."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        process.kill()                 # it holds nothing worth a goodbye
        for pipe in (process.stdin, process.stdout):
            try:
                pipe.close()
            except OSError:
                pass                   # a write it never read
        return process.wait()


class PasswordCheck:
    """One check of a PasswordCheckPool; cancel() drops its result."""
    __slots__ = ("work", "done")

    def __init__(self, work: Callable, done: Callable):
        self.work = work               # work(matches) -> result, in a pool thread
        self.done = done               # done(result), on the loop; None: cancelled

    def cancel(self) -> None:
        self.done = None


class PasswordCheckPool:
    """Password checks in threads, while the event loop goes on serving the
    other sessions.  submit(work, done) -> PasswordCheck: work(matches) runs
    in a pool thread, ``matches`` being how that thread compares a password
    with a table entry (its PasswordHelper's); done(result) then runs on the
    loop, which hears of it through its wake-up (call_soon_threadsafe).
    Only work runs in a thread, and it must touch nothing the loop changes.
    If work or done raises, the exception goes to the crashed(error) of
    done's object (EventLoop.failed): it ends that session, not the worker.

    At most ``limit`` checks are in the threads' hands (running, or queued
    for a thread); the others wait here, first come first served, and are
    handed on as checks finish: a login is never refused for being one too
    many.  A check cancelled while it waits never runs; one cancelled while
    a thread has it runs (unless the thread sees the cancel first) and its
    result is dropped.  The threads start with the first checks, so in the
    worker, never in the master before it forks (fork() copies only the
    thread that calls it: a lock another thread held would stay locked
    for ever in the child).  close() stops them."""

    def __init__(self, loop: EventLoop, threads: int = PASSWORD_CHECK_THREADS,
                 limit: int = PASSWORD_CHECK_LIMIT):
        self.loop = loop
        self.size = threads
        self.limit = limit
        self.threads = []                    # started as checks come, up to ``size``
        self.tasks = queue.SimpleQueue()     # for the threads: a PasswordCheck, or None: stop
        self.waiting = collections.deque()   # checks over the limit, oldest first
        self.handed = 0                      # checks in the threads' hands

    def submit(self, work: Callable, done: Callable) -> PasswordCheck:
        check = PasswordCheck(work, done)
        self.waiting.append(check)
        self._hand_on()
        return check

    def _hand_on(self) -> None:
        """Hand waiting checks to the threads while there is room, starting
        a thread when every one may be busy."""
        while self.waiting and self.handed < self.limit:
            check = self.waiting.popleft()
            if check.done is None:
                continue                     # cancelled while it waited
            if len(self.threads) <= self.handed and len(self.threads) < self.size:
                thread = threading.Thread(target=self._serve, name="password check", daemon=True)
                thread.start()
                self.threads.append(thread)
            self.handed += 1
            self.tasks.put(check)

    def _serve(self) -> None:
        """A pool thread: checks one after the other, until None."""
        helper = PasswordHelper()
        try:
            while True:
                check = self.tasks.get()
                if check is None:
                    return
                result = error = None
                if check.done is not None:   # not cancelled yet (a race the loop may win)
                    try:
                        result = check.work(helper.matches)
                    except Exception as failure:
                        error = failure
                self.loop.call_soon_threadsafe(functools.partial(self._finished, check, result,
                                                                 error))
        finally:
            helper.close()

    def _finished(self, check: PasswordCheck, result, error: Optional[Exception]) -> None:
        """On the loop: a thread is done with ``check``."""
        self.handed -= 1
        done, check.done = check.done, None
        self._hand_on()
        if done is None:
            return                           # cancelled: its session is gone
        if error is None:
            try:
                done(result)
            except Exception as failure:
                error = failure
        if error is not None:
            self.loop.failed(done, error)

    def close(self) -> None:
        """Stop the threads once they are done with what they hold (their
        results are dropped if the loop is gone); forget what waits."""
        for _ in self.threads:
            self.tasks.put(None)
        self.threads = []
        self.waiting.clear()


def authenticator_for(server: Settings, config: "Config", worker, owner):
    """The authenticator of a server's sessions: auth_http, the backend
    itself (auth = backend, an extension) or the built-in user table (an
    extension), behind the LoginGuard (the login defence for the table and
    the backend; an auth server has Auth-Wait).  Each has start(attempt,
    done), cancel() and recipient_check()."""
    if server.auth_http is not None:
        inner, defend = AuthHttpAuth(worker.loop, server, owner, config.upstreams), False
    elif server.auth == "backend":
        inner, defend = BackendAuth(worker.loop, server, config, owner), True
    else:
        inner, defend = UserTableAuth(config, server, worker.password_checks, owner), True
    return LoginGuard(inner, worker.gate, worker.books.of(SessionCounts), server, owner, defend)


class AuthHttpAuth:
    """nginx's auth_http as an authenticator: a new HTTP/1.0 request per
    attempt, and per Auth-Status: WAIT; the answer read as nginx reads it
    (interpret_auth_response).  done(AuthOutcome) comes from the loop: OK
    with the login, password or token to use; FAIL with the text, the
    delay (Auth-Wait: the session goes on after it; none: it closes) and,
    for the OAuth methods, the SASL error challenge; ERROR with nginx's log
    message.  ``owner.crashed(error)`` hears of a bug in here."""
    __slots__ = ("loop", "server", "owner", "attempt", "done", "exchange", "timer", "upstreams",
                 "asked")

    def __init__(self, loop: EventLoop, server: Settings, owner,
                 upstreams: Optional[Dict[str, UpstreamSpec]] = None):
        self.loop = loop
        self.server = server
        self.owner = owner
        self.upstreams = upstreams     # the pools an Auth-Server may name
        self.asked = 0.0               # the loop's time of the last request (for the metrics)
        self.attempt = None            # type: Optional[LoginAttempt]
        self.done = None               # type: Optional[Callable]
        self.exchange = None           # type: Optional[AuthHttpExchange]
        self.timer = None              # type: Optional[Timer]  (a WAIT)

    def start(self, attempt: LoginAttempt, done: Callable[[AuthOutcome], None]) -> None:
        self.attempt, self.done = attempt, done
        self._ask()

    def cancel(self) -> None:
        self.done = None
        if self.exchange is not None:
            self.exchange.cancel()
        if self.timer is not None:
            self.timer.cancel()

    def recipient_check(self, attempt: LoginAttempt, upstream: Upstream, log: Callable) -> None:
        """The auth server decided at the first RCPT; the backend checks the
        rest, as nginx leaves them to it."""
        return None

    def crashed(self, error: Exception) -> None:
        self.owner.crashed(error)

    @loop_callback
    def _ask(self) -> None:
        request = build_auth_http_request(self.server.auth_http, self.server.auth_http_header,
                                          self._request())
        self.asked = self.loop.time()
        self.exchange = AuthHttpExchange(self.loop, self.server.auth_http, request,
                                         self.server.auth_http_timeout, self._answer)

    def _request(self) -> AuthRequest:
        attempt, server = self.attempt, self.server
        credentials = attempt.credentials
        certificate_pem = None
        if attempt.certificate is not None and server.auth_http_pass_client_cert and \
                attempt.certificate.der:
            certificate_pem = ssl.DER_cert_to_PEM_cert(attempt.certificate.der).encode()
        return AuthRequest(
            credentials.method, credentials.login, credentials.password, attempt.protocol,
            attempt.number, attempt.client_address,
            salt=credentials.salt if credentials.method in SALTED_METHODS else None,
            client_host=attempt.client_name if attempt.protocol == "smtp" else None,
            proxy_protocol=attempt.proxy_facts,
            smtp=((attempt.helo, attempt.mail_from, attempt.rcpt_to)
                  if credentials.method == AuthMethod.NONE else None),
            tls=(attempt.tls.version, attempt.tls.cipher) if attempt.tls is not None else None,
            certificate=attempt.certificate if server.ssl_verify_client != "off" else None,
            certificate_pem=certificate_pem)

    @loop_callback
    def _answer(self, response: Optional[AuthHttpResponse], error: str) -> None:
        self.exchange = None
        metrics = getattr(getattr(self.owner, "worker", None), "metrics", None)
        if metrics is not None:        # a session's (tests may give another owner)
            metrics.count("mailproxy_auth_http_requests_total",
                          (self.server.name, "error" if error else "ok"))
            metrics.observe("mailproxy_auth_http_duration_seconds", (self.server.name,),
                            self.loop.time() - self.asked)
        outcome = self._outcome(response, error) if self.done is not None else None
        if outcome is None:
            return
        if outcome.kind == Verdict.WAIT:
            self.timer = self.loop.call_later(outcome.wait, self._ask)
            return
        done, self.done, self.attempt = self.done, None, None     # the password goes too
        done(outcome)

    def _outcome(self, response: Optional[AuthHttpResponse], error: str) -> AuthOutcome:
        if response is None:
            return AuthOutcome(Verdict.ERROR, reason=error)
        method = self.attempt.credentials.method
        known = method not in SALTED_METHODS + (AuthMethod.EXTERNAL,)
        try:
            verdict = interpret_auth_response(response, self.attempt.protocol, known,
                                              self.server.proxy_smtp_auth, self.upstreams)
        except AuthHttpError as failure:
            return AuthOutcome(Verdict.ERROR, reason=str(failure).replace(
                "%s", self.server.auth_http.text, 1))
        if verdict.kind == Verdict.FAIL:
            # nginx: with Auth-Wait the reply waits and the session goes on;
            # without, it is sent at once and the connection closed.  The
            # OAuth methods get the SASL error challenge first (RFC 7628
            # §3.2.2; Auth-Error-SASL, extension).
            challenge = None
            if method in TOKEN_METHODS:
                challenge = verdict.sasl_error or OAUTH_DEFAULT_ERRORS[method]
            return verdict._replace(sasl_error=challenge, close=verdict.wait == 0,
                                    reason=log_escape(verdict.text))
        if verdict.kind == Verdict.OK:
            return self._accepted(verdict)
        return verdict

    def _accepted(self, verdict: AuthOutcome) -> AuthOutcome:
        """Who to log in as (Auth-User, else the client's login) and with
        what: Auth-Pass, else the client's password, or its bearer token."""
        credentials = self.attempt.credentials
        login = verdict.login if verdict.login is not None else credentials.login
        password, token = verdict.password, None
        if password is None and credentials.method in TOKEN_METHODS:
            token = (credentials.method, credentials.password)    # pass the token on
        elif password is None:
            password = credentials.password
        if self.attempt.protocol == "pop3" and not pop3_can_send(login, password or b""):
            return AuthOutcome(Verdict.ERROR, reason="auth http server %s sent a login or "
                               "password with CR, LF or NUL" % self.server.auth_http.text)
        return verdict._replace(login=login, password=password, token=token)


class BackendAuth:
    """auth = backend (an extension; Perdition's and stalwart-proxy's
    model): no user table, the routed backend's own login is the verdict.
    start() logs in to the backend (route_for, open_backend: the session's
    login script, with AUTH for SMTP) with the client's login and password,
    and done(AuthOutcome) comes from the loop: OK carrying the logged-in
    BackendConnection and its reply, which the session takes over for the
    relay; FAIL with nginx's text when the backend said no to the login and
    password (refuses_credentials), the connection closed; ERROR when the
    backend could not be reached or failed otherwise (already logged).

    Why an authenticator, not a flag on the session's own backend login:
    the LoginGuard in front counts a verdict when it comes back through
    done() (delay, pair refusal, success forgiving the pair), and a backend
    login run by the session would come after the guard had already let
    the attempt go as a success.  So the backend's no arrives where a
    wrong password from the table arrives, and is counted the same way;
    the session only learns to take over a connection that is logged in."""
    __slots__ = ("loop", "server", "config", "owner", "done", "connection", "timer", "upstream",
                 "login", "connected")

    def __init__(self, loop: EventLoop, server: Settings, config: "Config", owner):
        self.loop = loop
        self.server = server
        self.config = config
        self.owner = owner             # the session: its log, its journal, its client's address
        self.done = None               # type: Optional[Callable]
        self.connection = None         # type: Optional[BackendConnection]
        self.timer = None              # type: Optional[Timer]
        self.upstream = None           # type: Optional[Upstream]
        self.login = b""               # the attempt's (its password stays in the script only)
        self.connected = False         # for the log's "while ...", as the session's phases

    def start(self, attempt: LoginAttempt, done: Callable[[AuthOutcome], None]) -> None:
        self.done = done
        credentials, server = attempt.credentials, self.server
        self.login = credentials.login
        if credentials.method != AuthMethod.PLAIN:        # -t allows no other method
            return self._finish(AuthOutcome(Verdict.FAIL, text=AUTH_FAILED_TEXT, reason=(
                "%s cannot be checked by the backend" % credentials.method)))
        if attempt.protocol == "pop3" and not pop3_can_send(credentials.login, credentials.password):
            return self._finish(AuthOutcome(Verdict.FAIL, text=AUTH_FAILED_TEXT,
                                            reason="login or password holds CR, LF or NUL"))
        name = credentials.login.decode("utf-8", "replace")
        self.upstream = route_for(self.config.routes, server.proxy_pass, name, server.protocol)
        # SMTP logs in with AUTH whatever proxy_smtp_auth says: that is the check.
        outcome = AuthOutcome(Verdict.OK, credentials.login, credentials.password, self.upstream,
                              smtp_auth=server.proxy_smtp_auth_method)
        self.owner.journal.upstream = self.upstream       # the log names who decides
        self.timer = self.loop.call_later(server.timeout, self._timed_out)
        self.connected = False
        pool = self.owner.worker.pools.pool_for(self.config, self.upstream)
        connection = open_backend(self.loop, backend_settings(self.config, server, self.upstream),
                                  attempt, outcome, self.owner.local_address(), self,
                                  self.log, verdicts=True, debug=self.owner.debug, pool=pool,
                                  session=self.owner.journal.number)
        if self.done is not None:      # not failed already (no address could be tried)
            self.connection = connection

    def cancel(self) -> None:
        self.done = None
        self._stop()

    def recipient_check(self, attempt: LoginAttempt, upstream: Upstream, log: Callable) -> None:
        return None                    # a logged-in user's recipients are the backend's to judge

    def crashed(self, error: Exception) -> None:
        self.owner.crashed(error)

    def log(self, level: str, message: str, *args, action: Optional[str] = None) -> None:
        """The session's log, with nginx's action of the session's CONNECT
        and LOGIN phases, so a backend's failure reads as after a table login."""
        if action is None:
            action = "reading response from upstream" if self.connected else \
                "connecting to upstream"
        self.owner.log(level, message, *args, action=action)

    def _stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def _finish(self, outcome: AuthOutcome) -> None:
        done, self.done = self.done, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.connection = None         # closed, or the session's now (in the outcome)
        if done is not None:
            done(outcome)

    # -- what the BackendConnection says ---------------------------------------------
    def backend_chosen(self, upstream: Upstream) -> None:
        """A pool's server is tried: the log names it."""
        self.upstream = upstream
        self.owner.journal.upstream = upstream

    def backend_connected(self, stream: Stream) -> None:
        self.connected = True          # the session stays in AUTH: the login is the verdict

    def backend_logged_in(self, reply: bytes) -> None:
        connection = self.connection
        self._finish(AuthOutcome(Verdict.OK, self.login, None, self.upstream,
                                 connection=connection, reply=reply))

    def backend_refused(self, line: bytes) -> None:
        """The backend said no to the login and password: a failed login,
        which the LoginGuard counts and delays; the client may try again
        (a new connection then)."""
        self._finish(AuthOutcome(Verdict.FAIL, text=AUTH_FAILED_TEXT,
                                 reason="backend: %s" % log_escape(strip_eol(line))))

    def backend_failed(self, outcome: str, refusal: bytes = b"") -> None:
        """No verdict: the backend was not reached, or failed otherwise."""
        self._stop()
        self._finish(AuthOutcome(Verdict.ERROR, reason=outcome, text=refusal, logged=True))

    @loop_callback
    def _timed_out(self) -> None:
        self.timer = None
        self.log("error", "upstream timed out (110: Connection timed out)")
        if self.connection is not None and self.connection.timed_out():
            self.timer = self.loop.call_later(self.server.timeout, self._timed_out)
            return                     # a pool's next server: the same time again for it
        self.backend_failed("upstream timed out")


class DnsLookup:
    """One question on its way: sent over UDP to the resolver's servers in
    turn every DNS_RESEND seconds until an answer comes or ``timeout`` ends.
    An answer that stops at a CNAME is followed with a new question for its
    target, DNS_MAX_CNAMES hops in all, within the same ``timeout``.
    ``callback(status, values)``: status "ok", "nxdomain" (or no such
    record), "error" (a server failure, a truncated answer, records of
    another type only, too many CNAMEs, a timeout)."""

    def __init__(self, resolver: "Resolver", name: str, qtype: int, callback: Callable):
        self.resolver = resolver
        self.name = name
        self.qtype = qtype
        self.callback = callback
        self.target = name             # the name asked about now (a CNAME's target later)
        self.hops = 0                  # CNAMEs followed so far
        self.ttls = []                 # theirs
        self.sockets = {}              # family -> _Datagram
        self.resend = None             # type: Optional[Timer]
        self.ask(name)                 # first: a DnsError leaves nothing behind
        loop = resolver.loop
        self.deadline = loop.call_later(resolver.timeout, lambda: self.finish("error", [], 0))

    def ask(self, name: str) -> None:
        """Send the question for ``name`` (raises DnsError if it cannot be sent)."""
        if "\\" in name:
            raise DnsError("a dot inside a label of %r" % name)   # read_dns_name's escape
        self.qid = self.resolver.randomness.getrandbits(16)
        self.query = dns_query(self.qid, name, self.qtype)
        self.target = name
        self.attempt = 0
        if self.resend is not None:
            self.resend.cancel()
        self.send()

    def send(self) -> None:
        servers = self.resolver.spec.servers
        family, sockaddr = servers[self.attempt % len(servers)]
        self.attempt += 1
        try:
            if family not in self.sockets:
                self.sockets[family] = _Datagram(self, family)
            self.sockets[family].sock.sendto(self.query, sockaddr)
        except OSError:
            pass                       # the next attempt or the deadline will tell
        self.resend = self.resolver.loop.call_later(DNS_RESEND, self.send)

    def datagram(self, data: bytes, sender) -> None:
        if (sender[0], sender[1]) not in self.resolver.server_addresses:
            return                     # not from a server we asked: ignore
        try:
            answer = parse_dns_answer(data, self.qid, self.target, self.qtype)
        except DnsError:
            return                     # malformed: wait for a better answer
        if answer is None:
            return
        values, ttls, aliases = dns_chain(answer, self.target, self.qtype)
        self.ttls += ttls
        if values:
            self.finish("ok", values, min(self.ttls))
        elif answer.rcode == DNS_NOERROR and not answer.truncated and aliases:
            self.follow(aliases)
        elif answer.rcode == DNS_NOERROR and not answer.truncated and answer.records:
            # Records, but none of the type asked, nor a CNAME: nginx logs
            # "unexpected RR type" and ends in [TEMPUNAVAIL] (nginx-tests
            # mail_resolver.t, "PTR type"), after resolver_timeout; at once here.
            self.finish("error", [], 0)
        elif answer.rcode == DNS_NXDOMAIN or (answer.rcode == DNS_NOERROR and not answer.truncated):
            self.finish("nxdomain", [], 0)
        else:
            self.finish("error", [], 0)

    def follow(self, aliases: List[str]) -> None:
        """The answer ends at a CNAME without its target's records: ask
        about the target (RFC 1034 §5.3.3, a resolver restarts the query at
        the canonical name; nginx-tests mail_resolver.t "CNAME", which
        nginx has as TODO)."""
        self.hops += len(aliases)
        if self.hops > DNS_MAX_CNAMES:
            return self.finish("error", [], 0)
        try:
            self.ask(aliases[-1])
        except (DnsError, UnicodeError):   # no query can carry it (a dot in a label)
            self.finish("error", [], 0)

    def finish(self, status: str, values: List, ttl: int) -> None:
        if self.callback is None:
            return
        callback, self.callback = self.callback, None
        self.cancel()
        self.resolver.remember(self.name, self.qtype, status, values, ttl)
        callback(status, values)

    def cancel(self) -> None:
        self.callback = None
        self.deadline.cancel()
        if self.resend is not None:
            self.resend.cancel()
        for datagram in self.sockets.values():
            datagram.close()
        self.sockets = {}


class _Datagram(LoopHandler):
    """A UDP socket of a DnsLookup, registered with the loop."""

    def __init__(self, lookup: DnsLookup, family: int):
        self.lookup = lookup
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.interest = lookup.resolver.loop.set_interest(self.sock, selectors.EVENT_READ, self, 0)

    def on_readable(self) -> None:
        try:
            data, sender = self.sock.recvfrom(4096)
        except OSError:
            return
        self.lookup.datagram(data, sender)

    def close(self) -> None:
        self.lookup.resolver.loop.set_interest(self.sock, 0, self, self.interest)
        self.sock.close()


class Resolver:
    """nginx's ``resolver``: asynchronous lookups with a small cache whose
    entries live for the answer's TTL, or ``valid=`` if given."""

    def __init__(self, loop: EventLoop, spec: ResolverSpec, timeout: float):
        self.loop = loop
        self.spec = spec
        self.timeout = timeout
        self.randomness = random.SystemRandom()
        self.server_addresses = {(sockaddr[0], sockaddr[1]) for _, sockaddr in spec.servers}
        self.cache = {}                # (name, qtype) -> (expires, status, values)

    def lookup(self, name: str, qtype: int, callback: Callable):
        """Start a lookup; returns something with cancel()."""
        key = (name.lower(), qtype)
        cached = self.cache.get(key)
        if cached is not None and cached[0] > self.loop.time():
            return self.loop.call_later(0, lambda: callback(cached[1], cached[2]))
        try:
            return DnsLookup(self, name, qtype, callback)
        except (DnsError, UnicodeError, OSError):
            return self.loop.call_later(0, lambda: callback("error", []))

    def remember(self, name: str, qtype: int, status: str, values: List, ttl: int) -> None:
        if status == "error":
            return
        if self.spec.valid is not None:
            lifetime = self.spec.valid
        else:
            lifetime = ttl if status == "ok" else DNS_NEGATIVE_TTL
        if len(self.cache) >= DNS_CACHE_SIZE:
            self.cache.pop(next(iter(self.cache)))
        self.cache[(name.lower(), qtype)] = (self.loop.time() + lifetime, status, values)


CLIENT_UNAVAILABLE = "[UNAVAILABLE]"      # not found, or the names do not match
CLIENT_TEMPUNAVAIL = "[TEMPUNAVAIL]"      # the resolver failed, or the name is invalid


class ClientNameLookup:
    """The SMTP client's name, as ngx_mail_smtp_init_session finds it: the PTR
    of its address, checked to be a host name, whose A (or AAAA) records
    must include the address.  ``done(name, problem)``: the name or one of
    the two markers, and a log message when something went wrong."""

    def __init__(self, resolver: Resolver, address: str, done: Callable):
        self.resolver = resolver
        self.address = address
        self.done = done
        self.name = ""
        try:
            reverse = reverse_dns_name(address)
        except ValueError:                     # e.g. a scoped address, fe80::1%eth0
            self.pending = resolver.loop.call_later(0, lambda: self._fail("error", address))
            return
        self.pending = resolver.lookup(reverse, DNS_PTR, self._ptr)

    def _ptr(self, status: str, values: List) -> None:
        if status != "ok":
            return self._fail(status, "%s could not be resolved" % self.address)
        self.name = values[0]
        if not valid_host_name(self.name):
            return self.done(CLIENT_TEMPUNAVAIL, '%s resolved to an invalid host name "%s"'
                             % (self.address, log_escape(self.name.encode("latin-1"))))
        version = ipaddress.ip_address(self.address).version
        if (version == 4 and not self.resolver.spec.ipv4) or (version == 6 and not self.resolver.spec.ipv6):
            return self.done(CLIENT_UNAVAILABLE, "")
        self.pending = self.resolver.lookup(self.name, DNS_A if version == 4 else DNS_AAAA,
                                            self._forward)

    def _forward(self, status: str, values: List) -> None:
        if status != "ok":
            return self._fail(status, '"%s" could not be resolved' % self.name)
        client = ipaddress.ip_address(self.address)
        if any(ipaddress.ip_address(value) == client for value in values):
            return self.done(self.name, "")
        self.done(CLIENT_UNAVAILABLE, "")

    def _fail(self, status: str, message: str) -> None:
        if status == "nxdomain":
            self.done(CLIENT_UNAVAILABLE, message + " (3: Host not found)")
        else:
            self.done(CLIENT_TEMPUNAVAIL, message + " (2: Server failure or timeout)")

    def cancel(self) -> None:
        self.pending.cancel()


# ========================================================================== #
# ####                             Sessions                             #### #
# ========================================================================== #
# One client, from accept to close: it wires the client Stream to a client
# machine, the verdict of the user table, the backend connection and its
# BackendLogin, and finally a Relay.  Phases follow nginx's: dialogue (the
# client machine talks), auth (the verdict, with its delay on failure),
# connect and login to the upstream, relay.  Each phase sets ``action`` for
# the log, as nginx's c->log->action; SessionLog builds the log context.

class Phase(enum.Enum):
    ACCEPTED = "accepted"          # the connection is new: nothing read, nothing said
    PROXY_HEADER = "proxy header"  # listen ... proxy_protocol: the header comes first
    HANDSHAKE = "handshake"        # TLS with the client: listen ... ssl, or STARTTLS
    RESOLVING = "resolving"        # SMTP: the client's name, before the greeting
    GREETING_DELAY = "greeting delay"   # SMTP: nothing may come before the 220
    DIALOGUE = "dialogue"          # the client machine talks
    AUTH = "auth"                  # the authenticator decides (then a failure's delay)
    CONNECT = "connect"            # connect() to the upstream
    LOGIN = "login"                # its login script runs
    RELAY = "relay"                # bytes both ways
    CLOSING = "closing"            # the last reply is being written

    # A phase is looked up a few times per phase change (PHASES,
    # PHASE_CHANGES).  Members are compared by identity: hash them so too,
    # in C, rather than by Enum's own __hash__ (a Python function hashing
    # the name).
    __hash__ = object.__hash__


class PhaseRules(NamedTuple):
    """What entering a phase sets (Session._enter)."""
    action: str                    # nginx's c->log->action, as it appears after "while"
    reads: Optional[int]           # the client's read budget; None: the machine's (see _read_budget)
    timer: str                     # "client": its timeout; "upstream": the backend's; "off": none,
                                   # another bound holds; "": the one armed goes on


PHASES = {
    Phase.ACCEPTED: PhaseRules("in auth state", 0, ""),
    Phase.PROXY_HEADER: PhaseRules("reading PROXY protocol", PROXY_V2_MAX, "client"),
    Phase.HANDSHAKE: PhaseRules("SSL handshaking", READ_SIZE, "client"),
    # nginx reads nothing from the client until its name is known.
    Phase.RESOLVING: PhaseRules("in resolving client address", 0, ""),
    Phase.GREETING_DELAY: PhaseRules("in delay pipelining state", None, ""),
    Phase.DIALOGUE: PhaseRules("in auth state", None, "client"),
    # nginx (ngx_mail_auth) stops the client's timer: auth_http_timeout bounds the wait.
    Phase.AUTH: PhaseRules("in auth state", 0, "off"),
    Phase.CONNECT: PhaseRules("connecting to upstream", 0, "upstream"),
    Phase.LOGIN: PhaseRules("reading response from upstream", 0, ""),
    Phase.RELAY: PhaseRules("proxying", None, "off"),      # the relay reads, and times out
    Phase.CLOSING: PhaseRules("in auth state", 0, "client"),
}

# The legal changes of phase; Session._enter refuses any other (a bug).
# close() may end a session in any phase.
PHASE_CHANGES = frozenset(
    [(None, Phase.ACCEPTED)] +
    [(Phase.ACCEPTED, phase) for phase in (Phase.PROXY_HEADER, Phase.HANDSHAKE, Phase.RESOLVING,
                                           Phase.GREETING_DELAY, Phase.DIALOGUE)] +
    [(Phase.PROXY_HEADER, phase) for phase in (Phase.HANDSHAKE, Phase.RESOLVING,
                                               Phase.GREETING_DELAY, Phase.DIALOGUE)] +
    [(Phase.HANDSHAKE, phase) for phase in (Phase.RESOLVING, Phase.GREETING_DELAY,
                                            Phase.DIALOGUE, Phase.CLOSING)] +
    [(Phase.RESOLVING, Phase.GREETING_DELAY), (Phase.RESOLVING, Phase.DIALOGUE),
     (Phase.GREETING_DELAY, Phase.DIALOGUE), (Phase.GREETING_DELAY, Phase.CLOSING),
     (Phase.DIALOGUE, Phase.HANDSHAKE), (Phase.DIALOGUE, Phase.AUTH),
     (Phase.DIALOGUE, Phase.CLOSING), (Phase.AUTH, Phase.DIALOGUE), (Phase.AUTH, Phase.CONNECT),
     (Phase.AUTH, Phase.CLOSING),
     (Phase.AUTH, Phase.RELAY),        # auth = backend: BackendAuth's login was the verdict
     (Phase.CONNECT, Phase.LOGIN), (Phase.CONNECT, Phase.CLOSING),
     (Phase.LOGIN, Phase.RELAY), (Phase.LOGIN, Phase.CLOSING)])


def xclient_client(identity: ClientIdentity, client: Tuple[str, int, str]) -> Tuple[str, int, str]:
    """The client (address, port, name) after a trusted peer's XCLIENT
    (XCLIENT_README), from what it was.  What is not named stays (the
    machine leaves out ADDR and PORT sent as [UNAVAILABLE]).  A new address
    has port 0 (unknown) and the name [UNAVAILABLE] unless PORT and NAME
    come with it: the peer's own port and name are not the new client's."""
    address, port, name = client
    if identity.address:
        named = str(ipaddress.ip_address(identity.address.decode("ascii")))
        if named != address:
            address, port, name = named, 0, CLIENT_UNAVAILABLE
    if identity.port:
        port = int(identity.port)
    if identity.name is not None:
        name = identity.name.decode("ascii")
    return address, port, name


class ClientOpening(StreamOwner):
    """A new client connection up to the protocol's greeting, as nginx:
    the PROXY header first (listen ... proxy_protocol: a bad or missing one
    closes the connection without a word), the TLS handshake (listen ...
    ssl), then for SMTP the client's name (resolver: nginx reads nothing
    from the client meanwhile) and smtp_greeting_delay (a client that talks
    before the 220 is refused).  It owns the client stream until then,
    moves the session through PROXY_HEADER, HANDSHAKE, RESOLVING and
    GREETING_DELAY, holds what the client sends ahead, and ends with
    session.opened(early_data)."""
    __slots__ = ("session", "proxy_header", "implicit_tls", "early_data", "name_lookup")

    def __init__(self, session, listen: Listen):
        self.session = session
        self.implicit_tls = listen.ssl
        self.early_data = bytearray()
        self.name_lookup = None            # type: Optional[ClientNameLookup]
        self.proxy_header = ProxyHeaderReader() if listen.proxy_protocol else None
        session.client.owner = self
        if self.proxy_header is not None:
            session._enter(Phase.PROXY_HEADER)
        else:
            self._behind_proxy_header(b"")

    @staticmethod
    def needed(server: Settings, listen: Listen) -> bool:
        """Is there anything to do before the greeting?"""
        return listen.proxy_protocol or listen.ssl or (
            server.protocol == "smtp" and bool(server.resolver or server.smtp_greeting_delay))

    def cancel(self) -> None:
        if self.name_lookup is not None:
            self.name_lookup.cancel()

    def crashed(self, error: Exception) -> None:
        self.session.crashed(error)

    def stream_data(self, stream: Stream, data: bytes) -> None:
        self.CLIENT_DATA.get(self.session.phase, ClientOpening._hold)(self, data)

    def _hold(self, data: bytes) -> None:
        """Read ahead of the greeting (behind a PROXY header, or with the
        last handshake bytes): it waits, as nginx waits to read."""
        self.early_data += data

    def _proxy_header_data(self, data: bytes) -> None:
        """nginx's ngx_proxy_protocol_read; a good header from a
        set_real_ip_from peer gives the session the real client address."""
        session = self.session
        try:
            header = self.proxy_header.receive_data(data)
        except ProxyHeaderError as error:
            session.log("info", str(error))
            return session.close("bad PROXY header")
        if header is None:
            return
        if header.source is not None:
            session.proxy_facts = header.source + header.destination
            if real_ip_trusted(session.client_address, session.server.set_real_ip_from):
                session.log("info", "real client address %s:%d" % header.source)
                session.client_address, session.client_port = header.source
        rest, self.proxy_header = bytes(self.proxy_header.data[header.length:]), None
        self._behind_proxy_header(rest)

    def _behind_proxy_header(self, rest: bytes) -> None:
        """Implicit TLS first, under ``timeout`` (nginx), or the protocol."""
        if self.implicit_tls:
            self.session._start_client_tls()
        else:
            self._begin()
        if rest:
            self.session.client.feed(rest)

    def stream_tls_ready(self, stream: Stream) -> None:
        self.session.count("mailproxy_tls_handshakes_total", "ok")
        if self.session._certificate_ok():
            self._begin()

    def _begin(self) -> None:
        """The protocol starts: the greeting; SMTP's after the client's name
        (resolver) and smtp_greeting_delay, as nginx."""
        session = self.session
        if session.server.protocol != "smtp":
            return self._greet()
        if session.server.resolver is None:
            return self._greeting_delay()
        if session.client_address == "unix:":
            # ngx_mail_smtp_init_session: a unix socket's peer has no name to
            # look up; temporarily unavailable, and nothing asked or logged.
            session.client_name = CLIENT_TEMPUNAVAIL
            return self._greeting_delay()
        session._enter(Phase.RESOLVING)
        self.name_lookup = ClientNameLookup(session.worker.resolver_for(session.server),
                                            session.client_address, self._resolved)

    @loop_callback
    def _resolved(self, name: str, problem: str) -> None:
        self.name_lookup, self.session.client_name = None, name
        self.session.count("mailproxy_dns_lookups_total", "failed" if problem else "ok")
        if problem:
            self.session.log("error", problem)
        self._greeting_delay()

    def _greeting_delay(self) -> None:
        session = self.session
        if not session.server.smtp_greeting_delay:
            return self._greet()
        session._enter(Phase.GREETING_DELAY)
        session.timer.set(session.server.smtp_greeting_delay, self._greet)
        if self.early_data:
            self._spoke_first(bytes(self.early_data))

    def _spoke_first(self, data: bytes) -> None:
        """smtp_greeting_delay: a spammer's pipelining client; nginx refuses
        it with 503 and closes."""
        session = self.session
        shown = log_escape(data.replace(b"\r", b"_").replace(b"\n", b"_"))
        session.log("info", 'client was rejected before greeting: "%s"' % shown)
        session.client.owner = session
        session._close_after_reply("client rejected before greeting", SMTP_INVALID_PIPELINING)

    def _greet(self) -> None:
        early, self.early_data = bytes(self.early_data), bytearray()
        self.session.opened(early)

    # What client bytes are for, by phase (else: read ahead, held).
    CLIENT_DATA = {Phase.PROXY_HEADER: _proxy_header_data, Phase.GREETING_DELAY: _spoke_first}

    # The rest of what the stream says is the session's, as in the dialogue.
    def stream_eof(self, stream: Stream) -> None:
        self.session.stream_eof(stream)

    def stream_error(self, stream: Stream, error: Exception) -> None:
        self.session.stream_error(stream, error)

    def stream_drained(self, stream: Stream) -> None:
        self.session.stream_drained(stream)


class SessionCounts:
    """Logged-in sessions per login (login_key), and per login and client
    address, in every worker (sans-I/O, a book of SharedBooks): what
    max_user_sessions and max_user_ip_sessions count (Dovecot's
    mail_max_userip_connections).  A session is counted from the auth
    server's or the table's yes to its end; a worker's go when it dies."""
    kinds = ("session open", "session close", "worker gone")

    def __init__(self):
        self.sessions = {}         # (pid, session number) -> (login, address)
        self.per_login = {}        # login -> sessions
        self.per_pair = {}         # (login, address) -> sessions

    @staticmethod
    def opened(pid: int, number: int, login: str, address: str) -> tuple:
        return ("session open", pid, number, login, address)

    @staticmethod
    def closed(pid: int, number: int) -> tuple:
        return ("session close", pid, number)

    def refusal(self, login: str, address: str, server: Settings) -> str:
        """Why one more session of ``login`` from ``address`` is too many
        (for the log), or ""."""
        if server.max_user_sessions and \
                self.per_login.get(login, 0) >= server.max_user_sessions:
            return "max_user_sessions (%d) reached" % server.max_user_sessions
        if server.max_user_ip_sessions and \
                self.per_pair.get((login, address), 0) >= server.max_user_ip_sessions:
            return "max_user_ip_sessions (%d) reached" % server.max_user_ip_sessions
        return ""

    def apply(self, event: tuple) -> None:
        if event[0] == "session open":
            self._count((event[1], event[2]), (event[3], event[4]))
        elif event[0] == "session close":
            self._uncount((event[1], event[2]))
        elif event[0] == "worker gone":
            for key in [key for key in self.sessions if key[0] == event[1]]:
                self._uncount(key)

    def _count(self, key: tuple, who: tuple) -> None:
        self._uncount(key)                 # the same session twice counts once
        self.sessions[key] = who
        self.per_login[who[0]] = self.per_login.get(who[0], 0) + 1
        self.per_pair[who] = self.per_pair.get(who, 0) + 1

    def _uncount(self, key: tuple) -> None:
        who = self.sessions.pop(key, None)
        if who is None:
            return
        for table, entry in ((self.per_login, who[0]), (self.per_pair, who)):
            left = table[entry] - 1
            if left:
                table[entry] = left
            else:
                del table[entry]


GATE_SLACK = 1e-6      # a timer may fire a hair before the time it was set from (float sums)


class LoginGate:
    """Where attempts wait for LoginDefence's slots in one worker: in
    arrival order, each let through as soon as admit() says so (a delay
    ended, or an attempt of this worker finished: leave()), or refused.
    Queued, never dropped: the session's own timers bound the wait.

    A brute-force storm can hold back as many attempts as the worker has
    sessions, so no event looks at all of them: a new attempt is checked
    alone, a finished one wakes only the attempts of its address or its
    login (whose slots it freed), and each held attempt is checked again
    when admit() said its wait ends (a heap of those times)."""

    def __init__(self, loop: "EventLoop", defence: LoginDefence):
        self.loop = loop
        self.defence = defence
        self.number = 0            # tickets in arrival order
        self.waiting = {}          # number -> [address, login, go, number], first come first
        self.by_address = {}       # address -> {number: ticket}
        self.by_login = {}         # login -> {number: ticket}
        self.due = []              # heap of (when to check again, number)
        self.scheduled = {}        # number -> its time in the heap (older entries are stale)
        self.timer = None          # type: Optional[Timer]  (for the heap's first)
        self.timer_for = None      # the time it was set for

    def enter(self, address: str, login: str, go: Callable[[Admission], None]) -> list:
        """``go(admission)`` now or later (a refusal at once); returns the
        ticket that cancel() takes."""
        self.number += 1
        ticket = [address, login, go, self.number]
        self.waiting[self.number] = ticket
        self.by_address.setdefault(address, {})[self.number] = ticket
        self.by_login.setdefault(login, {})[self.number] = ticket
        self._check([ticket])
        return ticket

    def cancel(self, ticket: list) -> None:
        """The session ended while waiting."""
        self._forget(ticket)

    def leave(self, address: str, login: str) -> None:
        """An attempt let through has its answer: its slot is free."""
        self.defence.publish(self.defence.end(address, login, os.getpid()))
        woken = dict(self.by_address.get(address, {}))
        woken.update(self.by_login.get(login, {}))
        self._check([woken[number] for number in sorted(woken)])

    def _forget(self, ticket: list) -> None:
        address, login, _, number = ticket
        if self.waiting.pop(number, None) is None:
            return
        self.scheduled.pop(number, None)
        for index, key in ((self.by_address, address), (self.by_login, login)):
            tickets = index[key]
            del tickets[number]
            if not tickets:
                del index[key]

    def _check(self, tickets: list) -> None:
        """Let through, in arrival order, those of ``tickets`` admit() lets
        go now; the others get a time to be checked again."""
        now = self.loop.time()
        for ticket in tickets:
            address, login, go, number = ticket
            if number not in self.waiting:
                continue                 # let through or cancelled meanwhile
            admission = self.defence.admit(address, login, now, os.getpid())
            if admission.wait > 0:
                when = now + admission.wait
                if self.scheduled.get(number) != when:
                    self.scheduled[number] = when
                    heapq.heappush(self.due, (when, number))
                continue
            self._forget(ticket)
            if not admission.refuse:
                self.defence.publish(self.defence.begin(address, login, os.getpid()))
            go(admission)
        self._set_timer()

    def _stale(self, entry: tuple) -> bool:
        """A heap entry of an attempt gone, or given another time since."""
        when, number = entry
        return self.scheduled.get(number) != when

    def _set_timer(self) -> None:
        """The loop's timer for the heap's first time (kept if it is that
        already: most events do not change it)."""
        while self.due and self._stale(self.due[0]):
            heapq.heappop(self.due)
        first = self.due[0][0] if self.due else None
        if self.timer is not None and self.timer_for == first:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.timer_for = None, first
        if first is not None:
            self.timer = self.loop.call_later(max(0.0, first - self.loop.time()), self._wake)

    def _wake(self) -> None:
        """The held attempts whose wait has ended, checked again."""
        self.timer = None
        now = self.loop.time()
        numbers = []
        while self.due and self.due[0][0] <= now + GATE_SLACK:
            entry = heapq.heappop(self.due)
            if not self._stale(entry):
                del self.scheduled[entry[1]]
                numbers.append(entry[1])
        self._check([self.waiting[number] for number in sorted(numbers)])


class LoginGuard:
    """What stands between a session and its authenticator: the login
    defence (``defend``: for the user table; an auth server keeps its own,
    with Auth-Wait), max_user_sessions and max_user_ip_sessions (for all),
    and the events that keep every worker's books true (publish).  It has
    the authenticators' interface: start(attempt, done), cancel(),
    recipient_check()."""
    __slots__ = ("inner", "gate", "counts", "publish", "server", "owner", "defend", "attempt",
                 "done", "ticket", "checking")

    def __init__(self, inner, gate: LoginGate, counts: SessionCounts, server: Settings,
                 owner, defend: bool):
        self.inner = inner
        self.gate = gate               # gate.defence: the worker's LoginDefence
        self.counts = counts
        self.publish = counts.publish  # SharedBooks.publish, for every book
        self.server = server
        self.owner = owner             # the session: its log and its number
        self.defend = defend
        self.attempt = self.done = self.ticket = self.checking = None

    def _defended(self, attempt: LoginAttempt) -> bool:
        """Not for trusted_networks, nor with auth_delay 0 (the defence off),
        nor for smtp_auth none (no password: the recipient is checked)."""
        return self.defend and self.server.auth_delay > 0 and \
            attempt.credentials.method != AuthMethod.NONE and \
            not real_ip_trusted(attempt.client_address, self.server.trusted_networks)

    def start(self, attempt: LoginAttempt, done: Callable[[AuthOutcome], None]) -> None:
        self.attempt, self.done = attempt, done
        if not self._defended(attempt):
            return self.inner.start(attempt, self._decided)
        who = (penalty_address(attempt.client_address), login_key(attempt.credentials.login))
        self.ticket = self.gate.enter(who[0], who[1], lambda admission: self._admitted(who, admission))

    def _admitted(self, who: Tuple[str, str], admission: Admission) -> None:
        self.ticket = None
        if admission.refuse:
            self.owner.log("notice", "login refused for now: %d wrong passwords for this "
                           "account from this address" % admission.failures)
            text, code = self.owner.machine.LOGIN_UNAVAILABLE
            wait = penalty_delay(admission.failures, self.server.auth_delay)
            return self.done(AuthOutcome(Verdict.FAIL, text=text, error_code=code,
                                         wait=wait, reason="login defence"))
        self.checking = who
        self.inner.start(self.attempt, self._decided)

    def _decided(self, outcome: AuthOutcome) -> None:
        verdict = outcome
        if self.checking is not None:
            verdict = self._counted(verdict)
        if verdict.ok:
            verdict = self._session_limit(verdict)
        done, self.done = self.done, None
        if outcome.connection is not None and (done is None or not verdict.ok):
            outcome.connection.close()     # auth = backend: logged in, but over the session limit
        if done is not None:
            done(verdict)

    def _counted(self, outcome: AuthOutcome) -> AuthOutcome:
        """A defended attempt's answer: the slot goes; a failure is published
        and its reply waits the penalty; a success forgives the pair."""
        address, login = self.checking
        self.checking = None
        now = self.gate.loop.time()
        if outcome.ok:
            event = self.gate.defence.success(address, login, now)
            if event is not None:
                self.publish(event)
        elif outcome.kind == Verdict.FAIL:
            event, delay, count = self.gate.defence.failure(
                address, login, self.attempt.credentials.password, now, self.server.auth_delay,
                os.getpid())
            self.publish(event)
            if count > 1:
                self.owner.log("notice", "login penalty: %d recent failures from %s or of "
                               "this account, reply in %gs" % (count, address, delay))
                self.owner.count("mailproxy_login_penalties_total")
            outcome = outcome._replace(wait=max(outcome.wait, delay))
        self.gate.leave(address, login)
        return outcome

    def _session_limit(self, outcome: AuthOutcome) -> AuthOutcome:
        """max_user_sessions, max_user_ip_sessions: the temporary refusal,
        then the end; or this session counted, until it ends."""
        login = login_key(outcome.login or self.attempt.credentials.login)
        if not login or not (self.server.max_user_sessions or self.server.max_user_ip_sessions):
            return outcome                 # nobody to count (smtp_auth none), or no limit
        reason = self.counts.refusal(login, self.attempt.client_address, self.server)
        if reason:
            text, code = self.owner.machine.SESSION_LIMIT
            return AuthOutcome(Verdict.FAIL, text=text, error_code=code, close=True,
                               reason=reason)
        self.publish(self.counts.opened(os.getpid(), self.owner.journal.number, login,
                                        self.attempt.client_address))
        self.owner.counted = True
        return outcome

    def cancel(self) -> None:
        self.done = None
        if self.ticket is not None:
            self.gate.cancel(self.ticket)
        if self.checking is not None:
            self.gate.leave(*self.checking)
            self.checking = None
        self.inner.cancel()

    def recipient_check(self, attempt: LoginAttempt, upstream: Upstream, log: Callable):
        return self.inner.recipient_check(attempt, upstream, log)


class ClientClock:
    """The client's time: ``timeout`` to send a whole command (or to finish
    the handshake, the PROXY header, or to read our last reply), which a
    byte now and then does not make longer, so a slow drip cannot hold a
    connection (nginx cuts it at ``timeout`` too); and all of it, up to the
    login, within LOGIN_TIME_LIMIT (or ``timeout``, if longer)."""
    __slots__ = ("clock", "timeout", "login_deadline")

    def __init__(self, clock: Callable[[], float], timeout: float):
        self.clock = clock
        self.timeout = timeout
        self.login_deadline = clock() + max(LOGIN_TIME_LIMIT, timeout)

    def left(self) -> float:
        """How long the client may take now: ``timeout``, or less when the
        login deadline is nearer."""
        return max(0.0, min(self.timeout, self.login_deadline - self.clock()))

    def expired(self) -> str:
        """What the log says when the time is up."""
        if self.clock() >= self.login_deadline:
            return "client timed out (no login within %gs)" % max(LOGIN_TIME_LIMIT, self.timeout)
        return "client timed out"


class SessionLog:
    """A session's lines: in the error log with nginx's context
    (ngx_mail_log_error: "while ACTION, client: ADDRESS[ using starttls],
    server: LISTEN[, login: "LOGIN"][, upstream: NAME]"), and the access
    line at its end (an extension: nginx has none).  The session tells it
    what it learns on the way: STARTTLS, the login, the upstream, and at
    the login how it was made (``how``: the client's TLS, the auth method,
    the backend's TLS), which the login line and the access line carry
    after nginx's context (an extension).  The logs are the worker's at
    the time of each line (``worker.logs``): SIGUSR1 and a reload give the
    worker new ones and close the old files, and a session that began
    before must write to the new ones (its lines were lost)."""
    __slots__ = ("worker", "server", "number", "server_text", "started", "starttls", "login",
                 "upstream", "how")

    def __init__(self, worker, server: Settings, number: int, server_text: str):
        self.worker = worker               # .logs: the worker's ErrorLogs, replaced on USR1
        self.server = server
        self.number = number               # nginx's *N
        self.server_text = server_text     # the listen address the client came to
        self.started = time.time()
        self.starttls = False              # the client said STARTTLS
        self.login = None                  # type: Optional[bytes]
        self.upstream = None               # type: Optional[Upstream]
        self.how = ""                      # ", tls: TLSv1.3, auth: plain, upstream tls: off"

    def logged_in(self, client_tls: Optional["TlsFacts"], method: str,
                  backend_tls: Optional["TlsFacts"]) -> None:
        """How the login was made, for the login line and the access line."""
        def tls(facts: Optional[TlsFacts]) -> str:
            return facts.version or "on" if facts is not None else "off"
        self.how = ", tls: %s, auth: %s, upstream tls: %s" % (tls(client_tls), method,
                                                             tls(backend_tls))

    def context(self, client_address: str, action: Optional[str], how: bool = False) -> str:
        text = " while %s" % action if action else ""
        text += ", client: %s%s, server: %s" % (log_escape(client_address.encode()),
                                                " using starttls" if self.starttls else "",
                                                self.server_text)
        if self.login:
            text += ', login: "%s"' % log_escape(self.login)
        if self.upstream is not None:
            text += ", upstream: %s" % self.upstream.text
        return text + self.how if how else text

    def log(self, level: str, message: str, args: tuple, client_address: str,
            action: Optional[str], how: bool = False) -> None:
        """``message % args`` is only made if the level is on (a busy proxy
        logs at warn); ``how``: with how the login was made."""
        log = self.worker.logs.for_server(self.server)
        if log.enabled(level):
            log.log(level, message % args if args else message, self.number,
                    self.context(client_address, action, how))

    def session_done(self, outcome: str, client_address: str, received: int, sent: int) -> None:
        access = self.worker.logs.access_for(self.server)
        if access.enabled("info"):
            access.log("info", "session done: %s, %d bytes from client, %d bytes to client, %.3fs"
                       % (outcome, received, sent, time.time() - self.started), self.number,
                       self.context(client_address, None, how=True))


class Session(StreamOwner):
    """One client from accept to close: a conductor.  It moves through the
    phases (PHASES, PHASE_CHANGES) and hands the work to the pieces that
    do it: the ClientOpening (the PROXY header, TLS, the SMTP client's
    name), the client machine (the dialogue), the authenticator (the
    verdict), the BackendConnection (the backend's login), the Relay.  It
    keeps one Deadline, the ClientClock and the SessionLog."""
    # Slots: an idle proxied session should cost little memory.
    __slots__ = ("worker", "loop", "server", "config", "client_address", "client_port", "phase",
                 "backend", "backend_connection", "relay", "client_name", "attempt",
                 "login_attempt", "authenticator", "timer", "closed", "outcome", "proxy_facts",
                 "certificate", "opening", "client", "machine", "client_clock", "journal",
                 "counted", "debug", "lease", "auth_began", "relay_mark", "transcript", "local")

    def __init__(self, worker, listener: Listener, sock: socket.socket, address):
        self.worker, self.loop, self.server = worker, worker.loop, listener.server
        self.config = worker.config  # a reload does not change a running session
        self.journal = SessionLog(worker, self.server, worker.next_session_number(),
                                  listener.listen.text)
        # error_log ... debug: phases, commands and reply codes (decided once:
        # with it off, no debug line costs more than this flag's test).
        self.debug = worker.logs.for_server(self.server).enabled("debug")
        self.client_address = peer_text(address)
        self.client_port = address[1] if isinstance(address, tuple) else 0
        self.local = listener.local  # the address the client came to, if the listener knows
        # transcript_log: this session's dialogue and debug lines, if wanted.
        self.transcript = transcript_for_session(self.server, listener.listen, self.client_address)
        if self.transcript is not None:
            self.debug = True
        self.client_name = CLIENT_UNAVAILABLE   # SMTP: nginx's s->host (no resolver)
        self.proxy_facts = None      # the PROXY header's (addr, port, server addr, port)
        self.certificate = None      # type: Optional[CertificateFacts]
        self.login_attempt = 0       # Auth-Login-Attempt
        self.attempt = None          # type: Optional[LoginAttempt]  (the last one)
        self.authenticator = None    # made at the first login attempt
        self.opening = self.backend = self.backend_connection = self.relay = None
        self.closed, self.outcome = False, ""
        self.counted = False         # in SessionCounts (max_user_sessions): LoginGuard
        self.lease = None            # its place on a pool's server (PoolLease), once logged in
        self.auth_began = 0.0        # the loop's time of the last credentials (login duration)
        self.relay_mark = None       # (received, sent) of the client when the relay began
        self.timer = Deadline(self.loop, self)   # what the session waits for, and how long
        self.client_clock = ClientClock(self.loop.time, self.server.timeout)
        peer = self.client_address if listener.listen.port == 0 else "%s:%d" % (
            self.client_address, self.client_port)           # "unix:", as nginx
        self.log("info", "client %s connected to %s", peer, listener.listen.text, action=None)
        configure_accepted(sock, listener)
        self.client = Stream(self.loop, sock, self)
        self.count("mailproxy_connections_total")
        worker.metrics.change("mailproxy_sessions_active", self.labels(), +1)
        try:
            self._enter(Phase.ACCEPTED)
            self.machine = CLIENT_MACHINES[self.server.protocol](
                worker.capabilities.settings_for(self.config, self.server),
                now=time.time(), randomness=self.worker.randomness,
                tls=listener.listen.ssl)
            self.machine.trace = self.debug
            if ClientOpening.needed(self.server, listener.listen):
                self.opening = ClientOpening(self, listener.listen)
            else:
                self.opened(b"")            # nothing comes before the greeting
        except BaseException:
            # Leave nothing behind in the loop: a stale registration of this
            # descriptor would make the next socket given its number fail.
            self.timer.cancel()
            self.client.close()
            if not self.closed:
                worker.metrics.change("mailproxy_sessions_active", self.labels(), -1)
            raise

    # -- phases -------------------------------------------------------------------
    def _enter(self, phase: Phase) -> None:
        """Go on to ``phase``: its read budget and timer (PHASES).  The one
        place the phase changes; a new session enters ACCEPTED from None."""
        now = getattr(self, "phase", None)        # None: the slot is not set yet
        if (now, phase) not in PHASE_CHANGES:
            raise RuntimeError("no way from phase %s to %s" % (now and now.value, phase.value))
        self.phase = phase
        if self.debug:
            self.log("debug", "mail phase: %s -> %s", now.value if now else "new", phase.value)
        timer = PHASES[phase].timer
        if timer == "client":
            self.timer.set(self.client_clock.left(), self._client_timed_out)
        elif timer == "upstream":
            self.timer.set(self.server.timeout, self._upstream_timed_out)
        elif timer == "off":
            self.timer.cancel()
        self._read_budget()

    def _read_budget(self) -> None:
        """Read the client as the phase says; in the dialogue only while the
        machine can take a command and our replies have gone (nginx's
        "blocked"), and no more than its buffer holds: a client that sends
        without reading cannot make us queue replies, nor hold more than a
        command behind its login."""
        if self.phase == Phase.RELAY:
            return                              # the relay reads as its buffers allow
        reads = PHASES[self.phase].reads
        if reads is None:
            blocked = self.phase == Phase.DIALOGUE and (self.client.out or self.machine.waiting)
            reads = 0 if blocked else self.machine.buffer_size
        self.client.set_read_budget(reads)

    # -- the opening, then the dialogue ------------------------------------------
    def _start_client_tls(self) -> None:
        """The TLS handshake: listen ... ssl (the opening), or STARTTLS."""
        self._enter(Phase.HANDSHAKE)
        self.client.start_tls(TlsLayer(self.server.tls_context, server_side=True,
                                       alpn=ALPN_NAMES.get(self.server.protocol,
                                                           self.server.protocol)))

    def _certificate_ok(self) -> bool:
        """ssl_verify_client, once the handshake is done (certificate_verdict)."""
        if self.server.ssl_verify_client == "off":
            return True
        self.certificate = self.client.tls.peer_certificate()
        message, refusal = certificate_verdict(self.server.ssl_verify_client, self.certificate)
        if message:
            self.log("info", message)
        if refusal == "certificate error":      # known only through libssl (certificate_facts)
            LibSsl.probe().forget_session(self.client.tls.object)
            self._close_after_reply(refusal, self.machine.CERT_ERROR)
        elif refusal:
            self._close_after_reply(refusal, self.machine.NO_CERT)
        return not refusal

    def stream_tls_ready(self, stream: Stream) -> None:
        """STARTTLS is done: the dialogue goes on, over TLS."""
        self.count("mailproxy_tls_handshakes_total", "ok")
        if self._certificate_ok():
            self._enter(Phase.DIALOGUE)
            self._handle_events(self.machine.tls_started())

    def opened(self, early_data: bytes) -> None:
        """The opening is done: the greeting, then what the client sent ahead."""
        self.opening = None
        self.client.owner = self
        if self.server.protocol == "smtp":
            # Decided once, from the peer (after a PROXY header, the client
            # it names), as Postfix's smtpd_authorized_xclient_hosts: a
            # peer may send XCLIENT again after naming another client.
            self.machine.xclient_allowed = real_ip_trusted(self.client_address,
                                                           self.server.trusted_networks)
        self.machine.greet()
        self._enter(Phase.DIALOGUE)
        self._say(self.machine.data_to_send())
        if early_data:
            self.stream_data(self.client, early_data)

    def stream_data(self, stream: Stream, data: bytes) -> None:
        if self.transcript is not None:
            self.transcript.from_client(data)
        commands = self.machine.commands
        events = self.machine.receive_data(data)
        if self.machine.commands != commands:
            self._command_done()
        self._handle_events(events)

    def _handle_events(self, events: list) -> None:
        self._say(self.machine.data_to_send())
        if self.machine.debug_notes:                  # only with the debug log on
            self._log_commands()
        for event in events:
            self.EVENTS[type(event)](self, event)
        self._read_budget()

    def _log_commands(self) -> None:
        """The machine's notes: each command's name and reply code, nginx's
        "imap auth state" lines made readable (never an argument)."""
        notes, self.machine.debug_notes = self.machine.debug_notes, []
        for name, code in notes:
            if code:
                self.log("debug", "%s command: %s, reply: %s", self.server.protocol, name, code)
            else:
                self.log("debug", "%s command: %s, waiting for the verdict",
                         self.server.protocol, name)

    def _quit(self, event: Quit) -> None:
        self._close_after_reply("client quit")

    def _machine_closed(self, event: Closed) -> None:
        if event.reason:
            self.log("info", event.reason)
        self._close_after_reply(event.reason or "login failed")

    def _client_identity(self, event: ClientIdentity) -> None:
        """A webmail host in trusted_networks names its user's address: the
        session's client from now on (the defence, the log, auth_http, and
        SMTP's Client-Host and the backend's XCLIENT, for the name)."""
        if event.source == "XCLIENT":
            return self._xclient(event)
        believed = believed_client(event, self.client_address, self.server.trusted_networks)
        if believed is not None:
            self.client_address, self.client_port = believed
            self.log("info", "real client address %s:%d (IMAP ID)" % believed)

    def _xclient(self, event: ClientIdentity) -> None:
        """The machine takes XCLIENT only when opened() found the peer trusted."""
        if not self.machine.xclient_allowed:
            return
        client = (self.client_address, self.client_port, self.client_name)
        self.client_address, self.client_port, self.client_name = xclient_client(event, client)
        self.log("info", 'real client address %s:%d (XCLIENT), name "%s"'
                 % (self.client_address, self.client_port, self.client_name))

    def _start_tls(self, event: StartTls) -> None:
        self.journal.starttls = True
        self._start_client_tls()

    def stream_drained(self, stream: Stream) -> None:
        if self.phase == Phase.CLOSING:
            self.close(self.outcome)
        else:
            self._read_budget()

    def stream_eof(self, stream: Stream) -> None:
        self.close("client closed connection")

    def stream_error(self, stream: Stream, error: Exception) -> None:
        if isinstance(error, TlsError):
            self.log("info", str(error))
            if self.phase == Phase.HANDSHAKE:
                self.count("mailproxy_tls_handshakes_total", "failed")
            self.close("client TLS error")
        else:
            self.log("info", "client connection error (%s: %s)" % (error.errno, error.strerror))
            self.close("client connection error")

    def _close_after_reply(self, outcome: str, reply: bytes = b"") -> None:
        """The end, once the client has read what it was told (``reply``, last)."""
        if reply:
            if self.debug and self.machine is not None:
                self.log("debug", "%s reply: %s, then close", self.server.protocol,
                         self.machine.reply_code(reply))
            self._say(reply)
        if self.backend_connection is not None:
            # A failed login: nothing more is read from the backend, so no
            # later byte of it can take the session on to the relay.
            self.backend_connection.close()
        self._enter(Phase.CLOSING)
        self.outcome = outcome
        if not self.client.out:
            self.close(outcome)

    # -- timers ---------------------------------------------------------------------
    def _command_done(self) -> None:
        """The machine took a whole command: the next one has its own
        ``timeout`` (the same timer, moved on)."""
        if self.timer.callback == self._client_timed_out:
            self.timer.postpone(self.client_clock.left())

    def _client_timed_out(self) -> None:
        self.log("info", self.client_clock.expired())
        self.close("client timed out")

    def _upstream_timed_out(self) -> None:
        self.log("error", "upstream timed out (110: Connection timed out)")
        if self.backend_connection is not None and self.backend_connection.timed_out():
            # A pool's next server: the same time again for it.
            return self.timer.set(self.server.timeout, self._upstream_timed_out)
        self.backend_failed("upstream timed out")

    # -- authentication ---------------------------------------------------------------
    def _authenticate(self, credentials: Credentials) -> None:
        self._enter(Phase.AUTH)
        self.auth_began = self.loop.time()
        self.login_attempt += 1
        # smtp_auth none logs in as nobody: a login a failed AUTH left must
        # not stay in the log lines as if this one were it (nginx >= 1.29.1
        # forgets it at MAIL, CVE-2025-53859).
        self.journal.login = credentials.login if credentials.method != AuthMethod.NONE else None
        if self.transcript is not None:
            self.transcript.decide(self.client_address, self.journal.login)
        if self.authenticator is None:
            self.authenticator = authenticator_for(self.server, self.config, self.worker, self)
        tls = self.client.tls.facts() if self.client.tls is not None else None
        self.attempt = login_attempt(credentials, self.login_attempt, self.machine,
                                     (self.client_address, self.client_port), self.client_name,
                                     self.proxy_facts, tls, self.certificate)
        self.authenticator.start(self.attempt, self._auth_outcome)

    def _auth_outcome(self, outcome: AuthOutcome) -> None:
        """The authenticator's verdict: an internal error, a refusal (after
        its delay; then the dialogue goes on, or ends), or the backend."""
        if self.debug:
            self.log("debug", "auth verdict: %s%s", outcome.kind.value,
                     ", upstream: %s" % outcome.upstream.text
                     if outcome.kind == Verdict.OK and outcome.upstream is not None else "")
        if outcome.kind == Verdict.ERROR:
            if outcome.logged:             # auth = backend: as a failed backend login
                return self.backend_failed(outcome.reason, outcome.text)
            self.count("mailproxy_logins_total", "backend_error")
            self.log("error", outcome.reason, action="in http auth state")
            return self._close_after_reply("auth http error", self.machine.INTERNAL_ERROR)
        if outcome.kind == Verdict.OK:
            if self.attempt.credentials.method != AuthMethod.NONE:
                self.journal.login = outcome.login
            if outcome.connection is not None:
                # auth = backend: BackendAuth is logged in already; its
                # connection is the session's now.
                self.backend_connection = outcome.connection
                self.backend_connection.owner = self
                self.backend = self.backend_connection.stream
                self.journal.upstream = outcome.upstream
                return self.backend_logged_in(outcome.reply)
            return self._login_to_backend(outcome)
        self.log("info", 'client login failed: "%s"' % outcome.reason)
        self.count("mailproxy_logins_total", login_result(outcome))
        reply = self.machine.failure_reply(outcome.text, outcome.error_code)
        refuse = lambda: self._auth_failed(reply, outcome.sasl_error, outcome.close)
        if outcome.wait:
            self.timer.set(outcome.wait, refuse)
        else:
            refuse()

    def _auth_failed(self, reply: bytes, challenge: Optional[bytes], close: bool) -> None:
        """The refusal, after its delay: the dialogue goes on (as nginx does
        when the auth server asks for Auth-Wait), or ends (``close``)."""
        self._enter(Phase.DIALOGUE)
        self._handle_events(self.machine.auth_failed(reply, challenge, close))

    # -- the backend --------------------------------------------------------------------
    def _login_to_backend(self, outcome: AuthOutcome) -> None:
        self.journal.upstream = outcome.upstream
        self._enter(Phase.CONNECT)
        self.backend_connection = open_backend(
            self.loop, backend_settings(self.config, self.server, outcome.upstream), self.attempt,
            outcome, self.local_address(), self, self.log, debug=self.debug,
            pool=self.worker.pools.pool_for(self.config, outcome.upstream),
            session=self.journal.number)

    def local_address(self) -> Tuple[str, int]:
        """The address the client connected to (the PROXY header's and
        XCLIENT's destination): the listener's, or asked of the socket
        when the listener is on a wildcard address."""
        return self.local or local_address(self.client.sock)

    def backend_chosen(self, upstream: Upstream) -> None:
        """A pool's server is tried: the log names it."""
        self.journal.upstream = upstream

    def backend_connected(self, stream: Stream) -> None:
        """Connected (again, to a pool's next server after a failure)."""
        self.backend = stream
        if self.phase == Phase.CONNECT:
            self._enter(Phase.LOGIN)

    def backend_logged_in(self, reply: bytes) -> None:
        """The backend said yes: its reply, then the relay, which takes the
        client's pipelined bytes (the machine kept them unparsed) and what
        the backend sent behind its reply."""
        self.journal.logged_in(self.client.tls.facts() if self.client.tls is not None else None,
                               self.attempt.credentials.method.value,
                               self.backend.tls.facts() if self.backend.tls is not None else None)
        self.log("info", "client logged in", how=True)
        self.count("mailproxy_logins_total", "ok")
        self.worker.metrics.observe("mailproxy_login_duration_seconds", self.labels(),
                                    self.loop.time() - self.auth_began)
        self._enter(Phase.RELAY)
        answer = self.machine.logged_in_reply(reply)
        if self.debug:
            self.log("debug", "%s command: %s, reply: %s (the backend's)", self.server.protocol,
                     self.machine.waiting_for or "login", self.machine.reply_code(answer))
        self._say(answer)
        self._end_transcript("relaying")
        self.relay_mark = (self.client.received, self.client.sent)
        trailing = self.backend_connection.login.trailing_data
        self.lease = self.backend_connection.take_lease()
        if self.lease is not None:         # until close(): one more session on that pool server
            self.worker.metrics.change("mailproxy_upstream_sessions_active", self.lease.labels, +1)
        check = self.authenticator.recipient_check(self.attempt, self.journal.upstream, self.log)
        # What only the login needed goes: an idle relay holds little, and no password.
        self.backend_connection = self.attempt = self.authenticator = None
        self.relay = start_relay(self, self.client, self.backend, self.server, check,
                                 self.machine.trailing_data, trailing)
        self.machine = None                # the dialogue is over

    def backend_failed(self, outcome: str, refusal: bytes = b"") -> None:
        """No login at the backend (BackendConnection logged why): the
        client hears the backend's refusal (proxy_pass_error_message), or
        the internal error, and the session ends."""
        self.count("mailproxy_logins_total",
                   "timeout" if outcome == "upstream timed out" else "backend_error")
        self._close_after_reply(outcome, refusal or self.machine.INTERNAL_ERROR)

    # -- the metrics, the log and the end ---------------------------------------------
    def labels(self) -> tuple:
        return self.server.name, self.server.protocol

    def count(self, name: str, *labels: str, amount=1) -> None:
        """Count in the worker's Metrics, with this server's labels first."""
        self.worker.metrics.count(name, self.labels() + labels, amount)

    def _count_end(self, outcome: str) -> None:
        """At the close: the session's end, and the bytes of its relay."""
        metrics = self.worker.metrics
        metrics.change("mailproxy_sessions_active", self.labels(), -1)
        if self.lease is not None:         # released by now; its labels remain
            metrics.change("mailproxy_upstream_sessions_active", self.lease.labels, -1)
        self.count("mailproxy_sessions_ended_total", end_reason(outcome))
        if self.relay_mark is not None:
            self.count("mailproxy_relay_bytes_total", "to_backend",
                       amount=self.client.received - self.relay_mark[0])
            self.count("mailproxy_relay_bytes_total", "to_client",
                       amount=self.client.sent - self.relay_mark[1])

    def _say(self, data: bytes) -> None:
        """To the client, before the relay."""
        if self.transcript is not None:
            self.transcript.from_server(data)
        self.client.write(data)

    def _end_transcript(self, text: str) -> None:
        """The transcript is over (relay, or close): to its file, if wanted."""
        transcript, self.transcript = self.transcript, None
        if transcript is not None:
            write_transcript(self.server.transcript_log, self.journal.number,
                             transcript.finish(self.client_address, text), self.worker.log)

    def log(self, level: str, message: str, *args, action: Optional[str] = "",
            how: bool = False) -> None:
        """A line with nginx's context (SessionLog), the phase's action by
        default; ``how``: and how the login was made (SessionLog.logged_in)."""
        if self.transcript is not None:
            self.transcript.note("[%s] %s" % (level, message % args if args else message))
        self.journal.log(level, message, args, self.client_address,
                         PHASES[self.phase].action if action == "" else action, how)

    def crashed(self, error: Exception) -> None:
        """A bug met while serving this client (see loop_callback): say where
        in the log and end this session; the worker and its other sessions
        go on."""
        frames = traceback.extract_tb(error.__traceback__)
        where = "%s:%d" % (os.path.basename(frames[-1].filename), frames[-1].lineno) if frames else "?"
        self.log("alert", "internal error, session closed: %s at %s" % (
            log_escape(repr(error).encode("utf-8", "replace")), where))
        try:
            self.close("internal error")
        except Exception:
            pass            # close() let go of the sockets and the session all the same

    def close(self, outcome: str) -> None:
        """Close both sides and write the access line (extension: nginx has none)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.timer.cancel()
            if self.lease is not None:
                self.lease.release()
            for part in (self.opening, self.authenticator, self.backend_connection, self.relay):
                if part is not None:
                    part.cancel()
            self._count_end(outcome)
            self._end_transcript("session done: %s" % outcome)
            self.journal.session_done(outcome, self.client_address, self.client.received,
                                      self.client.sent)
        finally:
            # Even after a bug above, the sockets go and the worker forgets the session.
            for stream in (self.client, self.backend):
                if stream is not None:
                    stream.close()
            self.worker.session_closed(self)


# What each event of a client machine leads to.
Session.EVENTS = {Credentials: Session._authenticate, StartTls: Session._start_tls,
                  Quit: Session._quit, Closed: Session._machine_closed,
                  ClientIdentity: Session._client_identity}


# ========================================================================== #
# ####                        Status and control                        #### #
# ========================================================================== #
# status_listen: a small HTTP/1.1 server for monitoring and control (README,
# "Monitoring and control"): /metrics in Prometheus's text format 0.0.4,
# /healthz and /readyz for load balancers and probes, /sessions and the
# POST actions for operators.  It runs in the master (in the one process
# with master_process off), on the master's loop: one answer covers every
# worker.  The workers count into their copy of the Metrics book (a book of
# SharedBooks, Processes) and publish what changed at most every
# METRICS_FLUSH seconds, so the master's copy holds the sums; a scrape is at
# most that much behind, and costs the workers nothing.  What only a worker
# knows (its sessions) the master asks for with a StatusQueries event and
# gets back in answers.  The request parser is sans-I/O and bounded; the
# listener, the connections and the checks of /readyz do the I/O.  Nothing
# here touches a session's secrets: a session row is its number, names,
# addresses and byte counts.  Also here, beside the status: the session
# transcripts (transcript_log), which the Session feeds.

METRICS_FLUSH = 0.25           # s: a worker publishes its metrics' changes this often, at most
METRIC_LABEL_MAX = 200         # characters of a label value kept (a server's name is free text)
STATUS_REQUEST_MAX = 8192      # bytes of request line and headers (nginx's large_client_header_buffers)
STATUS_HEADERS_MAX = 64        # header lines in one request
STATUS_TIMEOUT = 10.0          # s for a client to send its whole request (a slow drip cannot hold it)
STATUS_LINGER = 2.0            # s a status connection reads and drops after its response (nginx: 5s)
STATUS_CONNECTIONS_MAX = 64    # status connections at once; more are closed at accept
STATUS_QUERY_TIMEOUT = 2.0     # s the master waits for the workers' answers (/sessions, kick)
STATUS_CHECK_TIMEOUT = 1.0     # s /readyz gives a connect() to the auth server
STATUS_ROW_LOGIN_MAX = 256     # characters of a login in a /sessions row

# Buckets of the duration histograms, in seconds: Prometheus's client defaults
# without 5 ms (a login takes a round trip to the backend at least) and with
# 30 s (a slow auth server or backend, within ``timeout``).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BUCKET_LABELS = tuple((bound, repr(bound)) for bound in DURATION_BUCKETS) + ((float("inf"), "+Inf"),)
BUCKET_BOUNDS = [bound for bound, text in BUCKET_LABELS]     # a value goes in the first >= it

# Every series /metrics shows: name -> (type, help, label names).  The
# names follow Prometheus's conventions (prefix, base units, _total for
# counters); the label values are bounded sets, never a login or an address.
METRIC_FAMILIES = {
    "mailproxy_connections_total": (
        "counter", "Client connections accepted.", ("server", "protocol")),
    "mailproxy_sessions_active": (
        "gauge", "Client sessions open now.", ("server", "protocol")),
    "mailproxy_connections_queued": (
        "gauge", "Client connections in the kernel's accept queue of the server's TCP "
        "listeners, not yet taken by a worker (Linux).", ("server", "protocol")),
    "mailproxy_logins_total": (
        "counter", "Login attempts by result: ok, failed, refused (login defence, session "
        "limits), backend_error (auth server or backend failed), timeout.",
        ("server", "protocol", "result")),
    "mailproxy_login_duration_seconds": (
        "histogram", "From the client's credentials to the backend's yes, of logins that "
        "succeeded.", ("server", "protocol")),
    "mailproxy_relay_bytes_total": (
        "counter", "Bytes relayed after the login, counted on the client's connection.",
        ("server", "protocol", "direction")),
    "mailproxy_sessions_ended_total": (
        "counter", "Sessions ended, by reason.", ("server", "protocol", "reason")),
    "mailproxy_tls_handshakes_total": (
        "counter", "TLS handshakes with clients (listen ... ssl and STARTTLS) by result.",
        ("server", "protocol", "result")),
    "mailproxy_login_penalties_total": (
        "counter", "Failed logins whose reply waited more than auth_delay (the login "
        "defence's doubling delays).", ("server", "protocol")),
    "mailproxy_dns_lookups_total": (
        "counter", "Lookups of an SMTP client's name (resolver) by result: ok, failed.",
        ("server", "protocol", "result")),
    "mailproxy_auth_http_requests_total": (
        "counter", "Requests to the auth_http server by result: ok (an answer), error.",
        ("server", "result")),
    "mailproxy_auth_http_duration_seconds": (
        "histogram", "Time the auth_http server took to answer.", ("server",)),
    "mailproxy_login_penalty_entries": (
        "gauge", "Entries of the failed-login table: addresses, accounts, account and "
        "address pairs.", ("kind",)),
    "mailproxy_upstream_up": (
        "gauge", "Whether a server of an [upstream] pool takes sessions (1) or not (0).",
        ("upstream", "server")),
    "mailproxy_upstream_sessions_active": (
        "gauge", "Logged-in sessions on a server of an [upstream] pool.", ("upstream", "server")),
    "mailproxy_upstream_failures_total": (
        "counter", "Failures of a server of an [upstream] pool by kind: connect, tls, timeout, "
        "greeting (those count against max_fails), health_check (failed active checks).",
        ("upstream", "server", "kind")),
    "mailproxy_workers": (
        "gauge", "Worker processes running (those of a reload's old generation too).", ()),
    "process_open_fds": (
        "gauge", "Open file descriptors, the master's and the workers'.", ()),
    "process_resident_memory_bytes": (
        "gauge", "Resident memory of the master and the workers.", ()),
    "process_cpu_seconds_total": (
        "counter", "User and system CPU time of the master and the running workers.", ()),
    "process_start_time_seconds": (
        "gauge", "When the master started, in seconds since the epoch.", ()),
}

# Session.close's outcome -> the reason label: the first prefix that matches.
END_REASONS = (
    ("client quit", "quit"),
    ("client closed", "client_closed"),
    ("upstream closed", "upstream_closed"),
    ("client timed out", "timeout"),
    ("upstream timed out", "timeout"),
    ("proxy_timeout", "timeout"),
    ("client TLS error", "tls_error"),
    ("no client certificate", "tls_error"),
    ("client connection error", "client_error"),
    ("upstream connection error", "upstream_error"),
    ("login failed", "login_failed"),
    ("auth http error", "auth_error"),
    ("kicked", "kicked"),
    ("proxy exiting", "shutdown"),
    ("worker_shutdown_timeout", "shutdown"),
    ("internal error", "internal_error"),
)


def end_reason(outcome: str) -> str:
    """The bounded label for a session's free-text outcome ("other" for
    the rest: a backend's refusal, a session limit...)."""
    for prefix, reason in END_REASONS:
        if outcome.startswith(prefix):
            return reason
    return "other"


def login_result(outcome: "AuthOutcome") -> str:
    """mailproxy_logins_total's result for a FAIL verdict: refused when
    mailproxy itself said no before any password check (the login defence,
    max_user_sessions), else failed."""
    if outcome.reason == "login defence" or outcome.reason.startswith("max_user"):
        return "refused"
    return "failed"


class Metrics:
    """The counters and gauges of every process (sans-I/O, a book of
    SharedBooks).  A process changes only its ``pending`` changes (count,
    change, observe); events() takes them as "metrics" events, which
    publish() applies here and in the master, where /metrics reads the
    sums.  Counters keep what dead workers counted (they only go up);
    gauges are per process and go with it ("worker gone").  A series is
    (family or sample name, label values); ``on_pending`` is called at the
    first change after events() (the Worker's flush timer)."""
    kinds = ("metrics", "worker gone")
    kept_by_master = ("metrics",)      # the workers need not hear each other's

    def __init__(self):
        self.counters = {}             # (name, labels) -> number, all processes
        self.gauges = {}               # pid -> {(name, labels): number}
        self.pending = {}              # this process's counter changes not yet published
        self.pending_gauges = {}       # ... and gauge changes
        self.pending_histograms = {}   # (name, labels) -> [values per bucket] (observe)
        self.on_pending = None         # type: Optional[Callable[[], None]]
        self.dirty = False             # changes pending since the last events()
        self.publish = self.apply

    def _changed(self) -> None:
        if not self.dirty:
            self.dirty = True
            if self.on_pending is not None:
                self.on_pending()

    def count(self, name: str, labels: tuple, amount=1) -> None:
        """Add ``amount`` to a counter (amount 0 still makes the series);
        ``labels``: str values, in the family's order."""
        key = (name, labels)
        self.pending[key] = self.pending.get(key, 0) + amount
        if not self.dirty:
            self._changed()

    def change(self, name: str, labels: tuple, amount: int) -> None:
        """Move a gauge of this process by ``amount``."""
        key = (name, labels)
        self.pending_gauges[key] = self.pending_gauges.get(key, 0) + amount
        if not self.dirty:
            self._changed()

    def observe(self, name: str, labels: tuple, value: float) -> None:
        """One value of a histogram (one per login): counted in its bucket
        alone, here; events() spreads the counts over the cumulative
        ``_bucket`` series (every one, so that the series exist from the
        first value), ``_sum`` and ``_count``."""
        key = (name, labels)
        counts = self.pending_histograms.get(key)
        if counts is None:
            counts = self.pending_histograms[key] = [0] * len(BUCKET_LABELS)
        counts[bisect.bisect_left(BUCKET_BOUNDS, value)] += 1
        self.count(name + "_sum", labels, value)

    def _spread_histograms(self) -> None:
        """The pending histograms' bucket counts as counter changes."""
        for (name, labels), counts in self.pending_histograms.items():
            total = 0
            for (bound, text), count in zip(BUCKET_LABELS, counts):
                total += count
                self.count(name + "_bucket", labels + (text,), total)
            self.count(name + "_count", labels, total)
        self.pending_histograms = {}

    def events(self, pid: int) -> List[tuple]:
        """The pending changes as "metrics" events, each small enough to
        publish (SHARED_EVENT_MAX); nothing is pending afterwards."""
        def entry(key: tuple, amount) -> list:
            return [key[0], [str(value)[:METRIC_LABEL_MAX] for value in key[1]], amount]
        self._spread_histograms()
        entries = [(0, entry(key, amount)) for key, amount in self.pending.items()]
        entries += [(1, entry(key, amount)) for key, amount in self.pending_gauges.items()]
        self.pending, self.pending_gauges, self.dirty = {}, {}, False
        events, parts, size = [], ([], []), 40
        for which, entry in entries:
            length = len(json.dumps(entry)) + 1
            if size + length > SHARED_EVENT_MAX - 64 and (parts[0] or parts[1]):
                events.append(("metrics", pid, parts[0], parts[1]))
                parts, size = ([], []), 40
            parts[which].append(entry)
            size += length
        if parts[0] or parts[1]:
            events.append(("metrics", pid, parts[0], parts[1]))
        return events

    def apply(self, event: tuple) -> None:
        if event[0] == "worker gone":
            self.gauges.pop(event[1], None)
            return
        pid, counters, gauges = event[1], event[2], event[3]
        for name, labels, amount in counters:
            key = (name, tuple(labels))
            self.counters[key] = self.counters.get(key, 0) + amount
        mine = self.gauges.setdefault(pid, {})
        for name, labels, amount in gauges:
            key = (name, tuple(labels))
            mine[key] = mine.get(key, 0) + amount

    def gauge_sums(self) -> Dict[tuple, float]:
        """Each gauge summed over the processes."""
        sums = {}
        for series in self.gauges.values():
            for key, value in series.items():
                sums[key] = sums.get(key, 0) + value
        return sums


def number_text(value) -> str:
    """A sample value or an ``le`` as the text format writes it."""
    if isinstance(value, int):
        return str(int(value))
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def label_text(names: tuple, values: tuple) -> str:
    """``{name="value",...}`` with the format's escapes (backslash, double
    quote, line feed), or "" without labels."""
    if not names:
        return ""
    def escaped(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{%s}" % ",".join('%s="%s"' % (name, escaped(value)) for name, value in zip(names, values))


def render_metrics(samples: Dict[tuple, float]) -> str:
    """The text exposition format 0.0.4 of ``samples`` ((sample name,
    label values) -> value): every family of METRIC_FAMILIES with its HELP
    and TYPE lines, then its samples, a histogram's buckets in order before
    its _sum and _count."""
    by_family = collections.defaultdict(list)
    for (name, labels), value in samples.items():
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[:-len(suffix)]
            if name.endswith(suffix) and METRIC_FAMILIES.get(base, ("",))[0] == "histogram":
                family = base
        by_family[family].append((name, labels, value))
    lines = []
    for family, (kind, text, names) in METRIC_FAMILIES.items():
        lines.append("# HELP %s %s" % (family, text.replace("\\", "\\\\").replace("\n", "\\n")))
        lines.append("# TYPE %s %s" % (family, kind))
        for name, labels, value in sorted(by_family.get(family, ()), key=_sample_order):
            label_names = names + ("le",) if name.endswith("_bucket") else names
            lines.append("%s%s %s" % (name, label_text(label_names, labels), number_text(value)))
    return "\n".join(lines) + "\n"


def _sample_order(sample: tuple) -> tuple:
    """A histogram's samples per label set: buckets by bound, then _sum, _count."""
    name, labels, value = sample
    if name.endswith("_bucket"):
        bound = labels[-1]
        return labels[:-1], 0, float("inf") if bound == "+Inf" else float(bound)
    return labels, 1 if name.endswith("_sum") else 2 if name.endswith("_count") else 0, 0.0


# -- the process metrics, from /proc (Linux) -------------------------------------------

def proc_usage(pid: int) -> Optional[Tuple[int, int, float]]:
    """(open descriptors, resident bytes, CPU seconds) of process ``pid``;
    None where /proc does not tell (another system, a process gone)."""
    try:
        fds = len(os.listdir("/proc/%d/fd" % pid))
        with open("/proc/%d/statm" % pid, "rb") as handle:
            resident = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/%d/stat" % pid, "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return fds, resident, (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, ValueError, IndexError):
        return None


def process_samples(pids: List[int], started: float) -> Dict[tuple, float]:
    """process_* summed over ``pids`` (the master first, then the workers)."""
    samples = {("process_start_time_seconds", ()): started}
    usages = [usage for usage in map(proc_usage, pids) if usage is not None]
    if usages:
        samples[("process_open_fds", ())] = sum(usage[0] for usage in usages)
        samples[("process_resident_memory_bytes", ())] = sum(usage[1] for usage in usages)
        samples[("process_cpu_seconds_total", ())] = sum(usage[2] for usage in usages)
    return samples


# -- the accept queues (Linux) -------------------------------------------------------------
# A TCP listener's accept queue holds the clients the kernel has connected
# and no worker has taken yet: with every worker at worker_connections,
# new clients wait there (then time out, or are refused once it is full).
# Linux tells its current length through TCP_INFO on the listening socket:
# for a LISTEN socket, tcp_get_info() puts sk_ack_backlog in tcpi_unacked
# (and the backlog limit in tcpi_sacked) -- what ss -ltn shows as Recv-Q,
# and the rx_queue of /proc/net/tcp's st=0A rows.  TCP_INFO asks the socket
# itself: no file whose size grows with every connection of the host, and
# no matching of addresses.  Elsewhere (the layout differs, or there is
# none) and for unix sockets the series is left out, not shown as 0.

# struct tcp_info (linux/tcp.h): eight u8 fields, then the u32s rto, ato,
# snd_mss, rcv_mss and unacked.
TCP_INFO_UNACKED = struct.Struct("=24xI")


def accept_queue(sock: socket.socket) -> Optional[int]:
    """Clients waiting in listening ``sock``'s accept queue; None where
    the system does not tell (not Linux, a unix socket, a closed one)."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO") or \
            sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return TCP_INFO_UNACKED.unpack_from(info)[0]
    except (OSError, struct.error):
        return None


def queued_samples(config: Config, sockets: Dict) -> Dict[tuple, int]:
    """mailproxy_connections_queued of each server: the accept queues of
    its listeners among ``sockets`` ((host, port) -> listening socket, as
    bind_all keys them) summed; a server none of whose listeners tells is
    left out."""
    samples = {}
    for server in config.servers:
        for listen in server.listen:
            sock = sockets.get((listen.host, listen.port))
            queued = accept_queue(sock) if sock is not None else None
            if queued is not None:
                key = ("mailproxy_connections_queued", (server.name[:METRIC_LABEL_MAX],
                                                        server.protocol))
                samples[key] = samples.get(key, 0) + queued
    return samples


# -- the [upstream] pools, seen and steered from here ------------------------------------
# What the workers learned of the pool servers (UpstreamHealth) and the
# drains every worker obeys (UpstreamDrains), both shared books: the
# master reads and writes them as well as a worker (Backend pools).

def upstream_states(config: Config, books: "SharedBooks", now: float) -> List[Tuple[str, str, bool]]:
    """(pool name, server ADDRESS:PORT, up) of every server of every pool:
    up unless marked ``down`` or taken out now by some worker (UpstreamHealth)."""
    health = books.of(UpstreamHealth)
    return [(name, server.text, not server.down and health.up(name, server.text, now))
            for name, spec in sorted((config.upstreams or {}).items()) for server in spec.servers]


def upstream_drain(config: Config, books: "SharedBooks", upstream: str, server: str,
                   drain: bool) -> Optional[str]:
    """Drain (or undrain) ``server`` of pool ``upstream`` in every worker;
    None if there is no such pool or server, else what was done."""
    if not drain_server(config.upstreams, books.of(UpstreamDrains), upstream, server, drain):
        return None
    return "%s %s" % (upstream, server)


# -- the HTTP request, sans-I/O ------------------------------------------------------------

class HttpRequest(NamedTuple):
    method: str
    path: str
    query: Dict[str, str]


class HttpError(Exception):
    """A request that cannot be served: ``status`` says why."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


HTTP_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
                413: "Content Too Large", 431: "Request Header Fields Too Large",
                501: "Not Implemented", 503: "Service Unavailable",
                505: "HTTP Version Not Supported"}
HTTP_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")     # RFC 9110 §5.6.2
HTTP_REQUEST_LINE = re.compile(rb"([A-Z]+) (/[!-~]*) HTTP/(\d)\.(\d)")   # RFC 9112 §3
HTTP_HEAD_END = re.compile(rb"\r?\n\r?\n")


class HttpRequestReader:
    """One HTTP/1.x request without a body, as the status listener takes
    them.  receive_data(data) -> the HttpRequest once its head is whole,
    None while more is needed; raises HttpError (400, 413, 431, 501, 505)
    for a request that is not one, too big, or has a body.  A line may end
    with LF alone (RFC 9112 §2.2); obsolete line folding is refused
    (§5.2)."""

    def __init__(self, limit: int = STATUS_REQUEST_MAX):
        self.limit = limit
        self.data = bytearray()

    def receive_data(self, data: bytes) -> Optional[HttpRequest]:
        self.data += data
        end = HTTP_HEAD_END.search(self.data)
        if end is None:
            if len(self.data) > self.limit:
                raise HttpError(431, "request head longer than %d bytes" % self.limit)
            if data == b"":
                raise HttpError(400, "the request ended early")
            return None
        if end.end() > self.limit:
            raise HttpError(431, "request head longer than %d bytes" % self.limit)
        lines = bytes(self.data[:end.start()]).split(b"\n")
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        request = HTTP_REQUEST_LINE.fullmatch(lines[0])
        if request is None:
            raise HttpError(400, "not an HTTP request line")
        if request.group(3) != b"1":
            raise HttpError(505, "HTTP/1.x only")
        self._check_headers(lines[1:])
        path, _, query = request.group(2).decode("ascii").partition("?")
        return HttpRequest(request.group(1).decode("ascii"), path, parse_query(query))

    @staticmethod
    def _check_headers(lines: List[bytes]) -> None:
        """Well formed, not too many, and nothing that announces a body."""
        if len(lines) > STATUS_HEADERS_MAX:
            raise HttpError(431, "more than %d header lines" % STATUS_HEADERS_MAX)
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not HTTP_TOKEN.fullmatch(name) or re.search(rb"[\0\r]", value):
                raise HttpError(400, "a malformed header line")
            name, value = name.lower(), value.strip()
            if name == b"transfer-encoding":
                raise HttpError(501, "no request body is taken")
            if name == b"content-length" and value != b"0":
                raise HttpError(413 if value.isdigit() else 400, "no request body is taken")


def parse_query(query: str) -> Dict[str, str]:
    """``a=1&b=x%40y`` -> {"a": "1", "b": "x@y"}; raises HttpError(400)
    for a name given twice or an escape that is no UTF-8."""
    values = {}
    for item in query.split("&") if query else ():
        name, _, value = item.partition("=")
        try:
            name = urllib.parse.unquote_plus(name, errors="strict")
            value = urllib.parse.unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            raise HttpError(400, "a query escape that is not UTF-8")
        if name in values:
            raise HttpError(400, 'query parameter "%s" given twice' % name)
        values[name] = value
    return values


def http_response(status: int, body: bytes, content_type: str = "application/json",
                  extra: str = "") -> bytes:
    """A whole response; the connection closes after it."""
    return ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n%s\r\n"
            % (status, HTTP_REASONS[status], content_type, len(body), extra)).encode("ascii") + body


def json_body(value) -> bytes:
    return (json.dumps(value, sort_keys=True) + "\n").encode("ascii")


# -- what the master asks the workers -------------------------------------------------------

SESSION_ROW = ("id", "server", "protocol", "login", "client", "backend", "age_s",
               "bytes_to_backend", "bytes_to_client")


def session_row(session, now: float) -> list:
    """A running session as /sessions lists it (SESSION_ROW's order): no
    password, no token, no message byte."""
    journal = session.journal
    login = journal.login.decode("utf-8", "replace")[:STATUS_ROW_LOGIN_MAX] \
        if journal.login else None
    client = session.client_address if session.client_port == 0 else "%s:%d" % (
        session.client_address, session.client_port)
    backend = journal.upstream.text if journal.upstream is not None else None
    return [journal.number, session.server.name, session.server.protocol, login, client,
            backend, round(now - journal.started, 3), session.client.received,
            session.client.sent]


def sessions_matching(sessions, number: Optional[int], login: Optional[str]) -> list:
    """The sessions ``?id=N`` or ``?login=L`` names."""
    return [session for session in sessions
            if (number is not None and session.journal.number == number) or
            (login is not None and session.journal.login is not None and
             login_key(session.journal.login) == login_key(login.encode("utf-8")))]


def row_chunks(rows: list) -> List[list]:
    """``rows`` in lists that each fit one shared event."""
    chunks, chunk, size = [], [], 0
    for row in rows:
        length = len(json.dumps(row)) + 1
        if chunk and size + length > SHARED_EVENT_MAX - 128:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(row)
        size += length
    return chunks + [chunk]


class StatusQueries:
    """The master's questions to the workers and their answers (a book of
    SharedBooks).  The master publishes ("status ask", id, what, argument)
    with ask(); each worker's ``answerer(what, argument)`` (set by the
    Worker; None in the master) gives the rows, which come back as
    ("status answer", id, pid, rows, last) events, kept by the master.
    ``done(rows)`` is called when every worker asked has answered, or
    STATUS_QUERY_TIMEOUT later (see expire) with what came."""
    kinds = ("status ask", "status answer", "worker gone")
    kept_by_master = ("status answer",)

    def __init__(self):
        self.next_id = 0
        self.waiting = {}              # id -> [pids still to answer, rows, done]
        self.answerer = None           # type: Optional[Callable[[str, object], list]]
        self.publish = self.apply

    def ask(self, what: str, argument, pids: List[int], done: Callable[[list], None]) -> int:
        self.next_id += 1
        self.waiting[self.next_id] = [set(pids), [], done]
        self.publish(("status ask", self.next_id, what, argument))
        self._finish_if_done(self.next_id)
        return self.next_id

    def expire(self, query: int) -> List[int]:
        """The time is up for ``query``: done() with what came; returns
        the workers that did not answer."""
        entry = self.waiting.pop(query, None)
        if entry is None:
            return []
        entry[2](entry[1])
        return sorted(entry[0])

    def apply(self, event: tuple) -> None:
        if event[0] == "status ask" and self.answerer is not None:
            pid = os.getpid()
            chunks = row_chunks(self.answerer(event[2], event[3]))
            for number, chunk in enumerate(chunks):
                self.publish(("status answer", event[1], pid, chunk, number == len(chunks) - 1))
        elif event[0] == "status answer" and event[1] in self.waiting:
            entry = self.waiting[event[1]]
            entry[1].extend(event[3])
            if event[4]:
                entry[0].discard(event[2])
            self._finish_if_done(event[1])
        elif event[0] == "worker gone":
            for query in list(self.waiting):
                self.waiting[query][0].discard(event[1])
                self._finish_if_done(query)

    def _finish_if_done(self, query: int) -> None:
        entry = self.waiting.get(query)
        if entry is not None and not entry[0]:
            del self.waiting[query]
            entry[2](entry[1])


# -- session transcripts (transcript_log, transcript_for) ---------------------------
# For support: the dialogue of one user's or one address's sessions up to
# the login, and how the login went (the session's debug lines: commands,
# reply codes, the backend login's steps), in a file of its own, so that
# nobody turns debug on for everyone.  Secrets never reach it: a client line
# is shown only when its command is one whose arguments hold none
# (TRANSCRIPT_SHOWN); any other command shows its name only, and whatever
# answers a server's request for more (a SASL response, a literal) and every
# IMAP literal is replaced by its length.  Sans-I/O but for
# write_transcript.

TRANSCRIPT_MAX = 16384         # bytes of transcript kept per session (the rest: a note that it was cut)
# Per protocol: the commands shown whole, and those shown with their first
# argument only (the SASL mechanism, the POP3 user).  Anything else: its name.
TRANSCRIPT_SHOWN = {
    "imap": ({b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"ID"}, {b"AUTHENTICATE"}),
    "pop3": ({b"CAPA", b"STLS", b"QUIT", b"NOOP", b"RSET"}, {b"AUTH", b"USER"}),
    "smtp": ({b"EHLO", b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP", b"QUIT", b"STARTTLS",
              b"XCLIENT", b"DATA"}, {b"AUTH"}),
}
TRANSCRIPT_LITERAL = re.compile(rb"\{(\d{1,10})\+?\}\r?\n\Z")     # RFC 3501 §4.3, RFC 7888


def transcript_for_session(server: Settings, listen: Listen, address: str
                           ) -> Optional["Transcript"]:
    """A Transcript for a new session of ``server`` if it may be wanted:
    its address is, or may be once a PROXY header has named the client, or
    transcript_for names logins (then every session is recorded until its
    login, within TRANSCRIPT_MAX)."""
    if server.transcript_log is None or not server.transcript_for:
        return None
    if real_ip_trusted(address, server.transcript_for) or listen.proxy_protocol or \
            any(isinstance(wanted, str) for wanted in server.transcript_for):
        return Transcript(server.protocol, server.transcript_for)
    return None


class Transcript:
    """One session's transcript, kept in memory until its end (or its
    login) and written only if the session is one of ``wanted``
    (transcript_for): its client address, or the login it gave.
    from_client(bytes) and from_server(bytes) take the dialogue, note(text)
    a line of the session's log; finish() gives the lines to write."""

    def __init__(self, protocol: str, wanted: List):
        self.protocol = protocol
        self.wanted = wanted
        self.lines = []                # str, in order
        self.size = 0
        self.matched = None            # type: Optional[bool]  (None: not decided yet)
        self.pending = bytearray()     # a client line not ended yet
        self.server_pending = bytearray()      # ... and a server line
        self.command = []              # the parts of a command spread over IMAP literals
        self.literal = 0               # bytes of an IMAP literal still to come
        self.literal_bytes = 0         # bytes of the literals of the command under way
        self.continuation = False      # the server's last line asked the client for more
        self.answering = False         # the command under way answers such a request

    def _add(self, line: str) -> None:
        if self.size > TRANSCRIPT_MAX:
            return
        self.size += len(line)
        self.lines.append(line if self.size <= TRANSCRIPT_MAX else "-- transcript cut here")

    def note(self, text: str) -> None:
        self._add("-- " + text)

    def from_server(self, data: bytes) -> None:
        self.server_pending += data
        *lines, rest = bytes(self.server_pending).split(b"\n")
        self.server_pending = bytearray(rest[:TRANSCRIPT_MAX])
        for line in lines:
            line = line.rstrip(b"\r")
            self._add("S: " + log_escape(line))
            self.continuation = line.startswith(b"334 ") if self.protocol == "smtp" else \
                line.startswith(b"+")

    def from_client(self, data: bytes) -> None:
        data = memoryview(data)
        while data:
            if self.literal:
                taken = min(self.literal, len(data))
                self.literal -= taken
                data = data[taken:]
                self.literal_bytes += taken
                continue
            end = bytes(data[:TRANSCRIPT_MAX]).find(b"\n")
            if end < 0:
                self.pending += data
                data = data[:0]
                if len(self.pending) > TRANSCRIPT_MAX:       # no line end in sight: hidden
                    self._add("C: <%d bytes without a line end>" % len(self.pending))
                    self.pending = bytearray()
                break
            line, data = bytes(self.pending) + bytes(data[:end + 1]), data[end + 1:]
            self.pending = bytearray()
            literal = TRANSCRIPT_LITERAL.search(line) if self.protocol == "imap" else None
            if not self.command:
                self.answering = self.continuation
                if literal is not None:        # shown now, in its place in the dialogue
                    self._add("C: " + self._masked([line], spread=True))
            self.command.append(line)
            if literal is not None:
                self.literal = int(literal.group(1))
                if self.literal:
                    continue
            if len(self.command) == 1:
                self._add("C: " + self._masked(self.command))
            self.command, self.literal_bytes = [], 0

    def _masked(self, parts: List[bytes], spread: bool = False) -> str:
        """A whole client command as the transcript shows it; ``spread``:
        the first line of one that goes on behind a literal."""
        size = sum(len(part) for part in parts) + self.literal_bytes - \
            (len(parts[-1]) - len(parts[-1].rstrip(b"\r\n")))
        if self.answering:
            return "<%d bytes hidden: an answer to the server's request for more>" % size \
                if not spread else "<an answer to the server's request for more, hidden>"
        words = parts[0].rstrip(b"\r\n").split(b" ")
        if self.protocol == "imap":
            head, words = [words[0]], words[1:]
        else:
            head = []
        if not words or not words[0]:
            return "<%d bytes hidden>" % size
        name = words[0].upper()
        whole, first = TRANSCRIPT_SHOWN[self.protocol]
        if name in whole and not spread:
            return log_escape(parts[0].rstrip(b"\r\n"))
        shown = b" ".join(head + words[:2 if name in first else 1])
        hidden = size - len(shown) - 1             # the arguments (literals included)
        text = log_escape(shown[:200])
        if spread:
            return text + " <arguments and literals hidden>"
        return text + (" <%d bytes hidden>" % hidden if hidden > 0 else "")

    def decide(self, address: str, login: Optional[bytes]) -> bool:
        """Is the session one of transcript_for?  Decided at the first
        login (by the address then, or the login), or at the end."""
        if self.matched is None or (not self.matched and login):
            self.matched = real_ip_trusted(address, self.wanted) or (
                login is not None and login.decode("utf-8", "replace").lower() in self.wanted)
        return self.matched

    def finish(self, address: str, text: str) -> List[str]:
        """The lines to write (none if the session is not wanted)."""
        self.note(text)
        if not self.decide(address, None):
            return []
        lines, self.lines = self.lines, []
        return lines


def write_transcript(path: str, number: int, lines: List[str], log: ErrorLog) -> None:
    """Append a session's lines to ``path`` (made 0600: it names users).
    A file that cannot be written is logged, once per call."""
    if not lines:
        return
    stamp = time.strftime("%Y/%m/%d %H:%M:%S")
    text = "".join("%s *%d %s\n" % (stamp, number, line) for line in lines)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, text.encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError as error:
        log.log("error", 'transcript: open() "%s" failed (%d: %s)'
                % (path, error.errno, error.strerror))


# -- the listener and its connections ----------------------------------------------------------

class StatusConnection(StreamOwner):
    """One HTTP client of the status listener: its request (within
    STATUS_TIMEOUT), then one response, then the close.  The close
    lingers (RFC 9112 §9.6): once the response is sent, our side shuts
    down and whatever the client still sends is read and dropped, until
    its end or STATUS_LINGER, so that a client whose request was refused
    half-read (431) gets the response instead of a reset."""

    def __init__(self, server: "StatusServer", sock: socket.socket, peer: str):
        self.server = server
        self.peer = peer
        self.reader = HttpRequestReader()
        self.answered = False
        self.lingering = False
        self.stream = Stream(server.loop, sock, self)
        self.stream.set_read_budget(1024)
        self.timer = server.loop.call_later(STATUS_TIMEOUT, self._timed_out)

    def stream_data(self, stream: Stream, data: bytes) -> None:
        if self.answered:
            return                     # lingering, or waiting for the workers: dropped
        try:
            request = self.reader.receive_data(data)
        except HttpError as error:
            return self.respond(error.status, json_body({"error": str(error)}))
        if request is not None:
            self.stream.set_read_budget(0)
            self.answered = True       # an answer is on its way (now, or from the workers)
            self.server.serve(self, request)

    def stream_eof(self, stream: Stream) -> None:
        if not self.answered:
            self.stream_data(stream, b"")
        elif self.lingering:
            self.close()               # the client is done

    def stream_error(self, stream: Stream, error: Exception) -> None:
        self.close()

    def stream_drained(self, stream: Stream) -> None:
        self._linger()

    def crashed(self, error: Exception) -> None:
        self.server.log.log("alert", "status listener: internal error %r" % error)
        self.close()

    def _timed_out(self) -> None:
        self.respond(408, json_body({"error": "request not received within %gs" % STATUS_TIMEOUT}))

    def respond(self, status: int, body: bytes, content_type: str = "application/json",
                extra: str = "") -> None:
        """The response, then the close (once it is sent)."""
        if self.stream.closed:
            return
        self.answered = True
        self.timer.cancel()
        self.stream.set_read_budget(0)
        self.stream.write(http_response(status, body, content_type, extra))
        if not self.stream.out:
            self._linger()
        else:                          # a client that does not read gets STATUS_TIMEOUT
            self.timer = self.server.loop.call_later(STATUS_TIMEOUT, self.close)

    def _linger(self) -> None:
        """The response is sent: FIN, then read and drop until EOF."""
        if self.stream.closed:
            return
        try:
            self.stream.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self.close()
        self.lingering = True
        self.timer.cancel()
        self.timer = self.server.loop.call_later(STATUS_LINGER, self.close)
        self.stream.set_read_budget(1024)

    def close(self) -> None:
        self.timer.cancel()
        self.stream.close()
        self.server.connections.discard(self)


class StatusServer(LoopHandler):
    """status_listen: accepts, checks the peer against status_allow, and
    serves each request (STATUS_ROUTES).  ``process`` is the Master (or
    the Worker with master_process off): it has ``books``, ``log``,
    ``config`` and the methods status_ask, status_expire, status_pids,
    status_workers, status_sockets, status_flush, status_healthy,
    status_reopen_logs."""

    def __init__(self, process, sock: socket.socket, listen: Listen):
        self.process = process
        self.loop = process.loop
        self.sock = sock
        self.listen = listen
        self.connections = set()
        self.started = time.time()
        self.asked = {}                # the workers' answers awaited: query -> deadline
        self.interest = self.loop.set_interest(sock, selectors.EVENT_READ, self, 0)

    @property
    def log(self) -> ErrorLog:
        return self.process.log

    def crashed(self, error: Exception) -> None:
        """A bug here (EventLoop.failed) must not end the master."""
        self.log.log("alert", "status listener: internal error %r" % error)

    def ask(self, what: str, argument, done: Callable[[list], None]) -> None:
        """The workers' rows for ``what``: done(rows) when all have
        answered, or STATUS_QUERY_TIMEOUT later with what came."""
        query = self.process.status_ask(what, argument, done)
        if query is not None:
            self.asked[query] = self.loop.time() + STATUS_QUERY_TIMEOUT
            self.loop.call_later(STATUS_QUERY_TIMEOUT, self._expire)

    def _expire(self) -> None:
        now = self.loop.time()
        for query, deadline in list(self.asked.items()):
            if deadline <= now:
                del self.asked[query]
                self.process.status_expire(query)

    def on_readable(self) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self.log.log("error", "status listener: accept() failed (%d: %s)"
                             % (error.errno, error.strerror))
                return
            if len(self.connections) >= STATUS_CONNECTIONS_MAX:
                sock.close()
                continue
            sock.setblocking(False)
            try:
                connection = StatusConnection(self, sock, peer_text(address))
            except OSError:
                sock.close()
                continue
            self.connections.add(connection)
            if not real_ip_trusted(connection.peer, self.process.config.main.status_allow):
                # Refused before a byte of it is parsed (the master may run as root).
                self.log.log("info", "status listener: %s forbidden by status_allow"
                             % connection.peer)
                connection.respond(403, json_body({"error": "forbidden"}))

    def close(self) -> None:
        """Stop listening and drop the connections (in a worker after
        fork(): its copies only; the master's loop is closed there)."""
        for connection in list(self.connections):
            connection.timer.cancel()
            connection.stream.sock.close()
        self.connections = set()
        self.sock.close()

    def stop(self) -> None:
        """Stop serving, in the master: the loop forgets the sockets."""
        for connection in list(self.connections):
            connection.close()
        self.interest = self.loop.set_interest(self.sock, 0, self, self.interest)
        release_socket((self.listen.host, self.listen.port), self.sock)

    # -- the requests --------------------------------------------------------------------------
    def serve(self, connection: StatusConnection, request: HttpRequest) -> None:
        route = STATUS_ROUTES.get(request.path)
        if route is None:
            return connection.respond(404, json_body({"error": "no such path"}))
        method, handler = route
        if request.method != method:
            return connection.respond(405, json_body({"error": "use %s" % method}),
                                      extra="Allow: %s\r\n" % method)
        try:
            handler(self, connection, request)
        except HttpError as error:
            connection.respond(error.status, json_body({"error": str(error)}))

    def notice(self, connection: StatusConnection, text: str) -> None:
        """A control action's line: what, and who asked."""
        self.log.log("notice", "status listener: %s, asked by %s" % (text, connection.peer))

    def get_metrics(self, connection: StatusConnection, request: HttpRequest) -> None:
        books = self.process.books
        metrics = books.of(Metrics)
        self.process.status_flush()
        samples = dict(metrics.counters)
        samples.update(metrics.gauge_sums())
        defence = books.of(LoginDefence)
        for kind, table in (("address", defence.addresses), ("account", defence.accounts),
                            ("pair", defence.pairs)):
            samples[("mailproxy_login_penalty_entries", (kind,))] = len(table)
        for upstream, server, up in upstream_states(self.process.config, self.process.books,
                                                     self.loop.time()):
            samples[("mailproxy_upstream_up", (upstream, server))] = int(up)
            # Every pool server's series from the start, so that rate() and
            # sums see a 0 before the first session or failure (the labels
            # cut as the workers' are: Metrics.events).
            checked = self.process.config.upstreams[upstream].health_check is not None
            labels = (upstream[:METRIC_LABEL_MAX], server[:METRIC_LABEL_MAX])
            samples.setdefault(("mailproxy_upstream_sessions_active", labels), 0)
            for kind in UPSTREAM_FAILURE_KINDS:
                if kind != "health_check" or checked:
                    key = ("mailproxy_upstream_failures_total", labels + (kind,))
                    samples.setdefault(key, 0)
        samples.update(queued_samples(self.process.config, self.process.status_sockets()))
        samples[("mailproxy_workers", ())] = self.process.status_workers()
        samples.update(process_samples(self.process.status_pids(), self.process_start()))
        connection.respond(200, render_metrics(samples).encode("utf-8"),
                           "text/plain; version=0.0.4; charset=utf-8")

    def process_start(self) -> float:
        """The master's start: from /proc where it tells, else when this
        listener began."""
        try:
            with open("/proc/self/stat", "rb") as handle:
                ticks = int(handle.read().rsplit(b")", 1)[1].split()[19])
            with open("/proc/stat", "rb") as handle:
                boot = int(re.search(rb"^btime (\d+)", handle.read(), re.M).group(1))
            return boot + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, AttributeError):
            return self.started

    def get_healthz(self, connection: StatusConnection, request: HttpRequest) -> None:
        healthy, text = self.process.status_healthy()
        connection.respond(200 if healthy else 503, json_body({"status": text}))

    def get_readyz(self, connection: StatusConnection, request: HttpRequest) -> None:
        healthy, text = self.process.status_healthy()
        problems = [] if healthy else [text]
        config = self.process.config
        states = upstream_states(config, self.process.books, self.loop.time())

        def checked(failed: List[str]) -> None:
            """A pool is ready while one of its servers is up (no worker
            took it out) and answers a connect() now."""
            silent = {pool_server_silent(upstream, server) for upstream, server, _ in states}
            alive = {}
            for upstream, server, up in states:
                answers = up and pool_server_silent(upstream, server) not in failed
                alive[upstream] = alive.get(upstream, False) or answers
            found = [text for text in failed if text not in silent]
            found += ["no server of upstream %s is up" % name for name, ok in sorted(alive.items())
                      if not ok]
            connection.respond(*readiness(problems + found))
        ReachabilityCheck(self.loop, readiness_targets(config), checked)

    def get_sessions(self, connection: StatusConnection, request: HttpRequest) -> None:
        self.ask("sessions", None, lambda rows: connection.respond(
            200, json_body([dict(zip(SESSION_ROW, row)) for row in sorted(rows)])))

    def post_kick(self, connection: StatusConnection, request: HttpRequest) -> None:
        number, login = self.one_of(request, "id", "login")
        if number is not None:
            if not re.fullmatch(r"[0-9]{1,18}", number):
                raise HttpError(400, "id is a session number")
            number = int(number)
        what = "id=%d" % number if number is not None else "login=%s" % log_escape(
            login.encode("utf-8"))

        def kicked(rows: list) -> None:
            self.notice(connection, "kick %s: %d sessions closed" % (what, len(rows)))
            connection.respond(200, json_body({"kicked": sorted(row[0] for row in rows)}))
        self.ask("kick", [number, login, connection.peer], kicked)

    def post_penalty_clear(self, connection: StatusConnection, request: HttpRequest) -> None:
        address, login = self.one_of(request, "address", "login")
        if address is not None:
            try:
                address = penalty_address(str(ipaddress.ip_address(address)))
            except ValueError:
                raise HttpError(400, "address is an IP address")
        key = login_key(login.encode("utf-8")) if login is not None else None
        self.process.books.publish(LoginDefence.clear(address, key))
        what = "address=%s" % address if address is not None else "login=%s" % log_escape(
            login.encode("utf-8"))
        self.notice(connection, "penalty clear %s" % what)
        connection.respond(200, json_body({"cleared": address if address is not None else login}))

    def post_logs_reopen(self, connection: StatusConnection, request: HttpRequest) -> None:
        self.one_of(request)
        self.notice(connection, "reopening logs")
        self.process.status_reopen_logs()
        connection.respond(200, json_body({"reopened": True}))

    def post_drain(self, connection: StatusConnection, request: HttpRequest, drain: bool = True):
        query = request.query
        if set(query) != {"upstream", "server"}:
            raise HttpError(400, "takes upstream=NAME&server=ADDRESS:PORT")
        verb = "drain" if drain else "undrain"
        done = upstream_drain(self.process.config, self.process.books, query["upstream"],
                              query["server"], drain)
        if done is None:
            return connection.respond(404, json_body({"error": "no such upstream"}))
        self.notice(connection, "%s upstream %s server %s" % (
            verb, log_escape(query["upstream"].encode("utf-8")),
            log_escape(query["server"].encode("utf-8"))))
        connection.respond(200, json_body({verb: done}))

    def post_undrain(self, connection: StatusConnection, request: HttpRequest) -> None:
        self.post_drain(connection, request, drain=False)

    @staticmethod
    def one_of(request: HttpRequest, *names: str) -> list:
        """The query must name exactly one of ``names`` (none if no names):
        the values, None for the others; else HttpError(400)."""
        given = [name for name in request.query if name in names]
        if len(request.query) != len(given) or len(given) != (1 if names else 0):
            raise HttpError(400, "takes one of %s" % ", ".join(names) if names else
                            "takes no parameters")
        return [request.query.get(name) for name in names]


# Each path: the method it takes and its handler.
STATUS_ROUTES = {
    "/metrics": ("GET", StatusServer.get_metrics),
    "/healthz": ("GET", StatusServer.get_healthz),
    "/readyz": ("GET", StatusServer.get_readyz),
    "/sessions": ("GET", StatusServer.get_sessions),
    "/sessions/kick": ("POST", StatusServer.post_kick),
    "/penalty/clear": ("POST", StatusServer.post_penalty_clear),
    "/logs/reopen": ("POST", StatusServer.post_logs_reopen),
    "/upstream/drain": ("POST", StatusServer.post_drain),
    "/upstream/undrain": ("POST", StatusServer.post_undrain),
}


def readiness_targets(config: Config) -> List[Tuple[str, int, tuple]]:
    """What /readyz connects to: (the problem if it does not answer,
    family, sockaddr) of each auth_http server, and of each proxy_pass
    backend (a pool of one; its first address, the one tried first)."""
    targets = {}
    for server in config.servers:
        if server.auth_http is not None and server.auth != "backend":
            url = server.auth_http
            targets[url.text] = ("auth_http %s does not answer" % url.text,) + tuple(url.address)
        if isinstance(server.proxy_pass, Upstream) and server.proxy_pass.addresses:
            upstream = server.proxy_pass
            targets[upstream.text] = ("proxy_pass %s does not answer" % upstream.text,) + \
                tuple(upstream.addresses[0])
    for name, spec in sorted((config.upstreams or {}).items()):
        for each in spec.servers:
            if not each.down and each.address.addresses:
                targets[pool_server_silent(name, each.text)] = (
                    (pool_server_silent(name, each.text),) + tuple(each.address.addresses[0]))
    return list(targets.values())


def pool_server_silent(upstream: str, server: str) -> str:
    """/readyz's words for a pool server that does not answer: alone not a
    problem, as long as another server of its pool answers."""
    return "upstream %s server %s does not answer" % (upstream, server)


def readiness(problems: List[str]) -> Tuple[int, bytes]:
    """/readyz's status and body."""
    if problems:
        return 503, json_body({"status": "not ready", "problems": problems})
    return 200, json_body({"status": "ready"})


class ReachabilityCheck(StreamOwner):
    """connect() to each of ``targets`` ((text, family, sockaddr)) at once;
    ``done(the texts of those that did not connect within
    STATUS_CHECK_TIMEOUT)``, from the loop."""

    def __init__(self, loop: EventLoop, targets: list, done: Callable[[List[str]], None]):
        self.loop = loop
        self.done = done
        self.waiting = {}              # Stream -> its text
        self.failed = []
        for text, family, sockaddr in targets:
            try:
                self.waiting[connect_stream(loop, family, sockaddr, self)] = text
            except OSError:
                self.failed.append(text)
        self.timer = loop.call_later(0 if not self.waiting else STATUS_CHECK_TIMEOUT, self._finish)

    def stream_connected(self, stream: Stream) -> None:
        self._settle(stream, True)

    def crashed(self, error: Exception) -> None:
        """A bug (EventLoop.failed): every check left counts as failed."""
        self.timer.cancel()
        self._finish()

    def stream_error(self, stream: Stream, error: Exception) -> None:
        self._settle(stream, False)

    def _settle(self, stream: Stream, ok: bool) -> None:
        text = self.waiting.pop(stream, None)
        stream.close()
        if text is not None and not ok:
            self.failed.append(text)
        if not self.waiting:
            self.timer.cancel()
            self._finish()

    def _finish(self) -> None:
        for stream, text in list(self.waiting.items()):
            stream.close()
            self.failed.append(text)
        self.waiting = {}
        done, self.done = self.done, None
        if done is not None:
            done(sorted(self.failed))


def open_status_listener(main: Settings, bound: Optional[Tuple[Listen, socket.socket]],
                         warn: Callable[[str], None] = lambda message: None
                         ) -> Optional[Tuple[Listen, socket.socket]]:
    """The socket of ``status_listen`` (None without it): ``bound``'s if it
    is for the same address, else a new one.  Raises OSError, as
    bind_listen.  A unix socket's file is made 0600: only the master's
    user may connect."""
    listen = main.status_listen
    if listen is None:
        return None
    if bound is not None and (bound[0].host, bound[0].port) == (listen.host, listen.port):
        return bound
    try:
        sock = bind_listen(listen._replace(backlog=STATUS_CONNECTIONS_MAX))
    except OSError as error:
        if listen.port == 0 and error.errno == errno.EADDRINUSE:
            raise OSError(error.errno, error.strerror + unix_socket_hint(listen.host[5:]))
        raise
    if listen.port == 0:
        os.chmod(listen.host[5:], 0o600)
    return listen, sock


def replace_status_server(process, main: Settings) -> None:
    """Start, keep, move or stop ``process.status`` (a StatusServer) as
    ``main.status_listen`` says: at the start and at a reload.  Raises
    OSError (and changes nothing) if the new address cannot be bound."""
    current = process.status
    bound = (current.listen, current.sock) if current is not None else None
    opened = open_status_listener(main, bound)
    if opened is bound:
        return
    if current is not None:
        current.stop()
    process.status = StatusServer(process, opened[1], opened[0]) if opened is not None else None


# ========================================================================== #
# ####                            Processes                             #### #
# ========================================================================== #
# nginx's process model.  A master binds the listening sockets, forks
# worker_processes workers, replaces one that stops unasked, and handles the
# signals (README, "Processes and signals"): SIGHUP re-reads the
# configuration and starts new workers with it while the old ones finish
# their sessions; SIGQUIT stops gracefully; SIGTERM and SIGINT stop at once;
# SIGUSR1 reopens the log files.  Each worker is one Worker: an event loop,
# the listeners, the sessions.  With master_process off, one process is
# both.  Every signal taken is logged at notice, as nginx does.  Also
# here: the state the workers share (SharedBooks, with the master as the
# broker; the session counter), privileges, the pid file, the log files'
# owner, the processes' names.

def load_and_prepare(path: str) -> Config:
    """load_config, then what needs the TLS section: each server's SSL
    contexts, built now so that a bad certificate, key, password or CA file
    fails -t and start-up, not the first client."""
    config = load_config(path)
    errors = []
    for server in config.servers:
        try:
            if server.starttls != "off" or any(listen.ssl for listen in server.listen):
                server.tls_context = server_context(server)
                add_sni_certificates(server.tls_context, server)
            if server.proxy_ssl or server.proxy_starttls or server.auth_http is not None:
                # With auth_http, Auth-Backend-TLS may ask for TLS per session.
                server.backend_tls_context = backend_context(server)
        except ConfigValueError as error:
            problem = tls_problem(config, server, error)
            if str(problem) not in map(str, errors):     # once, not once per server
                errors.append(problem)
    errors.extend(prepare_pool_settings(config))
    if errors:
        raise ConfigErrors(errors)
    unreachable = [warning for warning in map(lambda server: tls_unreachable(config, server),
                                              config.servers) if warning is not None]
    if unreachable:
        config = config._replace(warnings=tuple(config.warnings) + tuple(
            warning for number, warning in enumerate(unreachable)
            if str(warning) not in map(str, unreachable[:number])))
    return config


def prepare_pool_settings(config: Config) -> List[ConfigError]:
    """The backend TLS context of each server's settings for a pool: the
    server's own, or a new one if the pool sets proxy_ssl* (or turns TLS
    to the backend on where the server has none)."""
    errors = []
    for (name, pool), merged in (config.pool_settings or {}).items():
        server = next(server for server in config.servers if server.name == name)
        merged.backend_tls_context = server.backend_tls_context
        own = any(key.startswith("proxy_ssl") for key, _ in config.upstreams[pool].overrides)
        if (merged.proxy_ssl or merged.proxy_starttls or merged.auth_http is not None) and \
                (own or merged.backend_tls_context is None):
            try:
                merged.backend_tls_context = backend_context(merged)
            except ConfigValueError as error:
                section = "upstream " + pool
                problem = ConfigError(config.path, section, error.directive, str(error),
                                      (config.lines or {}).get((section, error.directive or "")))
                if str(problem) not in map(str, errors):
                    errors.append(problem)
    return errors


# What OpenSSL says, on the server's side, when nothing in ssl_protocols and
# ssl_ciphers can be used at its security level (OpenSSL 3 takes TLS 1.0
# and 1.1 at level 0 only).
NO_HANDSHAKE_REASONS = ("NO_CIPHERS_AVAILABLE", "NO_PROTOCOLS_AVAILABLE", "UNSUPPORTED_PROTOCOL",
                        "VERSION_TOO_LOW", "NO_SHARED_CIPHER", "NO_SUITABLE_SIGNATURE_ALGORITHM",
                        "NO_SHARED_SIGNATURE_ALGORITHMS")


def tls_unreachable(config: Config, server: Settings) -> Optional[ConfigError]:
    """A [warn] at ssl_protocols when not even the most permissive client
    (every cipher, security level 0, the same versions) completes a
    handshake with the server's context, in memory: "ssl_protocols TLSv1
    SSLv3;" (the nginx wiki, Mastering NGINX) on OpenSSL 3.  nginx starts
    with it too, and fails every handshake; -t should say so."""
    context = getattr(server, "tls_context", None)
    if context is None:
        return None
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    try:
        client.set_ciphers("ALL:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            client.minimum_version = context.minimum_version
            client.maximum_version = context.maximum_version
    except (ssl.SSLError, ValueError):
        return None
    reason = tls_handshake_failure(context, client)
    if reason not in NO_HANDSHAKE_REASONS:
        return None
    lines = config.lines or {}
    section = "server " + server.name if ("server " + server.name, "ssl_protocols") in lines \
        else "mail"
    return ConfigError(config.path, section, "ssl_protocols", (
        "no TLS handshake can succeed (OpenSSL: %s): %s at its security level has no protocol, "
        "cipher or signature algorithm left for %s with these ssl_ciphers; OpenSSL 3 takes TLSv1 "
        "and TLSv1.1 only at security level 0, so nginx on it fails the same way; add TLSv1.2")
        % (reason, ssl.OPENSSL_VERSION, " ".join(server.ssl_protocols)),
        lines.get((section, "ssl_protocols")))


def tls_handshake_failure(server_context: ssl.SSLContext,
                          client_context: ssl.SSLContext) -> Optional[str]:
    """The server side's SSL error reason of an in-memory handshake, None
    if it completes (or fails on the client's side only)."""
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    server = server_context.wrap_bio(pipes[0], pipes[1], server_side=True)
    client = client_context.wrap_bio(pipes[2], pipes[3])
    for _ in range(6):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as error:
                return error.reason if side is server else None
        pipes[0].write(pipes[3].read())
        pipes[2].write(pipes[1].read())
    return None


def tls_problem(config: Config, server: Settings, error: ConfigValueError) -> ConfigError:
    """A TLS file's problem at the directive that names the file: in the
    server's section if it sets it, else in [mail], whose line all the
    servers share (so that it is reported once for all of them)."""
    section = "server " + server.name
    lines = config.lines or {}
    if error.directive is not None and (section, error.directive) not in lines and \
            ("mail", error.directive) in lines:
        section = "mail"
    return ConfigError(config.path, section, error.directive, str(error),
                       lines.get((section, error.directive or "")))


def warn_about(config: Config, log: ErrorLog) -> None:
    for warning in config.warnings:
        log.log("warn", str(warning))
    for server in config.servers:
        if (server.proxy_ssl or server.proxy_starttls) and not server.proxy_ssl_verify:
            log.log("warn", "proxy_ssl_verify is off in [server %s]: the backend's certificate "
                    "is not checked, and passwords go to whoever answers" % server.name)


def log_signal(log: ErrorLog, signum: int, action: Optional[str] = None) -> None:
    """nginx's line for each signal a process takes (ngx_signal_handler),
    at notice: "signal 1 (SIGHUP) received, reconfiguring"; ``action`` is
    what it makes the process do, None for none (SIGCHLD).  nginx says
    "received from PID" when the kernel tells it the sender (siginfo);
    Python's signal module does not, so the sender is never named.
    ``signum`` 0 is a call that no signal made (the loop's own, a
    control request, a test): no line."""
    if signum:
        log.log("notice", "signal %d (%s) received%s"
                % (signum, signal.Signals(signum).name, ", " + action if action else ""))


def log_late_signal(log: ErrorLog, signum: int) -> None:
    """A signal that comes once the process is shutting down and is not
    acted on (nginx's master skips a reload while it quits)."""
    name = signal.Signals(signum).name if signum else "none"
    log.log("notice", "signal %d (%s) received while shutting down, ignoring" % (signum, name))


def load_for_reload(path: str, log: "ErrorLog") -> Optional[Tuple[Config, "ErrorLogs"]]:
    """SIGHUP's first half, for the master and a single process alike: the
    file read, checked and its logs opened; on any problem, log it and
    return None (the old configuration stays)."""
    log.log("notice", "reconfiguring")
    try:
        config = load_and_prepare(path)
        return config, ErrorLogs(config)
    except ConfigErrors as errors:
        for error in errors.errors:
            log.log("emerg", str(error))
    except OSError as error:
        log.log("emerg", log_open_failure(error))
    log.log("alert", "reload failed, the old configuration is kept")
    return None


def log_open_failure(error: OSError) -> str:
    """A log that cannot be opened, in nginx's words: ``open() "PATH"
    failed (13: Permission denied)``, and who could not open it."""
    if error.filename is None:                 # a syslog socket
        return "cannot open a log: %s" % error
    hint = permission_hint(error.filename) if error.errno == errno.EACCES else ""
    return 'open() "%s" failed (%d: %s)%s' % (error.filename, error.errno, error.strerror, hint)


class ErrorLogs:
    """The [main] error log and the servers' own (``error_log`` in [mail] or
    [server NAME], as nginx), sharing one open file per destination.
    Raises OSError if a file cannot be opened (and leaves nothing open)."""

    def __init__(self, config: Config):
        self.handles = {}              # destination -> binary file or SyslogTarget
        try:
            self.main = self._open(config.main.error_log)
            self.servers = {server.name: self._open(server.error_log)
                            for server in config.servers if server.error_log}
            self.access = {}           # server name -> ErrorLog for the session lines
            for server in config.servers:
                destination = server.access_log or config.main.access_log
                if destination and destination != "off":
                    self.access[server.name] = self._open([ErrorLogSpec(destination, "info")])
                elif destination == "off":
                    self.access[server.name] = ErrorLog([])
        except OSError:
            self.close()
            raise

    def _open(self, specs: List[ErrorLogSpec]) -> ErrorLog:
        destinations = []
        for spec in specs:
            if spec.destination not in self.handles:
                self.handles[spec.destination] = self._target(spec.destination)
            destinations.append((self.handles[spec.destination], spec.level))
        return ErrorLog(destinations)

    @staticmethod
    def _target(destination: str):
        if destination == "stderr":
            return os.fdopen(os.dup(2), "wb", buffering=0)
        if destination.startswith("syslog:"):
            spec = parse_syslog(destination)
            sock = socket.socket(spec.family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            return SyslogTarget(sock, spec.address, spec.facility, spec.tag, spec.hostname)
        return open(destination, "ab", buffering=0)

    def for_server(self, server: Settings) -> ErrorLog:
        return self.servers.get(server.name, self.main)

    def files(self) -> List[Tuple[str, object]]:
        """(path, open file) of each destination that is a file name: not
        stderr, not syslog."""
        return [(destination, handle) for destination, handle in self.handles.items()
                if destination != "stderr" and not destination.startswith("syslog:")]

    def access_for(self, server: Settings) -> ErrorLog:
        """Where the session's closing line goes: access_log, or the error log."""
        return self.access.get(server.name) or self.for_server(server)

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles = {}


OWNER_READ_WRITE = stat.S_IRUSR | stat.S_IWUSR    # what ngx_reopen_files adds to a log's mode


def give_logs_to_user(logs: ErrorLogs, main: Settings, log: ErrorLog) -> None:
    """With ``user``, run as root: make each log file the worker user's,
    readable and writable by its owner, so that the workers, which run as
    that user, can open it again by name on SIGUSR1 (nginx:
    ngx_reopen_files chowns to the worker user before signalling the
    workers).  Done whenever root opens the files (start, reload, reopen),
    so master_process off can reopen the ones it created before the drop.
    Only regular files: never a device such as /dev/null or a terminal.  A
    failure is logged; the file stays as it was."""
    if main.user is None or not hasattr(os, "fchown") or os.geteuid() != 0:
        return
    uid = main.user[0]
    for path, handle in logs.files():
        try:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                continue
            if info.st_uid != uid:
                os.fchown(handle.fileno(), uid, -1)
            if info.st_mode & OWNER_READ_WRITE != OWNER_READ_WRITE:
                os.fchmod(handle.fileno(), stat.S_IMODE(info.st_mode) | OWNER_READ_WRITE)
        except OSError as error:
            log.log("alert", 'chown("%s", %d) failed (%d: %s)'
                    % (path, uid, error.errno, error.strerror))


def raise_open_file_limit(main: Settings, log: ErrorLog) -> None:
    """Let worker_connections sessions fit, as nginx's worker_rlimit_nofile
    would: raise the soft limit, up to the hard one.  A session holds two
    descriptors, and up to four more while it splices (two pipes, held
    while bytes are in them); without them it relays through the scratch
    buffer (SpliceFlow)."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_session = 6 if RELAY_SPLICE else 2
    wanted = main.worker_rlimit_nofile or per_session * main.worker_connections + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        except (ValueError, OSError) as error:
            log.log("warn", "setrlimit(RLIMIT_NOFILE, %d) failed (%s)" % (new_soft, error))
            return
        if new_soft < wanted:
            log.log("warn", "%d worker_connections need %d open files, the hard limit is %d"
                    % (main.worker_connections, wanted, hard))


# -- state shared across workers ------------------------------------------------------
# Some state must be one for all the workers, whichever serves a client:
# the failed-login counts (one attacker, one budget), the sessions per user,
# the metrics.  Each such state is a *book*: an object whose state changes
# only in apply(event), so that it is a function of the events applied to
# it.  Every process holds a copy of every book.  SharedBooks.publish
# applies an event here at once, then sends it to the other processes,
# which apply it too.  The master is the broker (BookBroker): a worker sends
# what it publishes to the master, which applies it to its own copy and
# passes it on to every other worker.  A worker forked later (a replacement,
# a reload's new generation) starts with a copy of the master's books, made
# by fork(): nothing is lost.
#
# An event is a tuple: its kind (a str) first, then JSON values (str, int,
# float, bool, None, lists).  It travels as one JSON array in one datagram
# of an AF_UNIX socketpair (a datagram per event: no framing to write), at
# most SHARED_EVENT_MAX bytes, and arrives as a tuple (a tuple inside it
# comes back as a list, so publish applies that decoded form here as well).
# One process's events arrive everywhere in the order it published them;
# two processes' events may interleave differently in different copies, so
# apply() should not depend on that order (add up, keep the latest time).
# A time in an event is time.monotonic(), the loop's clock: one clock for
# every process of the machine (CLOCK_MONOTONIC, since boot, on Linux).
# Nothing blocks: a socket that is full gets the events queued, at most
# SHARED_QUEUE_MAX (the oldest dropped, logged): a stuck worker's copy falls
# behind, nobody waits for it.

def encode_event(event: tuple) -> bytes:
    """The datagram of ``event``.  Raises ValueError if it does not start
    with a kind, holds something JSON cannot say, or takes more than
    SHARED_EVENT_MAX bytes."""
    if not event or not isinstance(event[0], str):
        raise ValueError("an event starts with its kind, a str: %r" % (event,))
    try:
        text = json.dumps(list(event), separators=(",", ":"), allow_nan=False)
    except TypeError as error:         # bytes, a set...; ValueError passes as it is
        raise ValueError("event %r: %s" % (event[0], error))
    if len(text) > SHARED_EVENT_MAX:
        raise ValueError("event %r takes %d bytes, more than %d"
                         % (event[0], len(text), SHARED_EVENT_MAX))
    return text.encode("ascii")        # json.dumps escapes everything else


def decode_event(data: bytes) -> tuple:
    """The event in a datagram; raises ValueError if it is not one."""
    if len(data) > SHARED_EVENT_MAX:
        raise ValueError("%d bytes, more than %d" % (len(data), SHARED_EVENT_MAX))
    try:
        value = json.loads(data.decode("ascii"))
    except RecursionError:
        raise ValueError("nested too deep")
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise ValueError("not a JSON array that starts with a kind")
    return tuple(value)


class SharedBooks:
    """The books of one process, found by the kinds of event they apply.

    A book is any object with
      ``kinds``: the event kinds (str) it applies;
      ``apply(event)``: the only code that changes its state; the same
          events must make the same state, in whatever order different
          processes' events come (each process's own come in order);
      ``publish``: set by add(); the book calls ``self.publish(event)`` to
          change its state in every process (here before it returns);
      ``kept_by_master`` (optional): kinds the master applies but does not
          pass on to the other workers (what only the master reads).
    ``outlet(data)`` sends an encoded event to the other processes (a
    BookBroker's); None without them (master_process off).
    """

    def __init__(self):
        self.books = []
        self.by_kind = {}              # kind -> the books that apply it
        self.kept = set()              # kinds the broker does not pass on (kept_by_master)
        self.outlet = None             # type: Optional[Callable[[bytes], None]]

    def add(self, book):
        """Register ``book``; returns it."""
        self.books.append(book)
        for kind in book.kinds:
            self.by_kind.setdefault(kind, []).append(book)
        self.kept.update(getattr(book, "kept_by_master", ()))
        book.publish = self.publish
        return book

    def of(self, book_class: type):
        """The book of that class (KeyError if none was added)."""
        for book in self.books:
            if isinstance(book, book_class):
                return book
        raise KeyError(book_class.__name__)

    def publish(self, event: tuple) -> None:
        """Apply ``event`` here, then send it to the other processes.
        Raises ValueError (see encode_event), and then nothing is applied
        anywhere."""
        data = encode_event(event)
        self.apply(decode_event(data))
        if self.outlet is not None:
            self.outlet(data)

    def apply(self, event: tuple) -> None:
        """Give ``event`` to each book of its kind; a kind that no book
        applies is ignored (a "worker gone" when no book counts per worker)."""
        for book in self.by_kind.get(event[0], ()):
            book.apply(event)


def make_shared_books() -> SharedBooks:
    """Every book the processes share.  A new one goes here, and whoever
    uses it finds it with books.of(ItsClass)."""
    books = SharedBooks()
    books.add(LoginDefence(os.urandom(32)))       # one key for every worker's digests
    books.add(SessionCounts())
    books.add(UpstreamDrains())                   # the control interface's drain and undrain
    books.add(UpstreamHealth())                   # the pool servers a worker has taken out
    books.add(Metrics())
    books.add(StatusQueries())
    return books


class BookChannel(LoopHandler):
    """One end of a socketpair between this process and process ``peer``,
    carrying encoded events both ways; non-blocking, watched by ``loop``.
    A datagram read goes to ``owner.received(channel, data, event)``;
    ``owner.log`` is the log of the moment.  What the socket cannot take
    now waits in ``queue`` (the order kept), at most SHARED_QUEUE_MAX, the
    oldest dropped."""

    def __init__(self, loop: EventLoop, sock: socket.socket, owner, peer: int):
        self.loop = loop
        self.sock = sock
        self.owner = owner
        self.peer = peer               # its pid, for the log
        self.queue = collections.deque()
        self.warned = set()            # what was logged already: once each
        sock.setblocking(False)
        self.interest = loop.set_interest(sock, selectors.EVENT_READ, self, 0)

    def send(self, data: bytes) -> None:
        """Send ``data`` now if nothing waits before it, else queue it."""
        if not self.queue and self._send_now(data):
            return
        if len(self.queue) >= SHARED_QUEUE_MAX:
            self.queue.popleft()
            self._warn_once("full", "process %d reads no shared events, dropping the oldest "
                            "of %d" % (self.peer, SHARED_QUEUE_MAX))
        self.queue.append(data)
        both = selectors.EVENT_READ | selectors.EVENT_WRITE
        self.interest = self.loop.set_interest(self.sock, both, self, self.interest)

    def _send_now(self, data: bytes) -> bool:
        """False if the socket is full; True if the datagram went, or
        cannot go (the peer's end is closed: it died, the master reaps it)."""
        try:
            self.sock.send(data)
        except BlockingIOError:
            return False
        except OSError:
            pass
        return True

    def on_writable(self) -> None:
        while self.queue and self._send_now(self.queue[0]):
            self.queue.popleft()
        if not self.queue:
            self.interest = self.loop.set_interest(self.sock, selectors.EVENT_READ, self,
                                                   self.interest)

    def on_readable(self) -> None:
        self._read(SHARED_READS_PER_EVENT)

    def _read(self, limit: int) -> None:
        """Read up to ``limit`` datagrams; a malformed one is skipped."""
        for _ in range(limit):
            try:
                data = self.sock.recv(SHARED_EVENT_MAX + 1)
            except OSError:            # none left (or the peer died: the error is read once)
                return
            try:
                event = decode_event(data)
            except ValueError as error:
                self._warn_once("malformed", "a malformed shared event from process %d is "
                                "ignored: %s" % (self.peer, error))
                continue
            try:
                self.owner.received(self, data, event)
            except Exception as error:         # a book's bug: it must not end the process
                self.crashed(error)

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self.warned:
            self.warned.add(what)
            self.owner.log.log("warn", message)

    def crashed(self, error: Exception) -> None:
        self.owner.log.log("alert", "applying a shared event from process %d failed: %r"
                           % (self.peer, error))

    def close(self) -> None:
        """Apply what the peer sent before it went, then close."""
        self._read(SHARED_QUEUE_MAX)
        self.interest = self.loop.set_interest(self.sock, 0, self, self.interest)
        self.sock.close()


class BookBroker:
    """Joins the processes' SharedBooks.  In the master: one BookChannel
    per worker; an event from a worker is applied to the master's books and
    passed on to every other worker, and what the master publishes goes to
    all.  In a worker (after join): one channel, to the master, and the same
    code has nobody to pass events on to.  ``process`` (the Master, then the
    Worker) has the loop to watch the channels with and the log of the
    moment (a reload replaces it)."""

    def __init__(self, books: SharedBooks, process):
        self.books = books
        self.process = process
        self.channels = {}             # the peer's pid -> BookChannel
        self.pair = None               # the next worker's socketpair, around fork()
        books.outlet = self.send_to_all

    @property
    def log(self) -> ErrorLog:
        return self.process.log

    def attach(self, peer: int, sock: socket.socket) -> BookChannel:
        self.channels[peer] = BookChannel(self.process.loop, sock, self, peer)
        return self.channels[peer]

    def send_to_all(self, data: bytes, source: Optional[BookChannel] = None) -> None:
        for channel in list(self.channels.values()):
            if channel is not source:
                channel.send(data)

    def received(self, channel: BookChannel, data: bytes, event: tuple) -> None:
        """Another process published ``event``: apply it here, and pass it
        on to the processes it did not come from (the master's work),
        unless only the master reads it (SharedBooks.kept)."""
        self.books.apply(event)
        if event[0] not in self.books.kept:
            self.send_to_all(data, channel)

    # -- the master's part in fork() and reaping --------------------------------------
    def prepare(self) -> None:
        """Before fork(): the new worker's socketpair."""
        if self.pair is not None:                  # a fork() that failed
            for sock in self.pair:
                sock.close()
        self.pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def forked(self, pid: int) -> None:
        """In the master, after fork(): its end is the channel to ``pid``."""
        master_end, worker_end = self.pair
        self.pair = None
        worker_end.close()
        self.attach(pid, master_end)

    def join(self, worker) -> None:
        """In the new worker, after fork(): the other workers' channels are
        the master's business (their sockets are closed here; the master's
        loop is closed already), and the worker's end of the pair becomes
        its channel to the master, watched by the worker's loop."""
        for channel in self.channels.values():
            channel.sock.close()
        self.channels = {}
        master_end, worker_end = self.pair
        self.pair = None
        master_end.close()
        self.process = worker
        self.attach(os.getppid(), worker_end)

    def gone(self, pid: int) -> None:
        """The master reaped worker ``pid``: what it sent is applied, its
        channel closed, and every process's books hear ("worker gone",
        pid), to forget what they counted for it."""
        channel = self.channels.pop(pid, None)
        if channel is not None:
            channel.close()
        self.books.publish(("worker gone", pid))


# -- session numbers -------------------------------------------------------------------
# nginx's *N is one counter for all the workers (ngx_connection_counter, an
# atomic in shared memory), so a number names one session in the whole log.
# Here the counter is 8 bytes of a file that the master opens before the
# first fork() and that every worker inherits, across reloads too: a worker
# locks it (fcntl record lock, which dies with its holder, so a killed
# worker leaves no lock behind), reads, adds one, writes, unlocks.  The
# lock is held for a pread and a pwrite, never across anything that waits.
# The file is anonymous (memfd on Linux, else an unlinked temporary file):
# nothing to clean up, nothing another user can open.  With one process
# (master_process off) the counter is a plain int.

SESSION_COUNTER = struct.Struct("=Q")


class SessionNumbers:
    """The *N of new sessions.  ``shared()`` makes the master's counter for
    its workers; ``SessionNumbers()`` counts in this process only."""

    def __init__(self, fd: Optional[int] = None):
        self.fd = fd                   # the shared counter's file; None: count here
        self.last = 0                  # the last number this process took

    @classmethod
    def shared(cls) -> "SessionNumbers":
        """A counter for processes forked after this.  Raises OSError if
        no file can be had for it."""
        if fcntl is None:
            raise OSError(errno.ENOSYS, "no fcntl module: record locks are not available")
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("mailproxy-sessions", os.MFD_CLOEXEC)
        else:
            handle = tempfile.TemporaryFile()
            fd = os.dup(handle.fileno())
            handle.close()
        os.pwrite(fd, SESSION_COUNTER.pack(0), 0)
        return cls(fd)

    def next(self) -> int:
        """The next number: one more than any number taken before, in any
        process sharing the counter.  If the file fails (it cannot, short
        of a bug), this process goes on from its own last number."""
        if self.fd is not None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX)
                try:
                    data = os.pread(self.fd, SESSION_COUNTER.size, 0)
                    number = SESSION_COUNTER.unpack(data)[0] + 1
                    os.pwrite(self.fd, SESSION_COUNTER.pack(number), 0)
                finally:
                    fcntl.lockf(self.fd, fcntl.LOCK_UN)
                self.last = number
                return number
            except (OSError, struct.error):
                self.fd = None
        self.last += 1
        return self.last


class Worker(LoopHandler):
    """Everything one process serves with; sessions ask it for shared state.
    ``books``: the master's SharedBooks, copied by fork() (None: its own);
    ``numbers``: the master's session counter (None: its own)."""

    def __init__(self, config: Config, logs: ErrorLogs, books: Optional[SharedBooks] = None,
                 numbers: Optional[SessionNumbers] = None):
        self.config = config
        self.logs = logs
        self.log = logs.main
        self.loop = EventLoop()
        self.books = books if books is not None else make_shared_books()
        defence = self.books.of(LoginDefence)
        workers = config.main.worker_processes if config.main.master_process else 1
        defence.share = max(1, AUTH_PENALTY_SLOTS // workers)
        self.gate = LoginGate(self.loop, defence)
        self.password_checks = PasswordCheckPool(self.loop)    # its threads start when needed
        self.pools = Pools(config.upstreams, self.books.of(UpstreamDrains),   # [upstream NAME]
                           self.books.of(UpstreamHealth), self.books.of(Metrics))
        self.health = HealthChecks(self.loop, self.pools, lambda level, message:
                                   self.log.log(level, message), lambda: not self.stopping,
                                   self.pool_dialogue)
        self.health.start()            # its first round when the loop runs
        self.capabilities = CapabilityProbes(self.loop, lambda level, message:
                                             self.log.log(level, message),
                                             lambda: not self.stopping)
        self.capabilities.start(config)     # capabilities_from = backend
        self.randomness = random.SystemRandom()
        self.listeners = {}            # (host, port) -> Listener
        self.resolvers = {}            # (ResolverSpec, timeout) -> Resolver
        self.sessions = set()
        self.numbers = numbers if numbers is not None else SessionNumbers()
        self.stopping = False
        self.report_fd = None          # a pipe to the master, in a worker process
        self.unix_paths = set()        # the unix sockets' files it made (no master): removed at exit
        self.metrics = self.books.of(Metrics)
        self.metrics.on_pending = self._metrics_changed
        self.metrics_timer = None      # type: Optional[Timer]  (the next flush_metrics)
        queries = self.books.of(StatusQueries)
        queries.answerer = self.status_answer
        queries.waiting = {}           # the master's questions (fork() copied them) are not ours
        self.status = None             # type: Optional[StatusServer]  (master_process off)

    def resolver_for(self, server: Settings) -> Resolver:
        """One Resolver (and cache) per distinct resolver setting."""
        key = (server.resolver, server.resolver_timeout)
        if key not in self.resolvers:
            self.resolvers[key] = Resolver(self.loop, server.resolver, server.resolver_timeout)
        return self.resolvers[key]

    def next_session_number(self) -> int:
        """nginx's *N: unique across the workers and reloads of one master."""
        return self.numbers.next()

    # -- listeners ----------------------------------------------------------------
    def open_listeners(self, config: Config, sockets: Optional[Dict] = None) -> None:
        """Listen for every ``listen`` of ``config``: on ``sockets`` (bound by
        the master) or on sockets bound now, keeping the ones already open (a
        reload: with the new flags, see Listener.reconfigure) and closing the
        ones it no longer has.  Raises OSError (and changes nothing) if one
        cannot be bound."""
        current = {key: listener.sock for key, listener in self.listeners.items()}
        if sockets is None:            # no master: this process owns the sockets and their files
            sockets = bind_all(config, current, lambda message: self.log.log("warn", message))
            self.unix_paths.update(key for key in sockets if key[1] == 0)
        wanted = {}
        for server in config.servers:
            for listen in server.listen:
                if (listen.host, listen.port) in sockets:      # else skipped: no IPv6 here
                    wanted[(listen.host, listen.port)] = (listen, server)
        for key, listener in list(self.listeners.items()):
            if key not in wanted:
                listener.close()
                del self.listeners[key]
                if key in self.unix_paths:
                    self.log.log("warn", "deleting socket %s" % key[0][5:])
                    self.remove_unix_sockets([key])
        for key, (listen, server) in wanted.items():
            if key in self.listeners:
                self.listeners[key].reconfigure(listen, server)
            else:
                self.listeners[key] = Listener(self.loop, sockets[key], listen, server,
                                               self.accept, self.log)

    def remove_unix_sockets(self, keys) -> None:
        """The files of unix sockets this process made (no master), at exit
        or when a reload drops them."""
        for key in list(keys):
            self.unix_paths.discard(key)
            remove_socket_file(key)

    def accept(self, listener: Listener, sock: socket.socket, address) -> None:
        if self.stopping:
            sock.close()
            return
        try:
            self.sessions.add(Session(self, listener, sock, address))
        except Exception as error:
            # Out of descriptors, say (OSError); anything else is a bug, and
            # it must not end the worker either.
            sock.close()
            level = "error" if isinstance(error, OSError) else "alert"
            self.log.log(level, "cannot start a session: %r" % error)
        self._limit_accepting()

    def _limit_accepting(self) -> None:
        """worker_connections: past it, stop accepting; the kernel's backlog
        holds the next clients until a session ends."""
        full = len(self.sessions) >= self.config.main.worker_connections
        for listener in self.listeners.values():
            if full and listener.interest:
                listener.pause()
            elif not full and not listener.interest and not listener.paused and not self.stopping:
                listener.resume()

    # -- metrics and the status listener's questions ---------------------------------
    def _metrics_changed(self) -> None:
        if self.metrics_timer is None:
            self.metrics_timer = self.loop.call_later(METRICS_FLUSH, self.flush_metrics)

    def flush_metrics(self) -> None:
        """Publish what the sessions counted since the last flush."""
        if self.metrics_timer is not None:
            self.metrics_timer.cancel()
            self.metrics_timer = None
        for event in self.metrics.events(os.getpid()):
            self.books.publish(event)

    def status_answer(self, what: str, argument) -> list:
        """The master's question (StatusQueries): the rows of the running
        sessions, or of those ``kick`` [number, login, peer] closed."""
        now = time.time()
        sessions = [session for session in self.sessions if not session.closed]
        if what == "sessions":
            return [session_row(session, now) for session in sessions]
        if what == "kick":
            number, login, peer = argument
            rows = []
            for session in sessions_matching(sessions, number, login):
                rows.append(session_row(session, now))
                session.log("notice", "session kicked by the status listener, asked by %s" % peer)
                session.close("kicked by the status listener")
            return rows
        return []

    # What the StatusServer asks its process, with master_process off.
    def status_ask(self, what: str, argument, done: Callable[[list], None]) -> Optional[int]:
        done(self.status_answer(what, argument))
        return None

    def status_expire(self, query: int) -> None:
        """Never asked: status_ask answers at once."""

    def status_pids(self) -> List[int]:
        return [os.getpid()]

    def status_workers(self) -> int:
        return 1

    def status_sockets(self) -> Dict:
        """The listening sockets, (host, port) -> socket."""
        return {key: listener.sock for key, listener in self.listeners.items()}

    def status_flush(self) -> None:
        self.flush_metrics()

    def status_healthy(self) -> Tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        return True, "ok"

    def status_reopen_logs(self) -> None:
        self.reopen_logs()

    def session_closed(self, session: Session) -> None:
        if session.counted:                # max_user_sessions: one less, in every worker
            self.books.publish(SessionCounts.closed(os.getpid(), session.journal.number))
        self.sessions.discard(session)
        self._limit_accepting()
        if self.stopping and not self.sessions:
            self.loop.stop()

    # -- signals ------------------------------------------------------------------
    def install_signals(self, reload: bool = True) -> None:
        """``reload`` False in a worker process: a reload is the master's,
        and nginx's workers ignore SIGHUP.  Reloading by itself on a SIGHUP
        sent to the whole process group, a worker would bind the new ports
        the master is binding."""
        self.loop.add_signal_handler(signal.SIGTERM, self.stop_now)
        self.loop.add_signal_handler(signal.SIGINT, self.stop_now)
        self.loop.add_signal_handler(signal.SIGQUIT, self.stop_gracefully)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload if reload else self.ignore_reload)
        self.loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)

    def ignore_reload(self, signum: int = 0) -> None:
        self.log.log("notice", "signal %d (SIGHUP) received, ignoring: the master reloads" % signum)

    def stop_now(self, signum: int = 0) -> None:
        log_signal(self.log, signum, "exiting")
        self.log.log("notice", "exiting")
        for session in list(self.sessions):
            session.close("proxy exiting")
        self.loop.stop()

    def stop_gracefully(self, signum: int = 0) -> None:
        """Stop accepting; exit when the last session has ended, or when
        worker_shutdown_timeout ends the ones left (nginx)."""
        if self.stopping:
            if signum:
                log_late_signal(self.log, signum)
            return
        log_signal(self.log, signum, "shutting down")
        self.log.log("notice", "gracefully shutting down")
        self.stopping = True
        for listener in self.listeners.values():
            listener.close()
        self.listeners = {}
        if self.report_fd is not None:
            # Tell the master: from now on, this worker accepts nobody.
            try:
                os.write(self.report_fd, b"%d\n" % os.getpid())
            except OSError:
                pass                   # the master is gone
            os.close(self.report_fd)
            self.report_fd = None
        if not self.sessions:
            self.loop.stop()
        elif self.config.main.worker_shutdown_timeout is not None:
            self.loop.call_later(self.config.main.worker_shutdown_timeout, self._shutdown_timeout)

    def pool_dialogue(self, pool: str) -> Optional[Settings]:
        """The backend dialogue the active check of ``pool`` follows: that
        of a server that passes to it (the first, else any server), with
        what the pool says of it (backend_settings)."""
        servers = self.config.servers
        server = next((each for each in servers if each.proxy_pass is not None and
                       each.proxy_pass.pool == pool), servers[0] if servers else None)
        return None if server is None else backend_settings(self.config, server, pool_upstream(pool))

    def _shutdown_timeout(self) -> None:
        self.log.log("notice", "worker_shutdown_timeout: closing %d sessions" % len(self.sessions))
        for session in list(self.sessions):
            session.close("worker_shutdown_timeout")
        self.loop.stop()

    def reload(self, signum: int = 0) -> None:
        """SIGHUP: read the file again; if it is valid, new sessions get the new
        settings, users and listeners; sessions already running keep theirs.
        If it is not, log why and keep everything as it was.  Once stopping,
        nothing: binding the ports again would undo the stop."""
        if self.stopping:
            log_late_signal(self.log, signum)
            return
        log_signal(self.log, signum, "reconfiguring")
        loaded = load_for_reload(self.config.path, self.log)
        if loaded is None:
            return
        config, logs = loaded
        try:
            self.open_listeners(config)
        except OSError as error:
            logs.close()
            self.log.log("emerg", str(error.strerror))
            self.log.log("alert", "reload failed, the old configuration is kept")
            return
        try:
            replace_status_server(self, config.main)
        except OSError as error:
            self.log.log("alert", "status listener: %s, the old one is kept" % error.strerror)
        self.config = config
        self.pools.reconfigure(config.upstreams)
        self.health.start()
        self.capabilities.start(config)
        self._use_logs(logs)
        raise_open_file_limit(config.main, self.log)
        warn_about(config, self.log)
        self.log.log("notice", "configuration reloaded")

    def reopen_logs(self, signum: int = 0) -> None:
        """SIGUSR1 (logrotate): the same files, opened again by name."""
        log_signal(self.log, signum, "reopening logs")
        self.log.log("notice", "reopening logs")           # nginx says so, in every process
        try:
            logs = ErrorLogs(self.config)
        except OSError as error:
            self.log.log("alert", "reopening logs failed: %s" % error)
            return
        self._use_logs(logs)

    def _use_logs(self, logs: ErrorLogs) -> None:
        old, self.logs, self.log = self.logs, logs, logs.main
        for listener in self.listeners.values():
            listener.log = logs.main
        old.close()

    def watch_master(self, fd: int) -> None:
        """A worker stops gracefully when its master is gone, even killed
        with SIGKILL: the master holds the write end of this pipe, and its
        death closes it (end-of-file here)."""
        self._master_pipe = os.fdopen(fd, "rb", buffering=0)
        os.set_blocking(fd, False)
        self.loop.set_interest(self._master_pipe, selectors.EVENT_READ, self, 0)

    def on_readable(self) -> None:
        """The master's pipe: nothing is ever written, so this is its end."""
        self.loop.set_interest(self._master_pipe, 0, self, selectors.EVENT_READ)
        self.log.log("alert", "the master process is gone")
        self.stop_gracefully()

    def run(self) -> None:
        self.loop.run()
        self.flush_metrics()           # the last counts, to the master
        if self.status is not None:
            self.status.stop()
        for listener in self.listeners.values():
            listener.close()
        self.password_checks.close()
        self.loop.close()


def drop_privileges(main: Settings, log: ErrorLog) -> None:
    """``user USER [GROUP]``: after the listeners are bound (ports below 1024
    need root), become that user, as nginx's workers do."""
    if main.user is None or not hasattr(os, "setuid"):
        return
    if os.geteuid() != 0:
        log.log("warn", 'the "user" directive makes sense only if the master process '
                "runs with super-user privileges, ignored")
        return
    uid, gid, text = main.user
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)


def write_pid_file(main: Settings) -> None:
    if main.pid:
        with open(main.pid, "w") as handle:
            handle.write("%d\n" % os.getpid())


def remove_pid_file(main: Settings, log: ErrorLog) -> None:
    """At exit.  The file was written as root, before any drop: with
    master_process off and ``user``, the process may no longer remove it
    (a directory only root writes to); say so, as nginx does."""
    if main.pid:
        try:
            os.unlink(main.pid)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.log("alert", 'unlink() "%s" failed (%d: %s)' % (main.pid, error.errno, error.strerror))


# What ps -o comm, top and pgrep show for each process (nginx's "nginx:
# master process", "nginx: worker process"), where the platform lets a
# Python program say it: Linux's prctl(PR_SET_NAME) sets the process's
# name (comm), TASK_COMM_LEN - 1 = 15 bytes at most, so these read
# "mailproxy: mast" and "mailproxy: work" there.  The command line (ps
# -f, ps aux) stays "python3 mailproxy.py -c FILE": rewriting argv in
# place is not something Python can do portably.
MASTER_TITLE = "mailproxy: master"
WORKER_TITLE = "mailproxy: worker"
PR_SET_NAME = 15                     # <linux/prctl.h>


def set_process_title(title: str) -> bool:
    """Best effort: name this process ``title`` (cut to 15 bytes) where
    the platform allows (Linux, with ctypes); False where it does not."""
    if not sys.platform.startswith("linux"):
        return False
    if ctypes is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_NAME, ctypes.c_char_p(title.encode()[:15]), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


WORKER_SIGNALS = {signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1} \
    if hasattr(signal, "SIGQUIT") else set()


class Master(LoopHandler):
    """The master process: listening sockets, workers, signals, reload.

    Workers of the current configuration form the current generation; on
    SIGHUP a new generation starts with the new configuration and the old
    one gets SIGQUIT, so that its sessions end in their own time.  A worker
    that stops while the master did not tell it to (killed, or a signal
    sent to its own pid) is replaced, as nginx respawns it.
    """

    def __init__(self, config: Config, logs: ErrorLogs):
        self.config = config
        self.logs = logs
        self.log = logs.main
        self.loop = EventLoop()
        self.sockets = {}              # (host, port) -> listening socket
        self.listens = {}              # (host, port) -> the Listen its socket matches
        self.workers = {}              # pid -> generation
        self.generation = 0
        self.stopping = False
        self.lifeline = os.pipe()      # (read, write): workers see EOF when we die
        self.reports = os.pipe()       # (read, write): "PID\n" from a worker that stopped accepting
        os.set_blocking(self.reports[0], False)
        self.reload_pending = set()    # old workers still accepting after a reload
        self.retiring = set()          # workers told to stop, or replaced already: not again
        self.status = None             # type: Optional[StatusServer]  (status_listen)
        self.broker = BookBroker(make_shared_books(), self)    # fork() copies them to each worker
        try:
            self.numbers = SessionNumbers.shared()               # *N, one counter for all
        except OSError as error:
            self.log.log("warn", "each worker counts its own session numbers: %s" % error)
            self.numbers = None

    def start(self) -> None:
        """Bind (raises OSError), then fork the first workers."""
        self.sockets = bind_all(self.config, {}, lambda message: self.log.log("warn", message))
        self.listens = listen_table(self.config, self.sockets)
        replace_status_server(self, self.config.main)
        set_process_title(MASTER_TITLE)
        for signum, handler in ((signal.SIGHUP, self.reload), (signal.SIGQUIT, self.stop_gracefully),
                                (signal.SIGTERM, self.stop_now), (signal.SIGINT, self.stop_now),
                                (signal.SIGUSR1, self.reopen_logs), (signal.SIGCHLD, self.reap)):
            self.loop.add_signal_handler(signum, handler)
        self._report_reader = os.fdopen(self.reports[0], "rb", buffering=0)
        self.loop.set_interest(self._report_reader, selectors.EVENT_READ, self, 0)
        self.spawn_generation()

    def on_readable(self) -> None:
        """Reports from workers that stopped accepting (after SIGQUIT)."""
        data = self._report_reader.read(4096) or b""     # None: nothing there (non-blocking)
        for word in data.split():
            self._stopped_accepting(int(word))

    def _stopped_accepting(self, pid: int) -> None:
        """Worker ``pid`` says it stopped accepting.  If nobody told it to,
        its port is served by nobody until its last session ends: replace
        it now.  But a SIGQUIT sent to the whole process group reached the
        master as well, before the worker could react, so its byte is in
        the loop's wake-up socket already, though maybe not in this
        wake-up's events (epoll returns the report first): dispatch the
        signals waiting there, then decide."""
        self._old_worker_done(pid)
        if self._told_to_stop(pid):
            return
        self.loop.on_readable()        # the pending signals (not blocking)
        if pid in self.workers and not self._told_to_stop(pid):   # else: reaped meanwhile
            self._replace(pid, "stopped accepting unasked")

    def _told_to_stop(self, pid: int) -> bool:
        return self.stopping or pid in self.retiring

    def _replace(self, pid: int, how: str) -> None:
        """Start a worker in place of ``pid``, which stopped unasked."""
        self.retiring.add(pid)
        self.log.log("alert", "worker process %d %s, starting a new one" % (pid, how))
        self.spawn()

    def _old_worker_done(self, pid: int) -> None:
        if pid in self.reload_pending:
            self.reload_pending.discard(pid)
            if not self.reload_pending:
                # Only now is every new connection served with the new file.
                self.log.log("notice", "configuration reloaded")

    def spawn_generation(self) -> None:
        for _ in range(self.config.main.worker_processes):
            self.spawn()

    def spawn(self) -> None:
        """Fork a worker.  The signals stay blocked across fork() until the
        worker has its own handlers, so that one sent in between (a quick
        SIGQUIT) is delivered to the worker then, not lost."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        self.broker.prepare()
        pid = os.fork()
        if pid == 0:
            self._become_worker()
        self.broker.forked(pid)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.workers[pid] = self.generation
        self.log.log("notice", "start worker process %d" % pid)

    def _become_worker(self) -> None:
        """In the child: leave the master's loop, drop privileges, serve."""
        status = 0
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT,
                           signal.SIGUSR1, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            self.loop.close()
            os.close(self.lifeline[1])
            os.close(self.reports[0])
            if self.status is not None:
                self.status.close()            # the master's: a worker serves mail only
            drop_privileges(self.config.main, self.log)
            set_process_title(WORKER_TITLE)
            worker = Worker(self.config, self.logs, self.broker.books, self.numbers)
            self.broker.join(worker)
            worker.report_fd = self.reports[1]
            worker.watch_master(self.lifeline[0])
            worker.open_listeners(self.config, self.sockets)
            for key, sock in self.sockets.items():
                if key not in worker.listeners:
                    sock.close()
            worker.install_signals(reload=False)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
            worker.run()
        except BaseException as error:         # a worker must never return to the master's code
            self.log.log("alert", "worker process failed: %r" % error)
            status = 2
        finally:
            os._exit(status)

    def reap(self, signum: int = 0) -> None:
        """SIGCHLD: collect exited workers; replace one that exited while
        the master had not told it to stop, whatever its status (nginx
        respawns it).  SIGCHLD is handled after the master's own signals of
        the same wake-up, so the workers of a Ctrl-C to the whole group are
        seen exiting once the master is stopping: not replaced."""
        log_signal(self.log, signum)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid not in self.workers:
                continue
            self.broker.gone(pid)      # before a replacement is forked with the books
            self._old_worker_done(pid)
            how = ("exited on signal %d" % os.WTERMSIG(status) if os.WIFSIGNALED(status)
                   else "exited with code %d" % os.WEXITSTATUS(status))
            if self._told_to_stop(pid):
                self.log.log("notice", "worker process %d %s" % (pid, how))
            else:
                self._replace(pid, how)
            del self.workers[pid]
            self.retiring.discard(pid)
        if self.stopping and not self.workers:
            self.loop.stop()

    def reload(self, signum: int = 0) -> None:
        """SIGHUP: a new generation with the new file, the old one told to
        stop.  Not once stopping (nginx's master skips it while it quits):
        it would bind the ports again and start workers nobody stops."""
        if self.stopping:
            log_late_signal(self.log, signum)
            return
        log_signal(self.log, signum, "reconfiguring")
        loaded = load_for_reload(self.config.path, self.log)
        if loaded is None:
            return
        config, logs = loaded
        try:
            sockets = bind_all(config, self.sockets, lambda message: self.log.log("warn", message))
        except OSError as error:
            logs.close()
            self.log.log("emerg", str(error.strerror))
            self.log.log("alert", "reload failed, the old configuration is kept")
            return
        for key, sock in self.sockets.items():
            if key not in sockets:     # old workers keep their copy until they exit
                if key[1] == 0:
                    self.log.log("warn", "deleting socket %s" % key[0][5:])   # nginx's words
                release_socket(key, sock)
        self._update_kept_sockets(config, sockets)
        try:
            replace_status_server(self, config.main)
        except OSError as error:
            self.log.log("alert", "status listener: %s, the old one is kept" % error.strerror)
        old = [pid for pid, generation in self.workers.items() if generation == self.generation]
        self.config, self.sockets = config, sockets
        self.logs.close()
        self.logs, self.log = logs, logs.main
        give_logs_to_user(logs, config.main, self.log)
        raise_open_file_limit(config.main, self.log)
        warn_about(config, self.log)
        self.generation += 1
        self.spawn_generation()
        self.reload_pending = set(old)
        self.retiring.update(old)
        for pid in old:
            self._signal(pid, signal.SIGQUIT)
        if not old:
            self.log.log("notice", "configuration reloaded")

    def _update_kept_sockets(self, config: Config, sockets: Dict) -> None:
        """The sockets a reload keeps get the new socket settings (the
        workers share them); the new workers take ssl, proxy_protocol and
        so_keepalive from the new configuration by themselves."""
        listens = listen_table(config, sockets)
        for key, listen in listens.items():
            if key in self.listens:
                listens[key], problems = update_listen(sockets[key], self.listens[key], listen)
                for problem in problems:
                    self.log.log("warn", "listen %s: %s" % (listen.text, problem))
        self.listens = listens

    def _signal(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def stop_gracefully(self, signum: int = 0) -> None:
        """SIGQUIT: once.  SIGTERM may still follow it and stop at once."""
        if self.stopping:
            log_late_signal(self.log, signum)
            return
        log_signal(self.log, signum, "shutting down")
        self.log.log("notice", "gracefully shutting down")
        self._stop(signal.SIGQUIT)

    def stop_now(self, signum: int = 0) -> None:
        log_signal(self.log, signum, "exiting")
        self.log.log("notice", "exiting")
        self._stop(signal.SIGTERM)

    def _stop(self, signum: int) -> None:
        self.stopping = True
        if self.status is not None:
            self.status.stop()
            self.status = None
        for key, sock in self.sockets.items():
            release_socket(key, sock)  # a unix socket's file goes (workers finishing keep theirs)
        self.sockets = {}
        for pid in list(self.workers):
            self._signal(pid, signum)
        if not self.workers:
            self.loop.stop()

    def reopen_logs(self, signum: int = 0) -> None:
        """SIGUSR1: the master's files opened again by name, then the
        workers told to do the same (also while stopping: old sessions
        still log)."""
        log_signal(self.log, signum, "reopening logs")
        self.log.log("notice", "reopening logs")
        try:
            logs = ErrorLogs(self.config)
        except OSError as error:
            self.log.log("alert", "reopening logs failed: %s" % error)
            return
        self.logs.close()
        self.logs, self.log = logs, logs.main
        give_logs_to_user(logs, self.config.main, self.log)     # before the workers open them
        for pid in list(self.workers):
            self._signal(pid, signal.SIGUSR1)

    # -- what the status listener asks (StatusServer) ----------------------------------
    @property
    def books(self) -> SharedBooks:
        return self.broker.books

    def status_ask(self, what: str, argument, done: Callable[[list], None]) -> Optional[int]:
        """Ask every worker (StatusQueries); done(rows) once all have
        answered.  The query's number while answers are awaited, else None."""
        queries = self.books.of(StatusQueries)
        query = queries.ask(what, argument, list(self.workers), done)
        return query if query in queries.waiting else None

    def status_expire(self, query: int) -> None:
        """The time is up for ``query``: done(rows) with what came."""
        silent = self.books.of(StatusQueries).expire(query)
        if silent:
            self.log.log("warn", "status listener: worker processes %s did not answer within %gs"
                         % (", ".join(map(str, silent)), STATUS_QUERY_TIMEOUT))

    def status_pids(self) -> List[int]:
        return [os.getpid()] + sorted(self.workers)

    def status_workers(self) -> int:
        return len(self.workers)

    def status_sockets(self) -> Dict:
        """The listening sockets the workers accept on, (host, port) -> socket."""
        return self.sockets

    def status_flush(self) -> None:
        """The workers publish by themselves (METRICS_FLUSH)."""

    def status_healthy(self) -> Tuple[bool, str]:
        """Running, every listener bound, and workers to serve them."""
        if self.stopping:
            return False, "shutting down"
        if not self.workers:
            return False, "no worker process"
        return True, "ok"

    def status_reopen_logs(self) -> None:
        self.reopen_logs()

    def run(self) -> None:
        self.loop.run()
        self.loop.close()


# ========================================================================== #
# ####                       Migration from nginx                       #### #
# ========================================================================== #
# --import-nginx: read nginx.conf (its own syntax: words, quotes, escapes,
# comments, blocks, include with globs) and print the mail {} block as this
# program's INI.  Every directive is carried over; one that cannot be is
# printed as a comment with the reason (and the same note on stderr), so
# the output passes -t whenever the nginx file was valid, except where
# dropping it would leave a port less protected than nginx had it (TLS,
# authentication): that is an error naming file:line, and nothing is
# printed.  "ssl on" (nginx <= 1.24) becomes "listen ... ssl"; nginx's pid
# file and error log are renamed so that a trial run beside nginx never
# shares them.

class NginxBlock(NamedTuple):
    name: str
    args: List[str]
    children: List                 # of NginxBlock; a plain directive has none
    block: bool
    source: str = ""               # file and line, for messages
    line: int = 0

    @property
    def where(self) -> str:
        return "%s:%d" % (self.source, self.line)


def nginx_tokens(text: str, source: str) -> List[Tuple[str, int, bool]]:
    """(token, line, quoted) of nginx.conf text, as ngx_conf_read_token."""
    tokens, i, line = [], 0, 1
    while i < len(text):
        char = text[i]
        if char == "\n":
            line += 1
        if char.isspace():
            i += 1
        elif char == "#":
            while i < len(text) and text[i] != "\n":
                i += 1
        elif char in ";{}":
            tokens.append((char, line, False))
            i += 1
        else:
            start = i
            token, i, quoted = _nginx_word(text, i, source, line)
            line += text.count("\n", start, i)
            if quoted and i < len(text) and not (text[i].isspace() or text[i] in ";{})"):
                # nginx (ngx_conf_read_token): a quoted argument must be
                # followed by a space, ";", "{", or ")", which then starts
                # the next word: if ($user = 'x') { in an http {} block
                raise ConfigValueError('%s:%d: unexpected "%s"' % (source, line, text[i]))
            tokens.append((token, line, quoted))
    return tokens


def _nginx_word(text: str, i: int, source: str, line: int) -> Tuple[str, int, bool]:
    quote = text[i] if text[i] in "\"'" else None
    i += 1 if quote else 0
    out = []
    while i < len(text):
        char = text[i]
        if quote and char == quote:
            return "".join(out), i + 1, True
        if not quote and (char.isspace() or char in ";{}"):
            break
        if char == "\\" and i + 1 < len(text):
            # nginx: \" \' \\ \t \r \n are escapes; any other "\x" stays as
            # written, backslash included (and does not end the word)
            following = text[i + 1]
            out.append(NGINX_ESCAPES.get(following, "\\" + following))
            i += 2
            continue
        out.append(char)
        i += 1
    if quote:
        raise ConfigValueError("%s:%d: unexpected end of file, expecting %s" % (source, line, quote))
    return "".join(out), i, False


def parse_nginx(path: str, depth: int = 0, base: Optional[str] = None,
                included_from: str = "") -> List[NginxBlock]:
    """The directives of an nginx.conf file, with include files read in
    place; a relative include is taken from the main file's directory, as
    nginx takes it from its configuration prefix."""
    if depth > 16:
        raise ConfigValueError("%s: include nested too deeply" % path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:                      # nginx's own words
        raise ConfigValueError('open() "%s" failed (%d: %s)%s' % (
            path, error.errno or 0, error.strerror or error,
            " in " + included_from if included_from else ""))
    except UnicodeDecodeError as error:
        raise ConfigValueError("%s: not UTF-8 text (%s)" % (path, error))
    tokens = nginx_tokens(text, path)
    if base is None:
        base = os.path.dirname(os.path.abspath(path))
    directives, position = _nginx_block(tokens, 0, path, base, depth)
    if position != len(tokens):
        raise ConfigValueError('%s:%d: unexpected "}"' % (path, tokens[position][1]))
    return directives


def _nginx_block(tokens: List, position: int, path: str, base: str, depth: int,
                 outer: str = ""):
    """outer: the top-level block this is in; an include inside one that
    is not mail's (http {}, stream {}) is skipped, as the block is."""
    directives, words = [], []
    while position < len(tokens):
        token, line, quoted = tokens[position]
        position += 1
        if token == "}" and not quoted:
            if words:
                raise ConfigValueError('%s:%d: unexpected "}"' % (path, line))
            return directives, position - 1
        if token == ";" and not quoted:
            if not words:
                continue
            if words[0] == "include":
                if len(words) != 2:
                    raise ConfigValueError('%s:%d: invalid number of arguments in "include" '
                                           'directive' % (path, line))
                if outer in ("", "mail", "events"):
                    for name in sorted(glob_files(words[1], base)):
                        directives += parse_nginx(name, depth + 1, base, "%s:%d" % (path, line))
            else:
                directives.append(NginxBlock(words[0], words[1:], [], False, path, line))
            words = []
        elif token == "{" and not quoted:
            children, position = _nginx_block(tokens, position, path, base, depth,
                                              outer or (words[0] if words else "?"))
            if position >= len(tokens):
                raise ConfigValueError('%s:%d: unexpected end of file, expecting "}"' % (path, tokens[-1][1]))
            position += 1
            directives.append(NginxBlock(words[0] if words else "", words[1:], children, True,
                                         path, line))
            words = []
        else:
            words.append(token)
    if words:
        raise ConfigValueError('%s:%d: unexpected end of file, expecting ";" or "}"' % (path, tokens[-1][1]))
    return directives, position


def glob_files(pattern: str, base: str) -> List[str]:
    import glob
    pattern = os.path.join(base, pattern)
    names = glob.glob(pattern) if glob.has_magic(pattern) else [pattern]
    return [name for name in names if os.path.isfile(name)] if glob.has_magic(pattern) else names


NGINX_MAIN_DIRECTIVES = ("worker_processes", "worker_rlimit_nofile", "user", "pid",
                         "error_log", "worker_shutdown_timeout", "master_process")
PATH_DIRECTIVES = ("pid", "error_log", "access_log")


def ini_value(args: List[str]) -> str:
    """nginx arguments as one INI value: quoted where they hold a space,
    a quote or a backslash, so split_arguments gives them back."""
    out = []
    for arg in args:
        if arg and not re.search(r"[\s\"'\\]", arg):
            out.append(arg)
        else:
            out.append('"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return " ".join(out)


def absolute_args(name: str, args: List[str], base: str) -> List[str]:
    """nginx resolves relative paths against its configuration directory."""
    parser = DIRECTIVES[name].parse if name in DIRECTIVES else None
    if (parser is parse_path or name in PATH_DIRECTIVES) and args and \
            args[0] not in ("stderr", "off") and not args[0].startswith(("syslog:", "/", "data:", "memory:")):
        return [os.path.join(base, args[0])] + args[1:]
    return args


# TLS directives about session resumption only: left out, the port is as
# protected as under nginx (mailproxy's cache and 5m timeout apply), so the
# import carries on with a note (Mailu has both).
IMPORT_DROPPABLE = ("ssl_session_cache", "ssl_session_timeout")


def guards_access(name: str, args: List[str]) -> bool:
    """A directive about TLS or authentication: one the import may not drop,
    since the port would then be less protected than nginx had it.  Forks'
    own auth_http (Zimbra's "zm_auth_http;") count: it is what decides who
    logs in."""
    if name in IMPORT_DROPPABLE:
        return False
    return name.startswith(("ssl", "proxy_ssl", "starttls", "proxy_starttls", "auth")) or \
        name.endswith(("_auth", "auth_http")) or (name == "listen" and "ssl" in args[1:])


class NginxImport:
    """What one run of --import-nginx has to say: notes for stderr (each
    also a comment in the output) and refusals (exit 1, nothing printed)."""

    def __init__(self) -> None:
        self.notes: List[str] = []
        self.errors: List[str] = []

    def note(self, lines: List[str], where: str, text: str) -> None:
        lines.append("# %s" % text)
        self.notes.append("%s: %s" % (where, text) if where else text)

    def untranslated(self, lines: List[str], directive: NginxBlock, args: List[str],
                     reason: str) -> None:
        text = "%s;  (%s)" % (" ".join([directive.name] + ([ini_value(args)] if args else [])), reason)
        if guards_access(directive.name, args):
            self.errors.append("%s: %s: cannot be carried over, and it is about TLS or "
                               "authentication, so the port would be less protected than "
                               "under nginx; change it in the nginx file (or a copy) and "
                               "import again" % (directive.where, text))
        else:
            self.note(lines, directive.where, "not translated: " + text)


def rewritten_path(name: str, args: List[str]) -> Optional[str]:
    """nginx's pid file and error log are its own: a trial run beside the
    running nginx must neither overwrite its pid file (nginx -s would then
    signal mailproxy) nor write into its log.  The same directory, a name
    of mailproxy's.  A device (Mailu's "error_log /dev/stderr") is no file
    of nginx's: kept, or the import would create /dev/mailproxy-stderr."""
    if not args or args[0] in ("stderr", "off") or \
            args[0].startswith(("syslog:", "memory:", "/dev/", "/proc/")):
        return None
    directory, filename = os.path.split(args[0])
    if name == "pid":
        new = os.path.join(directory, "mailproxy.pid")
        return new if new != args[0] else os.path.join(directory, "mailproxy-imported.pid")
    if name == "error_log":
        return os.path.join(directory, "mailproxy-" + filename)
    return None


def listen_addresses(imp: NginxImport, lines: List[str], directive: NginxBlock,
                     args: List[str]) -> List[List[str]]:
    """nginx's listen takes a host name and binds every address it has;
    mailproxy's takes addresses, so the name is resolved here, one listen
    per address."""
    if not args or re.fullmatch(r"\d+", args[0]) or args[0].startswith(("[", "*:", "unix:")):
        return [args]
    try:
        host, port = parse_host_port(args[0])
        ipaddress.ip_address(host)
        return [args]
    except (ConfigValueError, ValueError):
        pass
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        imp.errors.append('%s: host not found in "%s" of the "listen" directive (%s)'
                          % (directive.where, args[0], getattr(error, "strerror", None) or error))
        return []
    addresses = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            text = "[%s]:%d" % (sockaddr[0], port) if family == socket.AF_INET6 \
                else "%s:%d" % (sockaddr[0], port)
            if text not in addresses:
                addresses.append(text)
    if not addresses:
        imp.errors.append('%s: no IPv4 or IPv6 address for "%s" of the "listen" directive'
                          % (directive.where, host))
        return []
    imp.note(lines, directive.where, 'listen %s: a host name, resolved now to %s (mailproxy\'s '
             'listen takes addresses; nginx resolves it at each start)'
             % (args[0], ", ".join(addresses)))
    return [[address] + args[1:] for address in addresses]


def translate_block(imp: NginxImport, kind: str, directives: List[NginxBlock], base: str,
                    ssl_on: bool = False) -> List[str]:
    """INI lines for one section; what cannot be translated becomes a
    comment and a note, or an error where it guards TLS or authentication."""
    grouped = {}
    lines = []
    for directive in directives:
        if directive.block:
            imp.note(lines, directive.where, "not translated: %s {...}: a block mailproxy "
                     "does not have" % directive.name)
            continue
        args = absolute_args(directive.name, directive.args, base)
        if directive.name == "ssl" and kind in ("mail", "server"):
            if args not in (["on"], ["off"]):
                imp.errors.append('%s: invalid value in "ssl %s;", it must be "on" or "off"'
                                  % (directive.where, ini_value(args)))
            elif args == ["on"]:
                imp.note(lines, directive.where, 'ssl on: carried as "listen ... ssl" (implicit '
                         'TLS) on %s listeners; the "ssl" directive was removed in nginx 1.25.1'
                         % ("every server's" if kind == "mail" else "this server's"))
                if any(d.name == "starttls" and d.args in (["on"], ["only"]) for d in directives):
                    # ngx_mail_ssl_module: both in one block is an [emerg]
                    # (the nginx wiki's and the Nginx Cookbook's example)
                    imp.note(lines, directive.where, 'nginx does not start with this block: '
                             '"starttls" directive conflicts with "ssl on"; imported as implicit '
                             'TLS, where STARTTLS is not offered')
            continue
        row = DIRECTIVES.get(directive.name)
        if row is None or kind not in row.contexts:
            imp.untranslated(lines, directive, args, "not a mailproxy directive here")
            continue
        if directive.name in ("pid", "error_log"):
            new = rewritten_path(directive.name, args)
            if new is not None:
                imp.note(lines, directive.where, "%s %s rewritten to %s, so that mailproxy run "
                         "beside nginx never touches nginx's file" % (directive.name, args[0], new))
                args = [new] + args[1:]
        if directive.name == "listen":
            for each in listen_addresses(imp, lines, directive, args):
                if ssl_on and "ssl" not in each[1:]:
                    each = each + ["ssl"]
                grouped.setdefault(directive.name, []).append((directive, each))
            continue
        if directive.name == "proxy_ssl" and args == ["on"] and not any(
                d.name in ("proxy_ssl_verify", "proxy_ssl_trusted_certificate") for d in directives):
            # Zimbra's nginx has proxy_ssl and does not check the backend
            imp.note(lines, directive.where, "proxy_ssl on: mailproxy checks the backend's "
                     "certificate and name (proxy_ssl_verify on); name your backends' CA in "
                     "proxy_ssl_trusted_certificate, or every login fails")
        grouped.setdefault(directive.name, []).append((directive, args))
    for name, occurrences in grouped.items():
        if not DIRECTIVES[name].multiple:
            occurrences = occurrences[-1:]               # nginx: last wins, or "is duplicate"
        value = "\n    ".join(ini_value(args) for _, args in occurrences)
        try:
            parse_directive(kind, name, value, base)
        except ConfigValueError as error:
            for directive, args in occurrences:
                imp.untranslated(lines, directive, args, str(error))
            continue
        lines.append("%s = %s" % (name, value))
    return lines


def server_protocol(server: NginxBlock) -> Optional[str]:
    """The server's protocol: its "protocol", or what its first port tells."""
    for directive in server.children:
        if directive.name == "protocol" and directive.args:
            return directive.args[0]
    return server_port_protocol(server)[1]


def server_port_protocol(server: NginxBlock) -> Tuple[Optional[int], Optional[str]]:
    for directive in server.children:
        if directive.name == "listen" and directive.args:
            match = re.search(r"(?:^|:)(\d+)$", directive.args[0])
            if match:
                port = int(match.group(1))
                return port, WELL_KNOWN_PORTS.get(port)
    return None, None


def ssl_setting(directives: List[NginxBlock], inherited: bool) -> bool:
    for directive in directives:
        if directive.name == "ssl" and not directive.block and directive.args in (["on"], ["off"]):
            inherited = directive.args == ["on"]          # the last one counts
    return inherited


def import_nginx(path: str, imp: Optional[NginxImport] = None) -> str:
    """The INI equivalent of the mail {} block of an nginx configuration;
    notes for stderr in imp.notes; ConfigValueError where it must refuse."""
    imp = imp if imp is not None else NginxImport()
    top = parse_nginx(path)
    base = os.path.dirname(os.path.abspath(path))
    main = [d for d in top if d.name in NGINX_MAIN_DIRECTIVES and not d.block]
    header: List[str] = []
    for events in (d for d in top if d.name == "events" and d.block):
        main += [d for d in events.children if d.name == "worker_connections" and not d.block]
        rest = sorted({d.name for d in events.children if d.name != "worker_connections"})
        carried = any(d.name == "worker_connections" for d in events.children)
        imp.note(header, events.where, "events {} skipped%s: mailproxy has its own event loop%s"
                 % (" (%s)" % ", ".join(rest) if rest else "",
                    "; its worker_connections goes to [main]" if carried else ""))
    mails = [d for d in top if d.name == "mail" and d.block]
    if not mails:
        raise ConfigValueError("%s: no mail {} block" % path)
    for directive in top:
        if directive.name in NGINX_MAIN_DIRECTIVES + ("events", "mail") and \
                directive.block == (directive.name in ("events", "mail")):
            continue
        if directive.block:
            imp.note(header, directive.where, "%s {} skipped: not mail" % directive.name)
        else:
            imp.note(header, directive.where, "%s %s; skipped: not a mailproxy directive"
                     % (directive.name, ini_value(directive.args)))
    out = ["# Made from %s by mailproxy --import-nginx." % os.path.abspath(path)] + header
    out += ["", "[main]"]
    out += translate_block(imp, "main", main, base)
    mail = mails[0]
    out += ["", "[mail]"]
    out += translate_block(imp, "mail", [d for d in mail.children if d.name != "server"], base)
    mail_ssl = ssl_setting(mail.children, False)
    used = set()
    for number, server in enumerate((d for d in mail.children if d.name == "server" and d.block), 1):
        port, _ = server_port_protocol(server)
        protocol = server_protocol(server)
        names = [d.args[0] for d in server.children if d.name == "server_name" and d.args]
        if protocol and port:
            name = "%s-%d" % (protocol, port)
        else:
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", names[0]) if names else "%d" % number
        if name in used:
            name = "%s-%d" % (name, number)
        used.add(name)
        out += ["", "[server %s]" % name] + translate_block(
            imp, "server", server.children, base, ssl_on=ssl_setting(server.children, mail_ssl))
    if imp.errors:
        raise ConfigValueError("\nmailproxy: [emerg] ".join(imp.errors))
    return "\n".join(out) + "\n"


# ========================================================================== #
# ####                           Command line                           #### #
# ========================================================================== #
# -c FILE, -t, -s, -v, -h, --import-nginx, --hash-password; main() is the
# last thing in the file and the only one that runs anything.

USAGE = """usage: mailproxy.py [-h] [-v] [-t] [-c FILE] [-s SIGNAL]
       mailproxy.py --hash-password [SCHEME]
       mailproxy.py --import-nginx NGINX.CONF
"""

HELP = USAGE + """
options:
  -h, --help         print this help and exit
  -v                 print the version and exit
  -c FILE            configuration file (default: ./mailproxy.conf, then
                     /etc/mailproxy/mailproxy.conf)
  -t                 check the configuration and exit (0 valid, 1 not)
  -s SIGNAL          send SIGNAL to the running master, found through the
                     pid file that the configuration's "pid" names:
                     reload (SIGHUP), reopen (SIGUSR1: the logs),
                     quit (SIGQUIT: stop gracefully), stop (SIGTERM)
  --hash-password [SCHEME]
                     print a [users] value: the password is typed twice at
                     a prompt, not shown, or read as one line from a pipe;
                     SCHEME: PBKDF2-SHA256 (default), SHA512-CRYPT,
                     SHA256-CRYPT or PLAIN
  --import-nginx NGINX.CONF
                     print the mail {} block of an nginx configuration as
                     INI on standard output, notes on standard error
"""

# nginx -s: the name on the command line, the signal the master gets.
SIGNAL_COMMANDS = {"reload": "SIGHUP", "reopen": "SIGUSR1", "quit": "SIGQUIT", "stop": "SIGTERM"}
PID_FILE_READ = 22             # bytes of the pid file read: nginx's NGX_INT64_LEN + 2
PID_MAX = 2 ** 22              # Linux's largest pid (PID_MAX_LIMIT); higher is no pid


DEFAULT_CONFIG_PATHS = ("mailproxy.conf", "/etc/mailproxy/mailproxy.conf")


def default_config_path() -> Optional[str]:
    """Without -c: ./mailproxy.conf, then /etc/mailproxy/mailproxy.conf
    (INTERFACE.md); None if neither exists.  Never sample.conf: its demo
    user must not go live because a -c was forgotten."""
    for path in DEFAULT_CONFIG_PATHS:
        if os.path.exists(path):
            return path
    return None


def parse_command_line(argv: List[str]) -> Dict[str, object]:
    """The options; raises ValueError (nginx's wording) for anything else."""
    options = {"config": None, "test": False, "version": False, "help": False, "signal": None,
               "hash": None, "import": None}
    needs = {"-c": ("config", "file name"), "-s": ("signal", "parameter"),
             "--import-nginx": ("import", "file name")}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in needs:
            key, what = needs[arg]
            if i + 1 >= len(argv):
                raise ValueError('option "%s" requires %s' % (arg, what))
            options[key] = argv[i + 1]
            i += 1
        elif arg == "-t":
            options["test"] = True
        elif arg == "-v":
            options["version"] = True
        elif arg in ("-h", "--help"):
            options["help"] = True
        elif arg == "--hash-password":
            options["hash"] = "PBKDF2-SHA256"
            if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                options["hash"] = argv[i + 1].upper()
                i += 1
        else:
            raise ValueError('invalid option: "%s"' % arg)
        i += 1
    if options["signal"] is not None and options["signal"] not in SIGNAL_COMMANDS:
        raise ValueError('invalid option: "-s %s"' % options["signal"])
    return options


def read_password() -> Optional[bytes]:
    """The password for --hash-password: on a terminal, asked twice
    without echo (getpass); from a pipe or a file, its first line.  None
    (with the reason on stderr) if there is none or the two differ."""
    if sys.stdin.isatty():
        try:
            first = getpass.getpass("Password: ")
            if first and getpass.getpass("Again: ") != first:
                sys.stderr.write("mailproxy: the passwords do not match\n")
                return None
        except (EOFError, KeyboardInterrupt):
            sys.stderr.write("\n")
            first = ""
        password = first.encode("utf-8")
    else:
        password = strip_eol(sys.stdin.buffer.readline())
    if not password:
        sys.stderr.write("mailproxy: no password given\n")
        return None
    return password


def command_hash_password(scheme: str) -> int:
    if scheme not in PASSWORD_SCHEMES:
        sys.stderr.write("mailproxy: unknown scheme %s; known: %s\n" % (
            scheme, ", ".join(PASSWORD_SCHEMES)))
        return 1
    password = read_password()
    if password is None:
        return 1
    print(hash_password(password, scheme))
    return 0


def foreign_process(pid: int) -> str:
    """The name of process ``pid`` if it is surely not mailproxy's master
    (Linux's /proc/PID/comm is neither the name set_process_title gives nor
    a Python's), else "": where there is no /proc, or the process is gone
    (kill() will say so), or it may be ours.  nginx signals whatever the pid
    file names; a stale file whose number went to another program would
    have it signalled."""
    try:
        with open("/proc/%d/comm" % pid, "rb") as handle:
            comm = handle.read().strip().decode("utf-8", "replace")
    except OSError:
        return ""
    return "" if comm.startswith(("mailproxy", "python", "pypy")) else comm


def command_signal(path: str, name: str) -> int:
    """nginx -s NAME (ngx_signal_process): the pid from the pid file of
    the configuration at ``path``, then kill(); nginx's messages for what
    can go wrong.  For a reload the file is read as -t reads it,
    certificates and keys included, so that a file the master would refuse
    is refused here, with the reasons; the others need only the pid (a
    master whose key file has gone can still be stopped)."""
    try:
        config = load_and_prepare(path) if name == "reload" else load_config(path)
    except ConfigErrors as errors:
        for error in errors.errors:
            sys.stderr.write("mailproxy: [emerg] %s\n" % error)
        return 1
    pid_path = config.main.pid
    if not pid_path:
        sys.stderr.write('mailproxy: [error] no "pid" in [main] of %s: -s finds the master '
                         "through the pid file it writes\n" % path)
        return 1
    try:
        with open(pid_path, "rb") as handle:
            data = handle.read(PID_FILE_READ)
    except OSError as error:
        sys.stderr.write('mailproxy: [error] open() "%s" failed (%d: %s)\n'
                         % (pid_path, error.errno, error.strerror))
        if error.errno == errno.ENOENT:        # the master removes it when it exits
            sys.stderr.write("mailproxy: is mailproxy running with %s?\n" % path)
        return 1
    text = data.rstrip(b"\r\n")
    if not text.isdigit() or not 0 < int(text) <= PID_MAX:      # 0 would signal our group
        sys.stderr.write('mailproxy: [error] invalid PID number "%s" in "%s"\n'
                         % (text.decode("ascii", "replace"), pid_path))
        return 1
    pid, signum = int(text), getattr(signal, SIGNAL_COMMANDS[name])
    other = foreign_process(pid)
    if other:
        sys.stderr.write('mailproxy: [error] process %d of "%s" is "%s", not mailproxy: the pid '
                         "file is stale and its number was given to another program; nothing "
                         "was signalled\n" % (pid, pid_path, other))
        return 1
    try:
        os.kill(pid, signum)
    except OSError as error:
        sys.stderr.write("mailproxy: [alert] kill(%d, %d) failed (%d: %s)\n"
                         % (pid, signum, error.errno, error.strerror))
        if error.errno == errno.ESRCH:
            sys.stderr.write('mailproxy: "%s" is stale: no process %d is running (a master '
                             "killed with SIGKILL leaves its pid file behind)\n" % (pid_path, pid))
        return 1
    return 0


def command_test(path: str) -> int:
    """nginx -t: every problem, then "test failed" / "test is successful".
    As nginx -t, the log files are opened and the listeners bound, then
    released, so that a log directory that is missing, or an address
    the host does not have, or a port it may not bind, fails here; a port in
    use does not (the running proxy holds it: nginx -t ignores EADDRINUSE)."""
    def say(level: str, message: object) -> None:
        sys.stderr.write("mailproxy: [%s] %s\n" % (level, message))
    try:
        config = load_and_prepare(path)
        for warning in config.warnings:
            say("warn", warning)
        ErrorLogs(config).close()            # as nginx -t, which opens its log files
        sockets = bind_all(config, {}, lambda message: say("warn", message),
                           ignore=(errno.EADDRINUSE,))
    except ConfigErrors as errors:
        for error in errors.errors:
            say("emerg", error)
        sys.stderr.write("mailproxy: configuration file %s test failed\n" % path)
        return 1
    except OSError as error:
        say("emerg", log_open_failure(error) if error.filename else error.strerror)
        sys.stderr.write("mailproxy: configuration file %s test failed\n" % path)
        return 1
    for key, sock in sockets.items():
        release_socket(key, sock)   # as nginx -t, a unix socket's file it made goes (one in use
                                    # was not bound: EADDRINUSE, ignored, its file untouched)
    sys.stderr.write("mailproxy: the configuration file %s syntax is ok\n" % path)
    sys.stderr.write("mailproxy: configuration file %s test is successful\n" % path)
    return 0


def startup_failure(config: Config, log: ErrorLog, message: str) -> int:
    """A start-up failure once the logs are open: in the log, and on stderr
    too unless the log is stderr already (nginx prints its [emerg] on the
    terminal as well, so that a failed start is never silent)."""
    log.log("emerg", message)
    if not any(spec.destination == "stderr" for spec in config.main.error_log):
        sys.stderr.write("mailproxy: [emerg] %s\n" % message)
    return 1


# -- the process's own memory -------------------------------------------------
# Python keeps the syntax tree of the script it runs (python3 mailproxy.py)
# until the script ends (pythonrun.c frees the parser's arena after run_mod):
# for this file, some 25 MB that a running proxy never reads again, in the
# master and, shared, in every worker.  So the serving command starts over
# once, at once, in a fresh interpreter (same pid) that imports this same
# file as the module "mailproxy" and calls its main(): an import frees the
# tree as soon as the code is compiled, and next time loads the compiled
# code from __pycache__ beside the file, as for any module (unless Python
# may not write it there: -B, PYTHONDONTWRITEBYTECODE, a read-only
# directory).  -t, -s and the other commands end quickly and do not bother.

RELAUNCH_PROGRAM = ("import importlib.util, sys; "
                    "spec = importlib.util.spec_from_file_location('mailproxy', sys.argv[1]); "
                    "module = sys.modules['mailproxy'] = importlib.util.module_from_spec(spec); "
                    "spec.loader.exec_module(module); "
                    "sys.exit(module.main(sys.argv[2:]))")


def relaunch_without_the_syntax_tree(argv: List[str]) -> None:
    """Replace this process with RELAUNCH_PROGRAM running this file with
    ``argv``, if it runs as the script; returns only if that cannot be done
    (then this one serves)."""
    if __name__ != "__main__" or not sys.executable or not os.path.isfile(PASSWORD_HELPER_FILE):
        return                         # (python3 - < mailproxy.py has no file to import)
    # The interpreter's own options (-I, -E, -O, -X ..., -W ...) carry over,
    # as the standard library's own children get them (multiprocessing).
    flags = getattr(subprocess, "_args_from_interpreter_flags", list)()
    try:
        os.execv(sys.executable, [sys.executable] + flags +
                 ["-c", RELAUNCH_PROGRAM, PASSWORD_HELPER_FILE] + argv)
    except OSError:
        return


def release_free_memory() -> None:
    """Before the first fork: give freed heap pages back to the system
    (glibc's malloc_trim, where there is one), and move every object made so
    far out of the garbage collector's sight (gc.freeze, Python 3.7), so that
    its passes in the workers do not write to, and so copy, pages they share
    with the master."""
    gc.collect()
    if ctypes is not None and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
    gc.freeze()


def command_run(path: str) -> int:
    try:
        config = load_and_prepare(path)
    except ConfigErrors as errors:
        for error in errors.errors:
            sys.stderr.write("mailproxy: [emerg] %s\n" % error)
        return 1
    try:
        logs = ErrorLogs(config)
    except OSError as error:
        sys.stderr.write("mailproxy: [emerg] %s\n" % log_open_failure(error))
        return 1
    log = logs.main
    give_logs_to_user(logs, config.main, log)
    raise_open_file_limit(config.main, log)
    warn_about(config, log)
    release_free_memory()
    if config.main.master_process and hasattr(os, "fork"):
        process = Master(config, logs)
        start = process.start
    else:
        process = Worker(config, logs)

        def start() -> None:
            process.open_listeners(config)
            replace_status_server(process, config.main)
    try:
        start()
    except OSError as error:
        return startup_failure(config, log, str(error.strerror))
    try:
        write_pid_file(config.main)              # before the user changes
    except OSError as error:
        status = startup_failure(config, log, 'open() "%s" failed (%d: %s)'
                                 % (config.main.pid, error.errno, error.strerror))
        if isinstance(process, Master):
            process.stop_now()                   # its workers are running already
            process.run()
        else:
            process.remove_unix_sockets(process.unix_paths)
        return status
    if isinstance(process, Worker):
        drop_privileges(config.main, log)
        process.install_signals()
    bound = process.sockets if isinstance(process, Master) else process.listeners
    listening = ", ".join(sorted(listen.text for listen in listen_table(config, bound).values()))
    log.log("notice", "mailproxy/%s started, listening on %s; configuration file %s"
            % (__version__, listening, os.path.abspath(path)))
    if process.status is not None:
        log.log("notice", "status listener on %s" % process.status.listen.text)
    try:
        process.run()
    finally:
        if isinstance(process, Worker):
            process.remove_unix_sockets(process.unix_paths)
        remove_pid_file(process.config.main, process.log)
    process.log.log("notice", "exit")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        options = parse_command_line(sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        sys.stderr.write("mailproxy: %s\n%s(-h lists the options)\n" % (error, USAGE))
        return 2
    if options["help"]:
        sys.stdout.write(HELP)
        return 0
    if options["version"]:
        sys.stderr.write("mailproxy version: mailproxy/%s\n" % __version__)
        return 0
    if options["hash"]:
        return command_hash_password(options["hash"])
    if options["import"]:
        imported = NginxImport()
        try:
            text = import_nginx(options["import"], imported)
        except (OSError, UnicodeDecodeError, ConfigValueError) as error:
            sys.stderr.write("mailproxy: [emerg] %s\n" % error)
            return 1
        for note in imported.notes:
            sys.stderr.write("mailproxy: [notice] %s\n" % note)
        sys.stdout.write(text)
        return 0
    path = options["config"] or default_config_path()
    if path is None:
        sys.stderr.write("mailproxy: [emerg] no configuration file: neither %s exists; "
                         "give one with -c FILE (sample.conf is an example to copy)\n"
                         % " nor ".join("./" + p if not os.path.isabs(p) else p
                                        for p in DEFAULT_CONFIG_PATHS))
        return 1
    if options["signal"]:
        return command_signal(path, options["signal"])
    if options["test"]:
        return command_test(path)
    relaunch_without_the_syntax_tree(sys.argv[1:] if argv is None else argv)
    return command_run(path)


if __name__ == "__main__":
    sys.exit(main())

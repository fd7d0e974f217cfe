#!/usr/bin/env python3
"""Tests for mailproxy.py, standard library only.

    python3 test_mailproxy.py              every test; the last line says
                                           "N passed, N failed, N skipped"
    python3 test_mailproxy.py -v           one line per test
    python3 test_mailproxy.py NAME...      only tests whose id contains NAME
    python3 test_mailproxy.py --fuzz N     N fuzz inputs per target (--seed S,
                                           TARGET... to choose); see "Fuzz"
    python3 test_mailproxy.py --bench      what this host sustains (minutes);
                                           see "Benchmark" (--bench NAME...:
                                           only the workloads so named)
    python3 test_mailproxy.py --heavy      every test, the heavy cases at the
                                           sizes their issues name (heavy())

The sections mirror mailproxy.py's, in the same order and under the same
banners (grep '^# .*####' prints both tables of contents), after one section
for the test harness and before the opt-in modes and the runner.  Protocol
machines are driven with byte strings, each transcript three ways (whole,
one byte at a time, and with a pipelined tail that must come back
untouched); the end-to-end tests run the proxy's event loop in a thread (or
the real program, in "Processes") against fake backends on loopback and
read as transcripts: send("a02 LOGIN alice bad"), expect(rb"^a02 NO").
"""

import base64
import errno
import functools
import hashlib
import hmac
import imaplib
import io
import itertools
import os
import platform
import poplib
import random
import re
import selectors
import signal
import smtplib
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import tracemalloc
import unittest
import unittest.mock
from typing import Callable, List, NamedTuple, Optional

import mailproxy as mp


HERE = os.path.dirname(os.path.abspath(__file__))
MAILPROXY = os.path.join(HERE, "mailproxy.py")


# ========================================================================== #
# ####                           Test harness                           #### #
# ========================================================================== #
# What the sections below share, in this order: helpers for byte strings and
# transcripts; what the proxy and the fakes say; the test certificates; the
# configuration files the tests write; fake servers (one configurable fake
# backend per protocol reading through BackendWire, a scripted one, the
# auth_http server, a DNS server); the test's clients; the proxy under test,
# in a thread (ProxyUnderTest) or as the real program (ProgramUnderTest); and
# the bases of the test classes.  An end-to-end test reads as a transcript:
#
#     client.expect_line(mp.IMAP_GREETING)           # the next line, exactly
#     client.send("a1 LOGIN alice secret")           # a str gets its CRLF
#     client.expect(rb"^a1 OK")                      # the next line must match
#
# and then looks at what the backend received and what the proxy logged.

# -- helpers ------------------------------------------------------------------------

def server_settings(protocol: str = "imap", **overrides) -> mp.Settings:
    """A [server]'s merged settings: nginx's defaults plus ``overrides``."""
    values = {name: d.default for name, d in mp.DIRECTIVES.items()
              if "mail" in d.contexts or "server" in d.contexts}
    values.update(name="test", protocol=protocol, server_name="mail.test",
                  tls_context=None, backend_tls_context=None,
                  proxy_pass=mp.Upstream("127.0.0.1", 143, ((socket.AF_INET, ("127.0.0.1", 143)),)))
    values.update(overrides)
    return mp.Settings(values)


class FixedRandom:
    """Stands in for random.Random so that salts are known in advance."""

    def getrandbits(self, bits):
        return 12345


SALT = b"<12345.1700000000@mail.test>"     # make_salt with FixedRandom at NOW
NOW = 1700000000.0


def make_machine(protocol="imap", tls=False, **overrides):
    """A client machine for ``protocol`` with server_settings(**overrides),
    its salt made at NOW with FixedRandom (so it is SALT)."""
    settings = server_settings(protocol, **overrides)
    return mp.CLIENT_MACHINES[protocol](settings, now=NOW, randomness=FixedRandom(), tls=tls)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def run_exchanges(test, machine, exchanges, chunking):
    """Feed each exchange's bytes (split by ``chunking``); compare what the
    machine says and which events it returns, exchange by exchange."""
    for sent, expected_out, expected_events in exchanges:
        events = []
        out = b""
        for chunk in chunking(sent):
            events.extend(machine.receive_data(chunk))
            out += machine.data_to_send()
        test.assertEqual(out, expected_out, "reply to %r" % sent)
        test.assertEqual(events, expected_events, "events for %r" % sent)


def whole(data):
    return [data] if data else []


def byte_by_byte(data):
    return [data[i:i + 1] for i in range(len(data))]


def converse_three_ways(test, factory, exchanges, tail=b"x9 NOOP\r\n"):
    """The transcript run whole, one byte at a time, and with ``tail``
    pipelined behind the last command: the machine must then be waiting
    (after Credentials) or finished, and give the tail back untouched."""
    greeting = factory().data_to_send()
    for chunking in (whole, byte_by_byte):
        machine = factory()
        test.assertEqual(machine.data_to_send(), greeting)
        run_exchanges(test, machine, exchanges, chunking)
    machine = factory()
    machine.data_to_send()
    *first, (last_sent, last_out, last_events) = exchanges
    run_exchanges(test, machine, first + [(last_sent + tail, last_out, last_events)], whole)
    test.assertTrue(machine.waiting or machine.finished, "the transcript must end in a login or quit")
    if machine.waiting:
        test.assertEqual(machine.trailing_data, tail)
    else:                       # a close leaves the tail unread behind what it refused
        test.assertTrue(machine.trailing_data.endswith(tail))


def write_file(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as handle:
        handle.write(textwrap.dedent(text))
    return path


class TempDir:
    """A temporary directory that the test removes when it ends."""

    def __init__(self, test):
        self.holder = tempfile.TemporaryDirectory(prefix="mailproxy-test-")
        self.path = self.holder.name
        test.addCleanup(self.holder.cleanup)

    def write(self, name: str, text: str) -> str:
        return write_file(self.path, name, text)


MEGABYTE = 1024 * 1024


def free_port() -> int:
    """A loopback TCP port that nobody listens on (the kernel's pick, released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def message_bytes(size: int) -> bytes:
    """``size`` pseudo-random bytes, the same every run.  They never repeat in
    step with a buffer size, so a lost, doubled or swapped chunk changes the
    sha256 (a repeated pattern could hide it)."""
    return hashlib.shake_128(b"message of %d bytes" % size).digest(size)


def upload_bytes(size: int) -> bytes:
    """Like message_bytes, other bytes: what a client sends the other way."""
    return hashlib.shake_128(b"upload of %d bytes" % size).digest(size)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(condition, timeout: float = 3.0, what: str = "condition") -> None:
    """Poll ``condition()`` until it is true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(0.01)


def in_threads(*runs, timeout: float = 20.0) -> list:
    """Call each of ``runs`` in a thread of its own, all at once; their
    results, in order.  The first exception raised in one of them is
    raised here (after every thread has ended or ``timeout`` has passed)."""
    results, errors = [None] * len(runs), []

    def call(index: int) -> None:
        try:
            results[index] = runs[index]()
        except BaseException as error:       # the test's thread raises it
            errors.append(error)
    threads = [threading.Thread(target=call, args=(index,), daemon=True)
               for index in range(len(runs))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise AssertionError("%d of %d threads still running after %.0fs"
                             % (sum(thread.is_alive() for thread in threads), len(runs), timeout))
    return results


def gc_collect() -> None:
    """Collect twice: what the first collection frees may free more."""
    import gc
    gc.collect()
    gc.collect()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from a blocking ``sock`` (fewer if it closes first)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def heavy() -> bool:
    """The opt-in heavy cases are on (``--heavy``, or MAILPROXY_TEST_HEAVY=1):
    the sizes an issue names where the default suite takes a smaller one,
    because the full size costs seconds or more descriptors than a default
    RLIMIT_NOFILE of 1024 gives (a thousand connections take two thousand:
    both ends are in this process)."""
    return os.environ.get("MAILPROXY_TEST_HEAVY") == "1"


def cpu_seconds(run) -> float:
    """The CPU time of ``run()`` in this process, the least of three runs."""
    best = None
    for _ in range(3):
        started = time.process_time()
        run()
        spent = time.process_time() - started
        best = spent if best is None or spent < best else best
    return best


def feed_byte_by_byte(receive, data: bytes) -> list:
    """``receive`` called with each byte of ``data``; the results, joined."""
    results = []
    for index in range(len(data)):
        result = receive(data[index:index + 1])
        if isinstance(result, list):
            results.extend(result)
        elif result is not None:
            results.append(result)
    return results


HOSTILE_BYTES = [b"\r", b"\n", b"\0", b"\t", b" ", b'"', b"'", b"\\", b"+", b"=", b"%", b"{",
                 b"\x7f", b"\x80", b"\xff", "é".encode()]


# -- what the proxy says, and the fake backends -------------------------------------

# What the proxy says with the settings of proxy_config (server_name mail.test,
# the default methods); its other replies are mailproxy's own constants
# (mp.IMAP_GREETING, mp.SMTP_OK...), which the tests name.
IMAP_PROXY_CAPABILITY = b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\n"
SMTP_PROXY_GREETING = b"220 mail.test ESMTP ready\r\n"
SMTP_PROXY_EHLO = b"250-mail.test\r\n250 AUTH PLAIN LOGIN\r\n"
SMTP_XCLIENT_EHLO = b"250-mail.test\r\n250-XCLIENT ADDR PORT NAME\r\n250 AUTH PLAIN LOGIN\r\n"
PLAIN_ALICE = base64.b64encode(b"\0alice\0secret")           # AGFsaWNlAHNlY3JldA==

# How mailproxy logs alice in to an IMAP backend (nginx does the same): the
# client's own tag and synchronizing literals, each sent after the "+".
IMAP_LOGIN_ON_THE_WIRE = b"a1 LOGIN {5}\r\n" + b"alice {6}\r\n" + b"secret\r\n"
POP3_LOGIN_ON_THE_WIRE = b"USER alice\r\n" + b"PASS secret\r\n"

# smtplib's own spelling of MAIL and RCPT: "mail FROM:" until Python 3.12,
# "mail from:" from 3.13 on.  The proxy passes either on untouched.
SMTPLIB_MAIL_ALICE = (b"mail FROM:" if sys.version_info < (3, 13) else b"mail from:") + \
    b"<alice@example.com>\r\n"
SMTPLIB_RCPT_BOB = (b"rcpt TO:" if sys.version_info < (3, 13) else b"rcpt to:") + \
    b"<bob@example.com>\r\n"

# What the SMTP fake backend says: Postfix's words, marked so that a test can
# tell them from the proxy's.
SMTP_BACKEND_GREETING = b"220 backend.test ESMTP FakeFix\r\n"
SMTP_BACKEND_XCLIENT_GREETING = b"220 backend.test ESMTP FakeFix (after XCLIENT)\r\n"
SMTP_BACKEND_EHLO = (b"250-backend.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n"
                     b"250-8BITMIME\r\n250-XCLIENT ADDR LOGIN NAME\r\n"
                     b"250-AUTH PLAIN LOGIN\r\n250 CHUNKING\r\n")
SMTP_BACKEND_MAIL_OK = b"250 2.1.0 Ok (backend)\r\n"
SMTP_BACKEND_RCPT_OK = b"250 2.1.5 Ok (backend)\r\n"
SMTP_BACKEND_DATA_GO = b"354 End data with <CR><LF>.<CR><LF>\r\n"
SMTP_BACKEND_BYE = b"221 2.0.0 Bye (backend)\r\n"


def smtp_backend_rcpt_refused(address: bytes) -> bytes:
    return b"550 5.1.1 <%s>: Recipient address rejected: User unknown\r\n" % address


def smtp_backend_queued(number: int) -> bytes:
    return b"250 2.0.0 Ok: queued as FAKE%d\r\n" % number


def smtp_dotted_message(size: int) -> bytes:
    """About ``size`` bytes of CRLF lines, the same every run; about one line
    in three begins with "." (some are a lone "." or ".."); the first line is
    a lone "." and the last begins with "." and has no CRLF (smtplib adds it)."""
    rng = random.Random(2920)
    text = message_bytes(64 * 1024).hex().encode()
    lines = [b"."]
    total = 3
    while total < size:
        length = rng.randrange(0, 200)
        start = rng.randrange(0, len(text) - length)
        body = text[start:start + length]
        kind = rng.randrange(9)
        line = [b".", b"." + body, b".." + body, b"", b" ." + body, b"...",
                body, body, body][kind]
        lines.append(line)
        total += len(line) + 2
    lines.append(b".last line")
    return b"\r\n".join(lines)


def smtp_dot_stuffed(message: bytes) -> bytes:
    """What RFC 5321 §4.5.2 puts on the wire for ``message`` (CRLF lines):
    a "." doubled at the start of each line, CRLF at the end, then ".\\r\\n"."""
    lines = message.split(b"\r\n")
    stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def smtp_xclient(login: bytes = b"alice", name: bytes = b"[UNAVAILABLE]") -> bytes:
    """The XCLIENT line the proxy sends for a client on 127.0.0.1."""
    return b"XCLIENT ADDR=127.0.0.1" + (b" LOGIN=" + login if login else b"") + \
        b" NAME=" + name + b"\r\n"


# -- test certificates (PEM) --------------------------------------------------------

# The standard library cannot make certificates, so these are embedded:
# EC P-256, made with openssl for these tests, valid until 2126 (but the
# expired one).  A test CA; a server certificate for mail.example.com,
# mail.example.org, localhost and 127.0.0.1; another for mail.example.net
# (SNI); alice's client certificate; one from another CA; an expired one;
# a revoked one and the CA's CRL that revokes it.

TLS_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBoDCCAUWgAwIBAgIUSjSNdxYeOVyZDhLMbib5xTm7+9cwCgYIKoZIzj0EAwIw
HDEaMBgGA1UEAwwRbWFpbHByb3h5IHRlc3QgQ0EwIBcNMjYxMTIwMjMyOTEwWhgP
MjEyNjEwMjcyMzI5MTBaMBwxGjAYBgNVBAMMEW1haWxwcm94eSB0ZXN0IENBMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83rIOnPUjNfBjC5TiVl8HbZ0qVKuzEsG
NaulqCums5EfUmq5jEvfgDE2dQ83OzIXnzSvBq2uNoE79+DDTkSyfqNjMGEwHQYD
VR0OBBYEFCr8p3sHDW+Am5g2/g9GkQg6Z1NaMB8GA1UdIwQYMBaAFCr8p3sHDW+A
m5g2/g9GkQg6Z1NaMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEGMAoG
CCqGSM49BAMCA0kAMEYCIQCbJMcjcPmr1+zETzDH3HChMcVzlO1TYENJncAfLGn2
vwIhALp+VvblJM+mDTLp/PJPqQsK8Ds8L/DiYPM3aySZU0TP
-----END CERTIFICATE-----
"""


TLS_SERVER_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIB4DCCAYagAwIBAgIIAixD3YwwurQwCgYIKoZIzj0EAwIwHDEaMBgGA1UEAwwR
bWFpbHByb3h5IHRlc3QgQ0EwIBcNMjYxMTIwMjMyOTEwWhgPMjEyNjEwMjcyMzI5
MTBaMBsxGTAXBgNVBAMMEG1haWwuZXhhbXBsZS5jb20wWTATBgcqhkjOPQIBBggq
hkjOPQMBBwNCAARGlI6UUKucRR97zzxIqxcT+UeV2NjcgVDKhr9PVYmQGCAaiH8x
H96FAit/PoK/KtkFV8bQYwWXLuVEVrmjfjmeo4GwMIGtMAkGA1UdEwQCMAAwCwYD
VR0PBAQDAgeAMBMGA1UdJQQMMAoGCCsGAQUFBwMBMD4GA1UdEQQ3MDWCEG1haWwu
ZXhhbXBsZS5jb22CEG1haWwuZXhhbXBsZS5vcmeCCWxvY2FsaG9zdIcEfwAAATAd
BgNVHQ4EFgQUnNt2C6gVWcKPUTqwuSCc5wgCfiUwHwYDVR0jBBgwFoAUKvynewcN
b4CbmDb+D0aRCDpnU1owCgYIKoZIzj0EAwIDSAAwRQIgY01TebbH3+moo88BTej2
nY8BP3eHzTKsTt3ClXgZlA8CIQCU2SCnwJJHP2y4ftfxQYTjDFwfogWhOyzl+XHY
PbIbow==
-----END CERTIFICATE-----
"""

TLS_SERVER_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg/nMCXysfwFesUtLR
z+CA2g+FFcS+5YNHmXx81VQK9mqhRANCAARGlI6UUKucRR97zzxIqxcT+UeV2Njc
gVDKhr9PVYmQGCAaiH8xH96FAit/PoK/KtkFV8bQYwWXLuVEVrmjfjme
-----END PRIVATE KEY-----
"""

TLS_OTHER_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBvTCCAWOgAwIBAgIIWZH14Spjo1QwCgYIKoZIzj0EAwIwHDEaMBgGA1UEAwwR
bWFpbHByb3h5IHRlc3QgQ0EwIBcNMjYxMTIwMjMyOTExWhgPMjEyNjEwMjcyMzI5
MTFaMBsxGTAXBgNVBAMMEG1haWwuZXhhbXBsZS5uZXQwWTATBgcqhkjOPQIBBggq
hkjOPQMBBwNCAAR282E/GcgA+J6/cii3bXlHZJLS7ZRDhjV50H7dMeW4LY1uMS6w
Gqp6LLVC/5UK/VsliGX8a/Iv+nqspNcUB8CDo4GNMIGKMAkGA1UdEwQCMAAwCwYD
VR0PBAQDAgeAMBMGA1UdJQQMMAoGCCsGAQUFBwMBMBsGA1UdEQQUMBKCEG1haWwu
ZXhhbXBsZS5uZXQwHQYDVR0OBBYEFNXGvzvYeJ1cRPk/BGVPqOlUQOYZMB8GA1Ud
IwQYMBaAFCr8p3sHDW+Am5g2/g9GkQg6Z1NaMAoGCCqGSM49BAMCA0gAMEUCIA20
4vmHOcOhT7IiCw94rMugTgFQo8yPVIP4BcNetmqiAiEA68RR6BLs9GGt/QizgYap
sBKRDWlMTeVtZlFaQqDNMD8=
-----END CERTIFICATE-----
"""

TLS_OTHER_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgCGFanVnfeSahxO/K
NtfwB+4MsWlYH70vbabwPjLBcMahRANCAAR282E/GcgA+J6/cii3bXlHZJLS7ZRD
hjV50H7dMeW4LY1uMS6wGqp6LLVC/5UK/VsliGX8a/Iv+nqspNcUB8CD
-----END PRIVATE KEY-----
"""

TLS_CLIENT_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIB1TCCAXygAwIBAgIJAJPxCJeJTzUiMAoGCCqGSM49BAMCMBwxGjAYBgNVBAMM
EW1haWxwcm94eSB0ZXN0IENBMCAXDTI2MTEyMDIzMjkxMVoYDzIxMjYxMDI3MjMy
OTExWjAyMQ4wDAYDVQQDDAVhbGljZTEgMB4GCSqGSIb3DQEJARYRYWxpY2VAZXhh
bXBsZS5jb20wWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATjJCaHa94DwlJfe+PP
M7HJ7ck7IyMOsPRPqhECOCBX3lRf6x6J1cR0lVSEkt6ShMPt8B4cmxb3Wheb5qQe
z96uo4GOMIGLMAkGA1UdEwQCMAAwCwYDVR0PBAQDAgeAMBMGA1UdJQQMMAoGCCsG
AQUFBwMCMBwGA1UdEQQVMBOBEWFsaWNlQGV4YW1wbGUuY29tMB0GA1UdDgQWBBSr
+VpcQgprOiIVAAd6bUFJ1rMbnDAfBgNVHSMEGDAWgBQq/Kd7Bw1vgJuYNv4PRpEI
OmdTWjAKBggqhkjOPQQDAgNHADBEAiAPBVH+KsV2IbtKdKK8DxYPH3MVIPTXlmMJ
T79H8c6MEwIgDjbbv7TBozlll+tBO7EfKMlxYKwHOCO8fT8q0skzNbc=
-----END CERTIFICATE-----
"""

TLS_CLIENT_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgeMtGqX4EsMTSef6a
VDEV5PxNGxMkhnEHnV9HdYeH3t6hRANCAATjJCaHa94DwlJfe+PPM7HJ7ck7IyMO
sPRPqhECOCBX3lRf6x6J1cR0lVSEkt6ShMPt8B4cmxb3Wheb5qQez96u
-----END PRIVATE KEY-----
"""

TLS_WRONG_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBlzCCAT2gAwIBAgIUKLCQ24CJR5ny0rUtBfio7n7w0icwCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNc29tZSBvdGhlciBDQTAgFw0yNjExMjAyMzI5MTBaGA8yMTI2
MTAyNzIzMjkxMFowGDEWMBQGA1UEAwwNc29tZSBvdGhlciBDQTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABCMVoU75/cV0BHpXxUTK5UP+kAa3e589vDPs318v/26Y
k8OBLSH19IwNIkiNQNWBXjo98k+e04BFsSn7DlHAT46jYzBhMB0GA1UdDgQWBBT7
7QIZlle5mwtszRzNgS2BlYxgETAfBgNVHSMEGDAWgBT77QIZlle5mwtszRzNgS2B
lYxgETAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAKBggqhkjOPQQD
AgNIADBFAiBLxbK+G6dwba/QQ06n4c3qcElHD6gQBn6fy732KlgZHwIhAPG8RGqy
9jwrlLdOyTE1H8Axcx1jQFMU/fpZQ/S2RTWQ
-----END CERTIFICATE-----
"""

TLS_WRONG_CLIENT_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBrzCCAVagAwIBAgIJAIzuQCxNEtXcMAoGCCqGSM49BAMCMBgxFjAUBgNVBAMM
DXNvbWUgb3RoZXIgQ0EwIBcNMjYxMTIwMjMyOTExWhgPMjEyNjEwMjcyMzI5MTFa
MBAxDjAMBgNVBAMMBWFsaWNlMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAELQqQ
Cyft3IkEPfXmlruxSaTq1FDerE9m9OxdIlL76jvLbq5FKcwZmlxkDgSmri69w3DR
n8euzHP/+x11+x3x46OBjjCBizAJBgNVHRMEAjAAMAsGA1UdDwQEAwIHgDATBgNV
HSUEDDAKBggrBgEFBQcDAjAcBgNVHREEFTATgRFhbGljZUBleGFtcGxlLmNvbTAd
BgNVHQ4EFgQUbadnso/ZWfAZYouSMp5+oiVVTzUwHwYDVR0jBBgwFoAU++0CGZZX
uZsLbM0czYEtgZWMYBEwCgYIKoZIzj0EAwIDRwAwRAIgOC1iN69BKy79083LMH25
Zf0aYzVrbBw/o9a09IsmXUECIBG+G19ep69rzeVYoH8+r0Et+bU/xLEjDsQEWIW6
6xan
-----END CERTIFICATE-----
"""

TLS_WRONG_CLIENT_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgr6ynGUl8eylpVilF
GJlMmF6OMejrLBGAcykCDX625gKhRANCAAQtCpALJ+3ciQQ99eaWu7FJpOrUUN6s
T2b07F0iUvvqO8turkUpzBmaXGQOBKauLr3DcNGfx67Mc//7HXX7HfHj
-----END PRIVATE KEY-----
"""

TLS_EXPIRED_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBpjCCAUygAwIBAgICEAAwCgYIKoZIzj0EAwIwHDEaMBgGA1UEAwwRbWFpbHBy
b3h5IHRlc3QgQ0EwHhcNMjAwMTAxMDAwMDAwWhcNMjEwMTAxMDAwMDAwWjAQMQ4w
DAYDVQQDDAVhbGljZTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABIWiqLSHiwt2
adlW3T/QpdWz0DnEgscb4T0KP3PKwIHW4txfDVCAal9g059G4uvtL0XTCUaEcNbE
1FV3jNID+c2jgYkwgYYwCQYDVR0TBAIwADAdBgNVHSUEFjAUBggrBgEFBQcDAgYI
KwYBBQUHAwEwGgYDVR0RBBMwEYIJbG9jYWxob3N0hwR/AAABMB0GA1UdDgQWBBTH
NdiEB2YZFWFp5v9weaJMXEKGPDAfBgNVHSMEGDAWgBQq/Kd7Bw1vgJuYNv4PRpEI
OmdTWjAKBggqhkjOPQQDAgNIADBFAiEAsr+RhRE+pJn6k5ReF/mIsy3NqQU7xNg0
9uvlMAhHbUMCICpJ8NLn32C12VWI7aTCMlHgOFTH7im0FG3iWNgQ2s1s
-----END CERTIFICATE-----
"""

TLS_EXPIRED_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgTHcY41sWzMC5uKJt
EpAmeaWznwYLt1MC4NxRlNeKzh2hRANCAASFoqi0h4sLdmnZVt0/0KXVs9A5xILH
G+E9Cj9zysCB1uLcXw1QgGpfYNOfRuLr7S9F0wlGhHDWxNRVd4zSA/nN
-----END PRIVATE KEY-----
"""

TLS_REVOKED_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBgjCCASigAwIBAgICEAEwCgYIKoZIzj0EAwIwHDEaMBgGA1UEAwwRbWFpbHBy
b3h5IHRlc3QgQ0EwIBcNMjYxMTIwMjMyOTE1WhgPMjEyNjEwMjcyMzI5MTVaMBIx
EDAOBgNVBAMMB21hbGxvcnkwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAARwWG8y
CadgCEJjmZPN7nb3OtShQTBepViBHPlPXnnlTHpRTrNt+OPcOn++sOEEwvg2uaiC
+zPsC/5h3SAgahWIo2IwYDAJBgNVHRMEAjAAMBMGA1UdJQQMMAoGCCsGAQUFBwMC
MB0GA1UdDgQWBBTU7Ls2a7e2BDog/sk6FLkW9ij5+TAfBgNVHSMEGDAWgBQq/Kd7
Bw1vgJuYNv4PRpEIOmdTWjAKBggqhkjOPQQDAgNIADBFAiAv2DVTuYh1UdIHPZqx
JJZLtXrSqPqxTHxtRQIkcWfi2QIhAM92S01+305+jOEIYB/0x4bvJUsgddmT4Efi
uoAqYk1C
-----END CERTIFICATE-----
"""

TLS_REVOKED_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgdrDK8bAYWtDm3ffU
0cqOZJgjFJlmw2dV+10FD3KIsFShRANCAARwWG8yCadgCEJjmZPN7nb3OtShQTBe
pViBHPlPXnnlTHpRTrNt+OPcOn++sOEEwvg2uaiC+zPsC/5h3SAgahWI
-----END PRIVATE KEY-----
"""

TLS_CRL_PEM = """\
-----BEGIN X509 CRL-----
MIG5MGEwCgYIKoZIzj0EAwIwHDEaMBgGA1UEAwwRbWFpbHByb3h5IHRlc3QgQ0EX
DTI2MTEyMDIzMjkxNVoYDzIxMjYxMDI3MjMyOTE1WjAVMBMCAhABFw0yNjExMjAy
MzI5MTVaMAoGCCqGSM49BAMCA0gAMEUCIQCFHc55oK87oWb1+HWf7XInSS5IjuwD
wmzp2HcFRPnu0gIgW6CGnjL4KtetkucjgZl+1d8spBevTg0rwMMqba5pNwc=
-----END X509 CRL-----
"""


# An RSA server certificate beside the EC one (nginx's RSA + ECDSA pair),
# self-signed (the test CA's key is not kept), for mail.example.com,
# mail.example.org, localhost and 127.0.0.1, valid until 2126:
# openssl req -x509 -newkey rsa:2048 -nodes -days 36500 -subj /CN=mail.example.com
# -addext subjectAltName=DNS:mail.example.com,DNS:mail.example.org,DNS:localhost,IP:127.0.0.1.
# And RFC 7919's ffdhe2048 group for ssl_dhparam
# (openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048).

TLS_RSA_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIDWzCCAkOgAwIBAgIUAlg7Btrnty0M2gllOj5IdwXKP9QwDQYJKoZIhvcNAQEL
BQAwGzEZMBcGA1UEAwwQbWFpbC5leGFtcGxlLmNvbTAgFw0yNjEyMDYwOTAwMTJa
GA8yMTI2MTExMjA5MDAxMlowGzEZMBcGA1UEAwwQbWFpbC5leGFtcGxlLmNvbTCC
ASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEBAIj4SUUzyIGZV74w513Iqru1
8GSvi+nbAR+V0r969vbQ2TFd4f7SDg5x2cNSTn6N5TT8QkBDU/oKgB6v57PQzZPq
b541WetzjBkkzUvxGemZ/URsYUxk/0CrfHqrjwKVEdkCbZ2MBHMbcgb+3HAy2py8
xnHSiaOnBhSNqwnNgmVv9Oh7q3LUcqXbLVCVZhIRJAxzrYZxSxFxMPoDU77PFYvC
nU0RN1W6qNICnR98siDxwF1ixkUoANBKoqYTrexetF1dk7FIzCj3SIIogbnV/LUE
r1z1Y9RKpDNF99briLlwQycWlJlntzGSZ8avd1BkYGYWLad5y7F84EpmKHKISG8C
AwEAAaOBlDCBkTAdBgNVHQ4EFgQU6LCPD+ggRXht5tgRMznQKhNr1hEwHwYDVR0j
BBgwFoAU6LCPD+ggRXht5tgRMznQKhNr1hEwDwYDVR0TAQH/BAUwAwEB/zA+BgNV
HREENzA1ghBtYWlsLmV4YW1wbGUuY29tghBtYWlsLmV4YW1wbGUub3Jngglsb2Nh
bGhvc3SHBH8AAAEwDQYJKoZIhvcNAQELBQADggEBAARGkRkf2hdHOwf7cgO7wi0E
V7t+HXfJCr7YcOuKFzc4yCQJL3RSQ4p3Uf8wqyPAkNxWeGbcR1VUIW3R5R5uwp5A
rYp1IolBk9pMvIxSgUZlVWpKUoa0Fiuvb9nfQAR4eMjggTm29nxYWk8h0nJcr5cW
RYfYRLL/a3JbvsaPAImfSZ0ds+EVHkh4Md6aN7h99amyXl0PE7eSktft7a16KEJx
hUevJskbGQbetIemo9c8YRjYWXB/yvUUPN5Y2LXxEFBxFg9/oYYT5596hqGrv7oD
PRCMyvuaUm6r8MG16Xa36EjGouMzT9beb6CHYS1ceN5IZpkSOOLJ5ZtEtVf7sY4=
-----END CERTIFICATE-----
"""

TLS_RSA_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCI+ElFM8iBmVe+
MOddyKq7tfBkr4vp2wEfldK/evb20NkxXeH+0g4OcdnDUk5+jeU0/EJAQ1P6CoAe
r+ez0M2T6m+eNVnrc4wZJM1L8Rnpmf1EbGFMZP9Aq3x6q48ClRHZAm2djARzG3IG
/txwMtqcvMZx0omjpwYUjasJzYJlb/Toe6ty1HKl2y1QlWYSESQMc62GcUsRcTD6
A1O+zxWLwp1NETdVuqjSAp0ffLIg8cBdYsZFKADQSqKmE63sXrRdXZOxSMwo90iC
KIG51fy1BK9c9WPUSqQzRffW64i5cEMnFpSZZ7cxkmfGr3dQZGBmFi2necuxfOBK
ZihyiEhvAgMBAAECggEAJnUYFX8ZoBHPCg6vF6z9CyFlcs+7SBj+ssCdYLgE2X4A
TZUfnC2cVr/utaHJek0a+wqNC4Ab9wu1t2gKdXl+Dzb2ygQO0EYsIu8rWVRDw0xC
SVDo7Ms6xAyiMcszpzT1wumkn2St5yfgl0g92p7ctL9oNJM5pCKEWYcBbAowv4wL
lHwY4wugwjyFJbVDPWw1W1jQMaduWu+I0HTmafI+X6LNXT3RYyHSNUC/ts6TXIpw
JqZtlcMvdcUm77xSzpbiOpdJ3aIHGCYFgMq9bvSZMuFdJRCPWHTxjCKFG2AwA3f4
MqIjKuhb4ZtO22UzjaUVc3kP51tlBjFwSfnlIkndkQKBgQDAqA8UfJhe4OlA8QiV
l3vGJbRxTrKL7lgxWCzlq1Bah9ikl4S0i8nAP4bTqc0fqkVOT7PK0QN7gtw1HEz+
4MJbkrEtCW1Rb0vxlzOO+NwzEbHIJNVJuDvF4Yf5xPI5/vC0ygS79Fdy/f2YqCtu
XtPhIFElHsZyCMhGkq0cvMOzRwKBgQC2ARJ18i3VcbQz/ZLzTkCvjwqlbgzLX/OX
htLtByVMQuDmlLMNl6i9n7qIJc+1CLMkQTTifg0orNHEBL5CYLBMsf/wHDUQfRRl
Y6DtxwbyT5P06ri2za+nFiCHouhwv7OiaqvYGgC+RLRlvN1WsAdZNvW4miDneQH5
US/Mq8BFmQKBgEi2ZVKnH98XZhHTpxjGnrmPe4YUXMEBiRm+nNtmCCLTCMo+QaDe
7Zt4not+l+OuoQ/IdyRCNN1F65TEBK9h5xkmyWYlG7RTnEcneRcqB/niYMYYWMPF
HBI4Z9i2I3IOLY0efiDuPJ8zC6a1OgcjFTbvupCXB/D8LZKtQ1cIS5h7AoGBAKRT
63saok9pTi7y8E9FhBn+qLoc1uh5RdK2JJNmNELaz3zhHZlUKUKsiRqMKTFnHXfK
eBlXfkIPZ4X4UmBUNFnLDS6aCT9N77Brd824OYlmWEx18Tj8FXBjBhPw/rVuIJ6w
eV+weqNQHSEOmTm/zaK7gLigUL0uAJ4+s020dPFhAoGBAK0mwhzIHgVLIixABpTO
WNhVwSPw1wLjNpEU4bXDRzY0ornUwGRZqgRPOvdjZzlWszbMqBD4F/zHvG5tLzc+
lW1yrQyZLBhuXWrF417VEbSOJ3zppGqtGvc1S0LJTr2NlNA/LXrAZ9/28RoO9BjN
oWLRmHE/sOQ1W87Vr286f+y8
-----END PRIVATE KEY-----
"""

TLS_DHPARAM_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


TLS_FILES = {"ca.crt": TLS_CA_PEM, "server.crt": TLS_SERVER_CERT_PEM, "server.key": TLS_SERVER_KEY_PEM,
             "other.crt": TLS_OTHER_CERT_PEM, "other.key": TLS_OTHER_KEY_PEM,
             "client.crt": TLS_CLIENT_CERT_PEM, "client.key": TLS_CLIENT_KEY_PEM,
             "wrongca.crt": TLS_WRONG_CA_PEM, "wrongclient.crt": TLS_WRONG_CLIENT_CERT_PEM,
             "wrongclient.key": TLS_WRONG_CLIENT_KEY_PEM, "expired.crt": TLS_EXPIRED_CERT_PEM,
             "expired.key": TLS_EXPIRED_KEY_PEM, "revoked.crt": TLS_REVOKED_CERT_PEM,
             "revoked.key": TLS_REVOKED_KEY_PEM, "ca.crl": TLS_CRL_PEM,
             "rsa.crt": TLS_RSA_CERT_PEM, "rsa.key": TLS_RSA_KEY_PEM, "dhparam.pem": TLS_DHPARAM_PEM,
             "both.crt": TLS_CA_PEM + TLS_RSA_CERT_PEM}


# Certificates no `openssl req -subj` can write, made for these tests by a CA
# of their own (whose key is not kept): TBSCertificates assembled byte by
# byte, signed with `openssl dgst`, EC P-256, valid 2026-2126.  Their names:
# "descriptor": CN=alice as an ObjectDescriptor (tag 7), which OpenSSL
# verifies and nginx prints (CN=#0705616C696365) but getpeercert() cannot
# read; "crlf": O=Example<CR><LF>Auth-SSL-Verify: SUCCESS and
# CN=alice<CR><LF>Auth-SSL-Subject: CN=admin (UTF8String); "kelvin":
# CN=<U+212A KELVIN SIGN>arl.  Serials 1001, 1002, 1003.

ODD_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBojCCAUegAwIBAgICEAAwCgYIKoZIzj0EAwIwJjEkMCIGA1UEAwwbbWFpbHBy
b3h5IG9kZC1uYW1lcyB0ZXN0IENBMCAXDTI2MDEwMTAwMDAwMFoYDzIxMjYxMDI3
MDAwMDAwWjAmMSQwIgYDVQQDDBttYWlscHJveHkgb2RkLW5hbWVzIHRlc3QgQ0Ew
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATBq2EI05EWMXk1r9kICF6R0oEJg++8
BUfKNXjrsQCpQOEu76JgnLAZZ1BkkpiZqZjqoNJWrBViHl35/lCSaYDFo2MwYTAP
BgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBBjAdBgNVHQ4EFgQUT8InAKF2
Rld3s9VSlGE34L5gR54wHwYDVR0jBBgwFoAUT8InAKF2Rld3s9VSlGE34L5gR54w
CgYIKoZIzj0EAwIDSQAwRgIhAMl3xKOnvVD+b9vmO26vapv1xeDOToWKlwgqchRl
MV03AiEA3PwYLD8ERipyRIOMJg9f1J1oEfciEARvPcv1Nt7PJEk=
-----END CERTIFICATE-----
"""

ODD_DESCRIPTOR_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBmjCCAUCgAwIBAgICEAEwCgYIKoZIzj0EAwIwJjEkMCIGA1UEAwwbbWFpbHBy
b3h5IG9kZC1uYW1lcyB0ZXN0IENBMCAXDTI2MDEwMTAwMDAwMFoYDzIxMjYxMDI3
MDAwMDAwWjAQMQ4wDAYDVQQDBwVhbGljZTBZMBMGByqGSM49AgEGCCqGSM49AwEH
A0IABIPMgQTgzb7xNP9MWQ5WXWG4pG+c1iFTm3Asp9xQQYUwn2/Rq/brqwF0j2nf
jGZ12wy8Zq77Suy3Fox9XL/gFpKjcjBwMAkGA1UdEwQCMAAwDgYDVR0PAQH/BAQD
AgeAMBMGA1UdJQQMMAoGCCsGAQUFBwMCMB0GA1UdDgQWBBTL7t5K4p/BI7d8VkOY
ZuiasLPbJDAfBgNVHSMEGDAWgBRPwicAoXZGV3ez1VKUYTfgvmBHnjAKBggqhkjO
PQQDAgNIADBFAiEAoIXEx5wJRd9jH+6TanDiFP5KHS5D8Yfy9cUW5Hf8nxcCIBkp
pxD5pG8hMYgbZWQnOIF7FY3lDi62ZXC8WcJo0gtl
-----END CERTIFICATE-----
"""

ODD_DESCRIPTOR_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQglw2GRyvEQp8H2gLi
dCURbkCKLLrXWhPOCE/iGoOwzt2hRANCAASDzIEE4M2+8TT/TFkOVl1huKRvnNYh
U5twLKfcUEGFMJ9v0av266sBdI9p34xmddsMvGau+0rstxaMfVy/4BaS
-----END PRIVATE KEY-----
"""

ODD_CRLF_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIB4jCCAYigAwIBAgICEAIwCgYIKoZIzj0EAwIwJjEkMCIGA1UEAwwbbWFpbHBy
b3h5IG9kZC1uYW1lcyB0ZXN0IENBMCAXDTI2MDEwMTAwMDAwMFoYDzIxMjYxMDI3
MDAwMDAwWjBYMSowKAYDVQQKDCFFeGFtcGxlDQpBdXRoLVNTTC1WZXJpZnk6IFNV
Q0NFU1MxKjAoBgNVBAMMIWFsaWNlDQpBdXRoLVNTTC1TdWJqZWN0OiBDTj1hZG1p
bjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABCIExLQ8Scspzkg8OhQWaseBJwNZ
5kYEz235GJrMFwbY+yjk66iuCSMVG9HdngBLxDBEdDG1ou1DQodkD4P5vnOjcjBw
MAkGA1UdEwQCMAAwDgYDVR0PAQH/BAQDAgeAMBMGA1UdJQQMMAoGCCsGAQUFBwMC
MB0GA1UdDgQWBBRqp2ugJ7W/VO6wfBn9noYAvrkDMzAfBgNVHSMEGDAWgBRPwicA
oXZGV3ez1VKUYTfgvmBHnjAKBggqhkjOPQQDAgNIADBFAiAHJz/2yUr0Jgo7XB6D
7uLe2qF0/Nm5rTGyIucxugoZTgIhAJjK+8GHUs9abUTE0X2+q7NDRBKulfg7JxN9
7XxvOnL9
-----END CERTIFICATE-----
"""

ODD_CRLF_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgpD+V88AFHJzeToXg
gyF6HqlwM39JQKiCV998sAhXGlehRANCAAQiBMS0PEnLKc5IPDoUFmrHgScDWeZG
BM9t+RiazBcG2Pso5OuorgkjFRvR3Z4AS8QwRHQxtaLtQ0KHZA+D+b5z
-----END PRIVATE KEY-----
"""

ODD_KELVIN_CERT_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBmjCCAUGgAwIBAgICEAMwCgYIKoZIzj0EAwIwJjEkMCIGA1UEAwwbbWFpbHBy
b3h5IG9kZC1uYW1lcyB0ZXN0IENBMCAXDTI2MDEwMTAwMDAwMFoYDzIxMjYxMDI3
MDAwMDAwWjARMQ8wDQYDVQQDDAbihKphcmwwWTATBgcqhkjOPQIBBggqhkjOPQMB
BwNCAARx2ybsTKIjRrYQ+MdyCGQyC3e7DubS5PiuKfcxGBB5aXqzthX9mkxiphks
bqhXAwynbB4eOXS9IqbAFNQzzWlPo3IwcDAJBgNVHRMEAjAAMA4GA1UdDwEB/wQE
AwIHgDATBgNVHSUEDDAKBggrBgEFBQcDAjAdBgNVHQ4EFgQUSrp0eIEFezdYznUj
61HXRE7Z/B8wHwYDVR0jBBgwFoAUT8InAKF2Rld3s9VSlGE34L5gR54wCgYIKoZI
zj0EAwIDRwAwRAIgc3PAgGAL2hTSDEeKirTySAj3uXvTrw+Ilj6KkegJ42ACIG6/
RiOR13tqAKFd/P1sDiY61BPKYpYv8i7OvZQ3rv3q
-----END CERTIFICATE-----
"""

ODD_KELVIN_KEY_PEM = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgTPw544mQ8JVyZi3t
d7z3fJHYaJKvSLr+FSSfFZvUlcahRANCAARx2ybsTKIjRrYQ+MdyCGQyC3e7DubS
5PiuKfcxGBB5aXqzthX9mkxiphksbqhXAwynbB4eOXS9IqbAFNQzzWlP
-----END PRIVATE KEY-----
"""

# server.key encrypted (openssl pkcs8 -topk8 -v2 aes-128-cbc), pass phrase "pass-phrase".
TLS_SERVER_ENCRYPTED_KEY_PEM = """\
-----BEGIN ENCRYPTED PRIVATE KEY-----
MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAizWnbET5ps9QICCAAw
DAYIKoZIhvcNAgkFADAdBglghkgBZQMEAQIEELi3B5osBPC63tkajhlYN38EgZCR
LmIC2QdhGBFwdYJF4K3ygYrUNTiGvAJoXadBwRKf3Lcc4lAWre2WV4NtDQfv5bDU
/j6Y3uRcv0BQaXqm1R3APBvon7SsWgLUk8u3UtSrvWTbCiSRgRmHHES8UCwCTw1E
LBg2fniYjIZU3/bnildd66kNiRd8GO4rLrhdOWZsamvMk+CeKB+ecLfUeZ+M5F8=
-----END ENCRYPTED PRIVATE KEY-----
"""

ODD_TLS_FILES = {"oddca.crt": ODD_CA_PEM, "descriptor.crt": ODD_DESCRIPTOR_CERT_PEM,
                 "descriptor.key": ODD_DESCRIPTOR_KEY_PEM, "crlf.crt": ODD_CRLF_CERT_PEM,
                 "crlf.key": ODD_CRLF_KEY_PEM, "kelvin.crt": ODD_KELVIN_CERT_PEM,
                 "kelvin.key": ODD_KELVIN_KEY_PEM, "bothca.crt": TLS_CA_PEM + ODD_CA_PEM,
                 "encrypted.key": TLS_SERVER_ENCRYPTED_KEY_PEM}


def write_tls_files(directory: str) -> None:
    """The test certificates as files (TLS_FILES and ODD_TLS_FILES), for
    configurations and contexts."""
    for name, text in list(TLS_FILES.items()) + list(ODD_TLS_FILES.items()):
        with open(os.path.join(directory, name), "w") as handle:
            handle.write(text)


def memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext,
                     session: Optional[ssl.SSLSession] = None) -> ssl.SSLObject:
    """A client's handshake with a server context, in memory; the client's
    SSLObject once it has read what the server sent after (a TLS 1.3 ticket)."""
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    tls_server = server.wrap_bio(server_in, server_out, server_side=True)
    tls_client = client.wrap_bio(client_in, client_out, server_hostname="localhost", session=session)
    for _ in range(6):
        for side in (tls_client, tls_server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    try:
        tls_client.read(1)
    except ssl.SSLWantReadError:
        pass
    return tls_client


class CertificateFiles:
    """A test class's copy of the test certificates (write_tls_files) in a
    temporary directory, made once per class when a test first asks for it,
    and what tests make of them: paths, server settings, client contexts, a
    fake backend's context."""

    tls_directory = None               # a TemporaryDirectory, once made

    @classmethod
    def tearDownClass(cls):
        if cls.tls_directory is not None:
            cls.tls_directory.cleanup()
            cls.tls_directory = None
        super().tearDownClass()

    def tls_dir(self) -> str:
        """The directory of the certificates (made now if need be)."""
        cls = type(self)
        if cls.tls_directory is None:
            cls.tls_directory = tempfile.TemporaryDirectory(prefix="mailproxy-tls-")
            write_tls_files(cls.tls_directory.name)
        return cls.tls_directory.name

    def tls_path(self, name: str) -> str:
        return os.path.join(self.tls_dir(), name)

    def tls_settings(self, protocol="imap", **overrides) -> mp.Settings:
        """server_settings with the server certificate (mail.example.com)."""
        values = dict(ssl_certificate=[self.tls_path("server.crt")],
                      ssl_certificate_key=[self.tls_path("server.key")])
        values.update(overrides)
        return server_settings(protocol, **values)

    def client_context(self, certificate: str = "", alpn=None, ca: str = "ca.crt") -> ssl.SSLContext:
        """A client's context that trusts ``ca``, sends ``certificate`` (a
        name: its .crt and .key files) if one is named and offers ``alpn``."""
        context = ssl.create_default_context(cafile=self.tls_path(ca))
        if certificate:
            context.load_cert_chain(self.tls_path(certificate + ".crt"),
                                    self.tls_path(certificate + ".key"))
        if alpn:
            context.set_alpn_protocols(alpn)
        return context

    def backend_server_context(self, name: str = "server") -> ssl.SSLContext:
        """A fake backend's server context, with the certificate ``name``."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls_path(name + ".crt"), self.tls_path(name + ".key"))
        return context


# -- configuration files ------------------------------------------------------------

def proxy_config(protocol: str, backend_port: Optional[int] = None, auth_port=None,
                 listens=("",), users=None, **mail) -> str:
    """The INI text of a proxy with one [server] for ``protocol``, one listen
    on a free loopback port per entry of ``listens`` (the listen's flags:
    "", "ssl", "proxy_protocol"...).  With ``backend_port`` it passes to
    127.0.0.1:backend_port and checks logins against [users] (``users``; by
    default alice, password "secret"); with ``auth_port`` it asks the fake
    auth server there (a str is the auth_http URL itself) and sends this
    file's two auth_http_header lines, and has no [users].  ``mail`` adds or
    overrides [mail] directives (None leaves one out; a value may hold
    continuation lines): proxy_config("imap", port, timeout="1s")."""
    directives = {"server_name": "mail.test", "timeout": "5s", "auth_delay": "200ms"}
    if auth_port is not None:
        directives["auth_http"] = (auth_port if isinstance(auth_port, str) else
                                   "http://127.0.0.1:%d/auth" % auth_port)
        directives["auth_http_header"] = 'X-Auth-Key secret-key\n    X-Second "two words"'
        directives["auth_http_timeout"] = "3s"
    directives.update(mail)
    lines = ["[main]", "worker_connections = 1024", "", "[mail]"]
    lines += ["%s = %s" % item for item in directives.items() if item[1] is not None]
    listen = ["127.0.0.1:%d%s" % (free_port(), " " + flags if flags else "") for flags in listens]
    lines += ["", "[server %s]" % protocol, "listen = " + "\n    ".join(listen),
              "protocol = %s" % protocol]
    if backend_port is not None:
        lines.append("proxy_pass = 127.0.0.1:%d" % backend_port)
    if auth_port is None:
        lines += ["", "[users]"]
        lines += ["%s = %s" % item for item in (users or {"alice": "{PLAIN}secret"}).items()]
    return "\n".join(lines) + "\n"


def program_config(directory: TempDir, ports, backend_port: int = 1143, password: str = "secret",
                   main: str = "", mail: str = "", server: str = "", tail: str = "",
                   log: str = "stderr info", auth_delay: str = "50ms",
                   name: str = "mailproxy.conf") -> str:
    """The file of a ProgramUnderTest, written in ``directory``: one IMAP
    server listening on every port of ``ports``, passing to
    ``backend_port``, a [users] table with alice; ``log`` is the [main]
    error_log; ``main``, ``mail`` and ``server`` are lines added to those
    sections, ``tail`` goes at the end.  Its path."""
    listen = "\n    ".join("127.0.0.1:%d" % port for port in ports)
    text = ("[main]\nerror_log = %s\n%s\n"
            "[mail]\nproxy_pass = 127.0.0.1:%d\nauth_delay = %s\nserver_name = mail.test\n%s\n"
            "[users]\nalice = {PLAIN}%s\n\n"
            "[server imap]\nlisten = %s\nprotocol = imap\n%s%s"
            % (log, main, backend_port, auth_delay, mail, password, listen, server, tail))
    return directory.write(name, text)


# -- fake servers -------------------------------------------------------------------

class ThreadedServer:
    """A test server on 127.0.0.1 (or on the unix socket ``path``): one thread
    accepts, one thread per connection runs ``handle(accepted(conn))``.
    ``accepted`` runs in the accept thread, so whatever it records is in
    connection order.  ``close`` stops accepting, shuts every connection
    down (which wakes its thread) and joins the threads.  A subclass sets
    its own attributes before calling ``__init__``: the accept thread starts
    there."""

    name = "fake server"
    conn_timeout = 10.0

    def __init__(self, path: str = None, backlog: int = 64):
        self.stopping = threading.Event()
        self.connections = []
        if path is None:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))   # port 0: the kernel picks a free one, race-free
            self.port = self.sock.getsockname()[1]
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(path)
            self.port = None
        self.sock.listen(backlog)
        self.sock.settimeout(0.05)         # so that the accept thread sees ``stopping``
        self.threads = [threading.Thread(target=self._accept, name=self.name, daemon=True)]
        self.threads[0].start()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(self.conn_timeout)
            self.connections.append(conn)
            thread = threading.Thread(target=self.handle, args=(self.accepted(conn),),
                                      daemon=True)
            self.threads.append(thread)
            thread.start()

    def accepted(self, conn: socket.socket):
        return conn

    def handle(self, accepted) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes accept() at once (TCP, on Linux)
        except OSError:
            pass
        self.threads[0].join(5)            # no new connection after this
        self.sock.close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)    # wakes its thread up
            except OSError:
                pass
        for thread in self.threads[1:]:
            thread.join(5)


class BackendWire:
    """The fake backend's end of one connection: lines, literals (exactly n
    bytes) and SMTP message data in, replies out; every byte received is
    kept in ``received``."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.received = bytearray()
        self.pending = bytearray()

    def _more(self) -> bool:
        data = self.conn.recv(MEGABYTE)
        self.received += data
        self.pending += data
        return bool(data)

    def line(self) -> bytes:
        """The next line with its CRLF; b"" when the proxy has closed."""
        while b"\n" not in self.pending:
            if not self._more():
                return b""
        end = self.pending.find(b"\n") + 1
        line = bytes(self.pending[:end])
        del self.pending[:end]
        return line

    def exactly(self, size: int) -> bytes:
        """The next ``size`` bytes (a literal's), waiting for them."""
        while len(self.pending) < size:
            if not self._more():
                raise ConnectionError("closed in the middle of %d bytes" % size)
        data = bytes(self.pending[:size])
        del self.pending[:size]
        return data

    def dot_data(self) -> bytes:
        """SMTP message data as it came, up to and including the lone
        ".\\r\\n" line (RFC 5321 §4.1.1.4), dot-stuffing untouched."""
        start = 0
        while True:
            if self.pending.startswith(b".\r\n"):
                end = 3
                break
            found = self.pending.find(b"\r\n.\r\n", start)
            if found >= 0:
                end = found + 5
                break
            start = max(0, len(self.pending) - 4)
            if not self._more():
                raise ConnectionError("closed in the middle of DATA")
        data = bytes(self.pending[:end])
        del self.pending[:end]
        return data

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)


class FakeBackend(ThreadedServer):
    """A mail server on 127.0.0.1 for the proxy to log in to: one thread
    accepts, one thread per connection reads it through a BackendWire.
    The protocols are its subclasses; the options are the same for all.

    ``mode``: "normal"; "refuse" (every login is refused); "bad-greeting";
    "close" (closes each connection at once); "stall" (accepts, never says a
    word).  ``accept``: the (login, password) pairs it lets in (None: any
    pair; the proxy's [users] table is what decides then); ``logins`` lists
    every pair it was offered.  ``message`` is what FETCH / RETR send;
    ``pushed`` counts how much of it has gone out so far.  ``received[i]`` is
    every byte connection i got (after a TLS handshake, the decrypted ones).

    ``tls``: "" (none), "implicit" (handshake at once) or "starttls" (after
    the protocol's command), with the server ``context``.  ``clear[i]`` is
    what connection i received before its handshake (the rest, in
    ``received``, only a proxy that did the handshake can have sent),
    ``versions[i]`` its TLS version; ``inject`` is sent in clear right after
    the STARTTLS yes (a man in the middle's attempt, RFC 3207 §4.2).
    ``proxy_header``: each connection starts with a PROXY header (v1 or v2),
    kept raw in ``headers`` (and at the start of ``received[i]``)."""

    name = "fake backend"

    def __init__(self, mode: str = "normal", message: bytes = b"hello\r\n",
                 accept=((b"alice", b"secret"),), tls: str = "",
                 context: Optional[ssl.SSLContext] = None, inject: bytes = b"",
                 proxy_header: bool = False):
        self.mode = mode
        self.message = message
        self.accept = None if accept is None else set(accept)
        self.tls = tls
        self.tls_context = context
        self.inject = inject
        self.proxy_header = proxy_header
        self.logins = []
        self.received = []
        self.pushed = 0
        self.clear = []
        self.versions = []
        self.tls_errors = []
        self.headers = []
        super().__init__()

    def accepted(self, conn: socket.socket) -> BackendWire:
        wire = BackendWire(conn)
        self.received.append(wire.received)
        return wire

    def handle(self, wire: BackendWire) -> None:
        try:
            if self.mode == "stall":
                self.stopping.wait()
            elif self.mode != "close":
                if self.proxy_header:
                    self.read_proxy_header(wire)
                if self.tls == "implicit":
                    self.start_tls(wire)
                self.serve(wire)
        except OSError:
            pass                           # the proxy went away (or failed TLS): nothing to do
        finally:
            wire.conn.close()

    def serve(self, wire: BackendWire) -> None:
        raise NotImplementedError

    def read_proxy_header(self, wire: BackendWire) -> None:
        start = wire.exactly(12)
        if start == mp.PROXY_V2_SIGNATURE:
            rest = wire.exactly(4)
            header = start + rest + wire.exactly(struct.unpack("!H", rest[2:])[0])
        else:
            header = start + wire.line()
        self.headers.append(header)

    def start_tls(self, wire: BackendWire) -> None:
        """The server side of the handshake, on the connection's socket."""
        if wire.pending:
            raise ConnectionError("the proxy sent %r before the handshake" % bytes(wire.pending))
        self.clear.append(bytes(wire.received))
        raw = wire.conn
        try:
            wire.conn = self.tls_context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as error:
            self.tls_errors.append(error)
            raise
        self.versions.append(wire.conn.version())
        # close() shuts the connections down to wake their threads: the TLS one now.
        self.connections[self.connections.index(raw)] = wire.conn

    def greet(self, wire: BackendWire, greeting: bytes, refusal: bytes) -> bool:
        """``greeting``, or the protocol's STARTTLS first; in "bad-greeting"
        mode ``refusal``, then wait for the proxy to hang up.  False: the
        dialogue is over."""
        if self.mode == "bad-greeting":
            wire.send(refusal)
            wire.line()
            return False
        if self.tls == "starttls":
            return self.starttls(wire)
        wire.send(greeting)
        return True

    def starttls(self, wire: BackendWire) -> bool:
        raise NotImplementedError

    def accepts(self, login: bytes, password: bytes) -> bool:
        """Whether this pair logs in (it is recorded in ``logins``)."""
        self.logins.append((login, password))
        if self.mode == "refuse":
            return False
        return self.accept is None or (login, password) in self.accept

    def push_message(self, wire: BackendWire) -> None:
        for start in range(0, len(self.message), 65536):
            wire.send(self.message[start:start + 65536])
            self.pushed = start + len(self.message[start:start + 65536])


class FakeImapBackend(FakeBackend):
    """LOGIN with literals only (the way mailproxy sends it), AUTHENTICATE
    with an initial response (a token handed on: the line goes to
    ``authenticates`` and is answered OK), NOOP, LOGOUT; after login also
    ``FETCH 1 BODY[]`` (sends ``message``) and ``APPEND INBOX {n}`` (answers
    with the sha256 of the n bytes).  ``capability``: an untagged CAPABILITY
    comes before the OK of a LOGIN.  With tls="starttls" it greets with
    STARTTLS and LOGINDISABLED and takes nothing but ``S1 STARTTLS`` in
    clear (a LOGIN gets NO [PRIVACYREQUIRED])."""

    def __init__(self, mode: str = "normal", message: bytes = b"hello\r\n",
                 capability: bool = False, **options):
        self.capability = capability
        self.authenticates = []
        super().__init__(mode, message, **options)

    def serve(self, wire: BackendWire) -> None:
        if not self.greet(wire, b"* OK fake IMAP ready\r\n", b"* BYE not today\r\n"):
            return
        logged_in = False
        while True:
            line = wire.line()
            if not line:
                return
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            command, _, argument = rest.partition(b" ")
            command = command.upper()
            if command == b"LOGIN" and not logged_in:
                logged_in = self.login(wire, tag, argument)
            elif command == b"AUTHENTICATE" and not logged_in:
                self.authenticates.append(line)
                wire.send(tag + b" OK AUTHENTICATE completed\r\n")
                logged_in = True
            elif command == b"NOOP":
                wire.send(tag + b" OK NOOP completed\r\n")
            elif command == b"LOGOUT":
                wire.send(b"* BYE fake IMAP logging out\r\n" + tag + b" OK LOGOUT completed\r\n")
                return
            elif command == b"FETCH" and logged_in and argument == b"1 BODY[]":
                wire.send(b"* 1 FETCH (BODY[] {%d}\r\n" % len(self.message))
                self.push_message(wire)
                wire.send(b")\r\n" + tag + b" OK FETCH completed\r\n")
            elif command == b"APPEND" and logged_in and re.fullmatch(rb"INBOX \{\d+\}", argument):
                wire.send(b"+ Ready for literal data\r\n")
                data = wire.exactly(int(argument[7:-1]))
                if wire.line() != b"\r\n":
                    return
                wire.send(tag + b" OK APPEND completed, sha256 %s\r\n" % sha256_hex(data).encode())
            else:
                wire.send(tag + b" BAD unknown command\r\n")

    def starttls(self, wire: BackendWire) -> bool:
        """The greeting and STARTTLS in clear; False if the proxy asked
        for anything else."""
        wire.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] fake IMAP ready\r\n")
        tag, _, command = wire.line().rstrip(b"\r\n").partition(b" ")
        if command.upper() != b"STARTTLS":
            wire.send(tag + b" NO [PRIVACYREQUIRED] STARTTLS first\r\n")
            return False
        wire.send(tag + b" OK Begin TLS negotiation now\r\n" + self.inject)
        self.start_tls(wire)
        return True

    def login(self, wire: BackendWire, tag: bytes, argument: bytes) -> bool:
        """``LOGIN {n}`` / ``+ go ahead`` / ``login {m}`` / ``+`` / password."""
        size = re.fullmatch(rb"\{(\d+)\}", argument)
        if size is None:
            wire.send(tag + b" BAD this fake wants literals\r\n")
            return False
        wire.send(b"+ go ahead\r\n")
        login = wire.exactly(int(size.group(1)))
        size = re.fullmatch(rb" \{(\d+)\}\r\n", wire.line())
        if size is None:
            wire.send(tag + b" BAD this fake wants literals\r\n")
            return False
        wire.send(b"+\r\n")
        password = wire.exactly(int(size.group(1)))
        if wire.line() != b"\r\n":
            wire.send(tag + b" BAD junk after the password\r\n")
            return False
        if not self.accepts(login, password):
            wire.send(tag + b" NO [AUTHENTICATIONFAILED] bad\r\n")
            return False
        if self.capability:
            wire.send(b"* CAPABILITY IMAP4rev1 FAKE-BACKEND\r\n")
        wire.send(tag + b" OK LOGIN completed\r\n")
        return True


class FakePop3Backend(FakeBackend):
    """USER/PASS, AUTH with an initial response (a token handed on: the line
    goes to ``auths`` and is answered +OK), STAT, NOOP, ``RETR 1`` (sends
    ``message``, not dot-stuffed: the tests read it by length), a made-up
    ``XPUT n`` (answers with the sha256 of the n bytes that follow), QUIT.
    With tls="starttls" only STLS is taken in clear."""

    def __init__(self, mode: str = "normal", message: bytes = b"hello\r\n", **options):
        self.auths = []
        super().__init__(mode, message, **options)

    def serve(self, wire: BackendWire) -> None:
        if not self.greet(wire, b"+OK fake POP3 ready\r\n", b"-ERR not today\r\n"):
            return
        login, logged_in = None, False
        while True:
            line = wire.line()
            if not line:
                return
            command, _, argument = line.rstrip(b"\r\n").partition(b" ")
            command = command.upper()
            if command == b"USER" and not logged_in:
                login = argument
                wire.send(b"+OK send PASS\r\n")
            elif command == b"PASS" and not logged_in and login is not None:
                if self.accepts(login, argument):
                    logged_in = True
                    wire.send(b"+OK alice has 1 message\r\n")
                else:
                    wire.send(b"-ERR [AUTH] bad\r\n")
                    login = None
            elif command == b"AUTH" and not logged_in:
                self.auths.append(line)
                logged_in = True
                wire.send(b"+OK token accepted\r\n")
            elif command == b"NOOP" and logged_in:
                wire.send(b"+OK\r\n")
            elif command == b"STAT" and logged_in:
                wire.send(b"+OK 1 %d\r\n" % len(self.message))
            elif command == b"RETR" and logged_in and argument == b"1":
                wire.send(b"+OK %d octets\r\n" % len(self.message))
                self.push_message(wire)
                wire.send(b"\r\n.\r\n")
            elif command == b"XPUT" and logged_in and argument.isdigit():
                wire.send(b"+OK send %d octets\r\n" % int(argument))
                data = wire.exactly(int(argument))
                wire.send(b"+OK got them, sha256 %s\r\n" % sha256_hex(data).encode())
            elif command == b"QUIT":
                wire.send(b"+OK bye\r\n")
                return
            else:
                wire.send(b"-ERR unknown command\r\n")

    def starttls(self, wire: BackendWire) -> bool:
        wire.send(b"+OK fake POP3 ready, STLS first\r\n")
        if wire.line().rstrip(b"\r\n").upper() != b"STLS":
            wire.send(b"-ERR [SYS/PERM] STLS first\r\n")
            return False
        wire.send(b"+OK Begin TLS negotiation\r\n" + self.inject)
        self.start_tls(wire)
        return True


class FakeSmtpBackend(FakeBackend):
    """A Postfix-like SMTP server: 220, a multi-line EHLO reply, HELO, XCLIENT
    (answered ``xclient_reply``: by default a new 220 greeting, as Postfix),
    AUTH PLAIN and AUTH LOGIN (with or without an initial response; what
    ``accept`` lets in), MAIL, RCPT (``refuse``: recipient addresses
    answered 550), DATA (read to the lone "."; the raw bytes, dot-stuffing
    and final ".\\r\\n" included, go to ``messages``), BDAT (the chunk goes
    to ``messages``), RSET, NOOP, QUIT.  ``commands`` lists (encrypted,
    line) for every command line.  With tls="starttls" its EHLO offers
    STARTTLS, and nothing but EHLO and STARTTLS is taken in clear."""

    def __init__(self, mode: str = "normal", refuse=(), xclient_reply: bytes = None, **options):
        self.refuse = {address.lower() for address in refuse}
        self.xclient_reply = xclient_reply or SMTP_BACKEND_XCLIENT_GREETING
        self.messages = []
        self.commands = []
        super().__init__(mode, **options)

    def serve(self, wire: BackendWire) -> None:
        secure = self.tls == "implicit"
        wire.send(SMTP_BACKEND_GREETING)
        while True:
            line = wire.line()
            if not line:
                return
            self.commands.append((secure, line))
            verb, _, argument = line.rstrip(b"\r\n").partition(b" ")
            verb = verb.upper()
            if verb == b"EHLO":
                starttls = b"250-STARTTLS\r\n" if self.tls == "starttls" and not secure else b""
                wire.send(SMTP_BACKEND_EHLO.replace(b"250-PIPELINING\r\n",
                                                    b"250-PIPELINING\r\n" + starttls))
            elif verb == b"STARTTLS" and self.tls == "starttls" and not secure:
                wire.send(b"220 2.0.0 Ready to start TLS\r\n")
                self.start_tls(wire)
                secure = True
            elif self.tls == "starttls" and not secure:
                wire.send(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
            elif verb == b"HELO":
                wire.send(b"250 backend.test\r\n")
            elif verb == b"XCLIENT":
                wire.send(self.xclient_reply)
            elif verb == b"AUTH":
                self.auth(wire, argument)
            elif verb == b"MAIL":
                wire.send(SMTP_BACKEND_MAIL_OK)
            elif verb == b"RCPT":
                self.rcpt(wire, argument)
            elif verb == b"DATA":
                wire.send(SMTP_BACKEND_DATA_GO)
                self.messages.append(wire.dot_data())
                wire.send(smtp_backend_queued(len(self.messages)))
            elif verb == b"BDAT" and re.fullmatch(rb"\d+( LAST)?", argument, re.I):
                self.messages.append(wire.exactly(int(argument.split(b" ")[0])))
                wire.send(b"250 2.0.0 Ok: %d octets\r\n" % len(self.messages[-1]))
            elif verb in (b"RSET", b"NOOP"):
                wire.send(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                wire.send(SMTP_BACKEND_BYE)
                return
            else:
                wire.send(b"502 5.5.2 Error: command not recognized\r\n")

    def rcpt(self, wire: BackendWire, argument: bytes) -> None:
        match = re.search(rb"<([^<>]*)>", argument)
        address = match.group(1) if match else b""
        if address.lower() in self.refuse:
            wire.send(smtp_backend_rcpt_refused(address))
        else:
            wire.send(SMTP_BACKEND_RCPT_OK)

    def auth(self, wire: BackendWire, argument: bytes) -> None:
        mechanism, _, initial = argument.partition(b" ")
        mechanism = mechanism.upper()
        try:
            if mechanism == b"PLAIN":
                if not initial:
                    wire.send(b"334 \r\n")
                    initial = wire.line().rstrip(b"\r\n")
                _, login, password = base64.b64decode(initial, validate=True).split(b"\0")
            elif mechanism == b"LOGIN":
                if not initial:
                    wire.send(b"334 VXNlcm5hbWU6\r\n")
                    initial = wire.line().rstrip(b"\r\n")
                login = base64.b64decode(initial, validate=True)
                wire.send(b"334 UGFzc3dvcmQ6\r\n")
                password = base64.b64decode(wire.line().rstrip(b"\r\n"), validate=True)
            else:
                wire.send(b"504 5.5.4 Unrecognized authentication type\r\n")
                return
        except ValueError:
            wire.send(b"501 5.5.2 Cannot decode response\r\n")
            return
        if self.accepts(login, password):
            wire.send(b"235 2.7.0 Authentication successful\r\n")
        else:
            wire.send(b"535 5.7.8 Error: authentication failed\r\n")

    def lines(self, secure: bool) -> bytes:
        """The command lines it read in clear (False) or over TLS (True)."""
        return b"".join(line for encrypted, line in self.commands if encrypted == secure)


FAKE_BACKENDS = {"imap": FakeImapBackend, "pop3": FakePop3Backend, "smtp": FakeSmtpBackend}


class ScriptedBackend(FakeBackend):
    """A backend that plays ``script`` on each connection: a bytes item is
    sent as one segment, an int n waits for n lines from the proxy, a float
    sleeps that long.  ``received[i]`` is every byte connection i got;
    ``hung_up[i]`` is set when the proxy closed connection i."""

    name = "scripted backend"

    def __init__(self, *script):
        self.script = script
        self.hung_up = []
        super().__init__()

    def accepted(self, conn: socket.socket) -> BackendWire:
        self.hung_up.append(threading.Event())
        return super().accepted(conn)

    def serve(self, wire: BackendWire) -> None:
        hung_up = self.hung_up[self.received.index(wire.received)]
        try:
            for step in self.script:
                if isinstance(step, bytes):
                    wire.send(step)
                elif isinstance(step, int):
                    for _ in range(step):
                        if not wire.line():
                            return
                else:
                    time.sleep(step)
            while wire.line():
                pass
        finally:
            hung_up.set()


AUTH_STALL = "stall"                 # accept, read the request, never answer
AUTH_HOLD = "hold"                   # never answer; count the proxy's close in ``hung_up``


def auth_partial(data: bytes) -> tuple:
    """An action: send ``data`` (no blank line) and close."""
    return ("partial", data)


def auth_response(*headers, status_line: bytes = b"HTTP/1.0 200 OK") -> bytes:
    """A response: the status line, ``(name, value)`` header lines, the blank line."""
    lines = [status_line] if status_line is not None else []
    for name, value in headers:
        name = name.encode() if isinstance(name, str) else name
        value = value.encode() if isinstance(value, str) else value
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def auth_ok(port: int, *extra, server: str = "127.0.0.1") -> bytes:
    return auth_response(("Auth-Status", "OK"), ("Auth-Server", server),
                       ("Auth-Port", str(port)), *extra)


def auth_fail(text: str = "Invalid login", *extra) -> bytes:
    return auth_response(("Auth-Status", text), *extra)


class AuthServer(ThreadedServer):
    """An HTTP/1.0 auth server on 127.0.0.1 (or on the unix socket ``path``):
    one thread accepts, one thread per request.  Each request (read up to its
    blank line) is kept raw in ``requests`` (its arrival time in ``times``),
    then answered with the next of ``responses`` or ``answer(request, index)``.
    An answer is bytes (sent, then the connection is closed), AUTH_STALL,
    AUTH_HOLD, or auth_partial(bytes).  No script left: a failure answer."""

    name = "fake auth server"
    conn_timeout = 5.0

    def __init__(self, *responses, answer=None, path: str = None):
        self.responses = list(responses)
        self.hung_up = 0
        self.answer = answer
        self.requests = []
        self.times = []
        self.lock = threading.Lock()
        super().__init__(path, backlog=16)

    def handle(self, conn: socket.socket) -> None:
        try:
            data = bytearray()
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            with self.lock:
                index = len(self.requests)
                self.requests.append(bytes(data))
                self.times.append(time.monotonic())
                if self.answer is not None:
                    action = self.answer(bytes(data), index)
                elif self.responses:
                    action = self.responses.pop(0)
                else:
                    action = auth_fail("no scripted response")
            if action == AUTH_STALL:
                self.stopping.wait()
            elif action == AUTH_HOLD:
                while conn.recv(65536):
                    pass
                self.hung_up += 1
            elif isinstance(action, tuple):
                conn.sendall(action[1])
            else:
                conn.sendall(action)
        except OSError:
            pass
        finally:
            conn.close()

    def wait_requests(self, count: int, timeout: float = 3.0) -> None:
        wait_until(lambda: len(self.requests) >= count, timeout,
                   "%d auth request(s), have %d" % (count, len(self.requests)))


AUTH_HEADER_LINES = b"X-Auth-Key: secret-key\r\nX-Second: two words\r\n"


def auth_request_bytes(user: bytes = b"alice", password: bytes = b"secret", protocol: str = "imap",
                       attempt: int = 1, client_ip: str = "127.0.0.1", method: str = "plain",
                       salt: bytes = None, middle: bytes = b"", after: bytes = b"",
                       host: bytes = b"127.0.0.1") -> bytes:
    """The request nginx sends, byte for byte (NGINX-MAIL.md §1.3), with this
    file's two auth_http_header lines.  ``middle``: lines after Client-IP /
    Client-Host (Proxy-Protocol-*), ``after``: lines after those (Auth-SSL)."""
    request = (b"GET /auth HTTP/1.0\r\nHost: " + host + b"\r\n"
               b"Auth-Method: " + method.encode() + b"\r\n"
               b"Auth-User: " + user + b"\r\n"
               b"Auth-Pass: " + password + b"\r\n")
    if salt is not None:
        request += b"Auth-Salt: " + salt + b"\r\n"
    request += (b"Auth-Protocol: " + protocol.encode() + b"\r\n"
                b"Auth-Login-Attempt: %d\r\n" % attempt +
                b"Client-IP: " + client_ip.encode() + b"\r\n")
    if protocol == "smtp":
        request += b"Client-Host: [UNAVAILABLE]\r\n"
    return request + middle + after + AUTH_HEADER_LINES + b"\r\n"


def dns_name(name):
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".") if label) + b"\0"


def dns_record(name_bytes, rtype, value, ttl=300):
    """One answer record; ``value`` is rdata bytes, an address or a name."""
    if isinstance(value, str) and rtype in (mp.DNS_A, mp.DNS_AAAA):
        value = __import__("ipaddress").ip_address(value).packed
    elif isinstance(value, str):
        value = dns_name(value)
    return name_bytes + mp.struct.pack("!HHIH", rtype, 1, ttl, len(value)) + value


def dns_response(query, records=(), rcode=0, truncated=False, qid=None):
    """The answer to ``query`` (the bytes our client sent)."""
    rid = mp.struct.unpack("!H", query[:2])[0] if qid is None else qid
    flags = 0x8180 | rcode | (0x0200 if truncated else 0)
    question = query[12:]
    return mp.struct.pack("!HHHHHH", rid, flags, 1, len(records), 0, 0) + question + b"".join(records)


class FakeDns:
    """A UDP DNS server in a thread; ``answer(query, qname, qtype)`` returns
    the datagrams to send back (a list: none, one, or several)."""

    def __init__(self, answer):
        self.answer = answer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                query, client = self.sock.recvfrom(4096)
            except OSError:
                return
            qname, offset = mp.read_dns_name(query, 12)
            qtype = mp.struct.unpack("!H", query[offset:offset + 2])[0]
            self.queries.append((qname, qtype))
            for datagram in self.answer(query, qname, qtype):
                self.sock.sendto(datagram, client)

    def close(self):
        self.sock.close()


def records_for(table):
    """An answer function from {(qname, qtype): [records]} (missing: NXDOMAIN)."""
    def answer(query, qname, qtype):
        if (qname, qtype) not in table:
            return [dns_response(query, rcode=3)]
        return [dns_response(query, table[(qname, qtype)])]
    return answer


# -- clients ------------------------------------------------------------------------

class Client:
    """A test's end of one connection to the proxy.

    send("a1 NOOP") sends a line (the CRLF is added); send(b"...") sends
    bytes as they are.  expect(rb"^a1 OK") reads the next line (with its
    CRLF) and fails the test unless it matches; read_exactly(n) reads n bytes;
    expect_closed() wants the proxy to close with nothing more said.  Every
    read gives up after ``timeout`` seconds, saying what it had read."""

    def __init__(self, port, timeout: float = 5.0):
        """``port``: of 127.0.0.1; a str is the path of a unix socket."""
        self.timeout = timeout
        if isinstance(port, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(port)
            except OSError:
                self.sock.close()
                raise
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.pending = bytearray()     # received, not consumed yet
        self.lines = []                # the last lines consumed, for failure messages
        self.sent = 0                  # bytes sent, and received, in all
        self.received = 0

    def send(self, data) -> None:
        if isinstance(data, str):
            data = data.encode() + b"\r\n"
        self.sock.sendall(data)
        self.sent += len(data)

    def _receive(self, deadline: float, waiting_for: str) -> bool:
        """Read once into ``pending``; False at the end of the stream."""
        left = deadline - time.monotonic()
        if left <= 0:
            self._timed_out(waiting_for)
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(MEGABYTE)
        except socket.timeout:
            self._timed_out(waiting_for)
        except ConnectionResetError:
            data = b""
        self.received += len(data)
        self.pending += data
        return bool(data)

    def _timed_out(self, waiting_for: str) -> None:
        raise AssertionError("%s: gave up after %.1fs; last lines %r, then %r"
                             % (waiting_for, self.timeout, self.lines[-3:],
                                bytes(self.pending[:200])))

    def read_line(self) -> bytes:
        deadline = time.monotonic() + self.timeout
        while True:
            end = self.pending.find(b"\n")
            if end >= 0:
                line = bytes(self.pending[:end + 1])
                del self.pending[:end + 1]
                self.lines = self.lines[-9:] + [line]
                return line
            if not self._receive(deadline, "waiting for a line"):
                raise AssertionError("the proxy closed the connection; expected a line, "
                                     "last lines %r, then %r" % (self.lines[-3:], bytes(self.pending)))

    def expect(self, pattern: bytes) -> "re.Match":
        line = self.read_line()
        match = re.search(pattern, line)
        if match is None:
            raise AssertionError("expected %r, got %r (lines before: %r)"
                                 % (pattern, line, self.lines[-4:-1]))
        return match

    def read_exactly(self, size: int) -> bytes:
        deadline = time.monotonic() + self.timeout
        while len(self.pending) < size:
            if not self._receive(deadline, "reading %d bytes" % size):
                raise AssertionError("the proxy closed the connection after %d of %d bytes"
                                     % (len(self.pending), size))
        data = bytes(self.pending[:size])
        del self.pending[:size]
        return data

    def expect_line(self, line: bytes) -> None:
        """The next line is ``line`` (CRLF included), byte for byte."""
        got = self.read_line()
        if got != line:
            raise AssertionError("expected %r, got %r (lines before: %r)"
                                 % (line, got, self.lines[-4:-1]))

    def reply(self) -> bytes:
        """One SMTP reply, all its lines (RFC 5321 §4.2.1)."""
        lines = [self.read_line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.read_line())
        return b"".join(lines)

    def read_until_closed(self, timeout: Optional[float] = None) -> bytes:
        """Everything the proxy sends until it closes (fails after
        ``timeout``, by default the client's)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while self._receive(deadline, "waiting for the close"):
            pass
        data = bytes(self.pending)
        del self.pending[:]
        return data

    def expect_closed(self) -> None:
        """The proxy closes the connection, and says nothing more before."""
        deadline = time.monotonic() + self.timeout
        while not self.pending and self._receive(deadline, "waiting for the close"):
            pass
        if self.pending:
            raise AssertionError("expected the proxy to close the connection, got %r"
                                 % bytes(self.pending[:200]))

    def expect_nothing(self, seconds: float) -> None:
        """For ``seconds``, the proxy says nothing (and does not close)."""
        if self.pending:
            raise AssertionError("expected silence, got %r" % bytes(self.pending[:200]))
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return
        raise AssertionError("expected silence, got %r" % data if data else
                             "expected silence, the proxy closed the connection")

    def start_tls(self, context: ssl.SSLContext, hostname: str = "localhost",
                  session: Optional[ssl.SSLSession] = None) -> None:
        """Go on over TLS on the same socket: after the plaintext "OK, begin
        TLS" (implicit TLS: at once)."""
        if self.pending:
            raise AssertionError("plaintext left unread before the TLS handshake: %r"
                                 % bytes(self.pending))
        self.sock.settimeout(self.timeout)
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname, session=session)

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the TCP connection, under TLS's feet."""
        raw = socket.fromfd(self.sock.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        try:
            raw.settimeout(self.timeout)
            raw.sendall(data)
        finally:
            raw.close()                        # a duplicate: the connection stays

    def close(self) -> None:
        self.sock.close()


def connect_client(test, port, timeout: float = 5.0) -> Client:
    """A Client of 127.0.0.1:PORT (or of the unix socket at the path
    ``port``), closed when the test ends."""
    client = Client(port, timeout)
    test.addCleanup(client.close)
    return client


def imap_login_session(test, port: int, password: str = "secret", timeout: float = 5.0):
    """A Client that has read the greeting and sent ``LOGIN alice
    PASSWORD``: (client, the reply line)."""
    client = connect_client(test, port, timeout)
    client.expect_line(mp.IMAP_GREETING)
    client.send("a1 LOGIN alice " + password)
    return client, client.read_line()


def imap_login_reply(test, port: int, password: str = "secret") -> bytes:
    """The reply to ``LOGIN alice PASSWORD`` on a connection of its own."""
    client, reply = imap_login_session(test, port, password)
    client.close()
    return reply


def fetch_and_append(test, client: Client, size: int) -> None:
    """Through a logged-in session: FETCH ``size`` bytes from the backend and
    APPEND ``size`` other bytes to it, both checked with sha256."""
    client.send("f1 FETCH 1 BODY[]")
    client.expect(rb"^\* 1 FETCH \(BODY\[\] \{%d\}\r\n$" % size)
    got = client.read_exactly(size)
    test.assertEqual(sha256_hex(got), sha256_hex(message_bytes(size)), "FETCH: bytes changed")
    client.expect(rb"^\)\r\n$")
    client.expect(rb"^f1 OK FETCH completed\r\n$")
    data = upload_bytes(size)
    client.send("f2 APPEND INBOX {%d}" % size)
    client.expect(rb"^\+ Ready for literal data\r\n$")
    client.send(data + b"\r\n")
    client.expect(rb"^f2 OK APPEND completed, sha256 %s\r\n$" % sha256_hex(data).encode())


def imap_logout(client: Client) -> None:
    """LOGOUT through a logged-in session: the backend's BYE and OK, then the close."""
    client.send("z9 LOGOUT")
    client.expect(rb"^\* BYE")
    client.expect(rb"^z9 OK")
    client.expect_closed()


def connection_refused(port: int, within: float = 0.0) -> bool:
    """Is a connection to 127.0.0.1:PORT refused?  Tried again until
    ``within`` seconds have passed (a signal is logged just before the
    listeners close, so a first try may race); 0: tried once.  A reset is
    a refusal too: the listener closed with this connection still in its
    backlog, not accepted (seen under load as an ERROR of the SIGQUIT tests)."""
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


class SmtpTap:
    """Stands in for smtplib's ``file``: keeps every byte read."""

    def __init__(self, file, record: bytearray):
        self.file = file
        self.record = record

    def readline(self, limit: int = -1) -> bytes:
        line = self.file.readline(limit)
        self.record += line
        return line

    def close(self) -> None:
        self.file.close()


class SmtpRecordingClient(smtplib.SMTP):
    """smtplib.SMTP keeping every byte it sends (``wire_sent``) and reads
    (``wire_received``)."""

    def __init__(self, *args, **kwargs):
        self.wire_sent = bytearray()
        self.wire_received = bytearray()
        super().__init__(*args, **kwargs)

    def send(self, s):
        self.wire_sent += s.encode(self.command_encoding) if isinstance(s, str) else s
        super().send(s)

    def getreply(self):
        if self.file is None and self.sock is not None:
            self.file = SmtpTap(self.sock.makefile("rb"), self.wire_received)
        return super().getreply()


TLS_CLIENT_TIMEOUT = 5.0


class TlsImap4(imaplib.IMAP4):
    """imaplib with a timeout on Python 3.8 too (its IMAP4 has none before 3.9)."""

    def _create_socket(self, timeout=None):
        return socket.create_connection((self.host, self.port), TLS_CLIENT_TIMEOUT)


class TlsImap4Ssl(imaplib.IMAP4_SSL):
    """imaplib over implicit TLS, with the same timeout."""

    def _create_socket(self, timeout=None):
        sock = socket.create_connection((self.host, self.port), TLS_CLIENT_TIMEOUT)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def tls_quietly(close) -> None:
    """A cleanup that may find its client closed already."""
    try:
        close()
    except (OSError, EOFError, imaplib.IMAP4.error, poplib.error_proto, smtplib.SMTPException):
        pass


def tls_client_hello(hostname: str = "localhost") -> bytes:
    """A real TLS ClientHello, as a client's first flight."""
    outgoing = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing,
                                                server_hostname=hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class BioTlsSocket:
    """A TLS client over a plain socket through MemoryBIOs, so that the
    handshake's first flight can go out in one send() with bytes before it
    (a PROXY header and the ClientHello in one segment).  Has what Client
    uses of a socket: recv, sendall, settimeout, close, getsockname, and
    version / cipher of the TLS."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str,
                 prefix: bytes):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        sock.sendall(prefix + self.outgoing.read())
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return bool(data)

    def recv(self, size: int) -> bytes:
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                if not self._fill():
                    return b""
            except ssl.SSLEOFError:
                return b""
            finally:
                self._flush()

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def settimeout(self, seconds) -> None:
        self.sock.settimeout(seconds)

    def getsockname(self):
        return self.sock.getsockname()

    def version(self):
        return self.tls.version()

    def cipher(self):
        return self.tls.cipher()

    def close(self) -> None:
        self.sock.close()


def proxy_v2_header(source: str, sport: int, destination: str, dport: int,
                    tlvs: bytes = b"") -> bytes:
    """A PROXY v2 header (PROXY command, TCP over IPv4) built by hand."""
    body = socket.inet_aton(source) + socket.inet_aton(destination) + \
        struct.pack("!HH", sport, dport) + tlvs
    return mp.PROXY_V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def parse_tlvs(data: bytes) -> dict:
    """type -> value of a TLV list (the whole list must parse)."""
    tlvs, offset = {}, 0
    while offset < len(data):
        kind, length = data[offset], struct.unpack("!H", data[offset + 1:offset + 3])[0]
        assert offset + 3 + length <= len(data), "TLV overruns: %r" % data
        tlvs[kind] = data[offset + 3:offset + 3 + length]
        offset += 3 + length
    return tlvs


# -- the proxy under test -----------------------------------------------------------

class MemoryErrorLogs:
    """Stands in for mp.ErrorLogs (the [main] log and each server's own):
    every line goes to one in-memory ErrorLog."""

    def __init__(self, log: mp.ErrorLog):
        self.main = log

    def for_server(self, server: mp.Settings) -> mp.ErrorLog:
        return self.main

    def access_for(self, server: mp.Settings) -> mp.ErrorLog:
        return self.main

    def close(self) -> None:
        pass


class ProxyUnderTest:
    """mailproxy configured from INI text the way the real start-up does it
    (mp.load_and_prepare, which builds the SSL contexts), its event loop in
    a daemon thread, its error and access logs in memory; with
    ``certificates``, the test certificates written next to its file (which
    may then name them relatively: ssl_certificate = server.crt).  Use as a
    context manager; ``port`` is where it listens (``ports``: every listen's
    port, in the order of the configuration), ``worker`` the Worker (its
    ``sessions`` may be looked at).  ``log_level``: the in-memory error
    log's lowest level (error_log's).

    If the event loop dies of an exception, the traceback is kept and
    stopping the proxy fails the test with it."""

    def __init__(self, config_text: str, certificates: bool = False, log_level: str = "info"):
        self.directory = tempfile.TemporaryDirectory(prefix="mailproxy-test-")
        self.worker = None
        try:
            if certificates:
                write_tls_files(self.directory.name)
            path = write_file(self.directory.name, "mailproxy.conf", config_text)
            self.config = mp.load_and_prepare(path)
            self.log_file = io.BytesIO()
            log = mp.ErrorLog([(self.log_file, log_level)])
            self.worker = mp.Worker(self.config, MemoryErrorLogs(log))
            self.worker.open_listeners(self.config)
        except BaseException:
            if self.worker is not None:
                self.worker.loop.close()
            self.directory.cleanup()
            raise
        self.ports = [listen.port for server in self.config.servers for listen in server.listen]
        self.port = self.ports[0]
        self.crash = None              # the loop's traceback, if it died
        self.thread = threading.Thread(target=self._run, name="mailproxy loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.loop.run()
        except BaseException:
            import traceback
            self.crash = traceback.format_exc()

    def __enter__(self) -> "ProxyUnderTest":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the loop (as SIGTERM would), close every socket it had open."""
        if self.thread.is_alive():
            self.worker.loop.call_soon_threadsafe(self.worker.stop_now)
            self.thread.join(5)
        hung = self.thread.is_alive()
        if not hung:                   # the loop is ours now: clean up after a crash too
            for session in list(self.worker.sessions):
                session.client.close()
                if session.backend is not None:
                    session.backend.close()
            for listener in self.worker.listeners.values():
                listener.close()
            self.worker.password_checks.close()
            self.worker.loop.close()
        self.directory.cleanup()
        if self.crash:
            raise AssertionError("the proxy's event loop crashed:\n" + self.crash)
        if hung:
            raise AssertionError("the proxy's event loop did not stop")

    def assert_alive(self) -> None:
        if self.crash or not self.thread.is_alive():
            raise AssertionError("the proxy's event loop is dead:\n%s" % self.crash)

    # -- what the proxy logged, and holds ------------------------------------
    @property
    def log(self) -> str:
        return self.log_file.getvalue().decode("utf-8", "replace")

    def wait_for_log(self, pattern: str, timeout: float = 3.0) -> "re.Match":
        """The first match of ``pattern`` in the log, waiting for it to appear
        (the proxy writes some lines after it has closed the socket)."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log)
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError("no %r in the error log:\n%s" % (pattern, self.log))
            time.sleep(0.01)

    def sessions(self) -> list:
        return list(self.worker.sessions)      # a copy: the loop thread changes the set

    def buffered(self) -> int:
        """Bytes waiting in the proxy's output buffers now, all sessions."""
        total = 0
        for session in self.sessions():
            backend = session.backend
            total += len(session.client.out) + (len(backend.out) if backend is not None else 0)
        return total


def run_mailproxy(args, stdin=b"", timeout=20, cwd=None):
    """mailproxy.py ARGS as a subprocess (in the directory ``cwd``, if
    given): (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, MAILPROXY] + list(args), input=stdin, cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")


class ProgramUnderTest:
    """The real program, ``mailproxy.py -c FILE``, as a subprocess in a
    session of its own (its own process group): the master, the workers it
    forks, real signals.  A thread collects its stderr lines.  Unless
    ``started`` is False, the test fails at once if no "started" line
    comes.  ``preexec`` runs in the child before the program (a resource
    limit, say).  When the test ends the master gets SIGTERM (it reaps its
    workers), then the whole group SIGKILL, and the test fails if a process
    of the group is still alive after that."""

    def __init__(self, test, config_path: str, started: bool = True, preexec=None):
        self.proc = subprocess.Popen([sys.executable, MAILPROXY, "-c", config_path],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=preexec)
        self.pgid = self.proc.pid
        self.lines = []
        self.eof = False
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        test.addCleanup(self.stop)
        if started and self.wait_for("started") is None:
            test.fail("no 'started' line:\n" + self.stderr)

    def _read(self):
        for raw in self.proc.stderr:
            with self.changed:
                self.lines.append(raw.decode("utf-8", "replace"))
                self.changed.notify_all()
        with self.changed:
            self.eof = True
            self.changed.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        with self.changed:
            return "".join(self.lines)

    def mark(self) -> int:
        """The number of stderr lines so far: a ``since`` for what follows."""
        with self.changed:
            return len(self.lines)

    def wait_for(self, text: str, since: int = 0, timeout: float = 5.0):
        """The first stderr line from number ``since`` on that holds ``text``;
        None if the program ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines[since:]:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    return None
                self.changed.wait(left)

    def workers(self, since: int = 0) -> list:
        """The PIDs of "start worker process N" from line ``since`` on."""
        with self.changed:
            lines = self.lines[since:]
        return [int(match.group(1)) for match in
                (re.search(r"start worker process (\d+)", line) for line in lines) if match]

    def served_by(self, since: int = 0) -> list:
        """The PID of each session's "connected" line from line ``since`` on."""
        with self.changed:
            lines = self.lines[since:]
        return [int(match.group(1)) for match in
                (re.search(r"\] (\d+)#0: \*\d+ client \S+ connected to", line) for line in lines)
                if match]

    def send_signal(self, name: str) -> None:
        self.proc.send_signal(getattr(signal, name))

    def wait_exit(self, timeout: float = 5.0) -> int:
        status = self.proc.wait(timeout)
        self.reader.join(2)
        return status

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)        # the master reaps its workers
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait(5)
        self.reader.join(2)
        self.proc.stderr.close()
        wait_until(lambda: not process_group(self.pgid), 2.0,
                   "the proxy's process group %d to be gone" % self.pgid)


needs_fork_and_proc = unittest.skipUnless(hasattr(os, "fork") and os.path.isdir("/proc/self"),
                                      "needs fork() and /proc")


class ProcessStat(NamedTuple):
    """What /proc/PID/stat says of a process."""
    state: str          # R, S, D, T, Z (zombie), X (dead)...
    ppid: int
    group: int          # the process group
    cpu_ticks: int      # utime + stime, in clock ticks


def process_stat(pid: int) -> Optional[ProcessStat]:
    """/proc/PID/stat; None when the process is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()      # from field 3 (state) on
    return ProcessStat(fields[0].decode(), int(fields[1]), int(fields[2]),
                       int(fields[11]) + int(fields[12]))


def process_alive(pid: int) -> bool:
    """Running or sleeping.  A zombie counts as dead: an orphaned worker is
    re-parented to an init that may never reap it."""
    stat = process_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def process_group(pgid: int) -> list:
    """The live processes of process group ``pgid``."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = process_stat(int(name))
            if stat is not None and stat[2] == pgid and stat[0] not in ("Z", "X"):
                members.append(int(name))
    return members


def process_ids(pid: int, field: str) -> list:
    """The numbers of the ``Uid:``, ``Gid:`` or ``Groups:`` line of
    /proc/PID/status."""
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return [int(value) for value in line.split()[1:]]
    raise AssertionError("no %s line for %d" % (field, pid))


def read_text(path: str) -> str:
    """The text of a file; "" if there is none."""
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


# -- test case bases ----------------------------------------------------------------

class EndToEndTestCase(CertificateFiles, unittest.TestCase):
    """What the end-to-end tests share: proxies, clients and fake servers
    started through use() are stopped when the test ends, in the reverse
    order (clients first, then the proxy, then the backends); the test
    certificates are in the class's directory (CertificateFiles)."""

    def use(self, resource):
        """Enter a context manager now; exit it when the test ends."""
        value = resource.__enter__()
        self.addCleanup(resource.__exit__, None, None, None)
        return value

    # -- proxies -------------------------------------------------------------------
    def start_proxy(self, protocol: str, backend_port: int, **mail) -> ProxyUnderTest:
        """A proxy passing to ``backend_port``, logins checked against
        [users] (alice, "secret"): proxy_config's."""
        return self.use(ProxyUnderTest(proxy_config(protocol, backend_port, **mail)))

    def tls_proxy(self, protocol: str, backend_port: int, listens=("ssl",), users=None,
                  **mail) -> ProxyUnderTest:
        """start_proxy with the server certificate (mail.example.com) for
        its "ssl" listens and STARTTLS, and auth_delay 50ms."""
        mail.setdefault("ssl_certificate", self.tls_path("server.crt"))
        mail.setdefault("ssl_certificate_key", self.tls_path("server.key"))
        mail.setdefault("auth_delay", "50ms")
        return self.use(ProxyUnderTest(proxy_config(protocol, backend_port, listens=listens,
                                                    users=users, **mail)))

    def auth_http_proxy(self, protocol: str, auth_port, listen_flags: str = "",
                        **mail) -> ProxyUnderTest:
        """A proxy that asks the fake auth server on ``auth_port`` (no
        proxy_pass, no [users]), the certificates beside its file (it may
        name them relatively); ``listen_flags``: its listen's flags."""
        return self.use(ProxyUnderTest(proxy_config(protocol, auth_port=auth_port,
                                                    listens=(listen_flags,), **mail),
                                       certificates=True))

    def auth_server(self, *responses, answer=None) -> "AuthServer":
        return self.use(AuthServer(*responses, answer=answer))

    # -- clients -----------------------------------------------------------------------
    def connect(self, proxy: ProxyUnderTest, port: int = 0, timeout: float = 5.0) -> Client:
        """A Client of the proxy's ``port`` (by default its first)."""
        return connect_client(self, port or proxy.port, timeout)

    def tls_connect(self, proxy: ProxyUnderTest, port: int = 0, certificate: str = "",
                    hostname: str = "localhost", context=None) -> Client:
        """A Client over TLS from its first byte: client_context(certificate)
        unless a ``context`` is given."""
        client = self.connect(proxy, port)
        client.start_tls(context or self.client_context(certificate), hostname)
        return client

    def tls_refused(self, port: int, context: ssl.SSLContext,
                    hostname: str = "localhost") -> ssl.SSLError:
        """The handshake fails; the error the client saw.  With TLS 1.3 the
        server judges the client's certificate after the client has finished
        its part, so the alert may come with the first read."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=TLS_CLIENT_TIMEOUT)
        try:
            try:
                tls = context.wrap_socket(sock, server_hostname=hostname)
            except ssl.SSLError as error:
                return error
            try:
                data = tls.recv(4096)
            except ssl.SSLError as error:
                return error
            finally:
                tls.close()
            self.fail("the TLS handshake succeeded; the proxy said %r" % data)
        finally:
            sock.close()

    def smtplib_client(self, proxy: ProxyUnderTest) -> "SmtpRecordingClient":
        client = SmtpRecordingClient("127.0.0.1", proxy.port, local_hostname="client.example",
                                     timeout=10)
        self.addCleanup(client.close)
        return client

    # -- dialogues that many tests start with ------------------------------------------
    def imap_login(self, client: Client) -> None:
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        client.expect(rb"^a1 OK LOGIN completed\r\n$")

    def pop3_login(self, client: Client) -> None:
        client.expect_line(mp.POP3_GREETING)
        client.send("USER alice")
        client.expect_line(mp.POP3_OK)
        client.send("PASS secret")
        client.expect(rb"^\+OK alice has 1 message\r\n$")

    def smtp_hello(self, client: Client, greeting: bytes = SMTP_PROXY_GREETING,
                   ehlo: bytes = SMTP_PROXY_EHLO) -> None:
        self.assertEqual(client.read_line(), greeting)
        client.send("EHLO client.example")
        self.assertEqual(client.read_exactly(len(ehlo)), ehlo)

    def smtp_auth_plain(self, client: Client) -> None:
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(client.read_line(), mp.SMTP_AUTH_OK)

    def smtp_quit(self, client: Client) -> None:
        client.send("QUIT")
        self.assertEqual(client.read_line(), SMTP_BACKEND_BYE)
        client.expect_closed()

    # -- checks ------------------------------------------------------------------------
    def assertSameBytes(self, got: bytes, expected: bytes, what: str) -> None:
        """Like assertEqual, without printing megabytes when they differ."""
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                         min(len(got), len(expected)))
            self.fail("%s: %d bytes instead of %d, first difference at offset %d: %r vs %r"
                      % (what, len(got), len(expected), first, got[first:first + 20],
                         expected[first:first + 20]))

    def wait_for_backend(self, backend: "FakeBackend", connection: int, data: bytes) -> None:
        """The backend's thread may still be reading when the client has its reply."""
        wait_until(lambda: len(backend.received) > connection and
                   bytes(backend.received[connection]).endswith(data),
                   what="the backend to receive %r" % data[-40:])

    def login_gets_internal_error(self, client: Client, protocol: str) -> None:
        """After the greeting, alice's login gets the protocol's internal
        error, and the proxy closes the connection."""
        if protocol == "imap":
            client.expect_line(mp.IMAP_GREETING)
            client.send("a1 LOGIN alice secret")
            self.assertEqual(client.read_line(), mp.IMAP_INTERNAL_ERROR)
        elif protocol == "pop3":
            client.expect_line(mp.POP3_GREETING)
            client.send("USER alice")
            client.expect_line(mp.POP3_OK)
            client.send("PASS secret")
            self.assertEqual(client.read_line(), mp.POP3_INTERNAL_ERROR)
        else:
            self.smtp_hello(client)
            client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
            self.assertEqual(client.read_line(), mp.SMTP_INTERNAL_ERROR)
        client.expect_closed()

    def assert_internal_error(self, protocol: str, auth: "AuthServer", log_pattern: str,
                              **mail) -> None:
        """A login through a proxy asking ``auth`` gets the internal error,
        the connection is closed, and the error log names the auth server."""
        backend = self.use(FAKE_BACKENDS[protocol]())
        self.backend_port = backend.port
        proxy = self.auth_http_proxy(protocol, auth.port, **mail)
        self.login_gets_internal_error(self.connect(proxy), protocol)
        pattern = (r"\[error\] \d+#0: \*1 " + log_pattern % re.escape("127.0.0.1:%d" % auth.port) +
                   r" while in http auth state, client: 127\.0\.0\.1, server: 127\.0\.0\.1:%d, "
                   r'login: "alice"' % proxy.port)
        proxy.wait_for_log(pattern)
        self.assertEqual(backend.received, [], "the backend must not be contacted")
        proxy.assert_alive()


class LinearWorkTestCase(CertificateFiles, unittest.TestCase):
    """A peer chooses how its bytes are cut into reads.  Every parser of what a
    peer sends must do O(n) work for n bytes fed one at a time, or a client
    trickling a long command (or a backend a long reply) burns the worker's
    CPU with the square of its length (issue 12).  A test feeds a maximal
    input one byte at a time at two sizes, n and 4n: linear work costs about
    4 times as much, quadratic work 16 times; the bound is 8.  CPU time of
    this process, the least of three runs, so that a busy machine does not
    make a test fail.  Fed whole, each input gives the same result."""

    def assert_linear(self, run, size: int) -> None:
        """``run(n)`` feeds a maximal input of about n bytes one at a time."""
        small = cpu_seconds(lambda: run(size))
        large = cpu_seconds(lambda: run(4 * size))
        self.assertLess(large, 8 * small, "%d bytes cost %.3fs, %d bytes %.3fs: not linear"
                        % (size, small, 4 * size, large))

    def machine_run(self, protocol: str, make_input, **settings):
        """A run for assert_linear: a machine whose buffer fits the input,
        fed it a byte at a time; it must answer as to the input fed whole."""
        def run(size: int) -> None:
            data = make_input(size)
            buffer = {"%s_client_buffer" % protocol: len(data) + 64}
            buffer.update(settings)
            machine = make_machine(protocol, **buffer)
            whole = (machine.receive_data(data), machine.data_to_send())
            machine = make_machine(protocol, **buffer)
            events = feed_byte_by_byte(machine.receive_data, data)
            self.assertEqual((events, machine.data_to_send()), whole)
            self.assertNotIn(b"BAD", whole[1])
        return run


class EventLoopTestCase(unittest.TestCase):
    """A real EventLoop, and socketpairs: the proxy's end of a pair goes to
    a Stream, the test plays the peer on the other end, non-blocking.
    drive() runs the loop (and the test's side, ``step``) until a condition
    holds, with a deadline: no sleep stands in for an assertion."""

    def setUp(self):
        self.loop = mp.EventLoop()
        self.addCleanup(self.loop.close)

    def socket_pair(self, sndbuf: int = 0):
        """(the proxy's end, the peer's end); ``sndbuf``: each end sends
        through a kernel buffer that small (a few KB on Linux), so that it
        fills up soon."""
        proxy_end, peer_end = socket.socketpair()
        for sock in (proxy_end, peer_end):
            sock.setblocking(False)
            if sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            self.addCleanup(sock.close)
        return proxy_end, peer_end

    def drive(self, condition, step=None, timeout: float = 10.0) -> None:
        """``step()`` then loop.run_once(0.05), until ``condition()``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail("not there after %.1fs" % timeout)
            if step is not None:
                step()
            self.loop.run_once(0.05)


class PeerSender:
    """The test's side sending ``data`` as fast as its socket takes it;
    ``blocked``: the last send found the socket full; ``shut``: shut its
    sending half down once everything has gone."""

    def __init__(self, sock: socket.socket, data: bytes, shut: bool = False):
        self.sock = sock
        self.data = data
        self.sent = 0
        self.blocked = False
        self.shut = shut

    def __call__(self) -> None:
        while self.sent < len(self.data):
            try:
                self.sent += self.sock.send(self.data[self.sent:self.sent + 65536])
            except BlockingIOError:
                self.blocked = True
                return
        self.blocked = False
        if self.shut:
            self.sock.shutdown(socket.SHUT_WR)
            self.shut = False


class PeerReader:
    """The test's side reading all there is, into ``received``; ``eof``
    once the other end has closed."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.received = bytearray()
        self.eof = False

    def __call__(self) -> None:
        while not self.eof:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            self.received += data
            self.eof = not data


# ========================================================================== #
# ####                              Errors                              #### #
# ========================================================================== #
# The exceptions mailproxy raises on purpose, and the messages they carry.

class ErrorTests(unittest.TestCase):
    def test_a_config_error_names_its_place(self):
        """file:line: [section] directive: message, as -t prints it; the
        parts it does not know are left out."""
        error = mp.ConfigError("/etc/mailproxy.conf", "server imap", "timeout",
                               'invalid time "soon"', line=7)
        self.assertEqual(str(error), '/etc/mailproxy.conf:7: [server imap] timeout: invalid time "soon"')
        self.assertEqual((error.file, error.line, error.section, error.directive, error.message),
                         ("/etc/mailproxy.conf", 7, "server imap", "timeout", 'invalid time "soon"'))
        self.assertEqual(str(mp.ConfigError("/etc/mailproxy.conf", "mail", None, "no listen", 3)),
                         "/etc/mailproxy.conf:3: [mail] no listen")
        self.assertEqual(str(mp.ConfigError("/etc/mailproxy.conf", None, None, "no such file")),
                         "/etc/mailproxy.conf: no such file")

    def test_config_errors_hold_every_error_of_a_file_one_a_line(self):
        path, errors = config_errors(self, BASE_CONFIG, """\
            timeout = soon
            bogus = 1
        """)
        self.assertEqual([(error.file, error.line, error.section, error.directive) for error in errors],
                         [(path, 7, "server imap", "timeout"), (path, 8, "server imap", "bogus")])
        self.assertEqual(str(mp.ConfigErrors(errors)),
                         '%s:7: [server imap] timeout: invalid time "soon"\n'
                         '%s:8: [server imap] bogus: unknown directive "bogus"' % (path, path))

    def test_a_backend_error_keeps_what_the_backend_said(self):
        error = mp.BackendError("upstream sent invalid response", b"a1 NO [UNAVAILABLE] later\r\n",
                                refusal=True)
        self.assertEqual((str(error), error.line, error.refusal),
                         ("upstream sent invalid response", b"a1 NO [UNAVAILABLE] later\r\n", True))
        error = mp.BackendError("upstream prematurely closed connection")
        self.assertEqual((error.line, error.refusal), (b"", False))


# ========================================================================== #
# ####                            Error log                             #### #
# ========================================================================== #
# ErrorLog and log_escape: nginx's line format, and no value a peer chooses
# can end a line or a quoted field.  (The logs of the running program,
# SIGUSR1 and syslog, are in "Processes".)

class ErrorLogTests(unittest.TestCase):
    def test_log_escape_keeps_one_line(self):
        self.assertEqual(mp.log_escape(b'a\r\nb"\x00\xff'), 'a\\x0d\\x0ab\\x22\\x00\\xff')

    def test_log_lines(self):
        """Control bytes, 8-bit bytes, quotes and backslashes as \\xXX: a
        value cannot end the log line or its quoted field."""
        for byte in HOSTILE_BYTES:
            escaped = mp.log_escape(b"a" + byte + b"b")
            self.assertRegex(escaped, r'^a[\x20-\x7e]*b$')
            self.assertNotIn('"', escaped)
            if byte[0] < 0x20 or byte[0] >= 0x7F or byte in (b'"', b"\\"):
                self.assertEqual(escaped, "a" + "".join("\\x%02x" % c for c in byte) + "b", byte)
            else:
                self.assertEqual(escaped, "a" + byte.decode() + "b")

    def test_each_destination_takes_the_lines_of_its_level_and_above(self):
        """nginx's line: date, [level], pid#0, *session, message, context."""
        everything, errors = io.BytesIO(), io.BytesIO()
        log = mp.ErrorLog([(everything, "info"), (errors, "error")])
        self.assertEqual((log.enabled("debug"), log.enabled("info")), (False, True))
        log.log("debug", "not written anywhere")
        log.log("info", "client 192.0.2.7:40000 connected", session=3, context=", server: mail.test")
        log.log("error", "upstream timed out")
        stamp = r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d"
        self.assertRegex(everything.getvalue().decode(),
                         r"^%s \[info\] %d#0: \*3 client 192\.0\.2\.7:40000 connected, server: mail\.test\n"
                         r"%s \[error\] %d#0: upstream timed out\n$" % (stamp, os.getpid(), stamp, os.getpid()))
        self.assertRegex(errors.getvalue().decode(), r"^%s \[error\] %d#0: upstream timed out\n$"
                         % (stamp, os.getpid()))


# ========================================================================== #
# ####                          Configuration                           #### #
# ========================================================================== #
# The value parsers in-process; the loader on files in a temporary
# directory; -t (mailproxy.py -t -c FILE as a subprocess) on one broken file
# per kind of error; the TLS parts of a configuration that load_and_prepare
# checks.

BASE_CONFIG = """\
    [mail]
    proxy_pass = 127.0.0.1:1143

    [server imap]
    listen = 127.0.0.1:18143
    protocol = imap
"""


def line_of(text: str, prefix: str, occurrence: int = 1) -> int:
    """The number of the ``occurrence``-th line of (dedented) ``text`` that
    starts with ``prefix``: where an error must be reported."""
    seen = 0
    for number, line in enumerate(textwrap.dedent(text).splitlines(), 1):
        if line.startswith(prefix):
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError("no line %r in the test's own file" % prefix)


def file_text(parts) -> str:
    """The parts of a file, each dedented on its own, one after the other."""
    return "".join(textwrap.dedent(part) for part in parts)


def load_text(test, *parts: str) -> mp.Config:
    """load_config on the parts written to a temporary file."""
    return mp.load_config(TempDir(test).write("mailproxy.conf", file_text(parts)))


def config_errors(test, *parts: str):
    """The ConfigErrors load_config raises for the parts (fails if none)."""
    path = TempDir(test).write("mailproxy.conf", file_text(parts))
    with test.assertRaises(mp.ConfigErrors) as caught:
        mp.load_config(path)
    return path, caught.exception.errors


# -- value parsers ------------------------------------------------------------------

class ConfigValueParserTests(unittest.TestCase):

    def assertRefused(self, parser, args, message=None):
        with self.assertRaises(mp.ConfigValueError, msg="%s(%r)" % (parser.__name__, args)) as caught:
            parser(args)
        if message is not None:
            self.assertEqual(str(caught.exception), message)

    def test_size(self):
        for text, value in [("512", 512), ("0", 0), ("4k", 4096), ("4K", 4096), ("1K", 1024),
                            ("1m", 1048576), ("1M", 1048576), ("1g", 1073741824),
                            ("16k", 16384)]:
            self.assertEqual(mp.parse_size([text]), value, text)
        for text in ["k", "", "-1", "1.5k", "4kb", "4 k", " 4k", "1t", "0x10", "four"]:
            self.assertRefused(mp.parse_size, [text], 'invalid size "%s"' % text)
        self.assertRefused(mp.parse_size, ["4k", "8k"], "takes one value, got 2")
        self.assertRefused(mp.parse_size, [], "takes one value, got 0")

    def test_time(self):
        for text, value in [("500ms", 0.5), ("15s", 15), ("5m", 300), ("24h", 86400),
                            ("1d", 86400), ("1h30m", 5400), ("60", 60), ("0", 0),
                            ("1s500ms", 1.5), ("1w", 7 * 86400), ("1M", 30 * 86400),
                            ("1y", 365 * 86400), ("1d2h3m4s", 93784)]:
            self.assertEqual(mp.parse_time([text]), value, text)
        for text in ["1x", "m5", "ms", "h", "1.5s", "-5s", "5 m", "1h30x", "", "5S", "1H"]:
            self.assertRefused(mp.parse_time, [text], 'invalid time "%s"' % text)
        # "1h 30m" unquoted is two arguments, in nginx.conf as here.
        self.assertRefused(mp.parse_time, ["1h", "30m"], "takes one value, got 2")

    def test_a_time_nginx_keeps_in_milliseconds_without_a_unit_is_milliseconds(self):
        """ngx_conf_set_msec_slot (timeout, proxy_timeout, resolver_timeout,
        auth_http_timeout, smtp_greeting_delay, worker_shutdown_timeout)
        reads "1200000" as 1200000 ms: Mastering NGINX's "timeout 1200000;"
        loaded as 1200000 seconds.  ssl_session_timeout is a seconds slot."""
        self.assertEqual(mp.parse_msec(["1200000"]), 1200.0)
        self.assertEqual(mp.parse_msec(["500"]), 0.5)
        self.assertEqual(mp.parse_msec(["5m"]), 300)
        for name in ("timeout", "proxy_timeout", "resolver_timeout", "auth_http_timeout",
                     "smtp_greeting_delay"):
            self.assertEqual(mp.parse_directive("mail", name, "1500", "/"), 1.5, name)
        self.assertEqual(mp.parse_directive("main", "worker_shutdown_timeout", "2000", "/"), 2.0)
        self.assertEqual(mp.parse_directive("mail", "ssl_session_timeout", "600", "/"), 600)

    def test_time_units_go_from_most_to_least_significant(self):
        # ngx_parse_time refuses a unit after a smaller or equal one; nginx's
        # docs: "in the order from the most to the least significant".
        for text in ["30m1h", "1m1m", "500ms1s", "1s1d"]:
            with self.assertRaises(mp.ConfigValueError) as caught:
                mp.parse_time([text])
            self.assertTrue(str(caught.exception).startswith('invalid time "%s"' % text))

    def test_flag(self):
        for text, value in [("on", True), ("off", False), ("ON", True), ("Off", False)]:
            self.assertIs(mp.parse_flag([text]), value)
        for text in ["yes", "no", "1", "0", "true", "", "onn"]:
            self.assertRefused(mp.parse_flag, [text],
                               'invalid value "%s", it must be "on" or "off"' % text)
        self.assertRefused(mp.parse_flag, ["on", "off"], "takes one value, got 2")

    def test_split_arguments(self):
        split = mp.split_arguments
        self.assertEqual(split("a b\t c"), ["a", "b", "c"])
        self.assertEqual(split(""), [])
        self.assertEqual(split("   "), [])
        self.assertEqual(split('"SIZE 10485760" 8BITMIME'), ["SIZE 10485760", "8BITMIME"])
        self.assertEqual(split(r'"a \"b\""'), ['a "b"'])
        self.assertEqual(split("'it s' x"), ["it s", "x"])
        self.assertEqual(split(r"'it\'s'"), ["it's"])
        self.assertEqual(split("'say \"hi\"'"), ['say "hi"'])
        self.assertEqual(split(r'"back\\slash"'), ["back\\slash"])
        self.assertEqual(split('""'), [""])
        self.assertEqual(split("50% off"), ["50%", "off"])
        for text in ['"abc', "'abc", r'"abc\"', "x 'y z"]:
            with self.assertRaises(mp.ConfigValueError) as caught:
                split(text)
            self.assertIn("unbalanced quote", str(caught.exception))

    def test_split_arguments_keeps_a_backslash_nginx_keeps(self):
        # ngx_conf_read_token drops the backslash only
        # before " ' \ (and turns \t \r \n into control characters); before
        # any other character the backslash stays.
        self.assertEqual(mp.split_arguments(r'"C:\mail"'), ["C:\\mail"])
        self.assertEqual(mp.split_arguments(r'"a\tb"'), ["a\tb"])

    def test_split_arguments_refuses_text_glued_to_a_closing_quote(self):
        # nginx: 'unexpected "b"' (need_space after a quote).
        for text in ['"a"b', "'a'b"]:
            with self.assertRaises(mp.ConfigValueError, msg=text):
                mp.split_arguments(text)

    def test_listen_addresses(self):
        listen = mp.parse_listen(["127.0.0.1:8143"])
        self.assertEqual((listen.host, listen.port, listen.family), ("127.0.0.1", 8143, socket.AF_INET))
        self.assertEqual(listen.backlog, 511)               # NGX_LISTEN_BACKLOG
        self.assertIsNone(listen.so_keepalive)
        self.assertEqual(listen.text, "127.0.0.1:8143")
        listen = mp.parse_listen(["8143"])
        self.assertEqual((listen.host, listen.port, listen.family), ("0.0.0.0", 8143, socket.AF_INET))
        listen = mp.parse_listen(["*:8143"])
        self.assertEqual((listen.host, listen.port, listen.family), ("0.0.0.0", 8143, socket.AF_INET))
        listen = mp.parse_listen(["[::1]:8143"])
        self.assertEqual((listen.host, listen.port, listen.family), ("::1", 8143, socket.AF_INET6))
        self.assertEqual(listen.text, "[::1]:8143")
        self.assertTrue(listen.ipv6only)

    def test_listen_flags(self):
        self.assertEqual(mp.parse_listen(["127.0.0.1:8143", "backlog=10"]).backlog, 10)
        self.assertEqual(mp.parse_listen(["127.0.0.1:8143", "so_keepalive=on"]).so_keepalive[0], True)
        self.assertEqual(mp.parse_listen(["127.0.0.1:8143", "so_keepalive=off"]).so_keepalive[0], False)
        self.assertEqual(mp.parse_listen(["127.0.0.1:8143", "so_keepalive=30s:10s:3"]).so_keepalive,
                         (True, 30, 10, 3))
        self.assertEqual(mp.parse_listen(["127.0.0.1:8143", "so_keepalive=1m::"]).so_keepalive,
                         (True, 60, None, None))
        self.assertIs(mp.parse_listen(["[::]:8143", "ipv6only=off"]).ipv6only, False)
        self.assertIs(mp.parse_listen(["[::]:8143", "ipv6only=on"]).ipv6only, True)
        self.assertEqual(mp.parse_listen(["127.0.0.1:8143", "rcvbuf=64k"]).rcvbuf, 65536)
        self.assertEqual(mp.parse_listen(["127.0.0.1:8143", "bind"]).port, 8143)

    def test_listen_refused(self):
        bad = mp.parse_listen
        self.assertRefused(bad, ["127.0.0.1:8143", "bogus"], 'invalid parameter "bogus"')
        self.assertRefused(bad, ["127.0.0.1:8143", "backlog="], 'invalid parameter "backlog="')
        self.assertRefused(bad, ["127.0.0.1:8143", "backlog=x"], 'invalid number "x"')
        self.assertRefused(bad, ["127.0.0.1:8143", "ipv6only=maybe"],
                           'invalid value "maybe", it must be "on" or "off"')
        self.assertRefused(bad, ["127.0.0.1:8143", "so_keepalive=1:2"],
                           'invalid so_keepalive value "1:2"')
        self.assertTrue(mp.parse_listen(["127.0.0.1:8143", "ssl"]).ssl)
        self.assertTrue(mp.parse_listen(["127.0.0.1:8143", "proxy_protocol"]).proxy_protocol)
        self.assertRefused(bad, ["localhost:8143"], '"localhost" is not an IP address (listen takes addresses)')
        self.assertRefused(bad, ["mail.example.com:143"])
        self.assertRefused(bad, ["127.0.0.1:0"], 'invalid port in "127.0.0.1:0"')
        self.assertRefused(bad, ["70000"], 'invalid port in "70000"')
        self.assertRefused(bad, ["::1:8143"])
        self.assertRefused(bad, ["[::1]"])
        self.assertRefused(bad, ["unix:"], 'no path in the unix domain socket "unix:"')
        long_path = "unix:/" + "x" * 107              # sun_path: 108 bytes with the NUL
        self.assertRefused(bad, [long_path], 'too long path in the unix domain socket "%s"' % long_path)
        self.assertRefused(bad, [], "needs an address")

    def test_listen_on_a_unix_socket(self):
        # nginx's "listen unix:PATH": the path is the key and the text nginx logs.
        listen = mp.parse_listen(["unix:/run/mail/imap.sock", "proxy_protocol", "backlog=8"])
        self.assertEqual((listen.host, listen.port, listen.family),
                         ("unix:/run/mail/imap.sock", 0, socket.AF_UNIX))
        self.assertEqual(listen.text, "unix:/run/mail/imap.sock")
        self.assertTrue(listen.proxy_protocol)
        self.assertEqual(listen.backlog, 8)
        # Relative to the file's directory, as every other path of the file.
        self.assertEqual(mp.parse_listen(["unix:run/imap.sock"], "/etc/mailproxy").host,
                         "unix:/etc/mailproxy/run/imap.sock")
        # TCP flags load (nginx accepts them) and do nothing on a unix socket.
        mp.parse_listen(["unix:/run/imap.sock", "so_keepalive=on", "ipv6only=on", "bind"])

    def test_a_unix_socket_given_twice_is_refused(self):
        path, errors = config_errors(self, """\
            [mail]
            proxy_pass = 127.0.0.1:1143

            [server a]
            listen = unix:/tmp/mailproxy-imap.sock
            protocol = imap

            [server b]
            listen = unix:/tmp/mailproxy-imap.sock
                     127.0.0.1:18143
            protocol = imap
        """)
        self.assertEqual([e.message for e in errors],
                         ['duplicate "unix:/tmp/mailproxy-imap.sock" address and port pair'])

    def test_proxy_header_to_the_backend_from_a_unix_socket_is_unknown(self):
        # nginx: UNKNOWN (v1) or LOCAL (v2) when a side is not TCP.
        self.assertEqual(mp.proxy_protocol_v1(("unix:", 0), ("unix:", 0)), b"PROXY UNKNOWN\r\n")
        self.assertEqual(mp.proxy_protocol_v1(("192.0.2.7", 4000), ("unix:", 0)),
                         b"PROXY UNKNOWN\r\n")
        self.assertEqual(mp.proxy_protocol_v2(("unix:", 0), ("unix:", 0)),
                         mp.PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00")


# -- -t: one broken file per kind of error ------------------------------------------

BROKEN_CONFIGS = {
    "unknown_directive": BASE_CONFIG + """\
    bogus_directive = 1
    """,
    "listen_in_mail": """\
    [mail]
    proxy_pass = 127.0.0.1:1143
    listen = 127.0.0.1:18144

    [server imap]
    listen = 127.0.0.1:18143
    protocol = imap
    """,
    "main_directive_in_server": BASE_CONFIG + """\
    worker_connections = 10
    """,
    "mail_directive_in_main": """\
    [main]
    timeout = 5s
    """ + BASE_CONFIG,
    "duplicate_directive": """\
    [mail]
    proxy_pass = 127.0.0.1:1143
    timeout = 5s
    timeout = 6s

    [server imap]
    listen = 127.0.0.1:18143
    protocol = imap
    """,
    "duplicate_section": BASE_CONFIG + """\
    [mail]
    timeout = 5s
    """,
    "bad_size": BASE_CONFIG + """\
    proxy_buffer = 16q
    """,
    "bad_time": BASE_CONFIG + """\
    timeout = 1x
    """,
    "two_times": BASE_CONFIG + """\
    timeout = 1h 30m
    """,
    "bad_flag": BASE_CONFIG + """\
    proxy_pass_error_message = maybe
    """,
    "bad_number": BASE_CONFIG + """\
    max_errors = many
    """,
    "bad_protocol": """\
    [mail]
    proxy_pass = 127.0.0.1:1143

    [server imap]
    listen = 127.0.0.1:18143
    protocol = ftp
    """,
    "bad_log_level": """\
    [main]
    error_log = stderr loud
    """ + BASE_CONFIG,
    "removed_ssl": BASE_CONFIG + """\
    ssl = on
    """,
    "no_listen": """\
    [mail]
    proxy_pass = 127.0.0.1:1143

    [server imap]
    protocol = imap
    """,
    "no_proxy_pass": """\
    [server imap]
    listen = 127.0.0.1:18143
    protocol = imap
    """,
    "unknown_protocol": """\
    [mail]
    proxy_pass = 127.0.0.1:1143

    [server imap]
    listen = 127.0.0.1:18143
    """,
    "duplicate_pair": BASE_CONFIG + """\

    [server second]
    listen = 127.0.0.1:18143
    protocol = imap
    """,
    "unknown_section": BASE_CONFIG + """\

    [mian]
    worker_connections = 10
    """,
    "bad_users": BASE_CONFIG + """\

    [users]
    dave = secret
    erin = {MD5}5f4dcc3b5aa765d61d8327deb882cf99
    frank = {SHA512-CRYPT}$6$short$tooshort
    gina = {SHA256-CRYPT}nothing
    hank = {PBKDF2-SHA256}not-rounds
    """,
    "bad_routes": BASE_CONFIG + """\

    [routes]
    carol = 127.0.0.1:99999
    dan = 127.0.0.1:1143 extra
    """,
    "nginx_syntax": """\
    [mail]
    proxy_pass = 127.0.0.1:1143

    [server imap]
    listen 127.0.0.1:18143;
    protocol = imap
    """,
    "no_section_header": """\
    timeout = 5s
    """ + BASE_CONFIG,
    "many_errors": """\
    [main]
    worker_connections = lots

    [mail]
    timeout = soon
    bogus = 1

    [server imap]
    listen = 127.0.0.1:18143
    protocol = imap
    proxy_buffer = big

    [users]
    eve = nope
    """,
}


def unsupported_config_text() -> str:
    """A file that uses every directive the table marks "not supported yet"
    (the list shrinks as features land), and worker_processes = 4."""
    def names(context):
        return ["%s = x" % name for name, d in sorted(mp.DIRECTIVES.items())
                if not d.supported and context in d.contexts]
    return "\n".join(["[main]", "worker_processes = 4"] + names("main") +
                     ["", "[mail]", "proxy_pass = 127.0.0.1:1143"] + names("mail") +
                     ["", "[server imap]", "listen = 127.0.0.1:18143", "protocol = imap"] +
                     [line for line in names("server") if line not in names("mail")] + [""])


class ConfigCheckCommandTests(unittest.TestCase):
    """``mailproxy.py -t -c FILE``: every broken file exits 1 and names the
    file, the line, the section, the directive and the problem.  The
    subprocesses of all files run at once, in setUpClass."""

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.TemporaryDirectory(prefix="mailproxy-t-")
        running = {}
        cases = dict(BROKEN_CONFIGS, not_supported=unsupported_config_text())
        for name, text in cases.items():
            path = write_file(cls.directory.name, name + ".conf", text)
            running[name] = (path, text, subprocess.Popen(
                [sys.executable, MAILPROXY, "-t", "-c", path], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        cls.results = {}
        for name, (path, text, proc) in running.items():
            out, err = proc.communicate(timeout=30)
            cls.results[name] = (path, text, proc.returncode, out.decode(), err.decode())

    @classmethod
    def tearDownClass(cls):
        cls.directory.cleanup()

    def assertReported(self, case, section, directive, message, at=None, occurrence=1):
        """``case`` exited 1 with a line naming the file and the line that
        starts with ``at`` (default: ``directive =``), [section], the directive
        and ``message``."""
        path, text, status, out, err = self.results[case]
        self.assertEqual(status, 1, err)
        self.assertIn("mailproxy: configuration file %s test failed" % path, err)
        line = line_of(text, at or "%s =" % directive, occurrence)
        wanted = ["[emerg]", "%s:%d:" % (path, line), "[%s]" % section, message]
        if directive is not None:
            wanted.append(" %s:" % directive)
        for reported in err.splitlines():
            if all(part in reported for part in wanted):
                return reported
        self.fail("no line with %r in:\n%s" % (wanted, err))

    def test_sample_conf_is_valid(self):
        sample = os.path.join(HERE, "sample.conf")
        status, out, err = run_mailproxy(["-t", "-c", sample])
        self.assertEqual(status, 0, err)
        self.assertIn("the configuration file %s syntax is ok" % sample, err)
        self.assertIn("configuration file %s test is successful" % sample, err)
        self.assertNotIn("[emerg]", err)

    def test_default_file_is_mailproxy_conf_in_the_working_directory(self):
        directory = TempDir(self)
        directory.write("mailproxy.conf", BROKEN_CONFIGS["unknown_directive"])
        status, out, err = run_mailproxy(["-t"], cwd=directory.path)
        self.assertEqual(status, 1)
        self.assertIn("mailproxy.conf", err)
        self.assertIn('unknown directive "bogus_directive"', err)

    def test_without_c_and_without_a_default_file_nothing_runs(self):
        """sample.conf beside the script is never taken: its demo user must
        not go live because -c was forgotten (INTERFACE.md)."""
        if os.path.exists("/etc/mailproxy/mailproxy.conf"):
            self.skipTest("this host has /etc/mailproxy/mailproxy.conf")
        home = TempDir(self)
        for name in ("mailproxy.py", "sample.conf"):
            with open(os.path.join(HERE, name)) as handle:
                home.write(name, handle.read())
        elsewhere = TempDir(self)
        for args in (["-t"], []):
            done = subprocess.run([sys.executable, os.path.join(home.path, "mailproxy.py")] + args,
                                  cwd=elsewhere.path, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
            err = done.stderr.decode()
            self.assertEqual(done.returncode, 1, err)
            self.assertIn("mailproxy: [emerg] no configuration file: neither ./mailproxy.conf nor "
                          "/etc/mailproxy/mailproxy.conf exists; give one with -c FILE", err)
            self.assertNotIn("syntax is ok", err)
            self.assertNotIn("started", err)

    def test_t_binds_every_listener(self):
        """As nginx -t: an address the host does not have fails the check
        with bind()'s message (192.0.2.1 is TEST-NET-1, nobody's)."""
        port = free_port()
        path = TempDir(self).write("mailproxy.conf", file_text([BASE_CONFIG.replace(
            "127.0.0.1:18143", "192.0.2.1:%d" % port)]))
        status, out, err = run_mailproxy(["-t", "-c", path])
        self.assertEqual(status, 1, err)
        self.assertIn("mailproxy: [emerg] bind() to 192.0.2.1:%d failed (%d: %s)"
                      % (port, errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL)), err)
        self.assertIn("configuration file %s test failed" % path, err)

    def test_t_opens_the_log_files(self):
        """As nginx -t: a log that cannot be opened fails the check, in
        nginx's words, as it would fail the start."""
        directory = TempDir(self)
        log_path = os.path.join(directory.path, "missing", "error.log")
        path = directory.write("mailproxy.conf", file_text([BASE_CONFIG, """
            [main]
            error_log = %s info
        """ % log_path]))
        message = ('mailproxy: [emerg] open() "%s" failed (%d: %s)\n'
                   % (log_path, errno.ENOENT, os.strerror(errno.ENOENT)))
        for args in (["-t", "-c", path], ["-c", path]):
            status, out, err = run_mailproxy(args)
            self.assertEqual(status, 1, err)
            self.assertIn(message, err)
            self.assertNotIn("started", err)

    def test_t_passes_a_port_in_use(self):
        """A port in use is the running proxy's (nginx -t ignores
        EADDRINUSE); the other listen is bound (and released) all the same."""
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            busy = holder.getsockname()[1]
            free = free_port()
            path = TempDir(self).write("mailproxy.conf", file_text([BASE_CONFIG.replace(
                "127.0.0.1:18143", "127.0.0.1:%d\n        127.0.0.1:%d" % (busy, free))]))
            status, out, err = run_mailproxy(["-t", "-c", path])
        self.assertEqual(status, 0, err)
        self.assertIn("test is successful", err)

    def test_unknown_directive(self):
        self.assertReported("unknown_directive", "server imap", "bogus_directive",
                            'unknown directive "bogus_directive"')

    def test_directive_in_the_wrong_section(self):
        self.assertReported("listen_in_mail", "mail", "listen",
                            '"listen" directive is not allowed in [mail]')
        self.assertReported("main_directive_in_server", "server imap", "worker_connections",
                            '"worker_connections" directive is not allowed in [server NAME]')
        self.assertReported("mail_directive_in_main", "main", "timeout",
                            '"timeout" directive is not allowed in [main]')

    def test_duplicate_directive(self):
        self.assertReported("duplicate_directive", "mail", "timeout",
                            '"timeout" directive is duplicate', occurrence=2)

    def test_duplicate_section(self):
        self.assertReported("duplicate_section", "mail", None, "section is duplicated",
                            at="[mail]", occurrence=2)

    def test_bad_values(self):
        self.assertReported("bad_size", "server imap", "proxy_buffer", 'invalid size "16q"')
        self.assertReported("bad_time", "server imap", "timeout", 'invalid time "1x"')
        self.assertReported("two_times", "server imap", "timeout", "takes one value, got 2")
        self.assertReported("bad_flag", "server imap", "proxy_pass_error_message",
                            'invalid value "maybe", it must be "on" or "off"')
        self.assertReported("bad_number", "server imap", "max_errors", 'invalid number "many"')
        self.assertReported("bad_protocol", "server imap", "protocol", 'unknown protocol "ftp"')
        self.assertReported("bad_log_level", "main", "error_log", 'invalid log level "loud"')

    def test_not_supported_yet(self):
        for name, directive in sorted(mp.DIRECTIVES.items()):
            if not directive.supported:
                section = "main" if "main" in directive.contexts else (
                    "mail" if "mail" in directive.contexts else "server imap")
                self.assertReported("not_supported", section, name, '"%s" is not supported yet' % name)

    def test_a_row_marked_unsupported_is_refused(self):
        # Every directive is built now; the mechanism stays for the next ones.
        row = mp.Directive("future_directive", mp.MAIL, mp.parse_flag, False, supported=False)
        mp.DIRECTIVES[row.name] = row
        try:
            with self.assertRaises(mp.ConfigValueError) as caught:
                mp.parse_directive("mail", row.name, "on", "/")
        finally:
            del mp.DIRECTIVES[row.name]
        self.assertEqual(str(caught.exception), '"future_directive" is not supported yet')

    def test_removed_ssl_directive(self):
        reported = self.assertReported("removed_ssl", "server imap", "ssl", "1.25.1")
        self.assertIn('"ssl" directive was removed', reported)
        self.assertIn("listen ... ssl", reported)

    def test_missing_listen(self):
        self.assertReported("no_listen", "server imap", "listen",
                            'no "listen" is defined for server', at="[server imap]")

    def test_missing_proxy_pass(self):
        self.assertReported("no_proxy_pass", "server imap", "proxy_pass",
                            'no "proxy_pass" is defined for server', at="[server imap]")

    def test_unknown_protocol(self):
        self.assertReported("unknown_protocol", "server imap", "protocol",
                            "unknown mail protocol for server", at="[server imap]")

    def test_duplicate_address_and_port_pair(self):
        self.assertReported("duplicate_pair", "server second", "listen",
                            'duplicate "127.0.0.1:18143" address and port pair', occurrence=2)

    def test_unknown_section(self):
        self.assertReported("unknown_section", "mian", None, 'unknown section "[mian]"', at="[mian]")

    def test_bad_users(self):
        self.assertReported("bad_users", "users", "dave", "must start with a {SCHEME}")
        self.assertReported("bad_users", "users", "erin", 'unknown password scheme "{MD5}"')
        self.assertReported("bad_users", "users", "frank", "{SHA512-CRYPT} data must be a $6$ crypt string")
        self.assertReported("bad_users", "users", "gina", "{SHA256-CRYPT} data must be a $5$ crypt string")
        self.assertReported("bad_users", "users", "hank", "{PBKDF2-SHA256} data must be ROUNDS$SALT$HASH")

    def test_bad_routes(self):
        self.assertReported("bad_routes", "routes", "carol", 'invalid port in "127.0.0.1:99999"')
        self.assertReported("bad_routes", "routes", "dan", "invalid address")

    def test_line_without_equals_sign(self):
        # A line without "=" (nginx syntax pasted in) is reported with its
        # line, section and text, not as configparser's bare ParsingError.
        self.assertReported("nginx_syntax", "server imap", None, "listen 127.0.0.1:18143;",
                            at="listen 127.0.0.1")

    def test_directive_before_any_section(self):
        path, text, status, out, err = self.results["no_section_header"]
        self.assertEqual(status, 1)
        self.assertIn("[emerg] %s:1: " % path, err)
        self.assertIn("section", err)

    def test_every_error_of_a_file_is_reported(self):
        self.assertReported("many_errors", "main", "worker_connections", 'invalid number "lots"')
        self.assertReported("many_errors", "mail", "timeout", 'invalid time "soon"')
        self.assertReported("many_errors", "mail", "bogus", 'unknown directive "bogus"')
        self.assertReported("many_errors", "server imap", "proxy_buffer", 'invalid size "big"')
        self.assertReported("many_errors", "server imap", "proxy_pass",
                            'no "proxy_pass" is defined', at="[server imap]")
        self.assertReported("many_errors", "users", "eve", "must start with a {SCHEME}")

    def test_file_that_does_not_exist(self):
        missing = os.path.join(TempDir(self).path, "missing.conf")
        status, out, err = run_mailproxy(["-t", "-c", missing])
        self.assertEqual(status, 1)
        self.assertIn(missing, err)
        self.assertIn("No such file or directory", err)
        self.assertIn("test failed", err)

    def test_errors_stop_the_start_too(self):
        path, text, _, _, _ = self.results["unknown_directive"]
        status, out, err = run_mailproxy(["-c", path], timeout=10)
        self.assertEqual(status, 1)
        self.assertIn('unknown directive "bogus_directive"', err)


# -- loading: merge, defaults, multi-line values ------------------------------------

class ConfigLoadTests(unittest.TestCase):

    def servers(self, config):
        return {server.name: server for server in config.servers}

    def test_nginx_defaults(self):
        config = load_text(self, BASE_CONFIG)
        server = config.servers[0]
        self.assertEqual(server.name, "imap")
        self.assertEqual(server.protocol, "imap")
        self.assertEqual(server.timeout, 60)
        self.assertEqual(server.proxy_timeout, 24 * 3600)
        self.assertEqual(server.proxy_buffer, 4096)
        self.assertEqual(server.imap_client_buffer, 4096)
        self.assertEqual(server.max_errors, 5)
        self.assertEqual(server.imap_capabilities, ["IMAP4", "IMAP4rev1", "UIDPLUS"])
        self.assertEqual(server.imap_auth, ["plain"])
        self.assertEqual(server.pop3_capabilities, ["TOP", "USER", "UIDL"])
        self.assertEqual(server.pop3_auth, ["plain"])
        self.assertEqual(server.pop3_client_buffer, 128)
        self.assertIs(server.proxy_pass_error_message, False)
        self.assertEqual(server.server_name, socket.gethostname())
        self.assertEqual((server.proxy_pass.host, server.proxy_pass.port), ("127.0.0.1", 1143))
        self.assertEqual(config.main.worker_connections, 1024)
        self.assertEqual(config.main.worker_processes, 1)
        self.assertEqual(config.main.error_log, [mp.ErrorLogSpec("stderr", "info")])
        self.assertEqual(config.users, {})
        self.assertEqual(config.routes, {})

    def test_mail_values_reach_every_server_and_a_server_overrides_them(self):
        config = load_text(self, """\
            [mail]
            proxy_pass = 127.0.0.1:1143
            timeout = 7s
            imap_capabilities = A B
            server_name = mail.example.test

            [server one]
            listen = 127.0.0.1:18143
            protocol = imap

            [server two]
            listen = 127.0.0.1:18144
            protocol = imap
            timeout = 9s
            imap_capabilities = C
            proxy_pass = 127.0.0.2:2143
        """)
        servers = self.servers(config)
        self.assertEqual(servers["one"].timeout, 7)
        self.assertEqual(servers["two"].timeout, 9)
        self.assertEqual(servers["one"].imap_capabilities, ["A", "B"])
        self.assertEqual(servers["two"].imap_capabilities, ["C"])     # replaced, not added
        self.assertEqual(servers["one"].server_name, "mail.example.test")
        self.assertEqual(servers["two"].server_name, "mail.example.test")
        self.assertEqual(servers["one"].proxy_pass.text, "127.0.0.1:1143")
        self.assertEqual(servers["two"].proxy_pass.text, "127.0.0.2:2143")
        self.assertEqual(servers["two"].proxy_pass.addresses, ((socket.AF_INET, ("127.0.0.2", 2143)),))

    def test_protocol_from_the_port(self):
        servers = self.servers(load_text(self, """\
            [mail]
            proxy_pass = 127.0.0.1:1143

            [server i]
            listen = 127.0.0.1:143

            [server p]
            listen = 127.0.0.1:110

            [server explicit]
            listen = 127.0.0.1:18110
                     127.0.0.2:110
            protocol = imap
        """))
        self.assertEqual(servers["i"].protocol, "imap")
        self.assertEqual(servers["p"].protocol, "pop3")
        self.assertEqual(servers["explicit"].protocol, "imap")

    def test_multi_line_values(self):
        servers = self.servers(load_text(self, """\
            [mail]
            proxy_pass = 127.0.0.1:1143
            imap_capabilities = IMAP4rev1 ID
                                "X-ONE TWO" THREE
                                LITERAL+
            server_name = "mail
                example"

            [server imap]
            listen = 127.0.0.1:18143
                     127.0.0.1:18144 backlog=7
            protocol = imap
            imap_auth = plain
                        LOGIN
        """))
        server = servers["imap"]
        self.assertEqual([(l.host, l.port, l.backlog) for l in server.listen],
                         [("127.0.0.1", 18143, 511), ("127.0.0.1", 18144, 7)])
        self.assertEqual(server.imap_capabilities, ["IMAP4rev1", "ID", "X-ONE TWO", "THREE", "LITERAL+"])
        self.assertEqual(server.imap_auth, ["plain", "login"])
        self.assertEqual(server.server_name, "mail example")           # joined with a space

    def test_a_single_value_continued_is_one_occurrence(self):
        path, errors = config_errors(self, BASE_CONFIG, """\
            timeout = 1m
              30s
        """)
        self.assertEqual([(e.section, e.directive, e.message) for e in errors],
                         [("server imap", "timeout", "takes one value, got 2")])

    def test_value_begins_on_the_next_line(self):
        server = load_text(self, """\
            [mail]
            proxy_pass = 127.0.0.1:1143

            [server imap]
            listen =
                127.0.0.1:18143
                127.0.0.1:18144
            protocol = imap
        """).servers[0]
        self.assertEqual([l.port for l in server.listen], [18143, 18144])

    def test_percent_is_an_ordinary_character(self):
        server = load_text(self, BASE_CONFIG, """\
            server_name = 100%(name)s%%
            imap_capabilities = X-50% %Y
        """).servers[0]
        self.assertEqual(server.server_name, "100%(name)s%%")
        self.assertEqual(server.imap_capabilities, ["X-50%", "%Y"])

    def test_quoted_arguments(self):
        server = load_text(self, BASE_CONFIG, """\
            imap_capabilities = "X-ONE TWO" THREE
            pop3_capabilities = 'SASL PLAIN' "quote \\" inside"
        """).servers[0]
        self.assertEqual(server.imap_capabilities, ["X-ONE TWO", "THREE"])
        self.assertEqual(server.pop3_capabilities, ["SASL PLAIN", 'quote " inside'])

    def test_relative_error_log_is_taken_from_the_config_directory(self):
        directory = TempDir(self)
        path = directory.write("mailproxy.conf", """\
            [main]
            error_log = logs/mail.log info
                        /var/log/absolute.log
                        stderr debug
        """ + BASE_CONFIG)
        config = mp.load_config(path)
        base = os.path.dirname(os.path.abspath(path))
        self.assertEqual(config.main.error_log, [
            mp.ErrorLogSpec(os.path.join(base, "logs", "mail.log"), "info"),
            mp.ErrorLogSpec("/var/log/absolute.log", "error"),       # nginx's default level
            mp.ErrorLogSpec("stderr", "debug")])

    def test_keys_are_case_sensitive(self):
        path, errors = config_errors(self, BASE_CONFIG, """\
            Timeout = 5s
        """)
        self.assertEqual([e.message for e in errors], ['unknown directive "Timeout"'])

    def test_error_fields(self):
        path, errors = config_errors(self, BASE_CONFIG, """\
            timeout = 1x
        """)
        self.assertEqual(len(errors), 1)
        error = errors[0]
        self.assertEqual((error.file, error.section, error.directive, error.line),
                         (path, "server imap", "timeout", 7))
        self.assertEqual(str(error), '%s:7: [server imap] timeout: invalid time "1x"' % path)

    def test_duplicate_pair_within_one_server_and_by_wildcard_spelling(self):
        path, errors = config_errors(self, """\
            [mail]
            proxy_pass = 127.0.0.1:1143

            [server a]
            listen = 127.0.0.1:18143
                     127.0.0.1:18143
            protocol = imap

            [server b]
            listen = *:18150
            protocol = imap

            [server c]
            listen = 18150
            protocol = imap
        """)
        messages = sorted(e.message for e in errors)
        self.assertEqual(messages, ['duplicate "0.0.0.0:18150" address and port pair',
                                    'duplicate "127.0.0.1:18143" address and port pair'])

    def test_duplicate_pair_in_another_ipv6_spelling(self):
        # [::1] and [0:0::1] are one address: -t must refuse the pair, or
        # the start would fail in bind().
        path, errors = config_errors(self, """\
            [mail]
            proxy_pass = 127.0.0.1:1143

            [server a]
            listen = [::1]:18150
            protocol = imap

            [server b]
            listen = [0:0::1]:18150
            protocol = imap
        """)
        self.assertEqual([e.message for e in errors],
                         ['duplicate "[::1]:18150" address and port pair'])

    def test_a_bad_value_is_not_also_reported_missing(self):
        # A listen/proxy_pass whose value is refused is reported once, not
        # also as 'no "listen" is defined for server'.
        path, errors = config_errors(self, """\
            [server imap]
            listen = 127.0.0.1:18143 bogus
            protocol = imap
            proxy_pass = 127.0.0.1:99999
        """)
        self.assertEqual(sorted((e.directive, e.message) for e in errors), [
            ("listen", 'invalid parameter "bogus"'),
            ("proxy_pass", 'invalid port in "127.0.0.1:99999"')])


# -- [users] and [routes] -----------------------------------------------------------

class ConfigUsersRoutesTests(unittest.TestCase):

    def test_password_kept_verbatim(self):
        config = load_text(self, BASE_CONFIG, """\

            [users]
            alice@example.com = {PLAIN}pa ss%+"q
            bob = {PLAIN}#not a comment; nor this
            carol = {PLAIN}'single' "double" \\back
        """)
        self.assertEqual(config.users["alice@example.com"], mp.PasswordEntry("PLAIN", 'pa ss%+"q'))
        self.assertEqual(config.users["bob"].data, "#not a comment; nor this")
        self.assertEqual(config.users["carol"].data, "'single' \"double\" \\back")
        self.assertTrue(mp.password_matches(config.users["alice@example.com"], b'pa ss%+"q'))
        self.assertFalse(mp.password_matches(config.users["alice@example.com"], b"pa ss%+q"))

    def test_scheme_names_are_case_insensitive(self):
        sha512 = mp.hash_password(b"pw1", "SHA512-CRYPT")[len("{SHA512-CRYPT}"):]
        pbkdf2 = mp.hash_password(b"pw2", "PBKDF2-SHA256", rounds=1000)[len("{PBKDF2-SHA256}"):]
        config = load_text(self, BASE_CONFIG, """\

            [users]
            a = {plain}secret
            b = {Sha512-Crypt}%s
            c = {pbkdf2-sha256}%s
        """ % (sha512, pbkdf2))
        self.assertEqual(config.users["a"], mp.PasswordEntry("PLAIN", "secret"))
        self.assertEqual(config.users["b"].scheme, "SHA512-CRYPT")
        self.assertEqual(config.users["c"].scheme, "PBKDF2-SHA256")
        self.assertTrue(mp.password_matches(config.users["b"], b"pw1"))
        self.assertTrue(mp.password_matches(config.users["c"], b"pw2"))
        self.assertFalse(mp.password_matches(config.users["c"], b"pw1"))

    def test_logins_are_case_sensitive_keys(self):
        config = load_text(self, BASE_CONFIG, """\

            [users]
            Alice = {PLAIN}one
            alice = {PLAIN}two
        """)
        self.assertEqual(config.users["Alice"].data, "one")
        self.assertEqual(config.users["alice"].data, "two")

    def test_malformed_pbkdf2_data_is_refused_when_loading(self):
        # Malformed data must fail -t: passed through, password_matches
        # would raise at the user's first login and end the whole process.
        for data in ["0$c2FsdHNhbHQ=$AAAA", "1000$c2FsdA$AAAA", "1000$c2FsdA==$A"]:
            with self.subTest(data=data):
                config_errors(self, BASE_CONFIG, """\

                    [users]
                    zed = {PBKDF2-SHA256}%s
                """ % data)

    def test_routes(self):
        config = load_text(self, BASE_CONFIG, """\

            [routes]
            @example.com = 127.0.0.2
            bob = 127.0.0.3:2143
            bob@example.com = 127.0.0.4:3143
            v6 = [::1]
        """)
        proxy_pass = config.servers[0].proxy_pass
        route = mp.route_for(config.routes, proxy_pass, "alice@example.com")
        self.assertEqual((route.host, route.port), ("127.0.0.2", 1143))      # proxy_pass's port
        self.assertEqual(route.addresses, ((socket.AF_INET, ("127.0.0.2", 1143)),))
        route = mp.route_for(config.routes, proxy_pass, "bob")
        self.assertEqual((route.host, route.port), ("127.0.0.3", 2143))
        self.assertEqual(route.addresses, ((socket.AF_INET, ("127.0.0.3", 2143)),))
        route = mp.route_for(config.routes, proxy_pass, "bob@example.com")   # login before domain
        self.assertEqual((route.host, route.port), ("127.0.0.4", 3143))
        route = mp.route_for(config.routes, proxy_pass, "v6")
        self.assertEqual((route.host, route.port), ("::1", 1143))
        self.assertEqual(route.addresses[0][1][:2], ("::1", 1143))
        self.assertIs(mp.route_for(config.routes, proxy_pass, "carol@other.test"), proxy_pass)
        self.assertIs(mp.route_for(config.routes, proxy_pass, "carol"), proxy_pass)

    def test_route_port_follows_each_servers_proxy_pass(self):
        config = load_text(self, """\
            [server imap]
            listen = 127.0.0.1:18143
            protocol = imap
            proxy_pass = 127.0.0.1:1143

            [server pop3]
            listen = 127.0.0.1:18110
            protocol = pop3
            proxy_pass = 127.0.0.1:1110

            [routes]
            @example.com = 127.0.0.2
        """)
        ports = [mp.route_for(config.routes, server.proxy_pass, "x@example.com").port
                 for server in config.servers]
        self.assertEqual(ports, [1143, 1110])

    TWO_SERVERS = """\
        [server imap]
        listen = 127.0.0.1:18143
        protocol = imap
        proxy_pass = 127.0.0.1:1143

        [server pop3]
        listen = 127.0.0.1:18110
        protocol = pop3
        proxy_pass = 127.0.0.1:1110
    """

    def test_routes_per_protocol(self):
        # Issue 15: carol's POP3 went to the IMAP port of her route.
        config = load_text(self, self.TWO_SERVERS, """\

            [routes]
            carol = imap=127.0.0.5:2143 pop3=127.0.0.6:2110
            dave = 127.0.0.7 pop3=127.0.0.8:3110
            erin = imap=[::1]
            @example.com = 127.0.0.9
        """)
        imap, pop3 = config.servers

        def where(server, login):
            route = mp.route_for(config.routes, server.proxy_pass, login, server.protocol)
            return route.host, route.port, route.addresses[0][1][:2]
        self.assertEqual(where(imap, "carol"), ("127.0.0.5", 2143, ("127.0.0.5", 2143)))
        self.assertEqual(where(pop3, "carol"), ("127.0.0.6", 2110, ("127.0.0.6", 2110)))
        self.assertEqual(where(imap, "dave"), ("127.0.0.7", 1143, ("127.0.0.7", 1143)))
        self.assertEqual(where(pop3, "dave"), ("127.0.0.8", 3110, ("127.0.0.8", 3110)))
        self.assertEqual(where(imap, "erin"), ("::1", 1143, ("::1", 1143)))
        # An entry without an address for the protocol does not route it:
        # the domain's entry, then proxy_pass, decide.
        self.assertEqual(where(pop3, "erin"), ("127.0.0.1", 1110, ("127.0.0.1", 1110)))
        self.assertEqual(where(pop3, "erin@example.com"), ("127.0.0.9", 1110, ("127.0.0.9", 1110)))
        self.assertEqual(config.warnings, ())

    def test_bad_routes_per_protocol(self):
        for value, message in [("imap=127.0.0.1:1 imap=127.0.0.1:2", "two addresses for imap"),
                               ("127.0.0.1 127.0.0.2", "two addresses for every protocol"),
                               ("sieve=127.0.0.1:4190", 'unknown protocol "sieve"'),
                               ("pop3=", "invalid address"),
                               ("imap=127.0.0.1:99999", "invalid port")]:
            with self.subTest(value=value):
                _, errors = config_errors(self, BASE_CONFIG, "\n[routes]\ncarol = %s\n" % value)
                self.assertEqual([(e.section, e.directive) for e in errors], [("routes", "carol")])
                self.assertIn(message, errors[0].message)

    def test_auth_backend_allows_only_clear_passwords_and_no_auth_http(self):
        for server, directive, message in [
                ("imap_auth = plain cram-md5", "imap_auth", '"cram-md5" cannot be used with '
                 '"auth = backend": the client sends a digest'),
                ("imap_auth = external", "imap_auth", "a client certificate has no password"),
                ("protocol = pop3\npop3_auth = apop", "pop3_auth", '"apop" cannot be used'),
                ("protocol = smtp\nsmtp_auth = none", "smtp_auth", "mail without login"),
                ("auth_http = http://127.0.0.1:9000/auth", "auth", '"auth = backend" and "auth_http" '
                 "exclude each other")]:
            with self.subTest(server=server):
                if not server.startswith("protocol"):
                    server = "protocol = imap\n" + server
                text = ("[server imap]\nlisten = 127.0.0.1:18143\nproxy_pass = 127.0.0.1:1143\n"
                        "auth = backend\n%s\n" % server)
                _, errors = config_errors(self, text)
                self.assertEqual([(e.section, e.directive) for e in errors],
                                 [("server imap", directive)])
                self.assertIn(message, errors[0].message)
        config = load_text(self, BASE_CONFIG, "    auth = backend\n    imap_auth = plain login\n")
        self.assertEqual(config.servers[0].auth, "backend")
        self.assertEqual(load_text(self, BASE_CONFIG).servers[0].auth, "users")

    def test_route_with_a_port_used_by_two_protocols_is_warned_of(self):
        config = load_text(self, self.TWO_SERVERS, """\

            [routes]
            carol = 127.0.0.5:2143
            dave = 127.0.0.5
            erin = imap=127.0.0.5:2143 pop3=127.0.0.5:2110
            frank = 127.0.0.5:2143 pop3=127.0.0.5:2110
            gina = [::1]:2143
        """)
        self.assertEqual([(w.section, w.directive) for w in config.warnings],
                         [("routes", "carol"), ("routes", "gina")])
        self.assertIn('"[::1]:2143" sends the imap and pop3 servers\' users to one port, 2143: give '
                      'each protocol its own ("imap=[::1]:PORT pop3=[::1]:PORT")',
                      config.warnings[1].message)
        self.assertIn('"127.0.0.5:2143" sends the imap and pop3 servers\' users to one port, 2143',
                      config.warnings[0].message)
        self.assertIn("imap=127.0.0.5:PORT pop3=127.0.0.5:PORT", config.warnings[0].message)
        # One protocol using [routes] (the other asks auth_http): nothing to warn of.
        config = load_text(self, self.TWO_SERVERS.replace(
            "protocol = pop3", "protocol = pop3\n        auth_http = 127.0.0.1:9000"),
            "\n[routes]\ncarol = 127.0.0.5:2143\n")
        self.assertEqual(config.warnings, ())

    def test_cram_md5_or_apop_with_hashed_users_is_warned_of(self):
        """Issue 15: a hashed user got "Invalid login or password" for a
        CRAM-MD5 login and only the log said why."""
        hashed = "    bob = %s\n" % DOVECOT_SECRET["SHA512-CRYPT"]
        config = load_text(self, BASE_CONFIG, "    imap_auth = plain cram-md5\n",
                           "\n    [users]\n    alice = {PLAIN}secret\n", hashed)
        self.assertEqual([(w.section, w.directive) for w in config.warnings],
                         [("server imap", "imap_auth")])
        self.assertIn('"cram-md5" works only for users with a {PLAIN} password; 1 of the 2 in '
                      "[users] is hashed (bob)", config.warnings[0].message)
        for quiet in ("    imap_auth = plain login\n",                    # no salted method
                      "    imap_auth = plain cram-md5\n    auth_http = 127.0.0.1:9000\n"):
            config = load_text(self, BASE_CONFIG, quiet, "\n    [users]\n", hashed)
            self.assertEqual(config.warnings, (), quiet)
        config = load_text(self, BASE_CONFIG, "    imap_auth = plain cram-md5\n",
                           "\n    [users]\n    alice = {PLAIN}secret\n")      # all {PLAIN}
        self.assertEqual(config.warnings, ())

    def test_auth_backend_without_proxy_pass_says_what_it_is_for(self):
        _, errors = config_errors(self, "[server imap]\nlisten = 127.0.0.1:18143\nprotocol = imap\n"
                                        "auth = backend\n")
        self.assertIn('no "proxy_pass" is defined for server (the backend that checks the '
                      "passwords, with auth = backend)", errors[0].message)

    def test_t_prints_the_route_warning_and_succeeds(self):
        text = textwrap.dedent(self.TWO_SERVERS) + "\n[routes]\ncarol = 127.0.0.5:2143\n"
        path = TempDir(self).write("routes.conf", text)
        status, out, err = run_mailproxy(["-t", "-c", path])
        self.assertEqual(status, 0, err)
        line = text.splitlines().index("carol = 127.0.0.5:2143") + 1
        self.assertIn('mailproxy: [warn] %s:%d: [routes] carol: "127.0.0.5:2143" sends the imap '
                      "and pop3 servers' users to one port" % (path, line), err)
        self.assertIn("test is successful", err)


# -- inline comments, and README's examples ----------------------------------------

class ConfigCommentTests(unittest.TestCase):
    """Whitespace then "#" or ";" starts a comment after any value, in every
    section; in [users] too, where quotes are part of a password."""

    def test_inline_comments_in_every_section(self):
        config = load_text(self, """\
            [main]
            worker_connections = 512      # per worker

            [mail]
            proxy_pass = 127.0.0.1:1143   ; the backend
            smtp_capabilities = "SIZE 10485760" "X-A #b ;c"  # quoted: kept
            imap_capabilities = IMAP4rev1  # first line
                                ID         # second line
            smtp_relay_domains = a#b.example c;d.example

            [server imap]
            listen = 127.0.0.1:18143 # here
            protocol = imap

            [users]
            alice = {PLAIN}secret   # demo user
            bob = {PLAIN}tab\t;comment
            carol = {PLAIN}a#b;c "#quoted"
            dave = {PLAIN}#not a comment

            [routes]
            @example.com = 127.0.0.2   # the domain
            erin = 127.0.0.3:2143 ; one user
        """)
        server = config.servers[0]
        self.assertEqual(config.main.worker_connections, 512)
        self.assertEqual(server.proxy_pass.text, "127.0.0.1:1143")
        self.assertEqual(server.smtp_capabilities, ["SIZE 10485760", "X-A #b ;c"])
        self.assertEqual(server.imap_capabilities, ["IMAP4rev1", "ID"])
        self.assertEqual(server.smtp_relay_domains, ["a#b.example", "c;d.example"])
        self.assertEqual(server.listen[0].text, "127.0.0.1:18143")
        self.assertEqual(config.users["alice"].data, "secret")
        self.assertEqual(config.users["bob"].data, "tab")
        self.assertEqual(config.users["carol"].data, 'a#b;c "#quoted"')     # a quote is verbatim
        self.assertEqual(config.users["dave"].data, "#not a comment")
        self.assertEqual(config.routes["@example.com"].upstream.host, "127.0.0.2")
        self.assertEqual((config.routes["erin"].port, config.routes["erin"].upstream.host),
                         (2143, "127.0.0.3"))

    def test_t_warns_where_a_plain_password_lost_a_comment(self):
        text = file_text([BASE_CONFIG, """
            [users]
            alice = {PLAIN}secret   # demo user
            bob = {SHA256-CRYPT}%s  # hashed: nothing to doubt
        """ % mp.hash_password(b"pw", "SHA256-CRYPT")[len("{SHA256-CRYPT}"):]])
        path = TempDir(self).write("mailproxy.conf", text)
        status, out, err = run_mailproxy(["-t", "-c", path])
        self.assertEqual(status, 0, err)
        self.assertIn('mailproxy: [warn] %s:%d: [users] alice: the {PLAIN} password ends before '
                      '"#": the rest of the line is a comment' % (path, line_of(text, "alice")), err)
        self.assertNotIn("bob", err)
        self.assertIn("test is successful", err)
        self.assertTrue(mp.password_matches(mp.load_config(path).users["alice"], b"secret"))

    def test_plain_b64_holds_what_a_line_cannot(self):
        password = "pa #ss ;word  "
        encoded = base64.b64encode(password.encode()).decode()
        config = load_text(self, BASE_CONFIG, """
            [users]
            alice = {PLAIN.B64}%s   # Dovecot's spelling
            bob = {plain.base64}%s
        """ % (encoded, encoded))
        for login in ("alice", "bob"):
            self.assertEqual(config.users[login], mp.PasswordEntry("PLAIN", password))
        path, errors = config_errors(self, BASE_CONFIG, "[users]\nalice = {PLAIN.B64}not base64!\n")
        self.assertIn("{PLAIN.B64} data must be a UTF-8 password in base64", str(errors[0]))

    def test_hash_password_plain_writes_b64_when_the_line_would_cut_it(self):
        for password, scheme in (("pa #ss", "{PLAIN.B64}"), ("pa ;ss", "{PLAIN.B64}"),
                                 ("trailing ", "{PLAIN.B64}"), ("pa#ss;x", "{PLAIN}")):
            value = mp.hash_password(password.encode(), "PLAIN")
            self.assertTrue(value.startswith(scheme), value)
            config = load_text(self, BASE_CONFIG, "[users]\nalice = %s\n" % value)
            self.assertEqual(config.users["alice"].data, password)


def readme_ini_blocks() -> List[tuple]:
    """(line number, text) of every ```ini block of README.md."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    blocks, start = [], None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```ini":
            start = number
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines[start:number - 1]) + "\n"))
            start = None
    return blocks


README_MINIMAL_SERVER = """
[server readme]
listen = 127.0.0.1:18143
protocol = imap
proxy_pass = 127.0.0.1:1143
"""


class ReadmeExampleTests(CertificateFiles, unittest.TestCase):
    """Every ```ini block of README.md passes the configuration check, with
    no warning.  The rules:
    - a block whose first line names a systemd unit ("# /etc/systemd/...")
      is not mailproxy's file, and is skipped;
    - a block without a [server NAME] section is a fragment: it gets
      README_MINIMAL_SERVER appended;
    - the files a block names are relative to the configuration file, as
      README says, and are the test's: cert.pem and key.pem (the test
      certificate and key) beside it; a passwd_file (an absolute path, as
      a Dovecot host has it) becomes one of a user, beside it;
    - the check is -t's, load_and_prepare, without binding the listeners:
      their addresses are those of README's hosts, not this one's."""

    def test_every_ini_block_of_the_readme_passes_the_check(self):
        blocks = readme_ini_blocks()
        self.assertGreaterEqual(len(blocks), 3)
        for number, text in blocks:
            if text.startswith("# /etc/systemd/"):
                continue
            with self.subTest(readme_line=number):
                if not re.search(r"^\[server ", text, re.MULTILINE):
                    text += README_MINIMAL_SERVER
                directory = TempDir(self)
                with open(self.tls_path("server.crt")) as cert, open(self.tls_path("server.key")) as key:
                    directory.write("cert.pem", cert.read())
                    directory.write("key.pem", key.read())
                directory.write("users.passwd", "alice:{PLAIN}secret::::::\n")
                text = re.sub(r"^(passwd_file\s*=\s*)\S+", r"\1users.passwd", text, flags=re.MULTILINE)
                path = directory.write("mailproxy.conf", text)
                try:
                    config = mp.load_and_prepare(path)
                except mp.ConfigErrors as errors:
                    self.fail("README.md line %d:\n%s\n%s" % (number, text, errors))
                self.assertEqual([str(warning) for warning in config.warnings], [])


# -- the TLS parts, which load_and_prepare checks -----------------------------------

class TlsConfigCheckTests(EndToEndTestCase):
    """What load_and_prepare (and so -t and the start-up) refuses."""

    def path(self, listens=("ssl",), **mail) -> str:
        directory = TempDir(self)
        return directory.write("mailproxy.conf", proxy_config("imap", 1143, listens=listens, **mail))

    def errors(self, listens=("ssl",), **mail) -> str:
        with self.assertRaises(mp.ConfigErrors) as caught:
            mp.load_and_prepare(self.path(listens, **mail))
        return str(caught.exception)

    def certificate(self, name: str = "server", **more) -> dict:
        values = dict(ssl_certificate=self.tls_path(name + ".crt"),
                      ssl_certificate_key=self.tls_path(name + ".key"))
        values.update(more)
        return values

    def test_an_encrypted_key_without_its_pass_phrase_is_named_not_prompted_for(self):
        """Without ssl_password_file OpenSSL would ask on the terminal (a
        start under systemd hangs) and the error blamed the certificate."""
        key = self.tls_path("encrypted.key")
        path = self.path(ssl_certificate=self.tls_path("server.crt"), ssl_certificate_key=key)
        status, out, stderr = run_mailproxy(["-t", "-c", path])
        self.assertEqual(status, 1, stderr)
        self.assertIn('ssl_certificate_key: cannot load certificate key "%s": it is encrypted; '
                      'give its pass phrase in ssl_password_file' % key, stderr)
        self.assertNotIn("cannot load certificate \"", stderr)

    def test_ssl_password_file_lines_are_tried_in_turn(self):
        directory = TempDir(self)
        for lines, loads in (("wrong\npass-phrase\n", True), ("wrong\n", False)):
            with self.subTest(lines=lines):
                passwords = directory.write("passwords", lines)
                path = self.path(ssl_certificate=self.tls_path("server.crt"),
                                 ssl_certificate_key=self.tls_path("encrypted.key"),
                                 ssl_password_file=passwords)
                if loads:
                    mp.load_and_prepare(path)
                    continue
                with self.assertRaises(mp.ConfigErrors) as caught:
                    mp.load_and_prepare(path)
                self.assertIn("no PEM private key OpenSSL can read with ssl_password_file",
                              str(caught.exception))

    def test_listen_ssl_without_a_certificate(self):
        path = self.path()
        status, out, stderr = run_mailproxy(["-t", "-c", path])
        self.assertEqual(status, 1, stderr)
        self.assertIn('[server imap] ssl_certificate: no "ssl_certificate" is defined for the '
                      '"listen ... ssl" directive', stderr)
        self.assertIn("mailproxy: configuration file %s test failed" % path, stderr)

    def test_starttls_without_a_certificate(self):
        self.assertIn('no "ssl_certificate" is defined for the "starttls" directive',
                      self.errors(listens=("",), starttls="only"))

    def test_missing_or_unreadable_certificate_files(self):
        missing = os.path.join(self.tls_dir(), "missing.crt")
        self.assertRegex(self.errors(**self.certificate(ssl_certificate=missing)),
                         r'\[mail\] ssl_certificate: cannot load certificate "%s": No such file or directory'
                         % re.escape(missing))
        self.assertIn('cannot load certificate "%s": Is a directory' % self.tls_dir(),
                      self.errors(**self.certificate(ssl_certificate=self.tls_dir())))
        garbage = write_file(self.tls_dir(), "garbage.crt", "not a certificate\n")
        self.assertIn('[mail] ssl_certificate: cannot load certificate "%s": no PEM certificate '
                      'OpenSSL can read' % garbage,
                      self.errors(**self.certificate(ssl_certificate=garbage)))
        missing_ca = os.path.join(self.tls_dir(), "missing-ca.crt")
        self.assertIn('[mail] ssl_client_certificate: cannot load CA or CRL file "%s": No such file'
                      % missing_ca, self.errors(**self.certificate(ssl_verify_client="on",
                                                                   ssl_client_certificate=missing_ca)))
        self.assertIn('[mail] proxy_ssl_trusted_certificate: cannot load CA or CRL file "%s"' % missing_ca,
                      self.errors(listens=("",), proxy_ssl="on",
                                  proxy_ssl_trusted_certificate=missing_ca))

    def test_a_key_that_does_not_load_is_blamed_not_the_certificate(self):
        """nginx's "cannot load certificate key": the key's file named, at
        the ssl_certificate_key line."""
        missing = os.path.join(self.tls_dir(), "missing.key")
        self.assertIn('[mail] ssl_certificate_key: cannot load certificate key "%s": No such file or '
                      'directory' % missing, self.errors(**self.certificate(ssl_certificate_key=missing)))
        self.assertIn('[mail] ssl_certificate_key: certificate key "%s" does not match certificate '
                      '"%s" (key values mismatch)' % (self.tls_path("other.key"), self.tls_path("server.crt")),
                      self.errors(**self.certificate(ssl_certificate_key=self.tls_path("other.key"))))
        garbage = write_file(self.tls_dir(), "garbage.key", "not a key\n")
        self.assertIn('[mail] ssl_certificate_key: cannot load certificate key "%s": no PEM private key'
                      % garbage, self.errors(**self.certificate(ssl_certificate_key=garbage)))

    def test_t_names_the_key_once_at_its_line(self):
        """Six servers share [mail]'s key: one error, at its line."""
        missing = os.path.join(self.tls_dir(), "missing.key")
        servers = "".join("[server s%d]\nlisten = 127.0.0.1:%d ssl\nprotocol = imap\n\n" % (n, free_port())
                          for n in range(6))
        text = ("[mail]\nproxy_pass = 127.0.0.1:1143\nssl_certificate = %s\n"
                "ssl_certificate_key = %s   # the key\n\n%s" % (self.tls_path("server.crt"), missing, servers))
        path = TempDir(self).write("mailproxy.conf", text)
        status, out, err = run_mailproxy(["-t", "-c", path])
        self.assertEqual(status, 1, err)
        wanted = ('mailproxy: [emerg] %s:4: [mail] ssl_certificate_key: cannot load certificate key "%s": '
                  'No such file or directory\n' % (path, missing))
        self.assertEqual(err.count("[emerg]"), 1, err)
        self.assertIn(wanted, err)

    def test_an_unreadable_key_says_who_cannot_read_it(self):
        directory = TempDir(self)
        os.chmod(directory.path, 0o755)
        key = directory.write("key.pem", TLS_SERVER_KEY_PEM)
        os.chmod(key, 0o600)
        certificate = directory.write("cert.pem", TLS_SERVER_CERT_PEM)
        os.chmod(certificate, 0o644)
        text = proxy_config("imap", 1143, listens=("ssl",), ssl_certificate=certificate,
                            ssl_certificate_key=key)
        os.chmod(directory.write("mailproxy.conf", text), 0o644)
        import pwd
        path = os.path.join(directory.path, "mailproxy.conf")
        become = ""
        if os.geteuid() == 0:
            # Root reads anything: -t as nobody, with mailproxy imported
            # first (the Python may sit where nobody cannot read).
            try:
                nobody = pwd.getpwnam("nobody")
            except KeyError:
                self.skipTest("no user nobody")
            become = "os.setgroups([]); os.setgid(%d); os.setuid(%d); " % (nobody.pw_gid, nobody.pw_uid)
            user = "nobody"
        else:
            os.chmod(key, 0)
            user = pwd.getpwuid(os.geteuid()).pw_name
        script = ("import os, sys, encodings.idna; sys.path.insert(0, %r); import mailproxy; %s"
                  "sys.exit(mailproxy.main(['-t', '-c', %r]))" % (HERE, become, path))
        done = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20, cwd="/")
        err = done.stderr.decode()
        self.assertEqual(done.returncode, 1, err)
        self.assertRegex(err, r'\[mail\] ssl_certificate_key: cannot load certificate key "%s": '
                              r'Permission denied \(read as user "%s", the file is "\w+"\'s with mode 0[0-7]+: '
                              r'let "%s" read it, or start mailproxy as root\)' % (re.escape(key), user, user))
        self.assertNotIn('cannot load certificate "', err)


    def test_optional_no_ca_needs_no_ca_the_others_do(self):
        config = mp.load_and_prepare(self.path(("ssl",), **self.certificate(ssl_verify_client="optional_no_ca")))
        self.assertEqual(config.servers[0].ssl_verify_client, "optional_no_ca")
        self.assertIn("no ssl_client_certificate or ssl_trusted_certificate for ssl_verify_client",
                      self.errors(**self.certificate(ssl_verify_client="optional")))

    def test_ssl_conf_command(self):
        self.assertIn('ssl_conf_command: "Foo" cannot be applied through Python\'s ssl module',
                      self.errors(**self.certificate(ssl_conf_command="Foo bar")))
        config = mp.load_and_prepare(self.path(**self.certificate(
            ssl_conf_command="Options -SessionTicket")))
        self.assertTrue(config.servers[0].tls_context.options & ssl.OP_NO_TICKET)
        config = mp.load_and_prepare(self.path(**self.certificate()))
        self.assertFalse(config.servers[0].tls_context.options & ssl.OP_NO_TICKET)


# ========================================================================== #
# ####                         Wire primitives                          #### #
# ========================================================================== #
# SASL decoders, CRAM-MD5 and APOP digests, salts, Credentials.

class WirePrimitiveTests(unittest.TestCase):
    def test_sasl_plain_with_authzid(self):
        # RFC 4616 §4 examples: "Kurt" acting as... authzid is ignored, as nginx.
        self.assertEqual(mp.decode_sasl_plain(b64(b"admin\0tim\0tanstaaftanstaaf")),
                         (b"admin", b"tim", b"tanstaaftanstaaf"))
        self.assertEqual(mp.decode_sasl_plain(b64(b"\0tim\0tanstaaftanstaaf")),
                         (b"", b"tim", b"tanstaaftanstaaf"))

    def test_sasl_plain_refuses_bad_input(self):
        self.assertIsNone(mp.decode_sasl_plain(b"not base64!"))
        self.assertIsNone(mp.decode_sasl_plain(b64(b"tim\0nopassword_separator")))
        self.assertIsNone(mp.decode_sasl_plain(b64(b"tim")))
        self.assertIsNone(mp.decode_sasl_plain(b64(b"a\0b\0c\0d")))
        self.assertIsNone(mp.decode_sasl_plain(b"*"))          # SASL cancel

    def test_cram_md5_rfc2195_example(self):
        # RFC 2195 §2: the server's challenge and tim's answer.
        challenge = b"<1896.697170952@postoffice.reston.mci.net>"
        self.assertEqual(mp.cram_md5_digest(b"tanstaaftanstaaf", challenge),
                         b"b913a602c7eda7a495b4e6e7334d3890")
        response = b64(b"tim b913a602c7eda7a495b4e6e7334d3890")
        self.assertEqual(response, b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw")
        self.assertEqual(mp.split_cram_md5_response(response),
                         (b"tim", b"b913a602c7eda7a495b4e6e7334d3890"))

    def test_cram_md5_response_checks(self):
        self.assertIsNone(mp.split_cram_md5_response(b64(b"tim short")))
        self.assertIsNone(mp.split_cram_md5_response(b64(b"nospace")))
        self.assertIsNone(mp.split_cram_md5_response(b"@@@"))

    def test_apop_rfc1939_example(self):
        # RFC 1939 §7: the greeting's timestamp and the shared secret "tanstaaf".
        self.assertEqual(mp.apop_digest(b"<1896.697170952@dbc.mtview.ca.us>", b"tanstaaf"),
                         b"c4c9334bac560ecc979e58001b3e22fb")

    def test_salt_has_nginx_shape(self):
        salt = mp.make_salt("mail.test", NOW, FixedRandom())
        self.assertEqual(salt, SALT)

    def test_xtext_decoded_as_rfc3461_says(self):
        # RFC 3461 §4: "+" and two hex digits stand for a byte; "=" and bytes
        # outside "!".."~" are no xchar.  It undoes mailproxy's own encoder.
        self.assertEqual(mp.decode_xtext(b"al+20ice+2B+3d"), b"al ice+=")
        self.assertEqual(mp.decode_xtext(b"IPV6:2001:db8::1"), b"IPV6:2001:db8::1")
        self.assertEqual(mp.decode_xtext(b""), b"")
        for value in (b"a\x00b\r\n=", b"\xff", b"+0"):
            self.assertEqual(mp.decode_xtext(mp.xtext(value)), value)
        for bad in (b"a=b", b"+", b"+4", b"+4G", b"a b", b"a\tb", b"\xe9"):
            self.assertIsNone(mp.decode_xtext(bad), bad)

    def test_credentials_repr_hides_password(self):
        text = repr(mp.Credentials(b"alice", b"hunter2"))
        self.assertIn("alice", text)
        self.assertNotIn("hunter2", text)


# ========================================================================== #
# ####                         Client machines                          #### #
# ========================================================================== #
# Each machine driven with byte strings, each transcript three ways (whole,
# one byte at a time, and with a pipelined tail that must come back
# untouched): IMAP, POP3, SMTP; STARTTLS in the machines; OAuth tokens; the
# work of each parser, linear however the bytes are split.

# -- IMAP ---------------------------------------------------------------------------

# The replies that follow a tag: b"a1" + OK.
OK = b" " + mp.IMAP_OK
BAD = b" " + mp.IMAP_INVALID


class ImapMachineTests(unittest.TestCase):
    def imap(self, exchanges, **settings):
        converse_three_ways(self, lambda: make_machine("imap", **settings), exchanges)

    def test_greeting(self):
        self.assertEqual(make_machine("imap").data_to_send(), mp.IMAP_GREETING)

    def test_capability_noop_logout(self):
        self.imap([(b"a1 CAPABILITY\r\n", IMAP_PROXY_CAPABILITY + b"a1" + OK, []),
                   (b"a2 noop\r\n", b"a2" + OK, []),
                   (b"a3 LOGOUT\r\n", mp.IMAP_BYE + b"a3" + OK, [mp.Quit()])])

    def test_capability_lists_auth_methods_in_nginx_order(self):
        machine = make_machine("imap", imap_auth=["cram-md5", "login", "plain"],
                               imap_capabilities=["IMAP4rev1", "ID"])
        self.assertEqual(machine.capability(),
                         b"* CAPABILITY IMAP4rev1 ID AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5\r\n")

    def test_login_atoms(self):
        self.imap([(b"a1 LOGIN alice secret\r\n", b"", [mp.Credentials(b"alice", b"secret")])])

    def test_login_quoted_with_escapes(self):
        self.imap([(b'A001 LOGIN "al ice" "se\\"cr\\\\et"\r\n', b"",
                    [mp.Credentials(b"al ice", b'se"cr\\et')])])

    def test_login_synchronizing_literals(self):
        self.imap([(b"a1 LOGIN {5}\r\n", mp.IMAP_NEXT, []),
                   (b"alice {6}\r\n", mp.IMAP_NEXT, []),
                   (b"se\r\nrt\r\n", b"", [mp.Credentials(b"alice", b"se\r\nrt")])])

    def test_login_non_synchronizing_literals(self):
        self.imap([(b"a1 LOGIN {5+}\r\nalice {3+}\r\n\x00\r\n\r\n", b"",
                    [mp.Credentials(b"alice", b"\x00\r\n")])])

    def test_login_empty_literal_and_empty_password(self):
        self.imap([(b'a1 LOGIN alice ""\r\n', b"", [mp.Credentials(b"alice", b"")])])
        self.imap([(b"a1 LOGIN alice {0}\r\n", mp.IMAP_NEXT, []),
                   (b"\r\n", b"", [mp.Credentials(b"alice", b"")])])

    def test_login_8bit(self):
        self.imap([("a1 LOGIN jürgen \"pässwörd\"\r\n".encode(), b"",
                    [mp.Credentials("jürgen".encode(), "pässwörd".encode())])])

    def test_login_argument_count(self):
        self.imap([(b"a1 LOGIN alice\r\n", b"a1" + BAD, []),
                   (b"a2 LOGIN a b c\r\n", b"a2" + BAD, []),
                   (b'a3 LOGIN "" pw\r\n', b"a3" + BAD, []),
                   (b"a4 LOGIN alice pw\r\n", b"", [mp.Credentials(b"alice", b"pw")])])

    def test_more_than_three_arguments_is_a_parse_error(self):
        machine = make_machine("imap", max_errors=10)
        machine.data_to_send()
        machine.receive_data(b"a1 LOGIN a b c d\r\n")
        self.assertEqual(machine.data_to_send(), b"a1" + BAD)
        self.assertEqual(machine.errors, 1)

    def test_tags_kept_byte_for_byte(self):
        self.imap([(b"A.b-7]x NOOP\r\n", b"A.b-7]x" + OK, []),
                   (b"x LOGOUT\r\n", mp.IMAP_BYE + b"x" + OK, [mp.Quit()])])

    def test_bad_and_overlong_tags(self):
        self.imap([(b"a+b NOOP\r\n", b"*" + BAD, []),
                   (b"x" * 33 + b" NOOP\r\n", b"*" + BAD, []),
                   (b"x" * 32 + b" NOOP\r\n", b"x" * 32 + OK, []),
                   (b"\r\n", b"*" + BAD, []),
                   (b"a9 LOGOUT\r\n", mp.IMAP_BYE + b"a9" + OK, [mp.Quit()])], max_errors=10)

    def test_unknown_commands_are_bad(self):
        self.imap([(b"a1 SELECT INBOX\r\n", b"a1" + BAD, []),
                   (b"a2 STARTTLS\r\n", b"a2" + BAD, []),
                   (b"a3 LOGOUT\r\n", mp.IMAP_BYE + b"a3" + OK, [mp.Quit()])])

    def test_id_is_answered(self):
        self.imap([(b'a1 ID ("name" "Thunderbird" "version" "115.0")\r\n',
                    mp.IMAP_ID_REPLY + b"a1" + OK, []),
                   (b"a2 ID NIL\r\n", mp.IMAP_ID_REPLY + b"a2" + OK, []),
                   (b"a3 ID {4}\r\n", mp.IMAP_NEXT, []),
                   (b"junk\r\n", b"a3" + BAD, []),
                   (b"a4 LOGOUT\r\n", mp.IMAP_BYE + b"a4" + OK, [mp.Quit()])])

    def test_id_tells_whom_a_webmail_speaks_for(self):
        self.imap([(b'a1 ID ("name" "Roundcube" "X-Originating-IP" "192.0.2.9" '
                    b'"x-originating-port" "4711")\r\n', mp.IMAP_ID_REPLY + b"a1" + OK,
                    [mp.ClientIdentity(b"192.0.2.9", b"4711")]),
                   (b'a2 ID ("x-originating-ip" {10}\r\n', mp.IMAP_NEXT, []),
                   (b'2001:db8:: "name" "x")\r\n', mp.IMAP_ID_REPLY + b"a2" + OK,
                    [mp.ClientIdentity(b"2001:db8::", b"")]),
                   (b"a3 LOGOUT\r\n", mp.IMAP_BYE + b"a3" + OK, [mp.Quit()])])

    def test_max_errors_closes(self):
        self.imap([(b"a1 FOO\r\n", b"a1" + BAD, []),
                   (b"a2 BAR\r\n", b"a2" + BAD,
                    [mp.Closed("client sent too many invalid commands")])], max_errors=2)

    def test_handler_errors_are_not_counted(self):
        machine = make_machine("imap", max_errors=1)
        machine.data_to_send()
        self.assertEqual(machine.receive_data(b"a1 LOGIN onlyone\r\n"), [])
        self.assertFalse(machine.finished)

    def test_too_long_command_closes(self):
        self.imap([(b"a1 LOGIN " + b"x" * 200, b"a1" + BAD, [mp.Closed("client sent too long command")])],
                  imap_client_buffer=64)

    def test_literal_larger_than_buffer_is_refused_without_continuation(self):
        self.imap([(b"a1 LOGIN {100}\r\n", b"a1" + BAD, []),
                   (b"a2 LOGOUT\r\n", mp.IMAP_BYE + b"a2" + OK, [mp.Quit()])], imap_client_buffer=64)

    def test_invalid_line_with_non_synchronizing_literal_closes(self):
        machine = make_machine("imap")
        machine.data_to_send()
        events = machine.receive_data(b"a1 LOGIN {3+}\r\nabcX\r\n")
        self.assertEqual(machine.data_to_send(), b"a1" + BAD)
        self.assertTrue(machine.finished)
        self.assertIsInstance(events[-1], mp.Closed)

    def test_invalid_command_skips_its_non_synchronizing_literal(self):
        # nginx-tests mail_imap.t "literal not command": the 10 bytes that
        # follow {10+} are no command (nginx closes; the next line may be a04).
        self.imap([(b"a03 FOOBAR {10+}\r\ntest test \r\na04 NOOP\r\n", b"a03" + BAD + b"a04" + OK, []),
                   (b"a05 LOGOUT\r\n", mp.IMAP_BYE + b"a05" + OK, [mp.Quit()])])

    def test_invalid_command_skips_each_literal_to_its_end(self):
        # The command goes on after a literal, which may hold CRLF and "{n+}".
        self.imap([(b"a1 FOO {7+}\r\nx{1+}\r\n {2+}\r\n\r\n rest\r\n", b"a1" + BAD, []),
                   (b"a2 X {0+}\n\n", b"a2" + BAD, []),
                   (b"a3 LOGOUT\r\n", mp.IMAP_BYE + b"a3" + OK, [mp.Quit()])], max_errors=10)

    def test_invalid_command_with_synchronizing_literal_gets_no_continuation(self):
        # RFC 3501 §7.5: the BAD replaces the "+", the client sends no literal.
        self.imap([(b"a03 FOOBAR {10}\r\n", b"a03" + BAD, []),
                   (b"a04 NOOP\r\n", b"a04" + OK, []),
                   (b"a05 LOGIN a b c {3}\r\n", b"a05" + BAD, []),
                   (b"a06 LOGOUT\r\n", mp.IMAP_BYE + b"a06" + OK, [mp.Quit()])])

    def test_invalid_line_ending_in_unskippable_literal_closes(self):
        closed = mp.Closed(mp.IMAP_UNSKIPPABLE_LITERAL)
        for line in (b"a1 FOOBAR x+}\r\n", b"a1 FOOBAR {65+}\r\n", b"a1 FOOBAR {99999999999+}\r\n"):
            self.imap([(line, b"a1" + BAD, [closed])], imap_client_buffer=64)
        self.imap([(b"a1 FOOBAR {64+}\r\n" + b"\n" * 64 + b"\r\n", b"a1" + BAD, []),
                   (b"a2 LOGOUT\r\n", mp.IMAP_BYE + b"a2" + OK, [mp.Quit()])], imap_client_buffer=64)

    def test_literal_must_be_followed_by_space_or_crlf(self):
        self.imap([(b"a1 LOGIN {1}\r\n", mp.IMAP_NEXT, []),
                   (b"xy z\r\n", b"a1" + BAD, []),
                   (b"a2 LOGOUT\r\n", mp.IMAP_BYE + b"a2" + OK, [mp.Quit()])])

    def test_bare_cr_is_invalid(self):
        self.imap([(b"a1 NOOP\rx\r\n", b"a1" + BAD, []),
                   (b"a2 LOGOUT\r\n", mp.IMAP_BYE + b"a2" + OK, [mp.Quit()])])

    def test_authenticate_plain(self):
        response = b64(b"\0alice\0secret")
        self.imap([(b"a1 AUTHENTICATE PLAIN\r\n", b"+ \r\n", []),
                   (response + b"\r\n", b"", [mp.Credentials(b"alice", b"secret")])])
        self.imap([(b"a1 AUTHENTICATE PLAIN " + response + b"\r\n", b"",
                    [mp.Credentials(b"alice", b"secret")])])

    def test_authenticate_plain_bad_base64_and_cancel(self):
        self.imap([(b"a1 AUTHENTICATE PLAIN\r\n", b"+ \r\n", []),
                   (b"*\r\n", b"a1" + BAD, []),
                   (b"a2 AUTHENTICATE PLAIN " + b64(b"no-nuls") + b"\r\n", b"a2" + BAD, []),
                   (b"a3 LOGOUT\r\n", mp.IMAP_BYE + b"a3" + OK, [mp.Quit()])])

    def test_authenticate_login(self):
        self.imap([(b"a1 AUTHENTICATE LOGIN\r\n", b"+ " + mp.SASL_USERNAME_PROMPT, []),
                   (b64(b"alice") + b"\r\n", b"+ " + mp.SASL_PASSWORD_PROMPT, []),
                   (b64(b"secret") + b"\r\n", b"", [mp.Credentials(b"alice", b"secret")])])

    def test_authenticate_login_with_initial_response(self):
        self.imap([(b"a1 AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n", b"+ " + mp.SASL_PASSWORD_PROMPT, []),
                   (b64(b"secret") + b"\r\n", b"", [mp.Credentials(b"alice", b"secret")])])

    def test_authenticate_cram_md5(self):
        challenge = b"+ " + b64(SALT) + b"\r\n"
        digest = mp.cram_md5_digest(b"secret", SALT)
        self.imap([(b"a1 AUTHENTICATE CRAM-MD5\r\n", challenge, []),
                   (b64(b"alice " + digest) + b"\r\n", b"",
                    [mp.Credentials(b"alice", digest, "cram-md5", SALT)])],
                  imap_auth=["plain", "cram-md5"])

    def test_cram_md5_only_when_enabled_and_without_initial_response(self):
        self.imap([(b"a1 AUTHENTICATE CRAM-MD5\r\n", b"a1" + BAD, []),
                   (b"a2 AUTHENTICATE FOO\r\n", b"a2" + BAD, []),
                   (b"a3 LOGOUT\r\n", mp.IMAP_BYE + b"a3" + OK, [mp.Quit()])])
        self.imap([(b"a1 AUTHENTICATE CRAM-MD5 abcd\r\n", b"a1" + BAD, []),
                   (b"a3 LOGOUT\r\n", mp.IMAP_BYE + b"a3" + OK, [mp.Quit()])],
                  imap_auth=["plain", "cram-md5"])

    def test_login_accepted_even_if_not_advertised(self):
        # nginx: imap_auth only decides what is advertised for LOGIN/PLAIN.
        self.imap([(b"a1 AUTHENTICATE LOGIN\r\n", b"+ " + mp.SASL_USERNAME_PROMPT, []),
                   (b64(b"al") + b"\r\n", b"+ " + mp.SASL_PASSWORD_PROMPT, []),
                   (b64(b"pw") + b"\r\n", b"", [mp.Credentials(b"al", b"pw")])],
                  imap_auth=["plain"])

    def test_pipelined_commands_answered_in_order(self):
        machine = make_machine("imap")
        machine.data_to_send()
        events = machine.receive_data(b"a1 NOOP\r\na2 CAPABILITY\r\na3 LOGIN alice secret\r\na4 NOOP\r\n")
        self.assertEqual(machine.data_to_send(), b"a1" + OK + IMAP_PROXY_CAPABILITY + b"a2" + OK)
        self.assertEqual(events, [mp.Credentials(b"alice", b"secret")])
        self.assertEqual(machine.trailing_data, b"a4 NOOP\r\n")

    def test_failed_login_then_retry(self):
        machine = make_machine("imap")
        machine.data_to_send()
        self.assertEqual(machine.receive_data(b"a1 LOGIN alice bad\r\na2 LOGIN alice good\r\n"),
                         [mp.Credentials(b"alice", b"bad")])
        self.assertEqual(machine.auth_failed(b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n"),
                         [mp.Credentials(b"alice", b"good")])
        self.assertEqual(machine.data_to_send(), b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        self.assertEqual(machine.tag, b"a2 ")


# -- POP3 ---------------------------------------------------------------------------

class Pop3MachineTests(unittest.TestCase):
    def pop3(self, exchanges, tail=b"STAT\r\n", **settings):
        converse_three_ways(self, lambda: make_machine("pop3", **settings), exchanges, tail)

    def test_greeting(self):
        self.assertEqual(make_machine("pop3").data_to_send(), mp.POP3_GREETING)
        self.assertEqual(make_machine("pop3", pop3_auth=["plain", "apop"]).data_to_send(),
                         b"+OK POP3 ready " + SALT + b"\r\n")

    def test_capa_noop_quit(self):
        self.pop3([(b"CAPA\r\n", b"+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\n"
                    b"SASL PLAIN LOGIN\r\n.\r\n", []),
                   (b"noop\r\n", mp.POP3_OK, []),
                   (b"QUIT\r\n", mp.POP3_OK, [mp.Quit()])])

    def test_capa_sasl_line_as_nginx(self):
        # nginx 1.22 with "pop3_auth plain apop cram-md5": APOP is no SASL method.
        machine = make_machine("pop3", pop3_auth=["plain", "apop", "cram-md5"])
        self.assertIn(b"SASL PLAIN LOGIN CRAM-MD5\r\n.\r\n", machine.capability())
        machine = make_machine("pop3", pop3_auth=["apop"])
        self.assertTrue(machine.capability().endswith(b"UIDL\r\nSASL\r\n.\r\n"))

    def test_user_pass(self):
        self.pop3([(b"USER alice\r\n", mp.POP3_OK, []),
                   (b"PASS secret\r\n", b"", [mp.Credentials(b"alice", b"secret")])])

    def test_spaces_belong_to_user_and_pass(self):
        self.pop3([(b"USER john doe\r\n", mp.POP3_OK, []),
                   (b"PASS  p w \r\n", b"", [mp.Credentials(b"john doe", b"p w ")])])

    def test_commands_not_valid_after_user(self):
        self.pop3([(b"USER alice\r\n", mp.POP3_OK, []),
                   (b"STAT\r\n", mp.POP3_INVALID, []),
                   (b"PASS secret\r\n", mp.POP3_INVALID, []),
                   (b"QUIT\r\n", mp.POP3_OK, [mp.Quit()])])

    def test_pass_without_user_and_bare_auth(self):
        self.pop3([(b"PASS x\r\n", mp.POP3_INVALID, []),
                   (b"AUTH\r\n", b"+OK methods supported:\r\nPLAIN\r\nLOGIN\r\n.\r\n", []),
                   (b"STLS\r\n", mp.POP3_INVALID, []),
                   (b"QUIT\r\n", mp.POP3_OK, [mp.Quit()])])

    def test_apop(self):
        digest = mp.apop_digest(SALT, b"secret")
        self.pop3([(b"APOP alice " + digest + b"\r\n", b"",
                    [mp.Credentials(b"alice", digest, "apop", SALT)])],
                  pop3_auth=["plain", "apop"])
        self.pop3([(b"APOP alice " + digest + b"\r\n", mp.POP3_INVALID, []),
                   (b"QUIT\r\n", mp.POP3_OK, [mp.Quit()])])

    def test_auth_plain_login_cram(self):
        self.pop3([(b"AUTH PLAIN\r\n", b"+ \r\n", []),
                   (b64(b"\0alice\0secret") + b"\r\n", b"", [mp.Credentials(b"alice", b"secret")])])
        self.pop3([(b"AUTH PLAIN " + b64(b"x\0alice\0secret") + b"\r\n", b"",
                    [mp.Credentials(b"alice", b"secret")])])
        self.pop3([(b"AUTH LOGIN " + b64(b"alice") + b"\r\n", b"+ " + mp.SASL_PASSWORD_PROMPT, []),
                   (b64(b"secret") + b"\r\n", b"", [mp.Credentials(b"alice", b"secret")])])
        self.pop3([(b"AUTH LOGIN\r\n", b"+ " + mp.SASL_USERNAME_PROMPT, []),
                   (b64(b"alice") + b"\r\n", b"+ " + mp.SASL_PASSWORD_PROMPT, []),
                   (b"*\r\n", mp.POP3_INVALID, []),
                   (b"QUIT\r\n", mp.POP3_OK, [mp.Quit()])])
        digest = mp.cram_md5_digest(b"secret", SALT)
        self.pop3([(b"AUTH CRAM-MD5\r\n", b"+ " + b64(SALT) + b"\r\n", []),
                   (b64(b"alice " + digest) + b"\r\n", b"",
                    [mp.Credentials(b"alice", digest, "cram-md5", SALT)])],
                  pop3_auth=["plain", "cram-md5"])

    def test_invalid_and_max_errors(self):
        self.pop3([(b"STAT\r\n", mp.POP3_INVALID, []),
                   (b"US3R x\r\n", mp.POP3_INVALID, []),
                   (b"\r\n", mp.POP3_INVALID,
                    [mp.Closed("client sent too many invalid commands")])], max_errors=3)

    def test_128_byte_buffer(self):
        self.pop3([(b"USER " + b"a" * 130 + b"\r\n", mp.POP3_INVALID,
                    [mp.Closed("client sent too long command")])])
        # Extension: pop3_client_buffer makes room for long tokens.
        self.pop3([(b"USER " + b"a" * 130 + b"\r\n", mp.POP3_OK, []),
                   (b"QUIT\r\n", mp.POP3_OK, [mp.Quit()])], pop3_client_buffer=1024)

    def test_pipelined_user_pass(self):
        machine = make_machine("pop3")
        machine.data_to_send()
        events = machine.receive_data(b"USER alice\r\nPASS secret\r\nSTAT\r\nQUIT\r\n")
        self.assertEqual(events, [mp.Credentials(b"alice", b"secret")])
        self.assertEqual(machine.data_to_send(), mp.POP3_OK)
        self.assertEqual(machine.trailing_data, b"STAT\r\nQUIT\r\n")


# -- SMTP ---------------------------------------------------------------------------

def make_smtp(**overrides):
    machine = make_machine("smtp", **overrides)
    machine.greet()
    return machine


class SmtpMachineTests(unittest.TestCase):
    def smtp(self, exchanges, tail=b"MAIL FROM:<x@y>\r\n", **settings):
        converse_three_ways(self, lambda: make_smtp(**settings), exchanges, tail)

    def test_greeting_and_helo_ehlo(self):
        self.assertEqual(make_smtp().data_to_send(), b"220 mail.test ESMTP ready\r\n")
        self.smtp([(b"HELO client.example\r\n", b"250 mail.test\r\n", []),
                   (b"EHLO client.example\r\n", SMTP_PROXY_EHLO, []),
                   (b"NOOP\r\n", mp.SMTP_OK, []),
                   (b"RSET\r\n", mp.SMTP_OK, []),
                   (b"QUIT\r\n", mp.SMTP_BYE, [mp.Quit()])])

    def test_ehlo_lists_capabilities_then_auth(self):
        machine = make_smtp(smtp_capabilities=["SIZE 10485760", "8BITMIME"],
                            smtp_auth=["cram-md5", "none", "plain"])
        self.assertEqual(machine.ehlo_reply(), b"250-mail.test\r\n250-SIZE 10485760\r\n"
                         b"250-8BITMIME\r\n250 AUTH PLAIN CRAM-MD5\r\n")
        self.assertEqual(make_smtp(smtp_auth=["none"]).ehlo_reply(), b"250 mail.test\r\n")
        self.assertEqual(make_smtp(smtp_auth=["none"], smtp_capabilities=["PIPELINING"]).ehlo_reply(),
                         b"250-mail.test\r\n250 PIPELINING\r\n")

    def test_helo_argument_count(self):
        self.smtp([(b"HELO\r\n", mp.SMTP_INVALID_ARGUMENT, []),
                   (b"EHLO a b\r\n", mp.SMTP_INVALID_ARGUMENT, []),
                   (b"QUIT\r\n", mp.SMTP_BYE, [mp.Quit()])])

    def test_auth_plain_login_cram(self):
        self.smtp([(b"EHLO x\r\n", SMTP_PROXY_EHLO, []),
                   (b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n", b"",
                    [mp.Credentials(b"alice", b"secret")])])
        self.smtp([(b"AUTH PLAIN\r\n", b"334 \r\n", []),
                   (b64(b"\0alice\0secret") + b"\r\n", b"", [mp.Credentials(b"alice", b"secret")])])
        self.smtp([(b"AUTH LOGIN\r\n", b"334 " + mp.SASL_USERNAME_PROMPT, []),
                   (b64(b"alice") + b"\r\n", b"334 " + mp.SASL_PASSWORD_PROMPT, []),
                   (b64(b"secret") + b"\r\n", b"", [mp.Credentials(b"alice", b"secret")])])
        # Microsoft's "AUTH LOGIN with User Name" (nginx 0.7.34).
        self.smtp([(b"AUTH LOGIN " + b64(b"alice") + b"\r\n", b"334 " + mp.SASL_PASSWORD_PROMPT, []),
                   (b64(b"secret") + b"\r\n", b"", [mp.Credentials(b"alice", b"secret")])])
        digest = mp.cram_md5_digest(b"secret", SALT)
        self.smtp([(b"AUTH CRAM-MD5\r\n", b"334 " + b64(SALT) + b"\r\n", []),
                   (b64(b"alice " + digest) + b"\r\n", b"",
                    [mp.Credentials(b"alice", digest, "cram-md5", SALT)])],
                  smtp_auth=["plain", "cram-md5"])

    def test_auth_errors(self):
        self.smtp([(b"AUTH\r\n", mp.SMTP_INVALID_ARGUMENT, []),
                   (b"AUTH FOO\r\n", mp.SMTP_INVALID, []),
                   (b"AUTH CRAM-MD5\r\n", mp.SMTP_INVALID, []),
                   (b"AUTH PLAIN\r\n", b"334 \r\n", []),
                   (b"*\r\n", mp.SMTP_INVALID, []),
                   (b"QUIT\r\n", mp.SMTP_BYE, [mp.Quit()])])

    def test_auth_inside_a_mail_transaction_is_a_bad_sequence(self):
        """RFC 4954 §4: AUTH during a mail transaction gets 503; after RSET
        (the transaction is over) it is taken."""
        plain = b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n"
        self.smtp([(b"EHLO x\r\n", b"250-mail.test\r\n250 AUTH PLAIN LOGIN\r\n", []),
                   (b"MAIL FROM:<a@b.example>\r\n", mp.SMTP_OK, []),
                   (plain, mp.SMTP_BAD_SEQUENCE, []),
                   (b"RSET\r\n", mp.SMTP_OK, []),
                   (plain, b"", [mp.Credentials(b"alice", b"secret")])],
                  smtp_auth=["plain", "login", "none"])

    def test_mail_needs_auth_unless_none(self):
        self.smtp([(b"MAIL FROM:<a@b>\r\n", mp.SMTP_AUTH_REQUIRED, []),
                   (b"RCPT TO:<c@d>\r\n", mp.SMTP_BAD_SEQUENCE, []),
                   (b"QUIT\r\n", mp.SMTP_BYE, [mp.Quit()])])

    def test_smtp_auth_none(self):
        def factory():
            return make_smtp(smtp_auth=["none"])
        exchanges = [(b"EHLO client.example\r\n", b"250 mail.test\r\n", []),
                     (b"MAIL FROM:<a@b.example> SIZE=100\r\n", mp.SMTP_OK, []),
                     (b"MAIL FROM:<again@x>\r\n", mp.SMTP_BAD_SEQUENCE, []),
                     (b"RCPT TO:<bob@example.com>\r\n", b"", [mp.Credentials(b"", b"", "none")])]
        converse_three_ways(self, factory, exchanges, tail=b"DATA\r\n")
        machine = factory()
        self.assertEqual(machine.data_to_send(), b"220 mail.test ESMTP ready\r\n")
        run_exchanges(self, machine, exchanges, whole)
        self.assertEqual((machine.helo, machine.esmtp, machine.mail_from, machine.rcpt_to),
                         (b"client.example", True, b"MAIL FROM:<a@b.example> SIZE=100",
                          b"RCPT TO:<bob@example.com>"))

    def test_rset_and_helo_forget_the_transaction(self):
        self.smtp([(b"MAIL FROM:<a@b>\r\n", mp.SMTP_OK, []),
                   (b"RSET\r\n", mp.SMTP_OK, []),
                   (b"RCPT TO:<c@d>\r\n", mp.SMTP_BAD_SEQUENCE, []),
                   (b"MAIL FROM:<a@b>\r\n", mp.SMTP_OK, []),
                   (b"HELO x\r\n", b"250 mail.test\r\n", []),
                   (b"RCPT TO:<c@d>\r\n", mp.SMTP_BAD_SEQUENCE, []),
                   (b"QUIT\r\n", mp.SMTP_BYE, [mp.Quit()])], smtp_auth=["none"])

    def test_control_bytes_refused_with_501_and_never_stored(self):
        machine = make_smtp(smtp_auth=["none"])
        machine.data_to_send()
        for line in (b"HELO a\x00b\r\n", b"EHLO a\tb\r\n", b"MAIL FROM:<a\x00@b>\r\n",
                     b"MAIL FROM:<a\r@b>\r\n", b"MAIL FROM:<a@b>\n", b"MAIL FROM:<a\x7f@b>\r\n"):
            self.assertEqual(machine.receive_data(line), [])
            self.assertEqual(machine.data_to_send(), mp.SMTP_INVALID_ARGUMENT, line)
        self.assertEqual((machine.helo, machine.mail_from), (None, None))
        machine.receive_data(b"MAIL FROM:<a@b>\r\n")
        self.assertEqual(machine.data_to_send(), mp.SMTP_OK)
        self.assertEqual(machine.receive_data(b"RCPT TO:<c\x00@d>\r\n"), [])
        self.assertEqual(machine.data_to_send(), mp.SMTP_INVALID_ARGUMENT)
        self.assertIsNone(machine.rcpt_to)

    def test_unknown_and_handler_invalid_commands(self):
        self.smtp([(b"DATA\r\n", mp.SMTP_INVALID, []),
                   (b"VRFY x\r\n", mp.SMTP_INVALID, []),
                   (b"STARTTLS\r\n", mp.SMTP_INVALID, []),
                   (b"QUIT\r\n", mp.SMTP_BYE, [mp.Quit()])])
        machine = make_smtp(max_errors=2)
        machine.data_to_send()
        machine.receive_data(b"VRFY a\r\nEXPN b\r\nHELP\r\n")      # not counted (nginx)
        self.assertFalse(machine.finished)
        self.assertEqual(machine.receive_data(b"DATA\r\nBDAT 1\r\n"),
                         [mp.Closed("client sent too many invalid commands")])

    def test_pipelining_answers_in_order(self):
        machine = make_smtp(smtp_auth=["plain", "login", "none"])
        machine.data_to_send()
        events = machine.receive_data(b"EHLO x\r\nNOOP\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
                                      b"RCPT TO:<e@f>\r\nDATA\r\n")
        self.assertEqual(machine.data_to_send(), SMTP_PROXY_EHLO + mp.SMTP_OK + mp.SMTP_OK)
        self.assertEqual(events, [mp.Credentials(b"", b"", "none")])
        self.assertEqual(machine.trailing_data, b"RCPT TO:<e@f>\r\nDATA\r\n")

    def test_pipeline_longer_than_the_buffer(self):
        machine = make_smtp(smtp_client_buffer=64)
        machine.data_to_send()
        pipeline = b"NOOP\r\n" * 50                           # 300 bytes, buffer 64
        events = []
        for i in range(0, len(pipeline), 64):                 # the session reads buffer-sized chunks
            events += machine.receive_data(pipeline[i:i + 64])
        self.assertEqual(events, [])
        self.assertEqual(machine.data_to_send(), mp.SMTP_OK * 50)

    def test_too_long_command(self):
        self.smtp([(b"HELO " + b"x" * 100 + b"\r\n", mp.SMTP_INVALID,
                    [mp.Closed("client sent too long command")])], smtp_client_buffer=64)

    # -- XCLIENT (Postfix's XCLIENT_README) from a trusted_networks peer ------------

    def xclient(self, exchanges, tail=b"MAIL FROM:<x@y>\r\n", **settings):
        def factory():
            machine = make_smtp(**settings)
            machine.xclient_allowed = True              # the session found the peer trusted
            return machine
        converse_three_ways(self, factory, exchanges, tail)

    def test_xclient_is_offered_and_taken_from_a_trusted_peer_only(self):
        """Anyone else gets what nginx says to a command it does not know,
        counted, and no XCLIENT in the EHLO reply."""
        self.xclient([(b"EHLO x\r\n", SMTP_XCLIENT_EHLO, []),
                      (b"XCLIENT ADDR=192.0.2.9 PORT=4711\r\n", SMTP_PROXY_GREETING,
                       [mp.ClientIdentity(b"192.0.2.9", b"4711", None, "XCLIENT")]),
                      (b"EHLO x\r\n", SMTP_XCLIENT_EHLO, []),
                      (b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n", b"",
                       [mp.Credentials(b"alice", b"secret")])])
        self.smtp([(b"EHLO x\r\n", SMTP_PROXY_EHLO, []),
                   (b"XCLIENT ADDR=192.0.2.9 PORT=4711\r\n", mp.SMTP_INVALID, []),
                   (b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n", b"",
                    [mp.Credentials(b"alice", b"secret")])])
        machine = make_smtp(max_errors=2)
        machine.data_to_send()
        self.assertEqual(machine.receive_data(b"XCLIENT ADDR=192.0.2.9\r\nXCLIENT NAME=x\r\n"),
                         [mp.Closed("client sent too many invalid commands")])

    def test_xclient_sits_before_auth_and_starttls_in_the_ehlo_reply(self):
        machine = make_smtp(smtp_capabilities=["SIZE 10485760"], starttls="on")
        machine.xclient_allowed = True
        self.assertEqual(machine.ehlo_reply(), b"250-mail.test\r\n250-SIZE 10485760\r\n"
                         b"250-XCLIENT ADDR PORT NAME\r\n250-AUTH PLAIN LOGIN\r\n"
                         b"250 STARTTLS\r\n")

    def test_xclient_restarts_the_dialogue(self):
        """XCLIENT_README: the server "resets state to the initial SMTP
        greeting protocol stage": the HELO is forgotten, EHLO again."""
        machine = make_smtp(smtp_auth=["none"])
        machine.xclient_allowed = True
        machine.data_to_send()
        machine.receive_data(b"EHLO before.example\r\nXCLIENT NAME=gw.example\r\n")
        self.assertEqual(machine.data_to_send(), b"250-mail.test\r\n250 XCLIENT ADDR PORT NAME\r\n"
                         + SMTP_PROXY_GREETING)
        self.assertEqual((machine.helo, machine.esmtp), (None, False))

    def test_xclient_values_are_xtext_any_case_unknown_ones_left_alone(self):
        """RFC 3461 xtext; ADDR with IPV6: (or bare); [UNAVAILABLE] and
        [TEMPUNAVAIL] leave ADDR and PORT as they are, and are NAME's own
        words for a failed lookup; other attributes are taken and ignored."""
        self.xclient([(b"xclient addr=IPV6:2001:DB8::1 name=mail+2Dgw.example.org helo=x+20y "
                       b"proto=ESMTP login=[UNAVAILABLE]\r\n", SMTP_PROXY_GREETING,
                       [mp.ClientIdentity(b"2001:db8::1", b"", b"mail-gw.example.org", "XCLIENT")]),
                      (b"XCLIENT ADDR=[UNAVAILABLE] PORT=[TEMPUNAVAIL] NAME=[TEMPUNAVAIL]\r\n",
                       SMTP_PROXY_GREETING, [mp.ClientIdentity(b"", b"", b"[TEMPUNAVAIL]", "XCLIENT")]),
                      (b"XCLIENT ADDR=2001:db8::2 PORT=0 ADDR=192.0.2.1\r\n", SMTP_PROXY_GREETING,
                       [mp.ClientIdentity(b"192.0.2.1", b"0", None, "XCLIENT")]),
                      (b"XCLIENT HELO=x DESTADDR=192.0.2.25 DESTPORT=25\r\n", SMTP_PROXY_GREETING, []),
                      (b"QUIT\r\n", mp.SMTP_BYE, [mp.Quit()])])

    def test_malformed_xclient_is_refused_and_changes_nothing(self):
        bad = [b"XCLIENT", b"XCLIENT ADDR", b"XCLIENT =192.0.2.9", b"XCLIENT ADDR=",
               b"XCLIENT ADDR=192.0.2", b"XCLIENT ADDR=[192.0.2.9]", b"XCLIENT ADDR=fe80::1%eth0",
               b"XCLIENT ADDR=IPV6:192.0.2.9", b"XCLIENT ADDR=192.0.2.9+00",
               b"XCLIENT ADDR=192.0.2.9 PORT=65536", b"XCLIENT ADDR=192.0.2.9 PORT=-1",
               b"XCLIENT PORT=4711 NAME=a..b", b"XCLIENT NAME=bad_name.example",
               b"XCLIENT NAME=x+0D+0AY", b"XCLIENT NAME=" + b"a" * 254,
               b"XCLIENT HELO=a=b", b"XCLIENT HELO=+4", b"XCLIENT FOO"]
        exchanges = [(b"EHLO x\r\n", b"250-mail.test\r\n250 XCLIENT ADDR PORT NAME\r\n", [])]
        exchanges += [(line + b"\r\n", mp.SMTP_XCLIENT_SYNTAX, []) for line in bad]
        exchanges += [(b"MAIL FROM:<a@b>\r\n", mp.SMTP_OK, []),
                      (b"RCPT TO:<c@d>\r\n", b"", [mp.Credentials(b"", b"", "none")])]
        self.xclient(exchanges, tail=b"DATA\r\n", smtp_auth=["none"], max_errors=2)

    def test_xclient_in_a_mail_transaction_is_a_bad_sequence(self):
        """XCLIENT_README: "at any time, except in the middle of a mail
        delivery transaction"."""
        self.xclient([(b"EHLO x\r\n", b"250-mail.test\r\n250 XCLIENT ADDR PORT NAME\r\n", []),
                      (b"MAIL FROM:<a@b>\r\n", mp.SMTP_OK, []),
                      (b"XCLIENT ADDR=192.0.2.9\r\n", mp.SMTP_BAD_SEQUENCE, []),
                      (b"RSET\r\n", mp.SMTP_OK, []),
                      (b"XCLIENT ADDR=192.0.2.9\r\n", SMTP_PROXY_GREETING,
                       [mp.ClientIdentity(b"192.0.2.9", b"", None, "XCLIENT")]),
                      (b"QUIT\r\n", mp.SMTP_BYE, [mp.Quit()])], smtp_auth=["none"])


# -- STARTTLS in the machines: capabilities and the injection defence ---------------

class StartTlsMachineTests(unittest.TestCase):
    def test_imap_capabilities_for_off_on_only(self):
        base = b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS"
        cases = {"off": (base + b" AUTH=PLAIN\r\n", base + b" AUTH=PLAIN\r\n"),
                 "on": (base + b" AUTH=PLAIN STARTTLS\r\n", base + b" AUTH=PLAIN\r\n"),
                 "only": (base + b" STARTTLS LOGINDISABLED\r\n", base + b" AUTH=PLAIN\r\n")}
        for starttls, (before, after) in cases.items():
            machine = make_machine("imap", starttls=starttls)
            self.assertEqual(machine.capability(), before, starttls)
            machine.tls = True
            self.assertEqual(machine.capability(), after, starttls)

    def test_pop3_capabilities_for_off_on_only(self):
        plain = b"+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\nSASL PLAIN LOGIN\r\n"
        cases = {"off": plain + b".\r\n", "on": plain + b"STLS\r\n.\r\n",
                 "only": b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nSTLS\r\n.\r\n"}
        for starttls, expected in cases.items():
            machine = make_machine("pop3", starttls=starttls)
            self.assertEqual(machine.capability(), expected, starttls)
            machine.tls = True
            self.assertEqual(machine.capability(), plain + b".\r\n", starttls)

    def test_smtp_ehlo_for_off_on_only(self):
        cases = {"off": b"250-mail.test\r\n250 AUTH PLAIN LOGIN\r\n",
                 "on": b"250-mail.test\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n",
                 "only": b"250-mail.test\r\n250 STARTTLS\r\n"}
        for starttls, expected in cases.items():
            machine = make_machine("smtp", starttls=starttls)
            self.assertEqual(machine.ehlo_reply(), expected, starttls)
            machine.tls = True
            self.assertEqual(machine.ehlo_reply(), b"250-mail.test\r\n250 AUTH PLAIN LOGIN\r\n")

    def test_only_refuses_logins_before_tls(self):
        imap = make_machine("imap", starttls="only")
        imap.data_to_send()
        self.assertEqual(imap.receive_data(b"a1 LOGIN alice secret\r\na2 AUTHENTICATE PLAIN\r\n"), [])
        self.assertEqual(imap.data_to_send(), b"a1" + BAD + b"a2" + BAD)
        pop3 = make_machine("pop3", starttls="only")
        pop3.data_to_send()
        self.assertEqual(pop3.receive_data(b"USER alice\r\nAUTH PLAIN\r\nAPOP a b\r\n"), [])
        self.assertEqual(pop3.data_to_send(), mp.POP3_INVALID * 3)
        smtp = make_machine("smtp", starttls="only", smtp_auth=["plain", "none"])
        self.assertEqual(smtp.receive_data(b"AUTH PLAIN\r\nMAIL FROM:<a@b>\r\n"), [])
        self.assertEqual(smtp.data_to_send(), mp.SMTP_INVALID + mp.SMTP_TLS_FIRST)
        # Without smtp_auth none, MAIL hears nginx's own refusal, as after TLS;
        # none of these refusals counts towards max_errors.
        smtp = make_machine("smtp", starttls="only", smtp_auth=["plain"], max_errors=1)
        self.assertEqual(smtp.receive_data(b"MAIL FROM:<a@b>\r\nAUTH PLAIN\r\nNOOP\r\n"), [])
        self.assertEqual(smtp.data_to_send(), mp.SMTP_AUTH_REQUIRED + mp.SMTP_INVALID + mp.SMTP_OK)

    def test_pipelined_plaintext_after_starttls_is_dropped(self):
        cases = [("imap", b"a1 STARTTLS\r\na2 LOGIN alice secret\r\n", b"a1 " + mp.IMAP_OK),
                 ("pop3", b"STLS\r\nUSER alice\r\nPASS secret\r\n", mp.POP3_OK),
                 ("smtp", b"STARTTLS\r\nAUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n",
                  mp.SMTP_START_TLS)]
        for protocol, data, reply in cases:
            for chunking in (whole, byte_by_byte):
                machine = make_machine(protocol, starttls="on")
                machine.data_to_send()
                events = []
                for chunk in chunking(data):
                    events += machine.receive_data(chunk)
                self.assertEqual(events, [mp.StartTls()], protocol)
                self.assertEqual(machine.data_to_send(), reply, protocol)
                self.assertEqual(machine.trailing_data, b"", protocol)
                self.assertEqual(machine.tls_started(), [], protocol)
                self.assertEqual(machine.data_to_send(), b"", protocol)

    def test_smtp_forgets_helo_and_transaction(self):
        machine = make_machine("smtp", starttls="on", smtp_auth=["none"])
        machine.receive_data(b"EHLO x\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\n")
        machine.tls_started()
        self.assertEqual((machine.helo, machine.esmtp, machine.mail_from), (None, False, None))
        self.assertEqual(machine.receive_data(b"RCPT TO:<c@d>\r\n"), [])
        self.assertTrue(machine.data_to_send().endswith(mp.SMTP_BAD_SEQUENCE))

    def test_starttls_refused_when_off_or_already_on(self):
        machine = make_machine("imap", starttls="on", tls=True)
        machine.data_to_send()
        machine.receive_data(b"a1 STARTTLS\r\n")
        self.assertEqual(machine.data_to_send(), b"a1" + BAD)

    def test_external(self):
        machine = make_machine("imap", imap_auth=["plain", "external"], tls=True)
        self.assertIn(b"AUTH=EXTERNAL", machine.capability())
        machine.data_to_send()
        self.assertEqual(machine.receive_data(b"a1 AUTHENTICATE EXTERNAL =\r\n"),
                         [mp.Credentials(b"", b"", "external")])
        machine = make_machine("smtp", smtp_auth=["external"])
        self.assertEqual(machine.receive_data(b"AUTH EXTERNAL\r\n"), [])
        self.assertEqual(machine.data_to_send(), b"334 " + mp.SASL_USERNAME_PROMPT)
        self.assertEqual(machine.receive_data(b64(b"alice") + b"\r\n"),
                         [mp.Credentials(b"alice", b"", "external")])
        machine = make_machine("pop3")                          # not enabled
        machine.data_to_send()
        machine.receive_data(b"AUTH EXTERNAL =\r\n")
        self.assertEqual(machine.data_to_send(), mp.POP3_INVALID)

    def test_external_rule_of_the_user_table(self):
        facts = mp.CertificateFacts("SUCCESS", identities=("alice", "alice@example.com"))
        users = {"alice@example.com": mp.PasswordEntry("PLAIN", "secret"),
                 "bob": mp.PasswordEntry("PLAIN", "pw")}
        result = mp.authenticate_external(users, {}, upstream(), b"", facts)
        self.assertEqual((result.ok, result.login, result.password), (False, b"", b""))  # "alice" not in users
        result = mp.authenticate_external(users, {}, upstream(), b"alice@example.com", facts)
        self.assertEqual((result.ok, result.login, result.password), (True, b"alice@example.com", b"secret"))
        self.assertFalse(mp.authenticate_external(users, {}, upstream(), b"bob", facts).ok)
        self.assertFalse(mp.authenticate_external(users, {}, upstream(), b"alice@example.com",
                                                  mp.CertificateFacts("NONE")).ok)


# -- OAuth tokens -------------------------------------------------------------------

class OAuthTests(unittest.TestCase):
    def test_parse_responses(self):
        self.assertEqual(mp.parse_oauth_response(b"user=alice@example.com\x01auth=Bearer ya29.x\x01\x01", True),
                         (b"alice@example.com", b"ya29.x"))
        self.assertEqual(mp.parse_oauth_response(
            b"n,a=user=3Dx=2Cy@example.com,\x01host=server.example.com\x01port=143\x01"
            b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01", False),
            (b"user=x,y@example.com", b"vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="))
        for bad in (b"", b"user=a\x01\x01", b"auth=Bearer x\x01\x01", b"x,a=b,\x01auth=Bearer t\x01\x01"):
            self.assertIsNone(mp.parse_oauth_response(bad, bad.startswith(b"user") or bad.startswith(b"auth")))

    def test_machines_take_tokens_only_when_enabled(self):
        token = b64(b"user=alice\x01auth=Bearer T\x01\x01")
        machine = make_machine("imap", imap_auth=["plain", "xoauth2", "oauthbearer"])
        self.assertIn(b"AUTH=XOAUTH2 AUTH=OAUTHBEARER", machine.capability())
        machine.data_to_send()
        self.assertEqual(machine.receive_data(b"a1 AUTHENTICATE XOAUTH2 " + token + b"\r\n"),
                         [mp.Credentials(b"alice", b"T", "xoauth2")])
        machine = make_machine("imap")
        machine.data_to_send()
        machine.receive_data(b"a1 AUTHENTICATE XOAUTH2 " + token + b"\r\n")
        self.assertEqual(machine.data_to_send(), b"a1" + BAD)

    def test_failure_challenge_then_refusal(self):
        for protocol, prompt, ack, final in (
                ("imap", b"+ ", b"\r\n", b"a1 NO bad token\r\n"),
                ("pop3", b"+ ", b"AQ==\r\n", b"-ERR bad token\r\n"),
                ("smtp", b"334 ", b"\r\n", b"535 5.7.0 bad token\r\n")):
            machine = make_machine(protocol, **{protocol + "_auth": ["oauthbearer"]})
            machine.data_to_send()
            command = {"imap": b"a1 AUTHENTICATE", "pop3": b"AUTH", "smtp": b"AUTH"}[protocol]
            events = machine.receive_data(command + b" OAUTHBEARER " +
                                          b64(b"n,a=alice,\x01auth=Bearer T\x01\x01") + b"\r\n")
            self.assertEqual(events, [mp.Credentials(b"alice", b"T", "oauthbearer")])
            reply = (machine.failure_reply(b"bad token", b"535 5.7.0") if protocol == "smtp"
                     else machine.failure_reply(b"bad token"))
            self.assertEqual(machine.auth_failed(reply, b'{"status":"invalid_token"}', close=True), [])
            self.assertEqual(machine.data_to_send(), prompt + b64(b'{"status":"invalid_token"}') + b"\r\n")
            self.assertEqual(machine.receive_data(ack), [mp.Closed("")])
            self.assertEqual(machine.data_to_send(), final)

    def test_token_passed_on_to_the_backend(self):
        response = mp.oauth_initial_response("xoauth2", b"alice", b"T")
        self.assertEqual(base64.b64decode(response), b"user=alice\x01auth=Bearer T\x01\x01")
        self.assertEqual(mp.imap_token_script(b"a1 ", "xoauth2", response)[1:],
                         [mp.Send(b"a1 AUTHENTICATE XOAUTH2 " + response + b"\r\n",
                                  "AUTHENTICATE XOAUTH2"),
                          mp.Expect("imap-tagged", relay=True)])
        script = mp.smtp_login_script(server_settings("smtp", xclient=False), facts(
            login=b"alice", password=b"T", backend_auth="oauthbearer"))
        self.assertEqual(script[3], mp.Send(b"AUTH OAUTHBEARER " +
                                            mp.oauth_initial_response("oauthbearer", b"alice", b"T") + b"\r\n",
                                            "AUTH OAUTHBEARER"))

    def test_built_in_table_refuses_token_methods(self):
        directory = TempDir(self)
        path = directory.write("t.conf", """\
            [server imap]
            listen = 127.0.0.1:18143
            protocol = imap
            imap_auth = plain xoauth2
            proxy_pass = 127.0.0.1:143
            """)
        with self.assertRaises(mp.ConfigErrors) as caught:
            mp.load_config(path)
        self.assertIn("needs auth_http", str(caught.exception))


# -- linear work --------------------------------------------------------------------

class ClientMachineLinearWorkTests(LinearWorkTestCase):
    def test_imap_quoted_string(self):
        self.assert_linear(self.machine_run(
            "imap", lambda n: b'a1 LOGIN "' + b"x" * n + b'" "p"\r\n'), 4096)

    def test_imap_literal_holding_line_ends(self):
        self.assert_linear(self.machine_run(
            "imap", lambda n: b"a1 LOGIN {%d+}\r\n" % n + b"\n" * n + b" p\r\n"), 4096)

    def test_imap_spaces_after_the_tag(self):
        self.assert_linear(self.machine_run("imap", lambda n: b"a1" + b" " * n + b"NOOP\r\n"), 4096)

    def test_imap_sasl_response(self):
        response = lambda n: b"a1 AUTHENTICATE PLAIN\r\n" + base64.b64encode(
            b"\0alice\0" + b"p" * n) + b"\r\n"
        self.assert_linear(self.machine_run("imap", response), 4096)

    def test_pop3_line(self):
        self.assert_linear(self.machine_run("pop3", lambda n: b"USER " + b"u" * n + b"\r\n"), 4096)

    def test_smtp_line(self):
        def run(size):
            data = b"EHLO " + b"h" * size + b"\r\nQUIT\r\n"
            machine = make_smtp(smtp_client_buffer=len(data))
            self.assertEqual(feed_byte_by_byte(machine.receive_data, data), [mp.Quit()])
        self.assert_linear(run, 4096)


# ========================================================================== #
# ####                          Authentication                          #### #
# ========================================================================== #
# The user table (password schemes, what a failure costs, routes), the
# failed-login throttle, recipient rules, external (certificate) identities,
# and the auth_http request builder and response parser, byte by byte.
# (The auth_http client, end to end, is in "Outbound clients".)

# -- the user table -----------------------------------------------------------------

class PasswordSchemeTests(unittest.TestCase):
    # Ulrich Drepper, "Unix crypt using SHA-256 and SHA-512", test vectors.
    SHA_CRYPT_VECTORS = [
        ("$5$saltstring", b"Hello world!",
         "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
        ("$5$rounds=10000$saltstringsaltstring", b"Hello world!",
         "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"),
        ("$5$rounds=5000$toolongsaltstring", b"This is just a test",
         "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5"),
        ("$5$rounds=10$roundstoolow", b"the minimum number is still observed",
         "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC"),
        ("$6$saltstring", b"Hello world!",
         "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJu"
         "esI68u4OTLiBFdcbYEdFCoEOfaS35inz1"),
        ("$6$rounds=10000$saltstringsaltstring", b"Hello world!",
         "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sb"
         "HbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."),
        ("$6$rounds=1400$anotherlongsaltstring",
         b"a very much longer text to encrypt.  This one even stretches over morethan one line.",
         "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wP"
         "vMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1"),
        ("$6$rounds=77777$short", b"we have a short salt string but not a short password",
         "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0g"
         "ge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0"),
    ]

    def test_sha_crypt_vectors(self):
        for setting, password, expected in self.SHA_CRYPT_VECTORS:
            self.assertEqual(mp.sha_crypt(password, setting), expected, setting)
            entry = mp.parse_password_entry(
                "{%s}%s" % ("SHA512-CRYPT" if setting.startswith("$6$") else "SHA256-CRYPT", expected))
            self.assertTrue(mp.password_matches(entry, password))
            self.assertFalse(mp.password_matches(entry, password + b"x"))

    def test_pbkdf2_rfc7914_vector(self):
        # RFC 7914 §11: PBKDF2-HMAC-SHA256 ("passwd", "salt", 1 iteration).
        expected = bytes.fromhex("55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
                                 "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783")
        entry = mp.parse_password_entry("{PBKDF2-SHA256}1$%s$%s" % (
            base64.b64encode(b"salt").decode(), base64.b64encode(expected).decode()))
        self.assertTrue(mp.password_matches(entry, b"passwd"))
        self.assertFalse(mp.password_matches(entry, b"passwe"))

    def test_hash_password_round_trip(self):
        for scheme in ("PBKDF2-SHA256", "SHA512-CRYPT", "SHA256-CRYPT", "PLAIN"):
            value = mp.hash_password("pä ss%".encode(), scheme, rounds=1000 if scheme != "PLAIN" else None)
            entry = mp.parse_password_entry(value)
            self.assertEqual(entry.scheme, scheme)
            self.assertTrue(mp.password_matches(entry, "pä ss%".encode()))
            self.assertFalse(mp.password_matches(entry, b"pass"))

    def test_plain_comparison_uses_compare_digest(self):
        calls = []
        original = mp.hmac.compare_digest
        mp.hmac.compare_digest = lambda a, b: calls.append((a, b)) or original(a, b)
        try:
            mp.password_matches(mp.PasswordEntry("PLAIN", "secret"), b"guess")
        finally:
            mp.hmac.compare_digest = original
        self.assertEqual(calls, [(b"secret", b"guess")])

    def test_entry_repr_hides_data(self):
        self.assertNotIn("secret", repr(mp.PasswordEntry("PLAIN", "secret")))


def upstream(host="127.0.0.1", port=143):
    return mp.Upstream(host, port, ((socket.AF_INET, (host, port)),))


class UserTableTests(unittest.TestCase):
    USERS = {"alice": mp.PasswordEntry("PLAIN", "secret"),
             "bob@example.com": mp.parse_password_entry(mp.hash_password(b"pw", "SHA256-CRYPT", 1000))}

    def check(self, credentials, routes=None):
        return mp.authenticate(self.USERS, routes or {}, upstream(), credentials)

    def test_plain_login(self):
        result = self.check(mp.Credentials(b"alice", b"secret"))
        self.assertTrue(result.ok)
        self.assertEqual((result.login, result.password, result.upstream), (b"alice", b"secret", upstream()))
        self.assertFalse(self.check(mp.Credentials(b"alice", b"Secret")).ok)
        self.assertFalse(self.check(mp.Credentials(b"nobody", b"secret")).ok)
        self.assertTrue(self.check(mp.Credentials(b"bob@example.com", b"pw")).ok)

    def test_cram_md5_and_apop_give_the_clear_password_to_the_backend(self):
        digest = mp.cram_md5_digest(b"secret", SALT)
        result = self.check(mp.Credentials(b"alice", digest, "cram-md5", SALT))
        self.assertTrue(result.ok)
        self.assertEqual(result.password, b"secret")
        result = self.check(mp.Credentials(b"alice", mp.apop_digest(SALT, b"secret"), "apop", SALT))
        self.assertTrue(result.ok)
        self.assertEqual(result.password, b"secret")
        self.assertFalse(self.check(mp.Credentials(b"alice", b"0" * 32, "apop", SALT)).ok)

    def test_digest_methods_need_a_plain_entry(self):
        digest = mp.cram_md5_digest(b"pw", SALT)
        result = self.check(mp.Credentials(b"bob@example.com", digest, "cram-md5", SALT))
        self.assertFalse(result.ok)
        self.assertIn("{PLAIN}", result.reason)

    def test_routes_by_login_then_domain(self):
        routes = {"alice": mp.Route(1143, upstream("127.0.0.2", 1)),
                  "@example.com": mp.Route(None, upstream("127.0.0.3", 1))}
        self.assertEqual(self.check(mp.Credentials(b"alice", b"secret"), routes).upstream.addresses,
                         ((socket.AF_INET, ("127.0.0.2", 1143)),))
        self.assertEqual(self.check(mp.Credentials(b"bob@example.com", b"pw"), routes).upstream.addresses,
                         ((socket.AF_INET, ("127.0.0.3", 143)),))


# -- issue 12: authentication and certificate defects -------------------------------
# A user table whose failures tell known logins from unknown ones, password
# checks that grow with the square of the password, certificate names and
# other values that write into the auth server's request, a Unicode
# look-alike that logs in as another user, a certificate that kills a worker.

def timing_ratio(first, second, samples: int = 21) -> float:
    """How many times as long second() takes as first(): the least time of
    each over interleaved samples (the order alternates), each sample
    repeating its call until it lasts about 2 ms.  The least, not the median:
    on a loaded machine (other test runs on two cores) a process is
    preempted in nearly half of such samples, and preemption only ever adds
    time, so a path's own cost is its fastest sample."""
    started = time.perf_counter()
    first()
    repeat = max(1, int(0.002 / max(time.perf_counter() - started, 1e-7)))
    times = ([], [])
    for index in range(samples):
        order = (0, 1) if index % 2 else (1, 0)
        for which in order:
            call = (first, second)[which]
            started = time.perf_counter()
            for _ in range(repeat):
                call()
            times[which].append(time.perf_counter() - started)
    return min(times[1]) / min(times[0])


class PasswordCostTests(unittest.TestCase):
    TABLES = {
        "PLAIN": "{PLAIN}secret",
        "SHA512-CRYPT": mp.hash_password(b"secret", "SHA512-CRYPT"),
        "SHA256-CRYPT rounds=2000": mp.hash_password(b"secret", "SHA256-CRYPT", rounds=2000),
        "PBKDF2-SHA256 2000": mp.hash_password(b"secret", "PBKDF2-SHA256", rounds=2000),
    }

    def users(self, *values: str) -> mp.Config:
        lines = "".join("user%d = %s\n" % (number, value) for number, value in enumerate(values))
        return load_text(self, BASE_CONFIG, "\n[users]\n" + lines).users

    def test_an_unknown_login_costs_what_a_wrong_password_costs(self):
        # README: "An unknown login costs the same hashing time as a wrong
        # password."  It cost a fixed PBKDF2-100000 (~25 ms) whatever the
        # table held: 8 times a SHA512-CRYPT check, thousands of times a
        # {PLAIN} one.
        for name, value in self.TABLES.items():
            with self.subTest(table=name):
                users = self.users(value, value)
                known = mp.Credentials(b"user1", b"wrong password")
                unknown = mp.Credentials(b"nobody", b"wrong password")
                self.assertFalse(mp.authenticate(users, {}, upstream(), unknown).ok)
                ratio = timing_ratio(lambda: mp.authenticate(users, {}, upstream(), known),
                                     lambda: mp.authenticate(users, {}, upstream(), unknown))
                self.assertTrue(0.5 < ratio < 2.0, "unknown/known login: %.1f times" % ratio)

    def test_the_dummy_has_the_cost_most_users_have(self):
        sha512 = self.TABLES["SHA512-CRYPT"]
        users = self.users("{PLAIN}a", sha512, self.TABLES["PBKDF2-SHA256 2000"], sha512)
        self.assertEqual(mp.password_cost(users.dummy), ("SHA512-CRYPT", None))
        for name, value in self.TABLES.items():
            dummy = self.users(value).dummy
            self.assertEqual(mp.password_cost(dummy), mp.password_cost(mp.parse_password_entry(value)))
            self.assertFalse(mp.password_matches(dummy, b"secret"), name)
        # Digest logins of an unknown user take the {PLAIN} entries' path too.
        users = self.users("{PLAIN}secret")
        digest = mp.cram_md5_digest(b"secret", SALT)
        self.assertFalse(mp.authenticate(users, {}, upstream(),
                                         mp.Credentials(b"nobody", digest, "cram-md5", SALT)).ok)

    def test_known_and_unknown_logins_go_the_same_way_off_the_loop_or_not(self):
        """check_hashes: a table whose users hash sends an unknown login to
        the pool too (against the dummy); a {PLAIN} table keeps both on the
        loop; a digest login only compares, so stays."""
        for name, value in self.TABLES.items():
            with self.subTest(table=name):
                users = self.users(value, value)
                hashed = name != "PLAIN"
                for login in (b"user1", b"nobody", b"\xff not UTF-8"):
                    self.assertEqual(mp.check_hashes(users, mp.Credentials(login, b"wrong")), hashed)
                digest = mp.Credentials(b"nobody", b"0" * 32, "cram-md5", SALT)
                self.assertFalse(mp.check_hashes(users, digest))

    def test_a_long_password_costs_what_the_longest_allowed_one_costs(self):
        # SHA-crypt's steps 13-15 built key * len(key): 16 KB of password took
        # 0.7 s and 256 MB.  Passwords are now cut off at PASSWORD_MAX.
        longest = b"p" * mp.PASSWORD_MAX
        entry = mp.parse_password_entry(mp.hash_password(longest, "SHA512-CRYPT", rounds=1000))
        self.assertTrue(mp.password_matches(entry, longest))
        self.assertFalse(mp.password_matches(entry, longest + b"p"))   # no match on a prefix
        users = {"alice": entry}
        result = mp.authenticate(users, {}, upstream(), mp.Credentials(b"alice", longest + b"p"))
        self.assertEqual((result.ok, result.reason), (False, "wrong password"))
        wrong = b"q" * mp.PASSWORD_MAX
        ratio = timing_ratio(lambda: mp.password_matches(entry, wrong),
                             lambda: mp.password_matches(entry, b"q" * 8192), samples=5)
        self.assertLess(ratio, 2.0, "8 KB password / %d bytes: %.1f times" % (mp.PASSWORD_MAX, ratio))

    def test_sha_crypt_memory_is_linear_in_the_password(self):
        tracemalloc.start()
        try:
            mp.sha_crypt(b"x" * 4096, "$6$rounds=1000$salt")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 64 * 4096, "peak %d bytes for a 4 KB password" % peak)


# Made by Dovecot 2.3.19.1's `doveadm pw -s SCHEME -p secret` (the tests need
# no Dovecot): what a Dovecot passwd-file holds, each in doveadm's default
# encoding, or the one its suffix names.
DOVECOT_SECRET = {
    "SSHA": "{SSHA}G6GHs0ugfWIoV7SHktwSWLRV1LeOio1s",
    "SSHA256": "{SSHA256}UulJiRpSFokIewOmtgMKcB8Ad6lzXUhupQsrHTPDCal28tVl",
    "SSHA512": "{SSHA512}HPWe56w4BweGQB1ao7SX39g/kFwGmcvsGt0rvhb4nPBq02hGmaSiZ8HHuxbJqq1bWXN7hxqIwa2qmzj+r8BkOberDwM=",
    "SHA": "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",
    "SHA1": "{SHA1}5en6G6MezRroT3XKqkdPOmY/BfQ=",
    "SHA256": "{SHA256}K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols=",
    "SHA512": "{SHA512}vSsar3708Jvp9Szi2NWZZ02Bqp1qRCFpbcTZPdBhnWgs5WtNZKnvCXdhztmeD2cmW192CF5bDufKRpayrW/isg==",
    "SSHA256.HEX": "{SSHA256.HEX}1014d9f67cb67b0397068f8dfea152c34b154b62345b81924c63f63dbe68569d3797588a",
    "SHA512.HEX": "{SHA512.HEX}bd2b1aaf7ef4f09be9f52ce2d8d599674d81aa9d6a4421696dc4d93dd0619d682ce56b4d64a9ef"
                  "097761ced99e0f67265b5f76085e5b0ee7ca4696b2ad6fe2b2",
    "SSHA.b64": "{SSHA.B64}FqDVUxX+IWSdlpF1dDj4Jqjl1+UFhbOG",
    "MD5-CRYPT": "{MD5-CRYPT}$1$0DIYaMTC$/j.CbBN7PDkM5/YFhOY4//",
    "SHA256-CRYPT": "{SHA256-CRYPT}$5$p4AvFZMpqxVXobe5$lz1HnwOwoNKtCIr9v5jdHeD.kMscEeGsfRk3Pl90fJ7",
    "SHA512-CRYPT": "{SHA512-CRYPT}$6$oA0z/nHtuF5faAgd$m6ZlYkioVXDNYaik4nKH7pIuplCvrZSjjIa9Iatr.qS14aCYtz/5q"
                    "CklI4.7cnErpusD.G85uuiNcHC5qthha.",
}
# The same, for schemes that need the host's libraries (libcrypt's bcrypt, libargon2).
DOVECOT_SECRET_LIBRARY = {
    "BLF-CRYPT": "{BLF-CRYPT}$2y$05$9eG7175RmeLr9B/EjbdFiugmBRsJ.tyh/PbQMDqv3qUDr79ZEPnB2",
    "ARGON2I": "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$1SeDVn8xpgtwxs9M16TNuw$EF8Sq4Cbvq+QWrPTKnSneMJSywVUE4q0WjgX3yw5AD8",
    "ARGON2ID": "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$igkqkIoY/EwmadrhOny7YA$6E2cQSuKTSd6RQKvy7NbFUglPSNjT4UB/rb7eqWQfuo",
}
DOVECOT_NEW_SSHA512 = ("{SSHA512}ZEXtUhduxcKUuVAoJdckuML0pW0X2RfG8wIUSO7REm0bHJXXJr8VD8aazCF6V1sf2axuMuHsrzYWn"
                       "SFGx0OFWhbGVLI=")     # doveadm pw -s SSHA512 -p new


def host_checks(scheme: str) -> bool:
    return mp.missing_library(scheme, DOVECOT_SECRET_LIBRARY[scheme].split("}", 1)[1]) is None


def without_host_libraries(test) -> None:
    """For the rest of the test: no libcrypt and no libargon2 on this host."""
    patches = [unittest.mock.patch.object(mp, "crypt_function", lambda: None),
               unittest.mock.patch.object(mp, "argon2_function", lambda: None)]
    for patch in patches:
        patch.start()
        test.addCleanup(patch.stop)
    mp._missing_library.cache_clear()
    test.addCleanup(mp._missing_library.cache_clear)


class DovecotSchemeTests(unittest.TestCase):
    """Dovecot's password schemes, so that its passwd-files serve unchanged."""

    def assertChecks(self, name: str, value: str, password: bytes = b"secret") -> None:
        entry = mp.parse_password_entry(value)
        self.assertTrue(mp.password_matches(entry, password), name)
        self.assertFalse(mp.password_matches(entry, password.capitalize() + b"x"), name)
        self.assertFalse(mp.password_matches(entry, password + b"\0"), name)

    def test_each_scheme_as_doveadm_writes_it(self):
        for name, value in DOVECOT_SECRET.items():
            with self.subTest(scheme=name):
                self.assertChecks(name, value)

    def test_bcrypt_and_argon2_through_the_host_libraries(self):
        for name, value in DOVECOT_SECRET_LIBRARY.items():
            with self.subTest(scheme=name):
                if not host_checks(name):
                    self.skipTest("this host cannot check %s" % name)
                self.assertChecks(name, value)

    def test_bcrypt_test_vector(self):
        # John the Ripper's and crypt_blowfish's vector, in each variant Dovecot may hold.
        if not host_checks("BLF-CRYPT"):
            self.skipTest("no bcrypt in this host's libcrypt")
        for variant in "aby":
            self.assertChecks(variant, "{BLF-CRYPT}" + mp.BLF_TEST_HASH % variant, b"U*U")

    def test_md5_crypt_vectors(self):
        # Made by libxcrypt's crypt(3), which follows Poul-Henning Kamp's code:
        # an empty password, one longer than a digest, one of 8-bit bytes.
        for password, expected in [(b"", "$1$saltsalt$5Jhcit4zN9UlGiA0txPkO0"),
                                   (b"a password longer than sixteen bytes",
                                    "$1$12345678$H2K48mBSX8MIUbPKzMydi/"),
                                   ("pässwörd".encode(), "$1$ab$bRZzLnQPD1ql12pSoshc71")]:
            self.assertEqual(mp.md5_crypt(password, expected), expected)
            self.assertChecks(expected, "{MD5-CRYPT}" + expected, password)
        self.assertEqual(mp.md5_crypt(b"secret", "$1$0DIYaMTCtoolong$"), "$1$0DIYaMTC$/j.CbBN7PDkM5/YFhOY4//")

    def test_encodings_and_names(self):
        # Dovecot's: base64 by default, .HEX and .B64 suffixes, an unsalted
        # digest in hex recognised by its length, scheme names in any case,
        # SHA1 and CLEARTEXT for SHA and PLAIN.
        hex_sha512 = DOVECOT_SECRET["SHA512.HEX"].split("}", 1)[1]
        for value in ("{SHA512}" + hex_sha512, "{sha512.hex}" + hex_sha512.upper(),
                      "{ssha512}" + DOVECOT_SECRET["SSHA512"].split("}", 1)[1],
                      "{SSHA256.b64}" + DOVECOT_SECRET["SSHA256"].split("}", 1)[1],
                      "{SSHA512}" + DOVECOT_SECRET["SSHA512"].split("}", 1)[1].rstrip("="),
                      "{CLEARTEXT}secret", "{PLAIN.B64}c2VjcmV0", "{PLAIN.HEX}736563726574"):
            with self.subTest(value=value):
                self.assertChecks(value, value)
        self.assertEqual(mp.parse_password_entry(DOVECOT_SECRET["SHA1"]).scheme, "SHA")

    def test_crypt_is_read_by_the_prefix(self):
        # Dovecot's {CRYPT}, its default_pass_scheme, is crypt(3): doveadm pw -s CRYPT
        # wrote the bcrypt one; the others are the vectors above under {CRYPT}.
        values = {"SHA512-CRYPT": DOVECOT_SECRET["SHA512-CRYPT"], "SHA256-CRYPT": DOVECOT_SECRET["SHA256-CRYPT"],
                  "MD5-CRYPT": DOVECOT_SECRET["MD5-CRYPT"]}
        if host_checks("BLF-CRYPT"):
            values["BLF-CRYPT"] = "{X}$2y$05$M0.fnkfJUeC5aCKKseaqxOLZWjWYbsahJFg84nf3lLange4U0Evjq"
        for scheme, value in values.items():
            crypt = "{crypt}" + value.split("}", 1)[1]
            with self.subTest(value=crypt):
                self.assertEqual(mp.parse_password_entry(crypt).scheme, scheme)
                self.assertChecks(crypt, crypt)
        for value in ("{CRYPT}abJnggxhB/yWI", "{CRYPT}$y$j9T$salt$hash"):      # DES, yescrypt
            with self.assertRaisesRegex(mp.ConfigValueError, r"\{CRYPT\} is read for \$1\$, \$5\$"):
                mp.parse_password_entry(value)

    def test_salt_follows_the_digest(self):
        salt = b"\x01\x02\x03\x04\x05"
        value = "{SSHA256}" + base64.b64encode(hashlib.sha256(b"pw" + salt).digest() + salt).decode()
        self.assertChecks("salt after", value, b"pw")
        before = "{SSHA256}" + base64.b64encode(salt + hashlib.sha256(b"pw" + salt).digest()).decode()
        self.assertFalse(mp.password_matches(mp.parse_password_entry(before), b"pw"))

    def test_malformed_data_is_refused(self):
        for value, message in [
                ("{SHA256}" + base64.b64encode(bytes(31)).decode(), "32-byte SHA256 digest, not 31"),
                ("{SSHA}" + base64.b64encode(bytes(20)).decode(), "and a salt after it, not 20"),
                ("{SSHA512}not base64!", "must be base64 (or hex, as {SSHA512.HEX})"),
                ("{SSHA.XYZ}abcd", 'unknown encoding ".XYZ"'),
                ("{MD5-CRYPT.HEX}$1$ab$bRZzLnQPD1ql12pSoshc71", "only the PLAIN, SHA and SSHA schemes"),
                ("{PLAIN.HEX}ff", "{PLAIN.HEX} data must be a UTF-8 password in hex"),
                ("{PLAIN.B64}!", "{PLAIN.B64} data must be a UTF-8 password in base64"),
                ("{MD5-CRYPT}$1$ab$short", "must be a $1$ crypt string"),
                ("{BLF-CRYPT}$2y$05$short", "must be a $2y$ (or $2a$, $2b$) bcrypt string"),
                ("{ARGON2I}" + DOVECOT_SECRET_LIBRARY["ARGON2ID"].split("}", 1)[1], "an $argon2i$ encoded"),
                ("{ARGON2ID}$argon2id$v=19$m=4,t=3,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8",
                 "an $argon2id$ encoded"),
                ("{MD5}$1$ab$bRZzLnQPD1ql12pSoshc71", 'unknown password scheme "{MD5}"')]:
            with self.subTest(value=value):
                with self.assertRaises(mp.ConfigValueError) as caught:
                    mp.parse_password_entry(value)
                self.assertIn(message, str(caught.exception))

    def test_every_comparison_uses_compare_digest(self):
        values = [DOVECOT_SECRET[name] for name in ("SSHA512", "SHA", "MD5-CRYPT")]
        values += [value for name, value in DOVECOT_SECRET_LIBRARY.items() if host_checks(name)]
        for value in values:
            with unittest.mock.patch.object(mp.hmac, "compare_digest",
                                            side_effect=hmac.compare_digest) as compare:
                self.assertTrue(mp.password_matches(mp.parse_password_entry(value), b"secret"))
            self.assertEqual(compare.call_count, 1, value)

    def test_md5_crypt_is_checked_in_the_helper_process(self):
        # Pure Python, like SHA-crypt: it would hold the GIL, so the loop.
        self.assertIn("MD5-CRYPT", mp.GIL_BOUND_SCHEMES)
        for name in ("BLF-CRYPT", "ARGON2ID", "SSHA512"):     # ctypes and hashlib let the GIL go
            self.assertNotIn(name, mp.GIL_BOUND_SCHEMES)
        helper = mp.PasswordHelper()
        self.addCleanup(helper.close)
        entry = mp.parse_password_entry(DOVECOT_SECRET["MD5-CRYPT"])
        self.assertTrue(helper.matches(entry, b"secret"))
        self.assertFalse(helper.matches(entry, b"wrong"))
        self.assertIsNotNone(helper.process)

    def test_unknown_logins_are_checked_against_a_dummy_of_the_same_cost(self):
        values = list(DOVECOT_SECRET.values())
        values += [value for name, value in DOVECOT_SECRET_LIBRARY.items() if host_checks(name)]
        for value in values:
            with self.subTest(value=value):
                entry = mp.parse_password_entry(value)
                dummy = mp.unknown_login_entry([entry])
                self.assertEqual(dummy.scheme, entry.scheme)
                self.assertEqual(mp.password_cost(dummy), mp.password_cost(entry))
                self.assertEqual(mp.parse_password_entry("{%s}%s" % dummy), dummy)     # well-formed
                self.assertFalse(mp.password_matches(dummy, b"secret"))
                users = {"user": entry}
                for login in (b"user", b"nobody"):     # both to the pool, as every hashed scheme
                    self.assertTrue(mp.check_hashes(users, mp.Credentials(login, b"wrong")))

    def test_an_unknown_login_costs_what_a_wrong_password_costs(self):
        names = ["MD5-CRYPT"] + [name for name in ("BLF-CRYPT",) if host_checks(name)]
        for name in names:
            value = DOVECOT_SECRET.get(name) or DOVECOT_SECRET_LIBRARY[name]
            with self.subTest(scheme=name):
                users = mp.UserTable({"user1": mp.parse_password_entry(value)})
                known = mp.Credentials(b"user1", b"wrong password")
                unknown = mp.Credentials(b"nobody", b"wrong password")
                ratio = timing_ratio(lambda: mp.authenticate(users, {}, upstream(), known),
                                     lambda: mp.authenticate(users, {}, upstream(), unknown))
                self.assertTrue(0.5 < ratio < 2.0, "unknown/known login: %.1f times" % ratio)


class UncheckableSchemeTests(unittest.TestCase):
    """An entry this host's libraries cannot check: refused at load, so
    -t tells the operator, and never a login."""

    def test_refused_with_what_is_missing(self):
        without_host_libraries(self)
        for name, missing in [("BLF-CRYPT", "no libcrypt (crypt_r) was found"),
                              ("ARGON2I", "no libargon2 was found"), ("ARGON2ID", "no libargon2 was found")]:
            with self.subTest(scheme=name):
                with self.assertRaises(mp.ConfigValueError) as caught:
                    mp.parse_password_entry(DOVECOT_SECRET_LIBRARY[name])
                self.assertIn("{%s} cannot be checked on this host: %s" % (name, missing),
                              str(caught.exception))
                self.assertIn("this user could never log in", str(caught.exception))

    def test_a_libcrypt_without_bcrypt(self):
        patch = unittest.mock.patch.object(mp, "crypt_function", lambda: lambda password, setting: None)
        patch.start()
        self.addCleanup(patch.stop)
        mp._missing_library.cache_clear()
        self.addCleanup(mp._missing_library.cache_clear)
        with self.assertRaisesRegex(mp.ConfigValueError, r'libcrypt has no bcrypt "\$2y\$"'):
            mp.parse_password_entry(DOVECOT_SECRET_LIBRARY["BLF-CRYPT"])

    def test_never_a_match_when_the_library_is_gone(self):
        entries = [mp.parse_password_entry(value) for name, value in DOVECOT_SECRET_LIBRARY.items()
                   if host_checks(name)]
        without_host_libraries(self)
        for entry in entries:
            self.assertFalse(mp.password_matches(entry, b"secret"), entry)

    def test_dash_t_names_the_file_the_line_and_what_is_missing(self):
        directory = TempDir(self)
        path = directory.write("mailproxy.conf", textwrap.dedent(BASE_CONFIG) + textwrap.dedent("""
            [users]
            alice = {PLAIN}secret
            bob = %s
            carol = %s
            """) % (DOVECOT_SECRET_LIBRARY["BLF-CRYPT"], DOVECOT_SECRET_LIBRARY["ARGON2ID"]))
        without_host_libraries(self)
        stderr = io.StringIO()
        with unittest.mock.patch.object(sys, "stderr", stderr):
            status = mp.command_test(path)
        self.assertEqual(status, 1)
        reported = stderr.getvalue()
        bob = read_text(path).splitlines().index("bob = " + DOVECOT_SECRET_LIBRARY["BLF-CRYPT"]) + 1
        self.assertIn("%s:%d: [users] bob: {BLF-CRYPT} cannot be checked on this host: no libcrypt "
                      "(crypt_r) was found; this user could never log in" % (path, bob), reported)
        self.assertIn("%s:%d: [users] carol: {ARGON2ID} cannot be checked on this host: no libargon2 "
                      "was found" % (path, bob + 1), reported)
        self.assertIn("test failed", reported)


class PasswdFileTests(unittest.TestCase):
    """[users] passwd_file = PATH: a Dovecot passwd-file, read with the
    configuration."""

    def load(self, passwd_text: str, users: str = "passwd_file = users.passwd\n"):
        directory = TempDir(self)
        directory.write("users.passwd", passwd_text)
        path = directory.write("mailproxy.conf", textwrap.dedent(BASE_CONFIG) + "\n[users]\n" + users)
        return directory, path

    def test_users_from_the_file_beside_the_table(self):
        _, path = self.load(
            "# Dovecot's passwd-file: user:password:uid:gid:gecos:home:shell:extra\n\n"
            "bob:%s:1000:1000::/home/bob::userdb_quota_rule=*:storage=1G\n"
            "carol@example.com:%s\n"
            "dave:$1$0DIYaMTC$/j.CbBN7PDkM5/YFhOY4//::\n"         # no {SCHEME}: Dovecot's CRYPT
            % (DOVECOT_SECRET["SSHA512"], DOVECOT_SECRET["SHA256-CRYPT"]),
            "alice = {PLAIN}secret\npasswd_file = users.passwd\n")
        users = mp.load_config(path).users
        self.assertEqual(sorted(users), ["alice", "bob", "carol@example.com", "dave"])
        self.assertEqual(users["dave"].scheme, "MD5-CRYPT")
        for login in ("alice", "bob", "carol@example.com", "dave"):
            self.assertTrue(mp.password_matches(users[login], b"secret"), login)
            self.assertFalse(mp.password_matches(users[login], b"wrong"), login)
        self.assertEqual(users.dummy.scheme, "PLAIN")          # one scheme each: the first

    def test_several_files_and_a_user_named_passwd_file(self):
        directory, path = self.load("bob:%s\n" % DOVECOT_SECRET["SHA"],
                                    "passwd_file = users.passwd\n    more.passwd\n")
        directory.write("more.passwd", "carol:%s\n" % DOVECOT_SECRET["SSHA"])
        self.assertEqual(sorted(mp.load_config(path).users), ["bob", "carol"])
        _, path = self.load("", "passwd_file = {PLAIN}secret\n")     # a {SCHEME}: a user's entry
        self.assertEqual(list(mp.load_config(path).users), ["passwd_file"])

    def test_an_unreadable_file_says_whom_to_let_read_it(self):
        """As for a key (issue 15: a passwd-file said only "Permission denied")."""
        directory, path = self.load("bob:{PLAIN}secret\n")
        passwd = os.path.join(directory.path, "users.passwd")
        denied = PermissionError(errno.EACCES, "Permission denied", passwd)
        with unittest.mock.patch.object(mp, "open", create=True, side_effect=denied):
            errors, users = [], {}
            mp.read_passwd_file(passwd, mp.ConfigError(path, "users", "passwd_file", "", 9),
                                users, {}, errors)
        self.assertEqual(len(errors), 1)
        self.assertRegex(errors[0].message, r'cannot read "%s": Permission denied \(read as user '
                                            r'"[^"]+"' % re.escape(passwd))

    def test_scheme_names_the_files_default_as_dovecots_passdb_args(self):
        """Dovecot's ``args = scheme=PLAIN /etc/dovecot/users``: its
        passwords are written without a {SCHEME}."""
        _, path = self.load("erin:secret\nfrank:{SHA512-CRYPT}%s\n"
                            % DOVECOT_SECRET["SHA512-CRYPT"].split("}", 1)[1],
                            "passwd_file = scheme=PLAIN users.passwd\n")
        users = mp.load_config(path).users
        self.assertEqual((users["erin"].scheme, users["frank"].scheme), ("PLAIN", "SHA512-CRYPT"))
        for login in ("erin", "frank"):
            self.assertTrue(mp.password_matches(users[login], b"secret"), login)
        _, path = self.load("erin:secret\n")                  # without scheme=: an error
        with self.assertRaises(mp.ConfigErrors) as caught:
            mp.load_config(path)
        self.assertIn("passwd_file = scheme=PLAIN PATH", str(caught.exception))

    def test_errors_name_the_file_and_the_line(self):
        directory, path = self.load("bob:%s\n"
                                    "carol\n"
                                    "dave:{MD5}0123\n"
                                    "erin:secret\n"
                                    "bob:{PLAIN}again\n"
                                    "alice:{PLAIN}twice\n"
                                    ":{PLAIN}x\n" % DOVECOT_SECRET["SHA"],
                                    "alice = {PLAIN}secret\npasswd_file = users.passwd\n    missing.passwd\n")
        with self.assertRaises(mp.ConfigErrors) as caught:
            mp.load_config(path)
        passwd = os.path.join(directory.path, "users.passwd")
        reported = [str(error) for error in caught.exception.errors]
        users_line = read_text(path).splitlines().index("passwd_file = users.passwd") + 1
        self.assertEqual(reported, [
            "%s:2: carol: no password: mailproxy cannot log this user in" % passwd,
            '%s:3: dave: unknown password scheme "{MD5}"; known: %s' % (
                passwd, ", ".join("{%s}" % s for s in mp.TABLE_SCHEMES)),
            "%s:4: erin: the password has no {SCHEME}: write the scheme in front of it, "
            "e.g. {SHA512-CRYPT}$6$..., or give the file's as Dovecot does: "
            "passwd_file = scheme=PLAIN PATH" % passwd,
            '%s:5: bob: user "bob" is already in the table, at %s:1' % (passwd, passwd),
            '%s:6: alice: user "alice" is already in the table, at %s:%d' % (passwd, path, users_line - 1),
            "%s:7: a line without a user name" % passwd,
            '%s:%d: [users] passwd_file: cannot read "%s": No such file or directory'
            % (path, users_line, os.path.join(directory.path, "missing.passwd"))])

    def test_dash_t_reports_an_uncheckable_scheme_in_the_file(self):
        directory, path = self.load("# Dovecot's\ncarol:%s:1000:1000::/home/carol::\n"
                                    % DOVECOT_SECRET_LIBRARY["ARGON2ID"])
        without_host_libraries(self)
        stderr = io.StringIO()
        with unittest.mock.patch.object(sys, "stderr", stderr):
            self.assertEqual(mp.command_test(path), 1)
        self.assertIn("mailproxy: [emerg] %s:2: carol: {ARGON2ID} cannot be checked on this host: "
                      "no libargon2 was found" % os.path.join(directory.path, "users.passwd"),
                      stderr.getvalue())


class PasswdFileEndToEndTests(EndToEndTestCase):

    def test_a_login_checked_against_a_passwd_file(self):
        backend = self.use(FakeImapBackend())
        directory = TempDir(self)
        passwd = directory.write("users.passwd", "alice:%s:1000:1000::/home/alice::\n"
                                 % DOVECOT_SECRET["SSHA512"])
        proxy = self.start_proxy("imap", backend.port, users={"passwd_file": passwd})
        self.assertEqual(imap_login_reply(self, proxy.port, "wrong"),
                         b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        self.assertEqual(imap_login_reply(self, proxy.port, "secret"), b"a1 OK LOGIN completed\r\n")
        self.assertEqual(backend.logins, [(b"alice", b"secret")])

    def test_a_user_of_each_scheme_logs_in_through_the_proxy(self):
        # Through the worker's password check pool: its threads (hashlib,
        # ctypes), or the helper process for MD5-CRYPT and SHA-crypt.
        backend = self.use(FakeImapBackend(accept=None))
        values = dict(DOVECOT_SECRET)
        values.update((name, value) for name, value in DOVECOT_SECRET_LIBRARY.items() if host_checks(name))
        logins = {"user%d" % number: value for number, value in enumerate(values.values())}
        passwd = TempDir(self).write("users.passwd", "".join("%s:%s\n" % item for item in logins.items()))
        proxy = self.start_proxy("imap", backend.port, users={"passwd_file": passwd},
                                 trusted_networks="127.0.0.1")      # wrong passwords, not slowed
        for login, value in logins.items():
            with self.subTest(login=login, value=value):
                for password, reply in (("wrong", rb"^a1 NO "), ("secret", rb"^a1 OK ")):
                    client = connect_client(self, proxy.port)
                    client.expect_line(mp.IMAP_GREETING)
                    client.send("a1 LOGIN %s %s" % (login, password))
                    client.expect(reply)
                    client.close()
        self.assertEqual(backend.logins, [(login.encode(), b"secret") for login in logins])

    def test_sighup_reads_the_passwd_file_again(self):
        backend = self.use(FakeImapBackend(accept=None))
        directory = TempDir(self)
        port = free_port()
        directory.write("users.passwd", "alice:%s\n" % DOVECOT_SECRET["SSHA512"])
        path = directory.write("mailproxy.conf", (
            "[main]\nerror_log = stderr info\n\n"
            "[mail]\nproxy_pass = 127.0.0.1:%d\nauth_delay = 50ms\nserver_name = mail.test\n\n"
            "[users]\npasswd_file = users.passwd\n\n"
            "[server imap]\nlisten = 127.0.0.1:%d\nprotocol = imap\n") % (backend.port, port))
        proxy = ProgramUnderTest(self, path)
        self.assertEqual(imap_login_reply(self, port, "secret"), b"a1 OK LOGIN completed\r\n")
        directory.write("users.passwd", "alice:%s\n" % DOVECOT_NEW_SSHA512)
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark), proxy.stderr)
        self.assertEqual(imap_login_reply(self, port, "secret"), b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        self.assertEqual(imap_login_reply(self, port, "new"), b"a1 OK LOGIN completed\r\n")
        directory.write("users.passwd", "alice:{NOSUCH}x\n")           # broken: the old table stays
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        self.assertIsNotNone(proxy.wait_for("users.passwd:1: alice: unknown password scheme", mark),
                             proxy.stderr)
        self.assertEqual(imap_login_reply(self, port, "new"), b"a1 OK LOGIN completed\r\n")
        proxy.send_signal("SIGTERM")
        self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)


class ExternalIdentityTests(unittest.TestCase):
    USERS = {"karl": mp.PasswordEntry("PLAIN", "secret"),
             "alice@example.com": mp.PasswordEntry("PLAIN", "secret")}

    def external(self, login: bytes, *identities: str) -> mp.AuthOutcome:
        facts = mp.CertificateFacts("SUCCESS", identities=identities)
        return mp.authenticate_external(self.USERS, {}, upstream(), login, facts)

    def test_unicode_case_mapping_does_not_make_a_login(self):
        # str.lower() made U+212A KELVIN SIGN a "k": a certificate for
        # "\u212aarl" logged in as karl.
        result = self.external(b"karl", "\u212aarl")
        self.assertEqual((result.ok, result.reason),
                         (False, "EXTERNAL login does not match the client certificate"))
        self.assertFalse(self.external(b"\xc3\xa5sa", "\u212bsa").ok)     # ANGSTROM SIGN, too
        self.assertFalse(self.external(b"", "\u212aarl").ok)              # not in [users]

    def test_ascii_case_is_forgiven(self):
        result = self.external(b"alice@example.com", "Alice@Example.COM")
        self.assertEqual((result.ok, result.login, result.password),
                         (True, b"alice@example.com", b"secret"))
        self.assertFalse(self.external(b"KARL", "karl").ok)              # [users] is exact
        self.assertTrue(self.external(b"karl", "KARL").ok)


class LoginDefenceTests(unittest.TestCase):
    """The failed-login defence's policy, events in, answers out."""

    def setUp(self):
        self.defence = mp.LoginDefence(b"k" * 32)

    def fail(self, address, login, password, now, defence=None, base=1.0):
        """A failure, published to ``defence`` (and applied): its delay."""
        defence = defence or self.defence
        event, delay, count = defence.failure(address, login, password, now, base)
        defence.apply(event)
        return delay

    def test_delays_double_up_to_the_limit_and_the_same_password_counts_once(self):
        delays = [self.fail("192.0.2.7", "alice", b"guess%d" % n, 100.0 + 20 * n) for n in range(6)]
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, mp.AUTH_PENALTY_MAX, mp.AUTH_PENALTY_MAX])
        defence = mp.LoginDefence(b"k" * 32)
        stale = [self.fail("192.0.2.8", "bob", b"old", 100.0 + 20 * n, defence) for n in range(5)]
        self.assertEqual(stale, [1.0] * 5)                     # a phone with a stale password
        self.assertEqual(defence.recent_failures("192.0.2.8", "bob", 200.0), 1)
        self.assertEqual(self.fail("192.0.2.8", "bob", b"new", 200.0, defence), 2.0)
        self.assertEqual(self.fail("192.0.2.9", "carol", b"x", 0.0, base=0.5), 0.5)   # auth_delay

    def test_running_delays_take_the_slots_then_the_next_attempt_waits(self):
        now = 1000.0
        for n in range(mp.AUTH_PENALTY_SLOTS):
            self.fail("192.0.2.7", "user%d" % n, b"guess", now)      # 1 s, 2 s, 4 s, 8 s
        admission = self.defence.admit("192.0.2.7", "dave", now)   # any account, same address
        self.assertFalse(admission.refuse)
        self.assertEqual(admission.wait, 1.0)                      # the first delay ends
        self.assertEqual(self.defence.admit("192.0.2.7", "dave", now + 1.0).wait, 0.0)
        self.assertEqual(self.defence.admit("198.51.100.1", "dave", now).wait, 0.0)   # elsewhere

    def test_an_account_attacked_from_many_addresses_makes_its_owner_wait_not_fail(self):
        now = 1000.0
        for n in range(mp.AUTH_PENALTY_SLOTS):
            self.fail("203.0.113.%d" % n, "alice", b"guess%d" % n, now)
        owner = self.defence.admit("198.51.100.1", "alice", now)
        self.assertEqual((owner.refuse, owner.wait), (False, 1.0))
        self.assertEqual(self.defence.admit("198.51.100.1", "bob", now).wait, 0.0)

    def test_each_worker_takes_at_most_its_share_of_the_slots(self):
        """Two workers (share 2) that see every slot free at the same
        instant let 4 through together, not 8."""
        self.defence.share = mp.AUTH_PENALTY_SLOTS // 2
        now = 1000.0
        for n in range(self.defence.share):                    # worker 101's delays
            event, _, _ = self.defence.failure("192.0.2.7", "u%d" % n, b"x", now, 1.0, pid=101)
            self.defence.apply(event)
        self.assertEqual(self.defence.admit("192.0.2.7", "v", now, pid=101).wait, 1.0)
        self.assertEqual(self.defence.admit("192.0.2.7", "v", now, pid=102).wait, 0.0)
        self.defence.apply(self.defence.begin("192.0.2.7", "v", 102))
        self.assertEqual(self.defence.admit("192.0.2.7", "w", now, pid=102).wait, 0.0)
        self.defence.apply(self.defence.begin("192.0.2.7", "w", 102))
        self.assertEqual(self.defence.admit("192.0.2.7", "x", now, pid=102).wait,
                         mp.AUTH_SLOT_RECHECK)                   # its share, under way
        self.assertEqual(self.defence.admit("192.0.2.7", "x", now, pid=103).wait, 1.0)  # all 4

    def test_logins_under_way_take_slots_too_in_any_worker_until_it_is_gone(self):
        for pid in (101, 101, 102, 102):                     # two workers' checks
            self.defence.apply(self.defence.begin("192.0.2.7", "alice", pid))
        self.assertEqual(self.defence.admit("192.0.2.7", "bob", 0.0).wait, mp.AUTH_SLOT_RECHECK)
        self.defence.apply(self.defence.end("192.0.2.7", "alice", 101))
        self.assertEqual(self.defence.admit("192.0.2.7", "bob", 0.0).wait, 0.0)
        self.defence.apply(self.defence.begin("192.0.2.7", "carol", 101))
        self.assertEqual(self.defence.admit("192.0.2.7", "bob", 0.0).wait, mp.AUTH_SLOT_RECHECK)
        self.defence.apply(("worker gone", 102))              # its two checks end with it
        self.assertEqual(self.defence.admit("192.0.2.7", "bob", 0.0).wait, 0.0)
        self.defence.apply(("worker gone", 101))
        self.assertEqual((self.defence.checking, self.defence.checking_in), ({}, {}))

    def test_only_the_account_from_the_address_is_refused_and_success_lifts_it(self):
        now = 0.0
        for n in range(mp.AUTH_PAIR_LIMIT):
            now += 30.0
            self.fail("192.0.2.7", "alice", b"guess%d" % n, now)
        refused = self.defence.admit("192.0.2.7", "alice", now + 30.0)
        self.assertEqual((refused.refuse, refused.failures), (True, mp.AUTH_PAIR_LIMIT))
        self.assertFalse(self.defence.admit("192.0.2.7", "bob", now + 30.0).refuse)
        self.assertFalse(self.defence.admit("198.51.100.1", "alice", now + 30.0).refuse)
        self.defence.apply(self.defence.success("192.0.2.7", "alice", now + 40.0))
        self.assertFalse(self.defence.admit("192.0.2.7", "alice", now + 41.0).refuse)
        # The address's own count stays: a success does not pardon the guesser.
        self.assertEqual(self.defence.recent_failures("192.0.2.7", "nobody", now + 41.0),
                         mp.AUTH_PAIR_LIMIT)

    def test_failures_are_forgotten_after_a_quiet_window(self):
        for n in range(mp.AUTH_PAIR_LIMIT):
            self.fail("192.0.2.7", "alice", b"guess%d" % n, 10.0 * n)
        later = 10.0 * mp.AUTH_PAIR_LIMIT + mp.AUTH_PENALTY_WINDOW + 1
        self.assertEqual(self.defence.admit("192.0.2.7", "alice", later), mp.Admission())
        self.assertEqual(self.fail("192.0.2.7", "alice", b"again", later), 1.0)

    def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4(self):
        self.assertEqual(mp.penalty_address("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(mp.penalty_address("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::/64")
        self.assertEqual(mp.penalty_address("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(mp.penalty_address("192.0.2.7"), "192.0.2.7")
        self.assertEqual(mp.penalty_address("unix:"), "unix:")

    def test_tables_are_bounded(self):
        with unittest.mock.patch.object(mp, "AUTH_PENALTY_TABLE", 3):
            for n in range(10):
                self.fail("192.0.2.%d" % n, "user%d" % n, b"x", float(n))
        self.assertEqual([len(self.defence.addresses), len(self.defence.accounts),
                          len(self.defence.pairs)], [3, 3, 3])
        self.assertIn("192.0.2.9", self.defence.addresses)       # the newest stay

    def test_replicas_told_the_same_events_agree_and_keep_no_password(self):
        worker_1, worker_2 = mp.LoginDefence(b"s" * 32), mp.LoginDefence(b"s" * 32)
        for n in range(3):
            event, _, _ = worker_1.failure("192.0.2.7", "alice", b"secret-guess-%d" % n, 5.0 * n, 1.0)
            worker_1.apply(event)
            worker_2.apply(event)
        # The other worker sees the same count, and the repeat as a repeat.
        self.assertEqual(worker_2.failure("192.0.2.7", "alice", b"secret-guess-1", 20.0, 1.0)[1:],
                         (4.0, 3))
        record = worker_1.pairs[("192.0.2.7", "alice")]
        self.assertNotIn("secret-guess", repr([getattr(record, name) for name in record.__slots__]))
        other_key = mp.LoginDefence(b"t" * 32).failure("192.0.2.7", "alice", b"secret-guess-0", 0.0, 1.0)
        self.assertNotIn(other_key[0][3], record.digests)          # digests are keyed

    def test_an_operator_clears_an_address_or_an_account(self):
        for n in range(mp.AUTH_PAIR_LIMIT):
            self.fail("192.0.2.7", "alice", b"guess%d" % n, float(n))
        self.defence.apply(self.defence.clear(address="192.0.2.7"))
        self.assertEqual(self.defence.admit("192.0.2.7", "alice", 20.0).refuse, False)
        self.assertEqual(self.defence.recent_failures("192.0.2.7", "bob", 20.0), 0)
        self.assertEqual(self.defence.recent_failures("198.51.100.1", "alice", 20.0),
                         mp.AUTH_PAIR_LIMIT)                    # the account's own count stays
        self.defence.apply(self.defence.clear(login="alice"))
        self.assertEqual(self.defence.recent_failures("198.51.100.1", "alice", 20.0), 0)


class SmtpRecipientRuleTests(unittest.TestCase):
    def test_relay_domains(self):
        result = mp.authorize_recipient(["Example.com"], {}, upstream(),
                                        b"RCPT TO:<Bob@EXAMPLE.COM> NOTIFY=NEVER")
        self.assertTrue(result.ok)
        self.assertEqual(result.login, b"")
        self.assertFalse(mp.authorize_recipient(["example.com"], {}, upstream(), b"RCPT TO:<x@evil.test>").ok)
        self.assertFalse(mp.authorize_recipient([], {}, upstream(), b"RCPT TO:<x@example.com>").ok)
        self.assertTrue(mp.authorize_recipient(["*"], {}, upstream(), b"RCPT TO:<x@any.test>").ok)

    def test_route_by_recipient_domain(self):
        routes = {"@example.org": mp.Route(2525, upstream("127.0.0.9", 1))}
        result = mp.authorize_recipient(["*"], routes, upstream(), b"RCPT TO:<x@example.org>")
        self.assertEqual(result.upstream.addresses, ((socket.AF_INET, ("127.0.0.9", 2525)),))


# -- the auth_http request and response ---------------------------------------------

AUTH_URL = mp.AuthHttpUrl("auth.example", "/mail/auth", (socket.AF_INET, ("127.0.0.1", 80)),
                        "127.0.0.1:80")


def auth_request(**overrides):
    values = dict(method="plain", login=b"alice", password=b"secret", protocol="imap",
                  attempt=1, client_ip="192.0.2.7")
    values.update(overrides)
    return mp.AuthRequest(**values)


class AuthHttpRequestTests(unittest.TestCase):
    HEAD = b"GET /mail/auth HTTP/1.0\r\nHost: auth.example\r\n"

    def test_plain_imap_with_escaping(self):
        request = auth_request(login="al ice%\r\n\x00é".encode(), password=b"p\tw+\x7f")
        self.assertEqual(mp.build_auth_http_request(AUTH_URL, [("X-Auth-Key", "k")], request),
                         self.HEAD + b"Auth-Method: plain\r\n"
                         b"Auth-User: al%20ice%25%0D%0A%00\xc3\xa9\r\nAuth-Pass: p%09w+\x7f\r\n"
                         b"Auth-Protocol: imap\r\nAuth-Login-Attempt: 1\r\nClient-IP: 192.0.2.7\r\n"
                         b"X-Auth-Key: k\r\n\r\n")

    def test_each_method(self):
        salt = b"<123.456@mail.test>"
        cases = {
            "cram-md5": (dict(method="cram-md5", password=b"0" * 32, salt=salt),
                         b"Auth-Method: cram-md5\r\nAuth-User: alice\r\nAuth-Pass: " + b"0" * 32 +
                         b"\r\nAuth-Salt: " + salt + b"\r\n"),
            "apop": (dict(method="apop", protocol="pop3", password=b"f" * 32, salt=salt),
                     b"Auth-Method: apop\r\nAuth-User: alice\r\nAuth-Pass: " + b"f" * 32 +
                     b"\r\nAuth-Salt: " + salt + b"\r\n"),
            "external": (dict(method="external", password=b""),
                         b"Auth-Method: external\r\nAuth-User: alice\r\nAuth-Pass: \r\n"),
            "xoauth2": (dict(method="xoauth2", password=b"ya29.tok en"),
                        b"Auth-Method: xoauth2\r\nAuth-User: alice\r\nAuth-Pass: ya29.tok%20en\r\n"),
            "oauthbearer": (dict(method="oauthbearer", password=b"T"),
                            b"Auth-Method: oauthbearer\r\nAuth-User: alice\r\nAuth-Pass: T\r\n"),
        }
        for name, (overrides, middle) in cases.items():
            request = auth_request(**overrides)
            built = mp.build_auth_http_request(AUTH_URL, [], request)
            protocol = overrides.get("protocol", "imap").encode()
            self.assertEqual(built, self.HEAD + middle + b"Auth-Protocol: " + protocol +
                             b"\r\nAuth-Login-Attempt: 1\r\nClient-IP: 192.0.2.7\r\n\r\n", name)

    def test_smtp_none_with_client_host_and_proxy_protocol(self):
        request = auth_request(method="none", login=b"", password=b"", protocol="smtp", attempt=2,
                               client_host="client.example",
                               proxy_protocol=("198.51.100.1", 4000, "203.0.113.5", 25),
                               smtp=(b"helo.example", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>"))
        self.assertEqual(mp.build_auth_http_request(AUTH_URL, [], request), self.HEAD +
                         b"Auth-Method: none\r\nAuth-User: \r\nAuth-Pass: \r\nAuth-Protocol: smtp\r\n"
                         b"Auth-Login-Attempt: 2\r\nClient-IP: 192.0.2.7\r\nClient-Host: client.example\r\n"
                         b"Proxy-Protocol-Addr: 198.51.100.1\r\nProxy-Protocol-Port: 4000\r\n"
                         b"Proxy-Protocol-Server-Addr: 203.0.113.5\r\nProxy-Protocol-Server-Port: 25\r\n"
                         b"Auth-SMTP-Helo: helo.example\r\nAuth-SMTP-From: MAIL FROM:<a@b>\r\n"
                         b"Auth-SMTP-To: RCPT TO:<c@d>\r\n\r\n")

    def test_ssl_headers(self):
        facts = mp.CertificateFacts("SUCCESS", "CN=alice", "CN=CA", "01AB", "ff" * 20)
        request = auth_request(tls=("TLSv1.3", "TLS_AES_128_GCM_SHA256"), certificate=facts,
                               certificate_pem=b"-----BEGIN CERTIFICATE-----\nAB C\n")
        self.assertIn(b"Client-IP: 192.0.2.7\r\nAuth-SSL: on\r\nAuth-SSL-Protocol: TLSv1.3\r\n"
                      b"Auth-SSL-Cipher: TLS_AES_128_GCM_SHA256\r\nAuth-SSL-Verify: SUCCESS\r\n"
                      b"Auth-SSL-Subject: CN=alice\r\nAuth-SSL-Issuer: CN=CA\r\nAuth-SSL-Serial: 01AB\r\n"
                      b"Auth-SSL-Fingerprint: " + b"ff" * 20 + b"\r\n"
                      b"Auth-SSL-Cert: -----BEGIN%20CERTIFICATE-----%0AAB%20C%0A\r\n\r\n",
                      mp.build_auth_http_request(AUTH_URL, [], request))

    def test_url_forms(self):
        self.assertEqual(mp.parse_auth_http(["http://127.0.0.1:9000/auth"])[:2], ("127.0.0.1", "/auth"))
        self.assertEqual(mp.parse_auth_http(["127.0.0.1"])[:2], ("127.0.0.1", "/"))
        self.assertEqual(mp.parse_auth_http(["127.0.0.1"]).address[1], ("127.0.0.1", 80))
        url = mp.parse_auth_http(["unix:/run/auth.sock:/check"])
        self.assertEqual((url.host_header, url.uri, url.address[1]), ("localhost", "/check", "/run/auth.sock"))
        with self.assertRaises(mp.ConfigValueError):
            mp.parse_auth_http(["https://127.0.0.1/auth"])


# Every byte that could break a header line or that nginx's escaping treats
# specially: CR, LF, NUL, TAB, space, "%", quotes, backslash, 8-bit.
HOSTILE_TEXT = "x\r\nForged: 1\0\t %\"'\\\u00e9"
HOSTILE = HOSTILE_TEXT.encode("utf-8") + b"\xff"
# As nginx sends it in Auth-User, Auth-Pass and Auth-SSL-Cert (NGX_ESCAPE_MAIL_AUTH).
HOSTILE_ESCAPED = b"x%0D%0AForged:%201%00%09%20%25\"'\\\xc3\xa9\xff"
# As nginx sends the other headers (unescaped), but CR, LF and NUL, which no
# value nginx puts there holds, and which would end the line.
HOSTILE_UNBROKEN = b"x%0D%0AForged: 1%00\t %\"'\\\xc3\xa9\xff"
HOSTILE_TEXT_UNBROKEN = HOSTILE_UNBROKEN[:-1]


REQUEST_SMTP = (b"helo.example", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>")
REQUEST_TLS = ("TLSv1.3", "TLS_AES_128_GCM_SHA256")
REQUEST_FACTS = mp.CertificateFacts("SUCCESS", "CN=alice", "CN=CA", "01AB", "ff" * 20)


class AuthHttpRequestHeaderTests(unittest.TestCase):
    # header: (the request's fields given a text and a bytes value to carry,
    # what nginx would send for the hostile value)
    ROWS = {
        "Host": (lambda text, data: {"url": AUTH_URL._replace(host_header=text)}, HOSTILE_TEXT_UNBROKEN),
        "Auth-Method": (lambda text, data: {"method": text}, HOSTILE_TEXT_UNBROKEN),
        "Auth-User": (lambda text, data: {"login": data}, HOSTILE_ESCAPED),
        "Auth-Pass": (lambda text, data: {"password": data}, HOSTILE_ESCAPED),
        "Auth-Salt": (lambda text, data: {"method": "cram-md5", "salt": data}, HOSTILE_UNBROKEN),
        "Auth-Protocol": (lambda text, data: {"protocol": text}, HOSTILE_TEXT_UNBROKEN),
        "Client-IP": (lambda text, data: {"client_ip": text}, HOSTILE_TEXT_UNBROKEN),
        "Client-Host": (lambda text, data: {"client_host": text}, HOSTILE_TEXT_UNBROKEN),
        "Proxy-Protocol-Addr": (lambda text, data: {"proxy_protocol": (text, 1, "192.0.2.9", 25)},
                                HOSTILE_TEXT_UNBROKEN),
        "Proxy-Protocol-Server-Addr": (lambda text, data: {"proxy_protocol": ("192.0.2.7", 1, text, 25)},
                                       HOSTILE_TEXT_UNBROKEN),
        "Auth-SMTP-Helo": (lambda text, data: {"method": "none", "smtp": (data,) + REQUEST_SMTP[1:]},
                           HOSTILE_UNBROKEN),
        "Auth-SMTP-From": (lambda text, data: {"method": "none", "smtp": (REQUEST_SMTP[0], data, REQUEST_SMTP[2])},
                           HOSTILE_UNBROKEN),
        "Auth-SMTP-To": (lambda text, data: {"method": "none", "smtp": REQUEST_SMTP[:2] + (data,)},
                         HOSTILE_UNBROKEN),
        "Auth-SSL-Protocol": (lambda text, data: {"tls": (text, REQUEST_TLS[1])}, HOSTILE_TEXT_UNBROKEN),
        "Auth-SSL-Cipher": (lambda text, data: {"tls": (REQUEST_TLS[0], text)}, HOSTILE_TEXT_UNBROKEN),
        "Auth-SSL-Verify": (lambda text, data: {"tls": REQUEST_TLS, "certificate": REQUEST_FACTS._replace(verify=text)},
                            HOSTILE_TEXT_UNBROKEN),
        "Auth-SSL-Subject": (lambda text, data: {"tls": REQUEST_TLS, "certificate": REQUEST_FACTS._replace(subject=text)},
                             HOSTILE_TEXT_UNBROKEN),
        "Auth-SSL-Issuer": (lambda text, data: {"tls": REQUEST_TLS, "certificate": REQUEST_FACTS._replace(issuer=text)},
                            HOSTILE_TEXT_UNBROKEN),
        "Auth-SSL-Serial": (lambda text, data: {"tls": REQUEST_TLS, "certificate": REQUEST_FACTS._replace(serial=text)},
                            HOSTILE_TEXT_UNBROKEN),
        "Auth-SSL-Fingerprint": (lambda text, data: {"tls": REQUEST_TLS,
                                                     "certificate": REQUEST_FACTS._replace(fingerprint=text)},
                                 HOSTILE_TEXT_UNBROKEN),
        "Auth-SSL-Cert": (lambda text, data: {"tls": REQUEST_TLS, "certificate": REQUEST_FACTS, "certificate_pem": data},
                          HOSTILE_ESCAPED),
        "X-Custom": (lambda text, data: {"headers": [("X-Custom", text)]}, HOSTILE_TEXT_UNBROKEN),
    }

    def build(self, fields: dict) -> bytes:
        fields = dict(fields)
        url = fields.pop("url", AUTH_URL)
        headers = fields.pop("headers", [("X-Custom", "v")])
        return mp.build_auth_http_request(url, headers, auth_request(**fields))

    def names(self, request: bytes) -> list:
        """The request's header names, after checking that it ends with its
        blank line and that no line holds a CR, LF or NUL."""
        self.assertTrue(request.endswith(b"\r\n\r\n"), request)
        lines = request[:-4].split(b"\r\n")
        for line in lines:
            self.assertNotRegex(line, rb"[\r\n\0]", "a line with CR, LF or NUL: %r" % line)
        return [line.partition(b":")[0] for line in lines[1:]]

    def test_every_header_keeps_its_line_whatever_it_carries(self):
        # Before: Client-IP, Client-Host, Proxy-Protocol-*, Auth-SSL-*, Host
        # and the rest went in as they came, so a CR LF in any of them wrote
        # a header of its own.  Now each has exactly its line, with the bytes
        # nginx sends (%XX where nginx escapes, the value as it is elsewhere)
        # but for CR, LF and NUL.
        for header, (fields, expected) in self.ROWS.items():
            with self.subTest(header=header):
                request = self.build(fields(HOSTILE_TEXT, HOSTILE))
                self.assertEqual(self.names(request), self.names(self.build(fields("v", b"v"))))
                self.assertIn(b"\r\n" + header.encode() + b": " + expected + b"\r\n", request)

    def test_no_header_is_added_by_a_value(self):
        everything = dict(login=HOSTILE, password=HOSTILE, method="none", protocol="smtp",
                          client_ip=HOSTILE_TEXT, client_host=HOSTILE_TEXT,
                          proxy_protocol=(HOSTILE_TEXT, 1, HOSTILE_TEXT, 2),
                          smtp=(HOSTILE, HOSTILE, HOSTILE), tls=(HOSTILE_TEXT, HOSTILE_TEXT),
                          certificate=mp.CertificateFacts(*[HOSTILE_TEXT] * 5),
                          certificate_pem=HOSTILE, headers=[("X-Custom", HOSTILE_TEXT)])
        request = self.build(everything)
        self.assertEqual(self.names(request), [
            b"Host", b"Auth-Method", b"Auth-User", b"Auth-Pass", b"Auth-Protocol",
            b"Auth-Login-Attempt", b"Client-IP", b"Client-Host", b"Proxy-Protocol-Addr",
            b"Proxy-Protocol-Port", b"Proxy-Protocol-Server-Addr", b"Proxy-Protocol-Server-Port",
            b"Auth-SMTP-Helo", b"Auth-SMTP-From", b"Auth-SMTP-To", b"Auth-SSL", b"Auth-SSL-Protocol",
            b"Auth-SSL-Cipher", b"Auth-SSL-Verify", b"Auth-SSL-Subject", b"Auth-SSL-Issuer",
            b"Auth-SSL-Serial", b"Auth-SSL-Fingerprint", b"Auth-SSL-Cert", b"X-Custom"])
        self.assertTrue(request.startswith(b"GET /mail/auth HTTP/1.0\r\n"))
        with self.assertRaises(ValueError):
            mp.auth_http_header("X-Bad\r\nForged", "v")

    def test_an_ipv6_auth_server_keeps_its_brackets_in_host(self):
        # nginx's ngx_parse_url keeps the brackets in u.host (RFC 7230 §5.4).
        for url, port in (("http://[::1]:9000/auth", 9000), ("[::1]/auth", 80)):
            parsed = mp.parse_auth_http([url])
            self.assertEqual((parsed.host_header, parsed.address[1][1], parsed.text),
                             ("[::1]", port, "[::1]:%d" % port))
            self.assertTrue(mp.build_auth_http_request(parsed, [], auth_request()).startswith(
                b"GET /auth HTTP/1.0\r\nHost: [::1]\r\nAuth-Method: plain\r\n"))


class AuthHttpResponseTests(unittest.TestCase):
    def parse(self, response, protocol="imap", have_password=True, proxy_smtp_auth=False):
        """Parse ``response`` whole and split at every byte: same result."""
        results = []
        for split in range(1, len(response) + 1):
            parser = mp.AuthHttpParser()
            first = parser.receive_data(response[:split])
            result = first if first is not None else parser.receive_data(response[split:] or b"")
            results.append(result)
        self.assertTrue(all(result == results[-1] for result in results))
        return mp.interpret_auth_response(results[-1], protocol, have_password, proxy_smtp_auth)

    def test_smtp_backend_auth_without_a_password_is_an_error(self):
        # nginx-tests mail_proxy_smtp_auth.t "auth external no password".
        ok = b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 25\r\n"
        for extra, proxy_smtp_auth in ((b"", True), (b"Auth-SMTP-Auth: plain\r\n", False),
                                       (b"Auth-SMTP-Auth: LOGIN\r\n", True)):
            with self.assertRaises(mp.AuthHttpError) as caught:
                self.parse(ok + extra + b"\r\n", "smtp", False, proxy_smtp_auth)
            self.assertIn("no password available", str(caught.exception))
        for extra, proxy_smtp_auth, have_password in (
                (b"", False, False), (b"Auth-SMTP-Auth: none\r\n", True, False),
                (b"Auth-Pass: s\r\n", True, False), (b"", True, True)):
            verdict = self.parse(ok + extra + b"\r\n", "smtp", have_password, proxy_smtp_auth)
            self.assertEqual(verdict.kind, "ok")

    def test_ok_with_overrides(self):
        verdict = self.parse(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.2\r\n"
                             b"Auth-Port: 1143\r\nAuth-User: bob%20x\r\nAuth-Pass: p w\r\n\r\nbody")
        self.assertEqual((verdict.kind, verdict.login, verdict.password), ("ok", b"bob%20x", b"p w"))
        self.assertEqual(verdict.upstream.addresses, ((socket.AF_INET, ("127.0.0.2", 1143)),))

    def test_status_code_ignored_bare_lf_no_status_line_case_insensitive(self):
        verdict = self.parse(b"auth-status:   OK  \nAUTH-SERVER: ::1\nauth-port: 143\n\n")
        self.assertEqual(verdict.upstream.addresses[0], (socket.AF_INET6, ("::1", 143)))
        verdict = self.parse(b"HTTP/1.0 500 Nope\r\nAuth-Status: OK\r\nAuth-Server: 10.0.0.1\r\n"
                             b"Auth-Port: 25\r\n\r\n", "smtp", False)
        self.assertEqual(verdict.kind, "ok")

    def test_wait_and_failures(self):
        verdict = self.parse(b"HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 3\r\n\r\n")
        self.assertEqual((verdict.kind, verdict.wait), ("wait", 3))
        verdict = self.parse(b"HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\n"
                             b"Auth-Wait: 2\r\nAuth-Error-Code: 550 5.7.1\r\n\r\n", "smtp")
        self.assertEqual((verdict.kind, verdict.text, verdict.wait, verdict.error_code),
                         ("fail", b"Invalid login or password", 2, b"550 5.7.1"))
        verdict = self.parse(b"HTTP/1.0 200 OK\r\nAuth-Status: No\r\nAuth-Wait: x\r\n"
                             b'Auth-Error-SASL: {"status":"invalid_token"}\r\n\r\n')
        self.assertEqual((verdict.wait, verdict.sasl_error), (0, b'{"status":"invalid_token"}'))

    def test_bad_answers_have_nginx_messages(self):
        cases = [(b"Auth-Status: OK\r\nAuth-Port: 143\r\n\r\n", "did not send server or port"),
                 (b"Auth-Status: OK\r\nAuth-Server: mail.example\r\nAuth-Port: 143\r\n\r\n",
                  'sent invalid server address:"mail.example"'),
                 (b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 0\r\n\r\n",
                  'sent invalid server port:"0"'),
                 (b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 70000\r\n\r\n",
                  "invalid server port")]
        for response, message in cases:
            with self.assertRaises(mp.AuthHttpError) as caught:
                self.parse(response)
            self.assertIn(message, str(caught.exception))
        with self.assertRaises(mp.AuthHttpError) as caught:
            self.parse(b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\n\r\n",
                       have_password=False)
        self.assertIn("did not send password", str(caught.exception))

    def test_oversized_junk_and_early_end(self):
        big = b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nX-Pad: " + b"x" * 1000 + b"\r\n\r\n"
        self.assertGreater(len(big), 1024)
        with self.assertRaises(mp.AuthHttpError) as caught:
            mp.AuthHttpParser().receive_data(big)
        self.assertIn("too long", str(caught.exception))
        for junk in (b"HTTP/1.0 200 OK\r\nno colon here\r\n\r\n", b"Auth Status: OK\r\n\r\n",
                     b"Auth-Status: OK\rX\r\n\r\n"):
            with self.assertRaises(mp.AuthHttpError):
                mp.AuthHttpParser().receive_data(junk)
        parser = mp.AuthHttpParser()
        self.assertIsNone(parser.receive_data(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n"))
        with self.assertRaises(mp.AuthHttpError):
            parser.receive_data(b"")

    def test_extension_headers(self):
        verdict = self.parse(b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 25\r\n"
                             b"Auth-Backend-TLS: STARTTLS\r\nAuth-SMTP-Auth: login\r\n\r\n", "smtp")
        self.assertEqual((verdict.backend_tls, verdict.smtp_auth), ("starttls", "login"))
        with self.assertRaises(mp.AuthHttpError):
            self.parse(b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 25\r\n"
                       b"Auth-Backend-TLS: maybe\r\n\r\n", "smtp")


class AuthHttpLinearWorkTests(LinearWorkTestCase):
    def test_auth_http_response(self):
        def run(size):
            response = b"HTTP/1.0 200 OK\r\nAuth-Status: " + b"x" * size + b"\r\n\r\n"
            parsed = feed_byte_by_byte(mp.AuthHttpParser().receive_data, response)
            self.assertEqual(parsed[0].headers["auth-status"], b"x" * size)
        self.assert_linear(run, 200)


# ========================================================================== #
# ####                          Backend login                           #### #
# ========================================================================== #
# The login scripts per protocol and setting (asserted as data, then run
# against scripted replies), PROXY headers, XCLIENT, escaping of what a peer
# chose; end to end: backends that fail, refuse or misbehave, the proxy's own
# SMTP AUTH to the backend, and the PROXY header it sends.

def run_script(script, replies, tag=b"", limit=4096):
    """Drive BackendLogin with the backend's replies; returns (sent, events)."""
    login = mp.BackendLogin(script, tag, limit)
    sent = login.data_to_send()
    events = []
    for reply in replies:
        events.extend(login.receive_data(reply))
        sent += login.data_to_send()
    return sent, events, login


class BackendLoginTests(unittest.TestCase):
    def test_imap_script_uses_literals_and_the_client_tag(self):
        self.assertEqual(mp.imap_login_script(b"a1 ", b"alice", b"se cret"), [
            mp.Expect("imap-greeting"), mp.Send(b"a1 LOGIN {5}\r\n", "LOGIN"), mp.Expect("continuation"),
            mp.Send(b"alice {7}\r\n", "LOGIN login literal"), mp.Expect("continuation"),
            mp.Send(b"se cret\r\n", "LOGIN password literal"),
            mp.Expect("imap-tagged", relay=True, verdict=True)])

    def test_imap_login_with_untagged_capability(self):
        sent, events, _ = run_script(mp.imap_login_script(b"a1 ", b"alice", b"secret"), [
            b"* OK ready\r\n", b"+ go\r\n", b"+ go\r\n",
            b"* CAPABILITY IMAP4rev1 IDLE\r\na1 OK done\r\n"], tag=b"a1 ")
        self.assertEqual(sent, b"a1 LOGIN {5}\r\nalice {6}\r\nsecret\r\n")
        self.assertEqual(events, [mp.LoginDone(b"* CAPABILITY IMAP4rev1 IDLE\r\na1 OK done\r\n")])

    def test_crlf_and_nul_in_credentials_stay_literal_data(self):
        login, password = b"al\r\nx1 DELETE INBOX", b"p\0w\r\n"
        sent, events, _ = run_script(mp.imap_login_script(b"t ", login, password), [
            b"* OK\r\n", b"+\r\n", b"+\r\n", b"t OK\r\n"], tag=b"t ")
        self.assertEqual(sent, b"t LOGIN {%d}\r\n" % len(login) + login + b" {%d}\r\n" % len(password)
                         + password + b"\r\n")

    def test_pop3_login(self):
        sent, events, login = run_script(mp.pop3_login_script(b"alice", b"secret"), [
            b"+OK hello\r\n", b"+OK\r\n", b"+OK 2 messages\r\n+OK extra"])
        self.assertEqual(sent, b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(events, [mp.LoginDone(b"+OK 2 messages\r\n")])
        self.assertEqual(login.trailing_data, b"+OK extra")

    def test_which_refusals_are_a_verdict_on_the_credentials(self):
        """auth = backend counts a no to the login and password, not the
        backend's trouble, nor a refusal before the password was sent."""
        imap = lambda *replies: [b"* OK hi\r\n", b"+\r\n", b"+\r\n"] + list(replies)
        pop3 = lambda *replies: [b"+OK hi\r\n"] + list(replies)
        smtp = lambda *replies: [b"220 hi\r\n", b"250 ok\r\n"] + list(replies)
        smtp_script = mp.smtp_login_script(smtp_settings(xclient=False, proxy_smtp_auth=True),
                                           facts())
        imap_script = mp.imap_login_script(b"a1 ", b"alice", b"pw")
        pop3_script = mp.pop3_login_script(b"alice", b"pw")
        cases = [
            (imap_script, imap(b"a1 NO [AUTHENTICATIONFAILED] x\r\n"), True),
            (imap_script, imap(b"* BYE x\r\na1 NO x\r\n"), True),
            (imap_script, imap(b"a1 NO [UNAVAILABLE] x\r\n"), False),
            (imap_script, imap(b"a1 BAD x\r\n"), False),
            (imap_script, [b"* OK hi\r\n", b"a1 NO x\r\n"], False),   # before the password
            (pop3_script, pop3(b"-ERR no such user\r\n"), True),
            (pop3_script, pop3(b"+OK\r\n", b"-ERR [AUTH] x\r\n"), True),
            (pop3_script, pop3(b"+OK\r\n", b"-ERR [SYS/TEMP] x\r\n"), False),
            (pop3_script, pop3(b"+OK\r\n", b"-ERR [IN-USE] x\r\n"), False),
            (smtp_script, smtp(b"535 5.7.8 Error: authentication failed\r\n"), True),
            (smtp_script, smtp(b"454 4.7.0 Temporary authentication failure\r\n"), False),
            (smtp_script, smtp(b"504 5.5.4 Unrecognized authentication type\r\n"), False)]
        for script, replies, verdict in cases:
            with self.subTest(replies=replies):
                with self.assertRaises(mp.BackendError) as caught:
                    run_script(script, replies, tag=b"a1 ")
                self.assertTrue(caught.exception.refusal)
                self.assertEqual(caught.exception.verdict, verdict)

    def test_a_greeting_of_another_protocol_is_no_refusal(self):
        for script, greeting, message in [
                (mp.pop3_login_script(b"alice", b"pw"), b"* OK IMAP4rev1 ready\r\n",
                 "upstream sent an unexpected greeting (IMAP's, where POP3's was expected"),
                (mp.imap_login_script(b"a1 ", b"alice", b"pw"), b"220 mx ESMTP\r\n",
                 "upstream sent an unexpected greeting (SMTP's, where IMAP's was expected"),
                (mp.smtp_login_script(smtp_settings(), facts()), b"+OK POP3 ready\r\n",
                 "upstream sent an unexpected greeting (POP3's, where SMTP's was expected")]:
            with self.subTest(greeting=greeting):
                with self.assertRaises(mp.UnexpectedGreeting) as caught:
                    run_script(script, [greeting], tag=b"a1 ")
                self.assertTrue(str(caught.exception).startswith(message), caught.exception)
                self.assertEqual(caught.exception.line, greeting)
                self.assertFalse(caught.exception.refusal)
                self.assertEqual(caught.exception.outcome, "upstream sent an unexpected greeting")
        # The protocol's own refusal as a greeting stays a refusal.
        with self.assertRaises(mp.BackendError) as caught:
            run_script(mp.pop3_login_script(b"alice", b"pw"), [b"-ERR [SYS/TEMP] busy\r\n"])
        self.assertNotIsInstance(caught.exception, mp.UnexpectedGreeting)
        self.assertTrue(caught.exception.refusal)

    def test_refusals(self):
        cases = [(b"* PREAUTH hi\r\n",), (b"* OK\r\n", b"a1 NO no\r\n"),
                 (b"* OK\r\n", b"+\r\n", b"+\r\n", b"a1 NO [AUTHENTICATIONFAILED] no\r\n")]
        for replies in cases:
            with self.assertRaises(mp.BackendError) as caught:
                run_script(mp.imap_login_script(b"a1 ", b"u", b"p"), replies, tag=b"a1 ")
            self.assertEqual(caught.exception.line, replies[-1])
        with self.assertRaises(mp.BackendError):
            run_script(mp.pop3_login_script(b"u", b"p"), [b"+OK\r\n", b"-ERR no such user\r\n"])

    def test_too_long_line(self):
        with self.assertRaises(mp.BackendError) as caught:
            run_script(mp.pop3_login_script(b"u", b"p"), [b"+OK " + b"x" * 200], limit=128)
        self.assertIn("too long", str(caught.exception))

    def test_replies_split_anywhere(self):
        replies = b"* OK ready\r\n+ go\r\n+ go\r\na1 OK done\r\n"
        sent, events, _ = run_script(mp.imap_login_script(b"a1 ", b"u", b"p"),
                                     byte_by_byte(replies), tag=b"a1 ")
        self.assertEqual(events, [mp.LoginDone(b"a1 OK done\r\n")])

    def test_a_literal_in_a_login_reply_is_an_error_not_a_reply(self):
        """A line ending in {n} announces n bytes no login reply has: the
        runner cannot know where the next reply starts, so it stops."""
        cases = [[b"* OK {99999999999}\r\n", b"a1 OK LOGIN completed\r\n"],
                 [b"* OK\r\n", b"+ go\r\n", b"+ go\r\n", b"* CAPABILITY {5+}\r\n"],
                 [b"* OK\r\n", b"+ {3}\r\n"]]
        for replies in cases:
            with self.assertRaises(mp.BackendError, msg=replies) as caught:
                run_script(mp.imap_login_script(b"a1 ", b"u", b"p"), replies, tag=b"a1 ")
            self.assertIn("literal", str(caught.exception))
            self.assertFalse(caught.exception.refusal)       # never relayed to the client

    def test_a_reply_sent_before_its_command_is_an_error(self):
        """One reply per command sent: what the backend sent ahead (here with
        the greeting, in one segment) cannot answer a command it has not seen."""
        scripts = [
            (mp.pop3_login_script(b"alice", b"secret"),
             b"+OK ready\r\n+OK user accepted\r\n+OK logged in\r\n"),
            (mp.imap_login_script(b"a1 ", b"alice", b"secret"), b"* OK ready\r\n+ go\r\n"),
            (mp.smtp_login_script(smtp_settings(), facts()),
             b"220 ready\r\n250 hello\r\n220 again\r\n250 hello\r\n"),
            (mp.smtp_login_script(smtp_settings(xclient=False, proxy_smtp_auth=True), facts()),
             b"220 ready\r\n" b"250 hello\r\n235 2.7.0 ok\r\n"),
        ]
        for script, early in scripts:
            # (Fed a byte at a time, each byte would come after the command:
            # only bytes already there when it is sent can be known as early.)
            with self.assertRaises(mp.BackendError, msg=early) as caught:
                run_script(script, [early], tag=b"a1 ")
            self.assertIn("before the command", str(caught.exception))
        # The same replies, each after its command, log in.
        sent, events, _ = run_script(mp.pop3_login_script(b"alice", b"secret"),
                                     [b"+OK ready\r\n", b"+OK user accepted\r\n",
                                      b"+OK logged in\r\n"])
        self.assertEqual(events, [mp.LoginDone(b"+OK logged in\r\n")])

    def test_after_a_refusal_nothing_the_backend_says_logs_in(self):
        script = mp.imap_login_script(b"b ", b"u", b"p")
        login = mp.BackendLogin(script, b"b ")
        for reply in (b"* OK\r\n", b"+\r\n", b"+\r\n"):
            login.receive_data(reply)
        with self.assertRaises(mp.BackendError) as refused:
            login.receive_data(b"b NO refused by the backend\r\n")
        self.assertTrue(refused.exception.refusal)
        for later in (b"b OK logged in after all\r\n", b""):
            with self.assertRaises(mp.BackendError) as again:
                login.receive_data(later)
            self.assertIs(again.exception, refused.exception)


# -- SMTP: XCLIENT, HELO or EHLO, AUTH ----------------------------------------------

def facts(**overrides):
    values = dict(client_address="192.0.2.7", client_name="[UNAVAILABLE]", helo=None,
                  esmtp=False, login=b"alice", password=b"secret", method="plain",
                  mail_from=None, rcpt_to=None)
    values.update(overrides)
    return mp.SmtpFacts(**values)


def smtp_settings(**overrides):
    return server_settings("smtp", **overrides)


E220, E250, E235 = (mp.Expect("smtp", codes=(b"220",)), mp.Expect("smtp", codes=(b"250",)),
                    mp.Expect("smtp", codes=(b"235",), verdict=True))
EXCLIENT = mp.Expect("smtp", codes=(b"220", b"250"))


class SmtpBackendScriptTests(unittest.TestCase):
    def test_xtext(self):
        self.assertEqual(mp.xtext(b"a+b=c d\x01\x7f\xc3\xa9"), b"a+2Bb+3Dc+20d+01+7F+C3+A9")
        self.assertEqual(mp.xtext(b"[UNAVAILABLE]"), b"[UNAVAILABLE]")

    def test_xclient_command(self):
        self.assertEqual(mp.xclient_command("192.0.2.7", b"al ice+", "[UNAVAILABLE]"),
                         b"XCLIENT ADDR=192.0.2.7 LOGIN=al+20ice+2B NAME=[UNAVAILABLE]\r\n")
        self.assertEqual(mp.xclient_command("2001:db8::1", b"", "host.example"),
                         b"XCLIENT ADDR=IPV6:2001:db8::1 NAME=host.example\r\n")

    def test_every_combination(self):
        """xclient on/off × HELO/EHLO/neither × none or not × proxy_smtp_auth on/off."""
        for xclient in (True, False):
            for helo in (None, b"HELO", b"EHLO"):
                for none in (False, True):
                    for backend_auth in (False, True):
                        with self.subTest(xclient=xclient, helo=helo, none=none, auth=backend_auth):
                            self.check_script(xclient, helo, none, backend_auth)

    def check_script(self, xclient, helo, none, backend_auth):
        settings = smtp_settings(xclient=xclient, proxy_smtp_auth=backend_auth)
        login = b"" if none else b"alice"
        f = facts(helo=b"client.example" if helo else None, esmtp=helo == b"EHLO", login=login,
                  password=b"" if none else b"secret", method="none" if none else "plain",
                  mail_from=b"MAIL FROM:<a@b>" if none else None,
                  rcpt_to=b"RCPT TO:<c@d>" if none else None)
        hello = b"EHLO" if xclient or helo == b"EHLO" else b"HELO"
        expected = [E220, mp.Send(hello + b" mail.test\r\n", hello.decode()), E250]
        if xclient:
            shown = b"" if (backend_auth and not none) or none else b" LOGIN=alice"
            expected += [mp.Send(b"XCLIENT ADDR=192.0.2.7" + shown + b" NAME=[UNAVAILABLE]\r\n",
                                 "XCLIENT"), EXCLIENT]
            if helo:
                expected += [mp.Send(helo + b" client.example\r\n", helo.decode()), E250]
        if backend_auth and not none:
            expected += [mp.Send(b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n", "AUTH PLAIN"),
                         E235]
        if none:
            expected += [mp.Send(b"MAIL FROM:<a@b>\r\n", "MAIL"), E250,
                         mp.Send(b"RCPT TO:<c@d>\r\n", "RCPT"),
                         mp.Expect("smtp", relay=True)]
        self.assertEqual(mp.smtp_login_script(settings, f), expected)
        # ... and the script runs against a backend that says yes to everything.
        replies = []
        for step in expected:
            if isinstance(step, mp.Expect):
                code = (step.codes or (b"250",))[-1]
                replies.append(code + b"-first line\r\n" + code + b" done\r\n")
        sent, events, _ = run_script(expected, replies)
        self.assertEqual(sent, b"".join(step.data for step in expected if isinstance(step, mp.Send)))
        self.assertEqual(len(events), 1)

    def test_auth_login_extension(self):
        script = mp.smtp_login_script(smtp_settings(xclient=False, proxy_smtp_auth=True,
                                                    proxy_smtp_auth_method="login"), facts())
        self.assertEqual(script[3:], [
            mp.Send(b"AUTH LOGIN\r\n", "AUTH LOGIN"), mp.Expect("smtp", codes=(b"334",)),
            mp.Send(b64(b"alice") + b"\r\n", "AUTH LOGIN username"),
            mp.Expect("smtp", codes=(b"334",), verdict=True),
            mp.Send(b64(b"secret") + b"\r\n", "AUTH LOGIN password"), E235])

    def test_relayed_rcpt_reply_even_a_refusal(self):
        script = mp.smtp_login_script(smtp_settings(xclient=False), facts(
            login=b"", method="none", mail_from=b"MAIL FROM:<a@b>", rcpt_to=b"RCPT TO:<c@d>"))
        sent, events, _ = run_script(script, [b"220 hi\r\n", b"250-x\r\n250 y\r\n", b"250 ok\r\n",
                                              b"550-5.1.1 no such\r\n550 5.1.1 user\r\n"])
        self.assertEqual(events, [mp.LoginDone(b"550-5.1.1 no such\r\n550 5.1.1 user\r\n")])

    def test_unexpected_code_is_an_error_with_the_whole_reply(self):
        script = mp.smtp_login_script(smtp_settings(), facts())
        with self.assertRaises(mp.BackendError) as caught:
            run_script(script, [b"220 hi\r\n", b"250 ok\r\n", b"550-no\r\n550 XCLIENT denied\r\n"])
        self.assertEqual(caught.exception.line, b"550-no\r\n550 XCLIENT denied\r\n")
        with self.assertRaises(mp.BackendError):
            run_script(script, [b"554 go away\r\n"])


class BackendStartTlsScriptTests(unittest.TestCase):
    def test_imap_starttls_before_login(self):
        script = mp.imap_login_script(b"a1 ", b"alice", b"secret", starttls=True)
        self.assertEqual(script[:4], [mp.Expect("imap-greeting"), mp.Send(b"S1 STARTTLS\r\n", "STARTTLS"),
                                      mp.Expect("imap-tagged", tag=b"S1 "), mp.TlsStep()])
        login = mp.BackendLogin(script, b"a1 ")
        self.assertEqual(login.receive_data(b"* OK hi\r\n"), [])
        self.assertEqual(login.data_to_send(), b"S1 STARTTLS\r\n")
        # A line injected behind the yes must not be taken as the next answer.
        self.assertEqual(login.receive_data(b"S1 OK begin\r\n+ injected\r\n"), [mp.BackendStartTls()])
        login.tls_started()
        self.assertEqual(login.data_to_send(), b"a1 LOGIN {5}\r\n")
        self.assertEqual(login.trailing_data, b"")

    def test_smtp_starttls_then_ehlo_again(self):
        script = mp.smtp_login_script(server_settings("smtp", proxy_starttls=True, xclient=False), facts())
        self.assertEqual(script[3:8], [mp.Send(b"STARTTLS\r\n", "STARTTLS"), mp.Expect("smtp", codes=(b"220",)),
                                       mp.TlsStep(), mp.Send(b"EHLO mail.test\r\n", "EHLO"), E250])


# -- PROXY protocol headers ---------------------------------------------------------

class ProxyProtocolTests(unittest.TestCase):
    def test_v1(self):
        header = mp.proxy_protocol_v1(("192.0.2.1", 5555), ("127.0.0.1", 143))
        self.assertEqual(header, b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 143\r\n")
        self.assertEqual(mp.proxy_protocol_v1(("2001:db8::1", 1), ("::1", 2)),
                         b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n")
        self.assertEqual(mp.proxy_protocol_v1(("192.0.2.1", 1), ("::1", 2)), b"PROXY UNKNOWN\r\n")

    def test_v2_bytes(self):
        header = mp.proxy_protocol_v2(("192.0.2.1", 5555), ("127.0.0.1", 143))
        self.assertEqual(header, b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
                         b"\xc0\x00\x02\x01\x7f\x00\x00\x01\x15\xb3\x00\x8f")
        self.assertEqual(mp.proxy_protocol_v2(("192.0.2.1", 1), ("::1", 2)),
                         b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")       # LOCAL

    def test_v2_tls_tlvs_round_trip(self):
        tls = mp.ProxyTls("TLSv1.3", "TLS_AES_256_GCM_SHA384", "mail.example.org", "imap", "alice", True)
        parsed = mp.parse_proxy_header(mp.proxy_protocol_v2(("2001:db8::7", 40000), ("::1", 993), tls))
        self.assertEqual((parsed.source, parsed.destination), (("2001:db8::7", 40000), ("::1", 993)))
        self.assertEqual(parsed.tlvs[mp.PP2_TYPE_ALPN], b"imap")
        self.assertEqual(parsed.tlvs[mp.PP2_TYPE_AUTHORITY], b"mail.example.org")
        ssl_tlv = parsed.tlvs[mp.PP2_TYPE_SSL]
        self.assertEqual(ssl_tlv[0], mp.PP2_CLIENT_SSL | mp.PP2_CLIENT_CERT_CONN)
        self.assertIn(b"\x21\x00\x07TLSv1.3", ssl_tlv)
        self.assertIn(b"\x23\x00\x16TLS_AES_256_GCM_SHA384", ssl_tlv)

    def test_parse_needs_more_at_every_truncation(self):
        for header in (mp.proxy_protocol_v1(("192.0.2.1", 5555), ("127.0.0.1", 143)),
                       mp.proxy_protocol_v2(("192.0.2.1", 5555), ("127.0.0.1", 143),
                                            mp.ProxyTls("TLSv1.2", "X", "n", "imap"))):
            for size in range(len(header)):
                self.assertIsNone(mp.parse_proxy_header(header[:size]), size)
            parsed = mp.parse_proxy_header(header + b"a1 LOGIN")
            self.assertEqual((parsed.source, parsed.length), (("192.0.2.1", 5555), len(header)))

    def test_unknown_local_and_other_families(self):
        self.assertEqual(mp.parse_proxy_header(b"PROXY UNKNOWN\r\n").source, None)
        self.assertEqual(mp.parse_proxy_header(b"PROXY UNKNOWN 1 2 3 4\r\nX").length, 23)
        local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
        self.assertEqual(mp.parse_proxy_header(local), mp.ProxyHeader(None, None, 16))
        unix = b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\xd8" + b"\x00" * 216
        self.assertEqual(mp.parse_proxy_header(unix).source, None)

    def test_bad_headers(self):
        bad = [b"GET / HTTP/1.0\r\n", b"PROXY TCP4 192.0.2.1 127.0.0.1 5555\r\n",
               b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n", b"PROXY TCP4 192.0.2.1 127.0.0.1 99999 2\r\n",
               b"PROXY TCP4 192.0.2.1 127.0.0.1 01 2\r\n", b"PROXY TCP5 a b 1 2\r\n",
               b"PROXY " + b"x" * 120, b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + b"\x00" * 12,
               b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",
               b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + b"\x00" * 4,
               b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x10" + b"\x00" * 12 + b"\x20\x00\x09\x00"]
        for header in bad:
            with self.assertRaises(mp.ProxyHeaderError, msg=header):
                mp.parse_proxy_header(header)

    def test_real_ip_trust(self):
        trusted = mp.parse_real_ip_from(["10.0.0.0/8"]) + mp.parse_real_ip_from(["::1"])
        self.assertTrue(mp.real_ip_trusted("10.1.2.3", trusted))
        self.assertTrue(mp.real_ip_trusted("::1", trusted))
        self.assertFalse(mp.real_ip_trusted("192.0.2.1", trusted))
        self.assertTrue(mp.real_ip_trusted("unix:", mp.parse_real_ip_from(["unix:"])))
        self.assertFalse(mp.real_ip_trusted("unix:", trusted))

    def test_believed_client_only_from_trusted_networks(self):
        trusted = mp.parse_trusted_networks(["10.0.0.0/8", "::1"])
        identity = mp.ClientIdentity(b"192.0.2.9", b"4711")
        self.assertEqual(mp.believed_client(identity, "10.1.2.3", trusted), ("192.0.2.9", 4711))
        self.assertEqual(mp.believed_client(identity, "::1", trusted), ("192.0.2.9", 4711))
        self.assertIsNone(mp.believed_client(identity, "192.0.2.1", trusted))
        self.assertIsNone(mp.believed_client(identity, "10.1.2.3", []))
        for address, port, expected in ((b"2001:DB8::1", b"", ("2001:db8::1", 0)),
                                        (b"192.0.2.9", b"99999", ("192.0.2.9", 0)),
                                        (b"192.0.2.9", b"-1", ("192.0.2.9", 0)),
                                        (b"192.0.2.9\r\nX: y", b"1", None),
                                        (b"example.com", b"1", None), (b"\xff", b"1", None)):
            self.assertEqual(mp.believed_client(mp.ClientIdentity(address, port), "10.0.0.1",
                                                trusted), expected, address)

    def test_a_proxy_header_with_a_scope_id_is_refused(self):
        for header in (b"PROXY TCP6 fe80::1%eth0 ::1 1234 25\r\n",
                       b"PROXY TCP6 fe80::1%x\nAuth-Status:\x01 ::1 1 2\r\n"):
            with self.assertRaises(mp.ProxyHeaderError, msg=header):
                mp.parse_proxy_header(header)


# -- one escaping path per destination, linear work ---------------------------------

class BackendLoginEscapingTests(unittest.TestCase):
    """Every byte a peer chooses (a login, a password) reaches the backend
    through one function, and no byte can end a line, a field or a string
    there early (issue 12).  The auth_http headers have their own table, with
    the request tests in "Authentication"."""

    def test_xtext_for_xclient(self):
        """RFC 3461 §4: "+", "=" and bytes outside 0x21-0x7E as +XX."""
        for byte in HOSTILE_BYTES:
            value = b"a" + byte + b"b"
            expected = b"a" + b"".join(b"+%02X" % c if c < 0x21 or c > 0x7E or c in b"+=" else bytes([c])
                                       for c in byte) + b"b"
            self.assertEqual(mp.xtext(value), expected, byte)
            line = mp.xclient_command("192.0.2.7", value, "host.example")
            self.assertEqual(line.count(b"\r\n"), 1, byte)
            self.assertTrue(line.endswith(b"NAME=host.example\r\n"))
            self.assertRegex(line[:-2], rb"^XCLIENT ADDR=192\.0\.2\.7 LOGIN=[\x21-\x7e]+ NAME=")

    def test_imap_literals_carry_any_byte(self):
        """The backend LOGIN sends login and password as literals: whatever
        they hold, the command cannot end early (RFC 3501 §4.3)."""
        for byte in HOSTILE_BYTES:
            login, password = b"u" + byte + b"\r\nx LOGOUT", byte + b"p"
            script = mp.imap_login_script(b"a1 ", login, password)
            sent = b"".join(step.data for step in script if isinstance(step, mp.Send))
            self.assertEqual(sent, b"a1 LOGIN {%d}\r\n" % len(login) + login +
                             b" {%d}\r\n" % len(password) + password + b"\r\n", byte)

    def test_pop3_arguments_cannot_hold_line_ends(self):
        """POP3 has no quoting: a login or password holding CR, LF or NUL
        cannot be sent (the session refuses the login); anything else can."""
        for byte in HOSTILE_BYTES:
            self.assertEqual(mp.pop3_can_send(b"u" + byte, b"p"), byte not in (b"\r", b"\n", b"\0"), byte)
            self.assertEqual(mp.pop3_can_send(b"u", b"p" + byte), byte not in (b"\r", b"\n", b"\0"), byte)


class BackendLoginLinearWorkTests(LinearWorkTestCase):
    def test_backend_login_reply(self):
        def run(size):
            login = mp.BackendLogin(mp.pop3_login_script(b"u", b"p"), b"", size + 64)
            feed_byte_by_byte(login.receive_data, b"+OK " + b"x" * size + b"\r\n")
            self.assertEqual(login.data_to_send(), b"USER u\r\n")
        self.assert_linear(run, 4096)

    def test_proxy_protocol_v2_header(self):
        def run(size):
            header = proxy_v2_header("192.0.2.7", 40000, "127.0.0.1", 143, tlvs=b"\xe0" + struct.pack(
                "!H", size) + b"t" * size)
            parsed = feed_byte_by_byte(mp.ProxyHeaderReader().receive_data, header + b"a1 NOOP\r\n")
            self.assertEqual(parsed[0].source, ("192.0.2.7", 40000))
        self.assert_linear(run, 900)


# -- end to end: when the backend fails ---------------------------------------------

class BackendFailureTests(EndToEndTestCase):
    def test_backend_down_imap(self):
        port = free_port()                                   # nobody listens there
        proxy = self.start_proxy("imap", port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        client.expect_line(mp.IMAP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r"\[error\] .*connect\(\) failed \(111: Connection refused\) "
                           r"while connecting to upstream, .*upstream: 127\.0\.0\.1:%d" % port)

    def test_backend_down_pop3(self):
        port = free_port()
        proxy = self.start_proxy("pop3", port)
        client = self.connect(proxy)
        client.expect_line(mp.POP3_GREETING)
        client.send(b"USER alice\r\nPASS secret\r\n")
        client.expect_line(mp.POP3_OK)
        client.expect_line(mp.POP3_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r"connect\(\) failed .*upstream: 127\.0\.0\.1:%d" % port)

    def test_backend_refuses_login_imap(self):
        backend = self.use(FakeImapBackend(mode="refuse"))
        proxy = self.start_proxy("imap", backend.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        client.expect_line(mp.IMAP_INTERNAL_ERROR)     # not the backend's words
        client.expect_closed()
        proxy.wait_for_log(r'upstream sent invalid response: "a1 NO \[AUTHENTICATIONFAILED\] bad"')
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)

    def test_backend_refuses_login_imap_with_proxy_pass_error_message(self):
        backend = self.use(FakeImapBackend(mode="refuse"))
        proxy = self.start_proxy("imap", backend.port, proxy_pass_error_message="on")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        client.expect(rb"^a1 NO \[AUTHENTICATIONFAILED\] bad\r\n$")
        client.expect_closed()

    def test_backend_refuses_login_pop3(self):
        backend = self.use(FakePop3Backend(mode="refuse"))
        proxy = self.start_proxy("pop3", backend.port)
        client = self.connect(proxy)
        client.send(b"USER alice\r\nPASS secret\r\n")
        client.expect_line(mp.POP3_GREETING)
        client.expect_line(mp.POP3_OK)
        client.expect_line(mp.POP3_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r'upstream sent invalid response: "-ERR \[AUTH\] bad"')

    def test_backend_refuses_login_pop3_with_proxy_pass_error_message(self):
        backend = self.use(FakePop3Backend(mode="refuse"))
        proxy = self.start_proxy("pop3", backend.port, proxy_pass_error_message="on")
        client = self.connect(proxy)
        client.send(b"USER alice\r\nPASS secret\r\n")
        client.expect_line(mp.POP3_GREETING)
        client.expect_line(mp.POP3_OK)
        client.expect(rb"^-ERR \[AUTH\] bad\r\n$")
        client.expect_closed()

    def test_backend_bad_greeting(self):
        backend = self.use(FakeImapBackend(mode="bad-greeting"))
        proxy = self.start_proxy("imap", backend.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        client.expect_line(mp.IMAP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r'upstream sent invalid response: "\* BYE not today"')

    def test_backend_closes_at_once(self):
        backend = self.use(FakePop3Backend(mode="close"))
        proxy = self.start_proxy("pop3", backend.port)
        client = self.connect(proxy)
        client.send(b"USER alice\r\nPASS secret\r\n")
        client.expect_line(mp.POP3_GREETING)
        client.expect_line(mp.POP3_OK)
        client.expect_line(mp.POP3_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r"upstream prematurely closed connection")

    def test_backend_stalls(self):
        backend = self.use(FakeImapBackend(mode="stall"))
        proxy = self.start_proxy("imap", backend.port, timeout="1s")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        started = time.monotonic()
        client.send("a1 LOGIN alice secret")
        client.expect_line(mp.IMAP_INTERNAL_ERROR)
        self.assertGreaterEqual(time.monotonic() - started, 1.0)
        self.assertLess(time.monotonic() - started, 2.5)
        client.expect_closed()
        proxy.wait_for_log(r"\[error\] .*upstream timed out .*upstream: 127\.0\.0\.1:%d"
                           % backend.port)


# -- end to end: hostile backends (issue 12) ----------------------------------------
# Backends that answer ahead of the question, announce literals, or change
# their mind after a refusal.  Whatever they say, the client is logged in
# only by the reply to the proxy's last login command.

class RoutesPerProtocolEndToEndTests(EndToEndTestCase):
    """[routes] with an address per protocol (issue 15): carol's IMAP and
    POP3 each reach their own backend; with one port for both, the POP3
    login meets the IMAP greeting and the log says so."""

    def start(self, route: str) -> ProxyUnderTest:
        """An IMAP and a POP3 server whose proxy_pass nobody answers, carol
        in [users] and [routes] (``route``: her value, with {imap} and
        {pop3}, the fake backends' ports)."""
        self.imap = self.use(FakeImapBackend(accept=[(b"carol", b"pw")]))
        self.pop3 = self.use(FakePop3Backend(accept=[(b"carol", b"pw")]))
        text = proxy_config("imap", free_port(), users={"carol": "{PLAIN}pw"})
        text += ("\n[server pop3]\nlisten = 127.0.0.1:%d\nprotocol = pop3\nproxy_pass = 127.0.0.1:%d\n"
                 % (free_port(), free_port()))
        text += "\n[routes]\ncarol = %s\n" % route.format(imap=self.imap.port, pop3=self.pop3.port)
        return self.use(ProxyUnderTest(text))

    def test_each_protocol_reaches_its_own_backend(self):
        proxy = self.start("imap=127.0.0.1:{imap} pop3=127.0.0.1:{pop3}")
        client = self.connect(proxy, proxy.ports[0])
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN carol pw")
        client.expect(rb"^a1 OK LOGIN completed\r\n$")
        client = self.connect(proxy, proxy.ports[1])
        client.expect_line(mp.POP3_GREETING)
        client.send(b"USER carol\r\nPASS pw\r\n")
        client.expect_line(mp.POP3_OK)
        client.expect(rb"^\+OK alice has 1 message\r\n$")
        self.assertEqual(self.imap.logins, [(b"carol", b"pw")])
        self.assertEqual(self.pop3.logins, [(b"carol", b"pw")])
        proxy.wait_for_log(r'\*2 client logged in .*login: "carol", upstream: 127\.0\.0\.1:%d'
                           % self.pop3.port)

    def test_a_backend_of_another_protocol_is_named_in_the_log(self):
        proxy = self.start("127.0.0.1:{imap}")        # one port for both: the old trap
        client = self.connect(proxy, proxy.ports[1])
        client.expect_line(mp.POP3_GREETING)
        client.send(b"USER carol\r\nPASS pw\r\n")
        client.expect_line(mp.POP3_OK)
        client.expect_line(mp.POP3_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r"\[error\] \d+#0: \*1 upstream sent an unexpected greeting \(IMAP's, "
                           r"where POP3's was expected: is the port right\?\): "
                           r'"\* OK fake IMAP ready" while reading response from upstream, .*'
                           r'login: "carol", upstream: 127\.0\.0\.1:%d' % self.imap.port)
        proxy.wait_for_log(r"session done: upstream sent an unexpected greeting, ")
        self.assertEqual(self.imap.logins, [])

    def test_an_unexpected_greeting_is_not_passed_on(self):
        # proxy_pass_error_message passes a refusal on, never another
        # protocol's greeting (nor something that is no mail protocol's).
        backend = self.use(ScriptedBackend(b"SSH-2.0-OpenSSH_9.6\r\n"))
        proxy = self.start_proxy("imap", backend.port, proxy_pass_error_message="on")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        client.expect_line(mp.IMAP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r"upstream sent an unexpected greeting \(no mail protocol's, where "
                           r"IMAP's was expected: is the port right\?\): \"SSH-2\.0-OpenSSH_9\.6\"")


class HostileBackendTests(EndToEndTestCase):
    def test_a_literal_in_the_greeting_is_an_internal_error(self):
        """nginx 1.22 answers this with the internal error too."""
        backend = self.use(ScriptedBackend(b"* OK {99999999999}\r\n", 1,
                                           b"a1 OK LOGIN completed\r\n"))
        proxy = self.start_proxy("imap", backend.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        client.expect_line(mp.IMAP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r'\[error\] .*upstream sent a literal in its login response: '
                           r'"\* OK \{99999999999\}"')
        self.assertEqual(bytes(backend.received[0]), b"")     # no LOGIN was ever sent

    def test_pop3_replies_sent_with_the_greeting_do_not_log_in(self):
        backend = self.use(ScriptedBackend(
            b"+OK ready\r\n+OK user accepted\r\n+OK logged in\r\n", 1,
            b"-ERR [AUTH] who are you\r\n"))
        proxy = self.start_proxy("pop3", backend.port)
        client = self.connect(proxy)
        client.send(b"USER alice\r\nPASS secret\r\n")
        client.expect_line(mp.POP3_GREETING)
        client.expect_line(mp.POP3_OK)
        client.expect_line(mp.POP3_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r"upstream sent data before the command it answers")
        self.assertFalse(re.search(r"client logged in", proxy.log))

    def test_smtp_replies_sent_ahead_do_not_turn_a_refusal_into_a_login(self):
        """In one segment with the greeting, "250" for EHLO, and ahead of
        time "250"s for XCLIENT and the second EHLO; the real answer to
        XCLIENT is a refusal."""
        backend = self.use(ScriptedBackend(
            b"220 ready\r\n250 hello\r\n250 fine\r\n250 hello again\r\n", 2,
            b"550 5.7.0 XCLIENT denied\r\n"))
        proxy = self.start_proxy("smtp", backend.port)
        client = self.connect(proxy)
        client.expect(rb"^220 ")
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        client.expect_line(mp.SMTP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r"upstream sent data before the command it answers")
        self.assertNotIn(b"XCLIENT", bytes(backend.received[0]))

    def test_after_a_refusal_the_backend_is_not_read_again(self):
        """proxy_pass_error_message on: the refusal goes to the client, and
        the backend connection is closed at once, before the client has read
        it (here 16 MB of it, which a client with a small receive buffer
        reads slowly): a later "OK" from the backend must not log in."""
        refusal = b"a1 NO refused by the backend " + b"x" * (16 * MEGABYTE) + b"\r\n"
        backend = self.use(ScriptedBackend(b"* OK ready\r\n", 1, b"+ go\r\n", 1, b"+ go\r\n",
                                           1, refusal, 0.3, b"a1 OK logged in after all\r\n"))
        proxy = self.start_proxy("imap", backend.port, proxy_pass_error_message="on",
                                 proxy_buffer="32m")
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", proxy.port))
        sock.sendall(b"a1 LOGIN alice secret\r\n")
        wait_until(lambda: backend.hung_up, what="the backend's connection")
        self.assertTrue(backend.hung_up[0].wait(5),
                        "the proxy kept the refusing backend's connection open")
        sock.settimeout(10)
        received = bytearray()
        while True:
            data = sock.recv(MEGABYTE)
            if not data:
                break
            received += data
        self.assertEqual(bytes(received), mp.IMAP_GREETING + refusal)
        self.assertNotIn("client logged in", proxy.log)


# -- end to end: proxy_smtp_auth, the proxy logs in to the backend itself -----------

class SmtpEndToEndBackendAuthTests(EndToEndTestCase):
    def test_auth_plain_without_xclient(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.start_proxy("smtp", backend.port, xclient="off", proxy_smtp_auth="on")
        client = self.connect(proxy)
        self.smtp_hello(client)
        self.smtp_auth_plain(client)
        client.send("MAIL FROM:<alice@example.com>")
        self.assertEqual(client.read_line(), SMTP_BACKEND_MAIL_OK)
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"
                         b"MAIL FROM:<alice@example.com>\r\nQUIT\r\n")
        self.assertNotIn(b"XCLIENT", bytes(backend.received[0]))
        self.assertEqual(backend.logins, [(b"alice", b"secret")])

    def test_auth_login_method_and_a_helo_client(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.start_proxy("smtp", backend.port, xclient="off", proxy_smtp_auth="on",
                                 proxy_smtp_auth_method="login")
        client = self.connect(proxy)
        self.assertEqual(client.read_line(), SMTP_PROXY_GREETING)
        client.send("HELO client.example")
        self.assertEqual(client.read_line(), b"250 mail.test\r\n")
        client.send("AUTH LOGIN")
        self.assertEqual(client.read_line(), b"334 " + mp.SASL_USERNAME_PROMPT)
        client.send("YWxpY2U=")
        self.assertEqual(client.read_line(), b"334 " + mp.SASL_PASSWORD_PROMPT)
        client.send("c2VjcmV0")
        self.assertEqual(client.read_line(), mp.SMTP_AUTH_OK)   # ours, not the backend's 235 2.7.0
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        # The client said HELO and xclient is off: HELO server_name.
        self.assertEqual(bytes(backend.received[0]),
                         b"HELO mail.test\r\nAUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\nQUIT\r\n")
        self.assertEqual(backend.logins, [(b"alice", b"secret")])

    def test_with_xclient_the_login_is_left_out_of_xclient(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.start_proxy("smtp", backend.port, proxy_smtp_auth="on")
        client = self.connect(proxy)
        self.smtp_hello(client)
        self.smtp_auth_plain(client)
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient(login=b"") +
                         b"EHLO client.example\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nQUIT\r\n")

    def test_backend_refusing_the_proxys_auth(self):
        backend = self.use(FakeSmtpBackend(mode="refuse"))
        proxy = self.start_proxy("smtp", backend.port, xclient="off", proxy_smtp_auth="on")
        client = self.connect(proxy)
        self.smtp_hello(client)
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(client.read_line(), mp.SMTP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r'upstream sent invalid response: "535 5\.7\.8 Error: authentication failed"')


# -- error_log ... debug: what the dialogue did, never what was said -----------------

DEBUG_SECRET = b"Xq7pw0rdZ9secret"          # alice's password in these tests
DEBUG_LITERAL = b"Lit3ralC0ntentsQ"          # the contents of a literal the client sends
DEBUG_TOKEN = b"ya29TokenK4x8Bearer"         # a bearer token


def secret_forms(*secrets: bytes) -> List[bytes]:
    """Each secret as it might show in a log: as sent, and in base64 alone,
    in SASL PLAIN's form for alice, and in XOAUTH2's."""
    forms = []
    for secret in secrets:
        forms += [secret, base64.b64encode(secret), base64.b64encode(b"\0alice\0" + secret),
                  base64.b64encode(b"user=alice\x01auth=Bearer " + secret + b"\x01\x01"),
                  base64.b64encode(secret)[:-2]]
    return forms


class DebugLogTests(EndToEndTestCase):
    """error_log ... debug: the phases, each command's name and reply code
    on both sides, so that a login can be followed; no password, token or
    literal, in any form."""

    def debug_proxy(self, protocol: str, backend_port: int, level: str = "debug",
                    **mail) -> ProxyUnderTest:
        users = {"alice": "{PLAIN}" + DEBUG_SECRET.decode()}
        return self.use(ProxyUnderTest(proxy_config(protocol, backend_port, users=users, **mail),
                                       log_level=level))

    def debug_lines(self, proxy: ProxyUnderTest) -> List[str]:
        return [line.split(": ", 1)[1] for line in proxy.log.splitlines() if "[debug]" in line]

    def assertLogged(self, proxy: ProxyUnderTest, *messages: str) -> None:
        """Each message starts a [debug] line, in this order."""
        lines, at = self.debug_lines(proxy), 0
        for message in messages:
            for index in range(at, len(lines)):
                if lines[index].startswith("*1 " + message):
                    at = index + 1
                    break
            else:
                self.fail("no [debug] line %r (in order) in:\n%s" % (message, proxy.log))

    def assertNoSecret(self, proxy: ProxyUnderTest, *secrets: bytes) -> None:
        log = proxy.log_file.getvalue()
        for form in secret_forms(*secrets):
            self.assertNotIn(form, log, "a secret in the log:\n%s" % proxy.log)

    def imap_session(self, proxy: ProxyUnderTest, backend: "FakeBackend") -> None:
        """CAPABILITY, an invalid command holding a literal, a wrong password,
        then LOGIN with the password as a literal, and LOGOUT."""
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a0 CAPABILITY")
        client.expect(rb"^\* CAPABILITY ")
        client.expect(rb"^a0 OK")
        client.send(b"a1 FOOBAR {%d+}\r\n%s\r\n" % (len(DEBUG_LITERAL), DEBUG_LITERAL))
        client.expect(rb"^a1 BAD")
        client.send(b"a2 LOGIN alice " + DEBUG_SECRET[::-1] + b"\r\n")
        client.expect(rb"^a2 NO")
        client.send(b"a3 LOGIN alice {%d}\r\n" % len(DEBUG_SECRET))
        client.expect(rb"^\+ ")
        client.send(DEBUG_SECRET + b"\r\n")
        client.expect(rb"^a3 OK")
        client.send("a4 LOGOUT")
        client.read_until_closed()
        proxy.wait_for_log(r"session done")

    def test_imap_login_is_followed_on_both_sides(self):
        backend = self.use(FakeImapBackend(accept=((b"alice", DEBUG_SECRET),)))
        proxy = self.debug_proxy("imap", backend.port, auth_delay="10ms")
        self.imap_session(proxy, backend)
        self.assertLogged(proxy, "mail phase: new -> accepted", "mail phase: accepted -> dialogue",
                          "imap command: CAPABILITY, reply: OK",
                          "imap command: invalid command, reply: BAD",
                          "imap command: LOGIN, waiting for the verdict",
                          "mail phase: dialogue -> auth", "auth verdict: fail",
                          "mail phase: auth -> dialogue", "imap command: LOGIN, reply: NO",
                          "imap command: LOGIN, waiting for the verdict", "auth verdict: ok",
                          "mail phase: auth -> connect", "mail phase: connect -> login",
                          "backend: got OK", "backend: send LOGIN", "backend: got +",
                          "backend: send LOGIN login literal", "backend: got +",
                          "backend: send LOGIN password literal", "backend: got OK",
                          "mail phase: login -> relay",
                          "imap command: LOGIN, reply: OK (the backend's)")
        self.assertIn('login: "alice"', self.debug_lines(proxy)[-1])
        self.assertNoSecret(proxy, DEBUG_SECRET, DEBUG_SECRET[::-1], DEBUG_LITERAL)

    def test_pop3_login_is_followed_on_both_sides(self):
        backend = self.use(FakePop3Backend(accept=((b"alice", DEBUG_SECRET),)))
        proxy = self.debug_proxy("pop3", backend.port)
        client = self.connect(proxy)
        client.expect_line(mp.POP3_GREETING)
        client.send("USER alice")
        client.expect_line(mp.POP3_OK)
        client.send(b"PASS " + DEBUG_SECRET + b"\r\n")
        client.expect(rb"^\+OK alice has 1 message\r\n$")
        client.send("QUIT")
        client.read_until_closed()
        proxy.wait_for_log(r"session done")
        self.assertLogged(proxy, "mail phase: accepted -> dialogue",
                          "pop3 command: USER, reply: +OK",
                          "pop3 command: PASS, waiting for the verdict",
                          "mail phase: dialogue -> auth", "auth verdict: ok",
                          "backend: got +OK", "backend: send USER", "backend: got +OK",
                          "backend: send PASS", "backend: got +OK", "mail phase: login -> relay",
                          "pop3 command: PASS, reply: +OK (the backend's)")
        self.assertNoSecret(proxy, DEBUG_SECRET)

    def test_smtp_auth_login_is_followed_on_both_sides(self):
        backend = self.use(FakeSmtpBackend(accept=((b"alice", DEBUG_SECRET),)))
        proxy = self.debug_proxy("smtp", backend.port, xclient="off", proxy_smtp_auth="on")
        client = self.connect(proxy)
        self.smtp_hello(client)
        client.send("AUTH LOGIN")
        self.assertEqual(client.read_line(), b"334 " + mp.SASL_USERNAME_PROMPT)
        client.send(base64.b64encode(b"alice") + b"\r\n")
        self.assertEqual(client.read_line(), b"334 " + mp.SASL_PASSWORD_PROMPT)
        client.send(base64.b64encode(DEBUG_SECRET) + b"\r\n")
        self.assertEqual(client.read_line(), mp.SMTP_AUTH_OK)
        self.smtp_quit(client)
        proxy.wait_for_log(r"session done")
        self.assertLogged(proxy, "mail phase: accepted -> dialogue",
                          "smtp command: EHLO, reply: 250", "smtp command: AUTH, reply: 334",
                          "smtp command: SASL login username response, reply: 334",
                          "smtp command: SASL login password response, waiting for the verdict",
                          "mail phase: dialogue -> auth", "auth verdict: ok",
                          "backend: got 220", "backend: send EHLO", "backend: got 250",
                          "backend: send AUTH PLAIN", "backend: got 235",
                          "mail phase: login -> relay",
                          "smtp command: SASL login password response, reply: 235")
        self.assertNoSecret(proxy, DEBUG_SECRET)

    def test_imap_authenticate_plain_and_a_refusing_backend(self):
        backend = self.use(FakeImapBackend(mode="refuse"))
        proxy = self.debug_proxy("imap", backend.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 AUTHENTICATE PLAIN")
        client.expect(rb"^\+ ")
        client.send(base64.b64encode(b"\0alice\0" + DEBUG_SECRET) + b"\r\n")
        client.expect_line(mp.IMAP_INTERNAL_ERROR)
        client.read_until_closed()
        proxy.wait_for_log(r"session done")
        self.assertLogged(proxy, "imap command: AUTHENTICATE, reply: +",
                          "imap command: SASL plain response, waiting for the verdict",
                          "auth verdict: ok", "backend: send LOGIN password literal",
                          "backend: got NO", "imap reply: BAD, then close")
        self.assertNoSecret(proxy, DEBUG_SECRET)

    def test_info_writes_no_debug_line(self):
        backend = self.use(FakeImapBackend(accept=((b"alice", DEBUG_SECRET),)))
        proxy = self.debug_proxy("imap", backend.port, level="info", auth_delay="10ms")
        self.imap_session(proxy, backend)
        self.assertNotIn("[debug]", proxy.log)
        self.assertIn("client logged in", proxy.log)


class DebugNoteTests(unittest.TestCase):
    """The sans-I/O side of the debug log: names and codes only."""

    def test_tokens_never_reach_the_backend_trace(self):
        traced = []
        response = mp.oauth_initial_response("xoauth2", b"alice", DEBUG_TOKEN)
        login = mp.BackendLogin(mp.imap_token_script(b"a1 ", "xoauth2", response),
                                b"a1 ", trace=traced.append)
        login.receive_data(b"* OK ready\r\n")
        self.assertEqual(login.receive_data(b"a1 OK done\r\n"), [mp.LoginDone(b"a1 OK done\r\n")])
        self.assertEqual(traced, ["got OK", "send AUTHENTICATE XOAUTH2", "got OK"])
        for script in (mp.smtp_auth_steps("oauthbearer", b"alice", DEBUG_TOKEN),
                       mp.smtp_auth_steps("login", b"alice", DEBUG_SECRET),
                       mp.pop3_login_script(b"alice", DEBUG_SECRET)):
            for step in script:
                if isinstance(step, mp.Send):
                    self.assertFalse(any(form.decode() in step.name
                                         for form in secret_forms(DEBUG_TOKEN, DEBUG_SECRET)))

    def test_client_token_is_not_in_the_notes(self):
        machine = mp.ImapMachine(server_settings("imap", imap_auth="plain xoauth2"))
        machine.trace = True
        machine.data_to_send()
        response = mp.oauth_initial_response("xoauth2", b"alice", DEBUG_TOKEN)
        events = machine.receive_data(b"a1 AUTHENTICATE XOAUTH2 " + response + b"\r\n")
        self.assertEqual(events[0].password, DEBUG_TOKEN)
        self.assertEqual(machine.debug_notes, [("AUTHENTICATE", "")])
        # An OAuth error challenge comes first: the refusal waits for the client.
        machine.auth_failed(b"a1 NO denied\r\n", b'{"status":"401"}')
        self.assertEqual(machine.debug_notes[1:], [("AUTHENTICATE", "+")])
        machine.receive_data(b"\r\n")
        self.assertEqual(machine.data_to_send()[-14:], b"a1 NO denied\r\n"[-14:])
        self.assertNotIn(DEBUG_TOKEN, repr(machine.debug_notes).encode())

    def test_no_notes_when_the_debug_log_is_off(self):
        machine = mp.Pop3Machine(server_settings("pop3"))
        machine.receive_data(b"USER alice\r\nNOOP\r\nPASS x\r\n")
        self.assertEqual(machine.debug_notes, [])


# -- end to end: the backend refuses XCLIENT ----------------------------------------

class SmtpEndToEndBackendRefusalTests(EndToEndTestCase):
    REFUSAL = b"550-5.7.0 XCLIENT denied\r\n550 5.7.0 Not authorized\r\n"

    def refused(self, **mail):
        backend = self.use(FakeSmtpBackend(xclient_reply=self.REFUSAL))
        proxy = self.start_proxy("smtp", backend.port, **mail)
        client = self.connect(proxy)
        self.smtp_hello(client)
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\nMAIL FROM:<a@b>\r\n")
        return backend, proxy, client

    def test_internal_error(self):
        backend, proxy, client = self.refused()
        self.assertEqual(client.read_line(), mp.SMTP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r'upstream sent invalid response: "550-5\.7\.0 XCLIENT denied\\x0d\\x0a'
                           r'550 5\.7\.0 Not authorized" while reading response from upstream')
        wait_until(lambda: not proxy.sessions(), what="the session to end")
        # Nothing after XCLIENT: not the client's EHLO, not its pipelined MAIL.
        self.assertEqual(bytes(backend.received[0]), b"EHLO mail.test\r\n" + smtp_xclient())

    def test_proxy_pass_error_message(self):
        backend, proxy, client = self.refused(proxy_pass_error_message="on")
        self.assertEqual(client.read_exactly(len(self.REFUSAL)), self.REFUSAL)
        client.expect_closed()
        wait_until(lambda: not proxy.sessions(), what="the session to end")
        self.assertEqual(bytes(backend.received[0]), b"EHLO mail.test\r\n" + smtp_xclient())


# -- end to end: the PROXY header to the backend ------------------------------------

class ProxyProtocolEndToEndOutTests(EndToEndTestCase):
    def test_v1_header_before_the_greeting(self):
        backend = self.use(FakeImapBackend(proxy_header=True))
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, proxy_protocol="on")
        client = self.connect(proxy)
        client_port = client.sock.getsockname()[1]
        self.imap_login(client)
        header = b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (client_port, proxy.port)
        self.assertEqual(backend.headers, [header])
        self.assertEqual(bytes(backend.received[0]), header + IMAP_LOGIN_ON_THE_WIRE)

    def test_v2_header(self):
        backend = self.use(FakeImapBackend(proxy_header=True))
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, proxy_protocol="v2")
        client = self.connect(proxy)
        client_port = client.sock.getsockname()[1]
        self.imap_login(client)
        header = proxy_v2_header("127.0.0.1", client_port, "127.0.0.1", proxy.port)
        self.assertEqual(backend.headers, [header])
        self.assertEqual(bytes(backend.received[0]), header + IMAP_LOGIN_ON_THE_WIRE)
        parsed = mp.parse_proxy_header(header)
        self.assertEqual(parsed.source, ("127.0.0.1", client_port))
        self.assertEqual(parsed.destination, ("127.0.0.1", proxy.port))
        self.assertEqual(parsed.length, len(header))

    def v2_over_tls(self, server_hostname, alpn=None):
        backend = self.use(FakeImapBackend(proxy_header=True))
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, "ssl", proxy_protocol="v2",
                                     ssl_certificate="server.crt", ssl_certificate_key="server.key")
        client = self.tls_connect(proxy, hostname=server_hostname,
                                  context=self.client_context(alpn=alpn))
        client_port = client.sock.getsockname()[1]
        self.imap_login(client)
        header = backend.headers[0]
        parsed = mp.parse_proxy_header(header)
        self.assertEqual(parsed.source, ("127.0.0.1", client_port))
        self.assertEqual(parsed.destination, ("127.0.0.1", proxy.port))
        self.assertEqual(bytes(backend.received[0]), header + IMAP_LOGIN_ON_THE_WIRE)
        self.assertEqual(header[:16], mp.PROXY_V2_SIGNATURE + b"\x21\x11" +
                         struct.pack("!H", len(header) - 16))
        tlvs = parse_tlvs(header[28:])
        ssl_value = tlvs[0x20]
        self.assertEqual(ssl_value[:5], b"\x01\x00\x00\x00\x00")   # PP2_CLIENT_SSL, verified 0
        sub = parse_tlvs(ssl_value[5:])
        self.assertEqual(sub[0x21], client.sock.version().encode())
        self.assertEqual(sub[0x23], client.sock.cipher()[0].encode())
        # The auth request said the same of the TLS.
        self.assertEqual(auth.requests, [auth_request_bytes(after=b"Auth-SSL: on\r\nAuth-SSL-Protocol: " +
                                                            sub[0x21] + b"\r\nAuth-SSL-Cipher: " +
                                                            sub[0x23] + b"\r\n")])
        return tlvs

    def test_v2_header_for_a_tls_client_with_sni_and_alpn(self):
        tlvs = self.v2_over_tls("mail.example.com", alpn=["imap"])
        self.assertEqual(tlvs[0x02], b"mail.example.com")           # AUTHORITY
        self.assertEqual(tlvs[0x01], b"imap")                       # ALPN

    def test_v2_header_for_a_tls_client_without_sni(self):
        tlvs = self.v2_over_tls("127.0.0.1")                        # no SNI for an address
        self.assertNotIn(0x02, tlvs)
        self.assertNotIn(0x01, tlvs)


# ========================================================================== #
# ####                           DNS messages                           #### #
# ========================================================================== #
# The DNS query builder and answer parser: compression, malformed answers,
# CNAME chains, host name checks.  (The resolver is in "Outbound clients".)

class DnsMessageTests(unittest.TestCase):
    def test_query_bytes(self):
        self.assertEqual(mp.dns_query(0x1234, "mail.example", mp.DNS_A),
                         b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
                         b"\x04mail\x07example\x00\x00\x01\x00\x01")
        self.assertEqual(mp.reverse_dns_name("192.0.2.7"), "7.2.0.192.in-addr.arpa")

    def test_compressed_names(self):
        query = mp.dns_query(1, "a.example", mp.DNS_A)
        # The answer's name is a pointer to the question's name (offset 12).
        response = dns_response(query, [dns_record(b"\xc0\x0c", mp.DNS_A, "192.0.2.1")])
        answer = mp.parse_dns_answer(response, 1, "a.example", mp.DNS_A)
        self.assertEqual(mp.dns_values(answer, "a.example", mp.DNS_A), (["192.0.2.1"], 300))

    def test_compression_loops_and_forward_pointers_are_errors(self):
        for name in (b"\xc0\x0c", b"\x01a\xc0\x0e", b"\xc0\xff"):
            data = b"\0" * 12 + name
            with self.assertRaises(mp.DnsError):
                mp.read_dns_name(data, 12)

    def test_malformed_answers(self):
        query = mp.dns_query(1, "a.example", mp.DNS_A)
        good = dns_response(query, [dns_record(b"\xc0\x0c", mp.DNS_A, "192.0.2.1")])
        for bad in (b"", good[:11], good[:-2], good[:-5] + b"\xff" * 5,
                    dns_response(query, [dns_record(b"\xc0\x0c", mp.DNS_A, b"\x01\x02")])):
            with self.assertRaises(mp.DnsError, msg=bad):
                mp.parse_dns_answer(bad, 1, "a.example", mp.DNS_A)

    def test_answers_to_other_questions_are_ignored(self):
        query = mp.dns_query(1, "a.example", mp.DNS_A)
        self.assertIsNone(mp.parse_dns_answer(dns_response(query, qid=2), 1, "a.example", mp.DNS_A))
        self.assertIsNone(mp.parse_dns_answer(query, 1, "a.example", mp.DNS_A))   # not a response
        self.assertIsNone(mp.parse_dns_answer(dns_response(query), 1, "b.example", mp.DNS_A))

    def test_cname_chain(self):
        query = mp.dns_query(1, PTR_127_0_0_1, mp.DNS_PTR)
        response = dns_response(query, [
            dns_record(b"\xc0\x0c", mp.DNS_CNAME, "1.0/24.0.0.127.in-addr.arpa"),
            dns_record(dns_name("1.0/24.0.0.127.in-addr.arpa"), mp.DNS_PTR, "host.example", ttl=60)])
        answer = mp.parse_dns_answer(response, 1, PTR_127_0_0_1, mp.DNS_PTR)
        self.assertEqual(mp.dns_values(answer, PTR_127_0_0_1, mp.DNS_PTR), (["host.example"], 60))

    def test_host_name_check(self):
        self.assertTrue(mp.valid_host_name("mail-1.example.com"))
        for bad in ("", "a b.example", "a\r\nb", "x_y.example", "h\x00", "é.example"):
            self.assertFalse(mp.valid_host_name(bad), bad)

    def test_a_dot_inside_a_dns_label_is_malformed(self):
        # Labels "a." and "b" would join into "a..b", which no query can carry.
        with self.assertRaises(mp.DnsError):
            mp.read_dns_name(b"\0" * 12 + b"\x02a.\x01b\x00", 12)
        for name in ("a..b", ".a.example", "a.example."):
            self.assertFalse(mp.valid_host_name(name), name)


    def test_a_dot_inside_a_label_of_record_data_is_kept_escaped(self):
        # RFC 1035 §5.1 master-file form: a name valid_host_name refuses.
        data = b"\0" * 12 + b"\x03a.b\x02\\x\x00"
        self.assertEqual(mp.read_dns_name(data, 12, escape_dots=True), ("a\\.b.\\\\x", 20))
        query = mp.dns_query(1, PTR_127_0_0_1, mp.DNS_PTR)
        response = dns_response(query, [dns_record(b"\xc0\x0c", mp.DNS_PTR, b"\x03a.b\x07example\x00")])
        answer = mp.parse_dns_answer(response, 1, PTR_127_0_0_1, mp.DNS_PTR)
        name = mp.dns_values(answer, PTR_127_0_0_1, mp.DNS_PTR)[0][0]
        self.assertEqual(name, "a\\.b.example")
        self.assertFalse(mp.valid_host_name(name))

    def test_chain_tells_where_it_stops(self):
        query = mp.dns_query(1, "a.example", mp.DNS_A)
        response = dns_response(query, [dns_record(b"\xc0\x0c", mp.DNS_CNAME, "b.example", ttl=40),
                                        dns_record(dns_name("b.example"), mp.DNS_CNAME, "c.example")])
        answer = mp.parse_dns_answer(response, 1, "a.example", mp.DNS_A)
        self.assertEqual(mp.dns_chain(answer, "a.example", mp.DNS_A),
                         ([], [40, 300], ["b.example", "c.example"]))
        self.assertEqual(mp.dns_values(answer, "a.example", mp.DNS_A), ([], 0))


class DnsLinearWorkTests(LinearWorkTestCase):
    def test_dns_answer_with_many_records(self):
        """A DNS answer comes in one datagram: the work is linear in its size."""
        def run(count):
            query = mp.dns_query(7, "mail.example.test", mp.DNS_A)
            answer = dns_response(query, [dns_record(b"\xc0\x0c", mp.DNS_A, bytes([192, 0, 2, i % 250]))
                                          for i in range(count)])
            for _ in range(20):
                parsed = mp.parse_dns_answer(answer, 7, "mail.example.test", mp.DNS_A)
            self.assertEqual(len(mp.dns_values(parsed, "mail.example.test", mp.DNS_A)[0]), count)
        self.assert_linear(run, 60)


# ========================================================================== #
# ####                            TLS layer                             #### #
# ========================================================================== #
# TlsLayer in memory (two SSLObjects handshaking with each other), the
# context builders, certificate names as OpenSSL prints them; end to end
# (the proxy between TLS clients and fake backends that may speak TLS
# themselves): implicit TLS, STARTTLS with byte-exact capability lists, the
# STARTTLS injection attack (CVE-2011-0411, CVE-2014-3556), client
# certificates and AUTH EXTERNAL, SNI, ALPN, TLS to the backend, bad TLS
# input, certificates with odd names.

def pump(client, server, rounds=10):
    """Carry bytes between two TlsLayers until both are quiet."""
    received = {id(client): b"", id(server): b""}
    for _ in range(rounds):
        moved = False
        for source, target in ((client, server), (server, client)):
            data = source.data_to_send()
            if data:
                moved = True
                received[id(target)] += target.receive_data(data)
        if not moved:
            break
    return received[id(client)], received[id(server)]


class TlsLayerTests(CertificateFiles, unittest.TestCase):
    def pair(self, settings=None, client_context=None, hostname="mail.example.com", alpn=None):
        settings = settings or self.tls_settings()
        server = mp.TlsLayer(mp.server_context(settings), server_side=True, alpn=alpn)
        client = mp.TlsLayer(client_context or self.client_context(), server_side=False,
                             server_hostname=hostname)
        return client, server

    def test_handshake_and_data_in_memory(self):
        client, server = self.pair()
        server.send(mp.IMAP_GREETING)            # queued until the handshake ends
        pump(client, server)
        self.assertEqual((client.state, server.state), (mp.TlsState.OPEN, mp.TlsState.OPEN))
        self.assertTrue(server.just_opened)
        client.send(b"a1 NOOP\r\n")
        to_client, to_server = pump(client, server)
        self.assertEqual(to_server, b"a1 NOOP\r\n")
        server.send(b"x" * 100000)
        to_client, _ = pump(client, server)
        self.assertEqual(len(to_client), 100000)

    def test_close_notify_is_end_of_stream(self):
        client, server = self.pair()
        pump(client, server)
        client.close()
        self.assertEqual(server.receive_data(client.data_to_send()), b"")
        self.assertEqual(server.state, mp.TlsState.CLOSED)

    def test_wrong_name_fails_verification(self):
        client, server = self.pair(hostname="wrong.example")
        with self.assertRaises(mp.TlsError) as caught:
            pump(client, server)
        self.assertIn("certificate verify", str(caught.exception))

    def test_garbage_is_an_error_not_an_exception_of_ssl(self):
        _, server = self.pair()
        with self.assertRaises(mp.TlsError):
            server.receive_data(b"a1 LOGIN alice secret\r\n" * 3)
        self.assertEqual(server.state, mp.TlsState.CLOSED)

    def test_eof_during_handshake(self):
        _, server = self.pair()
        with self.assertRaises(mp.TlsError) as caught:
            server.receive_data(b"")
        self.assertIn("closed", str(caught.exception))

    def test_alpn_rule(self):
        context = self.client_context()
        context.set_alpn_protocols(["http/1.1"])
        client, server = self.pair(client_context=context, alpn="imap")
        with self.assertRaises(mp.TlsError) as caught:
            server.receive_data(client.data_to_send())
        self.assertIn("ALPN", str(caught.exception))
        self.assertEqual(server.data_to_send(), mp.TLS_ALERT_NO_APPLICATION_PROTOCOL)
        context = self.client_context()
        context.set_alpn_protocols(["imap", "http/1.1"])
        client, server = self.pair(client_context=context, alpn="imap")
        pump(client, server)
        self.assertEqual(client.object.selected_alpn_protocol(), "imap")
        client, server = self.pair(alpn="imap")                  # no ALPN offered: fine
        pump(client, server)
        self.assertEqual(server.state, mp.TlsState.OPEN)

    def test_client_hello_alpn_parser(self):
        context = self.client_context()
        context.set_alpn_protocols(["imap", "pop3"])
        hello = mp.TlsLayer(context, server_side=False, server_hostname="x.example").data_to_send()
        self.assertEqual(mp.client_hello_alpn(hello), [b"imap", b"pop3"])
        plain = mp.TlsLayer(self.client_context(), False, "x.example").data_to_send()
        self.assertIsNone(mp.client_hello_alpn(plain))
        for junk in (b"", b"\x16\x03\x01\x00", hello[:40], b"a1 NOOP\r\n" * 10):
            mp.client_hello_alpn(junk)                            # never raises

    def test_client_certificate_facts(self):
        settings = self.tls_settings(ssl_verify_client="optional",
                                     ssl_client_certificate=self.tls_path("ca.crt"))
        client, server = self.pair(settings, self.client_context("client"))
        pump(client, server)
        facts = mp.certificate_facts(server.object)
        self.assertEqual(facts.verify, "SUCCESS")
        self.assertEqual(facts.subject, "emailAddress=alice@example.com,CN=alice")
        self.assertEqual(facts.issuer, "CN=mailproxy test CA")
        der = mp.ssl.PEM_cert_to_DER_cert(TLS_CLIENT_CERT_PEM)
        self.assertEqual(facts.fingerprint, hashlib.sha1(der).hexdigest())
        self.assertIn("alice@example.com", facts.identities)
        client, server = self.pair(settings)                     # no certificate sent
        pump(client, server)
        self.assertEqual(mp.certificate_facts(server.object).verify, "NONE")

    def test_a_failing_certificate_completes_the_handshake_and_reads_as_failed(self):
        if not mp.LibSsl.probe().available:
            self.skipTest("libssl not reachable: " + mp.LibSsl.probe().reason)
        settings = self.tls_settings(ssl_verify_client="on", ssl_client_certificate=self.tls_path("ca.crt"))
        client, server = self.pair(settings, self.client_context("expired"))
        pump(client, server)
        self.assertEqual((client.state, server.state), (mp.TlsState.OPEN, mp.TlsState.OPEN))
        facts = mp.certificate_facts(server.object)
        self.assertEqual((facts.verify, facts.verify_code), ("FAILED:certificate has expired", 10))
        self.assertEqual(facts.subject, "CN=alice")
        self.assertEqual(mp.certificate_verdict("on", facts),
                         ("client SSL certificate verify error: (10:certificate has expired)",
                          "certificate error"))
        self.assertEqual(mp.certificate_verdict("optional_no_ca", facts)[1], "certificate error")
        unknown = facts._replace(verify="FAILED:unable to verify the first certificate", verify_code=21)
        self.assertEqual(mp.certificate_verdict("optional_no_ca", unknown), ("", ""))
        self.assertEqual(mp.certificate_verdict("optional", unknown)[1], "certificate error")

    def test_without_libssl_a_failing_certificate_ends_the_handshake(self):
        """The fallback -t warns of: at least as strict as nginx."""
        saved = mp.LibSsl._probed
        mp.LibSsl._probed = mp.LibSsl()
        mp.LibSsl._probed.reason = "a test's stand-in"
        try:
            settings = self.tls_settings(ssl_verify_client="optional_no_ca")
            client, server = self.pair(settings, self.client_context("wrongclient"))
            with self.assertRaises(mp.TlsError) as caught:
                pump(client, server)
                pump(client, server)
        finally:
            mp.LibSsl._probed = saved
        self.assertIn("certificate", str(caught.exception))

    def test_sni_picks_the_certificate(self):
        settings = self.tls_settings(ssl_sni_certificate=[mp.SniCertificate(
            "*.example.net", self.tls_path("other.crt"), self.tls_path("other.key"))])
        context = mp.server_context(settings)
        mp.add_sni_certificates(context, settings)
        for name, expected in (("mail.example.net", "mail.example.net"),
                               ("mail.example.com", "mail.example.com")):
            server = mp.TlsLayer(context, server_side=True)
            client = mp.TlsLayer(self.client_context(), False, server_hostname=name)
            pump(client, server)
            subject = dict(rdn[0] for rdn in client.object.getpeercert()["subject"])
            self.assertEqual(subject["commonName"], expected)

    def test_rfc2253_escaping(self):
        name = der_name([("CN", UTF8, b'a,b+c"d')], [("O", UTF8, b" lead")])
        self.assertEqual(mp.rfc2253_name(name), 'O=\\ lead,CN=a\\,b\\+c\\"d')

    def test_an_alpn_name_cannot_write_a_log_line(self):
        context = self.client_context()
        context.set_alpn_protocols(["x\n2026/11/21 00:00:00 [emerg] FORGED"])
        server = mp.TlsLayer(mp.server_context(self.tls_settings()), server_side=True, alpn="imap")
        client = mp.TlsLayer(context, server_side=False, server_hostname="mail.example.com")
        with self.assertRaises(mp.TlsError) as caught:
            server.receive_data(client.data_to_send())
        self.assertNotIn("\n", str(caught.exception))
        self.assertIn("\\x0a", str(caught.exception))

    def test_a_client_hello_too_big_to_read_is_refused(self):
        """Held back to read its ALPN, a ClientHello stops at TLS_HELLO_MAX
        bytes: it is refused with an alert, not passed on unread (its ALPN,
        here without "imap", would then never be checked)."""
        context = self.client_context()
        context.set_alpn_protocols(["pop3"] + ["p%03d" % i + "x" * 95 for i in range(40)])
        client = mp.TlsLayer(context, server_side=False, server_hostname="mail.example.com")
        message = mp.handshake_message(client.data_to_send())
        records = b"".join(b"\x16\x03\x01\x00\x01" + message[i:i + 1] for i in range(len(message)))
        self.assertGreater(len(records), mp.TLS_HELLO_MAX)
        server = mp.TlsLayer(mp.server_context(self.tls_settings()), server_side=True, alpn="imap")
        with self.assertRaises(mp.TlsError) as caught:
            server.receive_data(records[:mp.TLS_HELLO_MAX])
        self.assertIn("ClientHello over", str(caught.exception))
        self.assertEqual(server.data_to_send(), b"\x15\x03\x03\x00\x02\x02\x28")


class TlsConfigurationTests(CertificateFiles, unittest.TestCase):
    def test_protocols_map_to_a_version_range(self):
        context = mp.server_context(self.tls_settings(ssl_protocols=["TLSv1.2"]))
        self.assertEqual(context.maximum_version, mp.ssl.TLSVersion.TLSv1_2)
        with self.assertRaises(mp.ConfigValueError):
            mp.parse_ssl_protocols(["TLSv1", "TLSv1.2"])          # a gap
        with self.assertRaises(mp.ConfigValueError):
            mp.parse_ssl_protocols(["SSLv3"])                    # nothing would be left

    def test_sslv3_in_the_list_loads_and_is_never_offered(self):
        """nginx takes "ssl_protocols TLSv1 SSLv3;" (the nginx wiki's and
        Mastering NGINX's examples) and, built on OpenSSL 3, offers TLSv1
        alone; mailproxy refused it, so --import-nginx stopped there."""
        self.assertEqual(mp.parse_ssl_protocols(["TLSv1", "SSLv3"]), ["SSLv3", "TLSv1"])
        self.assertEqual(mp.parse_ssl_protocols(["SSLv2", "SSLv3", "TLSv1.2", "TLSv1.3"]),
                         ["SSLv2", "SSLv3", "TLSv1.2", "TLSv1.3"])
        context = mp.server_context(self.tls_settings(ssl_protocols=["SSLv3", "TLSv1.2", "TLSv1.3"]))
        self.assertEqual((context.minimum_version, context.maximum_version),
                         (mp.ssl.TLSVersion.TLSv1_2, mp.ssl.TLSVersion.TLSv1_3))

    def test_what_python_cannot_honour_is_refused(self):
        for name, value in (("ssl_conf_command", "Curves X25519"),
                            ("ssl_conf_command", "Options PrioritizeChaCha"),
                            ("ssl_certificate", "data:-----BEGIN"),
                            ("ssl_certificate_compression", "on"), ("proxy_ssl_server_name", "off")):
            with self.assertRaises(mp.ConfigValueError, msg=name) as caught:
                mp.parse_directive("mail", name, value, "/")
            self.assertRegex(str(caught.exception), "Python|cannot", name)

    def test_every_value_nginx_takes_for_the_session_and_verify_directives_loads(self):
        """Issue 16: these were refused, and a refused -t ends a migration."""
        cache = mp.SessionCache
        for name, value, parsed in (
                ("ssl_verify_depth", "2", 2),
                ("ssl_session_cache", "off", cache("off", None)),
                ("ssl_session_cache", "none", cache("none", None)),
                ("ssl_session_cache", "builtin", cache("builtin", None)),
                ("ssl_session_cache", "builtin:1000", cache("builtin", 1000)),
                ("ssl_session_cache", "shared:SSLMAIL:3m", cache("", None, ("SSLMAIL", 3 << 20))),
                ("ssl_session_cache", "builtin:1000 shared:SSL:10m",
                 cache("builtin", 1000, ("SSL", 10 << 20))),
                ("ssl_session_timeout", "10m", 600.0), ("ssl_session_timeout", "1d", 86400.0),
                ("ssl_session_ticket_key", "/x", ["/x"]),
                ("ssl_ecdh_curve", "X25519:prime256v1", "X25519:prime256v1")):
            with self.subTest(name=name, value=value):
                self.assertEqual(mp.parse_directive("mail", name, value, "/"), parsed)
        for value, message in (("shared:SSL:16k", 'session cache "shared:SSL:16k" is too small'),
                               ("builtin:x", 'invalid session cache "builtin:x"'),
                               ("shared:SSL", 'invalid session cache "shared:SSL"')):
            with self.assertRaises(mp.ConfigValueError) as caught:
                mp.parse_directive("mail", "ssl_session_cache", value, "/")
            self.assertEqual(str(caught.exception), message)

    def libssl(self) -> "mp.LibSsl":
        libssl = mp.LibSsl.probe()
        if not libssl.available:
            self.skipTest("libssl not reachable here: " + libssl.reason)
        return libssl

    def test_session_settings_reach_libssl(self):
        """What Python has no setter for is set through the libssl the ssl
        module loaded, and read back from it."""
        libssl = self.libssl()
        cache_mode, cache_size = mp.LibSsl.GET_SESS_CACHE_MODE, mp.LibSsl.GET_SESS_CACHE_SIZE
        context = mp.server_context(self.tls_settings(ssl_session_timeout=86400.0))
        self.assertEqual(libssl.timeout(context), 86400)
        self.assertEqual(libssl.ctrl(context, cache_mode, 0), 0x2 | 0x80 | 0x200)    # nginx's "none"
        self.assertEqual(libssl.ctrl(context, cache_size, 0), 1)
        context = mp.server_context(self.tls_settings(ssl_session_cache=mp.SessionCache("off", None)))
        self.assertEqual(libssl.timeout(context), 300)                    # nginx's 5m, not OpenSSL's
        self.assertEqual(libssl.ctrl(context, cache_mode, 0), 0)
        for value, size in (("builtin:1000", 1000), ("shared:SSLMAIL:3m", 12000), ("builtin", 20480)):
            context = mp.server_context(self.tls_settings(
                ssl_session_cache=mp.parse_ssl_session_cache(value.split())))
            self.assertEqual(libssl.ctrl(context, cache_mode, 0), 0x2, value)
            self.assertEqual(libssl.ctrl(context, cache_size, 0), size, value)
        context = mp.server_context(self.tls_settings(
            ssl_verify_client="on", ssl_verify_depth=2, ssl_client_certificate=self.tls_path("ca.crt")))
        self.assertEqual(libssl.lib.SSL_CTX_get_verify_depth(libssl.handle(context)), 2)

    def test_a_handle_that_is_not_an_ssl_ctx_crashes_only_a_child(self):
        """The check of libssl's handle runs in a child first: were the ssl
        module's context laid out otherwise, that child dies, not mailproxy,
        and libssl is not used."""
        self.libssl()
        saved, handle = mp.LibSsl._probed, mp.LibSsl.__dict__["handle"]
        mp.LibSsl._probed = None
        mp.LibSsl.handle = staticmethod(lambda context: 16)      # unmapped memory
        try:
            libssl = mp.LibSsl.probe()
        finally:
            mp.LibSsl._probed, mp.LibSsl.handle = saved, handle
        self.assertFalse(libssl.available)
        self.assertRegex(libssl.reason, r"^checking libssl's handle killed a child process \(signal \d+\)")

    def test_a_curve_list_is_set_whole(self):
        self.libssl()
        mp.server_context(self.tls_settings(ssl_ecdh_curve="X25519:prime256v1"))
        with self.assertRaises(mp.ConfigValueError) as caught:
            mp.server_context(self.tls_settings(ssl_ecdh_curve="X25519:nosuchcurve"))
        self.assertEqual(caught.exception.directive, "ssl_ecdh_curve")

    def test_a_ticket_key_file_resumes_sessions_across_contexts(self):
        """Two contexts (two starts, or two hosts) with one 80-byte key file:
        a ticket from one resumes on the other; without the file it does not."""
        self.libssl()
        for size, version in ((80, ssl.TLSVersion.TLSv1_3), (48, ssl.TLSVersion.TLSv1_3),
                              (80, ssl.TLSVersion.TLSv1_2)):
            with self.subTest(size=size, version=version):
                key = TempDir(self).write("ticket.key", "k" * size)
                first, second, other = (mp.server_context(self.tls_settings(**keys)) for keys in (
                    dict(ssl_session_ticket_key=[key]), dict(ssl_session_ticket_key=[key]), {}))
                client = self.client_context()
                client.maximum_version = version
                session = memory_handshake(first, client).session
                self.assertTrue(session.has_ticket)
                self.assertTrue(memory_handshake(second, client, session).session_reused)
                self.assertFalse(memory_handshake(other, client, session).session_reused)
        short = TempDir(self).write("short.key", "k" * 47)
        with self.assertRaises(mp.ConfigValueError) as caught:
            mp.server_context(self.tls_settings(ssl_session_ticket_key=[short]))
        self.assertIn('"%s" must be 48 or 80 bytes (it is 47)' % short, str(caught.exception))

    def test_session_tickets_off_sends_no_ticket_as_nginx(self):
        """OP_NO_TICKET, as nginx: no ticket in TLS 1.2.  (TLS 1.3 still
        gets OpenSSL's stateful one, which only the session cache resumes:
        nginx's mail_ssl_session_reuse.t checks that, and failed when it was
        turned off too.)"""
        for tickets, expected in ((True, True), (False, False)):
            client = self.client_context()
            client.maximum_version = ssl.TLSVersion.TLSv1_2
            context = mp.server_context(self.tls_settings(ssl_session_tickets=tickets))
            tls = memory_handshake(context, client)
            self.assertEqual(tls.version(), "TLSv1.2")
            self.assertEqual(tls.session.has_ticket, expected)

    def test_conf_commands_that_map(self):
        commands = mp.parse_ssl_conf_command(["Options", "-SessionTicket,ServerPreference"])
        context = mp.server_context(self.tls_settings(ssl_conf_command=commands))
        self.assertTrue(context.options & mp.ssl.OP_NO_TICKET)
        self.assertTrue(context.options & mp.ssl.OP_CIPHER_SERVER_PREFERENCE)
        commands = mp.parse_ssl_conf_command(["MaxProtocol", "TLSv1.2"])
        self.assertEqual(mp.server_context(self.tls_settings(ssl_conf_command=commands)).maximum_version,
                         mp.ssl.TLSVersion.TLSv1_2)

    def test_bad_files_fail_the_check(self):
        with self.assertRaises(mp.ConfigValueError) as caught:
            mp.server_context(self.tls_settings(ssl_certificate=[self.tls_path("missing.crt")]))
        self.assertIn("missing.crt", str(caught.exception))
        with self.assertRaises(mp.ConfigValueError):
            mp.server_context(self.tls_settings(ssl_certificate_key=[self.tls_path("client.key")]))

    def test_listen_ssl_needs_a_certificate(self):
        problems = mp.check_ssl({"listen": [mp.parse_listen(["127.0.0.1:993", "ssl"])],
                                 "starttls": "off", "ssl_certificate": [], "ssl_certificate_key": [],
                                 "ssl_verify_client": "off", "ssl_client_certificate": None,
                                 "ssl_trusted_certificate": None, "proxy_ssl": False,
                                 "proxy_starttls": False})
        self.assertEqual(problems, [("ssl_certificate", 'no "ssl_certificate" is defined for the '
                                     '"listen ... ssl" directive')])


# DER for names built in the tests: the value tags and the attribute types.
UTF8, PRINTABLE, T61, IA5, UNIVERSAL, BMP, OBJECT_DESCRIPTOR = 0x0C, 0x13, 0x14, 0x16, 0x1C, 0x1E, 0x07
DER_ATTRIBUTES = {"CN": "550403", "O": "55040a", "C": "550406", "DC": "0992268993f22c640119",
                  "1.2.3.4": "2a0304"}


def der_tlv(tag: int, content: bytes) -> bytes:
    if len(content) < 0x80:
        return bytes((tag, len(content))) + content
    return bytes((tag, 0x82)) + len(content).to_bytes(2, "big") + content


def der_name(*rdns) -> bytes:
    """A DER Name; each RDN a list of (attribute, value tag, value bytes)."""
    sets = b""
    for rdn in rdns:
        values = b""
        for attribute, tag, value in rdn:
            values += der_tlv(0x30, der_tlv(0x06, bytes.fromhex(DER_ATTRIBUTES[attribute])) +
                              der_tlv(tag, value))
        sets += der_tlv(0x31, values)
    return der_tlv(0x30, sets)


class CertificateNameTests(unittest.TestCase):
    def test_names_print_as_openssl_prints_them(self):
        # Each expectation is what `openssl x509 -noout -subject -nameopt
        # RFC2253` (OpenSSL 3.0, XN_FLAG_RFC2253, nginx's Auth-SSL-Subject)
        # printed for a certificate with that subject.
        cases = [
            ([[("CN", UTF8, b"alice\r\nAuth-Status: OK")]], r"CN=alice\0D\0AAuth-Status: OK"),
            ([[("CN", UTF8, b"a\x00b\tc\x7fd\x1b")]], r"CN=a\00b\09c\7Fd\1B"),
            ([[("CN", UTF8, "\u00e9\u20ac".encode())]], r"CN=\C3\A9\E2\82\AC"),
            ([[("CN", T61, b"\xe9x\xff")]], r"CN=\C3\A9x\C3\BF"),
            ([[("CN", BMP, "\u00e9\u20acA".encode("utf-16-be"))]], r"CN=\C3\A9\E2\82\ACA"),
            ([[("CN", UNIVERSAL, "\u00e9\U0001f600".encode("utf-32-be"))]], r"CN=\C3\A9\F0\9F\98\80"),
            ([[("CN", IA5, b"\x80\xfe")]], r"CN=\C2\80\C3\BE"),
            ([[("CN", UTF8, b"#a b ")]], r"CN=\#a b\ "),
            ([[("CN", UTF8, b" ")]], r"CN=\ "),
            ([[("CN", UTF8, b"#")]], r"CN=#"),
            ([[("CN", UTF8, b"##")]], r"CN=\##"),
            ([[("CN", UTF8, b",+\"\\<>;=%'")]], r"CN=\,\+\"\\\<\>\;=%'"),
            ([[("CN", UTF8, b"")]], r"CN="),
            ([[("C", PRINTABLE, b"DE")], [("CN", UTF8, b"a"), ("O", UTF8, b"b")]], r"O=b+CN=a,C=DE"),
            ([[("1.2.3.4", UTF8, b"x")]], r"1.2.3.4=#0C0178"),
            ([[("CN", OBJECT_DESCRIPTOR, b"abc")]], r"CN=#0703616263"),
            ([[("DC", IA5, b"example")]], r"DC=example"),
        ]
        for rdns, expected in cases:
            with self.subTest(expected=expected):
                self.assertEqual(mp.rfc2253_name(der_name(*rdns)), expected)
        with self.assertRaises(ValueError):
            mp.rfc2253_name(der_name([("CN", BMP, b"\x00\xe9\x00")]))    # cut in a character

    def test_serials_print_as_openssl_prints_them(self):
        # i2a_ASN1_INTEGER; it breaks a line after 35 bytes, which the
        # request then carries as %0A.
        self.assertEqual(mp.serial_text(b"\x00\x93\xf1"), "93F1")
        self.assertEqual(mp.serial_text(b"\x00"), "00")
        self.assertEqual(mp.serial_text(b"\xff"), "-01")
        long_serial = bytes(range(1, 37))
        self.assertEqual(mp.serial_text(long_serial), long_serial[:35].hex().upper() + "\\\n24")
        request = auth_request(tls=REQUEST_TLS, certificate=REQUEST_FACTS._replace(
            serial=mp.serial_text(long_serial)))
        self.assertIn(b"\r\nAuth-SSL-Serial: " + long_serial[:35].hex().upper().encode() + b"\\%0A24\r\n",
                      mp.build_auth_http_request(AUTH_URL, [], request))


class TlsLinearWorkTests(LinearWorkTestCase):
    def test_client_hello_in_tiny_records(self):
        """A ClientHello cut into records of one byte each (RFC 8446 §5.1
        allows it), sent a byte at a time, while its ALPN is read."""
        def run(size):
            context = self.client_context()
            context.set_alpn_protocols(["imap"] + ["p%03d" % i + "x" * 95 for i in range(size // 100)])
            client = mp.TlsLayer(context, server_side=False, server_hostname="mail.example.com")
            message = mp.handshake_message(client.data_to_send())
            records = b"".join(b"\x16\x03\x01\x00\x01" + message[i:i + 1] for i in range(len(message)))
            server = mp.TlsLayer(self.server_context, server_side=True, alpn="imap")
            feed_byte_by_byte(server.receive_data, records)
            self.assertNotEqual(server.data_to_send(), b"", "the server must answer the hello")
        self.server_context = mp.server_context(self.tls_settings())
        self.assert_linear(run, 600)


# -- end to end: TLS from the first byte --------------------------------------------

# ~100 KB of text lines: crosses several TLS records, and survives imaplib's
# and smtplib's line-ending rewrites and poplib's dot handling unchanged.
TLS_MESSAGE = b"".join(b"Line %04d of a message that crosses TLS records.\r\n" % i
                       for i in range(2000))
TLS_IMAP_LOGIN_RE = rb"^[A-Z]+\d+ LOGIN \{5\}\r\nalice \{6\}\r\nsecret\r\n"   # imaplib's tags


class TlsEndToEndImplicitTests(EndToEndTestCase):
    """``listen ... ssl`` with the standard library's clients, which check
    the certificate against the test CA and the host name (127.0.0.1, an
    IP SAN of server.crt)."""

    def test_imap4_ssl_login_fetch_and_append(self):
        backend = self.use(FakeImapBackend(message=TLS_MESSAGE))
        proxy = self.tls_proxy("imap", backend.port)
        imap = TlsImap4Ssl("127.0.0.1", proxy.port, ssl_context=self.client_context())
        self.addCleanup(tls_quietly, imap.shutdown)
        self.assertEqual(imap.welcome, mp.IMAP_GREETING.rstrip(b"\r\n"))
        self.assertEqual(imap.sock.version()[:4], "TLSv")
        self.assertEqual(imap.login("alice", "secret"), ("OK", [b"LOGIN completed"]))
        imap.state = "SELECTED"          # the fake has no SELECT; FETCH needs none
        typ, data = imap.fetch("1", "BODY[]")
        self.assertEqual(typ, "OK")
        self.assertSameBytes(data[0][1], TLS_MESSAGE, "FETCH through the proxy's TLS")
        typ, data = imap.append("INBOX", None, None, TLS_MESSAGE)
        self.assertEqual(data, [b"APPEND completed, sha256 " + sha256_hex(TLS_MESSAGE).encode()])
        self.assertEqual(imap.logout()[0], "BYE")
        # The backend, behind the proxy, gets the login in clear.
        self.assertRegex(bytes(backend.received[0]), TLS_IMAP_LOGIN_RE)
        proxy.wait_for_log(r"\[info\] .*\*1 client logged in")

    def test_pop3_ssl_login_and_retr(self):
        backend = self.use(FakePop3Backend(message=TLS_MESSAGE))
        proxy = self.tls_proxy("pop3", backend.port)
        pop = poplib.POP3_SSL("127.0.0.1", proxy.port, context=self.client_context(),
                              timeout=TLS_CLIENT_TIMEOUT)
        self.addCleanup(tls_quietly, pop.close)
        self.assertEqual(pop.getwelcome(), mp.POP3_GREETING.rstrip(b"\r\n"))
        self.assertEqual(pop.user("alice"), b"+OK")
        self.assertEqual(pop.pass_("secret"), b"+OK alice has 1 message")
        self.assertEqual(pop.stat(), (1, len(TLS_MESSAGE)))
        response, lines, _ = pop.retr(1)
        self.assertEqual(response, b"+OK %d octets" % len(TLS_MESSAGE))
        self.assertSameBytes(b"".join(line + b"\r\n" for line in lines), TLS_MESSAGE + b"\r\n",
                             "RETR through the proxy's TLS")
        self.assertEqual(pop.quit(), b"+OK bye")
        self.assertTrue(bytes(backend.received[0]).startswith(POP3_LOGIN_ON_THE_WIRE))

    def test_smtp_ssl_login_and_sendmail(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.tls_proxy("smtp", backend.port)
        smtp = smtplib.SMTP_SSL("127.0.0.1", proxy.port, local_hostname="client.test",
                                timeout=TLS_CLIENT_TIMEOUT, context=self.client_context())
        self.addCleanup(tls_quietly, smtp.close)
        self.assertEqual(smtp.ehlo(), (250, b"mail.test\nAUTH PLAIN LOGIN"))
        self.assertEqual(smtp.login("alice", "secret"), (235, b"2.0.0 OK"))
        smtp.sendmail("alice@example.com", ["bob@example.com"], TLS_MESSAGE)
        self.assertEqual(smtp.quit()[0], 221)
        self.assertEqual(backend.lines(False), b"EHLO mail.test\r\n"
                         b"XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]\r\n"
                         b"EHLO client.test\r\n" + SMTPLIB_MAIL_ALICE +   # smtplib
                         SMTPLIB_RCPT_BOB + b"data\r\nquit\r\n")
        self.assertSameBytes(backend.messages[0], smtp_dot_stuffed(TLS_MESSAGE),
                             "DATA through the proxy's TLS")

    def test_a_tls_port_offers_no_starttls(self):
        """starttls = on and listen ... ssl: the TLS port neither lists nor
        takes STARTTLS (it is on TLS already)."""
        backend = self.use(FakeImapBackend())
        proxy = self.tls_proxy("imap", backend.port, starttls="on")
        client = self.tls_connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 CAPABILITY")
        self.assertEqual(client.read_line(), b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\n")
        client.expect_line(b"a1 " + mp.IMAP_OK)
        client.send("a2 STARTTLS")
        client.expect_line(b"a2 " + mp.IMAP_INVALID)
        client.send("a3 LOGIN alice secret")
        client.expect(rb"^a3 OK LOGIN completed\r\n$")


# -- end to end: STARTTLS -----------------------------------------------------------

TLS_POP3_CAPA = b"+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\nSASL PLAIN LOGIN\r\n.\r\n"


class TlsEndToEndStartTlsTests(EndToEndTestCase):
    """STARTTLS / STLS with starttls on and only: nginx's capability lists,
    byte for byte, before and after TLS (read raw, the "after" part through
    an ssl-wrapped socket); logins refused before TLS with "only"; a second
    STARTTLS refused; then the stdlib clients end to end."""

    def read_capa(self, client: Client) -> bytes:
        lines = [client.read_line()]
        while lines[-1] != b".\r\n":
            lines.append(client.read_line())
        return b"".join(lines)

    # -- IMAP ------------------------------------------------------------------
    def test_imap_starttls_on(self):
        backend = self.use(FakeImapBackend())
        proxy = self.tls_proxy("imap", backend.port, listens=("",), starttls="on")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 CAPABILITY")
        self.assertEqual(client.read_line(),
                         b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN STARTTLS\r\n")
        client.expect_line(b"a1 " + mp.IMAP_OK)
        client.send("a2 STARTTLS")
        client.expect_line(b"a2 " + mp.IMAP_OK)
        client.start_tls(self.client_context())
        client.send("a3 CAPABILITY")                    # no second greeting comes first
        self.assertEqual(client.read_line(), IMAP_PROXY_CAPABILITY)
        client.expect_line(b"a3 " + mp.IMAP_OK)
        client.send("a4 STARTTLS")
        client.expect_line(b"a4 " + mp.IMAP_INVALID)
        client.send("a5 LOGIN alice secret")
        client.expect(rb"^a5 OK LOGIN completed\r\n$")
        self.assertEqual(bytes(backend.received[0]), b"a5 LOGIN {5}\r\nalice {6}\r\nsecret\r\n")
        proxy.wait_for_log(r"\*1 client logged in while reading response from upstream, "
                           r"client: 127\.0\.0\.1 using starttls, ")

    def test_imap_starttls_only(self):
        backend = self.use(FakeImapBackend())
        proxy = self.tls_proxy("imap", backend.port, listens=("",), starttls="only")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 CAPABILITY")
        self.assertEqual(client.read_line(),
                         b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS STARTTLS LOGINDISABLED\r\n")
        client.expect_line(b"a1 " + mp.IMAP_OK)
        client.send("a2 LOGIN alice secret")
        client.expect_line(b"a2 " + mp.IMAP_INVALID)
        client.send(b"a3 AUTHENTICATE PLAIN " + PLAIN_ALICE + b"\r\n")
        client.expect_line(b"a3 " + mp.IMAP_INVALID)
        client.send("a4 AUTHENTICATE PLAIN")            # no "+ " prompt either
        client.expect_line(b"a4 " + mp.IMAP_INVALID)
        client.send("a5 STARTTLS")
        client.expect_line(b"a5 " + mp.IMAP_OK)
        client.start_tls(self.client_context())
        client.send("a6 CAPABILITY")
        self.assertEqual(client.read_line(), IMAP_PROXY_CAPABILITY)
        client.expect_line(b"a6 " + mp.IMAP_OK)
        client.send("a7 STARTTLS")
        client.expect_line(b"a7 " + mp.IMAP_INVALID)
        client.send(b"a8 AUTHENTICATE PLAIN " + PLAIN_ALICE + b"\r\n")
        client.expect(rb"^a8 OK LOGIN completed\r\n$")
        self.assertEqual(bytes(backend.received[0]), b"a8 LOGIN {5}\r\nalice {6}\r\nsecret\r\n")

    def test_imaplib_starttls(self):
        for mode in ("on", "only"):
            with self.subTest(starttls=mode):
                backend = self.use(FakeImapBackend())
                proxy = self.tls_proxy("imap", backend.port, listens=("",), starttls=mode)
                imap = TlsImap4("127.0.0.1", proxy.port)
                self.addCleanup(tls_quietly, imap.shutdown)
                self.assertIn("STARTTLS", imap.capabilities)
                self.assertEqual(imap.starttls(ssl_context=self.client_context())[0], "OK")
                self.assertEqual(imap.capabilities, ("IMAP4", "IMAP4REV1", "UIDPLUS", "AUTH=PLAIN"))
                self.assertEqual(imap.login("alice", "secret"), ("OK", [b"LOGIN completed"]))
                self.assertEqual(imap.noop(), ("OK", [b"NOOP completed"]))
                self.assertEqual(imap.logout()[0], "BYE")
                self.assertRegex(bytes(backend.received[0]), TLS_IMAP_LOGIN_RE)

    # -- POP3 ------------------------------------------------------------------
    def test_pop3_stls_on(self):
        backend = self.use(FakePop3Backend())
        proxy = self.tls_proxy("pop3", backend.port, listens=("",), starttls="on")
        client = self.connect(proxy)
        client.expect_line(mp.POP3_GREETING)
        client.send("CAPA")
        self.assertEqual(self.read_capa(client), TLS_POP3_CAPA[:-3] + b"STLS\r\n.\r\n")
        client.send("STLS")
        client.expect_line(mp.POP3_OK)
        client.start_tls(self.client_context())
        client.send("CAPA")
        self.assertEqual(self.read_capa(client), TLS_POP3_CAPA)
        client.send("STLS")
        client.expect_line(mp.POP3_INVALID)
        self.pop3_login_after_greeting(client)
        self.assertEqual(bytes(backend.received[0]), POP3_LOGIN_ON_THE_WIRE)

    def test_pop3_stls_only(self):
        backend = self.use(FakePop3Backend())
        proxy = self.tls_proxy("pop3", backend.port, listens=("",), starttls="only",
                               pop3_auth="plain apop")
        client = self.connect(proxy)
        client.expect(rb"^\+OK POP3 ready <[0-9]+\.[0-9]+@mail\.test>\r\n$")
        client.send("CAPA")
        self.assertEqual(self.read_capa(client),
                         b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nSTLS\r\n.\r\n")
        for command in ("USER alice", "AUTH PLAIN " + PLAIN_ALICE.decode(), "AUTH",
                        "APOP alice 0123456789abcdef0123456789abcdef"):
            client.send(command)
            client.expect_line(mp.POP3_INVALID)
        client.send("STLS")
        client.expect_line(mp.POP3_OK)
        client.start_tls(self.client_context())
        client.send("CAPA")
        self.assertEqual(self.read_capa(client), TLS_POP3_CAPA)
        client.send("STLS")
        client.expect_line(mp.POP3_INVALID)
        self.pop3_login_after_greeting(client)

    def pop3_login_after_greeting(self, client: Client) -> None:
        client.send("USER alice")
        client.expect_line(mp.POP3_OK)
        client.send("PASS secret")
        client.expect(rb"^\+OK alice has 1 message\r\n$")

    def test_poplib_stls(self):
        for mode in ("on", "only"):
            with self.subTest(starttls=mode):
                backend = self.use(FakePop3Backend())
                proxy = self.tls_proxy("pop3", backend.port, listens=("",), starttls=mode)
                pop = poplib.POP3("127.0.0.1", proxy.port, timeout=TLS_CLIENT_TIMEOUT)
                self.addCleanup(tls_quietly, pop.close)
                self.assertEqual(pop.stls(context=self.client_context()), b"+OK")
                self.assertNotIn("STLS", pop.capa())
                self.assertEqual(pop.user("alice"), b"+OK")
                self.assertEqual(pop.pass_("secret"), b"+OK alice has 1 message")
                self.assertEqual(pop.stat(), (1, 7))
                self.assertEqual(pop.quit(), b"+OK bye")
                self.assertTrue(bytes(backend.received[0]).startswith(POP3_LOGIN_ON_THE_WIRE))

    # -- SMTP ------------------------------------------------------------------
    def test_smtp_starttls_on(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.tls_proxy("smtp", backend.port, listens=("",), starttls="on")
        client = self.connect(proxy)
        client.expect(rb"^220 mail\.test ESMTP ready\r\n$")
        client.send("EHLO client.test")
        self.assertEqual(client.reply(), b"250-mail.test\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n")
        client.send("STARTTLS")
        client.expect_line(mp.SMTP_START_TLS)
        client.start_tls(self.client_context())
        client.send("EHLO client.test")
        self.assertEqual(client.reply(), SMTP_PROXY_EHLO)
        client.send("STARTTLS")
        client.expect_line(mp.SMTP_INVALID)
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        client.expect_line(mp.SMTP_AUTH_OK)
        self.assertEqual(backend.lines(False), b"EHLO mail.test\r\n"
                         b"XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]\r\n"
                         b"EHLO client.test\r\n")

    def test_smtp_starttls_only(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.tls_proxy("smtp", backend.port, listens=("",), starttls="only")
        client = self.connect(proxy)
        client.expect(rb"^220 mail\.test ESMTP ready\r\n$")
        client.send("EHLO client.test")
        self.assertEqual(client.reply(), b"250-mail.test\r\n250 STARTTLS\r\n")
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        client.expect_line(mp.SMTP_INVALID)
        client.send("AUTH LOGIN")
        client.expect_line(mp.SMTP_INVALID)
        client.send("STARTTLS")
        client.expect_line(mp.SMTP_START_TLS)
        client.start_tls(self.client_context())
        client.send("EHLO client.test")
        self.assertEqual(client.reply(), SMTP_PROXY_EHLO)
        client.send("STARTTLS")
        client.expect_line(mp.SMTP_INVALID)
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        client.expect_line(mp.SMTP_AUTH_OK)

    def test_smtplib_starttls(self):
        for mode in ("on", "only"):
            with self.subTest(starttls=mode):
                backend = self.use(FakeSmtpBackend())
                proxy = self.tls_proxy("smtp", backend.port, listens=("",), starttls=mode)
                smtp = smtplib.SMTP("127.0.0.1", proxy.port, local_hostname="client.test",
                                    timeout=TLS_CLIENT_TIMEOUT)
                self.addCleanup(tls_quietly, smtp.close)
                self.assertEqual(smtp.starttls(context=self.client_context())[0], 220)
                self.assertEqual(smtp.ehlo(), (250, b"mail.test\nAUTH PLAIN LOGIN"))
                self.assertEqual(smtp.login("alice", "secret"), (235, b"2.0.0 OK"))
                smtp.sendmail("alice@example.com", ["bob@example.com"], b"Subject: hi\r\n\r\nhi\r\n")
                self.assertEqual(smtp.quit()[0], 221)
                self.assertEqual(backend.messages, [b"Subject: hi\r\n\r\nhi\r\n.\r\n"])


# -- end to end: commands injected before TLS ---------------------------------------

class TlsEndToEndInjectionTests(EndToEndTestCase):
    """CVE-2011-0411 / CVE-2014-3556: a man in the middle appends a command
    to the client's STARTTLS, in the same packet.  It is plaintext, so it
    must be thrown away, never answered (the next reply after the handshake
    is the NOOP's) and never acted on (no backend login)."""

    def test_imap_login_after_starttls(self):
        backend = self.use(FakeImapBackend())
        proxy = self.tls_proxy("imap", backend.port, listens=("",), starttls="on")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send(b"a1 STARTTLS\r\na2 LOGIN alice secret\r\n")
        client.expect_line(b"a1 " + mp.IMAP_OK)
        client.start_tls(self.client_context())    # fails if a2 got a plaintext reply
        client.send("a3 NOOP")
        client.expect_line(b"a3 " + mp.IMAP_OK)
        self.assertEqual(backend.received, [], "the injected LOGIN reached the backend")
        client.send("a4 LOGIN alice secret")
        client.expect(rb"^a4 OK LOGIN completed\r\n$")
        self.assertEqual(bytes(backend.received[0]), b"a4 LOGIN {5}\r\nalice {6}\r\nsecret\r\n")

    def test_pop3_user_after_stls(self):
        backend = self.use(FakePop3Backend())
        proxy = self.tls_proxy("pop3", backend.port, listens=("",), starttls="on")
        client = self.connect(proxy)
        client.expect_line(mp.POP3_GREETING)
        client.send(b"STLS\r\nUSER alice\r\n")
        client.expect_line(mp.POP3_OK)
        client.start_tls(self.client_context())
        client.send("NOOP")
        client.expect_line(mp.POP3_OK)
        client.send("PASS secret")                      # the USER was forgotten
        client.expect_line(mp.POP3_INVALID)
        self.assertEqual(backend.received, [])
        client.send("USER alice")
        client.expect_line(mp.POP3_OK)
        client.send("PASS secret")
        client.expect(rb"^\+OK alice has 1 message\r\n$")
        self.assertEqual(bytes(backend.received[0]), POP3_LOGIN_ON_THE_WIRE)

    def test_smtp_mail_after_starttls(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.tls_proxy("smtp", backend.port, listens=("",), starttls="on",
                               smtp_auth="none", smtp_relay_domains="example.com")
        client = self.connect(proxy)
        client.expect(rb"^220 mail\.test ESMTP ready\r\n$")
        client.send(b"STARTTLS\r\nMAIL FROM:<x@y>\r\n")
        client.expect_line(mp.SMTP_START_TLS)
        client.start_tls(self.client_context())
        client.send("NOOP")
        client.expect_line(mp.SMTP_OK)
        client.send("RCPT TO:<bob@example.com>")        # the MAIL was forgotten
        client.expect_line(mp.SMTP_BAD_SEQUENCE)
        self.assertEqual(backend.received, [])
        client.send("EHLO client.test")
        client.reply()
        client.send("MAIL FROM:<alice@example.com>")
        client.expect_line(mp.SMTP_OK)
        client.send("RCPT TO:<bob@example.com>")
        client.expect_line(SMTP_BACKEND_RCPT_OK)         # the backend's, relayed
        self.assertEqual(backend.lines(False), b"EHLO mail.test\r\n"
                         b"XCLIENT ADDR=127.0.0.1 NAME=[UNAVAILABLE]\r\n"
                         b"EHLO client.test\r\nMAIL FROM:<alice@example.com>\r\n"
                         b"RCPT TO:<bob@example.com>\r\n")

    def test_smtp_auth_after_starttls(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.tls_proxy("smtp", backend.port, listens=("",), starttls="on")
        client = self.connect(proxy)
        client.expect(rb"^220 mail\.test ESMTP ready\r\n$")
        client.send(b"EHLO client.test\r\nSTARTTLS\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        client.reply()
        client.expect_line(mp.SMTP_START_TLS)
        client.start_tls(self.client_context())
        client.send("NOOP")
        client.expect_line(mp.SMTP_OK)
        self.assertEqual(backend.received, [], "the injected AUTH reached the backend")
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        client.expect_line(mp.SMTP_AUTH_OK)
        # RFC 3207 §4.2: the EHLO before TLS is forgotten, so none is replayed.
        self.assertEqual(backend.lines(False), b"EHLO mail.test\r\n"
                         b"XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]\r\n")


# -- end to end: client certificates ------------------------------------------------

class TlsEndToEndClientCertificateTests(EndToEndTestCase):
    """ssl_verify_client, ssl_client_certificate and ssl_crl, as nginx: the
    handshake completes whatever certificate the client sends (libssl's
    verify callback lets every error pass); then a certificate that failed
    verification gets the protocol's "SSL certificate error", a missing one
    under ``on`` its "No required SSL certificate", and the connection is
    closed.  optional_no_ca lets an unknown issuer through to auth_http as
    "Auth-SSL-Verify: FAILED:reason".  Without libssl a failing certificate
    ends the handshake instead (TlsLayerTests)."""

    def setUp(self):
        super().setUp()
        if not mp.LibSsl.probe().available:
            self.skipTest("libssl not reachable: " + mp.LibSsl.probe().reason)

    def verifying_proxy(self, protocol: str, backend_port: int, mode: str = "on", **mail):
        return self.tls_proxy(protocol, backend_port, ssl_verify_client=mode,
                              ssl_client_certificate=self.tls_path("ca.crt"), **mail)

    def test_no_certificate_gets_the_protocols_line_and_is_closed(self):
        for protocol, line in (("imap", mp.IMAP_NO_CERT),
                               ("pop3", mp.POP3_NO_CERT),
                               ("smtp", mp.SMTP_NO_CERT)):
            with self.subTest(protocol=protocol):
                proxy = self.verifying_proxy(protocol, free_port())
                client = self.tls_connect(proxy)
                self.assertEqual(client.read_line(), line)
                client.expect_closed()
                proxy.wait_for_log(r"\[info\] .*\*1 client sent no required SSL certificate "
                                   r"while SSL handshaking")
                proxy.wait_for_log(r"\*1 session done: no client certificate")

    def test_no_certificate_after_starttls(self):
        proxy = self.verifying_proxy("imap", free_port(), listens=("",), starttls="on")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 STARTTLS")
        client.expect_line(b"a1 " + mp.IMAP_OK)
        client.start_tls(self.client_context())
        self.assertEqual(client.read_line(), mp.IMAP_NO_CERT)
        client.expect_closed()

    def test_a_valid_certificate_gets_the_greeting(self):
        backend = self.use(FakeImapBackend())
        proxy = self.verifying_proxy("imap", backend.port, ssl_crl=self.tls_path("ca.crl"))
        client = self.tls_connect(proxy, certificate="client")
        self.imap_login(client)
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)

    def test_a_certificate_that_fails_verification_gets_the_protocols_line(self):
        for protocol, line in (("imap", b"* BYE SSL certificate error\r\n"),
                               ("pop3", b"-ERR SSL certificate error\r\n"),
                               ("smtp", b"421 4.7.1 SSL certificate error\r\n")):
            with self.subTest(protocol=protocol):
                proxy = self.verifying_proxy(protocol, free_port())
                client = self.tls_connect(proxy, certificate="wrongclient")
                self.assertEqual(client.read_line(), line)
                client.expect_closed()
                # nginx's words too: its callback, like this one, lets the
                # verification run on past error 20 to the leaf's own.
                proxy.wait_for_log(r"\[info\] .*\*1 client SSL certificate verify error: \(21:unable "
                                   r"to verify the first certificate\) while SSL handshaking, client: ")
                proxy.wait_for_log(r"\*1 session done: certificate error")

    def test_expired_revoked_and_unknown_certificates_are_refused_under_on_and_optional(self):
        cases = (("wrongclient", r"21:unable to verify the first certificate"),
                 ("expired", r"10:certificate has expired"),
                 ("revoked", r"23:certificate revoked"))
        for mode in ("on", "optional"):
            proxy = self.verifying_proxy("imap", free_port(), mode=mode, ssl_crl=self.tls_path("ca.crl"))
            for number, (certificate, reason) in enumerate(cases, 1):
                with self.subTest(mode=mode, certificate=certificate):
                    client = self.tls_connect(proxy, certificate=certificate)
                    self.assertEqual(client.read_line(), mp.IMAP_CERT_ERROR)
                    client.expect_closed()
                    proxy.wait_for_log(r"\*%d client SSL certificate verify error: \(%s\)" % (number, reason))
            client = self.tls_connect(proxy, certificate="client")   # and the proxy goes on
            client.expect_line(mp.IMAP_GREETING)
            proxy.assert_alive()

    def test_after_starttls_a_failed_certificate_gets_the_line(self):
        proxy = self.verifying_proxy("smtp", free_port(), listens=("",), starttls="on")
        client = self.connect(proxy)
        client.read_line()
        client.send("EHLO client.example")
        while not client.read_line().startswith(b"250 "):
            pass
        client.send("STARTTLS")
        client.expect_line(b"220 2.0.0 Start TLS\r\n")
        client.start_tls(self.client_context("expired"))
        self.assertEqual(client.read_line(), mp.SMTP_CERT_ERROR)
        client.expect_closed()

    def test_optional_without_a_certificate_gets_the_greeting(self):
        backend = self.use(FakeImapBackend())
        proxy = self.verifying_proxy("imap", backend.port, mode="optional")
        self.imap_login(self.tls_connect(proxy))
        client = self.tls_connect(proxy, certificate="expired")
        self.assertEqual(client.read_line(), mp.IMAP_CERT_ERROR)

    def test_optional_no_ca_lets_an_unknown_issuer_through_to_auth_http(self):
        # No CA at all (nginx 1.27.2 allows that for optional_no_ca): the
        # auth server judges the certificate from what it is told.
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port), auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, "ssl", ssl_certificate="server.crt",
                                     ssl_certificate_key="server.key", ssl_verify_client="optional_no_ca",
                                     auth_http_pass_client_cert="on")
        der = ssl.PEM_cert_to_DER_cert(TLS_WRONG_CLIENT_CERT_PEM)
        client = self.tls_connect(proxy, certificate="wrongclient")
        self.imap_login(client)
        request = auth.requests[0]
        self.assertIn(b"\r\nAuth-SSL-Verify: FAILED:unable to verify the first certificate\r\n"
                      b"Auth-SSL-Subject: CN=alice\r\nAuth-SSL-Issuer: CN=some other CA\r\n", request)
        self.assertIn(b"\r\nAuth-SSL-Fingerprint: " + hashlib.sha1(der).hexdigest().encode() + b"\r\n",
                      request)
        self.assertIn(b"\r\nAuth-SSL-Cert: -----BEGIN%20CERTIFICATE-----", request)
        client = self.tls_connect(proxy)                     # no certificate: NONE, as nginx
        self.imap_login(client)
        self.assertIn(b"\r\nAuth-SSL-Verify: NONE\r\n", auth.requests[1])
        self.assertNotIn(b"Auth-SSL-Subject", auth.requests[1])

    def test_optional_no_ca_refuses_what_is_more_than_an_unknown_issuer(self):
        backend = self.use(FakeImapBackend())
        proxy = self.verifying_proxy("imap", backend.port, mode="optional_no_ca",
                                     ssl_crl=self.tls_path("ca.crl"))
        for number, (certificate, reason) in enumerate((("expired", "10:certificate has expired"),
                                                        ("revoked", "23:certificate revoked")), 1):
            client = self.tls_connect(proxy, certificate=certificate)
            self.assertEqual(client.read_line(), mp.IMAP_CERT_ERROR)
            client.expect_closed()
            proxy.wait_for_log(r"\*%d client SSL certificate verify error: \(%s\)" % (number, reason))
        self.imap_login(self.tls_connect(proxy, certificate="wrongclient"))   # unknown issuer: in
        self.imap_login(self.tls_connect(proxy, certificate="client"))

    def test_a_refused_certificates_session_is_not_resumed(self):
        # ngx_ssl_remove_cached_session: with tickets off, the session the
        # refused handshake made is dropped from the cache.
        proxy = self.verifying_proxy("imap", free_port(), ssl_session_tickets="off",
                                     ssl_session_cache="builtin", ssl_protocols="TLSv1.2")
        context = self.client_context("expired")
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        first = self.tls_connect(proxy, context=context)
        self.assertEqual(first.read_line(), mp.IMAP_CERT_ERROR)
        session = first.sock.session
        second = self.connect(proxy)
        second.sock = context.wrap_socket(second.sock, server_hostname="localhost", session=session)
        self.assertEqual(second.read_line(), mp.IMAP_CERT_ERROR)
        self.assertFalse(second.sock.session_reused)
        good = self.client_context("client")
        good.maximum_version = ssl.TLSVersion.TLSv1_2
        third = self.tls_connect(proxy, context=good)           # a good one is resumed
        third.expect_line(mp.IMAP_GREETING)
        fourth = self.connect(proxy)
        fourth.sock = good.wrap_socket(fourth.sock, server_hostname="localhost", session=third.sock.session)
        fourth.expect_line(mp.IMAP_GREETING)
        self.assertTrue(fourth.sock.session_reused)


# -- end to end: AUTH EXTERNAL ------------------------------------------------------

TLS_EXTERNAL_USERS = {"alice": "{PLAIN}secret", "alice@example.com": "{PLAIN}secret",
                      "bob": "{PLAIN}secret"}
TLS_EXTERNAL_LOGINS = ((b"alice", b"secret"), (b"alice@example.com", b"secret"), (b"bob", b"secret"))


class TlsEndToEndExternalTests(EndToEndTestCase):
    """AUTHENTICATE EXTERNAL / AUTH EXTERNAL with the built-in table: the
    login must be one the verified client certificate shows (CN alice,
    emailAddress alice@example.com); "=" means the certificate's first; the
    backend is logged in to with the table's {PLAIN} password."""

    def external_proxy(self, protocol: str, backend_port: int, **mail):
        return self.tls_proxy(protocol, backend_port, users=TLS_EXTERNAL_USERS,
                              ssl_verify_client="optional",
                              ssl_client_certificate=self.tls_path("ca.crt"), **mail)

    def test_imap_identity_from_the_certificate(self):
        backend = self.use(FakeImapBackend(accept=TLS_EXTERNAL_LOGINS))
        proxy = self.external_proxy("imap", backend.port, imap_auth="plain external")
        client = self.tls_connect(proxy, certificate="client")
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 CAPABILITY")
        self.assertEqual(client.read_line(),
                         b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN AUTH=EXTERNAL\r\n")
        client.expect_line(b"a1 " + mp.IMAP_OK)
        client.send("a2 AUTHENTICATE EXTERNAL =")
        client.expect(rb"^a2 OK LOGIN completed\r\n$")
        self.assertEqual(bytes(backend.received[0]), b"a2 LOGIN {5}\r\nalice {6}\r\nsecret\r\n")
        proxy.wait_for_log(r'\*1 client logged in .*, login: "alice", ')

    def test_imap_authorization_identity_in_the_certificate(self):
        backend = self.use(FakeImapBackend(accept=TLS_EXTERNAL_LOGINS))
        proxy = self.external_proxy("imap", backend.port, imap_auth="plain external")
        client = self.tls_connect(proxy, certificate="client")
        client.expect_line(mp.IMAP_GREETING)
        client.send(b"a1 AUTHENTICATE EXTERNAL " + base64.b64encode(b"alice@example.com") + b"\r\n")
        client.expect(rb"^a1 OK LOGIN completed\r\n$")
        self.assertEqual(bytes(backend.received[0]),
                         b"a1 LOGIN {17}\r\nalice@example.com {6}\r\nsecret\r\n")
        # Without an initial response: nginx's prompt, then the identity.
        client = self.tls_connect(proxy, certificate="client")
        client.expect_line(mp.IMAP_GREETING)
        client.send("b1 AUTHENTICATE EXTERNAL")
        client.expect_line(b"+ " + mp.SASL_USERNAME_PROMPT)
        # The certificate matches case-insensitively, the [users] key does not.
        client.send(base64.b64encode(b"ALICE@example.com") + b"\r\n")
        client.expect_line(b"b1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        client.send("b2 AUTHENTICATE EXTERNAL")
        client.expect_line(b"+ " + mp.SASL_USERNAME_PROMPT)
        client.send("=")
        client.expect(rb"^b2 OK LOGIN completed\r\n$")
        self.assertEqual(bytes(backend.received[1]), b"b2 LOGIN {5}\r\nalice {6}\r\nsecret\r\n")

    def test_imap_login_not_in_the_certificate_is_refused(self):
        backend = self.use(FakeImapBackend(accept=TLS_EXTERNAL_LOGINS))
        proxy = self.external_proxy("imap", backend.port, imap_auth="plain external")
        client = self.tls_connect(proxy, certificate="client")
        client.expect_line(mp.IMAP_GREETING)
        client.send(b"a1 AUTHENTICATE EXTERNAL " + base64.b64encode(b"bob") + b"\r\n")
        client.expect_line(b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        proxy.wait_for_log(r'\[info\] .*client login failed: "EXTERNAL login does not match the '
                           r'client certificate"')
        client.send("a2 NOOP")                          # the session goes on
        client.expect_line(b"a2 " + mp.IMAP_OK)
        self.assertEqual(backend.received, [])

    def test_imap_without_a_certificate_is_refused(self):
        backend = self.use(FakeImapBackend(accept=TLS_EXTERNAL_LOGINS))
        proxy = self.external_proxy("imap", backend.port, imap_auth="plain external")
        client = self.tls_connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 AUTHENTICATE EXTERNAL =")
        client.expect_line(b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        client.send(b"a2 AUTHENTICATE EXTERNAL " + base64.b64encode(b"alice") + b"\r\n")
        client.expect_line(b"a2 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        proxy.wait_for_log(r'client login failed: "EXTERNAL without a verified client certificate"')
        self.assertEqual(backend.received, [])

    def test_smtp_external(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.external_proxy("smtp", backend.port, smtp_auth="plain external")
        client = self.tls_connect(proxy, certificate="client")
        client.expect(rb"^220 mail\.test ESMTP ready\r\n$")
        client.send("EHLO client.test")
        self.assertEqual(client.reply(), b"250-mail.test\r\n250 AUTH PLAIN EXTERNAL\r\n")
        client.send(b"AUTH EXTERNAL " + base64.b64encode(b"bob") + b"\r\n")
        client.expect_line(b"535 5.7.0 " + mp.AUTH_FAILED_TEXT + b"\r\n")
        client.send(b"AUTH EXTERNAL " + base64.b64encode(b"alice@example.com") + b"\r\n")
        client.expect_line(mp.SMTP_AUTH_OK)
        self.assertEqual(backend.lines(False), b"EHLO mail.test\r\n"
                         b"XCLIENT ADDR=127.0.0.1 LOGIN=alice@example.com NAME=[UNAVAILABLE]\r\n"
                         b"EHLO client.test\r\n")


# -- end to end: SNI, ALPN, protocols, resumption -----------------------------------

class TlsEndToEndSniTests(EndToEndTestCase):
    """Extension ssl_sni_certificate: the certificate by the name asked for."""

    def common_name(self, proxy, hostname: str) -> str:
        client = self.tls_connect(proxy, hostname=hostname)
        client.expect_line(mp.IMAP_GREETING)
        subject = client.sock.getpeercert()["subject"]
        return dict(pair for rdn in subject for pair in rdn)["commonName"]

    def test_the_name_chooses_the_certificate(self):
        proxy = self.tls_proxy("imap", free_port(), ssl_sni_certificate="mail.example.net %s %s" % (
            self.tls_path("other.crt"), self.tls_path("other.key")))
        self.assertEqual(self.common_name(proxy, "mail.example.net"), "mail.example.net")
        self.assertEqual(self.common_name(proxy, "mail.example.com"), "mail.example.com")
        self.assertEqual(self.common_name(proxy, "mail.example.org"), "mail.example.com")
        self.assertEqual(self.common_name(proxy, "localhost"), "mail.example.com")
        self.assertEqual(self.common_name(proxy, "MAIL.Example.NET"), "mail.example.net")

    def test_a_wildcard_entry(self):
        proxy = self.tls_proxy("imap", free_port(), ssl_sni_certificate="*.example.net %s %s" % (
            self.tls_path("other.crt"), self.tls_path("other.key")))
        self.assertEqual(self.common_name(proxy, "mail.example.net"), "mail.example.net")
        self.assertEqual(self.common_name(proxy, "mail.example.com"), "mail.example.com")


class TlsEndToEndAlpnTests(EndToEndTestCase):
    """nginx 1.21.4: a client offering ALPN without the server's protocol
    gets a fatal no_application_protocol alert; no ALPN at all is fine."""

    def test_alpn_without_the_protocol_is_refused(self):
        proxy = self.tls_proxy("imap", free_port())
        error = self.tls_refused(proxy.port, self.client_context(alpn=["http/1.1"]))
        self.assertIn("no application protocol", str(error))
        proxy.wait_for_log(r'\[info\] .*\*1 client offered ALPN http/1\.1 without "imap" '
                           r"while SSL handshaking")
        error = self.tls_refused(proxy.port, self.client_context(alpn=["pop3", "smtp"]))
        self.assertIn("no application protocol", str(error))

    def test_alpn_in_a_fragmented_client_hello_is_refused(self):
        """A ClientHello may span several TLS records (RFC 8446 §5.1);
        nginx's rule sees the whole message (OpenSSL's ALPN callback)."""
        proxy = self.tls_proxy("imap", free_port())
        outgoing = ssl.MemoryBIO()
        tls = self.client_context(alpn=["http/1.1"]).wrap_bio(
            ssl.MemoryBIO(), outgoing, server_hostname="localhost")
        with self.assertRaises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        header, body = hello[:3], hello[5:]
        for at in (len(body), 60):                     # whole, and split after 60 bytes
            records = b"".join(header + len(part).to_bytes(2, "big") + part
                               for part in (body[:at], body[at:]) if part)
            with self.subTest(first_record=at):
                client = self.connect(proxy)
                client.send(records)
                self.assertEqual(client.read_exactly(7), mp.TLS_ALERT_NO_APPLICATION_PROTOCOL,
                                 "no fatal no_application_protocol alert (a ServerHello is 16 03 03)")

    def test_alpn_with_the_protocol_or_none_is_accepted(self):
        proxy = self.tls_proxy("imap", free_port())
        for alpn, selected in ((["imap"], "imap"), (["http/1.1", "imap"], "imap"), (None, None)):
            with self.subTest(alpn=alpn):
                client = self.tls_connect(proxy, context=self.client_context(alpn=alpn))
                client.expect_line(mp.IMAP_GREETING)
                self.assertEqual(client.sock.selected_alpn_protocol(), selected)

    def test_alpn_follows_the_servers_protocol(self):
        proxy = self.tls_proxy("pop3", free_port())
        self.tls_refused(proxy.port, self.client_context(alpn=["imap"]))
        client = self.tls_connect(proxy, context=self.client_context(alpn=["pop3"]))
        client.expect_line(mp.POP3_GREETING)


class TlsEndToEndSettingsTests(EndToEndTestCase):
    def test_ssl_protocols(self):
        for protocols, client_maximum, version in (("TLSv1.3", ssl.TLSVersion.TLSv1_2, None),
                                                   ("TLSv1.3", ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
                                                   ("TLSv1.2", ssl.TLSVersion.TLSv1_3, "TLSv1.2")):
            with self.subTest(ssl_protocols=protocols, client_maximum=client_maximum):
                proxy = self.tls_proxy("imap", free_port(), ssl_protocols=protocols)
                context = self.client_context()
                context.maximum_version = client_maximum
                if version is None:
                    self.tls_refused(proxy.port, context)
                    proxy.wait_for_log(r"\[info\] .*\*1 SSL handshake failed \(\w+\) "
                                       r"while SSL handshaking")
                    continue
                client = self.tls_connect(proxy, context=context)
                client.expect_line(mp.IMAP_GREETING)
                self.assertEqual(client.sock.version(), version)

    def test_a_resumed_session_keeps_the_client_certificate(self):
        """A TLS 1.3 ticket resumes the session; EXTERNAL still sees alice's
        certificate (and ssl_verify_client = on is still satisfied)."""
        backend = self.use(FakeImapBackend(accept=TLS_EXTERNAL_LOGINS))
        proxy = self.tls_proxy("imap", backend.port, users=TLS_EXTERNAL_USERS, ssl_verify_client="on",
                               ssl_client_certificate=self.tls_path("ca.crt"),
                               imap_auth="plain external")
        context = self.client_context("client")
        first = self.tls_connect(proxy, context=context)
        first.expect_line(mp.IMAP_GREETING)          # the ticket came with the greeting
        session = first.sock.session
        self.assertTrue(session.has_ticket)
        first.close()
        client = self.connect(proxy)
        client.start_tls(context, session=session)
        self.assertTrue(client.sock.session_reused)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 AUTHENTICATE EXTERNAL =")
        client.expect(rb"^a1 OK LOGIN completed\r\n$")
        self.assertEqual(bytes(backend.received[0]), b"a1 LOGIN {5}\r\nalice {6}\r\nsecret\r\n")


class TlsNginxDirectivesTests(EndToEndTestCase):
    """Issue 16, item 1: nginx's ssl_* directives as real deployments write
    them (Mailu's mail block) pass -t, with a [warn] at the line of each
    that cannot be honoured exactly, and serve TLS."""

    MAILU = dict(ssl_session_cache="shared:SSLMAIL:3m", ssl_session_timeout="1d",
                 ssl_session_tickets="off", ssl_prefer_server_ciphers="on", ssl_verify_depth="2",
                 ssl_ecdh_curve="X25519:prime256v1")

    def mailu(self, **more) -> dict:
        values = dict(self.MAILU, ssl_dhparam=self.tls_path("dhparam.pem"),
                      ssl_certificate="%s\n    %s" % (self.tls_path("rsa.crt"), self.tls_path("server.crt")),
                      ssl_certificate_key="%s\n    %s" % (self.tls_path("rsa.key"), self.tls_path("server.key")))
        values.update(more)
        return values

    def line_of(self, path: str, directive: str) -> int:
        with open(path) as handle:
            return next(number for number, line in enumerate(handle, 1) if line.startswith(directive + " ="))

    def test_mailus_block_passes_the_check_with_a_warning_at_the_cache(self):
        path = TempDir(self).write("mailproxy.conf", proxy_config("imap", 1143, listens=("ssl",), **self.mailu()))
        status, out, err = run_mailproxy(["-t", "-c", path])
        self.assertEqual(status, 0, err)
        self.assertIn("test is successful", err)
        if mp.LibSsl.probe().available:
            self.assertIn('mailproxy: [warn] %s:%d: [mail] ssl_session_cache: "shared:SSLMAIL": each worker '
                          "process keeps its own cache of 12000 sessions (OpenSSL's built-in cache; Python "
                          "cannot share one between processes), so a session is resumed by another worker "
                          "only through a session ticket, and ssl_session_tickets is off; and no cached session "
                          "outlives a reload, as nginx's shared cache does\n"
                          % (path, self.line_of(path, "ssl_session_cache")), err)
            self.assertEqual(err.count("[warn]"), 1, err)

    def test_mailus_nginx_block_imports_and_passes_the_check(self):
        directory = TempDir(self)
        nginx = directory.write("nginx.conf", """mail {
    server_name mail.example.com;
    auth_http 127.0.0.1:8000/auth/email;
    ssl_session_cache shared:SSLMAIL:3m;
    ssl_session_timeout 1d;
    ssl_session_tickets off;
    ssl_dhparam %(dhparam.pem)s;
    ssl_certificate %(rsa.crt)s;
    ssl_certificate_key %(rsa.key)s;
    ssl_certificate %(server.crt)s;
    ssl_certificate_key %(server.key)s;
    server {
        listen 127.0.0.1:%(port)d ssl;
        protocol imap;
    }
}
""" % dict({name: self.tls_path(name) for name in ("dhparam.pem", "rsa.crt", "rsa.key", "server.crt",
                                                   "server.key")}, port=free_port()))
        status, ini, err = run_mailproxy(["--import-nginx", nginx], timeout=10)
        self.assertEqual(status, 0, err)
        self.assertNotIn("not translated", ini)
        path = directory.write("imported.conf", ini)
        status, out, err = run_mailproxy(["-t", "-c", path], timeout=10)
        self.assertEqual(status, 0, err + "\n" + ini)
        self.assertIn("test is successful", err)

    def test_ticket_keys_warn_of_what_differs(self):
        directory = TempDir(self)
        keys = "%s\n    %s" % (directory.write("48.key", "k" * 48), directory.write("80.key", "k" * 80))
        path = directory.write("mailproxy.conf", proxy_config("imap", 1143, listens=("ssl",), **self.mailu(
            ssl_session_tickets="on", ssl_session_ticket_key=keys)))
        status, out, err = run_mailproxy(["-t", "-c", path])
        self.assertEqual(status, 0, err)
        if mp.LibSsl.probe().available:
            self.assertIn("[warn] %s:%d: [mail] ssl_session_ticket_key: only the first key encrypts and "
                          "decrypts tickets: tickets made with the other keys get a full handshake; a 48-byte "
                          "key (nginx's AES-128 tickets) is stretched" % (path, self.line_of(
                              path, "ssl_session_ticket_key")), err)

    def test_without_libssl_each_directive_warns_at_its_line_and_still_loads(self):
        directory = TempDir(self)
        path = directory.write("mailproxy.conf", proxy_config(
            "imap", 1143, listens=("ssl",), **self.mailu(ssl_session_ticket_key=directory.write("t.key", "k" * 80),
                                                          ssl_session_tickets="on",
                                                          ssl_verify_client="optional_no_ca")))
        saved = mp.LibSsl._probed
        mp.LibSsl._probed = mp.LibSsl()
        mp.LibSsl._probed.reason = "a test's stand-in"
        try:
            config = mp.load_and_prepare(path)
        finally:
            mp.LibSsl._probed = saved
        warnings = {warning.directive: warning for warning in config.warnings}
        self.assertEqual(sorted(warnings), ["ssl_ecdh_curve", "ssl_session_cache", "ssl_session_ticket_key",
                                            "ssl_session_timeout", "ssl_verify_client", "ssl_verify_depth"])
        for directive, text in (("ssl_session_timeout", "sessions last OpenSSL's default time instead"),
                                ("ssl_verify_client", '"optional_no_ca" acts as "optional": a client '
                                 "certificate that does not verify against ssl_client_certificate or "
                                 "ssl_trusted_certificate ends the TLS handshake, where nginx lets it through"),
                                ("ssl_verify_depth", "default depth (100)"),
                                ("ssl_ecdh_curve", 'only one curve is offered, the first of "X25519:'),
                                ("ssl_session_cache", "OpenSSL's built-in session cache of its default size"),
                                ("ssl_session_ticket_key", "the key files are not used")):
            self.assertIn(text, warnings[directive].message)
            self.assertIn("(a test's stand-in)", warnings[directive].message)
            self.assertEqual(warnings[directive].line, self.line_of(path, directive))
        self.assertIsNotNone(config.servers[0].tls_context)

    def test_mailus_block_serves_both_certificates_and_no_ticket(self):
        proxy = self.tls_proxy("imap", free_port(), **self.mailu())
        for ciphers, issuer in (("ECDHE-RSA-AES128-GCM-SHA256", "mail.example.com"),
                                ("DHE-RSA-AES128-GCM-SHA256", "mail.example.com"),
                                ("ECDHE-ECDSA-AES128-GCM-SHA256", "mailproxy test CA")):
            with self.subTest(ciphers=ciphers):
                context = self.client_context(alpn=["imap"], ca="both.crt")
                context.maximum_version = ssl.TLSVersion.TLSv1_2
                context.set_ciphers(ciphers)
                client = self.tls_connect(proxy, context=context)
                client.expect_line(mp.IMAP_GREETING)
                self.assertEqual(client.sock.cipher()[0], ciphers)
                self.assertEqual(dict(item[0] for item in client.sock.getpeercert()["issuer"])["commonName"],
                                 issuer)
                client.close()
        context = self.client_context(ca="both.crt")
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        client = self.tls_connect(proxy, context=context)
        client.expect_line(mp.IMAP_GREETING)                 # a ticket would have come by now
        self.assertFalse(client.sock.session.has_ticket)     # ssl_session_tickets off


# -- end to end: TLS to the backend -------------------------------------------------

class TlsEndToEndBackendTests(EndToEndTestCase):
    """Extensions proxy_ssl (implicit TLS) and proxy_starttls, with
    proxy_ssl_trusted_certificate, proxy_ssl_name and proxy_ssl_verify.
    The fake backends can only read what came through their handshake."""

    def backend_proxy(self, protocol: str, backend_port: int, listens=("",), **mail):
        mail.setdefault("proxy_ssl_trusted_certificate", self.tls_path("ca.crt"))
        return self.tls_proxy(protocol, backend_port, listens=listens, **mail)

    def test_proxy_ssl(self):
        for name in ("localhost", "mail.example.org", None):   # None: proxy_pass's 127.0.0.1
            with self.subTest(proxy_ssl_name=name):
                backend = self.use(FakeImapBackend(tls="implicit", context=self.backend_server_context()))
                names = {"proxy_ssl_name": name} if name else {}
                proxy = self.backend_proxy("imap", backend.port, proxy_ssl="on", **names)
                client = self.connect(proxy)
                self.imap_login(client)
                client.send("a2 NOOP")
                client.expect(rb"^a2 OK NOOP completed\r\n$")
                self.assertEqual(backend.clear, [b""])
                self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE + b"a2 NOOP\r\n")

    def assertUpstreamTlsFails(self, reason: str, **mail) -> None:
        backend = self.use(FakeImapBackend(tls="implicit", context=self.backend_server_context()))
        proxy = self.backend_proxy("imap", backend.port, proxy_ssl="on", **mail)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        client.expect_line(mp.IMAP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r'\[error\] .*\*1 upstream certificate verify error: \(%s\) while SSL '
                           r'handshaking to upstream, client: 127\.0\.0\.1, server: 127\.0\.0\.1:%d, '
                           r'login: "alice", upstream: 127\.0\.0\.1:%d'
                           % (reason, proxy.port, backend.port))
        wait_until(lambda: backend.tls_errors, what="the backend's side of the failed handshake")
        self.assertEqual(backend.clear, [b""])          # not a byte of the login in clear

    def test_relay_with_tls_on_both_sides(self):
        """2 MB each way, TLS to the client and to the backend."""
        message = message_bytes(2 * MEGABYTE)
        backend = self.use(FakeImapBackend(tls="implicit", context=self.backend_server_context(), message=message))
        proxy = self.backend_proxy("imap", backend.port, listens=("ssl",), proxy_ssl="on")
        client = self.tls_connect(proxy)
        self.imap_login(client)
        client.send("a2 FETCH 1 BODY[]")
        client.expect(rb"^\* 1 FETCH \(BODY\[\] \{%d\}\r\n$" % len(message))
        self.assertSameBytes(client.read_exactly(len(message)), message, "FETCH over two TLS legs")
        client.expect(rb"^\)\r\n$")
        client.expect(rb"^a2 OK FETCH completed\r\n$")
        client.send(b"a3 APPEND INBOX {%d}\r\n" % len(message))
        client.expect(rb"^\+ Ready for literal data\r\n$")
        client.send(message + b"\r\n")
        client.expect(rb"^a3 OK APPEND completed, sha256 " + sha256_hex(message).encode() + rb"\r\n$")

    def test_the_login_and_access_lines_say_how(self):
        """Issue 15: the client's TLS, the auth method, the backend's TLS,
        after nginx's context, on the login line and the access line."""
        backend = self.use(FakeImapBackend(tls="implicit", context=self.backend_server_context()))
        proxy = self.backend_proxy("imap", backend.port, listens=("ssl",), proxy_ssl="on",
                                   imap_auth="plain cram-md5")
        client = self.tls_connect(proxy)
        greeting = client.read_line()
        client.send("a1 AUTHENTICATE CRAM-MD5")
        challenge = base64.b64decode(client.expect(rb"^\+ (\S+)\r\n$").group(1))
        digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest()
        client.send(base64.b64encode(b"alice " + digest.encode()) + b"\r\n")
        client.expect(rb"^a1 OK ")
        client.send("a2 LOGOUT")
        client.read_until_closed()
        how = r", tls: %s, auth: cram-md5, upstream tls: TLSv1\.[23]$" % re.escape(client.sock.version())
        proxy.wait_for_log(r"(?m)\*1 client logged in while [^,]*, client: 127\.0\.0\.1, "
                           r'server: [^,]+, login: "alice", upstream: [^,]+' + how)
        proxy.wait_for_log(r"(?m)\*1 session done: .*" + how)
        self.assertTrue(greeting.startswith(b"* OK"))

    def test_proxy_ssl_wrong_name(self):
        self.assertUpstreamTlsFails(r"62:Hostname mismatch[^)]*", proxy_ssl_name="wrong.example")

    def test_proxy_ssl_untrusted_certificate(self):
        self.assertUpstreamTlsFails(r"20:unable to get local issuer certificate",
                                    proxy_ssl_trusted_certificate=self.tls_path("wrongca.crt"))

    def test_proxy_ssl_verify_off_takes_any_certificate(self):
        backend = self.use(FakeImapBackend(tls="implicit", context=self.backend_server_context()))
        proxy = self.tls_proxy("imap", backend.port, listens=("",), proxy_ssl="on",
                               proxy_ssl_verify="off", proxy_ssl_name="wrong.example")
        self.imap_login(self.connect(proxy))
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)

    def test_proxy_ssl_to_a_plaintext_backend(self):
        backend = self.use(FakeImapBackend())
        proxy = self.backend_proxy("imap", backend.port, proxy_ssl="on")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        client.expect_line(mp.IMAP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r"\[error\] .*\*1 upstream SSL handshake failed \(WRONG_VERSION_NUMBER\) "
                           r"while SSL handshaking to upstream, .*upstream: 127\.0\.0\.1:%d"
                           % backend.port)
        self.assertNotIn(b"secret", bytes(backend.received[0]))

    def test_proxy_starttls_refused_by_the_backend_sends_no_login(self):
        """No downgrade: a backend without STARTTLS never sees the password."""
        backend = self.use(FakeImapBackend())         # answers "S1 BAD unknown command"
        proxy = self.backend_proxy("imap", backend.port, proxy_starttls="on")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        client.expect_line(mp.IMAP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r'\[error\] .*\*1 upstream sent invalid response: "S1 BAD unknown command"')
        self.assertEqual(bytes(backend.received[0]), b"S1 STARTTLS\r\n")

    def test_proxy_starttls_imap(self):
        backend = self.use(FakeImapBackend(tls="starttls", context=self.backend_server_context()))
        proxy = self.backend_proxy("imap", backend.port, proxy_starttls="on",
                                   proxy_ssl_name="localhost")
        client = self.connect(proxy)
        self.imap_login(client)
        self.assertEqual(backend.clear, [b"S1 STARTTLS\r\n"])
        self.assertEqual(bytes(backend.received[0]), b"S1 STARTTLS\r\n" + IMAP_LOGIN_ON_THE_WIRE)

    def test_proxy_starttls_drops_what_the_backend_said_in_clear_after_its_yes(self):
        """The backend-side mirror of CVE-2011-0411: a reply injected after
        the STARTTLS yes must not be read as the answer to the login."""
        backend = self.use(FakeImapBackend(tls="starttls", context=self.backend_server_context(),
                                           inject=b"a1 OK LOGIN completed (injected)\r\n"))
        proxy = self.backend_proxy("imap", backend.port, proxy_starttls="on",
                                   proxy_ssl_name="localhost")
        client = self.connect(proxy)
        self.imap_login(client)                          # "a1 OK LOGIN completed", not "(injected)"
        self.assertEqual(bytes(backend.received[0]), b"S1 STARTTLS\r\n" + IMAP_LOGIN_ON_THE_WIRE)

    def test_proxy_starttls_pop3(self):
        backend = self.use(FakePop3Backend(tls="starttls", context=self.backend_server_context()))
        proxy = self.backend_proxy("pop3", backend.port, proxy_starttls="on")   # name: 127.0.0.1
        self.pop3_login(self.connect(proxy))
        self.assertEqual(backend.clear, [b"STLS\r\n"])
        self.assertEqual(bytes(backend.received[0]), b"STLS\r\n" + POP3_LOGIN_ON_THE_WIRE)

    def test_proxy_starttls_smtp(self):
        backend = self.use(FakeSmtpBackend(tls="starttls", context=self.backend_server_context()))
        proxy = self.backend_proxy("smtp", backend.port, proxy_starttls="on",
                                   proxy_ssl_name="localhost")
        smtp = smtplib.SMTP("127.0.0.1", proxy.port, local_hostname="client.test",
                            timeout=TLS_CLIENT_TIMEOUT)
        self.addCleanup(tls_quietly, smtp.close)
        self.assertEqual(smtp.login("alice", "secret"), (235, b"2.0.0 OK"))
        smtp.sendmail("alice@example.com", ["bob@example.com"], b"Subject: hi\r\n\r\nhi\r\n")
        self.assertEqual(smtp.quit()[0], 221)
        self.assertEqual(backend.clear, [b"EHLO mail.test\r\nSTARTTLS\r\n"])
        self.assertEqual(backend.lines(False), b"EHLO mail.test\r\nSTARTTLS\r\n")
        self.assertEqual(backend.lines(True), b"EHLO mail.test\r\n"
                         b"XCLIENT ADDR=127.0.0.1 LOGIN=alice NAME=[UNAVAILABLE]\r\n"
                         b"EHLO client.test\r\n" + SMTPLIB_MAIL_ALICE +
                         SMTPLIB_RCPT_BOB + b"data\r\nquit\r\n")
        self.assertEqual(backend.messages, [b"Subject: hi\r\n\r\nhi\r\n.\r\n"])

    def test_proxy_ssl_verify_off_warns_at_start(self):
        """The real program: the warning comes before "started"."""
        directory = TempDir(self)
        path = directory.write("mailproxy.conf", proxy_config(
            "imap", free_port(), proxy_ssl="on", proxy_ssl_verify="off"))
        program = ProgramUnderTest(self, path)
        self.assertTrue(program.wait_for(" started, listening on "), program.stderr)
        self.assertRegex(program.stderr, r"\[warn\] \d+#0: proxy_ssl_verify is off in \[server imap\]: "
                                         r"the backend's certificate is not checked")


# -- end to end: bad TLS input ------------------------------------------------------

class TlsEndToEndBadInputTests(EndToEndTestCase):
    """Each ends its own session with an info line; the proxy goes on (a
    second session on the same proxy logs in)."""

    def proxy(self, **mail):
        """Port 0: TLS; port 1: plain IMAP."""
        self.backend = self.use(FakeImapBackend())
        return self.tls_proxy("imap", self.backend.port, listens=("ssl", ""), **mail)

    def assertStillServes(self, proxy) -> None:
        self.imap_login(self.tls_connect(proxy))
        proxy.assert_alive()

    def test_plaintext_on_the_tls_port(self):
        proxy = self.proxy(timeout="5s")
        client = self.connect(proxy)
        started = time.monotonic()
        client.send("a1 LOGIN alice secret")
        # OpenSSL refuses a record that is not TLS at once (nginx logs "wrong
        # version number" and closes); the client must not hold the session
        # until ``timeout``.
        client.timeout = 1.5
        try:
            data = client.read_until_closed()
        except AssertionError:
            data = None
        elapsed = time.monotonic() - started
        self.assertStillServes(proxy)
        self.assertIsNotNone(data, "plaintext on the TLS port: the session was still open "
                                   "after %.1fs (timeout is 5s)" % elapsed)
        self.assertTrue(data == b"" or data.startswith(b"\x15\x03"), data)   # nothing, or an alert
        proxy.wait_for_log(r"\[info\] .*\*1 SSL handshake failed \(\w+\) while SSL handshaking")

    def test_client_hello_on_the_plain_port(self):
        proxy = self.proxy()
        client = self.connect(proxy, proxy.ports[1])
        client.expect_line(mp.IMAP_GREETING)
        client.send(tls_client_hello())
        client.sock.shutdown(socket.SHUT_WR)
        lines = client.read_until_closed().splitlines(True)
        self.assertTrue(1 <= len(lines) <= 5, lines)                 # max_errors = 5
        for line in lines:
            self.assertRegex(line, rb"^\S+ " + re.escape(mp.IMAP_INVALID) + rb"$")
        proxy.wait_for_log(r"\*1 session done: client "
                           r"(sent too many invalid commands|closed connection)")
        self.assertStillServes(proxy)

    def test_stalled_handshake_times_out(self):
        proxy = self.proxy(timeout="1s")
        silent = self.connect(proxy)
        halfway = self.connect(proxy)
        started = time.monotonic()
        halfway.send(tls_client_hello()[:40])
        self.assertEqual(silent.read_until_closed(), b"")
        self.assertEqual(halfway.read_until_closed(), b"")
        elapsed = time.monotonic() - started
        self.assertTrue(0.8 < elapsed < 2.5, elapsed)
        proxy.wait_for_log(r"\[info\] .*\*1 client timed out while SSL handshaking")
        proxy.wait_for_log(r"\[info\] .*\*2 client timed out while SSL handshaking")
        self.assertStillServes(proxy)

    def test_garbage_records_after_the_handshake(self):
        proxy = self.proxy()
        client = self.tls_connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send_raw(b"\x17\x03\x03\x00\x20" + bytes(range(32)))  # application data, bad MAC
        with self.assertRaises(ssl.SSLError) as caught:
            client.read_until_closed()
        self.assertEqual(caught.exception.reason, "SSLV3_ALERT_BAD_RECORD_MAC")
        proxy.wait_for_log(r"\[info\] .*\*1 .*BAD_RECORD_MAC.* while in auth state")
        proxy.wait_for_log(r"\*1 session done: client TLS error")
        self.assertStillServes(proxy)

    def test_client_vanishes_mid_client_hello(self):
        """Half a ClientHello, then FIN.  (Python 3.8's ssl module reports
        this EOF as SSLZeroReturnError, later ones as SSLEOFError: the log
        line must be the same.)"""
        proxy = self.proxy()
        hello = tls_client_hello()
        client = self.connect(proxy)
        client.send(hello[:len(hello) // 2])
        client.close()
        proxy.wait_for_log(r"\*1 session done: client TLS error")
        self.assertRegex(proxy.log, r"\[info\] .*\*1 peer closed connection in SSL handshake "
                                    r"while SSL handshaking")
        self.assertStillServes(proxy)

    def test_client_resets_mid_handshake(self):
        """A whole ClientHello, the server's first record read, then RST."""
        proxy = self.proxy()
        client = self.connect(proxy)
        client.send(tls_client_hello())
        self.assertEqual(client.read_exactly(1), b"\x16")               # the ServerHello's record
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        proxy.wait_for_log(r"\[info\] .*\*1 client connection error \(104: Connection reset by peer\) "
                           r"while SSL handshaking")
        proxy.wait_for_log(r"\*1 session done: client connection error")
        self.assertStillServes(proxy)


# -- end to end: certificates with odd names (issue 12) -----------------------------

class OddCertificateAuthHttpTests(EndToEndTestCase):
    """Certificates with odd names, end to end."""

    def odd_names_proxy(self, auth: AuthServer, mode: str = "on") -> ProxyUnderTest:
        return self.auth_http_proxy("imap", auth.port, "ssl", ssl_certificate="server.crt",
                                    ssl_certificate_key="server.key", ssl_verify_client=mode,
                                    ssl_client_certificate=self.tls_path("bothca.crt"))

    def odd_client(self, proxy, certificate: str) -> Client:
        client = self.connect(proxy)
        client.sock = self.client_context(certificate).wrap_socket(
            client.sock, server_hostname="mail.example.com")
        return client

    def tls_lines(self, client: Client, *lines: bytes) -> bytes:
        return (b"Auth-SSL: on\r\nAuth-SSL-Protocol: " + client.sock.version().encode() +
                b"\r\nAuth-SSL-Cipher: " + client.sock.cipher()[0].encode() + b"\r\n" +
                b"".join(line + b"\r\n" for line in lines))

    def test_a_name_with_cr_lf_reaches_the_auth_server_escaped(self):
        # The subject went in as 'CN=alice\r\nAuth-SSL-Subject: CN=admin,...'
        # and forged two headers; nginx sends OpenSSL's \0D\0A.
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.odd_names_proxy(auth)
        client = self.odd_client(proxy, "crlf")
        self.imap_login(client)
        fingerprint = hashlib.sha1(ssl.PEM_cert_to_DER_cert(ODD_CRLF_CERT_PEM)).hexdigest()
        self.assertEqual(auth.requests, [auth_request_bytes(after=self.tls_lines(
            client, b"Auth-SSL-Verify: SUCCESS",
            rb"Auth-SSL-Subject: CN=alice\0D\0AAuth-SSL-Subject: CN=admin,"
            rb"O=Example\0D\0AAuth-SSL-Verify: SUCCESS",
            b"Auth-SSL-Issuer: CN=mailproxy odd-names test CA", b"Auth-SSL-Serial: 1002",
            b"Auth-SSL-Fingerprint: " + fingerprint.encode()))])

    def test_an_unreadable_certificate_under_optional_reads_as_none(self):
        # getpeercert() raised in stream_tls_ready and ended the worker.
        # With ``optional`` the session goes on; the auth server is told
        # what nginx tells it of a client without a certificate.
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.odd_names_proxy(auth, mode="optional")
        client = self.odd_client(proxy, "descriptor")
        self.imap_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes(after=self.tls_lines(client, b"Auth-SSL-Verify: NONE"))])
        proxy.wait_for_log(r"\[info\] .*\*1 client SSL certificate cannot be read \(.+\) while SSL "
                           r"handshaking, client: 127\.0\.0\.1, ")
        proxy.assert_alive()


class OddCertificateUserTableTests(EndToEndTestCase):
    def test_an_unreadable_certificate_is_refused_and_the_worker_lives(self):
        # ssl_verify_client on: as a missing certificate.  A logged-in
        # bystander on the same worker keeps working.
        backend = self.use(FakeImapBackend())
        proxy = self.tls_proxy("imap", backend.port, ssl_verify_client="on",
                               ssl_client_certificate=self.tls_path("bothca.crt"))
        bystander = self.tls_connect(proxy, certificate="client")
        self.imap_login(bystander)
        hostile = self.connect(proxy)
        hostile.start_tls(self.client_context("descriptor"))
        self.assertEqual(hostile.read_line(), mp.IMAP_NO_CERT)
        hostile.expect_closed()
        proxy.wait_for_log(r"\[info\] .*\*2 client SSL certificate cannot be read \(.+\) while SSL "
                           r"handshaking")
        proxy.wait_for_log(r"\*2 session done: no client certificate")
        bystander.send("a2 NOOP")
        bystander.expect(rb"^a2 OK NOOP completed\r\n$")
        proxy.assert_alive()

    def test_a_kelvin_sign_does_not_log_in_as_karl(self):
        backend = self.use(FakeImapBackend(accept=((b"karl", b"secret"),)))
        proxy = self.tls_proxy("imap", backend.port, users={"karl": "{PLAIN}secret"},
                               ssl_verify_client="optional", imap_auth="plain external",
                               ssl_client_certificate=self.tls_path("oddca.crt"))
        client = self.connect(proxy)
        client.start_tls(self.client_context("kelvin"))
        client.expect_line(mp.IMAP_GREETING)
        client.send(b"a1 AUTHENTICATE EXTERNAL " + base64.b64encode(b"karl") + b"\r\n")
        client.expect_line(b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        proxy.wait_for_log(r'client login failed: "EXTERNAL login does not match the client '
                           r'certificate"')
        self.assertEqual(backend.received, [])


# ========================================================================== #
# ####                            Event loop                            #### #
# ========================================================================== #
# EventLoop on its own: timers in order, cancel, call_soon_threadsafe from
# other threads (in order, each once, a failure to its object), a signal
# delivered through the wake-up fd.

class EventLoopTests(EventLoopTestCase):
    def test_timers_run_in_the_order_of_their_deadlines(self):
        fired = []
        for delay, name in ((0.03, "third"), (0.01, "first"), (0.02, "second")):
            self.loop.call_later(delay, lambda name=name: fired.append(name))
        self.drive(lambda: len(fired) == 3)
        self.assertEqual(fired, ["first", "second", "third"])

    def test_timers_of_one_deadline_run_in_the_order_they_were_set(self):
        self.loop.time = lambda: 1000.0                  # a clock that stands still
        fired = []
        for name in ("a", "b", "c", "d"):
            self.loop.call_later(0, lambda name=name: fired.append(name))
        self.loop.run_once(0)
        self.assertEqual(fired, ["a", "b", "c", "d"])

    def test_a_cancelled_timer_never_runs(self):
        fired = []
        cancelled = self.loop.call_later(0.01, lambda: fired.append("cancelled"))
        self.loop.call_later(0.02, lambda: fired.append("kept"))
        cancelled.cancel()
        self.drive(lambda: fired)
        self.loop.run_once(0.02)
        self.assertEqual(fired, ["kept"])
        self.assertEqual(self.loop.timers, [], "the cancelled timer is left in the heap")

    def test_call_soon_threadsafe_wakes_a_waiting_loop(self):
        ran = []
        thread = threading.Thread(target=self.loop.call_soon_threadsafe,
                                  args=(lambda: ran.append(threading.current_thread()),))
        thread.start()
        thread.join()
        started = time.monotonic()
        self.loop.run_once(30.0)                         # the wake-up byte ends the wait
        self.assertEqual(ran, [threading.current_thread()], "not run, or not in the loop's thread")
        self.assertLess(time.monotonic() - started, 10.0, "the loop slept through the wake-up")

    def test_call_soon_threadsafe_from_many_threads_runs_each_once_in_order(self):
        ran = []
        loop_thread = threading.current_thread()

        def call(thread_number):
            for number in range(200):
                self.loop.call_soon_threadsafe(
                    lambda pair=(thread_number, number): ran.append((pair, threading.current_thread())))
        threads = [threading.Thread(target=call, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        self.drive(lambda: len(ran) == 800)
        for thread in threads:
            thread.join()
        self.loop.run_once(0.05)
        self.assertEqual(len(ran), 800, "a callback ran twice")
        self.assertEqual({thread for _, thread in ran}, {loop_thread})
        for thread_number in range(4):
            self.assertEqual([number for (n, number), _ in ran if n == thread_number], list(range(200)),
                             "one thread's callbacks ran out of order")

    def test_a_threadsafe_callback_that_fails_ends_its_object_not_the_loop(self):
        class Owner:
            errors = []

            def crashed(self, error):
                self.errors.append(error)

            def broken(self):
                raise ZeroDivisionError("a bug in one connection's handling")
        owner, ran = Owner(), []
        for callback in (owner.broken, lambda: ran.append("next")):
            threading.Thread(target=self.loop.call_soon_threadsafe, args=(callback,)).start()
        self.drive(lambda: ran and owner.errors)
        self.assertIsInstance(owner.errors[0], ZeroDivisionError)
        self.assertEqual(ran, ["next"], "the loop stopped at the failed callback")

    def test_call_soon_threadsafe_after_close_is_harmless(self):
        """A check that ends while the worker stops: its thread must not
        fail (the callback is never run)."""
        loop = mp.EventLoop()
        loop.close()
        loop.call_soon_threadsafe(lambda: None)

    @unittest.skipUnless(hasattr(signal, "SIGUSR2"), "needs SIGUSR2 and SIGCHLD")
    def test_signals_come_through_the_wake_up_fd_sigchld_last(self):
        """The handler runs in the loop, not in the signal handler; signals
        that arrived together are handled SIGCHLD last (a child that exited
        because of a SIGTERM is seen after that SIGTERM)."""
        for number in (signal.SIGUSR2, signal.SIGCHLD):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
        handled = []
        self.loop.add_signal_handler(signal.SIGCHLD, handled.append)
        self.loop.add_signal_handler(signal.SIGUSR2, handled.append)
        os.kill(os.getpid(), signal.SIGCHLD)
        os.kill(os.getpid(), signal.SIGUSR2)
        self.assertEqual(handled, [], "a handler ran inside the signal handler")
        self.drive(lambda: signal.SIGUSR2 in handled and signal.SIGCHLD in handled)
        self.assertEqual(handled[:2], [signal.SIGUSR2, signal.SIGCHLD])   # a child may add a SIGCHLD


class DeadlineTests(EventLoopTestCase):
    """The session's one timer: set, postponed without heap work, cancelled."""

    class Owner:
        def __init__(self):
            self.errors = []

        def crashed(self, error):
            self.errors.append(error)

    def test_postponed_it_fires_at_its_new_time_once(self):
        owner, fired = self.Owner(), []
        deadline = mp.Deadline(self.loop, owner)
        deadline.set(0.05, lambda: fired.append(self.loop.time()))
        set_at = self.loop.time()
        deadline.postpone(0.3)
        self.drive(lambda: fired, timeout=3.0)
        self.assertGreaterEqual(fired[0] - set_at, 0.3)
        self.assertIsNone(deadline.callback)
        self.loop.run_once(0.1)
        self.assertEqual(len(fired), 1)

    def test_set_replaces_and_cancel_disarms(self):
        owner, fired = self.Owner(), []
        deadline = mp.Deadline(self.loop, owner)
        deadline.set(0.01, lambda: fired.append("first"))
        deadline.set(0.02, lambda: fired.append("second"))
        self.drive(lambda: fired)
        self.assertEqual(fired, ["second"])
        deadline.set(0.01, lambda: fired.append("cancelled"))
        deadline.cancel()
        deadline.postpone(1.0)                       # nothing armed: nothing moves
        self.loop.run_once(0.05)
        self.assertEqual(fired, ["second"])

    def test_an_exception_goes_to_the_owner_not_the_loop(self):
        owner = self.Owner()
        deadline = mp.Deadline(self.loop, owner)
        deadline.set(0, lambda: 1 / 0)
        self.drive(lambda: owner.errors)
        self.assertIsInstance(owner.errors[0], ZeroDivisionError)


# ========================================================================== #
# ####                      Streams and listeners                       #### #
# ========================================================================== #
# Stream over socket.socketpair() and a real EventLoop (EventLoopTestCase):
# write-through, then buffering with write interest until the peer reads; a
# read budget of 0 pauses reading; EOF.  (Listeners are tested end to end:
# worker_connections and out of descriptors in "Processes".)

class BindAllTests(unittest.TestCase):
    """bind_all's rule for a host without IPv6, with bind() made to fail
    as it does there (the real thing, in a network namespace, is in
    "Processes": test_sample_conf_starts_on_a_host_without_ipv6)."""

    def bind(self, listens, failing_errno, has_ipv6):
        """bind_all on one server with ``listens``, each IPv6 one failing
        with ``failing_errno``: (the keys bound, the warnings)."""
        config = load_text(self, BASE_CONFIG.replace("127.0.0.1:18143", "\n        ".join(listens)))
        warnings = []

        def fake_bind(listen):
            if listen.family == socket.AF_INET6 or failing_errno == errno.EACCES:
                raise OSError(failing_errno, "bind() to %s failed" % listen.text)
            return unittest.mock.Mock()
        with unittest.mock.patch.object(mp, "bind_listen", fake_bind), \
                unittest.mock.patch.object(mp, "host_has_ipv6", lambda: has_ipv6):
            sockets = mp.bind_all(config, {}, warnings.append)
        return sorted(sockets), warnings

    def test_an_ipv6_listen_is_skipped_where_the_host_has_no_ipv6(self):
        for failing in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            keys, warnings = self.bind(["127.0.0.1:18143", "[::1]:18143"], failing, False)
            self.assertEqual(keys, [("127.0.0.1", 18143)])
            self.assertEqual(warnings, ["bind() to [::1]:18143 failed: this host has no IPv6, "
                                        "[server imap] listens without it"])

    def test_a_kernel_without_ipv6_fails_at_socket(self):
        """socket(AF_INET6) itself fails there (EAFNOSUPPORT): nginx's
        "socket() ... failed", and the listen is skipped the same way."""
        real_socket = socket.socket

        def socket_without_ipv6(family=socket.AF_INET, *args, **kwargs):
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
            return real_socket(family, *args, **kwargs)
        port = free_port()
        config = load_text(self, BASE_CONFIG.replace(
            "127.0.0.1:18143", "127.0.0.1:%d\n        [::1]:%d" % (port, port)))
        warnings = []
        with unittest.mock.patch.object(mp.socket, "socket", socket_without_ipv6):
            sockets = mp.bind_all(config, {}, warnings.append)
        for sock in sockets.values():
            sock.close()
        self.assertEqual(sorted(sockets), [("127.0.0.1", port)])
        self.assertEqual(warnings, ["socket() [::1]:%d failed (%d: %s): this host has no IPv6, "
                                    "[server imap] listens without it"
                                    % (port, errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))])

    def test_other_failures_stay_fatal(self):
        cases = [(["127.0.0.1:18143", "[2001:db8::5]:18143"], errno.EADDRNOTAVAIL, True),  # not ours
                 (["[::1]:18143"], errno.EADDRNOTAVAIL, False),        # nothing left to listen on
                 (["127.0.0.1:18143", "[::1]:18143"], errno.EACCES, False)]
        for listens, failing, has_ipv6 in cases:
            with self.assertRaises(OSError, msg=listens) as caught:
                self.bind(listens, failing, has_ipv6)
            self.assertEqual(caught.exception.errno, failing)


class StreamOwner:
    """A Stream's owner that keeps what it is told: the data in ``chunks``,
    EOF, errors, how often the stream drained."""

    def __init__(self):
        self.chunks = []
        self.eof = False
        self.errors = []
        self.drained = 0

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def stream_data(self, stream, data: bytes) -> None:
        self.chunks.append(data)

    def stream_eof(self, stream) -> None:
        self.eof = True

    def stream_error(self, stream, error: Exception) -> None:
        self.errors.append(error)

    def stream_drained(self, stream) -> None:
        self.drained += 1

    def stream_connected(self, stream) -> None:
        pass

    def stream_tls_ready(self, stream) -> None:
        pass


class StreamTests(EventLoopTestCase):
    def stream(self, sndbuf: int = 0):
        proxy_end, peer = self.socket_pair(sndbuf)
        owner = StreamOwner()
        stream = mp.Stream(self.loop, proxy_end, owner)
        self.addCleanup(stream.close)
        return stream, peer, owner

    def test_a_write_goes_through_then_the_rest_is_buffered_until_the_peer_reads(self):
        stream, peer, owner = self.stream(sndbuf=4096)
        stream.write(b"a1 OK done\r\n")
        self.assertEqual((stream.out, stream.sent), (b"", 12), "the kernel took it all, at once")
        self.assertFalse(stream.interest & selectors.EVENT_WRITE, "write interest with nothing kept")
        self.assertEqual(peer.recv(100), b"a1 OK done\r\n")
        message = message_bytes(256 * 1024)
        stream.write(message)
        kept = len(stream.out)
        self.assertEqual(kept, len(message) - (stream.sent - 12), "what the kernel refused is kept")
        self.assertGreater(kept, 0)
        self.assertTrue(stream.interest & selectors.EVENT_WRITE, "no write interest while bytes are kept")
        reader = PeerReader(peer)
        self.drive(lambda: len(reader.received) == len(message), step=reader)
        self.assertEqual(sha256_hex(reader.received), sha256_hex(message))
        self.assertEqual((stream.out, stream.sent, owner.drained), (b"", 12 + len(message), 1))
        self.assertFalse(stream.interest & selectors.EVENT_WRITE, "write interest once drained")

    def test_a_read_budget_of_0_pauses_reading(self):
        stream, peer, owner = self.stream()
        peer.sendall(b"a1 NOOP\r\n")
        self.drive(lambda: owner.data == b"a1 NOOP\r\n")
        stream.set_read_budget(0)
        self.assertFalse(stream.interest & selectors.EVENT_READ, "read interest with a budget of 0")
        peer.sendall(b"a2 NOOP\r\n")                   # waits in the kernel, readable at once
        for _ in range(3):
            self.loop.run_once(0.01)
        self.assertEqual((owner.data, stream.received), (b"a1 NOOP\r\n", 9), "read while paused")
        stream.set_read_budget(4)                        # at most 4 bytes a read from now on
        self.drive(lambda: owner.data == b"a1 NOOP\r\na2 NOOP\r\n")
        self.assertEqual(owner.chunks[1:], [b"a2 N", b"OOP\r", b"\n"])

    def test_eof_is_told_once_and_stops_reading(self):
        stream, peer, owner = self.stream()
        peer.sendall(b"a1 LOGOUT\r\n")
        peer.shutdown(socket.SHUT_WR)
        self.drive(lambda: owner.eof)
        self.assertEqual((owner.data, stream.read_budget), (b"a1 LOGOUT\r\n", 0))
        self.assertFalse(stream.interest & selectors.EVENT_READ)
        stream.write(b"* BYE\r\n")                        # the other half still writes
        self.assertEqual(peer.recv(100), b"* BYE\r\n")


# ========================================================================== #
# ####                              Relay                               #### #
# ========================================================================== #
# Relay over socketpairs and a real EventLoop: backpressure both ways, EOF
# from either side; the SMTP relay check (smtp_auth none) as a sans-I/O
# piece; end to end: proxy_buffer bounds what a session holds, proxy_timeout
# ends an idle one, and smtp_auth none checks every recipient.

class RelaySession:
    """Stands in for the Session a Relay reports to: close(outcome) keeps
    the outcome and closes both streams, as a session does."""

    def __init__(self):
        self.outcome = None
        self.crash = None
        self.streams = []

    def close(self, outcome: str) -> None:
        self.outcome = outcome
        for stream in self.streams:
            stream.close()

    def log(self, level: str, message: str) -> None:
        pass

    def crashed(self, error: Exception) -> None:
        self.crash = error


class RelayTests(EventLoopTestCase):
    """A Relay between two socketpairs: the test plays the client on one,
    the backend on the other.  proxy_buffer is LIMIT."""

    LIMIT = 16 * 1024

    def relay(self, limit: int = LIMIT):
        """(relay, session, client's socket, backend's socket); every end
        sends through a small kernel buffer, so that backpressure comes
        soon."""
        client_end, client = self.socket_pair(sndbuf=4096)
        backend_end, backend = self.socket_pair(sndbuf=4096)
        session = RelaySession()
        session.streams = [mp.Stream(self.loop, client_end, None),
                           mp.Stream(self.loop, backend_end, None)]
        relay = mp.Relay(session, session.streams[0], session.streams[1], limit, 3600.0)
        self.addCleanup(session.close, "test over")
        self.addCleanup(lambda: self.assertIsNone(session.crash, "the relay crashed"))
        return relay, session, client, backend

    def assert_backpressure(self, session, source: socket.socket, source_stream,
                            target: socket.socket, target_stream) -> None:
        """``source`` sends more than the kernel and proxy_buffer hold while
        ``target`` reads nothing: once the target's output holds
        proxy_buffer, the source is not read; when the target reads, it
        all arrives, in order, and the source is read again."""
        sender = PeerSender(source, message_bytes(256 * 1024))
        self.drive(lambda: source_stream.read_budget == 0 and sender.blocked, step=sender)
        self.assertEqual(len(target_stream.out), self.LIMIT, "the output holds proxy_buffer")
        self.assertFalse(source_stream.interest & selectors.EVENT_READ, "the source is still read")
        received = source_stream.received
        for _ in range(3):                               # bytes wait in its kernel buffer
            self.loop.run_once(0.01)
        self.assertEqual(source_stream.received, received, "the source was read past proxy_buffer")
        reader = PeerReader(target)

        def both_peers() -> None:
            sender()
            reader()
        self.drive(lambda: len(reader.received) == len(sender.data), step=both_peers)
        self.assertEqual(sha256_hex(reader.received), sha256_hex(sender.data))
        self.assertEqual(target_stream.out, b"")
        self.assertTrue(source_stream.read_budget > 0 and source_stream.interest & selectors.EVENT_READ,
                        "the source is not read again")
        self.assertIsNone(session.outcome)

    def test_backpressure_from_a_client_that_does_not_read(self):
        relay, session, client, backend = self.relay()
        self.assert_backpressure(session, backend, relay.backend, client, relay.client)

    def test_backpressure_from_a_backend_that_does_not_read(self):
        relay, session, client, backend = self.relay()
        self.assert_backpressure(session, client, relay.client, backend, relay.backend)

    def assert_ends_once_written_out(self, relay, session, source: socket.socket, source_stream,
                                     target: socket.socket, target_stream, outcome: str) -> None:
        """``source`` sends and closes; the relay hears the EOF while what it
        sent still waits in its output to ``target``, and ends only when
        that is written out."""
        sender = PeerSender(source, message_bytes(64 * 1024), shut=True)
        self.drive(lambda: relay.eof_from is source_stream, step=sender)
        self.assertGreater(len(target_stream.out), 0)
        self.assertIsNone(session.outcome, "the session ended with bytes still to write")
        self.assertEqual((source_stream.read_budget, target_stream.read_budget), (0, 0))
        reader = PeerReader(target)
        self.drive(lambda: reader.eof, step=reader)
        self.assertEqual(session.outcome, outcome)
        self.assertEqual(sha256_hex(reader.received), sha256_hex(sender.data))

    def test_eof_from_the_client_ends_the_relay_once_its_bytes_are_written_out(self):
        relay, session, client, backend = self.relay(limit=MEGABYTE)
        self.assert_ends_once_written_out(relay, session, client, relay.client, backend,
                                          relay.backend, "client closed connection")

    def test_eof_from_the_backend_ends_the_relay_once_its_bytes_are_written_out(self):
        relay, session, client, backend = self.relay(limit=MEGABYTE)
        self.assert_ends_once_written_out(relay, session, backend, relay.backend, client,
                                          relay.client, "upstream closed connection")


# -- the SMTP relay check -----------------------------------------------------------

GUARD_DENIED = b"550 5.7.1 Relaying denied\r\n"


def guard_check(rcpt: bytes):
    """A recipient check for SmtpRecipientGuard: example.com only."""
    return None if re.fullmatch(rb"RCPT TO:<[^@>]+@example\.com>", rcpt, re.I) else GUARD_DENIED


def guard_conversation(guard, steps, chunking=whole):
    """Play ("client", bytes) and ("backend", bytes) steps through ``guard``;
    returns (all it sent to the backend, all it sent to the client)."""
    to_backend, to_client = bytearray(), bytearray()
    for side, data in steps:
        for chunk in chunking(data):
            if side == "client":
                backend, client = guard.from_client(chunk)
            else:
                client, backend = guard.from_backend(chunk)
            to_backend += backend
            to_client += client
    return bytes(to_backend), bytes(to_client)


class SmtpRecipientGuardTests(unittest.TestCase):
    """After the relay starts with smtp_auth none, every RCPT is checked."""

    CONVERSATION = [
        ("client", b"RCPT TO:<b@example.com>\r\nRCPT TO:<victim@evil.test>\r\n"
                   b"RCPT TO:<c@Example.COM>\r\nDATA\r\n"),
        ("backend", b"250 2.1.5 Ok\r\n"), ("backend", b"250 2.1.5 Ok\r\n"),
        ("backend", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
        ("client", b"Subject: x\r\n\r\nRCPT TO:<inside@evil.test>\r\n..\r\n.\r\n"
                   b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<next@evil.test>\r\n"
                   b"RCPT TO:<d@example.com>\r\nQUIT\r\n"),
        ("backend", b"250 2.0.0 Ok: queued\r\n"), ("backend", b"250 2.1.0 Ok\r\n"),
        ("backend", b"250 2.1.5 Ok\r\n"), ("backend", b"221 2.0.0 Bye\r\n")]

    def test_every_recipient_checked_in_order_pipelined_or_not(self):
        expected_backend = (
            b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@Example.COM>\r\nDATA\r\n"
            b"Subject: x\r\n\r\nRCPT TO:<inside@evil.test>\r\n..\r\n.\r\n"
            b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<d@example.com>\r\nQUIT\r\n")
        expected_client = (
            b"250 2.1.5 Ok\r\n" + GUARD_DENIED + b"250 2.1.5 Ok\r\n"
            b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued\r\n"
            b"250 2.1.0 Ok\r\n" + GUARD_DENIED + b"250 2.1.5 Ok\r\n221 2.0.0 Bye\r\n")
        for chunking in (whole, byte_by_byte):
            guard = mp.SmtpRecipientGuard(guard_check, 4096)
            self.assertEqual(guard_conversation(guard, self.CONVERSATION, chunking),
                             (expected_backend, expected_client), chunking.__name__)
            self.assertEqual(guard.held, 0)

    def test_commands_wait_for_the_reply_to_the_one_before(self):
        guard = mp.SmtpRecipientGuard(guard_check, 4096)
        self.assertEqual(guard.from_client(b"RCPT TO:<b@example.com>\r\nRCPT TO:<x@evil.test>\r\n"),
                         (b"RCPT TO:<b@example.com>\r\n", b""))
        self.assertEqual(guard.held, len(b"RCPT TO:<x@evil.test>\r\n"))
        self.assertEqual(guard.from_backend(b"250-first line\r\n"), (b"250-first line\r\n", b""))
        self.assertEqual(guard.from_backend(b"250 Ok\r\n"), (b"250 Ok\r\n" + GUARD_DENIED, b""))

    def test_a_bare_lf_end_of_data_cannot_hide_a_recipient(self):
        """SMTP smuggling (CVE-2023-51764): a lenient backend ends the data
        at "\\n.\\n"; so does the check, and what follows is a command."""
        guard = mp.SmtpRecipientGuard(guard_check, 4096)
        guard_conversation(guard, [("client", b"DATA\r\n"), ("backend", b"354 go\r\n")])
        to_backend, to_client = guard.from_client(b"x\n.\nRCPT TO:<victim@evil.test>\r\n")
        self.assertEqual(to_backend, b"x\n.\n")
        self.assertEqual(guard.from_backend(b"250 queued\r\n"), (b"250 queued\r\n" + GUARD_DENIED, b""))

    def test_commands_that_would_blind_the_check_are_refused(self):
        for line in (b"STARTTLS\r\n", b"XCLIENT ADDR=127.0.0.1\r\n", b"xforward NAME=x\r\n",
                     b"BDAT 30 LAST\r\n"):
            guard = mp.SmtpRecipientGuard(guard_check, 4096)
            self.assertEqual(guard.from_client(line), (b"", mp.SMTP_NOT_IMPLEMENTED))
        for line, reply in ((b" RCPT TO:<x@evil.test>\r\n", mp.SMTP_INVALID),
                            (b"RCPT\tTO:<x@evil.test>\r\n", mp.SMTP_INVALID),
                            (b"RCPT TO:<b@example.com>\rRCPT TO:<x@evil.test>\r\n",
                             mp.SMTP_INVALID_ARGUMENT),
                            (b"RCPT TO:<b@example.com>\n", mp.SMTP_INVALID_ARGUMENT)):
            guard = mp.SmtpRecipientGuard(guard_check, 4096)
            self.assertEqual(guard.from_client(line), (b"", reply), line)

    def test_a_line_too_long_is_answered_once_and_dropped(self):
        guard = mp.SmtpRecipientGuard(guard_check, 64)
        to_client = b""
        for chunk in (b"RCPT TO:<" + b"x" * 100, b"y" * 100, b"@evil.test>\r\nNOOP\r\n"):
            to_backend, reply = guard.from_client(chunk)
            to_client += reply
        self.assertEqual(to_client, mp.SMTP_LINE_TOO_LONG)
        self.assertEqual(to_backend, b"NOOP\r\n")


class RelayCheckLinearWorkTests(LinearWorkTestCase):
    def test_smtp_relay_check(self):
        """smtp_auth none after the login: commands and message data."""
        def run(size):
            guard = mp.SmtpRecipientGuard(guard_check, size + 64)
            data = b"NOOP " + b"n" * size + b"\r\n"
            to_backend = b"".join(backend for backend, _ in map(guard.from_client, byte_by_byte(data)))
            self.assertEqual(to_backend, data)
            guard.from_backend(b"250 ok\r\n")
            guard.from_client(b"DATA\r\n")
            guard.from_backend(b"354 go\r\n")
            message = (b"line\r\n" * size)[:size] + b"\r\n.\r\n"
            to_backend = b"".join(backend for backend, _ in map(guard.from_client, byte_by_byte(message)))
            self.assertEqual((to_backend, guard.state), (message, guard.REPLY))
        self.assert_linear(run, 4096)


# -- end to end ---------------------------------------------------------------------

class RelayEndToEndTests(EndToEndTestCase):
    def test_backpressure_bounds_the_buffers(self):
        message = message_bytes(50 * MEGABYTE)
        backend = self.use(FakeImapBackend(message=message))
        proxy = self.start_proxy("imap", backend.port, proxy_buffer="16k")
        client = self.connect(proxy, timeout=10)
        self.imap_login(client)
        client.send("a2 FETCH 1 BODY[]")
        # The client reads nothing for a second; the proxy must stop reading
        # the backend instead of buffering the message.
        peak = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            peak = max(peak, proxy.buffered())
            time.sleep(0.001)
        self.assertLess(backend.pushed, len(message), "the backend was never held back")
        self.assertGreater(peak, 0, "the sampling never saw a buffered byte")
        # Now read it all, still sampling.
        client.expect(rb"^\* 1 FETCH \(BODY\[\] \{52428800\}\r\n$")
        got = hashlib.sha256()
        left = len(message)
        while left:
            chunk = client.read_exactly(min(left, 256 * 1024))
            got.update(chunk)
            left -= len(chunk)
            peak = max(peak, proxy.buffered())
        client.expect(rb"^\)\r\n$")
        client.expect(rb"^a2 OK FETCH completed\r\n$")
        self.assertEqual(got.hexdigest(), sha256_hex(message))
        self.assertLessEqual(peak, 16 * 1024)

    def test_proxy_timeout_ends_an_idle_relay(self):
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port, proxy_timeout="1s")
        client = self.connect(proxy)
        self.imap_login(client)
        started = time.monotonic()
        client.expect_closed()
        self.assertGreaterEqual(time.monotonic() - started, 1.0)
        self.assertLess(time.monotonic() - started, 2.5)
        proxy.wait_for_log(r"proxied session timed out .*login: \"alice\", upstream: 127\.0\.0\.1:%d"
                           % backend.port)
        proxy.wait_for_log(r"session done: proxy_timeout, ")


class SmtpEndToEndNoAuthTests(EndToEndTestCase):
    def start(self, **mail):
        """A proxy with smtp_auth none for example.com; @elsewhere.test has a
        [routes] entry to a second backend, which must never be used."""
        self.backend = self.use(FakeSmtpBackend(refuse=[b"nobody@example.com"]))
        self.other = self.use(FakeSmtpBackend())
        settings = dict(smtp_auth="none", smtp_relay_domains="example.com")
        settings.update(mail)
        text = proxy_config("smtp", self.backend.port, **settings)
        text += "\n[routes]\n@elsewhere.test = 127.0.0.1:%d\n" % self.other.port
        proxy = self.use(ProxyUnderTest(text))
        client = self.connect(proxy)
        self.smtp_hello(client, ehlo=b"250 mail.test\r\n")        # no AUTH line
        return proxy, client

    def test_replayed_mail_and_rcpt_then_a_refused_recipient_and_data(self):
        proxy, client = self.start()
        client.send("MAIL FROM:<sender@remote.test>")
        self.assertEqual(client.read_line(), mp.SMTP_OK)    # the proxy's own
        self.assertEqual(self.backend.received, [])
        client.send("RCPT TO:<bob@example.com>")
        self.assertEqual(client.read_line(), SMTP_BACKEND_RCPT_OK)   # the backend's
        client.send("RCPT TO:<nobody@example.com>")
        self.assertEqual(client.read_line(), smtp_backend_rcpt_refused(b"nobody@example.com"))
        client.send("DATA")
        self.assertEqual(client.read_line(), SMTP_BACKEND_DATA_GO)
        client.send(b"Subject: test\r\n\r\n..dot\r\n.\r\n")
        self.assertEqual(client.read_line(), smtp_backend_queued(1))
        self.smtp_quit(client)
        self.wait_for_backend(self.backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(self.backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient(login=b"") +
                         b"EHLO client.example\r\nMAIL FROM:<sender@remote.test>\r\n"
                         b"RCPT TO:<bob@example.com>\r\nRCPT TO:<nobody@example.com>\r\n"
                         b"DATA\r\nSubject: test\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
        self.assertEqual(self.backend.messages, [b"Subject: test\r\n\r\n..dot\r\n.\r\n"])
        self.assertEqual(self.other.received, [])

    def test_recipient_of_another_domain_is_refused_by_the_proxy(self):
        proxy, client = self.start()
        client.send("MAIL FROM:<sender@remote.test>")
        self.assertEqual(client.read_line(), mp.SMTP_OK)
        client.send("RCPT TO:<victim@elsewhere.test>")
        self.assertEqual(client.read_line(), b"550 5.7.1 Relaying denied\r\n")
        client.send("NOOP")                                       # the session goes on
        self.assertEqual(client.read_line(), mp.SMTP_OK)
        self.assertEqual(self.backend.received, [])
        self.assertEqual(self.other.received, [])
        proxy.wait_for_log(r'client login failed: "recipient domain not in smtp_relay_domains"')
        # ... and the client may try another recipient.
        client.send("RCPT TO:<bob@Example.COM>")
        self.assertEqual(client.read_line(), SMTP_BACKEND_RCPT_OK)
        self.smtp_quit(client)
        self.wait_for_backend(self.backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(self.backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient(login=b"") +
                         b"EHLO client.example\r\nMAIL FROM:<sender@remote.test>\r\n"
                         b"RCPT TO:<bob@Example.COM>\r\nQUIT\r\n")
        self.assertEqual(self.other.received, [])

    def test_every_recipient_is_checked_not_only_the_first(self):
        """With xclient off the backend sees only the proxy's address; were
        the later recipients unchecked, a backend that trusts the proxy
        (Postfix's permit_mynetworks) would be an open relay.  Pipelined
        behind the first RCPT, after DATA, in the next transaction: each
        refused one is answered in its place, and never reaches the backend."""
        proxy, client = self.start(xclient="off")
        client.send("MAIL FROM:<sender@remote.test>")
        self.assertEqual(client.read_line(), mp.SMTP_OK)
        client.send(b"RCPT TO:<bob@example.com>\r\nRCPT TO:<victim@evil.test>\r\n"
                    b"RCPT TO:<victim@elsewhere.test>\r\nRCPT TO:<carol@example.com>\r\n")
        self.assertEqual(client.read_line(), SMTP_BACKEND_RCPT_OK)
        self.assertEqual(client.read_line(), b"550 5.7.1 Relaying denied\r\n")
        self.assertEqual(client.read_line(), b"550 5.7.1 Relaying denied\r\n")
        self.assertEqual(client.read_line(), SMTP_BACKEND_RCPT_OK)
        client.send("DATA")
        self.assertEqual(client.read_line(), SMTP_BACKEND_DATA_GO)
        client.send(b"Subject: one\r\n\r\nRCPT TO:<quoted@evil.test>\r\n.\r\n")
        self.assertEqual(client.read_line(), smtp_backend_queued(1))
        client.send("MAIL FROM:<sender@remote.test>")
        self.assertEqual(client.read_line(), SMTP_BACKEND_MAIL_OK)
        client.send("RCPT TO:<victim@evil.test>")
        self.assertEqual(client.read_line(), b"550 5.7.1 Relaying denied\r\n")
        client.send("RCPT TO:<dave@example.com>")
        self.assertEqual(client.read_line(), SMTP_BACKEND_RCPT_OK)
        self.smtp_quit(client)
        self.wait_for_backend(self.backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(self.backend.received[0]),
                         b"EHLO mail.test\r\nMAIL FROM:<sender@remote.test>\r\n"
                         b"RCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n"
                         b"Subject: one\r\n\r\nRCPT TO:<quoted@evil.test>\r\n.\r\n"
                         b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<dave@example.com>\r\nQUIT\r\n")
        self.assertEqual(self.other.received, [])
        proxy.wait_for_log(r'recipient refused: "recipient domain not in smtp_relay_domains"')

    def test_a_later_recipient_for_another_backend_is_deferred(self):
        """elsewhere.test is a relay domain routed to another backend: this
        session's backend must not get it; 452 asks the client to send it in
        another transaction (RFC 5321 §4.5.3.1.10)."""
        proxy, client = self.start(smtp_relay_domains="example.com elsewhere.test")
        client.send("MAIL FROM:<sender@remote.test>")
        self.assertEqual(client.read_line(), mp.SMTP_OK)
        client.send("RCPT TO:<bob@example.com>")
        self.assertEqual(client.read_line(), SMTP_BACKEND_RCPT_OK)
        client.send("RCPT TO:<someone@elsewhere.test>")
        self.assertEqual(client.read_line(), mp.SMTP_TOO_MANY_RECIPIENTS)
        self.smtp_quit(client)
        self.assertNotIn(b"elsewhere", bytes(self.backend.received[0]))
        self.assertEqual(self.other.received, [])

    def test_relay_check_reads_the_forward_path_not_a_parameter(self):
        """RFC 5321 §4.1.1.3: the recipient is the path after "TO:", not an
        address found later on the line (here in an ORCPT parameter).
        Postfix accepts a forward-path without angle brackets."""
        proxy, client = self.start()
        client.send("MAIL FROM:<sender@remote.test>")
        self.assertEqual(client.read_line(), mp.SMTP_OK)
        client.send("RCPT TO:victim@elsewhere.test ORCPT=rfc822;<bob@example.com>")
        self.assertEqual(client.read_line(), b"550 5.7.1 Relaying denied\r\n")
        self.assertEqual(self.backend.received, [])
        self.assertEqual(self.other.received, [])


# ========================================================================== #
# ####          Outbound clients: the backend, auth_http, DNS           #### #
# ========================================================================== #
# The password-check pool: on its own (order, bound, cancel, failure), its
# SHA-crypt helper process, and end to end with a check held at a gate (the
# loop serves others meanwhile; known and unknown logins alike; SHA-crypt
# in the helper; more logins than it holds; a session that closes
# mid-check; a check that fails).  The resolver against a fake DNS
# server; the auth_http client end to end (the real proxy between a test
# client, a fake auth_http server and fake backends; NGINX-MAIL.md §1.3):
# the request byte by byte, failures, Auth-Wait, the auth server failing,
# OAuth tokens, the extension headers.

# -- the password checks, off the event loop ---------------------------------------

# A cheap PBKDF2 entry: hashed, so checked in the pool, but quickly.
PBKDF2_ALICE = mp.hash_password(b"secret", "PBKDF2-SHA256", rounds=1000)


class GatedPasswordCheck:
    """Stands in for mp.password_matches while a test runs: each call is
    recorded (entry, thread), then waits until the test opens ``gate``, then
    answers as password_matches would.  The wait gives up after 10 s, so a
    check run on the event loop fails the test (nothing else is served
    meanwhile) instead of hanging it.  ``fail``: raise that instead."""

    def __init__(self, test):
        self.real = mp.password_matches
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.calls = []                # (entry, thread), in the order they came
        self.inside = 0                # calls waiting at the gate now
        self.most_inside = 0
        self.fail = None               # type: Optional[Exception]
        patcher = unittest.mock.patch.object(mp, "password_matches", self)
        patcher.start()
        test.addCleanup(patcher.stop)
        test.addCleanup(self.gate.set)   # first: no thread is left waiting

    def __call__(self, entry, password):
        with self.lock:
            self.calls.append((entry, threading.current_thread()))
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        self.gate.wait(10)
        with self.lock:
            self.inside -= 1
        if self.fail is not None:
            raise self.fail
        return self.real(entry, password)


class PasswordCheckPoolTests(EventLoopTestCase):
    """The pool on its own, with a real EventLoop."""

    def test_checks_over_the_limit_wait_and_run_in_order(self):
        # One thread, so that the order they run in is the order they were
        # handed on (with two, which of the first two ends first is the
        # scheduler's choice).
        pool = mp.PasswordCheckPool(self.loop, threads=1, limit=2)
        self.addCleanup(pool.close)
        gate, ran, done = threading.Event(), [], []

        def work(number, matches):
            gate.wait(10)
            ran.append(number)
            return number
        for number in range(6):
            pool.submit(functools.partial(work, number), done.append)
        self.assertEqual((pool.handed, len(pool.waiting)), (2, 4))
        gate.set()
        self.drive(lambda: len(done) == 6)
        self.assertEqual(done, list(range(6)))
        self.assertEqual(ran, list(range(6)), "the waiting checks ran out of order")
        self.assertEqual(len(pool.threads), 1)

    def test_threads_start_as_checks_come_up_to_the_pool_size(self):
        pool = mp.PasswordCheckPool(self.loop, threads=2, limit=4)
        self.addCleanup(pool.close)
        together, done = threading.Barrier(2, timeout=10), []

        def work(number, matches):
            together.wait()            # both at once, or it times out
            return number
        pool.submit(functools.partial(work, 0), done.append)
        self.assertEqual(len(pool.threads), 1)        # one check: one thread
        for number in (1, 2, 3):
            pool.submit(functools.partial(work, number), done.append)
        self.assertEqual(len(pool.threads), 2)        # never more than the size
        self.drive(lambda: len(done) == 4)
        self.assertEqual(sorted(done), [0, 1, 2, 3])

    def test_a_cancelled_check_is_dropped_and_a_failed_one_goes_to_its_object(self):
        class Owner:
            def __init__(self):
                self.results, self.errors = [], []

            def done(self, result):
                self.results.append(result)

            def crashed(self, error):
                self.errors.append(error)
        pool = mp.PasswordCheckPool(self.loop, threads=1, limit=1)
        self.addCleanup(pool.close)
        gate, ran = threading.Event(), []

        def work(name, matches):
            gate.wait(10)
            ran.append(name)
            if name == "broken":
                raise ZeroDivisionError("a bug in a check")
            return name
        running, waiting, broken, good = Owner(), Owner(), Owner(), Owner()
        pool.submit(functools.partial(work, "running"), running.done).cancel()
        pool.submit(functools.partial(work, "waiting"), waiting.done).cancel()
        pool.submit(functools.partial(work, "broken"), broken.done)
        pool.submit(functools.partial(work, "good"), good.done)
        gate.set()
        self.drive(lambda: good.results)
        self.assertNotIn("waiting", ran, "a check cancelled while it waited ran")
        self.assertEqual((running.results, waiting.results), ([], []))
        self.assertIsInstance(broken.errors[0], ZeroDivisionError)
        self.assertEqual(good.results, ["good"])


SHA512_ALICE = mp.hash_password(b"secret", "SHA512-CRYPT", rounds=1000)


class PasswordHelperTests(unittest.TestCase):
    """SHA-crypt holds the GIL, so a pool thread has it checked in a
    process of its own."""

    def test_the_helper_loop_answers_each_request_until_the_end(self):
        entries = [mp.parse_password_entry(value) for value in
                   (SHA512_ALICE, mp.hash_password(b"secret", "SHA256-CRYPT", rounds=1000))]
        requests = io.BytesIO()
        for entry in entries:
            for password in (b"secret", b"wrong", b"sec\0ret"):
                body = b"\0".join((entry.scheme.encode(), entry.data.encode(), password))
                requests.write(struct.pack("!I", len(body)) + body)
        requests.seek(0)
        replies = io.BytesIO()
        mp.serve_password_checks(requests, replies)
        self.assertEqual(replies.getvalue(), b"100100")

    def test_a_process_of_its_own_for_sha_crypt_and_another_when_it_dies(self):
        helper = mp.PasswordHelper()
        self.addCleanup(helper.close)
        entry = mp.parse_password_entry(SHA512_ALICE)
        self.assertTrue(helper.matches(mp.parse_password_entry(PBKDF2_ALICE), b"secret"))
        self.assertIsNone(helper.process, "PBKDF2 started a process: it releases the GIL")
        self.assertTrue(helper.matches(entry, b"secret"))
        self.assertFalse(helper.matches(entry, b"wrong"))
        first = helper.process.pid
        self.assertNotEqual(first, os.getpid())
        helper.process.kill()
        helper.process.wait()
        with self.assertRaisesRegex(RuntimeError, "password check process ended"):
            helper.matches(entry, b"secret")
        self.assertTrue(helper.matches(entry, b"secret"))
        self.assertNotEqual(helper.process.pid, first)
        process = helper.process
        helper.close()
        self.assertIsNotNone(process.returncode, "close() left the process running")


class PasswordCheckEndToEndTests(EndToEndTestCase):
    """Logins of a hashed [users] entry: checked in the worker's pool
    threads, the loop serving everyone else meanwhile."""

    def start(self, **mail):
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port, users={"alice": PBKDF2_ALICE}, **mail)
        return proxy, GatedPasswordCheck(self)

    def login(self, proxy, tag: str, login: str = "alice", password: str = "secret") -> Client:
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("%s LOGIN %s %s" % (tag, login, password))
        return client

    def test_another_session_is_served_while_a_password_is_checked(self):
        """Fails if the check runs on the event loop: the NOOP then gets no
        answer until the gate opens."""
        proxy, check = self.start()
        first = self.login(proxy, "a1")
        wait_until(lambda: check.calls, what="the check to start")
        other = self.connect(proxy)
        other.expect_line(mp.IMAP_GREETING)
        other.send("b1 NOOP")
        other.expect_line(b"b1 " + mp.IMAP_OK)
        self.assertEqual(check.inside, 1, "the check did not wait for the gate")
        check.gate.set()
        first.expect(rb"^a1 OK LOGIN completed\r\n$")
        self.assertIsNot(check.calls[0][1], proxy.thread, "the check ran in the loop's thread")

    def test_an_unknown_login_is_checked_the_same_way_against_the_dummy(self):
        """Issue 12: known and unknown logins through one path, to the same pool."""
        proxy, check = self.start(auth_delay="0")
        client = self.login(proxy, "a1", "nobody", "wrong")
        wait_until(lambda: check.calls, what="the check to start")
        check.gate.set()
        client.expect(rb"^a1 NO ")
        entry, thread = check.calls[0]
        self.assertEqual(entry, proxy.config.users.dummy)
        self.assertIsNot(thread, proxy.thread)

    def test_sha_crypt_is_checked_in_a_helper_process(self):
        """The gate is never opened: password_matches is not called in this
        process, yet the right password logs in and a wrong one is refused."""
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port, users={"alice": SHA512_ALICE},
                                 auth_delay="0")
        check = GatedPasswordCheck(self)
        self.login(proxy, "a1", password="wrong").expect(rb"^a1 NO ")
        self.login(proxy, "a2").expect(rb"^a2 OK LOGIN completed\r\n$")
        self.assertEqual(check.calls, [])

    def test_more_logins_than_the_pool_holds_wait_and_all_complete(self):
        # auth_delay 0: the login defence off, which would hold the 5th and
        # 6th logins from this address before the pool (AUTH_PENALTY_SLOTS).
        proxy, check = self.start(auth_delay="0")
        worker = proxy.worker
        worker.password_checks = mp.PasswordCheckPool(worker.loop, threads=1, limit=2)
        clients = [self.login(proxy, "a%d" % number) for number in range(6)]
        wait_until(lambda: (worker.password_checks.handed, len(worker.password_checks.waiting))
                   == (2, 4), what="two checks handed to the pool, four waiting")
        check.gate.set()
        for number, client in enumerate(clients):
            client.expect(rb"^a%d OK LOGIN completed\r\n$" % number)
        self.assertEqual(len(check.calls), 6)
        self.assertEqual(check.most_inside, 1, "one thread ran two checks at once")

    def test_a_session_that_closes_during_its_check_is_not_called_back(self):
        """The proxy reads nothing from a client in the auth phase (nginx
        neither), so a session ends there when the worker ends it (stop,
        worker_shutdown_timeout): here, the test, through the loop."""
        proxy, check = self.start()
        worker = proxy.worker
        worker.password_checks = mp.PasswordCheckPool(worker.loop, threads=1, limit=1)
        running = self.login(proxy, "a1")
        wait_until(lambda: check.calls, what="the first check to start")
        waiting = self.login(proxy, "a2")
        wait_until(lambda: worker.password_checks.waiting, what="the second check to wait")
        for session in proxy.sessions():
            worker.loop.call_soon_threadsafe(functools.partial(session.close, "ended by the test"))
        running.expect_closed()
        waiting.expect_closed()
        wait_until(lambda: not proxy.sessions(), what="both sessions to end")
        check.gate.set()
        wait_until(lambda: worker.password_checks.handed == 0, what="the check to come back")
        self.assertEqual(len(check.calls), 1, "a check cancelled while it waited ran")
        later = self.login(proxy, "a3")
        later.expect(rb"^a3 OK LOGIN completed\r\n$")
        proxy.assert_alive()
        self.assertNotIn("internal error", proxy.log)
        self.assertNotIn("login failed", proxy.log)

    def test_a_check_that_fails_ends_only_its_session(self):
        proxy, check = self.start()
        check.fail = RuntimeError("a bug in the check")
        client = self.login(proxy, "a1")
        other = self.connect(proxy)
        other.expect_line(mp.IMAP_GREETING)
        check.gate.set()
        client.expect_closed()
        proxy.wait_for_log(r"\[alert\].*internal error, session closed: RuntimeError")
        other.send("b1 NOOP")
        other.expect_line(b"b1 " + mp.IMAP_OK)
        proxy.assert_alive()


def resolve_client(test, answer, address="127.0.0.1", timeout=2.0, valid=None):
    """Run ClientNameLookup on a fresh loop against a FakeDns; (name, problem, dns)."""
    dns = FakeDns(answer)
    test.addCleanup(dns.close)
    loop = mp.EventLoop()
    test.addCleanup(loop.close)
    spec = mp.ResolverSpec(((socket.AF_INET, ("127.0.0.1", dns.port)),), valid, True, True)
    resolver = mp.Resolver(loop, spec, timeout)
    result = []
    mp.ClientNameLookup(resolver, address, lambda name, problem: result.append((name, problem)))
    deadline = time.monotonic() + timeout + 3
    while not result and time.monotonic() < deadline:
        loop.run_once(0.1)
    test.assertTrue(result, "no verdict")
    return result[0][0], result[0][1], dns, resolver


PTR_127_0_0_1 = "1.0.0.127.in-addr.arpa"


class ResolverTests(unittest.TestCase):
    GOOD = {(PTR_127_0_0_1, mp.DNS_PTR): [dns_record(b"\xc0\x0c", mp.DNS_PTR, "client.example")],
            ("client.example", mp.DNS_A): [dns_record(b"\xc0\x0c", mp.DNS_A, "127.0.0.1")]}

    def test_ptr_and_forward_match(self):
        name, problem, dns, resolver = resolve_client(self, records_for(self.GOOD))
        self.assertEqual((name, problem), ("client.example", ""))
        self.assertEqual(dns.queries, [(PTR_127_0_0_1, mp.DNS_PTR), ("client.example", mp.DNS_A)])

    def test_forward_mismatch(self):
        table = dict(self.GOOD)
        table[("client.example", mp.DNS_A)] = [dns_record(b"\xc0\x0c", mp.DNS_A, "127.0.0.99")]
        self.assertEqual(resolve_client(self, records_for(table))[0], "[UNAVAILABLE]")

    def test_nxdomain(self):
        name, problem, _, _ = resolve_client(self, records_for({}))
        self.assertEqual(name, "[UNAVAILABLE]")
        self.assertIn("could not be resolved (3: Host not found)", problem)

    def test_servfail_is_tempunavail(self):
        name, _, _, _ = resolve_client(self, lambda q, n, t: [dns_response(q, rcode=2)])
        self.assertEqual(name, "[TEMPUNAVAIL]")

    def test_timeout_is_tempunavail(self):
        started = time.monotonic()
        name, _, dns, _ = resolve_client(self, lambda q, n, t: [], timeout=1.5)
        self.assertEqual(name, "[TEMPUNAVAIL]")
        self.assertGreaterEqual(time.monotonic() - started, 1.4)
        self.assertGreaterEqual(len(dns.queries), 2)          # sent again after DNS_RESEND

    def test_zero_length_malformed_and_foreign_answers_are_ignored(self):
        def answer(query, qname, qtype):
            good = records_for(self.GOOD)(query, qname, qtype)[0]
            return [b"", b"\x00" * 5, good[:20], dns_response(query, qid=(query[0] << 8 | query[1]) ^ 1),
                    good]
        self.assertEqual(resolve_client(self, answer)[0], "client.example")

    def test_only_garbage_times_out(self):
        name, _, _, _ = resolve_client(self, lambda q, n, t: [b"\xff" * 30], timeout=1.2)
        self.assertEqual(name, "[TEMPUNAVAIL]")

    def test_compression_loop_does_not_hang(self):
        def answer(query, qname, qtype):
            looped = dns_response(query)[:-0 or None]
            return [looped[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + query[12:]
                    + b"\xc0\x0c\x00\x0c\x00\x01\x00\x00\x00\x3c\x00\x02\xc0\x2a"]
        name, _, _, _ = resolve_client(self, answer, timeout=1.2)
        self.assertEqual(name, "[TEMPUNAVAIL]")

    def test_invalid_ptr_name_is_tempunavail(self):
        table = dict(self.GOOD)
        table[(PTR_127_0_0_1, mp.DNS_PTR)] = [dns_record(b"\xc0\x0c", mp.DNS_PTR, "bad_name.example")]
        name, problem, dns, _ = resolve_client(self, records_for(table))
        self.assertEqual(name, "[TEMPUNAVAIL]")
        self.assertIn("invalid host name", problem)
        self.assertEqual(len(dns.queries), 1)                 # no forward lookup

    def test_cname_to_ptr(self):
        table = {(PTR_127_0_0_1, mp.DNS_PTR): [
            dns_record(b"\xc0\x0c", mp.DNS_CNAME, "1.sub.0.0.127.in-addr.arpa"),
            dns_record(dns_name("1.sub.0.0.127.in-addr.arpa"), mp.DNS_PTR, "client.example")],
            ("client.example", mp.DNS_A): self.GOOD[("client.example", mp.DNS_A)]}
        self.assertEqual(resolve_client(self, records_for(table))[0], "client.example")

    def test_answer_of_another_type_is_tempunavail_at_once(self):
        # nginx-tests mail_resolver.t "PTR type": a DNAME (39) answers the PTR query.
        table = dict(self.GOOD)
        table[(PTR_127_0_0_1, mp.DNS_PTR)] = [dns_record(b"\xc0\x0c", 39, "a.example.net")]
        started = time.monotonic()
        name, problem, dns, _ = resolve_client(self, records_for(table), timeout=3.0)
        self.assertEqual(name, "[TEMPUNAVAIL]")
        self.assertIn("(2: Server failure or timeout)", problem)
        self.assertLess(time.monotonic() - started, 0.9)
        self.assertEqual(len(dns.queries), 1)

    def test_dot_inside_a_ptr_label_is_tempunavail_at_once(self):
        # Labels "client.example" and "net": no host name; refused, not taken
        # for a malformed answer and waited out (resolver_timeout).
        table = dict(self.GOOD)
        table[(PTR_127_0_0_1, mp.DNS_PTR)] = [
            dns_record(b"\xc0\x0c", mp.DNS_PTR, b"\x0eclient.example\x03net\x00")]
        started = time.monotonic()
        name, problem, dns, _ = resolve_client(self, records_for(table), timeout=3.0)
        self.assertEqual(name, "[TEMPUNAVAIL]")
        self.assertIn('resolved to an invalid host name "client\\x5c.example.net"', problem)
        self.assertLess(time.monotonic() - started, 0.9)
        self.assertEqual(len(dns.queries), 1)

    def test_cname_targets_are_asked_for(self):
        # nginx-tests mail_resolver.t "CNAME" (TODO for nginx): the PTR query
        # is answered with a CNAME alone, and so is the A query.
        table = {(PTR_127_0_0_1, mp.DNS_PTR): [
            dns_record(b"\xc0\x0c", mp.DNS_CNAME, "1.1.0.0.127.in-addr.arpa")],
            ("1.1.0.0.127.in-addr.arpa", mp.DNS_PTR): [
                dns_record(b"\xc0\x0c", mp.DNS_PTR, "client.example")],
            ("client.example", mp.DNS_A): [dns_record(b"\xc0\x0c", mp.DNS_CNAME, "host.example", ttl=20)],
            ("host.example", mp.DNS_A): [dns_record(b"\xc0\x0c", mp.DNS_A, "127.0.0.1")]}
        name, problem, dns, resolver = resolve_client(self, records_for(table))
        self.assertEqual((name, problem), ("client.example", ""))
        self.assertEqual(dns.queries, [(PTR_127_0_0_1, mp.DNS_PTR),
                                       ("1.1.0.0.127.in-addr.arpa", mp.DNS_PTR),
                                       ("client.example", mp.DNS_A), ("host.example", mp.DNS_A)])
        expires = resolver.cache[("client.example", mp.DNS_A)][0]   # the CNAME's TTL counts
        self.assertAlmostEqual(expires - resolver.loop.time(), 20, delta=3)

    def test_cname_loop_and_unaskable_target_give_up_at_once(self):
        def loop(query, qname, qtype):
            other = "b.arpa" if qname != "b.arpa" else PTR_127_0_0_1
            return [dns_response(query, [dns_record(b"\xc0\x0c", mp.DNS_CNAME, other)])]
        unaskable = records_for({(PTR_127_0_0_1, mp.DNS_PTR): [
            dns_record(b"\xc0\x0c", mp.DNS_CNAME, b"\x03a.b\x04arpa\x00")]})
        for answer, queries in ((loop, mp.DNS_MAX_CNAMES + 1), (unaskable, 1)):
            started = time.monotonic()
            name, _, dns, _ = resolve_client(self, answer, timeout=3.0)
            self.assertEqual(name, "[TEMPUNAVAIL]")
            self.assertLess(time.monotonic() - started, 0.9)
            self.assertEqual(len(dns.queries), queries)

    def test_truncated_answer_without_records_is_tempunavail(self):
        name, _, _, _ = resolve_client(self, lambda q, n, t: [dns_response(q, truncated=True)])
        self.assertEqual(name, "[TEMPUNAVAIL]")

    def test_cache_honours_ttl_and_valid(self):
        _, _, dns, resolver = resolve_client(self, records_for(self.GOOD))
        result = []
        mp.ClientNameLookup(resolver, "127.0.0.1", lambda n, p: result.append(n))
        for _ in range(3):                                    # PTR, then A, from the cache
            resolver.loop.run_once(0.1)
        self.assertEqual(result, ["client.example"])
        self.assertEqual(len(dns.queries), 2)                 # answered from the cache
        expires = resolver.cache[("client.example", mp.DNS_A)][0]
        self.assertAlmostEqual(expires - resolver.loop.time(), 300, delta=5)
        _, _, _, resolver = resolve_client(self, records_for(self.GOOD), valid=7.0)
        expires = resolver.cache[("client.example", mp.DNS_A)][0]
        self.assertAlmostEqual(expires - resolver.loop.time(), 7, delta=2)

    def test_a_lookup_of_an_unsendable_name_answers_error(self):
        loop = mp.EventLoop()
        self.addCleanup(loop.close)
        spec = mp.ResolverSpec(((socket.AF_INET, ("127.0.0.1", 9)),), None, True, True)
        answers = []
        mp.Resolver(loop, spec, 1.0).lookup("a..b", mp.DNS_A, lambda *answer: answers.append(answer))
        loop.run_once(0.1)
        self.assertEqual(answers, [("error", [])])
        names = []
        mp.ClientNameLookup(mp.Resolver(loop, spec, 1.0), "fe80::1%eth0",
                            lambda name, problem: names.append(name))
        loop.run_once(0.1)
        self.assertEqual(names, ["[TEMPUNAVAIL]"])


class SmtpEndToEndResolverTests(EndToEndTestCase):
    GOOD = {(PTR_127_0_0_1, mp.DNS_PTR): [dns_record(b"\xc0\x0c", mp.DNS_PTR, "client.example")],
            ("client.example", mp.DNS_A): [dns_record(b"\xc0\x0c", mp.DNS_A, "127.0.0.1")]}

    def start_with_dns(self, answer, **mail):
        dns = FakeDns(answer)
        self.addCleanup(dns.close)
        backend = self.use(FakeSmtpBackend())
        proxy = self.start_proxy("smtp", backend.port, resolver="127.0.0.1:%d" % dns.port, **mail)
        return dns, backend, proxy

    def test_client_name_reaches_xclient(self):
        dns, backend, proxy = self.start_with_dns(records_for(self.GOOD))
        client = self.connect(proxy)
        self.smtp_hello(client)
        self.smtp_auth_plain(client)
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient(name=b"client.example") +
                         b"EHLO client.example\r\nQUIT\r\n")
        self.assertEqual(dns.queries, [(PTR_127_0_0_1, mp.DNS_PTR), ("client.example", mp.DNS_A)])

    def test_xclient_naming_another_address_drops_the_peers_name(self):
        """The resolver named the trusted peer; once XCLIENT names another
        address without NAME, the client's name is unknown, not the peer's."""
        dns, backend, proxy = self.start_with_dns(records_for(self.GOOD),
                                                  trusted_networks="127.0.0.1")
        client = self.connect(proxy)
        self.smtp_hello(client, ehlo=SMTP_XCLIENT_EHLO)
        client.send("XCLIENT ADDR=192.0.2.9")
        self.smtp_hello(client, ehlo=SMTP_XCLIENT_EHLO)
        self.smtp_auth_plain(client)
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\nXCLIENT ADDR=192.0.2.9 LOGIN=alice NAME=[UNAVAILABLE]"
                         b"\r\nEHLO client.example\r\nQUIT\r\n")
        proxy.wait_for_log(r'real client address 192\.0\.2\.9:0 \(XCLIENT\), name "\[UNAVAILABLE\]"')

    def test_cname_answer_to_ptr_is_followed(self):
        # nginx-tests mail_resolver.t "CNAME" (TODO for nginx itself).
        table = dict(self.GOOD)
        table[(PTR_127_0_0_1, mp.DNS_PTR)] = [
            dns_record(b"\xc0\x0c", mp.DNS_CNAME, "1.1.0.0.127.in-addr.arpa")]
        table[("1.1.0.0.127.in-addr.arpa", mp.DNS_PTR)] = self.GOOD[(PTR_127_0_0_1, mp.DNS_PTR)]
        dns, backend, proxy = self.start_with_dns(records_for(table))
        client = self.connect(proxy)
        self.smtp_hello(client)
        self.smtp_auth_plain(client)
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient(name=b"client.example") +
                         b"EHLO client.example\r\nQUIT\r\n")

    def test_dot_inside_a_ptr_label_greets_at_once(self):
        # The greeting waited the whole resolver_timeout (5 s) where nginx
        # answers at once; and a PTR answer of another type (mail_resolver.t
        # "PTR type") ends in [TEMPUNAVAIL] too.
        bad_name = dict(self.GOOD)
        bad_name[(PTR_127_0_0_1, mp.DNS_PTR)] = [
            dns_record(b"\xc0\x0c", mp.DNS_PTR, b"\x0eclient.example\x03net\x00")]
        other_type = dict(self.GOOD)
        other_type[(PTR_127_0_0_1, mp.DNS_PTR)] = [dns_record(b"\xc0\x0c", 39, "a.example.net")]
        for table in (bad_name, other_type):
            dns, backend, proxy = self.start_with_dns(records_for(table), resolver_timeout="5s")
            started = time.monotonic()
            client = self.connect(proxy)
            self.assertEqual(client.read_line(), SMTP_PROXY_GREETING)
            self.assertLess(time.monotonic() - started, 1.0)
            client.send("EHLO client.example")
            self.assertEqual(client.read_exactly(len(SMTP_PROXY_EHLO)), SMTP_PROXY_EHLO)
            self.smtp_auth_plain(client)
            self.smtp_quit(client)
            self.wait_for_backend(backend, 0, b"QUIT\r\n")
            self.assertEqual(bytes(backend.received[0]),
                             b"EHLO mail.test\r\n" + smtp_xclient(name=b"[TEMPUNAVAIL]") +
                             b"EHLO client.example\r\nQUIT\r\n")
            self.assertEqual(dns.queries, [(PTR_127_0_0_1, mp.DNS_PTR)])

    def test_silent_dns_gives_tempunavail_and_the_greeting_still_comes(self):
        dns, backend, proxy = self.start_with_dns(lambda query, name, qtype: [],
                                                  resolver_timeout="500ms")
        started = time.monotonic()
        client = self.connect(proxy)
        self.assertEqual(client.read_line(), SMTP_PROXY_GREETING)
        self.assertGreaterEqual(time.monotonic() - started, 0.45)
        client.send("EHLO client.example")
        self.assertEqual(client.read_exactly(len(SMTP_PROXY_EHLO)), SMTP_PROXY_EHLO)
        self.smtp_auth_plain(client)
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient(name=b"[TEMPUNAVAIL]") +
                         b"EHLO client.example\r\nQUIT\r\n")
        proxy.wait_for_log(r"127\.0\.0\.1 could not be resolved \(2: Server failure or timeout\) "
                           r"while in resolving client address")
        self.assertEqual(dns.queries, [(PTR_127_0_0_1, mp.DNS_PTR)])


# -- auth_http: success, the request byte by byte -----------------------------------

class AuthHttpEndToEndSuccessTests(EndToEndTestCase):
    def test_imap_login_request_bytes_and_backend_login(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port)
        client = self.connect(proxy)
        self.imap_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes()])
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)
        client.send("a2 NOOP")
        client.expect(rb"^a2 OK NOOP completed\r\n$")
        proxy.wait_for_log(r'client logged in while [^,]*, client: 127\.0\.0\.1, server: '
                           r'127\.0\.0\.1:%d, login: "alice", upstream: 127\.0\.0\.1:%d'
                           % (proxy.port, backend.port))

    def test_pop3_login_request_bytes_and_backend_login(self):
        backend = self.use(FakePop3Backend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("pop3", auth.port)
        client = self.connect(proxy)
        self.pop3_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes(protocol="pop3")])
        self.assertEqual(bytes(backend.received[0]), POP3_LOGIN_ON_THE_WIRE)

    def test_smtp_login_request_bytes_and_backend_login(self):
        backend = self.use(FakeSmtpBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("smtp", auth.port)
        client = self.connect(proxy)
        self.smtp_hello(client)
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(client.read_line(), mp.SMTP_AUTH_OK)
        self.assertEqual(auth.requests, [auth_request_bytes(protocol="smtp")])
        client.send("QUIT")
        self.assertEqual(client.read_line(), SMTP_BACKEND_BYE)
        wait_until(lambda: bytes(backend.received[0]).endswith(b"QUIT\r\n"))
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient() +
                         b"EHLO client.example\r\nQUIT\r\n")

    def test_login_and_password_are_escaped_and_auth_user_pass_override(self):
        # Space, %, CR, LF, NUL as %XX (upper case); UTF-8 and DEL unchanged.
        login = b"a l%i\rc\ne\x00\xc3\xa9\x7f"
        password = b"p w%\r\n\x00\xc3\xbc\x01"
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port, ("Auth-User", "alice"),
                                      ("Auth-Pass", "secret")))
        proxy = self.auth_http_proxy("imap", auth.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send(b"a1 LOGIN {%d}\r\n" % len(login))
        client.expect_line(mp.IMAP_NEXT)
        client.send(login + b" {%d}\r\n" % len(password))
        client.expect_line(mp.IMAP_NEXT)
        client.send(password + b"\r\n")
        client.expect(rb"^a1 OK LOGIN completed\r\n$")
        self.assertEqual(auth.requests, [auth_request_bytes(
            user=b"a%20l%25i%0Dc%0Ae%00\xc3\xa9\x7f", password=b"p%20w%25%0D%0A%00\xc3\xbc%01")])
        # The auth server's Auth-User / Auth-Pass are what the backend gets.
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)

    def test_pop3_auth_user_and_pass_override(self):
        backend = self.use(FakePop3Backend())
        auth = self.auth_server(auth_ok(backend.port, ("Auth-User", "alice"),
                                      ("Auth-Pass", "secret")))
        proxy = self.auth_http_proxy("pop3", auth.port)
        client = self.connect(proxy)
        client.expect_line(mp.POP3_GREETING)
        client.send("USER bob")
        client.expect_line(mp.POP3_OK)
        client.send("PASS hunter2")
        client.expect(rb"^\+OK alice has 1 message\r\n$")
        self.assertEqual(auth.requests, [auth_request_bytes(b"bob", b"hunter2", "pop3")])
        self.assertEqual(bytes(backend.received[0]), POP3_LOGIN_ON_THE_WIRE)

    def test_smtp_auth_user_and_pass_override_reach_auth_plain(self):
        backend = self.use(FakeSmtpBackend())
        auth = self.auth_server(auth_ok(backend.port, ("Auth-User", "alice"),
                                      ("Auth-Pass", "secret")))
        proxy = self.auth_http_proxy("smtp", auth.port, xclient="off", proxy_smtp_auth="on")
        client = self.connect(proxy)
        self.smtp_hello(client)
        client.send(b"AUTH PLAIN " + b64(b"\0bob\0hunter2") + b"\r\n")
        self.assertEqual(client.read_line(), mp.SMTP_AUTH_OK)
        self.assertEqual(auth.requests, [auth_request_bytes(b"bob", b"hunter2", "smtp")])
        self.assertEqual(backend.logins, [(b"alice", b"secret")])

    def test_smtp_external_without_auth_pass_is_a_4xx_and_no_backend_login(self):
        # nginx-tests mail_proxy_smtp_auth.t "auth external no password".
        backend = self.use(FakeSmtpBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("smtp", auth.port, proxy_smtp_auth="on",
                                     smtp_auth="login plain external")
        client = self.connect(proxy)
        self.smtp_hello(client, ehlo=b"250-mail.test\r\n250 AUTH PLAIN LOGIN EXTERNAL\r\n")
        client.send("AUTH EXTERNAL")
        client.expect(rb"^334 VXNlcm5hbWU6\r\n$")
        client.send(b64(b"test@example.com") + b"\r\n")
        self.assertEqual(client.read_line(), mp.SMTP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r"no password available: auth http server 127\.0\.0\.1:%d sent no "
                           r"Auth-Pass" % auth.port)
        self.assertEqual((backend.logins, backend.commands), ([], []))

    def test_imap_cram_md5_sends_salt_and_digest(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port, ("Auth-Pass", "secret")))
        proxy = self.auth_http_proxy("imap", auth.port, imap_auth="plain cram-md5")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 AUTHENTICATE CRAM-MD5")
        challenge = base64.b64decode(client.expect(rb"^\+ (\S+)\r\n$").group(1))
        self.assertRegex(challenge, rb"^<\d+\.\d+@mail\.test>$")
        digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().encode()
        client.send(b64(b"alice " + digest) + b"\r\n")
        client.expect(rb"^a1 OK LOGIN completed\r\n$")
        self.assertEqual(auth.requests, [auth_request_bytes(password=digest, method="cram-md5",
                                                            salt=challenge)])
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)

    def test_cram_md5_answer_without_auth_pass_is_an_internal_error(self):
        auth = self.auth_server(auth_ok(1143))
        proxy = self.auth_http_proxy("imap", auth.port, imap_auth="plain cram-md5")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 AUTHENTICATE CRAM-MD5")
        challenge = base64.b64decode(client.expect(rb"^\+ (\S+)\r\n$").group(1))
        digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().encode()
        client.send(b64(b"alice " + digest) + b"\r\n")
        self.assertEqual(client.read_line(), mp.IMAP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r"auth http server 127\.0\.0\.1:%d did not send password "
                           r"while in http auth state" % auth.port)

    def test_pop3_apop_sends_salt_and_digest(self):
        backend = self.use(FakePop3Backend())
        auth = self.auth_server(auth_ok(backend.port, ("Auth-Pass", "secret")))
        proxy = self.auth_http_proxy("pop3", auth.port, pop3_auth="plain apop")
        client = self.connect(proxy)
        salt = client.expect(rb"^\+OK POP3 ready (<\d+\.\d+@mail\.test>)\r\n$").group(1)
        digest = hashlib.md5(salt + b"secret").hexdigest().encode()
        client.send(b"APOP alice " + digest + b"\r\n")
        client.expect(rb"^\+OK alice has 1 message\r\n$")
        self.assertEqual(auth.requests, [auth_request_bytes(password=digest, protocol="pop3",
                                                            method="apop", salt=salt)])
        self.assertEqual(bytes(backend.received[0]), POP3_LOGIN_ON_THE_WIRE)

    def test_response_of_exactly_1024_bytes_and_bare_lf_lines_are_read(self):
        backend = self.use(FakeImapBackend())
        head = b"HTTP/1.0 200 OK\nAuth-Status:   OK  \nAuth-Server: 127.0.0.1\n" \
               b"Auth-Port: %d\nX-Pad: " % backend.port
        response = head + b"x" * (1024 - len(head) - 2) + b"\n\n"
        self.assertEqual(len(response), 1024)
        auth = self.auth_server(response)
        proxy = self.auth_http_proxy("imap", auth.port)
        client = self.connect(proxy)
        self.imap_login(client)

    def test_status_line_ignored_and_header_names_case_insensitive(self):
        backend = self.use(FakeImapBackend())
        port = str(backend.port).encode()
        auth = self.auth_server(
            b"HTTP/1.1 503 Service Unavailable\r\nauth-status: OK\r\nAUTH-SERVER: 127.0.0.1\r\n"
            b"auth-PORT: " + port + b"\r\n\r\nbody, ignored",
            b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: " + port + b"\r\n\r\n")
        proxy = self.auth_http_proxy("imap", auth.port)
        for _ in range(2):
            self.imap_login(self.connect(proxy))
        self.assertEqual(len(backend.received), 2)

    def test_auth_http_over_a_unix_socket(self):
        backend = self.use(FakeImapBackend())
        path = os.path.join(TempDir(self).path, "auth.sock")
        auth = self.use(AuthServer(auth_ok(backend.port), path=path))
        proxy = self.auth_http_proxy("imap", "unix:%s:/auth" % path)
        client = self.connect(proxy)
        self.imap_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes(host=b"localhost")])


# -- auth_http: failures, Auth-Wait and WAIT ----------------------------------------

class AuthHttpEndToEndFailureTests(EndToEndTestCase):
    def test_imap_failure_without_wait_replies_then_closes(self):
        auth = self.auth_server(auth_fail("Invalid login"))
        proxy = self.auth_http_proxy("imap", auth.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice wrong")
        self.assertEqual(client.read_line(), b"a1 NO Invalid login\r\n")
        client.expect_closed()
        proxy.wait_for_log(r'\[info\] \d+#0: \*1 client login failed: "Invalid login" '
                           r'while in auth state, client: 127\.0\.0\.1')

    def test_pop3_failure_without_wait(self):
        auth = self.auth_server(auth_fail("Go away"))
        proxy = self.auth_http_proxy("pop3", auth.port)
        client = self.connect(proxy)
        client.expect_line(mp.POP3_GREETING)
        client.send("USER alice")
        client.expect_line(mp.POP3_OK)
        client.send("PASS wrong")
        self.assertEqual(client.read_line(), b"-ERR Go away\r\n")
        client.expect_closed()

    def test_imap_failure_with_auth_wait_delays_and_keeps_the_session(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_fail("Invalid login", ("Auth-Wait", "1")),
                                auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        started = time.monotonic()
        client.send("a1 LOGIN alice wrong")
        self.assertEqual(client.read_line(), b"a1 NO Invalid login\r\n")
        self.assertGreaterEqual(time.monotonic() - started, 0.95)
        client.send("a2 LOGIN alice secret")
        client.expect(rb"^a2 OK LOGIN completed\r\n$")
        self.assertEqual(auth.requests, [auth_request_bytes(password=b"wrong"),
                                         auth_request_bytes(attempt=2)])
        self.assertEqual(bytes(backend.received[0]),
                         b"a2 LOGIN {5}\r\nalice {6}\r\nsecret\r\n")

    def test_smtp_failure_with_auth_error_code(self):
        auth = self.auth_server(auth_fail("Relay access denied", ("Auth-Error-Code", "550 5.7.1")))
        proxy = self.auth_http_proxy("smtp", auth.port)
        client = self.connect(proxy)
        self.smtp_hello(client)
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(client.read_line(), b"550 5.7.1 Relay access denied\r\n")
        client.expect_closed()

    def test_smtp_failure_default_code(self):
        auth = self.auth_server(auth_fail("Invalid login"))
        proxy = self.auth_http_proxy("smtp", auth.port)
        client = self.connect(proxy)
        self.smtp_hello(client)
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(client.read_line(), b"535 5.7.0 Invalid login\r\n")
        client.expect_closed()

    def test_client_leaving_during_the_auth_request_ends_it(self):
        # As nginx (ngx_mail_auth_http_block_read), the client is not read
        # while the auth server thinks: its close is seen at the latest when
        # auth_http_timeout ends the request; nothing is left open after that.
        auth = self.auth_server(AUTH_HOLD)
        proxy = self.auth_http_proxy("imap", auth.port, auth_http_timeout="500ms")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        auth.wait_requests(1)
        client.close()
        wait_until(lambda: auth.hung_up == 1, what="the proxy to close the auth connection")
        wait_until(lambda: not proxy.sessions(), what="the session to end")
        proxy.wait_for_log(r"session done: ")
        proxy.assert_alive()

    def test_wait_status_resends_the_same_request_after_auth_wait(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_response(("Auth-Status", "WAIT"), ("Auth-Wait", "1")),
                                auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port)
        client = self.connect(proxy)
        self.imap_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes(), auth_request_bytes()])   # attempt 1 both times
        self.assertGreaterEqual(auth.times[1] - auth.times[0], 0.95)
        self.assertLess(auth.times[1] - auth.times[0], 2.5)
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)


# -- auth_http: the auth server failing, an internal error --------------------------

class AuthHttpEndToEndInternalErrorTests(EndToEndTestCase):
    def test_auth_server_down_imap(self):
        closed = free_port()
        backend = self.use(FakeImapBackend())
        proxy = self.auth_http_proxy("imap", closed)
        self.login_gets_internal_error(self.connect(proxy), "imap")
        proxy.wait_for_log(r"\[error\] \d+#0: \*1 connect\(\) to auth http server "
                           r"127\.0\.0\.1:%d failed \(111: Connection refused\) while in http "
                           r'auth state, client: 127\.0\.0\.1, server: 127\.0\.0\.1:%d, '
                           r'login: "alice"' % (closed, proxy.port))
        self.assertEqual(backend.received, [])

    def test_auth_server_down_pop3_and_smtp(self):
        for protocol in ("pop3", "smtp"):
            with self.subTest(protocol=protocol):
                closed = free_port()
                proxy = self.auth_http_proxy(protocol, closed)
                self.login_gets_internal_error(self.connect(proxy), protocol)
                proxy.wait_for_log(r"connect\(\) to auth http server 127\.0\.0\.1:%d failed"
                                   % closed)

    def test_auth_server_stalls_past_auth_http_timeout(self):
        auth = self.auth_server(AUTH_STALL)
        self.assert_internal_error("imap", auth, r"auth http server %s timed out",
                                   auth_http_timeout="500ms")
        # The internal error came (and was read) no sooner than 500ms after the request.
        waited = time.monotonic() - auth.times[0]
        self.assertGreaterEqual(waited, 0.45)
        self.assertLess(waited, 2.5)

    def test_auth_server_closes_mid_response(self):
        auth = self.auth_server(auth_partial(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Ser"))
        self.assert_internal_error("pop3", auth,
                                   r"auth http server %s closed the connection prematurely")

    def test_response_over_1024_bytes(self):
        response = auth_ok(1143, ("X-Padding", "x" * 1100))
        auth = self.auth_server(response)
        self.assert_internal_error("imap", auth, r"auth http server %s sent too long response")

    def test_response_of_1025_bytes(self):
        head = b"HTTP/1.0 200 OK\nAuth-Status: OK\nAuth-Server: 127.0.0.1\n" \
               b"Auth-Port: 1143\nX-Pad: "
        response = head + b"x" * (1025 - len(head) - 2) + b"\n\n"
        self.assertEqual(len(response), 1025)
        auth = self.auth_server(response)
        self.assert_internal_error("imap", auth, r"auth http server %s sent too long response")

    def test_host_name_in_auth_server(self):
        auth = self.auth_server(answer=lambda request, index: auth_ok(self.backend_port,
                                                                      server="localhost"))
        self.assert_internal_error("smtp", auth,
                                   r'auth http server %s sent invalid server address:"localhost"')

    def test_bad_auth_port(self):
        for port in ("0", "65536", "x143"):
            with self.subTest(port=port):
                auth = self.auth_server(auth_response(("Auth-Status", "OK"),
                                                    ("Auth-Server", "127.0.0.1"),
                                                    ("Auth-Port", port)))
                self.assert_internal_error(
                    "imap", auth, r'auth http server %%s sent invalid server port:"%s"' % port)

    def test_missing_auth_server(self):
        auth = self.auth_server(auth_response(("Auth-Status", "OK"), ("Auth-Port", "143")))
        self.assert_internal_error("imap", auth, r"auth http server %s did not send server or port")

    def test_pop3_auth_pass_with_nul_is_an_internal_error(self):
        auth = self.auth_server(auth_ok(1143, ("Auth-Pass", b"se\x00cret")))
        self.assert_internal_error("pop3", auth, r"auth http server %s sent a login or "
                                                 r"password with CR, LF or NUL")

    def test_invalid_header_line(self):
        auth = self.auth_server(b"HTTP/1.0 200 OK\r\nAuth Status: OK\r\n\r\n")
        self.assert_internal_error("imap", auth,
                                   r"auth http server %s sent invalid header in response")

    def test_a_percent_sign_in_auth_server_is_an_internal_error_not_a_crash(self):
        auth = self.auth_server(auth_response(("Auth-Status", "OK"), ("Auth-Server", "%d%s"),
                                            ("Auth-Port", "143")))
        self.assert_internal_error("imap", auth,
                                   r'auth http server %s sent invalid server address:"%%d%%s"')


# -- auth_http: OAuth tokens --------------------------------------------------------

XOAUTH2_RESPONSE = b"user=alice\x01auth=Bearer ya29.TOKEN-1\x01\x01"
OAUTHBEARER_RESPONSE = b"n,a=alice,\x01auth=Bearer T0KEN\x01\x01"


class AuthHttpEndToEndOAuthTests(EndToEndTestCase):
    def oauth_proxy(self, auth_port: int, protocol: str = "imap"):
        directive = {"imap": "imap_auth", "pop3": "pop3_auth", "smtp": "smtp_auth"}[protocol]
        return self.auth_http_proxy(protocol, auth_port, **{directive: "plain xoauth2 oauthbearer"})

    def test_imap_xoauth2_with_auth_pass_logs_in_with_login(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port, ("Auth-Pass", "secret")))
        proxy = self.oauth_proxy(auth.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send(b"a1 AUTHENTICATE XOAUTH2 " + b64(XOAUTH2_RESPONSE) + b"\r\n")
        client.expect(rb"^a1 OK LOGIN completed\r\n$")
        self.assertEqual(auth.requests, [auth_request_bytes(password=b"ya29.TOKEN-1", method="xoauth2")])
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)

    def test_imap_xoauth2_without_auth_pass_hands_the_token_on(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.oauth_proxy(auth.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 AUTHENTICATE XOAUTH2")          # no initial response: empty prompt
        self.assertEqual(client.read_line(), b"+ \r\n")
        client.send(b64(XOAUTH2_RESPONSE) + b"\r\n")
        client.expect(rb"^a1 OK AUTHENTICATE completed\r\n$")
        self.assertEqual(auth.requests, [auth_request_bytes(password=b"ya29.TOKEN-1", method="xoauth2")])
        self.assertEqual(bytes(backend.received[0]),
                         b"a1 AUTHENTICATE XOAUTH2 " + b64(XOAUTH2_RESPONSE) + b"\r\n")

    def test_imap_oauthbearer_with_and_without_auth_pass(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port, ("Auth-Pass", "secret")), auth_ok(backend.port))
        proxy = self.oauth_proxy(auth.port)
        for number in (0, 1):
            client = self.connect(proxy)
            client.expect_line(mp.IMAP_GREETING)
            client.send(b"a1 AUTHENTICATE OAUTHBEARER " + b64(OAUTHBEARER_RESPONSE) + b"\r\n")
            client.expect(rb"^a1 OK (LOGIN|AUTHENTICATE) completed\r\n$")
            wait_until(lambda: len(backend.received) > number and backend.received[number])
        self.assertEqual(auth.requests, [auth_request_bytes(password=b"T0KEN", method="oauthbearer")] * 2)
        wait_until(lambda: bytes(backend.received[1]).endswith(b"\r\n"))
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)
        self.assertEqual(bytes(backend.received[1]),
                         b"a1 AUTHENTICATE OAUTHBEARER " + b64(OAUTHBEARER_RESPONSE) + b"\r\n")

    def test_pop3_xoauth2_without_auth_pass_hands_the_token_on(self):
        backend = self.use(FakePop3Backend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.oauth_proxy(auth.port, "pop3")
        client = self.connect(proxy)
        client.expect_line(mp.POP3_GREETING)
        client.send(b"AUTH XOAUTH2 " + b64(XOAUTH2_RESPONSE) + b"\r\n")
        client.expect(rb"^\+OK token accepted\r\n$")
        self.assertEqual(auth.requests, [auth_request_bytes(password=b"ya29.TOKEN-1", protocol="pop3",
                                                            method="xoauth2")])
        self.assertEqual(backend.auths, [b"AUTH XOAUTH2 " + b64(XOAUTH2_RESPONSE) + b"\r\n"])

    def test_imap_xoauth2_failure_default_error_challenge(self):
        auth = self.auth_server(auth_fail("Invalid token"))
        proxy = self.oauth_proxy(auth.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send(b"a1 AUTHENTICATE XOAUTH2 " + b64(XOAUTH2_RESPONSE) + b"\r\n")
        self.assertEqual(client.read_line(),
                         b"+ " + b64(b'{"status":"401","schemes":"bearer"}') + b"\r\n")
        client.send(b"\r\n")
        self.assertEqual(client.read_line(), b"a1 NO Invalid token\r\n")
        client.expect_closed()

    def test_imap_oauthbearer_failure_default_and_auth_error_sasl(self):
        custom = b'{"status":"invalid_token","scope":"mail","openid-configuration":"x"}'
        auth = self.auth_server(auth_fail("Bad token"),
                                auth_fail("Bad token", ("Auth-Error-SASL", custom)))
        proxy = self.oauth_proxy(auth.port)
        for error in (b'{"status":"invalid_token"}', custom):
            client = self.connect(proxy)
            client.expect_line(mp.IMAP_GREETING)
            client.send(b"a1 AUTHENTICATE OAUTHBEARER " + b64(OAUTHBEARER_RESPONSE) + b"\r\n")
            self.assertEqual(client.read_line(), b"+ " + b64(error) + b"\r\n")
            client.send(b"AQ==\r\n")
            self.assertEqual(client.read_line(), b"a1 NO Bad token\r\n")
            client.expect_closed()

    def test_imap_xoauth2_failure_with_auth_wait_keeps_the_session(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_fail("Invalid token", ("Auth-Wait", "1")),
                                auth_ok(backend.port, ("Auth-Pass", "secret")))
        proxy = self.oauth_proxy(auth.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send(b"a1 AUTHENTICATE XOAUTH2 " + b64(XOAUTH2_RESPONSE) + b"\r\n")
        self.assertEqual(client.read_line(),
                         b"+ " + b64(b'{"status":"401","schemes":"bearer"}') + b"\r\n")
        client.send(b"\r\n")
        self.assertEqual(client.read_line(), b"a1 NO Invalid token\r\n")
        client.send(b"a2 AUTHENTICATE XOAUTH2 " + b64(XOAUTH2_RESPONSE) + b"\r\n")
        client.expect(rb"^a2 OK LOGIN completed\r\n$")
        self.assertIn(b"Auth-Login-Attempt: 2\r\n", auth.requests[1])

    def test_smtp_xoauth2_failure_transcript(self):
        auth = self.auth_server(auth_fail("Invalid credentials", ("Auth-Error-Code", "535 5.7.8")))
        proxy = self.oauth_proxy(auth.port, "smtp")
        client = self.connect(proxy)
        self.smtp_hello(client, ehlo=b"250-mail.test\r\n250 AUTH PLAIN XOAUTH2 OAUTHBEARER\r\n")
        client.send(b"AUTH XOAUTH2 " + b64(XOAUTH2_RESPONSE) + b"\r\n")
        self.assertEqual(client.read_line(),
                         b"334 " + b64(b'{"status":"401","schemes":"bearer"}') + b"\r\n")
        client.send(b"\r\n")
        self.assertEqual(client.read_line(), b"535 5.7.8 Invalid credentials\r\n")
        client.expect_closed()
        self.assertEqual(auth.requests, [auth_request_bytes(password=b"ya29.TOKEN-1", protocol="smtp",
                                                            method="xoauth2")])

    def test_oauth_without_auth_http_is_refused_at_load(self):
        directory = TempDir(self)
        for protocol, directive in (("imap", "imap_auth"), ("pop3", "pop3_auth"),
                                    ("smtp", "smtp_auth")):
            with self.subTest(protocol=protocol):
                text = proxy_config(protocol, 1143, **{directive: "plain xoauth2"})
                path = directory.write("oauth.conf", text)
                with self.assertRaises(mp.ConfigErrors) as caught:
                    mp.load_config(path)
                self.assertIn("auth_http", str(caught.exception))
                self.assertIn("xoauth2", str(caught.exception))


# -- auth_http: extension headers, TLS and SMTP AUTH to the backend -----------------

class AuthHttpEndToEndExtensionHeaderTests(EndToEndTestCase):
    def test_auth_backend_tls_ssl(self):
        backend = self.use(FakeImapBackend(tls="implicit", context=self.backend_server_context()))
        auth = self.auth_server(auth_ok(backend.port, ("Auth-Backend-TLS", "ssl")))
        proxy = self.auth_http_proxy("imap", auth.port, proxy_ssl_trusted_certificate="ca.crt")
        client = self.connect(proxy)
        self.imap_login(client)
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)
        self.assertIn(backend.versions[0], ("TLSv1.2", "TLSv1.3"))

    def test_auth_backend_tls_ssl_with_untrusted_certificate_fails(self):
        backend = self.use(FakeImapBackend(tls="implicit", context=self.backend_server_context()))
        auth = self.auth_server(auth_ok(backend.port, ("Auth-Backend-TLS", "ssl")))
        proxy = self.auth_http_proxy("imap", auth.port, proxy_ssl_trusted_certificate="wrongca.crt")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        self.assertEqual(client.read_line(), mp.IMAP_INTERNAL_ERROR)
        client.expect_closed()

    def test_auth_smtp_auth_login(self):
        backend = self.use(FakeSmtpBackend())
        auth = self.auth_server(auth_ok(backend.port, ("Auth-SMTP-Auth", "login")))
        proxy = self.auth_http_proxy("smtp", auth.port, xclient="off")
        client = self.connect(proxy)
        self.smtp_hello(client)
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(client.read_line(), mp.SMTP_AUTH_OK)
        client.send("QUIT")
        self.assertEqual(client.read_line(), SMTP_BACKEND_BYE)
        wait_until(lambda: bytes(backend.received[0]).endswith(b"QUIT\r\n"))
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\nAUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\nQUIT\r\n")
        self.assertEqual(backend.logins, [(b"alice", b"secret")])

    def test_auth_smtp_auth_none_with_proxy_smtp_auth_on(self):
        backend = self.use(FakeSmtpBackend())
        auth = self.auth_server(auth_ok(backend.port, ("Auth-SMTP-Auth", "none")))
        proxy = self.auth_http_proxy("smtp", auth.port, xclient="off", proxy_smtp_auth="on")
        client = self.connect(proxy)
        self.smtp_hello(client)
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(client.read_line(), mp.SMTP_AUTH_OK)
        client.send("QUIT")
        self.assertEqual(client.read_line(), SMTP_BACKEND_BYE)
        wait_until(lambda: bytes(backend.received[0]).endswith(b"QUIT\r\n"))
        self.assertEqual(bytes(backend.received[0]), b"EHLO mail.test\r\nQUIT\r\n")
        self.assertEqual(backend.logins, [])

    def test_invalid_auth_backend_tls_is_an_internal_error(self):
        auth = self.auth_server(auth_ok(1143, ("Auth-Backend-TLS", "maybe")))
        self.assert_internal_error("imap", auth,
                                   r'auth http server %s sent invalid Auth-Backend-TLS:"maybe"')


# -- auth_http: where nginx's behaviour is subtle -----------------------------------

class AuthHttpEndToEndNginxParityTests(EndToEndTestCase):
    def test_client_timeout_is_off_while_the_auth_server_answers(self):
        # nginx's ngx_mail_auth() deletes the client's read timer before it
        # asks the auth server: only auth_http_timeout bounds that wait.
        # mailproxy leaves ``timeout`` running (Session._authenticate), so an
        # auth server slower than ``timeout`` gets the client cut off silently.
        backend = self.use(FakeImapBackend())

        def slow(request, index):
            time.sleep(1.0)
            return auth_ok(backend.port)
        auth = self.auth_server(answer=slow)
        proxy = self.auth_http_proxy("imap", auth.port, timeout="500ms", auth_http_timeout="5s")
        client = self.connect(proxy)
        self.imap_login(client)
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)

    def test_response_without_auth_status_is_judged_by_server_and_port(self):
        # ngx_mail_auth_http_process_headers: only an Auth-Status other than
        # OK / WAIT makes a failure; without the header nginx goes on to
        # Auth-Server / Auth-Port and logs in.  mailproxy answers "a1 NO " (an
        # empty failure text) and closes (interpret_auth_response).
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_response(("Auth-Server", "127.0.0.1"),
                                            ("Auth-Port", str(backend.port))))
        proxy = self.auth_http_proxy("imap", auth.port)
        client = self.connect(proxy)
        self.imap_login(client)

    def test_response_without_auth_status_nor_server_is_an_internal_error(self):
        auth = self.auth_server(auth_response(("X-Nothing", "here")))
        self.assert_internal_error("imap", auth, r"auth http server %s did not send server or port")


# -- auth_http: retries in one session (nginx CVE-2026-27651, CVE-2025-53859) -------

def auth_headers(request: bytes) -> dict:
    """The header lines of an auth_http request: {name: value}, raw."""
    lines = request.split(b"\r\n")[1:]
    return dict(line.split(b": ", 1) for line in lines if b": " in line)


def auth_login(request: bytes) -> bytes:
    return auth_headers(request)[b"Auth-User"]


class CheckingAuthServer(AuthServer):
    """An auth server that checks as a real one would: the password, or the
    APOP or CRAM-MD5 digest made with the Auth-Salt it is sent, against
    ``password`` whatever the login; yes means log in to ``backend_port``
    as alice, "secret"; no comes with Auth-Wait: 1, so the session goes on
    (NGINX-MAIL.md §1.3).  A request that mixed one attempt's method, salt
    or password with another's would be refused: the client sees it too."""

    def __init__(self, backend_port: int, password: bytes = b"secret"):
        self.backend_port = backend_port
        self.password = password
        super().__init__(answer=self.check)

    def check(self, request: bytes, index: int) -> bytes:
        headers = auth_headers(request)
        method, given = headers.get(b"Auth-Method"), headers.get(b"Auth-Pass")
        salt = headers.get(b"Auth-Salt", b"")
        right = {b"plain": self.password,
                 b"apop": hashlib.md5(salt + self.password).hexdigest().encode(),
                 b"cram-md5": hmac.new(self.password, salt, hashlib.md5).hexdigest().encode()}
        if method in right and given == right[method] and (method == b"plain") == (not salt):
            return auth_ok(self.backend_port, ("Auth-User", "alice"), ("Auth-Pass", "secret"))
        return auth_fail("Invalid login", ("Auth-Wait", "1"))


def cram_md5_answer(client: Client, prompt: bytes, login: bytes, password: bytes) -> tuple:
    """Read the CRAM-MD5 challenge after ``prompt`` ("+ ", "334 "), answer
    it for ``login`` (RFC 2195, computed here): (challenge, digest)."""
    challenge = base64.b64decode(client.expect(re.escape(prompt) + rb"(\S+)\r\n$").group(1))
    digest = hmac.new(password, challenge, hashlib.md5).hexdigest().encode()
    client.send(b64(login + b" " + digest) + b"\r\n")
    return challenge, digest


class AuthHttpEndToEndRetryTests(EndToEndTestCase):
    """A client that gets Auth-Wait may try again in the same session, with
    any method.  nginx 1.29.7 fixed a worker crash when CRAM-MD5 or APOP
    were tried again (CVE-2026-27651), 1.29.1 a stale login and password
    sent to the auth server for smtp_auth none after a failed AUTH
    (CVE-2025-53859): each request must be its own attempt's, whole."""

    def imap_retries_cram_md5(self, proxy: ProxyUnderTest) -> list:
        """carol: CRAM-MD5 wrong, wrong again, then right."""
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        expected = []
        for number, password in enumerate((b"wrong", b"wronger", b"secret"), 1):
            client.send("c%d AUTHENTICATE CRAM-MD5" % number)
            salt, digest = cram_md5_answer(client, b"+ ", b"carol", password)
            expected.append(auth_request_bytes(b"carol", digest, attempt=number,
                                               method="cram-md5", salt=salt))
            if number < 3:
                client.expect_line(b"c%d NO Invalid login\r\n" % number)
        client.expect_line(b"c3 OK LOGIN completed\r\n")
        imap_logout(client)
        return expected

    def imap_mixes_methods(self, proxy: ProxyUnderTest) -> list:
        """dave: CRAM-MD5 cancelled, CRAM-MD5 wrong, LOGIN wrong, CRAM-MD5 right."""
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("d1 AUTHENTICATE CRAM-MD5")
        client.expect(rb"^\+ \S+\r\n$")
        client.send("*")                                   # no request: nothing to check
        client.expect_line(b"d1 " + mp.IMAP_INVALID)
        client.send("d2 AUTHENTICATE CRAM-MD5")
        salt, digest = cram_md5_answer(client, b"+ ", b"dave", b"wrong")
        expected = [auth_request_bytes(b"dave", digest, attempt=1, method="cram-md5", salt=salt)]
        client.expect_line(b"d2 NO Invalid login\r\n")
        client.send("d3 LOGIN dave wrong")
        expected.append(auth_request_bytes(b"dave", b"wrong", attempt=2))
        client.expect_line(b"d3 NO Invalid login\r\n")
        client.send("d4 AUTHENTICATE CRAM-MD5")
        salt, digest = cram_md5_answer(client, b"+ ", b"dave", b"secret")
        expected.append(auth_request_bytes(b"dave", digest, attempt=3, method="cram-md5", salt=salt))
        client.expect_line(b"d4 OK LOGIN completed\r\n")
        imap_logout(client)
        return expected

    def pop3_retries_apop(self, proxy: ProxyUnderTest) -> list:
        """erin: APOP wrong, wrong again, then right."""
        client = self.connect(proxy)
        salt = client.expect(rb"^\+OK POP3 ready (<[^>]+>)\r\n$").group(1)
        expected = []
        for number, password in enumerate((b"wrong", b"wronger", b"secret"), 1):
            digest = hashlib.md5(salt + password).hexdigest().encode()
            client.send(b"APOP erin " + digest + b"\r\n")
            expected.append(auth_request_bytes(b"erin", digest, "pop3", attempt=number,
                                               method="apop", salt=salt))
            if number < 3:
                client.expect_line(b"-ERR Invalid login\r\n")
        client.expect(rb"^\+OK alice has 1 message\r\n$")
        client.send("QUIT")
        client.expect(rb"^\+OK bye\r\n$")
        return expected

    def pop3_mixes_methods(self, proxy: ProxyUnderTest) -> list:
        """frank: APOP wrong, AUTH CRAM-MD5 wrong, then USER and PASS right."""
        client = self.connect(proxy)
        salt = client.expect(rb"^\+OK POP3 ready (<[^>]+>)\r\n$").group(1)
        digest = hashlib.md5(salt + b"wrong").hexdigest().encode()
        client.send(b"APOP frank " + digest + b"\r\n")
        expected = [auth_request_bytes(b"frank", digest, "pop3", attempt=1, method="apop",
                                       salt=salt)]
        client.expect_line(b"-ERR Invalid login\r\n")
        client.send("AUTH CRAM-MD5")
        challenge, digest = cram_md5_answer(client, b"+ ", b"frank", b"wronger")
        expected.append(auth_request_bytes(b"frank", digest, "pop3", attempt=2,
                                           method="cram-md5", salt=challenge))
        client.expect_line(b"-ERR Invalid login\r\n")
        client.send("USER frank")
        client.expect_line(mp.POP3_OK)
        client.send("PASS secret")
        expected.append(auth_request_bytes(b"frank", b"secret", "pop3", attempt=3))
        client.expect(rb"^\+OK alice has 1 message\r\n$")
        client.send("QUIT")
        client.expect(rb"^\+OK bye\r\n$")
        return expected

    def smtp_retries_cram_md5(self, proxy: ProxyUnderTest) -> list:
        """grace: AUTH CRAM-MD5 wrong, then right."""
        client = self.connect(proxy)
        self.smtp_hello(client, ehlo=b"250-mail.test\r\n250 AUTH PLAIN LOGIN CRAM-MD5\r\n")
        expected = []
        for number, password in enumerate((b"wrong", b"secret"), 1):
            client.send("AUTH CRAM-MD5")
            salt, digest = cram_md5_answer(client, b"334 ", b"grace", password)
            expected.append(auth_request_bytes(b"grace", digest, "smtp", attempt=number,
                                               method="cram-md5", salt=salt))
            if number == 1:                        # refused, after the Auth-Wait second
                self.assertEqual(client.read_line(), b"535 5.7.0 Invalid login\r\n")
        self.assertEqual(client.read_line(), mp.SMTP_AUTH_OK)
        self.smtp_quit(client)
        return expected

    def test_cram_md5_and_apop_tried_again_make_whole_requests_and_the_worker_lives(self):
        """Five sessions at once on three protocols: each request the auth
        server gets is byte for byte its attempt's (method, login, the
        digest and the salt it was made with; no salt for a password;
        the attempt's number), and the right answers log in."""
        proxies, auths = {}, {}
        for protocol, methods in (("imap", "plain cram-md5"), ("pop3", "plain apop cram-md5"),
                                  ("smtp", "plain login cram-md5")):
            backend = self.use(FAKE_BACKENDS[protocol]())
            auths[protocol] = self.use(CheckingAuthServer(backend.port))
            proxies[protocol] = self.auth_http_proxy(
                protocol, auths[protocol].port, **{protocol + "_auth": methods})
        sessions = {b"carol": (self.imap_retries_cram_md5, "imap"),
                    b"dave": (self.imap_mixes_methods, "imap"),
                    b"erin": (self.pop3_retries_apop, "pop3"),
                    b"frank": (self.pop3_mixes_methods, "pop3"),
                    b"grace": (self.smtp_retries_cram_md5, "smtp")}
        expected = in_threads(*[lambda run=run, protocol=protocol: run(proxies[protocol])
                                for run, protocol in sessions.values()])
        for login, requests in zip(sessions, expected):
            auth = auths[sessions[login][1]]
            got = [request for request in list(auth.requests) if auth_login(request) == login]
            self.assertEqual(got, requests, login)
        for proxy in proxies.values():
            proxy.assert_alive()
            self.assertNotIn("[alert]", proxy.log)

    def test_smtp_auth_none_after_a_failed_auth_sends_no_login_or_password(self):
        """smtp_auth none beside other methods: AUTH LOGIN given a login and
        cancelled, AUTH PLAIN refused after Auth-Wait, then MAIL and RCPT
        without AUTH.  The request for them says Auth-User and Auth-Pass
        empty, as nginx >= 1.29.1 (CVE-2025-53859; NGINX-MAIL.md §1.2.8),
        and the backend's XCLIENT carries no LOGIN."""
        backend = self.use(FakeSmtpBackend())
        auth = self.auth_server(auth_fail("Invalid login", ("Auth-Wait", "1")),
                                auth_ok(backend.port))
        proxy = self.auth_http_proxy("smtp", auth.port, smtp_auth="plain login none")
        client = self.connect(proxy)
        self.smtp_hello(client)                       # "none" is no AUTH method
        client.send(b"AUTH LOGIN " + b64(b"mallory") + b"\r\n")
        self.assertEqual(client.read_line(), b"334 UGFzc3dvcmQ6\r\n")
        client.send("*")
        self.assertEqual(client.read_line(), mp.SMTP_INVALID)
        client.send(b"AUTH PLAIN " + b64(b"\0mallory\0guess") + b"\r\n")
        self.assertEqual(client.read_line(), b"535 5.7.0 Invalid login\r\n")
        client.send("MAIL FROM:<mallory@example.com>")
        self.assertEqual(client.read_line(), mp.SMTP_OK)
        client.send("RCPT TO:<bob@example.com>")
        self.assertEqual(client.read_line(), SMTP_BACKEND_RCPT_OK)
        self.assertEqual(auth.requests, [
            auth_request_bytes(b"mallory", b"guess", "smtp"),
            auth_request_bytes(b"", b"", "smtp", attempt=2, method="none",
                               middle=b"Auth-SMTP-Helo: client.example\r\n"
                                      b"Auth-SMTP-From: MAIL FROM:<mallory@example.com>\r\n"
                                      b"Auth-SMTP-To: RCPT TO:<bob@example.com>\r\n")])
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient(login=b"") +
                         b"EHLO client.example\r\nMAIL FROM:<mallory@example.com>\r\n"
                         b"RCPT TO:<bob@example.com>\r\nQUIT\r\n")
        # Nor does the log say the session logged in as mallory (nginx
        # names no login once MAIL has forgotten it).
        proxy.wait_for_log(r'client login failed: "Invalid login" .*login: "mallory"\n')
        done = proxy.wait_for_log(r"session done: .*\n").group(0)
        self.assertNotIn("login:", done)
        self.assertNotIn("login:", proxy.wait_for_log(r"client logged in .*\n").group(0))


# ========================================================================== #
# ####                             Sessions                             #### #
# ========================================================================== #
# One client from connect to close, end to end (the real proxy, a Worker in
# a thread, between a test client and fake backends): logins and the relay
# that follows for IMAP, POP3 and SMTP (with smtplib too), pipelining, the
# greeting delay, clients that misbehave or are hostile, the PROXY header a
# client's load balancer sends.

# -- the phases ---------------------------------------------------------------------

class PhaseTableTests(unittest.TestCase):
    """Session._enter goes only where PHASE_CHANGES says, and each phase
    has its rules."""

    def test_the_legal_changes_of_phase(self):
        P = mp.Phase
        opening = (P.PROXY_HEADER, P.HANDSHAKE, P.RESOLVING, P.GREETING_DELAY)
        expected = (
            {(None, P.ACCEPTED)} |
            {(P.ACCEPTED, phase) for phase in opening + (P.DIALOGUE,)} |
            {(P.PROXY_HEADER, phase) for phase in (P.HANDSHAKE, P.RESOLVING, P.GREETING_DELAY,
                                                   P.DIALOGUE)} |
            {(P.HANDSHAKE, phase) for phase in (P.RESOLVING, P.GREETING_DELAY, P.DIALOGUE,
                                                P.CLOSING)} |
            {(P.RESOLVING, P.GREETING_DELAY), (P.RESOLVING, P.DIALOGUE),
             (P.GREETING_DELAY, P.DIALOGUE), (P.GREETING_DELAY, P.CLOSING),
             (P.DIALOGUE, P.HANDSHAKE), (P.DIALOGUE, P.AUTH), (P.DIALOGUE, P.CLOSING),
             (P.AUTH, P.DIALOGUE), (P.AUTH, P.CONNECT), (P.AUTH, P.CLOSING),
             (P.AUTH, P.RELAY),                    # auth = backend: logged in already
             (P.CONNECT, P.LOGIN), (P.CONNECT, P.CLOSING), (P.LOGIN, P.RELAY),
             (P.LOGIN, P.CLOSING)})
        self.assertEqual(set(mp.PHASE_CHANGES), expected)
        # Nothing leaves the relay or the closing phase but close().
        self.assertFalse([change for change in mp.PHASE_CHANGES if change[0] in (P.RELAY, P.CLOSING)])
        self.assertEqual(set(mp.PHASES), set(P))

    def test_an_illegal_change_is_a_bug_that_ends_the_session(self):
        """_enter refuses a change not in the table; the session, not the
        worker, ends (loop_callback)."""
        backend = FakeImapBackend()
        self.addCleanup(backend.close)
        proxy = ProxyUnderTest(proxy_config("imap", backend.port))
        self.addCleanup(proxy.stop)
        with unittest.mock.patch.object(mp, "PHASE_CHANGES", mp.PHASE_CHANGES - {
                (mp.Phase.DIALOGUE, mp.Phase.AUTH)}):
            client = Client(proxy.port)
            self.addCleanup(client.close)
            client.expect_line(mp.IMAP_GREETING)
            client.send("a1 LOGIN alice secret")
            client.expect_closed()
        proxy.wait_for_log(r"\[alert\] .*internal error, session closed: RuntimeError\('no way "
                           r"from phase dialogue to auth'\)")
        proxy.assert_alive()


# -- happy paths --------------------------------------------------------------------

class XclientClientTests(unittest.TestCase):
    """What a trusted peer's XCLIENT makes of the session's client."""

    def test_named_attributes_replace_the_others_stay(self):
        peer = ("127.0.0.1", 40000, "webmail.example")
        def after(address=b"", port=b"", name=None):
            return mp.xclient_client(mp.ClientIdentity(address, port, name, "XCLIENT"), peer)
        self.assertEqual(after(b"192.0.2.9", b"4711"), ("192.0.2.9", 4711, "[UNAVAILABLE]"))
        self.assertEqual(after(b"192.0.2.9"), ("192.0.2.9", 0, "[UNAVAILABLE]"))
        self.assertEqual(after(b"192.0.2.9", name=b"c.example"), ("192.0.2.9", 0, "c.example"))
        self.assertEqual(after(b"2001:db8::9", name=b"[TEMPUNAVAIL]"),
                         ("2001:db8::9", 0, "[TEMPUNAVAIL]"))
        self.assertEqual(after(b"127.0.0.1"), peer)                 # the same address: as it was
        self.assertEqual(after(port=b"4711"), ("127.0.0.1", 4711, "webmail.example"))
        self.assertEqual(after(name=b"c.example"), ("127.0.0.1", 40000, "c.example"))


class ImapEndToEndTests(EndToEndTestCase):
    def test_login_then_10_mb_each_way(self):
        message = message_bytes(10 * MEGABYTE)
        backend = self.use(FakeImapBackend(message=message, capability=True))
        proxy = self.start_proxy("imap", backend.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        # The backend's answer to the login, untagged CAPABILITY included.
        client.expect(rb"^\* CAPABILITY IMAP4rev1 FAKE-BACKEND\r\n$")
        client.expect(rb"^a1 OK LOGIN completed\r\n$")
        # The client's tag and the login as literals, nothing else.
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)

        # 10 MB backend -> client.
        client.send("a2 FETCH 1 BODY[]")
        client.expect(rb"^\* 1 FETCH \(BODY\[\] \{10485760\}\r\n$")
        self.assertSameBytes(client.read_exactly(len(message)), message, "FETCH through the proxy")
        client.expect(rb"^\)\r\n$")
        client.expect(rb"^a2 OK FETCH completed\r\n$")

        # 10 MB client -> backend: the backend says the sha256 of what it got.
        upload = message_bytes(10 * MEGABYTE + 1)
        client.send("a3 APPEND INBOX {%d}" % len(upload))
        client.expect(rb"^\+ Ready for literal data\r\n$")
        client.send(upload + b"\r\n")
        client.expect(b"^a3 OK APPEND completed, sha256 %s\r\n$" % sha256_hex(upload).encode())

        client.send("a4 LOGOUT")
        client.expect(rb"^\* BYE fake IMAP logging out\r\n$")
        client.expect(rb"^a4 OK LOGOUT completed\r\n$")
        client.expect_closed()
        self.assertSameBytes(
            bytes(backend.received[0]),
            IMAP_LOGIN_ON_THE_WIRE + b"a2 FETCH 1 BODY[]\r\n" +
            b"a3 APPEND INBOX {10485761}\r\n" + upload + b"\r\n" + b"a4 LOGOUT\r\n",
            "what the backend received")
        self.assertEqual(len(backend.received), 1)

    def test_pipelined_commands_follow_the_login(self):
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port)
        client = self.connect(proxy)
        client.send(b"a1 LOGIN alice secret\r\na2 NOOP\r\na3 LOGOUT\r\n")     # one send()
        client.expect_line(mp.IMAP_GREETING)
        client.expect(rb"^a1 OK LOGIN completed\r\n$")
        client.expect(rb"^a2 OK NOOP completed\r\n$")
        client.expect(rb"^\* BYE fake IMAP logging out\r\n$")
        client.expect(rb"^a3 OK LOGOUT completed\r\n$")
        client.expect_closed()
        self.assertEqual(bytes(backend.received[0]),
                         IMAP_LOGIN_ON_THE_WIRE + b"a2 NOOP\r\na3 LOGOUT\r\n")

    def test_invalid_command_with_non_synchronizing_literal(self):
        # nginx-tests mail_imap.t "invalid with non-sync literal", "literal not command".
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port)
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send(b"a03 FOOBAR {10+}\r\ntest test \r\na04 NOOP\r\n")
        client.expect_line(b"a03 BAD invalid command\r\n")
        client.expect_line(b"a04 OK completed\r\n")
        client.send(b"a05 FOOBAR {10}\r\n")
        client.expect_line(b"a05 BAD invalid command\r\n")
        client.send(b"a06 LOGIN alice secret\r\n")
        client.expect(rb"^a06 OK LOGIN completed\r\n$")

    def test_wrong_password_waits_auth_delay_and_the_session_goes_on(self):
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port, auth_delay="200ms")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        started = time.monotonic()
        client.send("a1 LOGIN alice wrong")
        client.expect_line(b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.2)
        self.assertLess(elapsed, 2.0)
        proxy.wait_for_log(r'client login failed: "wrong password" while in auth state, '
                           r'client: 127\.0\.0\.1, .*login: "alice"')
        self.assertEqual(backend.received, [], "a wrong password must not reach the backend")
        # Same connection, right password.
        client.send("a2 LOGIN alice secret")
        client.expect(rb"^a2 OK LOGIN completed\r\n$")
        client.send("a3 LOGOUT")
        client.expect(rb"^\* BYE")
        client.expect(rb"^a3 OK LOGOUT completed\r\n$")
        self.assertEqual(bytes(backend.received[0]),
                         IMAP_LOGIN_ON_THE_WIRE.replace(b"a1", b"a2") + b"a3 LOGOUT\r\n")

    def test_access_line_when_the_session_ends(self):
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port)
        client = self.connect(proxy)
        self.imap_login(client)
        client.send("a2 NOOP")
        client.expect(rb"^a2 OK NOOP completed\r\n$")
        client.send("a3 LOGOUT")
        client.expect(rb"^\* BYE")
        client.expect(rb"^a3 OK LOGOUT completed\r\n$")
        client.expect_closed()
        proxy.wait_for_log(r"session done:")
        lines = [line for line in proxy.log.splitlines() if "session done:" in line]
        self.assertEqual(len(lines), 1, proxy.log)
        self.assertRegex(lines[0], r"\[info\] \d+#0: \*1 session done: [a-z ]+, "
                         r"%d bytes from client, %d bytes to client, \d+\.\d{3}s, "
                         r'client: 127\.0\.0\.1, server: 127\.0\.0\.1:%d, '
                         r'login: "alice", upstream: 127\.0\.0\.1:%d, '
                         r'tls: off, auth: plain, upstream tls: off$'
                         % (client.sent, client.received, proxy.port, backend.port))


class Pop3EndToEndTests(EndToEndTestCase):
    def test_login_then_10_mb_each_way(self):
        message = message_bytes(10 * MEGABYTE)
        backend = self.use(FakePop3Backend(message=message))
        proxy = self.start_proxy("pop3", backend.port)
        client = self.connect(proxy)
        client.expect_line(mp.POP3_GREETING)
        client.send("USER alice")
        client.expect_line(mp.POP3_OK)                        # the proxy's
        client.send("PASS secret")
        client.expect(rb"^\+OK alice has 1 message\r\n$")    # the backend's
        self.assertEqual(bytes(backend.received[0]), POP3_LOGIN_ON_THE_WIRE)

        client.send("RETR 1")
        client.expect(rb"^\+OK 10485760 octets\r\n$")
        self.assertSameBytes(client.read_exactly(len(message)), message, "RETR through the proxy")
        client.expect(rb"^\r\n$")
        client.expect(rb"^\.\r\n$")

        upload = message_bytes(10 * MEGABYTE + 1)
        client.send("XPUT %d" % len(upload))
        client.expect(rb"^\+OK send 10485761 octets\r\n$")
        client.send(upload)
        client.expect(b"^\\+OK got them, sha256 %s\r\n$" % sha256_hex(upload).encode())

        client.send("QUIT")
        client.expect(rb"^\+OK bye\r\n$")
        client.expect_closed()
        self.assertSameBytes(
            bytes(backend.received[0]),
            POP3_LOGIN_ON_THE_WIRE + b"RETR 1\r\nXPUT 10485761\r\n" + upload + b"QUIT\r\n",
            "what the backend received")

    def test_pipelined_commands_follow_the_login(self):
        backend = self.use(FakePop3Backend(message=b"x" * 1234))
        proxy = self.start_proxy("pop3", backend.port)
        client = self.connect(proxy)
        client.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nQUIT\r\n")     # one send()
        client.expect_line(mp.POP3_GREETING)
        client.expect_line(mp.POP3_OK)
        client.expect(rb"^\+OK alice has 1 message\r\n$")
        client.expect(rb"^\+OK 1 1234\r\n$")
        client.expect(rb"^\+OK bye\r\n$")
        client.expect_closed()
        self.assertEqual(bytes(backend.received[0]), POP3_LOGIN_ON_THE_WIRE + b"STAT\r\nQUIT\r\n")

    def test_wrong_password_waits_auth_delay_and_the_session_goes_on(self):
        backend = self.use(FakePop3Backend())
        proxy = self.start_proxy("pop3", backend.port, auth_delay="200ms")
        client = self.connect(proxy)
        client.expect_line(mp.POP3_GREETING)
        client.send("USER alice")
        client.expect_line(mp.POP3_OK)
        started = time.monotonic()
        client.send("PASS wrong")
        client.expect_line(b"-ERR " + mp.AUTH_FAILED_TEXT + b"\r\n")
        self.assertGreaterEqual(time.monotonic() - started, 0.2)
        proxy.wait_for_log(r'client login failed: "wrong password"')
        self.assertEqual(backend.received, [])
        client.send("USER alice")
        client.expect_line(mp.POP3_OK)
        client.send("PASS secret")
        client.expect(rb"^\+OK alice has 1 message\r\n$")
        client.send("QUIT")
        client.expect(rb"^\+OK bye\r\n$")
        client.expect_closed()


# -- SMTP ---------------------------------------------------------------------------
# The SMTP side of the proxy between smtplib (or the harness's Client) and a
# Postfix-like fake backend.  Each test asserts the bytes on both wires: what
# the client read, and every byte the backend received.

class SmtpEndToEndSmtplibTests(EndToEndTestCase):
    def test_auth_plain_then_20_mb_dot_stuffed_message(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.start_proxy("smtp", backend.port)
        smtp = self.smtplib_client(proxy)
        self.assertEqual(smtp.ehlo(), (250, b"mail.test\nAUTH PLAIN LOGIN"))
        self.assertEqual(smtp.login("alice", "secret"), (235, b"2.0.0 OK"))   # PLAIN, picked by smtplib

        message = smtp_dotted_message(20 * MEGABYTE)
        stuffed = smtp_dot_stuffed(message)
        self.assertGreater(stuffed.count(b"\r\n.."), 50000)        # plenty of stuffed lines
        self.assertEqual(smtp.sendmail("alice@example.com", ["bob@example.com"], message), {})
        self.assertEqual(smtp.quit(), (221, b"2.0.0 Bye (backend)"))

        after_auth = (SMTPLIB_MAIL_ALICE + SMTPLIB_RCPT_BOB + b"data\r\n"
                      + stuffed + b"quit\r\n")
        # What smtplib sent is what we think it sent (our dot-stuffing matches its).
        self.assertSameBytes(bytes(smtp.wire_sent),
                             b"ehlo client.example\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n"
                             + after_auth, "what smtplib sent")
        self.assertEqual(bytes(smtp.wire_received),
                         SMTP_PROXY_GREETING + SMTP_PROXY_EHLO + mp.SMTP_AUTH_OK +
                         SMTP_BACKEND_MAIL_OK + SMTP_BACKEND_RCPT_OK + SMTP_BACKEND_DATA_GO +
                         smtp_backend_queued(1) + SMTP_BACKEND_BYE)
        self.wait_for_backend(backend, 0, b"quit\r\n")
        self.assertSameBytes(bytes(backend.received[0]),
                             b"EHLO mail.test\r\n" + smtp_xclient() + b"EHLO client.example\r\n"
                             + after_auth, "what the backend received")
        self.assertSameBytes(backend.messages[0], stuffed, "the DATA bytes at the backend")
        self.assertEqual(len(backend.received), 1)

    def test_auth_login_with_and_without_initial_response(self):
        backend = self.use(FakeSmtpBackend())
        # Only LOGIN advertised: smtplib has to pick it.
        proxy = self.start_proxy("smtp", backend.port, smtp_auth="login")
        message = b"Subject: hi\r\n\r\n.\r\n..\r\n.hidden\r\nend"
        for number, initial_response_ok in enumerate((False, True)):
            with self.subTest(initial_response_ok=initial_response_ok):
                smtp = self.smtplib_client(proxy)
                self.assertEqual(smtp.ehlo(), (250, b"mail.test\nAUTH LOGIN"))
                self.assertEqual(smtp.login("alice", "secret", initial_response_ok=initial_response_ok),
                                 (235, b"2.0.0 OK"))
                smtp.sendmail("alice@example.com", ["bob@example.com"], message)
                smtp.quit()
                if initial_response_ok:             # Microsoft's "AUTH LOGIN user"
                    auth_sent = b"AUTH LOGIN YWxpY2U=\r\nc2VjcmV0\r\n"
                    auth_read = b"334 " + mp.SASL_PASSWORD_PROMPT + mp.SMTP_AUTH_OK
                else:
                    auth_sent = b"AUTH LOGIN\r\nYWxpY2U=\r\nc2VjcmV0\r\n"
                    auth_read = b"334 " + mp.SASL_USERNAME_PROMPT + b"334 " + mp.SASL_PASSWORD_PROMPT + mp.SMTP_AUTH_OK
                stuffed = b"Subject: hi\r\n\r\n..\r\n...\r\n..hidden\r\nend\r\n.\r\n"
                self.assertEqual(smtp_dot_stuffed(message), stuffed)
                after_auth = (SMTPLIB_MAIL_ALICE + SMTPLIB_RCPT_BOB +
                              b"data\r\n" + stuffed + b"quit\r\n")
                self.assertEqual(bytes(smtp.wire_sent),
                                 b"ehlo client.example\r\n" + auth_sent + after_auth)
                self.assertEqual(bytes(smtp.wire_received),
                                 SMTP_PROXY_GREETING + b"250-mail.test\r\n250 AUTH LOGIN\r\n" +
                                 auth_read + SMTP_BACKEND_MAIL_OK + SMTP_BACKEND_RCPT_OK +
                                 SMTP_BACKEND_DATA_GO + smtp_backend_queued(number + 1) +
                                 SMTP_BACKEND_BYE)
                self.wait_for_backend(backend, number, b"quit\r\n")
                self.assertEqual(bytes(backend.received[number]),
                                 b"EHLO mail.test\r\n" + smtp_xclient() +
                                 b"EHLO client.example\r\n" + after_auth)
                self.assertEqual(backend.messages[number], stuffed)
        self.assertEqual(backend.logins, [])                # XCLIENT: no AUTH at the backend

    def test_bdat_chunk_passes_untouched(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.start_proxy("smtp", backend.port)
        client = self.connect(proxy)
        self.smtp_hello(client)
        self.smtp_auth_plain(client)
        chunk = b".\r\n\x00\xff\r\n.\r\nBDAT 1\r\n"          # binary, a lone "." and a fake command
        client.send(b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\nRCPT TO:<b@example.com>\r\n"
                    b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        self.assertEqual(client.read_line(), SMTP_BACKEND_MAIL_OK)
        self.assertEqual(client.read_line(), SMTP_BACKEND_RCPT_OK)
        self.assertEqual(client.read_line(), b"250 2.0.0 Ok: %d octets\r\n" % len(chunk))
        self.smtp_quit(client)
        self.assertEqual(backend.messages, [chunk])
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]).split(b"EHLO client.example\r\n", 1)[1],
                         b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\nRCPT TO:<b@example.com>\r\n"
                         b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n")


class SmtpEndToEndGreetingDelayTests(EndToEndTestCase):
    def test_early_talker_is_refused_and_a_patient_client_is_greeted(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.start_proxy("smtp", backend.port, smtp_greeting_delay="500ms")
        started = time.monotonic()
        hasty = self.connect(proxy)
        patient = self.connect(proxy)
        hasty.send("EHLO x")
        self.assertEqual(hasty.read_line(), mp.SMTP_INVALID_PIPELINING)
        hasty.expect_closed()
        self.assertLess(time.monotonic() - started, 0.5)          # refused at once
        proxy.wait_for_log(r'client was rejected before greeting: "EHLO x__" while in delay '
                           r'pipelining state')

        self.assertEqual(patient.read_line(), SMTP_PROXY_GREETING)
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        patient.send("EHLO client.example")
        self.assertEqual(patient.read_exactly(len(SMTP_PROXY_EHLO)), SMTP_PROXY_EHLO)
        self.smtp_auth_plain(patient)
        self.smtp_quit(patient)
        self.assertEqual(len(backend.received), 1)                # only the patient one


class SmtpEndToEndPipeliningTests(EndToEndTestCase):
    def test_ehlo_auth_mail_rcpt_data_in_one_send(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.start_proxy("smtp", backend.port)
        client = self.connect(proxy)
        self.assertEqual(client.read_line(), SMTP_PROXY_GREETING)
        pipeline = (b"EHLO x\r\nAUTH PLAIN " + PLAIN_ALICE + b"\r\n"
                    b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        client.send(pipeline)
        replies = (SMTP_PROXY_EHLO + mp.SMTP_AUTH_OK + SMTP_BACKEND_MAIL_OK +
                   SMTP_BACKEND_RCPT_OK + SMTP_BACKEND_DATA_GO)
        self.assertEqual(client.read_exactly(len(replies)), replies)
        client.send(b"Hello\r\n.\r\n")
        self.assertEqual(client.read_line(), smtp_backend_queued(1))
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient() + b"EHLO x\r\n"
                         b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nHello\r\n.\r\nQUIT\r\n")
        self.assertEqual(backend.messages, [b"Hello\r\n.\r\n"])

    def test_smtp_auth_none_pipeline(self):
        backend = self.use(FakeSmtpBackend(refuse=[b"nobody@example.com"]))
        proxy = self.start_proxy("smtp", backend.port, smtp_auth="none",
                                 smtp_relay_domains="example.com")
        client = self.connect(proxy)
        # Refused by the proxy, then by the backend (the login), then accepted.
        client.send(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@elsewhere.test>\r\n"
                    b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        replies = (SMTP_PROXY_GREETING + b"250 mail.test\r\n" + mp.SMTP_OK +
                   b"550 5.7.1 Relaying denied\r\n" +
                   smtp_backend_rcpt_refused(b"nobody@example.com") + SMTP_BACKEND_RCPT_OK +
                   SMTP_BACKEND_DATA_GO)
        self.assertEqual(client.read_exactly(len(replies)), replies)
        client.send(b"Hi\r\n.\r\nQUIT\r\n")
        self.assertEqual(client.read_line(), smtp_backend_queued(1))
        self.assertEqual(client.read_line(), SMTP_BACKEND_BYE)
        client.expect_closed()
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient(login=b"") + b"EHLO x\r\n"
                         b"MAIL FROM:<a@b>\r\nRCPT TO:<nobody@example.com>\r\n"
                         b"RCPT TO:<bob@example.com>\r\nDATA\r\nHi\r\n.\r\nQUIT\r\n")


class SmtpEndToEndControlByteTests(EndToEndTestCase):
    INVALID = mp.SMTP_INVALID_ARGUMENT

    def test_bad_helo_is_neither_kept_nor_replayed(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.start_proxy("smtp", backend.port)
        client = self.connect(proxy)
        self.smtp_hello(client)                                  # EHLO client.example
        for bad in (b"HELO evil\x00name\r\n", b"EHLO evil\tname\r\n", b"HELO evil\rname\r\n",
                    b"MAIL FROM:<a\x00b@example.com>\r\n"):
            client.send(bad)
            self.assertEqual(client.read_line(), self.INVALID, bad)
        self.smtp_auth_plain(client)
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient() + b"EHLO client.example\r\nQUIT\r\n")

    def test_bad_mail_and_rcpt_with_smtp_auth_none(self):
        backend = self.use(FakeSmtpBackend())
        proxy = self.start_proxy("smtp", backend.port, smtp_auth="none",
                                 smtp_relay_domains="example.com")
        client = self.connect(proxy)
        self.assertEqual(client.read_line(), SMTP_PROXY_GREETING)
        for bad in (b"MAIL FROM:<a\x00b@remote.test>\r\n", b"MAIL FROM:<ab@remote.test>\t\r\n"):
            client.send(bad)
            self.assertEqual(client.read_line(), self.INVALID, bad)
        client.send("MAIL FROM:<ab@remote.test>")
        self.assertEqual(client.read_line(), mp.SMTP_OK)   # the bad ones were not kept
        for bad in (b"RCPT TO:<bob@example.com>\x00\r\n", b"RCPT TO:<bob\t@example.com>\r\n"):
            client.send(bad)
            self.assertEqual(client.read_line(), self.INVALID, bad)
        self.assertEqual(backend.received, [])
        client.send("RCPT TO:<bob@example.com>")
        self.assertEqual(client.read_line(), SMTP_BACKEND_RCPT_OK)
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\n" + smtp_xclient(login=b"") +
                         b"MAIL FROM:<ab@remote.test>\r\nRCPT TO:<bob@example.com>\r\nQUIT\r\n")


class SmtpEndToEndEarlyDataTests(EndToEndTestCase):
    def test_commands_behind_a_proxy_header_wait_for_the_greeting(self):
        good = SmtpEndToEndResolverTests.GOOD
        dns = FakeDns(lambda query, name, qtype: (time.sleep(0.3), records_for(good)(query, name, qtype))[1])
        self.addCleanup(dns.close)
        backend = self.use(FakeSmtpBackend())
        text = proxy_config("smtp", backend.port, resolver="127.0.0.1:%d" % dns.port,
                            set_real_ip_from="127.0.0.1")
        text = re.sub(r"(listen = 127\.0\.0\.1:\d+)", r"\1 proxy_protocol", text)
        proxy = self.use(ProxyUnderTest(text))
        client = self.connect(proxy)
        client.send(b"PROXY TCP4 127.0.0.1 127.0.0.1 1234 25\r\nEHLO x\r\nNOOP\r\n")
        self.assertEqual(client.read_line(), SMTP_PROXY_GREETING)     # the 220 comes first
        self.assertEqual(client.read_exactly(len(SMTP_PROXY_EHLO)), SMTP_PROXY_EHLO)
        self.assertEqual(client.read_line(), mp.SMTP_OK)


# -- when the client misbehaves -----------------------------------------------------

class ClientMisbehaviourTests(EndToEndTestCase):
    def gone_mid_login(self, abort: bool) -> None:
        """The client sends its login and closes without reading anything.
        ``abort``: close with a TCP RST (SO_LINGER 0) instead of a FIN."""
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port)
        client = self.connect(proxy)
        client.send("a1 LOGIN alice secret")
        if abort:
            import struct
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        wait_until(lambda: proxy.worker.numbers.last == 1, what="the session to start")
        wait_until(lambda: not proxy.sessions() or proxy.crash, what="the session to end")
        proxy.assert_alive()
        self.assertEqual(proxy.sessions(), [])
        # The proxy still serves.
        client = self.connect(proxy)
        self.imap_login(client)
        client.send("a2 LOGOUT")
        client.expect(rb"^\* BYE")
        client.expect(rb"^a2 OK LOGOUT completed\r\n$")
        proxy.assert_alive()

    def test_client_gone_mid_login(self):
        self.gone_mid_login(abort=False)

    def test_client_gone_mid_login_with_reset(self):
        self.gone_mid_login(abort=True)

    def test_max_errors_imap(self):
        proxy = self.start_proxy("imap", free_port(), max_errors="3")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 FOO")
        client.expect_line(b"a1 " + mp.IMAP_INVALID)
        client.send("a2 BAR")
        client.expect_line(b"a2 " + mp.IMAP_INVALID)
        client.send("a3 BAZ")
        client.expect_line(b"a3 " + mp.IMAP_INVALID)
        client.expect_closed()
        proxy.wait_for_log(r"\*1 client sent too many invalid commands while in auth state")

    def test_max_errors_pop3(self):
        proxy = self.start_proxy("pop3", free_port(), max_errors="3")
        client = self.connect(proxy)
        client.expect_line(mp.POP3_GREETING)
        for command in ("FOO", "BAR", "BAZ"):
            client.send(command)
            client.expect_line(mp.POP3_INVALID)
        client.expect_closed()
        proxy.wait_for_log(r"client sent too many invalid commands")

    def test_idle_client_is_disconnected_after_timeout(self):
        proxy = self.start_proxy("imap", free_port(), timeout="1s")
        started = time.monotonic()
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        client.expect_closed()                               # and not a byte more
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 1.0)
        self.assertLess(elapsed, 2.5)
        proxy.wait_for_log(r"\[info\] .*\*1 client timed out while in auth state")

    def test_random_bytes_do_not_break_the_proxy(self):
        import random
        randomness = random.Random(20261120)                 # the same bytes every run
        pieces = [b"\0", b"\r", b"\n", b"\r\n", b" ", b'"', b"\\", b"{999999}", b"{5+}\r\n",
                  b"{5}\r\n", b"{4294967296}\r\n", b"x" * 5000, b"a1 LOGIN ", b"a2 AUTHENTICATE ",
                  b"a3 ID (", b"USER ", b"PASS ", b"AUTH PLAIN ", b"AUTH LOGIN\r\n", b"CAPA\r\n"]
        for protocol in ("imap", "pop3"):
            backend = self.use(FakeImapBackend() if protocol == "imap" else FakePop3Backend())
            proxy = self.start_proxy(protocol, backend.port, timeout="2s")
            clients = [self.connect(proxy) for _ in range(8)]
            for client in clients:
                junk = bytearray()
                while len(junk) < 4096:
                    if randomness.random() < 0.5:
                        junk += randomness.choice(pieces)
                    else:
                        junk += bytes(randomness.getrandbits(8)
                                      for _ in range(randomness.randrange(1, 100)))
                try:
                    for start in range(0, len(junk), 512):
                        client.send(bytes(junk[start:start + 512]))
                except OSError:
                    pass                                     # the proxy may hang up
            time.sleep(0.3)
            for client in clients:
                client.close()
            proxy.assert_alive()
            # A normal session on a new connection still works end to end.
            client = self.connect(proxy)
            if protocol == "imap":
                self.imap_login(client)
                client.send("a2 LOGOUT")
                client.expect(rb"^\* BYE")
                client.expect(rb"^a2 OK LOGOUT completed\r\n$")
            else:
                self.pop3_login(client)
                client.send("QUIT")
                client.expect(rb"^\+OK bye\r\n$")
            client.expect_closed()
            proxy.assert_alive()


# -- hostile clients (issue 12) -----------------------------------------------------

class HostileClientTests(EndToEndTestCase):
    def drip_until_closed(self, sock: socket.socket, data: bytes, every: float) -> float:
        """Send ``data`` a byte every ``every`` seconds until the proxy
        closes; returns how long that took (or the whole drip's time)."""
        started = time.monotonic()
        sock.settimeout(every)
        for byte in data:
            try:
                sock.send(bytes([byte]))
                if sock.recv(4096) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        return time.monotonic() - started

    def test_a_slow_drip_does_not_stretch_the_timeout(self):
        """timeout bounds the wait for a whole command: twenty clients that
        each send a byte every 0.2 s, never a whole line, are all cut at
        about 1 s (nginx does the same), not when they stop dripping."""
        proxy = self.start_proxy("imap", free_port(), timeout="1s")
        clients = [self.connect(proxy) for _ in range(20)]
        for client in clients:
            client.expect_line(mp.IMAP_GREETING)
        durations = []
        threads = [threading.Thread(target=lambda sock=client.sock: durations.append(
            self.drip_until_closed(sock, b"a1 LOGIN alice secret-and-more", 0.2)))
            for client in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        self.assertEqual(len(durations), 20)
        self.assertLess(max(durations), 2.5, "a dripping client outlived its timeout")
        proxy.wait_for_log(r"\*20 client timed out while in auth state")

    def test_each_whole_command_has_its_own_timeout(self):
        proxy = self.start_proxy("imap", free_port(), timeout="1s")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        for number in range(4):                    # 2 s in all, 0.5 s per command
            time.sleep(0.5)
            client.send("n%d NOOP" % number)
            client.expect_line(b"n%d " % number + mp.IMAP_OK)
        client.expect_closed()                     # then 1 s of silence ends it

    def test_a_session_that_cannot_start_leaves_nothing_behind(self):
        """Session.__init__ failing after the client stream was registered
        (here: out of descriptors while making the machine) once left a stale
        registration, and the next socket given the same descriptor number
        ended the worker."""
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port)
        real = mp.CLIENT_MACHINES["imap"]
        failures = [OSError(errno.EMFILE, "Too many open files")]

        def machine(*args, **kwargs):
            if failures:
                raise failures.pop()
            return real(*args, **kwargs)
        self.addCleanup(mp.CLIENT_MACHINES.__setitem__, "imap", real)
        mp.CLIENT_MACHINES["imap"] = machine
        # The test shares the proxy's descriptor table: make the next
        # client's socket now, so that the proxy's next accept() is given
        # the number the failed session's socket had.
        sock = socket.socket()
        self.addCleanup(sock.close)
        self.connect(proxy).expect_closed()
        sock.settimeout(5)
        sock.connect(("127.0.0.1", proxy.port))
        self.assertEqual(sock.recv(100), mp.IMAP_GREETING)
        proxy.assert_alive()
        proxy.wait_for_log(r"\[error\] .*cannot start a session: .*Too many open files")

    def test_a_bug_met_by_one_session_ends_that_session_only(self):
        """An exception escaping the handling of one client is logged at
        alert with where it happened, and ends that session; a logged-in
        bystander on the same worker goes on."""
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port)
        bystander = self.connect(proxy)
        self.imap_login(bystander)
        with unittest.mock.patch.object(mp.ImapMachine, "_capability",
                                        side_effect=RuntimeError("a bug")):
            victim = self.connect(proxy)
            victim.expect_line(mp.IMAP_GREETING)
            victim.send("c1 CAPABILITY")
            victim.expect_closed()
        proxy.wait_for_log(r"\[alert\] .*\*2 internal error, session closed: "
                           r"RuntimeError\('a bug'\) at ")
        bystander.send("a2 NOOP")
        bystander.expect(rb"^a2 OK NOOP completed\r\n$")
        proxy.assert_alive()
        self.assertEqual(len(proxy.sessions()), 1)

    def test_the_whole_dialogue_before_login_is_bounded(self):
        """A client that never logs in but never idles either is cut at
        LOGIN_TIME_LIMIT (here lowered to 1.5 s; or ``timeout``, if longer)."""
        self.addCleanup(setattr, mp, "LOGIN_TIME_LIMIT", mp.LOGIN_TIME_LIMIT)
        mp.LOGIN_TIME_LIMIT = 1.5
        proxy = self.start_proxy("imap", free_port(), timeout="1s")
        client = self.connect(proxy)
        client.expect_line(mp.IMAP_GREETING)
        started = time.monotonic()
        with self.assertRaises(AssertionError):        # expect() fails: the proxy has closed
            for number in range(20):
                time.sleep(0.3)
                client.send("n%d NOOP" % number)
                client.expect_line(b"n%d " % number + mp.IMAP_OK)
        self.assertLess(time.monotonic() - started, 3.0)
        proxy.wait_for_log(r"client timed out \(no login within 1.5s\)")

    # -- issue 14: what bots do all day must not cost the users ----------------------

    # A flooder's rounds: what it sends, and the replies it must get (nginx:
    # bad base64, a "*" cancel included, is an invalid command; the machine's
    # own refusal, so not counted towards max_errors, and no failed login).
    BAD_BASE64_ROUND = (
        (b"f1 AUTHENTICATE PLAIN\r\n!!!!\r\n", b"+ \r\n" + b"f1 " + mp.IMAP_INVALID),
        (b"f2 AUTHENTICATE LOGIN\r\n@@@@\r\n", b"+ VXNlcm5hbWU6\r\n" + b"f2 " + mp.IMAP_INVALID),
        (b"f3 AUTHENTICATE PLAIN =A=\r\n", b"f3 " + mp.IMAP_INVALID),
        (b"f4 AUTHENTICATE PLAIN\r\n*\r\n", b"+ \r\n" + b"f4 " + mp.IMAP_INVALID),
        (b"f5 AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n%%%%\r\n",
         b"+ UGFzc3dvcmQ6\r\n" + b"f5 " + mp.IMAP_INVALID))

    def flood_bad_base64(self, client: Client, stop: threading.Event) -> int:
        """Send BAD_BASE64_ROUND, pipelined, again and again until ``stop``,
        checking every reply byte for byte; the number of rounds."""
        sent = b"".join(command for command, _ in self.BAD_BASE64_ROUND)
        replies = b"".join(reply for _, reply in self.BAD_BASE64_ROUND)
        rounds = 0
        while not stop.is_set() or rounds < 10:
            client.send(sent * 5)
            self.assertEqual(client.read_exactly(len(replies) * 5), replies * 5)
            rounds += 5
        return rounds

    def test_good_logins_go_through_while_a_session_floods_bad_base64(self):
        """20 imaplib clients log in at once, from the address a flooder on
        the same worker sends bad base64 from without a pause: each gets its
        OK (nothing counts the flood as failed logins, so there is nothing
        to slow them), the flooder gets nginx's BAD each time and goes on."""
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port, auth_delay="200ms")   # the defence on
        flooder = self.connect(proxy)
        flooder.expect_line(mp.IMAP_GREETING)
        stop = threading.Event()
        barrier = threading.Barrier(20)

        def good_login() -> tuple:
            barrier.wait(10)
            imap = TlsImap4("127.0.0.1", proxy.port)
            try:
                started = time.monotonic()
                answer = imap.login("alice", "secret")
                took = time.monotonic() - started
                noop = imap.noop()
            finally:
                imap.logout()
            return answer, noop[0], took

        def logins() -> list:
            try:
                return in_threads(*[good_login] * 20)
            finally:
                stop.set()
        rounds, results = in_threads(lambda: self.flood_bad_base64(flooder, stop), logins)
        self.assertEqual([result[:2] for result in results],
                         [(("OK", [b"LOGIN completed"]), "OK")] * 20)
        self.assertLess(max(result[2] for result in results), 2.0, "a login waited for the flood")
        self.assertGreaterEqual(rounds, 10)
        self.assertEqual(backend.logins, [(b"alice", b"secret")] * 20)
        flooder.send("f9 NOOP")                        # still there, never cut off
        flooder.expect_line(b"f9 " + mp.IMAP_OK)
        self.assertNotRegex(proxy.log, r"login failed|login penalty|too many invalid")
        proxy.assert_alive()

    def test_cram_md5_and_apop_tried_again_against_the_user_table(self):
        """The retries of nginx CVE-2026-27651 against [users]: CRAM-MD5 and
        APOP wrong twice in one session, then right.  Each wrong one is
        refused and the session goes on; the right one logs in with alice's
        password (the table gives the backend the clear one); the worker lives."""
        imap_backend = self.use(FakeImapBackend())
        pop3_backend = self.use(FakePop3Backend())
        imap = self.start_proxy("imap", imap_backend.port, auth_delay="50ms",
                                imap_auth="plain cram-md5")
        pop3 = self.start_proxy("pop3", pop3_backend.port, auth_delay="50ms",
                                pop3_auth="plain apop")
        refused = mp.AUTH_FAILED_TEXT + b"\r\n"

        def imap_session() -> None:
            client = self.connect(imap)
            client.expect_line(mp.IMAP_GREETING)
            for number, password in enumerate((b"wrong", b"wronger", b"secret"), 1):
                client.send("c%d AUTHENTICATE CRAM-MD5" % number)
                cram_md5_answer(client, b"+ ", b"alice", password)
                if number < 3:
                    client.expect_line(b"c%d NO " % number + refused)
            client.expect_line(b"c3 OK LOGIN completed\r\n")
            imap_logout(client)

        def pop3_session() -> None:
            client = self.connect(pop3)
            salt = client.expect(rb"^\+OK POP3 ready (<[^>]+>)\r\n$").group(1)
            for password in (b"wrong", b"wronger", b"secret"):
                client.send(b"APOP alice " + hashlib.md5(salt + password).hexdigest().encode() +
                            b"\r\n")
                if password != b"secret":
                    client.expect_line(b"-ERR " + refused)
            client.expect(rb"^\+OK alice has 1 message\r\n$")
            client.send("QUIT")
            client.expect(rb"^\+OK bye\r\n$")
        in_threads(imap_session, pop3_session)
        self.assertEqual(imap_backend.logins, [(b"alice", b"secret")])
        self.assertEqual(pop3_backend.logins, [(b"alice", b"secret")])
        for proxy in (imap, pop3):
            self.assertEqual(len(re.findall(r"client login failed", proxy.log)), 2)
            proxy.assert_alive()

    # Commands a client may leave unfinished for as long as ``timeout`` lets
    # it, each as long as imap_client_buffer (4k) allows, and what the proxy
    # says to each meanwhile.  The 4000 "(" of ID are more than its 64
    # arguments: refused at the 65th, the rest of the line dropped as it
    # comes; LOGIN's are an atom still coming.
    UNFINISHED_COMMANDS = (
        (b'h1 LOGIN "' + b"q" * 4000, b""),                        # a quoted string
        (b"h2 LOGIN {4000}\r\n" + b"l" * 3000, mp.IMAP_NEXT),       # a literal, 3000 of 4000
        (b"h3 LOGIN {4000+}\r\n" + b"n" * 3000, b""),               # a non-synchronizing one
        (b"h4 ID " + b"(" * 4000, b"h4 " + mp.IMAP_INVALID),
        (b"h5 LOGIN " + b"(" * 4000, b""))

    def descriptors_for(self, connections: int) -> None:
        """Both ends of ``connections`` are in this process: raise the soft
        RLIMIT_NOFILE if it is too low (put back when the test ends), or skip."""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 2 * connections + 256
        if soft == resource.RLIM_INFINITY or soft >= wanted:
            return
        if hard != resource.RLIM_INFINITY and hard < wanted:
            self.skipTest("needs %d descriptors, the hard limit is %d" % (wanted, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))

    def test_unfinished_commands_before_login_keep_memory_bounded(self):
        """1000 clients (with --heavy; 300 by default) that never finish their
        command (a quoted string, a literal, 4000 "(") each cost the proxy
        at most the command it holds (imap_client_buffer) more than an idle
        client.  The proxy runs in this process, so tracemalloc sees every
        allocation of its loop; the test's own are a socket per client."""
        count = 1000 if heavy() else 300
        self.descriptors_for(count)
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port, timeout="60s")
        buffer = proxy.config.servers[0].imap_client_buffer
        if not tracemalloc.is_tracing():
            tracemalloc.start()
            self.addCleanup(tracemalloc.stop)
        clients = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            self.addCleanup(sock.close)
            clients.append(sock)
        for sock in clients:
            self.assertEqual(sock.recv(100), mp.IMAP_GREETING)
        wait_until(lambda: len(proxy.sessions()) == count, 10, "%d sessions" % count)
        gc_collect()
        idle = tracemalloc.get_traced_memory()[0]
        sent = 0
        for index, sock in enumerate(clients):
            command = self.UNFINISHED_COMMANDS[index % len(self.UNFINISHED_COMMANDS)][0]
            sock.sendall(command)
            sent += len(command)
        wait_until(lambda: sum(session.client.received for session in proxy.sessions()) == sent,
                   20, "the proxy to read the %d bytes sent" % sent)
        for index, sock in enumerate(clients):
            reply = self.UNFINISHED_COMMANDS[index % len(self.UNFINISHED_COMMANDS)][1]
            if reply:
                self.assertEqual(recv_exactly(sock, len(reply)), reply)
        gc_collect()
        held = tracemalloc.get_traced_memory()[0]
        self.assertLess(held - idle, count * (buffer + 512),
                        "%d unfinished commands cost %d bytes more than %d idle clients"
                        % (count, held - idle, count))
        self.assertEqual(len(proxy.sessions()), count)      # all held, none cut off
        for sock in clients:                                 # and no reply for the others
            sock.setblocking(False)
            self.assertRaises(BlockingIOError, sock.recv, 100)
        client = self.connect(proxy)                         # the proxy still serves
        self.imap_login(client)
        imap_logout(client)
        for sock in clients:
            sock.close()
        wait_until(lambda: not proxy.sessions(), 10, "the sessions to end")
        gc_collect()
        self.assertLess(tracemalloc.get_traced_memory()[0] - idle, count * 256,
                        "the ended sessions left memory behind")
        proxy.assert_alive()


class SessionCountsTests(unittest.TestCase):
    """max_user_sessions and max_user_ip_sessions, counted from events."""

    def test_limits_per_login_and_per_login_and_address(self):
        counts = mp.SessionCounts()
        server = server_settings(max_user_sessions=3, max_user_ip_sessions=2)
        for number in (1, 2):
            counts.apply(counts.opened(100, number, "alice", "192.0.2.7"))
        self.assertEqual(counts.refusal("alice", "192.0.2.7", server),
                         "max_user_ip_sessions (2) reached")
        self.assertEqual(counts.refusal("alice", "198.51.100.1", server), "")
        self.assertEqual(counts.refusal("bob", "192.0.2.7", server), "")
        counts.apply(counts.opened(200, 1, "alice", "198.51.100.1"))     # another worker
        self.assertEqual(counts.refusal("alice", "198.51.100.2", server),
                         "max_user_sessions (3) reached")
        counts.apply(counts.closed(100, 1))
        self.assertEqual(counts.refusal("alice", "192.0.2.7", server), "")
        counts.apply(("worker gone", 200))
        self.assertEqual((counts.per_login, counts.per_pair),
                         ({"alice": 1}, {("alice", "192.0.2.7"): 1}))
        counts.apply(counts.closed(100, 2))
        counts.apply(counts.closed(100, 2))                        # twice: no harm
        self.assertEqual((counts.sessions, counts.per_login, counts.per_pair), ({}, {}, {}))

    def test_zero_means_no_limit(self):
        counts = mp.SessionCounts()
        for number in range(50):
            counts.apply(counts.opened(100, number, "alice", "192.0.2.7"))
        self.assertEqual(counts.refusal("alice", "192.0.2.7", server_settings()), "")


class LoginGateTests(EventLoopTestCase):
    """Attempts wait in a worker for the defence's slots, in order."""

    def setUp(self):
        super().setUp()
        self.defence = mp.LoginDefence(b"k" * 32)
        self.gate = mp.LoginGate(self.loop, self.defence)

    def test_waits_for_the_first_delay_to_end_then_goes_in_order(self):
        now = self.loop.time()
        for n in range(mp.AUTH_PENALTY_SLOTS):                 # delays of 0.05, 0.1, 0.2, 0.4 s
            event, _, _ = self.defence.failure("192.0.2.7", "u%d" % n, b"x", now, 0.05)
            self.defence.apply(event)
        went = []
        for name in ("first", "second"):
            self.gate.enter("192.0.2.7", name, lambda admission, name=name: went.append(
                (name, admission, self.loop.time() - now)))
        gone = self.gate.enter("192.0.2.7", "gone", lambda admission: went.append("gone"))
        self.gate.cancel(gone)                                   # its session ended
        self.assertEqual(went, [])
        self.drive(lambda: len(went) == 2)
        self.assertEqual([name for name, _, _ in went], ["first", "second"])
        self.assertGreaterEqual(went[0][2], 0.05)                # not before the slot was free
        self.assertEqual(went[0][1], mp.Admission())

    def test_a_finished_attempt_lets_the_next_one_in(self):
        went = []
        for n in range(mp.AUTH_PENALTY_SLOTS + 1):
            self.gate.enter("192.0.2.7", "alice", lambda admission, n=n: went.append(n))
        self.assertEqual(went, list(range(mp.AUTH_PENALTY_SLOTS)))   # the last one waits
        self.gate.leave("192.0.2.7", "alice")
        self.assertEqual(went, list(range(mp.AUTH_PENALTY_SLOTS + 1)))
        self.assertEqual(self.gate.waiting, [])

    def test_a_refusal_goes_at_once(self):
        for n in range(mp.AUTH_PAIR_LIMIT):
            event, _, _ = self.defence.failure("192.0.2.7", "alice", b"g%d" % n,
                                               self.loop.time() - 1, 0.0)
            self.defence.apply(event)
        went = []
        self.gate.enter("192.0.2.7", "alice", went.append)
        self.assertEqual([admission.refuse for admission in went], [True])


class LoginDefenceEndToEndTests(EndToEndTestCase):
    """The login defence as clients meet it, on the three protocols: the
    replies, the delays, the refusals, the log lines, the session caps."""

    BACKENDS = {"imap": FakeImapBackend, "pop3": FakePop3Backend, "smtp": FakeSmtpBackend}
    USERS = {"alice": "{PLAIN}secret", "bob": "{PLAIN}builder"}
    FAILED = {"imap": b"a1 NO ", "pop3": b"-ERR ", "smtp": b"535 "}
    UNAVAILABLE = {"imap": b"a1 NO [UNAVAILABLE] Temporary authentication failure\r\n",
                   "pop3": b"-ERR [SYS/TEMP] Temporary authentication failure\r\n",
                   "smtp": b"454 4.7.0 Temporary authentication failure\r\n"}
    LIMIT = {"imap": b"a1 NO [LIMIT] Too many sessions for this user\r\n",
             "pop3": b"-ERR [IN-USE] Too many sessions for this user\r\n",
             "smtp": b"421 4.7.0 Too many sessions for this user\r\n"}

    def proxy(self, protocol: str, **mail) -> ProxyUnderTest:
        backend = self.use(self.BACKENDS[protocol](accept=None))   # the table decides
        return self.start_proxy(protocol, backend.port, users=self.USERS, **mail)

    def fewer_pair_failures(self, limit: int = 3) -> None:
        """AUTH_PAIR_LIMIT ``limit`` in this process, for short tests."""
        self.addCleanup(setattr, mp, "AUTH_PAIR_LIMIT", mp.AUTH_PAIR_LIMIT)
        mp.AUTH_PAIR_LIMIT = limit

    def greeted(self, proxy: ProxyUnderTest, protocol: str) -> Client:
        client = self.connect(proxy, timeout=10.0)
        if protocol == "smtp":
            self.smtp_hello(client)
        else:
            client.read_line()                     # the greeting
        return client

    def attempt(self, client: Client, protocol: str, login: str, password: str) -> bytes:
        """One login the protocol's usual way: the reply's (last) line."""
        if protocol == "imap":
            client.send("a1 LOGIN %s %s" % (login, password))
        elif protocol == "pop3":
            client.send("USER " + login)
            client.expect_line(mp.POP3_OK)
            client.send("PASS " + password)
        else:
            token = base64.b64encode(("\0%s\0%s" % (login, password)).encode())
            client.send(b"AUTH PLAIN " + token + b"\r\n")
        return client.read_line()

    def logged_in(self, protocol: str, reply: bytes) -> bool:
        return reply.startswith({"imap": b"a1 OK ", "pop3": b"+OK ", "smtp": b"235 "}[protocol])

    def test_each_failure_waits_longer_the_same_password_does_not_escalate(self):
        proxy = self.proxy("imap", auth_delay="50ms")
        client = self.greeted(proxy, "imap")
        waited = []
        for password in ("guess1", "guess2", "guess3", "guess3"):
            started = time.monotonic()
            self.assertTrue(self.attempt(client, "imap", "alice", password).startswith(b"a1 NO "))
            waited.append(time.monotonic() - started)
        for took, least in zip(waited, (0.05, 0.1, 0.2, 0.2)):
            self.assertGreaterEqual(took, least - 0.005, waited)
        self.assertTrue(self.logged_in("imap", self.attempt(client, "imap", "alice", "secret")))
        log = proxy.log
        self.assertRegex(log, r"\[notice\] \d+#0: \*1 login penalty: 2 recent failures from "
                              r"127\.0\.0\.1 or of this account, reply in 0\.1s")
        self.assertIn("login penalty: 3 recent failures from 127.0.0.1 or of this account, "
                      "reply in 0.2s", log)
        self.assertNotIn("login penalty: 4 ", log)       # guess3 again: counted once
        self.assertEqual(log.count("login penalty: 3 recent"), 2)

    def test_the_attacked_account_is_refused_for_now_and_no_other(self):
        """After AUTH_PAIR_LIMIT wrong passwords for alice from one address,
        her right one gets the temporary reply there; bob logs in."""
        self.fewer_pair_failures()
        for protocol in ("imap", "pop3", "smtp"):
            with self.subTest(protocol=protocol):
                proxy = self.proxy(protocol, auth_delay="1ms")
                client = self.greeted(proxy, protocol)
                for number in range(mp.AUTH_PAIR_LIMIT):
                    reply = self.attempt(client, protocol, "alice", "guess%d" % number)
                    self.assertTrue(reply.startswith(self.FAILED[protocol]), reply)
                self.assertEqual(self.attempt(client, protocol, "alice", "secret"),
                                 self.UNAVAILABLE[protocol])
                proxy.wait_for_log(r"\[notice\] .* login refused for now: 3 wrong passwords "
                                   r"for this account from this address")
                other = self.greeted(proxy, protocol)
                self.assertTrue(self.logged_in(protocol, self.attempt(other, protocol, "bob",
                                                                      "builder")))

    def test_a_good_login_from_a_guessing_address_completes_on_every_protocol(self):
        """Six guesses at once from the address fill its slots; the right
        password waits for a turn, and is let in."""
        for protocol in ("imap", "pop3", "smtp"):
            with self.subTest(protocol=protocol):
                proxy = self.proxy(protocol, auth_delay="20ms")
                guessers = [self.greeted(proxy, protocol) for _ in range(6)]
                user = self.greeted(proxy, protocol)
                for number, guesser in enumerate(guessers):
                    if protocol == "pop3":
                        guesser.send("USER nobody%d" % number)
                        guesser.expect_line(mp.POP3_OK)
                        guesser.send("PASS guess")
                    elif protocol == "imap":
                        guesser.send("a1 LOGIN nobody%d guess" % number)
                    else:
                        guesser.send(b"AUTH PLAIN " + base64.b64encode(
                            b"\0nobody%d\0guess" % number) + b"\r\n")
                self.assertTrue(self.logged_in(protocol, self.attempt(user, protocol, "bob",
                                                                      "builder")))
                for guesser in guessers:
                    self.assertTrue(guesser.read_line().startswith(self.FAILED[protocol]))
                self.assertIn("login penalty: 6 recent failures from 127.0.0.1", proxy.log)

    def test_trusted_networks_are_neither_delayed_nor_refused(self):
        """auth_delay 2s would hold the second failure 4 s and the
        third 8 s (the client gives up after 10), and refuse the right
        password after three."""
        self.fewer_pair_failures()
        proxy = self.proxy("imap", auth_delay="2s", trusted_networks="10.0.0.0/8\n    127.0.0.1")
        client = self.greeted(proxy, "imap")
        for number in range(mp.AUTH_PAIR_LIMIT + 1):
            self.assertTrue(self.attempt(client, "imap", "alice", "guess%d" % number)
                            .startswith(b"a1 NO "))
        self.assertTrue(self.logged_in("imap", self.attempt(client, "imap", "alice", "secret")))
        self.assertNotIn("login penalty", proxy.log)

    def test_a_client_named_by_xclient_is_defended_though_its_peer_is_trusted(self):
        """The trusted peer is exempt; the client its XCLIENT names is not,
        so failures count against that address, as for any client."""
        proxy = self.proxy("smtp", auth_delay="50ms", trusted_networks="127.0.0.1")
        client = self.connect(proxy, timeout=10.0)
        self.smtp_hello(client, ehlo=SMTP_XCLIENT_EHLO)
        client.send("XCLIENT ADDR=192.0.2.9 PORT=4711")
        self.smtp_hello(client, ehlo=SMTP_XCLIENT_EHLO)
        for password in ("guess1", "guess2"):
            self.assertTrue(self.attempt(client, "smtp", "alice", password).startswith(b"535 "))
        self.assertTrue(self.logged_in("smtp", self.attempt(client, "smtp", "alice", "secret")))
        log = proxy.log
        self.assertRegex(log, r'client login failed: "[^"]*" while [^,]*, client: 192\.0\.2\.9, ')
        self.assertIn("login penalty: 2 recent failures from 192.0.2.9 or of this account", log)
        self.assertNotIn("from 127.0.0.1", log)

    def test_auth_delay_0_turns_the_defence_off(self):
        self.fewer_pair_failures()
        proxy = self.proxy("pop3", auth_delay="0")
        client = self.greeted(proxy, "pop3")
        for number in range(mp.AUTH_PAIR_LIMIT + 1):
            self.assertTrue(self.attempt(client, "pop3", "alice", "guess%d" % number)
                            .startswith(b"-ERR "))
        self.assertTrue(self.logged_in("pop3", self.attempt(client, "pop3", "alice", "secret")))
        self.assertNotIn("login penalty", proxy.log)

    def test_max_user_sessions_refuses_one_more_until_one_ends(self):
        for protocol in ("imap", "pop3", "smtp"):
            with self.subTest(protocol=protocol):
                proxy = self.proxy(protocol, max_user_sessions="1")
                first = self.greeted(proxy, protocol)
                self.assertTrue(self.logged_in(protocol, self.attempt(first, protocol, "alice",
                                                                      "secret")))
                second = self.greeted(proxy, protocol)
                self.assertEqual(self.attempt(second, protocol, "alice", "secret"),
                                 self.LIMIT[protocol])
                second.expect_closed()
                proxy.wait_for_log(r"max_user_sessions \(1\) reached")
                other = self.greeted(proxy, protocol)              # another user: not counted
                self.assertTrue(self.logged_in(protocol, self.attempt(other, protocol, "bob",
                                                                      "builder")))
                first.close()
                wait_until(lambda: len(proxy.worker.sessions) == 1, what="the first to end")
                third = self.greeted(proxy, protocol)
                self.assertTrue(self.logged_in(protocol, self.attempt(third, protocol, "alice",
                                                                      "secret")))


class BackendDecidesEndToEndTests(EndToEndTestCase):
    """auth = backend (issue 15): the routed backend's own login is the
    verdict, relayed to the client as the table's would be, and counted by
    the login defence.  The backend takes "backend-pw", never the table's
    "secret": the [users] table is not asked."""

    FAILED = {"imap": b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n",
              "pop3": b"-ERR " + mp.AUTH_FAILED_TEXT + b"\r\n",
              "smtp": b"535 5.7.0 " + mp.AUTH_FAILED_TEXT + b"\r\n"}
    greeted = LoginDefenceEndToEndTests.greeted
    attempt = LoginDefenceEndToEndTests.attempt
    logged_in = LoginDefenceEndToEndTests.logged_in
    fewer_pair_failures = LoginDefenceEndToEndTests.fewer_pair_failures

    def proxy(self, protocol: str, **mail) -> ProxyUnderTest:
        self.backend = self.use(FAKE_BACKENDS[protocol](accept=[(b"alice", b"backend-pw")]))
        mail.setdefault("auth_delay", "1ms")
        return self.start_proxy(protocol, self.backend.port, auth="backend", **mail)

    def test_the_backend_says_no_then_yes_on_each_protocol(self):
        for protocol in ("imap", "pop3", "smtp"):
            with self.subTest(protocol=protocol):
                proxy = self.proxy(protocol)
                client = self.greeted(proxy, protocol)
                self.assertEqual(self.attempt(client, protocol, "alice", "secret"),
                                 self.FAILED[protocol])
                proxy.wait_for_log(r'\[info\] \d+#0: \*1 client login failed: "backend: [^"]+" '
                                   r'while in auth state, .*login: "alice", upstream: '
                                   r"127\.0\.0\.1:%d" % self.backend.port)
                # The client tries again, on a new backend connection.
                reply = self.attempt(client, protocol, "alice", "backend-pw")
                self.assertTrue(self.logged_in(protocol, reply), reply)
                self.assertEqual(self.backend.logins, [(b"alice", b"secret"),
                                                       (b"alice", b"backend-pw")])
                self.assertEqual(len(self.backend.received), 2)
                proxy.wait_for_log(r"\*1 client logged in while in auth state")
                if protocol == "smtp":
                    # AUTH with the client's own login: the backend decides
                    # (proxy_smtp_auth is off); XCLIENT has no LOGIN= then.
                    client.send("NOOP")
                    self.assertEqual(client.read_line(), b"250 2.0.0 Ok\r\n")
                    self.assertIn(b"AUTH PLAIN " + b64(b"\0alice\0backend-pw") + b"\r\n",
                                  bytes(self.backend.received[1]))
                    self.assertIn(smtp_xclient(login=b""), bytes(self.backend.received[1]))
                else:
                    client.send("a2 NOOP" if protocol == "imap" else "NOOP")
                    self.assertIn(client.read_line(), (b"a2 OK NOOP completed\r\n", b"+OK\r\n"))

    def test_a_refusal_is_counted_by_the_defence(self):
        self.fewer_pair_failures()
        proxy = self.proxy("imap", auth_delay="50ms")
        client = self.greeted(proxy, "imap")
        waited = []
        for number in range(mp.AUTH_PAIR_LIMIT):
            started = time.monotonic()
            self.assertEqual(self.attempt(client, "imap", "alice", "guess%d" % number),
                             self.FAILED["imap"])
            waited.append(time.monotonic() - started)
        for took, least in zip(waited, (0.05, 0.1, 0.2)):
            self.assertGreaterEqual(took, least - 0.005, waited)
        self.assertRegex(proxy.log, r"\[notice\] \d+#0: \*1 login penalty: 2 recent failures from "
                                    r"127\.0\.0\.1 or of this account, reply in 0\.1s")
        # The pair is refused for now: the right password does not even
        # reach the backend.
        self.assertEqual(self.attempt(client, "imap", "alice", "backend-pw"),
                         b"a1 NO [UNAVAILABLE] Temporary authentication failure\r\n")
        self.assertEqual(len(self.backend.logins), mp.AUTH_PAIR_LIMIT)
        proxy.wait_for_log(r"login refused for now: 3 wrong passwords")

    def test_an_unreachable_backend_is_an_internal_error_and_no_failure(self):
        proxy = self.start_proxy("pop3", free_port(), auth="backend", auth_delay="50ms")
        for number in range(2):
            client = self.greeted(proxy, "pop3")
            client.send(b"USER alice\r\nPASS pw\r\n")
            client.expect_line(mp.POP3_OK)
            client.expect_line(mp.POP3_INTERNAL_ERROR)
            client.expect_closed()
        proxy.wait_for_log(r"\*2 connect\(\) failed \(111: Connection refused\) while "
                           r'connecting to upstream, .*login: "alice", upstream: 127\.0\.0\.1:')
        proxy.wait_for_log(r"\*2 session done: upstream unreachable, ")
        self.assertNotRegex(proxy.log, r"login failed|login penalty")
        self.assertEqual(proxy.worker.gate.defence.addresses, {})

    def test_a_stalled_backend_times_out_as_an_internal_error_and_no_failure(self):
        backend = self.use(FakeImapBackend(mode="stall"))
        proxy = self.start_proxy("imap", backend.port, auth="backend", timeout="300ms")
        client = self.greeted(proxy, "imap")
        started = time.monotonic()
        self.assertEqual(self.attempt(client, "imap", "alice", "pw"), mp.IMAP_INTERNAL_ERROR)
        self.assertGreaterEqual(time.monotonic() - started, 0.29)
        client.expect_closed()
        proxy.wait_for_log(r"\[error\] .*upstream timed out \(110: Connection timed out\) while "
                           r"reading response from upstream, ")
        proxy.wait_for_log(r"session done: upstream timed out, ")
        self.assertNotRegex(proxy.log, r"login failed|login penalty")
        self.assertEqual(proxy.worker.gate.defence.addresses, {})

    def test_a_temporary_refusal_is_an_internal_error_and_no_failure(self):
        backend = self.use(ScriptedBackend(b"* OK hi\r\n", 1, b"+ go\r\n", 1, b"+\r\n", 1,
                                           b"a1 NO [UNAVAILABLE] try later\r\n"))
        proxy = self.start_proxy("imap", backend.port, auth="backend", auth_delay="50ms")
        client = self.greeted(proxy, "imap")
        self.assertEqual(self.attempt(client, "imap", "alice", "pw"), mp.IMAP_INTERNAL_ERROR)
        client.expect_closed()
        proxy.wait_for_log(r'\[error\] .*upstream sent invalid response: "a1 NO \[UNAVAILABLE\] '
                           r'try later" while reading response from upstream, ')
        self.assertNotRegex(proxy.log, r"login failed|login penalty")
        self.assertEqual(proxy.worker.gate.defence.addresses, {})

    def test_over_max_user_sessions_the_backend_connection_is_closed(self):
        proxy = self.proxy("imap", max_user_sessions="1")
        first = self.greeted(proxy, "imap")
        self.assertTrue(self.logged_in("imap", self.attempt(first, "imap", "alice", "backend-pw")))
        second = self.greeted(proxy, "imap")
        self.assertEqual(self.attempt(second, "imap", "alice", "backend-pw"),
                         b"a1 NO [LIMIT] Too many sessions for this user\r\n")
        second.expect_closed()
        wait_until(lambda: len(self.backend.connections) == 2 and
                   self.backend.threads[2].is_alive() is False,
                   what="the second backend connection to be closed")

    def test_the_table_is_not_asked_and_cram_md5_is_refused_by_t(self):
        text = proxy_config("imap", 1143, auth="backend", imap_auth="plain cram-md5")
        path = TempDir(self).write("backend.conf", text)
        status, out, err = run_mailproxy(["-t", "-c", path])
        self.assertEqual(status, 1, err)
        self.assertIn('imap_auth: "cram-md5" cannot be used with "auth = backend"', err)


class ClientClockTests(unittest.TestCase):
    """The client's time, with a clock the test moves."""

    def test_timeout_per_command_within_the_login_deadline(self):
        now = [1000.0]
        self.addCleanup(setattr, mp, "LOGIN_TIME_LIMIT", mp.LOGIN_TIME_LIMIT)
        mp.LOGIN_TIME_LIMIT = 100.0
        clock = mp.ClientClock(lambda: now[0], 30.0)
        self.assertEqual(clock.left(), 30.0)           # a whole ``timeout`` per command
        now[0] += 80.0
        self.assertEqual(clock.left(), 20.0)           # the deadline is nearer
        self.assertEqual(clock.expired(), "client timed out")
        now[0] += 25.0
        self.assertEqual(clock.left(), 0.0)
        self.assertEqual(clock.expired(), "client timed out (no login within 100s)")

    def test_a_timeout_longer_than_the_limit_is_the_limit(self):
        now = [0.0]
        clock = mp.ClientClock(lambda: now[0], mp.LOGIN_TIME_LIMIT + 60.0)
        now[0] = mp.LOGIN_TIME_LIMIT + 10.0
        self.assertEqual(clock.left(), 50.0)


class SessionLogTests(unittest.TestCase):
    """nginx's context grows as the session learns who and where."""

    def test_context_and_access_line(self):
        out = io.BytesIO()
        log = mp.ErrorLog([(out, "info")])
        logs = unittest.mock.Mock(for_server=lambda server: log, access_for=lambda server: log)
        journal = mp.SessionLog(unittest.mock.Mock(logs=logs), server_settings(), 7, "127.0.0.1:143")
        journal.log("info", "client %s in", ("logged",), "192.0.2.1", "in auth state")
        journal.starttls, journal.login, journal.upstream = True, b'al"i\r\nce', upstream()
        journal.log("error", "upstream timed out", (), "192.0.2.1", None)
        unprintable = unittest.mock.Mock(__str__=unittest.mock.Mock(side_effect=AssertionError))
        journal.log("debug", "%s", (unprintable,), "192.0.2.1", None)   # off: never formatted
        journal.session_done("client quit", "192.0.2.1", 10, 20)
        lines = [line.split(": ", 1)[1] for line in out.getvalue().decode().splitlines()]
        self.assertEqual(lines[0], "*7 client logged in while in auth state, "
                                   "client: 192.0.2.1, server: 127.0.0.1:143")
        self.assertEqual(lines[1], '*7 upstream timed out, client: 192.0.2.1 using starttls, '
                                   'server: 127.0.0.1:143, login: "al\\x22i\\x0d\\x0ace", '
                                   'upstream: 127.0.0.1:143')
        self.assertRegex(lines[2], r"^\*7 session done: client quit, 10 bytes from client, "
                                   r"20 bytes to client, 0\.\d{3}s, client: 192\.0\.2\.1 ")
        self.assertEqual(len(lines), 3)


# -- the PROXY header in ------------------------------------------------------------

PROXY_V1_HEADER = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143\r\n"
PROXY_FACTS = (b"Proxy-Protocol-Addr: 192.0.2.7\r\nProxy-Protocol-Port: 40000\r\n"
               b"Proxy-Protocol-Server-Addr: 127.0.0.1\r\nProxy-Protocol-Server-Port: 143\r\n")


class ProxyProtocolEndToEndInTests(EndToEndTestCase):
    def test_v1_from_a_trusted_peer_sets_the_client_address(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, "proxy_protocol", set_real_ip_from="127.0.0.1")
        client = self.connect(proxy)
        client.send(PROXY_V1_HEADER)
        self.imap_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes(client_ip="192.0.2.7", middle=PROXY_FACTS)])
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)
        proxy.wait_for_log(r'client logged in while [^,]*, client: 192\.0\.2\.7, server: '
                           r'127\.0\.0\.1:%d, login: "alice"' % proxy.port)

    def test_header_and_login_in_one_segment(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, "proxy_protocol", set_real_ip_from="127.0.0.0/8")
        client = self.connect(proxy)
        client.send(PROXY_V1_HEADER + b"a1 LOGIN alice secret\r\n")
        client.expect_line(mp.IMAP_GREETING)
        client.expect(rb"^a1 OK LOGIN completed\r\n$")
        self.assertEqual(auth.requests, [auth_request_bytes(client_ip="192.0.2.7", middle=PROXY_FACTS)])

    def test_imap_id_from_a_trusted_webmail_names_the_client(self):
        """trusted_networks: a webmail's x-originating-ip is the client, for
        auth_http and the log; from anyone else it changes nothing."""
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port), auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, trusted_networks="127.0.0.0/8")
        other = self.auth_http_proxy("imap", auth.port, trusted_networks="10.0.0.0/8")
        for server, expected in ((proxy, "192.0.2.9"), (other, "127.0.0.1")):
            client = self.connect(server)
            client.expect_line(mp.IMAP_GREETING)
            client.send('i1 ID ("x-originating-ip" "192.0.2.9" "x-originating-port" "4711")')
            client.expect_line(mp.IMAP_ID_REPLY)
            client.expect_line(b"i1 " + mp.IMAP_OK)
            client.send("a1 LOGIN alice secret")
            client.expect(rb"^a1 OK LOGIN completed\r\n$")
            server.wait_for_log(r"client logged in while [^,]*, client: %s, " % re.escape(expected))
        self.assertEqual(auth.requests, [auth_request_bytes(client_ip="192.0.2.9"),
                                         auth_request_bytes(client_ip="127.0.0.1")])
        proxy.wait_for_log(r"real client address 192\.0\.2\.9:4711 \(IMAP ID\)")

    def xclient_hello(self, client: Client, xclient: bytes) -> None:
        """A webmail's SMTP opening: EHLO (XCLIENT offered), XCLIENT, the
        greeting again, EHLO again."""
        self.smtp_hello(client, ehlo=SMTP_XCLIENT_EHLO)
        client.send(xclient + b"\r\n")
        self.smtp_hello(client, ehlo=SMTP_XCLIENT_EHLO)

    def test_smtp_xclient_from_a_trusted_peer_names_the_client(self):
        """trusted_networks: XCLIENT's ADDR is the client for auth_http, the
        backend's XCLIENT and the log; its NAME is Client-Host."""
        backend = self.use(FakeSmtpBackend())
        auth = self.auth_server(auth_ok(backend.port), auth_ok(backend.port))
        proxy = self.auth_http_proxy("smtp", auth.port, trusted_networks="127.0.0.0/8")
        client = self.connect(proxy)
        self.xclient_hello(client, b"XCLIENT ADDR=192.0.2.9 PORT=4711")
        self.smtp_auth_plain(client)
        self.smtp_quit(client)
        proxy.wait_for_log(r"real client address 192\.0\.2\.9:4711 \(XCLIENT\)")
        client = self.connect(proxy)
        self.xclient_hello(client, b"xclient addr=IPV6:2001:db8::9 name=gw+2Dwebmail.example.org")
        self.smtp_auth_plain(client)
        self.smtp_quit(client)
        self.wait_for_backend(backend, 1, b"QUIT\r\n")
        self.assertEqual(auth.requests, [
            auth_request_bytes(protocol="smtp", client_ip="192.0.2.9"),
            auth_request_bytes(protocol="smtp", client_ip="2001:db8::9").replace(
                b"Client-Host: [UNAVAILABLE]", b"Client-Host: gw-webmail.example.org")])
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\nXCLIENT ADDR=192.0.2.9 LOGIN=alice NAME=[UNAVAILABLE]"
                         b"\r\nEHLO client.example\r\nQUIT\r\n")
        self.assertIn(b"XCLIENT ADDR=IPV6:2001:db8::9 LOGIN=alice NAME=gw-webmail.example.org\r\n",
                      bytes(backend.received[1]))
        proxy.wait_for_log(r"client logged in while [^,]*, client: 2001:db8::9, ")
        self.assertRegex(proxy.log, r'real client address 2001:db8::9:0 \(XCLIENT\), '
                                    r'name "gw-webmail\.example\.org"')

    def test_smtp_xclient_from_an_untrusted_peer_is_an_invalid_command(self):
        """Not offered, refused as nginx refuses what it does not know, and
        the client stays the peer; a malformed one from a trusted peer
        changes nothing either."""
        backend = self.use(FakeSmtpBackend())
        auth = self.auth_server(auth_ok(backend.port), auth_ok(backend.port))
        other = self.auth_http_proxy("smtp", auth.port, trusted_networks="10.0.0.0/8")
        client = self.connect(other)
        self.smtp_hello(client)                              # no XCLIENT in it
        client.send("XCLIENT ADDR=192.0.2.9 PORT=4711")
        self.assertEqual(client.read_line(), mp.SMTP_INVALID)
        self.smtp_auth_plain(client)
        proxy = self.auth_http_proxy("smtp", auth.port, trusted_networks="127.0.0.1")
        client = self.connect(proxy)
        self.smtp_hello(client, ehlo=SMTP_XCLIENT_EHLO)
        client.send("XCLIENT ADDR=192.0.2.9 PORT=99999")
        self.assertEqual(client.read_line(), mp.SMTP_XCLIENT_SYNTAX)
        self.smtp_auth_plain(client)
        self.assertEqual(auth.requests, [auth_request_bytes(protocol="smtp")] * 2)
        for server in (other, proxy):
            server.wait_for_log(r"client logged in while [^,]*, client: 127\.0\.0\.1, ")
            self.assertNotIn("real client address", server.log)

    def test_v1_from_an_untrusted_peer(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, "proxy_protocol", set_real_ip_from="10.0.0.0/8")
        client = self.connect(proxy)
        client.send(PROXY_V1_HEADER)
        self.imap_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes(client_ip="127.0.0.1", middle=PROXY_FACTS)])
        proxy.wait_for_log(r"client logged in while [^,]*, client: 127\.0\.0\.1, server: ")

    def test_v2_in_with_a_tlv(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, "proxy_protocol", set_real_ip_from="127.0.0.1")
        client = self.connect(proxy)
        client.send(proxy_v2_header("192.0.2.7", 40000, "127.0.0.1", 143,
                                    tlvs=b"\x04\x00\x03abc"))          # a NOOP TLV
        self.imap_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes(client_ip="192.0.2.7", middle=PROXY_FACTS)])

    def test_unknown_v1_header_keeps_the_peer_address(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, "proxy_protocol", set_real_ip_from="127.0.0.1")
        client = self.connect(proxy)
        client.send(b"PROXY UNKNOWN\r\n")
        self.imap_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes()])

    def test_tcp6_header_client_ip_and_xclient(self):
        backend = self.use(FakeSmtpBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("smtp", auth.port, "proxy_protocol", set_real_ip_from="127.0.0.1")
        client = self.connect(proxy)
        client.send(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n")
        self.smtp_hello(client)
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(client.read_line(), mp.SMTP_AUTH_OK)
        self.assertEqual(auth.requests, [auth_request_bytes(
            protocol="smtp", client_ip="2001:db8::7",
            middle=b"Proxy-Protocol-Addr: 2001:db8::7\r\nProxy-Protocol-Port: 40000\r\n"
                   b"Proxy-Protocol-Server-Addr: 2001:db8::1\r\nProxy-Protocol-Server-Port: 25\r\n")])
        client.send("QUIT")
        self.assertEqual(client.read_line(), SMTP_BACKEND_BYE)
        wait_until(lambda: bytes(backend.received[0]).endswith(b"QUIT\r\n"))
        self.assertIn(b"XCLIENT ADDR=IPV6:2001:db8::7 LOGIN=alice NAME=[UNAVAILABLE]\r\n",
                      bytes(backend.received[0]))

    def test_smtp_xclient_carries_the_real_address(self):
        backend = self.use(FakeSmtpBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("smtp", auth.port, "proxy_protocol", set_real_ip_from="127.0.0.1")
        client = self.connect(proxy)
        client.send(PROXY_V1_HEADER)
        self.smtp_hello(client)
        client.send(b"AUTH PLAIN " + PLAIN_ALICE + b"\r\n")
        self.assertEqual(client.read_line(), mp.SMTP_AUTH_OK)
        self.assertEqual(auth.requests, [auth_request_bytes(protocol="smtp", client_ip="192.0.2.7",
                                                            middle=PROXY_FACTS)])
        client.send("QUIT")
        self.assertEqual(client.read_line(), SMTP_BACKEND_BYE)
        wait_until(lambda: bytes(backend.received[0]).endswith(b"QUIT\r\n"))
        self.assertEqual(bytes(backend.received[0]),
                         b"EHLO mail.test\r\nXCLIENT ADDR=192.0.2.7 LOGIN=alice "
                         b"NAME=[UNAVAILABLE]\r\nEHLO client.example\r\nQUIT\r\n")

    def test_proxy_protocol_out_shows_the_real_address(self):
        backend = self.use(FakeImapBackend(proxy_header=True))
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, "proxy_protocol", set_real_ip_from="127.0.0.1",
                                     proxy_protocol="on")
        client = self.connect(proxy)
        client.send(PROXY_V1_HEADER)
        self.imap_login(client)
        self.assertEqual(backend.headers,
                         [b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 %d\r\n" % proxy.port])

    def test_missing_malformed_and_too_long_headers_close_silently(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, "proxy_protocol", set_real_ip_from="127.0.0.1")
        bad = [b"a1 LOGIN alice secret\r\n",
               b"PROXY TCP4 192.0.2.999 127.0.0.1 40000 143\r\n",
               b"PROXY TCP4 192.0.2.7 127.0.0.1 40000\r\n",
               b"PROXY TCP4 " + b"1" * 150,
               mp.PROXY_V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12]
        for data in bad:
            with self.subTest(data=data[:30]):
                client = self.connect(proxy, timeout=1.5)     # the proxy's timeout is 5s
                client.send(data)
                client.expect_closed()
                self.assertEqual(client.received, 0)
        # Still serving.
        client = self.connect(proxy)
        client.send(PROXY_V1_HEADER)
        self.imap_login(client)
        self.assertEqual(len(auth.requests), 1)
        proxy.assert_alive()

    def test_header_then_implicit_tls(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, "ssl proxy_protocol", set_real_ip_from="127.0.0.1",
                                     ssl_certificate="server.crt", ssl_certificate_key="server.key")
        client = self.connect(proxy)
        client.send(PROXY_V1_HEADER)
        client.start_tls(self.client_context(), "mail.example.com")
        self.imap_login(client)
        tls = (b"Auth-SSL: on\r\nAuth-SSL-Protocol: " + client.sock.version().encode() +
               b"\r\nAuth-SSL-Cipher: " + client.sock.cipher()[0].encode() + b"\r\n")
        self.assertEqual(auth.requests, [auth_request_bytes(client_ip="192.0.2.7", middle=PROXY_FACTS,
                                                            after=tls)])
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)

    def test_header_and_client_hello_in_one_segment(self):
        backend = self.use(FakeImapBackend())
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.auth_http_proxy("imap", auth.port, "ssl proxy_protocol", set_real_ip_from="127.0.0.1",
                                     ssl_certificate="server.crt", ssl_certificate_key="server.key")
        client = self.connect(proxy)
        context = self.client_context()
        client.sock = BioTlsSocket(client.sock, context, "mail.example.com", PROXY_V1_HEADER)
        self.imap_login(client)
        self.assertIn(b"Client-IP: 192.0.2.7\r\n" + PROXY_FACTS + b"Auth-SSL: on\r\n",
                      auth.requests[0])


# ========================================================================== #
# ####                            Processes                             #### #
# ========================================================================== #
# The real program, ``mailproxy.py -c FILE``, in a subprocess of its own
# session (ProgramUnderTest): the master, the workers it forks, real
# signals.  Worker PIDs come from the master's "start worker process N"
# lines (no pgrep); /proc says whether a PID lives, whose child it is and
# which user it runs as.  Every program is stopped at the end of its test,
# its whole process group killed, and the test fails if any process of the
# group is still alive.  Also the Worker in a thread: worker_connections and
# many sessions at once; and the shared books, their copies joined by
# socketpairs in the test's own process.

# -- start, signals, reload ---------------------------------------------------------

class ProcessStartAndSignalTests(EndToEndTestCase):
    """mailproxy.py -c FILE in a subprocess: start, signals, reload."""

    def config(self, directory, port, backend_port=1143, password="old", extra=""):
        """The test's file: program_config's, auth_delay 100ms; ``extra``
        (flush left) goes at the end of [server imap]."""
        return program_config(directory, [port], backend_port, password, server=extra,
                              auth_delay="100ms")

    def test_start_greet_and_sigterm(self):
        directory = TempDir(self)
        port = free_port()
        proxy = ProgramUnderTest(self, self.config(directory, port))
        self.assertIn("listening on 127.0.0.1:%d" % port, proxy.stderr)
        client = connect_client(self, port)
        self.assertEqual(client.read_line(), mp.IMAP_GREETING)
        client.send(b"a1 CAPABILITY\r\n")
        self.assertEqual(client.read_line(), b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS AUTH=PLAIN\r\n")
        self.assertEqual(client.read_line(), b"a1 " + mp.IMAP_OK)
        proxy.send_signal("SIGTERM")
        self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)
        client.expect_closed()                        # the session was closed at once

    def test_port_in_use(self):
        directory = TempDir(self)
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            port = holder.getsockname()[1]
            proxy = ProgramUnderTest(self, self.config(directory, port), started=False)
            self.assertEqual(proxy.wait_exit(5), 1)
        self.assertIn("bind() to 127.0.0.1:%d failed" % port, proxy.stderr)
        self.assertNotIn("Traceback", proxy.stderr)

    def test_the_start_line_names_the_configuration_file(self):
        directory = TempDir(self)
        port = free_port()
        path = self.config(directory, port)
        proxy = ProgramUnderTest(self, path)
        self.assertRegex(proxy.wait_for("started").rstrip("\n"),
                         r"\[notice\] \d+#0: mailproxy/\S+ started, listening on 127\.0\.0\.1:%d; "
                         r"configuration file %s$" % (port, re.escape(os.path.abspath(path))))

    def test_a_start_up_failure_reaches_stderr_when_the_log_is_a_file(self):
        """nginx prints its [emerg] on the terminal as well as in the log."""
        directory = TempDir(self)
        log_path = os.path.join(directory.path, "error.log")
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            port = holder.getsockname()[1]
            proxy = ProgramUnderTest(self, program_config(directory, [port], log=log_path + " info"),
                                     started=False)
            self.assertEqual(proxy.wait_exit(5), 1)
        message = "bind() to 127.0.0.1:%d failed (%d: %s)" % (port, errno.EADDRINUSE,
                                                               os.strerror(errno.EADDRINUSE))
        self.assertIn("mailproxy: [emerg] %s\n" % message, proxy.stderr)
        with open(log_path) as handle:
            self.assertRegex(handle.read(), r"\[emerg\] \d+#0: %s\n" % re.escape(message))

    def test_a_pid_file_that_cannot_be_written_stops_the_start(self):
        """nginx's words, on stderr and in the log; no traceback, and no
        worker left behind (ProgramUnderTest checks the process group)."""
        directory = TempDir(self)
        log_path = os.path.join(directory.path, "error.log")
        pid_path = os.path.join(directory.path, "missing", "mailproxy.pid")
        proxy = ProgramUnderTest(self, program_config(directory, [free_port()], log=log_path + " info",
                                                      main="pid = %s\n" % pid_path), started=False)
        self.assertEqual(proxy.wait_exit(5), 1, proxy.stderr)
        message = 'open() "%s" failed (%d: %s)' % (pid_path, errno.ENOENT, os.strerror(errno.ENOENT))
        self.assertIn("mailproxy: [emerg] %s\n" % message, proxy.stderr)
        self.assertNotIn("Traceback", proxy.stderr)
        with open(log_path) as handle:
            self.assertIn(message, handle.read())

    def test_sample_conf_starts_on_a_host_without_ipv6(self):
        """In a network namespace of its own with IPv6 switched off (what a
        container without IPv6 is), sample.conf's [::1]:8143 is skipped
        with a warning, by -t and by the start; its ports are the
        namespace's own, so no other test's."""
        setup = ("ip link set lo up && echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && "
                 "echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6 && exec \"$0\" \"$@\"")
        command = ["unshare", "-n", "sh", "-c", setup]
        try:
            probe = subprocess.run(command + ["true"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=10)
        except OSError:
            probe = None
        if probe is None or probe.returncode != 0:
            self.skipTest("cannot make a network namespace without IPv6 here (unshare -n, root)")
        sample = os.path.join(HERE, "sample.conf")
        warning = ("bind() to [::1]:8143 failed (%d: %s): this host has no IPv6, [server imap] "
                   "listens without it" % (errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL)))
        done = subprocess.run(command + [sys.executable, MAILPROXY, "-t", "-c", sample],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
        err = done.stderr.decode()
        self.assertEqual(done.returncode, 0, err)
        self.assertIn("mailproxy: [warn] " + warning, err)
        self.assertIn("test is successful", err)
        done = subprocess.run(command + ["timeout", "-s", "TERM", "3", sys.executable, MAILPROXY,
                                         "-c", sample],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
        err = done.stderr.decode()
        self.assertRegex(err, r"\[warn\] \d+#0: " + re.escape(warning))
        self.assertIn(" started, listening on 127.0.0.1:8025, 127.0.0.1:8110, 127.0.0.1:8143; "
                      "configuration file %s\n" % sample, err)
        self.assertNotIn("[emerg]", err)

    def test_sigquit_without_sessions(self):
        directory = TempDir(self)
        proxy = ProgramUnderTest(self, self.config(directory, free_port()))
        proxy.send_signal("SIGQUIT")
        self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)
        self.assertIn("gracefully shutting down", proxy.stderr)

    def test_sigquit_lets_a_session_finish(self):
        directory = TempDir(self)
        port = free_port()
        proxy = ProgramUnderTest(self, self.config(directory, port))
        client = connect_client(self, port)
        self.assertEqual(client.read_line(), mp.IMAP_GREETING)
        mark = proxy.mark()
        proxy.send_signal("SIGQUIT")
        self.assertIsNotNone(proxy.wait_for("gracefully shutting down", mark), proxy.stderr)
        self.assertTrue(connection_refused(port, within=2.0), "still accepting after SIGQUIT")
        client.send(b"a1 NOOP\r\n")
        self.assertEqual(client.read_line(), b"a1 " + mp.IMAP_OK)
        self.assertIsNone(proxy.proc.poll())
        client.send(b"a2 LOGOUT\r\n")
        self.assertEqual(client.read_line(), mp.IMAP_BYE)
        self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)

    def test_sighup_reloads_the_user_table(self):
        backend = self.use(FakeImapBackend(accept=None))
        directory = TempDir(self)
        port = free_port()
        path = self.config(directory, port, backend.port, password="old")
        proxy = ProgramUnderTest(self, path)
        self.assertEqual(imap_login_reply(self, port, "old"), b"a1 OK LOGIN completed\r\n")
        self.config(directory, port, backend.port, password="new")
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark), proxy.stderr)
        started = time.monotonic()
        self.assertEqual(imap_login_reply(self, port, "old"),
                         b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        self.assertGreaterEqual(time.monotonic() - started, 0.09)     # auth_delay
        self.assertEqual(imap_login_reply(self, port, "new"), b"a1 OK LOGIN completed\r\n")
        self.assertIn((b"alice", b"new"), backend.logins)
        proxy.send_signal("SIGTERM")
        self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)

    def test_sighup_with_an_invalid_file_keeps_the_old_configuration(self):
        backend = self.use(FakeImapBackend(accept=None))
        directory = TempDir(self)
        port = free_port()
        path = self.config(directory, port, backend.port, password="old")
        proxy = ProgramUnderTest(self, path)
        self.config(directory, port, backend.port, password="new", extra="bogus_directive = 1\n")
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        self.assertIsNotNone(proxy.wait_for("reload failed", mark), proxy.stderr)
        self.assertIsNotNone(proxy.wait_for('unknown directive "bogus_directive"', mark), proxy.stderr)
        self.assertEqual(imap_login_reply(self, port, "old"), b"a1 OK LOGIN completed\r\n")
        self.assertIsNone(proxy.proc.poll())
        proxy.send_signal("SIGTERM")
        self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)

    def test_sighup_opens_new_listeners(self):
        directory = TempDir(self)
        port, second = free_port(), free_port()
        proxy = ProgramUnderTest(self, self.config(directory, port))
        self.config(directory, port, extra="\n[server second]\nlisten = 127.0.0.1:%d\nprotocol = imap\n" % second)
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark), proxy.stderr)
        client = connect_client(self, second)
        self.assertEqual(client.read_line(), mp.IMAP_GREETING)

    def test_check_and_start_agree_on_a_wildcard_and_an_address_of_one_port(self):
        # nginx accepts "*:P" and "127.0.0.1:P" together (it binds the
        # wildcard only); mailproxy binds each listen, so -t and the start
        # must agree: both refuse it.
        directory = TempDir(self)
        port = free_port()
        path = directory.write("mailproxy.conf", """\
            [mail]
            proxy_pass = 127.0.0.1:1143

            [server any]
            listen = 0.0.0.0:%d
            protocol = imap

            [server loopback]
            listen = 127.0.0.1:%d
            protocol = imap
        """ % (port, port))
        status, out, err = run_mailproxy(["-t", "-c", path])
        proxy = ProgramUnderTest(self, path, started=False)
        started = proxy.wait_for("started") is not None
        self.assertEqual(status == 0, started, "-t exit %d; start:\n%s" % (status, proxy.stderr))

    def test_error_log_in_a_server_section_is_used(self):
        # error_log in [server NAME] (and [mail]) sends that server's
        # session lines to its own file, as nginx.
        directory = TempDir(self)
        port = free_port()
        log_path = os.path.join(directory.path, "server.log")
        proxy = ProgramUnderTest(self, self.config(directory, port, extra="error_log = server.log info\n"))
        client = connect_client(self, port)
        self.assertEqual(client.read_line(), mp.IMAP_GREETING)
        client.send(b"a1 LOGOUT\r\n")
        self.assertEqual(client.read_line(), mp.IMAP_BYE)
        proxy.send_signal("SIGTERM")
        self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)
        self.assertTrue(os.path.exists(log_path), "server.log was not created")
        with open(log_path) as handle:
            self.assertIn("connected to 127.0.0.1:%d" % port, handle.read())


# -- workers: several, and one that dies --------------------------------------------

@needs_fork_and_proc
class ProcessWorkerTests(EndToEndTestCase):

    def test_three_workers_and_a_killed_one_is_replaced(self):
        backend = self.use(FakeImapBackend(accept=None))
        directory = TempDir(self)
        port = free_port()
        proxy = ProgramUnderTest(self, program_config(directory, [port], backend.port,
                                                      main="worker_processes = 3\n"))
        workers = proxy.workers()
        self.assertEqual(len(set(workers)), 3, proxy.stderr)
        for pid in workers:
            self.assertTrue(process_alive(pid), "worker %d is not running" % pid)
            self.assertEqual(process_stat(pid).ppid, proxy.pid, "worker %d: not the master's child" % pid)
        mark = proxy.mark()
        for _ in range(5):
            self.assertEqual(imap_login_reply(self, port, "secret"),
                             b"a1 OK LOGIN completed\r\n")
        # The log lines come through a pipe, maybe after the replies.
        wait_until(lambda: len(proxy.served_by(mark)) >= 5, 3.0, "five 'connected' lines")
        served = proxy.served_by(mark)
        self.assertEqual(len(served), 5, proxy.stderr)
        self.assertLessEqual(set(served), set(workers), "a session outside the workers")

        victim = workers[1]
        mark = proxy.mark()
        os.kill(victim, signal.SIGKILL)
        line = proxy.wait_for("worker process %d exited on signal 9, starting a new one" % victim,
                              mark)
        self.assertIsNotNone(line, proxy.stderr)
        self.assertIn("[alert]", line)
        self.assertIsNotNone(proxy.wait_for("start worker process", mark), proxy.stderr)
        replacement = proxy.workers(mark)
        self.assertEqual(len(replacement), 1, proxy.stderr)
        new = replacement[0]
        self.assertNotIn(new, workers)
        self.assertTrue(process_alive(new))
        self.assertEqual(process_stat(new).ppid, proxy.pid)
        self.assertFalse(process_alive(victim))
        current = set(workers) - {victim} | {new}
        mark = proxy.mark()
        for _ in range(5):
            self.assertEqual(imap_login_reply(self, port, "secret"),
                             b"a1 OK LOGIN completed\r\n")
        # The log lines come through a pipe, maybe after the replies.
        wait_until(lambda: len(proxy.served_by(mark)) >= 5, 3.0, "five 'connected' lines")
        served = proxy.served_by(mark)
        self.assertEqual(len(served), 5, proxy.stderr)
        self.assertLessEqual(set(served), current)

    def test_worker_connections_keeps_the_third_client_in_the_backlog(self):
        directory = TempDir(self)
        port = free_port()
        proxy = ProgramUnderTest(self, program_config(directory, [port], main="worker_connections = 2\n"))
        first, second = Client(port, 2.0), Client(port, 2.0)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        first.expect_line(mp.IMAP_GREETING)
        second.expect_line(mp.IMAP_GREETING)
        third = Client(port, 2.0)                 # the kernel completes the handshake
        self.addCleanup(third.close)
        third.expect_nothing(0.3)
        self.assertEqual(len(proxy.served_by()), 2, "the third client was accepted")
        second.send("a1 NOOP")
        second.expect_line(b"a1 " + mp.IMAP_OK)  # the two sessions are served meanwhile
        third.expect_nothing(0.1)
        first.send("a1 LOGOUT")
        first.expect(rb"^\* BYE")
        first.expect(rb"^a1 OK")
        first.expect_closed()
        started = time.monotonic()
        third.expect_line(mp.IMAP_GREETING)
        self.assertLess(time.monotonic() - started, 0.5, "the third client waited too long")
        third.send("a2 NOOP")
        third.expect_line(b"a2 " + mp.IMAP_OK)
        deadline = time.monotonic() + 2        # the log line comes through a pipe
        while len(proxy.served_by()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertEqual(len(proxy.served_by()), 3)


class WorkerEndToEndTests(EndToEndTestCase):
    def test_many_idle_connections(self):
        backend = self.use(FakeImapBackend())
        proxy = self.start_proxy("imap", backend.port)
        idle = [self.connect(proxy) for _ in range(300)]
        wait_until(lambda: len(proxy.sessions()) == 300, what="300 sessions")
        client = self.connect(proxy)
        self.imap_login(client)
        client.send("a2 NOOP")
        client.expect(rb"^a2 OK NOOP completed\r\n$")
        client.send("a3 LOGOUT")
        client.expect(rb"^\* BYE")
        client.expect(rb"^a3 OK LOGOUT completed\r\n$")
        client.expect_closed()
        for client in idle:
            client.expect_line(mp.IMAP_GREETING)      # each one was greeted
            client.close()
        wait_until(lambda: not proxy.sessions(), what="the idle sessions to end")

    def test_worker_connections_holds_the_next_client_in_the_backlog(self):
        proxy = self.use(ProxyUnderTest(proxy_config("imap", free_port()).replace(
            "worker_connections = 1024", "worker_connections = 2")))
        first, second = self.connect(proxy), self.connect(proxy)
        first.expect_line(mp.IMAP_GREETING)
        second.expect_line(mp.IMAP_GREETING)
        third = self.connect(proxy)                # connect() succeeds: the kernel's backlog
        third.expect_nothing(0.3)
        self.assertEqual(len(proxy.sessions()), 2)
        first.send("a1 LOGOUT")
        first.expect_line(mp.IMAP_BYE)
        first.expect_line(b"a1 " + mp.IMAP_OK)
        first.expect_closed()
        third.expect_line(mp.IMAP_GREETING)          # its turn now


# -- state shared across workers ----------------------------------------------------

class Ledger:
    """A book for the tests: it keeps every event it applies, in order."""
    kinds = ("tick", "worker gone")

    def __init__(self):
        self.events = []

    def apply(self, event):
        self.events.append(event)


class SharedBooksTests(unittest.TestCase):
    """The registry, without processes: publish, apply, the encoding."""

    def books_with_outlet(self):
        """(SharedBooks with a Ledger, the Ledger, the datagrams sent out)."""
        books, sent = mp.SharedBooks(), []
        books.outlet = sent.append
        return books, books.add(Ledger()), sent

    def test_publish_applies_here_at_once_then_sends_the_datagram(self):
        books, ledger, sent = self.books_with_outlet()
        ledger.publish(("tick", 1, "a\u00e9", (2, 3.5), None, True))
        # Here as everywhere else: what came through JSON (a list for the tuple).
        self.assertEqual(ledger.events, [("tick", 1, "a\u00e9", [2, 3.5], None, True)])
        self.assertEqual(sent, [b'["tick",1,"a\\u00e9",[2,3.5],null,true]'])
        self.assertEqual(mp.decode_event(sent[0]), ledger.events[0])

    def test_an_event_goes_to_each_book_of_its_kind_and_no_other(self):
        books = mp.SharedBooks()
        ledger, defence = books.add(Ledger()), books.add(mp.LoginDefence(b"key"))
        books.apply(("login failed", "192.0.2.1", "alice", "digest", 5.0, 1.0, 101))
        books.apply(("tick", 1))
        books.apply(("unknown kind", 1))                     # nobody's: ignored
        self.assertEqual(ledger.events, [("tick", 1)])
        self.assertEqual(defence.recent_failures("192.0.2.1", "bob", 5.0), 1)
        self.assertIs(books.of(mp.LoginDefence), defence)
        self.assertRaises(KeyError, books.of, mp.SharedBooks)

    def test_an_oversized_or_unsayable_event_is_refused_everywhere(self):
        books, ledger, sent = self.books_with_outlet()
        largest = ("tick", "x" * (mp.SHARED_EVENT_MAX - len('["tick",""]')))
        for event in (("tick", "x" * mp.SHARED_EVENT_MAX), ("tick", b"bytes"),
                      ("tick", float("nan")), (1, 2), ()):
            with self.assertRaises(ValueError, msg=repr(event)[:40]):
                books.publish(event)
        self.assertEqual((ledger.events, sent), ([], []))
        books.publish(largest)
        self.assertEqual(len(sent[0]), mp.SHARED_EVENT_MAX)

    def test_malformed_datagrams_are_refused(self):
        for data in (b"", b"tick", b'{"tick":1}', b"[]", b"[1]", b'["tick"', b'["\xff"]',
                     b"[" * 4000, b'["tick","%s"]' % (b"x" * mp.SHARED_EVENT_MAX)):
            with self.assertRaises(ValueError, msg=repr(data)[:40]):
                mp.decode_event(data)


class SharedProcess:
    """Stands in for a Master or a Worker in a BookBroker: a loop and a log."""

    def __init__(self, loop: mp.EventLoop):
        self.loop = loop
        self.log_file = io.BytesIO()
        self.log = mp.ErrorLog([(self.log_file, "info")])

    def logged(self) -> str:
        return self.log_file.getvalue().decode()


class BookBrokerTests(EventLoopTestCase):
    """Copies of the books in one test process, joined by real socketpairs
    the way the master joins the workers, all watched by one loop."""

    def copy(self):
        """(BookBroker over SharedBooks with a Ledger, the Ledger, its process)."""
        process = SharedProcess(self.loop)
        broker = mp.BookBroker(mp.SharedBooks(), process)
        return broker, broker.books.add(Ledger()), process

    def join(self, one, other, one_pid, other_pid):
        """A socketpair between two brokers, as Master.spawn makes."""
        one_end, other_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(one_end.close)
        self.addCleanup(other_end.close)
        one.attach(other_pid, one_end)
        other.attach(one_pid, other_end)

    def test_events_published_on_one_copy_are_applied_on_the_other_in_order(self):
        first, first_ledger, _ = self.copy()
        second, second_ledger, _ = self.copy()
        self.join(first, second, 1, 2)
        for number in range(mp.SHARED_QUEUE_MAX):
            first_ledger.publish(("tick", number))
        self.assertTrue(first.channels[2].queue, "all went at once: nothing waited in order")
        second_ledger.publish(("tick", "back"))
        expected = [("tick", number) for number in range(mp.SHARED_QUEUE_MAX)]
        everything = mp.SHARED_QUEUE_MAX + 1
        self.drive(lambda: len(second_ledger.events) == len(first_ledger.events) == everything)
        self.assertEqual(second_ledger.events, [("tick", "back")] + expected)
        self.assertEqual(first_ledger.events, expected + [("tick", "back")])

    def test_the_master_passes_a_worker_event_to_the_other_workers(self):
        master, master_ledger, _ = self.copy()
        one, one_ledger, _ = self.copy()
        two, two_ledger, _ = self.copy()
        self.join(master, one, 100, 1)
        self.join(master, two, 100, 2)
        one_ledger.publish(("tick", "from one"))
        master_ledger.publish(("tick", "from the master"))
        everybody = (master_ledger, one_ledger, two_ledger)
        self.drive(lambda: all(len(ledger.events) == 2 for ledger in everybody))
        for ledger in everybody:
            self.assertCountEqual(ledger.events,
                                  [("tick", "from one"), ("tick", "from the master")])
        one_ledger.publish(("tick", "last words"))
        master.gone(1)                 # reaped: what it sent counts, then its departure
        self.drive(lambda: len(two_ledger.events) == 4)
        self.assertEqual(two_ledger.events[2:], [("tick", "last words"), ("worker gone", 1)])
        self.assertEqual(master_ledger.events[2:], two_ledger.events[2:])
        self.assertEqual(list(master.channels), [2])
        self.loop.run_once(0.05)
        self.assertEqual(len(one_ledger.events), 3, "one got its own event back")

    def test_malformed_datagrams_are_ignored_and_logged_once(self):
        broker, ledger, process = self.copy()
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(peer.close)
        broker.attach(1, ours)
        oversized = b'["tick","%s"]' % (b"x" * mp.SHARED_EVENT_MAX)
        for data in (b"junk", b"[1]", oversized, b'["tick",1]'):
            peer.send(data)
        self.drive(lambda: ledger.events)
        self.assertEqual(ledger.events, [("tick", 1)])
        self.assertEqual(process.logged().count("[warn]"), 1, process.logged())
        self.assertIn("a malformed shared event from process 1 is ignored", process.logged())
        broker.gone(1)

    def test_a_peer_that_reads_nothing_blocks_nobody_and_gets_the_newest(self):
        broker, ledger, process = self.copy()
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(peer.close)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        channel = broker.attach(1, ours)
        count = mp.SHARED_QUEUE_MAX + 1000

        def publish_all():
            for number in range(count):
                ledger.publish(("tick", number))
        publisher = threading.Thread(target=publish_all, daemon=True)
        publisher.start()
        publisher.join(5)
        self.assertFalse(publisher.is_alive(), "publish() blocked on a full socket")
        self.assertEqual(len(ledger.events), count)            # applied here all the same
        self.assertEqual(len(channel.queue), mp.SHARED_QUEUE_MAX)
        self.assertEqual(process.logged().count("[warn]"), 1, process.logged())
        self.assertIn("process 1 reads no shared events, dropping the oldest", process.logged())
        received = []

        def read_some():
            try:
                while True:
                    received.append(mp.decode_event(peer.recv(mp.SHARED_EVENT_MAX))[1])
            except BlockingIOError:
                pass
        peer.setblocking(False)
        self.drive(lambda: not channel.queue and received and received[-1] == count - 1, read_some)
        read_some()
        in_kernel = len(received) - mp.SHARED_QUEUE_MAX         # sent before it filled up
        self.assertGreater(in_kernel, 0)
        newest = list(range(count - mp.SHARED_QUEUE_MAX, count))
        self.assertEqual(received, list(range(in_kernel)) + newest)


@needs_fork_and_proc
class ProcessSharedBooksTests(EndToEndTestCase):
    """The login defence's counts go through the master: one budget for
    all the workers, and a worker forked later (a replacement, a reload's)
    starts with the master's copy."""

    def client_of_an_idle_worker(self, proxy: ProgramUnderTest, port: int):
        """(a greeted client, the worker serving it).  With worker_connections
        1, a worker with a client accepts no other: the new client goes to
        one that has none."""
        mark = proxy.mark()
        client = connect_client(self, port)
        client.expect_line(mp.IMAP_GREETING)
        wait_until(lambda: proxy.served_by(mark), what="the session's connected line")
        return client, proxy.served_by(mark)[0]

    def answer(self, proxy: ProgramUnderTest, client: Client, login: str, password: str):
        """LOGIN LOGIN PASSWORD: (the reply's line, the pid of the worker
        that logged the failure or the refusal; None for an OK)."""
        mark = proxy.mark()
        client.send("a1 LOGIN %s %s" % (login, password))
        line = client.read_line()
        if line.startswith(b"a1 OK "):
            return line, None
        logged = proxy.wait_for("client login failed", mark) or ""
        match = re.search(r"\] (\d+)#0: \*\d+ ", logged)
        self.assertIsNotNone(match, proxy.stderr)
        return line, int(match.group(1))

    def test_one_budget_for_all_workers_kept_by_a_replacement_and_a_reload(self):
        """AUTH_PAIR_LIMIT wrong passwords for alice, half through each
        worker: then both refuse alice from this address, the right
        password too, with the temporary reply; bob goes on logging in.
        A replacement worker and a reload's new ones know it too."""
        backend = self.use(FakeImapBackend(accept=None))       # lets anyone in, unless refused
        directory = TempDir(self)
        port = free_port()
        proxy = ProgramUnderTest(self, program_config(
            directory, [port], backend.port, auth_delay="1ms",
            password="secret\nbob = {PLAIN}builder",
            main="worker_processes = 2\nworker_connections = 1\n"))
        first, first_pid = self.client_of_an_idle_worker(proxy, port)
        second, second_pid = self.client_of_an_idle_worker(proxy, port)
        self.assertEqual({first_pid, second_pid}, set(proxy.workers()))
        failed = b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n"
        for number in range(mp.AUTH_PAIR_LIMIT):              # half the budget on each
            client, pid = ((first, first_pid), (second, second_pid))[number % 2]
            self.assertEqual(self.answer(proxy, client, "alice", "wrong%d" % number),
                             (failed, pid))
        time.sleep(0.2)                # the last failure's event is on its way through the master
        unavailable = b"a1 NO " + mp.IMAP_LOGIN_UNAVAILABLE[0] + b"\r\n"
        self.assertEqual(self.answer(proxy, first, "alice", "secret"), (unavailable, first_pid))
        self.assertEqual(self.answer(proxy, second, "alice", "secret"), (unavailable, second_pid))
        self.assertIn("login refused for now: %d wrong passwords" % mp.AUTH_PAIR_LIMIT,
                      proxy.stderr)

        mark = proxy.mark()                    # a replacement: forked with the master's copy
        os.kill(first_pid, signal.SIGKILL)
        first.expect_closed()
        self.assertIsNotNone(proxy.wait_for("start worker process", mark), proxy.stderr)
        third, third_pid = self.client_of_an_idle_worker(proxy, port)
        self.assertEqual(proxy.workers(mark), [third_pid])
        self.assertEqual(self.answer(proxy, third, "alice", "secret"), (unavailable, third_pid))

        mark = proxy.mark()                    # a reload's new generation: the same
        proxy.send_signal("SIGHUP")
        self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark), proxy.stderr)
        served = []
        for _ in proxy.workers(mark):
            client, pid = self.client_of_an_idle_worker(proxy, port)
            self.assertEqual(self.answer(proxy, client, "alice", "secret"), (unavailable, pid))
            # Only the attacked account from the attacking address: bob
            # logs in there (the first of the account's failures is his).
            self.assertEqual(self.answer(proxy, client, "bob", "builder")[1], None)
            served.append(pid)
        self.assertEqual(sorted(served), sorted(proxy.workers(mark)))
        self.assertEqual(len(served), 2)


    def test_max_user_ip_sessions_counts_the_sessions_of_every_worker(self):
        backend = self.use(FakeImapBackend(accept=None))
        directory = TempDir(self)
        port = free_port()
        proxy = ProgramUnderTest(self, program_config(
            directory, [port], backend.port, mail="max_user_ip_sessions = 1\n",
            main="worker_processes = 2\nworker_connections = 1\n"))
        first, first_pid = self.client_of_an_idle_worker(proxy, port)
        self.assertEqual(self.answer(proxy, first, "alice", "secret")[1], None)
        second, second_pid = self.client_of_an_idle_worker(proxy, port)
        self.assertNotEqual(first_pid, second_pid)
        time.sleep(0.2)                # the session's event on its way through the master
        mark = proxy.mark()
        second.send("a1 LOGIN alice secret")
        second.expect_line(b"a1 NO " + mp.IMAP_SESSION_LIMIT[0] + b"\r\n")
        second.expect_closed()
        self.assertIsNotNone(proxy.wait_for("max_user_ip_sessions (1) reached", mark),
                             proxy.stderr)
        first.send("q1 LOGOUT")
        self.assertIn(b"q1 OK LOGOUT", first.read_until_closed())
        time.sleep(0.2)
        third, third_pid = self.client_of_an_idle_worker(proxy, port)
        self.assertEqual(self.answer(proxy, third, "alice", "secret")[1], None)


# -- SIGHUP: a reload ---------------------------------------------------------------

@needs_fork_and_proc
def unix_listen(text: str, path: str = "imap.sock", flags: str = "") -> str:
    """A configuration's text (proxy_config's, program_config's) with its
    first listen on the unix socket ``path`` instead (relative: beside the
    file), with ``flags``."""
    return re.sub(r"^listen = 127\.0\.0\.1:\d+[^\n]*", lambda match: "listen = unix:%s%s" % (
        path, " " + flags if flags else ""), text, count=1, flags=re.M)


def file_mode(path: str) -> Optional[int]:
    """The permission bits of ``path`` if it is a socket; None if there is
    none (or it is no socket)."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(status.st_mode) if stat.S_ISSOCK(status.st_mode) else None


def unix_program_config(directory: TempDir, backend_port: int = 1143, path: str = "imap.sock",
                        name: str = "mailproxy.conf", **options) -> str:
    """program_config's file with its listen on the unix socket ``path``."""
    config = program_config(directory, [free_port()], backend_port, name=name, **options)
    return directory.write(name, unix_listen(read_text(config), path))


class UnixListenEndToEndTests(EndToEndTestCase):
    """listen unix:PATH, as nginx: a stream socket, mode 0666, the client
    "unix:" in the logs and to auth_http, PROXY headers both ways."""

    def unix_proxy(self, flags: str = "", **mail) -> "tuple":
        backend = self.use(FakeImapBackend(proxy_header=mail.get("proxy_protocol") == "on"))
        auth = self.auth_server(auth_ok(backend.port))
        proxy = self.use(ProxyUnderTest(unix_listen(proxy_config("imap", auth_port=auth.port, **mail),
                                                    flags=flags)))
        return proxy, auth, backend, os.path.join(proxy.directory.name, "imap.sock")

    def test_login_through_a_unix_socket(self):
        proxy, auth, backend, path = self.unix_proxy()
        self.assertEqual(file_mode(path), 0o666)            # nginx's chmod(), whatever the umask
        client = connect_client(self, path)
        self.imap_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes(client_ip="unix:")])
        self.assertEqual(bytes(backend.received[0]), IMAP_LOGIN_ON_THE_WIRE)
        proxy.wait_for_log(r"\*1 client unix: connected to unix:%s, " % re.escape(path))
        proxy.wait_for_log(r'client logged in while [^,]*, client: unix:, server: unix:%s, '
                           r'login: "alice"' % re.escape(path))
        client.send("n1 NOOP")
        client.expect(rb"^n1 OK NOOP completed\r\n$")         # and it relays

    def test_proxy_protocol_on_a_unix_socket_from_a_trusted_peer(self):
        proxy, auth, backend, path = self.unix_proxy("proxy_protocol", set_real_ip_from="unix:",
                                                     proxy_protocol="on")
        client = connect_client(self, path)
        client.send(PROXY_V1_HEADER)
        self.imap_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes(client_ip="192.0.2.7", middle=PROXY_FACTS)])
        # To the backend: the real client, and the address it reached is no IP: UNKNOWN.
        self.assertEqual(backend.headers, [b"PROXY UNKNOWN\r\n"])

    def test_proxy_protocol_on_a_unix_socket_from_an_untrusted_peer(self):
        proxy, auth, backend, path = self.unix_proxy("proxy_protocol", set_real_ip_from="127.0.0.1")
        client = connect_client(self, path)
        client.send(PROXY_V1_HEADER)
        self.imap_login(client)
        self.assertEqual(auth.requests, [auth_request_bytes(client_ip="unix:", middle=PROXY_FACTS)])

    def test_a_file_in_the_way_is_not_removed(self):
        # nginx does not unlink the path before bind(): a socket file there
        # may be a running proxy's.  The message says whether one listens.
        directory = TempDir(self)
        path = os.path.join(directory.path, "imap.sock")
        listen = mp.parse_listen(["unix:" + path])
        with socket.socket(socket.AF_UNIX) as live:
            live.bind(path)
            live.listen(1)
            with self.assertRaises(OSError) as caught:
                mp.bind_listen(listen)
            self.assertEqual(caught.exception.errno, errno.EADDRINUSE)
            self.assertIn("bind() to unix:%s failed (%d: " % (path, errno.EADDRINUSE),
                          caught.exception.strerror)
            self.assertIn("another process listens on it", mp.unix_socket_hint(path))
        with self.assertRaises(OSError) as caught:                  # closed: a stale file
            mp.bind_listen(listen)
        self.assertIn("nothing listens on it", mp.unix_socket_hint(path))
        self.assertIsNotNone(file_mode(path), "the file was removed")
        os.unlink(path)
        directory.write("imap.sock", "not a socket")
        with self.assertRaises(OSError) as caught:
            mp.bind_listen(listen)
        self.assertEqual(mp.unix_socket_hint(path), ": the file is not a socket")

    def test_an_smtp_client_on_a_unix_socket_is_not_resolved(self):
        # ngx_mail_smtp_init_session: no PTR query for a unix peer, its
        # name is [TEMPUNAVAIL], and no error is logged.
        dns = FakeDns(records_for({}))
        self.addCleanup(dns.close)
        backend = self.use(FakeSmtpBackend())
        proxy = self.use(ProxyUnderTest(unix_listen(proxy_config(
            "smtp", backend.port, resolver="127.0.0.1:%d" % dns.port))))
        client = connect_client(self, os.path.join(proxy.directory.name, "imap.sock"))
        self.smtp_hello(client)
        self.smtp_auth_plain(client)
        self.smtp_quit(client)
        self.wait_for_backend(backend, 0, b"QUIT\r\n")
        self.assertEqual(dns.queries, [])
        # Postfix refuses nginx's ADDR=unix: ("501 Bad ADDR syntax").
        self.assertIn(b"XCLIENT ADDR=[UNAVAILABLE] LOGIN=alice NAME=[TEMPUNAVAIL]\r\n",
                      bytes(backend.received[0]))
        self.assertNotIn("[error]", proxy.log)

    def test_so_keepalive_on_a_unix_socket_is_ignored(self):
        # nginx sets no TCP option on a unix socket; the session must not fail.
        proxy, auth, backend, path = self.unix_proxy("so_keepalive=30s:10s:3")
        self.imap_login(connect_client(self, path))


@needs_fork_and_proc
class UnixListenProgramTests(EndToEndTestCase):
    """The real program on listen unix:PATH: a reload keeps the socket (the
    same file, not made again), one that drops it removes it, exit removes
    it (the master; never a worker), and -t leaves no file and never
    touches a running proxy's."""

    def start(self, main: str = "", **options):
        backend = self.use(FakeImapBackend(accept=None))
        directory = TempDir(self)
        path = os.path.join(directory.path, "imap.sock")
        config = unix_program_config(directory, backend.port, main=main, **options)
        return ProgramUnderTest(self, config), directory, path, config, backend

    def login(self, path: str) -> None:
        client = connect_client(self, path)
        client.expect_line(mp.IMAP_GREETING)
        client.send("a1 LOGIN alice secret")
        client.expect(rb"^a1 OK LOGIN completed\r\n$")
        client.close()

    def test_reload_keeps_the_socket_and_exit_removes_it(self):
        proxy, directory, path, config, backend = self.start()
        self.assertIn("listening on unix:%s;" % path, proxy.wait_for("started"))
        self.assertEqual(file_mode(path), 0o666)
        self.login(path)
        before = os.lstat(path).st_ino
        # A client waiting in the backlog across the reload (the old worker
        # stopped, so that it cannot accept it) is served by the new worker:
        # the socket is the same, not one made again.
        old_worker = proxy.workers()[0]
        os.kill(old_worker, signal.SIGSTOP)
        self.addCleanup(lambda: os.kill(old_worker, signal.SIGCONT) if process_alive(old_worker)
                        else None)
        waiting = Client(path)
        self.addCleanup(waiting.close)
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        waiting.expect_line(mp.IMAP_GREETING)
        self.assertNotIn(old_worker, proxy.served_by(mark))
        os.kill(old_worker, signal.SIGCONT)
        self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark), proxy.stderr)
        self.assertEqual(os.lstat(path).st_ino, before, "the reload made the socket again")
        self.login(path)
        waiting.close()
        proxy.send_signal("SIGQUIT")
        self.assertEqual(proxy.wait_exit(), 0)
        self.assertIsNone(file_mode(path), "the socket file is left behind")
        self.assertFalse(os.path.exists(path))
        self.assertNotIn("[emerg]", proxy.stderr)

    def test_sigterm_removes_the_socket_too(self):
        proxy, directory, path, config, backend = self.start()
        self.login(path)
        proxy.send_signal("SIGTERM")
        self.assertEqual(proxy.wait_exit(), 0)
        self.assertFalse(os.path.exists(path))

    def test_without_a_master_exit_removes_the_socket(self):
        proxy, directory, path, config, backend = self.start(main="master_process = off\n")
        self.login(path)
        proxy.send_signal("SIGQUIT")
        self.assertEqual(proxy.wait_exit(), 0)
        self.assertFalse(os.path.exists(path))

    def test_a_reload_that_drops_the_socket_removes_it(self):
        proxy, directory, path, config, backend = self.start()
        port = free_port()
        program_config(directory, [port], backend.port)
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark), proxy.stderr)
        self.assertIsNotNone(proxy.wait_for("[warn]", mark), proxy.stderr)
        self.assertIn("deleting socket %s" % path, proxy.stderr)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(imap_login_reply(self, port), b"a1 OK LOGIN completed\r\n")

    def test_a_stale_socket_file_stops_the_start(self):
        # As nginx: bind() fails, the file stays; the message says to remove it.
        directory = TempDir(self)
        path = os.path.join(directory.path, "imap.sock")
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(path)
        config = unix_program_config(directory)
        proxy = ProgramUnderTest(self, config, started=False)
        self.assertEqual(proxy.wait_exit(), 1)
        self.assertIn("bind() to unix:%s failed (%d: " % (path, errno.EADDRINUSE), proxy.stderr)
        self.assertIn("nothing listens on it", proxy.stderr)
        self.assertTrue(os.path.exists(path))

    def test_dash_t_leaves_no_file_and_spares_a_running_proxys(self):
        directory = TempDir(self)
        path = os.path.join(directory.path, "imap.sock")
        config = unix_program_config(directory)
        status, out, err = run_mailproxy(["-t", "-c", config])
        self.assertEqual(status, 0, err)
        self.assertFalse(os.path.exists(path), "-t left its socket file behind")
        # A directory that does not exist fails -t, as the start would.
        missing = unix_program_config(directory, path="no/such/dir/imap.sock", name="missing.conf")
        status, out, err = run_mailproxy(["-t", "-c", missing])
        self.assertEqual(status, 1)
        self.assertIn("bind() to unix:%s failed (%d: " % (
            os.path.join(directory.path, "no/such/dir/imap.sock"), errno.ENOENT), err)
        # Beside a running proxy: its socket is not removed, nor made again.
        proxy, directory, path, config, backend = self.start()
        before, mark = os.lstat(path).st_ino, proxy.mark()
        status, out, err = run_mailproxy(["-t", "-c", config])
        self.assertEqual(status, 0, err)
        self.assertIn("test is successful", err)
        self.assertEqual(os.lstat(path).st_ino, before)
        self.assertEqual(proxy.served_by(mark), [], "-t connected to the running proxy")
        self.login(path)


class ProcessReloadTests(EndToEndTestCase):

    def test_sighup_moves_the_listener_and_changes_users_while_a_session_relays(self):
        backend = self.use(FakeImapBackend(message=message_bytes(MEGABYTE), accept=None))
        directory = TempDir(self)
        old_port, new_port = free_port(), free_port()
        path = program_config(directory, [old_port], backend.port, password="old")
        proxy = ProgramUnderTest(self, path)
        old_workers = proxy.workers()
        session, reply = imap_login_session(self, old_port, "old")
        self.assertEqual(reply, b"a1 OK LOGIN completed\r\n")
        session.send("n1 NOOP")
        session.expect(rb"^n1 OK NOOP completed\r\n$")      # relaying before the reload

        program_config(directory, [new_port], backend.port, password="new")
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark), proxy.stderr)
        new_workers = proxy.workers(mark)
        self.assertEqual(len(new_workers), 1, proxy.stderr)
        self.assertNotIn(new_workers[0], old_workers)

        self.assertTrue(connection_refused(old_port), "the removed port still accepts")
        refused, reply = imap_login_session(self, new_port, "old")
        self.assertEqual(reply, b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        accepted, reply = imap_login_session(self, new_port, "new")
        self.assertEqual(reply, b"a1 OK LOGIN completed\r\n")
        self.assertEqual(set(proxy.served_by(mark)), set(new_workers))

        # The session from before the reload, in the old worker, still relays.
        self.assertTrue(process_alive(old_workers[0]))
        fetch_and_append(self, session, MEGABYTE)
        imap_logout(session)
        self.assertIsNotNone(proxy.wait_for("worker process %d exited with code 0" % old_workers[0],
                                            mark), proxy.stderr)
        self.assertEqual(backend.logins, [(b"alice", b"old"), (b"alice", b"new")])
        fetch_and_append(self, accepted, MEGABYTE)             # and the new worker relays too

    def test_sighup_with_an_invalid_file_keeps_the_old_configuration(self):
        backend = self.use(FakeImapBackend(accept=None))
        directory = TempDir(self)
        port = free_port()
        path = program_config(directory, [port], backend.port, password="old")
        proxy = ProgramUnderTest(self, path)
        workers = proxy.workers()
        program_config(directory, [port], backend.port, password="new", server="timeout = soon\n")
        with open(path) as handle:
            line = handle.read().splitlines().index("timeout = soon") + 1
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        failed = proxy.wait_for("reload failed", mark)
        self.assertIsNotNone(failed, proxy.stderr)
        self.assertIn("[alert]", failed)
        error = proxy.wait_for("%s:%d: [server imap] timeout:" % (path, line), mark)
        self.assertIsNotNone(error, "the error is not logged with its place:\n" + proxy.stderr)
        self.assertIn("[emerg]", error)
        self.assertEqual(imap_login_reply(self, port, "old"), b"a1 OK LOGIN completed\r\n")
        self.assertEqual(imap_login_reply(self, port, "new"),
                         b"a1 NO " + mp.AUTH_FAILED_TEXT + b"\r\n")
        self.assertEqual(set(proxy.served_by(mark)), set(workers))
        self.assertEqual(proxy.workers(mark), [], "a new generation was started")
        self.assertEqual(sorted(process_group(proxy.pgid)), sorted(workers + [proxy.pid]))
        self.assertNotIn("configuration reloaded", "".join(proxy.lines[mark:]))


class TlsReloadTests(EndToEndTestCase):
    def test_sighup_picks_up_a_renewed_certificate(self):
        """A certificate renewed in place (same file names) is served to new
        clients after SIGHUP, as nginx does on reload."""
        directory = TempDir(self)
        certificate = directory.write("current.crt", TLS_SERVER_CERT_PEM)
        key = directory.write("current.key", TLS_SERVER_KEY_PEM)
        text = proxy_config("imap", free_port(), listens=("ssl",), ssl_certificate=certificate,
                            ssl_certificate_key=key)
        path = directory.write("mailproxy.conf", text)
        port = int(re.search(r"listen = 127\.0\.0\.1:(\d+)", text).group(1))
        program = ProgramUnderTest(self, path)
        self.assertTrue(program.wait_for(" started, listening on "), program.stderr)

        def served(hostname: str) -> str:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TLS_CLIENT_TIMEOUT)
            with self.client_context().wrap_socket(sock, server_hostname=hostname) as tls:
                subject = dict(pair for rdn in tls.getpeercert()["subject"] for pair in rdn)
                self.assertEqual(tls.recv(100), mp.IMAP_GREETING)
                return subject["commonName"]

        self.assertEqual(served("mail.example.com"), "mail.example.com")
        directory.write("current.crt", TLS_OTHER_CERT_PEM)
        directory.write("current.key", TLS_OTHER_KEY_PEM)
        program.send_signal("SIGHUP")
        self.assertTrue(program.wait_for("configuration reloaded"), program.stderr)
        self.assertEqual(served("mail.example.net"), "mail.example.net")


# -- SIGQUIT: a graceful stop -------------------------------------------------------

@needs_fork_and_proc
class ProcessGracefulStopTests(EndToEndTestCase):

    def test_sigquit_refuses_new_clients_lets_the_session_finish_and_removes_the_pid_file(self):
        backend = self.use(FakeImapBackend(message=message_bytes(MEGABYTE), accept=None))
        directory = TempDir(self)
        port = free_port()
        pid_path = os.path.join(directory.path, "run", "mailproxy.pid")
        os.mkdir(os.path.dirname(pid_path))
        proxy = ProgramUnderTest(self, program_config(directory, [port], backend.port,
                                                      main="pid = run/mailproxy.pid\n"))
        with open(pid_path) as handle:
            self.assertEqual(handle.read(), "%d\n" % proxy.pid)
        worker = proxy.workers()[0]
        session, reply = imap_login_session(self, port)
        self.assertEqual(reply, b"a1 OK LOGIN completed\r\n")
        mark = proxy.mark()
        proxy.send_signal("SIGQUIT")
        self.assertIsNotNone(proxy.wait_for("%d#0: gracefully shutting down" % worker, mark),
                             proxy.stderr)
        self.assertTrue(connection_refused(port, within=1.0), "still accepting after SIGQUIT")
        self.assertTrue(connection_refused(port))
        fetch_and_append(self, session, MEGABYTE)
        self.assertIsNone(proxy.proc.poll(), "exited with a session open")
        self.assertTrue(os.path.exists(pid_path))
        imap_logout(session)
        self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)
        self.assertFalse(os.path.exists(pid_path), "the pid file is left")
        self.assertIn("%d#0: exit" % proxy.pid, proxy.stderr)
        self.assertNotIn("worker_shutdown_timeout", proxy.stderr)

    def test_worker_shutdown_timeout_cuts_a_session_that_stays_open(self):
        backend = self.use(FakeImapBackend(accept=None))
        directory = TempDir(self)
        port = free_port()
        proxy = ProgramUnderTest(self, program_config(directory, [port], backend.port,
                                                      main="worker_shutdown_timeout = 1s\n"))
        session, reply = imap_login_session(self, port)
        self.assertEqual(reply, b"a1 OK LOGIN completed\r\n")
        mark = proxy.mark()
        started = time.monotonic()
        proxy.send_signal("SIGQUIT")
        rest = session.read_until_closed(3.0)
        cut = time.monotonic() - started
        self.assertEqual(rest, b"")
        self.assertGreaterEqual(cut, 0.9, "cut before worker_shutdown_timeout")
        self.assertLess(cut, 2.5, "cut long after worker_shutdown_timeout")
        self.assertEqual(proxy.wait_exit(2), 0, proxy.stderr)
        self.assertIsNotNone(proxy.wait_for("worker_shutdown_timeout: closing 1 sessions", mark))


# -- the master's death -------------------------------------------------------------

@needs_fork_and_proc
class ProcessMasterGoneTests(EndToEndTestCase):

    def start(self, port):
        proxy = ProgramUnderTest(self, program_config(TempDir(self), [port],
                                                      main="worker_processes = 2\n"))
        workers = proxy.workers()
        self.assertEqual(len(workers), 2)
        client = Client(port, 2.0)        # the workers serve before the master dies
        self.addCleanup(client.close)
        client.expect_line(mp.IMAP_GREETING)
        client.close()
        return proxy, workers

    def test_workers_stop_when_the_master_is_killed(self):
        port = free_port()
        proxy, workers = self.start(port)
        os.kill(proxy.pid, signal.SIGKILL)
        proxy.proc.wait(2)
        wait_until(lambda: not any(process_alive(pid) for pid in workers), 2.0,
                   "the workers to stop after the master's SIGKILL")
        self.assertTrue(connection_refused(port))
        self.assertEqual(process_group(proxy.pgid), [])

    def test_workers_stop_cleanly_when_the_master_is_killed(self):
        # The worker's graceful stop reports to the master through a pipe
        # whose only reader was the master: the write must not kill it.
        port = free_port()
        proxy, workers = self.start(port)
        os.kill(proxy.pid, signal.SIGKILL)
        wait_until(lambda: not any(process_alive(pid) for pid in workers), 2.0,
                   "the workers to stop after the master's SIGKILL")
        proxy.reader.join(2)              # the workers held the stderr pipe too
        for pid in workers:
            self.assertIn("%d#0: the master process is gone" % pid, proxy.stderr)
            self.assertIn("%d#0: gracefully shutting down" % pid, proxy.stderr)
        self.assertNotIn("worker process failed", proxy.stderr)


# -- user = nobody ------------------------------------------------------------------

@needs_fork_and_proc
@unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0, "needs root")
class ProcessPrivilegeTests(EndToEndTestCase):

    def nobody(self):
        import pwd
        try:
            return pwd.getpwnam("nobody")
        except KeyError:
            self.skipTest("no user nobody")

    def test_workers_run_as_nobody_and_the_master_stays_root(self):
        nobody = self.nobody()
        backend = self.use(FakeImapBackend(accept=None))
        directory = TempDir(self)
        port = free_port()
        proxy = ProgramUnderTest(self, program_config(directory, [port], backend.port,
                                                      main="user = nobody\nworker_processes = 2\n"))
        workers = proxy.workers()
        self.assertEqual(len(workers), 2)
        self.assertEqual(process_ids(proxy.pid, "Uid"), [0, 0, 0, 0])
        for pid in workers:                               # the drop follows the fork
            wait_until(lambda: process_ids(pid, "Uid") != [0, 0, 0, 0], 1.0, "worker %d to drop root" % pid)
            self.assertEqual(process_ids(pid, "Uid"), [nobody.pw_uid] * 4, "worker %d" % pid)
            self.assertEqual(process_ids(pid, "Gid"), [nobody.pw_gid] * 4, "worker %d" % pid)
            self.assertEqual(process_ids(pid, "Groups"), [nobody.pw_gid], "worker %d" % pid)
        self.assertEqual(imap_login_reply(self, port, "secret"), b"a1 OK LOGIN completed\r\n")
        self.assertLessEqual(set(proxy.served_by()), set(workers))
        mark = proxy.mark()
        os.kill(workers[0], signal.SIGKILL)              # a replacement drops privileges too
        self.assertIsNotNone(proxy.wait_for("start worker process", mark), proxy.stderr)
        new = proxy.workers(mark)[0]
        wait_until(lambda: process_ids(new, "Uid") == [nobody.pw_uid] * 4, 1.0,
                   "the new worker to become nobody")
        self.assertEqual(process_ids(proxy.pid, "Uid"), [0, 0, 0, 0])

    def test_single_process_with_user_writes_its_pid_file(self):
        # master_process off: the one process binds, drops to "user" and
        # serves; the pid file (in a directory only root may write) must
        # still be written, as the master does it before any drop.
        self.nobody()
        directory = TempDir(self)
        port = free_port()
        pid_path = os.path.join(directory.path, "mailproxy.pid")
        proxy = ProgramUnderTest(self, program_config(
            directory, [port], main="master_process = off\nuser = nobody\npid = %s\n" % pid_path),
            started=False)
        started = proxy.wait_for("started", timeout=3)
        self.assertIsNotNone(started, "did not start:\n" + proxy.stderr)
        self.assertNotIn("Traceback", proxy.stderr)
        with open(pid_path) as handle:
            self.assertEqual(handle.read(), "%d\n" % proxy.pid)


# -- logs: SIGUSR1, syslog, access_log ----------------------------------------------

@needs_fork_and_proc
class ProcessLogTests(EndToEndTestCase):

    def test_a_session_open_across_sigusr1_logs_to_the_new_file(self):
        """A session that began before a log rotation writes its later lines
        (here its access line) to the reopened file, not to the closed one,
        where they were lost, the stderr copy too (the ProcessLogTests flake
        that showed it: "session done" never came for a session the SIGUSR1
        fell into)."""
        directory = TempDir(self)
        port = free_port()
        log_path = os.path.join(directory.path, "error.log")
        proxy = ProgramUnderTest(self, program_config(
            directory, [port], log="error.log info\n    stderr info"))
        client = connect_client(self, port)
        client.expect_line(mp.IMAP_GREETING)
        wait_until(lambda: proxy.served_by(0), what="the session's connected line")
        worker = proxy.workers()[0]
        os.rename(log_path, log_path + ".1")
        mark = proxy.mark()
        proxy.send_signal("SIGUSR1")
        self.assertIsNotNone(proxy.wait_for("%d#0: reopening logs" % worker, mark), proxy.stderr)
        client.send("a1 LOGOUT")
        client.read_until_closed()
        self.assertIsNotNone(proxy.wait_for("*1 session done: client quit", mark), proxy.stderr)
        wait_until(lambda: "*1 session done" in read_text(log_path), what="the line in the new file")

    def test_sigusr1_reopens_the_error_log_after_a_rename(self):
        directory = TempDir(self)
        port = free_port()
        log_path = os.path.join(directory.path, "error.log")
        rotated = log_path + ".1"
        # The file first: a line is in it before it is in stderr.
        proxy = ProgramUnderTest(self, program_config(
            directory, [port], log="error.log info\n    stderr info"))

        def read(path):
            with open(path) as handle:
                return handle.read()

        def session():
            key = "*%s session done" % session_number(self, proxy, port)
            self.assertIsNotNone(proxy.wait_for(key), proxy.stderr)
            return key

        self.assertIn(session(), read(log_path))
        os.rename(log_path, rotated)
        before = session()
        self.assertIn(before, read(rotated))             # the open file, renamed
        proxy.send_signal("SIGUSR1")
        wait_until(lambda: os.path.exists(log_path), 5.0, "the master to open error.log again")
        deadline = time.monotonic() + 10.0               # generous: failed once under heavy load
        while session() not in read(log_path):           # until the worker has the signal
            self.assertLess(time.monotonic(), deadline, "the worker never reopened its log")
        frozen = read(rotated)
        after = session()
        self.assertIn(after, read(log_path))
        proxy.send_signal("SIGTERM")
        self.assertEqual(proxy.wait_exit(3), 0)
        self.assertEqual(read(rotated), frozen, "lines went to the renamed file after SIGUSR1")
        text = read(log_path)
        self.assertIn("%d#0: exit" % proxy.pid, text)    # the master's lines, too
        self.assertIn("%d#0: exiting" % proxy.workers()[0], text)
        self.assertNotIn(before, text)

    def test_syslog_datagrams_are_rfc3164(self):
        main_sink = udp_sink(self)
        server_sink = udp_sink(self)
        directory = TempDir(self)
        port = free_port()
        proxy = ProgramUnderTest(self, program_config(
            directory, [port],
            log="stderr info\n    syslog:server=127.0.0.1:%d,facility=mail,tag=mproxy info"
                % main_sink.getsockname()[1],
            server="error_log = syslog:server=127.0.0.1:%d,facility=mail,tag=mproxy,nohostname"
                   " info\n" % server_sink.getsockname()[1]))
        stamp = rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ 123]\d \d\d:\d\d:\d\d "
        host = re.escape(socket.gethostname().encode())
        worker = datagram_with(main_sink, b"start worker process")    # logged before "started"
        self.assertRegex(worker, b"^<21>" + stamp + host + rb" mproxy: \[notice\] %d#0: "
                         rb"start worker process %d$" % (proxy.pid, proxy.workers()[0]))
        started = datagram_with(main_sink, b"started")
        self.assertRegex(started, b"^<21>" + stamp + host + rb" mproxy: \[notice\] %d#0: "
                         rb"mailproxy/\S+ started, listening on 127\.0\.0\.1:%d; configuration file \S+$"
                         % (proxy.pid, port))
        client = Client(port, 2.0)
        self.addCleanup(client.close)
        client.expect_line(mp.IMAP_GREETING)
        connected = datagram_with(server_sink, b"connected to")
        self.assertRegex(connected, b"^<22>" + stamp + rb"mproxy: \[info\] %d#0: \*1 client "
                         rb"127\.0\.0\.1:\d+ connected to 127\.0\.0\.1:%d, client: 127\.0\.0\.1, "
                         rb"server: 127\.0\.0\.1:%d$" % (proxy.workers()[0], port, port))
        self.assertNotIn(b"\n", connected)
        self.assertNotIn("connected to", proxy.stderr)   # the server's log is syslog only

    def test_a_bad_syslog_parameter_fails_the_check(self):
        directory = TempDir(self)
        for value, message in (("syslog:server=127.0.0.1:514,colour=blue", 'unknown syslog parameter "colour"'),
                               ("syslog:server=127.0.0.1:514,facility=bogus", 'unknown syslog facility "bogus"'),
                               ("syslog:facility=mail", 'no "server="')):
            with self.subTest(value=value):
                path = program_config(directory, [free_port()], log="stderr info\n    %s info" % value)
                status, out, err = run_mailproxy(["-t", "-c", path], timeout=10)
                self.assertEqual(status, 1, err)
                # The place: the directive's line (the value's first line) or
                # the line of this occurrence.
                self.assertRegex(err, re.escape(path) + r":[23]: \[main\] error_log:")
                self.assertIn(message, err)
                self.assertIn("test failed", err)

    def test_access_log_file_and_off(self):
        backend = self.use(FakeImapBackend(accept=None))
        directory = TempDir(self)
        port, quiet_port = free_port(), free_port()
        access = os.path.join(directory.path, "access.log")
        proxy = ProgramUnderTest(self, program_config(
            directory, [port], backend.port, main="access_log = access.log\n",
            tail="\n[server quiet]\nlisten = 127.0.0.1:%d\nprotocol = imap\naccess_log = off\n"
                 % quiet_port))
        quiet = session_number(self, proxy, quiet_port)
        self.assertEqual(imap_login_reply(self, port, "secret"), b"a1 OK LOGIN completed\r\n")
        wait_until(lambda: "session done" in read_text(access), 2.0,
                   "the session line in access.log")
        with open(access) as handle:
            lines = handle.read().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[info\] %d#0: \*2 session done: "
                         r"client closed connection, \d+ bytes from client, \d+ bytes to client, "
                         r"[\d.]+s, client: 127\.0\.0\.1, server: 127\.0\.0\.1:%d, login: \"alice\", "
                         r"upstream: 127\.0\.0\.1:%d, tls: off, auth: plain, upstream tls: off$"
                         % (proxy.workers()[0], port, backend.port))
        self.assertEqual(quiet, "1")
        self.assertNotIn("session done", proxy.stderr)   # neither session's line in the error log


def session_number(test, proxy: ProgramUnderTest, port: int) -> str:
    """One session without login (greeting, LOGOUT, closed); its number."""
    client = Client(port, 2.0)
    test.addCleanup(client.close)
    address = "127.0.0.1:%d" % client.sock.getsockname()[1]
    client.expect_line(mp.IMAP_GREETING)
    client.send("a1 LOGOUT")
    client.expect(rb"^\* BYE")
    client.expect(rb"^a1 OK")
    client.expect_closed()
    line = proxy.wait_for("client %s connected" % address)
    test.assertIsNotNone(line, proxy.stderr)
    return re.search(r"\*(\d+) client", line).group(1)


def udp_sink(test) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    test.addCleanup(sock.close)
    return sock


def datagram_with(sock: socket.socket, text: bytes, timeout: float = 3.0) -> bytes:
    """The first datagram holding ``text`` (the others are dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no datagram with %r" % text)
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except socket.timeout:
            raise AssertionError("no datagram with %r" % text)
        if text in data:
            return data


# -- out of descriptors -------------------------------------------------------------

class ProcessDescriptorTests(EndToEndTestCase):
    """Out of file descriptors: logged, and the listener recovers."""

    @unittest.skipUnless(sys.platform.startswith("linux"), "RLIMIT_NOFILE and /proc")
    def test_emfile_is_logged_and_accepting_resumes(self):
        import resource
        directory = TempDir(self)
        backend = self.use(FakeImapBackend(accept=None))
        port = free_port()
        path = directory.write("mailproxy.conf", """\
            [main]
            master_process = off
            error_log = stderr info
            [mail]
            proxy_pass = 127.0.0.1:%d
            [server imap]
            listen = 127.0.0.1:%d
            protocol = imap
            [users]
            alice = {PLAIN}secret
        """ % (backend.port, port))
        limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
        proxy = ProgramUnderTest(self, path, preexec=limit)
        idle = []
        for _ in range(70):                   # more than 48 descriptors' worth
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        self.assertIsNotNone(proxy.wait_for("accept() failed (24: Too many open files)"),
                             proxy.stderr)
        for sock in idle:
            sock.close()
        deadline = time.time() + 10
        while True:                            # the backlog drains as descriptors free up
            try:
                reply = imap_login_reply(self, port, "secret")
                break
            except (AssertionError, OSError):
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        self.assertEqual(reply[:5], b"a1 OK")


# -- issue 12: the process defects a security review found --------------------------
# Each was reproduced on the wire: a reload during a graceful stop, a worker
# stopped behind the master's back, logs a worker running as ``user`` could
# not reopen, and listen flags a reload did not change.

def listening_socket_facts(port: int):
    """(backlog, rcvbuf, sndbuf) of the TCP socket listening on
    127.0.0.1:PORT, as the kernel holds them (``ss -ltnm`` shows the same:
    Send-Q, rb, tb), from a sock_diag dump over netlink; None if no socket
    listens there.  Skips the test where sock_diag is not available."""
    netlink_sock_diag, sock_diag_by_family, nlmsg_done, nlmsg_error = 4, 20, 3, 2
    tcp_listen, inet_diag_skmeminfo = 10, 7
    dump = 0x1 | 0x300                                   # NLM_F_REQUEST | NLM_F_DUMP
    request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP,
                          1 << (inet_diag_skmeminfo - 1), 0, 1 << tcp_listen) + bytes(48)
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink_sock_diag)
    except (AttributeError, OSError) as error:
        raise unittest.SkipTest("no sock_diag: %s" % error)
    with sock:
        sock.send(struct.pack("=IHHII", 16 + len(request), sock_diag_by_family, dump, 1, 0) + request)
        found = None
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind in (nlmsg_done, nlmsg_error):
                    return found
                message = data[offset + 16:offset + length]
                if struct.unpack_from("!H", message, 4)[0] == port:
                    found = (struct.unpack_from("=I", message, 60)[0],
                             ) + skmeminfo_buffers(message[72:])
                offset += (length + 3) & ~3


def skmeminfo_buffers(attributes: bytes):
    """(rcvbuf, sndbuf) from the INET_DIAG_SKMEMINFO attribute of a
    sock_diag answer (SK_MEMINFO_RCVBUF and SK_MEMINFO_SNDBUF)."""
    offset = 0
    while offset + 4 <= len(attributes):
        length, kind = struct.unpack_from("=HH", attributes, offset)
        if kind == 7:
            return struct.unpack_from("=4I", attributes, offset + 4)[1::2]
        offset += (length + 3) & ~3
    raise AssertionError("no INET_DIAG_SKMEMINFO in the answer")


def kernel_buffer_size(option: int, size: int) -> int:
    """What the kernel makes of setsockopt(OPTION, SIZE) (Linux doubles it)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, option, size)
        return probe.getsockopt(socket.SOL_SOCKET, option)


@needs_fork_and_proc
class ProcessSignalRegressionTests(EndToEndTestCase):

    def nobody(self):
        import pwd
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            self.skipTest("needs root")
        try:
            return pwd.getpwnam("nobody")
        except KeyError:
            self.skipTest("no user nobody")

    def session_then_sigquit(self, main: str = ""):
        """A proxy with a logged-in session, then SIGQUIT: (proxy, session,
        port) once the stop has begun (the port refuses)."""
        backend = self.use(FakeImapBackend(accept=None))
        port = free_port()
        proxy = ProgramUnderTest(self, program_config(TempDir(self), [port], backend.port, main=main))
        session, reply = imap_login_session(self, port)
        self.assertEqual(reply, b"a1 OK LOGIN completed\r\n")
        mark = proxy.mark()
        proxy.send_signal("SIGQUIT")
        self.assertIsNotNone(proxy.wait_for("gracefully shutting down", mark), proxy.stderr)
        self.assertTrue(connection_refused(port, within=2.0), "still accepting after SIGQUIT")
        return proxy, session, port

    def sighup_while_stopping(self, proxy, port: int) -> int:
        """SIGHUP to a proxy that is stopping gracefully: taken (or, before
        issue 12, acted on) and ignored.  The mark before it."""
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        wait_until(lambda: re.search(r"\(SIGHUP\) received|reconfiguring", proxy.stderr), 5.0,
                   "the proxy to take SIGHUP")
        self.assertIsNotNone(proxy.wait_for("(SIGHUP) received while shutting down, ignoring",
                                            mark, timeout=1), proxy.stderr)
        self.assertTrue(connection_refused(port), "SIGHUP bound the port again")
        self.assertEqual(proxy.workers(mark), [], "SIGHUP started a worker")
        self.assertNotIn("reconfiguring", "".join(proxy.lines[mark:]))
        return mark

    # -- 7: SIGHUP during a graceful stop ------------------------------------------

    def test_master_ignores_sighup_once_stopping_and_sigterm_still_stops_at_once(self):
        proxy, session, port = self.session_then_sigquit()
        mark = self.sighup_while_stopping(proxy, port)   # nginx: a quitting master skips it
        proxy.send_signal("SIGQUIT")                     # twice: nothing more
        self.assertIsNotNone(proxy.wait_for("(SIGQUIT) received while shutting down, ignoring",
                                            mark), proxy.stderr)
        proxy.send_signal("SIGUSR1")                     # the logs may still rotate
        self.assertIsNotNone(proxy.wait_for("%d#0: reopening logs" % proxy.pid, mark),
                             proxy.stderr)
        self.assertTrue(connection_refused(port))
        self.assertEqual(proxy.workers(mark), [])
        session.send("n1 NOOP")
        session.expect(rb"^n1 OK NOOP completed\r\n$")   # the session still relays
        proxy.send_signal("SIGTERM")                     # and SIGTERM ends it at once
        self.assertEqual(session.read_until_closed(3.0), b"")
        self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)
        self.assertEqual(process_group(proxy.pgid), [])

    def test_single_process_ignores_sighup_once_stopping_and_the_stop_completes(self):
        proxy, session, port = self.session_then_sigquit("master_process = off\n")
        self.sighup_while_stopping(proxy, port)
        self.assertIsNone(proxy.proc.poll(), "exited with a session open")
        imap_logout(session)
        self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)

    def test_a_sighup_to_the_whole_group_reloads_the_master_only(self):
        # nginx's workers ignore SIGHUP; reloading by themselves, they bound
        # the new port the master was binding.
        directory = TempDir(self)
        old_port, new_port = free_port(), free_port()
        proxy = ProgramUnderTest(self, program_config(directory, [old_port]))
        worker = proxy.workers()[0]
        program_config(directory, [new_port])
        mark = proxy.mark()
        os.killpg(proxy.pgid, signal.SIGHUP)
        self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark), proxy.stderr)
        self.assertIsNotNone(proxy.wait_for("%d#0: signal 1 (SIGHUP) received, ignoring" % worker,
                                            mark), proxy.stderr)
        self.assertNotIn("%d#0: reconfiguring" % worker, proxy.stderr)
        client = Client(new_port, 2.0)
        self.addCleanup(client.close)
        client.expect_line(mp.IMAP_GREETING)
        # The greeting can come before the session's log line is read here.
        self.assertIsNotNone(proxy.wait_for("connected to", mark), proxy.stderr)
        self.assertEqual(proxy.served_by(mark), proxy.workers(mark))
        self.assertTrue(connection_refused(old_port, within=2.0), "the old port still accepts")

    # -- 8: a worker stopped by someone else than the master ---------------------------

    def test_a_worker_stopped_behind_the_masters_back_is_replaced(self):
        backend = self.use(FakeImapBackend(accept=None))
        port = free_port()
        proxy = ProgramUnderTest(self, program_config(TempDir(self), [port], backend.port))
        first = proxy.workers()[0]
        mark = proxy.mark()
        os.kill(first, signal.SIGTERM)                   # exits with 0, unasked
        self.assertIsNotNone(proxy.wait_for("worker process %d exited with code 0, starting "
                                            "a new one" % first, mark), proxy.stderr)
        self.assertIsNotNone(proxy.wait_for("start worker process", mark), proxy.stderr)
        second = proxy.workers(mark)[0]
        session, reply = imap_login_session(self, port)          # the port greets again
        self.assertEqual(reply, b"a1 OK LOGIN completed\r\n")

        # SIGQUIT to the worker: replaced as soon as it stops accepting, not
        # when its last session ends (the clients would wait until then).
        mark = proxy.mark()
        os.kill(second, signal.SIGQUIT)
        self.assertIsNotNone(proxy.wait_for("worker process %d stopped accepting unasked, "
                                            "starting a new one" % second, mark), proxy.stderr)
        self.assertIsNotNone(proxy.wait_for("start worker process", mark), proxy.stderr)
        third = proxy.workers(mark)
        other, reply = imap_login_session(self, port)
        self.assertEqual(reply, b"a1 OK LOGIN completed\r\n")
        session.send("n1 NOOP")
        session.expect(rb"^n1 OK NOOP completed\r\n$")
        imap_logout(session)
        exited = proxy.wait_for("worker process %d exited" % second, mark)
        self.assertIsNotNone(exited, proxy.stderr)
        self.assertIn("[notice]", exited)                # not "starting a new one" again
        imap_logout(other)
        self.assertEqual(proxy.workers(mark), third, "replaced twice")
        self.assertEqual(sorted(process_group(proxy.pgid)), sorted(third + [proxy.pid]))

    def test_a_signal_to_the_whole_group_stops_it_and_nothing_is_respawned(self):
        # Ctrl-C (SIGINT), or kill -QUIT -PGID: the master and the workers get
        # it at once; the workers' exits, and their reports that they stopped
        # accepting, must not be taken for stops nobody asked for.
        for name in ("SIGINT", "SIGQUIT"):
            with self.subTest(signal=name):
                port = free_port()
                proxy = ProgramUnderTest(self, program_config(TempDir(self), [port],
                                                              main="worker_processes = 2\n"))
                mark = proxy.mark()
                os.killpg(proxy.pgid, getattr(signal, name))
                self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)
                self.assertEqual(proxy.workers(mark), [], proxy.stderr)
                self.assertNotIn("starting a new one", proxy.stderr)

    # -- 9: logs of workers that run as ``user`` ------------------------------------

    def test_workers_running_as_user_reopen_their_log_on_sigusr1(self):
        nobody = self.nobody()
        directory = TempDir(self)
        os.chmod(directory.path, 0o755)          # as /var/log: nobody may enter, not create
        port = free_port()
        log_path = os.path.join(directory.path, "error.log")
        proxy = ProgramUnderTest(self, program_config(directory, [port], main="user = nobody\n",
                                                      log="error.log info\n    stderr info"))
        worker = proxy.workers()[0]
        os.rename(log_path, log_path + ".1")
        mark = proxy.mark()
        proxy.send_signal("SIGUSR1")
        self.assertIsNotNone(proxy.wait_for("%d#0: reopening logs" % worker, mark), proxy.stderr)
        number = session_number(self, proxy, port)
        wait_until(lambda: "*%s session done" % number in read_text(log_path), 3.0,
                   "the worker's line in the new error.log")
        self.assertNotIn("*%s " % number, read_text(log_path + ".1"))
        self.assertNotIn("reopening logs failed", proxy.stderr)
        self.assertEqual(os.stat(log_path).st_uid, nobody.pw_uid)   # nginx: ngx_reopen_files

    def test_single_process_running_as_user_reopens_the_log_it_created(self):
        # master_process off: the files it created as root at start are
        # its user's, so that it can open them again after the drop.  The
        # pid file, written as root, it cannot remove: it says so.
        self.nobody()
        directory = TempDir(self)
        os.chmod(directory.path, 0o755)
        port = free_port()
        log_path = os.path.join(directory.path, "error.log")
        pid_path = os.path.join(directory.path, "mailproxy.pid")
        proxy = ProgramUnderTest(self, program_config(
            directory, [port], main="master_process = off\nuser = nobody\npid = mailproxy.pid\n",
            log="error.log info\n    stderr info"))
        mark = proxy.mark()
        proxy.send_signal("SIGUSR1")
        self.assertIsNotNone(proxy.wait_for("reopening logs", mark), proxy.stderr)
        number = session_number(self, proxy, port)
        wait_until(lambda: "*%s session done" % number in read_text(log_path), 3.0,
                   "the line in error.log")
        self.assertNotIn("reopening logs failed", proxy.stderr)
        proxy.send_signal("SIGTERM")
        self.assertEqual(proxy.wait_exit(3), 0, proxy.stderr)
        self.assertIn('[alert] %d#0: unlink() "%s" failed (13: ' % (proxy.pid, pid_path),
                      proxy.stderr)
    # -- 11: a reload that changes the flags of a kept listen --------------------------

    def reload_listen_flags(self, main: str) -> None:
        """Plain IMAP on a port, then a reload that keeps the port with ssl,
        proxy_protocol, another backlog and buffer sizes: new sessions
        speak TLS after a PROXY header, and the kernel has the new sizes."""
        directory = TempDir(self)
        write_tls_files(directory.path)
        port = free_port()
        path = program_config(directory, [port], main=main)
        proxy = ProgramUnderTest(self, path)
        self.assertEqual(listening_socket_facts(port)[0], mp.NGINX_LISTEN_BACKLOG)
        session_number(self, proxy, port)
        with open(path) as handle:
            text = handle.read()
        buffer = 40960                                   # not a default size
        directory.write("mailproxy.conf", text.replace(
            "listen = 127.0.0.1:%d\n" % port,
            "listen = 127.0.0.1:%d ssl proxy_protocol backlog=17 rcvbuf=%d sndbuf=%d\n"
            "ssl_certificate = server.crt\nssl_certificate_key = server.key\n"
            "set_real_ip_from = 127.0.0.1\n" % (port, buffer, buffer)))
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark), proxy.stderr)
        self.assertEqual(listening_socket_facts(port),
                         (17, kernel_buffer_size(socket.SO_RCVBUF, buffer),
                          kernel_buffer_size(socket.SO_SNDBUF, buffer)))
        client = Client(port, 3.0)
        self.addCleanup(client.close)
        client.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143\r\n")
        context = ssl.create_default_context(cafile=os.path.join(directory.path, "ca.crt"))
        client.sock = context.wrap_socket(client.sock, server_hostname="mail.example.com")
        client.expect_line(mp.IMAP_GREETING)
        self.assertIsNotNone(proxy.wait_for("real client address 192.0.2.7:40000", mark),
                             proxy.stderr)
        self.assertNotIn("[warn]", "".join(proxy.lines[mark:]))

    def test_single_process_reload_changes_the_flags_of_a_kept_listen(self):
        self.reload_listen_flags("master_process = off\n")

    def test_master_reload_changes_the_flags_of_a_kept_listen(self):
        self.reload_listen_flags("")

    @unittest.skipUnless(socket.has_ipv6, "needs IPv6")
    def test_reload_warns_about_what_a_bound_socket_keeps(self):
        directory = TempDir(self)
        port, port6 = free_port(), free_port()
        server6 = "\n[server v6]\nlisten = [::1]:%d %s\nprotocol = imap\n"
        path = program_config(directory, [port], main="master_process = off\n",
                              tail=server6 % (port6, "rcvbuf=40960"))
        proxy = ProgramUnderTest(self, path, started=False)
        if proxy.wait_for("started") is None:
            self.skipTest("cannot listen on [::1]:\n" + proxy.stderr)
        program_config(directory, [port], main="master_process = off\n",
                       tail=server6 % (port6, "ipv6only=off"))
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark), proxy.stderr)
        for text in ('"ipv6only=off" cannot change on a bound socket, it stays "on" until a restart',
                     'without "rcvbuf" the socket keeps 40960, not the system\'s default, until '
                     "a restart"):
            warning = proxy.wait_for(text, mark)
            self.assertIsNotNone(warning, proxy.stderr)
            self.assertIn("[warn] %d#0: listen [::1]:%d: " % (proxy.pid, port6), warning)
        with socket.create_connection(("::1", port6), timeout=2) as sock:   # still served
            self.assertEqual(sock.makefile("rb").readline(), mp.IMAP_GREETING)


# ========================================================================== #
# ####                       Migration from nginx                       #### #
# ========================================================================== #
# --import-nginx on an nginx.conf of a mail proxy: every directive
# translated, and the result passes -t; errors name the file and the line.

NGINX_CONF = r"""# nginx.conf of a mail proxy   ; { } "quotes" in a comment
worker_processes 2;
pid nginx.pid;          # relative: to the configuration's directory; nginx's own
error_log stderr info;

events {
    worker_connections 512;   # into [main]
}

http {
    server { listen 80; }
}

mail {
    server_name "mail.example.com";
    auth_http 127.0.0.1:9000/auth;
    auth_http_header X-Auth-Key "se cret \"k\" \\ end#not-a-comment";
    include conf.d/*.conf;
    proxy_issue_pop3_xoip on;   # Zimbra's

    server {
        listen 127.0.0.1:%(imap)d;
        protocol imap;
        imap_capabilities "IMAP4rev1" 'UIDPLUS' ID;
    }
    server {
        server_name pop.example.com;
        listen 127.0.0.1:%(pop3)d;
        protocol pop3;
    }
    server {
        listen 127.0.0.1:%(smtp)d;
        protocol smtp;
        smtp_auth login plain;
    }
}
"""


class ImportNginxTests(unittest.TestCase):

    def write(self, directory: TempDir, name: str, text: str) -> str:
        path = os.path.join(directory.path, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_import_translates_every_directive_and_passes_the_check(self):
        directory = TempDir(self)
        ports = {"imap": free_port(), "pop3": free_port(), "smtp": free_port()}
        nginx = self.write(directory, "nginx.conf", NGINX_CONF % ports)
        self.write(directory, "conf.d/1-pipelining.conf", "smtp_capabilities PIPELINING;\n")
        self.write(directory, "conf.d/2-size.conf", '# the second file\nsmtp_capabilities "SIZE 10485760" 8BITMIME;\n')
        self.write(directory, "conf.d/ignored.txt", "this is no nginx syntax {\n")
        status, ini, err = run_mailproxy(["--import-nginx", nginx], timeout=10)
        self.assertEqual(status, 0, err)
        lines = ini.splitlines()
        base = directory.path
        for expected in ("[main]", "worker_processes = 2", "pid = %s/mailproxy.pid" % base,
                         "error_log = stderr info", "worker_connections = 512",
                         "[mail]", "server_name = mail.example.com",
                         "auth_http = 127.0.0.1:9000/auth",
                         'auth_http_header = X-Auth-Key "se cret \\"k\\" \\\\ end#not-a-comment"',
                         "smtp_capabilities = PIPELINING",
                         '    "SIZE 10485760" 8BITMIME',
                         "[server imap-%d]" % ports["imap"], "listen = 127.0.0.1:%d" % ports["imap"], "protocol = imap",
                         "imap_capabilities = IMAP4rev1 UIDPLUS ID",
                         "[server pop3-%d]" % ports["pop3"], "server_name = pop.example.com",
                         "listen = 127.0.0.1:%d" % ports["pop3"], "protocol = pop3",
                         "[server smtp-%d]" % ports["smtp"], "listen = 127.0.0.1:%d" % ports["smtp"], "protocol = smtp",
                         "smtp_auth = login plain"):
            self.assertIn(expected, lines, "missing %r in:\n%s" % (expected, ini))
        skipped = [line for line in lines if "xoip" in line]
        self.assertEqual(skipped, ["# not translated: proxy_issue_pop3_xoip on;  "
                                   "(not a mailproxy directive here)"], ini)
        # each comment is a note on stderr too, with the file and line
        self.assertIn("mailproxy: [notice] %s:19: not translated: proxy_issue_pop3_xoip on;  "
                      "(not a mailproxy directive here)\n" % nginx, err)
        self.assertIn("# http {} skipped: not mail", lines)
        self.assertIn("mailproxy: [notice] %s:10: http {} skipped: not mail\n" % nginx, err)
        self.assertIn("mailproxy: [notice] %s:6: events {} skipped" % nginx, err)
        self.assertNotIn("listen = 80", ini)
        self.assertEqual(lines.index("smtp_capabilities = PIPELINING") + 1,
                         lines.index('    "SIZE 10485760" 8BITMIME'))

        path = directory.write("imported.conf", ini)
        status, out, err = run_mailproxy(["-t", "-c", path], timeout=10)
        self.assertEqual(status, 0, err + "\n" + ini)
        self.assertIn("test is successful", err)
        config = mp.load_config(path)                    # and it means what nginx meant
        self.assertEqual(config.main.worker_processes, 2)
        self.assertEqual(config.main.worker_connections, 512)
        self.assertEqual(config.main.pid, os.path.join(base, "mailproxy.pid"))
        imap, pop3, smtp = config.servers
        self.assertEqual(imap.auth_http_header, [("X-Auth-Key", 'se cret "k" \\ end#not-a-comment')])
        self.assertEqual(imap.server_name, "mail.example.com")
        self.assertEqual(pop3.server_name, "pop.example.com")
        self.assertEqual(imap.imap_capabilities, ["IMAP4rev1", "UIDPLUS", "ID"])
        self.assertEqual(smtp.smtp_capabilities, ["PIPELINING", "SIZE 10485760", "8BITMIME"])
        self.assertEqual([(s.protocol, s.listen[0].port) for s in config.servers],
                         [("imap", ports["imap"]), ("pop3", ports["pop3"]), ("smtp", ports["smtp"])])

    def broken(self, text: str):
        directory = TempDir(self)
        nginx = self.write(directory, "nginx.conf", text)
        status, out, err = run_mailproxy(["--import-nginx", nginx], timeout=10)
        self.assertEqual(status, 1, err)
        self.assertEqual(out, "")
        self.assertNotIn("Traceback", err)
        return nginx, err

    def test_unclosed_quote_and_stray_brace_name_the_file_and_line(self):
        nginx, err = self.broken('mail {\n    server {\n        server_name "mail;\n'
                                 '        listen 127.0.0.1:1143;\n    }\n}\n')
        self.assertIn("%s:3: unexpected end of file" % nginx, err)
        nginx, err = self.broken("mail {\n    server {\n        listen 127.0.0.1:1143;\n"
                                 "    }\n}\n}\n")
        self.assertIn('%s:6: unexpected "}"' % nginx, err)

    def test_unclosed_brace_names_the_file_and_line(self):
        # nginx: 'unexpected end of file, expecting "}" in FILE:LINE'.
        nginx, err = self.broken("mail {\n    server {\n        listen 127.0.0.1:1143;\n"
                                 "        protocol imap;\n    }\n")
        self.assertIn('unexpected end of file, expecting "}"', err)
        self.assertRegex(err, re.escape(nginx) + r":\d+", "no line number in %r" % err)

    def test_line_numbers_stay_right_after_a_multi_line_quoted_value_with_escapes(self):
        # The stray "}" is on line 6; the quoted value before it spans lines
        # 2-3 and has four escaped quotes.
        nginx, err = self.broken('mail {\n    server_name "\n\\"\\"\\"\\"";\n'
                                 "    protocol imap;\n}\n}\n")
        self.assertIn('%s:6: unexpected "}"' % nginx, err)

    def imported(self, text: str, files=None, check: bool = True):
        """--import-nginx on text (and other files beside it): (ini, stderr,
        nginx path, directory); with check, -t must pass on the output."""
        directory = TempDir(self)
        for name, content in (files or {}).items():
            self.write(directory, name, content)
        nginx = self.write(directory, "nginx.conf", text)
        status, ini, err = run_mailproxy(["--import-nginx", nginx], timeout=10)
        self.assertEqual(status, 0, err)
        self.assertNotIn("Traceback", err)
        if check:
            path = directory.write("imported.conf", ini)
            status, out, check_err = run_mailproxy(["-t", "-c", path], timeout=10)
            self.assertEqual(status, 0, check_err + "\n" + ini)
        return ini, err, nginx, directory

    def tls_files(self) -> dict:
        return {"cert.pem": TLS_SERVER_CERT_PEM, "key.pem": TLS_SERVER_KEY_PEM}

    def test_ssl_on_becomes_implicit_tls_on_the_listeners_never_plain_text(self):
        # nginx <= 1.24: "ssl on" in mail {} makes every server's listeners
        # TLS; a server's own "ssl off" or "ssl on" overrides it.
        ports = [free_port() for _ in range(4)]
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n    ssl on;\n"
            "    ssl_certificate cert.pem;\n    ssl_certificate_key key.pem;\n"
            "    server { listen 127.0.0.1:%d; listen 127.0.0.1:%d; protocol imap; }\n"
            "    server { listen 127.0.0.1:%d ssl; protocol pop3; }\n"
            "    server { listen 127.0.0.1:%d; protocol smtp; ssl off; starttls on; }\n"
            "}\n" % tuple(ports), self.tls_files())
        config = mp.load_config(directory.write("imported.conf", ini))
        self.assertEqual([[(l.port, l.ssl) for l in s.listen] for s in config.servers],
                         [[(ports[0], True), (ports[1], True)], [(ports[2], True)],
                          [(ports[3], False)]], ini)
        self.assertIn("listen = 127.0.0.1:%d ssl" % ports[0], ini.splitlines())
        self.assertIn('%s:3: ssl on: carried as "listen ... ssl"' % nginx, err)
        self.assertIn('# ssl on: carried as "listen ... ssl"', ini)
        # a server's own "ssl on" under a mail {} without it
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n"
            "    server {\n        listen 127.0.0.1:%d;\n        protocol imap;\n"
            "        ssl on;\n        ssl_certificate cert.pem;\n"
            "        ssl_certificate_key key.pem;\n    }\n}\n" % port, self.tls_files())
        config = mp.load_config(directory.write("imported.conf", ini))
        self.assertTrue(config.servers[0].listen[0].ssl, ini)

    def test_ssl_on_beside_starttls_says_that_nginx_refuses_the_block(self):
        # The nginx wiki's STARTTLS example (and the Nginx HTTP Server
        # Cookbook's) has "starttls on;" and "ssl on;" in mail {}: nginx
        # 1.22 stops with '"starttls" directive conflicts with "ssl on"'.
        # The import carries it as implicit TLS, and says so.
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n    starttls on;\n    ssl on;\n"
            "    ssl_certificate cert.pem;\n    ssl_certificate_key key.pem;\n"
            "    server { listen 127.0.0.1:%d; protocol imap; }\n}\n" % port, self.tls_files())
        self.assertIn("%s:4: nginx does not start with this block: \"starttls\" directive "
                      "conflicts with \"ssl on\"" % nginx, err)
        self.assertIn("listen = 127.0.0.1:%d ssl" % port, ini.splitlines())
        # a server's own "ssl on" beside the mail {} block's starttls: nginx
        # takes that (the check is per block), and so no note
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n    starttls on;\n"
            "    ssl_certificate cert.pem;\n    ssl_certificate_key key.pem;\n"
            "    server { listen 127.0.0.1:%d; protocol imap; ssl on; }\n}\n" % port, self.tls_files())
        self.assertNotIn("conflicts", err)

    def test_a_tls_or_auth_directive_it_cannot_carry_is_an_error_with_file_and_line(self):
        directory = TempDir(self)
        self.write(directory, "tls.conf", "# TLS\nssl_frobnicate 2;\n")
        nginx = self.write(directory, "nginx.conf",
                           "mail {\n    auth_http 127.0.0.1:9000/auth;\n    include tls.conf;\n"
                           "    server {\n        listen 127.0.0.1:1143;\n        protocol imap;\n"
                           "        ssl_certificate_compression on;\n        ssl maybe;\n"
                           "        imap_auth plain;\n        auth_http_frobnicate on;\n"
                           "    }\n}\n")
        status, out, err = run_mailproxy(["--import-nginx", nginx], timeout=10)
        self.assertEqual((status, out), (1, ""), err)
        self.assertNotIn("Traceback", err)
        for where, what in (("tls.conf:2", "ssl_frobnicate 2;"),
                            ("nginx.conf:7", "ssl_certificate_compression on;"),
                            ("nginx.conf:8", 'invalid value in "ssl maybe;"'),
                            ("nginx.conf:10", "auth_http_frobnicate on;")):
            self.assertIn("mailproxy: [emerg] %s: %s" % (os.path.join(directory.path, where), what),
                          err)
        self.assertIn("less protected than under nginx", err)
        self.assertNotIn("imap_auth", err)

    def test_zimbras_own_auth_http_is_an_error_not_a_comment(self):
        # Zimbra's nginx.conf.mail has "zm_auth_http;" (its lookup servers
        # are in a zm_lookup {} block) and no auth_http: the import made it
        # a comment and printed a file without any authentication.
        directory = TempDir(self)
        nginx = self.write(directory, "nginx.conf",
                           "zm_lookup {\n    zm_lookup_handlers https://mail:7072/lookup;\n}\n"
                           "mail {\n    proxy_pass_error_message on;\n    zm_auth_http;\n"
                           "    zm_auth_wait 10s;\n"
                           "    server {\n        listen 127.0.0.1:1143;\n        protocol imap;\n"
                           "    }\n}\n")
        status, out, err = run_mailproxy(["--import-nginx", nginx], timeout=10)
        self.assertEqual((status, out), (1, ""), err)
        self.assertIn("mailproxy: [emerg] %s:6: zm_auth_http;  (not a mailproxy directive here): "
                      "cannot be carried over, and it is about TLS or authentication" % nginx, err)
        self.assertNotIn("[emerg] %s:7:" % nginx, err)          # zm_auth_wait: only a delay

    def test_proxy_ssl_on_notes_that_the_backend_certificate_is_checked(self):
        # Zimbra's nginx.conf.mail: "proxy_ssl on;" (its nginx does not
        # check the backend's certificate; mailproxy does, by default): the
        # migrated Zimbra file imported and passed -t, then every login
        # failed with "unknown ca" and nothing had said why.
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n    proxy_ssl on;\n"
            "    server { listen 127.0.0.1:%d; protocol imap; }\n}\n" % port)
        self.assertIn("proxy_ssl = on", ini.splitlines())
        self.assertIn("%s:3: proxy_ssl on: mailproxy checks the backend's certificate" % nginx, err)
        self.assertIn("# proxy_ssl on: mailproxy checks the backend's certificate", ini)
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n    proxy_ssl on;\n"
            "    proxy_ssl_verify off;\n"
            "    server { listen 127.0.0.1:%d; protocol imap; }\n}\n" % port)
        self.assertNotIn("checks the backend", err)

    def test_listen_with_a_host_name_passes_the_check(self):
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n"
            "    server {\n        listen localhost:%d;\n        protocol imap;\n    }\n}\n" % port)
        config = mp.load_config(directory.write("imported.conf", ini))
        hosts = [listen.host for listen in config.servers[0].listen]
        self.assertIn("127.0.0.1", hosts, ini)
        self.assertEqual({listen.port for listen in config.servers[0].listen}, {port})
        self.assertIn("%s:4: listen localhost:%d: a host name, resolved now to 127.0.0.1"
                      % (nginx, port), err)

    def test_include_globs_are_taken_from_the_main_files_directory(self):
        # nginx takes a relative include from its configuration's directory,
        # also inside an included file (conf.d/a.conf includes extra/*.conf,
        # which is beside nginx.conf, not under conf.d/).
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "mail {\n    include conf.d/*.conf;\n"
            "    server { listen 127.0.0.1:%d; protocol imap; }\n}\n" % port,
            {"conf.d/a.conf": "auth_http 127.0.0.1:9000/auth;\ninclude extra/*.conf;\n",
             "extra/b.conf": "imap_capabilities IMAP4rev1 'X-A B';\n",
             "conf.d/extra/b.conf": "this would be wrong;\n"})
        self.assertIn('imap_capabilities = IMAP4rev1 "X-A B"', ini.splitlines())
        self.assertNotIn("wrong", ini + err)

    def test_nginx_quoting_and_comments(self):
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "mail {#a comment right after the brace\n    auth_http 127.0.0.1:9000/auth;"
            "  # and one after a directive\n"
            "    server { listen 127.0.0.1:%d; protocol imap; server_name a#b\\ c; }\n}\n" % port)
        config = mp.load_config(directory.write("imported.conf", ini))
        self.assertEqual(config.servers[0].server_name, "a#b\\ c")      # nginx keeps "\ "
        nginx, err = self.broken('mail {\n    server_name "a"b;\n}\n')
        self.assertIn('%s:2: unexpected "b"' % nginx, err)

    def test_events_http_and_unknown_blocks_are_skipped_with_a_note(self):
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "load_module modules/ngx_mail_module.so;\nevents { use epoll; worker_connections 64; }\n"
            "http {\n    server { listen 80; }\n}\nstream { server { listen 12345; } }\n"
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n"
            "    server { listen 127.0.0.1:%d; protocol imap; }\n}\n" % port)
        for note in ("%s:1: load_module modules/ngx_mail_module.so; skipped" % nginx,
                     "%s:2: events {} skipped (use)" % nginx,
                     "%s:3: http {} skipped: not mail" % nginx,
                     "%s:6: stream {} skipped: not mail" % nginx):
            self.assertIn("mailproxy: [notice] " + note, err)
        self.assertIn("worker_connections = 64", ini.splitlines())
        self.assertNotIn("80", ini.replace(str(port), ""))
        self.assertNotIn("12345", ini)

    def test_pid_and_error_log_of_nginx_are_not_shared(self):
        # A trial run beside the running nginx: "nginx -s quit" once stopped
        # a mailproxy that wrote nginx's pid file.
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "pid run/nginx.pid;\nerror_log logs/error.log warn;\n"
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n    error_log logs/mail.log info;\n"
            "    server { listen 127.0.0.1:%d; protocol imap; }\n}\n" % port,
            {"run/.keep": "", "logs/.keep": ""})
        base = directory.path
        lines = ini.splitlines()
        self.assertIn("pid = %s/run/mailproxy.pid" % base, lines)
        self.assertIn("error_log = %s/logs/mailproxy-error.log warn" % base, lines)
        self.assertIn("error_log = %s/logs/mailproxy-mail.log info" % base, lines)
        self.assertNotIn("nginx.pid\n", ini.replace("#", "\n#"))
        self.assertNotRegex(ini, r"(?m)^[^#].*(nginx\.pid|/error\.log|/mail\.log)")
        self.assertIn("%s:1: pid %s/run/nginx.pid rewritten to %s/run/mailproxy.pid"
                      % (nginx, base, base), err)
        # a pid file nginx already names mailproxy.pid is not shared either
        ini, err, nginx, directory = self.imported(
            "pid /tmp/x/mailproxy.pid;\nmail {\n    auth_http 127.0.0.1:9000/auth;\n"
            "    server { listen 127.0.0.1:%d; protocol imap; }\n}\n" % port, check=False)
        self.assertIn("pid = /tmp/x/mailproxy-imported.pid", ini.splitlines())

    def test_an_error_log_on_a_device_is_kept_as_it_is(self):
        # Mailu: "error_log /dev/stderr notice;" at the top and "error_log
        # /dev/stderr info;" in mail {}.  A device is nobody's log file; it
        # was "rewritten" to /dev/mailproxy-stderr, a regular file that a
        # start as root then created in /dev.
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "error_log /dev/stderr notice;\nmail {\n    auth_http 127.0.0.1:9000/auth;\n"
            "    error_log /dev/stderr info;\n"
            "    server { listen 127.0.0.1:%d; protocol imap; error_log /dev/null; }\n}\n" % port)
        lines = ini.splitlines()
        self.assertIn("error_log = /dev/stderr notice", lines)
        self.assertIn("error_log = /dev/stderr info", lines)
        self.assertIn("error_log = /dev/null", lines)
        self.assertNotIn("/dev/mailproxy-", ini)
        self.assertNotIn("rewritten", err)

    def test_sslv3_in_ssl_protocols_imports_with_a_warning(self):
        # The nginx wiki's STARTTLS example and Mastering NGINX's complete
        # mail example have "ssl_protocols TLSv1 SSLv3;": nginx 1.22 takes
        # it; the import refused it as a TLS directive it could not carry.
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n    starttls on;\n"
            "    ssl_protocols SSLv3 TLSv1.2 TLSv1.3;\n"
            "    ssl_certificate cert.pem;\n    ssl_certificate_key key.pem;\n"
            "    server { listen 127.0.0.1:%d; protocol imap; }\n}\n" % port, self.tls_files())
        self.assertIn("ssl_protocols = SSLv3 TLSv1.2 TLSv1.3", ini.splitlines())
        path = directory.write("imported.conf", ini)
        status, out, err = run_mailproxy(["-t", "-c", path], timeout=10)
        self.assertEqual(status, 0, err)
        self.assertRegex(err, r"\[warn\] %s:\d+: \[mail\] ssl_protocols: SSLv3 not offered"
                         % re.escape(path))
        settings = mp.load_config(path).servers[0]
        context = mp.server_context(settings)
        self.assertEqual(context.minimum_version, mp.ssl.TLSVersion.TLSv1_2)

    def test_tls_1_0_in_ssl_protocols_checks_without_python_warnings(self):
        # nginx's admin guide, puppet-nginx and Mailu (TLS_PERMISSIVE) list
        # TLSv1 and TLSv1.1; Python 3.10+ printed "DeprecationWarning:
        # ssl.TLSVersion.TLSv1 is deprecated" and two source lines into -t.
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n    starttls on;\n"
            "    ssl_protocols TLSv1 TLSv1.1 TLSv1.2;\n"
            "    ssl_certificate cert.pem;\n    ssl_certificate_key key.pem;\n"
            "    server { listen 127.0.0.1:%d; protocol imap; }\n}\n" % port, self.tls_files())
        status, out, err = run_mailproxy(["-t", "-c", directory.write("imported.conf", ini)],
                                         timeout=10)
        self.assertEqual(status, 0, err)
        self.assertNotIn("Warning", err)
        self.assertNotIn("minimum_version", err)

    def test_a_tls_setting_no_client_can_use_is_a_warning_at_the_check(self):
        # Mastering NGINX's and the nginx wiki's "ssl_protocols TLSv1 SSLv3;"
        # pass nginx -t and -t here, and on OpenSSL 3 (TLS 1.0 only at
        # security level 0) every handshake then fails, under nginx too.
        # -t tries one in memory with the most permissive client.  Here the
        # same effect, on any OpenSSL: an RSA-only cipher, an ECDSA key.
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n    ssl_protocols TLSv1.2;\n"
            "    ssl_ciphers ECDHE-RSA-AES128-GCM-SHA256;\n"
            "    ssl_certificate cert.pem;\n    ssl_certificate_key key.pem;\n"
            "    server { listen 127.0.0.1:%d ssl; protocol imap; }\n}\n" % port, self.tls_files())
        path = directory.write("imported.conf", ini)
        status, out, err = run_mailproxy(["-t", "-c", path], timeout=10)
        self.assertEqual(status, 0, err)
        self.assertRegex(err, r"\[warn\] %s:\d+: \[mail\] ssl_protocols: no TLS handshake can "
                         r"succeed \(OpenSSL: NO_SHARED_CIPHER\)" % re.escape(path))
        self.assertEqual(err.count("no TLS handshake"), 1, err)
        ini = ini.replace("ssl_ciphers = ECDHE-RSA-AES128-GCM-SHA256", "ssl_ciphers = HIGH")
        status, out, err = run_mailproxy(["-t", "-c", directory.write("imported.conf", ini)],
                                         timeout=10)
        self.assertEqual(status, 0, err)
        self.assertNotIn("no TLS handshake", err)

    def test_a_timeout_without_a_unit_keeps_nginxs_meaning(self):
        # Mastering NGINX: "timeout 1200000;" (milliseconds in nginx: 20 min)
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n    proxy_timeout 3600000;\n"
            "    server { listen 127.0.0.1:%d; protocol smtp; timeout 1200000; }\n}\n" % port)
        server = mp.load_config(directory.write("imported.conf", ini)).servers[0]
        self.assertEqual((server.timeout, server.proxy_timeout), (1200.0, 3600.0))

    def test_servers_are_named_after_protocol_and_port(self):
        ini, err, nginx, directory = self.imported(
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n"
            "    server { listen 127.0.0.1:1993; protocol imap; }\n"
            "    server { listen 127.0.0.1:110; }\n"
            "    server { listen [::1]:1993; protocol imap; }\n"
            "    server { listen 127.0.0.1:1025; protocol smtp; }\n}\n", check=False)
        sections = [line for line in ini.splitlines() if line.startswith("[server")]
        self.assertEqual(sections, ["[server imap-1993]", "[server pop3-110]",
                                    "[server imap-1993-3]", "[server smtp-1025]"])

    def test_a_mailu_mail_block_imports_and_passes_the_check(self):
        # Mailu 2024.06's mail {}, shortened: an underscore in a header name
        # (nginx takes any), a shared session cache and a day's timeout,
        # carried over (mailproxy loads every ssl_* value nginx does).
        ports = [free_port(), free_port()]
        ini, err, nginx, directory = self.imported(
            "mail {\n    server_name mail.example.com;\n"
            "    auth_http http://127.0.0.1:8000/auth/email;\n    proxy_pass_error_message on;\n"
            "    ssl_certificate cert.pem;\n    ssl_certificate_key key.pem;\n"
            "    ssl_session_cache shared:SSLMAIL:3m;\n    ssl_session_timeout 1d;\n"
            "    ssl_session_tickets off;\n    ssl_protocols TLSv1.2 TLSv1.3;\n"
            "    server { listen 127.0.0.1:%d; protocol smtp; smtp_auth none;\n"
            "             auth_http_header AUTH_PORT 25; }\n"
            "    server { listen 127.0.0.1:%d ssl; protocol imap; imap_auth plain login;\n"
            "             auth_http_header AUTH_PORT 993; }\n}\n" % tuple(ports), self.tls_files())
        config = mp.load_config(directory.write("imported.conf", ini))
        self.assertEqual([s.auth_http_header for s in config.servers],
                         [[("AUTH_PORT", "25")], [("AUTH_PORT", "993")]])
        self.assertTrue(config.servers[1].listen[0].ssl)
        self.assertFalse(config.servers[0].ssl_session_tickets)
        lines = ini.splitlines()
        self.assertIn("ssl_session_cache = shared:SSLMAIL:3m", lines, ini)
        self.assertIn("ssl_session_timeout = 1d", lines, ini)
        self.assertNotIn("not translated", err)

    def test_a_quoted_word_may_be_followed_by_a_closing_parenthesis(self):
        """nginx-tests' mail_imap.t, mail_pop3.t and mail_smtp.t have
        `if ($userpass = 'x') {` in their http {} block: nginx reads it, and
        the import stopped there with 'unexpected ")"'."""
        port = free_port()
        ini, err, nginx, directory = self.imported(
            "http {\n    server {\n        location / {\n"
            "            if ($http_auth_pass = 'x') { return 204; }\n        }\n    }\n}\n"
            "mail {\n    auth_http 127.0.0.1:9000/auth;\n"
            "    server {\n        listen 127.0.0.1:%d;\n        protocol imap;\n    }\n}\n" % port)
        self.assertIn("listen = 127.0.0.1:%d" % port, ini.splitlines())

    def test_a_missing_file_is_named_as_nginx_names_it(self):
        directory = TempDir(self)
        missing = os.path.join(directory.path, "x.conf")
        status, out, err = run_mailproxy(["--import-nginx", missing], timeout=10)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, 'mailproxy: [emerg] open() "%s" failed (2: No such file or '
                              'directory)\n' % missing)
        nginx = self.write(directory, "nginx.conf", "mail {\n    include nothere.conf;\n}\n")
        status, out, err = run_mailproxy(["--import-nginx", nginx], timeout=10)
        self.assertEqual(status, 1)
        self.assertIn('open() "%s/nothere.conf" failed (2: No such file or directory) in %s:2'
                      % (directory.path, nginx), err)
        self.assertNotIn("Errno", err)


# ========================================================================== #
# ####                           Command line                           #### #
# ========================================================================== #
# -v, usage, --hash-password, as subprocesses.  (-t is in "Configuration".)

class CommandLineTests(unittest.TestCase):

    def test_a_python_without_ctypes_still_runs_it(self):
        """ctypes is optional (not in every Python build: embedded hosts):
        only bcrypt, Argon2, the libssl extras and process names need it.
        It used to be imported unconditionally."""
        code = ("import builtins, sys\n"
                "real = builtins.__import__\n"
                "def without_ctypes(name, *args, **kwargs):\n"
                "    if name.split('.')[0] == 'ctypes':\n"
                "        raise ImportError('no ctypes in this build')\n"
                "    return real(name, *args, **kwargs)\n"
                "builtins.__import__ = without_ctypes\n"
                "sys.path.insert(0, %r)\n"
                "import mailproxy\n"
                "print(mailproxy.missing_library('BLF-CRYPT', '$2y$05$'))\n"
                "sys.exit(mailproxy.main(['-t', '-c', %r]))\n" % (HERE, os.path.join(HERE, "sample.conf")))
        done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr.decode())
        self.assertIn(b"this Python has no ctypes", done.stdout)
        self.assertIn(b"test is successful", done.stderr)

    def test_version(self):
        status, out, err = run_mailproxy(["-v"])
        self.assertEqual(status, 0)
        self.assertIn("mailproxy/" + mp.__version__, out + err)

    def test_unknown_option(self):
        for args in (["-x"], ["--bogus"], ["-c"]):
            status, out, err = run_mailproxy(args)
            self.assertEqual(status, 2, args)
            self.assertIn("usage:", err)

    def hash(self, args, password: bytes) -> str:
        status, out, err = run_mailproxy(["--hash-password"] + args, stdin=password)
        self.assertEqual(status, 0, err)
        self.assertEqual(out.count("\n"), 1, out)
        return out.strip()

    def test_hash_password_default_scheme(self):
        value = self.hash([], b"secret\n")
        self.assertTrue(value.startswith("{PBKDF2-SHA256}"), value)
        entry = mp.parse_password_entry(value)
        self.assertTrue(mp.password_matches(entry, b"secret"))
        self.assertFalse(mp.password_matches(entry, b"secret\n"))
        self.assertFalse(mp.password_matches(entry, b"Secret"))

    def test_hash_password_crypt_schemes(self):
        for scheme in ("SHA512-CRYPT", "SHA256-CRYPT", "sha512-crypt"):
            value = self.hash([scheme], b"secret\r\n")
            self.assertTrue(value.startswith("{%s}$%s$" % (scheme.upper(), "6" if "512" in scheme else "5")), value)
            entry = mp.parse_password_entry(value)
            self.assertTrue(mp.password_matches(entry, b"secret"), scheme)
            self.assertFalse(mp.password_matches(entry, b"secreT"), scheme)

    def test_hash_password_spaces_and_utf8(self):
        password = "pä ss wörd %+\"'".encode("utf-8")
        for args in ([], ["SHA512-CRYPT"], ["PLAIN"]):
            entry = mp.parse_password_entry(self.hash(args, password + b"\n"))
            self.assertTrue(mp.password_matches(entry, password), args)
            self.assertFalse(mp.password_matches(entry, password + b"x"), args)

    def test_hash_password_output_loads_as_a_users_entry(self):
        value = self.hash(["SHA256-CRYPT"], b"from the file\n")
        config = load_text(self, BASE_CONFIG, "[users]\nalice = " + value + "\n")
        self.assertTrue(mp.password_matches(config.users["alice"], b"from the file"))

    def test_hash_password_refuses_empty_input_and_unknown_scheme(self):
        for stdin in (b"", b"\n"):
            status, out, err = run_mailproxy(["--hash-password"], stdin=stdin)
            self.assertEqual(status, 1, stdin)
            self.assertEqual(out, "")
            self.assertIn("no password", err)
        status, out, err = run_mailproxy(["--hash-password", "md5"], stdin=b"secret\n")
        self.assertEqual(status, 1)
        self.assertIn("unknown scheme", err)


    def test_hash_password_from_a_pipe_asks_nothing(self):
        status, out, err = run_mailproxy(["--hash-password"], stdin=b"piped\nsecond line\n")
        self.assertEqual(status, 0, err)
        self.assertEqual(err, "")                                 # no prompt, no warning
        self.assertTrue(mp.password_matches(mp.parse_password_entry(out.strip()), b"piped"))

    def test_help_lists_every_option(self):
        for args in (["-h"], ["--help"]):
            status, out, err = run_mailproxy(args)
            self.assertEqual((status, err), (0, ""), args)
            self.assertTrue(out.startswith("usage: mailproxy.py"), out)
            for option in ("-c FILE", "-t ", "-s SIGNAL", "-v ", "-h, --help", "--import-nginx",
                           "--hash-password", "reload", "reopen", "quit", "stop"):
                self.assertIn(option, out, args)
            self.assertNotIn("--fuzz", out)                       # the tests' own options

    def test_s_refuses_a_signal_nginx_does_not_know_and_a_missing_one(self):
        for args, message in ((["-s", "restart"], 'invalid option: "-s restart"'),
                              (["-s"], 'option "-s" requires parameter'),
                              (["-c"], 'option "-c" requires file name')):
            status, out, err = run_mailproxy(args)
            self.assertEqual(status, 2, args)
            self.assertIn(message, err)
            self.assertIn("usage:", err)

    def test_s_without_a_pid_directive_a_pid_file_or_a_valid_pid(self):
        directory = TempDir(self)
        port = free_port()
        path = program_config(directory, [port])
        status, out, err = run_mailproxy(["-s", "reload", "-c", path])
        self.assertEqual(status, 1)
        self.assertIn('no "pid" in [main] of %s' % path, err)
        path = program_config(directory, [port], main="pid = mailproxy.pid\n")
        pid_path = os.path.join(directory.path, "mailproxy.pid")
        status, out, err = run_mailproxy(["-s", "quit", "-c", path])
        self.assertEqual(status, 1)
        self.assertIn('[error] open() "%s" failed (2: No such file or directory)' % pid_path, err)
        for text, shown in (("", ""), ("12ab\n", "12ab"), ("0\n", "0"), ("-1\n", "-1"),
                            ("99999999999999999999\n", "99999999999999999999")):
            directory.write("mailproxy.pid", text)
            status, out, err = run_mailproxy(["-s", "stop", "-c", path])
            self.assertEqual(status, 1, text)
            self.assertIn('[error] invalid PID number "%s" in "%s"' % (shown, pid_path), err)
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()                                      # a pid nobody has now (stale)
        directory.write("mailproxy.pid", "%d\n" % child.pid)
        status, out, err = run_mailproxy(["-s", "reopen", "-c", path])
        self.assertEqual(status, 1)
        self.assertIn("[alert] kill(%d, %d) failed (3: No such process)"
                      % (child.pid, signal.SIGUSR1), err)
        self.assertIn("is stale", err)
        self.assertNotIn("Traceback", err)

    @unittest.skipUnless(os.path.exists("/proc/self/comm"), "process names: /proc")
    def test_s_does_not_signal_another_program_a_stale_pid_file_names(self):
        """Found in a newcomer's trial: a stale pid file whose number went to
        another program had that program get SIGHUP (as nginx would)."""
        directory = TempDir(self)
        path = program_config(directory, [free_port()], main="pid = mailproxy.pid\n")
        other = subprocess.Popen(["sleep", "30"])
        self.addCleanup(other.wait)
        self.addCleanup(other.kill)
        wait_until(lambda: read_text("/proc/%d/comm" % other.pid).strip() == "sleep",
                   what="sleep to be sleep")
        directory.write("mailproxy.pid", "%d\n" % other.pid)
        status, out, err = run_mailproxy(["-s", "reload", "-c", path])
        self.assertEqual(status, 1, err)
        self.assertIn('process %d of "%s" is "sleep", not mailproxy' % (
            other.pid, os.path.join(directory.path, "mailproxy.pid")), err)
        time.sleep(0.2)
        self.assertIsNone(other.poll(), "sleep got the SIGHUP")

    def terminal_hash(self, typed: list) -> tuple:
        """mailproxy.py --hash-password on a pseudo-terminal, each of
        ``typed`` entered at a prompt: (exit status, what the terminal showed)."""
        try:
            import pty
            pid, fd = pty.fork()
        except (ImportError, OSError) as error:
            self.skipTest("no pseudo-terminal: %s" % error)
        if pid == 0:                                      # the child, on the terminal
            try:
                os.execv(sys.executable, [sys.executable, MAILPROXY, "--hash-password"])
            finally:
                os._exit(127)
        shown, typed = b"", list(typed)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if typed and shown.rstrip().endswith((b"Password:", b"Again:")):
                os.write(fd, typed.pop(0) + b"\n")
                shown += b"<typed>"
            ready = selectors.DefaultSelector()
            ready.register(fd, selectors.EVENT_READ)
            events = ready.select(1.0)
            ready.close()
            if not events:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:                               # EIO: the child closed the terminal
                data = b""
            if not data:
                break
            shown += data
        os.close(fd)
        for _ in range(50):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.WEXITSTATUS(status), shown.decode("utf-8", "replace")
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)                      # still waiting for input
        os.waitpid(pid, 0)
        self.fail("no exit; the terminal showed:\n" + shown.decode("utf-8", "replace"))

    def test_hash_password_on_a_terminal_asks_twice_without_echo(self):
        status, shown = self.terminal_hash([b"s3cret word", b"s3cret word"])
        self.assertEqual(status, 0, shown)
        self.assertIn("Password: <typed>", shown)
        self.assertIn("Again: <typed>", shown)
        self.assertNotIn("s3cret", shown)                  # not echoed
        value = re.search(r"\{PBKDF2-SHA256\}\S+", shown).group(0)
        self.assertTrue(mp.password_matches(mp.parse_password_entry(value), b"s3cret word"))

    def test_hash_password_on_a_terminal_refuses_two_different_passwords(self):
        status, shown = self.terminal_hash([b"one", b"two"])
        self.assertEqual(status, 1, shown)
        self.assertIn("do not match", shown)
        self.assertNotIn("{PBKDF2", shown)


@needs_fork_and_proc
class ProcessCommandLineTests(EndToEndTestCase):
    """nginx's habits with a running master: -s, the signals logged,
    process names, session numbers (issue 15)."""

    def test_each_signal_is_logged_at_notice_as_nginx_does(self):
        directory = TempDir(self)
        proxy = ProgramUnderTest(self, program_config(directory, [free_port()]))
        worker = proxy.workers()[0]
        for name, action in (("SIGUSR1", "reopening logs"), ("SIGHUP", "reconfiguring"),
                             ("SIGQUIT", "shutting down")):
            mark = proxy.mark()
            os.killpg(proxy.pgid, getattr(signal, name))      # as a Ctrl-\\ or killall would
            line = "[notice] %d#0: signal %d (%s) received, " % (proxy.pid, getattr(signal, name), name)
            self.assertIsNotNone(proxy.wait_for(line + action, mark), proxy.stderr)
            line = line.replace("%d#0" % proxy.pid, "%d#0" % worker)
            self.assertIsNotNone(proxy.wait_for(line + ("ignoring" if name == "SIGHUP" else action),
                                                mark), proxy.stderr)
            if name == "SIGHUP":                              # the new worker gets the next
                self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark), proxy.stderr)
                worker = proxy.workers(mark)[0]
        self.assertEqual(proxy.wait_exit(5), 0, proxy.stderr)
        self.assertIn("[notice] %d#0: signal %d (SIGCHLD) received\n" % (proxy.pid, signal.SIGCHLD),
                      proxy.stderr)
        proxy = ProgramUnderTest(self, program_config(directory, [free_port()]))
        proxy.send_signal("SIGINT")
        self.assertEqual(proxy.wait_exit(5), 0, proxy.stderr)
        self.assertIn("[notice] %d#0: signal 2 (SIGINT) received, exiting" % proxy.pid, proxy.stderr)

    def test_s_reload_reopen_quit_stop_signal_the_running_master(self):
        backend = self.use(FakeImapBackend(accept=None))
        directory = TempDir(self)
        port = free_port()
        config = lambda password: program_config(directory, [port], backend.port, password,
                                                 main="pid = run.pid\n")
        path = config("old")
        proxy = ProgramUnderTest(self, path)
        self.assertEqual(imap_login_reply(self, port, "old"), b"a1 OK LOGIN completed\r\n")
        config("new")
        mark = proxy.mark()
        self.assertEqual(run_mailproxy(["-s", "reload", "-c", path]), (0, "", ""))
        self.assertIsNotNone(proxy.wait_for("%d#0: configuration reloaded" % proxy.pid, mark),
                             proxy.stderr)
        self.assertEqual(imap_login_reply(self, port, "new"), b"a1 OK LOGIN completed\r\n")
        # A reload of a file the master would refuse (its key is missing)
        # is refused here, with the reason, and the master hears nothing.
        directory.write("cert.pem", TLS_SERVER_CERT_PEM)
        program_config(directory, [port], backend.port, "new", main="pid = run.pid\n",
                       server="starttls = on\nssl_certificate = cert.pem\n"
                              "ssl_certificate_key = missing.key\n")
        mark = proxy.mark()
        status, out, err = run_mailproxy(["-s", "reload", "-c", path])
        self.assertEqual(status, 1, err)
        self.assertIn('ssl_certificate_key: cannot load certificate key "%s"'
                      % os.path.join(directory.path, "missing.key"), err)
        self.assertIsNone(proxy.wait_for("reconfiguring", mark, timeout=0.5), proxy.stderr)
        config("new")
        mark = proxy.mark()
        self.assertEqual(run_mailproxy(["-s", "reopen", "-c", path])[0], 0)
        self.assertIsNotNone(proxy.wait_for("%d#0: reopening logs" % proxy.pid, mark), proxy.stderr)
        mark = proxy.mark()
        self.assertEqual(run_mailproxy(["-s", "quit", "-c", path])[0], 0)
        self.assertIsNotNone(proxy.wait_for("%d#0: gracefully shutting down" % proxy.pid, mark),
                             proxy.stderr)
        self.assertEqual(proxy.wait_exit(5), 0, proxy.stderr)
        self.assertFalse(os.path.exists(os.path.join(directory.path, "run.pid")))
        proxy = ProgramUnderTest(self, path)
        self.assertEqual(run_mailproxy(["-s", "stop", "-c", path])[0], 0)
        self.assertEqual(proxy.wait_exit(5), 0, proxy.stderr)
        self.assertIn("%d#0: exiting" % proxy.pid, proxy.stderr)

    @unittest.skipUnless(sys.platform.startswith("linux"), "process names: Linux's prctl")
    def test_master_and_workers_are_named_apart(self):
        proxy = ProgramUnderTest(self, program_config(TempDir(self), [free_port()],
                                                      main="worker_processes = 2\n"))
        comm = lambda pid: read_text("/proc/%d/comm" % pid).strip()
        self.assertEqual(comm(proxy.pid), mp.MASTER_TITLE[:15])
        workers = proxy.workers()
        self.assertEqual(len(workers), 2, proxy.stderr)
        for pid in workers:              # named as soon as it runs, maybe after "started"
            wait_until(lambda: comm(pid) == mp.WORKER_TITLE[:15], 3.0,
                       "worker %d to be named %r, not %r" % (pid, mp.WORKER_TITLE[:15], comm(pid)))
        self.assertNotEqual(mp.MASTER_TITLE[:15], mp.WORKER_TITLE[:15])

    def test_session_numbers_are_unique_across_workers_and_reloads(self):
        # worker_connections = 1: a worker with a session accepts nobody
        # else, so the second client goes to the other worker.
        directory = TempDir(self)
        port = free_port()
        path = program_config(directory, [port], main="worker_processes = 2\nworker_connections = 1\n")
        proxy = ProgramUnderTest(self, path)

        def open_session():
            client = Client(port, 3.0)
            self.addCleanup(client.close)
            address = "127.0.0.1:%d" % client.sock.getsockname()[1]
            client.expect_line(mp.IMAP_GREETING)
            line = proxy.wait_for("client %s connected" % address)
            self.assertIsNotNone(line, proxy.stderr)
            match = re.search(r"\] (\d+)#0: \*(\d+) client", line)
            return client, int(match.group(1)), int(match.group(2))

        first, second = open_session(), open_session()
        self.assertNotEqual(first[1], second[1], "one worker served both:\n" + proxy.stderr)
        mark = proxy.mark()
        proxy.send_signal("SIGHUP")
        self.assertIsNotNone(proxy.wait_for("configuration reloaded", mark, timeout=10),
                             proxy.stderr)
        third = open_session()
        self.assertIn(third[1], proxy.workers(mark))              # a new generation's worker
        numbers = [first[2], second[2], third[2]]
        self.assertEqual(len(set(numbers)), 3, numbers)
        self.assertEqual(sorted(numbers), numbers)                 # one counter, as nginx's


# ========================================================================== #
# ####                               Fuzz                               #### #
# ========================================================================== #
# A seeded fuzzer for the sans-I/O pieces (issue 12):
#
#     python3 test_mailproxy.py --fuzz N [--seed S] [TARGET...]
#
# runs N inputs per target (FuzzSmokeTests runs a few hundred of them in the
# default suite).  Each target makes its inputs from a corpus of valid
# transcripts (the ones the tests above use) and from mutations of them,
# feeds them to its piece the way the session does, and checks four oracles:
#
#   1. no exception but the documented one (BackendError, AuthHttpError,
#      ProxyHeaderError, DnsError; a client machine raises none at all);
#   2. bounded buffers: what a piece holds unparsed stays within its limit;
#   3. split independence: the same bytes read whole, one byte at a time and
#      cut at random points give the same events and the same replies;
#   4. reproducibility: one seed, one sequence of inputs;
# and two the session relies on: the auth_http request built from any login
# a machine emits holds one header per line, and after a login the bytes
# left for the relay are an untouched tail of the input.
#
# A failure prints a FuzzCase, shrunk; fuzz_check(FuzzCase(...)) replays it,
# so it can be pasted into a regression test as it is.  Only the public
# sans-I/O surface is used, except held_bytes(), which reads private buffers.

FUZZ_SEED = 12                   # the default seed (issue 12 asked for this mode)
FUZZ_SMOKE_INPUTS = 400          # inputs per target in the default run: ~1 s in all
FUZZ_VALID_SHARE = 0.15          # inputs left as the corpus made them
FUZZ_MAX_MUTATIONS = 4           # mutations stacked on one input, at most
FUZZ_MAX_INPUT = 12 * 1024       # bytes an input may grow to (duplications compound)
FUZZ_RANDOM_SPLITS = 2           # random cuttings per input, besides whole and bytewise
FUZZ_MAX_CUTS = 12               # cut points of one random cutting, at most
FUZZ_BYTEWISE_MAX = 1536         # longer inputs are not fed one byte at a time: the
                                 # IMAP scanner rescans its buffer per read (quadratic)
FUZZ_SHRINK_CHECKS = 3000        # fuzz_check() calls one shrink may spend
FUZZ_INPUT_SECONDS = 10.0        # one input, all its readings: longer is a hang (a loop,
                                 # or worse than quadratic), reported as an exception
FUZZ_REPRODUCIBLE_SAMPLE = 25    # inputs made twice per target to check oracle 4
FUZZ_LOGINS = ((b"alice", b"secret"), (b"al ice", b'se"cr\\et'),
               ("j\u00fcrgen".encode(), "p\u00e4ssw\u00f6rd".encode()),
               (b"bob@example.com", b""), (b"u", b"p\x00w\r\nx"))
FUZZ_TAGS = (b"a1", b"A001", b"x" * mp.IMAP_MAX_TAG, b"A.b-7]x")
FUZZ_OAUTH_CHALLENGE = b'{"status":"invalid_token"}'   # what the session sends (RFC 7628)
FUZZ_SPECIAL = (b"\r", b"\n", b"\r\n", b"\x00", b"{", b"}", b'"', b"\\", b"+", b" ",
                b"(", b")", b"*", b"\t", b"\x80", b"\xff", b"\xc3\xa9", b"=", b":", b"<", b">")
FUZZ_FILLERS = (b"x", b" ", b"a ", b'"', b"{", b"\\", b"\xff", b"A=")
FUZZ_NUMBERS = (0, 1, 2, 3, 9, 10, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 1023, 1024,
                1025, 4095, 4096, 4097, 65535, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 32,
                9999999999, 10 ** 10, 10 ** 11)
FUZZ_WORDS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x3FFF, 0xC00C, 0xC0FF, 0xFFFF)


class FuzzCase(NamedTuple):
    """One fuzz input: everything fuzz_check() needs to replay it."""
    target: str                  # a key of FUZZ_TARGETS
    settings: dict               # the target's knobs, printable
    segments: tuple              # the input; a segment ends where TLS starts
    split_seed: int = 0          # where the random cuttings cut


class FuzzFailure(NamedTuple):
    """What fuzz_check() found wrong with a case."""
    case: FuzzCase
    oracle: str                  # "exception", "bounded buffers", "split independence",
                                 # "auth request", "trailing data"
    detail: str                  # what happened, for a person
    signature: str               # the same bug gives the same signature (grouping, shrinking)


class FuzzTranscript(NamedTuple):
    """What a piece did with one input: the split-independence oracle
    compares these between the ways of reading the input."""
    events: list                 # (class name, event): events compare by value
    output: bytes                # what the piece sent (normalised: fuzz_normalised)
    end: tuple                   # how it ended: the state, what is left over


def held_bytes(piece) -> int:
    """Bytes ``piece`` (a client machine, a BackendLogin, an AuthHttpParser)
    holds unparsed.  This reads private state, which is being rewritten (a
    LineBuffer may replace the bytearray): this is the one place that does,
    and it takes anything with a length."""
    for name in ("_input", "_data"):
        buffer = getattr(piece, name, None)
        if buffer is not None:
            return len(buffer)
    raise AttributeError("held_bytes(): %s has no buffer it knows; teach it the new one"
                         % type(piece).__name__)


def fuzz_event(event) -> tuple:
    """An event as the transcript keeps it: NamedTuple events with no fields
    compare equal to each other, so the class name goes along."""
    return type(event).__name__, event


# -- corpus: valid transcripts, from the tests above --------------------------------

def fuzz_sasl(rng: random.Random, login: bytes, password: bytes) -> tuple:
    """One SASL exchange as a client makes it (RFC 4422): (mechanism,
    initial response or None, the lines that answer the prompts)."""
    plain = b64(b"\0" + login + b"\0" + password)
    exchanges = [
        (b"PLAIN", None, [plain]), (b"PLAIN", plain, []), (b"PLAIN", None, [b"*"]),
        (b"LOGIN", None, [b64(login), b64(password)]), (b"LOGIN", b64(login), [b64(password)]),
        (b"CRAM-MD5", None, [b64(login + b" " + mp.cram_md5_digest(password, SALT))]),
        (b"EXTERNAL", b"=", []), (b"EXTERNAL", None, [b64(login)]),
        (b"XOAUTH2", mp.oauth_initial_response("xoauth2", login, password), [b""]),
        (b"OAUTHBEARER", None, [mp.oauth_initial_response("oauthbearer", login, password), b"AQ=="])]
    mechanism, initial, lines = rng.choice(exchanges)
    if rng.random() < 0.2:
        mechanism = mechanism.lower()
    return mechanism, initial, lines


def fuzz_sasl_command(rng: random.Random, verb: bytes, login: bytes, password: bytes) -> bytes:
    """``verb`` (``TAG AUTHENTICATE`` or ``AUTH``) with a SASL exchange."""
    mechanism, initial, lines = fuzz_sasl(rng, login, password)
    command = verb + b" " + mechanism + (b" " + initial if initial is not None else b"")
    return command + b"\r\n" + b"".join(line + b"\r\n" for line in lines)


def fuzz_imap_string(rng: random.Random, value: bytes) -> bytes:
    """``value`` as an IMAP astring: an atom when it can be one, quoted, or a
    literal, synchronizing or not (RFC 3501 §4.3, RFC 7888)."""
    forms = [b"{%d}\r\n", b"{%d+}\r\n"]
    if re.fullmatch(rb"[A-Za-z0-9@._-]+", value):
        forms.append(b"atom")
    if not re.search(rb"[\r\n]", value):
        forms.append(b"quoted")
    form = rng.choice(forms)
    if form == b"atom":
        return value
    if form == b"quoted":
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return form % len(value) + value


def fuzz_imap_command(rng: random.Random) -> bytes:
    tag = rng.choice(FUZZ_TAGS)
    login, password = rng.choice(FUZZ_LOGINS)
    name = rng.choice((b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"ID", b"LOGIN", b"LOGIN",
                       b"AUTHENTICATE", b"AUTHENTICATE"))
    if name == b"LOGIN":
        return b"%s LOGIN %s %s\r\n" % (tag, fuzz_imap_string(rng, login),
                                        fuzz_imap_string(rng, password))
    if name == b"AUTHENTICATE":
        return fuzz_sasl_command(rng, tag + b" AUTHENTICATE", login, password)
    if name == b"ID":
        return tag + rng.choice((b" ID NIL", b' ID ("name" "Thunderbird" "version" "115.0")',
                                 b' ID ("name" {4}\r\nmutt)', b" id nil", b' ID ("a" NIL)')) + b"\r\n"
    extra = rng.choice((b"", b"", b"", b" x", b" PLAIN", b" alice"))   # refused argument counts
    return tag + b" " + (name.lower() if rng.random() < 0.2 else name) + extra + b"\r\n"


def fuzz_pop3_command(rng: random.Random) -> bytes:
    login, password = rng.choice(FUZZ_LOGINS)
    name = rng.choice((b"USER", b"USER", b"APOP", b"AUTH", b"AUTH", b"CAPA", b"NOOP", b"STLS",
                       b"QUIT", b"AUTH-LIST"))
    if name == b"USER":
        return b"USER " + login + b"\r\nPASS " + password + b"\r\n"
    if name == b"APOP":
        return b"APOP " + login + b" " + mp.apop_digest(SALT, password) + b"\r\n"
    if name == b"AUTH":
        return fuzz_sasl_command(rng, b"AUTH", login, password)
    if name == b"AUTH-LIST":
        return b"AUTH\r\n"
    extra = rng.choice((b"", b"", b"", b" x", b" a b c d", b"  "))   # refused argument counts
    return (name.lower() if rng.random() < 0.2 else name) + extra + b"\r\n"


def fuzz_smtp_command(rng: random.Random) -> bytes:
    login, password = rng.choice(FUZZ_LOGINS)
    name = rng.choice((b"EHLO", b"HELO", b"AUTH", b"AUTH", b"MAIL", b"MAIL", b"RCPT", b"RSET",
                       b"NOOP", b"STARTTLS", b"QUIT", b"VRFY", b"DATA", b"BARE"))
    if name == b"BARE":          # what has to have an argument, without one
        return rng.choice((b"AUTH", b"MAIL", b"RCPT", b"HELO", b"EHLO")) + b"\r\n"
    if name in (b"EHLO", b"HELO"):
        return name + rng.choice((b" client.example", b" [192.0.2.7]")) + b"\r\n"
    if name == b"AUTH":
        return fuzz_sasl_command(rng, b"AUTH", login, password)
    if name == b"MAIL":          # smtp_auth none: MAIL, then the RCPT that logs in
        return rng.choice((b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<alice@example.com> SIZE=100\r\n",
                           b"mail from:<>\r\n")) + b"RCPT TO:<c@d>\r\n"
    if name == b"RCPT":
        return b"RCPT TO:<bob@example.com> NOTIFY=NEVER\r\n"
    extra = rng.choice((b"", b"", b"", b" x", b" a b"))      # refused argument counts
    return (name.lower() if rng.random() < 0.2 else name) + extra + b"\r\n"


FUZZ_COMMANDS = {"imap": fuzz_imap_command, "pop3": fuzz_pop3_command, "smtp": fuzz_smtp_command}


def fuzz_client_corpus(rng: random.Random, settings: dict, protocol: str) -> list:
    """A few commands; a segment ends after each STARTTLS or STLS, where the
    session would start the handshake."""
    commands = [FUZZ_COMMANDS[protocol](rng) for _ in range(rng.randint(1, 6))]
    if protocol == "smtp" and rng.random() < 0.8:
        commands.insert(0, b"EHLO client.example\r\n")
    segments, current = [], b""
    for command in commands:
        current += command
        if command.upper().endswith((b"STARTTLS\r\n", b"STLS\r\n")):
            segments.append(current)
            current = b""
    return segments + [current]


def fuzz_client_settings(rng: random.Random, protocol: str) -> dict:
    """Settings of one client machine and what the fake session does with its
    logins: ``accept`` the n-th (then the rest is relayed), ``close`` after
    refusing the n-th (nginx without Auth-Wait)."""
    methods = [method for method in mp.ALL_AUTH_METHODS[protocol] if rng.random() < 0.4]
    buffers = (64, mp.POP3_BUFFER_NGINX, 256) if protocol == "pop3" else (64, 256, mp.PAGE_SIZE)
    machine = {protocol + "_auth": methods or ["plain"],
               "starttls": rng.choice(("off", "on", "only")),
               protocol + "_client_buffer": rng.choice(buffers),
               "max_errors": rng.choice((1, 5, 1000))}
    return {"machine": machine, "tls": rng.random() < 0.3,
            "accept": rng.choice((None, None, None, 1, 2)), "close": rng.choice((None, None, 1, 2))}


def fuzz_backend_settings(rng: random.Random) -> dict:
    """Which login script, built from what (see fuzz_backend_script)."""
    login, password = rng.choice(FUZZ_LOGINS)
    settings = {"script": rng.choice(("imap", "imap", "imap-token", "pop3", "pop3-token",
                                      "smtp", "smtp", "smtp")),
                "tag": rng.choice((b"a1 ", b"A001 ")), "login": login, "password": password,
                "starttls": rng.random() < 0.3, "line_limit": rng.choice((64, 128, mp.PAGE_SIZE)),
                "mechanism": rng.choice(("xoauth2", "oauthbearer"))}
    if settings["script"] == "smtp":
        none = rng.random() < 0.3
        settings["server"] = {"xclient": rng.random() < 0.5, "proxy_smtp_auth": rng.random() < 0.5,
                              "proxy_smtp_auth_method": rng.choice(("plain", "login")),
                              "proxy_starttls": settings["starttls"]}
        settings["facts"] = {
            "client_address": rng.choice(("192.0.2.7", "2001:db8::7")),
            "client_name": rng.choice(("[UNAVAILABLE]", "client.example")),
            "helo": rng.choice((None, b"client.example")), "esmtp": rng.random() < 0.5,
            "login": b"" if none else login, "password": b"" if none else password,
            "method": "none" if none else "plain",
            "mail_from": b"MAIL FROM:<a@b>" if none else None,
            "rcpt_to": b"RCPT TO:<c@d>" if none else None,
            "backend_auth": rng.choice(("", "", "none", "plain", "login", "xoauth2", "oauthbearer"))}
    return settings


def fuzz_backend_script(settings: dict) -> list:
    """The login script ``settings`` describe, from the builders of the
    backend login section."""
    kind, tag, starttls = settings["script"], settings["tag"], settings["starttls"]
    login, password, mechanism = settings["login"], settings["password"], settings["mechanism"]
    if kind == "imap":
        return mp.imap_login_script(tag, login, password, starttls)
    if kind == "imap-token":
        response = mp.oauth_initial_response(mechanism, login, password)
        return mp.imap_token_script(tag, mechanism, response, starttls)
    if kind == "pop3":
        return mp.pop3_login_script(login, password, starttls)
    if kind == "pop3-token":
        response = mp.oauth_initial_response(mechanism, login, password)
        return mp.pop3_token_script(mechanism, response, starttls)
    return mp.smtp_login_script(server_settings("smtp", **settings["server"]),
                                mp.SmtpFacts(**settings["facts"]))


def fuzz_backend_reply(rng: random.Random, step, tag: bytes) -> bytes:
    """A reply a real backend could give to satisfy ``step``."""
    if step.kind == "imap-greeting":
        return rng.choice((b"* OK ready\r\n",
                           b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n"))
    if step.kind == "continuation":
        return rng.choice((b"+ go\r\n", b"+\r\n", b"+ OK\r\n"))
    if step.kind == "imap-tagged":
        untagged = b"* CAPABILITY IMAP4rev1 IDLE\r\n" * rng.randint(0, 2)
        done = rng.choice((b"OK done\r\n", b"OK [CAPABILITY X] Logged in\r\n"))
        return untagged + (step.tag or tag) + done
    if step.kind == "pop3-ok":
        return rng.choice((b"+OK\r\n", b"+OK hello\r\n", b"+OK 2 messages\r\n"))
    code = rng.choice(step.codes or (b"250", b"550"))
    return rng.choice((code + b" ok\r\n", code + b"\r\n",
                       code + b"-first line\r\n" + code + b"-PIPELINING\r\n" + code + b" done\r\n"))


def fuzz_backend_corpus(rng: random.Random, settings: dict) -> list:
    """The replies the script expects; a segment ends where TLS starts.  The
    backend may say more after its last reply (to be relayed)."""
    segments, current = [], b""
    for step in fuzz_backend_script(settings):
        if isinstance(step, mp.TlsStep):
            segments.append(current)
            current = b""
        elif isinstance(step, mp.Expect):
            current += fuzz_backend_reply(rng, step, settings["tag"])
    if rng.random() < 0.3:
        current += rng.choice((b"* 1 EXISTS\r\n", b"+OK extra", b"250 more\r\n"))
    return segments + [current]


def fuzz_auth_http_corpus(rng: random.Random, settings: dict) -> list:
    """An auth server's answer, as the AuthHttpResponseTests above."""
    ok = [b"Auth-Status: OK", b"Auth-Server: " + rng.choice((b"127.0.0.2", b"::1", b"mail.example")),
          b"Auth-Port: " + rng.choice((b"1143", b"25", b"0", b"70000"))]
    ok += rng.sample([b"Auth-User: bob%20x", b"Auth-Pass: p w", b"Auth-Wait: 0",
                      b"Auth-Backend-TLS: " + rng.choice((b"STARTTLS", b"ssl", b"maybe", b"\xff%s")),
                      b"Auth-SMTP-Auth: " + rng.choice((b"login", b"none", b"cram-md5"))],
                     rng.randint(0, 3))
    wait = [b"Auth-Status: WAIT", b"Auth-Wait: 3"]
    fail = [b"Auth-Status: Invalid login or password", b"Auth-Wait: 2",
            b"Auth-Error-Code: 550 5.7.1", b'Auth-Error-SASL: {"status":"invalid_token"}']
    headers = rng.choice((ok, ok, wait, fail))
    rng.shuffle(headers)
    status = rng.choice(([b"HTTP/1.0 200 OK"], [b"HTTP/1.1 500 Nope"], []))
    eol = rng.choice((b"\r\n", b"\n"))
    return [eol.join(status + headers) + eol + eol + rng.choice((b"", b"body"))]


def fuzz_proxy_corpus(rng: random.Random, settings: dict) -> list:
    """A PROXY header (v1, v2 with and without TLS facts, LOCAL, UNKNOWN, a
    family we do not read), maybe with what the client sent behind it."""
    source, destination = rng.choice(((("192.0.2.7", 40000), ("127.0.0.1", 143)),
                                      (("2001:db8::7", 40000), ("::1", 993)),
                                      (("192.0.2.7", 1), ("::1", 2))))
    tls = mp.ProxyTls("TLSv1.3", "TLS_AES_256_GCM_SHA384", rng.choice((None, "mail.example.org")),
                      rng.choice((None, "imap")), rng.choice((None, "alice")), rng.random() < 0.5)
    header = rng.choice((
        mp.proxy_protocol_v1(source, destination), b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 1 2 3 4\r\n",
        mp.proxy_protocol_v2(source, destination), mp.proxy_protocol_v2(source, destination, tls),
        mp.PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00",
        mp.PROXY_V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"\x00" * 216,
        b"PROXY TCP4 192.0.2.999 127.0.0.1 40000 143\r\n", b"PROXY TCP6 fe80::1%eth0 ::1 1234 25\r\n",
        mp.PROXY_V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4))
    return [header + rng.choice((b"", b"a1 LOGIN alice secret\r\n", b"\x16\x03\x01\x02\x00\x01"))]


def fuzz_dns_settings(rng: random.Random) -> dict:
    name, qtype = rng.choice((("a.example", mp.DNS_A), ("a.example", mp.DNS_AAAA),
                              (PTR_127_0_0_1, mp.DNS_PTR), ("client.example", mp.DNS_A)))
    return {"qid": rng.getrandbits(16), "name": name, "qtype": qtype,
            "offset": rng.choice((12, 12, 0, rng.randrange(64)))}


def fuzz_dns_corpus(rng: random.Random, settings: dict) -> list:
    """An answer to our query (records as DnsMessageTests makes them):
    addresses, CNAME chains, PTRs, compressed names, other types."""
    query = mp.dns_query(settings["qid"], settings["name"], settings["qtype"])
    here = rng.choice((b"\xc0\x0c", dns_name(settings["name"])))
    value = {mp.DNS_A: "192.0.2.1", mp.DNS_AAAA: "2001:db8::1", mp.DNS_PTR: "host.example"}
    records = rng.choice((
        [dns_record(here, settings["qtype"], value[settings["qtype"]])],
        [dns_record(here, mp.DNS_CNAME, "alias.example"),
         dns_record(dns_name("alias.example"), settings["qtype"], value[settings["qtype"]], ttl=60)],
        [dns_record(here, 15, b"\x00\x0a\xc0\x0c"), dns_record(here, mp.DNS_A, b"\x01\x02\x03\x04")],
        [dns_record(here, rng.choice((mp.DNS_A, mp.DNS_AAAA)), b"\x01\x02\x03")],
        [dns_record(here, mp.DNS_CNAME, b"\x02a.\x01b\x00")],
        []))
    return [dns_response(query, records, rcode=rng.choice((0, 0, 2, 3)), truncated=rng.random() < 0.2)]


# -- mutations ----------------------------------------------------------------------

def fuzz_span(rng: random.Random, data: bytes) -> tuple:
    """A random [start, end) within ``data``, mostly short."""
    start = rng.randint(0, len(data))
    return start, min(len(data), start + rng.choice((1, 1, 2, 4, 8, 32, len(data))))


def mutate_flip(rng: random.Random, data: bytes, limits: list) -> bytes:
    """A byte changed: one bit of it, or all."""
    if not data:
        return bytes([rng.randrange(256)])
    index = rng.randrange(len(data))
    value = data[index] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
    return data[:index] + bytes([value]) + data[index + 1:]


def mutate_insert_special(rng: random.Random, data: bytes, limits: list) -> bytes:
    """CR, LF, NUL, a brace, a quote, a backslash, 8-bit... somewhere."""
    index = rng.randint(0, len(data))
    return data[:index] + rng.choice(FUZZ_SPECIAL) * rng.choice((1, 1, 1, 2, 3)) + data[index:]


def mutate_insert_random(rng: random.Random, data: bytes, limits: list) -> bytes:
    index = rng.randint(0, len(data))
    return data[:index] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + data[index:]


def mutate_delete(rng: random.Random, data: bytes, limits: list) -> bytes:
    start, end = fuzz_span(rng, data)
    return data[:start] + data[end:]


def mutate_truncate(rng: random.Random, data: bytes, limits: list) -> bytes:
    return data[:rng.randint(0, len(data))]


def mutate_duplicate(rng: random.Random, data: bytes, limits: list) -> bytes:
    """A stretch said again, a few times."""
    start, end = fuzz_span(rng, data)
    return data[:end] + data[start:end] * rng.choice((1, 2, 3, 10)) + data[end:]


def mutate_long_token(rng: random.Random, data: bytes, limits: list) -> bytes:
    """A run of bytes as long as a limit, give or take a few."""
    index = rng.randint(0, len(data))
    length = max(0, rng.choice(limits) + rng.randint(-3, 3))
    filler = rng.choice(FUZZ_FILLERS)
    return data[:index] + (filler * length)[:length] + data[index:]


def mutate_long_line(rng: random.Random, data: bytes, limits: list) -> bytes:
    """One line padded (or cut) to a limit's length, give or take a few,
    LF included: the edge of every line buffer."""
    ends = [match.end() for match in re.finditer(rb"\n", data)] or [len(data)]
    end = rng.choice(ends)
    start = data.rfind(b"\n", 0, end - 1) + 1
    target = max(1, rng.choice(limits) + rng.randint(-2, 2))
    line = data[start:end]
    if len(line) >= target:
        return data[:start] + line[:target - 1] + line[-1:] + data[end:]
    index = rng.randint(start, max(start, end - 2))
    padding = (rng.choice(FUZZ_FILLERS) * target)[:target - len(line)]
    return data[:index] + padding + data[index:]


def mutate_literal_length(rng: random.Random, data: bytes, limits: list) -> bytes:
    """A literal header with a huge, edge or zero length: one made over, or a new one."""
    length = rng.choice(FUZZ_NUMBERS + tuple(limit + delta for limit in limits for delta in (-1, 0, 1)))
    header = b"{%d%s}" % (length, rng.choice((b"", b"+")))
    literals = list(re.finditer(rb"\{\d*\+?\}", data))
    if literals and rng.random() < 0.6:
        match = rng.choice(literals)
        return data[:match.start()] + header + data[match.end():]
    index = rng.randint(0, len(data))
    return data[:index] + b" " + header + b"\r\n" + data[index:]


def mutate_many_arguments(rng: random.Random, data: bytes, limits: list) -> bytes:
    """Arguments by the dozen before a line's end."""
    ends = [match.start() for match in re.finditer(rb"\r?\n", data)] or [len(data)]
    index = rng.choice(ends)
    word = rng.choice((b" a", b' ""', b" {0}\r\n", b" (", b" )", b" NIL", b" (a b)"))
    return data[:index] + word * rng.choice((1, 2, 3, 4, 10, 11, 12, 30, 64, 65, 200)) + data[index:]


def mutate_number(rng: random.Random, data: bytes, limits: list) -> bytes:
    """A number in the input (a length, a port, a code) made an edge case."""
    numbers = list(re.finditer(rb"\d+", data))
    if not numbers:
        return mutate_insert_special(rng, data, limits)
    match = rng.choice(numbers)
    return data[:match.start()] + b"%d" % rng.choice(FUZZ_NUMBERS) + data[match.end():]


def mutate_word(rng: random.Random, data: bytes, limits: list) -> bytes:
    """Two bytes made a big-endian edge value: a length, a count, a pointer."""
    if len(data) < 2:
        return mutate_insert_random(rng, data, limits)
    index = rng.randrange(len(data) - 1)
    value = rng.choice(FUZZ_WORDS + (len(data), len(data) - index, len(data) - 16))
    return data[:index] + struct.pack("!H", value & 0xFFFF) + data[index + 2:]


FUZZ_MUTATIONS = (mutate_flip, mutate_insert_special, mutate_insert_special, mutate_insert_random,
                  mutate_delete, mutate_truncate, mutate_duplicate, mutate_long_token,
                  mutate_long_line, mutate_literal_length, mutate_many_arguments, mutate_number,
                  mutate_word)


def fuzz_splice(rng: random.Random, segments: list, other: list) -> list:
    """The start of one input and the end of another."""
    index, other_index = rng.randrange(len(segments)), rng.randrange(len(other))
    head = segments[index][:rng.randint(0, len(segments[index]))]
    tail = other[other_index][rng.randint(0, len(other[other_index])):]
    return segments[:index] + [head + tail] + list(other[other_index + 1:])


def fuzz_mutated(rng: random.Random, segments: list, other: list, limits: list) -> list:
    """A few mutations stacked; now and then the TLS boundaries move."""
    segments = list(segments)
    for _ in range(rng.randint(1, FUZZ_MAX_MUTATIONS)):
        roll = rng.random()
        if roll < 0.08:
            segments = fuzz_splice(rng, segments, other)
        elif roll < 0.12 and len(segments) > 1:
            index = rng.randrange(len(segments) - 1)
            segments[index:index + 2] = [segments[index] + segments[index + 1]]
        elif roll < 0.16:
            index = rng.randrange(len(segments))
            cut = rng.randint(0, len(segments[index]))
            segments[index:index + 1] = [segments[index][:cut], segments[index][cut:]]
        else:
            index = rng.randrange(len(segments))
            segments[index] = rng.choice(FUZZ_MUTATIONS)(rng, segments[index], limits)
    while sum(len(segment) for segment in segments) > FUZZ_MAX_INPUT:
        longest = max(range(len(segments)), key=lambda i: len(segments[i]))
        segments[longest] = segments[longest][:len(segments[longest]) // 2]
    return segments


# -- drivers: each piece fed as the session feeds it --------------------------------
#
# ``reads(segment, limit)`` cuts a segment into the reads the piece gets (at
# most ``limit`` bytes each, as the session's read budget); ``problems``
# collects (oracle, what) for the oracles a transcript cannot show.  A
# documented exception is part of the transcript; any other one escapes to
# fuzz_check().

FUZZ_BOUNDS = "bounded buffers"
FUZZ_AUTH_REQUEST = "auth request"
FUZZ_TRAILING = "trailing data"


def fuzz_client_machine(case: FuzzCase):
    settings = case.settings
    machine = make_machine(case.target, tls=settings["tls"], **settings["machine"])
    if case.target == "smtp":
        machine.greet()            # the session greets when the client's name is known
    return machine


def fuzz_client_bounds(machine, problems: list) -> None:
    """A machine that can still read holds less than its buffer (a longer
    command is refused and closes); one that has finished keeps what it was
    last given unread: less than the held part plus one read."""
    held, limit = held_bytes(machine), machine.buffer_size
    bound = 2 * limit if machine.finished else limit
    if held >= bound:
        problems.append((FUZZ_BOUNDS, "holds %d bytes, buffer %d%s"
                         % (held, limit, ", finished" if machine.finished else "")))


def fuzz_auth_request_problems(machine, credentials, problems: list) -> None:
    """The request the session would send the auth server for this login
    (build_auth_http_request, the machine's HELO, MAIL and RCPT for smtp_auth
    none) must hold one "Name: value" line per header and end at its blank
    line: no byte of the client's may start a header of its own."""
    smtp = (machine.helo, machine.mail_from, machine.rcpt_to) if credentials.method == "none" else None
    request = mp.AuthRequest(credentials.method, credentials.login, credentials.password,
                             machine.protocol, 1, "192.0.2.7", salt=credentials.salt, smtp=smtp)
    head, _, after = mp.build_auth_http_request(AUTH_URL, [], request).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")[1:]
    names = [line.partition(b":")[0] for line in lines]
    if after or len(set(names)) != len(names) or not all(
            re.fullmatch(rb"[A-Za-z0-9-]+: [^\r\n]*", line) for line in lines):
        problems.append((FUZZ_AUTH_REQUEST, "request %r" % (head,)))


def fuzz_client_answer(case: FuzzCase, machine, events: list, log: list, problems: list) -> str:
    """Answer events as the session does: refuse a login (with the SASL
    error challenge first for a token), or accept the ``accept``-th one.
    Returns "tls" after StartTls, "login" after an accepted login, else ""."""
    outcome, queue = "", list(events)
    while queue:
        event = queue.pop(0)
        log.append(fuzz_event(event))
        if isinstance(event, mp.StartTls):
            outcome = "tls"
        elif isinstance(event, mp.Credentials):
            fuzz_auth_request_problems(machine, event, problems)
            attempt = sum(1 for name, _ in log if name == "Credentials")
            if attempt == case.settings["accept"]:
                return "login"
            challenge = FUZZ_OAUTH_CHALLENGE if event.method in ("xoauth2", "oauthbearer") else None
            queue += machine.auth_failed(machine.failure_reply(b"x"), challenge,
                                         close=attempt == case.settings["close"])
    return outcome


def fuzz_drive_client(case: FuzzCase, reads: Callable, problems: list) -> FuzzTranscript:
    """IMAP, POP3, SMTP: read, answer the events, start TLS where asked (the
    rest of that segment was sent in clear and is dropped: the session would
    hand it to the TLS layer), stop at Quit or Closed, else end with EOF."""
    machine = fuzz_client_machine(case)
    output, log = bytearray(machine.data_to_send()), []
    for index, segment in enumerate(case.segments):
        pieces = reads(segment, machine.buffer_size)
        for position, piece in enumerate(pieces):
            if machine.finished:
                break
            outcome = fuzz_client_answer(case, machine, machine.receive_data(piece), log, problems)
            output += machine.data_to_send()
            fuzz_client_bounds(machine, problems)
            if outcome == "login":     # the session relays what is left, whatever the cut
                relayed = fuzz_relayed(machine, case, index, pieces[position + 1:], problems)
                return FuzzTranscript(log, fuzz_normalised(case, output), ("logged in", relayed))
            if outcome == "tls":
                fuzz_client_answer(case, machine, machine.tls_started(), log, problems)
                output += machine.data_to_send()
                break
    end = ("finished",) if machine.finished else ("open", machine.waiting, machine.trailing_data)
    log += [fuzz_event(event) for event in machine.receive_data(b"")]     # EOF: nothing more
    output += machine.data_to_send()
    return FuzzTranscript(log, fuzz_normalised(case, output), end)


def fuzz_relayed(piece, case: FuzzCase, index: int, unread: list, problems: list) -> bytes:
    """After a login the relay gets ``trailing_data``, then what was not read
    yet: together, an untouched tail of the input (nothing lost, nothing
    changed; DESIGN.md: "a pipelined tail that must come back untouched")."""
    relayed = piece.trailing_data + b"".join(unread) + b"".join(case.segments[index + 1:])
    if not b"".join(case.segments[index:]).endswith(relayed):
        problems.append((FUZZ_TRAILING, "relays %s" % fuzz_short(relayed, 120)))
    return relayed


def fuzz_normalised(case: FuzzCase, output: bytes) -> bytes:
    """The replies without what legitimately depends on the cut: IMAP's
    ``+ OK`` goes out only while a synchronizing literal's data has not
    arrived (nginx does the same), so it is taken out before comparing.  No
    other reply can be that line: SASL prompts are base64, a multiple of 4."""
    if case.target != "imap":
        return bytes(output)
    return b"".join(line for line in re.findall(rb"[^\n]*\n|[^\n]+$", bytes(output))
                    if line != mp.IMAP_NEXT)


def fuzz_drive_backend(case: FuzzCase, reads: Callable, problems: list) -> FuzzTranscript:
    """BackendLogin against the backend's replies: tls_started() after
    BackendStartTls (the rest of that segment is dropped, as the runner drops
    it), stop at LoginDone or BackendError."""
    settings = case.settings
    login = mp.BackendLogin(fuzz_backend_script(settings), settings["tag"], settings["line_limit"])
    sent, log = bytearray(login.data_to_send()), []
    for index, segment in enumerate(case.segments):
        pieces = reads(segment, mp.READ_SIZE)
        for position, piece in enumerate(pieces):
            try:
                events = login.receive_data(piece)
            except mp.BackendError as error:
                # What the runner queued before the bad line is counted as
                # sent, though the session closes without sending it: whether
                # it goes out depends on the cut, the runner's steps do not.
                sent += login.data_to_send()
                return FuzzTranscript(log, bytes(sent), fuzz_backend_error(error))
            sent += login.data_to_send()
            log += [fuzz_event(event) for event in events]
            if any(isinstance(event, mp.LoginDone) for event in events):
                relayed = fuzz_relayed(login, case, index, pieces[position + 1:], problems)
                return FuzzTranscript(log, bytes(sent), ("logged in", relayed))
            if held_bytes(login) >= settings["line_limit"]:
                problems.append((FUZZ_BOUNDS, "holds %d bytes, line_limit %d"
                                 % (held_bytes(login), settings["line_limit"])))
            if any(isinstance(event, mp.BackendStartTls) for event in events):
                login.tls_started()
                sent += login.data_to_send()
                break
    try:
        login.receive_data(b"")            # the backend closes
    except mp.BackendError as error:
        return FuzzTranscript(log, bytes(sent), fuzz_backend_error(error))
    return FuzzTranscript(log, bytes(sent), ("no error at EOF",))


def fuzz_backend_turns(case: FuzzCase) -> dict:
    """Where BackendLogin sends a command, the replies read a line at a time
    (it sends only when a line completes a step): {segment number: offsets
    just after a line that made it send}.  A backend answers only then."""
    settings = case.settings
    login = mp.BackendLogin(fuzz_backend_script(settings), settings["tag"], settings["line_limit"])
    login.data_to_send()
    points = {}
    for index, segment in enumerate(case.segments):
        for line in re.finditer(rb"[^\n]*\n|[^\n]+$", segment):
            try:
                events = login.receive_data(line.group())
            except mp.BackendError:
                return points
            if login.data_to_send():
                points.setdefault(index, []).append(line.end())
            if any(isinstance(event, mp.LoginDone) for event in events):
                return points
            if any(isinstance(event, mp.BackendStartTls) for event in events):
                login.tls_started()
                break
    return points


def fuzz_backend_error(error: Exception) -> tuple:
    """A BackendError as the transcript keeps it.  "too long response line"
    (no LF within line_limit yet) and "too long response" (the LF came in the
    same read) are one verdict reached at different reads: one name."""
    message = str(error).replace("too long response line", "too long response")
    return "BackendError", message, error.line


def fuzz_drive_auth_http(case: FuzzCase, reads: Callable, problems: list) -> FuzzTranscript:
    """AuthHttpParser until a response or an error (EOF after the input),
    then interpret_auth_response for each protocol, with and without a
    password known."""
    parser = mp.AuthHttpParser()
    for piece in reads(b"".join(case.segments), mp.READ_SIZE) + [b""]:
        try:
            response = parser.receive_data(piece)
        except mp.AuthHttpError as error:
            return FuzzTranscript([], b"", ("AuthHttpError", str(error)))
        if response is not None:
            return FuzzTranscript([("AuthHttpResponse", response)], b"", fuzz_verdicts(response))
        if held_bytes(parser) > mp.AUTH_HTTP_RESPONSE_MAX:
            problems.append((FUZZ_BOUNDS, "holds %d bytes, limit %d"
                             % (held_bytes(parser), mp.AUTH_HTTP_RESPONSE_MAX)))
    return FuzzTranscript([], b"", ("no error at EOF",))


def fuzz_verdicts(response) -> tuple:
    verdicts = []
    for protocol in ("imap", "pop3", "smtp"):
        for have_password in (True, False):
            try:
                verdicts.append(mp.interpret_auth_response(response, protocol, have_password))
            except mp.AuthHttpError as error:
                verdicts.append(("AuthHttpError", str(error)))
    return tuple(verdicts)


def fuzz_drive_proxy(case: FuzzCase, reads: Callable, problems: list) -> FuzzTranscript:
    """ProxyHeaderReader, read after read, as the session uses it; what
    follows the header goes on to the protocol."""
    data, reader = b"".join(case.segments), mp.ProxyHeaderReader()
    for piece in reads(data, mp.PROXY_V2_MAX):
        try:
            header = reader.receive_data(piece)
        except mp.ProxyHeaderError as error:
            return FuzzTranscript([], b"", ("ProxyHeaderError", str(error)))
        held = len(reader.data)
        if header is None and held >= mp.PROXY_V2_MAX:
            problems.append((FUZZ_BOUNDS, "still wants more after %d bytes" % held))
        if header is not None:
            if not 0 < header.length <= held:
                problems.append((FUZZ_BOUNDS, "header of %d bytes in %d" % (header.length, held)))
            return FuzzTranscript([("ProxyHeader", header)], b"", ("rest", data[header.length:]))
    return FuzzTranscript([], b"", ("incomplete", len(reader.data)))


def fuzz_relay_check_corpus(rng: random.Random, settings: dict) -> list:
    """smtp_auth none after the first RCPT: the client's commands (pipelined
    or not, in and out of example.com, a message, a next transaction) and
    the backend's replies, turn about: client, backend, client..."""
    recipients = [b"RCPT TO:<%s>\r\n" % address for address in rng.sample(
        [b"b@example.com", b"victim@evil.test", b"c@Example.COM", b"x@example.com.evil.test",
         b"d@example.com"], 3)]
    message = rng.choice((b"Subject: x\r\n\r\nRCPT TO:<in@evil.test>\r\n..\r\n.\r\n",
                          b"x\n.\nRCPT TO:<smuggled@evil.test>\r\n", b".\r\n"))
    return [b"".join(recipients) + b"DATA\r\n", b"250 2.1.5 Ok\r\n" * 2 + b"354 go ahead\r\n",
            message + b"MAIL FROM:<a@remote.test>\r\n" + recipients[0],
            b"250 2.0.0 queued\r\n250-2.1.0 Ok\r\n250 Ok\r\n",
            rng.choice((b"QUIT\r\n", b"STARTTLS\r\n", b"BDAT 5 LAST\r\nhello", b"RSET\r\n"))]


def fuzz_drive_relay_check(case: FuzzCase, reads: Callable, problems: list) -> FuzzTranscript:
    """SmtpRecipientGuard between the two sides: what it passes each way.
    Besides the common oracles: no RCPT outside example.com goes to the
    backend as a command (guard_check's rule)."""
    guard = mp.SmtpRecipientGuard(guard_check, case.settings["line_limit"])
    to_backend, to_client = bytearray(), bytearray()
    for index, segment in enumerate(case.segments):
        for piece in reads(segment, mp.READ_SIZE):
            if index % 2 == 0:
                was = guard.state
                commands, replies = guard.from_client(piece)
                # From the command state, one command line at most goes on.
                if was == guard.COMMAND and re.match(rb"(?i)RCPT TO:<[^>]*@(?!example\.com>)", commands):
                    problems.append((FUZZ_BOUNDS, "a refused recipient went to the backend"))
            else:
                replies, commands = guard.from_backend(piece)
            to_backend += commands
            to_client += replies
    return FuzzTranscript([], bytes(to_backend), ("to client", bytes(to_client), guard.state))


def fuzz_drive_dns(case: FuzzCase, reads: Callable, problems: list) -> FuzzTranscript:
    """One datagram: read_dns_name at an offset, parse_dns_answer, dns_values
    and valid_host_name on what they give."""
    data, settings = case.segments[0] if case.segments else b"", case.settings
    log = []
    try:
        name, end = mp.read_dns_name(data, settings["offset"])
        log.append(("name", name, end))
        if end > len(data):
            problems.append((FUZZ_BOUNDS, "read_dns_name ends at %d, past %d bytes" % (end, len(data))))
    except mp.DnsError as error:
        log.append(("DnsError", str(error)))
    try:
        answer = mp.parse_dns_answer(data, settings["qid"], settings["name"], settings["qtype"])
    except mp.DnsError as error:
        return FuzzTranscript(log, b"", ("DnsError", str(error)))
    if answer is None:
        return FuzzTranscript(log, b"", ("not ours",))
    values, ttl = mp.dns_values(answer, settings["name"], settings["qtype"])
    checked = [mp.valid_host_name(value) for value in values if isinstance(value, str)]
    return FuzzTranscript(log, b"", ("answer", answer, values, ttl, checked))


class FuzzTarget(NamedTuple):
    """One piece under fuzz: how to make its inputs and how to feed them."""
    settings: Callable           # rng -> the settings of one case
    corpus: Callable             # (rng, settings) -> segments of a valid input
    limits: Callable             # settings -> lengths worth reaching (buffers, limits)
    drive: Callable              # (case, reads, problems) -> FuzzTranscript
    splits: bool = True          # False: one datagram, nothing to cut
    turns: Optional[Callable] = None     # case -> {segment: offsets}: where the piece
                                         # sends and waits for an answer (fuzz_ways)


def fuzz_client_target(protocol: str) -> FuzzTarget:
    def limits(settings):
        return [settings["machine"][protocol + "_client_buffer"], mp.IMAP_MAX_TAG, mp.POP3_BUFFER_NGINX]
    return FuzzTarget(lambda rng: fuzz_client_settings(rng, protocol),
                      lambda rng, settings: fuzz_client_corpus(rng, settings, protocol),
                      limits, fuzz_drive_client)


FUZZ_TARGETS = {
    "imap": fuzz_client_target("imap"),
    "pop3": fuzz_client_target("pop3"),
    "smtp": fuzz_client_target("smtp"),
    "backend-login": FuzzTarget(fuzz_backend_settings, fuzz_backend_corpus,
                                lambda settings: [settings["line_limit"]], fuzz_drive_backend,
                                turns=fuzz_backend_turns),
    "auth-http": FuzzTarget(lambda rng: {}, fuzz_auth_http_corpus,
                            lambda settings: [mp.AUTH_HTTP_RESPONSE_MAX], fuzz_drive_auth_http),
    "proxy-header": FuzzTarget(lambda rng: {}, fuzz_proxy_corpus,
                               lambda settings: [mp.PROXY_V1_MAX, mp.PROXY_V2_MAX - 16],
                               fuzz_drive_proxy),
    "dns": FuzzTarget(fuzz_dns_settings, fuzz_dns_corpus, lambda settings: [63, 64, 255, 256],
                      fuzz_drive_dns, splits=False),
    "smtp-relay-check": FuzzTarget(lambda rng: {"line_limit": rng.choice((64, 512, 4096))},
                                   fuzz_relay_check_corpus,
                                   lambda settings: [settings["line_limit"]], fuzz_drive_relay_check),
}


# -- the oracles --------------------------------------------------------------------

def fuzz_case(name: str, rng: random.Random, targets: Optional[dict] = None) -> FuzzCase:
    """The next input for target ``name``: a corpus transcript, mostly mutated."""
    target = (targets or FUZZ_TARGETS)[name]
    settings = target.settings(rng)
    segments = target.corpus(rng, settings)
    if rng.random() >= FUZZ_VALID_SHARE:
        other = target.corpus(rng, settings)
        segments = fuzz_mutated(rng, segments, other, target.limits(settings))
    return FuzzCase(name, settings, tuple(segments), rng.getrandbits(32))


def fuzz_pieces(data: bytes, limit: int) -> list:
    """``data`` in reads of at most ``limit`` bytes."""
    return [data[start:start + limit] for start in range(0, len(data), limit)]


def fuzz_random_reads(seed: int) -> Callable:
    """Reads cut at random points (then to the read limit)."""
    rng = random.Random(seed)

    def reads(segment: bytes, limit: int) -> list:
        if len(segment) < 2:
            return fuzz_pieces(segment, limit)
        count = min(len(segment) - 1, rng.randint(1, FUZZ_MAX_CUTS))
        cuts = sorted(rng.sample(range(1, len(segment)), count))
        bounds = [0] + cuts + [len(segment)]
        return [piece for start, end in zip(bounds, bounds[1:])
                for piece in fuzz_pieces(segment[start:end], limit)]
    return reads


def fuzz_turn_reads(reads: Callable, points: dict) -> Callable:
    """``reads``, with a cut at each point where the piece sent a command
    (``points``: {segment number: offsets}); segments come in order."""
    numbers = itertools.count()

    def turn_reads(segment: bytes, limit: int) -> list:
        cuts = sorted(set(points.get(next(numbers), ())) | {0, len(segment)})
        return [piece for start, end in zip(cuts, cuts[1:])
                for piece in reads(segment[start:end], limit)]
    return turn_reads


def fuzz_ways(case: FuzzCase, target: FuzzTarget) -> list:
    """(name, reads, compared): whole (as much per read as the session takes
    at once), one byte at a time, cut at random points; a datagram is read
    whole, twice.  A piece that waits for answers (BackendLogin) is read as
    a backend answers, no read crossing a point where it sent a command:
    read straight through, replies come ahead of their commands, which it
    may refuse (CVE-2011-0411), so that way is checked but not compared."""
    ways = [("whole", fuzz_pieces)]
    if not target.splits:
        return [(name, reads, True) for name, reads in ways + [("whole again", fuzz_pieces)]]
    if sum(len(segment) for segment in case.segments) <= FUZZ_BYTEWISE_MAX:
        ways.append(("bytewise", lambda segment, limit: fuzz_pieces(segment, 1)))
    ways += [("random cut %d" % (number + 1), fuzz_random_reads(case.split_seed + number))
             for number in range(FUZZ_RANDOM_SPLITS)]
    if target.turns is None:
        return [(name, reads, True) for name, reads in ways]
    points = target.turns(case)
    return [(name, fuzz_turn_reads(reads, points), True) for name, reads in ways] + [
        ("whole, replies ahead", fuzz_pieces, False)]


class FuzzTimeout(Exception):
    """An input took longer than FUZZ_INPUT_SECONDS."""


def fuzz_check(case: FuzzCase, targets: Optional[dict] = None) -> Optional[FuzzFailure]:
    """Every oracle on ``case``: None if it passes, else the first failure.
    A hang is an exception (SIGALRM, where there is one and in the main
    thread), so a loop in a parser cannot stall the run."""
    timed = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not timed:
        return fuzz_oracles(case, targets)

    def expire(number, frame):
        raise FuzzTimeout("over %.0f s" % FUZZ_INPUT_SECONDS)
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, FUZZ_INPUT_SECONDS)
    try:
        return fuzz_oracles(case, targets)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def fuzz_oracles(case: FuzzCase, targets: Optional[dict] = None) -> Optional[FuzzFailure]:
    target = (targets or FUZZ_TARGETS)[case.target]
    transcripts = []
    for name, reads, compared in fuzz_ways(case, target):
        problems = []
        try:
            transcript = target.drive(case, reads, problems)
            if compared:
                transcripts.append((name, transcript))
        except Exception as error:         # oracle 1: drivers catch the documented ones
            where = fuzz_where(error)
            return FuzzFailure(case, "exception", "%s read: %s: %s at %s" % (
                name, type(error).__name__, error, where), "%s at %s" % (type(error).__name__, where))
        if problems:
            oracle, what = problems[0]
            return FuzzFailure(case, oracle, "%s read: %s" % (name, what), what.split(" ")[0])
    first_name, first = transcripts[0]
    for name, transcript in transcripts[1:]:
        if transcript != first:
            field = next(field for field in FuzzTranscript._fields
                         if getattr(transcript, field) != getattr(first, field))
            detail = "%s differs, %s read: %s; %s read: %s" % (
                field, first_name, fuzz_short(getattr(first, field)), name,
                fuzz_short(getattr(transcript, field)))
            return FuzzFailure(case, "split independence", detail, field)
    return None


def fuzz_where(error: Exception) -> str:
    """The innermost line of mailproxy.py the exception passed through."""
    frames = traceback.extract_tb(error.__traceback__)
    inside = [frame for frame in frames if frame.filename.endswith("mailproxy.py")
              and not frame.filename.endswith("test_mailproxy.py")] or frames
    return "%s:%d (%s)" % (os.path.basename(inside[-1].filename), inside[-1].lineno, inside[-1].name)


def fuzz_short(value, width: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


# -- shrinking: a smaller input that fails the same way -----------------------------

def fuzz_shrink(failure: FuzzFailure, targets: Optional[dict] = None,
                checks: int = FUZZ_SHRINK_CHECKS) -> FuzzFailure:
    """Delta debugging, simply: drop segments, then ever shorter byte ranges,
    then settings back to their defaults, keeping each change after which
    the case still fails with the same signature."""
    budget = [checks]

    def still(case: FuzzCase) -> Optional[FuzzFailure]:
        if budget[0] <= 0:
            return None
        budget[0] -= 1
        found = fuzz_check(case, targets)
        if found is None or (found.oracle, found.signature) != (failure.oracle, failure.signature):
            return None
        return found

    best = failure
    for index in reversed(range(len(best.case.segments))):
        segments = best.case.segments[:index] + best.case.segments[index + 1:]
        best = still(best.case._replace(segments=segments)) or best
    for index in range(len(best.case.segments)):
        best = fuzz_shrink_segment(best, index, still)
    return fuzz_shrink_settings(best, still)


def fuzz_shrink_segment(best: FuzzFailure, index: int, still: Callable) -> FuzzFailure:
    size = max(1, len(best.case.segments[index]) // 2)
    while size >= 1:
        start = 0
        while start < len(best.case.segments[index]):
            segments = list(best.case.segments)
            segments[index] = segments[index][:start] + segments[index][start + size:]
            found = still(best.case._replace(segments=tuple(segments)))
            if found is not None:
                best = found
            else:
                start += size
        size //= 2
    return best


def fuzz_shrink_settings(best: FuzzFailure, still: Callable) -> FuzzFailure:
    """Client machines: each override back to its default, the fake session
    back to refusing every login without closing, no TLS."""
    settings = best.case.settings
    if "machine" not in settings:
        return best
    for key in list(settings["machine"]):
        machine = {name: value for name, value in best.case.settings["machine"].items() if name != key}
        trial = dict(best.case.settings, machine=machine)
        best = still(best.case._replace(settings=trial)) or best
    for key, plain in (("accept", None), ("close", None), ("tls", False)):
        if best.case.settings[key] != plain:
            trial = dict(best.case.settings, **{key: plain})
            best = still(best.case._replace(settings=trial)) or best
    return best


# -- running ------------------------------------------------------------------------

class FuzzStats(NamedTuple):
    target: str
    inputs: int                  # inputs checked
    seconds: float
    failures: list               # (input number, FuzzFailure)
    digest: str                  # of every input made: equal for equal seeds
    slowest: tuple = (0.0, -1)   # (seconds, input number) of the slowest check


def fuzz_inputs(name: str, count: int, seed: int, targets: Optional[dict] = None):
    """The first ``count`` cases of target ``name`` under ``seed``."""
    rng = random.Random("%s:%s" % (seed, name))
    for _ in range(count):
        yield fuzz_case(name, rng, targets)


def fuzz_target(name: str, count: int, seed: int, targets: Optional[dict] = None,
                skip: tuple = ()) -> FuzzStats:
    """``count`` inputs for target ``name`` from ``seed``, every oracle on
    each but those numbered in ``skip`` (made, so the others stay the same)."""
    digest, failures, slowest = hashlib.sha256(), [], (0.0, -1)
    started = time.perf_counter()
    for number, case in enumerate(fuzz_inputs(name, count, seed, targets)):
        digest.update(repr(case).encode())
        if number in skip:
            continue
        checked = time.perf_counter()
        failure = fuzz_check(case, targets)
        slowest = max(slowest, (time.perf_counter() - checked, number))
        if failure is not None:
            failures.append((number, failure))
    checked = count - len([number for number in skip if number < count])
    return FuzzStats(name, checked, time.perf_counter() - started, failures,
                     digest.hexdigest()[:16], slowest)


def fuzz_reproducible(name: str, seed: int, targets: Optional[dict] = None) -> bool:
    """Oracle 4: the same seed makes the same inputs."""
    first, second = (list(fuzz_inputs(name, FUZZ_REPRODUCIBLE_SAMPLE, seed, targets)) for _ in range(2))
    return first == second


def fuzz_report(seed: int, stats: FuzzStats, shrink: bool = True) -> str:
    """The failures of one target, grouped by signature: for each, how many,
    the first as found, and (``shrink``) a shrunk reproducer."""
    groups = {}
    for number, failure in stats.failures:
        groups.setdefault((failure.oracle, failure.signature), []).append((number, failure))
    lines = []
    for (oracle, signature), found in groups.items():
        number, failure = found[0]
        lines += ["FAIL %s: %s [%s], %d input(s), first: seed %d, input #%d"
                  % (stats.target, oracle, signature, len(found), seed, number),
                  "  " + failure.detail,
                  "  input: fuzz_check(%r)" % (failure.case,)]
        if shrink:
            small = fuzz_shrink(failure)
            lines += ["  shrunk: " + small.detail, "  reproducer: fuzz_check(%r)" % (small.case,)]
    return "\n".join(lines)


FUZZ_USAGE = "usage: test_mailproxy.py --fuzz N [--seed S] [TARGET...]; targets: "


def fuzz_arguments(argv: List[str]) -> Optional[tuple]:
    """--fuzz N [--seed S] [TARGET...] -> (N, S, target names), or None if
    they make no sense.  A TARGET picks the targets whose name contains it."""
    values, names = {}, []
    arguments = iter(argv)
    for argument in arguments:
        if argument in ("--fuzz", "--seed"):
            value = next(arguments, "")
            if not value.isdigit():
                return None
            values[argument] = int(value)
        elif not argument.startswith("-"):
            names.append(argument)
    chosen = [name for name in FUZZ_TARGETS if not names or any(part in name for part in names)]
    if not chosen:
        return None
    return values["--fuzz"], values.get("--seed", FUZZ_SEED), chosen


def run_fuzz(argv: List[str]) -> int:
    """python3 test_mailproxy.py --fuzz N [--seed S] [TARGET...]: N inputs
    per target; per target the count, inputs per second and failures (each
    distinct one shrunk, with a reproducer); exit 1 on any failure."""
    arguments = fuzz_arguments(argv)
    if arguments is None:
        print(FUZZ_USAGE + " ".join(FUZZ_TARGETS), file=sys.stderr)
        return 2
    count, seed, names = arguments
    print("fuzz: seed %d, %d inputs per target, targets: %s" % (seed, count, " ".join(names)))
    print("%-14s %9s %9s %10s %9s %9s  %s" % ("target", "inputs", "seconds", "inputs/s", "failures",
                                               "slowest", "inputs digest"))
    total, failed, reports = 0, 0, []
    started = time.perf_counter()
    for name in names:
        if not fuzz_reproducible(name, seed):
            reports.append("FAIL %s: reproducible: the same seed made different inputs" % name)
            failed += 1
        stats = fuzz_target(name, count, seed)
        total, failed = total + stats.inputs, failed + len(stats.failures)
        print("%-14s %9d %9.1f %10.0f %9d %8.3fs  %s" % (
            name, stats.inputs, stats.seconds, stats.inputs / max(stats.seconds, 1e-9),
            len(stats.failures), stats.slowest[0], stats.digest), flush=True)
        if stats.failures:
            reports.append(fuzz_report(seed, stats))
    seconds = time.perf_counter() - started
    for report in reports:
        print(report)
    print("fuzz: %d inputs in %.1f s (%.0f inputs/s), %d failed, seed %d"
          % (total, seconds, total / max(seconds, 1e-9), failed, seed))
    return 1 if failed else 0


# Smoke inputs (numbers under FUZZ_SEED) that show a bug this fuzzer found
# and that is not fixed yet: the smoke run leaves them out.  When a fix makes
# them pass, test_known_bugs_still_show fails: delete the entry.  (Empty:
# the bugs found so far are fixed; FuzzFoundRegressionTests keeps them.)
FUZZ_KNOWN_BUGS = {}


class FuzzSmokeTests(unittest.TestCase):
    """A short fuzz run in the default suite (the fixed seed, a few hundred
    inputs per target), and the harness's own checks."""

    def test_every_target_passes_every_oracle(self):
        for name in FUZZ_TARGETS:
            with self.subTest(target=name):
                stats = fuzz_target(name, FUZZ_SMOKE_INPUTS, FUZZ_SEED,
                                    skip=FUZZ_KNOWN_BUGS.get(name, ()))
                self.assertEqual(stats.failures, [], "\n" + fuzz_report(FUZZ_SEED, stats, shrink=False))

    def test_known_bugs_still_show(self):
        for name, numbers in FUZZ_KNOWN_BUGS.items():
            cases = list(fuzz_inputs(name, max(numbers) + 1, FUZZ_SEED))
            for number in numbers:
                self.assertIsNotNone(fuzz_check(cases[number]), "%s input #%d passes now: take it "
                                     "off FUZZ_KNOWN_BUGS" % (name, number))

    def test_the_same_seed_makes_the_same_inputs(self):
        for name in FUZZ_TARGETS:
            self.assertTrue(fuzz_reproducible(name, FUZZ_SEED), name)
        self.assertNotEqual(fuzz_target("pop3", 5, 1).digest, fuzz_target("pop3", 5, 2).digest)

    def test_a_printed_case_replays(self):
        case = fuzz_case("imap", random.Random(1))
        self.assertEqual(eval(repr(case)), case)
        self.assertIsNone(fuzz_check(eval(repr(case))))

    def test_the_oracles_catch_planted_bugs(self):
        def cut_dependent(case, reads, problems):
            return FuzzTranscript([], b"%d" % len(reads(case.segments[0], 64)), ())

        def crashing(case, reads, problems):
            if b"\0" in case.segments[0]:
                raise KeyError("planted")
            return FuzzTranscript([], b"", ())

        def hoarding(case, reads, problems):
            problems.append((FUZZ_BOUNDS, "holds too much"))
            return FuzzTranscript([], b"", ())

        def hanging(case, reads, problems):
            while True:
                pass
        case = FuzzCase("planted", {}, (b"a1 NOOP\r\n\0a2 NOOP\r\n",), 1)
        planted = [(cut_dependent, "split independence"), (crashing, "exception"),
                   (hoarding, FUZZ_BOUNDS)]
        if hasattr(signal, "setitimer"):
            planted.append((hanging, "exception"))
        for drive, oracle in planted:
            targets = {"planted": FUZZ_TARGETS["pop3"]._replace(drive=drive)}
            with unittest.mock.patch.object(sys.modules[__name__], "FUZZ_INPUT_SECONDS", 0.05):
                self.assertEqual(fuzz_check(case, targets).oracle, oracle, drive.__name__)
        targets = {"planted": FUZZ_TARGETS["pop3"]._replace(drive=crashing)}
        shrunk = fuzz_shrink(fuzz_check(case, targets), targets)
        self.assertEqual(shrunk.case.segments, (b"\0",))


class FuzzFoundRegressionTests(unittest.TestCase):
    """Bugs the fuzzer found, fixed: one minimal reproducer each.  (A bug
    found and not fixed yet gets @unittest.expectedFailure here and its
    smoke inputs in FUZZ_KNOWN_BUGS.)"""

    def same_answer_whatever_the_reads(self, line: bytes, *reads, **settings) -> None:
        """``line`` fed one byte at a time, in reads of the buffer's size,
        and in the given pieces: the same events and replies each time (but
        for "+ OK", sent only while a synchronizing literal's data is due)."""
        outcomes = set()
        buffer = settings.get("imap_client_buffer", mp.PAGE_SIZE)
        for pieces in (byte_by_byte(line), fuzz_pieces(line, buffer)) + reads:
            machine = make_machine("imap", **settings)
            events = []
            for data in pieces:
                if not machine.finished:
                    events += machine.receive_data(data)
            outcomes.add((repr(events), machine.data_to_send().replace(mp.IMAP_NEXT, b"")))
        self.assertEqual(len(outcomes), 1, outcomes)

    def test_words_and_strings_cut_across_reads(self):
        """The first resumable scanner lost its place inside an argument."""
        self.same_answer_whatever_the_reads(
            b"a1 LOGIN alice secret\r\n", [b"a1 LOGIN a", b"lice secret\r\n"])
        self.same_answer_whatever_the_reads(
            b'a1 ID ("a" "b")\r\n', [b'a1 ID ("a" "b', b'")\r\n'])
        self.same_answer_whatever_the_reads(
            b'a1 LOGIN "al\\"ice" x\r\n', [b'a1 LOGIN "al\\', b'"ice" x\r\n'])
        self.same_answer_whatever_the_reads(
            b"1 LOGIN {7}\njurgen\t }\n", [b"1 LOGIN {7", b"}\njurgen\t }\n"])
        self.same_answer_whatever_the_reads(b"1 NOOP \rN", [b"1 NOOP \r", b"N"])

    def test_imap_invalid_line_verdict_does_not_depend_on_the_reads(self):
        line = b'a1 LOGIN "x"y' + b"z" * 63 + b"\r\na2 NOOP\r\n"
        self.same_answer_whatever_the_reads(line, [line[:12], line[12:76], line[76:]],
                                            imap_client_buffer=64)


# ========================================================================== #
# ####                            Benchmark                             #### #
# ========================================================================== #
# Sizes a host without nginx: the real program (mailproxy.py -c FILE) as a
# subprocess, one IMAP server on loopback, and in ONE forked child (so its
# CPU is not the load generator's) a fake IMAP backend and a fake auth_http
# server.  The load generator is this process: non-blocking sockets, one
# selectors loop.  The proxy's CPU is read from /proc (master + workers).
# The fake backend is the benchmark's own, not the harness's FakeImapBackend:
# that one spends a thread per connection and reads line by line, so at a
# thousand idle sessions, thousands of logins a second and 16 MiB FETCHes it
# would set the pace, and the table would measure the fake, not mailproxy.

BENCH_WARMUP = 1.0                   # s of logins before the logins are counted
BENCH_SECONDS = 5.0                  # s of logins that are counted
BENCH_CONCURRENCY = 32               # sessions logging in at once (logins, idle)
BENCH_FETCH_SIZE = 16 * 1024 * 1024  # bytes of the literal each FETCH returns
BENCH_RELAY_TOTAL = 128 * 1024 * 1024          # bytes relayed by one session
BENCH_RELAY_SESSIONS = 4                       # parallel sessions of the 2nd relay run
BENCH_RELAY_TOTAL_PARALLEL = 256 * 1024 * 1024  # bytes relayed by them together
BENCH_IDLE_SESSIONS = 1000           # logged-in sessions held open
BENCH_LATENCY_WARMUP = 200           # NOOPs not measured
BENCH_LATENCY_ROUNDS = 2000          # NOOPs measured, one at a time
BENCH_SETTLE = 0.5                   # s of quiet between workloads
BENCH_TIMEOUT = 120.0                # s a workload may take before it fails
BENCH_MAX_ERRORS = 20                # failed sessions before a workload gives up
BENCH_USER = b"bench"
BENCH_PASSWORD = b"secret"
# Issue 14's measurement: how long one session's pre-login NOOP waits while
# other sessions' wrong passwords are being checked against [users].
BENCH_STALL_LOGINS = 40              # wrong logins in flight at once
BENCH_STALL_WARMUP = 0.5             # s before the NOOPs are counted
BENCH_STALL_SECONDS = 3.0            # s of NOOPs that are counted
BENCH_STALL_SCHEMES = ("PBKDF2-SHA256", "SHA512-CRYPT")   # as --hash-password makes them


class BenchmarkFailure(Exception):
    """A workload saw something it did not expect."""


def micro_unit() -> str:
    """The micro sign if stdout can print it."""
    try:
        "\u00b5".encode(sys.stdout.encoding or "ascii")
        return "\u00b5s"
    except (UnicodeError, LookupError):
        return "us"


# -- the proxy's processes, from /proc ----------------------------------------------

def have_proc() -> bool:
    return os.path.exists("/proc/self/stat")


def process_family(root: int) -> list:
    """``root`` and its descendants (found by ppid), or [] without /proc."""
    if not have_proc():
        return []
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = process_stat(int(name))
            if stat is not None:
                children.setdefault(stat.ppid, []).append(int(name))
    family, todo = [], [root]
    while todo:
        pid = todo.pop()
        family.append(pid)
        todo.extend(children.get(pid, ()))
    return family


def cpu_of(pids):
    """Seconds of CPU (user + system) of ``pids``; None without /proc."""
    if not pids:
        return None
    ticks = 0
    for pid in pids:
        stat = process_stat(pid)
        if stat is not None:
            ticks += stat.cpu_ticks
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_of(pids):
    """Bytes of VmRSS of ``pids`` together; None without /proc."""
    if not pids:
        return None
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class CpuMeter:
    """Wall time and CPU (proxy, backend child, this process) over an interval."""

    def __init__(self, proxy_pid: int, backend_pid: int):
        self.proxy_pid = proxy_pid
        self.backend_pid = backend_pid

    def sample(self):
        own = os.times()
        return (time.perf_counter(), cpu_of(process_family(self.proxy_pid)),
                cpu_of([self.backend_pid] if have_proc() else []),
                own.user + own.system)

    @staticmethod
    def delta(start, end):
        """(wall s, proxy CPU s or None, backend CPU s or None, load generator CPU s)."""
        def minus(a, b):
            return None if a is None or b is None else a - b
        return (end[0] - start[0], minus(end[1], start[1]), minus(end[2], start[2]),
                end[3] - start[3])


# -- the forked child: fake IMAP backend and auth_http server -----------------------

class BenchmarkPeer:
    """One connection the backend child serves."""
    __slots__ = ("sock", "kind", "inbuf", "out", "events", "literal", "first", "closing")

    def __init__(self, sock, kind):
        self.sock = sock
        self.kind = kind
        self.inbuf = bytearray()
        self.out = []              # memoryviews / bytes still to send
        self.events = 0
        self.literal = 0           # bytes of a literal still to skip
        self.first = None          # the first line of a command with literals
        self.closing = False


def serve_benchmark_backend(imap_listener, auth_listener) -> None:
    """The child's event loop.  IMAP: greeting, LOGIN with literals (each
    ``{n}`` answered ``+ OK``), NOOP, FETCH (a BENCH_FETCH_SIZE literal from
    one preallocated buffer), LOGOUT.  HTTP: every GET gets Auth-Status OK
    pointing at the IMAP backend, then the connection is closed."""
    payload = memoryview(bytes(BENCH_FETCH_SIZE))
    fetch_head = b"* 1 FETCH (BODY[] {%d}\r\n" % BENCH_FETCH_SIZE
    auth_reply = (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n"
                  b"Auth-Port: %d\r\n\r\n" % imap_listener.getsockname()[1])
    selector = selectors.DefaultSelector()
    for listener, kind in ((imap_listener, "imap"), (auth_listener, "auth")):
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, kind)
    parent = os.getppid()

    def watch(peer):
        wanted = ((0 if peer.closing else selectors.EVENT_READ) |
                  (selectors.EVENT_WRITE if peer.out else 0))
        if wanted != peer.events:
            selector.modify(peer.sock, wanted, peer)
            peer.events = wanted

    def close(peer):
        selector.unregister(peer.sock)
        peer.sock.close()
        peer.out = []

    def flush(peer):
        out = peer.out
        try:
            while out:
                sent = peer.sock.send(out[0])
                if sent < len(out[0]):
                    out[0] = memoryview(out[0])[sent:]
                    break
                del out[0]
        except BlockingIOError:
            pass
        except OSError:
            close(peer)
            return
        if not out and peer.closing:
            close(peer)
        else:
            watch(peer)

    def imap_input(peer):
        buf = peer.inbuf
        while True:
            if peer.literal:
                taken = min(peer.literal, len(buf))
                del buf[:taken]
                peer.literal -= taken
                if peer.literal:
                    return
            end = buf.find(b"\n")
            if end < 0:
                return
            line = bytes(buf[:end + 1])
            del buf[:end + 1]
            if line.endswith(b"}\r\n") and b"{" in line:
                peer.first = peer.first or line
                peer.literal = int(line[line.rindex(b"{") + 1:-3])
                peer.out.append(b"+ OK\r\n")
                continue
            command = peer.first or line
            peer.first = None
            tag, _, rest = command.rstrip(b"\r\n").partition(b" ")
            verb = rest.split(b" ", 1)[0].upper()
            if verb in (b"LOGIN", b"NOOP"):
                peer.out.append(tag + b" OK done\r\n")
            elif verb == b"FETCH":
                peer.out += [fetch_head, payload, b")\r\n" + tag + b" OK done\r\n"]
            elif verb == b"LOGOUT":
                peer.out.append(b"* BYE bench\r\n" + tag + b" OK done\r\n")
                peer.closing = True
                return
            else:
                peer.out.append(tag + b" BAD unknown command\r\n")

    while True:
        events = selector.select(1.0)
        if not events and os.getppid() != parent:
            return                                     # the benchmark is gone
        for key, mask in events:
            if key.data in ("imap", "auth"):
                while True:
                    try:
                        sock, _ = key.fileobj.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break                          # EMFILE and the like: retry later
                    sock.setblocking(False)
                    peer = BenchmarkPeer(sock, key.data)
                    selector.register(sock, selectors.EVENT_READ, peer)
                    peer.events = selectors.EVENT_READ
                    if key.data == "imap":
                        peer.out.append(b"* OK bench\r\n")
                        flush(peer)
                continue
            peer = key.data
            if peer.sock.fileno() < 0:
                continue                               # closed by an earlier event
            if mask & selectors.EVENT_READ and not peer.closing:
                try:
                    data = peer.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    close(peer)
                    continue
                if data:
                    peer.inbuf += data
                    if peer.kind == "imap":
                        imap_input(peer)
                    elif b"\r\n\r\n" in peer.inbuf:
                        peer.out.append(auth_reply)
                        peer.closing = True
            if peer.out or peer.closing:
                flush(peer)


def start_benchmark_backend():
    """Fork the backend child: (pid, IMAP port, auth port)."""
    listeners = []
    for _ in range(2):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        listeners.append(listener)
    ports = [listener.getsockname()[1] for listener in listeners]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:                                       # the child never returns
        status = 0
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            serve_benchmark_backend(*listeners)
        except BaseException:
            import traceback
            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)
    for listener in listeners:
        listener.close()
    return pid, ports[0], ports[1]


def stop_benchmark_backend(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# -- mailproxy itself ---------------------------------------------------------------

def start_benchmark_proxy(directory: str, auth_port: int):
    """mailproxy.py -c FILE in its own process group: (Popen, IMAP port)."""
    port = free_port()
    config = os.path.join(directory, "mailproxy.conf")
    with open(config, "w") as handle:
        handle.write("[main]\nworker_processes = 1\nworker_connections = 10240\n"
                     "error_log = %s warn\n\n"
                     "[mail]\nauth_http = 127.0.0.1:%d/auth\nproxy_buffer = 16k\n\n"
                     "[server imap]\nlisten = 127.0.0.1:%d\nprotocol = imap\n"
                     % (os.path.join(directory, "error.log"), auth_port, port))
    output = open(os.path.join(directory, "output.log"), "wb")
    try:
        proc = subprocess.Popen([sys.executable, MAILPROXY, "-c", config],
                                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                start_new_session=True)
    finally:
        output.close()
    return proc, port


def stop_benchmark_proxy(proc) -> None:
    """SIGTERM to the master (as the README says signals go), then SIGKILL to
    its whole process group, whatever is left of it.  (SIGTERM to the group
    at once races the master's SIGCHLD handling: it may log an alert and
    start a new worker while it stops.)"""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def blocking_session(port: int, timeout: float = 2.0):
    """A logged-in blocking socket and its reader (for the latency run)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    reader = sock.makefile("rb")
    try:
        greeting = reader.readline()
        if not greeting.startswith(b"* OK"):
            raise BenchmarkFailure("greeting %r" % greeting)
        sock.sendall(b"a LOGIN " + BENCH_USER + b" " + BENCH_PASSWORD + b"\r\n")
        reply = reader.readline()
        if reply != b"a OK done\r\n":
            raise BenchmarkFailure("LOGIN answered %r" % reply)
    except BaseException:
        reader.close()
        sock.close()
        raise
    return sock, reader


def wait_until_serving(proc, port: int, log_path: str) -> None:
    """Until one whole session works through the proxy (10 s at most)."""
    deadline = time.monotonic() + 10
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchmarkFailure("mailproxy exited with status %s at start; its output:\n%s"
                                % (proc.returncode, file_tail(os.path.join(
                                    os.path.dirname(log_path), "output.log"))))
        try:
            sock, reader = blocking_session(port)
            with sock, reader:
                sock.sendall(b"b LOGOUT\r\n")
                if not reader.readline().startswith(b"* BYE"):
                    raise BenchmarkFailure("no BYE after LOGOUT")
            return
        except OSError as error:
            last = error
            time.sleep(0.1)
    raise BenchmarkFailure("mailproxy did not serve a session within 10 s (%s)" % last)


def file_tail(path: str, lines: int = 10) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no %s)" % path


# -- the load generator: one selectors loop, one generator per session --------------
# A session is a generator that yields requests and gets answers back:
#   ("connect",)     open a new connection to the proxy        -> None
#   ("connect", ip)  the same, from that local address (127.x.y.z on Linux)
#   ("send", bytes)  queue bytes (sent as the socket allows)   -> None
#   ("line",)        the next line, CRLF included              -> bytes
#   ("skip", n)      read and drop n bytes                     -> None
#   ("close",)       close the connection                      -> None
# The proxy closing the connection, or a socket error, is thrown into it.
# A generator that returns leaves its connection open (idle sessions).

class LoadConnection:
    __slots__ = ("sock", "gen", "want", "need", "buf", "out", "events")

    def __init__(self, gen=None, sock=None):
        self.sock = sock
        self.gen = gen
        self.want = None
        self.need = 0
        self.buf = bytearray()
        self.out = bytearray()
        self.events = 0


class LoadLoop:
    def __init__(self, port: int):
        self.address = ("127.0.0.1", port)
        self.selector = selectors.DefaultSelector()
        self.scratch = bytearray(1 << 20)
        self.view = memoryview(self.scratch)
        self.queue = []            # (generator, connection or None) not started yet
        self.limit = None          # at most this many started and not finished
        self.active = set()
        self.kept = []             # finished, connection still open
        self.failures = []         # exceptions of generators that failed

    def add(self, gen, conn=None) -> None:
        self.queue.append((gen, conn))

    def run(self, until: float) -> bool:
        """Serve until every session ended (True) or ``until`` (False)."""
        self._start_queued()
        while self.active or self.queue:
            left = until - time.perf_counter()
            if left <= 0:
                return False
            for key, mask in self.selector.select(min(left, 1.0)):
                conn = key.data
                if conn.gen is None or key.fileobj is not conn.sock:
                    continue                   # finished, or an event of a closed socket
                if mask & selectors.EVENT_WRITE:
                    if conn.want == "connect":
                        error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        conn.want = None
                        self._advance(conn, None, OSError(error, os.strerror(error)) if error else None)
                        continue
                    if conn.out:
                        self._flush(conn)
                if mask & selectors.EVENT_READ and conn.gen is not None and key.fileobj is conn.sock:
                    self._readable(conn)
            self._start_queued()
        return True

    def _start_queued(self) -> None:
        while self.queue and (self.limit is None or len(self.active) < self.limit):
            gen, conn = self.queue.pop(0)
            conn = conn or LoadConnection()
            conn.gen = gen
            self.active.add(conn)
            self._advance(conn)

    def _readable(self, conn) -> None:
        try:
            count = conn.sock.recv_into(self.scratch)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._advance(conn, None, error)
            return
        if count == 0:
            self._advance(conn, None, BenchmarkFailure("the proxy closed the connection"))
            return
        if conn.want == "skip" and not conn.buf:
            taken = min(conn.need, count)
            conn.need -= taken
            if taken < count:
                conn.buf += self.view[taken:count]
            if conn.need == 0:
                conn.want = None
                self._advance(conn)
            return
        conn.buf += self.view[:count]
        if conn.want == "line":
            end = conn.buf.find(b"\n")
            if end >= 0:
                line = bytes(conn.buf[:end + 1])
                del conn.buf[:end + 1]
                conn.want = None
                self._advance(conn, line)
        elif conn.want == "skip":
            taken = min(conn.need, len(conn.buf))
            del conn.buf[:taken]
            conn.need -= taken
            if conn.need == 0:
                conn.want = None
                self._advance(conn)

    def _watch(self, conn, events) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self.selector.register(conn.sock, events, conn)
        elif events == 0:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn) -> None:
        if conn.sock is not None:
            self._watch(conn, 0)
            conn.sock.close()
            conn.sock = None
        conn.buf = bytearray()
        conn.out = bytearray()

    def _send(self, conn) -> Optional[OSError]:
        """Send what the socket takes of ``conn.out``; the error, if any."""
        try:
            sent = conn.sock.send(conn.out)
            del conn.out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as error:
            return error
        return None

    def _flush(self, conn) -> None:
        error = self._send(conn)
        if error is not None:
            self._advance(conn, None, error)
            return
        self._watch(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0))

    def _advance(self, conn, value=None, error=None) -> None:
        """Resume the session until it waits for the network."""
        while True:
            try:
                request = conn.gen.throw(error) if error is not None else conn.gen.send(value)
            except StopIteration:
                self._finish(conn, None)
                return
            except Exception as failure:
                self._finish(conn, failure)
                return
            value = error = None
            kind = request[0]
            if kind == "line":
                end = conn.buf.find(b"\n")
                if end >= 0:
                    value = bytes(conn.buf[:end + 1])
                    del conn.buf[:end + 1]
                    continue
                conn.want = "line"
                self._watch(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0))
                return
            if kind == "send":
                conn.out += request[1]
                error = self._send(conn)
            elif kind == "skip":
                taken = min(request[1], len(conn.buf))
                del conn.buf[:taken]
                if taken < request[1]:
                    conn.want, conn.need = "skip", request[1] - taken
                    self._watch(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0))
                    return
            elif kind == "connect":
                self._close(conn)
                conn.sock = socket.socket()
                conn.sock.setblocking(False)
                if len(request) > 1:
                    try:
                        conn.sock.bind((request[1], 0))
                    except OSError as failure:
                        error = failure
                        continue
                status = conn.sock.connect_ex(self.address)
                if status not in (0, errno.EINPROGRESS, errno.EAGAIN):
                    error = OSError(status, os.strerror(status))
                    continue
                conn.want = "connect"
                self._watch(conn, selectors.EVENT_WRITE)
                return
            elif kind == "close":
                self._close(conn)
            else:
                error = BenchmarkFailure("unknown request %r" % (request,))

    def _finish(self, conn, failure) -> None:
        self.active.discard(conn)
        conn.gen = None
        conn.want = None
        if failure is not None:
            self.failures.append(failure)
            self._close(conn)
        elif conn.sock is not None:
            self._watch(conn, 0)
            self.kept.append(conn)

    def close_all(self) -> None:
        for conn in list(self.active) + self.kept:
            if conn.gen is not None:
                conn.gen.close()
                conn.gen = None
            self._close(conn)
        self.active.clear()
        self.kept = []
        self.queue = []
        self.selector.close()


def check_line(line: bytes, wanted: bytes, what: str, prefix: bool = False) -> None:
    if not (line.startswith(wanted) if prefix else line == wanted):
        raise BenchmarkFailure("%s: expected %r, got %r" % (what, wanted, line))


def login_steps():
    """Connect, greeting, LOGIN; the connection stays open."""
    yield ("connect",)
    check_line((yield ("line",)), b"* OK", "greeting", prefix=True)
    yield ("send", b"a LOGIN " + BENCH_USER + b" " + BENCH_PASSWORD + b"\r\n")
    check_line((yield ("line",)), b"a OK done\r\n", "LOGIN")


def login_slot_steps(stats: dict):
    """Full sessions back to back until stats["stop"]; failures are counted."""
    while not stats["stop"]:
        try:
            yield from login_steps()
            yield ("send", b"b LOGOUT\r\n")
            check_line((yield ("line",)), b"* BYE", "LOGOUT", prefix=True)
            check_line((yield ("line",)), b"b OK done\r\n", "LOGOUT")
            yield ("close",)
            stats["sessions"] += 1
        except Exception as failure:
            stats["errors"].append(failure)
            if len(stats["errors"]) >= BENCH_MAX_ERRORS:
                raise BenchmarkFailure("%d failed sessions" % len(stats["errors"]))
            yield ("close",)


def fetch_steps(times: int, stats: dict):
    """FETCH the backend's literal ``times`` times on a logged-in session."""
    head = b"* 1 FETCH (BODY[] {%d}\r\n" % BENCH_FETCH_SIZE
    for _ in range(times):
        yield ("send", b"f FETCH 1 BODY[]\r\n")
        check_line((yield ("line",)), head, "FETCH")
        yield ("skip", BENCH_FETCH_SIZE)
        check_line((yield ("line",)), b")\r\n", "end of FETCH")
        check_line((yield ("line",)), b"f OK done\r\n", "FETCH")
        stats["bytes"] += BENCH_FETCH_SIZE


def noop_steps(stats: dict):
    yield ("send", b"n NOOP\r\n")
    line = yield ("line",)
    check_line(line, b"n OK", "NOOP", prefix=True)
    stats["ok"] += 1


def failure_lines(loop, what: str, extra=()) -> list:
    """Lines that say why a workload failed ([] if it did not)."""
    found = list(extra) + loop.failures
    if not found:
        return []
    lines = ["%s: %d failure(s)" % (what, len(found))]
    for failure in found[:5]:
        lines.append("    %s: %s" % (type(failure).__name__, failure))
    return lines


# -- the workloads ------------------------------------------------------------------
# Each returns (row, problems): row = (workload, result, proxy CPU, note).

def cpu_text(seconds) -> str:
    return "n/a" if seconds is None else "%.2f s" % seconds


def busy_note(delta) -> str:
    """Who used how much of a core: near 100% for the load generator or the
    backend means they, not mailproxy, set the pace."""
    wall, proxy, backend, own = delta
    if wall <= 0:
        return ""
    shares = [("proxy", proxy), ("load gen", own), ("backend", backend)]
    return "CPU: " + ", ".join("%s %s" % (name, "n/a" if used is None else "%d%%" % (100 * used / wall))
                               for name, used in shares)


def measure_logins(port: int, meter) -> tuple:
    micro = micro_unit()
    loop = LoadLoop(port)
    stats = {"stop": False, "sessions": 0, "errors": []}
    try:
        for _ in range(BENCH_CONCURRENCY):
            loop.add(login_slot_steps(stats))
        now = time.perf_counter()
        loop.run(now + BENCH_WARMUP)
        before, counted = meter.sample(), stats["sessions"]
        loop.run(before[0] + BENCH_SECONDS)
        after, counted = meter.sample(), stats["sessions"] - counted
        stats["stop"] = True
        drained = loop.run(time.perf_counter() + 10)
    finally:
        loop.close_all()
    delta = CpuMeter.delta(before, after)
    rate = counted / delta[0]
    per = "n/a" if delta[1] is None or not counted else "%.0f %s/session" % (1e6 * delta[1] / counted, micro)
    problems = failure_lines(loop, "logins", stats["errors"])
    if not drained:
        problems.append("logins: sessions still unfinished 10 s after the end")
    if not counted:
        problems.append("logins: no session completed")
    row = ("logins, %d at once, %g s" % (BENCH_CONCURRENCY, BENCH_SECONDS),
           "%.0f sessions/s" % rate, "%s (%s)" % (per, cpu_text(delta[1])),
           busy_note(delta))
    return row, problems


def measure_relay(port: int, meter, sessions: int, total: int) -> tuple:
    loop = LoadLoop(port)
    stats = {"bytes": 0}
    problems = []
    times = max(1, total // (BENCH_FETCH_SIZE * sessions))
    try:
        for _ in range(sessions):
            loop.add(login_steps())
        if not loop.run(time.perf_counter() + 10):
            problems.append("relay: logins did not finish in 10 s")
        if loop.failures or len(loop.kept) != sessions:
            problems += failure_lines(loop, "relay logins") or [
                "relay: %d of %d sessions logged in" % (len(loop.kept), sessions)]
            return None, problems
        conns, loop.kept = loop.kept, []
        before = meter.sample()
        for conn in conns:
            loop.add(fetch_steps(times, stats), conn)
        done = loop.run(before[0] + BENCH_TIMEOUT)
        after = meter.sample()
    finally:
        loop.close_all()
    delta = CpuMeter.delta(before, after)
    problems += failure_lines(loop, "relay")
    if not done:
        problems.append("relay: not done after %g s (%d of %d bytes)"
                        % (BENCH_TIMEOUT, stats["bytes"], times * sessions * BENCH_FETCH_SIZE))
    if problems:
        return None, problems
    per_gb = "n/a" if delta[1] is None else "%.2f s/GB" % (delta[1] / (stats["bytes"] / 1e9))
    row = ("relay, %d session%s, %d MiB" % (sessions, "s" if sessions > 1 else "", stats["bytes"] >> 20),
           "%.0f MB/s" % (stats["bytes"] / 1e6 / delta[0]),
           "%s (%s)" % (per_gb, cpu_text(delta[1])), busy_note(delta))
    return row, problems


def measure_idle(port: int, meter, proxy_pid: int) -> tuple:
    loop = LoadLoop(port)
    loop.limit = BENCH_CONCURRENCY
    problems = []
    stats = {"ok": 0}
    try:
        rss_before = rss_of(process_family(proxy_pid))
        for _ in range(BENCH_IDLE_SESSIONS):
            loop.add(login_steps())
        started = time.perf_counter()
        if not loop.run(started + BENCH_TIMEOUT):
            problems.append("idle: logins not done after %g s" % BENCH_TIMEOUT)
        opened = time.perf_counter() - started
        problems += failure_lines(loop, "idle logins")
        time.sleep(BENCH_SETTLE)
        rss_after = rss_of(process_family(proxy_pid))
        conns, loop.kept = loop.kept, []
        loop.limit = None
        for conn in conns:
            loop.add(noop_steps(stats), conn)
        if not loop.run(time.perf_counter() + 30):
            problems.append("idle: NOOPs not answered after 30 s")
        problems += failure_lines(loop, "idle NOOPs")
        if stats["ok"] != BENCH_IDLE_SESSIONS:
            problems.append("idle: %d of %d NOOPs answered OK (%d sessions logged in)"
                            % (stats["ok"], BENCH_IDLE_SESSIONS, len(conns)))
    finally:
        loop.close_all()
    count = len(conns)
    if rss_before is None or rss_after is None or not count:
        per = "n/a"
    else:
        per = "%.1f KiB/session" % ((rss_after - rss_before) / 1024 / count)
    rss = ("n/a" if rss_before is None else
           "RSS %.1f -> %.1f MiB" % (rss_before / 1048576, rss_after / 1048576))
    row = ("idle sessions, %d" % BENCH_IDLE_SESSIONS, per, rss,
           "%d/%d NOOP OK, logged in in %.1f s" % (stats["ok"], count, opened))
    return row, problems


def measure_latency(port: int, meter) -> tuple:
    micro = micro_unit()
    samples = []
    sock, reader = blocking_session(port, timeout=10)
    with sock, reader:
        for number in range(BENCH_LATENCY_WARMUP + BENCH_LATENCY_ROUNDS):
            if number == BENCH_LATENCY_WARMUP:
                before = meter.sample()
            start = time.perf_counter()
            sock.sendall(b"n NOOP\r\n")
            line = reader.readline()
            samples.append(time.perf_counter() - start)
            check_line(line, b"n OK", "NOOP", prefix=True)
        after = meter.sample()
        sock.sendall(b"b LOGOUT\r\n")
        reader.readline()
    delta = CpuMeter.delta(before, after)
    samples = sorted(samples[BENCH_LATENCY_WARMUP:])

    def percentile(fraction):
        return 1e6 * samples[min(len(samples) - 1, int(fraction * len(samples)))]

    per = "n/a" if delta[1] is None else "%.0f %s/NOOP" % (1e6 * delta[1] / len(samples), micro)
    row = ("NOOP round trip, %d" % BENCH_LATENCY_ROUNDS,
           "p50 %.0f %s, p99 %.0f %s" % (percentile(0.50), micro, percentile(0.99), micro),
           "%s (%s)" % (per, cpu_text(delta[1])), busy_note(delta))
    return row, []


def loopback_address(number: int) -> str:
    """The ``number``-th of 127.1.1.1, 127.1.1.2, ...: each wrong login comes
    from an address of its own, as a botnet's do.  (auth_delay 0 turns the
    login defence off, so every login is checked, which is what is measured.
    Linux answers on all of 127.0.0.0/8.)"""
    return "127.%d.%d.%d" % (1 + number // 64516 % 254, 1 + number // 254 % 254, 1 + number % 254)


def wrong_login_steps(stats: dict):
    """Wrong passwords for a known user, one session each, until stats["stop"]."""
    while not stats["stop"]:
        stats["started"] += 1
        yield ("connect", loopback_address(stats["started"]))
        check_line((yield ("line",)), b"* OK", "greeting", prefix=True)
        yield ("send", b"a LOGIN victim wrong\r\n")
        check_line((yield ("line",)), b"a NO", "wrong LOGIN", prefix=True)
        yield ("close",)
        stats["logins"] += 1


def noop_probe_steps(stats: dict):
    """One session that never logs in: NOOPs one at a time, each timed."""
    yield ("connect",)
    check_line((yield ("line",)), b"* OK", "greeting", prefix=True)
    while not stats["stop"]:
        started = time.perf_counter()
        yield ("send", b"n NOOP\r\n")
        check_line((yield ("line",)), b"n OK", "NOOP", prefix=True)
        stats["noops"].append(time.perf_counter() - started)
    yield ("close",)


def start_user_table_proxy(directory: str, scheme: str):
    """mailproxy.py -c FILE with one worker and a [users] table of one user
    (password "right", hashed by --hash-password's code with ``scheme``),
    auth_delay 0 (the delay is a timer, not work): (Popen, IMAP port)."""
    port = free_port()
    config = os.path.join(directory, "stall.conf")
    with open(config, "w") as handle:
        handle.write("[main]\nworker_processes = 1\nworker_connections = 1024\n"
                     "error_log = %s warn\n\n"
                     "[mail]\nproxy_pass = 127.0.0.1:9\nauth_delay = 0\n\n"
                     "[users]\nvictim = %s\n\n"
                     "[server imap]\nlisten = 127.0.0.1:%d\nprotocol = imap\n"
                     % (os.path.join(directory, "error.log"),
                        mp.hash_password(b"right", scheme), port))
    output = open(os.path.join(directory, "stall-output.log"), "wb")
    try:
        proc = subprocess.Popen([sys.executable, MAILPROXY, "-c", config],
                                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                start_new_session=True)
    finally:
        output.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.makefile("rb").readline().startswith(b"* OK"):
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_benchmark_proxy(proc)
            raise BenchmarkFailure("mailproxy with [users] did not start; its output:\n%s"
                                   % file_tail(os.path.join(directory, "stall-output.log")))
        time.sleep(0.1)


def measure_login_stall(directory: str, scheme: str) -> tuple:
    """A pre-login NOOP's round trip while BENCH_STALL_LOGINS wrong logins
    of a ``scheme`` user are in flight: a password check that runs on the
    event loop makes every other session of the worker wait for it."""
    proc, port = start_user_table_proxy(directory, scheme)
    loop = LoadLoop(port)
    stats = {"stop": False, "started": 0, "logins": 0, "noops": []}
    try:
        loop.add(noop_probe_steps(stats))
        for _ in range(BENCH_STALL_LOGINS):
            loop.add(wrong_login_steps(stats))
        loop.run(time.perf_counter() + BENCH_STALL_WARMUP)
        del stats["noops"][:]
        # The family again at the end: it counts processes the worker
        # started meanwhile (password check helpers), from their start.
        logins, cpu, started = stats["logins"], cpu_of(process_family(proc.pid)), time.perf_counter()
        loop.run(started + BENCH_STALL_SECONDS)
        wall = time.perf_counter() - started
        logins, now = stats["logins"] - logins, cpu_of(process_family(proc.pid))
        cpu = None if cpu is None or now is None else now - cpu
        stats["stop"] = True
        drained = loop.run(time.perf_counter() + 10)
    finally:
        loop.close_all()
        stop_benchmark_proxy(proc)
    samples = sorted(stats["noops"])
    problems = failure_lines(loop, "login stall, %s" % scheme)
    if not drained:
        problems.append("login stall, %s: sessions unfinished 10 s after the end" % scheme)
    if not samples or not logins:
        problems.append("login stall, %s: %d NOOPs, %d logins" % (scheme, len(samples), logins))
        return None, problems
    micro = micro_unit()
    p50 = 1e6 * samples[len(samples) // 2]
    row = ("NOOP, %d wrong %s logins" % (BENCH_STALL_LOGINS, scheme),
           "p50 %.0f %s, worst %.1f ms" % (p50, micro, 1e3 * samples[-1]),
           cpu_text(cpu), "%d NOOPs, %.0f wrong logins/s" % (len(samples), logins / wall))
    return row, problems


def raise_fd_limit() -> None:
    """1000 idle sessions need more descriptors than a 1024 soft limit."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 4 * BENCH_IDLE_SESSIONS + 256
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))
    except (ImportError, ValueError, OSError):
        pass


def print_table(rows) -> None:
    headers = ("workload", "result", "proxy CPU", "note")
    widths = [max(len(str(row[i])) for row in [headers] + rows) for i in range(4)]
    for row in [headers] + rows:
        print("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def run_benchmark(patterns=()) -> int:
    """The opt-in benchmark (--bench [NAME...]): a table of what this host
    sustains; with names, only the workloads whose name holds one of them."""
    print("mailproxy benchmark: %s CPUs, Python %s (%s), %s"
          % (os.cpu_count(), platform.python_version(), platform.python_implementation(),
             platform.platform()))
    print("Everything on 127.0.0.1: the load generator, the fake backend and auth server")
    print("share the CPUs with mailproxy.  Absolute numbers vary between machines and runs.")
    print("MB and GB are 10^6 and 10^9 bytes; proxy CPU = user + system of the master and")
    print("its workers, from /proc.")
    if hasattr(os, "getloadavg"):
        print("Load average before the run: %.2f %.2f %.2f (other work on the host skews the numbers)."
              % os.getloadavg())
    sys.stdout.flush()
    started = time.perf_counter()
    raise_fd_limit()
    directory = tempfile.mkdtemp(prefix="mailproxy-bench-")
    log_path = os.path.join(directory, "error.log")
    backend_pid = proc = None
    rows, problems = [], []
    status = 0
    try:
        backend_pid, backend_port, auth_port = start_benchmark_backend()
        proc, port = start_benchmark_proxy(directory, auth_port)
        wait_until_serving(proc, port, log_path)
        meter = CpuMeter(proc.pid, backend_pid)
        family = process_family(proc.pid)
        print("mailproxy: master pid %d, workers %s; backend + auth child pid %d"
              % (proc.pid, " ".join(str(pid) for pid in family[1:]) or "n/a", backend_pid))
        print()
        workloads = [
            ("logins", lambda: measure_logins(port, meter)),
            ("relay, one session", lambda: measure_relay(port, meter, 1, BENCH_RELAY_TOTAL)),
            ("relay, parallel", lambda: measure_relay(port, meter, BENCH_RELAY_SESSIONS,
                                                      BENCH_RELAY_TOTAL_PARALLEL)),
            ("idle sessions", lambda: measure_idle(port, meter, proc.pid)),
            ("latency", lambda: measure_latency(port, meter)),
        ]
        for scheme in BENCH_STALL_SCHEMES:
            workloads.append(("login stall, " + scheme,
                              lambda scheme=scheme: measure_login_stall(directory, scheme)))
        for name, workload in workloads:
            if patterns and not any(pattern in name for pattern in patterns):
                continue
            time.sleep(BENCH_SETTLE)
            if proc.poll() is not None:
                problems.append("mailproxy exited with status %s before %s" % (proc.returncode, name))
                break
            try:
                row, found = workload()
            except (OSError, BenchmarkFailure) as failure:
                row, found = None, ["%s: %s: %s" % (name, type(failure).__name__, failure)]
            if row is not None:
                rows.append(row)
            problems += found
        now_family = process_family(proc.pid)
        if family and sorted(now_family) != sorted(family):
            problems.append("mailproxy's processes changed during the run: %s -> %s"
                            % (family, now_family))
    except BenchmarkFailure as failure:
        problems.append(str(failure))
    except KeyboardInterrupt:
        print("\ninterrupted")
        status = 1
    finally:
        if proc is not None:
            stop_benchmark_proxy(proc)
        if backend_pid is not None:
            stop_benchmark_backend(backend_pid)
        try:
            with open(log_path, errors="replace") as handle:
                logged = handle.read().splitlines()
        except OSError:
            logged = []
        import shutil
        shutil.rmtree(directory, ignore_errors=True)
    if rows:
        print_table(rows)
    if logged:
        print()
        print("mailproxy's error log (warn and above), %d line(s):" % len(logged))
        for line in logged[:10]:
            print("    " + line)
    for line in problems:
        print(line if line.startswith(" ") else "FAILED: " + line)
    print()
    print("(%.1f s)" % (time.perf_counter() - started))
    return 1 if problems or status else 0


# ========================================================================== #
# ####                              Runner                              #### #
# ========================================================================== #

def main(argv) -> int:
    """Run the tests (two processes at once on a machine with two cores:
    the test classes alternate between them); the last line is always
    "N passed, N failed, N skipped"."""
    verbose = "-v" in argv
    patterns = [arg for arg in argv if not arg.startswith("-")]
    if "--bench" in argv:
        return run_benchmark(patterns)
    if "--fuzz" in argv:
        return run_fuzz(argv)
    if "--heavy" in argv:
        os.environ["MAILPROXY_TEST_HEAVY"] = "1"      # heavy() says yes, in the children too
    jobs = 1 if "-j1" in argv or not hasattr(os, "fork") else min(2, os.cpu_count() or 1)
    classes = {}
    for test in iter_tests(unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])):
        if not patterns or any(pattern in test.id() for pattern in patterns):
            classes.setdefault(type(test), []).append(test)
    groups = [unittest.TestSuite() for _ in range(jobs)]
    for index, tests in enumerate(classes.values()):
        groups[index % jobs].addTests(tests)
    started = time.time()
    counts = run_in_parallel(groups, verbose)
    passed, failed, skipped = (sum(count[i] for count in counts) for i in range(3))
    print("(%.1f s)" % (time.time() - started))
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 0 if failed == 0 else 1


def run_suite(suite, stream, verbose: bool):
    result = unittest.TextTestRunner(stream=stream, verbosity=2 if verbose else 1).run(suite)
    # A test may fail and then error in its cleanup: count it once.
    failed = len({test.id() for test, _ in result.failures + result.errors} |
                 {test.id() for test in result.unexpectedSuccesses})
    skipped = len(result.skipped)
    return result.testsRun - failed - skipped, failed, skipped


def run_in_parallel(groups, verbose: bool):
    """The first group here, each other one in a forked child whose report
    comes back whole through a pipe (so reports never mix)."""
    children = []
    for group in groups[1:]:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            stream = io.StringIO()
            status = 3
            try:
                counts = run_suite(group, stream, verbose)
                report = stream.getvalue() + "\n%d %d %d\n" % counts
                with os.fdopen(write_end, "w") as pipe:
                    pipe.write(report)
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        children.append((pid, read_end))
    counts = [run_suite(groups[0], sys.stdout, verbose)]
    for pid, read_end in children:
        with os.fdopen(read_end) as pipe:
            report = pipe.read()
        os.waitpid(pid, 0)
        body, _, tail = report.rstrip("\n").rpartition("\n")
        sys.stdout.write(body + "\n")
        numbers = tail.split()
        counts.append(tuple(int(n) for n in numbers) if len(numbers) == 3 else (0, 1, 0))
    return counts


def iter_tests(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from iter_tests(item)
        else:
            yield item


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

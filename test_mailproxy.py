#!/usr/bin/env python3
"""Tests for mailproxy.py, standard library only.

    python3 test_mailproxy.py              every test; the last line says
                                           "N passed, N failed, N skipped"
    python3 test_mailproxy.py -v           one line per test
    python3 test_mailproxy.py NAME...      only tests whose id contains NAME

The sections mirror mailproxy.py's.  Protocol machines are driven with byte
strings, each transcript three ways (whole, one byte at a time, and with a
pipelined tail that must come back untouched); the end-to-end tests run the
proxy's event loop in a thread against fake backends on loopback and read as
transcripts: send("a02 LOGIN alice bad"), expect(rb"^a02 NO").
"""

import base64
import hashlib
import hmac
import io
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

import mailproxy as mp

HERE = os.path.dirname(os.path.abspath(__file__))
MAILPROXY = os.path.join(HERE, "mailproxy.py")


# ########################################################################## #
#                                  Helpers                                   #
# ########################################################################## #

def server_settings(protocol: str = "imap", **overrides) -> mp.Settings:
    """A [server]'s merged settings: nginx's defaults plus ``overrides``."""
    values = {name: d.default for name, d in mp.DIRECTIVES.items()
              if "mail" in d.contexts or "server" in d.contexts}
    values.update(name="test", protocol=protocol, server_name="mail.test",
                  proxy_pass=mp.Upstream("127.0.0.1", 143, ((socket.AF_INET, ("127.0.0.1", 143)),)))
    values.update(overrides)
    return mp.Settings(values)


class FixedRandom:
    """Stands in for random.Random so that salts are known in advance."""

    def getrandbits(self, bits):
        return 12345


SALT = b"<12345.1700000000@mail.test>"     # make_salt with FixedRandom at NOW
NOW = 1700000000.0


def make_machine(protocol="imap", **overrides):
    settings = server_settings(protocol, **overrides)
    return mp.CLIENT_MACHINES[protocol](settings, now=NOW, randomness=FixedRandom())


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
    test.assertEqual(machine.trailing_data, tail)


def write_file(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as handle:
        handle.write(textwrap.dedent(text))
    return path


# ########################################################################## #
#                                  Runner                                    #
# ########################################################################## #

def main(argv) -> int:
    verbose = "-v" in argv
    patterns = [arg for arg in argv if not arg.startswith("-")]
    if "--bench" in argv:
        return run_benchmark() if "run_benchmark" in globals() else 0
    suite = unittest.TestSuite()
    for test in iter_tests(unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])):
        if not patterns or any(pattern in test.id() for pattern in patterns):
            suite.addTest(test)
    started = time.time()
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2 if verbose else 1).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print("(%.1f s)" % (time.time() - started))
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 0 if failed == 0 else 1


def iter_tests(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from iter_tests(item)
        else:
            yield item


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""
Property-based tests (hypothesis) of the SSH command-line reading: any
exec request a client can send becomes a command with facts (or facts
that say why the line cannot be read, which block refuses), never an
exception; and what is recorded of it holds no card number and can be
written to the record.
"""

import json
import re

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from hoopgw import commandline
from hoopgw.ssh.commands import exec_command, forward_command, refused_request, sftp_command

PAN = "4111111111111111"

# Words and punctuation a shell gives meaning to, so generated lines reach
# the reader's deeper paths (wrappers, -c strings, substitutions, quotes).
_PIECES = st.sampled_from([
    " ", "  ", "\t", "\n", ";", "&&", "||", "|", "&", "(", ")", "{", "}", "<", ">", ">>", "<(", ">(", "$(", "`",
    "'", '"', "\\", "$X", "${X}", "=", "a=b", "sudo", "-u", "root", "env", "timeout", "5", "xargs", "sh", "bash",
    "-c", "eval", "su", "-s", "rm", "-rf", "/", "curl", "http://x", "cat", "/etc/shadow", "if", "then", "fi",
    "while", "do", "done", "!", "#", "~", "*", "?", PAN, "4111 1111 1111 1111", "\x00", "\udcff", "é",
])
SHELLISH = st.lists(_PIECES, max_size=60).map("".join)
ANY_TEXT = st.text(max_size=400)
# What a client really sends: bytes, read as the SSH front end reads them.
ANY_BYTES = st.binary(max_size=400).map(lambda data: data.decode("utf-8", "surrogateescape"))
LINES = st.one_of(SHELLISH, ANY_TEXT, ANY_BYTES)
# The same without digits: next to other digits, a card number is part of
# a longer number, which is no card number.
NO_DIGITS = LINES.map(lambda line: re.sub(r"\d", "x", line))


def _recordable(test, value):
    """
    The store writes with orjson: what is recorded must encode, and must
    not hold the card number in clear.
    """
    encoded = orjson.dumps(value)
    test.assertNotIn(PAN.encode(), encoded)
    test.assertNotIn(b"4111 1111 1111 1111", encoded)


class ExecLineProperties(unittest.TestCase):
    """
    Any exec command line.
    """

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(line=LINES, pty=st.booleans())
    @example(line="$(" * 5000, pty=False)
    @example(line="sh -c '" * 300, pty=False)
    @example(line="`" * 2001, pty=True)
    @example(line="sudo " * 10000 + "id", pty=False)
    @example(line="echo \udcff\udcfe " + PAN, pty=False)
    def test_facts_or_refusal(self, line, pty):
        """
        Any line becomes an exec command whose facts either list what it
        runs or say in parse_error why it cannot be read; no exception.
        """
        command = exec_command(line, "deploy", pty)
        facts = command.facts
        self.assertEqual(command.kind, "exec")
        self.assertEqual(command.text, line)
        self.assertIsInstance(facts["commands"], list)
        self.assertIsInstance(facts["programs"], list)
        if "parse_error" in facts:
            self.assertIsInstance(facts["parse_error"], str)
            self.assertTrue(facts["parse_error"])
        else:
            for argv in facts["commands"]:
                self.assertTrue(all(isinstance(word, str) for word in argv))

    @settings(max_examples=300, deadline=None)
    @given(before=NO_DIGITS, after=NO_DIGITS, separator=st.sampled_from([" ", "", "-"]))
    def test_recorded_facts_hold_no_card_number(self, before, after, separator):
        """
        A card number anywhere in a line (in whatever shell context) is in
        neither the redacted text nor the facts, and both can be recorded.
        """
        pan = separator.join([PAN[i:i + 4] for i in range(0, 16, 4)])
        command = exec_command(before + " " + pan + " " + after, "deploy", False)
        _recordable(self, {"redacted": command.redacted, "facts": command.facts})

    @settings(max_examples=200, deadline=None)
    @given(argv=st.lists(LINES, max_size=12))
    def test_argv_without_shell(self, argv):
        """
        An argv that runs without a shell (kubectl exec) is read the same
        way: facts or an error, never an exception.
        """
        read = commandline.parse_argv(argv)
        facts = read.facts()
        self.assertIsInstance(facts["commands"], list)
        json.dumps(facts)


class OtherRequestProperties(unittest.TestCase):
    """
    The other SSH requests a client names with text of its own.
    """

    @settings(max_examples=200, deadline=None)
    @given(operation=ANY_TEXT, path=NO_DIGITS, target=NO_DIGITS)
    def test_sftp(self, operation, path, target):
        """
        Any sftp operation and paths give a recordable command.
        """
        command = sftp_command(operation, path, target=target + PAN, access="read")
        _recordable(self, {"redacted": command.redacted, "facts": command.facts})

    @settings(max_examples=200, deadline=None)
    @given(host=LINES, port=st.integers(0, 2 ** 32 - 1), origin=LINES, origin_port=st.integers(0, 2 ** 32 - 1))
    def test_forward(self, host, port, origin, origin_port):
        """
        Any direct-tcpip request gives a recordable command.
        """
        command = forward_command(host, port, origin, origin_port)
        orjson.dumps({"redacted": command.redacted, "facts": command.facts})

    @settings(max_examples=200, deadline=None)
    @given(text=NO_DIGITS)
    def test_refused_request(self, text):
        """
        Any refused request's text gives a recordable command.
        """
        command = refused_request("subsystem", text + " " + PAN)
        _recordable(self, {"redacted": command.redacted, "facts": command.facts})

"""
Terminal recordings (L{hoopgw.cast}): the asciicast v2 writer every
terminal front end uses, how a recording is stored and committed by its
command's end event, and the reader verify and replay use.
"""

import hashlib

from twisted.internet import defer
from twisted.trial import unittest

from hoopgw import cast as casts
from hoopgw.model import Command, Session
from hoopgw.testing import MemoryStore


class CastTests(unittest.TestCase):
    """
    The asciicast v2 recorder every terminal front end uses, and its
    reader.
    """

    def test_events(self):
        """
        Output, input and resizes are events with times; UTF-8 split across
        chunks is kept whole; card numbers are masked in both directions,
        also across chunks; a token typed is redacted.
        """
        now = [1000.0]
        recording = casts.Recorder(80, 24, term="xterm", title="t", started=1000.0, clock=lambda: now[0])
        recording.output("caf\xc3".encode("latin-1"))
        recording.output(b"\xa9\n")
        now[0] = 1001.5
        recording.input(b"4111 1111 ")
        recording.input(b"1111 1111\r")
        recording.resize(100, 40)
        recording.input(b"export T=eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjaS1ib3QifQ.c2lnbmF0dXJl\r")
        parsed = casts.parse(recording.finish())
        self.assertEqual((parsed.header["version"], parsed.width, parsed.height), (2, 80, 24))
        self.assertEqual(parsed.header["env"], {"TERM": "xterm"})
        self.assertEqual(parsed.text(), "café\n")
        self.assertEqual(parsed.text("i"), "4111 11** **** 1111\rexport T=[redacted]\r")
        self.assertIn((1.5, "r", "100x40"), parsed.frames)
        self.assertEqual(recording.masked, 1)
        self.assertEqual((recording.output_bytes, recording.input_bytes), (6, 86))

    def test_size_before_anything(self):
        """
        A resize before anything was recorded (kubectl sends one first)
        sets the size the recording starts with.
        """
        recording = casts.Recorder(clock=lambda: 5.0, started=5.0)
        recording.resize(132, 43)
        recording.output(b"$ ")
        recording.resize(80, 24)
        parsed = casts.parse(recording.finish())
        self.assertEqual((parsed.width, parsed.height), (132, 43))
        self.assertEqual(parsed.frames, [(0.0, "o", "$ "), (0.0, "r", "80x24")])

    def test_limit(self):
        """
        Past the size limit, the recording says it was cut and stops.
        """
        recording = casts.Recorder(80, 24, limit=300)
        for _ in range(50):
            recording.output(b"x" * 20)
        data = recording.finish()
        self.assertLessEqual(len(data), 400)
        self.assertTrue(recording.truncated)
        self.assertEqual(casts.parse(data).frames[-1][1], "m")

    def test_commit(self):
        """
        A finished recording goes to the store, and its name, digest and
        size into the command's outcome, before the caller finishes the
        command; a store that fails leaves the reason in the outcome.
        """
        store = MemoryStore()
        session, command = Session(connection="c", protocol="ssh", client_address="127.0.0.1:2"), Command(kind="shell", text="shell", redacted="shell")
        recording = casts.Recorder()
        recording.output(b"hello\r\n")
        self.successResultOf(casts.commit(store, session, command, recording))
        entry = command.outcome["cast"]
        data = store.attachments[entry["name"]]
        self.assertEqual(entry["name"], "%s-%s.cast" % (session.id, command.id))
        self.assertEqual(entry["sha256"], hashlib.sha256(data).hexdigest())
        self.assertEqual(entry["bytes"], len(data))
        self.assertEqual(casts.committed({"type": "command.end", "outcome": command.outcome}), entry)
        self.assertIsNone(casts.committed({"type": "session.end", "outcome": command.outcome}))

        class Full(MemoryStore):
            def write_attachment(self, name, data):
                return defer.fail(OSError(28, "No space left on device"))

        failing = Command(kind="shell", text="shell", redacted="shell")
        self.successResultOf(casts.commit(Full(), session, failing, casts.Recorder()))
        self.assertNotIn("cast", failing.outcome)
        self.assertIn("No space left on device", failing.outcome["cast_error"])
        self.flushLoggedErrors(OSError)

    def test_parse_refuses(self):
        """
        What is not an asciicast v2 recording is refused with a sentence.
        """
        for data, words in ((b"", "empty"), (b"hello\n", "not an asciicast header"),
                            (b'{"version": 1}\n', "only asciicast version 2"),
                            (b'{"version": 2}\n[1, "o"]\n', "line 2")):
            with self.assertRaises(casts.CastError) as caught:
                casts.parse(data)
            self.assertIn(words, str(caught.exception))

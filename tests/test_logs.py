"""
hoopgw's own log lines: one per session start, end and refusal (from the
chain, so every front end's sessions), reload and limit hit, naming the
session id the record uses; JSON lines for log shippers; never a card
number or a token.
"""

import io
import json
import os
import signal
import subprocess

import yaml
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from hoopgw import logs, testing
from hoopgw.chain import AddonChain
from hoopgw.model import Decision

from tests.test_packaging import BIN, environment, gateway_files, stop, wait_for_port


PAN = "4111111111111111"
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjaS1ib3QifQ.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"


class Identify:
    """
    Says who the client is, as the identity addon would.
    """

    def __init__(self, identity=None, refusal=None):
        self.identity = identity
        self.refusal = refusal

    def session_started(self, session):
        if self.refusal is not None:
            return self.refusal
        session.identity = self.identity


class ChainLogTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        observer = lambda event: self.events.append(event) if event.get("log_namespace") == "hoopgw" else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def lines(self):
        return [formatEvent(event) for event in self.events]

    def test_start_and_end(self):
        """
        An allowed session gives a start and an end line, each with the
        session's id, who and where, as fields and in the text.
        """
        chain = AddonChain([("identity", Identify(testing.identity("ci-bot")))], allowed_groups={"payments-bots"})
        session = testing.session()
        session.identity = None
        self.successResultOf(chain.start_session(session))
        session.attributes["end_reason"] = "client terminated the session"
        self.successResultOf(chain.end_session(session))
        self.assertEqual([event["event"] for event in self.events], ["session.start", "session.end"])
        for event in self.events:
            self.assertEqual(
                (event["session"], event["subject"], event["connection"], event["protocol"]),
                (session.id, "ci-bot", "test", "postgres"),
            )
        start, end = self.lines()
        self.assertIn("session %s started: ci-bot" % (session.id,), start)
        self.assertIn("client terminated the session", end)
        self.assertEqual(self.events[0]["log_level"], LogLevel.info)

    def test_refused(self):
        """
        A session outside the allowed groups gives one refusal line with the
        reason and the rule, and no end line.
        """
        chain = AddonChain([("identity", Identify(testing.identity("intruder", groups=("marketing",))))],
                           allowed_groups={"payments-bots"})
        session = testing.session()
        session.identity = None
        decision = self.successResultOf(chain.start_session(session))
        self.assertEqual(decision.verdict, "deny")
        self.assertEqual([event["event"] for event in self.events], ["session.refused"])
        self.assertEqual(self.events[0]["rule"], "allowed_groups")
        self.assertEqual(self.events[0]["log_level"], LogLevel.warn)
        self.assertIn("session %s refused" % (session.id,), self.lines()[0])

    def test_front_end_refusal(self):
        """
        A refusal a front end makes before any addon ran goes through the
        same line.
        """
        chain = AddonChain([], allowed_groups={"payments-bots"})
        session = testing.session()
        self.successResultOf(chain.refuse_session(session, Decision.deny("two credentials", rule="credentials")))
        self.assertEqual([(event["event"], event["session"]) for event in self.events], [("session.refused", session.id)])

    def test_no_secrets(self):
        """
        A reason quoting a token and a card number (an addon's sentence
        built from what the client sent) is logged without either, in text
        and in JSON.
        """
        refusal = Decision.deny("the token %s for card %s is not valid" % (TOKEN, PAN), rule="identity:bad-token")
        chain = AddonChain([("identity", Identify(refusal=refusal))], allowed_groups={"payments-bots"})
        session = testing.session()
        session.identity = None
        session.client_address = "127.0.0.1:5000 user=%s" % (PAN,)
        self.successResultOf(chain.start_session(session))
        text = "\n".join(self.lines())
        as_json = "".join(logs.format_json(event) for event in self.events)
        for output in (text, as_json):
            self.assertIn("session.refused" if output is as_json else "refused", output)
            self.assertNotIn(PAN, output)
            self.assertNotIn(TOKEN, output)
            self.assertNotIn(TOKEN.split(".")[2], output)

    def test_limit_and_reload_lines(self):
        """
        A limit hit names the session; reload lines say what changed or
        why nothing did.
        """
        session = testing.session()
        logs.limit_hit("terminal recording truncated", "64 bytes", session=session)
        logs.reload_applied(["payments"], "ab" * 32)
        logs.reload_refused("connections were added or removed: restart the gateway to apply that")
        self.assertEqual([event["event"] for event in self.events], ["limit", "config.reloaded", "config.reload_refused"])
        self.assertEqual(self.events[0]["session"], session.id)
        lines = self.lines()
        self.assertIn("limit hit in session %s: terminal recording truncated (limit 64 bytes)" % (session.id,), lines[0])
        self.assertIn("chain changed on payments", lines[1])
        self.assertEqual(self.events[2]["log_level"], LogLevel.error)

    def test_json_line(self):
        """
        The JSON formatter gives one object a line: time, level, namespace,
        the message, and the event's fields.
        """
        session = testing.session()
        session.identity = testing.identity("ci-bot")
        logs.session_started(session)
        stream = io.StringIO()
        logs.json(stream)(self.events[0])
        line = stream.getvalue()
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(
            (record["level"], record["namespace"], record["event"], record["session"], record["subject"]),
            ("info", "hoopgw", "session.start", session.id, "ci-bot"),
        )
        self.assertTrue(record["time"].endswith("Z"))
        self.assertIn("started: ci-bot", record["message"])


class TwistdJsonLogTests(unittest.TestCase):
    """
    The gateway under twistd with C{--logger=hoopgw.logs.json}.
    """

    def test_refusal_and_reload(self):
        """
        A psql client whose login name is a card number and whose password
        is a token is refused: the gateway's output is JSON lines only, one
        of them the refusal with its session id, none holding the card
        number or the token; a SIGHUP gives a reload line.
        """
        directory = os.path.abspath(self.mktemp())
        config, port, _ = gateway_files(directory)
        process = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "--reactor=asyncio", "-n", "--pidfile=", "--logger=hoopgw.logs.json",
             "hoopgw", "--config", config],
            cwd=directory, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        wait_for_port(port, process)
        client = subprocess.run(
            ["psql", "-X", "host=127.0.0.1 port=%d dbname=p user=%s sslmode=require" % (port, PAN), "-c", "SELECT 1"],
            env=dict(os.environ, PGPASSWORD=TOKEN), capture_output=True, text=True, timeout=60,
        )
        self.assertNotEqual(client.returncode, 0)
        self.assertIn("hoopgw refused the session", client.stderr)
        with open(config) as handle:
            document = yaml.safe_load(handle)
        document["connections"]["payments"]["addons"] = ["identity", "mask", "record"]
        with open(config, "w") as handle:
            yaml.safe_dump(document, handle)
        process.send_signal(signal.SIGHUP)
        # The reload's record event and the stop's both come before exit.
        self.assertEqual(stop(process), 0)
        output = process.stdout.read()
        records = [json.loads(line) for line in output.splitlines()]
        refused = [record for record in records if record.get("event") == "session.refused"]
        self.assertEqual(len(refused), 1, output)
        self.assertTrue(refused[0]["session"].startswith("s-"))
        self.assertEqual(refused[0]["connection"], "payments")
        reloaded = [record for record in records if record.get("event") == "config.reloaded"]
        self.assertEqual([record["changed"] for record in reloaded], [["payments"]], output)
        self.assertNotIn(PAN, output)
        self.assertNotIn(TOKEN.split(".")[2], output)

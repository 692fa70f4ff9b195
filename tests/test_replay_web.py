"""
The replay web server (C{twistd hoopgw-replay}) over a record a real
gateway wrote, opened in a real headless Chromium: sign in with an
auditor's token, the sessions list and its filters, a session's identity
provenance and timeline, each of its terminal recordings played under its
command with play, pause and speed; every view recorded in the signed
views chain.
"""

import os
from urllib.parse import urlencode

import treq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from hoopgw.replay import tap
from hoopgw.store import verify as verification
from hoopgw.store.file import read_events
from testbed.throwaway import free_port
from tests import evidence_support as es
from tests import support
from tests.browser import Chromium
from tests.replay_support import play_all, sign_in
from tests.support import in_thread, psql, token


@defer.inlineCallbacks
def make_record(test):
    """
    A finished, signed record: a psql session that read a card number, a
    refused session, a terminal session with two recordings.
    """
    harness = es.SignedGateway(test)
    out, err, code = yield psql(
        harness.dsn(), "-c", "SELECT 'visa' AS brand, '4111111111111111' AS pan", "-c", "SELECT 41 + 1 AS answer",
        password=token(),
    )
    assert code == 0, err
    yield psql(harness.dsn(user="intruder"), "-c", "SELECT 1", password=token(subject="intruder", groups=["marketing"]))
    session = yield es.terminal_session(harness)
    yield harness.wait_for("session.end", 2)
    yield harness.stop()
    return harness, session


class ReplayServerTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.harness, self.terminal = yield make_record(self)
        self.port = free_port()
        options = tap.Options()
        options.parseOptions([
            "--store", self.harness.store_path,
            "--config", self.harness.config_path,
            "--listen", "tcp:%d:interface=127.0.0.1" % (self.port,),
            "--signing-key", es.signing_key("replay")[0],
            "--verify-key", es.signing_key()[1],
        ])
        self.service = tap.build(options, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.base = "http://127.0.0.1:%d" % (self.port,)
        from twisted.web.client import HTTPConnectionPool

        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def views(self):
        return [event for _, _, _, event in read_events(os.path.join(self.harness.store_path, "views"))]

    @defer.inlineCallbacks
    def test_signin_required(self):
        """
        Without signing in, every page sends to the sign-in form; a valid
        token outside the auditor group is refused (403) and the refusal is
        recorded; nothing of the record is shown.
        """
        response = yield treq.get(self.base + "/sessions/" + self.terminal.id, allow_redirects=False, pool=self.pool)
        self.assertEqual(response.code, 303)
        self.assertTrue(response.headers.getRawHeaders("location")[0].startswith("/signin?next="))
        yield response.content()
        response = yield treq.post(
            self.base + "/signin",
            data=urlencode({"token": token(subject="ci-bot", groups=["payments-bots"])}).encode(),
            headers={"content-type": ["application/x-www-form-urlencoded"]},
            allow_redirects=False,
            pool=self.pool,
        )
        body = yield response.text()
        self.assertEqual(response.code, 403)
        self.assertIn("not in an auditor group", body)
        self.assertNotIn(self.terminal.id, body)
        refused = [event for event in self.views() if event["type"] == "audit.signin.refused"]
        self.assertEqual(len(refused), 1)
        self.assertEqual(refused[0]["code"], "not-auditor")
        (end, recording), _ = es.recordings(self.harness.store_path)
        response = yield treq.get(
            self.base + "/sessions/%s/commands/%s/cast" % (self.terminal.id, end["command"]), allow_redirects=False,
            pool=self.pool,
        )
        self.assertEqual(response.code, 303)
        yield response.content()

    @defer.inlineCallbacks
    def test_client_leaves_before_the_page(self):
        """
        An auditor's client that sends a sign-in and leaves before the
        answer: the sign-in is recorded, and the page made for nobody is
        dropped without an error (trial fails a test on an unhandled one).
        """
        import gc
        import socket

        body = urlencode({"token": token(subject="auditor-alice", groups=["auditors"], kind="human")}).encode()

        def send_and_leave():
            with socket.create_connection(("127.0.0.1", self.port)) as client:
                client.sendall(b"POST /signin HTTP/1.1\r\nHost: replay\r\n"
                               b"Content-Type: application/x-www-form-urlencoded\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

        yield in_thread(send_and_leave)
        for _ in range(200):
            if any(event["type"] == "audit.signin" for event in self.views()):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([event["auditor"] for event in self.views() if event["type"] == "audit.signin"], ["auditor-alice"])
        yield task.deferLater(reactor, 0.2, lambda: None)
        gc.collect()

    @defer.inlineCallbacks
    def test_browser(self):
        """
        In Chromium: sign in, see the sessions and that the record
        verified, filter to the SSH session, open it (identity provenance,
        timeline, signed coverage), play its first recording fast to the
        end and read the terminal screen, pause a slow replay midway, play
        its second recording (a card number in it masked); then the psql
        session with its card number masked as recorded.  Every page and
        both recordings were recorded as views by the auditor, and the views
        chain verifies.  A screenshot of the session page is kept.
        """
        screenshot = os.path.abspath(self.mktemp()) + "-session.png"
        auditor = token(subject="auditor-alice", groups=["auditors"], kind="human")
        seen = yield in_thread(self.drive_browser, auditor, screenshot)
        self.assertEqual(seen["count"], "3 of 3 sessions")
        self.assertIn("Record verified.", seen["verification"])
        self.assertIn("signatures checked with the key you gave", seen["verification"])
        self.assertEqual(seen["filtered"], [self.terminal.id])
        self.assertIn("ops-bot", seen["identity"])
        self.assertIn(support.ISSUER, seen["identity"])
        self.assertIn("test-1", seen["identity"])
        self.assertIn("ES256", seen["identity"])
        self.assertIn("covered by the checkpoint", seen["coverage"])
        self.assertIn("shell", seen["timeline"])
        self.assertIn("ALLOW", seen["timeline"])
        self.assertEqual(seen["ended"], "ended")
        self.assertIn("count", seen["screen"])
        self.assertIn("3", seen["screen"].split("-------")[1])
        self.assertIn("$ exit", seen["screen"])
        self.assertEqual(seen["paused"]["state"], "paused")
        self.assertLess(int(seen["paused"]["frame"]), len(es.CAST_OUTPUT))
        committed = es.recordings(self.harness.store_path)
        self.assertEqual(seen["commands"], [end["command"] for end, _ in committed])
        self.assertIn(es.SECOND_MASKED, seen["second"])
        self.assertNotIn("4111 1111 1111 1111", seen["second"])
        for _, recording in committed:
            self.assertIn(recording["name"], seen["timeline"])
        self.assertIn("411111******1111", seen["psql"])
        self.assertNotIn("4111111111111111", seen["psql"])
        self.assertIn("refused", seen["refused"])
        self.assertTrue(os.path.getsize(screenshot) > 10000)
        views = self.views()
        kinds = [(event["type"], event.get("what"), event.get("viewed_session")) for event in views]
        self.assertIn(("audit.signin", None, None), kinds)
        self.assertIn(("audit.view", "session", self.terminal.id), kinds)
        self.assertEqual(
            sorted(event.get("viewed_command") for event in views if event.get("what") == "recording"),
            sorted(end["command"] for end, _ in committed),
        )
        self.assertGreaterEqual(kinds.count(("audit.view", "sessions", None)), 2)
        self.assertEqual({event.get("auditor") for event in views if event["type"] == "audit.view"}, {"auditor-alice"})
        yield self.service.stopService()
        report = verification.verify_store(self.harness.store_path, es.signing_key()[1])
        self.assertTrue(report.ok, report.summary())
        self.assertIsNotNone(report.views)
        self.assertGreater(report.views.checkpoints, 0)

    def drive_browser(self, auditor, screenshot):
        browser = Chromium()
        seen = {}
        try:
            sign_in(browser, self.base, auditor)
            seen["count"] = browser.wait_for("document.getElementById('count') && document.getElementById('count').textContent")
            seen["verification"] = browser.evaluate("document.getElementById('verification').textContent")
            browser.evaluate("document.querySelector('select[name=protocol]').value = 'ssh'")
            browser.evaluate("document.querySelector('form.filters').submit()")
            browser.wait_for("location.search.indexOf('protocol=ssh') >= 0 && document.readyState === 'complete'")
            seen["filtered"] = browser.evaluate(
                "Array.from(document.querySelectorAll('tr.session')).map(function (row) { return row.dataset.session; })")
            browser.evaluate("document.querySelector('tr.session a').click()")
            first, second = "document.getElementById('player-1')", "document.getElementById('player-2')"
            browser.wait_for(
                "%s && %s.dataset.state === 'paused' && %s.dataset.state === 'paused'" % (second, first, second))
            seen["identity"] = browser.evaluate("document.getElementById('identity').textContent")
            seen["coverage"] = browser.evaluate("document.getElementById('coverage').textContent")
            seen["timeline"] = browser.evaluate("document.getElementById('timeline').textContent")
            seen["commands"] = browser.evaluate(
                "Array.from(document.querySelectorAll('#timeline tr.recording'))"
                ".map(function (row) { return row.dataset.command; })")
            browser.evaluate("%s.querySelector('.speed').value = '16'" % (first,))
            browser.evaluate("%s.querySelector('.play').click()" % (first,))
            seen["ended"] = browser.wait_for("%s.dataset.state === 'ended' && 'ended'" % (first,))
            seen["screen"] = browser.evaluate("%s.querySelector('.screen').textContent" % (first,))
            browser.evaluate("document.getElementById('timeline').scrollIntoView()")
            browser.screenshot(screenshot)
            browser.evaluate("%s.querySelector('.speed').value = '0.5'" % (first,))
            browser.evaluate("%s.querySelector('.play').click()" % (first,))
            browser.wait_for("%s.dataset.frame === '2'" % (first,), timeout=10)
            browser.evaluate("%s.querySelector('.play').click()" % (first,))
            seen["paused"] = browser.evaluate("({state: %s.dataset.state, frame: %s.dataset.frame})" % (first, first))
            (played,) = [each for each in play_all(browser) if each["id"] == "player-2"]
            seen["second"] = played["screen"]
            browser.open(self.base + "/sessions?identity=ci-bot")
            browser.evaluate("document.querySelector('tr.session a').click()")
            browser.wait_for("document.getElementById('timeline') !== null")
            seen["psql"] = browser.evaluate("document.getElementById('timeline').textContent")
            browser.open(self.base + "/sessions?decision=refused")
            seen["refused"] = browser.evaluate("document.getElementById('sessions').textContent")
        finally:
            browser.close()
        return seen

"""
The replay web server (C{twistd hoopgw-replay}) over a gateway's store in
the test's reactor, and a real headless Chromium signing in to it and
playing the terminal recordings of a session, as an auditor would.
"""

import json

from twisted.internet import reactor

from hoopgw.replay import tap
from testbed.throwaway import free_port
from tests import evidence_support as es
from tests.browser import Chromium
from tests.support import token


class ReplayServer:
    """
    The replay server over C{store_path}, with the identity providers of
    C{config_path}; it stops when the test ends.
    """

    def __init__(self, test, store_path, config_path, verify_key=None):
        self.port = free_port()
        arguments = [
            "--store", store_path,
            "--config", config_path,
            "--listen", "tcp:%d:interface=127.0.0.1" % (self.port,),
            "--signing-key", es.signing_key("replay")[0],
        ]
        if verify_key:
            arguments += ["--verify-key", verify_key]
        options = tap.Options()
        options.parseOptions(arguments)
        self.service = tap.build(options, reactor)
        self.service.startService()
        test.addCleanup(self.stop)
        self.base = "http://127.0.0.1:%d" % (self.port,)

    def stop(self):
        if self.service.running:
            return self.service.stopService()
        return None


def auditor_token():
    return token(subject="auditor-alice", groups=["auditors"], kind="human")


def js(value):
    return json.dumps(value)


def sign_in(browser, base, auditor):
    """
    Open the sessions list, be sent to the sign-in form, sign in with the
    auditor's token and wait for the list.
    """
    browser.open(base + "/sessions")
    browser.wait_for("location.pathname === '/signin'")
    browser.evaluate("document.querySelector('textarea[name=token]').value = %s" % (js(auditor),))
    browser.evaluate("document.forms[0].submit()")
    browser.wait_for("location.pathname === '/sessions' && document.readyState === 'complete'")


def play_all(browser, speed="16"):
    """
    On a session page: wait until every recording's player has loaded,
    play each to its end at C{speed}, and read its screen.

    @return: C{[{"id", "command", "screen"}, ...]}, in the timeline's order.
    """
    players = "Array.from(document.querySelectorAll('#timeline .player'))"
    browser.wait_for("%s.length > 0 && %s.every(function (p) { return p.dataset.state === 'paused'; })" % (players, players))
    played = []
    for ident in browser.evaluate("%s.map(function (p) { return p.id; })" % (players,)):
        element = "document.getElementById(%s)" % (js(ident),)
        browser.evaluate("%s.querySelector('.speed').value = %s" % (element, js(speed)))
        browser.evaluate("%s.querySelector('.play').click()" % (element,))
        browser.wait_for("%s.dataset.state === 'ended'" % (element,))
        played.append(browser.evaluate(
            "({id: %s.id, command: %s.closest('tr').dataset.command, screen: %s.querySelector('.screen').textContent})"
            % (element, element, element)
        ))
    return played


def play_session(base, session_id, screenshot=None):
    """
    In a fresh Chromium (blocking: run it off the reactor thread): sign in,
    open the session, play every recording.

    @return: C{{"timeline": text, "players": [...]}} (see L{play_all}).
    """
    browser = Chromium()
    try:
        sign_in(browser, base, auditor_token())
        browser.open(base + "/sessions/" + session_id)
        seen = {"players": play_all(browser)}
        seen["timeline"] = browser.evaluate("document.getElementById('timeline').textContent")
        seen["verification"] = browser.evaluate("document.getElementById('verification').textContent")
        if screenshot:
            browser.evaluate("document.querySelector('#timeline .player').scrollIntoView()")
            browser.screenshot(screenshot)
    finally:
        browser.close()
    return seen

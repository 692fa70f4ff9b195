"""
A real headless Chromium (Debian's) driven over the DevTools protocol: a
small blocking client (a socket and wsproto, nothing downloaded) that
navigates, runs JavaScript in the page, and takes screenshots.  Run it off
the reactor thread when the server under test runs in the test's reactor.
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from testbed.throwaway import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
]


class BrowserError(Exception):
    pass


class Chromium:
    """
    One headless Chromium with a fresh profile, and one page in it.
    """

    def __init__(self, timeout=30):
        self.profile = tempfile.mkdtemp(prefix="hoopgw-chromium-")
        self.port = free_port()
        self.timeout = timeout
        self.log = open(os.path.join(self.profile, "chromium.log"), "wb")
        self.process = subprocess.Popen(
            [CHROMIUM] + FLAGS + ["--user-data-dir=" + self.profile, "--remote-debugging-port=%d" % (self.port,),
                                  "about:blank"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._ids = 0
        self._buffer = []
        self._connect()

    def _connect(self):
        deadline = time.time() + self.timeout
        page = None
        while time.time() < deadline and page is None:
            if self.process.poll() is not None:
                raise BrowserError("chromium exited: %s" % (self._log(),))
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % (self.port,), timeout=2) as response:
                    targets = json.loads(response.read())
                page = next((target for target in targets if target.get("type") == "page"), None)
            except OSError:
                pass
            if page is None:
                time.sleep(0.2)
        if page is None:
            raise BrowserError("chromium's DevTools did not answer: %s" % (self._log(),))
        url = page["webSocketDebuggerUrl"]
        path = url.split(str(self.port), 1)[1]
        self.socket = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.socket.sendall(self.ws.send(Request(host="127.0.0.1:%d" % (self.port,), target=path)))
        while True:
            event = self._next_event()
            if isinstance(event, AcceptConnection):
                break
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _log(self):
        try:
            with open(os.path.join(self.profile, "chromium.log"), "rb") as handle:
                return handle.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _next_event(self):
        while not self._buffer:
            data = self.socket.recv(1 << 20)
            if not data:
                raise BrowserError("chromium closed the DevTools connection")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Ping):
                    self.socket.sendall(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    raise BrowserError("chromium closed the DevTools connection")
                else:
                    self._buffer.append(event)
        return self._buffer.pop(0)

    def call(self, method, **params):
        """
        Send one DevTools command and return its result.
        """
        self._ids += 1
        ident = self._ids
        self.socket.sendall(self.ws.send(TextMessage(data=json.dumps({"id": ident, "method": method, "params": params}))))
        text = ""
        while True:
            event = self._next_event()
            if not isinstance(event, TextMessage):
                continue
            text += event.data
            if not event.message_finished:
                continue
            message, text = json.loads(text), ""
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError("%s failed: %s" % (method, message["error"]))
                return message.get("result", {})

    def evaluate(self, expression):
        """
        The value of a JavaScript expression in the page (awaited if it is
        a promise).
        """
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError("the page raised: %s" % (json.dumps(result["exceptionDetails"])[:500],))
        return result["result"].get("value")

    def wait_for(self, expression, timeout=None):
        """
        Wait until a JavaScript expression is truthy in the page.
        """
        deadline = time.time() + (timeout or self.timeout)
        last = None
        while time.time() < deadline:
            try:
                last = self.evaluate(expression)
            except BrowserError as error:
                last = error
            if last and not isinstance(last, BrowserError):
                return last
            time.sleep(0.1)
        raise BrowserError("%s still false after waiting (last: %r); page: %s" % (expression, last, self.location()))

    def location(self):
        try:
            return self.evaluate("location.href")
        except BrowserError:
            return "?"

    def open(self, url):
        """
        Go to C{url} and wait for the page to load.
        """
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))
        return path

    def close(self):
        try:
            self.socket.close()
        except Exception:
            pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

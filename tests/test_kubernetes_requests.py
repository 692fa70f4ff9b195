"""
The Kubernetes front end's pure parts, without a network: request info as
the API server derives it, Secret values opened and closed, the channel
protocols and the connection settings' checks.
"""

import base64
import json
import os

from twisted.trial import unittest

from hoopgw import config as configuration
from hoopgw.kubernetes import bodies, channels
from hoopgw.kubernetes.requestinfo import request_info
from hoopgw.kubernetes.settings import parse_connection
from hoopgw.options import ConfigError
from tests import support


class RequestInfoTests(unittest.TestCase):
    """
    Verb, group, version, resource, subresource, namespace and name, as the
    API server's RequestInfoFactory gives them.
    """

    CASES = [
        # method, path, query, websocket -> verb, group, version, resource, subresource, namespace, name
        ("GET", "/api/v1/namespaces/default/pods", "", False, ("list", "", "v1", "pods", "", "default", "")),
        ("GET", "/api/v1/namespaces/default/pods", "watch=true", False, ("watch", "", "v1", "pods", "", "default", "")),
        ("GET", "/api/v1/namespaces/default/pods/web-1", "", False, ("get", "", "v1", "pods", "", "default", "web-1")),
        ("GET", "/api/v1/namespaces/default/pods", "fieldSelector=metadata.name%3Dweb-1&watch=1", False,
         ("watch", "", "v1", "pods", "", "default", "web-1")),
        ("GET", "/api/v1/namespaces/default/pods", "fieldSelector=metadata.name=web-1", False,
         ("list", "", "v1", "pods", "", "default", "web-1")),
        ("GET", "/api/v1/watch/namespaces/default/pods", "", False, ("watch", "", "v1", "pods", "", "default", "")),
        ("POST", "/apis/apps/v1/namespaces/prod/deployments", "", False, ("create", "apps", "v1", "deployments", "", "prod", "")),
        ("PUT", "/apis/apps/v1/namespaces/prod/deployments/api/scale", "", False,
         ("update", "apps", "v1", "deployments", "scale", "prod", "api")),
        ("PATCH", "/api/v1/namespaces/default/configmaps/x", "", False, ("patch", "", "v1", "configmaps", "", "default", "x")),
        ("DELETE", "/api/v1/namespaces/default/configmaps/x", "", False, ("delete", "", "v1", "configmaps", "", "default", "x")),
        ("DELETE", "/api/v1/namespaces/default/configmaps", "", False,
         ("deletecollection", "", "v1", "configmaps", "", "default", "")),
        ("DELETE", "/api/v1/namespaces/payments", "", False, ("delete", "", "v1", "namespaces", "", "payments", "payments")),
        ("PUT", "/api/v1/namespaces/payments/finalize", "", False,
         ("update", "", "v1", "namespaces", "finalize", "payments", "payments")),
        ("GET", "/api/v1/namespaces", "", False, ("list", "", "v1", "namespaces", "", "", "")),
        ("GET", "/api/v1/nodes/n1/proxy/metrics", "", False, ("get", "", "v1", "nodes", "proxy", "", "n1")),
        ("GET", "/api/v1/proxy/namespaces/default/pods/web-1", "", False, ("proxy", "", "v1", "pods", "", "default", "web-1")),
        ("POST", "/api/v1/namespaces/prod/pods/db-0/exec", "command=sh", False,
         ("create", "", "v1", "pods", "exec", "prod", "db-0")),
        ("GET", "/api/v1/namespaces/prod/pods/db-0/exec", "command=sh", True, ("create", "", "v1", "pods", "exec", "prod", "db-0")),
        ("GET", "/api/v1/namespaces/prod/pods/db-0/attach", "", True, ("create", "", "v1", "pods", "attach", "prod", "db-0")),
        ("GET", "/api/v1/namespaces/prod/pods/db-0/log", "follow=true", False, ("get", "", "v1", "pods", "log", "prod", "db-0")),
        ("GET", "/api/v1/namespaces/prod/pods/db-0/status", "", False, ("get", "", "v1", "pods", "status", "prod", "db-0")),
    ]

    def test_resource_requests(self):
        """
        Each request of the table gets the facts the API server would give it.
        """
        for method, path, query, websocket, expected in self.CASES:
            info = request_info(method, path, query, websocket)
            self.assertTrue(info.resource_request, path)
            self.assertEqual(
                (info.verb, info.api_group, info.api_version, info.resource, info.subresource, info.namespace, info.name),
                expected,
                "%s %s?%s" % (method, path, query),
            )

    def test_non_resource_requests(self):
        """
        Discovery documents, /version and health checks are not resource
        requests: their verb is the HTTP method.
        """
        for method, path in [("GET", "/version"), ("GET", "/api"), ("GET", "/apis"), ("GET", "/apis/apps"),
                             ("GET", "/api/v1"), ("GET", "/apis/apps/v1"), ("GET", "/healthz"), ("GET", "/openapi/v3")]:
            info = request_info(method, path)
            self.assertFalse(info.resource_request, path)
            self.assertEqual(info.verb, "get")

    def test_qualified_resource(self):
        """
        pods/exec, as RBAC rules name it.
        """
        self.assertEqual(request_info("POST", "/api/v1/namespaces/a/pods/b/exec").qualified_resource, "pods/exec")


def _b64(text):
    return base64.b64encode(text.encode()).decode()


class SecretTests(unittest.TestCase):
    """
    Secret values are opened for the chain and closed again, wherever a
    Secret appears.
    """

    def roundtrip(self, document, change=lambda text: text.replace("4111111111111111", "411111******1111")):
        opened = bodies.open_secrets(document)
        text = change(json.dumps(document))
        changed = json.loads(text)
        bodies.close_secrets(changed, opened)
        return opened, changed

    def test_secret(self):
        """
        A Secret's text values are opened (binary ones stay encoded) and,
        masked, encoded again.
        """
        secret = {"kind": "Secret", "metadata": {"name": "s"}, "data": {"pan": _b64("4111111111111111"), "bin": "/w=="}}
        opened, changed = self.roundtrip(secret)
        self.assertEqual(opened, [["data", "pan"]])
        self.assertEqual(changed["data"], {"pan": _b64("411111******1111"), "bin": "/w=="})

    def test_list_and_watch_event(self):
        """
        SecretList items (which carry no kind) and watch events are opened.
        """
        listing = {"kind": "SecretList", "items": [{"metadata": {"name": "a"}, "data": {"x": _b64("4111111111111111")}}]}
        _, changed = self.roundtrip(listing)
        self.assertEqual(changed["items"][0]["data"]["x"], _b64("411111******1111"))
        event = {"type": "ADDED", "object": {"kind": "Secret", "data": {"x": _b64("4111111111111111")}}}
        _, changed = self.roundtrip(event)
        self.assertEqual(changed["object"]["data"]["x"], _b64("411111******1111"))
        configmaps = {"kind": "ConfigMapList", "items": [{"metadata": {"name": "a"}, "data": {"x": _b64("hello")}}]}
        self.assertEqual(bodies.open_secrets(configmaps), [])

    def test_configmap_binary_data(self):
        """
        A ConfigMap's binaryData is base64 too: opened and closed; its
        plain data is left alone.
        """
        configmap = {"kind": "ConfigMap", "data": {"a": "4111111111111111"}, "binaryData": {"b": _b64("4111111111111111")}}
        opened, changed = self.roundtrip(configmap)
        self.assertEqual(opened, [["binaryData", "b"]])
        self.assertEqual(changed["binaryData"]["b"], _b64("411111******1111"))

    def test_last_applied(self):
        """
        The last-applied annotation kubectl apply leaves holds the Secret
        again, base64 and all: it is opened and closed too.
        """
        applied = json.dumps({"kind": "Secret", "data": {"pan": _b64("4111111111111111")}})
        secret = {"kind": "Secret", "metadata": {"annotations": {bodies.LAST_APPLIED: applied}}, "data": {}}
        opened, changed = self.roundtrip(secret)
        self.assertEqual(bodies.describe_opened(opened),
                         ["/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration#/data/pan"])
        inner = json.loads(changed["metadata"]["annotations"][bodies.LAST_APPLIED])
        self.assertEqual(inner["data"]["pan"], _b64("411111******1111"))

    def test_status(self):
        """
        A refusal is a Status object kubectl can print.
        """
        status = json.loads(bodies.status(403, "no"))
        self.assertEqual((status["kind"], status["code"], status["reason"], status["message"]), ("Status", 403, "Forbidden", "no"))


class ChannelTests(unittest.TestCase):
    """
    The exec channel protocols.
    """

    def test_binary_and_base64(self):
        """
        Binary protocols put the channel in the first byte; the base64 ones
        a digit, then base64.
        """
        frame = channels.decode("v5.channel.k8s.io", b"\x01hello")
        self.assertEqual((frame.channel, frame.data), (1, b"hello"))
        frame.data = b"bye"
        self.assertEqual(frame.encode(), b"\x01bye")
        frame = channels.decode("base64.channel.k8s.io", b"1" + base64.b64encode(b"hello"))
        self.assertEqual((frame.channel, frame.data), (1, b"hello"))
        self.assertEqual(frame.encode(), b"1" + base64.b64encode(b"hello"))
        self.assertIsNone(channels.decode("base64.channel.k8s.io", b"x!!").channel)

    def test_terminal_size(self):
        """
        A resize message gives the terminal's size; one that does not parse
        gives None.
        """
        self.assertEqual(channels.terminal_size(b'{"Width": 120, "Height": 40}'), (120, 40))
        for data in (b"", b"{", b'{"Width": 1}', b'{"Width": "x", "Height": 2}', b"[]"):
            self.assertIsNone(channels.terminal_size(data), data)


class SettingsTests(unittest.TestCase):
    """
    A Kubernetes connection's configuration is checked with the key path
    and a sentence saying what to do.
    """

    def setUp(self):
        self.certificate, self.key, self.ca = support.gateway_certificate()

    def raw(self, **target):
        values = {"server": "https://127.0.0.1:6443", "ca": self.ca, "token": {"env": "KUBE_TOKEN"}}
        values.update(target)
        return {"target": {key: value for key, value in values.items() if value is not None},
                "tls": {"certificate": self.certificate, "key": self.key}}

    def test_valid(self):
        """
        A valid connection gives the mitmproxy reverse mode it listens with.
        """
        settings = parse_connection(self.raw(), "connections.k", "tcp:16443:interface=127.0.0.1")
        self.assertEqual(settings.mode, "reverse:https://127.0.0.1:6443@127.0.0.1:16443")
        self.assertEqual(settings.target_name, "https://127.0.0.1:6443")

    def assertRefused(self, raw, listen, path, words):
        with self.assertRaises(ConfigError) as caught:
            parse_connection(raw, "connections.k", listen)
        self.assertEqual(caught.exception.path, path)
        self.assertIn(words, caught.exception.message)

    def test_refusals(self):
        """
        Bad listen endpoints, URLs, a missing CA or credential and a half
        client certificate are refused, each naming its key.
        """
        listen = "tcp:16443:interface=127.0.0.1"
        self.assertRefused(self.raw(), "ssl:16443", "connections.k.listen", "plain TCP endpoint")
        self.assertRefused(self.raw(server="http://api:6443"), listen, "connections.k.target.server", "https://HOST:PORT")
        self.assertRefused(self.raw(ca=None), listen, "connections.k.target.ca", "is required")
        self.assertRefused(self.raw(token=None), listen, "connections.k.target", "its own credential")
        self.assertRefused(self.raw(token="inline"), listen, "connections.k.target.token", "not accepted inline")
        self.assertRefused(self.raw(client_certificate=self.certificate), listen, "connections.k.target", "both client_certificate")

    def test_whole_file(self):
        """
        The protocol is registered: a configuration file with a Kubernetes
        connection loads.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        connection = dict(self.raw(), protocol="kubernetes", listen="tcp:16443:interface=127.0.0.1",
                          allowed_groups=["bots"], addons=["identity", "record"])
        document = support.configuration_document(directory, {"k": connection})
        config = configuration.parse(document, os.path.join(directory, "hoopgw.yaml"))
        self.assertEqual(config.connections["k"].protocol, "kubernetes")


class RedactedRequestTests(unittest.TestCase):
    """
    The request line kept in the record is decoded as the API server
    decodes it before redaction, so URL encoding hides nothing.
    """

    def test_form_encoded_exec_arguments(self):
        """
        An exec command's arguments travel in the query, spaces as "+" or
        %20: a card number among them is masked either way.
        """
        from hoopgw.kubernetes.requestinfo import redacted_request

        text = redacted_request(
            "POST",
            "/api/v1/namespaces/prod/pods/web-1/exec?command=echo&command=4111+1111+1111+1111"
            "&command=4111%201111%201111%201111&stdout=true",
        )
        self.assertNotIn("4111+1111", text)
        self.assertNotIn("4111 1111 1111 1111", text)
        self.assertEqual(text.count("4111 11** **** 1111"), 2)

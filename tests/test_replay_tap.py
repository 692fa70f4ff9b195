"""
The C{twistd hoopgw-replay} plugin: declared beside C{twistd hoopgw}, its
options checked, its service built (as Twisted's own tap tests do).
"""

import importlib.util
import os

from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial import unittest

from hoopgw.replay import tap
from tests import evidence_support as es

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PluginTests(unittest.TestCase):
    def test_dropin_declares_both(self):
        """
        twisted/plugins/hoopgw_plugin.py declares hoopgw and hoopgw-replay,
        the latter built by hoopgw.replay.tap.
        """
        spec = importlib.util.spec_from_file_location("hoopgw_plugin_under_test", os.path.join(ROOT, "twisted", "plugins", "hoopgw_plugin.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.assertEqual(module.hoopgw.tapname, "hoopgw")
        self.assertEqual(module.hoopgw_replay.tapname, "hoopgw-replay")
        self.assertEqual(module.hoopgw_replay.module, "hoopgw.replay.tap")

    def test_config_required(self):
        """
        Without --config there is no one to sign auditors in: refused with a
        sentence.
        """
        options = tap.Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--store", "/nowhere"])
        self.assertIn("identity providers", str(error))

    @defer.inlineCallbacks
    def test_bundle_needs_views_folder(self):
        """
        A bundle is read only: the server asks where to record views, and
        serves it once told.  A file that is no bundle is refused.
        """
        import io

        from hoopgw import cli
        from tests.test_evidence import pristine

        store = yield pristine(self)
        bundle = os.path.abspath(self.mktemp()) + ".tar.gz"
        self.assertEqual(cli.main(["export", "--store", store, "-o", bundle], out=io.StringIO()), 0)
        config = os.path.join(os.path.dirname(store), "hoopgw.yaml")
        options = tap.Options()
        options.parseOptions(["--store", bundle, "--config", config])
        error = self.assertRaises(usage.UsageError, tap.build, options, reactor)
        self.assertIn("--views", str(error))
        options = tap.Options()
        options.parseOptions(["--store", bundle, "--config", config, "--views", os.path.abspath(self.mktemp()),
                              "--listen", "tcp:0:interface=127.0.0.1"])
        service = tap.build(options, reactor)
        yield service.store.close()
        with open(bundle, "wb") as handle:
            handle.write(b"not a bundle")
        error = self.assertRaises(usage.UsageError, tap.build, options, reactor)
        self.assertIn("not an evidence bundle", str(error))

    def test_service(self):
        """
        The service listens where asked and signs its views chain with the
        configured key.
        """
        harness = es.SignedGateway(self)
        self.addCleanup(harness.stop)
        options = tap.Options()
        options.parseOptions(["--store", os.path.abspath(self.mktemp()), "--config", harness.config_path,
                              "--listen", "tcp:0:interface=127.0.0.1"])
        os.makedirs(options["store"])
        service = tap.build(options, reactor)
        self.assertEqual(service.signer.key_id, harness.gateway.signer.key_id)
        self.assertEqual(len(list(service)), 1)
        return service.store.close()
